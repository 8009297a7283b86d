//! The cloud-init NoCloud seed lume gives a Linux VM booted from a disk: a
//! small vfat image labelled `CIDATA` (built here with the `fatfs` crate, no
//! external tool) holding `meta-data`, `user-data` and `network-config`.
//!
//! - `meta-data`: `instance-id` from the VM's id in config.json (stable for
//!   the VM, new for a clone, so a clone runs cloud-init's first-boot steps
//!   again: hostname, SSH host keys), `local-hostname` from the VM's name.
//! - `user-data`: lume's `#cloud-config` (user `lume`, passwordless sudo, the
//!   password `lume` unless turned off, the SSH keys), and, when the VM was
//!   created with `--cloud-init FILE`, the user's file as a second part of a
//!   MIME multipart message. The user's part carries the merge rule
//!   [`USER_PART_MERGE`]: its lists are appended to lume's (users, runcmd,
//!   packages, ssh_authorized_keys…), its other keys replace lume's; a
//!   `merge_how` inside the file overrides that rule.
//! - `network-config` (version 2): DHCP on the NIC with the VM's MAC address.
//!
//! The image is a pure function of its inputs (fixed volume id, no
//! timestamps), so it is rewritten only when an input changed, atomically.

use std::io::{Cursor, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::vm::config::MacAddress;

/// The seed's file name in the VM directory.
pub const SEED_FILE: &str = "cidata.img";
/// The user's own user-data (`--cloud-init FILE`), copied into the VM directory.
pub const USER_DATA_FILE: &str = "user-data";
/// The largest user-data file lume accepts.
pub const MAX_USER_DATA: u64 = 4 << 20;
/// How the user's cloud-config part merges into lume's (cloud-init's syntax).
pub const USER_PART_MERGE: &str = "list(append)+dict(recurse_array)+str()";
/// The user lume creates in the guest.
pub const GUEST_USER: &str = "lume";
/// lume's default password for that user (as lume documents it).
pub const DEFAULT_PASSWORD: &str = "lume";

/// Why a seed could not be built or written.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error(
        "The cloud-init file {path} is not user-data cloud-init can take as one part: start it with #cloud-config, #!, #include, #cloud-boothook or #cloud-config-archive"
    )]
    UnknownUserData { path: PathBuf },
    #[error(
        "The cloud-init file {path} is larger than {MAX_USER_DATA} bytes: keep user-data small (fetch large payloads from the guest)"
    )]
    UserDataTooLarge { path: PathBuf },
    #[error("Cannot build the cloud-init seed image")]
    Fat(#[source] std::io::Error),
    #[error("Cannot write the cloud-init seed {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Everything the seed is made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedInputs {
    pub vm_name: String,
    pub instance_id: String,
    pub mac: Option<MacAddress>,
    /// Whether user `lume` gets the password `lume` (and SSH password logins).
    pub password: bool,
    /// OpenSSH public keys (one line each) for user `lume`.
    pub authorized_keys: Vec<String>,
    /// The user's own user-data, if any.
    pub user_data: Option<Vec<u8>>,
}

/// A hostname from a VM name: cloud-init and systemd take letters, digits,
/// '-' and '.', so '_' becomes '-'.
pub fn hostname(vm_name: &str) -> String {
    vm_name.replace('_', "-")
}

/// `meta-data`.
pub fn meta_data(i: &SeedInputs) -> String {
    yaml(&json!({
        "instance-id": i.instance_id,
        "local-hostname": hostname(&i.vm_name),
    }))
}

/// The guest side of shared directories, run by cloud-init's `bootcmd` at
/// every boot: reads lume's list (`tag ro|rw name` lines) from QEMU's fw_cfg
/// and mounts each virtio-fs tag at /mnt/shared/NAME. Lines that are not
/// lume's shape are skipped.
pub const MOUNT_SHARES: &str = r#"modprobe qemu_fw_cfg 2>/dev/null; f=/sys/firmware/qemu_fw_cfg/by_name/opt/lume/shares/raw; [ -r "$f" ] || exit 0; modprobe virtiofs 2>/dev/null; while read -r tag mode name; do case "$tag" in lume[0-9]|lume[0-9][0-9]) ;; *) continue ;; esac; case "$mode" in ro|rw) ;; *) continue ;; esac; case "$name" in ""|.|..|*[!A-Za-z0-9._-]*) continue ;; esac; mkdir -p "/mnt/shared/$name"; mountpoint -q "/mnt/shared/$name" || mount -t virtiofs -o "$mode" "$tag" "/mnt/shared/$name"; done < "$f"; exit 0"#;

