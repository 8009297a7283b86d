//! End to end: snapshots with the busybox test guest under QEMU (TCG), in a
//! network namespace the test creates (host-only network 192.0.2.0/24).
//! The guest serves `/cgi-bin/disk`, which reads (and with `?w=TEXT`
//! writes) the first line of its disk, so every check of the disk's state
//! is the guest's own view of it.
//! Needs root (for `ip netns`) and the packages installed by scripts/test.sh.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::{Home, Netns, wait_console, wait_for};
use serde_json::Value;

const BOOT: Duration = Duration::from_secs(180);

/// The test guest's directory (tests/guest/build.sh, cached; it has the
/// disk driver and the CGI script these tests read the disk with).
fn guest_dir() -> PathBuf {
    common::built_by("tests/guest/build.sh", &[])
}

fn create(ns: &Netns, home: &Home, g: &std::path::Path, name: &str) {
    let cmdline = std::fs::read_to_string(g.join("cmdline")).unwrap();
    let kernel = g.join("vmlinuz").display().to_string();
    let initrd = g.join("initrd.img").display().to_string();
    ns.lume_ok(
        home,
        &[
            "create",
            name,
            "--cpu",
            "1",
            "--memory",
            "512MB",
            "--disk-size",
            "16MB",
            "--network",
            "host",
            "--kernel",
            &kernel,
            "--initrd",
            &initrd,
            "--cmdline",
            cmdline.trim(),
        ],
    );
}

fn details(ns: &Netns, home: &Home, name: &str) -> Value {
    let all: Value = serde_json::from_str(&ns.lume_ok(home, &["get", name, "-f", "json"])).unwrap();
    all[0].clone()
}

fn console(home: &Home, name: &str) -> String {
    std::fs::read_to_string(home.vm_dir(name).join("console.log")).unwrap_or_default()
}

/// The guest's view of its disk's first line, over HTTP (`?w=` writes).
fn disk(ns: &Netns, ip: &str, write: Option<&str>) -> String {
    let path = match write {
        Some(w) => format!("/cgi-bin/disk?w={w}"),
        None => "/cgi-bin/disk".to_string(),
    };
    let req = format!("GET {path} HTTP/1.0\r\n\r\n");
    let reply = wait_for(&format!("HTTP {path} on {ip}"), BOOT, || {
        ns.tcp_exchange(&format!("{ip}:80"), req.as_bytes())
            .filter(|r| r.contains("disk:"))
    });
    reply
        .split("disk:")
        .nth(1)
        .unwrap()
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_string()
}

fn start(ns: &Netns, home: &Home, name: &str, extra: &[&str]) -> String {
    let mut args = vec!["run", name, "--detach"];
    args.extend(extra);
    // A supervisor that was just killed may still be tearing down (QEMU
    // exiting): "busy" for a moment, as for any start.
    wait_for(&format!("lume {args:?}"), Duration::from_secs(20), || {
        let out = ns.lume(home, &args);
        if out.status.success() {
            return Some(());
        }
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(err.contains("is busy"), "lume {args:?} failed: {err}");
        None
    });
    wait_console(home, name, "LUME-GUEST: lease", BOOT);
    details(ns, home, name)["ipAddress"]
        .as_str()
        .unwrap()
        .to_string()
}

