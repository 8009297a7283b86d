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

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::config::{ConfigError, VmConfig};
use super::lock::VmLock;
use super::name::VmName;
use super::state::RunState;

/// Errors about finding and holding VMs.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("VM '{name}' does not exist in {root}: run `lume ls` to see your VMs")]
    NotFound { name: VmName, root: PathBuf },
    #[error("VM '{name}' already exists in {root}: choose another name or delete it first")]
    Exists { name: VmName, root: PathBuf },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("Storage operation on {path} failed")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("VM '{0}' is busy: another lume command is changing it; try again in a moment")]
    Busy(VmName),
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
    /// Whether this is the default location (reported as `locationName`).
    default: bool,
}

/// One VM's directory.
#[derive(Debug, Clone)]
pub struct Vm {
    pub name: VmName,
    pub dir: PathBuf,
}

impl Store {
    /// The root given with `--storage`, else `~/.lume`.
    pub fn new(explicit: Option<PathBuf>) -> Self {
        match explicit {
            Some(root) => Self {
                root,
                default: false,
            },
            None => Self {
                root: default_root(),
                default: true,
            },
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `default` for `~/.lume`, else the path.
    pub fn location_name(&self) -> String {
        if self.default {
            "default".into()
        } else {
            self.root.display().to_string()
        }
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
            Ok(vm)
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
        vms.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(vms)
    }

    /// A fresh hidden work directory for building `name` (`.creating-…`).
    pub fn work_dir(&self, purpose: &str, name: &VmName) -> Result<PathBuf, StoreError> {
        fs::create_dir_all(&self.root).map_err(io_at(&self.root))?;
        self.collect_stale_work_dirs();
        let dir = self.root.join(format!(
            ".{purpose}-{name}-{}-{:x}",
            std::process::id(),
            crate::util::random::u64()
        ));
        fs::create_dir(&dir).map_err(io_at(&dir))?;
        Ok(dir)
    }

    /// Moves a finished work directory into place as `name`; refuses to
    /// replace an existing VM (renameat2 RENAME_NOREPLACE).
    pub fn publish(&self, work: &Path, name: &VmName) -> Result<Vm, StoreError> {
        let vm = self.vm(name);
        match nix::fcntl::renameat2(
            nix::fcntl::AT_FDCWD,
            work,
            nix::fcntl::AT_FDCWD,
            &vm.dir,
            nix::fcntl::RenameFlags::RENAME_NOREPLACE,
        ) {
            Ok(()) => Ok(vm),
            Err(nix::errno::Errno::EEXIST | nix::errno::Errno::ENOTEMPTY) => {
                Err(StoreError::Exists {
                    name: name.clone(),
                    root: self.root.clone(),
                })
            }
            Err(e) => Err(io_at(&vm.dir)(e.into())),
        }
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
            if !(name.starts_with(".creating-") || name.starts_with(".deleting-")) {
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

fn default_root() -> PathBuf {
    if let Some(dir) = crate::settings::Settings::home_directory() {
        return dir;
    }
    home().join(".lume")
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
