//! Importing an image as a VM's raw disk, from a host file or a URL.
//!
//! The bytes are untrusted. Their format is decided by our own parser
//! ([`super::format`]) from the content, never from a name, and qemu-img
//! is only ever run on a private file lume wrote, with the format named and
//! the backing chain disabled.
//!
//! - **raw** and **xz-compressed raw** stream straight into the VM's sparse
//!   disk (runs of zeros become holes): no second copy on disk.
//! - **qcow2** (plain or inside xz) needs random access: it is written to a
//!   private temporary file in the VM's work directory and converted to raw
//!   with `qemu-img convert -f qcow2`, then the temporary file is removed.
//! - A host file is first copied (a reflink where the filesystem can) into
//!   the work directory, and only that copy is read, so the file checked is
//!   the file used; a raw copy simply becomes the disk.
//!
//! With a SHA-256 digest the bytes as received (before decompression) are
//! hashed while they stream and compared before anything is published; a
//! mismatch fails the create, and the caller removes the work directory.

use std::fs::{File, OpenOptions};
use std::io::{self, IsTerminal, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::Sha256Digest;
use super::download::{Download, DownloadError};
use super::format::{self, FormatError, SourceFormat};
use crate::hypervisor::img::{self, ImageError, PRIVATE_FILE};

/// Name of the private temporary file in the work directory.
const TEMP_NAME: &str = ".import-source";

/// Why an import failed.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(transparent)]
    Download(#[from] DownloadError),
    #[error("Cannot import {source_name}")]
    Format {
        source_name: String,
        #[source]
        source: FormatError,
    },
    #[error(
        "Cannot import {source_name}: it is {size} bytes, not a whole number of 512-byte sectors, so it is not a raw disk image; check that it is the image you meant"
    )]
    NotSectors { source_name: String, size: u64 },
    #[error("Cannot import {source_name}: it is empty")]
    Empty { source_name: String },
    #[error(
        "Cannot import {source_name}: its disk is larger than {limit} bytes, the most lume accepts here: give a --disk-size at least as large if the image is right"
    )]
    TooLarge { source_name: String, limit: u64 },
    #[error(
        "The SHA-256 of {source_name} is {actual}, not {expected}: the file is damaged or not the one expected; nothing was created"
    )]
    Checksum {
        source_name: String,
        expected: Sha256Digest,
        actual: Sha256Digest,
    },
    #[error("Cannot unpack the xz stream of {source_name}: the file is damaged or not xz")]
    Xz {
        source_name: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "Cannot unpack the xz stream of {source_name}: it needs more than {XZ_MEMLIMIT} bytes of memory to decompress (a dictionary larger than any xz preset uses); recompress it with `xz -9` or import the uncompressed file"
    )]
    XzMemory { source_name: String },
    #[error("Cannot read {source_name}")]
    Read {
        source_name: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Disk(#[from] ImageError),
}

/// Where the bytes come from.
pub enum Source<'a> {
    /// A host file the caller opened (with their rights); `path` names it.
    File {
        file: &'a File,
        path: &'a Path,
    },
    Url(&'a str),
}

/// The most memory the xz decoder may use: `xz -9` (64 MiB dictionary)
/// needs about 65 MiB; a header asking for more is refused.
pub const XZ_MEMLIMIT: u64 = 256 << 20;

/// One import.
pub struct Request<'a> {
    pub source: Source<'a>,
    pub sha256: Option<Sha256Digest>,
    /// The private work directory (temporary files go here).
    pub work: &'a Path,
    /// The raw disk to create.
    pub disk: &'a Path,
    /// Largest download and largest disk accepted, in bytes.
    pub limit: u64,
    /// Show a progress bar (only where stderr is a terminal).
    pub progress: bool,
    /// Which addresses a URL may lead to.
    pub destinations: super::download::Destinations,
}

/// What was imported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Imported {
    /// The disk format found (inside xz when `xz`).
    pub format: SourceFormat,
    pub xz: bool,
    /// Size of the raw disk made, in bytes.
    pub size: u64,
}

