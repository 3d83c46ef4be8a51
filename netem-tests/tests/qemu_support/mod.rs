//! Shared by the QEMU-through-the-gateways tests: two emulated sites with a gateway pair, the
//! test guest image, a source/destination VM pair, one migration along the pair, and the checks
//! every migration must pass.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_netem::gateway_pair::{GatewayPair, PairLink};
use ferry_netem::qemu::{self, migrate_over_wan, GuestImage, Qemu, QemuConfig, VerifyReport, WanMigrationReport, WanRoute};
use ferry_qmp::migration::MigrationMode;
use ferry_qmp::{BlockingQmp, MigrationInfo, MigrationParameters, MigrationStatus, RunState, UNLIMITED_BANDWIDTH};
use ferry_netem::Wan;
use ferry_testkit::tracing::init_tracing;

/// Longest wait for a guest to boot or answer.
pub const BOOT: Duration = Duration::from_secs(60);
/// Port the destination QEMU listens on in site B (the gateways' `connect`).
pub const MIGRATION_PORT: u16 = 4444;

/// Fields drop in declaration order: VMs (held by the tests) first, then the gateways, then
/// the WAN.
pub struct Setup {
    pub image: GuestImage,
    pub pair: GatewayPair,
    pub connect: SocketAddr,
    pub wan: Wan,
}

/// Sites `rtt` apart at 1 Gbit/s with random `loss`, gateways with the codec on. `None` (the
/// test is skipped, with a message) when not root or without QEMU.
pub fn setup(test: &str, rtt: Duration, loss: f64) -> Option<Setup> {
    setup_with(test, rtt, loss, "")
}

/// [`setup`] with more TOML in site B's gateway config (`GatewayPair::start_with`).
pub fn setup_with(test: &str, rtt: Duration, loss: f64, b_extra: &str) -> Option<Setup> {
    init_tracing();
    if let Some(why) = qemu::unavailable_reason() {
        eprintln!("SKIP {test}: {why}");
        return None;
    }
    let image = GuestImage::build().expect("building the test guest");
    let mut wan = Wan::builder().rtt(rtt).rate_bps(1_000_000_000);
    if loss > 0.0 {
        wan = wan.loss(loss);
    }
    let wan = wan.up().expect("WAN up");
    let connect = SocketAddr::from((wan.site_b().addr(), MIGRATION_PORT));
    let link = PairLink { bandwidth: "1gbit".into(), rtt: format!("{}ms", rtt.as_millis()), codec: true };
    let pair = GatewayPair::start_with(&wan, link, connect, b_extra).expect("gateways");
    Some(Setup { image, pair, connect, wan })
}

/// Starts `src` as the running source in site A and `dst`, made incoming (deferred), as the
/// waiting destination in site B; returns once the source ticks.
pub fn start_vms(s: &Setup, src: &QemuConfig, dst: QemuConfig) -> (Qemu, Qemu) {
    let src = Qemu::spawn(&s.image, src, Some(s.wan.site_a().netns())).expect("start source in site A");
    let dst = Qemu::spawn(&s.image, &dst.held_at_cutover(), Some(s.wan.site_b().netns())).expect("start destination in site B");
    src.serial().wait_for_tick(3, BOOT).expect("source ticks");
    (src, dst)
}

/// Migrates `src` (site A) into `dst` (site B) through the gateways.
pub fn migrate(s: &Setup, src: &mut Qemu, dst: &mut Qemu, mode: &MigrationMode, timeout: Duration) -> WanMigrationReport {
    migrate_over_wan(src, dst, &s.wan, WanRoute::Gateways { pair: &s.pair, connect: s.connect }, mode, timeout)
        .expect("migration through the gateways")
}

