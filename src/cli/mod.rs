//! The command line: clap definitions, and the translation of each command
//! into a [`crate::vm::Action`]. Output formatting lives in `output`.

/// `print!` through [`output::write_stdout`]: a closed pipe ends lume quietly.
macro_rules! out {
    ($($arg:tt)*) => { $crate::cli::output::write_stdout(format_args!($($arg)*)) };
}

/// `println!` through [`output::write_stdout`]: a closed pipe ends lume quietly.
macro_rules! outln {
    () => { $crate::cli::output::write_stdout(format_args!("\n")) };
    ($($arg:tt)*) => {
        $crate::cli::output::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

pub mod output;

use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::compat::{MACOS_ONLY, NOT_YET};
use crate::image::{ImageSource, Sha256Digest};
use crate::network::NetworkMode;
use crate::network::publish::PortMapping;
use crate::settings::Settings;
use crate::vm::config::{DEFAULT_DISPLAY, MacAddress};
use crate::vm::location;
use crate::vm::size::parse_size;
use crate::vm::{Action, Context, CreateSpec, Outcome, RunSpec, SetSpec, VmName, execute};

fn size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

/// A number of seconds: clap's own message ("invalid digit found in
/// string") does not say what is expected.
fn seconds_arg(s: &str) -> Result<u64, String> {
    s.parse()
        .map_err(|_| "a whole number of seconds, such as 60".to_string())
}

/// A count of virtual CPUs.
fn cpu_arg(s: &str) -> Result<u32, String> {
    s.parse()
        .map_err(|_| "a whole number of virtual CPUs, such as 2".to_string())
}

/// A TCP port.
fn port_arg(s: &str) -> Result<u16, String> {
    s.parse()
        .map_err(|_| "a port number from 0 to 65535, such as 7777".to_string())
}

fn shared_dir_arg(s: &str) -> Result<(PathBuf, bool), String> {
    crate::hypervisor::virtiofs::parse_spec(s).map_err(|e| e.to_string())
}

fn display_mode_arg(s: &str) -> Result<String, String> {
    match s {
        "vnc" | "native" | "none" => Ok(s.to_string()),
        _ => Err("vnc, native or none".to_string()),
    }
}

fn display_arg(s: &str) -> Result<String, String> {
    crate::vm::config::parse_display(s).map_err(|e| e.to_string())
}

/// The exit status of a usage error, as lume's argument parser
/// (swift-argument-parser) gives it: `EX_USAGE`.
pub const EX_USAGE: i32 = 64;

/// A usage error as clap renders it, in lume's style: `Error: ` and a
/// capitalised first word (clap writes `error: invalid value …`).
pub fn usage_error_text(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let Some(rest) = text.strip_prefix("error: ") else {
        return text;
    };
    let mut chars = rest.chars();
    match chars.next() {
        Some(first) => format!("Error: {}{}", first.to_uppercase(), chars.as_str()),
        None => "Error:".into(),
    }
}

/// A command line refused before anything is done: exit status
/// [`EX_USAGE`], as lume gives its validation errors.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error("{option} is not supported by lume on Linux ({why}): leave it out")]
    Unsupported {
        option: &'static str,
        why: &'static str,
    },
    #[error(
        "`lume {command}` is not available in lume on Linux: {why} (see docs/compatibility.md)"
    )]
    Command {
        command: &'static str,
        why: &'static str,
    },
}

/// Whether `e` refuses an option, command or value of lume's that lume on
/// Linux does not support: such a refusal exits with [`EX_USAGE`], as every
/// other usage error. Decided on the typed errors, never on their text.
pub fn is_refusal(e: &anyhow::Error) -> bool {
    use crate::settings::SettingsError;
    use crate::vm::VmError;
    use crate::vm::location::LocationError;
    let settings = |s: &SettingsError| matches!(s, SettingsError::RegistryType(_));
    let location = |l: &LocationError| match l {
        LocationError::Ephemeral => true,
        LocationError::Settings(s) => settings(s),
        _ => false,
    };
    e.chain().any(|c| {
        c.is::<UsageError>()
            || c.downcast_ref::<SettingsError>().is_some_and(settings)
            || c.downcast_ref::<LocationError>().is_some_and(location)
            || c.downcast_ref::<VmError>().is_some_and(|v| match v {
                VmError::MacOsGuest | VmError::UnknownOs(_) => true,
                VmError::Settings(s) => settings(s),
                _ => false,
            })
    })
}

/// Refuses `option` when `given`.
fn refuse(given: bool, option: &'static str, why: &'static str) -> Result<(), UsageError> {
    if given {
        Err(UsageError::Unsupported { option, why })
    } else {
        Ok(())
    }
}

/// Virtual machines on Linux with networking that keeps working.
#[derive(Debug, Parser)]
#[command(name = "lume", version, about, max_term_width = 100)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, Default, ValueEnum, PartialEq, Eq)]
pub enum Format {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct StorageArg {
    /// VM location: a location name (`lume config storage list`) or a path
    /// containing a '/' (default: the location holding the VM, else the
    /// default location)
    #[arg(long, value_name = "NAME|PATH", global = true)]
    pub storage: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a new VM
    Create(CreateArgs),
    /// Start a VM (in the foreground unless --detach)
    Run(RunArgs),
    /// Stop a VM: ask the guest to power off (guest agent, SSH, ACPI), force after --timeout
    Stop(StopArgs),
    /// Gracefully shut down a VM (guest agent, SSH, ACPI); never forces
    Shutdown(GuestPowerArgs),
    /// Gracefully restart a VM (guest agent, SSH); --force resets it when neither works
    Restart(RestartArgs),
    /// List VMs
    #[command(alias = "list")]
    Ls(LsArgs),
    /// Show one VM
    Get(GetArgs),
    /// Change a VM's settings (applied at its next start)
    Set(SetArgs),
    /// Copy a stopped VM under a new name, with a new MAC address
    Clone(CloneArgs),
    /// Delete a VM and its disk
    Delete(DeleteArgs),
    /// Disk and memory snapshots of a VM (ours; see docs/snapshots.md)
    Snapshot(SnapshotArgs),
    /// Open a shell in a running VM, or run one command there, over SSH as user lume
    Ssh(SshArgs),
    /// Show or change global settings
    Config(ConfigArgs),
    /// Host networking: health checks
    Network(NetworkArgs),
    /// Serve the HTTP API (lume's REST API) on 127.0.0.1:7777
    ///
    /// With --socket it listens on a Unix socket too. Started by systemd through socket activation
    /// (the package's lume.socket on /run/lume-api.sock, mode 0660, group
    /// lume, passed as LISTEN_FDS), it serves the socket systemd passes and
    /// logs to the journal; --api-group names the group whose members it
    /// serves. A member's lume finds the service on /run/lume-api.sock, or
    /// on the socket named by the LUME_SOCKET environment variable.
    /// docs/install.md and docs/security.md say what members may do.
    Serve(ServeArgs),
    /// Pull a VM image from an OCI registry (lume's format) as a new VM
    Pull(PullArgs),
    /// Push a stopped VM to an OCI registry in lume's format
    Push(PushArgs),
    /// List the images in the local cache
    Images(ImagesArgs),
    /// Remove cached images
    Prune,
    /// lume's `ipsw`: refused (macOS restore images need an Apple host)
    Ipsw(RefusedArgs),
    /// lume's `setup`: refused (unattended macOS setup needs an Apple host)
    Setup(RefusedArgs),
    /// lume's `sip`: refused (System Integrity Protection is macOS's)
    Sip(RefusedArgs),
    /// Open a VNC viewer on a running VM (or print its VNC URL)
    Attach(AttachArgs),
    /// lume's `convert`: refused (legacy lume images: not supported yet)
    Convert(RefusedArgs),
    /// lume's `logs`: refused (`lume serve` logs to its standard error; GET /lume/logs)
    Logs(RefusedArgs),
    /// lume's `check-update`: refused (update lume with your package manager)
    CheckUpdate(RefusedArgs),
    /// lume's `update`: refused (update lume with your package manager)
    Update(RefusedArgs),
    /// lume's `dump-docs`: refused (the API is described at GET /openapi.json)
    DumpDocs(RefusedArgs),
    /// Shell completions and man pages, from these definitions (for packaging)
    #[command(hide = true)]
    Generate(GenerateArgs),
    /// The network half of a hand-off: started by `lume serve` as root for a
    /// user's supervisor (docs/install.md); not for people
    #[command(hide = true, name = "net-keeper")]
    NetKeeper(crate::network::handoff::KeeperArgs),
}

/// What `lume generate` writes.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(subcommand)]
    pub what: GenerateCommand,
}

#[derive(Debug, Subcommand)]
pub enum GenerateCommand {
    /// A completion script on standard output
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Man pages (lume.1, lume-run.1, …) into a directory
    Man { dir: PathBuf },
}

