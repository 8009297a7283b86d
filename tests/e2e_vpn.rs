//! End to end, VPN resilience: a NAT guest and a bridged guest keep
//! connecting to a LAN peer while the host "connects a VPN" (a tun device
//! with 0/1 and 128/1 routes, `nft flush ruleset`, forwarding off), then gets
//! a route into part of the NAT subnet and a kill-switch table, then "the
//! VPN disconnects". The NAT guest's connections come back after each step
//! that allows them, the bridged guest is never interrupted, and the doctor
//! names the route and the kill switch while they exist.
//! Timing bounds here are generous on purpose; the heal time itself is
//! measured by bench/heal.sh.

mod common;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::{
    HOST_UPLINK_IP, HOST_UPLINK6, LAN_PEER, LAN_PEER6, Lan, Recorder, wait_console, wait_for,
};
use serde_json::Value;

const BOOT: Duration = Duration::from_secs(180);

/// Waits until the peer sees a new connection from `from` after `since`.
fn reconnects(peer: &Recorder, from: IpAddr, seen_before: usize, within: Duration) -> Duration {
    let start = Instant::now();
    wait_for(&format!("a new connection from {from}"), within, || {
        (peer.sources().iter().filter(|s| **s == from).count() > seen_before).then_some(())
    });
    start.elapsed()
}

fn count_from(peer: &Recorder, from: IpAddr) -> usize {
    peer.sources().iter().filter(|s| **s == from).count()
}

fn doctor(t: &Lan) -> (bool, Vec<Value>) {
    let out = t.host.lume(&t.home, &["network", "doctor", "-f", "json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    (
        out.status.success(),
        v["checks"].as_array().unwrap().clone(),
    )
}

fn failed(checks: &[Value]) -> Vec<String> {
    checks
        .iter()
        .filter(|c| c["ok"] == false)
        .map(|c| {
            format!(
                "{}: {}",
                c["name"].as_str().unwrap(),
                c["detail"].as_str().unwrap()
            )
        })
        .collect()
}

#[test]
fn nat_heals_after_a_vpn_and_bridged_is_never_interrupted() {
    let t = Lan::new("vp");
    t.with_ipv6();
    let peer = Recorder::start(&t.lan, &format!("{LAN_PEER}:9000"));
    let peer6 = Recorder::start(&t.lan, &format!("[{LAN_PEER6}]:9000"));
    let probe = format!("lume.probe={LAN_PEER}:9000");
    // The NAT guest connects over both IPv4 and IPv6.
    t.create(
        "nat",
        "nat",
        &[],
        &format!("lume.probes={LAN_PEER}:9000,[{LAN_PEER6}]:9000"),
    );
    t.create("lan", "bridged:up0", &[], &probe);
    t.lume_ok(&["run", "nat", "--detach"]);
    t.lume_ok(&["run", "lan", "--detach"]);
    wait_console(&t.home, "nat", "LUME-GUEST: probe ok", BOOT);
    wait_console(
        &t.home,
        "nat",
        &format!("LUME-GUEST: probe ok [{LAN_PEER6}]:9000"),
        Duration::from_secs(60),
    );
    wait_console(&t.home, "lan", "LUME-GUEST: probe ok", BOOT);
    let bridged_ip: IpAddr = wait_for("the bridged address", Duration::from_secs(20), || {
        t.get("lan")["ipAddress"]
            .as_str()
            .and_then(|s| s.parse().ok())
    });
    let host_ip: IpAddr = HOST_UPLINK_IP.parse().unwrap();
    let host6: IpAddr = HOST_UPLINK6.parse().unwrap();
    let (healthy, checks) = doctor(&t);
    assert!(
        healthy,
        "a healthy host with running VMs: {:?}",
        failed(&checks)
    );
    let bridged_console =
        || std::fs::read_to_string(t.home.vm_dir("lan").join("console.log")).unwrap();
    let fails_before = bridged_console().matches("probe fail").count();

    // 1. The VPN connects: tunnel routes of both families, a flushed
    //    ruleset, forwarding of both families off.
    t.host.exec_ok(
        "ip tuntap add dev tun0 mode tun && ip addr add 192.0.2.200/32 dev tun0 && ip link set tun0 up && \
         ip -6 addr add 2001:db8:fe::2/128 dev tun0 nodad && \
         ip route add 0.0.0.0/1 dev tun0 && ip route add 128.0.0.0/1 dev tun0 && \
         ip -6 route add ::/1 dev tun0 && ip -6 route add 8000::/1 dev tun0 && \
         nft flush ruleset && echo 0 > /proc/sys/net/ipv4/ip_forward && \
         echo 0 > /proc/sys/net/ipv6/conf/all/forwarding",
    );
    let n = count_from(&peer, host_ip);
    let n6 = count_from(&peer6, host6);
    let took = reconnects(&peer, host_ip, n, Duration::from_secs(10));
    eprintln!("NAT traffic back {took:?} after the VPN connected");
    let took = reconnects(&peer6, host6, n6, Duration::from_secs(10));
    eprintln!("NAT IPv6 traffic back {took:?} after the VPN connected");
    assert_eq!(
        t.host
            .exec_ok("cat /proc/sys/net/ipv6/conf/all/forwarding")
            .trim(),
        "1"
    );
    assert_eq!(
        t.host.exec_ok("cat /proc/sys/net/ipv4/ip_forward").trim(),
        "1"
    );
    assert!(t.host.exec_ok("nft list tables").contains("inet lume"));
    let log = std::fs::read_to_string(t.home.vm_dir("nat").join("lume.log")).unwrap();
    assert!(
        log.contains("repaired: nftables table inet lume was missing"),
        "{log}"
    );
    assert!(log.contains("repaired: IPv4 forwarding"), "{log}");
    assert!(log.contains("repaired: IPv6 forwarding"), "{log}");

    // 2. A route into part of the NAT subnet and a kill switch: reported, not bypassed.
    t.host.exec_ok(
        "ip route add 203.0.113.0/25 dev tun0 && \
         nft add table inet killswitch && \
         nft 'add chain inet killswitch ksforward { type filter hook forward priority 0; policy drop; }' && \
         nft add table ip6 killswitch6 && \
         nft 'add chain ip6 killswitch6 ks6forward { type filter hook forward priority 0; policy drop; }'",
    );
    let (healthy, checks) = wait_for(
        "the doctor to see all three",
        Duration::from_secs(10),
        || {
            let (ok, checks) = doctor(&t);
            let f = failed(&checks).join("\n");
            (f.contains("203.0.113.0/25 dev tun0")
                && f.contains("table inet killswitch")
                && f.contains("table ip6 killswitch6"))
            .then_some((ok, checks))
        },
    );
    assert!(!healthy);
    let f = failed(&checks).join("\n");
    assert!(f.contains("chain ksforward"), "{f}");
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        t.host.exec_ok("nft list tables").contains("killswitch"),
        "the kill switch stays"
    );
    let log = std::fs::read_to_string(t.home.vm_dir("nat").join("lume.log")).unwrap();
    assert!(
        log.contains("warning: route 203.0.113.0/25 dev tun0"),
        "{log}"
    );
    assert!(
        log.contains("warning: table inet killswitch chain ksforward"),
        "{log}"
    );

    // 3. The VPN disconnects: its device, routes and kill switch go, and it
    //    resets the firewall and forwarding on its way out.
    t.host.exec_ok(
        "ip link del tun0 && nft delete table inet killswitch && nft delete table ip6 killswitch6 && \
         nft flush ruleset && echo 0 > /proc/sys/net/ipv4/ip_forward && \
         echo 0 > /proc/sys/net/ipv6/conf/all/forwarding",
    );
    let n = count_from(&peer, host_ip);
    let n6 = count_from(&peer6, host6);
    let took = reconnects(&peer, host_ip, n, Duration::from_secs(10));
    eprintln!("NAT traffic back {took:?} after the VPN disconnected");
    let took = reconnects(&peer6, host6, n6, Duration::from_secs(10));
    eprintln!("NAT IPv6 traffic back {took:?} after the VPN disconnected");
    let (healthy, checks) = wait_for("a healthy doctor again", Duration::from_secs(10), || {
        let (ok, checks) = doctor(&t);
        ok.then_some((ok, checks))
    });
    assert!(healthy, "{:?}", failed(&checks));

    // The bridged guest never noticed any of it.
    let n = count_from(&peer, bridged_ip);
    reconnects(&peer, bridged_ip, n, Duration::from_secs(5));
    assert_eq!(
        bridged_console().matches("probe fail").count(),
        fails_before,
        "bridged guest interrupted"
    );

    t.lume_ok(&["stop", "nat"]);
    t.lume_ok(&["stop", "lan"]);
    assert!(!t.host.exec_ok("nft list tables").contains("lume"));
}

