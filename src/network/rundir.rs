//! lume's runtime directory `/run/lume`: every directory 0700 and every file
//! 0600, owned by root. dnsmasq is the one exception: it drops to the user
//! lume names in its configuration and then reads the reservation
//! directory, so that user alone gets
//! an ACL entry (`u:dnsmasq:--x` on the directories leading there, `r-x` on
//! the directory itself, `r--` on its files). `ls -l` then shows `drwx--x---+`.

use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Creates `dir` (and missing parents) and makes `dir` and each ancestor
/// up to and including `base` mode 0700. A directory whose group or others
/// can read or write is fixed; traverse-only bits are left alone, since they
/// are how dnsmasq's ACL entry (the mask) shows, and a chmod would clear it.
pub fn private_dir(base: &Path, dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    fs::create_dir_all(dir)?;
    for d in dir.ancestors() {
        if fs::metadata(d)?.mode() & 0o026 != 0 {
            fs::set_permissions(d, fs::Permissions::from_mode(0o700))?;
        }
        if d == base || !d.starts_with(base) {
            break;
        }
    }
    Ok(())
}

/// Makes `file` mode 0600.
pub fn private_file(file: &Path) -> io::Result<()> {
    fs::set_permissions(file, fs::Permissions::from_mode(0o600))
}

const ACL_USER_OBJ: u16 = 0x01;
const ACL_USER: u16 = 0x02;
const ACL_GROUP_OBJ: u16 = 0x04;
const ACL_MASK: u16 = 0x10;
const ACL_OTHER: u16 = 0x20;
const ACL_UNDEFINED_ID: u32 = u32::MAX;

/// The `system.posix_acl_access` value: owner `owner` bits, user `uid`
/// `perm` bits, nothing for group and others.
pub fn acl_xattr(owner: u16, uid: u32, perm: u16) -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec(); // POSIX_ACL_XATTR_VERSION
    for (tag, perm, id) in [
        (ACL_USER_OBJ, owner, ACL_UNDEFINED_ID),
        (ACL_USER, perm, uid),
        (ACL_GROUP_OBJ, 0, ACL_UNDEFINED_ID),
        (ACL_MASK, perm, ACL_UNDEFINED_ID),
        (ACL_OTHER, 0, ACL_UNDEFINED_ID),
    ] {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

/// Gives user `uid` `perm` (rwx bits, 4/2/1) on `path` through an ACL,
/// keeping the owner's `owner` bits and nothing for anyone else.
pub fn grant(path: &Path, owner: u16, uid: u32, perm: u16) -> io::Result<()> {
    let value = acl_xattr(owner, uid, perm);
    let mut cpath = path.as_os_str().as_bytes().to_vec();
    cpath.push(0);
    // SAFETY: `cpath` is NUL-terminated, the name is a NUL-terminated
    // literal and `value` is a live buffer of the length passed.
    let rc = unsafe {
        libc::setxattr(
            cpath.as_ptr().cast(),
            c"system.posix_acl_access".as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Lets user `uid` reach and read `dir` (its files get [`grant_file`]):
/// `--x` on each ancestor up to `base`, `r-x` on `dir`.
pub fn grant_reader(base: &Path, dir: &Path, uid: u32) -> io::Result<()> {
    grant(dir, 7, uid, 5)?;
    for d in dir.ancestors().skip(1) {
        if !d.starts_with(base) {
            break;
        }
        grant(d, 7, uid, 1)?;
        if d == base {
            break;
        }
    }
    Ok(())
}

/// Lets user `uid` read `file` (owner read-write, nobody else).
pub fn grant_file(file: &Path, uid: u32) -> io::Result<()> {
    grant(file, 6, uid, 4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn directories_and_files_become_private() {
        let t = tempfile::tempdir().unwrap();
        let base = t.path().join("lume");
        let dir = base.join("net-1/nat/members");
        private_dir(&base, &dir).unwrap();
        for d in [&base, &base.join("net-1"), &base.join("net-1/nat"), &dir] {
            assert_eq!(
                fs::metadata(d).unwrap().mode() & 0o7777,
                0o700,
                "{}",
                d.display()
            );
        }
        assert_ne!(
            fs::metadata(t.path()).unwrap().mode() & 0o7777,
            0o700,
            "above base untouched"
        );
        let f = dir.join("x.json");
        fs::write(&f, b"{}").unwrap();
        private_file(&f).unwrap();
        assert_eq!(fs::metadata(&f).unwrap().mode() & 0o7777, 0o600);
    }

    #[test]
    fn acl_layout_and_a_real_grant() {
        let v = acl_xattr(7, 999, 1);
        assert_eq!(v.len(), 4 + 5 * 8);
        assert_eq!(&v[..4], &[2, 0, 0, 0]);
        assert_eq!(&v[12..20], &[2, 0, 1, 0, 0xe7, 3, 0, 0], "user 999 --x");
        let t = tempfile::tempdir().unwrap();
        let base = t.path().join("lume");
        let hosts = base.join("net-1/nat/hosts");
        private_dir(&base, &hosts).unwrap();
        // tmpfs and ext4 support ACLs; a filesystem without them says so.
        match grant_reader(&base, &hosts, 999) {
            Ok(()) => {
                // The group bits show the mask.
                assert_eq!(fs::metadata(&hosts).unwrap().mode() & 0o7777, 0o750);
                assert_eq!(fs::metadata(&base).unwrap().mode() & 0o7777, 0o710);
                // Making the tree private again keeps the grant.
                private_dir(&base, &hosts).unwrap();
                assert_eq!(fs::metadata(&base).unwrap().mode() & 0o7777, 0o710);
            }
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EOPNOTSUPP), "{e}"),
        }
    }
}
