//! VMDetails: the JSON shape of `lume ls -f json`, `lume get -f json` and the
//! HTTP API, following lume's field names. Every key is always present.

use serde::Serialize;

use super::store::{Store, Vm};
use std::os::unix::fs::MetadataExt as _;

/// lume's `diskSize` object: bytes really used, and the disk's size.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct DiskSize {
    pub allocated: u64,
    pub total: u64,
}

/// How the VM is (or, when stopped, will be) connected.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkDetails {
    /// The effective mode: the run's override while running, else the saved one.
    pub mode: String,
    /// The host-side device (tap or macvtap) while running.
    pub host_device: Option<String>,
    /// The bridge or parent interface the device is attached to.
    pub parent: Option<String>,
    /// Published ports as `[HOST_IP:]HOST_PORT:GUEST_PORT/PROTO`.
    pub published_ports: Vec<String>,
    /// A limit worth knowing about this mode.
    pub note: Option<String>,
    /// Bridged on a plain interface while running: `attached`,
    /// `waiting-for-parent` (the parent interface is gone; the VM is
    /// re-attached when it is back) or `reattaching`.
    pub attachment: Option<String>,
    /// The network policy: the run's while running, else the saved one;
    /// `null` when there is none (docs/networking.md).
    #[schema(value_type = Option<Object>)]
    pub policy: Option<crate::network::policy::Policy>,
    /// With a policy, while running: whether it holds now — its filter is
    /// attached to the VM's tap (checked at every read), or the VM runs in
    /// mode `none` (no network: nothing leaves). `false` means the VM's
    /// traffic is not filtered: stop it. `null` without a policy, and when
    /// the VM is stopped: `policy` is then the saved one, enforced from the
    /// next start (a start whose filter cannot be attached fails); also
    /// `null` when lume cannot tell: a user without CAP_NET_ADMIN looking at
    /// a VM whose network the lume service set up (the kernel lists a tap's
    /// tcx programs to CAP_NET_ADMIN only; the service's keeper guards it).
    pub policy_in_force: Option<bool>,
    /// While running: the saved policy when it differs from the run's
    /// (changed with `set` during the run, or the run was given its own),
    /// which the next start enforces; `{}` when the saved one is none.
    /// `null` when stopped (then `policy` is the saved one) or when they
    /// are the same.
    #[schema(value_type = Option<Object>)]
    pub saved_policy: Option<crate::network::policy::Policy>,
}

/// Whether the run's policy holds now: its filter is on its tap, or the
/// VM runs with no network at all (mode `none`: nothing leaves).
pub(crate) fn policy_in_force(s: &crate::vm::state::RunState) -> Option<bool> {
    if s.network_policy.is_empty() {
        return None;
    }
    if !crate::network::driver::of(&s.network_mode).has_device() {
        return Some(true);
    }
    let tap = s.host_device.as_deref()?;
    let mut nl = crate::network::kernel::netlink::Netlink::open().ok()?;
    match crate::network::policy::tc::in_force(&mut nl, tap) {
        Ok(held) => Some(held),
        // Listing a tap's tcx programs needs CAP_NET_ADMIN: a user looking
        // at a VM whose network the lume service set up cannot tell (the
        // service's keeper guards it); unknown, not "not in force".
        Err(crate::network::kernel::netlink::NetlinkError::Kernel {
            errno: nix::errno::Errno::EPERM,
            ..
        }) => None,
        Err(_) => Some(false),
    }
}

/// The guest's address as far as it is known now: dnsmasq's lease of this
/// run (NAT, host-only), the DHCP exchange lume watched (bridged) or the
/// neighbour table, or the address user mode always gives.
pub(crate) fn guest_address(s: &crate::vm::state::RunState) -> Option<std::net::IpAddr> {
    if let (Some(file), Some(mac)) = (&s.lease_file, s.mac_address) {
        let now = crate::util::time::unix_now();
        let leased = crate::network::dnsmasq::current_lease(file, mac, s.started_at, now)
            .map(std::net::IpAddr::V4);
        // A run restored from a memory snapshot: the guest keeps the
        // address it had, which dnsmasq may not know until it renews.
        return leased.or(s.ip_address);
    }
    if s.ip_address.is_some() {
        return s.ip_address;
    }
    crate::network::driver::of(&s.network_mode).unrecorded_address(s)
}

