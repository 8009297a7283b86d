//! The routes: each one turns a request into a [`crate::vm::Action`], runs it
//! with [`crate::vm::execute`] on a blocking thread, and answers with the
//! outcome as JSON. Nothing here changes a VM by itself.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiQuery, JsonBody, OptionalJsonBody, VmPath, Who};
use crate::compat::{MACOS_ONLY, NOT_YET};
use crate::image::{ImageSource, Sha256Digest};
use crate::network::NetworkMode;
use crate::network::interfaces::HostInterface;
use crate::network::publish::PortMapping;
use crate::settings::Settings;
use crate::vm::actions::begin_create;
use crate::vm::config::{DEFAULT_DISPLAY, MacAddress};
use crate::vm::details::VmDetails;
use crate::vm::location;
use crate::vm::size::parse_size;
use crate::vm::store::Store;
use crate::vm::{Action, Caller, Context, CreateSpec, Outcome, RunSpec, SetSpec, VmName, execute};

type ApiResult<T> = Result<T, ApiError>;

/// `?storage=`: the VM location of this request (an absolute path; absent or
/// `default` means the server's location).
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct StorageQuery {
    /// VM location: an absolute path; absent or `default` for the server's location.
    /// Only a caller who is the user the server runs as may name another
    /// location (else 403); the user who ran `sudo lume serve` may not.
    pub storage: Option<String>,
}

/// A field sent as `null` is the same as a field left out.
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// `POST /lume/vms`. A field this server does not know is refused (400),
/// never dropped; lume's fields that need macOS are refused by name.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateVmRequest {
    /// VM name: 1 to 63 letters, digits, '.', '_' or '-', starting with a letter or digit.
    #[schema(example = "web")]
    pub name: String,
    /// `linux` (default); `macOS` is refused.
    #[schema(example = "linux")]
    pub os: Option<String>,
    /// Virtual CPUs (default 2).
    #[schema(example = 2)]
    pub cpu: Option<u32>,
    /// Memory size (default `2GB`).
    #[schema(example = "2GB")]
    pub memory: Option<String>,
    /// Disk size (default `20GB`).
    #[schema(example = "20GB")]
    pub disk_size: Option<String>,
    /// WIDTHxHEIGHT, recorded for lume compatibility (default `1024x768`).
    #[schema(example = "1024x768")]
    pub display: Option<String>,
    /// nat, bridged, bridged:<interface>, host, user, none (default nat).
    // (utoipa reads only literal doc comments: the test
    // network::mode::every_help_text_prints_the_list keeps this one in step
    // with `network_modes!`.)
    #[schema(example = "user")]
    pub network: Option<String>,
    /// VM location: an absolute path; absent or `default` for the server's location.
    pub storage: Option<String>,
    /// Absolute path of a kernel for direct kernel boot (copied into the VM).
    pub kernel: Option<String>,
    /// Absolute path of an initrd (needs `kernel`).
    pub initrd: Option<String>,
    /// Kernel command line (needs `kernel`).
    pub cmdline: Option<String>,
    /// The disk to import: the absolute path of a qcow2, raw or xz-compressed
    /// raw image (opened with the caller's rights), or an http:// or
    /// https:// URL that the server downloads. With a URL the answer is 202
    /// and the VM is listed as `provisioning` until the import ends.
    pub image: Option<String>,
    /// Expected SHA-256 of the image file (64 hex digits).
    pub image_sha256: Option<String>,
    /// Default: a random locally administered address.
    #[schema(example = "52:54:00:12:34:56")]
    pub mac_address: Option<String>,
    /// Ports published at every start: `[HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|/udp]`.
    #[serde(default, deserialize_with = "null_as_default")]
    #[schema(example = json!(["127.0.0.1:8080:80"]))]
    pub publish: Vec<String>,
    /// Absolute path of the caller's own cloud-init user-data, combined with
    /// lume's (see docs/images.md).
    pub cloud_init: Option<String>,
    /// No cloud-init seed at all.
    #[serde(default, deserialize_with = "null_as_default")]
    pub no_cloud_init: bool,
    /// User `lume` gets no password (key logins only).
    #[serde(default, deserialize_with = "null_as_default")]
    pub no_password: bool,
    /// lume's macOS restore image: refused (macOS guests need an Apple host).
    #[schema(value_type = Option<String>)]
    pub ipsw: Option<Value>,
    /// lume's unattended macOS setup: refused (macOS guests need an Apple host).
    #[schema(value_type = Option<String>)]
    pub unattended: Option<Value>,
    /// Egress rules and isolation, enforced in nat, host and bridged mode
    /// (docs/networking.md).
    pub network_policy: Option<NetworkPolicyBody>,
}

/// A VM's network policy in a request (lume for Linux only).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkPolicyBody {
    /// Once any is given, everything else outbound is denied except DHCP
    /// and DNS to lume: `CIDR[:PORT|:LOW-HIGH][/tcp|/udp]`.
    /// An empty list is refused: it would read as "allow nothing" but
    /// mean no allow list at all.
    #[serde(default)]
    #[schema(example = json!(["198.51.100.2/32:443/tcp"]))]
    pub allow_out: Option<Vec<String>>,
    /// Denied destinations, checked before `allowOut`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub deny_out: Vec<String>,
    /// Nothing to the host, its networks, private ranges or other VMs.
    #[serde(default)]
    pub isolate: bool,
}

fn policy(b: Option<NetworkPolicyBody>) -> ApiResult<Option<crate::network::policy::Policy>> {
    b.map(|b| {
        if b.allow_out.as_ref().is_some_and(Vec::is_empty) {
            return Err(ApiError::bad_request(
                "An empty networkPolicy.allowOut is refused: it would not deny anything (a policy allows everything until one allowOut rule is given). To deny all outbound traffic send \"denyOut\": [\"0.0.0.0/0\"]; to clear the policy send \"networkPolicy\": {}",
            ));
        }
        crate::network::policy::Policy::from_parts(
            b.allow_out.as_deref().unwrap_or_default(),
            &b.deny_out,
            b.isolate,
        )
        .map_err(|e| ApiError::bad_request(e.message(crate::vm::Door::Api)))
    })
    .transpose()
}

/// `PATCH /lume/vms/{name}`: the fields to change, from the next start.
/// With none, nothing changes and the answer is still 200 (as lume).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SetVmRequest {
    #[schema(example = 4)]
    pub cpu: Option<u32>,
    #[schema(example = "4GB")]
    pub memory: Option<String>,
    /// Grow only; the VM must be stopped.
    #[schema(example = "40GB")]
    pub disk_size: Option<String>,
    pub network: Option<String>,
    /// WIDTHxHEIGHT.
    #[schema(example = "1280x800")]
    pub display: Option<String>,
    pub storage: Option<String>,
    /// lume's macOS disk-resize option: refused when true.
    pub no_backup: Option<bool>,
    /// lume's macOS disk-resize option: refused when true.
    pub keep_backup: Option<bool>,
    /// lume's macOS disk-resize option: refused when true.
    pub dry_run: Option<bool>,
    /// Replaces the saved network policy; `{}` clears it.
    pub network_policy: Option<NetworkPolicyBody>,
}

/// One path or several.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

/// `POST /lume/vms/{name}/run` (the body may be left out).
/// lume's `SharedDirectoryRequest` in a run body.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SharedDirectoryRequest {
    pub host_path: String,
    pub read_only: Option<bool>,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RunVmRequest {
    /// Network mode for this run only.
    pub network: Option<String>,
    /// A network policy for this run only, replacing the saved one.
    pub network_policy: Option<NetworkPolicyBody>,
    /// Absolute path(s) of ISO images to attach read-only.
    pub mount: Option<OneOrMany>,
    /// Absolute paths of extra disks (raw or qcow2).
    #[serde(default, deserialize_with = "null_as_default")]
    pub disks: Vec<String>,
    /// Ports published for this run, on top of the saved ones.
    #[serde(default, deserialize_with = "null_as_default")]
    pub publish: Vec<String>,
    pub storage: Option<String>,
    /// Accepted for lume compatibility: VMs always run headless (`false`
    /// is answered with a warning).
    pub no_display: Option<bool>,
    /// lume's shared directories: `[{hostPath, readOnly}]` (absolute paths,
    /// opened with the caller's rights; `readOnly` defaults to false).
    #[serde(default, deserialize_with = "null_as_default")]
    pub shared_directories: Vec<SharedDirectoryRequest>,
    /// Refused when true: there is no recovery mode for Linux guests.
    pub recovery_mode: Option<bool>,
    /// lume's disk in place of the VM's own: refused (not supported yet).
    pub disk_path: Option<String>,
    /// lume's NVRAM file: refused (macOS guests only).
    pub nvram_path: Option<String>,
    /// lume's clipboard sync: refused when true (not supported yet).
    pub clipboard: Option<bool>,
    /// Sent by lume's Python SDK (cua-computer); lume ignores it on run, and
    /// so does this server, saying so in the answer's `warnings`
    /// (change it with PATCH /lume/vms/{name}).
    #[schema(value_type = Option<Object>)]
    pub cpu: Option<Value>,
    /// As `cpu`.
    #[schema(value_type = Option<Object>)]
    pub memory: Option<Value>,
    /// Ours: discard the disk's changes when the VM stops
    /// (docs/snapshots.md).
    #[serde(default)]
    pub ephemeral: bool,
}

/// `POST /lume/vms/{name}/stop` (the body may be left out).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StopVmRequest {
    /// Seconds to wait for the ACPI power-off before forcing QEMU off (default 15, at most 3600).
    #[schema(example = 15)]
    pub timeout: Option<u64>,
    pub storage: Option<String>,
}

/// `POST /lume/vms/{name}/shutdown` and `/restart` (the body may be left
/// out): lume's options of `lume shutdown` and `lume restart`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GuestPowerRequest {
    /// SSH user for the SSH way (default `lume`).
    pub user: Option<String>,
    /// SSH and sudo password for the SSH way (default `lume`).
    pub password: Option<String>,
    /// Seconds for the SSH command and, for shutdown, for the guest to power
    /// off (default 30, at most 3600).
    #[schema(example = 30)]
    pub timeout: Option<u64>,
    /// Restart only: reset the VM when no graceful way works (not graceful).
    pub force: Option<bool>,
    pub storage: Option<String>,
}

