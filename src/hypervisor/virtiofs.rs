//! Shared directories (`run --shared-dir PATH[:ro|:rw]`): virtio-fs, served
//! by one virtiofsd per share that the supervisor starts before QEMU and
//! stops with it.
//!
//! - The directory is opened once with the caller's rights
//!   ([`crate::vm::caller::Caller::open_dir`]) and from then on named only by
//!   that descriptor: virtiofsd starts in a private mount namespace in which
//!   the descriptor's directory is bind-mounted (not recursively: mounts
//!   below it are not shared) on `shares/fsN` in the VM directory, remounted
//!   read-only for `:ro`. Read-only is the host kernel's, whatever the guest
//!   asks.
//! - The vhost-user socket `fsN.sock` is bound by the supervisor in the VM's
//!   0700 directory and handed to virtiofsd as descriptor 3 (`--fd=3`), so it
//!   listens before QEMU connects.
//! - virtiofsd dies with the supervisor (PR_SET_PDEATHSIG); one left by a
//!   killed supervisor is found by its command line (`shares/` of this VM's
//!   directory) and killed by the next start or stop ([`collect_stale`]).
//! - virtiofsd (Debian's C one) runs as root without uid mapping, so only
//!   root may share directories (checked in `vm::actions`); it runs without
//!   CAP_MKNOD (`-o modcaps=-mknod`), so guests cannot create device nodes.
//! - Tags are `lume0`, `lume1`, …; the list of `tag mode name` lines reaches
//!   the guest through QEMU's fw_cfg as `opt/lume/shares`, where lume's
//!   cloud-init `bootcmd` finds it at every boot.

use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Where virtiofsd is looked for, in this order: a `virtiofsd` in PATH or
/// the standalone (Rust) virtiofsd's place, then the one Debian's QEMU ships.
pub const VIRTIOFSD: &[&str] = &["/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd"];

/// The fw_cfg file listing the shares for the guest.
pub const FW_CFG_NAME: &str = "opt/lume/shares";

/// The most shared directories one VM may have.
pub const MAX_SHARES: usize = 8;

/// The directory of the VM directory holding the mount points.
pub const SHARES_DIR: &str = "shares";

const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const MOUNT_ATTR_RDONLY: u64 = 1;

/// The kernel's `struct mount_attr` (mount_setattr(2)).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// Why a directory cannot be shared.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error(
        "virtiofsd was not found (looked in PATH, /usr/libexec and /usr/lib/qemu): install it (apt-get install qemu-system-common, or the virtiofsd package) to use --shared-dir"
    )]
    Missing,
    #[error(
        "Invalid shared directory '{0}': give PATH, PATH:ro (read-only) or PATH:rw (read-write), as lume"
    )]
    BadSpec(String),
    #[error("{0} is not a directory: --shared-dir shares directories")]
    NotDirectory(PathBuf),
    #[error("Cannot prepare sharing {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot start virtiofsd for {path}")]
    Spawn {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// lume's `--shared-dir` syntax: `PATH`, `PATH:ro` or `PATH:rw` (split at
/// the first colon, as lume does).
pub fn parse_spec(s: &str) -> Result<(PathBuf, bool), ShareError> {
    let (path, read_only) = match s.split_once(':') {
        None => (s, false),
        Some((p, m)) => match m.to_ascii_lowercase().as_str() {
            "ro" => (p, true),
            "rw" => (p, false),
            _ => return Err(ShareError::BadSpec(s.to_string())),
        },
    };
    if path.is_empty() {
        return Err(ShareError::BadSpec(s.to_string()));
    }
    Ok((PathBuf::from(path), read_only))
}

/// One share of a run, as run.json records it and VMDetails shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShareState {
    pub host_path: String,
    pub tag: String,
    pub read_only: bool,
    /// The directory under /mnt/shared in guests lume provisions.
    pub name: String,
}

/// A directory opened with the caller's rights, to be shared.
#[derive(Debug, Clone)]
pub struct HostDir {
    /// The directory's path as the kernel names the open descriptor.
    pub path: PathBuf,
    pub dir: Arc<File>,
    pub read_only: bool,
}

impl HostDir {
    pub fn new(dir: File, read_only: bool) -> Self {
        let path = fs::read_link(format!("/proc/self/fd/{}", dir.as_raw_fd()))
            .unwrap_or_else(|_| PathBuf::from("?"));
        Self {
            path,
            dir: Arc::new(dir),
            read_only,
        }
    }

    /// `/proc/<this pid>/fd/N`, for a detached supervisor to open.
    pub fn proc_path(&self) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            self.dir.as_raw_fd()
        ))
    }
}