impl Imported {
    /// `raw`, `qcow2`, `raw (xz)`, `qcow2 (xz)`.
    pub fn describe(&self) -> String {
        if self.xz {
            format!("{} (xz)", self.format.as_str())
        } else {
            self.format.as_str().to_string()
        }
    }
}

/// Makes `req.disk` from the source. On error, files in `req.work` may be
/// left for the caller to remove with the work directory.
pub fn import(req: &Request) -> Result<Imported, ImportError> {
    let result = match &req.source {
        Source::File { file, path } => from_file(req, file, path),
        Source::Url(url) => from_url(req, url),
    };
    let _ = std::fs::remove_file(req.work.join(TEMP_NAME));
    let imported = result?;
    finish_disk(req.disk)?;
    Ok(imported)
}

fn from_url(req: &Request, url: &str) -> Result<Imported, ImportError> {
    let dl = Download::open(url, req.limit, req.destinations)?;
    let bar = progress_bar(req.progress, dl.declared_len());
    let mut tap = Tap::new(dl, req.sha256.is_some(), bar);
    let r = ingest(req, &mut tap, url);
    tap.bar.finish_and_clear();
    let imported = r?;
    verify(req, tap, url)?;
    Ok(imported)
}

fn from_file(req: &Request, file: &File, path: &Path) -> Result<Imported, ImportError> {
    let name = path.display().to_string();
    let copy = req.work.join(TEMP_NAME);
    img::copy_from(file, &copy)?;
    // From here on only the private copy is read.
    let read_err = |source| ImportError::Read {
        source_name: name.clone(),
        source,
    };
    let len = std::fs::metadata(&copy).map_err(read_err)?.len();
    if len > req.limit {
        return Err(ImportError::TooLarge {
            source_name: name,
            limit: req.limit,
        });
    }
    if let Some(expected) = req.sha256 {
        let mut tap = Tap::new(File::open(&copy).map_err(read_err)?, true, hidden());
        io::copy(&mut tap, &mut io::sink()).map_err(read_err)?;
        check_digest(expected, tap.digest(), &name)?;
    }
    let mut head = Vec::with_capacity(format::HEADER_LEN);
    File::open(&copy)
        .and_then(|f| f.take(format::HEADER_LEN as u64).read_to_end(&mut head))
        .map_err(read_err)?;
    if !format::is_xz(&head) {
        let fmt = sniff(&head, &name)?;
        return match fmt {
            SourceFormat::Raw => {
                check_raw_size(len, &name, req.limit)?;
                std::fs::rename(&copy, req.disk).map_err(|source| ImageError::Io {
                    path: req.disk.to_path_buf(),
                    source,
                })?;
                Ok(Imported {
                    format: fmt,
                    xz: false,
                    size: len,
                })
            }
            SourceFormat::Qcow2 => {
                let size = check_qcow2_size(&head, &name, req.limit)?;
                convert_qcow2(&copy, &name, req.disk)?;
                Ok(Imported {
                    format: fmt,
                    xz: false,
                    size,
                })
            }
        };
    }
    // xz: unpack the private copy into the disk; the unpacked qcow2 goes to
    // a second temporary file, as from a URL.
    let mut input = File::open(&copy).map_err(read_err)?;
    let _ = std::fs::remove_file(&copy); // the open descriptor keeps it readable
    let mut tap = Tap::new(&mut input, false, hidden());
    let imported = ingest(req, &mut tap, &name)?;
    convert_temp(req, &name)?;
    Ok(imported)
}

