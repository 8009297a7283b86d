//! The image cache, in lume's layout: `cacheDirectory/ghcr/ORG/MANIFEST_ID/`
//! (`MANIFEST_ID` is `sha256_<hex of the manifest>`), holding
//!
//! - `sha256_<hex>.partial`: a blob being downloaded (resumed from its
//!   length; never used as a blob);
//! - `sha256_<hex>`: a blob whose bytes matched its digest, fsynced and
//!   renamed into place (so a file under that name is complete);
//! - `disk.img.reassembled`: the disk of a finished pull (with
//!   `cachingEnabled`), copied into the next VM pulled from it (reflink
//!   where the filesystem can, a sparse copy otherwise);
//! - `manifest.json` then `metadata.json` (`{image, manifestId, timestamp}`
//!   as lume writes it), written atomically last: an image counts as cached
//!   only once `metadata.json` exists.
//!
//! A pull holds `.lock` (an open-file-description lock) in its directory;
//! `prune` leaves directories whose lock is held.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{RegistryError, io_at};
use crate::settings::Settings;
use crate::vm::lock::VmLock;

pub const METADATA: &str = "metadata.json";
pub const MANIFEST: &str = "manifest.json";
pub const REASSEMBLED: &str = "disk.img.reassembled";
const LOCK: &str = ".lock";

/// Seconds between 1970 and 2001 (Swift's `Date` reference).
const SWIFT_EPOCH: u64 = 978_307_200;

/// lume's `metadata.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    pub image: String,
    pub manifest_id: String,
    /// Seconds since 2001-01-01 (Swift's `JSONEncoder` default for dates).
    #[serde(default)]
    pub timestamp: f64,
}

/// One cached image, as `lume images` lists it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CachedImage {
    /// `NAME:TAG`.
    pub repository: String,
    /// The first 12 characters of the manifest id (lume's `imageId`).
    pub image_id: String,
}

/// The cache of one settings file.
#[derive(Debug, Clone)]
pub struct Cache {
    /// `cacheDirectory/ghcr`.
    pub root: PathBuf,
    pub enabled: bool,
    /// config.yaml's registry (where the environment's token may go).
    pub token_registry: String,
}

impl Cache {
    pub fn new(settings: &Settings) -> Result<Self, crate::settings::SettingsError> {
        Ok(Self {
            root: settings.cache_directory()?.join("ghcr"),
            enabled: settings.caching_enabled()?,
            token_registry: settings.registry()?.registry,
        })
    }

    /// `sha256_<hex>` for a manifest's bytes.
    pub fn manifest_id(manifest: &[u8]) -> String {
        super::format::digest_of(manifest).replace(':', "_")
    }

    /// The directory name of an image: its manifest id (lume's layout) for
    /// config.yaml's registry; for any other registry the id followed by
    /// `_` and 16 hex digits of the registry's hash, so that a registry
    /// serving the same manifest bytes never reaches another registry's
    /// cached disk.
    pub fn dir_name(&self, manifest_id: &str, registry: &str) -> String {
        if registry.eq_ignore_ascii_case(&self.token_registry) {
            manifest_id.to_string()
        } else {
            let h = super::format::digest_of(registry.to_ascii_lowercase().as_bytes());
            let hex = h.trim_start_matches("sha256:");
            format!("{manifest_id}_{}", &hex[..16])
        }
    }

    /// The directory of one image, created private (0700) with its lock
    /// held by the returned guard.
    /// `waiting` is called when another pull holds it (then this one waits
    /// for it, up to an hour).
    pub fn open_image(
        &self,
        org: &str,
        manifest_id: &str,
        waiting: &mut dyn FnMut(),
    ) -> Result<ImageDir, RegistryError> {
        self.check_private()?;
        super::reference::check_organization(org)?;
        // Made level by level, never through a link (the levels above are
        // private, checked just now, so nobody else can swap one in).
        let mut dir = self.root.clone();
        make_private_dir(&dir, true)?;
        for part in org.split('/').chain(std::iter::once(manifest_id)) {
            dir.push(part);
            make_private_dir(&dir, false)?;
        }
        let lock = match VmLock::try_acquire(&dir.join(LOCK)).map_err(io_at(&dir))? {
            Some(l) => Some(l),
            None => {
                waiting();
                let l =
                    VmLock::acquire_within(&dir.join(LOCK), std::time::Duration::from_secs(3600))
                        .map_err(io_at(&dir))?;
                if l.is_none() {
                    return Err(RegistryError::Io {
                        path: dir,
                        source: std::io::Error::other(
                            "another pull has held this image's cache for an hour; try again later",
                        ),
                    });
                }
                l
            }
        };
        Ok(ImageDir { dir, _lock: lock })
    }