/// How a bridged run's macvlan stands now (see [`crate::network::uplink`]).
fn attachment(s: &crate::vm::state::RunState) -> Option<String> {
    let (parent, uplink) = (s.parent.as_deref()?, s.uplink.as_deref()?);
    let mut nl = crate::network::kernel::netlink::Netlink::open().ok()?;
    crate::network::uplink::status(&mut nl, parent, uplink)
        .ok()
        .map(|st| st.as_str().to_string())
}

fn mode_note(mode: &crate::network::NetworkMode) -> Option<String> {
    crate::network::driver::of(mode)
        .details_note()
        .map(String::from)
}

/// `provisioningOperation` while an image is imported.
pub const PROVISIONING_IMAGE_IMPORT: &str = "image_import";

/// A VM's `status`, written as lume writes it (lowercase).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum VmStatus {
    /// Its supervisor holds it and run.json is there.
    Running,
    Stopped,
    /// Its image is being imported (`provisioningOperation` says how).
    Provisioning,
    /// It is being pulled from a registry (as lume's server), with
    /// `downloadProgress`.
    Pulling,
    /// Its config cannot be read (`error` says why).
    Invalid,
}

impl VmStatus {
    /// The word in VMDetails and in `lume ls`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Stopped => "stopped",
            Self::Provisioning => "provisioning",
            Self::Pulling => "pulling",
            Self::Invalid => "invalid",
        }
    }
}

impl std::fmt::Display for VmStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// lume's `SharedDirectory` (`hostPath`, `tag`, `readOnly`): the shape of
/// `sharedDirectories` entries: the running VM's shares (empty when stopped).
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SharedDirectory {
    pub host_path: String,
    pub tag: String,
    pub read_only: bool,
}

/// One VM as reported to users: exactly the JSON of `lume get NAME -f json`
/// (which prints it inside a one-element array, as lume does), every key
/// always present. lume's keys come first, in lume's order (VMDetails.swift);
/// ours follow.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct VmDetails {
    pub name: String,
    pub os: Option<String>,
    pub cpu_count: Option<u32>,
    pub memory_size: Option<u64>,
    pub disk_size: Option<DiskSize>,
    pub display: Option<String>,
    /// `running`, `stopped`, `provisioning` while its image is imported,
    /// `pulling` while it is pulled from a registry (as lume's server), or
    /// `invalid` when the config cannot be read.
    pub status: VmStatus,
    /// What is being done while `provisioning` (`image_import`); null
    /// otherwise.
    pub provisioning_operation: Option<String>,
    /// lume's VNC address while running, `vnc://:PASSWORD@127.0.0.1:PORT`;
    /// null when stopped.
    pub vnc_url: Option<String>,
    pub ip_address: Option<String>,
    pub ssh_available: Option<bool>,
    pub location_name: String,
    /// lume's shared directories of the running VM; empty when stopped.
    pub shared_directories: Vec<SharedDirectory>,
    pub network_mode: Option<String>,
    /// lume's pull progress: while `lume pull` downloads, how much of the
    /// image's blobs is there, 0 to 100; null otherwise.
    pub download_progress: Option<f64>,
    pub mac_address: Option<String>,
    /// lume for Linux: the guest's global IPv6 addresses the host knows
    /// (nat and host-only networks with IPv6: the host's neighbour table;
    /// bridged: what the guest announced on the LAN); empty otherwise.
    pub ipv6_addresses: Vec<String>,
    /// The accelerator of the running VM.
    pub accelerator: Option<String>,
    /// Network details; null when the config cannot be read.
    pub network: Option<NetworkDetails>,
    /// Why the VM is `invalid`; null otherwise.
    pub error: Option<String>,
    /// Ours: the names of the VM's snapshots, oldest first
    /// (docs/snapshots.md).
    pub snapshots: Vec<String>,
    /// Ours: `true` while the VM runs with `--ephemeral` (its disk changes
    /// are discarded when it stops); absent otherwise.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub ephemeral: bool,
}

