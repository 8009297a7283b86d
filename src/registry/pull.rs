//! `lume pull`: manifest, config, disk blobs into the cache (in parallel,
//! each verified against its digest, resumed from a `.partial` file), then
//! the disk written sparsely into a hidden work directory that appears as
//! the VM with one rename.

use std::fs::{self, File, OpenOptions};
use std::io::{IsTerminal, Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::Ordering;

use futures_util::StreamExt;
use sha2::{Digest as _, Sha256};

use super::cache::{Cache, ImageDir, REASSEMBLED};
use super::format::{self, Descriptor, Format, Manifest, Plan};
use super::wire::Blob;
use super::{ImageRef, RegistryError, io_at};
use crate::network::NetworkMode;
use crate::vm::caller::Caller;
use crate::vm::config::{CloudInit, DiskFormat, MacAddress, VmConfig};
use crate::vm::name::VmName;

/// Downloads of one blob before a digest mismatch is final.
const DIGEST_ATTEMPTS: u32 = 3;
/// Broken transfers of one blob resumed before the pull fails.
const RESUMES: u32 = 5;
/// Blobs fetched at once.
const PARALLEL: usize = 4;
/// Largest config blob read.
const MAX_CONFIG: u64 = 1 << 20;
/// Largest disk lume pulls (as `create`'s limit).
const MAX_DISK: u64 = 1 << 50;
// A download slower than `MIN_WINDOW_BYTES` per `RATE_WINDOW` (or silent
// that long) is broken off and resumed, uploads are held to the same rate
// (`wire`); after `RESUMES` the pull fails, so a registry trickling bytes
// cannot hold the cache lock for ever.
use super::wire::{MIN_WINDOW_BYTES, RATE_WINDOW};

/// Largest blob accepted for a part that unpacks to at most `max_len`
/// bytes: compression never grows data by more than a small fraction.
fn max_blob(max_len: u64) -> u64 {
    max_len.saturating_add(max_len / 64).saturating_add(1 << 20)
}

/// What `pull` needs.
#[derive(Debug, Clone)]
pub struct PullSpec {
    pub image: ImageRef,
    pub name: VmName,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Replace an existing (stopped) VM of that name once the new one is
    /// complete, and fetch every blob anew even when cached.
    pub force: bool,
    /// A progress bar on a terminal.
    pub progress: bool,
    /// Registries named through the API must be public unless allowed.
    pub public_only: bool,
    /// Asked through the REST API: error hints name request fields.
    pub api: bool,
}

/// The VM name lume gives a pulled image, as lume 0.5.3
/// (`name ?? "\(imageName)_\(tag)"`): `IMAGE_TAG`, IMAGE being the
/// image's last path component (`debian-12:latest` → `debian-12_latest`).
pub fn default_name(image: &ImageRef) -> Result<VmName, RegistryError> {
    name_for(&image.name, &image.tag).ok_or_else(|| RegistryError::NameTooLong {
        name: default_name_text(&image.name, &image.tag),
        image: image.short(),
        run: false,
        api: false,
    })
}

/// `IMAGE_TAG` as text, valid VM name or not.
pub fn default_name_text(name: &str, tag: &str) -> String {
    let last = name.rsplit('/').next().unwrap_or(name);
    format!("{last}_{tag}")
}

/// What a pull of `image` (with `--registry`/`--organization` or
/// config.yaml's defaults `d`) fetches, and the VM it makes: `name`, else
/// [`default_name`]. One derivation for the CLI, REST and MCP.
pub fn target(
    image: &str,
    registry: Option<&str>,
    organization: Option<&str>,
    name: Option<VmName>,
    d: &crate::settings::RegistryDefaults,
) -> Result<(ImageRef, VmName), RegistryError> {
    let image = ImageRef::with_defaults(image, registry, organization, d)?;
    let name = match name {
        Some(n) => n,
        None => default_name(&image)?,
    };
    Ok((image, name))
}

/// `IMAGE_TAG` for the image name `name` (path allowed) and `tag`; `None`
/// when that is not a valid VM name (too long, a leading '.' or '_').
pub fn name_for(name: &str, tag: &str) -> Option<VmName> {
    VmName::parse(&default_name_text(name, tag)).ok()
}

/// In a pull's work directory: `{"downloaded": N, "total": N}`, read by
/// `VmDetails` for `downloadProgress`.
pub const PROGRESS_FILE: &str = ".pull-progress";

/// Records how far the download is (best effort).
pub fn write_progress(work: &Path, downloaded: u64, total: u64) {
    let text = serde_json::json!({"downloaded": downloaded, "total": total}).to_string();
    let _ = crate::util::atomic::write_private(&work.join(PROGRESS_FILE), text.as_bytes());
}

/// The percentage a progress file records; `None` without one.
pub fn read_progress(dir: &Path) -> Option<f64> {
    let v: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join(PROGRESS_FILE)).ok()?).ok()?;
    let done = v.get("downloaded")?.as_u64()?;
    let total = v.get("total")?.as_u64()?;
    Some(if total == 0 {
        0.0
    } else {
        (done as f64 * 100.0 / total as f64).min(100.0)
    })
}

/// The config a pulled VM lists with until its image's settings are known.
pub fn provisional_config() -> VmConfig {
    VmConfig {
        os: "linux".into(),
        cpu_count: 2,
        memory_size: 2 << 30,
        disk_size: 0,
        mac_address: Some(MacAddress::random()),
        display: crate::vm::config::DEFAULT_DISPLAY.into(),
        network_mode: NetworkMode::Nat,
        kernel_boot: None,
        disk_format: DiskFormat::Raw,
        publish: Vec::new(),
        unsafe_host_loopback: false,
        network_policy: Default::default(),
        vm_id: None,
        cloud_init: CloudInit::default(),
        extra: Default::default(),
    }
}

