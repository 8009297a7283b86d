//! End to end, `lume create --image URL`: raw, qcow2 and xz images served by
//! a small HTTP server (with byte ranges) inside a network namespace the test
//! creates; checksums good and bad; a connection that breaks mid-way is
//! resumed; failed, refused and killed creates leave no VM and nothing a
//! later create trips over; through the API the VM is `provisioning` while a
//! deliberately slow download runs. Needs root, qemu-img.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::http::Server;
use common::{Home, Netns, lume_bin, wait_for};
use sha2::{Digest, Sha256};

/// A disk-like raw image: a signature, zeros, scattered data; 4 MiB.
fn raw_image(tag: &str) -> Vec<u8> {
    let mut d = vec![0u8; 4 << 20];
    d[..tag.len()].copy_from_slice(tag.as_bytes());
    for i in 0..64 {
        d[(i * 61_441) % (4 << 20)] = i as u8 + 1;
    }
    d
}

fn qcow2_of(raw: &[u8]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let (r, q) = (dir.path().join("r"), dir.path().join("q"));
    std::fs::write(&r, raw).unwrap();
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&r)
        .arg(&q)
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::read(q).unwrap()
}

fn xz_of(raw: &[u8]) -> Vec<u8> {
    let mut e = liblzma::write::XzEncoder::new(Vec::new(), 1);
    e.write_all(raw).unwrap();
    e.finish().unwrap()
}