#[test]
fn watching_hands_over_when_the_watcher_vm_stops() {
    let t = Lan::new("vw");
    t.create("w1", "nat", &[], "");
    t.create("w2", "host", &[], "");
    t.lume_ok(&["run", "w1", "--detach"]);
    t.lume_ok(&["run", "w2", "--detach"]);
    wait_console(&t.home, "w2", "LUME-GUEST: lease eth0 192.0.2.", BOOT);
    // w1 started first and watches; stopping it hands the watch to w2.
    t.lume_ok(&["stop", "w1"]);
    std::thread::sleep(Duration::from_secs(1));
    t.host
        .exec_ok("nft flush ruleset && ip link set lume-host0 down");
    wait_for("w2's watcher to repair", Duration::from_secs(5), || {
        let log = std::fs::read_to_string(t.home.vm_dir("w2").join("lume.log")).ok()?;
        (log.contains("repaired: nftables table inet lume was missing")
            && log.contains("repaired: bridge lume-host0 was down"))
        .then_some(())
    });
    let log = std::fs::read_to_string(t.home.vm_dir("w2").join("lume.log")).unwrap();
    assert!(
        log.matches("now watches lume's networks").count() >= 1,
        "{log}"
    );
    // A killed dnsmasq comes back with its leases.
    common::sh(&format!(
        "for p in $(ip netns pids {}); do grep -q dnsmasq /proc/$p/comm 2>/dev/null && kill -9 $p; done; true",
        t.host.name
    ));
    wait_for("dnsmasq restarted", Duration::from_secs(5), || {
        let log = std::fs::read_to_string(t.home.vm_dir("w2").join("lume.log")).ok()?;
        log.contains("repaired: dnsmasq for lume-host0 was not running")
            .then_some(())
    });
    t.lume_ok(&["stop", "w2"]);
}