impl GuestPowerRequest {
    fn login(&self) -> ApiResult<crate::guest::power::SshLogin> {
        Ok(crate::guest::power::SshLogin {
            user: self.user.clone().unwrap_or_else(|| "lume".into()),
            password: Some(self.password.clone().unwrap_or_else(|| "lume".into())),
            timeout: crate::vm::actions::stop_timeout(self.timeout.unwrap_or(30))?,
        })
    }
}

/// The response header that says which way a stop, shutdown or restart took:
/// `agent`, `ssh`, `acpi`, `reset` or `forced`.
pub const POWER_METHOD_HEADER: &str = "lume-power-method";

fn with_method(method: crate::guest::power::PowerMethod, m: Message) -> PowerResponse {
    let value = method.as_str();
    (
        [(
            axum::http::HeaderName::from_static(POWER_METHOD_HEADER),
            axum::http::HeaderValue::from_static(value),
        )],
        Json(m),
    )
}

type PowerResponse = (
    [(axum::http::HeaderName, axum::http::HeaderValue); 1],
    Json<Message>,
);

/// `POST /lume/vms/clone`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CloneVmRequest {
    /// The stopped VM to copy.
    #[schema(example = "web")]
    pub name: String,
    #[schema(example = "web2")]
    pub new_name: String,
    pub storage: Option<String>,
    /// The source VM's location (name or absolute path; default: the
    /// location holding it, else `storage`).
    pub source_location: Option<String>,
    /// Where the clone goes (name or absolute path; default: `storage`,
    /// else the server's own location).
    pub dest_location: Option<String>,
    /// Ours: clone this snapshot of the VM (O(1); the VM may run).
    pub snapshot: Option<String>,
}

/// lume's answer to a request that was done: `{"message": ...}` (stop,
/// set, delete; and shutdown, restart here).
#[derive(Debug, Serialize, ToSchema)]
pub struct Message {
    #[schema(example = "VM stopped successfully")]
    pub message: String,
}

impl Message {
    pub(super) fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }
}

/// lume's answer to create and run: `{message, name, status}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Accepted {
    #[schema(example = "VM creation started")]
    pub message: String,
    #[schema(example = "web")]
    pub name: String,
    /// The VM's status now: `provisioning` while an image URL is imported,
    /// `stopped` once created, `running` after run.
    #[schema(example = "provisioning")]
    pub status: crate::vm::details::VmStatus,
    /// What the server did not do of the request (present only when
    /// something was not applied).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// lume's answer to a clone.
#[derive(Debug, Serialize, ToSchema)]
pub struct Cloned {
    #[schema(example = "VM cloned successfully")]
    pub message: String,
    #[schema(example = "web")]
    pub source: String,
    #[schema(example = "web2")]
    pub destination: String,
}

/// `GET /lume/host/status`, in lume's snake_case keys. As in lume,
/// `vm_count` counts the running VMs.
#[derive(Debug, Serialize, ToSchema)]
pub struct HostStatus {
    #[schema(example = "healthy")]
    pub status: String,
    /// Running VMs (lume's meaning).
    pub vm_count: usize,
    /// How many VMs this host is meant to run at once: its number of CPUs
    /// (lume's figure is Apple's limit of 2; Linux has no such limit).
    pub max_vms: usize,
    /// `max_vms` minus the running VMs, at least 0.
    pub available_slots: usize,
    #[schema(example = "0.1.0")]
    pub version: String,
    /// Every VM of the server's location, running or not (ours).
    pub total_vms: usize,
}

/// `GET /lume/logs`: lume's query.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct LogsQuery {
    /// `info`, `error` or `all` (default).
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// Only the last this many lines of each.
    pub lines: Option<usize>,
}

/// `GET /lume/logs`: lume's keys, each the log's text (present as `type`
/// asks).
#[derive(Debug, Serialize, ToSchema)]
pub struct Logs {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub info: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

// ---------------------------------------------------------------------------
// Turning request fields into action fields: every mistake is a 400.

/// The 400 of a lume field or route this server does not support.
fn refused(what: &str, why: &str) -> ApiError {
    ApiError::bad_request(format!(
        "{what} is not supported by lume on Linux ({why}): leave it out of the request"
    ))
}

/// The 400 of a lume route this server does not have.
fn refused_route(what: &str, why: &str) -> ApiError {
    ApiError::bad_request(format!("{what} is not available in lume on Linux ({why})"))
}

/// Refuses lume's field `what` when `given`: never accepted and dropped.
fn refuse(given: bool, what: &str, why: &str) -> ApiResult<()> {
    if given {
        Err(refused(what, why))
    } else {
        Ok(())
    }
}

fn field<T, E: std::fmt::Display>(what: &str, r: Result<T, E>) -> ApiResult<T> {
    r.map_err(|e| ApiError::bad_request(format!("{what}: {e}")))
}

fn name(s: &str) -> ApiResult<VmName> {
    VmName::parse(s).map_err(|e| ApiError::bad_request(e.to_string()))
}

fn size(what: &str, s: Option<&str>) -> ApiResult<Option<u64>> {
    s.map(|s| field(what, parse_size(s))).transpose()
}

fn mode(s: Option<&str>) -> ApiResult<Option<NetworkMode>> {
    s.map(|s| field("network", NetworkMode::from_str(s)))
        .transpose()
}

fn ports(list: &[String]) -> ApiResult<Vec<PortMapping>> {
    list.iter()
        .map(|p| field("publish", PortMapping::from_str(p)))
        .collect()
}

/// A file the server should read: the path must be absolute (the server's
/// working directory means nothing to a client).
fn abs_path(what: &str, s: &str) -> ApiResult<PathBuf> {
    let p = Path::new(s);
    if p.is_absolute() {
        Ok(p.to_path_buf())
    } else {
        Err(ApiError::bad_request(format!(
            "The field {what} must be an absolute path on the server, not '{s}': give the full path, starting with /"
        )))
    }
}

fn opt_path(what: &str, s: Option<&str>) -> ApiResult<Option<PathBuf>> {
    s.map(|s| abs_path(what, s)).transpose()
}

/// Whether two absolute paths name the same place, by their components
/// alone (`/srv/vms/` and `/srv//vms` are `/srv/vms`). The file system is
/// not asked: what a path resolves to, or whether it exists, is never part
/// of the answer.
fn same_path(a: &Path, b: &Path) -> bool {
    a.components().eq(b.components())
}

/// The one answer to a refused `storage`, whatever the path is, whether it
/// exists and whoever owns it.
pub fn storage_refused(server_root: &Path) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        format!(
            "This storage is refused: this server uses only its own VM location ({}) for callers other than the user the server runs as. Leave storage out",
            server_root.display()
        ),
    )
}

/// The storage rule. A caller whose uid is the server's effective uid acts
/// with the server's own rights anyway and may name any location. Anyone
/// else may name only the server's own location (`server_root`), compared
/// as a path, never resolved: a location chosen by another user (and every
/// link in it) is never acted on by the server. Otherwise 403, the same
/// answer for every path.
pub fn allowed_storage(
    caller: &Caller,
    server_euid: u32,
    requested: &Path,
    server_root: &Path,
) -> ApiResult<()> {
    if caller.uid == server_euid || same_path(requested, server_root) {
        Ok(())
    } else {
        Err(storage_refused(server_root))
    }
}

// ---------------------------------------------------------------------------
// Running actions.

/// A request's `storage`, read as the CLI reads `--storage`
/// ([`location::resolve`]: a location name of the server's config.yaml,
/// else an absolute path): `None` for the server's own location (absent,
/// empty, or `default`, the name earlier releases reported).
///
/// A path through a symlink not owned by root ([`location::check_links`])
/// is refused: with the reason for the server's own user, with the one
/// answer to a refused storage ([`storage_refused`]) for anyone else.
fn requested_storage(storage: Option<&str>, refused_as: Option<&Path>) -> ApiResult<Option<Store>> {
    let spec = match storage.map(str::trim) {
        None | Some("") => return Ok(None),
        Some(s) => s,
    };
    let settings = Settings::load().map_err(|e| ApiError::internal(&e))?;
    let named = settings
        .locations()
        .map_err(|e| ApiError::internal(&e))?
        .iter()
        .any(|l| l.name == spec);
    if spec == "default" && !named {
        return Ok(None);
    }
    if !named && spec.contains('/') {
        abs_path("storage", spec)?;
    }
    location::resolve(&settings, spec)
        .map(|r| Some(r.store))
        .map_err(|e| match (&e, refused_as) {
            (location::LocationError::ForeignSymlink { .. }, Some(server_root)) => {
                storage_refused(server_root)
            }
            _ => ApiError::bad_request(crate::error_chain(&e)),
        })
}

impl AppState {
    /// The server's own VM location: its `--storage`, else `homeDirectory`,
    /// else the default.
    fn server_store(&self) -> Store {
        Store::new(self.storage.clone())
    }

    /// Where this request's VMs live, after [`allowed_storage`]. The
    /// server's own location is always the server's own path, never the
    /// caller's spelling of it.
    fn store(&self, caller: &Caller, storage: Option<&str>) -> ApiResult<Store> {
        let server = self.server_store();
        let refused_as = (!self.owns_server(caller)).then(|| server.root().to_path_buf());
        match requested_storage(storage, refused_as.as_deref())? {
            None => Ok(server),
            Some(store) => {
                allowed_storage(caller, self.euid, store.root(), server.root())?;
                if same_path(store.root(), server.root()) {
                    Ok(server)
                } else {
                    Ok(store)
                }
            }
        }
    }

    /// Whether `caller` may choose locations and change the server's
    /// config.yaml: the server's own user only (the storage rule).
    fn owns_server(&self, caller: &Caller) -> bool {
        caller.uid == self.euid
    }

    /// Every location a request without `storage` sees: the server's own,
    /// then (for the server's own user) each configured location in
    /// config.yaml's order.
    fn visible_stores(&self, caller: &Caller) -> ApiResult<Vec<Store>> {
        let mut out = vec![self.server_store()];
        if self.owns_server(caller) {
            let settings = Settings::load().map_err(|e| ApiError::internal(&e))?;
            for s in location::all_stores(&settings)
                .map_err(|e| ApiError::bad_request(crate::error_chain(&e)))?
            {
                if !out.iter().any(|o| same_path(o.root(), s.root())) {
                    out.push(s);
                }
            }
        }
        Ok(out)
    }

