//! A private dnsmasq per lume bridge: its own configuration, pid file, lease
//! file and reservation directory under lume's runtime directory, bound to
//! the bridge only (`bind-interfaces`, `except-interface=lo`), so it never
//! competes with a system resolver or another dnsmasq.
//!
//! DNS for NAT guests is forwarded to the host's resolvers, which lume (not
//! dnsmasq) reads from the host's resolv.conf and writes to dnsmasq's
//! `servers-file`: see [`Dnsmasq::follow`] for why.

use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::prefix6::Prefix6;
use super::resolvers;
use super::subnet::Subnet;

/// How long leases last; a lease granted before the VM started is older than its run.
pub const LEASE_SECS: u64 = 3600;

/// Why dnsmasq could not be started.
#[derive(Debug, thiserror::Error)]
pub enum DnsmasqError {
    #[error(
        "dnsmasq was not found: install the dnsmasq-base package (apt-get install dnsmasq-base)"
    )]
    Missing,
    #[error("dnsmasq did not start for bridge {bridge}: {message}")]
    Failed { bridge: String, message: String },
    #[error(
        "Cannot tell dnsmasq for bridge {bridge} to read its new DNS servers: restart the VM if guests resolve through the old ones"
    )]
    Signal {
        bridge: String,
        #[source]
        source: nix::Error,
    },
    #[error("Cannot write dnsmasq's files in {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The most dnsmasq's log may hold before it is rotated (per network).
pub const LOG_CAP: u64 = 1 << 20;

/// One dnsmasq instance serving one bridge.
#[derive(Debug, Clone)]
pub struct Dnsmasq {
    /// Directory of its files.
    pub dir: PathBuf,
    pub bridge: String,
    pub subnet: Subnet,
    /// The network's IPv6 /64: router advertisements (addresses by
    /// autoconfiguration) and DHCPv6 on it; `None`: IPv4 only.
    pub prefix6: Option<Prefix6>,
    /// Hand out the gateway as router and DNS server (NAT); host-only gets neither.
    pub route: bool,
}

/// A dnsmasq being started: its daemonizing process, which exits once the
/// daemon serves. Dropped without [`Starting::wait`], it is still waited
/// for (its error then goes unreported): no zombie and no stale
/// `dnsmasq.starting` is left.
#[derive(Debug)]
pub struct Starting {
    child: Option<std::process::Child>,
    dnsmasq: Dnsmasq,
    /// Whether `dnsmasq.starting` names it.
    marked: bool,
}

impl Starting {
    /// Waits until dnsmasq serves, or says why it did not start.
    pub fn wait(mut self) -> Result<(), DnsmasqError> {
        self.finish()
    }

