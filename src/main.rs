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
            let _ = e.print();
            // As lume's argument parser: help and version succeed, every
            // other usage error exits with EX_USAGE.
            std::process::exit(if e.use_stderr() {
                lume::cli::EX_USAGE
            } else {
                0
            });
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
            let usage = e.downcast_ref::<lume::cli::UsageError>().is_some();
            std::process::exit(if usage { lume::cli::EX_USAGE } else { 1 });
        }
    }
}
