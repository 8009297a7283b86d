//! `lume push`: a stopped VM's disk as lume's gzip chunks (chunks holding
//! only zeros are left out), the config blob and the manifest, under one or
//! more tags.

use std::fs::{self, File};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use futures_util::StreamExt;

use super::format::{self, Descriptor, Manifest};
use super::{ImageRef, RegistryError, io_at};
use crate::vm::caller::Caller;
use crate::vm::config::VmConfig;
use crate::vm::lock::VmLock;
use crate::vm::store::Vm;

/// lume's default chunk size.
pub const DEFAULT_CHUNK_MB: u64 = 512;

/// What `push` needs.
#[derive(Debug, Clone)]
pub struct PushSpec {
    pub image: ImageRef,
    /// Tags besides `image.tag`.
    pub additional_tags: Vec<String>,
    pub chunk_size_mb: u64,
    pub dry_run: bool,
    pub username: Option<String>,
    pub password: Option<String>,
    pub progress: bool,
    pub public_only: bool,
    /// Asked through the REST API: error hints name request fields.
    pub api: bool,
}

/// What a push did.
#[derive(Debug, Clone)]
pub struct Pushed {
    /// Every `REGISTRY/ORG/NAME:TAG` written (none on a dry run).
    pub references: Vec<String>,
    pub manifest_digest: String,
    /// Disk chunks in the manifest, and chunks left out as holes.
    pub parts: usize,
    pub holes: usize,
    /// Compressed bytes uploaded (blobs the registry had are not counted).
    pub uploaded: u64,
    /// The disk's size, and the compressed size of its parts.
    pub disk_size: u64,
    pub compressed: u64,
    pub dry_run: bool,
}

struct Chunk {
    number: usize,
    offset: u64,
    len: u64,
    path: PathBuf,
    digest: String,
    size: u64,
}

