//! The host-plugin API of a real gateway pair on loopback, spoken as raw JSON lines (the wire
//! format host-plugins depend on) and with `ferry-api`'s messages: forwards opened on demand
//! carry bytes intact, their counters add up, bad requests get answers, a session's forwards
//! close with it; and what the API, the forwards and the egress refuse: sessions without the
//! token (TCP), sessions past `max_sessions`, clients a forward was not opened for, targets
//! outside `allow_connect`, and flows idle past `idle_timeout`.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use ferry_api::protocol::{ApiAddress, Request, Response, Token};
use ferry_gateway::Gateway;
use ferry_testkit::api_client::{write_token, ApiSession};
use ferry_testkit::gateway_config::GatewayConfig;
use ferry_testkit::loopback::{free_tcp_addr, free_udp_addr, receive_all, send_random};
use ferry_testkit::pki::Pki;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Site A (API on a UNIX socket in the PKI folder, `a_extra` TOML) and site B (its peer
/// `allow_connect` as given), connected.
async fn gateways_with(pki: &Pki, a_extra: &str, b_allow: &[&str], b_extra: &str) -> (Gateway, Gateway) {
    let (a_addr, b_addr) = (free_udp_addr(), free_udp_addr());
    let socket = pki.path().join(format!("api-{}.sock", a_addr.port()));
    let a = GatewayConfig::new("site-a", a_addr).peer("site-b", b_addr).api_socket(&socket).extra(a_extra);
    let b = GatewayConfig::new("site-b", b_addr).peer_allowing("site-a", a_addr, b_allow).extra(b_extra);
    let a = Gateway::start(a.load(pki.path(), "site-a.toml").unwrap()).await.unwrap();
    let b = Gateway::start(b.load(pki.path(), "site-b.toml").unwrap()).await.unwrap();
    assert!(a.wait_connected("site-b", Duration::from_secs(10)).await);
    (a, b)
}

async fn gateways(pki: &Pki) -> (Gateway, Gateway) {
    gateways_with(pki, "", ferry_testkit::gateway_config::ALLOW_ANY, "").await
}

async fn session(gateway: &Gateway) -> ApiSession {
    ApiSession::connect(gateway.api_address().expect("api configured")).await.unwrap()
}

async fn call(api: &mut ApiSession, request: Value) -> Value {
    api.raw(&request.to_string()).await.expect("an answer")
}

/// Polls the forward's stats until `done` holds them (at most 15 s).
async fn stats_until(api: &mut ApiSession, id: u64, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let stats = call(api, json!({"op": "forward_stats", "forward": id})).await;
        if done(&stats["forward_stats"]) {
            return stats["forward_stats"].clone();
        }
        assert!(Instant::now() < deadline, "forward stats did not settle: {stats}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn open(connect: SocketAddr, client: &str, connections: u32) -> Value {
    json!({"op": "open_forward", "peer": "site-b", "connect": connect, "codec": "off", "client": client, "connections": connections})
}

/// The forward's id and listen address.
fn opened(answer: &Value) -> (u64, SocketAddr) {
    let id = answer["forward"]["id"].as_u64().unwrap_or_else(|| panic!("{answer}"));
    (id, answer["forward"]["listen"].as_str().unwrap().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_on_demand_carry_bytes_and_count_them() {
    let pki = Pki::new(&["site-a", "site-b"]);
    let (a, _b) = gateways(&pki).await;
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target_addr = target.local_addr().unwrap();
    let receiver = tokio::spawn(async move {
        let (mut tcp, _) = target.accept().await.unwrap();
        let got = receive_all(&mut tcp).await.unwrap();
        tcp.shutdown().await.unwrap();
        got
    });

    let mut api = session(&a).await;
    let ApiAddress::Unix(socket) = a.api_address().unwrap() else { panic!("the default is a UNIX socket") };
    assert_eq!(std::fs::metadata(socket).unwrap().permissions().mode() & 0o777, 0o660, "[api] mode by default");
    let hello = call(&mut api, json!({"op": "hello"})).await;
    assert_eq!(hello["hello"]["site"], "site-a", "{hello}");
    assert_eq!(hello["hello"]["peers"][0]["site"], "site-b");
    assert_eq!(hello["hello"]["forward_ip"], "127.0.0.1", "{hello}");
    assert!(hello["hello"]["peers"][0]["path"]["rtt_ms"].as_f64().is_some(), "{hello}");
    // At least 2 lanes of 1 MiB and a reorder buffer of as much again.
    assert!(hello["hello"]["flow_window_bytes"].as_u64().unwrap_or(0) >= 4 << 20, "{hello}");

    let (id, listen) = opened(&call(&mut api, open(target_addr, "127.0.0.1", 1)).await);
    const LEN: u64 = 8 << 20;
    let mut tcp = TcpStream::connect(listen).await.unwrap();
    let sent = send_random(&mut tcp, 7, LEN).await;
    let (n, got) = receiver.await.unwrap();
    assert_eq!((n, got), (LEN, sent), "bytes through the API forward differ");

    // Counters settle once the flow ends: everything read, sent and acknowledged.
    let s = stats_until(&mut api, id, |s| s["completed"] == 1 && s["open"] == 0).await;
    assert_eq!(s["tcp_in"], LEN, "{s}");
    assert_eq!(s["wire_sent"], LEN, "without the codec the wire carries the TCP bytes: {s}");
    assert_eq!(s["wire_acked"], LEN, "{s}");
    assert!(s["wan_out"].as_u64().unwrap() > LEN, "framing included: {s}");
    assert_eq!((s["failed"].clone(), s["refused"].clone()), (json!(0), json!(0)), "{s}");
    assert!(s["path"]["cwnd"].as_u64().unwrap() > 0);
    // The gateway removes its socket when it stops.
    let ApiAddress::Unix(socket) = a.api_address().unwrap().clone() else { unreachable!() };
    assert!(socket.exists());
    drop(api);
    drop(a);
    assert!(!socket.exists(), "socket file left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_answered_and_forwards_die_with_their_session() {
    let pki = Pki::new(&["site-a", "site-b"]);
    let (a, _b) = gateways(&pki).await;
    let mut api = session(&a).await;

    let err = call(&mut api, json!({"op": "open_forward", "peer": "site-z", "connect": "127.0.0.1:9", "codec": "auto", "client": "127.0.0.1", "connections": 1})).await;
    assert!(err["error"].as_str().unwrap().contains("unknown peer site `site-z`"), "{err}");
    let err = call(&mut api, json!({"op": "open_forward", "peer": "site-b", "connect": "127.0.0.1:9", "codec": "auto"})).await;
    assert!(err["error"].as_str().unwrap().contains("client"), "a forward must name its client: {err}");
    let err = call(&mut api, open("127.0.0.1:9".parse().unwrap(), "127.0.0.1", 0)).await;
    assert!(err["error"].as_str().unwrap().contains("connections must be 1 to 256"), "{err}");
    let err = api.raw("{this is not json").await.unwrap();
    assert!(err["error"].as_str().unwrap().contains("malformed"), "{err}");
    let err = call(&mut api, json!({"op": "forward_stats", "forward": 12345})).await;
    assert!(err["error"].as_str().unwrap().contains("no forward 12345"), "{err}");
    // The session survived all of that.
    assert_eq!(call(&mut api, json!({"op": "hello"})).await["hello"]["site"], "site-a");

    let (_, listen) = opened(&call(&mut api, open("127.0.0.1:9".parse().unwrap(), "127.0.0.1", 1)).await);
    // The forward carries a probe to a closed port, so the probe may already be reset by the
    // time `connect` returns: only "refused" means nothing listens.
    let listening = |r: &std::io::Result<TcpStream>| !matches!(r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused);
    let probe = TcpStream::connect(listen).await;
    assert!(listening(&probe), "forward listens while its session lives: {probe:?}");
    drop(api);
    let deadline = Instant::now() + Duration::from_secs(5);
    while listening(&TcpStream::connect(listen).await) {
        assert!(Instant::now() < deadline, "forward still listening after its session closed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_api_refuses_sessions_without_the_token() {
    let pki = Pki::new(&["site-a", "site-b"]);
    let (token_file, token) = write_token(pki.path());
    let (a_addr, b_addr) = (free_udp_addr(), free_udp_addr());
    let a = GatewayConfig::new("site-a", a_addr).peer("site-b", b_addr).api_tcp("127.0.0.1:0".parse().unwrap(), &token_file);
    let a = Gateway::start(a.load(pki.path(), "site-a.toml").unwrap()).await.unwrap();
    let address = a.api_address().unwrap().clone();

    // No auth first: refused and closed.
    let mut api = ApiSession::connect(&address).await.unwrap();
    let err = call(&mut api, json!({"op": "hello"})).await;
    assert!(err["error"].as_str().unwrap().contains("authentication required"), "{err}");
    assert_eq!(api.recv_raw().await, None, "the gateway closes an unauthenticated session");
    // Garbage first, or a forward: the same.
    let mut api = ApiSession::connect(&address).await.unwrap();
    let err = call(&mut api, open("127.0.0.1:9".parse().unwrap(), "127.0.0.1", 1)).await;
    assert!(err["error"].as_str().unwrap().contains("authentication required"), "{err}");
    assert_eq!(api.recv_raw().await, None);
    // A wrong token, and a token that is a prefix of the right one.
    for wrong in ["not-the-token-at-all", &token.0[..token.0.len() - 1]] {
        let mut api = ApiSession::connect(&address).await.unwrap();
        let err = call(&mut api, json!({"op": "auth", "token": wrong})).await;
        assert!(err["error"].as_str().unwrap().contains("wrong token"), "{err}");
        assert_eq!(api.recv_raw().await, None);
    }
    // The token: in.
    let mut api = ApiSession::open(&address, Some(&token)).await.unwrap();
    let Response::Hello(info) = api.call(Request::Hello).await else { panic!("hello") };
    assert_eq!((info.site.as_str(), info.forward_ip), ("site-a", "127.0.0.1".parse().unwrap()));
    assert_eq!(api.call(Request::Auth { token: Token("again".into()) }).await, Response::Authenticated, "already in");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_beyond_max_sessions_are_refused() {
    let pki = Pki::new(&["site-a", "site-b"]);
    let (a, _b) = gateways_with(&pki, "max_sessions = 2\n", ferry_testkit::gateway_config::ALLOW_ANY, "").await;
    let mut first = session(&a).await;
    let mut second = session(&a).await;
    for api in [&mut first, &mut second] {
        assert_eq!(call(api, json!({"op": "hello"})).await["hello"]["site"], "site-a");
    }
    let mut third = session(&a).await;
    let answer = tokio::time::timeout(Duration::from_secs(5), third.recv_raw()).await;
    let err = answer.expect("the gateway answers a session beyond the cap at once").expect("an answer before the close");
    assert!(err["error"].as_str().unwrap().contains("too many api sessions (api.max_sessions = 2)"), "{err}");
    assert_eq!(third.recv_raw().await, None);
    // A slot frees when a session ends.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut api = session(&a).await;
        if api.raw(r#"{"op":"hello"}"#).await.is_some_and(|answer| answer.get("hello").is_some()) {
            break;
        }
        assert!(Instant::now() < deadline, "no session slot freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether the gateway closed `tcp` without carrying it (the target saw nothing): a read ends
/// at once with end of stream or a reset.
async fn assert_closed_at_once(tcp: &mut TcpStream) {
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut byte)).await.expect("closed at once");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_refuses_other_clients_and_extra_connections() {
    let pki = Pki::new(&["site-a", "site-b"]);
    let (a, _b) = gateways(&pki).await;
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target_addr = target.local_addr().unwrap();
    let mut api = session(&a).await;

    // Opened for a client at 127.0.0.2: a connection from 127.0.0.1 is refused.
    let (id, listen) = opened(&call(&mut api, open(target_addr, "127.0.0.2", 1)).await);
    let mut intruder = TcpStream::connect(listen).await.unwrap();
    assert_closed_at_once(&mut intruder).await;
    let s = stats_until(&mut api, id, |s| s["refused"] == 1).await;
    assert_eq!((s["open"].clone(), s["completed"].clone(), s["failed"].clone()), (json!(0), json!(0), json!(0)), "{s}");

    // Opened for one connection from 127.0.0.1: the first is carried, a second is refused.
    let (id, listen) = opened(&call(&mut api, open(target_addr, "127.0.0.1", 1)).await);
    let mut expected = TcpStream::connect(listen).await.unwrap();
    let (mut carried, _) = tokio::time::timeout(Duration::from_secs(5), target.accept()).await.unwrap().unwrap();
    let mut second = TcpStream::connect(listen).await.unwrap();
    assert_closed_at_once(&mut second).await;
    let s = stats_until(&mut api, id, |s| s["refused"] == 1).await;
    assert_eq!(s["open"], 1, "{s}");
    expected.write_all(b"the real client").await.unwrap();
    let mut got = [0u8; 15];
    carried.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"the real client");
    assert!(tokio::time::timeout(Duration::from_millis(300), target.accept()).await.is_err(), "a refused connection reached the target");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_forward_refuses_clients_outside_allow_from() {
    let pki = Pki::new(&["site-a", "site-b"]);
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let forward = free_tcp_addr();
    let extra = format!(
        "[[forward]]\nlisten = \"{forward}\"\npeer = \"site-b\"\nconnect = \"{}\"\nallow_from = [\"10.0.0.0/8\"]\n",
        target.local_addr().unwrap()
    );
    let (a_addr, b_addr) = (free_udp_addr(), free_udp_addr());
    let a = GatewayConfig::new("site-a", a_addr).peer("site-b", b_addr).extra(&extra);
    let b = GatewayConfig::new("site-b", b_addr).peer("site-a", a_addr);
    let a = Gateway::start(a.load(pki.path(), "static-a.toml").unwrap()).await.unwrap();
    let _b = Gateway::start(b.load(pki.path(), "static-b.toml").unwrap()).await.unwrap();
    assert!(a.wait_connected("site-b", Duration::from_secs(10)).await);
    let mut from_loopback = TcpStream::connect(forward).await.unwrap();
    assert_closed_at_once(&mut from_loopback).await;
    assert!(tokio::time::timeout(Duration::from_millis(300), target.accept()).await.is_err(), "a refused connection reached the target");
}

/// Opens a forward to `target` at `a`, sends a line through it and returns why the egress `b`
/// refused the flow (its flow log's record: the ingress may see the stream stopped before the
/// reason arrives).
async fn refusal_of_flow_to(a: &Gateway, b: &Gateway, target: SocketAddr) -> String {
    let mut api = session(a).await;
    let (_, listen) = opened(&call(&mut api, open(target, "127.0.0.1", 1)).await);
    // The refusal may reset the connection before `connect` returns.
    if let Ok(mut tcp) = TcpStream::connect(listen).await {
        let _ = tcp.write_all(b"hello\n").await;
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(error) = b.flow_log().records().into_iter().find_map(|r| r.error) {
            return error;
        }
        assert!(Instant::now() < deadline, "the egress logged no failed flow");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_is_denied_by_default_and_never_reaches_the_gateways_own_ports() {
    let pki = Pki::new(&["site-a", "site-b"]);
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target_addr = target.local_addr().unwrap();

    // Site B lists no allow_connect for site A: nothing may be dialed.
    let (a, b) = gateways_with(&pki, "", &[], "").await;
    let error = refusal_of_flow_to(&a, &b, target_addr).await;
    assert!(error.contains("no allow_connect list"), "{error}");
    drop((a, b));

    // Site B allows the target's port only: the target is reached, another port is not.
    let allow = format!("127.0.0.1/32:{}", target_addr.port());
    let (a, b) = gateways_with(&pki, "", &[&allow], "").await;
    let error = refusal_of_flow_to(&a, &b, "127.0.0.1:9".parse().unwrap()).await;
    assert!(error.contains("not in peer `site-a`'s allow_connect list"), "{error}");
    let mut api = session(&a).await;
    let (_, listen) = opened(&call(&mut api, open(target_addr, "127.0.0.1", 1)).await);
    let _client = TcpStream::connect(listen).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), target.accept()).await.expect("the allowed target is dialed").unwrap();

    // Allowed everything, site B still never dials its own QUIC port.
    let own = b.quic_addr().unwrap();
    drop((api, a, b));
    let (a, b) = gateways_with(&pki, "", ferry_testkit::gateway_config::ALLOW_ANY, "").await;
    let own_now = b.quic_addr().unwrap();
    assert_ne!(own, own_now);
    let error = refusal_of_flow_to(&a, &b, own_now).await;
    assert!(error.contains("own listener"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_flow_is_closed_and_frees_its_permit() {
    let pki = Pki::new(&["site-a", "site-b"]);
    let limits = "[limits]\nidle_timeout = \"1s\"\nmax_connections = 1\n";
    let (a, _b) = gateways_with(&pki, limits, ferry_testkit::gateway_config::ALLOW_ANY, limits).await;
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut api = session(&a).await;
    let (id, listen) = opened(&call(&mut api, open(target.local_addr().unwrap(), "127.0.0.1", 2)).await);
    let mut idle = TcpStream::connect(listen).await.unwrap();
    idle.write_all(b"one line, then nothing\n").await.unwrap();
    let (_kept, _) = target.accept().await.unwrap();
    let started = Instant::now();
    let s = stats_until(&mut api, id, |s| s["failed"] == 1).await;
    let waited = started.elapsed();
    assert!(s["last_error"].as_str().unwrap().contains("idle"), "{s}");
    assert!(waited >= Duration::from_millis(900) && waited < Duration::from_secs(5), "closed after {waited:?}");
    assert_closed_at_once(&mut idle).await;
    // Its permit is free again (max_connections = 1): the next connection is carried.
    let _next = TcpStream::connect(listen).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), target.accept()).await.expect("permit freed").unwrap();
}
