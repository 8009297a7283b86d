//! Guests never reach the host's loopback.
//!
//! 1. Crafted frames, no guest: lume's passt relay is fed TCP SYNs for
//!    127.0.0.1, 0.0.0.0, ::1 and ::ffff:127.0.0.1 (what a root user in a
//!    guest can send with a raw socket); the loopback servers see nothing.
//!    SYNs for the IPv4 and IPv6 gateways pass the relay and do not reach
//!    them either (`--no-map-gw`). The same frames given to passt directly
//!    (the `unsafeHostLoopback` opt-in: a relay that drops nothing, gateways mapped) do reach
//!    them: passt 0.0~git20230309 connects loopback destinations, which is
//!    why the relay exists.
//! 2. Real guests: a user-mode and a NAT guest probe a server on the host
//!    namespace's 127.0.0.1 through their gateways (10.0.2.2's equivalent
//!    and the bridge address) and a server on the LAN. The LAN answers,
//!    loopback never does. (On the old slirp code the user guest's gateway
//!    was the host's 127.0.0.1: this test fails there.) A NAT port on
//!    127.0.0.1 is refused. A crafted SYN for 127.0.0.1 injected into lume0
//!    on a host with route_localnet=1 is dropped by lume's guard chain
//!    (without the guard it is answered). The NAT guest also takes a second
//!    address and announces it: lume's bridge guard keeps it to the address
//!    lume reserved (the host never learns or reaches the spoofed one).

mod common;

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::{LAN_PEER, Lan, Netns, Recorder, wait_console};
use lume::network::passt::Passt;
use lume::network::user::UserNet;

const BOOT: Duration = Duration::from_secs(180);

fn csum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += u32::from(w);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn tcp_syn(sport: u16, dport: u16) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&1000u32.to_be_bytes());
    t.extend_from_slice(&0u32.to_be_bytes());
    t.extend_from_slice(&[5 << 4, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    t
}

/// An Ethernet frame from the guest with a TCP SYN from `src` to `dst`.
fn syn_frame(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    let mut tcp = tcp_syn(sport, dport);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut ph = Vec::new();
            ph.extend_from_slice(&s.octets());
            ph.extend_from_slice(&d.octets());
            ph.extend_from_slice(&[0, 6, 0, tcp.len() as u8]);
            ph.extend_from_slice(&tcp);
            let c = csum(&ph);
            tcp[16..18].copy_from_slice(&c.to_be_bytes());
            let mut ip = vec![0x45, 0, 0, (20 + tcp.len()) as u8, 0, 1, 0, 0, 64, 6, 0, 0];
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            let c = csum(&ip);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            f.extend_from_slice(&[0x08, 0x00]);
            f.extend_from_slice(&ip);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut ph = Vec::new();
            ph.extend_from_slice(&s.octets());
            ph.extend_from_slice(&d.octets());
            ph.extend_from_slice(&(tcp.len() as u32).to_be_bytes());
            ph.extend_from_slice(&[0, 0, 0, 6]);
            ph.extend_from_slice(&tcp);
            let c = csum(&ph);
            tcp[16..18].copy_from_slice(&c.to_be_bytes());
            let mut ip = vec![0x60, 0, 0, 0, 0, tcp.len() as u8, 6, 64];
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            f.extend_from_slice(&[0x86, 0xdd]);
            f.extend_from_slice(&ip);
        }
        _ => unreachable!("one family"),
    }
    f.extend_from_slice(&tcp);
    f
}

