//! Shared test helpers: a temporary HOME for lume, the test guest, network
//! namespaces that clean up after themselves.
#![allow(dead_code)]

pub mod api;
pub mod frames;
pub mod http;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The lume binary under test.
pub fn lume_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_lume"))
}

/// A throw-away HOME with its own ~/.lume and ~/.config/lume.
pub struct Home {
    pub dir: tempfile::TempDir,
}

impl Home {
    pub fn new() -> Self {
        Self {
            dir: tempfile::Builder::new()
                .prefix("lume-test-")
                .tempdir()
                .unwrap(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn storage(&self) -> PathBuf {
        self.path().join(".lume")
    }

    pub fn vm_dir(&self, name: &str) -> PathBuf {
        self.storage().join(name)
    }

    pub fn config_yaml(&self) -> PathBuf {
        self.path().join(".config/lume/config.yaml")
    }

    pub fn write_settings(&self, text: &str) {
        let p = self.config_yaml();
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    /// A command running lume with this HOME.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(lume_bin());
        self.env(&mut c);
        c
    }

    pub fn env(&self, c: &mut Command) {
        c.env("HOME", self.path())
            .env("XDG_CONFIG_HOME", self.path().join(".config"))
            .env("LUME_ACCEL", "tcg")
            .env_remove("LUME_API_TOKEN");
    }

    /// Runs lume and returns its output.
    pub fn lume(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().unwrap()
    }

    /// Runs lume, asserts success, returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        succeeded(args, self.lume(args))
    }

    /// Runs lume, asserts failure, returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.lume(args);
        assert!(
            !out.status.success(),
            "lume {args:?} should have failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stderr).unwrap()
    }

    /// The one VM of `lume get NAME -f json` (a one-element array, as lume's).
    pub fn get(&self, name: &str) -> serde_json::Value {
        let all: serde_json::Value =
            serde_json::from_str(&self.ok(&["get", name, "-f", "json"])).unwrap();
        assert_eq!(all.as_array().map(Vec::len), Some(1), "{all}");
        all[0].clone()
    }
}

/// Asserts that lume succeeded and returns its stdout.
fn succeeded(args: &[&str], out: Output) -> String {
    assert!(
        out.status.success(),
        "lume {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The test guest (kernel, initrd, command line), built once and cached by
/// tests/guest/build.sh.
pub struct Guest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
}

/// What one of the repository's build scripts made: runs `script ARGS…`
/// (a path relative to the crate) and returns the path it prints last on
/// stdout. Each script caches its output, so this is quick after the first.
pub fn built_by(script: &str, args: &[&str]) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(script);
    let out = Command::new("bash").arg(&path).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{script} {} failed:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    PathBuf::from(
        stdout
            .lines()
            .last()
            .unwrap_or_else(|| panic!("{script} printed no path"))
            .trim(),
    )
}

/// Processes (pid, command line) that are a virtiofsd of the VM in `vm_dir`.
#[allow(dead_code)]
pub fn virtiofsd_of(vm_dir: &Path) -> Vec<(String, String)> {
    let needle = format!("source={}/shares/", vm_dir.display());
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains("virtiofsd") && cmd.contains(&needle) {
            found.push((name, cmd));
        }
    }
    found
}

/// The real Debian 12 cloud test image (tests/debian/build.sh, cached).
pub fn debian_image() -> PathBuf {
    built_by("tests/debian/build.sh", &[])
}

/// The venv of one real Python client of lume (tests/clients/build.sh):
/// returns its python.
pub fn client_python(client: &str) -> PathBuf {
    built_by("tests/clients/build.sh", &[client]).join("venv/bin/python")
}

pub fn guest() -> Guest {
    static ONCE: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);
    let mut slot = ONCE.lock().unwrap_or_else(|e| e.into_inner());
    if slot.is_none() {
        *slot = Some(built_by("tests/guest/build.sh", &[]));
    }
    let dir = slot.clone().unwrap();
    Guest {
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.img"),
        cmdline: std::fs::read_to_string(dir.join("cmdline"))
            .unwrap()
            .trim()
            .to_string(),
    }
}

