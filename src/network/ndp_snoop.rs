//! Learning a bridged VM's IPv6 addresses from its neighbour discovery.
//!
//! A bridged guest takes its IPv6 addresses from the LAN: stateless
//! autoconfiguration from the router's advertisements, DHCPv6, or a static
//! configuration. lume is not part of any of that, but every address a
//! guest configures goes through duplicate address detection (RFC 4862): a
//! neighbour solicitation from `::` to the address's solicited-node group,
//! naming the new address as its target. A guest that then uses the address
//! also sends neighbour solicitations from it and answers the ones for it
//! with neighbour advertisements. So lume watches the ICMPv6 neighbour
//! solicitations (135) and advertisements (136) on the VM's tap, with the
//! same kind of packet socket as [`super::dhcp_snoop`] behind its own
//! classic BPF filter, and keeps the addresses the guest announces.
//!
//! What the guest announces is all this is: the guest can claim any
//! address, so the list is never used for a decision, only shown. What
//! counts ([`Announcements::observe`]):
//!
//! - only frames travelling *from* the guest (the direction table in
//!   [`super::dhcp_snoop`]) whose Ethernet source is the guest's MAC, carry
//!   no VLAN tag, and are well-formed neighbour discovery (hop limit 255,
//!   code 0, as RFC 4861 requires of every receiver);
//! - a solicitation from `::` (duplicate address detection) sent to the
//!   target's own solicited-node group claims its target; a solicitation
//!   from an address claims that source; an advertisement claims its
//!   target;
//! - only global unicast addresses: never unspecified, loopback, IPv4-mapped
//!   or -compatible (all of `::/8`), link-local (`fe80::/10`), site-local
//!   (`fec0::/10`) or multicast (`ff00::/8`); unique local addresses
//!   (`fc00::/7`) count, LANs use them;
//! - at most [`MAX_ADDRESSES`]: a new address beyond that pushes out the
//!   one the guest announced longest ago.
//!
//! An address another host defends while the guest still probes it (an
//! advertisement for the target travelling towards the guest within
//! [`DAD_WINDOW`] of the probe, before the guest used it) is dropped: the
//! guest gives it up as well. An address the guest later gives up (its
//! lifetime ends, or it is removed) is not noticed and stays listed until
//! the VM's next start.

use std::collections::VecDeque;
use std::net::Ipv6Addr;
use std::time::{Duration, Instant};

use super::dhcp_snoop::{SnoopError, Watched};
use super::kernel::packet::{PacketError, PacketSocket};

/// How many announced addresses are kept.
pub const MAX_ADDRESSES: usize = 8;

/// How long after its probe a tentative address can still be defended:
/// Linux waits one second per probe (`dad_transmits`, default 1), RFC 4862's
/// default; ten seconds covers a few more.
pub const DAD_WINDOW: Duration = Duration::from_secs(10);

const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_ICMPV6: u8 = 58;
const ND_NEIGHBOR_SOLICIT: u8 = 135;
const ND_NEIGHBOR_ADVERT: u8 = 136;
/// Ethernet 14 + IPv6 40.
const ICMP_AT: usize = 54;

/// Largest frame read; neighbour discovery frames are far smaller.
const FRAME_BUF: usize = 2048;

/// One neighbour solicitation or advertisement as [`parse_nd`] read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NdMessage {
    pub eth_src: [u8; 6],
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    /// 135 (solicitation) or 136 (advertisement).
    pub kind: u8,
    pub target: Ipv6Addr,
}

