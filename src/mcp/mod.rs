//! `lume serve --mcp`: lume's MCP server (Model Context Protocol) over
//! stdio, on the official Rust SDK (rmcp). JSON-RPC on standard input and
//! output only; every log line goes to standard error.
//!
//! The third door onto the same actions as the CLI and the REST API: every
//! tool builds a [`vm::Action`] and runs it with [`vm::execute`] on a
//! blocking thread, for the user who runs the server (a stdio server is that
//! user's own process: [`Caller::current`]). A failure is a tool result with
//! `isError: true` and the message the CLI prints, never a protocol error.
//!
//! Tools, argument names, prompts and resources follow upstream lume's
//! `MCPServer.swift`; `lume_network_interfaces`, `lume_network_doctor`,
//! `lume_pull` and `lume_push` are ours (upstream's server has no registry
//! tools).

mod agent;
mod guide;

use std::path::PathBuf;
use std::time::Duration;

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::tool::ToolCallContext;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, GetPromptRequestParams,
    GetPromptResponse, Implementation, ListPromptsResult, ListResourcesResult,
    PaginatedRequestParams, ProgressNotificationParam, ReadResourceRequestParams,
    ReadResourceResponse, ServerCapabilities, ServerConfig,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer, ServerHandler, ServiceExt, schemars, tool, tool_router};
use serde::Deserialize;

use crate::compat::{MACOS_ONLY, NOT_YET};
use crate::guest::ssh::{self as gssh, SshError, SshRequest};
use crate::settings::Settings;
use crate::vm::location::{self, LocationError};
use crate::vm::{self, Action, Caller, Context, CreateSpec, Outcome, RunSpec, SetSpec, VmName};

/// Why a tool call failed: the CLI's errors, and the arguments the CLI's
/// parser would have refused.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error(transparent)]
    Vm(#[from] vm::VmError),
    #[error(transparent)]
    Location(#[from] LocationError),
    #[error(transparent)]
    Store(#[from] crate::vm::store::StoreError),
    #[error(transparent)]
    UnsafeDir(#[from] crate::vm::store::UnsafeDir),
    #[error(transparent)]
    Settings(#[from] crate::settings::SettingsError),
    #[error(transparent)]
    Ssh(#[from] SshError),
    #[error(transparent)]
    Keys(#[from] crate::guest::keys::KeyError),
    #[error(transparent)]
    Interfaces(#[from] crate::network::interfaces::InterfaceError),
    #[error(transparent)]
    Publish(#[from] crate::network::publish::PublishError),
    #[error(transparent)]
    Policy(#[from] crate::network::policy::PolicyError),
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    /// A value the CLI's parser would refuse: `why` is that parser's
    /// sentence, which names the value already.
    #[error("Argument {argument}: {why}")]
    Argument { argument: &'static str, why: String },
    #[error("Invalid arguments for {tool}: {why}; see the tool's input schema (tools/list)")]
    Arguments { tool: String, why: String },
    #[error("Argument {argument} is not supported by lume on Linux ({why}): leave it out")]
    Unsupported {
        argument: &'static str,
        why: &'static str,
    },
    #[error(
        "Argument {argument} '{value}' is not an absolute path: give the full path (or one starting with ~/), as the server's working directory is not yours"
    )]
    RelativePath {
        argument: &'static str,
        value: String,
    },
    #[error(
        "The server is busy: {HEAVY_CALLS} calls that run commands or VMs are under way and none ended within {} s; try again when one has finished", BUSY_WAIT.as_secs()
    )]
    Busy,
    #[error("A timeout of {0} seconds is too long: give at most {max} seconds", max = vm::actions::MAX_TIMEOUT_SECS)]
    TimeoutTooLong(u64),
    #[error(
        "The tool stopped unexpectedly ({0}); the server goes on: try again, or run the same command with the lume CLI to see more"
    )]
    Crashed(String),
}

/// The text of a failed tool call: what the CLI prints (`Error: ` and the
/// error's chain), in the tools' words where the CLI's names a command or
/// a flag ([`agent::agent_message`]).
fn error_text(e: &ToolError) -> String {
    match agent::agent_message(e) {
        Some(m) => format!("Error: {m}"),
        None => format!("Error: {}", crate::error_chain(e)),
    }
}

fn fail(e: ToolError) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(error_text(&e))])
}

fn ok_text(text: impl Into<String>) -> CallToolResult {
    CallToolResult::success(vec![ContentBlock::text(text.into())])
}

fn json_text(v: &impl serde::Serialize) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

fn parse<T: std::str::FromStr>(argument: &'static str, value: &str) -> Result<T, ToolError>
where
    T::Err: std::fmt::Display,
{
    value.parse().map_err(|e: T::Err| ToolError::Argument {
        argument,
        why: e.to_string(),
    })
}

fn name(value: &str) -> Result<VmName, ToolError> {
    parse("name", value)
}

fn size(argument: &'static str, value: &str) -> Result<u64, ToolError> {
    crate::vm::size::parse_size(value).map_err(|e| ToolError::Argument {
        argument,
        why: e.to_string(),
    })
}

/// A host path named by the agent: absolute, or `~/…` in the home of the
/// user running the server. Relative paths are refused: the server's
/// working directory is whatever the agent host chose.
fn host_path(argument: &'static str, value: &str) -> Result<PathBuf, ToolError> {
    if let Some(rest) = value.strip_prefix("~/")
        && let Some(home) = std::env::var_os("HOME")
    {
        return Ok(PathBuf::from(home).join(rest));
    }
    let p = PathBuf::from(value);
    if p.is_absolute() {
        Ok(p)
    } else {
        Err(ToolError::RelativePath {
            argument,
            value: value.to_string(),
        })
    }
}

fn timeout(seconds: Option<u64>, default: u64) -> Result<u64, ToolError> {
    match seconds.unwrap_or(default) {
        s if s > vm::actions::MAX_TIMEOUT_SECS => Err(ToolError::TimeoutTooLong(s)),
        s => Ok(s),
    }
}

/// The context of a tool call, chosen as the CLI chooses it: `storage` (a
/// location name or a path), else the location holding `vm`, else the
/// default location. A note about the choice goes to the log.
fn context(storage: Option<&str>, vm: Option<&VmName>) -> Result<Context, ToolError> {
    let settings = Settings::load()?;
    let storage = storage.filter(|s| !s.trim().is_empty());
    let resolved = match (vm, storage) {
        (Some(name), _) => location::store_for_vm(&settings, storage, name)?,
        (None, Some(spec)) => location::resolve(&settings, spec)?,
        (None, None) => location::Resolved {
            store: location::default_store(&settings)?,
            note: None,
        },
    };
    if let Some(n) = &resolved.note {
        log(n);
    }
    Ok(Context {
        store: resolved.store,
        settings,
        caller: Caller::current(),
        member: false,
    })
}

fn log(line: &str) {
    eprintln!("{line}");
}

/// Runs one action as the CLI does; the notes meant for a person go to the
/// log and are returned with the outcome.
fn execute(ctx: &Context, action: Action) -> Result<(Outcome, Vec<String>), ToolError> {
    execute_noted(ctx, action, &mut |_| {})
}

/// One action on one VM, as the CLI runs it: the VM's name checked, its
/// context found ([`context`]: `storage`, else the location holding it),
/// then the action `make` builds from the name run ([`execute_noted`]).
fn on_vm(
    storage: Option<&str>,
    vm: &str,
    note: &mut dyn FnMut(&str),
    make: impl FnOnce(VmName) -> Result<Action, ToolError>,
) -> Result<(Outcome, Vec<String>), ToolError> {
    let name = name(vm)?;
    let ctx = context(storage, Some(&name))?;
    execute_noted(&ctx, make(name)?, note)
}

/// [`execute`], each note also given to `note` as it comes (progress).
fn execute_noted(
    ctx: &Context,
    action: Action,
    note: &mut dyn FnMut(&str),
) -> Result<(Outcome, Vec<String>), ToolError> {
    let mut notes = Vec::new();
    let outcome = vm::execute(ctx, action, &mut |line: &str| {
        log(line);
        note(line);
        notes.push(line.to_string());
    })?;
    Ok((outcome, notes))
}

/// The CLI's line for an outcome, after the notes it printed on the way.
fn outcome_text(outcome: &Outcome, notes: &[String]) -> String {
    let mut lines: Vec<String> = notes.to_vec();
    if let Some(line) = crate::cli::output::outcome_line(outcome) {
        lines.push(line);
    }
    lines.join("\n")
}

/// Runs blocking work off the async runtime; a panic becomes an error result.
async fn blocking(
    f: impl FnOnce() -> Result<CallToolResult, ToolError> + Send + 'static,
) -> CallToolResult {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => fail(e),
        Err(e) => fail(ToolError::Crashed(e.to_string())),
    }
}

/// [`blocking`] for a long call: the lines `f` gives its `note` go to the
/// client as progress notifications (with the line as message) when the
/// call asked for them with a progress token.
async fn noted(
    rc: RequestContext<RoleServer>,
    f: impl FnOnce(&mut dyn FnMut(&str)) -> Result<CallToolResult, ToolError> + Send + 'static,
) -> CallToolResult {
    noted_watching(rc, None, f).await
}

/// What a watched call has done so far: bytes done and in all.
type Watch = Box<dyn Fn() -> Option<(u64, u64)> + Send>;

/// How often a watched call's progress is looked at.
const WATCH_EVERY: Duration = Duration::from_millis(500);

/// [`noted`], and with `watch` also the bytes done (as `progress`, with
/// `total`) each time they grew, looked at every [`WATCH_EVERY`]. Progress
/// only ever increases, as MCP wants: a note counts one more than the last.
async fn noted_watching(
    rc: RequestContext<RoleServer>,
    watch: Option<Watch>,
    f: impl FnOnce(&mut dyn FnMut(&str)) -> Result<CallToolResult, ToolError> + Send + 'static,
) -> CallToolResult {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let forward = rc.meta.get_progress_token().map(|token| {
        let peer = rc.peer.clone();
        tokio::spawn(async move {
            let mut last = 0.0f64;
            let mut tick = tokio::time::interval(WATCH_EVERY);
            loop {
                let p = tokio::select! {
                    line = rx.recv() => match line {
                        Some(line) => {
                            last += 1.0;
                            ProgressNotificationParam::new(token.clone(), last).with_message(line)
                        }
                        None => break,
                    },
                    _ = tick.tick(), if watch.is_some() => {
                        let Some((done, total)) = watch.as_ref().and_then(|w| w()) else {
                            continue;
                        };
                        if (done as f64) <= last {
                            continue;
                        }
                        last = done as f64;
                        ProgressNotificationParam::new(token.clone(), last)
                            .with_total(total as f64)
                            .with_message(format!(
                                "Downloaded {} of {}",
                                indicatif::BinaryBytes(done),
                                indicatif::BinaryBytes(total)
                            ))
                    }
                };
                // A client that has gone away gets no more; the call goes on.
                if peer.notify_progress(p).await.is_err() {
                    break;
                }
            }
        })
    });
    let result = blocking(move || {
        let mut note = |line: &str| {
            let _ = tx.send(line.to_string());
        };
        f(&mut note)
    })
    .await;
    if let Some(f) = forward {
        let _ = f.await;
    }
    result
}

/// The bytes a pull of `name` into `root` by this process has fetched, and
/// its total, from its work directory's progress file.
fn pull_progress(root: &std::path::Path, name: &str) -> Option<(u64, u64)> {
    let prefix = format!(".creating-{name}-{}-", std::process::id());
    let dir = std::fs::read_dir(root)
        .ok()?
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with(&prefix))?
        .path();
    let v: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.join(crate::registry::pull::PROGRESS_FILE)).ok()?,
    )
    .ok()?;
    Some((v.get("downloaded")?.as_u64()?, v.get("total")?.as_u64()?))
}

