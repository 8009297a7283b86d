//! A small synchronous rtnetlink (`NETLINK_ROUTE`) client: the link, address
//! and route operations the network modes need, without shelling out to `ip`.
//!
//! Messages are built and parsed by `netlink-packet-route` and sent through
//! this module's own request loop: one netlink socket (`netlink-sys`) per
//! [`Netlink`], one request at a time, every request acknowledged
//! (`NLM_F_ACK`) or ended by `NLMSG_DONE`, replies matched by sequence number
//! and checked to come from the kernel, replies to an earlier abandoned
//! request skipped, a dump interrupted by a concurrent change
//! (`NLM_F_DUMP_INTR`) retried. Extended acks are enabled, so kernel error
//! strings ("Unknown device type", ...) end up in [`NetlinkError::Kernel`].
//!
//! A netlink socket belongs to the network namespace of the thread that
//! created it: to work inside another namespace, `setns(2)` first and then
//! [`Netlink::open`].

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;

use netlink_packet_core::{
    DecodeError, NLM_F_ACK, NLM_F_ACK_TLVS, NLM_F_CAPPED, NLM_F_CREATE, NLM_F_DUMP,
    NLM_F_DUMP_INTR, NLM_F_EXCL, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, NLMSG_NOOP, NLMSG_OVERRUN,
    NetlinkBuffer, NetlinkMessage, NetlinkPayload, NetlinkSerializable, NlaBuffer, NlasIterator,
    Parseable, ParseableParametrized,
};
use netlink_packet_route::address::{AddressAttribute, AddressHeader, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoMacVlan, LinkAttribute, LinkExtentMask, LinkFlags, LinkHeader,
    LinkInfo as NlLinkInfo, LinkMessage, MacVlanMode,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteLwEnCapType, RouteMessage,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use nix::errno::Errno;
use nix::sys::socket::{self, MsgFlags, NetlinkAddr, sockopt};
use nix::sys::time::{TimeVal, TimeValLike};

/// The kernel's name length limit, IFNAMSIZ without the NUL.
const MAX_NAME_LEN: usize = 15;
/// Big enough for any dump datagram (the kernel caps those at 32 KiB).
const RECV_BUF_LEN: usize = 64 * 1024;
/// How long to wait for the kernel's reply before giving up.
const REPLY_TIMEOUT_SECS: i64 = 10;
/// A dump interrupted by a concurrent change is retried this many times.
const DUMP_ATTEMPTS: usize = 5;
/// `struct nlmsghdr`'s size.
const NLMSG_HDRLEN: usize = 16;
/// NLMSGERR_ATTR_MSG (linux/netlink.h): the extended ack's error string.
const NLMSGERR_ATTR_MSG: u16 = 1;
/// The reply types read leniently (linux/rtnetlink.h; `netlink-packet-route`
/// does not export them).
const RTM_NEWLINK: u16 = 16;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;

/// One network interface as netlink reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub index: u32,
    pub name: String,
    /// Administratively up (IFF_UP), not necessarily with carrier.
    pub up: bool,
    /// Index of the bridge (or bond, ...) this link is enslaved to.
    pub master: Option<u32>,
    pub mac: Option<[u8; 6]>,
    /// IFLA_INFO_KIND: "bridge", "macvtap", "veth", "tun", ...; `None` for
    /// plain hardware interfaces and loopback.
    pub kind: Option<String>,
    /// IFLA_IFALIAS (`ip link set X alias Y`): lume marks its own bridges.
    pub alias: Option<String>,
    /// IFLA_MTU.
    pub mtu: Option<u32>,
    /// IFLA_LINK: the lower device of a macvlan, macvtap, vlan, ...
    pub link: Option<u32>,
}

/// One IPv4 route of the main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteV4 {
    /// Destination network; 0.0.0.0 with prefix 0 for the default route.
    pub dst: Ipv4Addr,
    pub prefix: u8,
    /// Outgoing interface (the first next hop's for multipath routes).
    pub oif: Option<u32>,
    pub oif_name: Option<String>,
    pub gateway: Option<Ipv4Addr>,
    pub table: u32,
    pub metric: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("Failed to open a netlink (NETLINK_ROUTE) socket: {0}")]
    Socket(#[source] Errno),
    #[error(
        "Failed to {op}: CAP_NET_ADMIN is needed (run lume as root or grant it with \
         `setcap cap_net_admin+ep` on the lume binary)"
    )]
    PermissionDenied { op: String },
    #[error("Failed to create {kind} {name}: an interface with that name already exists")]
    Exists { kind: &'static str, name: String },
    #[error("Failed to {op}: interface {name} does not exist")]
    NotFound { op: String, name: String },
    #[error("Invalid interface name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("Failed to {op}: {reason}")]
    InvalidArgument { op: String, reason: String },
    #[error("Failed to {op}: {}", kernel_detail(*.errno, .message.as_deref()))]
    Kernel {
        op: String,
        errno: Errno,
        /// The kernel's extended ack message, if it sent one.
        message: Option<String>,
    },
    #[error("Failed to {op}: {reason}")]
    Protocol { op: String, reason: String },
}

fn kernel_detail(errno: Errno, message: Option<&str>) -> String {
    match message {
        Some(m) => format!("{} ({errno})", m.trim_end_matches('.')),
        None => errno.to_string(),
    }
}

impl NetlinkError {
    /// The kernel's errno, for errors the kernel returned.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            NetlinkError::Socket(e) => Some(*e),
            NetlinkError::PermissionDenied { .. } => Some(Errno::EPERM),
            NetlinkError::Exists { .. } => Some(Errno::EEXIST),
            NetlinkError::NotFound { .. } => Some(Errno::ENODEV),
            NetlinkError::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// Why one request failed, before we know what to call the operation.
#[derive(Debug)]
enum TxError {
    /// An NLMSG_ERROR with a nonzero code, or a failed dump.
    Kernel {
        errno: Errno,
        message: Option<String>,
    },
    /// The socket itself failed (or timed out).
    Io(Errno),
    Protocol(String),
}

fn fail(op: &str, e: TxError) -> NetlinkError {
    match e {
        TxError::Kernel {
            errno: Errno::EPERM | Errno::EACCES,
            ..
        } => NetlinkError::PermissionDenied { op: op.into() },
        TxError::Kernel { errno, message } => NetlinkError::Kernel {
            op: op.into(),
            errno,
            message,
        },
        TxError::Io(Errno::EAGAIN) => NetlinkError::Protocol {
            op: op.into(),
            reason: format!("no reply from the kernel within {REPLY_TIMEOUT_SECS}s"),
        },
        TxError::Io(e) => NetlinkError::Protocol {
            op: op.into(),
            reason: format!("netlink socket error: {e}"),
        },
        TxError::Protocol(reason) => NetlinkError::Protocol {
            op: op.into(),
            reason,
        },
    }
}

/// Check a name the way the kernel's `dev_valid_name` does.
fn check_name(name: &str) -> Result<(), NetlinkError> {
    let reason = if name.is_empty() {
        "it is empty"
    } else if name.len() > MAX_NAME_LEN {
        "it is longer than 15 bytes"
    } else if name == "." || name == ".." {
        "it cannot be \".\" or \"..\""
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c == '\0' || c.is_whitespace())
    {
        "it cannot contain '/', ':', NUL or whitespace"
    } else {
        return Ok(());
    };
    Err(NetlinkError::InvalidName {
        name: name.into(),
        reason,
    })
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// A request: message type, flags (NLM_F_REQUEST is added) and the payload
/// (family header and attributes) serialized by `netlink-packet-route`.
struct Request {
    ty: u16,
    flags: u16,
    payload: Vec<u8>,
}

impl Request {
    fn new(ty: u16, flags: u16, payload: Vec<u8>) -> Self {
        Request {
            ty,
            flags: flags | NLM_F_REQUEST,
            payload,
        }
    }

    /// A request carrying `msg`.
    fn route(msg: &RouteNetlinkMessage, flags: u16) -> Self {
        let mut payload = vec![0; msg.buffer_len()];
        msg.serialize(&mut payload);
        Request::new(msg.message_type(), flags, payload)
    }

    fn dump(&self) -> bool {
        self.flags & NLM_F_DUMP == NLM_F_DUMP
    }

    /// The whole message, with its header and sequence number.
    fn finish(&self, seq: u32) -> Vec<u8> {
        let len = NLMSG_HDRLEN + self.payload.len();
        let mut buf = vec![0u8; len];
        let mut hdr = NetlinkBuffer::new(&mut buf[..]);
        hdr.set_length(u32::try_from(len).expect("netlink message too long"));
        hdr.set_message_type(self.ty);
        hdr.set_flags(self.flags);
        hdr.set_sequence_number(seq);
        hdr.set_port_number(0);
        buf[NLMSG_HDRLEN..].copy_from_slice(&self.payload);
        buf
    }
}

/// One message of a reply, header included.
#[derive(Debug)]
struct Reply {
    ty: u16,
    bytes: Vec<u8>,
}

impl Reply {
    fn payload(&self) -> &[u8] {
        &self.bytes[NLMSG_HDRLEN..]
    }
}

/// One message of a received datagram, borrowed from the receive buffer.
#[derive(Debug, PartialEq, Eq)]
struct RawMsg<'a> {
    ty: u16,
    flags: u16,
    seq: u32,
    /// The whole message, header included.
    bytes: &'a [u8],
}

impl RawMsg<'_> {
    fn payload(&self) -> &[u8] {
        &self.bytes[NLMSG_HDRLEN..]
    }
}

