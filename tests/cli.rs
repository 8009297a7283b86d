//! Command-line tests against a temporary HOME: everything that does not
//! boot a guest. Each test has its own HOME, so they run in parallel.

mod common;

use common::Home;
use serde_json::Value;
use std::fs;

fn create_small(home: &Home, name: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "create",
        name,
        "--memory",
        "256MB",
        "--disk-size",
        "64MB",
        "--network",
        "user",
    ];
    args.extend_from_slice(extra);
    home.ok(&args)
}

#[test]
fn create_writes_a_lume_style_config_and_a_sparse_disk() {
    let home = Home::new();
    home.ok(&["create", "dev"]);
    let dir = home.vm_dir("dev");
    let cfg: Value =
        serde_json::from_str(&fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["os"], "linux");
    assert_eq!(cfg["cpuCount"], 2);
    assert_eq!(cfg["memorySize"], 2u64 << 30);
    assert_eq!(cfg["diskSize"], 20u64 << 30);
    assert_eq!(cfg["networkMode"], "nat");
    assert_eq!(cfg["display"], "1024x768");
    let mac = cfg["macAddress"].as_str().unwrap();
    let first = u8::from_str_radix(&mac[..2], 16).unwrap();
    assert_eq!(first & 0b11, 0b10, "locally administered unicast: {mac}");
    let meta = fs::metadata(dir.join("disk.img")).unwrap();
    assert_eq!(meta.len(), 20 << 30);
    use std::os::unix::fs::MetadataExt;
    assert!(meta.blocks() * 512 < 1 << 20, "disk must be sparse");

    let d = home.get("dev");
    for key in [
        "name",
        "os",
        "cpuCount",
        "memorySize",
        "diskSize",
        "display",
        "status",
        "vncUrl",
        "ipAddress",
        "sshAvailable",
        "locationName",
        "sharedDirectories",
        "networkMode",
        "macAddress",
        "accelerator",
    ] {
        assert!(d.get(key).is_some(), "VMDetails lacks {key}: {d}");
    }
    assert_eq!(d["status"], "stopped");
    assert_eq!(d["diskSize"]["total"], 20u64 << 30);
    assert_eq!(d["macAddress"], mac);
    assert_eq!(d["accelerator"], Value::Null);
}

#[test]
fn create_options_are_persisted() {
    let home = Home::new();
    home.ok(&[
        "create",
        "opt",
        "--cpu",
        "3",
        "--memory",
        "512mb",
        "--disk-size",
        "1",
        "--network",
        "BRIDGED:",
        "--mac-address",
        "52:54:00:ab:cd:ef",
    ]);
    let d = home.get("opt");
    assert_eq!(d["cpuCount"], 3);
    assert_eq!(d["memorySize"], 512u64 << 20);
    assert_eq!(d["diskSize"]["total"], 1u64 << 30);
    assert_eq!(d["networkMode"], "bridged");
    assert_eq!(d["macAddress"], "52:54:00:ab:cd:ef");
}

#[test]
fn direct_kernel_boot_files_are_copied_into_the_vm() {
    let home = Home::new();
    let k = home.path().join("k");
    let i = home.path().join("i");
    fs::write(&k, b"kernel").unwrap();
    fs::write(&i, b"initrd").unwrap();
    create_small(
        &home,
        "kb",
        &[
            "--kernel",
            k.to_str().unwrap(),
            "--initrd",
            i.to_str().unwrap(),
            "--cmdline",
            "console=ttyS0 x=1",
        ],
    );
    fs::remove_file(&k).unwrap();
    let dir = home.vm_dir("kb");
    assert_eq!(fs::read(dir.join("vmlinuz")).unwrap(), b"kernel");
    assert_eq!(fs::read(dir.join("initrd.img")).unwrap(), b"initrd");
    let cfg: Value =
        serde_json::from_str(&fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["kernelBoot"]["cmdline"], "console=ttyS0 x=1");
}

#[test]
fn image_import_converts_and_grows_to_the_disk_size() {
    let home = Home::new();
    let img = home.path().join("base.qcow2");
    common::sh(&format!(
        "qemu-img create -q -f qcow2 {} 32M",
        img.display()
    ));
    create_small(&home, "img", &["--image", img.to_str().unwrap()]);
    let disk = home.vm_dir("img").join("disk.img");
    assert_eq!(fs::metadata(&disk).unwrap().len(), 64 << 20);
    let info = common::sh(&format!("qemu-img info --output=json {}", disk.display()));
    assert!(info.contains("\"format\": \"raw\""), "{info}");
    // An image larger than --disk-size keeps its size.
    home.ok(&[
        "create",
        "big",
        "--disk-size",
        "16MB",
        "--image",
        img.to_str().unwrap(),
    ]);
    assert_eq!(home.get("big")["diskSize"]["total"], 32u64 << 20);
}

