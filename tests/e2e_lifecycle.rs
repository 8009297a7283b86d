//! End to end: the test guest boots under QEMU (TCG) inside a network
//! namespace created by the test; lume creates, runs, stops, clones, sets and
//! deletes it; QEMU and the supervisor are killed and the VM recovers (a
//! shared directory's virtiofsd dies with the supervisor).
//! Needs root (for `ip netns`) and the packages installed by scripts/test.sh.

mod common;

use std::time::Duration;

use common::{Home, Netns, wait_console, wait_for};
use serde_json::Value;

const BOOT: Duration = Duration::from_secs(180);

fn setup(tag: &str) -> (Home, Netns) {
    assert!(
        nix_is_root(),
        "the end-to-end tests need root for network namespaces: run scripts/test.sh as root"
    );
    let home = Home::new();
    // User-mode networking on a documentation range, so nothing outside it is named.
    home.write_settings("userSubnet: 192.0.2.0/24\n");
    (home, Netns::new(tag))
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
}

fn create_guest(ns: &Netns, home: &Home, name: &str, network: &str) {
    let args = common::guest_create_args(name, network, &[], "");
    ns.lume_ok(home, &args.iter().map(String::as_str).collect::<Vec<_>>());
}

fn details(ns: &Netns, home: &Home, name: &str) -> Value {
    let all: Value = serde_json::from_str(&ns.lume_ok(home, &["get", name, "-f", "json"])).unwrap();
    all[0].clone()
}

