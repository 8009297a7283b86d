//! `user` mode: QEMU's built-in user-mode stack (slirp). No privileges, no
//! host devices; the guest's traffic leaves through QEMU's own sockets and so
//! follows the host's routing, VPN included.

use std::net::Ipv4Addr;

use super::publish::PortMapping;
use super::subnet::Subnet;

/// The user-mode subnet (config.yaml `userSubnet`, default 10.0.2.0/24).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserNet(pub Subnet);

impl Default for UserNet {
    fn default() -> Self {
        Self(Subnet {
            network: Ipv4Addr::new(10, 0, 2, 0),
            prefix: 24,
        })
    }
}

/// Why a user-mode subnet setting was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "Invalid userSubnet '{0}' in config.yaml: write an IPv4 network such as 10.0.2.0/24 (prefix 8 to 27)"
)]
pub struct BadSubnet(pub String);

impl std::str::FromStr for UserNet {
    type Err = BadSubnet;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.parse::<Subnet>() {
            // The guest gets .15: the subnet must hold it.
            Ok(subnet) if subnet.prefix <= 27 => Ok(Self(subnet)),
            _ => Err(BadSubnet(s.to_string())),
        }
    }
}

impl UserNet {
    /// The address slirp's DHCP server gives the first guest (network + 15).
    pub fn guest_address(&self) -> Ipv4Addr {
        self.0.host(15)
    }

    /// The `-netdev user,...` option value, with one `hostfwd` per published port.
    pub fn netdev(&self, id: &str, publish: &[PortMapping]) -> String {
        let mut s = format!(
            "user,id={id},net={},dhcpstart={}",
            self.0,
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
        assert_eq!(n.0.network, Ipv4Addr::new(192, 0, 2, 0));
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
        assert!("192.0.2.0/28".parse::<UserNet>().is_err());
    }
}
