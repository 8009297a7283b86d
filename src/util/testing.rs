//! Helpers for tests only.

use std::process::{Child, Command};
use std::time::Duration;

/// Spawns `cmd`, whose program is a file the test has just written. While
/// another test thread forks, its child holds that file's write descriptor
/// until it execs, and exec fails with ETXTBSY for that moment: try again.
pub fn spawn_fresh_program(cmd: &mut Command) -> Child {
    for _ in 0..200 {
        match cmd.spawn() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other.unwrap(),
        }
    }
    panic!("the freshly written program stayed busy for 4 s");
}

/// A named network namespace (`ip netns add`) for a unit test that needs
/// the real kernel; deleted on drop. Tests using it run as root.
pub struct TestNetns(pub String);

impl TestNetns {
    /// Creates `name`, deleting a namespace of that name a killed run left.
    pub fn new(name: String) -> Self {
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(std::process::Stdio::null())
            .status();
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("run ip netns add");
        assert!(st.success(), "ip netns add {name} failed");
        Self(name)
    }

    /// `sh -c cmd` inside the namespace; its stdout (it must succeed).
    pub fn sh(&self, cmd: &str) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0, "sh", "-c", cmd])
            .output()
            .expect("run ip netns exec");
        assert!(
            out.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ip ARGS` inside the namespace (it must succeed).
    pub fn ip(&self, args: &[&str]) {
        let st = Command::new("ip")
            .args(["netns", "exec", &self.0, "ip"])
            .args(args)
            .status()
            .expect("run ip netns exec");
        assert!(st.success(), "ip {args:?} failed in {}", self.0);
    }

    /// Starts `f` on a thread that has entered the namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("open netns");
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
    }

    /// Runs `f` on a thread that has entered the namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        match self.spawn(f).join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}