#[test]
fn bad_input_is_refused_and_creates_nothing() {
    let home = Home::new();
    let cases: &[(&[&str], &str)] = &[
        (&["create", "../evil"], "Invalid VM name"),
        (&["create", "a/b"], "Invalid VM name"),
        (&["create", ".hidden"], "Invalid VM name"),
        (&["create", "x", "--memory", "12XB"], "Invalid size '12XB'"),
        (&["create", "x", "--disk-size", "lots"], "Invalid size"),
        (
            &["create", "x", "--cpu", "0"],
            "CPU count must be at least 1",
        ),
        (
            &["create", "x", "--memory", "1MB"],
            "at least 64MB, for example 2GB",
        ),
        (
            &["create", "x", "--disk-size", "0"],
            "Disk size 0.0B is too small: give the VM at least 1MB, for example 20GB",
        ),
        (
            &["create", "x", "--network", "vpn"],
            "nat, bridged, bridged:<interface>, host, user, none",
        ),
        (
            &["create", "x", "--network", "bridged:a/b"],
            "Invalid interface name",
        ),
        (&["create", "x", "--os", "macOS"], "Apple host"),
        (
            &["create", "x", "--mac-address", "01:00:5e:00:00:01"],
            "multicast",
        ),
        (
            &["create", "x", "--kernel", "/nonexistent/vmlinuz"],
            "Kernel /nonexistent/vmlinuz does not exist",
        ),
        (
            &["create", "x", "--image", "/nonexistent.qcow2"],
            "Image /nonexistent.qcow2 does not exist",
        ),
    ];
    for (args, msg) in cases {
        let err = home.fails(args);
        assert!(
            err.contains(msg),
            "lume {args:?}: expected '{msg}' in: {err}"
        );
    }
    let left: Vec<_> = fs::read_dir(home.storage())
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "rejected creates left {left:?}");
    assert!(!home.path().join("evil").exists());
}

#[test]
fn a_failed_import_leaves_no_directory() {
    let home = Home::new();
    let bogus = home.path().join("bogus.qcow2");
    fs::write(&bogus, b"QFI\xfbthis is not really qcow2").unwrap();
    let err = home.fails(&["create", "x", "--image", bogus.to_str().unwrap()]);
    assert!(
        err.contains("Cannot import") && err.contains("qcow2 header is damaged"),
        "{err}"
    );
    assert!(fs::read_dir(home.storage()).unwrap().next().is_none());
    // A qcow2 header that passes our check but that qemu-img cannot read.
    let mut h = vec![0u8; 512];
    h[..4].copy_from_slice(b"QFI\xfb");
    h[4..8].copy_from_slice(&3u32.to_be_bytes());
    h[100..104].copy_from_slice(&104u32.to_be_bytes());
    fs::write(&bogus, &h).unwrap();
    let err = home.fails(&["create", "x", "--image", bogus.to_str().unwrap()]);
    assert!(
        err.contains("Importing") && err.contains("qemu-img says"),
        "{err}"
    );
    assert!(fs::read_dir(home.storage()).unwrap().next().is_none());
}

#[test]
fn images_naming_host_files_are_refused() {
    let home = Home::new();
    let p = |n: &str| home.path().join(n).display().to_string();
    // A qcow2 whose backing file is /etc/shadow: converting it would copy
    // that file into the VM's disk.
    common::sh(&format!(
        "qemu-img create -q -f qcow2 -F raw -b /etc/shadow -u {} 1M",
        p("backed.qcow2")
    ));
    let err = home.fails(&["create", "a", "--image", &p("backed.qcow2")]);
    assert!(err.contains("has a backing file"), "{err}");
    common::sh(&format!(
        "qemu-img create -q -f qcow2 -o data_file={} {} 1M",
        p("data.raw"),
        p("ext.qcow2")
    ));
    let err = home.fails(&["create", "b", "--image", &p("ext.qcow2")]);
    assert!(err.contains("external data file"), "{err}");
    common::sh(&format!("qemu-img create -q -f vmdk {} 1M", p("a.vmdk")));
    let err = home.fails(&["create", "c", "--image", &p("a.vmdk")]);
    assert!(
        err.contains("vmdk format") && err.contains("convert it to qcow2 or raw"),
        "{err}"
    );
    let left: Vec<_> = fs::read_dir(home.storage())
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "refused imports left {left:?}");
    // A raw image is whole 512-byte sectors; anything else is not a disk.
    fs::write(home.path().join("odd.raw"), b"RAW-BYTES").unwrap();
    let err = home.fails(&["create", "o", "--image", &p("odd.raw")]);
    assert!(err.contains("512-byte sectors"), "{err}");
    // A raw image is kept as it is, private, with its format recorded.
    let mut raw = b"RAW-BYTES".to_vec();
    raw.resize(4096, 0);
    fs::write(home.path().join("r.raw"), raw).unwrap();
    create_small(&home, "r", &["--image", &p("r.raw")]);
    let dir = home.vm_dir("r");
    assert!(
        fs::read(dir.join("disk.img"))
            .unwrap()
            .starts_with(b"RAW-BYTES")
    );
    let cfg: Value =
        serde_json::from_str(&fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["diskFormat"], "raw");
}

