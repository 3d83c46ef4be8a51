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
use ferry_api::protocol::ApiAddress;
use ferry_host::gateway_api::GatewayEndpoint;
use ferry_host::exclusive::DEFAULT_STATE_DIR;
use ferry_host::migrate::{migrate, MigrateOptions};
use ferry_host::resolve::{resolve, ResolveOptions};
use ferry_host::watchdog::{self, WatchdogOptions};
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

/// Which VM, and the way to its destination: what `migrate` and `resolve` both need.
#[derive(clap::Args)]
struct Target {
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
    /// The local gateway's API: its UNIX socket (`[api] socket`) or, over TCP, IP:PORT
    /// (`[api] listen`, which needs --gateway-token-file).
    #[arg(long, default_value = ferry_host::gateway_api::DEFAULT_GATEWAY_SOCKET)]
    gateway: ApiAddress,
    /// The token of a TCP gateway API (the file its `[api] token_file` names, or a copy).
    #[arg(long = "gateway-token-file")]
    gateway_token_file: Option<PathBuf>,
    /// VM name (default: QEMU's -name); selects the destination's sockets.
    #[arg(long)]
    name: Option<String>,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant, reason = "parsed once per run")]
enum Command {
    /// Migrate a running VM to another site (run on the source host).
    Migrate {
        #[command(flatten)]
        target: Target,
        /// An IP address of the VM to announce at the destination (repeat for more).
        #[arg(long = "ip")]
        ips: Vec<IpAddr>,
        /// The VM's heartbeat chardev socket, to measure the downtime the guest sees.
        #[arg(long)]
        heartbeat: Option<PathBuf>,
        /// Cutover pause to aim for (source stop to destination resume).
        #[arg(long, default_value = "300ms", value_parser = ferry_units::parse_duration)]
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
        /// Where the per-VM locks live (one migration per VM per host).
        #[arg(long = "state-dir", default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// A shell command to run when QEMU completed, before the commit, with both VMs paused
        /// (FERRY_VM, FERRY_TO set); a non-zero exit cancels: the source resumes.
        #[arg(long = "pre-commit-check")]
        pre_commit_check: Option<String>,
        /// How long the pre-commit check may take.
        #[arg(long = "pre-commit-timeout", default_value = "60s", value_parser = ferry_units::parse_duration)]
        pre_commit_timeout: Duration,
        /// Longest the stop-and-copy may keep the VM paused (a link outage at the cutover, say);
        /// past it the migration is cancelled before the commit and the source resumes.
        #[arg(long = "cutover-deadline", default_value = "10s", value_parser = ferry_units::parse_duration)]
        cutover_deadline: Duration,
        /// Migrate even a QEMU known to lose memory in migrations (QEMU before 9.0 under TCG),
        /// with a warning, instead of refusing.
        #[arg(long = "ignore-known-issues")]
        ignore_known_issues: bool,
    },
    /// After a migration that ended undecided (the source paused, the destination silent):
    /// ask both sides and start the VM in exactly one place.
    Resolve {
        #[command(flatten)]
        target: Target,
        /// When the VM runs at the destination, leave the source paused instead of quitting it.
        #[arg(long = "keep-source")]
        keep_source: bool,
    },
    /// (internal) Started by `migrate`: undoes its changes to QEMU if it dies.
    #[command(hide = true)]
    Watchdog {
        #[arg(long)]
        qmp: PathBuf,
        /// Migration parameters to set back, as JSON.
        #[arg(long)]
        restore: String,
        #[arg(long)]
        parent: u32,
    },
    /// Receive migrations (run on each destination host).
    Serve {
        /// Config file (TOML); see config/README.md.
        #[arg(long)]
        config: PathBuf,
    },
    /// A reference microVM (native rust-vmm path, KVM): run one with a control socket.
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    Microvm {
        #[command(subcommand)]
        command: MicrovmCommand,
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

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
#[derive(Subcommand)]
enum MicrovmCommand {
    /// Run a reference microVM: one vCPU writing a counter into `--pages` pages, reporting it
    /// on port 0x3f8 every 2^`--report-every-log2` rounds, driven through `--control`.
    Run {
        /// The VM's name.
        #[arg(long)]
        name: String,
        /// Guest memory (one slot).
        #[arg(long, default_value = "16MiB")]
        mem: ferry_units::ByteSize,
        /// Pages the guest writes per round (its working set), from 64 KiB on.
        #[arg(long, default_value_t = 64)]
        pages: u32,
        /// Delay loop iterations per round (lower: a higher write rate).
        #[arg(long, default_value_t = 1000)]
        delay: u32,
        /// Report the counter every 2^N rounds (one VM exit each).
        #[arg(long = "report-every-log2", default_value_t = 4)]
        report_every_log2: u8,
        /// The control socket (default: /run/ferry/microvm-NAME.sock).
        #[arg(long)]
        control: Option<PathBuf>,
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
        Command::Migrate { target: Target { qmp, to, dest_host, gateway, gateway_token_file, name }, ips, heartbeat, downtime, max_time, multifd, keep_source, progress, report, json, no_steer, state_dir, pre_commit_check, pre_commit_timeout, cutover_deadline, ignore_known_issues } => {
            let dest = parse_dest(&dest_host)?;
            let gateway = GatewayEndpoint::new(gateway, gateway_token_file.as_deref())?;
            let options = MigrateOptions { qmp, to, dest, gateway, name, ips, heartbeat, downtime, max_time, multifd, keep_source, progress, steer: !no_steer, state_dir, pre_commit_check, pre_commit_timeout, cutover_deadline, ignore_known_issues };
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
        Command::Resolve { target: Target { qmp, to, dest_host, gateway, gateway_token_file, name }, keep_source } => {
            let dest = parse_dest(&dest_host)?;
            let gateway = GatewayEndpoint::new(gateway, gateway_token_file.as_deref())?;
            let report = runtime.block_on(resolve(ResolveOptions { qmp, to, dest, gateway, name, keep_source }))?;
            println!("{}", serde_json::to_string_pretty(&report).context("cannot encode the report")?);
            Ok(())
        }
        Command::Watchdog { qmp, restore, parent } => {
            let restore = serde_json::from_str(&restore).context("--restore: not migration parameters in JSON")?;
            watchdog::run(WatchdogOptions { qmp, restore, parent }, &runtime)
        }
        #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
        Command::Microvm { command: MicrovmCommand::Run { name, mem, pages, delay, report_every_log2, control } } => {
            use ferry_host::native::control::{run, RunOptions};
            use ferry_host::native::microvm::{GuestParams, MicroVmConfig};
            let control = control.unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR).join(format!("microvm-{name}.sock")));
            let config = MicroVmConfig { mem_size: mem.0, guest: GuestParams { pages, delay, report_every_log2 } };
            runtime.block_on(run(RunOptions { name, config, control }))
        }
        Command::DiskManifest { image, format, block_size, via_qemu_nbd, json } => {
            runtime.block_on(disk_manifest::run(&image, &format, block_size, via_qemu_nbd, json))
        }
        Command::Serve { config } => {
            let config = ServeConfig::load(&config)?;
            runtime.block_on(async {
                use tokio::signal::unix::{signal, SignalKind};
                let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
                let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
                let listener = tokio::net::TcpListener::bind(config.listen)
                    .await
                    .with_context(|| format!("key `listen`: cannot listen on {}", config.listen))?;
                tracing::info!(listen = %config.listen, shutdown_grace = ?config.shutdown_grace, "serving incoming migrations");
                let stop = async move {
                    tokio::select! {
                        _ = terminate.recv() => tracing::info!("SIGTERM"),
                        _ = interrupt.recv() => tracing::info!("SIGINT"),
                    }
                };
                serve(listener, config, stop).await;
                Ok(())
            })
        }
    }
}
