//! `lume serve`: an HTTP API compatible with lume's REST API (JSON under
//! `/lume/...`), the second door to the same actions as the CLI. Every route
//! builds a [`crate::vm::Action`] and runs [`crate::vm::execute`] on a
//! blocking thread. VMs are started detached, with their own supervisors, so
//! they outlive the server and the CLI sees them like its own.
//!
//! Loopback only by default, plus an optional Unix socket; any other address
//! needs a token, and with a token every request must carry
//! `Authorization: Bearer TOKEN`. Without one, each connection's local uid
//! decides who is served ([`auth`], [`peer`]).

pub mod activation;
pub mod auth;
pub mod error;
pub mod extract;
pub mod handoff;
pub mod listen;
pub mod peer;
pub mod routes;
pub mod snapshots;
pub mod socket;

use std::collections::HashMap;
use std::io::Write as _;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use axum::Router;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::vm::VmName;
use crate::vm::store::Store;
use error::ApiError;

/// The port lume's API uses.
pub const DEFAULT_PORT: u16 = 7777;

/// How `lume serve` was asked to run.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub host: String,
    pub port: u16,
    /// `LUME_API_TOKEN`: required on non-loopback addresses; when set,
    /// required on every request.
    pub token_env: Option<String>,
    /// `--token-file`: the same, from a file.
    pub token_file: Option<PathBuf>,
    /// `--socket`: also listen on this Unix socket.
    pub socket: Option<PathBuf>,
    /// The VM location (`--storage`), else the default.
    pub storage: Option<PathBuf>,
    /// `--api-group`: the group whose members are served, instead of
    /// config.yaml's `apiGroup`.
    pub api_group: Option<String>,
    /// `--handoff-group`: the group whose members are served the network
    /// hand-off only, on the Unix socket (the packaged service names `lume`).
    pub handoff_group: Option<String>,
}

/// What every request sees.
#[derive(Debug, Default)]
pub struct AppState {
    storage: Option<PathBuf>,
    token: Option<String>,
    /// The server's effective uid: whose rights its actions have.
    euid: u32,
    /// Served without a token besides root and the apiGroup ([`auth::server_owners`]).
    owners: Vec<u32>,
    /// `--api-group`, which replaces config.yaml's `apiGroup`.
    api_group: Option<String>,
    /// `--handoff-group`: served the network hand-off only.
    handoff_group: Option<String>,
    /// The OpenAPI document, set once the router is built.
    openapi: OnceLock<serde_json::Value>,
    /// One turn lock per VM (storage root + name) for VM-changing requests.
    turns: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
    /// Background pulls (`/lume/pull/start`) that failed, by caller uid and
    /// VM name: the error and when, answered by `GET /lume/vms/{name}` (as
    /// lume) for [`PULL_FAILURE_KEPT`] or until the name is used again.
    pub(crate) pull_failures: Mutex<HashMap<(u32, String), (String, std::time::Instant)>>,
    /// Transfers (downloads for create, pulls, pushes) running per caller
    /// uid: each holds a thread and its connections, whether the caller
    /// waits for it or not.
    background: Arc<Mutex<HashMap<u32, usize>>>,
}

/// Background transfers one caller may have running at once.
pub(crate) const BACKGROUND_PER_CALLER: usize = 4;

/// One caller's running background transfer; it ends when dropped.
pub(crate) struct BackgroundSlot {
    running: Arc<Mutex<HashMap<u32, usize>>>,
    uid: u32,
}

impl Drop for BackgroundSlot {
    fn drop(&mut self) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = running.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                running.remove(&self.uid);
            }
        }
    }
}

/// How long a failed background pull is remembered.
pub(crate) const PULL_FAILURE_KEPT: std::time::Duration = std::time::Duration::from_secs(3600);

impl AppState {
    pub fn new(storage: Option<PathBuf>, token: Option<String>) -> Self {
        Self {
            storage,
            token,
            owners: auth::server_owners(),
            euid: nix::unistd::geteuid().as_raw(),
            ..Self::default()
        }
    }

