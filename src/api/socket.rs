//! The Unix socket of `lume serve --socket PATH`, set up so that no other
//! user can redirect what the server (root) does to it: the directory must
//! be one only the server's user (or root) can change, or sticky; the
//! socket is bound, given its mode and group inside a private directory
//! nobody else can enter, then renamed into place and checked again.

use std::io;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

/// Why the Unix socket cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("The socket path {0} has no file name: give --socket a path such as /run/lume.sock")]
    NoName(PathBuf),
    #[error("Cannot read the socket's directory {0}: create it, or give --socket another path")]
    Dir(PathBuf, #[source] io::Error),
    #[error(
        "The socket's directory {dir} can be changed by other users (owner uid {owner}, mode {mode:04o}), \
         who could swap the socket for a link: put it in a directory only root or the server's user can write, such as /run"
    )]
    OpenDir { dir: PathBuf, owner: u32, mode: u32 },
    #[error(
        "The directory {} above the socket can be changed by {}, who could swap the socket's directory for a link: put the socket in a directory such as /run",
        .0.dir.display(), .0.who
    )]
    Ancestor(crate::vm::store::UnsafeDir),
    #[error("{0} exists and is not a socket: give --socket a new path")]
    NotASocket(PathBuf),
    #[error("Another server already listens on {0}: stop it or give --socket another path")]
    Live(PathBuf),
    #[error("Cannot listen on the Unix socket {0}")]
    Bind(PathBuf, #[source] io::Error),
    #[error("Cannot set up the Unix socket {0}")]
    Setup(PathBuf, #[source] io::Error),
    #[error(
        "{0} was changed by someone else while the server put its socket there: give --socket a path in a directory only root or the server's user can write"
    )]
    Replaced(PathBuf),
}

/// Whether a directory with this owner and mode can be changed only by the
/// server's user (`euid`) or root; a sticky directory (like /tmp) lets
/// others add names but not rename or remove ours, so it passes too.
pub fn dir_is_safe(owner: u32, mode: u32, euid: u32) -> bool {
    let sticky = mode & 0o1000 != 0;
    (owner == euid || owner == 0) && (sticky || mode & 0o022 == 0)
}

/// A bound socket: the listener, and the inode of its file (so that only
/// that file is removed at exit).
pub struct BoundSocket {
    pub listener: std::os::unix::net::UnixListener,
    pub path: PathBuf,
    inode: u64,
}

