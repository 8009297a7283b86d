//! `config.json`: one VM's settings, in lume's field names plus our own.
//! Keys we do not know (for example lume's `hardwareModel`) are kept as they are.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::network::NetworkMode;
use crate::network::publish::PortMapping;

/// Why a config file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("Cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "Config file {path} is not a regular file (a symlink, FIFO, device or directory): lume reads only its own files; remove it and restore the VM's config.json"
    )]
    NotRegular { path: PathBuf },
    #[error(
        "Config file {path} is larger than {max} bytes: it is not a config lume wrote; fix or restore it"
    )]
    TooLarge { path: PathBuf, max: u64 },
    #[error(
        "Corrupt config file {path}: fix or restore it, or delete the VM with `lume delete --force`"
    )]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "Config file {path} names {value:?} as kernelBoot.{field}: only a file name inside the VM directory is allowed (no '/', no '..'); fix the file or recreate the VM"
    )]
    UnsafeFileName {
        path: PathBuf,
        field: &'static str,
        value: String,
    },
    #[error(
        "Invalid display resolution '{0}': give WIDTHxHEIGHT with two positive numbers, for example 1024x768"
    )]
    Display(String),
    #[error("Cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A MAC address, stored as `aa:bb:cc:dd:ee:ff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddress(pub [u8; 6]);

/// Why a MAC address was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MacError {
    #[error(
        "Invalid MAC address '{0}': write six hex bytes separated by ':' (for example 52:54:00:12:34:56)"
    )]
    Syntax(String),
    #[error(
        "MAC address '{0}' is a multicast address: the first byte must be even (for example 52:54:00:12:34:56)"
    )]
    Multicast(String),
}

impl MacAddress {
    /// A random locally administered unicast address.
    pub fn random() -> Self {
        let mut b = [0u8; 6];
        crate::util::random::fill(&mut b);
        b[0] = (b[0] & 0xfc) | 0x02;
        Self(b)
    }
}

impl FromStr for MacAddress {
    type Err = MacError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.trim().split([':', '-']).collect();
        let mut out = [0u8; 6];
        if parts.len() != 6 {
            return Err(MacError::Syntax(s.to_string()));
        }
        for (o, p) in out.iter_mut().zip(&parts) {
            if p.len() != 2 {
                return Err(MacError::Syntax(s.to_string()));
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| MacError::Syntax(s.to_string()))?;
        }
        if out[0] & 1 == 1 {
            return Err(MacError::Multicast(s.to_string()));
        }
        Ok(Self(out))
    }
}

impl fmt::Display for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl Serialize for MacAddress {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddress {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Direct kernel boot: the files live in the VM's directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KernelBoot {
    /// File name of the kernel inside the VM directory.
    pub kernel: String,
    /// File name of the initrd inside the VM directory, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    /// Kernel command line.
    #[serde(default)]
    pub cmdline: String,
}

/// The format of a VM's main disk. Only raw is stored: imports are
/// converted, and QEMU is always told the format instead of probing it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    #[default]
    Raw,
}

/// cloud-init provisioning of a VM booted from its disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CloudInit {
    /// Whether the VM gets a NoCloud seed (`--no-cloud-init` turns it off).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Whether user `lume` gets the password `lume`: `false` with
    /// `--no-password`; absent, config.yaml's `sshPassword` decides (default on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<bool>,
    /// Whether the VM directory holds the user's own user-data
    /// (`--cloud-init FILE`, stored as `user-data`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub user_data: bool,
}

fn yes() -> bool {
    true
}

impl Default for CloudInit {
    fn default() -> Self {
        Self {
            enabled: true,
            password: None,
            user_data: false,
        }
    }
}

impl CloudInit {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

pub const DEFAULT_CPU: u32 = 2;
pub const DEFAULT_MEMORY: u64 = 2 << 30;
pub const DEFAULT_DISK: u64 = 20 << 30;
pub const DEFAULT_DISPLAY: &str = "1024x768";

fn default_cpu() -> u32 {
    DEFAULT_CPU
}
fn default_memory() -> u64 {
    DEFAULT_MEMORY
}
fn default_disk() -> u64 {
    DEFAULT_DISK
}
fn default_display() -> String {
    DEFAULT_DISPLAY.to_string()
}
fn default_os() -> String {
    "linux".to_string()
}

/// One VM's persistent settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmConfig {
    #[serde(default = "default_os")]
    pub os: String,
    #[serde(default = "default_cpu")]
    pub cpu_count: u32,
    #[serde(default = "default_memory")]
    pub memory_size: u64,
    #[serde(default = "default_disk")]
    pub disk_size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac_address: Option<MacAddress>,
    #[serde(default = "default_display")]
    pub display: String,
    /// Absent in configs written by lume for macOS: those load as `nat`.
    #[serde(default)]
    pub network_mode: NetworkMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_boot: Option<KernelBoot>,
    /// Configs written before lume recorded it load as raw.
    #[serde(default)]
    pub disk_format: DiskFormat,
    /// Ports published at every start (`--publish` on create).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish: Vec<PortMapping>,
    /// User mode: the guest may reach the host's loopback services through
    /// its gateway. Unsafe for untrusted guests; off unless set.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unsafe_host_loopback: bool,
    /// Egress rules and isolation, enforced in nat, host and bridged mode
    /// (`network::policy`). Absent: no policy.
    #[serde(
        default,
        skip_serializing_if = "crate::network::policy::Policy::is_empty"
    )]
    pub network_policy: crate::network::policy::Policy,
    /// A random id of this VM, new for a clone: cloud-init's instance id is
    /// made from it. VMs created before lume recorded it get one at their
    /// next start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_id: Option<String>,
    /// cloud-init provisioning (the NoCloud seed).
    #[serde(default, skip_serializing_if = "CloudInit::is_default")]
    pub cloud_init: CloudInit,
    /// Every key we do not know, kept so that a rewrite loses nothing.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The largest config.json lume reads (its own are a few KiB).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

