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
//! - [`token`], [`wire`]: lume's own requests to a registry (bounded
//!   reads, credentials to the registry's own host only); [`failure`]:
//!   why one failed, which [`classify`] sorts into a [`RegistryError`].
//! - [`guard`]: the gate of a public-only transfer's connections.
//! - [`pull`], [`push`]: the transfers.

pub mod auth;
pub mod cache;
pub mod failure;
pub mod format;
pub mod guard;
pub mod pull;
pub mod push;
pub mod reference;
pub mod token;
pub mod wire;

use std::path::PathBuf;

pub use failure::RequestFailure;
pub use reference::ImageRef;

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(
        "Image reference '{0}' is not valid: give NAME:TAG (lowercase letters, digits, '.', '_', '-' and '/' in NAME; letters, digits, '.', '_' and '-' in TAG)"
    )]
    BadReference(String),
    #[error(
        "Organization '{0}' is not valid: give lowercase letters, digits, '.', '_', '-' and '/' between names (as in an image's repository)"
    )]
    BadOrganization(String),
    #[error("Registry '{0}' is not a valid registry host: give HOST or HOST:PORT")]
    BadRegistry(String),
    #[error(
        "Image reference '{0}' names two tags: give one NAME:TAG (through the API, \"imageName\" takes no tag: tags go in \"tags\")"
    )]
    TwoTags(String),
    #[error(
        "Tag '{0}' is not valid: give letters, digits, '.', '_' and '-' (at most 128, not starting with '.' or '-')"
    )]
    BadTag(String),
    #[error(
        "The VM name '{name}' that image {image} would get is longer than 63 characters: {}",
        if *run {
            format!("`lume run` takes no VM name for an image, so pull it with a NAME first (`lume pull {image} NAME`), then `lume run NAME`")
        } else if *api {
            "give the VM a \"name\"".to_string()
        } else {
            "give a NAME for the VM".to_string()
        }
    )]
    NameTooLong {
        /// The default name (`IMAGE_TAG`).
        name: String,
        /// `NAME:TAG` as given.
        image: String,
        /// Asked by `lume run IMAGE:TAG`, which takes no VM name.
        run: bool,
        /// Asked through the REST API or MCP (the hint names the field).
        api: bool,
    },
    #[error(
        "Image {image} was not found: the repository or the tag does not exist (check the name, the tag, {})",
        if *api { "\"registry\" and \"organization\"" } else { "--registry and --organization" }
    )]
    NotFound {
        image: String,
        /// Asked through the REST API (the hint names request fields).
        api: bool,
    },
    /// A 401/403 as the wire reports it; [`RegistryError::with_door`]
    /// turns it into [`RegistryError::Refused`], whose hint knows where the
    /// credentials came from.
    #[error("{}", refused_message(registry, *api, &auth::Hint { from: if *sent { auth::Source::Given } else { auth::Source::Anonymous }, ..Default::default() }))]
    Unauthorized {
        registry: String,
        /// Whether credentials were sent (else: anonymous).
        sent: bool,
        /// Asked through the REST API or MCP (hints name request fields).
        api: bool,
    },
    /// The registry refused the transfer (401/403): what was sent and
    /// where from, so the hint offers only what applies.
    #[error("{}", refused_message(registry, *api, hint))]
    Refused {
        registry: String,
        /// Asked through the REST API or MCP (hints name request fields).
        api: bool,
        hint: auth::Hint,
    },
    #[error(
        "Registry {registry} could not be reached: check the name, the network and any proxy settings"
    )]
    Unreachable {
        registry: String,
        #[source]
        source: RequestFailure,
    },
    #[error(
        "Registry {registry} could not be reached: its name does not resolve; check the name, the network and the DNS settings"
    )]
    Unresolved {
        registry: String,
        #[source]
        source: std::io::Error,
    },
    /// `detail` is a short excerpt of what the registry said, control
    /// characters escaped ([`excerpt`]): a registry's answer is never
    /// passed on whole.
    #[error("Registry {registry} failed: {detail}; try again, or check the image and the registry")]
    Protocol { registry: String, detail: String },
    #[error(
        "Image {image} is not a lume VM image ({why}): pull images pushed by lume (`lume push`)"
    )]
    NotLume { image: String, why: String },
    #[error(
        "Image {image} holds a {os} VM: lume on Linux runs Linux VMs only (macOS images need lume on an Apple host)"
    )]
    ForeignOs { image: String, os: String },
    #[error(
        "Image {image} holds a VM for {arch} machines, and this host is {host}: lume runs VMs of the host's own architecture; pull an image that was pushed from a host of architecture {host}"
    )]
    ForeignArchitecture {
        image: String,
        arch: String,
        host: &'static str,
    },
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
    #[error(
        "The image cache is not safe to use: {dir} can be changed by {who}, who could redirect what root writes there; make it owned by root and not writable by group or others, or set another `cacheDirectory` (`lume config cache dir DIR`)"
    )]
    UnsafeCache { dir: PathBuf, who: String },
    #[error(
        "Not enough disk space for the image: its blobs need {need} bytes in {dir}, which has {free} free; free some space, prune the cache (`lume prune`) or set another `cacheDirectory`"
    )]
    NoSpace { dir: PathBuf, need: u64, free: u64 },
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
        "VM '{0}' is running, and a pull with force replaces only a stopped VM: stop it first (`lume stop {0}`), then pull again"
    )]
    ReplaceRunning(String),
    #[error(
        "VM '{0}' is busy: another lume command is changing it; try the push again in a moment"
    )]
    Busy(String),
    #[error("Push needs NAME:TAG, such as {0}:latest")]
    NoTag(String),
    #[error(
        "Registry {registry} did not answer with TLS (it may serve plain HTTP): {}",
        if *public_only {
            "registries named through the API are spoken to over HTTPS only (plain HTTP never carries an API caller's transfer); let the server's owner allow private registries with `lume config set apiPrivateImageUrls true` and LUME_INSECURE_REGISTRIES in the server's environment, or use an HTTPS registry".to_string()
        } else {
            format!("if you trust the network path to it, allow plain HTTP with LUME_INSECURE_REGISTRIES={registry} and try again")
        }
    )]
    NotTls {
        registry: String,
        /// A public-only (API) transfer, which never uses plain HTTP.
        public_only: bool,
        #[source]
        source: RequestFailure,
    },
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
    #[error(
        "Registry {registry} sends lume for a token to {realm}, which lume will not use: {why}"
    )]
    TokenRealm {
        registry: String,
        realm: String,
        why: String,
    },
    #[error(
        "Registry {registry} wants its credentials sent to {realm_host}, another host, for a token: lume sends them there only if you trust that host with them; then set LUME_TOKEN_REALMS={realm_host} and try again"
    )]
    ForeignRealm {
        registry: String,
        realm_host: String,
    },
    #[error(
        "Registry {registry} sent a {what} longer than {max} bytes, more than any lume image has: this is not a lume image (or not a registry); check the image and the registry"
    )]
    TooLong {
        registry: String,
        what: &'static str,
        max: usize,
    },
    #[error("Cannot start the transfer's worker threads: {0}")]
    Runtime(#[source] std::io::Error),
}

