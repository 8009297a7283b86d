//! The HTTP API against a real `lume serve` in a network namespace, with a
//! temporary HOME: the lifecycle of a real guest through the API and the CLI
//! together, every error status, the token rule, who is served (other uids
//! through `setpriv`, the Unix socket, VM helpers), the OpenAPI document.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};

use serde_json::{Value, json};

use common::api::{Api, Reply, Server};
use common::{Home, Netns, guest, lume_bin, wait_console, wait_for};

fn cli_json(ns: &Netns, home: &Home, args: &[&str]) -> Value {
    serde_json::from_str(&ns.lume_ok(home, args)).unwrap()
}

/// QEMU processes of VMs under `home`.
fn qemu_count(home: &Home, vm: &str) -> usize {
    let dir = home.vm_dir(vm).display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.starts_with("qemu-system") || c.contains("/qemu-system"))
        .filter(|c| c.contains(&dir))
        .count()
}

#[test]
fn a_real_vm_through_the_api_and_the_cli() {
    let home = Home::new();
    home.write_settings("userSubnet: 198.51.100.0/24\n");
    let ns = Netns::new("ap");
    let g = guest();
    let server = Server::start(&ns, &home, &[], &[]);
    let api = Api::new(&ns, &server);

    let status = api.get("/lume/host/status");
    assert_eq!(status.status, 200);
    assert_eq!(status.body["status"], "healthy");
    assert_eq!(status.body["vm_count"], 0);
    assert_eq!(status.body["total_vms"], 0);

    let created = api.post(
        "/lume/vms",
        json!({
            "name": "web", "os": "linux", "cpu": 1, "memory": "256MB", "diskSize": "64MB",
            "network": "user", "kernel": g.kernel, "initrd": g.initrd, "cmdline": g.cmdline,
            "publish": ["127.0.0.1:18090:80"],
        }),
    );
    // lume's answer: 202 {message, name, status}.
    assert_eq!(created.status, 202, "{created:?}");
    assert_eq!(
        created.body,
        json!({"message": "VM created", "name": "web", "status": "stopped"})
    );
    let web = api.get("/lume/vms/web").body;
    assert_eq!(web["networkMode"], "user");
    assert_eq!(web["memorySize"], 256 << 20);
    // The CLI sees exactly what the API reports (`get -f json` in lume's
    // one-element array).
    assert_eq!(
        cli_json(&ns, &home, &["get", "web", "-f", "json"]),
        json!([web])
    );
    assert_eq!(
        cli_json(&ns, &home, &["ls", "-f", "json"]),
        api.get("/lume/vms").body
    );

    // Two runs at once: one starts the VM, the other is told it runs.
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| api.post("/lume/vms/web/run", json!({})));
        let b = s.spawn(|| api.call("POST", "/lume/vms/web/run", None));
        (a.join().unwrap(), b.join().unwrap())
    });
    let (started, refused) = if a.status == 202 { (a, b) } else { (b, a) };
    // lume's answer, but only once the VM runs.
    assert_eq!(started.status, 202, "{started:?}");
    assert_eq!(
        started.body,
        json!({"message": "VM started", "name": "web", "status": "running"})
    );
    assert_eq!(api.get("/lume/vms/web").body["ipAddress"], "198.51.100.15");
    api.fails(refused, 409, "already running");
    assert_eq!(qemu_count(&home, "web"), 1, "the VM runs once");
    // The server never forks its supervisors (the CLI does): it starts
    // lume again, `lume run web --storage …`.
    let sup = common::supervisor_cmdline(&home.vm_dir("web"));
    assert!(sup.contains("run web --storage"), "{sup}");
    let seen = cli_json(&ns, &home, &["get", "web", "-f", "json"])[0].clone();
    assert_eq!(seen["status"], "running");
    assert_eq!(seen["accelerator"], "tcg");

    wait_console(
        &home,
        "web",
        "LUME-GUEST: lease eth0 198.51.100.15",
        Duration::from_secs(180),
    );
    let page = wait_for("the guest's page on 18090", Duration::from_secs(30), || {
        ns.http_get("127.0.0.1:18090")
            .filter(|t| t.contains("lume-test-guest"))
    });
    assert!(
        page.contains(seen["macAddress"].as_str().unwrap()),
        "{page}"
    );

    // What a running VM refuses.
    api.fails(
        api.call("PATCH", "/lume/vms/web", Some(json!({"diskSize": "128MB"}))),
        409,
        "stop it before changing its disk",
    );
    api.fails(
        api.post("/lume/vms/clone", json!({"name": "web", "newName": "web2"})),
        409,
        "stop it before cloning",
    );
    let patched = api.call("PATCH", "/lume/vms/web", Some(json!({"cpu": 2})));
    assert_eq!(patched.status, 200, "{patched:?}");
    assert_eq!(
        patched.body,
        json!({"message": "VM settings updated successfully"})
    );
    assert_eq!(api.get("/lume/vms/web").body["cpuCount"], 2);

    // The VM outlives the server; a new server finds it running.
    assert!(server.stop().success());
    assert_eq!(
        cli_json(&ns, &home, &["get", "web", "-f", "json"])[0]["status"],
        "running"
    );
    let server = Server::start(&ns, &home, &[], &[]);
    let api = Api::new(&ns, &server);
    assert_eq!(api.get("/lume/vms/web").body["status"], "running");
    let status = api.get("/lume/host/status").body;
    assert_eq!(
        (status["vm_count"].clone(), status["total_vms"].clone()),
        (json!(1), json!(1))
    );
    let max = status["max_vms"].as_u64().unwrap();
    assert_eq!(status["available_slots"], max.saturating_sub(1));

    // No guest agent and no SSH way: no graceful reboot, unless forced.
    api.fails(
        api.post("/lume/vms/web/restart", json!({})),
        500,
        "cannot be restarted gracefully",
    );
    let reset = api.post("/lume/vms/web/restart", json!({"force": true}));
    assert_eq!(reset.status, 200, "{reset:?}");
    assert_eq!(reset.body, json!({"message": "VM restart requested"}));
    assert_eq!(reset.power_method.as_deref(), Some("reset"));
    wait_for("the guest to boot again", Duration::from_secs(120), || {
        let c = std::fs::read_to_string(home.vm_dir("web").join("console.log")).ok()?;
        (c.matches("LUME-GUEST: ready").count() >= 2).then_some(())
    });

    let stopped = api.post("/lume/vms/web/stop", json!({"timeout": 20}));
    assert_eq!(stopped.status, 200, "{stopped:?}");
    assert_eq!(stopped.body, json!({"message": "VM stopped successfully"}));
    assert_eq!(stopped.power_method.as_deref(), Some("acpi"));
    // As lume: stopping it again is an error (409 here, 400 in lume).
    api.fails(
        api.post("/lume/vms/web/stop", json!({})),
        409,
        "is not running",
    );
    api.fails(
        api.post("/lume/vms/web/shutdown", json!({})),
        409,
        "is not running",
    );
    assert_eq!(
        cli_json(&ns, &home, &["get", "web", "-f", "json"])[0]["status"],
        "stopped"
    );
    assert_eq!(
        ns.http_get("127.0.0.1:18090"),
        None,
        "port closed after stop"
    );
    assert_eq!(qemu_count(&home, "web"), 0);

    // The CLI starts and creates; the API sees it, clones and deletes.
    ns.lume_ok(&home, &["run", "web", "--detach"]);
    assert_eq!(api.get("/lume/vms/web").body["status"], "running");
    ns.lume_ok(
        &home,
        &["create", "plain", "--disk-size", "8MB", "--network", "none"],
    );
    let names: Vec<Value> = api
        .get("/lume/vms")
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].clone())
        .collect();
    assert_eq!(names, [json!("plain"), json!("web")]);
    let cloned = api.post(
        "/lume/vms/clone",
        json!({"name": "plain", "newName": "plain2"}),
    );
    assert_eq!(cloned.status, 200, "{cloned:?}");
    assert_eq!(
        cloned.body,
        json!({"message": "VM cloned successfully", "source": "plain", "destination": "plain2"})
    );
    assert_ne!(
        api.get("/lume/vms/plain2").body["macAddress"],
        api.get("/lume/vms/plain").body["macAddress"]
    );
    assert_eq!(
        cli_json(&ns, &home, &["get", "plain2", "-f", "json"])[0]["networkMode"],
        "none"
    );

    // Deleting a running VM stops it first.
    for vm in ["web", "plain", "plain2"] {
        let deleted = api.call("DELETE", &format!("/lume/vms/{vm}"), None);
        assert_eq!(deleted.status, 200, "{deleted:?}");
    }
    assert_eq!(qemu_count(&home, "web"), 0);
    assert_eq!(cli_json(&ns, &home, &["ls", "-f", "json"]), json!([]));
    api.fails(api.get("/lume/vms/web"), 404, "does not exist");
    assert!(server.stop().success());
}

