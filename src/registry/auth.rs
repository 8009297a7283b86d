//! Who lume is to a registry, and how it connects.
//!
//! Credentials, first found wins: `--username`/`--password` (or the API
//! request's), lume's environment variables `GITHUB_USERNAME`/`GHCR_USERNAME`
//! with `GITHUB_TOKEN`/`GHCR_TOKEN` (only when the caller is the user lume
//! runs as: an API caller never gets the server's secrets; and only to
//! `ghcr.io` or the registry config.yaml's `registry.ghcr.registry` names,
//! never to a registry named on the command line), then the
//! `auths` entry for the registry in the calling user's Docker config
//! (for the user lume runs as `$DOCKER_CONFIG/config.json`, else
//! `$HOME/.docker/config.json`; for an API caller the `.docker/config.json`
//! in its home directory from the user database), opened with the caller's
//! rights. Otherwise anonymous, which
//! still fetches the anonymous bearer token ghcr.io wants for public images.
//! Docker's credential helpers (`credsStore`, `credHelpers`) are not run;
//! that one is named is noted ([`Hint::helpers`]) so a refusal can say so.
//! Where the credentials came from ([`Source`]) goes into the refusal too.
//!
//! Plain HTTP is used for registries on a loopback address or `localhost`
//! (as Docker does) and for those named in `LUME_INSECURE_REGISTRIES`
//! (comma-separated `HOST[:PORT]`); every other registry is HTTPS.

use std::io::Read;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use base64::Engine;

use super::{ImageRef, RegistryError};
use crate::vm::caller::{Access, Caller, OpenError};

/// Environment variable: registries spoken to over plain HTTP.
pub const INSECURE_ENV: &str = "LUME_INSECURE_REGISTRIES";

/// Largest Docker config file read.
const MAX_DOCKER_CONFIG: u64 = 1 << 20;

/// Where the credentials of a transfer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Source {
    /// None found: anonymous.
    #[default]
    Anonymous,
    /// `--username`/`--password` or the request's fields.
    Given,
    /// `GITHUB_USERNAME`/`GITHUB_TOKEN` (or `GHCR_*`) in lume's environment.
    Environment,
    /// An `auths` entry of the Docker config.
    DockerConfig,
}

/// What a refusal's hint needs to know about the credentials lume looked
/// for (so it offers only what applies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Hint {
    pub from: Source,
    /// The environment's token would go to this registry (ghcr.io or
    /// config.yaml's registry, and the caller is lume's own user).
    pub env_applies: bool,
    /// The Docker config names a credential helper for this registry
    /// (`credsStore`, or a `credHelpers` entry), which lume does not run.
    pub helpers: bool,
}

/// What a transfer authenticates with.
#[derive(Clone, PartialEq, Eq)]
pub enum RegistryAuth {
    Anonymous,
    /// User name and password (or token), sent as HTTP Basic to the
    /// registry or its token realm ([`super::token`]).
    Basic(String, String),
}

impl std::fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Anonymous => f.write_str("Anonymous"),
            Self::Basic(user, _) => f
                .debug_tuple("Basic")
                .field(user)
                .field(&"<redacted>")
                .finish(),
        }
    }
}

/// The credentials found, and where from.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub auth: RegistryAuth,
    pub hint: Hint,
}

/// Credentials for `image`, as described in the module documentation.
/// `token_registry` is config.yaml's registry: the environment's token goes
/// there or to ghcr.io only.
pub fn credentials(
    image: &ImageRef,
    username: Option<&str>,
    password: Option<&str>,
    caller: &Caller,
    token_registry: &str,
) -> Result<Credentials, RegistryError> {
    let own = caller.uid == nix::unistd::getuid().as_raw();
    let mut hint = Hint {
        env_applies: own && env_token_goes_to(&image.registry, token_registry),
        ..Hint::default()
    };
    if let (Some(u), Some(p)) = (username, password)
        && !u.is_empty()
    {
        hint.from = Source::Given;
        return Ok(Credentials {
            auth: RegistryAuth::Basic(u.to_string(), p.to_string()),
            hint,
        });
    }
    if hint.env_applies {
        let env = |a: &str, b: &str| {
            std::env::var(a)
                .ok()
                .or_else(|| std::env::var(b).ok())
                .filter(|s| !s.is_empty())
        };
        if let (Some(u), Some(p)) = (
            env("GITHUB_USERNAME", "GHCR_USERNAME"),
            env("GITHUB_TOKEN", "GHCR_TOKEN"),
        ) {
            hint.from = Source::Environment;
            return Ok(Credentials {
                auth: RegistryAuth::Basic(u, p),
                hint,
            });
        }
    }
    if let Some(path) = docker_config_path(caller, own)
        && let Some(found) = from_docker_config(&path, &image.registry, caller)?
    {
        hint.helpers = found.helper;
        if let Some(auth) = found.auth {
            hint.from = Source::DockerConfig;
            return Ok(Credentials { auth, hint });
        }
    }
    Ok(Credentials {
        auth: RegistryAuth::Anonymous,
        hint,
    })
}

