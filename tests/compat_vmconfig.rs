//! lume's compatibility suite, VM folders: `config.json` as upstream lume
//! 0.5.3's `src/FileSystem/VMConfig.swift` reads and writes it. lume's VM
//! folders load here, and the config.json we write is one lume's decoder
//! accepts wherever lume knows the network mode. Nothing here boots a VM.

mod common;

use common::Home;
use serde_json::Value;

/// What VMConfig.swift's `init(from:)` requires of a config.json, checked
/// key by key: `os` and `display` must be there (`display` parsed as
/// VMDisplayResolution, force-unwrapped), `cpuCount` an Int, `memorySize`
/// and `diskSize` UInt64, `macAddress` a String, `hardwareModel` and
/// `machineIdentifier` base64 Data, and `networkMode` a string lume's
/// NetworkMode.parse knows (nat, bridged, bridged:<interface>). Keys it
/// does not know are ignored by its decoder.
fn lume_decodes(cfg: &Value) -> Result<(), String> {
    let s = |k: &str| cfg[k].as_str().ok_or(format!("{k} is not a string"));
    s("os")?;
    let display = s("display")?;
    let res: Vec<&str> = display.split('x').collect();
    if res.len() != 2
        || res
            .iter()
            .any(|n| n.parse::<u32>().map_or(true, |v| v == 0))
    {
        return Err(format!("display {display:?} is not WIDTHxHEIGHT"));
    }
    for k in ["cpuCount", "memorySize", "diskSize"] {
        if !cfg[k].is_null() && !cfg[k].is_u64() {
            return Err(format!("{k} is not a whole number"));
        }
    }
    for k in ["macAddress", "hardwareModel", "machineIdentifier"] {
        if !cfg[k].is_null() && !cfg[k].is_string() {
            return Err(format!("{k} is not a string"));
        }
    }
    if !cfg["networkMode"].is_null() {
        let m = s("networkMode")?.to_lowercase();
        if !(m == "nat"
            || m == "bridged"
            || m.strip_prefix("bridged:").is_some_and(|i| !i.is_empty()))
        {
            return Err(format!("networkMode {m:?} is not one lume knows"));
        }
    }
    Ok(())
}

fn config(home: &Home, vm: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(home.vm_dir(vm).join("config.json")).unwrap())
        .unwrap()
}

#[test]
fn our_config_json_is_one_lume_decodes() {
    let home = Home::new();
    for (vm, network) in [("n", "nat"), ("b", "bridged"), ("bi", "bridged:eth0")] {
        home.ok(&[
            "create",
            vm,
            "--disk-size",
            "16MB",
            "--network",
            network,
            "--display",
            "1280x720",
        ]);
        let cfg = config(&home, vm);
        assert_eq!(lume_decodes(&cfg), Ok(()), "{network}: {cfg}");
    }
    // After `set` too: the keys keep lume's types.
    home.ok(&[
        "set",
        "n",
        "--cpu",
        "3",
        "--memory",
        "3GB",
        "--display",
        "640x480",
    ]);
    assert_eq!(lume_decodes(&config(&home, "n")), Ok(()));
    // Modes lume does not have are written as ours; lume cannot read those
    // VMs (docs/compatibility.md says so).
    for mode in ["user", "host", "none"] {
        home.ok(&["create", mode, "--disk-size", "16MB", "--network", mode]);
        let e = lume_decodes(&config(&home, mode)).unwrap_err();
        assert!(e.contains("networkMode"), "{e}");
    }
}

#[test]
fn lumes_vm_folders_load_here() {
    let home = Home::new();
    // A Linux VM and a macOS VM folder as lume writes them (VMConfig's
    // encoder: no networkMode in older versions, Data as base64).
    let folders = [
        (
            "lin",
            r#"{"os":"linux","cpuCount":4,"memorySize":4294967296,"diskSize":53687091200,"macAddress":"be:ab:5e:00:00:01","display":"1024x768","networkMode":"bridged:en0"}"#,
        ),
        (
            "mac",
            r#"{"os":"macOS","cpuCount":4,"memorySize":8589934592,"diskSize":107374182400,"macAddress":"ba:2c:13:9f:1a:07","display":"1024x768","hardwareModel":"YnBsaXN0MDDUAQIDBAUGBwpYJHZlcnNpb24=","machineIdentifier":"YnBsaXN0MDA="}"#,
        ),
    ];
    for (vm, text) in folders {
        let dir = home.vm_dir(vm);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), text).unwrap();
        std::fs::File::create(dir.join("disk.img"))
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        std::fs::write(dir.join("nvram.bin"), b"").unwrap();
        assert_eq!(lume_decodes(&serde_json::from_str(text).unwrap()), Ok(()));
    }
    let list: Value = serde_json::from_str(&home.ok(&["ls", "-f", "json"])).unwrap();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["lin", "mac"]);
    let lin = home.get("lin");
    assert_eq!(
        (
            &lin["os"],
            &lin["cpuCount"],
            &lin["memorySize"],
            &lin["networkMode"]
        ),
        (
            &Value::from("linux"),
            &Value::from(4),
            &Value::from(4u64 << 30),
            &Value::from("bridged:en0")
        )
    );
    let mac = home.get("mac");
    assert_eq!(mac["os"], "macOS");
    assert_eq!(
        mac["networkMode"], "nat",
        "no networkMode loads as nat, as lume"
    );
    // A change keeps every key lume wrote, and what lume needs.
    home.ok(&["set", "mac", "--cpu", "2"]);
    let cfg = config(&home, "mac");
    assert_eq!(cfg["hardwareModel"], "YnBsaXN0MDDUAQIDBAUGBwpYJHZlcnNpb24=");
    assert_eq!(cfg["machineIdentifier"], "YnBsaXN0MDA=");
    assert_eq!(cfg["cpuCount"], 2);
    assert_eq!(lume_decodes(&cfg), Ok(()));
    // A macOS VM is not run here.
    let err = home.fails(&["run", "mac"]);
    assert!(err.contains("Apple host") || err.contains("macOS"), "{err}");
}
