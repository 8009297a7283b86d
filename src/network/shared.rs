//! The lume-managed bridges that NAT and host-only VMs share: `lume0`
//! (masquerade and forwarding) and `lume-host0` (neither). The first VM to
//! join brings a bridge, its dnsmasq and lume's firewall table up; the last to
//! leave takes them down. Membership is a record per VM in the runtime
//! directory; a record is alive while its VM's lock is held, so records of a
//! killed supervisor are recognised and collected by the next lume command.
//! One mutex file serialises every change in a network namespace.

use std::fs;
use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::dnsmasq::{Dnsmasq, DnsmasqError};
use super::netlink::{Netlink, NetlinkError};
use super::publish::PortMapping;
use super::subnet::{BadSubnet, Subnet};
use crate::firewall::nft::Nft;
use crate::firewall::{BridgeNet, Dnat, FirewallDriver, FirewallError, FirewallState};
use crate::settings::{Settings, SettingsError};
use crate::vm::config::MacAddress;
use crate::vm::lock::VmLock;

/// Why a shared network could not be joined or left.
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Dnsmasq(#[from] DnsmasqError),
    #[error(transparent)]
    Firewall(#[from] FirewallError),
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error("Invalid {key} in config.yaml")]
    Subnet {
        key: &'static str,
        #[source]
        source: BadSubnet,
    },
    #[error("Invalid {key} '{value}' in config.yaml: interface names are 1 to 15 characters")]
    BridgeName { key: &'static str, value: String },
    #[error(
        "natSubnet and hostSubnet overlap ({0} and {1}): give them distinct subnets in config.yaml"
    )]
    Overlap(Subnet, Subnet),
    #[error(
        "Cannot use lume's runtime directory {path}: lume needs root for nat and host networks"
    )]
    Runtime {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Another lume command holds the network lock {0} for too long; try again")]
    Busy(PathBuf),
    #[error("The {bridge} network is full: all {capacity} addresses of {subnet} are in use")]
    Full {
        bridge: String,
        subnet: Subnet,
        capacity: u32,
    },
    #[error("Cannot switch IPv4 forwarding")]
    Forwarding(#[source] std::io::Error),
}

/// NAT or host-only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Nat,
    Host,
}

/// One shared bridge network.
#[derive(Debug, Clone)]
pub struct SharedNet {
    pub kind: Kind,
    pub bridge: String,
    pub subnet: Subnet,
    pub dir: PathBuf,
}

/// Both shared networks of this network namespace.
#[derive(Debug, Clone)]
pub struct Networks {
    pub root: PathBuf,
    pub nat: SharedNet,
    pub host: SharedNet,
}

/// A VM's membership record.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Member {
    pub vm: String,
    pub vm_dir: PathBuf,
    pub mac: MacAddress,
    pub ip: Ipv4Addr,
    pub tap: String,
    #[serde(default)]
    pub publish: Vec<PortMapping>,
}

impl Member {
    fn alive(&self) -> bool {
        VmLock::is_held(&self.vm_dir.join(".lock")).unwrap_or(false)
    }
}

/// The runtime directory of this network namespace:
/// `/run/lume/net-<inode of /proc/self/ns/net>`. Bridges, dnsmasq and
/// firewall tables are per network namespace, and so is lume's bookkeeping.
pub fn runtime_root() -> PathBuf {
    let ino = fs::metadata("/proc/self/ns/net")
        .map(|m| m.ino())
        .unwrap_or(0);
    PathBuf::from(format!("/run/lume/net-{ino}"))
}

fn subnet_setting(s: &Settings, key: &'static str, default: &str) -> Result<Subnet, SharedError> {
    let v = s.get_str(key)?.unwrap_or_else(|| default.to_string());
    v.parse()
        .map_err(|source| SharedError::Subnet { key, source })
}

fn bridge_setting(s: &Settings, key: &'static str, default: &str) -> Result<String, SharedError> {
    let v = s.get_str(key)?.unwrap_or_else(|| default.to_string());
    if super::mode::valid_ifname(&v) {
        Ok(v)
    } else {
        Err(SharedError::BridgeName { key, value: v })
    }
}

