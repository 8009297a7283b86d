//! Accommodation of other tools' firewalls. An accept in lume's own table
//! does not stop another base chain at the same hook from dropping: every
//! base chain must accept. Docker (`FORWARD` policy drop in iptables-nft's
//! `ip filter`), ufw (`FORWARD` and `INPUT` policy drop) and firewalld (a
//! final reject in `inet firewalld`'s `filter_FORWARD` and `filter_INPUT`)
//! each have a place meant for other software's accepts; lume puts narrow
//! accepts for its own bridges there, each carrying a comment that starts
//! with [`COMMENT_PREFIX`], so it finds and removes exactly its own.
//!
//! They go below the rules already there (the admin's `DOCKER-USER` rules,
//! `ufw allow/deny` rules, firewalld's zones), so an admin's deny keeps
//! winning ([`Place`]). An accept ends the packet's way through its base
//! chain: every rule after it is skipped. So lume follows each base chain
//! rule by rule, through jumps ([`Walk`]), and keeps its accepts out of a
//! chain when a drop that is no tool's own policy comes after them (an
//! iptables kill switch appended to `FORWARD`, a `ufw route deny` behind
//! Docker's `DOCKER-USER`): lume never accepts what such a rule would drop.
//!
//! The rules stay readable by iptables-nft (Docker and ufw run `iptables`
//! against those tables, and iptables 1.8.9 calls a table holding native
//! `ct` expressions or anonymous sets incompatible and stops working on it).
//! So the conntrack conditions (replies, DNAT'd published ports) are decided
//! in lume's own table, which sets [`MARK`] on those packets at a priority
//! before every filter chain, and the rule in the other tool's chain matches
//! the bridge and the mark — both understood by iptables-nft.
//!
//! Chains of tables lume does not know (a VPN kill switch) are never touched.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{Ipv4Addr, Ipv6Addr};

use serde_json::Value;

/// Every rule lume puts in another tool's chain has a comment starting so.
pub const COMMENT_PREFIX: &str = "lume: ";

/// The packet mark bit lume's own table sets on replies and DNAT'd traffic
/// into its NAT bridge (outside the bits kube-proxy, Tailscale and wg-quick use).
pub const MARK: u32 = 0x0100_0000;

/// How deep lume follows jumps from a base chain (iptables allows no loops;
/// this only bounds a pathological ruleset).
const MAX_DEPTH: usize = 16;

/// The hook a chain of another tool filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Hook {
    Forward,
    Input,
}

impl Hook {
    fn name(self) -> &'static str {
        match self {
            Hook::Forward => "forward",
            Hook::Input => "input",
        }
    }
}

/// Where in a tool's chain lume's rules go: below every rule already there,
/// so that the admin's own rules in that chain (which are exactly what the
/// chain is for) are evaluated first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// Before the chain's final `RETURN` when it ends with one (Docker up
    /// to 27 puts `-A DOCKER-USER -j RETURN` there), else at its end.
    BeforeFinalReturn,
    /// At the end (ufw's user chains: `ufw allow/deny` rules come first).
    End,
    /// Before the chain's final unconditional reject (firewalld's, after
    /// its zones and policies), else at its end.
    BeforeFinalReject,
}

/// A chain another tool provides for other software's accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub tool: &'static str,
    pub family: &'static str,
    pub table: &'static str,
    pub chain: &'static str,
    pub hook: Hook,
    pub place: Place,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}'s chain {} {} {}",
            self.tool, self.family, self.table, self.chain
        )
    }
}

/// Where lume puts its accepts, when the chain exists: Docker's DOCKER-USER
/// (the chain Docker leaves to the user, jumped to first from FORWARD), ufw's
/// user chains (where `ufw route allow` and `ufw allow` rules go; reached
/// from ufw-before-forward / ufw-before-input after ufw's own conntrack
/// accepts), and firewalld's filter base chains before their final reject.
pub const TARGETS: &[Target] = &[
    Target {
        tool: "Docker",
        family: "ip",
        table: "filter",
        chain: "DOCKER-USER",
        hook: Hook::Forward,
        place: Place::BeforeFinalReturn,
    },
    Target {
        tool: "Docker",
        family: "ip6",
        table: "filter",
        chain: "DOCKER-USER",
        hook: Hook::Forward,
        place: Place::BeforeFinalReturn,
    },
    Target {
        tool: "ufw",
        family: "ip",
        table: "filter",
        chain: "ufw-user-forward",
        hook: Hook::Forward,
        place: Place::End,
    },
    Target {
        tool: "ufw",
        family: "ip6",
        table: "filter",
        chain: "ufw6-user-forward",
        hook: Hook::Forward,
        place: Place::End,
    },
    Target {
        tool: "ufw",
        family: "ip",
        table: "filter",
        chain: "ufw-user-input",
        hook: Hook::Input,
        place: Place::End,
    },
    Target {
        tool: "ufw",
        family: "ip6",
        table: "filter",
        chain: "ufw6-user-input",
        hook: Hook::Input,
        place: Place::End,
    },
    Target {
        tool: "firewalld",
        family: "inet",
        table: "firewalld",
        chain: "filter_FORWARD",
        hook: Hook::Forward,
        place: Place::BeforeFinalReject,
    },
    Target {
        tool: "firewalld",
        family: "inet",
        table: "firewalld",
        chain: "filter_INPUT",
        hook: Hook::Input,
        place: Place::BeforeFinalReject,
    },
];

/// The tool whose own chain this is (its rules are that tool's policy, not
/// the admin's): Docker's `DOCKER*` chains but `DOCKER-USER`, ufw's `ufw-*`
/// chains but its user chains, everything in firewalld's table.
fn tool_of(family: &str, table: &str, chain: &str) -> Option<&'static str> {
    match (family, table) {
        ("ip" | "ip6", "filter") => {
            if chain.starts_with("DOCKER") && chain != "DOCKER-USER" {
                Some("Docker")
            } else if chain.starts_with("LIBVIRT_") {
                // libvirt up to 9 with its iptables backend: its chains
                // guard its own networks (virbr0) as Docker's guard Docker's.
                Some("libvirt")
            } else if (chain.starts_with("ufw-") || chain.starts_with("ufw6-"))
                && !chain.starts_with("ufw-user-")
                && !chain.starts_with("ufw6-user-")
            {
                Some("ufw")
            } else {
                None
            }
        }
        ("inet", "firewalld") => Some("firewalld"),
        _ => None,
    }
}

/// A lume bridge whose traffic other tools' chains must let through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opening {
    pub bridge: String,
    /// NAT (forwarded out, replies and published ports in, DHCP and DNS to
    /// the host) or host-only (DHCP to the host only).
    pub nat: bool,
    /// The bridge's own address, where lume's dnsmasq answers
    /// (unspecified for a bridged opening: lume serves nothing there).
    pub gateway: Ipv4Addr,
    /// The bridge's own IPv6 address, where lume's dnsmasq answers DHCPv6
    /// and DNS, when its network has IPv6.
    pub gateway6: Option<Ipv6Addr>,
    /// A Linux bridge of the user's that a running VM is bridged onto
    /// (`--network bridged:br0`, a tap in it): with br_netfilter, frames
    /// between its ports cross the forward hook with the bridge as input
    /// and output interface, so lume accepts exactly that (`iifname br0
    /// oifname br0`), nothing routed in or out of it.
    pub bridged: bool,
}

impl Opening {
    /// The opening for VMs bridged onto the Linux bridge `bridge`.
    pub fn bridged(bridge: &str) -> Self {
        Self {
            bridge: bridge.to_string(),
            nat: false,
            gateway: Ipv4Addr::UNSPECIFIED,
            gateway6: None,
            bridged: true,
        }
    }
}

/// One rule for another tool's chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub comment: String,
    pub body: String,
}

/// The rules lume wants in `target`, in order, for `openings`; `docker`:
/// the bridges Docker's or libvirt's own chains name in that table, with
/// the tool's name ([`Ruleset::guarded_bridges`]).
pub fn rules_for(target: &Target, openings: &[Opening], docker: &[(String, &str)]) -> Vec<Rule> {
    let mut out = Vec::new();
    let mut add = |bridge: &str, what: &str, body: String| {
        out.push(Rule {
            comment: format!("{COMMENT_PREFIX}{bridge} {what}"),
            body,
        })
    };
    let lume: Vec<&str> = openings.iter().map(|o| o.bridge.as_str()).collect();
    for o in openings {
        let b = &o.bridge;
        let g = o.gateway;
        match target.hook {
            // A bridge Docker's or libvirt's own chains guard (a VM bridged
            // onto docker0) stays theirs: an accept there would override
            // their isolation between containers (`--icc=false`).
            Hook::Forward if o.bridged => {
                if !docker.iter().any(|(d, _)| d == b) {
                    add(
                        b,
                        "bridged",
                        format!("iifname \"{b}\" oifname \"{b}\" accept"),
                    );
                }
            }
            Hook::Input if o.bridged => {}
            Hook::Forward if o.nat => {
                // Containers are Docker's to guard: a guest's new
                // connections to them go on through Docker's own chains
                // (published ports only), as a LAN neighbour's would. In
                // ufw's chains too: they share FORWARD with Docker's jumps,
                // and Docker up to 27 returns a connection to an unpublished
                // port from its chains to FORWARD, where ufw's routed policy
                // would drop it but lume's egress accept would not. `docker`
                // is empty in tables Docker has no chains in (firewalld's).
                // One rule per bridge (iptables-nft reads no sets).
                // libvirt's networks (virbr0, with its iptables backend)
                // likewise stay libvirt's: its chains reject new connections
                // into them.
                for (d, tool) in docker.iter().filter(|(d, _)| !lume.contains(&d.as_str())) {
                    add(
                        b,
                        &format!("to {d} as {tool} decides"),
                        format!("iifname \"{b}\" oifname \"{d}\" return"),
                    );
                }
                add(b, "egress", format!("iifname \"{b}\" accept"));
                add(
                    b,
                    "replies and published ports",
                    format!("oifname \"{b}\" meta mark and {MARK:#010x} == {MARK:#010x} accept"),
                );
            }
            Hook::Forward => {}
            Hook::Input => {
                // Only lume's dnsmasq on the bridge's own address: no other
                // address or service of the host is opened to the guests.
                // Each family in its own tables; both in an inet table.
                if target.family != "ip6" {
                    add(
                        b,
                        "dhcp",
                        format!("iifname \"{b}\" ip daddr {g} udp dport 67 accept"),
                    );
                    add(
                        b,
                        "dhcp broadcast",
                        format!("iifname \"{b}\" ip daddr 255.255.255.255 udp dport 67 accept"),
                    );
                    if o.nat {
                        add(
                            b,
                            "dns",
                            format!("iifname \"{b}\" ip daddr {g} udp dport 53 accept"),
                        );
                        add(
                            b,
                            "dns over tcp",
                            format!("iifname \"{b}\" ip daddr {g} tcp dport 53 accept"),
                        );
                    }
                }
                if let (true, Some(g6)) = (target.family != "ip", o.gateway6) {
                    // DHCPv6 clients send to the servers' multicast group;
                    // a guest asks for the advertisement that gives it its
                    // address, and finds the bridge's link-layer address.
                    add(
                        b,
                        "dhcpv6",
                        format!("iifname \"{b}\" ip6 daddr ff02::1:2 udp dport 547 accept"),
                    );
                    for (what, ty) in [
                        ("router solicitation", "nd-router-solicit"),
                        ("neighbour solicitation", "nd-neighbor-solicit"),
                        ("neighbour advertisement", "nd-neighbor-advert"),
                    ] {
                        add(b, what, format!("iifname \"{b}\" icmpv6 type {ty} accept"));
                    }
                    if o.nat {
                        add(
                            b,
                            "dns6",
                            format!("iifname \"{b}\" ip6 daddr {g6} udp dport 53 accept"),
                        );
                        add(
                            b,
                            "dns6 over tcp",
                            format!("iifname \"{b}\" ip6 daddr {g6} tcp dport 53 accept"),
                        );
                    }
                }
            }
        }
    }
    out
}

