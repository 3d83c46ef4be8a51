//! One control session of `ferry-host serve` (the destination side) as a sans-IO state machine.
//!
//! ```text
//! AwaitingPrepare ──Prepare──▶ Preparing ──prepared──▶ Prepared ──SourceCompleted──▶ CuttingOver ──runs──▶ Running
//!   │ Ping: Pong                 │ failed: Failed         │ Ping: Pong                  │ paused (-S) and loaded: cont
//!   │ closed: done               │                        │ incoming QEMU failed:       │ failed / gone / timeout:
//!   │ Abort: done                │                        │   Failed                    │   Failed
//!                                                         │ Abort: give the incoming QEMU up
//! ```
//!
//! The shell ([`crate::serve`]) is an interpreter: it takes [`DestinationSession::poll_action`]
//! until [`DestinationAction::Finish`], carries each action out, and feeds its result back
//! through the matching `handle_*`. The machine always queues the next action, so the shell
//! never decides what comes next.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use crate::control::ChannelError;
use ferry_api::control::{SharedSettings, ToDestination, ToSource};
use ferry_qmp::{MigrationInfo, MigrationStatus, QmpError, RunState, StatusInfo};

use super::{error_chain, ControlEvent};

/// How long, after the source completed, the VM may take to run here.
pub const RUNNING_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the incoming QEMU is checked while the migration streams in.
pub const WATCH: Duration = Duration::from_millis(100);
/// Pause between two run-state checks during the cutover.
pub const CUTOVER_POLL: Duration = Duration::from_millis(20);

/// Where the session stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DestinationStage {
    /// No VM named yet (clock probes may come).
    AwaitingPrepare,
    /// The incoming QEMU is being set up.
    Preparing,
    /// The incoming QEMU waits for (or receives) the migration stream.
    Prepared,
    /// The source completed; waiting for the VM to run here.
    CuttingOver,
    /// The VM runs here; reporting and announcing.
    Running,
    /// The session is over.
    Finished,
}

/// What the cutover is checking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CutoverCheck {
    /// The VM is paused (started with `-S`): has the state been loaded?
    Loaded,
    /// The VM neither runs nor is paused: did the migration fail?
    Failed,
}

/// What the shell must do next.
#[derive(Clone, Debug, PartialEq)]
pub enum DestinationAction {
    /// Wait for the next control message, however long, and feed it to
    /// [`DestinationSession::handle_control`].
    ReceiveControl,
    /// Wait at most this long for a control message ([`DestinationSession::handle_control`]);
    /// when none came, call [`DestinationSession::handle_watch_due`].
    ReceiveControlOrWatch(Duration),
    /// Answer a clock probe with the destination's clock at sending.
    SendPong {
        /// The probe's `seq`.
        seq: u32,
    },
    /// Send this to the source.
    Send(ToSource),
    /// Set the incoming QEMU up for `vm`, then call [`DestinationSession::handle_prepared`].
    Prepare {
        /// The VM's name.
        vm: String,
        /// The source QEMU's version (for the log).
        source_qemu_version: String,
        /// Settings to mirror.
        settings: SharedSettings,
        /// IP addresses to announce after cutover.
        ips: Vec<IpAddr>,
    },
    /// `query-migrate` on the incoming QEMU, then [`DestinationSession::handle_incoming_migration`].
    QueryIncomingMigration,
    /// `query-status` on the incoming QEMU, then [`DestinationSession::handle_run_state`].
    QueryRunState,
    /// `cont` on the incoming QEMU, then [`DestinationSession::handle_resumed`].
    Resume,
    /// Wait this long.
    Sleep(Duration),
    /// The VM runs here in `status`: tell the source (`Running`, with the resume and first
    /// heartbeat times).
    ReportRunning {
        /// The VM's run state.
        status: RunState,
    },
    /// Re-announce the VM's MACs and send the source the `Announced` report.
    Announce,
    /// Drop the incoming QEMU (the source gave the migration up).
    GiveUpIncoming,
    /// The session is over: `Err` says why it failed.
    Finish(Result<(), String>),
}

/// The destination side's lifecycle; see the module doc.
#[derive(Debug)]
pub struct DestinationSession {
    stage: DestinationStage,
    /// During the cutover: when the VM must run by, and what is being checked.
    cutover: Option<(Instant, Option<CutoverCheck>)>,
    actions: VecDeque<DestinationAction>,
}

impl Default for DestinationSession {
    fn default() -> Self {
        Self::new()
    }
}

