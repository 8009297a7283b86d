//! End to end, IPv6 for a bridged VM, in namespaces the test creates
//! (`common::Lan`): the LAN's router (a dnsmasq of the test's, sending router
//! advertisements for 2001:db8:ff::/64) gives the guest its address by
//! stateless autoconfiguration, lume learns it from the guest's duplicate
//! address detection on its tap and lists it in VMDetails' `ipv6Addresses`,
//! and the LAN reaches the guest there (on a Linux bridge, the host too).
//! What the guest or a LAN host announces that the guest must not be
//! credited with (a link-local address the guest takes, an advertisement
//! forged with the guest's MAC that travels towards it) is not listed.

mod common;

use std::net::Ipv6Addr;
use std::time::Duration;

use common::{Lan, wait_console, wait_for};

const BOOT: Duration = Duration::from_secs(180);
const ROUTER6: &str = "2001:db8:ff::1";
const PREFIX6: &str = "2001:db8:ff::";
/// A link-local address the guest adds to itself (`lume.spoof`).
const LINK_LOCAL: &str = "fe80::bad:1";
/// What a LAN host claims for the guest with a forged advertisement.
const FORGED: &str = "2001:db8:ff::bad";

/// The EUI-64 address a Linux guest with `mac` takes in 2001:db8:ff::/64.
fn eui64(mac: &str) -> Ipv6Addr {
    let m: Vec<u8> = mac
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect();
    let net: Ipv6Addr = PREFIX6.parse().unwrap();
    let iid = u64::from_be_bytes([m[0] ^ 2, m[1], m[2], 0xff, 0xfe, m[3], m[4], m[5]]);
    Ipv6Addr::from(u128::from(net) | u128::from(iid))
}

/// The LAN's router: an address on its bridge and a dnsmasq sending
/// router advertisements only (the LAN's DHCPv4 server is another one).
fn start_router(t: &Lan, dir: &std::path::Path) {
    t.lan.exec_ok(&format!(
        "ip addr add {ROUTER6}/64 dev br0 nodad && \
         dnsmasq --conf-file=/dev/null --bind-interfaces --interface=br0 --except-interface=lo \
         --enable-ra --dhcp-range={PREFIX6},ra-only,64 --ra-param=br0,10 \
         --pid-file={0}/pid6 --port=0",
        dir.display()
    ));
}

fn listed(t: &Lan, vm: &str) -> Vec<Ipv6Addr> {
    t.get(vm)["ipv6Addresses"]
        .as_array()
        .expect("ipv6Addresses is a list")
        .iter()
        .map(|a| a.as_str().unwrap().parse().unwrap())
        .collect()
}

