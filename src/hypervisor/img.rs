//! Disk files: sparse raw creation, growing, reflink/sparse copies and
//! allocation accounting. Every file made here is private (0600). Importing
//! images lives in [`crate::image::import`].

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Mode of every file lume writes into a VM directory.
pub const PRIVATE_FILE: u32 = 0o600;

/// Why a disk operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("qemu-img was not found: install the qemu-utils package (apt-get install qemu-utils)")]
    QemuImgMissing,
    #[error("Importing {path} failed: qemu-img says: {message}")]
    Convert { path: PathBuf, message: String },
    #[error("Disk operation on {path} failed")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Creates a sparse raw disk of `size` bytes.
pub fn create_sparse(path: &Path, size: u64) -> Result<(), ImageError> {
    let f = new_private(path).map_err(io_err(path))?;
    f.set_len(size).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// Grows a raw disk to `size` bytes (never shrinks).
pub fn grow(path: &Path, size: u64) -> Result<(), ImageError> {
    let f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NOCTTY)
        .open(path)
        .map_err(io_err(path))?;
    let len = f.metadata().map_err(io_err(path))?.len();
    if size > len {
        f.set_len(size).map_err(io_err(path))?;
        f.sync_all().map_err(io_err(path))?;
    }
    Ok(())
}

/// Bytes really allocated on disk.
pub fn allocated(path: &Path) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.blocks() * 512)
}

/// A new private file (0600), never following a symlink.
fn new_private(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(PRIVATE_FILE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// How a file was copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyKind {
    Reflink,
    Sparse,
}

/// Copies `src` to a new private file `dst` (never following a symlink at
/// `src`); see [`copy_from`].
pub fn copy_file(src: &Path, dst: &Path) -> Result<CopyKind, ImageError> {
    let from = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(src)
        .map_err(io_err(src))?;
    copy_from(&from, dst)
}

/// Copies the open file `from` to a new private file `dst`: a reflink where
/// the filesystem shares extents (btrfs, XFS), otherwise a copy of the
/// allocated ranges only, so the time depends on the data, not on the
/// nominal size. The copy is fsynced.
pub fn copy_from(from: &File, dst: &Path) -> Result<CopyKind, ImageError> {
    let len = from.metadata().map_err(io_err(dst))?.len();
    let to = new_private(dst).map_err(io_err(dst))?;
    // nix has no FICLONE call (only the ioctl macros): ioctl(2) here.
    // SAFETY: FICLONE takes the source descriptor as its argument; both
    // descriptors are open for the duration of the call.
    let rc = unsafe { libc::ioctl(to.as_raw_fd(), libc::FICLONE, from.as_raw_fd()) };
    if rc == 0 {
        to.sync_all().map_err(io_err(dst))?;
        return Ok(CopyKind::Reflink);
    }
    copy_sparse(from, &to, len).map_err(io_err(dst))?;
    to.set_len(len).map_err(io_err(dst))?;
    to.sync_all().map_err(io_err(dst))?;
    Ok(CopyKind::Sparse)
}

/// Whether a copy_file_range error means "not between these files": the
/// range is then copied with plain reads and writes.
fn needs_plain_copy(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EXDEV | libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS)
    )
}

/// Copies `[from_off, end)` with pread/pwrite.
fn copy_plain(from: &File, to: &File, mut off: u64, end: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    while off < end {
        let want = ((end - off) as usize).min(buf.len());
        let n = from.read_at(&mut buf[..want], off)?;
        if n == 0 {
            break;
        }
        to.write_all_at(&buf[..n], off)?;
        off += n as u64;
    }
    Ok(())
}

fn copy_sparse(from: &File, to: &File, len: u64) -> io::Result<()> {
    use nix::unistd::{Whence, lseek};
    let mut pos: i64 = 0;
    let mut plain = false;
    while (pos as u64) < len {
        let data = match lseek(from, pos, Whence::SeekData) {
            Ok(data) => data,
            // No data after pos: the rest is a hole.
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let hole = lseek(from, data, Whence::SeekHole)?;
        let mut off_in = data;
        let mut off_out = data;
        while off_in < hole {
            if plain {
                copy_plain(from, to, off_in as u64, hole as u64)?;
                break;
            }
            let chunk = (hole - off_in) as usize;
            let n = match nix::fcntl::copy_file_range(
                from,
                Some(&mut off_in),
                to,
                Some(&mut off_out),
                chunk,
            ) {
                Ok(n) => n,
                Err(e) => {
                    let e = io::Error::from(e);
                    if needs_plain_copy(&e) {
                        plain = true;
                        continue;
                    }
                    return Err(e);
                }
            };
            if n == 0 {
                break;
            }
        }
        pos = hole;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.img");
        create_sparse(&src, 64 << 20).unwrap();
        let mut f = OpenOptions::new().write(true).open(&src).unwrap();
        f.seek(SeekFrom::Start(10 << 20)).unwrap();
        f.write_all(&[7u8; 8192]).unwrap();
        f.sync_all().unwrap();
        let dst = dir.path().join("dst.img");
        copy_file(&src, &dst).unwrap();
        let a = std::fs::read(&src).unwrap();
        let b = std::fs::read(&dst).unwrap();
        assert_eq!(a, b);
        assert!(allocated(&dst).unwrap() < 4 << 20, "copy must stay sparse");
        let mode = std::fs::metadata(&dst).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    /// tmpfs to the storage filesystem: copy_file_range says EXDEV there.
    #[test]
    fn copies_across_filesystems() {
        let shm = tempfile::tempdir_in("/dev/shm").unwrap();
        let src = shm.path().join("vmlinuz");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&src, &data).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let dst = dir.path().join("vmlinuz");
        copy_file(&src, &dst).unwrap();
        assert_eq!(std::fs::read(&dst).unwrap(), data);
    }
}
