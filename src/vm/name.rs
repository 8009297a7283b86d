//! VM names: `[A-Za-z0-9][A-Za-z0-9._-]{0,62}`. A name is also a directory
//! name under the storage root, so this rule is what keeps `..` and `/` out.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

/// Why a name was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "Invalid VM name '{0}': use 1 to 63 letters, digits, '.', '_' or '-', starting with a letter or digit"
)]
pub struct InvalidName(pub String);

/// A validated VM name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct VmName(String);

impl VmName {
    /// Validates `s` as a VM name.
    pub fn parse(s: &str) -> Result<Self, InvalidName> {
        let mut chars = s.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
        let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if first_ok && rest_ok && s.len() <= 63 {
            Ok(Self(s.to_string()))
        } else {
            Err(InvalidName(s.to_string()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VmName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for VmName {
    type Err = InvalidName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl<'de> Deserialize<'de> for VmName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for n in ["a", "dev-1", "ci_runner.2", "A9", &"x".repeat(63)] {
            assert!(VmName::parse(n).is_ok(), "{n}");
        }
    }

    #[test]
    fn refuses_traversal_and_odd_names() {
        for n in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "/etc",
            ".hidden",
            "-x",
            "_x",
            "a b",
            "é",
            &"x".repeat(64),
            "a\0b",
            "a\nb",
        ] {
            assert!(VmName::parse(n).is_err(), "{n:?}");
        }
    }
}