/// How many `lume_exec`, `lume_create_vm`, `lume_run_vm`, `lume_pull` and
/// `lume_push` calls run at
/// once (each holds threads, an ssh or a download); more wait their turn.
pub const HEAVY_CALLS: usize = 4;

/// How long a call waits for its turn before it fails with [`ToolError::Busy`].
const BUSY_WAIT: Duration = Duration::from_secs(120);

/// Set when the session ends (the client closed it, or SIGINT/SIGTERM):
/// running commands are stopped and the process exits.
static SHUTDOWN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn shutting_down() -> bool {
    SHUTDOWN.load(std::sync::atomic::Ordering::SeqCst)
}

/// VM work directories (`.creating-…`) of creates under way, by store root
/// and VM name: removed when the session ends before they finish.
static CREATING: std::sync::Mutex<Vec<(PathBuf, String)>> = std::sync::Mutex::new(Vec::new());

/// Runs `f` with `work` (a storage root and VM name) in [`CREATING`], so
/// that a session ending meanwhile removes what it left unfinished.
fn while_creating<T>(work: (PathBuf, String), f: impl FnOnce() -> T) -> T {
    if let Ok(mut l) = CREATING.lock() {
        l.push(work.clone());
    }
    let done = f();
    if let Ok(mut l) = CREATING.lock()
        && let Some(i) = l.iter().position(|w| *w == work)
    {
        l.remove(i);
    }
    done
}

/// Removes this process's `.creating-NAME-PID-…` directories of the
/// creates under way, as the CLI does on Ctrl-C.
fn remove_creating_work() {
    let list = CREATING.lock().map(|l| l.clone()).unwrap_or_default();
    for (root, name) in list {
        let prefix = format!(".creating-{name}-{}-", std::process::id());
        if let Ok(entries) = std::fs::read_dir(&root) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }
}

/// `lume_create_vm`'s `no_password`: true unless the call says false (the
/// agent uses lume's key; a password lets local users into the guest).
fn no_password(given: Option<bool>) -> bool {
    given.unwrap_or(true)
}

/// A turn among [`HEAVY_CALLS`].
async fn turn(
    busy: &std::sync::Arc<tokio::sync::Semaphore>,
) -> Result<tokio::sync::OwnedSemaphorePermit, CallToolResult> {
    match tokio::time::timeout(BUSY_WAIT, busy.clone().acquire_owned()).await {
        Ok(Ok(p)) => Ok(p),
        _ => Err(fail(ToolError::Busy)),
    }
}

/// Output of a guest command made fit for JSON: control characters other
/// than newline, tab and carriage return become U+FFFD (a NUL would take six
/// bytes as `\u0000`), and the text is cut at [`gssh::CAPTURE_LIMIT`] bytes
/// (invalid UTF-8 grew to three bytes a byte). Returns whether it was cut.
fn printable(text: &str) -> (String, bool) {
    let mut out = String::with_capacity(text.len().min(gssh::CAPTURE_LIMIT));
    for c in text.chars() {
        let c = if c.is_control() && !matches!(c, '\n' | '\t' | '\r') {
            '\u{FFFD}'
        } else {
            c
        };
        if out.len() + c.len_utf8() > gssh::CAPTURE_LIMIT {
            return (out, true);
        }
        out.push(c);
    }
    (out, false)
}

/// How much longer than `lume_exec`'s timeout the guest lets its command run.
const REMOTE_GRACE: u64 = 2;

/// How often `lume_exec` reports that it still waits for SSH.
const WAIT_REPORT: Duration = Duration::from_secs(5);

// ---- arguments (their doc comments are the schema's descriptions) ----

/// Arguments of `lume_list_vms`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct ListArgs {
    /// Optional storage location name or path: only the VMs there (default: every location)
    pub storage: Option<String>,
}

/// A VM named, in an optional storage location.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct VmArgs {
    /// Name of the VM
    pub name: String,
    /// Optional storage location name or path (default: the location holding the VM)
    pub storage: Option<String>,
}