    fn finish(&mut self) -> Result<(), DnsmasqError> {
        let Some(child) = self.child.take() else {
            return Ok(());
        };
        let d = &self.dnsmasq;
        let pid = child.id().to_string();
        let out = child.wait_with_output();
        // Only its own marker: a later start (after another waited 5 s in
        // vain) may have written its own.
        if fs::read_to_string(d.starting_path())
            .is_ok_and(|s| s.split_whitespace().next() == Some(pid.as_str()))
        {
            let _ = fs::remove_file(d.starting_path());
        }
        let failed = |message: String| DnsmasqError::Failed {
            bridge: d.bridge.clone(),
            message,
        };
        let out = out.map_err(|source| DnsmasqError::Io {
            path: d.conf_path(),
            source,
        })?;
        if !out.status.success() {
            return Err(failed(
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ));
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while d.pid().is_none() {
            if Instant::now() > deadline {
                return Err(failed("it exited without writing its pid file".into()));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// One line of the lease file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub expires: u64,
    pub mac: String,
    pub ip: Ipv4Addr,
}

impl Dnsmasq {
    pub fn conf_path(&self) -> PathBuf {
        self.dir.join("dnsmasq.conf")
    }
    pub fn pid_path(&self) -> PathBuf {
        self.dir.join("dnsmasq.pid")
    }
    pub fn lease_path(&self) -> PathBuf {
        self.dir.join("dnsmasq.leases")
    }
    pub fn hosts_dir(&self) -> PathBuf {
        self.dir.join("hosts.d")
    }
    /// The upstream DNS servers, one `server=` line each (NAT only).
    pub fn servers_path(&self) -> PathBuf {
        self.dir.join("servers.conf")
    }

    /// The configuration file's text.
    pub fn conf(&self) -> String {
        let s = &self.subnet;
        let mut c = format!(
            "# Written by lume; replaced at every start.\n\
             interface={bridge}\n\
             bind-interfaces\n\
             except-interface=lo\n\
             listen-address={gw}\n\
             dhcp-range={first},{last},{mask},{LEASE_SECS}\n\
             dhcp-hostsdir={hosts}\n\
             dhcp-leasefile={leases}\n\
             pid-file={pid}\n\
             dhcp-authoritative\n\
             dhcp-rapid-commit\n\
             dhcp-ignore-clid\n\
             no-hosts\n\
             log-facility={log}\n\
             log-dhcp\n\
             user={user}\n",
            bridge = self.bridge,
            gw = s.gateway(),
            first = s.host(2),
            last = s.last_host(),
            mask = s.mask(),
            hosts = self.hosts_dir().display(),
            leases = self.lease_path().display(),
            pid = self.pid_path().display(),
            log = self.log_path().display(),
            user = dnsmasq_user().0,
        );
        if let Some(p) = self.prefix6 {
            // Router advertisements with the prefix (guests configure their
            // address themselves, a Linux guest `PREFIX:<EUI-64>`) and
            // DHCPv6 for guests that ask, which gives a guest the same
            // EUI-64 address (reserved per MAC, see `reserve`); host-only
            // advertises no route (router lifetime 0).
            c.push_str(&format!(
                "listen-address={gw6}
enable-ra
dhcp-range={first6},{last6},slaac,64,{LEASE_SECS}
",
                gw6 = p.gateway(),
                first6 = p.host(0x1000),
                last6 = p.host(0xffff),
            ));
            if self.route {
                c.push_str(
                    "dhcp-option=option6:dns-server,[::]
",
                );
            } else {
                c.push_str(&format!(
                    "ra-param={},60,0
dhcp-option=option6:dns-server
",
                    self.bridge
                ));
            }
        }
        if self.route {
            // Upstream servers come from lume (see `follow`), asked in the
            // host's order as its C library does.
            c.push_str(&format!(
                "no-resolv\nservers-file={}\nstrict-order\n",
                self.servers_path().display()
            ));
        } else {
            // Host-only: no default route and no DNS for the guests.
            c.push_str("dhcp-option=option:router\ndhcp-option=option:dns-server\nport=0\n");
        }
        c
    }

    /// dnsmasq's own log, which grows with every DHCP exchange a guest starts.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("dnsmasq.log")
    }

    /// Keeps dnsmasq's log within `cap` bytes: a larger log moves to
    /// `dnsmasq.log.1` and the live file is emptied. dnsmasq appends
    /// (O_APPEND), so it goes on writing at the new end without a signal
    /// (it could not reopen the file itself: it runs unprivileged).
    pub fn cap_log(&self, cap: u64) {
        let path = self.log_path();
        let too_big = fs::symlink_metadata(&path)
            .map(|m| m.file_type().is_file() && m.len() > cap)
            .unwrap_or(false);
        if !too_big {
            return;
        }
        let old = self.dir.join("dnsmasq.log.1");
        let _ = fs::remove_file(&old);
        let _ = fs::copy(&path, &old).and_then(|_| super::rundir::private_file(&old));
        let _ = fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .and_then(|f| f.set_len(0));
    }

    /// The pid of this instance if it runs.
    pub fn pid(&self) -> Option<u32> {
        let pid: u32 = fs::read_to_string(self.pid_path())
            .ok()?
            .trim()
            .parse()
            .ok()?;
        self.runs_with_conf(pid).then_some(pid)
    }

    /// Whether process `pid` is a dnsmasq of this configuration: it runs
    /// a program named dnsmasq, its command line names the configuration
    /// file, and its real uid passes `uid_ok`. A local user's process that
    /// took a dead dnsmasq's pid with that path in its arguments fails the
    /// uid (a user cannot run as root or dnsmasq's user), and a privileged
    /// program that keeps such arguments (sudo waiting at its prompt) fails
    /// the program. A zombie has no command line.
    fn is_dnsmasq(&self, pid: u32, uid_ok: impl Fn(u32) -> bool) -> bool {
        let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
            return false;
        };
        let mut args = cmdline.split(|b| *b == 0);
        let argv0 = args.next().unwrap_or_default();
        let conf = format!("--conf-file={}", self.conf_path().display());
        if !args.any(|a| a == conf.as_bytes()) {
            // The cheap test first: this runs on every watcher pass and
            // every few milliseconds while a start or stop polls.
            return false;
        }
        // /proc/PID/exe needs CAP_SYS_PTRACE for another user's process
        // (lume in a container without it): then the program's own name.
        let program = crate::util::procfs::program_name(pid).unwrap_or_else(|| {
            let argv0 = String::from_utf8_lossy(argv0);
            argv0.rsplit('/').next().unwrap_or_default().to_string()
        });
        program == "dnsmasq" && crate::util::procfs::real_uid_of(pid).is_some_and(uid_ok)
    }

    /// [`Self::is_dnsmasq`] for the daemon: root, or a user dnsmasq drops
    /// to (`nobody` too: an earlier release's dnsmasq ran as that user).
    fn runs_with_conf(&self, pid: u32) -> bool {
        self.is_dnsmasq(pid, |uid| uid == 0 || is_dnsmasq_user(uid))
    }

    /// Starts dnsmasq unless it already runs with this configuration. One
    /// started with another (by an earlier release of lume, which let it run
    /// as a user that can no longer read the private reservations) is
    /// restarted with this one; its leases are kept. Returns once it serves,
    /// with whether it started one (false: one was running, or another
    /// start under way finished).
    pub fn ensure_running(&self) -> Result<bool, DnsmasqError> {
        match self.ensure_started()? {
            Some(starting) => starting.wait().map(|()| true),
            None => Ok(false),
        }
    }

    /// [`Self::ensure_running`] that does not wait for a dnsmasq it starts
    /// to be ready (its own start takes 10–30 ms): the start under way is
    /// returned, and the run's supervisor goes on with the firewall and
    /// waits for it before the guest runs (QEMU starts paused meanwhile),
    /// long before a guest asks for an address. Until then
    /// `dnsmasq.starting` names the starting process, so that another lume
    /// (or this one's watcher, or a stop) waits for it instead of starting
    /// a second.
    pub fn start_overlapped(&self) -> Result<Option<Starting>, DnsmasqError> {
        match self.ensure_started()? {
            Some(starting) if starting.marked => Ok(Some(starting)),
            // Nothing tells another start to wait: wait now.
            Some(starting) => starting.wait().map(|()| None),
            None => Ok(None),
        }
    }

    fn starting_path(&self) -> PathBuf {
        self.dir.join("dnsmasq.starting")
    }

    /// Waits (at most 5 s) while another start of this dnsmasq, named by
    /// `dnsmasq.starting`, is under way: until its daemonizing process has
    /// exited (a zombie not yet collected has no command line).
    fn wait_for_other_start(&self) {
        let Some(marker) = fs::read_to_string(self.starting_path()).ok() else {
            return;
        };
        // "PID START-TIME" (the previous release wrote the pid alone).
        let mut words = marker.split_whitespace();
        let Some(pid) = words.next().and_then(|w| w.parse::<u32>().ok()) else {
            return;
        };
        let started = words.next().and_then(|w| w.parse::<u64>().ok());
        // The starting process runs as root: it drops to dnsmasq's user
        // only in the daemon it forks.
        let starting = || {
            self.is_dnsmasq(pid, |uid| uid == 0)
                && started.is_none_or(|t| crate::util::procfs::start_time(pid) == Some(t))
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while starting() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Starts dnsmasq unless it runs with this configuration; returns the
    /// start under way, to be waited for.
    fn ensure_started(&self) -> Result<Option<Starting>, DnsmasqError> {
        // Under the network lock, so nothing else starts one meanwhile.
        self.wait_for_other_start();
        if self.pid().is_some() {
            if fs::read_to_string(self.conf_path()).is_ok_and(|c| c == self.conf()) {
                return Ok(None);
            }
            self.stop();
        }
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| DnsmasqError::Io { path, source }
        };
        self.hosts_dir_for_dnsmasq()
            .map_err(io_err(&self.hosts_dir()))?;
        fs::write(self.conf_path(), self.conf()).map_err(io_err(&self.conf_path()))?;
        let _ = super::rundir::private_file(&self.conf_path());
        // dnsmasq drops to its own user: it must be able to rewrite the lease file.
        if !self.lease_path().exists() {
            fs::write(self.lease_path(), b"").map_err(io_err(&self.lease_path()))?;
        }
        let _ = super::rundir::private_file(&self.lease_path());
        if let Some(uid) = dnsmasq_uid() {
            let _ = nix::unistd::chown(&self.lease_path(), Some(uid), None);
        }
        if self.route {
            // The host's resolvers now; kept from the last run when
            // resolv.conf cannot be read (dnsmasq needs the file).
            match resolvers::host_servers(Path::new(resolvers::HOST_RESOLV_CONF)) {
                Ok(servers) => {
                    self.write_servers(&servers)?;
                }
                Err(_) if self.servers_path().exists() => {}
                Err(_) => {
                    self.write_servers(&[])?;
                }
            }
        }
        let mut cmd = Command::new("dnsmasq");
        cmd.process_group(0)
            .arg(format!("--conf-file={}", self.conf_path().display()))
            .stdin(Stdio::null());
        // SAFETY: between fork and exec only close_range or fcntl, which are
        // async-signal-safe: nothing but the standard streams crosses exec.
        unsafe {
            cmd.pre_exec(|| {
                crate::util::fds::cloexec_from(3);
                Ok(())
            });
        }
        // dnsmasq forks its daemon and exits once the daemon is ready (or
        // with its error on stderr): that exit is what a start waits for.
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => DnsmasqError::Missing,
                _ => io_err(&self.conf_path())(e),
            })?;
        let marked = crate::util::procfs::start_time(child.id()).is_some_and(|started| {
            crate::util::atomic::write_runtime(
                &self.starting_path(),
                format!("{} {started}", child.id()).as_bytes(),
            )
            .is_ok()
        });
        Ok(Some(Starting {
            child: Some(child),
            dnsmasq: self.clone(),
            marked,
        }))
    }

    /// Makes a running dnsmasq forward to the host's current resolvers:
    /// reads the host's resolv.conf and, when its servers differ from those
    /// dnsmasq has, rewrites the servers file and sends SIGHUP, on which
    /// dnsmasq re-reads that file and clears its cache. Returns the new
    /// servers when they changed; an unreadable resolv.conf (being replaced)
    /// changes nothing.
    ///
    /// Why not dnsmasq's own polling of resolv.conf: it looks at most once a
    /// second and notices a change by the file's modification time in whole
    /// seconds, so a rewrite within the same second as the last one can be
    /// missed for good (seen with 2.90); it keeps answers cached from the old servers; and
    /// it asks whichever server answered fastest, where the host asks them in
    /// order (a VPN's resolver first). Comparing the server list itself
    /// has none of these gaps.
    pub fn follow(&self) -> Result<Option<Vec<String>>, DnsmasqError> {
        if !self.route {
            return Ok(None);
        }
        let Ok(servers) = resolvers::host_servers(Path::new(resolvers::HOST_RESOLV_CONF)) else {
            return Ok(None);
        };
        if !self.write_servers(&servers)? {
            return Ok(None);
        }
        if let Some(pid) = self.pid() {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGHUP,
            )
            .map_err(|source| DnsmasqError::Signal {
                bridge: self.bridge.clone(),
                source,
            })?;
        }
        Ok(Some(servers))
    }

