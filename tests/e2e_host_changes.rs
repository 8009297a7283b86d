//! End to end, a NAT guest while the host's network changes under it, as a
//! laptop's does: a VPN rewrites the host's resolv.conf (in place, by
//! rename, through a symlink, to a stub on the host's loopback) and the
//! guest's DNS answers follow within seconds; the default route moves to
//! another uplink (Wi-Fi off, a dock's Ethernet on, and back) and the guest's
//! connections keep going out, masqueraded as the new uplink.
//!
//! The host's resolv.conf is never the real one: lume runs in a private
//! mount namespace whose /etc is an overlay (`with_own_etc`), rewritten
//! through `nsenter` into that namespace.

mod common;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::{Lan, Recorder, wait_console, wait_for};

const BOOT: Duration = Duration::from_secs(180);
/// How soon the guest's answers must follow the host's resolvers.
const FOLLOW: Duration = Duration::from_secs(5);

const DNS_A: &str = "198.51.100.53";
const DNS_B: &str = "198.51.100.54";
const ANSWER_A: &str = "192.0.2.10";
const ANSWER_B: &str = "192.0.2.20";

/// Runs `lume run VM --detach` in the host namespace inside a new mount
/// namespace whose /etc is an overlay of the real one (upper layer on a
/// tmpfs at `scratch`), with /etc/resolv.conf naming `server`. The detached
/// supervisor and the dnsmasq it starts stay in that mount namespace.
fn run_with_own_etc(t: &Lan, vm: &str, scratch: &std::path::Path, server: &str) {
    let script = format!(
        "mount -t tmpfs tmpfs {s} && mkdir {s}/upper {s}/work {s}/resolvconf && \
         mount -t overlay overlay -o lowerdir=/etc,upperdir={s}/upper,workdir={s}/work /etc && \
         rm -f /etc/resolv.conf && printf 'nameserver {server}\\n' > /etc/resolv.conf && \
         exec \"$0\" run {vm} --detach",
        s = scratch.display()
    );
    let mut c = std::process::Command::new("ip");
    c.args(["netns", "exec", &t.host.name])
        .args(["unshare", "--mount", "--propagation", "private", "sh", "-c"])
        .arg(&script)
        .arg(common::lume_bin());
    t.home.env(&mut c);
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "lume run {vm}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The NAT network's runtime directory of the host namespace.
fn nat_dir(t: &Lan) -> std::path::PathBuf {
    let ino = common::sh(&format!("stat -L -c %i /run/netns/{}", t.host.name));
    std::path::PathBuf::from(format!("/run/lume/net-{}/nat", ino.trim()))
}

/// A shell command in the mount namespace lume's dnsmasq runs in.
fn in_lumes_etc(t: &Lan, cmd: &str) {
    let pid = std::fs::read_to_string(nat_dir(t).join("dnsmasq.pid")).unwrap();
    common::sh(&format!("nsenter -t {} -m -- sh -c '{cmd}'", pid.trim()));
}

/// Waits until the guest's console, after `from` bytes, shows `answer` for
/// probe.test; returns how long that took.
fn answers(t: &Lan, vm: &str, from: usize, answer: &str) -> Duration {
    let start = Instant::now();
    let path = t.home.vm_dir(vm).join("console.log");
    let needle = format!("LUME-GUEST: dns probe.test {answer}");
    wait_for(&needle, FOLLOW, || {
        let text = std::fs::read(&path).ok()?;
        String::from_utf8_lossy(&text[from.min(text.len())..])
            .contains(&needle)
            .then_some(())
    });
    start.elapsed()
}

fn console_len(t: &Lan, vm: &str) -> usize {
    std::fs::metadata(t.home.vm_dir(vm).join("console.log"))
        .map(|m| m.len() as usize)
        .unwrap_or(0)
}

#[test]
fn guest_dns_follows_the_hosts_resolvers() {
    let t = Lan::new("dn");
    // Two DNS servers on the LAN answering probe.test differently.
    let dir = tempfile::tempdir().unwrap();
    for (ip, answer, n) in [(DNS_A, ANSWER_A, "a"), (DNS_B, ANSWER_B, "b")] {
        t.lan.exec_ok(&format!(
            "ip addr add {ip}/24 dev br0 && \
             dnsmasq --conf-file=/dev/null --no-resolv --no-hosts --bind-interfaces \
             --listen-address={ip} --address=/probe.test/{answer} --local-ttl=0 \
             --pid-file={d}/{n}.pid",
            d = dir.path().display()
        ));
    }
    t.create("dns", "nat", &[], "lume.dns=probe.test");
    let scratch = tempfile::tempdir().unwrap();
    run_with_own_etc(&t, "dns", scratch.path(), DNS_A);
    wait_console(
        &t.home,
        "dns",
        &format!("LUME-GUEST: dns probe.test {ANSWER_A}"),
        BOOT,
    );

    // 1. NetworkManager's way: a new file renamed over resolv.conf.
    let from = console_len(&t, "dns");
    in_lumes_etc(
        &t,
        &format!(
            "printf \"nameserver {DNS_B}\\n\" > /etc/resolv.conf.new && mv /etc/resolv.conf.new /etc/resolv.conf"
        ),
    );
    let took = answers(&t, "dns", from, ANSWER_B);
    eprintln!("renamed resolv.conf: guest follows after {took:?}");

    // 2. Rewritten in place, twice within a second (dnsmasq's own polling
    //    compares whole-second modification times and may miss the last).
    let from = console_len(&t, "dns");
    in_lumes_etc(
        &t,
        &format!("printf \"nameserver {DNS_A}\\n\" > /etc/resolv.conf"),
    );
    let took = answers(&t, "dns", from, ANSWER_A);
    eprintln!("rewritten in place: guest follows after {took:?}");
    in_lumes_etc(
        &t,
        &format!(
            "printf \"nameserver {DNS_B}\\n\" > /etc/resolv.conf; sleep 0.2; printf \"nameserver {DNS_A}\\n\" > /etc/resolv.conf; sleep 0.2; printf \"nameserver {DNS_B}\\n\" > /etc/resolv.conf"
        ),
    );
    let from = console_len(&t, "dns");
    let took = answers(&t, "dns", from, ANSWER_B);
    eprintln!("three rewrites within half a second: guest follows after {took:?}");
    std::thread::sleep(Duration::from_secs(1));
    let text = std::fs::read(t.home.vm_dir("dns").join("console.log")).unwrap();
    let tail = String::from_utf8_lossy(&text[from..]).into_owned();
    let settled = &tail[tail.find(&format!("dns probe.test {ANSWER_B}")).unwrap()..];
    assert!(
        !settled.contains(&format!("dns probe.test {ANSWER_A}")),
        "the last rewrite counts: {settled}"
    );

    // 3. resolvconf's and systemd-resolved's way: a symlink to a file that
    //    is itself replaced by rename.
    let rc = format!("{}/resolvconf", scratch.path().display());
    let from = console_len(&t, "dns");
    in_lumes_etc(
        &t,
        &format!(
            "printf \"nameserver {DNS_A}\\n\" > {rc}/resolv.conf && ln -s {rc}/resolv.conf /etc/resolv.conf.new && mv -T /etc/resolv.conf.new /etc/resolv.conf"
        ),
    );
    let took = answers(&t, "dns", from, ANSWER_A);
    eprintln!("symlinked resolv.conf: guest follows after {took:?}");
    let from = console_len(&t, "dns");
    in_lumes_etc(
        &t,
        &format!("printf \"nameserver {DNS_B}\\n\" > {rc}/new && mv {rc}/new {rc}/resolv.conf"),
    );
    let took = answers(&t, "dns", from, ANSWER_B);
    eprintln!("symlink target renamed: guest follows after {took:?}");

    // 4. A stub resolver on the host's loopback (systemd-resolved's
    //    127.0.0.53): lume's dnsmasq forwards to it.
    t.host.exec_ok(&format!(
        "dnsmasq --conf-file=/dev/null --no-resolv --no-hosts --bind-interfaces \
         --listen-address=127.0.0.53 --server={DNS_A} --no-negcache --cache-size=0 \
         --pid-file={}/stub.pid",
        dir.path().display()
    ));
    let from = console_len(&t, "dns");
    in_lumes_etc(
        &t,
        &format!("printf \"nameserver 127.0.0.53\\n\" > {rc}/new && mv {rc}/new {rc}/resolv.conf"),
    );
    let took = answers(&t, "dns", from, ANSWER_A);
    eprintln!("loopback stub: guest follows after {took:?}");

    let servers = std::fs::read_to_string(nat_dir(&t).join("servers.conf")).unwrap();
    assert!(servers.contains("server=127.0.0.53\n"), "{servers}");
    let log = std::fs::read_to_string(t.home.vm_dir("dns").join("lume.log")).unwrap();
    assert!(
        log.contains(
            "the host's DNS servers changed: dnsmasq for lume0 now forwards to 127.0.0.53"
        ),
        "{log}"
    );
    // The doctor, run where lume's dnsmasq runs, says where queries go.
    let pid = std::fs::read_to_string(nat_dir(&t).join("dnsmasq.pid")).unwrap();
    let mut c = std::process::Command::new("nsenter");
    c.args(["-t", pid.trim(), "-m", "-n", "--"])
        .arg(common::lume_bin())
        .args(["network", "doctor", "-f", "json"]);
    t.home.env(&mut c);
    let report: serde_json::Value = serde_json::from_slice(&c.output().unwrap().stdout).unwrap();
    let dns = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "dns lume0")
        .unwrap_or_else(|| panic!("{report}"));
    assert_eq!(dns["ok"], true, "{dns}");
    assert!(
        dns["detail"].as_str().unwrap().ends_with("127.0.0.53"),
        "{dns}"
    );
    t.lume_ok(&["stop", "dns"]);
}

