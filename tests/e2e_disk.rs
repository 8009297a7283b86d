//! End to end, disks and files: a VM directory written by the previous
//! release runs after its migration; an extra raw disk whose first bytes are
//! a qcow2 header naming /etc/shadow as backing file stays raw for the guest;
//! the guest's console output is capped. The real test guest under TCG.
//! Needs root and the packages installed by scripts/test.sh.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Home, wait_for};

const BOOT: Duration = Duration::from_secs(180);

/// Sends QMP commands to a running VM (one connection) and returns the answers.
fn qmp(dir: &Path, commands: &[&str]) -> Vec<serde_json::Value> {
    let script = r#"
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
f = s.makefile("rw")
json.loads(f.readline())
out = []
for cmd in ["{\"execute\":\"qmp_capabilities\"}"] + sys.argv[2:]:
    f.write(cmd + "\n"); f.flush()
    while True:
        m = json.loads(f.readline())
        if "return" in m or "error" in m:
            out.append(m); break
print(json.dumps(out[1:]))
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(dir.join("qmp.sock"))
        .args(commands)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn previous_release_vm_runs_with_raw_disks_and_a_capped_console() {
    assert!(
        nix_is_root(),
        "the end-to-end tests need root: run scripts/test.sh as root"
    );
    let home = Home::new();
    let g = common::guest();
    // Without `quiet` and with initcall_debug the kernel writes far more than the cap.
    let cmdline = format!(
        "{} initcall_debug ignore_loglevel",
        g.cmdline.replace("quiet", "")
    );
    common::write_previous_release_vm(
        &home,
        "old",
        &fs::read(&g.kernel).unwrap(),
        &fs::read(&g.initrd).unwrap(),
        cmdline.trim(),
    );
    let dir = home.vm_dir("old");

    // An extra raw disk that starts with a qcow2 header whose backing file is /etc/shadow.
    let extra = home.path().join("extra.img");
    common::sh(&format!(
        "qemu-img create -q -f qcow2 -F raw -b /etc/shadow -u {} 1M",
        extra.display()
    ));
    let iso = home.path().join("cd.iso");
    fs::write(&iso, vec![0u8; 1 << 20]).unwrap();

    const CAP: u64 = 16 << 10;
    let out = home
        .cmd()
        .env("LUME_TEST_LOG_CAP", CAP.to_string())
        .args(["run", "old", "--detach", "--disk"])
        .arg(&extra)
        .arg("--mount")
        .arg(&iso)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _stop = StopOnDrop(&home, "old");
    assert_eq!(mode(&dir), 0o700, "migrated at the first command");

    // The newest console line is kept, the files stay within the cap.
    let console = dir.join("console.log");
    let older = dir.join("console.log.1");
    wait_for("the guest's ready line", BOOT, || {
        let now = fs::read_to_string(&console).unwrap_or_default();
        let before = fs::read_to_string(&older).unwrap_or_default();
        (now + &before).contains("LUME-GUEST: ready").then_some(())
    });
    let (now, before) = (
        fs::metadata(&console).unwrap().len(),
        fs::metadata(&older).unwrap().len(),
    );
    assert!(
        now <= CAP && before <= CAP,
        "console.log {now}, console.log.1 {before}"
    );
    assert!(before > CAP / 2, "the flood rotated at least once");
    assert_eq!(mode(&console), 0o600);
    assert_eq!(mode(&dir.join("qemu.log")), 0o600);
    assert_eq!(mode(&dir.join("lume.log")), 0o600);

    // QEMU's command line names every format and only descriptor paths for the caller's files.
    let log = fs::read_to_string(dir.join("lume.log")).unwrap();
    let start = log.lines().find(|l| l.contains("Starting ")).unwrap();
    // The VM's own disk: an explicit raw node (docs/snapshots.md).
    assert!(
        start.contains(&format!(
            r#""driver":"raw","file":{{"driver":"file","filename":"{}","#,
            dir.join("disk.img").display()
        )),
        "{start}"
    );
    assert!(
        start.contains(",format=raw,media=cdrom,readonly=on"),
        "{start}"
    );
    assert!(!start.contains(extra.to_str().unwrap()), "{start}");
    assert!(!start.contains(iso.to_str().unwrap()), "{start}");
    assert!(
        start.matches(",format=raw,if=virtio").count() == 1,
        "{start}"
    );

    // QEMU opened the extra disk as raw, with no backing file, and the
    // guest reads the header bytes, not /etc/shadow.
    let answers = qmp(&dir, &[r#"{"execute":"query-block"}"#]);
    let blocks = answers[0]["return"].as_array().unwrap().clone();
    let extra_dev = blocks
        .iter()
        .find(|b| {
            let f = b["inserted"]["file"].as_str().unwrap_or("");
            f.starts_with("/proc/") && b["inserted"]["ro"] == false
        })
        .unwrap_or_else(|| panic!("no extra disk in {blocks:?}"));
    for b in blocks.iter().filter(|b| b.get("inserted").is_some()) {
        assert_eq!(b["inserted"]["drv"], "raw", "{b}");
        assert!(b["inserted"].get("backing_file").is_none(), "{b}");
    }
    let device = extra_dev["device"].as_str().unwrap();
    // A full backup of that device holds exactly what the guest reads.
    let copy = home.path().join("guest-view.raw");
    let backup = serde_json::json!({"execute": "drive-backup", "arguments": {
        "device": device, "target": copy, "format": "raw", "sync": "full"}});
    let answers = qmp(&dir, &[&backup.to_string()]);
    assert!(answers[0].get("error").is_none(), "{answers:?}");
    wait_for("the backup job", Duration::from_secs(30), || {
        let jobs = qmp(&dir, &[r#"{"execute":"query-block-jobs"}"#]);
        (jobs[0]["return"].as_array().is_some_and(Vec::is_empty)).then_some(())
    });
    let seen = fs::read(&copy).unwrap();
    let written = fs::read(&extra).unwrap();
    // QEMU rounds a raw disk up to whole sectors.
    assert_eq!(seen.len(), written.len().div_ceil(512) * 512);
    assert!(
        seen[..written.len()] == written[..] && seen[written.len()..].iter().all(|b| *b == 0),
        "the guest sees the file's raw bytes, not /etc/shadow"
    );
    assert!(seen.starts_with(b"QFI\xfb"));

    home.ok(&["stop", "old"]);
    assert_eq!(home.get("old")["status"], "stopped");
}

/// Stops the VM even when an assertion failed.
struct StopOnDrop<'a>(&'a Home, &'a str);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.lume(&["stop", self.1, "--timeout", "5"]);
    }
}

fn nix_is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
}

#[test]
fn a_relative_storage_path_runs() {
    assert!(nix_is_root(), "the end-to-end tests need root");
    let home = Home::new();
    let lume = |args: &[&str]| {
        let out = home
            .cmd()
            .current_dir(home.path())
            .args(args)
            .args(["--storage", "./vms"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "lume {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let args = common::guest_create_args("rel", "none", &[], "");
    lume(&args.iter().map(String::as_str).collect::<Vec<_>>());
    lume(&["run", "rel", "--detach"]);
    let console = home.path().join("vms/rel/console.log");
    wait_for("the guest's ready line", BOOT, || {
        fs::read_to_string(&console)
            .ok()?
            .contains("LUME-GUEST: ready")
            .then_some(())
    });
    lume(&["stop", "rel"]);
}