impl BoundSocket {
    /// Removes the socket file, if it is still ours.
    pub fn remove(&self) {
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.inode) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds the Unix socket at `path`: mode 0660, group `gid` when given. A
/// stale socket file nobody listens on is replaced; a live one is not.
pub fn bind(path: &Path, gid: Option<nix::unistd::Gid>) -> Result<BoundSocket, SocketError> {
    let name = path
        .file_name()
        .ok_or_else(|| SocketError::NoName(path.to_path_buf()))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let meta = std::fs::metadata(&dir).map_err(|e| SocketError::Dir(dir.clone(), e))?;
    let euid = nix::unistd::geteuid().as_raw();
    let mode = meta.mode() & 0o7777;
    if !meta.is_dir() || !dir_is_safe(meta.uid(), mode, euid) {
        return Err(SocketError::OpenDir {
            dir,
            owner: meta.uid(),
            mode,
        });
    }
    // Nor may anybody else change a directory above it.
    crate::vm::store::check_ancestors_private(&dir).map_err(SocketError::Ancestor)?;
    if let Ok(existing) = std::fs::symlink_metadata(path) {
        if !existing.file_type().is_socket() {
            return Err(SocketError::NotASocket(path.to_path_buf()));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(SocketError::Live(path.to_path_buf()));
        }
    }
    // A directory of our own (mode 0700), beside the final path so that the
    // rename stays on one file system.
    let template = dir.join(format!(".{}.XXXXXX", name.to_string_lossy()));
    let private = nix::unistd::mkdtemp(&template)
        .map_err(|e| SocketError::Setup(path.to_path_buf(), e.into()))?;
    let result = bind_in(&private, path, gid);
    let _ = std::fs::remove_dir_all(&private);
    result
}

fn bind_in(
    private: &Path,
    path: &Path,
    gid: Option<nix::unistd::Gid>,
) -> Result<BoundSocket, SocketError> {
    let setup = |e: io::Error| SocketError::Setup(path.to_path_buf(), e);
    let staged = private.join("socket");
    let listener = std::os::unix::net::UnixListener::bind(&staged)
        .map_err(|e| SocketError::Bind(path.to_path_buf(), e))?;
    // Nobody else can enter `private`, so these paths are the socket itself.
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o660)).map_err(setup)?;
    if let Some(gid) = gid {
        nix::unistd::fchownat(
            nix::fcntl::AT_FDCWD,
            &staged,
            None,
            Some(gid),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| setup(e.into()))?;
    }
    let inode = std::fs::symlink_metadata(&staged).map_err(setup)?.ino();
    // rename replaces a stale socket (never follows a link), and in a
    // sticky directory fails on a name someone else owns.
    std::fs::rename(&staged, path).map_err(setup)?;
    let placed = std::fs::symlink_metadata(path).map_err(setup)?;
    if !placed.file_type().is_socket()
        || placed.ino() != inode
        || placed.uid() != nix::unistd::geteuid().as_raw()
    {
        return Err(SocketError::Replaced(path.to_path_buf()));
    }
    Ok(BoundSocket {
        listener,
        path: path.to_path_buf(),
        inode,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_directories_only_the_server_can_change() {
        assert!(dir_is_safe(0, 0o755, 0));
        assert!(dir_is_safe(0, 0o1777, 0), "sticky, like /tmp");
        assert!(dir_is_safe(1000, 0o700, 1000));
        assert!(
            dir_is_safe(0, 0o755, 1000),
            "root's /run for a user's server"
        );
        assert!(!dir_is_safe(0, 0o777, 0));
        assert!(!dir_is_safe(0, 0o775, 0));
        assert!(!dir_is_safe(1000, 0o755, 0), "another user's directory");
    }

    /// A directory above the socket's that another user owns could be
    /// retargeted after the checks: refused (as root).
    #[test]
    fn a_directory_above_that_another_user_owns_is_refused() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let top = tempfile::tempdir().unwrap();
        std::fs::set_permissions(top.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let theirs = top.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o755)).unwrap();
        nix::unistd::chown(&theirs, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
        let run = theirs.join("run");
        std::fs::create_dir(&run).unwrap();
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = bind(&run.join("lume.sock"), None).err().expect("refused");
        assert!(matches!(e, SocketError::Ancestor(_)), "{e}");
        assert!(e.to_string().contains("user 65534"), "{e}");
        assert!(!run.join("lume.sock").exists());
    }

    #[test]
    fn a_socket_is_placed_private_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.path().join("lume.sock");
        let gid = nix::unistd::getegid();
        let bound = bind(&path, Some(gid)).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.mode() & 0o7777, 0o660);
        assert_eq!(meta.gid(), gid.as_raw());
        // Nothing else is left in the directory.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        assert!(matches!(bind(&path, None), Err(SocketError::Live(_))));
        // A link at the path is never followed.
        let target = dir.path().join("target");
        std::fs::write(&target, "x").unwrap();
        let link = dir.path().join("link.sock");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(matches!(bind(&link, None), Err(SocketError::NotASocket(_))));
        // A directory others can write is refused.
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = bind(&open.join("s"), None).err().unwrap();
        assert!(matches!(e, SocketError::OpenDir { .. }), "{e}");
        assert!(
            e.to_string().contains("can be changed by other users"),
            "{e}"
        );
        // A sticky one (like /tmp) is fine: others cannot move our name.
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let sticky = bind(&open.join("s"), None).unwrap();
        sticky.remove();
        // Removal at exit removes only our own file.
        bound.remove();
        assert!(!path.exists());
    }
}
