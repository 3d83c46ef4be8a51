//! Live migration of a real QEMU guest (TCG) between two emulated sites
//! (150 ms RTT, 1 Gbit/s, 0.1 % loss) through the Ferry gateway pair.
//!
//! Skips (passes with a message) unless run as root with
//! `qemu-system-x86_64` installed. The tests take a process-wide lock so they
//! run one at a time: TCG guests, the WAN emulator and two gateways already
//! share the machine's cores.

mod qemu_support;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use qemu_support::Setup;
use ferry_netem::qemu::{GuestConfig, Qemu, QemuConfig, WanMigrationReport};
use ferry_qmp::migration::MigrationMode;
use ferry_qmp::RunState;
use ferry_testkit::sync::lock;

const MIGRATE: Duration = Duration::from_secs(180);

static SERIAL: Mutex<()> = Mutex::new(());

fn setup(test: &str) -> Option<Setup> {
    qemu_support::setup(test, Duration::from_millis(150), 0.001)
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
    qemu_support::start_vms(s, &vm_config(&format!("src-{tag}"), guest), vm_config(&format!("dst-{tag}"), guest))
}

fn migrate(s: &Setup, src: &mut Qemu, dst: &mut Qemu, mode: &MigrationMode) -> WanMigrationReport {
    qemu_support::migrate(s, src, dst, mode, MIGRATE)
}

/// The shared checks, plus: the source is left in `postmigrate` and multifd carried bytes.
fn check_migration(src: &mut Qemu, dst: &mut Qemu, mode: &MigrationMode, r: &WanMigrationReport) {
    assert_eq!(src.qmp().query_status().expect("src status").status, RunState::PostMigrate);
    if let MigrationMode::Multifd { .. } = mode {
        assert!(r.ram.multifd_bytes.unwrap_or(0) > 0, "no bytes went over multifd: {:?}", r.ram);
    }
    qemu_support::check_migration(dst, mode, r, 5);
}

fn single_migration(test: &str, mode: MigrationMode) {
    let _lock = lock(&SERIAL);
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
    let _lock = lock(&SERIAL);
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