/// An OCI image index (a multi-platform image's tag).
const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
/// Docker's manifest list (the same, in Docker's format).
const DOCKER_LIST_MEDIA_TYPE: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Whether a manifest answer is an image index or a manifest list: its
/// `mediaType`, or (OCI lets an index leave that out) a `manifests` list.
fn is_index(bytes: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Probe {
        media_type: Option<String>,
        manifests: Option<Vec<serde_json::Value>>,
    }
    serde_json::from_slice::<Probe>(bytes).is_ok_and(|p| {
        matches!(
            p.media_type.as_deref(),
            Some(INDEX_MEDIA_TYPE | DOCKER_LIST_MEDIA_TYPE)
        ) || (p.media_type.is_none() && p.manifests.is_some())
    })
}

/// A manifest fetched: its bytes, parsed, and lume's plan for it.
struct Remote {
    bytes: Vec<u8>,
    manifest: Manifest,
    plan: Plan,
}

/// Pulls `spec.image` as VM `spec.name` into `work` (a `.creating-` work
/// directory whose provisioning lock the caller holds). Writes
/// `work/disk.img` and `work/config.json`. `begin` is called once the
/// image's settings are known, with the provisional config (so the VM
/// lists as provisioning from then on).
pub fn pull_into(
    spec: &PullSpec,
    cache: &Cache,
    caller: &Caller,
    work: &Path,
    note: &mut dyn FnMut(&str),
) -> Result<VmConfig, RegistryError> {
    if spec.public_only {
        super::auth::check_public(&spec.image)?;
    }
    let creds = super::auth::credentials(
        &spec.image,
        spec.username.as_deref(),
        spec.password.as_deref(),
        caller,
        &cache.token_registry,
    )?;
    let auth = &creds.auth;
    let rt = super::runtime()?;
    let gate = super::auth::gate(spec.public_only, &rt)?;
    let image_s = spec.image.to_string();
    // Every request is lume's own (bounded, credentials to the registry's
    // host only: see `token` and `wire`).
    let with_auth = |e: RegistryError| e.with_door(creds.hint, spec.api, spec.public_only);
    let session = rt
        .block_on(super::token::authorize(
            &spec.image,
            auth,
            false,
            gate.as_ref(),
        ))
        .map_err(with_auth)?;
    let remote = rt.block_on(async {
        let bytes = session
            .manifest(
                &spec.image,
                &[
                    format::MANIFEST_MEDIA_TYPE,
                    "application/vnd.docker.distribution.manifest.v2+json",
                    // Asked for too, so that a registry answers a tag that
                    // is an index with it (else it says "not found"), and
                    // lume says what it is.
                    INDEX_MEDIA_TYPE,
                    DOCKER_LIST_MEDIA_TYPE,
                ],
            )
            .await
            .map_err(with_auth)?;
        if is_index(&bytes) {
            return Err(RegistryError::NotLume {
                image: image_s.clone(),
                why: "it is an image index (a multi-platform container image), not a lume VM image"
                    .into(),
            });
        }
        let manifest: Manifest =
            serde_json::from_slice(&bytes).map_err(|e| RegistryError::NotLume {
                image: image_s.clone(),
                why: super::excerpt(&format!("its manifest is not an image manifest: {e}")),
            })?;
        let plan = format::plan(&manifest).map_err(|why| RegistryError::NotLume {
            image: image_s.clone(),
            why: super::excerpt(&why),
        })?;
        Ok::<_, RegistryError>(Remote {
            bytes: bytes.to_vec(),
            manifest,
            plan,
        })
    })?;
    let manifest_id = Cache::manifest_id(&remote.bytes);
    let dir_name = cache.dir_name(&manifest_id, &spec.image.registry);
    let dir = cache.open_image(&spec.image.organization, &dir_name, &mut || {
        note(&format!(
            "Another pull of {image_s} is using the cache: waiting for it to finish"
        ))
    })?;
    if spec.force {
        dir.clear()?;
    }

    // The config first: it says how large the disk is for legacy images.
    let config_json: Option<serde_json::Value> = match &remote.plan.config {
        Some(c) => {
            if c.size > MAX_CONFIG {
                return Err(RegistryError::NotLume {
                    image: image_s,
                    why: format!("its config is {} bytes", c.size),
                });
            }
            let bar = indicatif::ProgressBar::hidden();
            rt.block_on(fetch_blob(
                &session,
                &spec.image,
                c,
                &dir,
                &bar,
                None,
                false,
            ))?;
            let path = dir.blob(c.sha256_hex().expect("checked by format::plan"));
            let text = fs::read(&path).map_err(io_at(&path))?;
            serde_json::from_slice(&text).ok()
        }
        None => None,
    };
    let cfg = vm_config(&spec.image, &remote, config_json.as_ref(), note)?;
    let disk_size = cfg.disk_size;
    cfg.save(&work.join("config.json"))
        .map_err(|e| RegistryError::Io {
            path: work.join("config.json"),
            source: std::io::Error::other(e.to_string()),
        })?;

    let disk = work.join("disk.img");
    let reassembled = dir.dir.join(REASSEMBLED);
    if cache.enabled && dir.metadata().is_some() && reassembled.exists() {
        note(&format!("Using the cached copy of {image_s}"));
        crate::hypervisor::img::copy_file(&reassembled, &disk).map_err(|e| RegistryError::Io {
            path: reassembled.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        return Ok(cfg);
    }

    // The disk: holes everywhere, then each part's bytes, zeros skipped.
    let out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&disk)
        .map_err(io_at(&disk))?;
    out.set_len(disk_size).map_err(io_at(&disk))?;

    // Every disk blob, at most PARALLEL at a time, into the cache; in the
    // current format each part is unpacked as soon as its blob is there
    // (two unpacking threads), the legacy one in order afterwards.
    let mut unique: Vec<&Descriptor> = Vec::new();
    for p in &remote.plan.parts {
        let limit = max_blob(p.max_len.min(disk_size));
        if p.blob.size > limit {
            return Err(RegistryError::NotLume {
                image: image_s,
                why: format!(
                    "its disk part {} is {} bytes, more than a part of its disk can be",
                    p.blob.digest, p.blob.size
                ),
            });
        }
        if !unique.iter().any(|d| d.digest == p.blob.digest) {
            unique.push(&p.blob);
        }
    }
    // Sizes come from the registry: summed without overflow.
    let total: u64 = unique
        .iter()
        .try_fold(0u64, |t, d| t.checked_add(d.size))
        .ok_or(RegistryError::TooLarge {
            size: u64::MAX,
            max: MAX_DISK,
        })?;
    // The blobs land in the cache before they are unpacked: refuse a pull
    // that cannot fit rather than fill the disk half way.
    let need: u64 = unique
        .iter()
        .filter_map(|d| {
            let hex = d.sha256_hex()?;
            let have = |p: &Path| fs::symlink_metadata(p).map_or(0, |m| m.len());
            if have(&dir.blob(hex)) == d.size {
                return Some(0);
            }
            Some(d.size.saturating_sub(have(&dir.partial(hex))))
        })
        .fold(0u64, u64::saturating_add);
    if let Some(free) = free_bytes(&dir.dir)
        && free < need
    {
        return Err(RegistryError::NoSpace {
            dir: dir.dir.clone(),
            need,
            free,
        });
    }
    // What an earlier (interrupted) pull left: said, so a resumed pull
    // does not look like a fresh one.
    let here: u64 = unique
        .iter()
        .map(|d| cached_len(&dir, d))
        .fold(0u64, u64::saturating_add);
    if here > 0 && !spec.force {
        note(&format!(
            "{} of {} of {image_s} already in the cache (from an earlier pull): fetching the rest",
            indicatif::BinaryBytes(here.min(total)),
            indicatif::BinaryBytes(total)
        ));
    }
    // The bar starts at what the cache holds (each blob's fetch then
    // counts only what it adds), its rate from the bytes fetched now.
    let bar = progress_bar(spec.progress, total, here.min(total));
    let pipelined = remote.plan.format == Format::Current;
    // Blobs whose first part was not unpacked while it streamed (cached,
    // or a stream that had to start over), and parts sharing a blob, are
    // unpacked from the cache by these threads.
    let (tx, rx) = std::sync::mpsc::channel::<(String, bool, bool)>();
    let rx = std::sync::Mutex::new(rx);
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        // downloadProgress for `lume get` and the API, twice a second.
        s.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                write_progress(work, bar.position(), total);
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
        });
        let workers: Vec<_> = (0..if pipelined { 2 } else { 0 })
            .map(|_| {
                s.spawn(|| -> Result<(), RegistryError> {
                    loop {
                        let msg = rx.lock().expect("no panics hold it").recv();
                        let Ok((digest, fresh, streamed)) = msg else {
                            return Ok(());
                        };
                        let parts = remote.plan.parts.iter().filter(|p| p.blob.digest == digest);
                        for part in parts.skip(usize::from(streamed)) {
                            let offset = part.offset.unwrap_or(0);
                            decode_one(part, offset, &dir, &out, disk_size, fresh)?;
                        }
                    }
                })
            })
            .collect();
        let r = rt.block_on(async {
            // In the current format each blob's first part is unpacked
            // into the disk as its bytes arrive (see `Unpacker`).
            let stream_to = |d: &Descriptor| {
                let part = remote
                    .plan
                    .parts
                    .iter()
                    .find(|p| p.blob.digest == d.digest)?;
                let offset = part.offset.unwrap_or(0);
                Some(StreamTo {
                    codec: part.codec,
                    out: &out,
                    path: &disk,
                    offset,
                    max: part.max_len.min(disk_size.saturating_sub(offset)),
                })
            };
            let fetches = futures_util::stream::iter(unique.iter().map(|d| {
                let to = if pipelined { stream_to(d) } else { None };
                fetch_blob(&session, &spec.image, d, &dir, &bar, to, true)
            }))
            .buffer_unordered(PARALLEL);
            futures_util::pin_mut!(fetches);
            while let Some(r) = fetches.next().await {
                let (digest, fresh, streamed) = r?;
                if pipelined {
                    let _ = tx.send((digest, fresh, streamed));
                }
            }
            Ok::<_, RegistryError>(())
        });
        drop(tx);
        let unpacked = workers
            .into_iter()
            .try_for_each(|h| h.join().expect("an unpacking thread panicked"));
        done.store(true, Ordering::Relaxed);
        r.and(unpacked)
    })?;
    write_progress(work, total, total);
    bar.finish_and_clear();
    drop(rt);
    if !pipelined {
        let mut offset = 0u64;
        for part in &remote.plan.parts {
            offset += decode_one(part, offset, &dir, &out, disk_size, false)?;
        }
    }
    out.sync_all().map_err(io_at(&disk))?;
    drop(out);

    if cache.enabled {
        let tmp = dir.dir.join(format!("{REASSEMBLED}.tmp"));
        let _ = fs::remove_file(&tmp);
        crate::hypervisor::img::copy_file(&disk, &tmp).map_err(|e| RegistryError::Io {
            path: tmp.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(io_at(&tmp))?;
        fs::rename(&tmp, &reassembled).map_err(io_at(&reassembled))?;
        for p in &remote.plan.parts {
            if let Some(hex) = p.blob.sha256_hex() {
                let _ = fs::remove_file(dir.blob(hex));
            }
        }
        dir.record(&spec.image.short(), &manifest_id, &remote.bytes)?;
        for old in super::cache::superseded(
            cache,
            &spec.image.organization,
            &spec.image.short(),
            &dir.dir,
        ) {
            let _ = fs::remove_dir_all(old);
        }
    } else {
        dir.remove();
    }
    Ok(cfg)
}

/// The bytes of blob `d` the cache holds: the whole blob, or the
/// `.partial` file an earlier pull left (what [`fetch_blob`] starts from).
fn cached_len(dir: &ImageDir, d: &Descriptor) -> u64 {
    let Some(hex) = d.sha256_hex() else {
        return 0;
    };
    let file = |p: std::path::PathBuf| fs::symlink_metadata(p).ok().filter(|m| m.is_file());
    match file(dir.blob(hex)) {
        Some(m) if m.len() == d.size => d.size,
        _ => file(dir.partial(hex)).map_or(0, |m| m.len().min(d.size)),
    }
}

/// The pull's bar (hidden unless `wanted` on a terminal), at `start`
/// bytes: its first frame shows them, and its rate and ETA count only
/// what arrives afterwards.
fn progress_bar(wanted: bool, total: u64, start: u64) -> indicatif::ProgressBar {
    if !wanted || !std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::with_draw_target(
            Some(total),
            indicatif::ProgressDrawTarget::hidden(),
        );
        start_at(&bar, start);
        return bar;
    }
    let bar = indicatif::ProgressBar::new(total);
    // The rate and ETA only once a rate is known (never `0 B/s ETA 0s`).
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("Pulling {bar:30} {bytes}/{total_bytes} {rate_eta}")
    {
        bar.set_style(style.with_key(
            "rate_eta",
            |st: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                let rate = st.per_sec();
                if st.pos() > 0 && rate.is_finite() && rate >= 1.0 {
                    let _ = write!(
                        w,
                        "{}/s ETA {}",
                        indicatif::BinaryBytes(rate as u64),
                        indicatif::HumanDuration(st.eta())
                    );
                }
            },
        ));
    }
    start_at(&bar, start);
    bar.enable_steady_tick(std::time::Duration::from_millis(250));
    bar
}

