//! nftables backend: lume's two tables, `inet lume` and `bridge lume`,
//! written whole as a single nft transaction (`add table; delete table;
//! table { ... }`), so they are replaced whole or not at all, or changed in
//! place by one transaction of a VM's own elements ([`change_script`]) —
//! through libnftables in lume's process ([`super::libnft`]), or `nft -f -`
//! where the library is not available.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use super::foreign::{self, Ruleset};
use super::{
    Accommodated, FirewallDriver, FirewallError, FirewallState, ForeignDrop, Opening,
    RulesetGeneration, Tables,
};

/// The table that holds every lume rule.
pub const TABLE: &str = "lume";

/// How many IPv6 sources a guest's port may use besides its reserved ones
/// at a time, and how long an unused one keeps its place.
pub const SOURCES6: usize = 16;
const SOURCES6_TIMEOUT: &str = "10m";

/// The nftables driver.
#[derive(Debug, Default, Clone, Copy)]
pub struct Nft;

/// Runs nft with `args` (options `-j`, `-a`, `-s`, then a command, or
/// `-f -` with the script in `stdin`): through libnftables in this process
/// where it can ([`super::libnft`]), else as an `nft` process.
fn nft(args: &[&str], stdin: Option<&str>) -> Result<String, FirewallError> {
    let mut flags = 0;
    let mut rest = args;
    while let Some((first, more)) = rest.split_first() {
        match *first {
            "-j" => flags |= super::libnft::OUTPUT_JSON,
            "-a" => flags |= super::libnft::OUTPUT_HANDLE,
            "-s" => flags |= super::libnft::OUTPUT_STATELESS,
            _ => break,
        }
        rest = more;
    }
    let cmd = match (rest, stdin) {
        (["-f", "-"], Some(script)) => Some(script.to_string()),
        (words, None) if !words.iter().any(|w| w.starts_with('-')) => Some(words.join(" ")),
        _ => None,
    };
    if let Some(answer) = cmd.and_then(|c| super::libnft::run(flags, &c)) {
        return answer.map_err(|e| match e {
            super::libnft::LibnftError::Refused(text) => FirewallError::Rejected(text),
            e => FirewallError::Library(e),
        });
    }
    nft_process(args, stdin)
}

/// [`nft`] as an `nft` process.
fn nft_process(args: &[&str], stdin: Option<&str>) -> Result<String, FirewallError> {
    // Its own process group: a Ctrl-C meant for `lume run` must not kill an
    // nft in the middle of lume's teardown.
    let mut child = Command::new("nft")
        .process_group(0)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => FirewallError::NftMissing,
            _ => FirewallError::Io(e),
        })?;
    if let (Some(text), Some(mut input)) = (stdin, child.stdin.take()) {
        input
            .write_all(text.as_bytes())
            .map_err(FirewallError::Io)?;
    }
    let out = child.wait_with_output().map_err(FirewallError::Io)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(FirewallError::Rejected(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

/// The whole ruleset, parsed from `nft -j list ruleset`. When lume's own
/// tables are the only ones (no other tool's chains to plan around, the
/// common case), the list of tables says so for a fraction of the cost of
/// listing every rule and set, and the chains outside lume's tables, the
/// only ones a [`Ruleset`] is asked about, are none.
pub fn ruleset() -> Result<Ruleset, FirewallError> {
    if only_lume_tables(&nft(&["-j", "list", "tables"], None)?) {
        return Ok(Ruleset::default());
    }
    Ok(Ruleset::parse(&nft(&["-j", "list", "ruleset"], None)?))
}

/// Whether `nft -j list tables` lists no table but lume's own (`inet lume`
/// and `bridge lume`); an unreadable answer is not.
fn only_lume_tables(json: &str) -> bool {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
        return false;
    };
    let Some(items) = v["nftables"].as_array() else {
        return false;
    };
    items.iter().all(|item| match item.get("table") {
        Some(t) => t["name"] == TABLE && (t["family"] == "inet" || t["family"] == "bridge"),
        None => item.get("metainfo").is_some(),
    })
}

/// The nft script that replaces lume's tables with `state`'s.
pub fn script(state: &FirewallState) -> String {
    full_script(&tables(state))
}

/// lume's tables for `state` (see [`Tables`]).
pub fn tables(state: &FirewallState) -> Tables {
    let mut t = Tables::default();
    let mut forward = Vec::new();
    let mut postrouting = Vec::new();
    let mut dnat = Vec::new();
    let mut guard = Vec::new();
    let mut mark = Vec::new();
    // Nothing from a guest reaches the host's loopback, even where
    // route_localnet=1 would deliver it.
    for b in [&state.nat, &state.host].into_iter().flatten() {
        guard.push(format!(
            "iifname \"{}\" ip daddr 127.0.0.0/8 drop",
            b.bridge
        ));
        guard.push(format!("iifname \"{}\" ip6 daddr ::1 drop", b.bridge));
        // The bridge's own address (dnsmasq's DHCP and DNS) answers only its
        // guests and this host: a LAN neighbour routing to it through the
        // host would otherwise use lume's dnsmasq as its resolver.
        guard.push(format!(
            "iifname != {{ \"{}\", \"lo\" }} ip daddr {} drop",
            b.bridge,
            b.subnet.gateway()
        ));
        if let Some(p) = b.prefix6 {
            guard.push(format!(
                "iifname != {{ \"{}\", \"lo\" }} ip6 daddr {} drop",
                b.bridge,
                p.gateway()
            ));
        }
    }
    if let Some(h) = &state.host {
        // Host-only: guests reach the host and each other, nothing else.
        forward.push(format!("iifname \"{}\" drop", h.bridge));
        forward.push(format!("oifname \"{}\" drop", h.bridge));
    }
    if let Some(n) = &state.nat {
        // Guests reach each other on the link, never routed back into it
        // by the host (each such packet for a made-up address of the /64
        // would cost the host a neighbour entry); only a published port
        // of another guest is.
        forward.push(format!(
            "iifname \"{0}\" oifname \"{0}\" ct status dnat accept",
            n.bridge
        ));
        forward.push(format!("iifname \"{0}\" oifname \"{0}\" drop", n.bridge));
        forward.push(format!("iifname \"{}\" accept", n.bridge));
        forward.push(format!(
            "oifname \"{}\" ct state established,related accept",
            n.bridge
        ));
        forward.push(format!("oifname \"{}\" ct status dnat accept", n.bridge));
        if state.accommodate {
            // For the accepts in other tools' chains, which cannot match
            // conntrack state in a way iptables-nft still reads (see
            // firewall::foreign): replies and published ports into the bridge.
            let m = foreign::MARK;
            mark.push(format!(
                "oifname \"{}\" ct state established,related meta mark set meta mark or {m:#010x}",
                n.bridge
            ));
            mark.push(format!(
                "oifname \"{}\" ct status dnat meta mark set meta mark or {m:#010x}",
                n.bridge
            ));
        }
        // Nothing else gets in: a NAT guest is reached through published ports only.
        forward.push(format!("oifname \"{}\" drop", n.bridge));
        postrouting.push(format!(
            "ip saddr {} oifname != \"{}\" masquerade",
            n.subnet, n.bridge
        ));
        if let Some(p) = n.prefix6 {
            postrouting.push(format!(
                "ip6 saddr {p} oifname != \"{}\" masquerade",
                n.bridge
            ));
        }
    }
    // Published ports as two maps, looked up by two fixed rules: the
    // table loads (and is restored after a flush) in about the same time
    // whatever the number of ports, where a rule per port made it grow.
    // A port bound to one host address is looked up first; a miss in a
    // map matches nothing, so the next rule is tried.
    let mut any_addr = Vec::new();
    let mut one_addr = Vec::new();
    let mut any_addr6 = Vec::new();
    for d in &state.dnat {
        let to = format!("{} . {}", d.guest, d.guest_port);
        match d.host_ip {
            Some(ip) => one_addr.push(format!("{ip} . {} . {} : {to}", d.proto, d.host_port)),
            None => any_addr.push(format!("{} . {} : {to}", d.proto, d.host_port)),
        }
        if let (None, Some(g6)) = (d.host_ip, d.guest6) {
            any_addr6.push(format!(
                "{} . {} : {g6} . {}",
                d.proto, d.host_port, d.guest_port
            ));
        }
    }
    let mut maps = String::new();
    if !one_addr.is_empty() {
        maps.push_str(
            "  map dnat_addr {\n    type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service\n  }\n",
        );
        t.add("inet dnat_addr", one_addr);
        // Only the host's own addresses: a packet for 127.0.0.1 sent to the
        // host's MAC by a LAN neighbour never matches.
        dnat.push(
            "fib daddr type local dnat ip to ip daddr . meta l4proto . th dport map @dnat_addr"
                .to_string(),
        );
    }
    if !any_addr.is_empty() {
        maps.push_str(
            "  map dnat_any {\n    type inet_proto . inet_service : ipv4_addr . inet_service\n  }\n",
        );
        t.add("inet dnat_any", any_addr);
        dnat.push(
            "ip daddr != 127.0.0.0/8 fib daddr type local dnat ip to meta l4proto . th dport map @dnat_any"
                .to_string(),
        );
    }
    if !any_addr6.is_empty() {
        maps.push_str(
            "  map dnat_any6 {\n    type inet_proto . inet_service : ipv6_addr . inet_service\n  }\n",
        );
        t.add("inet dnat_any6", any_addr6);
        dnat.push(
            "ip6 daddr != ::1 fib daddr type local dnat ip6 to meta l4proto . th dport map @dnat_any6"
                .to_string(),
        );
    }
    let chain = |name: &str, hook: &str, body: &[String]| {
        let mut s = format!("  chain {name} {{\n    {hook}\n");
        for r in body {
            s.push_str(&format!("    {r}\n"));
        }
        s.push_str("  }\n");
        s
    };
    let mut s = format!("table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n");
    s.push_str(&maps);
    s.push_str(&chain(
        "guard",
        "type filter hook prerouting priority raw; policy accept;",
        &guard,
    ));
    if !mark.is_empty() {
        // Before every filter chain (iptables-nft's at 0, firewalld's at 10).
        s.push_str(&chain(
            "foreign_mark",
            "type filter hook forward priority filter - 10; policy accept;",
            &mark,
        ));
    }
    s.push_str(&chain(
        "forward",
        "type filter hook forward priority filter; policy accept;",
        &forward,
    ));
    s.push_str(&chain(
        "prerouting",
        "type nat hook prerouting priority dstnat; policy accept;",
        &dnat,
    ));
    s.push_str(&chain(
        "output",
        "type nat hook output priority -100; policy accept;",
        &dnat,
    ));
    s.push_str(&chain(
        "postrouting",
        "type nat hook postrouting priority srcnat; policy accept;",
        &postrouting,
    ));
    s.push_str("}\n");
    t.skeleton = s;
    bridge_tables(&state.ports, &mut t);
    t
}

/// The script that writes `t` whole: the skeleton (which replaces both
/// tables), each port's chain, then the elements (a port's chain exists
/// before the map entry that jumps to it).
fn full_script(t: &Tables) -> String {
    let mut s = t.skeleton.clone();
    s.extend(t.ports.values().cloned());
    for (key, items) in &t.elements {
        s.push_str(&element_command(
            "add",
            key,
            items.iter().map(String::as_str),
        ));
    }
    s
}

/// `VERB element FAMILY lume SET { ITEMS }`, `key` being `FAMILY SET`.
fn element_command<'a>(verb: &str, key: &str, items: impl Iterator<Item = &'a str>) -> String {
    let (family, set) = key.split_once(' ').unwrap_or((key, ""));
    let items: Vec<&str> = items.collect();
    format!(
        "{verb} element {family} {TABLE} {set} {{ {} }}\n",
        items.join(", ")
    )
}