#[test]
fn errors_are_json_with_the_right_status() {
    let home = Home::new();
    home.write_settings("userSubnet: 198.51.100.0/24\n");
    let ns = Netns::new("ae");
    let server = Server::start(&ns, &home, &[], &[]);
    let api = Api::new(&ns, &server);

    // 400: malformed JSON, missing or invalid fields.
    api.fails(
        api.raw("POST", "/lume/vms", b"{\"name\":"),
        400,
        "Malformed JSON",
    );
    api.fails(api.raw("POST", "/lume/vms", b""), 400, "body is empty");
    api.fails(
        api.post("/lume/vms", json!({})),
        400,
        "missing field `name`",
    );
    api.fails(
        api.post("/lume/vms", json!({"name": "../x"})),
        400,
        "Invalid VM name",
    );
    api.fails(api.get("/lume/vms/..%2Fx"), 400, "Invalid VM name '../x'");
    api.fails(api.get("/lume/vms/.hidden"), 400, "Invalid VM name");
    let bad = [
        (
            json!({"name": "a", "memory": "12XB"}),
            "Invalid size '12XB'",
        ),
        (
            json!({"name": "a", "diskSize": "lots"}),
            "Invalid size 'lots'",
        ),
        (json!({"name": "a", "cpu": "two"}), "invalid type"),
        // The request's field, not the CLI's --cpu.
        (
            json!({"name": "a", "cpu": 0}),
            r#"at least 1: send "cpu": 1 or more"#,
        ),
        (json!({"name": "a", "memory": "1MB"}), "too small"),
        (
            json!({"name": "a", "network": "wifi"}),
            "Unknown network mode 'wifi'",
        ),
        (json!({"name": "a", "publish": ["80"]}), "Invalid --publish"),
        (
            json!({"name": "a", "network": "none", "publish": ["8080:80"]}),
            "cannot be published",
        ),
        (
            json!({"name": "a", "macAddress": "01:00:00:00:00:01"}),
            "multicast",
        ),
        (
            json!({"name": "a", "networkPolicy": {"allowOut": ["10.0.0.1/8"]}}),
            "networkPolicy.allowOut[0]: Invalid network rule '10.0.0.1/8'",
        ),
        // The body's field and item, never the CLI's --allow-out.
        (
            json!({"name": "a", "networkPolicy": {"allowOut": ["198.51.100.2:80", "198.51.100.1:80,198.51.100.2"]}}),
            "networkPolicy.allowOut[1]: Invalid network rule '198.51.100.1:80,198.51.100.2': one rule per item: give each rule as its own item of networkPolicy.allowOut",
        ),
        (
            json!({"name": "a", "networkPolicy": {"denyOut": ["2001:db8::/32"]}}),
            "IPv6 rules are not supported",
        ),
        (
            json!({"name": "a", "networkPolicy": {"isolate": true, "allow": []}}),
            "unknown field",
        ),
        (
            json!({"name": "a", "network": "user", "networkPolicy": {"isolate": true}}),
            r#"cannot be enforced in network mode 'user': a networkPolicy works with "network": "nat", "host", "bridged" or "none""#,
        ),
        (
            json!({"name": "a", "kernel": "vmlinuz"}),
            "must be an absolute path",
        ),
        (
            json!({"name": "a", "kernel": "/nonexistent/vmlinuz"}),
            "does not exist",
        ),
        (
            json!({"name": "a", "os": "macOS"}),
            r#"Apple host: lume on Linux creates Linux VMs ("os": "linux")"#,
        ),
        (
            json!({"name": "a", "storage": "ssd"}),
            "Storage 'ssd' is neither a VM location name nor a path",
        ),
        (
            json!({"name": "a", "storage": "vms/ssd"}),
            "storage must be an absolute path",
        ),
    ];
    for (body, needle) in bad {
        let reply = api.post("/lume/vms", body);
        if let Some(m) = reply.body["message"].as_str()
            && m.contains("networkPolicy")
        {
            for flag in ["--allow-out", "--deny-out", "--isolate", "--network"] {
                assert!(!m.contains(flag), "a REST error names {flag}: {m}");
            }
        }
        api.fails(reply, 400, needle);
    }
    assert_eq!(api.get("/lume/vms").body, json!([]), "nothing was created");

    // A network policy through the API: saved, shown, refused for a mode
    // that cannot enforce it, cleared with {}.
    // A rule given twice is stored once.
    let created = api.post(
        "/lume/vms",
        json!({"name": "pol", "network": "nat",
               "networkPolicy": {"allowOut": ["198.51.100.2:8000/tcp", "198.51.100.2/32:8000/tcp"], "isolate": true}}),
    );
    assert_eq!(created.status, 202, "{created:?}");
    assert_eq!(
        api.get("/lume/vms/pol").body["network"]["policy"],
        json!({"allowOut": ["198.51.100.2/32:8000/tcp"], "isolate": true})
    );
    api.fails(
        api.call("PATCH", "/lume/vms/pol", Some(json!({"network": "user"}))),
        400,
        r#"cannot be enforced in network mode 'user': a networkPolicy works with "network": "nat", "host", "bridged" or "none"; send one of those modes, or leave "networkPolicy" out (for a VM that has a saved policy: PATCH /lume/vms/<name> with "networkPolicy": {})"#,
    );
    // Mode none: no network, so a policy holds; accepted.
    let offline = api.call("PATCH", "/lume/vms/pol", Some(json!({"network": "none"})));
    assert_eq!(offline.status, 200, "{offline:?}");
    assert_eq!(api.get("/lume/vms/pol").body["network"]["mode"], "none");
    let cleared = api.call("PATCH", "/lume/vms/pol", Some(json!({"networkPolicy": {}})));
    assert_eq!(cleared.status, 200, "{cleared:?}");
    assert!(api.get("/lume/vms/pol").body["network"]["policy"].is_null());
    let deleted = api.call("DELETE", "/lume/vms/pol", None);
    assert_eq!(deleted.status, 200, "{deleted:?}");

    // 404: unknown VMs, unknown routes; 405: a known path, another method.
    api.fails(api.get("/lume/vms/nosuch"), 404, "does not exist");
    api.fails(
        api.post("/lume/vms/nosuch/run", json!({})),
        404,
        "does not exist",
    );
    api.fails(
        api.post("/lume/vms/nosuch/stop", json!({})),
        404,
        "does not exist",
    );
    api.fails(
        api.call("PATCH", "/lume/vms/nosuch", Some(json!({"cpu": 1}))),
        404,
        "does not exist",
    );
    api.fails(
        api.call("DELETE", "/lume/vms/nosuch", None),
        404,
        "does not exist",
    );
    api.fails(
        api.post("/lume/vms/clone", json!({"name": "nosuch", "newName": "b"})),
        404,
        "does not exist",
    );
    api.fails(api.get("/lume/nothing"), 404, "No route GET /lume/nothing");
    api.fails(api.get("/"), 404, "No route");
    api.fails(api.call("PUT", "/lume/vms", None), 405, "not allowed");

    // 403: web pages (CSRF), any origin but the server's own, and DNS
    // rebinding, without a token.
    let addr = format!("127.0.0.1:{}", server.port);
    let send = |headers: &str, body: &str| {
        let req = format!(
            "POST /lume/vms/x/stop HTTP/1.0\r\n{headers}Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        ns.tcp_exchange(&addr, req.as_bytes()).unwrap()
    };
    let raw = |headers: &str| send(headers, "");
    for origin in [
        "http://evil.example",
        "http://localhost:8080",
        "http://127.0.0.1:3000",
        "null",
        &format!("https://127.0.0.1:{}", server.port),
        &format!("http://127.0.0.1:{}.evil.example", server.port),
    ] {
        let refused = raw(&format!("Origin: {origin}\r\n"));
        assert!(refused.starts_with("HTTP/1.0 403"), "{origin}: {refused}");
        assert!(
            refused.contains("Requests from web pages are refused"),
            "{refused}"
        );
    }
    let refused = raw("Host: rebound.example:7777\r\n");
    assert!(refused.starts_with("HTTP/1.0 403"), "{refused}");
    assert!(
        refused.contains("Host 'rebound.example:7777' is refused"),
        "{refused}"
    );
    // Logged like every refusal: with the uid and the connection.
    let logged = |needle: &str| {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if server
                .log
                .lock()
                .unwrap()
                .lines()
                .any(|l| l.contains("Refused uid 0 (127.0.0.1:") && l.contains(needle))
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    };
    for needle in [
        "Requests from web pages are refused (Origin: http://evil.example)",
        "Host 'rebound.example:7777' is refused",
    ] {
        assert!(logged(needle), "{needle}: {}", server.log.lock().unwrap());
    }
    // The server's own origin is no web page of anyone else's.
    for own in [
        format!("http://127.0.0.1:{}", server.port),
        format!("http://localhost:{}", server.port),
    ] {
        let local = raw(&format!(
            "Host: localhost:{}\r\nOrigin: {own}\r\n",
            server.port
        ));
        assert!(local.starts_with("HTTP/1.0 404"), "{own}: {local}");
    }
    // 415: from a browser (an Origin header, here the server's own), a
    // body that is not declared JSON (what a form or a simple cross-site
    // request sends), even if it parses as JSON. Without Origin (curl -d,
    // python requests' data=), a JSON body is taken as lume takes it: the
    // request reaches the route (404: no VM x); a body that is not JSON
    // is still refused.
    let own = format!("Origin: http://127.0.0.1:{}\r\n", server.port);
    for ct in [
        "",
        "Content-Type: text/plain\r\n",
        "Content-Type: application/x-www-form-urlencoded\r\n",
        "Content-Type: multipart/form-data; boundary=x\r\n",
    ] {
        let refused = send(&format!("{own}{ct}"), "{\"timeout\": 1}");
        assert!(refused.starts_with("HTTP/1.0 415"), "{ct}: {refused}");
        assert!(
            refused.contains("must send the header 'Content-Type: application/json'"),
            "{refused}"
        );
        let taken = send(ct, "{\"timeout\": 1}");
        assert!(taken.starts_with("HTTP/1.0 404"), "{ct}: {taken}");
        assert!(taken.contains("does not exist"), "{ct}: {taken}");
        let refused = send(ct, "timeout=1");
        assert!(refused.starts_with("HTTP/1.0 415"), "{ct}: {refused}");
    }
    let json_ok = send(
        "Content-Type: application/json; charset=utf-8\r\n",
        "{\"timeout\": 1}",
    );
    assert!(json_ok.starts_with("HTTP/1.0 404"), "{json_ok}");

    // 409: an existing name.
    let body = json!({"name": "a", "diskSize": "8MB", "network": "none"});
    assert_eq!(api.post("/lume/vms", body.clone()).status, 202);
    api.fails(api.post("/lume/vms", body), 409, "already exists");
    ns.lume_ok(
        &home,
        &["create", "b", "--disk-size", "8MB", "--network", "none"],
    );
    api.fails(
        api.post("/lume/vms/clone", json!({"name": "a", "newName": "b"})),
        409,
        "already exists",
    );
    // As lume: nothing to change is no error. 400: a shrinking disk, a
    // bad run request.
    let unchanged = api.call("PATCH", "/lume/vms/a", Some(json!({})));
    assert_eq!(unchanged.status, 200, "{unchanged:?}");
    api.fails(
        api.call("PATCH", "/lume/vms/a", Some(json!({"diskSize": "1MB"}))),
        400,
        "can only grow",
    );
    api.fails(
        api.call("PATCH", "/lume/vms/a", Some(json!({"network": "bogus"}))),
        400,
        "Unknown network mode",
    );
    api.fails(
        api.post("/lume/vms/a/run", json!({"mount": "/nonexistent.iso"})),
        400,
        "does not exist",
    );
    api.fails(
        api.post("/lume/vms/a/run", json!({"publish": ["1234:80"]})),
        400,
        "cannot be published in network mode 'none'",
    );
    api.fails(
        api.post("/lume/vms/a/stop", json!({"timeout": 99999})),
        400,
        "A timeout of 99999 seconds is too long: give at most 3600 seconds",
    );
    // As lume: stopping a stopped VM is an error (409 here, 400 in lume).
    api.fails(
        api.call("POST", "/lume/vms/a/stop", None),
        409,
        "is not running",
    );

    // 413: a body over 64 KiB.
    let mut big = b"{\"name\": \"big\", \"cmdline\": \"".to_vec();
    big.extend(std::iter::repeat_n(b'x', 80 * 1024));
    big.extend(b"\"}");
    api.fails(api.raw("POST", "/lume/vms", &big), 413, "too large");

    // 500 names the broken file; the list still shows the VM as invalid.
    std::fs::write(home.vm_dir("b").join("config.json"), "{not json").unwrap();
    api.fails(api.get("/lume/vms/b"), 500, "Corrupt config file");
    let list = api.get("/lume/vms");
    assert_eq!(list.status, 200);
    assert_eq!(list.body[1]["status"], "invalid");

    // Another location, given as a path.
    let elsewhere = home.path().join("elsewhere");
    let made = api.post(
        "/lume/vms",
        json!({"name": "far", "diskSize": "8MB", "network": "none", "storage": elsewhere}),
    );
    assert_eq!(made.status, 202, "{made:?}");
    let q = format!("/lume/vms/far?storage={}", elsewhere.display());
    assert_eq!(
        api.get(&q).body["locationName"],
        elsewhere.display().to_string()
    );
    let far = cli_json(
        &ns,
        &home,
        &[
            "get",
            "far",
            "-f",
            "json",
            "--storage",
            elsewhere.to_str().unwrap(),
        ],
    );
    assert_eq!(far[0]["name"], "far");
    let q = format!("/lume/vms?storage={}", elsewhere.display());
    assert_eq!(api.get(&q).body.as_array().unwrap().len(), 1);

    // A VM may be called `clone`.
    ns.lume_ok(
        &home,
        &["create", "clone", "--disk-size", "8MB", "--network", "none"],
    );
    assert_eq!(api.get("/lume/vms/clone").body["name"], "clone");

    // Settings and host interfaces: the same as the CLI's.
    let cfg = api.get("/lume/config").body;
    assert_eq!(cfg["accelerator"], "tcg");
    assert_eq!(cfg["userSubnet"], "198.51.100.0/24");
    assert_eq!(cfg["homeDirectory"], home.storage().display().to_string());
    assert_eq!(
        api.get("/lume/network/interfaces").body,
        cli_json(
            &ns,
            &home,
            &["config", "network", "interfaces", "-f", "json"]
        )
    );

    // The doctor's JSON: the same checks as the CLI's.
    let doctor = api.get("/lume/network/doctor").body;
    let cli_doctor = ns.lume(&home, &["network", "doctor", "-f", "json"]);
    let cli_doctor: serde_json::Value = serde_json::from_slice(&cli_doctor.stdout).unwrap();
    let names = |v: &serde_json::Value| -> Vec<String> {
        v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names(&doctor), names(&cli_doctor));

    // The OpenAPI document lists every route with its methods.
    let doc = api.get("/openapi.json").body;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
    let mut routes: Vec<String> = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            routes.push(format!("{} {path}", method.to_uppercase()));
        }
    }
    routes.sort();
    assert_eq!(
        routes,
        [
            "DELETE /lume/config/locations/{name}",
            "DELETE /lume/vms/{name}",
            "DELETE /lume/vms/{name}/snapshots/{snapshot}",
            "GET /lume/config",
            "GET /lume/config/locations",
            "GET /lume/host/status",
            "GET /lume/images",
            "GET /lume/ipsw",
            "GET /lume/logs",
            "GET /lume/network/doctor",
            "GET /lume/network/interfaces",
            "GET /lume/vms",
            "GET /lume/vms/{name}",
            "GET /lume/vms/{name}/snapshots",
            "GET /openapi.json",
            "PATCH /lume/vms/{name}",
            "POST /lume/config",
            "POST /lume/config/locations",
            "POST /lume/config/locations/default/{name}",
            "POST /lume/prune",
            "POST /lume/pull",
            "POST /lume/pull/start",
            "POST /lume/vms",
            "POST /lume/vms/clone",
            "POST /lume/vms/push",
            "POST /lume/vms/{name}/flatten",
            "POST /lume/vms/{name}/restart",
            "POST /lume/vms/{name}/run",
            "POST /lume/vms/{name}/setup",
            "POST /lume/vms/{name}/shutdown",
            "POST /lume/vms/{name}/snapshots",
            "POST /lume/vms/{name}/snapshots/{snapshot}/restore",
            "POST /lume/vms/{name}/stop",
        ]
    );
    assert!(server.stop().success());
}

