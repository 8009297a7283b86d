//! Atomic file replacement: write a temporary file next to the target, fsync it,
//! rename it over the target, then fsync the directory. A crash at any point
//! leaves either the old file or the new one, never a half-written one.
//! Runtime state under `/run/lume` skips the fsyncs ([`write_runtime`]).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Replaces `path` with `contents` atomically.
pub fn write_atomic(path: &Path, contents: &[u8]) -> io::Result<()> {
    write_atomic_mode(path, contents, 0o666)
}

/// Replaces `path` with `contents` atomically; the new file is 0600.
pub fn write_private(path: &Path, contents: &[u8]) -> io::Result<()> {
    write_atomic_mode(path, contents, 0o600)
}

/// Replaces `path` with `contents` atomically (a 0600 file), without the
/// fsyncs: for lume's runtime state under `/run/lume` only. Atomic against
/// a kill at any point (the rename is; the page cache outlives the
/// process), which is all runtime state needs: a reboot ends every process
/// it describes (and empties `/run` where it is a tmpfs). Where `/run` is
/// on disk, a power loss may leave such a file empty or old; its readers
/// already treat an unreadable record as absent (a member record is
/// skipped, a generation counter reads 0 and makes the next join write the
/// firewall), and a record of a VM whose lock is free is collected.
pub fn write_runtime(path: &Path, contents: &[u8]) -> io::Result<()> {
    write_runtime_with(path, contents, |_| Ok(()))
}

/// [`write_runtime`], with `prepare` run on the temporary file before the
/// rename: a reader watching the directory (dnsmasq's `hostsdir`) sees the
/// file with the permissions `prepare` gives it, never without them.
pub fn write_runtime_with(
    path: &Path,
    contents: &[u8],
    prepare: impl FnOnce(&Path) -> io::Result<()>,
) -> io::Result<()> {
    replace(path, contents, 0o600, false, prepare)
}

/// Replaces `path` atomically with a file created with `mode` (less the umask).
fn write_atomic_mode(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    replace(path, contents, mode, true, |_| Ok(()))
}

/// The temporary file, (with `durable`) its fsync, the rename and the
/// directory's fsync.
fn replace(
    path: &Path,
    contents: &[u8],
    mode: u32,
    durable: bool,
    prepare: impl FnOnce(&Path) -> io::Result<()>,
) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{}",
        file_name.to_string_lossy(),
        std::process::id(),
        super::random::u64()
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
        f.write_all(contents)?;
        if durable {
            f.sync_all()?;
        }
        drop(f);
        prepare(&tmp)?;
        fs::rename(&tmp, path)?;
        if durable {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// At most `cap` bytes of the regular file at `path`, opened without
/// following a symlink and without blocking on a FIFO planted there;
/// `None` when it is missing, unreadable or not a regular file. For small
/// records lume wrote itself in a directory whose owner may not be root.
pub fn read_capped(path: &Path, cap: u64) -> Option<Vec<u8>> {
    use std::io::Read as _;
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .ok()?;
    if !f.metadata().ok()?.is_file() {
        return None;
    }
    let mut bytes = Vec::new();
    f.take(cap).read_to_end(&mut bytes).ok()?;
    Some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn runtime_files_are_replaced_private_and_never_through_a_symlink() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("members.generation");
        write_runtime(&p, b"1").unwrap();
        write_runtime(&p, b"2").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"2");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        // A symlink at the target is replaced, not followed.
        let outside = dir.path().join("outside");
        fs::write(&outside, b"keep").unwrap();
        let link = dir.path().join("firewall.generation");
        std::os::unix::fs::symlink(&outside, &link).unwrap();
        write_runtime(&link, b"3").unwrap();
        assert_eq!(fs::read(&outside).unwrap(), b"keep");
        assert!(
            !fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
    }

    /// A reader watching the directory sees the file only once `prepare`
    /// has given it its permissions; a failing `prepare` leaves nothing.
    #[test]
    fn runtime_files_appear_prepared() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p1-0000");
        write_runtime_with(&p, b"52:54:00:00:00:01,192.0.2.2\n", |tmp| {
            assert!(!p.exists(), "renamed before it was prepared");
            fs::set_permissions(tmp, fs::Permissions::from_mode(0o640))
        })
        .unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o640
        );
        let q = dir.path().join("p2-0000");
        let err = write_runtime_with(&q, b"x", |_| Err(io::Error::other("no ACLs")));
        assert!(err.is_err());
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "temporary file left"
        );
    }
}