/// Puts a fresh bar at `start` bytes, rating only what follows: the
/// estimator takes `start` as its base at this tick, then is reset.
fn start_at(bar: &indicatif::ProgressBar, start: u64) {
    if start > 0 {
        bar.set_position(start);
        bar.tick();
        bar.reset_eta();
    }
}

/// The VM's settings: lume's manifest annotations (current format) or the
/// VM config in the config blob (legacy); a new MAC and VM id.
fn vm_config(
    image: &ImageRef,
    remote: &Remote,
    config: Option<&serde_json::Value>,
    note: &mut dyn FnMut(&str),
) -> Result<VmConfig, RegistryError> {
    let m = &remote.manifest;
    let cfg_str = |k: &str| config.and_then(|c| c.get(k)).and_then(|v| v.as_str());
    let cfg_u64 = |k: &str| config.and_then(|c| c.get(k)).and_then(|v| v.as_u64());
    let os = cfg_str("os")
        .or(m.annotation("org.trycua.lume.os"))
        .unwrap_or("linux");
    if !os.eq_ignore_ascii_case("linux") {
        return Err(RegistryError::ForeignOs {
            image: image.to_string(),
            os: super::excerpt(os),
        });
    }
    // OCI's names (`amd64`); Rust's and the kernel's (`x86_64`) mean the
    // same; an empty value says nothing, as an absent one.
    if let Some(arch) = cfg_str("architecture").filter(|a| !a.trim().is_empty())
        && !format::oci_architecture(&arch.to_ascii_lowercase())
            .eq_ignore_ascii_case(format::host_architecture())
    {
        return Err(RegistryError::ForeignArchitecture {
            image: image.to_string(),
            arch: super::excerpt(arch),
            host: format::host_architecture(),
        });
    }
    let ann = |k: &str| m.annotation(k).and_then(|v| v.parse::<u64>().ok());
    let disk_size = match remote.plan.format {
        Format::Current => remote.plan.disk_size,
        Format::Legacy => remote.plan.disk_size.or(cfg_u64("diskSize")),
    }
    .ok_or_else(|| RegistryError::NotLume {
        image: image.to_string(),
        why: "it does not say how large its disk is".into(),
    })?;
    if disk_size == 0 || disk_size > MAX_DISK {
        return Err(RegistryError::TooLarge {
            size: disk_size,
            max: MAX_DISK,
        });
    }
    let cpu = match ann("org.trycua.lume.cpu-count").or(cfg_u64("cpuCount")) {
        Some(c) if (1..=255).contains(&c) => c as u32,
        Some(c) => {
            note(&format!(
                "The image asks for {c} CPUs, which lume does not give a VM (1 to 255): the VM gets 2 (change it with `lume set --cpu`)"
            ));
            2
        }
        None => 2,
    };
    let memory = match ann("org.trycua.lume.memory-size").or(cfg_u64("memorySize")) {
        Some(m) if (64 << 20..=1 << 40).contains(&m) => m,
        Some(m) => {
            note(&format!(
                "The image asks for {m} bytes of memory, which lume does not give a VM (64 MiB to 1 TiB): the VM gets 2 GiB (change it with `lume set --memory`)"
            ));
            2 << 30
        }
        None => 2 << 30,
    };
    // An image never asks for more than this host has.
    let (host_cpus, host_memory) = host_resources();
    let (cpu, memory) = clamp_to_host(cpu, memory, host_cpus, host_memory, note);
    // An image never chooses a host interface: bridged images come as nat.
    let mode = m
        .annotation("org.trycua.lume.network-mode")
        .and_then(|s| s.parse::<NetworkMode>().ok())
        .unwrap_or(NetworkMode::Nat);
    let network_mode = if crate::network::driver::of(&mode).image_may_ask() {
        mode
    } else {
        note(&format!(
            "The image asks for network mode {mode}; the VM gets nat (change it with `lume set --network`)"
        ));
        NetworkMode::Nat
    };
    Ok(VmConfig {
        os: "linux".into(),
        cpu_count: cpu,
        memory_size: memory,
        disk_size,
        mac_address: Some(MacAddress::random()),
        display: crate::vm::config::DEFAULT_DISPLAY.into(),
        network_mode,
        kernel_boot: None,
        disk_format: DiskFormat::Raw,
        publish: Vec::new(),
        unsafe_host_loopback: false,
        network_policy: Default::default(),
        vm_id: Some(crate::guest::cloudinit::new_vm_id()),
        cloud_init: CloudInit::default(),
        extra: Default::default(),
    })
}