#[test]
fn a_token_guards_every_request() {
    let home = Home::new();
    let ns = Netns::new("at");

    // Any address but loopback needs a token.
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &ns.name, "timeout", "20"])
        .arg(lume_bin())
        .args(["serve", "--host", "0.0.0.0", "--port", "0"]);
    home.env(&mut c);
    let out = c.output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Refusing to listen on 0.0.0.0") && err.contains("--token"),
        "{err}"
    );

    // A token on the command line is refused (the process list shows it).
    let out = ns.lume(&home, &["serve", "--port", "0", "--token", "s3cret-token"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--token on the command line is refused")
            && err.contains("LUME_API_TOKEN")
            && err.contains("--token-file"),
        "{err}"
    );

    let server = Server::start(
        &ns,
        &home,
        &["--host", "0.0.0.0"],
        &[("LUME_API_TOKEN", "s3cret-token")],
    );
    let mut api = Api::new(&ns, &server);
    api.fails(api.get("/lume/host/status"), 401, "needs an API token");
    api.fails(api.get("/lume/nothing"), 401, "needs an API token");
    api.token = Some("wrong-token".into());
    api.fails(api.get("/lume/host/status"), 401, "Wrong API token");
    // Token refusals are logged with the uid and the connection.
    let start = Instant::now();
    while !server
        .log
        .lock()
        .unwrap()
        .lines()
        .any(|l| l.contains("Refused uid 0 (127.0.0.1:") && l.contains("Wrong API token"))
    {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{}",
            server.log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    api.token = Some("s3cret-token".into());
    assert_eq!(api.get("/lume/host/status").status, 200);
    assert_eq!(api.get("/lume/vms").body, json!([]));
    api.fails(api.get("/lume/nothing"), 404, "No route");
    // A token from the environment is required on loopback too.
    let local = Server::start(&ns, &home, &[], &[("LUME_API_TOKEN", "from-env")]);
    let mut api = Api::new(&ns, &local);
    api.fails(api.get("/lume/host/status"), 401, "needs an API token");
    api.token = Some("from-env".into());
    assert_eq!(api.get("/lume/host/status").status, 200);
    assert!(local.stop().success());

    // A token file: private to root, one trailing newline dropped.
    let file = home.path().join("token");
    std::fs::write(&file, "from-file\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = ns.lume(
        &home,
        &[
            "serve",
            "--port",
            "0",
            "--token-file",
            file.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("chmod 600"), "{err}");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let local = Server::start(&ns, &home, &["--token-file", file.to_str().unwrap()], &[]);
    let mut api = Api::new(&ns, &local);
    api.fails(api.get("/lume/host/status"), 401, "needs an API token");
    api.token = Some("from-file".into());
    assert_eq!(api.get("/lume/host/status").status, 200);
    assert!(local.stop().success());
    assert!(server.stop().success());
}

/// Runs a client as `nobody` (primary group `nogroup`, no other groups).
const AS_NOBODY: &[&str] = &[
    "setpriv",
    "--reuid=nobody",
    "--regid=nogroup",
    "--clear-groups",
];

/// One request with curl, run through `prefix` (e.g. `ip netns exec NS`,
/// [`AS_NOBODY`]); `target` is the URL, after `--unix-socket PATH` if any.
fn curl(prefix: &[&str], target: &[&str], method: &str, body: Option<Value>) -> Reply {
    let mut c = Command::new(prefix[0]);
    c.args(&prefix[1..])
        .args([
            "curl",
            "-sS",
            "--max-time",
            "60",
            "-w",
            "\n%{http_code}",
            "-X",
            method,
        ])
        .args(target);
    if let Some(b) = body {
        c.args(["-H", "Content-Type: application/json", "-d", &b.to_string()]);
    }
    let out = c.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "curl {target:?} failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (body, status) = text.rsplit_once('\n').unwrap();
    Reply {
        status: status.trim().parse().unwrap(),
        body: serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}")),
        power_method: None,
    }
}

fn assert_refused(reply: &Reply, needle: &str) {
    assert_eq!(reply.status, 403, "{reply:?}");
    let msg = reply.body["message"].as_str().unwrap();
    assert!(msg.contains(needle), "{msg:?} should contain {needle:?}");
}

#[test]
fn other_users_are_refused_unless_in_the_api_group() {
    let home = Home::new();
    let ns = Netns::new("au");
    ns.lume_ok(
        &home,
        &["create", "app", "--disk-size", "8MB", "--network", "none"],
    );
    let server = Server::start(&ns, &home, &[], &[]);
    let in_ns = ["ip", "netns", "exec", ns.name.as_str()];
    let nobody: Vec<&str> = in_ns.iter().chain(AS_NOBODY).copied().collect();
    let url = |path: &str| server.url(path);

    // Root (the server's own user) is served, as before.
    assert_eq!(curl(&in_ns, &[&url("/lume/vms")], "GET", None).status, 200);

    // nobody: 403 on everything, and nothing happens.
    let rule = "ask the administrator to add you to the API group or give you the token";
    let list = curl(&nobody, &[&url("/lume/vms")], "GET", None);
    assert_refused(&list, rule);
    // The refused user learns neither the settings file nor the group; the
    // server's log has both.
    let text = list.body["message"].as_str().unwrap();
    assert!(
        !text.contains("config.yaml") && !text.contains("apiGroup"),
        "{text}"
    );
    let create = json!({"name": "intruder", "diskSize": "8MB", "network": "none"});
    assert_refused(
        &curl(&nobody, &[&url("/lume/vms")], "POST", Some(create.clone())),
        rule,
    );
    assert_refused(
        &curl(
            &nobody,
            &[&url("/lume/vms/app/run")],
            "POST",
            Some(json!({})),
        ),
        rule,
    );
    assert_refused(
        &curl(&nobody, &[&url("/lume/vms/app")], "DELETE", None),
        rule,
    );
    // Power requests too, with or without force.
    for (path, body) in [
        ("/lume/vms/app/stop", json!({})),
        ("/lume/vms/app/shutdown", json!({})),
        ("/lume/vms/app/restart", json!({"force": true})),
    ] {
        assert_refused(&curl(&nobody, &[&url(path)], "POST", Some(body)), rule);
    }
    assert!(home.vm_dir("app").join("config.json").exists());
    assert!(!home.vm_dir("intruder").exists());
    assert_eq!(
        cli_json(&ns, &home, &["get", "app", "-f", "json"])[0]["status"],
        "stopped"
    );
    {
        let log = server.log.lock().unwrap();
        assert!(log.contains("Refused uid 65534"), "{log}");
        assert!(
            log.contains(&home.config_yaml().display().to_string()),
            "{log}"
        );
    }

    // Refused requests go to stderr only: they never reach the log that
    // GET /lume/logs keeps for the server's user, so nobody cannot push
    // the owner's lines out of it.
    let refused = curl(&nobody, &[&url("/lume/vms/refused-marker")], "GET", None);
    assert_eq!(refused.status, 403, "{refused:?}");
    let kept = curl(&in_ns, &[&url("/lume/logs")], "GET", None);
    assert_eq!(kept.status, 200, "{kept:?}");
    let info = kept.body["info"].as_str().unwrap();
    assert!(info.contains("GET /lume/vms -> "), "{info}");
    assert!(!info.contains("refused-marker"), "{info}");
    assert!(!info.contains("Refused uid 65534"), "{info}");
    common::wait_for("the refusal on stderr", Duration::from_secs(10), || {
        server
            .log
            .lock()
            .unwrap()
            .contains("refused-marker")
            .then_some(())
    });

    // A program lume runs for VMs (here curl under the name passt) is a
    // guest: refused even as root.
    let bin = tempfile::tempdir().unwrap();
    let passt = bin.path().join("passt");
    std::fs::copy(common::sh("command -v curl").trim(), &passt).unwrap();
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &ns.name]).arg(&passt).args([
        "-sS",
        "-w",
        "\n%{http_code}",
        &url("/lume/vms"),
    ]);
    let out = String::from_utf8(c.output().unwrap().stdout).unwrap();
    assert!(out.ends_with("\n403"), "{out}");
    assert!(
        out.contains("Requests from virtual machines are refused"),
        "{out}"
    );

    // Once config.yaml names nobody's group as apiGroup, nobody is served.
    home.write_settings("apiGroup: nogroup\n");
    let list = curl(&nobody, &[&url("/lume/vms")], "GET", None);
    assert_eq!(list.status, 200, "{list:?}");
    assert_eq!(list.body[0]["name"], "app");
    let made = curl(&nobody, &[&url("/lume/vms")], "POST", Some(create));
    assert_eq!(made.status, 202, "{made:?}");
    // The server's log (it names every caller's VMs) is its own user's.
    let logs = curl(&nobody, &[&url("/lume/logs")], "GET", None);
    assert_eq!(logs.status, 403, "{logs:?}");
    assert_eq!(curl(&in_ns, &[&url("/lume/logs")], "GET", None).status, 200);

    // Storage: a served user other than the server's (root) may use only
    // the server's own location. Everything else gets one answer, whether
    // the path exists, is a file, a directory of root's, nobody's own
    // directory, or a link of nobody's into root's VMs; nothing is read or
    // deleted there.
    let rootdir = home.path().join("root-vms");
    let rootdir_s = rootdir.to_str().unwrap();
    ns.lume_ok(
        &home,
        &[
            "create",
            "app",
            "--disk-size",
            "8MB",
            "--network",
            "none",
            "--storage",
            rootdir_s,
        ],
    );
    let own = home.path().join("nobody-vms");
    std::fs::create_dir(&own).unwrap();
    nix::unistd::chown(&own, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
    let link = own.join("link");
    std::os::unix::fs::symlink(&rootdir, &link).unwrap();
    std::os::unix::fs::lchown(&link, Some(65534), None).unwrap();
    let secret = home.path().join("secret-file");
    std::fs::write(&secret, "x").unwrap();
    let refused_text = |reply: &Reply| {
        assert_eq!(reply.status, 403, "{reply:?}");
        reply.body["message"].as_str().unwrap().to_string()
    };
    let mut answers = std::collections::BTreeSet::new();
    for place in [
        rootdir.clone(),
        home.path().join("nonexistent"),
        secret.clone(),
        own.clone(),
        link.clone(),
        home.storage().join("..").join("root-vms"),
    ] {
        let q = format!("?storage={}", place.display());
        for (method, path) in [
            ("DELETE", format!("/lume/vms/app{q}")),
            ("GET", format!("/lume/vms/app{q}")),
            ("GET", format!("/lume/vms{q}")),
            ("POST", format!("/lume/vms/app/stop{q}")),
        ] {
            answers.insert(refused_text(&curl(&nobody, &[&url(&path)], method, None)));
        }
        let made = curl(
            &nobody,
            &[&url("/lume/vms")],
            "POST",
            Some(json!({"name": "in", "diskSize": "8MB", "network": "none", "storage": place})),
        );
        answers.insert(refused_text(&made));
    }
    assert_eq!(answers.len(), 1, "one answer for every path: {answers:?}");
    let answer = answers.into_iter().next().unwrap();
    assert!(answer.contains("This storage is refused"), "{answer}");
    assert!(
        !answer.contains("root-vms") && !answer.contains("uid"),
        "{answer}"
    );
    assert!(rootdir.join("app/config.json").exists());
    assert!(!own.join("in").exists() && !rootdir.join("in").exists());
    // The server's location named explicitly (however spelled) is fine.
    for spelled in [
        home.storage().display().to_string(),
        format!("{}/", home.storage().display()),
    ] {
        let servers = curl(
            &nobody,
            &[&url(&format!("/lume/vms?storage={spelled}"))],
            "GET",
            None,
        );
        assert_eq!(servers.status, 200, "{servers:?}");
        assert_eq!(servers.body[0]["name"], "app", "{servers:?}");
    }
    let q = format!("?storage={rootdir_s}");
    // Root may use any location.
    let any = curl(&in_ns, &[&url(&format!("/lume/vms{q}"))], "GET", None);
    assert_eq!(any.body[0]["name"], "app", "{any:?}");
    assert!(server.stop().success());

    // IPv6 loopback: the same rule.
    home.write_settings("");
    let v6 = Server::start(&ns, &home, &["--host", "::1"], &[]);
    let url6 = format!("http://[::1]:{}/lume/vms", v6.port);
    let target = ["-g", url6.as_str()];
    assert_eq!(curl(&in_ns, &target, "GET", None).status, 200);
    assert_refused(&curl(&nobody, &target, "GET", None), rule);
    home.write_settings("apiGroup: nogroup\n");
    assert_eq!(curl(&nobody, &target, "GET", None).status, 200);
    assert!(v6.stop().success());

    // An apiGroup that names no group stops the server at start.
    home.write_settings("apiGroup: no-such-group-here\n");
    let err = ns.lume_fails(&home, &["serve", "--port", "0"]);
    assert!(
        err.contains("Group 'no-such-group-here', set as apiGroup")
            && err.contains("does not exist"),
        "{err}"
    );
}

