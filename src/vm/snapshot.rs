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
/// Held for the whole of a snapshot command, so two never interleave.
const SNAP_LOCK: &str = ".snap.lock";
/// Longest snapshot name.
pub const MAX_NAME: usize = 64;
const MAX_CHAIN: usize = 1000;
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
    #[error("VM '{vm}' has no snapshot '{snap}': see `lume snapshot list {vm}`")]
    NotFound { vm: String, snap: String },
    #[error("VM '{vm}' already has a snapshot '{snap}': choose another name or delete it first")]
    Exists { vm: String, snap: String },
    #[error(
        "VM '{0}' is busy: it is starting, stopping or another snapshot command runs; try again in a moment"
    )]
    Busy(String),
    #[error(
        "A disk snapshot of running VM '{vm}' needs the guest agent to freeze its filesystems ({reason}): install and start qemu-guest-agent in the guest, take the snapshot with --memory, or stop the VM first"
    )]
    NeedsAgent { vm: String, reason: String },
    #[error(
        "VM '{0}' is not running: a memory snapshot needs a running VM; start it with `lume run {0}`, or leave out --memory"
    )]
    MemoryNeedsRunning(String),
    #[error(
        "VM '{0}' runs with shared directories (virtio-fs), whose state QEMU cannot save: stop it and run it without --shared-dir to take a memory snapshot, or take a disk snapshot (leave out --memory)"
    )]
    MemoryWithShares(String),
    #[error(
        "VM '{0}' runs with --ephemeral: its changes are discarded at stop, so nothing of this run can be snapshotted; stop it and run it without --ephemeral"
    )]
    Ephemeral(String),
    #[error(
        "VM '{vm}' has snapshots (its disk is disk.img plus the layers in {SNAP_DIR}/): {what} works on a VM without them; use `lume clone {vm} NEW --snapshot SNAP` to get a VM of its own, or delete the VM's snapshots and flatten it with `lume snapshot flatten {vm}`"
    )]
    Layered { vm: String, what: &'static str },
    #[error(
        "Snapshot '{snap}' of VM '{vm}' was taken with {cpu} CPUs and {memory} bytes of memory; the VM now has other settings: set them back with `lume set` before restoring its memory"
    )]
    ConfigChanged {
        vm: String,
        snap: String,
        cpu: u32,
        memory: u64,
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_address: Option<String>,
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

/// The layers under `top`, from the one just above `disk.img` up to `top`.
fn chain(vm_dir: &Path, top: Option<&str>) -> Result<Vec<String>, SnapshotError> {
    let mut out = Vec::new();
    let mut cur = top.map(str::to_string);
    while let Some(id) = cur {
        let meta_path = layer_meta_path(vm_dir, &id);
        if !valid_id(&id) || out.len() > MAX_CHAIN || out.contains(&id) {
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
    pub incoming_ip: Option<String>,
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
        let before = match fs::symlink_metadata(&kh) {
            Ok(m) if m.file_type().is_file() && m.len() <= MAX_META => {
                Some(fs::read(&kh).map_err(io_at(&kh))?)
            }
            _ => None,
        };
        run.known_hosts = Some((kh, before));
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

/// Loads the memory state into a QEMU started with `-incoming defer`, and
/// lets the guest go on.
pub fn load_memory(qmp: &mut Qmp, state: &File) -> Result<(), SnapshotError> {
    qmp.send_fd("lume-incoming", state.as_raw_fd())
        .map_err(SnapshotError::Qmp)?;
    qmp.execute("migrate-incoming", Some(json!({"uri": "fd:lume-incoming"})))
        .map_err(SnapshotError::Qmp)?;
    wait_migration(qmp, Duration::from_secs(600))?;
    let status = qmp
        .execute("query-status", None)
        .map_err(SnapshotError::Qmp)?;
    if status["running"] != true {
        qmp.execute("cont", None).map_err(SnapshotError::Qmp)?;
    }
    Ok(())
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
        if let Ok(Some(s)) = read_json::<Snapshot>(&e.path())
            && s.name == name
        {
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
fn running_ephemeral(vm_dir: &Path) -> bool {
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
    pub ip_address: Option<String>,
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
    chain(t.dir, old.as_deref())?;
    let new = new_layer(t.dir, old.as_deref())?;
    let snap = Snapshot {
        name: name.into(),
        layer: old.clone(),
        created_at: crate::util::time::unix_now(),
        memory,
        cpu_count: t.cpu_count,
        memory_size: t.memory_size,
        run_started_at: if memory { t.started_at } else { None },
        ip_address: if memory { t.ip_address.clone() } else { None },
    };
    if let Some(agent_open) = t.running {
        live(t, &snap, old.as_deref(), &new, agent_open)?;
    } else {
        write_head(t.dir, Some(&new))?;
    }
    // Complete, and listed, from here on.
    write_json(&snap_path(t.dir, name), &snap)?;
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
    if snap.memory {
        qmp.execute("stop", None)
            .map_err(|e| undo_layer(SnapshotError::Qmp(e)))?;
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
            let _ = qmp.execute("cont", None);
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
    let _ = qmp.execute("cont", None);
    saved
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
) -> Result<Snapshot, SnapshotError> {
    let _snap = snap_lock(vm_dir, vm)?;
    let s = get(vm_dir, vm, name)?;
    if s.memory && (s.cpu_count != cpu_count || s.memory_size != memory_size) {
        return Err(SnapshotError::ConfigChanged {
            vm: vm.into(),
            snap: name.into(),
            cpu: s.cpu_count,
            memory: s.memory_size,
        });
    }
    chain(vm_dir, s.layer.as_deref())?;
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

/// Forgets a pending memory restore (its start failed).
pub fn cancel_restore(vm_dir: &Path) {
    let _ = fs::remove_file(snap_dir(vm_dir).join(RESTORE));
}

/// Gives `work` (a new VM directory being built) the disk of snapshot
/// `name` of the VM in `vm_dir`: `disk.img` and the frozen layers are
/// hard-linked (they are never written again; a copy where the two
/// directories are on different filesystems) and a new empty layer on top
/// becomes the head.
pub fn link_into(vm_dir: &Path, vm: &str, name: &str, work: &Path) -> Result<(), SnapshotError> {
    let _snap = snap_lock(vm_dir, vm)?;
    let s = get(vm_dir, vm, name)?;
    let layers = chain(vm_dir, s.layer.as_deref())?;
    let link = |from: &Path, to: &Path| -> Result<(), SnapshotError> {
        match fs::hard_link(from, to) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
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
    sync_dir(&snap_dir(work))
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
        restore(dir, "t", "two", 1, 256 << 20).unwrap();
        restore(dir, "t", "two", 1, 256 << 20).unwrap();
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
}
