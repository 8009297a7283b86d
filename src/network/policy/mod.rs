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
//! passes frames on with "no verdict"); in `none` a policy is met by there
//! being no network at all; `user` refuses a policy (see
//! [`PolicyError::ModeCannotEnforce`]).

pub mod bpf;
pub mod skb;
pub mod tc;
pub mod tcx;

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::NetworkMode;
use crate::vm::Door;

/// Why one rule was refused (the text of a rule alone: the CLI's parser
/// names the option, [`PolicyError::Rule`] names the list and item).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
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
    /// Several rules in one (commas or spaces): worded per door, since
    /// "give each on its own" names an option, a list or an argument.
    #[error("Invalid network rule '{0}': one rule at a time: repeat the option for each rule")]
    Several(String),
}

/// Which list of a policy a rule is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleList {
    AllowOut,
    DenyOut,
}

impl RuleList {
    /// The list's name at `door`: the CLI option, the REST body field or
    /// the MCP argument.
    pub fn name(self, door: Door) -> &'static str {
        match (self, door) {
            (RuleList::AllowOut, Door::Cli) => "--allow-out",
            (RuleList::DenyOut, Door::Cli) => "--deny-out",
            (RuleList::AllowOut, Door::Api) => "networkPolicy.allowOut",
            (RuleList::DenyOut, Door::Api) => "networkPolicy.denyOut",
            (RuleList::AllowOut, Door::Mcp) => "allow_out",
            (RuleList::DenyOut, Door::Mcp) => "deny_out",
        }
    }

    /// How the rule is written at the command line (`allow-out`, as the
    /// doctor prints rules).
    pub fn word(self) -> &'static str {
        match self {
            RuleList::AllowOut => "allow-out",
            RuleList::DenyOut => "deny-out",
        }
    }
}

/// Why a policy was refused. Its `Display` is the CLI's wording;
/// [`PolicyError::message`] words it for the REST API and MCP, which name
/// their own fields and arguments.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// Item `index` (from 0) of `list` is not a rule.
    #[error("{}", self.message(Door::Cli))]
    Rule {
        list: RuleList,
        index: usize,
        error: RuleError,
    },
    #[error("{}", self.message(Door::Cli))]
    ModeCannotEnforce(NetworkMode),
    #[error(
        "A network policy has too many rules ({0}, at most {max}): merge rules into wider CIDRs or port ranges",
        max = MAX_RULES
    )]
    TooMany(usize),
}

