//! What nat and host-only share: a lume bridge with its dnsmasq and lume's
//! firewall table ([`crate::network::shared`]), one tap per VM in it.

use std::path::Path;

use super::{DoctorVm, NetworkDriver, Publishing, SshRoute, VmCheck};
use crate::network::attach::{
    AttachError, AttachOptions, Attachment, Completion, device_name, enforce_policy, hold_ports,
    tap_args,
};
use crate::network::kernel::tap::Tap;
use crate::network::shared::{JoinRequest, Kind, Networks, SharedTeardown, member_id};
use crate::settings::Settings;
use crate::vm::config::MacAddress;
use crate::vm::state::RunState;

/// The driver of one of lume's two bridge networks: everything but how
/// ports are published is the same for both (`nat.rs`, `host.rs` give
/// each its values).
#[derive(Debug, Clone, Copy)]
pub(super) struct LumeBridge {
    pub kind: Kind,
    pub publishing: Publishing,
}

impl NetworkDriver for LumeBridge {
    fn needs_net_admin(&self) -> bool {
        true
    }

    fn publishing(&self) -> Publishing {
        self.publishing
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
        true
    }

    fn check_saved(&self) -> Result<(), AttachError> {
        Ok(())
    }

    /// Published host ports no other VM of the namespace publishes.
    fn validate(&self, opts: &AttachOptions) -> Result<(), AttachError> {
        let nets = Networks::from_settings(&opts.settings)?;
        if let Some((vm, vm_dir)) = &opts.vm {
            nets.check_ports(&member_id(vm, vm_dir), &opts.publish)?;
        }
        Ok(())
    }

    /// Joins the network with a new tap: the first VM brings the bridge,
    /// dnsmasq and the firewall up; the attachment leaves it when dropped.
    fn attach(
        &self,
        vm: &str,
        vm_dir: &Path,
        mac: MacAddress,
        opts: &AttachOptions,
    ) -> Result<Attachment, AttachError> {
        let kind = self.kind;
        let networks = Networks::from_settings(&opts.settings)?;
        let held_ports = if opts.member {
            hold_ports(&opts.publish)?
        } else {
            Vec::new()
        };
        let tap = Tap::create(&device_name("lt"))?;
        let net = networks.get(kind).clone();
        let tap_name = tap.name.clone();
        let mut attachment = Attachment {
            qemu_args: tap_args(mac, &opts.policy),
            fds: vec![tap.fd],
            host_device: Some(tap.name),
            parent: Some(net.bridge.clone()),
            lease_file: Some(net.dnsmasq().lease_path()),
            ..Default::default()
        };
        attachment.guard.held_ports = held_ports;
        // The network's join and firewall while QEMU starts: QEMU needs
        // only the tap, and its guest runs once this is done.
        let (vm, vm_dir) = (vm.to_string(), vm_dir.to_path_buf());
        let (publish, policy, member) = (opts.publish.clone(), opts.policy.clone(), opts.member);
        attachment.completion = Some(Completion::new(move |attachment: &mut Attachment| {
            let joined = networks.join(&JoinRequest {
                kind,
                vm: &vm,
                vm_dir: &vm_dir,
                mac,
                tap: &tap_name,
                publish: &publish,
                exclusive_mac: member,
                ipv6: policy.is_empty(),
            })?;
            let ip = joined.ip;
            attachment.note = joined.note;
            attachment.reserved = Some(ip);
            attachment.dnsmasq_start = joined.dnsmasq;
            let guard = &mut attachment.guard;
            guard.healer = Some(crate::network::heal::Healer::start(networks.clone()));
            guard.teardown = Some(Box::new(SharedTeardown {
                networks,
                kind,
                id: member_id(&vm, &vm_dir),
            }));
            if !policy.is_empty() {
                // Before the guest runs, so its first frame meets the
                // policy; a failure drops the attachment, which leaves
                // the network and removes the tap: nothing is left
                // behind.
                guard.policy = Some(enforce_policy(
                    &policy,
                    &tap_name,
                    mac,
                    Some(ip),
                    Some((&net.bridge, net.subnet().gateway())),
                    None,
                )?);
            }
            Ok(())
        }));
        Ok(attachment)
    }

    /// Dead members, and networks nobody uses any more.
    fn collect(&self, settings: &Settings) {
        if let Ok(nets) = Networks::from_settings(settings) {
            let _ = nets.collect();
        }
    }

    fn unrecorded_address(&self, _state: &RunState) -> Option<std::net::IpAddr> {
        None
    }

    /// The guest's addresses in its network's /64 that the bridge's
    /// neighbour table holds (see [`crate::network::guest6`]).
    fn addresses_v6(&self, state: &RunState, leased: bool) -> Vec<std::net::Ipv6Addr> {
        match (state.host_device.as_deref(), state.mac_address) {
            (Some(tap), Some(mac)) => crate::network::guest6::on_bridge_of(tap, mac, leased),
            _ => Vec::new(),
        }
    }

    fn host_bridge(&self, _state: &RunState) -> Option<String> {
        None
    }

    fn details_note(&self) -> Option<&'static str> {
        None
    }

    /// A guest on a lume bridge with an address is probed.
    fn doctor_check(&self, vm: &DoctorVm) -> VmCheck {
        match vm.ip {
            None => vm.no_address(),
            Some(ip) => VmCheck::Probe(ip),
        }
    }
}
