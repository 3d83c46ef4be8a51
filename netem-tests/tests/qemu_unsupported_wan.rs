//! Migration streams the page codec does not follow still cross the gateways
//! intact: the codec switches those connections to opaque pass-through and says
//! why (`CodecStats::opaque_reason` in gateway A's `FlowRecord::codec`).
//!
//! * multifd (2 channels) with QEMU-side `multifd-compression=zstd`: the multifd
//!   flows go opaque ("compression"), the main channel is still followed;
//! * the main channel with the `xbzrle` capability and a dirtying guest: once
//!   QEMU sends XBZRLE-encoded pages (from its third pass over RAM on), the main
//!   flow goes opaque ("XBZRLE").
//!
//! Both over an emulated 50 ms / 1 Gbit/s link, through a real gateway pair.
//! Skip (pass with a message) unless run as root with `qemu-system-x86_64`
//! installed; they take a process-wide lock so they run one at a time.

mod qemu_support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_codec::StreamMode;
use ferry_gateway::tunnel::FlowRecord;
use qemu_support::{check_migration, hold_switchover, Setup};
use ferry_netem::qemu::{
    migrate_over_wan_with, GuestConfig, Qemu, QemuConfig, WanMigrationOptions,
    WanMigrationReport, WanRoute,
};
use ferry_qmp::migration::MigrationMode;
use ferry_qmp::{
    CapabilityState, MigrationCapability, MigrationInfo, MigrationParameters, MultifdCompression,
    RunState,
};
use ferry_testkit::sync::lock;
use serde_json::Value;

const MIGRATE: Duration = Duration::from_secs(120);
/// How long the xbzrle test holds the migration in its iterative phase
/// waiting for QEMU to send XBZRLE pages before letting it complete anyway.
const XBZRLE_HOLD: Duration = Duration::from_secs(30);

static SERIAL: Mutex<()> = Mutex::new(());

fn setup(test: &str) -> Option<Setup> {
    qemu_support::setup(test, Duration::from_millis(50), 0.0)
}

/// A running source in site A and a waiting destination in site B (64 MiB
/// each); `with_extra_qmp` gives the source a second QMP monitor.
fn start_vms(
    s: &Setup,
    guest: &GuestConfig,
    with_extra_qmp: Option<&std::path::Path>,
) -> (Qemu, Qemu) {
    let config = |name: &str| {
        QemuConfig {
            memory_mib: 64,
            guest: guest.clone(),
            ..QemuConfig::default()
        }
        .named(name)
    };
    let mut src_cfg = config("src");
    src_cfg.extra_qmp_socket = with_extra_qmp.map(Into::into);
    qemu_support::start_vms(s, &src_cfg, config("dst"))
}

fn migrate(s: &Setup, src: &mut Qemu, dst: &mut Qemu, mode: &MigrationMode) -> WanMigrationReport {
    qemu_support::migrate(s, src, dst, mode, MIGRATE)
}

fn describe(f: &FlowRecord) -> String {
    match &f.codec {
        Some(c) => format!(
            "flow {}: {} B in, mode {:?}, reason {:?}, literal {}, zero {}, refs {}, verbatim {} B, wire {} B",
            f.flow,
            c.bytes_in,
            c.mode,
            c.opaque_reason,
            c.literal_pages,
            c.zero_pages,
            c.ref_pages(),
            c.verbatim_bytes,
            c.wire_bytes_out
        ),
        None => format!("flow {}: {} B in, no codec stats", f.flow, f.tcp_in),
    }
}

