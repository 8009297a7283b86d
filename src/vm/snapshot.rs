//! Snapshots of a VM's disk (and, with `--memory`, of its whole running
//! state), ephemeral runs and clones from a snapshot. The design is in
//! docs/snapshots.md; in short:
//!
//! - `disk.img` stays the raw base. Once a VM has had a snapshot (or during
//!   an ephemeral run) QEMU opens it read-only and writes into qcow2
//!   *layers* in `snapshots/`, each with exactly one parent that lume
//!   records in its own metadata (`layer-<id>.json`), never in the qcow2
//!   header: QEMU gets the whole chain as explicit `-blockdev` nodes with
//!   `backing` set by lume, so no backing or data file named in a header
//!   is ever opened.
//! - `head.json` names the layer the VM writes into. A snapshot freezes
//!   the current head (`snap-<name>.json` names it) and puts a new, empty
//!   layer on top: O(1) in time and space on any filesystem.
//! - A memory snapshot also saves QEMU's state (`mem-<name>.state`, QMP
//!   `migrate` to a descriptor) while the guest is paused, so the frozen
//!   layer and the memory belong to the same instant.
//! - Every metadata file is written atomically (tmp + fsync + rename +
//!   fsync dir); a snapshot exists once its `snap-<name>.json` does, which
//!   is written last. Layers no metadata refers to are removed by
//!   [`collect`], so a kill at any step leaves at worst an unreferenced
//!   file that the next snapshot command removes.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::guest::agent::{Agent, AgentError};
use crate::hypervisor::qmp::{Qmp, QmpError};
use crate::util::atomic::write_private;
use crate::vm::lock::VmLock;

/// The folder of a VM's snapshots and layers (0700).
pub const SNAP_DIR: &str = "snapshots";
const HEAD: &str = "head.json";
const RESTORE: &str = "restore.json";
/// Exists while a memory snapshot has the guest paused (written before
/// QMP `stop`, removed after `cont`). Found with the snapshot lock free, it
/// means the command was killed: see [`resume_abandoned`].
const PAUSED: &str = "paused-by-snapshot";
/// Held for the whole of a snapshot command, so two never interleave.
const SNAP_LOCK: &str = ".snap.lock";
/// Longest snapshot name.
pub const MAX_NAME: usize = 64;
/// Most qcow2 layers in one chain (above `disk.img`). QEMU's start time
/// grows steeply with the chain (measured under TCG, empty layers: 64 add
/// ~0.04 s, 128 ~0.4 s, 256 ~4.5 s, 512 ~31 s), so a snapshot or restore
/// that would go beyond this is refused before anything is written.
pub const MAX_CHAIN: usize = 64;
const MAX_META: u64 = 64 << 10;
/// The QEMU node name of `disk.img`.
const BASE_NODE: &str = "base";
const EPHEMERAL_NODE: &str = "ephemeral";

