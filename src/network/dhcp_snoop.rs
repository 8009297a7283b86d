//! Learning a bridged VM's IPv4 address by watching its DHCP exchange.
//!
//! A bridged VM asks the LAN's DHCP server for an address; lume is not part of
//! that conversation, so it listens in: a packet socket on the VM's tap device
//! (in a Linux bridge, or joined to a plain interface by a macvlan, see
//! [`super::uplink`]; older runs watched a macvtap's parent interface) sees
//! the server's DHCPACK, whose
//! `chaddr` is the VM's MAC and whose `yiaddr` is the address the VM now has.
//!
//! The socket is `AF_PACKET`/`SOCK_RAW` with protocol `ETH_P_ALL`: on a tap
//! device the ACK travels *towards* the VM, which for the host is an outgoing
//! frame, and the kernel only copies outgoing frames to `ETH_P_ALL` sockets.
//! A classic BPF filter keeps everything but UDP from port 67 or 68 (and any
//! VLAN-tagged frame, which is parsed in user space) out of the socket, so a
//! busy parent interface costs little.
//!
//! Nothing on the wire is trusted ([`Exchange`]): an address is learned only
//! from a server-to-client BOOTREPLY (UDP 67→68, op 2) that is a DHCPACK,
//! whose `chaddr` is the guest's MAC, whose `xid` is one the guest itself used
//! in a DHCPDISCOVER or DHCPREQUEST, and that travels *towards* the guest. The
//! direction comes from the packet socket's `sll_pkttype`:
//!
//! | device watched | from the guest | towards the guest |
//! | --- | --- | --- |
//! | the VM's tap (in a bridge) | received (`PACKET_HOST`, `_BROADCAST`, `_OTHERHOST`) | `PACKET_OUTGOING` |
//! | a macvtap's parent (LAN uplink) | `PACKET_OUTGOING` | received |
//!
//! So the guest cannot forge its own ACK (it would travel the wrong way; on a
//! macvlan-joined tap, a frame the guest addresses to itself would come back
//! the right way, which is why [`super::uplink`] keeps those out), and
//! another host can only if it also echoes an `xid` the guest sent — which a
//! LAN neighbour can sniff from the broadcast DISCOVER: that residual trust
//! in the LAN is the guest's own (its DHCP client accepts the same ACK).
//!
//! When snooping is impossible or too late, [`neighbour_address`] looks the MAC
//! up in the kernel's neighbour table instead.

use std::io;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use super::kernel::packet::{PacketError, PacketSocket};

/// What a DHCPACK told the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DhcpAck {
    /// `yiaddr`: the address the client now holds.
    pub address: Ipv4Addr,
    /// Option 51, the lease time in seconds (`u32::MAX` means infinite).
    pub lease_secs: Option<u32>,
    /// Option 54, the server identifier.
    pub server: Option<Ipv4Addr>,
}

#[derive(Debug, thiserror::Error)]
pub enum SnoopError {
    #[error("Invalid network interface name {0:?}")]
    InvalidInterfaceName(String),
    #[error("No network interface named {0}")]
    NoSuchInterface(String),
    #[error(
        "Watching DHCP traffic on {ifname} needs CAP_NET_RAW: run lume as root or grant it the capability"
    )]
    PermissionDenied { ifname: String },
    #[error("Could not open a packet socket on {ifname}: {source}")]
    Open { ifname: String, source: io::Error },
    #[error("Could not read from the packet socket on {ifname}: {source}")]
    Receive { ifname: String, source: io::Error },
}

/// A packet socket bound to one interface, waiting for DHCPACKs.
#[derive(Debug)]
pub struct DhcpSnooper {
    socket: PacketSocket,
    buf: Vec<u8>,
}

/// Largest frame read; DHCP messages are far smaller, longer frames (GRO) are
/// truncated and then simply fail to parse or parse from their prefix.
const FRAME_BUF: usize = 65536;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const BOOTP_SERVER_PORT: u16 = 67;
const BOOTP_CLIENT_PORT: u16 = 68;
const DHCP_MAGIC: [u8; 4] = [99, 130, 83, 99];
const DHCPACK: u8 = 5;

impl DhcpSnooper {
    /// Opens a packet socket on interface `ifname` (by ifindex). Needs CAP_NET_RAW.
    pub fn open(ifname: &str) -> Result<Self, SnoopError> {
        let socket = PacketSocket::open(ifname, &mut bpf_filter()).map_err(|e| match e {
            PacketError::InvalidInterfaceName(name) => SnoopError::InvalidInterfaceName(name),
            PacketError::NoSuchInterface(name) => SnoopError::NoSuchInterface(name),
            PacketError::Open { ifname, source } => match source.raw_os_error() {
                Some(libc::EPERM | libc::EACCES) => SnoopError::PermissionDenied { ifname },
                _ => SnoopError::Open { ifname, source },
            },
            PacketError::Receive { ifname, source } => SnoopError::Receive { ifname, source },
        })?;
        Ok(Self {
            socket,
            buf: vec![0; FRAME_BUF],
        })
    }

    /// The interface this snooper listens on.
    pub fn interface(&self) -> &str {
        self.socket.interface()
    }

    /// Waits up to `timeout` for the next DHCPACK `exchange` accepts and
    /// returns it; `Ok(None)` when the time ran out first. Every other frame
    /// is only shown to `exchange` (the guest's requests) or skipped.
    pub fn next_ack(
        &mut self,
        exchange: &mut Exchange,
        timeout: Duration,
    ) -> Result<Option<DhcpAck>, SnoopError> {
        let deadline = Instant::now().checked_add(timeout);
        loop {
            let got = self
                .socket
                .recv(&mut self.buf, deadline)
                .map_err(|e| match e {
                    PacketError::Receive { ifname, source }
                    | PacketError::Open { ifname, source } => {
                        SnoopError::Receive { ifname, source }
                    }
                    PacketError::InvalidInterfaceName(name) => {
                        SnoopError::InvalidInterfaceName(name)
                    }
                    PacketError::NoSuchInterface(name) => SnoopError::NoSuchInterface(name),
                })?;
            let Some((len, outgoing)) = got else {
                return Ok(None);
            };
            if let Some(ack) = exchange.observe(&self.buf[..len], outgoing) {
                return Ok(Some(ack));
            }
            // Bounded even under a flood of frames that pass the filter.
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(None);
            }
        }
    }
}