#[test]
fn multifd_zstd_goes_opaque_through_gateways() {
    let test = "multifd_zstd_goes_opaque_through_gateways";
    let _lock = lock(&SERIAL);
    let t0 = Instant::now();
    let Some(s) = setup(test) else { return };
    let guest = GuestConfig {
        verify_every_ticks: 0,
        ..GuestConfig::default()
    };
    let (mut src, mut dst) = start_vms(&s, &guest, None);
    let mode = MigrationMode::Multifd {
        channels: 2,
        compression: MultifdCompression::Zstd,
    };
    let r = migrate(&s, &mut src, &mut dst, &mode);
    assert_eq!(
        src.qmp().query_status().expect("src status").status,
        RunState::PostMigrate
    );
    check_migration(&mut dst, &mode, &r, 5);
    assert!(
        r.ram.multifd_bytes.unwrap_or(0) > 0,
        "nothing went over multifd: {:?}",
        r.ram
    );
    for f in &r.flows_a {
        eprintln!("{test}: {}", describe(f));
    }

    // The two multifd channels went opaque because of QEMU's compression; the
    // main channel (the first connection) was followed as a QEMU stream.
    let mut flows: Vec<&FlowRecord> = r.flows_a.iter().collect();
    flows.sort_by_key(|f| f.flow);
    let stats: Vec<_> = flows
        .iter()
        .map(|f| {
            f.codec
                .as_ref()
                .unwrap_or_else(|| panic!("no codec stats for {}", describe(f)))
        })
        .collect();
    let main = stats[0];
    assert!(
        matches!(main.mode, StreamMode::Main | StreamMode::MainTail)
            && main.opaque_reason.is_none(),
        "main channel should have been followed: {}",
        describe(flows[0])
    );
    for (f, c) in flows.iter().zip(&stats).skip(1) {
        assert_eq!(c.mode, StreamMode::Opaque, "{}", describe(f));
        let reason = c.opaque_reason.as_deref().unwrap_or("");
        assert!(
            reason.contains("compression"),
            "multifd flow went opaque for another reason: {}",
            describe(f)
        );
        assert!(
            c.literal_pages == 0 && c.ref_pages() == 0 && c.zero_pages == 0,
            "an opaque multifd flow had page operations: {}",
            describe(f)
        );
        assert!(c.bytes_in > 0 && c.bytes_in == f.tcp_in, "{}", describe(f));
    }
    eprintln!(
        "{test}: {}; test {:.1} s",
        r.summary(),
        t0.elapsed().as_secs_f64()
    );
}

/// QEMU's `xbzrle-cache` statistics from a `query-migrate` reply.
#[derive(Debug, Clone, Copy, Default)]
struct XbzrleStats {
    /// Cache hits: pages XBZRLE-encoded, overflowed or skipped as unchanged.
    pages: u64,
    /// Hits whose encoding did not fit (sent as normal pages).
    overflow: u64,
    /// Encoded bytes: XBZRLE records' bytes plus 4096 per overflow.
    bytes: u64,
    cache_miss: u64,
}

impl XbzrleStats {
    fn from_reply(info: &MigrationInfo) -> Option<XbzrleStats> {
        let x = info.extra.get("xbzrle-cache")?;
        let u = |k: &str| x.get(k).and_then(Value::as_u64).unwrap_or(0);
        Some(XbzrleStats {
            pages: u("pages"),
            overflow: u("overflow"),
            bytes: u("bytes"),
            cache_miss: u("cache-miss"),
        })
    }

    /// Bytes of real XBZRLE records sent (QEMU adds 4096 to `bytes` per
    /// overflow; each XBZRLE record adds its size): > 0 iff at least one
    /// `RAM_SAVE_FLAG_XBZRLE` record went on the wire.
    fn xbzrle_record_bytes(&self) -> u64 {
        self.bytes.saturating_sub(self.overflow * 4096)
    }
}

