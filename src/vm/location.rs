//! Named VM locations (lume's `vmLocations` in config.yaml) and the one
//! reading of `--storage NAME|PATH` / `storage` shared by the CLI and the
//! API.
//!
//! A storage argument is a location name when config.yaml has a location of
//! that name; otherwise it is a path when it contains a `/` (lume's rule);
//! anything else is refused with the list of locations, so a mistyped name
//! never silently becomes a folder of that name.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::settings::{Location, Settings, SettingsError};

use super::VmName;
use super::actions::{Action, Context, Outcome, VmError, execute};
use super::caller::Caller;
use super::details::VmDetails;
use super::store::{PRIVATE_DIR, Store, UnsafeDir, check_ancestors_private};

/// Why a storage argument or a new location is refused.
#[derive(Debug, thiserror::Error)]
pub enum LocationError {
    #[error(
        "Storage '{spec}' is neither a VM location name nor a path. Locations: {known} (`lume config storage list`); a path contains a '/', such as ./{spec} or /srv/{spec}"
    )]
    Unknown { spec: String, known: String },
    #[error(
        "Storage 'ephemeral' (lume's macOS temporary folder) is not supported: VMs in a folder every user shares are refused; add a location of your own (lume config storage add NAME PATH) or give a path"
    )]
    Ephemeral,
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error(transparent)]
    Unsafe(#[from] UnsafeDir),
    #[error("Path is not a directory: {0}: choose a directory for VMs")]
    NotADirectory(PathBuf),
    #[error(
        "Directory is not writable: {0}: choose a directory you can write to (lume checks a new location with your own rights)"
    )]
    NotWritable(PathBuf),
    #[error(
        "{path} is a symlink owned by user {owner}: lume running as root follows no link another user made; name the real directory"
    )]
    ForeignSymlink { path: PathBuf, owner: u32 },
    #[error("Failed to create directory at {path}: check the path and its parent")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A storage argument read: the location and, when the word was also a
/// folder in the current directory, what was chosen and how to get the other.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub store: Store,
    pub note: Option<String>,
}

/// The one reading of `--storage` / `storage`: a configured location name
/// first, else a path (it contains a `/`), else an error naming the
/// locations.
pub fn resolve(settings: &Settings, spec: &str) -> Result<Resolved, LocationError> {
    let all = settings.locations()?;
    if let Some(l) = all.iter().find(|l| l.name == spec) {
        let note = Path::new(spec).is_dir().then(|| {
            format!(
                "Note: storage '{spec}' is the VM location named {spec} ({}), not the folder {spec} here; for the folder write ./{spec}",
                l.root().display()
            )
        });
        return Ok(Resolved {
            store: store_of(l),
            note,
        });
    }
    if spec == "ephemeral" {
        return Err(LocationError::Ephemeral);
    }
    if spec.contains('/') {
        let store = Store::new(Some(PathBuf::from(spec)));
        check_links(store.root(), nix::unistd::getuid().as_raw())?;
        return Ok(Resolved { store, note: None });
    }
    Err(LocationError::Unknown {
        spec: spec.into(),
        known: crate::settings::names(&all),
    })
}

fn store_of(l: &Location) -> Store {
    Store::located(&l.name, l.root())
}

/// The most symlinks followed while checking one storage path (Linux's
/// own limit).
const MAX_LINKS: usize = 40;

/// As root, refuses a storage path that passes through a symlink owned by
/// neither root nor `caller` (the user lume acts for), wherever it sits: in
/// the path as written or in the target of another link. Such a link could
/// be changed by its owner at any time to point root at another store
/// (root's own, say). Components are followed one at a time, as the kernel
/// does; a missing component ends the walk (the rest would be created by
/// root, not followed).
pub fn check_links(path: &Path, caller: u32) -> Result<(), LocationError> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    let mut todo: Vec<std::ffi::OsString> = Vec::new();
    let push = |todo: &mut Vec<std::ffi::OsString>, p: &Path| {
        // Reversed: the next component to visit is popped first.
        for c in p.components().rev() {
            todo.push(c.as_os_str().to_os_string());
        }
    };
    push(&mut todo, path);
    let mut at = PathBuf::from("/");
    let mut followed = 0;
    while let Some(c) = todo.pop() {
        match c.to_str() {
            Some("/") => at = PathBuf::from("/"),
            Some(".") => {}
            Some("..") => {
                at.pop();
            }
            _ => {
                let next = at.join(&c);
                let Ok(m) = fs::symlink_metadata(&next) else {
                    return Ok(());
                };
                if !m.file_type().is_symlink() {
                    at = next;
                    continue;
                }
                if m.uid() != 0 && m.uid() != caller {
                    return Err(LocationError::ForeignSymlink {
                        path: next,
                        owner: m.uid(),
                    });
                }
                followed += 1;
                if followed > MAX_LINKS {
                    return Ok(()); // the kernel refuses it (ELOOP) anyway
                }
                let Ok(target) = fs::read_link(&next) else {
                    return Ok(());
                };
                // A relative target continues from the link's directory.
                push(&mut todo, &target);
            }
        }
    }
    Ok(())
}

