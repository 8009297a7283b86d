//! Asking a running guest to power off or reboot by itself, in order of
//! preference: the QEMU guest agent, SSH with lume's own key, then (power-off
//! only) the ACPI power button. Each way either is refused quickly (nothing
//! answers) or is accepted; the caller then waits for QEMU to exit and forces
//! it off only when the guest did not go down in time.
//!
//! Used by `lume stop`, `lume shutdown`, `lume restart` (through
//! `vm::execute`) and by a supervisor that receives SIGINT/SIGTERM.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use super::agent::{Agent, AgentError, PING_TIMEOUT, PING_TIMEOUT_OPEN, ShutdownMode};
use crate::hypervisor::qmp::{Qmp, QmpError};
use crate::vm::state::RunState;

/// What the guest is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerRequest {
    PowerOff,
    Reboot,
}

/// The way a stop, shutdown or restart took, as reported to users
/// (`agent`, `ssh`, `acpi`, `reset`, `forced`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PowerMethod {
    /// `guest-shutdown` through the QEMU guest agent.
    Agent,
    /// `sudo poweroff` / `sudo reboot` over SSH with lume's key.
    Ssh,
    /// The ACPI power button (QMP `system_powerdown`).
    Acpi,
    /// The reset button (QMP `system_reset`): not graceful.
    Reset,
    /// The guest did not go down in time: QEMU was ended.
    Forced,
}

impl PowerMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Agent => "agent",
            Self::Ssh => "ssh",
            Self::Acpi => "acpi",
            Self::Reset => "reset",
            Self::Forced => "forced",
        }
    }

    /// A few words for people: "through the guest agent".
    pub fn describe(self) -> &'static str {
        match self {
            Self::Agent => "through the QEMU guest agent",
            Self::Ssh => "over SSH (sudo)",
            Self::Acpi => "through the ACPI power button",
            Self::Reset => "with a hardware reset (not graceful)",
            Self::Forced => "by forcing QEMU off (not graceful)",
        }
    }
}

impl std::fmt::Display for PowerMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who to log in as for the SSH way (lume's `-u/--user`, `-p/--password`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshLogin {
    pub user: String,
    pub password: Option<String>,
    /// How long the SSH command may take.
    pub timeout: Duration,
}

impl Default for SshLogin {
    fn default() -> Self {
        Self {
            user: "lume".into(),
            password: None,
            timeout: Duration::from_secs(10),
        }
    }
}

/// Why one way did not take.
#[derive(Debug, thiserror::Error)]
pub enum PowerError {
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error("SSH is not available for this VM")]
    SshUnavailable,
    #[error(
        "The guest did not take the request over SSH (ssh exit status {0}): lume's key or the user's sudo rights may be missing"
    )]
    SshFailed(i32),
}

/// Asks the guest through the agent. `Ok` means the agent answered its ping
/// and accepted `guest-shutdown`. `channel_open` is what the supervisor saw
/// of the guest's end of the channel: `Some(false)` (nothing in the guest
/// opened it) skips the agent at once; `Some(true)` gives a busy guest's
/// agent longer to answer; `None` (not known) waits the short timeout.
pub fn via_agent(
    vm_dir: &Path,
    request: PowerRequest,
    channel_open: Option<bool>,
) -> Result<(), PowerError> {
    let within = match channel_open {
        Some(false) => return Err(AgentError::NotOpen.into()),
        Some(true) => PING_TIMEOUT_OPEN,
        None => PING_TIMEOUT,
    };
    let mut agent = Agent::connect_in(vm_dir)?;
    agent.ping(within)?;
    let mode = match request {
        PowerRequest::PowerOff => ShutdownMode::Powerdown,
        PowerRequest::Reboot => ShutdownMode::Reboot,
    };
    agent.shutdown(mode, Duration::from_secs(1))?;
    Ok(())
}