/// nftables' subsystem in netfilter's netlink messages (`NFNL_SUBSYS_NFTABLES`).
const NFNL_SUBSYS_NFTABLES: u16 = 10;
/// `NFT_MSG_GETGEN` and its reply `NFT_MSG_NEWGEN`.
const NFT_MSG_GETGEN: u16 = NFNL_SUBSYS_NFTABLES << 8 | 16;
const NFT_MSG_NEWGEN: u16 = NFNL_SUBSYS_NFTABLES << 8 | 15;
/// `struct nfgenmsg`, before a netfilter message's attributes.
const NFGENMSG_LEN: usize = 4;
/// `NFTA_GEN_ID`: the generation, a big-endian u32.
const NFTA_GEN_ID: u16 = 1;

/// The generation in an `NFT_MSG_NEWGEN` payload (nfgenmsg, attributes).
fn parse_generation(payload: &[u8]) -> Option<u32> {
    let attrs = payload.get(NFGENMSG_LEN..)?;
    NlasIterator::new(attrs)
        .filter_map(Result::ok)
        .find(|nla| nla.kind() == NFTA_GEN_ID)
        .and_then(|nla| <[u8; 4]>::try_from(nla.value()).ok())
        .map(u32::from_be_bytes)
}

/// Split one received datagram into its messages.
fn split_messages(mut buf: &[u8]) -> Result<Vec<RawMsg<'_>>, TxError> {
    let mut out = Vec::new();
    while buf.len() >= NLMSG_HDRLEN {
        let hdr = NetlinkBuffer::new_checked(buf).map_err(|e| {
            TxError::Protocol(format!(
                "malformed netlink message in a {}-byte datagram: {e}",
                buf.len()
            ))
        })?;
        let len = hdr.length() as usize;
        out.push(RawMsg {
            ty: hdr.message_type(),
            flags: hdr.flags(),
            seq: hdr.sequence_number(),
            bytes: &buf[..len],
        });
        buf = &buf[align4(len).min(buf.len())..];
    }
    Ok(out)
}

/// The error code of an NLMSG_ERROR or NLMSG_DONE payload (0 for an ack or a
/// clean end), and the extended ack message if there is one.
/// (`netlink-packet-core` parses neither the extended ack attributes nor a
/// capped error's truncated request.)
fn parse_status(ty: u16, flags: u16, payload: &[u8]) -> Result<(i32, Option<String>), TxError> {
    if payload.len() < 4 {
        if ty == NLMSG_DONE {
            return Ok((0, None));
        }
        return Err(TxError::Protocol("truncated netlink error message".into()));
    }
    let code = i32::from_ne_bytes([payload[0], payload[1], payload[2], payload[3]]);
    if flags & NLM_F_ACK_TLVS == 0 {
        return Ok((code, None));
    }
    let mut rest = &payload[4..];
    if ty == NLMSG_ERROR {
        // The original request's header, and its payload unless capped.
        if rest.len() < NLMSG_HDRLEN {
            return Ok((code, None));
        }
        let skip = if flags & NLM_F_CAPPED != 0 {
            NLMSG_HDRLEN
        } else {
            align4(NetlinkBuffer::new(rest).length() as usize)
        };
        rest = &rest[skip.min(rest.len())..];
    }
    let message = NlasIterator::new(rest)
        .map_while(Result::ok)
        .find(|nla: &NlaBuffer<&[u8]>| nla.kind() == NLMSGERR_ATTR_MSG)
        .map(|nla| {
            let data = nla.value();
            let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
            String::from_utf8_lossy(&data[..end]).into_owned()
        })
        .filter(|m| !m.is_empty());
    Ok((code, message))
}

/// Parse one reply message with `netlink-packet-route`. One it rejects as a
/// whole is read again attribute by attribute ([`parse_leniently`]).
fn parse_reply(bytes: &[u8]) -> Result<RouteNetlinkMessage, TxError> {
    match NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes) {
        Ok(NetlinkMessage {
            payload: NetlinkPayload::InnerMessage(m),
            ..
        }) => Ok(m),
        Ok(other) => Err(TxError::Protocol(format!(
            "unexpected netlink reply {:?}",
            other.payload
        ))),
        Err(e) => NetlinkBuffer::new_checked(bytes)
            .ok()
            .and_then(|b| parse_leniently(b.message_type(), b.payload()))
            .ok_or_else(|| TxError::Protocol(format!("unreadable netlink reply: {e}"))),
    }
}

/// A link, address or route reply with the attributes `netlink-packet-route`
/// can read, the others left out: it rejects a whole message for one
/// attribute it misreads (one a newer kernel changed, say), which would
/// otherwise hide every interface of the host over one exotic device.
fn parse_leniently(ty: u16, payload: &[u8]) -> Option<RouteNetlinkMessage> {
    use netlink_packet_core::Emitable;
    fn attrs<A>(buf: &[u8], parse: impl Fn(&NlaBuffer<&[u8]>) -> Result<A, DecodeError>) -> Vec<A> {
        NlasIterator::new(buf)
            .map_while(Result::ok)
            .filter_map(|nla| parse(&nla).ok())
            .collect()
    }
    match ty {
        RTM_NEWLINK => {
            let header = LinkHeader::parse(payload).ok()?;
            let family = header.interface_family;
            let mut msg = LinkMessage::default();
            msg.attributes = attrs(&payload[Emitable::buffer_len(&header)..], |nla| {
                LinkAttribute::parse_with_param(nla, family)
            });
            msg.header = header;
            Some(RouteNetlinkMessage::NewLink(msg))
        }
        RTM_NEWADDR => {
            let header = AddressHeader::parse(payload).ok()?;
            let mut msg = AddressMessage::default();
            msg.attributes = attrs(&payload[Emitable::buffer_len(&header)..], |nla| {
                AddressAttribute::parse(nla)
            });
            msg.header = header;
            Some(RouteNetlinkMessage::NewAddress(msg))
        }
        RTM_NEWROUTE => {
            let header = RouteHeader::parse(payload).ok()?;
            let param = (header.address_family, header.kind, RouteLwEnCapType::None);
            let mut msg = RouteMessage::default();
            msg.attributes = attrs(&payload[Emitable::buffer_len(&header)..], |nla| {
                RouteAttribute::parse_with_param(nla, param)
            });
            msg.header = header;
            Some(RouteNetlinkMessage::NewRoute(msg))
        }
        _ => None,
    }
}

/// The replies of a request, parsed.
fn parse_replies(replies: &[Reply]) -> Result<Vec<RouteNetlinkMessage>, TxError> {
    replies.iter().map(|r| parse_reply(&r.bytes)).collect()
}

fn link_from(msg: LinkMessage) -> LinkInfo {
    let mut link = LinkInfo {
        index: msg.header.index,
        name: String::new(),
        up: msg.header.flags.contains(LinkFlags::Up),
        master: None,
        mac: None,
        kind: None,
        alias: None,
        mtu: None,
        link: None,
    };
    for attr in msg.attributes {
        match attr {
            LinkAttribute::Mtu(m) => link.mtu = Some(m),
            LinkAttribute::Link(l) => link.link = Some(l).filter(|&l| l != 0),
            LinkAttribute::IfName(n) => link.name = n,
            LinkAttribute::IfAlias(a) => link.alias = Some(a).filter(|a| !a.is_empty()),
            LinkAttribute::Controller(m) => link.master = Some(m).filter(|&m| m != 0),
            LinkAttribute::Address(a) => link.mac = a.as_slice().try_into().ok(),
            LinkAttribute::LinkInfo(infos) => {
                link.kind = infos.into_iter().find_map(|i| match i {
                    NlLinkInfo::Kind(k) => Some(k.to_string()),
                    _ => None,
                });
            }
            _ => {}
        }
    }
    link
}

/// `(index, address, prefix)` of an AF_INET address.
fn addr_v4_from(msg: &AddressMessage) -> Option<(u32, Ipv4Addr, u8)> {
    if msg.header.family != AddressFamily::Inet {
        return None;
    }
    let (mut local, mut address) = (None, None);
    for attr in &msg.attributes {
        match attr {
            AddressAttribute::Local(IpAddr::V4(a)) => local = Some(*a),
            AddressAttribute::Address(IpAddr::V4(a)) => address = Some(*a),
            _ => {}
        }
    }
    Some((msg.header.index, local.or(address)?, msg.header.prefix_len))
}

/// An AF_INET route, whatever its table (`oif_name` left empty).
fn route_v4_from(msg: &RouteMessage) -> Option<RouteV4> {
    if msg.header.address_family != AddressFamily::Inet {
        return None;
    }
    let gateway = |attrs: &[RouteAttribute]| {
        attrs.iter().find_map(|a| match a {
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => Some(*g),
            _ => None,
        })
    };
    let mut route = RouteV4 {
        dst: Ipv4Addr::UNSPECIFIED,
        prefix: msg.header.destination_prefix_length,
        oif: None,
        oif_name: None,
        gateway: gateway(&msg.attributes),
        table: u32::from(msg.header.table),
        metric: None,
    };
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Destination(RouteAddress::Inet(d)) => route.dst = *d,
            RouteAttribute::Oif(i) => route.oif = Some(*i),
            RouteAttribute::Priority(p) => route.metric = Some(*p),
            RouteAttribute::Table(t) => route.table = *t,
            _ => {}
        }
    }
    // A multipath route: report the first hop.
    let first_hop = msg.attributes.iter().find_map(|a| match a {
        RouteAttribute::MultiPath(hops) => hops.first(),
        _ => None,
    });
    if let Some(hop) = first_hop {
        route.oif = route.oif.or(Some(hop.interface_index).filter(|&i| i != 0));
        route.gateway = route.gateway.or_else(|| gateway(&hop.attributes));
    }
    Some(route)
}

/// The broadcast address of `addr/prefix`, for prefixes that have one.
fn broadcast_v4(addr: Ipv4Addr, prefix: u8) -> Option<Ipv4Addr> {
    (prefix <= 30).then(|| Ipv4Addr::from(u32::from(addr) | (u32::MAX >> prefix)))
}

