//! A shared network's bridge: brought up (with forwarding for NAT) by the
//! first VM, taken down by the last.

use super::*;

/// The alias (IFLA_IFALIAS) lume gives the bridges it creates; only a bridge
/// with this mark is ever deleted.
pub const BRIDGE_MARK: &str = "lume";

impl SharedNet {
    /// The bridge with its gateway address, up; forwarding on for NAT.
    pub fn bring_up(&self) -> Result<(), SharedError> {
        self.bring_up_adopting(false)
    }

    /// [`Self::bring_up`]; with `running`, an unmarked bridge of this name is
    /// the one an earlier release of lume created for the VMs still running
    /// on it: it gets the mark instead of being refused (an upgrade keeps
    /// running VMs' network).
    pub(super) fn bring_up_adopting(&self, running: bool) -> Result<(), SharedError> {
        fs::create_dir_all(&self.dir)
            .and_then(|()| crate::network::rundir::private_dir(&self.dir, &self.dir))
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
        // Pinned to the address it has: otherwise the kernel gives a bridge
        // the lowest MAC of its ports, which changes as VMs come and go, and
        // every other guest keeps sending to the old one (its gateway and
        // IPv6 router) until its neighbour cache gives up, tens of seconds.
        if let Some(mac) = nl.link_info(&self.bridge)?.and_then(|l| l.mac) {
            nl.set_mac(&self.bridge, mac)?;
        }
        nl.add_address_v4(&self.bridge, self.subnet().gateway(), self.subnet().prefix)?;
        let prefix6 = self.prefix6();
        match prefix6 {
            Some(_) => drop(self.ipv6_on()?),
            None => drop(sysctl::ipv6_off(&self.bridge)),
        }
        nl.set_up(&self.bridge)?;
        if let Some(p) = prefix6 {
            nl.add_address_v6(&self.bridge, p.gateway(), 64)?;
            nl.add_address_v6(&self.bridge, crate::network::prefix6::BRIDGE_LINK_LOCAL, 64)?;
        }
        if self.kind == Kind::Nat {
            sysctl::forwarding_on(&self.dir).map_err(SharedError::Forwarding)?;
            if prefix6.is_some() {
                self.forwarding6_on()?;
            }
        }
        Ok(())
    }

    /// IPv6 on the bridge, with its protections (see
    /// [`sysctl::ipv6_bridge_on`]); whether anything had to change.
    pub(super) fn ipv6_on(&self) -> Result<bool, SharedError> {
        sysctl::ipv6_bridge_on(&self.bridge).map_err(|source| SharedError::Bridge6 {
            key: self.key6(),
            bridge: self.bridge.clone(),
            source,
        })
    }

    pub(super) fn forwarding6_on(&self) -> Result<(), SharedError> {
        sysctl::forwarding6_on(&self.dir).map_err(|source| SharedError::Forwarding6 {
            key: self.key6(),
            source,
        })
    }

    /// Refuses `prefix` when an interface other than this bridge has an
    /// address in it (the host's own network, a VPN's, another tool's).
    pub(super) fn check_prefix6(&self, prefix: Prefix6) -> Result<(), SharedError> {
        let mut nl = Netlink::open()?;
        let own = nl.link_index(&self.bridge)?;
        let taken = nl
            .all_addresses_v6()?
            .into_iter()
            .find(|&(index, addr, _)| Some(index) != own && prefix.contains(addr));
        if let Some((index, address, _)) = taken {
            let interface = nl
                .links()?
                .into_iter()
                .find(|l| l.index == index)
                .map_or_else(|| format!("#{index}"), |l| l.name);
            return Err(SharedError::Prefix6Conflict {
                key: self.key6(),
                prefix,
                interface,
                address,
            });
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
            sysctl::forwarding6_restore(&self.dir);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A bridge lume created: kind bridge, marked with [`BRIDGE_MARK`].
pub fn is_lume_bridge(link: &crate::network::kernel::netlink::LinkInfo) -> bool {
    link.kind.as_deref() == Some("bridge") && link.alias.as_deref() == Some(BRIDGE_MARK)
}