    /// lume's search for a VM named without `storage`: the first visible
    /// location holding it, as a `storage` value; `None` (the server's own
    /// location) when none does.
    fn storage_holding(&self, caller: &Caller, vm: &VmName) -> ApiResult<Option<String>> {
        for s in self.visible_stores(caller)? {
            if s.vm(vm).config_path().exists() || s.is_provisioning(vm) {
                // Its name (a configured location) or its absolute path:
                // either reads back as this location.
                return Ok(Some(s.location_name()));
            }
        }
        Ok(None)
    }

    /// The location whose turn locks a request takes: the requested
    /// location's path (only a valid storage is needed; nothing is decided
    /// here).
    fn turn_root(&self, caller: &Caller, storage: Option<&str>) -> ApiResult<PathBuf> {
        let server = self.server_store();
        let refused_as = (!self.owns_server(caller)).then(|| server.root().to_path_buf());
        Ok(requested_storage(storage, refused_as.as_deref())?
            .map(|s| s.root().to_path_buf())
            .unwrap_or_else(|| self.server_store().root().to_path_buf()))
    }

    /// Whether `caller` gets the member rules for its VMs' networks: anyone
    /// but root, the server's own user and the user who ran `sudo lume
    /// serve` (see [`crate::network::attach::AttachOptions::member`]).
    fn is_member(&self, caller: &Caller) -> bool {
        !(caller.is_root()
            || self.owns_server(caller)
            || super::auth::sudo_uid() == Some(caller.uid))
    }

    /// Settings are read for every request, like every CLI command reads
    /// them; the action runs for the request's caller.
    fn context(&self, caller: &Caller, storage: Option<&str>) -> ApiResult<Context> {
        Ok(Context {
            store: self.store(caller, storage)?,
            settings: Settings::load().map_err(|e| ApiError::internal(&e))?,
            caller: caller.clone(),
            member: self.is_member(caller),
        })
    }
}

/// Runs blocking work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(&e))?
}

/// Runs an action on a blocking thread: [`execute`] and its outcome.
pub(super) fn run(ctx: &Context, action: Action) -> ApiResult<Outcome> {
    execute(ctx, action, &mut |line: &str| super::log(line)).map_err(ApiError::from)
}

/// The one way routes read VMs: on a blocking thread, the request's
/// location is decided ([`AppState::context`]), then `f` runs there.
async fn in_location<T: Send + 'static>(
    st: &Arc<AppState>,
    caller: &Caller,
    storage: Option<&str>,
    f: impl FnOnce(&Context) -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    let (st, caller, storage) = (st.clone(), caller.clone(), storage.map(str::to_string));
    blocking(move || f(&st.context(&caller, storage.as_deref())?)).await
}

/// The one way routes change VMs: this server's turn on the VM is taken
/// first, so concurrent requests for one VM take turns (the VM's own locks
/// still arbitrate against the CLI and other servers); then, inside the
/// blocking action, the location is decided and `f` runs. Nothing is
/// checked before the turn, so nothing checked can change before the action.
pub(super) async fn on_vm<T: Send + 'static>(
    st: &Arc<AppState>,
    caller: &Caller,
    storage: Option<&str>,
    vm: &VmName,
    f: impl FnOnce(&Context) -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    let found = storage_of_vm(st, caller, storage, vm).await?;
    let storage = found.as_deref().or(storage);
    let _turn = st.vm_turn(&st.turn_root(caller, storage)?, vm).await;
    in_location(st, caller, storage, f).await
}

/// Without `storage`: the location holding `vm` (lume's search; see
/// [`AppState::storage_holding`]), as a `storage` value.
async fn storage_of_vm(
    st: &Arc<AppState>,
    caller: &Caller,
    storage: Option<&str>,
    vm: &VmName,
) -> ApiResult<Option<String>> {
    match storage {
        Some(s) if !s.trim().is_empty() => Ok(None),
        _ => {
            let (st2, caller2, vm2) = (st.clone(), caller.clone(), vm.clone());
            blocking(move || st2.storage_holding(&caller2, &vm2)).await
        }
    }
}

/// Runs a stop, shutdown or restart on `vm` and answers with its details and
/// the way it took (the one answer of the three power routes).
async fn power(
    st: &Arc<AppState>,
    caller: &Caller,
    storage: Option<&str>,
    vm: VmName,
    action: Action,
) -> ApiResult<PowerResponse> {
    on_vm(st, caller, storage, &vm, move |ctx| {
        let (method, message) = match run(ctx, action)? {
            Outcome::Stopped { method, .. } => (method, "VM stopped successfully"),
            Outcome::Restarted { method, .. } => (method, "VM restart requested"),
            o => return Err(unexpected(&o)),
        };
        Ok(with_method(method, Message::new(message)))
    })
    .await
}

pub(super) fn unexpected(o: &Outcome) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("Unexpected outcome of the action: {o:?}"),
    )
}

fn details(ctx: &Context, name: VmName) -> ApiResult<VmDetails> {
    match run(ctx, Action::Get { name })? {
        Outcome::Details(d) => Ok(d),
        o => Err(unexpected(&o)),
    }
}

// ---------------------------------------------------------------------------
// The routes. Their `#[utoipa::path]` annotations are the OpenAPI document;
// `super::router` registers each route from the same annotation.

/// List every VM (the JSON of `lume ls -f json`).
#[utoipa::path(get, path = "/lume/vms", tag = "vms", params(StorageQuery),
    responses(
        (status = 200, description = "Every VM, sorted by name", body = [VmDetails]),
        (status = 400, description = "Bad storage", body = ErrorBody),
        (status = 500, description = "The VM location cannot be read", body = ErrorBody),
    ))]
pub async fn list_vms(
    State(st): State<Arc<AppState>>,
    Who(caller): Who,
    ApiQuery(q): ApiQuery<StorageQuery>,
) -> ApiResult<Json<Vec<VmDetails>>> {
    if q.storage.as_deref().is_none_or(|s| s.trim().is_empty()) {
        // lume: every location (for other callers: the server's own only).
        return blocking(move || {
            let stores = st.visible_stores(&caller)?;
            let settings = Settings::load().map_err(|e| ApiError::internal(&e))?;
            location::list_every(&settings, &caller, stores, &mut |l: &str| super::log(l))
                .map(Json)
                .map_err(ApiError::from)
        })
        .await;
    }
    match in_location(&st, &caller, q.storage.as_deref(), |ctx| {
        run(ctx, Action::List)
    })
    .await?
    {
        Outcome::List(v) => Ok(Json(v)),
        o => Err(unexpected(&o)),
    }
}

/// Create a VM; answers 202 with lume's `{message, name, status}`. With an
/// image URL the answer comes as soon as the import starts: the VM is
/// listed with status `provisioning` until it is `stopped` (done) or gone
/// (failed; the error is in the server's log, GET /lume/logs). Otherwise
/// the VM is made before the answer (status `stopped`), and a failure is
/// an error answer.
#[utoipa::path(post, path = "/lume/vms", tag = "vms", request_body = CreateVmRequest,
    responses(
        (status = 202, description = "Created (`stopped`), or for an image URL the import started (`provisioning`)", body = Accepted),
        (status = 400, description = "Malformed JSON, an unknown field, `ipsw` or `unattended` (macOS only), a missing name, an invalid name, size, display, network mode, MAC, published port, path, URL or checksum, a missing kernel or image, an image lume does not import or whose checksum differs", body = ErrorBody),
        (status = 415, description = "A body without Content-Type: application/json", body = ErrorBody),
        (status = 409, description = "A VM of that name exists or is being provisioned", body = ErrorBody),
        (status = 413, description = "Body larger than 64 KiB", body = ErrorBody),
        (status = 500, description = "The VM could not be built", body = ErrorBody),
    ))]
pub async fn create_vm(
    State(st): State<Arc<AppState>>,
    Who(caller): Who,
    ApiQuery(q): ApiQuery<StorageQuery>,
    JsonBody(r): JsonBody<CreateVmRequest>,
) -> ApiResult<(StatusCode, Json<Accepted>)> {
    refuse(r.ipsw.is_some(), "ipsw", MACOS_ONLY)?;
    refuse(r.unattended.is_some(), "unattended", MACOS_ONLY)?;
    let vm = name(&r.name)?;
    // Saved in a VM of the server's location that root may run later
    // without the member rules: refused at once (runs check them again).
    if st.is_member(&caller) {
        crate::network::attach::check_member_ports(&ports(&r.publish)?)
            .map_err(|e| ApiError::new(StatusCode::FORBIDDEN, e.to_string()))?;
    }
    let display = r
        .display
        .as_deref()
        .map(|d| field("display", crate::vm::config::parse_display(d)))
        .transpose()?;
    let image = match r.image.as_deref() {
        Some(s) if s.contains("://") => Some(field("image", ImageSource::from_str(s))?),
        other => opt_path("image", other)?.map(ImageSource::Path),
    };
    let spec = CreateSpec {
        name: vm.clone(),
        os: r.os.unwrap_or_else(|| "linux".into()),
        cpu: r.cpu.unwrap_or(2),
        memory: size("memory", r.memory.as_deref())?.unwrap_or(2 << 30),
        disk_size: size("diskSize", r.disk_size.as_deref())?.unwrap_or(20 << 30),
        display: display.unwrap_or_else(|| DEFAULT_DISPLAY.into()),
        network: mode(r.network.as_deref())?.unwrap_or_default(),
        mac: r
            .mac_address
            .as_deref()
            .map(|m| field("macAddress", MacAddress::from_str(m)))
            .transpose()?,
        kernel: opt_path("kernel", r.kernel.as_deref())?,
        initrd: opt_path("initrd", r.initrd.as_deref())?,
        cmdline: r.cmdline,
        image_sha256: r
            .image_sha256
            .as_deref()
            .map(|h| field("imageSha256", Sha256Digest::from_str(h)))
            .transpose()?,
        progress: false,
        image,
        publish: ports(&r.publish)?,
        policy: policy(r.network_policy)?.unwrap_or_default(),
        cloud_init: opt_path("cloudInit", r.cloud_init.as_deref())?,
        no_cloud_init: r.no_cloud_init,
        no_password: r.no_password,
        // A URL from the API may not lead the server to its own loopback
        // or private networks (SSRF), unless its owner allows it.
        url_destinations: crate::image::download::Destinations::PublicOnly,
    };
    let storage = r.storage.as_deref().or(q.storage.as_deref());
    if spec.image.as_ref().is_some_and(ImageSource::is_url) {
        // Checked and visible as `provisioning` before the answer; the
        // download runs on a thread of its own.
        let slot = st.background_slot(caller.uid)?;
        let details = on_vm(&st, &caller, storage, &vm, move |ctx| {
            let pending = begin_create(ctx, spec).map_err(ApiError::from)?;
            let details = pending.details();
            std::thread::spawn(move || {
                let _slot = slot;
                let name = pending.name().clone();
                match pending.finish(&mut |line: &str| super::log(line)) {
                    Ok(_) => super::log(&format!("VM '{name}' created from its image")),
                    Err(e) => super::log_error(&format!(
                        "Creating VM '{name}' failed: {}",
                        crate::error_chain(&e)
                    )),
                }
            });
            Ok(details)
        })
        .await?;
        return Ok((
            StatusCode::ACCEPTED,
            Json(Accepted {
                message: "VM creation started".into(),
                name: details.name,
                status: details.status,
                warnings: Vec::new(),
            }),
        ));
    }
    let action = Action::Create(Box::new(spec));
    match on_vm(&st, &caller, storage, &vm, |ctx| run(ctx, action)).await? {
        Outcome::Created(d) => Ok((
            StatusCode::ACCEPTED,
            Json(Accepted {
                message: "VM created".into(),
                name: d.name,
                status: d.status,
                warnings: Vec::new(),
            }),
        )),
        o => Err(unexpected(&o)),
    }
}

