//! Lifecycle actions: create, run, stop, list, get, set, clone, delete.
//! One enum of actions, one executor, two doors (CLI and HTTP API).

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use super::caller::{Access, OpenError};
use super::config::{CloudInit, ConfigError, DiskFormat, KernelBoot, MacAddress, VmConfig};
use super::details::VmDetails;
use super::lock::VmLock;
use super::name::VmName;
use super::size::format_size;
use super::state::RunState;
use super::store::{Store, StoreError, UnsafeDir, Vm, io_at};
use crate::guest::power::{self, PowerMethod, PowerRequest, SshLogin};
use crate::hypervisor::img::{self, CopyKind, ImageError};
use crate::hypervisor::process;
use crate::hypervisor::supervisor::{self, HostFile, RunError, RunRequest, VncRequest};
use crate::hypervisor::vnc;
use crate::image::download::Destinations;
use crate::image::import::{self, ImportError};
use crate::image::{ImageSource, Sha256Digest};
use crate::network::NetworkMode;
use crate::network::attach::{AttachError, AttachOptions};
use crate::network::publish::{PortMapping, Proto};
use crate::settings::{Settings, SettingsError};

/// Errors of the lifecycle actions.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Policy(#[from] crate::network::policy::PolicyError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Run(#[from] RunError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Import(#[from] ImportError),
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error(transparent)]
    Network(#[from] AttachError),
    #[error(transparent)]
    Seed(#[from] crate::guest::cloudinit::SeedError),
    #[error(transparent)]
    Keys(#[from] crate::guest::keys::KeyError),
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    #[error(transparent)]
    Snapshot(#[from] super::snapshot::SnapshotError),
    #[error("macOS guests need an Apple host: lume on Linux creates Linux VMs (--os linux)")]
    MacOsGuest,
    #[error("Unknown OS '{0}': use --os linux")]
    UnknownOs(String),
    #[error("CPU count must be at least 1: use --cpu 1 or more")]
    NoCpu,
    #[error("CPU count {0} is more than QEMU supports here (at most 255)")]
    TooManyCpus(u32),
    #[error("Memory size {0} is too small: give the VM at least 64MB, for example 2GB")]
    MemoryTooSmall(String),
    #[error(
        "Disk size {0} is too small: give the VM at least 1MB, for example 20GB (a cloud image needs a few GB)"
    )]
    DiskTooSmall(String),
    #[error("Disk size {0} is too large: lume's disks are at most 1024TB")]
    DiskTooLarge(String),
    #[error(
        "Disk of VM '{name}' can only grow: it is {current} now, {requested} was asked for; give a size of {current} or more"
    )]
    DiskShrink {
        name: VmName,
        current: String,
        requested: String,
    },
    #[error("VM '{0}' is running: stop it before changing its disk (`lume stop {0}`)")]
    DiskWhileRunning(VmName),
    #[error("{what} {path} does not exist or is not a file: check the path")]
    MissingFile { what: &'static str, path: PathBuf },
    #[error("--initrd and --cmdline need --kernel")]
    InitrdWithoutKernel,
    #[error(
        "Choose one boot source: --kernel (direct kernel boot) or --image (disk image), not both"
    )]
    TwoBootSources,
    #[error("--image-sha256 checks an image: give --image too")]
    Sha256WithoutImage,
    #[error(
        "Deleting VM '{0}' needs confirmation: run `lume delete {0} --force` when not on a terminal"
    )]
    NeedsForce(VmName),
    #[error("Source VM '{0}' is running: stop it before cloning (`lume stop {0}`)")]
    CloneWhileRunning(VmName),
    #[error(
        "VM '{name}' did not stop within {seconds}s even after QEMU was forced off; its supervisor (pid {pid}) may be stuck"
    )]
    StopTimeout {
        name: VmName,
        seconds: u64,
        pid: u32,
    },
    #[error("{}", forbidden_message(path, reason))]
    Forbidden { path: PathBuf, reason: Denied },
    #[error("A timeout of {0} seconds is too long: give at most {MAX_TIMEOUT_SECS} seconds")]
    TimeoutTooLong(u64),
    #[error(
        "{0} shared directories asked for: lume shares at most {max} per VM; share a common parent directory instead",
        max = crate::hypervisor::virtiofs::MAX_SHARES
    )]
    TooManyShares(usize),
    #[error("USB storage image {0} is given twice: give each image once")]
    UsbStorageTwice(PathBuf),
    #[error(
        "Shared directory {0} is not a directory: --shared-dir shares directories; share the directory that holds it"
    )]
    NotDirectory(PathBuf),
    #[error("VM '{0}' is not running: start it with `lume run {0}`")]
    NotRunning(VmName),
    #[error(
        "VM '{name}' was asked to power off {} but is still running after {seconds}s: wait longer (--timeout) or force it off with `lume stop {name}`",
        method.describe()
    )]
    ShutdownTimeout {
        name: VmName,
        method: PowerMethod,
        seconds: u64,
    },
    #[error(
        "VM '{0}' could not be asked to power off: no guest agent answered, SSH was not available and the ACPI power button could not be pressed; force it off with `lume stop {0}`"
    )]
    NoGracefulShutdown(VmName),
    #[error(
        "VM '{0}' cannot be restarted gracefully: no guest agent answered and SSH was not available; install qemu-guest-agent in the guest, or reset it like the reset button with `lume restart {0} --force`"
    )]
    NoGracefulReboot(VmName),
}

/// Why a host path was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// The caller could not open the file itself.
    Caller {
        what: &'static str,
        uid: u32,
        access: Access,
    },
    /// Another user can change this storage directory.
    Storage { who: String },
    /// Shared directories are for root only: virtiofsd serves them as root.
    ShareNeedsRoot { uid: u32 },
    /// The path goes through a /proc magic link or a symbolic link loop.
    MagicLink,
}

fn forbidden_message(path: &Path, reason: &Denied) -> String {
    match reason {
        Denied::Caller {
            what: "Shared directory",
            uid,
            access,
        } => format!(
            "Shared directory {}: the caller (uid {uid}) lacks permission to {} it; lume opens host paths with the rights of whoever asked: give that user access or name a directory it can {}",
            path.display(),
            if *access == Access::Read {
                "list"
            } else {
                "list and write in"
            },
            if *access == Access::Read {
                "list"
            } else {
                "write in"
            },
        ),
        Denied::ShareNeedsRoot { uid } => format!(
            "Shared directory {}: only root may share directories (the caller is uid {uid}): virtiofsd runs as root and would read and write below the directory with root's rights, not the caller's; run lume as root (sudo) or copy the files into the guest another way (scp, lume ssh)",
            path.display()
        ),
        Denied::Caller { what, uid, access } => format!(
            "{what} {}: the caller (uid {uid}) lacks permission to {} it; lume opens host files with the rights of whoever asked: give that user access or name a file it can {}",
            path.display(),
            if *access == Access::Read {
                "read"
            } else {
                "read and write"
            },
            if *access == Access::Read {
                "read"
            } else {
                "write"
            },
        ),
        Denied::MagicLink => format!(
            "{}: the path goes through a /proc or /dev/fd link or a loop of symbolic links, which lume does not follow for a caller (it could reach files the caller cannot): give the real path",
            path.display()
        ),
        Denied::Storage { who } => UnsafeDir {
            dir: path.to_path_buf(),
            who: who.clone(),
        }
        .to_string(),
    }
}

impl From<UnsafeDir> for VmError {
    fn from(e: UnsafeDir) -> Self {
        Self::Forbidden {
            path: e.dir,
            reason: Denied::Storage { who: e.who },
        }
    }
}

/// The longest stop timeout either door accepts.
pub const MAX_TIMEOUT_SECS: u64 = 3600;

/// A stop timeout in seconds, checked the same way for the CLI and the API.
pub fn stop_timeout(seconds: u64) -> Result<Duration, VmError> {
    if seconds > MAX_TIMEOUT_SECS {
        return Err(VmError::TimeoutTooLong(seconds));
    }
    Ok(Duration::from_secs(seconds))
}

/// Opens a directory to share with the caller's rights (to list it, and to
/// write in it unless read-only).
fn open_dir_for(
    ctx: &Context,
    path: &Path,
    read_only: bool,
) -> Result<crate::hypervisor::virtiofs::HostDir, VmError> {
    let what = "Shared directory";
    // virtiofsd (Debian's C one) runs as root without uid mapping: below
    // the top directory, every check would be root's, not the caller's.
    if !ctx.caller.is_root() {
        return Err(VmError::Forbidden {
            path: path.to_path_buf(),
            reason: Denied::ShareNeedsRoot {
                uid: ctx.caller.uid,
            },
        });
    }
    let access = if read_only {
        Access::Read
    } else {
        Access::ReadWrite
    };
    match ctx.caller.open_dir(path, access) {
        Ok(dir) => Ok(crate::hypervisor::virtiofs::HostDir::new(dir, read_only)),
        Err(OpenError::Forbidden { path, uid }) => Err(VmError::Forbidden {
            path,
            reason: Denied::Caller { what, uid, access },
        }),
        Err(OpenError::NotRegular { path }) => Err(VmError::NotDirectory(path)),
        Err(OpenError::Missing { path }) => Err(VmError::MissingFile { what, path }),
        Err(OpenError::MagicLink { path }) => Err(VmError::Forbidden {
            path,
            reason: Denied::MagicLink,
        }),
        Err(OpenError::Io { path, source }) => Err(RunError::Io { path, source }.into()),
    }
}

/// Opens a host file named in a request with the caller's rights.
fn open_for(
    ctx: &Context,
    what: &'static str,
    path: &Path,
    access: Access,
) -> Result<HostFile, VmError> {
    // A detached supervisor gets its parent's open files as /proc links.
    let handed_over =
        std::env::var_os(supervisor::START_LOG_ENV).is_some() && path.starts_with("/proc");
    let opened = if handed_over {
        ctx.caller.open_from_parent(path, access)
    } else {
        ctx.caller.open(path, access)
    };
    match opened {
        Ok(file) => Ok(HostFile::new(path, file)),
        Err(OpenError::Forbidden { path, uid }) => Err(VmError::Forbidden {
            path,
            reason: Denied::Caller { what, uid, access },
        }),
        Err(OpenError::Missing { path } | OpenError::NotRegular { path }) => {
            Err(VmError::MissingFile { what, path })
        }
        Err(OpenError::MagicLink { path }) => Err(VmError::Forbidden {
            path,
            reason: Denied::MagicLink,
        }),
        Err(OpenError::Io { path, source }) => Err(RunError::Io { path, source }.into()),
    }
}

