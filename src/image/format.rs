//! Disk image formats, decided once from a file's first bytes by our own
//! parser, never by qemu-img's or QEMU's probing (which follows whatever
//! backing or data file an image header names).
//!
//! qcow2 is accepted only without a backing file and without an external
//! data file; formats that can name other files (vmdk descriptors, vhdx,
//! vdi, qed, …) are refused by name, as are compressed files lume does not
//! unpack (gzip, zstd, bzip2, zip) and web pages (a wrong URL); an xz stream
//! is recognised by its magic ([`is_xz`]) and unpacked by the importer;
//! everything else is raw (the importer also requires whole sectors).

/// How many leading bytes [`sniff`] needs to recognise every format it knows.
pub const HEADER_LEN: usize = 4096;

/// The format of an image to import.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceFormat {
    Raw,
    Qcow2,
}

impl SourceFormat {
    /// qemu-img's name of the format.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Qcow2 => "qcow2",
        }
    }
}

/// Why an image header is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error(
        "The image is in {0} format, which lume does not import: convert it to qcow2 or raw first (qemu-img convert -O qcow2 …)"
    )]
    Unsupported(&'static str),
    #[error(
        "The qcow2 image has a backing file: lume imports only self-contained images; flatten it first (qemu-img convert -O qcow2 image.qcow2 flat.qcow2)"
    )]
    BackingFile,
    #[error(
        "The qcow2 image keeps its data in an external data file: lume imports only self-contained images; convert it first (qemu-img convert -O qcow2 image.qcow2 flat.qcow2)"
    )]
    ExternalDataFile,
    #[error(
        "The qcow2 header is damaged ({0}): repair the image with `qemu-img check -r all` or convert it to raw first"
    )]
    BadQcow2(&'static str),
}

const QCOW_MAGIC: &[u8; 4] = b"QFI\xfb";
/// qcow2 incompatible feature bit 2: the guest data lives in another file.
const QCOW2_INCOMPAT_DATA_FILE: u64 = 1 << 2;

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn be64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Formats recognised by their magic bytes and refused.
fn refused_format(h: &[u8]) -> Option<&'static str> {
    let starts = |m: &[u8]| h.starts_with(m);
    if starts(b"KDMV") || starts(b"COWD") || starts(b"# Disk DescriptorFile") {
        return Some("vmdk");
    }
    if starts(b"vhdxfile") {
        return Some("vhdx");
    }
    if starts(b"QED\0") {
        return Some("qed");
    }
    if starts(b"conectix") {
        return Some("vpc (vhd)");
    }
    if starts(b"WithoutFreeSpace") || starts(b"WithouFreSpacExt") {
        return Some("parallels");
    }
    if starts(b"Bochs Virtual HD Image") {
        return Some("bochs");
    }
    if starts(b"#!/bin/sh\n#V2.0 Format") {
        return Some("cloop");
    }
    if starts(b"LUKS\xba\xbe") {
        return Some("luks");
    }
    // Compressed files other than xz: lume does not unpack them.
    if starts(b"\x1f\x8b") {
        return Some("gzip (decompress it first: gunzip)");
    }
    if starts(b"\x28\xb5\x2f\xfd") {
        return Some("zstd (decompress it first: unzstd)");
    }
    if starts(b"BZh") && h.get(3).is_some_and(|c| (b'1'..=b'9').contains(c)) {
        return Some("bzip2 (decompress it first: bunzip2)");
    }
    if starts(b"PK\x03\x04") {
        return Some("zip (unpack it first)");
    }
    if looks_like_html(h) {
        return Some("HTML (a web page, not a disk image; check the URL)");
    }
    // VirtualBox: the signature 0xbeda107f (little endian) at offset 0x40.
    if h.get(0x40..0x44) == Some(&[0x7f, 0x10, 0xda, 0xbe][..]) {
        return Some("vdi");
    }
    None
}

/// Whether `h` starts like a web page (after optional whitespace): what a
/// wrong URL usually returns.
fn looks_like_html(h: &[u8]) -> bool {
    let start = h
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(h.len());
    let lower: Vec<u8> = h[start..]
        .iter()
        .take(15)
        .map(u8::to_ascii_lowercase)
        .collect();
    lower.starts_with(b"<!doctype html")
        || lower.starts_with(b"<html")
        || lower.starts_with(b"<?xml")
}

/// Magic of an xz stream.
const XZ_MAGIC: &[u8; 6] = b"\xfd7zXZ\0";

/// Whether the bytes start an xz stream (decided by content, never by name).
pub fn is_xz(header: &[u8]) -> bool {
    header.starts_with(XZ_MAGIC)
}

/// The virtual disk size a (checked) qcow2 header declares.
pub fn qcow2_virtual_size(header: &[u8]) -> Option<u64> {
    header.starts_with(QCOW_MAGIC).then(|| be64(header, 24))?
}

/// Sector size: a raw disk image is a whole number of sectors.
pub const SECTOR: u64 = 512;

