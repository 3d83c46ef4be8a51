//! Convergence control (sans-IO): keeps QEMU's view of the link true and throttles a guest that
//! dirties memory faster than the WAN drains.
//!
//! QEMU measures bandwidth on its local socket. Behind a gateway that socket runs at LAN speed
//! until the gateway's buffers fill, so QEMU overestimates the link, switches over with far
//! more data outstanding than its downtime limit allows, and its auto-converge never sees the
//! guest outrunning the link. The controller fixes QEMU's inputs instead of replacing QEMU's
//! logic:
//!
//! - **Rate**: `max-bandwidth` follows the rate the WAN really drains, measured by the gateway
//!   in QEMU's bytes (acknowledged wire bytes × the codec's reduction). When a queue builds in
//!   the gateways the cap drops below the drain rate until it empties (to a trickle near the end
//!   of a pass, where QEMU might otherwise switch over with the queue in line); while QEMU keeps up with
//!   the cap and no queue builds, the cap probes upwards (the codec may drain far more QEMU
//!   bytes than the link carries). QEMU's own bandwidth figure, its switchover decision and its
//!   auto-converge trigger (dirtied vs. transferred bytes per pass) then all see the real link.
//! - **Downtime**: `downtime-limit` is the operator's target minus what the WAN adds after
//!   QEMU stops the guest (half a round trip and the queue still in the gateways), scaled by
//!   drain ÷ QEMU's own bandwidth figure, since QEMU multiplies it by the latter. While that
//!   queue is large (and before the first measurement) it is 1 ms, which holds QEMU's
//!   switchover as long as the guest dirties anything: QEMU cannot see bytes waiting in the
//!   gateways and would stop the guest with them in line.
//! - **Throttle**: auto-converge is on; each pass that ends with the guest still dirtying
//!   faster than the link drains raises `cpu-throttle-increment` (the step QEMU adds per
//!   pass), like vMotion's stun-during-page-send, until the migration converges.
//! - **Deadline**: past `max_time` the migration is cancelled (the source keeps running).

use std::collections::VecDeque;
use std::time::Duration;

/// What the controller is told at start.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// The guest downtime the operator aims for.
    pub target_downtime: Duration,
    /// Give up (cancel) after this long.
    pub max_time: Duration,
    /// The link's configured rate (`link.bandwidth` of the gateway), bytes per second: the
    /// starting cap.
    pub link_bytes_per_sec: u64,
    /// The link's round-trip time until the tunnel reports a measurement.
    pub rtt: Duration,
    /// The tunnel's congestion window when the migration starts, bytes, if known.
    pub cwnd: Option<u64>,
}

/// One observation: QEMU's `query-migrate` and the gateway's forward counters.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    /// Time since the migration started.
    pub at: Duration,
    /// QEMU: bytes sent.
    pub transferred: u64,
    /// QEMU: dirty bytes still to send.
    pub remaining: u64,
    /// QEMU: pages dirtied per second (last pass).
    pub dirty_pages_rate: u64,
    /// QEMU: page size (0 when unknown: 4096 is assumed).
    pub page_size: u64,
    /// QEMU: dirty bitmap syncs so far (one per pass).
    pub dirty_sync_count: u64,
    /// QEMU: current auto-converge throttle, percent.
    pub throttle_percent: u64,
    /// QEMU: its own bandwidth figure (`ram.mbps`, Mbit/s), which its switchover threshold
    /// (`bandwidth × downtime-limit`) uses; 0 when not reported.
    pub qemu_mbps: f64,
    /// Gateway: bytes read from QEMU.
    pub tcp_in: u64,
    /// Gateway: encoded bytes handed to the tunnel.
    pub wire_sent: u64,
    /// Gateway: encoded bytes the destination delivered.
    pub wire_acked: u64,
    /// Gateway: the tunnel's smoothed RTT, if connected.
    pub rtt: Option<Duration>,
    /// Gateway: the tunnel's congestion window, bytes, if connected.
    pub cwnd: Option<u64>,
}

impl Sample {
    /// Bytes QEMU wrote that the gateway has not read yet: they wait in the local TCP socket
    /// buffers (several MiB with autotuning), invisible to the gateway's counters.
    fn unread_by_gateway(&self) -> u64 {
        self.transferred.saturating_sub(self.tcp_in)
    }
}

