//! `IMAGE:TAG` plus `--registry` and `--organization`, as lume names images.

use super::RegistryError;

/// An image in a registry: `REGISTRY/ORGANIZATION/NAME:TAG`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    pub registry: String,
    pub organization: String,
    pub name: String,
    pub tag: String,
}

impl ImageRef {
    /// [`Self::parse`] with the registry and organization given, else
    /// config.yaml's defaults `d` (lume's `--registry`/`--organization`).
    pub fn with_defaults(
        image: &str,
        registry: Option<&str>,
        organization: Option<&str>,
        d: &crate::settings::RegistryDefaults,
    ) -> Result<Self, RegistryError> {
        Self::parse(
            image,
            registry.unwrap_or(&d.registry),
            organization.unwrap_or(&d.organization),
        )
    }

    /// [`Self::with_defaults`] for a push, whose image must name its tag
    /// (lume's push has no default tag).
    pub fn to_push(
        image: &str,
        registry: Option<&str>,
        organization: Option<&str>,
        d: &crate::settings::RegistryDefaults,
    ) -> Result<Self, RegistryError> {
        if !image.contains(':') {
            return Err(RegistryError::NoTag(image.to_string()));
        }
        Self::with_defaults(image, registry, organization, d)
    }

    /// Parses `NAME[:TAG]` (tag `latest` when omitted) for `registry` and
    /// `organization`.
    pub fn parse(image: &str, registry: &str, organization: &str) -> Result<Self, RegistryError> {
        let bad = || RegistryError::BadReference(image.to_string());
        let (name, tag) = match image.rsplit_once(':') {
            Some((n, t)) => (n, t),
            None => (image, "latest"),
        };
        if let Some((_, first)) = name.rsplit_once(':')
            && valid_tag(first)
            && valid_tag(tag)
        {
            return Err(RegistryError::TwoTags(image.to_string()));
        }
        if !valid_repository(name) || !valid_tag(tag) {
            return Err(bad());
        }
        check_organization(organization)?;
        if !valid_registry(registry) {
            return Err(RegistryError::BadRegistry(registry.to_string()));
        }
        Ok(Self {
            registry: registry.to_ascii_lowercase(),
            organization: organization.to_string(),
            name: name.to_string(),
            tag: tag.to_string(),
        })
    }

    /// `ORGANIZATION/NAME`.
    pub fn repository(&self) -> String {
        format!("{}/{}", self.organization, self.name)
    }

    /// `NAME:TAG`, as lume records a cached image.
    pub fn short(&self) -> String {
        format!("{}:{}", self.name, self.tag)
    }

    /// The same image under another tag.
    pub fn with_tag(&self, tag: &str) -> Result<Self, RegistryError> {
        if !valid_tag(tag) {
            return Err(RegistryError::BadTag(tag.to_string()));
        }
        Ok(Self {
            tag: tag.to_string(),
            ..self.clone()
        })
    }

    /// As `oci-client`'s reference (repository, the registry's name for
    /// requests: Docker Hub's `docker.io` is `index.docker.io`).
    pub fn oci(&self) -> oci_client::Reference {
        oci_client::Reference::with_tag(self.registry.clone(), self.repository(), self.tag.clone())
    }

    /// The registry's host without its port.
    pub fn host(&self) -> &str {
        host_of(&self.registry)
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}:{}", self.registry, self.repository(), self.tag)
    }
}

/// Refuses an organization that is not an OCI repository path (so it can
/// never name a path outside the cache: no `/` at the start, no `..`).
pub fn check_organization(organization: &str) -> Result<(), RegistryError> {
    if valid_repository(organization) {
        Ok(())
    } else {
        Err(RegistryError::BadOrganization(organization.to_string()))
    }
}

/// `HOST` of `HOST:PORT` or `[V6]:PORT`.
pub fn host_of(registry: &str) -> &str {
    if let Some(rest) = registry.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    registry.split(':').next().unwrap_or(registry)
}

/// OCI repository path components: lowercase alphanumerics separated by
/// `.`, `_`, `__`, `-` or `/`; no empty component, no `..`.
fn valid_repository(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.split('/').all(|c| {
            !c.is_empty()
                && c.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
                })
                && c.as_bytes()[0].is_ascii_alphanumeric()
                && c.as_bytes()[c.len() - 1].is_ascii_alphanumeric()
        })
}

fn valid_tag(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && (s.as_bytes()[0].is_ascii_alphanumeric() || s.as_bytes()[0] == b'_')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn valid_registry(s: &str) -> bool {
    if s.is_empty() || s.len() > 255 || s.contains('/') || s.contains('@') {
        return false;
    }
    if let Some(rest) = s.strip_prefix('[') {
        let Some((v6, port)) = rest.split_once(']') else {
            return false;
        };
        return v6.parse::<std::net::Ipv6Addr>().is_ok()
            && (port.is_empty() || port.strip_prefix(':').is_some_and(valid_port));
    }
    let (host, port) = match s.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (s, None),
    };
    !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-'))
        && port.is_none_or(valid_port)
}

fn valid_port(p: &str) -> bool {
    p.parse::<u16>().is_ok_and(|n| n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lume_references() {
        let r = ImageRef::parse("ubuntu-noble-vanilla:latest", "ghcr.io", "trycua").unwrap();
        assert_eq!(r.repository(), "trycua/ubuntu-noble-vanilla");
        assert_eq!(r.to_string(), "ghcr.io/trycua/ubuntu-noble-vanilla:latest");
        let r = ImageRef::parse("debian", "127.0.0.1:5000", "team/vms").unwrap();
        assert_eq!((r.tag.as_str(), r.host()), ("latest", "127.0.0.1"));
        assert_eq!(host_of("[::1]:5000"), "::1");
    }

    #[test]
    fn refuses_bad_references() {
        for image in [
            "", ":x", "Upper:1", "a/../b:1", "a//b:1", "a:-x", "a:b/c", "-a:1",
        ] {
            assert!(
                ImageRef::parse(image, "ghcr.io", "trycua").is_err(),
                "{image}"
            );
        }
        for reg in ["", "a/b", "user@host", "h:0", "h:99999", "[zz]:1"] {
            assert!(ImageRef::parse("a:1", reg, "trycua").is_err(), "{reg}");
        }
        // A bad organization is named as such, whichever command gave it.
        for org in ["../x", "/etc", "Team", "team/", ""] {
            assert!(
                matches!(
                    ImageRef::parse("golden:v1", "ghcr.io", org),
                    Err(RegistryError::BadOrganization(o)) if o == org
                ),
                "{org}"
            );
        }
        // Two tags (an API push's imageName with a tag of its own).
        assert!(matches!(
            ImageRef::parse("apipush:v3:v2", "ghcr.io", "trycua"),
            Err(RegistryError::TwoTags(_))
        ));
        let r = ImageRef::parse("multi:v1", "ghcr.io", "trycua").unwrap();
        assert!(matches!(r.with_tag("Bad Tag"), Err(RegistryError::BadTag(t)) if t == "Bad Tag"));
        for org in ["/etc", "../x", "a/../../b", "a//b", "", ".", "A"] {
            assert!(check_organization(org).is_err(), "{org}");
        }
        assert!(check_organization("team/vms").is_ok());
    }
}
