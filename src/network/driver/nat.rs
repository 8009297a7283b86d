//! `nat`: lume's bridge `lume0` with DHCP, DNS and masquerade (the default).

use std::path::Path;

use super::lume_bridge::LumeBridge;
use super::{DoctorVm, NetworkDriver, Publishing, SshRoute, VmCheck};
use crate::network::attach::{AttachError, AttachOptions, Attachment};
use crate::network::shared::Kind;
use crate::settings::Settings;
use crate::vm::config::MacAddress;
use crate::vm::state::RunState;

#[derive(Debug)]
pub(super) struct Nat;

impl NetworkDriver for Nat {
    fn needs_net_admin(&self) -> bool {
        true
    }

    fn publishing(&self) -> Publishing {
        Publishing::Dnat
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

    fn validate(&self, opts: &AttachOptions) -> Result<(), AttachError> {
        LumeBridge(Kind::Nat).validate(opts)
    }

    fn attach(
        &self,
        vm: &str,
        vm_dir: &Path,
        mac: MacAddress,
        opts: &AttachOptions,
    ) -> Result<Attachment, AttachError> {
        LumeBridge(Kind::Nat).attach(vm, vm_dir, mac, opts)
    }

    fn collect(&self, settings: &Settings) {
        LumeBridge::collect(settings);
    }

    fn unrecorded_address(&self, _state: &RunState) -> Option<std::net::IpAddr> {
        None
    }

    fn host_bridge(&self, _state: &RunState) -> Option<String> {
        None
    }

    fn details_note(&self) -> Option<&'static str> {
        None
    }

    fn doctor_check(&self, vm: &DoctorVm) -> VmCheck {
        LumeBridge::doctor_check(vm)
    }
}
