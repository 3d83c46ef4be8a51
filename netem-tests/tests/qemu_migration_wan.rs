//! Live migration of a real QEMU guest (TCG) between two emulated sites
//! (150 ms RTT, 1 Gbit/s, 0.1 % loss) through the Ferry gateway pair.
//!
//! Skips (passes with a message) unless run as root with
//! `qemu-system-x86_64` installed. The tests take a process-wide lock so they
//! run one at a time: TCG guests, the WAN emulator and two gateways already
//! share the machine's cores.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ferry_netem::gateway_pair::{GatewayPair, PairLink};
use ferry_netem::qemu::{
    self, migrate_over_wan, GuestConfig, GuestImage, MigrationMode, Qemu, QemuConfig, VerifyReport,
    WanMigrationReport, WanRoute,
};
use ferry_netem::Wan;

const BOOT: Duration = Duration::from_secs(60);
const MIGRATE: Duration = Duration::from_secs(180);
/// Port the destination QEMU listens on in site B (the gateways' `connect`).
const MIGRATION_PORT: u16 = 4444;

static SERIAL: Mutex<()> = Mutex::new(());

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Everything one test needs. Fields drop in declaration order: the VMs are
/// killed before the gateways stop, and the gateways before the WAN goes.
struct Setup {
    image: GuestImage,
    pair: GatewayPair,
    connect: SocketAddr,
    wan: Wan,
}

/// `None` (test skipped, with a message) when not root or without QEMU.
fn setup(test: &str) -> Option<Setup> {
    init_tracing();
    if !ferry_netem::netns::is_root() {
        eprintln!("SKIP {test}: needs root (network namespaces)");
        return None;
    }
    if !qemu::qemu_available() {
        eprintln!(
            "SKIP {test}: qemu-system-x86_64 not installed (apt-get install qemu-system-x86)"
        );
        return None;
    }
    let image = GuestImage::build().expect("building the test guest");
    let wan = Wan::builder()
        .rtt(Duration::from_millis(150))
        .rate_bps(1_000_000_000)
        .loss(0.001)
        .up()
        .expect("WAN up");
    let connect = SocketAddr::from((wan.site_b().addr(), MIGRATION_PORT));
    let pair = GatewayPair::start(
        &wan,
        PairLink {
            bandwidth: "1gbit".into(),
            rtt: "150ms".into(),
            codec: true,
        },
        connect,
    )
    .expect("gateways");
    Some(Setup {
        image,
        pair,
        connect,
        wan,
    })
}

/// 128 MiB VM; the guest keeps dirtying 200 pages (800 KiB) every ~100 ms.
fn guest() -> GuestConfig {
    GuestConfig {
        dirty_pages_per_tick: 200,
        verify_every_ticks: 0,
        ..GuestConfig::default()
    }
}

fn vm_config(name: &str, guest: &GuestConfig) -> QemuConfig {
    QemuConfig {
        memory_mib: 128,
        guest: guest.clone(),
        ..QemuConfig::default()
    }
    .named(name)
}

/// A running source in site A and a waiting destination in site B.
fn start_vms(s: &Setup, tag: &str, guest: &GuestConfig) -> (Qemu, Qemu) {
    let src = Qemu::spawn(
        &s.image,
        &vm_config(&format!("src-{tag}"), guest),
        Some(s.wan.site_a().netns()),
    )
    .expect("start source in site A");
    let dst = Qemu::spawn(
        &s.image,
        &vm_config(&format!("dst-{tag}"), guest).incoming_defer(),
        Some(s.wan.site_b().netns()),
    )
    .expect("start destination in site B");
    src.serial().wait_for_tick(3, BOOT).expect("source ticks");
    (src, dst)
}

fn migrate(s: &Setup, src: &mut Qemu, dst: &mut Qemu, mode: &MigrationMode) -> WanMigrationReport {
    migrate_over_wan(
        src,
        dst,
        &s.wan,
        WanRoute::Gateways {
            pair: &s.pair,
            connect: s.connect,
        },
        mode,
        MIGRATE,
    )
    .expect("migration through the gateways")
}