#[test]
fn a_bridged_guest_takes_its_ipv6_address_from_the_lan_and_lume_lists_it() {
    let t = Lan::new("b6");
    let dir = tempfile::tempdir().unwrap();
    start_router(&t, dir.path());
    t.create(
        "b6",
        "bridged:up0",
        &[],
        &format!("lume.spoof={LINK_LOCAL}"),
    );
    t.lume_ok(&["run", "b6", "--detach"]);
    let d = t.get("b6");
    let mac = d["macAddress"].as_str().unwrap().to_string();
    let want = eui64(&mac);

    // Listed once the guest has probed it, and nothing outside the prefix
    // (its own link-local address goes through the same probe).
    let list = wait_for("the guest's EUI-64 address in ipv6Addresses", BOOT, || {
        let list = listed(&t, "b6");
        list.contains(&want).then_some(list)
    });
    assert_eq!(list, vec![want], "only the address the guest configured");
    // Recorded in run.json, the file other lume commands read.
    let run: serde_json::Value =
        serde_json::from_slice(&std::fs::read(t.home.vm_dir("b6").join("run.json")).unwrap())
            .unwrap();
    assert_eq!(run["ipv6Addresses"], serde_json::json!([want.to_string()]));

    // The LAN reaches the guest's web server at that address.
    let page = wait_for(
        "the guest's page from the LAN over IPv6",
        Duration::from_secs(30),
        || {
            t.lan
                .http_get(&format!("[{want}]:80"))
                .filter(|p| p.contains("lume-test-guest"))
        },
    );
    assert!(page.contains(&mac), "{page}");

    // The guest takes a link-local address of its own choosing (and
    // probes it, as for every address): not listed.
    wait_console(
        &t.home,
        "b6",
        &format!("LUME-GUEST: spoofing {LINK_LOCAL}"),
        Duration::from_secs(30),
    );
    // A LAN host forges the guest's advertisement (the guest's MAC as
    // source, sent to the guest): it travels towards the guest, so it is
    // not the guest's.
    let target: Ipv6Addr = FORGED.parse().unwrap();
    let frame = forged_advertisement(&mac, target);
    t.lan.exec_ok(&format!(
        "/usr/bin/python3 -c \"import socket; s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW); \
         s.bind(('br0', 0)); [s.send(bytes.fromhex('{frame}')) for _ in range(3)]\""
    ));
    // The guest's probe goes out within a second of the address; lume
    // publishes within another.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        listed(&t, "b6"),
        vec![want],
        "{LINK_LOCAL} (the guest's) and {FORGED} (a LAN host's) must not be listed"
    );
    let log = std::fs::read_to_string(t.home.vm_dir("b6").join("lume.log")).unwrap();
    assert!(
        log.contains(&format!("Guest IPv6 addresses it announced: {want}")),
        "{log}"
    );

    t.lume_ok(&["stop", "b6"]);
    assert_eq!(t.get("b6")["ipv6Addresses"], serde_json::json!([]));
}

/// On a Linux bridge the guest's tap is one of the bridge's ports: the same
/// snooping, and the host, on the bridge too, reaches the guest there.
#[test]
fn a_guest_on_a_linux_bridge_is_listed_and_reached_by_the_host() {
    let t = Lan::new("c6");
    let dir = tempfile::tempdir().unwrap();
    start_router(&t, dir.path());
    t.host.exec_ok(
        "ip link add hbr0 type bridge && ip link set up0 master hbr0 && ip link set hbr0 up && \
         ip addr del 198.51.100.2/24 dev up0 && ip addr add 198.51.100.2/24 dev hbr0 && \
         ip route add default via 198.51.100.1",
    );
    t.create("c6", "bridged:hbr0", &[], "");
    t.lume_ok(&["run", "c6", "--detach"]);
    let mac = t.get("c6")["macAddress"].as_str().unwrap().to_string();
    let want = eui64(&mac);
    let list = wait_for("the guest's address in ipv6Addresses", BOOT, || {
        let list = listed(&t, "c6");
        list.contains(&want).then_some(list)
    });
    assert_eq!(list, vec![want]);
    let page = wait_for(
        "the guest's page from the host over IPv6",
        Duration::from_secs(30),
        || {
            t.host
                .http_get(&format!("[{want}]:80"))
                .filter(|p| p.contains(&mac))
        },
    );
    assert!(page.contains("lume-test-guest"), "{page}");
    t.lume_ok(&["stop", "c6"]);
}

/// An unsolicited neighbour advertisement for `target` with the guest's MAC
/// as Ethernet source, unicast to that MAC, as hex.
fn forged_advertisement(mac: &str, target: Ipv6Addr) -> String {
    let m: Vec<u8> = mac
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect();
    let mut icmp = vec![136u8, 0, 0, 0, 0x20, 0, 0, 0];
    icmp.extend_from_slice(&target.octets());
    let mut f = Vec::new();
    f.extend_from_slice(&m);
    f.extend_from_slice(&m);
    f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
    f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    f.extend_from_slice(&[58, 255]);
    f.extend_from_slice(&target.octets());
    f.extend_from_slice(&"ff02::1".parse::<Ipv6Addr>().unwrap().octets());
    f.extend_from_slice(&icmp);
    f.iter().map(|b| format!("{b:02x}")).collect()
}
