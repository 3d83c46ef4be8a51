//! Two emulated sites 150 ms apart with real gateways (host-plugin API on), `ferry-host serve`
//! in site B, a bridge standing for site B's L2, and helpers to start VM pairs and run
//! `ferry-host migrate` in site A. Shared by the migration tests, the fault tests and the
//! downtime benchmark. The gateways run in the test process ([`setup`]: their flow logs can be
//! checked) or as `ferry-gateway` processes ([`setup_with_gateway_processes`]: they can be
//! killed and restarted).

#![allow(dead_code)]

pub mod faults;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_netem::gateway_pair::{GatewayPair, PairLink};
use ferry_netem::qemu::{self, GuestConfig, GuestImage, Qemu, QemuConfig};
use ferry_qmp::MigrationStatus;
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

/// The two sites' gateways.
pub enum Gateways {
    /// In this process (flow logs readable).
    InProcess(GatewayPair),
    /// `ferry-gateway` processes.
    Processes(faults::GatewayProcesses),
}

/// Everything a test needs; fields drop in order: the serve process, the gateways, the WAN
/// (which deletes the namespaces and with them the bridge), the files.
pub struct Setup {
    serve: Option<Process>,
    serve_config: PathBuf,
    /// The gateways.
    pub gateways: Gateways,
    /// The two sites.
    pub wan: Wan,
    /// The test guest.
    pub image: GuestImage,
    /// Sockets and configs.
    pub dir: tempfile::TempDir,
}

impl Setup {
    /// The in-process gateways (panics for gateway processes).
    pub fn pair(&self) -> &GatewayPair {
        match &self.gateways {
            Gateways::InProcess(pair) => pair,
            Gateways::Processes(_) => panic!("this setup runs gateway processes: no flow logs"),
        }
    }

    /// Site A's gateway API, where `ferry-host migrate` goes.
    pub fn api_a(&self) -> &ferry_api::protocol::ApiAddress {
        match &self.gateways {
            Gateways::InProcess(pair) => &pair.api_a,
            Gateways::Processes(p) => &p.api,
        }
    }

    /// The gateway processes (panics for in-process gateways).
    pub fn processes(&mut self) -> &mut faults::GatewayProcesses {
        match &mut self.gateways {
            Gateways::Processes(p) => p,
            Gateways::InProcess(_) => panic!("this setup runs the gateways in process"),
        }
    }

    /// `ferry-host serve`'s pid.
    pub fn serve_pid(&self) -> Option<u32> {
        self.serve.as_ref().map(|p| p.0.id())
    }

    /// Waits at most `limit` for `ferry-host serve` to exit by itself; its status.
    pub fn wait_serve_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let status = self.serve.as_mut()?.wait_timeout(limit).expect("wait for serve")?;
        self.serve = None;
        Some(status)
    }

    /// Kills `ferry-host serve` (SIGKILL) and reaps it.
    pub fn kill_serve(&mut self) {
        self.serve = None;
    }

    /// Starts `ferry-host serve` in site B (again) and waits until it listens.
    pub fn start_serve(&mut self) {
        let serve = self
            .wan
            .site_b()
            .command(ferry_host_bin())
            .args(["serve", "--config"])
            .arg(&self.serve_config)
            .env("RUST_LOG", "ferry_host=debug")
            .spawn()
            .expect("start ferry-host serve");
        self.serve = Some(Process(serve));
        let listening = self
            .wan
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
    }
}

/// `None` (skipped, with a message) when not root or without QEMU.
pub fn setup(test: &str, rate_bps: u64, bandwidth: &str) -> Option<Setup> {
    setup_sites(test, rate_bps, bandwidth, false)
}

/// [`setup`] with the gateways as `ferry-gateway` processes.
pub fn setup_with_gateway_processes(test: &str, rate_bps: u64, bandwidth: &str) -> Option<Setup> {
    setup_sites(test, rate_bps, bandwidth, true)
}

