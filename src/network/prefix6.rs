//! The IPv6 /64 of a lume network as written in config.yaml
//! (`natSubnet6: fd12:3456:789a:1::/64`, or `none`), and the addresses lume
//! derives from it: the gateway `PREFIX::1` and each guest's EUI-64 address.

use std::fmt;
use std::net::Ipv6Addr;
use std::str::FromStr;

use crate::vm::config::MacAddress;

/// An IPv6 /64: the only length stateless autoconfiguration works with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Prefix6(Ipv6Addr);

/// Why an IPv6 prefix was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "Invalid IPv6 subnet '{value}': {why}; write a /64 such as fd00:6c75:6d65:1::/64, or none to give this network no IPv6"
)]
pub struct BadPrefix6 {
    pub value: String,
    pub why: String,
}

impl FromStr for Prefix6 {
    type Err = BadPrefix6;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| BadPrefix6 {
            value: s.to_string(),
            why: why.to_string(),
        };
        let not_a_network = || bad("not an IPv6 network written ADDRESS/64");
        let (addr, len) = s.trim().split_once('/').ok_or_else(not_a_network)?;
        let addr: Ipv6Addr = addr.parse().map_err(|_| not_a_network())?;
        if len != "64" {
            return Err(bad(
                "only a /64 works (guests configure their addresses from a /64)",
            ));
        }
        let seg = addr.segments();
        // Multicast, link-local, unspecified and IPv4-mapped forms are not
        // networks a guest can live on.
        if seg[0] & 0xff00 == 0xff00 {
            return Err(bad("a multicast prefix"));
        }
        if seg[0] & 0xffc0 == 0xfe80 {
            return Err(bad(
                "a link-local prefix (every link has fe80::/64 already)",
            ));
        }
        if seg[..4] == [0, 0, 0, 0] {
            return Err(bad(
                "not a unicast network (::/64 holds the unspecified, loopback and IPv4-mapped addresses)",
            ));
        }
        if seg[4..] != [0, 0, 0, 0] {
            let network = Ipv6Addr::from(u128::from(addr) >> 64 << 64);
            return Err(bad(&format!(
                "the address has host bits set (its /64 is {network}/64)"
            )));
        }
        Ok(Self(addr))
    }
}

impl fmt::Display for Prefix6 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/64", self.0)
    }
}

impl Prefix6 {
    /// The prefix's first 64 bits.
    pub fn network(&self) -> Ipv6Addr {
        self.0
    }

    /// `PREFIX::n`.
    pub fn host(&self, n: u64) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(self.0) | u128::from(n))
    }

    /// The bridge's own address, `PREFIX::1`.
    pub fn gateway(&self) -> Ipv6Addr {
        self.host(1)
    }

    /// The address a guest with `mac` gives itself by stateless
    /// autoconfiguration with a modified EUI-64 interface identifier (the
    /// Linux kernel's default), and the one lume's DHCPv6 reserves for it.
    pub fn eui64(&self, mac: MacAddress) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(self.0) | u128::from(eui64_interface_id(mac)))
    }

    /// `fe80::<EUI-64 of mac>`: the link-local address a Linux guest with
    /// `mac` takes by default.
    pub fn link_local(mac: MacAddress) -> Ipv6Addr {
        LINK_LOCAL_PREFIX.eui64(mac)
    }

    pub fn contains(&self, ip: Ipv6Addr) -> bool {
        u128::from(ip) >> 64 == u128::from(self.0) >> 64
    }

    /// A unique local /64 (RFC 4193) for this machine: `fd` and a 40-bit
    /// global ID taken from a hash of the machine ID (the same on every
    /// start, different between machines), then `subnet` as the subnet ID.
    pub fn unique_local(machine_id: &str, subnet: u16) -> Self {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(format!("lume ipv6 {}", machine_id.trim()).as_bytes());
        let mut b = [0u8; 16];
        b[0] = 0xfd;
        b[1..6].copy_from_slice(&digest[..5]);
        b[6..8].copy_from_slice(&subnet.to_be_bytes());
        Self(Ipv6Addr::from(b))
    }

    /// [`Self::unique_local`] for this machine (`/etc/machine-id`; a fixed
    /// ID where there is none).
    pub fn unique_local_here(subnet: u16) -> Self {
        let id = std::fs::read_to_string("/etc/machine-id")
            .or_else(|_| std::fs::read_to_string("/var/lib/dbus/machine-id"))
            .unwrap_or_else(|_| "no machine id".into());
        Self::unique_local(&id, subnet)
    }
}

