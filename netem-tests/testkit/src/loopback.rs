//! Gateways on loopback and the TCP endpoints that check what crosses them: configs through the
//! real parser with certificates from a [`Pki`], pseudo-random payloads checked by blake3.
//!
//! These are test steps: they panic (failing the test) when a step that must work does not.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use ferry_gateway::{Config, Gateway};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::gateway_config::GatewayConfig;
use crate::pki::Pki;
use crate::rng::Rng;

/// Chunk size of the payload senders and receivers.
const CHUNK: usize = 256 << 10;

/// A free UDP port on loopback (bound and released; fine for tests).
pub fn free_udp_addr() -> SocketAddr {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("binding a loopback UDP port: {e}"));
    s.local_addr().unwrap_or_else(|e| panic!("local address of a bound socket: {e}"))
}

/// A free TCP port on loopback (bound and released; fine for tests), for a listener a test must
/// know before a gateway process binds it.
pub fn free_tcp_addr() -> SocketAddr {
    let s = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("binding a loopback TCP port: {e}"));
    s.local_addr().unwrap_or_else(|e| panic!("local address of a bound socket: {e}"))
}

/// Writes a config for `site` (default link, `peers`, `forwards` from `127.0.0.1:0`) into
/// `pki_dir` and loads it through the real parser.
pub fn config(pki_dir: &Path, site: &str, listen: SocketAddr, peers: &[(&str, SocketAddr)], forwards: &[(&str, SocketAddr)]) -> Config {
    config_with(pki_dir, site, listen, peers, forwards, "")
}

/// [`config`] plus extra TOML (whole sections) at the end.
pub fn config_with(
    pki_dir: &Path,
    site: &str,
    listen: SocketAddr,
    peers: &[(&str, SocketAddr)],
    forwards: &[(&str, SocketAddr)],
    extra: &str,
) -> Config {
    let mut config = GatewayConfig::new(site, listen);
    for (peer, addr) in peers {
        config = config.peer(peer, *addr);
    }
    for (peer, connect) in forwards {
        config = config.forward(peer, *connect);
    }
    config
        .extra(extra)
        .load(pki_dir, &format!("{site}-{}.toml", listen.port()))
        .unwrap_or_else(|e| panic!("test config for {site}: {e}"))
}

/// Gateways A and B, each the other's peer; A forwards to `target` via B. Returns once both
/// are connected.
pub async fn pair(pki: &Pki, target: SocketAddr) -> (Gateway, Gateway) {
    pair_with(pki, target, "").await
}

/// [`pair`], with `b_extra` (TOML sections such as `"[cache]\nsize = \"1MiB\"\n"`) added to B's
/// config.
pub async fn pair_with(pki: &Pki, target: SocketAddr, b_extra: &str) -> (Gateway, Gateway) {
    let (a_addr, b_addr) = (free_udp_addr(), free_udp_addr());
    let a = config(pki.path(), "site-a", a_addr, &[("site-b", b_addr)], &[("site-b", target)]);
    let b = config_with(pki.path(), "site-b", b_addr, &[("site-a", a_addr)], &[], b_extra);
    let a = Gateway::start(a).await.unwrap_or_else(|e| panic!("starting site-a: {e:#}"));
    let b = Gateway::start(b).await.unwrap_or_else(|e| panic!("starting site-b: {e:#}"));
    assert!(a.wait_connected("site-b", Duration::from_secs(10)).await, "gateways did not connect");
    assert!(b.wait_connected("site-a", Duration::from_secs(10)).await, "gateways did not connect");
    (a, b)
}

/// Sends `len` pseudo-random bytes (from `seed`), then half-closes; returns their blake3.
pub async fn send_random<W: AsyncWriteExt + Unpin>(w: &mut W, seed: u64, len: u64) -> blake3::Hash {
    let mut rng = Rng::new(seed);
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        hasher.update(&buf[..n]);
        w.write_all(&buf[..n]).await.unwrap_or_else(|e| panic!("sending the payload: {e}"));
        left -= n as u64;
    }
    w.shutdown().await.unwrap_or_else(|e| panic!("half-closing after the payload: {e}"));
    hasher.finalize()
}

/// Reads to end of stream; returns (bytes, blake3).
pub async fn receive_all<R: AsyncReadExt + Unpin>(r: &mut R) -> std::io::Result<(u64, blake3::Hash)> {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok((total, hasher.finalize()));
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
}

/// Runs a full-duplex exchange of `len` bytes each way over `tcp`; returns
/// (hash sent, (bytes received, hash received)).
pub async fn exchange(tcp: TcpStream, seed: u64, len: u64) -> (blake3::Hash, (u64, blake3::Hash)) {
    let (mut r, mut w) = tcp.into_split();
    let send = async move { send_random(&mut w, seed, len).await };
    let recv = async move { receive_all(&mut r).await.unwrap_or_else(|e| panic!("receiving the payload: {e}")) };
    tokio::join!(send, recv)
}
