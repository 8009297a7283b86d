//! The subnet a shared network comes up with: the configured one unless a
//! host route collides with it.

use super::*;

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
    /// Chooses the subnet as the network comes up (see [`pick_subnet`]).
    pub(super) fn resolve_subnet(
        &self,
        avoid: &Subnet,
    ) -> Result<(Subnet, Option<String>), SharedError> {
        let routes = Netlink::open()?.routes_v4()?;
        pick_subnet(self, &routes, avoid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            configured6: None,
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