/// `lume create NAME` arguments for a small VM booting the test guest:
/// 1 CPU, 192MB, a 16MB disk, `network`, the guest's command line plus
/// `extra_cmdline`, then `extra` options.
pub fn guest_create_args(
    name: &str,
    network: &str,
    extra: &[&str],
    extra_cmdline: &str,
) -> Vec<String> {
    let g = guest();
    let mut args: Vec<String> = [
        "create",
        name,
        "--cpu",
        "1",
        "--memory",
        "192MB",
        "--disk-size",
        "16MB",
        "--network",
        network,
        "--kernel",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(g.kernel.display().to_string());
    args.push("--initrd".into());
    args.push(g.initrd.display().to_string());
    args.push("--cmdline".into());
    args.push(format!("{} {extra_cmdline}", g.cmdline).trim().to_string());
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A short unique name: `<prefix><pid-base36><seq>`, at most 15 characters
/// so it also fits interface names.
pub fn unique(prefix: &str) -> String {
    let n = SEQ.fetch_add(1, Ordering::SeqCst);
    let pid = std::process::id();
    let s = format!("{prefix}{pid:x}{n:x}");
    assert!(s.len() <= 15, "{s} too long");
    s
}

/// A network namespace removed (with every process in it) on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Self {
        let name = unique(prefix);
        sh(&format!("ip netns add {name}"));
        let ns = Self { name };
        ns.exec_ok("ip link set lo up");
        ns
    }

    /// A shell command inside the namespace.
    pub fn exec(&self, cmd: &str) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name, "sh", "-c", cmd])
            .output()
            .unwrap()
    }

    pub fn exec_ok(&self, cmd: &str) -> String {
        let out = self.exec(cmd);
        assert!(
            out.status.success(),
            "in {}: {cmd} failed: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// lume inside this namespace with `home`.
    pub fn lume(&self, home: &Home, args: &[&str]) -> Output {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name])
            .arg(lume_bin())
            .args(args);
        home.env(&mut c);
        c.output().unwrap()
    }

    pub fn lume_ok(&self, home: &Home, args: &[&str]) -> String {
        succeeded(args, self.lume(home, args))
    }

    pub fn lume_fails(&self, home: &Home, args: &[&str]) -> String {
        let out = self.lume(home, args);
        assert!(!out.status.success(), "lume {args:?} should have failed");
        String::from_utf8(out.stderr).unwrap()
    }
}

impl Netns {
    /// Runs `f` on a thread that has entered this namespace (setns affects
    /// only the calling thread), so the test talks to the namespace directly.
    pub fn within<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn_in(f).join().unwrap()
    }

    /// Runs `f` on a thread of its own that has entered this namespace.
    pub fn spawn_in<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let fd = std::fs::File::open(&path).unwrap();
            nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
    }

    /// Pushes `bytes` of data to an echo service at `addr` inside the
    /// namespace while reading the echo; returns how many bytes came back
    /// (within `timeout`).
    pub fn echo_bulk(&self, addr: &str, bytes: usize, timeout: Duration) -> usize {
        let addr: std::net::SocketAddr = addr.parse().unwrap();
        self.within(move || {
            use std::io::{Read, Write};
            let Ok(s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
                return 0;
            };
            s.set_read_timeout(Some(timeout)).unwrap();
            let mut reader = s.try_clone().unwrap();
            let back = std::thread::spawn(move || {
                let (mut got, mut buf) = (0usize, vec![0u8; 1 << 16]);
                while got < bytes {
                    match reader.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got += n,
                    }
                }
                got
            });
            let chunk = vec![b'x'; 1 << 16];
            let mut w = &s;
            let mut sent = 0;
            while sent < bytes {
                let n = chunk.len().min(bytes - sent);
                if w.write_all(&chunk[..n]).is_err() {
                    break;
                }
                sent += n;
            }
            back.join().unwrap()
        })
    }

    /// Sends `request` to `addr` inside the namespace and returns the reply
    /// (None when the connection fails).
    pub fn tcp_exchange(&self, addr: &str, request: &[u8]) -> Option<String> {
        let addr: std::net::SocketAddr = addr.parse().unwrap();
        let request = request.to_vec();
        self.within(move || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
            s.write_all(&request).ok()?;
            let mut out = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        out.extend_from_slice(&buf[..n]);
                        if out.ends_with(b"\n")
                            && request.ends_with(b"\n")
                            && !request.starts_with(b"GET")
                        {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
            (!out.is_empty()).then(|| String::from_utf8_lossy(&out).into_owned())
        })
    }

    /// HTTP GET of `/` at `addr` inside the namespace.
    pub fn http_get(&self, addr: &str) -> Option<String> {
        self.tcp_exchange(addr, b"GET / HTTP/1.0\r\n\r\n")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "for p in $(ip netns pids {0} 2>/dev/null); do kill -9 $p; done; \
                 rm -rf /run/lume/net-$(stat -L -c %i /run/netns/{0}); ip netns del {0}",
                self.name
            ))
            .status();
    }
}

