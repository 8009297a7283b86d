//! Bridged mode on a plain interface (not a Linux bridge): how the VM's NIC
//! outlives its parent interface.
//!
//! QEMU gets a plain tap that the supervisor owns for the whole run. The
//! kernel joins that tap to the parent through a macvlan carrying the guest's
//! MAC (bridge mode, as lume's macvtap was) and two tc `ingress` filters that
//! redirect every frame (`u32 match u32 0 0` + `mirred egress redirect`):
//!
//! ```text
//!   QEMU ⇄ tap ──ingress: redirect──▶ macvlan egress ──▶ parent ──▶ LAN
//!          tap egress ◀──redirect: ingress── macvlan ◀── parent ◀── LAN
//! ```
//!
//! Nothing is relayed in user space. When the parent disappears (a USB NIC
//! unplugged) the kernel deletes the macvlan with it while the tap, QEMU and
//! the guest's NIC stay; [`Reattacher`] waits for a link of the parent's name
//! (RTM_NEWLINK events, checked every [`PERIOD`] anyway) and builds the
//! macvlan and its filter again with the same MAC, so the guest keeps its
//! lease and the LAN's neighbour caches stay right; the tap's redirect is
//! swapped for one to the new macvlan without a gap ([`swap_redirect`]).
//!
//! `matchall` would be the natural classifier, but not every kernel has it
//! (this one lacks `cls_matchall`): a `u32` filter with one key of mask 0
//! matches every frame too and is built into far more kernels.
//!
//! The tc messages are built and serialized by `netlink-packet-route` and sent
//! over lume's own rtnetlink socket ([`Netlink::execute_serialized`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL, NetlinkSerializable};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::tc::{
    TcAction, TcActionAttribute, TcActionMirrorOption, TcActionOption, TcActionType, TcAttribute,
    TcFilterU32Option, TcHandle, TcHeader, TcMessage, TcMirror, TcMirrorActionType, TcOption,
    TcU32Key, TcU32Selector, TcU32SelectorFlags,
};

use super::kernel::events::Events;
use super::kernel::netlink::{Netlink, NetlinkError};
use crate::util::time::timestamp;

/// The longest a returned parent goes unnoticed when its event is missed.
pub const PERIOD: Duration = Duration::from_millis(250);

/// `ETH_P_ALL`: the filters see every protocol.
const ETH_P_ALL: u16 = 0x0003;
/// On the tap: frames the guest addresses to its own MAC (checked first,
/// after a network policy's filter at priority 1, see
/// [`super::policy::tc`], which passes a frame on with "no verdict").
const OWN_MAC_PRIORITY: u16 = 10;
/// The redirect on each ingress qdisc.
const REDIRECT_PRIORITY: u16 = 20;
/// The tap's redirect alternates between this and [`REDIRECT_PRIORITY`] at
/// each re-attach ([`swap_redirect`]).
const REDIRECT_PRIORITY_ALT: u16 = 21;

/// Why the macvlan and its filters could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(
        "Interface {0} is missing: the VM waits for it and is re-attached as soon as it is back"
    )]
    ParentGone(String),
    #[error(transparent)]
    Bridge(#[from] super::interfaces::BridgeError),
    #[error(transparent)]
    Interfaces(#[from] super::interfaces::InterfaceError),
    #[error(
        "Cannot join the VM's tap to {parent} with tc: bridged mode on a plain interface needs the kernel's ingress qdisc, u32 classifier and mirred action (CONFIG_NET_SCH_INGRESS, CONFIG_NET_CLS_U32, CONFIG_NET_ACT_MIRRED; modprobe sch_ingress cls_u32 act_mirred), or put {parent} in a Linux bridge and use --network bridged:<bridge>"
    )]
    Tc {
        parent: String,
        #[source]
        source: NetlinkError,
    },
}

/// The pieces of one bridged attachment through a tap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uplink {
    /// The tap QEMU holds.
    pub tap: String,
    /// The macvlan on the parent, re-created under this name.
    pub macvlan: String,
    /// The parent interface, by name (a returning interface has a new index).
    pub parent: String,
    /// The guest's MAC, which the macvlan carries.
    pub mac: [u8; 6],
}

/// Where an attachment stands now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// The macvlan exists on the parent: frames flow.
    Attached,
    /// No interface has the parent's name: the VM waits for it.
    ParentGone,
    /// The parent exists but the macvlan does not (yet): being re-attached.
    Detached,
}

