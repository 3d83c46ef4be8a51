//! How flows end when what carries them ends, with real `ferry-gateway` processes on loopback:
//! a graceful stop (SIGTERM, SIGINT) and the end of the API session that opened a forward.
//! What the TCP ends of a running flow see is a reset, never a clean end of stream, and promptly
//! (well under the 20 s QUIC idle timeout); a flow that finishes within the grace period arrives
//! whole; nothing new is accepted meanwhile.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_api::protocol::{ApiAddress, Request, Response};
use ferry_gateway::tunnel::SHUTDOWN_REASON;
use ferry_testkit::api_client::ApiSession;
use ferry_testkit::gateway_config::GatewayConfig;
use ferry_testkit::loopback::{free_tcp_addr, free_udp_addr};
use ferry_testkit::pki::Pki;
use ferry_testkit::rng::Rng;
use ferry_testkit::sys::{interrupt, terminate, Process};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// What the tests allow for a reset to reach both TCP ends after it is due (QUIC's idle timeout,
/// which a peer that was not told would wait for, is 20 s).
const PROMPT: Duration = Duration::from_secs(5);
/// What a session's end may take to reset the flows of its forwards.
const SESSION_RESET: Duration = Duration::from_secs(2);
/// Paced writes: this much every [`PACE`], so a transfer runs for seconds on loopback.
const PIECE: usize = 64 << 10;
const PACE: Duration = Duration::from_millis(5);

/// A `ferry-gateway run` process whose log (stderr) goes to a file.
struct GatewayProcess {
    process: Process,
    api: ApiAddress,
    log: PathBuf,
}

impl GatewayProcess {
    /// Writes `config` (with `[api]` on a UNIX socket beside it) next to `pki`'s certificates
    /// and starts the binary on it.
    fn start(pki: &Pki, site: &str, config: GatewayConfig) -> Self {
        let socket = pki.path().join(format!("{site}-api.sock"));
        let api = ApiAddress::Unix(socket.clone());
        let file = format!("{site}.toml");
        config.api_socket(&socket).load(pki.path(), &file).unwrap_or_else(|e| panic!("config of {site}: {e}"));
        let log = pki.path().join(format!("{site}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_ferry-gateway"))
            .args(["run", "--config"])
            .arg(pki.path().join(&file))
            .env("RUST_LOG", "info")
            .stderr(std::fs::File::create(&log).unwrap())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        Self { process: Process(child), api, log }
    }

