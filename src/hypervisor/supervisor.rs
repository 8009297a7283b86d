//! The supervisor of one running VM: the `lume run` process (or its detached
//! child). It holds the VM lock for as long as the VM runs, owns the QEMU
//! child and the VM's network attachment, publishes `run.json`, turns
//! SIGINT/SIGTERM into an ACPI power-off, and tears everything down when QEMU
//! exits. QEMU gets PR_SET_PDEATHSIG, so a killed supervisor takes QEMU with
//! it and the lock, held by the supervisor alone, is released by the kernel.

use std::fs::{self, File};
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};

use super::accel::{self, AccelChoice, AccelError};
use super::logcap;
use super::qemu::{self, LaunchSpec, QemuError};
use super::qmp::{EVENTS_SOCKET, QMP_SOCKET, Qmp};
use super::vnc;
use crate::guest::agent::QGA_SOCKET;
use crate::guest::power::{self, PowerRequest, SshLogin};
use crate::network::NetworkMode;
use crate::network::attach::{self, AttachError, AttachOptions};
use crate::util::time::{timestamp, unix_now};
use crate::vm::config::{MacAddress, VmConfig};
use crate::vm::lock::VmLock;
use crate::vm::name::VmName;
use crate::vm::state::RunState;
use crate::vm::store::Vm;

