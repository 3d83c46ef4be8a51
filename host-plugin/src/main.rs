//! `ferry-host`: migrate a QEMU VM to another site through the gateways, or serve as the
//! destination of such migrations.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

mod disk_manifest;

use ferry_api::control::DEFAULT_SERVE_PORT;
use ferry_host::migrate::{migrate, MigrateOptions};
use ferry_host::progress::ProgressMode;
use ferry_host::serve::{serve, ServeConfig};
use ferry_host::session::Outcome;
use ferry_host::settings::MultifdChoice;

/// Ferry host-plugin: live-migrates QEMU VMs between sites through the Ferry gateways.
#[derive(Parser)]
#[command(name = "ferry-host", version = ferry_host::VERSION, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant, reason = "parsed once per run")]
enum Command {
    /// Migrate a running VM to another site (run on the source host).
    Migrate {
        /// The VM's QMP socket (`-qmp unix:PATH,server=on,wait=off`).
        #[arg(long)]
        qmp: PathBuf,
        /// Destination site (a peer of the local gateway).
        #[arg(long)]
        to: String,
        /// The destination host's `ferry-host serve`: IP or IP:PORT as the destination gateway
        /// reaches it (default port 7800).
        #[arg(long = "dest-host")]
        dest_host: String,
        /// The local gateway's API (`[api] listen` in its config).
        #[arg(long, default_value = "127.0.0.1:7070")]
        gateway: SocketAddr,
        /// VM name (default: QEMU's -name); selects the destination's sockets.
        #[arg(long)]
        name: Option<String>,
        /// An IP address of the VM to announce at the destination (repeat for more).
        #[arg(long = "ip")]
        ips: Vec<IpAddr>,
        /// The VM's heartbeat chardev socket, to measure the downtime the guest sees.
        #[arg(long)]
        heartbeat: Option<PathBuf>,
        /// Guest downtime to aim for.
        #[arg(long, default_value = "500ms", value_parser = ferry_units::parse_duration)]
        downtime: Duration,
        /// Cancel the migration (the VM keeps running here) when not done after this long.
        #[arg(long = "max-time", default_value = "30m", value_parser = ferry_units::parse_duration)]
        max_time: Duration,
        /// Multifd: auto (4 channels from 1 GiB of RAM), off, or a channel count.
        #[arg(long, default_value = "auto")]
        multifd: MultifdChoice,
        /// Leave the source VM paused after the migration instead of quitting it.
        #[arg(long = "keep-source")]
        keep_source: bool,
        /// Progress display: auto, bar, lines or none.
        #[arg(long, default_value = "auto")]
        progress: ProgressMode,
        /// Write the final report as JSON to this file.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Print the final report as JSON on stdout (instead of the summary).
        #[arg(long)]
        json: bool,
        /// Leave convergence to QEMU alone (no bandwidth cap from the gateway's measurements,
        /// downtime-limit = --downtime): for comparisons and diagnosis.
        #[arg(long = "no-steer")]
        no_steer: bool,
    },
    /// Receive migrations (run on each destination host).
    Serve {
        /// Config file (TOML); see config/README.md.
        #[arg(long)]
        config: PathBuf,
    },
    /// Print the replica manifest of a disk image: Merkle root, blocks, zero blocks, speed.
    DiskManifest {
        /// The image file.
        image: PathBuf,
        /// Image format: raw is read directly, others through a read-only qemu-nbd.
        #[arg(long, default_value = "raw")]
        format: String,
        /// Block size (a power of two from 4KiB to 16MiB).
        #[arg(long = "block-size", default_value = "64KiB")]
        block_size: ferry_units::ByteSize,
        /// Read a raw image through qemu-nbd too (to compare with the direct reader).
        #[arg(long = "via-qemu-nbd")]
        via_qemu_nbd: bool,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn parse_dest(text: &str) -> anyhow::Result<SocketAddr> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    match text.parse::<IpAddr>() {
        Ok(ip) => Ok(SocketAddr::new(ip, DEFAULT_SERVE_PORT)),
        // Names would resolve here, at the source site; the destination gateway dials the
        // address, so it must be one that makes sense there.
        Err(_) => bail!("--dest-host `{text}`: give an IP address or IP:PORT as seen from the destination site"),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn,ferry_host=info")))
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    match cli.command {
        Command::Migrate { qmp, to, dest_host, gateway, name, ips, heartbeat, downtime, max_time, multifd, keep_source, progress, report, json, no_steer } => {
            let dest = parse_dest(&dest_host)?;
            let options = MigrateOptions { qmp, to, dest, gateway, name, ips, heartbeat, downtime, max_time, multifd, keep_source, progress, steer: !no_steer };
            let result = runtime.block_on(migrate(options));
            let text = serde_json::to_string_pretty(&result).context("cannot encode the report")?;
            if let Some(path) = report {
                std::fs::write(&path, format!("{text}\n")).with_context(|| format!("cannot write the report to {}", path.display()))?;
            }
            if json {
                println!("{text}");
            } else {
                println!("{}", result.summary());
            }
            if result.outcome != Outcome::Completed {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::DiskManifest { image, format, block_size, via_qemu_nbd, json } => {
            runtime.block_on(disk_manifest::run(&image, &format, block_size, via_qemu_nbd, json))
        }
        Command::Serve { config } => {
            let config = ServeConfig::load(&config)?;
            runtime.block_on(async {
                let listener = tokio::net::TcpListener::bind(config.listen)
                    .await
                    .with_context(|| format!("key `listen`: cannot listen on {}", config.listen))?;
                tracing::info!(listen = %config.listen, "serving incoming migrations");
                tokio::select! {
                    _ = serve(listener, config) => Ok(()),
                    r = tokio::signal::ctrl_c() => r.context("cannot wait for Ctrl-C"),
                }
            })
        }
    }
}