/// The script that changes lume's tables from `from` to `to`, in one
/// transaction, when their skeletons are the same: the elements and port
/// chains that go are deleted (a map's entry by its key), then those that
/// come are added (deletions first, so that a key whose value changed is
/// free again). `None` when the skeletons differ (a network appears or
/// goes, the first published port of a kind, accommodation switched):
/// the tables are then written whole. Empty when nothing differs.
pub fn change_script(from: &Tables, to: &Tables) -> Option<String> {
    // A port chain not as this build writes it (another release's) is
    // not changed in place (its rules would be added to the old ones, or
    // deleted under names it may not have), nor is a record whose names
    // or elements are not what lume writes.
    if from.skeleton != to.skeleton
        || from
            .ports
            .iter()
            .any(|(tap, text)| *text != port_chain(tap))
        || !plausible(from)
    {
        return None;
    }
    let none = std::collections::BTreeSet::new();
    let keys: std::collections::BTreeSet<&String> =
        from.elements.keys().chain(to.elements.keys()).collect();
    let (mut s, mut added) = (String::new(), String::new());
    for key in keys {
        let old = from.elements.get(key).unwrap_or(&none);
        let new = to.elements.get(key).unwrap_or(&none);
        // A map's entry goes by its key alone.
        let mut gone = old
            .difference(new)
            .map(|e| e.split(" : ").next().unwrap_or(e))
            .peekable();
        if gone.peek().is_some() {
            s.push_str(&element_command("delete", key, gone));
        }
        let mut come = new.difference(old).map(String::as_str).peekable();
        if come.peek().is_some() {
            added.push_str(&element_command("add", key, come));
        }
    }
    for tap in from.ports.keys().filter(|t| !to.ports.contains_key(*t)) {
        let id = port_id(tap);
        s.push_str(&format!(
            "flush chain bridge {TABLE} sources6_{id}\ndelete chain bridge {TABLE} sources6_{id}\ndelete set bridge {TABLE} seen6_{id}\n"
        ));
    }
    for tap in to.ports.keys().filter(|t| !from.ports.contains_key(*t)) {
        s.push_str(&port_commands(tap));
    }
    s.push_str(&added);
    Some(s)
}

