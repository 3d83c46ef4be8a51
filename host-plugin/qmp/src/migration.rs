//! Driving one QEMU migration between two QMP endpoints: the one implementation of the
//! sequence, used by the test harness's "QEMU without host-plugin" paths and open to any
//! other caller.
//!
//! The sequence, in the order QEMU needs it:
//!
//! 1. [`MigrationPair::configure`]: the same capabilities and parameters on both ends
//!    ([`MigrationSetup`]: the [`MigrationMode`], `return-path`, `max-bandwidth`), the
//!    destination first.
//! 2. [`MigrationPair::listen`]: `migrate-incoming` on the destination (started with
//!    `-incoming defer`) and the ports it listens on, from `query-migrate`.
//! 3. [`MigrationPair::migrate`]: `migrate` on the source, [`wait_for_completion`] (polling
//!    `query-migrate` until `completed`, or [`MigrationError::Failed`]), then the destination
//!    loaded: `running`, or `paused` if it was started with `-S` (held for a check before it
//!    runs); returns the source's final `query-migrate` (with its [`crate::RamStats`],
//!    `total-time` and `downtime`) and the wall time.
//!
//! The steps are separate so a caller can act between them (check the listening port, read
//! link counters before the migration starts).

use std::time::{Duration, Instant};

use crate::client::Qmp;
use crate::error::QmpError;
use crate::types::{
    CapabilityState, MigrationCapability, MigrationInfo, MigrationParameters, MigrationStatus,
    MultifdCompression, RunState,
};

/// How often [`wait_for_completion`] and [`MigrationPair`] poll QEMU.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Why driving a migration failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// A QMP command failed or timed out.
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// The migration ended in a status other than `completed`.
    #[error("migration {status}: {}", info.error_desc.as_deref().unwrap_or("no error-desc"))]
    Failed {
        /// The terminal status (`failed`, `cancelled`).
        status: MigrationStatus,
        /// The source's last `query-migrate` (its `error_desc` says why).
        info: Box<MigrationInfo>,
    },
    /// After `migrate-incoming`, the destination did not listen where it was asked to.
    #[error("destination listens on ports {listening:?}, not {expected}")]
    NotListening {
        /// The port of the `migrate-incoming` URI (0 if any port would do).
        expected: u16,
        /// The ports `query-migrate` reported.
        listening: Vec<u16>,
    },
}

/// Which channels a migration uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationMode {
    /// Everything on one TCP connection (the main channel).
    Main,
    /// Capability `multifd`: main channel + `channels` page channels.
    Multifd {
        /// `multifd-channels` (1..=255).
        channels: u8,
        /// `multifd-compression`.
        compression: MultifdCompression,
    },
}

impl MigrationMode {
    /// Multifd with `channels` channels and no compression.
    pub fn multifd(channels: u8) -> MigrationMode {
        MigrationMode::Multifd {
            channels,
            compression: MultifdCompression::None,
        }
    }

    /// Number of TCP connections the source opens.
    pub fn connections(&self) -> usize {
        match self {
            MigrationMode::Main => 1,
            MigrationMode::Multifd { channels, .. } => 1 + usize::from(*channels),
        }
    }

    /// Sets the capabilities and parameters of this mode on one side (source and
    /// destination need the same multifd settings), and `max-bandwidth` to `max_bandwidth`
    /// bytes/s if given.
    pub async fn configure(&self, qmp: &Qmp, max_bandwidth: Option<u64>) -> Result<(), QmpError> {
        match self {
            MigrationMode::Main => {
                qmp.migrate_set_capabilities(&[CapabilityState::new(
                    MigrationCapability::Multifd,
                    false,
                )])
                .await?
            }
            MigrationMode::Multifd {
                channels,
                compression,
            } => {
                qmp.migrate_set_capabilities(&[CapabilityState::new(
                    MigrationCapability::Multifd,
                    true,
                )])
                .await?;
                qmp.migrate_set_parameters(&MigrationParameters {
                    multifd_channels: Some(*channels),
                    multifd_compression: Some(compression.clone()),
                    ..MigrationParameters::default()
                })
                .await?;
            }
        }
        if let Some(bw) = max_bandwidth {
            qmp.migrate_set_parameters(&MigrationParameters {
                max_bandwidth: Some(bw),
                ..MigrationParameters::default()
            })
            .await?;
        }
        Ok(())
    }
}

/// One end of a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The VM that sends its state.
    Source,
    /// The VM that receives it (started with `-incoming defer`).
    Destination,
}