/// Arguments of `lume_create_vm`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct CreateArgs {
    /// Name for the new VM: letters, digits, '.', '_' and '-'
    pub name: String,
    /// Disk image to import as the VM's disk: an absolute host path or an http(s) URL; qcow2, raw or xz-compressed raw (a Debian/Ubuntu genericcloud image gets user `lume` through cloud-init). Without image or kernel the disk is empty
    pub image: Option<String>,
    /// Expected SHA-256 of the image file (64 hex digits)
    pub image_sha256: Option<String>,
    /// Number of virtual CPUs (default: 2)
    #[schemars(range(min = 1))]
    pub cpu: Option<u32>,
    /// Memory size, e.g. '2GB' (default: 2GB)
    pub memory: Option<String>,
    /// Disk size, e.g. '20GB' (default: 20GB; an imported image's disk grows to it)
    pub disk_size: Option<String>,
    #[doc = concat!("Network mode: ", crate::network_modes!(), "; user needs no privilege, the others need root (default: nat when the server runs as root, user when it does not)")]
    pub network: Option<String>,
    /// Ports to publish, each [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|/udp] (nat and user modes)
    pub publish: Option<Vec<String>>,
    /// Allow outbound only to these, each CIDR[:PORT|:LOW-HIGH][/tcp|/udp]; all else is denied except DHCP and DNS to lume (nat, host and bridged modes)
    pub allow_out: Option<Vec<String>>,
    /// Deny outbound to these, each CIDR[:PORT|:LOW-HIGH][/tcp|/udp] (nat, host and bridged modes)
    pub deny_out: Option<Vec<String>>,
    /// No traffic to the host, its networks, private ranges or other VMs (nat, host and bridged modes)
    pub isolate: Option<bool>,
    /// Kernel for direct kernel boot (absolute host path)
    pub kernel: Option<String>,
    /// Initrd for direct kernel boot (absolute host path; needs kernel)
    pub initrd: Option<String>,
    /// Kernel command line for direct kernel boot (needs kernel)
    pub cmdline: Option<String>,
    /// Your own cloud-init user-data file (absolute host path), added after lume's
    pub cloud_init: Option<String>,
    /// User lume gets no password: SSH with lume's key only, as lume_exec uses (default: true; false gives user lume the password 'lume', which any local user who reaches the guest's SSH port can use to become root in the guest)
    pub no_password: Option<bool>,
    /// Give the VM no cloud-init seed at all (default: false)
    pub no_cloud_init: Option<bool>,
    /// Guest OS: linux (the only one on a Linux host)
    pub os: Option<String>,
    /// Optional storage location name or path (default: the default location)
    pub storage: Option<String>,
    /// Refused: macOS restore images need an Apple host
    pub ipsw: Option<String>,
    /// Refused: unattended macOS setup needs an Apple host
    pub unattended: Option<String>,
}

/// Arguments of `lume_run_vm`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct RunArgs {
    /// Name of the VM to start
    pub name: String,
    /// Network mode for this run only (default: the VM's own)
    pub network: Option<String>,
    /// Ports to publish for this run, each [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|/udp]
    pub publish: Option<Vec<String>>,
    /// For this run only (replacing the saved policy): allow outbound only to these, each CIDR[:PORT|:LOW-HIGH][/tcp|/udp]
    pub allow_out: Option<Vec<String>>,
    /// For this run only: deny outbound to these, each CIDR[:PORT|:LOW-HIGH][/tcp|/udp]
    pub deny_out: Option<Vec<String>>,
    /// For this run only: no traffic to the host, its networks, private ranges or other VMs
    pub isolate: Option<bool>,
    /// An ISO image to attach as a CD-ROM (absolute host path)
    pub mount: Option<String>,
    /// Accepted as lume: this server opens no viewer; the VM's VNC display is in the answer and in lume_get_vm's vncUrl
    pub no_display: Option<bool>,
    /// A host directory to share with the VM (absolute path; `PATH:ro` for read-only; only when this server runs as root); lume's guests mount it at /mnt/shared/<its name>
    pub shared_dir: Option<String>,
    /// Discard every disk change when the VM stops (a throwaway sandbox; default: false)
    pub ephemeral: Option<bool>,
    /// Optional storage location name or path (default: the location holding the VM)
    pub storage: Option<String>,
}

/// Arguments of `lume_stop_vm`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct StopArgs {
    /// Name of the VM to stop
    pub name: String,
    /// Seconds to wait for the guest to power off (guest agent, SSH, ACPI) before forcing it off (default: 15)
    #[schemars(range(min = 1))]
    pub timeout: Option<u64>,
    /// Optional storage location name or path (default: the location holding the VM)
    pub storage: Option<String>,
}

/// Arguments of `lume_clone_vm`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct CloneArgs {
    /// Name of the source VM to clone (it must be stopped, unless snapshot is given)
    pub name: String,
    /// Name for the cloned VM
    pub new_name: String,
    /// Clone this snapshot of the VM (O(1); the VM may then be running)
    pub snapshot: Option<String>,
    /// Optional storage location of both (default: the source's location for the source, the default location for the clone)
    pub storage: Option<String>,
}

/// Arguments of `lume_snapshot_create`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct SnapshotCreateArgs {
    /// Name of the VM
    pub name: String,
    /// Name of the snapshot (default: snapshot-<unix time>): 1 to 64 letters, digits, '.', '_' or '-'
    pub snapshot: Option<String>,
    /// Also save the running VM's memory, so that a restore resumes it where it was (default: false)
    pub memory: Option<bool>,
    /// Optional storage location name or path (default: the location holding the VM)
    pub storage: Option<String>,
}

/// Arguments of `lume_snapshot_restore` and `lume_snapshot_delete`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct SnapshotArgs {
    /// Name of the VM
    pub name: String,
    /// Name of the snapshot
    pub snapshot: String,
    /// Optional storage location name or path (default: the location holding the VM)
    pub storage: Option<String>,
}

/// Arguments of `lume_pull`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct PullArgs {
    /// Image to pull, IMAGE:TAG (e.g. debian-12:latest), from `registry`/`organization`
    pub image: String,
    /// Name of the new VM (default: IMAGE_TAG, e.g. debian-12_latest)
    pub name: Option<String>,
    /// Registry host[:port] (default: config.yaml's, else ghcr.io)
    pub registry: Option<String>,
    /// Organization in the registry (default: config.yaml's, else trycua)
    pub organization: Option<String>,
    /// Registry username (default: the environment's GITHUB_USERNAME/GITHUB_TOKEN for ghcr.io, else ~/.docker/config.json, else anonymous)
    pub username: Option<String>,
    /// Registry password or token, with username
    pub password: Option<String>,
    /// Replace an existing VM of that name (it must be stopped) once the pull is complete, and fetch every blob anew even when cached (default: false)
    pub force: Option<bool>,
    /// Optional storage location name or path for the new VM (default: the default location)
    pub storage: Option<String>,
}

/// Arguments of `lume_push`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct PushArgs {
    /// Name of the VM to push (stopped)
    pub name: String,
    /// Image to push it as, IMAGE:TAG (e.g. golden:v1), to `registry`/`organization`
    pub image: String,
    /// More tags for the same image
    pub additional_tags: Option<Vec<String>>,
    /// Registry host[:port] (default: config.yaml's, else ghcr.io)
    pub registry: Option<String>,
    /// Organization in the registry (default: config.yaml's, else trycua)
    pub organization: Option<String>,
    /// Registry username (default: as lume_pull)
    pub username: Option<String>,
    /// Registry password or token, with username
    pub password: Option<String>,
    /// Disk chunk size in MB, 1 to 4096 (default: 512)
    pub chunk_size_mb: Option<u64>,
    /// Prepare the chunks and report them without uploading (default: false)
    pub dry_run: Option<bool>,
    /// Optional storage location name or path (default: the location holding the VM)
    pub storage: Option<String>,
}

/// Arguments of `lume_delete_vm`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct DeleteArgs {
    /// Name of the VM to delete (its disk and files are removed)
    pub name: String,
    /// Accepted as lume: a running VM is always stopped first, then deleted
    pub force: Option<bool>,
    /// Optional storage location name or path (default: the location holding the VM)
    pub storage: Option<String>,
}