impl PolicyError {
    /// The message as told through `door`.
    pub fn message(&self, door: Door) -> String {
        match self {
            PolicyError::Rule { list, index, error } => {
                let name = list.name(door);
                let what = match (error, door) {
                    (RuleError::Several(rule), Door::Cli) => format!(
                        "Invalid network rule '{rule}': one rule at a time: repeat {name} for each rule"
                    ),
                    (RuleError::Several(rule), _) => format!(
                        "Invalid network rule '{rule}': one rule per item: give each rule as its own item of {name}"
                    ),
                    (e, _) => e.to_string(),
                };
                match door {
                    Door::Cli => format!("{name}: {what}"),
                    Door::Api => format!("{name}[{index}]: {what}"),
                    Door::Mcp => format!("Argument {name}[{index}]: {what}"),
                }
            }
            PolicyError::ModeCannotEnforce(mode) => {
                let (options, modes, next) = match door {
                    Door::Cli => (
                        "a policy (--allow-out, --deny-out, --isolate) works",
                        "--network nat, host, bridged or none",
                        "choose one of those modes, or leave the policy options out (for a VM that has a saved policy: lume set <name> --clear-policy, or both at once: lume set <name> --network user --clear-policy)",
                    ),
                    Door::Api => (
                        "a networkPolicy works",
                        r#""network": "nat", "host", "bridged" or "none""#,
                        r#"send one of those modes, or leave "networkPolicy" out (for a VM that has a saved policy: PATCH /lume/vms/<name> with "networkPolicy": {})"#,
                    ),
                    Door::Mcp => (
                        "a policy (allow_out, deny_out, isolate) works",
                        r#"network "nat", "host", "bridged" or "none""#,
                        "pass another network, or leave allow_out, deny_out and isolate out (no tool changes a policy saved on the VM: its owner clears it with the lume CLI's set command)",
                    ),
                };
                format!(
                    "A network policy cannot be enforced in network mode '{mode}': {options} with {modes}; {next}"
                )
            }
            e @ PolicyError::TooMany(_) => e.to_string(),
        }
    }
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
    type Err = RuleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| RuleError::Bad {
            rule: s.to_string(),
            why: why.to_string(),
        };
        let t = s;
        if t.trim().is_empty() {
            return Err(RuleError::Syntax(s.into()));
        }
        if t.trim().contains(',') || t.trim().contains(char::is_whitespace) {
            return Err(RuleError::Several(s.into()));
        }
        if t.contains(char::is_whitespace) {
            return Err(bad("no spaces in a rule"));
        }
        // Numbers as written by a person: digits only, no sign, no leading
        // zero (`080`, `+80`, `/08` are refused, not read as 80 or 8).
        let number = |x: &str| -> Option<u32> {
            (!x.is_empty()
                && x.chars().all(|c| c.is_ascii_digit())
                && (x == "0" || !x.starts_with('0')))
            .then(|| x.parse().ok())
            .flatten()
        };
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
                RuleError::Ipv6(s.into())
            });
        }
        let (cidr, ports) = match rest.split_once(':') {
            Some((c, p)) => (c, Some(p)),
            None => (rest, None),
        };
        let (addr, prefix) = match cidr.split_once('/') {
            Some((_, p)) if p.eq_ignore_ascii_case("tcp") || p.eq_ignore_ascii_case("udp") => {
                return Err(bad(
                    "the protocol goes last: CIDR:PORT/tcp (e.g. 198.51.100.2:443/tcp)",
                ));
            }
            Some((a, p)) => (
                a,
                number(p)
                    .and_then(|n| u8::try_from(n).ok())
                    .ok_or_else(|| bad("the prefix length must be a number from 0 to 32"))?,
            ),
            None => (cidr, 32),
        };
        if prefix > 32 {
            return Err(bad("the prefix length must be a number from 0 to 32"));
        }
        let addr: Ipv4Addr = addr.parse().map_err(|_| {
            if addr.contains(':') || addr.parse::<std::net::Ipv6Addr>().is_ok() {
                RuleError::Ipv6(s.into())
            } else {
                RuleError::Syntax(s.into())
            }
        })?;
        let ports = match ports {
            None => None,
            Some(p) => {
                let port = |x: &str| {
                    number(x)
                        .and_then(|n| u16::try_from(n).ok())
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

    /// Parses the REST / MCP form: each list's items in order; an item
    /// that is not a rule is named by its list and index. Duplicates are
    /// dropped ([`Policy::dedup`]).
    pub fn from_parts(
        allow: &[String],
        deny: &[String],
        isolate: bool,
    ) -> Result<Self, PolicyError> {
        let parse = |list: RuleList, items: &[String]| {
            items
                .iter()
                .enumerate()
                .map(|(index, s)| {
                    s.parse()
                        .map_err(|error| PolicyError::Rule { list, index, error })
                })
                .collect::<Result<Vec<Rule>, _>>()
        };
        let mut p = Policy {
            allow_out: parse(RuleList::AllowOut, allow)?,
            deny_out: parse(RuleList::DenyOut, deny)?,
            isolate,
        };
        p.dedup();
        Ok(p)
    }

    /// Drops every rule already given earlier in the same list (the same
    /// rule however written: `198.51.100.2:80` is `198.51.100.2/32:80`),
    /// keeping the first; returns the dropped ones, each once, for a note.
    /// A rule in both lists stays in both: the deny wins, as documented.
    pub fn dedup(&mut self) -> Vec<(RuleList, Rule)> {
        let mut dropped = Vec::new();
        for (list, rules) in [
            (RuleList::AllowOut, &mut self.allow_out),
            (RuleList::DenyOut, &mut self.deny_out),
        ] {
            let mut kept: Vec<Rule> = Vec::with_capacity(rules.len());
            for r in rules.drain(..) {
                if kept.contains(&r) {
                    if !dropped.contains(&(list, r)) {
                        dropped.push((list, r));
                    }
                } else {
                    kept.push(r);
                }
            }
            *rules = kept;
        }
        dropped
    }

    /// The policy as rules a person reads, in the CLI's words:
    /// `allow-out 198.51.100.2/32:8000/tcp`, `deny-out 10.0.0.0/8`,
    /// `isolate`.
    pub fn readable(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for (list, rules) in [
            (RuleList::AllowOut, &self.allow_out),
            (RuleList::DenyOut, &self.deny_out),
        ] {
            out.extend(rules.iter().map(|r| format!("{} {r}", list.word())));
        }
        if self.isolate {
            out.push("isolate".into());
        }
        out
    }
}

/// The note for rules [`Policy::dedup`] dropped, worded for `door`
/// (`None`: nothing was dropped).
pub fn duplicates_note(dropped: &[(RuleList, Rule)], door: Door) -> Option<String> {
    if dropped.is_empty() {
        return None;
    }
    let list: Vec<String> = dropped
        .iter()
        .map(|(l, r)| format!("{} {r}", l.name(door)))
        .collect();
    Some(format!(
        "Rule{} given more than once, kept once: {}",
        if dropped.len() == 1 { "" } else { "s" },
        list.join(", ")
    ))
}

/// Modes where a policy holds: those whose VM has its own tap (on a lume
/// bridge, a Linux bridge, or joined to a plain interface by tc
/// redirects), where the filter enforces it, and `none`, where the VM has
/// no network device at all, so nothing leaves and every policy is met.
/// `user` is not one: its traffic leaves as passt's own sockets, which no
/// per-VM filter sees.
pub fn enforceable_in(mode: &NetworkMode) -> bool {
    crate::network::driver::of(mode).enforces_policy()
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
    fn numbers_are_written_plainly_and_rules_have_no_spaces() {
        let why = |r: &str| r.parse::<Rule>().unwrap_err().to_string();
        for r in ["1.2.3.4:+80", "1.2.3.4:080", "1.2.3.4:80-090"] {
            assert!(
                why(r).contains("ports are numbers from 1 to 65535"),
                "{r}: {}",
                why(r)
            );
        }
        assert!(
            why("1.2.3.0/08").contains("prefix length"),
            "{}",
            why("1.2.3.0/08")
        );
        assert!(
            why("1.2.3.4/+8").contains("unknown protocol")
                || why("1.2.3.4/+8").contains("prefix length")
        );
        assert!(why(" 1.2.3.4").contains("no spaces"), "{}", why(" 1.2.3.4"));
        assert!(why("1.2.3.4 ").contains("no spaces"));
        assert!(
            why("1.2.3.4/tcp:80").contains("the protocol goes last"),
            "{}",
            why("1.2.3.4/tcp:80")
        );
        assert!("0.0.0.0/0:80".parse::<Rule>().is_ok());
        assert!("10.0.0.0/8:1-65535/udp".parse::<Rule>().is_ok());
    }

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
            Err(RuleError::Ipv6(_))
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
        // No network at all: nothing leaves, so the policy holds.
        assert!(p.check(&NetworkMode::None).is_ok());
        let e = p.check(&NetworkMode::User).unwrap_err();
        assert!(matches!(e, PolicyError::ModeCannotEnforce(_)));
        assert!(e.to_string().contains("--network nat"));
        assert!(Policy::default().check(&NetworkMode::User).is_ok());
    }

    /// Each door names its own fields: the REST body's path with the item's
    /// index, MCP's argument, the CLI's option; never another door's.
    #[test]
    fn errors_name_each_doors_own_fields() {
        let e = Policy::from_parts(
            &[
                "198.51.100.2:8000/tcp".into(),
                "10.0.0.0/8".into(),
                "198.51.100.1:80,198.51.100.2".into(),
            ],
            &[],
            false,
        )
        .unwrap_err();
        assert!(matches!(
            e,
            PolicyError::Rule {
                list: RuleList::AllowOut,
                index: 2,
                error: RuleError::Several(_)
            }
        ));
        let api = e.message(Door::Api);
        assert!(
            api.starts_with(
                "networkPolicy.allowOut[2]: Invalid network rule '198.51.100.1:80,198.51.100.2'"
            ) && api.contains("own item of networkPolicy.allowOut"),
            "{api}"
        );
        let mcp = e.message(Door::Mcp);
        assert!(
            mcp.starts_with("Argument allow_out[2]: ") && mcp.contains("own item of allow_out"),
            "{mcp}"
        );
        assert!(e.to_string().contains("repeat --allow-out"), "{e}");
        let e = Policy::from_parts(&[], &["10.0.0.1/8".into()], false).unwrap_err();
        assert!(
            e.message(Door::Api)
                .starts_with("networkPolicy.denyOut[0]: Invalid network rule '10.0.0.1/8'"),
            "{}",
            e.message(Door::Api)
        );
        assert!(e.message(Door::Mcp).starts_with("Argument deny_out[0]: "));
        let e = PolicyError::ModeCannotEnforce(NetworkMode::User);
        for door in [Door::Api, Door::Mcp] {
            let m = e.message(door);
            assert!(!m.contains("--"), "{door:?} names a CLI flag: {m}");
            assert!(m.starts_with("A network policy cannot be enforced in network mode 'user'"));
        }
        assert!(e.message(Door::Api).contains(r#""network": "nat""#));
        assert!(
            e.message(Door::Mcp)
                .contains("allow_out, deny_out, isolate")
        );
        assert!(e.to_string().contains("--allow-out"));
    }

    #[test]
    fn duplicate_rules_are_kept_once_and_reported_once() {
        let mut p = Policy::from_parts(&[], &[], false).unwrap();
        p.allow_out = [
            "198.51.100.2:8000/tcp",
            "10.0.0.0/8",
            "198.51.100.2/32:8000/TCP",
            "198.51.100.2:8000/tcp",
        ]
        .iter()
        .map(|r| r.parse().unwrap())
        .collect();
        p.deny_out = vec!["10.0.0.0/8".parse().unwrap()];
        let dropped = p.dedup();
        assert_eq!(
            p.allow_out,
            vec![
                "198.51.100.2:8000/tcp".parse::<Rule>().unwrap(),
                "10.0.0.0/8".parse().unwrap()
            ]
        );
        // The same rule in the other list is no duplicate: the deny wins.
        assert_eq!(p.deny_out.len(), 1);
        assert_eq!(dropped.len(), 1);
        assert_eq!(
            duplicates_note(&dropped, Door::Cli).unwrap(),
            "Rule given more than once, kept once: --allow-out 198.51.100.2/32:8000/tcp"
        );
        assert!(duplicates_note(&[], Door::Cli).is_none());
        // The REST / MCP form is stored deduplicated.
        let p = Policy::from_parts(
            &["198.51.100.2:80".into(), "198.51.100.2/32:80".into()],
            &["203.0.113.0/24".into(), "203.0.113.0/24".into()],
            false,
        )
        .unwrap();
        assert_eq!((p.allow_out.len(), p.deny_out.len()), (1, 1));
    }

    #[test]
    fn readable_rules_are_the_cli_s_words() {
        let p = Policy::from_parts(
            &["198.51.100.2:8000/tcp".into()],
            &["10.0.0.0/8".into()],
            true,
        )
        .unwrap();
        assert_eq!(
            p.readable(),
            [
                "allow-out 198.51.100.2/32:8000/tcp",
                "deny-out 10.0.0.0/8",
                "isolate"
            ]
        );
    }
}
