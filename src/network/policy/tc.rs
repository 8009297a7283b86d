//! Attaching the policy program to a VM's tap: a tcx link where the kernel
//! has them (Linux 6.6+, [`super::tcx`]: nothing `tc` can remove), else an
//! `ingress` qdisc and one direct-action `cls_bpf` filter, sent over lume's
//! own rtnetlink socket (messages built by `netlink-packet-route`, as in
//! [`super::super::uplink`]). Either goes with the tap when the VM stops.

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NetlinkSerializable};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::tc::{
    TcAttribute, TcBpfFlags, TcFilterBpfOption, TcHandle, TcHeader, TcMessage, TcOption,
};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use super::Policy;
use super::bpf::{self, Context, LoadError};
use crate::network::kernel::netlink::{Netlink, NetlinkError};

/// The filter's priority on the tap's ingress.
const PRIORITY: u16 = 1;
/// `ETH_P_ALL`: the program sees every frame.
const ETH_P_ALL: u16 = 0x0003;

/// Why a policy could not be put in force.
#[derive(Debug, thiserror::Error)]
pub enum EnforceError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(
        "Cannot attach the network policy to {tap}: the kernel needs the ingress qdisc and the bpf classifier (CONFIG_NET_SCH_INGRESS, CONFIG_NET_CLS_BPF); the VM was not started"
    )]
    Attach {
        tap: String,
        #[source]
        source: NetlinkError,
    },
}

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

/// Whether `tap` carries lume's policy filter now: its ingress filters are
/// dumped and one must be the `bpf` filter named `lume_policy` in
/// direct-action mode. A missing tap is not in force.
pub fn in_force(nl: &mut Netlink, tap: &str) -> Result<bool, NetlinkError> {
    Ok(!installed(nl, tap)?.is_empty())
}

