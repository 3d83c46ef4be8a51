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
//!    `running`; returns the source's final `query-migrate` (with its [`crate::RamStats`],
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
    /// `running`.
    pub wall_time: Duration,
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
    /// source is `completed` ([`wait_for_completion`]) and the destination `running`.
    pub async fn migrate(
        &self,
        uri: &str,
        timeout: Duration,
    ) -> Result<CompletedMigration, MigrationError> {
        let started = Instant::now();
        self.source.migrate(uri).await?;
        let info = wait_for_completion(self.source, self.poll, timeout).await?;
        self.destination
            .wait_status(&RunState::Running, self.poll, timeout)
            .await?;
        Ok(CompletedMigration {
            info,
            wall_time: started.elapsed(),
        })
    }
}