/// A guest port's own chain and set of IPv6 sources (see `limits6`).
fn port_chain(tap: &str) -> String {
    let id = port_id(tap);
    format!(
        "table bridge {TABLE} {{\n  set seen6_{id} {{\n    type ipv6_addr\n    size {SOURCES6}\n    flags dynamic,timeout\n    timeout {SOURCES6_TIMEOUT}\n  }}\n  \
         chain sources6_{id} {{\n    ip6 saddr :: return\n    update @seen6_{id} {{ ip6 saddr }}\n    ip6 saddr != @seen6_{id} drop\n  }}\n}}\n"
    )
}

/// [`port_chain`] as commands, for a change in place: the same set,
/// chain and rules, but nft fills its cache with much less for `add`
/// commands than for a `table { … }` block beside them (2.0 against
/// 4.2 ms for a second VM's start, BENCHMARKS.md finding 14).
fn port_commands(tap: &str) -> String {
    let id = port_id(tap);
    format!(
        "add set bridge {TABLE} seen6_{id} {{ type ipv6_addr; size {SOURCES6}; flags dynamic,timeout; timeout {SOURCES6_TIMEOUT}; }}\n\
         add chain bridge {TABLE} sources6_{id}\n\
         add rule bridge {TABLE} sources6_{id} ip6 saddr :: return\n\
         add rule bridge {TABLE} sources6_{id} update @seen6_{id} {{ ip6 saddr }}\n\
         add rule bridge {TABLE} sources6_{id} ip6 saddr != @seen6_{id} drop\n"
    )
}

/// The sets and maps whose elements [`tables`] lists, by `FAMILY SET`.
const ELEMENT_SETS: [&str; 17] = [
    "inet dnat_addr",
    "inet dnat_any",
    "inet dnat_any6",
    "bridge taps",
    "bridge macs",
    "bridge addrs",
    "bridge v6taps",
    "bridge sources6",
    "bridge reserved6",
    "bridge owned6",
    "bridge targets6",
    "bridge owned_targets6",
    "bridge nd_macs",
    "bridge rs_macs",
    "bridge gateways6",
    "bridge gateway_targets6",
    "bridge limits6",
];

/// Whether `t` (a record read back from the runtime directory) names only
/// lume's own sets and has elements nft reads as one element each: no
/// text of it can become another nft command.
fn plausible(t: &Tables) -> bool {
    t.elements.iter().all(|(key, items)| {
        ELEMENT_SETS.contains(&key.as_str())
            && items
                .iter()
                .all(|e| !e.is_empty() && !e.contains(['\n', ';', '{', '}', '#', ',']))
    })
}

/// A port's name in its chain's and set's names: the tap's own (lume's
/// taps are letters and digits), else `x_` and its bytes in hex (never
/// the same as a plain name, which has no `_`), so that any name the
/// kernel allows makes a valid, distinct nft name.
fn port_id(tap: &str) -> String {
    if !tap.is_empty() && tap.bytes().all(|b| b.is_ascii_alphanumeric()) {
        tap.to_string()
    } else {
        let hex: String = tap.bytes().map(|b| format!("{b:02x}")).collect();
        format!("x_{hex}")
    }
}

/// A MAC address as the 48-bit number nft compares raw payload with.
fn mac_number(mac: crate::vm::config::MacAddress) -> u64 {
    mac.0.iter().fold(0, |n, b| n << 8 | u64::from(*b))
}

/// What removes both of lume's tables, in one transaction: creating each
/// first makes its delete succeed whether or not it existed.
const REMOVE_SCRIPT: &str =
    "table inet lume\ndelete table inet lume\ntable bridge lume\ndelete table bridge lume\n";