/// The default location (`defaultLocationName`).
pub fn default_store(settings: &Settings) -> Result<Store, LocationError> {
    Ok(store_of(&settings.default_location()?))
}

/// Every configured location in config.yaml's order; a directory named by
/// two locations counts once (the first).
pub fn all_stores(settings: &Settings) -> Result<Vec<Store>, LocationError> {
    let mut out: Vec<Store> = Vec::new();
    for l in settings.locations()? {
        let s = store_of(&l);
        if !out.iter().any(|o| o.root() == s.root()) {
            out.push(s);
        }
    }
    Ok(out)
}

/// Where a command on VM `name` acts: `storage` when given; else, as lume
/// does, the first location (in config.yaml's order) that holds a VM of
/// that name, else the default location.
pub fn store_for_vm(
    settings: &Settings,
    storage: Option<&str>,
    name: &VmName,
) -> Result<Resolved, LocationError> {
    if let Some(spec) = storage {
        return resolve(settings, spec);
    }
    let all = all_stores(settings)?;
    for s in &all {
        if s.vm(name).config_path().exists() || s.is_provisioning(name) {
            return Ok(Resolved {
                store: s.clone(),
                note: None,
            });
        }
    }
    Ok(Resolved {
        store: default_store(settings)?.searched_in(all.iter().map(Store::location_name).collect()),
        note: None,
    })
}

/// The warning of a change of the default location or of `home`'s path
/// (`config storage default`, `homeDirectory`) while VMs of the location
/// `before` (the default until now) run: they keep running where they are,
/// and, as in lume, a directory that is no longer a location is not
/// searched: `lume ls` stops listing them until `--storage OLD_PATH` names it.
pub fn running_left_behind(before: &Store, after: &Settings) -> Option<String> {
    let now = default_store(after).ok()?;
    if now.root() == before.root() {
        return None;
    }
    let running: Vec<String> = before
        .list()
        .ok()?
        .into_iter()
        .filter(|vm| vm.is_running())
        .map(|vm| vm.name.to_string())
        .collect();
    if running.is_empty() {
        return None;
    }
    let path = before.root().display();
    let still = all_stores(after)
        .map(|all| all.iter().any(|s| s.root() == before.root()))
        .unwrap_or(false);
    Some(if still {
        format!(
            "Warning: running VMs {} stay in {path} (location '{}'), no longer the default: commands still find them by name, new VMs go to {}",
            running.join(", "),
            before.location_name(),
            now.root().display()
        )
    } else {
        format!(
            "Warning: running VMs {} stay in {path}, which is no longer a VM location: `lume ls` no longer lists them (as lume); reach them with --storage {path}, or set the old path back",
            running.join(", ")
        )
    })
}

/// `lume ls` without `--storage`: the VMs of every location in `stores`,
/// sorted by name (a name in two locations appears twice, in the
/// locations' order). A location that cannot be read is reported through
/// `note` and skipped, as lume does.
pub fn list_every(
    settings: &Settings,
    caller: &Caller,
    stores: Vec<Store>,
    note: &mut dyn FnMut(&str),
) -> Result<Vec<VmDetails>, VmError> {
    let mut all = Vec::new();
    for store in stores {
        let root = store.root().to_path_buf();
        let ctx = Context {
            store,
            settings: settings.clone(),
            caller: caller.clone(),
            member: false,
        };
        match execute(&ctx, Action::List, note) {
            Ok(Outcome::List(vms)) => all.extend(vms),
            Ok(_) => {}
            Err(e) => note(&format!(
                "Warning: VM location {} skipped: {}",
                root.display(),
                crate::error_chain(&e)
            )),
        }
    }
    all.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(all)
}

/// A directory named for config.yaml (`homeDirectory`, `cacheDirectory`, a
/// new location), checked and made ([`check_new_location`]) before the
/// change is stored. Only a path config.yaml may hold is looked at:
/// anything else is left to the setter, which refuses it before any
/// directory is made (a relative path would land in the working directory).
pub fn prepare_directory(text: &str) -> Result<(), LocationError> {
    if crate::settings::is_location_text(text) {
        check_new_location(&crate::settings::expand_home(text))
    } else {
        Ok(())
    }
}

