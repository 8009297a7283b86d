//! End to end, IPv6 on lume's NAT and host-only networks, in namespaces the
//! test creates (`common::Lan`, given IPv6 on 2001:db8::/32): guests
//! configure their address from lume's router advertisements, VMDetails
//! lists it, a NAT guest reaches the LAN masqueraded as the host and is
//! reached through a published port over IPv6, a host-only guest does not
//! get out, a guest under a network policy gets no IPv6, lume's IPv6
//! forwarding and bridge address are repaired, and the host's sysctls are
//! put back when the last VM stops.

mod common;

use std::net::{IpAddr, Ipv6Addr};
use std::time::Duration;

use common::{HOST_UPLINK6, LAN_PEER6, Lan, Recorder, wait_console, wait_for};

const BOOT: Duration = Duration::from_secs(180);
const NAT6: &str = "2001:db8:64::/64";
const HOST6: &str = "2001:db8:65::/64";

/// The EUI-64 address a Linux guest with `mac` takes in `prefix` (a /64
/// written `P::/64`).
fn eui64(prefix: &str, mac: &str) -> Ipv6Addr {
    let m: Vec<u8> = mac
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect();
    let net: Ipv6Addr = prefix.trim_end_matches("/64").parse().unwrap();
    let iid = u64::from_be_bytes([m[0] ^ 2, m[1], m[2], 0xff, 0xfe, m[3], m[4], m[5]]);
    Ipv6Addr::from(u128::from(net) | u128::from(iid))
}

fn sysctl(ns: &common::Netns, key: &str) -> String {
    ns.exec_ok(&format!("cat /proc/sys/net/ipv6/conf/{key}"))
        .trim()
        .to_string()
}

