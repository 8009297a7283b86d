//! The QEMU command line for one run of a VM. Files are named by absolute
//! paths inside the VM directory (so the command line names the directory);
//! only the QMP socket is relative, because QEMU runs with the VM directory as
//! its working directory and a Unix socket path is limited to 108 bytes.
//!
//! Every disk is given with `format=raw`: QEMU never probes a format, so a
//! guest that writes a qcow2 header into its disk cannot make QEMU open a
//! host file as backing or data file. ISOs and extra disks are named by
//! descriptors the supervisor already holds (`/proc/<pid>/fd/N`), opened with
//! the caller's rights; the serial console goes to a pipe the supervisor reads.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use super::accel::Accel;
use super::qmp::{EVENTS_SOCKET, QMP_SOCKET};
use crate::guest::agent::{QGA_PORT_ID, QGA_PORT_NAME, QGA_SOCKET};
use crate::vm::config::VmConfig;

/// The QEMU binary lume drives.
pub const QEMU_BINARY: &str = "qemu-system-x86_64";

/// Why QEMU cannot be started.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error(
        "{QEMU_BINARY} was not found in PATH: install the qemu-system-x86 package (apt-get install qemu-system-x86)"
    )]
    Missing,
    #[error("{what} {path} does not exist or is not a regular file: restore it or recreate the VM")]
    MissingFile { what: &'static str, path: PathBuf },
}

/// Finds QEMU in PATH.
pub fn find_qemu() -> Result<PathBuf, QemuError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(QEMU_BINARY))
        .find(|p| p.is_file())
        .ok_or(QemuError::Missing)
}

/// Everything one run needs beyond the saved config.
#[derive(Debug, Clone)]
pub struct LaunchSpec<'a> {
    pub name: &'a str,
    pub dir: &'a Path,
    pub config: &'a VmConfig,
    pub accel: Accel,
    /// ISO images attached read-only as CD-ROMs (descriptor paths).
    pub mounts: &'a [PathBuf],
    /// Extra raw disks (descriptor paths).
    pub disks: &'a [PathBuf],
    /// Where QEMU writes the serial console (the write end of a pipe).
    pub console: &'a Path,
    /// Network arguments from the network mode.
    pub net_args: &'a [String],
    /// The main disk: `-blockdev` nodes pinned by lume and its `-device`
    /// ([`crate::vm::snapshot::prepare_run`]).
    pub disk_args: &'a [String],
    /// Raw images attached as USB mass storage (descriptor paths).
    pub usb_storage: &'a [PathBuf],
    /// Shared directories (virtio-fs; their virtiofsd listen on `fsN.sock`).
    pub shares: &'a [super::virtiofs::ShareState],
}

/// A regular file itself, not a symlink to one.
fn is_regular(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_file())
}

