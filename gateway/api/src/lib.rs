//! Ferry's local APIs as plain types and framing, shared by both ends so that neither links the
//! other: no sockets, no runtime, no QUIC or TLS here.
//!
//! - [`protocol`]: the gateway's local API, which host-plugins open forwards and read counters
//!   through (served by `ferry_gateway::api`, used by `ferry_host::gateway_api`).
//! - [`control`]: the messages the source and destination host-plugins exchange over a forward
//!   through the gateways (the channel itself is `ferry_host::control`).
//! - [`framing`]: bounded JSON lines over any async byte stream, which both of them use.

pub mod control;
pub mod framing;
pub mod protocol;
