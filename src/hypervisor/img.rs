//! Disk images: sparse raw creation, import through `qemu-img convert`,
//! growing, reflink/sparse copies and allocation accounting.

use std::fs::{File, OpenOptions};
use std::io::{self, IsTerminal};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Why a disk operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("qemu-img was not found: install the qemu-utils package (apt-get install qemu-utils)")]
    QemuImgMissing,
    #[error("Cannot read image {path}: qemu-img says: {message}")]
    Inspect { path: PathBuf, message: String },
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
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io_err(path))?;
    f.set_len(size).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// Grows a raw disk to `size` bytes (never shrinks).
pub fn grow(path: &Path, size: u64) -> Result<(), ImageError> {
    let f = OpenOptions::new()
        .write(true)
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

fn qemu_img() -> Command {
    Command::new("qemu-img")
}

/// The virtual size of any image qemu-img understands.
pub fn virtual_size(path: &Path) -> Result<u64, ImageError> {
    let out = qemu_img()
        .args(["info", "--output=json"])
        .arg(path)
        .output()
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => ImageError::QemuImgMissing,
            _ => io_err(path)(e),
        })?;
    if !out.status.success() {
        return Err(ImageError::Inspect {
            path: path.to_path_buf(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| ImageError::Inspect {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    v["virtual-size"]
        .as_u64()
        .ok_or_else(|| ImageError::Inspect {
            path: path.to_path_buf(),
            message: "no virtual-size in its answer".into(),
        })
}

/// Converts `src` (qcow2, raw, vmdk, ...) to a sparse raw file at `dst`,
/// showing qemu-img's progress bar when stderr is a terminal.
pub fn import(src: &Path, dst: &Path) -> Result<(), ImageError> {
    let mut cmd = qemu_img();
    cmd.args(["convert", "-O", "raw"]);
    let tty = io::stderr().is_terminal();
    if tty {
        cmd.arg("-p");
    }
    cmd.arg(src).arg(dst);
    cmd.stdin(Stdio::null());
    cmd.stdout(if tty { Stdio::inherit() } else { Stdio::null() });
    let out = cmd
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => ImageError::QemuImgMissing,
            _ => io_err(src)(e),
        })?;
    if !out.status.success() {
        return Err(ImageError::Convert {
            path: src.to_path_buf(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// How a file was copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyKind {
    Reflink,
    Sparse,
}

/// Copies `src` to a new file `dst`: a reflink where the filesystem shares
/// extents (btrfs, XFS), otherwise a copy of the allocated ranges only, so the
/// time depends on the data, not on the nominal size.
pub fn copy_file(src: &Path, dst: &Path) -> Result<CopyKind, ImageError> {
    let from = File::open(src).map_err(io_err(src))?;
    let len = from.metadata().map_err(io_err(src))?.len();
    let to = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)
        .map_err(io_err(dst))?;
    // SAFETY: FICLONE takes the source descriptor as its argument; both
    // descriptors are open for the duration of the call.
    let rc = unsafe { libc::ioctl(to.as_raw_fd(), libc::FICLONE, from.as_raw_fd()) };
    if rc == 0 {
        to.sync_all().map_err(io_err(dst))?;
        return Ok(CopyKind::Reflink);
    }
    copy_sparse(&from, &to, len).map_err(io_err(dst))?;
    to.set_len(len).map_err(io_err(dst))?;
    to.sync_all().map_err(io_err(dst))?;
    Ok(CopyKind::Sparse)
}

fn copy_sparse(from: &File, to: &File, len: u64) -> io::Result<()> {
    let (ffd, tfd) = (from.as_raw_fd(), to.as_raw_fd());
    let mut pos: i64 = 0;
    while (pos as u64) < len {
        // SAFETY: lseek on an open descriptor has no memory effects.
        let data = unsafe { libc::lseek(ffd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after pos: the rest is a hole
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(ffd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut off_in = data;
        let mut off_out = data;
        while off_in < hole {
            let chunk = (hole - off_in) as usize;
            // SAFETY: both offsets point to live i64 locals; the descriptors are open.
            let n = unsafe { libc::copy_file_range(ffd, &mut off_in, tfd, &mut off_out, chunk, 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
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
    }
}