    /// Refuses a cache another user could change or swap: `cacheDirectory`
    /// and every directory above it (as written and resolved) must be
    /// changeable by root (and lume's user) only, and `ghcr` itself, when
    /// it exists, must be such a directory and not a link. Checked before
    /// anything is made or read in it.
    pub fn check_private(&self) -> Result<(), RegistryError> {
        let unsafe_cache = |dir: PathBuf, who: String| RegistryError::UnsafeCache { dir, who };
        crate::vm::store::check_ancestors_private(&self.root)
            .map_err(|e| unsafe_cache(e.dir, e.who))?;
        if let Ok(m) = fs::symlink_metadata(&self.root) {
            if !m.is_dir() {
                return Err(unsafe_cache(
                    self.root.clone(),
                    "whoever made it a link or a file".into(),
                ));
            }
            let euid = nix::unistd::geteuid().as_raw();
            if let Some(who) = crate::vm::store::writable_by_others(&m, euid, false) {
                return Err(unsafe_cache(self.root.clone(), who));
            }
        }
        Ok(())
    }

    /// `root/org` when every level of it is a real directory (no link).
    fn org_dir(&self, org: &str) -> Option<PathBuf> {
        let mut dir = self.root.clone();
        for part in org.split('/') {
            dir.push(part);
            if !fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
                return None;
            }
        }
        Some(dir)
    }

    /// The complete images of `org` (those with `metadata.json`), sorted.
    /// Links in the cache are never followed.
    pub fn list(&self, org: &str) -> Result<Vec<CachedImage>, RegistryError> {
        self.check_private()?;
        super::reference::check_organization(org)?;
        let Some(dir) = self.org_dir(org) else {
            return Ok(Vec::new());
        };
        let mut out: Vec<CachedImage> = fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| {
                let text = fs::read(e.path().join(METADATA)).ok()?;
                let m: Metadata = serde_json::from_slice(&text).ok()?;
                Some(CachedImage {
                    repository: m.image,
                    image_id: m.manifest_id.chars().take(12).collect(),
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.repository, &a.image_id).cmp(&(&b.repository, &b.image_id)));
        Ok(out)
    }

    /// Removes every cached image not being pulled right now. Links in
    /// the cache are left alone (never followed), with a note.
    pub fn prune(&self, note: &mut dyn FnMut(&str)) -> Result<usize, RegistryError> {
        self.check_private()?;
        let mut removed = 0;
        let Ok(orgs) = fs::read_dir(&self.root) else {
            return Ok(0);
        };
        for org in orgs.filter_map(Result::ok) {
            if !org.file_type().is_ok_and(|t| t.is_dir()) {
                note(&format!(
                    "Skipped {}: not a directory (links in the cache are never followed)",
                    org.path().display()
                ));
                continue;
            }
            for image in fs::read_dir(org.path())
                .into_iter()
                .flatten()
                .filter_map(Result::ok)
            {
                let path = image.path();
                if !image.file_type().is_ok_and(|t| t.is_dir()) {
                    note(&format!(
                        "Skipped {}: not a directory (links in the cache are never followed)",
                        path.display()
                    ));
                    continue;
                }
                // A pull in progress keeps its directory.
                let Some(_guard) = VmLock::try_acquire(&path.join(LOCK)).map_err(io_at(&path))?
                else {
                    continue;
                };
                fs::remove_dir_all(&path).map_err(io_at(&path))?;
                removed += 1;
            }
            let _ = fs::remove_dir(org.path());
        }
        Ok(removed)
    }
}