#[test]
fn huge_stop_timeouts_are_refused_without_a_panic() {
    let home = Home::new();
    create_small(&home, "t", &[]);
    let err = home.fails(&["stop", "t", "--timeout", "18446744073709551615"]);
    assert!(err.contains("at most 3600 seconds"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn relative_storage_is_the_same_place_for_every_command() {
    let home = Home::new();
    let mut c = home.cmd();
    c.current_dir(home.path()).args([
        "create",
        "rel",
        "--storage",
        "./vms",
        "--disk-size",
        "8MB",
        "--network",
        "none",
    ]);
    assert!(c.output().unwrap().status.success());
    // From another directory, the absolute path finds it.
    let abs = home.path().join("vms");
    let out = home.ok(&[
        "get",
        "rel",
        "--storage",
        abs.to_str().unwrap(),
        "-f",
        "json",
    ]);
    assert!(out.contains("\"rel\""), "{out}");
    // Relative to the current directory, reported (and used) as absolute.
    let out = home
        .cmd()
        .current_dir(home.path())
        .args(["get", "rel", "--storage", "./vms", "-f", "json"])
        .output()
        .unwrap();
    let d: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(d[0]["locationName"], abs.to_str().unwrap());
}

fn mode(p: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn vms_of_the_previous_release_are_made_private_and_keep_working() {
    let home = Home::new();
    common::write_previous_release_vm(&home, "old", b"kernel", b"initrd", "console=ttyS0");
    let d = home.get("old");
    assert_eq!(d["cpuCount"], 1);
    let dir = home.vm_dir("old");
    assert_eq!(mode(&dir), 0o700);
    for f in [
        "config.json",
        "vmlinuz",
        "initrd.img",
        "disk.img",
        "console.log",
        "lume.log",
        ".lock",
        ".cfg.lock",
    ] {
        assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
    }
    let cfg: Value =
        serde_json::from_str(&fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["diskFormat"], "raw");
    assert_eq!(cfg["macAddress"], "52:54:00:12:34:56");
    assert_eq!(cfg["kernelBoot"]["cmdline"], "console=ttyS0");
    home.ok(&["set", "old", "--cpu", "2", "--disk-size", "32MB"]);
    assert_eq!(home.get("old")["cpuCount"], 2);
    assert_eq!(fs::metadata(dir.join("disk.img")).unwrap().len(), 32 << 20);
    // `run` gets as far as QEMU: without it on PATH, the error names the package.
    let out = home
        .cmd()
        .args(["run", "old"])
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("qemu-system-x86"));
}

#[test]
fn planted_links_and_paths_in_config_json_are_refused() {
    let home = Home::new();
    create_small(&home, "p", &[]);
    let dir = home.vm_dir("p");
    // A symlink in place of disk.img.
    fs::remove_file(dir.join("disk.img")).unwrap();
    std::os::unix::fs::symlink("/etc/shadow", dir.join("disk.img")).unwrap();
    let err = home.fails(&["run", "p"]);
    assert!(err.contains("is not a regular file"), "{err}");
    // An absolute kernel path written into config.json.
    let cfg_path = dir.join("config.json");
    let mut cfg: Value = serde_json::from_str(&fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["kernelBoot"] = serde_json::json!({"kernel": "/etc/shadow", "cmdline": ""});
    fs::write(&cfg_path, cfg.to_string()).unwrap();
    let err = home.fails(&["run", "p"]);
    assert!(
        err.contains("only a file name inside the VM directory"),
        "{err}"
    );
    let err = home.fails(&["get", "p"]);
    assert!(err.contains("kernelBoot.kernel"), "{err}");
}

#[test]
fn an_existing_name_is_refused_and_kept_intact() {
    let home = Home::new();
    create_small(&home, "keep", &["--cpu", "1"]);
    let before = fs::read(home.vm_dir("keep").join("config.json")).unwrap();
    let err = home.fails(&["create", "keep", "--cpu", "4"]);
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(
        fs::read(home.vm_dir("keep").join("config.json")).unwrap(),
        before
    );
}

#[test]
fn unknown_vm_is_an_error_for_every_command() {
    let home = Home::new();
    for args in [
        vec!["get", "ghost"],
        vec!["run", "ghost"],
        vec!["stop", "ghost"],
        vec!["set", "ghost", "--cpu", "1"],
        vec!["delete", "ghost", "--force"],
        vec!["clone", "ghost", "other"],
    ] {
        let err = home.fails(&args);
        assert!(err.contains("VM 'ghost' does not exist"), "{args:?}: {err}");
        assert!(err.contains("lume ls"), "{err}");
    }
}

#[test]
fn corrupt_config_fails_get_and_run_but_ls_lists_the_rest() {
    let home = Home::new();
    create_small(&home, "good", &[]);
    create_small(&home, "bad", &[]);
    let bad_cfg = home.vm_dir("bad").join("config.json");
    fs::write(&bad_cfg, "{\"os\": \"linux\", \"cpuCount\": ").unwrap();
    for args in [
        vec!["get", "bad"],
        vec!["run", "bad"],
        vec!["set", "bad", "--cpu", "1"],
        vec!["clone", "bad", "c"],
    ] {
        let err = home.fails(&args);
        assert!(
            err.contains(&bad_cfg.display().to_string()),
            "{args:?}: {err}"
        );
    }
    let list: Value = serde_json::from_str(&home.ok(&["ls", "-f", "json"])).unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2);
    let bad = list.iter().find(|v| v["name"] == "bad").unwrap();
    assert_eq!(bad["status"], "invalid");
    assert!(
        bad["error"]
            .as_str()
            .unwrap()
            .contains("Corrupt config file")
    );
    let good = list.iter().find(|v| v["name"] == "good").unwrap();
    assert_eq!(good["status"], "stopped");
    let table = home.ok(&["ls"]);
    assert!(
        table.contains("good") && table.contains("invalid"),
        "{table}"
    );
    // Nothing was rewritten.
    assert_eq!(
        fs::read_to_string(&bad_cfg).unwrap(),
        "{\"os\": \"linux\", \"cpuCount\": "
    );
}

#[test]
fn a_config_written_by_lume_loads_as_nat() {
    let home = Home::new();
    let dir = home.vm_dir("mac");
    fs::create_dir_all(&dir).unwrap();
    fs::write(
        dir.join("config.json"),
        r#"{"os":"macOS","cpuCount":4,"memorySize":8589934592,"diskSize":68719476736,"macAddress":"ba:2c:13:9f:1a:07","display":"1024x768","hardwareModel":"YnBsaXN0MDA=","machineIdentifier":"AAE="}"#,
    )
    .unwrap();
    let d = home.get("mac");
    assert_eq!(d["networkMode"], "nat");
    assert_eq!(d["os"], "macOS");
    home.ok(&["set", "mac", "--cpu", "2"]);
    let cfg: Value =
        serde_json::from_str(&fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        cfg["hardwareModel"], "YnBsaXN0MDA=",
        "unknown keys are kept"
    );
    assert_eq!(cfg["cpuCount"], 2);
    let err = home.fails(&["run", "mac"]);
    assert!(err.contains("Apple host"), "{err}");
}

#[test]
fn set_changes_settings_and_only_grows_the_disk() {
    let home = Home::new();
    create_small(&home, "s", &[]);
    home.ok(&[
        "set",
        "s",
        "--cpu",
        "4",
        "--memory",
        "1GB",
        "--disk-size",
        "128MB",
        "--network",
        "none",
    ]);
    let d = home.get("s");
    assert_eq!(d["cpuCount"], 4);
    assert_eq!(d["memorySize"], 1u64 << 30);
    assert_eq!(d["diskSize"]["total"], 128u64 << 20);
    assert_eq!(d["networkMode"], "none");
    assert_eq!(
        fs::metadata(home.vm_dir("s").join("disk.img"))
            .unwrap()
            .len(),
        128 << 20
    );
    let err = home.fails(&["set", "s", "--disk-size", "64MB"]);
    assert!(err.contains("can only grow"), "{err}");
    assert!(
        home.fails(&["set", "s", "--cpu", "0"])
            .contains("at least 1")
    );
    assert!(
        home.fails(&["set", "s", "--network", "wifi"])
            .contains("Unknown network mode")
    );
    // As lume: nothing to change is no error, and changes nothing.
    home.ok(&["set", "s"]);
    assert_eq!(home.get("s")["cpuCount"], 4);
}

#[test]
fn clone_copies_the_disk_with_a_new_mac() {
    let home = Home::new();
    create_small(&home, "src", &[]);
    let disk = home.vm_dir("src").join("disk.img");
    common::sh(&format!(
        "printf 'hello-disk' | dd of={} bs=1 seek=1048576 conv=notrunc status=none",
        disk.display()
    ));
    let out = home.ok(&["clone", "src", "dst"]);
    assert!(out.contains("clone"), "{out}");
    let (a, b) = (home.get("src"), home.get("dst"));
    assert_ne!(a["macAddress"], b["macAddress"]);
    assert_eq!(a["diskSize"], b["diskSize"]);
    assert_eq!(
        fs::read(&disk).unwrap(),
        fs::read(home.vm_dir("dst").join("disk.img")).unwrap()
    );
    assert!(
        home.fails(&["clone", "src", "dst"])
            .contains("already exists")
    );
    assert!(
        home.fails(&["clone", "src", "../x"])
            .contains("Invalid VM name")
    );
}

#[test]
fn delete_without_an_answer_deletes_nothing() {
    let home = Home::new();
    create_small(&home, "d", &[]);
    // No answer on stdin (closed): lume's "Deletion cancelled", status 0.
    let out = home.ok(&["delete", "d"]);
    assert!(out.contains("Deletion cancelled"), "{out}");
    assert!(home.vm_dir("d").exists());
    home.ok(&["delete", "d", "--force"]);
    assert!(!home.vm_dir("d").exists());
    assert!(
        fs::read_dir(home.storage()).unwrap().next().is_none(),
        "no leftovers"
    );
}

#[test]
fn storage_option_selects_another_location() {
    let home = Home::new();
    let other = home.path().join("elsewhere");
    let o = other.to_str().unwrap();
    home.ok(&["create", "x", "--storage", o, "--disk-size", "8MB"]);
    assert!(other.join("x/config.json").exists());
    assert!(!home.vm_dir("x").exists());
    let list: Value =
        serde_json::from_str(&home.ok(&["ls", "-f", "json", "--storage", o])).unwrap();
    assert_eq!(list[0]["locationName"], o);
    assert_eq!(home.ok(&["ls", "--format", "json"]).trim(), "[]");
}

#[test]
fn missing_qemu_names_the_package() {
    let home = Home::new();
    create_small(&home, "q", &[]);
    // --network none: user mode would first miss passt on this PATH.
    let out = home
        .cmd()
        .args(["run", "q", "--network", "none"])
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("qemu-system-x86"), "{err}");
}

#[test]
fn run_refuses_missing_iso_and_disk_files() {
    let home = Home::new();
    create_small(&home, "r", &[]);
    assert!(
        home.fails(&["run", "r", "--mount", "/nonexistent.iso"])
            .contains("ISO image /nonexistent.iso does not exist")
    );
    assert!(
        home.fails(&["run", "r", "--disk", "/nonexistent.img"])
            .contains("Disk /nonexistent.img does not exist")
    );
    // The same USB image twice, by two names: refused before QEMU starts.
    let usb = home.path().join("u.img");
    fs::write(&usb, vec![0u8; 1 << 20]).unwrap();
    let alias = home.path().join("u-link.img");
    std::os::unix::fs::symlink(&usb, &alias).unwrap();
    let err = home.fails(&[
        "run",
        "r",
        "--usb-storage",
        usb.to_str().unwrap(),
        "--usb-storage",
        alias.to_str().unwrap(),
    ]);
    assert!(
        err.contains("is given twice: give each image once"),
        "{err}"
    );
    // Shares: a file is not a directory; a magic link says what to do;
    // more than 8 are refused before any is opened.
    let err = home.fails(&["run", "r", "--shared-dir", usb.to_str().unwrap()]);
    assert!(err.contains("is not a directory"), "{err}");
    let err = home.fails(&["run", "r", "--shared-dir", "/proc/self/root/tmp"]);
    assert!(err.contains("give the real path"), "{err}");
    let mut many = vec!["run", "r"];
    for _ in 0..9 {
        many.extend(["--shared-dir", "/nonexistent-dir"]);
    }
    let err = home.fails(&many);
    assert!(err.contains("lume shares at most 8 per VM"), "{err}");
    assert!(!home.vm_dir("r").join("run.json").exists());
}

#[test]
fn settings_keep_unknown_keys_and_refuse_bad_accelerators() {
    let home = Home::new();
    home.write_settings("cachingEnabled: true\n");
    home.ok(&["config", "set", "accelerator", "kvm"]);
    let text = fs::read_to_string(home.config_yaml()).unwrap();
    assert!(
        text.contains("cachingEnabled: true") && text.contains("accelerator: kvm"),
        "{text}"
    );
    assert!(
        home.fails(&["config", "set", "accelerator", "warp"])
            .contains("use kvm, tcg or auto")
    );
    let got = home
        .cmd()
        .args(["config", "get"])
        .env_remove("LUME_ACCEL")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&got.stdout).contains("accelerator: kvm"));
    home.write_settings("accelerator: [oops\n");
    assert!(home.fails(&["ls"]).contains("config.yaml"));
}

