//! End to end: the VNC display. The busybox test guest runs under QEMU (TCG)
//! in a network namespace the test creates; a real VNC client (vncdotool,
//! from PyPI, in the venv of tests/clients/build.sh vnc) captures the screen
//! using nothing but `vncUrl` from `lume get -f json`; a wrong password is
//! refused; nothing listens beyond loopback; `vncUrl` is null once stopped;
//! the password is on no command line. Needs root (for `ip netns`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Home, Netns, wait_console, wait_for};
use serde_json::Value;

const BOOT: Duration = Duration::from_secs(180);

fn vnc_client() -> PathBuf {
    common::client_python("vnc")
}

fn details(ns: &Netns, home: &Home, name: &str) -> Value {
    let all: Value = serde_json::from_str(&ns.lume_ok(home, &["get", name, "-f", "json"])).unwrap();
    all[0].clone()
}

/// Runs tests/clients/vnc_capture.py in the namespace: (exit status, stdout).
fn capture(
    ns: &Netns,
    python: &Path,
    url: &str,
    out: &Path,
    password: Option<&str>,
) -> (i32, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/vnc_capture.py");
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &ns.name])
        .arg(python)
        .arg(script)
        .arg(url)
        .arg(out);
    if let Some(p) = password {
        c.arg(p);
    }
    let o = c.output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

/// (password, port) of a `vnc://:PASSWORD@127.0.0.1:PORT` URL.
fn parse_url(url: &str) -> (String, u16) {
    let rest = url.strip_prefix("vnc://:").expect("lume's vncUrl shape");
    let (pw, hostport) = rest.rsplit_once('@').unwrap();
    let port = hostport.strip_prefix("127.0.0.1:").expect("loopback host");
    (pw.to_string(), port.parse().unwrap())
}

fn cmdline(pid: u64) -> String {
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default())
        .replace('\0', " ")
}

