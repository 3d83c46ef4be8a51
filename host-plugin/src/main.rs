//! `ferry-host` binary.

use clap::Parser;

/// Ferry host-plugin (orchestration arrives in a later release).
#[derive(Parser)]
#[command(name = "ferry-host", version = ferry_host::VERSION, about)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    tracing_subscriber::fmt().with_writer(std::io::stderr).init();
    tracing::info!("ferry-host {}: no subcommands yet", ferry_host::VERSION);
    Ok(())
}
