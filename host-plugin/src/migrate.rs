//! `ferry-host migrate`: the source side of one live migration through the gateways.
//!
//! Steps: check the source VM; ask the local gateway (API) for a control forward to the
//! destination host-plugin and agree on settings; ask for a migration forward to the incoming
//! QEMU; set QEMU up and start; steer convergence from the gateway's real drain rate while
//! showing progress; after QEMU completes, wait for the destination to report the VM running,
//! then quit (or keep paused) the source. Until the destination confirms, any failure cancels
//! the migration and leaves the source VM running.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use ferry_api::protocol::{CodecMode, ForwardStats};
use tokio::net::TcpStream;

use crate::control::{clock_offset, Channel, ToDestination, ToSource};
use crate::convergence::{ControllerConfig, ConvergenceController, Sample};
use crate::gateway_api::GatewayApi;
use crate::heartbeat::{event_time_ns, guest_downtime_ns, unix_now_ns, Heartbeat};
use crate::progress::{MigrationReport, Progress, ProgressMode, Snapshot};
use crate::qmp::{CapabilityState, MigrationCapability, MigrationParameters, MigrationStatus, Qmp, QmpConfig, QmpEvent, RunState};
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
    pub gateway: SocketAddr,
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
}

/// `max-bandwidth` when not steering: far above any link, so QEMU never limits itself.
const UNLIMITED_BANDWIDTH: u64 = 10 << 30;

/// Where the migration stands, so a failure is handled for what has been done.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    /// Nothing changed on the source VM yet.
    Setup,
    /// QEMU's `migrate` was issued.
    Migrating,
    /// QEMU reported `completed`: the source is paused, the destination loaded the state.
    SourceCompleted,
    /// The destination reported the VM running.
    DestinationRunning,
}

/// Runs one migration; never panics, always returns a report (check `outcome`).
pub async fn migrate(options: MigrateOptions) -> MigrationReport {
    let mut run = Run {
        report: MigrationReport {
            vm: options.name.clone().unwrap_or_default(),
            to_site: options.to.clone(),
            source_vm: "running".into(),
            ..MigrationReport::default()
        },
        progress: Progress::new(options.progress),
        options,
        started: Instant::now(),
        stage: Stage::Setup,
        qmp: None,
        control: None,
        clock_uncertainty_ms: 0.0,
        destination_failed: false,
    };
    let result = run.execute().await;
    run.progress.finish();
    run.report.total_time_s = run.started.elapsed().as_secs_f64();
    match result {
        Ok(()) => run.report.outcome = "completed".into(),
        Err(e) => {
            let message = format!("{e:#}");
            tracing::error!(error = %message, "migration failed");
            run.report.outcome = "failed".into();
            run.report.source_vm = run.recover(&message).await;
            run.report.error = Some(message);
        }
    }
    run.report
}

/// The source's end of the control channel.
type Control = Channel<ToSource, ToDestination>;

struct Run {
    options: MigrateOptions,
    report: MigrationReport,
    progress: Progress,
    started: Instant,
    stage: Stage,
    /// Shared so that holding it does not borrow the whole run.
    qmp: Option<Arc<Qmp>>,
    control: Option<Control>,
    clock_uncertainty_ms: f64,
    /// The destination said it failed (so it does not run the VM).
    destination_failed: bool,
}