impl Status {
    /// The word `lume get` shows (`network.attachment`).
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Attached => "attached",
            Status::ParentGone => "waiting-for-parent",
            Status::Detached => "reattaching",
        }
    }
}

/// Where the macvlan `macvlan` on `parent` stands, from any process in the
/// same network namespace.
pub fn status(nl: &mut Netlink, parent: &str, macvlan: &str) -> Result<Status, NetlinkError> {
    let Some(p) = nl.link_info(parent)? else {
        return Ok(Status::ParentGone);
    };
    Ok(match nl.link_info(macvlan)? {
        Some(m) if m.link == Some(p.index) => Status::Attached,
        _ => Status::Detached,
    })
}

/// Switches IPv6 off on one of lume's own devices, so the host neither
/// sends router solicitations, DAD or MLD frames through it (into the guest
/// on the tap, onto the LAN with the guest's MAC on the macvlan) nor
/// configures addresses from what arrives. A kernel without IPv6 has nothing
/// to switch off.
fn ipv6_off(name: &str) {
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
}

/// An ingress qdisc on `index`.
fn ingress_qdisc(index: u32) -> RouteNetlinkMessage {
    let header = TcHeader {
        index: index as i32,
        handle: TcHandle {
            major: 0xffff,
            minor: 0,
        },
        parent: TcHandle::INGRESS,
        ..Default::default()
    };
    RouteNetlinkMessage::NewQueueDiscipline(TcMessage::from_parts(
        header,
        vec![TcAttribute::Kind("ingress".into())],
    ))
}

/// The same qdisc, to delete (with every filter on it).
fn delete_ingress_qdisc(index: u32) -> RouteNetlinkMessage {
    let RouteNetlinkMessage::NewQueueDiscipline(m) = ingress_qdisc(index) else {
        unreachable!("ingress_qdisc builds a NewQueueDiscipline");
    };
    let (header, _) = m.into_parts();
    RouteNetlinkMessage::DelQueueDiscipline(TcMessage::from_parts(header, vec![]))
}

/// tcm_info of a filter: priority in the upper half, the protocol (network
/// order) in the lower.
fn filter_info(priority: u16) -> u32 {
    (u32::from(priority) << 16) | u32::from(ETH_P_ALL.to_be())
}

/// A filter on the tap's ingress, ahead of the redirect, that takes the
/// frames the guest sends to its own MAC out of it (`u32 match ether dst
/// MAC`, no action: they go to the host's stack on the tap, which has no
/// address and drops them as someone else's). In bridge mode the macvlan
/// would hand such a frame straight back to itself and so to the tap, where
/// it would look like a frame from the LAN: a guest could then forge the
/// DHCP ACK lume learns its address from.
fn own_mac_filter(tap: u32, mac: [u8; 6]) -> RouteNetlinkMessage {
    let header = TcHeader {
        index: tap as i32,
        parent: TcHandle {
            major: 0xffff,
            minor: TcHandle::MIN_INGRESS,
        },
        info: filter_info(OWN_MAC_PRIORITY),
        ..Default::default()
    };
    // Offsets are from the network header: the destination MAC is the
    // first 6 of the 14 bytes before it.
    let mut first = TcU32Key::default();
    first.mask = 0xffff_ffff;
    first.val = u32::from_be_bytes([mac[0], mac[1], mac[2], mac[3]]);
    first.off = -14;
    let mut rest = TcU32Key::default();
    rest.mask = 0xffff_0000;
    rest.val = u32::from_be_bytes([mac[4], mac[5], 0, 0]);
    rest.off = -10;
    let mut selector = TcU32Selector::default();
    selector.flags = TcU32SelectorFlags::Terminal;
    selector.nkeys = 2;
    selector.keys = vec![first, rest];
    RouteNetlinkMessage::NewTrafficFilter(TcMessage::from_parts(
        header,
        vec![
            TcAttribute::Kind("u32".into()),
            TcAttribute::Options(vec![TcOption::U32(TcFilterU32Option::Selector(selector))]),
        ],
    ))
}

