//! What the agent reads: errors worded with the MCP tools' names and
//! arguments (not the CLI's commands and flags), and arguments taken as
//! leniently as upstream lume takes them (`"2"` for 2, `"true"` for true,
//! a bare number for a size), with a type error naming the argument.

use std::sync::Arc;

use serde_json::{Map, Value};

use super::ToolError;
use crate::guest::ssh::SshError;
use crate::image::download::DownloadError;
use crate::image::import::ImportError;
use crate::network::attach::AttachError;
use crate::network::publish::PublishError;
use crate::vm::VmError;
use crate::vm::store::StoreError;

/// The agent's words for the errors whose "what to do next" names a CLI
/// command or flag; `None`: the CLI's message is already right.
pub(super) fn agent_message(e: &ToolError) -> Option<String> {
    Some(match e {
        ToolError::Vm(v) => return vm_message(v),
        ToolError::Store(s) => return store_message(s),
        ToolError::Publish(p) => publish_message(p),
        ToolError::Policy(p) => p.message(crate::vm::Door::Mcp),
        ToolError::Ssh(s) => match s {
            SshError::NotRunning(n) => {
                format!("VM '{n}' is not running: start it with lume_run_vm")
            }
            SshError::NoAddress(n) => format!(
                "VM '{n}' has no IP address yet: wait for it to boot (lume_get_vm shows ipAddress once the guest has a DHCP lease), or call lume_exec again with a longer timeout"
            ),
            SshError::NoNetwork(n) => format!(
                "VM '{n}' runs in network mode 'none': there is no network to reach it through; stop it with lume_stop_vm and start it again with lume_run_vm and network: \"user\""
            ),
            SshError::NoForward(n) => format!(
                "VM '{n}' runs in user mode without a forwarded SSH port: restart it with this lume (lume_stop_vm, then lume_run_vm)"
            ),
            SshError::NotReady {
                name, secs, why, ..
            } => format!(
                "VM '{name}' did not answer SSH within {secs} s ({why}): it may still be booting; call lume_exec again, or with a larger timeout argument (seconds, at most {max})",
                max = crate::vm::actions::MAX_TIMEOUT_SECS
            ),
            _ => return None,
        },
        _ => return None,
    })
}

fn store_message(e: &StoreError) -> Option<String> {
    Some(match e {
        StoreError::NotFound { name, root } => format!(
            "VM '{name}' does not exist in {}: list your VMs with lume_list_vms",
            root.display()
        ),
        StoreError::NotFoundAnywhere { name, locations } => format!(
            "VM '{name}' does not exist in any VM location (searched: {locations}): list your VMs with lume_list_vms"
        ),
        StoreError::Provisioning(n) => format!(
            "VM '{n}' is still being created (status provisioning): wait until lume_get_vm shows it stopped, then try again"
        ),
        StoreError::Pulling(n) => format!(
            "VM '{n}' is still being pulled (status pulling): wait until lume_get_vm shows it stopped, then try again"
        ),
        _ => return None,
    })
}

fn publish_message(e: &PublishError) -> String {
    match e {
        PublishError::Syntax(v) => format!(
            "Invalid publish entry '{v}': write [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|/udp], for example \"8080:80\" or \"127.0.0.1:2222:22\""
        ),
        PublishError::Port(v) => {
            format!("Invalid port in publish entry '{v}': ports are 1 to 65535")
        }
        e => e.to_string(),
    }
}

