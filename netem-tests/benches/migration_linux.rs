//! Live-migration cost across an emulated WAN with a realistic guest: Debian's Linux kernel and a
//! busybox initramfs (`ferry_netem::qemu::LinuxGuest`), QEMU alone vs. through the Ferry gateways.
//!
//! The guest (256 MiB VM under TCG) builds a memory mix at boot: copies of the same binaries
//! (duplicate pages), generated numbers and access logs (compressible, identical in every guest of
//! the image), /dev/urandom data (incompressible, different per boot), and keeps rewriting part of
//! a file while printing `tick N` on COM1. On the link of `migration_wan` (default 150 ms RTT,
//! 1 Gbit/s, no loss) it migrates:
//!   (a) directly between the sites, multifd + zstd,
//!   (b) through the gateway pair, multifd with compression none (first guest),
//!   (c) a second guest of the same image (a fresh boot) through the same gateways.
//! WAN bytes are the IP bytes the emulated link delivered in both directions during the migration
//! (userspace backend's counters; with the netem backend QEMU's `transferred` instead). After each
//! migration the destination must print 10 more ticks, and is asked to re-check the md5 sums of
//! the files the guest generated before the migration (`files` column).
//!
//! Every migration checks the destination's RAM against the source's at cutover, before the
//! destination runs (`ferry_netem::qemu::ram_check`); a difference fails the run. QEMU 7.2 under
//! TCG may not re-send pages written repeatedly after the second dirty sync (see
//! `netem-tests/guest/README.md`, "retouch"; a Linux guest cannot work around it), which that
//! check reports; the tested QEMU is 10.0 (`scripts/test.sh`), which does not have the defect.
//!
//! Run (root): `cargo bench -p ferry-netem --bench migration_linux`
//! Environment: FERRY_BENCH_RTT_MS (150), FERRY_BENCH_RATE (Mbit/s, 1000), FERRY_BENCH_LOSS
//! (percent, 0), FERRY_BENCH_CHANNELS (multifd channels, 4), FERRY_LINUX_MEM_MIB (256),
//! FERRY_LINUX_COPIES (2), FERRY_LINUX_TEXT_MIB (32), FERRY_LINUX_RAND_MIB (16),
//! FERRY_LINUX_DIRTY_KIB (KiB rewritten per 100 ms tick, 256), FERRY_LINUX_CMDLINE (extra kernel
//! parameters, e.g. `nokaslr`), FERRY_BENCH_VERIFY (1: md5-check the files on the destination).

mod support;

use std::time::Duration;

use ferry_netem::qemu::{
    migrate_over_wan, LinuxGuest, LinuxGuestConfig, PageCensus, Qemu, QemuError,
    VerifyReport, WanMigrationReport, WanRoute,
};
use ferry_qmp::migration::MigrationMode;
use ferry_netem::Wan;
use ferry_testkit::bench::env_f64;
use ferry_testkit::tracing::init_tracing_stderr;

use support::{baseline, can_run_qemu_bench, direct_then_gateways, gateway_link, wan_or_exit, SharedCells};

const BOOT: Duration = Duration::from_secs(600);
const MIGRATE: Duration = Duration::from_secs(300);
const ALIVE: Duration = Duration::from_secs(60);

struct Run {
    name: String,
    report: WanMigrationReport,
    /// Ticks the destination printed: first .. the 10th after it.
    dst_ticks: (u64, u64),
    /// Result of the file check on the destination.
    files: String,
    /// The guest's description of its memory mix.
    mix: Vec<String>,
    /// The destination's RAM by page content, after the checks.
    census: Option<PageCensus>,
}