#[test]
fn config_keys_can_be_removed_and_empty_values_or_missing_groups_are_refused() {
    let home = Home::new();
    home.write_settings("cachingEnabled: true\nnatSubnet: 198.51.100.0/24\n");
    let out = home.ok(&["config", "unset", "natSubnet"]);
    assert!(out.contains("Removed natSubnet from"), "{out}");
    let text = fs::read_to_string(home.config_yaml()).unwrap();
    assert!(!text.contains("natSubnet"), "{text}");
    assert!(text.contains("cachingEnabled: true"), "{text}");
    let out = home.ok(&["config", "unset", "natSubnet"]);
    assert!(out.contains("natSubnet is not set in"), "{out}");
    // An empty value is not a way to remove a key: it says which command is.
    for empty in ["", " "] {
        let err = home.fails(&["config", "set", "homeDirectory", empty]);
        assert!(
            err.contains("An empty value for 'homeDirectory' is refused: to remove the key, run `lume config unset homeDirectory`"),
            "{err}"
        );
        // Refused before anything is made (the test runs in the crate's folder).
        assert!(!std::path::Path::new(empty).exists() || empty.is_empty());
    }
    // apiGroup must name an existing group.
    let err = home.fails(&["config", "set", "apiGroup", "no-such-group-lume"]);
    assert!(
        err.contains("Group 'no-such-group-lume' does not exist"),
        "{err}"
    );
    assert!(
        !fs::read_to_string(home.config_yaml())
            .unwrap()
            .contains("apiGroup")
    );
    home.ok(&["config", "set", "apiGroup", "root"]);
    assert!(
        fs::read_to_string(home.config_yaml())
            .unwrap()
            .contains("apiGroup: root")
    );
    home.ok(&["config", "unset", "apiGroup"]);
    assert!(
        !fs::read_to_string(home.config_yaml())
            .unwrap()
            .contains("apiGroup")
    );
}

