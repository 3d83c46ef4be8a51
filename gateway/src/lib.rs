//! Ferry site gateway: tunnels live-migration traffic between sites over one mutually
//! authenticated QUIC connection per peer.
//!
//! Data path of one forwarded connection:
//! ```text
//! QEMU ─TCP─▶ forward (ingress) ─▶ [codec: pages → frames] ─▶ tunnel (QUIC lanes)
//!      ─▶ [codec: frames → bytes] ─▶ egress (TCP dial) ─▶ QEMU
//! ```
//! Layout:
//! - [`config`]: the TOML configuration (its quantities are parsed by `ferry_units`).
//! - [`certs`], [`tls`]: the site PKI and mutual TLS.
//! - [`tunnel`]: QUIC endpoint, peers, flows, wire protocol.
//! - [`forward`]: TCP ingress listeners.
//! - [`codec`]: the page-aware QEMU migration stream codec (sans-IO).
//! - [`api`]: the server of the local API host-plugins open forwards and read counters through
//!   (its messages and framing are the `ferry_api` crate, which host-plugins use).
//! - [`gateway`]: ties them together.

pub mod api;
pub mod certs;
pub mod codec;
pub mod config;
pub mod forward;
pub mod gateway;
pub mod tls;
pub mod tunnel;

pub use config::Config;
pub use gateway::Gateway;
