//! lume's image format (upstream `ImageContainerRegistry.swift`).
//!
//! **Current format** (what `lume push` writes): manifest config
//! `application/vnd.trycua.lume.config.v1+json` (`{"os": "linux", ...}`),
//! the disk as `application/vnd.trycua.lume.disk.v1` layers, each a gzip
//! stream of one chunk of the raw disk with the annotations
//! `org.trycua.lume.part.{number,total,offset}`, `org.trycua.lume.chunk.size`
//! and `org.trycua.lume.content.uncompressed-{size,digest}`; manifest
//! annotations `org.trycua.lume.total-uncompressed-size`, `...cpu-count`,
//! `...memory-size`, `...disk-size`, `...network-mode`. lume pulls chunks at
//! their offsets into a file pre-sized to the total, so a chunk holding
//! only zeros is left out of the manifest altogether: holes are neither
//! uploaded nor written.
//!
//! **Legacy format** (pull only): the VM's config.json as the config
//! (`application/vnd.oci.image.config.v1+json`) and the disk as
//! `application/octet-stream+lz4` layers, in order, each Apple's LZ4 stream
//! (`COMPRESSION_LZ4`: `bv41` compressed and `bv4-` stored blocks, `bv4$`
//! at the end), total size in `org.trycua.lume.uncompressed-disk-size`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.trycua.lume.config.v1+json";
pub const DISK_MEDIA_TYPE: &str = "application/vnd.trycua.lume.disk.v1";
pub const NVRAM_MEDIA_TYPE: &str = "application/vnd.trycua.lume.nvram.v1";
pub const LEGACY_CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
pub const LEGACY_LZ4_MEDIA_TYPE: &str = "application/octet-stream+lz4";
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

pub const PART_NUMBER: &str = "org.trycua.lume.part.number";
pub const PART_TOTAL: &str = "org.trycua.lume.part.total";
pub const PART_OFFSET: &str = "org.trycua.lume.part.offset";
pub const CHUNK_SIZE: &str = "org.trycua.lume.chunk.size";
pub const UNCOMPRESSED_SIZE: &str = "org.trycua.lume.content.uncompressed-size";
pub const UNCOMPRESSED_DIGEST: &str = "org.trycua.lume.content.uncompressed-digest";
pub const TOTAL_SIZE: &str = "org.trycua.lume.total-uncompressed-size";
pub const LEGACY_TOTAL_SIZE: &str = "org.trycua.lume.uncompressed-disk-size";
pub const TITLE: &str = "org.opencontainers.image.title";

/// Writes of zeros this large (and aligned) are left as holes.
pub const HOLE_GRANULARITY: usize = 4096;

/// A blob named in a manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

impl Descriptor {
    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations.as_ref()?.get(key).map(String::as_str)
    }

    /// The lowercase hex of a `sha256:` digest; `None` for anything else
    /// (a digest is used as a file name, so nothing else may pass).
    pub fn sha256_hex(&self) -> Option<&str> {
        sha256_hex(&self.digest)
    }
}

/// The hex of a well-formed `sha256:<64 lowercase hex>` digest.
pub fn sha256_hex(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))).then_some(hex)
}

/// An image manifest as lume reads and writes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<Descriptor>,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

impl Manifest {
    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations.as_ref()?.get(key).map(String::as_str)
    }
}

/// How a disk part is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Gzip,
    AppleLz4,
}

/// One part of the disk: a blob and where its bytes go.
#[derive(Debug, Clone)]
pub struct DiskPart {
    pub blob: Descriptor,
    /// Where the part starts; `None`: right after the previous part (legacy).
    pub offset: Option<u64>,
    /// The most bytes the part may decode to.
    pub max_len: u64,
    pub codec: Codec,
}

/// Which of lume's formats a manifest is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Current,
    Legacy,
}

/// What `lume pull` does with a manifest.
#[derive(Debug, Clone)]
pub struct Plan {
    pub format: Format,
    pub config: Option<Descriptor>,
    pub parts: Vec<DiskPart>,
    /// The disk's size, when the manifest says it (legacy images may keep
    /// it in their config only).
    pub disk_size: Option<u64>,
}

