//! Ferry's QMP client: async (tokio), typed, and strict about what it reads; used by the
//! host-plugin and by the test harness alike.
//!
//! QEMU's QEMU Machine Protocol is line-delimited JSON over a unix socket. A session goes
//! through two states, modelled as two types:
//!
//! 1. [`Handshake`]: connected, greeting (QEMU version, capabilities) read.
//! 2. [`Qmp`]: `qmp_capabilities` done; commands may be issued.
//!
//! ```no_run
//! # async fn demo() -> Result<(), ferry_qmp::QmpError> {
//! use ferry_qmp::{Handshake, QmpConfig};
//! let hs = Handshake::connect_unix("/run/ferry/vm1.qmp", QmpConfig::default()).await?;
//! println!("QEMU {}", hs.greeting().version.qemu);
//! let qmp = hs.negotiate().await?;
//! qmp.stop().await?;
//! # Ok(()) }
//! ```
//!
//! Every command carries an id and its reply is matched by id, so commands from several tasks
//! may be in flight at once. Asynchronous events (`STOP`, `RESUME`, `MIGRATION`, ...) may
//! arrive between any two lines; a reader task puts them in a bounded buffer (oldest dropped
//! and counted when full) read with [`Qmp::next_event`] / [`Qmp::wait_event`].
//!
//! Layout, each module one job, dependencies pointing down the list:
//! - [`migration`]: drives one migration between two sessions (same settings on both ends,
//!   `migrate-incoming`, `migrate`, polling to `completed`) when one caller holds both QMP
//!   sessions: the harness's "QEMU without the host-plugin" baselines and captures. (The
//!   host-plugin holds only one end; its lifecycle is `ferry-host`'s `session` module.)
//! - [`known_issues`]: QEMU versions and modes that make migrations unsafe (pure; from
//!   `query-version` and `query-kvm`), for `ferry-host` to refuse or warn.
//! - [`blocking`]: [`BlockingQmp`], the typed client behind blocking calls, for synchronous
//!   callers (the test harness).
//! - `client`: the async shell ([`Handshake`], [`Qmp`]); `events`: its bounded event buffer.
//! - [`types`]: the typed commands, replies and events, and [`UNLIMITED_BANDWIDTH`].
//! - [`codec`]: the sans-IO wire core (framing with a line-length bound, classification,
//!   encoding).
//! - [`error`]: the error type.
//!
//! Note that QEMU serves one client per QMP socket: give QEMU a dedicated
//! `-qmp unix:PATH,server=on,wait=off` for Ferry (the option may be repeated).

pub mod blocking;
mod client;
pub mod codec;
pub mod error;
mod events;
#[cfg(test)]
mod fake_qemu;
pub mod known_issues;
pub mod migration;
pub mod types;

pub use blocking::BlockingQmp;
pub use client::{Handshake, Qmp, QmpConfig};
pub use error::{QmpError, Result};
pub use types::{
    CapabilityState, Event, Greeting, KvmInfo, MacAddress, MigrationCapability, MigrationInfo,
    MigrationParameters, MigrationStatus, MultifdCompression, QmpEvent, RamStats, RunState,
    RxFilterInfo, SocketAddress, StatusInfo, VersionInfo, VersionTriple, UNLIMITED_BANDWIDTH,
};