/// What each of lume's rules is for, the end of its comment (besides
/// `to <docker bridge> as docker decides`). "to container networks as
/// docker decides" was written by earlier versions: still lume's to remove.
const PURPOSES: [&str; 15] = [
    "dhcpv6",
    "router solicitation",
    "neighbour solicitation",
    "neighbour advertisement",
    "dns6",
    "dns6 over tcp",
    "bridged",
    "to container networks as docker decides",
    "egress",
    "replies and published ports",
    "dhcp",
    "dhcp broadcast",
    "dns",
    "dns over tcp",
    "to docker0 as docker decides",
];

/// Whether a comment is exactly one lume writes (`lume: lume0 egress`): a
/// rule someone else commented `lume: …` is not lume's to remove.
pub fn is_lume_comment(comment: &str) -> bool {
    use crate::network::mode::valid_ifname;
    comment
        .strip_prefix(COMMENT_PREFIX)
        .and_then(|rest| rest.split_once(' '))
        .is_some_and(|(bridge, what)| {
            valid_ifname(bridge)
                && (PURPOSES.contains(&what)
                    || what
                        .strip_prefix("to ")
                        .and_then(|w| {
                            w.strip_suffix(" as docker decides")
                                .or_else(|| w.strip_suffix(" as libvirt decides"))
                        })
                        .is_some_and(valid_ifname))
        })
}

/// The bridge a comment of lume's names.
fn lume_bridge(comment: Option<&str>) -> Option<&str> {
    comment
        .filter(|c| is_lume_comment(c))
        .and_then(|c| c.strip_prefix(COMMENT_PREFIX))
        .and_then(|c| c.split(' ').next())
}

/// An interface match of a rule: `iifname "lume0"`, `oifname != "docker0"`,
/// `iifname { "a", "b" }`; names may end in `*` (iptables' `+`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct IfMatch {
    out: bool,
    eq: bool,
    names: Vec<String>,
}

/// What a rule does when it matches.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    Accept,
    /// Drop or reject.
    Drop,
    Return,
    Jump(String),
    Goto(String),
    /// No verdict (a counter, a log, a mark): the next rule follows.
    Continue,
}

/// A rule of the ruleset as lume reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RuleInfo {
    handle: u64,
    comment: Option<String>,
    ifs: Vec<IfMatch>,
    /// Whether it matches on anything else (addresses, ports, conntrack, an
    /// xt match): it may then match some of a bridge's traffic, never surely all.
    other: bool,
    /// Whether it matches only `ct state invalid` (never lume's traffic).
    invalid_only: bool,
    verdict: Verdict,
    /// As `nft list` shows it, when known.
    text: Option<String>,
}

impl RuleInfo {
    fn is_lume(&self) -> bool {
        self.comment.as_deref().is_some_and(is_lume_comment)
    }

    fn unconditional(&self) -> bool {
        self.ifs.is_empty() && !self.other
    }

    fn possible(&self, case: &Case) -> bool {
        !self.invalid_only && self.ifs.iter().all(|m| m.possible(case))
    }

    fn certain(&self, case: &Case) -> bool {
        !self.other && self.ifs.iter().all(|m| m.certain(case))
    }

    /// Whether it names the case's bridge (`iifname "lume0"` for its egress).
    fn names_bridge(&self, case: &Case) -> bool {
        self.ifs.iter().any(|m| {
            let v = if m.out { &case.oif } else { &case.iif };
            m.eq && matches!(v, Iface::Is(x) if m.names.iter().any(|n| glob(n, x)))
        })
    }

    fn describe(&self) -> String {
        match &self.text {
            Some(t) => format!("`{t}` (handle {})", self.handle),
            None => format!("handle {}", self.handle),
        }
    }
}

/// Whether an interface pattern (`br-*` or a plain name) matches `name`.
fn glob(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

/// One interface of a packet of lume's, as far as lume knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Iface {
    Is(String),
    /// Some interface other than these.
    Not(Vec<String>),
    /// None (the output interface at the input hook).
    Empty,
}

/// A kind of traffic of one lume bridge at one hook.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Case {
    bridge: String,
    iif: Iface,
    oif: Iface,
}

impl IfMatch {
    fn value<'a>(&self, case: &'a Case) -> &'a Iface {
        if self.out { &case.oif } else { &case.iif }
    }

    /// Whether it can hold for some packet of the case.
    fn possible(&self, case: &Case) -> bool {
        match self.value(case) {
            Iface::Is(x) => self.names.iter().any(|n| glob(n, x)) == self.eq,
            Iface::Not(ex) => {
                !self.eq
                    || self
                        .names
                        .iter()
                        .any(|n| n.ends_with('*') || !ex.contains(n))
            }
            Iface::Empty => !self.eq || self.names.iter().any(String::is_empty),
        }
    }

    /// Whether it holds for every packet of the case.
    fn certain(&self, case: &Case) -> bool {
        match self.value(case) {
            Iface::Is(x) => self.names.iter().any(|n| glob(n, x)) == self.eq,
            Iface::Not(ex) => !self.eq && self.names.iter().all(|n| ex.contains(n)),
            Iface::Empty => !self.eq && self.names.iter().all(|n| !n.is_empty()),
        }
    }
}

/// The kinds of traffic of `bridges` at `hook`: at forward, a NAT bridge's
/// egress (to anything but lume's bridges and Docker's, which lume's
/// accepts send back to Docker's chains) and what comes into it; at input,
/// what a bridge sends to the host.
fn cases(hook: Hook, bridges: &[&str], docker: &[String]) -> Vec<Case> {
    let lume: Vec<String> = bridges.iter().map(|b| b.to_string()).collect();
    let mut out = Vec::new();
    for b in bridges {
        match hook {
            Hook::Forward => {
                let mut elsewhere = lume.clone();
                elsewhere.extend(docker.iter().cloned());
                out.push(Case {
                    bridge: b.to_string(),
                    iif: Iface::Is(b.to_string()),
                    oif: Iface::Not(elsewhere),
                });
                out.push(Case {
                    bridge: b.to_string(),
                    iif: Iface::Not(lume.clone()),
                    oif: Iface::Is(b.to_string()),
                });
            }
            Hook::Input => out.push(Case {
                bridge: b.to_string(),
                iif: Iface::Is(b.to_string()),
                oif: Iface::Empty,
            }),
        }
    }
    out
}

/// The traffic of Linux bridges VMs are bridged onto, as br_netfilter
/// shows it at the forward hook: in and out through the bridge itself.
fn bridged_cases(openings: &[Opening]) -> Vec<Case> {
    openings
        .iter()
        .filter(|o| o.bridged)
        .map(|o| Case {
            bridge: o.bridge.clone(),
            iif: Iface::Is(o.bridge.clone()),
            oif: Iface::Is(o.bridge.clone()),
        })
        .collect()
}

/// iptables targets that never end a packet's way through the chain.
const NON_TERMINAL_TARGETS: &[&str] = &[
    "LOG",
    "NFLOG",
    "ULOG",
    "MARK",
    "CONNMARK",
    "CONNSECMARK",
    "SECMARK",
    "TCPMSS",
    "CLASSIFY",
    "DSCP",
    "TOS",
    "TTL",
    "HL",
    "CHECKSUM",
    "SET",
    "AUDIT",
    "CT",
    "TRACE",
    "TEE",
    "IDLETIMER",
    "LED",
    "HMARK",
];

fn parse_rule(r: &Value) -> RuleInfo {
    let comment = r["comment"].as_str().map(str::to_string);
    let exprs = r["expr"].as_array().cloned().unwrap_or_default();
    let mut info = RuleInfo {
        handle: r["handle"].as_u64().unwrap_or(0),
        comment,
        ifs: Vec::new(),
        other: false,
        invalid_only: false,
        verdict: Verdict::Continue,
        text: None,
    };
    let names = |v: &Value| -> Vec<String> {
        match v {
            Value::String(s) => vec![s.clone()],
            Value::Object(o) => o
                .get("set")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
            Value::Array(a) => a
                .iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect(),
            _ => Vec::new(),
        }
    };
    for x in &exprs {
        if let Some(m) = x.get("match") {
            let key = m["left"]["meta"]["key"].as_str();
            let eq = m["op"].as_str() != Some("!=");
            match key {
                Some(k @ ("iifname" | "oifname")) => info.ifs.push(IfMatch {
                    out: k == "oifname",
                    eq,
                    names: names(&m["right"]),
                }),
                _ => {
                    info.other = true;
                    if m["left"]["ct"]["key"].as_str() == Some("state")
                        && eq
                        && names(&m["right"]) == ["invalid"]
                    {
                        info.invalid_only = true;
                    }
                }
            }
        } else if x.get("accept").is_some() {
            info.verdict = Verdict::Accept;
        } else if x.get("drop").is_some() || x.get("reject").is_some() {
            info.verdict = Verdict::Drop;
        } else if x.get("return").is_some() {
            info.verdict = Verdict::Return;
        } else if let Some(t) = x["jump"]["target"].as_str() {
            info.verdict = Verdict::Jump(t.to_string());
        } else if let Some(t) = x["goto"]["target"].as_str() {
            info.verdict = Verdict::Goto(t.to_string());
        } else if x["xt"]["type"].as_str() == Some("target") {
            // An iptables target nftables has no expression for: `-j REJECT`
            // (every iptables kill switch and RHEL's default `FORWARD` rule
            // that rejects rather than drops) shows only as its name. One
            // known to let the packet go on is a narrowing like a match;
            // any other may end it, so it counts as a drop: lume then keeps
            // its accepts from bypassing it, which is the safe mistake.
            let name = x["xt"]["name"].as_str().unwrap_or_default();
            if NON_TERMINAL_TARGETS.contains(&name) {
                info.other = true;
            } else {
                info.verdict = Verdict::Drop;
            }
        } else if ["counter", "log", "limit", "mangle", "xt", "notrack"]
            .iter()
            .any(|k| x.get(*k).is_some())
        {
            // A match of iptables' own (`-m conntrack`) shows as an xt
            // statement: it narrows what the rule matches.
            if x.get("xt").is_some() || x.get("limit").is_some() {
                info.other = true;
            }
        } else {
            info.other = true;
        }
    }
    info
}

/// A chain of the ruleset as `nft -j list ruleset` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Chain {
    hook: Option<String>,
    policy: Option<String>,
    rules: Vec<RuleInfo>,
}

impl Chain {
    /// Its rules that are not lume's.
    fn others(&self) -> Vec<&RuleInfo> {
        self.rules.iter().filter(|r| !r.is_lume()).collect()
    }

    /// The rule lume's rules go right before, per `place`: a final
    /// unconditional RETURN (Docker) or reject (firewalld), if any.
    fn anchor(&self, place: Place) -> Option<&RuleInfo> {
        let last = *self.others().last()?;
        let wanted = match place {
            Place::BeforeFinalReturn => Verdict::Return,
            Place::BeforeFinalReject => Verdict::Drop,
            Place::End => return None,
        };
        (last.unconditional() && last.verdict == wanted).then_some(last)
    }

    /// Where lume's rules go, counted in the chain's other rules.
    fn lume_position(&self, place: Place) -> usize {
        self.others().len() - usize::from(self.anchor(place).is_some())
    }
}

