//! `ferry-host serve`: the destination side. Accepts control sessions (arriving through the
//! site gateway), prepares the incoming QEMU each one names, reports when the VM runs, and
//! re-announces its MACs on the destination L2.
//!
//! This is the async shell: the session's lifecycle (what each message or QEMU state means, the
//! timeouts) is [`DestinationSession`]'s.
//!
//! The incoming QEMU is one the operator (or their tooling) started with `-incoming defer`,
//! with its QMP socket (and optional heartbeat chardev) at the paths `[incoming]` derives from
//! the VM's name. Serve turns its autostart off before the stream comes (`stop` while
//! `inmigrate`), so it runs only on the source's `Commit`, and discards it (quit, else
//! SIGKILL) when a session ends without one. One session per VM name at a time.
//!
//! On SIGTERM or SIGINT serve stops accepting; sessions not yet committed give their VM up at
//! once (the source resumes its own), committed ones finish, for at most `shutdown_grace`.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde::Deserialize;
use tokio::net::TcpListener;

use crate::announce::{self, Announcement, MacAddr};
use crate::control::Channel;
use ferry_api::control::{IncomingState, SharedSettings, ToDestination, ToSource};
use crate::heartbeat::{event_time_ns, unix_now_ns, Heartbeat};
use crate::incoming;
use ferry_qmp::{Qmp, QmpConfig, QmpEvent, RunState};
use crate::session::destination::{DestinationAction, DestinationSession};
use crate::session::ControlEvent;
use crate::settings;

/// How long the incoming QEMU's QMP socket may take to appear.
const QMP_WAIT: Duration = Duration::from_secs(30);
/// Time limit of one QMP command to the incoming QEMU: short, so that a hung QEMU is noticed
/// (and discarded) well within the cutover's deadline.
const INCOMING_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for the first heartbeat once the VM runs.
const HEARTBEAT_WAIT: Duration = Duration::from_secs(10);

/// `ferry-host serve` configuration (TOML; every key in config/README.md).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    /// TCP address for control sessions; the site gateway dials it.
    pub listen: SocketAddr,
    /// IP the incoming QEMU listens on for the migration stream (the site gateway dials it).
    pub migration_address: IpAddr,
    /// Interface on the destination L2 segment for MAC re-announcement; none: not announced.
    #[serde(default)]
    pub announce_interface: Option<String>,
    /// Where incoming VMs are.
    pub incoming: IncomingConfig,
    /// On SIGTERM/SIGINT, how long committed sessions may take to finish (default 30 s).
    #[serde(default = "default_shutdown_grace", with = "ferry_units::duration_text")]
    pub shutdown_grace: Duration,
}

fn default_shutdown_grace() -> Duration {
    Duration::from_secs(30)
}

/// Paths of an incoming VM; `{vm}` is replaced by the VM's name.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IncomingConfig {
    /// QMP socket of the QEMU started with `-incoming defer`.
    pub qmp: String,
    /// Heartbeat chardev socket of that QEMU, if the guest has one.
    #[serde(default)]
    pub heartbeat: Option<String>,
}

impl ServeConfig {
    /// Reads and checks a config file; errors name the key.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("invalid config file {}", path.display()))
    }

    /// Parses and checks config text.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let config: ServeConfig = toml::from_str(text).map_err(|e| anyhow!("{}", e.to_string().trim_end()))?;
        if !config.incoming.qmp.contains("{vm}") {
            bail!("key `incoming.qmp`: must contain `{{vm}}` (one socket per VM)");
        }
        if let Some(hb) = &config.incoming.heartbeat {
            if !hb.contains("{vm}") {
                bail!("key `incoming.heartbeat`: must contain `{{vm}}` (one socket per VM)");
            }
        }
        if config.announce_interface.as_deref() == Some("") {
            bail!("key `announce_interface`: must not be empty (leave it out to not announce)");
        }
        Ok(config)
    }
}

fn check_vm_name(name: &str) -> anyhow::Result<()> {
    ferry_api::control::check_vm_name(name).map_err(|e| anyhow!(e))
}

fn expand(template: &str, vm: &str) -> PathBuf {
    PathBuf::from(template.replace("{vm}", vm))
}

/// The VMs with a session under way here: one session per VM name at a time.
#[derive(Clone, Debug, Default)]
struct Claims(Arc<parking_lot::Mutex<HashSet<String>>>);

/// A VM name claimed by one session; released on drop.
#[derive(Debug)]
struct Claim {
    claims: Claims,
    vm: String,
}

