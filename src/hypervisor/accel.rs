//! Choosing the accelerator. `/dev/kvm` existing proves nothing: under nested
//! virtualisation a vCPU may hang forever on its first run. `auto` therefore
//! runs a real vCPU (a single `hlt` instruction) in a child process and only
//! picks KVM if that child reports the HLT exit within a deadline.

use std::fmt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The accelerator a VM runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccelChoice {
    #[default]
    Auto,
    Kvm,
    Tcg,
}

/// Why an accelerator choice failed.
#[derive(Debug, thiserror::Error)]
pub enum AccelError {
    #[error("Unknown accelerator '{0}': use kvm, tcg or auto")]
    Unknown(String),
    #[error(
        "KVM was requested but /dev/kvm cannot be opened ({0}): load the kvm module and check permissions on /dev/kvm, or use accelerator tcg"
    )]
    KvmUnavailable(String),
}

impl FromStr for AccelChoice {
    type Err = AccelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(Self::Auto),
            "kvm" => Ok(Self::Kvm),
            "tcg" => Ok(Self::Tcg),
            _ => Err(AccelError::Unknown(s.to_string())),
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        })
    }
}

/// How long the probe's vCPU may take before KVM is declared unusable.
const PROBE_DEADLINE: Duration = Duration::from_secs(3);

/// Resolves a choice into an accelerator. `note` receives the one line that
/// explains a fallback to TCG.
pub fn resolve(choice: AccelChoice, note: &mut dyn FnMut(&str)) -> Result<Accel, AccelError> {
    match choice {
        AccelChoice::Tcg => Ok(Accel::Tcg),
        AccelChoice::Kvm => {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .map_err(|e| AccelError::KvmUnavailable(e.to_string()))?;
            Ok(Accel::Kvm)
        }
        AccelChoice::Auto => match probe_kvm() {
            Ok(()) => Ok(Accel::Kvm),
            Err(why) => {
                note(&format!(
                    "KVM is not usable ({why}); using TCG software emulation, which is slower"
                ));
                Ok(Accel::Tcg)
            }
        },
    }
}

/// Runs `lume __probe-kvm` and waits for it within the deadline.
fn probe_kvm() -> Result<(), String> {
    if !Path::new("/dev/kvm").exists() {
        return Err("/dev/kvm does not exist".into());
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find lume itself: {e}"))?;
    let mut child = Command::new(exe)
        .arg("__probe-kvm")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start the KVM probe: {e}"))?;
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(_)) => {
                let mut msg = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut msg);
                }
                return Err(msg.trim().to_string());
            }
            Ok(None) if start.elapsed() > PROBE_DEADLINE => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "a test vCPU did not run within {}s; nested KVM is likely broken",
                    PROBE_DEADLINE.as_secs()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// The probe itself, run in a child process: one vCPU in real mode executing
/// `hlt`. Returns when the vCPU exits with HLT; may never return if KVM hangs.
pub fn probe_child() -> Result<(), String> {
    use kvm_bindings::kvm_userspace_memory_region;
    use kvm_ioctls::{Kvm, VcpuExit};

    const GUEST_ADDR: u64 = 0x1000;
    const MEM_SIZE: usize = 0x1000;

    let kvm = Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    let vm = kvm
        .create_vm()
        .map_err(|e| format!("KVM_CREATE_VM failed: {e}"))?;
    // SAFETY: an anonymous private mapping with no address hint; the result is
    // checked against MAP_FAILED before use.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            MEM_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if mem == libc::MAP_FAILED {
        return Err("mmap failed".into());
    }
    // SAFETY: `mem` points to MEM_SIZE writable bytes mapped just above.
    unsafe { *(mem as *mut u8) = 0xf4 }; // hlt
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: GUEST_ADDR,
        memory_size: MEM_SIZE as u64,
        userspace_addr: mem as u64,
    };
    // SAFETY: the region describes the mapping above, which stays mapped for
    // the life of this process (it is never unmapped).
    unsafe { vm.set_user_memory_region(region) }
        .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION failed: {e}"))?;
    let mut vcpu = vm
        .create_vcpu(0)
        .map_err(|e| format!("KVM_CREATE_VCPU failed: {e}"))?;
    let mut sregs = vcpu.get_sregs().map_err(|e| e.to_string())?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).map_err(|e| e.to_string())?;
    let regs = kvm_bindings::kvm_regs {
        rip: GUEST_ADDR,
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(|e| e.to_string())?;
    match vcpu.run() {
        Ok(VcpuExit::Hlt) => Ok(()),
        Ok(other) => Err(format!("unexpected vCPU exit {other:?}")),
        Err(e) => Err(format!("KVM_RUN failed: {e}")),
    }
}
