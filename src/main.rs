//! The `lume` binary: parse the command line, run one command, print the
//! error chain on failure.

use clap::Parser;

fn main() {
    // Started by ssh as the askpass helper of `lume ssh --password`.
    if lume::guest::ssh::serve_askpass() {
        return;
    }
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
            eprintln!("Error: {e}");
            for cause in e.chain().skip(1) {
                let msg = cause.to_string();
                if !e.to_string().contains(&msg) {
                    eprintln!("  Caused by: {msg}");
                }
            }
            let usage = lume::cli::is_refusal(&e);
            std::process::exit(if usage { lume::cli::EX_USAGE } else { 1 });
        }
    }
}
