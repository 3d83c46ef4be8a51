//! The source side of one migration (`ferry-host migrate`) as a sans-IO state machine.
//!
//! ```text
//! Setup ──migrate issued──▶ Migrating ──QEMU completed──▶ (Checking) ──Commit──▶ Committed ──Running──▶ DestinationRunning
//!   │                          │                              │                       │                     │
//!   failure: restore,          failure: cancel, restore parameters,                   failure: resume only  failures are
//!   source untouched           resume (Abort sent)                                    if the destination    warnings
//!   (Abort sent)                                                                      discarded its VM,
//!                                                                                     else stay paused
//! ```
//!
//! `Checking` is the operator's `--pre-commit-check` (both VMs paused, before the commit).
//!
//! The commit point is QEMU's `completed`: with the return path on, the destination has loaded
//! the state by then, paused (`ferry-host serve` turned its autostart off), and it runs the VM
//! only on `Commit`. So before `Commit` is sent, resuming the source is always safe, whatever
//! QEMU reported last (a signal that races QEMU's completion cancels and resumes; the
//! destination, never told to commit, discards). From the moment `Commit` is sent the source
//! never resumes, unless the destination answers `Failed { vm_discarded: true }`.
//!
//! The shell ([`crate::migrate`]) does the setup I/O (QMP, gateway API, `Prepare`), then feeds
//! what it observes: [`SourceSession::handle_signal`], [`SourceSession::handle_control`],
//! [`SourceSession::handle_progress`] (one poll of QEMU and the gateway), and the results of
//! actions it carried out. It drains [`SourceSession::poll_action`] after each input. A `handle_*`
//! that returns a [`SourceFailure`] means the migration failed; the shell then calls
//! [`SourceSession::handle_failure`], which queues the recovery for the stage reached.
//!
//! Signals are honoured until QEMU completed: during the cutover wait the source is paused and
//! only the destination's answer may decide about it, so Ctrl-C and SIGTERM are ignored there.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use ferry_api::control::{ToDestination, ToSource};
use crate::convergence::{ConvergenceController, Estimate, Sample};
use crate::progress::{Snapshot, Timeline, TimelinePoint};
use ferry_qmp::{MigrationInfo, MigrationParameters, MigrationStatus};

use super::{error_chain, ControlEvent, Outcome, Signal, SourceVm};

/// Where the migration stands, so a failure is handled for what has been done.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// Nothing changed on the source VM yet.
    Setup,
    /// QEMU's `migrate` was issued.
    Migrating,
    /// QEMU completed (the source is paused, the destination loaded the state and waits
    /// paused); the operator's pre-commit check runs. Still before the commit point.
    Checking,
    /// QEMU reported `completed` and `Commit` went out: the source is paused, the destination
    /// loaded the state and is told to run it.
    Committed,
    /// The destination reported the VM running.
    DestinationRunning,
}

/// What the source machine is told at start.
#[derive(Clone, Copy, Debug)]
pub struct SourceConfig {
    /// Leave the source VM paused instead of quitting it once the destination runs the VM.
    pub keep_source: bool,
    /// Apply the convergence controller's parameters to QEMU.
    pub steer: bool,
    /// Run the operator's pre-commit check between QEMU's completion and the commit.
    pub pre_commit_check: bool,
    /// Longest the stop-and-copy may keep the source paused before QEMU completes; past it the
    /// migration is cancelled (before the commit, so the source resumes).
    pub cutover_deadline: Duration,
}

/// The gateway's counters for the migration forward, as the controller reads them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GatewayReading {
    /// Bytes QEMU wrote into the gateway.
    pub tcp_in: u64,
    /// Encoded bytes handed to the tunnel.
    pub wire_sent: u64,
    /// Encoded bytes the destination gateway acknowledged.
    pub wire_acked: u64,
    /// Connections the forward carries now.
    pub open: u32,
    /// The tunnel path's round trip, if connected.
    pub rtt: Option<Duration>,
    /// The tunnel path's congestion window, bytes, if connected.
    pub cwnd: Option<u64>,
    /// The forward's latest connection failure.
    pub last_error: Option<String>,
}

/// Pre-copy figures for the report.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PrecopyFigures {
    /// Pre-copy passes (QEMU's dirty-sync count).
    pub iterations: u64,
    /// Highest vCPU throttle seen, percent.
    pub max_throttle_percent: u64,
    /// Highest guest dirty rate, MB/s.
    pub peak_dirty_rate_mb_s: f64,
    /// WAN drain rate measured at the last poll before the source stopped, MB/s.
    pub drain_rate_mb_s: Option<f64>,
    /// The pause the controller expected at the last poll before the source stopped, ms.
    pub expected_pause_ms: Option<f64>,
}

