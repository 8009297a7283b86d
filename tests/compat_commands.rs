//! lume's compatibility suite, command line: every command and option of
//! upstream lume 0.5.3's `src/Commands/*.swift`, one test per file there,
//! showing the same shape here or the documented refusal (exit status 64,
//! lume's EX_USAGE, naming the option and why). docs/compatibility.md is
//! the table these tests keep true. Nothing here boots a VM.

mod common;

use std::io::Write as _;
use std::process::{Output, Stdio};

use common::Home;
use serde_json::Value;

/// lume's exit status for usage and validation errors (EX_USAGE).
const EX_USAGE: i32 = 64;

fn small(home: &Home, name: &str) {
    home.ok(&[
        "create",
        name,
        "--memory",
        "256MB",
        "--disk-size",
        "16MB",
        "--network",
        "none",
    ]);
}

/// Runs lume with `input` on its standard input (a pipe).
fn with_stdin(home: &Home, args: &[&str], input: &str) -> Output {
    let mut child = home
        .cmd()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// Asserts that `args` is refused as a usage error naming `option`, and
/// returns the message.
fn refused(home: &Home, args: &[&str], option: &str) -> String {
    let out = home.lume(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(EX_USAGE), "lume {args:?}: {err}");
    assert!(
        err.contains(&format!("{option} is not supported by lume on Linux")),
        "lume {args:?}: {err}"
    );
    err
}

fn help(home: &Home, command: &str) -> String {
    home.ok(&[command, "--help"])
}

#[test]
fn create_follows_create_swift() {
    let home = Home::new();
    // lume's options: --os --cpu --memory --disk-size --display --network
    // --storage, and --no-display (accepted: creating opens no display).
    let storage = home.path().join("vms");
    home.ok(&[
        "create",
        "a",
        "--os",
        "linux",
        "--cpu",
        "1",
        "--memory",
        "8GB",
        "--disk-size",
        "16MB",
        "--display",
        "1280x800",
        "--network",
        "bridged:eth0",
        "--storage",
        storage.to_str().unwrap(),
        "--no-display",
    ]);
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(storage.join("a/config.json")).unwrap())
            .unwrap();
    assert_eq!(
        (
            &cfg["os"],
            &cfg["cpuCount"],
            &cfg["memorySize"],
            &cfg["display"],
            &cfg["networkMode"]
        ),
        (
            &Value::from("linux"),
            &Value::from(1),
            &Value::from(8u64 << 30),
            &Value::from("1280x800"),
            &Value::from("bridged:eth0")
        )
    );
    // --display is WIDTHxHEIGHT (VMDisplayResolution), a usage error otherwise.
    for bad in ["1024", "1024x", "0x768", "widexhigh"] {
        let out = home.lume(&["create", "b", "--display", bad]);
        assert_eq!(out.status.code(), Some(EX_USAGE), "{bad}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("give WIDTHxHEIGHT"),
            "{out:?}"
        );
    }
    // macOS-only options are refused by name, before anything is made.
    for (args, option) in [
        (vec!["--ipsw", "latest"], "--ipsw"),
        (vec!["--unattended", "sequoia"], "--unattended"),
        (vec!["--debug"], "--debug"),
        (vec!["--debug-dir", "/tmp"], "--debug-dir"),
        (vec!["--vnc-port", "5900"], "--vnc-port"),
    ] {
        let mut all = vec!["create", "b", "--disk-size", "16MB"];
        all.extend(args);
        let err = refused(&home, &all, option);
        assert!(err.contains("macOS guests"), "{err}");
    }
    // --os macOS: refused too (as an action error: it needs an Apple host).
    // Status 64 as every refusal.
    let out = home.lume(&["create", "b", "--os", "macOS", "--disk-size", "16MB"]);
    assert_eq!(out.status.code(), Some(EX_USAGE), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Apple host"), "{err}");
    assert!(!home.vm_dir("b").exists());
}

#[test]
fn run_follows_run_swift() {
    let home = Home::new();
    // -d is lume's --no-display; --detach has no short form.
    let text = help(&home, "run");
    assert!(text.contains("-d, --no-display"), "{text}");
    assert!(text.contains("    --detach"), "{text}");
    // Accepted: they reach the VM lookup (a missing VM is the error).
    for args in [
        vec!["run", "ghost", "-d"],
        vec!["run", "ghost", "--no-display"],
        vec!["run", "ghost", "--display", "none"],
        vec!["run", "ghost", "--display", "vnc"],
        vec!["run", "ghost", "--display", "native"],
        vec!["run", "ghost", "--vnc-port", "5900", "--vnc-password", "x"],
        vec!["run", "ghost", "--usb-storage", "/tmp/u.img"],
        vec![
            "run",
            "ghost",
            "--shared-dir",
            "/tmp:ro",
            "--shared-dir",
            "/srv",
        ],
        vec!["run", "ghost", "--recovery-mode", "false"],
        vec!["run", "ghost", "--mount", "/x.iso", "--disk", "/y.img"],
        vec!["run", "ghost", "--network", "nat"],
        // Used when the name is an image NAME:TAG (tests/e2e_registry.rs).
        vec![
            "run",
            "ghost",
            "--registry",
            "ghcr.io",
            "--organization",
            "trycua",
        ],
    ] {
        let err = home.fails(&args);
        assert!(err.contains("VM 'ghost' does not exist"), "{args:?}: {err}");
    }
    // Refused by name, before the VM is looked at.
    small(&home, "r");
    for (args, option) in [
        (vec!["--log-file", "/tmp/l"], "--log-file"),
        (vec!["--recovery-mode", "true"], "--recovery-mode"),
        (vec!["--disk-path", "/tmp/d.img"], "--disk-path"),
        (vec!["--nvram-path", "/tmp/n.bin"], "--nvram-path"),
        (vec!["--clipboard"], "--clipboard"),
    ] {
        let mut all = vec!["run", "r"];
        all.extend(args);
        refused(&home, &all, option);
    }
    assert_eq!(home.get("r")["status"], "stopped");
    // --display takes lume's three viewers only.
    let out = home.lume(&["run", "r", "--display", "sdl"]);
    assert_eq!(out.status.code(), Some(EX_USAGE));
    // --shared-dir takes lume's PATH[:ro|:rw] only.
    let out = home.lume(&["run", "r", "--shared-dir", "/tmp:rx"]);
    assert_eq!(out.status.code(), Some(EX_USAGE));
    // `attach` (Attach.swift): a stopped VM has no display to attach to.
    let err = home.fails(&["attach", "r"]);
    assert!(err.contains("VM 'r' is not running"), "{err}");
    let err = home.fails(&["attach", "ghost", "--display", "vnc"]);
    assert!(err.contains("VM 'ghost' does not exist"), "{err}");
}

#[test]
fn stop_follows_stop_swift() {
    let home = Home::new();
    small(&home, "s");
    // As lume: stopping a VM that is not running is an error.
    let out = home.lume(&["stop", "s"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("VM 's' is not running"), "{err}");
    let storage = home.storage();
    let out = home.lume(&["stop", "s", "--storage", storage.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn delete_follows_delete_swift() {
    let home = Home::new();
    small(&home, "d");
    let question = "Are you sure you want to delete the virtual machine 'd'? [y/N] ";
    // Any answer but y/yes: "Deletion cancelled", status 0, nothing
    // deleted; as lume, on the question's line (a piped answer is not echoed).
    for answer in ["n\n", "\n", "", "nope\n"] {
        let out = with_stdin(&home, &["delete", "d"], answer);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{answer:?}: {out:?}");
        assert_eq!(
            text,
            format!("{question}Deletion cancelled\n"),
            "{answer:?}"
        );
        assert!(home.vm_dir("d").exists());
    }
    // A VM that is nowhere: an error before any question.
    let out = with_stdin(&home, &["delete", "nowhere"], "y\n");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    // `echo y | lume delete d` deletes, as in lume.
    let out = with_stdin(&home, &["delete", "d"], "y\n");
    assert!(out.status.success(), "{out:?}");
    assert!(!home.vm_dir("d").exists());
    small(&home, "e");
    let out = with_stdin(&home, &["delete", "e"], "YES\n");
    assert!(out.status.success(), "{out:?}");
    assert!(!home.vm_dir("e").exists());
    // --force asks nothing.
    small(&home, "f");
    let out = home.ok(&["delete", "f", "--force"]);
    assert!(!out.contains("Are you sure"), "{out}");
    assert!(!home.vm_dir("f").exists());
}

#[test]
fn get_follows_get_swift() {
    let home = Home::new();
    small(&home, "g");
    // -f json and --format json: a one-element array, as lume prints it.
    for args in [["get", "g", "-f", "json"], ["get", "g", "--format", "json"]] {
        let v: Value = serde_json::from_str(&home.ok(&args)).unwrap();
        let all = v.as_array().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0]["name"], "g");
    }
    // text: lume's table (header and one row), then what we add.
    let text = home.ok(&["get", "g", "-f", "text"]);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("name "), "{text}");
    assert!(lines[1].starts_with("g "), "{text}");
    assert!(
        lines[2..].iter().any(|l| l.starts_with("mac address: ")),
        "{text}"
    );
    let out = home.lume(&["get", "g", "-f", "yaml"]);
    assert_eq!(out.status.code(), Some(EX_USAGE));
}

#[test]
fn list_follows_list_swift() {
    let home = Home::new();
    // An empty list says what lume says.
    assert_eq!(home.ok(&["ls"]), "No virtual machines found\n");
    let empty = home.path().join("empty");
    assert_eq!(
        home.ok(&["ls", "--storage", empty.to_str().unwrap()]),
        format!(
            "No virtual machines found in storage '{}'\n",
            empty.display()
        )
    );
    assert_eq!(home.ok(&["ls", "-f", "json"]).trim(), "[]");
    small(&home, "l");
    let v: Value = serde_json::from_str(&home.ok(&["ls", "--format", "json"])).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1);
    let table = home.ok(&["ls"]);
    assert!(table.lines().nth(1).unwrap().starts_with("l "), "{table}");
}

#[test]
fn set_follows_set_swift() {
    let home = Home::new();
    small(&home, "s");
    home.ok(&[
        "set",
        "s",
        "--cpu",
        "3",
        "--memory",
        "512MB",
        "--disk-size",
        "32MB",
        "--display",
        "1920x1080",
    ]);
    let d = home.get("s");
    assert_eq!(d["cpuCount"], 3);
    assert_eq!(d["memorySize"], 512 << 20);
    assert_eq!(d["diskSize"]["total"], 32 << 20);
    assert_eq!(d["display"], "1920x1080");
    // Nothing to change succeeds and changes nothing, as in lume.
    let before = std::fs::read(home.vm_dir("s").join("config.json")).unwrap();
    assert_eq!(home.ok(&["set", "s"]), "VM 's': nothing to change\n");
    assert!(
        home.fails(&["set", "ghost"])
            .contains("VM 'ghost' does not exist")
    );
    assert_eq!(
        std::fs::read(home.vm_dir("s").join("config.json")).unwrap(),
        before
    );
    let out = home.lume(&["set", "s", "--display", "big"]);
    assert_eq!(out.status.code(), Some(EX_USAGE));
    for option in ["--no-backup", "--keep-backup", "--dry-run"] {
        refused(&home, &["set", "s", "--disk-size", "64MB", option], option);
    }
    assert_eq!(home.get("s")["diskSize"]["total"], 32 << 20);
}

#[test]
fn clone_follows_clone_swift() {
    let home = Home::new();
    small(&home, "src");
    home.ok(&["clone", "src", "dst"]);
    assert_eq!(home.get("dst")["cpuCount"], home.get("src")["cpuCount"]);
}

#[test]
fn guest_power_and_ssh_follow_guest_power_swift_and_ssh_swift() {
    let home = Home::new();
    small(&home, "p");
    // lume's options parse; the VM is not running, which is the error.
    for args in [
        vec!["shutdown", "p", "-u", "lume", "-p", "lume", "-t", "5"],
        vec![
            "restart",
            "p",
            "--user",
            "u",
            "--password",
            "x",
            "--timeout",
            "5",
        ],
        vec!["ssh", "p", "-u", "lume", "-p", "lume", "-t", "5", "true"],
    ] {
        let err = home.fails(&args);
        assert!(err.contains("is not running"), "{args:?}: {err}");
    }
}

#[test]
fn serve_follows_serve_swift() {
    let home = Home::new();
    let text = help(&home, "serve");
    assert!(text.contains("--port <PORT>"), "{text}");
    // `--mcp` serves MCP on stdin/stdout (tests/e2e_mcp.rs): with stdin
    // closed at once it ends cleanly, having written nothing on stdout.
    let out = home.lume(&["serve", "--mcp"]);
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
}

#[test]
fn lume_commands_that_are_not_here_are_refused_with_the_reason() {
    let home = Home::new();
    for (command, why) in [
        ("ipsw", "macOS guests"),
        ("setup", "macOS guests"),
        ("sip", "macOS guests"),
        ("convert", "not yet implemented"),
        ("logs", "GET /lume/logs"),
        ("check-update", "package manager"),
        ("update", "package manager"),
        ("dump-docs", "/openapi.json"),
    ] {
        let out = home.lume(&[command, "some", "--args"]);
        assert_eq!(out.status.code(), Some(EX_USAGE), "{command}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("`lume {command}` is not available")) && err.contains(why),
            "{command}: {err}"
        );
    }
}

#[test]
fn usage_errors_exit_with_lumes_status() {
    let home = Home::new();
    for args in [
        vec!["create"],
        vec!["create", "x", "--cpu", "many"],
        vec!["ls", "--bogus"],
        vec!["no-such-command"],
    ] {
        assert_eq!(home.lume(&args).status.code(), Some(EX_USAGE), "{args:?}");
    }
    assert_eq!(home.lume(&["--help"]).status.code(), Some(0));
    // A command group alone prints its help and succeeds, as lume's root.
    let bare = home.lume(&[]);
    assert_eq!(bare.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&bare.stdout).contains("Usage: lume <COMMAND>"));
    assert_eq!(home.lume(&["--version"]).status.code(), Some(0));
}
