//! Ferry site gateway: tunnels live-migration traffic between sites over one mutually
//! authenticated QUIC connection per peer.
//!
//! Data path of one forwarded connection:
//! ```text
//! QEMU ─TCP─▶ forward (ingress) ─▶ [codec: pages → frames] ─▶ tunnel (QUIC lanes)
//!      ─▶ [codec: frames → bytes] ─▶ egress (TCP dial) ─▶ QEMU
//! ```
//! Layout, dependencies pointing down only:
//! - [`gateway`]: ties the pieces below together.
//! - [`api`]: the server of the local API host-plugins open forwards and read counters through;
//!   maps the forward's and the tunnel's own stats types to API messages (the messages and their
//!   framing are the `ferry_api` crate, which host-plugins use).
//! - [`forward`]: TCP ingress listeners; counts its flows through the tunnel's
//!   [`FlowObserver`](tunnel::FlowObserver).
//! - [`tunnel`]: QUIC endpoint, peers, flows, wire protocol. Knows nothing of forwards or the API;
//!   runs the codec on codec flows.
//! - [`store`]: the stores the codec works with (page cache and its directory, retained pages,
//!   the peer's advertised index).
//! - `ferry_codec` (its own crate): the page-aware QEMU migration stream codec (sans-IO).
//! - [`config`]: the TOML configuration (its quantities are parsed by `ferry_units`).
//!   [`certs`], [`tls`]: the site PKI and mutual TLS.

pub mod api;
pub mod certs;
pub mod config;
pub mod egress;
pub mod forward;
pub mod gateway;
pub mod store;
pub mod tls;
pub mod tunnel;

pub use config::Config;
pub use gateway::Gateway;