/// Why the migration failed; the text is the report's `error`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct SourceFailure {
    /// What went wrong.
    pub reason: String,
}

impl SourceFailure {
    fn new(reason: impl Into<String>) -> Self {
        Self { reason: reason.into() }
    }
}

/// What the shell must do next.
#[derive(Clone, Debug, PartialEq)]
pub enum SourceAction {
    /// Send this to the destination; a send that fails fails the migration.
    Send(ToDestination),
    /// Tell the destination the migration is given up (best effort: errors are ignored).
    Abort {
        /// Why.
        reason: String,
    },
    /// Apply these migration parameters (a refusal is a warning).
    SetParameters(MigrationParameters),
    /// Show this progress.
    ShowProgress(Snapshot),
    /// Run the pre-commit check (both VMs paused), then [`SourceSession::handle_pre_commit_check`].
    RunPreCommitCheck,
    /// `migrate_cancel` and wait for QEMU to settle.
    CancelMigration,
    /// Set back the migration parameters the source QEMU had before (bandwidth cap, downtime
    /// limit, throttle step), so a cancelled migration leaves no cap behind.
    RestoreParameters,
    /// Resume the source VM if it is paused, then report its state with
    /// [`SourceSession::handle_source_state`].
    ResumeSource,
    /// Leave the source VM paused (nothing to send to QEMU: it paused the VM when it completed).
    KeepSourcePaused,
    /// Quit the source QEMU, then report with [`SourceSession::handle_quit`].
    QuitSource,
    /// The destination runs the VM: work out the cutover pause and the guest downtime.
    RecordCutover {
        /// The destination QEMU's `RESUME` timestamp (its clock), if seen.
        resumed_unix_ns: Option<i128>,
        /// The destination's first guest heartbeat (its clock), if watched.
        first_heartbeat_unix_ns: Option<i128>,
    },
    /// The destination's MAC announcement report, for the report.
    RecordAnnouncement {
        /// Interface used.
        interface: Option<String>,
        /// MACs announced.
        macs: Vec<String>,
    },
    /// Something went wrong after the VM ran at the destination: log it, keep it in the report.
    Warn(String),
    /// The command is over.
    Finish(Outcome),
}

/// The source side's lifecycle; see the module doc.
#[derive(Debug)]
pub struct SourceSession {
    config: SourceConfig,
    /// When the command started (progress shows time since).
    command_started: Instant,
    stage: Stage,
    control_open: bool,
    /// The destination said it failed and its VM is certainly not running (discarded).
    destination_discarded: bool,
    /// The controller and when `migrate` was issued, from [`Stage::Migrating`] on.
    steering: Option<(ConvergenceController, Instant)>,
    figures: PrecopyFigures,
    timeline: Timeline,
    source_vm: SourceVm,
    /// When QEMU stopped the source for the stop-and-copy.
    stopped_at: Option<Instant>,
    actions: VecDeque<SourceAction>,
}

impl SourceSession {
    /// A migration starting at `now`; the source VM runs.
    pub fn new(config: SourceConfig, now: Instant) -> Self {
        Self {
            config,
            command_started: now,
            stage: Stage::Setup,
            control_open: false,
            destination_discarded: false,
            steering: None,
            figures: PrecopyFigures::default(),
            timeline: Timeline::default(),
            source_vm: SourceVm::Running,
            stopped_at: None,
            actions: VecDeque::new(),
        }
    }

    /// Where the migration stands.
    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// What the source VM is now, as far as this machine knows.
    pub fn source_vm(&self) -> &SourceVm {
        &self.source_vm
    }

    /// The pre-copy figures so far.
    pub fn figures(&self) -> PrecopyFigures {
        self.figures
    }

    /// The time series so far (one point per progress tick, bounded).
    pub fn timeline(&self) -> &Timeline {
        &self.timeline
    }

    /// The controller's current estimate, once migrating.
    pub fn estimate(&self) -> Option<Estimate> {
        self.steering.as_ref().map(|(c, _)| c.estimate())
    }

    /// The next thing to do, in order.
    pub fn poll_action(&mut self) -> Option<SourceAction> {
        self.actions.pop_front()
    }

    /// The control channel to the destination is connected (a failure from now on tells the
    /// destination).
    pub fn handle_control_opened(&mut self) {
        self.control_open = true;
    }

    /// QEMU accepted `migrate`, issued at `started`; `controller` steers it from now on.
    pub fn handle_migration_started(&mut self, controller: ConvergenceController, started: Instant) {
        self.steering = Some((controller, started));
        self.stage = Stage::Migrating;
    }

