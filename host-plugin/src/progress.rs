//! What `ferry-host migrate` shows while it runs (a bar on a terminal, plain lines otherwise)
//! and the report it leaves at the end.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::convergence::Estimate;
use crate::session::{Outcome, SourceVm};

/// How progress is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressMode {
    /// A bar on a terminal, lines otherwise.
    Auto,
    /// A progress bar on stderr.
    Bar,
    /// A line on stderr every [`LINE_INTERVAL`].
    Lines,
    /// Nothing.
    Quiet,
}

impl std::str::FromStr for ProgressMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "bar" => Ok(Self::Bar),
            "lines" => Ok(Self::Lines),
            "none" | "quiet" => Ok(Self::Quiet),
            _ => Err(format!("`{s}`: expected auto, bar, lines or none")),
        }
    }
}

/// Time between two progress lines in [`ProgressMode::Lines`].
pub const LINE_INTERVAL: Duration = Duration::from_secs(2);

/// One progress observation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// What is happening (`setup`, `pass 3`, `switchover`, ...).
    pub phase: String,
    /// Time since the migration started.
    pub elapsed: Duration,
    /// Bytes QEMU sent.
    pub sent: u64,
    /// Dirty bytes QEMU still has to send.
    pub remaining: u64,
    /// Guest RAM.
    pub total: u64,
    /// The controller's view.
    pub estimate: Estimate,
    /// Current vCPU throttle, percent.
    pub throttle_percent: u64,
}

/// Shows [`Snapshot`]s.
pub struct Progress {
    mode: ProgressMode,
    bar: Option<ProgressBar>,
    last_line: Option<Duration>,
}

impl Progress {
    /// A display in `mode` (`Auto` resolved against stderr).
    pub fn new(mode: ProgressMode) -> Self {
        let mode = match mode {
            ProgressMode::Auto if std::io::stderr().is_terminal() => ProgressMode::Bar,
            ProgressMode::Auto => ProgressMode::Lines,
            m => m,
        };
        let bar = (mode == ProgressMode::Bar).then(|| {
            let bar = ProgressBar::new(0);
            let style = ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar
        });
        Self { mode, bar, last_line: None }
    }

    /// Shows `s` (lines: at most every [`LINE_INTERVAL`] unless the phase is final).
    pub fn show(&mut self, s: &Snapshot) {
        let text = describe(s);
        match self.mode {
            ProgressMode::Bar => {
                if let Some(bar) = &self.bar {
                    bar.set_length(s.total.max(1));
                    bar.set_position(s.total.saturating_sub(s.remaining));
                    bar.set_message(text);
                    bar.tick();
                }
            }
            ProgressMode::Lines => {
                if self.last_line.is_none_or(|t| s.elapsed >= t + LINE_INTERVAL) {
                    self.last_line = Some(s.elapsed);
                    eprintln!("[{:>6.1}s] {text}", s.elapsed.as_secs_f64());
                }
            }
            ProgressMode::Auto | ProgressMode::Quiet => {}
        }
    }

    /// Prints a message above the bar (or as a line).
    pub fn note(&self, message: &str) {
        match (&self.bar, self.mode) {
            (Some(bar), _) => bar.println(message),
            (None, ProgressMode::Quiet) => {}
            (None, _) => eprintln!("{message}"),
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

/// `x` with `digits` decimals, or `?` while it is not known.
fn known(x: Option<f64>, digits: usize) -> String {
    match x {
        Some(x) if x.is_finite() => format!("{x:.digits$}"),
        _ => "?".to_owned(),
    }
}

/// The one-line description of a snapshot; figures not measured yet show as `?`.
pub fn describe(s: &Snapshot) -> String {
    let e = &s.estimate;
    format!(
        "{}: sent {:.2} GiB, remaining {:.2} GiB, WAN {} Mbit/s, reduction {}x, drain {} MB/s, dirty {:.1} MB/s, expected downtime {} ms, throttle {}%",
        s.phase,
        gib(s.sent),
        gib(s.remaining),
        known(e.wan_rate.map(|r| r * 8.0 / 1e6), 1),
        known(e.reduction, 1),
        known(e.drain.map(|d| d / 1e6), 1),
        e.dirty_rate / 1e6,
        known(e.predicted_downtime.map(|d| d.as_secs_f64() * 1e3), 0),
        s.throttle_percent
    )
}

/// One point of the report's time series, taken at a progress tick; rates in bytes per
/// second, `null` while not measured.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct TimelinePoint {
    /// Seconds since the migration started.
    pub t_s: f64,
    /// Encoded bytes per second the WAN delivered.
    pub wan_bytes_per_s: Option<f64>,
    /// QEMU bytes per second the gateway read.
    pub qemu_bytes_per_s: Option<f64>,
    /// Bytes per second the guest dirtied (QEMU's last pass).
    pub dirty_bytes_per_s: f64,
    /// QEMU's remaining dirty bytes.
    pub remaining_bytes: u64,
}

/// The time series of a migration, bounded: at most [`Timeline::CAPACITY`] points. When full,
/// every other point is dropped and from then on only every second tick is kept (the stride
/// doubles), so the series always spans the whole migration at an even spacing.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Timeline {
    points: Vec<TimelinePoint>,
    stride: u64,
    ticks: u64,
}

impl Timeline {
    /// Most points kept.
    pub const CAPACITY: usize = 600;

