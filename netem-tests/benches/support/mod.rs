//! What every emulated-WAN benchmark needs beyond the test kit (`ferry_testkit::bench` has
//! the settings from the environment): the link.

#![allow(dead_code)]

use std::time::Duration;

use ferry_netem::{Backend, Wan};

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
