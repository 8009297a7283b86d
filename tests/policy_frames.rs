//! A hostile guest's crafted frames against lume's real policy filter on
//! real taps (docs/networking.md, "Network policy"): what a unit test with
//! BPF_PROG_TEST_RUN cannot show, because the kernel changes the frame
//! around tc (checksum offload written after the filter, VLAN tags taken
//! off before it).
//!
//! In a namespace the test creates: a Linux bridge `br0` joining the VMs'
//! taps, opened and policed as lume does (`Tap::create`, with a virtio-net
//! header; `policy::tc::enforce`), and a "LAN" tap the test reads: what
//! arrives there got past the filter.
//!
//! ```text
//!  lg0 (nat-like ctx: guest 203.0.113.50, gateway 203.0.113.1) ┐
//!  lb0 (bridged ctx: no guest address, no gateway)              ├ br0 ─ ll0 (read)
//!  lv0 (the same tap with no filter: the harness's control)     ┘
//! ```
//! Every policy allows only 198.51.100.2:8000/udp.

mod common;

use common::sh;

use common::frames::{drain, plain, sum16};

use std::io::Write;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use lume::network::kernel::netlink::Netlink;
use lume::network::kernel::tap::Tap;
use lume::network::policy::Policy;
use lume::network::policy::bpf::Context;
use lume::network::policy::skb::SkbLayout;

const GUEST: [u8; 4] = [203, 0, 113, 50];
const SERVER: [u8; 4] = [198, 51, 100, 2];
const MAC_G: [u8; 6] = [0x52, 0x54, 0, 0xaa, 0, 1];
const MAC_B: [u8; 6] = [0x52, 0x54, 0, 0xaa, 0, 2];
const MAC_V: [u8; 6] = [0x52, 0x54, 0, 0xaa, 0, 3];
const SERVER_MAC: [u8; 6] = [0x52, 0x54, 0, 0xbb, 0, 1];

/// Ethernet + IPv4 + UDP `sport` -> `dport`, payload `tag` + 2 spare bytes.
fn udp(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    tag: &[u8],
) -> Vec<u8> {
    let payload_len = tag.len() + 2;
    let mut f = Vec::new();
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 8 + payload_len) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0, 64, 17, 0, 0]);
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    let c = !(sum16(&ip) as u16);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&((8 + payload_len) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]); // no UDP checksum
    f.extend_from_slice(tag);
    f.extend_from_slice(&[0, 0]);
    f
}

/// A frame to the allowed 198.51.100.2:8000 marked "needs checksum" with
/// the checksum's place on the destination port, its spare payload bytes
/// chosen so the checksum the kernel writes there is 9999; behind a
/// virtio-net header (flags NEEDS_CSUM, csum_start 34, csum_offset 2).
fn checksum_smuggler(src_mac: [u8; 6], src: [u8; 4], tag: &[u8]) -> Vec<u8> {
    checksum_at(src_mac, src, 34, 2, 9999, tag)
}

/// A frame to the allowed 198.51.100.2:8000 marked "needs checksum" from
/// `start` with the checksum at `start + offset`, its spare payload bytes
/// chosen so the checksum the kernel writes there is `value`.
fn checksum_at(
    src_mac: [u8; 6],
    src: [u8; 4],
    start: u16,
    offset: u16,
    value: u16,
    tag: &[u8],
) -> Vec<u8> {
    let mut f = udp(src_mac, SERVER_MAC, src, SERVER, 40000, 8000, tag);
    let n = f.len();
    let spare = (0..=u16::MAX)
        .find(|w| {
            f[n - 2..].copy_from_slice(&w.to_be_bytes());
            !(sum16(&f[usize::from(start)..]) as u16) == value
        })
        .expect("a spare word that makes the checksum the value");
    f[n - 2..].copy_from_slice(&spare.to_be_bytes());
    let mut hdr = vec![1u8, 0, 0, 0, 0, 0];
    hdr.extend_from_slice(&start.to_le_bytes());
    hdr.extend_from_slice(&offset.to_le_bytes());
    hdr.extend_from_slice(&f);
    hdr
}