/// A peer only reachable through the default route, whichever uplink
/// carries it.
const PEER: &str = "192.0.2.100";
const WIFI_IP: &str = "198.51.100.2";
const DOCK_IP: &str = "192.0.2.253";

/// Records the source address of every datagram to `addr` in a namespace.
struct UdpRecorder {
    seen: std::sync::Arc<std::sync::Mutex<Vec<IpAddr>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl UdpRecorder {
    fn start(ns: &common::Netns, addr: &str) -> Self {
        use std::sync::atomic::Ordering;
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (s2, st2) = (seen.clone(), stop.clone());
        let addr: std::net::SocketAddr = addr.parse().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        ns.spawn_in(move || {
            let sock = std::net::UdpSocket::bind(addr).unwrap();
            sock.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            tx.send(()).unwrap();
            let mut buf = [0u8; 1500];
            while !st2.load(Ordering::SeqCst) {
                if let Ok((_, from)) = sock.recv_from(&mut buf) {
                    s2.lock().unwrap().push(from.ip());
                }
            }
        });
        rx.recv().unwrap();
        Self { seen, stop }
    }

    fn count(&self, ip: IpAddr) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| **s == ip)
            .count()
    }

    fn total(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// Sources of the datagrams after the first `from`.
    fn since(&self, from: usize) -> Vec<IpAddr> {
        self.seen.lock().unwrap()[from..].to_vec()
    }
}

