//! Global settings: `$XDG_CONFIG_HOME/lume/config.yaml` (else
//! `~/.config/lume/config.yaml`). Unknown keys are kept as they are when
//! lume rewrites the file.

use std::path::{Path, PathBuf};

use serde_yaml_ng::{Mapping, Value};

use crate::hypervisor::accel::{AccelChoice, AccelError};
use crate::util::atomic::write_private;

/// Why the settings file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("Cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Corrupt settings file {path}: fix the YAML or move the file away")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_yaml_ng::Error,
    },
    #[error(
        "Settings file {path} is not used: {dir} can be changed by {who}, and lume running as root reads no config.yaml another user can change. Run lume with root's own HOME (sudo -H lume …), or make it root's alone (chown root:root {dir}; chmod go-w {dir})"
    )]
    NotRootsOwn {
        path: PathBuf,
        dir: PathBuf,
        who: String,
    },
    #[error("Cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Setting '{key}' in {path} must be {expected}")]
    Type {
        key: String,
        path: PathBuf,
        expected: &'static str,
    },
    #[error("Invalid accelerator setting")]
    Accel(#[from] AccelError),
    #[error("An empty value for '{0}' is refused: to remove the key, run `lume config unset {0}`")]
    EmptyValue(String),
    #[error(
        "Group '{0}' does not exist, so apiGroup cannot name it: create it first (groupadd {0}) and run this again"
    )]
    NoSuchGroup(String),
    #[error("The setting '{0}' is true or false: lume config set {0} false")]
    NotBool(String),
    #[error("The setting '{key}' must be an IPv4 subnet")]
    BadSubnet {
        key: String,
        #[source]
        source: crate::network::subnet::BadSubnet,
    },
    #[error(
        "{other} is {prefix} already: give {key} another /64 (the NAT and host-only networks need distinct prefixes)"
    )]
    SamePrefix6 {
        key: String,
        other: &'static str,
        prefix: String,
    },
    #[error("The setting '{key}' must be an IPv6 /64 or none")]
    BadPrefix6 {
        key: String,
        #[source]
        source: crate::network::prefix6::BadPrefix6,
    },
    #[error("The setting 'userSubnet' must be an IPv4 subnet")]
    BadUserSubnet(#[source] crate::network::user::BadSubnet),
    #[error(
        "The interface name '{value}' for {key} is invalid: use 1 to 15 characters without '/', ':' or spaces, such as lume0"
    )]
    BadInterfaceName { key: String, value: String },
    #[error(
        "The setting homeDirectory must be an absolute path (or start with ~/), not '{0}': lume config set homeDirectory /srv/lume"
    )]
    NotAbsolute(String),
    #[error("'{key}' is not set in {path}: `lume config set {key} VALUE` sets it")]
    NotSet { key: String, path: PathBuf },
    #[error(
        "Invalid location name: {0}. Names should be alphanumeric with underscores or dashes (such as fast-disk)"
    )]
    BadLocationName(String),
    #[error(
        "VM location with name '{0}' already exists: choose another name, or remove it first with `lume config storage remove {0}`"
    )]
    DuplicateLocation(String),
    #[error(
        "VM location not found: {name}. Configured locations: {known}; `lume config storage list` shows them"
    )]
    LocationNotFound { name: String, known: String },
    #[error(
        "Cannot remove the default location '{0}'. Set a new default location first (lume config storage default NAME)"
    )]
    RemoveDefault(String),
    #[error(
        "The default location '{name}' named by defaultLocationName in {path} is not in vmLocations: run `lume config storage default NAME` with one of: {known}"
    )]
    DefaultMissing {
        name: String,
        path: PathBuf,
        known: String,
    },
    #[error(
        "A VM location path must be absolute (or start with ~/), not '{0}': give the full path, such as /srv/lume"
    )]
    RelativeLocation(String),
    #[error("{0} is being changed by another lume command: try again in a moment")]
    Busy(PathBuf),
    #[error(
        "'{0}' is a structured setting: change it with `lume config storage …` (vmLocations) or `lume config registry …` (registry)"
    )]
    Structured(String),
    #[error(
        "Registry type '{0}' is refused: lume for Linux pulls and pushes OCI images only (type ghcr, any OCI registry); lume's gcs type uses a signed-URL service of its own that is not implemented here; use type ghcr (`lume config registry ghcr --registry HOST --organization NAME`)"
    )]
    RegistryType(String),
}

/// The keys lume reads from config.yaml.
pub const KNOWN_KEYS: &[&str] = &[
    "accelerator",
    "homeDirectory",
    "userSubnet",
    "natBridge",
    "natSubnet",
    "hostBridge",
    "hostSubnet",
    "natSubnet6",
    "hostSubnet6",
    "firewallAccommodation",
    "sshPassword",
    "defaultLocationName",
    "vmLocations",
    "cacheDirectory",
    "cachingEnabled",
    "registry",
    "telemetryEnabled",
    crate::vm::actions::PRIVATE_URLS_KEY,
    crate::api::auth::API_GROUP_KEY,
    crate::network::driver::MEMBER_BRIDGES_KEY,
];

/// The default of a known key that has one, as `lume config get KEY` prints it.
pub fn default_value(key: &str) -> Option<&'static str> {
    Some(match key {
        "userSubnet" => "10.0.2.0/24",
        "natBridge" => "lume0",
        "natSubnet" => "192.168.64.0/24",
        "hostBridge" => "lume-host0",
        "hostSubnet" => "192.168.65.0/24",
        "firewallAccommodation" => "true",
        "sshPassword" => "true",
        crate::vm::actions::PRIVATE_URLS_KEY => "false",
        _ => return None,
    })
}

/// The known key closest to an unknown one (same letters in another case,
/// or at most a third of the letters different), to suggest it.
pub fn closest_known_key(key: &str) -> Option<&'static str> {
    let lower = key.to_lowercase();
    KNOWN_KEYS
        .iter()
        .map(|k| (distance(&lower, &k.to_lowercase()), *k))
        .min()
        .filter(|(d, k)| *d <= (k.len() / 3).max(1))
        .map(|(_, k)| k)
}

/// Levenshtein distance, by characters.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// lume's default cache folder.
pub const DEFAULT_CACHE_DIRECTORY: &str = "~/.lume/cache";

/// The name of lume's default VM location.
pub const DEFAULT_LOCATION_NAME: &str = "home";

