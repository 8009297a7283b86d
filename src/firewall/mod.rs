//! Firewall rules lume needs, as one desired state applied in one batch.
//! Every rule lives in lume's own table, so applying is idempotent and a
//! flush by somebody else is repaired by applying the same state again.

pub mod nft;

use std::net::Ipv4Addr;

use crate::network::publish::Proto;
use crate::network::subnet::Subnet;

/// A lume bridge and its subnet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeNet {
    pub bridge: String,
    pub subnet: Subnet,
}

/// One published port of a NAT VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dnat {
    pub host_ip: Option<Ipv4Addr>,
    pub host_port: u16,
    pub proto: Proto,
    pub guest: Ipv4Addr,
    pub guest_port: u16,
}

/// A guest's port on a lume bridge and what the guest may send from it:
/// its own MAC address, and IPv4/ARP only from the address lume reserved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestPort {
    /// The tap in the bridge.
    pub tap: String,
    pub mac: crate::vm::config::MacAddress,
    pub ip: Ipv4Addr,
}

/// Everything lume's table should contain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FirewallState {
    /// The NAT bridge: forwarding and masquerade.
    pub nat: Option<BridgeNet>,
    /// The host-only bridge: no forwarding at all.
    pub host: Option<BridgeNet>,
    /// Published ports of NAT VMs.
    pub dnat: Vec<Dnat>,
    /// Every guest on lume's bridges, held to its own addresses.
    pub ports: Vec<GuestPort>,
}

impl FirewallState {
    pub fn is_empty(&self) -> bool {
        self.nat.is_none() && self.host.is_none() && self.dnat.is_empty() && self.ports.is_empty()
    }
}

/// Why the firewall could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error(
        "The nft command was not found: install the nftables package (apt-get install nftables)"
    )]
    NftMissing,
    #[error("nft refused lume's rules: {0}")]
    Rejected(String),
    #[error("Cannot run nft")]
    Io(#[source] std::io::Error),
}

/// A firewall backend.
pub trait FirewallDriver {
    /// Replaces lume's rules with `state`, atomically.
    fn apply(&self, state: &FirewallState) -> Result<(), FirewallError>;
    /// Removes every lume rule; a missing table is not an error.
    fn remove(&self) -> Result<(), FirewallError>;
    /// Whether lume's table exists.
    fn present(&self) -> Result<bool, FirewallError>;
    /// The table as the firewall lists it now; `None` when it is missing.
    fn listing(&self) -> Result<Option<String>, FirewallError>;
    /// Base chains of other tables that may drop traffic lume forwards or
    /// serves (a VPN kill switch, Docker's FORWARD DROP).
    fn foreign_drops(&self) -> Result<Vec<ForeignDrop>, FirewallError>;
}

/// A chain outside lume's table that drops forwarded or input traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignDrop {
    pub family: String,
    pub table: String,
    pub chain: String,
    pub hook: String,
    /// `policy drop`, or the rule that drops.
    pub how: String,
    /// Interface names the chain's rules match on (an accept for a lume
    /// bridge before the drop means the chain lets lume's traffic through).
    pub interfaces: Vec<String>,
}

impl ForeignDrop {
    /// Whether this chain would drop traffic of `bridges` (it does not when
    /// its rules name one of them).
    pub fn affects(&self, bridges: &[&str]) -> bool {
        !bridges
            .iter()
            .any(|b| self.interfaces.iter().any(|i| i == b))
    }
}

impl std::fmt::Display for ForeignDrop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "table {} {} chain {} ({} hook): {}",
            self.family, self.table, self.chain, self.hook, self.how
        )
    }
}