/// Why a manifest is not one of lume's.
pub fn plan(m: &Manifest) -> Result<Plan, String> {
    if m.schema_version != 2 {
        return Err(format!("manifest schema version {}", m.schema_version));
    }
    let all = m.config.iter().chain(m.layers.iter());
    if let Some(bad) = all.clone().find(|d| d.sha256_hex().is_none()) {
        return Err(format!("blob digest '{}' is not sha256", bad.digest));
    }
    let current = m.layers.iter().any(|l| l.media_type == DISK_MEDIA_TYPE)
        || m.config
            .as_ref()
            .is_some_and(|c| c.media_type == CONFIG_MEDIA_TYPE);
    let parse = |s: Option<&str>, what: &str| -> Result<Option<u64>, String> {
        s.map(|v| {
            v.parse::<u64>()
                .map_err(|_| format!("{what} '{v}' is not a number"))
        })
        .transpose()
    };
    if current {
        let disks: Vec<&Descriptor> = m
            .layers
            .iter()
            .filter(|l| l.media_type == DISK_MEDIA_TYPE)
            .collect();
        let mut total = parse(m.annotation(TOTAL_SIZE), TOTAL_SIZE)?;
        if total.is_none() && disks.len() == 1 {
            total = parse(disks[0].annotation(UNCOMPRESSED_SIZE), UNCOMPRESSED_SIZE)?;
        }
        let mut parts = Vec::new();
        let mut sum = 0u64;
        for d in &disks {
            let offset = parse(d.annotation(PART_OFFSET), PART_OFFSET)?.unwrap_or(0);
            let len = parse(d.annotation(UNCOMPRESSED_SIZE), UNCOMPRESSED_SIZE)?;
            sum = sum.saturating_add(len.unwrap_or(0));
            parts.push((d, offset, len));
        }
        let total = match total {
            Some(t) => t,
            None if parts.iter().all(|p| p.2.is_some()) && !parts.is_empty() => sum,
            None => return Err("no disk size annotation".into()),
        };
        let parts = parts
            .into_iter()
            .map(|(d, offset, len)| {
                if offset > total {
                    return Err(format!(
                        "part at offset {offset} beyond the disk's {total} bytes"
                    ));
                }
                let room = total - offset;
                Ok(DiskPart {
                    blob: (*d).clone(),
                    offset: Some(offset),
                    max_len: len.map_or(room, |l| l.min(room)),
                    codec: Codec::Gzip,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        return Ok(Plan {
            format: Format::Current,
            config: m.config.clone(),
            parts,
            disk_size: Some(total),
        });
    }
    if m.layers.iter().any(|l| l.media_type.contains("+lzfse")) {
        return Err("Apple Archive (lzfse) parts, which only lume on macOS unpacks".into());
    }
    let parts: Vec<DiskPart> = m
        .layers
        .iter()
        .filter(|l| l.media_type == LEGACY_LZ4_MEDIA_TYPE)
        .map(|l| DiskPart {
            blob: l.clone(),
            offset: None,
            max_len: u64::MAX,
            codec: Codec::AppleLz4,
        })
        .collect();
    if parts.is_empty() {
        return Err("no lume disk layers".into());
    }
    let config = m.config.clone().or_else(|| {
        m.layers
            .iter()
            .find(|l| l.media_type == LEGACY_CONFIG_MEDIA_TYPE)
            .cloned()
    });
    Ok(Plan {
        format: Format::Legacy,
        config,
        parts,
        disk_size: parse(m.annotation(LEGACY_TOTAL_SIZE), LEGACY_TOTAL_SIZE)?,
    })
}

/// lume's config blob for a Linux VM (keys sorted, pretty, as lume writes).
pub fn config_blob() -> Vec<u8> {
    let v = serde_json::json!({
        "architecture": host_architecture(),
        "hardwareModel": "",
        "machineIdentifier": "",
        "mediatype": CONFIG_MEDIA_TYPE,
        "os": "linux",
        "storage": [{"file": "disk.img", "mediatype": DISK_MEDIA_TYPE}],
    });
    serde_json::to_vec_pretty(&v).expect("a JSON value serializes")
}

/// The host's CPU architecture in OCI's words (`amd64`, `arm64`, …), the
/// one lume's VMs run on. lume's config blob names it (upstream lume's
/// does not: an image without it is taken as the host's).
pub fn host_architecture() -> &'static str {
    oci_architecture(std::env::consts::ARCH)
}

/// Rust's name of an architecture in OCI's words.
pub fn oci_architecture(rust: &str) -> &str {
    match rust {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        "loongarch64" => "loong64",
        other => other,
    }
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `sha256:<hex>` of `data`.
pub fn digest_of(data: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(data)))
}

/// Reads through, hashing what passes.
pub struct HashingReader<R> {
    inner: R,
    hash: Sha256,
    read: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            hash: Sha256::new(),
            read: 0,
        }
    }

    /// Reads the rest, then the digest and the byte count.
    pub fn finish(mut self) -> io::Result<(String, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((format!("sha256:{}", hex(&self.hash.finalize())), self.read))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        self.read += n as u64;
        Ok(n)
    }
}

