//! End to end, network policies (docs/networking.md, "Network policy"), in
//! the namespaces of `common::Lan` with two more addresses on the LAN side:
//!
//! ```text
//!  [lan ns]  br0 198.51.100.1/24, 198.51.100.3/24   (the LAN)
//!            lo  192.0.2.1/32                       ("the internet", routed)
//!  [host ns] up0 198.51.100.2/24, lume's NAT 203.0.113.0/25
//! ```
//!
//! Two NAT guests share the checks (TCG boots are slow): `iso` with
//! `--isolate`, `box` allowed only 198.51.100.1:8000/tcp. Each probes every
//! target in rounds (`lume.probes`); the services record who connected.

mod common;

use std::time::{Duration, Instant};

use common::{Lan, Recorder, wait_console, wait_for};

const BOOT: Duration = Duration::from_secs(240);

fn console(t: &Lan, vm: &str) -> String {
    std::fs::read_to_string(t.home.vm_dir(vm).join("console.log")).unwrap_or_default()
}

/// How many rounds said `probe ok TARGET` so far.
fn oks(t: &Lan, vm: &str, target: &str) -> usize {
    let needle = format!("LUME-GUEST: probe ok {target}");
    console(t, vm)
        .lines()
        .filter(|l| l.contains(&needle))
        .count()
}

fn fails(t: &Lan, vm: &str, target: &str) -> usize {
    let needle = format!("LUME-GUEST: probe fail {target}");
    console(t, vm)
        .lines()
        .filter(|l| l.contains(&needle))
        .count()
}

/// Counts the datagrams arriving at `addr` in `ns`, for the test's lifetime.
fn udp_counter(ns: &common::Netns, addr: &str) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
    let n = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let n2 = n.clone();
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    drop(ns.spawn_in(move || {
        let s = std::net::UdpSocket::bind(addr).unwrap();
        tx.send(()).unwrap();
        let mut buf = [0u8; 2048];
        while s.recv(&mut buf).is_ok() {
            n2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }));
    rx.recv().unwrap();
    n
}

