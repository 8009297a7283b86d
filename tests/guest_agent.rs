//! lume's guest agent client against a real `qemu-ga` (Debian's
//! qemu-guest-agent) listening on a Unix socket where QEMU would put the
//! VM's channel (`<vm dir>/qga.sock`). The agent runs in a private mount
//! namespace where `/sbin/shutdown` is a recorder, so `guest-shutdown` runs
//! the agent's real code path without powering off this host.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lume::guest::agent::{Agent, AgentError, PING_TIMEOUT, QGA_SOCKET};
use lume::guest::power::{self, PowerError, PowerRequest};

struct QemuGa {
    child: Child,
}

impl Drop for QemuGa {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts qemu-ga on `<dir>/qga.sock` with `/sbin/shutdown` replaced by a
/// recorder that appends its arguments to `<dir>/shutdown.args` (and fails
/// when `<dir>/fail` exists).
fn start_agent(dir: &Path) -> Option<QemuGa> {
    if Command::new("qemu-ga").arg("--version").output().is_err() {
        eprintln!(
            "skipped: qemu-ga is not installed (scripts/install-deps.sh installs qemu-guest-agent)"
        );
        return None;
    }
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root for its mount namespace"
    );
    let rec = dir.join("recorder");
    fs::write(
        &rec,
        format!(
            "#!/bin/sh\n\
             if [ \"$1\" = --lume-probe ]; then echo lume-recorder; exit 0; fi\n\
             echo \"$*\" >>'{d}/shutdown.args'\n\
             [ ! -e '{d}/fail' ]\n",
            d = dir.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&rec, fs::Permissions::from_mode(0o755)).unwrap();
    // The recorder is checked in place before qemu-ga starts: should the
    // bind mount not have taken, qemu-ga is never started.
    let script = r#"set -eu
mount --bind "$1" /sbin/shutdown
[ "$(/sbin/shutdown --lume-probe)" = lume-recorder ] || exit 97
exec qemu-ga -m unix-listen -p "$2/qga.sock" -f "$2/qga.pid" -t "$2" -l "$2/qga.log""#;
    let child = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
        ])
        .arg(&rec)
        .arg(dir)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut ga = QemuGa { child };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !dir.join(QGA_SOCKET).exists() {
        if let Some(status) = ga.child.try_wait().unwrap() {
            panic!(
                "qemu-ga exited ({status}): {}",
                fs::read_to_string(dir.join("qga.log")).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "qemu-ga did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(ga)
}

fn recorded(dir: &Path, lines: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = fs::read_to_string(dir.join("shutdown.args")).unwrap_or_default();
        let got: Vec<String> = text.lines().map(str::to_string).collect();
        if got.len() >= lines || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_real_agent_answers_and_runs_power_off_and_reboot() {
    let dir = tempfile::tempdir().unwrap();
    let Some(_ga) = start_agent(dir.path()) else {
        return;
    };
    // Ping twice on fresh connections: the sync id discards what an earlier
    // client left behind.
    for _ in 0..2 {
        Agent::connect_in(dir.path())
            .unwrap()
            .ping(PING_TIMEOUT)
            .unwrap();
    }

    power::via_agent(dir.path(), PowerRequest::PowerOff, None).unwrap();
    let lines = recorded(dir.path(), 1);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("-P +0"), "{lines:?}");

    power::via_agent(dir.path(), PowerRequest::Reboot, Some(true)).unwrap();
    let lines = recorded(dir.path(), 2);
    assert!(
        lines.get(1).is_some_and(|l| l.contains("-r +0")),
        "{lines:?}"
    );

    // A channel nothing in the guest opened is skipped without a ping.
    let e = power::via_agent(dir.path(), PowerRequest::PowerOff, Some(false)).unwrap_err();
    assert!(matches!(e, PowerError::Agent(AgentError::NotOpen)), "{e:?}");
    assert_eq!(recorded(dir.path(), 0).len(), 2);

    // A guest whose shutdown fails: the agent's error comes back, typed.
    fs::write(dir.path().join("fail"), "").unwrap();
    let e = power::via_agent(dir.path(), PowerRequest::PowerOff, None).unwrap_err();
    assert!(
        matches!(e, PowerError::Agent(AgentError::Command { .. })),
        "{e:?}"
    );
}

#[test]
fn no_agent_socket_is_a_connect_error() {
    let dir = tempfile::tempdir().unwrap();
    let e = power::via_agent(dir.path(), PowerRequest::PowerOff, None).unwrap_err();
    assert!(
        matches!(e, PowerError::Agent(AgentError::Connect { .. })),
        "{e:?}"
    );
}