/// Bytes available to lume's user on the filesystem of `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a valid C string and `st` a buffer statvfs fills.
    let r = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if r != 0 {
        return None;
    }
    // SAFETY: statvfs succeeded, so it filled `st`.
    let st = unsafe { st.assume_init() };
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

/// The host's CPU count and memory in bytes.
fn host_resources() -> (u32, u64) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    // SAFETY: sysconf only reads system values.
    let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let memory = if pages > 0 && page > 0 {
        (pages as u64).saturating_mul(page as u64)
    } else {
        u64::MAX
    };
    (cpus, memory)
}

/// An image's CPU count and memory, at most the host's (with a note).
fn clamp_to_host(
    cpu: u32,
    memory: u64,
    host_cpus: u32,
    host_memory: u64,
    note: &mut dyn FnMut(&str),
) -> (u32, u64) {
    let cpu = if cpu > host_cpus {
        note(&format!(
            "The image asks for {cpu} CPUs; this host has {host_cpus}, so the VM gets {host_cpus} (change it with `lume set --cpu`)"
        ));
        host_cpus.max(1)
    } else {
        cpu
    };
    // Whole MiB, as lume sizes memory.
    let host_memory = host_memory & !((1 << 20) - 1);
    let memory = if memory > host_memory && host_memory >= 64 << 20 {
        note(&format!(
            "The image asks for {} MiB of memory; this host has {} MiB, so the VM gets that (change it with `lume set --memory`)",
            memory >> 20,
            host_memory >> 20
        ));
        host_memory
    } else {
        memory
    };
    (cpu, memory)
}