/// A link message for the link with ifindex `index` (0: none, for requests
/// that name it or create it).
fn link_message(index: u32, attributes: Vec<LinkAttribute>) -> LinkMessage {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    msg.attributes = attributes;
    msg
}

/// A link message changing the flags in `mask` of link `index` to `flags`.
fn link_flags_message(index: u32, flags: LinkFlags, mask: LinkFlags) -> LinkMessage {
    let mut msg = link_message(index, Vec::new());
    msg.header.flags = flags;
    msg.header.change_mask = mask;
    msg
}

/// An AF_INET address message (a dump filter with `index` 0).
fn address_message(index: u32, prefix: u8, attributes: Vec<AddressAttribute>) -> AddressMessage {
    let mut msg = AddressMessage::default();
    msg.header.family = AddressFamily::Inet;
    msg.header.prefix_len = prefix;
    msg.header.index = index;
    msg.attributes = attributes;
    msg
}

/// An open rtnetlink socket in the creating thread's network namespace.
#[derive(Debug)]
pub struct Netlink {
    socket: netlink_sys::Socket,
    seq: u32,
    buf: Vec<u8>,
}

fn io_errno(e: &std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

impl Netlink {
    pub fn open() -> Result<Self, NetlinkError> {
        Self::open_protocol(netlink_sys::protocols::NETLINK_ROUTE)
    }

    /// A netfilter (`NETLINK_NETFILTER`) socket, for
    /// [`Self::nftables_generation`]; lume's rules themselves go through
    /// libnftables (`firewall::nft`).
    pub fn open_netfilter() -> Result<Self, NetlinkError> {
        Self::open_protocol(netlink_sys::protocols::NETLINK_NETFILTER)
    }

    fn open_protocol(protocol: isize) -> Result<Self, NetlinkError> {
        let mut socket =
            netlink_sys::Socket::new(protocol).map_err(|e| NetlinkError::Socket(io_errno(&e)))?;
        socket
            .bind_auto()
            .map_err(|e| NetlinkError::Socket(io_errno(&e)))?;
        socket::setsockopt(
            &socket,
            sockopt::ReceiveTimeout,
            &TimeVal::seconds(REPLY_TIMEOUT_SECS),
        )
        .map_err(NetlinkError::Socket)?;
        // Best effort: kernels without these still work, with less detail.
        let _ = socket.set_ext_ack(true);
        let _ = socket.set_cap_ack(true);
        // Start from a varying number so replies to an earlier socket that
        // reused this port id cannot match.
        let seq = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(1);
        Ok(Netlink {
            socket,
            seq,
            buf: vec![0; RECV_BUF_LEN],
        })
    }

    /// Send one request and collect its reply messages, up to the ack (or,
    /// for a dump, NLMSG_DONE). A dump interrupted by concurrent changes is
    /// retried, and so is one refused (EBUSY) because an abandoned dump is
    /// still running on this socket: reading (and skipping) that dump's
    /// replies moves it on to its end.
    fn transact(&mut self, req: &Request) -> Result<Vec<Reply>, TxError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let retry = req.dump() && attempt < DUMP_ATTEMPTS;
            match self.transact_once(req) {
                Err(TxError::Kernel {
                    errno: Errno::EBUSY,
                    ..
                }) if retry => {}
                Ok((_, true)) if retry => {}
                r => return r.map(|(replies, _)| replies),
            }
        }
    }

    fn transact_once(&mut self, req: &Request) -> Result<(Vec<Reply>, bool), TxError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let msg = req.finish(seq);
        let fd = self.socket.as_raw_fd();
        loop {
            match socket::send(fd, &msg, MsgFlags::empty()) {
                Ok(n) if n == msg.len() => break,
                Ok(n) => {
                    return Err(TxError::Protocol(format!(
                        "short netlink send ({n} of {} bytes)",
                        msg.len()
                    )));
                }
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(TxError::Io(e)),
            }
        }

        let mut replies = Vec::new();
        let mut interrupted = false;
        loop {
            let (len, from_kernel) = match socket::recvfrom::<NetlinkAddr>(fd, &mut self.buf) {
                // Dump datagrams are at most 32 KiB, so a full buffer
                // means the datagram did not fit and was cut short.
                Ok((n, _)) if n >= self.buf.len() => {
                    return Err(TxError::Protocol("netlink reply truncated".into()));
                }
                Ok((n, addr)) => (n, addr.is_none_or(|a| a.pid() == 0)),
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(TxError::Io(e)),
            };
            if !from_kernel {
                continue;
            }
            for m in split_messages(&self.buf[..len])? {
                if m.seq != seq {
                    continue; // left over from an earlier, abandoned request
                }
                interrupted |= m.flags & NLM_F_DUMP_INTR != 0;
                match m.ty {
                    NLMSG_NOOP => {}
                    NLMSG_OVERRUN => {
                        return Err(TxError::Protocol("netlink overrun".into()));
                    }
                    NLMSG_ERROR | NLMSG_DONE => {
                        let (code, message) = parse_status(m.ty, m.flags, m.payload())?;
                        if code < 0 {
                            return Err(TxError::Kernel {
                                errno: Errno::from_raw(-code),
                                message,
                            });
                        }
                        return Ok((replies, interrupted));
                    }
                    _ => {
                        // Every non-dump request asks for an ack, so even a
                        // single (non-NLM_F_MULTI) reply is followed by one.
                        replies.push(Reply {
                            ty: m.ty,
                            bytes: m.bytes.to_vec(),
                        });
                    }
                }
            }
        }
    }

    /// Send `msg` (with NLM_F_ACK and `flags`) and wait for the ack.
    fn execute(&mut self, msg: RouteNetlinkMessage, flags: u16) -> Result<(), TxError> {
        self.transact(&Request::route(&msg, flags | NLM_F_ACK))
            .map(drop)
    }

    /// Dump with `msg` as the filter and return the replies, parsed.
    fn dump(&mut self, msg: RouteNetlinkMessage) -> Result<Vec<RouteNetlinkMessage>, TxError> {
        let replies = self.transact(&Request::route(&msg, NLM_F_DUMP))?;
        parse_replies(&replies)
    }

    fn get_link(&mut self, name: &str) -> Result<Option<LinkInfo>, NetlinkError> {
        check_name(name)?;
        let op = format!("look up interface {name}");
        let msg = link_message(
            0,
            vec![
                LinkAttribute::IfName(name.into()),
                LinkAttribute::ExtMask(vec![LinkExtentMask::SkipStats]),
            ],
        );
        let req = Request::route(&RouteNetlinkMessage::GetLink(msg), NLM_F_ACK);
        match self.transact(&req).and_then(|r| parse_replies(&r)) {
            Ok(replies) => Ok(replies.into_iter().find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(link_from(l)),
                _ => None,
            })),
            Err(TxError::Kernel {
                errno: Errno::ENODEV,
                ..
            }) => Ok(None),
            Err(e) => Err(fail(&op, e)),
        }
    }

    /// The index of `name`, or a NotFound error naming `op`.
    fn require(&mut self, name: &str, op: &str) -> Result<u32, NetlinkError> {
        self.link_index(name)?
            .ok_or_else(|| NetlinkError::NotFound {
                op: op.into(),
                name: name.into(),
            })
    }

    /// Turn a kernel ENODEV (the link vanished between lookup and change)
    /// into NotFound.
    fn fail_on(op: &str, name: &str, e: TxError) -> NetlinkError {
        match e {
            TxError::Kernel {
                errno: Errno::ENODEV,
                ..
            } => NetlinkError::NotFound {
                op: op.into(),
                name: name.into(),
            },
            e => fail(op, e),
        }
    }

    /// Change link `index` (`name`) with `msg`; ENODEV is NotFound.
    fn set_link(&mut self, name: &str, op: &str, msg: LinkMessage) -> Result<(), NetlinkError> {
        self.execute(RouteNetlinkMessage::SetLink(msg), 0)
            .map_err(|e| Self::fail_on(op, name, e))
    }

    /// The nftables ruleset generation of this socket's network namespace
    /// (`NFT_MSG_GETGEN`): the kernel moves it on with every committed
    /// change to any table, lume's or another tool's. Asked on a socket
    /// from [`Self::open_netfilter`]. (No maintained crate speaks nftables'
    /// netlink messages; this one request is a 4-byte header out and one
    /// attribute back, through the same request loop as rtnetlink's.)
    pub fn nftables_generation(&mut self) -> Result<u32, NetlinkError> {
        const OP: &str = "read the nftables ruleset generation";
        // nfgenmsg: family AF_UNSPEC, version NFNETLINK_V0, res_id 0.
        let req = Request::new(NFT_MSG_GETGEN, NLM_F_ACK, vec![0; NFGENMSG_LEN]);
        let replies = self.transact(&req).map_err(|e| fail(OP, e))?;
        replies
            .iter()
            .filter(|r| r.ty == NFT_MSG_NEWGEN)
            .find_map(|r| parse_generation(r.payload()))
            .ok_or_else(|| NetlinkError::Protocol {
                op: OP.into(),
                reason: "the kernel's reply carries no generation".into(),
            })
    }

    /// The identity of this socket's network namespace
    /// (`SO_NETNS_COOKIE`, Linux 5.14+): unique for the life of the
    /// system, never reused by a later namespace (an inode number is).
    pub fn namespace_cookie(&self) -> Result<u64, NetlinkError> {
        // asm-generic's value (x86, arm, riscv); the libc crate does not
        // export it, and sparc numbers it otherwise.
        #[cfg(any(target_arch = "sparc64", target_arch = "sparc"))]
        const SO_NETNS_COOKIE: libc::c_int = 0x50;
        #[cfg(not(any(target_arch = "sparc64", target_arch = "sparc")))]
        const SO_NETNS_COOKIE: libc::c_int = 71;
        let mut cookie: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `cookie`, a
        // live u64, and the new length into `len`; the descriptor is open
        // for as long as `self` lives.
        let rc = unsafe {
            libc::getsockopt(
                self.socket.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_NETNS_COOKIE,
                (&raw mut cookie).cast(),
                &raw mut len,
            )
        };
        if rc != 0 {
            return Err(NetlinkError::Socket(Errno::last()));
        }
        if len as usize != std::mem::size_of::<u64>() {
            return Err(NetlinkError::Socket(Errno::EPROTO));
        }
        Ok(cookie)
    }

    pub fn link_index(&mut self, name: &str) -> Result<Option<u32>, NetlinkError> {
        Ok(self.get_link(name)?.map(|l| l.index))
    }

    pub fn link_info(&mut self, name: &str) -> Result<Option<LinkInfo>, NetlinkError> {
        self.get_link(name)
    }

    /// All links of the namespace, in index order.
    pub fn links(&mut self) -> Result<Vec<LinkInfo>, NetlinkError> {
        let msg = link_message(
            0,
            vec![LinkAttribute::ExtMask(vec![LinkExtentMask::SkipStats])],
        );
        let replies = self
            .dump(RouteNetlinkMessage::GetLink(msg))
            .map_err(|e| fail("list interfaces", e))?;
        let mut links: Vec<LinkInfo> = replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(link_from(l)),
                _ => None,
            })
            .collect();
        links.sort_by_key(|l| l.index);
        Ok(links)
    }

    /// Create a bridge (left down). An existing link of that name is
    /// [`NetlinkError::Exists`].
    pub fn create_bridge(&mut self, name: &str) -> Result<(), NetlinkError> {
        check_name(name)?;
        let msg = link_message(
            0,
            vec![
                LinkAttribute::IfName(name.into()),
                LinkAttribute::LinkInfo(vec![
                    NlLinkInfo::Kind(InfoKind::Bridge),
                    // No multicast snooping: a guest's membership reports
                    // would fill the bridge's group table (the kernel then
                    // turns snooping off itself) or make its port a
                    // multicast router's; a bridge of a few VMs floods.
                    NlLinkInfo::Data(InfoData::Bridge(vec![
                        netlink_packet_route::link::InfoBridge::MulticastSnooping(false),
                    ])),
                ]),
            ],
        );
        match self.execute(RouteNetlinkMessage::NewLink(msg), NLM_F_CREATE | NLM_F_EXCL) {
            Err(TxError::Kernel {
                errno: Errno::EEXIST,
                ..
            }) => Err(NetlinkError::Exists {
                kind: "bridge",
                name: name.into(),
            }),
            r => r.map_err(|e| fail(&format!("create bridge {name}"), e)),
        }
    }

    /// Sets link `name`'s MAC address to `mac`. On a bridge this also pins
    /// it: the kernel stops following its ports' addresses (a bridge given
    /// no address takes the lowest of its ports' and changes with them).
    pub fn set_mac(&mut self, name: &str, mac: [u8; 6]) -> Result<(), NetlinkError> {
        let index = self.require(name, "set the MAC address of")?;
        let msg = link_message(index, vec![LinkAttribute::Address(mac.to_vec())]);
        self.execute(RouteNetlinkMessage::SetLink(msg), 0)
            .map_err(|e| fail(&format!("set the MAC address of {name}"), e))
    }

    /// Sets the alias (IFLA_IFALIAS) of link `name`.
    pub fn set_alias(&mut self, name: &str, alias: &str) -> Result<(), NetlinkError> {
        let index = self.require(name, "set the alias of")?;
        let msg = link_message(index, vec![LinkAttribute::IfAlias(alias.into())]);
        self.set_link(name, "set the alias of", msg)
    }

    /// Create a macvlan in bridge mode on `parent` with address `mac` (left
    /// down) and return its ifindex.
    pub fn create_macvlan(
        &mut self,
        name: &str,
        parent: &str,
        mac: [u8; 6],
    ) -> Result<u32, NetlinkError> {
        const KIND: &str = "macvlan";
        check_name(name)?;
        let op = format!("create {KIND} {name} on {parent}");
        let parent_index = self.require(parent, &op)?;
        let msg = link_message(
            0,
            vec![
                LinkAttribute::IfName(name.into()),
                LinkAttribute::Link(parent_index),
                LinkAttribute::Address(mac.to_vec()),
                LinkAttribute::LinkInfo(vec![
                    NlLinkInfo::Kind(InfoKind::MacVlan),
                    NlLinkInfo::Data(InfoData::MacVlan(vec![InfoMacVlan::Mode(
                        MacVlanMode::Bridge,
                    )])),
                ]),
            ],
        );
        match self.execute(RouteNetlinkMessage::NewLink(msg), NLM_F_CREATE | NLM_F_EXCL) {
            Err(TxError::Kernel {
                errno: Errno::EEXIST,
                ..
            }) => {
                return Err(NetlinkError::Exists {
                    kind: KIND,
                    name: name.into(),
                });
            }
            r => r.map_err(|e| Self::fail_on(&op, parent, e))?,
        }
        self.link_index(name)?
            .ok_or_else(|| NetlinkError::Protocol {
                op,
                reason: "the new link disappeared right after creation".into(),
            })
    }

    /// Set the MTU of `name`.
    pub fn set_mtu(&mut self, name: &str, mtu: u32) -> Result<(), NetlinkError> {
        let op = format!("set the MTU of {name} to {mtu}");
        let index = self.require(name, &op)?;
        self.set_link(
            name,
            &op,
            link_message(index, vec![LinkAttribute::Mtu(mtu)]),
        )
    }

    /// Make `name` receive every multicast group (IFF_ALLMULTI), as
    /// `ip link set NAME allmulticast on` does.
    pub fn set_allmulti(&mut self, name: &str) -> Result<(), NetlinkError> {
        let op = format!("set {name} allmulticast");
        let index = self.require(name, &op)?;
        let msg = link_flags_message(index, LinkFlags::Allmulti, LinkFlags::Allmulti);
        self.set_link(name, &op, msg)
    }

    /// Send one rtnetlink request whose payload (family header and
    /// attributes) was serialized elsewhere (by `netlink-packet-route`), and
    /// wait for its ack. `flags` are added to NLM_F_REQUEST | NLM_F_ACK.
    pub fn execute_serialized(
        &mut self,
        op: &str,
        message_type: u16,
        flags: u16,
        payload: &[u8],
    ) -> Result<(), NetlinkError> {
        let req = Request::new(message_type, flags | NLM_F_ACK, payload.to_vec());
        self.transact(&req).map(drop).map_err(|e| fail(op, e))
    }

    fn set_flags(&mut self, name: &str, up: bool) -> Result<(), NetlinkError> {
        let op = format!("set {name} {}", if up { "up" } else { "down" });
        let index = self.require(name, &op)?;
        let flags = if up {
            LinkFlags::Up
        } else {
            LinkFlags::empty()
        };
        self.set_link(name, &op, link_flags_message(index, flags, LinkFlags::Up))
    }

    pub fn set_up(&mut self, name: &str) -> Result<(), NetlinkError> {
        self.set_flags(name, true)
    }

    pub fn set_down(&mut self, name: &str) -> Result<(), NetlinkError> {
        self.set_flags(name, false)
    }

    fn set_master_index(&mut self, name: &str, master: u32, op: &str) -> Result<(), NetlinkError> {
        let index = self.require(name, op)?;
        let msg = link_message(index, vec![LinkAttribute::Controller(master)]);
        self.set_link(name, op, msg)
    }

    /// Enslave `name` to `bridge`.
    pub fn set_master(&mut self, name: &str, bridge: &str) -> Result<(), NetlinkError> {
        let op = format!("attach {name} to bridge {bridge}");
        let master = self.require(bridge, &op)?;
        self.set_master_index(name, master, &op)
    }

    /// Release `name` from its bridge (a no-op if it has none).
    pub fn set_nomaster(&mut self, name: &str) -> Result<(), NetlinkError> {
        let op = format!("detach {name} from its bridge");
        self.set_master_index(name, 0, &op)
    }

    /// Add `addr/prefix` to `name`. The same address and prefix already being
    /// there is fine.
    pub fn add_address_v4(
        &mut self,
        name: &str,
        addr: Ipv4Addr,
        prefix: u8,
    ) -> Result<(), NetlinkError> {
        let op = format!("add address {addr}/{prefix} to {name}");
        if prefix > 32 {
            return Err(NetlinkError::InvalidArgument {
                op,
                reason: "an IPv4 prefix length is at most 32".into(),
            });
        }
        let index = self.require(name, &op)?;
        let mut attributes = vec![
            AddressAttribute::Local(addr.into()),
            AddressAttribute::Address(addr.into()),
        ];
        if let Some(brd) = broadcast_v4(addr, prefix) {
            attributes.push(AddressAttribute::Broadcast(brd));
        }
        let msg = address_message(index, prefix, attributes);
        self.new_address(&op, name, msg)
    }

    /// Adds the address `msg` describes to `name`; the same address and
    /// prefix already there (EEXIST) is fine.
    fn new_address(
        &mut self,
        op: &str,
        name: &str,
        msg: AddressMessage,
    ) -> Result<(), NetlinkError> {
        match self.execute(
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        ) {
            Ok(())
            | Err(TxError::Kernel {
                errno: Errno::EEXIST,
                ..
            }) => Ok(()),
            Err(e) => Err(Self::fail_on(op, name, e)),
        }
    }

    /// `(index, address, prefix)` of every IPv4 address of the namespace.
    fn dump_addresses_v4(&mut self) -> Result<Vec<(u32, Ipv4Addr, u8)>, TxError> {
        let msg = address_message(0, 0, Vec::new());
        Ok(self
            .dump(RouteNetlinkMessage::GetAddress(msg))?
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) => addr_v4_from(a),
                _ => None,
            })
            .collect())
    }

    /// The IPv4 addresses of `name` with their prefix lengths.
    pub fn addresses_v4(&mut self, name: &str) -> Result<Vec<(Ipv4Addr, u8)>, NetlinkError> {
        let op = format!("list the addresses of {name}");
        let index = self.require(name, &op)?;
        Ok(self
            .dump_addresses_v4()
            .map_err(|e| fail(&op, e))?
            .into_iter()
            .filter(|&(i, _, _)| i == index)
            .map(|(_, a, p)| (a, p))
            .collect())
    }

    /// Send one dump request whose payload was serialized elsewhere and
    /// return the payloads of its replies of type `reply_type`.
    pub fn dump_serialized(
        &mut self,
        op: &str,
        message_type: u16,
        reply_type: u16,
        payload: &[u8],
    ) -> Result<Vec<Vec<u8>>, NetlinkError> {
        let req = Request::new(message_type, NLM_F_DUMP, payload.to_vec());
        let replies = self.transact(&req).map_err(|e| fail(op, e))?;
        Ok(replies
            .iter()
            .filter(|r| r.ty == reply_type)
            .map(|r| r.payload().to_vec())
            .collect())
    }

    /// Every IPv4 address of every link, with its prefix length.
    pub fn all_addresses_v4(&mut self) -> Result<Vec<(Ipv4Addr, u8)>, NetlinkError> {
        Ok(self
            .dump_addresses_v4()
            .map_err(|e| fail("list the host's addresses", e))?
            .into_iter()
            .map(|(_, a, p)| (a, p))
            .collect())
    }

    /// Delete a link: Ok(true) if it was deleted, Ok(false) if there was none.
    pub fn delete_link(&mut self, name: &str) -> Result<bool, NetlinkError> {
        let Some(index) = self.link_index(name)? else {
            return Ok(false);
        };
        let msg = link_message(index, Vec::new());
        match self.execute(RouteNetlinkMessage::DelLink(msg), 0) {
            Ok(()) => Ok(true),
            Err(TxError::Kernel {
                errno: Errno::ENODEV,
                ..
            }) => Ok(false),
            Err(e) => Err(fail(&format!("delete interface {name}"), e)),
        }
    }

    /// Add `addr/prefix` to `name` without duplicate address detection (a
    /// lume bridge's own address: usable at once). Already there is fine.
    pub fn add_address_v6(
        &mut self,
        name: &str,
        addr: Ipv6Addr,
        prefix: u8,
    ) -> Result<(), NetlinkError> {
        use netlink_packet_route::address::{AddressFlags, AddressHeaderFlags};
        let op = format!("add address {addr}/{prefix} to {name}");
        let index = self.require(name, &op)?;
        let mut msg = address_message(
            index,
            prefix,
            vec![
                AddressAttribute::Address(addr.into()),
                AddressAttribute::Flags(AddressFlags::Nodad),
            ],
        );
        msg.header.family = AddressFamily::Inet6;
        msg.header.flags = AddressHeaderFlags::Nodad;
        self.new_address(&op, name, msg)
    }

    /// `(interface index, address, prefix)` of every IPv6 address.
    pub fn all_addresses_v6(&mut self) -> Result<Vec<(u32, Ipv6Addr, u8)>, NetlinkError> {
        let mut msg = address_message(0, 0, Vec::new());
        msg.header.family = AddressFamily::Inet6;
        Ok(self
            .dump(RouteNetlinkMessage::GetAddress(msg))
            .map_err(|e| fail("list the host's IPv6 addresses", e))?
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) if a.header.family == AddressFamily::Inet6 => {
                    a.attributes.iter().find_map(|attr| match attr {
                        AddressAttribute::Address(IpAddr::V6(v)) => {
                            Some((a.header.index, *v, a.header.prefix_len))
                        }
                        _ => None,
                    })
                }
                _ => None,
            })
            .collect())
    }

    /// The IPv6 addresses of `name` with their prefix lengths.
    pub fn addresses_v6(&mut self, name: &str) -> Result<Vec<(Ipv6Addr, u8)>, NetlinkError> {
        let op = format!("list the IPv6 addresses of {name}");
        let index = self.require(name, &op)?;
        Ok(self
            .all_addresses_v6()?
            .into_iter()
            .filter(|&(i, _, _)| i == index)
            .map(|(_, a, p)| (a, p))
            .collect())
    }

    /// The IPv6 neighbours of interface `index` whose link-layer address
    /// is `mac` and whose entry is not failed or incomplete.
    pub fn neighbours_v6(
        &mut self,
        index: u32,
        mac: [u8; 6],
    ) -> Result<Vec<Ipv6Addr>, NetlinkError> {
        use netlink_packet_route::neighbour::{
            NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
        };
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Inet6;
        msg.header.ifindex = index;
        let replies = self
            .transact(&Request::route(
                &RouteNetlinkMessage::GetNeighbour(msg),
                NLM_F_DUMP,
            ))
            .map_err(|e| fail("list the IPv6 neighbours", e))?;
        let mut out = Vec::new();
        for r in &replies {
            // A neighbour the parser cannot read is left out.
            let Ok(RouteNetlinkMessage::NewNeighbour(n)) = parse_reply(&r.bytes) else {
                continue;
            };
            if n.header.ifindex != index
                || matches!(
                    n.header.state,
                    NeighbourState::Failed | NeighbourState::Incomplete | NeighbourState::None
                )
            {
                continue;
            }
            let mut dst = None;
            let mut lladdr = None;
            for a in &n.attributes {
                match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(d)) => dst = Some(*d),
                    NeighbourAttribute::LinkLayerAddress(l) => lladdr = Some(l.clone()),
                    _ => {}
                }
            }
            if let (Some(d), Some(l)) = (dst, lladdr)
                && l[..] == mac[..]
            {
                out.push(d);
            }
        }
        Ok(out)
    }

    /// The IPv4 routes of the main table (all route types), with the
    /// outgoing interface's name resolved.
    pub fn routes_v4(&mut self) -> Result<Vec<RouteV4>, NetlinkError> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = AddressFamily::Inet;
        let replies = self
            .dump(RouteNetlinkMessage::GetRoute(msg))
            .map_err(|e| fail("list IPv4 routes", e))?;
        let mut routes: Vec<RouteV4> = replies
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => route_v4_from(r),
                _ => None,
            })
            .filter(|r| r.table == u32::from(RouteHeader::RT_TABLE_MAIN))
            .collect();
        if routes.iter().any(|r| r.oif.is_some()) {
            let names: HashMap<u32, String> = self
                .links()?
                .into_iter()
                .map(|l| (l.index, l.name))
                .collect();
            for r in &mut routes {
                r.oif_name = r.oif.and_then(|i| names.get(&i).cloned());
            }
        }
        Ok(routes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_route::route::{RouteNextHop, RouteType};

    /// What the conversions make of whatever the parser accepts.
    fn convert(m: RouteNetlinkMessage) {
        match m {
            RouteNetlinkMessage::NewLink(l) => drop(link_from(l)),
            RouteNetlinkMessage::NewAddress(a) => drop(addr_v4_from(&a)),
            RouteNetlinkMessage::NewRoute(r) => drop(route_v4_from(&r)),
            _ => {}
        }
    }

    proptest::proptest! {
        /// The parsing of what the kernel sends never panics, whatever the bytes.
        #[test]
        fn message_parsers_never_panic(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600),
            ty in proptest::num::u16::ANY,
            flags in proptest::num::u16::ANY,
        ) {
            if let Ok(msgs) = split_messages(&bytes) {
                for m in msgs {
                    let _ = parse_status(m.ty, m.flags, m.payload());
                    if let Ok(r) = parse_reply(m.bytes) {
                        convert(r);
                    }
                }
            }
            let _ = parse_status(ty, flags, &bytes);
        }

        /// Well-framed link, address and route messages with arbitrary
        /// attribute bytes reach the attribute parsers (random bytes rarely
        /// pass the framing).
        #[test]
        fn framed_messages_with_arbitrary_attributes_never_panic(
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..400),
            family_inet in proptest::bool::ANY,
        ) {
            let mut payload = vec![0u8; 16];
            if family_inet {
                payload[0] = libc::AF_INET as u8;
            }
            payload.extend_from_slice(&body);
            for ty in [RTM_NEWLINK, RTM_NEWADDR, RTM_NEWROUTE] {
                if let Ok(r) = parse_reply(&hdr(ty, 0, 1, &payload)) {
                    convert(r);
                }
            }
            let msg = hdr(NLMSG_ERROR, NLM_F_ACK_TLVS, 1, &payload);
            for m in split_messages(&msg).unwrap() {
                let _ = parse_status(m.ty, m.flags, m.payload());
            }
        }
    }

    fn hdr(ty: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((16 + payload.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(payload);
        m
    }

    /// One netlink attribute, padded.
    fn nla(ty: u16, data: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&ty.to_ne_bytes());
        a.extend_from_slice(data);
        a.resize(align4(a.len()), 0);
        a
    }

    /// `msg` framed as the kernel would send it, parsed back.
    fn round_trip(msg: RouteNetlinkMessage) -> RouteNetlinkMessage {
        parse_reply(&Request::route(&msg, 0).finish(1)).unwrap()
    }

    #[test]
    fn requests_are_framed_around_the_serialized_message() {
        let msg = RouteNetlinkMessage::NewLink(link_message(
            0,
            vec![
                LinkAttribute::IfName("lume-mt0".into()),
                LinkAttribute::Link(7),
                LinkAttribute::LinkInfo(vec![
                    NlLinkInfo::Kind(InfoKind::MacVlan),
                    NlLinkInfo::Data(InfoData::MacVlan(vec![InfoMacVlan::Mode(
                        MacVlanMode::Bridge,
                    )])),
                ]),
            ],
        ));
        let req = Request::route(&msg, NLM_F_ACK | NLM_F_CREATE);
        let m = req.finish(42);
        let h = NetlinkBuffer::new_checked(&m[..]).unwrap();
        assert_eq!(h.length() as usize, m.len());
        assert_eq!(m.len() % 4, 0);
        assert_eq!(h.message_type(), RTM_NEWLINK);
        assert_eq!(h.flags(), NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE);
        assert_eq!(h.sequence_number(), 42);
        assert_eq!(h.port_number(), 0);
        assert_eq!(parse_reply(&m).unwrap(), msg);
        // IFLA_INFO_DATA carries IFLA_MACVLAN_MODE = MACVLAN_MODE_BRIDGE (4).
        let mode = [nla(1, &4u32.to_ne_bytes())].concat();
        assert!(m.windows(mode.len()).any(|w| w == mode), "{m:?}");
        assert!(!req.dump());
        let dump = Request::route(
            &RouteNetlinkMessage::GetLink(LinkMessage::default()),
            NLM_F_DUMP,
        );
        assert!(dump.dump());
        assert_eq!(
            Request::new(46, 0, vec![1, 2, 3]).finish(5)[16..],
            [1, 2, 3]
        );
    }

    #[test]
    fn parses_link_message() {
        let mut msg = link_message(
            12,
            vec![
                LinkAttribute::IfName("lume-mt0".into()),
                LinkAttribute::Controller(3),
                LinkAttribute::Address(vec![2, 0, 0, 0, 0, 1]),
                LinkAttribute::Mtu(1500),
                LinkAttribute::Link(4),
                LinkAttribute::IfAlias("lume".into()),
                LinkAttribute::LinkInfo(vec![NlLinkInfo::Kind(InfoKind::MacVtap)]),
            ],
        );
        msg.header.flags = LinkFlags::Up | LinkFlags::LowerUp;
        let RouteNetlinkMessage::NewLink(parsed) = round_trip(RouteNetlinkMessage::NewLink(msg))
        else {
            panic!("not a link");
        };
        assert_eq!(
            link_from(parsed),
            LinkInfo {
                index: 12,
                name: "lume-mt0".into(),
                up: true,
                master: Some(3),
                mac: Some([2, 0, 0, 0, 0, 1]),
                kind: Some("macvtap".into()),
                alias: Some("lume".into()),
                mtu: Some(1500),
                link: Some(4),
            }
        );
        // A 4-byte address (gre) is no MAC; index 0 masters and lower
        // devices are none; an empty alias is none; an unknown kind is
        // reported as the kernel names it.
        let msg = link_message(
            1,
            vec![
                LinkAttribute::IfName("gre0".into()),
                LinkAttribute::Address(vec![0; 4]),
                LinkAttribute::Controller(0),
                LinkAttribute::Link(0),
                LinkAttribute::IfAlias(String::new()),
                LinkAttribute::LinkInfo(vec![NlLinkInfo::Kind(InfoKind::Other("lume-new".into()))]),
            ],
        );
        let RouteNetlinkMessage::NewLink(parsed) = round_trip(RouteNetlinkMessage::NewLink(msg))
        else {
            panic!("not a link");
        };
        let link = link_from(parsed);
        assert_eq!(
            (link.up, link.mac, link.master, link.link, link.alias),
            (false, None, None, None, None)
        );
        assert_eq!(link.kind.as_deref(), Some("lume-new"));
        assert!(parse_reply(&hdr(RTM_NEWLINK, 0, 1, &[0; 8])).is_err());
    }

    #[test]
    fn parses_address_and_route_messages() {
        let msg = address_message(
            5,
            24,
            vec![
                AddressAttribute::Address(Ipv4Addr::new(192, 0, 2, 9).into()),
                AddressAttribute::Local(Ipv4Addr::new(192, 0, 2, 1).into()),
            ],
        );
        let RouteNetlinkMessage::NewAddress(a) = round_trip(RouteNetlinkMessage::NewAddress(msg))
        else {
            panic!("not an address");
        };
        assert_eq!(addr_v4_from(&a), Some((5, Ipv4Addr::new(192, 0, 2, 1), 24)));
        // Point-to-point without IFA_LOCAL: IFA_ADDRESS; IPv6: not ours.
        let only = address_message(
            5,
            32,
            vec![AddressAttribute::Address(
                Ipv4Addr::new(192, 0, 2, 7).into(),
            )],
        );
        assert_eq!(
            addr_v4_from(&only),
            Some((5, Ipv4Addr::new(192, 0, 2, 7), 32))
        );
        let mut v6 = only.clone();
        v6.header.family = AddressFamily::Inet6;
        assert_eq!(addr_v4_from(&v6), None);

        let mut msg = RouteMessage::default();
        msg.header.address_family = AddressFamily::Inet;
        msg.header.destination_prefix_length = 24;
        msg.header.table = RouteHeader::RT_TABLE_MAIN;
        msg.header.kind = RouteType::Unicast;
        msg.attributes = vec![
            RouteAttribute::Destination(RouteAddress::Inet(Ipv4Addr::new(198, 51, 100, 0))),
            RouteAttribute::Oif(4),
            RouteAttribute::Gateway(RouteAddress::Inet(Ipv4Addr::new(192, 0, 2, 254))),
            RouteAttribute::Priority(100),
            RouteAttribute::Table(254),
        ];
        let RouteNetlinkMessage::NewRoute(r) = round_trip(RouteNetlinkMessage::NewRoute(msg))
        else {
            panic!("not a route");
        };
        assert_eq!(
            route_v4_from(&r),
            Some(RouteV4 {
                dst: Ipv4Addr::new(198, 51, 100, 0),
                prefix: 24,
                oif: Some(4),
                oif_name: None,
                gateway: Some(Ipv4Addr::new(192, 0, 2, 254)),
                table: 254,
                metric: Some(100),
            })
        );

        // Default multipath route: first hop's device and gateway.
        let hop = |index, gw| {
            let mut h = RouteNextHop::default();
            h.interface_index = index;
            h.attributes = vec![RouteAttribute::Gateway(RouteAddress::Inet(gw))];
            h
        };
        let mut msg = RouteMessage::default();
        msg.header.address_family = AddressFamily::Inet;
        msg.header.table = RouteHeader::RT_TABLE_MAIN;
        msg.header.kind = RouteType::Unicast;
        msg.attributes = vec![RouteAttribute::MultiPath(vec![
            hop(9, Ipv4Addr::new(203, 0, 113, 1)),
            hop(10, Ipv4Addr::new(203, 0, 113, 2)),
        ])];
        let RouteNetlinkMessage::NewRoute(r) = round_trip(RouteNetlinkMessage::NewRoute(msg))
        else {
            panic!("not a route");
        };
        let r = route_v4_from(&r).unwrap();
        assert_eq!((r.dst, r.prefix, r.table), (Ipv4Addr::UNSPECIFIED, 0, 254));
        assert_eq!(
            (r.oif, r.gateway),
            (Some(9), Some(Ipv4Addr::new(203, 0, 113, 1)))
        );

        let mut v6 = RouteMessage::default();
        v6.header.address_family = AddressFamily::Inet6;
        assert!(route_v4_from(&v6).is_none());
    }

    #[test]
    fn a_reply_with_a_misread_attribute_keeps_the_others() {
        let strict = |m: &[u8]| NetlinkMessage::<RouteNetlinkMessage>::deserialize(m).is_err();

        // IFLA_MTU of 2 bytes.
        let mut p = vec![0u8; 16];
        p[4..8].copy_from_slice(&7u32.to_ne_bytes());
        p[8..12].copy_from_slice(&1u32.to_ne_bytes()); // IFF_UP
        p.extend(nla(3, b"eth9\0"));
        p.extend(nla(4, &[0xdc, 0x05]));
        p.extend(nla(18, &nla(1, b"veth\0")));
        let m = hdr(RTM_NEWLINK, 0, 1, &p);
        assert!(strict(&m), "netlink-packet-route now reads it");
        let RouteNetlinkMessage::NewLink(l) = parse_reply(&m).unwrap() else {
            panic!("not a link");
        };
        let l = link_from(l);
        assert_eq!((l.index, l.name.as_str(), l.up), (7, "eth9", true));
        assert_eq!((l.kind.as_deref(), l.mtu), (Some("veth"), None));

        // IFA_FLAGS of 1 byte.
        let mut p = vec![libc::AF_INET as u8, 24, 0, 0];
        p.extend(5u32.to_ne_bytes());
        p.extend(nla(2, &[192, 0, 2, 1]));
        p.extend(nla(8, &[1]));
        let m = hdr(RTM_NEWADDR, 0, 1, &p);
        assert!(strict(&m), "netlink-packet-route now reads it");
        let RouteNetlinkMessage::NewAddress(a) = parse_reply(&m).unwrap() else {
            panic!("not an address");
        };
        assert_eq!(addr_v4_from(&a), Some((5, Ipv4Addr::new(192, 0, 2, 1), 24)));

        // RTA_PRIORITY of 2 bytes.
        let mut p = vec![libc::AF_INET as u8, 24, 0, 0, 254, 4, 0, 1, 0, 0, 0, 0];
        p.extend(nla(1, &[198, 51, 100, 0]));
        p.extend(nla(6, &[1, 2]));
        p.extend(nla(4, &3u32.to_ne_bytes()));
        let m = hdr(RTM_NEWROUTE, 0, 1, &p);
        assert!(strict(&m), "netlink-packet-route now reads it");
        let RouteNetlinkMessage::NewRoute(r) = parse_reply(&m).unwrap() else {
            panic!("not a route");
        };
        let r = route_v4_from(&r).unwrap();
        assert_eq!(
            (r.dst, r.prefix, r.oif, r.metric, r.table),
            (Ipv4Addr::new(198, 51, 100, 0), 24, Some(3), None, 254)
        );

        // A header too short is still an error, as is another type.
        assert!(parse_reply(&hdr(RTM_NEWLINK, 0, 1, &[0; 8])).is_err());
        assert!(parse_reply(&hdr(RTM_NEWROUTE, 0, 1, &[2, 0, 0])).is_err());
    }

    #[test]
    fn parses_acks_errors_and_extended_acks() {
        // Plain ack.
        let mut p = 0i32.to_ne_bytes().to_vec();
        p.extend_from_slice(&hdr(RTM_NEWLINK, 5, 1, &[])[..16]);
        assert_eq!(parse_status(NLMSG_ERROR, 0, &p).unwrap(), (0, None));

        // Capped error with an extended ack message.
        let mut p = (-22i32).to_ne_bytes().to_vec();
        p.extend_from_slice(&hdr(RTM_NEWLINK, 5, 1, &[0; 40])[..16]);
        let tlv = nla(NLMSGERR_ATTR_MSG, b"Unknown device type\0");
        p.extend_from_slice(&tlv);
        let flags = NLM_F_CAPPED | NLM_F_ACK_TLVS;
        assert_eq!(
            parse_status(NLMSG_ERROR, flags, &p).unwrap(),
            (-22, Some("Unknown device type".into()))
        );

        // Uncapped: the echoed request is skipped.
        let mut p = (-17i32).to_ne_bytes().to_vec();
        p.extend_from_slice(&hdr(RTM_NEWLINK, 5, 1, &[0; 8]));
        p.extend_from_slice(&nla(3, &[0; 4])); // NLMSGERR_ATTR_OFFS first
        p.extend_from_slice(&tlv);
        assert_eq!(
            parse_status(NLMSG_ERROR, NLM_F_ACK_TLVS, &p).unwrap(),
            (-17, Some("Unknown device type".into()))
        );

        // DONE with and without a status.
        assert_eq!(parse_status(NLMSG_DONE, 0, &[]).unwrap(), (0, None));
        assert_eq!(
            parse_status(NLMSG_DONE, 0, &(-16i32).to_ne_bytes()).unwrap(),
            (-16, None)
        );
        assert!(parse_status(NLMSG_ERROR, 0, &[0, 0]).is_err());
        // A malformed attribute ends the search without a message.
        let mut p = (-22i32).to_ne_bytes().to_vec();
        p.extend_from_slice(&hdr(RTM_NEWLINK, 5, 1, &[])[..16]);
        p.extend_from_slice(&[200, 0, 1, 0, 0, 0]);
        assert_eq!(parse_status(NLMSG_ERROR, flags, &p).unwrap(), (-22, None));
    }

    #[test]
    fn splits_datagrams() {
        let mut d = hdr(
            RTM_NEWLINK,
            netlink_packet_core::NLM_F_MULTIPART,
            3,
            &[1, 2, 3],
        );
        d.resize(align4(d.len()), 0);
        let first_len = 19;
        d.extend_from_slice(&hdr(
            NLMSG_DONE,
            netlink_packet_core::NLM_F_MULTIPART,
            3,
            &0i32.to_ne_bytes(),
        ));
        let msgs = split_messages(&d).unwrap();
        assert_eq!(msgs.len(), 2);
        assert_eq!(
            msgs[0],
            RawMsg {
                ty: RTM_NEWLINK,
                flags: netlink_packet_core::NLM_F_MULTIPART,
                seq: 3,
                bytes: &d[..first_len],
            }
        );
        assert_eq!(msgs[0].payload(), [1, 2, 3]);
        assert_eq!(msgs[1].ty, NLMSG_DONE);
        let mut bad = hdr(RTM_NEWLINK, 0, 1, &[]);
        bad[0] = 200;
        assert!(split_messages(&bad).is_err());
        let mut short = hdr(RTM_NEWLINK, 0, 1, &[]);
        short[0] = 8;
        assert!(split_messages(&short).is_err());
    }

    #[test]
    fn names_are_checked_like_the_kernel_does() {
        for ok in ["eth0", "lume-br0", "a", "abcdefghijklmno", "br.10", "x@y"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "abcdefghijklmnop",
            ".",
            "..",
            "a/b",
            "a:b",
            "a b",
            "a\tb",
        ] {
            assert!(
                matches!(check_name(bad), Err(NetlinkError::InvalidName { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn broadcast_addresses() {
        let a = Ipv4Addr::new(192, 0, 2, 1);
        assert_eq!(broadcast_v4(a, 24), Some(Ipv4Addr::new(192, 0, 2, 255)));
        assert_eq!(broadcast_v4(a, 0), Some(Ipv4Addr::BROADCAST));
        assert_eq!(broadcast_v4(a, 31), None);
        assert_eq!(broadcast_v4(a, 32), None);
    }

    #[test]
    fn error_messages() {
        let e = fail(
            "create bridge br0",
            TxError::Kernel {
                errno: Errno::EPERM,
                message: None,
            },
        );
        assert!(matches!(e, NetlinkError::PermissionDenied { .. }));
        let s = e.to_string();
        assert!(
            s.starts_with("Failed to create bridge br0: CAP_NET_ADMIN is needed"),
            "{s}"
        );
        assert!(s.contains("setcap cap_net_admin+ep"), "{s}");

        let e = fail(
            "create macvtap mt0 on eth0",
            TxError::Kernel {
                errno: Errno::EOPNOTSUPP,
                message: Some("Unknown device type.".into()),
            },
        );
        assert_eq!(e.errno(), Some(Errno::EOPNOTSUPP));
        let s = e.to_string();
        assert!(
            s.starts_with("Failed to create macvtap mt0 on eth0: Unknown device type (EOPNOTSUPP"),
            "{s}"
        );

        let e = fail("list interfaces", TxError::Io(Errno::EAGAIN));
        assert!(e.to_string().contains("no reply from the kernel"), "{e}");

        let e = NetlinkError::Exists {
            kind: "bridge",
            name: "br0".into(),
        };
        assert_eq!(
            e.to_string(),
            "Failed to create bridge br0: an interface with that name already exists"
        );
        let e = Netlink::fail_on(
            "set br0 up",
            "br0",
            TxError::Kernel {
                errno: Errno::ENODEV,
                message: None,
            },
        );
        assert_eq!(
            e.to_string(),
            "Failed to set br0 up: interface br0 does not exist"
        );
    }

    #[test]
    fn the_generation_is_read_from_its_attribute_only() {
        // nfgenmsg, then NFTA_GEN_PROC_PID (2) and NFTA_GEN_ID (1).
        let mut p = vec![0, 0, 0x12, 0x34];
        p.extend_from_slice(&[8, 0, 2, 0, 0, 0, 0, 7]);
        p.extend_from_slice(&[8, 0, 1, 0, 0, 0, 0x12, 0x34]);
        assert_eq!(parse_generation(&p), Some(0x1234));
        assert_eq!(parse_generation(&p[..12]), None);
        assert_eq!(parse_generation(&[0, 0]), None);
        // A value of the wrong size is no generation.
        let bad = [0, 0, 0, 0, 6, 0, 1, 0, 0, 1, 0, 0];
        assert_eq!(parse_generation(&bad), None);
    }

    /// Read-only: works unprivileged and changes nothing.
    #[test]
    fn reads_loopback_in_current_namespace() {
        let mut nl = Netlink::open().unwrap();
        let lo = nl.link_info("lo").unwrap().expect("lo exists");
        assert_eq!(lo.index, nl.link_index("lo").unwrap().unwrap());
        assert!(nl.links().unwrap().iter().any(|l| l.name == "lo"));
        assert_eq!(nl.link_index("lume-nope-xyz").unwrap(), None);
        assert!(matches!(
            nl.link_index("this-name-is-too-long"),
            Err(NetlinkError::InvalidName { .. })
        ));
    }

    mod netns {
        use super::*;

        use crate::util::testing::TestNetns as Netns;

        /// Drop CAP_NET_ADMIN from the calling thread's effective set only.
        fn drop_net_admin_on_this_thread() {
            const CAP_NET_ADMIN: u32 = 12;
            #[repr(C)]
            struct Header {
                version: u32,
                pid: i32,
            }
            #[repr(C)]
            #[derive(Clone, Copy, Default)]
            struct Data {
                effective: u32,
                permitted: u32,
                inheritable: u32,
            }
            let mut hdr = Header {
                version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
                pid: 0,
            };
            let mut data = [Data::default(); 2];
            // SAFETY: capget with a v3 header and room for two data structs,
            // as the v3 ABI requires; both pointers are live locals.
            let rc = unsafe { libc::syscall(libc::SYS_capget, &raw mut hdr, data.as_mut_ptr()) };
            assert_eq!(rc, 0, "capget");
            data[0].effective &= !(1 << CAP_NET_ADMIN);
            // SAFETY: as above; capset only changes this thread's credentials.
            let rc = unsafe { libc::syscall(libc::SYS_capset, &raw mut hdr, data.as_ptr()) };
            assert_eq!(rc, 0, "capset");
        }

        /// The nftables generation is the namespace's own: it moves on with
        /// a change to any table there and stays put without one.
        #[test]
        fn the_nftables_generation_moves_with_every_change() {
            if !nix::unistd::geteuid().is_root() {
                eprintln!("skipping: needs root for ip netns");
                return;
            }
            let ns = Netns::new(format!("lume-nfg-{}", std::process::id()));
            let inside = ns.run(|| {
                let mut nl = Netlink::open_netfilter().unwrap();
                let first = nl.nftables_generation().unwrap();
                assert_eq!(nl.nftables_generation().unwrap(), first);
                // A new socket sees the same value.
                let mut other = Netlink::open_netfilter().unwrap();
                assert_eq!(other.nftables_generation().unwrap(), first);
                // The `nft` process runs in this thread's namespace.
                let st = std::process::Command::new("nft")
                    .args(["add", "table", "inet", "lumetestgen"])
                    .status()
                    .unwrap();
                assert!(st.success());
                let second = nl.nftables_generation().unwrap();
                assert_ne!(second, first);
                assert_eq!(nl.nftables_generation().unwrap(), second);
                nl.namespace_cookie().unwrap()
            });
            // Another namespace has another cookie (and its own generation).
            let here = Netlink::open_netfilter()
                .unwrap()
                .namespace_cookie()
                .unwrap();
            assert_ne!(inside, here);
        }

        #[test]
        fn full_cycle_in_throwaway_namespace() {
            if !nix::unistd::geteuid().is_root() {
                eprintln!("skipping: needs root for ip netns");
                return;
            }
            let ns = Netns::new(format!("lume-nl-{}", std::process::id()));

            // Every check runs inside the namespace; the root namespace's
            // interfaces and routes are never touched.
            let (br_index, mac) = ns.run(|| {
                let mut nl = Netlink::open().unwrap();
                let names: Vec<_> = nl.links().unwrap().into_iter().map(|l| l.name).collect();
                assert_eq!(names, ["lo"]);

                nl.create_bridge("lume-br0").unwrap();
                assert!(matches!(
                    nl.create_bridge("lume-br0"),
                    Err(NetlinkError::Exists { kind: "bridge", .. })
                ));
                let br = nl.link_info("lume-br0").unwrap().unwrap();
                assert_eq!(br.kind.as_deref(), Some("bridge"));
                assert!(!br.up);
                assert!(br.mac.is_some());

                let pinned = [0x02, 0x00, 0x00, 0x00, 0xbb, 0x01];
                nl.set_mac("lume-br0", pinned).unwrap();
                nl.set_alias("lume-br0", "lume test bridge").unwrap();
                let br = nl.link_info("lume-br0").unwrap().unwrap();
                assert_eq!(br.mac, Some(pinned));
                assert_eq!(br.alias.as_deref(), Some("lume test bridge"));

                // Replies nobody read (abandoned requests) are skipped by
                // the next request, which gets its own: a lookup's, and a
                // dump's, which first makes the kernel refuse a second dump
                // (EBUSY) until it has been read to its end.
                let get = RouteNetlinkMessage::GetLink(link_message(
                    0,
                    vec![LinkAttribute::IfName("lo".into())],
                ));
                let dump = RouteNetlinkMessage::GetLink(link_message(0, Vec::new()));
                for (msg, flags) in [(get, NLM_F_ACK), (dump, NLM_F_DUMP)] {
                    let stale = Request::route(&msg, flags).finish(nl.seq.wrapping_add(1000));
                    socket::send(nl.socket.as_raw_fd(), &stale, MsgFlags::empty()).unwrap();
                    assert_eq!(nl.links().unwrap().len(), 2);
                    assert_eq!(nl.link_info("lume-br0").unwrap().unwrap().index, br.index);
                }

                let a = Ipv4Addr::new(192, 0, 2, 1);
                nl.add_address_v4("lume-br0", a, 24).unwrap();
                nl.add_address_v4("lume-br0", a, 24).unwrap(); // idempotent
                assert_eq!(nl.addresses_v4("lume-br0").unwrap(), [(a, 24)]);
                assert!(nl.all_addresses_v4().unwrap().contains(&(a, 24)));
                assert!(nl.addresses_v4("lo").unwrap().iter().all(|&(x, _)| x != a));
                assert!(matches!(
                    nl.add_address_v4("lume-br0", a, 33),
                    Err(NetlinkError::InvalidArgument { .. })
                ));
                nl.set_up("lume-br0").unwrap();
                assert!(nl.link_info("lume-br0").unwrap().unwrap().up);
                assert!(matches!(
                    nl.set_up("lume-nothere"),
                    Err(NetlinkError::NotFound { .. })
                ));
                (br.index, br.mac.unwrap())
            });
            assert_ne!(mac, [0; 6]);

            ns.ip(&[
                "link", "add", "lume-va", "type", "veth", "peer", "name", "lume-vb",
            ]);
            ns.ip(&[
                "route",
                "add",
                "198.51.100.0/24",
                "via",
                "192.0.2.254",
                "metric",
                "50",
            ]);

            ns.run(move || {
                let mut nl = Netlink::open().unwrap();
                let vb = nl.link_info("lume-vb").unwrap().unwrap();
                assert_eq!(vb.kind.as_deref(), Some("veth"));
                assert_eq!(vb.master, None);

                nl.set_master("lume-vb", "lume-br0").unwrap();
                assert_eq!(
                    nl.link_info("lume-vb").unwrap().unwrap().master,
                    Some(br_index)
                );
                let e = nl.set_master("lume-vb", "lume-nobr").unwrap_err();
                assert!(
                    matches!(&e, NetlinkError::NotFound { name, .. } if name == "lume-nobr"),
                    "{e}"
                );
                nl.set_nomaster("lume-vb").unwrap();
                assert_eq!(nl.link_info("lume-vb").unwrap().unwrap().master, None);
                nl.set_master("lume-vb", "lume-br0").unwrap();

                let mac = [0x02, 0x00, 0x00, 0x12, 0x34, 0x56];
                let idx = nl.create_macvlan("lume-mt0", "lume-va", mac).unwrap();
                let mt = nl.link_info("lume-mt0").unwrap().unwrap();
                assert_eq!(mt.index, idx);
                assert_eq!(mt.kind.as_deref(), Some("macvlan"));
                assert_eq!(mt.mac, Some(mac));
                let va = nl.link_info("lume-va").unwrap().unwrap();
                assert_eq!(mt.link, Some(va.index));
                assert_eq!(mt.mtu, va.mtu);
                assert!(va.mtu.is_some());
                nl.set_mtu("lume-mt0", 1400).unwrap();
                assert_eq!(nl.link_info("lume-mt0").unwrap().unwrap().mtu, Some(1400));
                // The kernel explains this refusal in an extended ack.
                let e = nl.set_mtu("lume-mt0", 10).unwrap_err();
                assert!(
                    matches!(
                        &e,
                        NetlinkError::Kernel {
                            errno: Errno::EINVAL,
                            message: Some(_),
                            ..
                        }
                    ),
                    "{e:?}"
                );
                eprintln!("MTU too small: {e}");
                nl.set_allmulti("lume-mt0").unwrap();
                assert!(matches!(
                    nl.create_macvlan("lume-mt0", "lume-va", mac),
                    Err(NetlinkError::Exists {
                        kind: "macvlan",
                        ..
                    })
                ));
                assert!(matches!(
                    nl.create_macvlan("lume-mt1", "lume-nope", mac),
                    Err(NetlinkError::NotFound { .. })
                ));
                let e = nl
                    .create_macvlan("lume-mt1", "lume-va", [1, 0, 0, 0, 0, 1])
                    .unwrap_err();
                assert!(matches!(&e, NetlinkError::Kernel { .. }), "{e}");
                eprintln!("multicast MAC rejected: {e}");
                nl.set_up("lume-va").unwrap();
                nl.set_up("lume-mt0").unwrap();
                nl.set_down("lume-mt0").unwrap();
                assert!(!nl.link_info("lume-mt0").unwrap().unwrap().up);

                let routes = nl.routes_v4().unwrap();
                let connected = routes
                    .iter()
                    .find(|r| r.dst == Ipv4Addr::new(192, 0, 2, 0) && r.prefix == 24)
                    .unwrap_or_else(|| panic!("no connected route in {routes:?}"));
                assert_eq!(connected.oif, Some(br_index));
                assert_eq!(connected.oif_name.as_deref(), Some("lume-br0"));
                assert_eq!(connected.table, 254);
                assert_eq!(connected.gateway, None);
                let via = routes
                    .iter()
                    .find(|r| r.dst == Ipv4Addr::new(198, 51, 100, 0))
                    .unwrap_or_else(|| panic!("no gateway route in {routes:?}"));
                assert_eq!(via.gateway, Some(Ipv4Addr::new(192, 0, 2, 254)));
                assert_eq!(via.metric, Some(50));
                assert_eq!(via.oif_name.as_deref(), Some("lume-br0"));
                // Local-table routes (192.0.2.1 itself) are not included.
                assert!(routes.iter().all(|r| r.table == 254));

                let kinds: Vec<_> = nl
                    .links()
                    .unwrap()
                    .into_iter()
                    .map(|l| (l.name, l.kind))
                    .collect();
                assert!(kinds.contains(&("lume-mt0".into(), Some("macvlan".into()))));
                assert_eq!(kinds.len(), 5, "{kinds:?}");
            });

            // EPERM maps to PermissionDenied (a thread without CAP_NET_ADMIN).
            ns.run(|| {
                drop_net_admin_on_this_thread();
                let mut nl = Netlink::open().unwrap();
                let e = nl.create_bridge("lume-br1").unwrap_err();
                assert!(matches!(e, NetlinkError::PermissionDenied { .. }), "{e}");
                assert!(e.to_string().contains("CAP_NET_ADMIN"), "{e}");
            });

            ns.run(|| {
                let mut nl = Netlink::open().unwrap();
                assert!(nl.delete_link("lume-mt0").unwrap());
                assert!(!nl.delete_link("lume-mt0").unwrap());
                assert!(nl.delete_link("lume-va").unwrap()); // takes lume-vb along
                assert_eq!(nl.link_index("lume-vb").unwrap(), None);
                assert!(nl.delete_link("lume-br0").unwrap());
                let names: Vec<_> = nl.links().unwrap().into_iter().map(|l| l.name).collect();
                assert_eq!(names, ["lo"]);
                assert!(nl.routes_v4().unwrap().is_empty());
            });
        }
    }
}