type Key = (String, String, String);

/// The ruleset's chains, keyed by (family, table, chain).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ruleset {
    chains: BTreeMap<Key, Chain>,
    /// The listing could not be read: nothing is known of other tools'
    /// chains, so they count as present (see [`Self::tools_present`]).
    unreadable: bool,
}

fn key3(family: &str, table: &str, chain: &str) -> Key {
    (family.to_string(), table.to_string(), chain.to_string())
}

impl Ruleset {
    /// Parses `nft -j list ruleset`; anything unreadable is a ruleset
    /// without chains that counts as having other tools' chains.
    pub fn parse(json: &str) -> Self {
        let mut rs = Self::default();
        let Some(items) = serde_json::from_str::<Value>(json)
            .ok()
            .and_then(|v| v["nftables"].as_array().cloned())
        else {
            rs.unreadable = true;
            return rs;
        };
        let s = |v: &Value| v.as_str().unwrap_or("").to_string();
        for item in &items {
            if let Some(c) = item.get("chain") {
                let e = rs
                    .chains
                    .entry((s(&c["family"]), s(&c["table"]), s(&c["name"])))
                    .or_default();
                e.hook = c["hook"].as_str().map(str::to_string);
                e.policy = c["policy"].as_str().map(str::to_string);
            } else if let Some(r) = item.get("rule") {
                rs.chains
                    .entry((s(&r["family"]), s(&r["table"]), s(&r["chain"])))
                    .or_default()
                    .rules
                    .push(parse_rule(r));
            }
        }
        rs
    }

    /// Adds each rule's text from `nft -a -s list ruleset` (matched by
    /// handle), for the doctor to name rules as nft shows them.
    pub fn with_text(mut self, listing: &str) -> Self {
        let (mut family, mut table, mut chain) = (String::new(), String::new(), String::new());
        for line in listing.lines() {
            let l = line.trim();
            if let Some(rest) = l.strip_prefix("table ") {
                let mut w = rest.split_whitespace();
                family = w.next().unwrap_or("").to_string();
                table = w.next().unwrap_or("").to_string();
            } else if let Some(rest) = l.strip_prefix("chain ") {
                chain = rest.split_whitespace().next().unwrap_or("").to_string();
            } else if let Some((text, handle)) = l.rsplit_once(" # handle ")
                && let Ok(h) = handle.trim().parse::<u64>()
                && let Some(c) = self.chains.get_mut(&key3(&family, &table, &chain))
                && let Some(r) = c.rules.iter_mut().find(|r| r.handle == h)
            {
                r.text = Some(text.trim().to_string());
            }
        }
        self
    }

    /// Whether any chain lume accommodates exists (Docker, ufw or firewalld
    /// is present), or the listing was unreadable: then nothing recorded
    /// from it may spare the next write its listing.
    pub fn tools_present(&self) -> bool {
        self.unreadable
            || TARGETS
                .iter()
                .any(|t| self.chain(t.family, t.table, t.chain).is_some())
    }

    fn chain(&self, family: &str, table: &str, chain: &str) -> Option<&Chain> {
        self.chains.get(&key3(family, table, chain))
    }

    /// The bridges Docker's own chains of `family`'s filter table name
    /// (`docker0`, `br-…`, `docker_gwbridge`, a network's custom
    /// `com.docker.network.bridge.name`): every interface its `DOCKER*`
    /// chains but `DOCKER-USER` match on, and those of rules jumping to
    /// them (`-o docker0 -j DOCKER` in Docker up to 27). Only names that
    /// are valid interface names, so nothing of them can change an nft rule.
    pub fn docker_bridges(&self, family: &str) -> Vec<String> {
        self.tool_bridges(family, |c| c.starts_with("DOCKER") && c != "DOCKER-USER")
    }

    /// The bridges whose traffic lume leaves to another tool's chains:
    /// Docker's ([`Self::docker_bridges`]) and libvirt's (those its
    /// `LIBVIRT_*` chains of iptables name), each with the tool's name
    /// as lume's comments give it.
    pub fn guarded_bridges(&self, family: &str) -> Vec<(String, &'static str)> {
        let docker = self.docker_bridges(family);
        let libvirt = self.libvirt_bridges(family);
        let mut out: Vec<(String, &'static str)> =
            docker.iter().map(|d| (d.clone(), "docker")).collect();
        out.extend(
            libvirt
                .into_iter()
                .filter(|l| !docker.contains(l))
                .map(|l| (l, "libvirt")),
        );
        out
    }

    /// The networks libvirt's iptables chains guard: the out-interfaces of
    /// their rejects (`LIBVIRT_FWI -o virbr0 -j REJECT`). Not every name
    /// those chains match: a routed network's accepts name the host's
    /// uplink (`-o eth0`), whose traffic is not libvirt's to decide.
    fn libvirt_bridges(&self, family: &str) -> Vec<String> {
        let mut out = BTreeSet::new();
        for ((f, t, c), chain) in &self.chains {
            if f != family || t != "filter" || !c.starts_with("LIBVIRT_") {
                continue;
            }
            for r in chain.rules.iter().filter(|r| r.verdict == Verdict::Drop) {
                for m in r.ifs.iter().filter(|m| m.out && m.eq) {
                    out.extend(
                        m.names
                            .iter()
                            .filter(|n| crate::network::mode::valid_ifname(n) && *n != "lo")
                            .cloned(),
                    );
                }
            }
        }
        out.into_iter().collect()
    }

    /// Every valid interface name the chains `tool` says are its own match
    /// on in `family`'s filter table, and those of rules jumping to them.
    fn tool_bridges(&self, family: &str, docker: impl Fn(&str) -> bool) -> Vec<String> {
        let mut out = BTreeSet::new();
        for ((f, t, c), chain) in &self.chains {
            if f != family || t != "filter" {
                continue;
            }
            for r in &chain.rules {
                let calls_docker =
                    matches!(&r.verdict, Verdict::Jump(x) | Verdict::Goto(x) if docker(x));
                if (docker(c) || calls_docker) && !r.is_lume() {
                    for m in &r.ifs {
                        out.extend(
                            m.names
                                .iter()
                                .filter(|n| crate::network::mode::valid_ifname(n) && *n != "lo")
                                .cloned(),
                        );
                    }
                }
            }
        }
        out.into_iter().collect()
    }

    /// Chains reachable from a chain (itself included) through jumps and gotos.
    fn reachable(&self, family: &str, table: &str, chain: &str) -> Vec<String> {
        let mut seen = BTreeSet::from([chain.to_string()]);
        let mut queue = VecDeque::from([chain.to_string()]);
        while let Some(c) = queue.pop_front() {
            if let Some(ch) = self.chain(family, table, &c) {
                for r in &ch.rules {
                    if let Verdict::Jump(next) | Verdict::Goto(next) = &r.verdict
                        && seen.insert(next.clone())
                    {
                        queue.push_back(next.clone());
                    }
                }
            }
        }
        seen.into_iter().collect()
    }

    fn lume_rules(&self) -> impl Iterator<Item = (&Key, u64)> {
        self.chains
            .iter()
            .filter(|((f, t, _), _)| !(f == "inet" && t == super::nft::TABLE))
            .flat_map(|(k, c)| {
                c.rules
                    .iter()
                    .filter(|r| r.is_lume())
                    .map(move |r| (k, r.handle))
            })
    }

    /// Only the chains of one table (what a [`ForeignDrop`] keeps to follow).
    fn table(&self, family: &str, table: &str) -> Ruleset {
        Ruleset {
            chains: self
                .chains
                .iter()
                .filter(|((f, t, _), _)| f == family && t == table)
                .map(|(k, c)| (k.clone(), c.clone()))
                .collect(),
            unreadable: self.unreadable,
        }
    }

    /// The base chains of a table at a hook.
    fn base_chains(&self, family: &str, table: &str, hook: Hook) -> Vec<String> {
        self.chains
            .iter()
            .filter(|((f, t, _), c)| {
                f == family && t == table && c.hook.as_deref() == Some(hook.name())
            })
            .map(|((_, _, c), _)| c.clone())
            .collect()
    }

    /// The targets of a table at a hook that exist.
    fn targets(&self, family: &str, table: &str, hook: Hook) -> Vec<&'static Target> {
        TARGETS
            .iter()
            .filter(|t| t.family == family && t.table == table && t.hook == hook)
            .filter(|t| self.chain(t.family, t.table, t.chain).is_some())
            .collect()
    }
}

/// A drop or reject met while following a base chain for one kind of
/// traffic of a lume bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Met {
    /// `ip filter FORWARD`.
    chain: String,
    rule: String,
    /// The tool whose own chain holds it.
    tool: Option<&'static str>,
    /// The target it sits in (the admin's rules there).
    in_target: Option<&'static Target>,
    /// Targets whose place for lume's accepts came before it: those accepts
    /// would skip it.
    after: Vec<&'static Target>,
}

/// Following one base chain rule by rule, through jumps and gotos, for one
/// kind of traffic, with lume's accepts where they go in each of `targets`.
struct Walk<'a> {
    rs: &'a Ruleset,
    family: &'a str,
    table: &'a str,
    case: &'a Case,
    targets: &'a [&'static Target],
    passed: Vec<&'static Target>,
    met: Vec<Met>,
    /// Whether an accept of someone else's naming the bridge came first.
    accepted: bool,
}

/// How a chain's evaluation ends for the traffic followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    /// Some of it goes on after the chain (its end, a return).
    Next,
    /// All of it is decided in the chain.
    Decided,
}

impl Walk<'_> {
    fn run(
        rs: &Ruleset,
        family: &str,
        table: &str,
        base: &str,
        case: &Case,
        targets: &[&'static Target],
    ) -> (Flow, Vec<Met>, bool) {
        let mut w = Walk {
            rs,
            family,
            table,
            case,
            targets,
            passed: Vec::new(),
            met: Vec::new(),
            accepted: false,
        };
        let flow = w.chain(base, true, 0);
        (flow, w.met, w.accepted)
    }

    /// `sure`: every packet of the case reaching the chain's call gets in.
    fn chain(&mut self, name: &str, sure: bool, depth: usize) -> Flow {
        if depth > MAX_DEPTH {
            return Flow::Next;
        }
        let Some(c) = self.rs.chain(self.family, self.table, name) else {
            return Flow::Next;
        };
        let target = self.targets.iter().copied().find(|t| t.chain == name);
        let at = target.map(|t| (t, c.lume_position(t.place)));
        let others = c.others();
        // Whether some of the traffic may already have left the chain.
        let mut leaked = !sure;
        for (i, r) in others.iter().enumerate() {
            if let Some((t, p)) = at
                && p == i
            {
                self.passed.push(t);
            }
            if !r.possible(self.case) {
                continue;
            }
            let certain = !leaked && r.certain(self.case);
            match &r.verdict {
                Verdict::Drop => {
                    self.met.push(Met {
                        chain: format!("{} {} {name}", self.family, self.table),
                        rule: r.describe(),
                        tool: tool_of(self.family, self.table, name),
                        in_target: TARGETS.iter().find(|t| {
                            t.family == self.family && t.table == self.table && t.chain == name
                        }),
                        after: self.passed.clone(),
                    });
                    if certain {
                        return Flow::Decided;
                    }
                }
                Verdict::Accept => {
                    if r.names_bridge(self.case) {
                        self.accepted = true;
                    }
                    if certain {
                        return Flow::Decided;
                    }
                }
                Verdict::Return => {
                    if certain {
                        return Flow::Next;
                    }
                    leaked = true;
                }
                Verdict::Jump(to) => {
                    if self.chain(to, certain, depth + 1) == Flow::Decided && certain {
                        return Flow::Decided;
                    }
                }
                Verdict::Goto(to) => {
                    let flow = self.chain(to, certain, depth + 1);
                    if certain {
                        return flow;
                    }
                    leaked = true;
                }
                Verdict::Continue => {}
            }
        }
        if let Some((t, p)) = at
            && p == others.len()
        {
            self.passed.push(t);
        }
        Flow::Next
    }
}