#[test]
fn nat_and_host_only_guests_get_ipv6() {
    let t = Lan::new("v6");
    t.with_ipv6();
    t.host.exec_ok(
        "echo 1 > /proc/sys/net/ipv6/conf/up0/accept_ra && echo 1 > /proc/sys/net/ipv6/conf/default/accept_ra && \
         echo 0 > /proc/sys/net/ipv6/conf/all/forwarding",
    );
    t.home.write_settings(&format!(
        "natSubnet: 203.0.113.0/24\nhostSubnet: 192.0.2.0/24\nuserSubnet: 198.51.100.0/24\n\
         natSubnet6: {NAT6}\nhostSubnet6: {HOST6}\n"
    ));
    let peer = Recorder::start(&t.lan, &format!("[{LAN_PEER6}]:9000"));
    let probe = format!("lume.probes=[{LAN_PEER6}]:9000");
    t.create("nat6", "nat", &["--publish", "8080:80"], &probe);
    t.create("ho6", "host", &[], &probe);
    t.create(
        "pol6",
        "nat",
        &["--allow-out", "198.51.100.0/24:9000/tcp"],
        &probe,
    );
    for vm in ["nat6", "ho6", "pol6"] {
        t.lume_ok(&["run", vm, "--detach"]);
    }
    // Forwarding on, and the host keeps taking its router's advertisements.
    assert_eq!(sysctl(&t.host, "all/forwarding"), "1");
    assert_eq!(sysctl(&t.host, "up0/accept_ra"), "2");
    assert_eq!(sysctl(&t.host, "default/accept_ra"), "2");
    assert_eq!(sysctl(&t.host, "lume0/accept_ra"), "0");
    // No multicast snooping on lume's bridge: no guest fills its group table.
    assert_eq!(
        t.host
            .exec_ok("cat /sys/class/net/lume0/bridge/multicast_snooping")
            .trim(),
        "0"
    );

    let mut addrs = Vec::new();
    for (vm, prefix) in [("nat6", NAT6), ("ho6", HOST6)] {
        let mac = t.get(vm)["macAddress"].as_str().unwrap().to_string();
        let want = eui64(prefix, &mac);
        let listed = wait_for(&format!("{vm}'s IPv6 address in VMDetails"), BOOT, || {
            let d = t.get(vm);
            let list: Vec<String> = d["ipv6Addresses"]
                .as_array()?
                .iter()
                .filter_map(|a| a.as_str().map(str::to_string))
                .collect();
            list.contains(&want.to_string()).then_some(list)
        });
        assert!(
            listed.iter().all(|a| a
                .parse::<Ipv6Addr>()
                .is_ok_and(|a| a.segments()[..3] == want.segments()[..3])),
            "{vm}: {listed:?}"
        );
        addrs.push(want);
    }

    // The NAT guest reaches the LAN over IPv6, masqueraded as the host.
    wait_console(
        &t.home,
        "nat6",
        &format!("LUME-GUEST: probe ok [{LAN_PEER6}]:9000"),
        Duration::from_secs(60),
    );
    let host6: IpAddr = HOST_UPLINK6.parse().unwrap();
    let sources = peer.sources();
    assert!(
        !sources.is_empty() && sources.iter().all(|s| *s == host6),
        "{sources:?}"
    );
    // The host reaches both guests; the published port answers over IPv6
    // from the LAN and from the host itself.
    for a in &addrs {
        let page = t.host.http_get(&format!("[{a}]:80")).unwrap_or_default();
        assert!(page.contains("lume-test-guest"), "host to {a}: {page}");
    }
    let mac = t.get("nat6")["macAddress"].as_str().unwrap().to_string();
    for from in [&t.lan, &t.host] {
        let page = from
            .http_get(&format!("[{HOST_UPLINK6}]:8080"))
            .unwrap_or_default();
        assert!(page.contains(&mac), "from {}: {page}", from.name);
    }
    // The LAN cannot reach the guests directly.
    t.lan.exec_ok(&format!(
        "ip -6 route add {NAT6} via {HOST_UPLINK6} && ip -6 route add {HOST6} via {HOST_UPLINK6}"
    ));
    for a in &addrs {
        assert!(t.lan.http_get(&format!("[{a}]:80")).is_none(), "LAN to {a}");
    }

    // The host-only guest and the guest under a policy never get out over
    // IPv6, and the policed guest has no IPv6 address at all.
    wait_console(
        &t.home,
        "pol6",
        &format!("LUME-GUEST: probe fail [{LAN_PEER6}]:9000"),
        Duration::from_secs(60),
    );
    std::thread::sleep(Duration::from_secs(2));
    for vm in ["ho6", "pol6"] {
        let log = std::fs::read_to_string(t.home.vm_dir(vm).join("console.log")).unwrap();
        assert!(
            log.contains(&format!("LUME-GUEST: probe fail [{LAN_PEER6}]:9000"))
                && !log.contains("LUME-GUEST: probe ok"),
            "{vm}: {log}"
        );
    }
    let pol = t.get("pol6");
    assert!(pol["ipAddress"].is_string(), "{pol}");
    assert_eq!(pol["ipv6Addresses"], serde_json::json!([]), "{pol}");
    let pol_mac = pol["macAddress"].as_str().unwrap();
    let pol6 = eui64(NAT6, pol_mac);
    assert!(
        t.host.http_get(&format!("[{pol6}]:80")).is_none(),
        "the policed guest has {pol6}"
    );

    // Repairs: IPv6 forwarding switched off, the bridge's address removed.
    t.host
        .exec_ok("echo 0 > /proc/sys/net/ipv6/conf/all/forwarding && ip -6 addr del 2001:db8:64::1/64 dev lume0");
    wait_for(
        "IPv6 forwarding and lume0's address back",
        Duration::from_secs(20),
        || {
            (sysctl(&t.host, "all/forwarding") == "1"
                && t.host
                    .exec_ok("ip -6 addr show dev lume0")
                    .contains("2001:db8:64::1/64"))
            .then_some(())
        },
    );
    wait_console(
        &t.home,
        "nat6",
        &format!("LUME-GUEST: probe ok [{LAN_PEER6}]:9000"),
        Duration::from_secs(30),
    );

    // A new natSubnet6 applies once the network comes up again; the doctor
    // says so meanwhile.
    t.lume_ok(&["config", "set", "natSubnet6", "2001:db8:66::/64"]);
    let out = t.host.lume(&t.home, &["network", "doctor"]);
    let doctor = String::from_utf8_lossy(&out.stdout);
    assert!(
        doctor.contains("2001:db8:64::1/64")
            && doctor.contains("config.yaml now asks for natSubnet6: 2001:db8:66::/64"),
        "{doctor}"
    );

    // lume0 keeps its MAC when a VM leaves (the kernel would give it the
    // lowest MAC of its ports): the other guests' gateway stays where it is.
    let bridge_mac = || t.host.exec_ok("cat /sys/class/net/lume0/address");
    let before = bridge_mac();
    t.lume_ok(&["stop", "pol6"]);
    assert_eq!(bridge_mac(), before);
    for vm in ["nat6", "ho6"] {
        t.lume_ok(&["stop", vm]);
    }
    // Put back as they were.
    assert_eq!(sysctl(&t.host, "all/forwarding"), "0");
    assert_eq!(sysctl(&t.host, "up0/accept_ra"), "1");
    assert_eq!(sysctl(&t.host, "default/accept_ra"), "1");
    let links = t.host.exec_ok("ip -o link show");
    assert!(
        !links.contains("lume0") && !links.contains("lume-host0"),
        "{links}"
    );
}