/// lume's own `#cloud-config`.
pub fn lume_cloud_config(i: &SeedInputs) -> String {
    let mut user = json!({
        "name": GUEST_USER,
        "gecos": "lume",
        "shell": "/bin/bash",
        "sudo": "ALL=(ALL) NOPASSWD:ALL",
        "lock_passwd": !i.password,
        "ssh_authorized_keys": i.authorized_keys,
    });
    if i.password {
        user["plain_text_passwd"] = json!(DEFAULT_PASSWORD);
    }
    let cfg = json!({
        // Every boot: mount the shares lume lists in fw_cfg (see
        // hypervisor/virtiofs.rs), so shares added at a later run appear too.
        "bootcmd": [["sh", "-c", MOUNT_SHARES]],
        "users": [user],
        "ssh_pwauth": i.password,
        // The VM's name resolves in the guest (sudo complains otherwise).
        "manage_etc_hosts": true,
    });
    format!("#cloud-config\n{}", yaml(&cfg))
}

fn yaml(v: &serde_json::Value) -> String {
    serde_yaml_ng::to_string(v).expect("JSON values serialise as YAML")
}

/// The MIME type cloud-init gives a part by its first line.
fn part_type(data: &[u8]) -> Option<&'static str> {
    let first = data.split(|b| *b == b'\n').next().unwrap_or_default();
    let first = String::from_utf8_lossy(first);
    let first = first.trim_end();
    Some(match first {
        _ if first.starts_with("#cloud-config-archive") => "text/cloud-config-archive",
        _ if first.starts_with("#cloud-config") => "text/cloud-config",
        _ if first.starts_with("#cloud-boothook") => "text/cloud-boothook",
        _ if first.starts_with("#include") => "text/x-include-url",
        _ if first.starts_with("#!") => "text/x-shellscript",
        _ => return None,
    })
}