    /// QEMU stopped the source VM at `at` (its `STOP` event while migrating: the stop-and-copy).
    pub fn handle_source_stopped(&mut self, at: Instant) {
        if self.stage == Stage::Migrating {
            self.stopped_at.get_or_insert(at);
        }
    }

    /// Ctrl-C or SIGTERM: cancels before QEMU completed, ignored after.
    pub fn handle_signal(&mut self, signal: Signal) -> Result<(), SourceFailure> {
        match self.stage {
            Stage::Setup | Stage::Migrating | Stage::Checking => Err(SourceFailure::new(match signal {
                Signal::Interrupt => "interrupted (Ctrl-C)",
                Signal::Terminate => "interrupted (SIGTERM)",
            })),
            // The source is paused or gone; only the destination's answer decides now.
            Stage::Committed | Stage::DestinationRunning => Ok(()),
        }
    }

    /// A message from the destination, or the channel's failure.
    pub fn handle_control(&mut self, event: ControlEvent<ToSource>) -> Result<(), SourceFailure> {
        match self.stage {
            Stage::Setup | Stage::Migrating | Stage::Checking => match event {
                ControlEvent::Message(ToSource::Failed { reason, vm_discarded }) => {
                    self.destination_discarded = vm_discarded;
                    Err(SourceFailure::new(format!("the destination failed: {reason}")))
                }
                ControlEvent::Message(other) => {
                    Err(SourceFailure::new(format!("unexpected message from the destination: {other:?}")))
                }
                ControlEvent::Lost(e) => Err(SourceFailure::new(error_chain(&e))),
            },
            Stage::Committed => match event {
                ControlEvent::Message(ToSource::Running { first_heartbeat_unix_ns, resumed_unix_ns, status, .. }) => {
                    tracing::info!(%status, "destination VM running");
                    self.stage = Stage::DestinationRunning;
                    self.actions.push_back(SourceAction::RecordCutover { resumed_unix_ns, first_heartbeat_unix_ns });
                    // From here on the VM runs at the destination: the migration succeeded, and
                    // whatever goes wrong now is a warning, never a reason to touch the source
                    // VM again.
                    if self.config.keep_source {
                        self.source_vm = SourceVm::Paused;
                        self.actions.push_back(SourceAction::KeepSourcePaused);
                    } else {
                        self.actions.push_back(SourceAction::QuitSource);
                    }
                    Ok(())
                }
                ControlEvent::Message(ToSource::Failed { reason, vm_discarded }) => {
                    self.destination_discarded = vm_discarded;
                    let discarded = if vm_discarded { "discarded its VM" } else { "could not make sure its VM is gone" };
                    Err(SourceFailure::new(format!("the destination failed after the commit and {discarded}: {reason}")))
                }
                ControlEvent::Message(other) => {
                    tracing::debug!(?other, "ignoring");
                    Ok(())
                }
                ControlEvent::Lost(e) => Err(SourceFailure::new(error_chain(&e))),
            },
            Stage::DestinationRunning => {
                match event {
                    ControlEvent::Message(ToSource::Announced { interface, macs, error, .. }) => {
                        if let Some(e) = error {
                            self.warn(format!("MAC announcement at the destination failed: {e}"));
                        }
                        self.actions.push_back(SourceAction::RecordAnnouncement { interface, macs });
                    }
                    ControlEvent::Message(other) => {
                        self.warn(format!("unexpected message instead of the announcement report: {other:?}"))
                    }
                    ControlEvent::Lost(e) => self.warn(format!("no announcement report from the destination: {e}")),
                }
                Ok(())
            }
        }
    }

