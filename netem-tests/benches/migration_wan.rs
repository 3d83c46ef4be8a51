//! Live-migration cost across an emulated WAN: QEMU alone vs. through the Ferry gateways.
//!
//! On one emulated link (default 150 ms RTT, 1 Gbit/s, no loss) it migrates the same test
//! guest (128 MiB VM, TCG, dirtying memory during the migration):
//!   (a) directly between the sites, multifd + zstd (QEMU's strongest WAN setup on its own),
//!   (b) through the gateway pair, multifd with compression none,
//!   (c) a second guest of the same image (same seed) through the same gateways.
//! WAN bytes are the IP bytes the emulated link delivered in both directions during the
//! migration (userspace backend's counters; with the netem backend, which has none, QEMU's
//! own `transferred` is used instead and the table says so). For the gateway runs the
//! gateways' own per-flow WAN counters (wan_out + wan_in at A) are shown too.
//!
//! Run (root): `cargo bench -p ferry-netem --bench migration_wan`
//! Environment: FERRY_BENCH_RTT_MS (150), FERRY_BENCH_RATE (Mbit/s, 1000), FERRY_BENCH_LOSS
//! (percent, 0), FERRY_BENCH_CHANNELS (multifd channels, 4), FERRY_BENCH_RAND_MIB (MiB of
//! random guest pages, 32), FERRY_BENCH_DIRTY (pages per guest tick, 200).

mod support;

use std::time::Duration;

use ferry_netem::qemu::{
    migrate_over_wan, GuestConfig, GuestImage, Qemu, QemuConfig, VerifyReport,
    WanMigrationReport, WanRoute,
};
use ferry_qmp::migration::MigrationMode;
use ferry_netem::Wan;
use ferry_testkit::bench::env_f64;
use ferry_testkit::tracing::init_tracing_stderr;

use support::{baseline, can_run_qemu_bench, direct_then_gateways, gateway_link, wan_or_exit, SharedCells};

const BOOT: Duration = Duration::from_secs(120);
const MIGRATE: Duration = Duration::from_secs(300);

struct Run {
    name: String,
    report: WanMigrationReport,
}

fn migrate_one(
    wan: &Wan,
    image: &GuestImage,
    guest: &GuestConfig,
    tag: &str,
    route: WanRoute<'_>,
    mode: MigrationMode,
) -> Result<WanMigrationReport, String> {
    let mib = (guest.min_ram_bytes() >> 20).max(128) as u32;
    let cfg = |name: String| {
        QemuConfig {
            memory_mib: mib,
            guest: guest.clone(),
            ..QemuConfig::default()
        }
        .named(&name)
    };
    let mut src = Qemu::spawn(
        image,
        &cfg(format!("src-{tag}")),
        Some(wan.site_a().netns()),
    )
    .map_err(|e| format!("source: {e}"))?;
    let mut dst = Qemu::spawn(
        image,
        &cfg(format!("dst-{tag}")).held_at_cutover(),
        Some(wan.site_b().netns()),
    )
    .map_err(|e| format!("destination: {e}"))?;
    // Let the guest fill its memory and run a little.
    src.serial()
        .wait_for_tick(5, BOOT)
        .map_err(|e| format!("source boot: {e}"))?;
    let report = migrate_over_wan(&mut src, &mut dst, wan, route, &mode, MIGRATE)
        .map_err(|e| format!("migration: {e}"))?;
    match dst
        .request_verify(BOOT)
        .map_err(|e| format!("verify: {e}"))?
    {
        VerifyReport::Ok { .. } => {}
        bad => return Err(format!("guest memory corrupted: {bad:?}")),
    }
    if let WanRoute::Gateways { .. } = route {
        report.check_flows(mode.connections())?;
    }
    eprintln!("{tag}: {}", report.summary());
    Ok(report)
}

fn main() {
    init_tracing_stderr();
    if !can_run_qemu_bench("migration_wan") {
        return;
    }
    let rtt_ms = env_f64("FERRY_BENCH_RTT_MS", 150.0);
    let rate_mbit = env_f64("FERRY_BENCH_RATE", 1000.0);
    let loss_pct = env_f64("FERRY_BENCH_LOSS", 0.0);
    let channels = env_f64("FERRY_BENCH_CHANNELS", 4.0) as u8;
    let guest = GuestConfig {
        dirty_pages_per_tick: env_f64("FERRY_BENCH_DIRTY", 200.0) as u32,
        verify_every_ticks: 0,
        rand_mib: env_f64("FERRY_BENCH_RAND_MIB", 32.0) as u32,
        ..GuestConfig::default()
    };
    let image = match GuestImage::build() {
        Ok(i) => i,
        Err(e) => {
            eprintln!("cannot build the test guest: {e}");
            std::process::exit(1);
        }
    };
    let wan = wan_or_exit(rtt_ms, rate_mbit, loss_pct);
    let runs = direct_then_gateways(&wan, channels, gateway_link(rate_mbit, rtt_ms, true), |tag, name, route, mode| {
        migrate_one(&wan, &image, &guest, tag, route, mode).map(|report| Run { name, report })
    });

    let base = runs.first().and_then(|r| r.as_ref().ok()).map(|r| baseline(&r.report));
    println!();
    println!(
        "Live migration across an emulated WAN: {rtt_ms} ms RTT, {rate_mbit} Mbit/s, {loss_pct} % loss, backend {:?}; guest {} MiB VM, {} MiB random + {} MiB duplicate pages, dirtying {} pages/tick",
        wan.backend(),
        (guest.min_ram_bytes() >> 20).max(128),
        guest.rand_mib,
        guest.dup_mib,
        guest.dirty_pages_per_tick
    );
    println!();
    println!("| setup | WAN bytes (MB) | source | gateway flows wan_out+wan_in (MB) | QEMU transferred (MB) | QEMU total time (ms) | downtime (ms) | wall (s) | WAN bytes / direct | time / direct |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for run in &runs {
        match run {
            Ok(run) => {
                let r = &run.report;
                let SharedCells { wan, source, flows, transferred, ratio, time_ratio } = SharedCells::of(r, base);
                println!(
                    "| {} | {} | {source} | {flows} | {} | {} | {} | {:.1} | {ratio} | {time_ratio} |",
                    run.name,
                    wan,
                    transferred,
                    r.total_time_ms.map_or("-".into(), |t| t.to_string()),
                    r.downtime_ms.map_or("-".into(), |t| t.to_string()),
                    r.wall_time.as_secs_f64(),
                );
            }
            Err(e) => println!("| error: {e} | | | | | | | | | |"),
        }
    }
    if runs.iter().any(Result::is_err) {
        std::process::exit(1);
    }
}