impl Claims {
    /// Claims `vm`, atomically; `None` if another session has it.
    fn claim(&self, vm: &str) -> Option<Claim> {
        self.0.lock().insert(vm.to_owned()).then(|| Claim { claims: self.clone(), vm: vm.to_owned() })
    }

    fn is_claimed(&self, vm: &str) -> bool {
        self.0.lock().contains(vm)
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.claims.0.lock().remove(&self.vm);
    }
}

/// Serves control sessions on `listener` until `shutdown` resolves; then stops accepting, tells
/// the sessions (uncommitted ones give their VM up) and waits for them at most
/// `config.shutdown_grace`.
pub async fn serve(listener: TcpListener, config: ServeConfig, shutdown: impl std::future::Future<Output = ()>) {
    let claims = Claims::default();
    let (stopping, _) = tokio::sync::watch::channel(false);
    let mut sessions = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, remote)) => {
                    let session = Session { control: Control::new(tcp), config: config.clone(), claims: claims.clone(), stopping: stopping.subscribe() };
                    sessions.spawn(async move {
                        tracing::debug!(%remote, "control session");
                        match session.run().await {
                            Ok(()) => tracing::debug!(%remote, "control session finished"),
                            Err(e) => tracing::warn!(%remote, error = format!("{e:#}"), "control session failed"),
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tracing::info!(sessions = sessions.len(), grace = ?config.shutdown_grace, "stopping: no new sessions");
    let _ = stopping.send(true);
    let drained = tokio::time::timeout(config.shutdown_grace, async { while sessions.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(sessions = sessions.len(), "sessions still running after the grace period: stopping them");
    }
}

type Control = Channel<ToDestination, ToSource>;

/// The async shell around one [`DestinationSession`]: performs its actions, feeds it the results.
struct Session {
    control: Control,
    config: ServeConfig,
    claims: Claims,
    /// Becomes true when serve stops.
    stopping: tokio::sync::watch::Receiver<bool>,
}

/// The incoming VM once prepared.
struct Incoming {
    qmp: Qmp,
    heartbeat: Option<Heartbeat>,
    ips: Vec<IpAddr>,
    _claim: Claim,
}

/// What a wait for the source ended with.
enum Received {
    Control(ControlEvent<ToDestination>),
    Watch,
    Stopping,
}

impl Session {
    /// Waits for a control message, at most `watch` if given, or serve's stop.
    async fn receive(&mut self, watch: Option<Duration>) -> Received {
        if *self.stopping.borrow() {
            return Received::Stopping;
        }
        let mut stopping = self.stopping.clone();
        let control = &mut self.control;
        let next = async move {
            match watch {
                Some(w) => match tokio::time::timeout(w, control.next()).await {
                    Ok(r) => Received::Control(r.into()),
                    Err(_) => Received::Watch,
                },
                None => Received::Control(control.next().await.into()),
            }
        };
        tokio::select! {
            r = next => r,
            _ = stopping.wait_for(|s| *s) => Received::Stopping,
        }
    }

    async fn send(&mut self, message: &ToSource) {
        if let Err(e) = self.control.send(message).await {
            tracing::warn!(error = %e, ?message, "cannot tell the source");
        }
    }

    async fn run(mut self) -> anyhow::Result<()> {
        let mut machine = DestinationSession::new();
        let mut incoming: Option<Incoming> = None;
        while let Some(action) = machine.poll_action() {
            match action {
                DestinationAction::ReceiveControl | DestinationAction::ReceiveControlOrWatch(_) => {
                    let watch = match action {
                        DestinationAction::ReceiveControlOrWatch(w) => Some(w),
                        _ => None,
                    };
                    match self.receive(watch).await {
                        Received::Control(event) => machine.handle_control(Instant::now(), event),
                        Received::Watch => machine.handle_watch_due(),
                        Received::Stopping => machine.handle_shutdown(),
                    }
                }
                DestinationAction::SendPong { seq } => self.send(&ToSource::Pong { seq, unix_ns: unix_now_ns() }).await,
                DestinationAction::Send(message) => self.send(&message).await,
                DestinationAction::Prepare { vm, source_qemu_version, settings, ips } => {
                    let result = match self.prepare(&vm, &settings, ips).await {
                        Ok((vm_state, listen, version)) => {
                            tracing::info!(%vm, %listen, source_qemu = %source_qemu_version, "incoming VM prepared (paused until the commit)");
                            incoming = Some(vm_state);
                            Ok((listen, version))
                        }
                        Err(e) => Err(format!("{e:#}")),
                    };
                    machine.handle_prepared(result);
                }
                DestinationAction::QueryIncomingMigration => {
                    let result = incoming_vm(&incoming)?.qmp.query_migrate().await;
                    machine.handle_incoming_migration(Instant::now(), result);
                }
                DestinationAction::QueryRunState => {
                    let result = incoming_vm(&incoming)?.qmp.query_status().await;
                    machine.handle_run_state(Instant::now(), result);
                }
                DestinationAction::Resume => {
                    tracing::info!("committed: starting the VM");
                    let result = incoming_vm(&incoming)?.qmp.cont().await;
                    machine.handle_resumed(Instant::now(), result);
                }
                DestinationAction::Sleep(pause) => tokio::time::sleep(pause).await,
                DestinationAction::ReportRunning { status } => {
                    let vm = incoming_vm(&incoming)?;
                    let running_unix_ns = unix_now_ns();
                    let resumed_unix_ns = vm.qmp.drain_events().iter().rev().find(|e| e.event == QmpEvent::Resume).and_then(event_time_ns);
                    let first_heartbeat_unix_ns = match &vm.heartbeat {
                        Some(hb) => hb.wait_first(HEARTBEAT_WAIT).await,
                        None => None,
                    };
                    tracing::info!("VM running at the destination");
                    self.send(&ToSource::Running { running_unix_ns, resumed_unix_ns, first_heartbeat_unix_ns, status: status.as_str().to_owned() }).await;
                }
                DestinationAction::Announce => {
                    let announced = self.announce(incoming_vm(&incoming)?).await;
                    self.send(&announced).await;
                }
                DestinationAction::Discard { vm } => {
                    let result = if check_vm_name(&vm).is_err() {
                        Err(format!("VM name `{vm}` is not usable in a socket path"))
                    } else if incoming.is_none() && self.claims.is_claimed(&vm) {
                        Err(format!("a migration session for `{vm}` is under way here"))
                    } else {
                        incoming::discard(incoming.as_ref().map(|i| &i.qmp), &expand(&self.config.incoming.qmp, &vm)).await
                    };
                    match &result {
                        Ok(done) => tracing::info!(%vm, done, "incoming VM discarded"),
                        Err(why) => tracing::error!(%vm, why, "cannot make sure the incoming VM is gone"),
                    }
                    incoming = None;
                    machine.handle_discarded(result);
                }
                DestinationAction::Inquire { vm } => {
                    let state = if check_vm_name(&vm).is_err() {
                        IncomingState::Absent
                    } else if self.claims.is_claimed(&vm) {
                        IncomingState::Busy
                    } else {
                        incoming::inquire(&expand(&self.config.incoming.qmp, &vm)).await
                    };
                    machine.handle_inquiry(vm, state);
                }
                DestinationAction::Finish(Ok(())) => return Ok(()),
                DestinationAction::Finish(Err(reason)) => bail!("{reason}"),
            }
        }
        Ok(())
    }

    async fn prepare(&self, vm: &str, shared: &SharedSettings, ips: Vec<IpAddr>) -> anyhow::Result<(Incoming, SocketAddr, String)> {
        check_vm_name(vm)?;
        let claim = self.claims.claim(vm).ok_or_else(|| anyhow!("`{vm}` is already being migrated here; refusing a second migration"))?;
        let path = expand(&self.config.incoming.qmp, vm);
        let qmp = Qmp::connect(&path, QmpConfig { connect_timeout: QMP_WAIT, command_timeout: INCOMING_COMMAND_TIMEOUT, ..QmpConfig::default() })
            .await
            .with_context(|| format!("no incoming QEMU for `{vm}` at {}", path.display()))?;
        let status = qmp.query_status().await.context("query-status")?;
        if status.status != RunState::InMigrate {
            bail!("the QEMU at {} is not waiting for a migration (status {}; start it with -incoming defer)", path.display(), status.status.as_str());
        }
        // Autostart off: `stop` while `inmigrate` makes QEMU stay paused once the state is loaded
        // (as `-S` would), so the VM runs only when the source commits.
        qmp.stop().await.context("stop (turning the incoming VM's autostart off)")?;
        let version = qmp.query_version().await.context("query-version")?.qemu.to_string();
        settings::apply_shared(&qmp, shared, &[], "destination").await?;
        let heartbeat = match &self.config.incoming.heartbeat {
            Some(t) => {
                let p = expand(t, vm);
                Some(Heartbeat::watch(&p, Duration::from_secs(5)).await.with_context(|| format!("heartbeat socket {}", p.display()))?)
            }
            None => None,
        };
        let address = self.config.migration_address;
        let uri = match address {
            IpAddr::V4(a) => format!("tcp:{a}:0"),
            IpAddr::V6(a) => format!("tcp:[{a}]:0"),
        };
        qmp.migrate_incoming(&uri).await.context("migrate-incoming")?;
        let ports = qmp.query_migrate().await.context("query-migrate")?.listen_ports();
        let port = *ports.first().ok_or_else(|| anyhow!("the incoming QEMU reports no listening port"))?;
        Ok((Incoming { qmp, heartbeat, ips, _claim: claim }, SocketAddr::new(address, port), version))
    }

    /// Re-announces every NIC's MAC on the configured interface; the VM's IPs go with the first.
    async fn announce(&self, vm: &Incoming) -> ToSource {
        let Some(interface) = self.config.announce_interface.clone() else {
            return ToSource::Announced { interface: None, macs: Vec::new(), frames: 0, error: None };
        };
        let nics = match vm.qmp.nic_macs().await {
            Ok(n) => n,
            Err(e) => {
                return ToSource::Announced { interface: Some(interface), macs: Vec::new(), frames: 0, error: Some(format!("cannot list the NICs: {e}")) }
            }
        };
        let mut tasks = tokio::task::JoinSet::new();
        for (i, (_path, mac)) in nics.iter().enumerate() {
            let mut a = Announcement::mac_only(MacAddr(mac.0));
            if i == 0 {
                for ip in &vm.ips {
                    match ip {
                        IpAddr::V4(v4) => a.ipv4.push(*v4),
                        IpAddr::V6(v6) => a.ipv6.push(*v6),
                    }
                }
            }
            let interface = interface.clone();
            tasks.spawn(async move { announce::announce(&interface, &a, &announce::default_schedule()).await });
        }
        let mut frames = 0;
        let mut error = None;
        while let Some(done) = tasks.join_next().await {
            match done {
                Ok(Ok(report)) => frames += report.frames_sent,
                Ok(Err(e)) => error = Some(e.to_string()),
                Err(e) => error = Some(e.to_string()),
            }
        }
        let macs: Vec<String> = nics.iter().map(|(_, m)| m.to_string()).collect();
        tracing::info!(%interface, ?macs, frames, ?error, "announced");
        ToSource::Announced { interface: Some(interface), macs, frames, error }
    }
}

/// The prepared incoming VM an action needs.
fn incoming_vm(incoming: &Option<Incoming>) -> anyhow::Result<&Incoming> {
    incoming.as_ref().ok_or_else(|| anyhow!("internal: no incoming VM"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
listen = "127.0.0.1:7800"
migration_address = "127.0.0.1"
announce_interface = "br0"
shutdown_grace = "10s"
[incoming]
qmp = "/run/ferry/{vm}.qmp"
heartbeat = "/run/ferry/{vm}.hb"
"#;

    #[test]
    fn config_parses_and_errors_name_the_key() {
        let c = ServeConfig::parse(SAMPLE).unwrap();
        assert_eq!(expand(&c.incoming.qmp, "vm1"), PathBuf::from("/run/ferry/vm1.qmp"));
        assert_eq!(c.shutdown_grace, Duration::from_secs(10));
        let err = format!("{:#}", ServeConfig::parse(&SAMPLE.replace("\"10s\"", "\"10 parsecs\"")).unwrap_err());
        assert!(err.contains("shutdown_grace"), "{err}");
        let err = ServeConfig::parse(&SAMPLE.replace("migration_address", "migration_adress")).unwrap_err().to_string();
        assert!(err.contains("migration_adress"), "{err}");
        let err = ServeConfig::parse(&SAMPLE.replace("{vm}.qmp", "x.qmp")).unwrap_err().to_string();
        assert!(err.contains("incoming.qmp"), "{err}");
        let err = format!("{:#}", ServeConfig::parse(&SAMPLE.replace("127.0.0.1\"\nannounce", "nowhere\"\nannounce")).unwrap_err());
        assert!(err.contains("migration_address"), "{err}");
    }

    #[test]
    fn one_session_per_vm() {
        let claims = Claims::default();
        let first = claims.claim("vm1").unwrap();
        assert!(claims.claim("vm1").is_none());
        assert!(claims.is_claimed("vm1"));
        let _other = claims.claim("vm2").unwrap();
        drop(first);
        assert!(!claims.is_claimed("vm1"));
        assert!(claims.claim("vm1").is_some());
    }

}