#[test]
fn publish_is_validated_and_persisted() {
    let home = Home::new();
    home.ok(&[
        "create",
        "p",
        "--disk-size",
        "8MB",
        "--network",
        "user",
        "-p",
        "8080:80",
        "--publish",
        "127.0.0.1:2222:22/tcp",
    ]);
    let d = home.get("p");
    assert_eq!(
        d["network"]["publishedPorts"],
        serde_json::json!(["8080:80/tcp", "127.0.0.1:2222:22/tcp"])
    );
    assert_eq!(d["network"]["mode"], "user");
    let cases: &[(&[&str], &str)] = &[
        (&["create", "x", "--publish", "80"], "HOST_PORT:GUEST_PORT"),
        (
            &["create", "x", "--publish", "0:80"],
            "ports are 1 to 65535",
        ),
        (
            &[
                "create",
                "x",
                "--publish",
                "8080:80",
                "--publish",
                "8080:81",
            ],
            "published twice",
        ),
        (
            &[
                "create",
                "x",
                "--network",
                "bridged",
                "--publish",
                "8080:80",
            ],
            "cannot be published in network mode 'bridged'",
        ),
        (
            &["create", "x", "--network", "none", "--publish", "8080:80"],
            "cannot be published",
        ),
        (
            &["create", "x", "--network", "host", "--publish", "8080:80"],
            "cannot be published",
        ),
        (
            &["set", "p", "--network", "bridged:eth0"],
            "cannot be published",
        ),
    ];
    for (args, msg) in cases {
        let err = home.fails(args);
        assert!(
            err.contains(msg),
            "lume {args:?}: expected '{msg}' in: {err}"
        );
    }
    assert!(!home.vm_dir("x").exists());
    assert_eq!(home.get("p")["networkMode"], "user");
}