/// Why a VM could not be started or supervised.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("VM '{0}' is already running: stop it first with `lume stop {0}`")]
    AlreadyRunning(VmName),
    #[error(
        "VM '{0}' is busy: another lume command is starting or changing it; try again in a moment"
    )]
    Busy(VmName),
    #[error(
        "VM '{0}' is a macOS VM: macOS guests need an Apple host; lume on Linux runs Linux guests"
    )]
    MacOs(VmName),
    #[error(
        "VM '{0}' has no MAC address in its config.json: set one with `lume set {0}` or recreate it"
    )]
    NoMac(VmName),
    #[error(transparent)]
    Qemu(#[from] QemuError),
    #[error(transparent)]
    Accel(#[from] AccelError),
    #[error(transparent)]
    Network(#[from] AttachError),
    #[error(transparent)]
    Snapshot(#[from] crate::vm::snapshot::SnapshotError),
    #[error(transparent)]
    Vnc(#[from] vnc::VncError),
    #[error(transparent)]
    Usb(#[from] super::usb::UsbError),
    #[error(transparent)]
    Share(#[from] super::virtiofs::ShareError),
    #[error("{what} {path} does not exist")]
    MissingFile { what: &'static str, path: PathBuf },
    #[error(
        "Disk {0} is not a regular file (a symlink or a device): lume runs only its own disk.img; restore the file or recreate the VM"
    )]
    DiskNotRegular(PathBuf),
    #[error("Cannot start {}", qemu::QEMU_BINARY)]
    Spawn(#[source] io::Error),
    #[error("QEMU exited during start-up ({status}); its messages:\n{messages}")]
    QemuExited { status: String, messages: String },
    #[error("QEMU did not open its QMP socket within {0} seconds; see {1}")]
    QmpTimeout(u64, PathBuf),
    #[error("Cannot use {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("The VM supervisor failed; its log {log} says:\n{messages}")]
    Supervisor { log: PathBuf, messages: String },
    /// A detached supervisor could not be started or followed.
    #[error(transparent)]
    Process(#[from] super::process::ProcessError),
    #[error("Cannot control the running VM through QMP; see its lume.log and qemu.log")]
    Control(#[source] super::qmp::QmpError),
    #[error("Cannot ask the guest to power off or reboot")]
    Power(#[source] crate::guest::power::PowerError),
}

/// A host file named by the caller, opened once with the caller's rights;
/// from then on only its descriptor is used.
#[derive(Debug, Clone)]
pub struct HostFile {
    /// The name the caller gave (for messages only).
    pub path: PathBuf,
    pub file: Arc<File>,
}

impl HostFile {
    pub fn new(path: &Path, file: File) -> Self {
        Self {
            path: path.to_path_buf(),
            file: Arc::new(file),
        }
    }

    /// `/proc/<this pid>/fd/N`: the open file, for another process to open
    /// while this one holds it (never the caller's path again).
    pub fn proc_path(&self) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            self.file.as_raw_fd()
        ))
    }
}

/// What one run uses beyond the saved config.
#[derive(Debug, Clone)]
pub struct RunRequest {
    /// The effective network mode (saved, or overridden for this run).
    pub network: NetworkMode,
    /// ISO images, already open read-only.
    pub mounts: Vec<HostFile>,
    /// Extra raw disks, already open read-write.
    pub disks: Vec<HostFile>,
    /// Raw images for USB mass storage, already open read-write and checked.
    pub usb_storage: Vec<HostFile>,
    /// Directories to share, already open with the caller's rights.
    pub shares: Vec<super::virtiofs::HostDir>,
    /// How long a Ctrl-C waits for the guest before forcing QEMU off.
    pub stop_timeout: Duration,
    pub vnc: VncRequest,
    pub accel: AccelChoice,
    pub attach: AttachOptions,
    /// Disk changes go to a throwaway layer, removed at stop
    /// (`run --ephemeral`).
    pub ephemeral: bool,
}

/// The VNC display a run asks for.
#[derive(Debug, Clone, Default)]
pub struct VncRequest {
    /// Loopback port; 0: a free one.
    pub port: u16,
    /// `None`: a random password for this run.
    pub password: Option<String>,
}

/// Set by `run --detach` for its supervisor: the file its output goes to,
/// renamed to `lume.log` once the supervisor holds the VM.
pub const START_LOG_ENV: &str = "LUME_SUPERVISOR_LOG";

/// Exit statuses of a detached supervisor that lost the VM to somebody else,
/// so that `run --detach` tells the two apart without reading its log.
pub const EXIT_ALREADY_RUNNING: i32 = 75;
pub const EXIT_BUSY: i32 = 76;

/// The exit status a detached supervisor reports for `e`, if it has its own.
pub fn exit_status_for(e: &RunError) -> Option<i32> {
    match e {
        RunError::AlreadyRunning(_) => Some(EXIT_ALREADY_RUNNING),
        RunError::Busy(_) => Some(EXIT_BUSY),
        _ => None,
    }
}

static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP_REQUESTED.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() {
    let action = SigAction::new(
        SigHandler::Handler(on_stop_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe; no other handler for these signals is relied on.
        let _ = unsafe { sigaction(sig, &action) };
    }
}

/// Writes one timestamped line to the supervisor's log (stderr).
pub fn log(msg: &str) {
    let _ = writeln!(io::stderr(), "[{}] {}", timestamp(), one_line(msg));
}

/// `msg` with its control characters escaped (`\n`, `\u{1b}`, …): host
/// paths and names in a message cannot forge lines of lume.log or send
/// terminal escapes to whoever reads it.
pub fn one_line(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    for c in msg.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Checks that `run` can start at all, before any process or device exists.
pub fn preflight(vm: &Vm, cfg: &VmConfig, req: &RunRequest) -> Result<MacAddress, RunError> {
    if cfg.os.eq_ignore_ascii_case("macos") {
        return Err(RunError::MacOs(vm.name.clone()));
    }
    // QEMU opens disk.img by name: it must be the VM's own file, never a
    // link to a host file or a device.
    match fs::symlink_metadata(vm.disk_path()) {
        Ok(m) if m.file_type().is_file() => {}
        Ok(_) => return Err(RunError::DiskNotRegular(vm.disk_path())),
        Err(_) => {
            return Err(RunError::MissingFile {
                what: "Disk",
                path: vm.disk_path(),
            });
        }
    }
    attach::validate(&req.network, &req.attach)?;
    qemu::find_qemu()?;
    if !req.shares.is_empty() {
        super::virtiofs::find_virtiofsd()?;
    }
    cfg.mac_address
        .ok_or_else(|| RunError::NoMac(vm.name.clone()))
}

/// Reports why the lock is taken: running, or busy with another command.
pub fn held_error(vm: &Vm) -> RunError {
    if vm.running_state().is_some() {
        RunError::AlreadyRunning(vm.name.clone())
    } else {
        RunError::Busy(vm.name.clone())
    }
}

/// Runs the VM in this process until QEMU exits. `announce` is called once
/// the VM is up.
pub fn supervise(
    vm: &Vm,
    cfg: &VmConfig,
    req: &RunRequest,
    announce: &mut dyn FnMut(&RunState),
) -> Result<ExitStatus, RunError> {
    let mac = preflight(vm, cfg, req)?;
    if !matches!(req.network, NetworkMode::User | NetworkMode::None) {
        // The firewall library loads while the VM's files are prepared.
        crate::firewall::libnft::warm();
    }
    let io_at = |path: PathBuf| move |source| RunError::Io { path, source };
    let _lock = VmLock::try_acquire(&vm.lock_path())
        .map_err(io_at(vm.lock_path()))?
        .ok_or_else(|| held_error(vm))?;
    if let Some(start_log) = std::env::var_os(START_LOG_ENV) {
        let _ = fs::rename(start_log, vm.log_path());
    }
    // Anything a dead supervisor left behind.
    crate::network::driver::collect_stale(
        &vm.dir,
        RunState::load(&vm.state_path()).as_ref(),
        &req.attach.settings,
    );
    let _ = fs::remove_file(vm.state_path());
    let _ = fs::remove_file(vm.dir.join(QMP_SOCKET));
    let _ = fs::remove_file(vm.dir.join(QGA_SOCKET));
    let _ = fs::remove_file(vm.dir.join(EVENTS_SOCKET));
    let _ = fs::remove_file(vm.dir.join(vnc::VNC_SOCKET));
    // A killed supervisor's record of its probes goes before this run's
    // run.json makes anything read it.
    let _ = fs::remove_file(vm.dir.join(crate::guest::reach::PROBE_FILE));
    super::virtiofs::collect_stale(&vm.dir);

    // The disk: the layer chain pinned by lume, an ephemeral layer, a
    // pending memory restore. The ephemeral layer goes when `disk` does.
    let disk = crate::vm::snapshot::prepare_run(&vm.dir, req.ephemeral)?;
    if disk.ephemeral.is_some() {
        log("Ephemeral run: disk changes are discarded when the VM stops");
    }
    if disk.incoming.is_some() {
        log("Restoring the VM's memory from a snapshot");
    }

    install_signal_handlers();
    // The VNC port is bound before anything else starts: a taken port fails
    // the run here, and the port chosen is held from now on.
    let vnc_listener = vnc::bind(req.vnc.port)?;
    let accel = accel::resolve(req.accel, &mut |line| log(line))?;
    // What QEMU needs to start (a tap); the rest once it is started.
    let mut net =
        attach::attach_deferred(&req.network, vm.name.as_str(), &vm.dir, mac, &req.attach)?;
    net.offer_vhost(accel == accel::Accel::Kvm);
    if let Some(dev) = &net.host_device {
        log(&format!(
            "Network {}: host device {dev} on {}",
            req.network,
            net.parent.as_deref().unwrap_or("-")
        ));
    }
    // The guest's serial console and QEMU's stderr go through pipes into
    // capped logs.
    let cap = logcap::cap();
    let (console_read, console_write) = logcap::pipe().map_err(io_at(vm.console_path()))?;
    let console_pump =
        logcap::pump(console_read, &vm.console_path(), cap).map_err(io_at(vm.console_path()))?;
    let stderr_path = vm.dir.join("qemu.log");
    let (stderr_read, stderr_write) = logcap::pipe().map_err(io_at(stderr_path.clone()))?;
    let stderr_pump =
        logcap::pump(stderr_read, &stderr_path, cap).map_err(io_at(stderr_path.clone()))?;
    // QEMU's descriptors, placed at 3, 4, … in the child
    // (`util::fds::place_from_3`); the console pipe comes last.
    let raw_fds: Vec<i32> = net
        .fds
        .iter()
        .map(AsRawFd::as_raw_fd)
        .chain([console_write.as_raw_fd()])
        .collect();
    let mut fd_copies = vec![-1; raw_fds.len()];
    let console = PathBuf::from(format!("/proc/self/fd/{}", 3 + net.fds.len()));
    // QEMU opens the caller's files through this process's descriptors,
    // which stay open until QEMU has exited.
    let mounts: Vec<PathBuf> = req.mounts.iter().map(HostFile::proc_path).collect();
    let disks: Vec<PathBuf> = req.disks.iter().map(HostFile::proc_path).collect();
    let usb_storage: Vec<PathBuf> = req.usb_storage.iter().map(HostFile::proc_path).collect();
    for f in req.mounts.iter().chain(&req.disks).chain(&req.usb_storage) {
        log(&format!(
            "{} is {}",
            f.proc_path().display(),
            f.path.display()
        ));
    }

    // virtiofsd first: its sockets listen before QEMU connects.
    let shares = super::virtiofs::share_states(&req.shares);
    // Their messages go through a pipe into a capped virtiofsd.log (a
    // guest can make virtiofsd log without end); the pump ends when the
    // last virtiofsd does.
    let fs_log = vm.dir.join("virtiofsd.log");
    let fs_pipe = if req.shares.is_empty() {
        None
    } else {
        let (read, write) = logcap::pipe().map_err(io_at(fs_log.clone()))?;
        logcap::pump(read, &fs_log, cap).map_err(io_at(fs_log.clone()))?;
        Some(write)
    };
    let daemons = super::virtiofs::start(&vm.dir, &req.shares, &|| match &fs_pipe {
        Some(w) => w.try_clone().map(Stdio::from),
        None => Err(io::Error::from_raw_os_error(libc::EBADF)),
    })?;
    drop(fs_pipe);
    for s in &shares {
        log(&format!(
            "Sharing {} as {} ({}), /mnt/shared/{} in lume's guests",
            s.host_path,
            s.tag,
            if s.read_only {
                "read-only"
            } else {
                "read-write"
            },
            s.name
        ));
    }
    let spec = LaunchSpec {
        name: vm.name.as_str(),
        dir: &vm.dir,
        config: cfg,
        accel,
        mounts: &mounts,
        disks: &disks,
        console: &console,
        net_args: &net.qemu_args,
        disk_args: &disk.args,
        usb_storage: &usb_storage,
        shares: &shares,
    };
    let args = qemu::arguments(&spec)?;
    let binary = qemu::find_qemu()?;
    log(&format!(
        "Starting {} {}",
        binary.display(),
        args.iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    ));
    let supervisor_pid = nix::unistd::getpid();
    let mut cmd = Command::new(&binary);
    cmd.args(&args)
        .env_remove(START_LOG_ENV)
        .env_remove(vnc::PASSWORD_ENV)
        .current_dir(&vm.dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(stderr_write));
    // SAFETY: the closure runs between fork and exec and only calls
    // async-signal-safe functions (prctl, getppid, setpgid, fcntl, dup2,
    // close_range, _exit) and writes into `fd_copies`, allocated before.
    unsafe {
        cmd.pre_exec(move || {
            // Die with the supervisor; its own process group keeps a terminal's
            // Ctrl-C away from QEMU so the supervisor can power off gracefully.
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            if nix::unistd::getppid() != supervisor_pid {
                libc::_exit(1);
            }
            nix::unistd::setpgid(nix::unistd::Pid::from_raw(0), nix::unistd::Pid::from_raw(0))?;
            crate::util::fds::place_from_3(&raw_fds, &mut fd_copies)?;
            // Nothing but the descriptors handed over above crosses exec.
            crate::util::fds::cloexec_from(3 + raw_fds.len() as i32);
            Ok(())
        });
    }
    let spawned = cmd.spawn().map_err(RunError::Spawn);
    // The only write ends left are QEMU's: the pumps end when QEMU does.
    drop(cmd);
    drop(console_write);
    let mut child = spawned?;
    // QEMU starts paused (`-S`) while the network is joined and lume's
    // firewall written, and dnsmasq, if this run's network started it,
    // finishes its start; the guest runs once all that is done
    // (`run_until_exit`).
    let network_ready = net
        .complete()
        .and_then(|()| net.await_dnsmasq())
        .map_err(RunError::Network);
    let state = RunState {
        pid: std::process::id(),
        qemu_pid: child.id(),
        accelerator: accel,
        network_mode: req.network.clone(),
        // A restored memory snapshot goes on with the run it was taken in.
        started_at: disk.incoming_started_at.unwrap_or_else(unix_now),
        ip_address: net.ip_address.or(disk.incoming_ip),
        ipv6_addresses: Vec::new(),
        host_device: net.host_device.clone(),
        published: req.attach.publish.clone(),
        parent: net.parent.clone(),
        note: net.note.clone(),
        lease_file: net.lease_file.clone(),
        guest6_file: net.guest6_file.clone(),
        mac_address: Some(mac),
        guest_agent: None,
        uplink: net.uplink.clone(),
        network_policy: req.attach.policy.clone(),
        vnc_port: None,
        vnc_password: None,
        shared_directories: shares,
    };
    let pumps = [console_pump, stderr_pump];
    let output = QemuOutput {
        stderr_path: &stderr_path,
        pumps: &pumps,
        incoming: disk.incoming.as_ref(),
    };
    let result = network_ready.and_then(|()| {
        run_until_exit(
            vm,
            &mut child,
            req,
            &net,
            state,
            &output,
            vnc_listener,
            announce,
        )
    });
    if result.is_err() {
        let _ = child.kill();
        let _ = child.wait();
    }
    // The logs are complete once QEMU's pipes are drained (bounded: a pump
    // that never ends is left behind rather than holding up the teardown).
    drain(&pumps);
    // The network first: run.json stays until every resource is released,
    // so `lume stop` and `ls` see the VM until then.
    drop(net);
    drop(daemons);
    let _ = fs::remove_file(vm.state_path());
    let _ = fs::remove_file(vm.dir.join(QMP_SOCKET));
    let _ = fs::remove_file(vm.dir.join(QGA_SOCKET));
    let _ = fs::remove_file(vm.dir.join(EVENTS_SOCKET));
    disk.finish();
    let _ = fs::remove_file(vm.dir.join(vnc::VNC_SOCKET));
    result
}

const AGENT_UNKNOWN: u8 = 0;
const AGENT_CLOSED: u8 = 1;
const AGENT_OPEN: u8 = 2;

/// Follows QEMU's VSERPORT_CHANGE events for the agent's port until QEMU
/// closes the monitor.
fn follow_agent_channel(mut events: Qmp, flag: &AtomicU8) {
    use crate::guest::agent::QGA_PORT_ID;
    while let Ok(ev) = events.next_event() {
        if ev["event"] == "VSERPORT_CHANGE" && ev["data"]["id"] == QGA_PORT_ID {
            let open = ev["data"]["open"].as_bool() == Some(true);
            flag.store(
                if open { AGENT_OPEN } else { AGENT_CLOSED },
                Ordering::SeqCst,
            );
        }
    }
    flag.store(AGENT_UNKNOWN, Ordering::SeqCst);
}

/// Waits up to 2 s for the log pumps to reach the end of QEMU's output.
fn drain(pumps: &[std::thread::JoinHandle<()>]) {
    let until = Instant::now() + Duration::from_secs(2);
    while !pumps.iter().all(|p| p.is_finished()) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Where QEMU's stderr ends up, and the threads that write it.
struct QemuOutput<'a> {
    stderr_path: &'a Path,
    pumps: &'a [std::thread::JoinHandle<()>],
    /// A memory snapshot to load before the VM counts as running.
    incoming: Option<&'a File>,
}

#[allow(clippy::too_many_arguments)]
fn run_until_exit(
    vm: &Vm,
    child: &mut Child,
    req: &RunRequest,
    net: &attach::Attachment,
    mut state: RunState,
    output: &QemuOutput<'_>,
    vnc_listener: std::net::TcpListener,
    announce: &mut dyn FnMut(&RunState),
) -> Result<ExitStatus, RunError> {
    let QemuOutput {
        stderr_path,
        pumps,
        incoming,
    } = *output;
    let started = Instant::now();
    const QMP_DEADLINE: Duration = Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().map_err(RunError::Spawn)? {
            // QEMU's last words reach qemu.log once its pipe is drained.
            drain(pumps);
            return Err(RunError::QemuExited {
                status: status.to_string(),
                messages: fs::read_to_string(stderr_path).unwrap_or_default(),
            });
        }
        if Qmp::connect(&vm.dir).is_ok() {
            break;
        }
        if started.elapsed() > QMP_DEADLINE {
            return Err(RunError::QmpTimeout(
                QMP_DEADLINE.as_secs(),
                stderr_path.to_path_buf(),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // Nothing below lets the guest run on a network not set up for it.
    if !net.is_complete() {
        return Err(RunError::Network(attach::AttachError::NotComplete));
    }
    if let Some(state_file) = incoming {
        let loaded = Qmp::connect(&vm.dir)
            .map_err(crate::vm::snapshot::SnapshotError::Qmp)
            .and_then(|mut q| crate::vm::snapshot::load_memory(&mut q, state_file));
        if let Err(e) = loaded {
            drain(pumps);
            return Err(e.into());
        }
        log("Memory restored from the snapshot");
    }

    // The VNC password first, then the port is served: QEMU refuses every
    // VNC login until it has one.
    let password = req
        .vnc
        .password
        .clone()
        .unwrap_or_else(vnc::random_password);
    let mut qmp = Qmp::connect(&vm.dir).map_err(RunError::Control)?;
    vnc::set_password(&mut qmp, &password)?;
    // The guest runs (a restored one where its snapshot was taken): QEMU
    // started paused (`-S`) until its network was ready.
    qmp.execute("cont", None).map_err(RunError::Control)?;
    drop(qmp);
    let forwarder =
        vnc::VncForwarder::start(vnc_listener, &vm.dir).map_err(|source| RunError::Io {
            path: vm.dir.join(vnc::VNC_SOCKET),
            source,
        })?;
    state.vnc_port = Some(forwarder.port);
    state.vnc_password = Some(password);
    log(&format!(
        "VNC display on 127.0.0.1:{} (password in run.json)",
        forwarder.port
    ));
    let _forwarder = forwarder;

    // Whether the guest holds the agent's channel open, from QEMU's events.
    let agent_open = Arc::new(AtomicU8::new(AGENT_UNKNOWN));
    match Qmp::connect_to(&vm.dir, EVENTS_SOCKET) {
        Ok(events) => {
            agent_open.store(AGENT_CLOSED, Ordering::SeqCst);
            state.guest_agent = Some(false);
            let flag = agent_open.clone();
            std::thread::spawn(move || follow_agent_channel(events, &flag));
        }
        Err(e) => log(&format!(
            "Cannot follow QEMU's events ({}); whether a guest agent runs will not be known",
            crate::error_chain(&e)
        )),
    }
    state
        .save(&vm.state_path())
        .map_err(|source| RunError::Io {
            path: vm.state_path(),
            source,
        })?;
    log(&format!(
        "VM '{}' is running: QEMU pid {}, accelerator {}, network {}",
        vm.name, state.qemu_pid, state.accelerator, req.network
    ));
    announce(&state);
    // `sshAvailable` while the guest boots, without each `lume get`
    // waiting on a probe of its own (see `reach::Prober`).
    let state_path = vm.state_path();
    let _prober = (crate::network::driver::of(&req.network).ssh_route()
        == crate::network::driver::SshRoute::Address)
        .then(|| {
            crate::guest::reach::Prober::start(&vm.dir, move || {
                let s = RunState::load(&state_path)?;
                crate::guest::reach::ssh_target(&s, crate::vm::details::guest_address(&s))
            })
        });

    let mut force_at: Option<Instant> = None;
    let mut trimmed = Instant::now();
    let mut agent_saved = Instant::now() - Duration::from_secs(1);
    let mut v6_saved = Instant::now() - Duration::from_secs(1);
    let mut pause_checked = Instant::now();
    loop {
        // A memory snapshot whose command was killed while the guest was
        // paused: let the guest go on (docs/snapshots.md, "Crash safety").
        if pause_checked.elapsed() >= Duration::from_millis(500) {
            pause_checked = Instant::now();
            if crate::vm::snapshot::paused_by_snapshot(&vm.dir) {
                match crate::vm::snapshot::resume_abandoned(&vm.dir) {
                    Ok(true) => log(
                        "A memory snapshot command ended while the guest was paused: the guest goes on",
                    ),
                    Ok(false) => {}
                    Err(e) => log(&format!(
                        "Cannot let the guest go on after an interrupted memory snapshot: {}",
                        crate::error_chain(&e)
                    )),
                }
            }
        }
        // A detached supervisor's own log (lume.log) stays within its cap
        // however long the VM runs and whatever it records.
        if trimmed.elapsed() >= Duration::from_secs(1) {
            trimmed = Instant::now();
            if std::env::var_os(START_LOG_ENV).is_some() {
                let _ = logcap::trim(&vm.log_path(), logcap::cap());
            }
        }
        if let Some(status) = child.try_wait().map_err(RunError::Spawn)? {
            log(&format!(
                "QEMU exited ({status}); VM '{}' is stopped",
                vm.name
            ));
            return Ok(status);
        }
        // Publish whether the guest opened the agent's channel, at most once
        // a second (the guest decides how often it changes).
        let open = match agent_open.load(Ordering::SeqCst) {
            AGENT_OPEN => Some(true),
            AGENT_CLOSED => Some(false),
            _ => None,
        };
        if open != state.guest_agent && agent_saved.elapsed() >= Duration::from_secs(1) {
            agent_saved = Instant::now();
            log(&format!(
                "Guest agent channel {}",
                if open == Some(true) {
                    "opened by the guest"
                } else {
                    "closed"
                }
            ));
            state.guest_agent = open;
            let _ = state.save(&vm.state_path());
        }
        // Publish an address learned by DHCP snooping (bridged mode).
        if let Some(learned) = &net.learned {
            let ip = *learned.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(ip) = ip.map(IpAddr::V4)
                && Some(ip) != state.ip_address
            {
                log(&format!("Guest address from DHCP: {ip}"));
                state.ip_address = Some(ip);
                let _ = state.save(&vm.state_path());
            }
        }
        // Publish the IPv6 addresses the guest announced (bridged mode), at
        // most once a second: the guest decides how often they change.
        if let Some(learned) = &net.learned6
            && v6_saved.elapsed() >= Duration::from_secs(1)
        {
            let list = learned.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if list != state.ipv6_addresses {
                v6_saved = Instant::now();
                let shown: Vec<String> = list.iter().map(ToString::to_string).collect();
                log(&format!(
                    "Guest IPv6 addresses it announced: {}",
                    shown.join(" ")
                ));
                state.ipv6_addresses = list;
                let _ = state.save(&vm.state_path());
            }
        }
        if STOP_REQUESTED.load(Ordering::SeqCst) && force_at.is_none() {
            log("Stop requested: asking the guest to power off");
            // The same ways as `lume stop`: agent, SSH, ACPI.
            let method = power::request(
                &vm.dir,
                &state,
                PowerRequest::PowerOff,
                &SshLogin::default(),
                &mut |line| log(line),
            );
            force_at = Some(Instant::now() + req.stop_timeout);
            match method {
                Some(m) => log(&format!("Power-off requested {}", m.describe())),
                None => {
                    log("No way to ask the guest to power off worked; forcing QEMU off");
                    force_at = Some(Instant::now());
                }
            }
        }
        if force_at.is_some_and(|t| Instant::now() >= t) {
            log("The guest did not power off in time: forcing QEMU off");
            let _ = child.kill();
            force_at = Some(Instant::now() + Duration::from_secs(3600));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_path_cannot_forge_log_lines() {
        let forged = "Sharing /tmp/x\n[2026-01-01 00:00:00] VM stopped\u{1b}[2J as lume0";
        let line = one_line(forged);
        assert!(!line.contains('\n') && !line.contains('\u{1b}'), "{line}");
        assert_eq!(
            line,
            "Sharing /tmp/x\\n[2026-01-01 00:00:00] VM stopped\\u{1b}[2J as lume0"
        );
        assert_eq!(one_line("plain é path"), "plain é path");
    }
}
