//! `ferry-host migrate`: the source side of one live migration through the gateways.
//!
//! Steps: check the source VM; ask the local gateway (API) for a control forward to the
//! destination host-plugin and agree on settings; ask for a migration forward to the incoming
//! QEMU; set QEMU up and start; steer convergence from the gateway's real drain rate while
//! showing progress; when QEMU completes, commit (the destination starts the VM only then), wait
//! for the destination to report the VM running, then quit (or keep paused) the source. Before
//! the commit any failure cancels the migration, restores QEMU's parameters and leaves the
//! source VM running (see [`crate::session::source`] for after).
//!
//! One `migrate` per VM: it holds a lock for the QMP socket and the VM name
//! ([`crate::exclusive`]), and a watchdog child ([`crate::watchdog`]) cancels the migration and
//! restores the parameters if this process dies.
//!
//! This is the async shell: it does the I/O and leaves every decision about the lifecycle (what
//! a failure, a signal or a message means at each stage) to [`SourceSession`].

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use ferry_api::protocol::{CodecMode, ForwardStats};

use crate::control::{Channel, ChannelError};
use crate::exclusive::{qmp_key, vm_key, MigrationLock};
use crate::watchdog::Watchdog;
use ferry_api::control::{clock_offset, ToDestination, ToSource};
use crate::convergence::{ControllerConfig, ConvergenceController};
use crate::gateway_api::{open_control, ControlRoute, GatewayApi, GatewayEndpoint};
use crate::heartbeat::{event_time_ns, guest_downtime_ns, unix_now_ns, Heartbeat};
use crate::progress::{MigrationReport, Progress, ProgressMode};
use ferry_qmp::{MigrationCapability, MigrationParameters, MigrationStatus, Qmp, QmpConfig, QmpEvent, RunState};
use crate::session::source::{GatewayReading, SourceAction, SourceConfig, SourceSession, Stage};
use crate::session::{ControlEvent, Outcome, Signal, SourceVm};
use crate::settings::{self, MultifdChoice};

/// How often QEMU and the gateway are polled.
const POLL: Duration = Duration::from_millis(100);
/// Clock probes sent before the migration.
const CLOCK_PROBES: u32 = 5;
/// How long the destination may take to prepare, and to report the VM running.
const DESTINATION_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a cancelled migration may take to settle.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(20);

/// What `ferry-host migrate` was asked to do.
#[derive(Clone, Debug)]
pub struct MigrateOptions {
    /// The source VM's QMP socket.
    pub qmp: PathBuf,
    /// Destination site.
    pub to: String,
    /// The destination host-plugin (`ferry-host serve`), as the destination gateway reaches it.
    pub dest: SocketAddr,
    /// The local gateway's API.
    pub gateway: GatewayEndpoint,
    /// VM name (default: QEMU's `-name`).
    pub name: Option<String>,
    /// IP addresses to announce at the destination (on the VM's first NIC).
    pub ips: Vec<IpAddr>,
    /// The source VM's heartbeat chardev socket, for the guest-observed downtime.
    pub heartbeat: Option<PathBuf>,
    /// Guest downtime to aim for.
    pub downtime: Duration,
    /// Cancel when not done after this long.
    pub max_time: Duration,
    /// Multifd use.
    pub multifd: MultifdChoice,
    /// Leave the source VM paused instead of quitting it.
    pub keep_source: bool,
    /// How to show progress.
    pub progress: ProgressMode,
    /// Steer QEMU from the gateway's measurements (the default). Off leaves QEMU's own logic
    /// in charge (no bandwidth cap, `downtime-limit` = the target), for comparison.
    pub steer: bool,
    /// Where the per-VM locks live.
    pub state_dir: PathBuf,
    /// A shell command run once QEMU completed and before the commit, with both VMs paused
    /// (`FERRY_VM`, `FERRY_TO` in its environment); a non-zero exit (or no exit within
    /// `pre_commit_timeout`) fails the migration on the safe side: the source resumes.
    pub pre_commit_check: Option<String>,
    /// How long the pre-commit check may take.
    pub pre_commit_timeout: Duration,
    /// Longest the stop-and-copy may keep the source paused; past it, cancel (source resumes).
    pub cutover_deadline: Duration,
    /// Migrate even a QEMU with a known migration defect (`ferry_qmp::known_issues`), with a
    /// warning in the report.
    pub ignore_known_issues: bool,
}

