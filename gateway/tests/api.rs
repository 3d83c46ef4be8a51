//! The host-plugin API of a real gateway pair on loopback, spoken as raw JSON lines (the wire
//! format host-plugins depend on): forwards opened on demand carry bytes intact, their counters
//! add up, bad requests get answers, and a session's forwards close with it.

use std::time::{Duration, Instant};

use ferry_gateway::Gateway;
use ferry_testkit::loopback::{config_with, free_udp_addr, receive_all, send_random};
use ferry_testkit::pki::Pki;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

struct Api {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
}

impl Api {
    async fn connect(gateway: &Gateway) -> Self {
        let tcp = TcpStream::connect(gateway.api_addr().expect("api configured")).await.unwrap();
        let (r, w) = tcp.into_split();
        Self { reader: BufReader::new(r), writer: w }
    }

    async fn raw(&mut self, line: &str) -> Value {
        self.writer.write_all(format!("{line}\n").as_bytes()).await.unwrap();
        let mut answer = String::new();
        self.reader.read_line(&mut answer).await.unwrap();
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("answer is not JSON ({e}): {answer}"))
    }

    async fn call(&mut self, request: Value) -> Value {
        self.raw(&request.to_string()).await
    }
}

async fn gateways(pki: &Pki) -> (Gateway, Gateway) {
    let (a_addr, b_addr) = (free_udp_addr(), free_udp_addr());
    let api = "[api]\nlisten = \"127.0.0.1:0\"\n";
    let a = config_with(pki.path(), "site-a", a_addr, &[("site-b", b_addr)], &[], api);
    let b = config_with(pki.path(), "site-b", b_addr, &[("site-a", a_addr)], &[], "");
    let a = Gateway::start(a).await.unwrap();
    let b = Gateway::start(b).await.unwrap();
    assert!(a.wait_connected("site-b", Duration::from_secs(10)).await);
    (a, b)
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

    let mut api = Api::connect(&a).await;
    let hello = api.call(json!({"op": "hello"})).await;
    assert_eq!(hello["hello"]["site"], "site-a", "{hello}");
    assert_eq!(hello["hello"]["peers"][0]["site"], "site-b");
    assert!(hello["hello"]["peers"][0]["path"]["rtt_ms"].as_f64().is_some(), "{hello}");
    // At least 2 lanes of 1 MiB and a reorder buffer of as much again.
    assert!(hello["hello"]["flow_window_bytes"].as_u64().unwrap_or(0) >= 4 << 20, "{hello}");

    let opened = api.call(json!({"op": "open_forward", "peer": "site-b", "connect": target_addr, "codec": "off"})).await;
    let id = opened["forward"]["id"].as_u64().unwrap_or_else(|| panic!("{opened}"));
    let listen: std::net::SocketAddr = opened["forward"]["listen"].as_str().unwrap().parse().unwrap();

    const LEN: u64 = 8 << 20;
    let mut tcp = TcpStream::connect(listen).await.unwrap();
    let sent = send_random(&mut tcp, 7, LEN).await;
    let (n, got) = receiver.await.unwrap();
    assert_eq!((n, got), (LEN, sent), "bytes through the API forward differ");

    // Counters settle once the flow ends: everything read, sent and acknowledged.
    let deadline = Instant::now() + Duration::from_secs(15);
    let stats = loop {
        let stats = api.call(json!({"op": "forward_stats", "forward": id})).await;
        let s = &stats["forward_stats"];
        if s["completed"] == 1 && s["open"] == 0 {
            break stats;
        }
        assert!(Instant::now() < deadline, "flow did not finish: {stats}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let s = &stats["forward_stats"];
    assert_eq!(s["tcp_in"], LEN, "{stats}");
    assert_eq!(s["wire_sent"], LEN, "without the codec the wire carries the TCP bytes: {stats}");
    assert_eq!(s["wire_acked"], LEN, "{stats}");
    assert!(s["wan_out"].as_u64().unwrap() > LEN, "framing included: {stats}");
    assert_eq!(s["failed"], 0);
    assert!(s["path"]["cwnd"].as_u64().unwrap() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_answered_and_forwards_die_with_their_session() {
    let pki = Pki::new(&["site-a", "site-b"]);
    let (a, _b) = gateways(&pki).await;
    let mut api = Api::connect(&a).await;

    let err = api.call(json!({"op": "open_forward", "peer": "site-z", "connect": "127.0.0.1:9", "codec": "auto"})).await;
    assert!(err["error"].as_str().unwrap().contains("unknown peer site `site-z`"), "{err}");
    let err = api.raw("{this is not json").await;
    assert!(err["error"].as_str().unwrap().contains("malformed"), "{err}");
    let err = api.call(json!({"op": "forward_stats", "forward": 12345})).await;
    assert!(err["error"].as_str().unwrap().contains("no forward 12345"), "{err}");
    // The session survived all of that.
    assert_eq!(api.call(json!({"op": "hello"})).await["hello"]["site"], "site-a");

    let opened = api.call(json!({"op": "open_forward", "peer": "site-b", "connect": "127.0.0.1:9", "codec": "auto"})).await;
    let listen: std::net::SocketAddr = opened["forward"]["listen"].as_str().unwrap().parse().unwrap();
    // The forward carries a probe to a closed port, so the probe may already be reset by the
    // time `connect` returns: only "refused" means nothing listens.
    let listening = |r: &std::io::Result<TcpStream>| !matches!(r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused);
    let probe = TcpStream::connect(listen).await;
    assert!(listening(&probe), "forward listens while its session lives: {opened} {probe:?}");
    drop(api);
    let deadline = Instant::now() + Duration::from_secs(5);
    while listening(&TcpStream::connect(listen).await) {
        assert!(Instant::now() < deadline, "forward still listening after its session closed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