/// A 300-byte UDP payload to 198.51.100.2:`dport`, handed over as
/// one frame for the kernel to cut into 100-byte datagrams (USO) and to
/// checksum: what a guest with transmit offloads sends. Behind a
/// virtio-net header (NEEDS_CSUM at 34+6, GSO_UDP_L4, gso_size 100).
fn segmentation_offload(src_mac: [u8; 6], src: [u8; 4], dport: u16, tag: &[u8]) -> Vec<u8> {
    let mut payload = tag.to_vec();
    payload.resize(298, b'.');
    let mut f = udp(src_mac, SERVER_MAC, src, SERVER, 40000, dport, &payload);
    let mut hdr = vec![1u8, 5];
    hdr.extend_from_slice(&42u16.to_le_bytes());
    hdr.extend_from_slice(&100u16.to_le_bytes());
    hdr.extend_from_slice(&34u16.to_le_bytes());
    hdr.extend_from_slice(&6u16.to_le_bytes());
    // The checksum field holds the pseudo header's sum, as offloading
    // stacks leave it.
    let mut pseudo = f[26..34].to_vec();
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&f[38..40]);
    f[40..42].copy_from_slice(&(sum16(&pseudo) as u16).to_be_bytes());
    hdr.extend_from_slice(&f);
    hdr
}

/// A DHCP request from `src_mac` (its chaddr) carrying `tag`.
fn dhcp(src_mac: [u8; 6], dst_mac: [u8; 6], src: [u8; 4], dst: [u8; 4], tag: &[u8]) -> Vec<u8> {
    let mut body = vec![0u8; 236];
    body[28..34].copy_from_slice(&src_mac);
    body.extend_from_slice(tag);
    udp(src_mac, dst_mac, src, dst, 68, 67, &body)
}

fn vlan_tagged(mut f: Vec<u8>, vid: u16) -> Vec<u8> {
    let tci = vid.to_be_bytes();
    f.splice(12..12, [0x81, 0x00, tci[0], tci[1]]);
    f
}

fn arp(sha: [u8; 6], src_mac: [u8; 6], spa: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&sha);
    f.extend_from_slice(&spa);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&SERVER);
    f.extend_from_slice(b"arp-tag-");
    f.resize(60, 0);
    f
}

/// Puts `policy` in force on `tap` as lume does; in force while the result
/// is held.
#[must_use]
fn police(tap: &str, policy: &Policy, ctx: &Context) -> lume::network::policy::tc::Enforced {
    let mut nl = Netlink::open().unwrap();
    let index = nl.link_index(tap).unwrap().unwrap();
    let enforced = lume::network::policy::tc::enforce(&mut nl, tap, index, policy, ctx).unwrap();
    assert!(lume::network::policy::tc::in_force(&mut nl, tap).unwrap());
    enforced
}

fn carries(frames: &[Vec<u8>], tag: &[u8]) -> Vec<Vec<u8>> {
    frames
        .iter()
        .filter(|f| f.windows(tag.len()).any(|w| w == tag))
        .cloned()
        .collect()
}

/// The UDP destination port of an untagged IPv4 frame.
fn dport(f: &[u8]) -> u16 {
    assert_eq!(&f[12..14], &[0x08, 0x00], "{f:02x?}");
    u16::from_be_bytes([f[36], f[37]])
}