/// What `create` needs.
#[derive(Debug, Clone)]
pub struct CreateSpec {
    pub name: VmName,
    pub os: String,
    pub cpu: u32,
    pub memory: u64,
    pub disk_size: u64,
    pub display: String,
    pub network: NetworkMode,
    pub mac: Option<MacAddress>,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
    /// A host file or an http(s) URL to import as the disk.
    pub image: Option<ImageSource>,
    /// Expected SHA-256 of the image file as stored or downloaded.
    pub image_sha256: Option<Sha256Digest>,
    /// Show download progress (on a terminal only).
    pub progress: bool,
    /// Ports published at every start.
    pub publish: Vec<PortMapping>,
    /// The user's own cloud-init user-data, stored with the VM.
    pub cloud_init: Option<PathBuf>,
    /// No cloud-init seed at all.
    pub no_cloud_init: bool,
    /// User `lume` gets no password (key logins only).
    pub no_password: bool,
    /// Which addresses an image URL may lead to: public ones only for the
    /// API, unless config.yaml's `apiPrivateImageUrls` is true.
    pub url_destinations: Destinations,
    /// Egress rules and isolation (config.json `networkPolicy`).
    pub policy: crate::network::policy::Policy,
}

/// What `run` needs.
#[derive(Debug, Clone, Default)]
pub struct RunSpec {
    pub name: Option<VmName>,
    /// Overrides the saved mode for this run only.
    pub network: Option<NetworkMode>,
    pub mounts: Vec<PathBuf>,
    pub disks: Vec<PathBuf>,
    /// Raw images attached as USB mass storage (`--usb-storage`).
    pub usb_storage: Vec<PathBuf>,
    /// Directories shared with the guest: (path, read-only).
    pub shared_dirs: Vec<(PathBuf, bool)>,
    /// Ports published for this run, on top of the saved ones.
    pub publish: Vec<PortMapping>,
    pub detach: bool,
    /// Replaces the saved network policy for this run only.
    pub policy: Option<crate::network::policy::Policy>,
    /// Disk changes are discarded when the VM stops (docs/snapshots.md).
    pub ephemeral: bool,
    /// The VNC display's loopback port; 0 picks a free one (lume's default).
    pub vnc_port: u16,
    /// The VNC password; `None`: a random one for this run.
    pub vnc_password: Option<String>,
    /// `--display vnc|native`: open a VNC viewer once the VM runs, when one
    /// is installed and a graphical session is there (the CLI only).
    pub open_viewer: bool,
    /// `lume run --detach` from lume's command line: its supervisor may be
    /// forked from this process ([`process::can_fork`] decides), and `ps`
    /// then shows it as that command. Other doors start lume again (a
    /// restore's VM would show as `lume snapshot restore …` for its life).
    pub fork_supervisor: bool,
}

/// What `set` changes.
#[derive(Debug, Clone)]
pub struct SetSpec {
    pub name: VmName,
    pub cpu: Option<u32>,
    pub memory: Option<u64>,
    pub disk_size: Option<u64>,
    pub network: Option<NetworkMode>,
    /// WIDTHxHEIGHT, checked by [`super::config::parse_display`].
    pub display: Option<String>,
    /// Replaces the saved network policy (an empty one clears it).
    pub policy: Option<crate::network::policy::Policy>,
}

impl SetSpec {
    /// Whether it changes nothing (which is no error, as in lume).
    pub fn is_empty(&self) -> bool {
        self.cpu.is_none()
            && self.memory.is_none()
            && self.disk_size.is_none()
            && self.network.is_none()
            && self.display.is_none()
            && self.policy.is_none()
    }
}

/// One request to change or read VMs.
#[derive(Debug, Clone)]
pub enum Action {
    /// Create a VM directory with its config and disk.
    Create(Box<CreateSpec>),
    /// Start a VM; in the foreground unless `detach`.
    Run(RunSpec),
    /// Ask the guest to power off (agent, SSH, ACPI, in that order), then
    /// force QEMU off once `timeout` has passed.
    Stop { name: VmName, timeout: Duration },
    /// Ask the guest to power off (agent, SSH, ACPI) and wait up to
    /// `timeout` for it; never forces.
    Shutdown {
        name: VmName,
        timeout: Duration,
        login: SshLogin,
    },
    /// Ask the guest to reboot (agent, SSH); with `force`, when neither
    /// works, reset the VM (not graceful).
    Restart {
        name: VmName,
        force: bool,
        login: SshLogin,
    },
    /// Every VM.
    List,
    /// One VM.
    Get { name: VmName },
    /// Change settings from the next start.
    Set(SetSpec),
    /// User mode: whether the guest may reach the host's loopback through its
    /// gateway (config.json `unsafeHostLoopback`), from the next start.
    /// Unsafe for untrusted guests.
    SetHostLoopback { name: VmName, allow: bool },
    /// Copy a stopped VM under a new name with a new MAC address, into
    /// `dest` (another location) or the source's own location.
    Clone {
        source: VmName,
        target: VmName,
        dest: Option<Store>,
        /// From this snapshot of the source (O(1); the source may run).
        snapshot: Option<String>,
    },
    /// Snapshots of one VM (docs/snapshots.md).
    Snapshot { name: VmName, op: SnapshotOp },
    /// Remove a VM, stopping it first when it runs (as lume). `force` or
    /// `confirmed` (the user agreed) must be given.
    Delete {
        name: VmName,
        force: bool,
        confirmed: bool,
    },
    /// Pull an image from a registry as a new VM (docs/images.md).
    Pull(Box<crate::registry::pull::PullSpec>),
    /// Push a stopped VM to a registry.
    Push {
        name: VmName,
        spec: Box<crate::registry::push::PushSpec>,
    },
    /// The images in the cache, for one organization.
    Images { organization: String },
    /// Remove the cached images.
    Prune,
}

/// What `Action::Snapshot` does.
#[derive(Debug, Clone)]
pub enum SnapshotOp {
    /// Take a snapshot (named `snapshot-<unix time>` when no name is
    /// given); `memory` also saves the running VM's memory.
    Create {
        snap: Option<String>,
        memory: bool,
    },
    List,
    /// Go back to a snapshot; a memory snapshot (or a VM that was running)
    /// is started again.
    Restore {
        snap: String,
    },
    Delete {
        snap: String,
    },
    /// Merge a stopped VM's layered disk into a plain `disk.img`.
    Flatten,
}

/// What an action produced.
#[derive(Debug)]
pub enum Outcome {
    Created(VmDetails),
    /// A detached VM is up.
    Started(VmDetails),
    /// A foreground run ended; QEMU's exit status.
    Exited(std::process::ExitStatus),
    /// It was running and went down; `method` says how.
    Stopped {
        name: VmName,
        method: PowerMethod,
    },
    /// The guest was asked to reboot (or was reset).
    Restarted {
        name: VmName,
        method: PowerMethod,
    },
    List(Vec<VmDetails>),
    Details(VmDetails),
    Updated(VmDetails),
    Cloned {
        details: VmDetails,
        copy: CloneDisk,
    },
    Deleted(VmName),
    Pulled(VmDetails),
    Pushed(crate::registry::push::Pushed),
    Images(Vec<crate::registry::cache::CachedImage>),
    Pruned(usize),
    /// A snapshot was taken.
    SnapshotTaken(super::snapshot::Snapshot),
    Snapshots(Vec<super::snapshot::Snapshot>),
    /// The VM is back at the snapshot; `details` says whether it runs.
    SnapshotRestored {
        snapshot: super::snapshot::Snapshot,
        details: VmDetails,
    },
    SnapshotDeleted {
        name: VmName,
        snap: String,
    },
    /// The VM's layered disk was merged into a plain `disk.img`; `layers`
    /// is how many layers were merged (0: it was plain already).
    Flattened {
        name: VmName,
        layers: usize,
    },
}

/// How a clone got its disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloneDisk {
    /// `disk.img` copied (by reflink, or sparsely).
    Copied(CopyKind),
    /// From a snapshot: `disk.img` and the snapshot's layers shared by hard
    /// links (`false`: copied, the clone is on another filesystem), and a
    /// new empty layer of its own.
    FromSnapshot { hard_linked: bool },
}

/// Where actions find VMs and settings.
#[derive(Debug, Clone)]
pub struct Context {
    pub store: Store,
    pub settings: Settings,
    /// Whose rights apply to the host paths named in an action.
    pub caller: super::caller::Caller,
    /// The caller is served by a lume of another user (root's service, for
    /// a member of its API group): the member rules apply to its VMs'
    /// networks ([`crate::network::attach::AttachOptions::member`]).
    pub member: bool,
}

/// Set by a server for the detached supervisor of a member's run: the
/// member rules apply to its network. Only restricts: whoever sets it on
/// their own process limits only themselves.
pub const MEMBER_ENV: &str = "LUME_MEMBER_RUN";

/// config.yaml: image URLs given through the API may lead to loopback,
/// link-local and private addresses.
pub const PRIVATE_URLS_KEY: &str = "apiPrivateImageUrls";

const MIN_MEMORY: u64 = 64 << 20;
const MIN_DISK: u64 = 1 << 20;
const MAX_DISK: u64 = 1 << 50;

/// Runs one action. `note` receives progress lines meant for a person.
pub fn execute(
    ctx: &Context,
    action: Action,
    note: &mut dyn FnMut(&str),
) -> Result<Outcome, VmError> {
    let store = &ctx.store;
    match action {
        Action::Create(spec) => create(ctx, *spec, note).map(Outcome::Created),
        Action::Run(spec) => run(ctx, spec, note),
        Action::Stop { name, timeout } => stop(ctx, &name, timeout),
        Action::Shutdown {
            name,
            timeout,
            login,
        } => shutdown(ctx, &name, timeout, &login),
        Action::Restart { name, force, login } => restart(ctx, &name, force, &login),
        Action::List => {
            // Nothing is read from a location another user can change
            // (their FIFO or link could stand where config.json is).
            store.check_private(None)?;
            let mut vms = store.list()?;
            // A pull with --force builds the VM's replacement under the
            // same name: the VM is listed once, as it is until replaced.
            let pulled: Vec<Vm> = store
                .provisioning()
                .into_iter()
                .filter(|p| !vms.iter().any(|v| v.name == p.name))
                .collect();
            vms.extend(pulled);
            vms.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(Outcome::List(VmDetails::read_all(store, &vms)))
        }
        Action::Get { name } => {
            store.check_private(None)?;
            if let Some(vm) = store.find_provisioning(&name)
                && !store.vm(&name).config_path().exists()
            {
                return Ok(Outcome::Details(VmDetails::read(store, &vm)));
            }
            let vm = store.open(&name)?;
            store.check_private(Some(&vm))?;
            // `get` of a VM with a corrupt config is an error naming the file.
            vm.load_config()?;
            Ok(Outcome::Details(VmDetails::read(store, &vm)))
        }
        Action::Set(spec) => set(store, spec),
        Action::SetHostLoopback { name, allow } => {
            let vm = store.open(&name)?;
            store.check_private(Some(&vm))?;
            let mode = vm.update_config(|cfg| -> Result<NetworkMode, VmError> {
                cfg.unsafe_host_loopback = allow;
                Ok(cfg.network_mode.clone())
            })?;
            for line in host_loopback_notes(&name, allow, &mode) {
                note(&line);
            }
            Ok(Outcome::Updated(VmDetails::read(store, &vm)))
        }
        Action::Clone {
            source,
            target,
            dest,
            snapshot,
        } => clone(
            store,
            dest.as_ref().unwrap_or(store),
            &source,
            &target,
            snapshot.as_deref(),
        ),
        Action::Snapshot { name, op } => snapshot(ctx, &name, op, note),
        Action::Delete {
            name,
            force,
            confirmed,
        } => delete(ctx, &name, force, confirmed, note),
        Action::Pull(spec) => pull(ctx, &spec, note).map(Outcome::Pulled),
        Action::Push { name, spec } => push(ctx, &name, &spec, note).map(Outcome::Pushed),
        Action::Images { organization } => {
            crate::registry::reference::check_organization(&organization)?;
            Ok(Outcome::Images(
                crate::registry::cache::Cache::new(&ctx.settings)?.list(&organization)?,
            ))
        }
        Action::Prune => Ok(Outcome::Pruned(
            crate::registry::cache::Cache::new(&ctx.settings)?.prune(note)?,
        )),
    }
}