/// Parses an untagged Ethernet frame carrying an IPv6 neighbour
/// solicitation or advertisement (no extension headers, hop limit 255, code
/// 0, at least the 24 bytes that hold the target); `None` for anything
/// else, including truncated frames. Never panics (a property test feeds it
/// arbitrary bytes). The ICMPv6 checksum is not verified: outgoing frames on
/// a packet socket may carry an offloaded one.
pub fn parse_nd(frame: &[u8]) -> Option<NdMessage> {
    let mut eth_src = [0u8; 6];
    eth_src.copy_from_slice(frame.get(6..12)?);
    if u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]) != ETH_P_IPV6 {
        return None;
    }
    let ip = frame.get(14..)?;
    if ip.len() < 40 || ip[0] >> 4 != 6 || ip[6] != IPPROTO_ICMPV6 || ip[7] != 255 {
        return None;
    }
    let payload = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    // Ethernet padding after the payload is allowed; a short frame is not.
    let icmp = ip.get(40..40 + payload)?;
    if icmp.len() < 24 || icmp[1] != 0 {
        return None;
    }
    let kind = icmp[0];
    if kind != ND_NEIGHBOR_SOLICIT && kind != ND_NEIGHBOR_ADVERT {
        return None;
    }
    let addr = |b: &[u8]| -> Option<Ipv6Addr> {
        let a: [u8; 16] = b.try_into().ok()?;
        Some(Ipv6Addr::from(a))
    };
    Some(NdMessage {
        eth_src,
        src: addr(&ip[8..24])?,
        dst: addr(&ip[24..40])?,
        kind,
        target: addr(&icmp[8..24])?,
    })
}

/// Whether `a` is an address a guest can be credited with: unicast and
/// global in scope (unique local addresses included).
pub fn is_global_unicast(a: Ipv6Addr) -> bool {
    let first = a.segments()[0];
    // ::/8 holds the unspecified, loopback, IPv4-mapped and -compatible
    // addresses; fe80::/10 is link-local, fec0::/10 the old site-local.
    !(first & 0xff00 == 0 || first & 0xff00 == 0xff00 || first & 0xffc0 == 0xfe80)
        && first & 0xffc0 != 0xfec0
}

/// The solicited-node multicast group of `a` (`ff02::1:ffXX:XXXX`).
fn solicited_node(a: Ipv6Addr) -> Ipv6Addr {
    let low = u128::from(a) & 0x00ff_ffff;
    Ipv6Addr::from(0xff02_0000_0000_0000_0000_0001_ff00_0000_u128 | low)
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    address: Ipv6Addr,
    /// When the guest probed the address (duplicate address detection) and
    /// has not used it since: another host may still defend it.
    probing_since: Option<Instant>,
}

/// The addresses the guest with one MAC announced, as far as a snooper saw.
#[derive(Debug, Clone)]
pub struct Announcements {
    mac: [u8; 6],
    watched: Watched,
    /// Most recently announced last.
    entries: VecDeque<Entry>,
}

impl Announcements {
    pub fn new(mac: [u8; 6], watched: Watched) -> Self {
        Self {
            mac,
            watched,
            entries: VecDeque::new(),
        }
    }

    /// The addresses kept, sorted.
    pub fn addresses(&self) -> Vec<Ipv6Addr> {
        let mut v: Vec<Ipv6Addr> = self.entries.iter().map(|e| e.address).collect();
        v.sort();
        v
    }

    /// Looks at one frame seen at `now`; `outgoing` is whether the packet
    /// socket saw it as `PACKET_OUTGOING`. Returns whether the list of
    /// addresses changed.
    pub fn observe(&mut self, frame: &[u8], outgoing: bool, now: Instant) -> bool {
        let Some(m) = parse_nd(frame) else {
            return false;
        };
        let from_guest = match self.watched {
            Watched::Tap => !outgoing,
            Watched::MacvtapParent => outgoing,
        };
        if !from_guest {
            return self.defended(&m, now);
        }
        if m.eth_src != self.mac {
            return false;
        }
        match m.kind {
            ND_NEIGHBOR_SOLICIT if m.src.is_unspecified() => {
                if m.dst != solicited_node(m.target) {
                    return false;
                }
                self.claim(m.target, Some(now))
            }
            ND_NEIGHBOR_SOLICIT => self.claim(m.src, None),
            _ => self.claim(m.target, None),
        }
    }

    /// Another host's advertisement for an address the guest is probing:
    /// the guest's duplicate address detection fails and so does the claim.
    fn defended(&mut self, m: &NdMessage, now: Instant) -> bool {
        if m.kind != ND_NEIGHBOR_ADVERT || m.eth_src == self.mac {
            return false;
        }
        let before = self.entries.len();
        self.entries.retain(|e| {
            let probing = e
                .probing_since
                .is_some_and(|t| now.saturating_duration_since(t) < DAD_WINDOW);
            !(probing && e.address == m.target)
        });
        self.entries.len() != before
    }