fn sha256_hex(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// The VM's disk: its first bytes are `raw`, the rest zeros, `size` long.
fn assert_disk(home: &Home, vm: &str, raw: &[u8], size: u64) {
    let disk = std::fs::read(home.vm_dir(vm).join("disk.img")).unwrap();
    assert_eq!(disk.len() as u64, size, "{vm}: disk grown to --disk-size");
    assert!(disk[..raw.len()] == *raw, "{vm}: the image's bytes");
    assert!(disk[raw.len()..].iter().all(|&b| b == 0));
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(home.vm_dir(vm).join("disk.img"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
}

/// Nothing of a failed create is left: not listed, no work directory.
fn assert_nothing_left(home: &Home, ns: &Netns, vm: &str) {
    let ls: serde_json::Value =
        serde_json::from_str(&ns.lume_ok(home, &["ls", "-f", "json"])).unwrap();
    assert!(
        ls.as_array().unwrap().iter().all(|v| v["name"] != vm),
        "{ls}"
    );
    assert!(!home.vm_dir(vm).exists());
    let left: Vec<_> = std::fs::read_dir(home.storage())
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains(vm))
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn raw_qcow2_and_xz_from_a_url_with_checksums() {
    let ns = Netns::new("imp");
    let home = Home::new();
    let srv = Server::start(&ns);
    let raw = raw_image("RAW-IMAGE");
    let q = raw_image("QCOW2-IMAGE");
    let x = raw_image("XZ-IMAGE");
    srv.put("disk.raw", raw.clone());
    srv.put("disk.qcow2", qcow2_of(&q));
    // Named like a qcow2: the content (xz) decides, not the name.
    let xz = xz_of(&x);
    srv.put("image.qcow2", xz.clone());

    let create = |name: &str, url: &str, extra: &[&str]| {
        let mut args = vec!["create", name, "--image", url];
        if !extra.contains(&"--disk-size") {
            args.extend_from_slice(&["--disk-size", "64MB"]);
        }
        args.extend_from_slice(extra);
        ns.lume_ok(&home, &args)
    };
    create("r", &srv.url("/f/disk.raw"), &[]);
    assert_disk(&home, "r", &raw, 64 << 20);
    create(
        "q",
        &srv.url("/f/disk.qcow2"),
        &["--image-sha256", &sha256_hex(&qcow2_of(&q))],
    );
    assert_disk(&home, "q", &q, 64 << 20);
    // The sha256 is of the file as served (compressed), through a redirect.
    create(
        "x",
        &srv.url("/to/f/image.qcow2"),
        &["--image-sha256", &sha256_hex(&xz)],
    );
    assert_disk(&home, "x", &x, 64 << 20);
    assert_eq!(home.get("x")["status"], "stopped");
    assert_eq!(home.get("x")["diskSize"]["total"], 64 << 20);

    // An image larger than --disk-size keeps its size (never shrunk).
    create("small", &srv.url("/f/disk.raw"), &["--disk-size", "1MB"]);
    assert_disk(&home, "small", &raw, raw.len() as u64);

    // A wrong checksum: a clear error, nothing left, the name is free.
    let err = ns.lume_fails(
        &home,
        &[
            "create",
            "bad",
            "--image",
            &srv.url("/f/disk.raw"),
            "--image-sha256",
            &sha256_hex(b"other"),
        ],
    );
    assert!(
        err.contains("SHA-256") && err.contains(&sha256_hex(&raw)),
        "{err}"
    );
    assert_nothing_left(&home, &ns, "bad");
    create("bad", &srv.url("/f/disk.raw"), &[]);
}

#[test]
fn a_broken_connection_is_resumed_with_a_range_request() {
    let ns = Netns::new("imp");
    let home = Home::new();
    let srv = Server::start(&ns);
    let raw = raw_image("RESUMED");
    srv.put("d.raw", raw.clone());
    ns.lume_ok(
        &home,
        &[
            "create",
            "res",
            "--image",
            &srv.url("/drop/d.raw"),
            "--disk-size",
            "8MB",
            "--image-sha256",
            &sha256_hex(&raw),
        ],
    );
    assert_disk(&home, "res", &raw, 8 << 20);
    let seen = srv.seen();
    let half = raw.len() as u64 / 2;
    assert_eq!(
        seen,
        [
            "/drop/d.raw range=None".to_string(),
            format!("/drop/d.raw range=Some({half})")
        ]
    );
}

#[test]
fn refused_urls_and_non_images_leave_nothing() {
    let ns = Netns::new("imp");
    let home = Home::new();
    let srv = Server::start(&ns);
    srv.put(
        "page",
        b"<!DOCTYPE html><html><body>Moved</body></html>".to_vec(),
    );
    srv.put("text", b"hello\n".to_vec());
    srv.put("big.raw", raw_image("BIG"));
    // Untrusted bytes: a qcow2 whose backing file is a host secret.
    let dir = tempfile::tempdir().unwrap();
    let backed = dir.path().join("b.qcow2");
    let st = Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            "/etc/shadow",
            "-u",
        ])
        .arg(&backed)
        .arg("1M")
        .status()
        .unwrap();
    assert!(st.success());
    srv.put("backed.qcow2", std::fs::read(&backed).unwrap());
    srv.put("backed.xz", xz_of(&std::fs::read(&backed).unwrap()));
    let cases: &[(String, &str)] = &[
        ("file:///etc/shadow".into(), "not supported"),
        ("ftp://127.0.0.1/x".into(), "not supported"),
        (srv.url("/tofile"), "Cannot download"),
        (srv.url("/f/missing"), "HTTP 404"),
        (srv.url("/f/page"), "HTML"),
        (srv.url("/f/text"), "512-byte sectors"),
        ("http://127.0.0.1:1/x".into(), "Cannot download"),
        (srv.url("/loop"), "Cannot download"),
        (srv.url("/noetag/big.raw"), "cannot resume it"),
        (
            srv.url("/always/big.raw"),
            "did not resume after 5 attempts",
        ),
        (srv.url("/huge"), "larger than"),
        (srv.url("/f/backed.qcow2"), "backing file"),
        (srv.url("/f/backed.xz"), "backing file"),
    ];
    for (url, needle) in cases {
        let err = ns.lume_fails(&home, &["create", "n", "--image", url]);
        assert!(err.contains(needle), "{url}: {err}");
        assert_nothing_left(&home, &ns, "n");
    }
}

#[test]
fn ctrl_c_removes_the_half_made_vm_at_once() {
    let ns = Netns::new("imp");
    let home = Home::new();
    let srv = Server::start(&ns);
    srv.put("d.raw", raw_image("INTERRUPTED"));
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &ns.name]).arg(lume_bin()).args([
        "create",
        "i",
        "--image",
        &srv.url("/slow/d.raw"),
    ]);
    home.env(&mut c);
    let child = c
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the download to start", Duration::from_secs(20), || {
        let dir = std::fs::read_dir(home.storage()).ok()?;
        dir.filter_map(Result::ok)
            .find(|e| e.file_name().to_string_lossy().starts_with(".creating-i-"))
            .filter(|e| std::fs::metadata(e.path().join("disk.img")).is_ok_and(|m| m.len() > 0))
    });
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Interrupted"), "{err}");
    // Gone at once, before any other lume command ran.
    let left: Vec<_> = std::fs::read_dir(home.storage())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// https is verified: a server whose certificate no trusted authority