/// Whether the environment's GitHub token may be sent to `registry`.
pub fn env_token_goes_to(registry: &str, token_registry: &str) -> bool {
    registry.eq_ignore_ascii_case("ghcr.io") || registry.eq_ignore_ascii_case(token_registry)
}

fn docker_config_path(caller: &Caller, own: bool) -> Option<PathBuf> {
    if own {
        if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
            return Some(PathBuf::from(dir).join("config.json"));
        }
        if let Some(home) = std::env::var_os("HOME") {
            return Some(PathBuf::from(home).join(".docker/config.json"));
        }
    }
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(caller.uid))
        .ok()
        .flatten()?;
    Some(user.dir.join(".docker/config.json"))
}

/// The `auths` entry for `registry` in a Docker config file, opened with
/// the caller's rights. A missing or unreadable file is no credential.
fn from_docker_config(
    path: &Path,
    registry: &str,
    caller: &Caller,
) -> Result<Option<DockerFound>, RegistryError> {
    let file = match caller.open(path, Access::Read) {
        Ok(f) => f,
        Err(OpenError::Missing { .. } | OpenError::Forbidden { .. }) => return Ok(None),
        Err(OpenError::NotRegular { .. } | OpenError::MagicLink { .. }) => return Ok(None),
        Err(OpenError::Io { path, source }) => return Err(RegistryError::Io { path, source }),
    };
    let mut text = String::new();
    file.take(MAX_DOCKER_CONFIG)
        .read_to_string(&mut text)
        .map_err(super::io_at(path))?;
    parse_docker_config(&text, registry)
        .map(Some)
        .map_err(|why| RegistryError::DockerConfig {
            path: path.to_path_buf(),
            why,
        })
}

/// What a Docker config holds for one registry.
#[derive(Debug, Default)]
pub struct DockerFound {
    /// Its `auths` entry, when it has credentials.
    pub auth: Option<RegistryAuth>,
    /// A credential helper is named for it (`credsStore` for every
    /// registry, or its `credHelpers` entry): Docker keeps the credentials
    /// there, and lume does not run helpers.
    pub helper: bool,
}

/// Finds `registry` in a Docker config's `auths` (keys may be URLs, as
/// `docker login` writes for Docker Hub), and whether a credential helper
/// is named for it.
pub fn parse_docker_config(text: &str, registry: &str) -> Result<DockerFound, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let key_host = |k: &str| {
        let k = k
            .trim_start_matches("https://")
            .trim_start_matches("http://");
        k.split('/').next().unwrap_or(k).to_ascii_lowercase()
    };
    let helper = v
        .get("credsStore")
        .and_then(|s| s.as_str())
        .is_some_and(|s| !s.is_empty())
        || v.get("credHelpers")
            .and_then(|h| h.as_object())
            .is_some_and(|h| h.keys().any(|k| key_host(k) == registry));
    Ok(DockerFound {
        auth: auths_entry(&v, registry, key_host)?,
        helper,
    })
}

/// The credentials of `registry`'s `auths` entry, if it has some.
fn auths_entry(
    v: &serde_json::Value,
    registry: &str,
    key_host: impl Fn(&str) -> String,
) -> Result<Option<RegistryAuth>, String> {
    let Some(auths) = v.get("auths").and_then(|a| a.as_object()) else {
        return Ok(None);
    };
    let Some((_, entry)) = auths.iter().find(|(k, _)| key_host(k) == registry) else {
        return Ok(None);
    };
    if let (Some(u), Some(p)) = (
        entry.get("username").and_then(|x| x.as_str()),
        entry.get("password").and_then(|x| x.as_str()),
    ) {
        return Ok(Some(RegistryAuth::Basic(u.into(), p.into())));
    }
    let Some(auth) = entry.get("auth").and_then(|x| x.as_str()) else {
        return Ok(None);
    };
    let raw = base64::engine::general_purpose::STANDARD
        .decode(auth.trim())
        .map_err(|_| format!("the auth entry of {registry} is not base64"))?;
    let raw =
        String::from_utf8(raw).map_err(|_| format!("the auth entry of {registry} is not text"))?;
    let (u, p) = raw
        .split_once(':')
        .ok_or_else(|| format!("the auth entry of {registry} is not USER:PASSWORD"))?;
    Ok(Some(RegistryAuth::Basic(u.into(), p.into())))
}

/// Whether `registry` is spoken to over plain HTTP.
pub fn plain_http(registry: &str) -> bool {
    let host = super::reference::host_of(registry);
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    if let Ok(ip) = host.parse::<IpAddr>()
        && ip.is_loopback()
    {
        return true;
    }
    std::env::var(INSECURE_ENV).is_ok_and(|v| {
        v.split(',')
            .map(str::trim)
            .any(|r| !r.is_empty() && r.eq_ignore_ascii_case(registry))
    })
}