fn files(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|it| {
            it.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn memory_and_disk_snapshots_restore_delete_clone_and_ephemeral_runs() {
    let g = guest_dir();
    let home = Home::new();
    home.write_settings(
        "hostSubnet: 192.0.2.0/24\nnatSubnet6: 2001:db8:64::/64\nhostSubnet6: 2001:db8:65::/64\n",
    );
    let ns = Netns::new("sn");
    create(&ns, &home, &g, "sb");
    let snaps = home.vm_dir("sb").join("snapshots");

    // Names are checked before anything is touched.
    for bad in ["../x", "a/b", ".hidden", &"x".repeat(65)] {
        let err = ns.lume_fails(&home, &["snapshot", "create", "sb", bad]);
        assert!(err.contains("Invalid snapshot name"), "{bad}: {err}");
    }
    assert!(!snaps.join("..").join("x").exists());
    // A VM that is starting (its lock held, no run.json yet) is refused.
    // (a POSIX record lock conflicts with lume's OFD lock)
    let mut holder = Command::new("python3")
        .args([
            "-c",
            "import fcntl,sys,time; f=open(sys.argv[1],'a'); fcntl.lockf(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(30)",
        ])
        .arg(home.vm_dir("sb").join(".lock"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "locked");
    let err = ns.lume_fails(&home, &["snapshot", "create", "sb", "early"]);
    assert!(err.contains("is busy"), "{err}");
    holder.kill().unwrap();
    holder.wait().unwrap();

    let ip = start(&ns, &home, "sb", &[]);
    assert_eq!(disk(&ns, &ip, Some("one")), "one");
    // No guest agent in this guest: a live disk-only snapshot is refused.
    let err = ns.lume_fails(&home, &["snapshot", "create", "sb", "nope"]);
    assert!(err.contains("needs the guest agent"), "{err}");
    ns.lume_ok(&home, &["snapshot", "create", "sb", "s1", "--memory"]);
    assert_eq!(disk(&ns, &ip, Some("two")), "two");
    ns.lume_ok(&home, &["snapshot", "create", "sb", "s2", "--memory"]);
    assert_eq!(disk(&ns, &ip, Some("three")), "three");
    ns.lume_ok(&home, &["snapshot", "create", "sb", "s3", "--memory"]);
    assert_eq!(disk(&ns, &ip, Some("four")), "four");
    let listed: Value =
        serde_json::from_str(&ns.lume_ok(&home, &["snapshot", "list", "sb", "-f", "json"]))
            .unwrap();
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["s1", "s2", "s3"]);
    assert_eq!(details(&ns, &home, "sb")["snapshots"][2], "s3");

    // Stop, then restore the memory of s1: the guest goes on without a new
    // boot (the new run's console has no boot line), same address, and its
    // disk is the one of that moment.
    ns.lume_ok(&home, &["stop", "sb"]);
    let out = ns.lume_ok(&home, &["snapshot", "restore", "sb", "s1"]);
    assert!(out.contains("it is running"), "{out}");
    assert_eq!(details(&ns, &home, "sb")["ipAddress"], ip.as_str());
    assert_eq!(disk(&ns, &ip, None), "one");
    assert!(
        !console(&home, "sb").contains("LUME-GUEST: booted"),
        "{}",
        console(&home, "sb")
    );

    // Delete the middle snapshot: s3 (built on s2's layer) is intact.
    ns.lume_ok(&home, &["snapshot", "delete", "sb", "s2"]);
    // Restore while running: the running state is replaced.
    ns.lume_ok(&home, &["snapshot", "restore", "sb", "s3"]);
    assert_eq!(disk(&ns, &ip, None), "three");
    assert!(!console(&home, "sb").contains("LUME-GUEST: booted"));
    // s1 is still there, and so is its disk.
    ns.lume_ok(&home, &["snapshot", "restore", "sb", "s1"]);
    assert_eq!(disk(&ns, &ip, None), "one");
    ns.lume_ok(&home, &["snapshot", "restore", "sb", "s3"]);
    assert_eq!(disk(&ns, &ip, None), "three");

    // A clone from a snapshot of the running VM: its own VM, booting from
    // the snapshot's disk.
    let out = ns.lume_ok(&home, &["clone", "sb", "sc", "--snapshot", "s3"]);
    assert!(out.contains("shared by hard links"), "{out}");
    assert!(!out.contains("reflink"), "{out}");
    // Two snapshots in the same second get different default names.
    let l0 = ns.lume_ok(&home, &["snapshot", "list", "sc"]);
    assert_eq!(l0.trim(), "No snapshots");
    ns.lume_ok(&home, &["snapshot", "create", "sc"]);
    ns.lume_ok(&home, &["snapshot", "create", "sc"]);
    let listed: Value =
        serde_json::from_str(&ns.lume_ok(&home, &["snapshot", "list", "sc", "-f", "json"]))
            .unwrap();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 2);
    assert_ne!(listed[0]["name"], listed[1]["name"]);
    assert!(listed.iter().all(|s| s["allocatedSize"].is_u64()));
    for s in listed {
        ns.lume_ok(
            &home,
            &["snapshot", "delete", "sc", s["name"].as_str().unwrap()],
        );
    }
    // Plain clone, push and resize of a VM with snapshots are refused.
    let err = ns.lume_fails(&home, &["clone", "sb", "plain"]);
    assert!(
        err.contains("its disk is layered") || err.contains("is running"),
        "{err}"
    );
    let ip2 = start(&ns, &home, "sc", &[]);
    assert_ne!(ip2, ip);
    assert_eq!(disk(&ns, &ip2, None), "three");
    assert_eq!(disk(&ns, &ip2, Some("clone")), "clone");
    ns.lume_ok(&home, &["stop", "sc"]);
    assert_eq!(disk(&ns, &ip, None), "three");

    // Ephemeral: changes are gone after the stop.
    ns.lume_ok(&home, &["stop", "sb"]);
    // A memory restore onto other settings is refused before anything is
    // touched, naming what changed and the command that sets it back.
    ns.lume_ok(&home, &["set", "sb", "--cpu", "2"]);
    let err = ns.lume_fails(&home, &["snapshot", "restore", "sb", "s1"]);
    assert!(err.contains("CPU count (1 CPU then, 2 CPUs now)"), "{err}");
    assert!(
        err.contains("`lume set sb --cpu 1 --memory 512MB`"),
        "{err}"
    );
    ns.lume_ok(&home, &["set", "sb", "--cpu", "1", "--memory", "512MB"]);
    ns.lume_ok(&home, &["set", "sb", "--network", "nat"]);
    let err = ns.lume_fails(&home, &["snapshot", "restore", "sb", "s1"]);
    assert!(err.contains("ran in network mode 'host'"), "{err}");
    assert!(err.contains("`lume set sb --network host`"), "{err}");
    ns.lume_ok(&home, &["set", "sb", "--network", "host"]);
    assert_eq!(details(&ns, &home, "sb")["status"], "stopped");
    let err = ns.lume_fails(&home, &["clone", "sb", "plain"]);
    assert!(err.contains("snapshots and its disk is layered"), "{err}");
    let err = ns.lume_fails(&home, &["set", "sb", "--disk-size", "32MB"]);
    assert!(err.contains("snapshots and its disk is layered"), "{err}");
    let ip = start(&ns, &home, "sb", &["--ephemeral"]);
    assert!(console(&home, "sb").contains("LUME-GUEST: booted"));
    assert_eq!(details(&ns, &home, "sb")["ephemeral"], true);
    assert_eq!(disk(&ns, &ip, None), "three");
    assert_eq!(disk(&ns, &ip, Some("throwaway")), "throwaway");
    let err = ns.lume_fails(&home, &["snapshot", "create", "sb", "e", "--memory"]);
    assert!(err.contains("--ephemeral"), "{err}");
    // A restore would end the throwaway run: refused, the run goes on.
    let err = ns.lume_fails(&home, &["snapshot", "restore", "sb", "s1"]);
    assert!(err.contains("runs with --ephemeral"), "{err}");
    assert_eq!(disk(&ns, &ip, None), "throwaway");
    ns.lume_ok(&home, &["stop", "sb"]);
    assert!(details(&ns, &home, "sb").get("ephemeral").is_none());
    assert!(!files(&snaps).iter().any(|f| f.starts_with("ephemeral-")));
    // A killed supervisor of an ephemeral run: the next start drops it.
    let ip = start(&ns, &home, "sb", &["--ephemeral"]);
    assert_eq!(disk(&ns, &ip, Some("killed")), "killed");
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(home.vm_dir("sb").join("run.json")).unwrap())
            .unwrap();
    let pid = state["pid"].as_i64().unwrap();
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    wait_for("the VM to be stopped", Duration::from_secs(30), || {
        (details(&ns, &home, "sb")["status"] == "stopped").then_some(())
    });
    assert!(files(&snaps).iter().any(|f| f.starts_with("ephemeral-")));
    let ip = start(&ns, &home, "sb", &[]);
    assert_eq!(disk(&ns, &ip, None), "three");
    assert!(!files(&snaps).iter().any(|f| f.starts_with("ephemeral-")));
    ns.lume_ok(&home, &["stop", "sb"]);

    // A disk-only snapshot of the stopped VM; restoring it leaves a
    // stopped VM stopped, and a running one boots again on that disk.
    ns.lume_ok(&home, &["snapshot", "create", "sb", "d"]);
    let ip = start(&ns, &home, "sb", &[]);
    assert_eq!(disk(&ns, &ip, Some("five")), "five");
    ns.lume_ok(&home, &["stop", "sb"]);
    let out = ns.lume_ok(&home, &["snapshot", "restore", "sb", "d"]);
    assert!(out.contains("it is stopped"), "{out}");
    let ip = start(&ns, &home, "sb", &[]);
    assert_eq!(disk(&ns, &ip, None), "three");
    assert_eq!(disk(&ns, &ip, Some("six")), "six");
    let out = ns.lume_ok(&home, &["snapshot", "restore", "sb", "d"]);
    assert!(out.contains("it is running"), "{out}");
    wait_console(&home, "sb", "LUME-GUEST: lease", BOOT);
    let ip = details(&ns, &home, "sb")["ipAddress"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(disk(&ns, &ip, None), "three");
    ns.lume_ok(&home, &["stop", "sb"]);
    ns.lume_ok(&home, &["snapshot", "delete", "sb", "d"]);

    // Deleting every snapshot leaves the VM's disk as it is.
    for s in ["s1", "s3"] {
        ns.lume_ok(&home, &["snapshot", "delete", "sb", s]);
    }
    assert_eq!(
        ns.lume_ok(&home, &["snapshot", "list", "sb"]).trim(),
        "No snapshots"
    );
    let ip = start(&ns, &home, "sb", &[]);
    assert_eq!(disk(&ns, &ip, None), "three");
    let err = ns.lume_fails(&home, &["snapshot", "flatten", "sb"]);
    assert!(err.contains("is running"), "{err}");
    ns.lume_ok(&home, &["stop", "sb"]);
    // Still layered: what refuses says so and names a command that exists.
    let err = ns.lume_fails(&home, &["set", "sb", "--disk-size", "32MB"]);
    assert!(
        err.contains("has no snapshots, but its disk is layered"),
        "{err}"
    );
    assert!(err.contains("`lume snapshot flatten sb`"), "{err}");
    let out = ns.lume_ok(&home, &["snapshot", "flatten", "sb"]);
    assert!(out.contains("merged into a plain disk.img"), "{out}");
    assert!(!snaps.exists());
    ns.lume_ok(&home, &["set", "sb", "--disk-size", "32MB"]);
    let ip = start(&ns, &home, "sb", &[]);
    assert_eq!(disk(&ns, &ip, None), "three");
    ns.lume_ok(&home, &["stop", "sb"]);
    // The clone from a snapshot (layered, no snapshots) flattens too.
    ns.lume_ok(&home, &["snapshot", "flatten", "sc"]);
    ns.lume_ok(&home, &["clone", "sc", "plain"]);
    let ip = start(&ns, &home, "plain", &[]);
    assert_eq!(disk(&ns, &ip, None), "clone");
    ns.lume_ok(&home, &["stop", "plain"]);
    // Every file is private.
    use std::os::unix::fs::PermissionsExt;
    let snaps = home.vm_dir("sc").join("snapshots");
    ns.lume_ok(&home, &["snapshot", "create", "sc", "last"]);
    for f in files(&snaps) {
        let m = std::fs::metadata(snaps.join(&f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(m & 0o777, 0o600, "{f}");
    }
}

/// A VM folder as an earlier release wrote it (no snapshots/, 0644 files):
/// it runs unchanged, then takes and restores a memory snapshot.
#[test]
fn an_old_layout_vm_runs_and_snapshots() {
    let g = guest_dir();
    let home = Home::new();
    let ns = Netns::new("so");
    let cmdline = std::fs::read_to_string(g.join("cmdline")).unwrap();
    common::write_previous_release_vm(
        &home,
        "old",
        &std::fs::read(g.join("vmlinuz")).unwrap(),
        &std::fs::read(g.join("initrd.img")).unwrap(),
        cmdline.trim(),
    );
    ns.lume_ok(&home, &["run", "old", "--detach"]);
    wait_console(&home, "old", "LUME-GUEST: ready", BOOT);
    assert!(!home.vm_dir("old").join("snapshots").exists());
    ns.lume_ok(&home, &["snapshot", "create", "old", "m", "--memory"]);
    ns.lume_ok(&home, &["stop", "old"]);
    let out = ns.lume_ok(&home, &["snapshot", "restore", "old", "m"]);
    assert!(out.contains("it is running"), "{out}");
    // Its supervisor is lume started again (`ps` would show a forked one
    // as `lume snapshot restore` for the VM's life).
    let sup = common::supervisor_cmdline(&home.vm_dir("old"));
    assert!(sup.contains("run old --storage"), "{sup}");
    assert!(!console(&home, "old").contains("LUME-GUEST: booted"));
    ns.lume_ok(&home, &["stop", "old"]);
}

/// A guest that wrote a qcow2 header naming /etc/shadow as its backing file
/// into its raw disk: with snapshots the disk is still opened as raw, and
/// QEMU never opens /etc/shadow.
#[test]
fn a_qcow2_header_written_by_the_guest_is_never_followed() {
    let g = guest_dir();
    let home = Home::new();
    home.write_settings(
        "hostSubnet: 192.0.2.0/24\nnatSubnet6: 2001:db8:64::/64\nhostSubnet6: 2001:db8:65::/64\n",
    );
    let ns = Netns::new("sq");
    create(&ns, &home, &g, "ev");
    // qcow2 v2 header: magic, version 2, backing_file_offset 104, size 11.
    let mut h = vec![0u8; 512];
    h[0..4].copy_from_slice(b"QFI\xfb");
    h[4..8].copy_from_slice(&2u32.to_be_bytes());
    h[8..16].copy_from_slice(&104u64.to_be_bytes());
    h[16..20].copy_from_slice(&11u32.to_be_bytes());
    h[20..24].copy_from_slice(&16u32.to_be_bytes());
    h[24..32].copy_from_slice(&(16u64 << 20).to_be_bytes());
    h[104..115].copy_from_slice(b"/etc/shadow");
    let disk_img = home.vm_dir("ev").join("disk.img");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&disk_img)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &h, 0).unwrap();
    drop(f);
    ns.lume_ok(&home, &["snapshot", "create", "ev", "s"]);
    let ip = start(&ns, &home, "ev", &["--ephemeral"]);
    // The guest sees its raw bytes, header and all.
    assert!(disk(&ns, &ip, None).starts_with("QFI"));
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(home.vm_dir("ev").join("run.json")).unwrap())
            .unwrap();
    let qemu = state["qemuPid"].as_u64().unwrap();
    for fd in std::fs::read_dir(format!("/proc/{qemu}/fd"))
        .unwrap()
        .flatten()
    {
        let target = std::fs::read_link(fd.path()).unwrap_or_default();
        assert_ne!(target, PathBuf::from("/etc/shadow"));
    }
    let log = std::fs::read_to_string(home.vm_dir("ev").join("lume.log")).unwrap();
    assert!(log.contains(r#""driver":"raw""#), "{log}");
    ns.lume_ok(&home, &["stop", "ev"]);
    // A memory snapshot of a stopped VM is refused.
    let err = ns.lume_fails(&home, &["snapshot", "create", "ev", "m", "--memory"]);
    assert!(err.contains("is not running"), "{err}");
}

/// The REST routes on a stopped VM (no boot needed): create, list, the
/// refusals and their statuses, restore, delete, VMDetails' `snapshots`.
#[test]
fn snapshots_through_the_api() {
    use common::api::{Api, Server};
    use serde_json::json;
    let home = Home::new();
    let ns = Netns::new("sa");
    ns.lume_ok(
        &home,
        &["create", "app", "--disk-size", "8MB", "--network", "none"],
    );
    let server = Server::start(&ns, &home, &[], &[]);
    let api = Api::new(&ns, &server);
    let made = api.post("/lume/vms/app/snapshots", json!({"name": "base"}));
    assert_eq!(made.status, 201, "{made:?}");
    assert_eq!(made.body["name"], "base");
    assert_eq!(made.body["memory"], false);
    api.fails(
        api.post("/lume/vms/app/snapshots", json!({"name": "base"})),
        409,
        "already has a snapshot",
    );
    api.fails(
        api.post(
            "/lume/vms/app/snapshots",
            json!({"name": "m", "memory": true}),
        ),
        409,
        "is not running",
    );
    // Worded for the API: routes and request fields, never CLI flags.
    let refused = api.post(
        "/lume/vms/app/snapshots",
        json!({"name": "m", "memory": true}),
    );
    let m = refused.body["message"].as_str().unwrap();
    assert!(m.contains(r#"leave out "memory": true"#), "{m}");
    assert!(m.contains("POST /lume/vms/app/run"), "{m}");
    assert!(!m.contains("--") && !m.contains("`lume "), "{m}");
    api.fails(
        api.post("/lume/vms/app/snapshots", json!({"name": "../x"})),
        400,
        "Invalid snapshot name",
    );
    api.fails(
        api.post("/lume/vms/app/snapshots/nope/restore", json!({})),
        404,
        "has no snapshot 'nope'",
    );
    let list = api.get("/lume/vms/app/snapshots");
    assert_eq!(list.status, 200);
    assert_eq!(list.body.as_array().unwrap().len(), 1);
    assert_eq!(api.get("/lume/vms/app").body["snapshots"], json!(["base"]));
    let restored = api.post("/lume/vms/app/snapshots/base/restore", json!({}));
    assert_eq!(restored.status, 200, "{restored:?}");
    assert_eq!(restored.body["vm"]["status"], "stopped");
    // A plain clone of a layered VM is refused; one from the snapshot works.
    api.fails(
        api.post("/lume/vms/clone", json!({"name": "app", "newName": "c1"})),
        409,
        "POST /lume/vms/app/flatten",
    );
    let cloned = api.post(
        "/lume/vms/clone",
        json!({"name": "app", "newName": "c2", "snapshot": "base"}),
    );
    assert_eq!(cloned.status, 200, "{cloned:?}");
    api.fails(
        api.post("/lume/vms/app/flatten", json!({})),
        409,
        "still has 1 snapshot(s)",
    );
    let gone = api.call("DELETE", "/lume/vms/app/snapshots/base", None);
    assert_eq!(gone.status, 200, "{gone:?}");
    assert_eq!(api.get("/lume/vms/app/snapshots").body, json!([]));
    // No snapshots left: flatten makes the disk plain, and a plain clone
    // works again.
    let flat = api.post("/lume/vms/app/flatten", json!({}));
    assert_eq!(flat.status, 200, "{flat:?}");
    assert!(!home.vm_dir("app").join("snapshots").exists());
    let cloned = api.post("/lume/vms/clone", json!({"name": "app", "newName": "c1"}));
    assert_eq!(cloned.status, 200, "{cloned:?}");
}

/// A filesystem that fills up while a memory snapshot is written: the
/// command fails, nothing half-made is listed or left, the VM keeps
/// running, and once there is room again a snapshot works.
#[test]
fn a_full_filesystem_fails_the_snapshot_and_leaves_everything_intact() {
    struct Tmpfs(PathBuf);
    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let g = guest_dir();
    let home = Home::new();
    let ns = Netns::new("se");
    let dir = PathBuf::from(format!("/tmp/lume-enospc-{}", std::process::id()));
    std::fs::create_dir(&dir).unwrap();
    let _mount = Tmpfs(dir.clone());
    common::sh(&format!(
        "mount -t tmpfs -o size=160m,mode=0700 tmpfs {}",
        dir.display()
    ));
    let storage = dir.display().to_string();
    let cmdline = std::fs::read_to_string(g.join("cmdline")).unwrap();
    let (kernel, initrd) = (
        g.join("vmlinuz").display().to_string(),
        g.join("initrd.img").display().to_string(),
    );
    let l = |args: &[&str]| {
        let mut a = args.to_vec();
        a.extend(["--storage", &storage]);
        ns.lume(&home, &a)
    };
    let ok = |args: &[&str]| {
        let out = l(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    ok(&[
        "create",
        "en",
        "--cpu",
        "1",
        "--memory",
        "192MB",
        "--disk-size",
        "16MB",
        "--network",
        "none",
        "--kernel",
        &kernel,
        "--initrd",
        &initrd,
        "--cmdline",
        cmdline.trim(),
    ]);
    ok(&["snapshot", "create", "en", "s0"]);
    ok(&["run", "en", "--detach"]);
    let console = dir.join("en/console.log");
    wait_for("the guest", BOOT, || {
        std::fs::read_to_string(&console)
            .ok()
            .filter(|c| c.contains("LUME-GUEST: ready"))
    });
    // Fill the filesystem, leaving about 1 MiB.
    let free = nix::sys::statvfs::statvfs(&dir).unwrap();
    let avail = free.blocks_available() as u64 * free.fragment_size() as u64;
    let filler = dir.join("filler");
    let f = std::fs::File::create(&filler).unwrap();
    let _ = nix::fcntl::posix_fallocate(&f, 0, avail.saturating_sub(1 << 20) as i64);
    drop(f);
    let out = l(&["snapshot", "create", "en", "m", "--memory"]);
    assert!(!out.status.success(), "a snapshot into a full filesystem");
    let listed = ok(&["snapshot", "list", "en", "-f", "json"]);
    let listed: Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert!(!dir.join("en/snapshots/mem-m.state").exists());
    let d: Value = serde_json::from_str(&ok(&["get", "en", "-f", "json"])).unwrap();
    assert_eq!(d[0]["status"], "running");
    // Room again: a memory snapshot works and restores without a boot.
    std::fs::remove_file(&filler).unwrap();
    ok(&["snapshot", "create", "en", "m", "--memory"]);
    ok(&["stop", "en"]);
    let out = ok(&["snapshot", "restore", "en", "m"]);
    assert!(out.contains("it is running"), "{out}");
    assert!(
        !std::fs::read_to_string(&console)
            .unwrap()
            .contains("LUME-GUEST: booted")
    );
    ok(&["stop", "en"]);
    // The disk-only snapshot taken first is intact too.
    ok(&["snapshot", "restore", "en", "s0"]);
}

/// A guest whose agent channel is open but answers nothing (a stuck agent):
/// a live disk snapshot is refused after the agent's timeout, nothing is
/// left of it, and the guest runs on.
#[test]
fn a_stuck_guest_agent_refuses_a_live_disk_snapshot() {
    let g = guest_dir();
    let home = Home::new();
    let ns = Netns::new("sg");
    let cmdline = std::fs::read_to_string(g.join("cmdline")).unwrap();
    let (kernel, initrd) = (
        g.join("vmlinuz").display().to_string(),
        g.join("initrd.img").display().to_string(),
    );
    let extra = format!("{} lume.agentport", cmdline.trim());
    ns.lume_ok(
        &home,
        &[
            "create",
            "ag",
            "--cpu",
            "1",
            "--memory",
            "192MB",
            "--disk-size",
            "16MB",
            "--network",
            "none",
            "--kernel",
            &kernel,
            "--initrd",
            &initrd,
            "--cmdline",
            &extra,
        ],
    );
    ns.lume_ok(&home, &["run", "ag", "--detach"]);
    wait_console(&home, "ag", "LUME-GUEST: agent port held", BOOT);
    wait_for(
        "the agent channel in run.json",
        Duration::from_secs(30),
        || {
            (details(&ns, &home, "ag")["status"] == "running"
                && std::fs::read_to_string(home.vm_dir("ag").join("run.json"))
                    .unwrap_or_default()
                    .contains("\"guestAgent\": true"))
            .then_some(())
        },
    );
    let err = ns.lume_fails(&home, &["snapshot", "create", "ag", "live"]);
    assert!(err.contains("needs the guest agent"), "{err}");
    let snaps = home.vm_dir("ag").join("snapshots");
    assert!(
        !files(&snaps)
            .iter()
            .any(|f| f.starts_with("layer-") || f.starts_with("snap-")),
        "{:?}",
        files(&snaps)
    );
    assert!(!home.vm_dir("ag").join("snapshots/head.json").exists());
    assert_eq!(details(&ns, &home, "ag")["status"], "running");
    // The same VM with --memory: no agent needed.
    ns.lume_ok(&home, &["snapshot", "create", "ag", "live", "--memory"]);
    ns.lume_ok(&home, &["stop", "ag"]);
}

/// `lume snapshot create --memory` started in the background; its pid is
/// lume's own (`ip netns exec` execs it).
fn spawn_memory_snapshot(ns: &Netns, home: &Home, vm: &str, snap: &str) -> std::process::Child {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &ns.name])
        .arg(common::lume_bin())
        .args(["snapshot", "create", vm, snap, "--memory"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    home.env(&mut c);
    c.spawn().unwrap()
}

/// Waits (polling every millisecond) until `path` exists: the save runs.
fn wait_file(path: &std::path::Path) {
    let until = std::time::Instant::now() + Duration::from_secs(60);
    while !path.exists() {
        assert!(std::time::Instant::now() < until, "no {}", path.display());
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn signal(child: &std::process::Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

/// A restore that must be refused leaves a running VM running; a memory
/// snapshot whose command is killed (kill -9, or Ctrl-C) while the guest
/// is paused lets the guest go on, and the half snapshot is never listed.
#[test]
fn a_killed_memory_snapshot_lets_the_guest_go_on_and_a_refused_restore_keeps_it_running() {
    let g = guest_dir();
    let home = Home::new();
    home.write_settings(
        "hostSubnet: 192.0.2.0/24\nnatSubnet6: 2001:db8:64::/64\nhostSubnet6: 2001:db8:65::/64\n",
    );
    let ns = Netns::new("sk");
    create(&ns, &home, &g, "sk");
    let snaps = home.vm_dir("sk").join("snapshots");
    let ip = start(&ns, &home, "sk", &[]);
    assert_eq!(disk(&ns, &ip, Some("one")), "one");
    ns.lume_ok(&home, &["snapshot", "create", "sk", "m", "--memory"]);

    // Other CPU count: refused before QEMU is touched; the guest runs on.
    ns.lume_ok(&home, &["set", "sk", "--cpu", "2"]);
    let err = ns.lume_fails(&home, &["snapshot", "restore", "sk", "m"]);
    assert!(
        err.contains("set it back with `lume set sk --cpu 1"),
        "{err}"
    );
    assert_eq!(details(&ns, &home, "sk")["status"], "running");
    assert_eq!(disk(&ns, &ip, Some("two")), "two");
    ns.lume_ok(&home, &["set", "sk", "--cpu", "1"]);

    // kill -9 of the command while the guest is paused and its memory is
    // being saved.
    let req = b"GET /cgi-bin/disk HTTP/1.0\r\n\r\n";
    let addr = format!("{ip}:80");
    let marker = snaps.join("paused-by-snapshot");
    let mut child = spawn_memory_snapshot(&ns, &home, "sk", "half");
    wait_file(&snaps.join("mem-half.state"));
    signal(&child, "-STOP");
    assert!(marker.exists());
    assert!(!snaps.join("snap-half.json").exists());
    assert!(ns.tcp_exchange(&addr, req).is_none(), "the guest is paused");
    child.kill().unwrap();
    child.wait().unwrap();
    // The supervisor lets it go on (it looks twice a second).
    wait_for("the guest to answer again", Duration::from_secs(10), || {
        ns.tcp_exchange(&addr, req)
            .filter(|r| r.contains("disk:two"))
    });
    assert!(!marker.exists());
    assert_eq!(details(&ns, &home, "sk")["status"], "running");
    let listed = ns.lume_ok(&home, &["snapshot", "list", "sk", "-f", "json"]);
    let listed: Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["name"], "m");

    // Ctrl-C: the command itself lets the guest go on before it exits.
    let mut child = spawn_memory_snapshot(&ns, &home, "sk", "int");
    wait_file(&snaps.join("mem-int.state"));
    signal(&child, "-INT");
    let status = child.wait().unwrap();
    assert!(!status.success());
    assert!(!marker.exists(), "resumed by the interrupted command");
    assert!(!snaps.join("snap-int.json").exists());
    assert_eq!(disk(&ns, &ip, Some("three")), "three");

    // The next snapshot command removes what the two left behind.
    ns.lume_ok(&home, &["snapshot", "create", "sk", "m2", "--memory"]);
    let left = files(&snaps);
    assert!(
        !left
            .iter()
            .any(|f| f == "mem-half.state" || f == "mem-int.state"),
        "{left:?}"
    );
    ns.lume_ok(&home, &["stop", "sk"]);
}