/// Reads the stream: sniffs it (through xz if it is xz) and writes it out.
fn ingest<R: Read>(req: &Request, input: &mut Tap<R>, name: &str) -> Result<Imported, ImportError> {
    let head = read_head(input).map_err(|e| read_error(e, name))?;
    if head.is_empty() {
        return Err(ImportError::Empty {
            source_name: name.to_string(),
        });
    }
    if !format::is_xz(&head) {
        let fmt = sniff(&head, name)?;
        let size = place(req, fmt, &head, input, name, |e| read_error(e, name))?;
        return Ok(Imported {
            format: fmt,
            xz: false,
            size,
        });
    }
    let xz_err = |e: io::Error| match DownloadError::from_io(e) {
        Ok(d) => ImportError::Download(d),
        Err(source)
            if source
                .get_ref()
                .and_then(|i| i.downcast_ref::<liblzma::stream::Error>())
                .is_some_and(|i| matches!(i, liblzma::stream::Error::MemLimit)) =>
        {
            ImportError::XzMemory {
                source_name: name.to_string(),
            }
        }
        Err(source) => ImportError::Xz {
            source_name: name.to_string(),
            source,
        },
    };
    // Bounded memory: the stream's header chooses the dictionary size (up
    // to 4 GiB), which liblzma would otherwise allocate for whoever made it.
    let stream =
        liblzma::stream::Stream::new_stream_decoder(XZ_MEMLIMIT, liblzma::stream::CONCATENATED)
            .map_err(|e| ImportError::Xz {
                source_name: name.to_string(),
                source: e.into(),
            })?;
    let mut xz =
        liblzma::read::XzDecoder::new_stream(io::Cursor::new(head).chain(&mut *input), stream);
    let inner = read_head(&mut xz).map_err(xz_err)?;
    if inner.is_empty() {
        return Err(ImportError::Empty {
            source_name: name.to_string(),
        });
    }
    let fmt = sniff(&inner, name)?;
    let size = place(req, fmt, &inner, &mut xz, name, xz_err)?;
    drop(xz);
    // Whatever follows the xz stream is still hashed.
    io::copy(input, &mut io::sink()).map_err(|e| read_error(e, name))?;
    Ok(Imported {
        format: fmt,
        xz: true,
        size,
    })
}

/// Writes `head` and the rest of `rest` as the disk (raw) or as the
/// temporary file that is then converted (qcow2). Returns the disk size.
fn place(
    req: &Request,
    fmt: SourceFormat,
    head: &[u8],
    rest: &mut dyn Read,
    name: &str,
    err: impl Fn(io::Error) -> ImportError,
) -> Result<u64, ImportError> {
    let target = match fmt {
        SourceFormat::Raw => req.disk.to_path_buf(),
        SourceFormat::Qcow2 => {
            check_qcow2_size(head, name, req.limit)?;
            req.work.join(TEMP_NAME)
        }
    };
    let mut out = SparseWriter::create(&target, req.limit)?;
    let too_large = || ImportError::TooLarge {
        source_name: name.to_string(),
        limit: req.limit,
    };
    if !out.write(head) {
        return Err(too_large());
    }
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match rest.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(err(e)),
        };
        if !out.write(&buf[..n]) {
            return Err(too_large());
        }
        out.flush_err()?;
    }
    let len = out.finish()?;
    match fmt {
        SourceFormat::Raw => {
            check_raw_size(len, name, req.limit)?;
            Ok(len)
        }
        SourceFormat::Qcow2 => {
            let size = check_qcow2_size(head, name, req.limit)?;
            // Checksums are compared before qemu-img reads a byte.
            Ok(size)
        }
    }
}

fn sniff(head: &[u8], name: &str) -> Result<SourceFormat, ImportError> {
    format::sniff(head).map_err(|source| ImportError::Format {
        source_name: name.to_string(),
        source,
    })
}

fn check_raw_size(len: u64, name: &str, limit: u64) -> Result<(), ImportError> {
    if len == 0 {
        return Err(ImportError::Empty {
            source_name: name.to_string(),
        });
    }
    if len > limit {
        return Err(ImportError::TooLarge {
            source_name: name.to_string(),
            limit,
        });
    }
    if !len.is_multiple_of(format::SECTOR) {
        return Err(ImportError::NotSectors {
            source_name: name.to_string(),
            size: len,
        });
    }
    Ok(())
}

fn check_qcow2_size(head: &[u8], name: &str, limit: u64) -> Result<u64, ImportError> {
    let size = format::qcow2_virtual_size(head).unwrap_or(0);
    if size > limit {
        return Err(ImportError::TooLarge {
            source_name: name.to_string(),
            limit,
        });
    }
    Ok(size)
}

