//! Pieces every emulated-WAN benchmark needs: its settings from the environment, and the link.

#![allow(dead_code)]

use std::time::Duration;

use ferry_netem::{Backend, Wan};

/// A number from the environment variable `name`, or `default` when unset or unparsable.
pub fn env_f64(name: &str, default: f64) -> f64 {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// Two emulated sites joined by `rtt_ms` / `rate_mbit` / `loss_pct`; exits the benchmark when
/// the link cannot come up (nothing to measure without it).
pub fn wan_or_exit(rtt_ms: f64, rate_mbit: f64, loss_pct: f64) -> Wan {
    let built = Wan::builder()
        .rtt(Duration::from_secs_f64(rtt_ms / 1000.0))
        .rate_bps((rate_mbit * 1e6) as u64)
        .loss(loss_pct / 100.0)
        .backend(Backend::Auto)
        .up();
    match built {
        Ok(w) => w,
        Err(e) => {
            eprintln!("cannot bring up the WAN: {e}");
            std::process::exit(1);
        }
    }
}
