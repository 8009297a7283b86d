//! USB mass storage (`run --usb-storage PATH`): a disk image on the VM's
//! xHCI controller. The image is opened with the caller's rights like every
//! other extra disk, and its format is decided by lume's own parser
//! ([`crate::image::format`]), never by QEMU. Only raw images are taken: a
//! qcow2 header can name a backing or data file, and the file's owner could
//! rewrite the header between lume's check and QEMU's open, making QEMU
//! (root) open a host file of their choosing.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::image::format::{self, FormatError, HEADER_LEN, SourceFormat};

/// Why an image cannot be attached as USB storage.
#[derive(Debug, thiserror::Error)]
pub enum UsbError {
    #[error(
        "USB storage image {0} is a qcow2 image: --usb-storage takes raw images only; convert it with `qemu-img convert -f qcow2 -O raw {0} {0}.raw` and attach that"
    )]
    Qcow2(PathBuf),
    #[error("USB storage image {path} cannot be attached")]
    Refused {
        path: PathBuf,
        #[source]
        source: FormatError,
    },
    #[error("Cannot read USB storage image {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Checks that the open image is raw (by its first bytes).
pub fn check_raw(path: &Path, file: &File) -> Result<(), UsbError> {
    let mut header = vec![0u8; HEADER_LEN];
    let mut n = 0;
    while n < header.len() {
        match file.read_at(&mut header[n..], n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(UsbError::Read {
                    path: path.to_path_buf(),
                    source,
                });
            }
        }
    }
    match format::sniff(&header[..n]) {
        Ok(SourceFormat::Raw) => Ok(()),
        Ok(SourceFormat::Qcow2) => Err(UsbError::Qcow2(path.to_path_buf())),
        Err(source) => Err(UsbError::Refused {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// QEMU arguments for the images (descriptor paths): one xHCI controller,
/// one `usb-storage` device per image, each drive `format=raw`.
pub fn arguments(images: &[PathBuf]) -> Vec<String> {
    if images.is_empty() {
        return Vec::new();
    }
    let mut a = vec!["-device".to_string(), "qemu-xhci,id=usbxhci".to_string()];
    for (i, p) in images.iter().enumerate() {
        a.extend([
            "-drive".into(),
            format!(
                "file={},format=raw,if=none,id=usbdisk{i}",
                p.display().to_string().replace(',', ",,")
            ),
            "-device".into(),
            format!("usb-storage,bus=usbxhci.0,drive=usbdisk{i},removable=on"),
        ]);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_raw_images_are_taken_and_every_drive_names_raw() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("u.img");
        std::fs::write(&raw, vec![0u8; 4096]).unwrap();
        check_raw(&raw, &File::open(&raw).unwrap()).unwrap();
        let q = dir.path().join("q.img");
        std::fs::write(&q, crate::image::format::tests::qcow2_header(0, 0)).unwrap();
        assert!(matches!(
            check_raw(&q, &File::open(&q).unwrap()),
            Err(UsbError::Qcow2(_))
        ));
        let args = arguments(&[PathBuf::from("/proc/1/fd/9")]).join(" ");
        assert!(args.contains("-device qemu-xhci,id=usbxhci"));
        assert!(args.contains("file=/proc/1/fd/9,format=raw,if=none,id=usbdisk0"));
        assert!(args.contains("usb-storage,bus=usbxhci.0,drive=usbdisk0"));
        assert!(arguments(&[]).is_empty());
    }
}
