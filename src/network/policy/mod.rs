//! Per-VM network policy for sandboxes: egress allow/deny rules and
//! isolation from the host, the LAN and other VMs.
//!
//! The policy is compiled into one small eBPF program ([`bpf`]) attached as
//! a direct-action `cls_bpf` filter to the ingress qdisc of the VM's tap
//! ([`tc`]): every frame the guest sends passes through it before the host's
//! bridge, routing or nftables see it. tc is not touched by `nft flush
//! ruleset` or by a VPN rewriting the firewall, so the policy does not
//! depend on nftables at all: it cannot "disappear" with the firewall, and
//! there is no window in which a denied packet passes. If the program cannot
//! be loaded or attached the VM does not start. While the VM runs, a guard
//! ([`tc::Guard`]) puts the filter back if someone deletes it with tc, and
//! recompiles it when the host's addresses change (`--isolate`).
//!
//! Enforced in `nat`, `host` and `bridged` (in bridged mode on a plain
//! interface the filter comes before the tap's redirect to the macvlan and
//! passes frames on with "no verdict"); `user` and `none` refuse a policy
//! (see [`PolicyError::ModeCannotEnforce`]).

pub mod bpf;
pub mod skb;
pub mod tc;

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::NetworkMode;

/// Why a rule or a policy was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error(
        "Invalid network rule '{0}': write CIDR[:PORT|:LOW-HIGH][/tcp|/udp], e.g. 198.51.100.2/32:8000/tcp or 10.0.0.0/8"
    )]
    Syntax(String),
    #[error(
        "Invalid network rule '{0}': IPv6 rules are not supported; under a policy the guest's IPv6 is dropped entirely, so use IPv4 destinations"
    )]
    Ipv6(String),
    #[error("Invalid network rule '{rule}': {why}; fix the rule and try again")]
    Bad { rule: String, why: String },
    #[error(
        "A network policy cannot be enforced in network mode '{0}': policies (--allow-out, --deny-out, --isolate) work with --network nat, host and bridged; change the mode or clear the policy (lume set NAME --clear-policy)"
    )]
    ModeCannotEnforce(NetworkMode),
    #[error(
        "A network policy has too many rules ({0}, at most {max}): merge rules into wider CIDRs or port ranges",
        max = MAX_RULES
    )]
    TooMany(usize),
}

/// At most this many allow + deny rules (keeps the program well inside the
/// verifier's limits and the per-packet cost small).
pub const MAX_RULES: usize = 512;

/// A transport protocol a rule may be limited to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
        }
    }
}

/// An IPv4 network, `addr/prefix`, with the host bits zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr {
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Self {
        let c = Self { addr, prefix };
        Self {
            addr: Ipv4Addr::from(u32::from(addr) & c.mask()),
            prefix,
        }
    }

    pub fn mask(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        }
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// One `--allow-out` / `--deny-out` rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub net: Cidr,
    /// Destination ports, inclusive; `None`: every port (and every protocol
    /// unless `proto` says otherwise).
    pub ports: Option<(u16, u16)>,
    /// `None` with ports: TCP and UDP; `None` without ports: any protocol.
    pub proto: Option<Proto>,
}