/// Decides the format of an image from its first bytes (up to
/// [`HEADER_LEN`]; fewer when the file is shorter). Never panics.
pub fn sniff(header: &[u8]) -> Result<SourceFormat, FormatError> {
    if header.starts_with(QCOW_MAGIC) {
        return check_qcow2(header).map(|()| SourceFormat::Qcow2);
    }
    if let Some(name) = refused_format(header) {
        return Err(FormatError::Unsupported(name));
    }
    Ok(SourceFormat::Raw)
}

fn check_qcow2(h: &[u8]) -> Result<(), FormatError> {
    let version = be32(h, 4).ok_or(FormatError::BadQcow2("truncated header"))?;
    match version {
        1 => return Err(FormatError::Unsupported("qcow (version 1)")),
        2 | 3 => {}
        _ => return Err(FormatError::BadQcow2("unknown version")),
    }
    let backing_offset = be64(h, 8).ok_or(FormatError::BadQcow2("truncated header"))?;
    if backing_offset != 0 {
        return Err(FormatError::BackingFile);
    }
    if version == 3 {
        let header_length = be32(h, 100).ok_or(FormatError::BadQcow2("truncated header"))?;
        if header_length < 104 {
            return Err(FormatError::BadQcow2("header length below 104"));
        }
        let incompatible = be64(h, 72).ok_or(FormatError::BadQcow2("truncated header"))?;
        if incompatible & QCOW2_INCOMPAT_DATA_FILE != 0 {
            return Err(FormatError::ExternalDataFile);
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal qcow2 v3 header.
    pub(crate) fn qcow2_header(backing_offset: u64, incompatible: u64) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..4].copy_from_slice(QCOW_MAGIC);
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[8..16].copy_from_slice(&backing_offset.to_be_bytes());
        h[72..80].copy_from_slice(&incompatible.to_be_bytes());
        h[100..104].copy_from_slice(&104u32.to_be_bytes());
        h
    }

    #[test]
    fn recognises_raw_qcow2_and_refused_formats() {
        assert_eq!(sniff(b""), Ok(SourceFormat::Raw));
        assert_eq!(sniff(&[0u8; 4096]), Ok(SourceFormat::Raw));
        assert_eq!(sniff(&qcow2_header(0, 0)), Ok(SourceFormat::Qcow2));
        assert_eq!(sniff(&qcow2_header(512, 0)), Err(FormatError::BackingFile));
        assert_eq!(
            sniff(&qcow2_header(0, QCOW2_INCOMPAT_DATA_FILE)),
            Err(FormatError::ExternalDataFile)
        );
        assert_eq!(sniff(b"KDMV\x01"), Err(FormatError::Unsupported("vmdk")));
        assert_eq!(
            sniff(b"# Disk DescriptorFile\nRW 8 FLAT \"/etc/shadow\" 0\n"),
            Err(FormatError::Unsupported("vmdk"))
        );
        assert_eq!(sniff(b"vhdxfile"), Err(FormatError::Unsupported("vhdx")));
        assert_eq!(sniff(b"QED\0"), Err(FormatError::Unsupported("qed")));
        assert!(matches!(
            sniff(b"\n  <!DOCTYPE HTML><html>"),
            Err(FormatError::Unsupported(n)) if n.starts_with("HTML")
        ));
        assert!(
            matches!(sniff(b"\x1f\x8b\x08"), Err(FormatError::Unsupported(n)) if n.starts_with("gzip"))
        );
        assert!(is_xz(b"\xfd7zXZ\0\0\x04"));
        assert!(!is_xz(b"\xfd7zXZ"));
        let mut q = qcow2_header(0, 0);
        q[24..32].copy_from_slice(&(5u64 << 30).to_be_bytes());
        assert_eq!(qcow2_virtual_size(&q), Some(5 << 30));
        assert_eq!(qcow2_virtual_size(&[0u8; 64]), None);
        let mut vdi = vec![0u8; 0x80];
        vdi[0x40..0x44].copy_from_slice(&[0x7f, 0x10, 0xda, 0xbe]);
        assert_eq!(sniff(&vdi), Err(FormatError::Unsupported("vdi")));
        assert!(matches!(sniff(b"QFI\xfb"), Err(FormatError::BadQcow2(_))));
        let mut v2 = qcow2_header(0, 0);
        v2[4..8].copy_from_slice(&2u32.to_be_bytes());
        assert_eq!(sniff(&v2[..72]), Ok(SourceFormat::Qcow2));
    }

    #[test]
    fn every_prefix_and_random_mutation_of_a_header_is_answered_without_panic() {
        // Property: for any input, sniff returns (never panics), and a qcow2
        // magic is never answered Raw.
        let base = qcow2_header(0, 0);
        for len in QCOW_MAGIC.len()..=base.len() {
            let r = sniff(&base[..len]);
            assert_ne!(r, Ok(SourceFormat::Raw), "prefix {len}");
        }
        let mut buf = vec![0u8; 600];
        for round in 0..20_000u32 {
            let len = (crate::util::random::u64() % 600) as usize;
            crate::util::random::fill(&mut buf[..len]);
            if round % 2 == 0 && len >= 4 {
                buf[..4].copy_from_slice(QCOW_MAGIC);
            }
            let r = sniff(&buf[..len]);
            if buf[..len].starts_with(QCOW_MAGIC) {
                assert_ne!(r, Ok(SourceFormat::Raw));
            }
        }
    }
}