/// Pushes VM `vm` (its lock is taken for the whole push, so it cannot start
/// meanwhile). `scratch` is a private directory for compressed chunks.
/// `_note` takes lume's notes (a push has none now: its summary, dry runs
/// included, is the outcome's).
pub fn push(
    vm: &Vm,
    spec: &PushSpec,
    caller: &Caller,
    scratch: &Path,
    token_registry: &str,
    _note: &mut dyn FnMut(&str),
) -> Result<Pushed, RegistryError> {
    if !(1..=4096).contains(&spec.chunk_size_mb) {
        return Err(RegistryError::ChunkSize(spec.chunk_size_mb));
    }
    let name = vm.name.to_string();
    // The lock is held by a supervisor (running) or by another command
    // (busy): the run state, not the lock alone, tells which.
    let _lock = VmLock::try_acquire(&vm.lock_path())
        .map_err(io_at(&vm.lock_path()))?
        .ok_or_else(|| {
            if vm.is_running() {
                RegistryError::Running(name.clone())
            } else {
                RegistryError::Busy(name.clone())
            }
        })?;
    let cfg = vm.load_config().map_err(|e| RegistryError::Io {
        path: vm.config_path(),
        source: std::io::Error::other(e.to_string()),
    })?;
    if cfg.kernel_boot.is_some() {
        return Err(RegistryError::KernelBoot(name));
    }
    let mut tags = vec![spec.image.tag.clone()];
    for t in &spec.additional_tags {
        spec.image.with_tag(t)?;
        if !tags.contains(t) {
            tags.push(t.clone());
        }
    }
    if spec.public_only && !spec.dry_run {
        super::auth::check_public(&spec.image)?;
    }

    let disk_path = vm.disk_path();
    let disk = File::open(&disk_path).map_err(io_at(&disk_path))?;
    let size = disk.metadata().map_err(io_at(&disk_path))?.len();
    let chunk = spec.chunk_size_mb << 20;
    let count = size.div_ceil(chunk) as usize;

    let config = format::config_blob();
    let config_digest = format::digest_of(&config);
    let rt = super::runtime()?;
    let gate = super::auth::gate(spec.public_only && !spec.dry_run, &rt)?;
    let mut session = None;
    if !spec.dry_run {
        // Credentials and the config first: a refusal comes before any work.
        let creds = super::auth::credentials(
            &spec.image,
            spec.username.as_deref(),
            spec.password.as_deref(),
            caller,
            token_registry,
        )?;
        let door = |e: RegistryError| e.with_door(creds.hint, spec.api, spec.public_only);
        // Every request is lume's own (see `token` and `wire`).
        let s = rt
            .block_on(super::token::authorize(
                &spec.image,
                &creds.auth,
                true,
                gate.as_ref(),
            ))
            .map_err(door)?;
        rt.block_on(async {
            if !s.blob_exists(&spec.image, &config_digest).await? {
                let body = bytes::Bytes::from(config.clone());
                s.upload(
                    &spec.image,
                    &config_digest,
                    body.len() as u64,
                    futures_util::stream::once(async move { Ok(body) }),
                )
                .await?;
            }
            Ok::<(), RegistryError>(())
        })
        .map_err(door)?;
        session = Some(s);
    }
    let session = session.as_ref();
    // Progress in disk bytes: holes count at once, a chunk once uploaded.
    let bar = if spec.progress && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        let b = indicatif::ProgressBar::new(size);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "Pushing {bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
        ) {
            b.set_style(style);
        }
        b
    } else {
        indicatif::ProgressBar::hidden()
    };

    // Compression threads feed the uploads (two at a time) through a
    // bounded queue, so the scratch directory holds a few chunks at most.
    let next = AtomicUsize::new(0);
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Chunk>(2);
    let upload = |c: Chunk| {
        let bar = &bar;
        async move {
            let mut sent = 0;
            // No session: a dry run.
            if let Some(s) = session {
                s.keep_fresh().await?;
                if !s.blob_exists(&spec.image, &c.digest).await? {
                    // Streamed from the file: memory stays at one piece per
                    // upload.
                    let file = File::open(&c.path).map_err(io_at(&c.path))?;
                    s.upload(&spec.image, &c.digest, c.size, file_stream(file))
                        .await?;
                    sent = c.size;
                }
            }
            let _ = fs::remove_file(&c.path);
            bar.inc(c.len);
            Ok::<(Chunk, u64), RegistryError>((c, sent))
        }
    };
    let (mut chunks, uploaded) = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                let tx = tx.clone();
                let (next, disk, disk_path, bar) = (&next, &disk, &disk_path, &bar);
                s.spawn(move || -> Result<(), RegistryError> {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= count {
                            return Ok(());
                        }
                        let offset = i as u64 * chunk;
                        let len = chunk.min(size - offset);
                        match compress_chunk(disk, disk_path, i, offset, len, scratch)? {
                            // The uploads stopped (an error): so do we.
                            Some(c) => {
                                if tx.blocking_send(c).is_err() {
                                    return Ok(());
                                }
                            }
                            None => bar.inc(len),
                        }
                    }
                })
            })
            .collect();
        drop(tx);
        let uploads = rt.block_on(async {
            let mut inflight = futures_util::stream::FuturesUnordered::new();
            let mut done = Vec::new();
            let mut sent = 0;
            let mut open = true;
            loop {
                tokio::select! {
                    c = rx.recv(), if open && inflight.len() < 2 => match c {
                        Some(c) => inflight.push(upload(c)),
                        None => open = false,
                    },
                    Some(r) = inflight.next(), if !inflight.is_empty() => {
                        let (c, n) = r?;
                        sent += n;
                        done.push(c);
                    }
                    else => break,
                }
            }
            Ok::<_, RegistryError>((done, sent))
        });
        drop(rx);
        let compressed = handles
            .into_iter()
            .try_for_each(|h| h.join().expect("a compress thread panicked"));
        let uploads = uploads?;
        compressed.map(|()| uploads)
    })?;
    chunks.sort_by_key(|c| c.number);
    let holes = count - chunks.len();
    let manifest = manifest(&cfg, &config, &config_digest, &chunks, size);
    let manifest_bytes = serde_json::to_vec_pretty(&manifest).expect("a manifest serializes");
    let manifest_digest = format::digest_of(&manifest_bytes);
    let compressed = chunks
        .iter()
        .map(|c| c.size)
        .fold(0u64, u64::saturating_add);
    if spec.dry_run {
        // The summary is the outcome's (one line, on stdout).
        bar.finish_and_clear();
        return Ok(Pushed {
            references: Vec::new(),
            manifest_digest,
            parts: chunks.len(),
            holes,
            uploaded: 0,
            disk_size: size,
            compressed,
            dry_run: true,
        });
    }
    let session = session.expect("a session unless a dry run");
    rt.block_on(async {
        session.keep_fresh().await?;
        for tag in &tags {
            let r = spec.image.with_tag(tag)?;
            session
                .push_manifest(&r, manifest_bytes.clone(), format::MANIFEST_MEDIA_TYPE)
                .await?;
        }
        Ok::<(), RegistryError>(())
    })?;
    bar.finish_and_clear();
    Ok(Pushed {
        references: tags
            .iter()
            .map(|t| format!("{}/{}:{t}", spec.image.registry, spec.image.repository()))
            .collect(),
        manifest_digest,
        parts: chunks.len(),
        holes,
        uploaded,
        disk_size: size,
        compressed,
        dry_run: false,
    })
}

