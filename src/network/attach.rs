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
use super::driver::Publishing;
use super::interfaces::{self, BridgeError};
use super::kernel::netlink::{Netlink, NetlinkError};
use super::kernel::tap::TapError;
use super::privilege::has_net_admin;
use super::publish::{PortMapping, PublishError, check_unique};
use super::shared::SharedError;
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
        reach = super::driver::of(.0).publishing().reach()
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
        "Interface '{0}' is not open to users who are not root: an administrator lists the interfaces members may bridge onto in root's config.yaml (sudo lume config set {key} 'br0 br1'); use --network nat instead",
        key = super::driver::MEMBER_BRIDGES_KEY
    )]
    MemberBridge(String),
    /// A guest about to run on a network whose set-up was not completed
    /// ([`Attachment::complete`]): refused rather than run unfirewalled.
    #[error(
        "The VM's network was not set up before its guest would run, so the VM was stopped; this is a bug in lume: please report it with the VM's lume.log"
    )]
    NotComplete,
}

/// Checks a mode being saved with `create` or `set` (a named bridged
/// interface must exist and be bridgeable now).
pub fn check_saved_mode(mode: &NetworkMode) -> Result<(), AttachError> {
    super::driver::of(mode).check_saved()
}

/// What takes a mode's host side down when its [`Attachment`] is dropped
/// (after its descriptors are closed and its watchers stopped).
pub trait Teardown: std::fmt::Debug + Send {
    fn teardown(self: Box<Self>);
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
    /// User mode with IPv6: where the guest's IPv6 addresses are recorded
    /// ([`super::passt::read_guest6`]).
    pub guest6_file: Option<PathBuf>,
    /// The address learned from DHCP snooping (bridged), updated by a thread.
    pub learned: Option<Arc<Mutex<Option<Ipv4Addr>>>>,
    /// The IPv6 addresses the guest announced (bridged: its neighbour
    /// discovery, see [`super::ndp_snoop`]), updated by a thread.
    pub learned6: Option<Arc<Mutex<Vec<std::net::Ipv6Addr>>>>,
    /// NAT and host-only: the address dnsmasq reserved for the guest.
    pub reserved: Option<Ipv4Addr>,
    /// NAT and host-only: the network's dnsmasq when this attachment
    /// started it, still starting ([`Self::await_dnsmasq`]); dropped, it is
    /// waited for before the host side below is taken down.
    pub(in crate::network) dnsmasq_start: Option<super::dnsmasq::Starting>,
    /// What [`attach_deferred`] left for [`Self::complete`].
    pub(in crate::network) completion: Option<Completion>,
    /// [`Self::complete`] failed: the attachment stays incomplete.
    pub(in crate::network) completion_failed: bool,
    /// Declared last: fields drop in order, so the descriptors above are
    /// closed (and a tap gone) before the host side is taken down.
    pub(in crate::network) guard: HostSide,
}

/// The host side of an attachment; dropping it takes it down.
#[derive(Debug, Default)]
pub(in crate::network) struct HostSide {
    pub stop: Arc<AtomicBool>,
    pub snooper: Option<JoinHandle<()>>,
    /// The neighbour discovery snooper (bridged without a policy).
    pub snooper6: Option<JoinHandle<()>>,
    /// The self-healing watcher of shared networks (NAT and host-only).
    pub healer: Option<super::heal::Healer>,
    /// The network policy's guard (nat and host with a policy).
    pub policy: Option<super::policy::tc::Guard>,
    /// What the mode keeps running for the VM, dropped in order: user
    /// mode's passt and its relay; bridged on a plain interface, what
    /// re-attaches when the parent returns.
    pub held: Vec<Box<dyn std::fmt::Debug + Send>>,
    /// A member's published host ports, held while the VM runs.
    pub held_ports: Vec<HeldPort>,
    pub teardown: Option<Box<dyn Teardown>>,
}