fn vm_message(e: &VmError) -> Option<String> {
    Some(match e {
        VmError::Store(s) => return store_message(s),
        VmError::Snapshot(s) => s.message(crate::vm::snapshot::Door::Mcp),
        VmError::Policy(p)
        | VmError::Network(AttachError::Policy(p))
        | VmError::Run(crate::hypervisor::supervisor::RunError::Network(AttachError::Policy(
            p,
        ))) => p.message(crate::vm::Door::Mcp),
        VmError::NotRunning(n) => format!("VM '{n}' is not running: start it with lume_run_vm"),
        VmError::Registry(crate::registry::RegistryError::Running(n)) => {
            format!("VM '{n}' is running: stop it with lume_stop_vm before pushing it")
        }
        VmError::DiskWhileRunning(n) => format!(
            "VM '{n}' is running: stop it with lume_stop_vm before resizing its disk"
        ),
        VmError::CloneWhileRunning(n) => format!(
            "Source VM '{n}' is running: stop it with lume_stop_vm before cloning it"
        ),
        VmError::InitrdWithoutKernel => {
            "The initrd and cmdline arguments need kernel: give kernel (an absolute path to the kernel) too, or leave them out".into()
        }
        VmError::Sha256WithoutImage => {
            "The image_sha256 argument checks an image: give image too, or leave image_sha256 out".into()
        }
        VmError::NoCpu => "The cpu argument must be at least 1".into(),
        VmError::UnknownOs(os) => {
            format!("Unknown os '{os}': give os: \"linux\" (or leave it out)")
        }
        VmError::MacOsGuest => {
            "macOS guests need an Apple host: lume on Linux creates Linux VMs (leave os out, or give os: \"linux\")".into()
        }
        VmError::TwoBootSources => {
            "Choose one boot source: kernel (direct kernel boot) or image (disk image), not both".into()
        }
        VmError::Network(AttachError::NeedsNetAdmin(mode)) => format!(
            "Network mode '{mode}' needs root (or CAP_NET_ADMIN), which this MCP server does not have: use network: \"user\" (no privileges needed), or run the server as root"
        ),
        VmError::Network(AttachError::Publish(p)) => publish_message(p),
        VmError::Network(AttachError::OwnBridge(i, mode)) => format!(
            "Interface '{i}' is lume's own {mode} bridge: use network: \"{mode}\" instead of bridging onto it"
        ),
        VmError::Network(AttachError::LoopbackPublish(p, mode, _)) => format!(
            "Cannot publish {p} in network mode '{mode}': a NAT port is forwarded from the host's own addresses, never from loopback; publish on a host address, or use network: \"user\", whose ports can listen on 127.0.0.1"
        ),
        VmError::Import(ImportError::TooLarge { source_name, limit })
        | VmError::Import(ImportError::Download(DownloadError::TooLarge {
            url: source_name,
            limit,
        })) => format!(
            "Cannot import {source_name}: its disk is larger than {limit} bytes, the most lume accepts for this disk: give a larger disk_size if the image is right"
        ),
        VmError::ShutdownTimeout { name, seconds, .. } => format!(
            "VM '{name}' was asked to power off but is still running after {seconds}s: call lume_stop_vm again with a larger timeout; it forces the VM off after it"
        ),
        VmError::NoGracefulShutdown(n) => format!(
            "VM '{n}' could not be asked to power off (no guest agent, no SSH, no ACPI power button): call lume_stop_vm again; it forces the VM off after its timeout"
        ),
        _ => return None,
    })
}

/// The argument names whose values are sizes: a bare number is taken as
/// GB (`parse_size`'s rule), a JSON number too.
const SIZES: [&str; 2] = ["memory", "disk_size"];

/// What the schemas promise beyond the generated types: integers and
/// booleans may come as strings, sizes as numbers, a list as one string.
pub(super) fn widen_schema(schema: &Arc<Map<String, Value>>) -> Arc<Map<String, Value>> {
    let mut schema = (**schema).clone();
    if let Some(Value::Object(props)) = schema.get_mut("properties") {
        for (name, prop) in props.iter_mut() {
            let Value::Object(prop) = prop else { continue };
            let types = types_of(prop);
            let (extra, note) = if types.contains(&"integer") {
                ("string", "a number; a string such as \"2\" is accepted too")
            } else if types.contains(&"boolean") {
                (
                    "string",
                    "true or false; \"true\" and \"false\" are accepted too",
                )
            } else if types.contains(&"array") {
                ("string", "a list; one string is taken as a list of one")
            } else if SIZES.contains(&name.as_str()) {
                ("number", "a string such as \"2GB\"; a bare number means GB")
            } else {
                continue;
            };
            let mut all: Vec<Value> = types.iter().map(|t| Value::from(*t)).collect();
            all.insert(1, extra.into());
            prop.insert("type".into(), Value::Array(all));
            let described = match prop.get("description").and_then(Value::as_str) {
                Some(d) => format!("{d} ({note})"),
                None => note.to_string(),
            };
            prop.insert("description".into(), described.into());
        }
    }
    Arc::new(schema)
}