/// Checks a directory about to become a VM location, with the rights of
/// this process (the CLI's user, or the API server acting for its own
/// user): an existing path must be a directory this process may write, or
/// its nearest existing parent must be (it is then created, 0700). As
/// root, no directory on the way may be changeable by another user
/// ([`check_ancestors_private`]: no other user's home, no world-writable
/// folder) and no symlink on the way may belong to another user.
pub fn check_new_location(root: &Path) -> Result<(), LocationError> {
    let euid = nix::unistd::geteuid().as_raw();
    check_location_now(root, euid)?;
    let access = nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK;
    match fs::metadata(root) {
        Ok(m) if !m.is_dir() => Err(LocationError::NotADirectory(root.to_path_buf())),
        Ok(_) => nix::unistd::access(root, access)
            .map_err(|_| LocationError::NotWritable(root.to_path_buf())),
        Err(_) => {
            // The directories about to be made, outermost first.
            let mut missing: Vec<PathBuf> = Vec::new();
            let mut parent = Some(root);
            while let Some(p) = parent {
                if fs::symlink_metadata(p).is_ok() {
                    nix::unistd::access(p, access)
                        .map_err(|_| LocationError::NotWritable(p.to_path_buf()))?;
                    break;
                }
                missing.insert(0, p.to_path_buf());
                parent = p.parent().filter(|p| !p.as_os_str().is_empty());
            }
            fs::DirBuilder::new()
                .recursive(true)
                .mode(PRIVATE_DIR)
                .create(root)
                .map_err(|source| LocationError::Create {
                    path: root.to_path_buf(),
                    source,
                })?;
            // Checked again where it really landed: a link changed in the
            // meantime leads elsewhere. What was made is removed then.
            if let Err(e) = check_location_now(root, euid) {
                for d in missing.iter().rev() {
                    let _ = fs::remove_dir(d);
                }
                return Err(e);
            }
            Ok(())
        }
    }
}

/// The root-only part of [`check_new_location`], as things are now: no
/// symlink of another user on the way, no directory another user can
/// change, as written and as resolved.
fn check_location_now(root: &Path, euid: u32) -> Result<(), LocationError> {
    if euid == 0 {
        let mut probe = Some(root);
        while let Some(p) = probe {
            if let Ok(m) = fs::symlink_metadata(p)
                && m.file_type().is_symlink()
                && m.uid() != 0
            {
                return Err(LocationError::ForeignSymlink {
                    path: p.to_path_buf(),
                    owner: m.uid(),
                });
            }
            probe = p.parent();
        }
        check_ancestors_private(root)?;
        if let Ok(m) = fs::metadata(root)
            && (m.uid() != 0 || m.mode() & 0o022 != 0)
        {
            return Err(UnsafeDir {
                dir: root.to_path_buf(),
                who: if m.uid() != 0 {
                    format!("user {} (its owner)", m.uid())
                } else {
                    "other users (group or world write)".into()
                },
            }
            .into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{PermissionsExt, symlink};

    /// Review finding: a user plants a link in a sticky, world-writable
    /// folder pointing at root's own store; root given that path as
    /// `storage` (by an agent, a script) must not follow it.
    #[test]
    fn a_storage_path_through_another_users_link_is_refused() {
        if !nix::unistd::geteuid().is_root() {
            return; // the check is root's; tests run as root
        }
        let t = tempfile::tempdir().unwrap();
        let store = t.path().join("home/.lume");
        fs::create_dir_all(&store).unwrap();
        let public = t.path().join("pub");
        fs::create_dir(&public).unwrap();
        fs::set_permissions(&public, fs::Permissions::from_mode(0o1777)).unwrap();
        let nobody = 65534;
        let planted = public.join("lnk");
        symlink(&store, &planted).unwrap();
        std::os::unix::fs::lchown(&planted, Some(nobody), Some(nobody)).unwrap();
        let settings = Settings::default();
        let e = resolve(&settings, planted.to_str().unwrap()).unwrap_err();
        assert!(
            matches!(&e, LocationError::ForeignSymlink { path, owner } if *path == planted && *owner == nobody),
            "{e}"
        );
        // Below the link, and behind a link of root's own: refused too.
        let below = format!("{}/sub", planted.display());
        assert!(matches!(
            resolve(&settings, &below),
            Err(LocationError::ForeignSymlink { .. })
        ));
        let roots = t.path().join("roots");
        symlink("pub/lnk", &roots).unwrap();
        assert!(matches!(
            resolve(&settings, roots.to_str().unwrap()),
            Err(LocationError::ForeignSymlink { .. })
        ));
        // The caller's own link, or root's link to the real directory: fine.
        assert!(check_links(&planted, nobody).is_ok());
        let direct = t.path().join("direct");
        symlink(&store, &direct).unwrap();
        assert!(resolve(&settings, direct.to_str().unwrap()).is_ok());
    }
}