/// `pull`: the VM is built in a `.creating-` work directory that holds the
/// provisioning lock (listed as `provisioning`) and appears with one rename;
/// on any error or a kill only the resumable cache is left.
fn pull(
    ctx: &Context,
    spec: &crate::registry::pull::PullSpec,
    note: &mut dyn FnMut(&str),
) -> Result<VmDetails, VmError> {
    begin_pull(ctx, spec.clone())?.finish(note)
}

/// A pull that has been checked and whose work directory exists, listed
/// as `pulling` (with `downloadProgress`), as lume shows a pull.
pub struct PendingPull {
    store: Store,
    spec: crate::registry::pull::PullSpec,
    cache: crate::registry::cache::Cache,
    caller: super::caller::Caller,
    work: PathBuf,
    _provisioning: Option<VmLock>,
    /// With `force`, the existing VM of that name, held by its lock
    /// until the new one has taken its place.
    replacing: Option<(Vm, VmLock)>,
}

/// Checks a pull and makes its work directory with a provisional
/// config.json and the held provisioning marker; nothing slow happens here.
pub fn begin_pull(
    ctx: &Context,
    mut spec: crate::registry::pull::PullSpec,
) -> Result<PendingPull, VmError> {
    let store = &ctx.store;
    store.check_private(None)?;
    let name = spec.name.clone();
    if store.is_provisioning(&name) {
        return Err(store.provisioning_error(&name).into());
    }
    let mut replacing = None;
    if store.vm(&name).config_path().exists() || store.vm(&name).dir.exists() {
        if !spec.force {
            return Err(StoreError::Exists {
                name,
                root: store.root().to_path_buf(),
            }
            .into());
        }
        // `--force`, as lume: the VM is replaced, but only a stopped one,
        // and only once the new one is complete (its lock held till then,
        // so it cannot start meanwhile). A directory without a config is
        // no VM: it is not replaced.
        if !store.vm(&name).config_path().exists() {
            return Err(StoreError::Exists {
                name,
                root: store.root().to_path_buf(),
            }
            .into());
        }
        let vm = store.open(&name)?;
        store.check_private(Some(&vm))?;
        let lock = VmLock::try_acquire(&vm.lock_path())
            .map_err(io_at(&vm.lock_path()))?
            .ok_or_else(|| {
                if vm.is_running() {
                    VmError::from(crate::registry::RegistryError::ReplaceRunning(
                        name.to_string(),
                    ))
                } else {
                    VmError::from(StoreError::Busy(name.clone()))
                }
            })?;
        collect_after_crash(ctx, &vm);
        replacing = Some((vm, lock));
    }
    if spec.public_only && ctx.settings.get_bool(PRIVATE_URLS_KEY)? == Some(true) {
        spec.public_only = false;
    }
    let cache = crate::registry::cache::Cache::new(&ctx.settings)?;
    let work = store.work_dir("creating", &name)?;
    let started = (|| -> Result<Option<VmLock>, VmError> {
        let lock = VmLock::try_acquire(&work.join(PROVISIONING_MARKER)).map_err(io_at(&work))?;
        crate::registry::pull::provisional_config().save(&work.join("config.json"))?;
        crate::registry::pull::write_progress(&work, 0, 0);
        Ok(lock)
    })();
    match started {
        Ok(lock) => Ok(PendingPull {
            store: store.clone(),
            spec,
            cache,
            caller: ctx.caller.clone(),
            work,
            _provisioning: lock,
            replacing,
        }),
        Err(e) => {
            let _ = fs::remove_dir_all(&work);
            Err(e)
        }
    }
}

impl PendingPull {
    pub fn name(&self) -> &VmName {
        &self.spec.name
    }

    /// The details of the VM while it is pulled.
    pub fn details(&self) -> VmDetails {
        VmDetails::read(
            &self.store,
            &Vm {
                name: self.spec.name.clone(),
                dir: self.work.clone(),
            },
        )
    }

    /// Pulls and publishes the VM with one rename; on any error the work
    /// directory is removed (the cache keeps what was verified).
    pub fn finish(mut self, note: &mut dyn FnMut(&str)) -> Result<VmDetails, VmError> {
        let work = self.work.clone();
        let built = (|| -> Result<Vm, VmError> {
            crate::registry::pull::pull_into(&self.spec, &self.cache, &self.caller, &work, note)?;
            let _ = fs::remove_file(work.join(crate::registry::pull::PROGRESS_FILE));
            if self.replacing.is_some() {
                note(&format!(
                    "Replacing VM '{}' with the pulled image (--force)",
                    self.spec.name
                ));
                return Ok(self.store.replace(&work, &self.spec.name)?);
            }
            Ok(self.store.publish(&work, &self.spec.name)?)
        })();
        self.replacing = None;
        match built {
            Ok(vm) => {
                self._provisioning = None;
                let _ = fs::remove_file(vm.dir.join(PROVISIONING_MARKER));
                Ok(VmDetails::read(&self.store, &vm))
            }
            Err(e) => {
                let _ = fs::remove_dir_all(&work);
                Err(e)
            }
        }
    }
}

/// `push`: the VM's lock is held throughout, so it cannot start meanwhile.
fn push(
    ctx: &Context,
    name: &VmName,
    spec: &crate::registry::push::PushSpec,
    note: &mut dyn FnMut(&str),
) -> Result<crate::registry::push::Pushed, VmError> {
    let store = &ctx.store;
    let vm = store.open(name)?;
    store.check_private(Some(&vm))?;
    super::snapshot::check_plain(&vm.dir, name.as_str(), "push")?;
    let mut spec = spec.clone();
    if spec.public_only && ctx.settings.get_bool(PRIVATE_URLS_KEY)? == Some(true) {
        spec.public_only = false;
    }
    let scratch = store.work_dir("pushing", name)?;
    let token_registry = ctx.settings.registry()?.registry;
    let r = crate::registry::push::push(&vm, &spec, &ctx.caller, &scratch, &token_registry, note);
    let _ = fs::remove_dir_all(&scratch);
    Ok(r?)
}

/// What a person is told on `set --unsafe-host-loopback`: the setting is
/// stored whatever the mode (it applies once the VM is in user mode), so a
/// VM in another mode gets a note; turning it on gets a warning.
fn host_loopback_notes(name: &VmName, allow: bool, mode: &NetworkMode) -> Vec<String> {
    let mut lines = Vec::new();
    if allow {
        lines.push(format!(
            "Warning: in user mode VM '{name}' now reaches every service on this host's loopback (127.0.0.1, ::1), `lume serve` among them; turn it off with `lume set {name} --unsafe-host-loopback false`"
        ));
    }
    if *mode != NetworkMode::User {
        lines.push(format!(
            "Note: --unsafe-host-loopback applies to network mode 'user' only; VM '{name}' is in mode '{mode}', so it changes nothing until you switch it (lume set {name} --network user)"
        ));
    }
    lines
}

fn check_resources(
    cpu: Option<u32>,
    memory: Option<u64>,
    disk: Option<u64>,
) -> Result<(), VmError> {
    match cpu {
        Some(0) => return Err(VmError::NoCpu),
        Some(n) if n > 255 => return Err(VmError::TooManyCpus(n)),
        _ => {}
    }
    if let Some(m) = memory.filter(|m| *m < MIN_MEMORY) {
        return Err(VmError::MemoryTooSmall(format_size(m)));
    }
    if let Some(d) = disk.filter(|d| *d < MIN_DISK) {
        return Err(VmError::DiskTooSmall(format_size(d)));
    }
    if let Some(d) = disk.filter(|d| *d > MAX_DISK) {
        return Err(VmError::DiskTooLarge(format_size(d)));
    }
    Ok(())
}

/// Published ports need a mode that can publish, and distinct host ports.
fn check_publish(mode: &NetworkMode, publish: &[PortMapping]) -> Result<(), VmError> {
    Ok(crate::network::attach::check_publish(mode, publish)?)
}

/// The largest image lume imports for a disk of `disk_size` bytes: the
/// larger of that size and [`IMPORT_FLOOR`], at most [`MAX_DISK`].
pub fn import_limit(disk_size: u64) -> u64 {
    disk_size.clamp(IMPORT_FLOOR, MAX_DISK)
}

/// Images up to this size are imported whatever `--disk-size` says.
pub const IMPORT_FLOOR: u64 = 64 << 30;

/// Name of the marker whose lock is held while a VM is provisioned.
pub const PROVISIONING_MARKER: &str = ".provisioning";

/// The image of a create, opened or named.
enum OpenedImage {
    File(HostFile),
    Url(String),
}

/// A create that has been checked and whose work directory exists; while an
/// image is imported it holds the provisioning lock, so the VM is listed as
/// `provisioning` (see [`Store::provisioning`]).
pub struct PendingCreate {
    store: Store,
    spec: CreateSpec,
    work: PathBuf,
    kernel: Option<HostFile>,
    initrd: Option<HostFile>,
    image: Option<OpenedImage>,
    _provisioning: Option<VmLock>,
}

fn create(
    ctx: &Context,
    spec: CreateSpec,
    note: &mut dyn FnMut(&str),
) -> Result<VmDetails, VmError> {
    begin_create(ctx, spec)?.finish(note)
}