/// The path of lume's default VM location.
pub const DEFAULT_LOCATION_PATH: &str = "~/.lume";

/// lume's own keys, read and written with lume's meaning (Settings.swift).
pub const LUME_KEYS: &[&str] = &[
    "defaultLocationName",
    "vmLocations",
    "cacheDirectory",
    "cachingEnabled",
    "registry",
    "telemetryEnabled",
];

/// One named VM location (`vmLocations` in config.yaml): `path` as written
/// (`~/` allowed), [`Location::root`] expanded.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Location {
    pub name: String,
    pub path: String,
}

impl Location {
    /// The directory, `~/` expanded.
    pub fn root(&self) -> PathBuf {
        expand_home(&self.path)
    }
}

/// Whether config.yaml may hold this directory: absolute, `~` or `~/…`
/// (never relative: config.yaml is read from any working directory).
pub fn is_location_text(path: &str) -> bool {
    path.starts_with('/') || path.starts_with("~/") || path == "~"
}

/// lume's location names: letters, digits, `_` and `-`.
pub fn valid_location_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Where images are pulled from and pushed to by default (lume's
/// `registry.ghcr` settings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryDefaults {
    pub registry: String,
    pub organization: String,
}

impl Default for RegistryDefaults {
    fn default() -> Self {
        Self {
            registry: "ghcr.io".into(),
            organization: "trycua".into(),
        }
    }
}

/// A path from config.yaml: `~/` is the user's home.
pub fn expand_home(s: &str) -> PathBuf {
    match s.strip_prefix("~/") {
        Some(rest) => crate::vm::store::home().join(rest),
        None if s == "~" => crate::vm::store::home(),
        None => PathBuf::from(s),
    }
}

/// As root, refuses (as ssh's StrictModes does) a config.yaml that another
/// user could have written or could swap: the file, or any directory above
/// it up to `/` (as written and as resolved), owned by another user or
/// writable by group or others (a sticky root-owned directory such as /tmp
/// is fine). A user's config.yaml reached through `sudo -E` or a kept
/// `HOME` would otherwise choose root's VM locations, API group and
/// registry, and root would write into the user's folder.
fn check_owner(path: &Path) -> Result<(), SettingsError> {
    let euid = nix::unistd::geteuid().as_raw();
    if euid != 0 {
        return Ok(());
    }
    let refuse = |dir: &Path, who: String| SettingsError::NotRootsOwn {
        path: path.to_path_buf(),
        dir: dir.to_path_buf(),
        who,
    };
    crate::vm::store::check_ancestors_private(path).map_err(|u| refuse(&u.dir, u.who))?;
    if let Ok(m) = std::fs::metadata(path)
        && let Some(who) = crate::vm::store::writable_by_others(&m, euid, false)
    {
        return Err(refuse(path, who));
    }
    Ok(())
}

/// The parsed settings file (empty when it does not exist).
#[derive(Debug, Clone, Default)]
pub struct Settings {
    path: PathBuf,
    map: Mapping,
}

impl Settings {
    /// Where the file lives.
    pub fn path() -> PathBuf {
        let base = std::env::var_os("XDG_CONFIG_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| crate::vm::store::home().join(".config"));
        base.join("lume").join("config.yaml")
    }

    pub fn load() -> Result<Self, SettingsError> {
        Self::load_from(&Self::path())
    }

    pub fn load_from(path: &Path) -> Result<Self, SettingsError> {
        check_owner(path)?;
        let map = match std::fs::read_to_string(path) {
            Ok(text) if text.trim().is_empty() => Mapping::new(),
            Ok(text) => serde_yaml_ng::from_str(&text).map_err(|source| SettingsError::Parse {
                path: path.to_path_buf(),
                source,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Mapping::new(),
            Err(source) => {
                return Err(SettingsError::Read {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        let mut settings = Self {
            path: path.to_path_buf(),
            map,
        };
        settings.migrate();
        Ok(settings)
    }

    /// Upgrades a config.yaml of an earlier lume for Linux, which named its
    /// one VM location `homeDirectory: PATH`: that path becomes lume's
    /// location `home` (`vmLocations`, `defaultLocationName: home`), written
    /// back atomically, so VMs stay where they are. A file that cannot be
    /// written keeps working: the upgrade is then made again on each load.
    fn migrate(&mut self) {
        if self.map.contains_key("vmLocations") {
            return;
        }
        let Some(Value::String(home)) = self.map.get("homeDirectory").cloned() else {
            return;
        };
        let mut loc = Mapping::new();
        loc.insert("name".into(), DEFAULT_LOCATION_NAME.into());
        loc.insert("path".into(), Value::String(home));
        self.map.remove("homeDirectory");
        self.map.insert(
            "vmLocations".into(),
            Value::Sequence(vec![Value::Mapping(loc)]),
        );
        if !self.map.contains_key("defaultLocationName") {
            self.map
                .insert("defaultLocationName".into(), DEFAULT_LOCATION_NAME.into());
        }
        // Written under the update lock only: while a change holds it (this
        // load may be that change's own), the change writes the upgraded
        // file itself.
        if let Ok(Some(_lock)) = crate::vm::lock::VmLock::try_acquire(&lock_path(&self.path)) {
            let _ = self.write();
        }
    }

    /// Read, change and write config.yaml under a short lock
    /// (`.config.yaml.lock` beside it), so that concurrent changes (two API
    /// requests, a command next to the server) never lose one another.
    pub fn update<T, E: From<SettingsError>>(
        f: impl FnOnce(&mut Settings) -> Result<T, E>,
    ) -> Result<T, E> {
        Self::update_at(&Self::path(), f)
    }

    /// [`Settings::update`] of the file at `path`.
    pub fn update_at<T, E: From<SettingsError>>(
        path: &Path,
        f: impl FnOnce(&mut Settings) -> Result<T, E>,
    ) -> Result<T, E> {
        use std::os::unix::fs::DirBuilderExt;
        let write = |source| SettingsError::Write {
            path: path.to_path_buf(),
            source,
        };
        check_owner(path)?;
        if let Some(dir) = path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(write)?;
        }
        let _lock = crate::vm::lock::VmLock::acquire_within(
            &lock_path(path),
            std::time::Duration::from_secs(10),
        )
        .map_err(write)?
        .ok_or_else(|| SettingsError::Busy(path.to_path_buf()))?;
        let mut settings = Self::load_from(path)?;
        f(&mut settings)
    }

    pub fn file(&self) -> &Path {
        &self.path
    }

    pub fn as_mapping(&self) -> &Mapping {
        &self.map
    }

    /// A string setting.
    pub fn get_str(&self, key: &str) -> Result<Option<String>, SettingsError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(SettingsError::Type {
                key: key.into(),
                path: self.path.clone(),
                expected: "a string",
            }),
        }
    }

    /// A list of names: a YAML sequence of strings, or one string of names
    /// separated by spaces or commas (as `lume config set` writes it).
    pub fn get_list(&self, key: &str) -> Result<Option<Vec<String>>, SettingsError> {
        let bad = || SettingsError::Type {
            key: key.into(),
            path: self.path.clone(),
            expected: "a list of names",
        };
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(
                s.split([',', ' '])
                    .filter(|n| !n.is_empty())
                    .map(str::to_string)
                    .collect(),
            )),
            Some(Value::Sequence(items)) => items
                .iter()
                .map(|v| v.as_str().map(str::to_string).ok_or_else(bad))
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(_) => Err(bad()),
        }
    }

    /// A yes/no setting: a YAML boolean, or the string `true`/`false` (as
    /// `lume config set` writes it).
    pub fn get_bool(&self, key: &str) -> Result<Option<bool>, SettingsError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(Value::String(s)) if s == "true" => Ok(Some(true)),
            Some(Value::String(s)) if s == "false" => Ok(Some(false)),
            Some(_) => Err(SettingsError::Type {
                key: key.into(),
                path: self.path.clone(),
                expected: "true or false",
            }),
        }
    }

