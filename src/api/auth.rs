//! Who is served. Every request passes [`authorize`]:
//!
//! - a connection from a VM's own process (QEMU, passt) is refused, always;
//! - with an API token configured, every request must carry it, and acts as
//!   the server's own user;
//! - without one, the caller is the local uid that owns the client's socket
//!   (see [`super::peer`]): root, the user the server runs as, the user who
//!   ran `sudo lume serve` and the members of the `apiGroup` named in
//!   config.yaml are served, as themselves (all but the user the server
//!   runs as in its VM location only); everyone else, and every caller that
//!   cannot be identified, gets 403.
//!
//! The token itself never comes from the command line: `LUME_API_TOKEN` or
//! `--token-file`.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::error::ApiError;
use super::peer::{Connection, Identity};
use crate::settings::Settings;
use crate::vm::Caller;

/// The config.yaml key naming the group whose members may use the API.
pub const API_GROUP_KEY: &str = "apiGroup";

/// Why the API token cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(
        "--token on the command line is refused: every user can read it in the process list. \
         Put the token in the LUME_API_TOKEN environment variable or in a file given with --token-file"
    )]
    OnCommandLine,
    #[error("Give the API token once: LUME_API_TOKEN and --token-file are both set")]
    Twice,
    #[error("Cannot read the token file {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("The token file {0} is a symbolic link: give --token-file the file itself")]
    Link(PathBuf),
    #[error("The token file {0} is not a regular file: give --token-file a file")]
    NotAFile(PathBuf),
    #[error(
        "The token file {path} belongs to uid {owner}, not to the server's user (uid {euid}): \
         another user could have written it; run 'chown {euid} {path}' if you trust its content"
    )]
    NotOwned {
        path: PathBuf,
        owner: u32,
        euid: u32,
    },
    #[error(
        "The token file {path} can be read or written by other users (mode {mode:04o}): run 'chmod 600 {path}'"
    )]
    Exposed { path: PathBuf, mode: u32 },
    #[error("The API token is empty: put a secret in LUME_API_TOKEN or the token file")]
    Empty,
    #[error(
        "LUME_API_TOKEN is set but empty (or only spaces): put the secret in it, or unset it (unset LUME_API_TOKEN) to serve without a token"
    )]
    EmptyEnv,
    #[error("The API token must be printable ASCII without spaces, so that it fits in a header")]
    NotPrintable,
}

/// The token from `LUME_API_TOKEN` (`env`) or `--token-file` (`file`).
/// The file is opened without following a symbolic link and judged on the
/// open descriptor: a regular file of the server's effective uid, with no
/// bits for group or others. One trailing newline is dropped.
pub fn read_token(env: Option<String>, file: Option<&Path>) -> Result<Option<String>, TokenError> {
    // An empty variable is a mistake (a failed `$(cat …)`), never "no token".
    if env.as_deref().is_some_and(|t| t.trim().is_empty()) {
        return Err(TokenError::EmptyEnv);
    }
    let token = match (env, file) {
        (Some(_), Some(_)) => return Err(TokenError::Twice),
        (Some(t), None) => t,
        (None, Some(path)) => read_token_file(path)?,
        (None, None) => return Ok(None),
    };
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(TokenError::NotPrintable);
    }
    Ok(Some(token))
}