/// Escapes a path for a QEMU option value (commas are doubled).
fn opt_path(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

/// The display device: a standard VGA adapter (every guest kernel and
/// firmware can draw on it) announcing the VM's `display` size (WIDTHxHEIGHT)
/// as its preferred mode.
fn vga_device(display: &str) -> String {
    match display
        .split_once('x')
        .map(|(w, h)| (w.parse::<u32>(), h.parse::<u32>()))
    {
        Some((Ok(w), Ok(h))) => format!("VGA,xres={w},yres={h}"),
        _ => "VGA".into(),
    }
}

/// Builds the argument list (without the binary).
pub fn arguments(spec: &LaunchSpec<'_>) -> Result<Vec<OsString>, QemuError> {
    let c = spec.config;
    let dir = spec.dir;
    let mut a: Vec<String> = vec![
        "-name".into(),
        format!("guest=lume:{},debug-threads=on", spec.name),
        "-machine".into(),
        "q35".into(),
        "-accel".into(),
        spec.accel.to_string(),
        "-cpu".into(),
        match spec.accel {
            Accel::Kvm => "host".into(),
            Accel::Tcg => "max".into(),
        },
        "-smp".into(),
        c.cpu_count.to_string(),
        "-m".into(),
        format!("{}M", (c.memory_size >> 20).max(16)),
        "-nodefaults".into(),
        "-no-user-config".into(),
        // Paused until the supervisor lets the guest run (QMP `cont`), once
        // the network the guest's first frame meets is set up: lume's work
        // after QEMU's start overlaps QEMU's own.
        "-S".into(),
        // QEMU's seccomp filter: a guest that takes QEMU over still cannot
        // run programs, gain privileges or change resource limits.
        "-sandbox".into(),
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny".into(),
        // No window on the host; the screen is QEMU's VNC server on a Unix
        // socket in the VM directory, which the supervisor forwards to a
        // loopback port (see vnc.rs). Its password is set through QMP.
        "-display".into(),
        "none".into(),
        "-vnc".into(),
        format!("unix:{},password=on", super::vnc::VNC_SOCKET),
        "-device".into(),
        vga_device(&c.display),
        "-chardev".into(),
        format!("file,id=serial0,path={}", opt_path(spec.console)),
        "-serial".into(),
        "chardev:serial0".into(),
        "-qmp".into(),
        format!("unix:{QMP_SOCKET},server=on,wait=off"),
        "-qmp".into(),
        format!("unix:{EVENTS_SOCKET},server=on,wait=off"),
        "-device".into(),
        "virtio-rng-pci".into(),
        // The QEMU guest agent's channel: lume asks an agent in the guest
        // (qemu-guest-agent) to power off or reboot before anything else.
        "-chardev".into(),
        format!("socket,id=qga0,path={QGA_SOCKET},server=on,wait=off"),
        "-device".into(),
        "virtio-serial-pci,id=vser0".into(),
        "-device".into(),
        format!("virtserialport,bus=vser0.0,chardev=qga0,id={QGA_PORT_ID},name={QGA_PORT_NAME}"),
        // Memory the guest frees goes back to the host (free page reporting).
        "-device".into(),
        "virtio-balloon-pci,id=balloon0,free-page-reporting=on".into(),
    ];
    if let Some(k) = &c.kernel_boot {
        let kernel = dir.join(&k.kernel);
        if !is_regular(&kernel) {
            return Err(QemuError::MissingFile {
                what: "Kernel",
                path: kernel,
            });
        }
        a.extend(["-kernel".into(), kernel.display().to_string()]);
        if let Some(i) = &k.initrd {
            let initrd = dir.join(i);
            if !is_regular(&initrd) {
                return Err(QemuError::MissingFile {
                    what: "Initrd",
                    path: initrd,
                });
            }
            a.extend(["-initrd".into(), initrd.display().to_string()]);
        }
        a.extend(["-append".into(), k.cmdline.clone()]);
    }
    // The cloud-init NoCloud seed lume wrote (read-only; the guest finds it
    // by its label CIDATA).
    if crate::vm::actions::wants_seed(c) {
        let seed = dir.join(crate::guest::cloudinit::SEED_FILE);
        if !is_regular(&seed) {
            return Err(QemuError::MissingFile {
                what: "cloud-init seed",
                path: seed,
            });
        }
        a.extend([
            "-drive".into(),
            format!("file={},format=raw,if=virtio,readonly=on", opt_path(&seed)),
        ]);
    }
    for iso in spec.mounts {
        a.extend([
            "-drive".into(),
            format!("file={},format=raw,media=cdrom,readonly=on", opt_path(iso)),
        ]);
    }
    if !spec.mounts.is_empty() && c.kernel_boot.is_none() {
        a.extend(["-boot".into(), "order=c,once=d".into()]);
    }
    for disk in spec.disks {
        a.extend([
            "-drive".into(),
            format!("file={},format=raw,if=virtio", opt_path(disk)),
        ]);
    }
    a.extend(super::usb::arguments(spec.usb_storage));
    a.extend(super::virtiofs::qemu_arguments(
        spec.shares,
        (c.memory_size >> 20).max(16),
    ));
    a.extend(spec.net_args.iter().cloned());
    // After the network devices, as a `-drive if=virtio` device was: the
    // guest sees its devices in the same PCI slots as before snapshots.
    a.extend(spec.disk_args.iter().cloned());
    Ok(a.into_iter().map(OsString::from).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::config::{KernelBoot, MacAddress};

    #[test]
    fn command_line_names_the_vm_directory_and_the_accelerator() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vmlinuz"), b"k").unwrap();
        let cfg = VmConfig {
            os: "linux".into(),
            cpu_count: 3,
            memory_size: 512 << 20,
            disk_size: 1 << 30,
            mac_address: Some(MacAddress::random()),
            display: "1024x768".into(),
            network_mode: Default::default(),
            kernel_boot: Some(KernelBoot {
                kernel: "vmlinuz".into(),
                initrd: None,
                cmdline: "console=ttyS0".into(),
            }),
            disk_format: Default::default(),
            publish: Vec::new(),
            unsafe_host_loopback: false,
            network_policy: Default::default(),
            vm_id: None,
            cloud_init: Default::default(),
            extra: Default::default(),
        };
        let disks = [PathBuf::from("/proc/1/fd/7")];
        let mounts = [PathBuf::from("/proc/1/fd/8")];
        let spec = LaunchSpec {
            name: "t",
            dir: dir.path(),
            config: &cfg,
            accel: Accel::Tcg,
            mounts: &mounts,
            disks: &disks,
            console: Path::new("/proc/self/fd/3"),
            net_args: &[],
            disk_args: &[],
            usb_storage: &[],
            shares: &[],
        };
        let args: Vec<String> = arguments(&spec)
            .unwrap()
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        let joined = args.join(" ");
        assert!(joined.contains("-accel tcg"));
        assert!(joined.contains("-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny"));
        assert!(joined.contains("-smp 3"));
        assert!(joined.contains("-m 512M"));
        assert!(joined.contains("-append console=ttyS0"));
        // No disk is ever probed: every -drive names its format.
        let drives: Vec<&String> = args
            .iter()
            .zip(args.iter().skip(1))
            .filter(|(a, _)| *a == "-drive")
            .map(|(_, d)| d)
            .collect();
        assert_eq!(drives.len(), 2);
        assert!(
            drives.iter().all(|d| d.contains("format=raw")),
            "{drives:?}"
        );
        assert!(joined.contains("file=/proc/1/fd/7,format=raw,if=virtio"));
        assert!(joined.contains("file=/proc/1/fd/8,format=raw,media=cdrom,readonly=on"));
        assert!(joined.contains("file,id=serial0,path=/proc/self/fd/3"));
        assert!(joined.contains("socket,id=qga0,path=qga.sock,server=on,wait=off"));
        assert!(joined.contains("id=qga-port,name=org.qemu.guest_agent.0"));
        assert!(joined.contains("-qmp unix:events.sock,server=on,wait=off"));
        assert!(joined.contains("virtio-balloon-pci,id=balloon0,free-page-reporting=on"));
        // The screen: QEMU's VNC server on a socket in the VM directory, a
        // password required, none on the command line; a VGA of the VM's size.
        assert!(joined.contains("-vnc unix:vnc.sock,password=on"));
        assert!(!joined.contains("password=on,") && !joined.contains("password-secret"));
        assert!(joined.contains("-device VGA,xres=1024,yres=768"));
    }

    /// The VM's disk comes from lume's pinned nodes, and its device after
    /// the network's, where a `-drive if=virtio` device used to be created:
    /// the guest's PCI slots (and so its interface names) stay as before.
    #[test]
    fn the_disk_nodes_and_device_follow_the_network_devices() {
        let dir = tempfile::tempdir().unwrap();
        let cfg: VmConfig =
            serde_json::from_str(r#"{"os":"linux","cloudInit":{"enabled":false}}"#).unwrap();
        let net = [
            "-device".to_string(),
            "virtio-net-pci,netdev=net0".to_string(),
        ];
        let disk = [
            "-blockdev".to_string(),
            r#"{"driver":"raw","node-name":"base"}"#.to_string(),
            "-device".to_string(),
            "virtio-blk-pci,drive=base,id=disk0".to_string(),
        ];
        let spec = LaunchSpec {
            name: "t",
            dir: dir.path(),
            config: &cfg,
            accel: Accel::Tcg,
            mounts: &[],
            disks: &[],
            console: Path::new("/proc/self/fd/3"),
            net_args: &net,
            disk_args: &disk,
            usb_storage: &[],
            shares: &[],
        };
        let args: Vec<String> = arguments(&spec)
            .unwrap()
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        let at = |needle: &str| args.iter().position(|a| a.starts_with(needle)).unwrap();
        assert!(at("virtio-net-pci") < at("virtio-blk-pci"), "{args:?}");
        assert!(!args.iter().any(|a| a.contains("disk.img")), "{args:?}");
    }

    #[test]
    fn a_disk_booted_vm_gets_its_seed_read_only_as_raw_and_a_missing_seed_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let cfg: VmConfig = serde_json::from_str(r#"{"os":"linux"}"#).unwrap();
        let spec = LaunchSpec {
            name: "t",
            dir: dir.path(),
            config: &cfg,
            accel: Accel::Tcg,
            mounts: &[],
            disks: &[],
            console: Path::new("/proc/self/fd/3"),
            net_args: &[],
            disk_args: &[],
            usb_storage: &[],
            shares: &[],
        };
        assert!(matches!(
            arguments(&spec),
            Err(QemuError::MissingFile {
                what: "cloud-init seed",
                ..
            })
        ));
        let seed = dir.path().join(crate::guest::cloudinit::SEED_FILE);
        std::fs::write(&seed, b"seed").unwrap();
        let args: Vec<String> = arguments(&spec)
            .unwrap()
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        let want = format!("file={},format=raw,if=virtio,readonly=on", seed.display());
        assert!(args.contains(&want), "{args:?}");
        // A symlink planted as the seed is refused.
        std::fs::remove_file(&seed).unwrap();
        std::os::unix::fs::symlink("/etc/shadow", &seed).unwrap();
        assert!(arguments(&spec).is_err());
        // --no-cloud-init: no seed drive at all.
        let off: VmConfig =
            serde_json::from_str(r#"{"os":"linux","cloudInit":{"enabled":false}}"#).unwrap();
        let spec = LaunchSpec {
            config: &off,
            ..spec
        };
        let args = arguments(&spec).unwrap();
        assert!(!args.iter().any(|a| a.to_string_lossy().contains("cidata")));
    }
}
