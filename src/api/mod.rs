//! `lume serve`: an HTTP API compatible with lume's REST API (JSON under
//! `/lume/...`), the second door to the same actions as the CLI. Every route
//! builds a [`crate::vm::Action`] and runs [`crate::vm::execute`] on a
//! blocking thread. VMs are started detached, with their own supervisors, so
//! they outlive the server and the CLI sees them like its own.
//!
//! Loopback only by default; any other address needs a token, and with a
//! token every request must carry `Authorization: Bearer TOKEN`.

pub mod error;
pub mod extract;
pub mod routes;

use std::collections::HashMap;
use std::io::Write as _;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use anyhow::{Context as _, Result, bail};
use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
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
    /// Required on non-loopback addresses; when set, required on every request.
    pub token: Option<String>,
    /// The VM location (`--storage`), else the default.
    pub storage: Option<PathBuf>,
}

/// What every request sees.
#[derive(Debug, Default)]
pub struct AppState {
    storage: Option<PathBuf>,
    token: Option<String>,
    /// The OpenAPI document, set once the router is built.
    openapi: OnceLock<serde_json::Value>,
    /// One turn lock per VM (storage root + name) for VM-changing requests.
    turns: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
}

impl AppState {
    pub fn new(storage: Option<PathBuf>, token: Option<String>) -> Self {
        Self {
            storage,
            token,
            ..Self::default()
        }
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
        (name = "network", description = "Host networking"),
        (name = "meta", description = "This API"),
    )
)]
struct ApiDoc;

/// Writes one timestamped line to the server's log (stderr).
pub fn log(line: &str) {
    let _ = writeln!(
        std::io::stderr(),
        "[{}] {line}",
        crate::util::time::timestamp()
    );
}

/// The router and its OpenAPI document, both built from the routes'
/// `#[utoipa::path]` annotations: a route cannot be missing from the document.
pub fn router(state: Arc<AppState>) -> Router {
    let (router, mut doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(routes::list_vms, routes::create_vm))
        .routes(routes!(routes::get_vm, routes::set_vm, routes::delete_vm))
        .routes(routes!(routes::run_vm))
        .routes(routes!(routes::stop_vm))
        .routes(routes!(routes::clone_vm))
        .routes(routes!(routes::get_config))
        .routes(routes!(routes::host_status))
        .routes(routes!(routes::network_interfaces))
        .routes(routes!(routes::network_doctor))
        .routes(routes!(routes::openapi_json))
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
        .fallback(routes::no_route)
        .method_not_allowed_fallback(routes::wrong_method)
        .layer(DefaultBodyLimit::max(extract::BODY_LIMIT))
        .layer(middleware::from_fn_with_state(state.clone(), require_token))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            refuse_web_pages,
        ))
        .layer(middleware::from_fn(access_log))
        .with_state(state)
}

/// Compares without an early exit, so the time taken says nothing about the token.
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    let mut diff = given.len() ^ expected.len();
    for (i, b) in expected.iter().enumerate() {
        diff |= usize::from(given.get(i).copied().unwrap_or(0) ^ b);
    }
    diff == 0
}

async fn require_token(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(token) = &st.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim());
        match given {
            Some(t) if same_secret(t.as_bytes(), token.as_bytes()) => {}
            Some(_) => {
                return ApiError::new(StatusCode::UNAUTHORIZED, "Wrong API token").into_response();
            }
            None => {
                return ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "This server needs an API token: send the header 'Authorization: Bearer TOKEN'",
                )
                .into_response();
            }
        }
    }
    next.run(req).await
}

/// Whether a `Host` header value or an origin's authority names this machine
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

/// Without a token, anyone who can make a request is trusted; so a web page
/// must not be able to make one. Browsers send `Origin` with cross-site
/// requests (CSRF), and a DNS name rebound to 127.0.0.1 still carries its own
/// `Host`: both are refused unless they name this machine. Programs (curl,
/// SDKs) send neither, or local ones.
async fn refuse_web_pages(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if st.token.is_none() {
        let header_value = |name| {
            req.headers()
                .get(name)
                .map(|v| v.to_str().unwrap_or("?").to_string())
        };
        if let Some(origin) = header_value(header::ORIGIN) {
            let authority = origin.split_once("://").map_or("", |(_, a)| a);
            if !is_local_authority(authority.trim_end_matches('/')) {
                return ApiError::new(
                    StatusCode::FORBIDDEN,
                    format!(
                        "Requests from web pages are refused (Origin: {origin}): without an API token only local programs may use this API"
                    ),
                )
                .into_response();
            }
        }
        if let Some(host) = header_value(header::HOST)
            && !is_local_authority(&host)
        {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "Host '{host}' is refused: without an API token this API answers only to localhost and loopback addresses"
                ),
            )
            .into_response();
        }
    }
    next.run(req).await
}

