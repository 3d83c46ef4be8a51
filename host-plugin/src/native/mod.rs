//! Native live migration of rust-vmm VMs (KVM through kvm-ioctls, guest memory through
//! vm-memory), phase 1 of issue 14: the parts that stand on their own.
//!
//! - [`bitmap`]: a slot's dirty pages (KVM's dirty log ∪ vm-memory's bitmap) as page ranges; pure.
//! - [`stream`]: the QEMU-shaped native migration stream, writer and reader; sans-IO.
//! - [`vcpu_state`]: a vCPU's state, saved, encoded (versioned), checked (CPUID) and restored.
//! - [`microvm`]: the reference microVM (one slot with dirty logging, one vCPU thread, a tiny
//!   embedded guest), with pause by signal kick + immediate exit.
//! - [`precopy`]: a blocking pre-copy from a microVM into a byte sink, and its receiving side.
//! - [`control`]: `ferry-host microvm run`, a microVM behind a JSON-lines control socket.
//!
//! Dependencies point one way: `control`, `precopy` → `microvm` → `vcpu_state`, `bitmap`;
//! `precopy` → `stream`. Only `bitmap` and `stream` build on every platform.

pub mod bitmap;
pub mod stream;

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
pub mod control;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
pub mod microvm;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
pub mod precopy;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
pub mod vcpu_state;