/// The arguments of a refused command: anything, so that the refusal (and
/// not a parse error) is what the user sees.
#[derive(Debug, Args)]
pub struct RefusedArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    pub args: Vec<String>,
}

#[derive(Debug, Args)]
pub struct AttachArgs {
    pub name: VmName,
    /// Viewer to open: `vnc` or `native` (both open a VNC viewer here)
    #[arg(long, value_name = "native|vnc", value_parser = attach_display_arg)]
    pub display: Option<String>,
    #[command(flatten)]
    pub storage: StorageArg,
}

/// Why `lume attach` cannot show a VM.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("VM '{0}' is not running: start it with `lume run {0}`")]
    NotRunning(VmName),
    #[error(
        "VM '{0}' has no VNC display (it was started by a lume without VNC): restart it with `lume stop {0}` and `lume run {0}`"
    )]
    NoVnc(VmName),
}

fn attach_display_arg(s: &str) -> Result<String, String> {
    match s {
        "vnc" | "native" => Ok(s.to_string()),
        _ => Err("native or vnc".to_string()),
    }
}

/// `lume attach`: the running VM's VNC display, in a viewer or as a URL.
fn attach(a: AttachArgs) -> Result<i32> {
    let ctx = context(&a.storage, Some(&a.name))?;
    let details = match execute(
        &ctx,
        Action::Get {
            name: a.name.clone(),
        },
        &mut note,
    )? {
        Outcome::Details(d) => d,
        _ => unreachable!("get answers with details"),
    };
    if details.status != crate::vm::details::VmStatus::Running {
        return Err(AttachError::NotRunning(a.name).into());
    }
    let vm = ctx.store.vm(&a.name);
    let state = vm.running_state();
    let (Some(port), Some(pw)) = (
        state.as_ref().and_then(|s| s.vnc_port),
        state.as_ref().and_then(|s| s.vnc_password.clone()),
    ) else {
        return Err(AttachError::NoVnc(a.name).into());
    };
    crate::vm::actions::show_vnc(&vm.dir, port, &pw, true, &mut |line| outln!("{line}"));
    Ok(0)
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// Image to pull (format: name:tag)
    pub image: String,
    /// Name for the VM (default: IMAGE_TAG, as lume)
    pub name: Option<VmName>,
    /// Container registry to pull from (default: set by `lume config registry ghcr --registry`, else ghcr.io)
    #[arg(long)]
    pub registry: Option<String>,
    /// Organization to pull from (default: set by `lume config registry ghcr --organization`, else trycua)
    #[arg(long)]
    pub organization: Option<String>,
    /// Registry username for authentication
    #[arg(long, requires = "password")]
    pub username: Option<String>,
    /// Registry password for authentication
    #[arg(long, requires = "username")]
    pub password: Option<String>,
    /// Replace an existing VM of that name (it must be stopped) once the
    /// pull is complete, and fetch every blob anew even when it is cached
    #[arg(long)]
    pub force: bool,
    /// Accepted for lume compatibility (lume's logging detail)
    #[arg(long)]
    pub verbose: bool,
    #[command(flatten)]
    pub storage: StorageArg,
}

#[derive(Debug, Args)]
pub struct PushArgs {
    /// Name of the VM to push
    pub name: VmName,
    /// Image to push (format: name:tag)
    pub image: String,
    /// Additional tags to push the same image to
    #[arg(long, num_args = 1..)]
    pub additional_tags: Vec<String>,
    /// Container registry to push to (default: set by `lume config registry ghcr --registry`, else ghcr.io)
    #[arg(long)]
    pub registry: Option<String>,
    /// Organization to push to (default: set by `lume config registry ghcr --organization`, else trycua)
    #[arg(long)]
    pub organization: Option<String>,
    /// Chunk size of the disk layers in MB
    #[arg(long, default_value_t = crate::registry::push::DEFAULT_CHUNK_MB)]
    pub chunk_size_mb: u64,
    /// Prepare the layers without uploading
    #[arg(long)]
    pub dry_run: bool,
    /// Registry username for authentication
    #[arg(long, requires = "password")]
    pub username: Option<String>,
    /// Registry password for authentication
    #[arg(long, requires = "username")]
    pub password: Option<String>,
    /// Accepted for lume compatibility (lume's logging detail)
    #[arg(long)]
    pub verbose: bool,
    /// Refused: lume on Linux pushes the chunked format only
    #[arg(long)]
    pub single_layer: bool,
    /// Refused: lume on Linux pushes the chunked format only (legacy images are pulled)
    #[arg(long)]
    pub legacy: bool,
    /// Refused: not supported yet
    #[arg(long)]
    pub reassemble: bool,
    #[command(flatten)]
    pub storage: StorageArg,
}

#[derive(Debug, Args)]
pub struct ImagesArgs {
    /// Organization to list (default: set by `lume config registry ghcr --organization`, else trycua)
    #[arg(long)]
    pub organization: Option<String>,
    /// Output format
    #[arg(long, short = 'f', value_enum, default_value_t)]
    pub format: Format,
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Name of the VM: letters, digits, '.', '_' and '-'
    pub name: VmName,
    /// Guest operating system (linux; macOS needs an Apple host)
    #[arg(long, default_value = "linux")]
    pub os: String,
    /// Number of virtual CPUs
    #[arg(long, default_value_t = 2, value_name = "COUNT", value_parser = cpu_arg)]
    pub cpu: u32,
    /// Memory size (B, KB, MB, GB, TB; a bare number means GB)
    #[arg(long, default_value = "2GB", value_parser = size_arg)]
    pub memory: u64,
    /// Disk size (B, KB, MB, GB, TB; a bare number means GB)
    #[arg(long, default_value = "20GB", value_parser = size_arg)]
    pub disk_size: u64,
    /// Display resolution WIDTHxHEIGHT (recorded for lume compatibility; VMs run headless)
    #[arg(long, default_value = DEFAULT_DISPLAY, value_parser = display_arg)]
    pub display: String,
    #[arg(long, default_value = "nat", help = concat!("Network mode: ", crate::network_modes!()))]
    pub network: NetworkMode,
    /// MAC address (default: a random locally administered address)
    #[arg(long)]
    pub mac_address: Option<MacAddress>,
    /// Kernel for direct kernel boot (copied into the VM)
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initrd for direct kernel boot (copied into the VM)
    #[arg(long, value_name = "PATH", requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line for direct kernel boot
    #[arg(long, requires = "kernel")]
    pub cmdline: Option<String>,
    /// Disk image to import as the VM's disk: a file or an http(s) URL;
    /// qcow2, raw or xz-compressed raw (see docs/images.md)
    #[arg(long, value_name = "PATH|URL", conflicts_with = "kernel")]
    pub image: Option<ImageSource>,
    /// Expected SHA-256 of the image file (64 hex digits, as sha256sum prints)
    #[arg(long, value_name = "HEX", requires = "image")]
    pub image_sha256: Option<Sha256Digest>,
    /// Publish a guest port: [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|/udp] (nat and user modes; repeatable)
    #[arg(long, short = 'p', value_name = "SPEC")]
    pub publish: Vec<PortMapping>,
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// Your own cloud-init user-data (#cloud-config or a script), added after lume's (docs/images.md)
    #[arg(long, value_name = "FILE")]
    pub cloud_init: Option<PathBuf>,
    /// Give the VM no cloud-init seed (no user, key or hostname from lume)
    #[arg(long, conflicts_with_all = ["cloud_init", "no_password"])]
    pub no_cloud_init: bool,
    /// User lume gets no password: SSH with keys only
    #[arg(long)]
    pub no_password: bool,
    /// Accepted as lume: creating never opens a display
    #[arg(long)]
    pub no_display: bool,
    /// Refused: macOS restore images need an Apple host
    #[arg(long, value_name = "PATH")]
    pub ipsw: Option<String>,
    /// Refused: unattended macOS setup needs an Apple host
    #[arg(long, value_name = "PRESET|PATH")]
    pub unattended: Option<String>,
    /// Refused: lume's --unattended setup option (macOS only)
    #[arg(long)]
    pub debug: bool,
    /// Refused: lume's --unattended setup option (macOS only)
    #[arg(long, value_name = "DIR")]
    pub debug_dir: Option<String>,
    /// Refused: lume's --unattended setup option (macOS only)
    #[arg(long, value_name = "PORT", value_parser = port_arg)]
    pub vnc_port: Option<u16>,
    #[command(flatten)]
    pub storage: StorageArg,
}

impl CreateArgs {
    fn refused(&self) -> Result<(), UsageError> {
        refuse(self.ipsw.is_some(), "--ipsw", MACOS_ONLY)?;
        refuse(self.unattended.is_some(), "--unattended", MACOS_ONLY)?;
        refuse(self.debug, "--debug", MACOS_ONLY)?;
        refuse(self.debug_dir.is_some(), "--debug-dir", MACOS_ONLY)?;
        refuse(self.vnc_port.is_some(), "--vnc-port", MACOS_ONLY)
    }
}

