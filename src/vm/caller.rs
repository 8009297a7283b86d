//! Who asked for an action. The CLI acts for the user who runs it; the API
//! acts for the uid on the other end of the connection. Host paths named in a
//! request (kernels, images, ISOs, disks, storage) are used with the caller's
//! rights, never with lume's own.

use nix::unistd::{Gid, Group, Uid, User};

/// A uid with its primary and supplementary groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    /// The primary group; `None` for a uid without a passwd entry.
    pub gid: Option<u32>,
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
            gid: Some(nix::unistd::getgid().as_raw()),
            groups,
        }
    }

    /// A uid looked up in the user database: its primary group and every
    /// group that lists it. A uid without an entry has no group at all, so it
    /// is never a member of any group (its number says nothing about a gid).
    pub fn from_uid(uid: u32) -> Self {
        let Some(user) = User::from_uid(Uid::from_raw(uid)).ok().flatten() else {
            return Self {
                uid,
                gid: None,
                groups: Vec::new(),
            };
        };
        let gid = user.gid.as_raw();
        let groups = std::ffi::CString::new(user.name.as_str())
            .ok()
            .and_then(|name| nix::unistd::getgrouplist(&name, user.gid).ok())
            .map(|g| g.into_iter().map(Gid::as_raw).collect())
            .unwrap_or_else(|| vec![gid]);
        Self {
            uid,
            gid: Some(gid),
            groups,
        }
    }

    pub fn is_root(&self) -> bool {
        self.uid == 0
    }

    /// Whether the caller is in group `name` (primary or supplementary).
    pub fn in_group(&self, name: &str) -> bool {
        match Group::from_name(name) {
            Ok(Some(g)) => {
                self.gid == Some(g.gid.as_raw()) || self.groups.contains(&g.gid.as_raw())
            }
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

    /// A uid without a passwd entry is in no group, not even the one whose
    /// gid is its own number.
    #[test]
    fn a_uid_without_an_entry_is_in_no_group() {
        let groups = std::fs::read_to_string("/etc/group").unwrap();
        let (name, gid) = groups
            .lines()
            .filter_map(|l| {
                let mut f = l.split(':');
                let name = f.next()?;
                let gid = f.nth(1)?.parse::<u32>().ok()?;
                Some((name.to_string(), gid))
            })
            .find(|(_, gid)| User::from_uid(Uid::from_raw(*gid)).ok().flatten().is_none())
            .expect("a group whose gid is no user's uid");
        let ghost = Caller::from_uid(gid);
        assert_eq!(ghost.gid, None);
        assert!(ghost.groups.is_empty());
        assert!(!ghost.in_group(&name), "uid {gid} is not in group {name}");
    }
}