    /// A slot for one more background transfer of `uid`, or 429 when it
    /// has [`BACKGROUND_PER_CALLER`] running.
    pub(crate) fn background_slot(&self, uid: u32) -> Result<BackgroundSlot, error::ApiError> {
        let mut running = self.background.lock().unwrap_or_else(|e| e.into_inner());
        let n = running.entry(uid).or_default();
        if *n >= BACKGROUND_PER_CALLER {
            return Err(error::ApiError::new(
                axum::http::StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "You have {BACKGROUND_PER_CALLER} downloads, pulls or pushes running already: wait for one to finish (`GET /lume/vms` shows them as provisioning or pulling), then try again"
                ),
            ));
        }
        *n += 1;
        Ok(BackgroundSlot {
            running: self.background.clone(),
            uid,
        })
    }

    /// Waits for this server's turn on one VM.
    async fn vm_turn(&self, root: &Path, vm: &VmName) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut turns = self.turns.lock().unwrap_or_else(|e| e.into_inner());
            // Forget the locks nobody holds or waits for.
            turns.retain(|_, l| Arc::strong_count(l) > 1);
            turns.entry(root.join(vm.as_str())).or_default().clone()
        };
        lock.lock_owned().await
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "lume",
        description = "Virtual machines on Linux with QEMU: lume's REST API. Errors are `{\"message\": \"...\"}`."
    ),
    components(schemas(error::ErrorBody)),
    tags(
        (name = "vms", description = "Create, run, stop, change, clone and delete VMs"),
        (name = "host", description = "Settings and status"),
        (name = "config", description = "lume's settings and VM locations (config.yaml)"),
        (name = "network", description = "Host networking"),
        (name = "meta", description = "This API"),
    )
)]
struct ApiDoc;

/// How many recent log lines the server keeps for `GET /lume/logs`.
pub const LOG_LINES_KEPT: usize = 2000;

/// The longest line kept (in bytes; longer ones are cut): a client's long
/// URL cannot make the kept log large (at most about 4 MiB in all).
pub const LOG_LINE_KEPT_BYTES: usize = 2048;

/// How many recent error lines the server keeps besides: access lines can
/// never push a failure out of `GET /lume/logs`.
pub const ERROR_LINES_KEPT: usize = 500;

/// How many lines about refused requests one caller (a uid, a VM, an
/// unknown user) may write to stderr per minute (a refused request writes
/// two or three); the rest are counted and
/// reported in one line. Refused requests never enter the kept log.
pub const REFUSAL_LINES_PER_MINUTE: u32 = 60;

/// One kept line of the server's log.
#[derive(Debug, Clone)]
pub struct LogLine {
    pub error: bool,
    pub text: String,
    /// Order across both buffers.
    seq: u64,
}

/// The server's recent log lines, newest last (this process's only: the
/// log lives in memory, never in a file another user could read or plant):
/// every line, and the error lines apart.
struct Kept {
    lines: std::collections::VecDeque<LogLine>,
    errors: std::collections::VecDeque<LogLine>,
    seq: u64,
}

static RECENT_LOG: Mutex<Kept> = Mutex::new(Kept {
    lines: std::collections::VecDeque::new(),
    errors: std::collections::VecDeque::new(),
    seq: 0,
});

