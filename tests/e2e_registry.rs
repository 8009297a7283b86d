//! `lume push` / `pull` / `images` / `prune` against a real registry
//! (Debian's docker-registry, the CNCF distribution server) on loopback in a
//! network namespace of the test's own; skopeo reads what lume pushed.

mod common;

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Home, Netns, sh, wait_for};
use lume::registry::format;

const MB: u64 = 1 << 20;

/// A registry serving `data` on 127.0.0.1:`port` inside `ns`.
struct Registry {
    child: Child,
    data: PathBuf,
    addr: String,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn registry(ns: &Netns, dir: &Path, port: u16, htpasswd: Option<&str>) -> Registry {
    let data = dir.join(format!("data{port}"));
    std::fs::create_dir_all(&data).unwrap();
    let mut cfg = format!(
        "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
        data.display()
    );
    if let Some(line) = htpasswd {
        let p = dir.join(format!("htpasswd{port}"));
        std::fs::write(&p, format!("{line}\n")).unwrap();
        cfg.push_str(&format!(
            "auth:\n  htpasswd:\n    realm: test\n    path: {}\n",
            p.display()
        ));
    }
    let cfg_path = dir.join(format!("config{port}.yml"));
    std::fs::write(&cfg_path, cfg).unwrap();
    let child = Command::new("ip")
        .args(["netns", "exec", &ns.name, "docker-registry", "serve"])
        .arg(&cfg_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr = format!("127.0.0.1:{port}");
    wait_for("the registry", Duration::from_secs(20), || {
        let out = ns.exec(&format!(
            "curl -s -o /dev/null -w '%{{http_code}}' http://{addr}/v2/"
        ));
        let code = String::from_utf8_lossy(&out.stdout).to_string();
        (code == "200" || code == "401").then_some(())
    });
    Registry { child, data, addr }
}

/// A VM `name` whose 64 MB disk holds data at a few places and holes
/// elsewhere; returns the disk's path.
fn vm_with_data(home: &Home, name: &str) -> PathBuf {
    home.ok(&[
        "create",
        name,
        "--disk-size",
        "64MB",
        "--network",
        "none",
        "--no-cloud-init",
    ]);
    let disk = home.vm_dir(name).join("disk.img");
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    let mut noise = vec![0u8; (6 * MB) as usize];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact_at_start(&mut noise);
    f.write_all_at(b"lume registry test: first sector", 0)
        .unwrap();
    f.write_all_at(&noise[..MB as usize], 5 * MB + 123).unwrap();
    f.write_all_at(&"text ".repeat(400_000).into_bytes(), 30 * MB)
        .unwrap();
    f.write_all_at(&noise, 50 * MB).unwrap();
    f.sync_all().unwrap();
    disk
}

trait ReadStart {
    fn read_exact_at_start(&mut self, buf: &mut [u8]);
}

impl ReadStart for std::fs::File {
    fn read_exact_at_start(&mut self, buf: &mut [u8]) {
        use std::io::Read;
        self.read_exact(buf).unwrap();
    }
}

fn allocated(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().blocks() * 512
}

fn same_bytes(a: &Path, b: &Path) {
    sh(&format!("cmp {} {}", a.display(), b.display()));
}

/// A process holding the lock file `path` (a POSIX lock, which conflicts
/// with lume's OFD lock), as another lume command would; kill it to free.
fn hold_lock(path: &Path) -> Child {
    let mut holder = Command::new("python3")
        .args([
            "-c",
            "import fcntl,sys,time; f=open(sys.argv[1],'a+'); fcntl.lockf(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
        ])
        .arg(path)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "held");
    holder
}

fn reg_args(r: &Registry) -> [&str; 4] {
    ["--registry", &r.addr, "--organization", "test"]
}

#[test]
fn push_pull_round_trip_skopeo_and_failures() {
    let ns = Netns::new("lreg");
    let tmp = tempfile::tempdir().unwrap();
    let reg = registry(&ns, tmp.path(), 5000, None);
    let home = Home::new();
    let src = vm_with_data(&home, "src");

    // Push in 4 MB chunks under two tags.
    let mut push = vec![
        "push",
        "src",
        "img:v1",
        "--chunk-size-mb",
        "4",
        "--additional-tags",
        "v2",
    ];
    push.extend(reg_args(&reg));
    let out = ns.lume_ok(&home, &push);
    assert!(out.contains("hole chunk(s) left out"), "{out}");

    // skopeo reads it: lume's media types and annotations, and copies it.
    let inspect = ns.exec_ok(&format!(
        "skopeo inspect --raw --tls-verify=false docker://{}/test/img:v2",
        reg.addr
    ));
    let manifest: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    assert_eq!(manifest["config"]["mediaType"], format::CONFIG_MEDIA_TYPE);
    let layers = manifest["layers"].as_array().unwrap();
    // 16 chunks of 4 MB; data in chunks 0, 1, 7, 12 and 13 only.
    assert_eq!(layers.len(), 5, "{inspect}");
    for l in layers {
        assert_eq!(l["mediaType"], format::DISK_MEDIA_TYPE);
        assert!(l["annotations"][format::PART_OFFSET].is_string());
    }
    assert_eq!(
        manifest["annotations"][format::TOTAL_SIZE],
        (64 * MB).to_string()
    );
    let copy = tmp.path().join("skopeo-copy");
    ns.exec_ok(&format!(
        "skopeo copy --src-tls-verify=false docker://{}/test/img:v1 dir:{}",
        reg.addr,
        copy.display()
    ));
    assert!(copy.join("manifest.json").exists());

    // Pull: byte-identical and sparse.
    let mut pull = vec!["pull", "img:v1", "dst"];
    pull.extend(reg_args(&reg));
    ns.lume_ok(&home, &pull);
    let dst = home.vm_dir("dst").join("disk.img");
    same_bytes(&src, &dst);
    assert!(
        allocated(&dst) <= allocated(&src) + MB,
        "pulled disk not sparse: {} vs {}",
        allocated(&dst),
        allocated(&src)
    );
    assert!(allocated(&dst) < 16 * MB);
    let got = home.get("dst");
    assert_eq!(got["status"], "stopped");
    assert_eq!(got["networkMode"], "none");

    // Without NAME, the VM is named IMAGE_TAG (as lume 0.5.3).
    let mut unnamed = vec!["pull", "img:v1"];
    unnamed.extend(reg_args(&reg));
    ns.lume_ok(&home, &unnamed);
    same_bytes(&src, &home.vm_dir("img_v1").join("disk.img"));
    home.ok(&["delete", "img_v1", "--force"]);

    // `lume run IMAGE:TAG` pulls the image as VM `img_v2` and starts it.
    let mut run = vec!["run", "img:v2", "--detach"];
    run.extend(reg_args(&reg));
    let out = ns.lume(&home, &run);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("pulling"), "{err}");
    assert_eq!(home.get("img_v2")["status"], "running");
    // A running VM is not pushed.
    let mut busy = vec!["push", "img_v2", "img:busy"];
    busy.extend(reg_args(&reg));
    let err = ns.lume_fails(&home, &busy);
    assert!(err.contains("is running: stop it before pushing"), "{err}");
    // Nor replaced by a pull with --force.
    let mut replace_running = vec!["pull", "img:v2", "--force"];
    replace_running.extend(reg_args(&reg));
    let err = ns.lume_fails(&home, &replace_running);
    assert!(
        err.contains("is running, and a pull with force replaces only a stopped VM"),
        "{err}"
    );
    assert_eq!(home.get("img_v2")["status"], "running");
    ns.lume_ok(&home, &["stop", "img_v2", "--timeout", "1"]);