/// What the controller believes, for progress display and the report.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Estimate {
    /// Bytes per second the WAN drains, in QEMU's bytes (before the codec).
    pub drain: f64,
    /// Encoded bytes per second delivered across the WAN.
    pub wan_rate: f64,
    /// QEMU bytes per wire byte so far (≥ 1 when the codec saves).
    pub reduction: f64,
    /// QEMU bytes waiting between QEMU and the destination (local socket buffers, gateways)
    /// beyond what a round trip keeps in flight.
    pub queue: f64,
    /// Bytes per second the guest dirties.
    pub dirty_rate: f64,
    /// Downtime if QEMU switched over now.
    pub predicted_downtime: Duration,
    /// Whether the guest dirties slower than the link drains.
    pub converging: bool,
}

/// Parameter changes to apply to the source QEMU; `None` = leave as is.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Decision {
    /// New `max-bandwidth`, bytes per second.
    pub max_bandwidth: Option<u64>,
    /// New `downtime-limit`, ms.
    pub downtime_limit_ms: Option<u64>,
    /// New `cpu-throttle-increment`, percent.
    pub throttle_increment: Option<u8>,
    /// Cancel the migration, for this reason.
    pub cancel: Option<String>,
}

/// Window over which rates are measured.
const RATE_WINDOW: Duration = Duration::from_millis(500);
/// Queue (beyond a round trip in flight) tolerated before the cap drops, seconds of drain.
const QUEUE_TARGET_S: f64 = 0.2;
/// Ack interval of the gateway's flows (bytes delivered but not yet acknowledged), seconds.
const ACK_SLACK_S: f64 = 0.05;
/// A guest dirtying less than this fraction of the drain rate is quiet: QEMU converges on it
/// even with the held downtime limit.
const QUIET_GUEST: f64 = 0.1;
/// A pass ending within this many seconds at QEMU's pace is near its end.
const ENDGAME_S: f64 = 0.5;
/// Cap while draining a queue, as a fraction of the drain rate.
const DRAIN_FACTOR: f64 = 0.85;
/// Cap growth per decision while probing.
const PROBE_FACTOR: f64 = 1.25;
/// Smallest and largest cap.
const MIN_CAP: f64 = 256.0 * 1024.0;
const MAX_CAP: f64 = 64.0 * 1024.0 * 1024.0 * 1024.0;
/// Parameter changes smaller than this fraction are not sent.
const HYSTERESIS: f64 = 0.05;
/// `downtime-limit` that holds QEMU's switchover while a dirtying guest leaves pages to send.
/// Not 0: with a zero threshold QEMU skips the dirty-bitmap sync after a pass and completes at
/// once (QEMU 7.2 `ram_save_pending`), the opposite of holding.
const HOLD_DOWNTIME_LIMIT_MS: u64 = 1;
/// Smallest `downtime-limit` set once the link is measured, ms.
const MIN_DOWNTIME_LIMIT_MS: u64 = 30;
/// QEMU's default `cpu-throttle-increment` and the largest step the controller escalates to.
pub const THROTTLE_INCREMENT_START: u8 = 10;
const THROTTLE_INCREMENT_MAX: u8 = 40;

/// What the tunnel can carry while its congestion window grows (QEMU bytes per second):
/// twice a window per round trip, as the window itself doubles about every round trip.
fn ramp_rate(cwnd: u64, rtt: Duration, reduction: f64) -> f64 {
    2.0 * cwnd as f64 / rtt.as_secs_f64().max(0.001) * reduction
}

/// The controller. Feed it a [`Sample`] every few hundred ms.
#[derive(Debug)]
pub struct ConvergenceController {
    config: ControllerConfig,
    samples: VecDeque<Sample>,
    cap: f64,
    downtime_limit_ms: u64,
    throttle_increment: u8,
    last_sync: u64,
    stalled_passes: u32,
    estimate: Estimate,
}