/// One VM (the JSON of `lume get NAME -f json`).
#[utoipa::path(get, path = "/lume/vms/{name}", tag = "vms",
    params(("name" = String, Path, description = "VM name"), StorageQuery),
    responses(
        (status = 200, description = "The VM", body = VmDetails),
        (status = 400, description = "Invalid name", body = ErrorBody),
        (status = 404, description = "No such VM", body = ErrorBody),
        (status = 500, description = "Its config.json cannot be read", body = ErrorBody),
    ))]
pub async fn get_vm(
    State(st): State<Arc<AppState>>,
    Who(caller): Who,
    VmPath(vm): VmPath,
    ApiQuery(q): ApiQuery<StorageQuery>,
) -> ApiResult<Json<VmDetails>> {
    get_vm_named(st, caller, vm, q).await
}

async fn get_vm_named(
    st: Arc<AppState>,
    caller: Caller,
    vm: VmName,
    q: StorageQuery,
) -> ApiResult<Json<VmDetails>> {
    let key = (caller.uid, vm.to_string());
    let res = match storage_of_vm(&st, &caller, q.storage.as_deref(), &vm).await {
        Ok(found) => {
            let storage = found.as_deref().or(q.storage.as_deref());
            let v = vm.clone();
            in_location(&st, &caller, storage, move |ctx| details(ctx, v)).await
        }
        Err(e) => Err(e),
    };
    // No such VM, but this caller's background pull of that name failed
    // lately: that failure, as lume (`Pull failed for 'NAME': …`).
    match res {
        Err(e) if e.status == StatusCode::NOT_FOUND => {
            let mut failures = st.pull_failures.lock().unwrap_or_else(|p| p.into_inner());
            failures.retain(|_, (_, at)| at.elapsed() < super::PULL_FAILURE_KEPT);
            match failures.get(&key) {
                Some((why, _)) => Err(ApiError::bad_request(format!(
                    "Pull failed for '{vm}': {why}"
                ))),
                None => Err(e),
            }
        }
        r => r.map(Json),
    }
}

/// Change a VM's CPU count, memory, disk size (grow only, VM stopped),
/// display or network mode, from its next start. Nothing to change is
/// not an error (as lume).
#[utoipa::path(patch, path = "/lume/vms/{name}", tag = "vms",
    params(("name" = String, Path, description = "VM name"), StorageQuery),
    request_body = SetVmRequest,
    responses(
        (status = 200, description = "Updated", body = Message),
        (status = 400, description = "An unknown field, noBackup, keepBackup or dryRun (macOS only), a bad size, display or network mode, a shrinking disk", body = ErrorBody),
        (status = 415, description = "A body without Content-Type: application/json", body = ErrorBody),
        (status = 404, description = "No such VM", body = ErrorBody),
        (status = 409, description = "Disk change while the VM runs, or the VM is busy", body = ErrorBody),
    ))]
pub async fn set_vm(
    State(st): State<Arc<AppState>>,
    Who(caller): Who,
    VmPath(vm): VmPath,
    ApiQuery(q): ApiQuery<StorageQuery>,
    JsonBody(r): JsonBody<SetVmRequest>,
) -> ApiResult<Json<Message>> {
    set_vm_named(st, caller, vm, q, r).await
}

async fn set_vm_named(
    st: Arc<AppState>,
    caller: Caller,
    vm: VmName,
    q: StorageQuery,
    r: SetVmRequest,
) -> ApiResult<Json<Message>> {
    refuse(r.no_backup == Some(true), "noBackup", MACOS_ONLY)?;
    refuse(r.keep_backup == Some(true), "keepBackup", MACOS_ONLY)?;
    refuse(r.dry_run == Some(true), "dryRun", MACOS_ONLY)?;
    let display = r
        .display
        .as_deref()
        .map(|d| field("display", crate::vm::config::parse_display(d)))
        .transpose()?;
    let spec = SetSpec {
        name: vm.clone(),
        cpu: r.cpu,
        memory: size("memory", r.memory.as_deref())?,
        disk_size: size("diskSize", r.disk_size.as_deref())?,
        network: mode(r.network.as_deref())?,
        display,
        policy: policy(r.network_policy)?,
    };
    let storage = r.storage.as_deref().or(q.storage.as_deref());
    match on_vm(&st, &caller, storage, &vm, |ctx| {
        run(ctx, Action::Set(spec))
    })
    .await?
    {
        Outcome::Updated(_) => Ok(Json(Message::new("VM settings updated successfully"))),
        o => Err(unexpected(&o)),
    }
}

/// Delete a VM and its disk; a running VM is stopped first.
#[utoipa::path(delete, path = "/lume/vms/{name}", tag = "vms",
    params(("name" = String, Path, description = "VM name"), StorageQuery),
    responses(
        (status = 200, description = "Deleted", body = Message),
        (status = 400, description = "Invalid name", body = ErrorBody),
        (status = 404, description = "No such VM", body = ErrorBody),
        (status = 409, description = "The VM is busy", body = ErrorBody),
    ))]
pub async fn delete_vm(
    State(st): State<Arc<AppState>>,
    Who(caller): Who,
    VmPath(vm): VmPath,
    ApiQuery(q): ApiQuery<StorageQuery>,
) -> ApiResult<Json<Message>> {
    delete_vm_named(st, caller, vm, q).await
}

async fn delete_vm_named(
    st: Arc<AppState>,
    caller: Caller,
    vm: VmName,
    q: StorageQuery,
) -> ApiResult<Json<Message>> {
    let action = Action::Delete {
        name: vm.clone(),
        force: true,
        confirmed: true,
    };
    match on_vm(&st, &caller, q.storage.as_deref(), &vm, |ctx| {
        run(ctx, action)
    })
    .await?
    {
        Outcome::Deleted(n) => Ok(Json(Message::new(format!("VM '{n}' deleted")))),
        o => Err(unexpected(&o)),
    }
}

/// Start a VM; answers 202 with lume's `{message, name, status}` once its
/// supervisor reports it running (a start that fails is an error answer,
/// never a 202). It keeps running when the server stops.
#[utoipa::path(post, path = "/lume/vms/{name}/run", tag = "vms",
    params(("name" = String, Path, description = "VM name"), StorageQuery),
    request_body(content = Option<RunVmRequest>, description = "Optional", content_type = "application/json"),
    responses(
        (status = 202, description = "Running", body = Accepted),
        (status = 400, description = "An unknown field; non-empty sharedDirectories, diskPath or clipboard (not yet), recoveryMode or nvramPath (macOS only); a bad network mode, published port or path, a missing ISO or disk", body = ErrorBody),
        (status = 415, description = "A body without Content-Type: application/json", body = ErrorBody),
        (status = 404, description = "No such VM", body = ErrorBody),
        (status = 409, description = "Already running, or busy", body = ErrorBody),
        (status = 500, description = "QEMU or the network could not be started", body = ErrorBody),
    ))]
pub async fn run_vm(
    State(st): State<Arc<AppState>>,
    Who(caller): Who,
    VmPath(vm): VmPath,
    ApiQuery(q): ApiQuery<StorageQuery>,
    OptionalJsonBody(r): OptionalJsonBody<RunVmRequest>,
) -> ApiResult<(StatusCode, Json<Accepted>)> {
    refuse(r.recovery_mode == Some(true), "recoveryMode", MACOS_ONLY)?;
    refuse(r.disk_path.is_some(), "diskPath", NOT_YET)?;
    refuse(r.nvram_path.is_some(), "nvramPath", MACOS_ONLY)?;
    refuse(r.clipboard == Some(true), "clipboard", NOT_YET)?;
    let mut warnings = Vec::new();
    if r.no_display == Some(false) {
        warnings.push("noDisplay false: there is no display to open here; VMs run headless".into());
    }
    for (given, what) in [(r.cpu.is_some(), "cpu"), (r.memory.is_some(), "memory")] {
        if given {
            warnings.push(format!(
                "{what} is not applied on run (as lume): change it with PATCH /lume/vms/{vm}"
            ));
        }
    }
    let spec = RunSpec {
        name: Some(vm.clone()),
        network: mode(r.network.as_deref())?,
        mounts: r
            .mount
            .map(OneOrMany::into_vec)
            .unwrap_or_default()
            .iter()
            .map(|m| abs_path("mount", m))
            .collect::<ApiResult<_>>()?,
        disks: r
            .disks
            .iter()
            .map(|d| abs_path("disks", d))
            .collect::<ApiResult<_>>()?,
        publish: ports(&r.publish)?,
        detach: true,
        policy: policy(r.network_policy)?.filter(|p| !p.is_empty()),
        ephemeral: r.ephemeral,
        shared_dirs: r
            .shared_directories
            .iter()
            .map(|s| {
                Ok((
                    abs_path("sharedDirectories hostPath", &s.host_path)?,
                    s.read_only.unwrap_or(false),
                ))
            })
            .collect::<ApiResult<_>>()?,
        ..Default::default()
    };
    let storage = r.storage.as_deref().or(q.storage.as_deref());
    // The supervisor is this server's child: it is reaped when it exits, even
    // if the client has gone away meanwhile.
    let name = vm.clone();
    let outcome = on_vm(&st, &caller, storage, &vm, move |ctx| {
        let outcome = run(ctx, Action::Run(spec))?;
        super::reap_supervisor(&ctx.store, &name);
        Ok(outcome)
    })
    .await?;
    match outcome {
        Outcome::Started(d) => Ok((
            StatusCode::ACCEPTED,
            Json(Accepted {
                message: "VM started".into(),
                name: d.name,
                status: d.status,
                warnings,
            }),
        )),
        o => Err(unexpected(&o)),
    }
}