/// signed is refused, never downloaded from.
#[test]
fn https_with_an_untrusted_certificate_is_refused() {
    let ns = Netns::new("imp");
    let home = Home::new();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    std::fs::write(dir.path().join("d.raw"), raw_image("TLS")).unwrap();
    common::sh(&format!(
        "openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=127.0.0.1 \
         -addext subjectAltName=IP:127.0.0.1 -keyout {d}/key.pem -out {d}/cert.pem 2>/dev/null"
    ));
    let mut server = Command::new("ip")
        .args([
            "netns", "exec", &ns.name, "openssl", "s_server", "-quiet", "-WWW",
        ])
        .args([
            "-accept",
            "127.0.0.1:8443",
            "-cert",
            "cert.pem",
            "-key",
            "key.pem",
        ])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the TLS server", Duration::from_secs(10), || {
        ns.exec("curl -sk -o /dev/null https://127.0.0.1:8443/d.raw")
            .status
            .success()
            .then_some(())
    });
    let err = ns.lume_fails(
        &home,
        &["create", "t", "--image", "https://127.0.0.1:8443/d.raw"],
    );
    assert!(
        err.contains("Cannot download") && err.to_lowercase().contains("certificate"),
        "{err}"
    );
    assert_nothing_left(&home, &ns, "t");
    let _ = server.kill();
    let _ = server.wait();
}

#[test]
fn a_killed_create_leaves_nothing_and_the_name_stays_free() {
    let ns = Netns::new("imp");
    let home = Home::new();
    let srv = Server::start(&ns);
    let raw = raw_image("KILLED");
    srv.put("d.raw", raw.clone());
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &ns.name]).arg(lume_bin()).args([
        "create",
        "k",
        "--image",
        &srv.url("/slow/d.raw"),
    ]);
    home.env(&mut c);
    let mut child = c
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Mid-download: the work directory holds part of the disk.
    wait_for("the download to start", Duration::from_secs(20), || {
        let dir = std::fs::read_dir(home.storage()).ok()?;
        dir.filter_map(Result::ok)
            .find(|e| e.file_name().to_string_lossy().starts_with(".creating-k-"))
            .filter(|e| std::fs::metadata(e.path().join("disk.img")).is_ok_and(|m| m.len() > 0))
    });
    child.kill().unwrap(); // SIGKILL: no cleanup code runs
    child.wait().unwrap();
    let ls: serde_json::Value =
        serde_json::from_str(&ns.lume_ok(&home, &["ls", "-f", "json"])).unwrap();
    assert_eq!(ls, serde_json::json!([]), "a killed create is not a VM");
    // The same name is created; the leftovers are collected by it.
    ns.lume_ok(
        &home,
        &[
            "create",
            "k",
            "--image",
            &srv.url("/f/d.raw"),
            "--disk-size",
            "8MB",
        ],
    );
    assert_disk(&home, "k", &raw, 8 << 20);
    let hidden: Vec<_> = std::fs::read_dir(home.storage())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(hidden.is_empty(), "collected: {hidden:?}");
}

/// A documentation address the test server answers on inside a namespace.
const PUBLIC_ADDR: &str = "192.0.2.80";