/// Arguments of `lume_exec`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct ExecArgs {
    /// Name of the VM (it must be running)
    pub name: String,
    /// Shell command to execute inside the VM (run by the guest user's shell)
    pub command: String,
    /// Seconds to wait for the guest to answer SSH, and then for the command to finish (default: 60; a command still running then is stopped, exit status 124)
    #[schemars(range(min = 1))]
    pub timeout: Option<u64>,
    /// SSH user name (default: lume)
    pub user: Option<String>,
    /// SSH password (default: none: lume's own key is used, which cloud-init gave user lume)
    pub password: Option<String>,
    /// Optional storage location name or path (default: the location holding the VM)
    pub storage: Option<String>,
}

/// Arguments of `lume_resize_disk`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct ResizeArgs {
    /// Name of the VM to resize (it must be stopped)
    pub name: String,
    /// New disk size, e.g. '40GB': larger than the current size (grow only)
    pub disk_size: String,
    /// Optional storage location name or path (default: the location holding the VM)
    pub storage: Option<String>,
    /// Accepted as lume: no backup is made here (growing a disk only appends)
    pub no_backup: Option<bool>,
    /// Accepted as lume: no backup is made here
    pub keep_backup: Option<bool>,
    /// Refused: lume on Linux has no dry run of a resize
    pub dry_run: Option<bool>,
}

/// Arguments of `lume_network_doctor`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct DoctorArgs {
    /// Optional storage location name or path whose running VMs are checked (default: the default location)
    pub storage: Option<String>,
}

/// Arguments of a tool without arguments.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct NoArgs {}

fn refuse(given: bool, argument: &'static str, why: &'static str) -> Result<(), ToolError> {
    if given {
        Err(ToolError::Unsupported { argument, why })
    } else {
        Ok(())
    }
}

fn policy(
    allow: Option<Vec<String>>,
    deny: Option<Vec<String>>,
    isolate: Option<bool>,
) -> Result<crate::network::policy::Policy, ToolError> {
    if allow.as_ref().is_some_and(Vec::is_empty) {
        return Err(ToolError::Argument {
            argument: "allow_out",
            why: "an empty list would not deny anything (a policy allows everything until one allow_out rule is given); to deny all outbound traffic pass deny_out [\"0.0.0.0/0\"], or leave allow_out out".into(),
        });
    }
    Ok(crate::network::policy::Policy::from_parts(
        &allow.unwrap_or_default(),
        &deny.unwrap_or_default(),
        isolate.unwrap_or(false),
    )?)
}

fn ports(
    list: Option<Vec<String>>,
) -> Result<Vec<crate::network::publish::PortMapping>, ToolError> {
    list.unwrap_or_default()
        .iter()
        .map(|p| p.parse().map_err(ToolError::Publish))
        .collect()
}

/// The network mode of a VM created without `network`: lume's `nat` when
/// the server may create it (root, or CAP_NET_ADMIN), else `user`, which
/// needs no privilege: an agent of a non-root server gets a VM it can run.
fn default_network() -> &'static str {
    if crate::network::privilege::has_net_admin() {
        "nat"
    } else {
        "user"
    }
}

/// How long `lume_exec` waits by default (as lume's MCP server).
const EXEC_TIMEOUT: u64 = 60;

/// lume's MCP server.
#[derive(Debug, Clone)]
pub struct LumeMcp {
    tool_router: ToolRouter<Self>,
    /// `lume serve --mcp --storage`: the location of calls that name none.
    storage: Option<String>,
    /// Turns of the calls that run commands or VMs ([`HEAVY_CALLS`]).
    busy: std::sync::Arc<tokio::sync::Semaphore>,
}

impl LumeMcp {
    pub fn new(storage: Option<String>) -> Self {
        let mut tool_router = Self::tool_router();
        for route in tool_router.map.values_mut() {
            route.attr.input_schema = agent::widen_schema(&route.attr.input_schema);
        }
        Self {
            tool_router,
            storage,
            busy: std::sync::Arc::new(tokio::sync::Semaphore::new(HEAVY_CALLS)),
        }
    }

    fn storage(&self, given: Option<String>) -> Option<String> {
        given
            .filter(|s| !s.trim().is_empty())
            .or_else(|| self.storage.clone())
    }
}

