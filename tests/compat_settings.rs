//! Compatibility with lume 0.5.3's settings and storage locations
//! (`src/FileSystem/Settings.swift`, `VMLocation.swift`, `Home.swift`,
//! `src/Commands/Config.swift`, the `--storage` options of the commands and
//! the config routes of `src/Server/Server.swift` / `Handlers.swift`): the
//! same output, keys, messages and JSON shapes, or the documented refusal.
//! No guest is booted.

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use common::{Home, Netns, lume_bin};

fn create(home: &Home, name: &str, extra: &[&str]) {
    let mut args = vec![
        "create",
        name,
        "--memory",
        "256MB",
        "--disk-size",
        "8MB",
        "--network",
        "none",
    ];
    args.extend_from_slice(extra);
    home.ok(&args);
}

fn ls(home: &Home, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["ls", "-f", "json"];
    args.extend_from_slice(extra);
    serde_json::from_str::<Value>(&home.ok(&args))
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn names_and_locations(vms: &[Value]) -> Vec<(String, String)> {
    vms.iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap().to_string(),
                v["locationName"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Config.swift `Get`: `lume config` (no subcommand) is `get`; the lines
/// are lume's, with lume 0.5.3's defaults; our own keys follow.
#[test]
fn config_get_prints_what_lume_prints() {
    let home = Home::new();
    let lume_part = "Default VM storage: home (~/.lume)\nCache directory: ~/.lume/cache\nCaching enabled: false\nTelemetry enabled: true\nRegistry type: ghcr\nRegistry: ghcr.io/trycua\n\nConfigured VM storage locations:\n  - home: ~/.lume (default)\n";
    let bare = home.ok(&["config"]);
    let get = home.ok(&["config", "get"]);
    assert_eq!(bare, get);
    assert!(get.starts_with(lume_part), "{get}");
    assert!(get.contains("accelerator: "), "{get}");
    assert!(get.contains("none is ever sent"), "{get}");
    // One key at a time, with lume's defaults.
    for (key, value) in [
        ("defaultLocationName", "home"),
        ("cacheDirectory", "~/.lume/cache"),
        ("cachingEnabled", "false"),
        ("telemetryEnabled", "true"),
    ] {
        assert_eq!(home.ok(&["config", "get", key]).trim(), value, "{key}");
    }
    assert_eq!(
        home.ok(&["config", "get", "homeDirectory"]).trim(),
        home.storage().display().to_string()
    );
    assert_eq!(
        home.ok(&["config", "get", "vmLocations"]).trim(),
        "- name: home\n  path: ~/.lume"
    );
}

/// Settings.swift `saveSettings`: a config.yaml written by lume on macOS
/// loads unchanged, and its locations are used.
#[test]
fn a_config_written_by_lume_on_macos_loads() {
    let home = Home::new();
    let ssd = home.path().join("ssd");
    home.write_settings(&format!(
        "# Lume Configuration\n\ndefaultLocationName: \"ssd\"\ncacheDirectory: \"~/.lume/cache\"\ncachingEnabled: true\ntelemetryEnabled: false\n\n# VM Locations\nvmLocations:\n  - name: \"home\"\n    path: \"~/.lume\"\n  - name: \"ssd\"\n    path: \"{}\"\n\n# Registry Configuration\nregistry:\n  type: \"ghcr\"\n  ghcr:\n    registry: \"registry.example\"\n    organization: \"team\"\n",
        ssd.display()
    ));
    let before = std::fs::read_to_string(home.config_yaml()).unwrap();
    let get = home.ok(&["config"]);
    assert!(
        get.starts_with(&format!(
            "Default VM storage: ssd ({})\nCache directory: ~/.lume/cache\nCaching enabled: true\nTelemetry enabled: false\nRegistry type: ghcr\nRegistry: registry.example/team\n\nConfigured VM storage locations:\n  - home: ~/.lume\n  - ssd: {} (default)\n",
            ssd.display(),
            ssd.display()
        )),
        "{get}"
    );
    // The default location is where a new VM goes.
    create(&home, "a", &[]);
    assert!(ssd.join("a/config.json").exists());
    assert_eq!(home.get("a")["locationName"], "ssd");
    // Reading never rewrote lume's file.
    assert_eq!(std::fs::read_to_string(home.config_yaml()).unwrap(), before);
}

/// An earlier lume for Linux wrote `homeDirectory: PATH`; its VMs live
/// there. The upgrade makes that path the location `home`, in place and
/// atomically; nothing is lost.
#[test]
fn an_earlier_releases_config_and_vms_are_upgraded() {
    let home = Home::new();
    let vms = home.path().join("vms");
    create(&home, "old", &["--storage", vms.to_str().unwrap()]);
    home.write_settings(&format!(
        "homeDirectory: {}\nnatSubnet: 10.77.0.0/24\nsomeFutureKey: [1, 2]\n",
        vms.display()
    ));
    let listed = ls(&home, &[]);
    assert_eq!(
        names_and_locations(&listed),
        vec![("old".into(), "home".into())]
    );
    let text = std::fs::read_to_string(home.config_yaml()).unwrap();
    assert!(!text.contains("homeDirectory"), "{text}");
    assert!(text.contains("defaultLocationName: \"home\""), "{text}");
    assert!(text.contains("someFutureKey"), "{text}");
    assert!(text.contains("natSubnet: 10.77.0.0/24"), "{text}");
    assert_eq!(
        std::fs::metadata(home.config_yaml())
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    // No temporary file left next to it (only config.yaml and the lock of
    // its changes).
    let dir = home.config_yaml().parent().unwrap().to_path_buf();
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, [".config.yaml.lock", "config.yaml"]);
    // Our old command still works: it sets the location `home`.
    assert_eq!(
        home.ok(&["config", "get", "homeDirectory"]).trim(),
        vms.display().to_string()
    );
    home.ok(&["get", "old"]);
}

/// Config.swift `Storage`: add, list, default, remove, with lume's
/// messages and VMLocation.swift's errors.
#[test]
fn storage_locations_are_managed_as_lume_does() {
    let home = Home::new();
    let fast = home.path().join("fast");
    let fast_s = fast.to_str().unwrap();
    assert_eq!(
        home.ok(&["config", "storage", "add", "fast", fast_s]),
        format!("Added VM storage location: fast at {fast_s}\n")
    );
    assert!(fast.is_dir(), "created like lume's validate()");
    assert_eq!(
        std::fs::metadata(&fast).unwrap().permissions().mode() & 0o777,
        0o700
    );
    assert_eq!(
        home.ok(&["config", "storage", "list"]),
        format!("VM Storage Locations:\n  - fast: {fast_s}\n  - home: ~/.lume (default)\n")
    );
    let e = home.fails(&["config", "storage", "add", "fast", fast_s]);
    assert!(
        e.contains("VM location with name 'fast' already exists"),
        "{e}"
    );
    let e = home.fails(&["config", "storage", "add", "bad/name", fast_s]);
    assert!(e.contains("Invalid location name: bad/name"), "{e}");
    let file = home.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let e = home.fails(&["config", "storage", "add", "f", file.to_str().unwrap()]);
    assert!(e.contains("Path is not a directory"), "{e}");
    // A relative path is stored absolute.
    let out = home
        .cmd()
        .current_dir(home.path())
        .args(["config", "storage", "add", "rel", "relvms"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(home.ok(&["config", "storage", "list"]).contains(&format!(
        "  - rel: {}",
        home.path().join("relvms").display()
    )));
    assert_eq!(
        home.ok(&["config", "storage", "default", "fast"]),
        "Set default VM storage location to: fast\n"
    );
    let e = home.fails(&["config", "storage", "remove", "fast"]);
    assert!(
        e.contains("Cannot remove the default location 'fast'. Set a new default location first"),
        "{e}"
    );
    let e = home.fails(&["config", "storage", "default", "nowhere"]);
    assert!(e.contains("VM location not found: nowhere"), "{e}");
    home.ok(&["config", "storage", "default", "home"]);
    assert_eq!(
        home.ok(&["config", "storage", "remove", "fast"]),
        "Removed VM storage location: fast\n"
    );
    assert!(fast.is_dir(), "removing a location keeps its files");
}

/// `--storage NAME|PATH` on every command (LumeController.swift): a name
/// first, else a path (it has a '/'), else an error listing the locations;
/// `ls` without `--storage` lists every location; a VM named without
/// `--storage` is found in the first location holding it.
#[test]
fn storage_takes_a_name_or_a_path_everywhere() {
    let home = Home::new();
    let fast = home.path().join("fast");
    let other = home.path().join("other");
    home.ok(&["config", "storage", "add", "fast", fast.to_str().unwrap()]);
    create(&home, "a", &[]);
    create(&home, "b", &["--storage", "fast"]);
    create(&home, "c", &["--storage", other.to_str().unwrap()]);
    assert!(fast.join("b/config.json").exists());
    assert_eq!(
        names_and_locations(&ls(&home, &[])),
        vec![("a".into(), "home".into()), ("b".into(), "fast".into())]
    );
    assert_eq!(
        names_and_locations(&ls(&home, &["--storage", "fast"])),
        vec![("b".into(), "fast".into())]
    );
    // A path: locationName is the path as given (lume).
    let other_s = other.to_str().unwrap();
    assert_eq!(
        names_and_locations(&ls(&home, &["--storage", other_s])),
        vec![("c".into(), other_s.into())]
    );
    // Neither a name nor a path: refused, naming the locations.
    for cmd in [
        vec!["ls", "--storage", "nosuch"],
        vec!["get", "a", "--storage", "nosuch"],
        vec!["create", "x", "--storage", "nosuch"],
        vec!["delete", "a", "--force", "--storage", "nosuch"],
        vec!["set", "a", "--cpu", "1", "--storage", "nosuch"],
        vec!["stop", "a", "--storage", "nosuch"],
        vec!["shutdown", "a", "--storage", "nosuch"],
        vec!["restart", "a", "--storage", "nosuch"],
        vec!["network", "doctor", "--storage", "nosuch"],
        vec!["serve", "--port", "0", "--storage", "nosuch"],
        vec!["run", "a", "--storage", "nosuch"],
        vec!["clone", "a", "z", "--dest-storage", "nosuch"],
        vec!["ssh", "a", "--storage", "nosuch"],
    ] {
        let e = home.fails(&cmd);
        assert!(
            e.contains("Storage 'nosuch' is neither a VM location name nor a path")
                && e.contains("home, fast")
                && e.contains("./nosuch"),
            "{cmd:?}: {e}"
        );
    }
    assert!(!home.path().join("nosuch").exists());
    // lume's `ephemeral` (macOS's temporary folder): refused with the reason.
    let out = home.lume(&["create", "x", "--storage", "ephemeral"]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("Storage 'ephemeral'") && e.contains("not supported"),
        "{e}"
    );
    // Found without --storage, in its own location.
    assert_eq!(home.get("b")["locationName"], "fast");
    home.ok(&["set", "b", "--cpu", "3"]);
    assert_eq!(home.get("b")["cpuCount"], 3);
    // A name that is also a folder here: the location wins, and lume says so.
    std::fs::create_dir(home.path().join("fast")).ok();
    let out = home
        .cmd()
        .current_dir(home.path())
        .args(["ls", "--storage", "fast"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is the VM location named fast"), "{err}");
    // Clone across locations: --source-storage / --dest-storage; without
    // --dest-storage the clone goes to the default location (lume).
    home.ok(&[
        "clone",
        "b",
        "b2",
        "--source-storage",
        "fast",
        "--dest-storage",
        other_s,
    ]);
    assert!(other.join("b2/config.json").exists());
    home.ok(&["clone", "b", "b3"]);
    assert!(home.vm_dir("b3").join("config.json").exists());
    // Delete without --storage finds it too.
    home.ok(&["delete", "b", "--force"]);
    assert!(!fast.join("b").exists());
}

/// Duplicate names across locations behave as in lume: `ls` shows both,
/// a command without `--storage` takes the first location in config.yaml's
/// order, `--storage` picks the other.
#[test]
fn a_name_in_two_locations_is_taken_from_the_first() {
    let home = Home::new();
    let second = home.path().join("second");
    home.ok(&[
        "config",
        "storage",
        "add",
        "second",
        second.to_str().unwrap(),
    ]);
    create(&home, "twin", &["--storage", "second", "--cpu", "1"]);
    create(&home, "twin", &["--cpu", "3"]);
    assert_eq!(
        names_and_locations(&ls(&home, &[])),
        vec![
            ("twin".into(), "home".into()),
            ("twin".into(), "second".into())
        ]
    );
    assert_eq!(home.get("twin")["cpuCount"], 3);
    let v: Value =
        serde_json::from_str(&home.ok(&["get", "twin", "-f", "json", "--storage", "second"]))
            .unwrap();
    let v = if v.is_array() { v[0].clone() } else { v };
    assert_eq!(v["cpuCount"], 1);
    // A name that is in no location: every location was searched, and the
    // error says so (not only the default location's path).
    for args in [
        &["get", "ghost"][..],
        &["stop", "ghost"],
        &["delete", "ghost", "--force"],
    ] {
        let e = home.fails(args);
        assert!(
            e.contains("VM 'ghost' does not exist in any VM location (searched: home, second)"),
            "{args:?}: {e}"
        );
    }
    // With --storage, the one location named.
    let e = home.fails(&["get", "ghost", "--storage", "second"]);
    assert!(
        e.contains(&format!("does not exist in {}", second.display())),
        "{e}"
    );
}

/// Config.swift `Cache`, `Telemetry`, `Registry` (gcs refused).
#[test]
fn cache_telemetry_and_registry_commands() {
    let home = Home::new();
    assert_eq!(
        home.ok(&["config", "cache"]),
        "Caching enabled: false\nCache directory: ~/.lume/cache\n"
    );
    assert_eq!(home.ok(&["config", "cache", "enable"]), "Caching enabled\n");
    assert_eq!(
        home.ok(&["config", "cache", "status"]),
        "Caching enabled: true\nCache directory: ~/.lume/cache\n"
    );
    assert_eq!(
        home.ok(&["config", "cache", "disable"]),
        "Caching disabled\n"
    );
    let cache = home.path().join("c");
    let cache_s = cache.to_str().unwrap();
    assert_eq!(
        home.ok(&["config", "cache", "dir", cache_s]),
        format!("Cache directory set to: {cache_s}\n")
    );
    assert!(cache.is_dir());
    assert_eq!(
        home.ok(&["config", "cache", "dir"]),
        format!("Cache directory: {cache_s}\n")
    );
    // Earlier lume's spellings.
    assert_eq!(
        home.ok(&["config", "cache", "get"]),
        format!("Cache directory: {cache_s}\n")
    );
    home.ok(&["config", "cache", "set", cache_s]);
    let t = home.ok(&["config", "telemetry"]);
    assert!(t.starts_with("Telemetry enabled: true\n"), "{t}");
    assert!(t.contains("sends no telemetry"), "{t}");
    assert!(
        home.ok(&["config", "telemetry", "enable"])
            .starts_with("Telemetry enabled\n")
    );
    assert!(
        home.ok(&["config", "telemetry", "status"])
            .starts_with("Telemetry enabled: true\n")
    );
    assert!(
        home.ok(&["config", "telemetry", "disable"])
            .starts_with("Telemetry disabled")
    );
    assert_eq!(
        home.ok(&["config", "get", "telemetryEnabled"]).trim(),
        "false"
    );
    home.ok(&["config", "telemetry", "reset-id"]);
    assert_eq!(
        home.ok(&["config", "registry"]),
        "Registry type: ghcr\n\nGHCR configuration:\n  Registry: ghcr.io\n  Organization: trycua\n"
    );
    assert_eq!(
        home.ok(&["config", "registry", "ghcr", "--organization", "team"]),
        "GHCR configuration updated:\n  Registry: ghcr.io\n  Organization: team\n"
    );
    assert_eq!(
        home.ok(&["config", "registry", "type", "ghcr"]),
        "Registry type set to: ghcr\n"
    );
    assert_eq!(
        home.ok(&["config", "registry", "type"]),
        "Registry type: ghcr\n"
    );
    assert_eq!(
        home.ok(&["config", "registry", "ghcr"]),
        "GHCR configuration:\n  Registry: ghcr.io\n  Organization: team\n"
    );
    // gcs, with or without options, and as a type: refused as a usage
    // error (64), as every value of lume's we do not support.
    for args in [
        &["config", "registry", "gcs"][..],
        &["config", "registry", "type", "gcs"],
        &[
            "config",
            "registry",
            "gcs",
            "--api-url",
            "https://x",
            "--api-key",
            "k",
        ],
    ] {
        let out = home.lume(args);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {out:?}");
        assert!(out.stdout.is_empty(), "{args:?}: {out:?}");
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(
            e.contains("Registry type 'gcs' is refused"),
            "{args:?}: {e}"
        );
    }
    let yaml = std::fs::read_to_string(home.config_yaml()).unwrap();
    assert!(yaml.contains("organization: \"team\""), "{yaml}");
    assert!(yaml.contains("telemetryEnabled: false"), "{yaml}");
    // Our own keys keep working beside lume's.
    home.ok(&["config", "set", "natSubnet", "10.66.0.0/24"]);
    assert_eq!(
        home.ok(&["config", "get", "natSubnet"]).trim(),
        "10.66.0.0/24"
    );
    assert!(home.ok(&["config"]).contains("natSubnet: 10.66.0.0/24"));
}

/// Root adds no location another user controls: a directory of theirs, a
/// folder inside one, a symlink of theirs (to /etc); and a user adds none
/// they cannot write (checked with their own rights).
#[test]
fn a_location_another_user_controls_is_refused() {
    assert!(nix::unistd::geteuid().is_root(), "these tests run as root");
    let home = Home::new();
    let theirs = tempfile::tempdir().unwrap();
    std::fs::set_permissions(theirs.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(theirs.path(), Some(65534), Some(65534)).unwrap();
    for path in [theirs.path().to_path_buf(), theirs.path().join("inside")] {
        let e = home.fails(&["config", "storage", "add", "x", path.to_str().unwrap()]);
        assert!(e.contains("can be changed by user 65534"), "{e}");
        // Another path, never a chown/chmod of someone else's directory.
        assert!(e.contains("choose another path"), "{e}");
        assert!(!e.contains("chown") && !e.contains("chmod"), "{e}");
        assert!(!e.contains("--storage"), "{e}");
    }
    // A directory every user shares: a private subdirectory of it.
    let e = home.fails(&["config", "storage", "add", "x", "/tmp"]);
    assert!(e.contains("private subdirectory"), "{e}");
    assert!(!e.contains("chown") && !e.contains("chmod"), "{e}");
    let link_dir = tempfile::tempdir().unwrap();
    let link = link_dir.path().join("etc-link");
    std::os::unix::fs::symlink("/etc", &link).unwrap();
    nix::unistd::fchownat(
        nix::fcntl::AT_FDCWD,
        &link,
        Some(nix::unistd::Uid::from_raw(65534)),
        None,
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .unwrap();
    let e = home.fails(&["config", "storage", "add", "x", link.to_str().unwrap()]);
    assert!(e.contains("symlink owned by user 65534"), "{e}");
    let e = home.fails(&["config", "set", "homeDirectory", link.to_str().unwrap()]);
    assert!(e.contains("symlink owned by user 65534"), "{e}");
    assert!(
        !home.config_yaml().exists()
            || !std::fs::read_to_string(home.config_yaml())
                .unwrap()
                .contains("etc")
    );

    // nobody, with a HOME of its own: /etc is not theirs to write.
    let nobody_home = tempfile::tempdir().unwrap();
    std::os::unix::fs::chown(nobody_home.path(), Some(65534), Some(65534)).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .arg(lume_bin())
        .args(["config", "storage", "add", "sys", "/etc"])
        .env("HOME", nobody_home.path())
        .env_remove("XDG_CONFIG_HOME")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("Directory is not writable: /etc"), "{e}");
}

/// A root-owned symlink into another user's folder: what lies behind it is
/// theirs, so no location, homeDirectory or cacheDirectory may lead there,
/// and root creates nothing inside it.
#[test]
fn a_root_link_into_another_users_folder_is_refused() {
    let home = Home::new();
    let top = tempfile::tempdir().unwrap();
    let alice = top.path().join("alice");
    std::fs::create_dir(&alice).unwrap();
    std::fs::set_permissions(&alice, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(&alice, Some(65534), Some(65534)).unwrap();
    let rlink = top.path().join("rlink");
    std::os::unix::fs::symlink(&alice, &rlink).unwrap();
    let inside = |p: &str| rlink.join(p).to_str().unwrap().to_string();
    for args in [
        vec!["config", "storage", "add", "t2", &inside("vms3/sub")],
        vec!["config", "set", "homeDirectory", &inside("h4")],
        vec!["config", "set", "cacheDirectory", &inside("c3")],
    ] {
        let e = home.fails(&args);
        assert!(e.contains("can be changed by user 65534"), "{args:?}: {e}");
    }
    assert_eq!(std::fs::read_dir(&alice).unwrap().count(), 0);
    assert!(!home.ok(&["config"]).contains("rlink"));
}

/// A location that another user came to control after it was added: `ls`
/// skips it with a note (without opening their FIFO or following their
/// link to root's config.json), `get` refuses it.
#[test]
fn a_location_another_user_controls_is_not_read() {
    let home = Home::new();
    create(&home, "a", &[]);
    let theirs = tempfile::tempdir().unwrap();
    let vms = theirs.path().join("vms");
    for d in ["evil", "leak"] {
        std::fs::create_dir_all(vms.join(d)).unwrap();
    }
    nix::unistd::mkfifo(&vms.join("evil/config.json"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    std::os::unix::fs::symlink(
        home.vm_dir("a").join("config.json"),
        vms.join("leak/config.json"),
    )
    .unwrap();
    std::fs::set_permissions(theirs.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(theirs.path(), Some(65534), Some(65534)).unwrap();
    home.write_settings(&format!(
        "defaultLocationName: home\nvmLocations:\n  - name: home\n    path: {}\n  - name: t2\n    path: {}\n",
        home.storage().display(),
        vms.display()
    ));
    let mut c = Command::new("timeout");
    c.arg("30").arg(lume_bin()).args(["ls", "-f", "json"]);
    home.env(&mut c);
    let out = c.output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        names_and_locations(listed.as_array().unwrap()),
        [("a".to_string(), "home".to_string())]
    );
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("skipped") && e.contains("user 65534"), "{e}");
    for vm in ["leak", "evil"] {
        let mut c = Command::new("timeout");
        c.arg("30")
            .arg(lume_bin())
            .args(["get", vm, "--storage", "t2"]);
        home.env(&mut c);
        let out = c.output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(e.contains("can be changed by user 65534"), "{e}");
    }
}

/// Root uses no config.yaml another user could have written (ssh's
/// StrictModes): one in a user's HOME (`sudo -E`), one owned by a user in
/// root's folder, one every user may write. Root neither reads nor
/// rewrites it (no upgrade, no lock file in their folder).
#[test]
fn root_uses_no_config_yaml_another_user_can_change() {
    let text = "homeDirectory: /etc\napiGroup: root\n";
    let users = tempfile::tempdir().unwrap();
    let theirs = users.path().join("user");
    std::fs::create_dir_all(theirs.join(".config/lume")).unwrap();
    std::fs::write(theirs.join(".config/lume/config.yaml"), text).unwrap();
    for p in [".config/lume/config.yaml", ".config/lume", ".config", ""] {
        std::os::unix::fs::chown(theirs.join(p), Some(65534), Some(65534)).unwrap();
    }
    let yaml = theirs.join(".config/lume/config.yaml");
    for env in [
        ("HOME", &theirs),
        ("XDG_CONFIG_HOME", &theirs.join(".config")),
    ] {
        let out = Command::new(lume_bin())
            .args(["config", "get"])
            .env_remove("XDG_CONFIG_HOME")
            .env(env.0, env.1)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{out:?}");
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(e.contains("is not used") && e.contains("user 65534"), "{e}");
        assert!(e.contains("sudo -H"), "{e}");
    }
    assert_eq!(std::fs::read_to_string(&yaml).unwrap(), text);
    assert_eq!(
        std::fs::read_dir(yaml.parent().unwrap()).unwrap().count(),
        1
    );

    // In root's own (test) HOME: the file owned by a user, then writable
    // by every user; refused for reading and for changing.
    let home = Home::new();
    home.write_settings(text);
    std::os::unix::fs::chown(home.config_yaml(), Some(65534), None).unwrap();
    for args in [
        &["config", "get"][..],
        &["config", "set", "cachingEnabled", "true"],
    ] {
        let e = home.fails(args);
        assert!(e.contains("can be changed by user 65534"), "{e}");
    }
    std::os::unix::fs::chown(home.config_yaml(), Some(0), None).unwrap();
    std::fs::set_permissions(home.config_yaml(), std::fs::Permissions::from_mode(0o666)).unwrap();
    let e = home.fails(&["ls"]);
    assert!(e.contains("can be changed by every user"), "{e}");
    std::fs::set_permissions(home.config_yaml(), std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(home.ok(&["config", "get"]).contains("home: /etc (default)"));
}

/// A `lume serve` inside a namespace (as tests/api.rs starts it).
struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn start(ns: &Netns, home: &Home) -> Self {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &ns.name])
            .arg(lume_bin())
            .args(["serve", "--port", "0"]);
        home.env(&mut c);
        let mut child = c
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::BufRead;
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let port = rest.split([' ', '(']).next().unwrap().rsplit(':').next();
                    let _ = tx.send(port.unwrap().parse::<u16>().unwrap());
                }
            }
        });
        let port = rx.recv_timeout(Duration::from_secs(20)).unwrap();
        Self { child, port }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One request with curl inside the namespace, optionally as nobody.
fn call(
    ns: &Netns,
    server: &Server,
    nobody: bool,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &ns.name]);
    if nobody {
        c.args([
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
        ]);
    }
    c.args([
        "curl",
        "-sS",
        "--max-time",
        "30",
        "-w",
        "\n%{http_code}",
        "-X",
        method,
    ])
    .arg(format!("http://127.0.0.1:{}{path}", server.port));
    if let Some(b) = body {
        c.args(["-H", "Content-Type: application/json", "-d", &b.to_string()]);
    }
    let start = Instant::now();
    let out = c.output().unwrap();
    assert!(start.elapsed() < Duration::from_secs(60));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap();
    (
        status.trim().parse().unwrap(),
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}")),
    )
}

/// Server.swift / Handlers.swift: `GET/POST /lume/config`,
/// `GET/POST /lume/config/locations`, `DELETE /lume/config/locations/{name}`,
/// `POST /lume/config/locations/default/{name}` with lume's bodies and
/// statuses; `storage` takes a name; other users may read but not change.
#[test]
fn config_routes_answer_as_lume() {
    let home = Home::new();
    let ns = Netns::new("cs");
    let server = Server::start(&ns, &home);
    let (st, cfg) = call(&ns, &server, false, "GET", "/lume/config", None);
    assert_eq!(st, 200);
    for (key, value) in [
        ("vmLocations", json!([{"name": "home", "path": "~/.lume"}])),
        ("defaultLocationName", json!("home")),
        ("cacheDirectory", json!("~/.lume/cache")),
        ("cachingEnabled", json!(false)),
        ("telemetryEnabled", json!(true)),
        (
            "registry",
            json!({"type": "ghcr", "ghcr": {"registry": "ghcr.io", "organization": "trycua"}}),
        ),
    ] {
        assert_eq!(cfg[key], value, "{key}: {cfg}");
    }
    let fast = home.path().join("fast");
    let fast_s = fast.to_str().unwrap();
    let (st, body) = call(
        &ns,
        &server,
        false,
        "POST",
        "/lume/config/locations",
        Some(json!({"name": "fast", "path": fast_s})),
    );
    assert_eq!(st, 200, "{body}");
    assert_eq!(
        body,
        json!({"message": "Location added successfully", "name": "fast", "path": fast_s})
    );
    let (st, body) = call(&ns, &server, false, "GET", "/lume/config/locations", None);
    assert_eq!(st, 200);
    assert_eq!(
        body,
        json!([{"name": "home", "path": "~/.lume"}, {"name": "fast", "path": fast_s}])
    );
    let (st, body) = call(
        &ns,
        &server,
        false,
        "POST",
        "/lume/config/locations",
        Some(json!({"name": "fast", "path": fast_s})),
    );
    assert_eq!(st, 400);
    assert!(body["message"].as_str().unwrap().contains("already exists"));
    // storage by name on the VM routes.
    home.ok(&[
        "create",
        "v",
        "--disk-size",
        "8MB",
        "--network",
        "none",
        "--storage",
        "fast",
    ]);
    let (st, body) = call(&ns, &server, false, "GET", "/lume/vms?storage=fast", None);
    assert_eq!(st, 200);
    assert_eq!(body[0]["locationName"], "fast");
    let (st, body) = call(&ns, &server, false, "GET", "/lume/vms", None);
    assert_eq!(st, 200);
    assert_eq!(body.as_array().unwrap().len(), 1, "every location: {body}");
    let (st, body) = call(&ns, &server, false, "GET", "/lume/vms?storage=nosuch", None);
    assert_eq!(st, 400, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("neither a VM location name nor a path")
    );
    // Clone across locations (lume's sourceLocation / destLocation), and a
    // VM found without storage in the location holding it.
    let (st, body) = call(
        &ns,
        &server,
        false,
        "POST",
        "/lume/vms/clone",
        Some(
            json!({"name": "v", "newName": "v2", "sourceLocation": "fast", "destLocation": "home"}),
        ),
    );
    assert!((200..300).contains(&st), "{st} {body}");
    assert!(home.vm_dir("v2").join("config.json").exists());
    let (st, body) = call(&ns, &server, false, "GET", "/lume/vms/v", None);
    assert_eq!(st, 200, "{body}");
    let one = if body.is_array() {
        body[0].clone()
    } else {
        body
    };
    assert_eq!(one["locationName"], "fast");
    let (st, body) = call(
        &ns,
        &server,
        false,
        "POST",
        "/lume/config/locations/default/fast",
        None,
    );
    assert_eq!(
        (st, body),
        (200, json!({"message": "Default location set successfully"}))
    );
    let (st, body) = call(
        &ns,
        &server,
        false,
        "DELETE",
        "/lume/config/locations/fast",
        None,
    );
    assert_eq!(st, 400);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("Cannot remove the default location")
    );
    call(
        &ns,
        &server,
        false,
        "POST",
        "/lume/config/locations/default/home",
        None,
    );
    let (st, body) = call(
        &ns,
        &server,
        false,
        "DELETE",
        "/lume/config/locations/fast",
        None,
    );
    assert_eq!(
        (st, body),
        (200, json!({"message": "Location removed successfully"}))
    );
    let cache = home.path().join("cache2");
    let (st, body) = call(
        &ns,
        &server,
        false,
        "POST",
        "/lume/config",
        Some(json!({"cacheDirectory": cache.to_str().unwrap(), "cachingEnabled": true})),
    );
    assert_eq!(
        (st, body),
        (
            200,
            json!({"message": "Configuration updated successfully"})
        )
    );
    let (_, cfg) = call(&ns, &server, false, "GET", "/lume/config", None);
    assert_eq!(cfg["cachingEnabled"], true);
    assert_eq!(cfg["cacheDirectory"], cache.to_str().unwrap());
    let (st, _) = call(
        &ns,
        &server,
        false,
        "POST",
        "/lume/config",
        Some(json!({"bogus": 1})),
    );
    assert_eq!(st, 400);

    // nobody, served through apiGroup, reads but never changes the
    // server's settings or adds a location (/etc or anything else).
    home.ok(&["config", "set", "apiGroup", "nogroup"]);
    let (st, _) = call(&ns, &server, true, "GET", "/lume/config/locations", None);
    assert_eq!(st, 200);
    // ... and uses no location but the server's own, by name or by path.
    home.ok(&["config", "storage", "add", "fast", fast_s]);
    for storage in ["fast", fast_s] {
        let (st, reply) = call(
            &ns,
            &server,
            true,
            "GET",
            &format!("/lume/vms?storage={storage}"),
            None,
        );
        assert_eq!(st, 403, "{storage}: {reply}");
        let (st, reply) = call(
            &ns,
            &server,
            true,
            "GET",
            &format!("/lume/vms/v?storage={storage}"),
            None,
        );
        assert_eq!(st, 403, "{storage}: {reply}");
    }
    let (st, reply) = call(&ns, &server, true, "GET", "/lume/vms?storage=home", None);
    assert_eq!(st, 200, "{reply}");
    // Without storage, nobody sees the server's own location only.
    let (st, reply) = call(&ns, &server, true, "GET", "/lume/vms", None);
    assert_eq!(st, 200);
    assert!(
        reply
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["locationName"] == "home"),
        "{reply}"
    );
    let (st, _) = call(&ns, &server, true, "GET", "/lume/vms/v", None);
    assert_eq!(st, 404, "v lives in fast, which nobody cannot see");
    let before = std::fs::read_to_string(home.config_yaml()).unwrap();
    for (method, path, body) in [
        (
            "POST",
            "/lume/config/locations",
            Some(json!({"name": "sys", "path": "/etc"})),
        ),
        (
            "POST",
            "/lume/config",
            Some(json!({"homeDirectory": "/etc"})),
        ),
        ("DELETE", "/lume/config/locations/home", None),
        ("POST", "/lume/config/locations/default/home", None),
        // The image cache is the server's: nobody may not empty it.
        ("POST", "/lume/prune", None),
    ] {
        let (st, reply) = call(&ns, &server, true, method, path, body);
        assert_eq!(st, 403, "{method} {path}: {reply}");
        assert!(
            reply["message"]
                .as_str()
                .unwrap()
                .contains("only the user the server runs as")
        );
    }
    assert_eq!(std::fs::read_to_string(home.config_yaml()).unwrap(), before);
    // The cache stays readable; an organization outside it is refused.
    let (st, reply) = call(&ns, &server, true, "GET", "/lume/images", None);
    assert_eq!(st, 200, "{reply}");
    for org in ["/etc", "..", "a/../../etc"] {
        let (st, reply) = call(
            &ns,
            &server,
            true,
            "GET",
            &format!("/lume/images?organization={org}"),
            None,
        );
        assert_eq!(st, 400, "{org}: {reply}");
    }
    // The server's own user neither, through a root-owned link into
    // nobody's folder: refused, and nothing is made there.
    let top = tempfile::tempdir().unwrap();
    let theirs = top.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
    let rlink = top.path().join("rlink");
    std::os::unix::fs::symlink(&theirs, &rlink).unwrap();
    for (path, body) in [
        (
            "/lume/config/locations",
            json!({"name": "t2", "path": rlink.join("vms/sub")}),
        ),
        ("/lume/config", json!({"homeDirectory": rlink.join("h")})),
        ("/lume/config", json!({"cacheDirectory": rlink.join("c")})),
    ] {
        let (st, reply) = call(&ns, &server, false, "POST", path, Some(body));
        assert_eq!(st, 400, "{path}: {reply}");
        let text = reply["message"].as_str().unwrap();
        assert!(text.contains("can be changed by user 65534"), "{text}");
    }
    assert_eq!(std::fs::read_dir(&theirs).unwrap().count(), 0);
    assert_eq!(std::fs::read_to_string(home.config_yaml()).unwrap(), before);
}
