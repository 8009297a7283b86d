//! `bridged` / `bridged:<interface>`: the guest is a peer on a host
//! interface's LAN. On a Linux bridge, its tap joins the bridge; on a plain
//! interface, a macvlan on the parent joins the tap to it through tc
//! redirects ([`crate::network::uplink`]), re-created when the parent returns.

use std::path::{Path, PathBuf};

use super::{DoctorVm, NetworkDriver, Publishing, SshRoute, VmCheck};
use crate::network::attach::{
    AttachError, AttachOptions, Attachment, Teardown, device_name, enforce_policy, start_snooper,
    start_snooper6, tap_args,
};
use crate::network::dhcp_snoop::Watched;
use crate::network::interfaces::{self, HostInterface, InterfaceType};
use crate::network::kernel::netlink::Netlink;
use crate::network::kernel::tap::Tap;
use crate::network::shared::{BridgedTeardown, Networks, member_id};
use crate::settings::Settings;
use crate::vm::config::MacAddress;
use crate::vm::state::RunState;

/// root's config.yaml: the interfaces a user who is not root may bridge
/// onto (through lume's service or its API); none by default.
pub const MEMBER_BRIDGES_KEY: &str = "memberBridges";

/// File in the VM directory naming the link lume made on the parent for the
/// current run: the macvlan now, a macvtap for runs of older lumes (hence the
/// name, kept so the records of both are collected).
const NETDEV_RECORD: &str = ".macvtap";

/// Bridged onto the named interface, or the default-route one.
#[derive(Debug)]
pub(super) struct Bridged(pub Option<String>);