#[test]
fn delete_asks_on_a_terminal() {
    let home = Home::new();
    create_small(&home, "t", &[]);
    // `script` gives lume a pseudo-terminal; the answer comes on its stdin.
    let ask = |answer: &str| {
        let mut c = std::process::Command::new("script");
        c.args([
            "-qec",
            &format!("{} delete t", common::lume_bin().display()),
            "/dev/null",
        ]);
        home.env(&mut c);
        c.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped());
        let mut child = c.spawn().unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(answer.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let out = ask("n\n");
    assert!(
        out.contains("Are you sure you want to delete the virtual machine 't'? [y/N]"),
        "{out}"
    );
    assert!(out.contains("Deletion cancelled"), "{out}");
    assert!(home.vm_dir("t").exists());
    // An endless answer without a newline: read up to a bound, then refused
    // (without the bound, lume reads /dev/zero until memory runs out).
    let mut c = std::process::Command::new("timeout");
    c.args(["30"])
        .arg(common::lume_bin())
        .args(["delete", "t"])
        .stdin(std::fs::File::open("/dev/zero").unwrap());
    home.env(&mut c);
    let out = c.output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("Deletion cancelled"));
    assert!(home.vm_dir("t").exists());
    let out = ask("y\n");
    assert!(out.contains("VM 't' deleted"), "{out}");
    assert!(!home.vm_dir("t").exists());
}

#[test]
fn host_loopback_is_an_explicit_per_vm_opt_in() {
    let home = Home::new();
    create_small(&home, "u", &[]);
    let cfg = || std::fs::read_to_string(home.vm_dir("u").join("config.json")).unwrap();
    assert!(!cfg().contains("unsafeHostLoopback"), "off by default");
    home.ok(&["set", "u", "--unsafe-host-loopback", "true", "--cpu", "2"]);
    let v: serde_json::Value = serde_json::from_str(&cfg()).unwrap();
    assert_eq!(v["unsafeHostLoopback"], true);
    assert_eq!(v["cpuCount"], 2);
    home.ok(&["set", "u", "--unsafe-host-loopback", "false"]);
    assert!(!cfg().contains("unsafeHostLoopback"));
    // Turning it on warns; in another mode than user it is stored with a note.
    let set = |name: &str, on: &str| {
        let out = home.lume(&["set", name, "--unsafe-host-loopback", on]);
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stderr).unwrap()
    };
    let err = set("u", "true");
    assert!(
        err.contains(
            "Warning: in user mode VM 'u' now reaches every service on this host's loopback"
        ),
        "{err}"
    );
    assert!(
        !err.contains("applies to network mode 'user' only"),
        "{err}"
    );
    home.ok(&["create", "off", "--disk-size", "8MB", "--network", "none"]);
    let err = set("off", "true");
    assert!(err.contains("Warning:"), "{err}");
    assert!(
        err.contains("Note: --unsafe-host-loopback applies to network mode 'user' only; VM 'off' is in mode 'none'"),
        "{err}"
    );
    let err = set("off", "false");
    assert!(!err.contains("Warning:"), "{err}");
    assert!(err.contains("applies to network mode 'user' only"), "{err}");
    // A NAT port on loopback is refused at create and when switching to nat.
    let err = home.fails(&[
        "create",
        "n",
        "--disk-size",
        "8MB",
        "--network",
        "nat",
        "--publish",
        "127.0.0.1:8080:80",
    ]);
    assert!(
        err.contains("Cannot publish 127.0.0.1:8080:80/tcp in network mode 'nat'"),
        "{err}"
    );
    create_small(&home, "p", &["--publish", "127.0.0.1:2222:22"]);
    let err = home.fails(&["set", "p", "--network", "nat"]);
    assert!(err.contains("--network user"), "{err}");
}