    // An existing VM: refused without --force; with it, replaced (as
    // lume), but only once the new one is complete: a failed pull with
    // --force leaves the old VM as it was.
    std::fs::write(home.vm_dir("dst").join("marker"), "old").unwrap();
    let err = ns.lume_fails(&home, &pull);
    assert!(err.contains("VM 'dst' already exists"), "{err}");
    let mut force_missing = vec!["pull", "img:nope", "dst", "--force"];
    force_missing.extend(reg_args(&reg));
    let err = ns.lume_fails(&home, &force_missing);
    assert!(err.contains("was not found"), "{err}");
    assert!(home.vm_dir("dst").join("marker").exists());
    same_bytes(&src, &dst);
    let vm_id = || {
        let c: serde_json::Value =
            serde_json::from_slice(&std::fs::read(home.vm_dir("dst").join("config.json")).unwrap())
                .unwrap();
        c["vmId"].clone()
    };
    let old_id = vm_id();
    assert!(old_id.is_string());
    let mut force = pull.clone();
    force.push("--force");
    let err = String::from_utf8_lossy(&ns.lume(&home, &force).stderr).to_string();
    assert!(err.contains("Replacing VM 'dst'"), "{err}");
    assert!(!home.vm_dir("dst").join("marker").exists());
    same_bytes(&src, &dst);
    assert_ne!(vm_id(), old_id);
    assert_eq!(home.get("dst")["status"], "stopped");
    // Held by another command (here a process holding its lock): busy,
    // not running.
    let mut holder = hold_lock(&home.vm_dir("src").join(".lock"));
    let mut held = vec!["push", "src", "img:held"];
    held.extend(reg_args(&reg));
    let err = ns.lume_fails(&home, &held);
    assert!(err.contains("VM 'src' is busy"), "{err}");
    holder.kill().unwrap();
    holder.wait().unwrap();
    // No tag: the form to use.
    let mut notag = vec!["push", "src", "img"];
    notag.extend(reg_args(&reg));
    let err = ns.lume_fails(&home, &notag);
    assert!(
        err.contains("Push needs NAME:TAG, such as img:latest"),
        "{err}"
    );
    // A second push of the same disk: nothing new to upload.
    let mut again = vec!["push", "src", "img:v3", "--chunk-size-mb", "4"];
    again.extend(reg_args(&reg));
    let out = ns.lume_ok(&home, &again);
    assert!(out.contains("nothing new to upload"), "{out}");
    // A plain-HTTP server on a non-loopback address: TLS fails, and the
    // error names the variable and the exact HOST:PORT to put in it.
    ns.exec_ok("ip addr add 192.0.2.1/32 dev lo");
    let mut http = Command::new("ip")
        .args(["netns", "exec", &ns.name, "python3", "-c"])
        .arg(
            "import http.server as h\nclass S(h.HTTPServer):\n    def server_bind(self):\n        import socketserver; socketserver.TCPServer.server_bind(self)\nS(('192.0.2.1', 8088), h.BaseHTTPRequestHandler).serve_forever()",
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the plain HTTP server", Duration::from_secs(10), || {
        ns.exec("curl -s -o /dev/null http://192.0.2.1:8088/")
            .status
            .success()
            .then_some(())
    });
    let err = ns.lume_fails(
        &home,
        &[
            "pull",
            "img:v1",
            "plain",
            "--registry",
            "192.0.2.1:8088",
            "--organization",
            "test",
        ],
    );
    let _ = http.kill();
    let _ = http.wait();
    assert!(
        err.contains("LUME_INSECURE_REGISTRIES=192.0.2.1:8088"),
        "{err}"
    );
    // A dry run uploads nothing.
    let mut dry = vec![
        "push",
        "src",
        "img:dry",
        "--dry-run",
        "--chunk-size-mb",
        "4",
    ];
    dry.extend(reg_args(&reg));
    let out = ns.lume_ok(&home, &dry);
    assert!(
        out.contains("Dry run") && out.contains("5 disk part(s)"),
        "{out}"
    );
    let tags = ns.exec_ok(&format!(
        "curl -s http://{}/v2/test/img/tags/list",
        reg.addr
    ));
    assert!(tags.contains("v1") && !tags.contains("dry"), "{tags}");
    same_bytes(&src, &home.vm_dir("img_v2").join("disk.img"));

    // A tag that is a multi-platform index: named as such, not "not found".
    let head = ns.exec_ok(&format!(
        "curl -sI -H 'Accept: {}' http://{}/v2/test/img/manifests/v1",
        format::MANIFEST_MEDIA_TYPE,
        reg.addr
    ));
    let header = |name: &str| {
        head.lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
            })
            .unwrap()
    };
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": format::MANIFEST_MEDIA_TYPE,
            "digest": header("docker-content-digest"),
            "size": header("content-length").parse::<u64>().unwrap(),
            "platform": {"architecture": "amd64", "os": "linux"}
        }]
    });
    let index_file = tmp.path().join("index.json");
    std::fs::write(&index_file, index.to_string()).unwrap();
    ns.exec_ok(&format!(
        "curl -sf -X PUT -H 'Content-Type: application/vnd.oci.image.index.v1+json' --data-binary @{} http://{}/v2/test/img/manifests/multi",
        index_file.display(),
        reg.addr
    ));
    let mut multi = vec!["pull", "img:multi", "multi"];
    multi.extend(reg_args(&reg));
    let err = ns.lume_fails(&home, &multi);
    assert!(err.contains("it is an image index"), "{err}");

    // A missing tag: one clear error, no VM, nothing counted complete.
    let mut missing = vec!["pull", "img:nope", "nope"];
    missing.extend(reg_args(&reg));
    let err = ns.lume_fails(&home, &missing);
    assert!(err.contains("was not found"), "{err}");
    assert!(!home.ok(&["ls"]).contains("nope"));

    // A corrupt blob in the registry's storage: refused, never installed.
    let blobs = reg.data.join("docker/registry/v2/blobs/sha256");
    let data_layer = layers
        .iter()
        .map(|l| {
            l["digest"]
                .as_str()
                .unwrap()
                .trim_start_matches("sha256:")
                .to_string()
        })
        .find(|h| {
            let p = blobs.join(&h[..2]).join(h).join("data");
            std::fs::metadata(p)
                .map(|m| m.len() > 100_000)
                .unwrap_or(false)
        })
        .unwrap();
    let blob = blobs.join(&data_layer[..2]).join(&data_layer).join("data");
    let f = std::fs::OpenOptions::new().write(true).open(&blob).unwrap();
    f.write_all_at(b"XXXX", 5000).unwrap();
    drop(f);
    let mut corrupt = vec!["pull", "img:v1", "bad"];
    corrupt.extend(reg_args(&reg));
    let err = ns.lume_fails(&home, &corrupt);
    assert!(err.contains("did not match its digest"), "{err}");
    assert!(!home.vm_dir("bad").exists());
    assert!(!home.ok(&["ls"]).contains("bad"));
    let cached = sh(&format!(
        "find {} -name 'sha256_{data_layer}' | wc -l",
        home.path().join(".lume/cache").display()
    ));
    assert_eq!(cached.trim(), "0", "a corrupt blob was kept as complete");
}