    /// The servers dnsmasq was last given (None before the file exists).
    pub fn servers(&self) -> Option<Vec<String>> {
        let text = fs::read_to_string(self.servers_path()).ok()?;
        Some(
            text.lines()
                .filter_map(|l| l.strip_prefix("server="))
                .map(str::to_string)
                .collect(),
        )
    }

    /// Writes the servers file for `servers` unless it already says that;
    /// returns whether it wrote. dnsmasq re-reads it on SIGHUP after
    /// dropping privileges, so its user may read it.
    pub fn write_servers(&self, servers: &[String]) -> Result<bool, DnsmasqError> {
        let path = self.servers_path();
        let text = resolvers::servers_file(servers);
        if fs::read_to_string(&path).is_ok_and(|t| t == text) {
            return Ok(false);
        }
        crate::util::atomic::write_runtime_with(&path, text.as_bytes(), grant_dnsmasq).map_err(
            |source| DnsmasqError::Io {
                path: path.clone(),
                source,
            },
        )?;
        Ok(true)
    }

    /// Stops dnsmasq if it runs.
    pub fn stop(&self) {
        // A start under way (in this process or another) is waited for: its
        // pid file is then there to stop it by. Its failure is the starting
        // run's to report.
        self.wait_for_other_start();
        if let Some(pid) = self.pid() {
            let pid = nix::unistd::Pid::from_raw(pid as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(3);
            while self.pid().is_some() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            // Not a pid that may have been reused since it exited.
            if self.pid().is_some() {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            }
        }
        let _ = fs::remove_file(self.pid_path());
    }

    /// Reserves `ip` (and on an IPv6 network the EUI-64 address of `mac`)
    /// for `mac` under the name `id` (dnsmasq reads the directory by itself).
    pub fn reserve(
        &self,
        id: &str,
        mac: crate::vm::config::MacAddress,
        ip: Ipv4Addr,
    ) -> Result<(), DnsmasqError> {
        self.hosts_dir_for_dnsmasq()
            .map_err(|source| DnsmasqError::Io {
                path: self.hosts_dir(),
                source,
            })?;
        let path = self.hosts_dir().join(id);
        // dnsmasq reads the file when it appears, as its own user: it is
        // readable by that user before the rename.
        crate::util::atomic::write_runtime_with(
            &path,
            match self.prefix6 {
                Some(p) => format!("{mac},{ip},[{}]\n", p.eui64(mac)),
                None => format!("{mac},{ip}\n"),
            }
            .as_bytes(),
            grant_dnsmasq,
        )
        .map_err(|source| DnsmasqError::Io {
            path: path.clone(),
            source,
        })
        .map(drop)
    }

    /// The reservation directory, private to root except that dnsmasq's
    /// user may read it (it does so after dropping privileges): an ACL entry
    /// for that user, or, on a filesystem without ACLs, a path that others
    /// can traverse but not list.
    fn hosts_dir_for_dnsmasq(&self) -> std::io::Result<()> {
        let hosts = self.hosts_dir();
        // <base>/net-<ns>/<nat|host>/hosts.d
        let base = self
            .dir
            .parent()
            .and_then(Path::parent)
            .unwrap_or(&self.dir)
            .to_path_buf();
        super::rundir::private_dir(&base, &hosts)?;
        let Some(uid) = dnsmasq_uid() else {
            return Ok(());
        };
        if super::rundir::grant_reader(&base, &hosts, uid.as_raw()).is_err() {
            use std::os::unix::fs::PermissionsExt;
            for d in hosts.ancestors().skip(1) {
                if !d.starts_with(&base) {
                    break;
                }
                fs::set_permissions(d, fs::Permissions::from_mode(0o711))?;
            }
            fs::set_permissions(&hosts, fs::Permissions::from_mode(0o755))?;
        }
        Ok(())
    }

    /// Drops the reservation `id`.
    pub fn release(&self, id: &str) {
        let _ = fs::remove_file(self.hosts_dir().join(id));
    }
}

/// Lets dnsmasq's user read `file` (0600 for root besides): an ACL entry,
/// or 0644 on a filesystem without ACLs.
fn grant_dnsmasq(file: &Path) -> io::Result<()> {
    super::rundir::private_file(file)?;
    if let Some(uid) = dnsmasq_uid()
        && super::rundir::grant_file(file, uid.as_raw()).is_err()
    {
        fs::set_permissions(file, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    }
    Ok(())
}

/// The user dnsmasq drops to, named in its configuration: `dnsmasq` when
/// that user exists, else `nobody` (dnsmasq-base's own default).
fn dnsmasq_user() -> (&'static str, Option<nix::unistd::Uid>) {
    for name in ["dnsmasq", "nobody"] {
        if let Ok(Some(u)) = nix::unistd::User::from_name(name) {
            return (name, Some(u.uid));
        }
    }
    ("nobody", None)
}

/// Whether `uid` is a user lume's dnsmasq runs as (`dnsmasq`, `nobody`).
/// The lookups are kept; a uid not among them is looked up afresh, in case
/// the user was created since.
fn is_dnsmasq_user(uid: u32) -> bool {
    fn lookup() -> Vec<u32> {
        ["dnsmasq", "nobody"]
            .into_iter()
            .filter_map(|name| nix::unistd::User::from_name(name).ok().flatten())
            .map(|u| u.uid.as_raw())
            .collect()
    }
    static KNOWN: std::sync::OnceLock<Vec<u32>> = std::sync::OnceLock::new();
    KNOWN.get_or_init(lookup).contains(&uid) || lookup().contains(&uid)
}

/// The uid of [`dnsmasq_user`], when it exists.
fn dnsmasq_uid() -> Option<nix::unistd::Uid> {
    dnsmasq_user().1
}

/// Parses a dnsmasq lease file: `expiry mac ip hostname client-id` per line.
pub fn parse_leases(text: &str) -> Vec<Lease> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some(Lease {
                expires: f.next()?.parse().ok()?,
                mac: f.next()?.to_ascii_lowercase(),
                ip: f.next()?.parse().ok()?,
            })
        })
        .collect()
}

