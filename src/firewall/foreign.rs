//! Accommodation of other tools' firewalls. An accept in lume's own table
//! does not stop another base chain at the same hook from dropping: every
//! base chain must accept. Docker (`FORWARD` policy drop in iptables-nft's
//! `ip filter`), ufw (`FORWARD` and `INPUT` policy drop) and firewalld (a
//! final reject in `inet firewalld`'s `filter_FORWARD` and `filter_INPUT`)
//! each have a place meant for other software's accepts; lume puts narrow
//! accepts for its own bridges there, each carrying a comment that starts
//! with [`COMMENT_PREFIX`], so it finds and removes exactly its own.
//!
//! The rules stay readable by iptables-nft (Docker and ufw run `iptables`
//! against those tables, and iptables 1.8.9 calls a table holding native
//! `ct` expressions incompatible and stops working on it). So the conntrack
//! conditions (replies, DNAT'd published ports) are decided in lume's own
//! table, which sets [`MARK`] on those packets at a priority before every
//! filter chain, and the rule in the other tool's chain matches the bridge
//! and the mark — both understood by iptables-nft.
//!
//! Chains of tables lume does not know (a VPN kill switch) are never touched.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde_json::Value;

/// Every rule lume puts in another tool's chain has a comment starting so.
pub const COMMENT_PREFIX: &str = "lume: ";

/// The packet mark bit lume's own table sets on replies and DNAT'd traffic
/// into its NAT bridge (outside the bits kube-proxy, Tailscale and wg-quick use).
pub const MARK: u32 = 0x0100_0000;

/// The hook a chain of another tool filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Forward,
    Input,
}

/// A chain another tool provides for other software's accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub tool: &'static str,
    pub family: &'static str,
    pub table: &'static str,
    pub chain: &'static str,
    pub hook: Hook,
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
/// accepts), and firewalld's filter base chains at their top.
pub const TARGETS: &[Target] = &[
    Target {
        tool: "Docker",
        family: "ip",
        table: "filter",
        chain: "DOCKER-USER",
        hook: Hook::Forward,
    },
    Target {
        tool: "Docker",
        family: "ip6",
        table: "filter",
        chain: "DOCKER-USER",
        hook: Hook::Forward,
    },
    Target {
        tool: "ufw",
        family: "ip",
        table: "filter",
        chain: "ufw-user-forward",
        hook: Hook::Forward,
    },
    Target {
        tool: "ufw",
        family: "ip6",
        table: "filter",
        chain: "ufw6-user-forward",
        hook: Hook::Forward,
    },
    Target {
        tool: "ufw",
        family: "ip",
        table: "filter",
        chain: "ufw-user-input",
        hook: Hook::Input,
    },
    Target {
        tool: "firewalld",
        family: "inet",
        table: "firewalld",
        chain: "filter_FORWARD",
        hook: Hook::Forward,
    },
    Target {
        tool: "firewalld",
        family: "inet",
        table: "firewalld",
        chain: "filter_INPUT",
        hook: Hook::Input,
    },
];

/// A lume bridge whose traffic other tools' chains must let through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opening {
    pub bridge: String,
    /// NAT (forwarded out, replies and published ports in, DHCP and DNS to
    /// the host) or host-only (DHCP to the host only).
    pub nat: bool,
}

/// One rule for another tool's chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub comment: String,
    pub body: String,
}