/// The message of [`RegistryError::Refused`]: where credentials come
/// from depends on the door (CLI flags and the user's environment, or the
/// request's fields), and only the ways that apply to this registry are
/// offered.
fn refused_message(registry: &str, api: bool, hint: &auth::Hint) -> String {
    let how = if api {
        "give \"username\" and \"password\" in the request (and check \"registry\" and \"organization\")".to_string()
    } else {
        let mut ways = vec!["give --username/--password".to_string()];
        if hint.env_applies {
            ways.push("set GITHUB_USERNAME/GITHUB_TOKEN".into());
        }
        if !hint.helpers {
            ways.push(format!("run `docker login {registry}`"));
        }
        let last = ways.pop().expect("one way at least");
        let mut how = if ways.is_empty() {
            last
        } else {
            format!("{} or {last}", ways.join(", "))
        };
        if hint.helpers {
            how.push_str(
                " (your Docker config keeps its credentials in a credential helper, `credsStore` or `credHelpers`, which lume does not run)",
            );
        }
        how
    };
    use auth::Source;
    match hint.from {
        Source::Anonymous => format!("Registry {registry} needs credentials: {how}"),
        Source::Given => format!("Registry {registry} refused the credentials: check them; {how}"),
        Source::Environment => format!(
            "Registry {registry} refused the credentials from lume's environment (GITHUB_USERNAME/GITHUB_TOKEN or GHCR_USERNAME/GHCR_TOKEN): check them; {how}"
        ),
        Source::DockerConfig => format!(
            "Registry {registry} refused the credentials from your Docker config (`docker login`): check them; {how}"
        ),
    }
}