#[test]
fn crafted_frames_do_not_get_past_the_policy_on_a_real_tap() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root (network namespaces)");
        return;
    }
    let ns = common::Netns::new("pf");
    ns.within(|| {
        sh("sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1");
        let policy = Policy::from_parts(&["198.51.100.2:8000/udp".into()], &[], false).unwrap();
        // Opened as lume opens a policed VM's tap, and a plain one.
        let lg = Tap::create("lg0").unwrap();
        let lb = Tap::create("lb0").unwrap();
        let lv = Tap::create("lv0").unwrap();
        let lan = Tap::create_with("ll0", false).unwrap();
        sh("ip link add br0 type bridge && ip link set br0 up \
            && for t in lg0 lb0 lv0 ll0; do ip link set $t master br0 && ip link set $t up; done");
        let nat = |mac, guest: [u8; 4]| Context {
            mac,
            guest: Some(Ipv4Addr::from(guest)),
            gateway: Some(Ipv4Addr::new(203, 0, 113, 1)),
            host_nets: vec![],
            bridge: None,
            skb: SkbLayout::running(),
        };
        let _g = police("lg0", &policy, &nat(MAC_G, GUEST));
        let _b = police(
            "lb0",
            &policy,
            &Context {
                mac: MAC_B,
                guest: None,
                gateway: None,
                host_nets: vec![],
                bridge: None,
                // As on a kernel whose sk_buff the filter cannot read.
                skb: None,
            },
        );
        std::thread::sleep(Duration::from_millis(300));
        drain(&lan, Duration::from_millis(200));

        // Every tap here has a virtio-net header: frames go behind one.
        let write_with_header = |tap: &Tap, frame: &[u8]| {
            let mut f = std::fs::File::from(tap.fd.try_clone().unwrap());
            f.write_all(frame).unwrap();
        };
        let write = |tap: &Tap, frame: &[u8]| write_with_header(tap, &plain(frame));
        let g_udp = |dport, tag: &[u8]| udp(MAC_G, SERVER_MAC, GUEST, SERVER, 40000, dport, tag);
        let b_ip = [198, 51, 100, 120];
        let b_udp =
            |dst, sport, dport, tag: &[u8]| udp(MAC_B, [0xff; 6], b_ip, dst, sport, dport, tag);

        // Controls: what the policy allows arrives, so the harness sees.
        write(&lg, &g_udp(8000, b"ctl-allowed"));
        write(&lg, &g_udp(9999, b"ctl-denied"));
        write(
            &lb,
            &dhcp(MAC_B, [0xff; 6], b_ip, [255; 4], b"dhcp-broadcast"),
        );
        write(&lb, &arp(MAC_B, MAC_B, b_ip));
        // The checksum-offload smuggler on the tap without a filter: the
        // kernel still rewrites the port when the frame leaves (so a filter
        // that let it through would have checked the wrong port), and
        // segmentation offload still reaches the LAN.
        write_with_header(
            &lv,
            &checksum_smuggler(MAC_V, [203, 0, 113, 51], b"vnet-smuggled"),
        );
        write_with_header(
            &lv,
            &segmentation_offload(MAC_V, [203, 0, 113, 51], 8000, b"ctl-gso"),
        );

        // F1: the same against lume's policed tap. A pending checksum
        // anywhere but the transport header's own field is dropped...
        write_with_header(&lg, &checksum_smuggler(MAC_G, GUEST, b"csum-smuggled"));
        // (from the IP header, written over the destination address)
        write_with_header(
            &lg,
            &checksum_at(MAC_G, GUEST, 26, 6, 0xc633, b"csum-address"),
        );
        // ... a real offload to the allowed port passes (cut up on the way
        // out) and one to another port does not.
        write_with_header(
            &lg,
            &segmentation_offload(MAC_G, GUEST, 8000, b"gso-allowed"),
        );
        write_with_header(
            &lg,
            &segmentation_offload(MAC_G, GUEST, 9999, b"gso-denied"),
        );
        // Without the kernel's sk_buff layout (lb0's filter is compiled
        // without it), every offloaded frame is dropped.
        write_with_header(
            &lb,
            &segmentation_offload(MAC_B, [198, 51, 100, 120], 8000, b"gso-no-layout"),
        );
        // F3: VLAN-tagged frames whose inner frame is allowed.
        write(&lg, &vlan_tagged(g_udp(8000, b"vlan-tagged"), 5));
        write(
            &lb,
            &vlan_tagged(b_udp(SERVER, 40000, 8000, b"vlan-tagged"), 5),
        );
        write(&lg, &vlan_tagged(g_udp(8000, b"vlan-prio"), 0));
        // F2: DHCP's ports to any address (bridged: no gateway).
        write(
            &lb,
            &dhcp(MAC_B, [0xff; 6], b_ip, [192, 0, 2, 1], b"dhcp-tunnel"),
        );
        write(&lb, &dhcp(MAC_B, [0xff; 6], b_ip, SERVER, b"dhcp-tunnel"));
        // A DHCP request in another client's name (chaddr): no leases
        // taken or declined for anyone else.
        let mut other_name = dhcp(MAC_B, [0xff; 6], [0; 4], [255; 4], b"dhcp-other-name");
        other_name[70..76].copy_from_slice(&SERVER_MAC);
        write(&lb, &other_name);
        // F6: ARP naming another MAC than the VM's.
        write(&lb, &arp(SERVER_MAC, MAC_B, b_ip));
        write(&lg, &arp(SERVER_MAC, MAC_G, GUEST));

        let got = drain(&lan, Duration::from_millis(1500));
        // The controls.
        let ok = carries(&got, b"ctl-allowed");
        assert_eq!(ok.len(), 1, "{got:02x?}");
        assert_eq!(dport(&ok[0]), 8000);
        assert!(carries(&got, b"ctl-denied").is_empty());
        assert_eq!(carries(&got, b"dhcp-broadcast").len(), 1);
        assert_eq!(
            got.iter().filter(|f| f[12..14] == [0x08, 0x06]).count(),
            1,
            "exactly the guest's own ARP: {got:02x?}"
        );
        let old = carries(&got, b"vnet-smuggled");
        assert_eq!(old.len(), 1, "{got:02x?}");
        assert_eq!(
            dport(&old[0]),
            9999,
            "the harness no longer reproduces the checksum smuggling"
        );
        assert_eq!(
            carries(&got, b"ctl-gso").len(),
            1,
            "the harness no longer sends a segmentation offload: {got:02x?}"
        );
        assert!(
            got.iter().filter(|f| f.len() == 14 + 20 + 8 + 100).count() >= 6,
            "the offloads were not cut into 100-byte datagrams"
        );
        let offload = carries(&got, b"gso-allowed");
        assert_eq!(offload.len(), 1, "a real offload did not pass: {got:02x?}");
        assert_eq!(dport(&offload[0]), 8000);
        // The abuses.
        for tag in [
            &b"csum-smuggled"[..],
            b"csum-address",
            b"gso-denied",
            b"gso-no-layout",
            b"vlan-tagged",
            b"vlan-prio",
            b"dhcp-tunnel",
            b"dhcp-other-name",
        ] {
            assert!(
                carries(&got, tag).is_empty(),
                "{} got past the policy: {:02x?}",
                String::from_utf8_lossy(tag),
                carries(&got, tag)
            );
        }
        for f in got.iter().filter(|f| !old.contains(f)) {
            if f[12..14] == [0x08, 0x00] && f[23] == 17 {
                assert_ne!(dport(f), 9999, "{f:02x?}");
            }
        }
        drop((lg, lb, lv, lan));
    });
}

