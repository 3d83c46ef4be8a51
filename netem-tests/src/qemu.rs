//! Real QEMU guests for Ferry's tests: a tiny test kernel, a process handle
//! (with a QMP session of the `ferry-qmp` client behind blocking calls), and
//! helpers to migrate the guest or capture the raw migration streams QEMU sends.
//!
//! # The test guest
//!
//! `netem-tests/guest/guest.asm` is a 32-bit multiboot kernel assembled with
//! `nasm` at test time ([`GuestImage::build`]); no binary is committed. It
//! prints `tick N` on COM1 every ~100 ms of guest time ([`GuestConfig::tick_jiffies`];
//! the same lines go to COM2, a heartbeat for [`QemuConfig::heartbeat_socket`]), keeps rewriting
//! pseudo-random pages (the dirty-rate knob, [`GuestConfig::dirty_pages_per_tick`]),
//! keeps a region of duplicate pattern pages and a region of zero pages, and
//! periodically verifies all of it (`verify ok tick=N sum=XXXXXXXX`). See
//! `netem-tests/guest/README.md` for the serial protocol.
//!
//! # QMP and migrations
//!
//! [`Qemu::qmp`] is a [`ferry_qmp::BlockingQmp`]: the typed client the
//! host-plugin uses, with blocking methods. The migrations these helpers run
//! ([`migrate_local`], [`migrate_over_wan`]: QEMU without the host-plugin, the
//! baseline of the benchmarks) are thin callers of [`ferry_qmp::migration`],
//! the one implementation of "migrate between two QMP endpoints"; the modes
//! ([`MigrationMode`](ferry_qmp::migration::MigrationMode)) and the statistics
//! ([`MigrationInfo`](ferry_qmp::MigrationInfo), [`RamStats`](ferry_qmp::RamStats))
//! are ferry-qmp's types.
//!
//! # Typical use
//!
//! ```no_run
//! use std::time::Duration;
//! use ferry_netem::qemu::{self, GuestImage, Qemu, QemuConfig};
//! use ferry_qmp::{migration::MigrationMode, MigrationStatus};
//!
//! # fn main() -> Result<(), qemu::QemuError> {
//! let image = GuestImage::build()?;
//! let mut src = Qemu::spawn(&image, &QemuConfig::default(), None)?;
//! src.serial().wait_for_tick(3, Duration::from_secs(30))?;
//! let mut dst = Qemu::spawn(&image, &QemuConfig::default().held_at_cutover(), None)?;
//! let info = qemu::migrate_local(&mut src, &mut dst, &MigrationMode::multifd(2), Duration::from_secs(60))?;
//! assert_eq!(info.status(), MigrationStatus::Completed);
//! # Ok(()) }
//! ```
//!
//! To look at real QEMU wire bytes, use [`capture_migration_stream`].
//!
//! # RAM equality at cutover
//!
//! Every VM keeps its RAM in a file under `/dev/shm` ([`QemuConfig::ram_in_file`]); migration
//! destinations start held ([`QemuConfig::held_at_cutover`], `-S`). [`migrate_local`] and
//! [`migrate_over_wan`] compare both guests' RAM page by page once QEMU completed, before the
//! destination runs, and fail with [`QemuError::RamMismatch`] on any difference
//! ([`ram_check`]).
//!
//! For migrations of a real Linux (Debian's kernel, a busybox initramfs with
//! a realistic memory mix) use [`LinuxGuest`] instead of [`GuestImage::build`].
//!
//! Everything these helpers start (QEMU processes, sockets, temporary
//! directories) is killed or removed when its handle is dropped, also while a
//! test panics.

mod capture;
mod image;
mod linux_guest;
mod migrate;
mod page_census;
pub mod ram_check;
mod serial;
mod vm;
mod wan_migration;

use std::io;
use std::path::PathBuf;
use std::time::Duration;

