//! Firewall rules lume needs, as one desired state applied in one batch.
//! Every rule lives in lume's own table, so applying is idempotent and a
//! flush by somebody else is repaired by applying the same state again —
//! except the few narrow accepts lume puts in the chains Docker, ufw and
//! firewalld keep for other software (see [`foreign`]), which are found by
//! their comment and put back the same way.

#[cfg(test)]
pub mod fake;
pub mod foreign;
pub mod libnft;
pub mod nft;

pub use foreign::{Accommodated, ForeignDrop, Opening};

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, Ipv6Addr};

use crate::network::prefix6::Prefix6;

use crate::network::publish::Proto;
use crate::network::subnet::Subnet;

/// A lume bridge and its subnet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeNet {
    pub bridge: String,
    pub subnet: Subnet,
    /// Its IPv6 /64, if it has IPv6.
    pub prefix6: Option<Prefix6>,
}

/// One published port of a NAT VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dnat {
    pub host_ip: Option<Ipv4Addr>,
    pub host_port: u16,
    pub proto: Proto,
    pub guest: Ipv4Addr,
    /// The guest's IPv6 address (its network has IPv6): the port is
    /// published on the host's IPv6 addresses too, unless `host_ip` names
    /// one IPv4 address.
    pub guest6: Option<Ipv6Addr>,
    pub guest_port: u16,
}

/// A guest's port on a lume bridge and what the guest may send from it:
/// its own MAC address, IPv4/ARP only from the address lume reserved, and
/// IPv6 (where its network has it) only from its network's /64 or a
/// link-local address, never from another guest's reserved address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestPort {
    /// The tap in the bridge.
    pub tap: String,
    pub mac: crate::vm::config::MacAddress,
    pub ip: Ipv4Addr,
    /// Its network's IPv6 /64, which its IPv6 sources must be in; `None`:
    /// no IPv6 from it.
    pub prefix6: Option<Prefix6>,
}

impl GuestPort {
    /// The IPv6 address lume reserved for it: its EUI-64 one in the /64.
    pub fn ip6(&self) -> Option<Ipv6Addr> {
        self.prefix6.map(|p| p.eui64(self.mac))
    }
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
    /// Whether lume accommodates other tools' firewalls and one is present:
    /// its table then marks replies and DNAT'd traffic into the NAT bridge
    /// with [`foreign::MARK`] for the accepts it puts in their chains.
    pub accommodate: bool,
}

impl FirewallState {
    pub fn is_empty(&self) -> bool {
        self.nat.is_none() && self.host.is_none() && self.dnat.is_empty() && self.ports.is_empty()
    }
}

/// lume's tables as a write leaves them, in the firewall's own words: the
/// tables with their chains and empty sets and maps (the skeleton), the
/// elements of each set and map, and each guest port's own chain and set.
/// Two states whose skeletons are the same are changed one into the other
/// by adding and deleting elements and port chains: a VM's start or stop
/// then writes its own few elements instead of both tables.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Tables {
    pub skeleton: String,
    /// By `FAMILY SET` (`bridge taps`): the elements as the firewall
    /// writes them (`KEY : VALUE` in a map). No entry for an empty set.
    pub elements: BTreeMap<String, BTreeSet<String>>,
    /// By tap: what defines the port's own chain and set.
    pub ports: BTreeMap<String, String>,
}

impl Tables {
    /// Adds `items` to the set or map `key` (`FAMILY SET`).
    pub fn add(&mut self, key: &str, items: Vec<String>) {
        if !items.is_empty() {
            self.elements
                .entry(key.to_string())
                .or_default()
                .extend(items);
        }
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
    #[error(
        "Cannot put lume's accepts in other tools' firewall chains (nft said: {0}); lume retries within a second, or set firewallAccommodation: false in config.yaml to leave those chains alone"
    )]
    Accommodation(String),
    #[error("Cannot run nft")]
    Io(#[source] std::io::Error),
    #[error(transparent)]
    Library(#[from] libnft::LibnftError),
}

/// Which ruleset, as of which change: the network namespace's identity
/// (a number never reused while the system runs) and the kernel's
/// nftables generation there, which moves on with every committed change.
/// Written as `NAMESPACE:GENERATION`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RulesetGeneration {
    pub namespace: u64,
    pub number: u32,
}

impl std::fmt::Display for RulesetGeneration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.namespace, self.number)
    }
}