/// A filter on the ingress qdisc of `from` that redirects every frame to the
/// egress of `to` (`tc filter add dev FROM ingress prio 1 protocol all u32
/// match u32 0 0 action mirred egress redirect dev TO`).
fn redirect_filter(from: u32, to: u32) -> RouteNetlinkMessage {
    redirect_filter_at(from, to, REDIRECT_PRIORITY)
}

/// The same at `priority`.
fn redirect_filter_at(from: u32, to: u32, priority: u16) -> RouteNetlinkMessage {
    let header = TcHeader {
        index: from as i32,
        parent: TcHandle {
            major: 0xffff,
            minor: TcHandle::MIN_INGRESS,
        },
        info: filter_info(priority),
        ..Default::default()
    };

    let mut selector = TcU32Selector::default();
    selector.flags = TcU32SelectorFlags::Terminal;
    selector.nkeys = 1;
    let key = TcU32Key::default(); // mask 0, value 0 at offset 0: every frame
    selector.keys = vec![key];

    let mut mirred = TcMirror::default();
    mirred.generic.action = TcActionType::Stolen;
    mirred.eaction = TcMirrorActionType::EgressRedir;
    mirred.ifindex = to;
    let mut action = TcAction::default();
    action.attributes = vec![
        TcActionAttribute::Kind("mirred".into()),
        TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(
            mirred,
        ))]),
    ];

    RouteNetlinkMessage::NewTrafficFilter(TcMessage::from_parts(
        header,
        vec![
            TcAttribute::Kind("u32".into()),
            TcAttribute::Options(vec![
                TcOption::U32(TcFilterU32Option::Selector(selector)),
                TcOption::U32(TcFilterU32Option::Action(vec![action])),
            ]),
        ],
    ))
}

/// Deletes the filters at `priority` on the ingress qdisc of `dev`.
fn delete_filter(dev: u32, priority: u16) -> RouteNetlinkMessage {
    let header = TcHeader {
        index: dev as i32,
        parent: TcHandle {
            major: 0xffff,
            minor: TcHandle::MIN_INGRESS,
        },
        info: filter_info(priority),
        ..Default::default()
    };
    RouteNetlinkMessage::DelTrafficFilter(TcMessage::from_parts(header, vec![]))
}

/// Points the tap's redirect at a new macvlan while the guest runs, with
/// no moment in which the guest's frames reach the host's own stack on the
/// tap (where a frame to the broadcast MAC carrying a unicast IPv4 packet
/// is delivered to any local address, or routed): the tap's qdisc and its
/// own-MAC filter stay; the new redirect is added at the priority not in
/// use, then the old one is deleted. The old one points at the macvlan that
/// went with the parent (or that [`Uplink::connect`] deleted), so until it
/// is gone it drops what reaches it. `current`: the priority in use, updated.
fn swap_redirect(
    nl: &mut Netlink,
    dev: &str,
    tap: u32,
    to_name: &str,
    to: u32,
    current: &mut u16,
) -> Result<(), NetlinkError> {
    let next = if *current == REDIRECT_PRIORITY {
        REDIRECT_PRIORITY_ALT
    } else {
        REDIRECT_PRIORITY
    };
    // A leftover of an interrupted swap there: the current (old) filter
    // still takes every frame while it goes.
    let _ = send(
        nl,
        &format!("remove a leftover redirect of {dev}"),
        &delete_filter(tap, next),
        0,
    );
    send(
        nl,
        &format!("redirect the frames arriving on {dev} to {to_name}"),
        &redirect_filter_at(tap, to, next),
        NLM_F_CREATE | NLM_F_EXCL,
    )?;
    send(
        nl,
        &format!("remove the old redirect of {dev}"),
        &delete_filter(tap, *current),
        0,
    )?;
    *current = next;
    Ok(())
}

/// Sends one message serialized by netlink-packet-route.
fn send(
    nl: &mut Netlink,
    op: &str,
    msg: &RouteNetlinkMessage,
    flags: u16,
) -> Result<(), NetlinkError> {
    let mut payload = vec![0; msg.buffer_len()];
    msg.serialize(&mut payload);
    nl.execute_serialized(op, msg.message_type(), flags, &payload)
}