/// The current lease of `mac` in `lease_file`, granted at or after `since`
/// (Unix seconds) and not expired at `now`.
pub fn current_lease(
    lease_file: &Path,
    mac: crate::vm::config::MacAddress,
    since: u64,
    now: u64,
) -> Option<Ipv4Addr> {
    let text = fs::read_to_string(lease_file).ok()?;
    // Both lowercase: the lease file's as parsed, the MAC as printed.
    let mac = mac.to_string();
    parse_leases(&text)
        .into_iter()
        .filter(|l| l.mac == mac)
        .filter(|l| l.expires > now && l.expires + 1 >= since + LEASE_SECS)
        .max_by_key(|l| l.expires)
        .map(|l| l.ip)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    fn in_dir(dir: &Path) -> Dnsmasq {
        Dnsmasq {
            dir: dir.to_path_buf(),
            bridge: "lumetst0".into(),
            subnet: "203.0.113.0/24".parse().unwrap(),
            prefix6: None,
            route: false,
        }
    }

    /// A process running `program` whose command line names `d`'s
    /// configuration file, run as `uid`.
    fn named_after(d: &Dnsmasq, program: &Path, uid: Option<u32>) -> std::process::Child {
        let mut cmd = Command::new(program);
        cmd.args(["-c", "sleep 30; true"])
            .arg(format!("--conf-file={}", d.conf_path().display()));
        if let Some(uid) = uid {
            cmd.uid(uid);
        }
        cmd.spawn().unwrap()
    }

    /// A dnsmasq's pid taken over by another process that names the
    /// configuration file is not dnsmasq (not stopped, not waited for): a
    /// local user's, even running a program named dnsmasq, and root's
    /// running another program (sudo waiting at its prompt); a marker
    /// names its process by pid and start time.
    #[test]
    fn only_roots_or_dnsmasqs_process_is_taken_for_dnsmasq() {
        use std::os::unix::fs::PermissionsExt;
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to run a process as another user");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let d = in_dir(dir.path());
        // A shell under dnsmasq's name: its /proc/PID/exe says dnsmasq.
        let fake = dir.path().join("dnsmasq");
        fs::copy(fs::canonicalize("/bin/sh").unwrap(), &fake).unwrap();
        fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
        let mut roots = named_after(&d, &fake, None);
        let mut users = named_after(&d, &fake, Some(54321));
        let mut other = named_after(&d, Path::new("sh"), None);
        // The path inside another argument is not this configuration.
        let mut longer = Command::new(&fake)
            .args(["-c", "sleep 30; true"])
            .arg(format!("--conf-file={}.old", d.conf_path().display()))
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert!(!d.runs_with_conf(longer.id()));
        let _ = longer.kill();
        let _ = longer.wait();
        assert!(d.runs_with_conf(roots.id()));
        assert!(!d.runs_with_conf(users.id()));
        assert!(!d.runs_with_conf(other.id()));
        for c in [&users, &other] {
            fs::write(d.pid_path(), c.id().to_string()).unwrap();
            assert_eq!(d.pid(), None);
            fs::write(d.starting_path(), c.id().to_string()).unwrap();
            let t = Instant::now();
            d.wait_for_other_start();
            assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        }
        // Root's dnsmasq with another start time: a later process.
        let started = crate::util::procfs::start_time(roots.id()).unwrap();
        fs::write(d.starting_path(), format!("{} {}", roots.id(), started + 1)).unwrap();
        let t = Instant::now();
        d.wait_for_other_start();
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        // The same process: waited for until it ends.
        fs::write(d.starting_path(), format!("{} {started}", roots.id())).unwrap();
        let pid = nix::unistd::Pid::from_raw(roots.id() as i32);
        let killer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        });
        let t = Instant::now();
        d.wait_for_other_start();
        let waited = t.elapsed();
        killer.join().unwrap();
        assert!(
            waited >= Duration::from_millis(250) && waited < Duration::from_secs(4),
            "{waited:?}"
        );
        for c in [&mut roots, &mut users, &mut other] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A start dropped without being waited for (a run that fails before
    /// QEMU starts) is still waited for: no zombie, no stale marker.
    #[test]
    fn a_start_dropped_unwaited_leaves_no_zombie_or_marker() {
        let dir = tempfile::tempdir().unwrap();
        let d = in_dir(dir.path());
        let child = Command::new("sh")
            .args(["-c", "sleep 0.2; exit 1"])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        fs::write(d.starting_path(), pid.to_string()).unwrap();
        drop(Starting {
            child: Some(child),
            dnsmasq: d.clone(),
            marked: true,
        });
        assert!(!d.starting_path().exists());
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "a zombie is left"
        );
    }

    #[test]
    fn config_binds_to_the_bridge_only() {
        let d = Dnsmasq {
            dir: "/run/lume/x/nat".into(),
            bridge: "lume0".into(),
            subnet: "203.0.113.0/24".parse().unwrap(),
            prefix6: None,
            route: true,
        };
        let c = d.conf();
        assert!(!c.contains("enable-ra"), "{c}");
        assert!(c.contains("interface=lume0\nbind-interfaces\nexcept-interface=lo\n"));
        assert!(c.contains("dhcp-range=203.0.113.2,203.0.113.254,255.255.255.0,3600"));
        // Leases by MAC only: a guest cannot hold many by varying its
        // client identifier.
        assert!(c.contains("\ndhcp-ignore-clid\n"));
        assert!(!c.contains("port=0"));
        assert!(
            c.contains("no-resolv\nservers-file=/run/lume/x/nat/servers.conf\nstrict-order\n"),
            "{c}"
        );
        let host = Dnsmasq { route: false, ..d };
        assert!(host.conf().contains("dhcp-option=option:router\n"));
        assert!(!host.conf().contains("servers-file"));
    }

    #[test]
    fn an_ipv6_network_gets_advertisements_and_dhcpv6() {
        let nat = Dnsmasq {
            dir: "/run/lume/x/nat".into(),
            bridge: "lume0".into(),
            subnet: "203.0.113.0/24".parse().unwrap(),
            prefix6: Some("2001:db8:64::/64".parse().unwrap()),
            route: true,
        };
        let c = nat.conf();
        assert!(
            c.contains("listen-address=2001:db8:64::1\nenable-ra\ndhcp-range=2001:db8:64::1000,2001:db8:64::ffff,slaac,64,3600\n"),
            "{c}"
        );
        assert!(c.contains("dhcp-option=option6:dns-server,[::]\n"), "{c}");
        assert!(!c.contains("ra-param"), "{c}");
        let host = Dnsmasq {
            route: false,
            ..nat
        };
        let c = host.conf();
        // No default route and no DNS server for host-only guests.
        assert!(
            c.contains("ra-param=lume0,60,0\ndhcp-option=option6:dns-server\n"),
            "{c}"
        );
    }

    #[test]
    fn only_fresh_leases_of_this_run_count() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("leases");
        // Granted at 1000 (expires 4600) and at 5000 (expires 8600).
        std::fs::write(
            &f,
            "4600 52:54:00:aa:bb:cc 203.0.113.5 guest *\n8600 52:54:00:AA:BB:CC 203.0.113.6 guest *\n7000 02:00:00:00:00:01 203.0.113.9 * *\n\
             duid 00:01:00:01:2f:00:00:01:52:54:00:aa:bb:cc\n\
             9000 1234 2001:db8:64:0:5054:ff:feaa:bbcc guest 00:01:00:01:aa\n",
        )
        .unwrap();
        let mac = "52:54:00:aa:bb:cc".parse().unwrap();
        assert_eq!(
            current_lease(&f, mac, 4000, 6000),
            Some("203.0.113.6".parse().unwrap())
        );
        // A run that started after the last grant has no lease yet.
        assert_eq!(current_lease(&f, mac, 5500, 6000), None);
        // Expired.
        assert_eq!(current_lease(&f, mac, 4000, 9000), None);
    }
}

