//! lume's compatibility suite, REST API: the routes of upstream lume
//! 0.5.3's `src/Server/Server.swift`, the bodies of `Requests.swift` and
//! the answers of `Handlers.swift`, against a real `lume serve` in a network
//! namespace, with the requests lume's own Python clients send (cua-sandbox's
//! runtime/lume.py, cua-computer's providers/lume_api.py). Where this server
//! differs on purpose (a more precise error status, a refused field) the
//! test says so; docs/compatibility.md is the table these tests keep true.
//! No VM boots here: run's answer for a running VM is checked by
//! tests/api.rs (`a_real_vm_through_the_api_and_the_cli`).

mod common;

use common::api::{Api, Server};
use common::{Home, Netns};
use serde_json::{Value, json};

fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
    k.sort();
    k
}

#[test]
fn vm_routes_answer_as_handlers_swift() {
    let home = Home::new();
    let ns = Netns::new("cs");
    let server = Server::start(&ns, &home, &[], &[]);
    let api = Api::new(&ns, &server);

    // POST /lume/vms with lume's CreateVMRequest (every field; Swift's
    // encoder leaves nil optionals out, some clients send null).
    let made = api.post(
        "/lume/vms",
        json!({"name": "a", "os": "linux", "cpu": 1, "memory": "256MB", "diskSize": "16MB",
               "display": "1024x768", "network": "nat", "storage": null, "ipsw": null,
               "unattended": null}),
    );
    assert_eq!(made.status, 202, "{made:?}");
    assert_eq!(
        made.body,
        json!({"message": "VM created", "name": "a", "status": "stopped"})
    );
    // GET /lume/vms and /lume/vms/:name: VMDetails (compat_vmdetails.rs
    // checks every key).
    let a = api.get("/lume/vms/a");
    assert_eq!(a.status, 200);
    assert_eq!(a.body["name"], "a");
    assert_eq!(a.body["status"], "stopped");
    assert_eq!(api.get("/lume/vms").body, json!([a.body]));

    // PATCH /lume/vms/:name with lume's SetVMRequest.
    let set = api.call(
        "PATCH",
        "/lume/vms/a",
        Some(
            json!({"cpu": 2, "memory": "512MB", "diskSize": "32MB", "display": "1280x800",
                    "storage": null, "noBackup": false, "keepBackup": false, "dryRun": false}),
        ),
    );
    assert_eq!(set.status, 200, "{set:?}");
    assert_eq!(
        set.body,
        json!({"message": "VM settings updated successfully"})
    );
    let a = api.get("/lume/vms/a").body;
    assert_eq!(
        (&a["cpuCount"], &a["memorySize"], &a["display"]),
        (&json!(2), &json!(512 << 20), &json!("1280x800"))
    );
    // Nothing to change: 200, as lume.
    assert_eq!(
        api.call("PATCH", "/lume/vms/a", Some(json!({}))).status,
        200
    );

    // POST /lume/vms/clone with lume's CloneRequest.
    let cloned = api.post("/lume/vms/clone", json!({"name": "a", "newName": "b"}));
    assert_eq!(cloned.status, 200, "{cloned:?}");
    assert_eq!(
        cloned.body,
        json!({"message": "VM cloned successfully", "source": "a", "destination": "b"})
    );

    // POST /lume/vms/:name/stop of a stopped VM: an error, as lume (409
    // here; lume answers 400 to every failure). cua-sandbox sends no body.
    api.fails(
        api.call("POST", "/lume/vms/a/stop", None),
        409,
        "is not running",
    );
    api.fails(
        api.post("/lume/vms/a/stop", json!({"storage": null})),
        409,
        "is not running",
    );

    // The run bodies lume's clients send parse (the VM is missing: 404,
    // not a 400 about the body).
    for body in [
        json!({"noDisplay": true, "sharedDirectories": []}),
        json!({"storage": null, "noDisplay": true, "sharedDirectories": null}),
        json!({"cpu": 4, "memory": "8GB"}),
        json!({"recoveryMode": false, "clipboard": false, "network": "nat"}),
    ] {
        api.fails(
            api.post("/lume/vms/ghost/run", body.clone()),
            404,
            "does not exist",
        );
    }

    // DELETE /lume/vms/:name: 200.
    for vm in ["a", "b"] {
        let deleted = api.call("DELETE", &format!("/lume/vms/{vm}"), None);
        assert_eq!(deleted.status, 200, "{deleted:?}");
    }
    assert_eq!(api.get("/lume/vms").body, json!([]));
    assert!(server.stop().success());
}

