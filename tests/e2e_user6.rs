//! End to end, IPv6 in `user` mode (passt), in namespaces the test creates
//! (`common::Lan` given 2001:db8:ff::/64: the LAN router 2001:db8:ff::1, the
//! host's uplink 2001:db8:ff::2). One guest, booted twice:
//!
//! 1. The host has an IPv6 default route. The guest takes the address its
//!    SLAAC makes of the prefix passt advertises (the host's /64), which
//!    VMDetails lists; it reaches a LAN server over IPv6, which sees the
//!    host's address; its published port answers over IPv6 from the LAN
//!    and on the host's [::1]. A service listening only on the host's [::1]
//!    is never reached: not through the IPv6 gateway (passt would map it to
//!    the host's loopback without `--no-map-gw`), whose LAN server on the
//!    same port answers instead, nor through the host's link-local address
//!    (passt's own towards the guest), while services on the host's own
//!    global and link-local addresses are reached (the controls).
//! 2. The host has no IPv6 default route. The guest gets no IPv6 (no router
//!    advertisement, so no address and no route; passt carries not even
//!    link-local IPv6): its IPv6 probes fail, its
//!    IPv4 still works, VMDetails lists no IPv6 address and the published
//!    port answers over IPv4 only.
//! 3. The control of the loopback check: with `unsafeHostLoopback`, the same
//!    probe of the IPv6 gateway reaches the service on the host's [::1].

mod common;

use std::net::{IpAddr, Ipv6Addr};
use std::time::Duration;

use common::{LAN_PEER, Lan, Recorder, wait_for};

const BOOT: Duration = Duration::from_secs(60);
const LAN_PEER6: &str = "2001:db8:ff::1";
const HOST_UPLINK6: &str = "2001:db8:ff::2";
const MAC: &str = "52:54:00:ab:06:01";
/// What the guest's SLAAC makes of 2001:db8:ff::/64 with `MAC` (EUI-64:
/// the MAC's universal/local bit flipped, ff:fe in the middle).
/// Written as lume writes it (RFC 5952: no "::" for one zero field).
const GUEST6: &str = "2001:db8:ff:0:5054:ff:feab:601";

/// The console lines of the VM's latest boot.
fn this_boot(t: &Lan, vm: &str) -> String {
    let log = std::fs::read_to_string(t.home.vm_dir(vm).join("console.log")).unwrap_or_default();
    match log.rfind("LUME-GUEST: booted") {
        Some(i) => log[i..].to_string(),
        None => String::new(),
    }
}