/// `line` with every control character (newline, carriage return, escape
/// sequences…) written out, so that no caller-chosen text (a URL, a VM
/// name) can forge a log line or drive a terminal.
pub fn escape_controls(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    for c in line.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

fn stamped(line: &str) -> String {
    format!(
        "[{}] {}",
        crate::util::time::timestamp(),
        escape_controls(line)
    )
}

/// Whether stderr is connected to the journal (systemd sets
/// `JOURNAL_STREAM` to the device and inode of the stream it gave us).
fn to_journal() -> bool {
    static JOURNAL: OnceLock<bool> = OnceLock::new();
    *JOURNAL.get_or_init(|| {
        use std::os::fd::AsFd as _;
        use std::os::unix::fs::MetadataExt as _;
        let Some(expected) = std::env::var("JOURNAL_STREAM").ok() else {
            return false;
        };
        let Ok(stderr) = std::io::stderr().as_fd().try_clone_to_owned() else {
            return false;
        };
        let Ok(meta) = std::fs::File::from(stderr).metadata() else {
            return false;
        };
        expected == format!("{}:{}", meta.dev(), meta.ino())
    })
}

/// A line for stderr: with the journal's `<N>` priority prefix and no
/// timestamp (the journal keeps its own) when stderr is the journal,
/// timestamped otherwise. `priority` is syslog's: 3 error, 5 notice, 6 info.
fn for_stderr(priority: u8, line: &str) -> String {
    if to_journal() {
        format!("<{priority}>{}", escape_controls(line))
    } else {
        stamped(line)
    }
}

fn write_log(error: bool, line: &str) {
    let _ = writeln!(
        std::io::stderr(),
        "{}",
        for_stderr(if error { 3 } else { 6 }, line)
    );
    let mut text = stamped(line);
    if text.len() > LOG_LINE_KEPT_BYTES {
        let mut cut = LOG_LINE_KEPT_BYTES;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str(" [cut]");
    }
    let mut kept = RECENT_LOG.lock().unwrap_or_else(|e| e.into_inner());
    kept.seq += 1;
    let seq = kept.seq;
    let (buffer, max) = if error {
        (&mut kept.errors, ERROR_LINES_KEPT)
    } else {
        (&mut kept.lines, LOG_LINES_KEPT)
    };
    if buffer.len() == max {
        buffer.pop_front();
    }
    buffer.push_back(LogLine { error, text, seq });
}

/// Refusal lines of the current minute, per caller.
struct Refusals {
    since: Option<Instant>,
    counts: std::collections::BTreeMap<String, u32>,
}

static REFUSALS: Mutex<Refusals> = Mutex::new(Refusals {
    since: None,
    counts: std::collections::BTreeMap::new(),
});

/// Writes one line about a refused request (or one that never got as far
/// as deciding who calls) to stderr only: never to the kept log, which a
/// caller the server does not serve could otherwise fill. At most
/// [`REFUSAL_LINES_PER_MINUTE`] per `who` per minute; the rest are counted
/// in one line when the minute is over.
pub fn log_refusal(who: &str, line: &str) {
    let mut r = REFUSALS.lock().unwrap_or_else(|e| e.into_inner());
    let (print, summaries) = count_refusal(&mut r, who, Instant::now());
    for s in summaries {
        let _ = writeln!(std::io::stderr(), "{}", for_stderr(5, &s));
    }
    if print {
        let _ = writeln!(std::io::stderr(), "{}", for_stderr(5, line));
    }
}

/// Counts one refusal line of `who`: whether to print it, and the lines
/// reporting what the minute that ended left out.
fn count_refusal(r: &mut Refusals, who: &str, now: Instant) -> (bool, Vec<String>) {
    let mut summaries = Vec::new();
    if r.since
        .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(60))
    {
        for (k, n) in std::mem::take(&mut r.counts) {
            if n > REFUSAL_LINES_PER_MINUTE {
                summaries.push(format!(
                    "{} more lines about refused requests from {k} were not logged",
                    n - REFUSAL_LINES_PER_MINUTE
                ));
            }
        }
        r.since = Some(now);
    }
    let n = r.counts.entry(escape_controls(who)).or_insert(0);
    *n = n.saturating_add(1);
    (*n <= REFUSAL_LINES_PER_MINUTE, summaries)
}

/// Writes one timestamped line to the server's log (stderr).
pub fn log(line: &str) {
    write_log(false, line);
}

/// Writes one timestamped line about a failure to the server's log
/// (stderr); `GET /lume/logs` lists it under `error`.
pub fn log_error(line: &str) {
    write_log(true, line);
}

/// The recent log lines (both buffers), oldest first.
pub fn recent_log() -> Vec<LogLine> {
    let kept = RECENT_LOG.lock().unwrap_or_else(|e| e.into_inner());
    let mut all: Vec<LogLine> = kept.lines.iter().chain(&kept.errors).cloned().collect();
    all.sort_by_key(|l| l.seq);
    all
}