/// Classic BPF: accept unfragmented IPv4 UDP from port 67 or 68 (what
/// [`Exchange`] can use) and any 802.1Q/802.1ad tagged frame; drop the rest.
fn bpf_filter() -> Vec<libc::sock_filter> {
    use crate::network::kernel::packet::{bpf_jump as jump, bpf_stmt as stmt};
    use libc::{
        BPF_ABS, BPF_B, BPF_H, BPF_IND, BPF_JEQ, BPF_JMP, BPF_JSET, BPF_K, BPF_LD, BPF_LDX,
        BPF_MSH, BPF_RET,
    };
    const ACCEPT: u32 = 0x0004_0000; // snap length: more than any DHCP frame
    // Jump offsets count the instructions skipped: DROP is 12, ACCEPT 13.
    vec![
        /* 0 */ stmt(BPF_LD | BPF_H | BPF_ABS, 12), // ethertype
        /* 1 */ jump(BPF_JMP | BPF_JEQ | BPF_K, u32::from(ETH_P_8021Q), 11, 0),
        /* 2 */ jump(BPF_JMP | BPF_JEQ | BPF_K, u32::from(ETH_P_8021AD), 10, 0),
        /* 3 */ jump(BPF_JMP | BPF_JEQ | BPF_K, u32::from(ETH_P_IP), 0, 8),
        /* 4 */ stmt(BPF_LD | BPF_B | BPF_ABS, 23), // IP protocol
        /* 5 */ jump(BPF_JMP | BPF_JEQ | BPF_K, libc::IPPROTO_UDP as u32, 0, 6),
        /* 6 */ stmt(BPF_LD | BPF_H | BPF_ABS, 20), // flags + fragment offset
        /* 7 */ jump(BPF_JMP | BPF_JSET | BPF_K, 0x3fff, 4, 0), // MF or offset
        /* 8 */ stmt(BPF_LDX | BPF_B | BPF_MSH, 14), // X = IP header length
        /* 9 */ stmt(BPF_LD | BPF_H | BPF_IND, 14), // UDP source port
        /* 10 */
        jump(
            BPF_JMP | BPF_JEQ | BPF_K,
            u32::from(BOOTP_SERVER_PORT),
            2,
            0,
        ),
        /* 11 */
        jump(
            BPF_JMP | BPF_JEQ | BPF_K,
            u32::from(BOOTP_CLIENT_PORT),
            1,
            0,
        ),
        /* 12 */ stmt(BPF_RET | BPF_K, 0),
        /* 13 */ stmt(BPF_RET | BPF_K, ACCEPT),
    ]
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([s[0], s[1]]))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

/// One DHCP message as [`parse_dhcp`] read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DhcpMessage {
    /// Ethernet source and destination.
    pub eth_src: [u8; 6],
    pub eth_dst: [u8; 6],
    pub sport: u16,
    pub dport: u16,
    /// BOOTP op: 1 BOOTREQUEST, 2 BOOTREPLY.
    pub op: u8,
    pub xid: u32,
    pub chaddr: [u8; 6],
    pub yiaddr: Ipv4Addr,
    /// Option 53.
    pub message_type: Option<u8>,
    pub lease_secs: Option<u32>,
    pub server: Option<Ipv4Addr>,
}

const DHCPDISCOVER: u8 = 1;
const DHCPREQUEST: u8 = 3;

/// Parses an Ethernet frame (optionally with one 802.1Q/802.1ad tag) carrying
/// an unfragmented IPv4/UDP BOOTP message between ports 67 and 68 with
/// Ethernet hardware addresses and the DHCP magic cookie; `None` for anything
/// else, including truncated or malformed frames. Never panics (a property
/// test feeds it arbitrary bytes). Checksums are not verified: outgoing
/// frames seen on a packet socket often carry offloaded, not yet computed,
/// checksums.
pub fn parse_dhcp(frame: &[u8]) -> Option<DhcpMessage> {
    // Ethernet.
    let mut eth_dst = [0u8; 6];
    eth_dst.copy_from_slice(frame.get(0..6)?);
    let mut eth_src = [0u8; 6];
    eth_src.copy_from_slice(frame.get(6..12)?);
    let mut ethertype = be16(frame, 12)?;
    let mut l3 = 14;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        ethertype = be16(frame, 16)?;
        l3 = 18;
    }
    if ethertype != ETH_P_IP {
        return None;
    }
    let ip = frame.get(l3..)?;

    // IPv4.
    let vihl = *ip.first()?;
    if vihl >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(vihl & 0x0f) * 4;
    let total = usize::from(be16(ip, 2)?);
    if ihl < 20 || total < ihl || total > ip.len() {
        return None;
    }
    let frag = be16(ip, 6)?;
    if frag & 0x3fff != 0 || *ip.get(9)? != libc::IPPROTO_UDP as u8 {
        return None;
    }
    // Trim Ethernet padding.
    let udp = ip.get(ihl..total)?;

    // UDP.
    let sport = be16(udp, 0)?;
    let dport = be16(udp, 2)?;
    let ports = [BOOTP_SERVER_PORT, BOOTP_CLIENT_PORT];
    if !ports.contains(&sport) || !ports.contains(&dport) {
        return None;
    }
    let ulen = usize::from(be16(udp, 4)?);
    if ulen < 8 || ulen > udp.len() {
        return None;
    }
    let bootp = udp.get(8..ulen)?;

    // BOOTP: op, htype, hlen, hops, xid, secs, flags, ciaddr, yiaddr, siaddr,
    // giaddr, chaddr[16], sname[64], file[128], then the magic cookie.
    if bootp.len() < 240 || !matches!(bootp[0], 1 | 2) || bootp[1] != 1 || bootp[2] != 6 {
        return None;
    }
    if bootp[236..240] != DHCP_MAGIC {
        return None;
    }
    let xid = be32(bootp, 4)?;
    let yiaddr = Ipv4Addr::from(be32(bootp, 16)?);
    let mut chaddr = [0u8; 6];
    chaddr.copy_from_slice(&bootp[28..34]);

    // Options. Overload (52) is ignored: the options that matter here are
    // always in the main area in practice.
    let opts = &bootp[240..];
    let mut message_type = None;
    let mut lease_secs = None;
    let mut server = None;
    let mut i = 0;
    while i < opts.len() {
        let code = opts[i];
        match code {
            0 => {
                i += 1;
                continue;
            }
            255 => break,
            _ => {}
        }
        let len = usize::from(*opts.get(i + 1)?);
        let value = opts.get(i + 2..i + 2 + len)?;
        match (code, len) {
            (53, 1) => {
                message_type.get_or_insert(value[0]);
            }
            (51, 4) => {
                lease_secs.get_or_insert(be32(value, 0)?);
            }
            (54, 4) => {
                server.get_or_insert(Ipv4Addr::from(be32(value, 0)?));
            }
            _ => {}
        }
        i += 2 + len;
    }
    Some(DhcpMessage {
        eth_src,
        eth_dst,
        sport,
        dport,
        op: bootp[0],
        xid,
        chaddr,
        yiaddr,
        message_type,
        lease_secs,
        server,
    })
}