/// Makes `dir` (0700) unless it exists; either way it must be a real
/// directory, not a link. `parents` makes missing ancestors too (checked
/// private beforehand).
fn make_private_dir(dir: &Path, parents: bool) -> Result<(), RegistryError> {
    match fs::DirBuilder::new()
        .recursive(parents)
        .mode(0o700)
        .create(dir)
    {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_at(dir)(e)),
    }
    let meta = fs::symlink_metadata(dir).map_err(io_at(dir))?;
    if !meta.is_dir() {
        return Err(RegistryError::UnsafeCache {
            dir: dir.to_path_buf(),
            who: "whoever made it a link or a file".into(),
        });
    }
    Ok(())
}

/// A cached image's directory, locked while held.
pub struct ImageDir {
    pub dir: PathBuf,
    _lock: Option<VmLock>,
}

impl ImageDir {
    pub fn blob(&self, hex: &str) -> PathBuf {
        self.dir.join(format!("sha256_{hex}"))
    }

    pub fn partial(&self, hex: &str) -> PathBuf {
        self.dir.join(format!("sha256_{hex}.partial"))
    }

    /// The metadata, when the image is complete here.
    pub fn metadata(&self) -> Option<Metadata> {
        serde_json::from_slice(&fs::read(self.dir.join(METADATA)).ok()?).ok()
    }

    /// Marks the image complete: manifest, then metadata.
    pub fn record(
        &self,
        image: &str,
        manifest_id: &str,
        manifest: &[u8],
    ) -> Result<(), RegistryError> {
        let p = self.dir.join(MANIFEST);
        crate::util::atomic::write_private(&p, manifest).map_err(io_at(&p))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let meta = Metadata {
            image: image.to_string(),
            manifest_id: manifest_id.to_string(),
            timestamp: now - SWIFT_EPOCH as f64,
        };
        let p = self.dir.join(METADATA);
        let bytes = serde_json::to_vec(&meta).expect("metadata serializes");
        crate::util::atomic::write_private(&p, &bytes).map_err(io_at(&p))
    }

    /// Removes everything but the lock (used when caching is off, or
    /// with `--force`).
    pub fn clear(&self) -> Result<(), RegistryError> {
        for e in fs::read_dir(&self.dir).map_err(io_at(&self.dir))?.flatten() {
            if e.file_name() != LOCK {
                fs::remove_file(e.path()).map_err(io_at(&e.path()))?;
            }
        }
        Ok(())
    }