fn setup_sites(test: &str, rate_bps: u64, bandwidth: &str, processes: bool) -> Option<Setup> {
    init_tracing();
    if let Some(why) = qemu::unavailable_reason() {
        eprintln!("SKIP {test}: {why}");
        return None;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let image = GuestImage::build().expect("building the test guest");
    let wan = Wan::builder().rtt(Duration::from_millis(150)).rate_bps(rate_bps).loss(0.001).up().expect("WAN up");
    let link = PairLink { bandwidth: bandwidth.into(), rtt: "150ms".into(), codec: true };
    let gateways = if processes {
        Gateways::Processes(faults::GatewayProcesses::start(&wan, &link, dir.path()))
    } else {
        // The pair's static forward is unused here: host-plugins open their own through the API.
        let unused = std::net::SocketAddr::from((wan.site_b().addr(), 9));
        Gateways::InProcess(GatewayPair::start(&wan, link, unused).expect("gateways"))
    };

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
    let mut setup = Setup { serve: None, serve_config: config, gateways, wan, image, dir };
    setup.start_serve();
    Some(setup)
}

pub fn nic_args() -> Vec<String> {
    vec!["-netdev".into(), "user,id=n0".into(), "-device".into(), format!("e1000,netdev=n0,mac={VM_MAC},id=nic0")]
}

/// The QEMU config of VM `name` in the source (`incoming` false) or destination role: a second
/// QMP socket for the host-plugin, a heartbeat socket, and a third QMP socket (`watch_path`)
/// for a [`faults::RunWatch`].
fn vm_config(s: &Setup, name: &str, memory_mib: u32, guest: &GuestConfig, incoming: bool) -> QemuConfig {
    let d = s.dir.path();
    let mut extra = nic_args();
    let watch = watch_path(d, name, incoming);
    extra.extend(["-chardev".into(), format!("socket,id=watchmon,path={},server=on,wait=off", watch.display())]);
    extra.extend(["-mon".into(), "chardev=watchmon,mode=control".into()]);
    let c = QemuConfig { memory_mib, guest: guest.clone(), extra_args: extra, ..QemuConfig::default() }.named(name);
    if incoming {
        c.incoming_defer().with_extra_qmp_socket(in_path(d, name, "qmp")).with_heartbeat_socket(in_path(d, name, "hb"))
    } else {
        c.with_extra_qmp_socket(d.join(format!("{name}.qmp"))).with_heartbeat_socket(d.join(format!("{name}.hb")))
    }
}

/// The watch monitor socket of VM `name` at the source or (`incoming`) the destination.
pub fn watch_path(dir: &Path, name: &str, incoming: bool) -> PathBuf {
    dir.join(format!("{name}{}.watch", if incoming { ".in" } else { "" }))
}

/// The source VM `name` in site A and its incoming twin in site B at the paths the serve config
/// names; returns them with the source's host-plugin QMP and heartbeat sockets.
pub fn start_vms(s: &Setup, name: &str, memory_mib: u32, guest: &GuestConfig) -> (Qemu, Qemu, PathBuf, PathBuf) {
    let d = s.dir.path();
    let src = Qemu::spawn(&s.image, &vm_config(s, name, memory_mib, guest, false), Some(s.wan.site_a().netns())).expect("start source in site A");
    let dst = start_incoming(s, name, memory_mib, guest);
    src.serial().wait_for_tick(3, BOOT).expect("source ticks");
    (src, dst, d.join(format!("{name}.qmp")), d.join(format!("{name}.hb")))
}

/// (Another) incoming QEMU for `name` in site B, `-incoming defer`.
pub fn start_incoming(s: &Setup, name: &str, memory_mib: u32, guest: &GuestConfig) -> Qemu {
    Qemu::spawn(&s.image, &vm_config(s, name, memory_mib, guest, true), Some(s.wan.site_b().netns())).expect("start destination in site B")
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
        .args(["--gateway", &s.api_a().to_string(), "--ip", &VM_IP.to_string()])
        .arg("--heartbeat")
        .arg(heartbeat)
        .args(["--progress", "lines", "--json"])
        .arg("--state-dir")
        .arg(s.dir.path().join("state"))
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

/// `ferry-host migrate` running in the background; its output is collected by a thread so a
/// chatty log can never fill a pipe and stall it.
pub struct RunningMigrate {
    pub pid: u32,
    done: std::sync::mpsc::Receiver<std::io::Result<Output>>,
}

impl RunningMigrate {
    pub fn start(s: &Setup, qmp: &Path, hb: &Path) -> Self {
        // Bounded, so that it ends on its own even if this test fails before it does.
        Self::start_with(s, qmp, hb, &["--max-time", "2m"])
    }

    /// With these extra arguments.
    pub fn start_with(s: &Setup, qmp: &Path, hb: &Path, extra: &[&str]) -> Self {
        let child = migrate_command(s, qmp, hb, extra).spawn().expect("start ferry-host migrate");
        let pid = child.id();
        let (tx, done) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        Self { pid, done }
    }

    /// Waits (at most a minute) for it to exit: (success, report).
    pub fn finish(self) -> (bool, serde_json::Value) {
        self.finish_within(Duration::from_secs(60))
    }

    /// Waits at most `limit`.
    pub fn finish_within(self, limit: Duration) -> (bool, serde_json::Value) {
        let out = self.done.recv_timeout(limit).expect("ferry-host migrate did not give up").expect("wait");
        (out.status.success(), report_of(&out))
    }
}

/// Waits until the source's migration is active and has sent a few MiB.
pub fn wait_until_migrating(src: &mut Qemu) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let info = src.qmp().query_migrate().expect("query-migrate");
        let sent = info.ram.as_ref().map_or(0, |r| r.transferred);
        if info.status() == MigrationStatus::Active && sent > 4 << 20 {
            return;
        }
        assert!(Instant::now() < deadline, "the migration did not get going: {info:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The source VM runs on after a failed migration: QEMU says so, the guest keeps ticking, and
/// QEMU's migration ended failed or cancelled.
pub fn assert_source_runs_on(src: &mut Qemu) {
    assert!(src.qmp().query_status().expect("status").running);
    let last = src.serial().last_tick().expect("ticks");
    src.serial().wait_for_tick(last + 3, BOOT).expect("source guest keeps running");
    let info = src.qmp().query_migrate().expect("query-migrate");
    assert!(matches!(info.status(), MigrationStatus::Failed | MigrationStatus::Cancelled), "{info:?}");
}

/// A `--pre-commit-check` that hands the decision to the test: the command marks that it runs
/// (QEMU completed, both VMs paused, nothing committed), waits for the test's verdict and exits
/// with it. [`CommitGate::check_ram`] gives the verdict from the RAM comparison at cutover.
pub struct CommitGate {
    ready: PathBuf,
    verdict: PathBuf,
}

impl CommitGate {
    /// A gate with its files in the setup's folder.
    pub fn new(s: &Setup) -> Self {
        Self { ready: s.dir.path().join("commit-gate.ready"), verdict: s.dir.path().join("commit-gate.verdict") }
    }

    /// The `--pre-commit-check` command (gives up after 120 s on its own).
    pub fn command(&self) -> String {
        format!(
            "touch '{}'; i=0; while [ ! -e '{v}' ] && [ $i -lt 6000 ]; do sleep 0.02; i=$((i+1)); done; exit $(cat '{v}' 2>/dev/null || echo 9)",
            self.ready.display(),
            v = self.verdict.display()
        )
    }

    /// Waits (at most `limit`) for the check to run, compares both VMs' RAM page by page,
    /// answers (pass only if equal) and returns the comparison.
    pub fn check_ram(&self, src: &Qemu, dst: &Qemu, limit: Duration) -> qemu::RamComparison {
        let deadline = Instant::now() + limit;
        while !self.ready.exists() {
            assert!(Instant::now() < deadline, "the pre-commit check did not run within {limit:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
        let compared = qemu::compare_ram(src, dst);
        let pass = matches!(&compared, Ok(c) if c.is_equal());
        std::fs::write(&self.verdict, if pass { "0" } else { "1" }).expect("verdict");
        compared.expect("comparing RAM at cutover")
    }
}

/// The pre-copy of a migration as the emulated WAN carried it.
#[derive(Clone, Copy, Debug)]
pub struct PrecopyOnWan {
    /// From the source's migration turning active to the source VM stopping.
    pub duration: Duration,
    /// IP bytes the link delivered from site A to site B in that time.
    pub bytes: u64,
}

impl PrecopyOnWan {
    /// Bytes carried over what the link could have carried in the same time.
    pub fn link_share(&self, rate_bps: u64) -> f64 {
        self.bytes as f64 * 8.0 / (rate_bps as f64 * self.duration.as_secs_f64())
    }
}

/// Watches the source QEMU (its test QMP socket, every 20 ms) from the start of its migration to
/// the stop-and-copy and counts what the emulated link delivered A → B meanwhile (userspace
/// WAN backend only: `None` with netem, which has no counters).
pub fn watch_precopy(wan: &Wan, src: &Qemu, limit: Duration) -> Option<PrecopyOnWan> {
    let delivered = || wan.stats().map(|s| s.a_to_b.delivered_bytes);
    let deadline = Instant::now() + limit;
    let (started, at_start) = loop {
        let info = src.qmp().query_migrate().expect("query-migrate");
        if info.status() == MigrationStatus::Active {
            break (Instant::now(), delivered()?);
        }
        assert!(!info.status().is_terminal(), "the migration ended before it was seen active: {info:?}");
        assert!(Instant::now() < deadline, "the migration did not start: {info:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    loop {
        if !src.qmp().query_status().expect("query-status").running {
            return Some(PrecopyOnWan { duration: started.elapsed(), bytes: delivered()? - at_start });
        }
        assert!(Instant::now() < deadline, "the source did not stop within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every number in `report` (recursively) is finite and of a sane magnitude (a downtime of
/// 10^9 ms, say, is not): |x| at most `bound`. serde_json writes NaN and the
/// infinities as `null`, so the fields that must be known are checked by name.
pub fn assert_report_figures_truthful(report: &Value, required: &[&str], bound: f64) {
    fn walk(path: &str, v: &Value, bound: f64) {
        match v {
            Value::Number(n) => {
                let x = n.as_f64().expect("a JSON number");
                assert!(x.is_finite() && x.abs() <= bound, "report field {path} = {x}");
            }
            Value::Array(items) => items.iter().enumerate().for_each(|(i, item)| walk(&format!("{path}[{i}]"), item, bound)),
            Value::Object(fields) => fields.iter().for_each(|(k, item)| walk(&format!("{path}.{k}"), item, bound)),
            _ => {}
        }
    }
    walk("report", report, bound);
    for field in required {
        assert!(report[field].is_number(), "report field {field} is not a number: {}", report[field]);
    }
}
