//! lume's SSH key pair and the public keys it installs in guests.
//!
//! One ed25519 key pair per storage location, created on first use with
//! OpenSSH's `ssh-keygen` (openssh-client: the tool every OpenSSH user has,
//! and the key format the `ssh` client lume runs reads):
//! `<storage>/.ssh/id_ed25519` (0600) and `.pub`, in a 0700 directory owned
//! by the user lume runs as. The storage is the user's own (`~/.lume`) or,
//! for lume running as root (sudo, `lume serve`), root's, which
//! [`crate::vm::store::Store::check_private`] already requires nobody else to
//! be able to change. lume never writes into another user's home directory.
//!
//! Besides lume's key, a guest gets the public keys of whoever asked for the
//! run (`~/.ssh/*.pub` of the caller's home in the password database), read
//! with the caller's rights ([`crate::vm::Caller::open`]).

use std::fs;
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::vm::Caller;
use crate::vm::caller::Access;

/// The key directory's name inside the storage root.
pub const KEY_DIR: &str = ".ssh";
/// The private key's file name.
pub const KEY_FILE: &str = "id_ed25519";
/// The largest public key file lume reads.
const MAX_PUB: u64 = 64 << 10;

/// Why lume's key pair is not usable.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "{path} is not a private directory of the user lume runs as (a symlink, another owner, or readable by others): remove it and lume creates a new key pair"
    )]
    UnsafeDir { path: PathBuf },
    #[error(
        "{path} is not a private file of the user lume runs as (a symlink, another owner, or readable by others): remove it and its .pub and lume creates a new key pair"
    )]
    UnsafeKey { path: PathBuf },
    #[error("ssh-keygen was not found: install openssh-client (apt-get install openssh-client)")]
    NoKeygen,
    #[error("ssh-keygen failed ({status}): {stderr}")]
    Keygen { status: String, stderr: String },
    #[error("Cannot use lume's key pair in {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
    move |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// lume's key pair of one storage location.
#[derive(Debug, Clone)]
pub struct KeyPair {
    pub private: PathBuf,
    /// The public key line.
    pub public: String,
}

/// Where the key pair of storage root `root` lives.
pub fn key_path(root: &Path) -> PathBuf {
    root.join(KEY_DIR).join(KEY_FILE)
}

/// A directory or file that only this process's user controls.
fn private(meta: &fs::Metadata) -> bool {
    meta.uid() == nix::unistd::geteuid().as_raw() && meta.mode() & 0o077 == 0
}

/// The key pair of `root`, created when missing.
pub fn ensure(root: &Path) -> Result<KeyPair, KeyError> {
    let dir = root.join(KEY_DIR);
    match fs::symlink_metadata(&dir) {
        Ok(m) if m.file_type().is_dir() && private(&m) => {}
        Ok(_) => return Err(KeyError::UnsafeDir { path: dir }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // The storage root exists (it holds the VM); only the key
            // directory is made here.
            match fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_at(&dir)(e)),
            }
            let m = fs::symlink_metadata(&dir).map_err(io_at(&dir))?;
            if !m.file_type().is_dir() || m.uid() != nix::unistd::geteuid().as_raw() {
                return Err(KeyError::UnsafeDir { path: dir });
            }
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(io_at(&dir))?;
        }
        Err(e) => return Err(io_at(&dir)(e)),
    }
    // One creator at a time.
    let lock_path = dir.join(".lock");
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .custom_flags_nofollow()
        .open(&lock_path)
        .map_err(io_at(&lock_path))?;
    let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| io_at(&lock_path)(e.into()))?;
    let private_key = dir.join(KEY_FILE);
    if let Some(pair) = load(&private_key)? {
        return Ok(pair);
    }
    generate(&dir, &private_key)?;
    load(&private_key)?.ok_or(KeyError::UnsafeKey { path: private_key })
}

trait NoFollow {
    fn custom_flags_nofollow(&mut self) -> &mut Self;
}

impl NoFollow for fs::OpenOptions {
    fn custom_flags_nofollow(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .mode(0o600)
    }
}

/// The pair at `private_key`, if both halves are there and private.
fn load(private_key: &Path) -> Result<Option<KeyPair>, KeyError> {
    let public_path = private_key.with_extension("pub");
    let meta = match fs::symlink_metadata(private_key) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_at(private_key)(e)),
    };
    if !meta.file_type().is_file() || !private(&meta) {
        return Err(KeyError::UnsafeKey {
            path: private_key.to_path_buf(),
        });
    }
    let public = match read_small(&public_path) {
        Ok(Some(p)) => p,
        Ok(None) => return Ok(None),
        Err(e) => return Err(io_at(&public_path)(e)),
    };
    let Some(line) = public.lines().find(|l| is_public_key(l)) else {
        return Ok(None);
    };
    Ok(Some(KeyPair {
        private: private_key.to_path_buf(),
        public: line.trim().to_string(),
    }))
}

/// A regular file's text (not through a symlink), at most [`MAX_PUB`] bytes.
fn read_small(path: &Path) -> std::io::Result<Option<String>> {
    let f = match fs::OpenOptions::new()
        .read(true)
        .custom_flags_nofollow()
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut s = String::new();
    f.take(MAX_PUB).read_to_string(&mut s)?;
    Ok(Some(s))
}

