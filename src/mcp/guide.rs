//! lume's MCP prompts and resources (upstream `MCPServer.swift`: the usage
//! guide, the default credentials, and the prompts `create-sandbox`,
//! `run-in-sandbox` and `reset-sandbox`), told for Linux guests.

use rmcp::model::{
    GetPromptResult, Prompt, PromptArgument, PromptMessage, ReadResourceResult, Resource,
    ResourceContents, Role,
};
use serde_json::{Map, Value};

pub const USAGE_GUIDE_URI: &str = "lume://usage-guide";
pub const CREDENTIALS_URI: &str = "lume://credentials";

const USAGE_GUIDE: &str = r#"# lume VM management guide (Linux)

## Overview
lume manages QEMU virtual machines on this Linux host. Use these tools to
create, run, use and throw away Linux VMs as sandboxes.

## Typical workflow

### 1. Check existing VMs
```
lume_list_vms
```

### 2. Create a VM from a cloud image
A Debian/Ubuntu "genericcloud" qcow2 image (a host file or an http(s) URL)
is imported as the VM's disk; lume's cloud-init seed creates user `lume`
with lume's SSH key and no password (`no_password: false` adds password
`lume`: any local user who reaches the guest's SSH port can then log in and
become root in the guest, so leave it out unless a person must log in):
```
lume_create_vm(name: "sandbox", image: "/srv/images/debian-12-genericcloud-amd64.qcow2", cpu: 2, memory: "2GB", disk_size: "20GB")
```
The tool returns once the VM exists (importing an image takes seconds to
minutes). Host paths must be absolute (or start with `~/`); they are opened
with the rights of the user running `lume serve --mcp`.

### 3. Start the VM
```
lume_run_vm(name: "sandbox")
```
It returns once QEMU runs; the guest then boots (under software emulation
this takes a minute or more).

### 4. Execute commands
`lume_exec` waits until the guest answers SSH (up to `timeout` seconds),
runs the command as user `lume` (passwordless sudo) and returns its
stdout, stderr and exit status:
```
lume_exec(name: "sandbox", command: "cloud-init status --wait; uname -a", timeout: 300)
```

### 5. Stop the VM
```
lume_stop_vm(name: "sandbox")
```

## Best practices

### VM names
Letters, digits, '.', '_' and '-': `dev-sandbox`, `test-runner`, `build-agent`.

### Resources
- Defaults: 2 CPUs, 2GB memory, 20GB disk (sparse: it grows as used).
- `lume_resize_disk` grows a stopped VM's disk; grow the partition and
  file system inside the guest afterwards (cloud images do at boot).

### Golden images
Make a fully configured VM, stop it, then clone it for fast resets:
```
lume_clone_vm(name: "golden", new_name: "fresh-sandbox")
```
A clone gets a new MAC address and provisions as itself (own hostname and
SSH host key).

### Networks
`network` on create/run: `nat` (needs root), `user` (passt, no
privilege), `bridged`, `host` (both need root), `none`. Without `network`,
lume_create_vm picks `nat` when this server runs as root and `user` when it
does not. When the server is not root, give `network: "user"` (the other
modes are refused). `none` has no network at all: lume_exec cannot reach
such a VM. `lume_network_interfaces` lists the host interfaces that can be
bridged; `lume_network_doctor` checks the host.

## Status reference

| Status | Meaning |
|--------|---------|
| `stopped` | Ready to start |
| `running` | QEMU runs; `ipAddress` appears once the guest has a lease |
| `provisioning` | Being created (image import) |

## Limits
- Linux guests only (macOS guests need an Apple host).
- `lume_run_vm`'s `shared_dir` shares one host directory (`PATH` or `PATH:ro`, absolute; only when this server runs as root); lume's guests mount it at /mnt/shared/<its name>.
"#;

const CREDENTIALS: &str =
    "Default credentials of VMs created by lume from a cloud image (cloud-init):