/// The router and its OpenAPI document, both built from the routes'
/// `#[utoipa::path]` annotations: a route cannot be missing from the document.
pub fn router(state: Arc<AppState>) -> Router {
    let (router, mut doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(routes::list_vms, routes::create_vm))
        .routes(routes!(routes::get_vm, routes::set_vm, routes::delete_vm))
        .routes(routes!(routes::run_vm))
        .routes(routes!(routes::stop_vm))
        .routes(routes!(routes::shutdown_vm))
        .routes(routes!(routes::restart_vm))
        .routes(routes!(routes::clone_vm))
        .routes(routes!(
            snapshots::list_snapshots,
            snapshots::create_snapshot
        ))
        .routes(routes!(snapshots::restore_snapshot))
        .routes(routes!(snapshots::delete_snapshot))
        .routes(routes!(snapshots::flatten_vm))
        .routes(routes!(routes::get_config, routes::update_config))
        .routes(routes!(routes::get_locations, routes::add_location))
        .routes(routes!(routes::remove_location))
        .routes(routes!(routes::set_default_location))
        .routes(routes!(routes::host_status))
        .routes(routes!(routes::get_logs))
        .routes(routes!(routes::setup_vm))
        .routes(routes!(routes::ipsw))
        .routes(routes!(routes::network_interfaces))
        .routes(routes!(routes::network_doctor))
        .routes(routes!(routes::openapi_json))
        .routes(routes!(routes::pull_image))
        .routes(routes!(routes::pull_image_start))
        .routes(routes!(routes::push_vm))
        .routes(routes!(routes::list_images))
        .routes(routes!(routes::prune_images))
        .split_for_parts();
    doc.info.version = env!("CARGO_PKG_VERSION").into();
    let doc = serde_json::to_value(&doc).expect("the OpenAPI document serialises");
    let _ = state.openapi.set(doc);
    router
        .route(
            "/lume/vms/clone",
            get(routes::get_vm_called_clone)
                .patch(routes::set_vm_called_clone)
                .delete(routes::delete_vm_called_clone),
        )
        .route(
            crate::network::handoff::ROUTE,
            axum::routing::post(handoff::handoff_network),
        )
        .fallback(routes::no_route)
        .method_not_allowed_fallback(routes::wrong_method)
        .layer(DefaultBodyLimit::max(extract::BODY_LIMIT))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authorize,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            refuse_web_pages,
        ))
        .layer(middleware::from_fn(access_log))
        .with_state(state)
}

/// Whether a `Host` header value names this machine
/// (`localhost`, a loopback address), with or without a port.
fn is_local_authority(authority: &str) -> bool {
    let host = match authority.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => authority
            .rsplit_once(':')
            .map_or(authority, |(host, _port)| host),
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A web page must not be able to drive this API as whoever opens it in a
/// browser. Browsers send `Origin` with cross-site requests (CSRF) and with
/// every non-GET fetch: any request that carries one is refused unless it
/// is exactly this server's own origin (scheme, host and port it listens
/// on), with a token too. (Bodies must also be declared JSON:
/// [`extract::JsonBody`].) Without a token, a DNS name rebound to 127.0.0.1 still carries
/// its own `Host`: refused unless it names this machine. Programs (curl,
/// SDKs) send no `Origin`, a local `Host`, and JSON.
async fn refuse_web_pages(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    match web_page_refusal(&st, &req) {
        Some(refusal) => {
            // Logged like every refusal: with the calling uid and the connection.
            let conn = req
                .extensions()
                .get::<ConnectInfo<peer::Connection>>()
                .map(|ConnectInfo(c)| c.clone());
            let who = match &conn {
                Some(c) => format!(
                    "{} ({})",
                    describe_identity(&c.identity(st.storage.clone()).await),
                    c.describe()
                ),
                None => "an unknown connection".into(),
            };
            let key = match &conn {
                Some(c) => refusal_key(&c.identity(st.storage.clone()).await),
                None => "an unknown connection".into(),
            };
            log_refusal(&key, &format!("Refused {who}: {}", refusal.message));
            let mut response = refusal.into_response();
            response.extensions_mut().insert(Refused(key));
            response
        }
        None => next.run(req).await,
    }
}

/// Marks a response to a request refused before any route saw it, with
/// who was refused: its access line goes to stderr only
/// ([`log_refusal`]), never into the kept log.
#[derive(Debug, Clone)]
pub struct Refused(pub String);

/// Who a refusal is counted against ([`log_refusal`]): a uid, a VM, an
/// unknown user; few distinct values, so the count stays small.
pub fn refusal_key(identity: &peer::Identity) -> String {
    match identity {
        peer::Identity::User(uid) => format!("uid {uid}"),
        peer::Identity::Guest(_) => "a virtual machine".into(),
        peer::Identity::Unknown(_) => "an unknown user".into(),
    }
}

/// Who is behind a connection, for the log.
fn describe_identity(identity: &peer::Identity) -> String {
    match identity {
        peer::Identity::User(uid) => format!("uid {uid}"),
        peer::Identity::Guest(h) => format!("{} pid {}", h.program, h.pid),
        peer::Identity::Unknown(why) => format!("an unknown user ({why})"),
    }
}

fn web_page_refusal(st: &AppState, req: &Request) -> Option<ApiError> {
    let header_value = |name| {
        req.headers()
            .get(name)
            .map(|v| v.to_str().unwrap_or("?").to_string())
    };
    if let Some(origin) = header_value(header::ORIGIN) {
        let own = req
            .extensions()
            .get::<ConnectInfo<peer::Connection>>()
            .map(|ConnectInfo(c)| c.own_origins())
            .unwrap_or_default();
        if !own.iter().any(|o| o.eq_ignore_ascii_case(&origin)) {
            return Some(ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "Requests from web pages are refused (Origin: {origin}): call this API from a program, which sends no Origin header"
                ),
            ));
        }
    }
    if st.token.is_none()
        && let Some(host) = header_value(header::HOST)
        && !is_local_authority(&host)
    {
        return Some(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "Host '{host}' is refused: without an API token this API answers only to localhost and loopback addresses"
            ),
        ));
    }
    None
}

