//! Emulated WAN sites for Ferry's tests and benchmarks.
//!
//! [`Wan::builder`] creates two Linux network namespaces ("sites") joined by
//! an emulated WAN link with a round-trip time, jitter, bottleneck rate and
//! drop-tail queue, random loss and an optional outage window.  The link is
//! either the kernel's `tc netem` on a veth pair or, where the kernel lacks
//! `sch_netem`, the userspace emulator of [`userspace_link`] forwarding
//! between two TUN devices.  Everything needs root.
//!
//! ```no_run
//! use std::time::Duration;
//! use ferry_netem::{Backend, Wan};
//!
//! let wan = Wan::builder()
//!     .rtt(Duration::from_millis(150))
//!     .rate_bps(1_000_000_000)
//!     .loss(0.001)
//!     .backend(Backend::Auto)
//!     .up()?;
//! let addr_b = wan.site_b().addr();
//! let server = wan.site_b().spawn_thread(move || {
//!     let sock = std::net::UdpSocket::bind((addr_b, 9000))?;
//!     let mut buf = [0u8; 64];
//!     sock.recv_from(&mut buf).map(|(n, _)| n)
//! })?;
//! let status = wan.site_a().command("true").status();
//! # let _ = (server, status);
//! # Ok::<(), ferry_netem::Error>(())
//! ```

pub mod bulk;
mod command;
pub mod error;
pub mod gateway_pair;
pub mod link_params;
pub mod naming;
pub mod netem_backend;
pub mod netns;
pub mod qemu;
pub mod tun;
pub mod userspace_link;
pub mod wan;

pub use error::{Error, Result};
pub use link_params::LinkParams;
pub use userspace_link::LinkCounters;
pub use wan::{down_named, down_prefix, Backend, LinkStats, Site, Wan, WanBuilder, WanConfig};