/// The interfaces root's config.yaml opens to members.
fn member_bridges(settings: &Settings) -> Vec<String> {
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

/// Deletes the link a bridged run made on its parent: the macvlan of this
/// lume's runs (run.json `uplink`, or the record written before it
/// existed), or the macvtap of an older lume's (its `hostDevice`). A tap
/// vanishes by itself with its descriptors.
pub(super) fn collect_link(vm_dir: &Path, state: Option<&RunState>) {
    let record = vm_dir.join(NETDEV_RECORD);
    let recorded = std::fs::read_to_string(&record).ok();
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
}

/// Deletes the macvlan lume created on the parent, and its record.
#[derive(Debug)]
struct LinkTeardown {
    name: String,
    record: PathBuf,
}

impl Teardown for LinkTeardown {
    fn teardown(self: Box<Self>) {
        if let Ok(mut nl) = Netlink::open() {
            let _ = nl.delete_link(&self.name);
        }
        let _ = std::fs::remove_file(&self.record);
    }
}

impl NetworkDriver for Bridged {
    fn needs_net_admin(&self) -> bool {
        true
    }

    fn publishing(&self) -> Publishing {
        Publishing::Unsupported("a bridged VM is reachable on the LAN at its own address")
    }

    fn enforces_policy(&self) -> bool {
        true
    }

    fn has_device(&self) -> bool {
        true
    }

    fn ssh_route(&self) -> SshRoute {
        SshRoute::Address
    }

    fn image_may_ask(&self) -> bool {
        false
    }

    /// A named interface must exist and be bridgeable now.
    fn check_saved(&self) -> Result<(), AttachError> {
        if let Some(name) = &self.0 {
            let list = interfaces::discover()?;
            interfaces::check_bridgeable(&list, name)?;
        }
        Ok(())
    }

    fn validate(&self, opts: &AttachOptions) -> Result<(), AttachError> {
        bridged_interface(self.0.as_deref(), opts)?;
        Ok(())
    }

    fn attach(
        &self,
        vm: &str,
        vm_dir: &Path,
        mac: MacAddress,
        opts: &AttachOptions,
    ) -> Result<Attachment, AttachError> {
        let iface = bridged_interface(self.0.as_deref(), opts)?;
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
            a.guard.teardown = Some(Box::new(BridgedTeardown {
                networks: networks.clone(),
                id: member_id(vm, vm_dir),
            }));
            a.guard.healer = Some(crate::network::heal::Healer::start(networks));
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
            a.guard.teardown = Some(Box::new(LinkTeardown {
                name: name.clone(),
                record,
            }));
            let uplink = crate::network::uplink::Uplink {
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
            a.guard
                .held
                .push(Box::new(crate::network::uplink::Reattacher::start(
                    uplink,
                    vm_dir.join("lume.log"),
                )));
            a.note = Some(format!(
                "macvlan on {}: the guest cannot reach this host through {} (a macvlan limit); other LAN hosts can reach it. If {} goes away, the VM waits and is re-attached when it is back",
                iface.name, iface.name, iface.name
            ));
            // The tap sees both directions and outlives the parent.
            (tap.name, Watched::Tap)
        };
        start_snooper(&mut a, &snoop_on, watched, mac);
        if opts.policy.is_empty() {
            start_snooper6(&mut a, &snoop_on, watched, mac);
        } else {
            // Under a policy the guest's IPv6 is dropped: it has no
            // addresses worth listing (no IPv6 snooper).
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

    /// Records of VMs bridged onto Linux bridges that no longer run (with
    /// lume's accept for a bridge when it was the last VM on it), and the
    /// rest of the namespace's shared state.
    fn collect(&self, settings: &Settings) {
        if let Ok(nets) = Networks::from_settings(settings) {
            let _ = nets.collect();
        }
    }

    /// Only when no DHCP exchange was seen (a guest with a static
    /// address): what the guest itself announces, on its own parent
    /// interface only.
    fn unrecorded_address(&self, state: &RunState) -> Option<std::net::IpAddr> {
        let mac = state.mac_address?;
        crate::network::dhcp_snoop::neighbour_address(mac.0, Some(state.parent.as_deref()?))
            .map(std::net::IpAddr::V4)
    }

    /// The global addresses the guest announced in its neighbour discovery
    /// this run (see [`crate::network::ndp_snoop`]), as the supervisor
    /// recorded them: what the guest claims, not a proof. When none was
    /// seen, on a Linux bridge, the host's neighbour entries for its MAC
    /// there.
    fn addresses_v6(&self, state: &RunState, _leased: bool) -> Vec<std::net::Ipv6Addr> {
        if !state.ipv6_addresses.is_empty() || !state.network_policy.is_empty() {
            return state.ipv6_addresses.clone();
        }
        match (self.host_bridge(state), state.mac_address) {
            (Some(bridge), Some(mac)) => {
                crate::network::ndp_snoop::neighbour_addresses(&bridge, mac.0)
            }
            _ => Vec::new(),
        }
    }

    /// On a Linux bridge, the tap is one of its ports; on a plain
    /// interface, it is joined to a macvlan and bypasses the bridge code.
    fn host_bridge(&self, state: &RunState) -> Option<String> {
        let tapped = state
            .host_device
            .as_deref()
            .is_some_and(|d| d.starts_with("lt"));
        if state.uplink.is_none() && tapped {
            state.parent.clone()
        } else {
            None
        }
    }

    fn details_note(&self) -> Option<&'static str> {
        None
    }

    fn doctor_check(&self, vm: &DoctorVm) -> VmCheck {
        let state = vm.state;
        // A parent that is there but down (a NIC plugged back with nothing
        // to bring it up, a bridge set down) carries nothing: lume does not
        // bring up an interface of the host's itself.
        if let Some(parent) = state.parent.as_deref()
            && vm.links.iter().any(|l| l.name == parent && !l.up)
        {
            let was = vm
                .ip
                .map(|ip| format!(" (its address was {ip})"))
                .unwrap_or_default();
            return VmCheck::Fail(format!(
                "its interface {parent} is down, so the VM has no network{was}: bring it up (`ip link set {parent} up`, or through NetworkManager, ifupdown or systemd-networkd); lume does not change the state of the host's interfaces"
            ));
        }
        let Some(ip) = vm.ip else {
            return vm.no_address();
        };
        let parent = state.parent.as_deref().unwrap_or("?");
        if let Some(uplink) = state.uplink.as_deref() {
            use crate::network::uplink::{Status, status};
            return match Netlink::open().and_then(|mut nl| status(&mut nl, parent, uplink)) {
                Ok(Status::Attached) | Err(_) => VmCheck::Pass(format!(
                    "{ip} on {parent} (macvlan: this host cannot reach it through that interface, other LAN hosts can)"
                )),
                Ok(Status::ParentGone) => VmCheck::Fail(format!(
                    "the interface {parent} is gone (unplugged?): the VM keeps running without a network and waits for it; it is re-attached within a second of {parent} coming back, with its MAC and, if the LAN's DHCP server keeps the lease, its address {ip}"
                )),
                Ok(Status::Detached) => VmCheck::Fail(format!(
                    "{parent} is back and the VM is being re-attached to it; if this lasts, the reason is in {}",
                    vm.log.display()
                )),
            };
        }
        // A run started by an older lume: a macvtap, which goes for good
        // with its parent.
        if let Some(dev) = state
            .host_device
            .as_deref()
            .filter(|d| d.starts_with("lmv"))
        {
            let gone = Netlink::open()
                .and_then(|mut nl| nl.link_index(dev))
                .is_ok_and(|i| i.is_none());
            return if gone {
                VmCheck::Fail(format!(
                    "its macvtap {dev} is gone: the interface {parent} went away (unplugged?) and took it along, so the VM has no network; once {parent} is back, restart the VM (lume stop {vm} && lume run {vm})",
                    vm = vm.name
                ))
            } else {
                VmCheck::Pass(format!(
                    "{ip} on {parent} (macvtap: this host cannot reach it through that interface, other LAN hosts can)"
                ))
            };
        }
        VmCheck::Probe(ip)
    }
}
