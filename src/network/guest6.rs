//! A NAT or host-only guest's IPv6 addresses, as the host learns them: the
//! neighbour entries of the guest's MAC on its bridge, inside the bridge's
//! /64. An address the guest configured but never used toward the host is
//! not there yet: once the guest has its IPv4 lease, lume then sends one
//! empty datagram to the address the guest most likely has (its EUI-64 address, which lume's DHCPv6 also
//! reserves for it), and the host's neighbour discovery, answered by the
//! guest if the address is really its own, adds the entry for the next look.

use std::net::{Ipv6Addr, SocketAddrV6, UdpSocket};

use super::kernel::netlink::Netlink;
use super::prefix6::Prefix6;
use crate::vm::config::MacAddress;

/// The discard port: a datagram there asks nothing of the guest.
const DISCARD: u16 = 9;

/// The global IPv6 addresses of the guest with `mac` whose `tap` is in a
/// lume bridge, sorted; empty when the bridge has no IPv6. `leased`: the
/// guest has its IPv4 lease, so its network is up — only then is it
/// nudged (a guest still booting gets no packet from a `lume get`).
pub fn on_bridge_of(tap: &str, mac: MacAddress, leased: bool) -> Vec<Ipv6Addr> {
    let Ok(mut nl) = Netlink::open() else {
        return Vec::new();
    };
    let Some(bridge) = nl.link_info(tap).ok().flatten().and_then(|l| l.master) else {
        return Vec::new();
    };
    let prefixes: Vec<Prefix6> = nl
        .all_addresses_v6()
        .unwrap_or_default()
        .into_iter()
        .filter(|&(index, _, len)| index == bridge && len == 64)
        .filter_map(|(_, a, _)| {
            let network = Ipv6Addr::from(u128::from(a) >> 64 << 64);
            format!("{network}/64").parse().ok()
        })
        .collect();
    if prefixes.is_empty() {
        return Vec::new();
    }
    let mut found: Vec<Ipv6Addr> = nl
        .neighbours_v6(bridge, mac.0)
        .unwrap_or_default()
        .into_iter()
        .filter(|a| prefixes.iter().any(|p| p.contains(*a)))
        .collect();
    for p in prefixes.iter().filter(|_| leased) {
        let likely = p.eui64(mac);
        if !found.contains(&likely) {
            nudge(likely);
        }
    }
    found.sort();
    found.dedup();
    // The EUI-64 ones first, then at most as many as a guest may use.
    let likely: Vec<Ipv6Addr> = prefixes.iter().map(|p| p.eui64(mac)).collect();
    found.sort_by_key(|a| !likely.contains(a));
    found.truncate(MAX_LISTED);
    found
}

/// The most addresses listed: the bridge guard lets a guest use its
/// reserved address and 16 others at a time.
const MAX_LISTED: usize = 1 + crate::firewall::nft::SOURCES6;

/// One empty datagram to `addr`'s discard port, not waited for.
fn nudge(addr: Ipv6Addr) {
    if let Ok(sock) = UdpSocket::bind("[::]:0") {
        let _ = sock.set_nonblocking(true);
        let _ = sock.send_to(&[], SocketAddrV6::new(addr, DISCARD, 0, 0));
    }
}