    /// One poll while migrating, at `now`: QEMU's `query-migrate` and the gateway's counters.
    /// Steers QEMU and shows progress; QEMU's `completed` is the commit point: it sends `Commit`.
    pub fn handle_progress(&mut self, now: Instant, info: &MigrationInfo, gateway: &GatewayReading) -> Result<(), SourceFailure> {
        let Some((controller, started)) = self.steering.as_mut() else {
            return Err(SourceFailure::new("internal: progress before the migration started"));
        };
        let ram = info.ram.clone().unwrap_or_default();
        let throttle = info.cpu_throttle_percentage.unwrap_or(0);
        self.figures.max_throttle_percent = self.figures.max_throttle_percent.max(throttle);
        self.figures.iterations = ram.dirty_sync_count;
        let status = info.status();
        match status {
            MigrationStatus::Completed if self.config.pre_commit_check => {
                self.stage = Stage::Checking;
                self.actions.push_back(SourceAction::RunPreCommitCheck);
                return Ok(());
            }
            MigrationStatus::Completed => {
                self.commit();
                return Ok(());
            }
            MigrationStatus::Failed | MigrationStatus::Cancelled => {
                let why = info.error_desc.clone().unwrap_or_else(|| status.as_str().to_owned());
                let gateway = gateway.last_error.clone().map(|e| format!(" (gateway: {e})")).unwrap_or_default();
                return Err(SourceFailure::new(format!("QEMU reports the migration {}: {why}{gateway}", status.as_str())));
            }
            _ => {}
        }
        let decision = controller.update(Sample {
            at: now.saturating_duration_since(*started),
            transferred: ram.transferred,
            remaining: ram.remaining,
            dirty_pages_rate: ram.dirty_pages_rate,
            page_size: ram.page_size,
            dirty_sync_count: ram.dirty_sync_count,
            throttle_percent: throttle,
            qemu_mbps: ram.mbps,
            tcp_in: gateway.tcp_in,
            wire_sent: gateway.wire_sent,
            wire_acked: gateway.wire_acked,
            open_connections: gateway.open,
            rtt: gateway.rtt,
            cwnd: gateway.cwnd,
        });
        let estimate = controller.estimate();
        self.figures.peak_dirty_rate_mb_s = self.figures.peak_dirty_rate_mb_s.max(estimate.dirty_rate / 1e6);
        // The pre-copy's figures: once the source stopped, the link drains the last bytes and
        // then idles through the cutover's round trips, which says nothing about its rate.
        if self.stopped_at.is_none() {
            if let Some(drain) = estimate.drain {
                self.figures.drain_rate_mb_s = Some(drain / 1e6);
            }
            self.figures.expected_pause_ms = estimate.predicted_downtime.map(|d| d.as_secs_f64() * 1e3);
        }
        let elapsed = now.saturating_duration_since(*started);
        self.timeline.push(TimelinePoint {
            t_s: elapsed.as_secs_f64(),
            wan_bytes_per_s: estimate.wan_rate,
            qemu_bytes_per_s: estimate.qemu_rate,
            dirty_bytes_per_s: estimate.dirty_rate,
            remaining_bytes: ram.remaining,
        });
        if let Some(reason) = decision.cancel {
            return Err(SourceFailure::new(reason));
        }
        if let Some(stopped) = self.stopped_at {
            let paused = now.saturating_duration_since(stopped);
            if paused >= self.config.cutover_deadline {
                return Err(SourceFailure::new(format!(
                    "the stop-and-copy did not complete within the cutover deadline ({:?}; the VM was paused {paused:?})",
                    self.config.cutover_deadline
                )));
            }
        }
        let params = MigrationParameters {
            max_bandwidth: decision.max_bandwidth,
            downtime_limit: decision.downtime_limit_ms,
            cpu_throttle_increment: decision.throttle_increment,
            ..MigrationParameters::default()
        };
        if self.config.steer && params != MigrationParameters::default() {
            self.actions.push_back(SourceAction::SetParameters(params));
        }
        let phase = match status {
            MigrationStatus::Active => format!("pass {}", ram.dirty_sync_count.max(1)),
            other => other.as_str().to_owned(),
        };
        self.actions.push_back(SourceAction::ShowProgress(Snapshot {
            phase,
            elapsed: now.saturating_duration_since(self.command_started),
            sent: ram.transferred,
            remaining: ram.remaining,
            total: ram.total,
            estimate,
            throttle_percent: throttle,
        }));
        Ok(())
    }

    /// The result of [`SourceAction::RunPreCommitCheck`]: passed, the commit goes out; else the
    /// migration fails on the safe side of the commit point.
    pub fn handle_pre_commit_check(&mut self, result: Result<(), String>) -> Result<(), SourceFailure> {
        match result {
            Ok(()) => {
                self.commit();
                Ok(())
            }
            Err(why) => Err(SourceFailure::new(format!("the pre-commit check failed: {why}"))),
        }
    }

    /// The commit point: from here the source never resumes unless the destination discarded.
    fn commit(&mut self) {
        self.stage = Stage::Committed;
        self.actions.push_back(SourceAction::Send(ToDestination::Commit));
    }