/// Whether `data` is all zeros: an OR over 4 KiB pieces, which the
/// compiler vectorizes (a byte-by-byte `any` with its early exit does not,
/// and runs several times slower over the gigabytes of zeros of a disk).
pub fn is_zero(data: &[u8]) -> bool {
    data.chunks(HOLE_GRANULARITY)
        .all(|piece| piece.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// Writes `data` at `offset`, skipping aligned all-zero blocks (the file
/// was created empty, so they stay holes).
pub fn write_sparse(file: &File, offset: u64, data: &[u8]) -> io::Result<()> {
    let mut i = 0;
    while i < data.len() {
        // Blocks are aligned to the file, not to the buffer.
        let pos = offset + i as u64;
        let block_end = ((pos / HOLE_GRANULARITY as u64 + 1) * HOLE_GRANULARITY as u64 - offset)
            .min(data.len() as u64) as usize;
        let block = &data[i..block_end];
        if !is_zero(block) {
            // Extend over following non-zero blocks: one write per run.
            let mut end = block_end;
            while end < data.len() {
                let next = (end + HOLE_GRANULARITY).min(data.len());
                if is_zero(&data[end..next]) {
                    break;
                }
                end = next;
            }
            file.write_all_at(&data[i..end], pos)?;
            i = end;
        } else {
            i = block_end;
        }
    }
    Ok(())
}

/// Why a part could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the part decodes to more than the {0} bytes it may hold")]
    TooLong(u64),
    #[error("the LZ4 stream is damaged: {0}")]
    Lz4(String),
    #[error("the gzip stream is damaged: {0}")]
    Gzip(&'static str),
}

/// Decodes one part from `input` into `out` at `offset`, sparsely; at most
/// `max_len` bytes. Returns the decoded length.
pub fn decode_part(
    codec: Codec,
    input: impl Read,
    out: &File,
    offset: u64,
    max_len: u64,
) -> Result<u64, DecodeError> {
    let mut sink = PartSink {
        out,
        offset,
        written: 0,
        max_len,
    };
    match codec {
        Codec::Gzip => decode_gzip(io::BufReader::with_capacity(1 << 20, input), &mut sink)?,
        Codec::AppleLz4 => {
            decode_apple_lz4(io::BufReader::with_capacity(1 << 20, input), &mut sink)?
        }
    }
    Ok(sink.written)
}

/// Inflates the gzip members (RFC 1952) of `input` one after the other
/// into `sink`, in whole 1 MiB buffers so zero blocks line up.
///
/// Each member's CRC-32 is not computed: the blob's SHA-256 was (or is
/// being) checked over these very bytes, which settles their integrity,
/// and a CRC over the gigabytes of zeros of a sparse disk cost a pull a
/// fifth of its CPU. The member's length (ISIZE) is still checked.
fn decode_gzip(mut input: impl io::BufRead, sink: &mut PartSink<'_>) -> Result<(), DecodeError> {
    use io::BufRead as _;
    const FHCRC: u8 = 2;
    const FEXTRA: u8 = 4;
    const FNAME: u8 = 8;
    const FCOMMENT: u8 = 16;
    let mut buf = vec![0u8; 1 << 20];
    let mut filled = 0;
    let mut z = flate2::Decompress::new(false);
    let mut members = 0u64;
    loop {
        // Another member, or the end (after at least one).
        if members > 0 && input.fill_buf()?.is_empty() {
            break;
        }
        let mut head = [0u8; 10];
        input.read_exact(&mut head)?;
        if head[..3] != [0x1f, 0x8b, 8] {
            return Err(DecodeError::Gzip("not a gzip (deflate) member"));
        }
        let flags = head[3];
        if flags & 0xe0 != 0 {
            return Err(DecodeError::Gzip("reserved header flags are set"));
        }
        if flags & FEXTRA != 0 {
            let mut len = [0u8; 2];
            input.read_exact(&mut len)?;
            io::copy(
                &mut (&mut input).take(u16::from_le_bytes(len).into()),
                &mut io::sink(),
            )?;
        }
        for flag in [FNAME, FCOMMENT] {
            if flags & flag != 0 {
                // A zero-terminated string, at most 64 KiB.
                let mut skipped = Vec::new();
                (&mut input).take(64 << 10).read_until(0, &mut skipped)?;
                if skipped.last() != Some(&0) {
                    return Err(DecodeError::Gzip("a header string does not end"));
                }
            }
        }
        if flags & FHCRC != 0 {
            input.read_exact(&mut [0u8; 2])?;
        }
        z.reset(false);
        loop {
            let data = input.fill_buf()?;
            if data.is_empty() {
                return Err(DecodeError::Gzip("the stream ends inside a member"));
            }
            let (in0, out0) = (z.total_in(), z.total_out());
            let status = z
                .decompress(data, &mut buf[filled..], flate2::FlushDecompress::None)
                .map_err(|_| DecodeError::Gzip("corrupt deflate data"))?;
            let used = (z.total_in() - in0) as usize;
            let made = (z.total_out() - out0) as usize;
            input.consume(used);
            filled += made;
            if filled == buf.len() {
                sink.put(&buf)?;
                filled = 0;
            }
            if status == flate2::Status::StreamEnd {
                break;
            }
            if used == 0 && made == 0 && filled < buf.len() {
                return Err(DecodeError::Gzip("corrupt deflate data"));
            }
        }
        let mut trailer = [0u8; 8];
        input.read_exact(&mut trailer)?;
        let isize = u32::from_le_bytes([trailer[4], trailer[5], trailer[6], trailer[7]]);
        if isize != z.total_out() as u32 {
            return Err(DecodeError::Gzip(
                "a member's length does not match its data",
            ));
        }
        members += 1;
    }
    if filled > 0 {
        sink.put(&buf[..filled])?;
    }
    Ok(())
}

struct PartSink<'a> {
    out: &'a File,
    offset: u64,
    written: u64,
    max_len: u64,
}

impl PartSink<'_> {
    fn put(&mut self, data: &[u8]) -> Result<(), DecodeError> {
        if self.written + data.len() as u64 > self.max_len {
            return Err(DecodeError::TooLong(self.max_len));
        }
        write_sparse(self.out, self.offset + self.written, data)?;
        self.written += data.len() as u64;
        Ok(())
    }
}