#[test]
fn lumes_fields_we_do_not_support_are_refused_by_name() {
    let home = Home::new();
    let ns = Netns::new("cr");
    let server = Server::start(&ns, &home, &[], &[]);
    let api = Api::new(&ns, &server);
    let base = json!({"name": "r", "diskSize": "16MB", "network": "none"});
    let with = |extra: Value| {
        let mut b = base.clone();
        b.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        b
    };
    for (extra, field) in [
        (json!({"ipsw": "latest"}), "ipsw"),
        (json!({"unattended": "sequoia"}), "unattended"),
    ] {
        api.fails(
            api.post("/lume/vms", with(extra)),
            400,
            &format!("{field} is not supported by lume on Linux (it is for macOS guests"),
        );
    }
    api.fails(
        api.post("/lume/vms", with(json!({"display": "1024"}))),
        400,
        "give WIDTHxHEIGHT",
    );
    // A field nobody knows: refused by name, never dropped.
    api.fails(
        api.post("/lume/vms", with(json!({"colour": "blue"}))),
        400,
        "unknown field `colour`",
    );
    assert_eq!(api.get("/lume/vms").body, json!([]), "nothing was created");
    // null is a field left out, for our fields too.
    let nulls = with(
        json!({"publish": null, "noCloudInit": null, "noPassword": null,
                            "os": null, "cpu": null, "memory": null, "display": null}),
    );
    assert_eq!(api.post("/lume/vms", nulls).status, 202);
    assert_eq!(api.call("DELETE", "/lume/vms/r", None).status, 200);

    assert_eq!(api.post("/lume/vms", base.clone()).status, 202);
    for (body, field) in [
        (json!({"noBackup": true}), "noBackup"),
        (json!({"keepBackup": true}), "keepBackup"),
        (json!({"dryRun": true}), "dryRun"),
    ] {
        api.fails(
            api.call("PATCH", "/lume/vms/r", Some(body)),
            400,
            &format!("{field} is not supported by lume on Linux"),
        );
    }
    api.fails(
        api.call("PATCH", "/lume/vms/r", Some(json!({"display": "x"}))),
        400,
        "give WIDTHxHEIGHT",
    );
    api.fails(
        api.call("PATCH", "/lume/vms/r", Some(json!({"colour": "blue"}))),
        400,
        "unknown field `colour`",
    );
    for (body, field) in [
        (json!({"recoveryMode": true}), "recoveryMode"),
        (json!({"diskPath": "/tmp/d.img"}), "diskPath"),
        (json!({"nvramPath": "/tmp/n.bin"}), "nvramPath"),
        (json!({"clipboard": true}), "clipboard"),
    ] {
        api.fails(
            api.post("/lume/vms/r/run", body),
            400,
            &format!("{field} is not supported by lume on Linux"),
        );
    }
    // lume's sharedDirectories are taken: a relative hostPath or an unknown
    // key is a 400 naming it.
    api.fails(
        api.post(
            "/lume/vms/r/run",
            json!({"sharedDirectories": [{"hostPath": "tmp", "readOnly": true}]}),
        ),
        400,
        "sharedDirectories hostPath must be an absolute path",
    );
    api.fails(
        api.post(
            "/lume/vms/r/run",
            json!({"sharedDirectories": [{"hostPath": "/tmp", "tag": "x"}]}),
        ),
        400,
        "unknown field `tag`",
    );
    api.fails(
        api.post("/lume/vms/r/run", json!({"colour": "blue"})),
        400,
        "unknown field `colour`",
    );
    api.fails(
        api.post("/lume/vms/r/stop", json!({"colour": "blue"})),
        400,
        "unknown field `colour`",
    );
    // So is a query parameter nobody knows.
    api.fails(
        api.get("/lume/vms?colour=blue"),
        400,
        "unknown field `colour`",
    );
    api.fails(
        api.get("/lume/logs?colour=blue"),
        400,
        "unknown field `colour`",
    );
    api.fails(
        api.post(
            "/lume/vms/clone",
            json!({"name": "r", "newName": "s", "colour": "blue"}),
        ),
        400,
        "unknown field `colour`",
    );
    assert_eq!(api.get("/lume/vms/r").body["status"], "stopped");

    // lume's macOS routes: 400 with the reason.
    api.fails(
        api.post("/lume/vms/r/setup", json!({"configYaml": "x"})),
        400,
        "setup (POST /lume/vms/{name}/setup) is not available in lume on Linux",
    );
    api.fails(
        api.get("/lume/ipsw"),
        400,
        "ipsw (GET /lume/ipsw) is not available in lume on Linux",
    );
    assert!(server.stop().success());
}

