//! What every emulated-WAN benchmark needs beyond the test kit (`ferry_testkit::bench` has
//! the settings from the environment): the link, the gateways' link settings, and the runs and
//! table cells the migration benchmarks share.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use ferry_netem::gateway_pair::{GatewayPair, PairLink};
use ferry_netem::qemu::{WanMigrationReport, WanRoute};
use ferry_qmp::migration::MigrationMode;
use ferry_qmp::MultifdCompression;
use ferry_netem::{Backend, Wan};

/// Whether a QEMU-over-WAN benchmark can run here (root for the namespaces, QEMU installed);
/// prints why not, as `skipping NAME: ...`, when it cannot.
pub fn can_run_qemu_bench(name: &str) -> bool {
    if !ferry_testkit::sys::is_root() {
        println!("skipping {name}: needs root (network namespaces)");
        return false;
    }
    if !ferry_netem::qemu::qemu_available() {
        println!("skipping {name}: qemu-system-x86_64 not installed (apt-get install qemu-system-x86)");
        return false;
    }
    true
}

/// Two emulated sites joined by `rtt_ms` / `rate_mbit` / `loss_pct`; exits the benchmark when
/// the link cannot come up (nothing to measure without it).
pub fn wan_or_exit(rtt_ms: f64, rate_mbit: f64, loss_pct: f64) -> Wan {
    let built = Wan::builder()
        .rtt(Duration::from_secs_f64(rtt_ms / 1000.0))
        .rate_bps((rate_mbit * 1e6) as u64)
        .loss(loss_pct / 100.0)
        .backend(Backend::Auto)
        .up();
    match built {
        Ok(w) => w,
        Err(e) => {
            eprintln!("cannot bring up the WAN: {e}");
            std::process::exit(1);
        }
    }
}

/// The gateways' `[link]` for a benchmark link of `rate_mbit` and `rtt_ms` (at least 1 ms),
/// the codec on or off.
pub fn gateway_link(rate_mbit: f64, rtt_ms: f64, codec: bool) -> PairLink {
    PairLink {
        bandwidth: format!("{rate_mbit}mbit"),
        rtt: format!("{}us", ((rtt_ms * 1000.0) as u64).max(1000)),
        codec,
    }
}

/// Megabytes with one decimal.
pub fn mb(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / 1e6)
}

/// WAN bytes of a migration and where they came from: the link's counters (userspace backend)
/// or, without them (netem backend), QEMU's own `transferred`.
pub fn wan_bytes(report: &WanMigrationReport) -> (u64, &'static str) {
    match report.link_bytes() {
        Some(b) => (b, "link"),
        None => (report.ram.transferred, "QEMU transferred"),
    }
}

/// WAN bytes and QEMU's total time (ms) of the direct run, the baseline of the ratios.
pub fn baseline(report: &WanMigrationReport) -> (u64, u64) {
    (wan_bytes(report).0, report.total_time_ms.unwrap_or(0))
}

/// The table cells every migration benchmark prints for a run.
pub struct SharedCells {
    /// WAN bytes (MB).
    pub wan: String,
    /// Where the WAN bytes came from.
    pub source: &'static str,
    /// The gateways' flow counters at site A, wan_out + wan_in (MB), or `-` without gateways.
    pub flows: String,
    /// QEMU's `transferred` (MB).
    pub transferred: String,
    /// WAN bytes relative to the baseline.
    pub ratio: String,
    /// QEMU total time relative to the baseline.
    pub time_ratio: String,
}

impl SharedCells {
    /// The cells of `r`, with ratios to `base` (from [`baseline`]) where it has both numbers.
    pub fn of(r: &WanMigrationReport, base: Option<(u64, u64)>) -> Self {
        let (bytes, source) = wan_bytes(r);
        let flows = if r.flows_a.is_empty() { "-".to_string() } else { mb(r.wan_out_a() + r.wan_in_a()) };
        let (ratio, time_ratio) = match base {
            Some((bb, bt)) if bb > 0 && bt > 0 => (
                format!("{:.2}", bytes as f64 / bb as f64),
                format!("{:.2}", r.total_time_ms.unwrap_or(0) as f64 / bt as f64),
            ),
            _ => ("-".into(), "-".into()),
        };
        Self { wan: mb(bytes), source, flows, transferred: mb(r.ram.transferred), ratio, time_ratio }
    }
}

/// The runs every migration benchmark makes on `wan` and compares: (a) QEMU alone, multifd with
/// zstd, straight across the WAN; then (b) and (c), two guests one after the other through one
/// gateway pair with `link`, multifd without compression. `migrate(tag, name, route, mode)`
/// makes one run; a pair that does not start is an error row.
pub fn direct_then_gateways<R>(
    wan: &Wan,
    channels: u8,
    link: PairLink,
    mut migrate: impl FnMut(&str, String, WanRoute<'_>, MigrationMode) -> Result<R, String>,
) -> Vec<Result<R, String>> {
    let b = wan.site_b().addr();
    let mut runs = Vec::new();
    let direct_mode = MigrationMode::Multifd { channels, compression: MultifdCompression::Zstd };
    let direct = WanRoute::Direct { listen: SocketAddr::from((b, 5555)) };
    runs.push(migrate("direct", format!("(a) QEMU direct, multifd {channels} + zstd"), direct, direct_mode));

    let connect = SocketAddr::from((b, 4444));
    match GatewayPair::start(wan, link, connect) {
        Ok(pair) => {
            let mode = MigrationMode::multifd(channels);
            for (tag, name) in [
                ("gw-1", "(b) gateways, multifd {c}, first guest"),
                ("gw-2", "(c) gateways, multifd {c}, second guest, same image"),
            ] {
                let route = WanRoute::Gateways { pair: &pair, connect };
                runs.push(migrate(tag, name.replace("{c}", &channels.to_string()), route, mode.clone()));
            }
            drop(pair);
        }
        Err(e) => runs.push(Err(format!("gateways: {e}"))),
    }
    runs
}
