//! Who asked for an action. The CLI acts for the user who runs it; the API
//! acts for the uid on the other end of the connection. Host paths named in a
//! request (kernels, images, ISOs, disks, storage) are used with the caller's
//! rights, never with lume's own.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Group, Uid, User};

/// How a host file named by the caller is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read only: kernels, initrds, images, ISOs.
    Read,
    /// Read and write: extra disks. A root caller may also name a block device.
    ReadWrite,
}

/// Why a host file could not be opened for the caller.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{path}: permission denied for uid {uid}")]
    Forbidden { path: PathBuf, uid: u32 },
    #[error("{path} does not exist")]
    Missing { path: PathBuf },
    #[error("{path} is not a regular file")]
    NotRegular { path: PathBuf },
    /// A /proc magic link (`/proc/self/fd/N`, `/dev/fd/N`, …) or a loop of
    /// symbolic links in the path (ELOOP).
    #[error(
        "{path} goes through a /proc or /dev/fd link or a loop of symbolic links, which lume does not follow for a caller: give the file's real path"
    )]
    MagicLink { path: PathBuf },
    #[error("Cannot open {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A uid with its primary and supplementary groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    /// The primary group; `None` for a uid without a passwd entry.
    pub gid: Option<u32>,
    /// Supplementary groups (the primary group may appear here too).
    pub groups: Vec<u32>,
}

impl Caller {
    /// The user running this process (its real uid and gid, and its groups).
    pub fn current() -> Self {
        let groups = nix::unistd::getgroups()
            .map(|g| g.into_iter().map(Gid::as_raw).collect())
            .unwrap_or_default();
        Self {
            uid: nix::unistd::getuid().as_raw(),
            gid: Some(nix::unistd::getgid().as_raw()),
            groups,
        }
    }

    /// A uid looked up in the user database: its primary group and every
    /// group that lists it. A uid without an entry has no group at all, so it
    /// is never a member of any group (its number says nothing about a gid).
    pub fn from_uid(uid: u32) -> Self {
        let Some(user) = User::from_uid(Uid::from_raw(uid)).ok().flatten() else {
            return Self {
                uid,
                gid: None,
                groups: Vec::new(),
            };
        };
        let gid = user.gid.as_raw();
        let groups = std::ffi::CString::new(user.name.as_str())
            .ok()
            .and_then(|name| nix::unistd::getgrouplist(&name, user.gid).ok())
            .map(|g| g.into_iter().map(Gid::as_raw).collect())
            .unwrap_or_else(|| vec![gid]);
        Self {
            uid,
            gid: Some(gid),
            groups,
        }
    }

    pub fn is_root(&self) -> bool {
        self.uid == 0
    }

    /// Whether the caller is in group `name` (primary or supplementary).
    pub fn in_group(&self, name: &str) -> bool {
        match Group::from_name(name) {
            Ok(Some(g)) => {
                self.gid == Some(g.gid.as_raw()) || self.groups.contains(&g.gid.as_raw())
            }
            _ => false,
        }
    }
}

impl Caller {
    /// Opens `path` with the caller's rights, as the caller could open it
    /// itself: a thread that takes the caller's filesystem identity (groups,
    /// fsgid, fsuid) opens the file and ends. From then on the descriptor is
    /// used, never the path. Only regular files are accepted, and block
    /// devices for [`Access::ReadWrite`] when the caller is root.
    pub fn open(&self, path: &Path, access: Access) -> Result<File, OpenError> {
        self.open_resolving(path, access, libc::RESOLVE_NO_MAGICLINKS)
    }

    /// Opens a file this process's parent lume handed over as
    /// `/proc/<parent pid>/fd/N` (a detached supervisor receives the files its
    /// parent opened with its caller's rights). Any other path is refused.
    pub fn open_from_parent(&self, path: &Path, access: Access) -> Result<File, OpenError> {
        if !handed_over_by_parent(path) {
            return Err(OpenError::Forbidden {
                path: path.to_path_buf(),
                uid: self.uid,
            });
        }
        self.open_resolving(path, access, 0)
    }