fn read_token_file(path: &Path) -> Result<String, TokenError> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let read = |e| TokenError::Read(path.to_path_buf(), e);
    // O_NONBLOCK: a FIFO planted at the path must not hang the server.
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                TokenError::Link(path.to_path_buf())
            } else {
                read(e)
            }
        })?;
    let meta = f.metadata().map_err(read)?;
    if !meta.is_file() {
        return Err(TokenError::NotAFile(path.to_path_buf()));
    }
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != euid {
        return Err(TokenError::NotOwned {
            path: path.to_path_buf(),
            owner: meta.uid(),
            euid,
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(TokenError::Exposed {
            path: path.to_path_buf(),
            mode,
        });
    }
    let mut text = String::new();
    f.read_to_string(&mut text).map_err(read)?;
    let text = text.strip_suffix('\n').unwrap_or(&text);
    let text = text.strip_suffix('\r').unwrap_or(text);
    if text.is_empty() {
        return Err(TokenError::Empty);
    }
    Ok(text.to_string())
}

/// The users a server serves without a token besides root and `apiGroup`:
/// the uid that runs it, and, for a root server started with sudo, the user
/// who ran sudo (`SUDO_UID`; only root can set a root process's environment).
pub fn server_owners() -> Vec<u32> {
    let mut owners = vec![nix::unistd::getuid().as_raw()];
    owners.extend(sudo_uid());
    owners
}

/// The user who ran `sudo lume serve` (`SUDO_UID`), for a server running as
/// root. Served without a token, but only in the server's VM location
/// (see `routes::allowed_storage`).
pub fn sudo_uid() -> Option<u32> {
    if !nix::unistd::getuid().is_root() {
        return None;
    }
    std::env::var("SUDO_UID")
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        .filter(|&u| u != 0)
}

/// Compares without an early exit, so the time taken says nothing about the token.
pub fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    let mut diff = given.len() ^ expected.len();
    for (i, b) in expected.iter().enumerate() {
        diff |= usize::from(given.get(i).copied().unwrap_or(0) ^ b);
    }
    diff == 0
}

fn forbidden(message: String) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, message)
}

/// What an unserved user is told: no path, no group name (those go to the
/// server's log only).
pub const NOT_SERVED: &str = "This lume API does not serve you: ask the administrator to add you to the API group or give you the token";

/// [`decide_user`] without its refusal's log line.
fn decide_user_quietly(uid: u32, owners: &[u32], api_group: Option<&str>) -> Result<Caller, ()> {
    let caller = Caller::from_uid(uid);
    let member = api_group.is_some_and(|g| caller.in_group(g));
    if caller.is_root() || owners.contains(&uid) || member {
        Ok(caller)
    } else {
        Err(())
    }
}

/// Whether a local uid is served without a token, and as whom. A refusal
/// is logged with what the administrator needs (the uid, the group and the
/// settings file); the caller is told only [`NOT_SERVED`].
pub fn decide_user(
    uid: u32,
    owners: &[u32],
    api_group: Option<&str>,
    settings_file: &Path,
) -> Result<Caller, ApiError> {
    let caller = Caller::from_uid(uid);
    if caller.is_root() || owners.contains(&uid) {
        return Ok(caller);
    }
    if let Some(group) = api_group
        && caller.in_group(group)
    {
        return Ok(caller);
    }
    let how = match api_group {
        Some(group) => format!(
            "not in group '{group}' ({API_GROUP_KEY} in {})",
            settings_file.display()
        ),
        None => format!("no {API_GROUP_KEY} is set in {}", settings_file.display()),
    };
    super::log_refusal(
        &format!("uid {uid}"),
        &format!(
            "Refused uid {uid}: not root, the server's user or an {API_GROUP_KEY} member; {how}"
        ),
    );
    Err(forbidden(NOT_SERVED.into()))
}

/// The bearer token a request carries, if any.
fn bearer(req: &Request) -> Option<&str> {
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim())
}

/// Decides who the caller is, or refuses the request; the caller goes into
/// the request's extensions for the routes ([`super::extract::Who`]).
pub async fn authorize(State(st): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    let conn = req
        .extensions()
        .get::<ConnectInfo<Connection>>()
        .map(|ConnectInfo(c)| c.clone());
    let token = bearer(&req).map(str::to_string);
    match caller_of(&st, conn, token.as_deref()).await {
        Ok((caller, Scope::HandoffOnly)) if req.uri().path() != crate::network::handoff::ROUTE => {
            super::log_refusal(
                &format!("uid {}", caller.uid),
                &format!(
                    "Refused uid {} on {}: a member of the hand-off group is served only the network hand-off",
                    caller.uid,
                    req.uri().path()
                ),
            );
            forbidden(HANDOFF_ONLY.into()).into_response()
        }
        Ok((caller, _)) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Err((e, who)) => {
            // A refusal of who is calling holds for the whole connection:
            // close it rather than keep it open for that caller.
            let close = e.status == StatusCode::FORBIDDEN;
            let mut response = e.into_response();
            if close {
                response.headers_mut().insert(
                    header::CONNECTION,
                    header::HeaderValue::from_static("close"),
                );
            }
            if let Some(who) = who {
                response.extensions_mut().insert(super::Refused(who));
            }
            response
        }
    }
}

