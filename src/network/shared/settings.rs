//! The config.yaml keys of the shared networks: bridges, subnets,
//! `firewallAccommodation`.

use super::*;

pub(super) fn subnet_setting(
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

pub(super) fn bridge_setting(
    s: &Settings,
    key: &'static str,
    default: &str,
) -> Result<String, SharedError> {
    let v = s.get_str(key)?.unwrap_or_else(|| default.to_string());
    if crate::network::mode::valid_ifname(&v) {
        Ok(v)
    } else {
        Err(SharedError::BridgeName { key, value: v })
    }
}

/// `natSubnet6` / `hostSubnet6`: a /64, `none`, or (unset) this machine's
/// unique local prefix number `subnet_id`. A kernel without IPv6 gets none.
pub(super) fn prefix6_setting(
    s: &Settings,
    key: &'static str,
    subnet_id: u16,
) -> Result<Option<Prefix6>, SharedError> {
    let given = s.get_str(key)?;
    let value = match given.as_deref().map(str::trim) {
        Some("none") => return Ok(None),
        Some(v) => Some(
            v.parse()
                .map_err(|source| SharedError::Prefix6 { key, source })?,
        ),
        None => None,
    };
    if !crate::network::prefix6::kernel_has_ipv6() {
        return Ok(None);
    }
    Ok(Some(
        value.unwrap_or_else(|| Prefix6::unique_local_here(subnet_id)),
    ))
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
        let nat6 = prefix6_setting(s, "natSubnet6", 0)?;
        let host6 = prefix6_setting(s, "hostSubnet6", 1)?;
        if let (Some(a), Some(b)) = (nat6, host6)
            && a == b
        {
            return Err(SharedError::Overlap6(a));
        }
        Ok(Self {
            nat: SharedNet {
                kind: Kind::Nat,
                bridge: bridge_setting(s, "natBridge", "lume0")?,
                configured: nat_subnet,
                explicit: nat_explicit,
                configured6: nat6,
                dir: root.join("nat"),
            },
            host: SharedNet {
                kind: Kind::Host,
                bridge: bridge_setting(s, "hostBridge", "lume-host0")?,
                configured: host_subnet,
                explicit: host_explicit,
                configured6: host6,
                dir: root.join("host"),
            },
            accommodate: s.get_bool("firewallAccommodation")?.unwrap_or(true),
            settings_file: s.file().to_path_buf(),
            firewall: std::sync::Arc::new(Nft),
            root,
        })
    }
}

impl SharedNet {
    pub(super) fn bridge_key(&self) -> &'static str {
        match self.kind {
            Kind::Nat => "natBridge",
            Kind::Host => "hostBridge",
        }
    }

    pub(super) fn key(&self) -> &'static str {
        match self.kind {
            Kind::Nat => "natSubnet",
            Kind::Host => "hostSubnet",
        }
    }

    pub(super) fn key6(&self) -> &'static str {
        match self.kind {
            Kind::Nat => "natSubnet6",
            Kind::Host => "hostSubnet6",
        }
    }
}
