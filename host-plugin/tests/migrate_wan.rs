//! `ferry-host migrate` / `ferry-host serve` end to end: real QEMU guests (TCG) in two emulated
//! sites 150 ms apart, real gateways with their host-plugin API, the real `ferry-host` binary
//! in each site's namespace, and a bridge standing for the destination L2 with a capture port.
//!
//! Skips (passes with a message) unless root with `qemu-system-x86_64` installed. Tests take a
//! process-wide lock: TCG guests, the WAN emulator and two gateways already share the cores.

mod support;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_host::announce::{frames, Announcement};
use ferry_netem::gateway_pair::{GatewayPair, PairLink};
use ferry_netem::qemu::{self, GuestConfig, GuestImage, Qemu, QemuConfig, VerifyReport};
use ferry_netem::Wan;
use serde_json::Value;
use support::{enter_netns, run, src_mac, Capture};

const BIN: &str = env!("CARGO_BIN_EXE_ferry-host");
const BOOT: Duration = Duration::from_secs(60);
const VM_MAC: &str = "52:54:00:12:34:56";
const VM_IP: Ipv4Addr = Ipv4Addr::new(10, 9, 9, 9);
/// Where `ferry-host serve` listens in site B.
const SERVE_PORT: u16 = 7800;
/// The destination L2: a bridge in site B's namespace, the serve's announce port and a capture port.
const BRIDGE: &str = "fbr0";
const ANNOUNCE_DEV: &str = "fann0";
const CAPTURE_DEV: &str = "fcap0";

static SERIAL: Mutex<()> = Mutex::new(());

// Every dirtying guest here sets `retouch`: QEMU 7.2's TCG loses dirty tracking of pages the
// guest keeps writing after the second bitmap sync (fixed upstream in 9.0), which would show as
// stale memory at the destination (see netem-tests/guest/README.md).

fn init_tracing() {
    let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).with_test_writer().try_init();
}

/// A child process killed (and reaped) when dropped, panics included.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Everything a test needs; fields drop in order: the serve process, the gateways, the WAN
/// (which deletes the namespaces and with them the bridge), the files.
struct Setup {
    _serve: Process,
    pair: GatewayPair,
    wan: Wan,
    image: GuestImage,
    dir: tempfile::TempDir,
}

/// `None` (skipped, with a message) when not root or without QEMU.
fn setup(test: &str, rate_bps: u64, bandwidth: &str) -> Option<Setup> {
    init_tracing();
    if !ferry_netem::netns::is_root() {
        eprintln!("SKIP {test}: needs root (network namespaces)");
        return None;
    }
    if !qemu::qemu_available() {
        eprintln!("SKIP {test}: qemu-system-x86_64 not installed (apt-get install qemu-system-x86)");
        return None;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let image = GuestImage::build().expect("building the test guest");
    let wan = Wan::builder().rtt(Duration::from_millis(150)).rate_bps(rate_bps).loss(0.001).up().expect("WAN up");
    // The pair's static forward is unused here: host-plugins open their own through the API.
    let unused = std::net::SocketAddr::from((wan.site_b().addr(), 9));
    let pair = GatewayPair::start(&wan, PairLink { bandwidth: bandwidth.into(), rtt: "150ms".into(), codec: true }, unused)
        .expect("gateways");

    let ns = wan.site_b().netns().to_owned();
    let ip = |args: &[&str]| {
        let mut full = vec!["-n", ns.as_str()];
        full.extend_from_slice(args);
        run("ip", &full);
    };
    ip(&["link", "add", BRIDGE, "type", "bridge", "stp_state", "0", "mcast_snooping", "0"]);
    ip(&["link", "add", ANNOUNCE_DEV, "type", "veth", "peer", "name", "fann0p"]);
    ip(&["link", "add", CAPTURE_DEV, "type", "veth", "peer", "name", "fcap0p"]);
    ip(&["link", "set", "fann0p", "master", BRIDGE]);
    ip(&["link", "set", "fcap0p", "master", BRIDGE]);
    for dev in [BRIDGE, "fann0p", "fcap0p", ANNOUNCE_DEV, CAPTURE_DEV] {
        ip(&["link", "set", dev, "up"]);
    }

    let config = dir.path().join("serve.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{SERVE_PORT}\"\nmigration_address = \"127.0.0.1\"\nannounce_interface = \"{ANNOUNCE_DEV}\"\n\
             [incoming]\nqmp = \"{0}/{{vm}}.in.qmp\"\nheartbeat = \"{0}/{{vm}}.in.hb\"\n",
            dir.path().display()
        ),
    )
    .expect("serve config");
    let serve = wan
        .site_b()
        .command(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "ferry_host=debug")
        .spawn()
        .expect("start ferry-host serve");
    let serve = Process(serve);
    let listening = wan
        .site_b()
        .run(|| {
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if std::net::TcpStream::connect(("127.0.0.1", SERVE_PORT)).is_ok() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            false
        })
        .expect("probe serve");
    assert!(listening, "ferry-host serve did not listen within 20 s");
    Some(Setup { _serve: serve, pair, wan, image, dir })
}

