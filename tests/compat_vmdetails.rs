//! lume's compatibility suite, VM details: the JSON of upstream lume
//! 0.5.3's `src/VM/VMDetails.swift` (every key, always present, lume's
//! types and order) and the table of `src/VM/VMDetailsPrinter.swift`
//! (columns, widths, memory and disk formats). Nothing here boots a VM.

mod common;

use common::Home;
use serde_json::Value;

/// VMDetails.swift's keys in its encoding order, with the JSON types
/// lume's encoder gives each (`null` where it may be nil).
const LUME_KEYS: [(&str, &[&str]); 15] = [
    ("name", &["string"]),
    ("os", &["string"]),
    ("cpuCount", &["integer"]),
    ("memorySize", &["integer"]),
    ("diskSize", &["object"]),
    ("display", &["string"]),
    ("status", &["string"]),
    ("provisioningOperation", &["string", "null"]),
    ("vncUrl", &["string", "null"]),
    ("ipAddress", &["string", "null"]),
    ("sshAvailable", &["boolean", "null"]),
    ("locationName", &["string"]),
    ("sharedDirectories", &["array", "null"]),
    ("networkMode", &["string", "null"]),
    ("downloadProgress", &["number", "null"]),
];

/// VMDetailsPrinter.swift's columns and widths.
const LUME_COLUMNS: [(&str, usize); 13] = [
    ("name", 40),
    ("os", 8),
    ("cpu", 8),
    ("memory", 8),
    ("disk", 16),
    ("display", 12),
    ("status", 28),
    ("network", 12),
    ("storage", 16),
    ("shared_dirs", 54),
    ("ip", 16),
    ("ssh", 6),
    ("vnc", 50),
];

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_u64() || n.is_i64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Asserts the pretty JSON `text` of one VM's details (an element of an
/// array, so its own keys are indented by four spaces) has every key of
/// lume's VMDetails first and in lume's order, each of lume's type.
fn assert_lume_details(text: &str, d: &Value) {
    let keys: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("    \""))
        .filter(|l| !l.starts_with(' '))
        .filter_map(|l| l.split('"').next())
        .collect();
    let lume: Vec<&str> = LUME_KEYS.iter().map(|(k, _)| *k).collect();
    assert_eq!(keys[..lume.len()], lume[..], "lume's keys first: {text}");
    for (key, types) in LUME_KEYS {
        let t = json_type(&d[key]);
        // lume's "number" (a Double) also takes integers.
        let ok = types.contains(&t) || (t == "integer" && types.contains(&"number"));
        assert!(ok, "{key}: {t} is not one of {types:?} in {d}");
    }
    for part in ["allocated", "total"] {
        assert_eq!(json_type(&d["diskSize"][part]), "integer", "{d}");
    }
}

#[test]
fn details_have_lumes_keys_types_and_order() {
    let home = Home::new();
    home.ok(&[
        "create",
        "v",
        "--memory",
        "256MB",
        "--disk-size",
        "16MB",
        "--network",
        "none",
    ]);
    let text = home.ok(&["get", "v", "-f", "json"]);
    let d = home.get("v");
    assert_lume_details(&text, &d);
    // What we have nothing for yet is null or empty, never missing.
    assert_eq!(d["vncUrl"], Value::Null);
    assert_eq!(d["sshAvailable"], Value::Null);
    assert_eq!(d["provisioningOperation"], Value::Null);
    assert_eq!(d["downloadProgress"], Value::Null);
    assert_eq!(d["sharedDirectories"], serde_json::json!([]));
    assert_eq!(d["status"], "stopped");
    assert_eq!(d["diskSize"]["total"], 16 << 20);
    // ls -f json: the same objects.
    let all: Value = serde_json::from_str(&home.ok(&["ls", "-f", "json"])).unwrap();
    assert_eq!(all[0], d);
}

#[test]
fn the_table_has_lumes_columns_widths_and_formats() {
    let home = Home::new();
    home.ok(&[
        "create",
        "t",
        "--memory",
        "1536MB",
        "--disk-size",
        "10MB",
        "--display",
        "800x600",
        "--network",
        "none",
    ]);
    let table = home.ok(&["ls"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 2, "{table}");
    // Each column starts where lume's padding puts it.
    let cut = |line: &str| -> Vec<String> {
        let mut at = 0;
        LUME_COLUMNS
            .iter()
            .map(|(_, w)| {
                let cell: String = line.chars().skip(at).take(*w).collect();
                at += w;
                cell.trim_end().to_string()
            })
            .collect()
    };
    let header: Vec<String> = LUME_COLUMNS.iter().map(|(h, _)| h.to_string()).collect();
    assert_eq!(cut(lines[0]), header, "{table}");
    let location = home.get("t")["locationName"].as_str().unwrap().to_string();
    assert_eq!(
        cut(lines[1]),
        [
            "t",
            "linux",
            "2",
            // memory: "%.2fG" of GiB; disk: allocated/total in lume's units.
            "1.50G",
            "0.0B/10.0MB",
            "800x600",
            "stopped",
            "none",
            &location,
            "-",
            "-",
            "-",
            "-"
        ],
        "{table}"
    );
}