/// lume's `bridge` table, added to `t`: every guest port of lume's bridges may send only
/// from its own MAC address, IPv4 and ARP only from the address lume
/// reserved for it (0.0.0.0 while it asks DHCP), no DHCP server replies and
/// nothing but IPv4 and ARP (no IPv6, which lume does not give there, no
/// VLAN tags to smuggle past the rules).
/// A guest can then neither take another VM's address or MAC (and with them
/// its traffic and published ports) nor pose as the gateway or DHCP server.
/// Replaced whole like the inet table; an empty list removes it.
fn bridge_tables(ports: &[crate::firewall::GuestPort], t: &mut Tables) {
    let mut s = format!("table bridge {TABLE}\ndelete table bridge {TABLE}\n");
    if ports.is_empty() {
        t.skeleton.push_str(&s);
        return;
    }
    // Every guest port's tap, MAC and addresses as set elements, checked
    // by a fixed handful of rules: the table is loaded (and restored after
    // a flush) in about the same time whatever the number of VMs, where
    // rules per tap made it grow with each.
    s.push_str(&format!("table bridge {TABLE} {{\n"));
    let mut set = |name: &str, ty: &str, items: Vec<String>| {
        s.push_str(&format!("  set {name} {{\n    {ty}\n  }}\n"));
        t.add(&format!("bridge {name}"), items);
    };
    set(
        "taps",
        "type ifname",
        ports.iter().map(|p| format!("\"{}\"", p.tap)).collect(),
    );
    set(
        "macs",
        "type ifname . ether_addr",
        ports
            .iter()
            .map(|p| format!("\"{}\" . {}", p.tap, p.mac))
            .collect(),
    );
    set(
        "addrs",
        "type ifname . ipv4_addr",
        ports
            .iter()
            .flat_map(|p| {
                [
                    format!("\"{}\" . 0.0.0.0", p.tap),
                    format!("\"{}\" . {}", p.tap, p.ip),
                ]
            })
            .collect(),
    );
    let v6: Vec<&crate::firewall::GuestPort> =
        ports.iter().filter(|p| p.prefix6.is_some()).collect();
    // IPv6 sources a port may use: link-local, unspecified (duplicate
    // address detection), its network's /64.
    let sources6 = v6
        .iter()
        .flat_map(|p| {
            let net = p.prefix6.map(|n| n.to_string()).unwrap_or_default();
            [
                format!("\"{}\" . fe80::/10", p.tap),
                format!("\"{}\" . ::", p.tap),
                format!("\"{}\" . {net}", p.tap),
            ]
        })
        .collect();
    // Each guest's reserved address and its EUI-64 link-local one, which
    // only its own port may use as a source or claim in a neighbour
    // advertisement (the target field, read as a 128-bit number: nft 1.0.6
    // has no name for it); the gateway's addresses, which no port may.
    let reserved: Vec<(&str, std::net::Ipv6Addr)> = v6
        .iter()
        .filter_map(|p| Some((p.tap.as_str(), p.ip6()?, p.mac)))
        .flat_map(|(tap, ip6, mac)| {
            [
                (tap, ip6),
                (tap, crate::network::prefix6::Prefix6::link_local(mac)),
            ]
        })
        .collect();
    let mut gateways6: Vec<std::net::Ipv6Addr> = v6
        .iter()
        .filter_map(|p| Some(p.prefix6?.gateway()))
        .chain((!v6.is_empty()).then_some(crate::network::prefix6::BRIDGE_LINK_LOCAL))
        .collect();
    gateways6.sort();
    gateways6.dedup();
    let hex = |a: std::net::Ipv6Addr| format!("{:#034x}", u128::from(a));
    set(
        "v6taps",
        "type ifname",
        v6.iter().map(|p| format!("\"{}\"", p.tap)).collect(),
    );
    set(
        "sources6",
        "type ifname . ipv6_addr\n    flags interval",
        sources6,
    );
    set(
        "reserved6",
        "type ipv6_addr",
        reserved.iter().map(|(_, a)| a.to_string()).collect(),
    );
    set(
        "owned6",
        "type ifname . ipv6_addr",
        reserved
            .iter()
            .map(|(t, a)| format!("\"{t}\" . {a}"))
            .collect(),
    );
    set(
        "targets6",
        "typeof @th,64,128",
        reserved.iter().map(|(_, a)| hex(*a)).collect(),
    );
    set(
        "owned_targets6",
        "typeof iifname . @th,64,128",
        reserved
            .iter()
            .map(|(t, a)| format!("\"{t}\" . {}", hex(*a)))
            .collect(),
    );
    // Each port's MAC as the 48 bits of a neighbour discovery message's
    // link-layer address option (read at its fixed place).
    let port_macs: Vec<String> = v6
        .iter()
        .map(|p| format!("\"{}\" . {:#014x}", p.tap, mac_number(p.mac)))
        .collect();
    set("nd_macs", "typeof iifname . @th,208,48", port_macs.clone());
    set("rs_macs", "typeof iifname . @th,80,48", port_macs);
    set(
        "gateways6",
        "type ipv6_addr",
        gateways6.iter().map(ToString::to_string).collect(),
    );
    set(
        "gateway_targets6",
        "typeof @th,64,128",
        gateways6.iter().map(|a| hex(*a)).collect(),
    );
    // A few sources per port besides its reserved ones (privacy addresses
    // come and go): each a source the host then keeps a neighbour entry
    // for, in a table every namespace shares. Per port, so that no guest
    // takes another's share; named by its tap, so that a VM's start or
    // stop adds or removes its own and leaves the others' as they are.
    let mut limits = Vec::new();
    for p in &v6 {
        let id = port_id(&p.tap);
        t.ports.insert(p.tap.clone(), port_chain(&p.tap));
        limits.push(format!("\"{}\" : jump sources6_{id}", p.tap));
    }
    s.push_str("  map limits6 {\n    type ifname : verdict\n  }\n");
    t.add("bridge limits6", limits);
    s.push_str("  chain guard {\n    type filter hook prerouting priority -300; policy accept;\n");
    for rule in [
        // Frames from anything but a guest's tap are not this chain's.
        "iifname != @taps accept",
        "iifname . ether saddr != @macs drop",
        // Nothing but IPv4, ARP and (on a network with IPv6) IPv6.
        "ether type != { ip, arp, ip6 } drop",
        "iifname . arp saddr ether != @macs drop",
        "iifname . arp saddr ip != @addrs drop",
        "iifname . ip saddr != @addrs drop",
        // No DHCP server replies, from any port: clients only look at 68.
        "udp sport 67 drop",
        "udp dport 68 drop",
        // IPv6 only from a port whose guest has it, from its own network,
        // never from another guest's reserved address.
        "ether type ip6 iifname != @v6taps drop",
        "ether type ip6 iifname . ip6 saddr != @sources6 drop",
        "ip6 saddr @gateways6 drop",
        "ip6 saddr @reserved6 iifname . ip6 saddr != @owned6 drop",
        // No IPv6 fragments from a guest: the fields below cannot be read
        // past a fragment header (a later fragment may even hide which
        // protocol it carries), and a guest that sends what its path
        // carries (TCP does, by the path MTU) never needs to fragment.
        "ether type ip6 exthdr frag exists drop",
        // Neighbour discovery without extension headers, with at most one
        // option, and a link-layer address option naming the port's own
        // MAC: no guest makes the host send another's traffic elsewhere.
        "icmpv6 type { nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert } ip6 nexthdr != ipv6-icmp drop",
        "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } ip6 length != { 24, 32 } drop",
        "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } ip6 length 32 @th,192,8 { 1, 2 } iifname . @th,208,48 != @nd_macs drop",
        "icmpv6 type nd-router-solicit ip6 length != { 8, 16 } drop",
        "icmpv6 type nd-router-solicit ip6 length 16 @th,64,8 1 iifname . @th,80,48 != @rs_macs drop",
        "icmpv6 type nd-neighbor-advert @th,64,128 @gateway_targets6 drop",
        "icmpv6 type nd-neighbor-solicit ip6 saddr :: @th,64,128 @gateway_targets6 drop",
        "icmpv6 type nd-neighbor-advert @th,64,128 @targets6 iifname . @th,64,128 != @owned_targets6 drop",
        "icmpv6 type nd-neighbor-solicit ip6 saddr :: @th,64,128 @targets6 iifname . @th,64,128 != @owned_targets6 drop",
        "ip6 saddr != @reserved6 iifname vmap @limits6",
        // A guest's router advertisement or redirect would make it its
        // neighbours' router; no DHCPv6 server or relay answers either.
        "icmpv6 type { nd-router-advert, nd-redirect } drop",
        "udp sport 547 drop",
        "udp dport 546 drop",
    ] {
        s.push_str(&format!("    {rule}\n"));
    }
    s.push_str("  }\n");
    // A guest kept off IPv6 (its network has none, or a network policy)
    // is sent none either: no router advertisement makes it try IPv6.
    s.push_str(
        "  chain out {\n    type filter hook postrouting priority -300; policy accept;\n    \
         oifname @taps oifname != @v6taps ether type ip6 drop\n  }\n}\n",
    );
    t.skeleton.push_str(&s);
}

/// lume's tables in a ruleset listing: the `inet` table, then the `bridge`
/// one if present; `None` without the `inet` table.
pub fn lume_tables(ruleset: &str) -> Option<String> {
    let block = |family: &str| {
        let head = format!("table {family} {TABLE} {{");
        let mut lines = ruleset.lines().skip_while(|l| *l != head);
        let first = lines.next()?;
        let mut out = format!("{first}\n");
        for l in lines {
            out.push_str(l);
            out.push('\n');
            if l == "}" {
                return Some(out);
            }
        }
        None
    };
    let mut text = block("inet")?;
    text.push_str(&block("bridge").unwrap_or_default());
    Some(without_learned_elements(&text))
}

/// `listing` without the elements of the sets the kernel fills itself
/// (each guest's IPv6 sources, `seen6_<tap>`, listed with a countdown): they
/// change with the guests' traffic, not with anything lume wrote, so a
/// listing that differs only there is lume's table as written.
fn without_learned_elements(listing: &str) -> String {
    let mut out = String::new();
    let mut in_learned_set = false;
    let mut in_elements = false;
    for l in listing.lines() {
        let t = l.trim();
        if t.starts_with("set seen6_") && t.ends_with('{') {
            in_learned_set = true;
        } else if in_elements || (in_learned_set && t.starts_with("elements = {")) {
            // Up to the line that closes the element list.
            in_elements = !t.ends_with('}');
            continue;
        } else if in_learned_set && t == "}" {
            in_learned_set = false;
        }
        out.push_str(l);
        out.push('\n');
    }
    out
}

impl FirewallDriver for Nft {
    fn apply(&self, state: &FirewallState) -> Result<Tables, FirewallError> {
        if state.is_empty() {
            self.remove()?;
            return Ok(Tables::default());
        }
        let t = tables(state);
        nft(&["-f", "-"], Some(&full_script(&t)))?;
        Ok(t)
    }