/// The checks every migration must pass: states, the guest's counter
/// continuing, its own memory verification, byte-identical flows.
fn check_migration(src: &mut Qemu, dst: &mut Qemu, mode: &MigrationMode, r: &WanMigrationReport) {
    assert_eq!(r.info.status, "completed");
    assert_eq!(
        src.qmp().query_status().expect("src status").status,
        "postmigrate"
    );
    let st = dst.qmp().query_status().expect("dst status");
    assert!(st.running && st.status == "running", "{st:?}");
    let src_last = r.src_last_tick.expect("source ticked");
    assert!(
        r.dst_first_tick >= src_last && r.dst_first_tick <= src_last + 5,
        "destination did not continue the source's counter: source at {src_last}, destination starts at {}",
        r.dst_first_tick
    );
    if let MigrationMode::Multifd { .. } = mode {
        assert!(
            r.ram.multifd_bytes > 0,
            "no bytes went over multifd: {:?}",
            r.ram
        );
    }
    match dst.request_verify(BOOT).expect("verify on the destination") {
        VerifyReport::Ok { .. } => {}
        bad => panic!("guest memory corrupted by the migration: {bad:?}"),
    }
    assert!(
        !dst.serial()
            .lines()
            .iter()
            .any(|l| l.contains("FAIL") || l.contains("panic")),
        "destination guest reported an error:\n{}",
        dst.serial().tail(10)
    );
    if let Err(e) = r.check_flows(mode.connections()) {
        panic!(
            "gateway flows: {e}\nA: {:#?}\nB: {:#?}",
            r.flows_a, r.flows_b
        );
    }
}

fn single_migration(test: &str, mode: MigrationMode) {
    let _lock = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let t0 = Instant::now();
    let Some(s) = setup(test) else { return };
    let (mut src, mut dst) = start_vms(&s, "1", &guest());
    let r = migrate(&s, &mut src, &mut dst, &mode);
    check_migration(&mut src, &mut dst, &mode, &r);
    eprintln!(
        "{test}: {}; test {:.1} s",
        r.summary(),
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn migrate_main_channel_through_gateways() {
    single_migration("migrate_main_channel_through_gateways", MigrationMode::Main);
}

#[test]
fn migrate_multifd_4_through_gateways() {
    single_migration(
        "migrate_multifd_4_through_gateways",
        MigrationMode::multifd(4),
    );
}

#[test]
fn second_guest_of_same_image_costs_less_than_half_on_the_wan() {
    let test = "second_guest_of_same_image_costs_less_than_half_on_the_wan";
    let _lock = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let t0 = Instant::now();
    let Some(s) = setup(test) else { return };
    let mode = MigrationMode::multifd(4);
    let guest = guest();
    let mut wan_bytes = Vec::new();
    for tag in ["1", "2"] {
        let (mut src, mut dst) = start_vms(&s, tag, &guest);
        let r = migrate(&s, &mut src, &mut dst, &mode);
        check_migration(&mut src, &mut dst, &mode, &r);
        eprintln!("{test}: guest {tag}: {}", r.summary());
        for f in &r.flows_a {
            if let Some(c) = &f.codec {
                eprintln!(
                    "{test}: guest {tag} flow {}: mode {:?}, {} B in, {} B wire, zero {}, window refs {}, advertised refs {}, literal {}",
                    f.flow, c.mode, c.bytes_in, c.wire_bytes_out, c.zero_pages, c.window_refs, c.advertised_refs, c.literal_pages
                );
            }
        }
        wan_bytes.push(r.wan_out_a());
    }
    let (first, second) = (wan_bytes[0], wan_bytes[1]);
    eprintln!(
        "{test}: WAN bytes A->B first {first}, second {second} ({:.2}x); test {:.1} s",
        second as f64 / first as f64,
        t0.elapsed().as_secs_f64()
    );
    assert!(
        (second as f64) < 0.5 * first as f64,
        "the second guest of the same image sent {second} bytes on the WAN, not < half of the first's {first}"
    );
}