    fn claim(&mut self, address: Ipv6Addr, probing: Option<Instant>) -> bool {
        if !is_global_unicast(address) {
            return false;
        }
        if let Some(i) = self.entries.iter().position(|e| e.address == address) {
            let mut e = self.entries.remove(i).expect("index found");
            // Used (not a probe): no longer tentative. Probed again (an
            // interface that went down and up): tentative again.
            e.probing_since = probing;
            self.entries.push_back(e);
            return false;
        }
        if self.entries.len() == MAX_ADDRESSES {
            self.entries.pop_front();
        }
        self.entries.push_back(Entry {
            address,
            probing_since: probing,
        });
        true
    }
}

/// A packet socket on one interface that sees only neighbour discovery.
#[derive(Debug)]
pub struct NdpSnooper {
    socket: PacketSocket,
    buf: Vec<u8>,
}

impl NdpSnooper {
    /// Opens a packet socket on interface `ifname`. Needs CAP_NET_RAW.
    pub fn open(ifname: &str) -> Result<Self, SnoopError> {
        let socket = PacketSocket::open(ifname, &mut bpf_filter()).map_err(snoop_error)?;
        Ok(Self {
            socket,
            buf: vec![0; FRAME_BUF],
        })
    }

    /// Shows `announcements` every frame that arrives within `timeout`;
    /// returns whether its list changed.
    pub fn watch(
        &mut self,
        announcements: &mut Announcements,
        timeout: Duration,
    ) -> Result<bool, SnoopError> {
        let deadline = Instant::now().checked_add(timeout);
        let mut changed = false;
        loop {
            let Some((len, outgoing)) = self
                .socket
                .recv(&mut self.buf, deadline)
                .map_err(snoop_error)?
            else {
                return Ok(changed);
            };
            let len = len.min(self.buf.len());
            changed |= announcements.observe(&self.buf[..len], outgoing, Instant::now());
            // Bounded even under a flood of frames that pass the filter.
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(changed);
            }
        }
    }
}

/// Fallback when the snooper saw nothing (a guest restored from a memory
/// snapshot does not probe its addresses again): the global addresses the
/// host's neighbour table on `bridge` holds for `mac` — only on a Linux
/// bridge the host itself is on, and only where the host talked to the
/// guest. Sorted, at most [`MAX_ADDRESSES`].
pub fn neighbour_addresses(bridge: &str, mac: [u8; 6]) -> Vec<Ipv6Addr> {
    let Ok(mut nl) = super::kernel::netlink::Netlink::open() else {
        return Vec::new();
    };
    let Some(index) = nl.link_index(bridge).ok().flatten() else {
        return Vec::new();
    };
    let mut found: Vec<Ipv6Addr> = nl
        .neighbours_v6(index, mac)
        .unwrap_or_default()
        .into_iter()
        .filter(|a| is_global_unicast(*a))
        .collect();
    found.sort();
    found.dedup();
    found.truncate(MAX_ADDRESSES);
    found
}

fn snoop_error(e: PacketError) -> SnoopError {
    match e {
        PacketError::InvalidInterfaceName(name) => SnoopError::InvalidInterfaceName(name),
        PacketError::NoSuchInterface(name) => SnoopError::NoSuchInterface(name),
        PacketError::Open { ifname, source } => match source.raw_os_error() {
            Some(libc::EPERM | libc::EACCES) => SnoopError::PermissionDenied { ifname },
            _ => SnoopError::Open { ifname, source },
        },
        PacketError::Receive { ifname, source } => SnoopError::Receive { ifname, source },
    }
}