/// A file as a stream of 8 MiB pieces, for an upload's body.
fn file_stream(
    file: File,
) -> impl futures_util::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static {
    futures_util::stream::unfold(Some(file), |state| async move {
        let mut file = state?;
        let mut buf = vec![0u8; 8 << 20];
        let mut n = 0;
        while n < buf.len() {
            match std::io::Read::read(&mut file, &mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Some((Err(e), None)),
            }
        }
        if n == 0 {
            return None;
        }
        buf.truncate(n);
        Some((Ok(bytes::Bytes::from(buf)), Some(file)))
    })
}

/// Whether `[offset, offset+len)` of `f` has any data (SEEK_DATA); on a
/// filesystem without it, assume yes.
fn has_data(f: &File, offset: u64, len: u64) -> bool {
    // SAFETY: lseek on a descriptor we own; no memory is touched.
    let r = unsafe { libc::lseek(f.as_raw_fd(), offset as libc::off_t, libc::SEEK_DATA) };
    if r < 0 {
        return std::io::Error::last_os_error().raw_os_error() != Some(libc::ENXIO);
    }
    (r as u64) < offset + len
}

/// Gzips one chunk into `scratch`; `None` when it holds only zeros.
///
/// One gzip member (RFC 1952) around one deflate stream, assembled by
/// hand 1 MiB at a time: a block that looks incompressible (compressed
/// files, encrypted data) goes into stored blocks (a copy), anything else
/// through deflate level 1. Any gzip
/// reader, lume's and ours, reads the result; random data costs a copy
/// instead of a futile search for matches, on the push and on the pull.
fn compress_chunk(
    disk: &File,
    disk_path: &Path,
    number: usize,
    offset: u64,
    len: u64,
    scratch: &Path,
) -> Result<Option<Chunk>, RegistryError> {
    if !has_data(disk, offset, len) {
        return Ok(None);
    }
    let path = scratch.join(format!("part.{number}.gz"));
    let out = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(io_at(&path))?;
    let mut w = HashingWriter::new(std::io::BufWriter::with_capacity(1 << 20, out));
    let mut gz = GzipStream::new();
    let mut buf = vec![0u8; BLOCK];
    let mut pos = 0u64;
    let mut any = false;
    let result = (|| -> std::io::Result<()> {
        w.write_all(&GZIP_HEADER)?;
        while pos < len {
            let n = (len - pos).min(buf.len() as u64) as usize;
            // A block in a hole is not read, nor searched for matches.
            if !has_data(disk, offset + pos, n as u64) {
                gz.zeros(n, &mut w)?;
                pos += n as u64;
                continue;
            }
            disk.read_exact_at(&mut buf[..n], offset + pos)
                .map_err(|e| std::io::Error::new(e.kind(), ReadError(e)))?;
            if format::is_zero(&buf[..n]) {
                gz.zeros(n, &mut w)?;
            } else {
                any = true;
                gz.block(&buf[..n], &mut w)?;
            }
            pos += n as u64;
        }
        gz.finish(&mut w)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&path);
        return Err(
            match e.get_ref().and_then(|r| r.downcast_ref::<ReadError>()) {
                Some(_) => io_at(disk_path)(e),
                None => io_at(&path)(e),
            },
        );
    }
    if !any {
        let _ = fs::remove_file(&path);
        return Ok(None);
    }
    let (digest, size, mut inner) = w.finish();
    inner.flush().map_err(io_at(&path))?;
    Ok(Some(Chunk {
        number,
        offset,
        len,
        path,
        digest,
        size,
    }))
}