#[tool_router]
impl LumeMcp {
    #[tool(
        name = "lume_list_vms",
        description = "List all virtual machines with their status, IP addresses, and resource allocation (lume's VMDetails JSON, as `lume ls -f json`)"
    )]
    async fn list_vms(&self, Parameters(a): Parameters<ListArgs>) -> CallToolResult {
        let storage = self.storage(a.storage);
        blocking(move || {
            let vms = match storage {
                Some(spec) => match execute(&context(Some(&spec), None)?, Action::List)? {
                    (Outcome::List(vms), _) => vms,
                    _ => Vec::new(),
                },
                None => {
                    let settings = Settings::load()?;
                    let stores = location::all_stores(&settings)?;
                    location::list_every(&settings, &Caller::current(), stores, &mut log)?
                }
            };
            Ok(ok_text(json_text(&vms)))
        })
        .await
    }

    #[tool(
        name = "lume_get_vm",
        description = "Get detailed information about a specific VM including status, IP address, network and SSH availability (lume's VMDetails JSON)"
    )]
    async fn get_vm(&self, Parameters(a): Parameters<VmArgs>) -> CallToolResult {
        let storage = self.storage(a.storage);
        blocking(move || {
            match on_vm(storage.as_deref(), &a.name, &mut |_| {}, |name| {
                Ok(Action::Get { name })
            })? {
                (Outcome::Details(d), _) => Ok(ok_text(json_text(&d))),
                (o, notes) => Ok(ok_text(outcome_text(&o, &notes))),
            }
        })
        .await
    }

    #[tool(
        name = "lume_create_vm",
        description = "Create a new Linux VM. With `image` (a cloud image file or URL) the image becomes its disk and cloud-init creates user `lume` with lume's SSH key (no password unless no_password is false), so lume_exec works once it runs. Returns when the VM exists (an image import can take minutes); start it with lume_run_vm"
    )]
    async fn create_vm(
        &self,
        Parameters(a): Parameters<CreateArgs>,
        rc: RequestContext<RoleServer>,
    ) -> CallToolResult {
        let storage = self.storage(a.storage.clone());
        let _turn = match turn(&self.busy).await {
            Ok(t) => t,
            Err(e) => return e,
        };
        noted(rc, move |note| {
            refuse(a.ipsw.is_some(), "ipsw", MACOS_ONLY)?;
            refuse(a.unattended.is_some(), "unattended", MACOS_ONLY)?;
            let image = match a.image.as_deref() {
                Some(i) if i.contains("://") => Some(parse("image", i)?),
                Some(i) => Some(crate::image::ImageSource::Path(host_path("image", i)?)),
                None => None,
            };
            let spec = CreateSpec {
                name: name(&a.name)?,
                os: a.os.unwrap_or_else(|| "linux".into()),
                cpu: a.cpu.unwrap_or(2),
                memory: size("memory", a.memory.as_deref().unwrap_or("2GB"))?,
                disk_size: size("disk_size", a.disk_size.as_deref().unwrap_or("20GB"))?,
                display: crate::vm::config::DEFAULT_DISPLAY.to_string(),
                network: parse(
                    "network",
                    a.network.as_deref().unwrap_or_else(|| default_network()),
                )?,
                mac: None,
                kernel: a.kernel.map(|k| host_path("kernel", &k)).transpose()?,
                initrd: a.initrd.map(|k| host_path("initrd", &k)).transpose()?,
                cmdline: a.cmdline,
                image,
                image_sha256: a
                    .image_sha256
                    .map(|s| parse("image_sha256", &s))
                    .transpose()?,
                progress: false,
                publish: ports(a.publish)?,
                policy: policy(a.allow_out, a.deny_out, a.isolate)?,
                cloud_init: a
                    .cloud_init
                    .map(|c| host_path("cloud_init", &c))
                    .transpose()?,
                no_cloud_init: a.no_cloud_init.unwrap_or(false),
                no_password: no_password(a.no_password),
                // The server acts for the user who runs it, as the CLI does.
                url_destinations: crate::image::download::Destinations::Any,
            };
            let ctx = context(storage.as_deref(), None)?;
            let work = (ctx.store.root().to_path_buf(), spec.name.to_string());
            let (outcome, notes) = while_creating(work, || {
                execute_noted(&ctx, Action::Create(Box::new(spec)), note)
            })?;
            Ok(ok_text(outcome_text(&outcome, &notes)))
        })
        .await
    }

    #[tool(
        name = "lume_pull",
        description = "Pull a VM image (lume's OCI format, as `lume push` writes it) from a registry as a new stopped VM. Returns when the VM exists; with a progress token, progress notifications count the bytes downloaded. Start it with lume_run_vm"
    )]
    async fn pull(
        &self,
        Parameters(a): Parameters<PullArgs>,
        rc: RequestContext<RoleServer>,
    ) -> CallToolResult {
        let storage = self.storage(a.storage.clone());
        let _turn = match turn(&self.busy).await {
            Ok(t) => t,
            Err(e) => return e,
        };
        let prepared = (|| -> Result<(Context, crate::registry::pull::PullSpec), ToolError> {
            let ctx = context(storage.as_deref(), None)?;
            let d = ctx.settings.registry()?;
            let (image, vm) = crate::registry::pull::target(
                &a.image,
                a.registry.as_deref(),
                a.organization.as_deref(),
                a.name.as_deref().map(name).transpose()?,
                &d,
            )
            .map_err(crate::registry::RegistryError::for_api)?;
            let spec = crate::registry::pull::PullSpec {
                image,
                name: vm,
                username: a.username,
                password: a.password,
                force: a.force.unwrap_or(false),
                progress: false,
                // The server acts for the user who runs it, as the CLI does.
                public_only: false,
                // Hints name this tool's arguments (registry, username, …).
                api: true,
            };
            Ok((ctx, spec))
        })();
        let (ctx, spec) = match prepared {
            Ok(p) => p,
            Err(e) => return fail(e),
        };
        let work = (ctx.store.root().to_path_buf(), spec.name.to_string());
        let watch: Watch = {
            let (root, vm) = work.clone();
            Box::new(move || pull_progress(&root, &vm))
        };
        noted_watching(rc, Some(watch), move |note| {
            let (outcome, notes) = while_creating(work, || {
                execute_noted(&ctx, Action::Pull(Box::new(spec)), note)
            })?;
            Ok(ok_text(outcome_text(&outcome, &notes)))
        })
        .await
    }

    #[tool(
        name = "lume_push",
        description = "Push a stopped VM to a registry as an image in lume's OCI format (disk in compressed chunks, holes left out), under one or more tags. Returns when the image is in the registry; progress notifications carry lume's notes"
    )]
    async fn push(
        &self,
        Parameters(a): Parameters<PushArgs>,
        rc: RequestContext<RoleServer>,
    ) -> CallToolResult {
        let storage = self.storage(a.storage.clone());
        let _turn = match turn(&self.busy).await {
            Ok(t) => t,
            Err(e) => return e,
        };
        noted(rc, move |note| {
            let vm = name(&a.name)?;
            let ctx = context(storage.as_deref(), Some(&vm))?;
            let d = ctx.settings.registry()?;
            let image = crate::registry::ImageRef::to_push(
                &a.image,
                a.registry.as_deref(),
                a.organization.as_deref(),
                &d,
            )?;
            let spec = crate::registry::push::PushSpec {
                image,
                additional_tags: a.additional_tags.unwrap_or_default(),
                chunk_size_mb: a
                    .chunk_size_mb
                    .unwrap_or(crate::registry::push::DEFAULT_CHUNK_MB),
                dry_run: a.dry_run.unwrap_or(false),
                username: a.username,
                password: a.password,
                progress: false,
                public_only: false,
                api: true,
            };
            let action = Action::Push {
                name: vm,
                spec: Box::new(spec),
            };
            let (outcome, notes) = execute_noted(&ctx, action, note)?;
            Ok(ok_text(outcome_text(&outcome, &notes)))
        })
        .await
    }

    #[tool(
        name = "lume_run_vm",
        description = "Start a VM in the background. Returns once QEMU runs (the guest then boots; its IP address appears in lume_get_vm once it has a lease). The VM keeps running after this server exits; stop it with lume_stop_vm"
    )]
    async fn run_vm(
        &self,
        Parameters(a): Parameters<RunArgs>,
        rc: RequestContext<RoleServer>,
    ) -> CallToolResult {
        let storage = self.storage(a.storage.clone());
        let _turn = match turn(&self.busy).await {
            Ok(t) => t,
            Err(e) => return e,
        };
        noted(rc, move |note| {
            let name = name(&a.name)?;
            let spec = RunSpec {
                name: Some(name.clone()),
                network: a.network.map(|n| parse("network", &n)).transpose()?,
                mounts: a
                    .mount
                    .map(|m| host_path("mount", &m))
                    .transpose()?
                    .into_iter()
                    .collect(),
                disks: Vec::new(),
                publish: ports(a.publish)?,
                detach: true,
                policy: Some(policy(a.allow_out, a.deny_out, a.isolate)?).filter(|p| !p.is_empty()),
                ephemeral: a.ephemeral.unwrap_or(false),
                shared_dirs: match &a.shared_dir {
                    Some(s) => {
                        let (p, ro) = crate::hypervisor::virtiofs::parse_spec(s).map_err(|e| {
                            ToolError::Argument {
                                argument: "shared_dir",
                                why: e.to_string(),
                            }
                        })?;
                        vec![(host_path("shared_dir", &p.to_string_lossy())?, ro)]
                    }
                    None => Vec::new(),
                },
                ..Default::default()
            };
            let ctx = context(storage.as_deref(), Some(&name))?;
            let result = execute_noted(&ctx, Action::Run(spec), note);
            // The supervisor is this server's child: reap it when it exits.
            crate::api::reap_supervisor(&ctx.store, &name);
            let (outcome, notes) = result?;
            let text = match &outcome {
                Outcome::Started(d) => {
                    let mut lines = notes.clone();
                    lines.push(agent::started_text(d));
                    lines.join("\n")
                }
                o => outcome_text(o, &notes),
            };
            Ok(ok_text(text))
        })
        .await
    }

    #[tool(
        name = "lume_stop_vm",
        description = "Stop a running VM: ask the guest to power off (guest agent, SSH, ACPI power button), and force it off after `timeout` seconds"
    )]
    async fn stop_vm(
        &self,
        Parameters(a): Parameters<StopArgs>,
        rc: RequestContext<RoleServer>,
    ) -> CallToolResult {
        let storage = self.storage(a.storage);
        noted(rc, move |note| {
            let timeout = vm::actions::stop_timeout(timeout(a.timeout, 15)?)?;
            let (outcome, notes) = on_vm(storage.as_deref(), &a.name, note, |name| {
                Ok(Action::Stop { name, timeout })
            })?;
            Ok(ok_text(outcome_text(&outcome, &notes)))
        })
        .await
    }

    #[tool(
        name = "lume_clone_vm",
        description = "Clone a VM to create a copy with a new MAC address (and, with cloud-init, its own hostname and SSH host key). The source must be stopped, except with snapshot: a clone of one of its snapshots is O(1) and works while the source runs. Useful for golden images and instant resets"
    )]
    async fn clone_vm(&self, Parameters(a): Parameters<CloneArgs>) -> CallToolResult {
        let storage = self.storage(a.storage);
        blocking(move || {
            let target: VmName = parse("new_name", &a.new_name)?;
            let settings = Settings::load()?;
            let dest = match storage.as_deref() {
                Some(spec) => location::resolve(&settings, spec)?.store,
                None => location::default_store(&settings)?,
            };
            let (outcome, notes) = on_vm(storage.as_deref(), &a.name, &mut |_| {}, |source| {
                Ok(Action::Clone {
                    source,
                    target,
                    dest: Some(dest),
                    snapshot: a.snapshot,
                })
            })?;
            Ok(ok_text(outcome_text(&outcome, &notes)))
        })
        .await
    }

    #[tool(
        name = "lume_snapshot_create",
        description = "Take a snapshot of a VM (O(1) in time and space): of its disk (a running VM needs its guest agent, which freezes the guest's filesystems), or with memory=true of the whole running VM, which lume_snapshot_restore resumes in under a second"
    )]
    async fn snapshot_create(
        &self,
        Parameters(a): Parameters<SnapshotCreateArgs>,
    ) -> CallToolResult {
        let storage = self.storage(a.storage);
        blocking(move || {
            let name = name(&a.name)?;
            let ctx = context(storage.as_deref(), Some(&name))?;
            let op = vm::actions::SnapshotOp::Create {
                snap: a.snapshot,
                memory: a.memory.unwrap_or(false),
            };
            let (outcome, notes) = execute(&ctx, Action::Snapshot { name, op })?;
            Ok(ok_text(outcome_text(&outcome, &notes)))
        })
        .await
    }

    #[tool(
        name = "lume_snapshot_list",
        description = "List a VM's snapshots (JSON: name, createdAt, memory, ...), oldest first"
    )]
    async fn snapshot_list(&self, Parameters(a): Parameters<VmArgs>) -> CallToolResult {
        let storage = self.storage(a.storage);
        blocking(move || {
            let name = name(&a.name)?;
            let ctx = context(storage.as_deref(), Some(&name))?;
            let op = vm::actions::SnapshotOp::List;
            match execute(&ctx, Action::Snapshot { name, op })?.0 {
                Outcome::Snapshots(s) => Ok(ok_text(json_text(&s))),
                o => Ok(ok_text(outcome_text(&o, &[]))),
            }
        })
        .await
    }

    #[tool(
        name = "lume_snapshot_restore",
        description = "Put a VM back to one of its snapshots, discarding its present state: a running VM is forced off first; a memory snapshot resumes the VM running where it was (same address), a disk snapshot leaves it as it was (running VMs boot again)"
    )]
    async fn snapshot_restore(&self, Parameters(a): Parameters<SnapshotArgs>) -> CallToolResult {
        let storage = self.storage(a.storage);
        blocking(move || {
            let name = name(&a.name)?;
            let ctx = context(storage.as_deref(), Some(&name))?;
            let op = vm::actions::SnapshotOp::Restore { snap: a.snapshot };
            let result = execute(
                &ctx,
                Action::Snapshot {
                    name: name.clone(),
                    op,
                },
            );
            // A started supervisor is this server's child: reap it when it exits.
            crate::api::reap_supervisor(&ctx.store, &name);
            let (outcome, notes) = result?;
            Ok(ok_text(outcome_text(&outcome, &notes)))
        })
        .await
    }

    #[tool(
        name = "lume_snapshot_delete",
        description = "Delete one snapshot of a VM; its other snapshots and its disk stay as they are"
    )]
    async fn snapshot_delete(&self, Parameters(a): Parameters<SnapshotArgs>) -> CallToolResult {
        let storage = self.storage(a.storage);
        blocking(move || {
            let name = name(&a.name)?;
            let ctx = context(storage.as_deref(), Some(&name))?;
            let op = vm::actions::SnapshotOp::Delete { snap: a.snapshot };
            let (outcome, notes) = execute(&ctx, Action::Snapshot { name, op })?;
            Ok(ok_text(outcome_text(&outcome, &notes)))
        })
        .await
    }

    #[tool(
        name = "lume_snapshot_flatten",
        description = "Merge a stopped VM's layered disk (what snapshots and clones from a snapshot leave, even once every snapshot is deleted) into a plain disk.img, so that lume_clone_vm without snapshot, lume_resize_disk and push work again; refused while the VM runs or still has snapshots"
    )]
    async fn snapshot_flatten(&self, Parameters(a): Parameters<VmArgs>) -> CallToolResult {
        let storage = self.storage(a.storage);
        blocking(move || {
            let name = name(&a.name)?;
            let ctx = context(storage.as_deref(), Some(&name))?;
            let op = vm::actions::SnapshotOp::Flatten;
            let (outcome, notes) = execute(&ctx, Action::Snapshot { name, op })?;
            Ok(ok_text(outcome_text(&outcome, &notes)))
        })
        .await
    }

    #[tool(
        name = "lume_delete_vm",
        description = "Delete a VM and all its associated files. A running VM is stopped first (as lume does)"
    )]
    async fn delete_vm(&self, Parameters(a): Parameters<DeleteArgs>) -> CallToolResult {
        let storage = self.storage(a.storage);
        blocking(move || {
            let (outcome, notes) = on_vm(storage.as_deref(), &a.name, &mut |_| {}, |name| {
                Ok(Action::Delete {
                    name,
                    force: a.force.unwrap_or(false),
                    // Calling the tool is the confirmation (`lume delete --force`'s).
                    confirmed: true,
                })
            })?;
            Ok(ok_text(outcome_text(&outcome, &notes)))
        })
        .await
    }

    #[tool(
        name = "lume_exec",
        description = "Execute a shell command inside a running VM over SSH (as `lume ssh NAME -- COMMAND`): waits until the guest answers SSH, then returns a JSON object with exit_status, stdout, stderr and timed_out. isError is true when the exit status is not 0. Needs an SSH server in the guest (cloud images provisioned by lume have one, user lume)"
    )]
    async fn exec(
        &self,
        Parameters(a): Parameters<ExecArgs>,
        rc: RequestContext<RoleServer>,
    ) -> CallToolResult {
        let storage = self.storage(a.storage);
        let _turn = match turn(&self.busy).await {
            Ok(t) => t,
            Err(e) => return e,
        };
        // The request's cancellation (notifications/cancelled) reaches the
        // blocking code as a flag it polls.
        let cancelled = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watch = {
            let (ct, flag) = (rc.ct.clone(), cancelled.clone());
            tokio::spawn(async move {
                ct.cancelled().await;
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
            })
        };
        let result = noted(rc, move |note| {
            let stop = || cancelled.load(std::sync::atomic::Ordering::SeqCst) || shutting_down();
            let name = name(&a.name)?;
            let secs = timeout(a.timeout, EXEC_TIMEOUT)?.max(1);
            let ctx = context(storage.as_deref(), Some(&name))?;
            let vm = ctx.store.open(&name)?;
            ctx.store.check_private(Some(&vm))?;
            let mut last: Option<std::time::Instant> = None;
            let to = gssh::wait_ready(&vm, name.as_str(), secs, &mut |line| {
                if last.is_none_or(|t| t.elapsed() >= WAIT_REPORT) {
                    note(line);
                    last = Some(std::time::Instant::now());
                }
            })?;
            note(&format!("Running the command in VM '{name}'"));
            let key = crate::guest::keys::ensure(ctx.store.root())?;
            let req = SshRequest {
                vm_name: name.to_string(),
                vm_dir: vm.dir.clone(),
                user: a.user.unwrap_or_else(|| "lume".into()),
                password: a.password,
                key: Some(key.private),
                // The guest's own bound, a little after ours (which reports
                // the timeout as 124) in case the connection is gone.
                command: gssh::script_command(secs + REMOTE_GRACE),
                tty: false,
                connect_timeout: Duration::from_secs(secs.clamp(1, 30)),
            };
            if stop() {
                return Err(SshError::Cancelled.into());
            }
            let got = gssh::run_captured(
                gssh::command(&req, &to),
                &a.command,
                Duration::from_secs(secs),
                &stop,
            )?;
            let (stdout, cut_out) = printable(&got.stdout);
            let (stderr, cut_err) = printable(&got.stderr);
            let body = serde_json::json!({
                "exit_status": got.status,
                "stdout": stdout,
                "stderr": stderr,
                "timed_out": got.timed_out,
                "truncated": got.truncated || cut_out || cut_err,
            });
            let content = vec![ContentBlock::text(json_text(&body))];
            Ok(if got.status == 0 {
                CallToolResult::success(content)
            } else {
                CallToolResult::error(content)
            })
        })
        .await;
        watch.abort();
        result
    }

    #[tool(
        name = "lume_resize_disk",
        description = "Grow a stopped VM's disk (grow only; the VM must be stopped). Grow the partition and file system inside the guest afterwards (cloud images do it at boot)"
    )]
    async fn resize_disk(&self, Parameters(a): Parameters<ResizeArgs>) -> CallToolResult {
        let storage = self.storage(a.storage);
        blocking(move || {
            refuse(a.dry_run == Some(true), "dry_run", NOT_YET)?;
            let disk_size = size("disk_size", &a.disk_size)?;
            let (outcome, notes) = on_vm(storage.as_deref(), &a.name, &mut |_| {}, |name| {
                Ok(Action::Set(SetSpec {
                    name,
                    cpu: None,
                    memory: None,
                    disk_size: Some(disk_size),
                    network: None,
                    display: None,
                    policy: None,
                }))
            })?;
            let text = match &outcome {
                Outcome::Updated(d) => format!(
                    "VM '{}' disk resized to {}",
                    d.name,
                    crate::vm::size::format_size(disk_size)
                ),
                o => outcome_text(o, &notes),
            };
            Ok(ok_text(text))
        })
        .await
    }

    #[tool(
        name = "lume_network_interfaces",
        description = "List the host's network interfaces and whether bridged mode can use each (and why not), as `lume config network interfaces -f json`"
    )]
    async fn network_interfaces(&self, Parameters(_): Parameters<NoArgs>) -> CallToolResult {
        blocking(move || {
            let list = crate::network::interfaces::discover()?;
            Ok(ok_text(json_text(&list)))
        })
        .await
    }

    #[tool(
        name = "lume_network_doctor",
        description = "Check the host's networking for lume (bridges, firewall, DHCP, forwarding) and the running VMs of a storage location, as `lume network doctor -f json`; isError is true when a check fails"
    )]
    async fn network_doctor(&self, Parameters(a): Parameters<DoctorArgs>) -> CallToolResult {
        let storage = self.storage(a.storage);
        blocking(move || {
            let ctx = context(storage.as_deref(), None)?;
            let report = crate::network::doctor::run(&ctx);
            let content = vec![ContentBlock::text(json_text(&report))];
            Ok(if report.ok() {
                CallToolResult::success(content)
            } else {
                CallToolResult::error(content)
            })
        })
        .await
    }
}

