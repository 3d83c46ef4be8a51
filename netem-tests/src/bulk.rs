//! Bulk TCP transfers between the sites, measured at the receiver: the load of the goodput
//! benchmark and of end-to-end integrity tests.
//!
//! The payload is pseudo-random (incompressible) and reproducible from a seed, so the receiver
//! can check every byte by digest.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use ferry_testkit::rng::Rng;

use crate::wan::Site;

/// What the receiver saw.
#[derive(Clone, Copy, Debug)]
pub struct Received {
    /// Bytes received in total.
    pub bytes: u64,
    /// Bytes received after the warm-up.
    pub measured_bytes: u64,
    /// Time from the warm-up's end to the last byte (or the end of the run).
    pub measured: Duration,
    /// blake3 of everything received (`None` when the receiver was started without hashing).
    pub digest: Option<[u8; 32]>,
}

impl Received {
    /// Goodput after the warm-up, in bit/s.
    pub fn goodput_bps(&self) -> f64 {
        self.measured_bytes as f64 * 8.0 / self.measured.as_secs_f64().max(1e-9)
    }
}

/// The payload repeats with this period: long enough that zstd (window ≤ 8 MiB at the levels
/// Ferry uses) finds no repeats, short enough to generate once per transfer, so the sender spends
/// its CPU on sending rather than on generating data.
const PATTERN_LEN: usize = 16 << 20;

/// The payload pattern of `seed` (the test kit's xorshift64*).
fn pattern(seed: u64) -> Vec<u8> {
    Rng::new(seed).bytes(PATTERN_LEN)
}

/// Fills `buf` with the payload bytes at stream position `pos`.
fn fill(buf: &mut [u8], pattern: &[u8], mut pos: u64) {
    let mut filled = 0;
    while filled < buf.len() {
        let at = (pos % pattern.len() as u64) as usize;
        let n = (pattern.len() - at).min(buf.len() - filled);
        buf[filled..filled + n].copy_from_slice(&pattern[at..at + n]);
        filled += n;
        pos += n as u64;
    }
}

/// blake3 of the first `len` payload bytes of `seed`.
pub fn payload_digest(seed: u64, len: u64) -> [u8; 32] {
    let pattern = pattern(seed);
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0;
    while pos < len {
        let n = (len - pos).min(buf.len() as u64) as usize;
        fill(&mut buf[..n], &pattern, pos);
        hasher.update(&buf[..n]);
        pos += n as u64;
    }
    *hasher.finalize().as_bytes()
}

/// Sends payload to `to` from inside `site` until `len` bytes were sent or `duration` passed,
/// then half-closes. Returns the bytes sent.
pub fn send(site: &Site, to: SocketAddr, seed: u64, len: u64, duration: Duration) -> std::io::Result<u64> {
    site.run(move || {
        let pattern = pattern(seed);
        let mut tcp = TcpStream::connect_timeout(&to, Duration::from_secs(10))?;
        let deadline = Instant::now() + duration;
        let mut pos = 0u64;
        while pos < len && Instant::now() < deadline {
            let at = (pos % PATTERN_LEN as u64) as usize;
            let n = (len - pos).min((PATTERN_LEN - at).min(256 << 10) as u64) as usize;
            tcp.write_all(&pattern[at..at + n])?;
            pos += n as u64;
        }
        tcp.shutdown(std::net::Shutdown::Write)?;
        // Wait for the receiver to close, so everything sent was also delivered.
        let mut sink = [0u8; 64];
        let _ = tcp.read(&mut sink);
        Ok(pos)
    })
    .map_err(|e| std::io::Error::other(e.to_string()))?
}

/// A listener in a site that receives one connection to its end, measuring goodput after
/// `warmup`.
pub struct Receiver {
    /// Where to connect.
    pub addr: SocketAddr,
    handle: std::thread::JoinHandle<std::io::Result<Received>>,
}

impl Receiver {
    /// Listens on `addr` inside `site`. With `hash`, every byte is digested (for integrity
    /// checks); benchmarks leave it off so the measuring side costs as little CPU as possible.
    pub fn start(site: &Site, addr: SocketAddr, warmup: Duration, limit: Duration, hash: bool) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = site
            .spawn_thread(move || {
                let listener = TcpListener::bind(addr);
                let listener = match listener {
                    Ok(l) => {
                        let _ = tx.send(l.local_addr());
                        l
                    }
                    Err(e) => {
                        let _ = tx.send(Err(std::io::Error::new(e.kind(), e.to_string())));
                        return Err(e);
                    }
                };
                let (mut tcp, _) = listener.accept()?;
                tcp.set_read_timeout(Some(Duration::from_millis(200)))?;
                let started = Instant::now();
                let mut hasher = hash.then(blake3::Hasher::new);
                let mut buf = vec![0u8; 256 << 10];
                let (mut bytes, mut measured_bytes) = (0u64, 0u64);
                let mut last = started;
                loop {
                    match tcp.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            if let Some(h) = hasher.as_mut() {
                                h.update(&buf[..n]);
                            }
                            bytes += n as u64;
                            last = Instant::now();
                            if last.duration_since(started) >= warmup {
                                measured_bytes += n as u64;
                            }
                        }
                        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                        Err(e) => return Err(e),
                    }
                    if started.elapsed() > limit {
                        last = Instant::now();
                        break;
                    }
                }
                Ok(Received {
                    bytes,
                    measured_bytes,
                    measured: last.saturating_duration_since(started + warmup),
                    digest: hasher.map(|h| *h.finalize().as_bytes()),
                })
            })
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let addr = rx.recv().map_err(|_| std::io::Error::other("receiver thread died"))??;
        Ok(Self { addr, handle })
    }

    /// Waits for the transfer to end.
    pub fn finish(self) -> std::io::Result<Received> {
        self.handle.join().map_err(|_| std::io::Error::other("receiver panicked"))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_position_keyed() {
        let p = pattern(7);
        let mut whole = vec![0u8; 100];
        fill(&mut whole, &p, PATTERN_LEN as u64 - 50);
        let mut tail = vec![0u8; 60];
        fill(&mut tail, &p, PATTERN_LEN as u64 - 10);
        assert_eq!(&whole[40..], &tail[..]);
        assert_eq!(&whole[50..], &p[..50]);
        assert_ne!(payload_digest(7, 100), payload_digest(8, 100));
    }
}