fn nic_args() -> Vec<String> {
    vec!["-netdev".into(), "user,id=n0".into(), "-device".into(), format!("e1000,netdev=n0,mac={VM_MAC},id=nic0")]
}

/// The source VM `name` in site A (with a second QMP socket and a heartbeat socket for the
/// host-plugin) and its incoming twin in site B at the paths the serve config names.
fn start_vms(s: &Setup, name: &str, memory_mib: u32, guest: &GuestConfig) -> (Qemu, Qemu, PathBuf, PathBuf) {
    let d = s.dir.path();
    let (src_qmp, src_hb) = (d.join(format!("{name}.qmp")), d.join(format!("{name}.hb")));
    let config = |incoming: bool| {
        let mut c = QemuConfig { memory_mib, guest: guest.clone(), extra_args: nic_args(), ..QemuConfig::default() }.named(name);
        if incoming {
            c = c.incoming_defer().with_extra_qmp_socket(in_path(d, name, "qmp")).with_heartbeat_socket(in_path(d, name, "hb"));
        } else {
            c = c.with_extra_qmp_socket(&src_qmp).with_heartbeat_socket(&src_hb);
        }
        c
    };
    let src = Qemu::spawn(&s.image, &config(false), Some(s.wan.site_a().netns())).expect("start source in site A");
    let dst = Qemu::spawn(&s.image, &config(true), Some(s.wan.site_b().netns())).expect("start destination in site B");
    src.serial().wait_for_tick(3, BOOT).expect("source ticks");
    (src, dst, src_qmp, src_hb)
}

fn in_path(dir: &Path, name: &str, kind: &str) -> PathBuf {
    dir.join(format!("{name}.in.{kind}"))
}

