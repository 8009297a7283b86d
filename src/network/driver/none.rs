//! `none`: no network device at all.

use std::path::Path;

use super::{DoctorVm, NetworkDriver, Publishing, SshRoute, VmCheck};
use crate::network::attach::{AttachError, AttachOptions, Attachment};
use crate::settings::Settings;
use crate::vm::config::MacAddress;
use crate::vm::state::RunState;

/// Mode `none` (named so as not to shadow [`Option::None`]).
#[derive(Debug)]
pub(super) struct Nothing;

impl NetworkDriver for Nothing {
    fn needs_net_admin(&self) -> bool {
        false
    }

    fn publishing(&self) -> Publishing {
        Publishing::Unsupported("a VM without a network has nothing to publish")
    }

    fn enforces_policy(&self) -> bool {
        // Nothing leaves the VM: every policy is met.
        true
    }

    fn has_device(&self) -> bool {
        false
    }

    fn ssh_route(&self) -> SshRoute {
        SshRoute::Unreachable
    }

    fn image_may_ask(&self) -> bool {
        true
    }

    fn check_saved(&self) -> Result<(), AttachError> {
        Ok(())
    }

    fn validate(&self, _opts: &AttachOptions) -> Result<(), AttachError> {
        Ok(())
    }

    fn attach(
        &self,
        _vm: &str,
        _vm_dir: &Path,
        _mac: MacAddress,
        _opts: &AttachOptions,
    ) -> Result<Attachment, AttachError> {
        Ok(Attachment::default())
    }

    fn collect(&self, _settings: &Settings) {}

    fn unrecorded_address(&self, _state: &RunState) -> Option<std::net::IpAddr> {
        None
    }

    fn addresses_v6(&self, _state: &RunState, _leased: bool) -> Vec<std::net::Ipv6Addr> {
        Vec::new()
    }

    fn host_bridge(&self, _state: &RunState) -> Option<String> {
        None
    }

    fn details_note(&self) -> Option<&'static str> {
        Some("No network device")
    }

    fn doctor_check(&self, _vm: &DoctorVm) -> VmCheck {
        VmCheck::Pass("running without a network".into())
    }
}
