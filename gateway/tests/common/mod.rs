//! Test support: two (or more) gateways on loopback with certificates from `certs::generate`,
//! configured through the real TOML parser, and TCP endpoints that check what crosses them.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_gateway::{certs, Config, Gateway};
use rand::{RngCore, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Certificates for a set of sites from one CA.
pub struct Pki {
    pub dir: tempfile::TempDir,
}

impl Pki {
    pub fn new(sites: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let sites: Vec<String> = sites.iter().map(|s| s.to_string()).collect();
        certs::generate(dir.path(), &sites).unwrap();
        Self { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// A free UDP port on loopback (bound and released; fine for tests).
pub fn free_udp_addr() -> SocketAddr {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.local_addr().unwrap()
}

/// Writes a config for `site` and loads it through the real parser.
pub fn config(
    pki_dir: &Path,
    site: &str,
    listen: SocketAddr,
    peers: &[(&str, SocketAddr)],
    forwards: &[(&str, SocketAddr)],
) -> Config {
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
    let mut text = format!(
        "site = \"{site}\"\nlisten = \"{listen}\"\n[tls]\nca = \"ca.pem\"\ncert = \"{site}.pem\"\nkey = \"{site}.key\"\n\
         [link]\nbandwidth = \"10gbit\"\nrtt = \"1ms\"\n"
    );
    for (peer, addr) in peers {
        text += &format!("[[peer]]\nsite = \"{peer}\"\naddr = \"{addr}\"\n");
    }
    for (peer, connect) in forwards {
        text += &format!("[[forward]]\nlisten = \"127.0.0.1:0\"\npeer = \"{peer}\"\nconnect = \"{connect}\"\n");
    }
    text += extra;
    let path: PathBuf = pki_dir.join(format!("{site}-{}.toml", listen.port()));
    std::fs::write(&path, text).unwrap();
    Config::load(&path).unwrap()
}

/// Gateways A and B, each the other's peer; A forwards to `target` via B.
pub async fn pair(pki: &Pki, target: SocketAddr) -> (Gateway, Gateway) {
    let (a_addr, b_addr) = (free_udp_addr(), free_udp_addr());
    let a = config(pki.path(), "site-a", a_addr, &[("site-b", b_addr)], &[("site-b", target)]);
    let b = config(pki.path(), "site-b", b_addr, &[("site-a", a_addr)], &[]);
    let a = Gateway::start(a).await.unwrap();
    let b = Gateway::start(b).await.unwrap();
    assert!(a.wait_connected("site-b", Duration::from_secs(10)).await, "gateways did not connect");
    assert!(b.wait_connected("site-a", Duration::from_secs(10)).await, "gateways did not connect");
    (a, b)
}

/// Sends `len` pseudo-random bytes (from `seed`), then half-closes; returns their blake3.
pub async fn send_random<W: AsyncWriteExt + Unpin>(w: &mut W, seed: u64, len: u64) -> blake3::Hash {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        hasher.update(&buf[..n]);
        w.write_all(&buf[..n]).await.unwrap();
        left -= n as u64;
    }
    w.shutdown().await.unwrap();
    hasher.finalize()
}

/// Reads to end of stream; returns (bytes, blake3).
pub async fn receive_all<R: AsyncReadExt + Unpin>(r: &mut R) -> std::io::Result<(u64, blake3::Hash)> {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 256 << 10];
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
    let recv = async move { receive_all(&mut r).await.unwrap() };
    tokio::join!(send, recv)
}
