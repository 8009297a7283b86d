//! End to end with a real Debian 12 cloud disk (tests/debian/build.sh, built
//! from Debian packages and cached): lume imports the qcow2 from a URL (an
//! HTTP server in the LAN namespace, checked with --image-sha256), gives the VM its
//! cloud-init NoCloud seed, the guest provisions itself (user lume, lume's
//! key, hostname = VM name, DHCP) and `lume ssh` reaches it in nat, bridged
//! (on a Linux bridge) and user mode; a clone proves it provisions as itself.
//! The same guest then shows what needs a real distribution in snapshots
//! (a file deleted after a memory snapshot is back after the restore) and in
//! shared directories (virtio-fs mounted by lume's cloud-init at a later
//! boot, read-only and read-write), in an `--ephemeral` run that leaves
//! every disk file as it was. One imported disk serves all these checks:
//! four boots under TCG (the VM three, its clone once), two of them first
//! boots.
//! Needs root (network namespaces) and the packages of scripts/install-deps.sh.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::http::Server;
use common::{Home, LAN_PEER, Lan};

/// How long a first boot may take to SSH under TCG on a loaded machine.
const BOOT: Duration = Duration::from_secs(420);

fn image() -> PathBuf {
    common::debian_image()
}

/// `lume ssh ARGS…` in the host namespace.
fn ssh(t: &Lan, args: &[&str]) -> Output {
    let mut all = vec!["ssh"];
    all.extend_from_slice(args);
    t.host.lume(&t.home, &all)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).trim().to_string()
}

/// Polls `lume ssh NAME` until it answers once cloud-init has finished
/// (its modules restart sshd on the way); returns the hostname.
fn wait_ssh(t: &Lan, name: &str) -> String {
    wait_ssh_run(t, name, "hostname")
}

/// Like `wait_ssh`, running `cmd` once cloud-init has finished: its stdout.
fn wait_ssh_run(t: &Lan, name: &str, cmd: &str) -> String {
    let start = Instant::now();
    let cmd = format!("cloud-init status --wait >/dev/null; {cmd}");
    loop {
        let out = ssh(t, &[name, "-t", "200", "--", &cmd]);
        if out.status.success() {
            eprintln!("{name}: ssh answered {:?} after start", start.elapsed());
            return text(&out.stdout);
        }
        assert!(
            start.elapsed() < BOOT,
            "VM {name} did not answer ssh within {BOOT:?}: {}\nconsole tail:\n{}",
            text(&out.stderr),
            console_tail(&t.home, name)
        );
        std::thread::sleep(Duration::from_secs(3));
    }
}

