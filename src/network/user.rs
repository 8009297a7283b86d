//! `user` mode: QEMU's built-in user-mode stack (slirp). No privileges, no
//! host devices; the guest's traffic leaves through QEMU's own sockets and so
//! follows the host's routing, VPN included.

use std::net::Ipv4Addr;

use super::publish::PortMapping;

/// The user-mode subnet and the address slirp's DHCP hands the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserNet {
    pub network: Ipv4Addr,
    pub prefix: u8,
}

impl Default for UserNet {
    fn default() -> Self {
        Self {
            network: Ipv4Addr::new(10, 0, 2, 0),
            prefix: 24,
        }
    }
}

/// Why a user-mode subnet setting was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "Invalid userSubnet '{0}' in config.yaml: write an IPv4 network such as 10.0.2.0/24 (prefix 8 to 28)"
)]
pub struct BadSubnet(pub String);

impl std::str::FromStr for UserNet {
    type Err = BadSubnet;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadSubnet(s.to_string());
        let (addr, prefix) = s.trim().split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        if !(8..=28).contains(&prefix) {
            return Err(bad());
        }
        let mask = u32::MAX << (32 - prefix);
        Ok(Self {
            network: Ipv4Addr::from(u32::from(addr) & mask),
            prefix,
        })
    }
}

impl UserNet {
    /// The address slirp's DHCP server gives the first guest (network + 15).
    pub fn guest_address(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 15)
    }

    /// The `-netdev user,...` option value, with one `hostfwd` per published port.
    pub fn netdev(&self, id: &str, publish: &[PortMapping]) -> String {
        let mut s = format!(
            "user,id={id},net={}/{},dhcpstart={}",
            self.network,
            self.prefix,
            self.guest_address()
        );
        for p in publish {
            let host_ip = p.host_ip.map(|ip| ip.to_string()).unwrap_or_default();
            s.push_str(&format!(
                ",hostfwd={}:{host_ip}:{}-:{}",
                p.proto, p.host_port, p.guest_port
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_derives_the_guest_address() {
        let n: UserNet = "192.0.2.77/24".parse().unwrap();
        assert_eq!(n.network, Ipv4Addr::new(192, 0, 2, 0));
        assert_eq!(n.guest_address(), Ipv4Addr::new(192, 0, 2, 15));
        assert!(n.netdev("n0", &[]).contains("net=192.0.2.0/24"));
        let p = [
            "127.0.0.1:8080:80".parse().unwrap(),
            "5353:53/udp".parse().unwrap(),
        ];
        let d = n.netdev("n0", &p);
        assert!(d.contains(",hostfwd=tcp:127.0.0.1:8080-:80"), "{d}");
        assert!(d.contains(",hostfwd=udp::5353-:53"), "{d}");
        assert!("192.0.2.0".parse::<UserNet>().is_err());
        assert!("192.0.2.0/31".parse::<UserNet>().is_err());
    }
}