impl DestinationSession {
    /// A new control session: waits for the source.
    pub fn new() -> Self {
        Self { stage: DestinationStage::AwaitingPrepare, cutover: None, actions: VecDeque::from([DestinationAction::ReceiveControl]) }
    }

    /// Where the session stands.
    pub fn stage(&self) -> DestinationStage {
        self.stage
    }

    /// The next thing to do; `None` only after [`DestinationAction::Finish`] was taken.
    pub fn poll_action(&mut self) -> Option<DestinationAction> {
        self.actions.pop_front()
    }

    /// A control message from the source at `now`, or the channel's end.
    pub fn handle_control(&mut self, now: Instant, event: ControlEvent<ToDestination>) {
        let message = match event {
            ControlEvent::Message(m) => m,
            // Closed with no migration under way: a probe, or the source gave up.
            ControlEvent::Lost(ChannelError::Closed) if self.stage == DestinationStage::AwaitingPrepare => {
                return self.finish(Ok(()));
            }
            ControlEvent::Lost(e) if self.stage == DestinationStage::AwaitingPrepare => return self.finish(Err(error_chain(&e))),
            ControlEvent::Lost(e) => {
                return self.finish(Err(format!("the source's control channel failed during the migration: {}", error_chain(&e))))
            }
        };
        match message {
            ToDestination::Ping { seq } => {
                self.actions.push_back(DestinationAction::SendPong { seq });
                self.receive_next();
            }
            ToDestination::Prepare { .. } if self.stage != DestinationStage::AwaitingPrepare => {
                self.finish(Err("a second Prepare in one session".into()))
            }
            ToDestination::Prepare { vm, qemu_version, settings, ips } => {
                self.stage = DestinationStage::Preparing;
                self.actions.push_back(DestinationAction::Prepare { vm, source_qemu_version: qemu_version, settings, ips });
            }
            ToDestination::SourceCompleted if self.stage != DestinationStage::Prepared => {
                self.finish(Err("SourceCompleted before Prepare".into()))
            }
            ToDestination::SourceCompleted => {
                self.stage = DestinationStage::CuttingOver;
                self.cutover = Some((now + RUNNING_TIMEOUT, None));
                self.actions.push_back(DestinationAction::QueryRunState);
            }
            ToDestination::Abort { reason } => {
                tracing::warn!(%reason, "the source gave the migration up");
                if self.stage == DestinationStage::Prepared {
                    self.actions.push_back(DestinationAction::GiveUpIncoming);
                }
                self.finish(Ok(()));
            }
        }
    }

    /// No control message within the watch interval: check the incoming QEMU.
    pub fn handle_watch_due(&mut self) {
        self.actions.push_back(DestinationAction::QueryIncomingMigration);
    }

    /// The result of [`DestinationAction::Prepare`]: where the incoming QEMU listens and its
    /// version, or why it could not be prepared.
    pub fn handle_prepared(&mut self, result: Result<(SocketAddr, String), String>) {
        match result {
            Ok((listen, qemu_version)) => {
                self.stage = DestinationStage::Prepared;
                self.actions.push_back(DestinationAction::Send(ToSource::Prepared { listen, qemu_version }));
                self.receive_next();
            }
            Err(reason) => self.fail(reason),
        }
    }