fn console_tail(home: &Home, name: &str) -> String {
    let c = std::fs::read_to_string(home.vm_dir(name).join("console.log")).unwrap_or_default();
    let lines: Vec<&str> = c.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn host_key(home: &Home, name: &str) -> String {
    let k = std::fs::read_to_string(home.vm_dir(name).join("known_hosts")).unwrap();
    let line = k
        .lines()
        .find(|l| l.starts_with(&format!("lume-{name} ")))
        .unwrap_or_else(|| panic!("no host key for {name} in {k}"));
    line.split_whitespace().nth(2).unwrap().to_string()
}

#[test]
fn debian_cloud_image_provisions_and_answers_lume_ssh() {
    let image = image();
    let t = Lan::new("db");
    // A server-style host: the uplink is enslaved to a bridge that holds the
    // address, so a bridged VM is reachable from the host itself (a macvtap
    // one would not be).
    t.host.exec_ok(
        "ip link add hbr0 type bridge && ip link set up0 master hbr0 && ip link set hbr0 up && \
         ip addr del 198.51.100.2/24 dev up0 && ip addr add 198.51.100.2/24 dev hbr0 && \
         ip route add default via 198.51.100.1",
    );
    let user_data = t.home.path().join("user-data.yaml");
    std::fs::write(
        &user_data,
        "#cloud-config\nruncmd:\n  - [sh, -c, 'echo from-user-part > /run/lume-user-part']\n",
    )
    .unwrap();
    // The image comes over HTTP from a server on the LAN, as a downloaded
    // genericcloud image would, verified with its SHA-256.
    let srv = Server::start_on(&t.lan, LAN_PEER);
    srv.put_file("debian-12.qcow2", image.clone());
    let sum = Command::new("sha256sum").arg(&image).output().unwrap();
    assert!(sum.status.success());
    let sha = String::from_utf8(sum.stdout).unwrap();
    let sha = sha.split_whitespace().next().unwrap().to_string();
    let image_arg = srv.url("/f/debian-12.qcow2");
    let ud_arg = user_data.display().to_string();
    t.lume_ok(&[
        "create",
        "deb",
        "--image",
        &image_arg,
        "--image-sha256",
        &sha,
        "--disk-size",
        "3GB",
        "--cpu",
        "2",
        "--memory",
        "1GB",
        "--network",
        "nat",
        "--cloud-init",
        &ud_arg,
    ]);
    assert!(
        srv.seen()
            .iter()
            .any(|r| r.starts_with("/f/debian-12.qcow2 ")),
        "{:?}",
        srv.seen()
    );
    // The seed is lume's, the image is not touched: nothing lume-specific inside.
    t.lume_ok(&["run", "deb", "--detach"]);
    assert!(t.home.vm_dir("deb").join("cidata.img").is_file());

    // Provisioned: the hostname is the VM's name, lume's key logs in.
    assert_eq!(wait_ssh(&t, "deb"), "deb");

    // cloud-init took lume's seed without an error (the NoCloud datasource,
    // every module of both user-data parts).
    let out = ssh(&t, &["deb", "--", "cloud-init status --long"]);
    let status = text(&out.stdout);
    assert!(status.contains("status: done"), "{status}");
    assert!(status.contains("DataSourceNoCloud"), "{status}");

    // IPv6 from lume's router advertisement: the guest's global address in
    // the NAT network's /64, listed by `lume get`.
    let listed = common::wait_for(
        "an IPv6 address the guest has in ipv6Addresses",
        Duration::from_secs(60),
        || {
            let out = ssh(&t, &["deb", "--", "ip -6 -o addr show scope global"]);
            let guest = text(&out.stdout);
            let d = t.get("deb");
            d["ipv6Addresses"]
                .as_array()?
                .iter()
                .filter_map(|a| a.as_str())
                .find(|a| a.starts_with("2001:db8:64:") && guest.contains(&format!(" {a}/64")))
                .map(str::to_string)
        },
    );
    eprintln!("the Debian guest's IPv6 address: {listed}");

    // Passwordless sudo; output and exit status come back.
    let out = ssh(&t, &["deb", "--", "sudo", "-n", "true"]);
    assert!(out.status.success(), "sudo -n true: {}", text(&out.stderr));
    let out = ssh(&t, &["deb", "false"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let out = ssh(&t, &["deb", "--", "echo out; echo err >&2; exit 3"]);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(text(&out.stdout), "out");
    assert!(text(&out.stderr).contains("err"), "{}", text(&out.stderr));

    // The user's own cloud-config ran next to lume's (lume's user still works).
    let part = common::wait_for("the user's runcmd", Duration::from_secs(120), || {
        let out = ssh(&t, &["deb", "cat", "/run/lume-user-part"]);
        out.status.success().then(|| text(&out.stdout))
    });
    assert_eq!(part, "from-user-part");

    // lume's default password, given through SSH_ASKPASS: move lume's key
    // away so that only the password can log in.
    let keys = t.home.storage().join(".ssh");
    let saved = t.home.storage().join("saved-ssh");
    std::fs::rename(&keys, &saved).unwrap();
    let out = ssh(&t, &["deb", "whoami"]);
    assert_eq!(
        out.status.code(),
        Some(255),
        "a new, unknown key is refused"
    );
    let out = ssh(&t, &["deb", "-p", "lume", "whoami"]);
    assert!(
        out.status.success(),
        "password login: {}",
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout), "lume");
    let out = ssh(&t, &["deb", "-p", "wrong", "whoami"]);
    assert_eq!(out.status.code(), Some(255));
    std::fs::remove_dir_all(&keys).unwrap();
    std::fs::rename(&saved, &keys).unwrap();

    // A changed host key is refused, not learned.
    let known = t.home.vm_dir("deb").join("known_hosts");
    let original = std::fs::read_to_string(&known).unwrap();
    let other = t.home.path().join("other-key");
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&other)
        .status()
        .unwrap();
    assert!(st.success());
    let other_pub = std::fs::read_to_string(other.with_extension("pub")).unwrap();
    let forged: Vec<&str> = other_pub.split_whitespace().take(2).collect();
    std::fs::write(&known, format!("lume-deb {}\n", forged.join(" "))).unwrap();
    let out = ssh(&t, &["deb", "true"]);
    assert_eq!(out.status.code(), Some(255));
    assert!(
        text(&out.stderr).contains("Host key verification failed"),
        "{}",
        text(&out.stderr)
    );
    std::fs::write(&known, &original).unwrap();
    let deb_key = host_key(&t.home, "deb");

    // A clone is a new instance: its own hostname and SSH host keys.
    t.lume_ok(&["stop", "deb"]);
    t.lume_ok(&["clone", "deb", "deb2"]);
    assert!(!t.home.vm_dir("deb2").join("known_hosts").exists());
    let c1: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(t.home.vm_dir("deb").join("config.json")).unwrap(),
    )
    .unwrap();
    let c2: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(t.home.vm_dir("deb2").join("config.json")).unwrap(),
    )
    .unwrap();
    assert_ne!(c1["vmId"], c2["vmId"]);
    // The clone runs bridged (a peer on the LAN, leased by the LAN's DHCP
    // server): `lume ssh` goes to the address lume saw it lease.
    t.lume_ok(&["run", "deb2", "--detach", "--network", "bridged"]);
    // Meanwhile the original restarts in user mode: the same instance, so
    // first-boot steps do not run again and its host key is unchanged (the
    // strict check against its known_hosts passes), reached through the
    // loopback port lume forwards. (Set, not a one-run `--network`: a
    // memory snapshot restores into the VM's own mode.)
    t.lume_ok(&["set", "deb", "--network", "user"]);
    t.lume_ok(&["run", "deb", "--detach"]);
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(t.home.vm_dir("deb").join("run.json")).unwrap(),
    )
    .unwrap();
    let published = state["published"].as_array().unwrap();
    assert!(
        published
            .iter()
            .any(|p| p.as_str().unwrap().starts_with("127.0.0.1:")
                && p.as_str().unwrap().ends_with(":22/tcp")),
        "{published:?}"
    );
    assert_eq!(wait_ssh(&t, "deb2"), "deb2");
    let d2 = t.get("deb2");
    assert_eq!(d2["network"]["parent"], "hbr0");
    assert!(
        d2["ipAddress"]
            .as_str()
            .is_some_and(|ip| ip.starts_with("198.51.100.")),
        "{d2}"
    );
    assert_ne!(
        host_key(&t.home, "deb2"),
        deb_key,
        "the clone has its own host key"
    );
    assert_eq!(wait_ssh(&t, "deb"), "deb");
    assert_eq!(host_key(&t.home, "deb"), deb_key);
    let out = ssh(
        &t,
        &[
            "deb",
            "--",
            "sudo",
            "cat",
            "/var/lib/cloud/data/instance-id",
        ],
    );
    assert_eq!(
        text(&out.stdout),
        format!("lume-{}", c1["vmId"].as_str().unwrap())
    );

    // A graceful stop over SSH with lume's key (the image runs no guest
    // agent): lume says which way it took.
    let out = t.host.lume(&t.home, &["stop", "deb2"]);
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{said}");
    assert!(said.contains("stopped over SSH"), "{said}");
    // Deleting the VM forgets its host key with it.
    t.lume_ok(&["delete", "deb2", "--force"]);
    assert!(!t.home.vm_dir("deb2").exists());

    // A memory snapshot (which freezes the disk at the same instant: the
    // image has no guest agent, so a live disk-only snapshot would be
    // refused): a file deleted after it is back after the restore, and the
    // guest resumes without a boot.
    let out = ssh(
        &t,
        &[
            "deb",
            "--",
            "echo precious | sudo tee /var/tmp/keep >/dev/null && sync && echo ok",
        ],
    );
    assert_eq!(text(&out.stdout), "ok", "{}", text(&out.stderr));
    t.lume_ok(&["snapshot", "create", "deb", "before", "--memory"]);
    let out = ssh(
        &t,
        &[
            "deb",
            "--",
            "sudo rm /var/tmp/keep && sync && ! test -e /var/tmp/keep && echo gone",
        ],
    );
    assert_eq!(text(&out.stdout), "gone", "{}", text(&out.stderr));
    t.lume_ok(&["snapshot", "restore", "deb", "before"]);
    assert_eq!(wait_ssh_run(&t, "deb", "cat /var/tmp/keep"), "precious");
    let console =
        std::fs::read_to_string(t.home.vm_dir("deb").join("console.log")).unwrap_or_default();
    assert!(
        !console.contains("Linux version"),
        "the restored guest booted again: {console}"
    );
    t.lume_ok(&["stop", "deb"]);

    // Shared directories, in an `--ephemeral` run: lume's cloud-init mounts
    // them at every boot (this one is not the first), a read-only one
    // readable and not writable even by the guest's root, a read-write one
    // whose writes reach the host.
    let before = disk_files(&t.home, "deb");
    let ro = t.home.path().join("roshare");
    let rw = t.home.path().join("rwshare");
    for d in [&ro, &rw] {
        std::fs::create_dir(d).unwrap();
    }
    std::fs::write(ro.join("hello"), "from-the-host\n").unwrap();
    let ro_arg = format!("{}:ro", ro.display());
    t.lume_ok(&[
        "run",
        "deb",
        "--detach",
        "--ephemeral",
        "--shared-dir",
        &ro_arg,
        "--shared-dir",
        rw.to_str().unwrap(),
    ]);
    let d = t.get("deb");
    let shares = d["sharedDirectories"].as_array().unwrap();
    assert_eq!(shares.len(), 2, "{d}");
    assert_eq!(shares[0]["hostPath"], ro.display().to_string());
    assert_eq!(shares[0]["readOnly"], true);
    assert_eq!(shares[0]["tag"], "lume0");
    assert_eq!(shares[1]["readOnly"], false);
    let vm_dir = t.home.vm_dir("deb");
    let daemons = common::virtiofsd_of(&vm_dir);
    assert!(!daemons.is_empty());
    // Their output goes through lume's capped pump (a pipe), never straight
    // into a file they could grow without end; no device nodes.
    for (pid, cmd) in &daemons {
        for fd in [1, 2] {
            let target = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap();
            assert!(
                target.to_string_lossy().starts_with("pipe:"),
                "{cmd}: fd {fd} is {target:?}"
            );
        }
        assert!(cmd.contains("modcaps=-mknod"), "{cmd}");
    }
    assert_eq!(
        wait_ssh_run(&t, "deb", "cat /mnt/shared/roshare/hello"),
        "from-the-host"
    );
    ssh_fails(&t, "sudo sh -c 'echo x > /mnt/shared/roshare/new'");
    ssh_fails(&t, "sudo rm /mnt/shared/roshare/hello");
    assert!(!ro.join("new").exists());
    assert!(
        ro.join("hello").exists(),
        "the guest removed a read-only file"
    );
    ssh_ok(
        &t,
        "sudo sh -c 'echo from-the-guest > /mnt/shared/rwshare/out'",
    );
    assert_eq!(
        std::fs::read_to_string(rw.join("out")).unwrap(),
        "from-the-guest\n"
    );
    // Guest root cannot leave device nodes on the host (virtiofsd runs
    // without CAP_MKNOD); a FIFO, which needs no privilege, still works.
    ssh_fails(&t, "sudo mknod /mnt/shared/rwshare/disk b 8 0");
    ssh_fails(&t, "sudo mknod /mnt/shared/rwshare/mem c 1 1");
    assert!(!rw.join("disk").exists() && !rw.join("mem").exists());
    ssh_ok(&t, "sudo mkfifo /mnt/shared/rwshare/fifo");
    assert!(rw.join("fifo").exists());
    // What the ephemeral run does to the disk is gone at the stop.
    ssh_ok(
        &t,
        "sudo rm /var/tmp/keep /etc/debian_version && sudo touch /etc/ephemeral && sync",
    );
    t.lume_ok(&["stop", "deb"]);
    assert!(
        common::virtiofsd_of(&vm_dir).is_empty(),
        "{:?}",
        common::virtiofsd_of(&vm_dir)
    );
    assert_eq!(t.get("deb")["sharedDirectories"], serde_json::json!([]));
    assert_eq!(disk_files(&t.home, "deb"), before);

    let out = ssh(&t, &["deb", "true"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("is not running"),
        "{}",
        text(&out.stderr)
    );
}

/// `lume ssh deb -- CMD`, which must succeed: its stdout.
fn ssh_ok(t: &Lan, cmd: &str) -> String {
    let out = ssh(t, &["deb", "--", cmd]);
    assert!(
        out.status.success(),
        "{cmd}: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// `lume ssh deb -- CMD`, which must fail (the guest refuses it).
fn ssh_fails(t: &Lan, cmd: &str) {
    assert!(
        !ssh(t, &["deb", "--", cmd]).status.success(),
        "{cmd} succeeded"
    );
}

/// Every file of the VM's disk (disk.img and its layers) with the SHA-256
/// of its content.
fn disk_files(home: &Home, name: &str) -> Vec<(String, String)> {
    let dir = home.vm_dir(name);
    let mut files = vec![dir.join("disk.img")];
    if let Ok(layers) = std::fs::read_dir(dir.join("snapshots")) {
        files.extend(layers.flatten().map(|e| e.path()));
    }
    files.sort();
    files
        .iter()
        .map(|f| {
            let out = Command::new("sha256sum").arg(f).output().unwrap();
            (
                f.display().to_string(),
                text(&out.stdout)
                    .split_whitespace()
                    .next()
                    .unwrap_or("")
                    .to_string(),
            )
        })
        .collect()
}