/// `fe80::/64` as a prefix, for [`Prefix6::link_local`].
const LINK_LOCAL_PREFIX: Prefix6 = Prefix6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0));

/// A lume bridge's link-local address: fixed (the bridge makes none of its
/// own), so the bridge guard can keep every guest from claiming it; guests
/// learn it from lume's router advertisements as their router.
pub const BRIDGE_LINK_LOCAL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// The modified EUI-64 interface identifier of `mac` (RFC 4291, appendix
/// A): the low 64 bits of the addresses stateless autoconfiguration gives it.
pub fn eui64_interface_id(mac: MacAddress) -> u64 {
    let m = mac.0;
    u64::from_be_bytes([m[0] ^ 0x02, m[1], m[2], 0xff, 0xfe, m[3], m[4], m[5]])
}

/// Whether this kernel has IPv6 (not built without it, not `ipv6.disable=1`).
pub fn kernel_has_ipv6() -> bool {
    std::path::Path::new("/proc/sys/net/ipv6/conf/all").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_64_of_unicast_addresses_is_a_prefix() {
        let p: Prefix6 = "2001:db8:64::/64".parse().unwrap();
        assert_eq!(p.to_string(), "2001:db8:64::/64");
        assert_eq!(p.gateway().to_string(), "2001:db8:64::1");
        let why = |v: &str| v.parse::<Prefix6>().unwrap_err().to_string();
        assert!(
            why("fe80::/64").contains("a link-local prefix"),
            "{}",
            why("fe80::/64")
        );
        assert!(why("2001:db8:64::5/64").contains("its /64 is 2001:db8:64::/64"));
        assert!(why("2001:db8::/48").contains("only a /64 works"));
        assert!(why("ff02::/64").contains("multicast"));
        assert!(why("bogus").contains("not an IPv6 network"));
        for bad in [
            "2001:db8:64::/48",
            "2001:db8:64::5/64",
            "fe80::/64",
            "ff02::/64",
            "::/64",
            "::ffff:0:0/64",
            "2001:db8::",
            "192.0.2.0/24",
            "none",
        ] {
            assert!(bad.parse::<Prefix6>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_eui64_address_is_the_kernels() {
        let p: Prefix6 = "2001:db8:64::/64".parse().unwrap();
        let mac: MacAddress = "52:54:00:12:34:56".parse().unwrap();
        // As `ip -6 addr` shows for a Linux guest with this MAC.
        assert_eq!(p.eui64(mac).to_string(), "2001:db8:64:0:5054:ff:fe12:3456");
        assert!(p.contains(p.eui64(mac)));
        assert_eq!(
            Prefix6::link_local(mac).to_string(),
            "fe80::5054:ff:fe12:3456"
        );
        assert!(!p.contains("2001:db8:65::1".parse().unwrap()));
    }

    #[test]
    fn unique_local_prefixes_differ_by_machine_and_subnet() {
        let a = Prefix6::unique_local("0123456789abcdef", 0);
        assert_eq!(a, Prefix6::unique_local("0123456789abcdef\n", 0));
        assert_ne!(a, Prefix6::unique_local("0123456789abcdee", 0));
        let b = Prefix6::unique_local("0123456789abcdef", 1);
        assert_ne!(a, b);
        assert_eq!(a.network().segments()[0] >> 8, 0xfd);
        assert_eq!(b.network().segments()[3], 1);
        assert!(a.to_string().parse::<Prefix6>().is_ok());
    }
}
