//! The storage layout: one directory per VM under the storage root.
//!
//! ```text
//! <root>/<name>/config.json   settings (atomic writes)
//!              disk.img       sparse raw disk
//!              vmlinuz, initrd.img   direct kernel boot files, if any
//!              console.log    serial console of the latest run
//!              lume.log       supervisor log of the latest run
//!              run.json       present while a supervisor runs the VM
//!              qmp.sock       QEMU's QMP socket while it runs
//!              .lock          held by the supervisor for as long as the VM runs
//!              .cfg.lock      held briefly while config.json is rewritten
//! ```
//! A VM being created or deleted lives under a hidden name
//! (`.creating-…`, `.deleting-…`) and appears or disappears with one rename.
//!
//! VM directories are 0700 and their files 0600. Directories written by
//! earlier releases (0755/0644) are tightened by the first command that opens
//! them. Root refuses a storage location that another user can change
//! ([`Store::check_private`]).

use std::fs;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use super::config::{ConfigError, VmConfig};
use super::lock::VmLock;
use super::name::VmName;
use super::state::RunState;

/// Errors about finding and holding VMs.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("VM '{name}' does not exist in {root}: run `lume ls` to see your VMs")]
    NotFound { name: VmName, root: PathBuf },
    /// Not in any location, after lume's search of them all.
    #[error(
        "VM '{name}' does not exist in any VM location (searched: {locations}): run `lume ls` to see your VMs"
    )]
    NotFoundAnywhere { name: VmName, locations: String },
    #[error("VM '{name}' already exists in {root}: choose another name or delete it first")]
    Exists { name: VmName, root: PathBuf },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(
        "Storage operation on {path} failed: check that it exists and that you may read and write it (lume acts with your rights), or name another location with --storage / `storage`"
    )]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("VM '{0}' is busy: another lume command is changing it; try again in a moment")]
    Busy(VmName),
    #[error(
        "VM '{0}' is still being created (status provisioning): wait until `lume ls` shows it stopped, then try again"
    )]
    Provisioning(VmName),
    /// As [`StoreError::Provisioning`], for a VM being pulled (listed as
    /// `pulling`).
    #[error(
        "VM '{0}' is still being pulled (status pulling): wait until `lume ls` shows it stopped, then try again"
    )]
    Pulling(VmName),
}

/// A directory that a user other than root could change: root keeps no VM
/// files there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "Storage directory {dir} can be changed by {who}, and lume running as root keeps VMs only where no other user can change them: choose another path, a directory only root can write (in a directory every user shares, such as /tmp, a private subdirectory: mkdir -m 700 /tmp/lume-vms)"
)]
pub struct UnsafeDir {
    pub dir: PathBuf,
    /// Who can change it (`user 1000`, `group 100`, `every user`).
    pub who: String,
}

/// Mode of VM directories and the storage root.
pub const PRIVATE_DIR: u32 = 0o700;

/// `dir` and its parents, each allowed to be changed by root (and `euid`)
/// only, or to be a sticky root-owned directory. `lexical` skips symlinks
/// (their directory is checked, their target is checked resolved).
fn check_ancestors(
    mut dir: Option<&Path>,
    euid: u32,
    lexical: bool,
) -> Result<(), (PathBuf, String)> {
    while let Some(d) = dir {
        let meta = if lexical {
            fs::symlink_metadata(d)
        } else {
            fs::metadata(d)
        };
        if let Ok(m) = meta
            && !m.file_type().is_symlink()
            && let Some(who) = writable_by_others(&m, euid, true)
        {
            return Err((d.to_path_buf(), who));
        }
        dir = d.parent().filter(|p| !p.as_os_str().is_empty());
    }
    Ok(())
}