/// Checks a create and makes its work directory (with config.json and,
/// when an image is imported, the held provisioning marker). Nothing
/// slow happens here: [`PendingCreate::finish`] imports and publishes.
pub fn begin_create(ctx: &Context, spec: CreateSpec) -> Result<PendingCreate, VmError> {
    let store = &ctx.store;
    match spec.os.to_ascii_lowercase().as_str() {
        "linux" => {}
        "macos" => return Err(VmError::MacOsGuest),
        _ => return Err(VmError::UnknownOs(spec.os)),
    }
    check_resources(Some(spec.cpu), Some(spec.memory), Some(spec.disk_size))?;
    check_publish(&spec.network, &spec.publish)?;
    spec.policy.check(&spec.network)?;
    crate::network::attach::check_saved_mode(&spec.network)?;
    if spec.kernel.is_none() && (spec.initrd.is_some() || spec.cmdline.is_some()) {
        return Err(VmError::InitrdWithoutKernel);
    }
    if spec.kernel.is_some() && spec.image.is_some() {
        return Err(VmError::TwoBootSources);
    }
    if spec.image_sha256.is_some() && spec.image.is_none() {
        return Err(VmError::Sha256WithoutImage);
    }
    store.check_private(None)?;
    let mut spec = spec;
    if spec.url_destinations == Destinations::PublicOnly
        && ctx.settings.get_bool(PRIVATE_URLS_KEY)? == Some(true)
    {
        spec.url_destinations = Destinations::Any;
    }
    // Each file is opened once, with the caller's rights; only the
    // descriptors are used from here on.
    let open = |what, p: &Option<PathBuf>| {
        p.as_deref()
            .map(|p| open_for(ctx, what, p, Access::Read))
            .transpose()
    };
    let kernel = open("Kernel", &spec.kernel)?;
    let initrd = open("Initrd", &spec.initrd)?;
    let image = match &spec.image {
        Some(ImageSource::Path(p)) => {
            Some(OpenedImage::File(open_for(ctx, "Image", p, Access::Read)?))
        }
        Some(ImageSource::Url(u)) => Some(OpenedImage::Url(u.clone())),
        None => None,
    };
    let user_data = match open("cloud-init file", &spec.cloud_init)? {
        Some(f) => {
            let mut data = Vec::new();
            (&*f.file)
                .take(crate::guest::cloudinit::MAX_USER_DATA + 1)
                .read_to_end(&mut data)
                .map_err(io_at(&f.path))?;
            crate::guest::cloudinit::check_user_data(&f.path, &data)?;
            Some(data)
        }
        None => None,
    };
    let exists = || StoreError::Exists {
        name: spec.name.clone(),
        root: store.root().to_path_buf(),
    };
    if store.vm(&spec.name).config_path().exists() || store.vm(&spec.name).dir.exists() {
        return Err(exists().into());
    }
    if store.is_provisioning(&spec.name) {
        return Err(store.provisioning_error(&spec.name).into());
    }

    let work = store.work_dir("creating", &spec.name)?;
    let started = (|| -> Result<Option<VmLock>, VmError> {
        let lock = match &image {
            Some(_) => VmLock::try_acquire(&work.join(PROVISIONING_MARKER))
                .map_err(io_at(&work))
                .map_err(VmError::from)?,
            None => None,
        };
        // The config is there from the start, so a provisioning VM lists
        // with its settings; its disk size is rewritten after the import.
        if let Some(data) = &user_data {
            let p = work.join(crate::guest::cloudinit::USER_DATA_FILE);
            crate::util::atomic::write_private(&p, data).map_err(io_at(&p))?;
        }
        config_for(&spec, spec.disk_size, None, user_data.is_some())
            .save(&work.join("config.json"))?;
        Ok(lock)
    })();
    match started {
        Ok(lock) => Ok(PendingCreate {
            store: store.clone(),
            spec,
            work,
            kernel,
            initrd,
            image,
            _provisioning: lock,
        }),
        Err(e) => {
            let _ = fs::remove_dir_all(&work);
            Err(e)
        }
    }
}

fn config_for(
    spec: &CreateSpec,
    disk_size: u64,
    kernel_boot: Option<KernelBoot>,
    user_data: bool,
) -> VmConfig {
    VmConfig {
        os: "linux".into(),
        cpu_count: spec.cpu,
        memory_size: spec.memory,
        disk_size,
        mac_address: Some(spec.mac.unwrap_or_else(MacAddress::random)),
        display: spec.display.clone(),
        network_mode: spec.network.clone(),
        kernel_boot,
        disk_format: DiskFormat::Raw,
        publish: spec.publish.clone(),
        unsafe_host_loopback: false,
        network_policy: spec.policy.clone(),
        vm_id: Some(crate::guest::cloudinit::new_vm_id()),
        cloud_init: CloudInit {
            enabled: !spec.no_cloud_init,
            password: spec.no_password.then_some(false),
            user_data,
        },
        extra: Default::default(),
    }
}

impl PendingCreate {
    /// The name being created.
    pub fn name(&self) -> &VmName {
        &self.spec.name
    }

    /// The details of the VM while it is provisioned.
    pub fn details(&self) -> VmDetails {
        VmDetails::read(
            &self.store,
            &Vm {
                name: self.spec.name.clone(),
                dir: self.work.clone(),
            },
        )
    }

    /// Imports the image (or makes an empty disk), copies the kernel files,
    /// and publishes the VM with one rename. On any error the work
    /// directory is removed: no VM, no partial disk.
    pub fn finish(mut self, note: &mut dyn FnMut(&str)) -> Result<VmDetails, VmError> {
        let store = self.store.clone();
        let work = self.work.clone();
        let name = self.spec.name.clone();
        let built = self.build(note);
        let published = built.and_then(|()| Ok(store.publish(&work, &name)?));
        match published {
            Ok(vm) => {
                // The lock was taken on the work directory's marker; the
                // published VM keeps no marker.
                self._provisioning = None;
                let _ = fs::remove_file(vm.dir.join(PROVISIONING_MARKER));
                Ok(VmDetails::read(&store, &vm))
            }
            Err(e) => {
                let _ = fs::remove_dir_all(&work);
                Err(e)
            }
        }
    }

    fn build(&mut self, note: &mut dyn FnMut(&str)) -> Result<(), VmError> {
        let work = &self.work;
        let spec = &self.spec;
        let disk = work.join("disk.img");
        let mut disk_size = spec.disk_size;
        if let Some(image) = &self.image {
            let source = match image {
                OpenedImage::File(f) => import::Source::File {
                    file: &f.file,
                    path: &f.path,
                },
                OpenedImage::Url(u) => import::Source::Url(u),
            };
            let imported = import::import(&import::Request {
                source,
                sha256: spec.image_sha256,
                work,
                disk: &disk,
                limit: import_limit(spec.disk_size),
                progress: spec.progress,
                destinations: spec.url_destinations,
            })?;
            img::grow(&disk, disk_size)?;
            disk_size = fs::metadata(&disk).map_err(io_at(&disk))?.len();
            if imported.size > spec.disk_size {
                note(&format!(
                    "The image's disk ({}) is larger than --disk-size ({}): VM '{}' keeps the image's size",
                    format_size(imported.size),
                    format_size(spec.disk_size),
                    spec.name
                ));
            }
        } else {
            img::create_sparse(&disk, disk_size)?;
        }
        let kernel_boot = match &self.kernel {
            Some(k) => {
                img::copy_from(&k.file, &work.join("vmlinuz"))?;
                if let Some(i) = &self.initrd {
                    img::copy_from(&i.file, &work.join("initrd.img"))?;
                }
                Some(KernelBoot {
                    kernel: "vmlinuz".into(),
                    initrd: self.initrd.as_ref().map(|_| "initrd.img".into()),
                    cmdline: spec.cmdline.clone().unwrap_or_default(),
                })
            }
            None => None,
        };
        // Same MAC as the provisional config.
        let mut cfg = VmConfig::load(&work.join("config.json"))?;
        cfg.disk_size = disk_size;
        cfg.kernel_boot = kernel_boot;
        cfg.save(&work.join("config.json"))?;
        Ok(())
    }
}

fn run_request(
    ctx: &Context,
    cfg: &VmConfig,
    spec: &RunSpec,
    note: &mut dyn FnMut(&str),
) -> Result<RunRequest, VmError> {
    let network = spec
        .network
        .clone()
        .unwrap_or_else(|| cfg.network_mode.clone());
    check_publish(&network, &spec.publish)?;
    if spec.shared_dirs.len() > crate::hypervisor::virtiofs::MAX_SHARES {
        return Err(VmError::TooManyShares(spec.shared_dirs.len()));
    }
    let policy = spec
        .policy
        .clone()
        .unwrap_or_else(|| cfg.network_policy.clone());
    policy.check(&network)?;
    let mut publish = spec.publish.clone();
    if network.supports_publish() {
        publish.extend(cfg.publish.iter().filter(|p| !spec.publish.contains(p)));
    } else if !cfg.publish.is_empty() {
        note(&format!(
            "The VM's published ports are not used in network mode {network}"
        ));
    }
    // User mode: a loopback port forwarded to the guest's SSH port, for
    // `lume ssh` (recorded in run.json with the other published ports).
    if crate::network::driver::of(&network).ssh_route()
        == crate::network::driver::SshRoute::LoopbackForward
        && wants_seed(cfg)
        && !publish
            .iter()
            .any(|p| p.guest_port == crate::guest::ssh::SSH_PORT && p.proto == Proto::Tcp)
        && let Some(p) = crate::guest::ssh::free_loopback_port()
    {
        publish.push(p);
    }
    Ok(RunRequest {
        network,
        mounts: spec
            .mounts
            .iter()
            .map(|p| open_for(ctx, "ISO image", p, Access::Read))
            .collect::<Result<_, _>>()?,
        disks: spec
            .disks
            .iter()
            .map(|p| open_for(ctx, "Disk", p, Access::ReadWrite))
            .collect::<Result<_, _>>()?,
        usb_storage: {
            let mut seen: Vec<(u64, u64)> = Vec::new();
            spec.usb_storage
                .iter()
                .map(|p| {
                    let f = open_for(ctx, "USB storage image", p, Access::ReadWrite)?;
                    crate::hypervisor::usb::check_raw(p, &f.file).map_err(RunError::from)?;
                    // The same image twice: QEMU would refuse the second
                    // write lock after starting; refused here, plainly.
                    use std::os::unix::fs::MetadataExt;
                    let m = f.file.metadata().map_err(|source| RunError::Io {
                        path: p.clone(),
                        source,
                    })?;
                    if seen.contains(&(m.dev(), m.ino())) {
                        return Err(VmError::UsbStorageTwice(p.clone()));
                    }
                    seen.push((m.dev(), m.ino()));
                    Ok(f)
                })
                .collect::<Result<_, VmError>>()?
        },
        shares: spec
            .shared_dirs
            .iter()
            .map(|(p, ro)| open_dir_for(ctx, p, *ro))
            .collect::<Result<_, _>>()?,
        stop_timeout: Duration::from_secs(15),
        vnc: vnc_request(spec)?,
        accel: ctx.settings.accelerator()?,
        attach: AttachOptions {
            user_net: ctx.settings.get_str("userSubnet")?,
            publish,
            host_loopback: cfg.unsafe_host_loopback,
            policy,
            settings: ctx.settings.clone(),
            member: ctx.member
                || (std::env::var_os(supervisor::START_LOG_ENV).is_some()
                    && std::env::var_os(MEMBER_ENV).is_some_and(|v| v == "1")),
            vm: spec
                .name
                .as_ref()
                .map(|n| (n.to_string(), ctx.store.vm(n).dir)),
        },
        ephemeral: spec.ephemeral,
    })
}