fn migrate_one(
    wan: &Wan,
    guest: &LinuxGuest,
    (tag, name): (&str, String),
    route: WanRoute<'_>,
    mode: MigrationMode,
    verify: bool,
) -> Result<Run, String> {
    let mut src = Qemu::spawn(
        guest.image(),
        &guest.qemu_config(&format!("src-{tag}")),
        Some(wan.site_a().netns()),
    )
    .map_err(|e| format!("source: {e}"))?;
    let mut dst = Qemu::spawn(
        guest.image(),
        &guest.qemu_config(&format!("dst-{tag}")).held_at_cutover(),
        Some(wan.site_b().netns()),
    )
    .map_err(|e| format!("destination: {e}"))?;
    let mix = LinuxGuest::wait_ready(&src, BOOT)
        .map_err(|e| format!("source boot: {e}; serial: {}", src.serial().tail(20)))?;
    // Let the workload run for about a second.
    src.serial()
        .wait_for_tick(10, BOOT)
        .map_err(|e| format!("source ticks: {e}"))?;
    let report = migrate_over_wan(&mut src, &mut dst, wan, route, &mode, MIGRATE)
        .map_err(|e| format!("migration: {e}"))?;
    drop(src);
    let first = report.dst_first_tick;
    let alive = dst
        .serial()
        .wait_for_tick(first + 10, ALIVE)
        .map_err(|e| format!("destination stopped ticking: {e}"))?;
    let files = if verify {
        match dst.request_verify(BOOT) {
            Ok(VerifyReport::Ok { .. }) => "ok".to_string(),
            Ok(VerifyReport::Fail { line }) => line,
            Err(e) => format!("no answer: {e}"),
        }
    } else {
        "-".to_string()
    };
    if let WanRoute::Gateways { .. } = route {
        report.check_flows(mode.connections())?;
    }
    let census = match PageCensus::of_vm(&mut dst) {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("{tag}: no page census: {e}");
            None
        }
    };
    eprintln!(
        "{tag}: {}; destination ticks {first}..{alive}; files {files}",
        report.summary()
    );
    Ok(Run {
        name,
        report,
        dst_ticks: (first, alive),
        files,
        mix,
        census,
    })
}

fn main() {
    init_tracing_stderr();
    if !can_run_qemu_bench("migration_linux") {
        return;
    }
    let rtt_ms = env_f64("FERRY_BENCH_RTT_MS", 150.0);
    let rate_mbit = env_f64("FERRY_BENCH_RATE", 1000.0);
    let loss_pct = env_f64("FERRY_BENCH_LOSS", 0.0);
    let channels = env_f64("FERRY_BENCH_CHANNELS", 4.0) as u8;
    let verify = env_f64("FERRY_BENCH_VERIFY", 1.0) != 0.0;
    let d = LinuxGuestConfig::default();
    let config = LinuxGuestConfig {
        memory_mib: env_f64("FERRY_LINUX_MEM_MIB", d.memory_mib.into()) as u32,
        copies: env_f64("FERRY_LINUX_COPIES", d.copies.into()) as u32,
        text_mib: env_f64("FERRY_LINUX_TEXT_MIB", d.text_mib.into()) as u32,
        rand_mib: env_f64("FERRY_LINUX_RAND_MIB", d.rand_mib.into()) as u32,
        dirty_kib_per_tick: env_f64("FERRY_LINUX_DIRTY_KIB", d.dirty_kib_per_tick.into()) as u32,
        extra_cmdline: std::env::var("FERRY_LINUX_CMDLINE").unwrap_or_default(),
        ..d
    };
    let guest = match LinuxGuest::build(&config) {
        Ok(g) => g,
        Err(e @ QemuError::ToolMissing { .. }) => {
            println!("skipping migration_linux: {e}");
            return;
        }
        Err(e) => {
            eprintln!("cannot build the Linux guest: {e}");
            std::process::exit(1);
        }
    };
    eprintln!(
        "Linux guest: kernel {} ({}), initramfs {:.1} MB, cmdline `{}`",
        guest.files().kernel_release,
        guest.files().source,
        guest.initramfs_bytes() as f64 / 1e6,
        config.cmdline()
    );
    let wan = wan_or_exit(rtt_ms, rate_mbit, loss_pct);
    let runs = direct_then_gateways(&wan, channels, gateway_link(rate_mbit, rtt_ms, true), |tag, name, route, mode| {
        migrate_one(&wan, &guest, (tag, name), route, mode, verify)
    });

    let base = runs.first().and_then(|r| r.as_ref().ok()).map(|r| baseline(&r.report));
    println!();
    println!(
        "Live migration of a Linux guest across an emulated WAN: {rtt_ms} ms RTT, {rate_mbit} Mbit/s, {loss_pct} % loss, backend {:?}; kernel {}, {} MiB VM, cmdline `{}`",
        wan.backend(),
        guest.files().kernel_release,
        config.memory_mib,
        config.cmdline()
    );
    if let Some(run) = runs.iter().flatten().next() {
        println!();
        println!("Guest memory mix (first guest, `du -sk` in KiB and `free -k`):");
        for l in &run.mix {
            println!("    {l}");
        }
    }
    println!();
    println!("| setup | WAN bytes (MB) | source | gateway flows wan_out+wan_in (MB) | QEMU transferred (MB) | QEMU normal pages | QEMU zero pages | dirty syncs | QEMU total time (ms) | downtime (ms) | wall (s) | ticks src → dst (+10) | files on dst | WAN bytes / direct | time / direct |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for run in &runs {
        match run {
            Ok(run) => {
                let r = &run.report;
                let SharedCells { wan, source, flows, transferred, ratio, time_ratio } = SharedCells::of(r, base);
                println!(
                    "| {} | {} | {source} | {flows} | {} | {} | {} | {} | {} | {} | {:.1} | {} → {}..{} | {} | {ratio} | {time_ratio} |",
                    run.name,
                    wan,
                    transferred,
                    r.ram.normal,
                    r.ram.duplicate,
                    r.ram.dirty_sync_count,
                    r.total_time_ms.map_or("-".into(), |t| t.to_string()),
                    r.downtime_ms.map_or("-".into(), |t| t.to_string()),
                    r.wall_time.as_secs_f64(),
                    r.src_last_tick.map_or("-".into(), |t| t.to_string()),
                    run.dst_ticks.0,
                    run.dst_ticks.1,
                    run.files,
                );
            }
            Err(e) => println!("| error: {e} | | | | | | | | | | | | | | |"),
        }
    }
    println!();
    println!("Source gateway's page codec (sum over the migration's flows), pages:");
    println!();
    println!("| setup | literal (zstd batches) | refs to the flow's own window | refs to the destination's cache | zero |");
    println!("|---|---|---|---|---|");
    for run in runs.iter().flatten() {
        if let Some((lit, win, adv, zero)) = codec_pages(&run.report) {
            println!("| {} | {lit} | {win} | {adv} | {zero} |", run.name);
        }
    }
    census_table(&runs);
    if runs.iter().any(Result::is_err) {
        std::process::exit(1);
    }
}