/// Opens a cache file for appending without following a link.
fn open_partial(path: &Path) -> Result<File, RegistryError> {
    OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(io_at(path))
}

/// Where a blob's bytes are unpacked while they stream in.
struct StreamTo<'a> {
    codec: format::Codec,
    out: &'a File,
    path: &'a Path,
    offset: u64,
    max: u64,
}

/// A thread unpacking one part into the disk from the bytes a download
/// hands it (the same bytes that go into the cache and the digest). What
/// it writes counts only once the digest matched: a pull whose blob never
/// matches fails and its work directory (the disk with it) is removed;
/// a stream that starts over is abandoned and its part punched back into
/// a hole, so no byte of a wrong blob stays where zeros belong.
struct Unpacker {
    tx: Option<tokio::sync::mpsc::Sender<bytes::Bytes>>,
    job: tokio::task::JoinHandle<Result<u64, format::DecodeError>>,
}

impl Unpacker {
    fn start(to: &StreamTo<'_>) -> Result<Self, RegistryError> {
        let out = to.out.try_clone().map_err(io_at(to.path))?;
        // A few pieces in flight: the download waits for the unpacking.
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let (codec, offset, max) = (to.codec, to.offset, to.max);
        let job = tokio::task::spawn_blocking(move || {
            let input = ChannelReader {
                rx,
                piece: bytes::Bytes::new(),
            };
            format::decode_part(codec, input, &out, offset, max)
        });
        Ok(Self { tx: Some(tx), job })
    }

    /// Hands over the next bytes; an unpacker that stopped (an error,
    /// seen at [`Unpacker::finish`]) takes no more.
    async fn feed(&mut self, bytes: bytes::Bytes) {
        if let Some(tx) = &self.tx
            && tx.send(bytes).await.is_err()
        {
            self.tx = None;
        }
    }

