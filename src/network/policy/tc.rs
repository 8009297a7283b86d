//! Attaching the policy program to a VM's tap: an `ingress` qdisc and one
//! direct-action `cls_bpf` filter, sent over lume's own rtnetlink socket
//! (messages built by `netlink-packet-route`, as in [`super::super::uplink`]).
//! The filter goes with the tap when the VM stops.

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL, NetlinkSerializable};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::tc::{
    TcAttribute, TcBpfFlags, TcFilterBpfOption, TcHandle, TcHeader, TcMessage, TcOption,
};
use std::os::fd::AsRawFd;

use super::Policy;
use super::bpf::{self, Context, LoadError};
use crate::network::netlink::{Netlink, NetlinkError};

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
    use netlink_packet_core::{Emitable, Parseable};
    let Some(index) = nl.link_index(tap)? else {
        return Ok(false);
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
    Ok(replies.iter().any(|p| {
        let Ok(m) = TcMessage::parse(p.as_slice()) else {
            return false;
        };
        let bpf = m
            .attributes
            .iter()
            .any(|a| matches!(a, TcAttribute::Kind(k) if k == "bpf"));
        let ours = m.attributes.iter().any(|a| match a {
            TcAttribute::Options(o) => {
                o.iter().any(|x| {
                    matches!(x, TcOption::Bpf(TcFilterBpfOption::ProgName(n)) if n.starts_with("lume_policy"))
                }) && o.iter().any(|x| {
                    matches!(x, TcOption::Bpf(TcFilterBpfOption::Flags(f)) if f.contains(TcBpfFlags::DirectAction))
                })
            }
            _ => false,
        });
        bpf && ours
    }))
}

/// Compiles `policy` and attaches it to the ingress of `tap` (index `index`).
pub fn enforce(
    nl: &mut Netlink,
    tap: &str,
    index: u32,
    policy: &Policy,
    ctx: &Context,
) -> Result<(), EnforceError> {
    let prog = bpf::load(&bpf::compile(policy, ctx))?;
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
    send(
        nl,
        &format!("add an ingress qdisc to {tap}"),
        &RouteNetlinkMessage::NewQueueDiscipline(TcMessage::from_parts(
            qdisc,
            vec![TcAttribute::Kind("ingress".into())],
        )),
        NLM_F_CREATE | NLM_F_EXCL,
    )
    .map_err(fail)?;
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
                    TcOption::Bpf(TcFilterBpfOption::ProgFd(prog.as_raw_fd() as u32)),
                    TcOption::Bpf(TcFilterBpfOption::ProgName("lume_policy".into())),
                    TcOption::Bpf(TcFilterBpfOption::Flags(TcBpfFlags::DirectAction)),
                ]),
            ],
        )),
        NLM_F_CREATE | NLM_F_EXCL,
    )
    .map_err(fail)?;
    Ok(())
}
