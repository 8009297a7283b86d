//! `user`: passt per VM behind a loopback-dropping relay; needs no
//! privileges and follows the host's routing.

use std::path::Path;

use super::{DoctorVm, NetworkDriver, Publishing, SshRoute, VmCheck};
use crate::network::attach::{AttachError, AttachOptions, Attachment, HostSide, virtio_device};
use crate::network::user::UserNet;
use crate::settings::Settings;
use crate::vm::config::MacAddress;
use crate::vm::state::RunState;

#[derive(Debug)]
pub(super) struct User;

impl NetworkDriver for User {
    fn needs_net_admin(&self) -> bool {
        false
    }

    fn publishing(&self) -> Publishing {
        Publishing::Forwarded
    }

    fn enforces_policy(&self) -> bool {
        // The guest's traffic leaves as passt's own sockets, which no
        // per-VM filter sees.
        false
    }

    fn has_device(&self) -> bool {
        true
    }

    fn ssh_route(&self) -> SshRoute {
        SshRoute::LoopbackForward
    }

    fn image_may_ask(&self) -> bool {
        true
    }

    fn check_saved(&self) -> Result<(), AttachError> {
        Ok(())
    }

    fn validate(&self, _opts: &AttachOptions) -> Result<(), AttachError> {
        crate::network::passt::find_passt()?;
        Ok(())
    }

    fn attach(
        &self,
        _vm: &str,
        vm_dir: &Path,
        mac: MacAddress,
        opts: &AttachOptions,
    ) -> Result<Attachment, AttachError> {
        let net: UserNet = match &opts.user_net {
            Some(s) => s.parse()?,
            None => UserNet::default(),
        };
        let (passt, fd) =
            crate::network::passt::Passt::start(&net, &opts.publish, opts.host_loopback, vm_dir)?;
        let guest6_file = passt.guest6_file.clone();
        let note = opts.host_loopback.then(|| {
            let v6 = if guest6_file.is_some() {
                " (over IPv6: through the address of this host's IPv6 default router)"
            } else {
                ""
            };
            format!(
                "unsafeHostLoopback: the guest reaches this host's loopback services through {}{v6}",
                net.gateway()
            )
        });
        let mut guard = HostSide::default();
        guard.held.push(Box::new(passt));
        Ok(Attachment {
            qemu_args: vec![
                "-netdev".into(),
                UserNet::netdev("net0", 3),
                "-device".into(),
                virtio_device("net0", mac),
            ],
            fds: vec![fd],
            ip_address: Some(net.guest_address().into()),
            guest6_file,
            note,
            guard,
            ..Default::default()
        })
    }

    fn collect(&self, _settings: &Settings) {
        // passt dies with its supervisor; nothing is shared.
    }

    fn unrecorded_address(&self, _state: &RunState) -> Option<std::net::IpAddr> {
        None
    }

    /// The global addresses the guest has used in the IPv6 prefix passt
    /// advertised (the host's own /64), as lume's relay saw them since the
    /// VM started; empty when passt gives the guest no IPv6 (see
    /// [`crate::network::passt`]). Addresses the guest has since dropped stay.
    fn addresses_v6(&self, state: &RunState, _leased: bool) -> Vec<std::net::Ipv6Addr> {
        match &state.guest6_file {
            Some(file) => crate::network::passt::read_guest6(file),
            None => Vec::new(),
        }
    }

    fn host_bridge(&self, _state: &RunState) -> Option<String> {
        None
    }

    fn details_note(&self) -> Option<&'static str> {
        Some(
            "User-mode networking (passt): the guest is reachable from outside only through published ports and never reaches this host's loopback; ping from the guest may not work",
        )
    }

    fn doctor_check(&self, vm: &DoctorVm) -> VmCheck {
        match vm.ip {
            None => vm.no_address(),
            Some(ip) => VmCheck::Pass(format!(
                "{ip} (user mode: reachable through published ports only)"
            )),
        }
    }
}