/// The targets lume keeps its accepts out of, with why: a drop that is no
/// tool's own policy comes after the place of lume's accepts there (an
/// accept would skip it). Its text names the rule and its chain.
fn withheld(rs: &Ruleset, openings: &[Opening]) -> BTreeMap<Key, String> {
    let mut out = BTreeMap::new();
    let mut tables: BTreeSet<(&str, &str, Hook)> = BTreeSet::new();
    for t in TARGETS {
        tables.insert((t.family, t.table, t.hook));
    }
    for (family, table, hook) in tables {
        let bridges: Vec<&str> = openings
            .iter()
            .filter(|o| !o.bridged && (hook == Hook::Input || o.nat))
            .map(|o| o.bridge.as_str())
            .collect();
        let targets = rs.targets(family, table, hook);
        let bridged = hook == Hook::Forward && openings.iter().any(|o| o.bridged);
        if (bridges.is_empty() && !bridged) || targets.is_empty() {
            continue;
        }
        let docker: Vec<String> = rs
            .guarded_bridges(family)
            .into_iter()
            .map(|(b, _)| b)
            .collect();
        let mut all = cases(hook, &bridges, &docker);
        if hook == Hook::Forward {
            all.extend(bridged_cases(openings));
        }
        for base in rs.base_chains(family, table, hook) {
            for case in &all {
                let (_, met, _) = Walk::run(rs, family, table, &base, case, &targets);
                for m in met.iter().filter(|m| m.tool.is_none()) {
                    for t in &m.after {
                        out.entry(key3(t.family, t.table, t.chain))
                            .or_insert_with(|| format!("rule {} in chain {}", m.rule, m.chain));
                    }
                }
            }
        }
    }
    out
}

/// What [`super::FirewallDriver::accommodate`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Accommodated {
    /// What changed, for logs; empty when everything was in place.
    pub changes: Vec<String>,
    /// Whether any chain lume accommodates exists.
    pub tools: bool,
}

/// The changes that put lume's rules in other tools' chains in order.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// nft commands, applied as one `nft -f` transaction.
    pub commands: Vec<String>,
    /// What the commands change, for logs.
    pub changes: Vec<String>,
}

/// What must change so that exactly `rules_for(target, openings)` sit in
/// their [`Place`] in every target chain that exists — none where a drop
/// that is no tool's own comes after them — and no rule of lume's is left
/// anywhere else (with no openings: nothing of lume's anywhere).
pub fn plan(rs: &Ruleset, openings: &[Opening]) -> Plan {
    let mut p = Plan::default();
    let mut handled: BTreeSet<Key> = BTreeSet::new();
    let out = withheld(rs, openings);
    for t in TARGETS {
        let Some(chain) = rs.chain(t.family, t.table, t.chain) else {
            continue;
        };
        let key = key3(t.family, t.table, t.chain);
        handled.insert(key.clone());
        let why = out.get(&key);
        let want = if why.is_some() {
            Vec::new()
        } else {
            rules_for(t, openings, &rs.guarded_bridges(t.family))
        };
        let ours: Vec<(usize, &RuleInfo)> = chain
            .rules
            .iter()
            .enumerate()
            .filter(|(_, r)| r.is_lume())
            .collect();
        // In place: lume's rules are exactly the wanted ones, together, at
        // their place (after every other rule but the anchor).
        let start = chain.lume_position(t.place);
        let in_place = ours.len() == want.len()
            && ours
                .iter()
                .zip(&want)
                .enumerate()
                .all(|(i, ((pos, r), w))| {
                    *pos == start + i && r.comment.as_deref() == Some(w.comment.as_str())
                });
        if in_place {
            continue;
        }
        for (_, r) in &ours {
            p.commands.push(format!(
                "delete rule {} {} {} handle {}",
                t.family, t.table, t.chain, r.handle
            ));
        }
        let anchor = chain.anchor(t.place).map(|a| a.handle);
        for r in &want {
            p.commands.push(match anchor {
                // Each right before the anchor: they keep their order.
                Some(h) => format!(
                    "insert rule {} {} {} position {h} {} comment \"{}\"",
                    t.family, t.table, t.chain, r.body, r.comment
                ),
                None => format!(
                    "add rule {} {} {} {} comment \"{}\"",
                    t.family, t.table, t.chain, r.body, r.comment
                ),
            });
        }
        p.changes.push(match (ours.is_empty(), want.is_empty(), why) {
            (false, true, Some(why)) => format!(
                "removed lume's accepts from {t}: {why} comes after them and is no tool's own policy, so they would bypass it"
            ),
            (true, _, _) => format!("added lume's accepts to {t}, below the rules there"),
            (false, true, None) => format!("removed lume's accepts from {t}"),
            (false, false, _) => format!("put lume's accepts back below the rules in {t}"),
        });
    }
    // Rules of lume's anywhere else (a chain lume no longer uses) go.
    let mut stray: BTreeMap<&Key, Vec<u64>> = BTreeMap::new();
    // Only in the tables of the tools lume accommodates: a table lume does
    // not know (a kill switch) is never touched, whatever its comments say.
    for (k, h) in rs.lume_rules() {
        let known_table = TARGETS.iter().any(|t| t.family == k.0 && t.table == k.1);
        if known_table && !handled.contains(k) {
            stray.entry(k).or_default().push(h);
        }
    }
    for ((f, t, c), handles) in stray {
        for h in handles {
            p.commands
                .push(format!("delete rule {f} {t} {c} handle {h}"));
        }
        p.changes
            .push(format!("removed lume's accepts from chain {f} {t} {c}"));
    }
    p
}

/// The nft script for a plan.
pub fn script(p: &Plan) -> String {
    let mut s = p.commands.join("\n");
    s.push('\n');
    s
}

/// A base chain outside lume's table that drops forwarded or input traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignDrop {
    pub family: String,
    pub table: String,
    pub chain: String,
    pub hook: String,
    /// `policy drop`, or the first rule that drops.
    pub how: String,
    /// Where lume's accepts for this chain are (reachable from it through
    /// jumps), and the bridges they name: the tool whose chain it is, the
    /// chain, the bridges.
    pub accommodated: Vec<(String, String, String)>,
    /// A chain lume accommodates reachable from this one (`Docker's chain
    /// ip filter DOCKER-USER`), with or without lume's accepts in it.
    pub tool_chain: Option<String>,
    /// Accepts someone else put in a tool's chain reachable from this one
    /// (`iptables -I DOCKER-USER -i lume0 -j ACCEPT`): the chain, the
    /// interface they match.
    pub user_accepts: Vec<(String, String)>,
    /// Whether its policy drops.
    pub policy_drop: bool,
    /// Its table, to follow its rules for a bridge's traffic.
    pub rules: Ruleset,
}

#[cfg(test)]
impl ForeignDrop {
    /// Docker's FORWARD policy drop as the doctor and the watcher see it, for
    /// their tests.
    pub fn docker_forward_policy(user_accepts: Vec<(String, String)>) -> Self {
        ForeignDrop {
            family: "ip".into(),
            table: "filter".into(),
            chain: "FORWARD".into(),
            hook: "forward".into(),
            how: "policy drop".into(),
            policy_drop: true,
            rules: Default::default(),
            accommodated: Vec::new(),
            tool_chain: Some("Docker's chain ip filter DOCKER-USER".into()),
            user_accepts,
        }
    }
}

/// A rule that drops some traffic of lume's bridges, met following a base
/// chain of another table rule by rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// The chain holding it (`ip filter FORWARD`).
    pub chain: String,
    /// The rule as nft shows it, with its handle.
    pub rule: String,
    pub kind: FindingKind,
}

/// How a rule that drops relates to lume's accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FindingKind {
    /// A tool's own rule after lume's accepts in `target` (ufw's final
    /// drops for DHCP broadcasts, firewalld's final reject): part of the
    /// policy lume accommodates.
    Accommodated { tool: String, target: String },
    /// No tool's own rule, after the place of lume's accepts in `targets`:
    /// their accept would skip it, so lume keeps its accepts out of them.
    Withheld { targets: Vec<String> },
    /// A rule in a chain a tool keeps for the admin's rules (`DOCKER-USER`,
    /// `ufw route deny`), before lume's accepts there: lume respects it.
    Respected { place: String },
    /// No tool's own rule, before any of lume's accepts (a kill switch, a
    /// rule of yours in `FORWARD`): it drops that traffic, lume does not
    /// override it.
    NotOverridden,
}

impl ForeignDrop {
    fn hook_kind(&self) -> Option<Hook> {
        match self.hook.as_str() {
            "forward" => Some(Hook::Forward),
            "input" => Some(Hook::Input),
            _ => None,
        }
    }

    fn cases(&self, bridges: &[&str]) -> Vec<Case> {
        match self.hook_kind() {
            Some(h) => cases(
                h,
                bridges,
                &self
                    .rules
                    .guarded_bridges(&self.family)
                    .into_iter()
                    .map(|(b, _)| b)
                    .collect::<Vec<_>>(),
            ),
            None => Vec::new(),
        }
    }

    /// Whether this chain drops some traffic of `bridges` (at a forward
    /// hook the NAT bridges, at input every bridge): a rule that drops or
    /// rejects and may match it, in the chain or in one it jumps to
    /// (followed [`MAX_DEPTH`] deep), or its policy when no rule of
    /// someone else's (not lume's) accepts traffic naming the bridge first.
    /// Rules naming other interfaces, and other verdicts, do not count.
    pub fn affects(&self, bridges: &[&str]) -> bool {
        self.cases(bridges).iter().any(|case| {
            let (flow, met, accepted) = Walk::run(
                &self.rules,
                &self.family,
                &self.table,
                &self.chain,
                case,
                &[],
            );
            !met.is_empty() || (flow == Flow::Next && self.policy_drop && !accepted)
        })
    }

    /// The rules of this chain (and those it jumps to) that drop some
    /// traffic of `bridges`, each with how it relates to lume's accepts
    /// (none when `accommodate` is false); rules of the tools' own before
    /// lume's accepts (their conntrack and address checks) are left out.
    pub fn findings(&self, bridges: &[&str], accommodate: bool) -> Vec<Finding> {
        let Some(hook) = self.hook_kind() else {
            return Vec::new();
        };
        let targets = if accommodate {
            self.rules.targets(&self.family, &self.table, hook)
        } else {
            Vec::new()
        };
        let mut out: Vec<Finding> = Vec::new();
        for case in self.cases(bridges) {
            let (_, met, _) = Walk::run(
                &self.rules,
                &self.family,
                &self.table,
                &self.chain,
                &case,
                &targets,
            );
            for m in met {
                let kind = match (m.after.last(), m.tool, m.in_target) {
                    (Some(t), Some(tool), _) => FindingKind::Accommodated {
                        tool: tool.to_string(),
                        target: t.to_string(),
                    },
                    (Some(_), None, _) => FindingKind::Withheld {
                        targets: m.after.iter().map(|t| t.to_string()).collect(),
                    },
                    // A tool's own rule before lume's accepts (its conntrack
                    // and address checks; in firewalld's chains, which are
                    // all firewalld's, whatever precedes the final reject).
                    (None, Some(_), _) => continue,
                    (None, None, Some(t)) => FindingKind::Respected {
                        place: t.to_string(),
                    },
                    (None, None, None) => FindingKind::NotOverridden,
                };
                let f = Finding {
                    chain: m.chain,
                    rule: m.rule,
                    kind,
                };
                if !out.contains(&f) {
                    out.push(f);
                }
            }
        }
        out
    }

