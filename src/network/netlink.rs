//! A small synchronous rtnetlink (`NETLINK_ROUTE`) client: the link, address
//! and route operations the network modes need, without shelling out to `ip`.
//!
//! Messages are built and parsed by hand (the same approach as netavark's
//! netlink module): one `SOCK_RAW` netlink socket per [`Netlink`], one request
//! at a time, every request acknowledged (`NLM_F_ACK`) or ended by
//! `NLMSG_DONE`, replies matched by sequence number and checked to come from
//! the kernel. Extended acks are enabled, so kernel error strings ("Unknown
//! device type", ...) end up in [`NetlinkError::Kernel`].
//!
//! A netlink socket belongs to the network namespace of the thread that
//! created it: to work inside another namespace, `setns(2)` first and then
//! [`Netlink::open`].

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::socket::{
    self, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, sockopt,
};
use nix::sys::time::{TimeVal, TimeValLike};

/// Kernel UAPI numbers (linux/netlink.h, linux/rtnetlink.h, linux/if_link.h,
/// linux/if_addr.h). Written out here because `libc` only has some of them.
mod sys {
    pub const SOL_NETLINK: i32 = 270;
    pub const NETLINK_CAP_ACK: i32 = 10;
    pub const NETLINK_EXT_ACK: i32 = 11;

    pub const NLMSG_HDRLEN: usize = 16;
    pub const NLMSG_NOOP: u16 = 1;
    pub const NLMSG_ERROR: u16 = 2;
    pub const NLMSG_DONE: u16 = 3;
    pub const NLMSG_OVERRUN: u16 = 4;

    pub const NLM_F_REQUEST: u16 = 0x01;
    #[cfg(test)]
    pub const NLM_F_MULTI: u16 = 0x02;
    pub const NLM_F_ACK: u16 = 0x04;
    pub const NLM_F_DUMP_INTR: u16 = 0x10;
    pub const NLM_F_DUMP: u16 = 0x300;
    pub const NLM_F_EXCL: u16 = 0x200;
    pub const NLM_F_CREATE: u16 = 0x400;
    /// In an NLMSG_ERROR: the original request's payload was not echoed.
    pub const NLM_F_CAPPED: u16 = 0x100;
    /// In an NLMSG_ERROR / NLMSG_DONE: extended ack attributes follow.
    pub const NLM_F_ACK_TLVS: u16 = 0x200;
    pub const NLMSGERR_ATTR_MSG: u16 = 1;

    pub const NLA_TYPE_MASK: u16 = 0x3fff;

    pub const RTM_NEWLINK: u16 = 16;
    pub const RTM_DELLINK: u16 = 17;
    pub const RTM_GETLINK: u16 = 18;
    pub const RTM_NEWADDR: u16 = 20;
    pub const RTM_GETADDR: u16 = 22;
    pub const RTM_GETROUTE: u16 = 26;

    pub const AF_UNSPEC: u8 = 0;
    pub const AF_INET: u8 = 2;
    pub const IFF_UP: u32 = 1;
    pub const IFF_ALLMULTI: u32 = 0x200;

    pub const IFLA_ADDRESS: u16 = 1;
    pub const IFLA_IFNAME: u16 = 3;
    pub const IFLA_MTU: u16 = 4;
    pub const IFLA_LINK: u16 = 5;
    pub const IFLA_MASTER: u16 = 10;
    pub const IFLA_LINKINFO: u16 = 18;
    pub const IFLA_IFALIAS: u16 = 20;
    pub const IFLA_EXT_MASK: u16 = 29;
    pub const IFLA_INFO_KIND: u16 = 1;
    pub const IFLA_INFO_DATA: u16 = 2;
    pub const IFLA_MACVLAN_MODE: u16 = 1;
    pub const MACVLAN_MODE_BRIDGE: u32 = 4;
    pub const RTEXT_FILTER_SKIP_STATS: u32 = 1 << 3;

    pub const IFA_ADDRESS: u16 = 1;
    pub const IFA_LOCAL: u16 = 2;
    pub const IFA_BROADCAST: u16 = 4;

    pub const RTA_DST: u16 = 1;
    pub const RTA_OIF: u16 = 4;
    pub const RTA_GATEWAY: u16 = 5;
    pub const RTA_PRIORITY: u16 = 6;
    pub const RTA_MULTIPATH: u16 = 9;
    pub const RTA_TABLE: u16 = 15;
    pub const RT_TABLE_MAIN: u32 = 254;

    pub const IFINFOMSG_LEN: usize = 16;
    pub const IFADDRMSG_LEN: usize = 8;
    pub const RTMSG_LEN: usize = 12;
    pub const RTNEXTHOP_LEN: usize = 8;
}

/// The kernel's name length limit, IFNAMSIZ without the NUL.
const MAX_NAME_LEN: usize = 15;
/// Big enough for any dump datagram (the kernel caps those at 32 KiB).
const RECV_BUF_LEN: usize = 64 * 1024;
/// How long to wait for the kernel's reply before giving up.
const REPLY_TIMEOUT_SECS: i64 = 10;
/// A dump interrupted by a concurrent change is retried this many times.
const DUMP_ATTEMPTS: usize = 5;

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

/// A request being built: header, fixed family header, attributes.
struct Request {
    buf: Vec<u8>,
    dump: bool,
}