/// Makes a new pair with ssh-keygen under a temporary name, then renames
/// the public half and then the private one into place: a private key is
/// only ever complete, and a pair missing its private half is remade.
fn generate(dir: &Path, private_key: &Path) -> Result<(), KeyError> {
    let tmp = dir.join(format!(".new-{:x}", crate::util::random::u64()));
    let comment = format!(
        "lume@{}",
        fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "host".into())
    );
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", &comment, "-f"])
        .arg(&tmp)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => KeyError::NoKeygen,
            _ => io_at(dir)(e),
        })?;
    let tmp_pub = tmp.with_extension("pub");
    let cleanup = || {
        let _ = fs::remove_file(&tmp);
        let _ = fs::remove_file(&tmp_pub);
    };
    if !out.status.success() {
        cleanup();
        return Err(KeyError::Keygen {
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    let done = (|| {
        for f in [&tmp, &tmp_pub] {
            fs::set_permissions(f, fs::Permissions::from_mode(0o600))?;
            fs::File::open(f)?.sync_all()?;
        }
        fs::rename(&tmp_pub, private_key.with_extension("pub"))?;
        fs::rename(&tmp, private_key)?;
        fs::File::open(dir)?.sync_all()
    })();
    if let Err(e) = done {
        cleanup();
        return Err(io_at(dir)(e));
    }
    Ok(())
}

/// Whether a line looks like an OpenSSH public key.
pub fn is_public_key(line: &str) -> bool {
    let l = line.trim();
    let mut parts = l.split_whitespace();
    let (Some(kind), Some(blob)) = (parts.next(), parts.next()) else {
        return false;
    };
    (kind.starts_with("ssh-") || kind.starts_with("ecdsa-") || kind.starts_with("sk-"))
        && blob
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b))
        && !l.contains(['\n', '\r'])
}

/// The caller's own public keys: `~/.ssh/*.pub` of the caller's home (from
/// the password database), each file opened with the caller's rights.
/// Files the caller cannot read, or that are not keys, are skipped.
pub fn caller_public_keys(caller: &Caller) -> Vec<String> {
    let Some(home) = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(caller.uid))
        .ok()
        .flatten()
        .map(|u| u.dir)
    else {
        return Vec::new();
    };
    public_keys_in(caller, &home.join(".ssh"))
}

/// The public keys in `dir/*.pub`, read with `caller`'s rights.
pub fn public_keys_in(caller: &Caller, dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "pub"))
        .collect();
    names.sort();
    let mut keys = Vec::new();
    for p in names {
        let Ok(f) = caller.open(&p, Access::Read) else {
            continue;
        };
        let mut s = String::new();
        if f.take(MAX_PUB).read_to_string(&mut s).is_err() {
            continue;
        }
        for l in s.lines().filter(|l| is_public_key(l)) {
            let l = l.trim().to_string();
            if !keys.contains(&l) {
                keys.push(l);
            }
        }
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_pair_is_created_once_private_and_reused() {
        let root = tempfile::tempdir().unwrap();
        let a = ensure(root.path()).unwrap();
        assert!(is_public_key(&a.public), "{}", a.public);
        let dir_mode = fs::metadata(root.path().join(KEY_DIR)).unwrap().mode() & 0o777;
        assert_eq!(dir_mode, 0o700);
        let key_mode = fs::metadata(&a.private).unwrap().mode() & 0o777;
        assert_eq!(key_mode, 0o600);
        let b = ensure(root.path()).unwrap();
        assert_eq!(a.public, b.public);
        // No temporary file is left.
        let left: Vec<_> = fs::read_dir(root.path().join(KEY_DIR))
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".new-"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn a_planted_symlink_or_readable_key_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), root.path().join(KEY_DIR)).unwrap();
        assert!(matches!(
            ensure(root.path()),
            Err(KeyError::UnsafeDir { .. })
        ));
        assert_eq!(fs::read_dir(elsewhere.path()).unwrap().count(), 0);

        let root = tempfile::tempdir().unwrap();
        let pair = ensure(root.path()).unwrap();
        fs::set_permissions(&pair.private, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            ensure(root.path()),
            Err(KeyError::UnsafeKey { .. })
        ));
        fs::remove_file(&pair.private).unwrap();
        let target = root.path().join("secret");
        fs::write(&target, "x").unwrap();
        std::os::unix::fs::symlink(&target, &pair.private).unwrap();
        assert!(matches!(
            ensure(root.path()),
            Err(KeyError::UnsafeKey { .. })
        ));
    }

    #[test]
    fn only_key_lines_of_pub_files_the_caller_may_read_are_taken() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::write(d.join("a.pub"), "ssh-ed25519 AAAAC3NzaC1lZDI1 me@x\n").unwrap();
        fs::write(
            d.join("b.pub"),
            "not a key\necdsa-sha2-nistp256 AAAAE2Vj y\n",
        )
        .unwrap();
        fs::write(d.join("c"), "ssh-rsa AAAAB3 not-pub-file\n").unwrap();
        let secret = d.join("secret.pub");
        fs::write(&secret, "ssh-ed25519 AAAAsecret root@x\n").unwrap();
        fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
        for f in ["a.pub", "b.pub"] {
            fs::set_permissions(d.join(f), fs::Permissions::from_mode(0o644)).unwrap();
        }
        // Root may read everything; an unprivileged caller not secret.pub.
        let nobody = Caller::from_uid(65534);
        let keys = public_keys_in(&nobody, d);
        assert_eq!(
            keys,
            vec![
                "ssh-ed25519 AAAAC3NzaC1lZDI1 me@x".to_string(),
                "ecdsa-sha2-nistp256 AAAAE2Vj y".to_string()
            ]
        );
        if nix::unistd::geteuid().is_root() {
            assert_eq!(public_keys_in(&Caller::from_uid(0), d).len(), 3);
        }
    }
}
