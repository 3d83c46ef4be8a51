//! Benchmark: `ferry-host migrate` through the gateways with and without steering, side by
//! side on the same emulated links and guests (real QEMU under TCG, real gateways).
//!
//! `cargo build --workspace --release --all-targets && cargo bench -p ferry-netem --bench migrate_downtime` (root, qemu-system-x86 installed).
//! `FERRY_BENCH_RUNS` sets the runs per cell (default 2). Prints one line per run and a table.
//! "steered" is the default: QEMU's bandwidth cap and downtime limit follow the gateway's drain
//! measurements. "QEMU alone" (`--no-steer`) leaves convergence to QEMU, which sees LAN speed.

#[path = "../tests/host_support/mod.rs"]
mod host_support;

use ferry_netem::qemu::GuestConfig;
use ferry_testkit::bench::env_parse;
use serde_json::Value;
use host_support::{migrate_command, report_of, setup, start_vms};

struct Scenario {
    name: &'static str,
    rate_bps: u64,
    bandwidth: &'static str,
    memory_mib: u32,
    guest: GuestConfig,
    max_time: &'static str,
}

fn f(v: &Value) -> String {
    v.as_f64().map_or("-".into(), |x| format!("{x:.0}"))
}

fn main() {
    let runs: usize = env_parse("FERRY_BENCH_RUNS", 2);
    let scenarios = [
        Scenario {
            name: "quiet 64 MiB guest, 200 Mbit/s",
            rate_bps: 200_000_000,
            bandwidth: "200mbit",
            memory_mib: 64,
            guest: GuestConfig { dirty_pages_per_tick: 8, verify_every_ticks: 0, retouch: true, tick_jiffies: 2, ..GuestConfig::default() },
            max_time: "2m",
        },
        Scenario {
            name: "busy guest (~12 MB/s dirtied), 40 Mbit/s",
            rate_bps: 40_000_000,
            bandwidth: "40mbit",
            memory_mib: 64,
            guest: GuestConfig { dirty_pages_per_tick: 300, verify_every_ticks: 0, retouch: true, rand_mib: 32, ..GuestConfig::default() },
            max_time: "2m",
        },
    ];
    let mut rows = Vec::new();
    for sc in &scenarios {
        let Some(s) = setup(sc.name, sc.rate_bps, sc.bandwidth) else { return };
        for steer in [true, false] {
            for run in 0..runs {
                let name = format!("bench{}{}", u8::from(steer), run);
                // A fresh seed per run: otherwise the destination's page cache already holds
                // the guest's pages and every run after the first measures a second guest.
                let guest = GuestConfig { seed: 0x1234_5678 ^ (rows.len() as u32 + 1).wrapping_mul(0x9E37_79B9), ..sc.guest.clone() };
                let (_src, _dst, qmp, hb) = start_vms(&s, &name, sc.memory_mib, &guest);
                let mut extra = vec!["--max-time", sc.max_time];
                if !steer {
                    extra.push("--no-steer");
                }
                let out = migrate_command(&s, &qmp, &hb, &extra).output().expect("run ferry-host migrate");
                let r = report_of(&out);
                let mode = if steer { "steered" } else { "QEMU alone" };
                let row = format!(
                    "| {} | {mode} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    sc.name,
                    r["outcome"].as_str().unwrap_or("?"),
                    r["total_time_s"].as_f64().map_or("-".into(), |x| format!("{x:.1}")),
                    f(&r["pause_ms"]),
                    f(&r["guest_downtime_ms"]),
                    f(&r["qemu_downtime_ms"]),
                    r["iterations"],
                    r["max_throttle_percent"],
                    r["bytes_on_wan"].as_u64().map_or("-".into(), |b| format!("{:.1}", b as f64 / 1048576.0)),
                );
                println!("{row}");
                rows.push(row);
            }
        }
    }
    println!("\n| scenario (150 ms RTT, 0.1 % loss) | mode | outcome | total s | pause ms (STOP→RESUME) | guest downtime ms | QEMU downtime ms | passes | max throttle % | WAN MiB |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
}