/// Gives `ns`'s `lo` [`PUBLIC_ADDR`].
fn public_address(ns: &Netns) {
    ns.exec_ok(&format!("ip addr add {PUBLIC_ADDR}/32 dev lo"));
}

/// `lume serve` in the namespace; its port.
fn lume_serve(ns: &Netns, home: &Home) -> (std::process::Child, u16, Arc<Mutex<String>>) {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &ns.name])
        .arg(lume_bin())
        .args(["serve", "--port", "0"]);
    home.env(&mut c);
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let log2 = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("listening on http://").nth(1) {
                let port = rest.split([' ', '(']).next().unwrap().rsplit(':').next();
                let _ = tx.send(port.unwrap().parse::<u16>().unwrap());
            }
            let mut l = log2.lock().unwrap();
            l.push_str(&line);
            l.push('\n');
        }
    });
    let port = rx.recv_timeout(Duration::from_secs(20)).unwrap();
    (child, port, log)
}

fn api(
    ns: &Netns,
    method: &str,
    url: String,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let method = method.to_string();
    ns.within(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let mut resp = match body {
            Some(b) => agent
                .post(&url)
                .header("Content-Type", "application/json")
                .send(b.to_string())
                .unwrap(),
            None if method == "GET" => agent.get(&url).call().unwrap(),
            None => unreachable!(),
        };
        let mut s = String::new();
        resp.body_mut().as_reader().read_to_string(&mut s).unwrap();
        (
            resp.status().as_u16(),
            serde_json::from_str(&s).unwrap_or_default(),
        )
    })
}