/// Sends `frames` (QEMU's stream framing) and counts the connections the
/// loopback listeners accept within two seconds.
fn accepted_after(sock: &mut UnixStream, frames: &[Vec<u8>], listeners: &[TcpListener]) -> usize {
    for f in frames {
        sock.write_all(&(f.len() as u32).to_be_bytes()).unwrap();
        sock.write_all(f).unwrap();
    }
    let mut n = 0;
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        for l in listeners {
            if l.accept().is_ok() {
                n += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    n
}

#[test]
fn crafted_loopback_frames_never_reach_the_host() {
    let ns = Netns::new("lp");
    // passt needs a routable interface: a veth pair with documentation addresses.
    ns.exec_ok(
        "ip link add up0 type veth peer name pe0 && ip link set pe0 up && \
         ip addr add 198.51.100.2/24 dev up0 && ip -6 addr add 2001:db8::2/64 dev up0 nodad && \
         ip link set up0 up && ip route add default via 198.51.100.1 && \
         ip -6 route add default via 2001:db8::1",
    );
    let run_dir = tempfile::tempdir().unwrap();
    let dir = run_dir.path().to_path_buf();
    let (blocked, opted_in, passt_gone, gateways, opted_in_log) = ns.within(move || {
        let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = v4.local_addr().unwrap().port();
        let v6 = TcpListener::bind(SocketAddr::from((Ipv6Addr::LOCALHOST, port))).unwrap();
        let listeners = [v4, v6];
        for l in &listeners {
            l.set_nonblocking(true).unwrap();
        }
        let guest4 = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 15));
        let guest6: IpAddr = "2001:db8::2".parse().unwrap();
        let frames: Vec<Vec<u8>> = [
            (guest4, "127.0.0.1"),
            (guest4, "127.1.2.3"),
            (guest4, "0.0.0.0"),
            (guest6, "::1"),
            (guest6, "::ffff:127.0.0.1"),
            // The gateways (IPv4 as lume sets it, IPv6 the host's router):
            // with --no-map-gw they are not the host's loopback.
            (guest4, "192.0.2.2"),
            (guest6, "2001:db8::1"),
        ]
        .iter()
        .enumerate()
        .map(|(i, (src, dst))| syn_frame(*src, dst.parse().unwrap(), 40000 + i as u16, port))
        .collect();
        let net: UserNet = "192.0.2.0/24".parse().unwrap();
        let (passt, fd) = Passt::start(&net, &[], false, &dir).unwrap();
        let pid = passt.pid();
        let mut sock = UnixStream::from(fd);
        let blocked = accepted_after(&mut sock, &frames, &listeners);
        drop(sock);
        drop(passt);
        let passt_gone = !std::path::Path::new(&format!("/proc/{pid}")).exists();
        let (passt, fd) = Passt::start(&net, &[], true, &dir).unwrap();
        let mut sock = UnixStream::from(fd);
        // The control: passt connects it. Sent again each round until it
        // does (a loaded machine may take passt longer than one window to
        // be ready), at most ten rounds, each from a new source port: passt
        // takes a SYN again for a flow it already has as a retransmission.
        let mut opted_in = 0;
        for round in 0..10u16 {
            let syn = syn_frame(guest4, "127.0.0.1".parse().unwrap(), 41000 + round, port);
            opted_in = accepted_after(&mut sock, &[syn], &listeners);
            if opted_in > 0 {
                break;
            }
        }
        let opted_in_log = std::fs::read_to_string(&passt.log).unwrap_or_default();
        drop(passt);
        // The opt-in maps the gateways to loopback, as slirp did.
        let (passt, fd) = Passt::start(&net, &[], true, &dir).unwrap();
        let mut sock = UnixStream::from(fd);
        let mut gateways = 0;
        for _ in 0..5 {
            // A SYN sent again for a connection already made is no new one.
            gateways += accepted_after(&mut sock, &frames[5..], &listeners);
            if gateways >= 2 {
                break;
            }
        }
        drop(passt);
        (blocked, opted_in, passt_gone, gateways, opted_in_log)
    });
    assert_eq!(blocked, 0, "a crafted loopback SYN got through the relay");
    assert!(
        passt_gone,
        "passt was stopped and reaped with its attachment"
    );
    assert!(
        opted_in > 0,
        "without the relay passt connects a crafted SYN to 127.0.0.1 (passt 0.0~git20230309); \
         if this fails, passt itself now refuses loopback destinations; passt's log: {opted_in_log}"
    );
    assert_eq!(
        gateways, 2,
        "with unsafeHostLoopback the IPv4 and IPv6 gateways are the host's loopback"
    );
}