/// Runs one migration; never panics, always returns a report (check `outcome`).
pub async fn migrate(options: MigrateOptions) -> MigrationReport {
    let started = Instant::now();
    let mut run = Run {
        report: MigrationReport {
            vm: options.name.clone().unwrap_or_default(),
            to_site: options.to.clone(),
            source_vm: SourceVm::Running,
            ..MigrationReport::default()
        },
        progress: Progress::new(options.progress),
        session: SourceSession::new(SourceConfig { keep_source: options.keep_source, steer: options.steer, pre_commit_check: options.pre_commit_check.is_some(), cutover_deadline: options.cutover_deadline }, started),
        options,
        started,
        qmp: None,
        control: None,
        heartbeat: None,
        stop_unix_ns: None,
        clock_uncertainty_ms: 0.0,
        restore: None,
        watchdog: None,
        _locks: Vec::new(),
        api: None,
        control_forward: None,
        control_client: None,
    };
    let result = run.execute().await;
    run.progress.finish();
    run.report.total_time_s = run.started.elapsed().as_secs_f64();
    if let Err(e) = result {
        let message = format!("{e:#}");
        tracing::error!(error = %message, "migration failed");
        run.session.handle_failure(&message);
        // Recovery only queues actions that cannot fail the command further.
        if let Err(e) = run.perform_actions().await {
            tracing::warn!(error = format!("{e:#}"), "recovering from the failure");
        }
        run.report.error = Some(message);
    }
    let figures = run.session.figures();
    run.report.iterations = figures.iterations;
    run.report.max_throttle_percent = figures.max_throttle_percent;
    run.report.peak_dirty_rate_mb_s = figures.peak_dirty_rate_mb_s;
    run.report.drain_rate_mb_s = figures.drain_rate_mb_s;
    run.report.expected_pause_ms = figures.expected_pause_ms;
    run.report.target_downtime_ms = run.options.downtime.as_secs_f64() * 1e3;
    run.report.timeline = run.session.timeline().points().to_vec();
    run.report.timeline_stride = run.session.timeline().stride();
    run.report.source_vm = run.session.source_vm().clone();
    run.close_connections().await;
    // Whatever happened, this process cleaned up after itself: the watchdog may go.
    if let Some(watchdog) = run.watchdog.take() {
        watchdog.disarm();
    }
    run.report
}

/// The source's end of the control channel.
type Control = Channel<ToSource, ToDestination>;

/// The async shell around [`SourceSession`]: does the I/O, feeds the machine, performs its
/// actions.
struct Run {
    options: MigrateOptions,
    report: MigrationReport,
    progress: Progress,
    session: SourceSession,
    started: Instant,
    /// Shared so that holding it does not borrow the whole run.
    qmp: Option<Arc<Qmp>>,
    control: Option<Control>,
    /// The source VM's heartbeat, when watched.
    heartbeat: Option<Heartbeat>,
    /// QEMU's timestamp of the source VM's `STOP` event.
    stop_unix_ns: Option<i128>,
    clock_uncertainty_ms: f64,
    /// The source's migration parameters as they were, for what this run changes.
    restore: Option<MigrationParameters>,
    /// Undoes the changes if this process dies.
    watchdog: Option<Watchdog>,
    /// One migration per VM (its QMP socket, its name) while this runs.
    _locks: Vec<MigrationLock>,
    /// The local gateway's API session: the forwards live as long as it does.
    api: Option<GatewayApi>,
    /// The control channel's forward.
    control_forward: Option<u32>,
    /// The address this host reached the control forward from: QEMU, local, connects from it.
    control_client: Option<IpAddr>,
}

/// What woke a wait: a control-channel event or a signal.
enum Woken {
    Control(ControlEvent<ToSource>),
    Signal(Signal),
}