#[test]
fn legacy_lz4_image_is_pulled() {
    let ns = Netns::new("lleg");
    let tmp = tempfile::tempdir().unwrap();
    let reg = registry(&ns, tmp.path(), 5000, None);
    let home = Home::new();
    // A 16 MB disk in two legacy parts of 8 MB, Apple-LZ4 encoded.
    let mut disk = vec![0u8; (16 * MB) as usize];
    disk[..21].copy_from_slice(b"legacy lume disk head");
    for (i, b) in disk[(9 * MB) as usize..(10 * MB) as usize]
        .iter_mut()
        .enumerate()
    {
        *b = (i % 251) as u8;
    }
    let config = serde_json::json!({"os": "linux", "cpuCount": 1, "memorySize": 536870912u64, "diskSize": 16 * MB}).to_string();
    let mut layers = Vec::new();
    let upload = |data: &[u8]| -> String {
        let digest = format::digest_of(data);
        let p = tmp.path().join("blob");
        std::fs::write(&p, data).unwrap();
        ns.exec_ok(&format!(
            "loc=$(curl -sfi -X POST http://{a}/v2/test/old/blobs/uploads/ | grep -i '^location:' | cut -d' ' -f2 | tr -d '\\r') && \
             curl -sf -X PUT -H 'Content-Type: application/octet-stream' --data-binary @{p} \"$loc&digest={digest}\"",
            a = reg.addr,
            p = p.display()
        ));
        digest
    };
    let config_digest = upload(config.as_bytes());
    for part in disk.chunks((8 * MB) as usize) {
        let enc = format::encode_apple_lz4(part);
        let d = upload(&enc);
        layers.push(serde_json::json!({"mediaType": format::LEGACY_LZ4_MEDIA_TYPE, "digest": d, "size": enc.len(),
            "annotations": {"org.trycua.lume.uncompressed-size": part.len().to_string()}}));
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": format::MANIFEST_MEDIA_TYPE,
        "config": {"mediaType": format::LEGACY_CONFIG_MEDIA_TYPE, "digest": config_digest, "size": config.len()},
        "layers": layers,
        "annotations": {"org.trycua.lume.uncompressed-disk-size": (16 * MB).to_string()}
    });
    let mp = tmp.path().join("manifest.json");
    std::fs::write(&mp, manifest.to_string()).unwrap();
    let put = ns.exec_ok(&format!(
        "curl -s -X PUT -H 'Content-Type: {}' --data-binary @{} http://{}/v2/test/old/manifests/v0 -w ' %{{http_code}}'",
        format::MANIFEST_MEDIA_TYPE,
        mp.display(),
        reg.addr
    ));
    assert!(put.ends_with(" 201"), "{put}");
    ns.lume_ok(
        &home,
        &[
            "pull",
            "old:v0",
            "--registry",
            &reg.addr,
            "--organization",
            "test",
        ],
    );
    let pulled = std::fs::read(home.vm_dir("old_v0").join("disk.img")).unwrap();
    assert!(pulled == disk, "the legacy disk differs");
    assert!(allocated(&home.vm_dir("old_v0").join("disk.img")) <= 2 * MB);
    assert_eq!(home.get("old_v0")["cpuCount"], 1);
}

