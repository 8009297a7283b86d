//! Tap devices: opened through `/dev/net/tun` (IFF_TAP | IFF_NO_PI |
//! IFF_VNET_HDR, as cloud-hypervisor does) and never made persistent, so the
//! kernel removes a tap as soon as the last descriptor closes — a killed
//! supervisor and QEMU can never leave one behind. macvtap devices are opened
//! through a device node lume creates itself from the major:minor in sysfs,
//! because `/dev/tapN` lives in the shared devtmpfs and may belong to another
//! network namespace's macvtap of the same index.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

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
    #[error("Cannot find the character device of macvtap {name} in {path}")]
    MacvtapDev {
        name: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot open the macvtap device {name} through {path}")]
    MacvtapOpen {
        name: String,
        path: PathBuf,
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
    /// Creates tap `name` (at most 15 bytes).
    pub fn create(name: &str) -> Result<Self, TapError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::Tun)?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
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

/// Opens the character device of macvtap `name` (ifindex `index`). The node
/// is made by lume under a unique name in /dev (always a device-capable
/// filesystem) from the device number sysfs gives, and removed once open.
pub fn open_macvtap(name: &str, index: u32) -> Result<File, TapError> {
    let sys = PathBuf::from(format!("/sys/class/net/{name}/macvtap/tap{index}/dev"));
    let dev = std::fs::read_to_string(&sys).map_err(|source| TapError::MacvtapDev {
        name: name.to_string(),
        path: sys.clone(),
        source,
    })?;
    let (major, minor) = dev
        .trim()
        .split_once(':')
        .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)))
        .ok_or_else(|| TapError::MacvtapDev {
            name: name.to_string(),
            path: sys.clone(),
            source: io::Error::other(format!("unexpected content '{}'", dev.trim())),
        })?;
    let node = Path::new("/dev").join(format!("lume-{name}-{}", std::process::id()));
    let _ = std::fs::remove_file(&node);
    let open_err = |source| TapError::MacvtapOpen {
        name: name.to_string(),
        path: node.clone(),
        source,
    };
    nix::sys::stat::mknod(
        &node,
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
        nix::sys::stat::makedev(major, minor),
    )
    .map_err(|e| open_err(e.into()))?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(&node);
    let _ = std::fs::remove_file(&node);
    file.map_err(open_err)
}