impl Drop for UdpRecorder {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn nat_follows_the_default_route_to_another_uplink() {
    let t = Lan::new("du");
    // The peer lives behind the LAN router, off-link for the host; the dock
    // is a second link from the host to that router.
    t.lan.exec_ok(&format!(
        "ip addr add {PEER}/32 dev lo && \
         ip link add dock0 type veth peer name up1 netns {} && \
         ip addr add 192.0.2.254/30 dev dock0 && ip link set dock0 up",
        t.host.name
    ));
    t.host.exec_ok(&format!("ip addr add {DOCK_IP}/30 dev up1"));
    let peer = Recorder::start(&t.lan, &format!("{PEER}:9000"));
    let flow = UdpRecorder::start(&t.lan, &format!("{PEER}:9001"));
    t.create(
        "up",
        "nat",
        &[],
        &format!("lume.probe={PEER}:9000 lume.udp={PEER}:9001"),
    );
    t.lume_ok(&["run", "up", "--detach"]);
    wait_console(&t.home, "up", "LUME-GUEST: probe ok", BOOT);
    let wifi: IpAddr = WIFI_IP.parse().unwrap();
    let dock: IpAddr = DOCK_IP.parse().unwrap();
    let count = |ip: IpAddr| peer.sources().iter().filter(|s| **s == ip).count();
    // The recorder notes a connection a moment after the guest saw it accepted.
    wait_for(
        "the peer to record the guest's probe",
        Duration::from_secs(10),
        || (count(wifi) > 0).then_some(()),
    );
    wait_for("the guest's UDP flow", Duration::from_secs(20), || {
        (flow.count(wifi) > 3).then_some(())
    });

