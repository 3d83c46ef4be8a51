//! The migration is a transaction: the fault matrix. Real QEMU guests (TCG) in two emulated
//! sites 150 ms apart, real `ferry-gateway` processes (so they can be killed), the real
//! `ferry-host migrate`/`serve`/`resolve` binaries. Each case watches both QEMUs' run states
//! every 50 ms for the whole test ([`RunWatch`]: it fails the test if both ever run at once) and
//! ends with exactly one VM running, after `ferry-host resolve` where the migration could not
//! know (both paused).
//!
//! Skips (passes with a message) unless root with `qemu-system-x86_64` installed.

mod host_support;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use ferry_netem::qemu::{GuestConfig, Qemu};
use ferry_qmp::MigrationStatus;
use ferry_testkit::sync::lock;
use ferry_testkit::sys::{interrupt, send_signal};
use host_support::faults::{RunWatch, Site, SHUTDOWN_GRACE};
use host_support::{
    assert_source_runs_on, ferry_host_bin, migrate_command, report_of, setup_with_gateway_processes, start_incoming, start_vms,
    wait_until_migrating, watch_path, RunningMigrate, Setup, BOOT, SERVE_PORT,
};

static SERIAL: Mutex<()> = Mutex::new(());

/// A guest that keeps dirtying memory (so there are passes), 64 MiB.
fn guest() -> GuestConfig {
    GuestConfig { dirty_pages_per_tick: 8, verify_every_ticks: 0, retouch: true, ..GuestConfig::default() }
}

/// A guest whose first pass takes a while on a slow link: 32 MiB of random pages.
fn slow_guest() -> GuestConfig {
    GuestConfig { dirty_pages_per_tick: 16, verify_every_ticks: 0, retouch: true, rand_mib: 32, ..GuestConfig::default() }
}

/// Where the VM runs at the end.
#[derive(Debug, PartialEq, Eq)]
enum RunsAt {
    Source,
    Destination,
}

/// Whether `vm`'s QEMU process is alive and running its guest.
fn running(vm: &mut Qemu) -> bool {
    vm.try_wait().ok().flatten().is_none() && vm.qmp().query_status().map(|s| s.running).unwrap_or(false)
}

/// Exactly one of the two runs, and its guest ticks on.
fn exactly_one_runs(src: &mut Qemu, dst: &mut Qemu) -> RunsAt {
    let (s, d) = (running(src), running(dst));
    assert!(s != d, "expected exactly one VM running: source {s}, destination {d}");
    let vm = if s { src } else { dst };
    let last = vm.serial().last_tick().unwrap_or(0);
    vm.serial().wait_for_tick(last + 2, BOOT).expect("the running guest ticks on");
    if s {
        RunsAt::Source
    } else {
        RunsAt::Destination
    }
}

/// `ferry-host resolve` in site A for VM `name`; its JSON report, or its error output.
fn resolve(s: &Setup, qmp: &std::path::Path, name: &str) -> Result<serde_json::Value, String> {
    let out = s
        .wan
        .site_a()
        .command(ferry_host_bin())
        .arg("resolve")
        .arg("--qmp")
        .arg(qmp)
        .args(["--to", "site-b", "--dest-host", &format!("127.0.0.1:{SERVE_PORT}"), "--name", name])
        .args(["--gateway", &s.api_a().to_string()])
        .env("RUST_LOG", "ferry_host=debug")
        .output()
        .expect("run ferry-host resolve");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(serde_json::from_slice(&out.stdout).expect("resolve report is JSON"))
}

/// After a migration that ended with `report`: if it could not know (source left paused),
/// resolve; then exactly one VM runs. Returns where.
fn settle(s: &Setup, report: &serde_json::Value, qmp: &std::path::Path, name: &str, src: &mut Qemu, dst: &mut Qemu) -> RunsAt {
    let source_vm = report["source_vm"].as_str().unwrap_or_default();
    if source_vm.contains("destination state unknown") {
        assert!(source_vm.contains("ferry-host resolve"), "{source_vm}");
        // Undecided: both paused.
        assert!(!running(src), "undecided but the source runs");
        assert!(!running(dst), "undecided but the destination runs");
        // Resolve needs the tunnel back: retry while the gateways reconnect.
        let deadline = Instant::now() + Duration::from_secs(90);
        let resolved = loop {
            match resolve(s, qmp, name) {
                Ok(r) => break r,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("resolve not yet: {e}");
                    std::thread::sleep(Duration::from_secs(2));
                }
                Err(e) => panic!("ferry-host resolve failed: {e}"),
            }
        };
        eprintln!("resolved: {resolved}");
    }
    exactly_one_runs(src, dst)
}

