//! Choosing the accelerator. `/dev/kvm` existing proves nothing: under nested
//! virtualisation QEMU may refuse the host CPU model or a vCPU may hang.
//! `auto` therefore boots QEMU's own firmware under KVM, with the CPU model a
//! VM would get, and picks KVM only if the firmware finishes within a deadline.

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

impl From<Accel> for AccelChoice {
    /// The choice that resolves to `accel` without probing again.
    fn from(accel: Accel) -> Self {
        match accel {
            Accel::Kvm => AccelChoice::Kvm,
            Accel::Tcg => AccelChoice::Tcg,
        }
    }
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

/// How long the probe's firmware may take before KVM is declared unusable.
const PROBE_DEADLINE: Duration = Duration::from_secs(5);

/// What SeaBIOS prints on its debug port once its whole POST has run.
const POST_DONE: &str = "No bootable device";

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
        AccelChoice::Auto => match cached_probe() {
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

/// The probe's verdict is kept per boot (`~/.cache/lume/kvm-probe.json`):
/// whether KVM works does not change until the host reboots.
fn cached_probe() -> Result<(), String> {
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let cache = crate::vm::store::home().join(".cache/lume/kvm-probe.json");
    if let Ok(text) = std::fs::read_to_string(&cache)
        && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
        && v["bootId"] == boot_id.trim()
    {
        return match v["error"].as_str() {
            None => Ok(()),
            Some(e) => Err(e.to_string()),
        };
    }
    let verdict = probe_kvm();
    let record = serde_json::json!({
        "bootId": boot_id.trim(),
        "error": verdict.as_ref().err(),
    });
    if let Some(dir) = cache.parent() {
        let _ = std::fs::create_dir_all(dir);
        let _ = crate::util::atomic::write_atomic(&cache, record.to_string().as_bytes());
    }
    verdict
}

/// Boots QEMU's firmware under KVM with the CPU model lume uses (`-cpu host`)
/// and waits for SeaBIOS to finish its POST on the debug port. This proves
/// that QEMU accepts the CPU model and that vCPUs run real and protected-mode
/// code; a vCPU that hangs, or a QEMU that aborts, means TCG.
fn probe_kvm() -> Result<(), String> {
    if !Path::new("/dev/kvm").exists() {
        return Err("/dev/kvm does not exist".into());
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return Err(format!("cannot open /dev/kvm: {e}"));
    }
    let qemu = super::qemu::find_qemu().map_err(|e| e.to_string())?;
    let dir = std::env::temp_dir().join(format!(
        "lume-kvm-probe-{}-{:x}",
        std::process::id(),
        crate::util::random::u64()
    ));
    std::fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let debug = dir.join("debugcon.log");
    let result = (|| {
        let mut child = Command::new(qemu)
            .args([
                "-accel",
                "kvm",
                "-cpu",
                "host",
                "-machine",
                "q35",
                "-m",
                "32",
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-serial",
                "none",
                "-chardev",
            ])
            .arg(format!("file,id=dbg,path={}", debug.display()))
            .args(["-device", "isa-debugcon,iobase=0x402,chardev=dbg"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start QEMU for the KVM probe: {e}"))?;
        let start = Instant::now();
        let verdict = loop {
            if std::fs::read_to_string(&debug).is_ok_and(|t| t.contains(POST_DONE)) {
                break Ok(());
            }
            match child.try_wait() {
                Ok(Some(_)) => {
                    let mut msg = String::new();
                    if let Some(mut e) = child.stderr.take() {
                        use std::io::Read;
                        let _ = e.read_to_string(&mut msg);
                    }
                    let first = msg.lines().find(|l| !l.contains("warning")).unwrap_or("");
                    break Err(format!("QEMU with KVM exited at once: {}", first.trim()));
                }
                Ok(None) if start.elapsed() > PROBE_DEADLINE => {
                    break Err(format!(
                        "a test VM's firmware did not finish within {}s under KVM; nested KVM is likely broken",
                        PROBE_DEADLINE.as_secs()
                    ));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => break Err(e.to_string()),
            }
        };
        let _ = child.kill();
        let _ = child.wait();
        verdict
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}