/// The VNC display of this run. A chosen password reaches the CLI and a
/// detached supervisor through LUME_VNC_PASSWORD (readable only by its own
/// user; taken out of the environment at start), never a command line.
fn vnc_request(spec: &RunSpec) -> Result<VncRequest, VmError> {
    let password = spec.vnc_password.clone();
    if let Some(p) = &password {
        vnc::check_password(p).map_err(RunError::from)?;
    }
    Ok(VncRequest {
        port: spec.vnc_port,
        password,
    })
}

fn run(ctx: &Context, spec: RunSpec, note: &mut dyn FnMut(&str)) -> Result<Outcome, VmError> {
    let store = &ctx.store;
    let name = spec.name.clone().expect("run needs a name");
    let vm = store.open(&name)?;
    store.check_private(Some(&vm))?;
    let mut cfg = vm.load_config()?;
    let req = run_request(ctx, &cfg, &spec, note)?;
    supervisor::preflight(&vm, &cfg, &req)?;
    if VmLock::is_held(&vm.lock_path()).unwrap_or(false) {
        return Err(supervisor::held_error(&vm).into());
    }
    // The seed is made by the lume the caller ran (with the caller's keys);
    // a detached supervisor uses the one its parent wrote.
    if wants_seed(&cfg) && std::env::var_os(supervisor::START_LOG_ENV).is_none() {
        cfg = provision(ctx, &vm, cfg)?;
    }
    if !spec.detach {
        let foreground = std::env::var_os(supervisor::START_LOG_ENV).is_none();
        let status = supervisor::supervise(&vm, &cfg, &req, &mut |s: &RunState| {
            // The VNC URL (with its password) goes to the caller's terminal,
            // never to a detached supervisor's log.
            if foreground && let (Some(port), Some(pw)) = (s.vnc_port, s.vnc_password.as_deref()) {
                show_vnc(&vm.dir, port, pw, spec.open_viewer, note);
            }
            note(&running_line(&vm, s, !foreground))
        })?;
        return Ok(Outcome::Exited(status));
    }
    detach(store, &vm, &cfg, &spec, &req)
}

/// The line that says a VM runs, in the terminal of a run in the
/// foreground and in a detached supervisor's log.
fn running_line(vm: &Vm, s: &RunState, detached: bool) -> String {
    format!(
        "VM '{}' is running (accelerator {}, network {}{}). Console: {}. {}",
        vm.name,
        s.accelerator,
        s.network_mode,
        s.ip_address
            .map(|ip| format!(", address {ip}"))
            .unwrap_or_default(),
        vm.console_path().display(),
        if detached {
            "Detached: stop it with `lume stop`."
        } else {
            "Press Ctrl-C to stop it."
        }
    )
}

/// A detached supervisor forked from the CLI: runs the VM and returns the
/// exit status a supervisor started again as `lume run` would have.
fn supervise_forked(vm: &Vm, cfg: &VmConfig, req: &RunRequest) -> i32 {
    match supervisor::supervise(vm, cfg, req, &mut |s: &RunState| {
        eprintln!("{}", running_line(vm, s, true))
    }) {
        Ok(status) => status.code().unwrap_or(0),
        Err(e) => {
            crate::print_error(&e);
            supervisor::exit_status_for(&e).unwrap_or(1)
        }
    }
}

/// Opens a viewer on the display at `port` when asked and possible (for
/// remote-viewer through a 0600 `viewer.vv` in `vm_dir`); says where the
/// display is.
pub fn show_vnc(
    vm_dir: &Path,
    port: u16,
    password: &str,
    open_viewer: bool,
    note: &mut dyn FnMut(&str),
) {
    let url = vnc::url(port, password);
    if !open_viewer {
        note(&format!("VNC display: {url}"));
        return;
    }
    let vv = vnc::write_viewer_file(vm_dir, port, password).ok();
    match vnc::open_viewer(&url, vv.as_deref()) {
        Ok(viewer) => note(&format!("VNC display opened in {viewer}: {url}")),
        Err(why) => note(&format!("VNC display: {url} (no viewer opened: {why})")),
    }
}

/// Whether a VM gets a cloud-init seed: a VM booted from its disk, or one
/// booted from a kernel whose creator gave a cloud-init file.
pub fn wants_seed(cfg: &VmConfig) -> bool {
    cfg.cloud_init.enabled && (cfg.kernel_boot.is_none() || cfg.cloud_init.user_data)
}

/// Writes the VM's cloud-init seed when its inputs changed: the VM's id
/// (given to VMs from before lume recorded one), name, MAC address, lume's
/// key, the caller's own public keys, the password setting, the user's
/// user-data.
fn provision(ctx: &Context, vm: &Vm, mut cfg: VmConfig) -> Result<VmConfig, VmError> {
    use crate::guest::{cloudinit, keys};
    if cfg.vm_id.is_none() {
        cfg = vm.update_config(|c| -> Result<VmConfig, VmError> {
            if c.vm_id.is_none() {
                c.vm_id = Some(cloudinit::new_vm_id());
            }
            Ok(c.clone())
        })?;
    }
    let pair = keys::ensure(ctx.store.root())?;
    let mut authorized_keys = vec![pair.public];
    for k in keys::caller_public_keys(&ctx.caller) {
        if !authorized_keys.contains(&k) {
            authorized_keys.push(k);
        }
    }
    let user_data = if cfg.cloud_init.user_data {
        let p = vm.dir.join(cloudinit::USER_DATA_FILE);
        let meta = fs::symlink_metadata(&p).map_err(io_at(&p))?;
        if !meta.file_type().is_file() {
            return Err(VmError::MissingFile {
                what: "cloud-init user-data",
                path: p,
            });
        }
        Some(fs::read(&p).map_err(io_at(&p))?)
    } else {
        None
    };
    let password = match cfg.cloud_init.password {
        Some(p) => p,
        None => ctx.settings.get_bool("sshPassword")?.unwrap_or(true),
    };
    let inputs = cloudinit::SeedInputs {
        vm_name: vm.name.to_string(),
        instance_id: cloudinit::instance_id(cfg.vm_id.as_deref().unwrap_or_default()),
        mac: cfg.mac_address,
        password,
        authorized_keys,
        user_data,
    };
    cloudinit::write_seed(&vm.dir, &inputs)?;
    Ok(cfg)
}

