//! `ferry-gateway`: run a site gateway, or create the site PKI.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tracing_subscriber::EnvFilter;

use ferry_gateway::{certs, Config, Gateway};

/// Ferry site gateway: carries live-migration traffic between sites over mutually
/// authenticated QUIC.
#[derive(Parser)]
#[command(name = "ferry-gateway", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a gateway.
    Run {
        /// Gateway config file (TOML); see config/README.md.
        #[arg(long)]
        config: PathBuf,
    },
    /// Check a config as `run` would (keys, values, file modes, certificates and key), print
    /// the effective configuration (defaults filled in, paths absolute, secrets hidden) and exit
    /// non-zero on the first error. Binds nothing and contacts no peer.
    CheckConfig {
        /// Gateway config file (TOML).
        config: PathBuf,
    },
    /// Create a site CA (or reuse the one in --out) and a certificate + key per site.
    Certs {
        /// Folder for ca.pem, ca.key, SITE.pem, SITE.key.
        #[arg(long)]
        out: PathBuf,
        /// A site name (repeat for each site).
        #[arg(long = "site", required = true)]
        sites: Vec<String>,
        /// Validity of the site certificates, days.
        #[arg(long, default_value_t = certs::DEFAULT_DAYS)]
        days: u32,
        /// The CA's private key (default: ca.key in --out); created there with a new CA. Keep
        /// it away from the gateways.
        #[arg(long = "ca-key")]
        ca_key: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        // Colours only on a terminal: not in files or the journal.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match cli.command {
        Command::Certs { out, sites, days, ca_key } => {
            let generated = certs::generate(&out, &sites, &certs::Issue { days, ca_key })?;
            if !generated.created_ca {
                println!("reused the existing CA in {}", out.display());
            }
            for file in generated.written {
                println!("wrote {}", file.display());
            }
            Ok(())
        }
        Command::CheckConfig { config: path } => {
            let config = Config::load(&path)?;
            ferry_gateway::tls::TunnelTls::load(&config.tls)
                .with_context(|| format!("{}: the TLS files do not load", path.display()))?;
            println!("{config:#?}");
            println!("{}: ok", path.display());
            Ok(())
        }
        Command::Run { config } => {
            let config = Config::load(&config)?;
            let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
            runtime.block_on(async {
                let mut signals = StopSignals::new()?;
                let gateway = Gateway::start(config).await?;
                let signal = signals.next().await;
                tracing::info!(signal, "stop requested (send it again to skip the grace period)");
                gateway
                    .stop(async {
                        let signal = signals.next().await;
                        tracing::info!(signal, "stop requested again");
                    })
                    .await;
                Ok(())
            })
        }
    }
}

/// SIGTERM (systemd's stop) and SIGINT (Ctrl-C), both of which stop the gateway gracefully.
struct StopSignals {
    terminate: Signal,
    interrupt: Signal,
}

impl StopSignals {
    /// Takes both signals over (from then on they no longer kill the process).
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            terminate: signal(SignalKind::terminate()).context("cannot watch SIGTERM")?,
            interrupt: signal(SignalKind::interrupt()).context("cannot watch SIGINT")?,
        })
    }

    /// The next one's name.
    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.interrupt.recv() => "SIGINT",
        }
    }
}