#[test]
fn user_mode_without_passt_says_how_to_install_it() {
    let home = Home::new();
    create_small(&home, "u", &[]);
    let out = home
        .cmd()
        .env("PATH", "/nonexistent")
        .args(["run", "u"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("passt was not found") && err.contains("apt-get install passt"),
        "{err}"
    );
}

#[test]
fn network_doctor_help_says_which_vms_it_checks() {
    let home = Home::new();
    let help = home.ok(&["network", "doctor", "--help"]);
    assert!(
        help.contains("--storage") && help.contains("running VMs of one storage location"),
        "{help}"
    );
    assert!(!help.contains("every running VM"), "{help}");
}

#[test]
fn config_set_validates_known_keys_and_warns_about_unknown_ones() {
    let home = Home::new();
    let err = home.fails(&["config", "set", "natSubnet", "bogus"]);
    assert!(
        err.contains("The setting 'natSubnet' must be an IPv4 subnet")
            && err.contains("Invalid subnet 'bogus'"),
        "{err}"
    );
    let err = home.fails(&["config", "set", "natBridge", "a b"]);
    assert!(
        err.contains("The interface name 'a b' for natBridge is invalid"),
        "{err}"
    );
    let err = home.fails(&["config", "set", "homeDirectory", "vms"]);
    assert!(err.contains("must be an absolute path"), "{err}");
    assert!(!home.config_yaml().exists(), "nothing stored");
    // A misspelt key: a warning naming the known one, stored all the same.
    let out = home.lume(&["config", "set", "firewallaccommodation", "false"]);
    assert!(out.status.success());
    let warn = String::from_utf8_lossy(&out.stderr);
    assert!(
        warn.contains("Warning: 'firewallaccommodation' is not a key lume reads")
            && warn.contains("did you mean firewallAccommodation?"),
        "{warn}"
    );
    let text = fs::read_to_string(home.config_yaml()).unwrap();
    assert!(text.contains("firewallaccommodation: 'false'"), "{text}");
    // A known key: no warning.
    let out = home.lume(&["config", "set", "natSubnet", "203.0.113.0/24"]);
    assert!(out.status.success() && out.stderr.is_empty(), "{out:?}");
    // get KEY prints only the value; a known key's default when not set.
    assert_eq!(home.ok(&["config", "get", "natSubnet"]), "203.0.113.0/24\n");
    assert_eq!(home.ok(&["config", "get", "hostBridge"]), "lume-host0\n");
    assert_eq!(
        home.ok(&["config", "get", "firewallaccommodation"]),
        "false\n"
    );
    home.ok(&["config", "set", "firewallAccommodation", "false"]);
    assert_eq!(
        home.ok(&["config", "get", "firewallAccommodation"]),
        "false\n"
    );
    let err = home.fails(&["config", "get", "apiGroup"]);
    assert!(err.contains("'apiGroup' is not set in"), "{err}");
}

#[test]
fn cloud_init_options_are_saved_and_lume_ssh_needs_a_running_vm() {
    let home = Home::new();
    let ud = home.path().join("ud.yaml");
    fs::write(&ud, "#cloud-config\nruncmd: [true]\n").unwrap();
    let ud_s = ud.display().to_string();
    create_small(&home, "ci", &["--no-password", "--cloud-init", &ud_s]);
    let dir = home.vm_dir("ci");
    let cfg: Value =
        serde_json::from_str(&fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["cloudInit"]["password"], false);
    assert_eq!(cfg["cloudInit"]["userData"], true);
    assert_eq!(cfg["vmId"].as_str().unwrap().len(), 32);
    assert_eq!(
        fs::read_to_string(dir.join("user-data")).unwrap(),
        "#cloud-config\nruncmd: [true]\n"
    );
    // A file that is not user-data is refused and nothing is created.
    let plain = home.path().join("plain.yaml");
    fs::write(&plain, "runcmd: [true]\n").unwrap();
    let err = home.fails(&[
        "create",
        "bad",
        "--cloud-init",
        &plain.display().to_string(),
    ]);
    assert!(err.contains("start it with #cloud-config"), "{err}");
    assert!(!home.vm_dir("bad").exists());
    // --no-cloud-init with --cloud-init is a usage error.
    let out = home.lume(&["create", "x", "--no-cloud-init", "--cloud-init", &ud_s]);
    assert_eq!(out.status.code(), Some(64), "lume's EX_USAGE");
    create_small(&home, "off", &["--no-cloud-init"]);
    let cfg: Value =
        serde_json::from_str(&fs::read_to_string(home.vm_dir("off").join("config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["cloudInit"]["enabled"], false);

    let err = home.fails(&["ssh", "ci", "true"]);
    assert!(err.contains("VM 'ci' is not running"), "{err}");
    let err = home.fails(&["ssh", "ghost"]);
    assert!(err.contains("does not exist"), "{err}");
}

/// Runs lume with a standard output whose reader is already gone (as
/// `lume ls | head -1` once head has exited) and returns its exit status and
/// standard error.
fn into_closed_pipe(home: &Home, args: &[&str]) -> (Option<i32>, String) {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = home
        .cmd()
        .args(args)
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_closed_pipe_ends_lume_quietly() {
    let home = Home::new();
    for i in 0..2 {
        let name = format!("p{i}");
        home.ok(&[
            "create",
            &name,
            "--memory",
            "256MB",
            "--disk-size",
            "16MB",
            "--network",
            "none",
        ]);
    }
    for args in [
        &["ls", "-f", "json"][..],
        &["ls"],
        &["config", "get"],
        &["ls", "-f", "json", "--storage", "home"],
        &["get", "p1"],
        &["--help"],
    ] {
        let (code, err) = into_closed_pipe(&home, args);
        assert_eq!(code, Some(0), "lume {args:?}: {err}");
        assert!(err.is_empty(), "lume {args:?}: {err}");
    }
}

#[test]
fn usage_errors_are_capitalised_and_say_what_is_expected() {
    let home = Home::new();
    for (args, expected) in [
        (
            &["stop", "x", "--timeout", "x"][..],
            "Error: Invalid value 'x' for '--timeout <SECONDS>': a whole number of seconds, such as 60",
        ),
        (
            &["create", "x", "--cpu", "two"],
            "Error: Invalid value 'two' for '--cpu <COUNT>': a whole number of virtual CPUs, such as 2",
        ),
        (
            &["serve", "--port", "http"],
            "Error: Invalid value 'http' for '--port <PORT>': a port number from 0 to 65535, such as 7777",
        ),
        (&["create"], "Error: The following required arguments"),
    ] {
        let out = home.lume(args);
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.starts_with(expected), "{args:?}: {err}");
    }
}

#[test]
fn delete_after_a_yes_stops_a_running_vm_first() {
    let home = Home::new();
    home.ok(&[
        "create",
        "busy",
        "--memory",
        "256MB",
        "--disk-size",
        "16MB",
        "--network",
        "none",
    ]);
    // An empty disk: QEMU sits in its firmware, running, and never powers
    // off by itself (the stop is forced after its timeout).
    home.ok(&["run", "busy", "--detach"]);
    assert_eq!(home.get("busy")["status"], "running");

    // Moving the default away from a running VM warns (as lume, it keeps
    // running where it is).
    let stderr = |args: &[&str]| {
        let out = home.lume(args);
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let other = home.path().join("other");
    let old = home.storage();
    let old = old.to_str().unwrap();
    home.ok(&["config", "storage", "add", "other", other.to_str().unwrap()]);
    let w = stderr(&["config", "storage", "default", "other"]);
    assert!(w.contains("Warning: running VMs busy stay in"), "{w}");
    assert!(w.contains("commands still find them by name"), "{w}");
    assert!(stderr(&["config", "storage", "default", "home"]).is_empty());
    // home's path changed: the VM is no longer listed until --storage OLD.
    let moved = home.path().join("moved");
    let w = stderr(&["config", "set", "homeDirectory", moved.to_str().unwrap()]);
    assert!(w.contains("no longer a VM location"), "{w}");
    assert!(w.contains(&format!("--storage {old}")), "{w}");
    assert!(!home.ok(&["ls"]).contains("busy"));
    assert!(home.ok(&["ls", "--storage", old]).contains("busy"));
    assert!(stderr(&["config", "set", "homeDirectory", old]).is_empty());
    let mut child = home
        .cmd()
        .args(["delete", "busy"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child.stdin.take().unwrap().write_all(b"y\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.ends_with("[y/N] VM 'busy' deleted\n"), "{text}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Stopping VM 'busy' before deleting it"),
        "{err}"
    );
    assert!(!home.vm_dir("busy").exists());
}

#[test]
fn messages_say_what_to_do_next() {
    let home = Home::new();
    let e = home.fails(&["create", "c", "--cpu", "0", "--network", "none"]);
    assert!(
        e.contains("CPU count must be at least 1: use --cpu 1 or more"),
        "{e}"
    );
    home.ok(&[
        "create",
        "c",
        "--memory",
        "256MB",
        "--disk-size",
        "32MB",
        "--network",
        "none",
    ]);
    let e = home.fails(&["set", "c", "--disk-size", "16MB"]);
    assert!(e.contains("can only grow"), "{e}");
    assert!(e.contains("give a size of 32"), "{e}");
    let e = home.fails(&["run", "c", "--mount", "/nonexistent.iso"]);
    assert!(
        e.contains("does not exist or is not a file: check the path"),
        "{e}"
    );
}

/// Run as a user (nobody), the doctor says what needs root and passes when
/// network user works: a tun device that user may not open is a matter of
/// rights, and the firewall it may not list is one line, not nft's output.
#[test]
fn network_doctor_as_a_user_passes_and_says_what_needs_root() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    nix::unistd::chown(&home, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
    // The test binary's target/ may not be open to nobody: a copy is.
    let lume = dir.path().join("lume");
    std::fs::copy(env!("CARGO_BIN_EXE_lume"), &lume).unwrap();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .arg(&lume)
        .args(["network", "doctor", "-f", "json"])
        .env("HOME", &home)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("XDG_DATA_HOME")
        .current_dir(&home)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&text).unwrap();
    let detail = |name: &str| {
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .map(|c| c["detail"].as_str().unwrap().to_string())
            .unwrap_or_default()
    };
    assert!(detail("privileges").contains("network user"), "{text}");
    let tun = detail("/dev/net/tun");
    assert!(!tun.contains("modprobe"), "{tun}");
    let firewall = detail("other firewalls");
    assert!(
        firewall.starts_with("Listing the firewall needs root") && !firewall.contains('\n'),
        "{firewall}"
    );
}

/// Text typed or piped into `lume serve --mcp` is not taken for a session
/// that ended: the server says what it expected.
#[test]
fn serve_mcp_says_when_its_input_is_not_json_rpc() {
    use std::io::Write;
    let home = tempfile::tempdir().unwrap();
    let run = |input: &[u8]| {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_lume"))
            .args(["serve", "--mcp"])
            .env("HOME", home.path())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().unwrap()
    };
    let out = run(b"hello\n");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("Standard input was not MCP JSON-RPC"), "{err}");
    assert!(out.stdout.is_empty());
    let out = run(b"");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn ipv6_subnets_show_their_default_and_are_checked_at_config_set() {
    let home = Home::new();
    let nat = home.ok(&["config", "get", "natSubnet6"]);
    let host = home.ok(&["config", "get", "hostSubnet6"]);
    if std::path::Path::new("/proc/sys/net/ipv6/conf/all").exists() {
        // This machine's unique local prefixes, one per network.
        for p in [&nat, &host] {
            assert!(p.starts_with("fd") && p.trim().ends_with("::/64"), "{p}");
        }
        assert_ne!(nat, host);
    }
    let err = home.fails(&["config", "set", "natSubnet6", "fe80::/64"]);
    assert!(err.contains("a link-local prefix"), "{err}");
    let err = home.fails(&["config", "set", "natSubnet6", "2001:db8:64::5/64"]);
    assert!(err.contains("its /64 is 2001:db8:64::/64"), "{err}");
    home.ok(&["config", "set", "natSubnet6", "2001:db8:64::/64"]);
    let err = home.fails(&["config", "set", "hostSubnet6", "2001:db8:64::/64"]);
    assert!(
        err.contains("natSubnet6 is 2001:db8:64::/64 already: give hostSubnet6 another /64"),
        "{err}"
    );
    home.ok(&["config", "set", "hostSubnet6", "none"]);
    assert_eq!(home.ok(&["config", "get", "hostSubnet6"]).trim(), "none");
}
