//! Where a child process first runs.
//!
//! The kernel places a new process on the CPU it judges idlest, which on a
//! small, busy host (two CPUs, another VM's QEMU booting) is often one a
//! CPU-bound thread holds: the child then waits up to one scheduler slice
//! (4–7 ms measured) while the CPU of the parent that forked it falls idle
//! as the parent goes to wait for it. `run --detach` forks the VM's
//! supervisor this way on the path to QEMU's start, so the CLI starts it
//! on its own CPU ([`StartHere`]) and the supervisor takes the CLI's CPUs
//! back as its first step. (QEMU's own start, from the threaded
//! supervisor, showed no gain from the same, and is left to the kernel.)

use nix::sched::{CpuSet, sched_getaffinity, sched_getcpu, sched_setaffinity};
use nix::unistd::Pid;

/// The calling thread held to the CPU it runs on, so that a child it
/// forks starts there; its CPUs are given back when this is dropped, and
/// a child gives itself the same ones with [`give_back`] of [`Self::cpus`].
#[derive(Debug)]
pub struct StartHere {
    saved: CpuSet,
}

impl StartHere {
    /// `None` when the thread's CPUs cannot be read or set (nothing is
    /// changed then; the child starts wherever the kernel puts it).
    pub fn pin() -> Option<Self> {
        let saved = sched_getaffinity(Pid::from_raw(0)).ok()?;
        let mut here = CpuSet::new();
        here.set(sched_getcpu().ok()?).ok()?;
        sched_setaffinity(Pid::from_raw(0), &here).ok()?;
        Some(Self { saved })
    }

    /// The CPUs the thread had before [`Self::pin`].
    pub fn cpus(&self) -> CpuSet {
        self.saved
    }
}

impl Drop for StartHere {
    fn drop(&mut self) {
        give_back(&self.saved);
    }
}

/// Lets the calling thread run on `cpus` again. Only a system call:
/// async-signal-safe, for a child between fork and exec.
pub fn give_back(cpus: &CpuSet) {
    let _ = sched_setaffinity(Pid::from_raw(0), cpus);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A child forked while pinned starts on the parent's CPU, and both
    /// get their CPUs back.
    #[test]
    fn a_child_starts_on_the_parents_cpu_and_both_get_their_cpus_back() {
        use std::os::unix::process::CommandExt;
        let allowed = |status: &str| {
            status
                .lines()
                .find(|l| l.starts_with("Cpus_allowed_list"))
                .map(str::to_string)
                .unwrap()
        };
        let ours = || allowed(&std::fs::read_to_string("/proc/thread-self/status").unwrap());
        let before = ours();
        let pin = StartHere::pin().expect("the thread's CPUs can be set");
        let cpu = sched_getcpu().unwrap();
        assert_eq!(
            allowed(&std::fs::read_to_string("/proc/thread-self/status").unwrap()),
            format!("Cpus_allowed_list:\t{cpu}")
        );
        let cpus = pin.cpus();
        let mut cmd = std::process::Command::new("sh");
        cmd.args(["-c", "cat /proc/self/status"]);
        // SAFETY: sched_getcpu and give_back only make system calls.
        unsafe {
            cmd.pre_exec(move || {
                if sched_getcpu()? != cpu {
                    return Err(std::io::Error::other("started on another CPU"));
                }
                give_back(&cpus);
                Ok(())
            });
        }
        let out = cmd.output().expect("the child starts on the parent's CPU");
        drop(pin);
        assert_eq!(ours(), before);
        assert_eq!(allowed(&String::from_utf8(out.stdout).unwrap()), before);
    }
}
