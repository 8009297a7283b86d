//! Global settings: `$XDG_CONFIG_HOME/lume/config.yaml` (else
//! `~/.config/lume/config.yaml`). Unknown keys are kept as they are when
//! lume rewrites the file.

use std::path::{Path, PathBuf};

use serde_yaml_ng::{Mapping, Value};

use crate::hypervisor::accel::{AccelChoice, AccelError};
use crate::util::atomic::write_atomic;

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
    "firewallAccommodation",
    "sshPassword",
    crate::vm::actions::PRIVATE_URLS_KEY,
    crate::api::auth::API_GROUP_KEY,
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
        Ok(Self {
            path: path.to_path_buf(),
            map,
        })
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
            "homeDirectory" if !(value.starts_with('/') || value.starts_with("~/")) => {
                return Err(SettingsError::NotAbsolute(value.into()));
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

    fn write(&self) -> Result<(), SettingsError> {
        let text = serde_yaml_ng::to_string(&self.map).expect("mapping serialises");
        let write = |source| SettingsError::Write {
            path: self.path.clone(),
            source,
        };
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(write)?;
        }
        write_atomic(&self.path, text.as_bytes()).map_err(write)
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

    /// The `homeDirectory` setting (lume's name for the VM location), if any.
    pub fn home_directory() -> Option<PathBuf> {
        let s = Self::load().ok()?.get_str("homeDirectory").ok()??;
        Some(expand_home(&s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(closest_known_key("cachingEnabled"), None);
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

    #[test]
    fn corrupt_yaml_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.yaml");
        std::fs::write(&p, "a: [unclosed\n").unwrap();
        let e = Settings::load_from(&p).unwrap_err();
        assert!(e.to_string().contains("config.yaml"));
    }
}
