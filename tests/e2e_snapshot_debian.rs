//! End to end with the real Debian 12 cloud disk (tests/debian/build.sh,
//! cached), in user mode inside a network namespace the test creates:
//! a file deleted after a snapshot is back after the restore (a memory
//! snapshot, which freezes the disk at the same instant: the image has no
//! guest agent, so a live disk-only snapshot would be refused), and an
//! `--ephemeral` run leaves every file of the disk as it was. Two boots
//! under TCG (the second without cloud-init's first-boot work).
//! Needs root (network namespaces) and the packages of scripts/install-deps.sh.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{Home, Netns};

const BOOT: Duration = Duration::from_secs(420);

fn image() -> PathBuf {
    common::debian_image()
}

fn ssh(ns: &Netns, home: &Home, cmd: &str) -> Output {
    ns.lume(home, &["ssh", "deb", "-t", "120", "--", cmd])
}

/// Runs `cmd` over SSH once the guest answers (cloud-init done); its stdout.
fn wait_ssh(ns: &Netns, home: &Home, cmd: &str) -> String {
    let start = Instant::now();
    loop {
        let out = ssh(
            ns,
            home,
            &format!("cloud-init status --wait >/dev/null; {cmd}"),
        );
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).trim().to_string();
        }
        assert!(
            start.elapsed() < BOOT,
            "no SSH answer within {BOOT:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_secs(3));
    }
}

#[test]
fn debian_ephemeral_run_and_snapshot_restore() {
    let image = image();
    let home = Home::new();
    home.write_settings("userSubnet: 192.0.2.0/24\n");
    let ns = Netns::new("sd");
    let image_arg = image.display().to_string();
    ns.lume_ok(
        &home,
        &[
            "create",
            "deb",
            "--image",
            &image_arg,
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

    // Boot 1: a file, a snapshot, the file deleted: the restore brings it
    // back (without a boot: the memory snapshot resumes the guest).
    ns.lume_ok(&home, &["run", "deb", "--detach"]);
    let out = wait_ssh(
        &ns,
        &home,
        "echo precious | sudo tee /var/tmp/keep >/dev/null && sync && echo ok",
    );
    assert_eq!(out, "ok");
    ns.lume_ok(&home, &["snapshot", "create", "deb", "before", "--memory"]);
    let out = ssh(
        &ns,
        &home,
        "sudo rm /var/tmp/keep && sync && ! test -e /var/tmp/keep && echo gone",
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "gone");
    ns.lume_ok(&home, &["snapshot", "restore", "deb", "before"]);
    let out = wait_ssh(&ns, &home, "cat /var/tmp/keep");
    assert_eq!(out, "precious");
    let console =
        std::fs::read_to_string(home.vm_dir("deb").join("console.log")).unwrap_or_default();
    assert!(
        !console.contains("Linux version"),
        "the restored guest booted again: {console}"
    );
    ns.lume_ok(&home, &["stop", "deb"]);

    // Boot 2, ephemeral: what it does to the disk is gone at stop; every
    // file of the VM's disk (disk.img and its layers) is byte for byte
    // what it was.
    let before = disk_files(&home);
    ns.lume_ok(&home, &["run", "deb", "--detach", "--ephemeral"]);
    let out = wait_ssh(
        &ns,
        &home,
        "sudo rm /var/tmp/keep /etc/debian_version && sudo touch /etc/ephemeral && sync && echo done",
    );
    assert_eq!(out, "done");
    ns.lume_ok(&home, &["stop", "deb"]);
    assert_eq!(disk_files(&home), before);
}

/// Every file of the VM's disk with the SHA-256 of its content.
fn disk_files(home: &Home) -> Vec<(String, String)> {
    let dir = home.vm_dir("deb");
    let mut files = vec![dir.join("disk.img")];
    for e in std::fs::read_dir(dir.join("snapshots")).unwrap().flatten() {
        files.push(e.path());
    }
    files.sort();
    files
        .iter()
        .map(|f| {
            let out = Command::new("sha256sum").arg(f).output().unwrap();
            (
                f.display().to_string(),
                String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .next()
                    .unwrap_or("")
                    .to_string(),
            )
        })
        .collect()
}