fn pid_alive(pid: u64) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[test]
fn detached_vm_boots_stops_gracefully_and_survives_kills() {
    let (home, ns) = setup("lm");
    create_guest(&ns, &home, "vm1", "user");
    // Started as `ns.lume_ok` would, with one more descriptor open across
    // exec (as a caller's pipe or lock can be): the supervisor must not
    // keep it.
    let (_read, write) = std::io::pipe().unwrap();
    let inherited = std::os::fd::AsRawFd::as_raw_fd(&write);
    let mut c = std::process::Command::new("ip");
    c.args(["netns", "exec", &ns.name])
        .arg(common::lume_bin())
        .args(["run", "vm1", "--detach"]);
    home.env(&mut c);
    // SAFETY: dup2 only, between fork and exec; 200 is free in the child.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut c, move || {
            if libc::dup2(inherited, 200) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let run = c.output().unwrap();
    drop(write);
    assert!(run.status.success(), "{run:?}");
    let out = String::from_utf8_lossy(&run.stdout).to_string();
    assert!(out.contains("is running"), "{out}");

    let d = details(&ns, &home, "vm1");
    assert_eq!(d["status"], "running");
    assert_eq!(d["accelerator"], "tcg");
    assert_eq!(d["ipAddress"], "192.0.2.15");
    let console = wait_console(&home, "vm1", "LUME-GUEST: lease eth0 192.0.2.15", BOOT);
    assert!(console.contains("LUME-GUEST: booted"));

    // The QEMU command line names the VM directory.
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(home.vm_dir("vm1").join("run.json")).unwrap(),
    )
    .unwrap();
    let qemu_pid = state["qemuPid"].as_u64().unwrap();
    let cmdline = std::fs::read(format!("/proc/{qemu_pid}/cmdline")).unwrap();
    assert!(String::from_utf8_lossy(&cmdline).contains(&home.vm_dir("vm1").display().to_string()));
    // The CLI forked the supervisor (no second start of lume: its command
    // line is the CLI's), which reads nothing and writes to lume.log.
    let sup = state["pid"].as_u64().unwrap();
    let sup_cmd = common::supervisor_cmdline(&home.vm_dir("vm1"));
    assert!(
        sup_cmd.contains("run vm1 --detach") && !sup_cmd.contains("--storage"),
        "{sup_cmd}"
    );
    let fd = |n: u32| std::fs::read_link(format!("/proc/{sup}/fd/{n}")).unwrap();
    assert_eq!(fd(0), std::path::Path::new("/dev/null"));
    assert_eq!(fd(1), home.vm_dir("vm1").join("lume.log"));
    assert_eq!(fd(2), home.vm_dir("vm1").join("lume.log"));
    assert!(
        !std::path::Path::new(&format!("/proc/{sup}/fd/200")).exists(),
        "the supervisor kept a descriptor its caller left open"
    );
    // In a session of its own (it outlives the caller's terminal), and
    // free to run on every CPU the caller could (the fork's start on the
    // CLI's CPU is undone), as its QEMU is.
    let stat = std::fs::read_to_string(format!("/proc/{sup}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    assert_eq!(fields[3], sup.to_string(), "session of {stat}");
    let cpus = |pid: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find(|l| l.starts_with("Cpus_allowed_list"))
            .map(str::to_string)
            .unwrap()
    };
    assert_eq!(cpus(&sup.to_string()), cpus("self"));
    assert_eq!(cpus(&qemu_pid.to_string()), cpus("self"));

    // Refusals while running.
    assert!(
        ns.lume_fails(&home, &["run", "vm1", "--detach"])
            .contains("already running")
    );
    assert!(
        ns.lume_fails(&home, &["run", "vm1"])
            .contains("already running")
    );
    assert!(
        ns.lume_fails(&home, &["set", "vm1", "--disk-size", "128MB"])
            .contains("stop it before changing its disk")
    );
    assert!(
        ns.lume_fails(&home, &["clone", "vm1", "copy"])
            .contains("is running")
    );
    ns.lume_ok(&home, &["set", "vm1", "--cpu", "2"]);

    // Graceful stop: the guest sees the ACPI power button.
    let out = ns.lume_ok(&home, &["stop", "vm1"]);
    assert!(out.contains("stopped"), "{out}");
    assert!(
        std::fs::read_to_string(home.vm_dir("vm1").join("console.log"))
            .unwrap()
            .contains("LUME-GUEST: powering off")
    );
    assert_eq!(details(&ns, &home, "vm1")["status"], "stopped");
    assert!(!pid_alive(qemu_pid));
    assert!(!home.vm_dir("vm1").join("run.json").exists());
    assert!(!home.vm_dir("vm1").join("qmp.sock").exists());
    // As lume: stopping it again is an error.
    assert!(
        ns.lume_fails(&home, &["stop", "vm1"])
            .contains("VM 'vm1' is not running")
    );

    // SIGKILL to QEMU: the supervisor notices, the VM is stopped and can start at once.
    ns.lume_ok(&home, &["run", "vm1", "--detach"]);
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(home.vm_dir("vm1").join("run.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(details(&ns, &home, "vm1")["cpuCount"], 2);
    common::sh(&format!("kill -9 {}", state["qemuPid"]));
    wait_for(
        "stopped after QEMU was killed",
        Duration::from_secs(10),
        || (details(&ns, &home, "vm1")["status"] == "stopped").then_some(()),
    );

    // SIGKILL to the supervisor: QEMU dies with it and the lock is released;
    // the virtiofsd of a shared directory goes too.
    let share = home.path().join("share");
    std::fs::create_dir(&share).unwrap();
    ns.lume_ok(
        &home,
        &[
            "run",
            "vm1",
            "--detach",
            "--shared-dir",
            share.to_str().unwrap(),
        ],
    );
    assert!(!common::virtiofsd_of(&home.vm_dir("vm1")).is_empty());
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(home.vm_dir("vm1").join("run.json")).unwrap(),
    )
    .unwrap();
    let qemu_pid = state["qemuPid"].as_u64().unwrap();
    common::sh(&format!("kill -9 {}", state["pid"]));
    wait_for(
        "QEMU gone after its supervisor was killed",
        Duration::from_secs(10),
        || (!pid_alive(qemu_pid)).then_some(()),
    );
    wait_for(
        "virtiofsd gone after its supervisor was killed",
        Duration::from_secs(20),
        || {
            common::virtiofsd_of(&home.vm_dir("vm1"))
                .is_empty()
                .then_some(())
        },
    );
    assert_eq!(details(&ns, &home, "vm1")["status"], "stopped");
    ns.lume_ok(&home, &["run", "vm1", "--detach"]);
    assert_eq!(details(&ns, &home, "vm1")["status"], "running");

    // Delete without an answer (stdin closed) deletes nothing, as lume;
    // --force stops the VM first.
    assert!(
        ns.lume_ok(&home, &["delete", "vm1"])
            .contains("Deletion cancelled")
    );
    assert_eq!(details(&ns, &home, "vm1")["status"], "running");
    ns.lume_ok(&home, &["delete", "vm1", "--force"]);
    assert!(!home.vm_dir("vm1").exists());
    let leftovers = ns.exec_ok("pgrep -f qemu-system-x86_64 -a || true");
    assert!(
        !leftovers.contains(&home.storage().display().to_string()),
        "{leftovers}"
    );
}

#[test]
fn foreground_run_powers_off_on_ctrl_c_and_clones_boot() {
    let (home, ns) = setup("lf");
    create_guest(&ns, &home, "fg", "none");
    ns.lume_ok(&home, &["clone", "fg", "fg2"]);
    ns.lume_ok(&home, &["set", "fg2", "--network", "user"]);

    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", &ns.name])
        .arg(common::lume_bin())
        .args(["run", "fg"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    home.env(&mut cmd);
    let child = cmd.spawn().unwrap();
    let console = wait_console(&home, "fg", "LUME-GUEST: no network", BOOT);
    assert!(console.contains("LUME-GUEST: booted"));
    assert_eq!(details(&ns, &home, "fg")["status"], "running");
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(home.vm_dir("fg").join("run.json")).unwrap())
            .unwrap();
    // Ctrl-C goes to the supervisor, which powers the guest off through ACPI.
    common::sh(&format!("kill -INT {}", state["pid"]));
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_console(
        &home,
        "fg",
        "LUME-GUEST: powering off",
        Duration::from_secs(5),
    );
    assert_eq!(details(&ns, &home, "fg")["status"], "stopped");

    // The clone boots on its own disk and MAC, with the network set on it.
    ns.lume_ok(&home, &["run", "fg2", "--detach"]);
    wait_console(&home, "fg2", "LUME-GUEST: lease eth0 192.0.2.15", BOOT);
    let a = details(&ns, &home, "fg");
    let b = details(&ns, &home, "fg2");
    assert_ne!(a["macAddress"], b["macAddress"]);
    let mac = b["macAddress"].as_str().unwrap();
    wait_console(&home, "fg2", mac, Duration::from_secs(5));
    // --network overrides the saved mode for one run only.
    ns.lume_ok(&home, &["stop", "fg2"]);
    ns.lume_ok(&home, &["run", "fg2", "--detach", "--network", "none"]);
    wait_console(&home, "fg2", "LUME-GUEST: no network", BOOT);
    assert_eq!(details(&ns, &home, "fg2")["networkMode"], "user");
    assert_eq!(details(&ns, &home, "fg2")["ipAddress"], Value::Null);
    ns.lume_ok(&home, &["stop", "fg2", "--timeout", "30"]);
}