/// Replaces whatever ingress qdisc `dev` has with one whose filters are
/// `first` (if any) and a redirect of everything to the egress of `to`.
fn redirect(
    nl: &mut Netlink,
    dev: &str,
    from: u32,
    first: Option<RouteNetlinkMessage>,
    to_name: &str,
    to: u32,
) -> Result<(), NetlinkError> {
    if first.is_some() {
        // The tap: its leftover filters (pointing at the macvlan that went
        // with the parent) are replaced, its qdisc is kept, and with it a
        // network policy's filter at priority 1 (`super::policy::tc`),
        // which therefore never leaves the guest's frames unfiltered.
        for priority in [OWN_MAC_PRIORITY, REDIRECT_PRIORITY, REDIRECT_PRIORITY_ALT] {
            let _ = send(
                nl,
                &format!("remove a leftover filter of {dev}"),
                &delete_filter(from, priority),
                0,
            );
        }
        match send(
            nl,
            &format!("add an ingress qdisc to {dev}"),
            &ingress_qdisc(from),
            NLM_F_CREATE | NLM_F_EXCL,
        ) {
            Err(e) if e.errno() == Some(nix::errno::Errno::EEXIST) => {}
            other => other?,
        }
    } else {
        // A leftover qdisc (the macvlan's, from an earlier attempt) is
        // replaced; none being there is the usual case.
        let _ = send(
            nl,
            &format!("remove the ingress qdisc of {dev}"),
            &delete_ingress_qdisc(from),
            0,
        );
        send(
            nl,
            &format!("add an ingress qdisc to {dev}"),
            &ingress_qdisc(from),
            NLM_F_CREATE | NLM_F_EXCL,
        )?;
    }
    if let Some(first) = first {
        send(
            nl,
            &format!("keep {dev}'s frames to itself from coming back"),
            &first,
            NLM_F_CREATE | NLM_F_EXCL,
        )?;
    }
    send(
        nl,
        &format!("redirect the frames arriving on {dev} to {to_name}"),
        &redirect_filter(from, to),
        NLM_F_CREATE | NLM_F_EXCL,
    )
}

impl Uplink {
    /// Prepares the tap once, before anything flows: IPv6 off, the parent's
    /// MTU, up.
    pub fn prepare_tap(&self, nl: &mut Netlink) -> Result<(), UplinkError> {
        ipv6_off(&self.tap);
        if let Some(mtu) = nl.link_info(&self.parent)?.and_then(|p| p.mtu) {
            nl.set_mtu(&self.tap, mtu)?;
        }
        nl.set_up(&self.tap)?;
        Ok(())
    }

    /// (Re)creates the macvlan on the parent and both redirections. Safe to
    /// repeat: a macvlan of that name left from an earlier attempt is
    /// replaced, and one that failed half-way is deleted again, so that
    /// [`status`] never calls a macvlan without its filters attached.
    pub fn connect(&self, nl: &mut Netlink) -> Result<(), UplinkError> {
        let result = self.try_connect(nl, None);
        if result.is_err() {
            let _ = nl.delete_link(&self.macvlan);
        }
        result
    }

    /// [`Self::connect`] while the guest runs: the tap keeps its qdisc and
    /// own-MAC filter, and its redirect is swapped ([`swap_redirect`]);
    /// `current`: the priority of the tap's redirect, updated. A tap without
    /// them (a first connection that failed half-way) gets them built anew.
    pub fn reconnect(&self, nl: &mut Netlink, current: &mut u16) -> Result<(), UplinkError> {
        let result = self.try_connect(nl, Some(current));
        if result.is_err() {
            let _ = nl.delete_link(&self.macvlan);
        }
        result
    }

    fn try_connect(&self, nl: &mut Netlink, swap: Option<&mut u16>) -> Result<(), UplinkError> {
        let parent = nl
            .link_info(&self.parent)?
            .ok_or_else(|| UplinkError::ParentGone(self.parent.clone()))?;
        nl.delete_link(&self.macvlan)?;
        let tap = nl
            .link_index(&self.tap)?
            .ok_or_else(|| NetlinkError::NotFound {
                op: format!("connect {} to {}", self.tap, self.parent),
                name: self.tap.clone(),
            })?;
        // A parent that returns with another MTU: the tap follows it.
        if let Some(mtu) = parent.mtu {
            nl.set_mtu(&self.tap, mtu)?;
        }
        let macvlan = nl.create_macvlan(&self.macvlan, &self.parent, self.mac)?;
        ipv6_off(&self.macvlan);
        // Every multicast group reaches the guest, which filters for itself
        // (IPv6 neighbour discovery, mDNS); the parent is told to accept them.
        nl.set_allmulti(&self.macvlan)?;
        let tc = |source| UplinkError::Tc {
            parent: self.parent.clone(),
            source,
        };
        redirect(nl, &self.macvlan, macvlan, None, &self.tap, tap).map_err(tc)?;
        let swapped = match swap {
            Some(current) => {
                swap_redirect(nl, &self.tap, tap, &self.macvlan, macvlan, current).is_ok() || {
                    *current = REDIRECT_PRIORITY;
                    false
                }
            }
            None => false,
        };
        if !swapped {
            let own = own_mac_filter(tap, self.mac);
            redirect(nl, &self.tap, tap, Some(own), &self.macvlan, macvlan).map_err(tc)?;
        }
        nl.set_up(&self.macvlan)?;
        Ok(())
    }