/// A read of the disk failed (told apart from a write of the part).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct ReadError(std::io::Error);

/// Input block: the unit of the level choice.
const BLOCK: usize = 1 << 20;

/// gzip header: deflate, no flags, no mtime, no extra flags, OS unknown.
const GZIP_HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];

/// The deflate stream, CRC and length of one gzip member.
struct GzipStream {
    z: flate2::Compress,
    crc: flate2::Crc,
    out: Vec<u8>,
}

impl GzipStream {
    fn new() -> Self {
        Self {
            z: flate2::Compress::new(flate2::Compression::new(1), false),
            crc: flate2::Crc::new(),
            out: vec![0u8; BLOCK + (64 << 10)],
        }
    }

    /// Compresses one block, or stores it when it looks incompressible.
    fn block(&mut self, data: &[u8], w: &mut impl Write) -> std::io::Result<()> {
        self.crc.update(data);
        if !looks_incompressible(data) {
            return self.run(data, flate2::FlushCompress::None, w);
        }
        // A full flush ends the compressor's output on a byte boundary and
        // forgets its history, so its later matches never reach back over
        // the stored blocks written here by hand (RFC 1951, 3.2.4).
        self.run(&[], flate2::FlushCompress::Full, w)?;
        for piece in data.chunks(0xffff) {
            let n = piece.len() as u16;
            let [a, b] = n.to_le_bytes();
            let [c, d] = (!n).to_le_bytes();
            // BFINAL 0, BTYPE 00 (stored), then LEN and NLEN.
            w.write_all(&[0, a, b, c, d])?;
            w.write_all(piece)?;
        }
        Ok(())
    }

    /// `n` zero bytes. A whole block of them is the same deflate every
    /// time: made once, then copied after a full flush (as a stored block
    /// is), so the gigabytes of zeros between a sparse disk's data cost a
    /// CRC and a few KiB each instead of a deflate pass. The pull inflates
    /// them like any other block.
    fn zeros(&mut self, n: usize, w: &mut impl Write) -> std::io::Result<()> {
        static ZEROS: [u8; BLOCK] = [0; BLOCK];
        static DEFLATED: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        self.crc.update(&ZEROS[..n]);
        if n != BLOCK {
            return self.run(&ZEROS[..n], flate2::FlushCompress::None, w);
        }
        let deflated = DEFLATED.get_or_init(|| {
            // A fresh compressor, ended by a full flush: non-final blocks
            // on a byte boundary, referring to nothing before them.
            let mut z = Self::new();
            let mut out = Vec::new();
            z.run(&ZEROS, flate2::FlushCompress::Full, &mut out)
                .expect("deflating into memory cannot fail");
            out
        });
        self.run(&[], flate2::FlushCompress::Full, w)?;
        w.write_all(deflated)
    }

    fn finish(mut self, w: &mut impl Write) -> std::io::Result<()> {
        self.run(&[], flate2::FlushCompress::Finish, w)?;
        w.write_all(&self.crc.sum().to_le_bytes())?;
        w.write_all(&self.crc.amount().to_le_bytes())
    }