#[test]
fn host_status_and_logs_answer_as_handlers_swift() {
    let home = Home::new();
    let ns = Netns::new("ch");
    let server = Server::start(&ns, &home, &[], &[]);
    let api = Api::new(&ns, &server);

    // GET /lume/host/status: lume's snake_case keys and types (+ total_vms).
    let status = api.get("/lume/host/status");
    assert_eq!(status.status, 200);
    assert_eq!(
        keys(&status.body),
        [
            "available_slots",
            "max_vms",
            "status",
            "total_vms",
            "version",
            "vm_count"
        ]
    );
    assert_eq!(status.body["status"], "healthy");
    assert_eq!(status.body["vm_count"], 0);
    assert!(status.body["max_vms"].as_u64().unwrap() >= 1);
    assert_eq!(status.body["available_slots"], status.body["max_vms"]);
    assert!(status.body["version"].is_string());

    let made = api.post(
        "/lume/vms",
        json!({"name": "x", "diskSize": "16MB", "network": "none"}),
    );
    assert_eq!(made.status, 202, "{made:?}");

    // GET /lume/logs: {info, error} strings; ?type= and ?lines= as lume.
    let logs = api.get("/lume/logs");
    assert_eq!(logs.status, 200);
    assert_eq!(keys(&logs.body), ["error", "info"]);
    let info = logs.body["info"].as_str().unwrap();
    assert!(info.contains("GET /lume/host/status -> 200"), "{info}");
    assert!(info.contains("POST /lume/vms -> 202"), "{info}");
    assert!(logs.body["error"].is_string());
    let only = api.get("/lume/logs?type=info&lines=1").body;
    assert_eq!(keys(&only), ["info"]);
    assert_eq!(only["info"].as_str().unwrap().lines().count(), 1);
    assert_eq!(keys(&api.get("/lume/logs?type=error").body), ["error"]);
    api.fails(
        api.get("/lume/logs?type=debug"),
        400,
        "give info, error or all",
    );

    // The OpenAPI document names only schemas it has (lume's answer types
    // among them).
    let doc = api.get("/openapi.json").body;
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for name in [
        "Accepted",
        "Message",
        "Cloned",
        "HostStatus",
        "Logs",
        "VmDetails",
    ] {
        assert!(schemas.contains_key(name), "{name} missing");
    }
    let text = doc.to_string();
    for r in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
        let name = r.split('"').next().unwrap();
        assert!(schemas.contains_key(name), "dangling $ref {name}");
    }
    assert!(server.stop().success());
}
