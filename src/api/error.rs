//! Errors of the HTTP API: always `{"message": "..."}` with a status code.
//! [`vm_status`] is the one place that decides which status a
//! [`VmError`] gets.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::hypervisor::supervisor::RunError;
use crate::image::import::ImportError;
use crate::network::attach::AttachError;
use crate::vm::VmError;
use crate::vm::config::ConfigError;
use crate::vm::store::StoreError;

/// The body of every error response.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What went wrong, with its cause.
    pub message: String,
}

/// An error on its way to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    /// 400: the request itself is wrong.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// 500: a real failure; the message carries the whole cause chain.
    pub fn internal(e: &dyn std::error::Error) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, crate::error_chain(e))
    }
}

impl From<VmError> for ApiError {
    fn from(e: VmError) -> Self {
        let status = vm_status(&e);
        let message = api_message(&e).unwrap_or_else(|| crate::error_chain(&e));
        Self::new(status, message)
    }
}

/// The API's wording of the action errors whose message names a command-line
/// option or command: an API client is told the request field or route.
fn api_message(e: &VmError) -> Option<String> {
    Some(match e {
        VmError::Snapshot(s) => s.message(crate::vm::snapshot::Door::Api),
        VmError::Policy(p)
        | VmError::Network(AttachError::Policy(p))
        | VmError::Run(RunError::Network(AttachError::Policy(p))) => {
            p.message(crate::vm::Door::Api)
        }
        VmError::MacOsGuest => {
            r#"macOS guests need an Apple host: lume on Linux creates Linux VMs ("os": "linux")"#
                .into()
        }
        VmError::UnknownOs(os) => format!(r#"Unknown OS '{os}': send "os": "linux""#),
        VmError::NoCpu => r#"CPU count must be at least 1: send "cpu": 1 or more"#.into(),
        VmError::InitrdWithoutKernel => {
            r#""initrd" and "cmdline" need "kernel": send "kernel" too, or leave them out"#.into()
        }
        VmError::TwoBootSources => {
            r#"Choose one boot source: "kernel" (direct kernel boot) or "image" (disk image), not both"#
                .into()
        }
        VmError::Sha256WithoutImage => {
            r#""imageSha256" checks an image: send "image" too"#.into()
        }
        VmError::DiskWhileRunning(n) => format!(
            "VM '{n}' is running: stop it before changing its disk (POST /lume/vms/{n}/stop)"
        ),
        VmError::CloneWhileRunning(n) => format!(
            "Source VM '{n}' is running: stop it before cloning (POST /lume/vms/{n}/stop)"
        ),
        VmError::NotRunning(n) => {
            format!("VM '{n}' is not running: start it with POST /lume/vms/{n}/run")
        }
        VmError::ShutdownTimeout {
            name,
            method,
            seconds,
        } => format!(
            r#"VM '{name}' was asked to power off {} but is still running after {seconds}s: send a longer "timeout", or force it off with POST /lume/vms/{name}/stop"#,
            method.describe()
        ),
        VmError::NoGracefulShutdown(n) => format!(
            "VM '{n}' could not be asked to power off: no guest agent answered, SSH was not available and the ACPI power button could not be pressed; force it off with POST /lume/vms/{n}/stop"
        ),
        VmError::NoGracefulReboot(n) => format!(
            r#"VM '{n}' cannot be restarted gracefully: no guest agent answered and SSH was not available; install qemu-guest-agent in the guest, or reset it like the reset button with "force": true"#
        ),
        _ => return None,
    })
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            super::log_error(&self.message);
        }
        let mut response = (
            self.status,
            Json(ErrorBody {
                message: self.message,
            }),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// The HTTP status of a failed snapshot command: 404 for a snapshot that
/// does not exist, 409 when the VM's state forbids it now.
fn snapshot_status(e: &crate::vm::snapshot::SnapshotError) -> StatusCode {
    use crate::vm::snapshot::SnapshotError as S;
    match e {
        S::InvalidName(_) => StatusCode::BAD_REQUEST,
        S::NotFound { .. } => StatusCode::NOT_FOUND,
        S::Exists { .. }
        | S::Busy(_)
        | S::NeedsAgent { .. }
        | S::MemoryNeedsRunning(_)
        | S::MemoryWithShares(_)
        | S::Ephemeral(_)
        | S::Layered { .. }
        | S::ConfigChanged { .. }
        | S::NetworkChanged { .. }
        | S::AddressInUse { .. }
        | S::RestoreEphemeral(_)
        | S::FlattenSnapshots { .. }
        | S::FlattenRunning(_)
        | S::ChainTooLong { .. } => StatusCode::CONFLICT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The HTTP status of a failed action: 400 for a request that cannot be
/// right, 404 for a VM that does not exist, 409 for one whose state forbids
/// the action now (exists, running, busy), 500 for real failures.
pub fn vm_status(e: &VmError) -> StatusCode {
    const BAD: StatusCode = StatusCode::BAD_REQUEST;
    const CONFLICT: StatusCode = StatusCode::CONFLICT;
    const FAILED: StatusCode = StatusCode::INTERNAL_SERVER_ERROR;
    match e {
        VmError::Store(s) => match s {
            StoreError::NotFound { .. } | StoreError::NotFoundAnywhere { .. } => {
                StatusCode::NOT_FOUND
            }
            StoreError::Exists { .. }
            | StoreError::Busy(_)
            | StoreError::Provisioning(_)
            | StoreError::Pulling(_) => CONFLICT,
            StoreError::Config(_) | StoreError::Io { .. } => FAILED,
        },
        VmError::Run(r) => match r {
            RunError::AlreadyRunning(_) | RunError::Busy(_) => CONFLICT,
            // A macOS VM can never run here; a mount or disk that is not there.
            RunError::MacOs(_) | RunError::MissingFile { .. } => BAD,
            RunError::Network(a) => attach_status(a),
            _ => FAILED,
        },
        VmError::Network(a) => attach_status(a),
        VmError::Policy(_) => StatusCode::BAD_REQUEST,
        VmError::Snapshot(s) => snapshot_status(s),
        // The image the client named is not one lume imports, or not the
        // one its checksum names.
        VmError::Import(
            ImportError::Format { .. }
            | ImportError::NotSectors { .. }
            | ImportError::Empty { .. }
            | ImportError::TooLarge { .. }
            | ImportError::Checksum { .. }
            | ImportError::Xz { .. }
            | ImportError::XzMemory { .. },
        ) => BAD,
        VmError::Import(ImportError::Download(_)) => StatusCode::BAD_GATEWAY,
        VmError::Registry(r) => registry_status(r),
        VmError::Seed(
            crate::guest::cloudinit::SeedError::UnknownUserData { .. }
            | crate::guest::cloudinit::SeedError::UserDataTooLarge { .. },
        ) => BAD,
        // A display that is not WIDTHxHEIGHT.
        VmError::Config(ConfigError::Display(_)) => BAD,
        VmError::Import(ImportError::Read { .. } | ImportError::Disk(_))
        | VmError::Image(_)
        | VmError::Config(_)
        | VmError::Settings(_)
        | VmError::Seed(_)
        | VmError::Keys(_) => FAILED,
        VmError::MacOsGuest
        | VmError::UnknownOs(_)
        | VmError::NoCpu
        | VmError::TooManyCpus(_)
        | VmError::MemoryTooSmall(_)
        | VmError::DiskTooSmall(_)
        | VmError::DiskTooLarge(_)
        | VmError::DiskShrink { .. }
        | VmError::MissingFile { .. }
        | VmError::InitrdWithoutKernel
        | VmError::TwoBootSources
        | VmError::Sha256WithoutImage
        | VmError::NeedsForce(_)
        | VmError::TimeoutTooLong(_)
        | VmError::TooManyShares(_)
        | VmError::UsbStorageTwice(_)
        | VmError::NotDirectory(_) => BAD,
        // A host file the caller could not open itself, or a storage
        // location another user can change.
        VmError::Forbidden { .. } => StatusCode::FORBIDDEN,
        VmError::DiskWhileRunning(_) | VmError::CloneWhileRunning(_) | VmError::NotRunning(_) => {
            CONFLICT
        }
        // The guest ignored or could not be sent the request.
        VmError::StopTimeout { .. }
        | VmError::ShutdownTimeout { .. }
        | VmError::NoGracefulShutdown(_)
        | VmError::NoGracefulReboot(_) => FAILED,
    }
}

/// Network errors: what the client chose wrong is 400, the host's failures 500.
fn attach_status(e: &AttachError) -> StatusCode {
    match e {
        AttachError::Shared(
            crate::network::shared::SharedError::PortTaken { .. }
            | crate::network::shared::SharedError::ForeignBridge { .. },
        ) => StatusCode::CONFLICT,
        AttachError::PublishNotSupported(_)
        | AttachError::OwnBridge(..)
        | AttachError::LoopbackPublish(..)
        | AttachError::Publish(_)
        | AttachError::Bridge(_)
        | AttachError::Policy(_) => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// Registry failures: the client's mistakes are 400/404, the registry's
/// 502, the host's 500.
fn registry_status(e: &crate::registry::RegistryError) -> StatusCode {
    use crate::registry::RegistryError as R;
    match e {
        R::BadReference(_)
        | R::BadTag(_)
        | R::TwoTags(_)
        | R::NameTooLong { .. }
        | R::BadRegistry(_)
        | R::BadOrganization(_)
        | R::UnsafeCache { .. }
        | R::NotLume { .. }
        | R::ForeignOs { .. }
        | R::ForeignArchitecture { .. }
        | R::ChunkSize(_)
        | R::KernelBoot(_)
        | R::TooLarge { .. }
        | R::PrivateDestination { .. }
        | R::NoTag(_)
        | R::DockerConfig { .. } => StatusCode::BAD_REQUEST,
        R::NotFound { .. } => StatusCode::NOT_FOUND,
        R::Unauthorized { .. } | R::Refused { .. } => StatusCode::UNAUTHORIZED,
        R::Running(_) | R::ReplaceRunning(_) | R::Busy(_) => StatusCode::CONFLICT,
        R::NotTls { .. }
        | R::Unreachable { .. }
        | R::Unresolved { .. }
        | R::Protocol { .. }
        | R::TokenRealm { .. }
        | R::ForeignRealm { .. }
        | R::TooLong { .. }
        | R::Corrupt { .. } => StatusCode::BAD_GATEWAY,
        R::CorruptCache { .. } | R::Io { .. } | R::Runtime(_) | R::NoSpace { .. } => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::VmName;

    fn name() -> VmName {
        VmName::parse("web").unwrap()
    }

    #[test]
    fn api_messages_name_request_fields_not_options() {
        let cases: Vec<VmError> = vec![
            VmError::MacOsGuest,
            VmError::UnknownOs("windows".into()),
            VmError::NoCpu,
            VmError::InitrdWithoutKernel,
            VmError::TwoBootSources,
            VmError::Sha256WithoutImage,
            VmError::NotRunning(name()),
            VmError::CloneWhileRunning(name()),
            VmError::DiskWhileRunning(name()),
            VmError::NoGracefulShutdown(name()),
            VmError::NoGracefulReboot(name()),
        ];
        for e in cases {
            let m = ApiError::from(e).message;
            assert!(!m.contains("--"), "{m}");
            assert!(!m.contains("`lume "), "{m}");
        }
        let m = ApiError::from(VmError::MacOsGuest).message;
        assert!(m.contains(r#""os": "linux""#), "{m}");
    }

    #[test]
    fn statuses_follow_the_kind_of_error() {
        let root = std::path::PathBuf::from("/x");
        let cases: Vec<(VmError, StatusCode)> = vec![
            (
                StoreError::NotFound {
                    name: name(),
                    root: root.clone(),
                }
                .into(),
                StatusCode::NOT_FOUND,
            ),
            (
                StoreError::NotFoundAnywhere {
                    name: name(),
                    locations: "home, fast".into(),
                }
                .into(),
                StatusCode::NOT_FOUND,
            ),
            (
                StoreError::Exists {
                    name: name(),
                    root: root.clone(),
                }
                .into(),
                StatusCode::CONFLICT,
            ),
            (StoreError::Busy(name()).into(), StatusCode::CONFLICT),
            (
                RunError::AlreadyRunning(name()).into(),
                StatusCode::CONFLICT,
            ),
            (RunError::Busy(name()).into(), StatusCode::CONFLICT),
            (VmError::DiskWhileRunning(name()), StatusCode::CONFLICT),
            (VmError::CloneWhileRunning(name()), StatusCode::CONFLICT),
            (VmError::NoCpu, StatusCode::BAD_REQUEST),
            (
                VmError::Config(ConfigError::Display("1x".into())),
                StatusCode::BAD_REQUEST,
            ),
            (
                AttachError::PublishNotSupported(crate::network::NetworkMode::None).into(),
                StatusCode::BAD_REQUEST,
            ),
            (
                RunError::Spawn(std::io::Error::other("boom")).into(),
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
        ];
        for (e, status) in cases {
            assert_eq!(vm_status(&e), status, "{e}");
        }
    }

    #[test]
    fn the_message_carries_the_causes() {
        let e: ApiError =
            VmError::from(RunError::Spawn(std::io::Error::other("no such file"))).into();
        assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(e.message.contains("no such file"), "{}", e.message);
    }
}