    /// Sets a key (keeping every other key) and writes the file atomically.
    pub fn set(&mut self, key: &str, value: Value) -> Result<(), SettingsError> {
        self.map.insert(Value::String(key.into()), value);
        self.write()
    }

    /// Removes a key (keeping every other key); whether it was there. The
    /// file is rewritten only when it changes.
    pub fn unset(&mut self, key: &str) -> Result<bool, SettingsError> {
        if key == "homeDirectory" {
            // Back to lume's default path for the location `home`.
            let changed = self
                .locations()?
                .iter()
                .any(|l| l.name == DEFAULT_LOCATION_NAME && l.path != DEFAULT_LOCATION_PATH);
            if changed {
                self.set_home_directory(DEFAULT_LOCATION_PATH)?;
            }
            return Ok(changed);
        }
        if self.map.remove(key).is_none() {
            return Ok(false);
        }
        self.write()?;
        Ok(true)
    }

    /// What `lume config set KEY VALUE` stores: never an empty value (that
    /// is `unset`), an accelerator lume knows, an `apiGroup` that exists.
    pub fn set_from_command_line(&mut self, key: &str, value: &str) -> Result<(), SettingsError> {
        if value.trim().is_empty() {
            return Err(SettingsError::EmptyValue(key.into()));
        }
        if key == "accelerator" {
            value.parse::<AccelChoice>()?;
        }
        let bad_subnet = |source: crate::network::subnet::BadSubnet| SettingsError::BadSubnet {
            key: key.into(),
            source,
        };
        match key {
            "natSubnet" | "hostSubnet" => {
                value
                    .parse::<crate::network::subnet::Subnet>()
                    .map_err(bad_subnet)?;
            }
            "natSubnet6" | "hostSubnet6" if value.trim() != "none" => {
                let p = value
                    .parse::<crate::network::prefix6::Prefix6>()
                    .map_err(|source| SettingsError::BadPrefix6 {
                        key: key.into(),
                        source,
                    })?;
                let other = if key == "natSubnet6" {
                    "hostSubnet6"
                } else {
                    "natSubnet6"
                };
                if let Some(v) = self.get_str(other)?
                    && v.trim().parse::<crate::network::prefix6::Prefix6>() == Ok(p)
                {
                    return Err(SettingsError::SamePrefix6 {
                        key: key.into(),
                        other,
                        prefix: p.to_string(),
                    });
                }
            }
            "userSubnet" => {
                value
                    .parse::<crate::network::user::UserNet>()
                    .map_err(SettingsError::BadUserSubnet)?;
            }
            "natBridge" | "hostBridge" if !crate::network::mode::valid_ifname(value) => {
                return Err(SettingsError::BadInterfaceName {
                    key: key.into(),
                    value: value.into(),
                });
            }
            "homeDirectory" => return self.set_home_directory(value),
            "defaultLocationName" => return self.set_default_location(value),
            "vmLocations" | "registry" => {
                return Err(SettingsError::Structured(key.into()));
            }
            "cacheDirectory" if !(value.starts_with('/') || value.starts_with("~/")) => {
                return Err(SettingsError::RelativeLocation(value.into()));
            }
            _ => {}
        }
        if key == crate::api::auth::API_GROUP_KEY
            && !matches!(nix::unistd::Group::from_name(value), Ok(Some(_)))
        {
            return Err(SettingsError::NoSuchGroup(value.into()));
        }
        if key == "firewallAccommodation"
            || key == "sshPassword"
            || key == "cachingEnabled"
            || key == "telemetryEnabled"
            || key == crate::vm::actions::PRIVATE_URLS_KEY
        {
            let on = match value {
                "true" => true,
                "false" => false,
                _ => return Err(SettingsError::NotBool(key.into())),
            };
            return self.set(key, Value::Bool(on));
        }
        self.set(key, Value::String(value.into()))
    }