    /// Feeds `data` (all of it) and writes what comes out; with a flush,
    /// until the compressor has nothing more to give.
    fn run(
        &mut self,
        mut data: &[u8],
        flush: flate2::FlushCompress,
        w: &mut impl Write,
    ) -> std::io::Result<()> {
        loop {
            let (in0, out0) = (self.z.total_in(), self.z.total_out());
            let status = self
                .z
                .compress(data, &mut self.out, flush)
                .map_err(std::io::Error::other)?;
            let used = (self.z.total_in() - in0) as usize;
            let made = (self.z.total_out() - out0) as usize;
            data = &data[used..];
            w.write_all(&self.out[..made])?;
            let done = match flush {
                flate2::FlushCompress::Finish => status == flate2::Status::StreamEnd,
                // Output space left over: everything pending came out.
                _ => data.is_empty() && made < self.out.len(),
            };
            if done {
                return Ok(());
            }
            if used == 0 && made == 0 {
                // Nothing more to give: fine unless the stream is unfinished.
                return match flush {
                    flate2::FlushCompress::Finish => Err(std::io::Error::other(
                        "the compressor stopped before the end",
                    )),
                    _ => Ok(()),
                };
            }
        }
    }
}

/// Whether `data` looks like random bytes, which deflate cannot shrink:
/// the byte histogram of a sample is nearly flat (entropy above 7.9 bits
/// per byte). Only the speed and the size depend on the answer.
fn looks_incompressible(data: &[u8]) -> bool {
    if data.len() < 64 << 10 {
        return false;
    }
    let mut counts = [0u32; 256];
    // Every 7th byte: 150,000 samples of a MiB, in every cache line.
    let mut n = 0u32;
    for &b in data.iter().step_by(7) {
        counts[b as usize] += 1;
        n += 1;
    }
    let n = f64::from(n);
    let entropy: f64 = counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum();
    entropy > 7.9
}

struct HashingWriter<W> {
    inner: W,
    hash: sha2::Sha256,
    written: u64,
}

impl<W: Write> HashingWriter<W> {
    fn new(inner: W) -> Self {
        Self {
            inner,
            hash: sha2::Digest::new(),
            written: 0,
        }
    }

