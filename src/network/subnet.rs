//! IPv4 subnets as written in config.yaml (`192.168.64.0/24`).

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// An IPv4 network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Subnet {
    pub network: Ipv4Addr,
    pub prefix: u8,
}

/// Why a subnet was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("Invalid subnet '{0}': write an IPv4 network such as 192.168.64.0/24 (prefix 8 to 29)")]
pub struct BadSubnet(pub String);

impl FromStr for Subnet {
    type Err = BadSubnet;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadSubnet(s.to_string());
        let (addr, prefix) = s.trim().split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        if !(8..=29).contains(&prefix) {
            return Err(bad());
        }
        Ok(Self {
            network: Ipv4Addr::from(u32::from(addr) & Self::mask_bits(prefix)),
            prefix,
        })
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl Subnet {
    fn mask_bits(prefix: u8) -> u32 {
        u32::MAX << (32 - prefix)
    }

    /// The netmask, `255.255.255.0` for a /24.
    pub fn mask(&self) -> Ipv4Addr {
        Ipv4Addr::from(Self::mask_bits(self.prefix))
    }

    /// The n-th address of the subnet (1 is the gateway).
    pub fn host(&self, n: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + n)
    }

    /// The gateway: the first address.
    pub fn gateway(&self) -> Ipv4Addr {
        self.host(1)
    }

    /// The last usable address.
    pub fn last_host(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !Self::mask_bits(self.prefix)).saturating_dec()
    }

    /// Number of host addresses after the gateway.
    pub fn guest_capacity(&self) -> u32 {
        (1u32 << (32 - self.prefix)) - 3
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Self::mask_bits(self.prefix) == u32::from(self.network)
    }

    /// Whether two subnets share any address.
    pub fn overlaps(&self, other: &Subnet) -> bool {
        let p = self.prefix.min(other.prefix);
        let m = Self::mask_bits(p.max(1));
        (u32::from(self.network) & m) == (u32::from(other.network) & m) || p == 0
    }
}

trait Dec {
    fn saturating_dec(self) -> Self;
}

impl Dec for Ipv4Addr {
    fn saturating_dec(self) -> Self {
        Ipv4Addr::from(u32::from(self).saturating_sub(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_derives_addresses() {
        let s: Subnet = "203.0.113.77/24".parse().unwrap();
        assert_eq!(s.to_string(), "203.0.113.0/24");
        assert_eq!(s.gateway(), Ipv4Addr::new(203, 0, 113, 1));
        assert_eq!(s.host(2), Ipv4Addr::new(203, 0, 113, 2));
        assert_eq!(s.last_host(), Ipv4Addr::new(203, 0, 113, 254));
        assert_eq!(s.mask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(s.guest_capacity(), 253);
        assert!(s.contains(Ipv4Addr::new(203, 0, 113, 9)));
        assert!(!s.contains(Ipv4Addr::new(203, 0, 114, 9)));
        let half: Subnet = "203.0.113.0/25".parse().unwrap();
        assert!(s.overlaps(&half) && half.overlaps(&s));
        assert!(!s.overlaps(&"198.51.100.0/24".parse().unwrap()));
        for bad in ["203.0.113.0", "x/24", "203.0.113.0/7", "203.0.113.0/30"] {
            assert!(bad.parse::<Subnet>().is_err(), "{bad}");
        }
    }
}
