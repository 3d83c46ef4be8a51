//! Emulated WAN sites for Ferry's tests and benchmarks.
pub mod qemu;
