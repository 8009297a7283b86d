//! The `lume` binary: parse the command line, run one command, print the
//! error chain on failure.

use clap::Parser;

fn main() {
    // libnftables (src/firewall/libnft.rs) loads iptables' extensions to
    // show other tools' xtables rules, from a directory these name: root's
    // lume takes them from the system's own place only.
    for var in ["XTABLES_LIBDIR", "IPTABLES_LIB_DIR", "IP6TABLES_LIB_DIR"] {
        // SAFETY: the first thing main does, before any thread exists.
        unsafe { std::env::remove_var(var) };
    }
    // Started by ssh as the askpass helper of `lume ssh --password`.
    if lume::guest::ssh::serve_askpass() {
        return;
    }
    // `run --vnc-password P`: the password would be on the command line,
    // readable by every local user, for the VM's whole life (a foreground
    // run is its supervisor). lume starts itself again at once without it,
    // the password in LUME_VNC_PASSWORD (readable by its own user only).
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some((rest, password)) = lume::hypervisor::vnc::strip_password_arg(&args) {
        use std::os::unix::process::CommandExt;
        let err = std::process::Command::new("/proc/self/exe")
            .arg0(&rest[0])
            .args(&rest[1..])
            .env(lume::hypervisor::vnc::PASSWORD_ENV, password)
            .exec();
        eprintln!(
            "Error: cannot start lume again without --vnc-password on its command line: {err}; give the password in LUME_VNC_PASSWORD instead"
        );
        std::process::exit(1);
    }
    // SAFETY: nothing has started a thread yet.
    unsafe { lume::hypervisor::vnc::take_password_env() };
    let cli = match lume::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // As lume's argument parser: help and version succeed, and so
            // does a command group without its subcommand (`lume`), which
            // prints its help; every other usage error exits with EX_USAGE.
            use clap::error::ErrorKind;
            let help =
                !e.use_stderr() || e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand;
            if help {
                lume::cli::output::write_stdout(format_args!("{}", e.render()));
                std::process::exit(0);
            }
            eprint!("{}", lume::cli::usage_error_text(&e));
            std::process::exit(lume::cli::EX_USAGE);
        }
    };
    match lume::cli::run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            lume::print_error(e.as_ref());
            let usage = lume::cli::is_refusal(&e);
            std::process::exit(if usage { lume::cli::EX_USAGE } else { 1 });
        }
    }
}