/// The source gateway's codec counters over a run's flows: literal pages, references to the
/// flow's own window, references to the destination's advertised cache, zero pages.
fn codec_pages(r: &WanMigrationReport) -> Option<(u64, u64, u64, u64)> {
    let stats: Vec<_> = r.flows_a.iter().filter_map(|f| f.codec.as_ref()).collect();
    (!stats.is_empty()).then(|| {
        stats.iter().fold((0, 0, 0, 0), |acc, c| {
            (
                acc.0 + c.literal_pages,
                acc.1 + c.window_refs,
                acc.2 + c.advertised_refs,
                acc.3 + c.zero_pages,
            )
        })
    })
}

/// What the destinations' RAM held after the migrations, by 4 KiB page content.
fn census_table(runs: &[Result<Run, String>]) {
    let first_gw = runs
        .iter()
        .flatten()
        .find(|r| !r.report.flows_a.is_empty())
        .and_then(|r| r.census.as_ref());
    println!();
    println!(
        "Destination RAM after each migration, 4 KiB pages by content (QMP dump-guest-memory):"
    );
    println!();
    println!("| setup | pages | zero | non-zero | distinct non-zero | non-zero duplicates within the guest | non-zero pages also in guest (b) |");
    println!("|---|---|---|---|---|---|---|");
    for run in runs.iter().flatten() {
        let Some(c) = &run.census else { continue };
        let shared = match first_gw {
            Some(b) if !std::ptr::eq(b, c) => {
                format!(
                    "{} ({:.0} %)",
                    c.shared_with(b),
                    100.0 * c.shared_with(b) as f64 / c.nonzero().max(1) as f64
                )
            }
            _ => "-".into(),
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {shared} |",
            run.name,
            c.pages,
            c.zero,
            c.nonzero(),
            c.distinct(),
            c.duplicates()
        );
    }
}