/// What both ends are set to before a migration. `None` leaves QEMU's current value (settings
/// made beforehand, e.g. `xbzrle` or `downtime-limit`, stay as they are).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationSetup {
    /// Channels and compression, on both ends.
    pub mode: MigrationMode,
    /// Capability `return-path`, on both ends.
    pub return_path: Option<bool>,
    /// `max-bandwidth` of the source, bytes/s.
    pub source_max_bandwidth: Option<u64>,
    /// `max-bandwidth` of the destination, bytes/s (QEMU's docs ask for the same parameters
    /// on both ends).
    pub destination_max_bandwidth: Option<u64>,
}

impl MigrationSetup {
    /// `mode` only; everything else left as it is.
    pub fn new(mode: MigrationMode) -> MigrationSetup {
        MigrationSetup {
            mode,
            return_path: None,
            source_max_bandwidth: None,
            destination_max_bandwidth: None,
        }
    }

    /// Applies this setup to `side`: the mode (with the source's `max-bandwidth` on the
    /// source), `return-path`, then the destination's `max-bandwidth` on the destination.
    pub async fn apply(&self, qmp: &Qmp, side: Side) -> Result<(), QmpError> {
        let mode_bandwidth = match side {
            Side::Source => self.source_max_bandwidth,
            Side::Destination => None,
        };
        self.mode.configure(qmp, mode_bandwidth).await?;
        if let Some(on) = self.return_path {
            qmp.migrate_set_capabilities(&[CapabilityState::new(
                MigrationCapability::ReturnPath,
                on,
            )])
            .await?;
        }
        if let (Side::Destination, Some(bw)) = (side, self.destination_max_bandwidth) {
            qmp.migrate_set_parameters(&MigrationParameters {
                max_bandwidth: Some(bw),
                ..MigrationParameters::default()
            })
            .await?;
        }
        Ok(())
    }
}

/// Polls the source's `query-migrate` every `poll` until the migration is terminal: its
/// final reply if `completed`, else [`MigrationError::Failed`]; a [`QmpError::Timeout`]
/// after `timeout`.
pub async fn wait_for_completion(
    source: &Qmp,
    poll: Duration,
    timeout: Duration,
) -> Result<MigrationInfo, MigrationError> {
    let info = source.wait_migration(poll, timeout).await?;
    match info.status() {
        MigrationStatus::Completed => Ok(info),
        status => Err(MigrationError::Failed {
            status,
            info: Box::new(info),
        }),
    }
}

/// A migration that completed.
#[derive(Debug, Clone)]
pub struct CompletedMigration {
    /// The source's final `query-migrate` (status `completed`).
    pub info: MigrationInfo,
    /// Wall time from `migrate` until the source reported `completed` and the destination
    /// had loaded the state (`running`, or `paused` when started with `-S`).
    pub wall_time: Duration,
    /// The destination's run state then: `running`, or `paused` (started with `-S`).
    pub destination_state: RunState,
}

/// The two QMP sessions of one migration.
#[derive(Debug, Clone, Copy)]
pub struct MigrationPair<'a> {
    /// The source VM's session.
    pub source: &'a Qmp,
    /// The destination VM's session.
    pub destination: &'a Qmp,
    /// How often to poll `query-migrate` and `query-status`.
    pub poll: Duration,
}