    /// The tools' chains holding lume's accepts for every one of `bridges`,
    /// when they all do: this drop is accommodated, not a problem.
    pub fn accommodated_for(&self, bridges: &[&str]) -> Option<String> {
        let all = bridges
            .iter()
            .all(|b| self.accommodated.iter().any(|(_, _, br)| br == b));
        if !all || self.accommodated.is_empty() {
            return None;
        }
        let mut places: Vec<String> = self
            .accommodated
            .iter()
            .map(|(tool, chain, _)| format!("{tool}'s chain {chain}"))
            .collect();
        places.dedup();
        Some(places.join(", "))
    }

    /// The tools' chains where rules of the user's (not lume's) accept
    /// traffic of every one of `bridges` (matching it as input or output
    /// interface), when they all are: the user accommodates lume there.
    pub fn user_accepted_for(&self, bridges: &[&str]) -> Option<String> {
        let all = bridges
            .iter()
            .all(|b| self.user_accepts.iter().any(|(_, i)| i == b));
        if !all || bridges.is_empty() {
            return None;
        }
        let mut places: Vec<String> = self
            .user_accepts
            .iter()
            .filter(|(_, i)| bridges.contains(&i.as_str()))
            .map(|(chain, _)| chain.clone())
            .collect();
        places.dedup();
        Some(places.join(", "))
    }
}

impl std::fmt::Display for ForeignDrop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "table {} {} chain {} ({} hook): {}",
            self.family, self.table, self.chain, self.hook, self.how
        )
    }
}

impl Finding {
    /// The doctor's line for it; `list`: the bridges (`lume0 and lume-host0`).
    pub fn describe(&self, list: &str) -> String {
        let (chain, rule) = (&self.chain, &self.rule);
        match &self.kind {
            FindingKind::Accommodated { tool, target } => format!(
                "chain {chain}, rule {rule}: {tool}'s own rule after lume's accepts in {target}: another tool's policy lume accommodated"
            ),
            FindingKind::Withheld { targets } => format!(
                "chain {chain}, rule {rule}: drops some traffic of {list} and comes after the place of lume's accepts in {}: a policy lume must not override — lume keeps its accepts out of there, as they would bypass it",
                targets.join(", ")
            ),
            FindingKind::Respected { place } => format!(
                "chain {chain}, rule {rule}: a rule of yours in {place} that drops some traffic of {list}; it comes before lume's accepts, which do not override it"
            ),
            FindingKind::NotOverridden => format!(
                "chain {chain}, rule {rule}: drops some traffic of {list}: a policy lume must not override (a VPN kill switch or a rule of yours); lume does not bypass it — allow {list} there, or use --network user (passt: the guest's traffic leaves as the host's own, through the VPN)"
            ),
        }
    }

    /// Whether it is a problem the doctor fails on: a drop of no tool's
    /// own that lume neither accommodates nor was told about in a tool's chain.
    pub fn fails(&self) -> bool {
        matches!(self.kind, FindingKind::NotOverridden)
    }
}