    fn pid(&self) -> u32 {
        self.process.0.id()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn is_running(&mut self) -> bool {
        self.process.0.try_wait().unwrap().is_none()
    }

    /// Waits until the API answers and every peer is connected.
    async fn wait_connected(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut api) = Api::connect(&self.api).await {
                if let Response::Hello(info) = api.call(Request::Hello).await {
                    if info.peers.iter().all(|p| p.path.is_some()) {
                        return;
                    }
                }
            }
            assert!(Instant::now() < deadline, "gateway did not connect to its peers:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits up to `timeout` for the process to exit and asserts it exited with status 0.
    fn assert_exits_cleanly(&mut self, timeout: Duration) {
        let status = self.process.wait_timeout(timeout).unwrap();
        let status = status.unwrap_or_else(|| panic!("still running {timeout:?} later:\n{}", self.log()));
        assert!(status.success(), "exit status {status}:\n{}", self.log());
    }
}

/// Gateways of site-a (forwarding to `target` via site-b on `forward`) and site-b, as processes,
/// each with `extra` TOML; connected.
struct Pair {
    a: GatewayProcess,
    b: GatewayProcess,
    forward: SocketAddr,
    _pki: Pki,
}

async fn pair(target: SocketAddr, extra: &str) -> Pair {
    let pki = Pki::new(&["site-a", "site-b"]);
    let (a_addr, b_addr, forward) = (free_udp_addr(), free_udp_addr(), free_tcp_addr());
    let a = GatewayConfig::new("site-a", a_addr).peer("site-b", b_addr).forward_at(forward, "site-b", target).extra(extra);
    let b = GatewayConfig::new("site-b", b_addr).peer("site-a", a_addr).extra(extra);
    let (a, b) = (GatewayProcess::start(&pki, "site-a", a), GatewayProcess::start(&pki, "site-b", b));
    a.wait_connected().await;
    b.wait_connected().await;
    Pair { a, b, forward, _pki: pki }
}

/// A host-plugin's API session, spoken with the API crate's own messages and framing.
struct Api(ApiSession);

impl Api {
    async fn connect(address: &ApiAddress) -> std::io::Result<Self> {
        Ok(Self(ApiSession::connect(address).await?))
    }

    async fn call(&mut self, request: Request) -> Response {
        self.0.call(request).await
    }

    /// Opens a forward to `connect` behind site-b (for up to 8 connections from here); its
    /// listen address.
    async fn open_forward(&mut self, connect: SocketAddr) -> SocketAddr {
        match self.0.open_forward("site-b", connect, 8).await {
            Response::Forward(info) => info.listen,
            other => panic!("open_forward: {other:?}"),
        }
    }
}

/// How one TCP end of a flow ended: bytes read, then a clean end of stream or an error, and when.
#[derive(Debug)]
struct End {
    bytes: u64,
    digest: blake3::Hash,
    error: Option<std::io::Error>,
    at: Instant,
}

impl End {
    /// Asserts this end was reset (ECONNRESET: not a clean end of stream, nor an error after
    /// one) within `within` of `since`; `logs` (the gateways') go with a failure.
    fn assert_reset(&self, what: &str, since: Instant, within: Duration, logs: &dyn Fn() -> String) {
        let after = self.at.saturating_duration_since(since);
        let kind = self.error.as_ref().map(|e| e.kind());
        println!("{what}: {kind:?} {after:?} after the trigger");
        assert_eq!(kind, Some(std::io::ErrorKind::ConnectionReset), "{what}: ended after {} bytes, {after:?} in; expected a reset\n{}", self.bytes, logs());
        assert!(after < within, "{what}: reset only {after:?} after the trigger\n{}", logs());
    }
}

/// Reads until the end of stream or an error.
async fn read_to_end(r: &mut OwnedReadHalf) -> End {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut bytes = 0u64;
    let error = loop {
        match r.read(&mut buf).await {
            Ok(0) => break None,
            Ok(n) => {
                hasher.update(&buf[..n]);
                bytes += n as u64;
            }
            Err(e) => break Some(e),
        }
    };
    End { bytes, digest: hasher.finalize(), error, at: Instant::now() }
}

/// A flow through `forward` to `target` that runs until something ends it: the client writes
/// pseudo-random bytes at a steady pace and never half-closes; the target only reads. Returns
/// once the target has read something (so both gateways carry the flow).
struct Endless {
    client: JoinHandle<End>,
    server: JoinHandle<End>,
}

async fn endless_flow(forward: SocketAddr, target: &TcpListener) -> Endless {
    let (mut r, mut w) = TcpStream::connect(forward).await.unwrap().into_split();
    let mut writer = tokio::spawn(async move {
        let mut rng = Rng::new(1);
        let mut piece = vec![0u8; PIECE];
        loop {
            rng.fill(&mut piece);
            if let Err(e) = w.write_all(&piece).await {
                return (e, Instant::now());
            }
            tokio::time::sleep(PACE).await;
        }
    });
    let client = tokio::spawn(async move {
        let mut end = read_to_end(&mut r).await;
        // The kernel reports a reset to one call only: the writer's, if it came first (after a
        // clean end of stream, writes fail with EPIPE, never ECONNRESET).
        if end.error.is_none() {
            if let Ok(Ok((error, at))) = tokio::time::timeout(Duration::from_secs(1), &mut writer).await {
                (end.error, end.at) = (Some(error), at);
            }
        }
        writer.abort();
        end
    });
    let (tcp, _) = tokio::time::timeout(Duration::from_secs(10), target.accept()).await.expect("the target is dialed").unwrap();
    let (mut r, w) = tcp.into_split();
    let mut first = [0u8; 1];
    r.read_exact(&mut first).await.unwrap();
    let server = tokio::spawn(async move {
        // Dropping the write half would half-close the return path.
        let _keep_open = w;
        read_to_end(&mut r).await
    });
    Endless { client, server }
}

impl Endless {
    /// Asserts both TCP ends were reset within `within` of `since`.
    async fn assert_reset(self, since: Instant, within: Duration, logs: &dyn Fn() -> String) {
        let timeout = within + Duration::from_secs(20);
        for (what, end) in [("client", self.client), ("target", self.server)] {
            let end = tokio::time::timeout(timeout, end).await.unwrap_or_else(|_| panic!("{what} still running after {timeout:?}:\n{}", logs()));
            end.unwrap().assert_reset(what, since, within, logs);
        }
    }

    /// Asserts neither end has ended.
    fn assert_running(&self) {
        assert!(!self.client.is_finished() && !self.server.is_finished(), "the flow ended");
    }
}

/// A connection to `addr` is refused: nothing listens.
async fn assert_refused(addr: SocketAddr, what: &str) {
    let result = TcpStream::connect(addr).await;
    assert!(
        matches!(&result, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused),
        "{what} still accepts connections: {result:?}"
    );
}

#[derive(Clone, Copy, Debug)]
enum Side {
    Ingress,
    Egress,
}

/// SIGTERM to one gateway mid-transfer, with a 1 s grace: both TCP ends of the flow see a reset
/// soon after the grace period (not a clean end, not after the peer's 20 s idle timeout), the
/// process exits 0, and the peer logs why.
async fn sigterm_mid_transfer(side: Side) {
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut pair = pair(target.local_addr().unwrap(), "[shutdown]\ngrace = \"1s\"\n").await;
    let flow = endless_flow(pair.forward, &target).await;
    let (stopping, peer) = match side {
        Side::Ingress => (&mut pair.a, &pair.b),
        Side::Egress => (&mut pair.b, &pair.a),
    };
    let signalled = Instant::now();
    terminate(stopping.pid()).unwrap();
    let grace = Duration::from_secs(1);
    flow.assert_reset(signalled, grace + PROMPT, &|| format!("{}\n{}", stopping.log(), peer.log())).await;
    stopping.assert_exits_cleanly(grace + PROMPT);
    assert!(stopping.log().contains("shutdown_grace_s=1"), "the grace period is logged at start-up:\n{}", stopping.log());
    let peer_log = peer.log();
    let reason = format!("closed by peer: {SHUTDOWN_REASON} (code 3)");
    assert!(peer_log.contains(&reason), "{side:?}: the peer did not log the reason `{reason}`:\n{peer_log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_the_ingress_resets_both_ends_and_exits_0() {
    sigterm_mid_transfer(Side::Ingress).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_the_egress_resets_both_ends_and_exits_0() {
    sigterm_mid_transfer(Side::Egress).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_skips_the_rest_of_the_grace_period() {
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut pair = pair(target.local_addr().unwrap(), "[shutdown]\ngrace = \"60s\"\n").await;
    let flow = endless_flow(pair.forward, &target).await;
    terminate(pair.a.pid()).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(pair.a.is_running(), "the gateway must wait for its flows:\n{}", pair.a.log());
    flow.assert_running();
    let again = Instant::now();
    interrupt(pair.a.pid()).unwrap();
    flow.assert_reset(again, PROMPT, &|| format!("{}\n{}", pair.a.log(), pair.b.log())).await;
    pair.a.assert_exits_cleanly(PROMPT);
}

/// SIGTERM to one gateway while a transfer of known bytes is half done: the transfer goes on and
/// arrives byte-identical; meanwhile new connections are not carried (the ingress's forward
/// refuses them; a stopping egress refuses the flow, so the client is reset and the target never
/// dialed), its API takes no new sessions and an open session no new forwards; the gateway
/// exits 0 once the transfer is done, long before its grace period ends.
async fn transfer_finishing_within_the_grace_period(side: Side) {
    const HALF: usize = 8 << 20;
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut pair = pair(target.local_addr().unwrap(), "[shutdown]\ngrace = \"30s\"\n").await;
    let payload = Rng::new(7).bytes(2 * HALF);

    let (mut client_r, mut client_w) = TcpStream::connect(pair.forward).await.unwrap().into_split();
    client_w.write_all(&payload[..HALF]).await.unwrap();
    let (tcp, _) = tokio::time::timeout(Duration::from_secs(10), target.accept()).await.expect("the target is dialed").unwrap();
    let (mut server_r, mut server_w) = tcp.into_split();
    let mut first_half = vec![0u8; HALF];
    server_r.read_exact(&mut first_half).await.unwrap();
    let server = tokio::spawn(async move {
        let end = read_to_end(&mut server_r).await;
        server_w.shutdown().await.unwrap();
        end
    });

    let forward = pair.forward;
    let stopping = match side {
        Side::Ingress => &mut pair.a,
        Side::Egress => &mut pair.b,
    };
    let mut session = Api::connect(&stopping.api).await.unwrap();
    let signalled = Instant::now();
    terminate(stopping.pid()).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    match side {
        Side::Ingress => assert_refused(forward, "the stopping ingress's forward").await,
        Side::Egress => {
            // The ingress still accepts; the egress refuses the flow.
            let (mut r, _w) = TcpStream::connect(forward).await.unwrap().into_split();
            let end = tokio::time::timeout(PROMPT, read_to_end(&mut r)).await.expect("the refused flow's client is reset");
            end.assert_reset("client of a flow opened after the egress's SIGTERM", signalled, PROMPT, &|| stopping.log());
            let dialed = tokio::time::timeout(Duration::from_millis(300), target.accept()).await;
            assert!(dialed.is_err(), "the stopping egress dialed a new flow's target");
        }
    }
    assert!(stopping.is_running(), "the gateway must wait for the running transfer:\n{}", stopping.log());
    let refused = ApiSession::connect(&stopping.api).await;
    assert!(refused.is_err(), "the stopping gateway's API still accepts sessions");
    let peer = match side {
        Side::Ingress => "site-b",
        Side::Egress => "site-a",
    };
    let answer = session.0.open_forward(peer, forward, 1).await;
    assert!(matches!(&answer, Response::Error(e) if e.contains("stopping")), "a new forward while stopping: {answer:?}");

    client_w.write_all(&payload[HALF..]).await.unwrap();
    client_w.shutdown().await.unwrap();
    let rest = server.await.unwrap();
    assert!(rest.error.is_none(), "the transfer failed: {rest:?}\n{}", stopping.log());
    assert_eq!(HALF as u64 + rest.bytes, payload.len() as u64, "bytes delivered");
    assert_eq!(blake3::hash(&first_half), blake3::hash(&payload[..HALF]), "first half differs");
    assert_eq!(rest.digest, blake3::hash(&payload[HALF..]), "second half differs");
    let client_end = read_to_end(&mut client_r).await;
    assert!(client_end.error.is_none() && client_end.bytes == 0, "the client's return path: {client_end:?}");
    stopping.assert_exits_cleanly(PROMPT);
    assert!(signalled.elapsed() < Duration::from_secs(30), "the gateway waited out its grace period");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_through_a_stopping_ingress_completes_and_new_connections_are_refused() {
    transfer_finishing_within_the_grace_period(Side::Ingress).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_through_a_stopping_egress_completes_and_new_flows_are_refused() {
    transfer_finishing_within_the_grace_period(Side::Egress).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_of_an_api_forward_are_reset_when_its_session_ends() {
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let pair = pair(target.local_addr().unwrap(), "").await;
    let mut api = Api::connect(&pair.a.api).await.unwrap();
    let listen = api.open_forward(target.local_addr().unwrap()).await;
    let flow = endless_flow(listen, &target).await;
    // The host-plugin dies: its API connection closes.
    let ended = Instant::now();
    drop(api);
    flow.assert_reset(ended, SESSION_RESET, &|| format!("{}\n{}", pair.a.log(), pair.b.log())).await;
    assert_refused(listen, "the forward of an ended API session").await;
    let log = pair.a.log();
    assert!(log.contains("api session ended: forward closed, resetting its connections"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_forwards_are_unaffected_by_an_api_session_ending() {
    const HALF: usize = 4 << 20;
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let pair = pair(target.local_addr().unwrap(), "").await;
    let payload = Rng::new(9).bytes(2 * HALF);

    // A transfer through the configured forward, half done...
    let (mut client_r, mut client_w) = TcpStream::connect(pair.forward).await.unwrap().into_split();
    client_w.write_all(&payload[..HALF]).await.unwrap();
    let (tcp, _) = tokio::time::timeout(Duration::from_secs(10), target.accept()).await.expect("the target is dialed").unwrap();
    let (mut server_r, mut server_w) = tcp.into_split();
    let server = tokio::spawn(async move {
        let end = read_to_end(&mut server_r).await;
        server_w.shutdown().await.unwrap();
        end
    });

    // ...while an API session with a flow of its own ends.
    let mut api = Api::connect(&pair.a.api).await.unwrap();
    let listen = api.open_forward(target.local_addr().unwrap()).await;
    let api_flow = endless_flow(listen, &target).await;
    let ended = Instant::now();
    drop(api);
    api_flow.assert_reset(ended, SESSION_RESET, &|| pair.a.log()).await;

    client_w.write_all(&payload[HALF..]).await.unwrap();
    client_w.shutdown().await.unwrap();
    let end = server.await.unwrap();
    assert!(end.error.is_none(), "the configured forward's transfer failed: {end:?}\n{}", pair.a.log());
    assert_eq!((end.bytes, end.digest), (payload.len() as u64, blake3::hash(&payload)), "bytes differ");
    let client_end = read_to_end(&mut client_r).await;
    assert!(client_end.error.is_none(), "{client_end:?}");

    // The configured forward still carries new connections.
    let (mut r, mut w) = TcpStream::connect(pair.forward).await.unwrap().into_split();
    w.write_all(b"again").await.unwrap();
    w.shutdown().await.unwrap();
    let (tcp, _) = tokio::time::timeout(Duration::from_secs(10), target.accept()).await.expect("the target is dialed").unwrap();
    let (mut sr, mut sw) = tcp.into_split();
    let mut got = Vec::new();
    sr.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"again");
    sw.shutdown().await.unwrap();
    assert!(read_to_end(&mut r).await.error.is_none());
}
