//! One control session of `ferry-host serve` (the destination side) as a sans-IO state machine.
//!
//! ```text
//! AwaitingPrepare ──Prepare──▶ Preparing ──prepared──▶ Prepared ──Commit──▶ Committed ──runs──▶ Running
//!   │ Ping: Pong                 │ failed: Failed         │ Ping: Pong          │ loaded: cont
//!   │ Inquire: VmState           │ (nothing loaded)       │ Abort, lost channel,│ failed / gone / timeout:
//!   │ Discard: Discarded         │                        │ incoming QEMU failed│   discard, Failed
//!   │ closed: done               │                        │ or shutdown:        │ lost channel: goes on
//!   │                            │                        │   discard, Failed   │ (the source decided)
//! ```
//!
//! The rule this side keeps: the incoming VM runs only after `Commit`. Prepare turns QEMU's
//! autostart off (`stop` while `inmigrate`), so a loaded VM waits paused; anything that ends the
//! session before `Commit` discards it (quit, else SIGKILL), and after `Commit` a VM that cannot
//! be made to run is discarded too, so that `Failed { vm_discarded: true }` is a promise the
//! source may resume on. Only when the discard itself cannot be made sure does the source hear
//! `vm_discarded: false` (and keeps its VM paused for `ferry-host resolve`).
//!
//! The shell ([`crate::serve`]) is an interpreter: it takes [`DestinationSession::poll_action`]
//! until [`DestinationAction::Finish`], carries each action out, and feeds its result back
//! through the matching `handle_*`. The machine always queues the next action, so the shell
//! never decides what comes next.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use crate::control::ChannelError;
use ferry_api::control::{IncomingState, SharedSettings, ToDestination, ToSource};
use ferry_qmp::{MigrationInfo, MigrationStatus, QmpError, RunState, StatusInfo};

use super::{error_chain, ControlEvent};

/// How long, after `Commit`, the VM may take to run here.
pub const RUNNING_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the incoming QEMU is checked while the migration streams in.
pub const WATCH: Duration = Duration::from_millis(100);
/// Pause between two checks during the cutover.
pub const CUTOVER_POLL: Duration = Duration::from_millis(20);

/// Where the session stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum DestinationStage {
    /// No VM named yet (clock probes, or `ferry-host resolve`'s questions, may come).
    AwaitingPrepare,
    /// The incoming QEMU is being set up.
    Preparing,
    /// The incoming QEMU waits for (or receives) the migration stream, paused.
    Prepared,
    /// The source committed: the VM is to run here.
    Committed,
    /// The VM runs here; reporting and announcing.
    Running,
    /// The session is over.
    Finished,
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
    /// Send this to the source (a failed send is only logged: a broken channel shows as a lost
    /// one at the next receive, and after `Commit` nothing the source hears changes the plan).
    Send(ToSource),
    /// Claim `vm` for this session and set its incoming QEMU up, autostart off, then call
    /// [`DestinationSession::handle_prepared`].
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
    /// Make sure the incoming QEMU of `vm` does not and will not run (`quit`; if QMP does not
    /// answer, SIGKILL its process), then [`DestinationSession::handle_discarded`].
    Discard {
        /// The VM's name.
        vm: String,
    },
    /// (`Inquire`) Find out what the incoming VM `vm` is here, then
    /// [`DestinationSession::handle_inquiry`].
    Inquire {
        /// The VM's name.
        vm: String,
    },
    /// The session is over: `Err` says why it failed.
    Finish(Result<(), String>),
}