impl Networks {
    /// The networks as config.yaml describes them (`natBridge`, `natSubnet`,
    /// `hostBridge`, `hostSubnet`).
    pub fn from_settings(s: &Settings) -> Result<Self, SharedError> {
        let root = runtime_root();
        let nat_subnet = subnet_setting(s, "natSubnet", "192.168.64.0/24")?;
        let host_subnet = subnet_setting(s, "hostSubnet", "192.168.65.0/24")?;
        if nat_subnet.overlaps(&host_subnet) {
            return Err(SharedError::Overlap(nat_subnet, host_subnet));
        }
        Ok(Self {
            nat: SharedNet {
                kind: Kind::Nat,
                bridge: bridge_setting(s, "natBridge", "lume0")?,
                subnet: nat_subnet,
                dir: root.join("nat"),
            },
            host: SharedNet {
                kind: Kind::Host,
                bridge: bridge_setting(s, "hostBridge", "lume-host0")?,
                subnet: host_subnet,
                dir: root.join("host"),
            },
            root,
        })
    }

    pub fn get(&self, kind: Kind) -> &SharedNet {
        match kind {
            Kind::Nat => &self.nat,
            Kind::Host => &self.host,
        }
    }

    /// Takes the namespace-wide network mutex.
    fn lock(&self) -> Result<VmLock, SharedError> {
        fs::create_dir_all(&self.root).map_err(|source| SharedError::Runtime {
            path: self.root.clone(),
            source,
        })?;
        let path = self.root.join("network.lock");
        VmLock::acquire_within(&path, Duration::from_secs(30))
            .map_err(|source| SharedError::Runtime {
                path: path.clone(),
                source,
            })?
            .ok_or(SharedError::Busy(path))
    }

    /// Adds a VM to a shared network: brings the bridge, dnsmasq and the
    /// firewall up as needed, reserves an address and returns it.
    pub fn join(
        &self,
        kind: Kind,
        vm: &str,
        vm_dir: &Path,
        mac: MacAddress,
        tap: &str,
        publish: &[PortMapping],
    ) -> Result<Ipv4Addr, SharedError> {
        let _guard = self.lock()?;
        self.collect_locked();
        let net = self.get(kind);
        let ip = net.allocate(&net.members(), vm)?;
        let member = Member {
            vm: vm.to_string(),
            vm_dir: vm_dir.to_path_buf(),
            mac,
            ip,
            tap: tap.to_string(),
            publish: publish.to_vec(),
        };
        let joined = (|| {
            net.write_member(&member)?;
            net.bring_up()?;
            let dns = net.dnsmasq();
            dns.reserve(vm, &mac.to_string(), ip)?;
            dns.ensure_running()?;
            let mut nl = Netlink::open()?;
            nl.set_master(tap, &net.bridge)?;
            nl.set_up(tap)?;
            self.apply_firewall()
        })();
        if let Err(e) = joined {
            // Leave nothing half set up: drop the record, collect the rest.
            let _ = net.remove_member(vm);
            self.collect_locked();
            return Err(e);
        }
        Ok(ip)
    }

    /// Removes a VM; the last one out takes the network down.
    pub fn leave(&self, kind: Kind, vm: &str) -> Result<(), SharedError> {
        let _guard = self.lock()?;
        let net = self.get(kind);
        net.remove_member(vm)?;
        self.collect_locked();
        Ok(())
    }

    /// Collects what killed supervisors left: records of VMs that no longer
    /// run, and whole networks nobody uses any more.
    pub fn collect(&self) -> Result<(), SharedError> {
        if !self.root.exists() {
            return Ok(());
        }
        let _guard = self.lock()?;
        self.collect_locked();
        Ok(())
    }

    fn collect_locked(&self) {
        for net in [&self.nat, &self.host] {
            for m in net.members() {
                if !m.alive() {
                    let _ = net.remove_member(&m.vm);
                }
            }
            if net.members().is_empty() {
                net.take_down();
            }
        }
        let _ = self.apply_firewall();
    }

    /// The firewall state every live member implies.
    pub fn firewall_state(&self) -> FirewallState {
        let nat_members = self.nat.members();
        let host_members = self.host.members();
        let bridge_net = |n: &SharedNet| BridgeNet {
            bridge: n.bridge.clone(),
            subnet: n.subnet,
        };
        FirewallState {
            nat: (!nat_members.is_empty()).then(|| bridge_net(&self.nat)),
            host: (!host_members.is_empty()).then(|| bridge_net(&self.host)),
            dnat: nat_members
                .iter()
                .flat_map(|m| {
                    m.publish.iter().map(|p| Dnat {
                        host_ip: p.host_ip,
                        host_port: p.host_port,
                        proto: p.proto,
                        guest: m.ip,
                        guest_port: p.guest_port,
                    })
                })
                .collect(),
        }
    }

