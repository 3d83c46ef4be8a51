//! A direct local migration between two VMs: a thin caller of
//! [`ferry_qmp::migration`].

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use ferry_qmp::migration::{MigrationMode, MigrationPair, MigrationSetup};
use ferry_qmp::MigrationInfo;

use super::{check_ram_then_resume, Qemu, Result};

/// Migrates `src` into `dst` over loopback TCP and waits until the source
/// reports `completed`, checks RAM equality at cutover
/// ([`super::check_ram_then_resume`]) and resumes the destination.
///
/// `dst` must have been started with [`super::QemuConfig::held_at_cutover`].
/// Sets `mode` on both sides (other parameters, e.g. `max-bandwidth`, are
/// left as they are: set them on `src.qmp()` beforehand), starts
/// `migrate-incoming tcp:127.0.0.1:0` on `dst`, reads the chosen port, and
/// runs `migrate` on `src`. Returns the source's final `query-migrate`.
/// A failed migration is an error ([`super::QemuError::Migration`] with
/// QEMU's `error-desc`), and so is RAM that differs ([`super::QemuError::RamMismatch`]; the
/// destination is left paused).
pub fn migrate_local(
    src: &mut Qemu,
    dst: &mut Qemu,
    mode: &MigrationMode,
    timeout: Duration,
) -> Result<MigrationInfo> {
    let (source, destination) = (src.qmp(), dst.qmp());
    let pair = MigrationPair::new(source.client(), destination.client());
    let completed = source.block_on(async {
        pair.configure(&MigrationSetup::new(mode.clone())).await?;
        let port = pair
            .listen_tcp(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await?;
        let uri = format!("tcp:127.0.0.1:{port}");
        tracing::info!(src = src.name(), dst = dst.name(), %uri, ?mode, "migrating");
        pair.migrate(&uri, timeout).await
    })?;
    check_ram_then_resume(src, dst, timeout)?;
    let info = completed.info;
    tracing::info!(
        total_ms = ?info.total_time,
        downtime_ms = ?info.downtime,
        transferred = info.ram.as_ref().map(|r| r.transferred),
        "migration completed"
    );
    Ok(info)
}
