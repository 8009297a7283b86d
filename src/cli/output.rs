//! How outcomes are printed: tables for people, JSON for programs.

use anyhow::Result;
use comfy_table::{Table, presets::NOTHING};

use super::Format;
use crate::hypervisor::img::CopyKind;
use crate::network::interfaces::HostInterface;
use crate::vm::Outcome;
use crate::vm::actions::CloneDisk;
use crate::vm::details::{VmDetails, VmStatus};
use crate::vm::size::format_size;

/// Every write of the CLI to standard output: written and flushed at once.
/// A reader that went away (`lume ls | head -1`) ends lume quietly with
/// status 0, as git and cargo stop printing when their pipe closes, instead
/// of a panic; any other failure to write is an error on standard error
/// (status 1).
pub fn write_stdout(args: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("Error: Cannot write to standard output: {e}; check where it goes (disk full?)");
        std::process::exit(1);
    }
}

/// What `stop` and `shutdown` print: the way the VM went down, said once.
fn stopped_line(name: &crate::vm::VmName, method: crate::guest::power::PowerMethod) -> String {
    format!("VM '{name}' stopped {}", method.describe())
}

fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref()
        .map(|v| v.to_string())
        .unwrap_or_else(|| "-".into())
}

/// How a bridged VM's attachment stands, while it waits for its parent
/// interface or re-attaches.
fn attachment_note(d: &VmDetails) -> Option<String> {
    let n = d.network.as_ref()?;
    let parent = n.parent.as_deref().unwrap_or("its interface");
    match n.attachment.as_deref() {
        Some("waiting-for-parent") => Some(format!("waiting for {parent}")),
        Some("reattaching") => Some(format!("re-attaching to {parent}")),
        _ => None,
    }
}

