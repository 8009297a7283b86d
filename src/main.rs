//! The `lume` binary: parse the command line, run one command, print the
//! error chain on failure.

use clap::Parser;

fn main() {
    // Started by ssh as the askpass helper of `lume ssh --password`.
    if lume::guest::ssh::serve_askpass() {
        return;
    }
    let cli = lume::cli::Cli::parse();
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
            std::process::exit(1);
        }
    }
}