#[test]
fn xbzrle_main_channel_goes_opaque_through_gateways() {
    let test = "xbzrle_main_channel_goes_opaque_through_gateways";
    let _lock = lock(&SERIAL);
    let t0 = Instant::now();
    let Some(s) = setup(test) else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    // 10 ms ticks, 24 random pages rewritten each (~9.6 MB/s): every pass
    // over RAM finds dirty pages. Rewritten random pages overflow XBZRLE, but
    // the seed table, the guest's variables and its stack change by a few
    // bytes: those become XBZRLE records once cached (third pass on).
    // `retouch` is what lets QEMU 7.2's TCG see those pages written again
    // after the second dirty sync at all (see `GuestConfig::retouch`); it
    // also keeps the destination's memory exact over this many passes.
    let guest = GuestConfig {
        tick_jiffies: 1,
        dirty_pages_per_tick: 24,
        verify_every_ticks: 0,
        retouch: true,
        ..GuestConfig::default()
    };
    let (mut src, mut dst) = start_vms(&s, &guest, Some(&dir.path().join("src-extra.qmp")));
    for vm in [&mut src, &mut dst] {
        vm.qmp()
            .migrate_set_capabilities(&[CapabilityState::new(MigrationCapability::Xbzrle, true)])
            .expect("xbzrle capability");
        vm.qmp()
            .migrate_set_parameters(&MigrationParameters {
                xbzrle_cache_size: Some(16 << 20),
                ..MigrationParameters::default()
            })
            .expect("xbzrle-cache-size");
    }
    src.qmp()
        .migrate_set_parameters(&MigrationParameters {
            downtime_limit: Some(1),
            ..MigrationParameters::default()
        })
        .expect("downtime-limit");
    let watcher_qmp = src
        .connect_extra_qmp(Duration::from_secs(20))
        .expect("second QMP monitor");
    let stop = Arc::new(AtomicBool::new(false));
    // Kept iterating until QEMU reports XBZRLE records sent, or XBZRLE_HOLD.
    let watcher = hold_switchover(watcher_qmp, Arc::clone(&stop), XBZRLE_HOLD, |info| {
        XbzrleStats::from_reply(info).is_some_and(|x| x.xbzrle_record_bytes() > 0)
    });

    // QEMU completes as soon as what is left fits in `downtime-limit` at the
    // bandwidth it measured, and always when a dirty sync finds nothing left
    // (pending 0 fits any limit, 0 ms included). The guest dirties in bursts,
    // once per 10 ms tick, so a pass shorter than that can end in a sync that
    // falls between two bursts. That is what happened at 24 MiB/s on QEMU 10.0
    // (traced with `-trace migrate_pending_*`): the rate limiter grants a
    // 100 ms budget (2.5 MB) at once, XBZRLE sends unchanged pages as nothing,
    // so the third pass (235 pages) left in 1.4 ms, and the sync 3 ms later
    // found no page dirty: completed after 4 syncs, before any XBZRLE record.
    // So the source's `max-bandwidth` (4 MiB/s) is below the guest's dirty
    // rate (~9.6 MB/s of rewritten random pages, which XBZRLE cannot shrink):
    // every pass then takes longer than a tick and the next always finds
    // pages to send, whatever the QEMU version. The migration keeps
    // iterating, caching pages for XBZRLE and then encoding them, until the
    // watcher lets it finish.
    let mode = MigrationMode::Main;
    let result = migrate_over_wan_with(
        &mut src,
        &mut dst,
        &s.wan,
        WanRoute::Gateways {
            pair: &s.pair,
            connect: s.connect,
        },
        &mode,
        MIGRATE,
        &WanMigrationOptions {
            max_bandwidth: 4 << 20,
        },
    );
    stop.store(true, Ordering::Relaxed);
    let hold = watcher.join().expect("watcher thread");
    let r = result.expect("migration through the gateways");
    let hold = hold.expect("watching the migration");
    eprintln!(
        "{test}: watcher released after {:.1} s at {} dirty syncs (saw XBZRLE records: {}), stats then {:?}",
        hold.held.as_secs_f64(),
        hold.dirty_syncs,
        hold.by_condition,
        XbzrleStats::from_reply(&hold.released_at)
    );
    assert_eq!(
        src.qmp().query_status().expect("src status").status,
        RunState::PostMigrate
    );
    check_migration(&mut dst, &mode, &r, 20);

    // QEMU itself says XBZRLE pages were sent, so the fallback was exercised.
    let x = XbzrleStats::from_reply(&r.info)
        .unwrap_or_else(|| panic!("no xbzrle-cache in query-migrate: {:?}", r.info));
    eprintln!(
        "{test}: QEMU xbzrle: {} hits, {} overflow, {} cache misses, {} B ({} B of XBZRLE records); {} dirty syncs",
        x.pages,
        x.overflow,
        x.cache_miss,
        x.bytes,
        x.xbzrle_record_bytes(),
        r.ram.dirty_sync_count
    );
    assert!(
        hold.by_condition && x.xbzrle_record_bytes() > 0,
        "QEMU sent no XBZRLE records within {XBZRLE_HOLD:?} (stats {x:?}, {} dirty syncs): the fallback was not exercised",
        r.ram.dirty_sync_count
    );

    // The gateway followed the main channel (pages as page operations) until
    // the first XBZRLE record, then passed the rest through opaquely.
    let [f] = r.flows_a.as_slice() else {
        panic!("expected one flow at A: {:#?}", r.flows_a);
    };
    eprintln!("{test}: {}", describe(f));
    let c = f
        .codec
        .as_ref()
        .unwrap_or_else(|| panic!("no codec stats: {}", describe(f)));
    assert_eq!(c.mode, StreamMode::Opaque, "{}", describe(f));
    assert!(
        c.opaque_reason.as_deref().unwrap_or("").contains("XBZRLE"),
        "main flow went opaque for another reason: {}",
        describe(f)
    );
    assert!(
        c.literal_pages > 0,
        "the codec should have followed the first pass: {}",
        describe(f)
    );
    eprintln!(
        "{test}: {}; test {:.1} s",
        r.summary(),
        t0.elapsed().as_secs_f64()
    );
}