pub fn sh(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Writes a VM directory exactly as the previous release did: 0755
/// directories, 0644 files, a config.json without `diskFormat`, the lock
/// files and logs of an earlier run.
pub fn write_previous_release_vm(
    home: &Home,
    name: &str,
    kernel: &[u8],
    initrd: &[u8],
    cmdline: &str,
) {
    use std::os::unix::fs::PermissionsExt;
    let dir = home.vm_dir(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(home.storage(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let cfg = serde_json::json!({
        "os": "linux",
        "cpuCount": 1,
        "memorySize": 192u64 << 20,
        "diskSize": 16u64 << 20,
        "macAddress": "52:54:00:12:34:56",
        "display": "1024x768",
        "networkMode": "none",
        "kernelBoot": {"kernel": "vmlinuz", "initrd": "initrd.img", "cmdline": cmdline},
    });
    let files: [(&str, Vec<u8>); 7] = [
        ("config.json", serde_json::to_vec_pretty(&cfg).unwrap()),
        ("vmlinuz", kernel.to_vec()),
        ("initrd.img", initrd.to_vec()),
        ("console.log", b"old console\n".to_vec()),
        ("lume.log", b"old log\n".to_vec()),
        (".lock", Vec::new()),
        (".cfg.lock", Vec::new()),
    ];
    for (f, data) in files {
        std::fs::write(dir.join(f), data).unwrap();
        std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let disk = std::fs::File::create(dir.join("disk.img")).unwrap();
    disk.set_len(16 << 20).unwrap();
    std::fs::set_permissions(dir.join("disk.img"), std::fs::Permissions::from_mode(0o644)).unwrap();
}

/// Polls `f` until it returns Some, or panics after `timeout` with `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the VM's console shows `needle`.
pub fn wait_console(home: &Home, vm: &str, needle: &str, timeout: Duration) -> String {
    let path = home.vm_dir(vm).join("console.log");
    wait_for(
        &format!("'{needle}' in {}", path.display()),
        timeout,
        || {
            let text = std::fs::read_to_string(&path).ok()?;
            text.contains(needle).then_some(text)
        },
    )
}

/// The network the end-to-end network tests run in:
///
/// ```text
///  [lan ns]  br0 198.51.100.1/24 ── dnsmasq (the LAN's DHCP server, .100–.150)
///             │                     peer services on 198.51.100.1
///           lanport (veth)
///             │
///  [host ns]  up0 198.51.100.2/24, default route via 198.51.100.1  ← lume runs here
/// ```
/// Only documentation ranges are used: the LAN is 198.51.100.0/24, lume's NAT
/// subnet 203.0.113.0/24 and its host-only subnet 192.0.2.0/24.
pub struct Lan {
    pub host: Netns,
    pub lan: Netns,
    pub home: Home,
    _dnsmasq_dir: tempfile::TempDir,
}

pub const LAN_PEER: &str = "198.51.100.1";
pub const HOST_UPLINK_IP: &str = "198.51.100.2";
/// The LAN router's and the host's IPv6 addresses ([`Lan::with_ipv6`]).
pub const LAN_PEER6: &str = "2001:db8:ff::1";
pub const HOST_UPLINK6: &str = "2001:db8:ff::2";

impl Lan {
    pub fn new(tag: &str) -> Self {
        let lan = Netns::new(&format!("{tag}l"));
        let host = Netns::new(&format!("{tag}h"));
        lan.exec_ok(
            "ip link add br0 type bridge && ip addr add 198.51.100.1/24 dev br0 && ip link set br0 up",
        );
        host.exec_ok(&format!(
            "ip link add up0 type veth peer name lanport netns {} && \
             ip addr add 198.51.100.2/24 dev up0 && ip link set up0 up && \
             ip route add default via 198.51.100.1",
            lan.name
        ));
        lan.exec_ok("ip link set lanport master br0 && ip link set lanport up");
        let dir = tempfile::tempdir().unwrap();
        lan.exec_ok(&format!(
            "dnsmasq --conf-file=/dev/null --bind-interfaces --interface=br0 --except-interface=lo \
             --dhcp-range=198.51.100.100,198.51.100.150,255.255.255.0,10m --dhcp-option=3,198.51.100.1 \
             --dhcp-leasefile={0}/leases --pid-file={0}/pid --port=0 --dhcp-authoritative",
            dir.path().display()
        ));
        let home = Home::new();
        home.write_settings(
            "natSubnet: 203.0.113.0/24\nhostSubnet: 192.0.2.0/24\nuserSubnet: 198.51.100.0/24\nnatSubnet6: 2001:db8:64::/64\nhostSubnet6: 2001:db8:65::/64\n",
        );
        Self {
            host,
            lan,
            home,
            _dnsmasq_dir: dir,
        }
    }

    /// IPv6 on the LAN too: [`LAN_PEER6`] on the LAN's bridge, the host's
    /// uplink [`HOST_UPLINK6`] with its default route through it.
    pub fn with_ipv6(&self) {
        self.lan
            .exec_ok(&format!("ip addr add {LAN_PEER6}/64 dev br0 nodad"));
        self.host.exec_ok(&format!(
            "ip addr add {HOST_UPLINK6}/64 dev up0 nodad && ip -6 route add default via {LAN_PEER6}"
        ));
    }

    /// lume in the host namespace.
    pub fn lume_ok(&self, args: &[&str]) -> String {
        self.host.lume_ok(&self.home, args)
    }

    pub fn lume_fails(&self, args: &[&str]) -> String {
        self.host.lume_fails(&self.home, args)
    }

    /// `lume get NAME -f json` in the host namespace.
    pub fn get(&self, name: &str) -> serde_json::Value {
        let all: serde_json::Value =
            serde_json::from_str(&self.lume_ok(&["get", name, "-f", "json"])).unwrap();
        all[0].clone()
    }

    /// Creates a VM from the test guest; `extra_cmdline` is appended to the
    /// guest's kernel command line (e.g. `lume.probe=IP:PORT`).
    pub fn create(&self, name: &str, network: &str, extra: &[&str], extra_cmdline: &str) {
        let args = guest_create_args(name, network, extra, extra_cmdline);
        self.lume_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    }
}

/// A TCP service in a namespace that records who connects and answers with
/// the address it saw. Stops when dropped.
pub struct Recorder {
    seen: std::sync::Arc<std::sync::Mutex<Vec<std::net::SocketAddr>>>,
    listener: std::net::TcpListener,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Recorder {
    pub fn start(ns: &Netns, addr: &str) -> Self {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (s2, st2) = (seen.clone(), stop.clone());
        let addr: std::net::SocketAddr = addr.parse().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = ns.spawn_in(move || {
            let l = std::net::TcpListener::bind(addr).unwrap();
            l.set_nonblocking(true).unwrap();
            tx.send(l.try_clone().unwrap()).unwrap();
            while !st2.load(Ordering::SeqCst) {
                if !Self::take(&l, &s2) {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        });
        let listener = rx.recv().unwrap();
        Self {
            seen,
            listener,
            stop,
            handle: Some(handle),
        }
    }

    /// Accepts every connection the kernel has completed, answering each
    /// with its source address; false when there was none.
    fn take(l: &std::net::TcpListener, seen: &std::sync::Mutex<Vec<std::net::SocketAddr>>) -> bool {
        use std::io::Write;
        let mut any = false;
        while let Ok((mut s, peer)) = l.accept() {
            seen.lock().unwrap().push(peer);
            let _ = s.write_all(format!("{}\n", peer.ip()).as_bytes());
            any = true;
        }
        any
    }

    /// Every source so far, including connections the kernel completed
    /// that the polling thread has not taken yet: a client that saw its
    /// connect succeed before this call is always counted.
    pub fn sources(&self) -> Vec<std::net::IpAddr> {
        Self::take(&self.listener, &self.seen);
        self.seen.lock().unwrap().iter().map(|a| a.ip()).collect()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The JSON after the last `RESULT ` line of a test client's session (the
/// Python MCP sessions print one), which must have succeeded.
#[allow(dead_code)]
pub fn session_result(out: &std::process::Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "mcp session: {stdout}\n{stderr}");
    let line = stdout
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("no result: {stdout}\n{stderr}"));
    serde_json::from_str(line).unwrap()
}

/// The command line (its words joined by spaces) of the supervisor the
/// run.json in `vm_dir` names.
pub fn supervisor_cmdline(vm_dir: &Path) -> String {
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(vm_dir.join("run.json")).unwrap()).unwrap();
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{}/cmdline", state["pid"])).unwrap())
        .replace('\0', " ")
}