impl Run {
    async fn execute(&mut self) -> anyhow::Result<()> {
        let o = self.options.clone();
        // The source VM, one migration at a time. It runs already: a missing socket is a wrong
        // path, not QEMU still starting.
        self._locks.push(MigrationLock::acquire(&o.state_dir, &qmp_key(&o.qmp), &format!("the VM at {}", o.qmp.display()))?);
        let qmp = connect_source(&o.qmp).await?;
        let status = qmp.query_status().await.context("query-status")?;
        if status.status != RunState::Running {
            bail!("the source VM is not running (status {})", status.status.as_str());
        }
        let current = qmp.query_migrate().await.context("query-migrate")?.status();
        if matches!(current, MigrationStatus::Active | MigrationStatus::Setup | MigrationStatus::Cancelling) {
            bail!("a migration of this VM is already in progress ({})", current.as_str());
        }
        let version = qmp.query_version().await.context("query-version")?;
        let kvm = qmp.query_kvm().await.context("query-kvm")?;
        if let Some(issue) = ferry_qmp::known_issues::migration_issue(version.qemu, kvm.enabled) {
            if !o.ignore_known_issues {
                bail!("refusing to migrate: {issue}; --ignore-known-issues goes ahead anyway");
            }
            self.warn(format!("migrating despite a known QEMU issue: {issue}"));
        }
        let name = vm_name(&qmp, o.name.as_deref()).await?;
        self.report.vm = name.clone();
        self._locks.push(MigrationLock::acquire(&o.state_dir, &vm_key(&name), &format!("VM {name}"))?);
        let ram = qmp.base_memory().await.context("query-memory-size-summary")?;
        let available: Vec<MigrationCapability> =
            qmp.query_migrate_capabilities().await.context("query-migrate-capabilities")?.into_iter().map(|c| c.capability).collect();
        self.qmp = Some(Arc::new(qmp));

        // The gateway and the destination host-plugin.
        let api = self.api.insert(GatewayApi::connect(&o.gateway).await?);
        let ControlRoute { gateway: info, path, forward, tcp } = open_control(api, &o.to, o.dest).await?;
        self.control_forward = Some(forward.id);
        self.control_client = Some(tcp.local_addr().context("the control connection's address")?.ip());
        self.report.from_site = info.site.clone();
        self.control = Some(Control::new(tcp));
        self.session.handle_control_opened();
        let offset = self.measure_clock().await.with_context(|| {
            format!("cannot reach the destination host-plugin at {} through site {}", o.dest, o.to)
        })?;
        if let Some((offset, err)) = offset {
            self.report.clock_offset_ms = Some(offset as f64 / 1e6);
            tracing::info!(offset_ms = offset as f64 / 1e6, uncertainty_ms = err as f64 / 1e6, "destination clock");
        }

        let rtt = Duration::from_secs_f64(path.rtt_ms.max(info.link_rtt_ms) / 1e3);
        let controller = ConvergenceController::new(ControllerConfig {
            target_downtime: o.downtime,
            max_time: o.max_time,
            link_bytes_per_sec: info.link_bandwidth_bps / 8,
            rtt,
            cwnd: Some(path.cwnd),
            flow_window: info.flow_window_bytes,
        });
        let (max_bandwidth, downtime_limit) = if o.steer {
            (controller.initial_max_bandwidth(), controller.initial_downtime_limit_ms())
        } else {
            (ferry_qmp::UNLIMITED_BANDWIDTH, o.downtime.as_millis() as u64)
        };
        let chosen = settings::choose(ram, o.multifd, &available, max_bandwidth, downtime_limit);
        self.report.multifd_channels = chosen.shared.multifd_channels;
        self.progress.note(&format!(
            "migrating {name} ({} MiB RAM, QEMU {}) from {} to {} via {}: {}",
            ram >> 20,
            version.qemu,
            info.site,
            o.to,
            o.dest,
            match chosen.shared.multifd_channels {
                Some(n) => format!("multifd × {n}"),
                None => "single connection".into(),
            }
        ));
        let control = self.control()?;
        control
            .send(&ToDestination::Prepare {
                vm: name.clone(),
                qemu_version: version.qemu.to_string(),
                settings: chosen.shared.clone(),
                ips: o.ips.clone(),
            })
            .await?;
        let listen = match control.recv(DESTINATION_TIMEOUT).await? {
            ToSource::Prepared { listen, qemu_version } => {
                tracing::info!(%listen, %qemu_version, "destination prepared");
                listen
            }
            ToSource::Failed { reason, .. } => bail!("the destination could not prepare: {reason}"),
            other => bail!("unexpected answer from the destination: {other:?}"),
        };
        // QEMU runs on this host: it connects from where the control connection did, once per
        // channel (the main one and each multifd one).
        let qemu_host = self.control_client.context("internal: no control connection")?;
        let channels = 1 + u32::from(chosen.shared.multifd_channels.unwrap_or(0));
        let migration_forward = self.api()?.open_forward(&o.to, listen, CodecMode::Auto, qemu_host, channels).await?;
        self.heartbeat = match &o.heartbeat {
            Some(p) => Some(Heartbeat::watch(p, Duration::from_secs(5)).await.context("source heartbeat")?),
            None => None,
        };

        // Settings, then go; the watchdog first, with what undoes them.
        let qmp = self.qmp()?;
        let original = qmp.query_migrate_parameters().await.context("query-migrate-parameters on the source")?;
        let multifd = MigrationParameters { multifd_channels: chosen.shared.multifd_channels, ..MigrationParameters::default() };
        let restore = settings::undo_parameters(&original, &[&chosen.source_parameters, &multifd, &settings::steered_parameters()]);
        self.watchdog = Some(Watchdog::spawn(&o.qmp, &restore)?);
        self.restore = Some(restore);
        settings::apply_shared(&qmp, &chosen.shared, &chosen.source_capabilities, "source").await?;
        qmp.migrate_set_parameters(&chosen.source_parameters).await.context("migrate-set-parameters on the source")?;
        // An operator's Ctrl-C (or a SIGTERM) cancels cleanly rather than leaving QEMU migrating
        // with whatever cap was last set. They are watched from before `migrate` on, so a signal that
        // arrives while QEMU or the gateway is being asked is not lost; the session decides what
        // one means (after QEMU completed: nothing).
        use tokio::signal::unix::{signal, SignalKind};
        let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
        let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
        let started = Instant::now();
        qmp.migrate(&format!("tcp:{}", migration_forward.listen)).await.context("migrate")?;
        self.session.handle_migration_started(controller, started);

        // Steer until QEMU completes. A QMP event (the source's STOP, QEMU's MIGRATION status
        // changes) ends the wait at once, so the commit goes out as soon as QEMU completed
        // instead of up to a poll later: that time is part of the pause.
        let (last_info, mut stats) = loop {
            let qmp = self.qmp()?;
            let (signal, event) = tokio::select! {
                _ = tokio::time::sleep(POLL) => (None, None),
                event = qmp.next_event() => (None, event.ok()),
                _ = interrupt.recv() => (Some(Signal::Interrupt), None),
                _ = terminate.recv() => (Some(Signal::Terminate), None),
            };
            if let Some(signal) = signal {
                self.session.handle_signal(signal)?;
            }
            if let Some(received) = self.control()?.try_recv() {
                self.session.handle_control(received.into())?;
            }
            let mut events: Vec<_> = event.into_iter().collect();
            events.extend(qmp.drain_events());
            if let Some(stop) = events.iter().rev().find(|e| e.event == QmpEvent::Stop) {
                self.stop_unix_ns = event_time_ns(stop);
                self.session.handle_source_stopped(Instant::now());
            }
            let info = qmp.query_migrate().await.context("query-migrate")?;
            let stats = self.api()?.forward_stats(migration_forward.id).await?;
            self.session.handle_progress(Instant::now(), &info, &gateway_reading(&stats))?;
            if self.session.stage() >= Stage::Checking {
                break (info, stats);
            }
            self.perform_actions().await?;
        };
        self.report.qemu_total_time_ms = last_info.total_time;
        self.report.qemu_downtime_ms = last_info.downtime;
        self.progress.note("source QEMU completed; committed: waiting for the destination to run the VM");

        // Cutover: only a destination that runs the VM releases the source. Each message gets
        // DESTINATION_TIMEOUT; signals do not shorten or extend that.
        self.perform_actions().await?;
        let mut deadline = tokio::time::Instant::now() + DESTINATION_TIMEOUT;
        while self.session.stage() == Stage::Committed {
            let control = self.control.as_mut().ok_or_else(|| anyhow!("internal: no control channel"))?;
            let woken = tokio::select! {
                received = tokio::time::timeout_at(deadline, control.next()) => {
                    deadline = tokio::time::Instant::now() + DESTINATION_TIMEOUT;
                    Woken::Control(received.unwrap_or(Err(ChannelError::Timeout(DESTINATION_TIMEOUT))).into())
                }
                _ = interrupt.recv() => Woken::Signal(Signal::Interrupt),
                _ = terminate.recv() => Woken::Signal(Signal::Terminate),
            };
            match woken {
                Woken::Control(event) => self.session.handle_control(event)?,
                Woken::Signal(signal) => self.session.handle_signal(signal)?,
            }
        }
        // The destination runs the VM: record the cutover, quit (or keep) the source.
        self.perform_actions().await?;

        // Announcement report, and the final byte counts once the flows have ended.
        let received = self.control()?.recv(Duration::from_secs(10)).await;
        self.session.handle_control(received.into())?;
        self.perform_actions().await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while stats.open > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            match self.api()?.forward_stats(migration_forward.id).await {
                Ok(s) => stats = s,
                Err(e) => {
                    self.session.handle_final_counts_failed(&e.to_string());
                    break;
                }
            }
        }
        self.report.bytes_from_qemu = stats.tcp_in;
        self.report.bytes_on_wan = stats.wan_out;
        self.report.bytes_from_wan = stats.wan_in;
        self.report.reduction = if stats.wan_out > 0 { stats.tcp_in as f64 / stats.wan_out as f64 } else { 0.0 };
        self.session.handle_done();
        self.perform_actions().await
    }

    /// Carries out the session's queued actions (and those they lead to), in order.
    async fn perform_actions(&mut self) -> anyhow::Result<()> {
        while let Some(action) = self.session.poll_action() {
            match action {
                SourceAction::Send(message) => self.control()?.send(&message).await?,
                SourceAction::Abort { reason } => {
                    if let Some(control) = self.control.as_mut() {
                        let _ = control.send(&ToDestination::Abort { reason }).await;
                    }
                }
                SourceAction::SetParameters(params) => {
                    tracing::debug!(?params, estimate = ?self.session.estimate().unwrap_or_default(), "adjusting the source");
                    // A parameter QEMU refuses is worth a warning, not the migration.
                    if let Err(e) = self.qmp()?.migrate_set_parameters(&params).await {
                        tracing::warn!(error = %e, "cannot adjust the migration parameters");
                    }
                }
                SourceAction::ShowProgress(snapshot) => self.progress.show(&snapshot),
                SourceAction::CancelMigration => {
                    if let Some(qmp) = self.qmp.clone() {
                        cancel_migration(&qmp).await;
                    }
                }
                SourceAction::RunPreCommitCheck => {
                    let result = self.pre_commit_check().await;
                    self.session.handle_pre_commit_check(result)?;
                }
                SourceAction::RestoreParameters => {
                    if let (Some(qmp), Some(restore)) = (self.qmp.clone(), self.restore.as_ref()) {
                        match qmp.migrate_set_parameters(restore).await {
                            Ok(()) => tracing::info!(?restore, "migration parameters restored"),
                            Err(e) => self.warn(format!("cannot restore the migration parameters: {e}")),
                        }
                    }
                }
                SourceAction::ResumeSource => {
                    let state = match self.qmp.clone() {
                        Some(qmp) => ensure_running(&qmp).await,
                        None => SourceVm::Running,
                    };
                    self.session.handle_source_state(state);
                }
                // QEMU paused the source when it completed; leaving it so needs no command.
                SourceAction::KeepSourcePaused => {}
                SourceAction::QuitSource => {
                    let result = self.qmp()?.quit().await.map_err(|e| e.to_string());
                    self.session.handle_quit(result);
                }
                SourceAction::RecordCutover { resumed_unix_ns, first_heartbeat_unix_ns } => {
                    self.record_cutover(resumed_unix_ns, first_heartbeat_unix_ns)?
                }
                SourceAction::RecordAnnouncement { interface, macs } => {
                    self.report.announce_interface = interface;
                    self.report.announced_macs = macs;
                }
                SourceAction::Warn(message) => self.warn(message),
                SourceAction::Finish(outcome) => self.report.outcome = outcome,
            }
        }
        Ok(())
    }

    /// The cutover pause and the guest-observed downtime, once the destination runs the VM.
    fn record_cutover(&mut self, resumed: Option<i128>, first_beat: Option<i128>) -> anyhow::Result<()> {
        if self.stop_unix_ns.is_none() {
            self.stop_unix_ns = self.qmp()?.drain_events().iter().rev().find(|e| e.event == QmpEvent::Stop).and_then(event_time_ns);
        }
        if let (Some(stop), Some(resumed), Some(offset_ms)) = (self.stop_unix_ns, resumed, self.report.clock_offset_ms) {
            self.report.pause_ms = Some(((resumed - (offset_ms * 1e6) as i128) - stop) as f64 / 1e6);
        }
        match (&self.heartbeat, first_beat, self.report.clock_offset_ms) {
            (None, _, _) => self.report.guest_downtime_note = Some("no --heartbeat given".into()),
            (Some(_), None, _) => self.report.guest_downtime_note = Some("no heartbeat from the destination VM (is `incoming.heartbeat` configured?)".into()),
            (Some(_), _, None) => self.report.guest_downtime_note = Some("destination clock offset unknown".into()),
            (Some(hb), Some(first), Some(offset_ms)) => match (hb.last(), hb.median_interval_ns()) {
                (Some(last), Some(interval)) => {
                    let offset = (offset_ms * 1e6) as i128;
                    let downtime = guest_downtime_ns(last, first - offset, interval);
                    self.report.guest_downtime_ms = Some(downtime as f64 / 1e6);
                    self.report.guest_downtime_error_ms = Some(interval as f64 / 2e6 + self.clock_uncertainty_ms);
                }
                _ => {
                    self.report.guest_downtime_note = Some(format!("the source heartbeat sent {} line(s), too few to time it", hb.count()))
                }
            },
        }
        Ok(())
    }

    /// Runs `--pre-commit-check`: `Ok` when it exited 0 in time.
    async fn pre_commit_check(&mut self) -> Result<(), String> {
        let Some(command) = self.options.pre_commit_check.clone() else { return Ok(()) };
        self.progress.note("source QEMU completed; running the pre-commit check (both VMs paused)");
        let child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(&command)
            .env("FERRY_VM", &self.report.vm)
            .env("FERRY_TO", &self.options.to)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        match tokio::time::timeout(self.options.pre_commit_timeout, child).await {
            Err(_) => Err(format!("`{command}` did not finish within {:?}", self.options.pre_commit_timeout)),
            Ok(Err(e)) => Err(format!("cannot run `{command}`: {e}")),
            Ok(Ok(out)) if out.status.success() => Ok(()),
            Ok(Ok(out)) => Err(format!("`{command}` exited with {}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim())),
        }
    }

    fn warn(&mut self, message: String) {
        tracing::warn!("{message}");
        self.progress.note(&format!("warning: {message}"));
        self.report.warnings.push(message);
    }

    fn api(&mut self) -> anyhow::Result<&mut GatewayApi> {
        self.api.as_mut().ok_or_else(|| anyhow!("internal: no gateway API session"))
    }

    /// Ends the run's connections in the order the gateway needs: the control channel first,
    /// then the API session, whose end resets whatever its forwards still carry. After a
    /// completed migration it waits (a few seconds at most) for the control flow to finish
    /// cleanly in between; after a failure there is nothing left to deliver.
    async fn close_connections(&mut self) {
        self.control = None;
        if self.report.outcome != Outcome::Completed {
            self.api = None;
            return;
        }
        if let (Some(api), Some(forward)) = (self.api.as_mut(), self.control_forward) {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                match api.forward_stats(forward).await {
                    Ok(stats) if stats.open > 0 => tokio::time::sleep(Duration::from_millis(20)).await,
                    _ => break,
                }
            }
        }
        self.api = None;
    }

    fn qmp(&self) -> anyhow::Result<Arc<Qmp>> {
        self.qmp.clone().ok_or_else(|| anyhow!("internal: no QMP session"))
    }

    fn control(&mut self) -> anyhow::Result<&mut Control> {
        self.control.as_mut().ok_or_else(|| anyhow!("internal: no control channel"))
    }

    /// Probes the destination's clock; `(offset, uncertainty)` in ns.
    async fn measure_clock(&mut self) -> anyhow::Result<Option<(i128, i128)>> {
        let control = self.control()?;
        let mut probes = Vec::new();
        for seq in 0..CLOCK_PROBES {
            let sent = unix_now_ns();
            control.send(&ToDestination::Ping { seq }).await?;
            match control.recv(Duration::from_secs(15)).await? {
                ToSource::Pong { seq: s, unix_ns } if s == seq => probes.push((sent, unix_ns, unix_now_ns())),
                other => bail!("unexpected answer to a clock probe: {other:?}"),
            }
        }
        let offset = clock_offset(&probes);
        self.clock_uncertainty_ms = offset.map_or(0.0, |(_, e)| e as f64 / 1e6);
        Ok(offset)
    }
}

