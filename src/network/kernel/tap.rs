//! Tap devices: opened through `/dev/net/tun` (IFF_TAP | IFF_NO_PI |
//! IFF_VNET_HDR, as cloud-hypervisor does) and never made persistent, so the
//! kernel removes a tap as soon as the last descriptor closes — a killed
//! supervisor and QEMU can never leave one behind. Bridged mode uses one too
//! (no macvtap any more: see [`crate::network::uplink`]).

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// `_IOW('T', 202, int)`
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// Why a tap could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("Cannot open /dev/net/tun: load the tun module (modprobe tun) and run lume as root")]
    Tun(#[source] io::Error),
    #[error("Cannot create tap device {name}")]
    Create {
        name: String,
        #[source]
        source: io::Error,
    },
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open tap; the device exists as long as this descriptor (or a copy
/// handed to QEMU) is open.
#[derive(Debug)]
pub struct Tap {
    pub name: String,
    pub fd: OwnedFd,
}

impl Tap {
    /// Creates tap `name` (at most 15 bytes) with a virtio-net header.
    pub fn create(name: &str) -> Result<Self, TapError> {
        Self::create_with(name, true)
    }

    /// Creates tap `name`; `vnet_hdr`: whether each frame written to it
    /// starts with a virtio-net header (checksum and segmentation offload).
    /// VMs always get one (under a network policy the device offers no
    /// transmit offload and the filter drops offloaded frames, see
    /// `policy::bpf`); the tests use taps without one as plain "wires".
    pub fn create_with(name: &str, vnet_hdr: bool) -> Result<Self, TapError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::Tun)?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | if vnet_hdr { IFF_VNET_HDR } else { 0 },
            _pad: [0; 22],
        };
        let bytes = name.as_bytes();
        let len = bytes.len().min(libc::IFNAMSIZ - 1);
        req.name[..len].copy_from_slice(&bytes[..len]);
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which IfReq
        // matches in size and layout (16-byte name, then the flags union);
        // `req` outlives the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
        if rc < 0 {
            return Err(TapError::Create {
                name: name.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(Self {
            name: name.to_string(),
            fd: file.into(),
        })
    }
}