/// `ferry-host migrate ...` in site A.
fn migrate_command(s: &Setup, qmp: &Path, heartbeat: &Path, extra: &[&str]) -> Command {
    let mut c = s.wan.site_a().command(BIN);
    c.arg("migrate")
        .arg("--qmp")
        .arg(qmp)
        .args(["--to", "site-b", "--dest-host", &format!("127.0.0.1:{SERVE_PORT}")])
        .args(["--gateway", &s.pair.api_a.to_string(), "--ip", &VM_IP.to_string()])
        .arg("--heartbeat")
        .arg(heartbeat)
        .args(["--progress", "lines", "--json"])
        .args(extra)
        .env("RUST_LOG", "ferry_host=debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn report_of(out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("--- ferry-host migrate stderr ---\n{}", String::from_utf8_lossy(&out.stderr));
    eprintln!("--- report ---\n{stdout}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("report is not JSON ({e}): {stdout}"))
}

/// Checks every flow site A carried: matched at B, and the bytes read on one side are the
/// bytes written on the other (blake3 and length), both directions.
/// Waits (up to 30 s) until both gateways logged at least `expected` finished flows.
fn check_flows(pair: &GatewayPair, expected: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(30);
    let (a, b) = loop {
        let (a, b) = (pair.flows_a.records(), pair.flows_b.records());
        if (a.len() >= expected && b.len() >= expected) || Instant::now() >= deadline {
            break (a, b);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut checked = 0;
    for fa in a.iter().filter(|r| r.opened_locally) {
        let fb = b.iter().find(|r| r.flow == fa.flow && !r.opened_locally).unwrap_or_else(|| panic!("flow {} has no egress record", fa.flow));
        assert!(fa.error.is_none() && fb.error.is_none(), "flow {} failed: {:?} / {:?}", fa.flow, fa.error, fb.error);
        assert_eq!((fa.tcp_in, fa.tcp_in_digest), (fb.tcp_out, fb.tcp_out_digest), "flow {}: source -> destination bytes differ", fa.flow);
        assert_eq!((fb.tcp_in, fb.tcp_in_digest), (fa.tcp_out, fa.tcp_out_digest), "flow {}: return path bytes differ", fa.flow);
        checked += 1;
    }
    checked
}

/// Captures frames from the VM's MAC on the destination L2 until stopped.
struct L2Capture {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<Vec<u8>>>,
}

impl L2Capture {
    fn start(wan: &Wan) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ns = wan.site_b().netns().to_owned();
        let flag = stop.clone();
        let mac: Vec<u8> = VM_MAC.split(':').map(|h| u8::from_str_radix(h, 16).expect("literal MAC")).collect();
        let thread = std::thread::spawn(move || {
            enter_netns(&ns).expect("enter site B");
            let capture = Capture::open(CAPTURE_DEV).expect("capture socket");
            let mut got = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                if let Some(frame) = capture.recv() {
                    if src_mac(&frame) == mac.as_slice() {
                        got.push(frame);
                    }
                }
            }
            got
        });
        Self { stop, thread }
    }

    fn finish(self) -> Vec<Vec<u8>> {
        std::thread::sleep(Duration::from_millis(300));
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("capture thread")
    }
}

#[test]
fn one_command_migrates_a_running_vm_across_150ms() {
    let _lock = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(s) = setup("one_command_migrates_a_running_vm_across_150ms", 200_000_000, "200mbit") else { return };
    // Ticks every 20 ms (the heartbeat's resolution); 8 random pages dirtied per tick.
    let guest = GuestConfig { dirty_pages_per_tick: 8, verify_every_ticks: 0, retouch: true, tick_jiffies: 2, ..GuestConfig::default() };
    let (mut src, mut dst, src_qmp, src_hb) = start_vms(&s, "web1", 64, &guest);
    let capture = L2Capture::start(&s.wan);

    let out = migrate_command(&s, &src_qmp, &src_hb, &[]).output().expect("run ferry-host migrate");
    let report = report_of(&out);
    assert!(out.status.success(), "ferry-host migrate failed: {report}");
    assert_eq!(report["outcome"], "completed");
    assert_eq!(report["vm"], "web1");
    assert_eq!(report["source_vm"], "quit");

    // The source QEMU quit; the destination runs the guest on from where it was, intact.
    let deadline = Instant::now() + Duration::from_secs(10);
    while src.try_wait().expect("source status").is_none() {
        assert!(Instant::now() < deadline, "the source QEMU did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
    let last = src.serial().last_tick().expect("source ticked");
    let next = dst.serial().wait_for_tick(last + 1, BOOT).expect("destination ticks on");
    assert!(next > last);
    assert!(dst.qmp().query_status().expect("status").running);
    match dst.request_verify(BOOT).expect("verify") {
        VerifyReport::Ok { .. } => {}
        other => panic!("guest memory corrupted after migration: {other:?}"),
    }

    // Bytes: every carried flow (control channel, migration stream) byte-identical end to end.
    assert!(check_flows(&s.pair, 2) >= 2, "expected the control and the migration flow");
    let from_qemu = report["bytes_from_qemu"].as_u64().expect("bytes_from_qemu");
    let on_wan = report["bytes_on_wan"].as_u64().expect("bytes_on_wan");
    assert!(from_qemu > 0 && on_wan > 0 && on_wan < from_qemu, "from QEMU {from_qemu}, on WAN {on_wan}");

    // Downtime as the guest saw it: heartbeat gap minus one 20 ms interval.
    let guest_downtime = report["guest_downtime_ms"].as_f64().expect("guest downtime measured");
    assert!(guest_downtime > 0.0 && guest_downtime < 30_000.0, "guest downtime {guest_downtime} ms");
    assert!(report["qemu_downtime_ms"].as_u64().is_some());
    let pause = report["pause_ms"].as_f64().expect("STOP -> RESUME measured");
    assert!(pause > 0.0 && pause < 30_000.0, "pause {pause} ms");
    eprintln!(
        "guest downtime {guest_downtime:.0} ms (±{:.0}), pause {pause:.0} ms, QEMU downtime {} ms, total {:.1} s, reduction {:.1}x",
        report["guest_downtime_error_ms"].as_f64().unwrap_or(f64::NAN),
        report["qemu_downtime_ms"],
        report["total_time_s"].as_f64().unwrap_or(f64::NAN),
        report["reduction"].as_f64().unwrap_or(f64::NAN)
    );

    // The destination L2 heard the VM: RARP + gratuitous ARP per round, byte for byte, 5 rounds.
    assert_eq!(report["announced_macs"], serde_json::json!([VM_MAC]));
    let got = capture.finish();
    let expected = frames(&Announcement { mac: VM_MAC.parse().expect("MAC"), ipv4: vec![VM_IP], ipv6: vec![] });
    assert_eq!(got.len(), 5 * expected.len(), "captured {} frames", got.len());
    for round in got.chunks(expected.len()) {
        let mut round = round.to_vec();
        round.sort();
        let mut want = expected.clone();
        want.sort();
        assert_eq!(round, want, "captured frames differ from the announcement");
    }
}

#[test]
fn busy_guest_outrunning_the_link_still_completes() {
    let _lock = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // 40 Mbit/s = 5 MB/s; the guest rewrites 300 random (incompressible) pages every 100 ms:
    // about 12 MB/s, well beyond what the link drains.
    let Some(s) = setup("busy_guest_outrunning_the_link_still_completes", 40_000_000, "40mbit") else { return };
    let guest = GuestConfig { dirty_pages_per_tick: 300, verify_every_ticks: 0, retouch: true, rand_mib: 32, ..GuestConfig::default() };
    let (mut src, mut dst, src_qmp, src_hb) = start_vms(&s, "busy1", 64, &guest);

    let out = migrate_command(&s, &src_qmp, &src_hb, &["--max-time", "4m"]).output().expect("run ferry-host migrate");
    let report = report_of(&out);
    assert!(out.status.success(), "ferry-host migrate failed: {report}");
    assert_eq!(report["outcome"], "completed");
    let dirty = report["peak_dirty_rate_mb_s"].as_f64().expect("dirty rate");
    let drain = report["drain_rate_mb_s"].as_f64().expect("drain rate");
    assert!(dirty > drain, "the guest did not outrun the link (dirty {dirty:.1} MB/s, drain {drain:.1} MB/s)");
    assert!(report["max_throttle_percent"].as_u64().unwrap_or(0) > 0, "converged without throttling: {report}");
    eprintln!(
        "dirty {dirty:.1} MB/s vs drain {drain:.1} MB/s; throttle up to {}%, {} passes, guest downtime {} ms, pause {} ms, total {:.1} s",
        report["max_throttle_percent"],
        report["iterations"],
        report["guest_downtime_ms"],
        report["pause_ms"],
        report["total_time_s"].as_f64().unwrap_or(f64::NAN)
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while src.try_wait().expect("source status").is_none() {
        assert!(Instant::now() < deadline, "the source QEMU did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
    let last = src.serial().last_tick().expect("source ticked");
    dst.serial().wait_for_tick(last + 1, BOOT).expect("destination ticks on");
    match dst.request_verify(BOOT).expect("verify") {
        VerifyReport::Ok { .. } => {}
        other => panic!("guest memory corrupted after migration: {other:?}"),
    }
    assert!(check_flows(&s.pair, 2) >= 2);
}

#[test]
fn failures_leave_the_source_running() {
    let _lock = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // 20 Mbit/s so that the first pass of 32 MiB of random pages takes > 10 s.
    let Some(s) = setup("failures_leave_the_source_running", 20_000_000, "20mbit") else { return };
    let guest = GuestConfig { dirty_pages_per_tick: 16, verify_every_ticks: 0, retouch: true, rand_mib: 32, ..GuestConfig::default() };

    // 1. No incoming VM under that name at the destination: refused before anything starts.
    let (mut src, _dst, src_qmp, src_hb) = start_vms(&s, "db1", 64, &guest);
    let out = migrate_command(&s, &src_qmp, &src_hb, &["--name", "nosuchvm"]).output().expect("run ferry-host migrate");
    let report = report_of(&out);
    assert!(!out.status.success());
    assert_eq!(report["outcome"], "failed");
    let error = report["error"].as_str().unwrap_or_default();
    assert!(error.contains("no incoming QEMU for `nosuchvm`"), "{error}");
    assert_eq!(report["source_vm"], "running");
    assert!(src.qmp().query_status().expect("status").running);

    // 2. The destination QEMU dies in the middle of the migration.
    let mut child = Process(migrate_command(&s, &src_qmp, &src_hb, &[]).spawn().expect("start ferry-host migrate"));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let info = src.qmp().query_migrate().expect("query-migrate");
        let sent = info.ram.as_ref().map_or(0, |r| r.transferred);
        if info.status == "active" && sent > 4 << 20 {
            break;
        }
        assert!(Instant::now() < deadline, "the migration did not get going: {info:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut dst = _dst;
    dst.kill();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("wait") {
            break status;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "ferry-host migrate did not give up");
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    use std::io::Read;
    child.0.stdout.take().expect("stdout").read_to_string(&mut stdout).expect("read stdout");
    child.0.stderr.take().expect("stderr").read_to_string(&mut stderr).expect("read stderr");
    let report = report_of(&Output { status, stdout: stdout.into_bytes(), stderr: stderr.into_bytes() });
    assert!(!status.success());
    assert_eq!(report["outcome"], "failed");
    assert_eq!(report["source_vm"], "running", "{report}");
    // The source VM runs on: its QEMU says so and the guest keeps ticking.
    assert!(src.qmp().query_status().expect("status").running);
    let last = src.serial().last_tick().expect("ticks");
    src.serial().wait_for_tick(last + 3, BOOT).expect("source guest keeps running");
    let info = src.qmp().query_migrate().expect("query-migrate");
    assert!(matches!(info.status.as_str(), "failed" | "cancelled"), "{info:?}");
}