    /// Writes the file atomically (0600; its directory made 0700 when lume
    /// creates it). A symlink in place of config.yaml is replaced, never
    /// followed.
    fn write(&self) -> Result<(), SettingsError> {
        use std::os::unix::fs::DirBuilderExt;
        let text = render(&self.map);
        let write = |source| SettingsError::Write {
            path: self.path.clone(),
            source,
        };
        if let Some(dir) = self.path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(write)?;
        }
        write_private(&self.path, text.as_bytes()).map_err(write)
    }

    /// lume's `vmLocations`, in the file's order (the order in which a VM
    /// is looked for); `[home: ~/.lume]` when the key is absent or empty.
    pub fn locations(&self) -> Result<Vec<Location>, SettingsError> {
        let bad = || SettingsError::Type {
            key: "vmLocations".into(),
            path: self.path.clone(),
            expected: "a list like `vmLocations: [{name: home, path: ~/.lume}]`",
        };
        let mut out = Vec::new();
        match self.map.get("vmLocations") {
            None | Some(Value::Null) => {}
            Some(Value::Sequence(items)) => {
                for item in items {
                    let Value::Mapping(m) = item else {
                        return Err(bad());
                    };
                    match (m.get("name"), m.get("path")) {
                        (Some(Value::String(name)), Some(Value::String(path))) => {
                            out.push(Location {
                                name: name.clone(),
                                path: path.clone(),
                            })
                        }
                        _ => return Err(bad()),
                    }
                }
            }
            Some(_) => return Err(bad()),
        }
        if out.is_empty() {
            out.push(Location {
                name: DEFAULT_LOCATION_NAME.into(),
                path: DEFAULT_LOCATION_PATH.into(),
            });
        }
        Ok(out)
    }

    /// lume's `defaultLocationName` (default `home`).
    pub fn default_location_name(&self) -> Result<String, SettingsError> {
        Ok(self
            .get_str("defaultLocationName")?
            .unwrap_or_else(|| DEFAULT_LOCATION_NAME.into()))
    }

    /// The default VM location; an error when `defaultLocationName` names
    /// no location.
    pub fn default_location(&self) -> Result<Location, SettingsError> {
        let name = self.default_location_name()?;
        let all = self.locations()?;
        all.iter()
            .find(|l| l.name == name)
            .cloned()
            .ok_or_else(|| SettingsError::DefaultMissing {
                name,
                path: self.path.clone(),
                known: names(&all),
            })
    }

    /// The location called `name`.
    pub fn location(&self, name: &str) -> Result<Location, SettingsError> {
        let all = self.locations()?;
        all.iter().find(|l| l.name == name).cloned().ok_or_else(|| {
            SettingsError::LocationNotFound {
                name: name.into(),
                known: names(&all),
            }
        })
    }

    fn store_locations(&mut self, all: &[Location]) -> Result<(), SettingsError> {
        let seq = all
            .iter()
            .map(|l| {
                let mut m = Mapping::new();
                m.insert("name".into(), Value::String(l.name.clone()));
                m.insert("path".into(), Value::String(l.path.clone()));
                Value::Mapping(m)
            })
            .collect();
        self.map.insert("vmLocations".into(), Value::Sequence(seq));
        if !self.map.contains_key("defaultLocationName") {
            self.map
                .insert("defaultLocationName".into(), DEFAULT_LOCATION_NAME.into());
        }
        self.write()
    }

    /// A name a new location may take: lume's name rule, not taken yet.
    /// Checked before the location's directory is made.
    pub fn check_new_location_name(&self, name: &str) -> Result<(), SettingsError> {
        if !valid_location_name(name) {
            return Err(SettingsError::BadLocationName(name.into()));
        }
        if self.locations()?.iter().any(|l| l.name == name) {
            return Err(SettingsError::DuplicateLocation(name.into()));
        }
        Ok(())
    }

    /// lume's `config storage add`: a new name (lume's name rule, not taken)
    /// for an absolute path (or `~/…`). Whether the caller may use the
    /// directory is checked by the caller of this function
    /// (`vm::location::check_new_location`).
    pub fn add_location(&mut self, name: &str, path: &str) -> Result<(), SettingsError> {
        self.check_new_location_name(name)?;
        if !is_location_text(path) {
            return Err(SettingsError::RelativeLocation(path.into()));
        }
        let mut all = self.locations()?;
        all.push(Location {
            name: name.into(),
            path: path.into(),
        });
        self.store_locations(&all)
    }

    /// lume's `config storage remove`: never the default location. The VMs
    /// in it stay where they are.
    pub fn remove_location(&mut self, name: &str) -> Result<(), SettingsError> {
        let mut all = self.locations()?;
        if !all.iter().any(|l| l.name == name) {
            return Err(SettingsError::LocationNotFound {
                name: name.into(),
                known: names(&all),
            });
        }
        if name == self.default_location_name()? {
            return Err(SettingsError::RemoveDefault(name.into()));
        }
        all.retain(|l| l.name != name);
        self.store_locations(&all)
    }

    /// lume's `config storage default`.
    pub fn set_default_location(&mut self, name: &str) -> Result<(), SettingsError> {
        let all = self.locations()?;
        if !all.iter().any(|l| l.name == name) {
            return Err(SettingsError::LocationNotFound {
                name: name.into(),
                known: names(&all),
            });
        }
        self.map
            .insert("defaultLocationName".into(), Value::String(name.into()));
        self.store_locations(&all)
    }

    /// lume's `setHomeDirectory` (`homeDirectory` of `POST /lume/config`,
    /// and our `config set homeDirectory`): the location `home` gets this
    /// path (added, and made the default, when there is none).
    pub fn set_home_directory(&mut self, path: &str) -> Result<(), SettingsError> {
        if !is_location_text(path) {
            return Err(SettingsError::NotAbsolute(path.into()));
        }
        let mut all = self.locations()?;
        match all.iter_mut().find(|l| l.name == DEFAULT_LOCATION_NAME) {
            Some(l) => l.path = path.into(),
            None => {
                all.push(Location {
                    name: DEFAULT_LOCATION_NAME.into(),
                    path: path.into(),
                });
                self.map
                    .insert("defaultLocationName".into(), DEFAULT_LOCATION_NAME.into());
            }
        }
        self.store_locations(&all)
    }

    /// lume's `telemetryEnabled` (lume's default: true). Stored and shown
    /// only: lume for Linux sends no telemetry whatever it says.
    pub fn telemetry_enabled(&self) -> Result<bool, SettingsError> {
        Ok(self.get_bool("telemetryEnabled")?.unwrap_or(true))
    }

    /// lume's `registry.type` (default `ghcr`).
    pub fn registry_type(&self) -> Result<String, SettingsError> {
        match self.map.get("registry") {
            Some(Value::Mapping(m)) => match m.get("type") {
                None | Some(Value::Null) => Ok("ghcr".into()),
                Some(Value::String(t)) => Ok(t.clone()),
                Some(_) => Err(SettingsError::Type {
                    key: "registry.type".into(),
                    path: self.path.clone(),
                    expected: "ghcr",
                }),
            },
            _ => {
                self.registry()?;
                Ok("ghcr".into())
            }
        }
    }

    /// `lume config registry type|ghcr`: writes `registry` as lume does
    /// (`type`, `ghcr.registry`, `ghcr.organization`), keeping any other key
    /// under it. Only type `ghcr` is accepted.
    pub fn set_registry(
        &mut self,
        kind: Option<&str>,
        registry: Option<&str>,
        organization: Option<&str>,
    ) -> Result<(), SettingsError> {
        if let Some(k) = kind
            && k != "ghcr"
        {
            return Err(SettingsError::RegistryType(k.into()));
        }
        for (key, v) in [("registry", registry), ("organization", organization)] {
            if v.is_some_and(|v| v.trim().is_empty()) {
                return Err(SettingsError::EmptyValue(format!("registry.ghcr.{key}")));
            }
        }
        let current = self.registry()?;
        let mut reg = match self.map.get("registry") {
            Some(Value::Mapping(m)) => m.clone(),
            _ => Mapping::new(),
        };
        let mut ghcr = match reg.get("ghcr") {
            Some(Value::Mapping(m)) => m.clone(),
            _ => Mapping::new(),
        };
        reg.insert("type".into(), Value::String(kind.unwrap_or("ghcr").into()));
        ghcr.insert(
            "registry".into(),
            Value::String(registry.map(str::to_string).unwrap_or(current.registry)),
        );
        ghcr.insert(
            "organization".into(),
            Value::String(
                organization
                    .map(str::to_string)
                    .unwrap_or(current.organization),
            ),
        );
        reg.insert("ghcr".into(), Value::Mapping(ghcr));
        self.set("registry", Value::Mapping(reg))
    }

    /// `LUME_ACCEL`, else `accelerator` in the file, else auto.
    pub fn accelerator(&self) -> Result<AccelChoice, SettingsError> {
        if let Some(v) = std::env::var_os("LUME_ACCEL") {
            return Ok(v.to_string_lossy().parse()?);
        }
        Ok(match self.get_str("accelerator")? {
            Some(s) => s.parse()?,
            None => AccelChoice::Auto,
        })
    }

    /// lume's `cacheDirectory` (default `~/.lume/cache`), `~/` expanded.
    pub fn cache_directory(&self) -> Result<PathBuf, SettingsError> {
        let s = self
            .get_str("cacheDirectory")?
            .unwrap_or_else(|| DEFAULT_CACHE_DIRECTORY.to_string());
        Ok(expand_home(&s))
    }

    /// lume's `cachingEnabled` (lume 0.5.3's default: false).
    pub fn caching_enabled(&self) -> Result<bool, SettingsError> {
        Ok(self.get_bool("cachingEnabled")?.unwrap_or(false))
    }

    /// lume's `registry.ghcr.{registry, organization}` (defaults `ghcr.io`
    /// and `trycua`): where `pull` and `push` go when not told otherwise.
    pub fn registry(&self) -> Result<RegistryDefaults, SettingsError> {
        let mut out = RegistryDefaults::default();
        let Some(reg) = self.map.get("registry") else {
            return Ok(out);
        };
        let bad = || SettingsError::Type {
            key: "registry".into(),
            path: self.path.clone(),
            expected: "a mapping like `registry: {type: ghcr, ghcr: {registry: ghcr.io, organization: trycua}}`",
        };
        let ghcr = match reg {
            Value::Null => return Ok(out),
            Value::Mapping(m) => m.get("ghcr"),
            _ => return Err(bad()),
        };
        match ghcr {
            None | Some(Value::Null) => {}
            Some(Value::Mapping(g)) => {
                for (key, slot) in [
                    ("registry", &mut out.registry),
                    ("organization", &mut out.organization),
                ] {
                    match g.get(key) {
                        None | Some(Value::Null) => {}
                        Some(Value::String(v)) if !v.trim().is_empty() => *slot = v.clone(),
                        Some(_) => return Err(bad()),
                    }
                }
            }
            Some(_) => return Err(bad()),
        }
        Ok(out)
    }
}

