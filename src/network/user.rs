//! `user` mode: passt (see [`super::passt`]), started by the supervisor per
//! VM. No privileges, no host devices; the guest's traffic leaves through
//! passt's sockets and so follows the host's routing, VPN included. The guest
//! never reaches the host's loopback unless the VM opted in
//! (`unsafeHostLoopback`).

use std::net::Ipv4Addr;

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
    /// The address passt's DHCP server gives the guest (network + 15).
    pub fn guest_address(&self) -> Ipv4Addr {
        self.0.host(15)
    }

    /// The guest's default gateway (network + 2). Not the host: see
    /// [`super::passt`].
    pub fn gateway(&self) -> Ipv4Addr {
        self.0.host(2)
    }

    /// The DNS address passt forwards to the host's first resolver (network + 3).
    pub fn dns(&self) -> Ipv4Addr {
        self.0.host(3)
    }

    /// The `-netdev` value for passt's socket, handed to QEMU as descriptor `fd`.
    pub fn netdev(id: &str, fd: i32) -> String {
        format!("stream,id={id},server=off,addr.type=fd,addr.str={fd}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_derives_the_guest_addresses() {
        let n: UserNet = "192.0.2.77/24".parse().unwrap();
        assert_eq!(n.0.network, Ipv4Addr::new(192, 0, 2, 0));
        assert_eq!(n.guest_address(), Ipv4Addr::new(192, 0, 2, 15));
        assert_eq!(n.gateway(), Ipv4Addr::new(192, 0, 2, 2));
        assert_eq!(n.dns(), Ipv4Addr::new(192, 0, 2, 3));
        assert_eq!(
            UserNet::netdev("n0", 3),
            "stream,id=n0,server=off,addr.type=fd,addr.str=3"
        );
        assert!("192.0.2.0".parse::<UserNet>().is_err());
        assert!("192.0.2.0/28".parse::<UserNet>().is_err());
    }
}
