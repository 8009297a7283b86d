//! A packet socket (`AF_PACKET`/`SOCK_RAW`, protocol `ETH_P_ALL`) bound to
//! one interface, behind a classic BPF filter: it sees the frames the
//! interface receives and, as `ETH_P_ALL` sockets do, the ones it sends.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Instant;

use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{AddressFamily, LinkAddr, SockFlag, SockProtocol, SockType};

/// Why a packet socket could not be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    #[error("Invalid network interface name {0:?}")]
    InvalidInterfaceName(String),
    #[error("No network interface named {0}")]
    NoSuchInterface(String),
    /// `source` carries the errno (EPERM/EACCES: CAP_NET_RAW is missing).
    #[error("Could not open a packet socket on {ifname}: {source}")]
    Open { ifname: String, source: io::Error },
    #[error("Could not read from the packet socket on {ifname}: {source}")]
    Receive { ifname: String, source: io::Error },
}

/// A classic BPF instruction without jumps.
pub fn bpf_stmt(code: u32, k: u32) -> libc::sock_filter {
    bpf_jump(code, k, 0, 0)
}

/// A classic BPF jump: `jt` instructions skipped when true, `jf` when false.
pub fn bpf_jump(code: u32, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    }
}

/// A packet socket bound to one interface.
#[derive(Debug)]
pub struct PacketSocket {
    fd: OwnedFd,
    ifname: String,
}

impl PacketSocket {
    /// Opens a non-blocking packet socket on interface `ifname` (by
    /// ifindex) that passes only what `filter` accepts. Needs CAP_NET_RAW.
    pub fn open(ifname: &str, filter: &mut [libc::sock_filter]) -> Result<Self, PacketError> {
        if ifname.is_empty() || ifname.len() >= libc::IFNAMSIZ || ifname.contains(['/', '\0']) {
            return Err(PacketError::InvalidInterfaceName(ifname.to_owned()));
        }
        let ifindex = nix::net::if_::if_nametoindex(ifname)
            .map_err(|_| PacketError::NoSuchInterface(ifname.to_owned()))?;
        let open_err = |source: io::Error| PacketError::Open {
            ifname: ifname.to_owned(),
            source,
        };

        let proto = (libc::ETH_P_ALL as u16).to_be();
        // Non-blocking: a frame poll(2) announced is read without waiting.
        let fd = nix::sys::socket::socket(
            AddressFamily::Packet,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            SockProtocol::EthAll,
        )
        .map_err(|e| open_err(e.into()))?;

        // Filter before binding so that as little unrelated traffic as possible
        // is ever queued on the socket (nix has no SO_ATTACH_FILTER option).
        let prog = libc::sock_fprog {
            len: filter.len() as u16,
            filter: filter.as_mut_ptr(),
        };
        // SAFETY: `prog` points at `filter`, which lives until after the call;
        // the kernel copies the program.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ATTACH_FILTER,
                std::ptr::from_ref(&prog).cast(),
                size_of::<libc::sock_fprog>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(open_err(io::Error::last_os_error()));
        }

        // nix (0.32) reads a sockaddr_ll but cannot build one: bind(2) here.
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: `sll` is a properly initialised sockaddr_ll and the length
        // passed is its size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::from_ref(&sll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            let err = io::Error::last_os_error();
            return Err(match err.raw_os_error() {
                Some(libc::ENODEV) => PacketError::NoSuchInterface(ifname.to_owned()),
                _ => open_err(err),
            });
        }

        Ok(Self {
            fd,
            ifname: ifname.to_owned(),
        })
    }

    /// The interface this socket is bound to.
    pub fn interface(&self) -> &str {
        &self.ifname
    }

    /// Waits until `deadline` (forever without one) for the next frame,
    /// read into `buf`: its length and whether the interface sent it
    /// (`PACKET_OUTGOING`); `Ok(None)` when the time ran out first.
    pub fn recv(
        &self,
        buf: &mut [u8],
        deadline: Option<Instant>,
    ) -> Result<Option<(usize, bool)>, PacketError> {
        loop {
            let wait = match deadline {
                None => PollTimeout::NONE,
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    // Round up so that a sub-millisecond remainder still waits.
                    let ms = left.as_nanos().div_ceil(1_000_000);
                    PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
                }
            };
            let mut pfd = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
            let n = match nix::poll::poll(&mut pfd, wait) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(self.receive_error(e.into())),
            };
            if n == 0 {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Ok(None);
                }
                continue;
            }
            match nix::sys::socket::recvfrom::<LinkAddr>(self.fd.as_raw_fd(), buf) {
                Ok((len, from)) => {
                    let outgoing = from.is_some_and(|f| f.pkttype() == libc::PACKET_OUTGOING);
                    return Ok(Some((len, outgoing)));
                }
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(self.receive_error(e.into())),
            }
        }
    }

    fn receive_error(&self, source: io::Error) -> PacketError {
        PacketError::Receive {
            ifname: self.ifname.clone(),
            source,
        }
    }
}
