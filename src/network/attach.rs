//! What a network mode hands QEMU for one run, and how it is taken down.
//! Every mode has the same small surface: `validate` before anything exists,
//! `attach` to set up the host side (returning QEMU arguments, descriptors
//! and what is known of the guest's address), and teardown when the
//! [`Attachment`] is dropped.

use std::fs;
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::NetworkMode;
use super::dhcp_snoop::{DhcpSnooper, Exchange, Watched};
use super::interfaces::{self, BridgeError, HostInterface, InterfaceType};
use super::netlink::{Netlink, NetlinkError};
use super::privilege::has_net_admin;
use super::publish::{PortMapping, PublishError, check_unique};
use super::shared::{Kind, Networks, SharedError};
use super::tap::{Tap, TapError};
use super::user::UserNet;
use crate::vm::config::MacAddress;

/// Why a network could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(
        "Network mode '{0}' needs the CAP_NET_ADMIN capability: run lume as root (sudo lume ...), or install the lume package and start its service (sudo systemctl enable --now lume.socket) to run it without sudo as a member of group 'lume', or give the binary the capability (sudo setcap cap_net_admin,cap_net_raw+ep $(command -v lume)); --network user needs no privileges"
    )]
    NeedsNetAdmin(NetworkMode),
    #[error(
        "Ports cannot be published in network mode '{mode}': publishing works with nat and user; {reach}",
        mode = .0,
        reach = unpublished_reach(.0)
    )]
    PublishNotSupported(NetworkMode),
    #[error(
        "Interface '{0}' is lume's own {1} bridge: use --network {1} instead of bridging onto it"
    )]
    OwnBridge(String, &'static str),
    #[error(
        "Cannot publish {0} in network mode '{1}': a NAT port is forwarded from the host's own addresses, never from loopback; use a host address ({2}) or --network user, whose ports can listen on 127.0.0.1"
    )]
    LoopbackPublish(PortMapping, NetworkMode, String),
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error(transparent)]
    UserSubnet(#[from] super::user::BadSubnet),
    #[error(transparent)]
    Bridge(#[from] BridgeError),
    #[error(transparent)]
    Interfaces(#[from] interfaces::InterfaceError),
    #[error(transparent)]
    Shared(#[from] SharedError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error(transparent)]
    Uplink(#[from] super::uplink::UplinkError),
    #[error(transparent)]
    Passt(#[from] super::passt::PasstError),
    #[error(transparent)]
    Policy(#[from] super::policy::PolicyError),
    #[error(transparent)]
    Enforce(#[from] super::policy::tc::EnforceError),
    #[error(transparent)]
    Handoff(#[from] super::handoff::HandoffError),
    #[error(
        "Host port {0} is below 1024: only root may publish it; publish a port from 1024 up (for example --publish 8022:22)"
    )]
    MemberPrivilegedPort(u16),
    #[error(
        "Host port {port}/{proto} is in use on this host ({source}): a VM of a user who is not root may not take over a host service's port; publish a free port"
    )]
    MemberPortInUse {
        port: u16,
        proto: super::publish::Proto,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "Interface '{0}' is not open to users who are not root: an administrator lists the interfaces members may bridge onto in root's config.yaml (sudo lume config set {MEMBER_BRIDGES_KEY} 'br0 br1'); use --network nat instead"
    )]
    MemberBridge(String),
}

/// root's config.yaml: the interfaces a user who is not root may bridge
/// onto (through lume's service or its API); none by default.
pub const MEMBER_BRIDGES_KEY: &str = "memberBridges";

/// Checks a mode being saved with `create` or `set`: a named bridged
/// interface must exist and be bridgeable now.
pub fn check_saved_mode(mode: &NetworkMode) -> Result<(), AttachError> {
    if let NetworkMode::Bridged(Some(name)) = mode {
        let list = interfaces::discover()?;
        interfaces::check_bridgeable(&list, name)?;
    }
    Ok(())
}

/// How the host side is taken down.
#[derive(Debug, Default)]
enum Teardown {
    #[default]
    Nothing,
    /// Leave a shared bridge network (the tap vanishes with its descriptors).
    Shared {
        networks: Networks,
        kind: Kind,
        /// The membership key ([`super::shared::member_id`]).
        id: String,
    },
    /// Delete a link lume created on the parent (the macvlan of bridged mode)
    /// and the record of its name.
    Link(String, PathBuf),
    /// Leave the Linux bridge a tap was joined to: lume's accept for the
    /// bridge in other tools' chains goes with the last VM on it.
    Bridged {
        networks: Networks,
        /// The record's key ([`super::shared::member_id`]).
        id: String,
    },
}

/// A network attached for one run. Dropping it tears the host side down.
#[derive(Debug, Default)]
pub struct Attachment {
    /// Arguments for QEMU (netdev and device); descriptors are named `fd=3`, `fd=4`…
    pub qemu_args: Vec<String>,
    /// Descriptors QEMU must receive as 3, 4, … in this order.
    pub fds: Vec<OwnedFd>,
    /// The guest's address if known up front (user mode; NAT's reservation).
    pub ip_address: Option<std::net::IpAddr>,
    /// The host-side device (tap or macvtap).
    pub host_device: Option<String>,
    /// The bridge or parent interface.
    pub parent: Option<String>,
    /// Bridged on a plain interface: the macvlan on the parent that joins
    /// the tap to it (see [`super::uplink`]).
    pub uplink: Option<String>,
    /// A limit of this attachment worth telling the user.
    pub note: Option<String>,
    /// dnsmasq's lease file (NAT and host-only).
    pub lease_file: Option<PathBuf>,
    /// The address learned from DHCP snooping (bridged), updated by a thread.
    pub learned: Option<Arc<Mutex<Option<Ipv4Addr>>>>,
    /// NAT and host-only: the address dnsmasq reserved for the guest.
    pub reserved: Option<Ipv4Addr>,
    /// Declared last: fields drop in order, so the descriptors above are
    /// closed (and a tap gone) before the host side is taken down.
    guard: HostSide,
}

/// The host side of an attachment; dropping it takes it down.
#[derive(Debug, Default)]
struct HostSide {
    stop: Arc<AtomicBool>,
    snooper: Option<JoinHandle<()>>,
    /// The self-healing watcher of shared networks (NAT and host-only).
    healer: Option<super::heal::Healer>,
    /// The network policy's guard (nat and host with a policy).
    policy: Option<super::policy::tc::Guard>,
    /// User mode's passt and its relay.
    passt: Option<super::passt::Passt>,
    /// Bridged on a plain interface: re-attaches when the parent returns.
    reattacher: Option<super::uplink::Reattacher>,
    /// A member's published host ports, held while the VM runs.
    _held_ports: Vec<HeldPort>,
    teardown: Teardown,
}

impl Drop for HostSide {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.snooper.take() {
            let _ = h.join();
        }
        // Stop watching before leaving, so the watcher never "repairs" a
        // network that is being taken down on purpose.
        drop(self.healer.take());
        drop(self.policy.take());
        drop(self.reattacher.take());
        drop(self.passt.take());
        match std::mem::take(&mut self.teardown) {
            Teardown::Nothing => {}
            Teardown::Shared { networks, kind, id } => {
                let _ = networks.leave(kind, &id);
            }
            Teardown::Link(name, record) => {
                if let Ok(mut nl) = Netlink::open() {
                    let _ = nl.delete_link(&name);
                }
                let _ = std::fs::remove_file(record);
            }
            Teardown::Bridged { networks, id } => {
                let _ = networks.leave_bridged(&id);
            }
        }
    }
}

/// Options that apply to every mode.
#[derive(Debug, Clone, Default)]
pub struct AttachOptions {
    /// `userSubnet` from config.yaml.
    pub user_net: Option<String>,
    /// Ports to publish for this run.
    pub publish: Vec<PortMapping>,
    /// config.yaml, for the shared networks' bridges and subnets.
    pub settings: crate::settings::Settings,
    /// The VM's name and directory, to check its published ports early.
    pub vm: Option<(String, PathBuf)>,
    /// User mode only: let the guest reach the host's loopback through its
    /// gateway (config.json `unsafeHostLoopback`). Unsafe for untrusted guests.
    pub host_loopback: bool,
    /// The VM's network policy (config.json `networkPolicy`); refused in
    /// modes that cannot enforce it.
    pub policy: super::policy::Policy,
    /// The network is set up by root for a user who is not root nor the
    /// service's own user (a member of group `lume`, through a hand-off or
    /// the API): no host port below 1024, no host port something on the
    /// host listens on (lume holds each published port while the VM runs),
    /// no MAC another running VM uses, bridged only onto the interfaces of
    /// `memberBridges`.
    pub member: bool,
}

/// The member rules that need nothing but the request (see
/// [`AttachOptions::member`]).
pub fn check_member_ports(publish: &[PortMapping]) -> Result<(), AttachError> {
    match publish.iter().find(|p| p.host_port < 1024) {
        Some(p) => Err(AttachError::MemberPrivilegedPort(p.host_port)),
        None => Ok(()),
    }
}

/// A published host port held by lume while a member's VM runs: a host
/// service that starts later fails to bind it instead of being silently
/// taken over by the DNAT rule.
#[derive(Debug)]
pub enum HeldPort {
    Tcp(std::net::TcpListener),
    Udp(std::net::UdpSocket),
}

/// Binds every published host port (on its address, or every address):
/// refused when something on the host already uses it.
pub fn hold_ports(publish: &[PortMapping]) -> Result<Vec<HeldPort>, AttachError> {
    use super::publish::Proto;
    publish
        .iter()
        .map(|p| {
            let addr = std::net::SocketAddr::from((
                p.host_ip.unwrap_or(Ipv4Addr::UNSPECIFIED),
                p.host_port,
            ));
            let held = match p.proto {
                Proto::Tcp => std::net::TcpListener::bind(addr).map(HeldPort::Tcp),
                Proto::Udp => std::net::UdpSocket::bind(addr).map(HeldPort::Udp),
            };
            held.map_err(|source| AttachError::MemberPortInUse {
                port: p.host_port,
                proto: p.proto,
                source,
            })
        })
        .collect()
}

/// The interfaces root's config.yaml opens to members.
fn member_bridges(settings: &crate::settings::Settings) -> Vec<String> {
    settings
        .get_list(MEMBER_BRIDGES_KEY)
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// The host interface `bridged` or `bridged:<name>` uses now.
fn bridged_interface(
    name: Option<&str>,
    opts: &AttachOptions,
) -> Result<HostInterface, AttachError> {
    let list = interfaces::discover()?;
    let iface = match name {
        Some(n) => interfaces::check_bridgeable(&list, n)?,
        None => interfaces::choose_default(&list)?,
    }
    .clone();
    if opts.member && !member_bridges(&opts.settings).contains(&iface.name) {
        return Err(AttachError::MemberBridge(iface.name));
    }
    let nets = Networks::from_settings(&opts.settings)?;
    if iface.name == nets.nat.bridge {
        return Err(AttachError::OwnBridge(iface.name, "nat"));
    }
    if iface.name == nets.host.bridge {
        return Err(AttachError::OwnBridge(iface.name, "host"));
    }
    Ok(iface)
}

/// Checks published ports against a mode: publishing supported, host ports
/// unique, and no loopback address for NAT (its ports are DNAT rules, which
/// must never lead into the host's loopback).
pub fn check_publish(mode: &NetworkMode, publish: &[PortMapping]) -> Result<(), AttachError> {
    if !publish.is_empty() && !mode.supports_publish() {
        return Err(AttachError::PublishNotSupported(mode.clone()));
    }
    check_unique(publish)?;
    if *mode != NetworkMode::User
        && let Some(p) = publish
            .iter()
            .find(|p| p.host_ip.is_some_and(|ip| ip.is_loopback()))
    {
        let example = PortMapping {
            host_ip: None,
            ..*p
        };
        return Err(AttachError::LoopbackPublish(
            *p,
            mode.clone(),
            format!("for example --publish {example}"),
        ));
    }
    Ok(())
}

/// Checks, before anything is created, that `mode` can start here.
pub fn validate(mode: &NetworkMode, opts: &AttachOptions) -> Result<(), AttachError> {
    check_publish(mode, &opts.publish)?;
    if let Some(s) = &opts.user_net {
        s.parse::<UserNet>()?;
    }
    if opts.member && mode.needs_net_admin() {
        check_member_ports(&opts.publish)?;
    }
    if mode.needs_net_admin() && !has_net_admin() {
        // lume's service does the privileged part, and checks it there.
        super::handoff::check_service(mode)?;
        return Ok(());
    }
    match mode {
        NetworkMode::Bridged(name) => {
            bridged_interface(name.as_deref(), opts)?;
        }
        NetworkMode::Nat | NetworkMode::Host => {
            let nets = Networks::from_settings(&opts.settings)?;
            if let Some((vm, vm_dir)) = &opts.vm {
                nets.check_ports(&super::shared::member_id(vm, vm_dir), &opts.publish)?;
            }
        }
        NetworkMode::User => {
            super::passt::find_passt()?;
        }
        NetworkMode::None => {}
    }
    Ok(())
}

/// A host device name unique enough for one namespace: prefix + 8 hex digits.
fn device_name(prefix: &str) -> String {
    format!("{prefix}{:08x}", crate::util::random::u64() as u32)
}

fn virtio_device(netdev: &str, mac: MacAddress) -> String {
    format!("virtio-net-pci,netdev={netdev},mac={mac}")
}

/// `-netdev tap,fd=3` plus the device, for a descriptor handed over as fd 3.
/// QEMU takes `vnet_hdr` from the descriptor (TUNGETIFF; it refuses the
/// option with `fd=`). A VM under a network policy on a kernel whose
/// `sk_buff` the filter cannot read gets a device without transmit
/// offloads ([`POLICED_DEVICE_OPTIONS`]).
fn tap_args(mac: MacAddress, policy: &super::policy::Policy) -> Vec<String> {
    tap_args_with(mac, transmit_offload(policy))
}

/// Whether a VM with `policy` may have transmit offloads: always without
/// a policy; under one, when this kernel's `sk_buff` layout lets the
/// filter check offloaded frames (otherwise it drops them).
pub fn transmit_offload(policy: &super::policy::Policy) -> bool {
    policy.is_empty() || super::policy::skb::SkbLayout::running().is_some()
}

fn tap_args_with(mac: MacAddress, transmit_offload: bool) -> Vec<String> {
    let mut device = virtio_device("net0", mac);
    if !transmit_offload {
        device.push_str(POLICED_DEVICE_OPTIONS);
    }
    vec![
        "-netdev".into(),
        "tap,id=net0,fd=3".into(),
        "-device".into(),
        device,
    ]
}

/// The virtio-net device of a VM under a network policy offers the guest
/// no transmit offload: no checksum left for the host to fill in, no large
/// frame for it to cut up (either would let the kernel rewrite headers
/// after the policy's filter read them; the filter drops such frames, see
/// `policy::bpf`). Receive offloads (`guest_csum`, `guest_tso4`, ...) stay.
pub const POLICED_DEVICE_OPTIONS: &str =
    ",csum=off,gso=off,host_tso4=off,host_tso6=off,host_ecn=off,host_ufo=off";

/// Puts `policy` in force on the tap `tap` of a VM with `mac` and the
/// reserved address `guest` behind `gateway`.
fn enforce_policy(
    policy: &super::policy::Policy,
    tap: &str,
    mac: MacAddress,
    guest: Option<Ipv4Addr>,
    network: Option<(&str, Ipv4Addr)>,
    lease: Option<Arc<Mutex<Option<Ipv4Addr>>>>,
) -> Result<super::policy::tc::Guard, AttachError> {
    let mut nl = Netlink::open()?;
    let index = nl.link_index(tap)?.ok_or_else(|| NetlinkError::NotFound {
        op: format!("attach the network policy to {tap}"),
        name: tap.to_string(),
    })?;
    let bridge = match network {
        Some((bridge, _)) => Some(policy_bridge(&mut nl, bridge)?),
        None => None,
    };
    let ctx = super::policy::bpf::Context {
        mac: mac.0,
        guest,
        gateway: network.map(|(_, gateway)| gateway),
        host_nets: host_nets(&mut nl)?,
        bridge,
        skb: super::policy::skb::SkbLayout::running(),
    };
    let enforced = super::policy::tc::enforce(&mut nl, tap, index, policy, &ctx)?;
    Ok(super::policy::tc::Guard::start(
        tap.to_string(),
        policy.clone(),
        ctx,
        enforced,
        host_nets,
        lease,
    ))
}

/// lume's bridge `name`, its MAC pinned (set to what it is: from then on
/// the kernel no longer changes it as ports come and go), for the policy's
/// destination-MAC check. Pinning changes nothing for the guests already
/// on it.
fn policy_bridge(nl: &mut Netlink, name: &str) -> Result<super::policy::bpf::Bridge, NetlinkError> {
    let not_found = || NetlinkError::NotFound {
        op: "read the MAC address of lume's bridge for the network policy".into(),
        name: name.to_string(),
    };
    let link = nl.link_info(name)?.ok_or_else(not_found)?;
    let mac = link.mac.ok_or_else(not_found)?;
    nl.set_mac(name, mac)?;
    Ok(super::policy::bpf::Bridge {
        mac,
        index: link.index,
    })
}

/// The networks of the host's own IPv4 addresses (loopback aside), sorted.
fn host_nets(nl: &mut Netlink) -> Result<Vec<super::policy::Cidr>, NetlinkError> {
    let mut nets: Vec<_> = nl
        .all_addresses_v4()?
        .into_iter()
        .filter(|(a, _)| !a.is_loopback())
        .map(|(a, p)| super::policy::Cidr::new(a, p))
        .collect();
    nets.sort_by_key(|c| (u32::from(c.addr), c.prefix));
    nets.dedup();
    Ok(nets)
}

/// Sets up `mode` for the VM `vm` (directory `vm_dir`) with `mac`.
pub fn attach(
    mode: &NetworkMode,
    vm: &str,
    vm_dir: &Path,
    mac: MacAddress,
    opts: &AttachOptions,
) -> Result<Attachment, AttachError> {
    validate(mode, opts)?;
    opts.policy.check(mode)?;
    if super::handoff::needed(mode) {
        // The service's keeper attaches the policy's filter to the tap it
        // makes, as here, before handing the tap over (or refuses).
        return super::handoff::attach_remote(mode, vm, mac, &opts.publish, &opts.policy);
    }
    match mode {
        NetworkMode::None => Ok(Attachment::default()),
        NetworkMode::User => {
            let net: UserNet = match &opts.user_net {
                Some(s) => s.parse()?,
                None => UserNet::default(),
            };
            let (passt, fd) =
                super::passt::Passt::start(&net, &opts.publish, opts.host_loopback, vm_dir)?;
            let note = opts.host_loopback.then(|| {
                format!(
                    "unsafeHostLoopback: the guest reaches this host's loopback services through {}",
                    net.gateway()
                )
            });
            Ok(Attachment {
                qemu_args: vec![
                    "-netdev".into(),
                    UserNet::netdev("net0", 3),
                    "-device".into(),
                    virtio_device("net0", mac),
                ],
                fds: vec![fd],
                ip_address: Some(net.guest_address().into()),
                note,
                guard: HostSide {
                    stop: Arc::default(),
                    snooper: None,
                    healer: None,
                    policy: None,
                    passt: Some(passt),
                    reattacher: None,
                    _held_ports: Vec::new(),
                    teardown: Teardown::Nothing,
                },
                ..Default::default()
            })
        }
        NetworkMode::Nat | NetworkMode::Host => {
            let kind = if *mode == NetworkMode::Nat {
                Kind::Nat
            } else {
                Kind::Host
            };
            let networks = Networks::from_settings(&opts.settings)?;
            let held_ports = if opts.member {
                hold_ports(&opts.publish)?
            } else {
                Vec::new()
            };
            let tap = Tap::create(&device_name("lt"))?;
            let (ip, subnet_note) =
                networks.join(kind, vm, vm_dir, mac, &tap.name, &opts.publish, opts.member)?;
            let net = networks.get(kind).clone();
            let tap_name = tap.name.clone();
            let attachment = Attachment {
                qemu_args: tap_args(mac, &opts.policy),
                fds: vec![tap.fd],
                ip_address: None,
                host_device: Some(tap.name),
                parent: Some(net.bridge.clone()),
                note: subnet_note,
                lease_file: Some(net.dnsmasq().lease_path()),
                reserved: Some(ip),
                guard: HostSide {
                    stop: Arc::default(),
                    snooper: None,
                    healer: Some(super::heal::Healer::start(networks.clone())),
                    policy: None,
                    passt: None,
                    reattacher: None,
                    _held_ports: held_ports,
                    teardown: Teardown::Shared {
                        networks,
                        kind,
                        id: super::shared::member_id(vm, vm_dir),
                    },
                },
                ..Default::default()
            };
            let mut attachment = attachment;
            if !opts.policy.is_empty() {
                // Before QEMU exists, so the guest's first frame meets the
                // policy; a failure drops `attachment`, which leaves the
                // network and removes the tap: nothing is left behind.
                attachment.guard.policy = Some(enforce_policy(
                    &opts.policy,
                    &tap_name,
                    mac,
                    Some(ip),
                    Some((&net.bridge, net.subnet().gateway())),
                    None,
                )?);
            }
            Ok(attachment)
        }
        NetworkMode::Bridged(name) => {
            let iface = bridged_interface(name.as_deref(), opts)?;
            let mut nl = Netlink::open()?;
            let mut a = Attachment {
                qemu_args: tap_args(mac, &opts.policy),
                parent: Some(iface.name.clone()),
                ..Default::default()
            };
            let (snoop_on, watched) = if iface.kind == InterfaceType::Bridge {
                let tap = Tap::create(&device_name("lt"))?;
                nl.set_master(&tap.name, &iface.name)?;
                nl.set_up(&tap.name)?;
                a.host_device = Some(tap.name.clone());
                a.fds.push(tap.fd);
                // With br_netfilter, the frames between the bridge's ports
                // cross the forward hook, which Docker's or ufw's policy
                // drops: lume keeps an accept for this bridge in their
                // chains while a VM is bridged onto it.
                let networks = Networks::from_settings(&opts.settings)?;
                a.note = networks.join_bridged(vm, vm_dir, &iface.name, mac, opts.member)?;
                a.guard.teardown = Teardown::Bridged {
                    networks: networks.clone(),
                    id: super::shared::member_id(vm, vm_dir),
                };
                a.guard.healer = Some(super::heal::Healer::start(networks));
                (tap.name, Watched::Tap)
            } else {
                // A tap QEMU keeps for the whole run, joined to the parent by
                // a macvlan that lume re-creates whenever the parent returns.
                if opts.member {
                    Networks::from_settings(&opts.settings)?.check_mac(mac, vm, vm_dir)?;
                }
                let tap = Tap::create(&device_name("lt"))?;
                let name = device_name("lmv");
                // Recorded before it exists: a supervisor killed at any point
                // after this leaves a name the next command can collect.
                let record = vm_dir.join(NETDEV_RECORD);
                let _ = crate::util::atomic::write_atomic(&record, name.as_bytes());
                a.guard.teardown = Teardown::Link(name.clone(), record);
                let uplink = super::uplink::Uplink {
                    tap: tap.name.clone(),
                    macvlan: name.clone(),
                    parent: iface.name.clone(),
                    mac: mac.0,
                };
                uplink.prepare_tap(&mut nl)?;
                uplink.connect(&mut nl)?;
                a.host_device = Some(tap.name.clone());
                a.uplink = Some(name);
                a.fds.push(tap.fd);
                a.guard.reattacher = Some(super::uplink::Reattacher::start(
                    uplink,
                    vm_dir.join("lume.log"),
                ));
                a.note = Some(format!(
                    "macvlan on {}: the guest cannot reach this host through {} (a macvlan limit); other LAN hosts can reach it. If {} goes away, the VM waits and is re-attached when it is back",
                    iface.name, iface.name, iface.name
                ));
                // The tap sees both directions and outlives the parent.
                (tap.name, Watched::Tap)
            };
            start_snooper(&mut a, &snoop_on, watched, mac);
            if !opts.policy.is_empty() {
                // After the tap's redirect exists (the policy's filter
                // comes first), before QEMU: a failure drops `a`, which
                // takes the macvlan and the tap down. The guest's lease,
                // once the snooper saw it, becomes the only address its
                // ARP and IPv4 may come from (the guard recompiles).
                let tap = a.host_device.clone().unwrap_or_default();
                a.guard.policy = Some(enforce_policy(
                    &opts.policy,
                    &tap,
                    mac,
                    None,
                    None,
                    a.learned.clone(),
                )?);
            }
            Ok(a)
        }
    }
}

/// The attachment of a tap lume's service made for this user
/// ([`super::handoff`]): the service holds the host side and takes it down
/// when this process exits, so nothing is torn down here.
pub(super) fn handed_off(
    mac: MacAddress,
    fd: OwnedFd,
    handed: super::handoff::Handed,
) -> Attachment {
    Attachment {
        qemu_args: tap_args_with(mac, handed.transmit_offload),
        fds: vec![fd],
        ip_address: handed.ip_address.map(Into::into),
        host_device: Some(handed.device),
        parent: handed.parent,
        uplink: handed.uplink,
        note: handed.note,
        ..Default::default()
    }
}

/// The kernel's virtio-net backend, handed to QEMU as `vhostfd`.
pub const VHOST_NET: &str = "/dev/vhost-net";

impl Attachment {
    /// Gives the VM's tap vhost-net when QEMU runs on KVM (`kvm`): the
    /// kernel moves the guest's frames between the tap and the guest's
    /// memory, with no QEMU thread in between. lume opens
    /// [`VHOST_NET`] and hands it over (`vhostfd`), so a QEMU that could
    /// not open it still gets it. When it cannot be used on KVM, the
    /// attachment's note says why and what would enable it; under TCG it
    /// is never used (vhost needs KVM's ioeventfd and irqfd), and nothing
    /// is said. Modes without a tap (user, none) are left as they are.
    pub fn offer_vhost(&mut self, kvm: bool) {
        self.offer_vhost_from(kvm, Path::new(VHOST_NET));
    }

    fn offer_vhost_from(&mut self, kvm: bool, device: &Path) {
        let Some(netdev) = self
            .qemu_args
            .iter()
            .position(|a| a.starts_with("tap,id=net0,fd="))
        else {
            return;
        };
        if !kvm {
            return;
        }
        let opened = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(device);
        match opened {
            Ok(f) => {
                let n = 3 + self.fds.len();
                self.fds.push(OwnedFd::from(f));
                self.qemu_args[netdev].push_str(&format!(",vhost=on,vhostfd={n}"));
            }
            Err(e) => {
                let why = match e.kind() {
                    std::io::ErrorKind::NotFound => {
                        format!("{} does not exist: `modprobe vhost_net`", device.display())
                    }
                    std::io::ErrorKind::PermissionDenied => format!(
                        "{} cannot be opened: the user lume runs QEMU as needs access to it (the kvm group on Debian)",
                        device.display()
                    ),
                    _ => format!("{} cannot be opened ({e})", device.display()),
                };
                let note = format!(
                    "vhost-net not used, the guest's network goes through QEMU (slower): {why}"
                );
                self.note = Some(match self.note.take() {
                    Some(n) => format!("{n}; {note}"),
                    None => note,
                });
            }
        }
    }
}

/// Watches the DHCP exchange on `ifname` for the guest's ACK.
fn start_snooper(a: &mut Attachment, ifname: &str, watched: Watched, mac: MacAddress) {
    let learned = Arc::new(Mutex::new(None));
    let stop = a.guard.stop.clone();
    let out = learned.clone();
    let ifname = ifname.to_string();
    a.learned = Some(learned);
    a.guard.snooper = Some(std::thread::spawn(move || {
        let Ok(mut snooper) = DhcpSnooper::open(&ifname) else {
            return;
        };
        let mut exchange = Exchange::new(mac.0, watched);
        while !stop.load(Ordering::SeqCst) {
            if let Ok(Some(ack)) = snooper.next_ack(&mut exchange, Duration::from_millis(300)) {
                *out.lock().unwrap_or_else(|e| e.into_inner()) = Some(ack.address);
            }
        }
    }));
}

/// File in the VM directory naming the link lume made on the parent for the
/// current run: the macvlan now, a macvtap for runs of older lumes (hence the
/// name, kept so the records of both are collected).
const NETDEV_RECORD: &str = ".macvtap";

/// Collects what a killed supervisor of the VM in `vm_dir` left of its
/// network (call it only while the VM's lock is free or held by the caller):
/// its macvlan or an older lume's macvtap (a tap vanishes by itself with its
/// descriptors) and, for NAT and host-only, its membership, taking the
/// shared network down when nobody uses it any more; bridged onto a Linux
/// bridge, its record, with lume's accept for the bridge in other tools'
/// chains when it was the last VM on it.
pub fn collect_stale(
    vm_dir: &Path,
    state: Option<&crate::vm::state::RunState>,
    settings: &crate::settings::Settings,
) {
    let record = vm_dir.join(NETDEV_RECORD);
    let recorded = std::fs::read_to_string(&record).ok();
    // The macvlan of this lume's bridged runs (run.json `uplink`), or the
    // macvtap of an older lume's (its `hostDevice`).
    let uplink = state.and_then(|s| s.uplink.clone());
    let from_state = state.and_then(|s| s.host_device.clone());
    for dev in [recorded, uplink, from_state].into_iter().flatten() {
        if dev.trim().starts_with("lmv")
            && let Ok(mut nl) = Netlink::open()
        {
            let _ = nl.delete_link(dev.trim());
        }
    }
    let _ = std::fs::remove_file(&record);
    if let Some(state) = state
        && matches!(
            state.network_mode,
            NetworkMode::Nat | NetworkMode::Host | NetworkMode::Bridged(_)
        )
        && let Ok(nets) = Networks::from_settings(settings)
    {
        let _ = nets.collect();
    }
}

/// How a VM of a mode that cannot publish is reached instead.
fn unpublished_reach(mode: &NetworkMode) -> &'static str {
    match mode {
        NetworkMode::Bridged(_) => "a bridged VM is reachable on the LAN at its own address",
        NetworkMode::Host => "a host-only VM is reachable from this host at its own address",
        NetworkMode::None => "a VM without a network has nothing to publish",
        NetworkMode::Nat | NetworkMode::User => "this mode can publish",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tapped(fds: usize) -> Attachment {
        let mac: MacAddress = "52:54:00:12:34:56".parse().unwrap();
        Attachment {
            qemu_args: tap_args(mac, &Default::default()),
            fds: (0..fds)
                .map(|_| OwnedFd::from(fs::File::open("/dev/null").unwrap()))
                .collect(),
            ..Default::default()
        }
    }

    /// vhost-net on KVM: the device is opened by lume and named as the
    /// next descriptor; missing or not openable, the note says why and
    /// QEMU gets the plain tap; under TCG, or without a tap, nothing
    /// changes.
    #[test]
    fn vhost_net_is_offered_on_kvm_only() {
        // /dev/null stands in for the device (any character device opens).
        let mut a = tapped(1);
        a.offer_vhost_from(true, Path::new("/dev/null"));
        assert_eq!(a.qemu_args[1], "tap,id=net0,fd=3,vhost=on,vhostfd=4");
        assert_eq!(a.fds.len(), 2);
        assert!(a.note.is_none());

        let dir = tempfile::tempdir().unwrap();
        let mut a = tapped(1);
        a.note = Some("macvlan on eth0: …".into());
        a.offer_vhost_from(true, &dir.path().join("vhost-net"));
        assert_eq!(a.qemu_args[1], "tap,id=net0,fd=3");
        assert_eq!(a.fds.len(), 1);
        let note = a.note.unwrap();
        assert!(
            note.starts_with("macvlan on eth0: …; vhost-net not used"),
            "{note}"
        );
        assert!(note.contains("modprobe vhost_net"), "{note}");

        // A symlink where the device should be is not followed.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink("/dev/null", &link).unwrap();
        let mut a = tapped(1);
        a.offer_vhost_from(true, &link);
        assert_eq!(a.qemu_args[1], "tap,id=net0,fd=3");

        let mut a = tapped(1);
        a.offer_vhost_from(false, Path::new("/dev/null"));
        assert_eq!(a.qemu_args[1], "tap,id=net0,fd=3");
        assert!(a.note.is_none());

        let mut none = Attachment::default();
        none.offer_vhost_from(true, Path::new("/dev/null"));
        assert!(none.qemu_args.is_empty() && none.fds.is_empty());
    }

    /// Without the kernel's sk_buff layout, a policed VM's device offers no
    /// transmit offload (the filter drops offloaded frames); receive
    /// offloads, VMs without a policy and policed VMs on a kernel whose
    /// layout the filter reads keep QEMU's defaults.
    #[test]
    fn policed_devices_offer_no_transmit_offload() {
        let mac: MacAddress = "52:54:00:12:34:56".parse().unwrap();
        let free = tap_args(mac, &Default::default())[3].clone();
        assert_eq!(free, "virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56");
        let policed = tap_args_with(mac, false)[3].clone();
        for off in [
            "csum=off",
            "gso=off",
            "host_tso4=off",
            "host_tso6=off",
            "host_ufo=off",
        ] {
            assert!(policed.split(',').any(|o| o == off), "{policed}");
        }
        assert!(!policed.contains("guest_"), "{policed}");
        // A kernel whose sk_buff the filter reads: every offload.
        assert_eq!(tap_args_with(mac, true)[3], free);
    }

    /// A member could otherwise take over a host service's port (lume's
    /// DNAT matches every local address): a port in use is refused, and a
    /// held port cannot be taken by a service that starts later.
    #[test]
    fn member_ports_in_use_are_refused_and_held_ports_stay_taken() {
        let service = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = service.local_addr().unwrap().port();
        let on_loopback = |port: u16, proto: &str| -> PortMapping {
            format!("127.0.0.1:{port}:80/{proto}").parse().unwrap()
        };
        let e = hold_ports(&[on_loopback(port, "tcp")]).unwrap_err();
        assert!(
            matches!(e, AttachError::MemberPortInUse { port: p, .. } if p == port),
            "{e}"
        );
        assert!(
            e.to_string()
                .starts_with(&format!("Host port {port}/tcp is in use"))
        );
        drop(service);
        let held = hold_ports(&[on_loopback(port, "tcp"), on_loopback(port, "udp")]).unwrap();
        assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_err());
        assert!(std::net::UdpSocket::bind(("127.0.0.1", port)).is_err());
        drop(held);
        assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_ok());
    }

    #[test]
    fn members_may_not_publish_privileged_ports() {
        let p = |s: &str| -> PortMapping { s.parse().unwrap() };
        assert!(matches!(
            check_member_ports(&[p("8080:80"), p("22:22")]),
            Err(AttachError::MemberPrivilegedPort(22))
        ));
        assert!(check_member_ports(&[p("1024:22")]).is_ok());
    }

    fn ports(list: &[&str]) -> Vec<PortMapping> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn nat_refuses_loopback_publish_and_user_allows_it() {
        let lo = ports(&["127.0.0.1:8080:80"]);
        let e = check_publish(&NetworkMode::Nat, &lo).unwrap_err();
        assert!(matches!(e, AttachError::LoopbackPublish(..)), "{e}");
        let text = e.to_string();
        assert!(
            text.starts_with("Cannot publish 127.0.0.1:8080:80/tcp in network mode 'nat'")
                && text.contains("--network user")
                && text.contains("--publish 8080:80/tcp"),
            "{text}"
        );
        assert!(check_publish(&NetworkMode::Nat, &ports(&["127.5.5.5:1:2"])).is_err());
        assert!(check_publish(&NetworkMode::User, &lo).is_ok());
        assert!(
            check_publish(
                &NetworkMode::Nat,
                &ports(&["198.51.100.2:8080:80", "81:81"])
            )
            .is_ok()
        );
        assert!(matches!(
            check_publish(&NetworkMode::Host, &lo),
            Err(AttachError::PublishNotSupported(_))
        ));
    }
}
