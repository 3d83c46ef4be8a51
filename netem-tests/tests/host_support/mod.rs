//! Two emulated sites 150 ms apart with real gateways (host-plugin API on), `ferry-host serve`
//! in site B, a bridge standing for site B's L2, and helpers to start VM pairs and run
//! `ferry-host migrate` in site A. Shared by the migration tests and the downtime benchmark.

#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_netem::gateway_pair::{GatewayPair, PairLink};
use ferry_netem::qemu::{self, GuestConfig, GuestImage, Qemu, QemuConfig};
use ferry_netem::Wan;
use serde_json::Value;

use ferry_testkit::capture::{src_mac, Capture};
use ferry_testkit::sys::{enter_netns, ip_in};
pub use ferry_testkit::sys::Process;
use ferry_testkit::tracing::init_tracing;

/// The `ferry-host` binary under test.
/// The `ferry-host` binary under test (built by `cargo build --workspace`).
pub fn ferry_host_bin() -> PathBuf {
    ferry_testkit::sys::workspace_bin("ferry-host")
}
pub const BOOT: Duration = Duration::from_secs(60);
pub const VM_MAC: &str = "52:54:00:12:34:56";
pub const VM_IP: Ipv4Addr = Ipv4Addr::new(10, 9, 9, 9);
/// Where `ferry-host serve` listens in site B.
pub const SERVE_PORT: u16 = 7800;
/// The destination L2: a bridge in site B's namespace, the serve's announce port and a capture port.
pub const BRIDGE: &str = "fbr0";
pub const ANNOUNCE_DEV: &str = "fann0";
pub const CAPTURE_DEV: &str = "fcap0";

/// Everything a test needs; fields drop in order: the serve process, the gateways, the WAN
/// (which deletes the namespaces and with them the bridge), the files.
pub struct Setup {
    _serve: Process,
    /// The gateways.
    pub pair: GatewayPair,
    /// The two sites.
    pub wan: Wan,
    /// The test guest.
    pub image: GuestImage,
    /// Sockets and configs.
    pub dir: tempfile::TempDir,
}

/// `None` (skipped, with a message) when not root or without QEMU.
pub fn setup(test: &str, rate_bps: u64, bandwidth: &str) -> Option<Setup> {
    init_tracing();
    if let Some(why) = qemu::unavailable_reason() {
        eprintln!("SKIP {test}: {why}");
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
    let ip = |args: &[&str]| ip_in(&ns, args);
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
        .command(ferry_host_bin())
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

pub fn nic_args() -> Vec<String> {
    vec!["-netdev".into(), "user,id=n0".into(), "-device".into(), format!("e1000,netdev=n0,mac={VM_MAC},id=nic0")]
}

/// The source VM `name` in site A (with a second QMP socket and a heartbeat socket for the
/// host-plugin) and its incoming twin in site B at the paths the serve config names.
pub fn start_vms(s: &Setup, name: &str, memory_mib: u32, guest: &GuestConfig) -> (Qemu, Qemu, PathBuf, PathBuf) {
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

pub fn in_path(dir: &Path, name: &str, kind: &str) -> PathBuf {
    dir.join(format!("{name}.in.{kind}"))
}

/// `ferry-host migrate ...` in site A (its log and report are printed by [`report_of`] if it fails).
pub fn migrate_command(s: &Setup, qmp: &Path, heartbeat: &Path, extra: &[&str]) -> Command {
    let mut c = s.wan.site_a().command(ferry_host_bin());
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

/// The JSON report `ferry-host migrate --json` printed; on failure also prints its log.
pub fn report_of(out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        eprintln!("--- ferry-host migrate stderr ---\n{}", String::from_utf8_lossy(&out.stderr));
        eprintln!("--- report ---\n{stdout}");
    }
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("report is not JSON ({e}): {stdout}"))
}

/// Checks every flow site A carried: matched at B, and the bytes read on one side are the
/// bytes written on the other (blake3 and length), both directions.
/// Waits (up to 30 s) until both gateways logged at least `expected` finished flows.
pub fn check_flows(pair: &GatewayPair, expected: usize) -> usize {
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
pub struct L2Capture {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<Vec<u8>>>,
}

impl L2Capture {
    pub fn start(wan: &Wan) -> Self {
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

    pub fn finish(self) -> Vec<Vec<u8>> {
        std::thread::sleep(Duration::from_millis(300));
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("capture thread")
    }
}

