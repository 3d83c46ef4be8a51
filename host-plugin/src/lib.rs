//! Ferry host-plugin: runs next to QEMU on each hypervisor host and turns "move this VM to
//! site B" into a live migration through the site gateways.
//!
//! Orchestration (QMP, convergence, MAC re-announcement) arrives with later issues; this crate
//! currently only provides the binary skeleton so the workspace has its final shape.

pub mod announce;

/// Version string reported by `ferry-host --version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
