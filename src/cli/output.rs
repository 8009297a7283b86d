//! How outcomes are printed: tables for people, JSON for programs.

use anyhow::Result;
use comfy_table::{Table, presets::NOTHING};

use super::Format;
use crate::hypervisor::img::CopyKind;
use crate::network::interfaces::HostInterface;
use crate::vm::Outcome;
use crate::vm::details::VmDetails;
use crate::vm::size::format_size;

fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref()
        .map(|v| v.to_string())
        .unwrap_or_else(|| "-".into())
}

/// The network mode, and while a bridged VM's parent interface is missing,
/// that it waits for it.
fn network_column(d: &VmDetails) -> String {
    let mode = opt(&d.network_mode);
    let Some(n) = &d.network else { return mode };
    let parent = n.parent.as_deref().unwrap_or("its interface");
    match n.attachment.as_deref() {
        Some("waiting-for-parent") => format!("{mode} (waiting for {parent})"),
        Some("reattaching") => format!("{mode} (re-attaching to {parent})"),
        _ => mode,
    }
}

fn table(vms: &[VmDetails]) -> String {
    let mut t = Table::new();
    t.load_style(NOTHING);
    t.set_header([
        "name", "os", "cpu", "memory", "disk", "display", "status", "ip", "ssh", "network",
        "storage",
    ]);
    for d in vms {
        t.add_row([
            d.name.clone(),
            opt(&d.os),
            opt(&d.cpu_count),
            d.memory_size.map(format_size).unwrap_or_else(|| "-".into()),
            d.disk_size
                .as_ref()
                .map(|s| format!("{}/{}", format_size(s.allocated), format_size(s.total)))
                .unwrap_or_else(|| "-".into()),
            opt(&d.display),
            match &d.error {
                Some(e) => format!("invalid: {e}"),
                None => d.status.clone(),
            },
            opt(&d.ip_address),
            match d.ssh_available {
                Some(true) => "yes",
                Some(false) => "no",
                None => "-",
            }
            .into(),
            network_column(d),
            d.location_name.clone(),
        ]);
    }
    t.to_string()
}

/// Prints the doctor's report: one line per check.
pub fn print_doctor(report: &crate::network::doctor::Report, format: Format) -> Result<()> {
    if format == Format::Json {
        println!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    for c in &report.checks {
        println!(
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
        println!("{}", serde_json::to_string_pretty(list)?);
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
    println!("{t}");
    Ok(())
}

/// Prints one outcome.
pub fn print(outcome: &Outcome, format: Format) -> Result<()> {
    match (outcome, format) {
        (Outcome::List(vms), Format::Json) => println!("{}", serde_json::to_string_pretty(vms)?),
        (Outcome::List(vms), Format::Text) if vms.is_empty() => {
            println!("No VMs yet: create one with `lume create <name>`")
        }
        (Outcome::List(vms), Format::Text) => println!("{}", table(vms)),
        (Outcome::Details(d), Format::Json) => println!("{}", serde_json::to_string_pretty(d)?),
        (Outcome::Details(d), Format::Text) => println!("{}", table(std::slice::from_ref(d))),
        (Outcome::Created(d), _) => println!(
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
        (Outcome::Started(d), _) => println!(
            "VM '{}' is running (accelerator {}, address {}). Stop it with `lume stop {}{}`",
            d.name,
            opt(&d.accelerator),
            d.ip_address.as_deref().unwrap_or("not known yet"),
            d.name,
            match d.location_name.as_str() {
                crate::settings::DEFAULT_LOCATION_NAME => String::new(),
                storage => format!(" --storage {storage}"),
            }
        ),
        (Outcome::Exited(status), _) => eprintln!("VM stopped ({status})"),
        (
            Outcome::Stopped {
                name,
                was_running,
                method,
            },
            _,
        ) => match (was_running, method) {
            (true, Some(m)) => println!("VM '{name}' stopped {} ({m})", m.describe()),
            (true, None) => println!("VM '{name}' stopped"),
            (false, _) => println!("VM '{name}' is not running"),
        },
        (Outcome::Restarted { name, method }, _) => {
            println!(
                "VM '{name}' is restarting: reboot requested {} ({method})",
                method.describe()
            )
        }
        (Outcome::Updated(d), _) => {
            println!("VM '{}' updated; changes apply from its next start", d.name)
        }
        (Outcome::Cloned { details, copy }, _) => println!(
            "VM '{}' created as a clone (disk {})",
            details.name,
            match copy {
                CopyKind::Reflink => "shared by reflink",
                CopyKind::Sparse => "copied sparsely",
            }
        ),
        (Outcome::Deleted(name), _) => println!("VM '{name}' deleted"),
    }
    Ok(())
}