    // 1. A dock is plugged in and its route preferred (NetworkManager's
    //    metrics: Ethernet 100, Wi-Fi 600); Wi-Fi stays up.
    let start = Instant::now();
    t.host.exec_ok(
        "ip link set up1 up && ip route add default via 192.0.2.254 dev up1 metric 100 && \
             ip route add default via 198.51.100.1 dev up0 metric 600 && \
             ip route del default via 198.51.100.1 dev up0 metric 0",
    );
    wait_for(
        "connections through the dock",
        Duration::from_secs(10),
        || (count(dock) > 0).then_some(()),
    );
    eprintln!(
        "new connections through the dock after {:?}",
        start.elapsed()
    );
    // The flow the guest kept open follows too (the old uplink is still up,
    // so the kernel keeps its mapping unless lume drops it).
    wait_for(
        "the UDP flow through the dock",
        Duration::from_secs(5),
        || (flow.count(dock) > 0).then_some(()),
    );
    eprintln!(
        "the open UDP flow through the dock after {:?}",
        start.elapsed()
    );
    std::thread::sleep(Duration::from_secs(1));
    let n = flow.total();
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        flow.since(n).iter().all(|s| *s == dock) && flow.total() > n,
        "{:?}",
        flow.since(n)
    );

    // 2. Wi-Fi goes off.
    t.host.exec_ok("ip link set up0 down");
    std::thread::sleep(Duration::from_secs(1));

    // 3. Wi-Fi comes back as the preferred uplink; the dock is unplugged.
    let before = count(wifi);
    let flow_before = flow.count(wifi);
    let start = Instant::now();
    t.host.exec_ok(
        "ip link set up0 up && ip route add default via 198.51.100.1 dev up0 metric 10 && \
         ip link del up1",
    );
    wait_for(
        "connections through Wi-Fi again",
        Duration::from_secs(10),
        || (count(wifi) > before).then_some(()),
    );
    eprintln!("through Wi-Fi again after {:?}", start.elapsed());
    wait_for(
        "the UDP flow through Wi-Fi again",
        Duration::from_secs(5),
        || (flow.count(wifi) > flow_before).then_some(()),
    );
    eprintln!(
        "the UDP flow through Wi-Fi again after {:?}",
        start.elapsed()
    );
    let fails_after = |from: usize| {
        let text = std::fs::read(t.home.vm_dir("up").join("console.log")).unwrap();
        let tail = String::from_utf8_lossy(&text[from..]).into_owned();
        (
            tail.matches("probe ok").count(),
            tail.matches("probe fail").count(),
        )
    };
    // Settled: the guest's connections keep succeeding.
    let from = console_len(&t, "up");
    std::thread::sleep(Duration::from_secs(3));
    let (ok, fail) = fails_after(from);
    assert!(ok >= 3 && fail == 0, "ok {ok}, fail {fail}");
    t.lume_ok(&["stop", "up"]);
}

