//! Helpers shared by the WAN integration tests: the root-or-skip check, a cross-process
//! lock that serialises timing-sensitive tests, and UDP/TCP probes written
//! in plain std so the tests need no external tools. (The system calls behind them are the
//! test kit's `ferry_testkit::sys`.)

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_netem::{Backend, Site, Wan};
use ferry_testkit::sys::{enable_udp_gso, is_root, raise_priority, set_socket_int, FileLock};
use ferry_testkit::tracing::init_tracing;

/// True when running as root; otherwise prints the skip notice.
pub fn root_or_skip() -> bool {
    init_tracing();
    if is_root() {
        true
    } else {
        println!("skipping: needs root");
        false
    }
}

/// Held while a test measures timing or throughput: one such test at a time,
/// across threads and processes (flock on a shared file).
pub fn serial() -> FileLock {
    FileLock::exclusive(Path::new("/tmp/ferry-netem-tests.lock")).unwrap_or_else(|e| panic!("test lock file: {e}"))
}

/// Backends to exercise: userspace always, netem where the kernel has it.
pub fn backends() -> Vec<Backend> {
    let mut v = vec![Backend::Userspace];
    match ferry_netem::netem_backend::probe() {
        Ok(()) => v.push(Backend::Netem),
        Err(reason) => println!("note: netem backend not tested here: {reason}"),
    }
    v
}

/// Binds a UDP socket inside `site`.
pub fn udp_in(site: &Site, port: u16) -> UdpSocket {
    let addr = site.addr();
    let sock = site
        .run(move || UdpSocket::bind((addr, port)))
        .expect("enter site")
        .expect("bind udp");
    // Big buffers (as root, beyond rmem_max) so the sockets are not the bottleneck.
    // Best effort: without the privilege the default buffers stay.
    let _ = set_socket_int(&sock, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 16 << 20);
    let _ = set_socket_int(&sock, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, 4 << 20);
    sock
}

/// A UDP echo server in `site`; stops when the returned flag is set.
pub fn echo_server(site: &Site, port: u16) -> (Arc<AtomicBool>, JoinHandle<()>) {
    let sock = udp_in(site, port);
    sock.set_read_timeout(Some(Duration::from_millis(20)))
        .expect("timeout");
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let handle = std::thread::spawn(move || {
        raise_priority();
        let mut buf = [0u8; 2048];
        while !stop2.load(Ordering::Relaxed) {
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                let _ = sock.send_to(&buf[..n], from);
            }
        }
    });
    (stop, handle)
}

/// Sends `count` pings `interval` apart from `a` to the echo server at
/// `server`; returns the RTT of each answered ping.
pub fn ping_udp(a: &Site, server: SocketAddr, count: usize, interval: Duration) -> Vec<Duration> {
    let sock = udp_in(a, 0);
    let rx = sock.try_clone().expect("clone");
    rx.set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    let epoch = Instant::now();
    let sender = std::thread::spawn(move || {
        raise_priority();
        for i in 0..count as u64 {
            let t = epoch.elapsed().as_nanos() as u64;
            let mut msg = [0u8; 64];
            msg[..8].copy_from_slice(&i.to_le_bytes());
            msg[8..16].copy_from_slice(&t.to_le_bytes());
            sock.send_to(&msg, server).expect("send ping");
            std::thread::sleep(interval);
        }
    });
    raise_priority();
    let mut rtts = Vec::new();
    let mut buf = [0u8; 128];
    let deadline = Instant::now() + interval * count as u32 + Duration::from_secs(3);
    while rtts.len() < count && Instant::now() < deadline {
        if let Ok(n) = rx.recv(&mut buf) {
            if n >= 16 {
                let sent = u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes"));
                let now = epoch.elapsed().as_nanos() as u64;
                rtts.push(Duration::from_nanos(now.saturating_sub(sent)));
            }
        }
    }
    sender.join().expect("sender");
    rtts
}