/// Opens the QMP socket of a source VM. The VM runs already, so a missing socket is a wrong
/// path, not QEMU still starting: no long retry.
pub(crate) async fn connect_source(path: &Path) -> anyhow::Result<Qmp> {
    Qmp::connect(path, QmpConfig { connect_timeout: Duration::from_secs(1), ..QmpConfig::default() })
        .await
        .with_context(|| format!("cannot open the source VM's QMP socket {}", path.display()))
}

/// The VM's name: `given`, else QEMU's `-name`; checked usable in file names (it selects the
/// destination's sockets and names the locks).
pub(crate) async fn vm_name(qmp: &Qmp, given: Option<&str>) -> anyhow::Result<String> {
    let name = match given {
        Some(n) => n.to_owned(),
        None => qmp.query_name().await.context("query-name")?.ok_or_else(|| {
            anyhow!("the VM has no -name; give one with --name (it selects the destination's sockets)")
        })?,
    };
    ferry_api::control::check_vm_name(&name).map_err(|e| anyhow!(e))?;
    Ok(name)
}

/// The gateway's counters as the session reads them.
fn gateway_reading(stats: &ForwardStats) -> GatewayReading {
    GatewayReading {
        tcp_in: stats.tcp_in,
        wire_sent: stats.wire_sent,
        wire_acked: stats.wire_acked,
        open: stats.open,
        rtt: stats.path.map(|p| Duration::from_secs_f64(p.rtt_ms / 1e3)),
        cwnd: stats.path.map(|p| p.cwnd),
        last_error: stats.last_error.clone(),
    }
}

/// Cancels QEMU's migration and waits (at most [`CANCEL_TIMEOUT`]) for it to settle.
async fn cancel_migration(qmp: &Qmp) {
    if let Err(e) = qmp.migrate_cancel().await {
        tracing::warn!(error = %e, "migrate_cancel failed");
    }
    let deadline = Instant::now() + CANCEL_TIMEOUT;
    loop {
        match qmp.query_migrate().await {
            Ok(i) if i.status().is_terminal() || i.status() == MigrationStatus::None => break,
            Ok(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            _ => break,
        }
    }
}

/// Resumes the source VM if it is paused; returns its state.
async fn ensure_running(qmp: &Qmp) -> SourceVm {
    match qmp.query_status().await {
        Ok(s) if s.running => SourceVm::Running,
        Ok(s) => match qmp.cont().await {
            Ok(()) => {
                tracing::info!(was = s.status.as_str(), "resumed the source VM");
                SourceVm::Running
            }
            Err(e) => SourceVm::ResumeFailed { state: s.status.as_str().to_owned(), error: e.to_string() },
        },
        Err(e) => SourceVm::Unknown { error: e.to_string() },
    }
}