/// lume's table (VMDetailsPrinter.swift): these columns, each padded to
/// its width. A longer value is printed whole, followed by one space
/// (lume cuts it to the width).
const COLUMNS: [(&str, usize); 13] = [
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

fn padded(cells: &[String]) -> String {
    let mut line = String::new();
    for (cell, (_, width)) in cells.iter().zip(COLUMNS) {
        line.push_str(cell);
        let len = cell.chars().count();
        if len < width {
            line.extend(std::iter::repeat_n(' ', width - len));
        } else {
            line.push(' ');
        }
    }
    line
}

/// lume's memory column: GiB with two decimals and `G`.
pub fn memory_column(bytes: u64) -> String {
    format!("{:.2}G", bytes as f32 / (1024.0 * 1024.0 * 1024.0))
}

/// One VM's row of lume's table.
fn row(d: &VmDetails) -> Vec<String> {
    let dash = || "-".to_string();
    vec![
        d.name.clone(),
        opt(&d.os),
        opt(&d.cpu_count),
        d.memory_size.map(memory_column).unwrap_or_else(dash),
        d.disk_size
            .as_ref()
            .map(|s| format!("{}/{}", format_size(s.allocated), format_size(s.total)))
            .unwrap_or_else(dash),
        opt(&d.display),
        match (d.status, &d.provisioning_operation) {
            (VmStatus::Provisioning, Some(op)) => format!("provisioning ({op})"),
            (status, _) => status.to_string(),
        },
        opt(&d.network_mode),
        d.location_name.clone(),
        if d.status == VmStatus::Running && !d.shared_directories.is_empty() {
            d.shared_directories
                .iter()
                .map(|s| {
                    format!(
                        "{} ({})",
                        s.host_path,
                        if s.read_only { "ro" } else { "rw" }
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        } else {
            dash()
        },
        opt(&d.ip_address),
        match d.ssh_available {
            Some(true) => "yes",
            Some(false) => "no",
            None => "-",
        }
        .into(),
        opt(&d.vnc_url),
    ]
}

/// lume's table of VMs: a header line, then one line per VM.
pub fn table(vms: &[VmDetails]) -> String {
    let header: Vec<String> = COLUMNS.iter().map(|(h, _)| h.to_string()).collect();
    let mut lines = vec![padded(&header)];
    lines.extend(vms.iter().map(|d| padded(&row(d))));
    lines.join("\n")
}

/// What `lume get` prints below lume's table: what we know beyond lume's
/// columns (all of it is in `-f json` too).
fn extra_lines(d: &VmDetails) -> Vec<String> {
    let mut lines = Vec::new();
    if let Some(e) = &d.error {
        lines.push(format!("error: {e}"));
    }
    if let Some(mac) = &d.mac_address {
        lines.push(format!("mac address: {mac}"));
    }
    if !d.ipv6_addresses.is_empty() {
        lines.push(format!("ipv6 addresses: {}", d.ipv6_addresses.join(", ")));
    }
    if let Some(a) = &d.accelerator {
        lines.push(format!("accelerator: {a}"));
    }
    if let Some(n) = &d.network {
        let mut what = n.mode.clone();
        if let Some(dev) = &n.host_device {
            what.push_str(&format!(", device {dev}"));
        }
        if let Some(p) = &n.parent {
            what.push_str(&format!(" on {p}"));
        }
        if let Some(a) = attachment_note(d) {
            what.push_str(&format!(" ({a})"));
        }
        lines.push(format!("network: {what}"));
        if !n.published_ports.is_empty() {
            lines.push(format!("published ports: {}", n.published_ports.join(", ")));
        }
        if let Some(p) = &n.policy {
            let parts = p.readable();
            let state = match n.policy_in_force {
                Some(true) => " (in force)",
                Some(false) => {
                    " (NOT in force: the run's guard is putting it back; stop the VM if this lasts)"
                }
                None if d.status == VmStatus::Running => {
                    " (unknown whether in force: lume could not read the VM's tap; run lume network doctor)"
                }
                None => " (saved: enforced from the next start)",
            };
            lines.push(format!("network policy: {}{state}", parts.join("; ")));
        }
        if let Some(p) = &n.saved_policy {
            let rules = if p.is_empty() {
                "none".to_string()
            } else {
                p.readable().join("; ")
            };
            lines.push(format!(
                "saved network policy (from the next start): {rules}"
            ));
        }
        if let Some(note) = &n.note {
            lines.push(format!("note: {note}"));
        }
    }
    lines
}

/// Prints the doctor's report: one line per check.
pub fn print_doctor(report: &crate::network::doctor::Report, format: Format) -> Result<()> {
    if format == Format::Json {
        outln!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    for c in &report.checks {
        outln!(
            "{} {}: {}",
            if c.ok { "ok  " } else { "FAIL" },
            c.name,
            c.detail
        );
    }
    Ok(())
}

/// Prints host interfaces for `lume config network interfaces`.
pub fn print_interfaces(list: &[HostInterface], format: Format) -> Result<()> {
    if format == Format::Json {
        outln!("{}", serde_json::to_string_pretty(list)?);
        return Ok(());
    }
    let mut t = Table::new();
    t.load_style(NOTHING);
    t.set_header([
        "name",
        "type",
        "state",
        "mac",
        "ipv4",
        "default",
        "bridgeable",
    ]);
    for i in list {
        t.add_row([
            i.name.clone(),
            serde_json::to_value(&i.kind)?
                .as_str()
                .unwrap_or_default()
                .to_string(),
            i.state.clone(),
            opt(&i.mac_address),
            if i.ipv4.is_empty() {
                "-".into()
            } else {
                i.ipv4.join(",")
            },
            if i.is_default { "yes" } else { "" }.into(),
            match &i.reason {
                None => "yes".into(),
                Some(r) => format!("no: {r}"),
            },
        ]);
    }
    outln!("{t}");
    Ok(())
}

/// Prints one outcome.
pub fn print(outcome: &Outcome, format: Format) -> Result<()> {
    match (outcome, format) {
        (Outcome::List(vms), Format::Json) => outln!("{}", serde_json::to_string_pretty(vms)?),
        (Outcome::List(vms), Format::Text) if vms.is_empty() => {
            outln!("No virtual machines found")
        }
        (Outcome::List(vms), Format::Text) => outln!("{}", table(vms)),
        // As lume: `get -f json` prints a one-element array.
        (Outcome::Details(d), Format::Json) => {
            outln!("{}", serde_json::to_string_pretty(std::slice::from_ref(d))?)
        }
        (Outcome::Details(d), Format::Text) => {
            outln!("{}", table(std::slice::from_ref(d)));
            for line in extra_lines(d) {
                outln!("{line}");
            }
        }
        (Outcome::Exited(status), _) => eprintln!("VM stopped ({status})"),
        (Outcome::Images(images), Format::Json) => {
            outln!("{}", serde_json::to_string_pretty(images)?)
        }
        (Outcome::Images(images), Format::Text) => outln!("{}", images_table(images).trim_end()),
        (Outcome::Snapshots(s), Format::Json) => outln!("{}", serde_json::to_string_pretty(s)?),
        (Outcome::Snapshots(s), Format::Text) if s.is_empty() => outln!("No snapshots"),
        (Outcome::Snapshots(s), Format::Text) => {
            let mut t = Table::new();
            t.load_style(NOTHING);
            t.set_header(["name", "created", "memory", "size"]);
            for snap in s {
                t.add_row([
                    snap.name.clone(),
                    crate::util::time::format_utc(snap.created_at, 0),
                    if snap.memory { "yes" } else { "no" }.to_string(),
                    format_size(snap.allocated_size.unwrap_or(0)),
                ]);
            }
            outln!("{t}");
        }
        (o, _) => {
            if let Some(line) = outcome_line(o) {
                outln!("{line}");
            }
        }
    }
    Ok(())
}

/// The line the CLI prints for an outcome that changed a VM (the MCP
/// server answers with the same words); `None` for lists, details and a
/// foreground run's end.
pub fn outcome_line(outcome: &Outcome) -> Option<String> {
    Some(match outcome {
        Outcome::Created(d) => format!(
            "VM '{}' created: {} {}, {} memory, {} disk, network {}",
            d.name,
            opt(&d.cpu_count),
            if d.cpu_count == Some(1) {
                "CPU"
            } else {
                "CPUs"
            },
            d.memory_size.map(format_size).unwrap_or_default(),
            d.disk_size
                .as_ref()
                .map(|s| format_size(s.total))
                .unwrap_or_default(),
            opt(&d.network_mode)
        ),
        Outcome::Started(d) => format!(
            "VM '{}' is running (accelerator {}, address {}{}). Stop it with `lume stop {}{}`{}",
            d.name,
            opt(&d.accelerator),
            d.ip_address
                .as_deref()
                .unwrap_or(if d.network_mode.as_deref() == Some("none") {
                    "none: no network"
                } else {
                    "not known yet"
                }),
            if d.ephemeral {
                "; ephemeral: its disk changes are discarded when it stops"
            } else {
                ""
            },
            d.name,
            match d.location_name.as_str() {
                crate::settings::DEFAULT_LOCATION_NAME => String::new(),
                storage => format!(" --storage {storage}"),
            },
            d.vnc_url
                .as_deref()
                .map(|u| format!("\nVNC display: {u}"))
                .unwrap_or_default()
        ),
        Outcome::Stopped { name, method } => stopped_line(name, *method),
        Outcome::Restarted { name, method } => format!(
            "VM '{name}' is restarting: reboot requested {}",
            method.describe()
        ),
        Outcome::Updated(d) => {
            format!("VM '{}' updated; changes apply from its next start", d.name)
        }
        Outcome::Cloned { details, copy } => format!(
            "VM '{}' created as a clone ({})",
            details.name,
            match copy {
                CloneDisk::Copied(CopyKind::Reflink) => "disk shared by reflink",
                CloneDisk::Copied(CopyKind::Sparse) => "disk copied sparsely",
                CloneDisk::FromSnapshot { hard_linked: true } =>
                    "from the snapshot: disk.img and its layers shared by hard links, read-only, plus a new empty layer of its own",
                CloneDisk::FromSnapshot { hard_linked: false } =>
                    "from the snapshot: disk.img and its layers copied (another filesystem), plus a new empty layer of its own",
            }
        ),
        Outcome::Deleted(name) => format!("VM '{name}' deleted"),
        Outcome::Pulled(d) => format!(
            "VM '{}' pulled: {} {}, {} memory, {} disk, network {}",
            d.name,
            opt(&d.cpu_count),
            if d.cpu_count == Some(1) {
                "CPU"
            } else {
                "CPUs"
            },
            d.memory_size.map(format_size).unwrap_or_default(),
            d.disk_size
                .as_ref()
                .map(|s| format_size(s.total))
                .unwrap_or_default(),
            opt(&d.network_mode),
        ),
        Outcome::Pushed(p) if p.dry_run => format!(
            "Dry run: nothing uploaded; the {} disk would go as {} disk part(s) ({} compressed), {} hole chunk(s) left out, manifest {}",
            format_size(p.disk_size),
            p.parts,
            format_size(p.compressed),
            p.holes,
            p.manifest_digest
        ),
        Outcome::Pushed(p) => format!(
            "Pushed {} ({} disk part(s), {} hole chunk(s) left out, {}, manifest {})",
            p.references.join(", "),
            p.parts,
            p.holes,
            if p.uploaded == 0 {
                "nothing new to upload (every blob was already in the registry)".to_string()
            } else {
                format!("{} uploaded", format_size(p.uploaded))
            },
            p.manifest_digest
        ),
        Outcome::Pruned(_) => "Successfully removed cached images".to_string(),
        Outcome::SnapshotTaken(s) => format!(
            "Snapshot '{}' taken{}",
            s.name,
            if s.memory {
                " (disk and memory)"
            } else {
                " (disk)"
            }
        ),
        Outcome::SnapshotRestored { snapshot, details } => format!(
            "VM '{}' restored to snapshot '{}'; it is {}",
            details.name, snapshot.name, details.status
        ),
        Outcome::SnapshotDeleted { name, snap } => {
            format!("Snapshot '{snap}' of VM '{name}' deleted")
        }
        Outcome::Flattened { name, layers: 0 } => {
            format!("VM '{name}' has a plain disk already: nothing to flatten")
        }
        Outcome::Flattened { name, layers } => format!(
            "VM '{name}' flattened: {layers} layer{} merged into a plain disk.img",
            if *layers == 1 { "" } else { "s" }
        ),
        Outcome::List(_)
        | Outcome::Details(_)
        | Outcome::Exited(_)
        | Outcome::Images(_)
        | Outcome::Snapshots(_) => {
            return None;
        }
    })
}

/// `lume images` as lume's ImagesPrinter prints it: `name` (28 wide) and
/// `image_id` (16 wide), sorted; "No images found" when empty.
pub fn images_table(images: &[crate::registry::cache::CachedImage]) -> String {
    if images.is_empty() {
        return "No images found\n".into();
    }
    let mut rows: Vec<String> = images
        .iter()
        .map(|i| format!("{}:{}", i.repository, i.image_id))
        .collect();
    rows.sort();
    let pad = |s: &str, w: usize| format!("{s:<w$}");
    let mut out = format!("{}{}\n", pad("name", 28), pad("image_id", 16));
    for r in rows {
        let name = r.split(':').next().unwrap_or(&r);
        let id = r.rsplit(':').next().unwrap_or("-");
        out.push_str(&format!("{}{}\n", pad(name, 28), pad(id, 16)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_says_the_way_once() {
        use crate::guest::power::PowerMethod;
        let name = crate::vm::VmName::parse("web").unwrap();
        assert_eq!(
            stopped_line(&name, PowerMethod::Forced),
            "VM 'web' stopped by forcing QEMU off (not graceful)"
        );
        assert_eq!(
            stopped_line(&name, PowerMethod::Acpi),
            "VM 'web' stopped through the ACPI power button"
        );
    }

    fn provisioning(name: &str) -> VmDetails {
        VmDetails {
            name: name.into(),
            os: Some("linux".into()),
            cpu_count: Some(2),
            memory_size: Some(8 << 30),
            disk_size: None,
            display: Some("1024x768".into()),
            status: VmStatus::Provisioning,
            provisioning_operation: Some("image_import".into()),
            vnc_url: None,
            ip_address: None,
            ipv6_addresses: Vec::new(),
            ssh_available: None,
            location_name: "home".into(),
            shared_directories: Vec::new(),
            network_mode: Some("nat".into()),
            download_progress: None,
            mac_address: None,
            accelerator: None,
            network: None,
            error: None,
            snapshots: Vec::new(),
            ephemeral: false,
        }
    }

    #[test]
    fn rows_follow_vm_details_printer() {
        let r = row(&provisioning("p"));
        assert_eq!(r[3], "8.00G");
        assert_eq!(r[4], "-");
        // The operation of a provisioning VM, in lume's words.
        assert_eq!(r[6], "provisioning (image_import)");
        assert_eq!(memory_column(1536 << 20), "1.50G");
        assert_eq!(memory_column(256 << 20), "0.25G");
        // A value as wide as its column is kept whole, then one space.
        let long = "n".repeat(45);
        let line = table(&[provisioning(&long)]);
        let second = line.lines().nth(1).unwrap();
        assert!(second.starts_with(&format!("{long} linux   ")), "{second}");
    }
}