impl Request {
    fn new(ty: u16, flags: u16) -> Self {
        let mut buf = vec![0u8; sys::NLMSG_HDRLEN];
        buf[4..6].copy_from_slice(&ty.to_ne_bytes());
        buf[6..8].copy_from_slice(&(flags | sys::NLM_F_REQUEST).to_ne_bytes());
        Request {
            buf,
            dump: flags & sys::NLM_F_DUMP == sys::NLM_F_DUMP,
        }
    }

    /// `struct ifinfomsg` (AF_UNSPEC).
    fn ifinfomsg(mut self, index: u32, flags: u32, change: u32) -> Self {
        let mut h = [0u8; sys::IFINFOMSG_LEN];
        h[0] = sys::AF_UNSPEC;
        h[4..8].copy_from_slice(&index.to_ne_bytes());
        h[8..12].copy_from_slice(&flags.to_ne_bytes());
        h[12..16].copy_from_slice(&change.to_ne_bytes());
        self.buf.extend_from_slice(&h);
        self
    }

    /// `struct ifaddrmsg` (AF_INET, universe scope).
    fn ifaddrmsg(mut self, prefix: u8, index: u32) -> Self {
        let mut h = [0u8; sys::IFADDRMSG_LEN];
        h[0] = sys::AF_INET;
        h[1] = prefix;
        h[4..8].copy_from_slice(&index.to_ne_bytes());
        self.buf.extend_from_slice(&h);
        self
    }

    /// `struct rtmsg` (AF_INET, everything else zero: a dump filter).
    fn rtmsg(mut self) -> Self {
        let mut h = [0u8; sys::RTMSG_LEN];
        h[0] = sys::AF_INET;
        self.buf.extend_from_slice(&h);
        self
    }

    fn attr(&mut self, ty: u16, data: &[u8]) -> &mut Self {
        let len = u16::try_from(4 + data.len()).expect("netlink attribute too long");
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }

    fn attr_u32(&mut self, ty: u16, v: u32) -> &mut Self {
        self.attr(ty, &v.to_ne_bytes())
    }

    /// A NUL-terminated string attribute.
    fn attr_str(&mut self, ty: u16, s: &str) -> &mut Self {
        let mut data = Vec::with_capacity(s.len() + 1);
        data.extend_from_slice(s.as_bytes());
        data.push(0);
        self.attr(ty, &data)
    }

    /// A nested attribute whose contents `f` adds.
    fn nested(&mut self, ty: u16, f: impl FnOnce(&mut Self)) -> &mut Self {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0, 0]);
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        f(self);
        let len = u16::try_from(self.buf.len() - start).expect("netlink attribute too long");
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    /// The finished message with its length and sequence number filled in.
    fn finish(&self, seq: u32) -> Vec<u8> {
        let mut buf = self.buf.clone();
        let len = u32::try_from(buf.len()).expect("netlink message too long");
        buf[0..4].copy_from_slice(&len.to_ne_bytes());
        buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        buf
    }
}

fn ne_u16(b: &[u8]) -> u16 {
    u16::from_ne_bytes([b[0], b[1]])
}

fn ne_u32(b: &[u8]) -> u32 {
    u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
}

fn attr_u32(data: &[u8]) -> Option<u32> {
    (data.len() >= 4).then(|| ne_u32(data))
}

fn attr_ipv4(data: &[u8]) -> Option<Ipv4Addr> {
    (data.len() == 4).then(|| Ipv4Addr::new(data[0], data[1], data[2], data[3]))
}

/// A string attribute up to its NUL.
fn attr_string(data: &[u8]) -> String {
    let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    String::from_utf8_lossy(&data[..end]).into_owned()
}

/// Iterates over `(type, payload)` of netlink attributes, stopping at the
/// first malformed one. The type has the NESTED / NET_BYTEORDER bits masked.
struct Attrs<'a>(&'a [u8]);

impl<'a> Iterator for Attrs<'a> {
    type Item = (u16, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        if self.0.len() < 4 {
            return None;
        }
        let len = usize::from(ne_u16(&self.0[0..2]));
        if len < 4 || len > self.0.len() {
            self.0 = &[];
            return None;
        }
        let ty = ne_u16(&self.0[2..4]) & sys::NLA_TYPE_MASK;
        let data = &self.0[4..len];
        self.0 = &self.0[align4(len).min(self.0.len())..];
        Some((ty, data))
    }
}

/// One message of a reply.
#[derive(Debug)]
struct Reply {
    ty: u16,
    payload: Vec<u8>,
}

/// Parse the message headers of one received datagram.
/// One message of a received datagram, borrowed from the receive buffer.
#[derive(Debug, PartialEq, Eq)]
struct RawMsg<'a> {
    ty: u16,
    flags: u16,
    seq: u32,
    payload: &'a [u8],
}

fn split_messages(mut buf: &[u8]) -> Result<Vec<RawMsg<'_>>, TxError> {
    let mut out = Vec::new();
    while buf.len() >= sys::NLMSG_HDRLEN {
        let len = ne_u32(&buf[0..4]) as usize;
        if len < sys::NLMSG_HDRLEN || len > buf.len() {
            return Err(TxError::Protocol(format!(
                "malformed netlink message (length {len} in a {}-byte datagram)",
                buf.len()
            )));
        }
        let ty = ne_u16(&buf[4..6]);
        let flags = ne_u16(&buf[6..8]);
        let seq = ne_u32(&buf[8..12]);
        out.push(RawMsg {
            ty,
            flags,
            seq,
            payload: &buf[sys::NLMSG_HDRLEN..len],
        });
        buf = &buf[align4(len).min(buf.len())..];
    }
    Ok(out)
}