pub use capture::{capture_migration_stream, capture_migration_stream_with, CapturedMigration};
pub use image::{GuestConfig, GuestImage, GUEST_SOURCE};
pub use linux_guest::{
    LinuxGuest, LinuxGuestConfig, LinuxGuestFiles, LINUX_GUEST_APT_HINT, LINUX_INIT_SCRIPT,
};
pub use migrate::migrate_local;
pub use page_census::PageCensus;
pub use ram_check::{check_ram_then_resume, compare_ram, PageDifference, RamComparison};
pub use serial::{SerialLog, VerifyReport};
pub use vm::{Incoming, Qemu, QemuConfig};
pub use wan_migration::{
    migrate_over_wan, migrate_over_wan_with, WanMigrationOptions, WanMigrationReport, WanRoute,
};

/// Errors of the QEMU test harness.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// A file or socket operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying OS error.
        #[source]
        source: io::Error,
    },
    /// A required tool is not installed and could not be installed.
    #[error("required tool `{tool}` is not available: {reason}")]
    ToolMissing {
        /// The missing program.
        tool: String,
        /// Why it could not be found or installed, with a hint.
        reason: String,
    },
    /// An external command (nasm, apt-get) failed.
    #[error("command `{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line, for humans.
        command: String,
        /// Exit status.
        status: String,
        /// What it printed on stderr (trimmed).
        stderr: String,
    },
    /// QEMU exited while we were waiting for it.
    #[error("QEMU `{name}` exited early ({status}); stderr: {stderr}")]
    Exited {
        /// The VM's name.
        name: String,
        /// Exit status, as far as known.
        status: String,
        /// The last lines QEMU printed on stderr.
        stderr: String,
    },
    /// Something did not happen in time.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long we waited.
        after: Duration,
    },
    /// A QMP command failed, timed out or got a reply of the wrong shape, or
    /// the QMP connection broke.
    #[error(transparent)]
    Qmp(#[from] ferry_qmp::QmpError),
    /// A migration failed (QEMU's `error-desc` included) or its destination
    /// did not listen where asked.
    #[error(transparent)]
    Migration(ferry_qmp::migration::MigrationError),
    /// Something we did not expect (a guest that reported corruption, a
    /// malformed serial line or memory dump).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// At cutover the destination's RAM differed from the source's ([`ram_check`]).
    #[error("{0}")]
    RamMismatch(Box<RamComparison>),
}

impl From<ferry_qmp::migration::MigrationError> for QemuError {
    fn from(e: ferry_qmp::migration::MigrationError) -> Self {
        match e {
            ferry_qmp::migration::MigrationError::Qmp(e) => QemuError::Qmp(e),
            other => QemuError::Migration(other),
        }
    }
}

impl QemuError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        QemuError::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn timeout(what: impl Into<String>, after: Duration) -> Self {
        QemuError::Timeout {
            what: what.into(),
            after,
        }
    }
}

/// Result alias of this module.
pub type Result<T, E = QemuError> = std::result::Result<T, E>;

/// The QEMU binary to use: `$FERRY_QEMU` if set, else `qemu-system-x86_64`
/// found on `PATH`. `None` if neither exists (tests should then skip).
///
/// This is the one place the harness picks its QEMU. `scripts/test.sh` points `FERRY_QEMU` at
/// Debian 12's QEMU 7.2 unpacked beside the installed 10.0
/// (`/var/cache/ferry/qemu-7.2/root/usr/bin/qemu-system-x86_64`) for its smoke test: QEMU
/// finds its modules, ROMs and BIOS relative to the binary (`../lib`, `../share`).
pub fn qemu_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FERRY_QEMU") {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    find_in_path("qemu-system-x86_64")
}

/// True if a QEMU binary is available ([`qemu_binary`]).
pub fn qemu_available() -> bool {
    qemu_binary().is_some()
}

/// Why QEMU guests in network namespaces cannot run here (not root, or no QEMU), if they
/// cannot: the message a skipped test or benchmark prints.
pub fn unavailable_reason() -> Option<&'static str> {
    if !ferry_testkit::sys::is_root() {
        Some("needs root (network namespaces)")
    } else if !qemu_available() {
        Some("qemu-system-x86_64 not installed (apt-get install qemu-system-x86)")
    } else {
        None
    }
}

/// Finds an executable on `PATH`.
pub(crate) fn find_in_path(program: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(program))
        .find(|p| {
            p.metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}
