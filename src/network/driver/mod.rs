//! One driver per network mode (as netavark's `NetworkDriver`): everything
//! lume knows about a mode, from the first check to what a killed run left,
//! sits behind [`NetworkDriver`], one file per mode. [`of`] is the one place
//! that maps a [`NetworkMode`] to its driver; adding a mode is a new file
//! here plus one arm there (and its spelling in `mode.rs`), and the compiler
//! points at both, since neither match has a wildcard arm.
//!
//! What every mode shares (validating published ports, the hand-off to
//! lume's service for users without CAP_NET_ADMIN, the policy check) is
//! done once in [`super::attach`] before a driver is asked.
//!
//! Teardown is not a method: [`NetworkDriver::attach`] puts what takes its
//! host side down ([`super::attach::Teardown`]) in the [`Attachment`], which
//! runs it when dropped, so no path out of a run can skip it. Healing is
//! not per mode either: one watcher per network namespace
//! ([`super::heal`]) repairs the state every mode shares, started by the
//! drivers whose attachments need it (nat, host, bridged on a Linux bridge).

mod bridged;
mod host;
mod lume_bridge;
mod nat;
mod none;
mod user;

use std::net::Ipv4Addr;
use std::path::Path;

pub use bridged::MEMBER_BRIDGES_KEY;

use super::NetworkMode;
use super::attach::{AttachError, AttachOptions, Attachment};
use crate::settings::Settings;
use crate::vm::config::MacAddress;
use crate::vm::state::RunState;

/// What a network mode does. Every method is required, so a new mode
/// answers each question explicitly.
pub trait NetworkDriver {
    /// Whether setting up the host side needs CAP_NET_ADMIN (without it,
    /// lume's service does it: [`super::handoff`]).
    fn needs_net_admin(&self) -> bool;
    /// How ports are published in this mode, if they can be.
    fn publishing(&self) -> Publishing;
    /// Whether a network policy holds in this mode (see
    /// [`super::policy::enforceable_in`]).
    fn enforces_policy(&self) -> bool;
    /// Whether the guest gets a network device (and so a tap a policy's
    /// filter sits on); without one, nothing leaves the VM.
    fn has_device(&self) -> bool;
    /// How this host reaches the guest's SSH server.
    fn ssh_route(&self) -> SshRoute;
    /// Whether an image pulled from a registry may ask for this mode (an
    /// image never chooses a host interface).
    fn image_may_ask(&self) -> bool;
    /// Checks the mode being saved with `create` or `set`.
    fn check_saved(&self) -> Result<(), AttachError>;
    /// Checks, before anything is created, what only this mode needs
    /// (run with CAP_NET_ADMIN, or by a mode that needs none).
    fn validate(&self, opts: &AttachOptions) -> Result<(), AttachError>;
    /// Sets up the host side for the VM `vm` (directory `vm_dir`) with
    /// `mac`: QEMU's arguments and descriptors, and what takes it down
    /// when the [`Attachment`] is dropped (its teardown).
    fn attach(
        &self,
        vm: &str,
        vm_dir: &Path,
        mac: MacAddress,
        opts: &AttachOptions,
    ) -> Result<Attachment, AttachError>;
    /// Collects what a killed run of this mode left in the state shared
    /// with other VMs (memberships, networks nobody uses any more).
    fn collect(&self, settings: &Settings);
    /// The guest's address when neither a lease nor run.json knows it
    /// (bridged: what a guest with a static address announces on its own
    /// parent interface).
    fn unrecorded_address(&self, state: &RunState) -> Option<std::net::IpAddr>;
    /// The guest's global IPv6 addresses as far as the host knows them now
    /// (empty without IPv6); `leased`: the guest has its IPv4 address.
    fn addresses_v6(&self, state: &RunState, leased: bool) -> Vec<std::net::Ipv6Addr>;
    /// The Linux bridge of the host's the run's tap sits in, if any: its
    /// frames then cross br_netfilter's forward hook (the doctor checks
    /// what drops them there).
    fn host_bridge(&self, state: &RunState) -> Option<String>;
    /// VMDetails' `networkNote` for a VM in this mode, if any.
    fn details_note(&self) -> Option<&'static str>;
    /// The doctor's check of a running VM of this mode.
    fn doctor_check(&self, vm: &DoctorVm) -> VmCheck;
}

