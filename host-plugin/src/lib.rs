//! Ferry host-plugin: runs next to QEMU on each hypervisor host and turns "move this VM to
//! site B" into a live migration through the site gateways.
//!
//! Building blocks so far:
//! - [`qmp`]: the async QMP client (typestate handshake, typed commands, bounded events).
//! - [`announce`]: re-announcing a VM's MACs on the destination L2 after cutover (RARP as QEMU's
//!   announce-self, gratuitous ARP, unsolicited neighbour advertisements) over AF_PACKET.
//!
//! Not yet: the `migrate`/`serve` orchestration, the control channel through the gateways,
//! convergence control and guest-downtime measurement.

pub mod announce;
pub mod qmp;

/// Version string reported by `ferry-host --version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
