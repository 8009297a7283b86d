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
}

impl Cache {
    pub fn new(settings: &Settings) -> Result<Self, crate::settings::SettingsError> {
        Ok(Self {
            root: settings.cache_directory()?.join("ghcr"),
            enabled: settings.caching_enabled()?,
        })
    }

    /// `sha256_<hex>` for a manifest's bytes.
    pub fn manifest_id(manifest: &[u8]) -> String {
        super::format::digest_of(manifest).replace(':', "_")
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
        let dir = self.root.join(org).join(manifest_id);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_at(&dir))?;
        // Refuse a cache someone else could swap under root.
        let meta = fs::symlink_metadata(&dir).map_err(io_at(&dir))?;
        if !meta.is_dir() {
            return Err(RegistryError::Io {
                path: dir,
                source: std::io::Error::other("not a directory"),
            });
        }
        crate::vm::store::check_ancestors_private(&dir).map_err(|e| RegistryError::Io {
            path: e.dir.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
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

    /// The complete images of `org` (those with `metadata.json`), sorted.
    pub fn list(&self, org: &str) -> Vec<CachedImage> {
        let dir = self.root.join(org);
        let mut out: Vec<CachedImage> = fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
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
        out
    }

    /// Removes every cached image not being pulled right now.
    pub fn prune(&self) -> Result<usize, RegistryError> {
        let mut removed = 0;
        let Ok(orgs) = fs::read_dir(&self.root) else {
            return Ok(0);
        };
        for org in orgs.filter_map(Result::ok) {
            for image in fs::read_dir(org.path())
                .into_iter()
                .flatten()
                .filter_map(Result::ok)
            {
                let path = image.path();
                if !image.file_type().is_ok_and(|t| t.is_dir()) {
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
pub fn superseded(cache: &Cache, org: &str, image: &str, keep: &Path) -> Vec<PathBuf> {
    fs::read_dir(cache.root.join(org))
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
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