async fn access_log(req: Request, next: Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let start = Instant::now();
    let response = next.run(req).await;
    log(&format!(
        "{method} {path} -> {} ({} ms)",
        response.status().as_u16(),
        start.elapsed().as_millis()
    ));
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
    let parent = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let (_, rest) = s.rsplit_once(')')?;
            rest.split_whitespace().nth(1)?.parse::<u32>().ok()
        });
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
fn listen_addresses(opts: &ServeOptions) -> Result<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = (opts.host.as_str(), opts.port)
        .to_socket_addrs()
        .with_context(|| format!("Cannot resolve the listen address '{}'", opts.host))?
        .collect();
    if addrs.is_empty() {
        bail!("The listen address '{}' resolves to nothing", opts.host);
    }
    if opts.token.is_none()
        && let Some(open) = addrs.iter().find(|a| !a.ip().is_loopback())
    {
        bail!(
            "Refusing to listen on {open} without an API token: anyone who can reach that address could control your VMs. \
             Give a token with --token TOKEN (or the LUME_API_TOKEN environment variable), or listen on 127.0.0.1"
        );
    }
    Ok(addrs)
}

/// Checks the token: printable ASCII without spaces, so it fits in a header.
fn check_token(token: Option<String>) -> Result<Option<String>> {
    let token = token.filter(|t| !t.is_empty());
    if let Some(t) = &token
        && !t.bytes().all(|b| b.is_ascii_graphic())
    {
        bail!("The API token must be printable ASCII without spaces");
    }
    Ok(token)
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

/// Runs the server until SIGINT or SIGTERM.
pub fn serve(opts: ServeOptions) -> Result<()> {
    let token = check_token(opts.token.clone())?;
    let opts = ServeOptions { token, ..opts };
    let addrs = listen_addresses(&opts)?;
    let storage = opts
        .storage
        .as_deref()
        .map(std::path::absolute)
        .transpose()
        .context("Cannot resolve the --storage path")?;
    // A corrupt config.yaml stops the server now rather than every request.
    crate::settings::Settings::load()?;
    let root = Store::new(storage.clone()).root().to_path_buf();
    let state = Arc::new(AppState::new(storage, opts.token.clone()));
    let app = router(state);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("Cannot start the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&addrs[..])
            .await
            .with_context(|| format!("Cannot listen on {}:{}", opts.host, opts.port))?;
        let local = listener.local_addr()?;
        log(&format!(
            "lume API listening on http://{local} (VMs in {}; {})",
            root.display(),
            if opts.token.is_some() {
                "API token required"
            } else {
                "no API token: loopback only"
            }
        ));
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown_signal())
            .await
            .context("The HTTP server failed")
    })?;
    log("Stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(host: &str, token: Option<&str>) -> ServeOptions {
        ServeOptions {
            host: host.into(),
            port: 7777,
            token: token.map(String::from),
            storage: None,
        }
    }

    #[test]
    fn non_loopback_needs_a_token() {
        assert!(listen_addresses(&opts("127.0.0.1", None)).is_ok());
        assert!(listen_addresses(&opts("::1", None)).is_ok());
        let e = listen_addresses(&opts("0.0.0.0", None)).unwrap_err();
        assert!(e.to_string().contains("--token"), "{e}");
        assert!(listen_addresses(&opts("0.0.0.0", Some("s3cret"))).is_ok());
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abd", b"abc"));
        assert!(!same_secret(b"ab", b"abc"));
        assert!(!same_secret(b"abcd", b"abc"));
        assert!(!same_secret(b"", b"abc"));
        assert_eq!(check_token(Some(String::new())).unwrap(), None);
        assert!(check_token(Some("a b".into())).is_err());
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
