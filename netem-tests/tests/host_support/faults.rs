//! What the fault tests need beyond [`super::Setup`]: gateways as processes that can be killed,
//! stopped and restarted, and a watch on both QEMUs' run states for the whole test.

use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_api::protocol::{ApiAddress, Request, Response};
use ferry_netem::gateway_pair::PairLink;
use ferry_netem::Wan;
use ferry_qmp::blocking::BlockingQmp;
use ferry_qmp::QmpConfig;
use ferry_testkit::gateway_config::GatewayConfig;
use ferry_testkit::pki::Pki;
use ferry_testkit::sys::{send_signal, workspace_bin};

use super::Process;

/// The gateways' `[shutdown] grace`.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
const QUIC_PORT: u16 = 4433;

/// The two sites' `ferry-gateway` processes.
pub struct GatewayProcesses {
    /// Site A's API (a UNIX socket).
    pub api: ApiAddress,
    /// Each site's API socket.
    api_sockets: [PathBuf; 2],
    a: Option<Process>,
    b: Option<Process>,
    configs: [PathBuf; 2],
    logs: PathBuf,
    netns: [String; 2],
    _pki: Pki,
}

/// Which gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Site {
    /// Site A: the source's, the ingress of the migration.
    A,
    /// Site B: the destination's, the egress.
    B,
}

impl GatewayProcesses {
    /// Starts both gateways (API on a UNIX socket in `dir` for each site) and waits for the
    /// tunnel.
    pub fn start(wan: &Wan, link: &PairLink, dir: &Path) -> Self {
        let pki = Pki::new(&["site-a", "site-b"]);
        let api_sockets = [dir.join("gateway-a.sock"), dir.join("gateway-b.sock")];
        let config = |me: &ferry_netem::Site, name: &str, peer: &ferry_netem::Site, peer_name: &str, api: &Path| {
            let text = GatewayConfig::new(name, SocketAddr::from((me.addr(), QUIC_PORT)))
                .link(&link.bandwidth, &link.rtt)
                .peer(peer_name, SocketAddr::from((peer.addr(), QUIC_PORT)))
                .api_socket(api)
                .extra(&format!("[shutdown]\ngrace = \"{}s\"\n", SHUTDOWN_GRACE.as_secs()))
                .to_toml();
            let path = pki.path().join(format!("{name}.toml"));
            std::fs::write(&path, text).expect("gateway config");
            path
        };
        let configs = [
            config(wan.site_a(), "site-a", wan.site_b(), "site-b", &api_sockets[0]),
            config(wan.site_b(), "site-b", wan.site_a(), "site-a", &api_sockets[1]),
        ];
        let mut g = Self {
            api: ApiAddress::Unix(api_sockets[0].clone()),
            api_sockets,
            a: None,
            b: None,
            configs,
            logs: dir.to_owned(),
            netns: [wan.site_a().netns().to_owned(), wan.site_b().netns().to_owned()],
            _pki: pki,
        };
        g.start_site(Site::B);
        g.start_site(Site::A);
        g
    }

    /// Starts (again) the gateway of `site` and waits until its API sees a live tunnel.
    pub fn start_site(&mut self, site: Site) {
        let i = site as usize;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.logs.join(format!("gateway-{}.log", ["a", "b"][i])))
            .expect("gateway log");
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", &self.netns[i]])
            .arg(workspace_bin("ferry-gateway"))
            .arg("run")
            .arg("--config")
            .arg(&self.configs[i])
            .env("RUST_LOG", "info,ferry_gateway=debug")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start ferry-gateway");
        *self.slot(site) = Some(Process(child));
        let deadline = Instant::now() + Duration::from_secs(40);
        let peer = if site == Site::A { "site-b" } else { "site-a" };
        loop {
            // The other side may be down (a restart of B waits for A's reconnect, and the other
            // way round): a listening API is enough then.
            match connected(&self.api_sockets[i], peer) {
                Some(true) => return,
                Some(false) if self.slot(other(site)).is_none() => return,
                _ => {}
            }
            assert!(Instant::now() < deadline, "gateway {site:?} not ready within 40 s");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The gateway process of `site`'s pid (`ip netns exec` execs, so it is ferry-gateway's).
    pub fn pid(&self, site: Site) -> Option<u32> {
        [&self.a, &self.b][site as usize].as_ref().map(|p| p.0.id())
    }

    /// SIGKILLs the gateway of `site` (and reaps it).
    pub fn kill(&mut self, site: Site) {
        *self.slot(site) = None;
    }

    /// Sends `signal` to the gateway of `site`.
    pub fn signal(&self, site: Site, signal: libc::c_int) {
        if let Some(pid) = self.pid(site) {
            send_signal(pid, signal).expect("signal the gateway");
        }
    }