impl ConvergenceController {
    /// A controller for one migration.
    pub fn new(config: ControllerConfig) -> Self {
        let mut cap = config.link_bytes_per_sec as f64;
        if let Some(cwnd) = config.cwnd {
            cap = cap.min(ramp_rate(cwnd, config.rtt, 1.0));
        }
        let cap = cap.clamp(MIN_CAP, MAX_CAP);
        let mut c = Self {
            config,
            samples: VecDeque::new(),
            cap,
            downtime_limit_ms: 0,
            throttle_increment: THROTTLE_INCREMENT_START,
            last_sync: 0,
            stalled_passes: 0,
            estimate: Estimate { reduction: 1.0, ..Estimate::default() },
        };
        // Hold the switchover until the gateway has measured the link.
        c.downtime_limit_ms = c.downtime_limit(c.config.rtt, 0.0, 0.0);
        c
    }

    /// `max-bandwidth` to start with, bytes per second: the configured link rate, or less while
    /// the tunnel's congestion window is still small.
    pub fn initial_max_bandwidth(&self) -> u64 {
        self.cap as u64
    }

    /// `downtime-limit` to start with, ms.
    pub fn initial_downtime_limit_ms(&self) -> u64 {
        self.downtime_limit_ms
    }

    /// The latest estimate.
    pub fn estimate(&self) -> Estimate {
        self.estimate
    }

    /// Current `cpu-throttle-increment`.
    pub fn throttle_increment(&self) -> u8 {
        self.throttle_increment
    }

    /// `downtime-limit` for the current state: the target minus the WAN's share (half a round
    /// trip) while the gateways hold no more than a small queue; [`HOLD_DOWNTIME_LIMIT_MS`]
    /// while they hold more, because QEMU cannot see that queue and would otherwise switch over
    /// with it still to cross. An unreachable target still gets [`MIN_DOWNTIME_LIMIT_MS`] so the
    /// migration can finish.
    fn downtime_limit(&self, rtt: Duration, queue: f64, drain: f64) -> u64 {
        if drain <= 0.0 || queue.max(0.0) / drain > QUEUE_TARGET_S {
            return HOLD_DOWNTIME_LIMIT_MS;
        }
        let ms = (self.config.target_downtime.as_secs_f64() - rtt.as_secs_f64() / 2.0 - queue.max(0.0) / drain) * 1e3;
        (ms.max(0.0) as u64).max(MIN_DOWNTIME_LIMIT_MS)
    }