fn types_of(prop: &Map<String, Value>) -> Vec<&'static str> {
    const KNOWN: [&str; 7] = [
        "integer", "boolean", "array", "string", "number", "object", "null",
    ];
    let names: Vec<&str> = match prop.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    KNOWN
        .iter()
        .copied()
        .filter(|k| names.contains(k))
        .collect()
}

/// A JSON value as the agent wrote it, for an error.
fn describe(v: &Value) -> String {
    match v {
        Value::String(s) => format!("the string {}", Value::from(s.as_str())),
        Value::Number(n) => format!("the number {n}"),
        Value::Bool(b) => format!("{b}"),
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "an object".into(),
        Value::Null => "null".into(),
    }
}

/// Brings the arguments of a call to the generated types, as lume takes
/// them: `"2"` → 2, `"true"` → true, 20 → `"20"` for a size, `"8080:80"` →
/// `["8080:80"]`; a value of another type, or below the schema's minimum,
/// is an error naming the argument. Arguments the schema does not list
/// are left alone (ignored by the tool, as lume does).
pub(super) fn normalise(
    tool: &str,
    schema: &Map<String, Value>,
    args: &mut Map<String, Value>,
) -> Result<(), ToolError> {
    let Some(Value::Object(props)) = schema.get("properties") else {
        return Ok(());
    };
    let wrong = |argument: &str, expected: &str, v: &Value| ToolError::Arguments {
        tool: tool.to_string(),
        why: format!("{argument}: expected {expected}, got {}", describe(v)),
    };
    for (name, value) in args.iter_mut() {
        let Some(Value::Object(prop)) = props.get(name) else {
            continue;
        };
        let types = types_of(prop);
        if value.is_null() {
            if types.contains(&"null") {
                continue;
            }
            return Err(wrong(name, "a value", value));
        }
        if types.contains(&"integer") {
            let n = match &*value {
                Value::Number(n) => n.as_u64(),
                Value::String(s) => s.trim().parse::<u64>().ok(),
                _ => None,
            };
            let Some(n) = n else {
                return Err(wrong(name, "a whole number such as 2", value));
            };
            if let Some(min) = prop.get("minimum").and_then(Value::as_u64)
                && n < min
            {
                return Err(ToolError::Arguments {
                    tool: tool.to_string(),
                    why: format!("{name}: must be at least {min}, got {n}"),
                });
            }
            *value = n.into();
        } else if types.contains(&"boolean") {
            let b = match &*value {
                Value::Bool(b) => Some(*b),
                Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
                    "true" | "1" | "yes" => Some(true),
                    "false" | "0" | "no" => Some(false),
                    _ => None,
                },
                Value::Number(n) => match n.as_u64() {
                    Some(1) => Some(true),
                    Some(0) => Some(false),
                    _ => None,
                },
                _ => None,
            };
            let Some(b) = b else {
                return Err(wrong(name, "true or false", value));
            };
            *value = b.into();
        } else if types.contains(&"array") {
            match &*value {
                Value::String(s) => *value = Value::Array(vec![s.as_str().into()]),
                Value::Array(items) if items.iter().all(Value::is_string) => {}
                _ => return Err(wrong(name, "a list of strings", value)),
            }
        } else if types.contains(&"string") {
            match &*value {
                Value::String(_) => {}
                Value::Number(n) if SIZES.contains(&name.as_str()) => {
                    *value = n.to_string().into();
                }
                _ if SIZES.contains(&name.as_str()) => {
                    return Err(wrong(
                        name,
                        "a size such as \"2GB\" (or a number of GB)",
                        value,
                    ));
                }
                _ => return Err(wrong(name, "a string", value)),
            }
        }
    }
    Ok(())
}