/// How ports are published in a mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Publishing {
    /// DNAT rules from the host's own addresses, never from loopback.
    Dnat,
    /// A process on the host forwards them; they may listen on loopback.
    Forwarded,
    /// Not at all; how such a VM is reached instead.
    Unsupported(&'static str),
}

impl Publishing {
    /// How a VM of a mode that cannot publish is reached instead.
    pub fn reach(self) -> &'static str {
        match self {
            Self::Unsupported(reach) => reach,
            Self::Dnat | Self::Forwarded => "this mode can publish",
        }
    }
}

/// How this host reaches a guest's SSH server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SshRoute {
    /// Port 22 of the guest's address.
    Address,
    /// The loopback port lume forwards to guest port 22 (in run.json).
    LoopbackForward,
    /// No way: the guest has no network.
    Unreachable,
}

/// What the doctor knows of a running VM.
#[derive(Debug)]
pub struct DoctorVm<'a> {
    pub name: &'a str,
    /// The VM's lume.log.
    pub log: &'a Path,
    pub state: &'a RunState,
    /// The guest's IPv4 address as far as it is known now.
    pub ip: Option<Ipv4Addr>,
    /// The host's links now.
    pub links: &'a [super::kernel::netlink::LinkInfo],
}

/// The doctor's verdict on a running VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmCheck {
    Pass(String),
    Fail(String),
    /// Decided by probing the guest's address (all VMs at once).
    Probe(Ipv4Addr),
}

impl DoctorVm<'_> {
    /// The verdict on a VM whose address is not known yet.
    fn no_address(&self) -> VmCheck {
        VmCheck::Fail(format!(
            "running ({}) but has no address yet: check its console.log; in bridged mode, that the LAN's DHCP server answers and the br_netfilter check above passes",
            self.state.network_mode
        ))
    }
}

/// The driver of `mode`: the one registration point of every mode.
pub fn of(mode: &NetworkMode) -> Box<dyn NetworkDriver> {
    match mode {
        NetworkMode::Nat => Box::new(nat::NAT),
        NetworkMode::Host => Box::new(host::HOST),
        NetworkMode::Bridged(name) => Box::new(bridged::Bridged(name.clone())),
        NetworkMode::User => Box::new(user::User),
        NetworkMode::None => Box::new(none::Nothing),
    }
}

/// Collects what a killed supervisor of the VM in `vm_dir` left of its
/// network (call it only while the VM's lock is free or held by the
/// caller): the link a bridged run made on its parent (recorded before the
/// mode reaches run.json), then what the mode of the dead run (`state`)
/// shares with other VMs.
pub fn collect_stale(vm_dir: &Path, state: Option<&RunState>, settings: &Settings) {
    bridged::collect_link(vm_dir, state);
    if let Some(state) = state {
        of(&state.network_mode).collect(settings);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The drivers give the answers the lists of modes gave before there
    /// were drivers.
    #[test]
    fn each_mode_answers_as_before() {
        let modes = [
            NetworkMode::Nat,
            NetworkMode::Host,
            NetworkMode::Bridged(None),
            NetworkMode::Bridged(Some("br0".into())),
            NetworkMode::User,
            NetworkMode::None,
        ];
        for mode in &modes {
            let d = of(mode);
            let tapped = matches!(
                mode,
                NetworkMode::Nat | NetworkMode::Host | NetworkMode::Bridged(_)
            );
            assert_eq!(d.needs_net_admin(), tapped, "{mode}");
            assert_eq!(
                d.enforces_policy(),
                tapped || *mode == NetworkMode::None,
                "{mode}"
            );
            assert_eq!(d.has_device(), *mode != NetworkMode::None, "{mode}");
            assert_eq!(
                d.image_may_ask(),
                !matches!(mode, NetworkMode::Bridged(_)),
                "{mode}"
            );
            let publishes = matches!(mode, NetworkMode::Nat | NetworkMode::User);
            assert_eq!(mode.supports_publish(), publishes, "{mode}");
            assert_eq!(
                d.publishing() == Publishing::Forwarded,
                *mode == NetworkMode::User,
                "{mode}"
            );
        }
        assert_eq!(
            of(&NetworkMode::User).ssh_route(),
            SshRoute::LoopbackForward
        );
        assert_eq!(of(&NetworkMode::None).ssh_route(), SshRoute::Unreachable);
        assert_eq!(of(&NetworkMode::Nat).ssh_route(), SshRoute::Address);
    }
}