    /// The incoming QEMU's `query-migrate` at `now`.
    pub fn handle_incoming_migration(&mut self, now: Instant, result: Result<MigrationInfo, QmpError>) {
        match self.stage {
            // While the migration streams in, notice an incoming QEMU that gave up.
            DestinationStage::Prepared => {
                let failure = match result {
                    Ok(info) if info.status() == MigrationStatus::Failed => Some(format!(
                        "the incoming migration failed: {}",
                        info.error_desc.unwrap_or_else(|| "no reason given".into())
                    )),
                    Ok(_) => None,
                    Err(e) if e.is_connection_lost() => {
                        Some("the incoming QEMU exited (it rejected or lost the migration stream)".into())
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "query-migrate on the incoming VM");
                        None
                    }
                };
                match failure {
                    Some(reason) => {
                        tracing::warn!(%reason, "incoming migration failed");
                        self.fail(reason);
                    }
                    None => self.receive_next(),
                }
            }
            DestinationStage::CuttingOver => {
                let check = self.cutover.and_then(|(_, check)| check);
                let failure = match (check, result) {
                    // Started with -S: the state is loaded, run it.
                    (Some(CutoverCheck::Loaded), Ok(i)) if i.status() == MigrationStatus::Completed => {
                        self.actions.push_back(DestinationAction::Resume);
                        return;
                    }
                    (Some(CutoverCheck::Failed), Ok(i)) if i.status() == MigrationStatus::Failed => {
                        Some(format!("the incoming migration failed: {}", i.error_desc.unwrap_or_default()))
                    }
                    _ => None,
                };
                self.cutover_checked(now, failure);
            }
            _ => {}
        }
    }

    /// The incoming QEMU's `query-status` at `now`, during the cutover.
    pub fn handle_run_state(&mut self, now: Instant, result: Result<StatusInfo, QmpError>) {
        match result {
            Ok(s) if s.running => {
                self.stage = DestinationStage::Running;
                self.cutover = None;
                self.actions.push_back(DestinationAction::ReportRunning { status: s.status });
                self.actions.push_back(DestinationAction::Announce);
                self.finish(Ok(()));
            }
            Ok(s) => {
                let check = match s.status {
                    RunState::Paused | RunState::Prelaunch => CutoverCheck::Loaded,
                    _ => CutoverCheck::Failed,
                };
                if let Some((_, c)) = self.cutover.as_mut() {
                    *c = Some(check);
                }
                self.actions.push_back(DestinationAction::QueryIncomingMigration);
            }
            Err(e) => self.cutover_checked(now, Some(format!("the incoming QEMU is gone: {e}"))),
        }
    }

    /// The result of [`DestinationAction::Resume`] at `now`.
    pub fn handle_resumed(&mut self, now: Instant, result: Result<(), QmpError>) {
        match result {
            // Check again at once.
            Ok(()) => self.actions.push_back(DestinationAction::QueryRunState),
            Err(e) => self.cutover_checked(now, Some(format!("cont failed: {e}"))),
        }
    }

    /// One cutover check ended without the VM running: fail, time out, or check again.
    fn cutover_checked(&mut self, now: Instant, failure: Option<String>) {
        if let Some(reason) = failure {
            return self.fail(reason);
        }
        match self.cutover {
            Some((deadline, _)) if now >= deadline => {
                self.fail(format!("the VM did not start running within {RUNNING_TIMEOUT:?}"))
            }
            _ => {
                self.actions.push_back(DestinationAction::Sleep(CUTOVER_POLL));
                self.actions.push_back(DestinationAction::QueryRunState);
            }
        }
    }

    /// Waits for the next control message the way the stage needs.
    fn receive_next(&mut self) {
        self.actions.push_back(match self.stage {
            DestinationStage::Prepared => DestinationAction::ReceiveControlOrWatch(WATCH),
            _ => DestinationAction::ReceiveControl,
        });
    }

    /// Tells the source, and ends the session with `reason`.
    fn fail(&mut self, reason: String) {
        self.actions.push_back(DestinationAction::Send(ToSource::Failed { reason: reason.clone() }));
        self.finish(Err(reason));
    }

    fn finish(&mut self, result: Result<(), String>) {
        self.stage = DestinationStage::Finished;
        self.actions.push_back(DestinationAction::Finish(result));
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};

    use super::*;

    fn drain(s: &mut DestinationSession) -> Vec<DestinationAction> {
        std::iter::from_fn(|| s.poll_action()).collect()
    }

    fn listen() -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, 4444))
    }

    fn prepare() -> ToDestination {
        ToDestination::Prepare {
            vm: "vm1".into(),
            qemu_version: "9.0.0".into(),
            settings: SharedSettings { capabilities: vec![("multifd".into(), true)], multifd_channels: Some(4) },
            ips: vec![],
        }
    }

    fn status(state: RunState, running: bool) -> StatusInfo {
        StatusInfo { status: state, running, singlestep: None }
    }

    fn migration(status: MigrationStatus, error: Option<&str>) -> MigrationInfo {
        MigrationInfo { status: Some(status), error_desc: error.map(Into::into), ..MigrationInfo::default() }
    }

    fn lost() -> QmpError {
        QmpError::ConnectionLost { command: Some("query-migrate".into()), reason: "EOF".into() }
    }

    /// A session whose incoming QEMU is prepared.
    fn prepared(now: Instant) -> DestinationSession {
        let mut s = DestinationSession::new();
        assert_eq!(drain(&mut s), vec![DestinationAction::ReceiveControl]);
        s.handle_control(now, ControlEvent::Message(ToDestination::Ping { seq: 3 }));
        assert_eq!(drain(&mut s), vec![DestinationAction::SendPong { seq: 3 }, DestinationAction::ReceiveControl]);
        s.handle_control(now, ControlEvent::Message(prepare()));
        assert!(matches!(&drain(&mut s)[..], [DestinationAction::Prepare { vm, .. }] if vm == "vm1"));
        s.handle_prepared(Ok((listen(), "9.1.0".into())));
        assert_eq!(
            drain(&mut s),
            vec![
                DestinationAction::Send(ToSource::Prepared { listen: listen(), qemu_version: "9.1.0".into() }),
                DestinationAction::ReceiveControlOrWatch(WATCH)
            ]
        );
        s
    }

    /// A session in the cutover, started at `now`.
    fn cutting_over(now: Instant) -> DestinationSession {
        let mut s = prepared(now);
        s.handle_control(now, ControlEvent::Message(ToDestination::SourceCompleted));
        assert_eq!(drain(&mut s), vec![DestinationAction::QueryRunState]);
        assert_eq!(s.stage(), DestinationStage::CuttingOver);
        s
    }

    fn failed(reason: &str) -> Vec<DestinationAction> {
        vec![DestinationAction::Send(ToSource::Failed { reason: reason.into() }), DestinationAction::Finish(Err(reason.into()))]
    }

    #[test]
    fn a_closed_channel_before_prepare_is_a_probe() {
        let mut s = DestinationSession::new();
        drain(&mut s);
        s.handle_control(Instant::now(), ControlEvent::Lost(ChannelError::Closed));
        assert_eq!(drain(&mut s), vec![DestinationAction::Finish(Ok(()))]);
    }

    #[test]
    fn a_failed_prepare_is_reported() {
        let mut s = DestinationSession::new();
        drain(&mut s);
        s.handle_control(Instant::now(), ControlEvent::Message(prepare()));
        drain(&mut s);
        s.handle_prepared(Err("no incoming QEMU for `vm1`".into()));
        assert_eq!(drain(&mut s), failed("no incoming QEMU for `vm1`"));
    }

    #[test]
    fn abort_before_running_gives_the_incoming_qemu_up() {
        let now = Instant::now();
        let mut s = prepared(now);
        s.handle_control(now, ControlEvent::Message(ToDestination::Abort { reason: "interrupted (Ctrl-C)".into() }));
        assert_eq!(drain(&mut s), vec![DestinationAction::GiveUpIncoming, DestinationAction::Finish(Ok(()))]);
        // Before Prepare there is nothing to give up.
        let mut s = DestinationSession::new();
        drain(&mut s);
        s.handle_control(now, ControlEvent::Message(ToDestination::Abort { reason: "no peer".into() }));
        assert_eq!(drain(&mut s), vec![DestinationAction::Finish(Ok(()))]);
    }

    #[test]
    fn out_of_order_messages_end_the_session() {
        let now = Instant::now();
        let mut s = DestinationSession::new();
        drain(&mut s);
        s.handle_control(now, ControlEvent::Message(ToDestination::SourceCompleted));
        assert_eq!(drain(&mut s), vec![DestinationAction::Finish(Err("SourceCompleted before Prepare".into()))]);
        let mut s = prepared(now);
        s.handle_control(now, ControlEvent::Message(prepare()));
        assert_eq!(drain(&mut s), vec![DestinationAction::Finish(Err("a second Prepare in one session".into()))]);
    }

    #[test]
    fn the_incoming_qemu_failing_during_the_stream_is_reported() {
        let now = Instant::now();
        let mut s = prepared(now);
        s.handle_watch_due();
        assert_eq!(drain(&mut s), vec![DestinationAction::QueryIncomingMigration]);
        s.handle_incoming_migration(now, Ok(migration(MigrationStatus::Active, None)));
        assert_eq!(drain(&mut s), vec![DestinationAction::ReceiveControlOrWatch(WATCH)]);
        s.handle_incoming_migration(now, Err(QmpError::Protocol { context: "x".into(), detail: "y".into() }));
        assert_eq!(drain(&mut s), vec![DestinationAction::ReceiveControlOrWatch(WATCH)]);
        s.handle_incoming_migration(now, Ok(migration(MigrationStatus::Failed, None)));
        assert_eq!(drain(&mut s), failed("the incoming migration failed: no reason given"));

        let mut s = prepared(now);
        s.handle_incoming_migration(now, Err(lost()));
        assert_eq!(drain(&mut s), failed("the incoming QEMU exited (it rejected or lost the migration stream)"));
    }

    #[test]
    fn a_lost_channel_during_the_stream_fails_the_session() {
        let now = Instant::now();
        let mut s = prepared(now);
        s.handle_control(now, ControlEvent::Lost(ChannelError::Closed));
        assert_eq!(
            drain(&mut s),
            vec![DestinationAction::Finish(Err(
                "the source's control channel failed during the migration: the other host-plugin closed the control channel".into()
            ))]
        );
    }

    #[test]
    fn source_completed_waits_for_the_vm_to_run_then_reports_and_announces() {
        let t0 = Instant::now();
        let mut s = cutting_over(t0);
        // Not running yet, migration still loading: check again shortly.
        s.handle_run_state(t0, Ok(status(RunState::InMigrate, false)));
        assert_eq!(drain(&mut s), vec![DestinationAction::QueryIncomingMigration]);
        s.handle_incoming_migration(t0, Ok(migration(MigrationStatus::Active, None)));
        assert_eq!(drain(&mut s), vec![DestinationAction::Sleep(CUTOVER_POLL), DestinationAction::QueryRunState]);
        s.handle_run_state(t0, Ok(status(RunState::Running, true)));
        assert_eq!(
            drain(&mut s),
            vec![
                DestinationAction::ReportRunning { status: RunState::Running },
                DestinationAction::Announce,
                DestinationAction::Finish(Ok(()))
            ]
        );
        assert_eq!(s.stage(), DestinationStage::Finished);
    }

    #[test]
    fn a_vm_started_with_dash_s_is_resumed_once_loaded() {
        let t0 = Instant::now();
        let mut s = cutting_over(t0);
        s.handle_run_state(t0, Ok(status(RunState::Paused, false)));
        assert_eq!(drain(&mut s), vec![DestinationAction::QueryIncomingMigration]);
        // Not loaded yet: wait.
        s.handle_incoming_migration(t0, Ok(migration(MigrationStatus::Active, None)));
        assert_eq!(drain(&mut s), vec![DestinationAction::Sleep(CUTOVER_POLL), DestinationAction::QueryRunState]);
        s.handle_run_state(t0, Ok(status(RunState::Prelaunch, false)));
        drain(&mut s);
        s.handle_incoming_migration(t0, Ok(migration(MigrationStatus::Completed, None)));
        assert_eq!(drain(&mut s), vec![DestinationAction::Resume]);
        s.handle_resumed(t0, Ok(()));
        assert_eq!(drain(&mut s), vec![DestinationAction::QueryRunState]);
        s.handle_run_state(t0, Ok(status(RunState::Running, true)));
        assert_eq!(drain(&mut s)[0], DestinationAction::ReportRunning { status: RunState::Running });
    }

    #[test]
    fn cutover_failures_are_reported_to_the_source() {
        let t0 = Instant::now();
        let mut s = cutting_over(t0);
        s.handle_run_state(t0, Ok(status(RunState::Paused, false)));
        s.handle_incoming_migration(t0, Ok(migration(MigrationStatus::Completed, None)));
        drain(&mut s);
        s.handle_resumed(t0, Err(lost()));
        assert_eq!(drain(&mut s), failed("cont failed: QMP connection lost during `query-migrate`: EOF"));

        let mut s = cutting_over(t0);
        s.handle_run_state(t0, Ok(status(RunState::InMigrate, false)));
        s.handle_incoming_migration(t0, Ok(migration(MigrationStatus::Failed, Some("bad section"))));
        assert_eq!(drain(&mut s)[1..], failed("the incoming migration failed: bad section"));

        let mut s = cutting_over(t0);
        s.handle_run_state(t0, Err(lost()));
        assert_eq!(drain(&mut s), failed("the incoming QEMU is gone: QMP connection lost during `query-migrate`: EOF"));
    }

    #[test]
    fn the_vm_must_run_within_the_timeout() {
        let t0 = Instant::now();
        let mut s = cutting_over(t0);
        s.handle_run_state(t0 + RUNNING_TIMEOUT - Duration::from_millis(1), Ok(status(RunState::InMigrate, false)));
        s.handle_incoming_migration(t0 + RUNNING_TIMEOUT - Duration::from_millis(1), Ok(migration(MigrationStatus::Active, None)));
        assert_eq!(drain(&mut s)[1..], [DestinationAction::Sleep(CUTOVER_POLL), DestinationAction::QueryRunState]);
        s.handle_run_state(t0 + RUNNING_TIMEOUT, Ok(status(RunState::InMigrate, false)));
        s.handle_incoming_migration(t0 + RUNNING_TIMEOUT, Ok(migration(MigrationStatus::Active, None)));
        assert_eq!(drain(&mut s)[1..], failed("the VM did not start running within 30s"));
    }
}