#[test]
fn vnc_shows_the_screen_to_the_url_holder_only_on_loopback() {
    let python = vnc_client();
    let home = Home::new();
    let ns = Netns::new("dp");
    let args = common::guest_create_args("vm1", "none", &[], "");
    ns.lume_ok(&home, &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(details(&ns, &home, "vm1")["vncUrl"], Value::Null);

    // Default: a random password, a free port, printed by run --detach.
    let out = ns.lume_ok(&home, &["run", "vm1", "--detach"]);
    let d = details(&ns, &home, "vm1");
    let url = d["vncUrl"]
        .as_str()
        .expect("vncUrl while running")
        .to_string();
    assert!(out.contains(&format!("VNC display: {url}")), "{out}");
    let (password, port) = parse_url(&url);
    assert_eq!(password.len(), 8);
    wait_console(&home, "vm1", "LUME-GUEST: booted", BOOT);

    // The password is in no process's command line, and run.json is private.
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(home.vm_dir("vm1").join("run.json")).unwrap(),
    )
    .unwrap();
    for pid in [
        state["pid"].as_u64().unwrap(),
        state["qemuPid"].as_u64().unwrap(),
    ] {
        assert!(!cmdline(pid).contains(&password), "{}", cmdline(pid));
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(home.vm_dir("vm1").join("run.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "run.json holds the VNC password: {mode:o}");

    // Nothing listens beyond loopback; the VNC port is there.
    let listening = ns.exec_ok("ss -Hltnu");
    for line in listening.lines() {
        let local = line.split_whitespace().nth(4).unwrap();
        assert!(
            local.starts_with("127.0.0.1:") || local.starts_with("[::1]:"),
            "listens beyond loopback: {line}"
        );
    }
    assert!(
        listening.contains(&format!("127.0.0.1:{port} ")),
        "{listening}"
    );

    // A real VNC client with only the URL sees the screen (SeaBIOS's text,
    // the VGA console): an image of the VM's display size with some content.
    let shot = home.path().join("screen.png");
    let (code, text) = capture(&ns, &python, &url, &shot, None);
    assert_eq!(code, 0, "{text}");
    let mut words = text.split_whitespace().skip(1);
    let size = words.next().unwrap();
    let colours: u32 = words.next().unwrap().parse().unwrap();
    assert!(size.contains('x') && size != "0x0", "{text}");
    assert!(colours >= 2, "a blank screen: {text}");

    // A wrong password is refused.
    let (code, text) = capture(&ns, &python, &url, &shot, Some("wrongpw1"));
    assert_eq!(code, 3, "a wrong password was accepted: {text}");

    // attach prints the URL (no graphical session here).
    let out = ns.lume_ok(&home, &["attach", "vm1"]);
    assert!(out.contains(&url), "{out}");
    assert!(
        out.contains("no viewer opened: no graphical session"),
        "{out}"
    );

    // With a session, remote-viewer gets a 0600 connection file in the VM's
    // directory, never the password on its command line. (A stand-in
    // remote-viewer records what it was given: the viewer is not what is
    // tested here, lume's hand-over is.)
    let bin = home.path().join("viewer-bin");
    std::fs::create_dir(&bin).unwrap();
    let seen = home.path().join("viewer-seen");
    let script = bin.join("remote-viewer");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$@\" > {0}.args\ncat \"$1\" > {0}.file\nsleep 2\n",
            seen.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &ns.name])
        .arg(common::lume_bin())
        .args(["attach", "vm1"]);
    home.env(&mut c);
    let path = format!("{}:/usr/bin:/bin", bin.display());
    let o = c.env("PATH", path).env("DISPLAY", ":99").output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && text.contains("opened in remote-viewer"),
        "{o:?}"
    );
    let vv = home.vm_dir("vm1").join("viewer.vv");
    let args = wait_for("the viewer's arguments", Duration::from_secs(10), || {
        std::fs::read_to_string(seen.with_extension("args")).ok()
    });
    assert_eq!(args.trim(), vv.display().to_string());
    let (pw, port) = parse_url(&url);
    let file = wait_for("the viewer's file", Duration::from_secs(10), || {
        std::fs::read_to_string(seen.with_extension("file"))
            .ok()
            .filter(|t| !t.is_empty())
    });
    assert!(
        file.contains(&format!("port={port}\n")) && file.contains(&format!("password={pw}\n")),
        "{file}"
    );
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&vv).unwrap().permissions())
            & 0o777,
        0o600
    );

    // A port that is taken is an error naming the option, before QEMU starts.
    let args = common::guest_create_args("vm2", "none", &[], "");
    ns.lume_ok(&home, &args.iter().map(String::as_str).collect::<Vec<_>>());
    let err = ns.lume_fails(
        &home,
        &["run", "vm2", "--detach", "--vnc-port", &port.to_string()],
    );
    assert!(err.contains("--vnc-port"), "{err}");
    assert_eq!(details(&ns, &home, "vm2")["status"], "stopped");

    ns.lume_ok(&home, &["stop", "vm1", "--timeout", "5"]);
    assert_eq!(details(&ns, &home, "vm1")["vncUrl"], Value::Null);
    assert!(
        ns.lume_fails(&home, &["attach", "vm1"])
            .contains("is not running")
    );
    // The port is closed with the VM.
    wait_for("the VNC port to close", Duration::from_secs(10), || {
        (!ns.exec_ok("ss -Hltn")
            .contains(&format!("127.0.0.1:{port} ")))
        .then_some(())
    });

    // A chosen port and password: exactly these, in the URL; the password
    // reaches the detached supervisor without its command line.
    // USB storage: a qcow2 image is refused (raw only), a raw one is on
    // QEMU's xHCI controller as format=raw, named by lume's descriptor.
    let qcow = home.path().join("u.qcow2");
    common::sh(&format!(
        "qemu-img create -q -f qcow2 {} 1M",
        qcow.display()
    ));
    let err = ns.lume_fails(
        &home,
        &[
            "run",
            "vm2",
            "--detach",
            "--usb-storage",
            qcow.to_str().unwrap(),
        ],
    );
    assert!(err.contains("raw images only"), "{err}");
    let usb = home.path().join("u.img");
    std::fs::write(&usb, vec![0u8; 1 << 20]).unwrap();
    let chosen = port.wrapping_add(1).max(1024);
    let out = ns.lume_ok(
        &home,
        &[
            "run",
            "vm2",
            "--detach",
            "--vnc-port",
            &chosen.to_string(),
            "--vnc-password",
            "Pw:@x/9",
            "--usb-storage",
            usb.to_str().unwrap(),
        ],
    );
    let url2 = details(&ns, &home, "vm2")["vncUrl"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(url2, format!("vnc://:Pw%3A%40x%2F9@127.0.0.1:{chosen}"));
    assert!(out.contains(&url2), "{out}");
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(home.vm_dir("vm2").join("run.json")).unwrap(),
    )
    .unwrap();
    assert!(!cmdline(state["pid"].as_u64().unwrap()).contains("Pw:@x/9"));
    let qemu = cmdline(state["qemuPid"].as_u64().unwrap());
    assert!(!qemu.contains("Pw:@x/9"));
    assert!(
        qemu.contains("usb-storage,bus=usbxhci.0,drive=usbdisk0"),
        "{qemu}"
    );
    assert!(qemu.contains(",format=raw,if=none,id=usbdisk0"), "{qemu}");
    assert!(
        !qemu.contains(usb.to_str().unwrap()),
        "named by descriptor: {qemu}"
    );
    let (code, text) = capture(&ns, &python, &url2, &shot, None);
    assert_eq!(code, 0, "{text}");
    ns.lume_ok(&home, &["stop", "vm2", "--timeout", "5"]);

    // A foreground run is the VM's supervisor for its whole life: a
    // --vnc-password on its command line is on no process's command line
    // (lume restarts itself without it), yet it is the password in force.
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &ns.name])
        .arg(common::lume_bin())
        .args(["run", "vm2", "--vnc-password", "FgPw1234"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    home.env(&mut c);
    let mut fg = c.spawn().unwrap();
    let url3 = wait_for("the foreground run's vncUrl", BOOT, || {
        details(&ns, &home, "vm2")["vncUrl"]
            .as_str()
            .map(str::to_string)
    });
    assert!(url3.starts_with("vnc://:FgPw1234@"), "{url3}");
    let mut seen = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(pid) = e.file_name().to_string_lossy().parse::<u64>() {
            let cmd = cmdline(pid);
            if cmd.contains("FgPw1234") {
                seen.push(cmd);
            }
        }
    }
    assert!(
        seen.is_empty(),
        "the password is on a command line: {seen:?}"
    );
    let (code, text) = capture(&ns, &python, &url3, &shot, None);
    assert_eq!(code, 0, "{text}");
    ns.lume_ok(&home, &["stop", "vm2", "--timeout", "5"]);
    let _ = fg.wait();

    // The password may come from LUME_VNC_PASSWORD instead.
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &ns.name])
        .arg(common::lume_bin())
        .args(["run", "vm2", "--detach"]);
    home.env(&mut c);
    let out = c.env("LUME_VNC_PASSWORD", "EnvPw987").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let url4 = details(&ns, &home, "vm2")["vncUrl"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(url4.starts_with("vnc://:EnvPw987@"), "{url4}");
    ns.lume_ok(&home, &["stop", "vm2", "--timeout", "5"]);
}