#[test]
fn through_the_api_the_vm_is_provisioning_while_it_downloads() {
    let ns = Netns::new("imp");
    let home = Home::new();
    let srv = Server::start(&ns);
    public_address(&ns);
    let raw = raw_image("VIA-API");
    srv.put("d.raw", raw.clone());
    let (mut child, port, log) = lume_serve(&ns, &home);
    let base = format!("http://127.0.0.1:{port}/lume/vms");

    // ~4 MiB at 640 KiB/s: several seconds of provisioning.
    let (status, body) = api(
        &ns,
        "POST",
        base.clone(),
        Some(serde_json::json!({
            "name": "p", "diskSize": "16MB", "image": srv.url_via(PUBLIC_ADDR, "/slow/d.raw"),
            "imageSha256": sha256_hex(&raw),
        })),
    );
    assert_eq!(status, 202, "{body}");
    // lume's answer to a create.
    assert_eq!(
        body,
        serde_json::json!({"message": "VM creation started", "name": "p", "status": "provisioning"})
    );
    let (_, one) = api(&ns, "GET", format!("{base}/p"), None);
    assert_eq!(one["status"], "provisioning", "{one}");
    assert_eq!(one["provisioningOperation"], "image_import", "{one}");
    let (_, all) = api(&ns, "GET", base.clone(), None);
    assert_eq!(all[0]["name"], "p");
    assert_eq!(all[0]["status"], "provisioning");
    // The same name again while it provisions: 409.
    let (again, _) = api(
        &ns,
        "POST",
        base.clone(),
        Some(serde_json::json!({"name": "p", "image": srv.url_via(PUBLIC_ADDR, "/f/d.raw")})),
    );
    assert_eq!(again, 409);
    // Running it now is refused by name.
    let err = ns.lume_fails(&home, &["run", "p", "--detach"]);
    assert!(err.contains("still being created"), "{err}");
    wait_for("the import to finish", Duration::from_secs(60), || {
        let (_, v) = api(&ns, "GET", format!("{base}/p"), None);
        (v["status"] == "stopped").then_some(())
    });
    assert_disk(&home, "p", &raw, 16 << 20);
    assert!(!home.vm_dir("p").join(".provisioning").exists());

    // A failing import through the API: 202, then the VM disappears and
    // the server's log says why.
    let (status, _) = api(
        &ns,
        "POST",
        base.clone(),
        Some(serde_json::json!({
            "name": "f", "image": srv.url_via(PUBLIC_ADDR, "/slow/d.raw"), "imageSha256": sha256_hex(b"no"),
        })),
    );
    assert_eq!(status, 202);
    wait_for(
        "the failed import to vanish",
        Duration::from_secs(60),
        || {
            let (code, _) = api(&ns, "GET", format!("{base}/f"), None);
            (code == 404).then_some(())
        },
    );
    wait_for(
        "the error in the server's log",
        Duration::from_secs(10),
        || {
            let l = log.lock().unwrap();
            (l.contains("Creating VM 'f' failed") && l.contains("SHA-256")).then_some(())
        },
    );
    assert_nothing_left(&home, &ns, "f");
    // A scheme other than http(s) is refused before anything starts.
    let (code, body) = api(
        &ns,
        "POST",
        base.clone(),
        Some(serde_json::json!({"name": "g", "image": "file:///etc/shadow"})),
    );
    assert_eq!(code, 400, "{body}");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn api_image_urls_may_not_lead_to_loopback_or_private_addresses() {
    let ns = Netns::new("ssrf");
    let home = Home::new();
    let srv = Server::start(&ns);
    public_address(&ns);
    let raw = raw_image("SSRF");
    srv.put("d.raw", raw.clone());
    let (mut child, port, log) = lume_serve(&ns, &home);
    let base = format!("http://127.0.0.1:{port}/lume/vms");
    let refused = |name: &str, url: String| {
        let (status, body) = api(
            &ns,
            "POST",
            base.clone(),
            Some(serde_json::json!({"name": name, "diskSize": "16MB", "image": url})),
        );
        assert_eq!(status, 202, "{body}");
        wait_for(
            "the refused import to vanish",
            Duration::from_secs(60),
            || {
                let (code, _) = api(&ns, "GET", format!("{base}/{name}"), None);
                (code == 404).then_some(())
            },
        );
        wait_for(
            "the refusal in the server's log",
            Duration::from_secs(10),
            || {
                let l = log.lock().unwrap();
                (l.contains(&format!("Creating VM '{name}' failed"))
                    && l.contains("127.0.0.1, a loopback, link-local or private address"))
                .then_some(())
            },
        );
        assert_nothing_left(&home, &ns, name);
    };
    let before = srv.seen().len();
    // Straight to the server's loopback: refused before any connection.
    refused("direct", srv.url("/f/d.raw"));
    assert_eq!(srv.seen().len(), before, "{:?}", srv.seen());
    // A public server redirecting to loopback: refused at the redirect.
    refused("redirected", srv.url_via(PUBLIC_ADDR, "/lo/f/d.raw"));
    assert_eq!(
        srv.seen()[before..],
        ["/lo/f/d.raw range=None".to_string()],
        "only the redirect was fetched"
    );
    // The CLI's own user may fetch from loopback as before.
    ns.lume_ok(
        &home,
        &[
            "create",
            "cli",
            "--disk-size",
            "16MB",
            "--image",
            &srv.url("/f/d.raw"),
        ],
    );
    assert_disk(&home, "cli", &raw, 16 << 20);
    let _ = child.kill();
    let _ = child.wait();

    // The server's owner allows private destinations in config.yaml.
    home.write_settings("apiPrivateImageUrls: true\n");
    let (mut child, port, _log) = lume_serve(&ns, &home);
    let base = format!("http://127.0.0.1:{port}/lume/vms");
    let (status, body) = api(
        &ns,
        "POST",
        base.clone(),
        Some(
            serde_json::json!({"name": "ok", "diskSize": "16MB", "image": srv.url("/lo/f/d.raw")}),
        ),
    );
    assert_eq!(status, 202, "{body}");
    wait_for("the allowed import", Duration::from_secs(60), || {
        let (_, v) = api(&ns, "GET", format!("{base}/ok"), None);
        (v["status"] == "stopped").then_some(())
    });
    assert_disk(&home, "ok", &raw, 16 << 20);
    let _ = child.kill();
    let _ = child.wait();
}