/// Classic BPF: accept untagged IPv6 frames whose next header is ICMPv6
/// with type 135 or 136 (what [`parse_nd`] reads); drop the rest.
fn bpf_filter() -> Vec<libc::sock_filter> {
    use crate::network::kernel::packet::{bpf_jump as jump, bpf_stmt as stmt};
    use libc::{BPF_ABS, BPF_B, BPF_H, BPF_JEQ, BPF_JMP, BPF_K, BPF_LD, BPF_RET};
    const ACCEPT: u32 = FRAME_BUF as u32;
    // Jump offsets count the instructions skipped: DROP is 7, ACCEPT 8.
    vec![
        /* 0 */ stmt(BPF_LD | BPF_H | BPF_ABS, 12), // ethertype
        /* 1 */ jump(BPF_JMP | BPF_JEQ | BPF_K, u32::from(ETH_P_IPV6), 0, 5),
        /* 2 */ stmt(BPF_LD | BPF_B | BPF_ABS, 20), // next header
        /* 3 */ jump(BPF_JMP | BPF_JEQ | BPF_K, u32::from(IPPROTO_ICMPV6), 0, 3),
        /* 4 */ stmt(BPF_LD | BPF_B | BPF_ABS, ICMP_AT as u32), // ICMPv6 type
        /* 5 */
        jump(
            BPF_JMP | BPF_JEQ | BPF_K,
            u32::from(ND_NEIGHBOR_SOLICIT),
            2,
            0,
        ),
        /* 6 */
        jump(
            BPF_JMP | BPF_JEQ | BPF_K,
            u32::from(ND_NEIGHBOR_ADVERT),
            1,
            0,
        ),
        /* 7 */ stmt(BPF_RET | BPF_K, 0),
        /* 8 */ stmt(BPF_RET | BPF_K, ACCEPT),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    const OTHER: [u8; 6] = [0x02, 0, 0, 0, 0, 0x77];

    fn a(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    /// An untagged neighbour discovery frame.
    fn nd(eth_src: [u8; 6], src: Ipv6Addr, dst: Ipv6Addr, kind: u8, target: Ipv6Addr) -> Vec<u8> {
        let mut icmp = vec![kind, 0, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(&target.octets());
        let mut f = vec![0x33, 0x33, 0xff, 0, 0, 1];
        f.extend_from_slice(&eth_src);
        f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
        f.extend_from_slice(&[IPPROTO_ICMPV6, 255]);
        f.extend_from_slice(&src.octets());
        f.extend_from_slice(&dst.octets());
        f.extend_from_slice(&icmp);
        f
    }

    /// The duplicate address detection probe a guest sends for `target`.
    fn dad(eth_src: [u8; 6], target: Ipv6Addr) -> Vec<u8> {
        nd(
            eth_src,
            Ipv6Addr::UNSPECIFIED,
            solicited_node(target),
            ND_NEIGHBOR_SOLICIT,
            target,
        )
    }

    fn na(eth_src: [u8; 6], target: Ipv6Addr) -> Vec<u8> {
        nd(eth_src, target, a("ff02::1"), ND_NEIGHBOR_ADVERT, target)
    }

    const FROM_GUEST: bool = false;
    const TO_GUEST: bool = true;

    #[test]
    fn the_guests_probes_and_advertisements_are_learned() {
        let now = Instant::now();
        let mut x = Announcements::new(MAC, Watched::Tap);
        let eui = a("2001:db8:ff:0:5054:ff:fe12:3456");
        assert!(x.observe(&dad(MAC, eui), FROM_GUEST, now));
        // The same again changes nothing.
        assert!(!x.observe(&dad(MAC, eui), FROM_GUEST, now));
        // A solicitation from an address the guest uses.
        let used = a("2001:db8:ff::99");
        let ns = nd(
            MAC,
            used,
            solicited_node(a("2001:db8:ff::1")),
            ND_NEIGHBOR_SOLICIT,
            a("2001:db8:ff::1"),
        );
        assert!(x.observe(&ns, FROM_GUEST, now));
        // An advertisement, and a unique local address.
        let ula = a("fd00:6c75:6d65::5");
        assert!(x.observe(&na(MAC, ula), FROM_GUEST, now));
        let mut want = vec![eui, used, ula];
        want.sort();
        assert_eq!(x.addresses(), want);
        // Ethernet padding after the payload is fine.
        let mut padded = dad(MAC, a("2001:db8:ff::7"));
        padded.extend_from_slice(&[0; 20]);
        assert!(x.observe(&padded, FROM_GUEST, now));
        // Seen on a macvtap's parent, the guest's frames are outgoing.
        let mut p = Announcements::new(MAC, Watched::MacvtapParent);
        assert!(!p.observe(&dad(MAC, eui), false, now));
        assert!(p.observe(&dad(MAC, eui), true, now));
    }

    #[test]
    fn what_the_guest_may_not_be_credited_with_is_ignored() {
        let now = Instant::now();
        let mut x = Announcements::new(MAC, Watched::Tap);
        // Not global unicast.
        for bad in [
            "fe80::5054:ff:fe12:3456",
            "fec0::1",
            "ff02::1",
            "ff0e::1",
            "::",
            "::1",
            "::ffff:192.0.2.1",
            "::192.0.2.1",
        ] {
            assert!(!x.observe(&dad(MAC, a(bad)), FROM_GUEST, now), "{bad}");
            assert!(!x.observe(&na(MAC, a(bad)), FROM_GUEST, now), "{bad}");
        }
        let good = a("2001:db8:ff::5");
        // From another MAC (a guest spoofing, or a LAN host seen on the tap).
        assert!(!x.observe(&dad(OTHER, good), FROM_GUEST, now));
        // Travelling towards the guest: someone else's.
        assert!(!x.observe(&dad(MAC, good), TO_GUEST, now));
        assert!(!x.observe(&na(MAC, good), TO_GUEST, now));
        // A probe not sent to the target's solicited-node group.
        let wrong_group = nd(
            MAC,
            Ipv6Addr::UNSPECIFIED,
            a("ff02::1"),
            ND_NEIGHBOR_SOLICIT,
            good,
        );
        assert!(!x.observe(&wrong_group, FROM_GUEST, now));
        // Hop limit below 255 (routed from elsewhere), a non-zero code, a
        // VLAN tag, a truncated frame, another ICMPv6 type.
        let mut hops = dad(MAC, good);
        hops[21] = 64;
        let mut code = dad(MAC, good);
        code[ICMP_AT + 1] = 1;
        let mut tagged = dad(MAC, good);
        tagged.splice(12..12, [0x81, 0x00, 0x00, 0x2a]);
        let mut short = dad(MAC, good);
        short.truncate(short.len() - 1);
        let mut echo = dad(MAC, good);
        echo[ICMP_AT] = 128;
        for f in [hops, code, tagged, short, echo] {
            assert!(!x.observe(&f, FROM_GUEST, now));
        }
        assert_eq!(x.addresses(), Vec::<Ipv6Addr>::new());
    }

    #[test]
    fn at_most_eight_are_kept_the_oldest_going_first() {
        let now = Instant::now();
        let mut x = Announcements::new(MAC, Watched::Tap);
        let addr = |i: u16| Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, i + 1);
        for i in 0..20 {
            x.observe(&na(MAC, addr(i)), FROM_GUEST, now);
            // The first stays by being announced again.
            x.observe(&na(MAC, addr(0)), FROM_GUEST, now);
        }
        let kept = x.addresses();
        assert_eq!(kept.len(), MAX_ADDRESSES);
        assert!(kept.contains(&addr(0)), "{kept:?}");
        assert!(
            kept.contains(&addr(19)) && !kept.contains(&addr(1)),
            "{kept:?}"
        );
    }

    #[test]
    fn an_address_another_host_defends_during_the_probe_is_dropped() {
        let now = Instant::now();
        let mut x = Announcements::new(MAC, Watched::Tap);
        let taken = a("2001:db8:ff::10");
        let used = a("2001:db8:ff::11");
        x.observe(&dad(MAC, taken), FROM_GUEST, now);
        x.observe(&dad(MAC, used), FROM_GUEST, now);
        x.observe(&na(MAC, used), FROM_GUEST, now);
        // The guest's own advertisement, looped back, defends nothing.
        assert!(!x.observe(&na(MAC, taken), TO_GUEST, now));
        assert!(x.observe(&na(OTHER, taken), TO_GUEST, now));
        // A used address, or a probe long past, is not taken away.
        assert!(!x.observe(&na(OTHER, used), TO_GUEST, now));
        let late = a("2001:db8:ff::12");
        x.observe(&dad(MAC, late), FROM_GUEST, now);
        assert!(!x.observe(&na(OTHER, late), TO_GUEST, now + DAD_WINDOW));
        assert_eq!(x.addresses(), vec![used, late]);
    }

    /// The fallback reads the host's real neighbour table: only the
    /// guest's MAC, only global unicast addresses.
    #[test]
    fn the_neighbour_table_fallback_keeps_the_guests_global_addresses() {
        if !nix::unistd::geteuid().is_root() || !std::path::Path::new("/usr/sbin/ip").exists() {
            eprintln!("skipping: needs root and ip");
            return;
        }
        let ns = crate::util::testing::TestNetns::new(format!("lume-nd-{}", std::process::id()));
        let ip = |args: &str| ns.ip(&args.split_whitespace().collect::<Vec<_>>());
        ip("link add nbr0 type bridge");
        ip("link set nbr0 up");
        let guest = "52:54:00:12:34:56";
        for (addr, mac) in [
            ("2001:db8:ff::77", guest),
            ("2001:db8:ff::5", guest),
            ("fe80::77", guest),
            ("2001:db8:ff::78", "02:00:00:00:00:77"),
        ] {
            ip(&format!(
                "-6 neigh add {addr} lladdr {mac} dev nbr0 nud permanent"
            ));
        }
        let found = ns.run(|| {
            (
                neighbour_addresses("nbr0", MAC),
                neighbour_addresses("nosuch0", MAC),
            )
        });
        assert_eq!(found.0, vec![a("2001:db8:ff::5"), a("2001:db8:ff::77")]);
        assert_eq!(found.1, Vec::<Ipv6Addr>::new());
    }

    /// The real socket and filter: a veth end plays the guest's tap, the
    /// kernel on the other end (the guest) probes the addresses it is
    /// given; its link-local one is left out.
    #[test]
    fn the_snooper_sees_a_real_kernels_duplicate_address_detection() {
        if !nix::unistd::geteuid().is_root() || !std::path::Path::new("/usr/sbin/ip").exists() {
            eprintln!("skipping: needs root and ip");
            return;
        }
        let ns = crate::util::testing::TestNetns::new(format!("lume-nds-{}", std::process::id()));
        let ip = |args: &str| ns.ip(&args.split_whitespace().collect::<Vec<_>>());
        ip("link add ndA type veth peer name ndB");
        ip("link set ndB address 52:54:00:12:34:56");
        ip("link set ndA up");
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let snooper = ns.spawn(move || {
            let mut sn = NdpSnooper::open("ndA").unwrap();
            ready_tx.send(()).unwrap();
            let mut x = Announcements::new(MAC, Watched::Tap);
            let want = a("2001:db8:ff::5");
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline && !x.addresses().contains(&want) {
                sn.watch(&mut x, Duration::from_millis(200)).unwrap();
            }
            // The link-local probe comes first; give stragglers a moment.
            sn.watch(&mut x, Duration::from_millis(300)).unwrap();
            x.addresses()
        });
        ready_rx.recv().unwrap();
        ip("link set ndB up");
        ip("addr add 2001:db8:ff::5/64 dev ndB");
        assert_eq!(snooper.join().unwrap(), vec![a("2001:db8:ff::5")]);
    }

    proptest::proptest! {
        #[test]
        fn the_parser_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = parse_nd(&bytes);
            let mut x = Announcements::new(MAC, Watched::Tap);
            let _ = x.observe(&bytes, false, Instant::now());
            let _ = x.observe(&bytes, true, Instant::now());
        }

        #[test]
        fn a_mutated_probe_never_panics_the_parser(at in 0usize..90, value in proptest::num::u8::ANY, cut in 0usize..90) {
            let mut f = dad(MAC, a("2001:db8:ff::5"));
            if at < f.len() {
                f[at] = value;
            }
            f.truncate(f.len().saturating_sub(cut));
            let _ = parse_nd(&f);
            let mut x = Announcements::new(MAC, Watched::Tap);
            let _ = x.observe(&f, false, Instant::now());
        }
    }
}
