//! A delivery-rate / min-RTT congestion controller for long fat links ("Ferry model"),
//! implemented against quinn's public `Controller` trait.
//!
//! Why not quinn's own: CUBIC treats every loss as congestion and collapses under 0.1–1 % random
//! loss on a 150 ms path; quinn's BBR port overshoots the bottleneck because quinn's pacer ignores
//! BBR's pacing rate. This controller keeps a model instead:
//! - `bottleneck`: windowed maximum of the measured delivery rate (bytes acknowledged per round,
//!   a round being one min-RTT), capped by the operator's `link.bandwidth`;
//! - `min_rtt`: windowed minimum RTT (10 s).
//!
//! quinn paces at 1.25 × window / smoothed RTT and never lets more than `window` bytes be in
//! flight, so the window is the only lever. It is set to `gain × bottleneck × min_rtt` plus a
//! little headroom for ACK aggregation: in flight stays near one bandwidth-delay product, so the
//! bottleneck queue stays short (at most the headroom) while the pipe stays full.
//!
//! Phases, as in BBR: Startup (gain 2.89 until the rate stops growing 25 % per round for three
//! rounds), Drain (one round at 0.75), then ProbeBandwidth cycling gains
//! `[1.25, 0.85, 1, 1, 1, 1, 1, 1]` per round so a freed-up link is found again.
//!
//! Loss and queueing: random loss below [`LOSS_THRESHOLD`] per round is not congestion and is
//! ignored (the physical limit on a lossy link is rate × (1 − p), which a loss-blind controller
//! reaches). Above it, or when the RTT stays well above min-RTT (a queue we did not cause, i.e. a
//! shared, congested link), the controller lowers a rate ceiling by 15 % per such round and lets
//! it recover by 5 % per clean round. Next to loss-based TCP on a shared bottleneck it therefore
//! yields once its traffic plus theirs builds a standing queue or drives loss past 2 % per round,
//! and takes back capacity as it frees up; with a deep buffer CUBIC can still push it down to a
//! fair-ish share, with a very shallow one it behaves like BBRv1 and can take more than half.
//! Persistent congestion (an outage) restarts Startup.

use std::any::Any;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use quinn::congestion::{Controller, ControllerFactory};
use std::time::Instant;

use quinn_proto::RttEstimator;

/// Loss fraction per round above which loss counts as congestion.
pub const LOSS_THRESHOLD: f64 = 0.02;
/// Startup gain (2/ln 2, as BBR): doubles delivery each round.
const STARTUP_GAIN: f64 = 2.89;
const DRAIN_GAIN: f64 = 0.75;
const PROBE_GAINS: [f64; 8] = [1.25, 0.85, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0];
/// Extra window over one BDP for ACK aggregation and delayed ACKs.
const HEADROOM: f64 = 1.15;
/// Rounds the maximum-rate filter remembers.
const BW_WINDOW_ROUNDS: usize = 10;
/// How long a min-RTT sample stays valid.
const MIN_RTT_WINDOW: Duration = Duration::from_secs(10);
/// Rounds are at least this long, so rate samples on very short paths average over enough ACKs.
const MIN_ROUND: Duration = Duration::from_millis(10);
/// Floor for the RTT the window is sized from. On sub-millisecond paths the delay is dominated
/// by host scheduling and ACK batching rather than the wire; sizing for at least this long keeps
/// the pipe full there, at the cost of at most this much standing queue.
const MIN_BDP_RTT: Duration = Duration::from_millis(4);
/// Smallest window, in datagrams.
const MIN_WINDOW_PACKETS: u64 = 16;
/// Window before the first rate sample, in datagrams (as quinn's BBR).
const INITIAL_WINDOW_PACKETS: u64 = 200;

/// Builds [`RateModel`] controllers for a link.
#[derive(Clone, Debug)]
pub struct RateModelConfig {
    /// Operator cap on the sending rate, bytes per second (`link.bandwidth`).
    pub max_rate: u64,
}

impl ControllerFactory for RateModelConfig {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(RateModel::new(self.max_rate, now, current_mtu))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Startup,
    Drain,
    ProbeBandwidth,
}