/// Reads a call's arguments as its tool's argument type before the call, so
/// that arguments that do not fit are an error in lume's words.
fn check_arguments(
    tool: &str,
    args: Option<&serde_json::Map<String, serde_json::Value>>,
) -> Result<(), ToolError> {
    fn fits<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<(), serde_json::Error> {
        serde_json::from_value::<T>(v).map(drop)
    }
    let v = serde_json::Value::Object(args.cloned().unwrap_or_default());
    let checked = match tool {
        "lume_list_vms" => fits::<ListArgs>(v),
        "lume_get_vm" => fits::<VmArgs>(v),
        "lume_create_vm" => fits::<CreateArgs>(v),
        "lume_run_vm" => fits::<RunArgs>(v),
        "lume_stop_vm" => fits::<StopArgs>(v),
        "lume_clone_vm" => fits::<CloneArgs>(v),
        "lume_delete_vm" => fits::<DeleteArgs>(v),
        "lume_exec" => fits::<ExecArgs>(v),
        "lume_resize_disk" => fits::<ResizeArgs>(v),
        "lume_network_doctor" => fits::<DoctorArgs>(v),
        "lume_pull" => fits::<PullArgs>(v),
        "lume_push" => fits::<PushArgs>(v),
        "lume_snapshot_create" => fits::<SnapshotCreateArgs>(v),
        "lume_snapshot_list" | "lume_snapshot_flatten" => fits::<VmArgs>(v),
        "lume_snapshot_restore" | "lume_snapshot_delete" => fits::<SnapshotArgs>(v),
        _ => Ok(()),
    };
    checked.map_err(|e| ToolError::Arguments {
        tool: tool.to_string(),
        why: e.to_string(),
    })
}