/// `lume_run_vm`'s answer for a started VM: the CLI's line in the tools'
/// words, promising nothing the VM's network cannot keep.
pub(super) fn started_text(d: &crate::vm::details::VmDetails) -> String {
    let accel = d.accelerator.as_deref().unwrap_or("unknown");
    let name = &d.name;
    let display = match &d.vnc_url {
        Some(url) => format!(" VNC display: {url}"),
        None => String::new(),
    };
    if d.network_mode.as_deref() == Some("none") {
        return format!(
            "VM '{name}' is running (accelerator {accel}) with no network (mode none): lume_exec cannot reach it. Stop it with lume_stop_vm.{display}"
        );
    }
    let mut address = match &d.ip_address {
        Some(ip) => format!(", address {ip}"),
        None => String::new(),
    };
    if d.ephemeral {
        address.push_str("; ephemeral: its disk changes are discarded when it stops");
    }
    format!(
        "VM '{name}' is running (accelerator {accel}{address}). Run commands in it with lume_exec (user lume, lume's SSH key; it waits until the guest answers SSH); from a host shell: lume ssh {name}. Stop it with lume_stop_vm.{display}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::mode::NetworkMode;
    use crate::network::policy::PolicyError;
    use crate::vm::VmName;

    fn schema(tool: &str) -> Arc<Map<String, Value>> {
        let server = super::super::LumeMcp::new(None);
        server.tool_router.get(tool).unwrap().input_schema.clone()
    }

    fn args(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    fn why(r: Result<(), ToolError>) -> String {
        super::super::error_text(&r.unwrap_err())
    }

    #[test]
    fn numbers_and_booleans_may_be_strings_and_sizes_numbers() {
        let s = schema("lume_create_vm");
        let mut a = args(serde_json::json!({
            "name": "web", "cpu": "4", "memory": 512, "disk_size": 2.5,
            "no_password": "true", "no_cloud_init": "0", "publish": "8080:80",
            "somethingElse": [1]
        }));
        normalise("lume_create_vm", &s, &mut a).unwrap();
        let c: super::super::CreateArgs = serde_json::from_value(Value::Object(a)).unwrap();
        assert_eq!(c.cpu, Some(4));
        assert_eq!(c.memory.as_deref(), Some("512"));
        assert_eq!(crate::vm::size::parse_size("512").unwrap(), 512 << 30);
        assert_eq!(c.disk_size.as_deref(), Some("2.5"));
        assert_eq!(c.no_password, Some(true));
        assert_eq!(c.no_cloud_init, Some(false));
        assert_eq!(c.publish, Some(vec!["8080:80".to_string()]));
        let s = schema("lume_exec");
        let mut a = args(serde_json::json!({"name": "web", "command": "id", "timeout": " 30 "}));
        normalise("lume_exec", &s, &mut a).unwrap();
        assert_eq!(a["timeout"], 30);
    }

    #[test]
    fn a_wrong_type_names_the_argument_and_what_it_got() {
        let s = schema("lume_create_vm");
        for (v, want) in [
            (
                serde_json::json!({"name": "w", "cpu": "many"}),
                "Error: Invalid arguments for lume_create_vm: cpu: expected a whole number such as 2, got the string \"many\"",
            ),
            (
                serde_json::json!({"name": "w", "cpu": -1}),
                "cpu: expected a whole number such as 2, got the number -1",
            ),
            (
                serde_json::json!({"name": "w", "cpu": 0}),
                "cpu: must be at least 1, got 0",
            ),
            (
                serde_json::json!({"name": "w", "memory": true}),
                "memory: expected a size such as \"2GB\" (or a number of GB), got true",
            ),
            (
                serde_json::json!({"name": 5}),
                "name: expected a string, got the number 5",
            ),
            (
                serde_json::json!({"name": "w", "no_password": "maybe"}),
                "no_password: expected true or false, got the string \"maybe\"",
            ),
            (
                serde_json::json!({"name": "w", "publish": [80]}),
                "publish: expected a list of strings, got a list",
            ),
        ] {
            let text = why(normalise("lume_create_vm", &s, &mut args(v)));
            assert!(text.contains(want), "{text}");
        }
        let s = schema("lume_stop_vm");
        let text = why(normalise(
            "lume_stop_vm",
            &s,
            &mut args(serde_json::json!({"name": "w", "timeout": 0})),
        ));
        assert!(
            text.contains("timeout: must be at least 1, got 0"),
            "{text}"
        );
    }

    #[test]
    fn a_running_vm_to_push_names_the_tool() {
        let e = ToolError::Vm(VmError::Registry(crate::registry::RegistryError::Running(
            "web".into(),
        )));
        let m = agent_message(&e).unwrap();
        assert_eq!(
            m,
            "VM 'web' is running: stop it with lume_stop_vm before pushing it"
        );
    }

    #[test]
    fn schemas_say_what_is_accepted() {
        let s = schema("lume_create_vm");
        let p = &s["properties"];
        assert_eq!(p["cpu"]["minimum"], 1);
        assert!(
            p["cpu"]["type"]
                .as_array()
                .unwrap()
                .contains(&"string".into())
        );
        assert!(
            p["memory"]["type"]
                .as_array()
                .unwrap()
                .contains(&"number".into())
        );
        assert!(
            p["memory"]["description"]
                .as_str()
                .unwrap()
                .contains("a bare number means GB")
        );
        assert!(
            p["no_password"]["type"]
                .as_array()
                .unwrap()
                .contains(&"string".into())
        );
        for tool in ["lume_exec", "lume_stop_vm"] {
            assert_eq!(
                schema(tool)["properties"]["timeout"]["minimum"],
                1,
                "{tool}"
            );
        }
        let s = schema("lume_resize_disk");
        assert!(
            s["properties"]["disk_size"]["type"]
                .as_array()
                .unwrap()
                .contains(&"number".into())
        );
    }

    #[test]
    fn errors_name_tools_and_arguments_not_cli_commands() {
        let n = VmName::parse("web").unwrap();
        let cases: Vec<(ToolError, &str)> = vec![
            (VmError::NotRunning(n.clone()).into(), "lume_run_vm"),
            (VmError::DiskWhileRunning(n.clone()).into(), "lume_stop_vm"),
            (VmError::CloneWhileRunning(n.clone()).into(), "lume_stop_vm"),
            (VmError::InitrdWithoutKernel.into(), "give kernel"),
            (VmError::Sha256WithoutImage.into(), "give image"),
            (
                VmError::Network(AttachError::NeedsNetAdmin(NetworkMode::Nat)).into(),
                "network: \"user\"",
            ),
            (SshError::NotRunning("web".into()).into(), "lume_run_vm"),
            (
                PublishError::Syntax("80".into()).into(),
                "publish entry '80'",
            ),
            (StoreError::Provisioning(n.clone()).into(), "lume_get_vm"),
            (StoreError::Pulling(n.clone()).into(), "status pulling"),
            (
                VmError::Import(ImportError::TooLarge {
                    source_name: "d.qcow2".into(),
                    limit: 5,
                })
                .into(),
                "larger disk_size",
            ),
            (
                SshError::NoNetwork("web".into()).into(),
                "network: \"user\"",
            ),
            (
                SshError::NotReady {
                    name: "web".into(),
                    secs: 5,
                    why: "no address",
                    console: "/x".into(),
                }
                .into(),
                "larger timeout argument",
            ),
            (
                StoreError::NotFound {
                    name: n.clone(),
                    root: "/r".into(),
                }
                .into(),
                "lume_list_vms",
            ),
            // Policies: the argument and its item, not --allow-out.
            (
                crate::network::policy::Policy::from_parts(&[], &["10.0.0.1/8".into()], false)
                    .unwrap_err()
                    .into(),
                "Argument deny_out[0]: Invalid network rule '10.0.0.1/8'",
            ),
            (
                VmError::Policy(PolicyError::ModeCannotEnforce(NetworkMode::User)).into(),
                "allow_out, deny_out, isolate) works with network \"nat\"",
            ),
            (
                VmError::Run(crate::hypervisor::supervisor::RunError::Network(
                    AttachError::Policy(PolicyError::ModeCannotEnforce(NetworkMode::User)),
                ))
                .into(),
                "pass another network",
            ),
        ];
        for (e, want) in cases {
            let text = super::super::error_text(&e);
            assert!(text.contains(want), "{text}");
            assert!(!text.contains("--") && !text.contains("`lume "), "{text}");
            let first = text
                .strip_prefix("Error: ")
                .unwrap()
                .chars()
                .next()
                .unwrap();
            assert!(first.is_uppercase(), "{text}");
        }
    }

    #[test]
    fn a_run_without_network_promises_no_ssh() {
        let mut d = crate::vm::details::VmDetails {
            name: "web".into(),
            os: None,
            cpu_count: None,
            memory_size: None,
            disk_size: None,
            display: None,
            status: crate::vm::details::VmStatus::Running,
            provisioning_operation: None,
            vnc_url: None,
            ip_address: None,
            ipv6_addresses: Vec::new(),
            ssh_available: Some(false),
            location_name: "default".into(),
            shared_directories: Vec::new(),
            network_mode: Some("none".into()),
            download_progress: None,
            mac_address: None,
            accelerator: Some("tcg".into()),
            network: None,
            error: None,
            snapshots: Vec::new(),
            ephemeral: false,
        };
        let t = started_text(&d);
        assert!(
            t.contains("no network") && !t.contains("lume ssh") && !t.contains("yet"),
            "{t}"
        );
        assert!(t.contains("lume_stop_vm"), "{t}");
        d.network_mode = Some("user".into());
        let t = started_text(&d);
        assert!(
            t.contains("lume_exec") && t.contains("lume_stop_vm") && !t.contains("not known"),
            "{t}"
        );
        assert!(!t.contains("`lume stop"), "{t}");
        assert!(!t.contains("VNC"), "{t}");
        // The display, as the CLI prints it.
        d.vnc_url = Some("vnc://:pw@127.0.0.1:5901".into());
        let t = started_text(&d);
        assert!(t.ends_with("VNC display: vnc://:pw@127.0.0.1:5901"), "{t}");
    }
}

/// Standard input, watched for lines that cannot be MCP JSON-RPC (which
/// the transport skips silently): a person who types into `lume serve
/// --mcp`, or a pipe of text, is then told what the server expected.
pub(super) struct Watched<R> {
    inner: R,
    at_line_start: bool,
    foreign: Arc<std::sync::atomic::AtomicBool>,
}

impl<R> Watched<R> {
    pub(super) fn new(inner: R) -> (Self, Arc<std::sync::atomic::AtomicBool>) {
        let foreign = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let w = Self {
            inner,
            at_line_start: true,
            foreign: foreign.clone(),
        };
        (w, foreign)
    }

    fn watch(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' {
                self.at_line_start = true;
            } else if self.at_line_start && !b.is_ascii_whitespace() {
                // A JSON-RPC message is a JSON object (or a batch: an array).
                if b != b'{' && b != b'[' {
                    self.foreign
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                }
                self.at_line_start = false;
            }
        }
    }
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Watched<R> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
        if let std::task::Poll::Ready(Ok(())) = &r {
            this.watch(&buf.filled()[before..]);
        }
        r
    }
}

#[cfg(test)]
mod watched_tests {
    use super::*;
    use std::sync::atomic::Ordering;
    use tokio::io::AsyncReadExt;

    fn foreign(input: &'static [u8]) -> bool {
        let (mut w, flag) = Watched::new(input);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut out = Vec::new();
        rt.block_on(w.read_to_end(&mut out)).unwrap();
        assert_eq!(out, input);
        flag.load(Ordering::Relaxed)
    }

    #[test]
    fn text_that_is_not_json_rpc_is_noticed() {
        assert!(foreign(b"hello\n"));
        assert!(foreign(b"{\"jsonrpc\":\"2.0\"}\nquit\n"));
        assert!(!foreign(b"{\"jsonrpc\":\"2.0\"}\n\n  [{}]\r\n"));
        assert!(!foreign(b""));
    }
}