/// Stop a VM: ask the guest to power off (guest agent, SSH, ACPI power
/// button, in that order), then force QEMU off after `timeout`. Answers once
/// it is stopped, with lume's `{"message": "VM stopped successfully"}`; the
/// header `Lume-Power-Method` says which way it took (`agent`, `ssh`,
/// `acpi`, `forced`). A VM that is not running is an error, as in lume.
#[utoipa::path(post, path = "/lume/vms/{name}/stop", tag = "vms",
    params(("name" = String, Path, description = "VM name"), StorageQuery),
    request_body(content = Option<StopVmRequest>, description = "Optional", content_type = "application/json"),
    responses(
        (status = 200, description = "Stopped", body = Message,
            headers(("lume-power-method" = String, description = "agent, ssh, acpi or forced"))),
        (status = 400, description = "Invalid name or timeout, an unknown field", body = ErrorBody),
        (status = 415, description = "A body without Content-Type: application/json", body = ErrorBody),
        (status = 404, description = "No such VM", body = ErrorBody),
        (status = 409, description = "The VM is not running (lume answers 400)", body = ErrorBody),
        (status = 500, description = "It did not stop", body = ErrorBody),
    ))]
pub async fn stop_vm(
    State(st): State<Arc<AppState>>,
    Who(caller): Who,
    VmPath(vm): VmPath,
    ApiQuery(q): ApiQuery<StorageQuery>,
    OptionalJsonBody(r): OptionalJsonBody<StopVmRequest>,
) -> ApiResult<PowerResponse> {
    // The same check, and the same message, as `lume stop --timeout`.
    let timeout = crate::vm::actions::stop_timeout(r.timeout.unwrap_or(15))?;
    let storage = r.storage.as_deref().or(q.storage.as_deref());
    let action = Action::Stop {
        name: vm.clone(),
        timeout,
    };
    power(&st, &caller, storage, vm, action).await
}

/// Gracefully shut down a VM (`lume shutdown`): guest agent, SSH, ACPI power
/// button, in that order; never forced. Answers once it is stopped, with
/// the header `Lume-Power-Method`.
#[utoipa::path(post, path = "/lume/vms/{name}/shutdown", tag = "vms",
    params(("name" = String, Path, description = "VM name"), StorageQuery),
    request_body(content = Option<GuestPowerRequest>, description = "Optional", content_type = "application/json"),
    responses(
        (status = 200, description = "Stopped", body = Message,
            headers(("lume-power-method" = String, description = "agent, ssh or acpi"))),
        (status = 400, description = "Invalid name or timeout", body = ErrorBody),
        (status = 404, description = "No such VM", body = ErrorBody),
        (status = 409, description = "The VM is not running", body = ErrorBody),
        (status = 500, description = "No way was accepted, or the guest did not power off in time", body = ErrorBody),
    ))]
pub async fn shutdown_vm(
    State(st): State<Arc<AppState>>,
    Who(caller): Who,
    VmPath(vm): VmPath,
    ApiQuery(q): ApiQuery<StorageQuery>,
    OptionalJsonBody(r): OptionalJsonBody<GuestPowerRequest>,
) -> ApiResult<PowerResponse> {
    let login = r.login()?;
    let storage = r.storage.as_deref().or(q.storage.as_deref());
    let action = Action::Shutdown {
        name: vm.clone(),
        timeout: login.timeout,
        login,
    };
    power(&st, &caller, storage, vm, action).await
}

/// Gracefully restart a VM (`lume restart`): guest agent, then SSH; with
/// `force`, a reset when neither works. Answers once the reboot was
/// requested, with the header `Lume-Power-Method` (`agent`, `ssh`, `reset`).
#[utoipa::path(post, path = "/lume/vms/{name}/restart", tag = "vms",
    params(("name" = String, Path, description = "VM name"), StorageQuery),
    request_body(content = Option<GuestPowerRequest>, description = "Optional", content_type = "application/json"),
    responses(
        (status = 200, description = "Reboot requested", body = Message,
            headers(("lume-power-method" = String, description = "agent, ssh or reset"))),
        (status = 400, description = "Invalid name or timeout", body = ErrorBody),
        (status = 404, description = "No such VM", body = ErrorBody),
        (status = 409, description = "The VM is not running", body = ErrorBody),
        (status = 500, description = "No graceful way worked and force was not given", body = ErrorBody),
    ))]
pub async fn restart_vm(
    State(st): State<Arc<AppState>>,
    Who(caller): Who,
    VmPath(vm): VmPath,
    ApiQuery(q): ApiQuery<StorageQuery>,
    OptionalJsonBody(r): OptionalJsonBody<GuestPowerRequest>,
) -> ApiResult<PowerResponse> {
    let login = r.login()?;
    let storage = r.storage.as_deref().or(q.storage.as_deref());
    let action = Action::Restart {
        name: vm.clone(),
        force: r.force.unwrap_or(false),
        login,
    };
    power(&st, &caller, storage, vm, action).await
}

/// Copy a stopped VM under a new name, with a new MAC address.
#[utoipa::path(post, path = "/lume/vms/clone", tag = "vms", params(StorageQuery),
    request_body = CloneVmRequest,
    responses(
        (status = 200, description = "Cloned", body = Cloned),
        (status = 400, description = "Malformed JSON, an unknown field, a missing or invalid name", body = ErrorBody),
        (status = 415, description = "A body without Content-Type: application/json", body = ErrorBody),
        (status = 404, description = "No such source VM", body = ErrorBody),
        (status = 409, description = "The source runs, or the new name exists", body = ErrorBody),
    ))]
pub async fn clone_vm(
    State(st): State<Arc<AppState>>,
    Who(caller): Who,
    ApiQuery(q): ApiQuery<StorageQuery>,
    JsonBody(r): JsonBody<CloneVmRequest>,
) -> ApiResult<Json<Cloned>> {
    let source = name(&r.name)?;
    let target = name(&r.new_name)?;
    let storage = r.storage.as_deref().or(q.storage.as_deref());
    let source_storage = r.source_location.as_deref().or(storage);
    // lume: the clone goes to destLocation, else the default location
    // (here: `storage` when given, else the server's own location).
    let dest_storage = r.dest_location.clone().or(storage.map(str::to_string));
    let (st2, caller2) = (st.clone(), caller.clone());
    let dest = blocking(move || st2.store(&caller2, dest_storage.as_deref())).await?;
    let action = Action::Clone {
        source: source.clone(),
        target,
        dest: Some(dest),
        snapshot: r.snapshot.clone(),
    };
    match on_vm(&st, &caller, source_storage, &source, |ctx| {
        run(ctx, action)
    })
    .await?
    {
        Outcome::Cloned { details, .. } => Ok(Json(Cloned {
            message: "VM cloned successfully".into(),
            source: r.name,
            destination: details.name,
        })),
        o => Err(unexpected(&o)),
    }
}

// A VM may be called `clone`: `/lume/vms/clone` is also its own path for
// GET, PATCH and DELETE (the static route would otherwise shadow it).

pub async fn get_vm_called_clone(
    State(st): State<Arc<AppState>>,
    Who(caller): Who,
    ApiQuery(q): ApiQuery<StorageQuery>,
) -> ApiResult<Json<VmDetails>> {
    get_vm_named(st, caller, name("clone")?, q).await
}

pub async fn set_vm_called_clone(
    State(st): State<Arc<AppState>>,
    Who(caller): Who,
    ApiQuery(q): ApiQuery<StorageQuery>,
    JsonBody(r): JsonBody<SetVmRequest>,
) -> ApiResult<Json<Message>> {
    set_vm_named(st, caller, name("clone")?, q, r).await
}

pub async fn delete_vm_called_clone(
    State(st): State<Arc<AppState>>,
    Who(caller): Who,
    ApiQuery(q): ApiQuery<StorageQuery>,
) -> ApiResult<Json<Message>> {
    delete_vm_named(st, caller, name("clone")?, q).await
}

fn yaml_to_json(v: &serde_yaml_ng::Value) -> Value {
    serde_json::to_value(v).unwrap_or_else(|_| {
        Value::String(
            serde_yaml_ng::to_string(v)
                .unwrap_or_default()
                .trim()
                .to_string(),
        )
    })
}

/// The server's settings (its own config.yaml): lume's `LumeSettings`
/// keys with their effective values (`vmLocations`, `defaultLocationName`,
/// `cacheDirectory`, `cachingEnabled`, `registry`, `telemetryEnabled`),
/// then every other key of the file, the effective `accelerator`, the
/// server's VM location (`homeDirectory`) and the file's path
/// (`settingsFile`).
#[utoipa::path(get, path = "/lume/config", tag = "config",
    responses(
        (status = 200, description = "The settings", body = Object, example = json!({
            "vmLocations": [{"name": "home", "path": "~/.lume"}],
            "defaultLocationName": "home",
            "cacheDirectory": "~/.lume/cache",
            "cachingEnabled": false,
            "registry": {"type": "ghcr", "ghcr": {"registry": "ghcr.io", "organization": "trycua"}},
            "telemetryEnabled": true,
            "settingsFile": "/root/.config/lume/config.yaml",
            "accelerator": "auto",
            "homeDirectory": "/root/.lume"
        })),
        (status = 400, description = "config.yaml cannot be used", body = ErrorBody),
    ))]
