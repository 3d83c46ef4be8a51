//! The parameters of one direction of an emulated WAN link, shared by both backends, and how
//! their rate reads to humans.

use std::time::Duration;

/// What one direction of the link does to packets.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkParams {
    /// One-way propagation delay.
    pub delay: Duration,
    /// Jitter: each packet's delay is `delay ± U(0, jitter)`; the userspace
    /// emulator never reorders, netem may.
    pub jitter: Duration,
    /// Bottleneck rate in bit/s of IP bytes; 0 = unlimited.
    pub rate_bps: u64,
    /// Drop-tail queue in front of the bottleneck, as the longest queueing delay admitted.
    pub queue: Duration,
    /// Probability of dropping each packet (0.0..=1.0).
    pub loss: f64,
    /// Window after start during which every packet is dropped.
    pub outage: Option<(Duration, Duration)>,
    /// Seed of the loss/jitter random generator.
    pub seed: u64,
}

impl LinkParams {
    /// A generous packet rate for sizing buffers: twice the full-size (1500 B)
    /// packet rate of the bottleneck, at least 10k/s; 400k/s when unlimited.
    pub fn packet_rate_estimate(&self) -> f64 {
        if self.rate_bps == 0 {
            400_000.0
        } else {
            (self.rate_bps as f64 / 8.0 / 750.0).max(10_000.0)
        }
    }
}

/// Formats a rate (bits per second, 0 = unlimited, as in [`LinkParams::rate_bps`]) for humans:
/// `1 Gbit/s`, `200 Mbit/s`, `unlimited`.
pub fn human_rate(bits_per_sec: u64) -> String {
    let b = bits_per_sec as f64;
    match bits_per_sec {
        0 => "unlimited".to_string(),
        x if x >= 1_000_000_000 => format!("{} Gbit/s", trim_float(b / 1e9)),
        x if x >= 1_000_000 => format!("{} Mbit/s", trim_float(b / 1e6)),
        x if x >= 1_000 => format!("{} kbit/s", trim_float(b / 1e3)),
        _ => format!("{bits_per_sec} bit/s"),
    }
}

fn trim_float(x: f64) -> String {
    let s = format!("{x:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_rates() {
        assert_eq!(human_rate(1_000_000_000), "1 Gbit/s");
        assert_eq!(human_rate(200_000_000), "200 Mbit/s");
        assert_eq!(human_rate(1_500_000), "1.5 Mbit/s");
        assert_eq!(human_rate(0), "unlimited");
    }
}