/// Checks a user's file before it is stored with the VM.
pub fn check_user_data(path: &Path, data: &[u8]) -> Result<(), SeedError> {
    if data.len() as u64 > MAX_USER_DATA {
        return Err(SeedError::UserDataTooLarge {
            path: path.to_path_buf(),
        });
    }
    if part_type(data).is_none() {
        return Err(SeedError::UnknownUserData {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

/// `user-data`: lume's cloud-config alone, or a MIME multipart message with
/// lume's part first and the user's second.
pub fn user_data(i: &SeedInputs) -> Vec<u8> {
    let lume = lume_cloud_config(i);
    let Some(theirs) = &i.user_data else {
        return lume.into_bytes();
    };
    // Checked when the file was stored; a file changed since is passed on
    // as a shell script would be, which cloud-init refuses with a warning.
    let kind = part_type(theirs).unwrap_or("text/plain");
    let mut n = 0u32;
    let boundary = loop {
        let b = format!("==lume-boundary-{n}==");
        let bytes = b.as_bytes();
        if !theirs.windows(bytes.len()).any(|w| w == bytes) && !lume.contains(&b) {
            break b;
        }
        n += 1;
    };
    let mut out = Vec::with_capacity(lume.len() + theirs.len() + 512);
    let _ = write!(
        out,
        "Content-Type: multipart/mixed; boundary=\"{boundary}\"\nMIME-Version: 1.0\n\n\
         --{boundary}\nContent-Type: text/cloud-config; charset=\"utf-8\"\n\
         Content-Disposition: attachment; filename=\"lume.cfg\"\n\n{lume}\n\
         --{boundary}\nContent-Type: {kind}\nMerge-Type: {USER_PART_MERGE}\n\
         Content-Disposition: attachment; filename=\"user-data\"\n\n"
    );
    out.extend_from_slice(theirs);
    if !theirs.ends_with(b"\n") {
        out.push(b'\n');
    }
    let _ = writeln!(out, "--{boundary}--");
    out
}

/// `network-config` (version 2): DHCP on the first NIC, matched by MAC.
pub fn network_config(i: &SeedInputs) -> String {
    let matcher = match i.mac {
        Some(mac) => json!({ "macaddress": mac.to_string() }),
        None => json!({ "name": "e*" }),
    };
    yaml(&json!({
        "version": 2,
        "ethernets": {
            "nic0": { "match": matcher, "dhcp4": true },
        },
    }))
}

/// The seed image's bytes.
pub fn build_image(i: &SeedInputs) -> Result<Vec<u8>, SeedError> {
    let files: [(&str, Vec<u8>); 3] = [
        ("meta-data", meta_data(i).into_bytes()),
        ("user-data", user_data(i)),
        ("network-config", network_config(i).into_bytes()),
    ];
    let content: usize = files.iter().map(|(_, d)| d.len()).sum();
    // Room for the FAT structures; whole MiB, at least 2.
    let size = (content + content / 4 + (1 << 20)).div_ceil(1 << 20).max(2) << 20;
    let mut disk = Cursor::new(vec![0u8; size]);
    let fat = |e: std::io::Error| SeedError::Fat(e);
    fatfs::format_volume(
        &mut disk,
        fatfs::FormatVolumeOptions::new()
            .volume_label(*b"CIDATA     ")
            .volume_id(0x4c55_4d45),
    )
    .map_err(fat)?;
    disk.seek(SeekFrom::Start(0)).map_err(fat)?;
    {
        let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new()).map_err(fat)?;
        for (name, data) in &files {
            let mut f = fs.root_dir().create_file(name).map_err(fat)?;
            f.truncate().map_err(fat)?;
            f.write_all(data).map_err(fat)?;
            f.flush().map_err(fat)?;
        }
        fs.unmount().map_err(fat)?;
    }
    Ok(disk.into_inner())
}

/// Writes the seed into `dir` unless it already holds these exact bytes.
/// Returns whether it was (re)written.
pub fn write_seed(dir: &Path, i: &SeedInputs) -> Result<bool, SeedError> {
    let path = dir.join(SEED_FILE);
    let image = build_image(i)?;
    if let Ok(meta) = std::fs::symlink_metadata(&path)
        && meta.file_type().is_file()
        && meta.len() == image.len() as u64
    {
        let mut old = Vec::with_capacity(image.len());
        if std::fs::File::open(&path)
            .and_then(|mut f| f.read_to_end(&mut old))
            .is_ok()
            && old == image
        {
            return Ok(false);
        }
    }
    crate::util::atomic::write_private(&path, &image)
        .map_err(|source| SeedError::Write { path, source })?;
    Ok(true)
}

/// A new VM id (128 random bits, hex).
pub fn new_vm_id() -> String {
    let mut b = [0u8; 16];
    crate::util::random::fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The instance id cloud-init sees for a VM id.
pub fn instance_id(vm_id: &str) -> String {
    format!("lume-{vm_id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> SeedInputs {
        SeedInputs {
            vm_name: "web_1".into(),
            instance_id: instance_id("00112233"),
            mac: Some("52:54:00:12:34:56".parse().unwrap()),
            password: true,
            authorized_keys: vec!["ssh-ed25519 AAAAC3Nza lume@host".into()],
            user_data: None,
        }
    }

    fn read_file(image: &[u8], name: &str) -> String {
        let mut disk = Cursor::new(image.to_vec());
        let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.volume_label(), "CIDATA");
        let mut s = String::new();
        fs.root_dir()
            .open_file(name)
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        s
    }

    #[test]
    fn seed_is_a_cidata_vfat_with_the_three_files_and_is_reproducible() {
        let i = inputs();
        let img = build_image(&i).unwrap();
        assert_eq!(img, build_image(&i).unwrap(), "same inputs, same bytes");
        let meta: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(&read_file(&img, "meta-data")).unwrap();
        assert_eq!(meta["instance-id"], "lume-00112233");
        assert_eq!(meta["local-hostname"], "web-1");
        let ud = read_file(&img, "user-data");
        assert!(ud.starts_with("#cloud-config\n"), "{ud}");
        let cfg: serde_yaml_ng::Value = serde_yaml_ng::from_str(&ud).unwrap();
        let user = &cfg["users"][0];
        assert_eq!(user["name"], "lume");
        assert_eq!(user["sudo"], "ALL=(ALL) NOPASSWD:ALL");
        assert_eq!(user["plain_text_passwd"], "lume");
        assert_eq!(user["lock_passwd"], false);
        assert_eq!(
            user["ssh_authorized_keys"][0],
            "ssh-ed25519 AAAAC3Nza lume@host"
        );
        let net: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(&read_file(&img, "network-config")).unwrap();
        assert_eq!(net["version"], 2);
        assert_eq!(
            net["ethernets"]["nic0"]["match"]["macaddress"],
            "52:54:00:12:34:56"
        );
        assert_eq!(net["ethernets"]["nic0"]["dhcp4"], true);
    }

    #[test]
    fn no_password_locks_it_and_turns_off_password_logins() {
        let mut i = inputs();
        i.password = false;
        let cfg: serde_yaml_ng::Value = serde_yaml_ng::from_str(&lume_cloud_config(&i)).unwrap();
        assert!(cfg["users"][0].get("plain_text_passwd").is_none());
        assert_eq!(cfg["users"][0]["lock_passwd"], true);
        assert_eq!(cfg["ssh_pwauth"], false);
    }

    #[test]
    fn user_data_is_a_multipart_with_lumes_part_first_and_a_boundary_not_in_the_parts() {
        let mut i = inputs();
        let theirs = b"#cloud-config\nruncmd:\n  - echo ==lume-boundary-0==\n".to_vec();
        i.user_data = Some(theirs);
        let ud = String::from_utf8(user_data(&i)).unwrap();
        assert!(ud.starts_with("Content-Type: multipart/mixed; boundary=\"==lume-boundary-1==\""));
        let lume_at = ud.find("filename=\"lume.cfg\"").unwrap();
        let theirs_at = ud.find("filename=\"user-data\"").unwrap();
        assert!(lume_at < theirs_at);
        assert!(ud.contains(&format!("Merge-Type: {USER_PART_MERGE}")));
        assert!(ud.trim_end().ends_with("--==lume-boundary-1==--"));
    }

    #[test]
    fn user_data_must_be_a_kind_cloud_init_takes() {
        let p = Path::new("/x");
        assert!(check_user_data(p, b"#cloud-config\n{}").is_ok());
        assert!(check_user_data(p, b"#!/bin/sh\necho hi\n").is_ok());
        assert!(matches!(
            check_user_data(p, b"users: []\n"),
            Err(SeedError::UnknownUserData { .. })
        ));
        let big = vec![b'#'; MAX_USER_DATA as usize + 1];
        assert!(matches!(
            check_user_data(p, &big),
            Err(SeedError::UserDataTooLarge { .. })
        ));
    }

    #[test]
    fn write_seed_rewrites_only_on_change_and_never_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let mut i = inputs();
        assert!(write_seed(dir.path(), &i).unwrap());
        assert!(!write_seed(dir.path(), &i).unwrap());
        i.vm_name = "other".into();
        assert!(write_seed(dir.path(), &i).unwrap());
        // A symlink planted as the seed is replaced, its target untouched.
        let target = dir.path().join("target");
        std::fs::write(&target, b"keep").unwrap();
        std::fs::remove_file(dir.path().join(SEED_FILE)).unwrap();
        std::os::unix::fs::symlink(&target, dir.path().join(SEED_FILE)).unwrap();
        assert!(write_seed(dir.path(), &i).unwrap());
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        assert!(
            std::fs::symlink_metadata(dir.path().join(SEED_FILE))
                .unwrap()
                .file_type()
                .is_file()
        );
    }
}
