//! `lume serve --mcp` driven by a real MCP client: the official MCP Python
//! SDK (mcp from PyPI, in a venv made by tests/clients/build.sh mcp), which
//! starts the server over stdio in a network namespace with a temporary
//! HOME, lists its tools, prompts and resources, makes bad calls, and drives
//! create → run → exec → stop → clone → delete on a real Debian 12 cloud
//! guest (tests/debian/build.sh; booted once, under TCG). A raw JSON-RPC
//! session checks that standard output carries nothing but the protocol.
//! Needs root (network namespaces) and the packages of scripts/install-deps.sh.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{Home, Lan, Netns};
use serde_json::{Value, json};

/// The schema of one tool's arguments: property names and required ones.
fn schema(tools: &Value, tool: &str) -> (Vec<String>, Vec<String>) {
    let s = &tools[tool]["inputSchema"];
    let mut props: Vec<String> = s["properties"]
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default();
    props.sort();
    let mut req: Vec<String> = s["required"]
        .as_array()
        .map(|a| a.iter().map(|v| v.as_str().unwrap().to_string()).collect())
        .unwrap_or_default();
    req.sort();
    (props, req)
}

fn has(props: &[String], names: &[&str]) -> bool {
    names.iter().all(|n| props.iter().any(|p| p == n))
}

/// What a call answered: (isError, text).
fn call<'a>(v: &'a Value, key: &str) -> (bool, &'a str) {
    let c = &v[key];
    assert!(c.is_object(), "no call {key} in {v}");
    (c["isError"].as_bool().unwrap(), c["text"].as_str().unwrap())
}

