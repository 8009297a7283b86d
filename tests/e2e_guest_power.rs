//! End to end, with the busybox test guest in NAT mode (see `common::Lan`):
//! how `lume stop`, `lume shutdown` and `lume restart` reach a guest and
//! which way they report; `sshAvailable`; memory going back to the host
//! through virtio-balloon free page reporting.
//!
//! The test guest runs no QEMU guest agent, so every request first finds
//! that no agent answers on the VM's channel and falls through to the next
//! way; the agent itself is tested against a real qemu-ga in
//! tests/guest_agent.rs.

mod common;

use std::time::{Duration, Instant};

use common::{Lan, wait_console, wait_for};
use serde_json::Value;

const BOOT: Duration = Duration::from_secs(180);

/// A `/proc/<pid>/status` field in KiB: `VmRSS` (resident now) or `VmHWM`
/// (the most it was ever resident).
fn status_kib(pid: u64, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

fn qemu_pid(t: &Lan, vm: &str) -> u64 {
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(t.home.vm_dir(vm).join("run.json")).unwrap())
            .unwrap();
    state["qemuPid"].as_u64().unwrap()
}

fn lume_log(t: &Lan, vm: &str) -> String {
    std::fs::read_to_string(t.home.vm_dir(vm).join("lume.log")).unwrap_or_default()
}

