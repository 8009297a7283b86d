//! Disk images: sparse raw creation, import through `qemu-img convert`,
//! growing, reflink/sparse copies and allocation accounting.
//!
//! Every file made here is private (0600). An import never lets qemu-img
//! guess a format or follow a backing file: the source is first copied from
//! an already-open descriptor into the private work directory, the header of
//! that copy is checked by [`super::format::sniff`], and only the copy is
//! converted, with its format named and its backing chain disabled.

use std::fs::{File, OpenOptions};
use std::io::{self, IsTerminal, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::format::{self, FormatError, SourceFormat};

/// Mode of every file lume writes into a VM directory.
pub const PRIVATE_FILE: u32 = 0o600;

/// Why a disk operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("qemu-img was not found: install the qemu-utils package (apt-get install qemu-utils)")]
    QemuImgMissing,
    #[error("Cannot read image {path}: qemu-img says: {message}")]
    Inspect { path: PathBuf, message: String },
    #[error("Importing {path} failed: qemu-img says: {message}")]
    Convert { path: PathBuf, message: String },
    #[error("Cannot import {path}")]
    Format {
        path: PathBuf,
        #[source]
        source: FormatError,
    },
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

fn qemu_img() -> Command {
    Command::new("qemu-img")
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

/// Makes `dst` the VM's raw disk from the image open as `src` (named `path`
/// in messages): a private copy of `src` in `work` is checked and then either
/// is the disk (raw) or is converted to raw (qcow2). The result is fsynced.
pub fn import(
    src: &File,
    path: &Path,
    work: &Path,
    dst: &Path,
) -> Result<SourceFormat, ImageError> {
    let copy = work.join(".import-source");
    let result = import_via(src, path, &copy, dst);
    let _ = std::fs::remove_file(&copy);
    result
}

fn import_via(
    src: &File,
    path: &Path,
    copy: &Path,
    dst: &Path,
) -> Result<SourceFormat, ImageError> {
    copy_from(src, copy)?;
    // From here on only our private copy is read: its owner is us, so the
    // header checked is the header converted.
    let mut header = Vec::with_capacity(format::HEADER_LEN);
    File::open(copy)
        .and_then(|f| f.take(format::HEADER_LEN as u64).read_to_end(&mut header))
        .map_err(io_err(copy))?;
    let fmt = format::sniff(&header).map_err(|source| ImageError::Format {
        path: path.to_path_buf(),
        source,
    })?;
    match fmt {
        SourceFormat::Raw => std::fs::rename(copy, dst).map_err(io_err(dst))?,
        SourceFormat::Qcow2 => convert_qcow2(copy, path, dst)?,
    }
    let f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(dst)
        .map_err(io_err(dst))?;
    f.set_permissions(std::fs::Permissions::from_mode(PRIVATE_FILE))
        .map_err(io_err(dst))?;
    f.sync_all().map_err(io_err(dst))?;
    Ok(fmt)
}

/// The qemu-img source of a checked qcow2 file: format named, no backing chain.
fn qcow2_source(file: &Path) -> String {
    let spec = serde_json::json!({
        "driver": "qcow2",
        "file": { "driver": "file", "filename": file.to_string_lossy() },
        "backing": null,
    });
    format!("json:{spec}")
}

/// Converts the checked qcow2 `copy` to a sparse raw file at `dst`, showing
/// qemu-img's progress bar when stderr is a terminal.
fn convert_qcow2(copy: &Path, path: &Path, dst: &Path) -> Result<(), ImageError> {
    let mut cmd = qemu_img();
    cmd.args(["convert", "-O", "raw"]);
    let tty = io::stderr().is_terminal();
    if tty {
        cmd.arg("-p");
    }
    cmd.arg(qcow2_source(copy)).arg(dst);
    cmd.stdin(Stdio::null());
    cmd.stdout(if tty { Stdio::inherit() } else { Stdio::null() });
    let out = cmd
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => ImageError::QemuImgMissing,
            _ => io_err(path)(e),
        })?;
    if !out.status.success() {
        return Err(ImageError::Convert {
            path: path.to_path_buf(),
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
    let (ffd, tfd) = (from.as_raw_fd(), to.as_raw_fd());
    let mut pos: i64 = 0;
    let mut plain = false;
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
            if plain {
                copy_plain(from, to, off_in as u64, hole as u64)?;
                break;
            }
            let chunk = (hole - off_in) as usize;
            // SAFETY: both offsets point to live i64 locals; the descriptors are open.
            let n = unsafe { libc::copy_file_range(ffd, &mut off_in, tfd, &mut off_out, chunk, 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if needs_plain_copy(&e) {
                    plain = true;
                    continue;
                }
                return Err(e);
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

    fn qemu_img_ok(args: &[&str]) {
        let out = Command::new("qemu-img").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn import_path(src: &Path, work: &Path) -> Result<SourceFormat, ImageError> {
        let f = File::open(src).unwrap();
        import(&f, src, work, &work.join("disk.img"))
    }

    #[test]
    fn imports_qcow2_and_raw_and_refuses_backing_and_data_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let secret = d.join("secret");
        std::fs::write(&secret, b"TOP-SECRET-BYTES").unwrap();
        let p = |n: &str| d.join(n).display().to_string();

        // A qcow2 whose backing file is a host file: refused, nothing converted.
        qemu_img_ok(&[
            "create",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            &p("secret"),
            &p("backed.qcow2"),
        ]);
        let work = tempfile::tempdir().unwrap();
        let e = import_path(&d.join("backed.qcow2"), work.path()).unwrap_err();
        assert!(
            matches!(
                e,
                ImageError::Format {
                    source: FormatError::BackingFile,
                    ..
                }
            ),
            "{e}"
        );
        assert!(std::fs::read_dir(work.path()).unwrap().next().is_none());

        // A qcow2 with an external data file: refused.
        qemu_img_ok(&[
            "create",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={}", p("data.raw")),
            &p("ext.qcow2"),
            "1M",
        ]);
        let work = tempfile::tempdir().unwrap();
        let e = import_path(&d.join("ext.qcow2"), work.path()).unwrap_err();
        assert!(
            matches!(
                e,
                ImageError::Format {
                    source: FormatError::ExternalDataFile,
                    ..
                }
            ),
            "{e}"
        );

        // A vmdk: refused with advice to convert.
        qemu_img_ok(&["create", "-f", "vmdk", &p("a.vmdk"), "1M"]);
        let e = import_path(&d.join("a.vmdk"), work.path()).unwrap_err();
        assert!(
            crate::error_chain(&e).contains("convert it to qcow2 or raw"),
            "{e}"
        );

        // A plain qcow2 with data: converted to raw, private, data kept.
        std::fs::write(d.join("src.raw"), b"HELLO-FROM-QCOW2").unwrap();
        qemu_img_ok(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            &p("src.raw"),
            &p("ok.qcow2"),
        ]);
        let work = tempfile::tempdir().unwrap();
        assert_eq!(
            import_path(&d.join("ok.qcow2"), work.path()).unwrap(),
            SourceFormat::Qcow2
        );
        let disk = work.path().join("disk.img");
        assert!(
            std::fs::read(&disk)
                .unwrap()
                .starts_with(b"HELLO-FROM-QCOW2")
        );
        assert_eq!(
            std::fs::metadata(&disk).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let left: Vec<_> = std::fs::read_dir(work.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "only disk.img is left");

        // A raw image is its private copy.
        let work = tempfile::tempdir().unwrap();
        assert_eq!(
            import_path(&d.join("src.raw"), work.path()).unwrap(),
            SourceFormat::Raw
        );
        assert_eq!(
            std::fs::read(work.path().join("disk.img")).unwrap(),
            b"HELLO-FROM-QCOW2"
        );
    }
}