async fn access_log(req: Request, next: Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let start = Instant::now();
    let response = next.run(req).await;
    let line = format!(
        "{method} {path} -> {} ({} ms)",
        response.status().as_u16(),
        start.elapsed().as_millis()
    );
    match response.extensions().get::<Refused>() {
        Some(Refused(who)) => log_refusal(who, &line),
        None => write_log(response.status().is_server_error(), &line),
    }
    response
}

/// Reaps the supervisor this server started for `vm` once it exits (it is
/// our child until then). Only a process whose parent is this one is waited
/// for, so a VM started by someone else is left alone.
pub fn reap_supervisor(store: &Store, vm: &VmName) {
    let Some(state) = store.vm(vm).running_state() else {
        return;
    };
    let pid = state.pid;
    let parent = peer::parent_pid(Path::new(&format!("/proc/{pid}")));
    if parent != Some(std::process::id()) {
        return;
    }
    let _ = std::thread::Builder::new()
        .name(format!("reap-{pid}"))
        .spawn(move || {
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None);
        });
}

/// Where to listen, refusing a non-loopback address without a token.
fn listen_addresses(host: &str, port: u16, token: bool) -> Result<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .with_context(|| format!("Cannot resolve the listen address '{host}'"))?
        .collect();
    if addrs.is_empty() {
        bail!("The listen address '{host}' resolves to nothing");
    }
    if !token && let Some(open) = addrs.iter().find(|a| !a.ip().is_loopback()) {
        bail!(
            "Refusing to listen on {open} without an API token: anyone who can reach that address could control your VMs. \
             Give a token in the LUME_API_TOKEN environment variable or with --token-file PATH, or listen on 127.0.0.1"
        );
    }
    Ok(addrs)
}

/// Resolves on the first SIGINT or SIGTERM; a second one ends the process at once.
async fn shutdown_signal() {
    async fn either() {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async {
                match term.as_mut() {
                    Some(t) => { t.recv().await; }
                    None => std::future::pending::<()>().await,
                }
            } => {}
        }
    }
    either().await;
    log("Stopping: finishing the requests in progress; running VMs keep running");
    tokio::spawn(async {
        either().await;
        log("Second signal: exiting now");
        std::process::exit(130);
    });
}

/// The group named by `apiGroup` in config.yaml, which must exist.
fn api_group(settings: &crate::settings::Settings) -> Result<Option<nix::unistd::Group>> {
    let Some(name) = settings.get_str(auth::API_GROUP_KEY)? else {
        return Ok(None);
    };
    match nix::unistd::Group::from_name(&name) {
        Ok(Some(g)) => Ok(Some(g)),
        _ => bail!(
            "Group '{name}', set as {} in {}, does not exist: create it (groupadd {name}) or remove the key (lume config unset {})",
            auth::API_GROUP_KEY,
            settings.file().display(),
            auth::API_GROUP_KEY
        ),
    }
}