/// The guest-side names: the directory's own name, reduced to
/// `[A-Za-z0-9._-]`, made unique with `-2`, `-3`, ….
pub fn share_states(dirs: &[HostDir]) -> Vec<ShareState> {
    let mut out: Vec<ShareState> = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        let base: String = d
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "._-".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let base = match base.as_str() {
            "" | "." | ".." => "share".to_string(),
            _ => base,
        };
        let mut name = base.clone();
        let mut n = 2;
        while out.iter().any(|s| s.name == name) {
            name = format!("{base}-{n}");
            n += 1;
        }
        out.push(ShareState {
            host_path: d.path.display().to_string(),
            tag: format!("lume{i}"),
            read_only: d.read_only,
            name,
        });
    }
    out
}

/// The fw_cfg text: one `tag ro|rw name` line per share.
pub fn fw_cfg_text(shares: &[ShareState]) -> String {
    shares
        .iter()
        .map(|s| {
            format!(
                "{} {} {}\n",
                s.tag,
                if s.read_only { "ro" } else { "rw" },
                s.name
            )
        })
        .collect()
}

/// QEMU arguments: shareable guest memory, one vhost-user-fs device per
/// share, the list in fw_cfg. `memory_mib` must be QEMU's `-m`.
pub fn qemu_arguments(shares: &[ShareState], memory_mib: u64) -> Vec<String> {
    if shares.is_empty() {
        return Vec::new();
    }
    let mut a = vec![
        "-object".to_string(),
        format!("memory-backend-memfd,id=lumemem,size={memory_mib}M,share=on"),
        "-numa".into(),
        "node,memdev=lumemem".into(),
    ];
    for (i, s) in shares.iter().enumerate() {
        a.extend([
            "-chardev".into(),
            format!("socket,id=fs{i},path=fs{i}.sock"),
            "-device".into(),
            format!("vhost-user-fs-pci,chardev=fs{i},tag={}", s.tag),
        ]);
    }
    a.extend([
        "-fw_cfg".into(),
        format!(
            "name={FW_CFG_NAME},string={}",
            fw_cfg_text(shares).replace(',', ",,")
        ),
    ]);
    a
}

/// Finds virtiofsd.
pub fn find_virtiofsd() -> Result<PathBuf, ShareError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("virtiofsd"))
        .chain(VIRTIOFSD.iter().map(PathBuf::from))
        .find(|p| p.is_file())
        .ok_or(ShareError::Missing)
}

/// The running virtiofsd processes of one VM; killed when dropped.
pub struct Daemons {
    children: Vec<Child>,
    vm_dir: PathBuf,
}

impl Daemons {
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }
}

impl Drop for Daemons {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        collect_stale(&self.vm_dir);
        let _ = fs::remove_dir_all(self.vm_dir.join(SHARES_DIR));
    }
}

/// Kills every virtiofsd serving a share of the VM in `vm_dir` (found by
/// its command line, which names `<vm_dir>/shares/`), and removes the
/// sockets.
pub fn collect_stale(vm_dir: &Path) {
    // `shares/` is made before the first virtiofsd starts and removed only
    // after the last is gone: without it there is nothing to look for (the
    // scan reads every process's command line, milliseconds at each start).
    if matches!(fs::symlink_metadata(vm_dir.join(SHARES_DIR)), Err(e) if e.kind() == io::ErrorKind::NotFound)
    {
        return;
    }
    let needle = format!("source={}/{SHARES_DIR}/", vm_dir.display());
    if let Ok(entries) = fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let Ok(cmd) = fs::read(format!("/proc/{pid}/cmdline")) else {
                continue;
            };
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains("virtiofsd") && cmd.contains(&needle) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
    for i in 0..64 {
        let _ = fs::remove_file(vm_dir.join(format!("fs{i}.sock")));
    }
}