/// The controller. See the module documentation.
#[derive(Clone, Debug)]
pub struct RateModel {
    max_rate: u64,
    mtu: u64,
    phase: Phase,
    window: u64,
    /// Per-round delivery rates (bytes/s), newest last.
    rate_samples: VecDeque<u64>,
    /// (time, rtt) minima, oldest first.
    rtt_samples: VecDeque<(Instant, Duration)>,
    round_start: Instant,
    round_acked_start: u64,
    acked_total: u64,
    round_lost: u64,
    round_app_limited: bool,
    /// Lowest RTT sample of the current round: if even that is far above min-RTT, a queue stood
    /// all round long.
    round_rtt_min: Option<Duration>,
    smoothed_rtt: Duration,
    full_rate: u64,
    rounds_without_growth: u32,
    probe_index: usize,
    /// Multiplier (≤ 1) applied to the bottleneck after congestion signals.
    ceiling: f64,
    /// Send-time span of the latest round that sent above the estimated rate.
    probe_sent: Option<(Instant, Instant)>,
}

impl RateModel {
    /// A controller capped at `max_rate` bytes per second.
    pub fn new(max_rate: u64, now: Instant, mtu: u16) -> Self {
        let mtu = u64::from(mtu);
        Self {
            max_rate: max_rate.max(1),
            mtu,
            phase: Phase::Startup,
            window: INITIAL_WINDOW_PACKETS * mtu,
            rate_samples: VecDeque::with_capacity(BW_WINDOW_ROUNDS + 1),
            rtt_samples: VecDeque::new(),
            round_start: now,
            round_acked_start: 0,
            acked_total: 0,
            round_lost: 0,
            round_app_limited: false,
            round_rtt_min: None,
            smoothed_rtt: Duration::ZERO,
            full_rate: 0,
            rounds_without_growth: 0,
            probe_index: 0,
            ceiling: 1.0,
            probe_sent: None,
        }
    }

    fn min_rtt(&self) -> Option<Duration> {
        self.rtt_samples.iter().map(|(_, r)| *r).min()
    }

    /// Estimated bottleneck rate in bytes/s after the ceiling and the operator cap.
    fn bottleneck(&self) -> u64 {
        let measured = self.rate_samples.iter().copied().max().unwrap_or(0);
        ((measured as f64 * self.ceiling) as u64).min(self.max_rate)
    }

    fn gain(&self) -> f64 {
        match self.phase {
            Phase::Startup => STARTUP_GAIN,
            Phase::Drain => DRAIN_GAIN,
            Phase::ProbeBandwidth => PROBE_GAINS[self.probe_index],
        }
    }

    fn update_window(&mut self) {
        let min_window = MIN_WINDOW_PACKETS * self.mtu;
        let Some(min_rtt) = self.min_rtt() else { return };
        let bottleneck = self.bottleneck();
        if bottleneck == 0 {
            return;
        }
        let bdp = bottleneck as f64 * min_rtt.max(MIN_BDP_RTT).as_secs_f64();
        let model = (self.gain() * bdp * HEADROOM) as u64 + 4 * self.mtu;
        // The operator cap is a rate: never let more than cap × rtt be in flight.
        let cap = (self.max_rate as f64 * self.smoothed_rtt.max(min_rtt).max(MIN_BDP_RTT).as_secs_f64() * HEADROOM) as u64;
        let window = match self.phase {
            // In startup the window must not shrink below the initial window while samples are
            // still small.
            Phase::Startup => model.max(self.window),
            _ => model,
        };
        self.window = window.min(cap.max(min_window)).max(min_window);
    }

    fn end_round(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.round_start);
        let acked = self.acked_total - self.round_acked_start;
        let rate = (acked as f64 / elapsed.as_secs_f64().max(1e-6)) as u64;
        let current = self.rate_samples.iter().copied().max().unwrap_or(0);
        // App-limited rounds under-measure; they only count when they show more.
        if !self.round_app_limited || rate > current {
            self.rate_samples.push_back(rate);
            if self.rate_samples.len() > BW_WINDOW_ROUNDS {
                self.rate_samples.pop_front();
            }
        }