#[test]
fn stop_shutdown_restart_report_their_way_and_memory_goes_back() {
    let t = Lan::new("gp");
    // "ssh": a guest that answers on port 22 and frees 192MB after boot.
    const HOG_MB: u64 = 192;
    t.create(
        "ssh",
        "nat",
        &[],
        &format!("lume.listen=22 lume.memhog={HOG_MB}"),
    );
    t.lume_ok(&["set", "ssh", "--memory", "448MB"]);
    // "deaf": a guest that ignores the power button and listens on nothing.
    t.create("deaf", "nat", &[], "lume.nopower");
    // "stuck": a guest that holds the agent's port open and never answers.
    t.create("stuck", "none", &[], "lume.agentport");
    for vm in ["ssh", "deaf", "stuck"] {
        assert_eq!(t.get(vm)["sshAvailable"], Value::Null, "stopped: null");
        t.lume_ok(&["run", vm, "--detach"]);
    }

    // Memory: QEMU's resident set reached its peak while the guest filled
    // its tmpfs, and falls again once the guest has freed it and reported the
    // free pages. The peak (VmHWM) is the kernel's own record, so the check
    // does not depend on catching the guest while it holds the memory.
    let pid = qemu_pid(&t, "ssh");
    wait_console(&t.home, "ssh", "LUME-GUEST: memhog freed", BOOT);
    let freed_at = Instant::now();
    let peak = status_kib(pid, "VmHWM");
    let goal = peak.saturating_sub(HOG_MB * 1024 / 2);
    let mut lowest = status_kib(pid, "VmRSS");
    while freed_at.elapsed() < Duration::from_secs(90) && lowest > goal {
        std::thread::sleep(Duration::from_millis(250));
        lowest = lowest.min(status_kib(pid, "VmRSS"));
    }
    eprintln!(
        "QEMU resident memory: peak {} MiB while the guest used {HOG_MB} MiB, {} MiB after it freed it ({} MiB returned; {:.1}s after the guest's message)",
        peak / 1024,
        lowest / 1024,
        (peak - lowest) / 1024,
        freed_at.elapsed().as_secs_f64()
    );
    assert!(
        lowest <= goal,
        "QEMU's RSS fell from its peak of {peak} KiB only to {lowest} KiB: less than half of the {HOG_MB} MiB the guest freed came back"
    );

    // The supervisor follows the guest's end of the agent channel: open in
    // "stuck", so lume waits the longer ping there and then falls through.
    wait_console(&t.home, "stuck", "LUME-GUEST: agent port held", BOOT);
    wait_for(
        "run.json to say the guest opened the agent channel",
        Duration::from_secs(10),
        || {
            let s: Value = serde_json::from_str(
                &std::fs::read_to_string(t.home.vm_dir("stuck").join("run.json")).ok()?,
            )
            .ok()?;
            (s["guestAgent"] == true).then_some(())
        },
    );
    wait_console(&t.home, "stuck", "LUME-GUEST: ready", BOOT);
    let out = t.lume_ok(&["stop", "stuck", "--timeout", "30"]);
    assert!(
        out.contains("stopped through the ACPI power button"),
        "{out}"
    );
    let log = lume_log(&t, "stuck");
    assert!(
        log.contains("Guest agent channel opened by the guest"),
        "{log}"
    );
    assert!(log.contains("No guest agent answered within 10s"), "{log}");

    // sshAvailable: port 22 of the VM's address, as lume reports it.
    for (vm, expected) in [("ssh", true), ("deaf", false)] {
        wait_console(&t.home, vm, "LUME-GUEST: lease eth0 203.0.113.", BOOT);
        wait_for(
            &format!("{vm}'s sshAvailable to be {expected}"),
            Duration::from_secs(30),
            || (t.get(vm)["sshAvailable"] == expected).then_some(()),
        );
    }
    let list: Vec<Value> = serde_json::from_str(&t.lume_ok(&["ls", "-f", "json"])).unwrap();
    let ssh_of = |name: &str| {
        list.iter()
            .find(|d| d["name"] == name)
            .map(|d| d["sshAvailable"].clone())
            .unwrap()
    };
    assert_eq!(ssh_of("ssh"), true);
    assert_eq!(ssh_of("deaf"), false);
    // Meanwhile each supervisor probed port 22 itself (docs/commands.md,
    // `sshAvailable`) until the guest first answered at its address: the
    // deaf guest with a refusal; the other with a connection, or with a
    // refusal if a probe came between its network and its listener.
    let probe = |vm: &str| -> Value {
        let text = std::fs::read_to_string(t.home.vm_dir(vm).join("ssh.probe"))
            .unwrap_or_else(|e| panic!("{vm}'s ssh.probe: {e}"));
        serde_json::from_str(&text).unwrap()
    };
    for vm in ["ssh", "deaf"] {
        let at = format!("{}:22", t.get(vm)["ipAddress"].as_str().unwrap());
        wait_for(
            &format!("{vm}'s supervisor to probe {at}"),
            Duration::from_secs(10),
            || (probe(vm)["target"] == at.as_str()).then_some(()),
        );
    }
    assert_eq!(probe("deaf")["available"], false);
    // `lume ssh` waits up to --timeout for port 22, then says why it gave up.
    let err = t.lume_fails(&["ssh", "deaf", "-t", "2", "true"]);
    assert!(
        err.contains("VM 'deaf' did not answer SSH within 2 s (its SSH port does not answer yet)"),
        "{err}"
    );
    let table = t.lume_ok(&["ls"]);
    let header = table.lines().next().unwrap();
    assert!(header.split_whitespace().any(|c| c == "ssh"), "{table}");

    // Restart: no agent, no SSH way yet, so no graceful reboot; --force resets.
    let err = t.lume_fails(&["restart", "deaf"]);
    assert!(err.contains("cannot be restarted gracefully"), "{err}");
    assert!(err.contains("--force"), "{err}");
    let out = t.lume_ok(&["restart", "deaf", "--force"]);
    assert!(
        out.ends_with("reboot requested with a hardware reset (not graceful)\n"),
        "{out}"
    );
    wait_for("the guest to boot a second time", BOOT, || {
        let c = std::fs::read_to_string(t.home.vm_dir("deaf").join("console.log")).ok()?;
        (c.matches("LUME-GUEST: ready").count() >= 2).then_some(())
    });
    assert_eq!(t.get("deaf")["status"], "running");

    // Shutdown never forces: a guest that ignores the button stays up.
    let err = t.lume_fails(&["shutdown", "deaf", "--timeout", "3"]);
    assert!(
        err.contains("ACPI power button") && err.contains("still running"),
        "{err}"
    );
    assert!(err.contains("lume stop deaf"), "{err}");
    assert_eq!(t.get("deaf")["status"], "running");
    // Stop forces it once its timeout has passed, and says so.
    let out = t.lume_ok(&["stop", "deaf", "--timeout", "3"]);
    assert!(
        out.ends_with("stopped by forcing QEMU off (not graceful)\n"),
        "{out}"
    );
    assert_eq!(t.get("deaf")["status"], "stopped");
    assert!(!t.home.vm_dir("deaf").join("ssh.probe").exists());
    let log = lume_log(&t, "deaf");
    assert!(log.contains("forcing QEMU off"), "{log}");

    // A guest that honours the button: the agent is tried first, finds
    // nobody, and ACPI takes it down.
    let out = t.lume_ok(&["shutdown", "ssh"]);
    assert!(
        out.contains("stopped through the ACPI power button"),
        "{out}"
    );
    assert!(
        std::fs::read_to_string(t.home.vm_dir("ssh").join("console.log"))
            .unwrap()
            .contains("LUME-GUEST: powering off")
    );
    let d = t.get("ssh");
    assert_eq!(d["status"], "stopped");
    assert_eq!(d["sshAvailable"], Value::Null);
    let log = lume_log(&t, "ssh");
    assert!(
        log.contains(
            "Guest agent: No guest agent runs (nothing in the guest has opened its channel)"
        ),
        "{log}"
    );
    assert!(
        log.contains("power-off requested through the ACPI power button"),
        "{log}"
    );
    assert!(!t.home.vm_dir("ssh").join("qga.sock").exists());

    // `stop` takes the same way.
    t.lume_ok(&["run", "ssh", "--detach"]);
    wait_console(&t.home, "ssh", "LUME-GUEST: ready", BOOT);
    // acpid starts with the guest; the button is honoured once it is "ready".
    let out = t.lume_ok(&["stop", "ssh"]);
    assert!(
        out.contains("stopped through the ACPI power button"),
        "{out}"
    );

    // Neither shutdown nor restart applies to a stopped VM.
    for cmd in ["shutdown", "restart"] {
        let err = t.lume_fails(&[cmd, "ssh"]);
        assert!(err.contains("is not running"), "{err}");
    }
}
