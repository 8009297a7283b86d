//! End to end, user-mode networking: an unprivileged user runs a VM whose
//! guest port 80 is published on the namespace's loopback; the test fetches
//! the guest's web page through it. The privileged modes are refused for that
//! user with a message naming CAP_NET_ADMIN.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Home, Netns, sh, wait_console, wait_for};

/// lume as the unprivileged user `nobody`, inside `ns`.
fn lume_as_nobody(ns: &Netns, home: &Home, args: &[&str]) -> std::process::Output {
    let mut c = Command::new("ip");
    c.args([
        "netns",
        "exec",
        &ns.name,
        "setpriv",
        "--reuid=nobody",
        "--regid=nogroup",
        "--clear-groups",
        "--inh-caps=-all",
    ])
    .arg(common::lume_bin())
    .args(args);
    home.env(&mut c);
    c.output().unwrap()
}

#[test]
fn unprivileged_user_mode_vm_serves_through_a_published_port() {
    let home = Home::new();
    home.write_settings("userSubnet: 198.51.100.0/24\n");
    let ns = Netns::new("lu");
    // Created by root (the guest files live in root's cache), then handed to nobody.
    let args = common::guest_create_args("web", "user", &["--publish", "127.0.0.1:18080:80"], "");
    ns.lume_ok(&home, &args.iter().map(String::as_str).collect::<Vec<_>>());
    ns.lume_ok(&home, &["create", "natvm", "--disk-size", "8MB"]);
    sh(&format!(
        "chown -R nobody:nogroup {}",
        home.path().display()
    ));

    let refused = lume_as_nobody(&ns, &home, &["run", "natvm"]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("CAP_NET_ADMIN") && err.contains("--network user needs no privileges"),
        "{err}"
    );
    let refused = lume_as_nobody(
        &ns,
        &home,
        &["run", "web", "--network", "none", "--publish", "1234:80"],
    );
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("Ports cannot be published in network mode 'none'"),
        "{err}"
    );

    let out = lume_as_nobody(
        &ns,
        &home,
        &["run", "web", "--detach", "--publish", "127.0.0.1:18007:7"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let state = std::fs::read_to_string(home.vm_dir("web").join("run.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&state).unwrap();
    let uid = sh(&format!("stat -c %U /proc/{}", v["qemuPid"]))
        .trim()
        .to_string();
    assert_eq!(uid, "nobody", "QEMU runs as the unprivileged user");

    wait_console(
        &home,
        "web",
        "LUME-GUEST: lease eth0 198.51.100.15",
        Duration::from_secs(180),
    );
    let page = wait_for(
        "the guest's page through 127.0.0.1:18080",
        Duration::from_secs(30),
        || {
            ns.http_get("127.0.0.1:18080")
                .filter(|text| text.contains("lume-test-guest"))
        },
    );
    // The home is nobody's now: root would refuse its config.yaml (as root,
    // lume reads no config.yaml another user can change), so nobody asks.
    let out = lume_as_nobody(&ns, &home, &["get", "web", "-f", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let d = &d[0];
    assert!(page.contains(d["macAddress"].as_str().unwrap()), "{page}");
    assert_eq!(d["ipAddress"], "198.51.100.15");
    let ports: Vec<&str> = d["network"]["publishedPorts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(ports, ["127.0.0.1:18007:7/tcp", "127.0.0.1:18080:80/tcp"]);
    // The run's own port works too: the guest echoes on port 7.
    // (Its echo loop may start a moment after the web server answered.)
    let echo = wait_for(
        "the guest's echo through 18007",
        Duration::from_secs(20),
        || {
            ns.tcp_exchange("127.0.0.1:18007", b"lume-echo\n")
                .filter(|t| !t.is_empty())
        },
    );
    assert_eq!(echo, "lume-echo\n", "echo through 18007");
    // Bulk data both ways through passt and lume's relay (a relay that split
    // a frame from its length once stalled every transfer after ~1 KiB).
    let bulk = 8 << 20;
    assert_eq!(
        ns.echo_bulk("127.0.0.1:18007", bulk, Duration::from_secs(30)),
        bulk,
        "8 MiB echoed through the published port"
    );

    let out = lume_as_nobody(&ns, &home, &["stop", "web"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The port is closed again.
    assert_eq!(
        ns.http_get("127.0.0.1:18080"),
        None,
        "port closed after stop"
    );
}