impl Drop for HostSide {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for h in [self.snooper.take(), self.snooper6.take()]
            .into_iter()
            .flatten()
        {
            let _ = h.join();
        }
        // Stop watching before leaving, so the watcher never "repairs" a
        // network that is being taken down on purpose.
        drop(self.healer.take());
        drop(self.policy.take());
        // A Vec drops its elements first to last.
        self.held.clear();
        if let Some(t) = self.teardown.take() {
            t.teardown();
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

/// Binds every published host port (on its address, or every address —
/// IPv4 and, where the host has IPv6, IPv6, since a NAT network with IPv6
/// publishes there too): refused when something on the host already uses it.
pub fn hold_ports(publish: &[PortMapping]) -> Result<Vec<HeldPort>, AttachError> {
    use super::publish::Proto;
    let mut held = Vec::new();
    for p in publish {
        let in_use = |source| AttachError::MemberPortInUse {
            port: p.host_port,
            proto: p.proto,
            source,
        };
        let addr =
            std::net::SocketAddr::from((p.host_ip.unwrap_or(Ipv4Addr::UNSPECIFIED), p.host_port));
        held.push(
            match p.proto {
                Proto::Tcp => std::net::TcpListener::bind(addr).map(HeldPort::Tcp),
                Proto::Udp => std::net::UdpSocket::bind(addr).map(HeldPort::Udp),
            }
            .map_err(in_use)?,
        );
        if p.host_ip.is_none() {
            match hold_v6_only(p.host_port, p.proto) {
                Ok(h) => held.push(h),
                // No IPv6 on this host: nothing is published there.
                Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {}
                Err(e) => return Err(in_use(e)),
            }
        }
    }
    Ok(held)
}

/// Binds `[::]:port` for IPv6 only (the IPv4 side is bound apart).
fn hold_v6_only(port: u16, proto: super::publish::Proto) -> std::io::Result<HeldPort> {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, SockaddrIn6, bind, listen, setsockopt, socket,
        sockopt,
    };
    let ty = match proto {
        super::publish::Proto::Tcp => SockType::Stream,
        super::publish::Proto::Udp => SockType::Datagram,
    };
    let fd = socket(AddressFamily::Inet6, ty, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    if ty == SockType::Stream {
        setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    }
    let addr = SockaddrIn6::from(std::net::SocketAddrV6::new(
        std::net::Ipv6Addr::UNSPECIFIED,
        port,
        0,
        0,
    ));
    bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr)?;
    Ok(match proto {
        super::publish::Proto::Tcp => {
            listen(&fd, Backlog::new(16).map_err(std::io::Error::from)?)?;
            HeldPort::Tcp(std::net::TcpListener::from(fd))
        }
        super::publish::Proto::Udp => HeldPort::Udp(std::net::UdpSocket::from(fd)),
    })
}

/// Checks published ports against a mode: publishing supported, host ports
/// unique, and no loopback address for NAT (its ports are DNAT rules, which
/// must never lead into the host's loopback).
pub fn check_publish(mode: &NetworkMode, publish: &[PortMapping]) -> Result<(), AttachError> {
    let publishing = super::driver::of(mode).publishing();
    if !publish.is_empty() && matches!(publishing, Publishing::Unsupported(_)) {
        return Err(AttachError::PublishNotSupported(mode.clone()));
    }
    check_unique(publish)?;
    if publishing != Publishing::Forwarded
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
    super::driver::of(mode).validate(opts)
}

/// A host device name unique enough for one namespace: prefix + 8 hex digits.
pub(in crate::network) fn device_name(prefix: &str) -> String {
    format!("{prefix}{:08x}", crate::util::random::u64() as u32)
}

pub(in crate::network) fn virtio_device(netdev: &str, mac: MacAddress) -> String {
    format!("virtio-net-pci,netdev={netdev},mac={mac}")
}

/// `-netdev tap,fd=3` plus the device, for a descriptor handed over as fd 3.
/// QEMU takes `vnet_hdr` from the descriptor (TUNGETIFF; it refuses the
/// option with `fd=`). A VM under a network policy on a kernel whose
/// `sk_buff` the filter cannot read gets a device without transmit
/// offloads ([`POLICED_DEVICE_OPTIONS`]).
pub(in crate::network) fn tap_args(mac: MacAddress, policy: &super::policy::Policy) -> Vec<String> {
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
pub(in crate::network) fn enforce_policy(
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
    let mut attachment = attach_deferred(mode, vm, vm_dir, mac, opts)?;
    attachment.complete()?;
    Ok(attachment)
}

/// [`attach`], with what QEMU does not need to start (nat and host-only:
/// the network's join and firewall) left for [`Attachment::complete`]:
/// the supervisor starts QEMU paused in between, and lets the guest run
/// only once the attachment is complete, so the two overlap and the
/// guest's first frame still meets a network and firewall set up for it.
pub fn attach_deferred(
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
    super::driver::of(mode).attach(vm, vm_dir, mac, opts)
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

/// The rest of an attachment's set-up ([`attach_deferred`]): it fills in
/// the attachment it is given, or fails, leaving nothing it set up.
pub(in crate::network) struct Completion(Box<CompleteFn>);

type CompleteFn = dyn FnOnce(&mut Attachment) -> Result<(), AttachError> + Send;

impl Completion {
    pub fn new(
        f: impl FnOnce(&mut Attachment) -> Result<(), AttachError> + Send + 'static,
    ) -> Self {
        Self(Box::new(f))
    }
}

impl std::fmt::Debug for Completion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Completion")
    }
}

impl Attachment {
    /// Finishes the set-up [`attach_deferred`] left (at once if it left
    /// none). A failure leaves the attachment incomplete for good: dropped,
    /// it takes down only what it holds.
    pub fn complete(&mut self) -> Result<(), AttachError> {
        if self.completion_failed {
            return Err(AttachError::NotComplete);
        }
        let Some(Completion(f)) = self.completion.take() else {
            return Ok(());
        };
        let done = f(self);
        self.completion_failed = done.is_err();
        done
    }