fn no_host_nets(
    _: &mut Netlink,
) -> Result<Vec<lume::network::policy::Cidr>, lume::network::kernel::netlink::NetlinkError> {
    Ok(vec![])
}

/// `tc` cannot take the policy off (F3 of the review: with a `cls_bpf`
/// filter, `tc qdisc del` let denied frames through until the guard put it
/// back): under a steady stream of denied frames, deleting the ingress
/// qdisc and the filters lets none through, and the guard still has its own
/// program in force.
#[test]
fn tc_cannot_take_the_policy_off() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root (network namespaces)");
        return;
    }
    let ns = common::Netns::new("pg");
    ns.within(|| {
        use lume::network::policy::tc;
        sh("sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1");
        let policy = Policy::from_parts(&["198.51.100.2:8000/udp".into()], &[], false).unwrap();
        let tap = Tap::create("lg0").unwrap();
        let lan = Tap::create_with("ll0", false).unwrap();
        sh("ip link add br0 type bridge && ip link set br0 up \
            && for t in lg0 ll0; do ip link set $t master br0 && ip link set $t up; done");
        let ctx = Context {
            mac: MAC_G,
            guest: Some(Ipv4Addr::from(GUEST)),
            gateway: Some(Ipv4Addr::new(203, 0, 113, 1)),
            host_nets: vec![],
            bridge: None,
            skb: SkbLayout::running(),
        };
        let mut nl = Netlink::open().unwrap();
        let index = nl.link_index("lg0").unwrap().unwrap();
        let enforced = tc::enforce(&mut nl, "lg0", index, &policy, &ctx).unwrap();
        let id = enforced.id;
        let guard = tc::Guard::start("lg0".into(), policy, ctx, enforced, no_host_nets, None);
        std::thread::sleep(Duration::from_millis(300));
        drain(&lan, Duration::from_millis(200));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sender = {
            let stop = stop.clone();
            let fd = tap.fd.try_clone().unwrap();
            std::thread::spawn(move || {
                let mut f = std::fs::File::from(fd);
                let mut sent = 0;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let frame = udp(MAC_G, SERVER_MAC, GUEST, SERVER, 40000, 9999, b"denied");
                    f.write_all(&plain(&frame)).unwrap();
                    sent += 1;
                    std::thread::sleep(Duration::from_millis(2));
                }
                sent
            })
        };
        for cmd in [
            "tc qdisc del dev lg0 ingress",
            "tc qdisc del dev lg0 clsact",
            "tc filter del dev lg0 ingress",
            "tc qdisc add dev lg0 clsact && tc qdisc del dev lg0 clsact",
        ] {
            let _ = std::process::Command::new("sh").args(["-c", cmd]).output();
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let sent = sender.join().unwrap();
        let got = drain(&lan, Duration::from_millis(500));
        assert!(sent > 100, "the stream was too short: {sent}");
        assert!(
            carries(&got, b"denied").is_empty(),
            "{} of {sent} denied frames got past while tc removed things",
            carries(&got, b"denied").len()
        );
        // The guard put the backstop filter back with its own program
        // (a new id, on the link too).
        let end = Instant::now() + Duration::from_secs(5);
        while tc::installed(&mut nl, "lg0").unwrap().contains(&id) {
            assert!(Instant::now() < end, "the backstop filter was not put back");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(tc::installed(&mut nl, "lg0").unwrap().len(), 1);
        // Control: the allowed port still arrives.
        let mut f = std::fs::File::from(tap.fd.try_clone().unwrap());
        f.write_all(&plain(&udp(
            MAC_G, SERVER_MAC, GUEST, SERVER, 40000, 8000, b"allowed",
        )))
        .unwrap();
        assert_eq!(
            carries(&drain(&lan, Duration::from_millis(500)), b"allowed").len(),
            1
        );
        // The holder of the link dies (the guard and its link dropped, as
        // when a supervisor or the service's keeper is killed): the
        // `cls_bpf` backstop the guard put back still filters.
        drop(guard);
        let mut f = std::fs::File::from(tap.fd.try_clone().unwrap());
        f.write_all(&plain(&udp(
            MAC_G,
            SERVER_MAC,
            GUEST,
            SERVER,
            40000,
            9999,
            b"after-death",
        )))
        .unwrap();
        f.write_all(&plain(&udp(
            MAC_G,
            SERVER_MAC,
            GUEST,
            SERVER,
            40000,
            8000,
            b"still-allowed",
        )))
        .unwrap();
        let got = drain(&lan, Duration::from_millis(500));
        assert!(
            carries(&got, b"after-death").is_empty(),
            "the policy fell off with its holder"
        );
        assert_eq!(carries(&got, b"still-allowed").len(), 1);
        drop((tap, lan));
    });
}