    /// Writes lume's table for the current members (removes it when none).
    pub fn apply_firewall(&self) -> Result<(), SharedError> {
        Ok(Nft.apply(&self.firewall_state())?)
    }
}

impl SharedNet {
    fn members_dir(&self) -> PathBuf {
        self.dir.join("members")
    }

    pub fn dnsmasq(&self) -> Dnsmasq {
        Dnsmasq {
            dir: self.dir.clone(),
            bridge: self.bridge.clone(),
            subnet: self.subnet,
            route: self.kind == Kind::Nat,
        }
    }

    /// Every membership record.
    pub fn members(&self) -> Vec<Member> {
        let Ok(entries) = fs::read_dir(self.members_dir()) else {
            return Vec::new();
        };
        let mut v: Vec<Member> = entries
            .filter_map(Result::ok)
            .filter_map(|e| serde_json::from_slice(&fs::read(e.path()).ok()?).ok())
            .collect();
        v.sort_by(|a, b| a.vm.cmp(&b.vm));
        v
    }

    fn write_member(&self, m: &Member) -> Result<(), SharedError> {
        let dir = self.members_dir();
        let io = |source| SharedError::Runtime {
            path: dir.clone(),
            source,
        };
        fs::create_dir_all(&dir).map_err(io)?;
        crate::util::atomic::write_atomic(
            &dir.join(format!("{}.json", m.vm)),
            &serde_json::to_vec_pretty(m).expect("member serialises"),
        )
        .map_err(io)
    }

    fn remove_member(&self, vm: &str) -> Result<(), SharedError> {
        self.dnsmasq().release(vm);
        match fs::remove_file(self.members_dir().join(format!("{vm}.json"))) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(SharedError::Runtime {
                path: self.members_dir(),
                source,
            }),
        }
    }

    /// The lowest free address from .2 up (the VM's own earlier record is reused).
    fn allocate(&self, members: &[Member], vm: &str) -> Result<Ipv4Addr, SharedError> {
        let used: Vec<Ipv4Addr> = members
            .iter()
            .filter(|m| m.vm != vm)
            .map(|m| m.ip)
            .collect();
        (2..2 + self.subnet.guest_capacity())
            .map(|n| self.subnet.host(n))
            .find(|ip| !used.contains(ip))
            .ok_or_else(|| SharedError::Full {
                bridge: self.bridge.clone(),
                subnet: self.subnet,
                capacity: self.subnet.guest_capacity(),
            })
    }

    /// The bridge with its gateway address, up; forwarding on for NAT.
    pub fn bring_up(&self) -> Result<(), SharedError> {
        fs::create_dir_all(&self.dir).map_err(|source| SharedError::Runtime {
            path: self.dir.clone(),
            source,
        })?;
        let mut nl = Netlink::open()?;
        if nl.link_info(&self.bridge)?.is_none() {
            nl.create_bridge(&self.bridge)?;
        }
        nl.add_address_v4(&self.bridge, self.subnet.gateway(), self.subnet.prefix)?;
        nl.set_up(&self.bridge)?;
        if self.kind == Kind::Nat {
            forwarding_on(&self.dir)?;
        }
        Ok(())
    }

    /// Removes the bridge and dnsmasq; restores forwarding. Best effort.
    pub fn take_down(&self) {
        self.dnsmasq().stop();
        if let Ok(mut nl) = Netlink::open() {
            let _ = nl.delete_link(&self.bridge);
        }
        if self.kind == Kind::Nat {
            forwarding_restore(&self.dir);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// Switches IPv4 forwarding on, remembering the value it had.
fn forwarding_on(dir: &Path) -> Result<(), SharedError> {
    let saved = dir.join("ip_forward.saved");
    let current = fs::read_to_string(IP_FORWARD).map_err(SharedError::Forwarding)?;
    if !saved.exists() {
        fs::write(&saved, current.trim()).map_err(SharedError::Forwarding)?;
    }
    if current.trim() != "1" {
        fs::write(IP_FORWARD, "1").map_err(SharedError::Forwarding)?;
    }
    Ok(())
}

/// Puts IPv4 forwarding back to what it was before lume needed it.
fn forwarding_restore(dir: &Path) {
    let saved = dir.join("ip_forward.saved");
    if let Ok(v) = fs::read_to_string(&saved) {
        let _ = fs::write(IP_FORWARD, v.trim());
        let _ = fs::remove_file(&saved);
    }
}
