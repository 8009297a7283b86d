//! End to end: shared directories (virtio-fs) with the real Debian test
//! image (tests/debian/build.sh), provisioned by lume's cloud-init, booted
//! under TCG in a network namespace the test creates (user-mode network).
//! One boot checks a read-only share (readable, not writable, nothing
//! reaches the host) and a read-write one (the guest's writes reach the
//! host); a restart adds a share, which the guest mounts by itself; no
//! virtiofsd is left after a stop or after the supervisor is killed.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use common::{Home, Netns, wait_for};
use serde_json::Value;

const BOOT: Duration = Duration::from_secs(420);

fn image() -> PathBuf {
    common::debian_image()
}

fn ssh(ns: &Netns, home: &Home, cmd: &str) -> Output {
    ns.lume(home, &["ssh", "deb", "-t", "120", "--", cmd])
}

fn ssh_ok(ns: &Netns, home: &Home, cmd: &str) -> String {
    let out = ssh(ns, home, cmd);
    assert!(
        out.status.success(),
        "{cmd}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn wait_ssh(ns: &Netns, home: &Home) {
    let start = Instant::now();
    loop {
        let out = ssh(ns, home, "cloud-init status --wait >/dev/null; true");
        if out.status.success() {
            eprintln!("ssh answered after {:?}", start.elapsed());
            return;
        }
        assert!(start.elapsed() < BOOT, "no ssh within {BOOT:?}");
        std::thread::sleep(Duration::from_secs(3));
    }
}

fn details(ns: &Netns, home: &Home) -> Value {
    let all: Value =
        serde_json::from_str(&ns.lume_ok(home, &["get", "deb", "-f", "json"])).unwrap();
    all[0].clone()
}

/// Processes (pid, command line) that are a virtiofsd of this VM.
fn virtiofsd_of(vm_dir: &Path) -> Vec<(String, String)> {
    let needle = format!("source={}/shares/", vm_dir.display());
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains("virtiofsd") && cmd.contains(&needle) {
            found.push((name, cmd));
        }
    }
    found
}

#[test]
fn shares_are_mounted_read_only_or_read_write_and_die_with_the_vm() {
    let image = image();
    let home = Home::new();
    home.write_settings("userSubnet: 192.0.2.0/24\n");
    let ns = Netns::new("sh");
    let ro = home.path().join("roshare");
    let rw = home.path().join("rwshare");
    let later = home.path().join("later");
    for d in [&ro, &rw, &later] {
        std::fs::create_dir(d).unwrap();
    }
    std::fs::write(ro.join("hello"), "from-the-host\n").unwrap();
    std::fs::write(later.join("later.txt"), "added-later\n").unwrap();
    let img = image.to_str().unwrap();
    ns.lume_ok(
        &home,
        &[
            "create",
            "deb",
            "--image",
            img,
            "--disk-size",
            "3GB",
            "--cpu",
            "2",
            "--memory",
            "1GB",
            "--network",
            "user",
        ],
    );
    let ro_arg = format!("{}:ro", ro.display());
    ns.lume_ok(
        &home,
        &[
            "run",
            "deb",
            "--detach",
            "--shared-dir",
            &ro_arg,
            "--shared-dir",
            rw.to_str().unwrap(),
        ],
    );
    let d = details(&ns, &home);
    let shares = d["sharedDirectories"].as_array().unwrap();
    assert_eq!(shares.len(), 2, "{d}");
    assert_eq!(shares[0]["hostPath"], ro.display().to_string());
    assert_eq!(shares[0]["readOnly"], true);
    assert_eq!(shares[0]["tag"], "lume0");
    assert_eq!(shares[1]["readOnly"], false);
    let vm_dir = home.vm_dir("deb");
    let daemons = virtiofsd_of(&vm_dir);
    assert!(!daemons.is_empty());
    // Their output goes through lume's capped pump (a pipe), never straight
    // into a file they could grow without end; no device nodes.
    for (pid, cmd) in &daemons {
        for fd in [1, 2] {
            let target = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap();
            assert!(
                target.to_string_lossy().starts_with("pipe:"),
                "{cmd}: fd {fd} is {target:?}"
            );
        }
        assert!(cmd.contains("modcaps=-mknod"), "{cmd}");
    }
    wait_ssh(&ns, &home);

    // Read-only: readable; not writable, even by root in the guest.
    assert_eq!(
        ssh_ok(&ns, &home, "cat /mnt/shared/roshare/hello"),
        "from-the-host"
    );
    for cmd in [
        "sudo sh -c 'echo x > /mnt/shared/roshare/new'",
        "sudo rm /mnt/shared/roshare/hello",
    ] {
        assert!(!ssh(&ns, &home, cmd).status.success(), "{cmd} succeeded");
    }
    assert!(!ro.join("new").exists());
    assert!(
        ro.join("hello").exists(),
        "the guest removed a read-only file"
    );
    // Read-write: the guest's writes reach the host.
    ssh_ok(
        &ns,
        &home,
        "sudo sh -c 'echo from-the-guest > /mnt/shared/rwshare/out'",
    );
    assert_eq!(
        std::fs::read_to_string(rw.join("out")).unwrap(),
        "from-the-guest\n"
    );
    // Guest root cannot leave device nodes on the host (virtiofsd runs
    // without CAP_MKNOD); a FIFO, which needs no privilege, still works.
    for cmd in [
        "sudo mknod /mnt/shared/rwshare/disk b 8 0",
        "sudo mknod /mnt/shared/rwshare/mem c 1 1",
    ] {
        assert!(!ssh(&ns, &home, cmd).status.success(), "{cmd} succeeded");
    }
    assert!(!rw.join("disk").exists() && !rw.join("mem").exists());
    ssh_ok(&ns, &home, "sudo mkfifo /mnt/shared/rwshare/fifo");
    assert!(rw.join("fifo").exists());

    // Stop: no virtiofsd left, no shares listed.
    ns.lume_ok(&home, &["stop", "deb", "--timeout", "60"]);
    assert!(
        virtiofsd_of(&vm_dir).is_empty(),
        "{:?}",
        virtiofsd_of(&vm_dir)
    );
    let d = details(&ns, &home);
    assert_eq!(d["sharedDirectories"], serde_json::json!([]));

    // The next run adds a share: the guest mounts it by itself.
    let later_arg = format!("{}:ro", later.display());
    ns.lume_ok(
        &home,
        &[
            "run",
            "deb",
            "--detach",
            "--shared-dir",
            rw.to_str().unwrap(),
            "--shared-dir",
            &later_arg,
        ],
    );
    wait_ssh(&ns, &home);
    assert_eq!(
        ssh_ok(&ns, &home, "cat /mnt/shared/later/later.txt"),
        "added-later"
    );
    assert_eq!(
        ssh_ok(&ns, &home, "cat /mnt/shared/rwshare/out"),
        "from-the-guest"
    );

    // A killed supervisor takes its virtiofsd with it.
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(vm_dir.join("run.json")).unwrap()).unwrap();
    let pid = state["pid"].as_u64().unwrap();
    common::sh(&format!("kill -9 {pid}"));
    wait_for("virtiofsd to end", Duration::from_secs(20), || {
        virtiofsd_of(&vm_dir).is_empty().then_some(())
    });
}
