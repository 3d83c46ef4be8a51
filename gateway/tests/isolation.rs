//! Flow isolation on a real gateway pair (loopback QUIC, real TCP): destinations that stop
//! reading stall their own flows only.

use std::time::{Duration, Instant};

use ferry_gateway::Gateway;
use ferry_testkit::gateway_config::GatewayConfig;
use ferry_testkit::loopback::{free_udp_addr, receive_all, send_random};
use ferry_testkit::pki::Pki;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_destinations_that_never_read_do_not_stop_a_third_flow() {
    // Windows sized for 1 Gbit/s × 150 ms (27 lanes of 1 MiB per flow, a 37.5 MB connection
    // window), though the path is loopback: each stalled flow could park a BDP in QUIC.
    let pki = Pki::new(&["site-a", "site-b"]);
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (a_addr, b_addr) = (free_udp_addr(), free_udp_addr());
    let load = |cfg: GatewayConfig, name: &str| cfg.link("1gbit", "150ms").load(pki.path(), name).unwrap();
    let a = load(GatewayConfig::new("site-a", a_addr).peer("site-b", b_addr).forward("site-b", target.local_addr().unwrap()), "a.toml");
    let b = load(GatewayConfig::new("site-b", b_addr).peer("site-a", a_addr), "b.toml");
    let a = Gateway::start(a).await.unwrap();
    let b = Gateway::start(b).await.unwrap();
    assert!(a.wait_connected("site-b", Duration::from_secs(10)).await);
    assert!(b.wait_connected("site-a", Duration::from_secs(10)).await);
    let forward = a.forward_addrs()[0];

    // Two sources that write far more than every buffer on the way holds, to destinations that
    // accept and never read.
    let mut stalled_destinations = Vec::new();
    let mut stalled_sources = Vec::new();
    for seed in 0..2 {
        let mut source = TcpStream::connect(forward).await.unwrap();
        let (destination, _) = target.accept().await.unwrap();
        stalled_destinations.push(destination);
        stalled_sources.push(tokio::spawn(async move { send_random(&mut source, seed, 1 << 30).await }));
    }
    // Let them fill what they can.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let len = 64 * MIB;
    let mut source = TcpStream::connect(forward).await.unwrap();
    let started = Instant::now();
    let sender = tokio::spawn(async move {
        let digest = send_random(&mut source, 7, len).await;
        source.shutdown().await.unwrap();
        digest
    });
    // Within the deadline: the egress dials the third destination (its Open must get through)
    // and every byte arrives.
    let received = tokio::time::timeout(Duration::from_secs(60), async {
        let (mut destination, _) = target.accept().await.unwrap();
        receive_all(&mut destination).await
    })
    .await;
    let (got, digest) = received.expect("the third flow stalled behind the two that do not read").unwrap();
    let secs = started.elapsed().as_secs_f64();
    println!("third flow: {len} bytes in {secs:.2}s ({:.0} Mbit/s) beside two stalled flows", len as f64 * 8.0 / secs / 1e6);
    assert_eq!(got, len);
    assert_eq!(digest, sender.await.unwrap());
    for s in &stalled_sources {
        assert!(!s.is_finished(), "a stalled source finished writing 1 GiB: its destination does not read");
    }
    for s in stalled_sources {
        s.abort();
    }
    drop(stalled_destinations);
    drop((a, b));
}