/// Polls `vm`'s migration until `done` says so (10 ms apart; at most `limit`).
fn wait_migration(vm: &Qemu, limit: Duration, done: impl Fn(&MigrationStatus) -> bool) {
    let deadline = Instant::now() + limit;
    loop {
        let status = vm.qmp().query_migrate().map(|i| i.status()).unwrap_or(MigrationStatus::None);
        if done(&status) {
            return;
        }
        assert!(Instant::now() < deadline, "migration never reached the expected state (last {status:?})");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits (at most 10 s) for `vm`'s QEMU to exit; panics with `what` if it does not.
fn wait_exit(vm: &mut Qemu, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while vm.try_wait().expect("QEMU status").is_none() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn watch(s: &Setup, name: &str) -> RunWatch {
    RunWatch::start(watch_path(s.dir.path(), name, false), watch_path(s.dir.path(), name, true))
}

#[test]
fn egress_gateway_killed_right_after_the_destination_loaded() {
    let _lock = lock(&SERIAL);
    let Some(mut s) = setup_with_gateway_processes("egress_gateway_killed", 200_000_000, "200mbit") else { return };
    let (mut src, mut dst, qmp, hb) = start_vms(&s, "fault1", 64, &guest());
    let watch = watch(&s, "fault1");
    let running = RunningMigrate::start(&s, &qmp, &hb);
    // The incoming QEMU's own view: the whole stream is loaded.
    wait_migration(&dst, Duration::from_secs(90), |m| *m == MigrationStatus::Completed);
    s.processes().kill(Site::B);
    let (_, report) = running.finish_within(Duration::from_secs(120));
    eprintln!("report: {report}");
    s.processes().start_site(Site::B);
    let at = settle(&s, &report, &qmp, "fault1", &mut src, &mut dst);
    let seen = watch.finish();
    eprintln!("egress killed: ends at {at:?}, outcome {}, watch {seen:?}", report["outcome"]);
}

#[test]
fn link_outage_of_60s_from_the_stop_and_copy() {
    let _lock = lock(&SERIAL);
    let Some(s) = setup_with_gateway_processes("outage_at_stop_and_copy", 200_000_000, "200mbit") else { return };
    let (mut src, mut dst, qmp, hb) = start_vms(&s, "fault2", 64, &guest());
    let watch = watch(&s, "fault2");
    let running = RunningMigrate::start_with(&s, &qmp, &hb, &["--max-time", "4m", "--cutover-deadline", "5s"]);
    // The stop-and-copy begins when the source stops running (a quiet 64 MiB guest gets there
    // within a few MiB, so this polls from the start).
    let deadline = Instant::now() + Duration::from_secs(90);
    while src.qmp().query_status().map(|st| st.running).unwrap_or(false) {
        assert!(Instant::now() < deadline, "the source never stopped");
        std::thread::sleep(Duration::from_millis(5));
    }
    s.wan.set_link_down(true);
    let down = Instant::now();
    let (_, report) = running.finish_within(Duration::from_secs(150));
    let ended = down.elapsed();
    eprintln!("report after {ended:?} of outage: {report}");
    // Unless QEMU completed before the link went down, the cutover deadline ends the pause
    // (not the tunnel's 20 s idle timeout).
    if report["error"].as_str().unwrap_or_default().contains("cutover deadline") {
        assert_eq!(report["source_vm"], "running", "{report}");
        assert!(ended < Duration::from_secs(10), "the deadline took {ended:?}");
    }
    std::thread::sleep(Duration::from_secs(60).saturating_sub(down.elapsed()));
    s.wan.set_link_down(false);
    let at = settle(&s, &report, &qmp, "fault2", &mut src, &mut dst);
    watch.finish();
    eprintln!("60 s outage from the stop: ends at {at:?}, outcome {}", report["outcome"]);
}

#[test]
fn sigint_right_after_qemu_completed() {
    let _lock = lock(&SERIAL);
    let Some(s) = setup_with_gateway_processes("sigint_after_completed", 200_000_000, "200mbit") else { return };
    let (mut src, mut dst, qmp, hb) = start_vms(&s, "fault3", 64, &guest());
    let watch = watch(&s, "fault3");
    let running = RunningMigrate::start(&s, &qmp, &hb);
    wait_migration(&src, Duration::from_secs(90), |m| *m == MigrationStatus::Completed);
    let completed = Instant::now();
    interrupt(running.pid).expect("SIGINT to ferry-host migrate");
    let late = completed.elapsed();
    let (_, report) = running.finish();
    assert!(late < Duration::from_millis(100), "SIGINT {late:?} after completion");
    let at = settle(&s, &report, &qmp, "fault3", &mut src, &mut dst);
    // Either it had committed (the signal is ignored: completed) or not (cancelled, resumed).
    match at {
        RunsAt::Destination => assert_eq!(report["outcome"], "completed", "{report}"),
        RunsAt::Source => assert_eq!(report["source_vm"], "running", "{report}"),
    }
    watch.finish();
    eprintln!("SIGINT {late:?} after completion: ends at {at:?}");
}

#[test]
fn destination_qmp_unresponsive_after_completion() {
    let _lock = lock(&SERIAL);
    let Some(s) = setup_with_gateway_processes("destination_qmp_unresponsive", 200_000_000, "200mbit") else { return };
    let (mut src, mut dst, qmp, hb) = start_vms(&s, "fault4", 64, &guest());
    let watch = watch(&s, "fault4");
    let running = RunningMigrate::start(&s, &qmp, &hb);
    wait_migration(&src, Duration::from_secs(90), |m| *m == MigrationStatus::Completed);
    // The destination QEMU stops answering anything (its process is stopped).
    send_signal(dst.pid(), libc::SIGSTOP).expect("SIGSTOP the destination QEMU");
    let (_, report) = running.finish_within(Duration::from_secs(120));
    eprintln!("report: {report}");
    // Whatever serve concluded, a stopped QEMU it did not kill would run again now.
    let _ = send_signal(dst.pid(), libc::SIGCONT);
    let at = settle(&s, &report, &qmp, "fault4", &mut src, &mut dst);
    watch.finish();
    eprintln!("destination QMP unresponsive: ends at {at:?}, outcome {}", report["outcome"]);
}

#[test]
fn migrate_killed_mid_precopy_is_cancelled_and_undone() {
    let _lock = lock(&SERIAL);
    let Some(s) = setup_with_gateway_processes("migrate_killed_mid_precopy", 20_000_000, "20mbit") else { return };
    let (mut src, mut dst, qmp, hb) = start_vms(&s, "fault5", 64, &slow_guest());
    let before = src.qmp().query_migrate_parameters().expect("parameters before");
    let watch = watch(&s, "fault5");
    let running = RunningMigrate::start(&s, &qmp, &hb);
    wait_until_migrating(&mut src);
    let during = src.qmp().query_migrate_parameters().expect("parameters during");
    assert_ne!(during, before, "the migration did not change the parameters");
    send_signal(running.pid, libc::SIGKILL).expect("SIGKILL ferry-host migrate");
    let killed = Instant::now();
    // Within 10 s: QEMU's migration is over, no throttle, the parameters are back.
    loop {
        let info = src.qmp().query_migrate().expect("query-migrate");
        let params = src.qmp().query_migrate_parameters().expect("parameters");
        let over = matches!(info.status(), MigrationStatus::Cancelled | MigrationStatus::Failed);
        if over && info.cpu_throttle_percentage.unwrap_or(0) == 0 && params.downtime_limit == before.downtime_limit && params.max_bandwidth == before.max_bandwidth {
            break;
        }
        assert!(killed.elapsed() < Duration::from_secs(10), "not undone 10 s after migrate died: {info:?} {params:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("undone {:?} after SIGKILL", killed.elapsed());
    assert_source_runs_on(&mut src);
    // The destination discarded its copy when the control channel closed.
    wait_exit(&mut dst, "the destination QEMU was not discarded");
    // (Killed: it printed no report.)
    drop(running);
    assert_eq!(exactly_one_runs(&mut src, &mut dst), RunsAt::Source);
    watch.finish();
}

#[test]
fn serve_killed_mid_migration_then_a_retry_succeeds() {
    let _lock = lock(&SERIAL);
    let Some(mut s) = setup_with_gateway_processes("serve_killed_mid_migration", 20_000_000, "20mbit") else { return };
    let (mut src, mut dst, qmp, hb) = start_vms(&s, "fault6", 64, &slow_guest());
    let watch = watch(&s, "fault6");
    let running = RunningMigrate::start(&s, &qmp, &hb);
    wait_until_migrating(&mut src);
    s.kill_serve();
    let (ok, report) = running.finish();
    assert!(!ok);
    assert_eq!(report["source_vm"], "running", "{report}");
    assert_source_runs_on(&mut src);
    // The incoming QEMU lost its stream; an operator (or their tooling) starts a new one and
    // serve again, and retries.
    dst.kill();
    s.start_serve();
    let mut dst = start_incoming(&s, "fault6", 64, &slow_guest());
    let out = migrate_command(&s, &qmp, &hb, &["--max-time", "3m"]).output().expect("retry ferry-host migrate");
    let report = report_of(&out);
    assert!(out.status.success(), "the retry failed: {report}");
    assert_eq!(report["outcome"], "completed");
    wait_exit(&mut src, "the source QEMU did not quit");
    assert_eq!(exactly_one_runs(&mut src, &mut dst), RunsAt::Destination);
    watch.finish();
}

#[test]
fn serve_stopping_gives_an_uncommitted_migration_up_at_once() {
    let _lock = lock(&SERIAL);
    let Some(mut s) = setup_with_gateway_processes("serve_sigterm_mid_migration", 20_000_000, "20mbit") else { return };
    let (mut src, mut dst, qmp, hb) = start_vms(&s, "fault9", 64, &slow_guest());
    let watch = watch(&s, "fault9");
    let running = RunningMigrate::start(&s, &qmp, &hb);
    wait_until_migrating(&mut src);
    let stopped = Instant::now();
    send_signal(s.serve_pid().expect("serve runs"), libc::SIGTERM).expect("SIGTERM to serve");
    let (ok, report) = running.finish();
    let given_up = stopped.elapsed();
    assert!(!ok);
    assert!(report["error"].as_str().unwrap_or_default().contains("shutting down"), "{report}");
    assert_eq!(report["source_vm"], "running", "{report}");
    // Not a timeout: the source heard at once (one round trip, plus the discard).
    assert!(given_up < Duration::from_secs(10), "the source heard after {given_up:?}");
    let status = s.wait_serve_exit(Duration::from_secs(10)).expect("serve did not exit after SIGTERM");
    assert!(status.success(), "serve exited with {status}");
    wait_exit(&mut dst, "the destination QEMU was not discarded");
    assert_source_runs_on(&mut src);
    assert_eq!(exactly_one_runs(&mut src, &mut dst), RunsAt::Source);
    watch.finish();
    eprintln!("serve SIGTERM: the source resumed {given_up:?} later");
}

#[test]
fn a_failed_pre_commit_check_resumes_the_completed_source() {
    let _lock = lock(&SERIAL);
    let Some(s) = setup_with_gateway_processes("failed_pre_commit_check", 200_000_000, "200mbit") else { return };
    let (mut src, mut dst, qmp, hb) = start_vms(&s, "fault10", 64, &guest());
    let watch = watch(&s, "fault10");
    let check = r#"test "$FERRY_VM" = fault10 && echo "RAM differs" >&2; exit 3"#;
    let out = migrate_command(&s, &qmp, &hb, &["--pre-commit-check", check]).output().expect("run ferry-host migrate");
    let report = report_of(&out);
    assert!(!out.status.success());
    let error = report["error"].as_str().unwrap_or_default();
    assert!(error.contains("the pre-commit check failed") && error.contains("RAM differs"), "{error}");
    // QEMU had completed; not committed, so the source resumed from postmigrate.
    assert_eq!(report["source_vm"], "running", "{report}");
    assert_eq!(src.qmp().query_migrate().expect("query-migrate").status(), MigrationStatus::Completed);
    wait_exit(&mut dst, "the destination QEMU was not discarded");
    assert_eq!(exactly_one_runs(&mut src, &mut dst), RunsAt::Source);
    watch.finish();
}

#[test]
fn sigterm_to_either_gateway_mid_migration() {
    let _lock = lock(&SERIAL);
    let Some(mut s) = setup_with_gateway_processes("gateway_sigterm_mid_migration", 20_000_000, "20mbit") else { return };
    let (mut src, mut dst, qmp, hb) = start_vms(&s, "fault7", 64, &slow_guest());
    let watch = watch(&s, "fault7");
    for site in [Site::A, Site::B] {
        let running = RunningMigrate::start(&s, &qmp, &hb);
        wait_until_migrating(&mut src);
        let stopped = Instant::now();
        s.processes().signal(site, libc::SIGTERM);
        let (ok, report) = running.finish();
        let ended = stopped.elapsed();
        assert!(!ok);
        assert_eq!(report["source_vm"], "running", "{report}");
        // The grace period, then the close reaches the other side at once: no idle timeout.
        assert!(ended < SHUTDOWN_GRACE + Duration::from_secs(6), "{site:?}: the migration ended {ended:?} after SIGTERM");
        let status = s.processes().wait_exit(site, Duration::from_secs(10)).expect("the gateway did not exit");
        assert!(status.success(), "{site:?} exited with {status}");
        assert_source_runs_on(&mut src);
        wait_exit(&mut dst, "the destination QEMU was not discarded");
        eprintln!("SIGTERM to gateway {site:?}: the source resumed {ended:?} later ({})", report["error"]);
        s.processes().start_site(site);
        dst = start_incoming(&s, "fault7", 64, &slow_guest());
    }
    assert_eq!(exactly_one_runs(&mut src, &mut dst), RunsAt::Source);
    watch.finish();
}

#[test]
fn two_migrations_of_one_vm_exactly_one_proceeds() {
    let _lock = lock(&SERIAL);
    let Some(s) = setup_with_gateway_processes("two_migrations_of_one_vm", 200_000_000, "200mbit") else { return };
    let (mut src, mut dst, qmp, hb) = start_vms(&s, "fault8", 64, &guest());
    let watch = watch(&s, "fault8");
    let first = RunningMigrate::start(&s, &qmp, &hb);
    wait_until_migrating(&mut src);
    let started = Instant::now();
    let out = migrate_command(&s, &qmp, &hb, &[]).output().expect("second ferry-host migrate");
    let second = report_of(&out);
    assert!(!out.status.success());
    let error = second["error"].as_str().unwrap_or_default();
    assert!(error.contains("another ferry-host migrate") && error.contains(&format!("pid {}", first.pid)), "{error}");
    assert_eq!(second["source_vm"], "running");
    assert!(started.elapsed() < Duration::from_secs(5), "the refusal took {:?}", started.elapsed());
    let (ok, report) = first.finish_within(Duration::from_secs(120));
    assert!(ok, "the first migration failed: {report}");
    assert_eq!(exactly_one_runs(&mut src, &mut dst), RunsAt::Destination);
    watch.finish();
}

/// Run by `scripts/test.sh` with `FERRY_QEMU` on Debian 12's QEMU 7.2 (skips on a QEMU without
/// the issue): migrate refuses a QEMU whose TCG loses re-dirtied pages, and touches nothing.
#[test]
fn migrate_refuses_a_qemu_with_a_known_issue() {
    let _lock = lock(&SERIAL);
    let Some(s) = setup_with_gateway_processes("refuses_known_issue", 200_000_000, "200mbit") else { return };
    let (mut src, _dst, qmp, hb) = start_vms(&s, "fault11", 64, &guest());
    let version = src.qmp().client().greeting().version.qemu;
    if ferry_qmp::known_issues::migration_issue(version, false).is_none() {
        eprintln!("SKIP migrate_refuses_a_qemu_with_a_known_issue: QEMU {version} has no known issue (scripts/test.sh runs this on QEMU 7.2)");
        return;
    }
    let before = src.qmp().query_migrate_parameters().expect("parameters");
    let out = migrate_command(&s, &qmp, &hb, &[]).output().expect("run ferry-host migrate");
    let report = report_of(&out);
    assert!(!out.status.success());
    let error = report["error"].as_str().unwrap_or_default();
    assert!(error.contains(&format!("refusing to migrate: QEMU {version} under TCG")) && error.contains("--ignore-known-issues"), "{error}");
    assert_eq!(report["source_vm"], "running");
    assert_eq!(src.qmp().query_migrate().expect("query-migrate").status(), MigrationStatus::None);
    assert_eq!(src.qmp().query_migrate_parameters().expect("parameters"), before);
    assert!(running(&mut src));
}