#[test]
fn the_official_python_sdk_drives_a_guest_through_lume_serve_mcp() {
    let image = common::debian_image();
    let python = common::client_python("mcp");
    let t = Lan::new("mc");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/mcp_session.py");
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &t.host.name])
        .arg(&python)
        .arg(&script)
        .arg(common::lume_bin())
        .arg(&image)
        .arg("agent");
    t.home.env(&mut c);
    let v = common::session_result(&c.output().unwrap());

    // lume's tools with lume's names and argument names, and ours.
    assert_eq!(v["server"]["name"], "lume");
    let tools = &v["tools"];
    let mut names: Vec<&str> = tools
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "lume_clone_vm",
            "lume_create_vm",
            "lume_delete_vm",
            "lume_exec",
            "lume_get_vm",
            "lume_list_vms",
            "lume_network_doctor",
            "lume_network_interfaces",
            "lume_pull",
            "lume_push",
            "lume_resize_disk",
            "lume_run_vm",
            "lume_snapshot_create",
            "lume_snapshot_delete",
            "lume_snapshot_flatten",
            "lume_snapshot_list",
            "lume_snapshot_restore",
            "lume_stop_vm",
        ]
    );
    for (tool, props, required) in [
        ("lume_list_vms", &["storage"][..], &[][..]),
        ("lume_get_vm", &["name", "storage"], &["name"]),
        (
            "lume_create_vm",
            &[
                "name",
                "cpu",
                "memory",
                "disk_size",
                "storage",
                "image",
                "network",
                "allow_out",
                "deny_out",
                "isolate",
            ],
            &["name"],
        ),
        (
            "lume_run_vm",
            &[
                "name",
                "shared_dir",
                "no_display",
                "storage",
                "allow_out",
                "deny_out",
                "isolate",
            ],
            &["name"],
        ),
        ("lume_stop_vm", &["name", "storage"], &["name"]),
        (
            "lume_clone_vm",
            &["name", "new_name"],
            &["name", "new_name"],
        ),
        ("lume_delete_vm", &["name", "storage"], &["name"]),
        (
            "lume_exec",
            &["name", "command", "user", "password", "storage", "timeout"],
            &["command", "name"],
        ),
        (
            "lume_resize_disk",
            &[
                "name",
                "disk_size",
                "storage",
                "no_backup",
                "keep_backup",
                "dry_run",
            ],
            &["disk_size", "name"],
        ),
    ] {
        let (p, r) = schema(tools, tool);
        assert!(has(&p, props), "{tool}: properties {p:?}");
        assert_eq!(r, required, "{tool}: required");
        for prop in &p {
            let d = tools[tool]["inputSchema"]["properties"][prop]["description"]
                .as_str()
                .unwrap_or("");
            assert!(!d.is_empty(), "{tool}.{prop} has no description");
        }
        assert!(
            !tools[tool]["description"].as_str().unwrap().is_empty(),
            "{tool}"
        );
    }
    assert_eq!(
        tools["lume_create_vm"]["inputSchema"]["properties"]["cpu"]["type"],
        json!(["integer", "string", "null"])
    );
    assert_eq!(
        tools["lume_create_vm"]["inputSchema"]["properties"]["cpu"]["minimum"],
        1
    );

    // lume's prompts and resources, for Linux guests.
    assert_eq!(v["prompts"]["create-sandbox"], json!(["name"]));
    assert_eq!(
        v["prompts"]["run-in-sandbox"],
        json!(["vm_name", "command"])
    );
    assert_eq!(
        v["prompts"]["reset-sandbox"],
        json!(["golden_image", "sandbox_name"])
    );
    assert!(
        v["prompt_text"]
            .as_str()
            .unwrap()
            .contains("Run this command in the 'agent' VM")
    );
    assert_eq!(
        v["resources"],
        json!(["lume://credentials", "lume://usage-guide"])
    );
    assert!(
        v["credentials"]
            .as_str()
            .unwrap()
            .contains("Username: lume")
    );

    // Bad calls are error results with the CLI's words; the session went on.
    let bad = &v["bad"];
    for key in bad.as_object().unwrap().keys() {
        assert!(call(bad, key).0, "{key} should be an error result: {bad}");
    }
    assert!(
        call(bad, "get_missing")
            .1
            .starts_with("Error: VM 'no-such-vm' does not exist"),
        "{bad}"
    );
    assert!(
        call(bad, "bad_name")
            .1
            .starts_with("Error: Argument name: Invalid VM name '../etc'")
    );
    assert_eq!(
        call(bad, "missing_arg").1,
        "Error: Invalid arguments for lume_get_vm: missing field `name`; see the tool's input schema (tools/list)"
    );
    assert!(
        call(bad, "wrong_type").1.starts_with(
            "Error: Invalid arguments for lume_create_vm: cpu: expected a whole number such as 2, got the string \"many\""
        ),
        "{bad}"
    );
    assert!(
        call(bad, "bad_size")
            .1
            .starts_with("Error: Argument memory: Invalid size 'lots'")
    );
    assert!(
        call(bad, "cpu_zero")
            .1
            .contains("cpu: must be at least 1, got 0")
    );
    assert!(
        call(bad, "relative_image")
            .1
            .contains("not an absolute path")
    );
    assert!(
        call(bad, "ipsw")
            .1
            .contains("ipsw is not supported by lume on Linux")
    );
    assert!(
        call(bad, "shared_dir")
            .1
            .contains("Argument shared_dir 'tmp' is not an absolute path")
    );
    assert!(call(bad, "run_missing").1.contains("does not exist"));
    assert!(call(bad, "exec_missing").1.contains("does not exist"));
    assert!(
        call(bad, "unknown_tool")
            .1
            .contains("Unknown tool: lume_frobnicate")
    );

    // create → run → exec → stop → clone → delete on the guest.
    let flow = &v["flow"];
    assert_eq!(call(flow, "list_before"), (false, "[]"));
    let (err, text) = call(flow, "create");
    assert!(!err, "{text}");
    assert!(text.contains("VM 'agent' created: 2 CPUs"), "{text}");
    let got: Value = serde_json::from_str(call(flow, "get").1).unwrap();
    assert_eq!(got["name"], "agent");
    assert_eq!(got["status"], "stopped");
    assert_eq!(got["networkMode"], "nat");
    let (err, text) = call(flow, "exec_stopped");
    assert!(
        err && text.contains("VM 'agent' is not running: start it with lume_run_vm"),
        "{text}"
    );
    let (err, text) = call(flow, "run");
    assert!(!err, "{text}");
    assert!(text.contains("VM 'agent' is running"), "{text}");
    assert!(
        text.contains("Stop it with lume_stop_vm") && !text.contains("`lume stop"),
        "{text}"
    );
    // A refused run sends no progress note first.
    let (err, text) = call(flow, "run_again");
    assert!(err, "{text}");
    assert_eq!(flow["run_again"]["progress"], json!([]), "{flow}");
    let (err, text) = call(flow, "clone_running");
    assert!(
        err && text.contains("stop it with lume_stop_vm before cloning"),
        "{text}"
    );

    let (err, text) = call(flow, "exec");
    assert!(!err, "{text}");
    // Progress notifications: exec says that it waits for
    // SSH (the guest was still booting), then that it runs the command.
    let said = |key: &str| -> Vec<String> {
        flow[key]["progress"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["message"].as_str().unwrap_or("").to_string())
            .collect()
    };
    let waits = said("exec");
    assert!(
        waits[0].starts_with("Waiting for VM 'agent' to answer SSH"),
        "{waits:?}"
    );
    assert_eq!(
        waits.last().map(String::as_str),
        Some("Running the command in VM 'agent'")
    );
    let r: Value = serde_json::from_str(text).unwrap();
    assert_eq!(r["exit_status"], 0, "{r}");
    assert_eq!(r["stdout"], "agent\nlume\n", "hostname and user: {r}");
    assert_eq!(r["stderr"], "oops\n", "{r}");
    assert_eq!(r["timed_out"], false);
    let (err, text) = call(flow, "exec_fails");
    assert!(err, "a failing command is an error result: {text}");
    let r: Value = serde_json::from_str(text).unwrap();
    assert_eq!(
        (&r["exit_status"], &r["stdout"], &r["stderr"]),
        (&json!(3), &json!("out\n"), &json!("err\n"))
    );
    let (err, text) = call(flow, "exec_timeout");
    assert!(err, "{text}");
    let r: Value = serde_json::from_str(text).unwrap();
    assert_eq!(
        (&r["exit_status"], &r["timed_out"]),
        (&json!(124), &json!(true))
    );

    // No password unless asked for (review finding: user lume/password
    // lume, with sudo, reachable by any local user in user mode).
    let (err, text) = call(flow, "password");
    assert!(!err, "{text}");
    let r: Value = serde_json::from_str(text).unwrap();
    let status = r["stdout"].as_str().unwrap().split_whitespace().nth(1);
    assert!(matches!(status, Some("L" | "NP")), "{text}");
    // Control bytes reach the client as U+FFFD, not as \u0000 escapes.
    let (err, text) = call(flow, "control_bytes");
    assert!(!err, "{text}");
    let r: Value = serde_json::from_str(text).unwrap();
    assert_eq!(r["stdout"], "a\u{FFFD}b\u{FFFD}c", "{text}");
    // A cancelled command: ssh gone at once, the command gone in the guest
    // by its timeout, and it never stood on ssh's command line.
    assert_eq!(
        flow["cancel_finished"], false,
        "{}",
        flow["cancel_finished"]
    );
    let seen = flow["cancel_ssh_cmdlines"].as_array().unwrap();
    assert!(!seen.is_empty(), "no ssh seen for the command");
    for line in seen {
        let line = line.as_str().unwrap();
        assert!(
            !line.contains("sleep 300"),
            "the command is visible in ps: {line}"
        );
        assert!(line.contains("timeout -s KILL 17 sh -c"), "{line}");
    }
    assert_eq!(
        flow["cancel_ssh_left"],
        json!([]),
        "ssh still runs after the cancel"
    );
    // Review finding: a server killed by SIGKILL left its exec's ssh.
    let k = &flow["killed_server_ssh_left"];
    assert_eq!(
        (&k["seen"], &k["killed"]),
        (&json!(true), &json!(true)),
        "{k}"
    );
    assert_eq!(k["left"], json!([]), "ssh outlived its SIGKILLed server");
    let (err, text) = call(flow, "cancel_guest");
    assert!(!err, "{text}");
    let r: Value = serde_json::from_str(text).unwrap();
    assert_eq!(
        r["stdout"], "dead\n",
        "the cancelled command still runs in the guest: {text}"
    );

    let (err, text) = call(flow, "resize_running");
    assert!(err && text.contains("is running"), "{text}");
    let (err, text) = call(flow, "stop");
    assert!(!err && text.contains("VM 'agent' stopped"), "{text}");
    let (err, text) = call(flow, "resize");
    assert!(!err && text.contains("disk resized to 4.0GB"), "{text}");
    let (err, text) = call(flow, "shrink");
    assert!(err && text.contains("can only grow"), "{text}");
    let (err, text) = call(flow, "clone");
    assert!(
        !err && text.contains("VM 'agent-c' created as a clone"),
        "{text}"
    );
    let listed: Value = serde_json::from_str(call(flow, "list_after_clone").1).unwrap();
    let listed: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ["agent", "agent-c"]);
    assert_eq!(call(flow, "delete_clone"), (false, "VM 'agent-c' deleted"));
    assert_eq!(call(flow, "delete"), (false, "VM 'agent' deleted"));
    assert_eq!(call(flow, "list_end"), (false, "[]"));
    let ifs: Value = serde_json::from_str(call(flow, "interfaces").1).unwrap();
    assert!(
        ifs.as_array().unwrap().iter().any(|i| i["name"] == "up0"),
        "{ifs}"
    );
    // What the CLI sees agrees.
    assert!(!t.home.vm_dir("agent").exists());
    assert!(!t.home.vm_dir("agent-c").exists());
}

