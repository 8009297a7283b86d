//! End to end, the Debian package (issue 19): `scripts/package.sh` builds
//! it, `dpkg -i` installs it, `systemd-analyze verify` checks its units, and
//! `lume serve` runs as lume.socket + lume.service run it (socket activation
//! with `systemd-socket-activate` on the unit's path, mode 0660, group
//! `lume`; this machine has no systemd as PID 1) inside a network namespace
//! the test creates. A user in group `lume` then creates, runs (nat, handed
//! to the service), lists, stops and deletes a VM in their own ~/.lume
//! without sudo; the guest gets its lease from root's dnsmasq and serves
//! its web page; nothing root-owned appears in the user's home. The member
//! rules are tried as abuses, by the CLI (hand-off) and through the API (a
//! VM the service runs for the member): a privileged port, a port a host
//! service listens on, the running VM's MAC for another, a bridge root did
//! not open (`memberBridges`); a published port stays held against host
//! services; refusals leave no keeper directory; a body that never comes
//! gets 408. A user outside the group gets the one message saying what to
//! do, a member whose session predates the group is told to log in again,
//! a socket of the wrong mode is named; the VM keeps its network while the service is
//! stopped and restarted (and a VM the service started through the API is
//! adopted by the new server); installing the package again leaves it
//! running; `dpkg -r` leaves VMs in place. The package, the
//! users and the group (when the test made it) are removed at the end.

mod common;

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::{Home, Netns, sh, wait_for};

const SOCKET: &str = "/run/lume-api.sock";
const BOOT: Duration = Duration::from_secs(180);

/// Purges the package and removes the users (and the group, if the test
/// created it), whatever happened.
struct Installed {
    users: Vec<String>,
    group_existed: bool,
    server: Option<Child>,
}

impl Drop for Installed {
    fn drop(&mut self) {
        stop_server(&mut self.server);
        for u in &self.users {
            let _ = Command::new("sh")
                .arg("-c")
                .arg(format!("pkill -9 -u {u}; sleep 0.2; userdel -r -f {u}"))
                .output();
        }
        let _ = Command::new("dpkg").args(["--purge", "lume"]).output();
        if !self.group_existed {
            let _ = Command::new("groupdel").arg("lume").output();
        }
        let _ = std::fs::remove_file(SOCKET);
    }
}

fn stop_server(server: &mut Option<Child>) {
    if let Some(mut c) = server.take() {
        // SIGTERM, as systemd stops lume.service.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = c.wait();
    }
}

/// `lume.service` as systemd would run it: the socket made by
/// `systemd-socket-activate` at the unit's path, given the unit's mode and
/// group, and `lume serve` started on the first connection with the
/// socket as descriptor 3.
fn start_server(ns: &Netns, home: &Home, log: &Path, journal: bool) -> Child {
    let _ = std::fs::remove_file(SOCKET);
    let stderr = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    // As the journal's stream: systemd names it by device and inode.
    let meta = stderr.metadata().unwrap();
    let unit = std::fs::read_to_string("/lib/systemd/system/lume.service").unwrap();
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart in lume.service");
    let mut c = Command::new("ip");
    c.args([
        "netns",
        "exec",
        &ns.name,
        "systemd-socket-activate",
        "-l",
        SOCKET,
    ])
    .arg(format!("--setenv=HOME={}", home.path().display()))
    .arg(format!(
        "--setenv=XDG_CONFIG_HOME={}",
        home.path().join(".config").display()
    ))
    .args(journal.then(|| format!("--setenv=JOURNAL_STREAM={}:{}", meta.dev(), meta.ino())))
    // Shorter header and body timeouts (10 s by default).
    .arg("--setenv=LUME_API_IDLE_TIMEOUT_MS=3000")
    .arg("--")
    .args(exec.split_whitespace())
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(stderr);
    let child = c.spawn().unwrap();
    wait_for("the socket", Duration::from_secs(10), || {
        Path::new(SOCKET).exists().then_some(())
    });
    // SocketMode=0660, SocketGroup=lume.
    sh(&format!("chgrp lume {SOCKET} && chmod 0660 {SOCKET}"));
    child
}

