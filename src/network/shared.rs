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
use super::kernel::netlink::{Netlink, NetlinkError, RouteV4};
use super::kernel::sysctl;
use super::publish::PortMapping;
use super::subnet::{BadSubnet, Subnet};
use crate::firewall::foreign::{FindingKind, Ruleset};
use crate::firewall::nft::Nft;
use crate::firewall::{
    Accommodated, BridgeNet, Dnat, FirewallDriver, FirewallError, FirewallState, ForeignDrop,
    Opening,
};
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
    #[error(
        "{key} '{bridge}' is an existing interface that lume did not create: lume never takes over or deletes a foreign interface. Choose a name that does not exist (lume config set {key} lume0), or put VMs on that bridge with --network bridged:{bridge}"
    )]
    ForeignBridge { key: &'static str, bridge: String },
    #[error("Cannot switch IPv4 forwarding")]
    Forwarding(#[source] std::io::Error),
    #[error(
        "{key} {subnet} collides with the host route {routes}: choose another subnet for {key} in config.yaml (lume config set {key} <subnet>), or remove it to let lume pick a free one (lume config unset {key})"
    )]
    RouteConflict {
        key: &'static str,
        subnet: Subnet,
        routes: String,
    },
    #[error("No free /24 subnet was found for the {0} network: set one in config.yaml")]
    NoFreeSubnet(String),
    #[error(
        "Host port {port}/{proto} is already published by VM '{vm}': publish another host port, or stop that VM"
    )]
    PortTaken {
        port: u16,
        proto: super::publish::Proto,
        vm: String,
    },
    #[error(
        "MAC address {mac} is used by VM '{vm}', which runs on one of lume's networks: give this VM its own (lume set NAME --mac-address <new>, or leave the MAC out at create for a random one)"
    )]
    MacTaken { mac: MacAddress, vm: String },
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
    /// The subnet config.yaml asks for (or the default). While the network
    /// is up, the one in use is in `<dir>/subnet`: see [`SharedNet::subnet`].
    pub configured: Subnet,
    /// Whether the user chose the subnet in config.yaml.
    pub explicit: bool,
    pub dir: PathBuf,
}

/// Both shared networks of this network namespace.
#[derive(Debug, Clone)]
pub struct Networks {
    pub root: PathBuf,
    pub nat: SharedNet,
    pub host: SharedNet,
    /// config.yaml `firewallAccommodation` (default true): put accepts for
    /// lume's bridges in the chains Docker, ufw and firewalld keep for them.
    pub accommodate: bool,
    /// The config.yaml these were read from: the watcher reads
    /// `firewallAccommodation` there again once a second.
    pub settings_file: PathBuf,
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

/// A running VM bridged onto a Linux bridge of the user's (`bridged:br0`,
/// its tap in that bridge): while one runs, lume keeps its accept for the
/// bridge's own traffic in other tools' chains (with br_netfilter, Docker's
/// `FORWARD` policy drops frames between the bridge's ports). One record
/// per VM in `<runtime>/bridged/`, so VMs on the same bridge never conflict:
/// the accept stays while any of them lives.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BridgedMember {
    pub vm: String,
    pub vm_dir: PathBuf,
    pub bridge: String,
    /// The guest's MAC address (records of older releases have none).
    #[serde(default)]
    pub mac: Option<MacAddress>,
}

impl BridgedMember {
    pub fn id(&self) -> String {
        member_id(&self.vm, &self.vm_dir)
    }

    fn alive(&self) -> bool {
        liveness_of(&self.vm_dir) != Liveness::Dead
    }
}

/// Leaves a shared network when an attachment is dropped.
#[derive(Debug)]
pub struct SharedTeardown {
    pub networks: Networks,
    pub kind: Kind,
    /// The membership key ([`member_id`]).
    pub id: String,
}

impl crate::network::attach::Teardown for SharedTeardown {
    fn teardown(self: Box<Self>) {
        let _ = self.networks.leave(self.kind, &self.id);
    }
}

/// Leaves the Linux bridge a tap was joined to: lume's accept for the
/// bridge in other tools' chains goes with the last VM on it.
#[derive(Debug)]
pub struct BridgedTeardown {
    pub networks: Networks,
    /// The record's key ([`member_id`]).
    pub id: String,
}

impl crate::network::attach::Teardown for BridgedTeardown {
    fn teardown(self: Box<Self>) {
        let _ = self.networks.leave_bridged(&self.id);
    }
}

/// The key of a VM's membership: its name plus a hash of its directory, so
/// VMs of the same name in two storage locations never share a record.
pub fn member_id(vm: &str, vm_dir: &Path) -> String {
    let mut h: u32 = 0x811c_9dc5; // FNV-1a
    for b in vm_dir.as_os_str().as_encoded_bytes() {
        h = (h ^ u32::from(*b)).wrapping_mul(0x0100_0193);
    }
    format!("{vm}-{h:08x}")
}

impl Member {
    pub fn id(&self) -> String {
        member_id(&self.vm, &self.vm_dir)
    }

    /// Whether the member's VM runs, as far as its lock can tell.
    pub fn liveness(&self) -> Liveness {
        liveness_of(&self.vm_dir)
    }

    /// Not provably dead: a member whose lock cannot be checked keeps its
    /// share of the network (ports, reservation, the bridge itself).
    fn alive(&self) -> bool {
        self.liveness() != Liveness::Dead
    }
}

/// What a VM's lock says about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// The lock is held: the supervisor runs.
    Alive,
    /// The lock is free, or its file (or the VM directory) is gone.
    Dead,
    /// The lock could not be checked (permissions, a symlink, I/O): nothing
    /// may be torn down on that basis.
    Unknown,
}

/// The liveness of the VM in `vm_dir` (see [`Liveness`]).
pub fn liveness_of(vm_dir: &Path) -> Liveness {
    match VmLock::is_held(&vm_dir.join(".lock")) {
        Ok(true) => Liveness::Alive,
        Ok(false) => Liveness::Dead,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Liveness::Dead,
        Err(_) => Liveness::Unknown,
    }
}

/// The alias (IFLA_IFALIAS) lume gives the bridges it creates; only a bridge
/// with this mark is ever deleted.
pub const BRIDGE_MARK: &str = "lume";

/// The runtime directory of this network namespace:
/// `/run/lume/net-<inode of /proc/self/ns/net>`. Bridges, dnsmasq and
/// firewall tables are per network namespace, and so is lume's bookkeeping.
pub fn runtime_root() -> PathBuf {
    let ino = fs::metadata("/proc/self/ns/net")
        .map(|m| m.ino())
        .unwrap_or(0);
    PathBuf::from(format!("/run/lume/net-{ino}"))
}

