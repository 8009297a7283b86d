//! The per-VM lock: an open-file-description (OFD) write lock on `<vm>/.lock`.
//! A running VM's supervisor holds it for as long as the VM runs; other
//! commands take it briefly to change the VM. The kernel drops it when the
//! holder dies, so a killed supervisor can never leave a VM that looks running.
//! Probing uses F_OFD_GETLK, which tests the lock without taking it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, fcntl};

/// A held lock; dropping it releases the lock.
#[derive(Debug)]
pub struct VmLock {
    _file: File,
}

fn whole_file_lock(kind: libc::c_int) -> libc::flock {
    // SAFETY: `flock` is a plain C struct for which all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    fl.l_len = 0;
    fl
}

/// Lock files are private (0600) and never a planted symlink.
fn open(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)
}

impl VmLock {
    /// Takes the lock if nobody holds it; `Ok(None)` when somebody does.
    pub fn try_acquire(path: &Path) -> io::Result<Option<Self>> {
        let file = open(path)?;
        let fl = whole_file_lock(libc::F_WRLCK);
        match fcntl(&file, FcntlArg::F_OFD_SETLK(&fl)) {
            Ok(_) => Ok(Some(Self { _file: file })),
            Err(Errno::EAGAIN | Errno::EACCES) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Waits up to `timeout` for the lock.
    pub fn acquire_within(path: &Path, timeout: std::time::Duration) -> io::Result<Option<Self>> {
        Self::acquire_polling(path, timeout, std::time::Duration::from_millis(20))
    }

    /// [`Self::acquire_within`], trying again after `first`, then twice as
    /// long each time up to 20 ms: a lock held for milliseconds at a time
    /// by many processes (the network lock while VMs start together) is
    /// handed on sooner, and a long wait still costs little.
    pub fn acquire_polling(
        path: &Path,
        timeout: std::time::Duration,
        first: std::time::Duration,
    ) -> io::Result<Option<Self>> {
        let deadline = std::time::Instant::now() + timeout;
        let longest = std::time::Duration::from_millis(20);
        let mut period = first.min(longest);
        loop {
            if let Some(l) = Self::try_acquire(path)? {
                return Ok(Some(l));
            }
            if std::time::Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(period);
            period = (period * 2).min(longest);
        }
    }

    /// Whether the file this lock holds is still the one at `path` (not
    /// unlinked, nor replaced, since it was opened).
    pub fn is_at(&self, path: &Path) -> bool {
        use std::os::unix::fs::MetadataExt as _;
        match (self._file.metadata(), std::fs::symlink_metadata(path)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }

    /// Whether some process holds the lock, without taking it.
    pub fn is_held(path: &Path) -> io::Result<bool> {
        let opened = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NOCTTY)
            .open(path);
        let file = match opened {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        let mut fl = whole_file_lock(libc::F_WRLCK);
        fcntl(&file, FcntlArg::F_OFD_GETLK(&mut fl))?;
        Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_refused_and_probe_sees_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(".lock");
        assert!(!VmLock::is_held(&p).unwrap());
        let l = VmLock::try_acquire(&p).unwrap().expect("first lock");
        assert!(VmLock::is_held(&p).unwrap());
        assert!(VmLock::try_acquire(&p).unwrap().is_none());
        drop(l);
        assert!(!VmLock::is_held(&p).unwrap());
        assert!(VmLock::try_acquire(&p).unwrap().is_some());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn a_planted_symlink_is_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("victim");
        let p = dir.path().join(".lock");
        std::os::unix::fs::symlink(&target, &p).unwrap();
        let e = VmLock::try_acquire(&p).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP));
        assert!(!target.exists(), "nothing created through the link");
        assert!(VmLock::is_held(&p).is_err());
    }
}