    /// Offers one tick's point.
    pub fn push(&mut self, point: TimelinePoint) {
        let stride = self.stride.max(1);
        self.ticks += 1;
        if !(self.ticks - 1).is_multiple_of(stride) {
            return;
        }
        if self.points.len() == Self::CAPACITY {
            let mut i = 0;
            self.points.retain(|_| {
                i += 1;
                i % 2 == 1
            });
            self.stride = stride * 2;
            if !(self.ticks - 1).is_multiple_of(self.stride) {
                return;
            }
        }
        self.points.push(point);
    }

    /// The points kept, oldest first.
    pub fn points(&self) -> &[TimelinePoint] {
        &self.points
    }

    /// Ticks between two kept points.
    pub fn stride(&self) -> u64 {
        self.stride.max(1)
    }
}

/// The summary of one migration, printed at the end and written as JSON with `--report`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MigrationReport {
    /// The VM's name.
    pub vm: String,
    /// Source and destination sites.
    pub from_site: String,
    /// Destination site.
    pub to_site: String,
    /// `completed` or `failed`.
    pub outcome: Outcome,
    /// Why it failed.
    pub error: Option<String>,
    /// What the source VM is now: `quit`, `paused` (kept, per option), `running` (after a
    /// failure), or `unknown`.
    pub source_vm: SourceVm,
    /// Wall time from the command's start to the VM running at the destination, seconds.
    pub total_time_s: f64,
    /// QEMU's own migration time, ms.
    pub qemu_total_time_ms: Option<u64>,
    /// QEMU's own downtime figure, ms (the source's view: it ends when the source finished
    /// sending, not when the guest ran again).
    pub qemu_downtime_ms: Option<u64>,
    /// Time the VM was paused across the cutover: the source QEMU's `STOP` to the destination
    /// QEMU's `RESUME` (event timestamps, the destination's converted to the source's clock), ms.
    pub pause_ms: Option<f64>,
    /// Downtime the guest saw (heartbeat gap minus one interval), ms. Besides the pause it
    /// includes any stall of the guest just before it (a heavily throttled guest barely runs).
    /// Its error bound is `guest_downtime_error_ms`; `pause_ms` has the clock's part of it.
    pub guest_downtime_ms: Option<f64>,
    /// Resolution of `guest_downtime_ms`: the heartbeat interval plus the clock offset's
    /// uncertainty, ms.
    pub guest_downtime_error_ms: Option<f64>,
    /// Why `guest_downtime_ms` is missing, when it is.
    pub guest_downtime_note: Option<String>,
    /// Destination clock minus source clock, ms (from control-channel round trips).
    pub clock_offset_ms: Option<f64>,
    /// Bytes QEMU wrote into the gateway.
    pub bytes_from_qemu: u64,
    /// Bytes the source gateway sent on the WAN for this migration (framing included).
    pub bytes_on_wan: u64,
    /// Bytes received back from the destination (return path).
    pub bytes_from_wan: u64,
    /// `bytes_from_qemu / bytes_on_wan`.
    pub reduction: f64,
    /// Pre-copy passes (QEMU's dirty-sync count).
    pub iterations: u64,
    /// Highest vCPU throttle applied, percent.
    pub max_throttle_percent: u64,
    /// Highest rate at which the guest dirtied memory, MB/s (QEMU's per-pass figure).
    pub peak_dirty_rate_mb_s: f64,
    /// Rate the WAN drained QEMU's stream at (codec reduction included) while a queue stood
    /// (if none ever stood: the most it delivered), MB/s, as measured at the last poll before
    /// the source stopped; `null` if never measured.
    pub drain_rate_mb_s: Option<f64>,
    /// The pause the controller expected at the last poll before the source stopped, ms
    /// (compare with `pause_ms`); `null` if it had no measurement.
    pub expected_pause_ms: Option<f64>,
    /// The pause aimed for (`--downtime`), ms.
    pub target_downtime_ms: f64,
    /// The time series sampled at each progress tick (every 100 ms poll, sooner when a QMP
    /// event wakes it; see `timeline_stride`).
    pub timeline: Vec<TimelinePoint>,
    /// Poll ticks between two points of `timeline`: 1 until the series reached its bound
    /// (600 points), doubled each time it did.
    pub timeline_stride: u64,
    /// Multifd channels (`None`: single connection).
    pub multifd_channels: Option<u8>,
    /// MACs re-announced at the destination.
    pub announced_macs: Vec<String>,
    /// Interface the announcements went out on.
    pub announce_interface: Option<String>,
    /// Things that went wrong after the VM ran at the destination (the migration still
    /// succeeded).
    pub warnings: Vec<String>,
}