impl VmConfig {
    /// Reads and parses `path`.
    ///
    /// Only a regular file of at most [`MAX_CONFIG_BYTES`] is read, and a
    /// symlink is never followed: in a VM directory another user once
    /// controlled, config.json could be a FIFO (a read that never ends), a
    /// link to root's files or to /dev/zero.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        use std::io::Read as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let read_err = |source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| {
                if e.raw_os_error() == Some(libc::ELOOP) {
                    ConfigError::NotRegular {
                        path: path.to_path_buf(),
                    }
                } else {
                    read_err(e)
                }
            })?;
        let meta = file.metadata().map_err(read_err)?;
        if !meta.is_file() {
            return Err(ConfigError::NotRegular {
                path: path.to_path_buf(),
            });
        }
        if meta.len() > MAX_CONFIG_BYTES {
            return Err(ConfigError::TooLarge {
                path: path.to_path_buf(),
                max: MAX_CONFIG_BYTES,
            });
        }
        let mut text = Vec::with_capacity(meta.len() as usize);
        file.take(MAX_CONFIG_BYTES + 1)
            .read_to_end(&mut text)
            .map_err(read_err)?;
        if text.len() as u64 > MAX_CONFIG_BYTES {
            return Err(ConfigError::TooLarge {
                path: path.to_path_buf(),
                max: MAX_CONFIG_BYTES,
            });
        }
        let cfg: Self = serde_json::from_slice(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        cfg.check_file_names(path)?;
        Ok(cfg)
    }

    /// Direct-boot files are plain names inside the VM directory: a path
    /// written into config.json must never make QEMU read a host file.
    fn check_file_names(&self, path: &Path) -> Result<(), ConfigError> {
        let Some(k) = &self.kernel_boot else {
            return Ok(());
        };
        let names = [("kernel", Some(&k.kernel)), ("initrd", k.initrd.as_ref())];
        for (field, value) in names {
            if let Some(v) = value.filter(|v| !is_plain_file_name(v)) {
                return Err(ConfigError::UnsafeFileName {
                    path: path.to_path_buf(),
                    field,
                    value: v.clone(),
                });
            }
        }
        Ok(())
    }

    /// Writes the config atomically (and privately, 0600) to `path`.
    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        let mut text = serde_json::to_vec_pretty(self).expect("config serialises");
        text.push(b'\n');
        crate::util::atomic::write_private(path, &text).map_err(|source| ConfigError::Write {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Checks a display resolution as lume does (`VMDisplayResolution`):
/// `WIDTHxHEIGHT`, two positive whole numbers; returns it as given.
pub fn parse_display(s: &str) -> Result<String, ConfigError> {
    let ok = s.split_once('x').is_some_and(|(w, h)| {
        [w, h].iter().all(|n| {
            !n.is_empty()
                && n.len() <= 6
                && n.bytes().all(|b| b.is_ascii_digit())
                && n.parse::<u32>().is_ok_and(|v| v > 0)
        })
    });
    if ok {
        Ok(s.to_string())
    } else {
        Err(ConfigError::Display(s.to_string()))
    }
}

/// A name without '/' that is not empty, `.` or `..`.
pub fn is_plain_file_name(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && !s.contains('/') && !s.contains('\0')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A FIFO (whose read would never end), a symlink (to a file lume
    /// wrote, elsewhere) and an endless device behind a link are refused
    /// at once; so is a file too large to be lume's.
    #[test]
    fn only_a_small_regular_config_json_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.json");
        std::fs::write(&real, "{}").unwrap();
        VmConfig::load(&real).unwrap();
        let fifo = dir.path().join("fifo.json");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let link = dir.path().join("link.json");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let zero = dir.path().join("zero.json");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        for p in [&fifo, &link, &zero] {
            let e = VmConfig::load(p).unwrap_err();
            assert!(matches!(e, ConfigError::NotRegular { .. }), "{p:?}: {e:?}");
        }
        let big = dir.path().join("big.json");
        let mut text = b"{\"os\": \"linux\", \"pad\": \"".to_vec();
        text.resize(MAX_CONFIG_BYTES as usize + 10, b'x');
        text.extend_from_slice(b"\"}");
        std::fs::write(&big, text).unwrap();
        let e = VmConfig::load(&big).unwrap_err();
        assert!(matches!(e, ConfigError::TooLarge { .. }), "{e:?}");
    }

    #[test]
    fn kernel_paths_in_config_json_are_refused_and_disk_format_defaults_to_raw() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        for bad in ["/etc/shadow", "../other/vmlinuz", "..", ""] {
            let text = serde_json::json!({"kernelBoot": {"kernel": "vmlinuz", "initrd": bad}});
            std::fs::write(&p, text.to_string()).unwrap();
            let e = VmConfig::load(&p).unwrap_err();
            assert!(
                matches!(
                    e,
                    ConfigError::UnsafeFileName {
                        field: "initrd",
                        ..
                    }
                ),
                "{bad}: {e}"
            );
            let text = serde_json::json!({"kernelBoot": {"kernel": bad}});
            std::fs::write(&p, text.to_string()).unwrap();
            assert!(VmConfig::load(&p).is_err(), "{bad}");
        }
        std::fs::write(&p, r#"{"kernelBoot":{"kernel":"vmlinuz"}}"#).unwrap();
        let c = VmConfig::load(&p).unwrap();
        assert_eq!(c.disk_format, DiskFormat::Raw);
        assert_eq!(serde_json::to_value(&c).unwrap()["diskFormat"], "raw");
    }

    #[test]
    fn loads_a_config_written_by_lume_as_nat_and_keeps_unknown_keys() {
        let lume = r#"{"os":"macOS","cpuCount":4,"memorySize":8589934592,"diskSize":68719476736,
            "macAddress":"ba:2c:13:9f:1a:07","display":"1024x768","hardwareModel":"YnBsaXN0",
            "machineIdentifier":"AAAA"}"#;
        let c: VmConfig = serde_json::from_str(lume).unwrap();
        assert_eq!(c.network_mode, NetworkMode::Nat);
        assert_eq!(c.cpu_count, 4);
        assert_eq!(c.memory_size, 8 << 30);
        let back: Value = serde_json::to_value(&c).unwrap();
        assert_eq!(back["hardwareModel"], "YnBsaXN0");
        assert_eq!(back["machineIdentifier"], "AAAA");
        assert_eq!(back["networkMode"], "nat");
        assert_eq!(back["macAddress"], "ba:2c:13:9f:1a:07");
    }

    #[test]
    fn round_trips_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        let c = VmConfig {
            os: "linux".into(),
            cpu_count: 1,
            memory_size: 256 << 20,
            disk_size: 1 << 30,
            mac_address: Some(MacAddress::random()),
            display: default_display(),
            network_mode: NetworkMode::Bridged(Some("br0".into())),
            kernel_boot: Some(KernelBoot {
                kernel: "vmlinuz".into(),
                initrd: Some("initrd.img".into()),
                cmdline: "console=ttyS0".into(),
            }),
            disk_format: DiskFormat::Raw,
            publish: vec!["127.0.0.1:2222:22".parse().unwrap()],
            unsafe_host_loopback: false,
            network_policy: Default::default(),
            vm_id: None,
            cloud_init: Default::default(),
            extra: Map::new(),
        };
        c.save(&p).unwrap();
        assert_eq!(VmConfig::load(&p).unwrap(), c);
    }

    #[test]
    fn displays_are_width_x_height() {
        for ok in ["1024x768", "1x1", "3840x2160"] {
            assert_eq!(parse_display(ok).unwrap(), ok);
        }
        for bad in [
            "",
            "1024",
            "1024x",
            "x768",
            "0x768",
            "1024x0",
            "1024X768",
            "-1x5",
            "1x2x3",
            " 1x2",
            "1024x768 ",
        ] {
            assert!(
                matches!(parse_display(bad), Err(ConfigError::Display(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn corrupt_file_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        std::fs::write(&p, "{ not json").unwrap();
        let e = VmConfig::load(&p).unwrap_err();
        assert!(e.to_string().contains(&p.display().to_string()));
    }

    #[test]
    fn random_macs_are_local_unicast() {
        for _ in 0..100 {
            let m = MacAddress::random();
            assert_eq!(m.0[0] & 0b11, 0b10);
            assert_eq!(m.to_string().parse::<MacAddress>().unwrap(), m);
        }
        assert!("01:00:5e:00:00:01".parse::<MacAddress>().is_err());
        assert!("zz:00:00:00:00:01".parse::<MacAddress>().is_err());
    }
}