/// A server-to-client DHCPACK (BOOTREPLY, UDP 67→68, option 53 = 5) with an
/// address: its `chaddr` and what it granted. Says nothing about whether it
/// can be trusted: that is [`Exchange::observe`]'s job.
pub fn parse_ack(frame: &[u8]) -> Option<([u8; 6], DhcpAck)> {
    let m = parse_dhcp(frame)?;
    let is_ack = m.op == 2
        && m.sport == BOOTP_SERVER_PORT
        && m.dport == BOOTP_CLIENT_PORT
        && m.message_type == Some(DHCPACK)
        && !m.yiaddr.is_unspecified();
    is_ack.then_some((
        m.chaddr,
        DhcpAck {
            address: m.yiaddr,
            lease_secs: m.lease_secs,
            server: m.server,
        },
    ))
}

/// Which device a snooper watches, which decides the direction of a frame
/// towards the guest (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watched {
    /// The guest's own tap: frames to the guest are `PACKET_OUTGOING`.
    Tap,
    /// A macvtap's parent: frames from the guest are `PACKET_OUTGOING`.
    MacvtapParent,
}

/// The guest's side of one DHCP conversation, as far as a snooper saw it.
#[derive(Debug, Clone)]
pub struct Exchange {
    mac: [u8; 6],
    watched: Watched,
    /// Transaction ids of the guest's latest DISCOVERs and REQUESTs.
    xids: std::collections::VecDeque<u32>,
}

/// How many of the guest's transaction ids are remembered.
const XIDS: usize = 16;

impl Exchange {
    pub fn new(mac: [u8; 6], watched: Watched) -> Self {
        Self {
            mac,
            watched,
            xids: std::collections::VecDeque::new(),
        }
    }

    /// Looks at one frame; `outgoing` is whether the packet socket saw it
    /// as `PACKET_OUTGOING`. Remembers the guest's requests; returns an ACK
    /// only when it answers one of them, is addressed to the guest and
    /// travels towards it.
    pub fn observe(&mut self, frame: &[u8], outgoing: bool) -> Option<DhcpAck> {
        let m = parse_dhcp(frame)?;
        let towards_guest = match self.watched {
            Watched::Tap => outgoing,
            Watched::MacvtapParent => !outgoing,
        };
        if m.chaddr != self.mac {
            return None;
        }
        if !towards_guest {
            let request = m.op == 1
                && m.sport == BOOTP_CLIENT_PORT
                && m.dport == BOOTP_SERVER_PORT
                && m.eth_src == self.mac
                && matches!(m.message_type, Some(DHCPDISCOVER | DHCPREQUEST));
            if request && !self.xids.contains(&m.xid) {
                if self.xids.len() == XIDS {
                    self.xids.pop_front();
                }
                self.xids.push_back(m.xid);
            }
            return None;
        }
        let to_guest = m.eth_dst == self.mac || m.eth_dst == [0xff; 6];
        let (chaddr, ack) = parse_ack(frame)?;
        (chaddr == self.mac && to_guest && self.xids.contains(&m.xid)).then_some(ack)
    }
}

/// Fallback: the neighbour table entry for `mac` (on `ifname` if given), if
/// any. Only complete entries (flag ATF_COM, 0x2) count.
pub fn neighbour_address(mac: [u8; 6], ifname: Option<&str>) -> Option<Ipv4Addr> {
    // /proc/net follows the thread group leader's network namespace;
    // thread-self follows the calling thread's, which is what a thread that
    // entered another namespace means.
    let text = std::fs::read_to_string("/proc/thread-self/net/arp")
        .or_else(|_| std::fs::read_to_string("/proc/net/arp"))
        .ok()?;
    parse_arp_table(&text, mac, ifname)
}