fn cstring(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Starts one virtiofsd per share, each listening on `fsN.sock` in the VM
/// directory. `log` is where their messages go (the supervisor's qemu.log
/// pipe).
pub fn start(
    vm_dir: &Path,
    dirs: &[HostDir],
    log: &dyn Fn() -> io::Result<Stdio>,
) -> Result<Daemons, ShareError> {
    let mut daemons = Daemons {
        children: Vec::new(),
        vm_dir: vm_dir.to_path_buf(),
    };
    if dirs.is_empty() {
        return Ok(daemons);
    }
    let exe = find_virtiofsd()?;
    let io_at = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ShareError::Io { path, source }
    };
    let shares_dir = vm_dir.join(SHARES_DIR);
    let _ = fs::remove_dir_all(&shares_dir);
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&shares_dir)
        .map_err(io_at(&shares_dir))?;
    // The VM directory by descriptor: socket paths stay short.
    let dir_fd = File::options()
        .read(true)
        .custom_flags_path()
        .open(vm_dir)
        .map_err(io_at(vm_dir))?;
    let supervisor_pid = nix::unistd::getpid();
    for (i, d) in dirs.iter().enumerate() {
        let mnt = shares_dir.join(format!("fs{i}"));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&mnt)
            .map_err(io_at(&mnt))?;
        let sock = format!("/proc/self/fd/{}/fs{i}.sock", dir_fd.as_raw_fd());
        let _ = fs::remove_file(&sock);
        let listener =
            UnixListener::bind(&sock).map_err(io_at(&vm_dir.join(format!("fs{i}.sock"))))?;
        let listener: OwnedFd = listener.into();
        let mnt_c = cstring(&mnt).map_err(io_at(&mnt))?;
        // Placed at 3 and 4 in the child (`util::fds::place_from_3`).
        let sources = [listener.as_raw_fd(), d.dir.as_raw_fd()];
        let mut copies = [-1; 2];
        let read_only = d.read_only;
        let mut cmd = Command::new(&exe);
        cmd.arg("--fd=3")
            .arg("-o")
            .arg(format!("source={}", mnt.display()))
            .arg("-o")
            .arg("cache=auto")
            // No device nodes: a guest's mknod of a block or character
            // device is refused (EPERM), so it cannot leave /dev/sda-like
            // nodes on the host.
            .arg("-o")
            .arg("modcaps=-mknod")
            .current_dir("/")
            .env_clear()
            .stdin(Stdio::null())
            .stdout(log().map_err(io_at(&mnt))?)
            .stderr(log().map_err(io_at(&mnt))?);
        // SAFETY: between fork and exec only async-signal-safe calls: prctl,
        // getppid, fcntl, dup2, close_range, open_tree, mount_setattr, unshare, mount, move_mount
        // (raw system calls with live NUL-terminated strings and a mount_attr
        // of the size given) and _exit; it writes into `copies`, made before.
        unsafe {
            cmd.pre_exec(move || {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
                if nix::unistd::getppid() != supervisor_pid {
                    libc::_exit(1);
                }
                crate::util::fds::place_from_3(&sources, &mut copies)?;
                // A detached copy of the caller's directory's mount, made
                // from the descriptor (non-recursive), read-only if asked;
                // then a private mount namespace, where the copy is attached
                // on the mount point.
                let tree = libc::syscall(
                    libc::SYS_open_tree,
                    4,
                    c"".as_ptr(),
                    OPEN_TREE_CLONE
                        | libc::O_CLOEXEC as libc::c_uint
                        | libc::AT_EMPTY_PATH as libc::c_uint,
                ) as libc::c_int;
                if tree < 0 {
                    return Err(io::Error::last_os_error());
                }
                if read_only {
                    let attr = MountAttr {
                        attr_set: MOUNT_ATTR_RDONLY,
                        attr_clr: 0,
                        propagation: 0,
                        userns_fd: 0,
                    };
                    if libc::syscall(
                        libc::SYS_mount_setattr,
                        tree,
                        c"".as_ptr(),
                        libc::AT_EMPTY_PATH as libc::c_uint,
                        &attr as *const MountAttr,
                        std::mem::size_of::<MountAttr>(),
                    ) != 0
                    {
                        return Err(io::Error::last_os_error());
                    }
                }
                if libc::unshare(libc::CLONE_NEWNS) != 0 {
                    return Err(io::Error::last_os_error());
                }
                let none = std::ptr::null();
                if libc::mount(
                    none,
                    c"/".as_ptr(),
                    none,
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                if libc::syscall(
                    libc::SYS_move_mount,
                    tree,
                    c"".as_ptr(),
                    libc::AT_FDCWD,
                    mnt_c.as_ptr(),
                    MOVE_MOUNT_F_EMPTY_PATH,
                ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                // Nothing but the descriptors handed over above crosses exec.
                crate::util::fds::cloexec_from(5);
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| ShareError::Spawn {
            path: d.path.clone(),
            source,
        })?;
        drop(listener);
        daemons.children.push(child);
    }
    Ok(daemons)
}

trait PathFlags {
    fn custom_flags_path(&mut self) -> &mut Self;
}

impl PathFlags for fs::OpenOptions {
    fn custom_flags_path(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_follow_lume_and_names_are_safe_and_unique() {
        assert_eq!(parse_spec("/a").unwrap(), (PathBuf::from("/a"), false));
        assert_eq!(parse_spec("/a:ro").unwrap(), (PathBuf::from("/a"), true));
        assert_eq!(parse_spec("/a:RW").unwrap(), (PathBuf::from("/a"), false));
        assert!(parse_spec("/a:x").is_err());
        assert!(parse_spec(":ro").is_err());
        let d = |p: &str| HostDir {
            path: PathBuf::from(p),
            dir: Arc::new(File::open("/").unwrap()),
            read_only: false,
        };
        let s = share_states(&[d("/x/src"), d("/y/src"), d("/z/a b;$(x)"), d("/")]);
        let names: Vec<&str> = s.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["src", "src-2", "a_b___x_", "share"]);
        assert_eq!(s[1].tag, "lume1");
        let args = qemu_arguments(&s, 512).join(" ");
        assert!(args.contains("memory-backend-memfd,id=lumemem,size=512M,share=on"));
        assert!(args.contains("vhost-user-fs-pci,chardev=fs0,tag=lume0"));
        assert!(args.contains("name=opt/lume/shares,string=lume0 rw src\nlume1 rw src-2\n"));
        assert!(qemu_arguments(&[], 512).is_empty());
    }
}