/// Runs `sudo poweroff` or `sudo reboot` in the guest over SSH with lume's
/// key of the VM's storage (and `login`), at the address
/// [`crate::guest::reach::ssh_target`] gives, checking the guest's recorded
/// host key (the VM's known_hosts, as `lume ssh`). Returns
/// `Err(PowerError::SshUnavailable)` at once when port 22 does not answer or
/// there is neither a key nor a password.
pub fn via_ssh(
    vm_dir: &Path,
    state: &RunState,
    request: PowerRequest,
    login: &SshLogin,
) -> Result<(), PowerError> {
    use crate::guest::ssh::{self as gssh, SshRequest, Target};
    let address = crate::vm::details::guest_address(state);
    let target =
        crate::guest::reach::ssh_target(state, address).ok_or(PowerError::SshUnavailable)?;
    // One answer decides here (a reboot refused without it): the longer wait.
    if !crate::guest::reach::ssh_answers(
        &state.network_mode,
        target,
        crate::guest::reach::SSH_PROBE_TIMEOUT,
    ) {
        return Err(PowerError::SshUnavailable);
    }
    let key = vm_dir
        .parent()
        .map(crate::guest::keys::key_path)
        .filter(|k| std::fs::symlink_metadata(k).is_ok_and(|m| m.file_type().is_file()));
    if key.is_none() && login.password.is_none() {
        return Err(PowerError::SshUnavailable);
    }
    let verb = match request {
        PowerRequest::PowerOff => "poweroff",
        PowerRequest::Reboot => "reboot",
    };
    let req = SshRequest {
        vm_name: vm_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        vm_dir: vm_dir.to_path_buf(),
        user: login.user.clone(),
        password: login.password.clone(),
        key,
        // systemd returns at once (the session then ends cleanly); other
        // inits get the plain command.
        command: vec![format!(
            "sudo -n systemctl --no-block {verb} 2>/dev/null || sudo -n {verb}"
        )],
        tty: false,
        connect_timeout: login
            .timeout
            .clamp(Duration::from_secs(1), Duration::from_secs(10)),
    };
    let mut cmd = gssh::command(
        &req,
        &Target {
            host: target.ip().to_string(),
            port: target.port(),
        },
    );
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    match gssh::run(cmd, login.timeout) {
        Ok(0) => Ok(()),
        Ok(code) => Err(PowerError::SshFailed(code)),
        Err(_) => Err(PowerError::SshUnavailable),
    }
}

/// Presses the ACPI power button.
pub fn via_acpi(vm_dir: &Path) -> Result<(), PowerError> {
    let mut q = Qmp::connect(vm_dir)?;
    q.execute("system_powerdown", None)?;
    Ok(())
}

/// Presses the reset button.
pub fn via_reset(vm_dir: &Path) -> Result<(), PowerError> {
    let mut q = Qmp::connect(vm_dir)?;
    q.execute("system_reset", None)?;
    Ok(())
}

/// Tries the graceful ways in order and returns the first that accepted
/// the request, or `None`. `log` gets one line per way that did not take.
pub fn request(
    vm_dir: &Path,
    state: &RunState,
    request: PowerRequest,
    login: &SshLogin,
    log: &mut dyn FnMut(&str),
) -> Option<PowerMethod> {
    match via_agent(vm_dir, request, state.guest_agent) {
        Ok(()) => return Some(PowerMethod::Agent),
        Err(e) => log(&format!("Guest agent: {}", crate::error_chain(&e))),
    }
    match via_ssh(vm_dir, state, request, login) {
        Ok(()) => return Some(PowerMethod::Ssh),
        Err(e) => log(&format!("SSH: {}", crate::error_chain(&e))),
    }
    if request == PowerRequest::PowerOff {
        match via_acpi(vm_dir) {
            Ok(()) => return Some(PowerMethod::Acpi),
            Err(e) => log(&format!("ACPI: {}", crate::error_chain(&e))),
        }
    }
    None
}