/// Refuses a directory whose ancestors (as written and as the kernel resolves
/// them) another user could change: they could swap what lies below for
/// links of theirs. Sticky root-owned directories (/tmp) are fine.
pub fn check_ancestors_private(dir: &Path) -> Result<(), UnsafeDir> {
    let euid = nix::unistd::geteuid().as_raw();
    let refuse = |(dir, who)| UnsafeDir { dir, who };
    check_ancestors(dir.parent(), euid, true).map_err(refuse)?;
    // As the kernel resolves it: the deepest part that exists, made real
    // (a root-owned link into another user's folder leads there), and
    // every real directory above it.
    if let Some(real) = real_existing_prefix(dir) {
        check_ancestors(real.parent(), euid, false).map_err(refuse)?;
        if real != dir {
            // `real` is an existing ancestor of what is to be made: it is
            // where the new directories land, so it counts as a parent.
            check_ancestors(Some(&real), euid, false).map_err(refuse)?;
        }
    }
    Ok(())
}

/// The deepest existing prefix of `dir`, canonicalized (all its symlinks
/// resolved); `None` when not even `/` resolves.
pub fn real_existing_prefix(dir: &Path) -> Option<PathBuf> {
    let mut probe = Some(dir);
    while let Some(p) = probe {
        if let Ok(real) = fs::canonicalize(p) {
            return Some(real);
        }
        probe = p.parent().filter(|p| !p.as_os_str().is_empty());
    }
    // A relative path whose first part does not exist yet lands here.
    dir.is_relative()
        .then(|| fs::canonicalize(".").ok())
        .flatten()
}

/// Who besides root (and `euid`) can change directory `meta`, if anyone.
/// A sticky directory owned by root (such as /tmp) only lets others add
/// entries of their own, which is allowed when `sticky_ok` (ancestors).
pub(crate) fn writable_by_others(
    meta: &fs::Metadata,
    euid: u32,
    sticky_ok: bool,
) -> Option<String> {
    let mode = meta.mode();
    if meta.uid() != 0 && meta.uid() != euid {
        return Some(format!("user {} (its owner)", meta.uid()));
    }
    if sticky_ok && mode & 0o1000 != 0 && meta.uid() == 0 {
        return None;
    }
    if mode & 0o002 != 0 {
        return Some("every user".into());
    }
    if mode & 0o020 != 0 && meta.gid() != 0 {
        return Some(format!("group {}", meta.gid()));
    }
    None
}

pub(crate) fn io_at(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The storage root.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    /// The location's name (reported as `locationName`): a configured
    /// location's name, or the path as the user gave it.
    name: String,
    /// Set when this store was chosen because no location held the VM
    /// looked for: the names of every location searched.
    searched: Option<Vec<String>>,
}

/// One VM's directory.
#[derive(Debug, Clone)]
pub struct Vm {
    pub name: VmName,
    pub dir: PathBuf,
}

impl Store {
    /// The directory `explicit` (named by its path), else the default
    /// location of config.yaml (`home`, `~/.lume`); made absolute, so that a
    /// relative path means the same in a supervisor and in QEMU. Names are
    /// resolved by [`super::location::resolve`].
    pub fn new(explicit: Option<PathBuf>) -> Self {
        match explicit {
            Some(root) => {
                // lume shows the path as given; a relative one is shown
                // made absolute, as it is used.
                let root = absolute(root);
                Self {
                    name: root.display().to_string(),
                    root,
                    searched: None,
                }
            }
            None => {
                let loc = crate::settings::Settings::load()
                    .and_then(|s| s.default_location())
                    .unwrap_or_else(|_| crate::settings::Location {
                        name: crate::settings::DEFAULT_LOCATION_NAME.into(),
                        path: crate::settings::DEFAULT_LOCATION_PATH.into(),
                    });
                Self::located(&loc.name, loc.root())
            }
        }
    }

    /// The named location `name` at `root`.
    pub fn located(name: &str, root: PathBuf) -> Self {
        Self {
            name: name.into(),
            root: absolute(root),
            searched: None,
        }
    }