fn read_error(e: io::Error, name: &str) -> ImportError {
    match DownloadError::from_io(e) {
        Ok(d) => ImportError::Download(d),
        Err(source) => ImportError::Read {
            source_name: name.to_string(),
            source,
        },
    }
}

/// Up to [`format::HEADER_LEN`] bytes (fewer only at the end of the stream).
fn read_head(r: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(format::HEADER_LEN);
    r.take(format::HEADER_LEN as u64).read_to_end(&mut head)?;
    Ok(head)
}

fn check_digest(
    expected: Sha256Digest,
    actual: Sha256Digest,
    name: &str,
) -> Result<(), ImportError> {
    if expected == actual {
        Ok(())
    } else {
        Err(ImportError::Checksum {
            source_name: name.to_string(),
            expected,
            actual,
        })
    }
}

/// Compares the digest of everything read; then converts a qcow2.
fn verify<R: Read>(req: &Request, tap: Tap<R>, name: &str) -> Result<(), ImportError> {
    if let Some(expected) = req.sha256 {
        check_digest(expected, tap.digest(), name)?;
    }
    convert_temp(req, name)
}

/// A qcow2 written to the temporary file is converted into the disk.
fn convert_temp(req: &Request, name: &str) -> Result<(), ImportError> {
    let temp = req.work.join(TEMP_NAME);
    if temp.exists() {
        convert_qcow2(&temp, name, req.disk)?;
    }
    Ok(())
}

/// The disk is private and durable.
fn finish_disk(disk: &Path) -> Result<(), ImportError> {
    let io = |source| ImageError::Io {
        path: disk.to_path_buf(),
        source,
    };
    let f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(disk)
        .map_err(io)?;
    f.set_permissions(std::fs::Permissions::from_mode(PRIVATE_FILE))
        .map_err(io)?;
    f.sync_all().map_err(io)?;
    Ok(())
}

/// A reader that hashes (when asked) and reports progress.
struct Tap<R> {
    inner: R,
    hasher: Option<Sha256>,
    bar: indicatif::ProgressBar,
}

impl<R: Read> Tap<R> {
    fn new(inner: R, hash: bool, bar: indicatif::ProgressBar) -> Self {
        Self {
            inner,
            hasher: hash.then(Sha256::new),
            bar,
        }
    }

    fn digest(self) -> Sha256Digest {
        let h = self.hasher.unwrap_or_default().finalize();
        let mut out = [0u8; 32];
        out.copy_from_slice(&h);
        Sha256Digest(out)
    }
}

impl<R: Read> Read for Tap<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(h) = &mut self.hasher {
            h.update(&buf[..n]);
        }
        self.bar.inc(n as u64);
        Ok(n)
    }
}

fn hidden() -> indicatif::ProgressBar {
    indicatif::ProgressBar::hidden()
}

/// Size, speed and ETA on a terminal; nothing otherwise.
fn progress_bar(wanted: bool, len: Option<u64>) -> indicatif::ProgressBar {
    if !wanted || !io::stderr().is_terminal() {
        return hidden();
    }
    let bar = match len {
        Some(l) => indicatif::ProgressBar::new(l),
        None => indicatif::ProgressBar::no_length(),
    };
    let template = if len.is_some() {
        "Downloading {bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}"
    } else {
        "Downloading {bytes} {binary_bytes_per_sec}"
    };
    if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(250));
    bar
}

/// Writes a stream into a new private file, leaving holes where whole
/// 4 KiB blocks are zero.
struct SparseWriter {
    file: File,
    path: PathBuf,
    pos: u64,
    limit: u64,
    error: Option<io::Error>,
}

const BLOCK: usize = 4096;

fn is_zero(b: &[u8]) -> bool {
    let (pre, mid, post) = {
        // SAFETY: every bit pattern is a valid u128; align_to only splits
        // the slice at alignment boundaries.
        unsafe { b.align_to::<u128>() }
    };
    pre.iter().all(|&x| x == 0) && mid.iter().all(|&x| x == 0) && post.iter().all(|&x| x == 0)
}