impl VmDetails {
    /// Reads one VM's details; a config that cannot be read gives status `invalid`.
    pub fn read(store: &Store, vm: &Vm) -> Self {
        let (mut d, probe) = Self::read_unprobed(store, vm);
        if let Some(p) = probe {
            d.ssh_available = Some(p.run());
        }
        d
    }

    /// [`Self::read`] but for `sshAvailable` of a running VM: the probe
    /// that gives it, to run (`None` when the VM is not running).
    fn read_unprobed(store: &Store, vm: &Vm) -> (Self, Option<SshProbe>) {
        let state = vm.running_state();
        let mut d = VmDetails {
            name: vm.name.to_string(),
            os: None,
            cpu_count: None,
            memory_size: None,
            disk_size: None,
            display: None,
            status: if state.is_some() {
                VmStatus::Running
            } else if crate::vm::lock::VmLock::is_held(
                &vm.dir.join(crate::vm::actions::PROVISIONING_MARKER),
            )
            .unwrap_or(false)
            {
                VmStatus::Provisioning
            } else {
                VmStatus::Stopped
            },
            provisioning_operation: None,
            vnc_url: None,
            ip_address: None,
            ipv6_addresses: Vec::new(),
            ssh_available: None,
            location_name: store.location_name(),
            shared_directories: Vec::new(),
            network_mode: None,
            download_progress: None,
            mac_address: None,
            accelerator: None,
            network: None,
            error: None,
            snapshots: crate::vm::snapshot::list(&vm.dir)
                .into_iter()
                .map(|s| s.name)
                .collect(),
            ephemeral: state.is_some() && crate::vm::snapshot::running_ephemeral(&vm.dir),
        };
        if d.status == VmStatus::Provisioning {
            d.download_progress = crate::registry::pull::read_progress(&vm.dir);
            if d.download_progress.is_some() {
                // Being pulled: lume's `pulling`, with `downloadProgress`.
                d.status = VmStatus::Pulling;
            } else {
                d.provisioning_operation = Some(PROVISIONING_IMAGE_IMPORT.into());
            }
        }
        let cfg = match vm.load_config() {
            Ok(c) => c,
            Err(e) => {
                d.status = VmStatus::Invalid;
                d.error = Some(crate::error_chain(&e));
                return (d, None);
            }
        };
        // The disk itself, never what a link there points to.
        let disk = std::fs::symlink_metadata(vm.disk_path())
            .ok()
            .filter(|m| m.is_file());
        d.os = Some(cfg.os.clone());
        d.cpu_count = Some(cfg.cpu_count);
        d.memory_size = Some(cfg.memory_size);
        d.disk_size = Some(DiskSize {
            // disk.img and, once layered, its layers, snapshots' memory
            // files and the metadata in snapshots/.
            allocated: disk.as_ref().map_or(0, |m| m.blocks() * 512)
                + crate::vm::snapshot::allocated_bytes(&vm.dir),
            total: disk.as_ref().map_or(cfg.disk_size, |m| m.len()),
        });
        d.display = Some(cfg.display.clone());
        d.network_mode = Some(cfg.network_mode.to_string());
        d.mac_address = cfg.mac_address.map(|m| m.to_string());
        let (mode, published) = match &state {
            Some(s) => (&s.network_mode, &s.published),
            None => (&cfg.network_mode, &cfg.publish),
        };
        d.network = Some(NetworkDetails {
            mode: mode.to_string(),
            host_device: state.as_ref().and_then(|s| s.host_device.clone()),
            parent: state.as_ref().and_then(|s| s.parent.clone()),
            published_ports: published.iter().map(|p| p.to_string()).collect(),
            note: state
                .as_ref()
                .and_then(|s| s.note.clone())
                .or_else(|| mode_note(mode)),
            attachment: state.as_ref().and_then(attachment),
            policy: Some(match &state {
                Some(s) => s.network_policy.clone(),
                None => cfg.network_policy.clone(),
            })
            .filter(|p| !p.is_empty()),
            policy_in_force: state.as_ref().and_then(policy_in_force),
            saved_policy: state
                .as_ref()
                .filter(|s| s.network_policy != cfg.network_policy)
                .map(|_| cfg.network_policy.clone()),
        });
        if let Some(s) = state {
            if let (Some(port), Some(pw)) = (s.vnc_port, s.vnc_password.as_deref()) {
                d.vnc_url = Some(crate::hypervisor::vnc::url(port, pw));
            }
            d.shared_directories = s
                .shared_directories
                .iter()
                .map(|s| SharedDirectory {
                    host_path: s.host_path.clone(),
                    tag: s.tag.clone(),
                    read_only: s.read_only,
                })
                .collect();
            d.accelerator = Some(s.accelerator.to_string());
            let address = guest_address(&s);
            d.ip_address = address.map(|ip| ip.to_string());
            d.ipv6_addresses = crate::network::driver::of(&s.network_mode)
                .addresses_v6(&s, address.is_some())
                .iter()
                .map(ToString::to_string)
                .collect();
            // As lume: whether port 22 answers now (null when stopped).
            let target = crate::guest::reach::ssh_target(&s, address);
            return (
                d,
                Some(SshProbe {
                    mode: s.network_mode,
                    target,
                    dir: vm.dir.clone(),
                }),
            );
        }
        (d, None)
    }