impl MigrationReport {
    /// Human-readable summary lines.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} {} -> {}: {} in {:.1} s",
            self.vm, self.from_site, self.to_site, self.outcome, self.total_time_s
        );
        if let Some(e) = &self.error {
            s += &format!("\n  error: {e}\n  source VM: {}", self.source_vm);
            return s;
        }
        s += &format!(
            "\n  guest downtime: {}, cutover pause {}\n  QEMU downtime: {} ms, QEMU time {} ms, {} passes, max throttle {}%\n  from QEMU {:.1} MiB, on the WAN {:.1} MiB ({:.1}x reduction)\n  source VM: {}; announced {} MAC(s) on {}",
            match (self.guest_downtime_ms, self.guest_downtime_error_ms) {
                (Some(d), Some(e)) => format!("{d:.0} ms (±{e:.0} ms)"),
                (Some(d), None) => format!("{d:.0} ms"),
                _ => format!("not measured ({})", self.guest_downtime_note.as_deref().unwrap_or("no heartbeat")),
            },
            self.pause_ms.map_or("?".into(), |p| format!("{p:.0} ms")),
            self.qemu_downtime_ms.map_or("?".into(), |d| d.to_string()),
            self.qemu_total_time_ms.map_or("?".into(), |d| d.to_string()),
            self.iterations,
            self.max_throttle_percent,
            self.bytes_from_qemu as f64 / 1048576.0,
            self.bytes_on_wan as f64 / 1048576.0,
            self.reduction,
            self.source_vm,
            self.announced_macs.len(),
            self.announce_interface.as_deref().unwrap_or("(no interface configured)")
        );
        for w in &self.warnings {
            s += &format!("\n  warning: {w}");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_figures_show_as_question_marks() {
        let line = describe(&Snapshot { phase: "pass 1".into(), ..Snapshot::default() });
        assert!(line.contains("WAN ? Mbit/s, reduction ?x, drain ? MB/s"), "{line}");
        assert!(line.contains("expected downtime ? ms"), "{line}");
        let estimate = Estimate {
            wan_rate: Some(50e6 / 8.0),
            reduction: Some(2.0),
            drain: Some(12.5e6),
            predicted_downtime: Some(Duration::from_millis(280)),
            ..Estimate::default()
        };
        let line = describe(&Snapshot { phase: "pass 2".into(), estimate, ..Snapshot::default() });
        assert!(line.contains("WAN 50.0 Mbit/s, reduction 2.0x, drain 12.5 MB/s"), "{line}");
        assert!(line.contains("expected downtime 280 ms"), "{line}");
    }

    #[test]
    fn the_timeline_stays_bounded_and_spans_the_whole_migration() {
        let mut timeline = Timeline::default();
        let point = |i: u64| TimelinePoint { t_s: i as f64 / 10.0, remaining_bytes: i, ..TimelinePoint::default() };
        for i in 0..Timeline::CAPACITY as u64 {
            timeline.push(point(i));
        }
        assert_eq!(timeline.points().len(), Timeline::CAPACITY);
        assert_eq!(timeline.stride(), 1);
        // 10 times as many ticks: still bounded, evenly spaced, from the first tick to near
        // the last.
        for i in Timeline::CAPACITY as u64..10 * Timeline::CAPACITY as u64 {
            timeline.push(point(i));
        }
        let points = timeline.points();
        assert!(points.len() <= Timeline::CAPACITY && points.len() > Timeline::CAPACITY / 2, "{}", points.len());
        assert_eq!(timeline.stride(), 16);
        assert_eq!(points[0].remaining_bytes, 0);
        assert!(points.windows(2).all(|w| w[1].remaining_bytes - w[0].remaining_bytes == 16), "uneven spacing");
        let last = points.last().map(|p| p.remaining_bytes).unwrap_or(0);
        assert!(last >= 10 * Timeline::CAPACITY as u64 - 16, "ends at tick {last}");
    }
}