impl SparseWriter {
    fn create(path: &Path, limit: u64) -> Result<Self, ImageError> {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(PRIVATE_FILE)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| ImageError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
            pos: 0,
            limit,
            error: None,
        })
    }

    /// Appends `data`; false when the limit is passed. A write error is
    /// kept for [`Self::flush_err`].
    fn write(&mut self, data: &[u8]) -> bool {
        if self.pos + data.len() as u64 > self.limit {
            return false;
        }
        // Blocks are aligned to the file offset. The file is new and
        // written in order, so skipping zeros anywhere is correct; whole
        // zero blocks become holes, runs of data are written in one call.
        let mut i = 0;
        let mut run: Option<usize> = None;
        while i < data.len() {
            let off = self.pos + i as u64;
            let step = (BLOCK - (off % BLOCK as u64) as usize).min(data.len() - i);
            let zero = is_zero(&data[i..i + step]);
            match (zero, run) {
                (true, Some(start)) => {
                    self.put(&data[start..i], self.pos + start as u64);
                    run = None;
                }
                (false, None) => run = Some(i),
                _ => {}
            }
            i += step;
        }
        if let Some(start) = run {
            self.put(&data[start..], self.pos + start as u64);
        }
        self.pos += data.len() as u64;
        true
    }

    fn put(&mut self, data: &[u8], off: u64) {
        if self.error.is_none()
            && let Err(e) = self.file.write_all_at(data, off)
        {
            self.error = Some(e);
        }
    }

    fn flush_err(&mut self) -> Result<(), ImageError> {
        match self.error.take() {
            Some(source) => Err(ImageError::Io {
                path: self.path.clone(),
                source,
            }),
            None => Ok(()),
        }
    }

    /// Sets the length (trailing holes), fsyncs; returns the length.
    fn finish(mut self) -> Result<u64, ImageError> {
        self.flush_err()?;
        let io = |source| ImageError::Io {
            path: self.path.clone(),
            source,
        };
        self.file.set_len(self.pos).map_err(io)?;
        self.file.sync_all().map_err(io)?;
        Ok(self.pos)
    }
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