pub async fn get_config(
    State(st): State<Arc<AppState>>,
    Who(caller): Who,
) -> ApiResult<Json<Value>> {
    let store = st.store(&caller, None)?;
    blocking(move || {
        let bad = |e: crate::settings::SettingsError| ApiError::bad_request(crate::error_chain(&e));
        let settings = Settings::load().map_err(bad)?;
        let mut out = serde_json::Map::new();
        let reg = settings.registry().map_err(bad)?;
        out.insert(
            "vmLocations".into(),
            serde_json::to_value(settings.locations().map_err(bad)?)
                .map_err(|e| ApiError::internal(&e))?,
        );
        out.insert(
            "defaultLocationName".into(),
            settings.default_location_name().map_err(bad)?.into(),
        );
        out.insert(
            "cacheDirectory".into(),
            settings
                .get_str("cacheDirectory")
                .map_err(bad)?
                .unwrap_or_else(|| crate::settings::DEFAULT_CACHE_DIRECTORY.into())
                .into(),
        );
        out.insert(
            "cachingEnabled".into(),
            settings.caching_enabled().map_err(bad)?.into(),
        );
        out.insert(
            "registry".into(),
            serde_json::json!({
                "type": settings.registry_type().map_err(bad)?,
                "ghcr": {"registry": reg.registry, "organization": reg.organization},
            }),
        );
        out.insert(
            "telemetryEnabled".into(),
            settings.telemetry_enabled().map_err(bad)?.into(),
        );
        for (k, v) in settings.as_mapping() {
            let key = match k.as_str() {
                Some(s) => s.to_string(),
                None => serde_yaml_ng::to_string(k)
                    .unwrap_or_default()
                    .trim()
                    .to_string(),
            };
            if !crate::settings::LUME_KEYS.contains(&key.as_str()) {
                out.insert(key, yaml_to_json(v));
            }
        }
        out.insert(
            "settingsFile".into(),
            settings.file().display().to_string().into(),
        );
        let accel = match settings.accelerator().map_err(|e| ApiError::internal(&e))? {
            crate::hypervisor::accel::AccelChoice::Auto => "auto",
            crate::hypervisor::accel::AccelChoice::Kvm => "kvm",
            crate::hypervisor::accel::AccelChoice::Tcg => "tcg",
        };
        out.insert("accelerator".into(), accel.into());
        out.insert(
            "homeDirectory".into(),
            store.root().display().to_string().into(),
        );
        Ok(Json(Value::Object(out)))
    })
    .await
}

/// lume's `POST /lume/config` body (Handlers.swift `ConfigRequest`).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConfigRequest {
    /// The path of the location `home` (absolute or `~/…`).
    pub home_directory: Option<String>,
    /// The image cache folder (absolute or `~/…`).
    pub cache_directory: Option<String>,
    pub caching_enabled: Option<bool>,
}

/// lume's `{ "message": … }` answer of the config routes.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConfigMessage {
    pub message: String,
    /// Running VMs a change of `homeDirectory` or of the default location
    /// leaves in a directory that is no longer the default (left out when
    /// none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// lume's answer to an added location.
#[derive(Debug, Serialize, ToSchema)]
pub struct LocationAdded {
    pub message: String,
    pub name: String,
    pub path: String,
}

/// The config routes that change config.yaml: the server's own file, for
/// the server's own user only (the storage rule: other callers never choose
/// where the server keeps VMs). Others get 403.
fn config_owner(st: &AppState, caller: &Caller) -> ApiResult<()> {
    if st.owns_server(caller) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "Changing the server's settings is refused: only the user the server runs as may change its config.yaml and VM locations; ask that user, or change your own settings with the lume command",
        ))
    }
}

fn settings_error(e: &dyn std::error::Error) -> ApiError {
    ApiError::bad_request(crate::error_chain(e))
}

/// A change of config.yaml is a 400 with the reason when it fails (lume
/// answers 400 too).
struct SettingsChange(ApiError);

impl From<crate::settings::SettingsError> for SettingsChange {
    fn from(e: crate::settings::SettingsError) -> Self {
        Self(settings_error(&e))
    }
}

impl From<crate::registry::cache::CacheLocationError> for SettingsChange {
    fn from(e: crate::registry::cache::CacheLocationError) -> Self {
        Self(settings_error(&e))
    }
}

impl From<location::LocationError> for SettingsChange {
    fn from(e: location::LocationError) -> Self {
        Self(settings_error(&e))
    }
}

/// Changes the server's config.yaml under its update lock
/// ([`Settings::update`]), for its own user only ([`config_owner`]).
async fn change_settings<T: Send + 'static>(
    st: &AppState,
    caller: &Caller,
    f: impl FnOnce(&mut Settings) -> Result<T, SettingsChange> + Send + 'static,
) -> ApiResult<T> {
    config_owner(st, caller)?;
    blocking(move || Settings::update(f).map_err(|SettingsChange(e)| e)).await
}

/// Change lume's settings: `homeDirectory` (the path of location `home`),
/// `cacheDirectory`, `cachingEnabled`. A new directory is checked as the
/// CLI checks it (a directory the server's user may write; as root, none
/// another user can change) and created 0700.
#[utoipa::path(post, path = "/lume/config", tag = "config", request_body = ConfigRequest,
    responses(
        (status = 200, description = "Updated", body = ConfigMessage, example = json!({"message": "Configuration updated successfully"})),
        (status = 400, description = "Invalid body or value", body = ErrorBody),
        (status = 403, description = "Not the server's own user", body = ErrorBody),
    ))]
pub async fn update_config(
    State(st): State<Arc<AppState>>,
    Who(caller): Who,
    JsonBody(r): JsonBody<ConfigRequest>,
) -> ApiResult<Json<ConfigMessage>> {
    change_settings(&st, &caller, move |s| {
        let mut warnings = Vec::new();
        if let Some(home) = &r.home_directory {
            location::prepare_directory(home)?;
            let before = location::default_store(s).ok();
            s.set_home_directory(home)?;
            warnings.extend(before.and_then(|b| location::running_left_behind(&b, s)));
        }
        if let Some(cache) = &r.cache_directory {
            crate::registry::cache::prepare_directory(cache)?;
            s.set(
                "cacheDirectory",
                serde_yaml_ng::Value::String(cache.clone()),
            )?;
        }
        if let Some(on) = r.caching_enabled {
            s.set("cachingEnabled", serde_yaml_ng::Value::Bool(on))?;
        }
        Ok(Json(ConfigMessage {
            message: "Configuration updated successfully".into(),
            warnings,
        }))
    })
    .await
}

/// The VM locations of the server's config.yaml, in its order.
#[utoipa::path(get, path = "/lume/config/locations", tag = "config",
    responses(
        (status = 200, description = "Every location", body = [crate::settings::Location],
            example = json!([{"name": "home", "path": "~/.lume"}])),
        (status = 400, description = "config.yaml cannot be used", body = ErrorBody),
    ))]
pub async fn get_locations() -> ApiResult<Json<Vec<crate::settings::Location>>> {
    blocking(|| {
        Settings::load()
            .and_then(|s| s.locations())
            .map(Json)
            .map_err(|e| settings_error(&e))
    })
    .await
}

/// lume's `POST /lume/config/locations` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LocationRequest {
    #[schema(example = "fast")]
    pub name: String,
    /// Absolute (or `~/…`); created 0700 when missing.
    #[schema(example = "/srv/lume")]
    pub path: String,
}

/// Add a VM location (as `lume config storage add`).
#[utoipa::path(post, path = "/lume/config/locations", tag = "config", request_body = LocationRequest,
    responses(
        (status = 200, description = "Added", body = LocationAdded),
        (status = 400, description = "Bad name, taken name, or a path that cannot be used", body = ErrorBody),
        (status = 403, description = "Not the server's own user", body = ErrorBody),
    ))]
pub async fn add_location(
    State(st): State<Arc<AppState>>,
    Who(caller): Who,
    JsonBody(r): JsonBody<LocationRequest>,
) -> ApiResult<Json<LocationAdded>> {
    change_settings(&st, &caller, move |s| {
        // Name first: a refused name makes no directory.
        s.check_new_location_name(&r.name)?;
        location::prepare_directory(&r.path)?;
        s.add_location(&r.name, &r.path)?;
        Ok(Json(LocationAdded {
            message: "Location added successfully".into(),
            name: r.name.clone(),
            path: r.path.clone(),
        }))
    })
    .await
}

/// Remove a VM location (never the default one; its VMs stay on disk).
#[utoipa::path(delete, path = "/lume/config/locations/{name}", tag = "config",
    params(("name" = String, Path, description = "Location name")),
    responses(
        (status = 200, description = "Removed", body = ConfigMessage),
        (status = 400, description = "No such location, or the default one", body = ErrorBody),
        (status = 403, description = "Not the server's own user", body = ErrorBody),
    ))]
pub async fn remove_location(
    State(st): State<Arc<AppState>>,
    Who(caller): Who,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> ApiResult<Json<ConfigMessage>> {
    change_settings(&st, &caller, move |s| {
        s.remove_location(&name)?;
        Ok(Json(ConfigMessage {
            message: "Location removed successfully".into(),
            warnings: Vec::new(),
        }))
    })
    .await
}

/// Make a VM location the default.
#[utoipa::path(post, path = "/lume/config/locations/default/{name}", tag = "config",
    params(("name" = String, Path, description = "Location name")),
    responses(
        (status = 200, description = "Set", body = ConfigMessage),
        (status = 400, description = "No such location", body = ErrorBody),
        (status = 403, description = "Not the server's own user", body = ErrorBody),
    ))]
pub async fn set_default_location(
    State(st): State<Arc<AppState>>,
    Who(caller): Who,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> ApiResult<Json<ConfigMessage>> {
    change_settings(&st, &caller, move |s| {
        let before = location::default_store(s).ok();
        s.set_default_location(&name)?;
        Ok(Json(ConfigMessage {
            message: "Default location set successfully".into(),
            warnings: before
                .and_then(|b| location::running_left_behind(&b, s))
                .into_iter()
                .collect(),
        }))
    })
    .await
}

/// Whether the server is up, and how many VMs it runs and may run (lume's
/// keys; `total_vms` is ours).
#[utoipa::path(get, path = "/lume/host/status", tag = "host",
    responses(
        (status = 200, description = "Up", body = HostStatus),
        (status = 500, description = "The VM location cannot be read", body = ErrorBody),
    ))]
