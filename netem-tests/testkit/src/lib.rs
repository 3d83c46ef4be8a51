//! Ferry's test kit: the helpers every crate's tests and benchmarks share, written once.
//!
//! **Dev-only.** Use it from `[dev-dependencies]` only; the one exception is `ferry-netem`,
//! which is itself test infrastructure (emulated WAN sites for tests and benchmarks). Nothing
//! shipped may depend on it. `publish = false`.
//!
//! One job per module (`pki`, `gateway_config` and `loopback` need the default `gateway`
//! feature, the only part that depends on ferry-gateway):
//! - [`rng`]: the one deterministic test random generator (xorshift64*).
//! - [`sys`]: root check, entering a network namespace, running a command, and the other small
//!   libc wrappers tests need.
//! - [`capture`]: an `AF_PACKET` socket capturing the frames seen on one interface.
//! - [`pki`]: certificates for a set of sites from one CA (the gateway's own `certs` code).
//! - [`gateway_config`]: gateway configuration files written as TOML and loaded through the real
//!   parser.
//! - [`api_client`]: a host-plugin's session with a gateway's local API (UNIX socket or TCP
//!   with its token).
//! - [`loopback`]: gateways on loopback and TCP endpoints that check what crosses them.
//! - [`qemu_stream`]: synthetic QEMU migration streams (main channel and multifd).
//! - [`sync`]: test locks that survive a panicked test.
//! - [`tracing`]: the tracing subscriber for tests and for benchmarks.
//! - [`bench`]: benchmark settings from the environment.

#[cfg(feature = "gateway")]
pub mod api_client;
pub mod bench;
pub mod capture;
pub mod error;
#[cfg(feature = "gateway")]
pub mod gateway_config;
#[cfg(feature = "gateway")]
pub mod loopback;
#[cfg(feature = "gateway")]
pub mod pki;
pub mod qemu_stream;
pub mod rng;
pub mod sync;
pub mod sys;
pub mod tracing;

pub use error::KitError;
