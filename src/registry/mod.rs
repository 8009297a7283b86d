//! Images from OCI registries in lume's own format: `lume pull`, `push`,
//! `images` and `prune` (docs/images.md, "Registries").
//!
//! - [`reference`]: `IMAGE:TAG` with `--registry` / `--organization`.
//! - [`auth`]: credentials (flags, lume's environment variables, the
//!   calling user's `~/.docker/config.json`), plain HTTP only for loopback.
//! - [`format`]: lume's manifest, config blob and disk parts (gzip chunks,
//!   legacy Apple-LZ4 parts), sparse writing.
//! - [`cache`]: the blob cache (`cacheDirectory/ghcr/ORG/MANIFEST_ID/`),
//!   `images`, `prune`.
//! - [`pull`], [`push`]: the transfers, over the `oci-client` crate.

pub mod auth;
pub mod cache;
pub mod format;
pub mod pull;
pub mod push;
pub mod reference;

use std::path::PathBuf;

pub use reference::ImageRef;

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(
        "Image reference '{0}' is not valid: give NAME:TAG (lowercase letters, digits, '.', '_', '-' and '/' in NAME; letters, digits, '.', '_' and '-' in TAG)"
    )]
    BadReference(String),
    #[error("Registry '{0}' is not a valid registry host: give HOST or HOST:PORT")]
    BadRegistry(String),
    #[error(
        "Image {image} was not found: the repository or the tag does not exist (check the name, the tag, --registry and --organization)"
    )]
    NotFound { image: String },
    #[error(
        "Registry {registry} refused the credentials: check --username/--password, GITHUB_USERNAME/GITHUB_TOKEN or `docker login {registry}`"
    )]
    Unauthorized { registry: String },
    #[error(
        "Registry {registry} could not be reached: check the name, the network and any proxy settings"
    )]
    Unreachable {
        registry: String,
        #[source]
        source: oci_client::errors::OciDistributionError,
    },
    #[error("Registry {registry} failed: {source}; try again, or check the image and the registry")]
    Protocol {
        registry: String,
        #[source]
        source: oci_client::errors::OciDistributionError,
    },
    #[error(
        "Image {image} is not a lume VM image ({why}): pull images pushed by lume (`lume push`)"
    )]
    NotLume { image: String, why: String },
    #[error(
        "Image {image} holds a {os} VM: lume on Linux runs Linux VMs only (macOS images need lume on an Apple host)"
    )]
    ForeignOs { image: String, os: String },
    #[error(
        "Blob {digest} of {image} did not match its digest after {attempts} downloads: the registry serves corrupt data; nothing was installed, try again later or tell the registry's owner"
    )]
    Corrupt {
        image: String,
        digest: String,
        attempts: u32,
    },
    #[error(
        "Cached blob {path} does not match its digest: it was removed; pull again to fetch it anew"
    )]
    CorruptCache { path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "Cannot read the Docker credentials in {path}: {why}; fix the file or give --username/--password"
    )]
    DockerConfig { path: PathBuf, why: String },
    #[error(
        "Registry {registry} leads to {addr}, a loopback, link-local or private address, which registries named through the API may not reach: use a public registry, or let the server's owner allow it with `lume config set apiPrivateImageUrls true`"
    )]
    PrivateDestination {
        registry: String,
        addr: std::net::IpAddr,
    },
    #[error("VM '{0}' is running: stop it before pushing (`lume stop {0}`)")]
    Running(String),
    #[error(
        "VM '{0}' boots a kernel file, which lume's image format does not carry: only VMs booted from their disk can be pushed"
    )]
    KernelBoot(String),
    #[error("The chunk size must be between 1 and 4096 MB, not {0}")]
    ChunkSize(u64),
    #[error(
        "The image's disk ({size} bytes) is larger than lume accepts (at most {max} bytes): this is not an image lume can pull"
    )]
    TooLarge { size: u64, max: u64 },
    #[error("Cannot start the transfer's worker threads: {0}")]
    Runtime(#[source] std::io::Error),
}

/// `io::Error` at `path` as a [`RegistryError`].
pub(crate) fn io_at(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> RegistryError + '_ {
    move |source| RegistryError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Sorts an `oci-client` error into lume's kinds, by its variant (never
/// by its text).
pub(crate) fn classify(
    e: oci_client::errors::OciDistributionError,
    registry: &str,
    image: &str,
) -> RegistryError {
    use oci_client::errors::{OciDistributionError as E, OciErrorCode as C};
    let not_found = || RegistryError::NotFound {
        image: image.to_string(),
    };
    let unauthorized = || RegistryError::Unauthorized {
        registry: registry.to_string(),
    };
    match &e {
        E::ImageManifestNotFoundError(_) => not_found(),
        E::AuthenticationFailure(_) | E::UnauthorizedError { .. } => unauthorized(),
        E::RegistryError { envelope, .. } => {
            let codes: Vec<&C> = envelope.errors.iter().map(|x| &x.code).collect();
            if codes
                .iter()
                .any(|c| matches!(c, C::ManifestUnknown | C::NameUnknown | C::NotFound))
            {
                not_found()
            } else if codes
                .iter()
                .any(|c| matches!(c, C::Unauthorized | C::Denied))
            {
                unauthorized()
            } else {
                RegistryError::Protocol {
                    registry: registry.to_string(),
                    source: e,
                }
            }
        }
        E::ServerError { code: 404, .. } => not_found(),
        E::ServerError {
            code: 401 | 403, ..
        } => unauthorized(),
        E::RequestError(r) if matches!(r.status().map(|s| s.as_u16()), Some(401 | 403)) => {
            unauthorized()
        }
        E::RequestError(r) if r.status().is_some_and(|s| s.as_u16() == 404) => not_found(),
        E::RequestError(r) if r.is_connect() || r.is_timeout() => RegistryError::Unreachable {
            registry: registry.to_string(),
            source: e,
        },
        _ => RegistryError::Protocol {
            registry: registry.to_string(),
            source: e,
        },
    }
}

/// A tokio runtime for one transfer (the actions are synchronous).
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, RegistryError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(RegistryError::Runtime)
}