/// Bridged: once the guest's DHCP lease is known (the snooper's), the
/// guard recompiles the filter so ARP and IPv4 come only from it: the
/// guest can no longer answer ARP for the LAN's router or spoof sources.
#[test]
fn bridged_guests_keep_to_their_lease_once_it_is_known() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root (network namespaces)");
        return;
    }
    let ns = common::Netns::new("pl");
    ns.within(|| {
        use lume::network::policy::tc;
        sh("sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1");
        let policy = Policy::from_parts(&["198.51.100.2:8000/udp".into()], &[], false).unwrap();
        let lb = Tap::create("lb0").unwrap();
        let lan = Tap::create_with("ll0", false).unwrap();
        sh("ip link add br0 type bridge && ip link set br0 up \
            && for t in lb0 ll0; do ip link set $t master br0 && ip link set $t up; done");
        let ctx = Context {
            mac: MAC_B,
            guest: None,
            gateway: None,
            host_nets: vec![],
            bridge: None,
            skb: SkbLayout::running(),
        };
        let mut nl = Netlink::open().unwrap();
        let index = nl.link_index("lb0").unwrap().unwrap();
        let enforced = tc::enforce(&mut nl, "lb0", index, &policy, &ctx).unwrap();
        let id = enforced.id;
        let lease = std::sync::Arc::new(std::sync::Mutex::new(None));
        let guard = tc::Guard::start(
            "lb0".into(),
            policy,
            ctx,
            enforced,
            no_host_nets,
            Some(lease.clone()),
        );
        std::thread::sleep(Duration::from_millis(300));
        drain(&lan, Duration::from_millis(200));
        let router = [198, 51, 100, 1];
        let mine = [198, 51, 100, 120];
        let write = |frame: &[u8]| {
            let mut f = std::fs::File::from(lb.fd.try_clone().unwrap());
            f.write_all(&plain(frame)).unwrap();
        };
        let arps = |got: &[Vec<u8>]| -> Vec<[u8; 4]> {
            got.iter()
                .filter(|f| f[12..14] == [0x08, 0x06])
                .map(|f| [f[28], f[29], f[30], f[31]])
                .collect()
        };
        // Before a lease (a guest with a static address): not checked.
        write(&arp(MAC_B, MAC_B, router));
        assert_eq!(arps(&drain(&lan, Duration::from_millis(500))), vec![router]);

        *lease.lock().unwrap() = Some(Ipv4Addr::from(mine));
        let end = Instant::now() + Duration::from_secs(5);
        while tc::installed(&mut nl, "lb0").unwrap() == vec![id] {
            assert!(Instant::now() < end, "the lease was not compiled in");
            std::thread::sleep(Duration::from_millis(50));
        }
        write(&arp(MAC_B, MAC_B, router));
        write(&arp(MAC_B, MAC_B, mine));
        write(&udp(
            MAC_B,
            SERVER_MAC,
            router,
            SERVER,
            40000,
            8000,
            b"spoofed-src",
        ));
        write(&udp(
            MAC_B, SERVER_MAC, mine, SERVER, 40000, 8000, b"own-src",
        ));
        write(&dhcp(MAC_B, [0xff; 6], mine, [255; 4], b"rebinding"));
        let got = drain(&lan, Duration::from_millis(1000));
        assert_eq!(arps(&got), vec![mine], "{got:02x?}");
        assert!(carries(&got, b"spoofed-src").is_empty());
        assert_eq!(carries(&got, b"own-src").len(), 1);
        assert_eq!(carries(&got, b"rebinding").len(), 1);
        drop(guard);
        drop((lb, lan));
    });
}