#[test]
fn credentials_cache_and_killed_pull() {
    let ns = Netns::new("lcrd");
    let tmp = tempfile::tempdir().unwrap();
    let hash = sh(
        "python3 -c \"import crypt; print(crypt.crypt('s3cret', crypt.mksalt(crypt.METHOD_BLOWFISH)))\" 2>/dev/null",
    );
    let reg = registry(
        &ns,
        tmp.path(),
        5001,
        Some(&format!("alice:{}", hash.trim())),
    );
    let home = Home::new();
    home.write_settings("cachingEnabled: true\n");
    let src = vm_with_data(&home, "src");
    let creds = ["--username", "alice", "--password", "s3cret"];
    let mut push: Vec<&str> = vec!["push", "src", "img:v1", "--chunk-size-mb", "8"];
    push.extend(reg_args(&reg));
    let err = ns.lume_fails(&home, &push);
    assert!(
        err.contains("Registry 127.0.0.1:5001 needs credentials: give --username"),
        "{err}"
    );
    push.extend(creds);
    ns.lume_ok(&home, &push);

    // Docker's default, a credential store: lume does not run it, and
    // says so instead of offering `docker login`.
    let docker = home.path().join(".docker");
    std::fs::create_dir_all(&docker).unwrap();
    std::fs::write(
        docker.join("config.json"),
        format!(
            r#"{{"auths":{{"{}":{{}}}},"credsStore":"desktop"}}"#,
            reg.addr
        ),
    )
    .unwrap();
    let mut helper: Vec<&str> = vec!["pull", "img:v1", "viahelper"];
    helper.extend(reg_args(&reg));
    let err = ns.lume_fails(&home, &helper);
    assert!(
        err.contains("needs credentials") && err.contains("credential helper"),
        "{err}"
    );
    assert!(
        !err.contains("docker login") && !err.contains("GITHUB"),
        "{err}"
    );

    // The Docker credentials file of the user (base64 of alice:s3cret).
    std::fs::write(
        docker.join("config.json"),
        format!(
            r#"{{"auths":{{"{}":{{"auth":"YWxpY2U6czNjcmV0"}}}}}}"#,
            reg.addr
        ),
    )
    .unwrap();
    let mut dry: Vec<&str> = vec!["pull", "img:v1", "fromdocker"];
    dry.extend(reg_args(&reg));
    ns.lume_ok(&home, &dry);
    home.ok(&["delete", "fromdocker", "--force"]);
    std::fs::remove_file(docker.join("config.json")).unwrap();
    home.ok(&["prune"]);

    // Wrong password: one clear error, no VM.
    let mut bad: Vec<&str> = vec![
        "pull",
        "img:v1",
        "x",
        "--username",
        "alice",
        "--password",
        "wrong",
    ];
    bad.extend(reg_args(&reg));
    let err = ns.lume_fails(&home, &bad);
    assert!(err.contains("refused the credentials"), "{err}");
    assert!(!home.vm_dir("x").exists());

    // A slow link, a pull killed mid-transfer: nothing listed, the partial
    // blob stays; the next pull resumes and completes.
    ns.exec_ok("tc qdisc add dev lo root tbf rate 16mbit burst 256kb latency 2s");
    let mut args: Vec<String> = ["pull", "img:v1", "dst"].map(String::from).to_vec();
    args.extend(reg_args(&reg).map(String::from));
    args.extend(creds.map(String::from));
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &ns.name])
        .arg(common::lume_bin())
        .args(&args);
    home.env(&mut c);
    let mut child = c
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let cache = home.path().join(".lume/cache");
    wait_for("a partial blob", Duration::from_secs(30), || {
        let n = sh(&format!(
            "find {} -name '*.partial' -size +256k 2>/dev/null | wc -l",
            cache.display()
        ));
        (n.trim() != "0").then_some(())
    });
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!home.ok(&["ls"]).contains("dst"));
    assert!(!home.vm_dir("dst").exists());
    ns.exec_ok("tc qdisc del dev lo root");
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = ns.lume(&home, &argv);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("already in the cache (from an earlier pull)"),
        "{err}"
    );
    same_bytes(&src, &home.vm_dir("dst").join("disk.img"));

    // Cached now: listed by `images`; a second pull is a local copy even
    // with the registry gone.
    let images = home.ok(&["images", "--organization", "test"]);
    assert!(images.starts_with("name"), "{images}");
    assert!(images.contains("img"), "{images}");
    let mut again: Vec<&str> = vec!["pull", "img:v1", "dst2"];
    again.extend(["--registry", "127.0.0.1:5001", "--organization", "test"]);
    again.extend(creds);
    let out = ns.lume(&home, &again);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Using the cached copy"));
    same_bytes(&src, &home.vm_dir("dst2").join("disk.img"));
    // The manifest still comes from the registry: without it, a clear error.
    drop(reg);
    again[2] = "dst3";
    let err = ns.lume_fails(&home, &again);
    assert!(err.contains("could not be reached"), "{err}");
    home.ok(&["prune"]);
    assert!(
        home.ok(&["images", "--organization", "test"])
            .contains("No images found")
    );
}

