//! Disk image formats, decided once from a file's first bytes by our own
//! parser, never by qemu-img's or QEMU's probing (which follows whatever
//! backing or data file an image header names).
//!
//! qcow2 is accepted only without a backing file and without an external
//! data file; formats that can name other files (vmdk descriptors, vhdx,
//! vdi, qed, …) are refused by name; everything else is raw.

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
    // VirtualBox: the signature 0xbeda107f (little endian) at offset 0x40.
    if h.get(0x40..0x44) == Some(&[0x7f, 0x10, 0xda, 0xbe][..]) {
        return Some("vdi");
    }
    None
}

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