/// Reads one JSON-RPC message from the server's standard output; every
/// line there must be one.
fn next_message(out: &mut impl BufRead) -> Value {
    let mut line = String::new();
    assert!(
        out.read_line(&mut line).unwrap() > 0,
        "server closed stdout"
    );
    serde_json::from_str(&line)
        .unwrap_or_else(|e| panic!("stdout line is not JSON-RPC ({e}): {line:?}"))
}

#[test]
fn stdout_carries_only_json_rpc_and_host_files_are_opened_as_the_caller() {
    let ns = Netns::new("mcr");
    let home = Home::new();
    // A kernel only root can read: `nobody` running the server must not
    // get lume to copy it into a VM.
    let secret = home.path().join("root-only-kernel");
    std::fs::write(&secret, b"not for nobody").unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let nobody_home = tempfile::Builder::new()
        .prefix("lume-mcp-nobody-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(
        nobody_home.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    std::fs::set_permissions(
        home.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name, "setpriv"])
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(common::lume_bin())
        .args(["serve", "--mcp"])
        .env("HOME", nobody_home.path())
        .env("XDG_CONFIG_HOME", nobody_home.path().join(".config"))
        .env("LUME_ACCEL", "tcg")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut send = move |v: Value| {
        writeln!(stdin, "{v}").unwrap();
        stdin.flush().unwrap();
    };
    send(
        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "raw", "version": "0"}}}),
    );
    let init = next_message(&mut stdout);
    assert_eq!(init["id"], 1);
    assert_eq!(init["result"]["serverInfo"]["name"], "lume", "{init}");
    // The protocol has its own copies of stdin/stdout: fd 0 is /dev/null
    // and fd 1 is stderr, for every child the server starts and any stray
    // print.
    let fd = |n: u32| std::fs::read_link(format!("/proc/{pid}/fd/{n}")).unwrap();
    assert_eq!(fd(0), PathBuf::from("/dev/null"));
    assert_eq!(fd(1), fd(2));
    send(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
    send(
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
        "name": "lume_create_vm",
        "arguments": {"name": "stolen", "kernel": secret.display().to_string(), "network": "none"}}}),
    );
    let r = next_message(&mut stdout);
    assert_eq!(r["id"], 2, "{r}");
    assert_eq!(r["result"]["isError"], true, "{r}");
    let text = r["result"]["content"][0]["text"].as_str().unwrap();
    assert!(
        text.contains("the caller (uid 65534) lacks permission to read it"),
        "{text}"
    );
    assert!(!nobody_home.path().join(".lume/stolen").exists());
    // Without root, a VM created without `network` gets network user,
    // which it can run (nat would be refused at lume_run_vm).
    send(
        json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {
        "name": "lume_create_vm", "arguments": {"name": "mine", "disk_size": 1}}}),
    );
    let r = next_message(&mut stdout);
    assert_eq!(r["id"], 3, "{r}");
    let text = r["result"]["content"][0]["text"].as_str().unwrap();
    assert!(
        r["result"]["isError"] == false && text.contains("1.0GB disk, network user"),
        "{r}"
    );
    // A call that logs on the way (create's notes) leaves stdout clean too.
    send(
        json!({"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {
        "name": "lume_list_vms", "arguments": {}}}),
    );
    let r = next_message(&mut stdout);
    assert_eq!(r["id"], 4, "{r}");
    let listed: Value =
        serde_json::from_str(r["result"]["content"][0]["text"].as_str().unwrap()).unwrap();
    assert_eq!(listed[0]["name"], "mine", "{r}");
    assert_eq!(listed[0]["networkMode"], "user", "{r}");
    assert_eq!(listed.as_array().unwrap().len(), 1, "{r}");
    drop(send);
    // End of input ends the session and the server.
    let status = child.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    assert!(rest.trim().is_empty(), "stdout after the session: {rest:?}");
    assert!(status.success(), "{status}");
}

