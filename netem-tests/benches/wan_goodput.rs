//! Goodput benchmark: direct TCP vs. the Ferry gateway pair on the same emulated WAN.
//!
//! For each RTT × loss cell (1 Gbit/s bottleneck) it brings up a fresh pair of sites, then
//! measures, one after the other on that same link, (a) one direct TCP connection between the
//! sites with the machine's default sysctls and (b) one TCP connection through the gateways.
//! Goodput is bytes received per second after a warm-up, with incompressible data.
//!
//! Run (root): `cargo bench -p ferry-netem --bench wan_goodput`
//! Options via environment: FERRY_BENCH_SECONDS (measured seconds per transfer, default 10),
//! FERRY_BENCH_WARMUP (seconds, default 3), FERRY_BENCH_RTTS (ms list, default "0.2,50,150"),
//! FERRY_BENCH_LOSSES (percent list, default "0,0.1,1"), FERRY_BENCH_RATE (Mbit/s, default 1000).

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use ferry_netem::bulk::{self, Receiver};
use ferry_netem::gateway_pair::GatewayPair;
use ferry_netem::Wan;
use ferry_testkit::bench::{env_f64, env_list};
use ferry_testkit::sys::is_root;
use ferry_testkit::tracing::init_tracing_stderr;

use support::{gateway_link, wan_or_exit};

/// One transfer of at most `seconds` + warm-up; returns goodput in Mbit/s.
fn measure(wan: &Wan, target: SocketAddr, via: SocketAddr, warmup: Duration, seconds: Duration) -> Result<f64, String> {
    let receiver = Receiver::start(wan.site_b(), target, warmup, warmup + seconds + Duration::from_secs(5), false).map_err(|e| e.to_string())?;
    let sent = bulk::send(wan.site_a(), via, 1, u64::MAX, warmup + seconds).map_err(|e| format!("send: {e}"))?;
    let got = receiver.finish().map_err(|e| format!("receive: {e}"))?;
    if got.bytes != sent {
        return Err(format!("sent {sent} bytes but {} arrived", got.bytes));
    }
    Ok(got.goodput_bps() / 1e6)
}

fn main() {
    // RUST_LOG=ferry_gateway::tunnel::link=debug shows the tunnel's RTT, cwnd and losses.
    init_tracing_stderr();
    if !is_root() {
        println!("skipping wan_goodput: needs root (network namespaces)");
        return;
    }
    let seconds = Duration::from_secs_f64(env_f64("FERRY_BENCH_SECONDS", 10.0));
    let warmup = Duration::from_secs_f64(env_f64("FERRY_BENCH_WARMUP", 3.0));
    let rate_mbit = env_f64("FERRY_BENCH_RATE", 1000.0);
    let rtts = env_list("FERRY_BENCH_RTTS", "0.2,50,150");
    let losses = env_list("FERRY_BENCH_LOSSES", "0,0.1,1");

    let mut rows = Vec::new();
    let mut backend_name = String::new();
    for &rtt_ms in &rtts {
        for &loss_pct in &losses {
            let wan = wan_or_exit(rtt_ms, rate_mbit, loss_pct);
            backend_name = format!("{:?}", wan.backend());
            let b = wan.site_b().addr();
            let direct_target = SocketAddr::from((b, 5001));
            let gw_target = SocketAddr::from((b, 5002));
            let direct = measure(&wan, direct_target, direct_target, warmup, seconds);
            let link = gateway_link(rate_mbit, rtt_ms, false);
            let gateway = match GatewayPair::start(&wan, link, gw_target) {
                Ok(pair) => {
                    let r = measure(&wan, gw_target, pair.forward_addr, warmup, seconds);
                    drop(pair);
                    r
                }
                Err(e) => Err(e.to_string()),
            };
            let cell = |r: &Result<f64, String>| match r {
                Ok(v) => format!("{v:.1}"),
                Err(e) => format!("error: {e}"),
            };
            let ratio = match (&direct, &gateway) {
                (Ok(d), Ok(g)) if *d > 0.0 => format!("{:.2}", g / d),
                _ => "-".into(),
            };
            let of_link = match &gateway {
                Ok(g) => format!("{:.0} %", g / rate_mbit * 100.0),
                Err(_) => "-".into(),
            };
            let row = format!(
                "| {rtt_ms} ms | {loss_pct} % | {} | {} | {ratio} | {of_link} |",
                cell(&direct),
                cell(&gateway)
            );
            eprintln!("{row}");
            rows.push(row);
        }
    }
    println!();
    println!(
        "Goodput, Mbit/s, {rate_mbit} Mbit/s bottleneck, {}s measured after {}s warm-up, WAN backend {backend_name}",
        seconds.as_secs_f64(),
        warmup.as_secs_f64()
    );
    println!();
    println!("| RTT | loss | direct TCP | through gateways | gateway / direct | gateway / link |");
    println!("|---|---|---|---|---|---|");
    for row in rows {
        println!("{row}");
    }
}