    /// This store, chosen after the locations named `locations` were all
    /// searched for a VM in vain: opening a VM that is not here says so.
    pub fn searched_in(mut self, locations: Vec<String>) -> Self {
        self.searched = Some(locations);
        self
    }

    /// As root, refuses a storage root, VM directory or ancestor that
    /// another user could change (and with it swap a VM's files for links
    /// to host files). Other users act with their own rights anyway.
    pub fn check_private(&self, vm: Option<&Vm>) -> Result<(), UnsafeDir> {
        let euid = nix::unistd::geteuid().as_raw();
        if euid != 0 {
            return Ok(());
        }
        let unsafe_dir = |dir: &Path, who| UnsafeDir {
            dir: dir.to_path_buf(),
            who,
        };
        // The VM directory is lume's own: a real directory, root's alone.
        if let Some(vm) = vm
            && let Ok(m) = fs::symlink_metadata(&vm.dir)
        {
            if m.file_type().is_symlink() {
                return Err(unsafe_dir(&vm.dir, "whoever made it a symlink".into()));
            }
            if let Some(who) = writable_by_others(&m, euid, false) {
                return Err(unsafe_dir(&vm.dir, who));
            }
        }
        // The storage root (as the kernel resolves it) is root's alone.
        if let Ok(real) = fs::canonicalize(&self.root) {
            if let Ok(m) = fs::metadata(&real)
                && let Some(who) = writable_by_others(&m, euid, false)
            {
                return Err(unsafe_dir(&self.root, who));
            }
            check_ancestors(real.parent(), euid, false).map_err(|(d, who)| unsafe_dir(&d, who))?;
        }
        // Every directory on the way there, as written and as resolved (the
        // root may not exist yet: its nearest existing ancestor counts).
        check_ancestors(self.root.parent(), euid, true).map_err(|(d, who)| unsafe_dir(&d, who))?;
        let mut probe = self.root.clone();
        while probe.pop() {
            if let Ok(real) = fs::canonicalize(&probe) {
                check_ancestors(Some(&real), euid, false)
                    .map_err(|(d, who)| unsafe_dir(&d, who))?;
                break;
            }
        }
        Ok(())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Migrates a VM directory of an earlier release, but never one that
    /// another user could have prepared (its files could be links to host
    /// files): commands refuse those with [`Store::check_private`].
    fn migrate(&self, vm: &Vm) {
        let done = fs::symlink_metadata(&vm.dir).is_ok_and(|m| m.mode() & 0o077 == 0);
        if !done && self.check_private(Some(vm)).is_ok() {
            vm.migrate_private();
        }
    }

    /// The location's name, or the path as given (lume's `locationName`).
    pub fn location_name(&self) -> String {
        self.name.clone()
    }

    /// A handle without checking existence.
    pub fn vm(&self, name: &VmName) -> Vm {
        Vm {
            name: name.clone(),
            dir: self.root.join(name.as_str()),
        }
    }

    /// An existing VM (its directory holds a config.json).
    pub fn open(&self, name: &VmName) -> Result<Vm, StoreError> {
        let vm = self.vm(name);
        if vm.config_path().exists() {
            self.migrate(&vm);
            Ok(vm)
        } else if self.is_provisioning(name) {
            Err(self.provisioning_error(name))
        } else if let Some(locations) = &self.searched {
            Err(StoreError::NotFoundAnywhere {
                name: name.clone(),
                locations: locations.join(", "),
            })
        } else {
            Err(StoreError::NotFound {
                name: name.clone(),
                root: self.root.clone(),
            })
        }
    }

    /// Every VM directory, sorted by name. Entries that are not VMs (hidden
    /// work directories, lume's `cache`, files) are skipped.
    pub fn list(&self) -> Result<Vec<Vm>, StoreError> {
        let entries = match fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_at(&self.root)(e)),
        };
        let mut vms: Vec<Vm> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = VmName::parse(e.file_name().to_str()?).ok()?;
                let vm = self.vm(&name);
                vm.config_path().exists().then_some(vm)
            })
            .collect();
        vms.iter().for_each(|vm| self.migrate(vm));
        vms.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(vms)
    }

    /// VMs being created with an image import: `.creating-…` work
    /// directories whose provisioning marker is locked by a live create
    /// (a killed create's directory is never listed) and that hold a
    /// config.json. Sorted by name.
    pub fn provisioning(&self) -> Vec<Vm> {
        let Ok(entries) = fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut vms: Vec<Vm> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let file = e.file_name();
                let rest = file.to_str()?.strip_prefix(".creating-")?;
                // NAME-PID-RANDOM; the name may itself contain '-'.
                let mut parts = rest.rsplitn(3, '-');
                let (_, _, name) = (parts.next()?, parts.next()?, parts.next()?);
                let vm = Vm {
                    name: VmName::parse(name).ok()?,
                    dir: e.path(),
                };
                let marker = vm.dir.join(super::actions::PROVISIONING_MARKER);
                (VmLock::is_held(&marker).unwrap_or(false) && vm.config_path().exists())
                    .then_some(vm)
            })
            .collect();
        vms.sort_by(|a, b| a.name.cmp(&b.name));
        vms
    }

    /// The VM `name` while it is being provisioned.
    pub fn find_provisioning(&self, name: &VmName) -> Option<Vm> {
        self.provisioning().into_iter().find(|v| &v.name == name)
    }

    /// The error for acting on `name` while it is provisioned: `pulling`
    /// when it is a pull (its work directory records download progress, as
    /// `lume ls` shows it), else `provisioning`.
    pub fn provisioning_error(&self, name: &VmName) -> StoreError {
        match self.find_provisioning(name) {
            Some(vm) if vm.dir.join(crate::registry::pull::PROGRESS_FILE).exists() => {
                StoreError::Pulling(name.clone())
            }
            _ => StoreError::Provisioning(name.clone()),
        }
    }

    /// Whether `name` is being provisioned.
    pub fn is_provisioning(&self, name: &VmName) -> bool {
        self.find_provisioning(name).is_some()
    }

    /// A fresh hidden work directory for building `name` (`.creating-…`).
    pub fn work_dir(&self, purpose: &str, name: &VmName) -> Result<PathBuf, StoreError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(PRIVATE_DIR)
            .create(&self.root)
            .map_err(io_at(&self.root))?;
        self.collect_stale_work_dirs();
        let dir = self.root.join(format!(
            ".{purpose}-{name}-{}-{:x}",
            std::process::id(),
            crate::util::random::u64()
        ));
        fs::DirBuilder::new()
            .mode(PRIVATE_DIR)
            .create(&dir)
            .map_err(io_at(&dir))?;
        Ok(dir)
    }

    /// Moves a finished work directory into place as `name`; refuses to
    /// replace an existing VM (renameat2 RENAME_NOREPLACE).
    /// The work directory is fsynced before the rename and the storage root
    /// after it, so a VM that appeared survives a crash whole.
    pub fn publish(&self, work: &Path, name: &VmName) -> Result<Vm, StoreError> {
        let vm = self.vm(name);
        sync_dir(work).map_err(io_at(work))?;
        let renamed = nix::fcntl::renameat2(
            nix::fcntl::AT_FDCWD,
            work,
            nix::fcntl::AT_FDCWD,
            &vm.dir,
            nix::fcntl::RenameFlags::RENAME_NOREPLACE,
        );
        match renamed {
            Ok(()) => {
                sync_dir(&self.root).map_err(io_at(&self.root))?;
                Ok(vm)
            }
            Err(nix::errno::Errno::EEXIST | nix::errno::Errno::ENOTEMPTY) => {
                Err(StoreError::Exists {
                    name: name.clone(),
                    root: self.root.clone(),
                })
            }
            Err(e) => Err(io_at(&vm.dir)(e.into())),
        }
    }

    /// Puts a finished work directory in the place of the existing VM
    /// `name` (whose lock the caller holds), then removes the old one: one
    /// atomic exchange (renameat2 RENAME_EXCHANGE), so at every moment
    /// `name` is either the old VM whole or the new one whole. The old VM
    /// then lies under the work directory's hidden name, which a crash
    /// leaves for the next create to collect.
    pub fn replace(&self, work: &Path, name: &VmName) -> Result<Vm, StoreError> {
        let vm = self.vm(name);
        sync_dir(work).map_err(io_at(work))?;
        nix::fcntl::renameat2(
            nix::fcntl::AT_FDCWD,
            work,
            nix::fcntl::AT_FDCWD,
            &vm.dir,
            nix::fcntl::RenameFlags::RENAME_EXCHANGE,
        )
        .map_err(|e| io_at(&vm.dir)(e.into()))?;
        sync_dir(&self.root).map_err(io_at(&self.root))?;
        let old = Vm {
            name: name.clone(),
            dir: work.to_path_buf(),
        };
        self.remove(&old)?;
        Ok(vm)
    }

    /// Removes a VM directory: one rename out of sight, then the removal.
    pub fn remove(&self, vm: &Vm) -> Result<(), StoreError> {
        let grave = self.root.join(format!(
            ".deleting-{}-{}-{:x}",
            vm.name,
            std::process::id(),
            crate::util::random::u64()
        ));
        fs::rename(&vm.dir, &grave).map_err(io_at(&vm.dir))?;
        sync_dir(&self.root).map_err(io_at(&self.root))?;
        fs::remove_dir_all(&grave).map_err(io_at(&grave))
    }

    /// Removes `.creating-…`/`.deleting-…` directories whose process is gone
    /// (left by a crash).
    fn collect_stale_work_dirs(&self) {
        let Ok(entries) = fs::read_dir(&self.root) else {
            return;
        };
        for e in entries.filter_map(Result::ok) {
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            if !(name.starts_with(".creating-")
                || name.starts_with(".deleting-")
                || name.starts_with(".pushing-"))
            {
                continue;
            }
            let pid = name.rsplit('-').nth(1).and_then(|p| p.parse::<u32>().ok());
            if let Some(pid) = pid
                && !Path::new(&format!("/proc/{pid}")).exists()
            {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// `p` against the current directory when relative.
fn absolute(p: PathBuf) -> PathBuf {
    std::path::absolute(&p).unwrap_or(p)
}

/// `$HOME`, falling back to the password database.
pub fn home() -> PathBuf {
    if let Some(h) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .map(|u| u.dir)
        .unwrap_or_else(|| PathBuf::from("/"))
}

impl Vm {
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("config.json")
    }
    pub fn disk_path(&self) -> PathBuf {
        self.dir.join("disk.img")
    }
    pub fn console_path(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("lume.log")
    }
    pub fn state_path(&self) -> PathBuf {
        self.dir.join("run.json")
    }
    pub fn lock_path(&self) -> PathBuf {
        self.dir.join(".lock")
    }

    pub fn load_config(&self) -> Result<VmConfig, ConfigError> {
        VmConfig::load(&self.config_path())
    }

    /// Read-modify-write of config.json under the short config lock.
    pub fn update_config<T, E: From<StoreError> + From<ConfigError>>(
        &self,
        f: impl FnOnce(&mut VmConfig) -> Result<T, E>,
    ) -> Result<T, E> {
        let path = self.dir.join(".cfg.lock");
        let _guard = VmLock::acquire_within(&path, Duration::from_secs(10))
            .map_err(io_at(&path))?
            .ok_or_else(|| StoreError::Busy(self.name.clone()))?;
        let mut cfg = self.load_config()?;
        let out = f(&mut cfg)?;
        cfg.save(&self.config_path())?;
        Ok(out)
    }

    /// Tightens a VM directory written by an earlier release (0755, files
    /// 0644, no `diskFormat`) to 0700/0600, in place and without following
    /// any link: config.json is rewritten atomically, other files are
    /// chmod-ed through descriptors opened with O_NOFOLLOW. Only the owner's
    /// files are touched; anything that fails is left for the next command.
    pub fn migrate_private(&self) {
        let Ok(dir) = nix::fcntl::open(
            &self.dir,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) else {
            return;
        };
        let dir = fs::File::from(dir);
        let Ok(meta) = dir.metadata() else { return };
        let euid = nix::unistd::geteuid().as_raw();
        if meta.uid() != euid || meta.mode() & 0o077 == 0 {
            return;
        }
        let listing = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&dir));
        let Ok(entries) = fs::read_dir(&listing) else {
            return;
        };
        for e in entries.filter_map(Result::ok) {
            let name = e.file_name();
            if name == "config.json" {
                continue;
            }
            let Ok(fd) = nix::fcntl::openat(
                dir.as_fd(),
                name.as_os_str(),
                OFlag::O_RDONLY
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_NONBLOCK
                    | OFlag::O_NOCTTY
                    | OFlag::O_CLOEXEC,
                Mode::empty(),
            ) else {
                continue; // a symlink, a socket, …: not ours to change
            };
            let f = fs::File::from(fd);
            if let Ok(m) = f.metadata()
                && m.uid() == euid
                && (m.is_file() || m.is_dir())
                && m.mode() & 0o077 != 0
            {
                let mode = if m.is_dir() { PRIVATE_DIR } else { 0o600 };
                let _ = nix::sys::stat::fchmod(f.as_fd(), Mode::from_bits_truncate(mode));
            }
        }
        // config.json: a new private file replaces the old one (and records
        // the disk format the old release did not write).
        if self.update_config(|_| Ok::<(), StoreError>(())).is_err() {
            return;
        }
        let _ = nix::sys::stat::fchmod(dir.as_fd(), Mode::from_bits_truncate(PRIVATE_DIR));
    }

    /// The run state if a supervisor holds the VM and has published it.
    pub fn running_state(&self) -> Option<RunState> {
        if !VmLock::is_held(&self.lock_path()).unwrap_or(false) {
            return None;
        }
        RunState::load(&self.state_path()).filter(RunState::supervisor_alive)
    }

    pub fn is_running(&self) -> bool {
        self.running_state().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A refusal names what `lume ls` shows: `pulling` for a pull.
    #[test]
    fn a_vm_being_pulled_is_refused_as_pulling() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(Some(dir.path().join("vms")));
        let name = VmName::parse("web").unwrap();
        let work = store.work_dir("creating", &name).unwrap();
        let marker = work.join(crate::vm::actions::PROVISIONING_MARKER);
        let _lock = VmLock::try_acquire(&marker).unwrap().unwrap();
        crate::registry::pull::provisional_config()
            .save(&work.join("config.json"))
            .unwrap();
        assert!(matches!(
            store.open(&name),
            Err(StoreError::Provisioning(_))
        ));
        crate::registry::pull::write_progress(&work, 0, 0);
        let e = store.open(&name).unwrap_err();
        assert!(matches!(e, StoreError::Pulling(_)), "{e:?}");
        assert!(e.to_string().contains("(status pulling)"), "{e}");
    }

    /// `replace` swaps a finished work directory in for the VM and leaves
    /// nothing of the old one (no hidden directory either).
    #[test]
    fn replace_swaps_in_the_new_vm_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(Some(dir.path().join("vms")));
        let name = VmName::parse("web").unwrap();
        let old = store.work_dir("creating", &name).unwrap();
        fs::write(old.join("old"), "1").unwrap();
        store.publish(&old, &name).unwrap();
        let new = store.work_dir("creating", &name).unwrap();
        fs::write(new.join("new"), "2").unwrap();
        let vm = store.replace(&new, &name).unwrap();
        assert!(vm.dir.join("new").exists() && !vm.dir.join("old").exists());
        let left: Vec<_> = fs::read_dir(store.root())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("web")]);
    }
}