    /// The details of many VMs: read in parallel, at most 32 at a time,
    /// then the SSH ports of every running VM probed all at once, so the
    /// probes' timeouts (each VM's at most [`SSH_PROBE_TIMEOUT`]) do not
    /// add up however many VMs run.
    ///
    /// [`SSH_PROBE_TIMEOUT`]: crate::guest::reach::SSH_PROBE_TIMEOUT
    pub fn read_all(store: &Store, vms: &[Vm]) -> Vec<Self> {
        let mut all = Vec::with_capacity(vms.len());
        let mut probes = Vec::new();
        for chunk in vms.chunks(32) {
            std::thread::scope(|scope| {
                let handles: Vec<_> = chunk
                    .iter()
                    .map(|vm| scope.spawn(move || Self::read_unprobed(store, vm)))
                    .collect();
                for (h, vm) in handles.into_iter().zip(chunk) {
                    let (d, probe) = h.join().unwrap_or_else(|_| Self::read_unprobed(store, vm));
                    if let Some(p) = probe {
                        probes.push((all.len(), p));
                    }
                    all.push(d);
                }
            });
        }
        // At most PROBES_AT_ONCE threads (each one socket) at a time.
        for chunk in probes.chunks(PROBES_AT_ONCE) {
            std::thread::scope(|scope| {
                let handles: Vec<_> = chunk
                    .iter()
                    .map(|(_, p)| {
                        std::thread::Builder::new()
                            .name("lume-ssh-probe".into())
                            .spawn_scoped(scope, move || p.run())
                    })
                    .collect();
                for (h, (at, p)) in handles.into_iter().zip(chunk) {
                    let answered = match h {
                        Ok(h) => h.join().unwrap_or(false),
                        Err(_) => p.run(),
                    };
                    all[*at].ssh_available = Some(answered);
                }
            });
        }
        all
    }
}

/// How many SSH probes [`VmDetails::read_all`] runs at once.
const PROBES_AT_ONCE: usize = 256;

/// The probe that gives a running VM's `sshAvailable`.
struct SshProbe {
    mode: crate::network::NetworkMode,
    /// Where the guest's SSH server is reached; `None`: nowhere yet (no
    /// address), so not available.
    target: Option<std::net::SocketAddr>,
    /// The VM's directory, where its supervisor records its own probes
    /// while the guest boots.
    dir: std::path::PathBuf,
}

impl SshProbe {
    fn run(&self) -> bool {
        use crate::guest::reach;
        self.target.is_some_and(|t| {
            reach::recorded(&self.dir, t)
                .unwrap_or_else(|| reach::ssh_answers(&self.mode, t, reach::ADDRESS_PROBE_TIMEOUT))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_written_as_lumes_lowercase_words() {
        for (status, word) in [
            (VmStatus::Running, "running"),
            (VmStatus::Stopped, "stopped"),
            (VmStatus::Provisioning, "provisioning"),
            (VmStatus::Pulling, "pulling"),
            (VmStatus::Invalid, "invalid"),
        ] {
            assert_eq!(serde_json::to_value(status).unwrap(), word);
            assert_eq!(status.to_string(), word);
        }
    }
}