pub async fn host_status(
    State(st): State<Arc<AppState>>,
    Who(caller): Who,
) -> ApiResult<Json<HostStatus>> {
    let Outcome::List(vms) = in_location(&st, &caller, None, |ctx| run(ctx, Action::List)).await?
    else {
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Unexpected outcome of listing VMs",
        ));
    };
    let running = vms
        .iter()
        .filter(|d| d.status == crate::vm::details::VmStatus::Running)
        .count();
    let max_vms = std::thread::available_parallelism().map_or(1, |n| n.get());
    Ok(Json(HostStatus {
        status: "healthy".into(),
        vm_count: running,
        max_vms,
        available_slots: max_vms.saturating_sub(running),
        version: env!("CARGO_PKG_VERSION").into(),
        total_vms: vms.len(),
    }))
}

/// The server's recent log lines (this process's last
/// [`super::LOG_LINES_KEPT`]), in lume's shape: `info` holds every line,
/// `error` the failures. Only for the user the server runs as (403 for
/// others: the log names every caller's VMs).
#[utoipa::path(get, path = "/lume/logs", tag = "host", params(LogsQuery),
    responses(
        (status = 200, description = "The log", body = Logs),
        (status = 400, description = "A `type` other than info, error or all", body = ErrorBody),
        (status = 403, description = "The caller is not the server's user", body = ErrorBody),
    ))]
pub async fn get_logs(
    State(st): State<Arc<AppState>>,
    Who(caller): Who,
    ApiQuery(q): ApiQuery<LogsQuery>,
) -> ApiResult<Json<Logs>> {
    if caller.uid != st.euid {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "The server's log is for the user the server runs as: read it there",
        ));
    }
    let kind = q.kind.as_deref().map(str::to_ascii_lowercase);
    let (info, error) = match kind.as_deref() {
        None | Some("all") => (true, true),
        Some("info") => (true, false),
        Some("error") => (false, true),
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "Unknown log type '{other}': give info, error or all"
            )));
        }
    };
    let lines = super::recent_log();
    let text = |only_errors: bool| {
        let mut picked: Vec<&str> = lines
            .iter()
            .filter(|l| l.error || !only_errors)
            .map(|l| l.text.as_str())
            .collect();
        if let Some(n) = q.lines {
            picked = picked.split_off(picked.len().saturating_sub(n));
        }
        picked.join("\n")
    };
    Ok(Json(Logs {
        info: info.then(|| text(false)),
        error: error.then(|| text(true)),
    }))
}

/// lume's unattended macOS setup: refused (400), macOS guests need an Apple host.
#[utoipa::path(post, path = "/lume/vms/{name}/setup", tag = "vms",
    params(("name" = String, Path, description = "VM name")),
    responses((status = 400, description = "Always: macOS only", body = ErrorBody)))]
pub async fn setup_vm() -> ApiError {
    refused_route("setup (POST /lume/vms/{name}/setup)", MACOS_ONLY)
}

/// lume's macOS restore image URL: refused (400), macOS guests need an Apple host.
#[utoipa::path(get, path = "/lume/ipsw", tag = "host",
    responses((status = 400, description = "Always: macOS only", body = ErrorBody)))]
pub async fn ipsw() -> ApiError {
    refused_route("ipsw (GET /lume/ipsw)", MACOS_ONLY)
}

/// Host interfaces and whether bridged mode can use them (the JSON of
/// `lume config network interfaces -f json`).
#[utoipa::path(get, path = "/lume/network/interfaces", tag = "network",
    responses(
        (status = 200, description = "Every interface", body = [crate::network::interfaces::HostInterface]),
        (status = 500, description = "The interfaces cannot be read", body = ErrorBody),
    ))]
pub async fn network_interfaces() -> ApiResult<Json<Vec<HostInterface>>> {
    blocking(|| {
        crate::network::interfaces::discover()
            .map(Json)
            .map_err(|e| ApiError::internal(&e))
    })
    .await
}

/// Host network health checks (the JSON of `lume network doctor -f json`).
#[utoipa::path(get, path = "/lume/network/doctor", tag = "network",
    params(StorageQuery),
    responses((status = 200, description = "Every check", body = crate::network::doctor::Report)))]
pub async fn network_doctor(
    State(st): State<Arc<AppState>>,
    Who(caller): Who,
    ApiQuery(q): ApiQuery<StorageQuery>,
) -> ApiResult<Json<crate::network::doctor::Report>> {
    in_location(&st, &caller, q.storage.as_deref(), |ctx| {
        Ok(Json(crate::network::doctor::run(ctx)))
    })
    .await
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "meta",
    responses((status = 200, description = "The OpenAPI document of this API", body = Object)))]
pub async fn openapi_json(State(st): State<Arc<AppState>>) -> Json<Value> {
    Json(st.openapi.get().cloned().unwrap_or(Value::Null))
}

/// Unknown routes: 404 as JSON.
pub async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "No route {method} {}: the routes are listed at /openapi.json",
            uri.path()
        ),
    )
}

/// A known path with another method: 405 as JSON.
pub async fn wrong_method(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "Method {method} is not allowed on {}: the routes are listed at /openapi.json",
            uri.path()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(uid: u32) -> Caller {
        Caller {
            uid,
            gid: Some(uid),
            groups: vec![],
        }
    }

    #[test]
    fn only_the_servers_own_user_chooses_storage() {
        let server = Path::new("/srv/lume");
        // The server's own uid (root for a root server) may name any place.
        assert!(allowed_storage(&user(0), 0, Path::new("/anywhere"), server).is_ok());
        assert!(allowed_storage(&user(1000), 1000, Path::new("/home/a/vms"), server).is_ok());
        // Anyone else: the server's location, however spelled, and nothing else.
        for ok in ["/srv/lume", "/srv/lume/", "/srv//lume", "/srv/./lume"] {
            assert!(
                allowed_storage(&user(1000), 0, Path::new(ok), server).is_ok(),
                "{ok}"
            );
        }
        let refused: Vec<ApiError> = [
            "/srv/lume/../lume",
            "/srv",
            "/root/.bashrc",
            "/root/nonexistent",
            "/tmp",
            "/home/a/vms",
        ]
        .iter()
        .map(|p| allowed_storage(&user(1000), 0, Path::new(p), server).unwrap_err())
        .collect();
        for e in &refused {
            assert_eq!(e, &storage_refused(server));
            assert_eq!(e.status, StatusCode::FORBIDDEN);
        }
        // Root calling a server of another user is no exception.
        assert!(allowed_storage(&user(0), 1000, Path::new("/root"), server).is_err());
    }
}

// ---------------------------------------------------------------------------
// Registries (docs/images.md, "Registries").

/// `POST /lume/pull` and `POST /lume/pull/start` (lume's body).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PullRequest {
    /// `NAME:TAG` (tag `latest` when left out).
    #[schema(example = "debian-12:latest")]
    pub image: String,
    /// VM name (default: `IMAGE_TAG`, as lume).
    pub name: Option<String>,
    /// Default: `registry.ghcr.registry` in config.yaml, else `ghcr.io`.
    pub registry: Option<String>,
    /// Default: `registry.ghcr.organization`, else `trycua`.
    pub organization: Option<String>,
    pub storage: Option<String>,
    /// Registry credentials (else the caller's ~/.docker/config.json, else anonymous).
    pub username: Option<String>,
    pub password: Option<String>,
}

/// `POST /lume/vms/push` (lume's body).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PushRequest {
    /// The VM to push (stopped).
    pub name: String,
    /// The image's name in the registry, without tag.
    pub image_name: String,
    /// Tags to push (at least one).
    pub tags: Vec<String>,
    pub registry: Option<String>,
    pub organization: Option<String>,
    pub storage: Option<String>,
    /// Chunk size of the disk layers in MB (default 512).
    pub chunk_size_mb: Option<u64>,
    /// Refused when true: lume on Linux pushes the chunked format only.
    #[serde(default)]
    pub single_layer: bool,
    /// Refused when true (lume's legacy format is pulled, never pushed).
    #[serde(default)]
    pub legacy: bool,
    /// Refused when true (not supported yet).
    #[serde(default)]
    pub reassemble: bool,
    pub username: Option<String>,
    pub password: Option<String>,
}

/// The answer of `POST /lume/pull`, `/lume/pull/start` and `/lume/vms/push`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegistryAnswer {
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<String>>,
}

/// `GET /lume/images?organization=`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ImagesQuery {
    /// Default: `registry.ghcr.organization`, else `trycua`.
    pub organization: Option<String>,
}

fn pull_spec(ctx: &Context, r: &PullRequest) -> ApiResult<crate::registry::pull::PullSpec> {
    let d = ctx
        .settings
        .registry()
        .map_err(|e| ApiError::internal(&e))?;
    let (image, vm) = crate::registry::pull::target(
        &r.image,
        r.registry.as_deref(),
        r.organization.as_deref(),
        r.name.as_deref().map(name).transpose()?,
        &d,
    )
    .map_err(|e| ApiError::bad_request(e.for_api().to_string()))?;
    Ok(crate::registry::pull::PullSpec {
        image,
        name: vm,
        username: r.username.clone(),
        password: r.password.clone(),
        force: false,
        progress: false,
        // A registry named through the API may not lead the server to its
        // own loopback or private networks, unless its owner allows it.
        public_only: true,
        api: true,
    })
}

fn pull_vm_name(r: &PullRequest) -> ApiResult<VmName> {
    match r.name.as_deref() {
        Some(n) => name(n),
        None => {
            let (base, tag) = r.image.rsplit_once(':').unwrap_or((&r.image, "latest"));
            crate::registry::pull::name_for(base, tag).ok_or_else(|| {
                ApiError::bad_request(
                    crate::registry::RegistryError::NameTooLong {
                        name: crate::registry::pull::default_name_text(base, tag),
                        image: r.image.clone(),
                        run: false,
                        api: true,
                    }
                    .to_string(),
                )
            })
        }
    }
}