/// Waits until the latest boot's console shows every line of `needles`.
fn wait_boot(t: &Lan, vm: &str, needles: &[String]) -> String {
    let until = std::time::Instant::now() + BOOT;
    loop {
        let log = this_boot(t, vm);
        if needles.iter().all(|n| log.contains(n.as_str())) {
            return log;
        }
        if std::time::Instant::now() > until {
            let tail: Vec<&str> = log.lines().filter(|l| !l.contains("probe")).collect();
            panic!("timed out waiting for {needles:?} on {vm}'s console; its end: {tail:#?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn user_mode_guest_gets_ipv6_through_passt() {
    assert_eq!(
        GUEST6.parse::<Ipv6Addr>().unwrap().segments()[4..],
        [0x5054, 0x00ff, 0xfeab, 0x0601]
    );
    let t = Lan::new("u6");
    t.lan
        .exec_ok(&format!("ip addr add {LAN_PEER6}/64 dev br0 nodad"));
    t.host.exec_ok(&format!(
        "ip addr add {HOST_UPLINK6}/64 dev up0 nodad && ip -6 route add default via {LAN_PEER6}"
    ));
    t.home.write_settings("userSubnet: 192.0.2.0/24\n");
    let out6 = Recorder::start(&t.lan, &format!("[{LAN_PEER6}]:9000"));
    let out4 = Recorder::start(&t.lan, &format!("{LAN_PEER}:9002"));
    let gateway = Recorder::start(&t.lan, &format!("[{LAN_PEER6}]:9100"));
    let loopback = Recorder::start(&t.host, "[::1]:9100");
    let host_global = Recorder::start(&t.host, &format!("[{HOST_UPLINK6}]:9101"));
    // The host's link-local address, passt's own towards the guest.
    let host_ll = t
        .host
        .exec_ok("ip -6 -o addr show dev up0 scope link")
        .split_whitespace()
        .nth(3)
        .and_then(|a| a.split('/').next())
        .unwrap()
        .to_string();
    let host_any = Recorder::start(&t.host, "[::]:9103");
    let targets = [
        format!("[{LAN_PEER6}]:9000"),
        format!("[{GUEST6}]:80"),
        format!("[{LAN_PEER6}]:9100"),
        format!("[{HOST_UPLINK6}]:9101"),
        format!("[{host_ll}%eth0]:9103"),
        format!("[{host_ll}%eth0]:9100"),
        format!("{LAN_PEER}:9002"),
    ];
    t.create(
        "u6",
        "user",
        &["--mac-address", MAC, "--publish", "18080:80"],
        &format!("lume.probes={}", targets.join(",")),
    );

    // 1. With an IPv6 default route.
    t.lume_ok(&["run", "u6", "--detach"]);
    // Every probe succeeds but the host's link-local port 9100, where
    // only [::1] listens.
    let ll_loopback = format!("[{host_ll}%eth0]:9100");
    let ok: Vec<String> = targets
        .iter()
        .map(|t| match *t == ll_loopback {
            true => format!("LUME-GUEST: probe fail {t}"),
            false => format!("LUME-GUEST: probe ok {t}"),
        })
        .collect();
    // The probe of its own SLAAC address succeeds only if the guest has it
    // (passt would try it on the LAN, where nobody has it).
    wait_boot(&t, "u6", &ok);
    let listed = wait_for("the guest's IPv6 address in VMDetails", BOOT, || {
        let d = t.get("u6");
        let list: Vec<String> = d["ipv6Addresses"]
            .as_array()?
            .iter()
            .filter_map(|a| a.as_str().map(str::to_string))
            .collect();
        list.contains(&GUEST6.to_string()).then_some(list)
    });
    assert_eq!(listed, [GUEST6], "only what the guest has");
    // passt's sockets are the host's: the LAN sees the host's address.
    let host6: IpAddr = HOST_UPLINK6.parse().unwrap();
    for (what, r) in [("outbound", &out6), ("gateway", &gateway)] {
        let s = r.sources();
        assert!(
            !s.is_empty() && s.iter().all(|a| *a == host6),
            "{what}: {s:?}"
        );
    }
    assert!(!host_global.sources().is_empty());
    assert!(
        !host_any.sources().is_empty(),
        "the host's link-local address"
    );
    let host4: IpAddr = common::HOST_UPLINK_IP.parse().unwrap();
    assert!(out4.sources().contains(&host4));
    let reached = loopback.sources();
    assert!(
        reached.is_empty(),
        "the guest reached a service on the host's [::1]: {reached:?}"
    );
    // The published port over IPv6, from the LAN and on the host's loopback.
    let mac = t.get("u6")["macAddress"].as_str().unwrap().to_string();
    assert_eq!(mac, MAC);
    for (from, addr) in [
        (&t.lan, format!("[{HOST_UPLINK6}]:18080")),
        (&t.host, "[::1]:18080".to_string()),
        (&t.lan, "198.51.100.2:18080".to_string()),
    ] {
        let page = from.http_get(&addr).unwrap_or_default();
        assert!(page.contains(&mac), "{addr} from {}: {page}", from.name);
    }
    t.lume_ok(&["stop", "u6"]);

    // 2. Without an IPv6 default route (the host keeps its address).
    t.host.exec_ok("ip -6 route del default");
    t.lume_ok(&["run", "u6", "--detach"]);
    wait_boot(
        &t,
        "u6",
        &[
            format!("LUME-GUEST: probe ok {LAN_PEER}:9002"),
            format!("LUME-GUEST: probe fail [{LAN_PEER6}]:9000"),
            format!("LUME-GUEST: probe fail [{GUEST6}]:80"),
        ],
    );
    // A second round too: the guest's address would have been configured
    // well before it (duplicate address detection takes a second).
    wait_for("a second round of probes", BOOT, || {
        let log = this_boot(&t, "u6");
        (log.matches(&format!("probe fail [{GUEST6}]:80")).count() >= 3).then_some(())
    });
    let log = this_boot(&t, "u6");
    assert!(!log.contains("LUME-GUEST: probe ok ["), "{log}");
    assert_eq!(t.get("u6")["ipv6Addresses"], serde_json::json!([]));
    assert!(
        t.lan.http_get(&format!("[{HOST_UPLINK6}]:18080")).is_none(),
        "the published port over IPv6 without IPv6 for the guest"
    );
    let page = t.lan.http_get("198.51.100.2:18080").unwrap_or_default();
    assert!(page.contains(&mac), "{page}");
    assert!(loopback.sources().is_empty());
    t.lume_ok(&["stop", "u6"]);

    // 3. The control of the loopback check: with unsafeHostLoopback (and
    // the IPv6 route back), the same probe of the gateway is the host's
    // [::1]. The guest keeps its address through the unfiltered relay.
    t.host
        .exec_ok(&format!("ip -6 route add default via {LAN_PEER6}"));
    t.lume_ok(&["set", "u6", "--unsafe-host-loopback", "true"]);
    t.lume_ok(&["run", "u6", "--detach"]);
    let before = gateway.sources().len();
    wait_boot(
        &t,
        "u6",
        &[
            format!("LUME-GUEST: probe ok [{LAN_PEER6}]:9100"),
            format!("LUME-GUEST: probe ok [{GUEST6}]:80"),
        ],
    );
    assert!(
        !loopback.sources().is_empty(),
        "the control reached no [::1]"
    );
    assert_eq!(gateway.sources().len(), before, "the gateway was the LAN's");
    let note = t.get("u6")["network"]["note"].to_string();
    assert!(
        note.contains("unsafeHostLoopback") && note.contains("over IPv6"),
        "{note}"
    );
    t.lume_ok(&["stop", "u6"]);
}
