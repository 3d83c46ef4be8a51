//! The end-to-end digest a flow's Fin carries, checked by a real gateway: the ingress side is a
//! crafted peer (this test speaking the tunnel protocol over real QUIC on loopback, with site-a's
//! certificate), so a wrong digest needs no hook in the gateway.

use std::net::SocketAddr;
use std::time::Duration;

use ferry_codec::WireOffset;
use ferry_gateway::tls::TunnelTls;
use ferry_gateway::tunnel::protocol::{control_preamble, ChunkHeader, LaneHeader, LaneKind, Message, MESSAGE_HEADER_LEN};
use ferry_gateway::Gateway;
use ferry_testkit::loopback::{config, free_udp_addr};
use ferry_testkit::pki::Pki;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

/// A QUIC connection to `gateway` (listening at `addr`) as site-a, like a site-a gateway's.
async fn connect_as_site_a(pki: &Pki, addr: SocketAddr) -> quinn::Connection {
    let a = config(pki.path(), "site-a", free_udp_addr(), &[("site-b", addr)], &[]);
    let tls = TunnelTls::load(&a.tls).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(tls.client));
    endpoint.connect(addr, "site-b").unwrap().await.unwrap()
}

/// Reads control messages until a Reset or the stream's end; returns the Reset's reason.
async fn read_until_reset(recv: &mut quinn::RecvStream) -> Option<String> {
    loop {
        let mut header = [0u8; MESSAGE_HEADER_LEN];
        recv.read_exact(&mut header).await.ok()?;
        let (ty, len) = Message::decode_header(header).unwrap();
        let mut body = vec![0u8; len];
        recv.read_exact(&mut body).await.unwrap();
        if let Message::Reset(reason) = Message::decode_body(ty, &body).unwrap() {
            return Some(reason);
        }
    }
}

/// Opens flow `flow` to `target` as an ingress gateway would, sends `data` on one lane and a
/// Fin with `digest`; returns the control stream.
async fn send_flow(conn: &quinn::Connection, flow: u64, target: SocketAddr, data: &[u8], digest: blake3::Hash) -> (quinn::SendStream, quinn::RecvStream) {
    let (mut control, recv) = conn.open_bi().await.unwrap();
    let mut msg = control_preamble().to_vec();
    // One order key per flow: each is dialed at once.
    Message::Open { flow, order: flow as u32 + 1, seq: 0, codec: false, connect: target }.encode(&mut msg);
    control.write_all(&msg).await.unwrap();
    let mut lane = conn.open_uni().await.unwrap();
    lane.write_all(&LaneHeader { kind: LaneKind::Data, sender_opened_flow: true, flow }.encode()).await.unwrap();
    lane.write_all(&ChunkHeader { offset: WireOffset::ZERO, len: data.len() as u32 }.encode()).await.unwrap();
    lane.write_all(data).await.unwrap();
    lane.finish().unwrap();
    let mut fin = Vec::new();
    Message::Fin { length: WireOffset::new(data.len() as u64), digest }.encode(&mut fin);
    control.write_all(&fin).await.unwrap();
    (control, recv)
}

/// What the target read from one connection: the bytes, and whether it ended in a clean EOF
/// (rather than a reset).
async fn read_target(target: &TcpListener) -> (Vec<u8>, bool) {
    let (mut tcp, _) = target.accept().await.unwrap();
    let mut got = Vec::new();
    let clean = tokio::time::timeout(Duration::from_secs(20), tcp.read_to_end(&mut got)).await.expect("target read timed out").is_ok();
    (got, clean)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_fin_digest_resets_the_destination_and_is_counted() {
    let pki = Pki::new(&["site-a", "site-b"]);
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target_addr = target.local_addr().unwrap();
    let b_addr = free_udp_addr();
    // B's peer site-a is not listening anywhere: B only accepts our connection.
    let b = Gateway::start(config(pki.path(), "site-b", b_addr, &[("site-a", free_udp_addr())], &[])).await.unwrap();
    let conn = connect_as_site_a(&pki, b_addr).await;
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();

    // The right digest: a clean end (so this crafted peer speaks the protocol right).
    let (_control, mut recv) = send_flow(&conn, 0, target_addr, &data, blake3::hash(&data)).await;
    let (got, clean) = read_target(&target).await;
    assert!(clean && got == data, "right digest: {} bytes, clean end {clean}", got.len());
    let _ = recv.stop(0u32.into());

    // Same bytes, a digest of other bytes: every byte arrives, but the end is a reset.
    let (_control, mut recv) = send_flow(&conn, 1, target_addr, &data, blake3::hash(b"other bytes")).await;
    let (got, clean) = read_target(&target).await;
    assert!(!clean, "a wrong digest must not end the destination's connection cleanly ({} bytes read)", got.len());
    let reason = tokio::time::timeout(Duration::from_secs(10), read_until_reset(&mut recv)).await.unwrap();
    assert!(reason.as_deref().is_some_and(|r| r.contains("digest mismatch")), "peer told {reason:?}");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while b.stats().flows_failed < 1 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = b.stats();
    assert_eq!(stats.digest_mismatches, 1, "{stats:?}");
    assert_eq!(stats.flows_failed, 1, "{stats:?}");
    let failed: Vec<_> = b.flow_log().records().into_iter().filter(|r| r.error.is_some()).collect();
    assert_eq!(failed.len(), 1);
    assert!(failed[0].error.as_deref().is_some_and(|e| e.contains("digest mismatch")), "{:?}", failed[0].error);
    assert_eq!(failed[0].tcp_out, data.len() as u64);
    conn.close(0u32.into(), b"done");
}