impl Run {
    async fn execute(&mut self) -> anyhow::Result<()> {
        let o = self.options.clone();
        // The source VM.
        // The source VM runs already: a missing socket is a wrong path, not QEMU still starting.
        let qmp = Qmp::connect(&o.qmp, QmpConfig { connect_timeout: Duration::from_secs(1), ..QmpConfig::default() })
            .await
            .with_context(|| format!("cannot open the source VM's QMP socket {}", o.qmp.display()))?;
        let status = qmp.query_status().await.context("query-status")?;
        if status.status != RunState::Running {
            bail!("the source VM is not running (status {})", status.status.as_str());
        }
        let current = qmp.query_migrate().await.context("query-migrate")?.status();
        if matches!(current, MigrationStatus::Active | MigrationStatus::Setup | MigrationStatus::Cancelling) {
            bail!("a migration of this VM is already in progress ({})", current.as_str());
        }
        let version = qmp.query_version().await.context("query-version")?;
        let name = match &o.name {
            Some(n) => n.clone(),
            None => qmp.query_name().await.context("query-name")?.ok_or_else(|| {
                anyhow!("the VM has no -name; give one with --name (it selects the destination's sockets)")
            })?,
        };
        self.report.vm = name.clone();
        let ram = qmp.base_memory().await.context("query-memory-size-summary")?;
        let available: Vec<MigrationCapability> =
            qmp.query_migrate_capabilities().await.context("query-migrate-capabilities")?.into_iter().map(|c| c.capability).collect();
        self.qmp = Some(Arc::new(qmp));

        // The gateway and the destination host-plugin.
        let mut api = GatewayApi::connect(o.gateway).await?;
        let info = api.hello().await?;
        self.report.from_site = info.site.clone();
        let Some(peer) = info.peers.iter().find(|p| p.site == o.to) else {
            let known: Vec<&str> = info.peers.iter().map(|p| p.site.as_str()).collect();
            bail!("the gateway at site {} has no peer site `{}` (its peers: {known:?})", info.site, o.to);
        };
        let Some(path) = peer.path else { bail!("the gateway at site {} has no live tunnel to {}", info.site, o.to) };
        let control_forward = api.open_forward(&o.to, o.dest, CodecMode::Off).await?;
        let tcp = TcpStream::connect(control_forward.listen)
            .await
            .with_context(|| format!("cannot connect to the control forward {}", control_forward.listen))?;
        self.control = Some(Control::new(tcp));
        let offset = self.measure_clock().await.with_context(|| {
            format!("cannot reach the destination host-plugin at {} through site {}", o.dest, o.to)
        })?;
        if let Some((offset, err)) = offset {
            self.report.clock_offset_ms = Some(offset as f64 / 1e6);
            tracing::info!(offset_ms = offset as f64 / 1e6, uncertainty_ms = err as f64 / 1e6, "destination clock");
        }

        let rtt = Duration::from_secs_f64(path.rtt_ms.max(info.link_rtt_ms) / 1e3);
        let mut controller = ConvergenceController::new(ControllerConfig {
            target_downtime: o.downtime,
            max_time: o.max_time,
            link_bytes_per_sec: info.link_bandwidth_bps / 8,
            rtt,
            cwnd: Some(path.cwnd),
        });
        let (max_bandwidth, downtime_limit) = if o.steer {
            (controller.initial_max_bandwidth(), controller.initial_downtime_limit_ms())
        } else {
            (UNLIMITED_BANDWIDTH, o.downtime.as_millis() as u64)
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
            ToSource::Failed { reason } => bail!("the destination could not prepare: {reason}"),
            other => bail!("unexpected answer from the destination: {other:?}"),
        };
        let migration_forward = api.open_forward(&o.to, listen, CodecMode::Auto).await?;
        let heartbeat = match &o.heartbeat {
            Some(p) => Some(Heartbeat::watch(p, Duration::from_secs(5)).await.context("source heartbeat")?),
            None => None,
        };

        // Settings, then go.
        let qmp = self.qmp()?;
        let mut caps: Vec<CapabilityState> = Vec::new();
        for (c, on) in chosen.shared.capabilities.iter().chain(&chosen.source_capabilities) {
            caps.push(CapabilityState::new(MigrationCapability::from(c.as_str()), *on));
        }
        qmp.migrate_set_capabilities(&caps).await.context("migrate-set-capabilities on the source")?;
        if let Some(p) = settings::shared_parameters(&chosen.shared) {
            qmp.migrate_set_parameters(&p).await.context("migrate-set-parameters (multifd) on the source")?;
        }
        qmp.migrate_set_parameters(&chosen.source_parameters).await.context("migrate-set-parameters on the source")?;
        // An operator's Ctrl-C (or a SIGTERM) cancels cleanly rather than leaving QEMU migrating
        // with whatever cap was last set. They are watched from before `migrate` on, so a signal that
        // arrives while QEMU or the gateway is being asked is not lost.
        use tokio::signal::unix::{signal, SignalKind};
        let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
        let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
        let started = Instant::now();
        qmp.migrate(&format!("tcp:{}", migration_forward.listen)).await.context("migrate")?;
        self.stage = Stage::Migrating;

        // Steer until QEMU completes.
        let mut stats: ForwardStats;
        let mut last_info;
        let mut stop_unix_ns = None;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = interrupt.recv() => bail!("interrupted (Ctrl-C)"),
                _ = terminate.recv() => bail!("interrupted (SIGTERM)"),
            }
            if let Some(message) = self.control()?.try_recv() {
                match message? {
                    ToSource::Failed { reason } => {
                        self.destination_failed = true;
                        bail!("the destination failed: {reason}")
                    }
                    other => bail!("unexpected message from the destination: {other:?}"),
                }
            }
            let qmp = self.qmp()?;
            if let Some(stop) = qmp.drain_events().iter().rev().find(|e| e.event == QmpEvent::Stop) {
                stop_unix_ns = event_time_ns(stop);
            }
            last_info = qmp.query_migrate().await.context("query-migrate")?;
            stats = api.forward_stats(migration_forward.id).await?;
            let ram = last_info.ram.clone().unwrap_or_default();
            let throttle = last_info.cpu_throttle_percentage.unwrap_or(0);
            self.report.max_throttle_percent = self.report.max_throttle_percent.max(throttle);
            self.report.iterations = ram.dirty_sync_count;
            let status = last_info.status();
            match status {
                MigrationStatus::Completed => break,
                MigrationStatus::Failed | MigrationStatus::Cancelled => {
                    let why = last_info.error_desc.clone().unwrap_or_else(|| status.as_str().to_owned());
                    let gateway = stats.last_error.clone().map(|e| format!(" (gateway: {e})")).unwrap_or_default();
                    bail!("QEMU reports the migration {}: {why}{gateway}", status.as_str());
                }
                _ => {}
            }
            let decision = controller.update(Sample {
                at: started.elapsed(),
                transferred: ram.transferred,
                remaining: ram.remaining,
                dirty_pages_rate: ram.dirty_pages_rate,
                page_size: ram.page_size,
                dirty_sync_count: ram.dirty_sync_count,
                throttle_percent: throttle,
                qemu_mbps: ram.mbps,
                tcp_in: stats.tcp_in,
                wire_sent: stats.wire_sent,
                wire_acked: stats.wire_acked,
                rtt: stats.path.map(|p| Duration::from_secs_f64(p.rtt_ms / 1e3)),
                cwnd: stats.path.map(|p| p.cwnd),
            });
            let estimate = controller.estimate();
            self.report.peak_dirty_rate_mb_s = self.report.peak_dirty_rate_mb_s.max(estimate.dirty_rate / 1e6);
            if estimate.drain > 0.0 {
                self.report.drain_rate_mb_s = estimate.drain / 1e6;
            }
            if let Some(reason) = decision.cancel {
                bail!("{reason}");
            }
            let params = MigrationParameters {
                max_bandwidth: decision.max_bandwidth,
                downtime_limit: decision.downtime_limit_ms,
                cpu_throttle_increment: decision.throttle_increment,
                ..MigrationParameters::default()
            };
            if o.steer && params != MigrationParameters::default() {
                tracing::debug!(?params, estimate = ?controller.estimate(), "adjusting the source");
                // A parameter QEMU refuses is worth a warning, not the migration.
                if let Err(e) = qmp.migrate_set_parameters(&params).await {
                    tracing::warn!(error = %e, "cannot adjust the migration parameters");
                }
            }
            let phase = match status {
                MigrationStatus::Active => format!("pass {}", ram.dirty_sync_count.max(1)),
                other => other.as_str().to_owned(),
            };
            self.progress.show(&Snapshot {
                phase,
                elapsed: self.started.elapsed(),
                sent: ram.transferred,
                remaining: ram.remaining,
                total: ram.total,
                estimate: controller.estimate(),
                throttle_percent: throttle,
            });
        }
        self.stage = Stage::SourceCompleted;
        self.report.qemu_total_time_ms = last_info.total_time;
        self.report.qemu_downtime_ms = last_info.downtime;
        if let Some(ram) = &last_info.ram {
            self.report.iterations = ram.dirty_sync_count;
        }
        self.progress.note("source QEMU completed; waiting for the destination to run the VM");

        // Cutover: only a destination that runs the VM releases the source.
        let control = self.control()?;
        control.send(&ToDestination::SourceCompleted).await?;
        let (first_beat, resumed) = loop {
            match control.recv(DESTINATION_TIMEOUT).await? {
                ToSource::Running { first_heartbeat_unix_ns, resumed_unix_ns, status, .. } => {
                    tracing::info!(%status, "destination VM running");
                    break (first_heartbeat_unix_ns, resumed_unix_ns);
                }
                ToSource::Failed { reason } => {
                    self.destination_failed = true;
                    bail!("the destination failed after the source completed: {reason}")
                }
                other => tracing::debug!(?other, "ignoring"),
            }
        };
        self.stage = Stage::DestinationRunning;
        if stop_unix_ns.is_none() {
            stop_unix_ns = self.qmp()?.drain_events().iter().rev().find(|e| e.event == QmpEvent::Stop).and_then(event_time_ns);
        }
        if let (Some(stop), Some(resumed), Some(offset_ms)) = (stop_unix_ns, resumed, self.report.clock_offset_ms) {
            self.report.pause_ms = Some(((resumed - (offset_ms * 1e6) as i128) - stop) as f64 / 1e6);
        }
        match (&heartbeat, first_beat, self.report.clock_offset_ms) {
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
        // From here on the VM runs at the destination: the migration succeeded, and whatever
        // goes wrong now is a warning, never a reason to touch the source VM again.
        if o.keep_source {
            self.report.source_vm = "paused".into();
        } else {
            match self.qmp()?.quit().await {
                Ok(()) => self.report.source_vm = "quit".into(),
                Err(e) => {
                    self.report.source_vm = "paused".into();
                    self.warn(format!("cannot quit the source VM (left paused): {e}"));
                }
            }
        }

        // Announcement report, and the final byte counts once the flows have ended.
        match self.control()?.recv(Duration::from_secs(10)).await {
            Ok(ToSource::Announced { interface, macs, error, .. }) => {
                if let Some(e) = error {
                    self.warn(format!("MAC announcement at the destination failed: {e}"));
                }
                self.report.announce_interface = interface;
                self.report.announced_macs = macs;
            }
            Ok(other) => self.warn(format!("unexpected message instead of the announcement report: {other:?}")),
            Err(e) => self.warn(format!("no announcement report from the destination: {e}")),
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while stats.open > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            match api.forward_stats(migration_forward.id).await {
                Ok(s) => stats = s,
                Err(e) => {
                    self.warn(format!("final byte counts incomplete: {e}"));
                    break;
                }
            }
        }
        self.report.bytes_from_qemu = stats.tcp_in;
        self.report.bytes_on_wan = stats.wan_out;
        self.report.bytes_from_wan = stats.wan_in;
        self.report.reduction = if stats.wan_out > 0 { stats.tcp_in as f64 / stats.wan_out as f64 } else { 0.0 };
        Ok(())
    }

    fn warn(&mut self, message: String) {
        tracing::warn!("{message}");
        self.progress.note(&format!("warning: {message}"));
        self.report.warnings.push(message);
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

    /// After a failure: cancel what runs, make sure the source VM runs unless the destination
    /// may be running it, tell the destination. Returns the source VM's state for the report.
    async fn recover(&mut self, reason: &str) -> String {
        if let Some(control) = self.control.as_mut() {
            if self.stage < Stage::DestinationRunning {
                let _ = control.send(&ToDestination::Abort { reason: reason.to_owned() }).await;
            }
        }
        let Some(qmp) = self.qmp.clone() else { return "running".into() };
        match self.stage {
            Stage::Setup => "running".into(),
            Stage::Migrating => {
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
                ensure_running(&qmp).await
            }
            Stage::SourceCompleted => {
                // The destination loaded the state but did not confirm running. If it said it
                // failed, the source can safely take over again; if it went silent it might be
                // running the VM, and two running copies would be worse than a paused one.
                if self.destination_failed {
                    ensure_running(&qmp).await
                } else {
                    "paused (destination state unknown: check it before resuming the source with `cont`)".into()
                }
            }
            // Not reached: after this point failures are warnings.
            Stage::DestinationRunning => self.report.source_vm.clone(),
        }
    }
}

/// Resumes the source VM if it is paused; returns its state.
async fn ensure_running(qmp: &Qmp) -> String {
    match qmp.query_status().await {
        Ok(s) if s.running => "running".into(),
        Ok(s) => match qmp.cont().await {
            Ok(()) => {
                tracing::info!(was = s.status.as_str(), "resumed the source VM");
                "running".into()
            }
            Err(e) => format!("{} (cont failed: {e})", s.status.as_str()),
        },
        Err(e) => format!("unknown ({e})"),
    }
}