const INSTRUCTIONS: &str = "lume manages QEMU Linux VMs on this host. Read the resource lume://usage-guide first. \
Typical flow: lume_create_vm (from a cloud image) -> lume_run_vm -> lume_exec (user lume) -> lume_stop_vm; \
lume_clone_vm a stopped golden VM for fresh sandboxes, or lume_snapshot_create / lume_snapshot_restore \
(memory=true resumes a running sandbox in about a second) and lume_run_vm with ephemeral=true. Tools act with the rights of the user running `lume serve --mcp`.";

impl ServerHandler for LumeMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_prompts()
                .enable_resources()
                .build(),
        )
        .with_server_info(Implementation::new("lume", env!("CARGO_PKG_VERSION")))
        .with_instructions(INSTRUCTIONS)
    }

    /// Every failure of a call, an unknown tool or arguments that do not
    /// fit its schema among them, is a tool error result the agent reads.
    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let tool = request.name.to_string();
        if !self.tool_router.has_route(&tool) {
            return Ok(CallToolResult::error(vec![ContentBlock::text(format!(
                "Error: Unknown tool: {tool}; list the tools (tools/list) for lume's names"
            ))])
            .into());
        }
        let mut request = request;
        if let (Some(t), Some(args)) = (self.tool_router.get(&tool), request.arguments.as_mut())
            && let Err(e) = agent::normalise(&tool, &t.input_schema, args)
        {
            return Ok(fail(e).into());
        }
        if let Err(e) = check_arguments(&tool, request.arguments.as_ref()) {
            return Ok(fail(e).into());
        }
        let tcc = ToolCallContext::new(self, request, context);
        match self.tool_router.call(tcc).await {
            Ok(r) => Ok(r),
            Err(e) => Ok(CallToolResult::error(vec![ContentBlock::text(format!(
                "Error: Invalid arguments for {tool}: {}; see the tool's input schema",
                e.message
            ))])
            .into()),
        }
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<rmcp::model::ListToolsResult, ErrorData> {
        Ok(rmcp::model::ListToolsResult::with_all_items(
            self.tool_router.list_all(),
        ))
    }

    fn get_tool(&self, name: &str) -> Option<rmcp::model::Tool> {
        self.tool_router.get(name).cloned()
    }

    async fn list_prompts(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListPromptsResult, ErrorData> {
        Ok(ListPromptsResult::with_all_items(guide::prompts()))
    }

    async fn get_prompt(
        &self,
        request: GetPromptRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<GetPromptResponse, ErrorData> {
        guide::prompt(&request.name, request.arguments.as_ref())
            .map(Into::into)
            .ok_or_else(|| {
                ErrorData::invalid_params(
                    format!(
                        "Unknown prompt '{}': list the prompts (prompts/list)",
                        request.name
                    ),
                    None,
                )
            })
    }

    async fn list_resources(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, ErrorData> {
        Ok(ListResourcesResult::with_all_items(guide::resources()))
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, ErrorData> {
        guide::read(&request.uri).map(Into::into).ok_or_else(|| {
            ErrorData::resource_not_found(
                format!(
                    "Unknown resource '{}': list the resources (resources/list)",
                    request.uri
                ),
                None,
            )
        })
    }
}

/// Errors of the MCP server itself (not of a tool call).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("Cannot set up standard input/output for the MCP session")]
    Stdio(#[source] std::io::Error),
    #[error("Cannot start the MCP server's runtime")]
    Runtime(#[source] std::io::Error),
    #[error("The MCP session could not start: the client must speak MCP on standard input/output")]
    Start(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error(
        "Standard input was not MCP JSON-RPC (one JSON object per line): `lume serve --mcp` is started by an MCP client such as an agent host, not typed into; register it with your agent host (docs/mcp.md)"
    )]
    NotMcp,
    #[error("The MCP session ended with an error")]
    Session(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Takes standard input and output for the protocol alone: the session
/// gets its own close-on-exec copies of them, and fd 0 becomes /dev/null and
/// fd 1 a copy of standard error, so that nothing else in this process (a
/// stray print) and no child (qemu-img, ssh, a supervisor) can read the
/// client's messages or write into the protocol's stream.
fn take_stdio() -> Result<(std::fs::File, std::fs::File), ServeError> {
    use std::os::fd::AsFd;
    let input = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map_err(ServeError::Stdio)?;
    let output = std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .map_err(ServeError::Stdio)?;
    let null = std::fs::File::open("/dev/null").map_err(ServeError::Stdio)?;
    nix::unistd::dup2_stdin(&null).map_err(|e| ServeError::Stdio(e.into()))?;
    nix::unistd::dup2_stdout(std::io::stderr()).map_err(|e| ServeError::Stdio(e.into()))?;
    Ok((input.into(), output.into()))
}

/// `lume serve --mcp`: serves one MCP session on standard input and output
/// until the client closes it.
pub fn serve_stdio(storage: Option<String>) -> Result<(), ServeError> {
    let (input, output) = take_stdio()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(ServeError::Runtime)?;
    let result = rt.block_on(async move {
        log("lume MCP server: serving on standard input/output");
        let (input, foreign) = agent::Watched::new(tokio::fs::File::from_std(input));
        let transport = (input, tokio::fs::File::from_std(output));
        let service = match LumeMcp::new(storage).serve(transport).await {
            Ok(s) => s,
            // Standard input closed before a session began: nothing to do.
            Err(rmcp::service::ServerInitializeError::ConnectionClosed(_))
                if foreign.load(std::sync::atomic::Ordering::Relaxed) =>
            {
                return Err(ServeError::NotMcp);
            }
            Err(rmcp::service::ServerInitializeError::ConnectionClosed(_)) => {
                log("lume MCP server: standard input closed before a session began");
                return Ok(());
            }
            Err(e) => return Err(ServeError::Start(Box::new(e))),
        };
        let cancel = service.cancellation_token();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(ServeError::Stdio)?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
            .map_err(ServeError::Stdio)?;
        let waiting = service.waiting();
        tokio::pin!(waiting);
        tokio::select! {
            r = &mut waiting => {
                r.map_err(|e| ServeError::Session(Box::new(e)))?;
                log("lume MCP server: the client closed the session");
            }
            _ = term.recv() => {
                log("lume MCP server: SIGTERM; ending the session");
                cancel.cancel();
            }
            _ = int.recv() => {
                log("lume MCP server: SIGINT; ending the session");
                cancel.cancel();
            }
        }
        Ok(())
    });
    // Calls still under way end with the session: commands are stopped
    // (their ssh group is killed within 20 ms), the work directories of
    // unfinished creates removed, and the process does not wait for the
    // rest (an image download) longer than SHUTDOWN_GRACE.
    SHUTDOWN.store(true, std::sync::atomic::Ordering::SeqCst);
    remove_creating_work();
    rt.shutdown_timeout(SHUTDOWN_GRACE);
    remove_creating_work();
    result
}

/// How long the end of a session waits for calls under way.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_paths_are_absolute_or_in_the_servers_home() {
        assert_eq!(
            host_path("image", "/srv/d.qcow2").unwrap(),
            PathBuf::from("/srv/d.qcow2")
        );
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap();
        assert_eq!(
            host_path("image", "~/d.qcow2").unwrap(),
            home.join("d.qcow2")
        );
        for rel in ["d.qcow2", "../etc/shadow", "~other/x", ""] {
            let e = host_path("kernel", rel).unwrap_err();
            assert!(
                matches!(
                    e,
                    ToolError::RelativePath {
                        argument: "kernel",
                        ..
                    }
                ),
                "{rel}: {e}"
            );
        }
    }

    #[test]
    fn timeouts_are_capped_as_the_clis() {
        assert_eq!(timeout(None, 60).unwrap(), 60);
        assert_eq!(timeout(Some(5), 60).unwrap(), 5);
        assert!(matches!(
            timeout(Some(vm::actions::MAX_TIMEOUT_SECS + 1), 60),
            Err(ToolError::TimeoutTooLong(_))
        ));
    }

    #[test]
    fn errors_read_as_the_cli_prints_them() {
        let e = name("a/b").unwrap_err();
        let text = error_text(&e);
        assert!(
            text.starts_with("Error: Argument name: Invalid VM name 'a/b': "),
            "{text}"
        );
        let e = host_path("kernel", "vmlinuz").unwrap_err();
        assert!(
            error_text(&e).starts_with("Error: Argument kernel 'vmlinuz' is not an absolute path"),
            "{e}"
        );
        let e = refuse(true, "ipsw", MACOS_ONLY).unwrap_err();
        assert!(
            error_text(&e).starts_with("Error: Argument ipsw is not supported"),
            "{e}"
        );
        let e = size("memory", "lots").unwrap_err();
        let text = error_text(&e);
        assert!(
            text.starts_with("Error: Argument memory: Invalid size 'lots': "),
            "{text}"
        );
        assert_eq!(text.matches("Invalid").count(), 1, "{text}");
    }

    #[test]
    fn every_tool_with_required_arguments_is_checked_before_the_call() {
        let server = LumeMcp::new(None);
        let tools = server.tool_router.list_all();
        assert_eq!(tools.len(), 18);
        for t in tools {
            let required = t
                .input_schema
                .get("required")
                .and_then(|r| r.as_array())
                .is_some_and(|r| !r.is_empty());
            let checked = check_arguments(&t.name, None);
            assert_eq!(checked.is_err(), required, "{}: {checked:?}", t.name);
        }
    }

    #[test]
    fn a_created_vm_has_no_password_unless_asked() {
        assert!(no_password(None));
        assert!(no_password(Some(true)));
        assert!(!no_password(Some(false)));
        let creds = serde_json::to_string(&guide::read(guide::CREDENTIALS_URI).unwrap()).unwrap();
        assert!(creds.contains("Password: none by default"), "{creds}");
    }

    /// Review finding: 1 MiB of NULs became 6 MiB of `\u0000` in one reply,
    /// and invalid UTF-8 three bytes a byte.
    #[test]
    fn exec_output_is_printable_and_stays_near_the_cap() {
        let (t, cut) = printable("a\tb\r\nc\0d\x1b[31m\u{7f}");
        assert_eq!(t, "a\tb\r\nc\u{FFFD}d\u{FFFD}[31m\u{FFFD}");
        assert!(!cut);
        let nuls = "\0".repeat(gssh::CAPTURE_LIMIT);
        let (t, cut) = printable(&nuls);
        assert!(cut && t.len() <= gssh::CAPTURE_LIMIT);
        let json = serde_json::to_string(&t).unwrap();
        assert!(json.len() <= gssh::CAPTURE_LIMIT + 2, "{}", json.len());
        let lossy = String::from_utf8_lossy(&vec![0xffu8; gssh::CAPTURE_LIMIT]).into_owned();
        let (t, cut) = printable(&lossy);
        assert!(cut && t.len() <= gssh::CAPTURE_LIMIT);
    }

    #[test]
    fn prompts_and_resources_are_lumes() {
        let names: Vec<String> = guide::prompts().into_iter().map(|p| p.name).collect();
        assert_eq!(names, ["create-sandbox", "run-in-sandbox", "reset-sandbox"]);
        assert!(guide::prompt("nope", None).is_none());
        assert!(guide::read("lume://nope").is_none());
        assert!(guide::read(guide::USAGE_GUIDE_URI).is_some());
    }

    #[test]
    fn a_non_root_agent_is_told_to_use_user_networking() {
        let p = guide::prompt("create-sandbox", None).unwrap();
        let text = serde_json::to_string(&p).unwrap();
        assert!(text.contains(r#"network: \"user\""#), "{text}");
        let r = guide::read(guide::USAGE_GUIDE_URI).unwrap();
        let text = serde_json::to_string(&r).unwrap();
        assert!(text.contains(r#"network: \"user\""#), "{text}");
        // The default follows the server's rights (tests run as root).
        let want = if crate::network::privilege::has_net_admin() {
            "nat"
        } else {
            "user"
        };
        assert_eq!(default_network(), want);
    }
}
