//! Ferry's NBD (Network Block Device) protocol codec, both roles, sans-IO, plus a thin tokio
//! shell.
//!
//! **Why by hand.** The Rust NBD crates do not fit: `nbd` 0.3 is synchronous and "rather early",
//! `tokio-nbd` is server-only and GPL-2.0+, the `libnbd` bindings wrap an LGPL C library and do
//! their own IO. Ferry's gateways need a core that takes bytes in and gives typed messages out
//! (so the gateway decides where bytes go: into the tunnel, into a local buffer), that is bounded
//! by configured limits against a hostile peer, and that can be fuzzed. The subset QEMU uses is
//! small: the fixed newstyle handshake and about ten messages.
//!
//! **Roles.**
//! - [`Server`]: what QEMU's NBD client connects to (the source gateway will expose it to the
//!   mirror job). It answers the handshake itself from a [`ServerConfig`] and hands the
//!   application validated [`Request`]s; the application queues replies.
//! - [`Client`]: what the destination gateway uses against QEMU's `block-export-add` or a
//!   `qemu-nbd` export. It runs the handshake itself (structured replies, `base:allocation`,
//!   `NBD_OPT_GO`) and matches replies to requests by cookie.
//!
//! **Sans-IO, quinn-proto style.** Feed received bytes with `handle_input` (it returns how many
//! it took, and takes nothing while an event waits to be polled), take events with
//! `poll_event`, queue requests or replies with methods, take bytes to send with
//! `poll_transmit`. No sockets, clocks or threads in [`server`], [`client`] or [`wire`]; the
//! [`io`] module runs either role over any `AsyncRead + AsyncWrite`, and [`qemu_nbd`] starts a
//! `qemu-nbd` export (tests and the replica reader use it).
//!
//! **Bounds.** Every length from the peer is checked against [`Limits`] before anything is
//! allocated for it; a violation is a typed [`Error`] and closes the connection. Nothing panics
//! on input (the `fuzz/` targets of this crate check it).
//!
//! **Not spoken** (answered "unsupported" or refused): TLS, extended headers, `NBD_CMD_CACHE`,
//! `NBD_CMD_RESIZE`, metadata contexts other than `base:allocation`, old-style handshakes.

pub mod client;
pub mod io;
pub mod loopback;
pub mod qemu_nbd;
pub mod server;
pub mod wire;

pub use client::{Client, ClientConfig, ClientEvent, Reply, ReplyData, ReplyError};
pub use server::{ReadChunk, Request, RequestKind, Server, ServerConfig, ServerEvent};

/// A request's cookie (the spec's "handle"): the client picks it, the reply echoes it.
pub type Cookie = u64;

/// QEMU's `NBD_MAX_BUFFER_SIZE`: the largest request payload QEMU sends or accepts.
pub const DEFAULT_MAX_PAYLOAD: u32 = 32 << 20;

/// Hard limits on what a peer may make us hold. Defaults follow QEMU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest request or reply payload (a write's data, a read's length, a reply chunk).
    pub max_payload: u32,
    /// Largest option (handshake) payload or option reply.
    pub max_option: u32,
    /// Longest export name or metadata context name (QEMU's `NBD_MAX_STRING_SIZE`).
    pub max_name: u32,
    /// Most requests in flight: a server stops taking input at this many unanswered requests, a
    /// client refuses to send more.
    pub max_in_flight: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_payload: DEFAULT_MAX_PAYLOAD, max_option: 64 << 10, max_name: 4096, max_in_flight: 64 }
    }
}

/// Size and transmission flags of an export, as `NBD_INFO_EXPORT` carries them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags (`wire::TFLAG_*`).
    pub flags: u16,
    /// Block size constraints, when the server sent `NBD_INFO_BLOCK_SIZE`.
    pub block_size: Option<BlockSize>,
}

impl ExportInfo {
    /// Whether the export refuses writes.
    pub fn read_only(&self) -> bool {
        self.flags & wire::TFLAG_READ_ONLY != 0
    }
}

/// Block size constraints (`NBD_INFO_BLOCK_SIZE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSize {
    /// Minimum block size (alignment of requests).
    pub minimum: u32,
    /// Preferred block size.
    pub preferred: u32,
    /// Largest payload of one request.
    pub maximum: u32,
}

/// Command flags of a request (`NBD_CMD_FLAG_*`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommandFlags(pub u16);