/// Converts the checked private qcow2 `copy` to a sparse raw file at `dst`,
/// showing qemu-img's progress bar when stderr is a terminal.
fn convert_qcow2(copy: &Path, name: &str, dst: &Path) -> Result<(), ImageError> {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["convert", "-f", "qcow2", "-O", "raw"]);
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
            _ => ImageError::Io {
                path: copy.to_path_buf(),
                source: e,
            },
        })?;
    if !out.status.success() {
        return Err(ImageError::Convert {
            path: PathBuf::from(name),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn qemu_img_ok(args: &[&str]) {
        let out = Command::new("qemu-img").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn import_path(
        src: &Path,
        work: &Path,
        sha256: Option<Sha256Digest>,
    ) -> Result<Imported, ImportError> {
        let f = File::open(src).unwrap();
        import(&Request {
            source: Source::File {
                file: &f,
                path: src,
            },
            sha256,
            work,
            disk: &work.join("disk.img"),
            limit: 1 << 30,
            progress: false,
            destinations: Default::default(),
        })
    }

    fn sha(data: &[u8]) -> Sha256Digest {
        let mut out = [0u8; 32];
        out.copy_from_slice(&Sha256::digest(data));
        Sha256Digest(out)
    }

    fn xz(data: &[u8]) -> Vec<u8> {
        let mut e = liblzma::write::XzEncoder::new(Vec::new(), 1);
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// A disk-like image: data, a long run of zeros, data.
    fn raw_image() -> Vec<u8> {
        let mut d = vec![0u8; 8 << 20];
        d[..16].copy_from_slice(b"HELLO-FROM-RAW!!");
        d[(6 << 20) + 5] = 0x55;
        d
    }

    fn left_in(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
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
        let e = import_path(&d.join("backed.qcow2"), work.path(), None).unwrap_err();
        assert!(
            matches!(
                e,
                ImportError::Format {
                    source: FormatError::BackingFile,
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            left_in(work.path()).is_empty(),
            "{:?}",
            left_in(work.path())
        );

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
        let e = import_path(&d.join("ext.qcow2"), work.path(), None).unwrap_err();
        assert!(
            matches!(
                e,
                ImportError::Format {
                    source: FormatError::ExternalDataFile,
                    ..
                }
            ),
            "{e}"
        );

        // A vmdk: refused with advice to convert.
        qemu_img_ok(&["create", "-f", "vmdk", &p("a.vmdk"), "1M"]);
        let e = import_path(&d.join("a.vmdk"), work.path(), None).unwrap_err();
        assert!(
            crate::error_chain(&e).contains("convert it to qcow2 or raw"),
            "{e}"
        );

        // A plain qcow2 with data: converted to raw, private, data kept.
        std::fs::write(d.join("src.raw"), raw_image()).unwrap();
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
        let got = import_path(&d.join("ok.qcow2"), work.path(), None).unwrap();
        assert_eq!(
            (got.format, got.xz, got.size),
            (SourceFormat::Qcow2, false, 8 << 20)
        );
        let disk = work.path().join("disk.img");
        assert_eq!(std::fs::read(&disk).unwrap(), raw_image());
        assert_eq!(
            std::fs::metadata(&disk).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(left_in(work.path()), ["disk.img"]);

        // A raw image is its private copy.
        let work = tempfile::tempdir().unwrap();
        let got = import_path(&d.join("src.raw"), work.path(), None).unwrap();
        assert_eq!(got.format, SourceFormat::Raw);
        assert_eq!(
            std::fs::read(work.path().join("disk.img")).unwrap(),
            raw_image()
        );
    }

    #[test]
    fn an_xz_header_asking_for_a_huge_dictionary_is_refused() {
        // A valid xz stream whose LZMA2 filter then claims a 4 GiB
        // dictionary (props byte 40), block header CRC32 fixed: liblzma
        // would allocate that much for whoever wrote the header.
        let mut x = xz(&raw_image());
        let b = 12; // after the stream header
        let hsize = (usize::from(x[b]) + 1) * 4;
        let flags = x[b + 1];
        assert_eq!(flags & 0xc3, 0, "one filter, no sizes in the header");
        assert_eq!(&x[b + 2..b + 4], &[0x21, 0x01], "LZMA2, one props byte");
        x[b + 4] = 40;
        let crc = crc32(&x[b..b + hsize - 4]);
        x[b + hsize - 4..b + hsize].copy_from_slice(&crc.to_le_bytes());
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("bomb.xz"), &x).unwrap();
        let work = tempfile::tempdir().unwrap();
        let err = import_path(&dir.path().join("bomb.xz"), work.path(), None).unwrap_err();
        assert!(matches!(err, ImportError::XzMemory { .. }), "{err:?}");
        assert!(!work.path().join("disk.img").exists());
    }

    /// CRC-32 (IEEE), as xz block headers use.
    fn crc32(data: &[u8]) -> u32 {
        let mut c = !0u32;
        for &b in data {
            c ^= u32::from(b);
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0xedb8_8320
                } else {
                    c >> 1
                };
            }
        }
        !c
    }

    #[test]
    fn xz_raw_and_xz_qcow2_are_unpacked_by_content_not_name() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // Named .qcow2 but an xz stream of a raw disk: the content decides.
        std::fs::write(d.join("disk.qcow2"), xz(&raw_image())).unwrap();
        let work = tempfile::tempdir().unwrap();
        let got = import_path(&d.join("disk.qcow2"), work.path(), None).unwrap();
        assert_eq!(
            (got.format, got.xz, got.size),
            (SourceFormat::Raw, true, 8 << 20)
        );
        let disk = work.path().join("disk.img");
        assert_eq!(std::fs::read(&disk).unwrap(), raw_image());
        assert!(
            img::allocated(&disk).unwrap() < 1 << 20,
            "zeros become holes"
        );
        assert_eq!(left_in(work.path()), ["disk.img"]);

        // qcow2 inside xz: unpacked to a temporary file, converted, removed.
        std::fs::write(d.join("src.raw"), raw_image()).unwrap();
        let p = |n: &str| d.join(n).display().to_string();
        qemu_img_ok(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            &p("src.raw"),
            &p("q.qcow2"),
        ]);
        std::fs::write(
            d.join("q.xz"),
            xz(&std::fs::read(d.join("q.qcow2")).unwrap()),
        )
        .unwrap();
        let work = tempfile::tempdir().unwrap();
        let got = import_path(&d.join("q.xz"), work.path(), None).unwrap();
        assert_eq!((got.format, got.xz), (SourceFormat::Qcow2, true));
        assert_eq!(
            std::fs::read(work.path().join("disk.img")).unwrap(),
            raw_image()
        );
        assert_eq!(left_in(work.path()), ["disk.img"]);

        // A qcow2 with a backing file hidden inside xz is still refused.
        qemu_img_ok(&[
            "create",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            &p("src.raw"),
            &p("b.qcow2"),
        ]);
        std::fs::write(
            d.join("b.xz"),
            xz(&std::fs::read(d.join("b.qcow2")).unwrap()),
        )
        .unwrap();
        let work = tempfile::tempdir().unwrap();
        let e = import_path(&d.join("b.xz"), work.path(), None).unwrap_err();
        assert!(
            matches!(
                e,
                ImportError::Format {
                    source: FormatError::BackingFile,
                    ..
                }
            ),
            "{e}"
        );

        // A damaged xz stream: a clear error.
        let mut bad = xz(&raw_image());
        let n = bad.len();
        bad[n / 2] ^= 0xff;
        std::fs::write(d.join("bad.xz"), bad).unwrap();
        let work = tempfile::tempdir().unwrap();
        let e = import_path(&d.join("bad.xz"), work.path(), None).unwrap_err();
        assert!(matches!(e, ImportError::Xz { .. }), "{e}");
    }

    #[test]
    fn checksums_and_non_images_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let data = xz(&raw_image());
        std::fs::write(d.join("a.raw.xz"), &data).unwrap();
        let work = tempfile::tempdir().unwrap();
        import_path(&d.join("a.raw.xz"), work.path(), Some(sha(&data))).unwrap();
        let work = tempfile::tempdir().unwrap();
        let wrong = sha(b"something else");
        let e = import_path(&d.join("a.raw.xz"), work.path(), Some(wrong)).unwrap_err();
        match &e {
            ImportError::Checksum {
                expected, actual, ..
            } => {
                assert_eq!((*expected, *actual), (wrong, sha(&data)));
            }
            _ => panic!("{e}"),
        }
        assert!(!work.path().join("disk.img").exists());

        for (file, body) in [
            ("page.html", &b"<!DOCTYPE html><html>Not found</html>"[..]),
            ("notes.txt", &b"just some text\n"[..]),
            ("empty", &b""[..]),
        ] {
            std::fs::write(d.join(file), body).unwrap();
            let work = tempfile::tempdir().unwrap();
            let e = import_path(&d.join(file), work.path(), None).unwrap_err();
            assert!(
                matches!(
                    e,
                    ImportError::Format { .. }
                        | ImportError::NotSectors { .. }
                        | ImportError::Empty { .. }
                ),
                "{file}: {e}"
            );
        }
    }

    #[test]
    fn sparse_writer_leaves_holes_and_keeps_every_byte() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let mut w = SparseWriter::create(&path, 1 << 30).unwrap();
        let mut want = Vec::new();
        // Odd-sized pieces, so block boundaries fall inside writes.
        for i in 0..300u32 {
            let len = 1000 + (i as usize * 7919) % 70_000;
            let piece: Vec<u8> = if i % 3 == 0 {
                (0..len).map(|j| (j as u32 ^ i) as u8 | 1).collect()
            } else {
                vec![0; len]
            };
            assert!(w.write(&piece));
            want.extend_from_slice(&piece);
        }
        want.extend_from_slice(&[0u8; 10_000]);
        assert!(w.write(&[0u8; 10_000]));
        assert_eq!(w.finish().unwrap(), want.len() as u64);
        assert_eq!(std::fs::read(&path).unwrap(), want);
        assert!(img::allocated(&path).unwrap() < want.len() as u64 / 2);
        let mut small = SparseWriter::create(&dir.path().join("s"), 10).unwrap();
        assert!(!small.write(&[1u8; 11]), "the limit holds");
    }
}
