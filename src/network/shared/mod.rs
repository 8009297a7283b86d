//! The lume-managed bridges that NAT and host-only VMs share: `lume0`
//! (masquerade and forwarding) and `lume-host0` (neither). The first VM to
//! join brings a bridge, its dnsmasq and lume's firewall table up; the last to
//! leave takes them down. Membership is a record per VM in the runtime
//! directory; a record is alive while its VM's lock is held, so records of a
//! killed supervisor are recognised and collected by the next lume command.
//! One mutex file serialises every change in a network namespace.
//!
//! One job per file: `settings` (config.yaml keys), `members` (the
//! membership store), `join` (joining, leaving, addresses, collection),
//! `subnet_choice`, `bridge` (bringing it up and down), `firewall` (the
//! state the members imply, written), `heal` (repairs), `warnings`.
//! The sysctls are in [`super::kernel::sysctl`].

use std::fs;
use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::dnsmasq::{Dnsmasq, DnsmasqError};
use super::kernel::netlink::{Netlink, NetlinkError, RouteV4};
use super::kernel::sysctl;
use super::prefix6::Prefix6;
use super::publish::PortMapping;
use super::subnet::{BadSubnet, Subnet};
use crate::firewall::foreign::{FindingKind, Ruleset};
use crate::firewall::nft::Nft;
use crate::firewall::{
    Accommodated, BridgeNet, CheckedRuleset, Dnat, FirewallDriver, FirewallError, FirewallState,
    ForeignDrop, Opening, RulesetGeneration,
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
    #[error(
        "Cannot switch IPv4 forwarding: NAT needs to write /proc/sys/net/ipv4/ip_forward (read-only in some containers); use --network user there"
    )]
    Forwarding(#[source] std::io::Error),
    #[error(
        "Cannot switch IPv6 forwarding: give the network no IPv6 (lume config set {key} none), or, where /proc/sys is read-only (some containers), use --network user"
    )]
    Forwarding6 {
        key: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "Cannot switch IPv6 on for bridge {bridge}: give the network no IPv6 (lume config set {key} none), or, where /proc/sys is read-only (some containers), use --network user"
    )]
    Bridge6 {
        key: &'static str,
        bridge: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Invalid {key} in config.yaml")]
    Prefix6 {
        key: &'static str,
        #[source]
        source: super::prefix6::BadPrefix6,
    },
    #[error(
        "natSubnet6 and hostSubnet6 are the same /64 ({0}): give them distinct prefixes in config.yaml"
    )]
    Overlap6(Prefix6),
    #[error(
        "{key} {prefix} is already used on the host's interface {interface} (address {address}): choose another /64 for {key} in config.yaml (lume config set {key} <prefix>), or none for no IPv6"
    )]
    Prefix6Conflict {
        key: &'static str,
        prefix: Prefix6,
        interface: String,
        address: std::net::Ipv6Addr,
    },
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

mod bridge;
mod firewall;
mod heal;
mod join;
mod members;
mod settings;
mod subnet_choice;
mod warnings;

pub use bridge::{BRIDGE_MARK, is_lume_bridge};
pub use join::{BridgedTeardown, JoinRequest, SharedTeardown};
pub use members::{BridgedMember, Liveness, Member, liveness_of, member_id};
pub use subnet_choice::{conflicting_routes, describe_route, pick_subnet};
pub use warnings::{DropWarning, RouteWarning, Warning};

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
    /// The IPv6 /64 config.yaml asks for (`natSubnet6`, `hostSubnet6`; a
    /// unique local prefix of this machine by default), `None` for `none`
    /// or a kernel without IPv6. While the network is up, the one in use is
    /// in `<dir>/subnet6`: see [`SharedNet::prefix6`].
    pub configured6: Option<Prefix6>,
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
    /// The firewall lume's table and accepts are written to: nftables
    /// ([`Nft`]) unless given another ([`Networks::with_firewall`]).
    pub firewall: std::sync::Arc<dyn FirewallDriver>,
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

impl Networks {
    /// These networks writing to `firewall` instead of nftables.
    pub fn with_firewall(mut self, firewall: std::sync::Arc<dyn FirewallDriver>) -> Self {
        self.firewall = firewall;
        self
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
    pub(super) fn lock(&self) -> Result<VmLock, SharedError> {
        super::rundir::private_dir(self.base(), &self.root).map_err(|source| {
            SharedError::Runtime {
                path: self.root.clone(),
                source,
            }
        })?;
        let path = self.root.join("network.lock");
        // Held for milliseconds at a time (a join's records, a table
        // write): polled often, so VMs starting together queue tightly.
        VmLock::acquire_polling(&path, Duration::from_secs(30), Duration::from_millis(2))
            .map_err(|source| SharedError::Runtime {
                path: path.clone(),
                source,
            })?
            .ok_or(SharedError::Busy(path))
    }
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

    /// The IPv6 /64 in use: the one recorded when the network came up
    /// (`none` recorded: no IPv6), else the configured one.
    pub fn prefix6(&self) -> Option<Prefix6> {
        match fs::read_to_string(self.dir.join("subnet6")) {
            Ok(s) => s.trim().parse().ok(),
            // Up, from a release before IPv6: none until it comes up again.
            Err(_) if self.dir.join("subnet").exists() => None,
            Err(_) => self.configured6,
        }
    }

    pub fn dnsmasq(&self) -> Dnsmasq {
        self.dnsmasq_for(self.subnet(), self.prefix6())
    }

    /// [`Self::dnsmasq`] for the subnet and /64 the caller has read.
    pub(super) fn dnsmasq_for(&self, subnet: Subnet, prefix6: Option<Prefix6>) -> Dnsmasq {
        Dnsmasq {
            dir: self.dir.clone(),
            bridge: self.bridge.clone(),
            subnet,
            prefix6,
            route: self.kind == Kind::Nat,
        }
    }
}

#[cfg(test)]
impl Networks {
    /// Networks whose runtime directory is `root` (a temporary directory),
    /// with the default settings, writing to `firewall`.
    pub fn in_dir(root: &Path, firewall: std::sync::Arc<dyn FirewallDriver>) -> Self {
        let settings = Settings::load_from(&root.join("config.yaml")).unwrap();
        let mut nets = Self::from_settings(&settings)
            .unwrap()
            .with_firewall(firewall);
        nets.root = root.to_path_buf();
        nets.nat.dir = root.join("nat");
        nets.host.dir = root.join("host");
        nets
    }

    /// Records `member` on the `kind` network, as a join does.
    pub fn add_member(&self, kind: Kind, member: &Member) {
        self.get(kind).write_member(member).unwrap();
    }

    /// A member on the NAT network publishing host port 8022 to 22.
    pub fn test_member(vm_dir: &Path) -> Member {
        Member {
            vm: "v".into(),
            vm_dir: vm_dir.to_path_buf(),
            mac: "52:54:00:12:34:56".parse().unwrap(),
            ip: "192.168.64.2".parse().unwrap(),
            tap: "ltv".into(),
            publish: vec!["8022:22".parse().unwrap()],
            no_ipv6: false,
        }
    }
}