    /// The end of the blob: whether the whole part was unpacked.
    async fn finish(mut self) -> bool {
        self.tx = None;
        matches!(self.job.await, Ok(Ok(_)))
    }

    /// Stops it and turns its part back into a hole.
    async fn abandon(mut self, to: &StreamTo<'_>) -> Result<(), RegistryError> {
        self.tx = None;
        let _ = self.job.await;
        punch_hole(to.out, to.offset, to.max).map_err(io_at(to.path))
    }
}

/// The unpacker's input: the pieces of the download, in order; the end
/// of the channel is the end of the blob.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<bytes::Bytes>,
    piece: bytes::Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.piece.is_empty() {
            match self.rx.blocking_recv() {
                Some(p) => self.piece = p,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.piece.len());
        buf[..n].copy_from_slice(&self.piece.split_to(n));
        Ok(n)
    }
}

/// Deallocates `[offset, offset+len)` of `f` (it reads as zeros again).
fn punch_hole(f: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let len = len.min(i64::MAX as u64 - offset.min(i64::MAX as u64));
    if len == 0 {
        return Ok(());
    }
    // SAFETY: fallocate on a descriptor we own; no memory is touched.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// One blob into the cache: skipped when complete there, resumed from its
/// `.partial`, verified against its digest, fsynced and renamed into place.
/// With `to`, also unpacked there as it streams; the answer says whether
/// that happened (digest matched and the part unpacked whole), and
/// whether the blob was downloaded (verified) just now. `precounted`:
/// the bar already counts the blob's [`cached_len`].
async fn fetch_blob(
    session: &super::token::Session,
    image: &ImageRef,
    d: &Descriptor,
    dir: &ImageDir,
    bar: &indicatif::ProgressBar,
    to: Option<StreamTo<'_>>,
    precounted: bool,
) -> Result<(String, bool, bool), RegistryError> {
    let hex = d.sha256_hex().expect("digests are checked by format::plan");
    let mut pre = if precounted { cached_len(dir, d) } else { 0 };
    // Counts the cache's `n` bytes on the bar, less what it counted already.
    let count_cached = |n: u64, pre: &mut u64| {
        bar.set_position(bar.position().saturating_sub(*pre).saturating_add(n));
        *pre = 0;
    };
    let done = dir.blob(hex);
    if fs::symlink_metadata(&done).is_ok_and(|m| m.is_file() && m.len() == d.size) {
        count_cached(d.size, &mut pre);
        return Ok((d.digest.clone(), false, false));
    }
    let partial = dir.partial(hex);
    let registry = &image.registry;
    for _attempt in 0..DIGEST_ATTEMPTS {
        let mut file = open_partial(&partial)?;
        let mut have = file.metadata().map_err(io_at(&partial))?.len();
        if have > d.size {
            file.set_len(0).map_err(io_at(&partial))?;
            have = 0;
        }
        let mut unpacker = to.as_ref().map(Unpacker::start).transpose()?;
        // The digest (and the unpacker) run over what is already there.
        let mut hash = Sha256::new();
        {
            let mut r = File::open(&partial).map_err(io_at(&partial))?;
            let mut buf = vec![0u8; 1 << 20];
            let mut left = have;
            while left > 0 {
                let n = r.read(&mut buf).map_err(io_at(&partial))?;
                if n == 0 {
                    break;
                }
                let n = n.min(left as usize);
                hash.update(&buf[..n]);
                if let Some(u) = &mut unpacker {
                    u.feed(bytes::Bytes::copy_from_slice(&buf[..n])).await;
                }
                left -= n as u64;
            }
        }
        count_cached(have, &mut pre);
        let mut resumes = 0;
        while have < d.size {
            session.keep_fresh().await?;
            let resp = session.blob(image, d.digest.as_str(), have).await;
            let mut stream = match resp {
                Ok(Blob::Partial(s)) => s,
                Ok(Blob::Full(s)) => {
                    // The registry ignored the range: start over.
                    file.set_len(0).map_err(io_at(&partial))?;
                    file.seek(std::io::SeekFrom::Start(0))
                        .map_err(io_at(&partial))?;
                    bar.set_position(bar.position().saturating_sub(have));
                    if have > 0
                        && let (Some(u), Some(to)) = (unpacker.take(), &to)
                    {
                        // It has seen bytes that are not coming again.
                        u.abandon(to).await?;
                    }
                    have = 0;
                    hash = Sha256::new();
                    s
                }
                Err(e) => {
                    resumes += 1;
                    if resumes > RESUMES
                        || !matches!(
                            e,
                            RegistryError::Unreachable { .. } | RegistryError::Protocol { .. }
                        )
                    {
                        return Err(e);
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(500 * resumes as u64))
                        .await;
                    continue;
                }
            };
            let mut broke = false;
            let mut window = tokio::time::Instant::now();
            let mut window_bytes = 0u64;
            loop {
                let chunk = match tokio::time::timeout(RATE_WINDOW, stream.next()).await {
                    Ok(Some(c)) => c,
                    Ok(None) => break,
                    Err(_) => {
                        broke = true;
                        break;
                    }
                };
                match chunk {
                    Ok(bytes) => {
                        window_bytes += bytes.len() as u64;
                        if window.elapsed() >= RATE_WINDOW {
                            if window_bytes < MIN_WINDOW_BYTES {
                                // Too slow to ever finish: broken off.
                                broke = true;
                                break;
                            }
                            window = tokio::time::Instant::now();
                            window_bytes = 0;
                        }
                        if have + bytes.len() as u64 > d.size {
                            // Longer than the manifest says: corrupt.
                            have = d.size + 1;
                            break;
                        }
                        file.write_all(&bytes).map_err(io_at(&partial))?;
                        hash.update(&bytes);
                        have += bytes.len() as u64;
                        bar.inc(bytes.len() as u64);
                        if let Some(u) = &mut unpacker {
                            u.feed(bytes).await;
                        }
                    }
                    Err(_) => {
                        broke = true;
                        break;
                    }
                }
            }
            if have > d.size {
                break;
            }
            if broke || have < d.size {
                resumes += 1;
                if resumes > RESUMES {
                    return Err(RegistryError::Protocol {
                        registry: registry.clone(),
                        detail: format!("the transfer of {} broke off {resumes} times", d.digest),
                    });
                }
            }
        }
        let got = format!("sha256:{}", format::hex(&hash.finalize()));
        if have == d.size && got == d.digest {
            file.sync_all().map_err(io_at(&partial))?;
            fs::rename(&partial, &done).map_err(io_at(&done))?;
            File::open(&dir.dir)
                .and_then(|f| f.sync_all())
                .map_err(io_at(&dir.dir))?;
            let streamed = match (unpacker, &to) {
                (Some(u), Some(to)) => {
                    let whole = u.finish().await;
                    if !whole {
                        // Unpacked again from the cache, which says why
                        // it cannot be.
                        punch_hole(to.out, to.offset, to.max).map_err(io_at(to.path))?;
                    }
                    whole
                }
                _ => false,
            };
            return Ok((d.digest.clone(), true, streamed));
        }
        // Wrong bytes: never kept, fetched anew; what they unpacked to is
        // punched out.
        if let (Some(u), Some(to)) = (unpacker, &to) {
            u.abandon(to).await?;
        }
        drop(file);
        fs::remove_file(&partial).map_err(io_at(&partial))?;
        bar.set_position(bar.position().saturating_sub(have.min(d.size)));
    }
    Err(RegistryError::Corrupt {
        image: image.to_string(),
        digest: d.digest.clone(),
        attempts: DIGEST_ATTEMPTS,
    })
}

/// Writes one part into `out` at `offset`; returns its length. A blob
/// that was not downloaded (verified) just now is hashed again as it is
/// read, so a cache file changed since its download is refused.
fn decode_one(
    part: &format::DiskPart,
    offset: u64,
    dir: &ImageDir,
    out: &File,
    disk_size: u64,
    fresh: bool,
) -> Result<u64, RegistryError> {
    let hex = part.blob.sha256_hex().expect("checked by format::plan");
    let path = dir.blob(hex);
    let f = File::open(&path).map_err(io_at(&path))?;
    let max = part.max_len.min(disk_size.saturating_sub(offset));
    let unpack_error = |e: format::DecodeError| match e {
        format::DecodeError::Io(source) => RegistryError::Io {
            path: path.clone(),
            source,
        },
        other => RegistryError::NotLume {
            image: path.display().to_string(),
            why: format!("a disk part cannot be unpacked: {other}"),
        },
    };
    if fresh {
        return format::decode_part(part.codec, f, out, offset, max).map_err(unpack_error);
    }
    let mut reader = format::HashingReader::new(f);
    let n = format::decode_part(part.codec, &mut reader, out, offset, max).map_err(unpack_error)?;
    let (digest, _) = reader.finish().map_err(io_at(&path))?;
    if digest != part.blob.digest {
        let _ = fs::remove_file(&path);
        return Err(RegistryError::CorruptCache { path });
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An image asking for 255 CPUs and 1 TiB gets the host's at most.
    /// An image's config says what it runs on: another OS or another CPU
    /// architecture is refused before any disk byte is fetched; upstream
    /// lume's configs name no architecture and are taken as the host's.
    #[test]
    fn foreign_images_are_refused_by_their_config() {
        let image = ImageRef::parse("img:v1", "r.example", "test").unwrap();
        let manifest: Manifest = serde_json::from_value(serde_json::json!({
            "schemaVersion": 2,
            "layers": [{
                "mediaType": format::DISK_MEDIA_TYPE,
                "digest": format!("sha256:{}", "a".repeat(64)),
                "size": 100,
                "annotations": {format::UNCOMPRESSED_SIZE: "1048576"}
            }]
        }))
        .unwrap();
        let plan = format::plan(&manifest).unwrap();
        let remote = Remote {
            bytes: Vec::new(),
            manifest,
            plan,
        };
        let config = |v: serde_json::Value| vm_config(&image, &remote, Some(&v), &mut |_| {});
        let host = format::host_architecture();
        assert!(config(serde_json::json!({"os": "linux", "architecture": host})).is_ok());
        assert!(config(serde_json::json!({"os": "linux"})).is_ok());
        let other = if host == "s390x" { "amd64" } else { "s390x" };
        match config(serde_json::json!({"os": "linux", "architecture": other})) {
            Err(e @ RegistryError::ForeignArchitecture { .. }) => {
                let text = e.to_string();
                assert!(text.contains(&format!("for {other} machines")), "{text}");
                assert!(text.contains(&format!("this host is {host}")), "{text}");
            }
            other => panic!("{:?}", other.map(|_| ())),
        }
        assert!(matches!(
            config(serde_json::json!({"os": "macOS"})),
            Err(RegistryError::ForeignOs { .. })
        ));
        // The kernel's and Rust's names are OCI's; empty says nothing.
        let rust = std::env::consts::ARCH;
        assert!(config(serde_json::json!({"os": "linux", "architecture": rust})).is_ok());
        assert!(config(serde_json::json!({"os": "linux", "architecture": ""})).is_ok());
        // A registry's `os` reaches the terminal escaped and cut.
        let evil = format!("\x1b]0;owned\x07{}", "x".repeat(5000));
        match config(serde_json::json!({"os": evil})) {
            Err(e @ RegistryError::ForeignOs { .. }) => {
                let text = e.to_string();
                assert!(!text.contains('\x1b') && text.len() < 600, "{text}");
            }
            other => panic!("{:?}", other.map(|_| ())),
        }
        // Values lume never gives a VM are replaced, and said so.
        let mut notes = Vec::new();
        let c = vm_config(
            &image,
            &remote,
            Some(&serde_json::json!({"os": "linux", "cpuCount": 512, "memorySize": 1u64 << 50})),
            &mut |n| notes.push(n.to_string()),
        )
        .unwrap();
        assert_eq!((c.cpu_count, c.memory_size), (2.min(c.cpu_count), 2 << 30));
        assert!(
            notes.iter().any(|n| n.contains("512 CPUs"))
                && notes.iter().any(|n| n.contains(&(1u64 << 50).to_string())),
            "{notes:?}"
        );
        // What lume pushes names this host's architecture.
        let pushed: serde_json::Value = serde_json::from_slice(&format::config_blob()).unwrap();
        assert_eq!(pushed["architecture"], host);
    }

    /// A tag that is a multi-platform index is told apart from a manifest.
    #[test]
    fn image_indexes_are_recognised() {
        let oci = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;
        let docker = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json","manifests":[]}"#;
        let bare = br#"{"schemaVersion":2,"manifests":[{"digest":"sha256:00"}]}"#;
        let manifest = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[]}"#;
        assert!(is_index(oci) && is_index(docker) && is_index(bare));
        assert!(!is_index(manifest) && !is_index(b"not json"));
    }

    /// A resumed pull's bar starts at the cached bytes, and its rate does
    /// not count them as if they had just arrived.
    #[test]
    fn a_resumed_bar_rates_only_new_bytes() {
        let bar = indicatif::ProgressBar::with_draw_target(
            Some(48 << 20),
            indicatif::ProgressDrawTarget::hidden(),
        );
        start_at(&bar, 24 << 20);
        assert_eq!(bar.position(), 24 << 20);
        std::thread::sleep(std::time::Duration::from_millis(100));
        bar.inc(1024);
        bar.tick();
        // 1 KiB in at least 0.1 s; counting the cache would be ~240 MiB/s.
        let rate = bar.per_sec();
        assert!(rate < (1 << 20) as f64, "{rate}");
    }

    #[test]
    fn image_resources_are_clamped_to_the_host() {
        let mut notes = Vec::new();
        let (c, m) = clamp_to_host(255, 1 << 40, 2, (4 << 30) + 123, &mut |n| {
            notes.push(n.to_string())
        });
        assert_eq!((c, m), (2, 4 << 30));
        assert_eq!(notes.len(), 2, "{notes:?}");
        let (c, m) = clamp_to_host(1, 1 << 30, 2, 4 << 30, &mut |_| panic!("no note"));
        assert_eq!((c, m), (1, 1 << 30));
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// A stream unpacked while it downloads, then abandoned (a wrong
    /// digest, a registry starting over): its part is a hole again, so a
    /// second, right stream whose part is mostly zeros (not written)
    /// leaves no byte of the first one behind.
    #[test]
    fn an_abandoned_stream_leaves_nothing_in_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let out = File::create(&path).unwrap();
        let (offset, len) = (1u64 << 20, 4usize << 20);
        out.set_len(8 << 20).unwrap();
        let to = StreamTo {
            codec: format::Codec::Gzip,
            out: &out,
            path: &path,
            offset,
            max: len as u64,
        };
        let rt = super::super::runtime().unwrap();
        let wrong = gzip(&vec![0xAAu8; len]);
        let mut right_data = vec![0u8; len];
        right_data[len / 2..len / 2 + 5].copy_from_slice(b"right");
        let right = gzip(&right_data);
        rt.block_on(async {
            let mut u = Unpacker::start(&to).unwrap();
            for piece in wrong.chunks(1000) {
                u.feed(bytes::Bytes::copy_from_slice(piece)).await;
            }
            // All of it went in: the wrong bytes are in the disk now.
            u.abandon(&to).await.unwrap();
            let mut u = Unpacker::start(&to).unwrap();
            for piece in right.chunks(777) {
                u.feed(bytes::Bytes::copy_from_slice(piece)).await;
            }
            assert!(u.finish().await, "the right stream unpacks");
            // A truncated stream does not count as unpacked.
            let mut u = Unpacker::start(&to).unwrap();
            u.feed(bytes::Bytes::copy_from_slice(&right[..right.len() / 2]))
                .await;
            assert!(!u.finish().await, "half a stream is not a part");
        });
        let disk = fs::read(&path).unwrap();
        let mut want = vec![0u8; 8 << 20];
        want[offset as usize..offset as usize + len].copy_from_slice(&right_data);
        assert!(disk == want, "bytes of the abandoned stream were left");
        let blocks = std::os::unix::fs::MetadataExt::blocks(&fs::metadata(&path).unwrap());
        assert!(
            blocks * 512 <= 64 << 10,
            "the part is not sparse: {blocks} blocks"
        );
    }
}