/// Why a snapshot operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(
        "Invalid snapshot name '{0}': use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
    )]
    InvalidName(String),
    #[error("{}", self.message(Door::Cli))]
    NotFound { vm: String, snap: String },
    #[error("VM '{vm}' already has a snapshot '{snap}': choose another name or delete it first")]
    Exists { vm: String, snap: String },
    #[error(
        "VM '{0}' is busy: it is starting, stopping or another snapshot command runs; try again in a moment"
    )]
    Busy(String),
    #[error("{}", self.message(Door::Cli))]
    NeedsAgent { vm: String, reason: String },
    #[error("{}", self.message(Door::Cli))]
    MemoryNeedsRunning(String),
    #[error("{}", self.message(Door::Cli))]
    MemoryWithShares(String),
    #[error("{}", self.message(Door::Cli))]
    Ephemeral(String),
    #[error("{}", self.message(Door::Cli))]
    Layered {
        vm: String,
        what: &'static str,
        layers: usize,
        snapshots: usize,
    },
    #[error("{}", self.message(Door::Cli))]
    ConfigChanged {
        vm: String,
        snap: String,
        /// CPU count and memory size the snapshot was taken with.
        was: (u32, u64),
        /// The VM's settings now.
        now: (u32, u64),
    },
    #[error("{}", self.message(Door::Cli))]
    NetworkChanged {
        vm: String,
        snap: String,
        /// The mode then and now.
        modes: Box<(String, String)>,
        ip: std::net::IpAddr,
    },
    #[error("{}", self.message(Door::Cli))]
    AddressInUse {
        vm: String,
        snap: String,
        ip: std::net::IpAddr,
        other: String,
    },
    #[error("{}", self.message(Door::Cli))]
    RestoreEphemeral(String),
    #[error("{}", self.message(Door::Cli))]
    FlattenSnapshots { vm: String, count: usize },
    #[error("{}", self.message(Door::Cli))]
    FlattenRunning(String),
    #[error(
        "Too many disk layers in a row in VM '{vm}' ({depth}; at most {max}): every snapshot adds one, and deleting snapshots does not merge them; restore an earlier snapshot (its chain is shorter) or flatten the VM's disk with `lume snapshot flatten {vm}`"
    )]
    ChainTooLong {
        vm: String,
        depth: usize,
        max: usize,
    },
    #[error(
        "Layer {path} is not one lume can use ({reason}): the VM's snapshot data is damaged; restore it from a backup or delete the VM's snapshots"
    )]
    BadLayer { path: PathBuf, reason: String },
    #[error("qemu-img was not found: install the qemu-utils package (apt-get install qemu-utils)")]
    QemuImgMissing,
    #[error("qemu-img failed on {path}: {message}")]
    QemuImg { path: PathBuf, message: String },
    #[error("QEMU refused the snapshot: see the VM's qemu.log")]
    Qmp(#[source] QmpError),
    #[error("The guest agent failed while freezing or thawing the guest's filesystems")]
    Agent(#[source] AgentError),
    #[error("Saving or loading the VM's memory failed ({0}); see the VM's qemu.log")]
    Migration(String),
    #[error("Cannot use {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

pub use super::Door;

impl Door {
    fn list(self, vm: &str) -> String {
        match self {
            Door::Cli => format!("`lume snapshot list {vm}`"),
            Door::Api => format!("GET /lume/vms/{vm}/snapshots"),
            Door::Mcp => "lume_snapshot_list".into(),
        }
    }
    fn stop(self, vm: &str) -> String {
        match self {
            Door::Cli => format!("`lume stop {vm}`"),
            Door::Api => format!("POST /lume/vms/{vm}/stop"),
            Door::Mcp => "lume_stop_vm".into(),
        }
    }
    fn run(self, vm: &str) -> String {
        match self {
            Door::Cli => format!("`lume run {vm}`"),
            Door::Api => format!("POST /lume/vms/{vm}/run"),
            Door::Mcp => "lume_run_vm".into(),
        }
    }
    fn flatten(self, vm: &str) -> String {
        match self {
            Door::Cli => format!("`lume snapshot flatten {vm}`"),
            Door::Api => format!("POST /lume/vms/{vm}/flatten"),
            Door::Mcp => "lume_snapshot_flatten".into(),
        }
    }
    fn clone_from(self, vm: &str) -> String {
        match self {
            Door::Cli => format!("`lume clone {vm} NEW --snapshot SNAP`"),
            Door::Api => r#"POST /lume/vms/clone with "snapshot""#.into(),
            Door::Mcp => "lume_clone_vm with snapshot".into(),
        }
    }
    fn delete(self, vm: &str) -> String {
        match self {
            Door::Cli => format!("`lume snapshot delete {vm} SNAP`"),
            Door::Api => format!("DELETE /lume/vms/{vm}/snapshots/SNAP"),
            Door::Mcp => "lume_snapshot_delete".into(),
        }
    }
    /// A flag or request field that is a boolean: `--memory`.
    fn flag(self, name: &str) -> String {
        match self {
            Door::Cli => format!("--{name}"),
            Door::Api => format!(r#""{name}": true"#),
            Door::Mcp => format!("{name}: true"),
        }
    }
    fn set(self, vm: &str, cpu: u32, memory: u64) -> String {
        // Exact, in the largest unit that divides it (`lume set` parses it).
        let mem = [("GB", 1u64 << 30), ("MB", 1 << 20), ("KB", 1 << 10)]
            .iter()
            .find(|(_, u)| memory.is_multiple_of(*u) && memory >= *u)
            .map_or(format!("{memory}B"), |(n, u)| format!("{}{n}", memory / u));
        match self {
            Door::Cli => format!("`lume set {vm} --cpu {cpu} --memory {mem}`"),
            Door::Api => {
                format!(r#"PATCH /lume/vms/{vm} with {{"cpu": {cpu}, "memory": "{mem}"}}"#)
            }
            Door::Mcp => format!(
                r#"lume's CLI or REST API (no MCP tool changes them: PATCH /lume/vms/{vm} with {{"cpu": {cpu}, "memory": "{mem}"}})"#
            ),
        }
    }
    fn set_network(self, vm: &str, mode: &str) -> String {
        match self {
            Door::Cli => format!("`lume set {vm} --network {mode}`"),
            Door::Api => format!(r#"PATCH /lume/vms/{vm} with {{"network": "{mode}"}}"#),
            Door::Mcp => format!(
                r#"lume's CLI or REST API (no MCP tool changes it: PATCH /lume/vms/{vm} with {{"network": "{mode}"}})"#
            ),
        }
    }
}

fn layered_text(vm: &str, what: &str, layers: usize, snapshots: usize, door: Door) -> String {
    let disk = format!(
        "its disk is layered (disk.img plus {layers} layer{} in {SNAP_DIR}/)",
        if layers == 1 { "" } else { "s" }
    );
    if snapshots == 0 {
        format!(
            "VM '{vm}' has no snapshots, but {disk}: {what} needs a plain disk; make it plain with {} (the VM must be stopped; it merges the layers into disk.img)",
            door.flatten(vm)
        )
    } else {
        format!(
            "VM '{vm}' has {snapshots} snapshot{} and {disk}: {what} needs a plain disk; make a VM of its own from a snapshot with {}, or delete its snapshots ({}, then {}) and make the disk plain with {}",
            if snapshots == 1 { "" } else { "s" },
            door.clone_from(vm),
            door.list(vm),
            door.delete(vm),
            door.flatten(vm)
        )
    }
}

fn config_changed_text(
    vm: &str,
    snap: &str,
    was: (u32, u64),
    now: (u32, u64),
    door: Door,
) -> String {
    let cpus = |n: u32| format!("{n} CPU{}", if n == 1 { "" } else { "s" });
    let mem = crate::vm::size::format_size;
    let mut changed = Vec::new();
    if was.0 != now.0 {
        changed.push(format!(
            "CPU count ({} then, {} now)",
            cpus(was.0),
            cpus(now.0)
        ));
    }
    if was.1 != now.1 {
        changed.push(format!("memory ({} then, {} now)", mem(was.1), mem(now.1)));
    }
    format!(
        "Snapshot '{snap}' of VM '{vm}' holds the memory of the VM as it was then, and its {} changed since: set it back with {} before restoring it",
        changed.join(" and its "),
        door.set(vm, was.0, was.1)
    )
}

impl SnapshotError {
    /// The message as told through `door`: the same facts, with that
    /// door's commands.
    pub fn message(&self, door: Door) -> String {
        match self {
            SnapshotError::NotFound { vm, snap } => {
                format!("VM '{vm}' has no snapshot '{snap}': see {}", door.list(vm))
            }
            SnapshotError::NeedsAgent { vm, reason } => format!(
                "A disk snapshot of running VM '{vm}' needs the guest agent to freeze its filesystems ({reason}): install and start qemu-guest-agent in the guest, take the snapshot with {}, or stop the VM first",
                door.flag("memory")
            ),
            SnapshotError::MemoryNeedsRunning(vm) => format!(
                "VM '{vm}' is not running: a memory snapshot needs a running VM; start it with {}, or leave out {}",
                door.run(vm),
                door.flag("memory")
            ),
            SnapshotError::MemoryWithShares(vm) => format!(
                "VM '{vm}' runs with shared directories (virtio-fs), whose state QEMU cannot save: stop it and run it without {} to take a memory snapshot, or take a disk snapshot (leave out {})",
                match door {
                    Door::Cli => "--shared-dir",
                    Door::Api => "sharedDirectories",
                    Door::Mcp => "shared_dir",
                },
                door.flag("memory")
            ),
            SnapshotError::Ephemeral(vm) => format!(
                "VM '{vm}' runs with {}: its changes are discarded at stop, so nothing of this run can be snapshotted; stop it and run it without {}",
                door.flag("ephemeral"),
                door.flag("ephemeral")
            ),
            SnapshotError::RestoreEphemeral(vm) => format!(
                "VM '{vm}' runs with {}: a restore would end the throwaway run and go on writing into the VM's own disk; stop it with {} (its changes are discarded), then restore",
                door.flag("ephemeral"),
                door.stop(vm)
            ),
            SnapshotError::Layered {
                vm,
                what,
                layers,
                snapshots,
            } => layered_text(vm, what, *layers, *snapshots, door),
            SnapshotError::ConfigChanged { vm, snap, was, now } => {
                config_changed_text(vm, snap, *was, *now, door)
            }
            SnapshotError::NetworkChanged {
                vm,
                snap,
                modes,
                ip,
            } => {
                let (was, now) = &**modes;
                format!(
                    "Snapshot '{snap}' of VM '{vm}' holds a guest that ran in network mode '{was}' (address {ip}); the VM is now set to '{now}', where that address does not work: set it back with {} before restoring its memory, or restore a disk snapshot (the guest then boots and gets a new address)",
                    door.set_network(vm, was)
                )
            }
            SnapshotError::AddressInUse {
                vm,
                snap,
                ip,
                other,
            } => format!(
                "Snapshot '{snap}' of VM '{vm}' resumes a guest that uses address {ip}, which running VM '{other}' has now (it got the lease while '{vm}' was stopped): stop '{other}' first ({}), or restore a disk snapshot (the guest then boots and gets a new address)",
                door.stop(other)
            ),
            SnapshotError::FlattenSnapshots { vm, count } => format!(
                "VM '{vm}' still has {count} snapshot(s), which need the layers of its disk: delete them first ({}, then {}), then flatten",
                door.list(vm),
                door.delete(vm)
            ),
            SnapshotError::FlattenRunning(vm) => format!(
                "VM '{vm}' is running or starting: flattening rewrites its disk; stop it with {} first",
                door.stop(vm)
            ),
            e => crate::error_chain(e),
        }
    }
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One snapshot, as `snap-<name>.json` records it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    pub name: String,
    /// The frozen layer holding the disk at that moment; null: `disk.img`.
    pub layer: Option<String>,
    /// Unix time.
    pub created_at: u64,
    /// Whether the VM's memory was saved too.
    pub memory: bool,
    pub cpu_count: u32,
    pub memory_size: u64,
    /// A memory snapshot: when the run it was taken from started. A
    /// restored run continues that run (the guest keeps the DHCP lease it
    /// had then), so it counts from the same start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_started_at: Option<u64>,
    /// A memory snapshot: the guest's address then (it keeps it).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::vm::state::lenient"
    )]
    #[schema(value_type = Option<String>)]
    pub ip_address: Option<std::net::IpAddr>,
    /// A memory snapshot: the VM's network mode then (a restore in
    /// another mode is refused: the guest's address would not work there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_mode: Option<String>,
    /// Bytes this snapshot holds on the host's disk: its frozen layer and
    /// its memory file (0 for a snapshot of `disk.img` itself, which the
    /// VM's disk counts). Filled in when snapshots are listed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated_size: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
struct LayerMeta {
    parent: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Head {
    top: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct PendingRestore {
    snapshot: String,
}

/// Checks a snapshot name: it becomes part of file names.
pub fn validate_name(name: &str) -> Result<(), SnapshotError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(SnapshotError::InvalidName(name.to_string()))
    }
}

fn valid_id(id: &str) -> bool {
    id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

fn snap_dir(vm_dir: &Path) -> PathBuf {
    vm_dir.join(SNAP_DIR)
}

fn layer_path(vm_dir: &Path, id: &str) -> PathBuf {
    snap_dir(vm_dir).join(format!("layer-{id}.qcow2"))
}

fn layer_meta_path(vm_dir: &Path, id: &str) -> PathBuf {
    snap_dir(vm_dir).join(format!("layer-{id}.json"))
}

fn snap_path(vm_dir: &Path, name: &str) -> PathBuf {
    snap_dir(vm_dir).join(format!("snap-{name}.json"))
}

fn memory_path(vm_dir: &Path, name: &str) -> PathBuf {
    snap_dir(vm_dir).join(format!("mem-{name}.state"))
}

fn node_name(layer: Option<&str>) -> String {
    match layer {
        Some(id) => format!("layer-{id}"),
        None => BASE_NODE.to_string(),
    }
}

/// Creates `snapshots/` (0700) or checks that it is lume's own directory.
fn ensure_dir(vm_dir: &Path) -> Result<PathBuf, SnapshotError> {
    let d = snap_dir(vm_dir);
    match fs::symlink_metadata(&d) {
        Ok(m) if m.file_type().is_dir() && m.uid() == nix::unistd::geteuid().as_raw() => Ok(d),
        Ok(_) => Err(SnapshotError::BadLayer {
            path: d,
            reason: "not a directory of lume's own".into(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            use std::os::unix::fs::DirBuilderExt;
            fs::DirBuilder::new()
                .mode(0o700)
                .create(&d)
                .map_err(io_at(&d))?;
            sync_dir(vm_dir)?;
            Ok(d)
        }
        Err(e) => Err(SnapshotError::Io { path: d, source: e }),
    }
}

fn sync_dir(dir: &Path) -> Result<(), SnapshotError> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io_at(dir))
}

/// Reads a small JSON file lume wrote, never through a symlink or a FIFO.
fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, SnapshotError> {
    let f = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(SnapshotError::Io {
                path: path.into(),
                source: e,
            });
        }
    };
    let meta = f.metadata().map_err(io_at(path))?;
    if !meta.file_type().is_file() || meta.len() > MAX_META {
        return Err(SnapshotError::BadLayer {
            path: path.into(),
            reason: "not a small regular file".into(),
        });
    }
    let mut text = String::new();
    f.take(MAX_META)
        .read_to_string(&mut text)
        .map_err(io_at(path))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| SnapshotError::BadLayer {
            path: path.into(),
            reason: e.to_string(),
        })
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), SnapshotError> {
    let text = serde_json::to_vec_pretty(value).expect("serializable");
    write_private(path, &text).map_err(io_at(path))
}

/// Whether the VM's disk is layered (it has had a snapshot): `disk.img` is
/// then only the base, read-only.
pub fn is_layered(vm_dir: &Path) -> bool {
    fs::symlink_metadata(snap_dir(vm_dir).join(HEAD)).is_ok()
}

fn read_head(vm_dir: &Path) -> Result<Option<String>, SnapshotError> {
    let head: Option<Head> = read_json(&snap_dir(vm_dir).join(HEAD))?;
    let top = head.and_then(|h| h.top);
    if let Some(id) = &top
        && !valid_id(id)
    {
        return Err(SnapshotError::BadLayer {
            path: snap_dir(vm_dir).join(HEAD),
            reason: format!("layer id '{id}'"),
        });
    }
    Ok(top)
}

fn write_head(vm_dir: &Path, top: Option<&str>) -> Result<(), SnapshotError> {
    write_json(
        &snap_dir(vm_dir).join(HEAD),
        &Head {
            top: top.map(str::to_string),
        },
    )
}

/// Checks a layer with lume's own reader: a regular file (not a link), a
/// qcow2 of version 2 or 3 with no external data file and not marked
/// corrupt. A backing file name in the header is never used (lume gives
/// QEMU the backing node itself).
pub fn check_qcow2(path: &Path) -> Result<(), SnapshotError> {
    let bad = |reason: &str| SnapshotError::BadLayer {
        path: path.into(),
        reason: reason.into(),
    };
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(io_at(path))?;
    if !f.metadata().map_err(io_at(path))?.file_type().is_file() {
        return Err(bad("not a regular file"));
    }
    let mut h = [0u8; 104];
    f.read_exact(&mut h).map_err(|_| bad("too short"))?;
    if &h[0..4] != b"QFI\xfb" {
        return Err(bad("not a qcow2 image"));
    }
    let version = u32::from_be_bytes(h[4..8].try_into().unwrap());
    if version == 3 {
        let incompatible = u64::from_be_bytes(h[72..80].try_into().unwrap());
        if incompatible & 0b10 != 0 {
            return Err(bad("marked corrupt"));
        }
        if incompatible & 0b100 != 0 {
            return Err(bad("has an external data file"));
        }
    } else if version != 2 {
        return Err(bad("unknown qcow2 version"));
    }
    Ok(())
}

/// The VM's name, for messages of functions that only get its folder.
fn vm_name(vm_dir: &Path) -> String {
    vm_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Refuses to put one more layer on a chain of `depth` layers.
fn check_room(vm: &str, depth: usize) -> Result<(), SnapshotError> {
    if depth + 1 > MAX_CHAIN {
        return Err(SnapshotError::ChainTooLong {
            vm: vm.into(),
            depth: depth + 1,
            max: MAX_CHAIN,
        });
    }
    Ok(())
}

/// The layers under `top`, from the one just above `disk.img` up to `top`.
fn chain(vm_dir: &Path, top: Option<&str>) -> Result<Vec<String>, SnapshotError> {
    let mut out = Vec::new();
    let mut cur = top.map(str::to_string);
    while let Some(id) = cur {
        let meta_path = layer_meta_path(vm_dir, &id);
        if out.len() >= MAX_CHAIN {
            return Err(SnapshotError::ChainTooLong {
                vm: vm_name(vm_dir),
                depth: out.len() + 1,
                max: MAX_CHAIN,
            });
        }
        if !valid_id(&id) || out.contains(&id) {
            return Err(SnapshotError::BadLayer {
                path: meta_path,
                reason: "broken layer chain".into(),
            });
        }
        let meta: LayerMeta = read_json(&meta_path)?.ok_or_else(|| SnapshotError::BadLayer {
            path: meta_path.clone(),
            reason: "missing".into(),
        })?;
        out.push(id);
        cur = meta.parent;
    }
    out.reverse();
    Ok(out)
}

fn qemu_img(args: &[&std::ffi::OsStr], path: &Path) -> Result<(), SnapshotError> {
    let out = Command::new("qemu-img").args(args).output().map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            SnapshotError::QemuImgMissing
        } else {
            SnapshotError::Io {
                path: path.into(),
                source: e,
            }
        }
    })?;
    if !out.status.success() {
        return Err(SnapshotError::QemuImg {
            path: path.into(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// An empty qcow2 of `size` bytes at `path` (0600, no backing file in its
/// header), fsynced.
fn new_qcow2(path: &Path, size: u64) -> Result<(), SnapshotError> {
    // Created 0600 first: qemu-img keeps the mode of the file it truncates.
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(io_at(path))?;
    let size = size.to_string();
    let made = qemu_img(
        &[
            "create".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            path.as_os_str(),
            size.as_ref(),
        ],
        path,
    );
    if let Err(e) = made {
        let _ = fs::remove_file(path);
        return Err(e);
    }
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io_at(path))
}

/// The virtual size of the VM's disk: the raw base's length (a VM with
/// snapshots cannot be resized).
fn disk_size(vm_dir: &Path) -> Result<u64, SnapshotError> {
    let p = vm_dir.join("disk.img");
    let m = fs::symlink_metadata(&p).map_err(io_at(&p))?;
    if !m.file_type().is_file() {
        return Err(SnapshotError::BadLayer {
            path: p,
            reason: "not a regular file".into(),
        });
    }
    Ok(m.len())
}

/// A new layer on top of `parent`, recorded in its metadata; its id.
fn new_layer(vm_dir: &Path, parent: Option<&str>) -> Result<String, SnapshotError> {
    let size = disk_size(vm_dir)?;
    let id = format!("{:016x}", crate::util::random::u64());
    let meta = LayerMeta {
        parent: parent.map(str::to_string),
    };
    // The metadata first: a layer file without it is garbage for `collect`.
    write_json(&layer_meta_path(vm_dir, &id), &meta)?;
    new_qcow2(&layer_path(vm_dir, &id), size)?;
    sync_dir(&snap_dir(vm_dir))?;
    Ok(id)
}

/// `-blockdev` JSON for one node.
fn blockdev(
    node: &str,
    driver: &str,
    file: &Path,
    read_only: bool,
    backing: Option<&str>,
) -> String {
    let mut v = json!({
        "driver": driver,
        "node-name": node,
        "read-only": read_only,
        "discard": "unmap",
        "file": {
            "driver": "file",
            "filename": file.display().to_string(),
            "read-only": read_only,
        },
    });
    if driver == "qcow2" {
        // lume names the backing node; `null` would mean "none", and a name
        // from the image header is never looked at.
        v["backing"] = match backing {
            Some(b) => json!(b),
            None => serde_json::Value::Null,
        };
    }
    v.to_string()
}

/// What one run's disk is: QEMU arguments and what to clean up after.
#[derive(Debug, Default)]
pub struct RunDisk {
    /// `-blockdev` nodes, the disk's `-device` and, for a memory restore,
    /// `-incoming defer`. Go after the network arguments (the virtio-blk
    /// device then keeps the PCI slot a `-drive if=virtio` had).
    pub args: Vec<String>,
    /// This run's throwaway top layer (`--ephemeral`).
    pub ephemeral: Option<PathBuf>,
    /// The memory state to load (`migrate-incoming`).
    pub incoming: Option<File>,
    /// When the run the memory state comes from started.
    pub incoming_started_at: Option<u64>,
    /// The guest's address in that run.
    pub incoming_ip: Option<std::net::IpAddr>,
    /// An ephemeral run: the VM's `known_hosts` as it was before (`None`:
    /// there was none). A guest that makes new SSH host keys during the run
    /// (a first boot) loses them at stop, so what `lume ssh` learned from
    /// them is forgotten too.
    known_hosts: Option<(PathBuf, Option<Vec<u8>>)>,
}

impl RunDisk {
    /// Removes the ephemeral layer, once QEMU is gone.
    pub fn finish(&self) {
        if let Some(p) = &self.ephemeral {
            let _ = fs::remove_file(p);
        }
        if let Some((path, before)) = &self.known_hosts {
            let _ = match before {
                Some(text) => write_private(path, text),
                None => fs::remove_file(path),
            };
        }
    }
}

/// Builds the disk of one run, with the VM lock held: removes ephemeral
/// layers a killed supervisor left, pins the layer chain as explicit nodes,
/// adds an ephemeral top layer when asked, and picks up a pending memory
/// restore.
pub fn prepare_run(vm_dir: &Path, ephemeral: bool) -> Result<RunDisk, SnapshotError> {
    let sd = snap_dir(vm_dir);
    // A new QEMU is never paused by a snapshot: a marker is from a run
    // that ended while a snapshot command was killed.
    let _ = fs::remove_file(sd.join(PAUSED));
    if let Ok(entries) = fs::read_dir(&sd) {
        for e in entries.flatten() {
            let n = e.file_name();
            let n = n.to_string_lossy();
            if n.starts_with("ephemeral-") && n.ends_with(".qcow2") {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    let top = read_head(vm_dir)?;
    let layers = chain(vm_dir, top.as_deref())?;
    let writable_base = layers.is_empty() && !ephemeral;
    let mut args = vec![
        "-blockdev".to_string(),
        blockdev(
            BASE_NODE,
            "raw",
            &vm_dir.join("disk.img"),
            !writable_base,
            None,
        ),
    ];
    let mut below = BASE_NODE.to_string();
    for (i, id) in layers.iter().enumerate() {
        let p = layer_path(vm_dir, id);
        check_qcow2(&p)?;
        let node = node_name(Some(id));
        let ro = ephemeral || i + 1 < layers.len();
        args.extend([
            "-blockdev".into(),
            blockdev(&node, "qcow2", &p, ro, Some(&below)),
        ]);
        below = node;
    }
    let mut run = RunDisk::default();
    if ephemeral {
        ensure_dir(vm_dir)?;
        let p = sd.join(format!(
            "ephemeral-{:016x}.qcow2",
            crate::util::random::u64()
        ));
        new_qcow2(&p, disk_size(vm_dir)?)?;
        args.extend([
            "-blockdev".into(),
            blockdev(EPHEMERAL_NODE, "qcow2", &p, false, Some(&below)),
        ]);
        below = EPHEMERAL_NODE.to_string();
        run.ephemeral = Some(p);
        let kh = vm_dir.join("known_hosts");
        // Only a file lume can hold whole is put back; anything else (too
        // big, not a regular file) is left as it is, never removed.
        run.known_hosts = match fs::symlink_metadata(&kh) {
            Ok(m) if m.file_type().is_file() && m.len() <= MAX_META => {
                Some((kh.clone(), Some(fs::read(&kh).map_err(io_at(&kh))?)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Some((kh, None)),
            _ => None,
        };
    }
    args.extend([
        "-device".into(),
        format!("virtio-blk-pci,drive={below},id=disk0"),
    ]);
    // A memory restore asked for by `snapshot restore`: used once.
    let marker = sd.join(RESTORE);
    if let Some(pending) = read_json::<PendingRestore>(&marker)? {
        let _ = fs::remove_file(&marker);
        let _ = sync_dir(&sd);
        validate_name(&pending.snapshot)?;
        // The memory belongs to the disk of its moment only: the head must
        // be the fresh layer `restore` put on the snapshot's own layer
        // (anything else, e.g. a restore killed half-way, boots cold).
        let snapshot = get(vm_dir, "", &pending.snapshot).ok();
        let head_parent = match read_head(vm_dir)? {
            Some(top) => read_json::<LayerMeta>(&layer_meta_path(vm_dir, &top))?.map(|m| m.parent),
            None => None,
        };
        let matches = snapshot
            .as_ref()
            .is_some_and(|s| s.memory && head_parent.as_ref() == Some(&s.layer));
        if !ephemeral && matches {
            let p = memory_path(vm_dir, &pending.snapshot);
            let f = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&p)
                .map_err(io_at(&p))?;
            run.incoming = Some(f);
            if let Some(s) = snapshot {
                run.incoming_started_at = s.run_started_at;
                run.incoming_ip = s.ip_address;
            }
            args.extend(["-incoming".into(), "defer".into()]);
        }
    }
    run.args = args;
    Ok(run)
}

/// Loads the memory state into a QEMU started with `-incoming defer` (and
/// `-S`): the guest stays paused until the supervisor lets it go on.
pub fn load_memory(qmp: &mut Qmp, state: &File) -> Result<(), SnapshotError> {
    qmp.send_fd("lume-incoming", state.as_raw_fd())
        .map_err(SnapshotError::Qmp)?;
    qmp.execute("migrate-incoming", Some(json!({"uri": "fd:lume-incoming"})))
        .map_err(SnapshotError::Qmp)?;
    wait_migration(qmp, Duration::from_secs(600))
}

fn wait_migration(qmp: &mut Qmp, within: Duration) -> Result<(), SnapshotError> {
    let until = Instant::now() + within;
    loop {
        let r = qmp
            .execute("query-migrate", None)
            .map_err(SnapshotError::Qmp)?;
        match r["status"].as_str().unwrap_or("") {
            "completed" => return Ok(()),
            "failed" | "cancelled" => {
                return Err(SnapshotError::Migration(
                    r["error-desc"]
                        .as_str()
                        .unwrap_or("migration failed")
                        .to_string(),
                ));
            }
            _ => {}
        }
        if Instant::now() > until {
            return Err(SnapshotError::Migration("timed out".into()));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Every complete snapshot, oldest first.
pub fn list(vm_dir: &Path) -> Vec<Snapshot> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(snap_dir(vm_dir)) else {
        return out;
    };
    for e in entries.flatten() {
        let n = e.file_name();
        let Some(n) = n.to_str() else { continue };
        let Some(name) = n
            .strip_prefix("snap-")
            .and_then(|s| s.strip_suffix(".json"))
        else {
            continue;
        };
        if validate_name(name).is_err() {
            continue;
        }
        if let Ok(Some(mut s)) = read_json::<Snapshot>(&e.path())
            && s.name == name
        {
            s.allocated_size = Some(snapshot_allocated(vm_dir, &s));
            out.push(s);
        }
    }
    out.sort_by(|a, b| (a.created_at, &a.name).cmp(&(b.created_at, &b.name)));
    out
}

/// One snapshot.
pub fn get(vm_dir: &Path, vm: &str, name: &str) -> Result<Snapshot, SnapshotError> {
    validate_name(name)?;
    match read_json::<Snapshot>(&snap_path(vm_dir, name))? {
        Some(s) if s.name == name => Ok(s),
        _ => Err(SnapshotError::NotFound {
            vm: vm.into(),
            snap: name.into(),
        }),
    }
}

/// Removes layers and memory files that nothing refers to any more (left
/// by a deletion, a restore or an interrupted command). Runs with the
/// snapshot lock held.
fn collect(vm_dir: &Path) -> Result<(), SnapshotError> {
    let sd = snap_dir(vm_dir);
    let mut keep: HashSet<String> = HashSet::new();
    let snaps = list(vm_dir);
    let mut tops: Vec<Option<String>> = snaps.iter().map(|s| s.layer.clone()).collect();
    tops.push(read_head(vm_dir)?);
    for t in tops {
        for id in chain(vm_dir, t.as_deref())? {
            keep.insert(id);
        }
    }
    let names: HashSet<&str> = snaps.iter().map(|s| s.name.as_str()).collect();
    let Ok(entries) = fs::read_dir(&sd) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let n = e.file_name();
        let Some(n) = n.to_str() else { continue };
        let layer = n
            .strip_prefix("layer-")
            .and_then(|s| s.strip_suffix(".qcow2").or_else(|| s.strip_suffix(".json")));
        let mem = n
            .strip_prefix("mem-")
            .and_then(|s| s.strip_suffix(".state"));
        let drop = match (layer, mem) {
            (Some(id), _) => !keep.contains(id),
            (_, Some(name)) => !names.contains(name),
            _ => n.starts_with(".") && n.contains(".tmp-"),
        };
        if drop {
            let _ = fs::remove_file(e.path());
        }
    }
    sync_dir(&sd)
}

/// The snapshot lock, or `Busy`.
fn snap_lock(vm_dir: &Path, vm: &str) -> Result<VmLock, SnapshotError> {
    let p = vm_dir.join(SNAP_LOCK);
    VmLock::acquire_within(&p, Duration::from_secs(10))
        .map_err(io_at(&p))?
        .ok_or_else(|| SnapshotError::Busy(vm.into()))
}

/// Whether this run of the VM is an ephemeral one.
pub fn running_ephemeral(vm_dir: &Path) -> bool {
    fs::read_dir(snap_dir(vm_dir))
        .map(|it| {
            it.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("ephemeral-"))
        })
        .unwrap_or(false)
}

/// What `create` needs to know about the VM.
pub struct Target<'a> {
    pub name: &'a str,
    pub dir: &'a Path,
    pub lock: &'a Path,
    /// Running: whether the guest agent's channel is open (run.json).
    pub running: Option<Option<bool>>,
    /// Running: when this run started (run.json).
    pub started_at: Option<u64>,
    /// Running: the guest's address, if known.
    pub ip_address: Option<std::net::IpAddr>,
    /// Running: the run's network mode.
    pub network_mode: Option<String>,
    pub cpu_count: u32,
    pub memory_size: u64,
}

/// Takes a snapshot. A stopped VM: the head is frozen and a new layer put
/// on top. A running VM: the same live (QMP `blockdev-snapshot`), with the
/// guest's filesystems frozen by its agent, or with the guest paused and
/// its memory saved (`memory`).
pub fn create(t: &Target<'_>, name: &str, memory: bool) -> Result<Snapshot, SnapshotError> {
    validate_name(name)?;
    let _snap = snap_lock(t.dir, t.name)?;
    if fs::symlink_metadata(snap_path(t.dir, name)).is_ok() {
        return Err(SnapshotError::Exists {
            vm: t.name.into(),
            snap: name.into(),
        });
    }
    // Stopped: hold the VM lock so no start races in.
    let vm_lock = match t.running {
        None => Some(
            VmLock::try_acquire(t.lock)
                .map_err(io_at(t.lock))?
                .ok_or_else(|| SnapshotError::Busy(t.name.into()))?,
        ),
        Some(_) => None,
    };
    if vm_lock.is_some() && memory {
        return Err(SnapshotError::MemoryNeedsRunning(t.name.into()));
    }
    ensure_dir(t.dir)?;
    let _ = collect(t.dir);
    if t.running.is_some() && running_ephemeral(t.dir) {
        return Err(SnapshotError::Ephemeral(t.name.into()));
    }
    let old = read_head(t.dir)?;
    check_room(t.name, chain(t.dir, old.as_deref())?.len())?;
    let new = new_layer(t.dir, old.as_deref())?;
    let snap = Snapshot {
        name: name.into(),
        layer: old.clone(),
        created_at: crate::util::time::unix_now(),
        memory,
        cpu_count: t.cpu_count,
        memory_size: t.memory_size,
        run_started_at: if memory { t.started_at } else { None },
        ip_address: if memory { t.ip_address } else { None },
        network_mode: if memory { t.network_mode.clone() } else { None },
        allocated_size: None,
    };
    if let Some(agent_open) = t.running {
        live(t, &snap, old.as_deref(), &new, agent_open)?;
    } else {
        write_head(t.dir, Some(&new))?;
    }
    // Complete, and listed, from here on.
    write_json(&snap_path(t.dir, name), &snap)?;
    let mut snap = snap;
    snap.allocated_size = Some(snapshot_allocated(t.dir, &snap));
    Ok(snap)
}

/// The live part of `create`.
fn live(
    t: &Target<'_>,
    snap: &Snapshot,
    old: Option<&str>,
    new: &str,
    agent_open: Option<bool>,
) -> Result<(), SnapshotError> {
    let mut qmp = Qmp::connect(t.dir).map_err(SnapshotError::Qmp)?;
    let undo_layer = |e: SnapshotError| {
        let _ = fs::remove_file(layer_path(t.dir, new));
        let _ = fs::remove_file(layer_meta_path(t.dir, new));
        e
    };
    let mut agent = None;
    // Ctrl-C or a SIGTERM of this command waits until the guest runs again
    // (a kill -9 is caught by the marker: see `resume_abandoned`).
    let _held = snap.memory.then(HeldSignals::hold);
    let paused = snap_dir(t.dir).join(PAUSED);
    if snap.memory {
        write_private(&paused, b"")
            .map_err(io_at(&paused))
            .map_err(undo_layer)?;
        if let Err(e) = qmp.execute("stop", None) {
            let _ = fs::remove_file(&paused);
            return Err(undo_layer(SnapshotError::Qmp(e)));
        }
    } else {
        if agent_open != Some(true) {
            return Err(undo_layer(SnapshotError::NeedsAgent {
                vm: t.name.into(),
                reason: "no agent has opened its channel".into(),
            }));
        }
        let mut a = Agent::connect_in(t.dir).map_err(|e| {
            undo_layer(SnapshotError::NeedsAgent {
                vm: t.name.into(),
                reason: crate::error_chain(&e),
            })
        })?;
        a.fsfreeze(true, Duration::from_secs(10)).map_err(|e| {
            undo_layer(SnapshotError::NeedsAgent {
                vm: t.name.into(),
                reason: crate::error_chain(&e),
            })
        })?;
        agent = Some(a);
    }
    let resume = |qmp: &mut Qmp, agent: &mut Option<Agent>| {
        if let Some(a) = agent.as_mut() {
            let _ = a.fsfreeze(false, Duration::from_secs(10));
        } else {
            let _ = cont(qmp, t.dir);
        }
    };
    // head.json first: if QEMU then fails to switch, the new layer is an
    // empty one above the layer QEMU still writes, which is consistent.
    if let Err(e) = write_head(t.dir, Some(new)) {
        resume(&mut qmp, &mut agent);
        return Err(undo_layer(e));
    }
    let node = node_name(Some(new));
    let switched = qmp
        .execute(
            "blockdev-add",
            Some(json!({
                "driver": "qcow2",
                "node-name": node,
                "discard": "unmap",
                "backing": null,
                "file": {"driver": "file", "filename": layer_path(t.dir, new).display().to_string()},
            })),
        )
        .and_then(|_| {
            qmp.execute(
                "blockdev-snapshot",
                Some(json!({"node": node_name(old), "overlay": node})),
            )
        });
    if let Err(e) = switched {
        let _ = write_head(t.dir, old);
        let _ = qmp.execute("blockdev-del", Some(json!({"node-name": node})));
        resume(&mut qmp, &mut agent);
        return Err(undo_layer(SnapshotError::Qmp(e)));
    }
    if !snap.memory {
        if let Some(a) = agent.as_mut() {
            a.fsfreeze(false, Duration::from_secs(10))
                .map_err(SnapshotError::Agent)?;
        }
        return Ok(());
    }
    let saved = save_memory(&mut qmp, &memory_path(t.dir, &snap.name));
    let _ = cont(&mut qmp, t.dir);
    saved
}

/// Lets a guest paused by a memory snapshot go on, and removes the marker.
fn cont(qmp: &mut Qmp, vm_dir: &Path) -> Result<(), SnapshotError> {
    qmp.execute("cont", None).map_err(SnapshotError::Qmp)?;
    let _ = fs::remove_file(snap_dir(vm_dir).join(PAUSED));
    Ok(())
}

/// SIGINT, SIGTERM and SIGHUP held back on this thread while a guest is
/// paused; one that came meanwhile takes effect when this is dropped (after
/// `cont`). In a process with other threads that do not block them, they
/// may be delivered there instead: the marker covers that case too.
struct HeldSignals(Option<nix::sys::signal::SigSet>);

impl HeldSignals {
    fn hold() -> Self {
        use nix::sys::signal::{SigSet, SigmaskHow, Signal};
        let mut set = SigSet::empty();
        for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
            set.add(s);
        }
        Self(set.thread_swap_mask(SigmaskHow::SIG_BLOCK).ok())
    }
}

impl Drop for HeldSignals {
    fn drop(&mut self) {
        if let Some(old) = self.0.take() {
            let _ = old.thread_set_mask();
        }
    }
}

/// Whether a memory snapshot paused the guest and has not let it go on
/// yet (a cheap check for the supervisor's loop).
pub fn paused_by_snapshot(vm_dir: &Path) -> bool {
    fs::symlink_metadata(snap_dir(vm_dir).join(PAUSED)).is_ok()
}

/// Lets the guest go on if a memory snapshot paused it and its command is
/// gone (killed: nobody holds the snapshot lock any more). An unfinished
/// save is cancelled first (its file is never listed: `snap-<name>.json`
/// was not written, and the next snapshot command removes it). Called by
/// the VM's supervisor twice a second and by every snapshot command.
/// `Ok(true)`: the guest was resumed.
pub fn resume_abandoned(vm_dir: &Path) -> Result<bool, SnapshotError> {
    if !paused_by_snapshot(vm_dir) {
        return Ok(false);
    }
    let p = vm_dir.join(SNAP_LOCK);
    let Some(_lock) = VmLock::try_acquire(&p).map_err(io_at(&p))? else {
        // The command is alive: it lets the guest go on itself.
        return Ok(false);
    };
    if !paused_by_snapshot(vm_dir) {
        return Ok(false);
    }
    let mut qmp = Qmp::connect(vm_dir).map_err(SnapshotError::Qmp)?;
    let busy = |r: &serde_json::Value| {
        matches!(
            r["status"].as_str(),
            Some("setup" | "active" | "device" | "pre-switchover" | "wait-unplug" | "cancelling")
        )
    };
    let r = qmp
        .execute("query-migrate", None)
        .map_err(SnapshotError::Qmp)?;
    if busy(&r) {
        let _ = qmp.execute("migrate_cancel", None);
        let until = Instant::now() + Duration::from_secs(30);
        while busy(
            &qmp.execute("query-migrate", None)
                .map_err(SnapshotError::Qmp)?,
        ) {
            if Instant::now() > until {
                return Err(SnapshotError::Migration(
                    "an interrupted save did not stop".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    cont(&mut qmp, vm_dir)?;
    let _ = sync_dir(&snap_dir(vm_dir));
    Ok(true)
}

fn save_memory(qmp: &mut Qmp, path: &Path) -> Result<(), SnapshotError> {
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(io_at(path))?;
    let r = (|| {
        // QEMU's default migration bandwidth cap (128 MiB/s) is meant for
        // networks, not for a local file.
        let _ = qmp.execute(
            "migrate-set-parameters",
            Some(json!({"max-bandwidth": 1u64 << 40})),
        );
        qmp.send_fd("lume-snapshot", f.as_raw_fd())
            .map_err(SnapshotError::Qmp)?;
        qmp.execute("migrate", Some(json!({"uri": "fd:lume-snapshot"})))
            .map_err(SnapshotError::Qmp)?;
        wait_migration(qmp, Duration::from_secs(600))?;
        f.sync_all().map_err(io_at(path))
    })();
    if r.is_err() {
        let _ = fs::remove_file(path);
    }
    r
}

/// Deletes a snapshot: its metadata goes first (it is no longer listed),
/// then whatever only it needed. A layer a later layer still builds on
/// stays until nothing needs it.
pub fn delete(vm_dir: &Path, vm: &str, name: &str) -> Result<(), SnapshotError> {
    let _snap = snap_lock(vm_dir, vm)?;
    get(vm_dir, vm, name)?;
    let p = snap_path(vm_dir, name);
    fs::remove_file(&p).map_err(io_at(&p))?;
    sync_dir(&snap_dir(vm_dir))?;
    collect(vm_dir)
}

/// Points the VM's disk at a snapshot: a new empty layer on top of the
/// snapshot's frozen layer becomes the head; with a memory snapshot the
/// next start loads its memory. The caller holds the VM lock (stopped).
pub fn restore(
    vm_dir: &Path,
    vm: &str,
    name: &str,
    cpu_count: u32,
    memory_size: u64,
    network_mode: &str,
) -> Result<Snapshot, SnapshotError> {
    let _snap = snap_lock(vm_dir, vm)?;
    let s = check_restore(vm_dir, vm, name, cpu_count, memory_size, network_mode)?;
    let new = new_layer(vm_dir, s.layer.as_deref())?;
    // The head first, the memory marker last: a restore killed in between
    // leaves a disk restore (a cold boot), never this memory on another
    // moment's disk (prepare_run checks the pair again).
    let marker = snap_dir(vm_dir).join(RESTORE);
    let _ = fs::remove_file(&marker);
    write_head(vm_dir, Some(&new))?;
    if s.memory {
        write_json(
            &marker,
            &PendingRestore {
                snapshot: name.into(),
            },
        )?;
    }
    collect(vm_dir)?;
    Ok(s)
}

/// Whether a memory snapshot can resume on the VM as it is set now: the
/// same CPU count and memory size (QEMU's saved state needs them) and the
/// same network mode (the guest keeps its address, which only works on the
/// network it came from). A disk snapshot always can.
pub fn check_restorable(
    vm: &str,
    s: &Snapshot,
    cpu_count: u32,
    memory_size: u64,
    network_mode: &str,
) -> Result<(), SnapshotError> {
    if !s.memory {
        return Ok(());
    }
    if s.cpu_count != cpu_count || s.memory_size != memory_size {
        return Err(SnapshotError::ConfigChanged {
            vm: vm.into(),
            snap: s.name.clone(),
            was: (s.cpu_count, s.memory_size),
            now: (cpu_count, memory_size),
        });
    }
    if let (Some(was), Some(ip)) = (&s.network_mode, &s.ip_address)
        && was != network_mode
    {
        return Err(SnapshotError::NetworkChanged {
            vm: vm.into(),
            snap: s.name.clone(),
            modes: Box::new((was.clone(), network_mode.into())),
            ip: *ip,
        });
    }
    Ok(())
}

/// Bytes a file really takes on the host's disk (0 if it is not there).
fn allocated(path: &Path) -> u64 {
    fs::symlink_metadata(path).map_or(0, |m| m.blocks() * 512)
}

/// What one snapshot holds on the host's disk: its frozen layer and its
/// memory file.
fn snapshot_allocated(vm_dir: &Path, s: &Snapshot) -> u64 {
    let layer = s
        .layer
        .as_deref()
        .filter(|id| valid_id(id))
        .map_or(0, |id| allocated(&layer_path(vm_dir, id)));
    let mem = if s.memory {
        allocated(&memory_path(vm_dir, &s.name))
    } else {
        0
    };
    layer + mem
}

/// Bytes everything in `snapshots/` takes on the host's disk (layers,
/// memory files, metadata): counted in VMDetails' `diskSize.allocated`.
pub fn allocated_bytes(vm_dir: &Path) -> u64 {
    fs::read_dir(snap_dir(vm_dir))
        .map(|it| {
            it.flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}

/// The default name of a new snapshot: `snapshot-<unix time>`, with `-2`,
/// `-3`… added when that name is taken (two snapshots in one second).
pub fn default_name(vm_dir: &Path) -> String {
    let base = format!("snapshot-{}", crate::util::time::unix_now());
    let taken = |n: &str| fs::symlink_metadata(snap_path(vm_dir, n)).is_ok();
    if !taken(&base) {
        return base;
    }
    (2u32..)
        .map(|i| format!("{base}-{i}"))
        .find(|n| !taken(n))
        .expect("a free name")
}

/// The number of layers of a layered disk (`None`: it is plain).
pub fn layer_count(vm_dir: &Path) -> Option<usize> {
    if !is_layered(vm_dir) {
        return None;
    }
    Some(
        read_head(vm_dir)
            .and_then(|top| chain(vm_dir, top.as_deref()))
            .map_or(0, |c| c.len()),
    )
}

/// `Ok` when the VM's disk is plain `disk.img` (what clone, push and
/// resizing need); else why not and what to do.
pub fn check_plain(vm_dir: &Path, vm: &str, what: &'static str) -> Result<(), SnapshotError> {
    match layer_count(vm_dir) {
        None => Ok(()),
        Some(layers) => Err(SnapshotError::Layered {
            vm: vm.into(),
            what,
            layers,
            snapshots: list(vm_dir).len(),
        }),
    }
}

/// Makes a layered disk plain again: the chain (`disk.img` and every layer
/// up to the head) is merged into a new raw file beside `disk.img` by
/// `qemu-img convert` (every format named: the chain is given as explicit
/// nodes with `--image-opts`, the output `-O raw`), fsynced and renamed
/// over `disk.img`; then `snapshots/` is removed. Refused while the VM has
/// snapshots (they need the layers). The caller holds the VM lock (the VM
/// is stopped). Returns the number of layers merged (0: already plain).
///
/// A kill before the rename leaves the VM as it was (the next flatten
/// removes the partial file); a kill after it leaves the merged
/// `disk.img` under the same layers, which read the same as before (each
/// layer's clusters already are in the merged base), and the next flatten
/// finishes the job.
pub fn flatten(vm_dir: &Path, vm: &str) -> Result<usize, SnapshotError> {
    let _snap = snap_lock(vm_dir, vm)?;
    let tmp = vm_dir.join(".disk.img.flatten");
    let _ = fs::remove_file(&tmp);
    if !is_layered(vm_dir) {
        return Ok(0);
    }
    ensure_dir(vm_dir)?;
    let count = list(vm_dir).len();
    if count > 0 {
        return Err(SnapshotError::FlattenSnapshots {
            vm: vm.into(),
            count,
        });
    }
    let top = read_head(vm_dir)?;
    let layers = chain(vm_dir, top.as_deref())?;
    let base = vm_dir.join("disk.img");
    disk_size(vm_dir)?;
    if !layers.is_empty() {
        // `,` separates options: a comma in a path is written twice.
        let esc = |p: &Path| p.display().to_string().replace(',', ",,");
        let mut opts = String::new();
        let mut prefix = String::new();
        for id in layers.iter().rev() {
            let p = layer_path(vm_dir, id);
            check_qcow2(&p)?;
            opts.push_str(&format!(
                "{prefix}driver=qcow2,{prefix}file.driver=file,{prefix}file.filename={},",
                esc(&p)
            ));
            prefix.push_str("backing.");
        }
        opts.push_str(&format!(
            "{prefix}driver=raw,{prefix}file.driver=file,{prefix}file.filename={}",
            esc(&base)
        ));
        // Created 0600 first: qemu-img keeps the mode of the file it
        // truncates.
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
            .map_err(io_at(&tmp))?;
        let merged = qemu_img(
            &[
                "convert".as_ref(),
                "-q".as_ref(),
                "--image-opts".as_ref(),
                opts.as_ref(),
                "-O".as_ref(),
                "raw".as_ref(),
                tmp.as_os_str(),
            ],
            &tmp,
        )
        .and_then(|()| {
            File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(io_at(&tmp))
        })
        .and_then(|()| fs::rename(&tmp, &base).map_err(io_at(&base)));
        if let Err(e) = merged {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        sync_dir(vm_dir)?;
    }
    // From here on the VM is plain: head.json goes first.
    let sd = snap_dir(vm_dir);
    let head = sd.join(HEAD);
    fs::remove_file(&head).map_err(io_at(&head))?;
    sync_dir(&sd)?;
    fs::remove_dir_all(&sd).map_err(io_at(&sd))?;
    sync_dir(vm_dir)?;
    Ok(layers.len())
}

/// Every check `restore` makes that can fail, without writing anything:
/// the snapshot exists, a memory snapshot fits the VM as it is set now
/// ([`check_restorable`]) and its memory file is there, its layers are lume's and one
/// more fits on its chain. A running VM is forced off only after this.
pub fn check_restore(
    vm_dir: &Path,
    vm: &str,
    name: &str,
    cpu_count: u32,
    memory_size: u64,
    network_mode: &str,
) -> Result<Snapshot, SnapshotError> {
    let s = get(vm_dir, vm, name)?;
    check_restorable(vm, &s, cpu_count, memory_size, network_mode)?;
    let layers = chain(vm_dir, s.layer.as_deref())?;
    check_room(vm, layers.len())?;
    for id in &layers {
        check_qcow2(&layer_path(vm_dir, id))?;
    }
    disk_size(vm_dir)?;
    if s.memory {
        let p = memory_path(vm_dir, name);
        match fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_file() => {}
            Ok(_) => {
                return Err(SnapshotError::BadLayer {
                    path: p,
                    reason: "not a regular file".into(),
                });
            }
            Err(e) => return Err(SnapshotError::Io { path: p, source: e }),
        }
    }
    Ok(s)
}

/// Forgets a pending memory restore (its start failed).
pub fn cancel_restore(vm_dir: &Path) {
    let _ = fs::remove_file(snap_dir(vm_dir).join(RESTORE));
}

/// Gives `work` (a new VM directory being built) the disk of snapshot
/// `name` of the VM in `vm_dir`: `disk.img` and the frozen layers are
/// hard-linked (they are never written again; a copy where the two
/// directories are on different filesystems) and a new empty layer on top
/// becomes the head. Returns whether every file was hard-linked (`false`:
/// copied).
pub fn link_into(vm_dir: &Path, vm: &str, name: &str, work: &Path) -> Result<bool, SnapshotError> {
    let _snap = snap_lock(vm_dir, vm)?;
    let s = get(vm_dir, vm, name)?;
    let layers = chain(vm_dir, s.layer.as_deref())?;
    let hard_linked = std::cell::Cell::new(true);
    check_room(vm, layers.len())?;
    let link = |from: &Path, to: &Path| -> Result<(), SnapshotError> {
        match fs::hard_link(from, to) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                hard_linked.set(false);
                crate::hypervisor::img::copy_file(from, to)
                    .map(|_| ())
                    .map_err(|e| SnapshotError::Io {
                        path: to.into(),
                        source: io::Error::other(crate::error_chain(&e)),
                    })
            }
            Err(e) => Err(SnapshotError::Io {
                path: to.into(),
                source: e,
            }),
        }
    };
    let base = vm_dir.join("disk.img");
    disk_size(vm_dir)?;
    link(&base, &work.join("disk.img"))?;
    ensure_dir(work)?;
    let mut parent: Option<String> = None;
    for id in &layers {
        let p = layer_path(vm_dir, id);
        check_qcow2(&p)?;
        link(&p, &layer_path(work, id))?;
        write_json(
            &layer_meta_path(work, id),
            &LayerMeta {
                parent: parent.clone(),
            },
        )?;
        parent = Some(id.clone());
    }
    let top = new_layer(work, parent.as_deref())?;
    write_head(work, Some(&top))?;
    sync_dir(&snap_dir(work))?;
    Ok(hard_linked.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for ok in ["a", "clean-1", "v1.2_x", &"a".repeat(MAX_NAME)] {
            validate_name(ok).unwrap();
        }
        for bad in [
            "",
            "../x",
            "a/b",
            ".hidden",
            "-rf",
            "a b",
            "é",
            &"a".repeat(MAX_NAME + 1),
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    fn vm_dir() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        crate::hypervisor::img::create_sparse(&d.path().join("disk.img"), 16 << 20).unwrap();
        d
    }

    fn target(dir: &Path) -> Target<'_> {
        Target {
            name: "t",
            dir,
            lock: Box::leak(dir.join(".lock").into_boxed_path()),
            running: None,
            started_at: None,
            ip_address: None,
            network_mode: None,
            cpu_count: 1,
            memory_size: 256 << 20,
        }
    }

    #[test]
    fn snapshots_chain_and_collect_on_a_stopped_vm() {
        let d = vm_dir();
        let dir = d.path();
        // An old-layout VM: raw disk.img written directly.
        assert!(!is_layered(dir));
        let run = prepare_run(dir, false).unwrap();
        assert!(run.args[1].contains(r#""driver":"raw""#), "{:?}", run.args);
        assert!(run.args[1].contains(r#""read-only":false"#));
        let s1 = create(&target(dir), "one", false).unwrap();
        assert_eq!(s1.layer, None);
        let s2 = create(&target(dir), "two", false).unwrap();
        assert!(s2.layer.is_some());
        assert!(matches!(
            create(&target(dir), "two", false),
            Err(SnapshotError::Exists { .. })
        ));
        assert!(matches!(
            create(&target(dir), "m", true),
            Err(SnapshotError::MemoryNeedsRunning(_))
        ));
        assert_eq!(
            list(dir)
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>(),
            ["one", "two"]
        );
        let run = prepare_run(dir, false).unwrap();
        // base + 2 layers, all explicit, the base read-only.
        let blockdevs: Vec<&String> = run.args.iter().skip(1).step_by(2).collect();
        assert_eq!(blockdevs.len(), 4, "{:?}", run.args);
        assert!(blockdevs[0].contains(r#""read-only":true"#));
        assert!(blockdevs[2].contains(r#""backing":"layer-"#));
        // Deleting the middle snapshot keeps the layer "two" builds on.
        delete(dir, "t", "one").unwrap();
        assert!(prepare_run(dir, false).is_ok());
        // Restoring "two" leaves the layers of the abandoned head behind,
        // which are collected.
        let before = fs::read_dir(snap_dir(dir)).unwrap().count();
        restore(dir, "t", "two", 1, 256 << 20, "nat").unwrap();
        restore(dir, "t", "two", 1, 256 << 20, "nat").unwrap();
        let after = fs::read_dir(snap_dir(dir)).unwrap().count();
        assert_eq!(before, after);
        delete(dir, "t", "two").unwrap();
        assert!(list(dir).is_empty());
        // Modes: 0700 folder, 0600 files.
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(snap_dir(dir)).unwrap().permissions().mode() & 0o777,
            0o700
        );
        for e in fs::read_dir(snap_dir(dir)).unwrap() {
            let m = e.unwrap().metadata().unwrap().permissions().mode() & 0o777;
            assert_eq!(m, 0o600);
        }
    }

    #[test]
    fn a_half_written_snapshot_is_never_listed_and_is_collected() {
        let d = vm_dir();
        let dir = d.path();
        create(&target(dir), "ok", false).unwrap();
        // A kill after the layer and the head, before snap-*.json.
        let top = read_head(dir).unwrap();
        let orphan = new_layer(dir, top.as_deref()).unwrap();
        fs::write(snap_dir(dir).join("snap-half.json.tmp"), b"{").unwrap();
        fs::write(memory_path(dir, "half"), b"x").unwrap();
        assert_eq!(list(dir).len(), 1);
        create(&target(dir), "next", false).unwrap();
        assert!(!layer_path(dir, &orphan).exists());
        assert!(!memory_path(dir, "half").exists());
        assert_eq!(list(dir).len(), 2);
    }

    #[test]
    fn a_chain_at_its_limit_refuses_one_more_layer_before_writing_anything() {
        let d = vm_dir();
        let dir = d.path();
        for i in 0..MAX_CHAIN {
            create(&target(dir), &format!("s{i}"), false).unwrap();
        }
        let before = files(dir);
        let e = create(&target(dir), "one-too-many", false).unwrap_err();
        assert!(
            matches!(e, SnapshotError::ChainTooLong { depth, max: MAX_CHAIN, .. } if depth == MAX_CHAIN + 1),
            "{e:?}"
        );
        let text = e.to_string();
        assert!(text.starts_with("Too many disk layers in a row"), "{text}");
        assert!(!text.contains("damaged"), "{text}");
        assert_eq!(files(dir), before);
        // The VM still starts, and a restore of its newest snapshot fits.
        prepare_run(dir, false).unwrap();
        restore(
            dir,
            "t",
            &format!("s{}", MAX_CHAIN - 1),
            1,
            256 << 20,
            "nat",
        )
        .unwrap();
        // A snapshot of the full chain (here forged) cannot be restored or
        // cloned: refused before anything is written.
        let mut deep = get(dir, "t", "s0").unwrap();
        deep.name = "deep".into();
        deep.layer = read_head(dir).unwrap();
        write_json(&snap_path(dir, "deep"), &deep).unwrap();
        let before = files(dir);
        for e in [
            restore(dir, "t", "deep", 1, 256 << 20, "nat").unwrap_err(),
            check_restore(dir, "t", "deep", 1, 256 << 20, "nat").unwrap_err(),
        ] {
            assert!(matches!(e, SnapshotError::ChainTooLong { .. }), "{e:?}");
        }
        let work = tempfile::tempdir().unwrap();
        assert!(matches!(
            link_into(dir, "t", "deep", &work.path().join("new")),
            Err(SnapshotError::ChainTooLong { .. })
        ));
        assert_eq!(files(dir), before);
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(snap_dir(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_restore_checks_memory_and_settings_before_anything() {
        let d = vm_dir();
        let dir = d.path();
        create(&target(dir), "d", false).unwrap();
        // A memory snapshot as a running VM's `create` leaves it.
        let mut m = get(dir, "t", "d").unwrap();
        m.name = "m".into();
        m.memory = true;
        write_json(&snap_path(dir, "m"), &m).unwrap();
        fs::write(memory_path(dir, "m"), b"state").unwrap();
        check_restore(dir, "t", "m", 1, 256 << 20, "nat").unwrap();
        assert!(matches!(
            check_restore(dir, "t", "m", 2, 256 << 20, "nat"),
            Err(SnapshotError::ConfigChanged { .. })
        ));
        fs::remove_file(memory_path(dir, "m")).unwrap();
        let before = files(dir);
        assert!(matches!(
            restore(dir, "t", "m", 1, 256 << 20, "nat"),
            Err(SnapshotError::Io { .. })
        ));
        assert_eq!(files(dir), before);
    }

    #[test]
    fn an_ephemeral_run_leaves_a_big_known_hosts_alone() {
        let d = vm_dir();
        let dir = d.path();
        let kh = dir.join("known_hosts");
        let big = vec![b'#'; MAX_META as usize + 1];
        fs::write(&kh, &big).unwrap();
        let run = prepare_run(dir, true).unwrap();
        run.finish();
        assert_eq!(fs::read(&kh).unwrap(), big);
        // No file before: what the run learned goes.
        fs::remove_file(&kh).unwrap();
        let run = prepare_run(dir, true).unwrap();
        fs::write(&kh, b"lume-t ssh-ed25519 CCCC\n").unwrap();
        run.finish();
        assert!(!kh.exists());
    }

    #[test]
    fn ephemeral_layers_are_dropped_and_a_foreign_header_is_refused() {
        let d = vm_dir();
        let dir = d.path();
        std::fs::write(dir.join("known_hosts"), b"lume-t ssh-ed25519 AAAA\n").unwrap();
        let run = prepare_run(dir, true).unwrap();
        let eph = run.ephemeral.clone().unwrap();
        assert!(eph.exists());
        // What `lume ssh` learns during the run is forgotten at its end.
        std::fs::write(dir.join("known_hosts"), b"lume-t ssh-ed25519 BBBB\n").unwrap();
        run.finish();
        assert!(!eph.exists());
        assert_eq!(
            std::fs::read(dir.join("known_hosts")).unwrap(),
            b"lume-t ssh-ed25519 AAAA\n"
        );
        let run = prepare_run(dir, true).unwrap();
        let eph = run.ephemeral.clone().unwrap();
        // A killed supervisor: the next start removes it.
        let run2 = prepare_run(dir, false).unwrap();
        assert!(!eph.exists());
        assert!(run2.ephemeral.is_none());
        // A layer with an external data file is never handed to QEMU.
        create(&target(dir), "s", false).unwrap();
        let top = read_head(dir).unwrap().unwrap();
        let p = layer_path(dir, &top);
        let mut bytes = fs::read(&p).unwrap();
        bytes[79] |= 0b100;
        fs::write(&p, &bytes).unwrap();
        assert!(matches!(
            prepare_run(dir, false),
            Err(SnapshotError::BadLayer { .. })
        ));
    }

    /// Writes `data` at `offset` of the VM's current disk through QEMU's
    /// own block layer (qemu-io on the chain), as a guest would.
    fn write_through_chain(dir: &Path, offset: u64, byte: u8) {
        let top = read_head(dir).unwrap().unwrap();
        let layers = chain(dir, Some(&top)).unwrap();
        let mut opts = String::new();
        let mut prefix = String::new();
        for id in layers.iter().rev() {
            opts.push_str(&format!(
                "{prefix}driver=qcow2,{prefix}file.driver=file,{prefix}file.filename={},",
                layer_path(dir, id).display()
            ));
            prefix.push_str("backing.");
        }
        opts.push_str(&format!(
            "{prefix}driver=raw,{prefix}file.driver=file,{prefix}file.filename={}",
            dir.join("disk.img").display()
        ));
        let out = Command::new("qemu-io")
            .args(["--image-opts", &opts, "-c"])
            .arg(format!("write -P {byte} {offset} 64k"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }

    #[test]
    fn flatten_merges_the_chain_into_a_plain_disk() {
        let d = vm_dir();
        let dir = d.path();
        // Plain already: nothing to do.
        assert_eq!(flatten(dir, "t").unwrap(), 0);
        fs::write(dir.join("disk.img"), vec![1u8; 16 << 20]).unwrap();
        create(&target(dir), "a", false).unwrap();
        write_through_chain(dir, 1 << 20, 2);
        create(&target(dir), "b", false).unwrap();
        write_through_chain(dir, 2 << 20, 3);
        // A clone-like hard link to the base must keep the old bytes.
        let linked = dir.join("other.img");
        fs::hard_link(dir.join("disk.img"), &linked).unwrap();
        // Every layer is needed while snapshots exist.
        match check_plain(dir, "t", "push") {
            Err(e @ SnapshotError::Layered { snapshots: 2, .. }) => {
                let m = e.to_string();
                assert!(m.contains("`lume snapshot flatten t`"), "{m}");
                assert!(m.contains("2 snapshots"), "{m}");
            }
            r => panic!("{r:?}"),
        }
        assert!(matches!(
            flatten(dir, "t"),
            Err(SnapshotError::FlattenSnapshots { count: 2, .. })
        ));
        delete(dir, "t", "a").unwrap();
        delete(dir, "t", "b").unwrap();
        // No snapshots, still layered: the message says so and what to run.
        let m = check_plain(dir, "t", "push").unwrap_err().to_string();
        assert!(
            m.contains("has no snapshots, but its disk is layered (disk.img plus 2 layers"),
            "{m}"
        );
        assert!(m.contains("`lume snapshot flatten t`"), "{m}");
        // A half-written flatten left by a kill is removed.
        fs::write(dir.join(".disk.img.flatten"), b"partial").unwrap();
        assert_eq!(flatten(dir, "t").unwrap(), 2);
        assert!(!is_layered(dir));
        assert!(!snap_dir(dir).exists());
        assert!(!dir.join(".disk.img.flatten").exists());
        check_plain(dir, "t", "push").unwrap();
        let disk = fs::read(dir.join("disk.img")).unwrap();
        assert_eq!(disk.len(), 16 << 20);
        assert!(disk[..1 << 20].iter().all(|&b| b == 1));
        assert!(
            disk[1 << 20..(1 << 20) + (64 << 10)]
                .iter()
                .all(|&b| b == 2)
        );
        assert!(
            disk[2 << 20..(2 << 20) + (64 << 10)]
                .iter()
                .all(|&b| b == 3)
        );
        assert!(disk[(2 << 20) + (64 << 10)..].iter().all(|&b| b == 1));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(dir.join("disk.img"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        // The file shared by hard link was not written: a new one replaced it.
        assert!(fs::read(&linked).unwrap().iter().all(|&b| b == 1));
        // A plain VM runs with a writable raw disk.img again.
        let run = prepare_run(dir, false).unwrap();
        assert!(run.args[1].contains(r#""read-only":false"#));
    }

    #[test]
    fn a_layer_with_a_foreign_backing_file_does_not_leak_into_flatten() {
        let d = vm_dir();
        let dir = d.path();
        let secret = dir.join("secret");
        fs::write(&secret, vec![7u8; 16 << 20]).unwrap();
        create(&target(dir), "a", false).unwrap();
        delete(dir, "t", "a").unwrap();
        // Replace the head layer by one whose header names another file as
        // backing (in raw format): lume names the backing node itself.
        let top = read_head(dir).unwrap().unwrap();
        let p = layer_path(dir, &top);
        fs::remove_file(&p).unwrap();
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&secret)
            .arg(&p)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        flatten(dir, "t").unwrap();
        let disk = fs::read(dir.join("disk.img")).unwrap();
        assert!(
            disk.iter().all(|&b| b == 0),
            "the foreign backing file was read"
        );
    }

    #[test]
    fn default_names_are_unique_within_a_second() {
        let d = vm_dir();
        let dir = d.path();
        let a = default_name(dir);
        create(&target(dir), &a, false).unwrap();
        let b = default_name(dir);
        assert_ne!(a, b);
        create(&target(dir), &b, false).unwrap();
        let c = default_name(dir);
        assert!(c != a && c != b);
        validate_name(&c).unwrap();
    }

    #[test]
    fn list_reports_what_each_snapshot_holds_on_disk() {
        let d = vm_dir();
        let dir = d.path();
        create(&target(dir), "base", false).unwrap();
        write_through_chain(dir, 0, 9);
        create(&target(dir), "after", false).unwrap();
        let l = list(dir);
        let size = |n: &str| {
            l.iter()
                .find(|s| s.name == n)
                .unwrap()
                .allocated_size
                .unwrap()
        };
        // "base" froze disk.img itself (counted as the VM's disk); "after"
        // froze a layer holding 64 KiB of data.
        assert_eq!(size("base"), 0);
        assert!(size("after") >= 64 << 10, "{l:?}");
        assert!(allocated_bytes(dir) >= size("after"));
        // Never written into snap-*.json.
        let text = fs::read_to_string(snap_path(dir, "after")).unwrap();
        assert!(!text.contains("allocatedSize"), "{text}");
    }

    fn memory_snap() -> Snapshot {
        Snapshot {
            name: "warm".into(),
            layer: None,
            created_at: 0,
            memory: true,
            cpu_count: 1,
            memory_size: 512 << 20,
            run_started_at: None,
            ip_address: Some([192, 0, 2, 5].into()),
            network_mode: Some("host".into()),
            allocated_size: None,
        }
    }

    /// A snapshot record of the earlier release (its address a string)
    /// reads and writes back the same; an address lume cannot read is
    /// unknown (the restore then has no address to check) instead of making
    /// the snapshot unreadable.
    #[test]
    fn snapshot_records_keep_their_address_string_and_survive_a_bad_one() {
        let earlier = r#"{"name":"warm","layer":null,"createdAt":0,"memory":true,"cpuCount":1,"memorySize":536870912,"ipAddress":"192.0.2.5","networkMode":"host"}"#;
        let s: Snapshot = serde_json::from_str(earlier).unwrap();
        assert_eq!(s, memory_snap());
        assert_eq!(serde_json::to_string(&s).unwrap(), earlier);
        let bad = earlier.replace("192.0.2.5", "192.0.2.500");
        let s: Snapshot = serde_json::from_str(&bad).unwrap();
        assert_eq!(s.ip_address, None);
        assert_eq!(s.name, "warm");
    }

    #[test]
    fn a_memory_restore_names_what_changed_and_the_command_to_set_it_back() {
        let s = memory_snap();
        check_restorable("web", &s, 1, 512 << 20, "host").unwrap();
        let e = check_restorable("web", &s, 2, 512 << 20, "host").unwrap_err();
        let m = e.to_string();
        assert!(m.contains("CPU count (1 CPU then, 2 CPUs now)"), "{m}");
        assert!(!m.contains("memory ("), "{m}");
        assert!(m.contains("`lume set web --cpu 1 --memory 512MB`"), "{m}");
        let api = e.message(Door::Api);
        assert!(
            api.contains(r#"PATCH /lume/vms/web with {"cpu": 1, "memory": "512MB"}"#),
            "{api}"
        );
        let mut odd = s.clone();
        odd.memory_size = 1536 << 20;
        let e = check_restorable("web", &odd, 1, 1 << 30, "host").unwrap_err();
        assert!(e.to_string().contains("--memory 1536MB`"), "{e}");
        let e = check_restorable("web", &s, 1, 1 << 30, "host").unwrap_err();
        assert!(
            e.to_string().contains("memory (512.0MB then, 1.0GB now)"),
            "{e}"
        );
        // Another network mode: the guest's address would not work there.
        let e = check_restorable("web", &s, 1, 512 << 20, "nat").unwrap_err();
        assert!(matches!(e, SnapshotError::NetworkChanged { .. }));
        assert!(
            e.to_string().contains("`lume set web --network host`"),
            "{e}"
        );
        // A disk snapshot has no such limits.
        let mut disk = s.clone();
        disk.memory = false;
        check_restorable("web", &disk, 4, 1 << 30, "nat").unwrap();
    }

    #[test]
    fn each_door_names_its_own_commands() {
        let errors = [
            SnapshotError::MemoryNeedsRunning("web".into()),
            SnapshotError::Ephemeral("web".into()),
            SnapshotError::RestoreEphemeral("web".into()),
            SnapshotError::NeedsAgent {
                vm: "web".into(),
                reason: "x".into(),
            },
            SnapshotError::Layered {
                vm: "web".into(),
                what: "push",
                layers: 1,
                snapshots: 1,
            },
            SnapshotError::Layered {
                vm: "web".into(),
                what: "push",
                layers: 1,
                snapshots: 0,
            },
            SnapshotError::FlattenSnapshots {
                vm: "web".into(),
                count: 1,
            },
            SnapshotError::FlattenRunning("web".into()),
            SnapshotError::NotFound {
                vm: "web".into(),
                snap: "s".into(),
            },
            SnapshotError::AddressInUse {
                vm: "web".into(),
                snap: "s".into(),
                ip: [192, 0, 2, 5].into(),
                other: "db".into(),
            },
            check_restorable("web", &memory_snap(), 2, 1 << 30, "host").unwrap_err(),
            check_restorable("web", &memory_snap(), 1, 512 << 20, "nat").unwrap_err(),
        ];
        for e in &errors {
            let cli = e.to_string();
            assert!(cli.contains("`lume ") || cli.contains("--"), "{cli}");
            for door in [Door::Api, Door::Mcp] {
                let m = e.message(door);
                assert!(!m.contains("--") && !m.contains("`lume "), "{door:?}: {m}");
                assert!(m.chars().next().unwrap().is_uppercase(), "{m}");
            }
        }
        assert!(errors[0].message(Door::Api).contains(r#""memory": true"#));
        assert!(errors[0].message(Door::Mcp).contains("memory: true"));
        assert!(
            errors[5]
                .message(Door::Mcp)
                .contains("lume_snapshot_flatten")
        );
        assert!(
            errors[5]
                .message(Door::Api)
                .contains("POST /lume/vms/web/flatten")
        );
    }
}