/// The error code of an NLMSG_ERROR or NLMSG_DONE payload (0 for an ack or a
/// clean end), and the extended ack message if there is one.
fn parse_status(ty: u16, flags: u16, payload: &[u8]) -> Result<(i32, Option<String>), TxError> {
    if payload.len() < 4 {
        if ty == sys::NLMSG_DONE {
            return Ok((0, None));
        }
        return Err(TxError::Protocol("truncated netlink error message".into()));
    }
    let code = ne_u32(&payload[0..4]) as i32;
    if flags & sys::NLM_F_ACK_TLVS == 0 {
        return Ok((code, None));
    }
    let mut rest = &payload[4..];
    if ty == sys::NLMSG_ERROR {
        // The original request's header, and its payload unless capped.
        if rest.len() < sys::NLMSG_HDRLEN {
            return Ok((code, None));
        }
        let skip = if flags & sys::NLM_F_CAPPED != 0 {
            sys::NLMSG_HDRLEN
        } else {
            align4(ne_u32(&rest[0..4]) as usize)
        };
        rest = &rest[skip.min(rest.len())..];
    }
    let message = Attrs(rest)
        .find(|(t, _)| *t == sys::NLMSGERR_ATTR_MSG)
        .map(|(_, d)| attr_string(d))
        .filter(|m| !m.is_empty());
    Ok((code, message))
}

fn parse_link(payload: &[u8]) -> Option<LinkInfo> {
    if payload.len() < sys::IFINFOMSG_LEN {
        return None;
    }
    let index = ne_u32(&payload[4..8]);
    let flags = ne_u32(&payload[8..12]);
    let mut link = LinkInfo {
        index,
        name: String::new(),
        up: flags & sys::IFF_UP != 0,
        master: None,
        mac: None,
        kind: None,
        alias: None,
        mtu: None,
        link: None,
    };
    for (ty, data) in Attrs(&payload[sys::IFINFOMSG_LEN..]) {
        match ty {
            sys::IFLA_MTU => link.mtu = attr_u32(data),
            sys::IFLA_LINK => link.link = attr_u32(data).filter(|&l| l != 0),
            sys::IFLA_IFNAME => link.name = attr_string(data),
            sys::IFLA_IFALIAS => link.alias = Some(attr_string(data)).filter(|a| !a.is_empty()),
            sys::IFLA_MASTER => link.master = attr_u32(data).filter(|&m| m != 0),
            sys::IFLA_ADDRESS => link.mac = data.try_into().ok(),
            sys::IFLA_LINKINFO => {
                link.kind = Attrs(data)
                    .find(|(t, _)| *t == sys::IFLA_INFO_KIND)
                    .map(|(_, d)| attr_string(d));
            }
            _ => {}
        }
    }
    Some(link)
}

/// `(index, address, prefix)` of an AF_INET RTM_NEWADDR.
fn parse_addr_v4(payload: &[u8]) -> Option<(u32, Ipv4Addr, u8)> {
    if payload.len() < sys::IFADDRMSG_LEN || payload[0] != sys::AF_INET {
        return None;
    }
    let prefix = payload[1];
    let index = ne_u32(&payload[4..8]);
    let (mut local, mut address) = (None, None);
    for (ty, data) in Attrs(&payload[sys::IFADDRMSG_LEN..]) {
        match ty {
            sys::IFA_LOCAL => local = attr_ipv4(data),
            sys::IFA_ADDRESS => address = attr_ipv4(data),
            _ => {}
        }
    }
    Some((index, local.or(address)?, prefix))
}

/// An AF_INET RTM_NEWROUTE, whatever its table (`oif_name` left empty).
fn parse_route_v4(payload: &[u8]) -> Option<RouteV4> {
    if payload.len() < sys::RTMSG_LEN || payload[0] != sys::AF_INET {
        return None;
    }
    let mut route = RouteV4 {
        dst: Ipv4Addr::UNSPECIFIED,
        prefix: payload[1],
        oif: None,
        oif_name: None,
        gateway: None,
        table: u32::from(payload[4]),
        metric: None,
    };
    for (ty, data) in Attrs(&payload[sys::RTMSG_LEN..]) {
        match ty {
            sys::RTA_DST => route.dst = attr_ipv4(data).unwrap_or(route.dst),
            sys::RTA_OIF => route.oif = attr_u32(data),
            sys::RTA_GATEWAY => route.gateway = attr_ipv4(data),
            sys::RTA_PRIORITY => route.metric = attr_u32(data),
            sys::RTA_TABLE => route.table = attr_u32(data).unwrap_or(route.table),
            // struct rtnexthop { len: u16, flags: u8, hops: u8, ifindex: i32 }
            // followed by its own attributes; report the first hop.
            sys::RTA_MULTIPATH if data.len() >= sys::RTNEXTHOP_LEN => {
                let len = usize::from(ne_u16(&data[0..2])).clamp(sys::RTNEXTHOP_LEN, data.len());
                route.oif = route.oif.or(Some(ne_u32(&data[4..8])).filter(|&i| i != 0));
                route.gateway = route.gateway.or_else(|| {
                    Attrs(&data[sys::RTNEXTHOP_LEN..len])
                        .find(|(t, _)| *t == sys::RTA_GATEWAY)
                        .and_then(|(_, d)| attr_ipv4(d))
                });
            }
            _ => {}
        }
    }
    Some(route)
}