/// Who a server without a token serves, for its start-up line: root, its
/// own user, the user who ran sudo (uid and name; the server's VM location
/// only) and the `apiGroup`.
fn served_without_token(group: Option<&str>, sudo: Option<(u32, Option<&str>)>) -> String {
    let mut who = vec!["root".to_string(), "the server's user".to_string()];
    if let Some((uid, name)) = sudo {
        who.push(match name {
            Some(name) => format!("sudo user {name} (uid {uid}, this VM location only)"),
            None => format!("sudo user uid {uid} (this VM location only)"),
        });
    }
    if let Some(g) = group {
        who.push(format!("group '{g}'"));
    }
    let last = who.pop().unwrap_or_default();
    format!(
        "no API token: loopback only, for {} and {last}",
        who.join(", ")
    )
}

/// Raises the soft limit of open files to the hard limit, so that the
/// connection limits ([`listen::Limits`]) are reached before the process
/// runs out of descriptors.
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                log(&format!(
                    "Cannot raise the open files limit from {soft} to {hard}: {e}"
                ));
            }
        }
        _ => {}
    }
}

/// Runs the server until SIGINT or SIGTERM. Started by systemd's
/// `lume.socket` ([`activation`]), it serves the socket systemd passed and
/// nothing else; otherwise 127.0.0.1:PORT and the optional `--socket`.
pub fn serve(opts: ServeOptions) -> Result<()> {
    let activated = activation::listener()?;
    raise_open_files_limit();
    let limits = listen::Limits::from_env();
    let token = auth::read_token(opts.token_env.clone(), opts.token_file.as_deref())?;
    if std::env::var_os("LUME_API_TOKEN").is_some() {
        // SAFETY: no other thread runs yet (the runtime is built below), so
        // nothing reads the environment concurrently. The VMs this server
        // starts must not inherit the secret.
        unsafe { std::env::remove_var("LUME_API_TOKEN") };
    }
    let addrs = if activated.is_some() {
        Vec::new()
    } else {
        listen_addresses(&opts.host, opts.port, token.is_some())?
    };
    let storage = opts
        .storage
        .as_deref()
        .map(std::path::absolute)
        .transpose()
        .context("Cannot resolve the --storage path")?;
    // A corrupt config.yaml or an unknown apiGroup stops the server now
    // rather than every request.
    let settings = crate::settings::Settings::load()?;
    let group = match (&opts.api_group, &opts.handoff_group) {
        (Some(name), _) => Some(named_group(name)?),
        (None, handoff) => match api_group(&settings)? {
            Some(g) => Some(g),
            // Our own socket goes to the hand-off group when no API group is named.
            None => handoff.as_deref().map(named_group).transpose()?,
        },
    };
    if let Some(name) = &opts.handoff_group {
        named_group(name)?;
    }
    let root = Store::new(storage.clone()).root().to_path_buf();
    let has_token = token.is_some();
    let mut state = AppState::new(storage, token);
    state.api_group = opts.api_group.clone();
    state.handoff_group = opts.handoff_group.clone();
    let state = Arc::new(state);
    let app = router(state);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("Cannot start the async runtime")?;
    let socket = opts.socket.clone();
    runtime.block_on(async move {
        let who = if has_token {
            "API token required".to_string()
        } else {
            let sudo = auth::sudo_uid().map(|uid| {
                let name = nix::unistd::User::from_uid(uid.into())
                    .ok()
                    .flatten()
                    .map(|u| u.name);
                (uid, name)
            });
            served_without_token(
                group.as_ref().map(|g| g.name.as_str()),
                sudo.as_ref().map(|(uid, name)| (*uid, name.as_deref())),
            )
        };
        let listener = if activated.is_some() {
            None
        } else {
            let l = tokio::net::TcpListener::bind(&addrs[..])
                .await
                .with_context(|| format!("Cannot listen on {}:{}", opts.host, opts.port))?;
            Some(l)
        };
        // systemd's socket, or our own (removed at exit: systemd's stays).
        let unix = if activated.is_some() {
            None
        } else {
            socket
                .as_deref()
                .map(|p| socket::bind(p, group.as_ref().map(|g| g.gid)))
                .transpose()?
        };
        let std_listener = match (&activated, &unix) {
            (Some(l), _) => Some(l.try_clone()?),
            (None, Some(b)) => Some(b.listener.try_clone()?),
            (None, None) => None,
        };
        let unix_listener = std_listener
            .map(|l| {
                l.set_nonblocking(true)?;
                tokio::net::UnixListener::from_std(l)
            })
            .transpose()
            .context("Cannot listen on the Unix socket")?;
        // Announced once every listener is ready (the Unix socket's mode
        // and group set): clients wait for this line.
        if let Some(l) = &listener {
            log(&format!(
                "lume API listening on http://{} (VMs in {}; {who})",
                l.local_addr()?,
                root.display(),
            ));
        }
        if let Some(l) = &activated {
            let path = l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(Path::to_path_buf))
                .unwrap_or_default();
            log(&format!(
                "lume API listening on unix:{} (passed by systemd; VMs in {}; {})",
                path.display(),
                root.display(),
                // No TCP listener here: the socket's mode and group decide.
                who.replacen("loopback only, ", "", 1)
            ));
        } else if let Some(p) = &socket {
            log(&format!(
                "lume API listening on unix:{} (mode 0660, group {})",
                p.display(),
                group.as_ref().map_or("unchanged", |g| g.name.as_str())
            ));
        }
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown_signal().await;
            let _ = stop_tx.send(true);
        });
        let gate = listen::Gate::new(limits);
        let tcp = async {
            if let Some(l) = listener {
                listen::serve(l, app.clone(), gate.clone(), stop_rx.clone()).await;
            }
        };
        let unix_served = async {
            if let Some(l) = unix_listener {
                listen::serve(l, app.clone(), gate.clone(), stop_rx.clone()).await;
            }
        };
        tokio::join!(tcp, unix_served);
        gate.drained().await;
        if let Some(bound) = &unix {
            bound.remove();
        }
        Ok::<(), anyhow::Error>(())
    })?;
    log("Stopped");
    Ok(())
}