#[cfg(test)]
mod servers_tests {
    use super::*;

    /// A NAT network's dnsmasq whose files live in `dir`.
    pub(super) fn in_dir(dir: &Path) -> Dnsmasq {
        Dnsmasq {
            dir: dir.into(),
            bridge: "lume0".into(),
            subnet: "203.0.113.0/24".parse().unwrap(),
            prefix6: None,
            route: true,
        }
    }

    #[test]
    fn the_servers_file_is_written_only_when_the_servers_change() {
        let dir = tempfile::tempdir().unwrap();
        let d = in_dir(dir.path());
        let a = vec!["192.0.2.53".to_string()];
        assert!(d.write_servers(&a).unwrap());
        assert!(!d.write_servers(&a).unwrap());
        assert!(d.write_servers(&["198.51.100.53".to_string()]).unwrap());
        let text = fs::read_to_string(d.servers_path()).unwrap();
        assert!(text.ends_with("\nserver=198.51.100.53\n"), "{text}");
        assert_eq!(d.servers().unwrap(), ["198.51.100.53"]);
    }
}

#[cfg(test)]
mod log_cap_tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_log_past_its_cap_is_rotated_and_the_writer_goes_on_at_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let d = super::servers_tests::in_dir(dir.path());
        // dnsmasq's way of writing: O_APPEND on a descriptor it keeps.
        let mut writer = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.log_path())
            .unwrap();
        writer.write_all(&[b'a'; 4000]).unwrap();
        d.cap_log(8000);
        assert_eq!(
            fs::metadata(d.log_path()).unwrap().len(),
            4000,
            "under the cap: untouched"
        );
        writer.write_all(&[b'b'; 5000]).unwrap();
        d.cap_log(8000);
        assert_eq!(fs::metadata(d.log_path()).unwrap().len(), 0);
        assert_eq!(
            fs::metadata(dir.path().join("dnsmasq.log.1"))
                .unwrap()
                .len(),
            9000
        );
        writer.write_all(b"newest\n").unwrap();
        assert_eq!(fs::read(d.log_path()).unwrap(), b"newest\n");
    }
}