    /// Removes the directory (when caching is off and the pull is done).
    pub fn remove(self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Other complete images recorded for `image` in `org`: lume keeps one
/// version per image.
/// A new `cacheDirectory` (config.yaml's text) checked and made as a
/// storage location is ([`crate::vm::location::prepare_directory`]), an
/// unsafe one refused in the cache's words.
pub fn prepare_directory(text: &str) -> Result<(), CacheLocationError> {
    match crate::vm::location::prepare_directory(text) {
        Err(crate::vm::location::LocationError::Unsafe(u)) => {
            Err(CacheLocationError::Unsafe(RegistryError::UnsafeCache {
                dir: u.dir,
                who: u.who,
            }))
        }
        r => Ok(r.map(|_| ())?),
    }
}

/// Why a new `cacheDirectory` was refused.
#[derive(Debug, thiserror::Error)]
pub enum CacheLocationError {
    #[error(transparent)]
    Unsafe(RegistryError),
    #[error(transparent)]
    Location(#[from] crate::vm::location::LocationError),
}

pub fn superseded(cache: &Cache, org: &str, image: &str, keep: &Path) -> Vec<PathBuf> {
    cache
        .org_dir(org)
        .map(fs::read_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .filter(|p| p != keep)
        .filter(|p| {
            fs::read(p.join(METADATA))
                .ok()
                .and_then(|t| serde_json::from_slice::<Metadata>(&t).ok())
                .is_some_and(|m| m.image == image)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn cache_in(dir: &Path) -> Cache {
        Cache {
            root: dir.join("ghcr"),
            enabled: true,
            token_registry: "ghcr.io".into(),
        }
    }

    fn private_tempdir() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        fs::set_permissions(t.path(), fs::Permissions::from_mode(0o700)).unwrap();
        t
    }

    /// A cache directory under a folder another user can write is refused
    /// before anything is made in it (no `mkdir -p` through it).
    #[test]
    fn an_unsafe_cache_is_refused_before_anything_is_made() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let t = private_tempdir();
        let user_dir = t.path().join("user");
        fs::create_dir(&user_dir).unwrap();
        nix::unistd::chown(&user_dir, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
        let cache = Cache {
            root: user_dir.join("cache/ghcr"),
            enabled: true,
            token_registry: "ghcr.io".into(),
        };
        let e = cache
            .open_image("trycua", "sha256_00", &mut || {})
            .err()
            .expect("refused");
        assert!(matches!(e, RegistryError::UnsafeCache { .. }), "{e:?}");
        assert!(e.to_string().contains("cacheDirectory"), "{e}");
        assert!(!user_dir.join("cache").exists(), "made a directory first");
        assert!(matches!(
            cache.list("trycua"),
            Err(RegistryError::UnsafeCache { .. })
        ));
        assert!(matches!(
            cache.prune(&mut |_| {}),
            Err(RegistryError::UnsafeCache { .. })
        ));
    }

    /// `ghcr` as a link (to anywhere) is refused.
    #[test]
    fn a_linked_cache_root_is_refused() {
        let t = private_tempdir();
        let elsewhere = t.path().join("elsewhere");
        fs::create_dir(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, t.path().join("ghcr")).unwrap();
        let cache = cache_in(t.path());
        assert!(matches!(
            cache.open_image("trycua", "sha256_00", &mut || {}),
            Err(RegistryError::UnsafeCache { .. })
        ));
        assert!(fs::read_dir(&elsewhere).unwrap().next().is_none());
    }

    /// `images --organization /etc` and `../x` read nothing outside the
    /// cache; links at the organization or image level are neither listed
    /// nor followed by prune.
    #[test]
    fn organizations_and_links_stay_inside_the_cache() {
        let t = private_tempdir();
        let cache = cache_in(t.path());
        for org in ["/etc", "../x", "a/../../b"] {
            assert!(matches!(
                cache.list(org),
                Err(RegistryError::BadOrganization(_))
            ));
            assert!(cache.open_image(org, "sha256_00", &mut || {}).is_err());
        }
        // A victim directory with an image-looking entry, linked in.
        let victim = t.path().join("victim");
        fs::create_dir_all(victim.join("img")).unwrap();
        fs::write(
            victim.join("img").join(METADATA),
            r#"{"image":"secret:1","manifestId":"sha256_ab"}"#,
        )
        .unwrap();
        let d = cache.open_image("trycua", "sha256_00", &mut || {}).unwrap();
        drop(d);
        std::os::unix::fs::symlink(&victim, cache.root.join("linked")).unwrap();
        std::os::unix::fs::symlink(victim.join("img"), cache.root.join("trycua/img")).unwrap();
        assert!(cache.list("linked").unwrap().is_empty());
        assert!(cache.list("trycua").unwrap().is_empty());
        let mut notes = Vec::new();
        let removed = cache.prune(&mut |n| notes.push(n.to_string())).unwrap();
        assert_eq!(removed, 1);
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(victim.join("img").join(METADATA).exists());
    }

    /// Another registry serving the same manifest bytes gets its own
    /// directory; config.yaml's registry keeps lume's layout.
    #[test]
    fn the_cache_key_includes_the_registry() {
        let t = private_tempdir();
        let cache = cache_in(t.path());
        assert_eq!(cache.dir_name("sha256_ab", "ghcr.io"), "sha256_ab");
        let other = cache.dir_name("sha256_ab", "evil.example");
        assert_ne!(other, "sha256_ab");
        assert_ne!(other, cache.dir_name("sha256_ab", "other.example"));
    }
}