/// Parses `/proc/net/arp` text:
///
/// ```text
/// IP address       HW type     Flags       HW address            Mask     Device
/// 192.0.2.1        0x1         0x2         02:00:00:00:00:01     *        eth0
/// ```
pub fn parse_arp_table(text: &str, mac: [u8; 6], ifname: Option<&str>) -> Option<Ipv4Addr> {
    const ATF_COM: u32 = 0x2;
    text.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [ip, _hw_type, flags, hw, _mask, dev] = f[..] else {
            return None;
        };
        let flags =
            u32::from_str_radix(flags.trim_start_matches("0x").trim_start_matches("0X"), 16)
                .ok()?;
        if flags & ATF_COM == 0 || parse_mac(hw)? != mac {
            return None;
        }
        if ifname.is_some_and(|want| want != dev) {
            return None;
        }
        ip.parse().ok()
    })
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut out {
        let p = parts.next()?;
        if p.is_empty() || p.len() > 2 {
            return None;
        }
        *byte = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x02, 0x6c, 0x75, 0x6d, 0x65, 0x01];

    /// Builds a BOOTP reply frame. `options` are the raw DHCP options after
    /// the cookie (include 255 yourself if wanted).
    fn frame(vlan: bool, sport: u16, dport: u16, op: u8, options: &[u8]) -> Vec<u8> {
        let mut bootp = vec![0u8; 236];
        bootp[0] = op;
        bootp[1] = 1;
        bootp[2] = 6;
        bootp[4..8].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        bootp[16..20].copy_from_slice(&[192, 0, 2, 55]); // yiaddr
        bootp[20..24].copy_from_slice(&[192, 0, 2, 1]); // siaddr
        bootp[28..34].copy_from_slice(&MAC);
        bootp.extend_from_slice(&DHCP_MAGIC);
        bootp.extend_from_slice(options);

        let mut udp = Vec::new();
        udp.extend_from_slice(&sport.to_be_bytes());
        udp.extend_from_slice(&dport.to_be_bytes());
        udp.extend_from_slice(&((8 + bootp.len()) as u16).to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(&bootp);

        let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0];
        ip[2..4].copy_from_slice(&((20 + udp.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&[192, 0, 2, 1, 192, 0, 2, 55]);
        ip.extend_from_slice(&udp);

        let mut eth = Vec::new();
        eth.extend_from_slice(&MAC);
        eth.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
        if vlan {
            eth.extend_from_slice(&[0x81, 0x00, 0x00, 0x2a]);
        }
        eth.extend_from_slice(&[0x08, 0x00]);
        eth.extend_from_slice(&ip);
        eth
    }

    fn ack_options() -> Vec<u8> {
        vec![
            53, 1, 5, // DHCPACK
            0, 0, // pads
            54, 4, 192, 0, 2, 1, // server id
            51, 4, 0, 0, 0x0e, 0x10, // 3600 s
            1, 4, 255, 255, 255, 0, // netmask
            255,
        ]
    }

    fn ack_frame(vlan: bool) -> Vec<u8> {
        frame(vlan, 67, 68, 2, &ack_options())
    }

    fn expected() -> ([u8; 6], DhcpAck) {
        (
            MAC,
            DhcpAck {
                address: Ipv4Addr::new(192, 0, 2, 55),
                lease_secs: Some(3600),
                server: Some(Ipv4Addr::new(192, 0, 2, 1)),
            },
        )
    }

    /// The guest's DISCOVER (1) or REQUEST (3): from its MAC, broadcast.
    fn request(message_type: u8) -> Vec<u8> {
        let mut f = frame(false, 68, 67, 1, &[53, 1, message_type, 255]);
        f[0..6].copy_from_slice(&[0xff; 6]);
        f[6..12].copy_from_slice(&MAC);
        f
    }

    fn with_xid(mut f: Vec<u8>, xid: u32) -> Vec<u8> {
        // Ethernet 14 + IP 20 + UDP 8 + op/htype/hlen/hops 4.
        f[46..50].copy_from_slice(&xid.to_be_bytes());
        f
    }

    #[test]
    fn an_ack_counts_only_after_the_guests_own_request_and_towards_it() {
        for (watched, to_guest) in [(Watched::Tap, true), (Watched::MacvtapParent, false)] {
            let mut x = Exchange::new(MAC, watched);
            // An ACK nobody asked for (a forged one, or a stale replay).
            assert_eq!(x.observe(&ack_frame(false), to_guest), None, "{watched:?}");
            // The guest's DISCOVER, seen in the "from the guest" direction.
            assert_eq!(x.observe(&request(1), !to_guest), None);
            assert_eq!(
                x.observe(&ack_frame(false), to_guest),
                Some(expected().1),
                "{watched:?}"
            );
            // The same ACK travelling the other way: the guest sent it itself.
            assert_eq!(x.observe(&ack_frame(false), !to_guest), None, "{watched:?}");
            // Another transaction id.
            assert_eq!(
                x.observe(&with_xid(ack_frame(false), 7), to_guest),
                None,
                "{watched:?}"
            );
        }
    }

    #[test]
    fn forged_requests_and_replies_teach_nothing() {
        let mut x = Exchange::new(MAC, Watched::Tap);
        // A request in the "towards the guest" direction is not the guest's.
        x.observe(&request(3), true);
        assert_eq!(x.observe(&ack_frame(false), true), None);
        // A request from another MAC (chaddr ours, Ethernet source not).
        let mut other = request(3);
        other[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x77]);
        x.observe(&other, false);
        assert_eq!(x.observe(&ack_frame(false), true), None);
        // A DHCPINFORM (8) or DECLINE (4) does not open a transaction.
        x.observe(&request(8), false);
        x.observe(&request(4), false);
        assert_eq!(x.observe(&ack_frame(false), true), None);
        x.observe(&request(3), false);
        // Client-to-server direction ports, a BOOTREQUEST op, a NAK, another
        // chaddr, another Ethernet destination: none counts.
        assert_eq!(
            x.observe(&frame(false, 68, 67, 2, &ack_options()), true),
            None
        );
        assert_eq!(
            x.observe(&frame(false, 67, 68, 1, &ack_options()), true),
            None
        );
        assert_eq!(
            x.observe(&frame(false, 67, 68, 2, &[53, 1, 6, 255]), true),
            None
        );
        let mut stranger = ack_frame(false);
        stranger[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x77]);
        assert_eq!(x.observe(&stranger, true), None);
        let mut elsewhere = Exchange::new([0x02, 0, 0, 0, 0, 0x77], Watched::Tap);
        elsewhere.observe(&request(3), false);
        assert_eq!(elsewhere.observe(&ack_frame(false), true), None);
        // The real one still works, also broadcast.
        assert_eq!(x.observe(&ack_frame(false), true), Some(expected().1));
        let mut broadcast = ack_frame(false);
        broadcast[0..6].copy_from_slice(&[0xff; 6]);
        assert_eq!(x.observe(&broadcast, true), Some(expected().1));
    }

    #[test]
    fn only_the_latest_transaction_ids_are_kept() {
        let mut x = Exchange::new(MAC, Watched::Tap);
        x.observe(&request(1), false);
        for xid in 0..XIDS as u32 {
            x.observe(&with_xid(request(3), xid), false);
        }
        assert_eq!(
            x.observe(&ack_frame(false), true),
            None,
            "0xdeadbeef was evicted"
        );
        assert!(x.observe(&with_xid(ack_frame(false), 3), true).is_some());
    }

    proptest::proptest! {
        #[test]
        fn the_frame_parser_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..700)) {
            let _ = parse_dhcp(&bytes);
            let _ = parse_ack(&bytes);
            let mut x = Exchange::new(MAC, Watched::Tap);
            let _ = x.observe(&bytes, false);
            let _ = x.observe(&bytes, true);
        }

        #[test]
        fn a_mutated_dhcp_frame_never_panics_the_parser(
            at in 0usize..400,
            value in proptest::num::u8::ANY,
            cut in 0usize..400,
        ) {
            // Arbitrary bytes rarely get past the Ethernet and IP checks:
            // mutate a valid ACK instead, so the option walker is reached.
            let mut f = ack_frame(false);
            if at < f.len() {
                f[at] = value;
            }
            f.truncate(f.len().saturating_sub(cut));
            let _ = parse_dhcp(&f);
            let mut x = Exchange::new(MAC, Watched::Tap);
            x.observe(&request(1), false);
            let _ = x.observe(&f, true);
        }
    }

    #[test]
    fn parses_ack() {
        assert_eq!(parse_ack(&ack_frame(false)), Some(expected()));
    }

    #[test]
    fn parses_vlan_tagged_ack() {
        assert_eq!(parse_ack(&ack_frame(true)), Some(expected()));
        let mut qinq = ack_frame(true);
        qinq[12..14].copy_from_slice(&[0x88, 0xa8]);
        assert_eq!(parse_ack(&qinq), Some(expected()));
    }

    #[test]
    fn ethernet_padding_is_ignored() {
        let mut f = ack_frame(false);
        f.extend_from_slice(&[0xaa; 32]);
        assert_eq!(parse_ack(&f), Some(expected()));
    }

    #[test]
    fn ack_without_optional_options() {
        let f = frame(false, 67, 68, 2, &[53, 1, 5]); // no end option either
        let (mac, ack) = parse_ack(&f).unwrap();
        assert_eq!(mac, MAC);
        assert_eq!(ack.address, Ipv4Addr::new(192, 0, 2, 55));
        assert_eq!(ack.lease_secs, None);
        assert_eq!(ack.server, None);
    }

    #[test]
    fn options_after_end_are_ignored() {
        let f = frame(false, 67, 68, 2, &[53, 1, 2, 255, 53, 1, 5]);
        assert_eq!(parse_ack(&f), None);
        let f = frame(false, 67, 68, 2, &[53, 1, 5, 255, 51, 4, 1, 2]);
        assert_eq!(parse_ack(&f).unwrap().1.lease_secs, None);
    }

    #[test]
    fn other_message_types_are_ignored() {
        for mt in [1u8, 2, 3, 4, 6, 7, 8] {
            let mut o = ack_options();
            o[2] = mt;
            assert_eq!(parse_ack(&frame(false, 67, 68, 2, &o)), None, "type {mt}");
        }
        // A REQUEST as a client sends it: op 1, 68 -> 67.
        let mut o = ack_options();
        o[2] = 3;
        assert_eq!(parse_ack(&frame(false, 68, 67, 1, &o)), None);
        // Even an ACK type in a BOOTREQUEST is not a reply.
        assert_eq!(parse_ack(&frame(false, 68, 67, 1, &ack_options())), None);
    }

    #[test]
    fn wrong_ports_protocol_or_fragments_are_ignored() {
        assert_eq!(parse_ack(&frame(false, 53, 68, 2, &ack_options())), None);
        assert_eq!(parse_ack(&frame(false, 67, 5353, 2, &ack_options())), None);
        let mut f = ack_frame(false);
        f[14 + 9] = 6; // TCP
        assert_eq!(parse_ack(&f), None);
        let mut f = ack_frame(false);
        f[14 + 6] = 0x20; // more fragments
        assert_eq!(parse_ack(&f), None);
        let mut f = ack_frame(false);
        f[12..14].copy_from_slice(&[0x86, 0xdd]); // IPv6 ethertype
        assert_eq!(parse_ack(&f), None);
    }

    #[test]
    fn ip_options_are_skipped() {
        // Rebuild with IHL 6 (one 4-byte IP option).
        let f = ack_frame(false);
        let mut g = f[..14 + 20].to_vec();
        g.extend_from_slice(&[1, 1, 1, 0]); // NOP NOP NOP EOL
        g.extend_from_slice(&f[14 + 20..]);
        g[14] = 0x46;
        let total = u16::from_be_bytes([g[16], g[17]]) + 4;
        g[16..18].copy_from_slice(&total.to_be_bytes());
        assert_eq!(parse_ack(&g), Some(expected()));
    }

    #[test]
    fn unspecified_yiaddr_is_ignored() {
        let mut f = ack_frame(false);
        let yi = 14 + 20 + 8 + 16;
        f[yi..yi + 4].copy_from_slice(&[0, 0, 0, 0]);
        assert_eq!(parse_ack(&f), None);
    }

    #[test]
    fn every_truncation_is_rejected_without_panic() {
        for vlan in [false, true] {
            let f = ack_frame(vlan);
            for len in 0..f.len() {
                // The options' end marker is the only byte that may go: an
                // ACK without the end option is still an ACK.
                let r = parse_ack(&f[..len]);
                if len == f.len() - 1 {
                    continue;
                }
                assert_eq!(r, None, "vlan {vlan} len {len}");
            }
        }
    }

    #[test]
    fn inconsistent_lengths_are_rejected() {
        let base = ack_frame(false);
        // IHL below 5 and beyond the frame.
        for ihl in [0u8, 1, 4, 15] {
            let mut f = base.clone();
            f[14] = 0x40 | ihl;
            assert_eq!(parse_ack(&f), None, "ihl {ihl}");
        }
        // IP total length larger than the frame, smaller than the header.
        for total in [0u16, 19, u16::MAX] {
            let mut f = base.clone();
            f[16..18].copy_from_slice(&total.to_be_bytes());
            assert_eq!(parse_ack(&f), None, "total {total}");
        }
        // UDP length smaller than its header or beyond the IP payload.
        for ulen in [0u16, 7, 8, 100, u16::MAX] {
            let mut f = base.clone();
            f[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&ulen.to_be_bytes());
            assert_eq!(parse_ack(&f), None, "ulen {ulen}");
        }
        // Wrong IP version, htype, hlen, cookie.
        for (at, v) in [
            (14, 0x65),
            (14 + 28 + 1, 6),
            (14 + 28 + 2, 8),
            (14 + 28 + 236, 0),
        ] {
            let mut f = base.clone();
            f[at] = v;
            assert_eq!(parse_ack(&f), None, "byte {at}");
        }
    }

    #[test]
    fn garbage_options_are_rejected_without_panic() {
        // An option whose length runs off the end.
        assert_eq!(
            parse_ack(&frame(false, 67, 68, 2, &[53, 1, 5, 12, 200, b'x'])),
            None
        );
        // Length byte missing.
        assert_eq!(parse_ack(&frame(false, 67, 68, 2, &[53, 1, 5, 12])), None);
        // Wrong lengths for the known options are skipped, not trusted.
        let f = frame(
            false,
            67,
            68,
            2,
            &[53, 1, 5, 51, 2, 1, 2, 54, 3, 1, 2, 3, 255],
        );
        let (_, ack) = parse_ack(&f).unwrap();
        assert_eq!((ack.lease_secs, ack.server), (None, None));
        // Message type with a bad length is not a message type.
        assert_eq!(
            parse_ack(&frame(false, 67, 68, 2, &[53, 2, 5, 5, 255])),
            None
        );
        // Only pads.
        assert_eq!(parse_ack(&frame(false, 67, 68, 2, &[0; 64])), None);
        // Pseudo-random garbage after a valid type must never panic.
        let mut seed = 0x1234_5678u32;
        for _ in 0..2000 {
            let mut o = vec![53, 1, 5];
            for _ in 0..(seed % 64) {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                o.push((seed >> 16) as u8);
            }
            let _ = parse_ack(&frame(seed & 1 == 0, 67, 68, 2, &o));
        }
        // Garbage frames of every small size.
        for len in 0..400 {
            let g: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            assert_eq!(parse_ack(&g), None);
        }
    }

    #[test]
    fn first_occurrence_of_an_option_wins() {
        let f = frame(
            false,
            67,
            68,
            2,
            &[53, 1, 5, 51, 4, 0, 0, 0, 60, 51, 4, 0, 0, 0, 90, 255],
        );
        assert_eq!(parse_ack(&f).unwrap().1.lease_secs, Some(60));
    }

    const ARP: &str = "\
IP address       HW type     Flags       HW address            Mask     Device
192.0.2.9        0x1         0x0         02:6c:75:6d:65:01     *        br0
192.0.2.10       0x1         0x2         02:6c:75:6d:65:01     *        br0
192.0.2.11       0x1         0x2         02:6c:75:6d:65:01     *        eth1
192.0.2.12       0x1         0x6         02:6c:75:6d:65:02     *        br0
garbage line
192.0.2.13       0x1         0x2         zz:6c:75:6d:65:03     *        br0
";

    #[test]
    fn arp_table_parsing() {
        assert_eq!(
            parse_arp_table(ARP, MAC, None),
            Some(Ipv4Addr::new(192, 0, 2, 10))
        );
        assert_eq!(
            parse_arp_table(ARP, MAC, Some("eth1")),
            Some(Ipv4Addr::new(192, 0, 2, 11))
        );
        assert_eq!(parse_arp_table(ARP, MAC, Some("eth9")), None);
        // Permanent entries (0x6) are complete too.
        let mac2 = [0x02, 0x6c, 0x75, 0x6d, 0x65, 0x02];
        assert_eq!(
            parse_arp_table(ARP, mac2, Some("br0")),
            Some(Ipv4Addr::new(192, 0, 2, 12))
        );
        // Upper-case MAC and flags still parse.
        let upper = "IP address HW type Flags HW address Mask Device\n\
                     192.0.2.14 0x1 0X2 02:6C:75:6D:65:01 * br0\n";
        assert_eq!(
            parse_arp_table(upper, MAC, Some("br0")),
            Some(Ipv4Addr::new(192, 0, 2, 14))
        );
        // Incomplete only.
        let only_incomplete = ARP.lines().take(2).collect::<Vec<_>>().join("\n");
        assert_eq!(parse_arp_table(&only_incomplete, MAC, None), None);
        assert_eq!(parse_arp_table("", MAC, None), None);
        // The header line is never data, even if it looked like it.
        assert_eq!(
            parse_arp_table(ARP.lines().nth(2).unwrap(), MAC, None),
            None
        );
    }

    #[test]
    fn mac_parsing() {
        assert_eq!(parse_mac("02:6c:75:6d:65:01"), Some(MAC));
        assert_eq!(
            parse_mac("2:6c:75:6d:65:1"),
            Some([2, 0x6c, 0x75, 0x6d, 0x65, 1])
        );
        assert_eq!(parse_mac("02:6c:75:6d:65"), None);
        assert_eq!(parse_mac("02:6c:75:6d:65:01:00"), None);
        assert_eq!(parse_mac("02:6c:75:6d:65:"), None);
        assert_eq!(parse_mac("00:00:00:00:00:000"), None);
    }

    #[test]
    fn open_rejects_bad_names() {
        assert!(matches!(
            DhcpSnooper::open(""),
            Err(SnoopError::InvalidInterfaceName(_))
        ));
        assert!(matches!(
            DhcpSnooper::open("a/b"),
            Err(SnoopError::InvalidInterfaceName(_))
        ));
        assert!(matches!(
            DhcpSnooper::open("x\0y"),
            Err(SnoopError::InvalidInterfaceName(_))
        ));
        assert!(matches!(
            DhcpSnooper::open("0123456789abcdef"),
            Err(SnoopError::InvalidInterfaceName(_))
        ));
        assert!(matches!(
            DhcpSnooper::open("lume-no-such0"),
            Err(SnoopError::NoSuchInterface(_))
        ));
    }

    /// A real DHCP exchange between dnsmasq and busybox udhcpc over a veth
    /// pair whose ends live in two throwaway network namespaces; the root
    /// namespace is never touched. Skipped unless root with the tools present.
    mod real {
        use super::super::*;
        use std::fs::File;
        use std::path::Path;
        use std::process::{Child, Command, Stdio};
        use std::sync::mpsc;

        const CLIENT_MAC: [u8; 6] = [0x02, 0x6c, 0x75, 0x6d, 0x65, 0x5a];
        const OTHER_MAC: [u8; 6] = [0x02, 0x6c, 0x75, 0x6d, 0x65, 0x5b];

        struct Netns {
            server: String,
            client: String,
            dnsmasq: Option<Child>,
        }

        impl Drop for Netns {
            fn drop(&mut self) {
                if let Some(mut child) = self.dnsmasq.take() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                for ns in [&self.server, &self.client] {
                    let _ = Command::new("ip")
                        .args(["netns", "delete", ns])
                        .stderr(Stdio::null())
                        .status();
                }
            }
        }

        fn ip(args: &[&str]) {
            let out = Command::new("ip").args(args).output().expect("run ip");
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }

        /// A real dnsmasq in namespace `ns` serving 192.0.2.50-60 on
        /// `iface`, its files and log (`dnsmasq.log`) in `dir`.
        fn test_dnsmasq(ns: &str, iface: &str, dir: &std::path::Path) -> std::process::Child {
            let log = File::create(dir.join("dnsmasq.log")).unwrap();
            Command::new("ip")
                .args(["netns", "exec", ns, "dnsmasq", "--no-daemon"])
                .args(["--conf-file=/dev/null", "--bind-interfaces"])
                .arg(format!("--interface={iface}"))
                .arg("--except-interface=lo")
                .arg("--dhcp-range=192.0.2.50,192.0.2.60,255.255.255.0,2m")
                .arg(format!("--dhcp-leasefile={}", dir.join("leases").display()))
                .arg(format!("--pid-file={}", dir.join("pid").display()))
                .args(["--port=0", "--user=root", "--log-facility=-", "--log-dhcp"])
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("spawn dnsmasq")
        }

        /// Root and the real tools these tests drive; says so when missing.
        fn can_run() -> bool {
            let tools = ["/usr/sbin/dnsmasq", "/bin/busybox", "/usr/sbin/ip"];
            let ok =
                nix::unistd::geteuid().is_root() && tools.iter().all(|t| Path::new(t).exists());
            if !ok {
                eprintln!("skipping: needs root, dnsmasq, busybox and ip");
            }
            ok
        }

        fn mac_str(m: [u8; 6]) -> String {
            m.map(|b| format!("{b:02x}")).join(":")
        }

        #[test]
        fn snoops_a_real_dhcp_exchange() {
            if !can_run() {
                return;
            }
            let pid = std::process::id();
            let mut ns = Netns {
                server: format!("lume-ds-{pid}"),
                client: format!("lume-dc-{pid}"),
                dnsmasq: None,
            };
            let (s, c) = (ns.server.clone(), ns.client.clone());
            ip(&["netns", "add", &s]);
            ip(&["netns", "add", &c]);
            // Created inside the server namespace, the peer moved straight
            // into the client one: neither end ever exists in the root one.
            ip(&[
                "-n", &s, "link", "add", "dsA", "type", "veth", "peer", "name", "dsB", "netns", &c,
            ]);
            ip(&[
                "-n",
                &c,
                "link",
                "set",
                "dsB",
                "address",
                &mac_str(CLIENT_MAC),
            ]);
            ip(&["-n", &s, "addr", "add", "192.0.2.1/24", "dev", "dsA"]);
            ip(&["-n", &s, "link", "set", "dsA", "up"]);
            ip(&["-n", &s, "link", "set", "lo", "up"]);
            ip(&["-n", &c, "link", "set", "dsB", "up"]);

            // The snooper thread enters the server namespace before opening
            // its socket, and reports once it listens.
            let (ready_tx, ready_rx) = mpsc::channel();
            let ns_path = format!("/run/netns/{s}");
            let snooper = std::thread::spawn(move || {
                let f = File::open(&ns_path).expect("open netns");
                nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                let mut sn = DhcpSnooper::open("dsA").expect("open snooper");
                // A MAC nobody uses: times out cleanly.
                let mut other = Exchange::new(OTHER_MAC, Watched::Tap);
                let none = sn.next_ack(&mut other, Duration::from_millis(200));
                ready_tx.send(()).unwrap();
                // dsA plays the guest's tap: the server's replies leave through it.
                let mut client = Exchange::new(CLIENT_MAC, Watched::Tap);
                let ack = sn.next_ack(&mut client, Duration::from_secs(40));
                (
                    none.map_err(|e| e.to_string()),
                    ack.map_err(|e| e.to_string()),
                )
            });
            ready_rx
                .recv_timeout(Duration::from_secs(10))
                .expect("snooper ready");

            let dir = tempfile::tempdir().unwrap();
            ns.dnsmasq = Some(test_dnsmasq(&s, "dsA", dir.path()));

            let client = Command::new("ip")
                .args(["netns", "exec", &c, "busybox", "udhcpc", "-f", "-q", "-n"])
                .args(["-i", "dsB", "-s", "/bin/true", "-t", "10", "-T", "1"])
                .stdin(Stdio::null())
                .output()
                .expect("run udhcpc");
            let client_out = format!(
                "{}{}",
                String::from_utf8_lossy(&client.stdout),
                String::from_utf8_lossy(&client.stderr)
            );
            let dnsmasq_log =
                std::fs::read_to_string(dir.path().join("dnsmasq.log")).unwrap_or_default();
            assert!(
                client.status.success(),
                "udhcpc failed:\n{client_out}\ndnsmasq:\n{dnsmasq_log}"
            );

            let (none, ack) = snooper.join().expect("snooper thread");
            assert_eq!(none, Ok(None));
            let ack = ack.expect("next_ack").unwrap_or_else(|| {
                panic!("no ACK seen\nudhcpc:\n{client_out}\ndnsmasq:\n{dnsmasq_log}")
            });
            let o = ack.address.octets();
            assert!(
                o[..3] == [192, 0, 2] && (50..=60).contains(&o[3]),
                "{ack:?}"
            );
            assert!(
                client_out.contains(&format!("lease of {} obtained", ack.address)),
                "snooped {} but udhcpc said:\n{client_out}",
                ack.address
            );
            assert_eq!(ack.lease_secs, Some(120));
            assert_eq!(ack.server, Some(Ipv4Addr::new(192, 0, 2, 1)));
        }
        /// Bridged mode's path (see `network::uplink`): the guest's tap,
        /// joined to the parent by a macvlan and tc redirects. The snooper
        /// watches the tap. The guest's own REQUEST (written into the tap,
        /// as QEMU does) is remembered; an ACK the guest writes to itself is
        /// ignored; the same ACK sent by a LAN host arrives through the
        /// parent, the macvlan and the redirect, and is learned.
        #[test]
        fn snoops_on_the_tap_of_a_macvlan_uplink_and_ignores_the_guests_own_ack() {
            if !can_run() || !Path::new("/usr/bin/python3").exists() {
                return;
            }
            use super::{MAC, ack_frame, request, with_xid};
            let pid = std::process::id();
            let ns = Netns {
                server: format!("lume-us-{pid}"),
                client: format!("lume-uh-{pid}"),
                dnsmasq: None,
            };
            let (s, h) = (ns.server.clone(), ns.client.clone());
            ip(&["netns", "add", &s]);
            ip(&["netns", "add", &h]);
            ip(&[
                "-n", &s, "link", "add", "usA", "type", "veth", "peer", "name", "usB", "netns", &h,
            ]);
            ip(&["-n", &s, "link", "set", "usA", "up"]);
            ip(&["-n", &h, "link", "set", "usB", "up"]);

            const XID: u32 = 0x4c55_4d45;
            let (ready_tx, ready_rx) = mpsc::channel();
            let (injected_tx, injected_rx) = mpsc::channel::<()>();
            let ns_path = format!("/run/netns/{h}");
            let host = std::thread::spawn(move || {
                use std::io::Write;
                let f = File::open(&ns_path).expect("open netns");
                nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                let tap = crate::network::kernel::tap::Tap::create("lume-ut0").unwrap();
                let uplink = crate::network::uplink::Uplink {
                    tap: tap.name.clone(),
                    macvlan: "lume-umv0".into(),
                    parent: "usB".into(),
                    mac: MAC,
                };
                let mut nl = crate::network::kernel::netlink::Netlink::open().unwrap();
                uplink.prepare_tap(&mut nl).unwrap();
                uplink.connect(&mut nl).unwrap();
                let mut sn = DhcpSnooper::open("lume-ut0").expect("open snooper");
                let mut x = Exchange::new(MAC, Watched::Tap);
                // What QEMU writes: a virtio-net header (10 bytes, no
                // offload), then the frame.
                let mut guest = File::from(tap.fd);
                // Forged by the guest: to itself, and to everyone.
                let mut broadcast_ack = with_xid(ack_frame(false), XID);
                broadcast_ack[0..6].copy_from_slice(&[0xff; 6]);
                for frame in [
                    with_xid(request(3), XID),
                    with_xid(ack_frame(false), XID),
                    broadcast_ack,
                ] {
                    let mut buf = vec![0u8; 10];
                    buf.extend_from_slice(&frame);
                    guest.write_all(&buf).unwrap();
                }
                let forged = sn.next_ack(&mut x, Duration::from_millis(500));
                ready_tx.send(()).unwrap();
                injected_rx.recv().unwrap();
                let from_lan = sn.next_ack(&mut x, Duration::from_secs(10));
                drop(guest);
                (
                    forged.map_err(|e| e.to_string()),
                    from_lan.map_err(|e| e.to_string()),
                )
            });
            ready_rx
                .recv_timeout(Duration::from_secs(10))
                .expect("the host side ready");
            let hex: String = with_xid(ack_frame(false), XID)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            let out = Command::new("ip")
                .args(["netns", "exec", &s, "python3", "-c"])
                .arg(format!(
                    "import socket; s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW); \
                     s.bind(('usA', 0)); s.send(bytes.fromhex('{hex}'))"
                ))
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            injected_tx.send(()).unwrap();
            let (forged, from_lan) = host.join().expect("host thread");
            assert_eq!(forged, Ok(None), "the guest's own ACK was taken");
            let ack = from_lan
                .unwrap()
                .expect("the LAN's ACK never reached the tap");
            assert_eq!(ack.address, Ipv4Addr::new(192, 0, 2, 55));
        }

        /// A macvtap guest's frames leave through the parent (outgoing
        /// there) and the server's replies arrive on it: a macvlan in bridge
        /// mode, whose guest side sits in another namespace, takes the same
        /// path through the parent. The same ACK seen as a tap would see it
        /// (the other direction) is not taken.
        #[test]
        fn snoops_on_a_macvlan_parent() {
            if !can_run() {
                return;
            }
            let pid = std::process::id();
            let mut ns = Netns {
                server: format!("lume-ms-{pid}"),
                client: format!("lume-mc-{pid}"),
                dnsmasq: None,
            };
            let _host = Netns {
                server: format!("lume-mh-{pid}"),
                client: format!("lume-mh-{pid}"),
                dnsmasq: None,
            };
            let (s, c, h) = (ns.server.clone(), ns.client.clone(), _host.server.clone());
            for n in [&s, &c, &h] {
                ip(&["netns", "add", n]);
            }
            ip(&[
                "-n", &s, "link", "add", "msA", "type", "veth", "peer", "name", "msB", "netns", &h,
            ]);
            ip(&["-n", &s, "addr", "add", "192.0.2.1/24", "dev", "msA"]);
            ip(&["-n", &s, "link", "set", "msA", "up"]);
            ip(&["-n", &h, "link", "set", "msB", "up"]);
            ip(&[
                "-n",
                &h,
                "link",
                "add",
                "mvc",
                "link",
                "msB",
                "address",
                &mac_str(CLIENT_MAC),
                "type",
                "macvlan",
                "mode",
                "bridge",
            ]);
            ip(&["-n", &h, "link", "set", "mvc", "netns", &c]);
            ip(&["-n", &c, "link", "set", "mvc", "up"]);

            let (ready_tx, ready_rx) = mpsc::channel();
            let ns_path = format!("/run/netns/{h}");
            let snooper = std::thread::spawn(move || {
                let f = File::open(&ns_path).expect("open netns");
                nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                let mut parent = DhcpSnooper::open("msB").expect("open snooper");
                let mut as_tap = DhcpSnooper::open("msB").expect("open snooper");
                ready_tx.send(()).unwrap();
                let wrong = std::thread::spawn(move || {
                    let mut x = Exchange::new(CLIENT_MAC, Watched::Tap);
                    as_tap
                        .next_ack(&mut x, Duration::from_secs(8))
                        .map_err(|e| e.to_string())
                });
                let mut x = Exchange::new(CLIENT_MAC, Watched::MacvtapParent);
                let ack = parent
                    .next_ack(&mut x, Duration::from_secs(20))
                    .map_err(|e| e.to_string());
                (ack, wrong.join().unwrap())
            });
            ready_rx
                .recv_timeout(Duration::from_secs(10))
                .expect("snooper ready");
            let dir = tempfile::tempdir().unwrap();
            ns.dnsmasq = Some(test_dnsmasq(&s, "msA", dir.path()));
            let client = Command::new("ip")
                .args(["netns", "exec", &c, "busybox", "udhcpc", "-f", "-q", "-n"])
                .args(["-i", "mvc", "-s", "/bin/true", "-t", "10", "-T", "1"])
                .stdin(Stdio::null())
                .output()
                .expect("run udhcpc");
            assert!(client.status.success(), "udhcpc failed");
            let (ack, wrong) = snooper.join().expect("snooper thread");
            let ack = ack.expect("next_ack").expect("no ACK seen on the parent");
            assert_eq!(ack.address.octets()[..3], [192, 0, 2]);
            assert_eq!(wrong, Ok(None), "taken in the wrong direction");
        }
    }
}