/// The gate for a transfer on `rt` when `public_only` (it runs as long
/// as the returned value lives).
pub fn gate(
    public_only: bool,
    rt: &tokio::runtime::Runtime,
) -> Result<Option<super::guard::Gate>, RegistryError> {
    if !public_only {
        return Ok(None);
    }
    rt.block_on(super::guard::Gate::start())
        .map(Some)
        .map_err(RegistryError::Runtime)
}

/// For API callers without `apiPrivateImageUrls`: the registry's name must
/// resolve to public addresses only.
pub fn check_public(image: &ImageRef) -> Result<(), RegistryError> {
    let host = image.host();
    let port = image
        .registry
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse::<u16>().ok())
        .unwrap_or(443);
    let addrs: Vec<IpAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![ip],
        Err(_) => std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
            .map_err(|source| RegistryError::Unresolved {
                registry: image.registry.clone(),
                source,
            })?
            .map(|a| a.ip())
            .collect(),
    };
    match addrs
        .into_iter()
        .find(|a| crate::image::download::is_private(*a))
    {
        Some(addr) => Err(RegistryError::PrivateDestination {
            registry: image.registry.clone(),
            addr,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A password never shows in debug output (logs, panics).
    #[test]
    fn passwords_are_not_printed() {
        let text = format!("{:?}", RegistryAuth::Basic("alice".into(), "s3cr3t".into()));
        assert!(text.contains("alice") && !text.contains("s3cr3t"), "{text}");
    }

    #[test]
    fn docker_config_entries() {
        let text = r#"{"auths":{"https://index.docker.io/v1/":{"auth":"dTpw"},
            "127.0.0.1:5000":{"auth":"YWxpY2U6czNjcjM6dA=="}}}"#;
        match parse_docker_config(text, "127.0.0.1:5000").unwrap().auth {
            Some(RegistryAuth::Basic(u, p)) => {
                assert_eq!((u.as_str(), p.as_str()), ("alice", "s3cr3:t"))
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_docker_config(text, "index.docker.io").unwrap().auth,
            Some(RegistryAuth::Basic(..))
        ));
        let none = parse_docker_config(text, "ghcr.io").unwrap();
        assert!(none.auth.is_none() && !none.helper);
        assert!(parse_docker_config(r#"{"auths":{"a":{"auth":"!!"}}}"#, "a").is_err());
    }

    /// Docker's default (`docker login` with a credential store): empty
    /// `auths` entries and `credsStore`, or `credHelpers` per registry.
    #[test]
    fn docker_credential_helpers_are_noticed() {
        let store = r#"{"auths":{"ghcr.io":{}},"credsStore":"desktop"}"#;
        let f = parse_docker_config(store, "ghcr.io").unwrap();
        assert!(f.auth.is_none() && f.helper, "{f:?}");
        let helpers = r#"{"credHelpers":{"https://r.example:5000":"ecr-login"}}"#;
        assert!(
            parse_docker_config(helpers, "r.example:5000")
                .unwrap()
                .helper
        );
        assert!(!parse_docker_config(helpers, "ghcr.io").unwrap().helper);
    }

    /// An API caller cannot make root read credentials it could not read
    /// itself: root's 0600 Docker config is no credential for `nobody`.
    #[test]
    fn docker_config_is_read_with_the_callers_rights() {
        if !nix::unistd::getuid().is_root() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        std::fs::write(&p, r#"{"auths":{"r.example":{"auth":"YTpi"}}}"#).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let root = Caller::current();
        assert!(matches!(
            from_docker_config(&p, "r.example", &root).unwrap(),
            Some(DockerFound {
                auth: Some(RegistryAuth::Basic(..)),
                ..
            })
        ));
        let nobody = Caller::from_uid(65534);
        assert!(
            from_docker_config(&p, "r.example", &nobody)
                .unwrap()
                .is_none()
        );
    }

    /// GITHUB_TOKEN is never handed to a registry the user merely named.
    #[test]
    fn env_token_only_for_ghcr_or_the_configured_registry() {
        assert!(env_token_goes_to("ghcr.io", "ghcr.io"));
        assert!(env_token_goes_to("GHCR.io", "r.example"));
        assert!(env_token_goes_to("r.example:5000", "r.example:5000"));
        assert!(!env_token_goes_to("evil.example", "ghcr.io"));
        assert!(!env_token_goes_to("ghcr.io.evil.example", "ghcr.io"));
    }

    #[test]
    fn plain_http_only_for_loopback() {
        assert!(plain_http("127.0.0.1:5000"));
        assert!(plain_http("localhost:5000"));
        assert!(plain_http("[::1]:5000"));
        assert!(!plain_http("ghcr.io"));
        assert!(!plain_http("192.0.2.1:5000"));
    }
}