    /// Takes a sample; returns the parameter changes to make.
    pub fn update(&mut self, sample: Sample) -> Decision {
        let mut decision = Decision::default();
        if sample.at >= self.config.max_time {
            decision.cancel = Some(format!(
                "not converged within {} (remaining {} MiB, dirtying {:.1} MiB/s, link drains {:.1} MiB/s)",
                humantime::format_duration(self.config.max_time),
                sample.remaining >> 20,
                self.estimate.dirty_rate / 1048576.0,
                self.estimate.drain / 1048576.0
            ));
            return decision;
        }
        // How fast QEMU works through the current pass (RAM bytes per second, zero pages
        // included), to see the end of a pass coming.
        let pass_end_near = match self.samples.back() {
            Some(prev) if sample.remaining < prev.remaining && sample.at > prev.at => {
                let rate = (prev.remaining - sample.remaining) as f64 / (sample.at - prev.at).as_secs_f64();
                (sample.remaining as f64) < rate * ENDGAME_S
            }
            _ => false,
        };
        self.samples.push_back(sample);
        while self.samples.len() > 2 && sample.at - self.samples[1].at >= RATE_WINDOW {
            self.samples.pop_front();
        }
        let Some(old) = self.samples.front().copied() else { return decision };
        let span = (sample.at - old.at).as_secs_f64();
        let rtt = sample.rtt.unwrap_or(self.config.rtt);
        let page = if sample.page_size == 0 { 4096 } else { sample.page_size };
        let dirty_rate = (sample.dirty_pages_rate * page) as f64;
        if span < RATE_WINDOW.as_secs_f64() * 0.9 || sample.wire_acked == 0 {
            // No delivery measured yet (the first acks are a round trip away). Meanwhile the
            // tunnel's window bounds what it can carry: keep QEMU within that, or a small VM
            // pours itself into the gateways and switches over before anything is measured.
            self.estimate.dirty_rate = dirty_rate;
            if let Some(cwnd) = sample.cwnd {
                let reduction = if sample.wire_sent > 0 { sample.tcp_in as f64 / sample.wire_sent as f64 } else { 1.0 };
                // More than two windows waiting means QEMU already outran the tunnel: trickle
                // until it catches up.
                let backlog = sample.wire_sent.saturating_sub(sample.wire_acked) + sample.unread_by_gateway();
                let cap = if backlog > 2 * cwnd || (backlog > cwnd && pass_end_near) {
                    MIN_CAP
                } else {
                    ramp_rate(cwnd, rtt, reduction.clamp(1.0, 10_000.0)).clamp(MIN_CAP, MAX_CAP)
                };
                if (cap - self.cap).abs() > self.cap * HYSTERESIS {
                    self.cap = cap;
                    decision.max_bandwidth = Some(cap as u64);
                }
            }
            return decision;
        }

        let d_in = sample.tcp_in.saturating_sub(old.tcp_in) as f64;
        // The codec's reduction over the whole migration: over a short window it is skewed by
        // bytes read from QEMU but still queued before the tunnel.
        let reduction =
            if sample.wire_sent > 0 { sample.tcp_in as f64 / sample.wire_sent as f64 } else { 1.0 }.clamp(0.05, 10_000.0);
        let wan_rate = sample.wire_acked.saturating_sub(old.wire_acked) as f64 / span;
        let drain = wan_rate * reduction;
        let in_gateways = sample.wire_sent.saturating_sub(sample.wire_acked) as f64 * reduction + sample.unread_by_gateway() as f64;
        // A round trip's worth is in flight or awaiting its ack, plus up to one ack interval.
        let queue = in_gateways - drain * (rtt.as_secs_f64() + ACK_SLACK_S);
        let qemu_rate = d_in / span;

        // Rate: drain a standing queue; probe upwards while QEMU uses the cap and the queue is
        // small; in between, hold.
        let mut cap = self.cap;
        let queued = drain > 0.0 && queue > drain * QUEUE_TARGET_S;
        let quiet_guest = dirty_rate < drain * QUIET_GUEST;
        if queued && quiet_guest {
            // A queue, and a guest too quiet for the held downtime limit to keep QEMU
            // iterating: QEMU could switch over any moment (a pass over mostly zero pages ends
            // within one poll), unaware of the bytes still waiting. Slow it to a trickle until
            // the queue has drained; the queue keeps the link busy meanwhile. (A busier guest
            // is held by the limit alone.)
            cap = MIN_CAP;
        } else if queued {
            cap = drain * DRAIN_FACTOR;
        } else if queue < drain * QUEUE_TARGET_S / 4.0 && qemu_rate >= 0.8 * self.cap {
            cap = (self.cap * PROBE_FACTOR).max(drain);
        } else if self.cap < drain * DRAIN_FACTOR {
            // Leaving a hold: back to the drain rate at once.
            cap = drain * DRAIN_FACTOR;
        }
        cap = cap.clamp(MIN_CAP, MAX_CAP);
        if (cap - self.cap).abs() > self.cap * HYSTERESIS {
            self.cap = cap;
            decision.max_bandwidth = Some(cap as u64);
        }

        // Downtime limit: QEMU switches over once `its bandwidth × limit` covers what is left,
        // so translate the time budget for the real drain into QEMU's bandwidth terms.
        // QEMU re-measures its bandwidth every 100 ms and may burst up to the cap within one
        // window, so take the larger of its latest figure and the cap.
        let qemu_bandwidth = (sample.qemu_mbps * 1e6 / 8.0).max(qemu_rate).max(self.cap);
        let mut limit = self.downtime_limit(rtt, queue, drain);
        if limit != HOLD_DOWNTIME_LIMIT_MS && qemu_bandwidth > drain {
            limit = ((limit as f64 * drain / qemu_bandwidth) as u64).max(MIN_DOWNTIME_LIMIT_MS);
        }
        if limit != self.downtime_limit_ms && (limit == HOLD_DOWNTIME_LIMIT_MS || limit.abs_diff(self.downtime_limit_ms) as f64 > self.downtime_limit_ms as f64 * HYSTERESIS) {
            self.downtime_limit_ms = limit;
            decision.downtime_limit_ms = Some(limit);
        }

        // Throttle: after each pass, escalate while the guest outruns the link.
        let converging = dirty_rate < 0.8 * drain;
        if sample.dirty_sync_count > self.last_sync {
            self.last_sync = sample.dirty_sync_count;
            let done_soon = drain > 0.0 && (sample.remaining as f64) < drain * self.downtime_limit_ms as f64 / 1e3;
            if converging || done_soon {
                self.stalled_passes = 0;
            } else {
                self.stalled_passes += 1;
                if self.stalled_passes >= 2 && self.throttle_increment < THROTTLE_INCREMENT_MAX {
                    self.throttle_increment = (self.throttle_increment * 2).min(THROTTLE_INCREMENT_MAX);
                    decision.throttle_increment = Some(self.throttle_increment);
                }
            }
        }

        let predicted = if drain > 0.0 { (sample.remaining as f64 + queue.max(0.0)) / drain } else { f64::INFINITY };
        self.estimate = Estimate {
            drain,
            wan_rate,
            reduction,
            queue,
            dirty_rate,
            predicted_downtime: Duration::try_from_secs_f64(predicted + rtt.as_secs_f64() / 2.0).unwrap_or(Duration::MAX),
            converging,
        };
        decision
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const MB: f64 = 1e6;

    /// A controller for a 500 ms target on a 10 MB/s, 150 ms link (also used by the session
    /// tests).
    pub(crate) fn controller() -> ConvergenceController {
        ConvergenceController::new(ControllerConfig {
            target_downtime: Duration::from_millis(500),
            max_time: Duration::from_secs(600),
            link_bytes_per_sec: 10_000_000,
            rtt: Duration::from_millis(150),
            cwnd: None,
        })
    }

    /// A simulated source: QEMU sends at min(cap, qemu_max) into the gateway, whose queue the
    /// WAN drains at `link` wire bytes per second; the codec shrinks QEMU bytes by `reduction`;
    /// the destination's acknowledgements arrive a round trip after the bytes left.
    struct Sim {
        t: f64,
        tcp_in: f64,
        wire_sent: f64,
        departed: VecDeque<(f64, f64)>,
        queue: f64,
        wire_acked: f64,
        transferred: f64,
        syncs: u64,
    }

    const DT: f64 = 0.25;
    const RTT: f64 = 0.15;

    impl Sim {
        fn step(&mut self, c: &mut ConvergenceController, link: f64, reduction: f64, qemu_max: f64, remaining: u64, dirty_pages: u64) -> Decision {
            // The link moves in 10 ms steps; the controller samples every DT.
            for _ in 0..(DT / 0.01).round() as u32 {
                let qemu = c.cap.min(qemu_max) * 0.01;
                self.tcp_in += qemu;
                self.transferred += qemu;
                self.wire_sent += qemu / reduction;
                self.queue += qemu / reduction;
                let out = self.queue.min(link * 0.01);
                self.queue -= out;
                self.t += 0.01;
                let total = self.departed.back().map_or(0.0, |d| d.1) + out;
                self.departed.push_back((self.t, total));
                while self.departed.front().is_some_and(|&(t, _)| t <= self.t - RTT) {
                    self.wire_acked = self.departed.pop_front().map_or(self.wire_acked, |d| d.1);
                }
            }
            if ((self.t / DT).round() as u64).is_multiple_of(8) {
                self.syncs += 1;
            }
            c.update(Sample {
                at: Duration::from_secs_f64(self.t),
                transferred: self.transferred as u64,
                remaining,
                dirty_pages_rate: dirty_pages,
                page_size: 4096,
                dirty_sync_count: self.syncs,
                throttle_percent: 0,
                qemu_mbps: 0.0,
                tcp_in: self.tcp_in as u64,
                wire_sent: self.wire_sent as u64,
                wire_acked: self.wire_acked as u64,
                rtt: Some(Duration::from_secs_f64(RTT)),
                cwnd: None,
            })
        }
    }

    fn sim() -> Sim {
        Sim { t: 0.0, tcp_in: 0.0, wire_sent: 0.0, departed: VecDeque::new(), queue: 0.0, wire_acked: 0.0, transferred: 0.0, syncs: 0 }
    }

    #[test]
    fn cap_settles_near_the_drain_rate() {
        // Link 5 MB/s but configured as 10 MB/s: a queue builds, the cap must come down to
        // about the drain rate and the queue must stay small.
        let mut c = controller();
        let mut s = sim();
        for _ in 0..200 {
            s.step(&mut c, 5.0 * MB, 1.0, 1e12, 100 << 20, 0);
        }
        let e = c.estimate();
        assert!((4.0 * MB..6.0 * MB).contains(&e.drain), "{e:?}");
        assert!(c.cap < 6.5 * MB, "cap {}", c.cap);
        assert!(e.queue < 2.0 * MB, "{e:?}");
    }

    #[test]
    fn a_source_slower_than_the_link_is_never_squeezed() {
        // QEMU itself only manages 3 MB/s on a 5 MB/s link: no queue, so the cap must stay
        // above what QEMU sends.
        let mut c = controller();
        let mut s = sim();
        for _ in 0..200 {
            s.step(&mut c, 5.0 * MB, 1.0, 3.0 * MB, 100 << 20, 0);
        }
        assert!(c.cap >= 3.0 * MB, "cap {} {:?}", c.cap, c.estimate());
        assert!(c.estimate().queue < 1.0 * MB, "{:?}", c.estimate());
    }

    #[test]
    fn cap_grows_when_the_codec_saves() {
        // Link 5 MB/s of wire bytes but the codec shrinks QEMU's bytes 8×: 40 MB/s of QEMU bytes.
        let mut c = controller();
        let mut s = sim();
        for _ in 0..200 {
            s.step(&mut c, 5.0 * MB, 8.0, 1e12, 100 << 20, 0);
        }
        assert!(c.cap > 25.0 * MB, "cap {} {:?}", c.cap, c.estimate());
        assert!((30.0 * MB..50.0 * MB).contains(&c.estimate().drain), "{:?}", c.estimate());
    }

    #[test]
    fn outrunning_guest_escalates_the_throttle() {
        let mut c = controller();
        let mut s = sim();
        let mut raised = Vec::new();
        for _ in 0..200 {
            // 3000 pages/s = 12 MB/s dirtied against a 5 MB/s link.
            if let Some(step) = s.step(&mut c, 5.0 * MB, 1.0, 1e12, 50 << 20, 3000).throttle_increment {
                raised.push(step);
            }
        }
        assert!(!c.estimate().converging);
        assert_eq!(raised, vec![20, 40], "{raised:?}");
    }

    #[test]
    fn converging_guest_is_not_throttled_harder() {
        let mut c = controller();
        let mut s = sim();
        for _ in 0..200 {
            let d = s.step(&mut c, 5.0 * MB, 1.0, 1e12, 50 << 20, 100);
            assert_eq!(d.throttle_increment, None);
        }
        assert!(c.estimate().converging);
    }

    #[test]
    fn downtime_limit_holds_until_measured_then_leaves_room_for_the_wan() {
        let mut c = controller();
        assert_eq!(c.initial_downtime_limit_ms(), HOLD_DOWNTIME_LIMIT_MS, "switchover held before any measurement");
        let mut s = sim();
        let mut limits = Vec::new();
        for i in 0..200 {
            s.step(&mut c, 5.0 * MB, 1.0, 1e12, 100 << 20, 0);
            if i >= 40 {
                limits.push(c.downtime_limit_ms);
            }
        }
        // Settled, the queue swings between a twentieth and a fifth of a second of drain: the
        // limit is the 500 ms target - 75 ms one way - that queue, or a hold while it is above.
        let released: Vec<u64> = limits.iter().copied().filter(|&l| l != HOLD_DOWNTIME_LIMIT_MS).collect();
        assert!(released.len() * 2 >= limits.len(), "held most of the time: {limits:?}");
        assert!(released.iter().all(|l| (150..=425).contains(l)), "{released:?}");
        let tight = ConvergenceController::new(ControllerConfig { target_downtime: Duration::from_millis(50), ..c.config.clone() });
        assert_eq!(tight.downtime_limit(Duration::from_millis(150), 0.0, 1e6), MIN_DOWNTIME_LIMIT_MS);
    }

    #[test]
    fn a_standing_queue_holds_the_switchover() {
        let c = controller();
        // 1 s of drain waiting in the gateways.
        assert_eq!(c.downtime_limit(Duration::from_millis(150), 5.0 * MB, 5.0 * MB), HOLD_DOWNTIME_LIMIT_MS);
    }

    #[test]
    fn deadline_cancels() {
        let mut c = controller();
        let d = c.update(Sample { at: Duration::from_secs(601), ..Sample::default() });
        assert!(d.cancel.unwrap().contains("not converged within"));
    }
}