impl RegistryError {
    /// Completes a refusal ([`Unauthorized`](Self::Unauthorized) becomes
    /// [`Refused`](Self::Refused)) with the credentials' origin, and it,
    /// [`NotFound`](Self::NotFound) and [`NotTls`](Self::NotTls) with the
    /// door their hints name; other errors are unchanged.
    /// For the REST API and MCP: hints name the request's fields (`name`,
    /// `registry`, `organization`) instead of the command line's.
    pub(crate) fn for_api(self) -> Self {
        match self {
            Self::NameTooLong {
                name, image, run, ..
            } => Self::NameTooLong {
                name,
                image,
                run,
                api: true,
            },
            Self::NotFound { image, .. } => Self::NotFound { image, api: true },
            e => e,
        }
    }

    pub(crate) fn with_door(self, hint: auth::Hint, api: bool, public_only: bool) -> Self {
        match self {
            Self::NotFound { image, .. } => Self::NotFound { image, api },
            Self::Unauthorized { registry, .. } | Self::Refused { registry, .. } => Self::Refused {
                registry,
                api,
                hint,
            },
            Self::NotTls {
                registry, source, ..
            } => Self::NotTls {
                registry,
                public_only,
                source,
            },
            e => e,
        }
    }
}

/// `io::Error` at `path` as a [`RegistryError`].
pub(crate) fn io_at(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> RegistryError + '_ {
    move |source| RegistryError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Sorts why one of lume's requests failed into lume's kinds, by its
/// variant, status and error codes (never by its text).
pub(crate) fn classify(e: RequestFailure, registry: &str, image: &str) -> RegistryError {
    let not_found = || RegistryError::NotFound {
        image: image.to_string(),
        api: false,
    };
    let unauthorized = || RegistryError::Unauthorized {
        registry: registry.to_string(),
        sent: true,
        api: false,
    };
    let protocol = |e: &RequestFailure| RegistryError::Protocol {
        registry: registry.to_string(),
        detail: excerpt(&e.to_string()),
    };
    match &e {
        RequestFailure::Errors { envelope, .. } => {
            if envelope.errors.iter().any(|x| x.code.not_found()) {
                not_found()
            } else if envelope.errors.iter().any(|x| x.code.refused()) {
                unauthorized()
            } else {
                protocol(&e)
            }
        }
        RequestFailure::Status { status: 404, .. } => not_found(),
        RequestFailure::Status {
            status: 401 | 403, ..
        } => unauthorized(),
        RequestFailure::Status { .. } => protocol(&e),
        RequestFailure::Transport(r) if not_tls(r) => RegistryError::NotTls {
            registry: registry.to_string(),
            public_only: false,
            source: e,
        },
        RequestFailure::Transport(r) if r.is_connect() || r.is_timeout() => {
            RegistryError::Unreachable {
                registry: registry.to_string(),
                source: e,
            }
        }
        RequestFailure::Transport(_) => protocol(&e),
    }
}

/// Longest excerpt of a registry's text lume passes on.
const EXCERPT_CHARS: usize = 200;

/// A registry's text as lume passes it on (in errors, hence in API answers
/// and the server log): control characters escaped, at most
/// [`EXCERPT_CHARS`] characters.
pub fn excerpt(text: &str) -> String {
    let mut out: String = text.chars().take(EXCERPT_CHARS).collect();
    if text.chars().nth(EXCERPT_CHARS).is_some() {
        out.push('…');
    }
    crate::api::escape_controls(&out)
}

/// Whether a request failed in the TLS handshake because the other end
/// did not speak TLS: rustls reports a record it cannot read (plain HTTP's
/// "HTTP/1.1 400 …") as an `io::Error` of kind `InvalidData` in the
/// connection's error chain (typed, never read from the text).
fn not_tls(r: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(r);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::InvalidData {
                return true;
            }
            // An io::Error wrapping another (hyper's `Other` around
            // tokio-rustls' `InvalidData`): `source()` skips the inner one.
            if let Some(inner) = io.get_ref() {
                cur = Some(inner as &(dyn std::error::Error + 'static));
                continue;
            }
        }
        cur = e.source();
    }
    false
}

/// A tokio runtime for one transfer (the actions are synchronous).
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, RegistryError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(RegistryError::Runtime)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A registry's error body (here what a redirect to an internal
    /// service answered) never reaches the caller whole.
    #[test]
    fn registry_text_is_cut_and_escaped() {
        let body = format!("\x1b[31mline1\nforged {}", "S".repeat(10_000));
        let e = classify(
            RequestFailure::Status {
                status: 500,
                url: "http://r/v2/".into(),
                body,
            },
            "r.example",
            "r.example/a/b:c",
        );
        let text = e.to_string();
        assert!(matches!(e, RegistryError::Protocol { .. }), "{e:?}");
        assert!(text.len() < 400, "{text}");
        assert!(!text.contains('\n') && !text.contains('\x1b'), "{text}");
    }

    /// A failed answer is sorted by its envelope's codes when it sent
    /// one, else by its status.
    #[test]
    fn answers_are_sorted_by_codes_then_status() {
        let sort = |status, body: &str| {
            classify(
                RequestFailure::answer(status, "https://r/v2/".into(), body.as_bytes()),
                "r.example",
                "r.example/a/b:c",
            )
        };
        let envelope = |code: &str| format!(r#"{{"errors":[{{"code":"{code}"}}]}}"#);
        for code in ["MANIFEST_UNKNOWN", "NAME_UNKNOWN", "NOT_FOUND"] {
            let e = sort(500, &envelope(code));
            assert!(matches!(e, RegistryError::NotFound { .. }), "{code}: {e:?}");
        }
        for code in ["UNAUTHORIZED", "DENIED"] {
            let e = sort(500, &envelope(code));
            assert!(
                matches!(e, RegistryError::Unauthorized { .. }),
                "{code}: {e:?}"
            );
        }
        let e = sort(404, &envelope("TOOMANYREQUESTS"));
        assert!(matches!(e, RegistryError::Protocol { .. }), "{e:?}");
        let e = sort(404, "no such thing");
        assert!(matches!(e, RegistryError::NotFound { .. }), "{e:?}");
        for status in [401, 403] {
            let e = sort(status, r#"{"errors":[]}"#);
            assert!(matches!(e, RegistryError::Unauthorized { .. }), "{e:?}");
        }
        let e = sort(502, "");
        assert!(matches!(e, RegistryError::Protocol { .. }), "{e:?}");
    }

    #[test]
    fn pulled_vm_is_named_image_tag() {
        let i = ImageRef::parse("team/debian-12:v3", "ghcr.io", "trycua").unwrap();
        assert_eq!(pull::default_name(&i).unwrap().as_str(), "debian-12_v3");
        let i = ImageRef::parse("golden", "ghcr.io", "trycua").unwrap();
        assert_eq!(pull::default_name(&i).unwrap().as_str(), "golden_latest");
        // Longer than a VM name may be: refused, never cut, and said so
        // (the reference itself is fine).
        let long = format!("{}:tttttttttt", "b".repeat(60));
        let i = ImageRef::parse(&long, "ghcr.io", "trycua").unwrap();
        let e = pull::default_name(&i).unwrap_err();
        assert!(matches!(e, RegistryError::NameTooLong { .. }), "{e:?}");
        let text = e.to_string();
        assert!(
            text.contains(&format!("'{}_tttttttttt'", "b".repeat(60)))
                && text.contains("longer than 63 characters: give a NAME"),
            "{text}"
        );
        // Through the REST API and MCP the hint names the field.
        let api = e.for_api().to_string();
        assert!(api.ends_with("give the VM a \"name\""), "{api}");
        let run = RegistryError::NameTooLong {
            name: "n".into(),
            image: long.clone(),
            run: true,
            api: false,
        }
        .to_string();
        assert!(run.contains(&format!("`lume pull {long} NAME`")), "{run}");
    }

    #[test]
    fn credential_hints_follow_what_was_sent_and_the_door() {
        use auth::{Hint, Source};
        let e = |from, api, env_applies, helpers| {
            RegistryError::Unauthorized {
                registry: "reg.example".into(),
                sent: false,
                api: false,
            }
            .with_door(
                Hint {
                    from,
                    env_applies,
                    helpers,
                },
                api,
                false,
            )
            .to_string()
        };
        let anon = e(Source::Anonymous, false, false, false);
        assert!(
            anon.starts_with("Registry reg.example needs credentials: give --username"),
            "{anon}"
        );
        // The environment's token is offered only where it would go.
        assert!(!anon.contains("GITHUB_TOKEN"), "{anon}");
        assert!(anon.contains("`docker login reg.example`"), "{anon}");
        let ghcr = e(Source::Anonymous, false, true, false);
        assert!(ghcr.contains("GITHUB_USERNAME/GITHUB_TOKEN"), "{ghcr}");
        // A credential helper: `docker login` is no way, and it says why.
        let helper = e(Source::Anonymous, false, false, true);
        assert!(!helper.contains("docker login"), "{helper}");
        assert!(helper.contains("credential helper"), "{helper}");
        assert!(
            e(Source::Given, false, false, false)
                .starts_with("Registry reg.example refused the credentials: check them")
        );
        let env = e(Source::Environment, false, true, false);
        assert!(
            env.contains("refused the credentials from lume's environment"),
            "{env}"
        );
        let docker = e(Source::DockerConfig, false, false, false);
        assert!(docker.contains("from your Docker config"), "{docker}");
        let api = e(Source::Anonymous, true, true, true);
        assert!(api.contains("\"username\" and \"password\""), "{api}");
        assert!(
            !api.contains("--") && !api.contains("GITHUB_TOKEN"),
            "{api}"
        );
        let nf = RegistryError::NotFound {
            image: "x".into(),
            api: false,
        }
        .with_door(Hint::default(), true, true)
        .to_string();
        assert!(nf.contains("\"registry\" and \"organization\""), "{nf}");
    }

    /// Plain HTTP is never used for a public-only (API) transfer: its
    /// hint names apiPrivateImageUrls, not only the environment variable.
    #[test]
    fn not_tls_hint_follows_the_door() {
        let e = |public_only| {
            let source = RequestFailure::Status {
                status: 400,
                url: "https://r.example:5000/v2/".into(),
                body: String::new(),
            };
            RegistryError::NotTls {
                registry: "r.example:5000".into(),
                public_only: false,
                source,
            }
            .with_door(auth::Hint::default(), true, public_only)
            .to_string()
        };
        let cli = e(false);
        assert!(
            cli.contains("LUME_INSECURE_REGISTRIES=r.example:5000"),
            "{cli}"
        );
        let api = e(true);
        assert!(api.contains("apiPrivateImageUrls"), "{api}");
    }
}