/// Pull an image from a registry as a new VM; answers when the VM is there.
#[utoipa::path(post, path = "/lume/pull", tag = "images", request_body = PullRequest,
    responses(
        (status = 200, description = "Pulled", body = RegistryAnswer),
        (status = 400, description = "A bad image reference or name, not a lume image, a registry at a private address", body = ErrorBody),
        (status = 401, description = "The registry refused the credentials", body = ErrorBody),
        (status = 404, description = "No such image or tag", body = ErrorBody),
        (status = 409, description = "A VM of that name exists or is being provisioned", body = ErrorBody),
        (status = 502, description = "The registry failed, was unreachable or served corrupt blobs", body = ErrorBody),
    ))]
pub async fn pull_image(
    State(st): State<Arc<AppState>>,
    Who(caller): Who,
    ApiQuery(q): ApiQuery<StorageQuery>,
    JsonBody(r): JsonBody<PullRequest>,
) -> ApiResult<Json<RegistryAnswer>> {
    let vm = pull_vm_name(&r)?;
    let storage = r.storage.clone().or(q.storage);
    let image = r.image.clone();
    // Counted like a background one: the pull goes on if the client hangs
    // up, so the slot goes with the work, not with the connection.
    let slot = st.background_slot(caller.uid)?;
    let d = on_vm(&st, &caller, storage.as_deref(), &vm, move |ctx| {
        let _slot = slot;
        let spec = pull_spec(ctx, &r)?;
        run(ctx, Action::Pull(Box::new(spec)))
    })
    .await?;
    match d {
        Outcome::Pulled(d) => Ok(Json(RegistryAnswer {
            message: "Image pulled successfully".into(),
            image: Some(image),
            name: Some(d.name),
            image_name: None,
            tags: None,
        })),
        o => Err(unexpected(&o)),
    }
}

/// Start pulling an image as a new VM and answer at once (202): the VM is
/// listed as `pulling` (`downloadProgress` 0 to 100, as lume) until it is
/// `stopped` (done) or gone (failed: `GET /lume/vms/{name}` then answers
/// 400 `Pull failed for 'NAME': …` for an hour or until the name is used
/// again; the error is in the server's log too).
#[utoipa::path(post, path = "/lume/pull/start", tag = "images", request_body = PullRequest,
    responses(
        (status = 202, description = "The pull started", body = RegistryAnswer),
        (status = 400, description = "A bad image reference or name", body = ErrorBody),
        (status = 409, description = "A VM of that name exists or is being provisioned", body = ErrorBody),
    ))]
pub async fn pull_image_start(
    State(st): State<Arc<AppState>>,
    Who(caller): Who,
    ApiQuery(q): ApiQuery<StorageQuery>,
    JsonBody(r): JsonBody<PullRequest>,
) -> ApiResult<(StatusCode, Json<RegistryAnswer>)> {
    let vm = pull_vm_name(&r)?;
    let storage = r.storage.clone().or(q.storage);
    let image = r.image.clone();
    let st2 = st.clone();
    let uid = caller.uid;
    let slot = st.background_slot(uid)?;
    let name = on_vm(&st, &caller, storage.as_deref(), &vm, move |ctx| {
        let spec = pull_spec(ctx, &r)?;
        let pending = crate::vm::actions::begin_pull(ctx, spec).map_err(ApiError::from)?;
        let name = pending.name().to_string();
        let key = (uid, name.clone());
        st2.pull_failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        std::thread::spawn(move || {
            let _slot = slot;
            let name = pending.name().clone();
            match pending.finish(&mut |line: &str| super::log(line)) {
                Ok(_) => super::log(&format!("VM '{name}' pulled")),
                Err(e) => {
                    let why = crate::error_chain(&e);
                    super::log(&format!("Pulling VM '{name}' failed: {why}"));
                    st2.pull_failures
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(key, (why, std::time::Instant::now()));
                }
            }
        });
        Ok(name)
    })
    .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(RegistryAnswer {
            message: "Pull started".into(),
            image: Some(image),
            name: Some(name),
            image_name: None,
            tags: None,
        }),
    ))
}

/// Push a stopped VM to a registry. The request is checked, then the push
/// runs in the background (202, as lume); its result is in the server's log.
#[utoipa::path(post, path = "/lume/vms/push", tag = "images", request_body = PushRequest,
    responses(
        (status = 202, description = "The push started", body = RegistryAnswer),
        (status = 400, description = "A bad image name, tag or chunk size, or no tag", body = ErrorBody),
        (status = 404, description = "No such VM", body = ErrorBody),
        (status = 409, description = "The VM is running or busy (another command holds it)", body = ErrorBody),
    ))]
pub async fn push_vm(
    State(st): State<Arc<AppState>>,
    Who(caller): Who,
    ApiQuery(q): ApiQuery<StorageQuery>,
    JsonBody(r): JsonBody<PushRequest>,
) -> ApiResult<(StatusCode, Json<RegistryAnswer>)> {
    let vm = name(&r.name)?;
    let storage = r.storage.clone().or(q.storage);
    let Some((first, rest)) = r.tags.split_first() else {
        return Err(ApiError::bad_request("Give at least one tag in \"tags\""));
    };
    for (on, field) in [
        (r.single_layer, "singleLayer"),
        (r.legacy, "legacy"),
        (r.reassemble, "reassemble"),
    ] {
        if on {
            return Err(ApiError::bad_request(format!(
                "\"{field}\" is not supported by lume on Linux, which pushes lume's chunked format only: leave it out or set it to false"
            )));
        }
    }
    let (first, rest) = (first.clone(), rest.to_vec());
    let answer = RegistryAnswer {
        message: "Push initiated in background".into(),
        image: None,
        name: Some(r.name.clone()),
        image_name: Some(r.image_name.clone()),
        tags: Some(r.tags.clone()),
    };
    let vm2 = vm.clone();
    let slot = st.background_slot(caller.uid)?;
    in_location(&st, &caller, storage.as_deref(), move |ctx| {
        let d = ctx
            .settings
            .registry()
            .map_err(|e| ApiError::internal(&e))?;
        let image = crate::registry::ImageRef::with_defaults(
            &format!("{}:{first}", r.image_name),
            r.registry.as_deref(),
            r.organization.as_deref(),
            &d,
        )
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
        for t in &rest {
            image
                .with_tag(t)
                .map_err(|e| ApiError::bad_request(e.to_string()))?;
        }
        let chunk = r
            .chunk_size_mb
            .unwrap_or(crate::registry::push::DEFAULT_CHUNK_MB);
        if !(1..=4096).contains(&chunk) {
            return Err(ApiError::from(crate::vm::VmError::from(
                crate::registry::RegistryError::ChunkSize(chunk),
            )));
        }
        let vm = ctx
            .store
            .open(&vm2)
            .map_err(|e| ApiError::from(crate::vm::VmError::from(e)))?;
        if vm.is_running() {
            return Err(ApiError::from(crate::vm::VmError::from(
                crate::registry::RegistryError::Running(vm2.to_string()),
            )));
        }
        // Another command holds the VM's lock: busy now, not a 202 whose
        // push fails in the background.
        if crate::vm::lock::VmLock::is_held(&vm.lock_path()).unwrap_or(false) {
            return Err(ApiError::from(crate::vm::VmError::from(
                crate::registry::RegistryError::Busy(vm2.to_string()),
            )));
        }
        let spec = crate::registry::push::PushSpec {
            image,
            additional_tags: rest,
            chunk_size_mb: chunk,
            dry_run: false,
            username: r.username,
            password: r.password,
            progress: false,
            public_only: true,
            api: true,
        };
        let ctx = ctx.clone();
        std::thread::spawn(move || {
            let _slot = slot;
            let action = Action::Push {
                name: vm2.clone(),
                spec: Box::new(spec),
            };
            match execute(&ctx, action, &mut |line: &str| super::log(line)) {
                Ok(Outcome::Pushed(p)) => {
                    super::log(&format!("VM '{vm2}' pushed as {}", p.references.join(", ")))
                }
                Ok(_) => {}
                Err(e) => super::log(&format!(
                    "Pushing VM '{vm2}' failed: {}",
                    crate::error_chain(&e)
                )),
            }
        });
        Ok(())
    })
    .await?;
    let _ = vm;
    Ok((StatusCode::ACCEPTED, Json(answer)))
}

/// The images in the server's cache (`lume images`): `[{repository, imageId}]`.
#[utoipa::path(get, path = "/lume/images", tag = "images", params(ImagesQuery),
    responses((status = 200, description = "Cached images", body = [crate::registry::cache::CachedImage])))]
pub async fn list_images(
    State(st): State<Arc<AppState>>,
    Who(caller): Who,
    ApiQuery(q): ApiQuery<ImagesQuery>,
) -> ApiResult<Json<Vec<crate::registry::cache::CachedImage>>> {
    match in_location(&st, &caller, None, move |ctx| {
        let org = match q.organization {
            Some(o) => o,
            None => {
                ctx.settings
                    .registry()
                    .map_err(|e| ApiError::internal(&e))?
                    .organization
            }
        };
        run(ctx, Action::Images { organization: org })
    })
    .await?
    {
        Outcome::Images(v) => Ok(Json(v)),
        o => Err(unexpected(&o)),
    }
}

/// Remove the cached images (`lume prune`).
#[utoipa::path(post, path = "/lume/prune", tag = "images",
    responses((status = 200, description = "Removed", body = RegistryAnswer)))]
pub async fn prune_images(
    State(st): State<Arc<AppState>>,
    Who(caller): Who,
) -> ApiResult<Json<RegistryAnswer>> {
    // The cache is the server's: emptying it is for the server's own user.
    if !st.owns_server(&caller) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "Pruning the image cache is refused: only the user the server runs as may empty the server's cache; ask that user, or prune your own cache with `lume prune`",
        ));
    }
    match in_location(&st, &caller, None, |ctx| run(ctx, Action::Prune)).await? {
        Outcome::Pruned(_) => Ok(Json(RegistryAnswer {
            message: "Successfully removed cached images".into(),
            image: None,
            name: None,
            image_name: None,
            tags: None,
        })),
        o => Err(unexpected(&o)),
    }
}