/// `lume ssh`: lume's options.
#[derive(Debug, Args)]
pub struct SshArgs {
    pub name: VmName,
    /// Command to run (omit for an interactive shell); put `--` before a command with options
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
    /// User to log in as
    #[arg(long, short = 'u', default_value = crate::guest::cloudinit::GUEST_USER)]
    pub user: String,
    /// Password to try after lume's key (lume's default password is lume)
    #[arg(long, short = 'p')]
    pub password: Option<String>,
    /// Command timeout in seconds (0: none); also bounds the connection
    #[arg(long, short = 't', default_value_t = 60, value_name = "SECONDS", value_parser = seconds_arg)]
    pub timeout: u64,
    #[command(flatten)]
    pub storage: StorageArg,
}

/// The network policy options of create, run and set (docs/networking.md).
#[derive(Debug, Args, Default)]
pub struct PolicyArgs {
    /// Allow outbound traffic only to CIDR[:PORT|:LOW-HIGH][/tcp|/udp]; everything else is denied except DHCP and DNS to lume (repeatable; nat, host and bridged modes)
    #[arg(long = "allow-out", value_name = "RULE")]
    pub allow_out: Vec<crate::network::policy::Rule>,
    /// Deny outbound traffic to CIDR[:PORT|:LOW-HIGH][/tcp|/udp], checked before --allow-out (repeatable; nat, host and bridged modes)
    #[arg(long = "deny-out", value_name = "RULE")]
    pub deny_out: Vec<crate::network::policy::Rule>,
    /// No traffic to this host, its networks, private ranges or other VMs; the internet stays reachable (nat, host and bridged modes)
    #[arg(long)]
    pub isolate: bool,
}