/// `lume serve` in `ns` on 127.0.0.1:7791; killed on drop.
struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn api(ns: &Netns, method: &str, path: &str, body: Option<&str>) -> (u16, serde_json::Value) {
    let data = body
        .map(|b| format!("-H 'Content-Type: application/json' --data '{b}'"))
        .unwrap_or_default();
    let out = ns.exec(&format!(
        "curl -s -X {method} {data} -w '\\n%{{http_code}}' http://127.0.0.1:7791{path}"
    ));
    let out = String::from_utf8_lossy(&out.stdout).to_string();
    let (json, code) = out.trim_end().rsplit_once('\n').unwrap_or(("", "0"));
    (
        code.parse().unwrap(),
        serde_json::from_str(json).unwrap_or(serde_json::Value::Null),
    )
}

#[test]
fn api_pull_start_push_images_prune() {
    let ns = Netns::new("lapi");
    let tmp = tempfile::tempdir().unwrap();
    let reg = registry(&ns, tmp.path(), 5000, None);
    let home = Home::new();
    vm_with_data(&home, "src");
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &ns.name])
        .arg(common::lume_bin())
        .args(["serve", "--port", "7791"]);
    home.env(&mut c);
    let _serve = Serve(
        c.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("lume serve", Duration::from_secs(20), || {
        (api(&ns, "GET", "/lume/vms", None).0 == 200).then_some(())
    });

    // Push through the API: the registry is on loopback, which API callers
    // may not reach unless the server's owner allows it.
    let push = format!(
        r#"{{"name":"src","imageName":"api","tags":["t1"],"registry":"{}","organization":"test","chunkSizeMb":8}}"#,
        reg.addr
    );
    let (code, body) = api(&ns, "POST", "/lume/vms/push", Some(&push));
    assert_eq!(code, 202, "{body}");
    // No tag, lume's other formats: refused by field name, never ignored.
    let (code, body) = api(
        &ns,
        "POST",
        "/lume/vms/push",
        Some(r#"{"name":"src","imageName":"api","tags":[]}"#),
    );
    assert_eq!(
        (code, body["message"].as_str()),
        (400, Some("Give at least one tag in \"tags\""))
    );
    let (code, body) = api(
        &ns,
        "POST",
        "/lume/vms/push",
        Some(r#"{"name":"src","imageName":"api","tags":["x"],"singleLayer":true}"#),
    );
    assert_eq!(code, 400, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("\"singleLayer\""),
        "{body}"
    );
    // Another command holds the VM: 409 busy at once, not 202 then a
    // failure in the log.
    let mut holder = hold_lock(&home.vm_dir("src").join(".lock"));
    let (code, body) = api(&ns, "POST", "/lume/vms/push", Some(&push));
    holder.kill().unwrap();
    holder.wait().unwrap();
    assert_eq!(code, 409, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("is busy"),
        "{body}"
    );
    let pull = format!(
        r#"{{"image":"api:t1","name":"viaapi","registry":"{}","organization":"test"}}"#,
        reg.addr
    );
    // The background push failed (private address): the tag is not there.
    std::thread::sleep(Duration::from_secs(2));
    let (code, body) = api(&ns, "POST", "/lume/pull", Some(&pull));
    assert_eq!(code, 400, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("apiPrivateImageUrls"),
        "{body}"
    );

    home.write_settings("apiPrivateImageUrls: true\ncachingEnabled: true\n");
    let (code, body) = api(&ns, "POST", "/lume/vms/push", Some(&push));
    assert_eq!(code, 202, "{body}");
    assert_eq!(body["message"], "Push initiated in background");
    wait_for("the pushed tag", Duration::from_secs(60), || {
        let out = ns.exec(&format!(
            "curl -sf http://{}/v2/test/api/tags/list",
            reg.addr
        ));
        String::from_utf8_lossy(&out.stdout)
            .contains("t1")
            .then_some(())
    });
    // A slow link, so the provisioning VM is seen.
    ns.exec_ok("tc qdisc add dev lo root tbf rate 16mbit burst 256kb latency 2s");
    let (code, body) = api(&ns, "POST", "/lume/pull/start", Some(&pull));
    assert_eq!(code, 202, "{body}");
    assert_eq!(body["name"], "viaapi");
    let mut seen = Vec::new();
    let done = wait_for("the pulled VM", Duration::from_secs(60), || {
        let (code, vm) = api(&ns, "GET", "/lume/vms/viaapi", None);
        if code == 200 && vm["status"] == "pulling" {
            assert!(vm["provisioningOperation"].is_null(), "{vm}");
            seen.push(vm["downloadProgress"].as_f64().unwrap());
        }
        std::thread::sleep(Duration::from_millis(200));
        (code == 200 && vm["status"] == "stopped").then_some(vm)
    });
    ns.exec_ok("tc qdisc del dev lo root");
    assert!(!seen.is_empty(), "never seen pulling");
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    assert!(done["downloadProgress"].is_null());
    same_bytes(
        &home.vm_dir("src").join("disk.img"),
        &home.vm_dir("viaapi").join("disk.img"),
    );
    // A background pull that fails: GET answers lume's 400 with the error.
    let bad = format!(
        r#"{{"image":"api:nope","name":"failed","registry":"{}","organization":"test"}}"#,
        reg.addr
    );
    let (code, body) = api(&ns, "POST", "/lume/pull/start", Some(&bad));
    assert_eq!(code, 202, "{body}");
    let body = wait_for("the failed pull", Duration::from_secs(30), || {
        let (code, body) = api(&ns, "GET", "/lume/vms/failed", None);
        (code == 400).then_some(body)
    });
    let msg = body["message"].as_str().unwrap();
    assert!(msg.starts_with("Pull failed for 'failed': "), "{body}");
    assert!(msg.contains("was not found"), "{body}");
    // Through the API, the hint names the request's fields, not CLI flags.
    assert!(msg.contains("\"registry\" and \"organization\""), "{body}");
    assert!(!msg.contains("--registry"), "{body}");
    let (code, images) = api(&ns, "GET", "/lume/images?organization=test", None);
    assert_eq!(code, 200);
    assert_eq!(images[0]["repository"], "api:t1", "{images}");
    let (code, body) = api(&ns, "POST", "/lume/prune", None);
    assert_eq!(
        (code, body["message"].as_str()),
        (200, Some("Successfully removed cached images"))
    );
    let (_, images) = api(&ns, "GET", "/lume/images?organization=test", None);
    assert_eq!(images, serde_json::json!([]));

    // A caller's background transfers are capped: against a registry that
    // accepts and never answers, four pulls run and a fifth is refused at
    // once (429), leaving no VM behind.
    let _silent = ns.spawn_in(|| {
        let l = std::net::TcpListener::bind("127.0.0.1:5199").unwrap();
        let mut held = Vec::new();
        for c in l.incoming() {
            held.push(c);
        }
    });
    let start = |n: u32| {
        api(
            &ns,
            "POST",
            "/lume/pull/start",
            Some(&format!(
                r#"{{"image":"img:v1","name":"held{n}","registry":"127.0.0.1:5199","organization":"test"}}"#
            )),
        )
    };
    for n in 1..=4 {
        let (code, body) = start(n);
        assert_eq!(code, 202, "{body}");
    }
    let (code, body) = start(5);
    assert_eq!(code, 429, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("running already"),
        "{body}"
    );
    assert!(!home.vm_dir("held5").exists());
}

/// A registry that misbehaves, for what docker-registry will not do: one
/// handler class per misbehaviour, each on its own server (one Python
/// program), all sharing `Hostile`'s defaults (a token path answers
/// without end, other GETs are 404s):
/// - 127.0.0.1:5100 (`RealmOnAnotherHost`) names a token realm on another
///   host (127.0.0.2:5101, `RealmHost`, which logs every Authorization
///   header it receives);
/// - 127.0.0.1:5102 (`EndlessToken`) answers the token request with an
///   endless body;
/// - 127.0.0.1:5103 (`EndlessManifest`) needs no token and answers the
///   manifest with an endless body;
/// - 127.0.0.1:5104 (`PlainRealmElsewhere`) names a plain-HTTP realm on a
///   non-loopback host;
/// - 127.0.0.1:5105 (`RealmRedirects`) names a realm on its own host that
///   redirects to 127.0.0.2:5101;
/// - 127.0.0.1:5106 (`ChallengeOnSecondLook`) needs nothing at first look,
///   and names an endless token service at every later look at /v2/;
/// - 127.0.0.1:5107 (`EndlessBlobError`) asks for Basic credentials at
///   first look (a Bearer realm on 127.0.0.2:5101 at later ones:
///   `BasicFirst`), serves a lume manifest to them, and answers the blob
///   request with an error whose body is endless;
/// - 127.0.0.1:5108 (`UploadElsewhere`; Basic, as 5107) takes pushes, but
///   sends the upload to 127.0.0.2:5101, which logs the Authorization it
///   gets and answers with an endless error;
/// - 127.0.0.1:5109 (`RealmOnAnotherPort`) names a realm on another port
///   of its host (5102's).
///
/// Endless bodies stop at 1 GiB; what was written before the client hung
/// up is logged as `sent PORT BYTES`.
const HOSTILE: &str = r#"
import sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
log = open(sys.argv[1], "a", buffering=1)
MANIFEST = ('{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",'
            '"layers":[{"mediaType":"application/vnd.trycua.lume.disk.v1","digest":"sha256:%s",'
            '"size":1048576,"annotations":{"org.trycua.lume.content.uncompressed-size":"1048576"}}]}'
            % ("a" * 64))

class Hostile(BaseHTTPRequestHandler):
    """What every server does unless its misbehaviour says otherwise: a
    token path answers without end, any other GET is a 404, a HEAD asks
    for Basic credentials and then says 404, a POST or PUT gets no answer."""
    protocol_version = "HTTP/1.0"
    def log_message(self, *a): pass
    def empty(self, code, *headers):
        self.send_response(code)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", "0"); self.end_headers()
    def endless(self, code=200):
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        sent, chunk = 0, b"[" * 65536
        try:
            while sent < (1 << 30):
                self.wfile.write(chunk); sent += len(chunk)
        except OSError:
            pass
        log.write("sent %d %d\n" % (self.server.server_port, sent))
    def authorized(self):
        if (self.headers.get("Authorization") or "").startswith("Basic "):
            return True
        self.empty(401, ("WWW-Authenticate", 'Basic realm="r"'))
        return False
    def looks(self):
        """How many times /v2/ was looked at on this server, this one too."""
        self.server.looks = getattr(self.server, "looks", 0) + 1
        return self.server.looks
    def do_HEAD(self):
        if self.authorized():
            self.empty(404)
    def do_POST(self): pass
    def do_PUT(self): pass
    def do_GET(self):
        if self.path.startswith("/token"):
            log.write("token asked at %d\n" % self.server.server_port)
        self.get()
    def get(self):
        if self.path.startswith("/token"):
            self.endless()
        else:
            self.empty(404)

class BearerRealm(Hostile):
    """/v2/ names the token realm `realm`."""
    def get(self):
        if self.path == "/v2/":
            self.empty(401, ("WWW-Authenticate", 'Bearer realm="%s",service="s"' % self.realm))
        else:
            super().get()

class RealmOnAnotherHost(BearerRealm):
    realm = "http://127.0.0.2:5101/token"

class EndlessToken(BearerRealm):
    realm = "http://127.0.0.1:5102/token"

class PlainRealmElsewhere(BearerRealm):
    realm = "http://192.0.2.1/token"

class RealmRedirects(BearerRealm):
    """A realm on the registry's own host that redirects to another."""
    realm = "http://127.0.0.1:5105/token"
    def get(self):
        if self.path.startswith("/token"):
            self.empty(302, ("Location", "http://127.0.0.2:5101/token?from=5105"))
        else:
            super().get()

class RealmOnAnotherPort(BearerRealm):
    realm = "http://127.0.0.1:5102/token"

class EndlessManifest(Hostile):
    """No challenge; the manifest never ends."""
    def get(self):
        if "/manifests/" in self.path:
            self.endless()
        else:
            super().get()

class ChallengeOnSecondLook(Hostile):
    """First look: no challenge; every later one: a token service that
    answers forever (lume must not let anything ask again)."""
    def get(self):
        if self.path != "/v2/":
            super().get()
        elif self.looks() == 1:
            self.empty(200)
        else:
            self.empty(401, ("WWW-Authenticate", 'Bearer realm="http://127.0.0.1:5106/token"'))

class BasicFirst(Hostile):
    """Basic at first look, a Bearer realm elsewhere later."""
    def get(self):
        if self.path != "/v2/":
            super().get()
        elif self.looks() == 1:
            self.empty(401, ("WWW-Authenticate", 'Basic realm="r"'))
        else:
            self.empty(401, ("WWW-Authenticate",
                             'Bearer realm="http://127.0.0.2:5101/token?from=%d"' % self.server.server_port))

class EndlessBlobError(BasicFirst):
    """A lume manifest to Basic credentials; its blob's error never ends."""
    def get(self):
        if "/manifests/" in self.path:
            if self.authorized():
                body = MANIFEST.encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
                self.send_header("Content-Length", str(len(body))); self.end_headers()
                self.wfile.write(body)
        elif "/blobs/" in self.path:
            if self.authorized():
                self.endless(500)
        else:
            super().get()

class UploadElsewhere(BasicFirst):
    """An upload session on another host (RealmHost)."""
    def do_POST(self):
        if self.authorized():
            self.empty(202, ("Location", "http://127.0.0.2:5101/upload?from=5108"))

class RealmHost(Hostile):
    """The other host: logs the Authorization of every token request and
    upload it gets; tokens for all, uploads end in an endless error."""
    def get(self):
        frm = self.path.split("from=")[1] if "from=" in self.path else ""
        log.write("realm%s auth=%s\n" % (" via " + frm if frm else "",
                                          self.headers.get("Authorization")))
        body = b'{"token":"t0k3n"}'
        self.send_response(200); self.send_header("Content-Length", str(len(body)))
        self.end_headers(); self.wfile.write(body)
    def do_PUT(self):
        log.write("upload auth=%s\n" % self.headers.get("Authorization"))
        self.endless(500)

for host, port, handler in [("127.0.0.1", 5100, RealmOnAnotherHost),
                            ("127.0.0.2", 5101, RealmHost),
                            ("127.0.0.1", 5102, EndlessToken),
                            ("127.0.0.1", 5103, EndlessManifest),
                            ("127.0.0.1", 5104, PlainRealmElsewhere),
                            ("127.0.0.1", 5105, RealmRedirects),
                            ("127.0.0.1", 5106, ChallengeOnSecondLook),
                            ("127.0.0.1", 5107, EndlessBlobError),
                            ("127.0.0.1", 5108, UploadElsewhere),
                            ("127.0.0.1", 5109, RealmOnAnotherPort)]:
    s = ThreadingHTTPServer((host, port), handler)
    threading.Thread(target=s.serve_forever, daemon=True).start()
open(sys.argv[1] + ".ready", "w").close()
threading.Event().wait()
"#;

/// The token exchange is lume's: credentials never reach a realm on
/// another host (unless LUME_TOKEN_REALMS names it), a plain-HTTP realm
/// elsewhere is refused, and endless token or manifest answers are cut
/// off instead of read into memory.
#[test]
fn hostile_registry_realm_and_endless_answers() {
    let ns = Netns::new("lhos");
    let tmp = tempfile::tempdir().unwrap();
    let script = tmp.path().join("hostile.py");
    std::fs::write(&script, HOSTILE).unwrap();
    let log = tmp.path().join("log");
    let mut server = Command::new("ip")
        .args(["netns", "exec", &ns.name, "python3"])
        .arg(&script)
        .arg(&log)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let ready = tmp.path().join("log.ready");
    wait_for("the hostile registry", Duration::from_secs(20), || {
        ready.exists().then_some(())
    });
    let home = Home::new();
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let pull = |port: u16, creds: bool, realms: Option<&str>| {
        let registry = format!("127.0.0.1:{port}");
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &ns.name])
            .arg(common::lume_bin())
            .args(["pull", "img:v1", "x", "--registry", &registry])
            .args(["--organization", "test"]);
        if creds {
            c.args(["--username", "alice", "--password", "s3cret"]);
        }
        home.env(&mut c);
        match realms {
            Some(r) => c.env("LUME_TOKEN_REALMS", r),
            None => c.env_remove("LUME_TOKEN_REALMS"),
        };
        let out = c.output().unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };

    // Credentials and a realm on another host: refused, nothing sent.
    let err = pull(5100, true, None);
    assert!(
        err.contains("wants its credentials sent to 127.0.0.2")
            && err.contains("LUME_TOKEN_REALMS=127.0.0.2"),
        "{err}"
    );
    assert!(!read_log().contains("realm"), "{}", read_log());
    // Anonymous: the token is fetched there, without credentials.
    let err = pull(5100, false, None);
    assert!(err.contains("was not found"), "{err}");
    assert!(read_log().contains("realm auth=None"), "{}", read_log());
    // The user trusts that host: then (only then) it gets them.
    pull(5100, true, Some("127.0.0.2:5101"));
    assert!(read_log().contains("realm auth=Basic "), "{}", read_log());
    // Another port of the registry's own host is another service (on
    // loopback, any local user's): no credentials for it either.
    let err = pull(5109, true, None);
    assert!(err.contains("LUME_TOKEN_REALMS=127.0.0.1:5102"), "{err}");
    assert!(
        !read_log().contains("token asked at 5102"),
        "{}",
        read_log()
    );

    // A realm on the registry's host that redirects elsewhere: the
    // credentials do not follow.
    let err = pull(5105, true, None);
    assert!(err.contains("was not found"), "{err}");
    assert!(
        read_log().contains("realm via 5105 auth=None"),
        "{}",
        read_log()
    );

    // A plain-HTTP realm elsewhere is never contacted.
    let err = pull(5104, false, None);
    assert!(
        err.contains("sends lume for a token to http://192.0.2.1/token")
            && err.contains("not HTTPS"),
        "{err}"
    );

    // Endless answers: cut off after a few MiB, a clear error.
    let sent = |port: u16| -> u64 {
        let prefix = format!("sent {port} ");
        let text = wait_for("the server's count", Duration::from_secs(30), || {
            let t = read_log();
            t.contains(&prefix).then_some(t)
        });
        let line = text.lines().find(|l| l.starts_with(&prefix)).unwrap();
        line[prefix.len()..].parse().unwrap()
    };
    let err = pull(5102, false, None);
    assert!(err.contains("sent a token answer longer than"), "{err}");
    assert!(sent(5102) < 32 * MB, "{}", read_log());
    let err = pull(5103, false, None);
    assert!(err.contains("sent a manifest longer than"), "{err}");
    assert!(sent(5103) < 32 * MB, "{}", read_log());
    // A registry whose second look at /v2/ differs from the first: nothing
    // asks again (oci-client's own auth check once fetched that token
    // service's endless answer whole).
    let err = pull(5106, false, None);
    assert!(err.contains("was not found"), "{err}");
    assert!(!read_log().contains("sent 5106"), "{}", read_log());
    assert!(!home.vm_dir("x").exists());

    // With credentials: the registry asked for them itself (Basic), and
    // nothing looks at /v2/ a second time, where it would name a token
    // service elsewhere. A blob request's endless error answer is cut off.
    let err = pull(5107, true, None);
    assert!(err.contains("Registry 127.0.0.1:5107 failed"), "{err}");
    assert!(sent(5107) < 32 * MB, "{}", read_log());
    assert!(!read_log().contains("via 5107"), "{}", read_log());
    assert!(!home.vm_dir("x").exists());

    // A push whose upload the registry sends to another host: the
    // credentials stay behind, and its endless error answer is cut off.
    let push_vm = "pushme";
    let disk = vm_with_data(&home, push_vm);
    assert!(disk.exists());
    let err = ns.lume_fails(
        &home,
        &[
            "push",
            push_vm,
            "img:v1",
            "--registry",
            "127.0.0.1:5108",
            "--organization",
            "test",
            "--username",
            "alice",
            "--password",
            "s3cret",
        ],
    );
    assert!(err.contains("Registry 127.0.0.1:5108 failed"), "{err}");
    assert!(read_log().contains("upload auth=None"), "{}", read_log());
    assert!(!read_log().contains("upload auth=Basic"), "{}", read_log());
    assert!(sent(5101) < 32 * MB, "{}", read_log());

    let _ = server.kill();
    let _ = server.wait();
}