impl<'a> MigrationPair<'a> {
    /// A pair polling every [`POLL_INTERVAL`].
    pub fn new(source: &'a Qmp, destination: &'a Qmp) -> MigrationPair<'a> {
        MigrationPair {
            source,
            destination,
            poll: POLL_INTERVAL,
        }
    }

    /// Applies `setup` to the destination, then to the source.
    pub async fn configure(&self, setup: &MigrationSetup) -> Result<(), MigrationError> {
        setup.apply(self.destination, Side::Destination).await?;
        setup.apply(self.source, Side::Source).await?;
        Ok(())
    }

    /// `migrate-incoming uri` on the destination; returns the TCP ports it listens on
    /// (`tcp:HOST:0` lets QEMU pick one).
    pub async fn listen(&self, uri: &str) -> Result<Vec<u16>, MigrationError> {
        self.destination.migrate_incoming(uri).await?;
        Ok(self.destination.query_migrate().await?.listen_ports())
    }

    /// [`MigrationPair::listen`] on `tcp:{addr}`, checking that the destination listens on
    /// `addr`'s port (or on some port, if it is 0); returns that port.
    pub async fn listen_tcp(&self, addr: std::net::SocketAddr) -> Result<u16, MigrationError> {
        let listening = self.listen(&format!("tcp:{addr}")).await?;
        let port = match addr.port() {
            0 => listening.first().copied(),
            want => listening.contains(&want).then_some(want),
        };
        port.ok_or(MigrationError::NotListening {
            expected: addr.port(),
            listening,
        })
    }

    /// `migrate uri` on the source, then waits (each wait bounded by `timeout`) until the
    /// source is `completed` ([`wait_for_completion`]) and the destination has loaded the
    /// state: `running`, or `paused` if it was started with `-S` (it stays paused until
    /// `cont`).
    pub async fn migrate(
        &self,
        uri: &str,
        timeout: Duration,
    ) -> Result<CompletedMigration, MigrationError> {
        let started = Instant::now();
        self.source.migrate(uri).await?;
        let info = wait_for_completion(self.source, self.poll, timeout).await?;
        let deadline = Instant::now() + timeout;
        let destination_state = loop {
            let st = self.destination.query_status().await?;
            if matches!(st.status, RunState::Running | RunState::Paused) {
                break st.status;
            }
            if Instant::now() >= deadline {
                return Err(QmpError::Timeout {
                    command: format!(
                        "query-status (waiting for the destination to load, now `{}`)",
                        st.status
                    ),
                    timeout,
                }
                .into());
            }
            tokio::time::sleep(self.poll).await;
        };
        Ok(CompletedMigration {
            info,
            wall_time: started.elapsed(),
            destination_state,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blocking::BlockingQmp;
    use crate::fake_qemu::FakeQemu;
    use crate::types::UNLIMITED_BANDWIDTH;
    use serde_json::{json, Value};
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    const T: Duration = Duration::from_secs(5);

    fn ram() -> Value {
        json!({"transferred": 4096, "remaining": 0, "total": 1 << 20, "mbps": 1.0,
            "dirty-sync-count": 2, "multifd-bytes": 100})
    }

    /// A source whose migration is `active` for one poll, then ends in `last`.
    fn source(last: Value) -> FakeQemu {
        let polls = Arc::new(AtomicU32::new(0));
        FakeQemu::start(Box::new(move |name, _| match name {
            "query-migrate" if polls.fetch_add(1, Ordering::Relaxed) == 0 => {
                Ok(json!({"status": "active", "ram": ram()}))
            }
            "query-migrate" => Ok(last.clone()),
            _ => Ok(json!({})),
        }))
    }

    fn destination(port: &str) -> FakeQemu {
        destination_loading_into(port, "running")
    }

    /// A destination that is `inmigrate` at its first `query-status`, then `loaded`.
    fn destination_loading_into(port: &str, loaded: &'static str) -> FakeQemu {
        let port = port.to_owned();
        let polls = Arc::new(AtomicU32::new(0));
        FakeQemu::start(Box::new(move |name, _| match name {
            "query-migrate" => Ok(json!({"status": "setup", "socket-address":
                [{"type": "inet", "host": "127.0.0.1", "port": port}]})),
            "query-status" if polls.fetch_add(1, Ordering::Relaxed) == 0 => {
                Ok(json!({"status": "inmigrate", "running": false}))
            }
            "query-status" => Ok(json!({"status": loaded, "running": loaded == "running"})),
            _ => Ok(json!({})),
        }))
    }

    fn connect(fake: &FakeQemu) -> BlockingQmp {
        BlockingQmp::connect(&fake.path, T).expect("connect")
    }

    fn fast(pair: MigrationPair<'_>) -> MigrationPair<'_> {
        MigrationPair {
            poll: Duration::from_millis(1),
            ..pair
        }
    }

    #[test]
    fn pair_sets_both_ends_alike_then_migrates_to_completion() {
        let completed = json!({"status": "completed", "total-time": 9, "downtime": 3, "ram": ram()});
        let (src_fake, dst_fake) = (source(completed), destination("4444"));
        let (src, dst) = (connect(&src_fake), connect(&dst_fake));
        let pair = fast(MigrationPair::new(src.client(), dst.client()));
        let setup = MigrationSetup {
            mode: MigrationMode::multifd(2),
            return_path: Some(true),
            source_max_bandwidth: Some(1000),
            destination_max_bandwidth: Some(UNLIMITED_BANDWIDTH),
        };
        let listen: std::net::SocketAddr = "127.0.0.1:4444".parse().expect("address");
        let done = src
            .block_on(async {
                pair.configure(&setup).await?;
                assert_eq!(pair.listen_tcp(listen).await?, 4444);
                pair.migrate("tcp:127.0.0.1:4444", T).await
            })
            .expect("migration");
        assert_eq!(done.info.status(), MigrationStatus::Completed);
        assert_eq!((done.info.total_time, done.info.downtime), (Some(9), Some(3)));
        assert_eq!(done.info.ram.and_then(|r| r.multifd_bytes), Some(100));

        let multifd_on = json!({"capabilities": [{"capability": "multifd", "state": true}]});
        let multifd_params = json!({"multifd-channels": 2, "multifd-compression": "none"});
        let return_path = json!({"capabilities": [{"capability": "return-path", "state": true}]});
        let dst_cmds = dst_fake.commands();
        assert_eq!(
            dst_cmds,
            [
                ("migrate-set-capabilities".into(), multifd_on.clone()),
                ("migrate-set-parameters".into(), multifd_params.clone()),
                ("migrate-set-capabilities".into(), return_path.clone()),
                ("migrate-set-parameters".into(), json!({"max-bandwidth": UNLIMITED_BANDWIDTH})),
                ("migrate-incoming".into(), json!({"uri": "tcp:127.0.0.1:4444"})),
                ("query-migrate".into(), Value::Null),
                ("query-status".into(), Value::Null),
                ("query-status".into(), Value::Null),
            ]
        );
        assert_eq!(done.destination_state, RunState::Running);
        let src_cmds = src_fake.commands();
        assert_eq!(
            src_cmds,
            [
                ("migrate-set-capabilities".into(), multifd_on),
                ("migrate-set-parameters".into(), multifd_params),
                ("migrate-set-parameters".into(), json!({"max-bandwidth": 1000})),
                ("migrate-set-capabilities".into(), return_path),
                ("migrate".into(), json!({"uri": "tcp:127.0.0.1:4444"})),
                ("query-migrate".into(), Value::Null),
                ("query-migrate".into(), Value::Null),
            ]
        );
    }

    #[test]
    fn a_destination_started_with_minus_s_counts_as_loaded_once_paused() {
        let completed = json!({"status": "completed", "ram": ram()});
        let (src_fake, dst_fake) = (source(completed), destination_loading_into("1", "paused"));
        let (src, dst) = (connect(&src_fake), connect(&dst_fake));
        let pair = fast(MigrationPair::new(src.client(), dst.client()));
        let done = src.block_on(pair.migrate("tcp:127.0.0.1:1", T)).expect("migration");
        assert_eq!(done.destination_state, RunState::Paused);
        let polls = dst_fake.commands().iter().filter(|(n, _)| n == "query-status").count();
        assert_eq!(polls, 2, "inmigrate, then paused");
    }

    #[test]
    fn main_mode_turns_multifd_off_and_leaves_the_rest() {
        let (src_fake, dst_fake) = (source(json!({})), destination("1"));
        let (src, dst) = (connect(&src_fake), connect(&dst_fake));
        let pair = MigrationPair::new(src.client(), dst.client());
        src.block_on(pair.configure(&MigrationSetup::new(MigrationMode::Main)))
            .expect("configure");
        let multifd_off = (
            "migrate-set-capabilities".to_string(),
            json!({"capabilities": [{"capability": "multifd", "state": false}]}),
        );
        assert_eq!(src_fake.commands(), std::slice::from_ref(&multifd_off));
        assert_eq!(dst_fake.commands(), [multifd_off]);
        assert_eq!(MigrationMode::Main.connections(), 1);
        assert_eq!(MigrationMode::multifd(4).connections(), 5);
    }

    #[test]
    fn failed_migration_and_wrong_port_are_errors() {
        let failed = json!({"status": "failed", "error-desc": "Connection reset"});
        let (src_fake, dst_fake) = (source(failed), destination("5555"));
        let (src, dst) = (connect(&src_fake), connect(&dst_fake));
        let pair = fast(MigrationPair::new(src.client(), dst.client()));
        let listen: std::net::SocketAddr = "127.0.0.1:4444".parse().expect("address");
        match src.block_on(pair.listen_tcp(listen)) {
            Err(MigrationError::NotListening { expected, listening }) => {
                assert_eq!((expected, listening), (4444, vec![5555]))
            }
            other => panic!("expected NotListening, got {other:?}"),
        }
        let any: std::net::SocketAddr = "127.0.0.1:0".parse().expect("address");
        assert_eq!(src.block_on(pair.listen_tcp(any)).expect("any port"), 5555);
        match src.block_on(pair.migrate("tcp:127.0.0.1:5555", T)) {
            Err(e @ MigrationError::Failed { .. }) => {
                assert_eq!(e.to_string(), "migration failed: Connection reset")
            }
            other => panic!("expected Failed, got {other:?}"),
        }
        // The destination is not waited for after a failure.
        assert!(!dst_fake
            .commands()
            .iter()
            .any(|(name, _)| name == "query-status"));
    }
}