/// The kernel ids of lume's policy programs on `tap`: those named
/// `lume_policy` among its tcx programs, and the `bpf` filters named
/// `lume_policy` in direct-action mode; a missing tap has none.
pub fn installed(nl: &mut Netlink, tap: &str) -> Result<Vec<u32>, NetlinkError> {
    let Some(index) = nl.link_index(tap)? else {
        return Ok(Vec::new());
    };
    let mut ids = super::tcx::lume_programs(index).map_err(|errno| NetlinkError::Kernel {
        op: format!("list the tcx programs of {tap}"),
        errno,
        message: None,
    })?;
    ids.extend(classic_ids(nl, tap)?);
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// The kernel ids of the programs of lume's `cls_bpf` filters on `tap`
/// (named `lume_policy`, direct-action); a missing tap has none.
fn classic_ids(nl: &mut Netlink, tap: &str) -> Result<Vec<u32>, NetlinkError> {
    use netlink_packet_core::{Emitable, Parseable};
    let Some(index) = nl.link_index(tap)? else {
        return Ok(Vec::new());
    };
    let header = TcHeader {
        index: index as i32,
        parent: TcHandle {
            major: 0xffff,
            minor: TcHandle::MIN_INGRESS,
        },
        ..Default::default()
    };
    let msg = TcMessage::from_parts(header, vec![]);
    let mut payload = vec![0; msg.buffer_len()];
    msg.emit(&mut payload);
    const RTM_GETTFILTER: u16 = 46;
    const RTM_NEWTFILTER: u16 = 44;
    let replies = nl.dump_serialized(
        &format!("list the filters of {tap}"),
        RTM_GETTFILTER,
        RTM_NEWTFILTER,
        &payload,
    )?;
    Ok(replies
        .iter()
        .filter_map(|p| {
            let m = TcMessage::parse(p.as_slice()).ok()?;
            let bpf = m
                .attributes
                .iter()
                .any(|a| matches!(a, TcAttribute::Kind(k) if k == "bpf"));
            let opts = m.attributes.iter().find_map(|a| match a {
                TcAttribute::Options(o) => Some(o),
                _ => None,
            })?;
            let named = opts.iter().any(|x| {
                matches!(x, TcOption::Bpf(TcFilterBpfOption::ProgName(n)) if n.starts_with("lume_policy"))
            });
            let direct = opts.iter().any(|x| {
                matches!(x, TcOption::Bpf(TcFilterBpfOption::Flags(f)) if f.contains(TcBpfFlags::DirectAction))
            });
            let id = opts.iter().find_map(|x| match x {
                TcOption::Bpf(TcFilterBpfOption::ProgId(id)) => Some(*id),
                _ => None,
            })?;
            (bpf && named && direct).then_some(id)
        })
        .collect())
}

/// A policy in force on a tap: the program's id, and the tcx link that
/// holds it there (none for a `cls_bpf` filter); dropping it detaches a
/// tcx program.
#[derive(Debug)]
pub struct Enforced {
    pub id: u32,
    link: Option<OwnedFd>,
    /// With a link: whether the same program is also a `cls_bpf` filter.
    backstop: bool,
}

impl Enforced {
    /// Whether the program is still attached to interface `index`.
    fn present(&self, nl: &mut Netlink, tap: &str, index: u32) -> bool {
        match &self.link {
            Some(link) => {
                super::tcx::link_state(link) == Ok((self.id, index))
                    && (!self.backstop
                        || classic_ids(nl, tap).is_ok_and(|ids| ids.contains(&self.id)))
            }
            // A dump that fails counts as missing.
            None => installed(nl, tap)
                .map(|ids| ids.contains(&self.id))
                .unwrap_or(false),
        }
    }
}

/// Compiles `policy` and attaches it to the ingress of `tap` (index
/// `index`): with a tcx link where the kernel has them, else as a
/// `cls_bpf` filter.
pub fn enforce(
    nl: &mut Netlink,
    tap: &str,
    index: u32,
    policy: &Policy,
    ctx: &Context,
) -> Result<Enforced, EnforceError> {
    let compiled = bpf::compile(policy, ctx).map_err(LoadError::from)?;
    let prog = bpf::load(&compiled)?;
    if let Ok(link) = super::tcx::attach(index, &prog.fd) {
        // The same program as a `cls_bpf` filter too: a backstop for when
        // the link's holder dies (the link goes with its last descriptor;
        // the filter stays with the tap), while the link is what `tc`
        // cannot remove. A frame the link passes meets the same verdict
        // again; one it drops or redirects never reaches the filter.
        let backstop = classic(nl, tap, index, &prog, false).is_ok();
        return Ok(Enforced {
            id: prog.id,
            link: Some(link),
            backstop,
        });
    }
    let id = classic(nl, tap, index, &prog, false)?;
    Ok(Enforced {
        id,
        link: None,
        backstop: false,
    })
}

/// Puts a recompiled program in force in one step (the kernel swaps it
/// atomically: no frame sees no filter), or attaches it again when
/// something removed it.
pub fn reinstall(
    nl: &mut Netlink,
    tap: &str,
    index: u32,
    policy: &Policy,
    ctx: &Context,
    enforced: &mut Enforced,
) -> Result<(), EnforceError> {
    let compiled = bpf::compile(policy, ctx).map_err(LoadError::from)?;
    let prog = bpf::load(&compiled)?;
    let attach_failed = |errno| EnforceError::Attach {
        tap: tap.to_string(),
        source: NetlinkError::Kernel {
            op: format!("attach the network policy to {tap}"),
            errno,
            message: None,
        },
    };
    match &enforced.link {
        Some(link) if super::tcx::link_state(link).map(|(_, i)| i) == Ok(index) => {
            super::tcx::update(link, &prog.fd).map_err(attach_failed)?;
        }
        Some(_) => {
            enforced.link = Some(super::tcx::attach(index, &prog.fd).map_err(attach_failed)?);
        }
        None => {
            enforced.id = classic(nl, tap, index, &prog, true)?;
            return Ok(());
        }
    }
    if enforced.backstop {
        classic(nl, tap, index, &prog, true)?;
    }
    enforced.id = prog.id;
    Ok(())
}

/// The `cls_bpf` filter (kernels without tcx); `again`: replace the one
/// there. Returns the program's id.
fn classic(
    nl: &mut Netlink,
    tap: &str,
    index: u32,
    prog: &bpf::Loaded,
    again: bool,
) -> Result<u32, EnforceError> {
    let fail = |source| EnforceError::Attach {
        tap: tap.to_string(),
        source,
    };
    let qdisc = TcHeader {
        index: index as i32,
        handle: TcHandle {
            major: 0xffff,
            minor: 0,
        },
        parent: TcHandle::INGRESS,
        ..Default::default()
    };
    let added = send(
        nl,
        &format!("add an ingress qdisc to {tap}"),
        &RouteNetlinkMessage::NewQueueDiscipline(TcMessage::from_parts(
            qdisc,
            vec![TcAttribute::Kind("ingress".into())],
        )),
        NLM_F_CREATE | NLM_F_EXCL,
    );
    match added {
        Ok(()) => {}
        // The qdisc is there: bridged mode's own (its redirect filters sit
        // on it, after the policy's priority), or, again, the one of the
        // first install (only the filter is replaced).
        Err(e) if e.errno() == Some(nix::errno::Errno::EEXIST) => {}
        Err(e) => return Err(fail(e)),
    }
    let filter = TcHeader {
        index: index as i32,
        parent: TcHandle {
            major: 0xffff,
            minor: TcHandle::MIN_INGRESS,
        },
        handle: TcHandle { major: 0, minor: 1 },
        info: (u32::from(PRIORITY) << 16) | u32::from(ETH_P_ALL.to_be()),
        ..Default::default()
    };
    send(
        nl,
        &format!("attach the network policy to {tap}"),
        &RouteNetlinkMessage::NewTrafficFilter(TcMessage::from_parts(
            filter,
            vec![
                TcAttribute::Kind("bpf".into()),
                TcAttribute::Options(vec![
                    TcOption::Bpf(TcFilterBpfOption::ProgFd(prog.fd.as_raw_fd() as u32)),
                    TcOption::Bpf(TcFilterBpfOption::ProgName("lume_policy".into())),
                    TcOption::Bpf(TcFilterBpfOption::Flags(TcBpfFlags::DirectAction)),
                ]),
            ],
        )),
        if again {
            NLM_F_CREATE | NLM_F_REPLACE
        } else {
            NLM_F_CREATE | NLM_F_EXCL
        },
    )
    .map_err(fail)?;
    Ok(prog.id)
}

/// How often the guard checks the filter and the host's addresses.
pub const GUARD_PERIOD: std::time::Duration = std::time::Duration::from_millis(200);

/// Watches one VM's filter while it runs: puts it back when it was removed
/// (`tc qdisc del`, which nothing of lume's does), and, for `--isolate`,
/// recompiles it when the host's addresses change (a new LAN, a VPN), so
/// the isolated ranges follow the host. Stops when dropped.
#[derive(Debug)]
pub struct Guard {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Guard {
    /// `host_nets`: how the host's networks are read (the same as at start);
    /// `enforced`: what [`enforce`] put in force (held, and so kept attached,
    /// until the guard is dropped); `lease` (bridged): the
    /// guest's address as the DHCP snooper learns it, which becomes the
    /// context's `guest` (ARP and IPv4 only from it) once known.
    pub fn start(
        tap: String,
        policy: Policy,
        ctx: Context,
        enforced: Enforced,
        host_nets: fn(&mut Netlink) -> Result<Vec<super::Cidr>, NetlinkError>,
        lease: Option<Arc<Mutex<Option<Ipv4Addr>>>>,
    ) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut ctx = ctx;
            let mut enforced = enforced;
            while !flag.load(Ordering::SeqCst) {
                std::thread::sleep(GUARD_PERIOD);
                let Ok(mut nl) = Netlink::open() else {
                    continue;
                };
                let Ok(Some(index)) = nl.link_index(&tap) else {
                    continue;
                };
                // Recompiled against the host's networks now; `ctx` keeps
                // what is in force, and changes only once it is.
                let mut wanted = ctx.clone();
                if policy.isolate
                    && let Ok(mut nets) = host_nets(&mut nl)
                {
                    nets.sort_by_key(|c| (u32::from(c.addr), c.prefix));
                    nets.dedup();
                    wanted.host_nets = nets;
                }
                if let Some(l) = &lease
                    && let Some(ip) = *l.lock().unwrap_or_else(|e| e.into_inner())
                {
                    wanted.guest = Some(ip);
                }
                let changed = wanted.host_nets != ctx.host_nets || wanted.guest != ctx.guest;
                // Our own program, not any filter of that name.
                let present = enforced.present(&mut nl, &tap, index);
                if (changed || !present) && !flag.load(Ordering::SeqCst) {
                    let why = if wanted.guest != ctx.guest {
                        "the guest's DHCP lease"
                    } else if present {
                        "the host's addresses changed"
                    } else {
                        "its filter was removed or replaced"
                    };
                    match reinstall(&mut nl, &tap, index, &policy, &wanted, &mut enforced) {
                        Ok(()) => {
                            ctx = wanted;
                            eprintln!(
                                "{} network policy of {tap} re-applied: {why}",
                                crate::util::time::timestamp()
                            )
                        }
                        Err(e) => eprintln!(
                            "{} network policy of {tap} could not be re-applied ({why}), trying again: {e}",
                            crate::util::time::timestamp()
                        ),
                    }
                }
            }
        });
        Self {
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
