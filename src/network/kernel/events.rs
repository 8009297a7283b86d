//! Kernel change notifications the self-healing watcher waits on: rtnetlink
//! link, address, route and forwarding (netconf) events of both families,
//! and nftables ruleset events
//! (NFNLGRP_NFTABLES). The content does not matter — any event means "look
//! again" — so messages are only drained.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, socket,
};

const RTMGRP_LINK: u32 = 0x1;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV4_ROUTE: u32 = 0x40;
/// RTNLGRP_IPV4_NETCONF is group 24: sent when `ip_forward` is written.
const RTMGRP_IPV4_NETCONF: u32 = 1 << (24 - 1);
const RTMGRP_IPV6_IFADDR: u32 = 0x100;
const RTMGRP_IPV6_ROUTE: u32 = 0x400;
/// RTNLGRP_IPV6_NETCONF is group 25: sent when IPv6 `forwarding` is written.
const RTMGRP_IPV6_NETCONF: u32 = 1 << (25 - 1);
/// NFNLGRP_NFTABLES is group 7: bit 6 of the legacy group mask.
const NFNLGRP_NFTABLES_MASK: u32 = 1 << (7 - 1);

/// Subscriptions to link, address, route, forwarding and nftables events.
pub struct Events {
    /// (socket, whether it carries nftables events)
    sockets: Vec<(OwnedFd, bool)>,
    buf: Vec<u8>,
}

/// What woke a wait.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Woken {
    /// A link, address, route or IPv4 configuration event.
    pub net: bool,
    /// An nftables ruleset event.
    pub nft: bool,
}

fn subscribe(protocol: SockProtocol, groups: u32) -> nix::Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        protocol,
    )?;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, groups))?;
    Ok(fd)
}

impl Events {
    /// Subscribes to what it can; a missing subscription only means that
    /// change is caught by the periodic check instead.
    pub fn open() -> Self {
        let sockets = [
            subscribe(
                SockProtocol::NetlinkRoute,
                RTMGRP_LINK
                    | RTMGRP_IPV4_IFADDR
                    | RTMGRP_IPV4_ROUTE
                    | RTMGRP_IPV4_NETCONF
                    | RTMGRP_IPV6_IFADDR
                    | RTMGRP_IPV6_ROUTE
                    | RTMGRP_IPV6_NETCONF,
            )
            .map(|s| (s, false)),
            subscribe(SockProtocol::NetlinkNetFilter, NFNLGRP_NFTABLES_MASK).map(|s| (s, true)),
        ]
        .into_iter()
        .filter_map(Result::ok)
        .collect();
        Self {
            sockets,
            buf: vec![0; 64 * 1024],
        }
    }

    /// Link events only (a link added, changed or deleted).
    pub fn links() -> Self {
        Self {
            sockets: subscribe(SockProtocol::NetlinkRoute, RTMGRP_LINK)
                .map(|s| vec![(s, false)])
                .unwrap_or_default(),
            buf: vec![0; 64 * 1024],
        }
    }

    /// How many event sources are subscribed.
    pub fn sources(&self) -> usize {
        self.sockets.len()
    }

    /// Waits up to `timeout` for any event and says which kinds came. All
    /// pending messages are drained.
    pub fn wait(&mut self, timeout: Duration) -> Woken {
        let mut fds: Vec<PollFd> = self
            .sockets
            .iter()
            .map(|(s, _)| PollFd::new(s.as_fd(), PollFlags::POLLIN))
            .collect();
        let ms = PollTimeout::from(timeout.as_millis().min(60_000) as u16);
        let ready: Vec<bool> = match poll(&mut fds, ms) {
            Ok(n) if n > 0 => fds
                .iter()
                .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
                .collect(),
            _ => vec![false; fds.len()],
        };
        drop(fds);
        let mut woken = Woken::default();
        for ((s, is_nft), ready) in self.sockets.iter().zip(ready) {
            if !ready {
                continue;
            }
            // Drain; ENOBUFS (overrun) also just means "something changed".
            while recv(s.as_raw_fd(), &mut self.buf, MsgFlags::MSG_DONTWAIT).is_ok_and(|n| n > 0) {}
            if *is_nft {
                woken.nft = true;
            } else {
                woken.net = true;
            }
        }
        woken
    }
}