Username: lume
Password: none by default (lume_create_vm's no_password is true); \"lume\" only
  when the VM was created with no_password: false, which lets any local user
  who reaches the guest's SSH port log in and become root in the guest
SSH key: lume's own key pair, in the storage location's .ssh directory

Run commands with lume_exec(name: \"vm-name\", command: \"...\"): it uses lume's key,
so no password is needed. From a shell on the host: lume ssh vm-name

Get the VM's address with lume_get_vm(name: \"vm-name\") (field ipAddress).
";

/// The resources lume offers.
pub fn resources() -> Vec<Resource> {
    vec![
        Resource::new(USAGE_GUIDE_URI, "Lume Usage Guide")
            .with_description("Best practices and workflows for managing Linux VMs with lume")
            .with_mime_type("text/markdown"),
        Resource::new(CREDENTIALS_URI, "Default Credentials")
            .with_description("Default user and SSH access of VMs created from cloud images")
            .with_mime_type("text/plain"),
    ]
}

/// One resource's text; `None` for an unknown URI.
pub fn read(uri: &str) -> Option<ReadResourceResult> {
    let (text, mime) = match uri {
        USAGE_GUIDE_URI => (USAGE_GUIDE, "text/markdown"),
        CREDENTIALS_URI => (CREDENTIALS, "text/plain"),
        _ => return None,
    };
    Some(ReadResourceResult::new(vec![
        ResourceContents::text(text, uri).with_mime_type(mime),
    ]))
}

fn arg(name: &str, description: &str) -> PromptArgument {
    PromptArgument::new(name)
        .with_description(description)
        .with_required(true)
}

/// The prompts lume offers, with lume's names and argument names.
pub fn prompts() -> Vec<Prompt> {
    vec![
        Prompt::new(
            "create-sandbox",
            Some("Create a new Linux sandbox VM from a cloud image"),
            Some(vec![arg("name", "Name for the new VM")]),
        ),
        Prompt::new(
            "run-in-sandbox",
            Some("Run a command in an existing sandbox VM"),
            Some(vec![
                arg("vm_name", "Name of the VM"),
                arg("command", "Command to execute"),
            ]),
        ),
        Prompt::new(
            "reset-sandbox",
            Some("Reset a sandbox by cloning from a golden image"),
            Some(vec![
                arg("golden_image", "Name of the golden image VM"),
                arg("sandbox_name", "Name for the fresh sandbox"),
            ]),
        ),
    ]
}

/// One prompt filled in; `None` for an unknown name.
pub fn prompt(name: &str, args: Option<&Map<String, Value>>) -> Option<GetPromptResult> {
    let get = |key: &str, default: &str| -> String {
        args.and_then(|a| a.get(key))
            .and_then(Value::as_str)
            .unwrap_or(default)
            .to_string()
    };
    let (description, text) = match name {
        "create-sandbox" => {
            let vm = get("name", "sandbox");
            (
                "Create a Linux sandbox VM",
                format!(
                    "Create a new Linux sandbox VM named '{vm}' with these requirements:\n\
                     1. Create it with lume_create_vm from a cloud image (ask me for the image path or URL if you do not know one); unless this server runs as root, give network: \"user\" (nat, host and bridged need root)\n\
                     2. Start it with lume_run_vm\n\
                     3. Verify SSH connectivity by running `cloud-init status --wait; hostname` with lume_exec (timeout 300: the first boot takes a while)\n\
                     4. Report the VM's IP address (lume_get_vm)"
                ),
            )
        }
        "run-in-sandbox" => {
            let vm = get("vm_name", "sandbox");
            let command = get("command", "echo 'Hello from sandbox'");
            (
                "Run command in sandbox VM",
                format!(
                    "Run this command in the '{vm}' VM:\n```\n{command}\n```\n\n\
                     Steps:\n\
                     1. First check if the VM exists and is running (lume_list_vms)\n\
                     2. If stopped, start it with lume_run_vm\n\
                     3. Execute the command with lume_exec (it waits for SSH up to its timeout)\n\
                     4. Report stdout, stderr and the exit status"
                ),
            )
        }
        "reset-sandbox" => {
            let golden = get("golden_image", "golden");
            let sandbox = get("sandbox_name", "sandbox");
            (
                "Reset sandbox from golden image",
                format!(
                    "Reset the sandbox by cloning from the golden image:\n\
                     1. Stop '{sandbox}' if it's running (lume_stop_vm)\n\
                     2. Delete '{sandbox}' if it exists (lume_delete_vm)\n\
                     3. Clone '{golden}' to '{sandbox}' (lume_clone_vm; '{golden}' must be stopped)\n\
                     4. Start the new '{sandbox}' VM (lume_run_vm)\n\
                     5. Verify it's working with a simple command (lume_exec)"
                ),
            )
        }
        _ => return None,
    };
    Some(
        GetPromptResult::new(vec![PromptMessage::new_text(Role::User, text)])
            .with_description(description),
    )
}
