//! Ferry site gateway.
pub mod codec;
