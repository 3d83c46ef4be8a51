//! Migration modes and a direct local migration between two VMs.

use std::time::Duration;

use serde_json::json;

use super::{MigrationInfo, Qemu, QemuError, QmpClient, Result};

/// Compression of multifd channels (`multifd-compression`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MultifdCompression {
    /// Raw pages.
    None,
    /// zlib (persistent deflate stream per channel).
    Zlib,
    /// zstd (persistent stream per channel).
    Zstd,
}

impl MultifdCompression {
    /// QMP name.
    pub fn as_str(self) -> &'static str {
        match self {
            MultifdCompression::None => "none",
            MultifdCompression::Zlib => "zlib",
            MultifdCompression::Zstd => "zstd",
        }
    }
}

/// Which channels a migration uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

    /// Sets the capabilities and parameters of this mode on one side
    /// (source and destination need the same multifd settings). Also sets
    /// `max-bandwidth` to `max_bandwidth` bytes/s if given.
    pub fn configure(&self, qmp: &mut QmpClient, max_bandwidth: Option<u64>) -> Result<()> {
        match self {
            MigrationMode::Main => qmp.migrate_set_capabilities(&[("multifd", false)])?,
            MigrationMode::Multifd {
                channels,
                compression,
            } => {
                qmp.migrate_set_capabilities(&[("multifd", true)])?;
                qmp.migrate_set_parameters(json!({
                    "multifd-channels": channels,
                    "multifd-compression": compression.as_str(),
                }))?;
            }
        }
        if let Some(bw) = max_bandwidth {
            qmp.migrate_set_parameters(json!({ "max-bandwidth": bw }))?;
        }
        Ok(())
    }
}

/// Migrates `src` into `dst` over loopback TCP and waits until the source
/// reports `completed` and the destination `running`.
///
/// `dst` must have been started with [`super::QemuConfig::incoming_defer`].
/// Sets `mode` on both sides (other parameters, e.g. `max-bandwidth`, are
/// left as they are: set them on `src.qmp()` beforehand), starts
/// `migrate-incoming tcp:127.0.0.1:0` on `dst`, reads the chosen port, and
/// runs `migrate` on `src`. Returns the source's final `query-migrate`.
/// A failed migration is an error ([`QemuError::Protocol`] with QEMU's
/// `error-desc`).
pub fn migrate_local(
    src: &mut Qemu,
    dst: &mut Qemu,
    mode: &MigrationMode,
    timeout: Duration,
) -> Result<MigrationInfo> {
    mode.configure(dst.qmp(), None)?;
    mode.configure(src.qmp(), None)?;
    dst.qmp().migrate_incoming("tcp:127.0.0.1:0")?;
    let port = dst
        .qmp()
        .query_migrate()?
        .listen_ports()
        .first()
        .copied()
        .ok_or_else(|| {
            QemuError::Protocol("destination did not report its listening port".into())
        })?;
    let uri = format!("tcp:127.0.0.1:{port}");
    tracing::info!(src = src.name(), dst = dst.name(), %uri, ?mode, "migrating");
    let info = migrate_and_wait(src, dst, &uri, timeout)?;
    tracing::info!(
        total_ms = ?info.total_time_ms,
        downtime_ms = ?info.downtime_ms,
        transferred = info.ram.as_ref().map(|r| r.transferred),
        "migration completed"
    );
    Ok(info)
}

/// Starts `src`'s migration to `uri` and waits until it completed and `dst` runs.
pub(crate) fn migrate_and_wait(src: &mut Qemu, dst: &mut Qemu, uri: &str, timeout: Duration) -> Result<MigrationInfo> {
    src.qmp().migrate(uri)?;
    let info = src.qmp().wait_migration(timeout)?;
    if info.status != "completed" {
        return Err(QemuError::Protocol(format!(
            "migration {}: {}",
            info.status,
            info.error_desc.as_deref().unwrap_or("no error-desc")
        )));
    }
    dst.qmp().wait_status("running", timeout)?;
    Ok(info)
}