impl CommandFlags {
    /// `NBD_CMD_FLAG_FUA`: the write is durable before the reply.
    pub const FUA: u16 = 1 << 0;
    /// `NBD_CMD_FLAG_NO_HOLE`: write zeroes without punching a hole.
    pub const NO_HOLE: u16 = 1 << 1;
    /// `NBD_CMD_FLAG_DF`: don't fragment a read reply.
    pub const DF: u16 = 1 << 2;
    /// `NBD_CMD_FLAG_REQ_ONE`: one extent per context is enough.
    pub const REQ_ONE: u16 = 1 << 3;

    /// Whether `flag` is set.
    pub fn has(self, flag: u16) -> bool {
        self.0 & flag != 0
    }
}

/// One extent of a `base:allocation` block status reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Bytes this extent covers.
    pub length: u32,
    /// `Extent::HOLE` and/or `Extent::ZERO`.
    pub flags: u32,
}

impl Extent {
    /// `NBD_STATE_HOLE`: not allocated.
    pub const HOLE: u32 = 1;
    /// `NBD_STATE_ZERO`: reads as zeroes.
    pub const ZERO: u32 = 2;

    /// Whether this extent reads as zeroes.
    pub fn is_zero(&self) -> bool {
        self.flags & Self::ZERO != 0
    }
}

/// Errno values NBD carries (its own numbering, equal to Linux's for these).
pub mod errno {
    /// Operation not permitted (a write to a read-only export).
    pub const EPERM: u32 = 1;
    /// Input/output error.
    pub const EIO: u32 = 5;
    /// Out of memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid argument (out of range, bad length, unknown command).
    pub const EINVAL: u32 = 22;
    /// No space left (a write past the end).
    pub const ENOSPC: u32 = 28;
    /// Value too large.
    pub const EOVERFLOW: u32 = 75;
    /// Not supported.
    pub const ENOTSUP: u32 = 95;
    /// Server shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

/// A protocol error: the connection cannot continue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A magic number was wrong (the peer does not speak NBD, or we lost sync).
    #[error("bad {what} magic {found:#x}")]
    BadMagic {
        /// Which magic.
        what: &'static str,
        /// What arrived.
        found: u64,
    },
    /// A length from the peer exceeds our limit.
    #[error("{what} of {len} bytes exceeds the limit of {max}")]
    TooLong {
        /// Which length.
        what: &'static str,
        /// What the peer announced.
        len: u64,
        /// Our limit.
        max: u64,
    },
    /// A message's content is inconsistent (lengths that do not add up, a value out of range).
    #[error("malformed {what}")]
    Malformed {
        /// Which message.
        what: &'static str,
    },
    /// The client set handshake flags we do not know.
    #[error("unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
    /// The server does not speak fixed newstyle.
    #[error("the server does not offer fixed newstyle negotiation (flags {0:#x})")]
    NotFixedNewstyle(u16),
    /// The client asked (with `NBD_OPT_EXPORT_NAME`, which cannot be refused) for an export we
    /// do not have.
    #[error("no export named {0:?}")]
    UnknownExport(String),
    /// The server refused an option the client needs.
    #[error("the server refused option {option} with reply {reply:#x}: {message}")]
    OptionRefused {
        /// The option.
        option: u32,
        /// The error reply type.
        reply: u32,
        /// The server's message, if any.
        message: String,
    },
    /// A reply chunk names a cookie with no request in flight.
    #[error("reply for unknown cookie {0}")]
    UnknownCookie(Cookie),
    /// A reply chunk of a type that does not fit its request.
    #[error("unexpected reply chunk type {chunk_type} for cookie {cookie}")]
    UnexpectedChunk {
        /// The chunk type.
        chunk_type: u16,
        /// The cookie.
        cookie: Cookie,
    },
    /// A method was called in a state where it makes no sense (before the handshake ended, or a
    /// reply that does not match its request).
    #[error("{0}")]
    Usage(&'static str),
    /// Too many requests in flight.
    #[error("{0} requests in flight already")]
    TooManyInFlight(usize),
    /// A request outside the export.
    #[error("request at {offset} of {length} bytes is outside the export of {size} bytes")]
    OutOfRange {
        /// Offset.
        offset: u64,
        /// Length.
        length: u64,
        /// Export size.
        size: u64,
    },
    /// The connection ended (abort, disconnect, or an earlier error).
    #[error("the NBD connection is closed")]
    Closed,
}

/// Checks a name length from the wire against the limit.
pub(crate) fn check_name(len: u32, limits: &Limits, what: &'static str) -> Result<usize, Error> {
    if len > limits.max_name {
        return Err(Error::TooLong { what, len: len.into(), max: limits.max_name.into() });
    }
    Ok(len as usize)
}