    /// Opens a directory with the caller's rights, to share it with a guest:
    /// the caller must be able to list and enter it, and for
    /// [`Access::ReadWrite`] to write in it. A path this process's parent
    /// handed over (`/proc/<parent pid>/fd/N`) is taken as
    /// [`Self::open_from_parent`] does; other magic links are refused.
    pub fn open_dir(&self, path: &Path, access: Access) -> Result<File, OpenError> {
        let resolve = if handed_over_by_parent(path) {
            0
        } else {
            libc::RESOLVE_NO_MAGICLINKS
        };
        let caller = self.clone();
        let owned = path.to_path_buf();
        let opened = std::thread::scope(|s| {
            s.spawn(move || -> io::Result<File> {
                if nix::unistd::geteuid().as_raw() != caller.uid {
                    caller.become_on_this_thread()?;
                }
                let dir = open_dir_resolving(&owned, resolve)?;
                let want = match access {
                    Access::Read => libc::R_OK | libc::X_OK,
                    Access::ReadWrite => libc::R_OK | libc::W_OK | libc::X_OK,
                };
                // SAFETY: faccessat on a descriptor this thread owns, with a
                // static NUL-terminated path; AT_EACCESS checks with this
                // thread's filesystem ids (the caller's).
                let rc = unsafe {
                    libc::faccessat(dir.as_raw_fd(), c".".as_ptr(), want, libc::AT_EACCESS)
                };
                if rc != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(dir)
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the opening thread panicked")))
        });
        opened.map_err(|source| match source.raw_os_error() {
            Some(libc::EACCES | libc::EPERM) => OpenError::Forbidden {
                path: path.to_path_buf(),
                uid: self.uid,
            },
            Some(libc::ENOENT) => OpenError::Missing {
                path: path.to_path_buf(),
            },
            // The path names something else than a directory (or goes
            // through one).
            Some(libc::ENOTDIR) => OpenError::NotRegular {
                path: path.to_path_buf(),
            },
            Some(libc::ELOOP) => OpenError::MagicLink {
                path: path.to_path_buf(),
            },
            _ => OpenError::Io {
                path: path.to_path_buf(),
                source,
            },
        })
    }

    fn open_resolving(&self, path: &Path, access: Access, resolve: u64) -> Result<File, OpenError> {
        let caller = self.clone();
        let owned = path.to_path_buf();
        let opened = std::thread::scope(|s| {
            s.spawn(move || caller.open_here(&owned, access, resolve))
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the opening thread panicked")))
        });
        let file = opened.map_err(|source| match source.raw_os_error() {
            Some(libc::EACCES | libc::EPERM) => OpenError::Forbidden {
                path: path.to_path_buf(),
                uid: self.uid,
            },
            Some(libc::ENOENT | libc::ENOTDIR) => OpenError::Missing {
                path: path.to_path_buf(),
            },
            Some(libc::ELOOP) => OpenError::MagicLink {
                path: path.to_path_buf(),
            },
            _ => OpenError::Io {
                path: path.to_path_buf(),
                source,
            },
        })?;
        let io_at = |source| OpenError::Io {
            path: path.to_path_buf(),
            source,
        };
        let kind = file.metadata().map_err(io_at)?.file_type();
        let device_ok = access == Access::ReadWrite && self.is_root() && kind.is_block_device();
        if !kind.is_file() && !device_ok {
            return Err(OpenError::NotRegular {
                path: path.to_path_buf(),
            });
        }
        // Opened non-blocking so that a FIFO could not stall us; back to blocking.
        nix::fcntl::fcntl(
            &file,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
        )
        .map_err(|e| io_at(e.into()))?;
        Ok(file)
    }

    /// Runs on a thread of its own: changes this thread's filesystem
    /// identity to the caller's (raw syscalls, which act on the calling
    /// thread only, unlike glibc's wrappers that change every thread), then
    /// opens the file.
    fn open_here(&self, path: &Path, access: Access, resolve: u64) -> io::Result<File> {
        if nix::unistd::geteuid().as_raw() != self.uid {
            self.become_on_this_thread()?;
        }
        open_resolving(path, access, resolve)
    }

    /// The group whose rights apply to files: the caller's primary group, or
    /// the overflow group (65534, `nogroup`) for a uid without an entry.
    fn fs_gid(&self) -> u32 {
        self.gid.unwrap_or(65534)
    }

    fn become_on_this_thread(&self) -> io::Result<()> {
        let groups: Vec<libc::gid_t> = self.groups.clone();
        // SAFETY: raw setgroups(2) with a pointer/length pair describing a
        // live Vec; it changes the calling thread's credentials only.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_setgroups,
                groups.len() as libc::size_t,
                groups.as_ptr(),
            )
        };
        if rc != 0 && nix::unistd::geteuid().is_root() {
            return Err(io::Error::last_os_error());
        }
        let gid = self.fs_gid();
        // SAFETY: raw setfsgid/setfsuid take plain integers and change the
        // calling thread's filesystem ids only; they return the previous id.
        unsafe {
            libc::syscall(libc::SYS_setfsgid, gid);
            libc::syscall(libc::SYS_setfsuid, self.uid);
        }
        // Both calls report the id in force only by being asked again (an
        // invalid id changes nothing and returns the current one).
        // SAFETY: as above; u32::MAX is never a valid id, so nothing changes.
        let (fsuid, fsgid) = unsafe {
            (
                libc::syscall(libc::SYS_setfsuid, u32::MAX) as u32,
                libc::syscall(libc::SYS_setfsgid, u32::MAX) as u32,
            )
        };
        if fsuid != self.uid || fsgid != gid {
            // Without the right to take the caller's identity, nothing is opened.
            return Err(io::Error::from_raw_os_error(libc::EACCES));
        }
        Ok(())
    }
}