#[test]
fn policies_are_enforced_survive_a_flush_and_refuse_modes_that_cannot() {
    let t = Lan::new("po");
    t.home.write_settings(
        "natSubnet: 203.0.113.0/25\nhostSubnet: 203.0.113.128/25\nuserSubnet: 198.51.100.0/24\nnatSubnet6: 2001:db8:64::/64\nhostSubnet6: 2001:db8:65::/64\n",
    );
    t.lan
        .exec_ok("ip addr add 198.51.100.3/24 dev br0 && ip addr add 192.0.2.1/32 dev lo");
    t.host.exec_ok("ip route add 192.0.2.1/32 via 198.51.100.1");
    // Every service on port 8000 (and the allowed one's neighbour 8001).
    let allowed = Recorder::start(&t.lan, "198.51.100.1:8000");
    let other_port = Recorder::start(&t.lan, "198.51.100.1:8001");
    let lan_other = Recorder::start(&t.lan, "198.51.100.3:8000");
    let internet = Recorder::start(&t.lan, "192.0.2.1:8000");
    let host = Recorder::start(&t.host, "0.0.0.0:8000");
    let udp_internet = udp_counter(&t.lan, "192.0.2.1:9000");

    // A mode that cannot enforce a policy refuses it, at create and at set.
    let e = t.lume_fails(
        &common::guest_create_args("nope", "user", &["--isolate"], "")
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(e.contains("--network nat"), "{e}");
    let e = t.lume_fails(&["create", "bad", "--allow-out", "10.0.0.1/8"]);
    assert!(e.contains("10.0.0.0/8"), "{e}");

    // The isolated guest: the internet yes; the host, its gateway, the LAN no.
    t.create(
        "iso",
        "nat",
        &["--isolate"],
        "lume.udp=192.0.2.1:9000 lume.probes=192.0.2.1:8000,198.51.100.2:8000,203.0.113.1:8000,198.51.100.3:8000,198.51.100.1:8000",
    );
    let d = t.get("iso");
    assert_eq!(d["network"]["policy"]["isolate"], true, "{d}");
    // Stopped: the saved policy is shown, in force from the next start.
    assert!(d["network"]["policyInForce"].is_null(), "{d}");
    let text = t.lume_ok(&["get", "iso"]);
    assert!(
        text.contains("network policy: isolate (saved: enforced from the next start)"),
        "{text}"
    );
    t.lume_ok(&["run", "iso", "--detach"]);
    let iso_ip = wait_for("iso's address", BOOT, || {
        t.get("iso")["ipAddress"].as_str().map(str::to_string)
    });
    wait_console(&t.home, "iso", "LUME-GUEST: probe ok 192.0.2.1:8000", BOOT);
    let d = t.get("iso");
    assert_eq!(d["network"]["policyInForce"], true, "{d}");
    // set: refuses a mode that cannot enforce the saved policy.
    let e = t.lume_fails(&["set", "iso", "--network", "user"]);
    assert!(e.contains("--network nat"), "{e}");

    // Mode none: no network at all, so a policy holds (nothing leaves);
    // shown in force, and the doctor says why.
    t.create("offline", "none", &["--isolate"], "");
    t.lume_ok(&["run", "offline", "--detach"]);
    let d = t.get("offline");
    assert_eq!(d["network"]["policyInForce"], true, "{d}");

    // A rule given twice is kept once, with one note on stderr.
    let dup = t.host.lume(
        &t.home,
        &[
            "create",
            "dup",
            "--network",
            "none",
            "--allow-out",
            "198.51.100.1:8000/tcp",
            "--allow-out",
            "198.51.100.1/32:8000/TCP",
            "--allow-out",
            "198.51.100.1:8000/tcp",
        ],
    );
    let err = String::from_utf8_lossy(&dup.stderr);
    assert!(dup.status.success(), "{err}");
    assert_eq!(
        err.matches("Rule given more than once, kept once: --allow-out 198.51.100.1/32:8000/tcp")
            .count(),
        1,
        "{err}"
    );
    assert_eq!(
        t.get("dup")["network"]["policy"]["allowOut"],
        serde_json::json!(["198.51.100.1/32:8000/tcp"])
    );

    // A bridged guest on the LAN (tap + macvlan on up0), allowed one port
    // of the LAN's peer: leased by the LAN's DHCP server through the
    // filter, reaches 8000 and nothing else.
    t.create(
        "lanbox",
        "bridged:up0",
        &["--allow-out", "198.51.100.1:8000/tcp"],
        "lume.probes=198.51.100.1:8000,198.51.100.1:8001,198.51.100.3:8000,192.0.2.1:8000",
    );
    t.lume_ok(&["run", "lanbox", "--detach"]);

    // The allow-listed guest.
    t.create(
        "box",
        "nat",
        &["--allow-out", "198.51.100.1:8000/tcp"],
        &format!(
            "lume.probe=198.51.100.1:8000 lume.udp=198.51.100.3:9000 lume.probes=198.51.100.1:8000,198.51.100.1:8001,198.51.100.3:8000,198.51.100.2:8000,203.0.113.1:8000,{iso_ip}:80,192.0.2.1:8000"
        ),
    );
    t.lume_ok(&["run", "box", "--detach"]);
    wait_console(
        &t.home,
        "box",
        "LUME-GUEST: probe ok 198.51.100.1:8000",
        BOOT,
    );
    let d = t.get("box");
    assert_eq!(
        d["network"]["policy"]["allowOut"],
        serde_json::json!(["198.51.100.1/32:8000/tcp"])
    );
    assert_eq!(d["network"]["policyInForce"], true, "{d}");
    let text = t.lume_ok(&["get", "box"]);
    assert!(
        text.contains("network policy: allow-out 198.51.100.1/32:8000/tcp (in force)"),
        "{text}"
    );

    wait_console(
        &t.home,
        "lanbox",
        "LUME-GUEST: probe ok 198.51.100.1:8000",
        BOOT,
    );
    assert_eq!(t.get("lanbox")["network"]["policyInForce"], true);
    wait_for("lanbox's denied probes to be tried", BOOT, || {
        (fails(&t, "lanbox", "192.0.2.1:8000") >= 2).then_some(())
    });
    for target in ["198.51.100.1:8001", "198.51.100.3:8000", "192.0.2.1:8000"] {
        assert_eq!(oks(&t, "lanbox", target), 0, "lanbox reached {target}");
    }
    t.lume_ok(&["stop", "lanbox"]);

    // A steady stream of denied attempts (and allowed ones) while the whole
    // ruleset of the namespace is flushed, three times.
    let rounds = |t: &Lan| fails(t, "box", "198.51.100.3:8000");
    let before = rounds(&t);
    let udp_denied = udp_counter(&t.lan, "198.51.100.3:9000");
    let mut recovery = Vec::new();
    for _ in 0..3 {
        let seen = allowed.sources().len();
        let flushed = Instant::now();
        t.host.exec_ok("nft flush ruleset");
        let back = wait_for(
            "the allowed destination to work again after a flush",
            Duration::from_secs(30),
            || (allowed.sources().len() > seen).then(Instant::now),
        );
        recovery.push(back - flushed);
        std::thread::sleep(Duration::from_secs(2));
    }
    println!("allowed destination back after nft flush ruleset: {recovery:?}");
    wait_for("the denied probes to keep going", BOOT, || {
        (rounds(&t) >= before + 2).then_some(())
    });
    // The control: iso's stream to the internet arrives.
    assert!(udp_internet.load(std::sync::atomic::Ordering::SeqCst) > 0);
    assert_eq!(
        udp_denied.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "a denied UDP datagram arrived"
    );
    assert_eq!(t.get("box")["network"]["policyInForce"], true);

    // After all that: nothing denied was ever reached.
    wait_for("iso's denied probes to be tried", BOOT, || {
        (fails(&t, "iso", "198.51.100.2:8000") >= 3 && fails(&t, "iso", "198.51.100.1:8000") >= 3)
            .then_some(())
    });
    assert_eq!(oks(&t, "box", "198.51.100.3:8000"), 0);
    assert_eq!(oks(&t, "box", "198.51.100.1:8001"), 0);
    assert_eq!(oks(&t, "box", "198.51.100.2:8000"), 0);
    assert_eq!(oks(&t, "box", "203.0.113.1:8000"), 0);
    assert_eq!(oks(&t, "box", &format!("{iso_ip}:80")), 0);
    assert_eq!(oks(&t, "box", "192.0.2.1:8000"), 0);
    assert_eq!(oks(&t, "iso", "198.51.100.2:8000"), 0);
    assert_eq!(oks(&t, "iso", "203.0.113.1:8000"), 0);
    assert_eq!(oks(&t, "iso", "198.51.100.3:8000"), 0);
    assert_eq!(oks(&t, "iso", "198.51.100.1:8000"), 0);
    assert!(
        other_port.sources().is_empty(),
        "{:?}",
        other_port.sources()
    );
    assert!(lan_other.sources().is_empty(), "{:?}", lan_other.sources());
    assert!(host.sources().is_empty(), "{:?}", host.sources());
    // The internet saw iso (masqueraded as the host), never box.
    assert!(!internet.sources().is_empty());
    // `tc` cannot take the policy off the tap (a tcx link, not a filter).
    let tap = t.get("box")["network"]["hostDevice"]
        .as_str()
        .unwrap()
        .to_string();
    t.host.exec(&format!(
        "tc qdisc del dev {tap} ingress; tc qdisc del dev {tap} clsact; true"
    ));
    assert_eq!(t.get("box")["network"]["policyInForce"], true);

    // --isolate follows the host's addresses: a network the host joins
    // (here the "internet" 192.0.2.0/24) is isolated from then on.
    t.host.exec_ok("ip addr add 192.0.2.200/24 dev up0");
    std::thread::sleep(Duration::from_secs(2));
    let ok_before = oks(&t, "iso", "192.0.2.1:8000");
    let fail_before = fails(&t, "iso", "192.0.2.1:8000");
    wait_for("iso's probes of a now local network to fail", BOOT, || {
        (fails(&t, "iso", "192.0.2.1:8000") >= fail_before + 2).then_some(())
    });
    assert_eq!(oks(&t, "iso", "192.0.2.1:8000"), ok_before);
    t.host.exec_ok("ip addr del 192.0.2.200/24 dev up0");
    let ok_before = oks(&t, "iso", "192.0.2.1:8000");
    wait_for("iso to reach the internet again", BOOT, || {
        (oks(&t, "iso", "192.0.2.1:8000") > ok_before).then_some(())
    });

    // The doctor names each VM's policy and whether it is in force.
    let doctor = t.host.lume(&t.home, &["network", "doctor", "-f", "json"]);
    let report: serde_json::Value = serde_json::from_slice(&doctor.stdout).unwrap();
    let check = |name: &str| {
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no check {name}: {report}"))
    };
    assert_eq!(check("vm box policy")["ok"], true);
    // The guests answer the doctor's probe from the host (replies to the
    // host's connections pass every policy), so a sandbox does not fail it.
    for vm in ["box", "iso"] {
        assert_eq!(check(&format!("vm {vm}"))["ok"], true, "{report}");
    }
    // JSON keeps the structure; the detail is readable rules.
    assert_eq!(check("vm iso policy")["policy"]["isolate"], true);
    assert_eq!(
        check("vm box policy")["policy"]["allowOut"],
        serde_json::json!(["198.51.100.1/32:8000/tcp"])
    );
    let offline = check("vm offline policy");
    assert_eq!(offline["ok"], true);
    assert!(
        offline["detail"]
            .as_str()
            .unwrap()
            .starts_with("in force (no network: nothing leaves the VM): isolate"),
        "{offline}"
    );
    let text =
        String::from_utf8_lossy(&t.host.lume(&t.home, &["network", "doctor"]).stdout).into_owned();
    let line = |vm: &str| {
        text.lines()
            .find(|l| l.contains(&format!("vm {vm} policy:")))
            .unwrap_or_else(|| panic!("no policy line for {vm}: {text}"))
            .to_string()
    };
    assert!(
        line("box").ends_with(": allow-out 198.51.100.1/32:8000/tcp"),
        "{}",
        line("box")
    );
    assert!(line("iso").ends_with(": isolate"), "{}", line("iso"));
    assert!(!text.contains("allowOut"), "{text}");
    t.lume_ok(&["stop", "offline"]);

    // Fail closed at start: a lume that may not load BPF programs (no
    // CAP_BPF / CAP_SYS_ADMIN, still CAP_NET_ADMIN) does not start the VM
    // and leaves no tap behind.
    let taps = |t: &Lan| {
        t.host
            .exec_ok("ip -br link")
            .lines()
            .filter(|l| l.starts_with("lt"))
            .count()
    };
    let before = taps(&t);
    t.create("nocap", "nat", &["--isolate"], "");
    let mut c = std::process::Command::new("ip");
    c.args(["netns", "exec", &t.host.name, "setpriv"])
        .args([
            "--bounding-set=-bpf,-sys_admin",
            "--inh-caps=-bpf,-sys_admin",
        ])
        .arg(common::lume_bin())
        .args(["run", "nocap", "--detach"]);
    t.home.env(&mut c);
    let out = c.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started without its policy: {err}");
    assert!(err.contains("Cannot load the network policy"), "{err}");
    assert_eq!(t.get("nocap")["status"], "stopped");
    assert_eq!(taps(&t), before, "a tap was left behind");

    // set while running changes the saved policy, not the running one;
    // the next start enforces the new one.
    t.lume_ok(&["set", "box", "--allow-out", "198.51.100.3:8000/tcp"]);
    let d = t.get("box");
    assert_eq!(
        d["network"]["policy"]["allowOut"],
        serde_json::json!(["198.51.100.1/32:8000/tcp"])
    );
    // The saved one, pending, is shown beside it.
    assert_eq!(
        d["network"]["savedPolicy"],
        serde_json::json!({"allowOut": ["198.51.100.3/32:8000/tcp"]}),
        "{d}"
    );
    let text = t.lume_ok(&["get", "box"]);
    assert!(
        text.contains(
            "saved network policy (from the next start): allow-out 198.51.100.3/32:8000/tcp"
        ),
        "{text}"
    );
    assert!(t.get("iso")["network"]["savedPolicy"].is_null());
    t.lume_ok(&["stop", "box"]);
    let cfg = std::fs::read_to_string(t.home.vm_dir("box").join("config.json")).unwrap();
    assert!(cfg.contains("198.51.100.3/32:8000/tcp"), "{cfg}");
    std::fs::write(t.home.vm_dir("box").join("console.log"), "").unwrap();
    t.lume_ok(&["run", "box", "--detach"]);
    wait_console(
        &t.home,
        "box",
        "LUME-GUEST: probe ok 198.51.100.3:8000",
        BOOT,
    );
    wait_for("box's old destination to be tried", BOOT, || {
        (fails(&t, "box", "198.51.100.1:8000") >= 3).then_some(())
    });
    assert_eq!(oks(&t, "box", "198.51.100.1:8000"), 0);
    // Cleared: the VM is unrestricted from its next start.
    t.lume_ok(&["stop", "box"]);
    t.lume_ok(&["set", "box", "--clear-policy"]);
    assert!(t.get("box")["network"]["policy"].is_null());
    t.lume_ok(&["stop", "iso"]);
}