    pub fn status(&self, nl: &mut Netlink) -> Result<Status, NetlinkError> {
        status(nl, &self.parent, &self.macvlan)
    }
}

/// Appends a timestamped line to the VM's lume.log.
fn record(log: &Path, line: &str) {
    let stamped = format!("[{}] {line}\n", timestamp());
    let _ = crate::hypervisor::logcap::append(
        log,
        stamped.as_bytes(),
        crate::hypervisor::logcap::cap(),
    );
}

/// The thread that puts the macvlan back whenever the parent returns (or
/// someone deleted it). Dropping it stops the thread.
#[derive(Debug)]
pub struct Reattacher {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Reattacher {
    /// Watches `uplink`, logging to `log` (the VM's lume.log).
    pub fn start(uplink: Uplink, log: PathBuf) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || watch(&uplink, &log, &flag));
        Self {
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for Reattacher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn watch(uplink: &Uplink, log: &Path, stop: &AtomicBool) {
    let mut events = Events::links();
    let mut nl: Option<Netlink> = None;
    let mut last = Status::Attached;
    let mut gone_at: Option<Instant> = None;
    let mut last_error: Option<String> = None;
    // The priority of the tap's redirect: connect() put it there.
    let mut priority = REDIRECT_PRIORITY;
    while !stop.load(Ordering::SeqCst) {
        events.wait(PERIOD);
        if stop.load(Ordering::SeqCst) {
            break;
        }
        if nl.is_none() {
            nl = Netlink::open().ok();
        }
        let Some(sock) = nl.as_mut() else {
            continue;
        };
        let now = match uplink.status(sock) {
            Ok(s) => s,
            Err(_) => {
                nl = None; // a fresh socket next time
                continue;
            }
        };
        match now {
            Status::Attached => {}
            Status::ParentGone => {
                if last != Status::ParentGone {
                    gone_at = Some(Instant::now());
                    record(
                        log,
                        &format!(
                            "bridged: {} is gone (unplugged?); the VM keeps running and is re-attached when {} is back",
                            uplink.parent, uplink.parent
                        ),
                    );
                }
            }
            Status::Detached => {
                let started = Instant::now();
                // What returned under that name must be bridgeable, as the
                // interface was checked at start (not Wi-Fi, a tunnel, ...).
                let checked = super::interfaces::discover()
                    .map_err(UplinkError::from)
                    .and_then(|list| {
                        super::interfaces::check_bridgeable(&list, &uplink.parent)
                            .map(drop)
                            .map_err(UplinkError::from)
                    });
                match checked.and_then(|()| uplink.reconnect(sock, &mut priority)) {
                    Ok(()) => {
                        last_error = None;
                        record(
                            log,
                            &format!(
                                "bridged: re-attached to {} ({} ms after it was seen{})",
                                uplink.parent,
                                started.elapsed().as_millis(),
                                gone_at
                                    .take()
                                    .map(|t| format!(", {} s offline", t.elapsed().as_secs()))
                                    .unwrap_or_default()
                            ),
                        );
                        last = Status::Attached;
                        continue;
                    }
                    Err(e) => {
                        let text = crate::error_chain(&e);
                        if last_error.as_deref() != Some(text.as_str()) {
                            record(
                                log,
                                &format!(
                                    "bridged: cannot re-attach to {} yet (tried again every {} ms): {text}",
                                    uplink.parent,
                                    PERIOD.as_millis()
                                ),
                            );
                            last_error = Some(text);
                        }
                    }
                }
            }
        }
        last = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes match what `tc filter add dev X ingress prio 1 protocol all
    /// u32 match u32 0 0 action mirred egress redirect dev Y` sends, as far as
    /// the kernel reads them: the selector with one all-zero key, mirred's
    /// parameters with TC_ACT_STOLEN, TCA_EGRESS_REDIR and the target index.
    #[test]
    fn the_redirect_filter_has_the_fields_the_kernel_reads() {
        let msg = redirect_filter(7, 9);
        assert_eq!(msg.message_type(), 44); // RTM_NEWTFILTER
        let mut buf = vec![0; msg.buffer_len()];
        msg.serialize(&mut buf);
        // struct tcmsg: family, pad, ifindex, handle, parent, info.
        assert_eq!(i32::from_ne_bytes(buf[4..8].try_into().unwrap()), 7);
        assert_eq!(
            u32::from_ne_bytes(buf[12..16].try_into().unwrap()),
            0xffff_fff2
        );
        // Priority 20 (REDIRECT_PRIORITY) in the upper half, ETH_P_ALL below.
        assert_eq!(
            u32::from_ne_bytes(buf[16..20].try_into().unwrap()),
            0x0014_0300
        );
        // The kind, NUL-terminated.
        let kind = buf.windows(4).position(|w| w == b"u32\0");
        assert!(kind.is_some());
        // tc_mirred: tc_gen (index, capab, action, refcnt, bindcnt), eaction, ifindex.
        let mirred = buf.windows(7).position(|w| w == b"mirred\0").unwrap();
        let tail = &buf[mirred..];
        let stolen_redirect_to_9 = [
            4i32.to_ne_bytes(),
            0i32.to_ne_bytes(),
            0i32.to_ne_bytes(),
            1i32.to_ne_bytes(),
            9i32.to_ne_bytes(),
        ]
        .concat();
        assert!(
            tail.windows(stolen_redirect_to_9.len())
                .any(|w| w == stolen_redirect_to_9.as_slice()),
            "{tail:?}"
        );
    }

    #[test]
    fn the_ingress_qdisc_is_ffff_under_the_ingress_parent() {
        let msg = ingress_qdisc(3);
        assert_eq!(msg.message_type(), 36); // RTM_NEWQDISC
        let mut buf = vec![0; msg.buffer_len()];
        msg.serialize(&mut buf);
        assert_eq!(
            u32::from_ne_bytes(buf[8..12].try_into().unwrap()),
            0xffff_0000
        );
        assert_eq!(
            u32::from_ne_bytes(buf[12..16].try_into().unwrap()),
            0xffff_fff1
        );
        assert_eq!(delete_ingress_qdisc(3).message_type(), 37); // RTM_DELQDISC
    }

    use crate::util::testing::TestNetns as Netns;

    /// The real kernel takes the messages: both redirections exist, the
    /// devices are prepared, the parent's removal and return are seen, and a
    /// second `connect` points the tap at the new macvlan.
    #[test]
    fn connect_builds_the_redirections_and_again_after_the_parent_returns() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping: needs root for ip netns");
            return;
        }
        let ns = Netns::new(format!("lume-up-{}", std::process::id()));
        ns.sh("ip link add lume-p0 mtu 1400 type veth peer name lume-p1 && ip link set lume-p0 up");
        let uplink = Uplink {
            tap: "lume-t0".into(),
            macvlan: "lume-mv0".into(),
            parent: "lume-p0".into(),
            mac: [0x02, 0, 0, 0x12, 0x34, 0x56],
        };
        let u = uplink.clone();
        // The tap lives as long as this descriptor, held across the checks.
        let tap = ns.run(move || {
            let tap = crate::network::kernel::tap::Tap::create(&u.tap).unwrap();
            let mut nl = Netlink::open().unwrap();
            u.prepare_tap(&mut nl).unwrap();
            u.connect(&mut nl).unwrap();
            assert_eq!(u.status(&mut nl).unwrap(), Status::Attached);
            tap
        });
        let filters =
            ns.sh("tc filter show dev lume-t0 ingress; tc filter show dev lume-mv0 ingress");
        assert!(
            filters.contains("Redirect to device lume-mv0")
                && filters.contains("Redirect to device lume-t0"),
            "{filters}"
        );
        // The guest's frames to its own MAC stay out of the redirect.
        let tap_filters = ns.sh("tc filter show dev lume-t0 ingress");
        assert!(
            tap_filters.contains("match 02000012/ffffffff at -14")
                && tap_filters.contains("match 34560000/ffff0000 at -10"),
            "{tap_filters}"
        );
        let links = ns.sh("ip -d link show lume-mv0; ip link show lume-t0");
        assert!(links.contains("macvlan mode bridge"), "{links}");
        assert!(links.contains("02:00:00:12:34:56"), "{links}");
        assert!(links.contains("ALLMULTI"), "{links}");
        assert_eq!(links.matches("mtu 1400").count(), 2, "{links}");
        if std::path::Path::new("/proc/sys/net/ipv6").exists() {
            let off = ns.sh("cat /proc/sys/net/ipv6/conf/lume-t0/disable_ipv6 /proc/sys/net/ipv6/conf/lume-mv0/disable_ipv6");
            assert_eq!(off, "1\n1\n");
        }

        // Unplugged: the macvlan goes with it, the tap stays.
        ns.sh("ip link del lume-p0");
        let u = uplink.clone();
        ns.run(move || {
            let mut nl = Netlink::open().unwrap();
            assert_eq!(u.status(&mut nl).unwrap(), Status::ParentGone);
            assert!(matches!(
                u.connect(&mut nl),
                Err(UplinkError::ParentGone(_))
            ));
        });
        assert!(ns.sh("ip link show lume-t0").contains("lume-t0"));

        // The guest sends while its parent is gone: the tap's qdisc counts
        // the frames (and the stale redirect drops them).
        // A virtio-net header (the tap has IFF_VNET_HDR, as QEMU uses it), then the frame.
        let frame = [
            &[0u8; 10][..],
            &[0xff; 6],
            &uplink.mac,
            &[0x08, 0x00],
            &[0; 46],
        ]
        .concat();
        for _ in 0..5 {
            nix::unistd::write(&tap.fd, &frame).unwrap();
        }
        let sent = |ns: &Netns| -> u64 {
            let out = ns.sh("tc -s qdisc show dev lume-t0 ingress");
            let words: Vec<&str> = out.split_whitespace().collect();
            let at = words.iter().position(|w| *w == "pkt").unwrap();
            words[at - 1].parse().unwrap()
        };
        assert!(sent(&ns) >= 5);

        // Back, with another MTU: connected again as the watcher does it
        // while the guest runs, the tap follows.
        ns.sh("ip link add lume-p0 mtu 1300 type veth peer name lume-p1 && ip link set lume-p0 up");
        let u = uplink.clone();
        ns.run(move || {
            let mut nl = Netlink::open().unwrap();
            assert_eq!(u.status(&mut nl).unwrap(), Status::Detached);
            let mut priority = REDIRECT_PRIORITY;
            u.reconnect(&mut nl, &mut priority).unwrap();
            assert_eq!(u.status(&mut nl).unwrap(), Status::Attached);
            // Repeating is harmless, and so is a first connect again.
            u.reconnect(&mut nl, &mut priority).unwrap();
            u.reconnect(&mut nl, &mut priority).unwrap();
        });
        // The tap's qdisc was never taken away (its count goes on): at no
        // moment did the guest's frames reach the host's stack on the tap.
        assert!(sent(&ns) >= 5, "the tap's ingress qdisc was rebuilt");
        let tap_filters = ns.sh("tc filter show dev lume-t0 ingress");
        assert!(
            tap_filters.contains("match 02000012/ffffffff at -14"),
            "{tap_filters}"
        );
        assert_eq!(
            tap_filters.matches("Redirect to device lume-mv0").count(),
            1,
            "{tap_filters}"
        );
        assert!(!tap_filters.contains("*"), "a stale target: {tap_filters}");
        let u = uplink.clone();
        ns.run(move || {
            let mut nl = Netlink::open().unwrap();
            u.connect(&mut nl).unwrap();
            assert_eq!(u.status(&mut nl).unwrap(), Status::Attached);
        });
        let filters = ns.sh("tc filter show dev lume-t0 ingress");
        assert_eq!(
            filters.matches("Redirect to device lume-mv0").count(),
            1,
            "{filters}"
        );
        assert!(!filters.contains("*"), "a stale target: {filters}");
        assert!(ns.sh("ip link show lume-t0").contains("mtu 1300"));
        drop(tap);
    }
}
