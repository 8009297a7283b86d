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
pub fn is_lume_bridge(link: &crate::network::kernel::netlink::LinkInfo) -> bool {
    link.kind.as_deref() == Some("bridge") && link.alias.as_deref() == Some(BRIDGE_MARK)
}