#[test]
fn user_and_nat_guests_never_reach_host_loopback() {
    let t = Lan::new("lb");
    t.home.write_settings(
        "natSubnet: 203.0.113.0/24\nhostSubnet: 198.51.100.128/25\nuserSubnet: 192.0.2.0/24\nnatSubnet6: 2001:db8:64::/64\nhostSubnet6: 2001:db8:65::/64\n",
    );
    let lan = Recorder::start(&t.lan, &format!("{LAN_PEER}:9000"));
    let lo4 = Recorder::start(&t.host, "127.0.0.1:9100");
    let lo6 = Recorder::start(&t.host, "[::1]:9100");

    // A NAT port on loopback is refused, at create and at run.
    let args = common::guest_create_args("bad", "nat", &["--publish", "127.0.0.1:8080:80"], "");
    let err = t.lume_fails(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        err.contains("Cannot publish 127.0.0.1:8080:80/tcp in network mode 'nat'")
            && err.contains("--network user"),
        "{err}"
    );

    // user: the gateway 192.0.2.2 (slirp mapped it to the host's 127.0.0.1).
    let lan_probe = format!("{LAN_PEER}:9000");
    t.create(
        "u",
        "user",
        &[],
        &format!("lume.probes=192.0.2.2:9100,{lan_probe}"),
    );
    // nat: the bridge's address, the guest's gateway.
    t.create(
        "n",
        "nat",
        &[],
        &format!("lume.probes=203.0.113.1:9100,{lan_probe} lume.spoof=203.0.113.88"),
    );
    let err = t.lume_fails(&["run", "n", "--publish", "127.0.0.1:8081:80"]);
    assert!(
        err.contains("Cannot publish 127.0.0.1:8081:80/tcp"),
        "{err}"
    );
    t.lume_ok(&["run", "u", "--detach"]);
    t.lume_ok(&["run", "n", "--detach"]);

    // dnsmasq (its own user, behind /run/lume's 0700 directories) read the
    // reservation: the NAT guest got the address lume reserved and publishes to.
    wait_console(&t.home, "n", "LUME-GUEST: lease eth0 203.0.113.2", BOOT);
    for (vm, gw) in [("u", "192.0.2.2:9100"), ("n", "203.0.113.1:9100")] {
        wait_console(
            &t.home,
            vm,
            &format!("LUME-GUEST: probe ok {lan_probe}"),
            BOOT,
        );
        // Three full rounds after the LAN answered.
        let start = std::fs::read_to_string(t.home.vm_dir(vm).join("console.log"))
            .unwrap()
            .matches(&format!("probe fail {gw}"))
            .count();
        let text = common::wait_for(
            &format!("{vm}: three more probes of {gw}"),
            Duration::from_secs(60),
            || {
                let text = std::fs::read_to_string(t.home.vm_dir(vm).join("console.log")).ok()?;
                let fails = text.matches(&format!("probe fail {gw}")).count();
                (fails >= start + 3 || text.contains(&format!("probe ok {gw}"))).then_some(text)
            },
        );
        assert!(
            !text.contains(&format!("probe ok {gw}")),
            "{vm} reached the host's loopback through {gw}"
        );
    }
    // A guest that crafts packets for 127.0.0.1 (played by a veth in lume0),
    // on a host with route_localnet=1, which would otherwise deliver them:
    // lume's guard drops them. The same injection to the bridge's own
    // address is answered, so the injection itself works.
    t.host.exec_ok(
        "sysctl -qw net.ipv4.conf.all.route_localnet=1 net.ipv4.conf.lume0.route_localnet=1 && \
         ip link add lbx0 type veth peer name lbx1 && ip link set lbx0 master lume0 && \
         ip link set lbx0 up && ip link set lbx1 up && \
         ip neigh replace 203.0.113.77 lladdr 02:00:6c:75:6d:65 dev lume0",
    );
    // Read after adding the port: a bridge takes the lowest MAC of its ports.
    let bridge_mac = t
        .host
        .exec_ok("cat /sys/class/net/lume0/address")
        .trim()
        .to_string();
    let open = Recorder::start(&t.host, "203.0.113.1:9101");
    let inject = |dst: &str, port: &str| {
        t.host
            .exec_ok(&format!(
                "python3 {}/tests/inject_syn.py lbx1 {bridge_mac} 203.0.113.77 {dst} {port}",
                env!("CARGO_MANIFEST_DIR")
            ))
            .trim()
            .to_string()
    };
    assert_eq!(
        inject("203.0.113.1", "9101"),
        "ANSWERED",
        "the injection works"
    );
    assert_eq!(
        inject("127.0.0.1", "9100"),
        "SILENT",
        "a crafted 127.0.0.1 SYN was answered"
    );
    drop(open);

    // The NAT guest also takes 203.0.113.88 (another VM's address, say) and
    // announces it to its gateway: lume's bridge guard keeps it to its own
    // address, so the host never learns it and nothing reaches it there.
    wait_console(&t.home, "n", "LUME-GUEST: spoofing 203.0.113.88", BOOT);
    let guest_mac = t.get("n")["macAddress"].as_str().unwrap().to_string();
    std::thread::sleep(Duration::from_secs(2)); // a few of its announcements
    let reply = t.host.http_get("203.0.113.2:80").unwrap_or_default();
    assert!(
        reply.contains("lume-test-guest"),
        "its own address: {reply:?}"
    );
    assert_eq!(
        t.host.http_get("203.0.113.88:80"),
        None,
        "the spoofed address answered"
    );
    // A guest's router advertisement cannot make it the host's IPv6
    // gateway: lume's bridge (IPv6 on since lume gives IPv6 there) takes no
    // advertisement, address or redirect from its guests.
    for (key, want) in [
        ("accept_ra", "0"),
        ("autoconf", "0"),
        ("accept_redirects", "0"),
    ] {
        assert_eq!(
            t.host
                .exec_ok(&format!("cat /proc/sys/net/ipv6/conf/lume0/{key}"))
                .trim(),
            want,
            "{key}"
        );
    }
    // lume's dnsmasq answers its guests and this host, not a LAN neighbour
    // that routes to the bridge's address through the host.
    let dns_open = |ns: &Netns| {
        ns.exec("timeout 3 bash -c '</dev/tcp/203.0.113.1/53'")
            .status
            .success()
    };
    assert!(dns_open(&t.host), "the host reaches lume's dnsmasq");
    t.lan
        .exec_ok("ip route add 203.0.113.0/24 via 198.51.100.2");
    assert!(!dns_open(&t.lan), "a LAN neighbour reached lume's dnsmasq");
    let neigh = t.host.exec_ok("ip neigh show 203.0.113.88");
    assert!(
        !neigh.contains(&guest_mac),
        "the host learned the spoofed address: {neigh}"
    );

    assert!(lo4.sources().is_empty(), "127.0.0.1: {:?}", lo4.sources());
    assert!(lo6.sources().is_empty(), "::1: {:?}", lo6.sources());
    assert!(!lan.sources().is_empty());

    let passt = passt_of(&t.home, "u");
    t.lume_ok(&["stop", "u"]);
    t.lume_ok(&["stop", "n"]);
    assert!(
        !std::path::Path::new(&format!("/proc/{passt}")).exists(),
        "passt left running after stop"
    );

    // A killed supervisor takes its passt along (PR_SET_PDEATHSIG).
    t.lume_ok(&["run", "u", "--detach"]);
    let passt = passt_of(&t.home, "u");
    common::sh(&format!("kill -9 {}", supervisor_of(&t.home, "u")));
    common::wait_for("passt to go", Duration::from_secs(10), || {
        (!std::path::Path::new(&format!("/proc/{passt}")).exists()).then_some(())
    });
}

/// The supervisor's pid from the VM's run.json.
fn supervisor_of(home: &common::Home, vm: &str) -> u64 {
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(home.vm_dir(vm).join("run.json")).unwrap())
            .unwrap();
    state["pid"].as_u64().unwrap()
}

/// The pid of the passt child of the VM's supervisor.
fn passt_of(home: &common::Home, vm: &str) -> u64 {
    // passt re-executes itself as passt.avx2 where the CPU allows.
    let out = common::sh(&format!("pgrep -P {} passt", supervisor_of(home, vm)));
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("no passt child: {out:?}"))
}