/// The broadcast address of `addr/prefix`, for prefixes that have one.
fn broadcast_v4(addr: Ipv4Addr, prefix: u8) -> Option<Ipv4Addr> {
    (prefix <= 30).then(|| Ipv4Addr::from(u32::from(addr) | (u32::MAX >> prefix)))
}

/// An open rtnetlink socket in the creating thread's network namespace.
#[derive(Debug)]
pub struct Netlink {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl Netlink {
    pub fn open() -> Result<Self, NetlinkError> {
        let fd = socket::socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )
        .map_err(NetlinkError::Socket)?;
        socket::bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0)).map_err(NetlinkError::Socket)?;
        socket::setsockopt(
            &fd,
            sockopt::ReceiveTimeout,
            &TimeVal::seconds(REPLY_TIMEOUT_SECS),
        )
        .map_err(NetlinkError::Socket)?;
        // Best effort: kernels without these still work, with less detail.
        for opt in [sys::NETLINK_EXT_ACK, sys::NETLINK_CAP_ACK] {
            let one: libc::c_int = 1;
            // SAFETY: `fd` is an open socket we own; the option value points
            // to a live c_int and the length passed is exactly its size.
            let _ = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    sys::SOL_NETLINK,
                    opt,
                    (&raw const one).cast::<libc::c_void>(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
        }
        // Start from a varying number so replies to an earlier socket that
        // reused this port id cannot match.
        let seq = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(1);
        Ok(Netlink {
            fd,
            seq,
            buf: vec![0; RECV_BUF_LEN],
        })
    }

    /// Send one request and collect its reply messages, up to the ack (or,
    /// for a dump, NLMSG_DONE). A dump interrupted by concurrent changes is
    /// retried.
    fn transact(&mut self, req: &Request) -> Result<Vec<Reply>, TxError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (replies, interrupted) = self.transact_once(req)?;
            if !req.dump || !interrupted || attempt >= DUMP_ATTEMPTS {
                return Ok(replies);
            }
        }
    }

    fn transact_once(&mut self, req: &Request) -> Result<(Vec<Reply>, bool), TxError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let msg = req.finish(seq);
        loop {
            match socket::send(self.fd.as_raw_fd(), &msg, MsgFlags::empty()) {
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
            let (len, from_kernel) =
                match socket::recvfrom::<NetlinkAddr>(self.fd.as_raw_fd(), &mut self.buf) {
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
            for RawMsg {
                ty,
                flags,
                seq: mseq,
                payload,
            } in split_messages(&self.buf[..len])?
            {
                if mseq != seq {
                    continue; // left over from an earlier, abandoned request
                }
                interrupted |= flags & sys::NLM_F_DUMP_INTR != 0;
                match ty {
                    sys::NLMSG_NOOP => {}
                    sys::NLMSG_OVERRUN => {
                        return Err(TxError::Protocol("netlink overrun".into()));
                    }
                    sys::NLMSG_ERROR | sys::NLMSG_DONE => {
                        let (code, message) = parse_status(ty, flags, payload)?;
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
                            ty,
                            payload: payload.to_vec(),
                        });
                    }
                }
            }
        }
    }

    /// A request that only needs the ack.
    fn execute(&mut self, req: &Request) -> Result<(), TxError> {
        self.transact(req).map(drop)
    }

    fn get_link(&mut self, name: &str) -> Result<Option<LinkInfo>, NetlinkError> {
        check_name(name)?;
        let mut req = Request::new(sys::RTM_GETLINK, sys::NLM_F_ACK).ifinfomsg(0, 0, 0);
        req.attr_str(sys::IFLA_IFNAME, name)
            .attr_u32(sys::IFLA_EXT_MASK, sys::RTEXT_FILTER_SKIP_STATS);
        match self.transact(&req) {
            Ok(replies) => Ok(replies
                .iter()
                .filter(|r| r.ty == sys::RTM_NEWLINK)
                .find_map(|r| parse_link(&r.payload))),
            Err(TxError::Kernel {
                errno: Errno::ENODEV,
                ..
            }) => Ok(None),
            Err(e) => Err(fail(&format!("look up interface {name}"), e)),
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

    pub fn link_index(&mut self, name: &str) -> Result<Option<u32>, NetlinkError> {
        Ok(self.get_link(name)?.map(|l| l.index))
    }

    pub fn link_info(&mut self, name: &str) -> Result<Option<LinkInfo>, NetlinkError> {
        self.get_link(name)
    }

    /// All links of the namespace, in index order.
    pub fn links(&mut self) -> Result<Vec<LinkInfo>, NetlinkError> {
        let mut req = Request::new(sys::RTM_GETLINK, sys::NLM_F_DUMP).ifinfomsg(0, 0, 0);
        req.attr_u32(sys::IFLA_EXT_MASK, sys::RTEXT_FILTER_SKIP_STATS);
        let replies = self
            .transact(&req)
            .map_err(|e| fail("list interfaces", e))?;
        let mut links: Vec<LinkInfo> = replies
            .iter()
            .filter(|r| r.ty == sys::RTM_NEWLINK)
            .filter_map(|r| parse_link(&r.payload))
            .collect();
        links.sort_by_key(|l| l.index);
        Ok(links)
    }

    /// Create a bridge (left down). An existing link of that name is
    /// [`NetlinkError::Exists`].
    pub fn create_bridge(&mut self, name: &str) -> Result<(), NetlinkError> {
        check_name(name)?;
        let mut req = Request::new(
            sys::RTM_NEWLINK,
            sys::NLM_F_ACK | sys::NLM_F_CREATE | sys::NLM_F_EXCL,
        )
        .ifinfomsg(0, 0, 0);
        req.attr_str(sys::IFLA_IFNAME, name)
            .nested(sys::IFLA_LINKINFO, |r| {
                r.attr_str(sys::IFLA_INFO_KIND, "bridge");
            });
        match self.execute(&req) {
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
        let mut req = Request::new(sys::RTM_NEWLINK, sys::NLM_F_ACK).ifinfomsg(index, 0, 0);
        req.attr(sys::IFLA_ADDRESS, &mac);
        self.execute(&req)
            .map_err(|e| fail(&format!("set the MAC address of {name}"), e))
    }

    /// Sets the alias (IFLA_IFALIAS) of link `name`.
    pub fn set_alias(&mut self, name: &str, alias: &str) -> Result<(), NetlinkError> {
        let index = self.require(name, "set the alias of")?;
        let mut req = Request::new(sys::RTM_NEWLINK, sys::NLM_F_ACK).ifinfomsg(index, 0, 0);
        req.attr_str(sys::IFLA_IFALIAS, alias);
        self.execute(&req)
            .map_err(|e| Self::fail_on("set the alias of", name, e))
    }

    /// Create a macvlan in bridge mode on `parent` with address `mac` (left
    /// down) and return its ifindex.
    pub fn create_macvlan(
        &mut self,
        name: &str,
        parent: &str,
        mac: [u8; 6],
    ) -> Result<u32, NetlinkError> {
        self.create_macvlan_kind("macvlan", name, parent, mac)
    }

    fn create_macvlan_kind(
        &mut self,
        kind: &'static str,
        name: &str,
        parent: &str,
        mac: [u8; 6],
    ) -> Result<u32, NetlinkError> {
        check_name(name)?;
        let op = format!("create {kind} {name} on {parent}");
        let parent_index = self.require(parent, &op)?;
        let mut req = Request::new(
            sys::RTM_NEWLINK,
            sys::NLM_F_ACK | sys::NLM_F_CREATE | sys::NLM_F_EXCL,
        )
        .ifinfomsg(0, 0, 0);
        req.attr_str(sys::IFLA_IFNAME, name)
            .attr_u32(sys::IFLA_LINK, parent_index)
            .attr(sys::IFLA_ADDRESS, &mac)
            .nested(sys::IFLA_LINKINFO, |r| {
                r.attr_str(sys::IFLA_INFO_KIND, kind)
                    .nested(sys::IFLA_INFO_DATA, |r| {
                        r.attr_u32(sys::IFLA_MACVLAN_MODE, sys::MACVLAN_MODE_BRIDGE);
                    });
            });
        match self.execute(&req) {
            Err(TxError::Kernel {
                errno: Errno::EEXIST,
                ..
            }) => {
                return Err(NetlinkError::Exists {
                    kind,
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
        let mut req = Request::new(sys::RTM_NEWLINK, sys::NLM_F_ACK).ifinfomsg(index, 0, 0);
        req.attr_u32(sys::IFLA_MTU, mtu);
        self.execute(&req).map_err(|e| Self::fail_on(&op, name, e))
    }

    /// Make `name` receive every multicast group (IFF_ALLMULTI), as
    /// `ip link set NAME allmulticast on` does.
    pub fn set_allmulti(&mut self, name: &str) -> Result<(), NetlinkError> {
        let op = format!("set {name} allmulticast");
        let index = self.require(name, &op)?;
        let req = Request::new(sys::RTM_NEWLINK, sys::NLM_F_ACK).ifinfomsg(
            index,
            sys::IFF_ALLMULTI,
            sys::IFF_ALLMULTI,
        );
        self.execute(&req).map_err(|e| Self::fail_on(&op, name, e))
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
        let mut req = Request::new(message_type, flags | sys::NLM_F_ACK);
        req.buf.extend_from_slice(payload);
        self.execute(&req).map_err(|e| fail(op, e))
    }

    fn set_flags(&mut self, name: &str, up: bool) -> Result<(), NetlinkError> {
        let op = format!("set {name} {}", if up { "up" } else { "down" });
        let index = self.require(name, &op)?;
        let flags = if up { sys::IFF_UP } else { 0 };
        let req =
            Request::new(sys::RTM_NEWLINK, sys::NLM_F_ACK).ifinfomsg(index, flags, sys::IFF_UP);
        self.execute(&req).map_err(|e| Self::fail_on(&op, name, e))
    }

    pub fn set_up(&mut self, name: &str) -> Result<(), NetlinkError> {
        self.set_flags(name, true)
    }

    pub fn set_down(&mut self, name: &str) -> Result<(), NetlinkError> {
        self.set_flags(name, false)
    }

    fn set_master_index(&mut self, name: &str, master: u32, op: &str) -> Result<(), NetlinkError> {
        let index = self.require(name, op)?;
        let mut req = Request::new(sys::RTM_NEWLINK, sys::NLM_F_ACK).ifinfomsg(index, 0, 0);
        req.attr_u32(sys::IFLA_MASTER, master);
        self.execute(&req).map_err(|e| Self::fail_on(op, name, e))
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
        let mut req = Request::new(
            sys::RTM_NEWADDR,
            sys::NLM_F_ACK | sys::NLM_F_CREATE | sys::NLM_F_EXCL,
        )
        .ifaddrmsg(prefix, index);
        req.attr(sys::IFA_LOCAL, &addr.octets())
            .attr(sys::IFA_ADDRESS, &addr.octets());
        if let Some(brd) = broadcast_v4(addr, prefix) {
            req.attr(sys::IFA_BROADCAST, &brd.octets());
        }
        match self.execute(&req) {
            // EEXIST: this exact local address and prefix is on the link.
            Ok(())
            | Err(TxError::Kernel {
                errno: Errno::EEXIST,
                ..
            }) => Ok(()),
            Err(e) => Err(Self::fail_on(&op, name, e)),
        }
    }

    /// The IPv4 addresses of `name` with their prefix lengths.
    pub fn addresses_v4(&mut self, name: &str) -> Result<Vec<(Ipv4Addr, u8)>, NetlinkError> {
        let op = format!("list the addresses of {name}");
        let index = self.require(name, &op)?;
        let req = Request::new(sys::RTM_GETADDR, sys::NLM_F_DUMP).ifaddrmsg(0, 0);
        let replies = self.transact(&req).map_err(|e| fail(&op, e))?;
        Ok(replies
            .iter()
            .filter(|r| r.ty == sys::RTM_NEWADDR)
            .filter_map(|r| parse_addr_v4(&r.payload))
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
        let mut req = Request::new(message_type, sys::NLM_F_DUMP);
        req.buf.extend_from_slice(payload);
        let replies = self.transact(&req).map_err(|e| fail(op, e))?;
        Ok(replies
            .into_iter()
            .filter(|r| r.ty == reply_type)
            .map(|r| r.payload)
            .collect())
    }

    /// Every IPv4 address of every link, with its prefix length.
    pub fn all_addresses_v4(&mut self) -> Result<Vec<(Ipv4Addr, u8)>, NetlinkError> {
        let req = Request::new(sys::RTM_GETADDR, sys::NLM_F_DUMP).ifaddrmsg(0, 0);
        let replies = self
            .transact(&req)
            .map_err(|e| fail("list the host's addresses", e))?;
        Ok(replies
            .iter()
            .filter(|r| r.ty == sys::RTM_NEWADDR)
            .filter_map(|r| parse_addr_v4(&r.payload))
            .map(|(_, a, p)| (a, p))
            .collect())
    }

    /// Delete a link: Ok(true) if it was deleted, Ok(false) if there was none.
    pub fn delete_link(&mut self, name: &str) -> Result<bool, NetlinkError> {
        let Some(index) = self.link_index(name)? else {
            return Ok(false);
        };
        let req = Request::new(sys::RTM_DELLINK, sys::NLM_F_ACK).ifinfomsg(index, 0, 0);
        match self.execute(&req) {
            Ok(()) => Ok(true),
            Err(TxError::Kernel {
                errno: Errno::ENODEV,
                ..
            }) => Ok(false),
            Err(e) => Err(fail(&format!("delete interface {name}"), e)),
        }
    }

    /// The IPv4 routes of the main table (all route types), with the
    /// outgoing interface's name resolved.
    pub fn routes_v4(&mut self) -> Result<Vec<RouteV4>, NetlinkError> {
        let req = Request::new(sys::RTM_GETROUTE, sys::NLM_F_DUMP).rtmsg();
        let replies = self
            .transact(&req)
            .map_err(|e| fail("list IPv4 routes", e))?;
        let mut routes: Vec<RouteV4> = replies
            .iter()
            .filter_map(|r| parse_route_v4(&r.payload))
            .filter(|r| r.table == sys::RT_TABLE_MAIN)
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

    proptest::proptest! {
        /// The parsers of what the kernel sends never panic, whatever the bytes.
        #[test]
        fn message_parsers_never_panic(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600),
            ty in proptest::num::u16::ANY,
            flags in proptest::num::u16::ANY,
        ) {
            if let Ok(msgs) = split_messages(&bytes) {
                for m in msgs {
                    let _ = parse_status(m.ty, m.flags, m.payload);
                    let _ = parse_link(m.payload);
                    let _ = parse_addr_v4(m.payload);
                    let _ = parse_route_v4(m.payload);
                }
            }
            let _ = parse_status(ty, flags, &bytes);
            let _ = parse_link(&bytes);
            let _ = parse_addr_v4(&bytes);
            let _ = parse_route_v4(&bytes);
            let _ = Attrs(&bytes).count();
        }

        /// Well-framed messages with arbitrary attribute bytes reach the
        /// attribute walkers (random bytes rarely pass the framing).
        #[test]
        fn framed_messages_with_arbitrary_attributes_never_panic(
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..400),
            family_inet in proptest::bool::ANY,
        ) {
            let mut payload = vec![0u8; sys::IFINFOMSG_LEN.max(sys::RTMSG_LEN).max(sys::IFADDRMSG_LEN)];
            if family_inet {
                payload[0] = sys::AF_INET;
            }
            payload.extend_from_slice(&body);
            let _ = parse_link(&payload);
            let _ = parse_addr_v4(&payload);
            let _ = parse_route_v4(&payload);
            let msg = hdr(sys::NLMSG_ERROR, sys::NLM_F_ACK_TLVS, 1, &payload);
            for m in split_messages(&msg).unwrap() {
                let _ = parse_status(m.ty, m.flags, m.payload);
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

    #[test]
    fn request_layout_with_nested_attributes() {
        let mut req = Request::new(sys::RTM_NEWLINK, sys::NLM_F_ACK | sys::NLM_F_CREATE).ifinfomsg(
            7,
            sys::IFF_UP,
            sys::IFF_UP,
        );
        req.attr_str(sys::IFLA_IFNAME, "br0")
            .nested(sys::IFLA_LINKINFO, |r| {
                r.attr_str(sys::IFLA_INFO_KIND, "macvtap")
                    .nested(sys::IFLA_INFO_DATA, |r| {
                        r.attr_u32(sys::IFLA_MACVLAN_MODE, 4);
                    });
            });
        let m = req.finish(42);
        assert_eq!(ne_u32(&m[0..4]) as usize, m.len());
        assert_eq!(m.len() % 4, 0);
        assert_eq!(ne_u16(&m[4..6]), sys::RTM_NEWLINK);
        assert_eq!(
            ne_u16(&m[6..8]),
            sys::NLM_F_REQUEST | sys::NLM_F_ACK | sys::NLM_F_CREATE
        );
        assert_eq!(ne_u32(&m[8..12]), 42);
        assert_eq!(ne_u32(&m[20..24]), 7);
        let attrs: Vec<_> = Attrs(&m[32..]).collect();
        assert_eq!(attrs.len(), 2);
        assert_eq!(attrs[0], (sys::IFLA_IFNAME, &b"br0\0"[..]));
        assert_eq!(attrs[1].0, sys::IFLA_LINKINFO);
        let info: Vec<_> = Attrs(attrs[1].1).collect();
        assert_eq!(info[0], (sys::IFLA_INFO_KIND, &b"macvtap\0"[..]));
        let data: Vec<_> = Attrs(info[1].1).collect();
        assert_eq!(data, [(sys::IFLA_MACVLAN_MODE, &4u32.to_ne_bytes()[..])]);
        assert!(!req.dump);
        assert!(Request::new(sys::RTM_GETLINK, sys::NLM_F_DUMP).dump);
    }

    #[test]
    fn attrs_stop_at_malformed_and_mask_flags() {
        let mut req = Request::new(0, 0);
        req.attr(0x8000 | 3, &[1, 2, 3]).attr_u32(5, 9);
        let body = req.buf[16..].to_vec();
        let got: Vec<_> = Attrs(&body).collect();
        assert_eq!(got, [(3, &[1u8, 2, 3][..]), (5, &9u32.to_ne_bytes()[..])]);
        // Claimed length past the end: nothing, and no panic.
        let bad = [200u8, 0, 1, 0, 0, 0];
        assert_eq!(Attrs(&bad).count(), 0);
        assert_eq!(Attrs(&[2, 0, 1, 0]).count(), 0);
        assert_eq!(Attrs(&[]).count(), 0);
    }

    #[test]
    fn parses_link_message() {
        let mut req = Request::new(0, 0).ifinfomsg(12, sys::IFF_UP | 0x1000, 0);
        req.attr_str(sys::IFLA_IFNAME, "lume-mt0")
            .attr_u32(sys::IFLA_MASTER, 3)
            .attr(sys::IFLA_ADDRESS, &[2, 0, 0, 0, 0, 1])
            .nested(sys::IFLA_LINKINFO, |r| {
                r.attr_str(sys::IFLA_INFO_KIND, "macvtap");
            });
        let link = parse_link(&req.buf[16..]).unwrap();
        assert_eq!(
            link,
            LinkInfo {
                index: 12,
                name: "lume-mt0".into(),
                up: true,
                master: Some(3),
                mac: Some([2, 0, 0, 0, 0, 1]),
                kind: Some("macvtap".into()),
                alias: None,
                mtu: None,
                link: None,
            }
        );
        // Loopback-like: 6-byte zero address is still a MAC; other lengths
        // (e.g. tun's none, ip6gre's 16) are not.
        let mut req = Request::new(0, 0).ifinfomsg(1, 0, 0);
        req.attr_str(sys::IFLA_IFNAME, "gre0")
            .attr(sys::IFLA_ADDRESS, &[0; 4])
            .attr_u32(sys::IFLA_MASTER, 0);
        let link = parse_link(&req.buf[16..]).unwrap();
        assert_eq!(
            (link.up, link.mac, link.master, link.kind),
            (false, None, None, None)
        );
        assert!(parse_link(&[0; 8]).is_none());
    }

    #[test]
    fn parses_address_and_route_messages() {
        let mut req = Request::new(0, 0).ifaddrmsg(24, 5);
        req.attr(sys::IFA_ADDRESS, &[192, 0, 2, 9])
            .attr(sys::IFA_LOCAL, &[192, 0, 2, 1]);
        assert_eq!(
            parse_addr_v4(&req.buf[16..]),
            Some((5, Ipv4Addr::new(192, 0, 2, 1), 24))
        );

        let mut rt = vec![sys::AF_INET, 24, 0, 0, 254, 2, 0, 1, 0, 0, 0, 0];
        let mut req = Request::new(0, 0);
        req.attr(sys::RTA_DST, &[198, 51, 100, 0])
            .attr_u32(sys::RTA_OIF, 4)
            .attr(sys::RTA_GATEWAY, &[192, 0, 2, 254])
            .attr_u32(sys::RTA_PRIORITY, 100)
            .attr_u32(sys::RTA_TABLE, 254);
        rt.extend_from_slice(&req.buf[16..]);
        assert_eq!(
            parse_route_v4(&rt),
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
        let mut hop_attrs = Request::new(0, 0);
        hop_attrs.attr(sys::RTA_GATEWAY, &[203, 0, 113, 1]);
        let hop_attrs = &hop_attrs.buf[16..];
        let mut hop = Vec::new();
        hop.extend_from_slice(&((8 + hop_attrs.len()) as u16).to_ne_bytes());
        hop.extend_from_slice(&[0, 0]);
        hop.extend_from_slice(&9u32.to_ne_bytes());
        hop.extend_from_slice(hop_attrs);
        let mut rt = vec![sys::AF_INET, 0, 0, 0, 254, 2, 0, 1, 0, 0, 0, 0];
        let mut req = Request::new(0, 0);
        req.attr(sys::RTA_MULTIPATH, &hop);
        rt.extend_from_slice(&req.buf[16..]);
        let r = parse_route_v4(&rt).unwrap();
        assert_eq!((r.dst, r.prefix), (Ipv4Addr::UNSPECIFIED, 0));
        assert_eq!(
            (r.oif, r.gateway),
            (Some(9), Some(Ipv4Addr::new(203, 0, 113, 1)))
        );

        assert!(parse_route_v4(&[10, 0, 0, 0, 254, 0, 0, 1, 0, 0, 0, 0]).is_none());
    }

    #[test]
    fn parses_acks_errors_and_extended_acks() {
        // Plain ack.
        let mut p = 0i32.to_ne_bytes().to_vec();
        p.extend_from_slice(&hdr(sys::RTM_NEWLINK, 5, 1, &[])[..16]);
        assert_eq!(parse_status(sys::NLMSG_ERROR, 0, &p).unwrap(), (0, None));

        // Capped error with an extended ack message.
        let mut p = (-22i32).to_ne_bytes().to_vec();
        p.extend_from_slice(&hdr(sys::RTM_NEWLINK, 5, 1, &[0; 40])[..16]);
        let mut tlv = Request::new(0, 0);
        tlv.attr_str(sys::NLMSGERR_ATTR_MSG, "Unknown device type");
        p.extend_from_slice(&tlv.buf[16..]);
        let flags = sys::NLM_F_CAPPED | sys::NLM_F_ACK_TLVS;
        assert_eq!(
            parse_status(sys::NLMSG_ERROR, flags, &p).unwrap(),
            (-22, Some("Unknown device type".into()))
        );

        // Uncapped: the echoed request is skipped.
        let mut p = (-17i32).to_ne_bytes().to_vec();
        p.extend_from_slice(&hdr(sys::RTM_NEWLINK, 5, 1, &[0; 8]));
        p.extend_from_slice(&tlv.buf[16..]);
        assert_eq!(
            parse_status(sys::NLMSG_ERROR, sys::NLM_F_ACK_TLVS, &p).unwrap(),
            (-17, Some("Unknown device type".into()))
        );

        // DONE with and without a status.
        assert_eq!(parse_status(sys::NLMSG_DONE, 0, &[]).unwrap(), (0, None));
        assert_eq!(
            parse_status(sys::NLMSG_DONE, 0, &(-16i32).to_ne_bytes()).unwrap(),
            (-16, None)
        );
        assert!(parse_status(sys::NLMSG_ERROR, 0, &[0, 0]).is_err());
    }

    #[test]
    fn splits_datagrams() {
        let mut d = hdr(sys::RTM_NEWLINK, sys::NLM_F_MULTI, 3, &[1, 2, 3]);
        d.resize(align4(d.len()), 0);
        d.extend_from_slice(&hdr(
            sys::NLMSG_DONE,
            sys::NLM_F_MULTI,
            3,
            &0i32.to_ne_bytes(),
        ));
        let msgs = split_messages(&d).unwrap();
        assert_eq!(msgs.len(), 2);
        assert_eq!(
            msgs[0],
            RawMsg {
                ty: sys::RTM_NEWLINK,
                flags: sys::NLM_F_MULTI,
                seq: 3,
                payload: &[1, 2, 3],
            }
        );
        assert_eq!(msgs[1].ty, sys::NLMSG_DONE);
        let mut bad = hdr(sys::RTM_NEWLINK, 0, 1, &[]);
        bad[0] = 200;
        assert!(split_messages(&bad).is_err());
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
        use std::fs::File;
        use std::process::Command;

        /// A named network namespace (`ip netns add`), deleted on drop.
        struct Netns(String);

        impl Netns {
            fn new(name: String) -> Self {
                let _ = Command::new("ip")
                    .args(["netns", "del", &name])
                    .stderr(std::process::Stdio::null())
                    .status();
                let st = Command::new("ip")
                    .args(["netns", "add", &name])
                    .status()
                    .expect("run ip netns add");
                assert!(st.success(), "ip netns add {name} failed");
                Netns(name)
            }

            fn ip(&self, args: &[&str]) {
                let st = Command::new("ip")
                    .args(["netns", "exec", &self.0, "ip"])
                    .args(args)
                    .status()
                    .expect("run ip netns exec");
                assert!(st.success(), "ip {args:?} failed in {}", self.0);
            }

            /// Run `f` on a thread that has entered the namespace.
            fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
                let path = format!("/run/netns/{}", self.0);
                let handle = std::thread::spawn(move || {
                    let ns = File::open(&path).expect("open netns");
                    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                    f()
                });
                match handle.join() {
                    Ok(v) => v,
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
        }

        impl Drop for Netns {
            fn drop(&mut self) {
                let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
            }
        }

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

                let a = Ipv4Addr::new(192, 0, 2, 1);
                nl.add_address_v4("lume-br0", a, 24).unwrap();
                nl.add_address_v4("lume-br0", a, 24).unwrap(); // idempotent
                assert_eq!(nl.addresses_v4("lume-br0").unwrap(), [(a, 24)]);
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