    /// The migration failed for `reason`: queues what undoes it for the stage reached. Until the
    /// destination runs the VM it is told (`Abort`). Before the commit the migration is
    /// cancelled, the parameters restored and the source resumed; after, the source resumes
    /// only if the destination said it discarded its VM; if it went silent it might be running
    /// the VM, and two running copies would be worse than a paused one.
    pub fn handle_failure(&mut self, reason: &str) {
        if self.control_open && self.stage < Stage::Committed {
            self.actions.push_back(SourceAction::Abort { reason: reason.to_owned() });
        }
        match self.stage {
            // Capabilities and parameters may have been set already.
            Stage::Setup => self.actions.push_back(SourceAction::RestoreParameters),
            // A completed QEMU ignores the cancel; the source resumes from `postmigrate`.
            Stage::Migrating | Stage::Checking => {
                self.actions.push_back(SourceAction::CancelMigration);
                self.actions.push_back(SourceAction::RestoreParameters);
                self.actions.push_back(SourceAction::ResumeSource);
            }
            Stage::Committed if self.destination_discarded => {
                self.actions.push_back(SourceAction::RestoreParameters);
                self.actions.push_back(SourceAction::ResumeSource);
            }
            Stage::Committed => {
                self.source_vm = SourceVm::PausedDestinationUnknown;
                self.actions.push_back(SourceAction::KeepSourcePaused);
            }
            // Failures after this point are warnings; nothing to undo.
            Stage::DestinationRunning => {}
        }
        self.actions.push_back(SourceAction::Finish(Outcome::Failed));
    }

    /// What the source VM is after [`SourceAction::ResumeSource`].
    pub fn handle_source_state(&mut self, state: SourceVm) {
        self.source_vm = state;
    }

    /// The result of [`SourceAction::QuitSource`]; a failure leaves the source paused.
    pub fn handle_quit(&mut self, result: Result<(), String>) {
        match result {
            Ok(()) => self.source_vm = SourceVm::Quit,
            Err(e) => {
                self.source_vm = SourceVm::Paused;
                self.warn(format!("cannot quit the source VM (left paused): {e}"));
            }
        }
    }

    /// The gateway could not give the final byte counts (the migration still succeeded).
    pub fn handle_final_counts_failed(&mut self, error: &str) {
        self.warn(format!("final byte counts incomplete: {error}"));
    }

    /// Everything after the cutover is done: the migration completed.
    pub fn handle_done(&mut self) {
        self.actions.push_back(SourceAction::Finish(Outcome::Completed));
    }