    /// Waits (at most `limit`) for the gateway of `site` to exit; its status.
    pub fn wait_exit(&mut self, site: Site, limit: Duration) -> Option<std::process::ExitStatus> {
        let slot = self.slot(site);
        let status = slot.as_mut()?.wait_timeout(limit).expect("wait for the gateway")?;
        *slot = None;
        Some(status)
    }

    fn slot(&mut self, site: Site) -> &mut Option<Process> {
        match site {
            Site::A => &mut self.a,
            Site::B => &mut self.b,
        }
    }
}

impl Drop for GatewayProcesses {
    /// A failing test shows what the gateways logged.
    fn drop(&mut self) {
        if std::thread::panicking() {
            for site in ["a", "b"] {
                let log = std::fs::read_to_string(self.logs.join(format!("gateway-{site}.log"))).unwrap_or_default();
                let tail: Vec<&str> = log.lines().collect();
                eprintln!("--- gateway {site} log (last 40 lines) ---\n{}", tail[tail.len().saturating_sub(40)..].join("\n"));
            }
        }
    }
}

fn other(site: Site) -> Site {
    match site {
        Site::A => Site::B,
        Site::B => Site::A,
    }
}

/// Asks the API on `socket` whether `peer` has a live path; `None` if the API does not answer.
fn connected(socket: &Path, peer: &str) -> Option<bool> {
    use std::io::{BufRead, BufReader, Write};
    let mut tcp = UnixStream::connect(socket).ok()?;
    tcp.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut line = serde_json::to_string(&Request::Hello).ok()?;
    line.push('\n');
    tcp.write_all(line.as_bytes()).ok()?;
    let mut answer = String::new();
    BufReader::new(tcp).read_line(&mut answer).ok()?;
    match serde_json::from_str::<Response>(&answer).ok()? {
        Response::Hello(info) => Some(info.peers.iter().any(|p| p.site == peer && p.path.is_some())),
        _ => Some(false),
    }
}

/// One QEMU's run state as the watch saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seen {
    /// `query-status` answered: running or not, and QEMU's spelling.
    State { running: bool, status: String },
    /// No answer in time (a stopped process, a hung QEMU).
    Unresponsive,
    /// The socket is gone or refuses: QEMU exited.
    Gone,
}

impl Seen {
    fn running(&self) -> bool {
        matches!(self, Seen::State { running: true, .. })
    }
}

/// Polls both QEMUs' run states every 50 ms on their own monitor sockets, for the whole test,
/// and remembers whether both were ever seen running at once.
pub struct RunWatch {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<WatchResult>>,
}

/// What a [`RunWatch`] saw.
#[derive(Debug)]
pub struct WatchResult {
    /// Times both were seen running in one round (must be 0).
    pub both_running: usize,
    /// Rounds polled.
    pub rounds: usize,
    /// The last state of each.
    pub last: [Seen; 2],
}

impl RunWatch {
    /// Watches the QEMUs whose watch monitors are at `source` and `destination`.
    pub fn start(source: PathBuf, destination: PathBuf) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let paths = [source, destination];
            let mut sessions: [Option<BlockingQmp>; 2] = [None, None];
            let mut result = WatchResult { both_running: 0, rounds: 0, last: [Seen::Gone, Seen::Gone] };
            while !flag.load(Ordering::Relaxed) {
                for i in 0..2 {
                    result.last[i] = poll(&paths[i], &mut sessions[i]);
                }
                if result.last.iter().all(Seen::running) {
                    result.both_running += 1;
                    eprintln!("RunWatch: BOTH RUNNING: {:?}", result.last);
                }
                result.rounds += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            result
        });
        Self { stop, thread: Some(thread) }
    }

    /// Stops watching; panics if both QEMUs were ever running at once.
    pub fn finish(mut self) -> WatchResult {
        self.stop.store(true, Ordering::Relaxed);
        let result = self.thread.take().expect("watch thread").join().expect("watch thread panicked");
        assert_eq!(result.both_running, 0, "the VM ran at both sites at once ({} of {} rounds)", result.both_running, result.rounds);
        assert!(result.rounds > 0);
        result
    }
}

impl Drop for RunWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn poll(path: &Path, session: &mut Option<BlockingQmp>) -> Seen {
    if session.is_none() {
        let config = QmpConfig { connect_timeout: Duration::from_millis(300), command_timeout: Duration::from_millis(500), ..QmpConfig::default() };
        match BlockingQmp::connect_with(path, config) {
            Ok(q) => *session = Some(q),
            Err(e) if e.is_connection_lost() || !path.exists() => return Seen::Gone,
            Err(_) => return Seen::Unresponsive,
        }
    }
    let Some(qmp) = session.as_ref() else { return Seen::Gone };
    match qmp.query_status() {
        Ok(s) => Seen::State { running: s.running, status: s.status.as_str().to_owned() },
        Err(e) if e.is_connection_lost() => {
            *session = None;
            Seen::Gone
        }
        Err(_) => Seen::Unresponsive,
    }
}