/// The largest block Apple's LZ4 stream may announce (its encoder uses 64 KiB).
const MAX_LZ4_BLOCK: usize = 4 << 20;
const LZ4_WINDOW: usize = 64 << 10;

fn decode_apple_lz4(mut r: impl Read, sink: &mut PartSink) -> Result<(), DecodeError> {
    let mut window: Vec<u8> = Vec::new();
    let mut encoded = Vec::new();
    loop {
        let mut magic = [0u8; 4];
        match read_full(&mut r, &mut magic)? {
            0 => return Ok(()),
            4 => {}
            _ => return Err(DecodeError::Lz4("truncated block header".into())),
        }
        let mut word = || -> Result<usize, DecodeError> {
            let mut b = [0u8; 4];
            if read_full(&mut r, &mut b)? != 4 {
                return Err(DecodeError::Lz4("truncated block header".into()));
            }
            Ok(u32::from_le_bytes(b) as usize)
        };
        let decoded = match &magic {
            b"bv4$" => continue,
            b"bv41" => {
                let (dlen, elen) = (word()?, word()?);
                if dlen > MAX_LZ4_BLOCK || elen > MAX_LZ4_BLOCK {
                    return Err(DecodeError::Lz4(format!("block of {dlen} bytes")));
                }
                encoded.resize(elen, 0);
                if read_full(&mut r, &mut encoded)? != elen {
                    return Err(DecodeError::Lz4("truncated block".into()));
                }
                let out = lz4_flex::block::decompress_with_dict(&encoded, dlen, &window)
                    .map_err(|e| DecodeError::Lz4(e.to_string()))?;
                if out.len() != dlen {
                    return Err(DecodeError::Lz4("block size mismatch".into()));
                }
                out
            }
            b"bv4-" => {
                let len = word()?;
                if len > MAX_LZ4_BLOCK {
                    return Err(DecodeError::Lz4(format!("block of {len} bytes")));
                }
                let mut out = vec![0u8; len];
                if read_full(&mut r, &mut out)? != len {
                    return Err(DecodeError::Lz4("truncated block".into()));
                }
                out
            }
            _ => return Err(DecodeError::Lz4("unknown block magic".into())),
        };
        sink.put(&decoded)?;
        // The next block may refer back up to 64 KiB.
        window.extend_from_slice(&decoded);
        if window.len() > LZ4_WINDOW {
            window.drain(..window.len() - LZ4_WINDOW);
        }
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Encodes `data` as Apple's LZ4 stream (64 KiB independent blocks), as
/// lume's legacy push did. For tests and tools.
pub fn encode_apple_lz4(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for block in data.chunks(64 << 10) {
        let c = lz4_flex::block::compress(block);
        out.extend_from_slice(b"bv41");
        out.extend_from_slice(&(block.len() as u32).to_le_bytes());
        out.extend_from_slice(&(c.len() as u32).to_le_bytes());
        out.extend_from_slice(&c);
    }
    out.extend_from_slice(b"bv4$");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// Two gzip members, the first with every optional header field (as
    /// other tools write them), the second plain: decoded back to back,
    /// sparsely; a truncated, a lengthened or a damaged stream is refused.
    #[test]
    fn gzip_members_with_header_fields_and_damage() {
        use std::io::Write;
        let mut a = vec![0u8; 3 << 20];
        a[5..10].copy_from_slice(b"first");
        let b: Vec<u8> = b"second member "
            .iter()
            .cycle()
            .take(1_500_000)
            .copied()
            .collect();
        let mut gz = Vec::new();
        let mut e = flate2::GzBuilder::new()
            .filename("disk.img")
            .comment("a comment")
            .extra(vec![1, 2, 3])
            .operating_system(3)
            .write(&mut gz, flate2::Compression::fast());
        e.write_all(&a).unwrap();
        e.finish().unwrap();
        // FHCRC: flate2 does not write it; set the flag and add 2 bytes.
        let with_fhcrc = {
            let mut g = gz.clone();
            g[3] |= 2;
            let end = 10 + 2 + 3 + "disk.img".len() + 1 + "a comment".len() + 1;
            g.splice(end..end, [0xaa, 0xbb]);
            g
        };
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&b).unwrap();
        let second = e.finish().unwrap();
        let mut want = a.clone();
        want.extend_from_slice(&b);
        let dir = tempfile::tempdir().unwrap();
        let decode = |stream: &[u8]| {
            let path = dir.path().join("out");
            let _ = std::fs::remove_file(&path);
            let out = File::create(&path).unwrap();
            let r = decode_part(Codec::Gzip, stream, &out, 4096, 16 << 20);
            (
                r,
                std::fs::read(&path).unwrap(),
                out.metadata().unwrap().blocks(),
            )
        };
        for first in [&gz, &with_fhcrc] {
            let mut stream = first.clone();
            stream.extend_from_slice(&second);
            let (r, bytes, blocks) = decode(&stream);
            assert_eq!(r.unwrap(), want.len() as u64);
            assert!(bytes[4096..] == want[..], "decoded bytes differ");
            assert!(
                blocks * 512 < 2 << 20,
                "zeros were written: {blocks} blocks"
            );
        }
        let mut whole = gz.clone();
        whole.extend_from_slice(&second);
        // Cut inside the second member, inside its trailer, in the header.
        for cut in [whole.len() - 1000, whole.len() - 3, gz.len() + 5] {
            assert!(decode(&whole[..cut]).0.is_err(), "cut at {cut} accepted");
        }
        // A wrong length in the trailer; a damaged deflate block; garbage.
        let mut bad_len = whole.clone();
        let n = bad_len.len();
        bad_len[n - 1] ^= 1;
        assert!(matches!(decode(&bad_len).0, Err(DecodeError::Gzip(_))));
        let mut bad_data = whole.clone();
        for b in &mut bad_data[gz.len() + 10..gz.len() + 40] {
            *b = 0xff;
        }
        assert!(decode(&bad_data).0.is_err());
        assert!(matches!(
            decode(b"not gzip at all").0,
            Err(DecodeError::Gzip(_))
        ));
        // More than the part may hold.
        let path = dir.path().join("small");
        let out = File::create(&path).unwrap();
        assert!(matches!(
            decode_part(Codec::Gzip, &whole[..], &out, 0, 1 << 20),
            Err(DecodeError::TooLong(_))
        ));
    }

    #[test]
    fn digests_must_be_sha256_hex() {
        assert!(sha256_hex(&digest_of(b"x")).is_some());
        for d in ["sha256:../../etc/passwd", "sha512:00", "sha256:ABC", ""] {
            assert!(sha256_hex(d).is_none(), "{d}");
        }
        let m: Manifest = serde_json::from_value(serde_json::json!({
            "schemaVersion": 2,
            "layers": [{"mediaType": DISK_MEDIA_TYPE, "digest": "sha256:../../x", "size": 1}]
        }))
        .unwrap();
        assert!(plan(&m).unwrap_err().contains("not sha256"));
    }

    /// A manifest as lume on macOS pushes it: an nvram layer, every chunk
    /// listed (zero chunks sharing one blob), a total size annotation.
    #[test]
    fn plans_lumes_chunked_manifest() {
        let zero = digest_of(b"zero");
        let data = digest_of(b"data");
        let layer = |d: &str, n: u64| {
            serde_json::json!({"mediaType": DISK_MEDIA_TYPE, "digest": d, "size": 10,
                "annotations": {PART_NUMBER: (n + 1).to_string(), PART_OFFSET: (n * 100).to_string(),
                    UNCOMPRESSED_SIZE: "100"}})
        };
        let m: Manifest = serde_json::from_value(serde_json::json!({
            "schemaVersion": 2,
            "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": digest_of(b"c"), "size": 1},
            "layers": [
                {"mediaType": NVRAM_MEDIA_TYPE, "digest": digest_of(b"n"), "size": 1},
                layer(&zero, 0), layer(&data, 1), layer(&zero, 2)
            ],
            "annotations": {TOTAL_SIZE: "300"}
        }))
        .unwrap();
        let p = plan(&m).unwrap();
        assert_eq!(p.format, Format::Current);
        assert_eq!(p.disk_size, Some(300));
        let offsets: Vec<_> = p.parts.iter().map(|x| (x.offset, x.max_len)).collect();
        assert_eq!(
            offsets,
            [(Some(0), 100), (Some(100), 100), (Some(200), 100)]
        );
        // A part placed beyond the disk is refused.
        let mut bad = m.clone();
        bad.annotations = Some([(TOTAL_SIZE.to_string(), "150".to_string())].into());
        assert!(plan(&bad).unwrap_err().contains("beyond"));
        // Legacy lzfse images are named, not misread.
        let lzfse: Manifest = serde_json::from_value(serde_json::json!({"schemaVersion": 2,
            "layers": [{"mediaType": "application/octet-stream+lzfse;part.number=1;part.total=2",
                "digest": digest_of(b"x"), "size": 1}]}))
        .unwrap();
        assert!(plan(&lzfse).unwrap_err().contains("lzfse"));
    }

    #[test]
    fn sparse_writes_leave_holes_and_apple_lz4_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d");
        let f = File::create(&path).unwrap();
        f.set_len(8 << 20).unwrap();
        let mut data = vec![0u8; 4 << 20];
        data[100] = 1;
        data[(3 << 20) + 5] = 2;
        let enc = encode_apple_lz4(&data);
        let n = decode_part(Codec::AppleLz4, &enc[..], &f, 1 << 20, u64::MAX).unwrap();
        assert_eq!(n, 4 << 20);
        let back = std::fs::read(&path).unwrap();
        assert_eq!(&back[1 << 20..5 << 20], &data[..]);
        assert!(f.metadata().unwrap().blocks() * 512 <= 64 << 10);
        // A part longer than it may be is refused.
        assert!(matches!(
            decode_part(Codec::AppleLz4, &enc[..], &f, 0, 1 << 20),
            Err(DecodeError::TooLong(_))
        ));
    }
}