#[test]
fn the_unix_socket_knows_its_callers() {
    let home = Home::new();
    home.write_settings("apiGroup: nogroup\n");
    let ns = Netns::new("as");
    // A directory nobody can reach the socket through.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = dir.path().join("lume.sock");
    let sock_s = sock.to_str().unwrap();
    // A directory other users can write is refused: they could swap the
    // socket for a link before the server sets its mode and group.
    let open = tempfile::tempdir().unwrap();
    std::fs::set_permissions(open.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let open_sock = open.path().join("lume.sock");
    let err = ns.lume_fails(
        &home,
        &[
            "serve",
            "--port",
            "0",
            "--socket",
            open_sock.to_str().unwrap(),
        ],
    );
    assert!(err.contains("can be changed by other users"), "{err}");
    assert!(!open_sock.exists());
    // A stale socket file is replaced.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let server = Server::start(&ns, &home, &["--socket", sock_s], &[]);
    let meta = std::fs::metadata(&sock).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o660);
    assert_eq!(meta.gid(), 65534, "group-owned by the apiGroup");
    let target = |path: &str| {
        [
            "--unix-socket".to_string(),
            sock_s.to_string(),
            format!("http://localhost{path}"),
        ]
    };
    let t = target("/lume/vms");
    let t: Vec<&str> = t.iter().map(String::as_str).collect();

    // Root, and nobody as a member of the apiGroup.
    let root = curl(&["env"], &t, "GET", None);
    assert_eq!(
        (root.status, root.body.clone()),
        (200, json!([])),
        "{root:?}"
    );
    let nobody = curl(AS_NOBODY, &t, "GET", None);
    assert_eq!(nobody.status, 200, "{nobody:?}");
    let made = curl(
        AS_NOBODY,
        &t,
        "POST",
        Some(json!({"name": "viasock", "diskSize": "8MB", "network": "none"})),
    );
    assert_eq!(made.status, 202, "{made:?}");

    // Out of the apiGroup, the same uid on the same socket is refused
    // (SO_PEERCRED names it), and nothing is deleted.
    home.write_settings("");
    let t = target("/lume/vms/viasock");
    let t: Vec<&str> = t.iter().map(String::as_str).collect();
    assert_refused(
        &curl(AS_NOBODY, &t, "DELETE", None),
        "ask the administrator to add you to the API group",
    );
    assert!(home.vm_dir("viasock").join("config.json").exists());
    assert_eq!(curl(&["env"], &t, "DELETE", None).status, 200);

    // A second server cannot take a live socket over.
    let out = ns.lume(&home, &["serve", "--port", "0", "--socket", sock_s]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Another server already listens"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(server.stop().success());
    assert!(!sock.exists(), "the socket is removed on exit");
}

/// Idle connections are a resource any local user could take: `nobody`
/// (not even served) opens more than its share and keeps them idle; the
/// excess is closed at once, root is still served at once, and the idle ones
/// are closed after the header timeout (2 s here). A refusal of who is
/// calling closes its connection at once.
#[test]
fn idle_connections_of_one_user_cannot_starve_the_others() {
    let home = Home::new();
    let ns = Netns::new("ai");
    let server = Server::start(&ns, &home, &[], &[("LUME_API_IDLE_TIMEOUT_MS", "2000")]);
    let in_ns = ["ip", "netns", "exec", ns.name.as_str()];
    let nobody: Vec<&str> = in_ns.iter().chain(AS_NOBODY).copied().collect();
    // 100 connections (64 is one user's share), then which are closed (a
    // read at end of file fails at once; an open one times out).
    let script = format!(
        r#"
fds=()
for i in $(seq 1 100); do exec {{fd}}<>/dev/tcp/127.0.0.1/{port} && fds+=($fd); done
echo "opened ${{#fds[@]}}"
count() {{ n=0; for fd in "${{fds[@]}}"; do read -t 0.002 -u $fd _; [ $? -eq 1 ] && n=$((n+1)); done; echo $n; }}
sleep 0.5
echo "closed-at-once $(count)"
sleep 3
echo "closed-when-idle $(count)"
"#,
        port = server.port
    );
    let mut holder = Command::new(nobody[0])
        .args(&nobody[1..])
        .args(["bash", "-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(holder.stdout.take().unwrap()).lines();
    let mut next = |what: &str| -> usize {
        let line = lines.next().unwrap().unwrap();
        let n = line.strip_prefix(what).unwrap_or_else(|| panic!("{line}"));
        n.trim().parse().unwrap()
    };
    assert_eq!(next("opened"), 100);
    assert_eq!(next("closed-at-once"), 36, "all but one user's 64");
    let start = Instant::now();
    let status = curl(&in_ns, &[&server.url("/lume/host/status")], "GET", None);
    assert_eq!(status.status, 200, "{status:?}");
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "root waited {:?}",
        start.elapsed()
    );
    assert_eq!(next("closed-when-idle"), 100, "idle ones closed after 2 s");
    assert!(holder.wait().unwrap().success());
    assert!(
        server
            .log
            .lock()
            .unwrap()
            .contains("Refused connections of uid 65534"),
        "{}",
        server.log.lock().unwrap()
    );

    // A keep-alive request refused for who is calling: the answer, then the
    // connection closes (cat ends long before the 2 s idle timeout).
    let ask = format!(
        "exec 3<>/dev/tcp/127.0.0.1/{}; printf 'GET /lume/vms HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\n\\r\\n' >&3; timeout 1 cat <&3",
        server.port
    );
    let out = Command::new(nobody[0])
        .args(&nobody[1..])
        .args(["bash", "-c", &ask])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(out.status.success(), "the connection stayed open: {text}");
    assert!(text.starts_with("http/1.1 403"), "{text}");
    assert!(text.contains("connection: close"), "{text}");
    assert!(server.stop().success());
}

/// A served user other than root (nobody, in `apiGroup`) names host files it
/// may not open: each request is refused with 403 naming the path, nothing is
/// created, copied or started; files it may open are used.
#[test]
fn host_files_in_requests_are_used_with_the_callers_rights() {
    use std::os::unix::fs::PermissionsExt;
    let home = Home::new();
    let ns = Netns::new("af");
    home.write_settings("apiGroup: nogroup\n");
    ns.lume_ok(
        &home,
        &["create", "app", "--disk-size", "8MB", "--network", "none"],
    );
    let server = Server::start(&ns, &home, &[], &[]);
    let in_ns = ["ip", "netns", "exec", ns.name.as_str()];
    let nobody: Vec<&str> = in_ns.iter().chain(AS_NOBODY).copied().collect();
    let url = |path: &str| server.url(path);

    // A directory everybody may enter, with a root-only file and a public one.
    let files = tempfile::tempdir().unwrap();
    std::fs::set_permissions(files.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let secret = files.path().join("secret");
    std::fs::write(&secret, b"root's secret, not a kernel").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let public = files.path().join("public");
    std::fs::write(&public, b"anybody may read this").unwrap();
    std::fs::set_permissions(&public, std::fs::Permissions::from_mode(0o644)).unwrap();
    let secret_s = secret.to_str().unwrap();
    let public_s = public.to_str().unwrap();

    let forbidden = |reply: Reply, path: &str| {
        assert_eq!(reply.status, 403, "{reply:?}");
        let msg = reply.body["message"].as_str().unwrap();
        assert!(msg.contains(path) && msg.contains("uid 65534"), "{msg}");
        assert!(!msg.contains("root's secret"), "{msg}");
    };
    for body in [
        json!({"name": "k", "diskSize": "8MB", "network": "none", "kernel": secret_s}),
        json!({"name": "k", "diskSize": "8MB", "network": "none", "kernel": public_s, "initrd": secret_s}),
        json!({"name": "k", "diskSize": "8MB", "network": "none", "image": secret_s}),
    ] {
        forbidden(
            curl(&nobody, &[&url("/lume/vms")], "POST", Some(body)),
            secret_s,
        );
        assert!(!home.vm_dir("k").exists());
    }
    // ISOs are read, extra disks written: a public read-only file is no disk.
    forbidden(
        curl(
            &nobody,
            &[&url("/lume/vms/app/run")],
            "POST",
            Some(json!({"mount": secret_s})),
        ),
        secret_s,
    );
    forbidden(
        curl(
            &nobody,
            &[&url("/lume/vms/app/run")],
            "POST",
            Some(json!({"disks": [public_s]})),
        ),
        public_s,
    );
    // A directory nobody may list is still refused to it: virtiofsd serves
    // shares as root, so below `/` the guest would read /etc/shadow.
    let share_root = curl(
        &nobody,
        &[&url("/lume/vms/app/run")],
        "POST",
        Some(json!({"sharedDirectories": [{"hostPath": "/", "readOnly": true}]})),
    );
    assert_eq!(share_root.status, 403, "{share_root:?}");
    let msg = share_root.body["message"].as_str().unwrap();
    assert!(
        msg.starts_with("Shared directory /:")
            && msg.contains("only root may share directories")
            && msg.contains("uid 65534"),
        "{msg}"
    );
    // More shares than lume serves: refused before anything is opened,
    // whoever asks.
    let many: Vec<Value> = (0..9)
        .map(|_| json!({"hostPath": "/nonexistent-share", "readOnly": true}))
        .collect();
    for prefix in [&nobody[..], &in_ns[..]] {
        let reply = curl(
            prefix,
            &[&url("/lume/vms/app/run")],
            "POST",
            Some(json!({ "sharedDirectories": many })),
        );
        assert_eq!(reply.status, 400, "{reply:?}");
        let msg = reply.body["message"].as_str().unwrap();
        assert!(msg.contains("at most 8"), "{msg}");
    }
    assert_eq!(
        cli_json(&ns, &home, &["get", "app", "-f", "json"])[0]["status"],
        "stopped"
    );
    assert_eq!(qemu_count(&home, "app"), 0);

    // A file nobody may read is used: the kernel is copied into the VM.
    let made = curl(
        &nobody,
        &[&url("/lume/vms")],
        "POST",
        Some(json!({"name": "k", "diskSize": "8MB", "network": "none", "kernel": public_s})),
    );
    assert_eq!(made.status, 202, "{made:?}");
    assert_eq!(
        std::fs::read(home.vm_dir("k").join("vmlinuz")).unwrap(),
        b"anybody may read this"
    );
    // Root itself may name the root-only file.
    let as_root = curl(
        &in_ns,
        &[&url("/lume/vms")],
        "POST",
        Some(json!({"name": "r", "diskSize": "8MB", "network": "none", "kernel": secret_s})),
    );
    assert_eq!(as_root.status, 202, "{as_root:?}");
    assert!(server.stop().success());
}