/// `lume_push` and `lume_pull` through `lume serve --mcp`, driven by the
/// official MCP Python SDK: the same actions as the CLI, with progress
/// notifications (bytes downloaded, over a slowed link), errors as tool
/// results that name the tool's arguments.
#[test]
fn mcp_pull_and_push() {
    let python = common::client_python("mcp");
    let ns = Netns::new("lmcp");
    let tmp = tempfile::tempdir().unwrap();
    let reg = registry(&ns, tmp.path(), 5006, None);
    let home = Home::new();
    let src = vm_with_data(&home, "src");
    // Slow enough for a few progress looks during the pull.
    ns.exec_ok("tc qdisc add dev lo root tbf rate 24mbit burst 256kb latency 2s");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/mcp_registry.py");
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &ns.name])
        .arg(&python)
        .arg(&script)
        .arg(common::lume_bin())
        .arg(&reg.addr);
    home.env(&mut c);
    let v = common::session_result(&c.output().unwrap());

    let push = &v["push"];
    assert_eq!(push["isError"], false, "{push}");
    assert!(
        push["text"]
            .as_str()
            .unwrap()
            .contains(&format!("Pushed {}/test/img:mcp", reg.addr)),
        "{push}"
    );
    let pull = &v["pull"];
    assert_eq!(pull["isError"], false, "{pull}");
    same_bytes(&src, &home.vm_dir("dst").join("disk.img"));
    // Byte progress: increasing, against the image's total, reaching it.
    let bytes: Vec<(f64, f64)> = pull["progress"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["total"].is_number())
        .map(|p| {
            (
                p["progress"].as_f64().unwrap(),
                p["total"].as_f64().unwrap(),
            )
        })
        .collect();
    assert!(bytes.len() >= 2, "{pull}");
    assert!(bytes.windows(2).all(|w| w[0].0 < w[1].0), "{pull}");
    assert!(
        bytes.iter().all(|(p, t)| p <= t && *t > MB as f64),
        "{pull}"
    );

    let missing = &v["missing"];
    assert_eq!(missing["isError"], true, "{missing}");
    let text = missing["text"].as_str().unwrap();
    assert!(
        text.starts_with("Error: Image")
            && text.contains("was not found")
            && text.contains("\"registry\" and \"organization\""),
        "{text}"
    );
    assert!(!home.vm_dir("nope").exists());
    drop(reg);
}