impl PolicyArgs {
    /// The policy given, if any option was; a rule given twice is kept
    /// once, with a note on stderr (as ufw's "Skipping adding existing
    /// rule").
    pub fn policy(&self) -> Option<crate::network::policy::Policy> {
        let mut p = crate::network::policy::Policy {
            allow_out: self.allow_out.clone(),
            deny_out: self.deny_out.clone(),
            isolate: self.isolate,
        };
        let dropped = p.dedup();
        if let Some(n) = crate::network::policy::duplicates_note(&dropped, crate::vm::Door::Cli) {
            note(&n);
        }
        (!p.is_empty()).then_some(p)
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Name of the VM, or an image IMAGE:TAG: its VM IMAGE_TAG (as `lume
    /// pull` names it) is pulled first when it does not exist, then run
    pub name: String,
    /// Registry to pull an image from (default: set by `lume config registry ghcr --registry`, else ghcr.io)
    #[arg(long)]
    pub registry: Option<String>,
    /// Organization to pull an image from (default: set by `lume config registry ghcr --organization`, else trycua)
    #[arg(long)]
    pub organization: Option<String>,
    /// Return once the VM is running, leaving it to a background supervisor
    #[arg(long)]
    pub detach: bool,
    /// Discard every disk change when the VM stops (a throwaway sandbox; see docs/snapshots.md)
    #[arg(long)]
    pub ephemeral: bool,
    #[arg(long, help = concat!("Network mode for this run only: ", crate::network_modes!()))]
    pub network: Option<NetworkMode>,
    /// ISO image to attach as a read-only CD-ROM (repeatable)
    #[arg(long, value_name = "ISO")]
    pub mount: Vec<PathBuf>,
    /// Extra disk image to attach (repeatable)
    #[arg(long, value_name = "PATH")]
    pub disk: Vec<PathBuf>,
    /// Publish a guest port for this run: [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|/udp] (repeatable)
    #[arg(long, short = 'p', value_name = "SPEC")]
    pub publish: Vec<PortMapping>,
    /// A network policy for this run only, replacing the saved one
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// Open no viewer: lume's alias of --display none (the VNC server runs in every mode)
    #[arg(long, short = 'd')]
    pub no_display: bool,
    /// Viewer to open: `vnc` or `native` (the default, as lume) open a VNC viewer when one is installed and DISPLAY or WAYLAND_DISPLAY is set, else print the VNC URL; `none` only prints it
    #[arg(long, value_name = "vnc|native|none", value_parser = display_mode_arg)]
    pub display: Option<String>,
    /// Refused: not supported yet (a detached VM logs to lume.log in its directory)
    #[arg(long, value_name = "PATH")]
    pub log_file: Option<String>,
    /// Directory to share with the VM (virtio-fs; repeatable): PATH or PATH:rw read-write, PATH:ro read-only; lume's guests mount it at /mnt/shared/<its name>
    #[arg(long, value_name = "PATH[:ro|rw]", value_parser = shared_dir_arg)]
    pub shared_dir: Vec<(PathBuf, bool)>,
    /// Raw disk image to attach as a USB mass-storage device (repeatable; read-write; qcow2 is refused)
    #[arg(long, value_name = "PATH")]
    pub usb_storage: Vec<PathBuf>,
    /// The VNC server's port on 127.0.0.1 (0, the default: a free port)
    #[arg(long, value_name = "PORT", value_parser = port_arg)]
    pub vnc_port: Option<u16>,
    /// The VNC password (default: LUME_VNC_PASSWORD, else a random one per run; VNC uses its first 8 characters; lume restarts itself at once to take it off its command line)
    #[arg(long, value_name = "PASSWORD")]
    pub vnc_password: Option<String>,
    /// Refused when true: recovery mode is for macOS guests
    #[arg(long, value_name = "true|false")]
    pub recovery_mode: Option<bool>,
    /// Refused: another disk image in place of the VM's is not supported yet
    #[arg(long, value_name = "PATH")]
    pub disk_path: Option<String>,
    /// Refused: NVRAM files are macOS guests'
    #[arg(long, value_name = "PATH")]
    pub nvram_path: Option<String>,
    /// Refused: clipboard sync is not supported yet
    #[arg(long)]
    pub clipboard: bool,
    #[command(flatten)]
    pub storage: StorageArg,
}

impl RunArgs {
    fn refused(&self) -> Result<(), UsageError> {
        refuse(self.log_file.is_some(), "--log-file", NOT_YET)?;
        refuse(
            self.recovery_mode == Some(true),
            "--recovery-mode",
            MACOS_ONLY,
        )?;
        refuse(self.disk_path.is_some(), "--disk-path", NOT_YET)?;
        refuse(self.nvram_path.is_some(), "--nvram-path", MACOS_ONLY)?;
        refuse(self.clipboard, "--clipboard", NOT_YET)
    }
}

#[derive(Debug, Args)]
pub struct StopArgs {
    pub name: VmName,
    /// Seconds to wait for the guest to power off before forcing QEMU off
    #[arg(long, default_value_t = 15, value_name = "SECONDS", value_parser = seconds_arg)]
    pub timeout: u64,
    #[command(flatten)]
    pub storage: StorageArg,
}

/// lume's options of `shutdown` and `restart`.
#[derive(Debug, Args)]
pub struct GuestPowerArgs {
    pub name: VmName,
    /// SSH username, for the SSH way
    #[arg(long, short = 'u', default_value = "lume")]
    pub user: String,
    /// SSH and sudo password, for the SSH way
    #[arg(long, short = 'p', default_value = "lume")]
    pub password: String,
    /// Seconds for the SSH command, and for the guest to power off (shutdown)
    #[arg(long, short = 't', default_value_t = 30, value_name = "SECONDS", value_parser = seconds_arg)]
    pub timeout: u64,
    #[command(flatten)]
    pub storage: StorageArg,
}

impl GuestPowerArgs {
    fn login(&self) -> Result<crate::guest::power::SshLogin> {
        Ok(crate::guest::power::SshLogin {
            user: self.user.clone(),
            password: Some(self.password.clone()),
            timeout: crate::vm::actions::stop_timeout(self.timeout)?,
        })
    }
}

#[derive(Debug, Args)]
pub struct RestartArgs {
    #[command(flatten)]
    pub power: GuestPowerArgs,
    /// When no graceful way works, reset the VM like its reset button (not graceful)
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct LsArgs {
    /// Output format
    #[arg(long, short = 'f', value_enum, default_value_t)]
    pub format: Format,
    #[command(flatten)]
    pub storage: StorageArg,
}

#[derive(Debug, Args)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    pub command: SnapshotCommand,
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Take a snapshot of a VM's disk (and memory with --memory); O(1)
    Create {
        /// The VM to snapshot (running or stopped)
        name: VmName,
        /// The snapshot's name (default: snapshot-<unix time>, with -2, -3… if taken)
        snap: Option<String>,
        /// Also save the running VM's memory: a restore resumes it where it was
        #[arg(long)]
        memory: bool,
        #[command(flatten)]
        storage: StorageArg,
    },
    /// List a VM's snapshots
    #[command(alias = "ls")]
    List {
        /// The VM whose snapshots to list
        name: VmName,
        /// Output format
        #[arg(long, short = 'f', value_enum, default_value_t)]
        format: Format,
        #[command(flatten)]
        storage: StorageArg,
    },
    /// Put a VM back to a snapshot (a memory snapshot resumes the VM running)
    Restore {
        /// The VM to put back (a running VM is forced off first)
        name: VmName,
        /// The snapshot to go back to (see `lume snapshot list NAME`)
        snap: String,
        #[command(flatten)]
        storage: StorageArg,
    },
    /// Delete a snapshot (the others and the VM's disk stay as they are)
    #[command(alias = "rm")]
    Delete {
        /// The VM the snapshot belongs to
        name: VmName,
        /// The snapshot to delete
        snap: String,
        #[command(flatten)]
        storage: StorageArg,
    },
    /// Merge a stopped VM's layered disk into a plain disk.img (after its
    /// snapshots are deleted); clone, push and resizing need a plain disk
    Flatten {
        /// The VM to flatten (stopped, without snapshots)
        name: VmName,
        #[command(flatten)]
        storage: StorageArg,
    },
}

#[derive(Debug, Args)]
pub struct GetArgs {
    pub name: VmName,
    /// Output format
    #[arg(long, short = 'f', value_enum, default_value_t)]
    pub format: Format,
    #[command(flatten)]
    pub storage: StorageArg,
}

#[derive(Debug, Args)]
pub struct SetArgs {
    pub name: VmName,
    /// Number of virtual CPUs
    #[arg(long, value_name = "COUNT", value_parser = cpu_arg)]
    pub cpu: Option<u32>,
    /// Memory size
    #[arg(long, value_parser = size_arg)]
    pub memory: Option<u64>,
    /// Disk size (grow only; the VM must be stopped)
    #[arg(long, value_parser = size_arg)]
    pub disk_size: Option<u64>,
    #[arg(long, help = concat!("Network mode: ", crate::network_modes!()))]
    pub network: Option<NetworkMode>,
    /// Display resolution WIDTHxHEIGHT (recorded; VMs run headless)
    #[arg(long, value_parser = display_arg)]
    pub display: Option<String>,
    /// User mode: let the guest reach this host's loopback services
    /// (127.0.0.1, ::1) through its gateway. UNSAFE for untrusted guests:
    /// it reaches `lume serve` and every other local-only service
    #[arg(long, value_name = "true|false")]
    pub unsafe_host_loopback: Option<bool>,
    /// The new network policy (replaces the saved one as a whole)
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// Remove the VM's network policy
    #[arg(long, conflicts_with_all = ["allow_out", "deny_out", "isolate"])]
    pub clear_policy: bool,
    /// Refused: lume's option of macOS disk resizes
    #[arg(long)]
    pub no_backup: bool,
    /// Refused: lume's option of macOS disk resizes
    #[arg(long)]
    pub keep_backup: bool,
    /// Refused: lume's option of macOS disk resizes
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub storage: StorageArg,
}

impl SetArgs {
    fn refused(&self) -> Result<(), UsageError> {
        refuse(self.no_backup, "--no-backup", MACOS_ONLY)?;
        refuse(self.keep_backup, "--keep-backup", MACOS_ONLY)?;
        refuse(self.dry_run, "--dry-run", MACOS_ONLY)
    }
}

#[derive(Debug, Args)]
pub struct CloneArgs {
    pub name: VmName,
    pub new_name: VmName,
    /// Source VM storage location (name or path; default: the location holding the VM)
    #[arg(long, value_name = "NAME|PATH", conflicts_with = "storage")]
    pub source_storage: Option<String>,
    /// Destination VM storage location (name or path; default: the default location, as in lume)
    #[arg(long, value_name = "NAME|PATH", conflicts_with = "storage")]
    pub dest_storage: Option<String>,
    /// Clone this snapshot of the VM (O(1); the VM may be running)
    #[arg(long, value_name = "SNAP")]
    pub snapshot: Option<String>,
    /// Both VMs in this location (source and destination)
    #[command(flatten)]
    pub storage: StorageArg,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    pub name: VmName,
    /// Do not ask; stop the VM first if it runs
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub storage: StorageArg,
}

#[derive(Debug, Args)]
pub struct NetworkArgs {
    #[command(subcommand)]
    pub command: NetworkTopCommand,
    #[command(flatten)]
    pub storage: StorageArg,
}

#[derive(Debug, Subcommand)]
pub enum NetworkTopCommand {
    /// Check the host, lume's networks (as the invoker's config.yaml sets them) and the running VMs of one storage location (--storage, default ~/.lume); exit 1 if a check fails
    Doctor {
        /// Output format
        #[arg(long, short = 'f', value_enum, default_value_t)]
        format: Format,
    },
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Port to listen on (0 picks a free one)
    #[arg(long, default_value_t = crate::api::DEFAULT_PORT, value_parser = port_arg)]
    pub port: u16,
    /// Address to listen on; anything but loopback needs a token
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Refused: a token on the command line is visible to every user in the
    /// process list (use LUME_API_TOKEN or --token-file)
    #[arg(long, hide = true, value_name = "TOKEN")]
    pub token: Option<String>,
    /// Read the API token from this file (owned by the server's user, not
    /// readable by group or others); the LUME_API_TOKEN environment variable
    /// works too. Every request must then send `Authorization: Bearer TOKEN`
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// Also listen on this Unix socket (mode 0660, group apiGroup); its
    /// clients are identified by SO_PEERCRED
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Serve the members of this group (instead of config.yaml's apiGroup)
    #[arg(long, value_name = "GROUP")]
    pub api_group: Option<String>,
    /// Serve the members of this group only the network hand-off of lume
    /// without sudo, on the Unix socket (the packaged service uses `lume`)
    #[arg(long, value_name = "GROUP")]
    pub handoff_group: Option<String>,
    /// Serve lume's MCP server (Model Context Protocol) on standard
    /// input/output instead of HTTP, for AI agent hosts (docs/mcp.md)
    #[arg(long)]
    pub mcp: bool,
    #[command(flatten)]
    pub storage: StorageArg,
}

#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// Without a subcommand: `get`
    #[command(subcommand)]
    pub command: Option<ConfigCommand>,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print what lume prints (default storage, cache, caching, telemetry,
    /// registry, locations) and our own keys; or only KEY's value
    Get {
        /// One key: print only its value (its default when not set)
        key: Option<String>,
    },
    /// Manage VM storage locations
    Storage {
        #[command(subcommand)]
        command: StorageCommand,
    },
    /// Manage image cache settings (default: status)
    Cache {
        #[command(subcommand)]
        command: Option<CacheCommand>,
    },
    /// lume's telemetry preference, stored only: lume for Linux sends no telemetry (default: status)
    Telemetry {
        #[command(subcommand)]
        command: Option<TelemetryCommand>,
    },
    /// Manage container registry settings (default: status)
    Registry {
        #[command(subcommand)]
        command: Option<RegistryCommand>,
    },
    /// Set one key in config.yaml (other keys are kept); an empty value is
    /// refused (use unset)
    Set { key: String, value: String },
    /// Remove one key from config.yaml, so its default applies again
    Unset { key: String },
    /// Host networking: which interfaces can be bridged
    Network {
        #[command(subcommand)]
        command: NetworkCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum StorageCommand {
    /// Add a new VM storage location
    Add {
        /// Storage name (alphanumeric with dashes/underscores)
        name: String,
        /// Path to VM storage directory (created 0700 when missing)
        path: PathBuf,
    },
    /// Remove a VM storage location (its VMs stay on disk)
    Remove {
        /// Storage name to remove
        name: String,
    },
    /// List all VM storage locations
    List,
    /// Set the default VM storage location
    Default {
        /// Storage name to set as default
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Show cache status and directory
    Status,
    /// Get or set cache directory
    Dir {
        /// Path to cache directory (omit to show current)
        path: Option<PathBuf>,
    },
    /// Enable image caching
    Enable,
    /// Disable image caching
    Disable,
    /// Earlier lume's `cache get`: `dir` without a path
    #[command(hide = true)]
    Get,
    /// Earlier lume's `cache set PATH`: `dir PATH`
    #[command(hide = true)]
    Set { path: PathBuf },
}

#[derive(Debug, Subcommand)]
pub enum TelemetryCommand {
    /// Show the stored telemetry preference
    Status,
    /// Store the preference "enabled" (nothing is ever sent)
    Enable,
    /// Store the preference "disabled"
    Disable,
    /// Nothing to reset: lume for Linux keeps no installation ID
    #[command(name = "reset-id")]
    ResetId,
}

#[derive(Debug, Subcommand)]
pub enum RegistryCommand {
    /// Show current registry configuration
    Status,
    /// Get or set registry type (ghcr; gcs is refused)
    Type {
        /// Registry type to use. Omit to show current.
        #[arg(name = "type")]
        kind: Option<String>,
    },
    /// Configure GitHub Container Registry settings (any OCI registry)
    Ghcr {
        /// Registry URL (default: ghcr.io)
        #[arg(long)]
        registry: Option<String>,
        /// Organization/namespace (default: trycua)
        #[arg(long)]
        organization: Option<String>,
    },
    /// Refused: lume's GCS registry type is not implemented on Linux
    Gcs {
        #[arg(long)]
        api_url: Option<String>,
        #[arg(long)]
        api_key: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum NetworkCommand {
    /// List host interfaces and whether bridged mode can use them
    Interfaces {
        /// Output format
        #[arg(long, short = 'f', value_enum, default_value_t)]
        format: Format,
    },
}

/// The context of a command: `--storage` read by [`location::resolve`];
/// without it, the location holding VM `vm` (lume's search), else the
/// default location.
fn context(storage: &StorageArg, vm: Option<&VmName>) -> Result<Context> {
    let settings = Settings::load()?;
    let resolved = match vm {
        Some(name) => location::store_for_vm(&settings, storage.storage.as_deref(), name)?,
        None => match storage.storage.as_deref() {
            Some(spec) => location::resolve(&settings, spec)?,
            None => location::Resolved {
                store: location::default_store(&settings)?,
                note: None,
            },
        },
    };
    if let Some(n) = &resolved.note {
        eprintln!("{n}");
    }
    Ok(Context {
        store: resolved.store,
        settings,
        caller: crate::vm::Caller::current(),
        member: false,
    })
}

fn note(line: &str) {
    eprintln!("{line}");
}

/// The most of an answer to a question that is read (one line, at most
/// this many bytes): `cat /dev/zero | lume delete x` reads no further.
pub const ANSWER_MAX_BYTES: u64 = 1024;

/// Asks lume's question before a delete and reads one line of answer from
/// standard input (a terminal or a pipe); only `y` or `yes` agree.
fn confirm_delete(name: &VmName) -> bool {
    out!("Are you sure you want to delete the virtual machine '{name}'? [y/N] ");
    // As lume, a piped answer is not echoed and what follows goes on the
    // question's line (`…? [y/N] Deletion cancelled`).
    read_answer(std::io::stdin().lock())
        .is_some_and(|a| matches!(a.trim().to_ascii_lowercase().as_str(), "y" | "yes"))
}

/// One line of answer, at most [`ANSWER_MAX_BYTES`] of it (the rest of a
/// longer line is not read); `None` when nothing could be read.
fn read_answer(input: impl BufRead) -> Option<String> {
    let mut line = Vec::new();
    input
        .take(ANSWER_MAX_BYTES)
        .read_until(b'\n', &mut line)
        .ok()?;
    Some(String::from_utf8_lossy(&line).into_owned())
}

/// A lume command that lume on Linux does not have.
fn refused_command(command: &'static str, why: &'static str) -> Result<i32> {
    Err(UsageError::Command { command, why }.into())
}

/// Writes completions (stdout) or man pages (a directory) generated from
/// the clap definitions, so they never disagree with the binary.
fn generate(what: GenerateCommand) -> Result<()> {
    use clap::CommandFactory as _;
    let cmd = Cli::command();
    match what {
        GenerateCommand::Completions { shell } => {
            // Hidden commands (generate, net-keeper, old spellings) are not
            // offered.
            let mut cmd = without_hidden(&cmd);
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd, "lume", &mut script);
            std::io::Write::write_all(&mut std::io::stdout(), &script)
                .context("Cannot write the completion script")?;
        }
        GenerateCommand::Man { dir } => {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("Cannot create {}", dir.display()))?;
            clap_mangen::generate_to(cmd, &dir)
                .with_context(|| format!("Cannot write man pages into {}", dir.display()))?;
        }
    }
    Ok(())
}

/// `cmd` without its hidden subcommands and arguments (at every level),
/// for completions.
fn without_hidden(cmd: &clap::Command) -> clap::Command {
    // clap takes names as `&'static str` here; this runs once per
    // `lume generate` process.
    fn leak(s: &str) -> &'static str {
        Box::leak(s.to_string().into_boxed_str())
    }
    let mut out = clap::Command::new(leak(cmd.get_name()))
        .args(cmd.get_arguments().filter(|a| !a.is_hide_set()).cloned())
        .subcommands(
            cmd.get_subcommands()
                .filter(|s| !s.is_hide_set())
                .map(without_hidden),
        )
        .visible_aliases(cmd.get_visible_aliases().map(leak).collect::<Vec<_>>());
    if let Some(about) = cmd.get_about() {
        out = out.about(about.clone());
    }
    if let Some(version) = cmd.get_version() {
        out = out.version(leak(version));
    }
    out
}

/// Runs one command; returns the process exit code.
pub fn run(cli: Cli) -> Result<i32> {
    let (storage, action, format) = match cli.command {
        Command::Config(c) => return config(c),
        Command::Ssh(a) => return ssh(a),
        Command::Ipsw(_) => return refused_command("ipsw", MACOS_ONLY),
        Command::Setup(_) => return refused_command("setup", MACOS_ONLY),
        Command::Sip(_) => return refused_command("sip", MACOS_ONLY),
        Command::Attach(a) => return attach(a),
        Command::Convert(_) => return refused_command("convert", NOT_YET),
        Command::Logs(_) => {
            return refused_command(
                "logs",
                "`lume serve` logs to its standard error, and GET /lume/logs gives its recent lines",
            );
        }
        Command::CheckUpdate(_) => {
            return refused_command("check-update", "update lume with your package manager");
        }
        Command::Update(_) => {
            return refused_command("update", "update lume with your package manager");
        }
        Command::DumpDocs(_) => {
            return refused_command("dump-docs", "the API is described at GET /openapi.json");
        }
        Command::Generate(g) => return generate(g.what).map(|()| 0),
        Command::NetKeeper(k) => return crate::network::handoff::keep(k),
        Command::Serve(a) => {
            if a.mcp {
                crate::mcp::serve_stdio(a.storage.storage)?;
                return Ok(0);
            }
            if a.token.is_some() {
                return Err(crate::api::auth::TokenError::OnCommandLine.into());
            }
            return crate::api::serve(crate::api::ServeOptions {
                host: a.host,
                port: a.port,
                token_env: std::env::var("LUME_API_TOKEN").ok(),
                token_file: a.token_file,
                socket: a.socket,
                api_group: a.api_group,
                handoff_group: a.handoff_group,
                storage: match a.storage.storage.as_deref() {
                    Some(spec) => Some(
                        location::resolve(&Settings::load()?, spec)?
                            .store
                            .root()
                            .to_path_buf(),
                    ),
                    None => None,
                },
            })
            .map(|()| 0);
        }
        Command::Network(n) => {
            let ctx = context(&n.storage, None)?;
            let NetworkTopCommand::Doctor { format } = n.command;
            let report = crate::network::doctor::run(&ctx);
            output::print_doctor(&report, format)?;
            return Ok(if report.ok() { 0 } else { 1 });
        }
        Command::Create(a) => {
            a.refused()?;
            (
                a.storage,
                Action::Create(Box::new(CreateSpec {
                    name: a.name,
                    os: a.os,
                    cpu: a.cpu,
                    memory: a.memory,
                    disk_size: a.disk_size,
                    display: a.display,
                    network: a.network,
                    mac: a.mac_address,
                    kernel: a.kernel,
                    initrd: a.initrd,
                    cmdline: a.cmdline,
                    image: a.image,
                    image_sha256: a.image_sha256,
                    progress: true,
                    publish: a.publish,
                    cloud_init: a.cloud_init,
                    no_cloud_init: a.no_cloud_init,
                    no_password: a.no_password,
                    url_destinations: crate::image::download::Destinations::Any,
                    policy: a.policy.policy().unwrap_or_default(),
                })),
                Format::Text,
            )
        }
        Command::Run(a) => {
            a.refused()?;
            (
                StorageArg {
                    storage: a.storage.storage.clone(),
                },
                Action::Run(RunSpec {
                    name: Some(run_target(&a)?),
                    network: a.network,
                    mounts: a.mount,
                    disks: a.disk,
                    usb_storage: a.usb_storage,
                    shared_dirs: a.shared_dir,
                    publish: a.publish,
                    detach: a.detach,
                    policy: a.policy.policy(),
                    ephemeral: a.ephemeral,
                    vnc_port: a.vnc_port.unwrap_or(0),
                    vnc_password: a.vnc_password.or_else(crate::hypervisor::vnc::env_password),
                    open_viewer: !a.no_display && a.display.as_deref() != Some("none"),
                    fork_supervisor: true,
                }),
                Format::Text,
            )
        }
        Command::Stop(a) => (
            a.storage,
            Action::Stop {
                name: a.name,
                timeout: crate::vm::actions::stop_timeout(a.timeout)?,
            },
            Format::Text,
        ),
        Command::Shutdown(a) => {
            let login = a.login()?;
            (
                a.storage,
                Action::Shutdown {
                    name: a.name,
                    timeout: login.timeout,
                    login,
                },
                Format::Text,
            )
        }
        Command::Restart(a) => {
            let login = a.power.login()?;
            (
                a.power.storage,
                Action::Restart {
                    name: a.power.name,
                    force: a.force,
                    login,
                },
                Format::Text,
            )
        }
        Command::Pull(a) => {
            let settings = Settings::load()?;
            let d = settings.registry()?;
            let (image, name) = crate::registry::pull::target(
                &a.image,
                a.registry.as_deref(),
                a.organization.as_deref(),
                a.name,
                &d,
            )?;
            (
                a.storage,
                Action::Pull(Box::new(crate::registry::pull::PullSpec {
                    image,
                    name,
                    username: a.username,
                    password: a.password,
                    force: a.force,
                    progress: true,
                    public_only: false,
                    api: false,
                })),
                Format::Text,
            )
        }
        Command::Push(a) => {
            refuse(a.single_layer, "--single-layer", NOT_YET)?;
            refuse(a.legacy, "--legacy", NOT_YET)?;
            refuse(a.reassemble, "--reassemble", NOT_YET)?;
            let settings = Settings::load()?;
            let d = settings.registry()?;
            let image = crate::registry::ImageRef::to_push(
                &a.image,
                a.registry.as_deref(),
                a.organization.as_deref(),
                &d,
            )?;
            (
                a.storage,
                Action::Push {
                    name: a.name,
                    spec: Box::new(crate::registry::push::PushSpec {
                        image,
                        additional_tags: a.additional_tags,
                        chunk_size_mb: a.chunk_size_mb,
                        dry_run: a.dry_run,
                        username: a.username,
                        password: a.password,
                        progress: true,
                        public_only: false,
                        api: false,
                    }),
                },
                Format::Text,
            )
        }
        Command::Images(a) => {
            let org = match a.organization {
                Some(o) => o,
                None => Settings::load()?.registry()?.organization,
            };
            (
                StorageArg { storage: None },
                Action::Images { organization: org },
                a.format,
            )
        }
        Command::Prune => (StorageArg { storage: None }, Action::Prune, Format::Text),
        Command::Ls(a) if a.storage.storage.is_none() => {
            // lume: every location, each VM with its location's name.
            let settings = Settings::load()?;
            let stores = location::all_stores(&settings)?;
            let vms =
                location::list_every(&settings, &crate::vm::Caller::current(), stores, &mut note)?;
            output::print(&Outcome::List(vms), a.format)?;
            return Ok(0);
        }
        Command::Ls(a) => {
            let outcome = execute(&context(&a.storage, None)?, Action::List, &mut note)?;
            match (&outcome, &a.storage.storage) {
                (Outcome::List(vms), Some(s)) if vms.is_empty() && a.format == Format::Text => {
                    outln!("No virtual machines found in storage '{s}'")
                }
                _ => output::print(&outcome, a.format)?,
            }
            return Ok(0);
        }
        Command::Get(a) => (a.storage, Action::Get { name: a.name }, a.format),
        Command::Snapshot(a) => {
            use crate::vm::actions::SnapshotOp;
            let (storage, name, op, format) = match a.command {
                SnapshotCommand::Create {
                    name,
                    snap,
                    memory,
                    storage,
                } => (
                    storage,
                    name,
                    SnapshotOp::Create { snap, memory },
                    Format::Text,
                ),
                SnapshotCommand::List {
                    name,
                    format,
                    storage,
                } => (storage, name, SnapshotOp::List, format),
                SnapshotCommand::Restore {
                    name,
                    snap,
                    storage,
                } => (storage, name, SnapshotOp::Restore { snap }, Format::Text),
                SnapshotCommand::Delete {
                    name,
                    snap,
                    storage,
                } => (storage, name, SnapshotOp::Delete { snap }, Format::Text),
                SnapshotCommand::Flatten { name, storage } => {
                    (storage, name, SnapshotOp::Flatten, Format::Text)
                }
            };
            (storage, Action::Snapshot { name, op }, format)
        }
        Command::Set(a) => {
            a.refused()?;
            let spec = SetSpec {
                name: a.name.clone(),
                cpu: a.cpu,
                memory: a.memory,
                disk_size: a.disk_size,
                network: a.network,
                display: a.display,
                policy: if a.clear_policy {
                    Some(Default::default())
                } else {
                    a.policy.policy()
                },
            };
            let Some(allow) = a.unsafe_host_loopback else {
                if spec.is_empty() {
                    // As lume: nothing to change is no error (the VM must exist).
                    execute(
                        &context(&a.storage, Some(&a.name))?,
                        Action::Set(spec),
                        &mut note,
                    )?;
                    outln!("VM '{}': nothing to change", a.name);
                    return Ok(0);
                }
                return finish(&a.storage, Action::Set(spec), Format::Text);
            };
            if !spec.is_empty() {
                execute(
                    &context(&a.storage, Some(&a.name))?,
                    Action::Set(spec),
                    &mut note,
                )?;
            }
            (
                a.storage,
                Action::SetHostLoopback {
                    name: a.name,
                    allow,
                },
                Format::Text,
            )
        }
        Command::Clone(a) => {
            let settings = Settings::load()?;
            // lume: the clone goes to --dest-storage, else the default
            // location; our --storage keeps both in one location.
            let dest = match a.dest_storage.as_deref().or(a.storage.storage.as_deref()) {
                Some(spec) => location::resolve(&settings, spec)?.store,
                None => location::default_store(&settings)?,
            };
            let source = StorageArg {
                storage: a.source_storage.or(a.storage.storage),
            };
            (
                source,
                Action::Clone {
                    source: a.name,
                    target: a.new_name,
                    dest: Some(dest),
                    snapshot: a.snapshot,
                },
                Format::Text,
            )
        }
        Command::Delete(a) => {
            // As lume: the VM is found first (a name that is nowhere is an
            // error, not a question); then the question on standard output,
            // the answer read from standard input whatever it is (`echo y |
            // lume delete x`); a yes stops a running VM, then deletes it.
            let ctx = context(&a.storage, Some(&a.name))?;
            ctx.store.open(&a.name)?;
            let confirmed = a.force || confirm_delete(&a.name);
            if !confirmed {
                outln!("Deletion cancelled");
                return Ok(0);
            }
            let action = Action::Delete {
                name: a.name,
                force: a.force,
                confirmed,
            };
            output::print(&execute(&ctx, action, &mut note)?, Format::Text)?;
            return Ok(0);
        }
    };
    finish(&storage, action, format)
}

/// `lume run NAME` or `lume run IMAGE:TAG`: an image reference whose VM
/// (named after the image, as `lume pull` names it) does not exist yet is
/// pulled first.
fn run_target(a: &RunArgs) -> Result<VmName> {
    if !a.name.contains(':') {
        return Ok(a.name.parse::<VmName>()?);
    }
    let settings = Settings::load()?;
    let d = settings.registry()?;
    let (image, name) = crate::registry::pull::target(
        &a.name,
        a.registry.as_deref(),
        a.organization.as_deref(),
        None,
        &d,
    )
    .map_err(|e| match e {
        // `run` takes no VM name: the hint says how to give one.
        crate::registry::RegistryError::NameTooLong { name, image, .. } => {
            crate::registry::RegistryError::NameTooLong {
                name,
                image,
                run: true,
                api: false,
            }
        }
        e => e,
    })?;
    let ctx = context(&a.storage, Some(&name))?;
    if ctx.store.vm(&name).config_path().exists() {
        return Ok(name);
    }
    note(&format!("VM '{name}' does not exist: pulling {image}"));
    let action = Action::Pull(Box::new(crate::registry::pull::PullSpec {
        image,
        name: name.clone(),
        username: None,
        password: None,
        force: false,
        progress: true,
        public_only: false,
        api: false,
    }));
    // No interrupt handler here: the foreground run that follows turns
    // Ctrl-C into a power-off. A pull cut short leaves a work directory
    // that is never listed and is collected by the next create or pull.
    execute(&ctx, action, &mut note)?;
    Ok(name)
}

/// `lume ssh`: runs the system's ssh client with lume's key, the VM's own
/// known_hosts file and the VM's address (see guest::ssh).
fn ssh(a: SshArgs) -> Result<i32> {
    use crate::guest::ssh::{self as gssh, SshError, SshRequest};
    use std::os::unix::process::CommandExt;
    let ctx = context(&a.storage, Some(&a.name))?;
    let vm = ctx.store.open(&a.name)?;
    ctx.store.check_private(Some(&vm))?;
    let mut said = !std::io::stderr().is_terminal();
    let to = gssh::wait_ready(&vm, a.name.as_str(), a.timeout, &mut |line| {
        if !said {
            eprintln!("{line}");
            said = true;
        }
    })?;
    let key = crate::guest::keys::ensure(ctx.store.root())?;
    let interactive = a.command.is_empty();
    let req = SshRequest {
        vm_name: a.name.to_string(),
        vm_dir: vm.dir.clone(),
        user: a.user,
        password: a.password,
        key: Some(key.private),
        command: a.command,
        tty: interactive && std::io::stdin().is_terminal(),
        connect_timeout: std::time::Duration::from_secs(match a.timeout {
            0 => 30,
            t => t.clamp(1, 30),
        }),
    };
    let mut cmd = gssh::command(&req, &to);
    if interactive || a.timeout == 0 {
        let e = cmd.exec();
        return Err(match e.kind() {
            std::io::ErrorKind::NotFound => SshError::NoClient,
            _ => SshError::Spawn(e),
        }
        .into());
    }
    Ok(gssh::run(cmd, std::time::Duration::from_secs(a.timeout))?)
}

/// Ctrl-C, SIGTERM or SIGHUP while `create --image` imports: the half-made
/// VM's hidden work directory is removed at once and lume exits (without
/// this, the next create would collect it). A VM already published keeps
/// its name: only this process's `.creating-NAME-PID-…` directory goes.
/// `said` is what lume prints then.
fn remove_work_on_interrupt(root: PathBuf, name: &crate::vm::VmName, said: String) {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(s);
    }
    // Blocked here, so every thread started from now on has them blocked
    // and only the waiting thread takes them (children get a clean mask).
    if set.thread_block().is_err() {
        return;
    }
    let prefix = format!(".creating-{name}-{}-", std::process::id());
    std::thread::spawn(move || {
        let sig = set.wait().unwrap_or(Signal::SIGINT);
        if let Ok(entries) = std::fs::read_dir(&root) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        // A progress bar may be drawn on the current line: clear it first.
        if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            eprint!("\r\x1b[2K");
        }
        eprintln!("Interrupted: {said}");
        std::process::exit(128 + sig as i32);
    });
}

/// The existing VM an action acts on, whose location is searched for when
/// no `--storage` is given (create goes to the default location).
fn action_vm(action: &Action) -> Option<&VmName> {
    match action {
        Action::Create(_)
        | Action::List
        | Action::Pull(_)
        | Action::Images { .. }
        | Action::Prune => None,
        Action::Push { name, .. } => Some(name),
        Action::Run(r) => r.name.as_ref(),
        Action::Stop { name, .. }
        | Action::Shutdown { name, .. }
        | Action::Restart { name, .. }
        | Action::Get { name }
        | Action::SetHostLoopback { name, .. }
        | Action::Delete { name, .. }
        | Action::Snapshot { name, .. } => Some(name),
        Action::Set(spec) => Some(&spec.name),
        Action::Clone { source, .. } => Some(source),
    }
}

/// Executes `action` and prints its outcome; returns the exit code.
fn finish(storage: &StorageArg, action: Action, format: Format) -> Result<i32> {
    let ctx = context(storage, action_vm(&action))?;
    if let Action::Create(spec) = &action
        && spec.image.is_some()
    {
        remove_work_on_interrupt(
            ctx.store.root().to_path_buf(),
            &spec.name,
            "the VM was not created and nothing of it is left".into(),
        );
    }
    if let Action::Pull(spec) = &action {
        // What was downloaded stays in the cache whatever `cachingEnabled`
        // says (only a finished pull empties it), so the next pull resumes.
        let vm = if spec.force && ctx.store.vm(&spec.name).config_path().exists() {
            format!("VM '{}' was not replaced (it is as it was)", spec.name)
        } else {
            "the VM was not created and nothing of it is left".to_string()
        };
        remove_work_on_interrupt(
            ctx.store.root().to_path_buf(),
            &spec.name,
            format!(
                "{vm}; the blobs downloaded so far stay in the image cache, and the next pull of {} resumes from them",
                spec.image.short()
            ),
        );
    }
    let outcome = match execute(&ctx, action, &mut note) {
        Ok(o) => o,
        Err(crate::vm::VmError::Run(e))
            if std::env::var_os(crate::hypervisor::supervisor::START_LOG_ENV).is_some()
                && crate::hypervisor::supervisor::exit_status_for(&e).is_some() =>
        {
            // A detached supervisor that lost the VM: its parent reads the status.
            eprintln!("Error: {e}");
            return Ok(crate::hypervisor::supervisor::exit_status_for(&e).unwrap_or(1));
        }
        Err(e) => return Err(e.into()),
    };
    let code = match &outcome {
        Outcome::Exited(status) => status.code().unwrap_or(0),
        _ => 0,
    };
    output::print(&outcome, format)?;
    Ok(code)
}

fn config(c: ConfigArgs) -> Result<i32> {
    match c.command.unwrap_or(ConfigCommand::Get { key: None }) {
        ConfigCommand::Get { key: Some(key) } => {
            let s = Settings::load()?;
            outln!("{}", config_value(&s, &key)?);
            Ok(0)
        }
        ConfigCommand::Get { key: None } => {
            let s = Settings::load()?;
            out!("{}", lume_settings_text(&s)?);
            outln!();
            outln!("lume for Linux ({}):", s.file().display());
            outln!("accelerator: {}", format_accel(&s)?);
            for (k, v) in s.as_mapping() {
                let key = k.as_str().unwrap_or_default();
                if key != "accelerator" && !crate::settings::LUME_KEYS.contains(&key) {
                    out!(
                        "{}",
                        serde_yaml_ng::to_string(&serde_yaml_ng::Mapping::from_iter([(
                            k.clone(),
                            v.clone()
                        )]))?
                    );
                }
            }
            outln!("telemetry: none is ever sent (telemetryEnabled is stored only)");
            Ok(0)
        }
        ConfigCommand::Storage { command } => config_storage(command),
        ConfigCommand::Cache { command } => Settings::update(|s: &mut Settings| -> Result<i32> {
            match command.unwrap_or(CacheCommand::Status) {
                CacheCommand::Status => {
                    outln!("Caching enabled: {}", s.caching_enabled()?);
                    outln!("Cache directory: {}", cache_dir_text(s)?);
                }
                CacheCommand::Dir { path: None } | CacheCommand::Get => {
                    outln!("Cache directory: {}", cache_dir_text(s)?);
                }
                CacheCommand::Dir { path: Some(path) } | CacheCommand::Set { path } => {
                    let text = location_path_text(&path);
                    prepare_cache_directory(&text)?;
                    s.set_from_command_line("cacheDirectory", &text)?;
                    outln!("Cache directory set to: {text}");
                }
                CacheCommand::Enable => {
                    s.set("cachingEnabled", serde_yaml_ng::Value::Bool(true))?;
                    outln!("Caching enabled");
                }
                CacheCommand::Disable => {
                    s.set("cachingEnabled", serde_yaml_ng::Value::Bool(false))?;
                    outln!("Caching disabled");
                }
            }
            Ok(0)
        }),
        ConfigCommand::Telemetry { command } => {
            Settings::update(|s: &mut Settings| -> Result<i32> {
                match command.unwrap_or(TelemetryCommand::Status) {
                    TelemetryCommand::Status => {
                        let on = s.telemetry_enabled()?;
                        outln!("Telemetry enabled: {on}");
                        outln!("Effective source: config");
                        outln!("Persisted preference: {on}");
                        outln!("Installation ID: not created");
                        outln!();
                        outln!(
                            "lume for Linux sends no telemetry: this preference is only stored in config.yaml."
                        );
                    }
                    TelemetryCommand::Enable => {
                        s.set("telemetryEnabled", serde_yaml_ng::Value::Bool(true))?;
                        outln!("Telemetry enabled");
                        outln!("(stored only: lume for Linux sends no telemetry)");
                    }
                    TelemetryCommand::Disable => {
                        s.set("telemetryEnabled", serde_yaml_ng::Value::Bool(false))?;
                        outln!("Telemetry disabled");
                    }
                    TelemetryCommand::ResetId => {
                        outln!("Telemetry installation ID reset");
                        outln!("The enabled/disabled preference was preserved.");
                        outln!("(lume for Linux keeps no installation ID)");
                    }
                }
                Ok(0)
            })
        }
        ConfigCommand::Registry { command } => {
            Settings::update(|s: &mut Settings| -> Result<i32> {
                match command.unwrap_or(RegistryCommand::Status) {
                    RegistryCommand::Status => {
                        let r = s.registry()?;
                        outln!("Registry type: {}", s.registry_type()?);
                        outln!();
                        outln!("GHCR configuration:");
                        outln!("  Registry: {}", r.registry);
                        outln!("  Organization: {}", r.organization);
                    }
                    RegistryCommand::Type { kind: None } => {
                        outln!("Registry type: {}", s.registry_type()?);
                    }
                    RegistryCommand::Type { kind: Some(kind) } => {
                        s.set_registry(Some(&kind), None, None)?;
                        outln!("Registry type set to: {kind}");
                    }
                    RegistryCommand::Ghcr {
                        registry: None,
                        organization: None,
                    } => {
                        let r = s.registry()?;
                        outln!("GHCR configuration:");
                        outln!("  Registry: {}", r.registry);
                        outln!("  Organization: {}", r.organization);
                    }
                    RegistryCommand::Ghcr {
                        registry,
                        organization,
                    } => {
                        s.set_registry(None, registry.as_deref(), organization.as_deref())?;
                        let r = s.registry()?;
                        outln!("GHCR configuration updated:");
                        outln!("  Registry: {}", r.registry);
                        outln!("  Organization: {}", r.organization);
                    }
                    // With or without options: there is no GCS type to show.
                    RegistryCommand::Gcs { .. } => {
                        return Err(
                            crate::settings::SettingsError::RegistryType("gcs".into()).into()
                        );
                    }
                }
                Ok(0)
            })
        }
        ConfigCommand::Network {
            command: NetworkCommand::Interfaces { format },
        } => {
            let list = crate::network::interfaces::discover()?;
            output::print_interfaces(&list, format)?;
            Ok(0)
        }
        ConfigCommand::Set { key, value } => Settings::update(|s: &mut Settings| -> Result<i32> {
            if !crate::settings::KNOWN_KEYS.contains(&key.as_str()) {
                let hint = match crate::settings::closest_known_key(&key) {
                    Some(k) => format!("did you mean {k}? (`lume config unset {key}` removes it)"),
                    None => format!("known keys: {}", crate::settings::KNOWN_KEYS.join(", ")),
                };
                eprintln!(
                    "Warning: '{key}' is not a key lume reads; stored anyway (config.yaml keeps keys of other versions): {hint}"
                );
            }
            if key == "cacheDirectory" {
                prepare_cache_directory(&value).with_context(|| format!("Cannot set '{key}'"))?;
            } else if key == "homeDirectory" {
                location::prepare_directory(&value)
                    .with_context(|| format!("Cannot set '{key}'"))?;
            }
            let before = location::default_store(s).ok();
            s.set_from_command_line(&key, &value)
                .with_context(|| format!("Cannot set '{key}'"))?;
            outln!("Set {key} in {}", s.file().display());
            if let Some(w) = before.and_then(|b| location::running_left_behind(&b, s)) {
                eprintln!("{w}");
            }
            Ok(0)
        }),
        ConfigCommand::Unset { key } => Settings::update(|s: &mut Settings| -> Result<i32> {
            if s.unset(&key)
                .with_context(|| format!("Cannot remove '{key}'"))?
            {
                outln!("Removed {key} from {}", s.file().display());
            } else {
                outln!("{key} is not set in {}", s.file().display());
            }
            Ok(0)
        }),
    }
}

/// What lume's `config get` prints (Config.swift), line for line.
fn lume_settings_text(s: &Settings) -> Result<String> {
    use std::fmt::Write as _;
    let mut out = String::new();
    let default = s.default_location_name()?;
    let all = s.locations()?;
    let default_path = all
        .iter()
        .find(|l| l.name == default)
        .map(|l| l.path.clone())
        .unwrap_or_else(|| "not set".into());
    let r = s.registry()?;
    writeln!(out, "Default VM storage: {default} ({default_path})")?;
    writeln!(out, "Cache directory: {}", cache_dir_text(s)?)?;
    writeln!(out, "Caching enabled: {}", s.caching_enabled()?)?;
    writeln!(out, "Telemetry enabled: {}", s.telemetry_enabled()?)?;
    writeln!(out, "Registry type: {}", s.registry_type()?)?;
    writeln!(out, "Registry: {}/{}", r.registry, r.organization)?;
    writeln!(out, "\nConfigured VM storage locations:")?;
    out.push_str(&locations_text(s)?);
    Ok(out)
}

/// lume's location lines: sorted by name, the default marked.
fn locations_text(s: &Settings) -> Result<String> {
    let default = s.default_location_name()?;
    let mut all = s.locations()?;
    all.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(all
        .iter()
        .map(|l| {
            let mark = if l.name == default { " (default)" } else { "" };
            format!("  - {}: {}{mark}\n", l.name, l.path)
        })
        .collect())
}

/// A new `cacheDirectory`, checked and made as a VM location is, a
/// refusal worded for the cache.
fn prepare_cache_directory(text: &str) -> Result<()> {
    Ok(crate::registry::cache::prepare_directory(text)?)
}

/// `cacheDirectory` as written in config.yaml (lume prints it unexpanded).
fn cache_dir_text(s: &Settings) -> Result<String> {
    Ok(s.get_str("cacheDirectory")?
        .unwrap_or_else(|| crate::settings::DEFAULT_CACHE_DIRECTORY.into()))
}

/// A path given on the command line as config.yaml keeps it: `~/…` and
/// absolute paths as written, a relative path made absolute.
fn location_path_text(path: &std::path::Path) -> String {
    let text = path.display().to_string();
    if text.starts_with("~/") || text == "~" || path.is_absolute() {
        text
    } else {
        std::path::absolute(path)
            .unwrap_or_else(|_| path.to_path_buf())
            .display()
            .to_string()
    }
}

/// `lume config storage …`, printed as lume prints it.
fn config_storage(command: StorageCommand) -> Result<i32> {
    Settings::update(|s: &mut Settings| -> Result<i32> {
        match command {
            StorageCommand::Add { name, path } => {
                let text = location_path_text(&path);
                // Name first: a refused name makes no directory.
                s.check_new_location_name(&name)?;
                location::prepare_directory(&text)?;
                s.add_location(&name, &text)?;
                outln!("Added VM storage location: {name} at {text}");
            }
            StorageCommand::Remove { name } => {
                s.remove_location(&name)?;
                outln!("Removed VM storage location: {name}");
            }
            StorageCommand::List => {
                outln!("VM Storage Locations:");
                out!("{}", locations_text(s)?);
            }
            StorageCommand::Default { name } => {
                let before = location::default_store(s).ok();
                s.set_default_location(&name)?;
                outln!("Set default VM storage location to: {name}");
                if let Some(w) = before.and_then(|b| location::running_left_behind(&b, s)) {
                    eprintln!("{w}");
                }
            }
        }
        Ok(0)
    })
}

/// What `lume config get KEY` prints: the effective accelerator and VM
/// location, else the value in the file, else a known key's default.
fn config_value(s: &Settings, key: &str) -> Result<String> {
    match key {
        "accelerator" => return format_accel(s),
        "homeDirectory" => return Ok(s.default_location()?.root().display().to_string()),
        "defaultLocationName" => return Ok(s.default_location_name()?),
        "cachingEnabled" => return Ok(s.caching_enabled()?.to_string()),
        "telemetryEnabled" => return Ok(s.telemetry_enabled()?.to_string()),
        "cacheDirectory" => return cache_dir_text(s),
        "vmLocations" => {
            return Ok(serde_yaml_ng::to_string(&s.locations()?)?
                .trim_end()
                .to_string());
        }
        "registry" => {
            let r = s.registry()?;
            return Ok(format!(
                "type: {}\nghcr:\n  registry: {}\n  organization: {}",
                s.registry_type()?,
                r.registry,
                r.organization
            ));
        }
        _ => {}
    }
    match s.as_mapping().get(key) {
        Some(serde_yaml_ng::Value::String(v)) => Ok(v.clone()),
        Some(v) if !v.is_null() => Ok(serde_yaml_ng::to_string(v)?.trim_end().to_string()),
        // This machine's unique local prefixes (none without IPv6).
        _ if key == "natSubnet6" || key == "hostSubnet6" => {
            Ok(if crate::network::prefix6::kernel_has_ipv6() {
                crate::network::prefix6::Prefix6::unique_local_here(u16::from(key == "hostSubnet6"))
                    .to_string()
            } else {
                "none".to_string()
            })
        }
        _ => match crate::settings::default_value(key) {
            Some(d) => Ok(d.to_string()),
            None => Err(crate::settings::SettingsError::NotSet {
                key: key.into(),
                path: s.file().to_path_buf(),
            }
            .into()),
        },
    }
}

fn format_accel(s: &Settings) -> Result<String> {
    Ok(match s.accelerator()? {
        crate::hypervisor::accel::AccelChoice::Auto => "auto".into(),
        crate::hypervisor::accel::AccelChoice::Kvm => "kvm".into(),
        crate::hypervisor::accel::AccelChoice::Tcg => "tcg".into(),
    })
}