impl std::str::FromStr for RulesetGeneration {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        let (namespace, number) = s.split_once(':').ok_or(())?;
        Ok(RulesetGeneration {
            namespace: namespace.parse().map_err(drop)?,
            number: number.parse().map_err(drop)?,
        })
    }
}

/// A ruleset generation at which a full check found everything lume needs
/// in place, and whether another tool's chain (Docker's, ufw's,
/// firewalld's) existed then. Written as `NAMESPACE:GENERATION 0|1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckedRuleset {
    pub generation: RulesetGeneration,
    pub tools: bool,
}

impl std::fmt::Display for CheckedRuleset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.generation, u8::from(self.tools))
    }
}

impl std::str::FromStr for CheckedRuleset {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        let (generation, tools) = s.trim().split_once(' ').ok_or(())?;
        Ok(CheckedRuleset {
            generation: generation.parse()?,
            tools: match tools {
                "0" => false,
                "1" => true,
                _ => return Err(()),
            },
        })
    }
}

/// A firewall backend. lume's networks ([`crate::network::shared::Networks`])
/// and the doctor are given one as a trait object: nft in lume, a fake in
/// the unit tests of what they do around it.
pub trait FirewallDriver: std::fmt::Debug + Send + Sync {
    /// Replaces lume's rules with `state`, atomically, in one transaction;
    /// returns the tables it wrote.
    fn apply(&self, state: &FirewallState) -> Result<Tables, FirewallError>;
    /// Changes lume's tables from `last`, what lume's last write left with
    /// nothing changed since (the caller knows by the ruleset's
    /// generation), to `state`'s, atomically: only what differs where the
    /// skeleton is the same, else as [`Self::apply`]. One transaction,
    /// none when the tables are `last`; returns the tables now in place.
    /// `state` must not be empty (lume's tables are then removed).
    fn apply_change(&self, last: &Tables, state: &FirewallState) -> Result<Tables, FirewallError>;
    /// Removes every lume rule; a missing table is not an error.
    fn remove(&self) -> Result<(), FirewallError>;
    /// Whether lume's table exists.
    fn present(&self) -> Result<bool, FirewallError>;
    /// The ruleset's generation in the caller's network namespace: it
    /// changes with every change to any table, lume's or another tool's.
    /// `None` when it cannot be read (a check then lists, as without it).
    fn generation(&self) -> Option<RulesetGeneration>;
    /// The table as the firewall lists it now; `None` when it is missing.
    fn listing(&self) -> Result<Option<String>, FirewallError>;
    /// Base chains of other tables that may drop traffic lume forwards or
    /// serves (a VPN kill switch, Docker's FORWARD DROP).
    fn foreign_drops(&self) -> Result<Vec<ForeignDrop>, FirewallError>;
    /// Puts lume's accepts for `openings` below the rules already in the
    /// chains other tools keep for them (Docker, ufw, firewalld; none where
    /// a drop that is no tool's own would be bypassed) and removes every
    /// other rule of lume's outside its table (all of them with no
    /// openings), in one transaction. Says what it changed (nothing when all was in
    /// place) and whether any such chain exists.
    fn accommodate(&self, openings: &[Opening]) -> Result<Accommodated, FirewallError>;
    /// Whether any chain lume accommodates exists (Docker, ufw or firewalld).
    fn tools_present(&self) -> Result<bool, FirewallError>;
    /// The whole ruleset as lume reads other tools' chains in it.
    fn ruleset(&self) -> Result<foreign::Ruleset, FirewallError>;
    /// [`Self::accommodate`] planned from `rs`, a listing the caller
    /// already has (lume's own tables play no part in the plan).
    fn accommodate_with(
        &self,
        rs: foreign::Ruleset,
        openings: &[Opening],
    ) -> Result<Accommodated, FirewallError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checked_ruleset_reads_back_what_it_writes_and_nothing_else() {
        let c = CheckedRuleset {
            generation: RulesetGeneration {
                namespace: 4026531840,
                number: 17,
            },
            tools: true,
        };
        assert_eq!(c.to_string(), "4026531840:17 1");
        assert_eq!("4026531840:17 1\n".parse(), Ok(c));
        let c = CheckedRuleset { tools: false, ..c };
        assert_eq!(c.to_string().parse(), Ok(c));
        for bad in [
            "",
            "garbage",
            "4026531840:17",
            "4026531840:17 2",
            "17 0",
            "1:2 0 0",
        ] {
            assert_eq!(bad.parse::<CheckedRuleset>(), Err(()), "{bad:?}");
        }
    }
}
