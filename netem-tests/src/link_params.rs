//! The parameters of one direction of an emulated WAN link, shared by both backends.

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