impl FromStr for Rule {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| PolicyError::Bad {
            rule: s.to_string(),
            why: why.to_string(),
        };
        let t = s.trim();
        if t.is_empty() {
            return Err(PolicyError::Syntax(s.into()));
        }
        if t.contains(',') || t.contains(char::is_whitespace) {
            return Err(bad(
                "one rule at a time: repeat the option (or give one list item) for each rule",
            ));
        }
        // The protocol: the text after the last '/', unless that is the
        // prefix length (a number) or holds the port (`/8:80`).
        let (rest, proto) = match t.rsplit_once('/') {
            Some((r, p)) if p.eq_ignore_ascii_case("tcp") => (r, Some(Proto::Tcp)),
            Some((r, p)) if p.eq_ignore_ascii_case("udp") => (r, Some(Proto::Udp)),
            Some((_, p))
                if !p.is_empty()
                    && !p.contains(':')
                    && !p.contains('.')
                    && !p.chars().all(|c| c.is_ascii_digit()) =>
            {
                return Err(bad(&format!("unknown protocol '{p}': only /tcp or /udp")));
            }
            _ => (t, None),
        };
        if proto.is_some() && {
            let r = rest.to_ascii_lowercase();
            r.ends_with("/tcp") || r.ends_with("/udp")
        } {
            return Err(bad(
                "one protocol per rule: give the rule once with /tcp and once with /udp",
            ));
        }
        if rest.matches(':').count() > 1 || rest.starts_with('[') {
            let head = rest.split(':').next().unwrap_or_default();
            let v4 = head
                .split('/')
                .next()
                .unwrap_or_default()
                .parse::<Ipv4Addr>()
                .is_ok();
            return Err(if v4 {
                bad("write a port range as LOW-HIGH (e.g. :8000-8080)")
            } else {
                PolicyError::Ipv6(s.into())
            });
        }
        let (cidr, ports) = match rest.split_once(':') {
            Some((c, p)) => (c, Some(p)),
            None => (rest, None),
        };
        let (addr, prefix) = match cidr.split_once('/') {
            Some((a, p)) => (
                a,
                p.parse::<u8>()
                    .map_err(|_| bad("the prefix length must be a number from 0 to 32"))?,
            ),
            None => (cidr, 32),
        };
        if prefix > 32 {
            return Err(bad("the prefix length must be a number from 0 to 32"));
        }
        let addr: Ipv4Addr = addr.parse().map_err(|_| {
            if addr.contains(':') || addr.parse::<std::net::Ipv6Addr>().is_ok() {
                PolicyError::Ipv6(s.into())
            } else {
                PolicyError::Syntax(s.into())
            }
        })?;
        let ports = match ports {
            None => None,
            Some(p) => {
                let port = |x: &str| {
                    x.parse::<u16>()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| bad("ports are numbers from 1 to 65535"))
                };
                let (lo, hi) = match p.split_once('-') {
                    Some((a, b)) => (port(a)?, port(b)?),
                    None => {
                        let n = port(p)?;
                        (n, n)
                    }
                };
                if lo > hi {
                    return Err(bad("a port range must go from low to high"));
                }
                Some((lo, hi))
            }
        };
        let net = Cidr::new(addr, prefix);
        if net.addr != addr {
            return Err(bad(&format!(
                "the address has bits set beyond the prefix: the network is {net}"
            )));
        }
        Ok(Rule { net, ports, proto })
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.net)?;
        if let Some((lo, hi)) = self.ports {
            if lo == hi {
                write!(f, ":{lo}")?;
            } else {
                write!(f, ":{lo}-{hi}")?;
            }
        }
        match self.proto {
            Some(Proto::Tcp) => write!(f, "/tcp"),
            Some(Proto::Udp) => write!(f, "/udp"),
            None => Ok(()),
        }
    }
}

impl Serialize for Rule {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Rule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A VM's network policy (config.json `networkPolicy`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Policy {
    /// Once any is given, everything else outbound is denied (except DHCP
    /// and DNS to lume's own dnsmasq).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_out: Vec<Rule>,
    /// Denied destinations; checked before the allow rules.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_out: Vec<Rule>,
    /// Nothing to the host, the LAN's private ranges or other VMs.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub isolate: bool,
}

impl Policy {
    /// No rule and no isolation: nothing to enforce.
    pub fn is_empty(&self) -> bool {
        self.allow_out.is_empty() && self.deny_out.is_empty() && !self.isolate
    }

    /// Checks the policy can be enforced in `mode` and is not too large.
    pub fn check(&self, mode: &NetworkMode) -> Result<(), PolicyError> {
        if self.is_empty() {
            return Ok(());
        }
        let n = self.allow_out.len() + self.deny_out.len();
        if n > MAX_RULES {
            return Err(PolicyError::TooMany(n));
        }
        if !enforceable_in(mode) {
            return Err(PolicyError::ModeCannotEnforce(mode.clone()));
        }
        Ok(())
    }

    /// Parses the command-line / API form.
    pub fn from_parts(
        allow: &[String],
        deny: &[String],
        isolate: bool,
    ) -> Result<Self, PolicyError> {
        Ok(Policy {
            allow_out: allow.iter().map(|s| s.parse()).collect::<Result<_, _>>()?,
            deny_out: deny.iter().map(|s| s.parse()).collect::<Result<_, _>>()?,
            isolate,
        })
    }
}

/// Modes whose VM has its own tap (on a lume bridge, a Linux bridge, or
/// joined to a plain interface by tc redirects), where the policy is
/// enforced.
pub fn enforceable_in(mode: &NetworkMode) -> bool {
    matches!(
        mode,
        NetworkMode::Nat | NetworkMode::Host | NetworkMode::Bridged(_)
    )
}

/// Private, special and local ranges `--isolate` keeps the guest from
/// (besides the host's own addresses and connected networks, found at
/// start): RFC 1918, loopback, "this network", link-local, CGNAT, benchmark,
/// multicast, reserved and limited broadcast.
pub const ISOLATED_RANGES: &[(Ipv4Addr, u8)] = &[
    (Ipv4Addr::new(0, 0, 0, 0), 8),
    (Ipv4Addr::new(10, 0, 0, 0), 8),
    (Ipv4Addr::new(100, 64, 0, 0), 10),
    (Ipv4Addr::new(127, 0, 0, 0), 8),
    (Ipv4Addr::new(169, 254, 0, 0), 16),
    (Ipv4Addr::new(172, 16, 0, 0), 12),
    (Ipv4Addr::new(192, 168, 0, 0), 16),
    (Ipv4Addr::new(198, 18, 0, 0), 15),
    (Ipv4Addr::new(224, 0, 0, 0), 3),
];

