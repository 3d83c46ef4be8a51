//! `ferry-netem`: bring an emulated WAN (two site namespaces) up in the
//! foreground until Ctrl-C/SIGTERM, or remove leftovers with `down`.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use ferry_netem::link_params::human_rate;
use ferry_netem::naming::{CLI_DEFAULT_NAME, DEFAULT_PREFIX};
use ferry_netem::{Backend, Wan};
use ferry_units::{parse_duration, parse_loss, parse_outage, parse_rate_limit, Bandwidth};

#[derive(Parser, Debug)]
#[command(
    name = "ferry-netem",
    version,
    about = "Emulated WAN between two network namespaces (needs root)"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create the two sites and the link; runs in the foreground until Ctrl-C or SIGTERM, then cleans up.
    Up(UpArgs),
    /// Remove the namespaces of a WAN left behind (e.g. by `kill -9`).
    Down {
        /// WAN name given to `up --name`.
        #[arg(long, default_value = CLI_DEFAULT_NAME, conflicts_with = "all")]
        name: String,
        /// Remove every `fnetem*` namespace, including those of running tests.
        #[arg(long)]
        all: bool,
    },
    /// List the namespaces this tool (or its library) created.
    List,
}

#[derive(clap::Args, Debug)]
struct UpArgs {
    /// Round-trip time, e.g. 150ms (each direction gets half).
    #[arg(long, value_parser = duration_arg, default_value = "0")]
    rtt: Duration,
    /// Bottleneck rate per direction, e.g. 1gbit, 200mbit (tc units; `unlimited` = none).
    #[arg(long, value_parser = rate_arg, default_value = "unlimited")]
    rate: u64,
    /// Random loss per direction, e.g. 0.1% (or a fraction, 0.001).
    #[arg(long, value_parser = loss_arg, default_value = "0%")]
    loss: f64,
    /// Delay variation (± uniform) per direction, e.g. 2ms.
    #[arg(long, value_parser = duration_arg, default_value = "0")]
    jitter: Duration,
    /// Drop-tail queue at the bottleneck, as time at the rate, e.g. 50ms.
    #[arg(long, value_parser = duration_arg, default_value = "50ms")]
    queue: Duration,
    /// Outage window after start, e.g. 10s..15s: the link drops everything inside it.
    #[arg(long, value_parser = outage_arg)]
    outage: Option<(Duration, Duration)>,
    /// Emulator backend.
    #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
    backend: BackendArg,
    /// WAN name: namespaces are NAME-a and NAME-b.
    #[arg(long, default_value = CLI_DEFAULT_NAME)]
    name: String,
    /// Print link counters every this often (userspace backend), e.g. 5s.
    #[arg(long, value_parser = duration_arg)]
    stats: Option<Duration>,
    /// Seed for the loss and jitter draws.
    #[arg(long, default_value_t = 0x5eed_f311)]
    seed: u64,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum BackendArg {
    Auto,
    Netem,
    Userspace,
}

impl From<BackendArg> for Backend {
    fn from(b: BackendArg) -> Self {
        match b {
            BackendArg::Auto => Backend::Auto,
            BackendArg::Netem => Backend::Netem,
            BackendArg::Userspace => Backend::Userspace,
        }
    }
}

fn duration_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|e| e.to_string())
}
/// Bits per second, 0 for `unlimited` (as `Wan::builder().rate_bps` takes it).
fn rate_arg(s: &str) -> Result<u64, String> {
    parse_rate_limit(s).map(|r| r.map_or(0, Bandwidth::bits_per_second)).map_err(|e| e.to_string())
}
fn loss_arg(s: &str) -> Result<f64, String> {
    parse_loss(s).map_err(|e| e.to_string())
}
fn outage_arg(s: &str) -> Result<(Duration, Duration), String> {
    parse_outage(s).map_err(|e| e.to_string())
}

/// Blocks SIGINT and SIGTERM in this thread (and every thread spawned after)
/// so they can be taken synchronously with `sigtimedwait`.
fn block_stop_signals() -> Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it and
    // pthread_sigmask only changes this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            bail!("pthread_sigmask: {}", std::io::Error::from_raw_os_error(rc));
        }
        Ok(set)
    }
}

/// Waits up to `timeout` for one of `set`; returns the signal, or None on timeout.
fn wait_signal(set: &libc::sigset_t, timeout: Option<Duration>) -> Option<i32> {
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs() as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    loop {
        // SAFETY: `set` and `ts` outlive the call; a null siginfo pointer is allowed.
        let sig = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), ts_ptr) };
        if sig > 0 {
            return Some(sig);
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        return None;
    }
}

fn up(args: UpArgs) -> Result<()> {
    let signals = block_stop_signals()?;
    let mut builder = Wan::builder()
        .rtt(args.rtt)
        .rate_bps(args.rate)
        .loss(args.loss)
        .jitter(args.jitter)
        .queue(args.queue)
        .backend(args.backend.into())
        .name(args.name.clone())
        .seed(args.seed);
    if let Some((start, end)) = args.outage {
        builder = builder.outage(start, end);
    }
    let mut wan = builder
        .up()
        .with_context(|| format!("bringing WAN {} up", args.name))?;
    println!("{wan}");
    println!(
        "run commands in a site with: ip netns exec {} <cmd>   (peer: {})",
        wan.site_a().netns(),
        wan.site_b().addr()
    );
    println!("Ctrl-C or SIGTERM stops the link and removes both namespaces.");
    loop {
        match wait_signal(&signals, args.stats) {
            Some(sig) => {
                println!("signal {sig}: tearing down {}", wan.name());
                break;
            }
            None => {
                if args.stats.is_none() {
                    // sigtimedwait without timeout only returns on signals; be safe anyway.
                    continue;
                }
                match wan.stats() {
                    Some(s) => println!(
                        "a->b delivered {} (lost {}, queue drops {}, outage {})  b->a delivered {} (lost {}, queue drops {}, outage {})",
                        s.a_to_b.delivered, s.a_to_b.lost, s.a_to_b.queue_drops, s.a_to_b.outage_drops,
                        s.b_to_a.delivered, s.b_to_a.lost, s.b_to_a.queue_drops, s.b_to_a.outage_drops
                    ),
                    None => println!("(counters are only kept by the userspace backend; use `tc -s qdisc` in the namespaces)"),
                }
            }
        }
    }
    wan.down().context("tearing the WAN down")?;
    println!("removed {}-a and {}-b", args.name, args.name);
    Ok(())
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if !ferry_testkit::sys::is_root() {
        bail!("ferry-netem needs root (network namespaces, TUN devices, tc)");
    }
    match cli.command {
        Cmd::Up(args) => {
            tracing::debug!(rate = %human_rate(args.rate), "parsed arguments");
            up(args)
        }
        Cmd::Down { name, all } => {
            let removed = if all {
                ferry_netem::down_prefix(DEFAULT_PREFIX)?
            } else {
                let mut r = ferry_netem::down_named(&name)?;
                r.extend(ferry_netem::naming::sweep_stale()?);
                r
            };
            if removed.is_empty() {
                println!("nothing to remove");
            }
            for ns in removed {
                println!("removed namespace {ns}");
            }
            Ok(())
        }
        Cmd::List => {
            for ns in ferry_netem::netns::list()? {
                if ns.starts_with(DEFAULT_PREFIX) {
                    println!("{ns}");
                }
            }
            Ok(())
        }
    }
}
