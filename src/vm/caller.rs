//! Who asked for an action. The CLI acts for the user who runs it; the API
//! acts for the uid on the other end of the connection. Host paths named in a
//! request (kernels, images, ISOs, disks, storage) are used with the caller's
//! rights, never with lume's own.

use nix::unistd::{Gid, Group, Uid, User};

/// A uid with its primary and supplementary groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (the primary group may appear here too).
    pub groups: Vec<u32>,
}

impl Caller {
    /// The user running this process (its real uid and gid, and its groups).
    pub fn current() -> Self {
        let groups = nix::unistd::getgroups()
            .map(|g| g.into_iter().map(Gid::as_raw).collect())
            .unwrap_or_default();
        Self {
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
            groups,
        }
    }

    /// A uid looked up in the user database: its primary group and every
    /// group that lists it. A uid without an entry gets no groups and its
    /// own number as gid (as `nobody`-style accounts behave).
    pub fn from_uid(uid: u32) -> Self {
        let user = User::from_uid(Uid::from_raw(uid)).ok().flatten();
        let gid = user.as_ref().map_or(uid, |u| u.gid.as_raw());
        let groups = user
            .as_ref()
            .and_then(|u| {
                let name = std::ffi::CString::new(u.name.as_str()).ok()?;
                nix::unistd::getgrouplist(&name, u.gid).ok()
            })
            .map(|g| g.into_iter().map(Gid::as_raw).collect())
            .unwrap_or_else(|| vec![gid]);
        Self { uid, gid, groups }
    }

    pub fn is_root(&self) -> bool {
        self.uid == 0
    }

    /// Whether the caller is in group `name` (primary or supplementary).
    pub fn in_group(&self, name: &str) -> bool {
        match Group::from_name(name) {
            Ok(Some(g)) => self.gid == g.gid.as_raw() || self.groups.contains(&g.gid.as_raw()),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_root_and_nobody_is_not() {
        assert!(Caller::from_uid(0).is_root());
        let nobody = Caller::from_uid(65534);
        assert!(!nobody.is_root());
        assert!(!nobody.in_group("root"));
        assert!(Caller::from_uid(0).in_group("root"));
    }
}