#[cfg(test)]
mod tests {

    #[test]
    fn malformed_rules_are_named_for_what_is_wrong() {
        let why = |r: &str| r.parse::<Rule>().unwrap_err().to_string();
        assert!(
            why("10.0.0.0/8:80/icmp").contains("unknown protocol 'icmp'"),
            "{}",
            why("10.0.0.0/8:80/icmp")
        );
        assert!(why("198.51.100.1:80/tcp/udp").contains("one protocol per rule"));
        assert!(why("10.0.0.0/8:80:90").contains("LOW-HIGH"));
        assert!(why("198.51.100.1:8000/tcp,198.51.100.2").contains("one rule at a time"));
        assert!(why("2001:db8::/32").contains("IPv6"));
        let r: Rule = "198.51.100.10:443/TCP".parse().unwrap();
        assert_eq!(r, "198.51.100.10:443/tcp".parse::<Rule>().unwrap());
        assert!("10.0.0.0/8:80".parse::<Rule>().is_ok());
        assert!("10.0.0.0/8".parse::<Rule>().is_ok());
    }
    use super::*;

    #[test]
    fn parses_the_documented_forms() {
        let r: Rule = "198.51.100.2/32:8000/tcp".parse().unwrap();
        assert_eq!(r.net, Cidr::new(Ipv4Addr::new(198, 51, 100, 2), 32));
        assert_eq!(r.ports, Some((8000, 8000)));
        assert_eq!(r.proto, Some(Proto::Tcp));
        let r: Rule = "10.0.0.0/8".parse().unwrap();
        assert_eq!((r.ports, r.proto), (None, None));
        let r: Rule = "203.0.113.7:1000-2000/udp".parse().unwrap();
        assert_eq!(r.net.prefix, 32);
        assert_eq!(r.ports, Some((1000, 2000)));
        let r: Rule = "0.0.0.0/0:443".parse().unwrap();
        assert_eq!((r.ports, r.proto), (Some((443, 443)), None));
        for s in [
            "198.51.100.2/32:8000/tcp",
            "10.0.0.0/8",
            "203.0.113.7/32:1000-2000/udp",
        ] {
            assert_eq!(s.parse::<Rule>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn refuses_bad_rules_with_a_reason() {
        for s in [
            "",
            "nonsense",
            "10.0.0.0/33",
            "10.0.0.0/8:0",
            "10.0.0.0/8:70000",
            "10.0.0.0/8:20-10",
            "10.0.0.1/8",
            "10.0.0.0/8/sctp",
        ] {
            assert!(s.parse::<Rule>().is_err(), "{s} was accepted");
        }
        assert!(matches!(
            "2001:db8::/32".parse::<Rule>(),
            Err(PolicyError::Ipv6(_))
        ));
        let e = "10.0.0.1/8".parse::<Rule>().unwrap_err().to_string();
        assert!(e.contains("10.0.0.0/8"), "{e}");
    }

    #[test]
    fn policy_round_trips_through_json_and_old_configs_have_none() {
        let p = Policy::from_parts(&["198.51.100.2:8000/tcp".into()], &[], true).unwrap();
        let j = serde_json::to_string(&p).unwrap();
        assert_eq!(
            j,
            r#"{"allowOut":["198.51.100.2/32:8000/tcp"],"isolate":true}"#
        );
        assert_eq!(serde_json::from_str::<Policy>(&j).unwrap(), p);
        assert!(serde_json::from_str::<Policy>("{}").unwrap().is_empty());
        assert!(serde_json::from_str::<Policy>(r#"{"allowOut":["::1/128"]}"#).is_err());
    }

    #[test]
    fn modes_that_cannot_enforce_refuse() {
        let p = Policy {
            isolate: true,
            ..Default::default()
        };
        assert!(p.check(&NetworkMode::Nat).is_ok());
        assert!(p.check(&NetworkMode::Host).is_ok());
        assert!(p.check(&NetworkMode::Bridged(None)).is_ok());
        for m in [NetworkMode::User, NetworkMode::None] {
            let e = p.check(&m).unwrap_err();
            assert!(matches!(e, PolicyError::ModeCannotEnforce(_)));
            assert!(e.to_string().contains("--network nat"));
        }
        assert!(Policy::default().check(&NetworkMode::User).is_ok());
    }
}