/// What a served caller may ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every route (root, the server's users, apiGroup members, the token).
    Full,
    /// Only the network hand-off ([`crate::network::handoff::ROUTE`]): a
    /// member of `--handoff-group` (the packaged service's group `lume`),
    /// whose lume runs their own VMs as themselves and asks the service for
    /// nothing but their networks.
    HandoffOnly,
}

/// What a member of the hand-off group is told on any other route.
pub const HANDOFF_ONLY: &str = "lume's service serves you only the networks of your own VMs (lume without sudo): run lume as yourself (`lume ls`, `lume run NAME` act on your own ~/.lume); the service's REST API is for root and its API group";

/// The caller and what it may ask, or the refusal and who was refused
/// (for the log; `None` when the server failed rather than refused).
async fn caller_of(
    st: &AppState,
    conn: Option<Connection>,
    given: Option<&str>,
) -> Result<(Caller, Scope), (ApiError, Option<String>)> {
    let Some(conn) = conn else {
        return Err((
            forbidden("Cannot tell who is calling: the request is refused".into()),
            Some("an unknown connection".into()),
        ));
    };
    let identity = conn.identity(st.storage.clone()).await;
    let who = super::refusal_key(&identity);
    let refuse = |e: ApiError| (e, Some(who.clone()));
    if let Identity::Guest(helper) = &identity {
        super::log_refusal(
            &who,
            &format!(
                "Refused a connection from a virtual machine ({} pid {}, {})",
                helper.program,
                helper.pid,
                conn.describe()
            ),
        );
        return Err(refuse(forbidden(format!(
            "Requests from virtual machines are refused: this connection comes from {} (pid {}), which lume runs for a VM. \
             Call the API from the host",
            helper.program, helper.pid
        ))));
    }
    if let Some(token) = &st.token {
        let refusal = match given {
            Some(t) if same_secret(t.as_bytes(), token.as_bytes()) => {
                return Ok((Caller::current(), Scope::Full));
            }
            Some(_) => ApiError::new(StatusCode::UNAUTHORIZED, "Wrong API token"),
            None => ApiError::new(
                StatusCode::UNAUTHORIZED,
                "This server needs an API token: send the header 'Authorization: Bearer TOKEN'",
            ),
        };
        let named = match &identity {
            Identity::User(uid) => format!("uid {uid}"),
            _ => "an unidentified caller".into(),
        };
        super::log_refusal(
            &who,
            &format!("Refused {named} ({}): {}", conn.describe(), refusal.message),
        );
        return Err(refuse(refusal));
    }
    let uid = match identity {
        Identity::User(uid) => uid,
        Identity::Unknown(why) => {
            super::log_refusal(
                &who,
                &format!(
                    "Refused {}: the calling user is unknown ({why})",
                    conn.describe()
                ),
            );
            return Err(refuse(forbidden(format!(
                "Cannot tell which local user is calling, so the request is refused ({why}): \
                 call from a program on this host, or use the API token"
            ))));
        }
        Identity::Guest(_) => unreachable!("refused above"),
    };
    // A settings file the server cannot use is the server's failure (500),
    // kept in its log; not a refusal of this caller.
    let settings = Settings::load().map_err(|e| (ApiError::internal(&e), None))?;
    let group = match &st.api_group {
        Some(g) => Some(g.clone()),
        None => settings
            .get_str(API_GROUP_KEY)
            .map_err(|e| (ApiError::internal(&e), None))?,
    };
    if let Ok(caller) = decide_user_quietly(uid, &st.owners, group.as_deref()) {
        return Ok((caller, Scope::Full));
    }
    if let Some(handoff) = &st.handoff_group
        && conn.is_unix()
    {
        let caller = Caller::from_uid(uid);
        if caller.in_group(handoff) {
            return Ok((caller, Scope::HandoffOnly));
        }
    }
    decide_user(uid, &st.owners, group.as_deref(), settings.file())
        .map(|c| (c, Scope::Full))
        .map_err(|e| {
            super::log_refusal(&who, &format!("Refused uid {uid} ({})", conn.describe()));
            refuse(e)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn tokens_compare_whole() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abd", b"abc"));
        assert!(!same_secret(b"ab", b"abc"));
        assert!(!same_secret(b"abcd", b"abc"));
        assert!(!same_secret(b"", b"abc"));
    }

    #[test]
    fn an_empty_environment_token_is_an_error_not_no_token() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "s3cret\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        for empty in ["", "  ", "\n", "\t "] {
            for f in [None, Some(file.as_path())] {
                let e = read_token(Some(empty.into()), f).unwrap_err();
                assert!(matches!(e, TokenError::EmptyEnv), "{empty:?}: {e}");
                assert!(e.to_string().starts_with("LUME_API_TOKEN is set but empty"));
            }
        }
    }

    #[test]
    fn tokens_come_from_the_environment_or_a_private_file() {
        assert_eq!(read_token(None, None).unwrap(), None);
        assert_eq!(
            read_token(Some("s3cret".into()), None).unwrap(),
            Some("s3cret".into())
        );
        assert!(matches!(
            read_token(Some("a b".into()), None),
            Err(TokenError::NotPrintable)
        ));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "from-file\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            read_token(None, Some(&file)).unwrap(),
            Some("from-file".into())
        );
        assert!(matches!(
            read_token(Some("x".into()), Some(&file)),
            Err(TokenError::Twice)
        ));
        for mode in [0o644, 0o640, 0o604, 0o610] {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = read_token(None, Some(&file)).unwrap_err();
            assert!(e.to_string().contains("chmod 600"), "{e}");
        }
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&file, "\n").unwrap();
        assert!(matches!(
            read_token(None, Some(&file)),
            Err(TokenError::Empty)
        ));
        assert!(matches!(
            read_token(None, Some(&dir.path().join("none"))),
            Err(TokenError::Read(..))
        ));
    }

    /// A symbolic link, something else than a file, or a file of another
    /// user is refused, whatever it holds.
    #[test]
    fn the_token_file_is_the_servers_own_private_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "s3cret\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(matches!(
            read_token(None, Some(&link)),
            Err(TokenError::Link(_))
        ));
        assert!(matches!(
            read_token(None, Some(dir.path())),
            Err(TokenError::NotAFile(_))
        ));
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(matches!(
            read_token(None, Some(&fifo)),
            Err(TokenError::NotAFile(_))
        ));
        let other = if nix::unistd::geteuid().is_root() {
            65534
        } else {
            0
        };
        // Only root can give a file away; elsewhere this part is skipped.
        if nix::unistd::chown(&file, Some(nix::unistd::Uid::from_raw(other)), None).is_ok() {
            let e = read_token(None, Some(&file)).unwrap_err();
            assert!(
                matches!(e, TokenError::NotOwned { owner, .. } if owner == other),
                "{e}"
            );
        }
    }

    #[test]
    fn who_is_served_without_a_token() {
        let file = Path::new("/root/.config/lume/config.yaml");
        // Root, and the server's own user.
        assert!(decide_user(0, &[1000], None, file).is_ok());
        assert_eq!(decide_user(65534, &[65534], None, file).unwrap().uid, 65534);
        // Anyone else: 403 with the generic way in; neither the settings
        // file nor the group is named to the refused user.
        for group in [None, Some("root")] {
            let e = decide_user(65534, &[0], group, file).unwrap_err();
            assert_eq!(e.status, StatusCode::FORBIDDEN);
            assert_eq!(e.message, NOT_SERVED);
            assert!(!e.message.contains("config.yaml"), "{}", e.message);
            assert!(!e.message.contains("root"), "{}", e.message);
        }
        // A member of the apiGroup (nobody's primary group).
        let gid = Caller::from_uid(65534).gid.unwrap();
        let primary = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid))
            .unwrap()
            .unwrap()
            .name;
        assert_eq!(
            decide_user(65534, &[0], Some(&primary), file).unwrap().uid,
            65534
        );
        // A group that does not exist lets nobody in.
        assert!(decide_user(65534, &[0], Some("no-such-group-here"), file).is_err());
    }
}
