//! `run.json`: what the supervisor of a running VM publishes for other
//! commands. It is only trusted while the VM lock is held; a stale file from a
//! killed supervisor is ignored and replaced by the next run.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::hypervisor::accel::Accel;
use crate::network::NetworkMode;
use crate::network::publish::PortMapping;
use crate::util::atomic::write_private;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunState {
    /// The supervisor process.
    pub pid: u32,
    pub qemu_pid: u32,
    pub accelerator: Accel,
    /// The mode this run uses (the saved one or the `--network` override).
    pub network_mode: NetworkMode,
    /// Unix time the VM started.
    pub started_at: u64,
    /// The guest's address once known.
    #[serde(default)]
    pub ip_address: Option<String>,
    /// The host-side network device, if any.
    #[serde(default)]
    pub host_device: Option<String>,
    /// Ports published for this run.
    #[serde(default)]
    pub published: Vec<PortMapping>,
    /// The bridge or parent interface of the host device.
    #[serde(default)]
    pub parent: Option<String>,
    /// A limit of this network attachment.
    #[serde(default)]
    pub note: Option<String>,
    /// dnsmasq's lease file for NAT and host-only VMs.
    #[serde(default)]
    pub lease_file: Option<std::path::PathBuf>,
    /// The MAC address of this run.
    #[serde(default)]
    pub mac_address: Option<String>,
    /// Whether a program in the guest holds the guest agent's channel open
    /// (QEMU's VSERPORT_CHANGE events); `None` when not known.
    #[serde(default)]
    pub guest_agent: Option<bool>,
    /// Bridged on a plain interface: the macvlan on `parent` that joins the
    /// tap (`host_device`) to it, re-created when the parent returns. Runs
    /// started before lume did this have a macvtap as `host_device` instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uplink: Option<String>,
    /// The network policy this run enforces (the saved one or the run's).
    #[serde(
        default,
        skip_serializing_if = "crate::network::policy::Policy::is_empty"
    )]
    pub network_policy: crate::network::policy::Policy,
    /// The loopback port of the VM's VNC display (see hypervisor/vnc.rs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vnc_port: Option<u16>,
    /// The VNC password of this run: only in this 0600 file, shown as part
    /// of `vncUrl` to those who may read the VM's details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vnc_password: Option<String>,
    /// The directories shared with the guest in this run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shared_directories: Vec<crate::hypervisor::virtiofs::ShareState>,
}

impl RunState {
    /// Whether the supervisor this file names still exists.
    pub fn supervisor_alive(&self) -> bool {
        std::fs::read(format!("/proc/{}/cmdline", self.pid))
            .map(|c| String::from_utf8_lossy(&c).contains("lume"))
            .unwrap_or(false)
    }

    pub fn load(path: &Path) -> Option<Self> {
        let text = std::fs::read(path).ok()?;
        serde_json::from_slice(&text).ok()
    }

    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        write_private(
            path,
            &serde_json::to_vec_pretty(self).expect("state serialises"),
        )
    }
}