/// The destination side's lifecycle; see the module doc.
#[derive(Debug)]
pub struct DestinationSession {
    stage: DestinationStage,
    /// The VM this session migrates, from `Prepare` on.
    vm: Option<String>,
    /// After `Commit`: when the VM must run by.
    deadline: Option<Instant>,
    /// A discard under way because the session failed: why (sent with `Failed`).
    failing: Option<String>,
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
        Self {
            stage: DestinationStage::AwaitingPrepare,
            vm: None,
            deadline: None,
            failing: None,
            actions: VecDeque::from([DestinationAction::ReceiveControl]),
        }
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
            // The source went away before committing: it keeps (or resumes) its VM.
            ControlEvent::Lost(e) if self.stage == DestinationStage::Prepared => {
                return self.fail(format!("the source's control channel failed before the commit: {}", error_chain(&e)))
            }
            ControlEvent::Lost(e) => {
                // Only waited for in the stages above.
                return self.finish(Err(format!("the source's control channel failed: {}", error_chain(&e))));
            }
        };
        match (self.stage, message) {
            (_, ToDestination::Ping { seq }) => {
                self.actions.push_back(DestinationAction::SendPong { seq });
                self.receive_next();
            }
            (DestinationStage::AwaitingPrepare, ToDestination::Prepare { vm, qemu_version, settings, ips }) => {
                self.stage = DestinationStage::Preparing;
                self.vm = Some(vm.clone());
                self.actions.push_back(DestinationAction::Prepare { vm, source_qemu_version: qemu_version, settings, ips });
            }
            (DestinationStage::Prepared, ToDestination::Commit) => {
                self.stage = DestinationStage::Committed;
                self.deadline = Some(now + RUNNING_TIMEOUT);
                self.actions.push_back(DestinationAction::QueryIncomingMigration);
            }
            (DestinationStage::Prepared, ToDestination::Abort { reason }) => {
                tracing::warn!(%reason, "the source gave the migration up");
                self.fail(format!("the source gave the migration up: {reason}"));
            }
            (DestinationStage::AwaitingPrepare, ToDestination::Abort { reason }) => {
                tracing::warn!(%reason, "the source gave the migration up before preparing");
                self.finish(Ok(()));
            }
            (DestinationStage::AwaitingPrepare, ToDestination::Inquire { vm }) => {
                self.actions.push_back(DestinationAction::Inquire { vm })
            }
            (DestinationStage::AwaitingPrepare, ToDestination::Discard { vm }) => {
                self.vm = Some(vm.clone());
                self.actions.push_back(DestinationAction::Discard { vm })
            }
            (DestinationStage::Prepared, other) => self.fail(format!("unexpected message before the commit: {other:?}")),
            (stage, other) => self.finish(Err(format!("unexpected message while {stage:?}: {other:?}"))),
        }
    }

    /// `ferry-serve` is stopping: a session not yet committed gives its VM up (the source
    /// resumes); a committed one finishes.
    pub fn handle_shutdown(&mut self) {
        match self.stage {
            DestinationStage::AwaitingPrepare => {
                self.actions.clear();
                self.finish(Ok(()));
            }
            DestinationStage::Prepared => {
                self.actions.clear();
                self.fail("the destination host-plugin is shutting down".into());
            }
            _ => {}
        }
    }

    /// No control message within the watch interval: check the incoming QEMU.
    pub fn handle_watch_due(&mut self) {
        self.actions.push_back(DestinationAction::QueryIncomingMigration);
    }

    /// The result of [`DestinationAction::Prepare`]: where the incoming QEMU listens and its
    /// version, or why it could not be prepared (nothing was loaded: there is nothing to discard).
    pub fn handle_prepared(&mut self, result: Result<(SocketAddr, String), String>) {
        match result {
            Ok((listen, qemu_version)) => {
                self.stage = DestinationStage::Prepared;
                self.actions.push_back(DestinationAction::Send(ToSource::Prepared { listen, qemu_version }));
                self.receive_next();
            }
            Err(reason) => {
                self.actions.push_back(DestinationAction::Send(ToSource::Failed { reason: reason.clone(), vm_discarded: true }));
                self.finish(Err(reason));
            }
        }
    }

    /// The incoming QEMU's `query-migrate` at `now`.
    pub fn handle_incoming_migration(&mut self, now: Instant, result: Result<MigrationInfo, QmpError>) {
        let failure = match &result {
            Ok(info) if info.status() == MigrationStatus::Failed => Some(format!(
                "the incoming migration failed: {}",
                info.error_desc.clone().unwrap_or_else(|| "no reason given".into())
            )),
            Err(e) if e.is_connection_lost() => Some("the incoming QEMU exited (it rejected or lost the migration stream)".into()),
            _ => None,
        };
        match self.stage {
            // While the migration streams in, notice an incoming QEMU that gave up.
            DestinationStage::Prepared => match failure {
                Some(reason) => {
                    tracing::warn!(%reason, "incoming migration failed");
                    self.fail(reason);
                }
                None => {
                    if let Err(e) = result {
                        tracing::warn!(error = %e, "query-migrate on the incoming VM");
                    }
                    self.receive_next();
                }
            },
            DestinationStage::Committed => match (failure, result) {
                (Some(reason), _) => self.fail(reason),
                // Loaded (and paused, autostart being off): run it.
                (None, Ok(info)) if info.status() == MigrationStatus::Completed => self.actions.push_back(DestinationAction::Resume),
                (None, Err(e)) => self.poll_again(now, &format!("query-migrate failed: {e}")),
                (None, Ok(info)) => self.poll_again(now, &format!("the incoming migration is still {}", info.status().as_str())),
            },
            _ => {}
        }
    }

    /// The result of [`DestinationAction::Resume`] at `now`.
    pub fn handle_resumed(&mut self, now: Instant, result: Result<(), QmpError>) {
        match result {
            Ok(()) => self.actions.push_back(DestinationAction::QueryRunState),
            Err(e) if e.is_connection_lost() => self.fail(format!("cont failed: {e}")),
            // A refused or timed-out `cont`: look again (the deadline bounds it).
            Err(e) => self.poll_again(now, &format!("cont failed: {e}")),
        }
    }

    /// The incoming QEMU's `query-status` at `now`, after `cont`.
    pub fn handle_run_state(&mut self, now: Instant, result: Result<StatusInfo, QmpError>) {
        match result {
            Ok(s) if s.running => {
                self.stage = DestinationStage::Running;
                self.deadline = None;
                self.actions.push_back(DestinationAction::ReportRunning { status: s.status });
                self.actions.push_back(DestinationAction::Announce);
                self.finish(Ok(()));
            }
            Ok(s) => self.poll_again(now, &format!("the VM is {} after cont", s.status.as_str())),
            Err(e) if e.is_connection_lost() => self.fail(format!("the incoming QEMU is gone: {e}")),
            Err(e) => self.poll_again(now, &format!("query-status failed: {e}")),
        }
    }

    /// The result of [`DestinationAction::Discard`]: `Ok(detail)` when the QEMU is certainly gone
    /// (or there was none), `Err(why)` when that could not be made sure.
    pub fn handle_discarded(&mut self, result: Result<String, String>) {
        let vm_discarded = result.is_ok();
        let detail = match result {
            Ok(d) | Err(d) => d,
        };
        match self.failing.take() {
            Some(reason) => {
                let reason = if vm_discarded { reason } else { format!("{reason}; and the VM could not be discarded: {detail}") };
                self.actions.push_back(DestinationAction::Send(ToSource::Failed { reason: reason.clone(), vm_discarded }));
                self.finish(Err(reason));
            }
            // `ferry-host resolve` asked.
            None => {
                let vm = self.vm.clone().unwrap_or_default();
                self.actions.push_back(DestinationAction::Send(ToSource::Discarded { vm, vm_discarded, detail }));
                self.receive_next();
            }
        }
    }

    /// The result of [`DestinationAction::Inquire`].
    pub fn handle_inquiry(&mut self, vm: String, state: IncomingState) {
        self.actions.push_back(DestinationAction::Send(ToSource::VmState { vm, state }));
        self.receive_next();
    }

    /// Not running yet after `Commit`: check again shortly, unless the deadline passed.
    fn poll_again(&mut self, now: Instant, why: &str) {
        match self.deadline {
            Some(deadline) if now >= deadline => {
                self.fail(format!("the VM did not start running within {RUNNING_TIMEOUT:?} ({why})"))
            }
            _ => {
                tracing::debug!(why, "cutover: checking again");
                self.actions.push_back(DestinationAction::Sleep(CUTOVER_POLL));
                self.actions.push_back(DestinationAction::QueryIncomingMigration);
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

    /// The session fails for `reason`: discard the incoming VM, then tell the source.
    fn fail(&mut self, reason: String) {
        let vm = self.vm.clone().unwrap_or_default();
        self.stage = DestinationStage::Finished;
        self.failing = Some(reason);
        self.actions.push_back(DestinationAction::Discard { vm });
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

    fn timeout() -> QmpError {
        QmpError::Timeout { command: "cont".into(), timeout: Duration::from_secs(30) }
    }

    fn discard() -> DestinationAction {
        DestinationAction::Discard { vm: "vm1".into() }
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

    /// A session committed at `now`.
    fn committed(now: Instant) -> DestinationSession {
        let mut s = prepared(now);
        s.handle_control(now, ControlEvent::Message(ToDestination::Commit));
        assert_eq!(drain(&mut s), vec![DestinationAction::QueryIncomingMigration]);
        assert_eq!(s.stage(), DestinationStage::Committed);
        s
    }

    /// After a failure: the discard, then (given its result) `Failed` and the end.
    fn fails_with(s: &mut DestinationSession, reason: &str) {
        assert_eq!(drain(s), vec![discard()], "{reason}");
        s.handle_discarded(Ok("quit".into()));
        assert_eq!(
            drain(s),
            vec![
                DestinationAction::Send(ToSource::Failed { reason: reason.into(), vm_discarded: true }),
                DestinationAction::Finish(Err(reason.into()))
            ]
        );
    }

    #[test]
    fn a_closed_channel_before_prepare_is_a_probe() {
        let mut s = DestinationSession::new();
        drain(&mut s);
        s.handle_control(Instant::now(), ControlEvent::Lost(ChannelError::Closed));
        assert_eq!(drain(&mut s), vec![DestinationAction::Finish(Ok(()))]);
    }

    #[test]
    fn a_failed_prepare_is_reported_and_loaded_nothing() {
        let mut s = DestinationSession::new();
        drain(&mut s);
        s.handle_control(Instant::now(), ControlEvent::Message(prepare()));
        drain(&mut s);
        s.handle_prepared(Err("no incoming QEMU for `vm1`".into()));
        assert_eq!(
            drain(&mut s),
            vec![
                DestinationAction::Send(ToSource::Failed { reason: "no incoming QEMU for `vm1`".into(), vm_discarded: true }),
                DestinationAction::Finish(Err("no incoming QEMU for `vm1`".into()))
            ]
        );
    }

    #[test]
    fn everything_that_ends_a_session_before_the_commit_discards_the_vm() {
        let now = Instant::now();
        let mut s = prepared(now);
        s.handle_control(now, ControlEvent::Message(ToDestination::Abort { reason: "interrupted (Ctrl-C)".into() }));
        fails_with(&mut s, "the source gave the migration up: interrupted (Ctrl-C)");

        let mut s = prepared(now);
        s.handle_control(now, ControlEvent::Lost(ChannelError::Closed));
        fails_with(
            &mut s,
            "the source's control channel failed before the commit: the other host-plugin closed the control channel",
        );

        let mut s = prepared(now);
        s.handle_shutdown();
        fails_with(&mut s, "the destination host-plugin is shutting down");

        let mut s = prepared(now);
        s.handle_incoming_migration(now, Err(lost()));
        fails_with(&mut s, "the incoming QEMU exited (it rejected or lost the migration stream)");

        let mut s = prepared(now);
        s.handle_control(now, ControlEvent::Message(prepare()));
        assert_eq!(drain(&mut s), vec![discard()]);

        // Before Prepare there is nothing to give up.
        let mut s = DestinationSession::new();
        drain(&mut s);
        s.handle_control(now, ControlEvent::Message(ToDestination::Abort { reason: "no peer".into() }));
        assert_eq!(drain(&mut s), vec![DestinationAction::Finish(Ok(()))]);
        let mut s = DestinationSession::new();
        drain(&mut s);
        s.handle_shutdown();
        assert_eq!(drain(&mut s), vec![DestinationAction::Finish(Ok(()))]);
    }

    #[test]
    fn a_discard_that_cannot_be_made_sure_says_so() {
        let now = Instant::now();
        let mut s = committed(now);
        s.handle_incoming_migration(now, Err(lost()));
        assert_eq!(drain(&mut s), vec![discard()]);
        s.handle_discarded(Err("QMP does not answer and its pid is unknown".into()));
        let reason = "the incoming QEMU exited (it rejected or lost the migration stream); \
                      and the VM could not be discarded: QMP does not answer and its pid is unknown";
        assert_eq!(
            drain(&mut s),
            vec![
                DestinationAction::Send(ToSource::Failed { reason: reason.into(), vm_discarded: false }),
                DestinationAction::Finish(Err(reason.into()))
            ]
        );
    }

    #[test]
    fn commit_only_before_prepare_or_twice_is_refused() {
        let now = Instant::now();
        let mut s = DestinationSession::new();
        drain(&mut s);
        s.handle_control(now, ControlEvent::Message(ToDestination::Commit));
        assert!(matches!(&drain(&mut s)[..], [DestinationAction::Finish(Err(e))] if e.contains("unexpected message")));
        let mut s = committed(now);
        s.handle_control(now, ControlEvent::Message(ToDestination::Commit));
        assert!(matches!(&drain(&mut s)[..], [DestinationAction::Finish(Err(e))] if e.contains("unexpected message")));
    }

    #[test]
    fn the_vm_waits_paused_until_the_commit() {
        let now = Instant::now();
        let mut s = prepared(now);
        // Loaded while the source still decides: nothing runs it.
        for _ in 0..3 {
            s.handle_watch_due();
            assert_eq!(drain(&mut s), vec![DestinationAction::QueryIncomingMigration]);
            s.handle_incoming_migration(now, Ok(migration(MigrationStatus::Completed, None)));
            assert_eq!(drain(&mut s), vec![DestinationAction::ReceiveControlOrWatch(WATCH)]);
        }
        s.handle_incoming_migration(now, Err(QmpError::Protocol { context: "x".into(), detail: "y".into() }));
        assert_eq!(drain(&mut s), vec![DestinationAction::ReceiveControlOrWatch(WATCH)]);
        s.handle_incoming_migration(now, Ok(migration(MigrationStatus::Failed, None)));
        fails_with(&mut s, "the incoming migration failed: no reason given");
    }

    #[test]
    fn commit_runs_the_loaded_vm_then_reports_and_announces() {
        let t0 = Instant::now();
        let mut s = committed(t0);
        // Still loading: check again shortly.
        s.handle_incoming_migration(t0, Ok(migration(MigrationStatus::Active, None)));
        assert_eq!(drain(&mut s), vec![DestinationAction::Sleep(CUTOVER_POLL), DestinationAction::QueryIncomingMigration]);
        s.handle_incoming_migration(t0, Ok(migration(MigrationStatus::Completed, None)));
        assert_eq!(drain(&mut s), vec![DestinationAction::Resume]);
        s.handle_resumed(t0, Ok(()));
        assert_eq!(drain(&mut s), vec![DestinationAction::QueryRunState]);
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
    fn a_slow_or_refused_cont_is_retried_until_the_deadline() {
        let t0 = Instant::now();
        let mut s = committed(t0);
        s.handle_incoming_migration(t0, Ok(migration(MigrationStatus::Completed, None)));
        drain(&mut s);
        s.handle_resumed(t0, Err(timeout()));
        assert_eq!(drain(&mut s), vec![DestinationAction::Sleep(CUTOVER_POLL), DestinationAction::QueryIncomingMigration]);
        s.handle_incoming_migration(t0, Ok(migration(MigrationStatus::Completed, None)));
        assert_eq!(drain(&mut s), vec![DestinationAction::Resume]);
        s.handle_resumed(t0, Ok(()));
        drain(&mut s);
        s.handle_run_state(t0, Ok(status(RunState::Paused, false)));
        assert_eq!(drain(&mut s), vec![DestinationAction::Sleep(CUTOVER_POLL), DestinationAction::QueryIncomingMigration]);
        // Past the deadline a QMP that keeps timing out means: discard.
        let late = t0 + RUNNING_TIMEOUT;
        s.handle_incoming_migration(late, Err(timeout()));
        fails_with(
            &mut s,
            "the VM did not start running within 30s (query-migrate failed: QMP `cont`: no reply within 30s)",
        );
    }

    #[test]
    fn cutover_failures_discard_the_vm_before_telling_the_source() {
        let t0 = Instant::now();
        let mut s = committed(t0);
        s.handle_incoming_migration(t0, Ok(migration(MigrationStatus::Completed, None)));
        drain(&mut s);
        s.handle_resumed(t0, Err(lost()));
        fails_with(&mut s, "cont failed: QMP connection lost during `query-migrate`: EOF");

        let mut s = committed(t0);
        s.handle_incoming_migration(t0, Ok(migration(MigrationStatus::Failed, Some("bad section"))));
        fails_with(&mut s, "the incoming migration failed: bad section");

        let mut s = committed(t0);
        s.handle_incoming_migration(t0, Ok(migration(MigrationStatus::Completed, None)));
        s.handle_resumed(t0, Ok(()));
        drain(&mut s);
        s.handle_run_state(t0, Err(lost()));
        fails_with(&mut s, "the incoming QEMU is gone: QMP connection lost during `query-migrate`: EOF");
    }

    #[test]
    fn resolve_questions_are_answered() {
        let now = Instant::now();
        let mut s = DestinationSession::new();
        drain(&mut s);
        s.handle_control(now, ControlEvent::Message(ToDestination::Inquire { vm: "vm1".into() }));
        assert_eq!(drain(&mut s), vec![DestinationAction::Inquire { vm: "vm1".into() }]);
        s.handle_inquiry("vm1".into(), IncomingState::Paused);
        assert_eq!(
            drain(&mut s),
            vec![
                DestinationAction::Send(ToSource::VmState { vm: "vm1".into(), state: IncomingState::Paused }),
                DestinationAction::ReceiveControl
            ]
        );
        s.handle_control(now, ControlEvent::Message(ToDestination::Discard { vm: "vm1".into() }));
        assert_eq!(drain(&mut s), vec![discard()]);
        s.handle_discarded(Ok("killed pid 42".into()));
        assert_eq!(
            drain(&mut s),
            vec![
                DestinationAction::Send(ToSource::Discarded { vm: "vm1".into(), vm_discarded: true, detail: "killed pid 42".into() }),
                DestinationAction::ReceiveControl
            ]
        );
        s.handle_control(now, ControlEvent::Lost(ChannelError::Closed));
        assert_eq!(drain(&mut s), vec![DestinationAction::Finish(Ok(()))]);
    }

    #[test]
    fn a_lost_channel_after_the_commit_does_not_stop_the_cutover() {
        // The machine never waits for the channel once committed: the cutover's actions are all
        // QEMU's, and sends only log their failure.
        let t0 = Instant::now();
        let mut s = committed(t0);
        s.handle_incoming_migration(t0, Ok(migration(MigrationStatus::Completed, None)));
        assert_eq!(drain(&mut s), vec![DestinationAction::Resume]);
        s.handle_resumed(t0, Ok(()));
        s.handle_run_state(t0, Ok(status(RunState::Running, true)));
        let actions = drain(&mut s);
        assert!(!actions.iter().any(|a| matches!(a, DestinationAction::ReceiveControl | DestinationAction::ReceiveControlOrWatch(_))));
        assert!(actions.contains(&DestinationAction::Announce));
    }
}
