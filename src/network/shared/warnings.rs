//! Conditions lume reports but does not override: routes that capture part
//! of a lume subnet, and other tables that drop lume's traffic.

use super::*;

impl Networks {
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
    /// an `ip6` table's only the traffic of networks with IPv6.
    pub fn bridges_for_hook(&self, family: &str, hook: &str) -> Vec<&str> {
        let nat = &self.nat.bridge;
        self.active()
            .into_iter()
            .filter(|n| family != "ip6" || n.prefix6().is_some())
            .map(|n| n.bridge.as_str())
            .filter(|b| hook != "forward" || b == nat)
            .collect()
    }

    /// The shared networks with a live member.
    pub(super) fn active(&self) -> Vec<&SharedNet> {
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
    pub fn warnings(&self) -> Vec<Warning> {
        self.warnings_with(&mut None)
    }

    /// [`Self::warnings`], with other tools' drops taken from `drops` when
    /// it holds a listing (the ruleset has not changed since: the watcher
    /// keeps one between nftables events), else listed into it.
    pub fn warnings_with(
        &self,
        drops: &mut Option<Vec<crate::firewall::ForeignDrop>>,
    ) -> Vec<Warning> {
        let active = self.active();
        if active.is_empty() {
            return Vec::new();
        }
        let mut out: Vec<Warning> = self
            .route_warnings()
            .into_iter()
            .map(Warning::Route)
            .collect();
        if drops.is_none() {
            *drops = self.firewall.foreign_drops().ok();
        }
        if let Some(drops) = drops.as_deref() {
            let list = active
                .iter()
                .map(|n| n.bridge.as_str())
                .collect::<Vec<_>>()
                .join(" and ");
            for d in drops {
                let bridges = self.bridges_for_hook(&d.family, &d.hook);
                if let Some(w) = drop_warning(d, &bridges, &list, self.accommodate) {
                    out.push(Warning::Drop(w));
                }
                // Rules lume does not override, and chains it keeps out of.
                if !bridges.is_empty() {
                    let each = bridges.join(" and ");
                    for f in d.findings(&bridges, self.accommodate) {
                        if matches!(f.kind, FindingKind::Withheld { .. }) || f.fails() {
                            out.push(Warning::Rule {
                                family: d.family.clone(),
                                table: d.table.clone(),
                                chain: d.chain.clone(),
                                hook: d.hook.clone(),
                                detail: f.describe(&each),
                            });
                        }
                    }
                }
            }
        }
        out
    }
}

/// A condition lume reports (in the repair log, as the watcher sees it
/// appear and go) but does not override.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Warning {
    /// A route captures part of an active lume subnet.
    Route(RouteWarning),
    /// Another table's base chain drops traffic of lume's VMs.
    Drop(DropWarning),
    /// A rule of another table that lume does not override, or a chain it
    /// keeps its accepts out of.
    Rule {
        family: String,
        table: String,
        chain: String,
        hook: String,
        /// What the rule does to which bridges.
        detail: String,
    },
}

impl std::fmt::Display for Warning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Route(w) => f.write_str(&w.text),
            Self::Drop(w) => w.fmt(f),
            Self::Rule {
                family,
                table,
                chain,
                hook,
                detail,
            } => write!(
                f,
                "table {family} {table} chain {chain} ({hook} hook): {detail}"
            ),
        }
    }
}

/// Another table's drop of lume's traffic; `drop` names the table, chain
/// and hook as a person reads them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DropWarning {
    /// A known tool's policy, while lume keeps its accepts out of the
    /// tool's chains (a rule after them that is no tool's own).
    Withheld { drop: String, chain: String },
    /// A known tool's policy, with `firewallAccommodation` false.
    NotAccommodated {
        drop: String,
        chain: String,
        /// Every active lume bridge.
        bridges: String,
    },
    /// A known tool's policy while lume's accepts are missing there (the
    /// watcher puts them back).
    AcceptsMissing { drop: String, chain: String },
    /// A table of no known tool (a VPN kill switch, another firewall).
    Unknown { drop: String, bridges: String },
}

impl std::fmt::Display for DropWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Withheld { drop, chain } => write!(
                f,
                "{drop}: another tool's policy ({chain} …) drops traffic of lume's VMs, and lume keeps its accepts out of those chains: a rule after them that is no tool's own drops some of that traffic, and lume's accepts would bypass it"
            ),
            Self::NotAccommodated {
                drop,
                chain,
                bridges,
            } => write!(
                f,
                "{drop}: another tool's policy ({chain}) drops traffic of lume's VMs, and firewallAccommodation is false in config.yaml, so lume leaves that chain alone — accept {bridges} there yourself (docs/networking.md gives the rules), or set firewallAccommodation: true"
            ),
            Self::AcceptsMissing { drop, chain } => write!(
                f,
                "{drop}: another tool's policy ({chain}) drops traffic of lume's VMs while lume's accepts are missing there; lume puts them back"
            ),
            Self::Unknown { drop, bridges } => write!(
                f,
                "{drop}: it may drop traffic of lume's VMs (a VPN kill switch or another firewall); lume does not bypass it — allow {bridges} there, or use --network user (passt: the guest's traffic leaves as the host's own, through the VPN)"
            ),
        }
    }
}

/// A route that captures part of an active lume subnet: the bridge whose
/// subnet it is, and the warning for a person.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RouteWarning {
    pub bridge: String,
    pub text: String,
}

/// The watcher's warning about another table's drop of traffic of
/// `bridges` (the active ones at its hook; `list`: every active bridge),
/// if it drops any: a known tool's policy names the tool and the setting.
pub(super) fn drop_warning(
    d: &ForeignDrop,
    bridges: &[&str],
    list: &str,
    accommodate: bool,
) -> Option<DropWarning> {
    if bridges.is_empty() || !d.affects(bridges) || d.accommodated_for(bridges).is_some() {
        return None;
    }
    let withheld = accommodate
        && d.findings(bridges, accommodate)
            .iter()
            .any(|f| matches!(f.kind, FindingKind::Withheld { .. }));
    let drop = d.to_string();
    match &d.tool_chain {
        // The user accepts lume's bridges in the tool's chain.
        Some(_) if d.user_accepted_for(bridges).is_some() => None,
        Some(chain) if withheld => Some(DropWarning::Withheld {
            drop,
            chain: chain.clone(),
        }),
        Some(chain) if !accommodate => Some(DropWarning::NotAccommodated {
            drop,
            chain: chain.clone(),
            bridges: list.to_string(),
        }),
        Some(chain) => Some(DropWarning::AcceptsMissing {
            drop,
            chain: chain.clone(),
        }),
        None => Some(DropWarning::Unknown {
            drop,
            bridges: list.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_known_tool_s_drop_is_named_with_the_setting() {
        let mut d = ForeignDrop::docker_forward_policy(Vec::new());
        let w = drop_warning(&d, &["lume0"], "lume0", false)
            .unwrap()
            .to_string();
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
        let w = drop_warning(&d, &["lume0"], "lume0", false)
            .unwrap()
            .to_string();
        assert!(w.contains("a VPN kill switch or another firewall"), "{w}");
    }
}