    /// Whether nothing of the set-up is left: [`Self::complete`] done (and
    /// not failed) and dnsmasq waited for. The supervisor checks it before
    /// the guest runs.
    pub fn is_complete(&self) -> bool {
        self.completion.is_none() && !self.completion_failed && self.dnsmasq_start.is_none()
    }

    /// Waits until the dnsmasq this attachment started serves (at once if
    /// it started none): the supervisor asks once the attachment is
    /// complete, while QEMU waits paused, so that dnsmasq's start overlaps
    /// the firewall write and QEMU's. A dnsmasq that did not start is the
    /// run's error.
    pub fn await_dnsmasq(&mut self) -> Result<(), AttachError> {
        match self.dnsmasq_start.take() {
            Some(s) => s
                .wait()
                .map_err(|e| AttachError::from(super::shared::SharedError::from(e))),
            None => Ok(()),
        }
    }

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
pub(in crate::network) fn start_snooper(
    a: &mut Attachment,
    ifname: &str,
    watched: Watched,
    mac: MacAddress,
) {
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

/// Watches the guest's neighbour discovery on `ifname` for the IPv6
/// addresses it announces.
pub(in crate::network) fn start_snooper6(
    a: &mut Attachment,
    ifname: &str,
    watched: Watched,
    mac: MacAddress,
) {
    let learned = Arc::new(Mutex::new(Vec::new()));
    let stop = a.guard.stop.clone();
    let out = learned.clone();
    let ifname = ifname.to_string();
    a.learned6 = Some(learned);
    a.guard.snooper6 = Some(std::thread::spawn(move || {
        let Ok(mut snooper) = super::ndp_snoop::NdpSnooper::open(&ifname) else {
            return;
        };
        let mut seen = super::ndp_snoop::Announcements::new(mac.0, watched);
        while !stop.load(Ordering::SeqCst) {
            if let Ok(true) = snooper.watch(&mut seen, Duration::from_millis(300)) {
                *out.lock().unwrap_or_else(|e| e.into_inner()) = seen.addresses();
            }
        }
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deferred set-up runs once, on `complete`; until then the
    /// attachment says it is not complete, and a failed one stays so.
    #[test]
    fn an_attachment_is_complete_only_once_its_set_up_ran() {
        assert!(Attachment::default().is_complete());
        let mut a = Attachment {
            completion: Some(Completion::new(|a: &mut Attachment| {
                a.note = Some("joined".into());
                Ok(())
            })),
            ..Default::default()
        };
        assert!(!a.is_complete());
        a.complete().unwrap();
        assert!(a.is_complete());
        assert_eq!(a.note.as_deref(), Some("joined"));
        a.complete().unwrap();
        let mut failed = Attachment {
            completion: Some(Completion::new(|_: &mut Attachment| {
                Err(AttachError::NotComplete)
            })),
            ..Default::default()
        };
        assert!(failed.complete().is_err());
        assert!(!failed.is_complete());
        assert!(failed.note.is_none());
        // Asked again, it still fails.
        assert!(matches!(failed.complete(), Err(AttachError::NotComplete)));
        assert!(!failed.is_complete());
    }

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

    /// A port published on every address is held on IPv6 too: a host
    /// service that binds `[::]:PORT` for IPv6 only later fails (NAT
    /// networks with IPv6 publish there).
    #[test]
    fn ports_on_every_address_are_held_on_ipv6_too() {
        let probe = std::net::TcpListener::bind("[::1]:0");
        let Ok(probe) = probe else {
            eprintln!("no IPv6 loopback here: skipped");
            return;
        };
        let port = probe.local_addr().unwrap().port();
        drop(probe);
        let everywhere: PortMapping = format!("{port}:80").parse().unwrap();
        let held = hold_ports(&[everywhere]).unwrap();
        assert_eq!(held.len(), 2);
        assert!(hold_v6_only(port, super::super::publish::Proto::Tcp).is_err());
        assert!(std::net::TcpListener::bind(("0.0.0.0", port)).is_err());
        drop(held);
        assert!(hold_v6_only(port, super::super::publish::Proto::Tcp).is_ok());
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