/// The checks every migration must pass: completed, the destination running and continuing
/// the guest's counter (within `max_tick_gap` ticks) and ticking on, its own memory
/// verification, no guest error, byte-identical flows.
pub fn check_migration(dst: &mut Qemu, mode: &MigrationMode, r: &WanMigrationReport, max_tick_gap: u64) {
    assert_eq!(r.info.status(), MigrationStatus::Completed);
    let st = dst.qmp().query_status().expect("dst status");
    assert!(st.running && st.status == RunState::Running, "{st:?}");
    let src_last = r.src_last_tick.expect("source ticked");
    assert!(
        r.dst_first_tick >= src_last && r.dst_first_tick <= src_last + max_tick_gap,
        "destination did not continue the source's counter: source at {src_last}, destination starts at {}",
        r.dst_first_tick
    );
    let more = dst.serial().wait_for_tick(r.dst_first_tick + 5, BOOT).expect("destination keeps ticking");
    assert!(more >= r.dst_first_tick + 5);
    match dst.request_verify(BOOT).expect("verify on the destination") {
        VerifyReport::Ok { .. } => {}
        bad => panic!("guest memory corrupted by the migration: {bad:?}"),
    }
    assert!(
        !dst.serial().lines().iter().any(|l| l.contains("FAIL") || l.contains("panic")),
        "destination guest reported an error:\n{}",
        dst.serial().tail(10)
    );
    if let Err(e) = r.check_flows(mode.connections()) {
        panic!("gateway flows: {e}\nA: {:#?}\nB: {:#?}", r.flows_a, r.flows_b);
    }
}

/// What a [`hold_switchover`] watcher saw.
#[derive(Debug)]
pub struct Hold {
    /// The source's last `query-migrate` while active, when the watcher let it complete.
    pub released_at: MigrationInfo,
    /// Dirty syncs by then.
    pub dirty_syncs: u64,
    /// Time from the watcher's start until the release.
    pub held: Duration,
    /// True if released because `release` said so, false because `max` passed.
    pub by_condition: bool,
}

/// Holds a migration's switchover for many passes, on the source's second QMP monitor (the
/// harness's own session is busy in the migration): while the migration is active, leaves it
/// iterating (the caller set the source's `downtime-limit` tiny and its `max-bandwidth` below
/// the guest's dirty rate, so that no pass ends with nothing left, which completes whatever the
/// limit) until `release` accepts a `query-migrate` or `max` passed, then raises
/// `downtime-limit` to 5 s and lifts `max-bandwidth` so that it completes. A migration that
/// ended before that is an error; so is `stop` set before the migration became active.
pub fn hold_switchover(
    qmp: BlockingQmp,
    stop: Arc<AtomicBool>,
    max: Duration,
    release: impl Fn(&MigrationInfo) -> bool + Send + 'static,
) -> JoinHandle<Result<Hold, String>> {
    std::thread::spawn(move || {
        let started = Instant::now();
        let mut last: Option<MigrationInfo> = None;
        loop {
            if stop.load(Ordering::Relaxed) && last.is_none() {
                return Err("stopped before the migration started".into());
            }
            let info = qmp.query_migrate().map_err(|e| format!("query-migrate: {e}"))?;
            let status = info.status();
            if status.is_terminal() {
                let syncs = last.as_ref().and_then(|i| i.ram.as_ref()).map_or(0, |r| r.dirty_sync_count);
                return Err(format!("migration {status} before the watcher released it (after {syncs} dirty syncs)"));
            }
            if status == MigrationStatus::Active {
                let by_condition = release(&info);
                if by_condition || started.elapsed() >= max {
                    qmp.migrate_set_parameters(&MigrationParameters {
                        downtime_limit: Some(5000),
                        max_bandwidth: Some(UNLIMITED_BANDWIDTH),
                        ..MigrationParameters::default()
                    })
                    .map_err(|e| format!("releasing the migration: {e}"))?;
                    return Ok(Hold {
                        dirty_syncs: info.ram.as_ref().map_or(0, |r| r.dirty_sync_count),
                        released_at: info,
                        held: started.elapsed(),
                        by_condition,
                    });
                }
                last = Some(info);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })
}