    fn apply_change(&self, last: &Tables, state: &FirewallState) -> Result<Tables, FirewallError> {
        let t = tables(state);
        match change_script(last, &t) {
            Some(script) if script.is_empty() => Ok(t),
            Some(script) => {
                changed_or_whole(nft(&["-f", "-"], Some(&script)), t, || self.apply(state))
            }
            None => self.apply(state),
        }
    }

    fn remove(&self) -> Result<(), FirewallError> {
        nft(&["-f", "-"], Some(REMOVE_SCRIPT)).map(drop)
    }

    fn listing(&self) -> Result<Option<String>, FirewallError> {
        // One snapshot of the whole ruleset, so both of lume's tables are seen
        // as they were at one instant (two `list table` runs could straddle a
        // flush and report a change that is really a removal).
        // (Not `list table` twice in one command: nft 1.0.6 fills its
        // cache for one table per command, the other is then "missing".)
        match nft(&["list", "ruleset"], None) {
            Ok(text) => Ok(lume_tables(&text)),
            // Only a missing table is "missing"; any other failure is an error.
            Err(FirewallError::Rejected(msg)) if msg.contains("No such file or directory") => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    fn foreign_drops(&self) -> Result<Vec<ForeignDrop>, FirewallError> {
        let rs = ruleset()?;
        // The text only names rules (comments, not text, tell lume's own):
        // listed only when there is a drop to name. A listing taken a
        // moment later may miss a rule (then named by its handle alone).
        if foreign::foreign_drops(&rs).is_empty() {
            return Ok(Vec::new());
        }
        let text = nft(&["-a", "-s", "list", "ruleset"], None)?;
        Ok(foreign::foreign_drops(&rs.with_text(&text)))
    }

    fn accommodate(&self, openings: &[Opening]) -> Result<Accommodated, FirewallError> {
        self.accommodate_with(ruleset()?, openings)
    }

    fn tools_present(&self) -> Result<bool, FirewallError> {
        Ok(ruleset()?.tools_present())
    }

    fn ruleset(&self) -> Result<Ruleset, FirewallError> {
        ruleset()
    }

    fn accommodate_with(
        &self,
        rs: Ruleset,
        openings: &[Opening],
    ) -> Result<Accommodated, FirewallError> {
        self.accommodate_planned(rs, openings)
    }

    fn generation(&self) -> Option<RulesetGeneration> {
        generation()
    }

    fn present(&self) -> Result<bool, FirewallError> {
        let out = nft(&["list", "tables", "inet"], None)?;
        Ok(out
            .lines()
            .any(|l| l.trim() == format!("table inet {TABLE}")))
    }
}

/// The ruleset's generation in the calling thread's network namespace.
///
/// A netlink request, not a libnftables command: the library fills its
/// cache with the whole ruleset for any command. The socket is kept open
/// for the thread's next read in the same namespace: closing a netfilter
/// socket makes the kernel first finish freeing what the last
/// transaction deleted (an RCU grace period, 5–20 ms here after lume's
/// tables were replaced whole), and a VM's start reads the generation
/// right after its write. The socket holds its namespace; it is closed
/// when the thread ends or reads in another namespace.
pub fn generation() -> Option<RulesetGeneration> {
    use crate::network::kernel::netlink::Netlink;
    use std::os::unix::fs::MetadataExt as _;
    thread_local! {
        /// The socket, its namespace's inode (as the thread saw it when
        /// opening it) and cookie.
        static KEPT: std::cell::RefCell<Option<(Netlink, u64, u64)>> =
            const { std::cell::RefCell::new(None) };
    }
    let netns = std::fs::metadata("/proc/thread-self/ns/net").ok()?.ino();
    KEPT.with_borrow_mut(|kept| {
        if kept.as_ref().is_none_or(|(_, ino, _)| *ino != netns) {
            *kept = None;
            let nl = Netlink::open_netfilter().ok()?;
            let cookie = nl.namespace_cookie().ok()?;
            *kept = Some((nl, netns, cookie));
        }
        let (nl, _, namespace) = kept.as_mut()?;
        let namespace = *namespace;
        match nl.nftables_generation() {
            Ok(number) => Some(RulesetGeneration { namespace, number }),
            Err(_) => {
                // A socket in an unknown state is not used again.
                *kept = None;
                None
            }
        }
    })
}

/// After a change in place answered `answer`: the tables `t` it wrote;
/// refused (the tables are not as recorded after all: changed since the
/// caller's check), the tables written `whole`; any other failure is the
/// caller's (a change with no answer may yet be applied: no other write
/// follows it here).
fn changed_or_whole(
    answer: Result<String, FirewallError>,
    t: Tables,
    whole: impl FnOnce() -> Result<Tables, FirewallError>,
) -> Result<Tables, FirewallError> {
    match answer {
        Ok(_) => Ok(t),
        Err(FirewallError::Rejected(_)) => whole(),
        Err(e) => Err(e),
    }
}

impl Nft {
    /// [`FirewallDriver::accommodate`] planned from `rs`, a listing the
    /// caller already has (lume's own tables play no part in the plan, so
    /// one listing serves both the write of lume's table and this).
    fn accommodate_planned(
        &self,
        rs: Ruleset,
        openings: &[Opening],
    ) -> Result<Accommodated, FirewallError> {
        let mut plan = foreign::plan(&rs, openings);
        if !plan.commands.is_empty() {
            // Something changes (rarely): the log names the rules that
            // keep lume's accepts out of a chain as nft shows them.
            if let Ok(text) = nft(&["-a", "-s", "list", "ruleset"], None) {
                plan = foreign::plan(&rs.clone().with_text(&text), openings);
            }
            nft(&["-f", "-"], Some(&foreign::script(&plan))).map_err(|e| match e {
                FirewallError::Rejected(msg) => FirewallError::Accommodation(msg),
                e => e,
            })?;
        }
        Ok(Accommodated {
            changes: plan.changes,
            tools: rs.tools_present(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::{BridgeNet, Dnat};
    use crate::network::publish::Proto;

    #[test]
    fn only_lumes_own_tables_spare_the_full_listing() {
        let meta = r#"{"metainfo": {"version": "1.0.6", "json_schema_version": 1}}"#;
        let table = |family: &str, name: &str| {
            format!(r#"{{"table": {{"family": "{family}", "name": "{name}", "handle": 1}}}}"#)
        };
        let listing = |items: &[String]| format!(r#"{{"nftables": [{}]}}"#, items.join(", "));
        assert!(only_lume_tables(&listing(&[meta.into()])));
        assert!(only_lume_tables(&listing(&[
            meta.into(),
            table("inet", "lume"),
            table("bridge", "lume"),
        ])));
        // Any other table (Docker's ip filter, firewalld's, another inet
        // table that happens to be named lume in the ip family) needs the
        // whole listing.
        for other in [
            table("ip", "filter"),
            table("inet", "firewalld"),
            table("ip", "lume"),
        ] {
            assert!(!only_lume_tables(&listing(&[
                meta.into(),
                table("inet", "lume"),
                other.clone(),
            ])));
        }
        assert!(!only_lume_tables("not json"));
        assert!(!only_lume_tables(r#"{"other": []}"#));
    }

    #[test]
    fn lume_tables_are_cut_out_of_the_ruleset() {
        let ruleset = "table ip filter {\n\tchain FORWARD {\n\t}\n}\n\
            table inet lume {\n\tchain forward {\n\t\tiifname \"lume0\" accept\n\t}\n}\n\
            table bridge other {\n}\n\
            table bridge lume {\n\tchain guard {\n\t}\n}\n";
        let t = lume_tables(ruleset).unwrap();
        assert!(t.starts_with("table inet lume {\n"), "{t}");
        assert!(t.contains("iifname \"lume0\" accept"));
        assert!(t.contains("table bridge lume {\n\tchain guard"));
        assert!(!t.contains("filter") && !t.contains("other"), "{t}");
        assert_eq!(lume_tables("table bridge lume {\n}\n"), None);
        assert_eq!(lume_tables(""), None);
    }

    /// The sources the kernel learns for each guest (listed with a
    /// countdown) do not make lume's table look changed: the watcher would
    /// rewrite it, and empty them, every second.
    #[test]
    fn learned_sources_are_not_part_of_the_listing() {
        let written = "table inet lume {\n}\ntable bridge lume {\n\tset seen6_0 {\n\t\ttype ipv6_addr\n\t\tsize 16\n\t\tflags dynamic,timeout\n\t\ttimeout 10m\n\t}\n\tset taps {\n\t\ttype ifname\n\t\telements = { \"lt0\" }\n\t}\n}\n";
        let later = written.replace(
            "\t\ttimeout 10m\n\t}",
            "\t\ttimeout 10m\n\t\telements = { 2001:db8:64::a1 expires 9m59s484ms,\n\t\t\t     2001:db8:64::a2 expires 9m58s1ms }\n\t}",
        );
        let one_line = written.replace(
            "\t\ttimeout 10m\n\t}",
            "\t\ttimeout 10m\n\t\telements = { 2001:db8:64::a1 expires 9m59s484ms }\n\t}",
        );
        assert_eq!(lume_tables(&later), lume_tables(written));
        assert_eq!(lume_tables(&one_line), lume_tables(written));
        // Elements of lume's own sets still count.
        let changed = written.replace("\"lt0\"", "\"lt1\"");
        assert_ne!(lume_tables(&changed), lume_tables(written));
    }

    #[test]
    fn script_holds_masquerade_forwarding_and_dnat() {
        let state = FirewallState {
            nat: Some(BridgeNet {
                bridge: "lume0".into(),
                subnet: "203.0.113.0/24".parse().unwrap(),
                prefix6: None,
            }),
            host: Some(BridgeNet {
                bridge: "lume-host0".into(),
                subnet: "198.51.100.0/24".parse().unwrap(),
                prefix6: None,
            }),
            dnat: vec![Dnat {
                host_ip: None,
                host_port: 8080,
                proto: Proto::Tcp,
                guest: "203.0.113.2".parse().unwrap(),
                guest6: None,
                guest_port: 80,
            }],
            ports: vec![crate::firewall::GuestPort {
                tap: "lmt0".into(),
                mac: "52:54:00:12:34:56".parse().unwrap(),
                ip: "203.0.113.2".parse().unwrap(),
                prefix6: None,
            }],
            accommodate: true,
        };
        let s = script(&state);
        // IPv4 only: no IPv6 from or to the guest, no IPv6 NAT.
        assert!(s.contains("set v6taps {\n    type ifname\n  }"), "{s}");
        assert!(s.contains("ether type ip6 iifname != @v6taps drop"), "{s}");
        assert!(
            s.contains("oifname @taps oifname != @v6taps ether type ip6 drop"),
            "{s}"
        );
        assert!(
            !s.contains("ip6 saddr 2001") && !s.contains("dnat_any6"),
            "{s}"
        );
        for rule in [
            "set taps {\n    type ifname\n  }",
            "add element bridge lume taps { \"lmt0\" }",
            "add element bridge lume macs { \"lmt0\" . 52:54:00:12:34:56 }",
            "add element bridge lume addrs { \"lmt0\" . 0.0.0.0, \"lmt0\" . 203.0.113.2 }",
            "iifname != @taps accept",
            "iifname . ether saddr != @macs drop",
            "iifname . arp saddr ether != @macs drop",
            "iifname . arp saddr ip != @addrs drop",
            "iifname . ip saddr != @addrs drop",
            "udp sport 67 drop",
            "udp dport 68 drop",
            "ether type != { ip, arp, ip6 } drop",
        ] {
            assert!(s.contains(rule), "{rule} missing from {s}");
        }
        assert!(s.contains("table bridge lume\ndelete table bridge lume\ntable bridge lume {"));
        let mut none = Tables::default();
        bridge_tables(&[], &mut none);
        assert_eq!(
            full_script(&none),
            "table bridge lume\ndelete table bridge lume\n"
        );
        assert_eq!(
            REMOVE_SCRIPT,
            format!(
                "table inet {TABLE}\ndelete table inet {TABLE}\n{}",
                full_script(&none)
            )
        );
        assert!(
            s.contains("chain foreign_mark {\n    type filter hook forward priority filter - 10;"),
            "{s}"
        );
        assert!(
            s.contains("oifname \"lume0\" ct status dnat meta mark set meta mark or 0x01000000"),
            "{s}"
        );
        let off = script(&FirewallState {
            accommodate: false,
            ..state.clone()
        });
        assert!(!off.contains("chain foreign_mark"), "{off}");
        assert!(s.starts_with("table inet lume\ndelete table inet lume\n"));
        assert!(s.contains("ip saddr 203.0.113.0/24 oifname != \"lume0\" masquerade"));
        // Nothing routed from the bridge back into it but a published port.
        assert!(s.contains(
            "iifname \"lume0\" oifname \"lume0\" ct status dnat accept\n    iifname \"lume0\" oifname \"lume0\" drop\n    iifname \"lume0\" accept"
        ), "{s}");
        assert!(s.contains("iifname \"lume-host0\" drop"));
        assert!(
            s.contains(
                "map dnat_any {\n    type inet_proto . inet_service : ipv4_addr . inet_service\n  }"
            ) && s.contains("add element inet lume dnat_any { tcp . 8080 : 203.0.113.2 . 80 }"),
            "{s}"
        );
        assert!(!s.contains("dnat_addr"), "{s}");
        assert_eq!(
            s.matches("ip daddr != 127.0.0.0/8 fib daddr type local dnat ip to meta l4proto . th dport map @dnat_any").count(),
            2,
            "prerouting and output"
        );
        assert!(
            s.contains("iifname \"lume0\" ip daddr 127.0.0.0/8 drop"),
            "{s}"
        );
        assert!(
            s.contains("iifname \"lume-host0\" ip6 daddr ::1 drop"),
            "{s}"
        );
        assert!(
            s.contains("iifname != { \"lume0\", \"lo\" } ip daddr 203.0.113.1 drop"),
            "{s}"
        );
        let one = FirewallState {
            dnat: vec![Dnat {
                host_ip: Some("198.51.100.2".parse().unwrap()),
                ..state.dnat[0].clone()
            }],
            ..state
        };
        let one = script(&one);
        assert!(
            one.contains(
                "add element inet lume dnat_addr { 198.51.100.2 . tcp . 8080 : 203.0.113.2 . 80 }"
            ) && one.contains(
                "fib daddr type local dnat ip to ip daddr . meta l4proto . th dport map @dnat_addr"
            ) && !one.contains("dnat_any"),
            "{one}"
        );
    }

    /// A NAT network with IPv6: masquerade and published ports for IPv6,
    /// each guest held to its network's /64 and its own reserved address;
    /// a guest kept off IPv6 beside it. The script loads into nft.
    #[test]
    fn ipv6_networks_get_masquerade_published_ports_and_the_guard() {
        let p6: crate::network::prefix6::Prefix6 = "2001:db8:64::/64".parse().unwrap();
        let g6: std::net::Ipv6Addr = "2001:db8:64:0:5054:ff:fe12:3456".parse().unwrap();
        let state = FirewallState {
            nat: Some(BridgeNet {
                bridge: "lume0".into(),
                subnet: "203.0.113.0/24".parse().unwrap(),
                prefix6: Some(p6),
            }),
            host: None,
            dnat: vec![
                Dnat {
                    host_ip: None,
                    host_port: 8080,
                    proto: Proto::Tcp,
                    guest: "203.0.113.2".parse().unwrap(),
                    guest6: Some(g6),
                    guest_port: 80,
                },
                Dnat {
                    host_ip: Some("198.51.100.2".parse().unwrap()),
                    host_port: 8081,
                    proto: Proto::Tcp,
                    guest: "203.0.113.2".parse().unwrap(),
                    guest6: Some(g6),
                    guest_port: 81,
                },
            ],
            ports: vec![
                crate::firewall::GuestPort {
                    tap: "lmt0".into(),
                    mac: "52:54:00:12:34:56".parse().unwrap(),
                    ip: "203.0.113.2".parse().unwrap(),
                    prefix6: Some(p6),
                },
                crate::firewall::GuestPort {
                    tap: "lmt1".into(),
                    mac: "52:54:00:12:34:57".parse().unwrap(),
                    ip: "203.0.113.3".parse().unwrap(),
                    prefix6: None,
                },
            ],
            accommodate: false,
        };
        let s = script(&state);
        for want in [
            "ip6 saddr 2001:db8:64::/64 oifname != \"lume0\" masquerade",
            "iifname != { \"lume0\", \"lo\" } ip6 daddr 2001:db8:64::1 drop",
            // Only the port published on every address is published on IPv6.
            "add element inet lume dnat_any6 { tcp . 8080 : 2001:db8:64:0:5054:ff:fe12:3456 . 80 }",
            "ip6 daddr != ::1 fib daddr type local dnat ip6 to meta l4proto . th dport map @dnat_any6",
            "add element bridge lume v6taps { \"lmt0\" }",
            "add element bridge lume sources6 { \"lmt0\" . 2001:db8:64::/64, \"lmt0\" . ::, \"lmt0\" . fe80::/10 }",
            "set owned6 {\n    type ipv6_addr\n"
                .replace("ipv6_addr\n", "ifname . ipv6_addr\n")
                .as_str(),
            "\"lmt0\" . 0x20010db800640000505400fffe123456",
            // Its EUI-64 link-local address too, and the gateway's addresses.
            "\"lmt0\" . 0xfe80000000000000505400fffe123456",
            "add element bridge lume gateways6 { 2001:db8:64::1, fe80::1 }",
            "ip6 saddr @gateways6 drop",
            "ether type ip6 exthdr frag exists drop",
            "add element bridge lume limits6 { \"lmt0\" : jump sources6_lmt0 }",
            "chain sources6_lmt0 {\n    ip6 saddr :: return\n    update @seen6_lmt0 { ip6 saddr }",
            "icmpv6 type { nd-router-advert, nd-redirect } drop",
            "udp sport 547 drop",
        ] {
            assert!(s.contains(want), "{want} missing from {s}");
        }
        assert!(!s.contains("8081 : 2001"), "{s}");
        if nix::unistd::geteuid().is_root() && std::path::Path::new("/usr/sbin/nft").exists() {
            let ns =
                crate::util::testing::TestNetns::new(format!("lume-nft6-{}", std::process::id()));
            let file = tempfile::NamedTempFile::new().unwrap();
            std::fs::write(file.path(), &s).unwrap();
            ns.sh(&format!("nft -f {}", file.path().display()));
            let listed = ns.sh("nft list table bridge lume");
            assert!(listed.contains("owned_targets6"), "{listed}");
        }
    }

    type TestVm<'a> = (&'a str, u8, bool, Option<(u16, u16)>);

    /// A NAT network with IPv6 and the ports of `vms` (`(tap, last byte
    /// of its MAC and IPv4 address, IPv6, published host port → guest
    /// port)`).
    fn nat_state(vms: &[TestVm]) -> FirewallState {
        let p6: crate::network::prefix6::Prefix6 = "2001:db8:64::/64".parse().unwrap();
        let mac = |n: u8| -> crate::vm::config::MacAddress {
            format!("52:54:00:12:34:{n:02x}").parse().unwrap()
        };
        let ip = |n: u8| -> std::net::Ipv4Addr { format!("203.0.113.{n}").parse().unwrap() };
        FirewallState {
            nat: Some(BridgeNet {
                bridge: "lume0".into(),
                subnet: "203.0.113.0/24".parse().unwrap(),
                prefix6: Some(p6),
            }),
            host: None,
            dnat: vms
                .iter()
                .filter_map(|(_, n, v6, publish)| {
                    let (host_port, guest_port) = (*publish)?;
                    Some(Dnat {
                        host_ip: None,
                        host_port,
                        proto: Proto::Tcp,
                        guest: ip(*n),
                        guest6: v6.then(|| p6.eui64(mac(*n))),
                        guest_port,
                    })
                })
                .collect(),
            ports: vms
                .iter()
                .map(|(tap, n, v6, _)| crate::firewall::GuestPort {
                    tap: tap.to_string(),
                    mac: mac(*n),
                    ip: ip(*n),
                    prefix6: v6.then_some(p6),
                })
                .collect(),
            accommodate: false,
        }
    }

    /// `nft list ruleset` with each table's sets, maps and chains in name
    /// order and each element list sorted: the tables' content, whatever
    /// the order it was created in.
    fn normalized(listing: &str) -> String {
        let mut out = String::new();
        let mut blocks: Vec<String> = Vec::new();
        let mut block = String::new();
        for line in listing.lines() {
            if line.starts_with("table ") {
                out.push_str(line);
                out.push('\n');
            } else if line == "}" {
                blocks.sort();
                out.extend(blocks.drain(..));
                out.push_str("}\n");
            } else if line.starts_with('\t') && !line.starts_with("\t\t") && line != "\t}" {
                block = format!("{line}\n");
            } else {
                block.push_str(line.trim());
                block.push(' ');
                if line == "\t}" {
                    blocks.push(sort_elements(&block));
                    block.clear();
                }
            }
        }
        out
    }

    fn sort_elements(block: &str) -> String {
        let Some(start) = block.find("elements = {") else {
            return block.to_string();
        };
        let rest = &block[start + "elements = {".len()..];
        let end = rest.find('}').unwrap();
        let mut items: Vec<&str> = rest[..end].split(',').map(str::trim).collect();
        items.sort();
        format!(
            "{}elements = {{ {} }}{}",
            &block[..start],
            items.join(", "),
            &rest[end + 1..]
        )
    }

    /// Only nft's refusal of a change in place makes it a whole write; a
    /// change with no answer may yet be applied and is not followed by one.
    #[test]
    fn only_a_refused_change_is_written_whole() {
        let t = tables(&nat_state(&[("lta", 2, true, None)]));
        let whole = Tables {
            skeleton: "whole".into(),
            ..Tables::default()
        };
        let ok = changed_or_whole(Ok(String::new()), t.clone(), || unreachable!());
        assert_eq!(ok.unwrap(), t);
        let refused = changed_or_whole(
            Err(FirewallError::Rejected("No such file or directory".into())),
            t.clone(),
            || Ok(whole.clone()),
        );
        assert_eq!(refused.unwrap(), whole);
        let silent = changed_or_whole(
            Err(FirewallError::Library(
                crate::firewall::libnft::LibnftError::NoAnswer,
            )),
            t,
            || panic!("written whole after no answer"),
        );
        assert!(matches!(
            silent,
            Err(FirewallError::Library(
                crate::firewall::libnft::LibnftError::NoAnswer
            ))
        ));
    }

    #[test]
    fn ports_ids_are_valid_nft_names_and_distinct() {
        assert_eq!(port_id("lt0123abcd"), "lt0123abcd");
        assert_eq!(port_id("lt-1"), "x_6c742d31");
        assert_ne!(port_id("x6c742d31"), port_id("lt-1"));
        assert_ne!(port_id("a.b"), port_id("a_b"));
        assert_eq!(port_id(""), "x_");
    }

    /// A VM's start or stop changes only elements and its own port chain:
    /// the change script turns the tables written for one set of VMs into
    /// exactly those written whole for the next (checked against nft in
    /// two namespaces), keeps what the kernel learned for the other VMs'
    /// ports, and is refused (`None`) where the tables' shape differs.
    #[test]
    fn a_change_of_members_writes_only_what_differs() {
        let a = ("lta", 2, true, Some((8080, 80)));
        let b = ("ltb", 3, true, Some((8081, 22)));
        let c = ("ltc", 4, false, None);
        let steps = [
            nat_state(&[a]),
            nat_state(&[a, b, c]),
            nat_state(&[b, c]),
            // The same host port led to another guest port: deleted by
            // its key, then added.
            nat_state(&[("ltb", 3, true, Some((8081, 2222))), c]),
            nat_state(&[("ltb", 3, true, Some((8081, 2222)))]),
        ];
        // A record read back is taken only as lume writes it: its own
        // sets, one element each, port chains as this build writes them.
        let mut rich = steps[1].clone();
        rich.dnat.push(Dnat {
            host_ip: Some("198.51.100.2".parse().unwrap()),
            ..rich.dnat[0].clone()
        });
        assert!(plausible(&tables(&rich)));
        for key in ELEMENT_SETS {
            assert!(
                tables(&rich).elements.contains_key(key),
                "{key} is not written"
            );
        }
        let mut forged = tables(&steps[1]);
        forged
            .elements
            .get_mut("bridge taps")
            .unwrap()
            .insert("\"ltx\" }\nflush ruleset\nadd element bridge lume taps { \"lty\"".into());
        assert_eq!(change_script(&forged, &tables(&steps[2])), None);
        let mut forged = tables(&steps[1]);
        forged
            .elements
            .insert("inet other".into(), ["1".to_string()].into());
        assert_eq!(change_script(&forged, &tables(&steps[2])), None);
        let mut older = tables(&steps[1]);
        older
            .ports
            .insert("ltb".into(), "table bridge lume { }\n".into());
        assert_eq!(change_script(&older, &tables(&steps[2])), None);

        let same = change_script(&tables(&steps[1]), &tables(&steps[1]));
        assert_eq!(same.as_deref(), Some(""));
        let one = change_script(&tables(&steps[0]), &tables(&steps[1])).unwrap();
        assert!(
            one.contains("add element bridge lume taps { \"ltb\", \"ltc\" }")
                && one.contains("add chain bridge lume sources6_ltb\n")
                && !one.contains("sources6_lta")
                && !one.contains("delete"),
            "{one}"
        );
        let gone = change_script(&tables(&steps[1]), &tables(&steps[2])).unwrap();
        assert!(
            gone.contains("delete element bridge lume limits6 { \"lta\" }")
                && gone.contains("delete element inet lume dnat_any { tcp . 8080 }")
                && gone.contains("delete chain bridge lume sources6_lta")
                && !gone.contains("add element"),
            "{gone}"
        );
        // A new kind of published port, a network appearing, accommodation
        // switched: the shape differs, the tables are written whole.
        let mut bound = steps[1].clone();
        bound.dnat[0].host_ip = Some("198.51.100.2".parse().unwrap());
        let host = FirewallState {
            host: steps[1].nat.clone().map(|n| BridgeNet {
                bridge: "lume-host0".into(),
                ..n
            }),
            ..steps[1].clone()
        };
        let marks = FirewallState {
            accommodate: true,
            ..steps[1].clone()
        };
        for other in [bound, host, marks, nat_state(&[])] {
            assert_eq!(change_script(&tables(&steps[1]), &tables(&other)), None);
        }

        if !nix::unistd::geteuid().is_root() || !std::path::Path::new("/usr/sbin/nft").exists() {
            return;
        }
        let pid = std::process::id();
        let changed = crate::util::testing::TestNetns::new(format!("lume-nfc-{pid}"));
        let whole = crate::util::testing::TestNetns::new(format!("lume-nfw-{pid}"));
        let file = tempfile::NamedTempFile::new().unwrap();
        let load = |ns: &crate::util::testing::TestNetns, script: &str| {
            std::fs::write(file.path(), script).unwrap();
            ns.sh(&format!("nft -f {}", file.path().display()));
        };
        load(&changed, &script(&steps[0]));
        for pair in steps.windows(2) {
            if pair[0].ports.iter().any(|p| p.tap == "ltb") {
                // Something the kernel learned for B's port.
                changed.sh("nft add element bridge lume seen6_ltb { 2001:db8:64::99 }");
            }
            load(
                &changed,
                &change_script(&tables(&pair[0]), &tables(&pair[1])).unwrap(),
            );
            load(&whole, &script(&pair[1]));
            let listed = changed.sh("nft list ruleset");
            assert_eq!(
                normalized(&lume_tables(&listed).unwrap()),
                normalized(&lume_tables(&whole.sh("nft list ruleset")).unwrap()),
                "after {:?}",
                pair[1].ports
            );
            if pair[0].ports.iter().any(|p| p.tap == "ltb") {
                let seen = changed.sh("nft list set bridge lume seen6_ltb");
                assert!(seen.contains("2001:db8:64::99"), "{seen}");
            }
            assert!(!listed.contains("sources6_lta") || pair[1].ports[0].tap == "lta");
        }
    }
}