    fn warn(&mut self, message: String) {
        self.actions.push_back(SourceAction::Warn(message));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::control::ChannelError;
    use crate::convergence::tests::controller;
    use ferry_qmp::RamStats;

    fn session(keep_source: bool) -> (SourceSession, Instant) {
        let t0 = Instant::now();
        let mut s = SourceSession::new(SourceConfig { keep_source, steer: true, pre_commit_check: false, cutover_deadline: Duration::from_secs(10) }, t0);
        s.handle_control_opened();
        (s, t0)
    }

    fn migrating() -> (SourceSession, Instant) {
        let (mut s, t0) = session(false);
        s.handle_migration_started(controller(), t0);
        (s, t0)
    }

    fn info(status: MigrationStatus) -> MigrationInfo {
        MigrationInfo {
            status: Some(status),
            ram: Some(RamStats { transferred: 1 << 20, remaining: 1 << 30, total: 2 << 30, dirty_sync_count: 1, ..RamStats::default() }),
            ..MigrationInfo::default()
        }
    }

    /// A session whose QEMU completed; the cutover wait is under way.
    fn completed(keep_source: bool) -> SourceSession {
        let (mut s, t0) = session(keep_source);
        s.handle_migration_started(controller(), t0);
        s.handle_progress(t0 + Duration::from_secs(1), &info(MigrationStatus::Completed), &GatewayReading::default()).unwrap();
        assert_eq!(drain(&mut s), vec![SourceAction::Send(ToDestination::Commit)]);
        assert_eq!(s.stage(), Stage::Committed);
        s
    }

    fn drain(s: &mut SourceSession) -> Vec<SourceAction> {
        std::iter::from_fn(|| s.poll_action()).collect()
    }

    fn running_message() -> ToSource {
        ToSource::Running { running_unix_ns: 10, resumed_unix_ns: Some(9), first_heartbeat_unix_ns: Some(11), status: "running".into() }
    }

    fn abort(reason: &str) -> SourceAction {
        SourceAction::Abort { reason: reason.into() }
    }

    #[test]
    fn failure_during_setup_restores_parameters_leaves_the_source_running_and_aborts() {
        let (mut s, _) = session(false);
        s.handle_failure("the destination could not prepare: no QEMU");
        assert_eq!(
            drain(&mut s),
            vec![abort("the destination could not prepare: no QEMU"), SourceAction::RestoreParameters, SourceAction::Finish(Outcome::Failed)]
        );
        assert_eq!(s.source_vm(), &SourceVm::Running);
    }

    #[test]
    fn failure_before_the_control_channel_sends_no_abort() {
        let mut s = SourceSession::new(SourceConfig { keep_source: false, steer: true, pre_commit_check: false, cutover_deadline: Duration::from_secs(10) }, Instant::now());
        s.handle_failure("cannot open the source VM's QMP socket");
        assert_eq!(drain(&mut s), vec![SourceAction::RestoreParameters, SourceAction::Finish(Outcome::Failed)]);
        assert_eq!(s.source_vm().to_string(), "running");
    }

    #[test]
    fn failure_before_qemu_completed_cancels_and_resumes_the_source() {
        let (mut s, t0) = migrating();
        let failure = s
            .handle_progress(t0, &MigrationInfo { error_desc: Some("socket closed".into()), ..info(MigrationStatus::Failed) }, &GatewayReading {
                last_error: Some("peer reset".into()),
                ..GatewayReading::default()
            })
            .unwrap_err();
        assert_eq!(failure.reason, "QEMU reports the migration failed: socket closed (gateway: peer reset)");
        s.handle_failure(&failure.reason);
        assert_eq!(
            drain(&mut s),
            vec![abort(&failure.reason), SourceAction::CancelMigration, SourceAction::RestoreParameters, SourceAction::ResumeSource, SourceAction::Finish(Outcome::Failed)]
        );
        // Whatever the shell found resuming it is reported.
        s.handle_source_state(SourceVm::Running);
        assert_eq!(s.source_vm(), &SourceVm::Running);
    }

    #[test]
    fn destination_failure_during_pre_copy_cancels_and_resumes() {
        let (mut s, _) = migrating();
        let failure = s.handle_control(ControlEvent::Message(ToSource::Failed { reason: "incoming QEMU exited".into(), vm_discarded: true })).unwrap_err();
        assert_eq!(failure.reason, "the destination failed: incoming QEMU exited");
        s.handle_failure(&failure.reason);
        assert_eq!(
            drain(&mut s),
            vec![abort(&failure.reason), SourceAction::CancelMigration, SourceAction::RestoreParameters, SourceAction::ResumeSource, SourceAction::Finish(Outcome::Failed)]
        );
        let unexpected = s.handle_control(ControlEvent::Message(ToSource::Pong { seq: 1, unix_ns: 0 })).unwrap_err();
        assert!(unexpected.reason.starts_with("unexpected message from the destination: Pong"), "{unexpected}");
        let lost = s.handle_control(ControlEvent::Lost(ChannelError::Closed)).unwrap_err();
        assert_eq!(lost.reason, "the other host-plugin closed the control channel");
    }

    #[test]
    fn ctrl_c_during_pre_copy_cancels_and_the_source_keeps_running() {
        for (signal, reason) in [(Signal::Interrupt, "interrupted (Ctrl-C)"), (Signal::Terminate, "interrupted (SIGTERM)")] {
            let (mut s, _) = migrating();
            let failure = s.handle_signal(signal).unwrap_err();
            assert_eq!(failure.reason, reason);
            s.handle_failure(&failure.reason);
            let actions = drain(&mut s);
            assert_eq!(actions[1..], [SourceAction::CancelMigration, SourceAction::RestoreParameters, SourceAction::ResumeSource, SourceAction::Finish(Outcome::Failed)]);
            s.handle_source_state(SourceVm::Running);
            assert_eq!(s.source_vm().to_string(), "running");
        }
    }

    #[test]
    fn after_the_commit_only_a_destination_that_discarded_its_vm_resumes_the_source() {
        let mut s = completed(false);
        let failed = ToSource::Failed { reason: "cont failed".into(), vm_discarded: true };
        let failure = s.handle_control(ControlEvent::Message(failed)).unwrap_err();
        assert_eq!(failure.reason, "the destination failed after the commit and discarded its VM: cont failed");
        s.handle_failure(&failure.reason);
        assert_eq!(
            drain(&mut s),
            vec![SourceAction::RestoreParameters, SourceAction::ResumeSource, SourceAction::Finish(Outcome::Failed)]
        );

        // Failed, but the destination could not make sure its VM is gone: stay paused.
        let mut s = completed(false);
        let failed = ToSource::Failed { reason: "cont timed out".into(), vm_discarded: false };
        let failure = s.handle_control(ControlEvent::Message(failed)).unwrap_err();
        s.handle_failure(&failure.reason);
        assert_eq!(drain(&mut s), vec![SourceAction::KeepSourcePaused, SourceAction::Finish(Outcome::Failed)]);
        assert_eq!(s.source_vm(), &SourceVm::PausedDestinationUnknown);
    }

    #[test]
    fn after_the_commit_a_silent_destination_keeps_the_source_paused() {
        for lost in [ChannelError::Closed, ChannelError::Timeout(Duration::from_secs(60))] {
            let mut s = completed(false);
            let failure = s.handle_control(ControlEvent::Lost(lost)).unwrap_err();
            s.handle_failure(&failure.reason);
            let actions = drain(&mut s);
            assert!(!actions.contains(&SourceAction::ResumeSource), "{actions:?}");
            // No Abort either: the destination was told to commit.
            assert_eq!(actions, vec![SourceAction::KeepSourcePaused, SourceAction::Finish(Outcome::Failed)]);
            assert_eq!(s.source_vm(), &SourceVm::PausedDestinationUnknown);
            assert!(s.source_vm().to_string().contains("ferry-host resolve"));
        }
        // Any other failure in the cutover wait (sending Commit, say) is the same.
        let mut s = completed(false);
        s.handle_failure("control channel: broken pipe");
        assert!(!drain(&mut s).contains(&SourceAction::ResumeSource));
        assert_eq!(s.source_vm(), &SourceVm::PausedDestinationUnknown);
    }

    #[test]
    fn the_pre_commit_check_decides_before_the_commit() {
        let t0 = Instant::now();
        let checked = || {
            let mut s = SourceSession::new(SourceConfig { keep_source: false, steer: true, pre_commit_check: true, cutover_deadline: Duration::from_secs(10) }, t0);
            s.handle_control_opened();
            s.handle_migration_started(controller(), t0);
            s.handle_progress(t0, &info(MigrationStatus::Completed), &GatewayReading::default()).unwrap();
            assert_eq!(drain(&mut s), vec![SourceAction::RunPreCommitCheck]);
            assert_eq!(s.stage(), Stage::Checking);
            s
        };
        let mut s = checked();
        s.handle_pre_commit_check(Ok(())).unwrap();
        assert_eq!(drain(&mut s), vec![SourceAction::Send(ToDestination::Commit)]);
        assert_eq!(s.stage(), Stage::Committed);

        // A failed check, or a signal meanwhile: not committed, so the source resumes.
        let mut s = checked();
        let failure = s.handle_pre_commit_check(Err("RAM differs in 3 pages".into())).unwrap_err();
        assert_eq!(failure.reason, "the pre-commit check failed: RAM differs in 3 pages");
        s.handle_failure(&failure.reason);
        let undo = [SourceAction::CancelMigration, SourceAction::RestoreParameters, SourceAction::ResumeSource, SourceAction::Finish(Outcome::Failed)];
        let actions = drain(&mut s);
        assert_eq!(actions[0], abort(&failure.reason));
        assert_eq!(actions[1..], undo);
        let mut s = checked();
        let failure = s.handle_signal(Signal::Interrupt).unwrap_err();
        s.handle_failure(&failure.reason);
        assert_eq!(drain(&mut s)[1..], undo);
    }

    #[test]
    fn a_stop_and_copy_past_the_cutover_deadline_cancels_before_the_commit() {
        let (mut s, t0) = migrating();
        let stopped = t0 + Duration::from_secs(5);
        s.handle_source_stopped(stopped);
        // A later STOP (a second event) does not move the start.
        s.handle_source_stopped(stopped + Duration::from_secs(2));
        s.handle_progress(stopped + Duration::from_millis(9_900), &info(MigrationStatus::Active), &GatewayReading::default()).unwrap();
        drain(&mut s);
        let failure = s.handle_progress(stopped + Duration::from_secs(10), &info(MigrationStatus::Active), &GatewayReading::default()).unwrap_err();
        assert!(failure.reason.contains("cutover deadline (10s"), "{}", failure.reason);
        s.handle_failure(&failure.reason);
        assert_eq!(
            drain(&mut s)[1..],
            [SourceAction::CancelMigration, SourceAction::RestoreParameters, SourceAction::ResumeSource, SourceAction::Finish(Outcome::Failed)]
        );
        // Completion inside the deadline commits as usual.
        let (mut s, t0) = migrating();
        s.handle_source_stopped(t0);
        s.handle_progress(t0 + Duration::from_secs(9), &info(MigrationStatus::Completed), &GatewayReading::default()).unwrap();
        assert_eq!(drain(&mut s), vec![SourceAction::Send(ToDestination::Commit)]);
    }

    #[test]
    fn a_failure_racing_qemus_completion_resumes_before_the_commit() {
        // QEMU completed, but the shell failed (a signal, a gateway error) before it fed that
        // poll in: the stage is still Migrating, Commit was never sent, so resuming is safe.
        let (mut s, _) = migrating();
        let failure = s.handle_signal(Signal::Terminate).unwrap_err();
        s.handle_failure(&failure.reason);
        let actions = drain(&mut s);
        assert_eq!(
            actions[1..],
            [SourceAction::CancelMigration, SourceAction::RestoreParameters, SourceAction::ResumeSource, SourceAction::Finish(Outcome::Failed)]
        );
        assert!(!actions.contains(&SourceAction::Send(ToDestination::Commit)));
    }

    #[test]
    fn signals_during_the_cutover_wait_are_ignored() {
        let mut s = completed(false);
        assert_eq!(s.handle_signal(Signal::Interrupt), Ok(()));
        assert_eq!(s.handle_signal(Signal::Terminate), Ok(()));
        assert_eq!(s.stage(), Stage::Committed);
        assert_eq!(drain(&mut s), vec![]);
        // Other messages are ignored there too.
        assert_eq!(s.handle_control(ControlEvent::Message(ToSource::Pong { seq: 0, unix_ns: 0 })), Ok(()));
        assert_eq!(s.stage(), Stage::Committed);
    }

    #[test]
    fn destination_running_quits_the_source() {
        let mut s = completed(false);
        s.handle_control(ControlEvent::Message(running_message())).unwrap();
        assert_eq!(s.stage(), Stage::DestinationRunning);
        assert_eq!(
            drain(&mut s),
            vec![SourceAction::RecordCutover { resumed_unix_ns: Some(9), first_heartbeat_unix_ns: Some(11) }, SourceAction::QuitSource]
        );
        s.handle_quit(Ok(()));
        assert_eq!(s.source_vm(), &SourceVm::Quit);
        assert_eq!(s.handle_signal(Signal::Interrupt), Ok(()));
    }

    #[test]
    fn destination_running_with_keep_source_keeps_it_paused() {
        let mut s = completed(true);
        s.handle_control(ControlEvent::Message(running_message())).unwrap();
        assert_eq!(drain(&mut s)[1..], [SourceAction::KeepSourcePaused]);
        assert_eq!(s.source_vm().to_string(), "paused");
    }

    #[test]
    fn failures_after_running_are_warnings() {
        let mut s = completed(false);
        s.handle_control(ControlEvent::Message(running_message())).unwrap();
        drain(&mut s);
        s.handle_quit(Err("QMP gone".into()));
        assert_eq!(s.source_vm(), &SourceVm::Paused);
        assert_eq!(s.handle_control(ControlEvent::Lost(ChannelError::Timeout(Duration::from_secs(10)))), Ok(()));
        assert_eq!(
            s.handle_control(ControlEvent::Message(ToSource::Announced {
                interface: Some("br0".into()),
                macs: vec!["52:54:00:00:00:01".into()],
                frames: 0,
                error: Some("no such device".into()),
            })),
            Ok(())
        );
        s.handle_final_counts_failed("gateway gone");
        s.handle_done();
        assert_eq!(
            drain(&mut s),
            vec![
                SourceAction::Warn("cannot quit the source VM (left paused): QMP gone".into()),
                SourceAction::Warn("no announcement report from the destination: no answer from the other host-plugin within 10s".into()),
                SourceAction::Warn("MAC announcement at the destination failed: no such device".into()),
                SourceAction::RecordAnnouncement { interface: Some("br0".into()), macs: vec!["52:54:00:00:00:01".into()] },
                SourceAction::Warn("final byte counts incomplete: gateway gone".into()),
                SourceAction::Finish(Outcome::Completed),
            ]
        );
        // Even an internal failure now leaves the source VM as it is and sends no Abort.
        s.handle_failure("internal");
        assert_eq!(drain(&mut s), vec![SourceAction::Finish(Outcome::Failed)]);
        assert_eq!(s.source_vm(), &SourceVm::Paused);
    }

    #[test]
    fn pre_copy_polls_show_progress_and_track_figures() {
        let (mut s, t0) = migrating();
        let mut reading = info(MigrationStatus::Active);
        reading.cpu_throttle_percentage = Some(30);
        s.handle_progress(t0 + Duration::from_millis(100), &reading, &GatewayReading::default()).unwrap();
        let actions = drain(&mut s);
        let Some(SourceAction::ShowProgress(snapshot)) = actions.last() else { panic!("{actions:?}") };
        assert_eq!(snapshot.phase, "pass 1");
        assert_eq!(snapshot.elapsed, Duration::from_millis(100));
        assert_eq!(s.figures().max_throttle_percent, 30);
        assert_eq!(s.figures().iterations, 1);
        assert_eq!(s.stage(), Stage::Migrating);
    }

    #[test]
    fn not_steering_sets_no_parameters() {
        let t0 = Instant::now();
        let mut s = SourceSession::new(SourceConfig { keep_source: false, steer: false, pre_commit_check: false, cutover_deadline: Duration::from_secs(10) }, t0);
        s.handle_migration_started(controller(), t0);
        for i in 1..20 {
            s.handle_progress(t0 + Duration::from_millis(100 * i), &info(MigrationStatus::Active), &GatewayReading::default()).unwrap();
            assert!(drain(&mut s).iter().all(|a| matches!(a, SourceAction::ShowProgress(_))));
        }
    }
}