/// A bridged VM survives its parent interface going away (a USB NIC
/// unplugged) and coming back: while it is gone the doctor and `lume get`
/// say the VM waits for it; once a link of that name is back, the VM is
/// re-attached without a reboot, keeps its address and is reachable from
/// the LAN again. How long that takes is printed (bench/heal.sh-style
/// numbers belong in BENCHMARKS.md); the bound asserted is generous.
#[test]
fn a_bridged_vm_whose_parent_goes_away_is_reattached_when_it_returns() {
    let t = Lan::new("dp");
    let peer = Recorder::start(&t.lan, &format!("{}:9000", common::LAN_PEER));
    t.create(
        "usb",
        "bridged:up0",
        &[],
        &format!("lume.probe={}:9000", common::LAN_PEER),
    );
    t.lume_ok(&["run", "usb", "--detach"]);
    let console = wait_console(&t.home, "usb", "LUME-GUEST: probe ok", BOOT);
    let leased = console
        .lines()
        .find_map(|l| l.strip_prefix("LUME-GUEST: lease eth0 "))
        .and_then(|l| l.split('/').next())
        .unwrap()
        .to_string();
    let guest: std::net::SocketAddr = format!("{leased}:7").parse().unwrap();
    // Only a guest whose echo service answers counts as reachable: one
    // attempt is one SYN with a short timeout, so the first success after
    // the return is seen within that timeout.
    let reachable = || {
        t.lan.within(move || {
            use std::io::{Read, Write};
            let mut s =
                std::net::TcpStream::connect_timeout(&guest, Duration::from_millis(200)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
            s.write_all(b"back\n").ok()?;
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).ok()?;
            (&buf == b"back\n").then_some(())
        })
    };
    wait_for(
        "the guest's echo from the LAN",
        Duration::from_secs(20),
        reachable,
    );
    let doctor = || {
        let out = t.host.lume(&t.home, &["network", "doctor", "-f", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "vm usb")
            .cloned()
            .unwrap()
    };
    assert_eq!(doctor()["ok"], true, "{}", doctor());
    let d = t.get("usb");
    assert_eq!(d["network"]["attachment"], "attached", "{d}");
    let tap = d["network"]["hostDevice"].as_str().unwrap().to_string();
    assert!(tap.starts_with("lt"), "a tap QEMU keeps: {tap}");

    // Unplugged: the veth (and with it the macvlan) is gone, the tap stays.
    t.host.exec_ok("ip link del up0");
    let check = wait_for(
        "the doctor to see up0 gone",
        Duration::from_secs(10),
        || {
            let c = doctor();
            (c["ok"] == false).then_some(c)
        },
    );
    let detail = check["detail"].as_str().unwrap();
    assert!(
        detail.contains("the interface up0 is gone") && detail.contains("waits for it"),
        "{detail}"
    );
    assert_eq!(t.get("usb")["network"]["attachment"], "waiting-for-parent");
    let text = t.lume_ok(&["get", "usb"]);
    assert!(text.contains("(waiting for up0)"), "{text}");
    assert!(t.host.exec_ok("ip -br link").contains(&tap));
    assert!(reachable().is_none(), "reachable without its parent");

    // Something else takes the name first (a VPN's tunnel): not bridgeable,
    // so the VM keeps waiting and lume's log says why.
    t.host
        .exec_ok("ip tuntap add up0 mode tun && ip link set up0 up");
    wait_for("lume to refuse the tunnel", Duration::from_secs(10), || {
        let log = std::fs::read_to_string(t.home.vm_dir("usb").join("lume.log")).ok()?;
        log.contains("cannot re-attach to up0 yet").then_some(log)
    });
    let check = doctor();
    assert_eq!(check["ok"], false, "{check}");
    assert!(
        check["detail"]
            .as_str()
            .unwrap()
            .contains("being re-attached"),
        "{check}"
    );
    assert_eq!(t.get("usb")["network"]["attachment"], "reattaching");
    assert!(!t.host.exec_ok("ip -br link").contains("lmv"));
    t.host.exec_ok("ip link del up0");
    std::thread::sleep(Duration::from_secs(1));

    // Plugged back: a new veth of the same name, its peer on the LAN.
    let back = Instant::now();
    t.host.exec_ok(&format!(
        "ip link add up0 type veth peer name lanport netns {} && \
         ip addr add 198.51.100.2/24 dev up0 && ip link set up0 up && \
         ip route add default via 198.51.100.1",
        t.lan.name
    ));
    t.lan
        .exec_ok("ip link set lanport master br0 && ip link set lanport up");
    let mut attempts = 0;
    wait_for("the guest reachable again", Duration::from_secs(30), || {
        attempts += 1;
        reachable()
    });
    eprintln!(
        "reachable from the LAN {} ms after up0 came back ({attempts} attempts)",
        back.elapsed().as_millis()
    );
    // The same guest, not rebooted, with the same address, which its own
    // connections use again.
    let console =
        String::from_utf8_lossy(&std::fs::read(t.home.vm_dir("usb").join("console.log")).unwrap())
            .into_owned();
    assert_eq!(
        console.matches("LUME-GUEST: booted").count(),
        1,
        "a second boot"
    );
    let seen = peer.sources().len();
    wait_for(
        "the guest's probes from its address",
        Duration::from_secs(20),
        || {
            let now = peer.sources();
            (now.len() > seen).then_some(())
        },
    );
    assert!(
        peer.sources().iter().all(|ip| ip.to_string() == leased),
        "{:?}",
        peer.sources()
    );
    assert_eq!(t.get("usb")["ipAddress"], leased.as_str());
    assert_eq!(t.get("usb")["network"]["attachment"], "attached");
    wait_for("a healthy doctor", Duration::from_secs(10), || {
        (doctor()["ok"] == true).then_some(())
    });
    let log = std::fs::read_to_string(t.home.vm_dir("usb").join("lume.log")).unwrap();
    assert!(
        log.contains("up0 is gone") && log.contains("re-attached to up0"),
        "{log}"
    );
    t.lume_ok(&["stop", "usb"]);
    let links = t.host.exec_ok("ip -br link");
    assert!(!links.contains("lmv") && !links.contains(&tap), "{links}");
}