        let sent = acked + self.round_lost;
        let loss = if sent > 0 { self.round_lost as f64 / sent as f64 } else { 0.0 };
        // A queue that stood all round, well beyond what our headroom can cause, means someone
        // else is filling the bottleneck.
        let queued = match (self.round_rtt_min, self.min_rtt()) {
            (Some(round_min), Some(min_rtt)) => round_min > min_rtt.mul_f64(1.5) + Duration::from_millis(10),
            _ => false,
        };
        let probing = self.phase == Phase::Startup || (self.phase == Phase::ProbeBandwidth && self.probe_index == 0);
        if loss > LOSS_THRESHOLD || (queued && !probing) {
            self.ceiling = (self.ceiling * 0.85).max(0.1);
        } else {
            self.ceiling = (self.ceiling * 1.05).min(1.0);
        }

        match self.phase {
            Phase::Startup => {
                let bw = self.bottleneck();
                if bw as f64 >= self.full_rate as f64 * 1.25 {
                    self.full_rate = bw;
                    self.rounds_without_growth = 0;
                } else if !self.round_app_limited {
                    self.rounds_without_growth += 1;
                }
                if self.rounds_without_growth >= 3 || bw >= self.max_rate || loss > LOSS_THRESHOLD * 4.0 {
                    self.phase = Phase::Drain;
                }
            }
            Phase::Drain => {
                self.phase = Phase::ProbeBandwidth;
                self.probe_index = 1;
            }
            Phase::ProbeBandwidth => {
                self.probe_index = (self.probe_index + 1) % PROBE_GAINS.len();
            }
        }

        // Remember when we last sent above the estimated rate (see `lost`).
        if probing {
            let from = match self.probe_sent {
                Some((from, to)) if to == self.round_start => from,
                _ => self.round_start,
            };
            self.probe_sent = Some((from, now));
        }
        self.round_start = now;
        self.round_acked_start = self.acked_total;
        self.round_lost = 0;
        self.round_app_limited = false;
        self.round_rtt_min = None;
        self.update_window();
    }

    /// One acknowledged packet: `sent` is when it was sent, `smoothed_rtt` quinn's estimate.
    pub fn ack(&mut self, now: Instant, sent: Instant, bytes: u64, app_limited: bool, smoothed_rtt: Duration) {
        self.acked_total += bytes;
        self.round_app_limited |= app_limited;
        self.smoothed_rtt = smoothed_rtt;
        // quinn keeps only a lifetime minimum; a windowed one follows route changes. The sample
        // includes the peer's ACK delay, which only errs towards a larger window.
        let sample = now.saturating_duration_since(sent).max(Duration::from_micros(1));
        self.round_rtt_min = Some(self.round_rtt_min.map_or(sample, |m| m.min(sample)));
        match self.rtt_samples.back_mut() {
            // One bucket per MIN_ROUND keeps the filter small at any packet rate.
            Some((t, r)) if now.saturating_duration_since(*t) < MIN_ROUND => *r = (*r).min(sample),
            _ => self.rtt_samples.push_back((now, sample)),
        }
        while self.rtt_samples.front().is_some_and(|(t, _)| now.saturating_duration_since(*t) > MIN_RTT_WINDOW) {
            self.rtt_samples.pop_front();
        }
    }

    /// A batch of ACKs ended: close the round if one min-RTT has passed.
    pub fn end_acks(&mut self, now: Instant) {
        let round = self.min_rtt().unwrap_or(MIN_ROUND).max(MIN_ROUND);
        if now.saturating_duration_since(self.round_start) >= round {
            self.end_round(now);
        }
    }

    /// Packets were declared lost.
    pub fn lost(&mut self, now: Instant, sent: Instant, lost_bytes: u64, is_persistent_congestion: bool) {
        // Loss of packets sent while probing for more bandwidth (or in startup) is what probing
        // is expected to cause once it overshoots the bottleneck queue; the rate filter already
        // learns from it. Only loss at the steady rate says the path itself is congested.
        if !self.probe_sent.is_some_and(|(from, to)| sent >= from && sent < to) {
            self.round_lost += lost_bytes;
        }
        if is_persistent_congestion {
            // Everything in flight was lost for a while (an outage): start over.
            *self = Self::new(self.max_rate, now, self.mtu as u16);
        }
    }

    /// Current phase name (for logs and tests).
    pub fn phase_name(&self) -> &'static str {
        match self.phase {
            Phase::Startup => "startup",
            Phase::Drain => "drain",
            Phase::ProbeBandwidth => "probe-bandwidth",
        }
    }
}