/// Whether `path` is `/proc/<parent pid>/fd/<digits>`: a file this
/// process's parent lume handed over to it.
fn handed_over_by_parent(path: &Path) -> bool {
    let parent = nix::unistd::getppid().as_raw();
    path.to_str()
        .and_then(|p| p.strip_prefix(&format!("/proc/{parent}/fd/")))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Opens `path` with openat2's `resolve` flags: `RESOLVE_NO_MAGICLINKS`
/// keeps /proc's magic links (`/proc/self/fd/N`, `/dev/fd/N`,
/// `/proc/PID/root`) closed, through which a caller could reopen a file the
/// server holds, past directories it may not enter itself.
fn open_resolving(path: &Path, access: Access, resolve: u64) -> io::Result<File> {
    let mode = match access {
        Access::Read => libc::O_RDONLY,
        Access::ReadWrite => libc::O_RDWR,
    };
    openat2(path, mode | libc::O_NOCTTY | libc::O_NONBLOCK, resolve)
}

/// Opens a directory (O_DIRECTORY) with openat2's `resolve` flags.
fn open_dir_resolving(path: &Path, resolve: u64) -> io::Result<File> {
    openat2(path, libc::O_RDONLY | libc::O_DIRECTORY, resolve)
}

/// openat2(2) of `path` with `flags` (O_CLOEXEC added) and `resolve`.
fn openat2(path: &Path, flags: libc::c_int, resolve: u64) -> io::Result<File> {
    use std::os::fd::FromRawFd;
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: open_how is a plain C struct for which all-zero is valid.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.resolve = resolve;
    // SAFETY: openat2 reads a NUL-terminated path and an open_how of the size
    // given, both alive for the call; it returns a new descriptor or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            libc::AT_FDCWD,
            c_path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor was just returned by openat2 and nothing else owns it.
    Ok(unsafe { File::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_root_and_nobody_is_not() {
        assert!(Caller::from_uid(0).is_root());
        let nobody = Caller::from_uid(65534);
        assert!(!nobody.is_root());
        assert!(!nobody.in_group("root"));
        assert!(Caller::from_uid(0).in_group("root"));
    }

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn a_directory_is_shared_only_with_the_callers_rights() {
        if !is_root() {
            eprintln!("skipped: needs root to act as another uid");
            return;
        }
        use std::os::unix::fs::PermissionsExt;
        let nobody = Caller::from_uid(65534);
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        // A directory nobody may not list (as /root), directly or by a symlink.
        let secret = dir.path().join("secret");
        std::fs::create_dir(&secret).unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o700)).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        let root_link = dir.path().join("root");
        std::os::unix::fs::symlink("/root", &root_link).unwrap();
        for p in [Path::new("/root"), &secret, &link, &root_link] {
            assert!(
                matches!(
                    nobody.open_dir(p, Access::Read),
                    Err(OpenError::Forbidden { .. })
                ),
                "{}",
                p.display()
            );
        }
        // Readable but not writable: read-only only.
        let public = dir.path().join("public");
        std::fs::create_dir(&public).unwrap();
        std::fs::set_permissions(&public, std::fs::Permissions::from_mode(0o755)).unwrap();
        nobody.open_dir(&public, Access::Read).unwrap();
        assert!(matches!(
            nobody.open_dir(&public, Access::ReadWrite),
            Err(OpenError::Forbidden { .. })
        ));
        Caller::from_uid(0)
            .open_dir(&secret, Access::ReadWrite)
            .unwrap();
        // Not a directory; a magic link to root's open directory.
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            nobody.open_dir(&file, Access::Read),
            Err(OpenError::NotRegular { .. })
        ));
        let held = File::open(&secret).unwrap();
        let magic = format!("/proc/self/fd/{}", held.as_raw_fd());
        assert!(matches!(
            nobody.open_dir(Path::new(&magic), Access::Read),
            Err(OpenError::MagicLink { .. })
        ));
        assert!(matches!(
            Caller::from_uid(0).open_dir(Path::new(&magic), Access::Read),
            Err(OpenError::MagicLink { .. })
        ));
        // Only /proc/<parent>/fd/<digits> is taken as handed over: a path
        // that starts like one but climbs out to the parent's root is a
        // magic link like any other.
        let parent = nix::unistd::getppid().as_raw();
        let climbing = format!("/proc/{parent}/fd/../root{}", secret.display());
        assert!(!handed_over_by_parent(Path::new(&climbing)));
        assert!(matches!(
            Caller::from_uid(0).open_dir(Path::new(&climbing), Access::Read),
            Err(OpenError::MagicLink { .. })
        ));
        assert!(handed_over_by_parent(Path::new(&format!(
            "/proc/{parent}/fd/7"
        ))));
    }

    #[test]
    fn opens_with_the_callers_rights_only() {
        if !is_root() {
            eprintln!("skipped: needs root to act as another uid");
            return;
        }
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let private = dir.path().join("private");
        let public = dir.path().join("public");
        std::fs::write(&private, b"x").unwrap();
        std::fs::write(&public, b"x").unwrap();
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::set_permissions(&public, std::fs::Permissions::from_mode(0o644)).unwrap();
        let nobody = Caller::from_uid(65534);
        assert!(matches!(
            nobody.open(&private, Access::Read),
            Err(OpenError::Forbidden { uid: 65534, .. })
        ));
        nobody.open(&public, Access::Read).unwrap();
        assert!(matches!(
            nobody.open(&public, Access::ReadWrite),
            Err(OpenError::Forbidden { .. })
        ));
        // This thread kept its own identity: root still opens the private file.
        Caller::from_uid(0)
            .open(&private, Access::ReadWrite)
            .unwrap();
        assert!(matches!(
            Caller::from_uid(0).open(dir.path(), Access::Read),
            Err(OpenError::NotRegular { .. })
        ));
        assert!(matches!(
            nobody.open(&dir.path().join("none"), Access::Read),
            Err(OpenError::Missing { .. })
        ));
        // A block device only for a root caller's read-write disk.
        let dev = std::path::Path::new("/dev/loop0");
        if dev.exists() {
            assert!(matches!(
                Caller::from_uid(0).open(dev, Access::Read),
                Err(OpenError::NotRegular { .. })
            ));
        }
    }

    /// `/proc/self/fd/N` reopens a file the server holds, past directories
    /// the caller may not enter: refused, whoever asks.
    #[test]
    fn magic_links_are_never_followed() {
        if !is_root() {
            eprintln!("skipped: needs root to act as another uid");
            return;
        }
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        // nobody may not enter it.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let inside = dir.path().join("readable-by-all");
        std::fs::write(&inside, b"x").unwrap();
        std::fs::set_permissions(&inside, std::fs::Permissions::from_mode(0o644)).unwrap();
        let held = File::open(&inside).unwrap();
        let magic = std::path::PathBuf::from(format!("/proc/self/fd/{}", held.as_raw_fd()));
        let nobody = Caller::from_uid(65534);
        assert!(nobody.open(&inside, Access::Read).is_err());
        assert!(
            nobody.open(&magic, Access::Read).is_err(),
            "reopened through {magic:?}"
        );
        // A symlink of the caller's to the magic link changes nothing.
        let link_dir = tempfile::tempdir().unwrap();
        let link = link_dir.path().join("link");
        std::os::unix::fs::symlink(&magic, &link).unwrap();
        assert!(nobody.open(&link, Access::Read).is_err());
        assert!(Caller::from_uid(0).open(&magic, Access::Read).is_err());
        // Plain symlinks still work.
        let plain = link_dir.path().join("plain");
        std::os::unix::fs::symlink(&inside, &plain).unwrap();
        Caller::from_uid(0).open(&plain, Access::Read).unwrap();
    }

    /// A uid without a passwd entry is in no group, not even the one whose
    /// gid is its own number.
    #[test]
    fn a_uid_without_an_entry_is_in_no_group() {
        let groups = std::fs::read_to_string("/etc/group").unwrap();
        let (name, gid) = groups
            .lines()
            .filter_map(|l| {
                let mut f = l.split(':');
                let name = f.next()?;
                let gid = f.nth(1)?.parse::<u32>().ok()?;
                Some((name.to_string(), gid))
            })
            .find(|(_, gid)| User::from_uid(Uid::from_raw(*gid)).ok().flatten().is_none())
            .expect("a group whose gid is no user's uid");
        let ghost = Caller::from_uid(gid);
        assert_eq!(ghost.gid, None);
        assert!(ghost.groups.is_empty());
        assert!(!ghost.in_group(&name), "uid {gid} is not in group {name}");
    }
}