/// The lock file of config.yaml's changes.
fn lock_path(config: &Path) -> PathBuf {
    config.with_file_name(".config.yaml.lock")
}

/// Location names, comma-separated, for messages.
pub fn names(all: &[Location]) -> String {
    all.iter()
        .map(|l| l.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// lume's scalar keys, in the order lume writes them.
const LUME_SCALARS: [&str; 4] = [
    "defaultLocationName",
    "cacheDirectory",
    "cachingEnabled",
    "telemetryEnabled",
];

/// A string as a YAML double-quoted scalar (JSON's escaping is YAML's), as
/// lume writes its strings: its line parser strips the double quotes.
fn quoted(s: &str) -> String {
    serde_json::to_string(s).expect("a string serialises")
}

/// `key: value` lines of `map` as serde writes them, indented by `indent`.
fn yaml_lines(map: serde_yaml_ng::Mapping, indent: &str) -> String {
    if map.is_empty() {
        return String::new();
    }
    serde_yaml_ng::to_string(&map)
        .expect("mapping serialises")
        .lines()
        .map(|l| format!("{indent}{l}\n"))
        .collect()
}

/// config.yaml's text, laid out so that lume 0.5.3's line parser
/// (Settings.swift `parseYamlSettings`) reads it as lume wrote it: lume's
/// scalar keys first, double-quoted; our own keys next (lume's parser reads
/// every line before `vmLocations:` as a top-level key and keeps only its
/// own four); then `vmLocations` (a section the parser leaves only at
/// `registry:`) as `- name: "…"` / `path: "…"` pairs; then `registry`,
/// `type` before `ghcr` (whose keys it reads at four spaces). Our loader
/// reads the same text as ordinary YAML.
fn render(map: &serde_yaml_ng::Mapping) -> String {
    use serde_yaml_ng::{Mapping, Value};
    let mut out = String::from("# Lume Configuration\n\n");
    for key in LUME_SCALARS {
        match map.get(key) {
            Some(Value::String(v)) => out.push_str(&format!("{key}: {}\n", quoted(v))),
            Some(v @ Value::Bool(_)) => out.push_str(&yaml_lines(
                Mapping::from_iter([(key.into(), v.clone())]),
                "",
            )),
            Some(v) => out.push_str(&yaml_lines(
                Mapping::from_iter([(key.into(), v.clone())]),
                "",
            )),
            None => {}
        }
    }
    let ours: Mapping = map
        .iter()
        .filter(|(k, _)| {
            k.as_str()
                .is_none_or(|k| !LUME_SCALARS.contains(&k) && k != "vmLocations" && k != "registry")
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if !ours.is_empty() {
        out.push_str("\n# lume for Linux\n");
        out.push_str(&yaml_lines(ours, ""));
    }
    if let Some(locations) = map.get("vmLocations") {
        out.push_str("\n# VM Locations\n");
        let pairs: Option<Vec<(&str, &str)>> = locations.as_sequence().and_then(|seq| {
            seq.iter()
                .map(|l| {
                    let m = l.as_mapping()?;
                    (m.len() == 2)
                        .then(|| Some((m.get("name")?.as_str()?, m.get("path")?.as_str()?)))
                        .flatten()
                })
                .collect()
        });
        match pairs {
            Some(pairs) if !pairs.is_empty() => {
                out.push_str("vmLocations:\n");
                for (name, path) in pairs {
                    out.push_str(&format!(
                        "  - name: {}\n    path: {}\n",
                        quoted(name),
                        quoted(path)
                    ));
                }
            }
            _ => out.push_str(&yaml_lines(
                Mapping::from_iter([("vmLocations".into(), locations.clone())]),
                "",
            )),
        }
    }
    if let Some(registry) = map.get("registry") {
        out.push_str("\n# Registry Configuration\n");
        match registry.as_mapping() {
            Some(r) => {
                out.push_str("registry:\n");
                if let Some(t) = r.get("type") {
                    match t.as_str() {
                        Some(t) => out.push_str(&format!("  type: {}\n", quoted(t))),
                        None => out.push_str(&yaml_lines(
                            Mapping::from_iter([("type".into(), t.clone())]),
                            "  ",
                        )),
                    }
                }
                if let Some(g) = r.get("ghcr") {
                    let strings: Option<Vec<(&str, &str)>> = g.as_mapping().and_then(|g| {
                        g.iter()
                            .map(|(k, v)| Some((k.as_str()?, v.as_str()?)))
                            .collect()
                    });
                    match strings {
                        Some(kv) => {
                            out.push_str("  ghcr:\n");
                            for (k, v) in kv {
                                out.push_str(&format!("    {k}: {}\n", quoted(v)));
                            }
                        }
                        None => out.push_str(&yaml_lines(
                            Mapping::from_iter([("ghcr".into(), g.clone())]),
                            "  ",
                        )),
                    }
                }
                let rest: Mapping = r
                    .iter()
                    .filter(|(k, _)| k.as_str().is_none_or(|k| k != "type" && k != "ghcr"))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                out.push_str(&yaml_lines(rest, "  "));
            }
            None => out.push_str(&yaml_lines(
                Mapping::from_iter([("registry".into(), registry.clone())]),
                "",
            )),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_are_a_yaml_sequence_or_names_in_a_string() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.yaml");
        std::fs::write(&p, "a: [br0, br1]\nb: 'br0, br1 br2'\nc: 3\n").unwrap();
        let s = Settings::load_from(&p).unwrap();
        assert_eq!(s.get_list("a").unwrap().unwrap(), ["br0", "br1"]);
        assert_eq!(s.get_list("b").unwrap().unwrap(), ["br0", "br1", "br2"]);
        assert!(s.get_list("c").is_err());
        assert_eq!(s.get_list("none").unwrap(), None);
    }

    #[test]
    fn keeps_unknown_keys_when_writing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.yaml");
        std::fs::write(&p, "cachingEnabled: true\nsomeFutureKey: [1, 2]\n").unwrap();
        let mut s = Settings::load_from(&p).unwrap();
        s.set("accelerator", Value::String("tcg".into())).unwrap();
        let again = Settings::load_from(&p).unwrap();
        assert_eq!(
            again.get_str("accelerator").unwrap().as_deref(),
            Some("tcg")
        );
        assert_eq!(
            again.as_mapping().get("cachingEnabled"),
            Some(&Value::Bool(true))
        );
        assert!(again.as_mapping().get("someFutureKey").is_some());
    }

    #[test]
    fn yes_no_settings_take_booleans_and_their_strings() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.yaml");
        std::fs::write(&p, "a: false\nb: \"true\"\nc: 3\n").unwrap();
        let s = Settings::load_from(&p).unwrap();
        assert_eq!(s.get_bool("a").unwrap(), Some(false));
        assert_eq!(s.get_bool("b").unwrap(), Some(true));
        assert_eq!(s.get_bool("missing").unwrap(), None);
        let e = s.get_bool("c").unwrap_err().to_string();
        assert!(
            e.starts_with("Setting 'c'") && e.contains("true or false"),
            "{e}"
        );
    }

    #[test]
    fn known_keys_are_validated_and_unknown_ones_get_a_suggestion() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Settings::load_from(&dir.path().join("config.yaml")).unwrap();
        for (key, value) in [
            ("natSubnet", "bogus"),
            ("hostSubnet", "10.0.0.0/33"),
            ("userSubnet", "nope"),
            ("natBridge", "a/b"),
            ("hostBridge", "much-too-long-name0"),
            ("homeDirectory", "relative/vms"),
            ("firewallAccommodation", "yes"),
            ("accelerator", "warp"),
        ] {
            let e = s.set_from_command_line(key, value).unwrap_err();
            let text = e.to_string();
            assert!(text.chars().next().unwrap().is_uppercase(), "{text}");
            assert!(
                text.contains(key) || crate::error_chain(&e).contains(value),
                "{key}: {text}"
            );
        }
        assert!(s.as_mapping().is_empty(), "nothing stored");
        s.set_from_command_line("natSubnet", "10.77.0.0/24")
            .unwrap();
        s.set_from_command_line("natBridge", "lumetest0").unwrap();
        s.set_from_command_line("homeDirectory", "~/vms").unwrap();
        assert_eq!(
            closest_known_key("firewallaccommodation"),
            Some("firewallAccommodation")
        );
        assert_eq!(closest_known_key("natSubent"), Some("natSubnet"));
        assert_eq!(closest_known_key("someFutureKey"), None);
        assert_eq!(closest_known_key("cachingenabled"), Some("cachingEnabled"));
    }

    #[test]
    fn lume_registry_and_cache_keys_load_with_lumes_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.yaml");
        let s = Settings::load_from(&p).unwrap();
        assert_eq!(s.registry().unwrap(), RegistryDefaults::default());
        assert!(!s.caching_enabled().unwrap());
        assert!(s.cache_directory().unwrap().ends_with(".lume/cache"));
        // As lume 0.5.3 on macOS writes it.
        std::fs::write(
            &p,
            "defaultLocationName: \"home\"\ncacheDirectory: \"/srv/cache\"\ncachingEnabled: true\nregistry:\n  type: ghcr\n  ghcr:\n    registry: \"registry.example\"\n    organization: \"team\"\n",
        )
        .unwrap();
        let s = Settings::load_from(&p).unwrap();
        assert_eq!(s.registry().unwrap().registry, "registry.example");
        assert_eq!(s.registry().unwrap().organization, "team");
        assert!(s.caching_enabled().unwrap());
        assert_eq!(s.cache_directory().unwrap(), PathBuf::from("/srv/cache"));
        std::fs::write(&p, "registry: ghcr.io\n").unwrap();
        let e = Settings::load_from(&p).unwrap().registry().unwrap_err();
        assert!(e.to_string().contains("registry"), "{e}");
    }

    /// Exactly what lume 0.5.3's `saveSettings` (Settings.swift) writes.
    pub const LUME_WRITTEN: &str = "# Lume Configuration\n\ndefaultLocationName: \"ssd\"\ncacheDirectory: \"~/.lume/cache\"\ncachingEnabled: false\ntelemetryEnabled: false\n\n# VM Locations\nvmLocations:\n  - name: \"home\"\n    path: \"~/.lume\"\n  - name: \"ssd\"\n    path: \"/Volumes/SSD/lume\"\n\n# Registry Configuration\nregistry:\n  type: \"ghcr\"\n  ghcr:\n    registry: \"ghcr.io\"\n    organization: \"trycua\"\n";

    /// What lume 0.5.3 reads from a config.yaml: a line-by-line port of
    /// Settings.swift `parseYamlSettings` (its sections, its indent rules,
    /// its `key.hasSuffix("name")` test, its stripping of double quotes only).
    #[derive(Debug, PartialEq)]
    struct LumeRead {
        default_location_name: String,
        cache_directory: String,
        caching_enabled: bool,
        telemetry_enabled: bool,
        vm_locations: Vec<(String, String)>,
        registry_type: String,
        ghcr_registry: String,
        ghcr_organization: String,
    }

    fn lume_parse(text: &str) -> LumeRead {
        #[derive(PartialEq, Clone, Copy)]
        enum Section {
            Top,
            VmLocations,
            Registry,
            Ghcr,
            Gcs,
        }
        fn value(raw: &str) -> String {
            if raw.len() >= 2 && raw.starts_with('"') && raw.ends_with('"') {
                raw[1..raw.len() - 1].to_string()
            } else {
                raw.to_string()
            }
        }
        let mut r = LumeRead {
            default_location_name: "home".into(),
            cache_directory: "~/.lume/cache".into(),
            caching_enabled: false,
            telemetry_enabled: true,
            vm_locations: Vec::new(),
            registry_type: "ghcr".into(),
            ghcr_registry: "ghcr.io".into(),
            ghcr_organization: "trycua".into(),
        };
        let mut section = Section::Top;
        let mut current: (Option<String>, Option<String>) = (None, None);
        let flush = |c: &mut (Option<String>, Option<String>), r: &mut LumeRead| {
            if let (Some(n), Some(p)) = (c.0.take(), c.1.take()) {
                r.vm_locations.push((n, p));
            }
            *c = (None, None);
        };
        for line in text.split('\n') {
            let t = line.trim_matches(' ');
            if t.starts_with('#') || t.is_empty() {
                continue;
            }
            if t == "vmLocations:" {
                flush(&mut current, &mut r);
                section = Section::VmLocations;
                continue;
            } else if t == "registry:" {
                flush(&mut current, &mut r);
                section = Section::Registry;
                continue;
            } else if t == "ghcr:" && section == Section::Registry {
                section = Section::Ghcr;
                continue;
            } else if t == "gcs:" && section == Section::Registry {
                section = Section::Gcs;
                continue;
            }
            let indent = line.len() - line.trim_start_matches(' ').len();
            let kv = t.find(':').map(|i| {
                (
                    t[..i].trim_matches(' '),
                    value(t[i + 1..].trim_matches(' ')),
                )
            });
            match section {
                Section::VmLocations => {
                    if t.starts_with('-') || t.contains("- name:") {
                        flush(&mut current, &mut r);
                    }
                    if let Some((k, v)) = kv {
                        if k.ends_with("name") {
                            current.0 = Some(v);
                        } else if k.ends_with("path") {
                            current.1 = Some(v);
                        }
                    }
                }
                Section::Registry => {
                    if let Some(("type", v)) = kv {
                        r.registry_type = v;
                    }
                }
                Section::Ghcr => {
                    if indent < 4 {
                        if t == "gcs:" {
                            section = Section::Gcs;
                            continue;
                        } else if !t.starts_with("registry") && !t.starts_with("organization") {
                            section = Section::Top;
                        }
                    }
                    match kv {
                        Some(("registry", v)) => r.ghcr_registry = v,
                        Some(("organization", v)) => r.ghcr_organization = v,
                        _ => {}
                    }
                }
                Section::Gcs => {
                    if indent < 4 && !t.starts_with("apiUrl") && !t.starts_with("apiKey") {
                        section = Section::Top;
                    }
                }
                Section::Top => match kv {
                    Some(("defaultLocationName", v)) => r.default_location_name = v,
                    Some(("cacheDirectory", v)) => r.cache_directory = v,
                    Some(("cachingEnabled", v)) => r.caching_enabled = v.to_lowercase() == "true",
                    Some(("telemetryEnabled", v)) => {
                        r.telemetry_enabled = v.to_lowercase() == "true"
                    }
                    _ => {}
                },
            }
        }
        flush(&mut current, &mut r);
        if r.vm_locations.is_empty() {
            r.vm_locations.push(("home".into(), "~/.lume".into()));
        }
        r
    }

    #[test]
    fn the_port_of_lumes_parser_reads_lumes_own_file() {
        let r = lume_parse(LUME_WRITTEN);
        assert_eq!(r.default_location_name, "ssd");
        assert_eq!(r.vm_locations.len(), 2);
        assert!(!r.telemetry_enabled);
    }

    #[test]
    fn lume_reads_the_config_we_write() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.yaml");
        let mut s = Settings::load_from(&p).unwrap();
        // Our keys first, so that a careless writer would put them in the way.
        s.set("natSubnet", Value::String("192.0.2.0/24".into()))
            .unwrap();
        s.set("natBridge", Value::String("lumebr".into())).unwrap();
        s.set("sshPassword", Value::String("a \"quoted\": pass".into()))
            .unwrap();
        s.add_location("fast", "/srv/fast vms").unwrap();
        s.set_default_location("fast").unwrap();
        s.set("cacheDirectory", Value::String("/srv/cache".into()))
            .unwrap();
        s.set("cachingEnabled", Value::Bool(true)).unwrap();
        s.set("telemetryEnabled", Value::Bool(false)).unwrap();
        s.set_registry(Some("ghcr"), Some("registry.example"), Some("team"))
            .unwrap();
        s.set("future", Value::String("kept".into())).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        let r = lume_parse(&text);
        assert_eq!(
            r,
            LumeRead {
                default_location_name: "fast".into(),
                cache_directory: "/srv/cache".into(),
                caching_enabled: true,
                telemetry_enabled: false,
                vm_locations: vec![
                    ("home".into(), "~/.lume".into()),
                    ("fast".into(), "/srv/fast vms".into())
                ],
                registry_type: "ghcr".into(),
                ghcr_registry: "registry.example".into(),
                ghcr_organization: "team".into(),
            },
            "{text}"
        );
        // lume's order: its scalars, ours, vmLocations, registry.
        let at = |k: &str| {
            text.find(&format!("\n{k}:"))
                .unwrap_or_else(|| panic!("{k}: {text}"))
        };
        assert!(at("defaultLocationName") < at("cacheDirectory"), "{text}");
        assert!(at("telemetryEnabled") < at("natSubnet"), "{text}");
        assert!(at("future") < at("vmLocations"), "{text}");
        assert!(at("vmLocations") < at("registry"), "{text}");
        // Our loader reads it back whole.
        let again = Settings::load_from(&p).unwrap();
        assert_eq!(again.as_mapping(), s.as_mapping());
        assert_eq!(
            again.get_str("sshPassword").unwrap().as_deref(),
            Some("a \"quoted\": pass")
        );
    }

    #[test]
    fn a_config_written_by_lume_on_macos_loads() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.yaml");
        std::fs::write(&p, LUME_WRITTEN).unwrap();
        let s = Settings::load_from(&p).unwrap();
        assert_eq!(s.default_location_name().unwrap(), "ssd");
        assert_eq!(
            s.locations().unwrap(),
            vec![
                Location {
                    name: "home".into(),
                    path: "~/.lume".into()
                },
                Location {
                    name: "ssd".into(),
                    path: "/Volumes/SSD/lume".into()
                }
            ]
        );
        assert_eq!(
            s.default_location().unwrap().root(),
            PathBuf::from("/Volumes/SSD/lume")
        );
        assert!(!s.telemetry_enabled().unwrap());
        assert!(!s.caching_enabled().unwrap());
        assert_eq!(s.registry_type().unwrap(), "ghcr");
        assert_eq!(s.registry().unwrap(), RegistryDefaults::default());
        // Not rewritten by loading.
        assert_eq!(std::fs::read_to_string(&p).unwrap(), LUME_WRITTEN);
    }

    #[test]
    fn an_earlier_releases_home_directory_becomes_location_home() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.yaml");
        std::fs::write(
            &p,
            "homeDirectory: /srv/vms\nnatSubnet: 10.9.0.0/24\nfuture: 1\n",
        )
        .unwrap();
        let s = Settings::load_from(&p).unwrap();
        assert_eq!(
            s.default_location().unwrap().root(),
            PathBuf::from("/srv/vms")
        );
        assert_eq!(s.default_location().unwrap().name, "home");
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(!text.contains("homeDirectory"), "{text}");
        let again = Settings::load_from(&p).unwrap();
        assert_eq!(
            again.get_str("natSubnet").unwrap().as_deref(),
            Some("10.9.0.0/24")
        );
        assert!(again.as_mapping().contains_key("future"));
        assert_eq!(again.locations().unwrap().len(), 1);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn locations_are_added_removed_and_made_default_by_lumes_rules() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.yaml");
        let mut s = Settings::load_from(&p).unwrap();
        assert!(matches!(
            s.add_location("bad name", "/srv/x"),
            Err(SettingsError::BadLocationName(_))
        ));
        assert!(matches!(
            s.add_location("home", "/srv/x"),
            Err(SettingsError::DuplicateLocation(_))
        ));
        assert!(matches!(
            s.add_location("rel", "srv/x"),
            Err(SettingsError::RelativeLocation(_))
        ));
        s.add_location("fast", "/srv/fast").unwrap();
        assert!(matches!(
            s.remove_location("home"),
            Err(SettingsError::RemoveDefault(_))
        ));
        assert!(matches!(
            s.set_default_location("nope"),
            Err(SettingsError::LocationNotFound { .. })
        ));
        s.set_default_location("fast").unwrap();
        s.remove_location("home").unwrap();
        let mut again = Settings::load_from(&p).unwrap();
        assert_eq!(again.default_location().unwrap().path, "/srv/fast");
        assert!(matches!(
            again.set_registry(Some("gcs"), None, None),
            Err(SettingsError::RegistryType(_))
        ));
    }

    /// Changes made at the same time by many threads are all kept.
    #[test]
    fn concurrent_changes_are_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.yaml");
        std::thread::scope(|scope| {
            for i in 0..8 {
                let p = &p;
                scope.spawn(move || {
                    Settings::update_at(p, |s| {
                        s.add_location(&format!("loc{i}"), &format!("/srv/loc{i}"))
                    })
                    .unwrap()
                });
            }
        });
        assert_eq!(
            Settings::load_from(&p).unwrap().locations().unwrap().len(),
            9
        );
    }

    #[test]
    fn corrupt_yaml_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.yaml");
        std::fs::write(&p, "a: [unclosed\n").unwrap();
        let e = Settings::load_from(&p).unwrap_err();
        assert!(e.to_string().contains("config.yaml"));
    }
}