/// lume (the installed one) as `user`, inside `ns`, with the user's own
/// HOME and groups, and no capability.
fn lume_as(ns: &Netns, user: &str, args: &[&str]) -> Output {
    lume_as_in(ns, user, "--init-groups", args)
}

/// [`lume_as`] with `groups` for setpriv (`--init-groups`, or
/// `--clear-groups` for a session that predates the user's groups).
fn lume_as_in(ns: &Netns, user: &str, groups: &str, args: &[&str]) -> Output {
    let mut c = Command::new("ip");
    c.args([
        "netns",
        "exec",
        &ns.name,
        "setpriv",
        &format!("--reuid={user}"),
        &format!("--regid={user}"),
        groups,
        "--inh-caps=-all",
        "/usr/bin/lume",
    ])
    .args(args)
    .env("HOME", format!("/home/{user}"))
    .env("USER", user)
    .env("LUME_ACCEL", "tcg")
    .env_remove("XDG_CONFIG_HOME")
    .env_remove("LUME_SOCKET")
    .env_remove("LUME_API_TOKEN");
    c.output().unwrap()
}

fn ok_as(ns: &Netns, user: &str, args: &[&str]) -> String {
    let out = lume_as(ns, user, args);
    assert!(
        out.status.success(),
        "lume {args:?} as {user} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails_as(ns: &Netns, user: &str, args: &[&str]) -> String {
    let out = lume_as(ns, user, args);
    assert!(!out.status.success(), "lume {args:?} as {user} should fail");
    String::from_utf8(out.stderr).unwrap()
}

fn get_as(ns: &Netns, user: &str, name: &str) -> serde_json::Value {
    let v: serde_json::Value =
        serde_json::from_str(&ok_as(ns, user, &["get", name, "-f", "json"])).unwrap();
    v[0].clone()
}

fn create_user(name: &str, groups: &str) {
    let _ = Command::new("userdel").args(["-r", "-f", name]).output();
    let extra = if groups.is_empty() {
        String::new()
    } else {
        format!("-G {groups}")
    };
    sh(&format!("useradd -m -s /bin/sh {extra} {name}"));
    sh(&format!("chmod 0700 /home/{name}"));
}

#[test]
fn the_package_serves_group_members_without_sudo_and_leaves_vms_on_removal() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut installed = Installed {
        users: vec!["lumepk1".into(), "lumepk2".into()],
        group_existed: Command::new("getent")
            .args(["group", "lume"])
            .status()
            .unwrap()
            .success(),
        server: None,
    };

    // Build and inspect the package.
    let out = Command::new(repo.join("scripts/package.sh"))
        .arg("--binary")
        .arg(common::lume_bin())
        .current_dir(repo)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "package.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deb = repo.join(String::from_utf8(out.stdout).unwrap().trim());
    let name = deb.file_name().unwrap().to_string_lossy().to_string();
    assert!(
        name.starts_with(&format!("lume_{}_", env!("CARGO_PKG_VERSION"))) && name.ends_with(".deb"),
        "{name}"
    );
    let contents = sh(&format!("dpkg-deb -c {}", deb.display()));
    for path in [
        "./usr/bin/lume",
        "./lib/systemd/system/lume.socket",
        "./lib/systemd/system/lume.service",
        "./usr/share/bash-completion/completions/lume",
        "./usr/share/zsh/vendor-completions/_lume",
        "./usr/share/fish/vendor_completions.d/lume.fish",
        "./usr/share/man/man1/lume.1.gz",
        "./usr/share/man/man1/lume-run.1.gz",
        "./usr/share/doc/lume/install.md",
        "./usr/share/doc/lume/copyright",
    ] {
        assert!(
            contents.lines().any(|l| l.ends_with(path)),
            "{path} missing:\n{contents}"
        );
    }
    let depends = sh(&format!("dpkg-deb -f {} Depends", deb.display()));
    for dep in [
        "qemu-system-x86",
        "qemu-utils",
        "dnsmasq-base",
        "nftables",
        "passt",
    ] {
        assert!(depends.contains(dep), "{depends}");
    }

    // Install it: group lume, units that systemd accepts.
    sh(&format!("dpkg -i {}", deb.display()));
    sh("getent group lume");
    let verify = Command::new("systemd-analyze")
        .args([
            "verify",
            "/lib/systemd/system/lume.socket",
            "/lib/systemd/system/lume.service",
        ])
        .output()
        .unwrap();
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let socket_unit = std::fs::read_to_string("/lib/systemd/system/lume.socket").unwrap();
    assert!(socket_unit.contains(&format!("ListenStream={SOCKET}")));
    assert!(socket_unit.contains("SocketMode=0660") && socket_unit.contains("SocketGroup=lume"));

    // The users: lumepk1 in group lume, lumepk2 not.
    create_user("lumepk1", "lume");
    create_user("lumepk2", "");
    let g = common::guest();
    let guest_dir = PathBuf::from("/home/lumepk1/guest");
    std::fs::create_dir_all(&guest_dir).unwrap();
    std::fs::copy(&g.kernel, guest_dir.join("vmlinuz")).unwrap();
    std::fs::copy(&g.initrd, guest_dir.join("initrd.img")).unwrap();
    sh("chown -R lumepk1:lumepk1 /home/lumepk1/guest");

    // The service, in a namespace of the test's, with root's settings there.
    let ns = Netns::new("pk");
    let home = Home::new();
    home.write_settings(
        "natSubnet: 203.0.113.0/24\nhostSubnet: 192.0.2.0/24\nfirewallAccommodation: false\nnatSubnet6: 2001:db8:64::/64\nhostSubnet6: 2001:db8:65::/64\n",
    );
    let log = home.path().join("serve.log");
    installed.server = Some(start_server(&ns, &home, &log, true));

    // lumepk1 creates a nat VM in ~/.lume, as themselves.
    let kernel = guest_dir.join("vmlinuz").display().to_string();
    let initrd = guest_dir.join("initrd.img").display().to_string();
    let create = [
        "create",
        "dev",
        "--cpu",
        "1",
        "--memory",
        "192MB",
        "--disk-size",
        "16MB",
        "--network",
        "nat",
        "--kernel",
        &kernel,
        "--initrd",
        &initrd,
        "--cmdline",
        &g.cmdline,
    ];
    ok_as(&ns, "lumepk1", &create);
    let vm_dir = Path::new("/home/lumepk1/.lume/dev");
    assert_eq!(std::fs::metadata(vm_dir).unwrap().uid(), uid_of("lumepk1"));

    // Abuse: the host's SSH port for the user's guest.
    let err = fails_as(
        &ns,
        "lumepk1",
        &["run", "dev", "--detach", "--publish", "22:22"],
    );
    assert!(err.contains("Host port 22 is below 1024"), "{err}");

    // Run it without sudo: the service does the network, the user's QEMU runs.
    // Abuse: a host service's port (here one in the namespace listening on
    // 15432, as a database would) for the user's guest: refused.
    let host_service = ns.within(|| std::net::TcpListener::bind("0.0.0.0:15432").unwrap());
    let err = fails_as(
        &ns,
        "lumepk1",
        &["run", "dev", "--detach", "--publish", "15432:80"],
    );
    assert!(
        err.contains("Host port 15432/tcp is in use on this host"),
        "{err}"
    );
    drop(host_service);
    // Nothing of the refused hand-offs is left in root's runtime directory.
    let uid = uid_of("lumepk1");
    let handoffs = format!(
        "ls /run/lume/net-$(stat -L -c %i /proc/self/ns/net)/handoff 2>/dev/null | grep -c '^u{uid}-' || true"
    );
    assert_eq!(
        ns.exec_ok(&handoffs).trim(),
        "0",
        "refusals leave no directory"
    );

    // Run it without sudo: the service does the network, the user's QEMU runs.
    ok_as(
        &ns,
        "lumepk1",
        &["run", "dev", "--detach", "--publish", "18080:80"],
    );
    // The published port is held: a host service started later fails to
    // bind it instead of being silently taken over.
    let later = ns.within(|| std::net::TcpListener::bind("0.0.0.0:18080").map(drop));
    assert!(later.is_err(), "the published port is held while dev runs");
    let details = get_as(&ns, "lumepk1", "dev");
    assert_eq!(details["status"], "running", "{details}");
    let ip = details["ipAddress"]
        .as_str()
        .expect("an address")
        .to_string();
    assert!(ip.starts_with("203.0.113."), "{ip}");
    let listed = ok_as(&ns, "lumepk1", &["ls"]);
    assert!(
        listed.contains("dev") && listed.contains("running"),
        "{listed}"
    );
    common::wait_for("the guest's lease", BOOT, || {
        let console = std::fs::read_to_string(vm_dir.join("console.log")).unwrap_or_default();
        console
            .contains(&format!("LUME-GUEST: lease eth0 {ip}"))
            .then_some(())
    });
    let page = wait_for("the guest's web page", Duration::from_secs(30), || {
        ns.http_get(&format!("{ip}:80"))
    });
    assert!(page.contains("lume-test-guest"), "{page}");
    // QEMU is the user's; root made nothing in the user's home.
    let qemu = sh("pgrep -u lumepk1 -f qemu-system || true");
    assert!(!qemu.trim().is_empty(), "QEMU runs as lumepk1");
    let foreign = sh("find /home/lumepk1 ! -user lumepk1");
    assert!(foreign.trim().is_empty(), "not the user's: {foreign}");

    // A member's VM with a network policy: the service's keeper attaches
    // the filter to the tap before handing it over, as for a root run. It
    // reaches the allowed destination and not the next one.
    ns.exec_ok("ip addr add 198.51.100.2/32 dev lo && ip addr add 198.51.100.3/32 dev lo");
    let allowed = common::Recorder::start(&ns, "198.51.100.2:8000");
    let denied = common::Recorder::start(&ns, "198.51.100.3:8000");
    let pol_cmdline = format!(
        "{} lume.probes=198.51.100.2:8000,198.51.100.3:8000",
        g.cmdline
    );
    let mut create_pol = create.to_vec();
    create_pol[1] = "pol";
    *create_pol.last_mut().unwrap() = &pol_cmdline;
    create_pol.extend(["--allow-out", "198.51.100.2:8000/tcp"]);
    ok_as(&ns, "lumepk1", &create_pol);
    ok_as(&ns, "lumepk1", &["run", "pol", "--detach"]);
    let pol_console = Path::new("/home/lumepk1/.lume/pol/console.log");
    let console_has = |needle: &str| {
        std::fs::read_to_string(pol_console)
            .unwrap_or_default()
            .contains(needle)
    };
    wait_for("pol's allowed probe", BOOT, || {
        console_has("LUME-GUEST: probe ok 198.51.100.2:8000").then_some(())
    });
    // The denied target is tried after a connection to the allowed one
    // succeeded (rounds before the lease fail for both), and by then the
    // recorder, which polls its listener, has taken the allowed connection.
    let after_allowed = || {
        let text = std::fs::read_to_string(pol_console).unwrap_or_default();
        let at = text.find("LUME-GUEST: probe ok 198.51.100.2:8000")?;
        Some(text[at..].to_string())
    };
    wait_for("pol's denied probe after an allowed one", BOOT, || {
        after_allowed()
            .filter(|t| t.contains("LUME-GUEST: probe fail 198.51.100.3:8000"))
            .map(|_| ())
    });
    assert!(!console_has("LUME-GUEST: probe ok 198.51.100.3:8000"));
    let recorded = std::time::Instant::now();
    while allowed.sources().is_empty() && recorded.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    if allowed.sources().is_empty() {
        panic!(
            "the allowed service saw nothing although the guest connected:\n{}\n{}",
            ns.exec("ss -tan; ip -br addr; ip route; ip rule")
                .stdout
                .escape_ascii(),
            std::fs::read_to_string(pol_console)
                .unwrap_or_default()
                .lines()
                .rev()
                .take(15)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    assert!(denied.sources().is_empty(), "{:?}", denied.sources());
    let pol = get_as(&ns, "lumepk1", "pol");
    // The member cannot list a tap's tcx programs (CAP_NET_ADMIN): unknown
    // to it, not "not in force"; root sees it in force.
    assert_eq!(
        pol["network"]["policyInForce"],
        serde_json::Value::Null,
        "{pol}"
    );
    assert_eq!(
        pol["network"]["policy"]["allowOut"],
        serde_json::json!(["198.51.100.2/32:8000/tcp"])
    );
    let tap = pol["network"]["hostDevice"].as_str().unwrap().to_string();
    let in_force = |tap: &str| {
        let tap = tap.to_string();
        ns.within(move || {
            let mut nl = lume::network::kernel::netlink::Netlink::open().unwrap();
            lume::network::policy::tc::in_force(&mut nl, &tap).unwrap()
        })
    };
    assert!(in_force(&tap), "the keeper's filter is not on {tap}");
    // Abuse: the member takes the filter off the tap it was handed.
    let del = lume_as_cmd_out(&ns, "lumepk1", &format!("tc qdisc del dev {tap} ingress"));
    assert!(
        !del.status.success(),
        "a member removed the policy's filter"
    );
    // Abuse: a raw hand-off for pol's name or MAC without its policy (an
    // unfiltered network for the same VM): refused, pol keeps its filter.
    let raw = |name: &str| {
        api_as(
            "lumepk1",
            "POST",
            "/lume/network/handoff",
            &format!(
                r#"{{"name":"{name}","network":"nat","mac":"{}"}}"#,
                pol["macAddress"].as_str().unwrap()
            ),
        )
    };
    let same_mac = raw("pol2");
    assert!(
        same_mac.contains("is used by VM 'pol'") && same_mac.ends_with(" 409"),
        "{same_mac}"
    );
    let same_name = raw("pol");
    assert!(
        same_name.contains("already has a network from lume's service")
            && same_name.ends_with(" 409"),
        "{same_name}"
    );
    assert!(in_force(&tap), "a raw hand-off took the filter off {tap}");
    // A policy the service cannot enforce (user mode needs no hand-off; a
    // rule list too long) is refused by the service too.
    let too_many: Vec<String> = (0..513)
        .map(|i| format!("\"10.{}.{}.0/24\"", i / 256, i % 256))
        .collect();
    let refused = api_as(
        "lumepk1",
        "POST",
        "/lume/network/handoff",
        &format!(
            r#"{{"name":"big","network":"nat","mac":"52:54:00:aa:bb:01","policy":{{"denyOut":[{}]}}}}"#,
            too_many.join(",")
        ),
    );
    assert!(
        refused.contains("too many rules") && refused.ends_with(" 400"),
        "{refused}"
    );
    ok_as(&ns, "lumepk1", &["stop", "pol"]);
    ok_as(&ns, "lumepk1", &["delete", "pol", "--force"]);
    drop((allowed, denied));
    // Its keeper takes the network (and the filter's guard) down.
    let keepers = "ls /run/lume/net-$(stat -L -c %i /proc/self/ns/net)/handoff 2>/dev/null || true";
    wait_for(
        "pol's keeper to take its network down",
        Duration::from_secs(15),
        || {
            let list = ns.exec_ok(keepers);
            (!list
                .lines()
                .any(|l| l.ends_with("-pol") || l.ends_with("-pol2")))
            .then_some(())
        },
    );
    assert!(
        !ns.exec_ok(&format!("ip -br link show dev {tap} 2>&1 || true"))
            .contains("UP"),
        "pol's tap outlived its run"
    );

    // Abuse: another VM of the user's with dev's MAC (config.json is theirs
    // to edit) would take dev's frames on the bridge: refused.
    ok_as(
        &ns,
        "lumepk1",
        &["create", "dup", "--disk-size", "8MB", "--network", "nat"],
    );
    let dup_config = Path::new("/home/lumepk1/.lume/dup/config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dup_config).unwrap()).unwrap();
    cfg["macAddress"] = details["macAddress"].clone();
    std::fs::write(dup_config, cfg.to_string()).unwrap();
    sh(&format!("chown lumepk1:lumepk1 {}", dup_config.display()));
    let err = fails_as(&ns, "lumepk1", &["run", "dup", "--detach"]);
    assert!(err.contains("is used by VM 'dev'"), "{err}");
    ok_as(&ns, "lumepk1", &["delete", "dup", "--force"]);

    // Abuse: bridged onto an interface root did not open to members.
    ns.exec_ok("ip link add lumepkbr type bridge && ip link set lumepkbr up");
    ok_as(
        &ns,
        "lumepk1",
        &[
            "create",
            "br",
            "--disk-size",
            "8MB",
            "--network",
            "bridged:lumepkbr",
        ],
    );
    let err = fails_as(&ns, "lumepk1", &["run", "br", "--detach"]);
    assert!(
        err.contains("Interface 'lumepkbr' is not open to users who are not root"),
        "{err}"
    );
    ok_as(&ns, "lumepk1", &["delete", "br", "--force"]);
    assert_eq!(
        ns.exec_ok(&handoffs).trim(),
        "1",
        "only dev's keeper directory: {}",
        ns.exec_ok(
            "ls -la /run/lume/net-$(stat -L -c %i /proc/self/ns/net)/handoff 2>&1; ps -eo pid,user,args | grep net-keeper"
        )
    );

    // The service's REST API is not the member's: the packaged service
    // serves its group the network hand-off only (`--handoff-group`), so a
    // member cannot create, run or delete root's VMs through it.
    for (method, path, body) in [
        (
            "POST",
            "/lume/vms",
            r#"{"name":"m22","diskSize":"8MB","network":"nat"}"#,
        ),
        ("GET", "/lume/vms", ""),
        ("DELETE", "/lume/vms/srv", ""),
    ] {
        let answer = api_as("lumepk1", method, path, body);
        assert!(
            answer.contains("serves you only the networks of your own VMs")
                && answer.ends_with(" 403"),
            "{method} {path}: {answer}"
        );
    }

    // A member cannot hold a request open by never sending its body.
    let slow = member_slow_body("lumepk1");
    assert!(slow.starts_with("HTTP/1.1 408"), "{slow}");

    // Upgrading the package (installing it again) leaves the VM running.
    sh(&format!("dpkg -i {}", deb.display()));
    assert_eq!(get_as(&ns, "lumepk1", "dev")["status"], "running");

    // lumepk2, outside the group: one message saying what to do.
    ok_as(
        &ns,
        "lumepk2",
        &["create", "other", "--disk-size", "8MB", "--network", "nat"],
    );
    let err = fails_as(&ns, "lumepk2", &["run", "other"]);
    assert!(
        err.contains("usermod -aG lume lumepk2") && err.contains("not in it"),
        "{err}"
    );
    ok_as(&ns, "lumepk2", &["delete", "other", "--force"]);
    // lumepk1 in a session from before joining the group: told to log in
    // again, not to join it.
    ok_as(
        &ns,
        "lumepk1",
        &["create", "dup2", "--disk-size", "8MB", "--network", "nat"],
    );
    let old_session = lume_as_in(&ns, "lumepk1", "--clear-groups", &["run", "dup2"]);
    let err = String::from_utf8_lossy(&old_session.stderr);
    assert!(
        err.contains("not in this login session") && err.contains("newgrp lume"),
        "{err}"
    );
    // A socket that is not the group's: said so, with the fix.
    sh(&format!("chmod 0600 {SOCKET}"));
    let err = fails_as(&ns, "lumepk1", &["run", "dup2"]);
    sh(&format!("chmod 0660 {SOCKET}"));
    assert!(
        err.contains("the socket is mode 0600 with group 'lume'"),
        "{err}"
    );
    ok_as(&ns, "lumepk1", &["delete", "dup2", "--force"]);

    // A VM the service itself runs (root's location, started through the API).
    let srv = common::guest_create_args("srv", "none", &[], "");
    home.ok(&srv.iter().map(String::as_str).collect::<Vec<_>>());
    let started = root_api("POST", "/lume/vms/srv/run");
    assert!(started.ends_with(" 202"), "{started}");
    wait_for("srv running", Duration::from_secs(60), || {
        (home.get("srv")["status"] == "running").then_some(())
    });

    // The service stops (SIGTERM) and restarts: the VMs keep running, the
    // user's keeps its network.
    stop_server(&mut installed.server);
    assert_eq!(
        home.get("srv")["status"],
        "running",
        "the service's VM runs on"
    );
    let serve_log = std::fs::read_to_string(&log).unwrap();
    // To the journal: priorities, no timestamps of its own.
    assert!(
        serve_log.contains("<6>lume API listening on unix:/run/lume-api.sock (passed by systemd"),
        "{serve_log}"
    );
    assert!(
        serve_log.contains("<6>Network hand-off for uid"),
        "{serve_log}"
    );
    assert!(
        serve_log
            .contains("<6>Stopping: finishing the requests in progress; running VMs keep running"),
        "{serve_log}"
    );
    assert_eq!(get_as(&ns, "lumepk1", "dev")["status"], "running");
    let page = ns.http_get(&format!("{ip}:80")).expect("still reachable");
    assert!(page.contains("lume-test-guest"));
    std::fs::write(&log, "").unwrap();
    installed.server = Some(start_server(&ns, &home, &log, false));
    let listed = ok_as(&ns, "lumepk1", &["ls", "-f", "json"]);
    assert!(listed.contains("\"running\""), "{listed}");

    // The restarted service identifies the group member on its socket (curl
    // as lumepk1), and lumepk2 cannot even connect.
    let curl = |user: &str| {
        Command::new("setpriv")
            .args([
                &format!("--reuid={user}"),
                &format!("--regid={user}"),
                "--init-groups",
                "curl",
                "-sS",
                "-w",
                " %{http_code}",
                "--unix-socket",
                SOCKET,
                "http://localhost/lume/host/status",
            ])
            .output()
            .unwrap()
    };
    let member = curl("lumepk1");
    let answer = String::from_utf8_lossy(&member.stdout);
    // Connected and identified: refused only because the REST API is not
    // the member's (the hand-off is).
    assert!(
        answer.contains("serves you only the networks of your own VMs") && answer.ends_with(" 403"),
        "{answer}"
    );
    let outsider = curl("lumepk2");
    assert!(!outsider.status.success(), "lumepk2 must not connect");
    // The restarted service adopts its VM: sees it running, stops it.
    let seen = root_api("GET", "/lume/vms/srv");
    assert!(
        seen.contains("\"running\"") && seen.ends_with(" 200"),
        "{seen}"
    );
    let stopped = root_api("POST", "/lume/vms/srv/stop");
    assert!(stopped.ends_with(" 200"), "{stopped}");
    assert_eq!(home.get("srv")["status"], "stopped");
    // Not the journal: plain timestamped lines.
    let serve_log = std::fs::read_to_string(&log).unwrap();
    assert!(
        serve_log.contains("] lume API listening on unix:/run/lume-api.sock")
            && !serve_log.contains("<6>"),
        "{serve_log}"
    );

    // Stop: the user's QEMU ends, the service's keeper takes the network down.
    ok_as(&ns, "lumepk1", &["stop", "dev", "--timeout", "5"]);
    assert_eq!(get_as(&ns, "lumepk1", "dev")["status"], "stopped");
    wait_for("the keeper's take-down", Duration::from_secs(20), || {
        let left = ns.exec_ok(&format!(
            "ls /run/lume/net-$(stat -L -c %i /proc/self/ns/net)/handoff 2>/dev/null | grep -c '^u{uid}-dev$' || true"
        ));
        (left.trim() == "0").then_some(())
    });

    // Removing the package leaves the VMs (and the server's) in place.
    stop_server(&mut installed.server);
    sh("dpkg -r lume");
    assert!(!Path::new("/usr/bin/lume").exists());
    assert!(vm_dir.join("config.json").is_file());
    assert!(vm_dir.join("disk.img").is_file());
    assert_eq!(std::fs::metadata(vm_dir).unwrap().uid(), uid);
    sh(&format!("dpkg -i {}", deb.display()));
    // The removal masked both units; the reinstallation unmasks both.
    for unit in ["lume.socket", "lume.service"] {
        let masked = std::fs::read_link(format!("/etc/systemd/system/{unit}"))
            .is_ok_and(|t| t == Path::new("/dev/null"));
        assert!(!masked, "{unit} stays masked after remove + install");
    }
    ok_as(&ns, "lumepk1", &["delete", "dev", "--force"]);
    assert!(!vm_dir.exists());
    drop(installed);
    assert!(!Path::new("/usr/bin/lume").exists(), "purged");
}

/// A shell command as `user` (and their groups) in `ns`.
fn lume_as_cmd_out(ns: &Netns, user: &str, command: &str) -> Output {
    Command::new("ip")
        .args(["netns", "exec", &ns.name, "setpriv"])
        .args([
            &format!("--reuid={user}"),
            &format!("--regid={user}"),
            "--init-groups",
            "sh",
            "-c",
            command,
        ])
        .output()
        .unwrap()
}

/// One request as `user` on the service's socket: the body and the status.
fn api_as(user: &str, method: &str, path: &str, body: &str) -> String {
    let out = Command::new("setpriv")
        .args([
            &format!("--reuid={user}"),
            &format!("--regid={user}"),
            "--init-groups",
            "curl",
            "-sS",
            "-X",
            method,
            "-w",
            " %{http_code}",
            "--unix-socket",
            SOCKET,
            "-H",
            "Content-Type: application/json",
        ])
        .args(if body.is_empty() {
            vec![]
        } else {
            vec!["--data-binary", body]
        })
        .arg(format!("http://localhost{path}"))
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap()
}

/// A request whose announced body never comes, as `user`: the answer.
fn member_slow_body(user: &str) -> String {
    let script = r#"
import socket
s = socket.socket(socket.AF_UNIX)
s.connect("SOCKET")
s.sendall(b"POST /lume/network/handoff HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
s.settimeout(60)
print(s.recv(4096).decode(errors="replace"))
"#
    .replace("SOCKET", SOCKET);
    let out = Command::new("setpriv")
        .args([
            &format!("--reuid={user}"),
            &format!("--regid={user}"),
            "--init-groups",
            "/usr/bin/python3",
            "-c",
            &script,
        ])
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// One request as root on the service's socket: the body and the status.
fn root_api(method: &str, path: &str) -> String {
    let out = Command::new("curl")
        .args([
            "-sS",
            "-X",
            method,
            "-w",
            " %{http_code}",
            "--unix-socket",
            SOCKET,
            &format!("http://localhost{path}"),
        ])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap()
}

fn uid_of(user: &str) -> u32 {
    nix::unistd::User::from_name(user)
        .unwrap()
        .expect("the user exists")
        .uid
        .as_raw()
}