fn subnet_setting(
    s: &Settings,
    key: &'static str,
    default: &str,
) -> Result<(Subnet, bool), SharedError> {
    let given = s.get_str(key)?;
    let explicit = given.is_some();
    let v = given.unwrap_or_else(|| default.to_string());
    let subnet = v
        .parse()
        .map_err(|source| SharedError::Subnet { key, source })?;
    Ok((subnet, explicit))
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
        let (nat_subnet, nat_explicit) = subnet_setting(s, "natSubnet", "192.168.64.0/24")?;
        let (host_subnet, host_explicit) = subnet_setting(s, "hostSubnet", "192.168.65.0/24")?;
        if nat_subnet.overlaps(&host_subnet) {
            return Err(SharedError::Overlap(nat_subnet, host_subnet));
        }
        Ok(Self {
            nat: SharedNet {
                kind: Kind::Nat,
                bridge: bridge_setting(s, "natBridge", "lume0")?,
                configured: nat_subnet,
                explicit: nat_explicit,
                dir: root.join("nat"),
            },
            host: SharedNet {
                kind: Kind::Host,
                bridge: bridge_setting(s, "hostBridge", "lume-host0")?,
                configured: host_subnet,
                explicit: host_explicit,
                dir: root.join("host"),
            },
            accommodate: s.get_bool("firewallAccommodation")?.unwrap_or(true),
            settings_file: s.file().to_path_buf(),
            root,
        })
    }

    /// `firewallAccommodation` as config.yaml says now, when it differs
    /// from the value in use (an unreadable file changes nothing).
    pub fn accommodation_changed(&self) -> Option<bool> {
        let now = Settings::load_from(&self.settings_file)
            .ok()?
            .get_bool("firewallAccommodation")
            .ok()?
            .unwrap_or(true);
        (now != self.accommodate).then_some(now)
    }

    /// Applies a changed `firewallAccommodation` to every running VM: puts
    /// lume's accepts in other tools' chains, or removes them, and rewrites
    /// lume's table (its marks). Returns what it did, for the log; `None`
    /// when a join or leave holds the network lock (the next check retries).
    pub fn apply_accommodation(&mut self, on: bool) -> Option<String> {
        let path = self.root.join("network.lock");
        let Ok(Some(_guard)) = VmLock::acquire_within(&path, Duration::from_millis(200)) else {
            return None;
        };
        self.accommodate = on;
        Some(match self.apply_firewall() {
            Ok(()) => accommodation_note(on, &self.settings_file),
            Err(e) => format!(
                "{}, but lume's firewall could not be rewritten: {}",
                accommodation_note(on, &self.settings_file),
                crate::error_chain(&e)
            ),
        })
    }

    /// `/run/lume`: the directory above this namespace's runtime root.
    fn base(&self) -> &Path {
        self.root.parent().unwrap_or(&self.root)
    }

    pub fn get(&self, kind: Kind) -> &SharedNet {
        match kind {
            Kind::Nat => &self.nat,
            Kind::Host => &self.host,
        }
    }

    /// Takes the namespace-wide network mutex.
    fn lock(&self) -> Result<VmLock, SharedError> {
        super::rundir::private_dir(self.base(), &self.root).map_err(|source| {
            SharedError::Runtime {
                path: self.root.clone(),
                source,
            }
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
    /// With `exclusive_mac` (a member's VM, see
    /// [`super::attach::AttachOptions::member`]), a MAC address another
    /// running VM of lume's networks uses is refused, under the network
    /// lock: two requests cannot both pass.
    #[allow(clippy::too_many_arguments)]
    pub fn join(
        &self,
        kind: Kind,
        vm: &str,
        vm_dir: &Path,
        mac: MacAddress,
        tap: &str,
        publish: &[PortMapping],
        exclusive_mac: bool,
    ) -> Result<(Ipv4Addr, Option<String>), SharedError> {
        let _guard = self.lock()?;
        let rewrite = self.collect_records_locked();
        let joined = self.join_locked(kind, vm, vm_dir, mac, tap, publish, exclusive_mac);
        if joined.is_err() && rewrite {
            // Refused before its firewall write: what the collection
            // changed still reaches the firewall.
            let _ = self.apply_firewall();
        }
        joined
    }

    /// [`Self::join`] under the network lock, after the collection; writes
    /// lume's firewall for every member when the VM is in.
    #[allow(clippy::too_many_arguments)]
    fn join_locked(
        &self,
        kind: Kind,
        vm: &str,
        vm_dir: &Path,
        mac: MacAddress,
        tap: &str,
        publish: &[PortMapping],
        exclusive_mac: bool,
    ) -> Result<(Ipv4Addr, Option<String>), SharedError> {
        if exclusive_mac {
            self.check_mac_locked(mac, &member_id(vm, vm_dir))?;
        }
        let net = self.get(kind);
        let mut note = None;
        if net.members().is_empty() {
            let other = match kind {
                Kind::Nat => self.host.subnet(),
                Kind::Host => self.nat.subnet(),
            };
            let (subnet, why) = net.resolve_subnet(&other)?;
            super::rundir::private_dir(self.base(), &net.dir).map_err(|source| {
                SharedError::Runtime {
                    path: net.dir.clone(),
                    source,
                }
            })?;
            fs::write(net.dir.join("subnet"), subnet.to_string()).map_err(|source| {
                SharedError::Runtime {
                    path: net.dir.clone(),
                    source,
                }
            })?;
            let _ = super::rundir::private_file(&net.dir.join("subnet"));
            note = why;
        }
        let id = member_id(vm, vm_dir);
        self.check_ports(&id, publish)?;
        let leases = fs::read_to_string(net.dnsmasq().lease_path())
            .map(|t| super::dnsmasq::parse_leases(&t))
            .unwrap_or_default();
        let ip = net.allocate(
            &net.members(),
            &id,
            mac,
            &leases,
            crate::util::time::unix_now(),
        )?;
        let member = Member {
            vm: vm.to_string(),
            vm_dir: vm_dir.to_path_buf(),
            mac,
            ip,
            tap: tap.to_string(),
            publish: publish.to_vec(),
        };
        // VMs already running on this network (started by this release or an
        // earlier one, whose bridges carry no mark) prove the bridge is lume's.
        let running_before = net
            .members()
            .iter()
            .any(|m| m.id() != id && m.liveness() == Liveness::Alive);
        let joined = (|| {
            net.write_member(&member)?;
            net.bring_up_adopting(running_before)?;
            let dns = net.dnsmasq();
            dns.reserve(&id, &mac.to_string(), ip)?;
            dns.ensure_running()?;
            let mut nl = Netlink::open()?;
            nl.set_master(tap, &net.bridge)?;
            nl.set_up(tap)?;
            self.apply_firewall()
        })();
        if let Err(e) = joined {
            // Leave nothing half set up: drop the record, collect the rest.
            let _ = net.remove_member(&id);
            self.collect_locked();
            return Err(e);
        }
        Ok((ip, note))
    }

    /// Refuses `mac` when another live VM of lume's networks (nat, host, or
    /// bridged onto a Linux bridge) uses it; `id` is the asking VM's
    /// [`member_id`]. The caller holds the network lock.
    fn check_mac_locked(&self, mac: MacAddress, id: &str) -> Result<(), SharedError> {
        let shared = [&self.nat, &self.host]
            .into_iter()
            .flat_map(|n| n.members())
            .find(|m| m.mac == mac && m.id() != id && m.alive())
            .map(|m| m.vm);
        let bridged = || {
            self.bridged_members()
                .into_iter()
                .find(|m| m.mac == Some(mac) && m.id() != id && m.alive())
                .map(|m| m.vm)
        };
        match shared.or_else(bridged) {
            Some(vm) => Err(SharedError::MacTaken { mac, vm }),
            None => Ok(()),
        }
    }

    /// [`Self::check_mac_locked`] under the network lock (bridged onto a
    /// plain interface, which keeps no record here).
    pub fn check_mac(&self, mac: MacAddress, vm: &str, vm_dir: &Path) -> Result<(), SharedError> {
        let _guard = self.lock()?;
        self.check_mac_locked(mac, &member_id(vm, vm_dir))
    }

    /// Refuses host ports another NAT VM of this namespace already publishes
    /// (`id` is the asking VM's [`member_id`]).
    pub fn check_ports(&self, id: &str, publish: &[PortMapping]) -> Result<(), SharedError> {
        for other in self
            .nat
            .members()
            .iter()
            .filter(|m| m.id() != id && m.alive())
        {
            for p in publish {
                let clash = other.publish.iter().any(|q| {
                    q.host_port == p.host_port
                        && q.proto == p.proto
                        && (q.host_ip.is_none() || p.host_ip.is_none() || q.host_ip == p.host_ip)
                });
                if clash {
                    return Err(SharedError::PortTaken {
                        port: p.host_port,
                        proto: p.proto,
                        vm: other.vm.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Removes a VM (by [`member_id`]); the last one out takes the network down.
    pub fn leave(&self, kind: Kind, id: &str) -> Result<(), SharedError> {
        let _guard = self.lock()?;
        let net = self.get(kind);
        net.remove_member(id)?;
        self.collect_locked();
        self.apply_firewall()
    }

    fn bridged_dir(&self) -> PathBuf {
        self.root.join("bridged")
    }

    /// The records of VMs bridged onto Linux bridges (dead ones included).
    pub fn bridged_members(&self) -> Vec<BridgedMember> {
        let Ok(entries) = fs::read_dir(self.bridged_dir()) else {
            return Vec::new();
        };
        let mut v: Vec<BridgedMember> = entries
            .filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| serde_json::from_slice(&fs::read(e.path()).ok()?).ok())
            .filter(|m: &BridgedMember| super::mode::valid_ifname(&m.bridge))
            .collect();
        v.sort_by(|a, b| a.vm.cmp(&b.vm));
        v
    }

    fn remove_bridged(&self, id: &str) -> Result<(), SharedError> {
        match fs::remove_file(self.bridged_dir().join(format!("{id}.json"))) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(SharedError::Runtime {
                path: self.bridged_dir(),
                source,
            }),
        }
    }

    /// Records a VM bridged onto the Linux bridge `bridge` and puts lume's
    /// accept for that bridge's own traffic in other tools' chains (unless
    /// `firewallAccommodation` is off). The record is written before the
    /// accept: a supervisor killed at any point leaves a record the next
    /// lume command collects, with the accept. The VM starts even when the
    /// accept cannot be placed (its bridge worked without lume's help
    /// before): without nft there is no iptables-nft chain to accommodate;
    /// any other failure is returned as a note, and the watcher retries.
    /// With `exclusive_mac`, a MAC another running VM uses is refused first
    /// (as in [`Self::join`]).
    pub fn join_bridged(
        &self,
        vm: &str,
        vm_dir: &Path,
        bridge: &str,
        mac: MacAddress,
        exclusive_mac: bool,
    ) -> Result<Option<String>, SharedError> {
        let _guard = self.lock()?;
        self.collect_locked();
        if exclusive_mac {
            self.check_mac_locked(mac, &member_id(vm, vm_dir))?;
        }
        let dir = self.bridged_dir();
        let io = |source| SharedError::Runtime {
            path: dir.clone(),
            source,
        };
        super::rundir::private_dir(self.base(), &dir).map_err(io)?;
        let m = BridgedMember {
            vm: vm.to_string(),
            vm_dir: vm_dir.to_path_buf(),
            bridge: bridge.to_string(),
            mac: Some(mac),
        };
        let path = dir.join(format!("{}.json", m.id()));
        crate::util::atomic::write_atomic(
            &path,
            &serde_json::to_vec_pretty(&m).expect("member serialises"),
        )
        .map_err(io)?;
        super::rundir::private_file(&path).map_err(io)?;
        match self.accommodate() {
            Ok(_) | Err(SharedError::Firewall(FirewallError::NftMissing)) => Ok(None),
            Err(e) => Ok(Some(format!(
                "lume could not yet put its accept for {bridge} in other tools' firewall chains ({}); its watcher retries every second — `lume network doctor` shows whether bridged frames pass",
                crate::error_chain(&e)
            ))),
        }
    }

    /// Removes a bridged VM's record (by [`member_id`]); lume's accept for
    /// its bridge goes with the last VM bridged onto it.
    pub fn leave_bridged(&self, id: &str) -> Result<(), SharedError> {
        let _guard = self.lock()?;
        self.remove_bridged(id)?;
        self.collect_locked();
        self.accommodate().map(|_| ())
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

    /// Removes dead members and takes down networks nobody uses; rewrites
    /// the firewall only when that changed something.
    fn collect_locked(&self) {
        if self.collect_records_locked() {
            let _ = self.apply_firewall();
        }
    }

    /// [`Self::collect_locked`] without the firewall: returns whether lume's
    /// firewall must be rewritten (something was removed, or nothing is left
    /// and a table or accepts may linger). A join rewrites it anyway once
    /// the VM is in, so it skips a rewrite here (four `nft` runs).
    fn collect_records_locked(&self) -> bool {
        let mut changed = false;
        for net in [&self.nat, &self.host] {
            for m in net.members() {
                if !m.alive() {
                    let _ = net.remove_member(&m.id());
                    changed = true;
                }
            }
            if net.members().is_empty() && net.dir.exists() {
                net.take_down();
                changed = true;
            }
        }
        for m in self.bridged_members() {
            if !m.alive() {
                let _ = self.remove_bridged(&m.id());
                changed = true;
            }
        }
        // With no member left anywhere, a table (or accepts in other tools'
        // chains) left by an interrupted teardown or a crash goes too.
        let idle = self.nat.members().is_empty() && self.host.members().is_empty();
        changed || idle
    }

    /// The firewall state every live member implies; `tools`: whether a
    /// chain lume accommodates exists (only then does its table mark packets).
    pub fn firewall_state(&self, tools: bool) -> FirewallState {
        let nat_members = self.nat.members();
        let host_members = self.host.members();
        let bridge_net = |n: &SharedNet| BridgeNet {
            bridge: n.bridge.clone(),
            subnet: n.subnet(),
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
            ports: nat_members
                .iter()
                .chain(&host_members)
                .map(|m| crate::firewall::GuestPort {
                    tap: m.tap.clone(),
                    mac: m.mac,
                    ip: m.ip,
                })
                .collect(),
            accommodate: self.accommodate && tools,
        }
    }

    /// The bridges other tools' firewalls must let through: none when
    /// accommodation is off; lume's NAT and host-only bridges while a VM is
    /// a member, and each Linux bridge a VM not provably dead is bridged onto.
    pub fn openings(&self) -> Vec<Opening> {
        if !self.accommodate {
            return Vec::new();
        }
        let mut out: Vec<Opening> = [&self.nat, &self.host]
            .into_iter()
            .filter(|n| !n.members().is_empty())
            .map(|n| Opening {
                bridge: n.bridge.clone(),
                nat: n.kind == Kind::Nat,
                gateway: n.subnet().gateway(),
                bridged: false,
            })
            .collect();
        let mut bridges: Vec<String> = self
            .bridged_members()
            .into_iter()
            .filter(BridgedMember::alive)
            .map(|m| m.bridge)
            .filter(|b| *b != self.nat.bridge && *b != self.host.bridge)
            .collect();
        bridges.sort();
        bridges.dedup();
        out.extend(bridges.iter().map(|b| Opening::bridged(b)));
        out
    }

    /// Puts lume's accepts in other tools' chains in order (removes them
    /// all when nothing needs them). A chain that vanishes between listing
    /// and writing (a firewall restarting) fails the transaction: it is
    /// listed and tried once more.
    pub fn accommodate(&self) -> Result<Accommodated, SharedError> {
        self.accommodate_from(None)
    }

    /// [`Self::accommodate`] planned from `rs` when given (a listing taken
    /// moments ago under the network lock; lume's own tables play no part
    /// in the plan), saving an `nft` run. A retry lists afresh.
    fn accommodate_from(&self, rs: Option<Ruleset>) -> Result<Accommodated, SharedError> {
        let openings = self.openings();
        let first = match rs {
            Some(rs) => Nft.accommodate_with(rs, &openings),
            None => Nft.accommodate(&openings),
        };
        match first {
            Err(FirewallError::Accommodation(_)) => Ok(Nft.accommodate(&openings)?),
            other => Ok(other?),
        }
    }

    /// Writes lume's table for the current members (removes it when none),
    /// puts lume's accepts in other tools' chains (removes them when none),
    /// and remembers how the firewall lists the table, to notice changes later.
    pub fn apply_firewall(&self) -> Result<(), SharedError> {
        self.write_firewall().map(|_| ())
    }

    /// [`Self::apply_firewall`], returning whether lume's table now marks
    /// packets for other tools' chains and what changed in those chains
    /// (for the watcher's log).
    fn write_firewall(&self) -> Result<(bool, Vec<String>), SharedError> {
        // One listing tells whether other tools' chains are there and
        // plans lume's accepts in them.
        let rs = crate::firewall::nft::ruleset()?;
        let tools = self.accommodate && rs.tools_present();
        self.write_firewall_from(tools, Some(rs))
    }

    /// Whether lume's table marked packets for other tools' chains when it
    /// was last written.
    fn marks(&self) -> bool {
        fs::read_to_string(self.root.join("foreign.marks")).is_ok_and(|v| v.trim() == "1")
    }

    /// [`Self::write_firewall`] with `tools`: whether Docker's, ufw's or
    /// firewalld's chains are there (known or assumed; a wrong assumption
    /// is corrected by the caller once it has listed the ruleset).
    fn write_firewall_with(&self, tools: bool) -> Result<(bool, Vec<String>), SharedError> {
        self.write_firewall_from(tools, None)
    }

    /// [`Self::write_firewall_with`], planning the accepts in other tools'
    /// chains from `rs` when given.
    fn write_firewall_from(
        &self,
        tools: bool,
        rs: Option<Ruleset>,
    ) -> Result<(bool, Vec<String>), SharedError> {
        let state = self.firewall_state(tools);
        let done = if state.is_empty() {
            // Accepts in other chains first: nothing of lume's outlives its table.
            let done = self.accommodate_from(rs)?;
            Nft.apply(&state)?;
            done
        } else {
            Nft.apply(&state)?;
            self.accommodate_from(rs)?
        };
        // Whether the table marks packets for other tools' chains: the
        // watcher rewrites it when such a tool appears or goes.
        let marks = self.root.join("foreign.marks");
        let _ = fs::write(&marks, if state.accommodate { "1" } else { "0" });
        let _ = super::rundir::private_file(&marks);
        let saved = self.root.join("nft.listing");
        match Nft.listing()? {
            Some(text) => {
                let _ = fs::write(&saved, text);
                let _ = super::rundir::private_file(&saved);
            }
            None => {
                let _ = fs::remove_file(&saved);
            }
        }
        Ok((state.accommodate, done.changes))
    }

    /// Keeps the logs that guests make grow (dnsmasq's) within their cap.
    pub fn cap_logs(&self) {
        for net in [&self.nat, &self.host] {
            net.dnsmasq().cap_log(super::dnsmasq::LOG_CAP);
        }
    }

    /// Puts everything lume's running NAT and host-only VMs need back in
    /// place: bridges, gateway addresses, tap membership, dnsmasq, IPv4
    /// forwarding and lume's firewall table. Returns what it repaired.
    /// The firewall is listed (an `nft` process) only when `check_firewall`
    /// is set: on nftables events and once a second.
    pub fn heal(&self, check_firewall: bool) -> Vec<String> {
        let path = self.root.join("network.lock");
        // Never wait long: a join or leave in progress is itself a repair.
        let Ok(Some(_guard)) = VmLock::acquire_within(&path, Duration::from_millis(200)) else {
            return Vec::new();
        };
        let mut repairs = Vec::new();
        let mut any = false;
        let mut collected = false;
        for net in [&self.nat, &self.host] {
            let (members, dead): (Vec<Member>, Vec<Member>) =
                net.members().into_iter().partition(Member::alive);
            // A supervisor that was killed cannot leave: collect its share now.
            for m in dead.iter().filter(|_| !members.is_empty()) {
                if net.remove_member(&m.id()).is_ok() {
                    collected = true;
                    repairs.push(format!(
                        "VM '{}' stopped without leaving {} (its supervisor died): removed its reservation and published ports",
                        m.vm, net.bridge
                    ));
                }
            }
            if members.is_empty() {
                continue;
            }
            any = true;
            if let Err(e) = net.heal(&members, &mut repairs) {
                repairs.push(format!(
                    "could not repair the {} network: {}",
                    net.bridge,
                    crate::error_chain(&e)
                ));
            }
        }
        let mut bridged = false;
        for m in self.bridged_members() {
            if m.alive() {
                bridged = true;
            } else if self.remove_bridged(&m.id()).is_ok() {
                collected = true;
                repairs.push(format!(
                    "VM '{}' bridged onto {} stopped without leaving (its supervisor died): removed its record",
                    m.vm, m.bridge
                ));
            }
        }
        if collected && let Err(e) = self.apply_firewall() {
            repairs.push(format!(
                "could not rewrite lume's firewall table: {}",
                crate::error_chain(&e)
            ));
        }
        if (any || bridged) && check_firewall {
            // After a flush (the usual case) lume's table is simply gone:
            // `nft list tables` says so in the same few milliseconds
            // whatever the size of the ruleset, and the table is written
            // back before anything is listed (the listing of a ruleset with
            // many VMs' rules takes tens of milliseconds). Whether other
            // tools' chains are there is taken from the last write, and
            // corrected below once the ruleset is listed.
            let gone = any && matches!(Nft.present(), Ok(false));
            let saved = fs::read_to_string(self.root.join("nft.listing")).ok();
            let listing = if gone { Ok(None) } else { Nft.listing() };
            match listing {
                Ok(current) if current.is_some() && current == saved => {}
                // Only bridged VMs run: lume's table is not needed.
                Ok(current) if !any && current == saved => {}
                Ok(current) => {
                    let what = if current.is_none() {
                        "missing"
                    } else {
                        "changed"
                    };
                    let written = if gone {
                        self.write_firewall_with(self.accommodate && self.marks())
                    } else {
                        self.write_firewall()
                    };
                    match written {
                        Ok((_, changes)) => {
                            repairs
                                .push(format!("nftables table inet lume was {what}: restored it"));
                            repairs.extend(changes);
                        }
                        Err(e) => repairs.push(format!(
                            "nftables table inet lume is {what} and could not be restored: {}",
                            crate::error_chain(&e)
                        )),
                    }
                }
                // Only bridged VMs run, on a host without nftables:
                // nothing to watch in the firewall.
                Err(FirewallError::NftMissing) if !any => {}
                Err(e) => repairs.push(format!("cannot list nftables: {e}")),
            }
            // Docker restarting, `ufw reload` or `firewall-cmd --reload`
            // rewrite their chains without lume's accepts.
            match self.accommodate() {
                Ok(done) => {
                    repairs.extend(done.changes);
                    let marks = self.marks();
                    if self.accommodate && done.tools != marks {
                        // The tools may change again while lume writes (a
                        // chain deleted, then another tool's table loaded):
                        // the log says what was written, not what was seen.
                        match self.write_firewall() {
                            Ok((now, changes)) => {
                                repairs.extend(changes);
                                if now != marks {
                                    repairs.push(if now {
                                        "Docker's, ufw's or firewalld's chains appeared: lume's table now marks replies and published ports for its accepts there"
                                    } else {
                                        "no Docker, ufw or firewalld chain is left: lume's table no longer marks packets"
                                    }.to_string());
                                }
                            }
                            Err(e) => repairs.push(format!(
                                "could not rewrite lume's firewall table: {}",
                                crate::error_chain(&e)
                            )),
                        }
                    }
                }
                Err(SharedError::Firewall(FirewallError::NftMissing)) if !any => {}
                Err(e) => repairs.push(format!(
                    "could not put lume's accepts back in other tools' chains: {}",
                    crate::error_chain(&e)
                )),
            }
        }
        repairs
    }

    /// The bridges of shared networks that have a live member.
    pub fn active_bridges(&self) -> Vec<&str> {
        [&self.nat, &self.host]
            .into_iter()
            .filter(|n| n.members().iter().any(Member::alive))
            .map(|n| n.bridge.as_str())
            .collect()
    }

    /// The active bridges whose traffic passes a hook of a table family:
    /// every active bridge talks to the host (input), only the NAT bridge's
    /// traffic is forwarded (lume itself drops host-only forwarding), and
    /// none over IPv6 (lume's networks are IPv4: no address, route or
    /// service of lume's is IPv6, so an `ip6` table never drops its traffic).
    pub fn bridges_for_hook(&self, family: &str, hook: &str) -> Vec<&str> {
        if family == "ip6" {
            return Vec::new();
        }
        let nat = &self.nat.bridge;
        self.active_bridges()
            .into_iter()
            .filter(|b| hook != "forward" || b == nat)
            .collect()
    }

    /// The shared networks with a live member.
    fn active(&self) -> Vec<&SharedNet> {
        [&self.nat, &self.host]
            .into_iter()
            .filter(|n| n.members().iter().any(Member::alive))
            .collect()
    }

    /// Routes that capture part of the subnet of an active shared network,
    /// each with the bridge whose subnet it captures.
    pub fn route_warnings(&self) -> Vec<RouteWarning> {
        let active = self.active();
        if active.is_empty() {
            return Vec::new();
        }
        let Ok(routes) = Netlink::open().and_then(|mut nl| nl.routes_v4()) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for net in &active {
            for r in conflicting_routes(&routes, &net.subnet(), &net.bridge) {
                out.push(RouteWarning {
                    bridge: net.bridge.clone(),
                    text: format!(
                        "route {} captures part of lume's {} subnet {}: replies to those guests leave through {} instead of {}; remove the route or move the subnet ({})",
                        describe_route(&r),
                        net.bridge,
                        net.subnet(),
                        r.oif_name.as_deref().unwrap_or("another device"),
                        net.bridge,
                        net.key()
                    ),
                });
            }
        }
        out
    }

    /// Conditions lume reports but does not override: routes that capture
    /// part of a lume subnet, and other tables that drop lume's traffic.
    pub fn warnings(&self) -> Vec<String> {
        let active = self.active();
        if active.is_empty() {
            return Vec::new();
        }
        let mut out: Vec<String> = self.route_warnings().into_iter().map(|w| w.text).collect();
        if let Ok(drops) = Nft.foreign_drops() {
            let list = active
                .iter()
                .map(|n| n.bridge.as_str())
                .collect::<Vec<_>>()
                .join(" and ");
            for d in drops {
                let bridges = self.bridges_for_hook(&d.family, &d.hook);
                if let Some(w) = drop_warning(&d, &bridges, &list, self.accommodate) {
                    out.push(w);
                }
                // Rules lume does not override, and chains it keeps out of.
                if !bridges.is_empty() {
                    let each = bridges.join(" and ");
                    for f in d.findings(&bridges, self.accommodate) {
                        if matches!(f.kind, FindingKind::Withheld { .. }) || f.fails() {
                            out.push(format!(
                                "table {} {} chain {} ({} hook): {}",
                                d.family,
                                d.table,
                                d.chain,
                                d.hook,
                                f.describe(&each)
                            ));
                        }
                    }
                }
            }
        }
        out
    }
}

/// A route that captures part of an active lume subnet: the bridge whose
/// subnet it is, and the warning for a person.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteWarning {
    pub bridge: String,
    pub text: String,
}

/// The watcher's warning about another table's drop of traffic of
/// `bridges` (the active ones at its hook; `list`: every active bridge),
/// if it drops any: a known tool's policy names the tool and the setting.
fn drop_warning(
    d: &ForeignDrop,
    bridges: &[&str],
    list: &str,
    accommodate: bool,
) -> Option<String> {
    if bridges.is_empty() || !d.affects(bridges) || d.accommodated_for(bridges).is_some() {
        return None;
    }
    let withheld = accommodate
        && d.findings(bridges, accommodate)
            .iter()
            .any(|f| matches!(f.kind, FindingKind::Withheld { .. }));
    match &d.tool_chain {
        // The user accepts lume's bridges in the tool's chain.
        Some(_) if d.user_accepted_for(bridges).is_some() => None,
        Some(chain) if withheld => Some(format!(
            "{d}: another tool's policy ({chain} …) drops traffic of lume's VMs, and lume keeps its accepts out of those chains: a rule after them that is no tool's own drops some of that traffic, and lume's accepts would bypass it"
        )),
        Some(chain) if !accommodate => Some(format!(
            "{d}: another tool's policy ({chain}) drops traffic of lume's VMs, and firewallAccommodation is false in config.yaml, so lume leaves that chain alone — accept {list} there yourself (docs/networking.md gives the rules), or set firewallAccommodation: true"
        )),
        Some(chain) => Some(format!(
            "{d}: another tool's policy ({chain}) drops traffic of lume's VMs while lume's accepts are missing there; lume puts them back"
        )),
        None => Some(format!(
            "{d}: it may drop traffic of lume's VMs (a VPN kill switch or another firewall); lume does not bypass it — allow {list} there, or use --network user (passt: the guest's traffic leaves as the host's own, through the VPN)"
        )),
    }
}

/// The log line for a changed `firewallAccommodation`.
fn accommodation_note(on: bool, file: &Path) -> String {
    if on {
        format!(
            "firewallAccommodation changed to true in {}: lume puts its accepts in Docker's, ufw's and firewalld's chains for every running VM",
            file.display()
        )
    } else {
        format!(
            "firewallAccommodation changed to false in {}: lume removed its accepts from Docker's, ufw's and firewalld's chains and leaves them alone for every running VM",
            file.display()
        )
    }
}

/// Routes on devices other than `bridge` that claim part of `subnet`.
/// Catch-all routes (prefix below /8, such as a VPN's 0/1 and 128/1) do not
/// count: the bridge's own, more specific route wins over them.
pub fn conflicting_routes(routes: &[RouteV4], subnet: &Subnet, bridge: &str) -> Vec<RouteV4> {
    routes
        .iter()
        .filter(|r| r.prefix >= 8 && r.oif_name.as_deref() != Some(bridge))
        .filter(|r| {
            subnet.overlaps(&Subnet {
                network: r.dst,
                prefix: r.prefix,
            })
        })
        .cloned()
        .collect()
}

/// `203.0.113.0/25 dev tun0`
pub fn describe_route(r: &RouteV4) -> String {
    let mut s = format!("{}/{}", r.dst, r.prefix);
    if let Some(gw) = r.gateway {
        s.push_str(&format!(" via {gw}"));
    }
    if let Some(dev) = &r.oif_name {
        s.push_str(&format!(" dev {dev}"));
    }
    s
}

/// The configured subnet unless a host route collides with it. A collision
/// with a subnet the user chose is an error naming the route; with the
/// default, the next free /24 is taken and the returned note says so.
pub fn pick_subnet(
    net: &SharedNet,
    routes: &[RouteV4],
    avoid: &Subnet,
) -> Result<(Subnet, Option<String>), SharedError> {
    let clash = conflicting_routes(routes, &net.configured, &net.bridge);
    if clash.is_empty() {
        return Ok((net.configured, None));
    }
    let names = clash
        .iter()
        .map(describe_route)
        .collect::<Vec<_>>()
        .join(", ");
    if net.explicit {
        return Err(SharedError::RouteConflict {
            key: net.key(),
            subnet: net.configured,
            routes: names,
        });
    }
    let base = u32::from(net.configured.network);
    for step in 1..=255u32 {
        let candidate = Subnet {
            network: Ipv4Addr::from(base.wrapping_add(step << 8) & 0xffff_ff00),
            prefix: 24,
        };
        if candidate.overlaps(avoid)
            || !conflicting_routes(routes, &candidate, &net.bridge).is_empty()
        {
            continue;
        }
        let note = format!(
            "{} {} collides with the host route {names}; using {candidate} instead",
            net.key(),
            net.configured
        );
        return Ok((candidate, Some(note)));
    }
    Err(SharedError::NoFreeSubnet(net.bridge.clone()))
}

impl SharedNet {
    /// The subnet in use: the one recorded when the network came up, else
    /// the configured one.
    pub fn subnet(&self) -> Subnet {
        fs::read_to_string(self.dir.join("subnet"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(self.configured)
    }

    fn bridge_key(&self) -> &'static str {
        match self.kind {
            Kind::Nat => "natBridge",
            Kind::Host => "hostBridge",
        }
    }

    fn key(&self) -> &'static str {
        match self.kind {
            Kind::Nat => "natSubnet",
            Kind::Host => "hostSubnet",
        }
    }

    /// Chooses the subnet as the network comes up (see [`pick_subnet`]).
    fn resolve_subnet(&self, avoid: &Subnet) -> Result<(Subnet, Option<String>), SharedError> {
        let routes = Netlink::open()?.routes_v4()?;
        pick_subnet(self, &routes, avoid)
    }

    fn members_dir(&self) -> PathBuf {
        self.dir.join("members")
    }

    pub fn dnsmasq(&self) -> Dnsmasq {
        Dnsmasq {
            dir: self.dir.clone(),
            bridge: self.bridge.clone(),
            subnet: self.subnet(),
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
        super::rundir::private_dir(&dir, &dir).map_err(io)?;
        let path = dir.join(format!("{}.json", m.id()));
        crate::util::atomic::write_atomic(
            &path,
            &serde_json::to_vec_pretty(m).expect("member serialises"),
        )
        .map_err(io)?;
        super::rundir::private_file(&path).map_err(io)
    }

    fn remove_member(&self, id: &str) -> Result<(), SharedError> {
        self.dnsmasq().release(id);
        match fs::remove_file(self.members_dir().join(format!("{id}.json"))) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(SharedError::Runtime {
                path: self.members_dir(),
                source,
            }),
        }
    }

    /// Repairs this network for its live members.
    fn heal(&self, members: &[Member], repairs: &mut Vec<String>) -> Result<(), SharedError> {
        let mut nl = Netlink::open()?;
        let subnet = self.subnet();
        match nl.link_info(&self.bridge)? {
            None => {
                self.bring_up()?;
                repairs.push(format!(
                    "bridge {} was missing: recreated it with {}/{}",
                    self.bridge,
                    subnet.gateway(),
                    subnet.prefix
                ));
            }
            Some(info) if !info.up => {
                nl.set_up(&self.bridge)?;
                repairs.push(format!("bridge {} was down: set it up", self.bridge));
            }
            Some(_) => {}
        }
        if sysctl::ipv6_off(&self.bridge) {
            repairs.push(format!(
                "bridge {} had IPv6 switched on: switched it off",
                self.bridge
            ));
        }
        let gw = (subnet.gateway(), subnet.prefix);
        if !nl.addresses_v4(&self.bridge)?.contains(&gw) {
            nl.add_address_v4(&self.bridge, gw.0, gw.1)?;
            repairs.push(format!(
                "bridge {} had lost its address {}/{}: restored it",
                self.bridge, gw.0, gw.1
            ));
        }
        let index = nl.link_index(&self.bridge)?;
        for m in members {
            if let Some(tap) = nl.link_info(&m.tap)? {
                if tap.master != index {
                    nl.set_master(&m.tap, &self.bridge)?;
                    repairs.push(format!(
                        "tap {} of VM '{}' had left {}: put it back",
                        m.tap, m.vm, self.bridge
                    ));
                }
                if !tap.up {
                    nl.set_up(&m.tap)?;
                    repairs.push(format!(
                        "tap {} of VM '{}' was down: set it up",
                        m.tap, m.vm
                    ));
                }
            }
        }
        let dns = self.dnsmasq();
        if dns.pid().is_none() {
            for m in members {
                dns.reserve(&m.id(), &m.mac.to_string(), m.ip)?;
            }
            dns.ensure_running()?;
            repairs.push(format!(
                "dnsmasq for {} was not running: restarted it with its leases",
                self.bridge
            ));
        }
        if self.kind == Kind::Nat && sysctl::forwarding_off() {
            sysctl::forwarding_set_on().map_err(SharedError::Forwarding)?;
            repairs.push("IPv4 forwarding had been switched off: switched it back on".into());
        }
        if let Some(servers) = self.dnsmasq().follow()? {
            repairs.push(format!(
                "the host's DNS servers changed: dnsmasq for {} now forwards to {}",
                self.bridge,
                servers.join(", ")
            ));
        }
        Ok(())
    }

    /// The lowest free address from .2 up (the VM's own earlier record is reused).
    /// The address for member `id` with `mac`: not another running VM's,
    /// and not one dnsmasq still leases to another MAC at `now` (a VM
    /// stopped or deleted within the lease time: dnsmasq would not give the
    /// address to anyone else and would hand the new VM one outside its
    /// reservation, which a network policy's source check then drops).
    /// The address dnsmasq leases to this MAC comes first (a restart keeps
    /// its address); when every free address is leased to others, the
    /// lowest free one.
    fn allocate(
        &self,
        members: &[Member],
        id: &str,
        mac: MacAddress,
        leases: &[super::dnsmasq::Lease],
        now: u64,
    ) -> Result<Ipv4Addr, SharedError> {
        let used: Vec<Ipv4Addr> = members
            .iter()
            .filter(|m| m.id() != id)
            .map(|m| m.ip)
            .collect();
        let mac = mac.to_string().to_ascii_lowercase();
        let live: Vec<&super::dnsmasq::Lease> = leases
            .iter()
            .filter(|l| l.expires == 0 || l.expires > now)
            .collect();
        let free: Vec<Ipv4Addr> = (2..2 + self.subnet().guest_capacity())
            .map(|n| self.subnet().host(n))
            .filter(|ip| !used.contains(ip))
            .collect();
        let own = live
            .iter()
            .filter(|l| l.mac == mac)
            .map(|l| l.ip)
            .find(|ip| free.contains(ip));
        let unleased = || {
            free.iter()
                .copied()
                .find(|ip| !live.iter().any(|l| l.ip == *ip && l.mac != mac))
        };
        own.or_else(unleased)
            .or_else(|| free.first().copied())
            .ok_or_else(|| SharedError::Full {
                bridge: self.bridge.clone(),
                subnet: self.subnet(),
                capacity: self.subnet().guest_capacity(),
            })
    }

    /// The bridge with its gateway address, up; forwarding on for NAT.
    pub fn bring_up(&self) -> Result<(), SharedError> {
        self.bring_up_adopting(false)
    }

    /// [`Self::bring_up`]; with `running`, an unmarked bridge of this name is
    /// the one an earlier release of lume created for the VMs still running
    /// on it: it gets the mark instead of being refused (an upgrade keeps
    /// running VMs' network).
    fn bring_up_adopting(&self, running: bool) -> Result<(), SharedError> {
        fs::create_dir_all(&self.dir)
            .and_then(|()| super::rundir::private_dir(&self.dir, &self.dir))
            .map_err(|source| SharedError::Runtime {
                path: self.dir.clone(),
                source,
            })?;
        let mut nl = Netlink::open()?;
        match nl.link_info(&self.bridge)? {
            None => {
                nl.create_bridge(&self.bridge)?;
                if let Err(e) = nl.set_alias(&self.bridge, BRIDGE_MARK) {
                    let _ = nl.delete_link(&self.bridge);
                    return Err(e.into());
                }
            }
            Some(link) if is_lume_bridge(&link) => {}
            Some(link) if running && link.kind.as_deref() == Some("bridge") => {
                nl.set_alias(&self.bridge, BRIDGE_MARK)?;
            }
            Some(_) => {
                return Err(SharedError::ForeignBridge {
                    key: self.bridge_key(),
                    bridge: self.bridge.clone(),
                });
            }
        }
        nl.add_address_v4(&self.bridge, self.subnet().gateway(), self.subnet().prefix)?;
        sysctl::ipv6_off(&self.bridge);
        nl.set_up(&self.bridge)?;
        if self.kind == Kind::Nat {
            sysctl::forwarding_on(&self.dir).map_err(SharedError::Forwarding)?;
        }
        Ok(())
    }

    /// Removes the bridge and dnsmasq; restores forwarding. Best effort.
    pub fn take_down(&self) {
        self.dnsmasq().stop();
        // Only a bridge lume created (marked) is deleted.
        if let Ok(mut nl) = Netlink::open()
            && let Ok(Some(link)) = nl.link_info(&self.bridge)
            && is_lume_bridge(&link)
        {
            let _ = nl.delete_link(&self.bridge);
        }
        if self.kind == Kind::Nat {
            sysctl::forwarding_restore(&self.dir);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A bridge lume created: kind bridge, marked with [`BRIDGE_MARK`].
pub fn is_lume_bridge(link: &super::kernel::netlink::LinkInfo) -> bool {
    link.kind.as_deref() == Some("bridge") && link.alias.as_deref() == Some(BRIDGE_MARK)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A VM stopped or deleted within dnsmasq's lease time keeps its
    /// address leased to its MAC: a new VM must not be given it (dnsmasq
    /// would hand that VM another address than its reservation).
    #[test]
    fn addresses_leased_to_other_macs_are_not_given_out() {
        let dir = tempfile::tempdir().unwrap();
        let nets =
            Networks::from_settings(&Settings::load_from(&dir.path().join("config.yaml")).unwrap())
                .unwrap();
        let net = nets.get(Kind::Nat);
        let s = net.subnet();
        let me: MacAddress = "52:54:00:00:00:01".parse().unwrap();
        let lease = |ip, mac: &str, expires| super::super::dnsmasq::Lease {
            expires,
            mac: mac.into(),
            ip,
        };
        assert_eq!(net.allocate(&[], "a", me, &[], 100).unwrap(), s.host(2));
        let other = [lease(s.host(2), "52:54:00:00:00:02", 200)];
        assert_eq!(net.allocate(&[], "a", me, &other, 100).unwrap(), s.host(3));
        assert_eq!(
            net.allocate(&[], "a", me, &other, 300).unwrap(),
            s.host(2),
            "an expired lease holds nothing"
        );
        let mine = [lease(s.host(5), "52:54:00:00:00:01", 200)];
        assert_eq!(
            net.allocate(&[], "a", me, &mine, 100).unwrap(),
            s.host(5),
            "a restart keeps the address dnsmasq leases to the VM"
        );
    }

    #[test]
    fn a_known_tool_s_drop_is_named_with_the_setting() {
        let mut d = ForeignDrop::docker_forward_policy(Vec::new());
        let w = drop_warning(&d, &["lume0"], "lume0", false).unwrap();
        assert!(
            w.contains("Docker's chain ip filter DOCKER-USER")
                && w.contains("firewallAccommodation is false")
                && !w.contains("kill switch"),
            "{w}"
        );
        assert!(drop_warning(&d, &[], "lume0", false).is_none());
        d.user_accepts = vec![(
            "Docker's chain ip filter DOCKER-USER".into(),
            "lume0".into(),
        )];
        assert!(
            drop_warning(&d, &["lume0"], "lume0", false).is_none(),
            "the user's own accepts"
        );
        d.tool_chain = None;
        let w = drop_warning(&d, &["lume0"], "lume0", false).unwrap();
        assert!(w.contains("a VPN kill switch or another firewall"), "{w}");
    }

    #[test]
    fn the_watcher_sees_firewall_accommodation_change_in_config_yaml() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.yaml");
        let mut nets = Networks::from_settings(&Settings::load_from(&file).unwrap()).unwrap();
        assert!(nets.accommodate, "on by default");
        assert_eq!(nets.accommodation_changed(), None);
        std::fs::write(
            &file,
            "natSubnet: 10.9.0.0/24\nfirewallAccommodation: false\n",
        )
        .unwrap();
        assert_eq!(nets.accommodation_changed(), Some(false));
        nets.accommodate = false;
        assert_eq!(nets.accommodation_changed(), None);
        // `lume config set` writes the string form too; removing the key means true.
        std::fs::write(&file, "firewallAccommodation: 'true'\n").unwrap();
        assert_eq!(nets.accommodation_changed(), Some(true));
        std::fs::write(&file, "{}\n").unwrap();
        assert_eq!(nets.accommodation_changed(), Some(true));
        // An unreadable file changes nothing.
        std::fs::write(&file, "firewallAccommodation: [\n").unwrap();
        assert_eq!(nets.accommodation_changed(), None);
        let note = accommodation_note(false, &file);
        assert!(
            note.starts_with("firewallAccommodation changed to false in ")
                && note.contains("removed its accepts"),
            "{note}"
        );
        assert!(!note.contains("appeared"));
    }

    fn route(dst: &str, prefix: u8, dev: &str) -> RouteV4 {
        RouteV4 {
            dst: dst.parse().unwrap(),
            prefix,
            oif: Some(7),
            oif_name: Some(dev.into()),
            gateway: None,
            table: 254,
            metric: None,
        }
    }

    fn net(subnet: &str, explicit: bool) -> SharedNet {
        SharedNet {
            kind: Kind::Nat,
            bridge: "lume0".into(),
            configured: subnet.parse().unwrap(),
            explicit,
            dir: "/nonexistent".into(),
        }
    }

    #[test]
    fn catch_all_and_own_routes_do_not_conflict() {
        let routes = [
            route("0.0.0.0", 1, "tun0"),
            route("128.0.0.0", 1, "tun0"),
            route("203.0.113.0", 24, "lume0"),
            route("198.51.100.0", 24, "eth0"),
        ];
        let s: Subnet = "203.0.113.0/24".parse().unwrap();
        assert!(conflicting_routes(&routes, &s, "lume0").is_empty());
        let captured = [route("203.0.113.0", 25, "tun0")];
        let c = conflicting_routes(&captured, &s, "lume0");
        assert_eq!(describe_route(&c[0]), "203.0.113.0/25 dev tun0");
    }

    #[test]
    fn a_chosen_subnet_that_collides_is_refused_naming_the_route() {
        let routes = [route("203.0.113.0", 24, "eth1")];
        let avoid: Subnet = "192.0.2.0/24".parse().unwrap();
        let e = pick_subnet(&net("203.0.113.0/24", true), &routes, &avoid).unwrap_err();
        assert!(
            e.to_string().contains(
                "natSubnet 203.0.113.0/24 collides with the host route 203.0.113.0/24 dev eth1"
            ),
            "{e}"
        );
    }

    #[test]
    fn a_default_subnet_that_collides_moves_to_the_next_free_24() {
        // The default's next /24 is taken by the host-only subnet, the one
        // after by a LAN route: the third is free.
        let routes = [
            route("192.168.64.0", 24, "eth0"),
            route("192.168.66.0", 23, "wlan0"),
        ];
        let avoid: Subnet = "192.168.65.0/24".parse().unwrap();
        let (s, note) = pick_subnet(&net("192.168.64.0/24", false), &routes, &avoid).unwrap();
        assert_eq!(s.to_string(), "192.168.68.0/24");
        let note = note.unwrap();
        assert!(
            note.contains("192.168.64.0/24 dev eth0") && note.contains("using 192.168.68.0/24"),
            "{note}"
        );
        let (s, note) = pick_subnet(&net("192.168.64.0/24", false), &[], &avoid).unwrap();
        assert_eq!((s.to_string(), note), ("192.168.64.0/24".to_string(), None));
    }
}
