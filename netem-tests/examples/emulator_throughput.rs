//! Measures how many packets per second the userspace emulator forwards:
//! an unlimited-rate, zero-delay WAN, a UDP sender in site A blasting
//! 1500-byte IP packets for a few seconds, a receiver in site B counting.
//! Prints the sender, emulator and receiver rates and per-thread CPU use.
//!
//! Run as root: `cargo run --release -p ferry-netem --example emulator_throughput [SECONDS] [PAYLOAD] [RATE]`

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_netem::{Backend, Wan};
use ferry_testkit::sys::{clock_ticks_per_second, enable_udp_gso, set_socket_int};

fn thread_cpu() -> Vec<(String, f64)> {
    let hz = clock_ticks_per_second() as f64;
    let mut out = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
        for e in dir.flatten() {
            let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
            let f: Vec<&str> = after.split_whitespace().collect();
            if f.len() > 13 {
                let t = f[11].parse::<f64>().unwrap_or(0.0) + f[12].parse::<f64>().unwrap_or(0.0);
                out.push((comm.trim().to_string(), t / hz));
            }
        }
    }
    out
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let secs: f64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let payload: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1472);
    let rate: u64 = args
        .get(3)
        .map(|s| ferry_units::parse_rate_limit(s))
        .transpose()?
        .flatten()
        .map_or(0, ferry_units::Bandwidth::bits_per_second);
    let wan = Wan::builder()
        .backend(Backend::Userspace)
        .rate_bps(rate)
        .queue(Duration::from_millis(20))
        .up()?;
    let b = wan.site_b().clone();
    let addr_b = b.addr();
    let rx = b.run(move || UdpSocket::bind((addr_b, 9999)))??;
    let a = wan.site_a().clone();
    let addr_a = a.addr();
    let tx = a.run(move || UdpSocket::bind((addr_a, 0)))??;
    rx.set_read_timeout(Some(Duration::from_millis(200)))?;
    // Best effort: big buffers so the sockets are not the bottleneck.
    let _ = set_socket_int(&rx, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 16 << 20);
    let _ = set_socket_int(&tx, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, 4 << 20);
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (r2, s2) = (received.clone(), stop.clone());
    let receiver = std::thread::Builder::new()
        .name("receiver".into())
        .spawn(move || {
            let mut buf = [0u8; 2048];
            while !s2.load(Ordering::Relaxed) {
                if rx.recv(&mut buf).is_ok() {
                    r2.fetch_add(1, Ordering::Relaxed);
                }
            }
        })?;
    let to = SocketAddr::from((wan.site_b().addr(), 9999));
    let sent = Arc::new(AtomicU64::new(0));
    let sent2 = sent.clone();
    let stop_tx = Arc::new(AtomicBool::new(false));
    let stop_tx2 = stop_tx.clone();
    let sender = std::thread::Builder::new()
        .name("sender".into())
        .spawn(move || {
            // UDP GSO: one send carries 32 datagrams, so the sender costs little CPU.
            let gso = enable_udp_gso(&tx, payload).is_ok();
            let per_send = if gso { 32 } else { 1 };
            let msg = vec![0u8; payload * per_send];
            while !stop_tx2.load(Ordering::Relaxed) {
                for _ in 0..8 {
                    if tx.send_to(&msg, to).is_ok() {
                        sent2.fetch_add(per_send as u64, Ordering::Relaxed);
                    }
                }
            }
        })?;
    std::thread::sleep(Duration::from_millis(500));
    let cpu0 = thread_cpu();
    let (s0, r0, st0) = (
        sent.load(Ordering::Relaxed),
        received.load(Ordering::Relaxed),
        wan.stats().unwrap_or_default(),
    );
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    let dt = t0.elapsed().as_secs_f64();
    let (s1, r1, st1) = (
        sent.load(Ordering::Relaxed),
        received.load(Ordering::Relaxed),
        wan.stats().unwrap_or_default(),
    );
    let cpu1 = thread_cpu();
    stop_tx.store(true, Ordering::Relaxed);
    sender.join().ok();
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    receiver.join().ok();
    let ip = (payload + 28) as f64;
    let fwd = (st1.a_to_b.delivered - st0.a_to_b.delivered) as f64 / dt;
    println!(
        "packet size (IP): {ip} bytes, window {dt:.2} s, rate limit {}",
        ferry_netem::link_params::human_rate(rate)
    );
    println!("sender:    {:>9.0} pkt/s", (s1 - s0) as f64 / dt);
    println!(
        "emulator:  {:>9.0} pkt/s read, {:>9.0} pkt/s forwarded = {:.3} Gbit/s",
        (st1.a_to_b.received - st0.a_to_b.received) as f64 / dt,
        fwd,
        fwd * ip * 8.0 / 1e9
    );
    println!(
        "receiver:  {:>9.0} pkt/s = {:.3} Gbit/s",
        (r1 - r0) as f64 / dt,
        (r1 - r0) as f64 / dt * ip * 8.0 / 1e9
    );
    println!("drops: {:?}", st1.a_to_b);
    let emu_cpu = cpu1
        .iter()
        .filter(|(n, _)| n == "netem-a>b")
        .map(|(_, t)| *t)
        .sum::<f64>()
        - cpu0
            .iter()
            .filter(|(n, _)| n == "netem-a>b")
            .map(|(_, t)| *t)
            .sum::<f64>();
    if fwd > 0.0 {
        println!(
            "emulator CPU per forwarded packet: {:.2} us",
            emu_cpu / dt / fwd * 1e6
        );
    }
    for (name, t1) in &cpu1 {
        let t0 = cpu0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| *t)
            .unwrap_or(0.0);
        if t1 - t0 > 0.01 {
            println!("cpu {name:<12} {:>5.1} %", (t1 - t0) / dt * 100.0);
        }
    }
    Ok(())
}