/// Base chains with a forward or input hook, outside lume's table, whose
/// policy drops or that hold (or jump to a chain holding) a rule ending in
/// drop or reject; with lume's accepts reachable from each.
pub fn foreign_drops(rs: &Ruleset) -> Vec<ForeignDrop> {
    let mut out = Vec::new();
    for ((family, table, name), c) in &rs.chains {
        let Some(hook) = c.hook.as_deref() else {
            continue;
        };
        if !matches!(hook, "forward" | "input") || (family == "inet" && table == super::nft::TABLE)
        {
            continue;
        }
        let mut reach = rs.reachable(family, table, name);
        // The chain's own drops first, for naming one.
        reach.sort_by_key(|c| c != name);
        let first_drop = reach.iter().find_map(|ch| {
            rs.chain(family, table, ch)?
                .rules
                .iter()
                .find(|r| r.verdict == Verdict::Drop && !r.is_lume())
                .map(|r| (ch, r))
        });
        let policy_drop = c.policy.as_deref() == Some("drop");
        let how = if policy_drop {
            "policy drop".to_string()
        } else if let Some((ch, r)) = first_drop {
            if ch == name {
                format!("a rule drops ({})", r.describe())
            } else {
                format!("a rule in chain {ch} drops ({})", r.describe())
            }
        } else {
            continue;
        };
        let mut accommodated = Vec::new();
        let mut tool_chain = None;
        let mut user_accepts = Vec::new();
        for reach in &reach {
            let Some(rc) = rs.chain(family, table, reach) else {
                continue;
            };
            let target = TARGETS
                .iter()
                .find(|t| t.family == family && t.table == table && t.chain == reach);
            if let Some(t) = target {
                tool_chain.get_or_insert_with(|| t.to_string());
                for r in rc
                    .rules
                    .iter()
                    .filter(|r| !r.is_lume() && r.verdict == Verdict::Accept)
                {
                    for m in r.ifs.iter().filter(|m| m.eq) {
                        for i in &m.names {
                            let entry = (t.to_string(), i.clone());
                            if !user_accepts.contains(&entry) {
                                user_accepts.push(entry);
                            }
                        }
                    }
                }
            }
            let tool = target.map(|t| t.tool).unwrap_or("another tool");
            for r in &rc.rules {
                if let Some(bridge) = lume_bridge(r.comment.as_deref()) {
                    let entry = (
                        tool.to_string(),
                        format!("{family} {table} {reach}"),
                        bridge.to_string(),
                    );
                    if !accommodated.contains(&entry) {
                        accommodated.push(entry);
                    }
                }
            }
        }
        out.push(ForeignDrop {
            family: family.clone(),
            table: table.clone(),
            chain: name.clone(),
            hook: hook.to_string(),
            how,
            accommodated,
            tool_chain,
            user_accepts,
            policy_drop,
            rules: rs.table(family, table),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Docker 20–26 on iptables-nft, as `nft -j list ruleset` shows it
    /// (abridged to the filter table), with lume's rules in DOCKER-USER
    /// before Docker's final RETURN.
    const DOCKER: &str = r#"{"nftables":[
      {"table":{"family":"ip","name":"filter","handle":1}},
      {"chain":{"family":"ip","table":"filter","name":"FORWARD","handle":2,"type":"filter","hook":"forward","prio":0,"policy":"drop"}},
      {"chain":{"family":"ip","table":"filter","name":"DOCKER-USER","handle":3}},
      {"chain":{"family":"ip","table":"filter","name":"DOCKER","handle":4}},
      {"rule":{"family":"ip","table":"filter","chain":"FORWARD","handle":10,"expr":[{"counter":null},{"jump":{"target":"DOCKER-USER"}}]}},
      {"rule":{"family":"ip","table":"filter","chain":"FORWARD","handle":11,"expr":[{"match":{"op":"==","left":{"meta":{"key":"oifname"}},"right":"docker0"}},{"counter":null},{"jump":{"target":"DOCKER"}}]}},
      {"rule":{"family":"ip","table":"filter","chain":"DOCKER-USER","handle":19,"comment":"lume: lume0 to docker0 as docker decides","expr":[{"return":null}]}},
      {"rule":{"family":"ip","table":"filter","chain":"DOCKER-USER","handle":21,"comment":"lume: lume0 egress","expr":[{"match":{"op":"==","left":{"meta":{"key":"iifname"}},"right":"lume0"}},{"accept":null}]}},
      {"rule":{"family":"ip","table":"filter","chain":"DOCKER-USER","handle":22,"comment":"lume: lume0 replies and published ports","expr":[{"accept":null}]}},
      {"rule":{"family":"ip","table":"filter","chain":"DOCKER-USER","handle":12,"expr":[{"counter":null},{"return":null}]}},
      {"table":{"family":"inet","name":"killswitch","handle":5}},
      {"chain":{"family":"inet","table":"killswitch","name":"fwd","handle":1,"type":"filter","hook":"forward","prio":0,"policy":"drop"}}
    ]}"#;

    fn nat() -> Vec<Opening> {
        vec![Opening {
            bridge: "lume0".into(),
            nat: true,
            gateway: Ipv4Addr::new(203, 0, 113, 1),
            gateway6: None,
            bridged: false,
        }]
    }

    fn host() -> Opening {
        Opening {
            bridge: "lume-host0".into(),
            nat: false,
            gateway: Ipv4Addr::new(192, 0, 2, 1),
            gateway6: None,
            bridged: false,
        }
    }

    fn without_lume(json: &str) -> String {
        json.lines()
            .filter(|l| !l.contains("\"comment\":\"lume: "))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// A small ruleset in `nft -j` form: base chains `(table chain hook
    /// policy)` and rules `(table chain handle exprs)` of family `ip`.
    struct Rs {
        items: Vec<String>,
    }

    impl Rs {
        fn new() -> Self {
            Self { items: Vec::new() }
        }
        fn base(mut self, table: &str, chain: &str, hook: &str, policy: &str) -> Self {
            self.items.push(format!(
                r#"{{"chain":{{"family":"ip","table":"{table}","name":"{chain}","type":"filter","hook":"{hook}","prio":0,"policy":"{policy}"}}}}"#
            ));
            self
        }
        fn chain(mut self, table: &str, chain: &str) -> Self {
            self.items.push(format!(
                r#"{{"chain":{{"family":"ip","table":"{table}","name":"{chain}"}}}}"#
            ));
            self
        }
        fn rule(mut self, table: &str, chain: &str, handle: u64, exprs: &[String]) -> Self {
            self.items.push(format!(
                r#"{{"rule":{{"family":"ip","table":"{table}","chain":"{chain}","handle":{handle},"expr":[{}]}}}}"#,
                exprs.join(",")
            ));
            self
        }
        fn json(&self) -> String {
            format!(r#"{{"nftables":[{}]}}"#, self.items.join(",\n"))
        }
        fn parse(&self) -> Ruleset {
            Ruleset::parse(&self.json())
        }
    }

    fn ifm(key: &str, op: &str, name: &str) -> String {
        format!(
            r#"{{"match":{{"op":"{op}","left":{{"meta":{{"key":"{key}"}}}},"right":"{name}"}}}}"#
        )
    }
    fn iif(name: &str) -> String {
        ifm("iifname", "==", name)
    }
    fn oif(name: &str) -> String {
        ifm("oifname", "==", name)
    }
    fn not_iif(name: &str) -> String {
        ifm("iifname", "!=", name)
    }
    fn daddr(a: &str) -> String {
        format!(
            r#"{{"match":{{"op":"==","left":{{"payload":{{"protocol":"ip","field":"daddr"}}}},"right":"{a}"}}}}"#
        )
    }
    fn v(verdict: &str) -> String {
        match verdict.split_once(' ') {
            Some((k, t)) => format!(r#"{{"{k}":{{"target":"{t}"}}}}"#),
            None => format!(r#"{{"{verdict}":null}}"#),
        }
    }

    /// Docker 28 (no RETURN in DOCKER-USER) and ufw, as the e2e fixtures load them.
    fn docker_and_ufw() -> Rs {
        Rs::new()
            .base("filter", "FORWARD", "forward", "drop")
            .base("filter", "INPUT", "input", "drop")
            .chain("filter", "DOCKER-USER")
            .chain("filter", "DOCKER-FORWARD")
            .chain("filter", "DOCKER")
            .chain("filter", "ufw-before-forward")
            .chain("filter", "ufw-user-forward")
            .chain("filter", "ufw-before-input")
            .chain("filter", "ufw-user-input")
            .chain("filter", "ufw-after-input")
            .chain("filter", "ufw-skip-to-policy-input")
            .rule("filter", "FORWARD", 1, &[v("jump DOCKER-USER")])
            .rule("filter", "FORWARD", 2, &[v("jump DOCKER-FORWARD")])
            .rule("filter", "FORWARD", 3, &[v("jump ufw-before-forward")])
            .rule("filter", "DOCKER-FORWARD", 4, &[oif("docker0"), v("jump DOCKER")])
            .rule("filter", "DOCKER-FORWARD", 5, &[iif("docker0"), v("accept")])
            .rule("filter", "DOCKER", 6, &[not_iif("docker0"), oif("docker0"), v("drop")])
            .rule("filter", "ufw-before-forward", 7, &[v("jump ufw-user-forward")])
            .rule("filter", "INPUT", 8, &[v("jump ufw-before-input")])
            .rule("filter", "INPUT", 9, &[v("jump ufw-after-input")])
            .rule("filter", "ufw-before-input", 10, &[v("jump ufw-user-input")])
            .rule(
                "filter",
                "ufw-after-input",
                11,
                &[
                    r#"{"match":{"op":"==","left":{"payload":{"protocol":"udp","field":"dport"}},"right":67}}"#.into(),
                    v("jump ufw-skip-to-policy-input"),
                ],
            )
            .rule("filter", "ufw-skip-to-policy-input", 12, &[v("drop")])
    }

    #[test]
    fn rules_in_place_need_nothing_and_a_flushed_chain_gets_them_back() {
        let rs = Ruleset::parse(DOCKER);
        assert!(rs.tools_present());
        assert!(!Ruleset::parse(r#"{"nftables":[]}"#).tools_present());
        // An unreadable listing proves nothing: it never records "no
        // other tool's chain" (which would spare later writes a listing).
        for bad in ["", "{", r#"{"nftables": 3}"#, "[]"] {
            let rs = Ruleset::parse(bad);
            assert!(rs.tools_present(), "{bad:?}");
            assert!(plan(&rs, &nat()).commands.is_empty(), "{bad:?}");
        }
        assert_eq!(plan(&rs, &nat()), Plan::default());
        // Docker restarted: DOCKER-USER flushed and its RETURN put back;
        // lume's rules go right before that RETURN, in order.
        let p = plan(&Ruleset::parse(&without_lume(DOCKER)), &nat());
        assert_eq!(
            p.commands,
            [
                "insert rule ip filter DOCKER-USER position 12 iifname \"lume0\" oifname \"docker0\" return comment \"lume: lume0 to docker0 as docker decides\"",
                "insert rule ip filter DOCKER-USER position 12 iifname \"lume0\" accept comment \"lume: lume0 egress\"",
                "insert rule ip filter DOCKER-USER position 12 oifname \"lume0\" meta mark and 0x01000000 == 0x01000000 accept comment \"lume: lume0 replies and published ports\"",
            ]
        );
        assert_eq!(
            p.changes,
            ["added lume's accepts to Docker's chain ip filter DOCKER-USER, below the rules there"]
        );
    }

    #[test]
    fn rules_above_the_admin_s_rules_are_moved_below_them() {
        // lume's rules after Docker's RETURN would never be reached.
        let late = DOCKER.replace("\"handle\":21,", "\"handle\":31,");
        let moved: Vec<&str> = late.lines().collect();
        let (mut a, b): (Vec<&str>, Vec<&str>) = moved
            .into_iter()
            .partition(|l| !l.contains("\"comment\":\"lume: "));
        let ret = a.iter().position(|l| l.contains("\"return\"")).unwrap();
        for (i, l) in b.into_iter().enumerate() {
            a.insert(ret + 1 + i, l);
        }
        let p = plan(&Ruleset::parse(&a.join("\n")), &nat());
        assert_eq!(p.commands.len(), 6, "{p:?}");
        assert!(
            p.commands[..3].contains(&"delete rule ip filter DOCKER-USER handle 31".to_string()),
            "{p:?}"
        );
        assert!(p.commands[3].contains("position 12"), "{p:?}");
        assert!(p.changes[0].starts_with("put lume's accepts back below the rules in"));

        // Docker 28 (no RETURN): an admin's deny appended after lume's
        // rules (`iptables -A DOCKER-USER -i lume0 -d 192.0.2.0/24 -j DROP`)
        // moves them below it; so does a `ufw route deny` in ufw's chain.
        let deny = [iif("lume0"), daddr("192.0.2.7"), v("drop")];
        let lume = |chain: &str, handle: u64, what: &str| {
            format!(
                r#"{{"rule":{{"family":"ip","table":"filter","chain":"{chain}","handle":{handle},"comment":"lume: lume0 {what}","expr":[{{"accept":null}}]}}}}"#
            )
        };
        let mut rs = docker_and_ufw();
        rs.items.push(lume("DOCKER-USER", 40, "egress"));
        rs.items
            .push(lume("DOCKER-USER", 41, "replies and published ports"));
        let rs = rs.rule("filter", "DOCKER-USER", 42, &deny);
        let p = plan(&rs.parse(), &nat());
        // lume's accepts in DOCKER-USER would now come before ufw's user
        // chain too; the admin's deny there is not reached by lume0's
        // traffic in this ruleset (no ufw deny), so lume stays in both.
        let docker: Vec<&String> = p
            .commands
            .iter()
            .filter(|c| c.contains("DOCKER-USER"))
            .collect();
        assert_eq!(
            docker,
            [
                "delete rule ip filter DOCKER-USER handle 40",
                "delete rule ip filter DOCKER-USER handle 41",
                "add rule ip filter DOCKER-USER iifname \"lume0\" oifname \"docker0\" return comment \"lume: lume0 to docker0 as docker decides\"",
                "add rule ip filter DOCKER-USER iifname \"lume0\" accept comment \"lume: lume0 egress\"",
                "add rule ip filter DOCKER-USER oifname \"lume0\" meta mark and 0x01000000 == 0x01000000 accept comment \"lume: lume0 replies and published ports\"",
            ]
        );
        assert!(
            p.commands
                .iter()
                .any(|c| c
                    .starts_with("add rule ip filter ufw-user-forward iifname \"lume0\" accept")),
            "{p:?}"
        );

        let gone = plan(&Ruleset::parse(DOCKER), &[]);
        assert_eq!(
            gone.commands,
            [
                "delete rule ip filter DOCKER-USER handle 19",
                "delete rule ip filter DOCKER-USER handle 21",
                "delete rule ip filter DOCKER-USER handle 22"
            ]
        );
    }

    #[test]
    fn an_iptables_reject_is_a_drop_and_a_log_is_not() {
        // `iptables -A FORWARD -o up0 -j REJECT` as iptables-nft lists it:
        // no nft verdict, only the xt target's name.
        let xt = |name: &str| format!(r#"{{"xt":{{"type":"target","name":"{name}"}}}}"#);
        let counter = r#"{"counter":{"packets":0,"bytes":0}}"#.to_string();
        let ks = docker_and_ufw()
            .rule(
                "filter",
                "FORWARD",
                30,
                &[oif("up0"), counter.clone(), xt("REJECT")],
            )
            .parse();
        let p = plan(&ks, &nat());
        for t in ["DOCKER-USER", "ufw-user-forward"] {
            assert!(
                !p.commands
                    .iter()
                    .any(|c| c.contains(&format!("filter {t} ")) && c.contains("egress")),
                "a reject kill switch after {t} is not bypassed: {p:?}"
            );
        }
        assert!(
            foreign_drops(&ks)
                .iter()
                .any(|d| d.chain == "FORWARD" && d.affects(&["lume0"]))
        );
        // A target that lets the packet go on changes nothing.
        let log = docker_and_ufw()
            .rule("filter", "FORWARD", 30, &[oif("up0"), xt("LOG")])
            .parse();
        assert!(
            plan(&log, &nat())
                .commands
                .iter()
                .any(|c| c.contains("filter DOCKER-USER ") && c.contains("egress")),
        );
    }

    #[test]
    fn a_drop_after_the_place_of_lume_s_accepts_keeps_them_out() {
        // A `ufw route deny` in ufw-user-forward comes after DOCKER-USER:
        // an accept there would bypass it, so lume keeps out of DOCKER-USER
        // and its accept in ufw's chain goes below the deny.
        let deny = [iif("lume0"), daddr("198.51.100.3"), v("drop")];
        let rs = docker_and_ufw().rule("filter", "ufw-user-forward", 20, &deny);
        let p = plan(&rs.parse(), &nat());
        assert!(
            !p.commands.iter().any(|c| c.contains("DOCKER-USER")),
            "{p:?}"
        );
        assert!(
            p.commands.iter().any(|c| c
                == "add rule ip filter ufw-user-forward iifname \"lume0\" accept comment \"lume: lume0 egress\""),
            "{p:?}"
        );
        let ks = docker_and_ufw()
            .rule("filter", "FORWARD", 30, &[oif("up0"), v("drop")])
            .parse();
        // An iptables kill switch appended to FORWARD: lume's accepts in
        // both forward chains would skip it; they go, the input ones stay.
        let placed = {
            let mut with = ks.clone();
            for t in ["DOCKER-USER", "ufw-user-forward"] {
                with.chains
                    .get_mut(&key3("ip", "filter", t))
                    .unwrap()
                    .rules
                    .push(RuleInfo {
                        handle: 50,
                        comment: Some("lume: lume0 egress".into()),
                        ifs: Vec::new(),
                        other: false,
                        invalid_only: false,
                        verdict: Verdict::Accept,
                        text: None,
                    });
            }
            with
        };
        let p = plan(&placed, &nat());
        for t in ["DOCKER-USER", "ufw-user-forward"] {
            assert!(
                p.commands
                    .contains(&format!("delete rule ip filter {t} handle 50")),
                "{p:?}"
            );
            assert!(
                !p.commands
                    .iter()
                    .any(|c| c.starts_with(&format!("add rule ip filter {t} "))),
                "{p:?}"
            );
        }
        assert!(
            p.changes.iter().any(|c| c.contains(
                "removed lume's accepts from Docker's chain ip filter DOCKER-USER: rule handle 30 in chain ip filter FORWARD comes after them"
            )),
            "{p:?}"
        );
        assert!(
            p.commands
                .iter()
                .any(|c| c.starts_with("add rule ip filter ufw-user-input")),
            "{p:?}"
        );
        // Before the jump, it drops first: lume's accepts stay, it is named.
        let first = docker_and_ufw().rule("filter", "FORWARD", 30, &[oif("up0"), v("drop")]);
        let mut items = first.items.clone();
        let at = items
            .iter()
            .position(|i| i.contains("\"handle\":1,"))
            .unwrap();
        let ks_rule = items.pop().unwrap();
        items.insert(at, ks_rule);
        let before = Rs { items }.parse();
        let p = plan(&before, &nat());
        assert!(
            p.commands
                .iter()
                .any(|c| c.starts_with("add rule ip filter DOCKER-USER iifname \"lume0\" accept")),
            "{p:?}"
        );
        let drops = foreign_drops(&before);
        let fwd = drops.iter().find(|d| d.chain == "FORWARD").unwrap();
        assert_eq!(
            fwd.findings(&["lume0"], true),
            [Finding {
                chain: "ip filter FORWARD".into(),
                rule: "handle 30".into(),
                kind: FindingKind::NotOverridden
            }]
        );
        let drops = foreign_drops(&ks);
        let fwd = drops.iter().find(|d| d.chain == "FORWARD").unwrap();
        let f = fwd.findings(&["lume0"], true);
        assert_eq!(
            f,
            [Finding {
                chain: "ip filter FORWARD".into(),
                rule: "handle 30".into(),
                kind: FindingKind::Withheld {
                    targets: vec![
                        "Docker's chain ip filter DOCKER-USER".into(),
                        "ufw's chain ip filter ufw-user-forward".into()
                    ]
                }
            }]
        );
        assert!(
            f[0].describe("lume0")
                .contains("a policy lume must not override")
        );
        assert!(!f[0].fails());
        // With accommodation off there are no accepts of lume's to bypass it.
        assert_eq!(
            fwd.findings(&["lume0"], false)[0].kind,
            FindingKind::NotOverridden
        );
    }

    #[test]
    fn the_tools_own_policy_after_lume_s_accepts_is_accommodated() {
        let rs = docker_and_ufw().parse();
        let p = plan(&rs, &nat());
        assert!(
            p.commands
                .iter()
                .any(|c| c.starts_with("add rule ip filter ufw-user-input iifname \"lume0\" ip daddr 203.0.113.1 udp dport 67 accept")),
            "ufw's skip-to-policy drop for DHCP is ufw's own policy: {p:?}"
        );
        let drops = foreign_drops(&rs);
        let input = drops.iter().find(|d| d.chain == "INPUT").unwrap();
        assert_eq!(
            input.findings(&["lume0"], true),
            [Finding {
                chain: "ip filter ufw-skip-to-policy-input".into(),
                rule: "handle 12".into(),
                kind: FindingKind::Accommodated {
                    tool: "ufw".into(),
                    target: "ufw's chain ip filter ufw-user-input".into()
                }
            }]
        );
        // An admin's deny in DOCKER-USER comes before lume's accepts: respected.
        let rs = docker_and_ufw()
            .rule(
                "filter",
                "DOCKER-USER",
                20,
                &[iif("lume0"), daddr("198.51.100.3"), v("drop")],
            )
            .parse();
        let drops = foreign_drops(&rs.with_text(
            "table ip filter {\n\tchain DOCKER-USER {\n\t\tiifname \"lume0\" ip daddr 198.51.100.3 counter drop # handle 20\n\t}\n}\n",
        ));
        let fwd = drops.iter().find(|d| d.chain == "FORWARD").unwrap();
        let f = fwd.findings(&["lume0"], true);
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(
            f[0].describe("lume0"),
            "chain ip filter DOCKER-USER, rule `iifname \"lume0\" ip daddr 198.51.100.3 counter drop` (handle 20): a rule of yours in Docker's chain ip filter DOCKER-USER that drops some traffic of lume0; it comes before lume's accepts, which do not override it"
        );
    }

    #[test]
    fn docker_bridges_come_from_docker_s_own_chains() {
        let rs = Rs::new()
            .base("filter", "FORWARD", "forward", "drop")
            .chain("filter", "DOCKER-USER")
            .chain("filter", "DOCKER-ISOLATION-STAGE-1")
            .chain("filter", "DOCKER")
            .rule("filter", "FORWARD", 1, &[v("jump DOCKER-USER")])
            .rule("filter", "FORWARD", 2, &[oif("docker0"), v("jump DOCKER")])
            .rule(
                "filter",
                "DOCKER-ISOLATION-STAGE-1",
                3,
                &[
                    iif("docker_gwbridge"),
                    ifm("oifname", "!=", "docker_gwbridge"),
                    v("drop"),
                ],
            )
            .rule(
                "filter",
                "DOCKER-ISOLATION-STAGE-1",
                4,
                &[iif("custom0"), v("drop")],
            )
            .rule("filter", "DOCKER", 5, &[iif("bad\\\"name"), v("drop")])
            // An admin's rule in DOCKER-USER names no Docker bridge.
            .rule("filter", "DOCKER-USER", 6, &[iif("eth7"), v("drop")])
            .parse();
        let docker = rs.docker_bridges("ip");
        assert_eq!(docker, ["custom0", "docker0", "docker_gwbridge"]);
        let docker = rs.guarded_bridges("ip");
        let t = &TARGETS[0];
        let bodies: Vec<String> = rules_for(t, &nat(), &docker)
            .into_iter()
            .map(|r| r.body)
            .collect();
        assert_eq!(
            bodies,
            [
                "iifname \"lume0\" oifname \"custom0\" return",
                "iifname \"lume0\" oifname \"docker0\" return",
                "iifname \"lume0\" oifname \"docker_gwbridge\" return",
                "iifname \"lume0\" accept",
                "oifname \"lume0\" meta mark and 0x01000000 == 0x01000000 accept",
            ]
        );
        // No pattern: a bridge of the user's named br-lan is no Docker's.
        assert!(!bodies.iter().any(|b| b.contains('*')));
        for r in rules_for(t, &nat(), &docker) {
            assert!(is_lume_comment(&r.comment), "{}", r.comment);
        }
        // libvirt's iptables chains guard virbr0 the same way; the uplink
        // a routed network's accepts name is not libvirt's.
        let lv = Rs::new()
            .base("filter", "FORWARD", "forward", "accept")
            .chain("filter", "LIBVIRT_FWI")
            .chain("filter", "LIBVIRT_FWO")
            .rule("filter", "FORWARD", 1, &[v("jump LIBVIRT_FWI")])
            .rule(
                "filter",
                "LIBVIRT_FWI",
                2,
                &[iif("eth0"), oif("virbr1"), v("accept")],
            )
            .rule("filter", "LIBVIRT_FWI", 3, &[oif("virbr0"), v("reject")])
            .rule(
                "filter",
                "LIBVIRT_FWO",
                4,
                &[iif("virbr1"), oif("eth0"), v("accept")],
            )
            .rule("filter", "LIBVIRT_FWO", 5, &[iif("virbr0"), v("reject")])
            .parse();
        assert_eq!(
            lv.guarded_bridges("ip"),
            [("virbr0".to_string(), "libvirt")]
        );
        let r = rules_for(t, &nat(), &lv.guarded_bridges("ip"));
        assert_eq!(r[0].body, "iifname \"lume0\" oifname \"virbr0\" return");
        assert_eq!(r[0].comment, "lume: lume0 to virbr0 as libvirt decides");
        assert!(is_lume_comment(&r[0].comment));
        assert!(!is_lume_comment("lume: lume0 to virbr0 as anyone decides"));
        assert!(!is_lume_comment(
            "lume: lume0 to bad\"name as docker decides"
        ));
    }

    /// A VM bridged onto the user's Linux bridge br0: one accept for
    /// br0's own traffic (what br_netfilter shows at the forward hook) in
    /// every forward chain lume accommodates, below the admin's rules;
    /// nothing at input, nothing routed in or out of br0.
    #[test]
    fn a_bridged_opening_accepts_the_bridge_s_own_traffic_only() {
        let br = Opening::bridged("br0");
        for t in TARGETS {
            let r = rules_for(
                t,
                std::slice::from_ref(&br),
                &[("docker0".into(), "docker")],
            );
            match t.hook {
                Hook::Forward => {
                    assert_eq!(
                        r,
                        [Rule {
                            comment: "lume: br0 bridged".into(),
                            body: "iifname \"br0\" oifname \"br0\" accept".into(),
                        }],
                        "{t}"
                    );
                    assert!(is_lume_comment(&r[0].comment));
                }
                Hook::Input => assert!(r.is_empty(), "{t}"),
            }
        }
        // A VM bridged onto Docker's own bridge gets no accept: Docker's
        // isolation between its containers stays Docker's.
        let t = &TARGETS[0];
        assert!(
            rules_for(
                t,
                &[Opening::bridged("docker0")],
                &[("docker0".into(), "docker")]
            )
            .is_empty()
        );
        assert!(
            rules_for(
                t,
                &[Opening::bridged("virbr0")],
                &[("virbr0".into(), "libvirt")]
            )
            .is_empty()
        );
        // With Docker's rules (an admin's rule in DOCKER-USER first), it
        // goes below the admin's rule, before Docker's final RETURN.
        let admin = without_lume(DOCKER).replace(
            r#"{"rule":{"family":"ip","table":"filter","chain":"DOCKER-USER","handle":12,"#,
            r#"{"rule":{"family":"ip","table":"filter","chain":"DOCKER-USER","handle":30,"expr":[{"match":{"op":"==","left":{"meta":{"key":"iifname"}},"right":"eth9"}},{"drop":null}]}},
      {"rule":{"family":"ip","table":"filter","chain":"DOCKER-USER","handle":12,"#,
        );
        let p = plan(&Ruleset::parse(&admin), std::slice::from_ref(&br));
        assert_eq!(
            p.commands,
            [
                "insert rule ip filter DOCKER-USER position 12 iifname \"br0\" oifname \"br0\" accept comment \"lume: br0 bridged\""
            ]
        );
        // NAT and bridged together: each keeps its own rules; the last VM
        // bridged onto br0 gone, only br0's accept goes.
        let both = [nat()[0].clone(), br.clone()];
        let p = plan(&Ruleset::parse(DOCKER), &both);
        assert!(
            p.commands.iter().any(|c| c.contains("lume: lume0 egress")),
            "{:?}",
            p.commands
        );
        assert!(p.commands.iter().any(|c| c.contains("lume: br0 bridged")));
        // A drop of no tool's own after DOCKER-USER (a kill switch appended
        // to FORWARD): lume's accept would bypass it, so it stays out.
        let ks = Rs::new()
            .base("filter", "FORWARD", "forward", "drop")
            .chain("filter", "DOCKER-USER")
            .rule("filter", "FORWARD", 1, &[v("jump DOCKER-USER")])
            .rule("filter", "FORWARD", 2, &[v("reject")])
            .parse();
        assert_eq!(plan(&ks, std::slice::from_ref(&br)), Plan::default());
        let drops = foreign_drops(&ks);
        let f = drops[0].findings(&[], true);
        assert!(f.is_empty(), "no NAT bridge, nothing of lume's: {f:?}");
    }

    #[test]
    fn docker_drop_is_accommodated_and_a_kill_switch_is_not() {
        let drops = foreign_drops(&Ruleset::parse(DOCKER));
        assert_eq!(drops.len(), 2, "{drops:?}");
        let docker = drops.iter().find(|d| d.table == "filter").unwrap();
        assert_eq!(docker.how, "policy drop");
        assert!(docker.affects(&["lume0"]), "lume's own rules do not count");
        assert_eq!(
            docker.accommodated_for(&["lume0"]).as_deref(),
            Some("Docker's chain ip filter DOCKER-USER")
        );
        assert_eq!(docker.accommodated_for(&["lume0", "lume-host0"]), None);
        assert_eq!(
            docker.tool_chain.as_deref(),
            Some("Docker's chain ip filter DOCKER-USER")
        );
        let ks = drops.iter().find(|d| d.table == "killswitch").unwrap();
        assert!(ks.affects(&["lume0"]));
        assert_eq!(ks.accommodated_for(&["lume0"]), None);
        assert_eq!(ks.tool_chain, None);
        assert_eq!(
            ks.to_string(),
            "table inet killswitch chain fwd (forward hook): policy drop"
        );
    }

    #[test]
    fn only_drops_that_may_match_the_bridge_affect_it() {
        let drop_in = |rules: Rs| {
            let drops = foreign_drops(&rules.parse());
            drops.into_iter().find(|d| d.table == "ks").unwrap()
        };
        // Accepts naming the bridge, under a policy drop: not affected.
        let ks = drop_in(
            Rs::new()
                .base("ks", "fwd", "forward", "drop")
                .rule("ks", "fwd", 1, &[iif("lume0"), v("accept")])
                .rule("ks", "fwd", 2, &[oif("lume0"), v("accept")]),
        );
        assert!(!ks.affects(&["lume0"]));
        // A drop naming the bridge (before the accept) does, whatever else names it.
        let ks = drop_in(
            Rs::new()
                .base("ks", "fwd", "forward", "drop")
                .rule(
                    "ks",
                    "fwd",
                    1,
                    &[iif("lume0"), daddr("192.0.2.7"), v("drop")],
                )
                .rule("ks", "fwd", 2, &[iif("lume0"), v("accept")])
                .rule("ks", "fwd", 3, &[oif("lume0"), v("accept")]),
        );
        assert!(ks.affects(&["lume0"]));
        // A counter or a log naming it is no drop; a drop of other interfaces neither.
        let ks = drop_in(
            Rs::new()
                .base("ks", "fwd", "forward", "accept")
                .rule(
                    "ks",
                    "fwd",
                    1,
                    &[iif("lume0"), r#"{"counter":null}"#.into()],
                )
                .rule("ks", "fwd", 2, &[iif("eth9"), oif("eth8"), v("drop")])
                .rule("ks", "fwd", 3, &[oif("eth9"), iif("wlan0"), v("drop")]),
        );
        assert!(!ks.affects(&["lume0"]));
        // `iifname "eth9" drop` would drop replies from eth9 into lume0.
        let ks = drop_in(Rs::new().base("ks", "fwd", "forward", "accept").rule(
            "ks",
            "fwd",
            1,
            &[iif("eth9"), v("drop")],
        ));
        assert!(ks.affects(&["lume0"]));
        // Followed through jumps: into a chain that drops, and a goto.
        let ks = drop_in(
            Rs::new()
                .base("ks", "fwd", "forward", "accept")
                .chain("ks", "a")
                .chain("ks", "b")
                .rule("ks", "fwd", 1, &[oif("lume0"), v("jump a")])
                .rule("ks", "a", 2, &[v("goto b")])
                .rule("ks", "b", 3, &[v("reject")]),
        );
        assert_eq!(ks.how, "a rule in chain b drops (handle 3)");
        assert!(ks.affects(&["lume0"]));
        // … but not through a jump whose own condition excludes the bridge.
        let ks = drop_in(
            Rs::new()
                .base("ks", "fwd", "forward", "accept")
                .chain("ks", "a")
                .rule("ks", "fwd", 1, &[iif("eth9"), oif("eth8"), v("jump a")])
                .rule("ks", "a", 2, &[v("drop")]),
        );
        assert!(!ks.affects(&["lume0"]));
        // A loop ends at the depth limit.
        let ks = drop_in(
            Rs::new()
                .base("ks", "fwd", "forward", "drop")
                .chain("ks", "a")
                .rule("ks", "fwd", 1, &[v("jump a")])
                .rule("ks", "a", 2, &[v("jump a")]),
        );
        assert!(ks.affects(&["lume0"]), "the policy drops");
        // `ct state invalid drop` never drops lume's traffic.
        let ks = drop_in(Rs::new().base("ks", "fwd", "forward", "accept").rule(
            "ks",
            "fwd",
            1,
            &[
                r#"{"match":{"op":"in","left":{"ct":{"key":"state"}},"right":"invalid"}}"#.into(),
                v("drop"),
            ],
        ));
        assert!(!ks.affects(&["lume0"]));
    }

    #[test]
    fn the_user_s_own_accepts_in_a_tool_s_chain_are_recognised() {
        // firewallAccommodation: false and the user's rules in DOCKER-USER.
        let user = without_lume(DOCKER).replace(
            r#"{"rule":{"family":"ip","table":"filter","chain":"DOCKER-USER","handle":12,"#,
            r#"{"rule":{"family":"ip","table":"filter","chain":"DOCKER-USER","handle":30,"expr":[{"match":{"op":"==","left":{"meta":{"key":"iifname"}},"right":"lume0"}},{"counter":null},{"accept":null}]}},
      {"rule":{"family":"ip","table":"filter","chain":"DOCKER-USER","handle":31,"expr":[{"match":{"op":"==","left":{"meta":{"key":"iifname"}},"right":"eth9"}},{"counter":null},{"drop":null}]}},
      {"rule":{"family":"ip","table":"filter","chain":"DOCKER-USER","handle":12,"#,
        );
        let drops = foreign_drops(&Ruleset::parse(&user));
        let docker = drops.iter().find(|d| d.table == "filter").unwrap();
        assert_eq!(docker.accommodated_for(&["lume0"]), None);
        assert_eq!(
            docker.user_accepted_for(&["lume0"]).as_deref(),
            Some("Docker's chain ip filter DOCKER-USER")
        );
        assert_eq!(
            docker.user_accepted_for(&["eth9"]),
            None,
            "a drop is no accept"
        );
        assert_eq!(docker.user_accepted_for(&["lume0", "lume-host0"]), None);
        // lume's own rules are not the user's.
        let lume = foreign_drops(&Ruleset::parse(DOCKER));
        let docker = lume.iter().find(|d| d.table == "filter").unwrap();
        assert_eq!(docker.user_accepted_for(&["lume0"]), None);
        let ks = lume.iter().find(|d| d.table == "killswitch").unwrap();
        assert_eq!(ks.user_accepted_for(&["lume0"]), None);
    }

    #[test]
    fn only_comments_lume_writes_are_lume_s() {
        for t in TARGETS {
            for r in rules_for(t, &nat(), &[("docker0".to_string(), "docker")]) {
                assert!(is_lume_comment(&r.comment), "{}", r.comment);
            }
        }
        assert!(!is_lume_comment("lume: my own rule for the lab"));
        assert!(!is_lume_comment("lume0 egress"));
        assert!(is_lume_comment(
            "lume: lume0 to container networks as docker decides"
        ));
        // Someone else's rule commented like lume's, in a chain lume does not use, stays.
        let theirs = DOCKER.replace(
            "\"chain\":\"DOCKER-USER\",\"handle\":12,",
            "\"chain\":\"DOCKER\",\"handle\":12,\"comment\":\"lume: keep me\",",
        );
        assert_ne!(theirs, DOCKER);
        assert_eq!(plan(&Ruleset::parse(&theirs), &nat()), Plan::default());
        // A rule commented like lume's in a table lume does not know stays.
        let ks = r#"{"nftables":[
          {"chain":{"family":"inet","table":"killswitch","name":"fwd","handle":1,"type":"filter","hook":"forward","prio":0,"policy":"drop"}},
          {"rule":{"family":"inet","table":"killswitch","chain":"fwd","handle":7,"comment":"lume: lume0 egress","expr":[{"accept":null}]}}]}"#;
        assert_eq!(plan(&Ruleset::parse(ks), &nat()), Plan::default());
    }

    #[test]
    fn input_chains_get_dhcp_and_dns_to_the_gateway_only() {
        let ufw_in = TARGETS
            .iter()
            .find(|t| t.chain == "ufw-user-input")
            .unwrap();
        let r = rules_for(ufw_in, &[nat()[0].clone(), host()], &[]);
        let bodies: Vec<&str> = r.iter().map(|r| r.body.as_str()).collect();
        assert_eq!(
            bodies,
            [
                "iifname \"lume0\" ip daddr 203.0.113.1 udp dport 67 accept",
                "iifname \"lume0\" ip daddr 255.255.255.255 udp dport 67 accept",
                "iifname \"lume0\" ip daddr 203.0.113.1 udp dport 53 accept",
                "iifname \"lume0\" ip daddr 203.0.113.1 tcp dport 53 accept",
                "iifname \"lume-host0\" ip daddr 192.0.2.1 udp dport 67 accept",
                "iifname \"lume-host0\" ip daddr 255.255.255.255 udp dport 67 accept",
            ]
        );
        let fwd = TARGETS
            .iter()
            .find(|t| t.chain == "ufw-user-forward")
            .unwrap();
        assert!(
            rules_for(fwd, &[host()], &[]).is_empty(),
            "host-only never forwards"
        );
        // ufw's chains share FORWARD with Docker's jumps: a guest's
        // connection to a container goes back to Docker's and ufw's rules
        // there too, not through lume's egress accept.
        assert_eq!(
            rules_for(fwd, &nat(), &[("docker0".into(), "docker")])
                .iter()
                .map(|r| r.body.as_str())
                .collect::<Vec<_>>(),
            [
                "iifname \"lume0\" oifname \"docker0\" return",
                "iifname \"lume0\" accept",
                "oifname \"lume0\" meta mark and 0x01000000 == 0x01000000 accept",
            ]
        );
    }

    #[test]
    fn firewalld_s_accepts_go_before_its_final_reject() {
        let rs = Ruleset::parse(
            r#"{"nftables":[
          {"chain":{"family":"inet","table":"firewalld","name":"filter_INPUT","type":"filter","hook":"input","prio":10,"policy":"accept"}},
          {"chain":{"family":"inet","table":"firewalld","name":"filter_INPUT_ZONES"}},
          {"rule":{"family":"inet","table":"firewalld","chain":"filter_INPUT","handle":3,"expr":[{"jump":{"target":"filter_INPUT_ZONES"}}]}},
          {"rule":{"family":"inet","table":"firewalld","chain":"filter_INPUT","handle":4,"expr":[{"reject":{"type":"icmpx","expr":"admin-prohibited"}}]}}]}"#,
        );
        let p = plan(&rs, &[host()]);
        assert_eq!(
            p.commands,
            [
                "insert rule inet firewalld filter_INPUT position 4 iifname \"lume-host0\" ip daddr 192.0.2.1 udp dport 67 accept comment \"lume: lume-host0 dhcp\"",
                "insert rule inet firewalld filter_INPUT position 4 iifname \"lume-host0\" ip daddr 255.255.255.255 udp dport 67 accept comment \"lume: lume-host0 dhcp broadcast\"",
            ]
        );
        let drops = foreign_drops(&rs);
        let f = drops[0].findings(&["lume-host0"], true);
        assert!(
            matches!(&f[..], [Finding { kind: FindingKind::Accommodated { tool, .. }, .. }] if tool == "firewalld"),
            "{f:?}"
        );
    }

    /// firewalld's own rules before the place of lume's accepts (its
    /// `ct state invalid drop`, its reject of IPv6 destinations no host
    /// routes) are firewalld's policy, not "a rule of yours".
    #[test]
    fn firewalld_s_own_rules_before_lume_s_accepts_are_not_the_user_s() {
        let rs = Ruleset::parse(
            r#"{"nftables":[
          {"chain":{"family":"inet","table":"firewalld","name":"filter_FORWARD","type":"filter","hook":"forward","prio":10,"policy":"accept"}},
          {"rule":{"family":"inet","table":"firewalld","chain":"filter_FORWARD","handle":29,"expr":[{"match":{"op":"in","left":{"ct":{"key":"state"}},"right":"invalid"}},{"drop":null}]}},
          {"rule":{"family":"inet","table":"firewalld","chain":"filter_FORWARD","handle":31,"expr":[{"match":{"op":"==","left":{"payload":{"protocol":"ip6","field":"daddr"}},"right":{"prefix":{"addr":"2002::","len":24}}}},{"reject":{"type":"icmpv6","expr":"addr-unreachable"}}]}},
          {"rule":{"family":"inet","table":"firewalld","chain":"filter_FORWARD","handle":33,"expr":[{"reject":{"type":"icmpx","expr":"admin-prohibited"}}]}}]}"#,
        );
        let drops = foreign_drops(&rs);
        let f = drops[0].findings(&["lume0"], true);
        assert!(
            f.iter().all(
                |f| matches!(&f.kind, FindingKind::Accommodated { tool, .. } if tool == "firewalld")
            ),
            "{f:?}"
        );
        assert!(f.iter().any(|f| f.rule.contains("handle 33")), "{f:?}");
    }
}
