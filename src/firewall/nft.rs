//! nftables backend: one table, `inet lume`, written as a single nft
//! transaction (`add table; delete table; table { ... }`), so it is
//! replaced whole or not at all — through libnftables in lume's process
//! ([`super::libnft`]), or `nft -f -` where the library is not available.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use super::foreign::{self, Ruleset};
use super::{
    Accommodated, FirewallDriver, FirewallError, FirewallState, ForeignDrop, Opening,
    RulesetGeneration,
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

/// The nft script for `state`.
pub fn script(state: &FirewallState) -> String {
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
        maps.push_str(&format!(
            "  map dnat_addr {{\n    type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service\n    elements = {{ {} }}\n  }}\n",
            one_addr.join(", ")
        ));
        // Only the host's own addresses: a packet for 127.0.0.1 sent to the
        // host's MAC by a LAN neighbour never matches.
        dnat.push(
            "fib daddr type local dnat ip to ip daddr . meta l4proto . th dport map @dnat_addr"
                .to_string(),
        );
    }
    if !any_addr.is_empty() {
        maps.push_str(&format!(
            "  map dnat_any {{\n    type inet_proto . inet_service : ipv4_addr . inet_service\n    elements = {{ {} }}\n  }}\n",
            any_addr.join(", ")
        ));
        dnat.push(
            "ip daddr != 127.0.0.0/8 fib daddr type local dnat ip to meta l4proto . th dport map @dnat_any"
                .to_string(),
        );
    }
    if !any_addr6.is_empty() {
        maps.push_str(&format!(
            "  map dnat_any6 {{\n    type inet_proto . inet_service : ipv6_addr . inet_service\n    elements = {{ {} }}\n  }}\n",
            any_addr6.join(", ")
        ));
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
    s.push_str(&bridge_script(&state.ports));
    s
}

/// A MAC address as the 48-bit number nft compares raw payload with.
fn mac_number(mac: crate::vm::config::MacAddress) -> u64 {
    mac.0.iter().fold(0, |n, b| n << 8 | u64::from(*b))
}

/// lume's `bridge` table: every guest port of lume's bridges may send only
/// from its own MAC address, IPv4 and ARP only from the address lume
/// reserved for it (0.0.0.0 while it asks DHCP), no DHCP server replies and
/// nothing but IPv4 and ARP (no IPv6, which lume does not give there, no
/// VLAN tags to smuggle past the rules).
/// A guest can then neither take another VM's address or MAC (and with them
/// its traffic and published ports) nor pose as the gateway or DHCP server.
/// Replaced whole like the inet table; an empty list removes it.
pub fn bridge_script(ports: &[crate::firewall::GuestPort]) -> String {
    let mut s = format!("table bridge {TABLE}\ndelete table bridge {TABLE}\n");
    if ports.is_empty() {
        return s;
    }
    // Every guest port's tap, MAC and addresses as set elements, checked
    // by a fixed handful of rules: the table is loaded (and restored after
    // a flush) in about the same time whatever the number of VMs, where
    // rules per tap made it grow with each.
    let join = |items: Vec<String>| items.join(", ");
    let taps = join(ports.iter().map(|p| format!("\"{}\"", p.tap)).collect());
    let macs = join(
        ports
            .iter()
            .map(|p| format!("\"{}\" . {}", p.tap, p.mac))
            .collect(),
    );
    let addrs = join(
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
    let set = |name: &str, ty: &str, items: Vec<String>| {
        let mut s = format!("  set {name} {{\n    {ty}\n");
        if !items.is_empty() {
            s.push_str(&format!("    elements = {{ {} }}\n", join(items)));
        }
        s.push_str("  }\n");
        s
    };
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
    s.push_str(&format!("table bridge {TABLE} {{\n"));
    s.push_str(&set("taps", "type ifname", vec![taps]));
    s.push_str(&set("macs", "type ifname . ether_addr", vec![macs]));
    s.push_str(&set("addrs", "type ifname . ipv4_addr", vec![addrs]));
    s.push_str(&set(
        "v6taps",
        "type ifname",
        v6.iter().map(|p| format!("\"{}\"", p.tap)).collect(),
    ));
    s.push_str(&set(
        "sources6",
        "type ifname . ipv6_addr\n    flags interval",
        sources6,
    ));
    s.push_str(&set(
        "reserved6",
        "type ipv6_addr",
        reserved.iter().map(|(_, a)| a.to_string()).collect(),
    ));
    s.push_str(&set(
        "owned6",
        "type ifname . ipv6_addr",
        reserved
            .iter()
            .map(|(t, a)| format!("\"{t}\" . {a}"))
            .collect(),
    ));
    s.push_str(&set(
        "targets6",
        "typeof @th,64,128",
        reserved.iter().map(|(_, a)| hex(*a)).collect(),
    ));
    s.push_str(&set(
        "owned_targets6",
        "typeof iifname . @th,64,128",
        reserved
            .iter()
            .map(|(t, a)| format!("\"{t}\" . {}", hex(*a)))
            .collect(),
    ));
    // Each port's MAC as the 48 bits of a neighbour discovery message's
    // link-layer address option (read at its fixed place).
    let port_macs: Vec<String> = v6
        .iter()
        .map(|p| format!("\"{}\" . {:#014x}", p.tap, mac_number(p.mac)))
        .collect();
    s.push_str(&set(
        "nd_macs",
        "typeof iifname . @th,208,48",
        port_macs.clone(),
    ));
    s.push_str(&set("rs_macs", "typeof iifname . @th,80,48", port_macs));
    s.push_str(&set(
        "gateways6",
        "type ipv6_addr",
        gateways6.iter().map(ToString::to_string).collect(),
    ));
    s.push_str(&set(
        "gateway_targets6",
        "typeof @th,64,128",
        gateways6.iter().map(|a| hex(*a)).collect(),
    ));
    // A few sources per port besides its reserved ones (privacy addresses
    // come and go): each a source the host then keeps a neighbour entry
    // for, in a table every namespace shares. Per port, so that no guest
    // takes another's share.
    let mut limits = Vec::new();
    for (i, p) in v6.iter().enumerate() {
        s.push_str(&format!(
            "  set seen6_{i} {{\n    type ipv6_addr\n    size {SOURCES6}\n    flags dynamic,timeout\n    timeout {SOURCES6_TIMEOUT}\n  }}\n  \
             chain sources6_{i} {{\n    ip6 saddr :: return\n    update @seen6_{i} {{ ip6 saddr }}\n    ip6 saddr != @seen6_{i} drop\n  }}\n"
        ));
        limits.push(format!("\"{}\" : jump sources6_{i}", p.tap));
    }
    s.push_str(&set("limits6", "type ifname : verdict", limits).replacen("set ", "map ", 1));
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
    s
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
/// (each guest's IPv6 sources, `seen6_N`, listed with a countdown): they
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
    fn apply(&self, state: &FirewallState) -> Result<(), FirewallError> {
        if state.is_empty() {
            return self.remove();
        }
        nft(&["-f", "-"], Some(&script(state))).map(drop)
    }

    fn remove(&self) -> Result<(), FirewallError> {
        // Both tables in one transaction; creating one first makes the delete
        // succeed whether or not it existed.
        let script = format!(
            "table inet {TABLE}\ndelete table inet {TABLE}\n{}",
            bridge_script(&[])
        );
        nft(&["-f", "-"], Some(&script)).map(drop)
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
        // The listing only names rules for the doctor: one taken a moment
        // later may miss a rule (then named by its handle alone).
        let text = nft(&["-a", "-s", "list", "ruleset"], None)?;
        Ok(foreign::foreign_drops(&ruleset()?.with_text(&text)))
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
        // A netlink request, not a libnftables command: the library fills
        // its cache with the whole ruleset for any command.
        let mut nl = crate::network::kernel::netlink::Netlink::open_netfilter().ok()?;
        Some(RulesetGeneration {
            namespace: nl.namespace_cookie().ok()?,
            number: nl.nftables_generation().ok()?,
        })
    }

    fn present(&self) -> Result<bool, FirewallError> {
        let out = nft(&["list", "tables", "inet"], None)?;
        Ok(out
            .lines()
            .any(|l| l.trim() == format!("table inet {TABLE}")))
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
            "set taps {\n    type ifname\n    elements = { \"lmt0\" }",
            "elements = { \"lmt0\" . 52:54:00:12:34:56 }",
            "elements = { \"lmt0\" . 0.0.0.0, \"lmt0\" . 203.0.113.2 }",
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
        assert_eq!(
            bridge_script(&[]),
            "table bridge lume\ndelete table bridge lume\n"
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
            s.contains("map dnat_any {\n    type inet_proto . inet_service : ipv4_addr . inet_service\n    elements = { tcp . 8080 : 203.0.113.2 . 80 }"),
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
            one.contains("elements = { 198.51.100.2 . tcp . 8080 : 203.0.113.2 . 80 }")
                && one.contains("fib daddr type local dnat ip to ip daddr . meta l4proto . th dport map @dnat_addr")
                && !one.contains("dnat_any"),
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
            "type inet_proto . inet_service : ipv6_addr . inet_service\n    elements = { tcp . 8080 : 2001:db8:64:0:5054:ff:fe12:3456 . 80 }",
            "ip6 daddr != ::1 fib daddr type local dnat ip6 to meta l4proto . th dport map @dnat_any6",
            "set v6taps {\n    type ifname\n    elements = { \"lmt0\" }",
            "elements = { \"lmt0\" . fe80::/10, \"lmt0\" . ::, \"lmt0\" . 2001:db8:64::/64 }",
            "set owned6 {\n    type ipv6_addr\n"
                .replace("ipv6_addr\n", "ifname . ipv6_addr\n")
                .as_str(),
            "\"lmt0\" . 0x20010db800640000505400fffe123456",
            // Its EUI-64 link-local address too, and the gateway's addresses.
            "\"lmt0\" . 0xfe80000000000000505400fffe123456",
            "set gateways6 {\n    type ipv6_addr\n    elements = { 2001:db8:64::1, fe80::1 }",
            "ip6 saddr @gateways6 drop",
            "ether type ip6 exthdr frag exists drop",
            "\"lmt0\" : jump sources6_0",
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
}