pub fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Result of a UDP stream at the receiver.
#[derive(Debug, Default, Clone)]
pub struct StreamResult {
    pub packets: u64,
    pub ip_bytes: u64,
    /// Arrival time of the first and last packet.
    pub first: Option<Instant>,
    pub last: Option<Instant>,
    /// Bytes (IP) of the first packet, excluded from rate computation.
    pub first_bytes: u64,
    /// (send offset, arrival offset) per packet, relative to a caller epoch, if recorded.
    pub timeline: Vec<(Duration, Duration)>,
}

impl StreamResult {
    /// Receive rate in bit/s of IP bytes between first and last arrival.
    pub fn rate_bps(&self) -> f64 {
        match (self.first, self.last) {
            (Some(f), Some(l)) if l > f => {
                (self.ip_bytes - self.first_bytes) as f64 * 8.0 / (l - f).as_secs_f64()
            }
            _ => 0.0,
        }
    }
}

/// IPv4 + UDP header bytes.
pub const UDP_OVERHEAD: u64 = 28;

/// Receives until `idle` passes without a packet (after at least one, or
/// `max_wait` without any). Payloads carry a send offset (ns since `epoch`) at 8..16.
pub fn receive_stream(
    sock: UdpSocket,
    idle: Duration,
    max_wait: Duration,
    epoch: Instant,
    record: bool,
) -> StreamResult {
    raise_priority();
    sock.set_read_timeout(Some(idle)).expect("timeout");
    let mut r = StreamResult::default();
    let mut buf = vec![0u8; 2048];
    let start = Instant::now();
    loop {
        match sock.recv(&mut buf) {
            Ok(n) => {
                let now = Instant::now();
                if r.first.is_none() {
                    r.first = Some(now);
                    r.first_bytes = n as u64 + UDP_OVERHEAD;
                }
                r.last = Some(now);
                r.packets += 1;
                r.ip_bytes += n as u64 + UDP_OVERHEAD;
                if record && n >= 16 {
                    let sent = u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes"));
                    r.timeline.push((Duration::from_nanos(sent), now - epoch));
                }
            }
            Err(_) => {
                if r.first.is_some() || start.elapsed() > max_wait {
                    return r;
                }
            }
        }
    }
}

