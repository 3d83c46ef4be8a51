//! End-to-end tests of two gateways on loopback: real QUIC over real UDP sockets, real TCP.

use std::time::Duration;

use ferry_gateway::Gateway;
use ferry_testkit::loopback::{config, exchange, free_udp_addr, pair, pair_with, receive_all};
use ferry_testkit::pki::Pki;
use ferry_testkit::qemu_stream::{multifd_stream, random_pages};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bulk_256mib_both_directions_is_byte_identical() {
    let pki = Pki::new(&["site-a", "site-b"]);
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (a, b) = pair(&pki, target.local_addr().unwrap()).await;
    let len = 256 * MIB;

    let server = tokio::spawn(async move {
        let (tcp, _) = target.accept().await.unwrap();
        exchange(tcp, 2, len).await
    });
    let client = TcpStream::connect(a.forward_addrs()[0]).await.unwrap();
    let started = std::time::Instant::now();
    let (client_sent, (client_got_len, client_got)) = exchange(client, 1, len).await;
    let (server_sent, (server_got_len, server_got)) = server.await.unwrap();
    let secs = started.elapsed().as_secs_f64();
    println!("256 MiB each way in {secs:.2}s ({:.0} Mbit/s per direction)", len as f64 * 8.0 / secs / 1e6);

    assert_eq!(server_got_len, len);
    assert_eq!(client_got_len, len);
    assert_eq!(client_sent, server_got, "client→server bytes differ");
    assert_eq!(server_sent, client_got, "server→client bytes differ");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(a.stats().flows_completed, 1);
    assert_eq!(b.stats().flows_completed, 1);
    assert_eq!(a.stats().flows_failed + b.stats().flows_failed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_concurrent_connections() {
    let pki = Pki::new(&["site-a", "site-b"]);
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (a, _b) = pair(&pki, target.local_addr().unwrap()).await;
    let len = 8 * MIB;
    let n = 16u64;

    // The target echoes a digest-checked exchange per connection; seeds come from the client's
    // first 8 bytes so each pairing is checked independently.
    let server = tokio::spawn(async move {
        let mut tasks = Vec::new();
        for _ in 0..n {
            let (mut tcp, _) = target.accept().await.unwrap();
            tasks.push(tokio::spawn(async move {
                let id = tcp.read_u64().await.unwrap();
                let (r, s) = exchange(tcp, 1000 + id, len).await;
                (id, r, s)
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    let mut clients = Vec::new();
    for id in 0..n {
        let addr = a.forward_addrs()[0];
        clients.push(tokio::spawn(async move {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            tcp.write_u64(id).await.unwrap();
            let r = exchange(tcp, id, len).await;
            (id, r)
        }));
    }
    let mut client_results = std::collections::HashMap::new();
    for c in clients {
        let (id, r) = c.await.unwrap();
        client_results.insert(id, r);
    }
    let server_results = server.await.unwrap();
    assert_eq!(server_results.len(), n as usize);
    for (id, server_sent, (server_len, server_got)) in server_results {
        let (client_sent, (client_len, client_got)) = client_results[&id];
        assert_eq!(server_len, len, "conn {id}");
        assert_eq!(client_len, len, "conn {id}");
        assert_eq!(server_got, client_sent, "conn {id} client→server differs");
        assert_eq!(client_got, server_sent, "conn {id} server→client differs");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_dialed_in_accept_order() {
    let pki = Pki::new(&["site-a", "site-b"]);
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (a, _b) = pair(&pki, target.local_addr().unwrap()).await;
    let n = 8u8;
    let mut clients = Vec::new();
    for i in 0..n {
        let mut tcp = TcpStream::connect(a.forward_addrs()[0]).await.unwrap();
        tcp.write_all(&[i]).await.unwrap();
        clients.push(tcp);
    }
    for expected in 0..n {
        let (mut tcp, _) = tokio::time::timeout(Duration::from_secs(10), target.accept()).await.unwrap().unwrap();
        let mut b = [0u8];
        tcp.read_exact(&mut b).await.unwrap();
        assert_eq!(b[0], expected, "target saw connections out of accept order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_keeps_the_return_path_open() {
    let pki = Pki::new(&["site-a", "site-b"]);
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (a, _b) = pair(&pki, target.local_addr().unwrap()).await;
    let server = tokio::spawn(async move {
        let (mut tcp, _) = target.accept().await.unwrap();
        let mut request = Vec::new();
        tcp.read_to_end(&mut request).await.unwrap(); // returns only after the client's FIN
        tcp.write_all(format!("got {} bytes", request.len()).as_bytes()).await.unwrap();
        tcp.shutdown().await.unwrap();
    });
    let mut tcp = TcpStream::connect(a.forward_addrs()[0]).await.unwrap();
    tcp.write_all(&[7u8; 100_000]).await.unwrap();
    tcp.shutdown().await.unwrap();
    let mut reply = String::new();
    tcp.read_to_string(&mut reply).await.unwrap();
    assert_eq!(reply, "got 100000 bytes");
    server.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_reset_reaches_the_client_as_a_reset() {
    let pki = Pki::new(&["site-a", "site-b"]);
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (a, _b) = pair(&pki, target.local_addr().unwrap()).await;
    tokio::spawn(async move {
        let (mut tcp, _) = target.accept().await.unwrap();
        let mut b = [0u8; 4];
        tcp.read_exact(&mut b).await.unwrap();
        socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO)).ok();
        drop(tcp); // RST
    });
    let mut tcp = TcpStream::connect(a.forward_addrs()[0]).await.unwrap();
    tcp.write_all(b"ping").await.unwrap();
    let mut buf = Vec::new();
    let result = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut buf)).await.unwrap();
    let err = result.expect_err("a reset must not look like a clean end of stream");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_target_resets_the_client() {
    let pki = Pki::new(&["site-a", "site-b"]);
    // A port with nothing listening.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let (a, b) = pair(&pki, closed).await;
    // The reset can be so quick that it already shows as the connect's socket error.
    if let Ok(mut tcp) = TcpStream::connect(a.forward_addrs()[0]).await {
        let mut buf = Vec::new();
        let result = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut buf)).await.unwrap();
        assert!(result.is_err(), "expected a reset, got a clean end after {} bytes", buf.len());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(b.stats().flows_failed, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_dials_only_what_the_peer_is_allowed_to_reach() {
    let pki = Pki::new(&["site-a", "site-b"]);
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target_addr = target.local_addr().unwrap();
    let (a_addr, b_addr) = (free_udp_addr(), free_udp_addr());
    let a = config(pki.path(), "site-a", a_addr, &[("site-b", b_addr)], &[("site-b", target_addr)]);
    // B lets site-a reach 127.0.0.2 only; the target is on 127.0.0.1.
    let text = format!(
        "site = \"site-b\"\nlisten = \"{b_addr}\"\n[tls]\nca = \"ca.pem\"\ncert = \"site-b.pem\"\nkey = \"site-b.key\"\n\
         [link]\nbandwidth = \"10gbit\"\nrtt = \"1ms\"\n[[peer]]\nsite = \"site-a\"\naddr = \"{a_addr}\"\nallow_connect = [\"127.0.0.2/32\"]\n"
    );
    let path = pki.path().join("site-b-allow.toml");
    std::fs::write(&path, text).unwrap();
    let b = ferry_gateway::Config::load(&path).unwrap();
    let a = Gateway::start(a).await.unwrap();
    let b = Gateway::start(b).await.unwrap();
    assert!(a.wait_connected("site-b", Duration::from_secs(10)).await);

    if let Ok(mut tcp) = TcpStream::connect(a.forward_addrs()[0]).await {
        let mut buf = Vec::new();
        let result = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut buf)).await.unwrap();
        assert!(result.is_err(), "expected a reset, got a clean end after {} bytes", buf.len());
    }
    let accepted = tokio::time::timeout(Duration::from_millis(300), target.accept()).await;
    assert!(accepted.is_err(), "the egress dialed a target outside allow_connect");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let refused = b.flow_log().records();
    assert_eq!(refused.len(), 1);
    assert!(refused[0].error.as_deref().unwrap_or_default().contains("allow_connect"), "{:?}", refused[0].error);
}

/// Starts `site` with `pki`, peered with `peer_site` at `peer_addr`, forwarding to `target`.
async fn lone_gateway(pki: &Pki, site: &str, peer_site: &str, peer_addr: std::net::SocketAddr, target: std::net::SocketAddr) -> Gateway {
    let cfg = config(pki.path(), site, free_udp_addr(), &[(peer_site, peer_addr)], &[(peer_site, target)]);
    Gateway::start(cfg).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_with_certificate_from_another_ca_is_refused() {
    let pki = Pki::new(&["site-a", "site-b"]);
    let rogue_pki = Pki::new(&["site-a", "site-b"]);
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a_addr = free_udp_addr();
    let a = config(pki.path(), "site-a", a_addr, &[("site-b", free_udp_addr())], &[]);
    let a = Gateway::start(a).await.unwrap();
    // A rogue "site-b" whose certificate chains to a different CA dials A.
    let rogue = lone_gateway(&rogue_pki, "site-b", "site-a", a_addr, target.local_addr().unwrap()).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(a.stats().peers_refused >= 1, "A did not refuse the rogue peer: {:?}", a.stats());
    assert!(!a.is_connected("site-b"));
    assert!(!rogue.is_connected("site-a"));
    // Nothing reaches the target through the rogue gateway.
    let _ = TcpStream::connect(rogue.forward_addrs()[0]).await;
    assert!(tokio::time::timeout(Duration::from_secs(2), target.accept()).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_certificate_for_an_unconfigured_site_is_refused() {
    let pki = Pki::new(&["site-a", "site-b", "site-c"]);
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a_addr = free_udp_addr();
    let a = config(pki.path(), "site-a", a_addr, &[("site-b", free_udp_addr())], &[]);
    let a = Gateway::start(a).await.unwrap();
    // site-c has a valid certificate from the same CA but is not one of A's peers.
    let c = lone_gateway(&pki, "site-c", "site-a", a_addr, target.local_addr().unwrap()).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(a.stats().peers_refused >= 1, "A did not refuse site-c: {:?}", a.stats());
    assert!(!a.is_connected("site-b"));
    let tcp = TcpStream::connect(c.forward_addrs()[0]).await;
    drop(tcp);
    assert!(tokio::time::timeout(Duration::from_secs(2), target.accept()).await.is_err(), "site-c reached the target");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_reconnect_after_a_restart() {
    let pki = Pki::new(&["site-a", "site-b"]);
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (a_addr, b_addr) = (free_udp_addr(), free_udp_addr());
    let a_cfg = config(pki.path(), "site-a", a_addr, &[("site-b", b_addr)], &[("site-b", target.local_addr().unwrap())]);
    let b_cfg = config(pki.path(), "site-b", b_addr, &[("site-a", a_addr)], &[]);
    let a = Gateway::start(a_cfg).await.unwrap();
    let b = Gateway::start(b_cfg.clone()).await.unwrap();
    assert!(a.wait_connected("site-b", Duration::from_secs(10)).await);
    drop(b);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let b = Gateway::start(b_cfg).await.unwrap();
    assert!(a.wait_connected("site-b", Duration::from_secs(30)).await, "A did not reconnect");
    assert!(b.wait_connected("site-a", Duration::from_secs(30)).await, "B did not reconnect");
    // And data flows again.
    let server = tokio::spawn(async move {
        let (tcp, _) = target.accept().await.unwrap();
        exchange(tcp, 5, MIB).await
    });
    let tcp = TcpStream::connect(a.forward_addrs()[0]).await.unwrap();
    let (sent, (_, got)) = exchange(tcp, 6, MIB).await;
    let (s_sent, (_, s_got)) = server.await.unwrap();
    assert_eq!(sent, s_got);
    assert_eq!(got, s_sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codec_session_window_follows_the_destination_limit() {
    // B's decoders accept only the minimum window; A's encoders must not announce more, neither
    // before B's advertisement arrives nor after.
    let pki = Pki::new(&["site-a", "site-b"]);
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (a, _b) = pair_with(&pki, target.local_addr().unwrap(), "[cache]\nsession_window_pages = 4096\n").await;
    let server = tokio::spawn(async move {
        let mut results = Vec::new();
        for round in 0..2u64 {
            let (tcp, _) = target.accept().await.unwrap();
            results.push(exchange(tcp, 10 + round, MIB).await);
        }
        results
    });
    let mut client_results = Vec::new();
    for round in 0..2u64 {
        let tcp = TcpStream::connect(a.forward_addrs()[0]).await.unwrap();
        client_results.push(exchange(tcp, 20 + round, MIB).await);
        // Let B's advertisement (with its window) reach A before the second round.
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    let server_results = server.await.unwrap();
    for (round, ((sent, (len, got)), (s_sent, (s_len, s_got)))) in client_results.into_iter().zip(server_results).enumerate() {
        assert_eq!((len, s_len), (MIB, MIB), "round {round}");
        assert_eq!(sent, s_got, "round {round}");
        assert_eq!(got, s_sent, "round {round}");
    }
    assert_eq!(a.stats().flows_failed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codec_resupplies_advertised_pages_the_destination_evicted() {
    // B's page cache holds 256 pages. The first migration leaves 200 pages P in it, which B then
    // advertises. The second migration sends 512 fresh pages Q, evicting P, and then P again: A
    // refers to P on the strength of B's advertisement, B no longer holds it, asks A, and A sends
    // it again from the copies it kept. Without the miss path B's decoder fails (MissingPage).
    let pki = Pki::new(&["site-a", "site-b"]);
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (a, b) = pair_with(&pki, target.local_addr().unwrap(), "[cache]\nsize = \"1MiB\"\n").await;

    let p = random_pages(1, 200);
    let q = random_pages(2, 512);
    let first = multifd_stream(&p);
    let second = multifd_stream(&q.iter().chain(&p).cloned().collect::<Vec<_>>());
    let server = tokio::spawn(async move {
        let mut got = Vec::new();
        for _ in 0..2 {
            let (mut tcp, _) = target.accept().await.unwrap();
            got.push(receive_all(&mut tcp).await.expect("the destination must receive a complete stream"));
        }
        got
    });
    let migrate = |stream: Vec<u8>, addr| async move {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (mut r, mut w) = tcp.into_split();
        w.write_all(&stream).await.unwrap();
        w.shutdown().await.unwrap();
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    };
    migrate(first.clone(), a.forward_addrs()[0]).await;
    // B advertises its cache right after a codec flow ends, then not again for at least 2.5 s
    // unless another flow ends: the second migration runs with A holding the stale advertisement.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    migrate(second.clone(), a.forward_addrs()[0]).await;
    let got = server.await.unwrap();
    assert_eq!(got[0], (first.len() as u64, blake3::hash(&first)));
    assert_eq!(got[1], (second.len() as u64, blake3::hash(&second)), "second migration must arrive byte-identical");

    // Both gateways' flow records: ingress input digest = egress output digest, and the miss
    // path was taken.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (a_log, b_log) = loop {
        let (a_log, b_log) = (a.flow_log().records(), b.flow_log().records());
        if a_log.len() >= 2 && b_log.len() >= 2 {
            break (a_log, b_log);
        }
        assert!(std::time::Instant::now() < deadline, "flows did not end: {a_log:?} {b_log:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (ingress, egress) = (&a_log[1], &b_log[1]);
    assert_eq!((ingress.error.as_deref(), egress.error.as_deref()), (None, None));
    assert_eq!(ingress.tcp_in_digest, *blake3::hash(&second).as_bytes());
    assert_eq!(ingress.tcp_in_digest, egress.tcp_out_digest);
    let codec = ingress.codec.as_ref().expect("codec stats at the ingress");
    assert_eq!(codec.advertised_refs, 200, "{codec:?}");
    assert_eq!(codec.resupplied_pages, 200, "{codec:?}");
    assert_eq!(ingress.pages_resupplied, codec.resupplied_pages);
    assert!(egress.pages_needed > 0 && egress.pages_resupplied == egress.pages_needed, "{egress:?}");
    assert_eq!(a.stats().flows_failed + b.stats().flows_failed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codec_flow_under_a_tiny_decoder_output_bound_is_byte_identical() {
    // B's decoders hand at most 5000 bytes (not page-aligned) to the socket per call; zero pages
    // expand the most, so half the stream is zero pages.
    let pki = Pki::new(&["site-a", "site-b"]);
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (a, b) = pair_with(&pki, target.local_addr().unwrap(), "[limits]\ndecoder_output = \"5000\"\n").await;
    let pages: Vec<Vec<u8>> = random_pages(3, 400).into_iter().flat_map(|p| [p, vec![0u8; 4096]]).collect();
    let stream = multifd_stream(&pages);
    let server = tokio::spawn(async move {
        let (mut tcp, _) = target.accept().await.unwrap();
        receive_all(&mut tcp).await.expect("the destination must receive a complete stream")
    });
    let tcp = TcpStream::connect(a.forward_addrs()[0]).await.unwrap();
    let (mut r, mut w) = tcp.into_split();
    w.write_all(&stream).await.unwrap();
    w.shutdown().await.unwrap();
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    assert_eq!(server.await.unwrap(), (stream.len() as u64, blake3::hash(&stream)));
    assert_eq!(a.stats().flows_failed + b.stats().flows_failed, 0);
}
