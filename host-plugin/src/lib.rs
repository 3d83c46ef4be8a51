//! Ferry host-plugin: runs next to QEMU on each hypervisor host and turns "move this VM to
//! site B" into a live migration through the site gateways.
//!
//! - [`migrate`]: the source side (`ferry-host migrate`): one command, one VM.
//! - [`serve`]: the destination side (`ferry-host serve`): prepares incoming VMs, announces them.
//! - [`control`]: the channel the two talk over, a forward through the gateways (its messages
//!   are `ferry_api::control`).
//! - [`gateway_api`]: the client of the local gateway's API (forwards, drain-rate counters;
//!   messages and framing from `ferry_api`).
//! - [`settings`]: the QEMU capabilities and parameters Ferry picks (and what undoes them).
//! - [`exclusive`]: one `migrate` per VM per host (locks on its QMP socket and name).
//! - [`watchdog`]: the child that cancels and restores if `migrate` dies.
//! - [`incoming`]: the destination's inquiry and discard of an incoming QEMU (quit, else SIGKILL).
//! - [`resolve`]: `ferry-host resolve`, which starts exactly one VM after an undecided end.
//! - [`session`]: the sans-IO state machines of both sides' lifecycles (when the source VM
//!   may run again), driven by [`migrate`] and [`serve`].
//! - [`convergence`]: the sans-IO controller that keeps QEMU's view of the WAN true and
//!   throttles guests that outrun it.
//! - [`heartbeat`]: guest-observed downtime from a heartbeat on a serial port.
//! - [`progress`]: progress display and the final report.
//! - [`native`]: native migration of rust-vmm VMs (KVM dirty log, vm-memory), phase 1: the
//!   QEMU-shaped stream, vCPU state, the reference microVM and a local pre-copy.
//! - [`announce`]: re-announcing a VM's MACs on the destination L2 after cutover (RARP as QEMU's
//!   announce-self, gratuitous ARP, unsolicited neighbour advertisements) over AF_PACKET.
//!
//! QEMU is driven through `ferry_qmp` (the workspace's one QMP client). The host-plugin does not
//! link the gateway: what the two share is the `ferry_api` crate (API and control messages,
//! JSON-lines framing) and `ferry_units` (durations on the command line).

pub mod announce;
pub mod control;
pub mod convergence;
pub mod exclusive;
pub mod gateway_api;
pub mod heartbeat;
pub mod incoming;
pub mod migrate;
pub mod native;
pub mod progress;
pub mod resolve;
pub mod serve;
pub mod session;
pub mod settings;
pub mod watchdog;

/// Version string reported by `ferry-host --version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