/// Sends `count` UDP datagrams of `payload` bytes to `to` at `pps`, in bursts
/// every millisecond; each carries its sequence number and send offset from `epoch`.
pub fn send_stream(
    sock: &UdpSocket,
    to: SocketAddr,
    payload: usize,
    count: u64,
    pps: f64,
    epoch: Instant,
) {
    let mut msg = vec![0u8; payload.max(16)];
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < count {
        let due = ((start.elapsed().as_secs_f64() * pps) as u64 + 1).min(count);
        while sent < due {
            msg[..8].copy_from_slice(&sent.to_le_bytes());
            let t = epoch.elapsed().as_nanos() as u64;
            msg[8..16].copy_from_slice(&t.to_le_bytes());
            // ENOBUFS under overload is just a lost packet for this measurement.
            let _ = sock.send_to(&msg, to);
            sent += 1;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// Runs a one-way UDP stream from `from` to `to_site` and returns what arrived.
#[allow(clippy::too_many_arguments)]
pub fn udp_stream(
    from: &Site,
    to_site: &Site,
    port: u16,
    payload: usize,
    count: u64,
    pps: f64,
    epoch: Instant,
    record: bool,
) -> StreamResult {
    let rx = udp_in(to_site, port);
    let tx = udp_in(from, 0);
    // Idle timeout longer than any outage window the tests use.
    let receiver = std::thread::spawn(move || {
        receive_stream(
            rx,
            Duration::from_millis(800),
            Duration::from_secs(5),
            epoch,
            record,
        )
    });
    let to = SocketAddr::from((to_site.addr(), port));
    send_stream(&tx, to, payload, count, pps, epoch);
    receiver.join().expect("receiver")
}

/// Sends 1472-byte datagrams (1500-byte IP packets) to `to` at `bits_per_sec`
/// (IP bytes) for `duration`, 40 at a time with UDP GSO where the kernel has it
/// (so the sender, not the link under test, stays cheap on a 2-core machine).
pub fn send_bulk(sock: &UdpSocket, to: SocketAddr, bits_per_sec: f64, duration: Duration) -> u64 {
    raise_priority();
    const SEG: usize = 1472;
    let gso = enable_udp_gso(sock, SEG).is_ok();
    let per_send = if gso { 40 } else { 1 };
    let buf = vec![0x42u8; SEG * per_send];
    let pps = bits_per_sec / 8.0 / (SEG as f64 + UDP_OVERHEAD as f64);
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < duration {
        let due = (start.elapsed().as_secs_f64() * pps) as u64 + per_send as u64;
        while sent + per_send as u64 <= due {
            // ENOBUFS under overload is just a lost packet for this measurement.
            let _ = sock.send_to(&buf, to);
            sent += per_send as u64;
        }
        std::thread::sleep(Duration::from_micros(300));
    }
    sent
}

/// A bulk UDP transfer from `from` to `to_site`; returns what arrived.
pub fn udp_bulk(
    from: &Site,
    to_site: &Site,
    port: u16,
    bits_per_sec: f64,
    duration: Duration,
) -> StreamResult {
    let rx = udp_in(to_site, port);
    let tx = udp_in(from, 0);
    let epoch = Instant::now();
    let receiver = std::thread::spawn(move || {
        receive_stream(
            rx,
            Duration::from_millis(300),
            Duration::from_secs(5),
            epoch,
            false,
        )
    });
    send_bulk(
        &tx,
        SocketAddr::from((to_site.addr(), port)),
        bits_per_sec,
        duration,
    );
    receiver.join().expect("receiver")
}

/// Median time of `n` TCP connects from `a` to a listener in `b`.
pub fn tcp_connect_median(a: &Site, b: &Site, port: u16, n: usize) -> Duration {
    let addr_b: Ipv4Addr = b.addr();
    let listener = b
        .run(move || TcpListener::bind((addr_b, port)))
        .expect("enter b")
        .expect("listen");
    let acceptor = std::thread::spawn(move || {
        for _ in 0..n {
            let _ = listener.accept();
        }
    });
    let target = SocketAddr::from((addr_b, port));
    let times = a
        .run(move || {
            (0..n)
                .map(|_| {
                    let t0 = Instant::now();
                    let s = TcpStream::connect_timeout(&target, Duration::from_secs(5))
                        .expect("connect");
                    let t = t0.elapsed();
                    drop(s);
                    t
                })
                .collect::<Vec<_>>()
        })
        .expect("enter a");
    acceptor.join().expect("acceptor");
    median(times)
}

/// TCP: connect time and bulk goodput (bit/s of payload) from `a` to `b`
/// during `duration`.
pub fn tcp_bulk(a: &Site, b: &Site, port: u16, duration: Duration) -> (Duration, f64) {
    let addr_b: Ipv4Addr = b.addr();
    let listener = b
        .run(move || TcpListener::bind((addr_b, port)))
        .expect("enter b")
        .expect("listen");
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("accept");
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0u64;
        let mut first: Option<Instant> = None;
        loop {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    first.get_or_insert_with(Instant::now);
                    total += n as u64;
                }
            }
        }
        (total, first.map(|f| f.elapsed()).unwrap_or_default())
    });
    let target = SocketAddr::from((addr_b, port));
    let (connect_time, mut stream) = a
        .run(move || {
            let t0 = Instant::now();
            let s = TcpStream::connect_timeout(&target, Duration::from_secs(5)).expect("connect");
            (t0.elapsed(), s)
        })
        .expect("enter a");
    let chunk = vec![0x5au8; 1 << 16];
    let t0 = Instant::now();
    while t0.elapsed() < duration {
        if stream.write_all(&chunk).is_err() {
            break;
        }
    }
    drop(stream);
    let (total, span) = server.join().expect("server");
    (
        connect_time,
        total as f64 * 8.0 / span.as_secs_f64().max(1e-9),
    )
}

/// Builds a WAN or panics with the error.
pub fn up(builder: ferry_netem::WanBuilder) -> Wan {
    match builder.up() {
        Ok(w) => w,
        Err(e) => panic!("WAN up failed: {e}"),
    }
}