/// Starts a supervisor in its own session and waits until it reports the VM
/// running, or fails.
fn detach(
    store: &Store,
    vm: &Vm,
    cfg: &VmConfig,
    spec: &RunSpec,
    req: &RunRequest,
) -> Result<Outcome, VmError> {
    // Resolve the accelerator here so the one line about a TCG fallback
    // reaches the user's terminal; the supervisor inherits the verdict.
    let accel = crate::hypervisor::accel::resolve(req.accel, &mut |line| eprintln!("{line}"))
        .map_err(RunError::from)?;
    // The supervisor logs to a file of its own and renames it to lume.log
    // only once it holds the VM: a start that loses a race never truncates
    // the log of the run that won.
    let start_log = vm
        .dir
        .join(format!(".start-{:x}.log", crate::util::random::u64()));
    // Appended to (O_APPEND, a fresh name): the log can then be trimmed in
    // place while the supervisor keeps writing to it.
    let log = crate::hypervisor::logcap::open_log(&start_log, false).map_err(io_at(&start_log))?;
    let log_path = vm.log_path();
    // `lume run` forks its supervisor, which goes on with what this
    // process already opened and read; other doors (`lume serve`,
    // `snapshot restore`), and a process that cannot fork safely, start
    // lume again.
    use std::os::fd::AsRawFd as _;
    let handed: Vec<std::os::fd::RawFd> = req
        .mounts
        .iter()
        .chain(&req.disks)
        .chain(&req.usb_storage)
        .map(|f| f.file.as_raw_fd())
        .chain(req.shares.iter().map(|d| d.dir.as_raw_fd()))
        .chain([log.as_raw_fd()])
        .collect();
    let mut child = if spec.fork_supervisor && process::can_fork(&handed) {
        let req = RunRequest {
            accel: accel.into(),
            ..req.clone()
        };
        process::Detached::fork(&start_log, &log_path, log, &handed, || {
            supervise_forked(vm, cfg, &req)
        })
        .map_err(RunError::from)?
    } else {
        spawn_supervisor(store, vm, spec, req, accel, &start_log, log)?
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    // Woken when the supervisor writes run.json (or any file of the VM's
    // directory), not only every 20 ms: `run --detach` returns as soon as
    // the VM runs. The 20 ms remain the longest wait, to notice an exit.
    let mut written = crate::util::watch::DirWatch::new(&vm.dir);
    loop {
        if let Some(state) = vm.running_state()
            && state.pid == child.id()
        {
            let details = VmDetails::read(store, vm);
            if spec.open_viewer
                && let Some(url) = &details.vnc_url
                && let (Some(port), Some(pw)) = (state.vnc_port, state.vnc_password.as_deref())
                && let Err(why) = vnc::open_viewer(
                    url,
                    vnc::write_viewer_file(&vm.dir, port, pw).ok().as_deref(),
                )
                && why != vnc::NoViewer::NoSession
            {
                eprintln!("No VNC viewer opened: {why}");
            }
            return Ok(Outcome::Started(details));
        }
        let exited = match child.exited() {
            Ok(exited) => exited,
            Err(e) => {
                // Not followed, not left behind: killed, its start log gone.
                child.abandon();
                return Err(RunError::from(e).into());
            }
        };
        if let Some(exit) = exited {
            return Err(match exit {
                process::EarlyExit::AlreadyRunning => RunError::AlreadyRunning(vm.name.clone()),
                process::EarlyExit::Busy => RunError::Busy(vm.name.clone()),
                process::EarlyExit::Failed { log, messages } => {
                    RunError::Supervisor { log, messages }
                }
            }
            .into());
        }
        if Instant::now() > deadline {
            child.abandon();
            return Err(RunError::QmpTimeout(120, log_path).into());
        }
        written.wait(Duration::from_millis(20));
    }
}

/// Starts lume again as the VM's supervisor (`lume run NAME …` with
/// `accel`'s verdict), its output going to `log`.
fn spawn_supervisor(
    store: &Store,
    vm: &Vm,
    spec: &RunSpec,
    req: &RunRequest,
    accel: crate::hypervisor::accel::Accel,
    start_log: &Path,
    log: fs::File,
) -> Result<process::Detached, VmError> {
    let log2 = log.try_clone().map_err(|e| {
        let _ = fs::remove_file(start_log);
        io_at(start_log)(e)
    })?;
    let mut cmd = process::supervisor_command();
    cmd.arg("run")
        .arg(vm.name.as_str())
        .arg("--storage")
        .arg(store.root())
        .arg("--network")
        .arg(req.network.to_string());
    // The files this process opened with the caller's rights reach the
    // supervisor through this process's descriptors, which it opens at once
    // while this process waits and holds them; the caller's paths are never
    // resolved again.
    for m in &req.mounts {
        cmd.arg("--mount").arg(m.proc_path());
    }
    for d in &req.disks {
        cmd.arg("--disk").arg(d.proc_path());
    }
    for u in &req.usb_storage {
        cmd.arg("--usb-storage").arg(u.proc_path());
    }
    for s in &req.shares {
        let mut arg = s.proc_path().into_os_string();
        arg.push(if s.read_only { ":ro" } else { ":rw" });
        cmd.arg("--shared-dir").arg(arg);
    }
    for p in &spec.publish {
        cmd.arg("--publish").arg(p.to_string());
    }
    // A policy for this run only reaches the supervisor as options too.
    if let Some(policy) = spec.policy.as_ref().filter(|p| !p.is_empty()) {
        for r in &policy.allow_out {
            cmd.arg("--allow-out").arg(r.to_string());
        }
        for r in &policy.deny_out {
            cmd.arg("--deny-out").arg(r.to_string());
        }
        if policy.isolate {
            cmd.arg("--isolate");
        }
    }
    if spec.ephemeral {
        cmd.arg("--ephemeral");
    }
    cmd.arg("--vnc-port").arg(req.vnc.port.to_string());
    match &req.vnc.password {
        Some(p) => cmd.env(vnc::PASSWORD_ENV, p),
        None => cmd.env_remove(vnc::PASSWORD_ENV),
    };
    cmd.env("LUME_ACCEL", accel.to_string());
    if req.attach.member {
        cmd.env(MEMBER_ENV, "1");
    } else {
        cmd.env_remove(MEMBER_ENV);
    }
    cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
    Ok(process::Detached::spawn(&mut cmd, start_log, &vm.log_path()).map_err(RunError::from)?)
}

fn wait_unlocked(vm: &Vm, until: Instant) -> bool {
    while Instant::now() < until {
        if !VmLock::is_held(&vm.lock_path()).unwrap_or(false) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    !VmLock::is_held(&vm.lock_path()).unwrap_or(false)
}

/// Collects what a killed supervisor of `vm` left behind (its lock is free
/// but its run.json is still there).
fn collect_after_crash(ctx: &Context, vm: &Vm) {
    if VmLock::is_held(&vm.lock_path()).unwrap_or(true) {
        return;
    }
    let stale = RunState::load(&vm.state_path());
    crate::network::driver::collect_stale(&vm.dir, stale.as_ref(), &ctx.settings);
    let _ = fs::remove_file(vm.state_path());
}

/// The VM and its run state once it is running (waiting for a supervisor
/// that is still starting), or `None` when it is not running.
fn running(
    ctx: &Context,
    name: &VmName,
    settle: Duration,
) -> Result<(Vm, Option<RunState>), VmError> {
    let store = &ctx.store;
    let vm = store.open(name)?;
    // run.json and the QMP and agent sockets are trusted only where nobody
    // else writes.
    store.check_private(Some(&vm))?;
    // A supervisor that holds the lock without run.json is starting (or a
    // short command holds the VM): wait until it is running or gone.
    let settle = Instant::now() + settle.max(Duration::from_secs(5));
    let mut state = vm.running_state();
    while state.is_none()
        && VmLock::is_held(&vm.lock_path()).unwrap_or(false)
        && Instant::now() < settle
    {
        std::thread::sleep(Duration::from_millis(20));
        state = vm.running_state();
    }
    Ok((vm, state))
}

/// One line in the VM's lume.log (appended; never through a symlink), so
/// that the log of a detached VM says how it was stopped or restarted.
fn log_to_vm(vm: &Vm, line: &str) {
    use std::io::Write;
    if let Ok(mut f) = crate::hypervisor::logcap::open_log(&vm.log_path(), false) {
        let _ = writeln!(f, "[{}] {line}", crate::util::time::timestamp());
    }
}

/// Asks the guest to power off; returns the way that accepted, if any.
fn request_power(
    vm: &Vm,
    state: &RunState,
    request: PowerRequest,
    login: &SshLogin,
    why: &str,
) -> Option<PowerMethod> {
    let method = power::request(&vm.dir, state, request, login, &mut |line| {
        log_to_vm(vm, &format!("{why}: {line}"))
    });
    match method {
        Some(m) => log_to_vm(
            vm,
            &format!(
                "{why}: {} requested {}",
                match request {
                    PowerRequest::PowerOff => "power-off",
                    PowerRequest::Reboot => "reboot",
                },
                m.describe()
            ),
        ),
        None => log_to_vm(vm, &format!("{why}: no graceful way was accepted")),
    }
    method
}

fn stop(ctx: &Context, name: &VmName, timeout: Duration) -> Result<Outcome, VmError> {
    let timeout = stop_timeout(timeout.as_secs())?;
    let (vm, state) = running(ctx, name, timeout)?;
    let Some(state) = state else {
        // As lume: stopping a VM that is not running is an error.
        collect_after_crash(ctx, &vm);
        return Err(VmError::NotRunning(name.clone()));
    };
    let start = Instant::now();
    let why = "`lume stop`";
    if let Some(method) = request_power(
        &vm,
        &state,
        PowerRequest::PowerOff,
        &SshLogin::default(),
        why,
    ) && wait_unlocked(&vm, start + timeout)
    {
        return Ok(Outcome::Stopped {
            name: name.clone(),
            method,
        });
    }
    log_to_vm(
        &vm,
        &format!(
            "{why}: the guest did not power off within {}s: forcing QEMU off",
            timeout.as_secs()
        ),
    );
    // Force QEMU off; the supervisor then tears down and releases the lock.
    process::force_off(&vm.dir, state.qemu_pid);
    if wait_unlocked(&vm, Instant::now() + Duration::from_secs(10)) {
        return Ok(Outcome::Stopped {
            name: name.clone(),
            method: PowerMethod::Forced,
        });
    }
    Err(VmError::StopTimeout {
        name: name.clone(),
        seconds: start.elapsed().as_secs(),
        pid: state.pid,
    })
}

fn shutdown(
    ctx: &Context,
    name: &VmName,
    timeout: Duration,
    login: &SshLogin,
) -> Result<Outcome, VmError> {
    let timeout = stop_timeout(timeout.as_secs())?;
    let (vm, state) = running(ctx, name, timeout)?;
    let Some(state) = state else {
        collect_after_crash(ctx, &vm);
        return Err(VmError::NotRunning(name.clone()));
    };
    let start = Instant::now();
    let method = request_power(
        &vm,
        &state,
        PowerRequest::PowerOff,
        login,
        "`lume shutdown`",
    )
    .ok_or_else(|| VmError::NoGracefulShutdown(name.clone()))?;
    if wait_unlocked(&vm, start + timeout) {
        return Ok(Outcome::Stopped {
            name: name.clone(),
            method,
        });
    }
    Err(VmError::ShutdownTimeout {
        name: name.clone(),
        method,
        seconds: start.elapsed().as_secs(),
    })
}

fn restart(
    ctx: &Context,
    name: &VmName,
    force: bool,
    login: &SshLogin,
) -> Result<Outcome, VmError> {
    let (vm, state) = running(ctx, name, Duration::from_secs(5))?;
    let Some(state) = state else {
        collect_after_crash(ctx, &vm);
        return Err(VmError::NotRunning(name.clone()));
    };
    let why = "`lume restart`";
    if let Some(method) = request_power(&vm, &state, PowerRequest::Reboot, login, why) {
        return Ok(Outcome::Restarted {
            name: name.clone(),
            method,
        });
    }
    if !force {
        return Err(VmError::NoGracefulReboot(name.clone()));
    }
    power::via_reset(&vm.dir).map_err(|e| match e {
        power::PowerError::Qmp(q) => VmError::from(RunError::Control(q)),
        other => VmError::from(RunError::Power(other)),
    })?;
    log_to_vm(
        &vm,
        &format!("{why}: reset {}", PowerMethod::Reset.describe()),
    );
    Ok(Outcome::Restarted {
        name: name.clone(),
        method: PowerMethod::Reset,
    })
}

/// Changes what `spec` names; with nothing to change it succeeds and
/// changes nothing, as lume's `set` does.
fn set(store: &Store, spec: SetSpec) -> Result<Outcome, VmError> {
    check_resources(spec.cpu, spec.memory, spec.disk_size)?;
    let vm = store.open(&spec.name)?;
    store.check_private(Some(&vm))?;
    if let Some(d) = &spec.display {
        super::config::parse_display(d)?;
    }
    if spec.is_empty() {
        // Still read, so a VM whose config is corrupt is an error here too.
        vm.load_config()?;
        return Ok(Outcome::Updated(VmDetails::read(store, &vm)));
    }
    // The disk can only change while nobody runs the VM: hold its lock.
    let _lock = match spec.disk_size {
        Some(_) => Some(
            VmLock::try_acquire(&vm.lock_path())
                .map_err(io_at(&vm.lock_path()))?
                .ok_or_else(|| VmError::DiskWhileRunning(spec.name.clone()))?,
        ),
        None => None,
    };
    if spec.disk_size.is_some() {
        super::snapshot::check_plain(&vm.dir, spec.name.as_str(), "resizing the disk")?;
    }
    vm.update_config(|cfg| -> Result<(), VmError> {
        if let Some(size) = spec.disk_size {
            let current = fs::metadata(vm.disk_path())
                .map(|m| m.len())
                .unwrap_or(cfg.disk_size);
            if size < current {
                return Err(VmError::DiskShrink {
                    name: spec.name.clone(),
                    current: format_size(current),
                    requested: format_size(size),
                });
            }
            img::grow(&vm.disk_path(), size)?;
            cfg.disk_size = size;
        }
        if let Some(c) = spec.cpu {
            cfg.cpu_count = c;
        }
        if let Some(m) = spec.memory {
            cfg.memory_size = m;
        }
        if let Some(n) = &spec.network {
            check_publish(n, &cfg.publish)?;
            crate::network::attach::check_saved_mode(n)?;
            cfg.network_mode = n.clone();
        }
        if let Some(p) = &spec.policy {
            cfg.network_policy = p.clone();
        }
        // The mode and the policy together: a saved policy stays enforceable.
        cfg.network_policy.check(&cfg.network_mode)?;
        if let Some(d) = &spec.display {
            cfg.display = d.clone();
        }
        Ok(())
    })?;
    Ok(Outcome::Updated(VmDetails::read(store, &vm)))
}

/// Files of a VM's identity that a clone does not take: it gets its own.
const NOT_CLONED: [&str; 2] = [
    crate::guest::cloudinit::SEED_FILE,
    crate::guest::ssh::KNOWN_HOSTS,
];

/// Files that belong to a run, not to the VM: never cloned.
const RUNTIME_FILES: [&str; 13] = [
    "console.log",
    "console.log.1",
    "qemu.log.1",
    "lume.log",
    "qemu.log",
    "passt.log",
    "run.json",
    "qmp.sock",
    "qga.sock",
    "events.sock",
    crate::guest::reach::PROBE_FILE,
    ".lock",
    ".cfg.lock",
];

fn clone(
    store: &Store,
    dest: &Store,
    source: &VmName,
    target: &VmName,
    snapshot: Option<&str>,
) -> Result<Outcome, VmError> {
    let src = store.open(source)?;
    store.check_private(Some(&src))?;
    dest.check_private(None)?;
    let mut cfg = src.load_config()?;
    // A snapshot's files are never written again: the source may run.
    let _lock = match snapshot {
        Some(_) => None,
        None => Some(
            VmLock::try_acquire(&src.lock_path())
                .map_err(io_at(&src.lock_path()))?
                .ok_or_else(|| VmError::CloneWhileRunning(source.clone()))?,
        ),
    };
    if snapshot.is_none() {
        super::snapshot::check_plain(&src.dir, source.as_str(), "a clone without --snapshot")?;
    }
    if dest.vm(target).dir.exists() {
        return Err(StoreError::Exists {
            name: target.clone(),
            root: dest.root().to_path_buf(),
        }
        .into());
    }
    let work = dest.work_dir("creating", target)?;
    let built = (|| -> Result<CloneDisk, VmError> {
        let mut disk_copy = CloneDisk::Copied(CopyKind::Reflink);
        for entry in fs::read_dir(&src.dir).map_err(io_at(&src.dir))? {
            let entry = entry.map_err(io_at(&src.dir))?;
            let fname = entry.file_name();
            let Some(n) = fname.to_str() else { continue };
            if RUNTIME_FILES.contains(&n)
                || NOT_CLONED.contains(&n)
                || n == "config.json"
                || n.starts_with('.')
                || (snapshot.is_some() && n == "disk.img")
            {
                continue;
            }
            if !entry.file_type().map(|t| t.is_file()).unwrap_or(false) {
                continue;
            }
            let kind = img::copy_file(&entry.path(), &work.join(n))?;
            if n == "disk.img" {
                disk_copy = CloneDisk::Copied(kind);
            }
        }
        if let Some(snap) = snapshot {
            let hard_linked = super::snapshot::link_into(&src.dir, source.as_str(), snap, &work)?;
            disk_copy = CloneDisk::FromSnapshot { hard_linked };
        }
        cfg.mac_address = Some(MacAddress::random());
        // A clone is a new instance for cloud-init: its own hostname and
        // SSH host keys, a seed and a known_hosts file of its own.
        cfg.vm_id = Some(crate::guest::cloudinit::new_vm_id());
        cfg.save(&work.join("config.json"))?;
        Ok(disk_copy)
    })();
    let result = built.and_then(|kind| Ok((dest.publish(&work, target)?, kind)));
    match result {
        Ok((vm, copy)) => Ok(Outcome::Cloned {
            details: VmDetails::read(dest, &vm),
            copy,
        }),
        Err(e) => {
            let _ = fs::remove_dir_all(&work);
            Err(e)
        }
    }
}

/// `lume snapshot …`.
fn snapshot(
    ctx: &Context,
    name: &VmName,
    op: SnapshotOp,
    note: &mut dyn FnMut(&str),
) -> Result<Outcome, VmError> {
    use super::snapshot as snap;
    let store = &ctx.store;
    let vm = store.open(name)?;
    store.check_private(Some(&vm))?;
    // A guest left paused by a killed memory snapshot goes on first (the
    // supervisor does it too, within half a second).
    if VmLock::is_held(&vm.lock_path()).unwrap_or(false) {
        let _ = snap::resume_abandoned(&vm.dir);
    }
    match op {
        SnapshotOp::List => Ok(Outcome::Snapshots(snap::list(&vm.dir))),
        SnapshotOp::Delete { snap: s } => {
            snap::delete(&vm.dir, name.as_str(), &s)?;
            Ok(Outcome::SnapshotDeleted {
                name: name.clone(),
                snap: s,
            })
        }
        SnapshotOp::Create { snap: s, memory } => {
            let defaulted = s.is_none();
            let s = s.unwrap_or_else(|| snap::default_name(&vm.dir));
            snap::validate_name(&s)?;
            let cfg = vm.load_config()?;
            collect_after_crash(ctx, &vm);
            // Running (run.json and the lock), stopped (no lock), or
            // starting/stopping (the lock without run.json): refused.
            let (running, started_at, ip_address, network_mode) = match (
                VmLock::is_held(&vm.lock_path()).unwrap_or(true),
                vm.running_state(),
            ) {
                (true, Some(state)) if memory && !state.shared_directories.is_empty() => {
                    return Err(snap::SnapshotError::MemoryWithShares(name.to_string()).into());
                }
                (true, Some(state)) => (
                    Some(state.guest_agent),
                    Some(state.started_at),
                    super::details::guest_address(&state),
                    Some(state.network_mode.to_string()),
                ),
                (true, None) => return Err(snap::SnapshotError::Busy(name.to_string()).into()),
                (false, _) => (None, None, None, None),
            };
            let target = snap::Target {
                name: name.as_str(),
                dir: &vm.dir,
                lock: &vm.lock_path(),
                running,
                started_at,
                ip_address,
                network_mode,
                cpu_count: cfg.cpu_count,
                memory_size: cfg.memory_size,
            };
            match snap::create(&target, &s, memory) {
                // A default name another command took meanwhile: the next.
                Err(snap::SnapshotError::Exists { .. }) if defaulted => Ok(Outcome::SnapshotTaken(
                    snap::create(&target, &snap::default_name(&vm.dir), memory)?,
                )),
                r => Ok(Outcome::SnapshotTaken(r?)),
            }
        }
        SnapshotOp::Restore { snap: s } => {
            let cfg = vm.load_config()?;
            // Everything that can refuse the restore is checked before a
            // running VM is forced off: a refused restore leaves the VM as
            // it was.
            let mode = cfg.network_mode.to_string();
            let wanted = snap::check_restore(
                &vm.dir,
                name.as_str(),
                &s,
                cfg.cpu_count,
                cfg.memory_size,
                &mode,
            )?;
            let was_running = vm.is_running();
            if was_running && snap::running_ephemeral(&vm.dir) {
                return Err(snap::SnapshotError::RestoreEphemeral(name.to_string()).into());
            }
            if let (true, Some(ip)) = (wanted.memory, wanted.ip_address) {
                check_address_free(store, name, &s, ip)?;
            }
            // The VM's present state is what a restore throws away: a
            // running VM is forced off at once.
            if was_running {
                note(&format!(
                    "Stopping VM '{name}': its present state is replaced by snapshot '{s}'"
                ));
                log_to_vm(
                    &vm,
                    &format!("`lume snapshot restore {name} {s}`: forcing QEMU off"),
                );
                if let Some(state) = vm.running_state() {
                    process::force_off(&vm.dir, state.qemu_pid);
                }
            }
            let restored = {
                let _lock = VmLock::acquire_within(&vm.lock_path(), Duration::from_secs(15))
                    .map_err(io_at(&vm.lock_path()))?
                    .ok_or_else(|| snap::SnapshotError::Busy(name.to_string()))?;
                collect_after_crash(ctx, &vm);
                snap::restore(
                    &vm.dir,
                    name.as_str(),
                    &s,
                    cfg.cpu_count,
                    cfg.memory_size,
                    &mode,
                )?
            };
            if wanted.memory || was_running {
                let spec = RunSpec {
                    name: Some(name.clone()),
                    detach: true,
                    ..Default::default()
                };
                if let Err(e) = run(ctx, spec, note) {
                    snap::cancel_restore(&vm.dir);
                    return Err(e);
                }
            }
            Ok(Outcome::SnapshotRestored {
                snapshot: restored,
                details: VmDetails::read(store, &vm),
            })
        }
        SnapshotOp::Flatten => {
            let _lock = VmLock::try_acquire(&vm.lock_path())
                .map_err(io_at(&vm.lock_path()))?
                .ok_or_else(|| snap::SnapshotError::FlattenRunning(name.to_string()))?;
            collect_after_crash(ctx, &vm);
            let layers = snap::flatten(&vm.dir, name.as_str())?;
            Ok(Outcome::Flattened {
                name: name.clone(),
                layers,
            })
        }
    }
}

/// A memory restore resumes a guest that keeps its old address: refused
/// when another running VM of this location has that address now (it got
/// the lease while this one was stopped).
fn check_address_free(
    store: &Store,
    name: &VmName,
    snap: &str,
    ip: std::net::IpAddr,
) -> Result<(), VmError> {
    for other in store.list().unwrap_or_default() {
        if other.name == *name {
            continue;
        }
        let Some(state) = other.running_state() else {
            continue;
        };
        if super::details::guest_address(&state) == Some(ip) {
            return Err(super::snapshot::SnapshotError::AddressInUse {
                vm: name.to_string(),
                snap: snap.into(),
                ip,
                other: other.name.to_string(),
            }
            .into());
        }
    }
    Ok(())
}

fn delete(
    ctx: &Context,
    name: &VmName,
    force: bool,
    confirmed: bool,
    note: &mut dyn FnMut(&str),
) -> Result<Outcome, VmError> {
    let store = &ctx.store;
    let vm = store.open(name)?;
    store.check_private(Some(&vm))?;
    if !force && !confirmed {
        return Err(VmError::NeedsForce(name.clone()));
    }
    // As lume's LumeController.delete: a running VM is stopped first.
    if vm.is_running() {
        note(&format!("Stopping VM '{name}' before deleting it"));
        match stop(ctx, name, Duration::from_secs(15)) {
            // It went down by itself meanwhile.
            Ok(_) | Err(VmError::NotRunning(_)) => {}
            Err(e) => return Err(e),
        }
    }
    collect_after_crash(ctx, &vm);
    let _lock = VmLock::acquire_within(&vm.lock_path(), Duration::from_secs(5))
        .map_err(io_at(&vm.lock_path()))?
        .ok_or_else(|| supervisor::held_error(&vm))?;
    store.remove(&vm)?;
    Ok(Outcome::Deleted(name.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::Caller;
    use std::os::unix::fs::PermissionsExt;

    fn context(root: &Path, caller: Caller) -> Context {
        Context {
            store: Store::new(Some(root.to_path_buf())),
            settings: Settings::default(),
            caller,
            member: false,
        }
    }

    fn spec(name: &str, kernel: &Path) -> CreateSpec {
        CreateSpec {
            name: VmName::parse(name).unwrap(),
            os: "linux".into(),
            cpu: 1,
            memory: 128 << 20,
            disk_size: 16 << 20,
            display: "1024x768".into(),
            network: NetworkMode::None,
            mac: None,
            kernel: Some(kernel.to_path_buf()),
            image_sha256: None,
            progress: false,
            url_destinations: Destinations::Any,
            policy: Default::default(),
            initrd: None,
            cmdline: None,
            image: None,
            publish: Vec::new(),
            cloud_init: None,
            no_cloud_init: false,
            no_password: false,
        }
    }

    fn chmod(p: &Path, mode: u32) {
        fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn a_kernel_the_caller_cannot_read_is_forbidden_and_nothing_is_created() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to act for another uid");
            return;
        }
        let host = tempfile::tempdir().unwrap();
        chmod(host.path(), 0o755);
        let secret = host.path().join("shadow-kernel");
        fs::write(&secret, b"root's secret").unwrap();
        chmod(&secret, 0o600);
        let public = host.path().join("vmlinuz");
        fs::write(&public, b"a kernel").unwrap();
        chmod(&public, 0o644);

        let storage = tempfile::tempdir().unwrap();
        let root = storage.path().join("vms");
        let ctx = context(&root, Caller::from_uid(65534));
        let e = execute(
            &ctx,
            Action::Create(Box::new(spec("a", &secret))),
            &mut |_| {},
        )
        .unwrap_err();
        assert!(
            matches!(&e, VmError::Forbidden { path, reason: Denied::Caller { uid: 65534, .. } } if *path == secret),
            "{e}"
        );
        assert!(e.to_string().contains("lacks permission"), "{e}");
        let left: Vec<_> = fs::read_dir(&root)
            .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "nothing created: {left:?}");

        let out = execute(
            &ctx,
            Action::Create(Box::new(spec("b", &public))),
            &mut |_| {},
        )
        .unwrap();
        assert!(matches!(out, Outcome::Created(_)));
        let vm = root.join("b");
        assert_eq!(fs::read(vm.join("vmlinuz")).unwrap(), b"a kernel");
        assert_eq!(
            fs::metadata(&vm).unwrap().permissions().mode() & 0o777,
            0o700
        );
        for f in ["vmlinuz", "disk.img", "config.json"] {
            let mode = fs::metadata(vm.join(f)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
    }

    #[test]
    fn a_cloud_init_file_is_read_with_the_callers_rights_and_checked() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to act for another uid");
            return;
        }
        let host = tempfile::tempdir().unwrap();
        chmod(host.path(), 0o755);
        let kernel = host.path().join("vmlinuz");
        fs::write(&kernel, b"a kernel").unwrap();
        chmod(&kernel, 0o644);
        let secret = host.path().join("secret.yaml");
        fs::write(&secret, b"#cloud-config\nroot's: secret\n").unwrap();
        chmod(&secret, 0o600);
        let mine = host.path().join("mine.yaml");
        fs::write(&mine, b"#cloud-config\nruncmd: [true]\n").unwrap();
        chmod(&mine, 0o644);
        let not_user_data = host.path().join("plain.yaml");
        fs::write(&not_user_data, b"runcmd: [true]\n").unwrap();
        chmod(&not_user_data, 0o644);

        let storage = tempfile::tempdir().unwrap();
        let root = storage.path().join("vms");
        let ctx = context(&root, Caller::from_uid(65534));
        let with = |name: &str, file: &Path| {
            let mut sp = spec(name, &kernel);
            sp.cloud_init = Some(file.to_path_buf());
            Action::Create(Box::new(sp))
        };
        let e = execute(&ctx, with("a", &secret), &mut |_| {}).unwrap_err();
        assert!(
            matches!(&e, VmError::Forbidden { path, .. } if *path == secret),
            "{e}"
        );
        let e = execute(&ctx, with("a", &not_user_data), &mut |_| {}).unwrap_err();
        assert!(
            matches!(
                &e,
                VmError::Seed(crate::guest::cloudinit::SeedError::UnknownUserData { .. })
            ),
            "{e}"
        );
        assert!(!root.join("a").exists());
        execute(&ctx, with("b", &mine), &mut |_| {}).unwrap();
        let vm = root.join("b");
        assert_eq!(
            fs::read(vm.join("user-data")).unwrap(),
            b"#cloud-config\nruncmd: [true]\n"
        );
        assert_eq!(
            fs::metadata(vm.join("user-data"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        let cfg = VmConfig::load(&vm.join("config.json")).unwrap();
        assert!(cfg.cloud_init.user_data && cfg.vm_id.is_some());
        // A kernel-booted VM with user-data gets a seed; a clone gets a new
        // id and neither the seed nor the known host keys of its source.
        assert!(wants_seed(&cfg));
        fs::write(vm.join("cidata.img"), b"seed").unwrap();
        fs::write(vm.join("known_hosts"), b"lume-b ssh-ed25519 AAAA").unwrap();
        let ctx = context(&root, Caller::current());
        execute(
            &ctx,
            Action::Clone {
                source: VmName::parse("b").unwrap(),
                target: VmName::parse("c").unwrap(),
                dest: None,
                snapshot: None,
            },
            &mut |_| {},
        )
        .unwrap();
        let copy = VmConfig::load(&root.join("c/config.json")).unwrap();
        assert_ne!(copy.vm_id, cfg.vm_id);
        assert!(root.join("c/user-data").exists());
        assert!(!root.join("c/cidata.img").exists());
        assert!(!root.join("c/known_hosts").exists());
    }

    #[test]
    fn root_refuses_storage_that_another_user_can_change() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let host = tempfile::tempdir().unwrap();
        let kernel = host.path().join("vmlinuz");
        fs::write(&kernel, b"k").unwrap();
        // Group-writable storage root.
        let root = host.path().join("shared");
        fs::create_dir(&root).unwrap();
        chmod(&root, 0o775);
        nix::unistd::chown(&root, None, Some(nix::unistd::Gid::from_raw(100))).unwrap();
        let ctx = context(&root, Caller::current());
        let e = execute(
            &ctx,
            Action::Create(Box::new(spec("a", &kernel))),
            &mut |_| {},
        )
        .unwrap_err();
        assert!(
            matches!(&e, VmError::Forbidden { path, reason: Denied::Storage { .. } } if *path == root),
            "{e}"
        );
        assert!(e.to_string().contains("group 100"), "{e}");
        // Owned by another user, below a directory that user can write.
        let theirs = host.path().join("theirs");
        fs::create_dir(&theirs).unwrap();
        nix::unistd::chown(&theirs, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
        let ctx = context(&theirs.join("vms"), Caller::current());
        let e = execute(
            &ctx,
            Action::Create(Box::new(spec("a", &kernel))),
            &mut |_| {},
        )
        .unwrap_err();
        assert!(
            matches!(&e, VmError::Forbidden { path, .. } if *path == theirs),
            "{e}"
        );
        assert!(e.to_string().contains("user 65534"), "{e}");
        // A private root below /tmp (sticky, root's) is fine.
        let ok = host.path().join("ok");
        let ctx = context(&ok, Caller::current());
        execute(
            &ctx,
            Action::Create(Box::new(spec("a", &kernel))),
            &mut |_| {},
        )
        .unwrap();
        // So is a root-owned symlink to it.
        let link = host.path().join("link");
        std::os::unix::fs::symlink(&ok, &link).unwrap();
        let ctx = context(&link, Caller::current());
        let create_b = Action::Create(Box::new(spec("b", &kernel)));
        execute(&ctx, create_b, &mut |_| {}).unwrap();
        // A VM directory someone else's group can write is refused.
        chmod(&ok.join("b"), 0o770);
        nix::unistd::chown(&ok.join("b"), None, Some(nix::unistd::Gid::from_raw(100))).unwrap();
        let set = SetSpec {
            name: VmName::parse("b").unwrap(),
            cpu: Some(1),
            memory: None,
            disk_size: None,
            network: None,
            display: None,
            policy: None,
        };
        let e = execute(&ctx, Action::Set(set), &mut |_| {}).unwrap_err();
        assert!(e.to_string().contains("can be changed by group 100"), "{e}");
        // So is turning on its host loopback access, a change like any other.
        let allow = Action::SetHostLoopback {
            name: VmName::parse("b").unwrap(),
            allow: true,
        };
        let e = execute(&ctx, allow, &mut |_| {}).unwrap_err();
        assert!(e.to_string().contains("can be changed by group 100"), "{e}");
        assert!(
            !fs::read_to_string(ok.join("b/config.json"))
                .unwrap()
                .contains("unsafeHostLoopback")
        );
        // Nor is it read: its config.json could be their FIFO or link.
        let e = execute(
            &ctx,
            Action::Get {
                name: VmName::parse("b").unwrap(),
            },
            &mut |_| {},
        )
        .unwrap_err();
        assert!(e.to_string().contains("can be changed by group 100"), "{e}");
    }

    #[test]
    fn stop_timeouts_are_capped_without_overflow() {
        assert!(matches!(
            stop_timeout(u64::MAX),
            Err(VmError::TimeoutTooLong(u64::MAX))
        ));
        assert_eq!(stop_timeout(3600).unwrap(), Duration::from_secs(3600));
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path(), Caller::current());
        let name = VmName::parse("x").unwrap();
        let e = execute(
            &ctx,
            Action::Stop {
                name,
                timeout: Duration::from_secs(u64::MAX),
            },
            &mut |_| {},
        )
        .unwrap_err();
        assert!(e.to_string().contains("at most 3600"), "{e}");
    }

    #[test]
    fn relative_storage_becomes_absolute() {
        let s = Store::new(Some(PathBuf::from("rel/vms")));
        assert!(s.root().is_absolute());
        assert!(s.root().ends_with("rel/vms"));
    }
}