    fn finish(self) -> (String, u64, W) {
        (
            format!("sha256:{}", format::hex(&sha2::Digest::finalize(self.hash))),
            self.written,
            self.inner,
        )
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        sha2::Digest::update(&mut self.hash, &buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// lume's chunked manifest (`createOCIManifest` with disk chunks), without
/// the nvram layer a Linux VM does not have.
fn manifest(
    cfg: &VmConfig,
    config: &[u8],
    config_digest: &str,
    chunks: &[Chunk],
    total: u64,
) -> Manifest {
    let s = |v: &dyn ToString| v.to_string();
    let layers = chunks
        .iter()
        .enumerate()
        .map(|(i, c)| Descriptor {
            media_type: format::DISK_MEDIA_TYPE.into(),
            digest: c.digest.clone(),
            size: c.size,
            annotations: Some(
                [
                    (format::TITLE, format!("disk.img.part.{}", i + 1)),
                    (format::UNCOMPRESSED_SIZE, s(&c.len)),
                    (format::PART_NUMBER, s(&(i + 1))),
                    (format::PART_TOTAL, s(&chunks.len())),
                    (format::PART_OFFSET, s(&c.offset)),
                    (format::CHUNK_SIZE, s(&c.len)),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            ),
        })
        .collect();
    let annotations = [
        (
            "org.trycua.lume.upload-time",
            crate::util::time::timestamp(),
        ),
        (format::TOTAL_SIZE, s(&total)),
        ("org.trycua.lume.os", "linux".to_string()),
        ("org.trycua.lume.cpu-count", s(&cfg.cpu_count)),
        ("org.trycua.lume.memory-size", s(&cfg.memory_size)),
        ("org.trycua.lume.disk-size", s(&total)),
        ("org.trycua.lume.display", cfg.display.clone()),
        ("org.trycua.lume.network-mode", cfg.network_mode.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    Manifest {
        schema_version: 2,
        media_type: Some(format::MANIFEST_MEDIA_TYPE.into()),
        config: Some(Descriptor {
            media_type: format::CONFIG_MEDIA_TYPE.into(),
            digest: config_digest.to_string(),
            size: config.len() as u64,
            annotations: Some(
                [(format::TITLE.to_string(), "config.json".to_string())]
                    .into_iter()
                    .collect(),
            ),
        }),
        layers,
        annotations: Some(annotations),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// Random-looking bytes (xorshift), without a crate for it.
    fn noise(n: usize, mut x: u64) -> Vec<u8> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn chunks_mixing_stored_and_compressed_blocks_are_plain_gzip() {
        let dir = tempfile::tempdir().unwrap();
        let disk_path = dir.path().join("disk");
        // Random, text, zeros, random, and a short text tail: the level
        // changes between blocks, both ways, and the last block is partial.
        let text: Vec<u8> = b"a line of text that repeats itself\n"
            .iter()
            .cycle()
            .take(BLOCK)
            .copied()
            .collect();
        // Zero blocks in holes (never read) and written out (read, then
        // found zero) come between them, after stored and deflated blocks.
        let zeros = |n| std::iter::repeat_n(0u8, n);
        let mut data = noise(BLOCK, 1);
        let hole1 = data.len()..data.len() + BLOCK;
        data.extend(zeros(BLOCK));
        data.extend_from_slice(&text);
        data.extend(zeros(BLOCK));
        let hole2 = data.len()..data.len() + 2 * BLOCK;
        data.extend(zeros(2 * BLOCK));
        data.extend(noise(BLOCK, 2));
        data.extend_from_slice(&text[..12345]);
        {
            let f = File::create(&disk_path).unwrap();
            let mut at = 0;
            for hole in [&hole1, &hole2] {
                f.write_all_at(&data[at..hole.start], at as u64).unwrap();
                at = hole.end;
            }
            f.write_all_at(&data[at..], at as u64).unwrap();
            f.sync_all().unwrap();
            for hole in [&hole1, &hole2] {
                assert!(!has_data(&f, hole.start as u64, hole.len() as u64));
            }
            assert!(has_data(&f, hole1.end as u64, BLOCK as u64));
        }
        let disk = File::open(&disk_path).unwrap();
        let scratch = dir.path().join("s");
        std::fs::create_dir(&scratch).unwrap();
        let c = compress_chunk(&disk, &disk_path, 0, 0, data.len() as u64, &scratch)
            .unwrap()
            .unwrap();
        let gz = std::fs::read(&c.path).unwrap();
        assert_eq!(c.size, gz.len() as u64);
        assert_eq!(c.digest, format::digest_of(&gz));
        // Random blocks are stored (a little over their size), text shrinks.
        assert!(
            gz.len() > 2 * BLOCK && gz.len() < 2 * BLOCK + BLOCK / 4,
            "{}",
            gz.len()
        );
        // A strict single-member reader checks the CRC and the length.
        let mut back = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut back)
            .unwrap();
        assert!(
            back == data,
            "the chunk does not decode to the disk's bytes"
        );
        // And our pull's decoder writes the same bytes.
        let out_path = dir.path().join("out");
        let out = File::create(&out_path).unwrap();
        let n =
            format::decode_part(format::Codec::Gzip, &gz[..], &out, 0, data.len() as u64).unwrap();
        assert_eq!(n, data.len() as u64);
        assert!(std::fs::read(&out_path).unwrap() == data);
    }

    #[test]
    fn incompressible_is_told_from_text_and_zeros() {
        assert!(looks_incompressible(&noise(BLOCK, 3)));
        assert!(!looks_incompressible(&vec![0u8; BLOCK]));
        let text: Vec<u8> = b"lorem ipsum dolor sit amet 0123456789\n"
            .iter()
            .cycle()
            .take(BLOCK)
            .copied()
            .collect();
        assert!(!looks_incompressible(&text));
    }
}