/// The rules lume wants in `target`, in order, for `openings`.
pub fn rules_for(target: &Target, openings: &[Opening]) -> Vec<Rule> {
    let mut out = Vec::new();
    let mut add = |bridge: &str, what: &str, body: String| {
        out.push(Rule {
            comment: format!("{COMMENT_PREFIX}{bridge} {what}"),
            body,
        })
    };
    for o in openings {
        let b = &o.bridge;
        match target.hook {
            Hook::Forward if o.nat => {
                if target.tool == "Docker" {
                    // Containers are Docker's to guard: a guest's new
                    // connections to them go on through Docker's own chains
                    // (published ports only), as a LAN neighbour's would.
                    add(
                        b,
                        "to docker0 as docker decides",
                        format!("iifname \"{b}\" oifname \"docker0\" return"),
                    );
                    add(
                        b,
                        "to container networks as docker decides",
                        format!("iifname \"{b}\" oifname \"br-*\" return"),
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
                add(b, "dhcp", format!("iifname \"{b}\" udp dport 67 accept"));
                if o.nat {
                    add(b, "dns", format!("iifname \"{b}\" udp dport 53 accept"));
                    add(
                        b,
                        "dns over tcp",
                        format!("iifname \"{b}\" tcp dport 53 accept"),
                    );
                }
            }
        }
    }
    out
}

/// What each of lume's rules is for, the end of its comment.
const PURPOSES: [&str; 7] = [
    "to docker0 as docker decides",
    "to container networks as docker decides",
    "egress",
    "replies and published ports",
    "dhcp",
    "dns",
    "dns over tcp",
];

/// Whether a comment is exactly one lume writes (`lume: lume0 egress`): a
/// rule someone else commented `lume: …` is not lume's to remove.
pub fn is_lume_comment(comment: &str) -> bool {
    comment
        .strip_prefix(COMMENT_PREFIX)
        .and_then(|rest| rest.split_once(' '))
        .is_some_and(|(bridge, what)| {
            crate::network::mode::valid_ifname(bridge) && PURPOSES.contains(&what)
        })
}

/// A chain of the ruleset as `nft -j list ruleset` shows it.
#[derive(Debug, Clone, Default)]
struct Chain {
    hook: Option<String>,
    policy: Option<String>,
    /// (handle, comment) of each rule, in order.
    rules: Vec<(u64, Option<String>)>,
    /// Chains its rules jump or go to.
    calls: Vec<String>,
    /// Interfaces other rules (not lume's) match on.
    interfaces: Vec<String>,
    /// The handle of its first rule that drops or rejects.
    drops: Option<u64>,
    /// Interfaces that rules of someone else's (not lume's) ending in
    /// accept match on (`iptables -I DOCKER-USER -i lume0 -j ACCEPT`).
    accepts: Vec<String>,
}

type Key = (String, String, String);

/// The ruleset's chains, keyed by (family, table, chain).
#[derive(Debug, Default)]
pub struct Ruleset {
    chains: BTreeMap<Key, Chain>,
}

fn key3(family: &str, table: &str, chain: &str) -> Key {
    (family.to_string(), table.to_string(), chain.to_string())
}

impl Ruleset {
    /// Parses `nft -j list ruleset`; anything unreadable is an empty ruleset.
    pub fn parse(json: &str) -> Self {
        let mut rs = Self::default();
        let Ok(v) = serde_json::from_str::<Value>(json) else {
            return rs;
        };
        let items = v["nftables"].as_array().cloned().unwrap_or_default();
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
                let e = rs
                    .chains
                    .entry((s(&r["family"]), s(&r["table"]), s(&r["chain"])))
                    .or_default();
                let comment = r["comment"].as_str().map(str::to_string);
                let handle = r["handle"].as_u64().unwrap_or(0);
                let lume = comment.as_deref().is_some_and(is_lume_comment);
                let exprs = r["expr"].as_array().cloned().unwrap_or_default();
                let accepts = exprs.iter().any(|x| x.get("accept").is_some());
                for x in &exprs {
                    for verb in ["jump", "goto"] {
                        if let Some(t) = x[verb]["target"].as_str() {
                            e.calls.push(t.to_string());
                        }
                    }
                    // `iifname "lume0"`: {"match": {"left": {"meta": {"key": "iifname"}}, "right": "lume0"}}
                    let m = &x["match"];
                    if !lume
                        && matches!(
                            m["left"]["meta"]["key"].as_str(),
                            Some("iifname" | "oifname")
                        )
                        && let Some(name) = m["right"].as_str()
                    {
                        e.interfaces.push(name.to_string());
                        if accepts && !e.accepts.iter().any(|a| a == name) {
                            e.accepts.push(name.to_string());
                        }
                    }
                }
                if e.drops.is_none()
                    && exprs
                        .iter()
                        .any(|x| x.get("drop").is_some() || x.get("reject").is_some())
                {
                    e.drops = Some(handle);
                }
                e.rules.push((handle, comment));
            }
        }
        rs
    }

    /// Whether any chain lume accommodates exists (Docker, ufw or firewalld
    /// is present).
    pub fn tools_present(&self) -> bool {
        TARGETS
            .iter()
            .any(|t| self.chain(t.family, t.table, t.chain).is_some())
    }

    fn chain(&self, family: &str, table: &str, chain: &str) -> Option<&Chain> {
        self.chains.get(&key3(family, table, chain))
    }

    /// Chains reachable from a chain (itself included) through jumps and gotos.
    fn reachable(&self, family: &str, table: &str, chain: &str) -> Vec<String> {
        let mut seen = BTreeSet::from([chain.to_string()]);
        let mut queue = VecDeque::from([chain.to_string()]);
        while let Some(c) = queue.pop_front() {
            if let Some(ch) = self.chain(family, table, &c) {
                for next in &ch.calls {
                    if seen.insert(next.clone()) {
                        queue.push_back(next.clone());
                    }
                }
            }
        }
        seen.into_iter().collect()
    }

    fn lume_rules(&self) -> impl Iterator<Item = (&Key, u64, &str)> {
        self.chains
            .iter()
            .filter(|((f, t, _), _)| !(f == "inet" && t == super::nft::TABLE))
            .flat_map(|(k, c)| {
                c.rules.iter().filter_map(move |(h, comment)| {
                    comment
                        .as_deref()
                        .filter(|c| is_lume_comment(c))
                        .map(|c| (k, *h, c))
                })
            })
    }
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

/// What must change so that exactly `rules_for(target, openings)` sit at
/// the top of every target chain that exists, and no rule of lume's is left
/// anywhere else (with no openings: nothing of lume's anywhere).
pub fn plan(rs: &Ruleset, openings: &[Opening]) -> Plan {
    let mut p = Plan::default();
    let mut handled: BTreeSet<Key> = BTreeSet::new();
    for t in TARGETS {
        let Some(chain) = rs.chain(t.family, t.table, t.chain) else {
            continue;
        };
        handled.insert(key3(t.family, t.table, t.chain));
        let want = rules_for(t, openings);
        let ours: Vec<(u64, &str)> = chain
            .rules
            .iter()
            .filter_map(|(h, c)| c.as_deref().filter(|c| is_lume_comment(c)).map(|c| (*h, c)))
            .collect();
        // In place: lume's rules are exactly the wanted ones and the chain's first.
        let head: Vec<Option<&str>> = chain
            .rules
            .iter()
            .take(want.len())
            .map(|(_, c)| c.as_deref())
            .collect();
        let in_place = ours.len() == want.len()
            && head
                .iter()
                .zip(&want)
                .all(|(have, w)| *have == Some(w.comment.as_str()));
        if in_place {
            continue;
        }
        for (h, _) in &ours {
            p.commands.push(format!(
                "delete rule {} {} {} handle {h}",
                t.family, t.table, t.chain
            ));
        }
        // `insert` puts a rule first: insert the last one first.
        for r in want.iter().rev() {
            p.commands.push(format!(
                "insert rule {} {} {} {} comment \"{}\"",
                t.family, t.table, t.chain, r.body, r.comment
            ));
        }
        p.changes.push(match (ours.is_empty(), want.is_empty()) {
            (true, _) => format!("inserted lume's accepts at the top of {t}"),
            (false, true) => format!("removed lume's accepts from {t}"),
            (false, false) => format!("put lume's accepts back at the top of {t}"),
        });
    }
    // Rules of lume's anywhere else (a chain lume no longer uses) go.
    let mut stray: BTreeMap<&Key, Vec<u64>> = BTreeMap::new();
    // Only in the tables of the tools lume accommodates: a table lume does
    // not know (a kill switch) is never touched, whatever its comments say.
    for (k, h, _) in rs.lume_rules() {
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
    /// `policy drop`, or the rule that drops.
    pub how: String,
    /// Interface names the chain's own rules (not lume's) match on: an
    /// accept for a lume bridge means its owner lets lume's traffic through.
    pub interfaces: Vec<String>,
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
}

impl ForeignDrop {
    /// Whether this chain would drop traffic of `bridges` (it does not when
    /// its own rules name one of them).
    pub fn affects(&self, bridges: &[&str]) -> bool {
        !bridges
            .iter()
            .any(|b| self.interfaces.iter().any(|i| i == b))
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

/// Base chains with a forward or input hook, outside lume's table, whose
/// policy drops or that hold a rule ending in drop or reject; with lume's
/// accepts reachable from each.
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
        let how = if c.policy.as_deref() == Some("drop") {
            "policy drop".to_string()
        } else if let Some(h) = c.drops {
            format!("a rule drops (handle {h})")
        } else {
            continue;
        };
        let mut accommodated = Vec::new();
        let mut tool_chain = None;
        let mut user_accepts = Vec::new();
        for reach in rs.reachable(family, table, name) {
            let Some(rc) = rs.chain(family, table, &reach) else {
                continue;
            };
            let target = TARGETS
                .iter()
                .find(|t| t.family == family && t.table == table && t.chain == reach);
            if let Some(t) = target {
                tool_chain.get_or_insert_with(|| t.to_string());
                for i in &rc.accepts {
                    let entry = (t.to_string(), i.clone());
                    if !user_accepts.contains(&entry) {
                        user_accepts.push(entry);
                    }
                }
            }
            let tool = target.map(|t| t.tool).unwrap_or("another tool");
            for (_, comment) in &rc.rules {
                if let Some(bridge) = comment
                    .as_deref()
                    .filter(|c| is_lume_comment(c))
                    .and_then(|c| c.strip_prefix(COMMENT_PREFIX))
                    .and_then(|c| c.split(' ').next())
                {
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
            interfaces: c.interfaces.clone(),
            accommodated,
            tool_chain,
            user_accepts,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Docker 20–26 on iptables-nft, as `nft -j list ruleset` shows it
    /// (abridged to the filter table), with lume's rules in DOCKER-USER.
    const DOCKER: &str = r#"{"nftables":[
      {"table":{"family":"ip","name":"filter","handle":1}},
      {"chain":{"family":"ip","table":"filter","name":"FORWARD","handle":2,"type":"filter","hook":"forward","prio":0,"policy":"drop"}},
      {"chain":{"family":"ip","table":"filter","name":"DOCKER-USER","handle":3}},
      {"chain":{"family":"ip","table":"filter","name":"DOCKER","handle":4}},
      {"rule":{"family":"ip","table":"filter","chain":"FORWARD","handle":10,"expr":[{"counter":null},{"jump":{"target":"DOCKER-USER"}}]}},
      {"rule":{"family":"ip","table":"filter","chain":"FORWARD","handle":11,"expr":[{"match":{"op":"==","left":{"meta":{"key":"oifname"}},"right":"docker0"}},{"counter":null},{"jump":{"target":"DOCKER"}}]}},
      {"rule":{"family":"ip","table":"filter","chain":"DOCKER-USER","handle":19,"comment":"lume: lume0 to docker0 as docker decides","expr":[{"return":null}]}},
      {"rule":{"family":"ip","table":"filter","chain":"DOCKER-USER","handle":20,"comment":"lume: lume0 to container networks as docker decides","expr":[{"return":null}]}},
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
        }]
    }

    #[test]
    fn rules_in_place_need_nothing_and_a_flushed_chain_gets_them_back() {
        let rs = Ruleset::parse(DOCKER);
        assert!(rs.tools_present());
        assert!(!Ruleset::parse(r#"{"nftables":[]}"#).tools_present());
        assert_eq!(plan(&rs, &nat()), Plan::default());
        // Docker restarted: DOCKER-USER flushed and its RETURN put back.
        let flushed = DOCKER
            .lines()
            .filter(|l| !l.contains("\"comment\":\"lume: "))
            .collect::<Vec<_>>()
            .join("\n");
        let p = plan(&Ruleset::parse(&flushed), &nat());
        assert_eq!(
            p.commands,
            [
                "insert rule ip filter DOCKER-USER oifname \"lume0\" meta mark and 0x01000000 == 0x01000000 accept comment \"lume: lume0 replies and published ports\"",
                "insert rule ip filter DOCKER-USER iifname \"lume0\" accept comment \"lume: lume0 egress\"",
                "insert rule ip filter DOCKER-USER iifname \"lume0\" oifname \"br-*\" return comment \"lume: lume0 to container networks as docker decides\"",
                "insert rule ip filter DOCKER-USER iifname \"lume0\" oifname \"docker0\" return comment \"lume: lume0 to docker0 as docker decides\"",
            ]
        );
        assert_eq!(
            p.changes,
            ["inserted lume's accepts at the top of Docker's chain ip filter DOCKER-USER"]
        );
    }

    #[test]
    fn rules_below_a_return_are_moved_and_the_last_vm_removes_them() {
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
        assert_eq!(p.commands.len(), 8, "{p:?}");
        assert!(
            p.commands[..4].contains(&"delete rule ip filter DOCKER-USER handle 31".to_string()),
            "{p:?}"
        );
        assert!(p.changes[0].starts_with("put lume's accepts back"));
        let gone = plan(&Ruleset::parse(DOCKER), &[]);
        assert_eq!(
            gone.commands,
            [
                "delete rule ip filter DOCKER-USER handle 19",
                "delete rule ip filter DOCKER-USER handle 20",
                "delete rule ip filter DOCKER-USER handle 21",
                "delete rule ip filter DOCKER-USER handle 22"
            ]
        );
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
    fn the_user_s_own_accepts_in_a_tool_s_chain_are_recognised() {
        // firewallAccommodation: false and the user's rules in DOCKER-USER.
        let user = DOCKER
            .lines()
            .filter(|l| !l.contains("\"comment\":\"lume: "))
            .collect::<Vec<_>>()
            .join("\n")
            .replace(
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
            for r in rules_for(t, &nat()) {
                assert!(is_lume_comment(&r.comment), "{}", r.comment);
            }
        }
        assert!(!is_lume_comment("lume: my own rule for the lab"));
        assert!(!is_lume_comment("lume0 egress"));
        // Someone else's rule commented like lume's, in a chain lume does not use, stays.
        let theirs = DOCKER.replace(
            "\"chain\":\"DOCKER-USER\",\"handle\":12,",
            "\"chain\":\"DOCKER\",\"handle\":12,\"comment\":\"lume: keep me\",",
        );
        assert_ne!(theirs, DOCKER);
        assert_eq!(plan(&Ruleset::parse(&theirs), &nat()), Plan::default());
    }

    #[test]
    fn docker_containers_stay_behind_docker_s_own_chains() {
        let docker = TARGETS.iter().find(|t| t.tool == "Docker").unwrap();
        let bodies: Vec<String> = rules_for(docker, &nat())
            .into_iter()
            .map(|r| r.body)
            .collect();
        assert_eq!(
            bodies[..3],
            [
                "iifname \"lume0\" oifname \"docker0\" return",
                "iifname \"lume0\" oifname \"br-*\" return",
                "iifname \"lume0\" accept",
            ]
        );
        let ufw = TARGETS
            .iter()
            .find(|t| t.chain == "ufw-user-forward")
            .unwrap();
        assert!(
            rules_for(ufw, &nat())
                .iter()
                .all(|r| !r.body.contains("return")),
            "only Docker's chain"
        );
        // A rule commented like lume's in a table lume does not know stays.
        let ks = r#"{"nftables":[
          {"chain":{"family":"inet","table":"killswitch","name":"fwd","handle":1,"type":"filter","hook":"forward","prio":0,"policy":"drop"}},
          {"rule":{"family":"inet","table":"killswitch","chain":"fwd","handle":7,"comment":"lume: lume0 egress","expr":[{"accept":null}]}}]}"#;
        assert_eq!(plan(&Ruleset::parse(ks), &nat()), Plan::default());
    }

    #[test]
    fn input_chains_get_dhcp_and_dns_only() {
        let ufw_in = TARGETS
            .iter()
            .find(|t| t.chain == "ufw-user-input")
            .unwrap();
        let host = Opening {
            bridge: "lume-host0".into(),
            nat: false,
        };
        let r = rules_for(ufw_in, &[nat()[0].clone(), host.clone()]);
        let bodies: Vec<&str> = r.iter().map(|r| r.body.as_str()).collect();
        assert_eq!(
            bodies,
            [
                "iifname \"lume0\" udp dport 67 accept",
                "iifname \"lume0\" udp dport 53 accept",
                "iifname \"lume0\" tcp dport 53 accept",
                "iifname \"lume-host0\" udp dport 67 accept"
            ]
        );
        let fwd = TARGETS
            .iter()
            .find(|t| t.chain == "ufw-user-forward")
            .unwrap();
        assert!(
            rules_for(fwd, &[host]).is_empty(),
            "host-only never forwards"
        );
    }
}