impl Controller for RateModel {
    fn on_ack(&mut self, now: Instant, sent: Instant, bytes: u64, app_limited: bool, rtt: &RttEstimator) {
        self.ack(now, sent, bytes, app_limited, rtt.get());
    }

    fn on_end_acks(&mut self, now: Instant, _in_flight: u64, _app_limited: bool, _largest: Option<u64>) {
        self.end_acks(now);
    }

    fn on_congestion_event(&mut self, now: Instant, sent: Instant, is_persistent_congestion: bool, lost_bytes: u64) {
        self.lost(now, sent, lost_bytes, is_persistent_congestion);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.mtu = u64::from(new_mtu);
        self.update_window();
    }

    fn window(&self) -> u64 {
        self.window
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(self.clone())
    }

    fn initial_window(&self) -> u64 {
        INITIAL_WINDOW_PACKETS * self.mtu
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MTU: u16 = 1452;

    /// Drives the model with a path of `rate` bytes/s and `rtt`, losing `loss` of the packets at
    /// random; the path delivers min(window / rtt, rate). Returns the final window.
    fn simulate(model: &mut RateModel, now: &mut Instant, rate: u64, rtt: Duration, loss: f64, seconds: u64) -> u64 {
        let start = *now;
        let step = Duration::from_millis(1);
        let mut carry = 0.0;
        let mut rng = 0x9e3779b97f4a7c15u64;
        while now.duration_since(start) < Duration::from_secs(seconds) {
            *now += step;
            let now = *now;
            let deliverable = (model.window() as f64 / rtt.as_secs_f64()).min(rate as f64);
            carry += deliverable * step.as_secs_f64();
            while carry >= MTU as f64 {
                carry -= MTU as f64;
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                if (rng % 10_000) as f64 / 10_000.0 < loss {
                    model.lost(now, now - rtt, MTU as u64, false);
                } else {
                    model.ack(now, now - rtt, MTU as u64, false, rtt);
                }
            }
            model.end_acks(now);
        }
        model.window()
    }

    #[test]
    fn fills_the_pipe_without_overshooting() {
        let rate = 125_000_000; // 1 Gbit/s
        let rtt = Duration::from_millis(150);
        let mut now = Instant::now();
        let mut m = RateModel::new(10 * rate, now, MTU);
        let window = simulate(&mut m, &mut now, rate, rtt, 0.0, 20);
        let bdp = rate as f64 * rtt.as_secs_f64();
        assert_eq!(m.phase_name(), "probe-bandwidth");
        assert!(window as f64 >= bdp * 0.95 && (window as f64) < bdp * 1.5, "window {window} vs bdp {bdp}");
    }

    #[test]
    fn random_loss_below_threshold_is_not_congestion() {
        let rate = 125_000_000;
        let rtt = Duration::from_millis(150);
        for loss in [0.001, 0.01] {
            let mut now = Instant::now();
            let mut m = RateModel::new(10 * rate, now, MTU);
            let window = simulate(&mut m, &mut now, rate, rtt, loss, 20);
            let bdp = rate as f64 * rtt.as_secs_f64();
            assert!(window as f64 >= bdp * 0.9, "loss {loss}: window {window} vs bdp {bdp}");
        }
    }

    #[test]
    fn heavy_loss_backs_off() {
        let rate = 125_000_000;
        let rtt = Duration::from_millis(150);
        let mut now = Instant::now();
        let mut m = RateModel::new(10 * rate, now, MTU);
        simulate(&mut m, &mut now, rate, rtt, 0.0, 10);
        let before = m.window();
        let after = simulate(&mut m, &mut now, rate, rtt, 0.10, 5);
        assert!((after as f64) < before as f64 * 0.5, "before {before} after {after}");
    }

    #[test]
    fn operator_cap_bounds_the_window() {
        let rtt = Duration::from_millis(50);
        let cap = 12_500_000; // 100 Mbit/s
        let mut now = Instant::now();
        let mut m = RateModel::new(cap, now, MTU);
        let window = simulate(&mut m, &mut now, 10 * cap, rtt, 0.0, 10);
        let cap_bdp = cap as f64 * rtt.as_secs_f64();
        assert!((window as f64) <= cap_bdp * HEADROOM * 1.01, "window {window} vs capped bdp {cap_bdp}");
    }
}