/// An HTTP server in `ns` (on its loopback) that announces a 10 GB image
/// and sends 512 bytes a second of it: a download that never ends.
fn trickling_server(ns: &Netns) -> u16 {
    let listener = ns.within(|| std::net::TcpListener::bind("127.0.0.1:0").unwrap());
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { break };
            std::thread::spawn(move || {
                let mut req = [0u8; 4096];
                let _ = std::io::Read::read(&mut s, &mut req);
                let head = "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 10000000000\r\n\r\n";
                if s.write_all(head.as_bytes()).is_err() {
                    return;
                }
                while s.write_all(&[0u8; 512]).is_ok() {
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
            });
        }
    });
    port
}

/// Review finding: after the client closed the session (or on SIGTERM) the
/// server went on with an endless image download, and its hidden
/// `.creating-…` work directory stayed. Now it exits within seconds and
/// removes it.
#[test]
fn the_session_end_ends_the_server_and_removes_unfinished_creates() {
    let ns = Netns::new("mce");
    let port = trickling_server(&ns);
    for by_signal in [false, true] {
        let home = Home::new();
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &ns.name])
            .arg(common::lume_bin())
            .args(["serve", "--mcp"]);
        home.env(&mut c);
        let mut child = c
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut send = |v: Value| {
            writeln!(stdin, "{v}").unwrap();
            stdin.flush().unwrap();
        };
        send(
            json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "raw", "version": "0"}}}),
        );
        assert_eq!(next_message(&mut stdout)["id"], 1);
        send(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
        send(
            json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
            "name": "lume_create_vm",
            "arguments": {"name": "slowvm", "network": "none",
                "image": format!("http://127.0.0.1:{port}/slow.qcow2")}}}),
        );
        let storage = home.storage();
        let creating = || {
            std::fs::read_dir(&storage)
                .map(|d| {
                    d.flatten().any(|e| {
                        e.file_name()
                            .to_string_lossy()
                            .starts_with(".creating-slowvm-")
                    })
                })
                .unwrap_or(false)
        };
        common::wait_for(
            "the create's work directory",
            std::time::Duration::from_secs(60),
            || creating().then_some(()),
        );
        if by_signal {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            )
            .unwrap();
        } else {
            drop(stdin);
        }
        // Bounded: without the fix the server never exits.
        let exited = common::wait_for(
            "the server to exit",
            std::time::Duration::from_secs(30),
            || child.try_wait().unwrap(),
        );
        assert!(
            !creating(),
            "a .creating-slowvm-… directory was left (by_signal {by_signal}, {exited})"
        );
        assert!(!storage.join("slowvm").exists());
    }
}