/// The group `--api-group` names, which must exist.
fn named_group(name: &str) -> Result<nix::unistd::Group> {
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(g),
        _ => bail!(
            "Group '{name}' given with --api-group or --handoff-group does not exist: create it (addgroup --system {name}) or reinstall the lume package"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kept_log_is_bounded() {
        // Other tests may log meanwhile: only this test's marked lines count.
        let marker = "kept-log-test";
        log(&format!("{marker} GET /{} -> 404", "é".repeat(3000)));
        for i in 0..LOG_LINES_KEPT {
            log(&format!("{marker} line {i}"));
        }
        let kept = recent_log();
        assert_eq!(kept.iter().filter(|l| !l.error).count(), LOG_LINES_KEPT);
        assert!(kept.iter().filter(|l| l.error).count() <= ERROR_LINES_KEPT);
        assert!(kept.iter().all(|l| l.text.len() <= LOG_LINE_KEPT_BYTES + 6));
        assert!(
            !kept.iter().any(|l| l.text.contains("GET /é")),
            "the oldest went"
        );
        log_error(&format!(
            "{marker} {}",
            "x".repeat(10 * LOG_LINE_KEPT_BYTES)
        ));
        let cut = recent_log()
            .into_iter()
            .rfind(|l| l.error && l.text.contains(marker))
            .unwrap();
        assert!(cut.text.ends_with(" [cut]"));
        assert!(
            cut.text.len() <= LOG_LINE_KEPT_BYTES + 6,
            "{}",
            cut.text.len()
        );
    }

    /// A flood of access lines never pushes a failure out, and no line can
    /// carry a newline, carriage return or escape sequence.
    #[test]
    fn errors_outlive_floods_and_control_characters_are_escaped() {
        let marker = "errors-outlive-test";
        log_error(&format!("{marker} import failed\nforged line\r\u{1b}[2J"));
        for i in 0..2 * LOG_LINES_KEPT {
            log(&format!("{marker} GET /lume/vms/x{i} -> 404"));
        }
        let kept = recent_log();
        let err = kept
            .iter()
            .find(|l| l.error && l.text.contains(marker))
            .expect("the error line is still kept");
        assert!(
            err.text
                .ends_with("import failed\\nforged line\\r\\u{1b}[2J"),
            "{}",
            err.text
        );
        assert!(kept.iter().all(|l| !l.text.chars().any(char::is_control)));
        // Oldest first across both buffers.
        assert!(kept.windows(2).all(|w| w[0].seq < w[1].seq));
        assert_eq!(escape_controls("a\tb\u{7f}é"), "a\\tb\\u{7f}é");
    }

    /// A caller refused again and again writes a bounded number of lines
    /// per minute, and the rest are counted in one line; others are not
    /// held back by it.
    #[test]
    fn refusal_lines_are_limited_per_caller() {
        let mut r = Refusals {
            since: None,
            counts: Default::default(),
        };
        let t0 = Instant::now();
        let printed = (0..1000)
            .filter(|_| count_refusal(&mut r, "uid 65534", t0).0)
            .count();
        assert_eq!(printed, REFUSAL_LINES_PER_MINUTE as usize);
        assert!(count_refusal(&mut r, "uid 1000", t0).0);
        let (print, summaries) = count_refusal(&mut r, "uid 65534", t0 + Duration::from_secs(61));
        assert!(print);
        assert_eq!(
            summaries,
            [format!(
                "{} more lines about refused requests from uid 65534 were not logged",
                1000 - REFUSAL_LINES_PER_MINUTE
            )]
        );
        assert_eq!(r.counts.len(), 1);
    }

    #[test]
    fn the_start_line_names_the_sudo_user() {
        assert_eq!(
            served_without_token(None, None),
            "no API token: loopback only, for root and the server's user"
        );
        assert_eq!(
            served_without_token(Some("lume"), None),
            "no API token: loopback only, for root, the server's user and group 'lume'"
        );
        assert_eq!(
            served_without_token(Some("lume"), Some((1000, Some("alice")))),
            "no API token: loopback only, for root, the server's user, sudo user alice (uid 1000, this VM location only) and group 'lume'"
        );
        assert_eq!(
            served_without_token(None, Some((1234, None))),
            "no API token: loopback only, for root, the server's user and sudo user uid 1234 (this VM location only)"
        );
    }

    #[test]
    fn non_loopback_needs_a_token() {
        assert!(listen_addresses("127.0.0.1", 7777, false).is_ok());
        assert!(listen_addresses("::1", 7777, false).is_ok());
        let e = listen_addresses("0.0.0.0", 7777, false).unwrap_err();
        assert!(e.to_string().contains("LUME_API_TOKEN"), "{e}");
        assert!(e.to_string().contains("--token-file"), "{e}");
        assert!(listen_addresses("0.0.0.0", 7777, true).is_ok());
    }

    #[test]
    fn local_authorities() {
        for ok in [
            "localhost",
            "LOCALHOST:7777",
            "127.0.0.1",
            "127.0.0.1:7777",
            "127.1.2.3:80",
            "[::1]:7777",
            "[::1]",
        ] {
            assert!(is_local_authority(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:7777",
            "localhost.evil.example",
            "192.0.2.1:7777",
            "[2001:db8::1]:7777",
            "",
            "null",
        ] {
            assert!(!is_local_authority(bad), "{bad}");
        }
    }

    #[test]
    fn the_document_lists_every_route() {
        let state = Arc::new(AppState::new(None, None));
        let _ = router(state.clone());
        let doc = state.openapi.get().unwrap();
        let paths: Vec<&str> = doc["paths"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        for p in [
            "/lume/vms",
            "/lume/vms/{name}",
            "/lume/vms/{name}/run",
            "/lume/vms/{name}/stop",
            "/lume/vms/{name}/shutdown",
            "/lume/vms/{name}/restart",
            "/lume/vms/clone",
            "/lume/config",
            "/lume/host/status",
            "/lume/network/interfaces",
            "/openapi.json",
        ] {
            assert!(paths.contains(&p), "{p} missing from {paths:?}");
        }
        assert!(doc["openapi"].as_str().unwrap().starts_with('3'));
    }
}