/// nat and host: what a policed guest sends reaches the host (lume's
/// bridge) and nothing else on the bridge, whatever MAC it is addressed to:
/// DHCP and DNS to the gateway addressed to another VM's MAC or to a
/// multicast group, and broadcasts (DHCP with a chosen payload, ARP), which
/// the filter hands to the bridge's own receive path instead of its ports.
#[test]
fn nat_guests_reach_only_the_bridge_at_layer_2() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root (network namespaces)");
        return;
    }
    let ns = common::Netns::new("pn");
    ns.within(|| {
        use lume::network::policy::bpf::Bridge;
        const BRIDGE_MAC: [u8; 6] = [0x02, 0xb0, 0, 0, 0, 1];
        const OTHER_VM: [u8; 6] = [0x52, 0x54, 0, 0xcc, 0, 9];
        sh("sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1");
        let policy = Policy::from_parts(&[], &[], true).unwrap();
        let lg = Tap::create("lg0").unwrap();
        let other = Tap::create_with("ll0", false).unwrap();
        sh(
            "ip link add br0 type bridge && ip link set br0 address 02:b0:00:00:00:01 \
            && ip addr add 203.0.113.1/24 dev br0 && ip link set br0 up \
            && for t in lg0 ll0; do ip link set $t master br0 && ip link set $t up; done",
        );
        let mut nl = Netlink::open().unwrap();
        let index = nl.link_index("br0").unwrap().unwrap();
        let enforced = police(
            "lg0",
            &policy,
            &Context {
                mac: MAC_G,
                guest: Some(Ipv4Addr::from(GUEST)),
                gateway: Some(Ipv4Addr::new(203, 0, 113, 1)),
                host_nets: vec![],
                bridge: Some(Bridge {
                    mac: BRIDGE_MAC,
                    index,
                }),
                skb: SkbLayout::running(),
            },
        );
        // The host's side: a DHCP server's socket.
        let server = std::net::UdpSocket::bind("0.0.0.0:67").unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        drain(&other, Duration::from_millis(200));
        let write = |frame: &[u8]| {
            let mut f = std::fs::File::from(lg.fd.try_clone().unwrap());
            f.write_all(&plain(frame)).unwrap();
        };
        let gw = [203, 0, 113, 1];
        write(&dhcp(MAC_G, [0xff; 6], [0; 4], [255; 4], b"dhcp-to-all"));
        write(&arp(MAC_G, MAC_G, GUEST));
        write(&udp(MAC_G, OTHER_VM, GUEST, gw, 40000, 53, b"dns-to-a-vm"));
        write(&dhcp(MAC_G, OTHER_VM, GUEST, gw, b"dhcp-to-a-vm"));
        write(&udp(
            MAC_G,
            [0x01, 0, 0x5e, 0, 0, 1],
            GUEST,
            gw,
            40000,
            53,
            b"dns-to-a-group",
        ));
        write(&udp(
            MAC_G,
            [0xff; 6],
            GUEST,
            [203, 0, 113, 255],
            40000,
            9,
            b"to-the-subnet",
        ));
        // The broadcast DHCP request reached the host...
        let mut buf = [0u8; 2048];
        let (n, _) = server
            .recv_from(&mut buf)
            .expect("the host got no DHCP broadcast");
        assert!(buf[..n].windows(11).any(|w| w == b"dhcp-to-all"));
        // ... and nothing reached the other port.
        let got = drain(&other, Duration::from_millis(1000));
        assert!(
            got.iter().all(|f| f[6..12] != MAC_G),
            "a policed guest's frame reached another port of its bridge: {got:02x?}"
        );
        // Control: without the filter (the link dropped, the backstop
        // filter deleted) the same broadcast reaches it.
        drop(enforced);
        sh("tc qdisc del dev lg0 ingress");
        write(&dhcp(MAC_G, [0xff; 6], [0; 4], [255; 4], b"ctl-unfiltered"));
        let got = drain(&other, Duration::from_millis(1000));
        assert_eq!(carries(&got, b"ctl-unfiltered").len(), 1, "{got:02x?}");
        drop((lg, other));
    });
}
