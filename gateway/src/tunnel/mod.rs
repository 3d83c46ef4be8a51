//! The inter-site tunnel: one mutually authenticated QUIC connection per peer site, carrying
//! forwarded TCP connections as flows.
//!
//! - [`protocol`]: the wire format (sans-IO).
//! - [`reorder`]: reassembly of a flow direction striped over lanes (sans-IO).
//! - [`transport`]: QUIC and socket sizing from the `[link]` description.
//! - [`congestion`]: the loss-tolerant, queue-aware congestion controller.
//! - `peers`: which connection serves which peer; dialing, accepting, tie-breaking, reconnecting.
//! - `link`: one connection: opening and accepting flows and lanes.
//! - `flow`: pumping one flow's bytes both ways.
//!
//! Interface for the layers above (forwards, the API): [`Tunnel`] (connection permits, path
//! stats, the flow log; draining and closing for a graceful stop), [`PeerTable`] and
//! [`PeerLink`] (carrying a connection), and what the tunnel
//! reports about a flow: its [`FlowCounters`], to whichever [`FlowObserver`]
//! the carrier passed. The tunnel knows nothing of forwards or the API. On codec flows it runs
//! the `ferry_codec` encoder or decoder with the stores of [`crate::store`].

pub mod congestion;
mod flow;
mod idle;
mod link;
mod peers;
pub mod protocol;
pub mod reorder;
pub mod transport;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use flow::{FlowCounters, FlowRecord};
pub use link::PeerLink;
pub use peers::{PeerTable, Tunnel, SHUTDOWN_CLOSE_CODE, SHUTDOWN_REASON};
use transport::LinkSizing;

/// Told when a flow a carrier (e.g. a forward) handed to the tunnel starts and ends, so the
/// carrier can follow its flows' live [`FlowCounters`].
pub trait FlowObserver: Send + Sync {
    /// The flow started; `counters` stay live until it finishes.
    fn flow_started(&self, counters: &Arc<FlowCounters>);
    /// The flow ended, with `result`; `counters` hold its final values.
    fn flow_finished(&self, counters: &Arc<FlowCounters>, result: &Result<(), FlowError>);
}

/// The right to carry one forwarded connection (`[limits] max_connections`); held for the
/// connection's life.
#[derive(Debug)]
pub struct ConnectionPermit(#[allow(dead_code)] OwnedSemaphorePermit);

/// The QUIC path to a peer as quinn sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PathStats {
    /// Smoothed round-trip time.
    pub rtt: Duration,
    /// Congestion window, bytes.
    pub cwnd: u64,
    /// Packets sent on the connection so far.
    pub sent_packets: u64,
    /// Packets declared lost so far.
    pub lost_packets: u64,
}

/// Why a flow ended without completing.
#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    /// The tunnel connection failed.
    #[error("tunnel connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Writing to a QUIC stream failed.
    #[error("tunnel stream write failed: {0}")]
    Write(#[from] quinn::WriteError),
    /// Reading from a QUIC stream failed.
    #[error("tunnel stream read failed: {0}")]
    Read(#[from] quinn::ReadError),
    /// The peer violated the protocol.
    #[error("protocol error from peer: {0}")]
    Protocol(#[from] protocol::ProtocolError),
    /// The peer sent data contradicting earlier data.
    #[error("inconsistent data from peer: {0}")]
    Reorder(#[from] reorder::ReorderError),
    /// A stream ended in the middle of a record.
    #[error("tunnel stream ended mid-record")]
    Truncated,
    /// Reading the local TCP socket failed.
    #[error("local connection read failed: {0}")]
    LocalRead(std::io::Error),
    /// Writing the local TCP socket failed.
    #[error("local connection write failed: {0}")]
    LocalWrite(std::io::Error),
    /// The peer gateway refused the flow.
    #[error("peer refused the connection: {0}")]
    Refused(String),
    /// The peer gateway aborted the flow.
    #[error("peer aborted the connection: {0}")]
    PeerReset(String),
    /// The codec rejected the peer's stream (corrupt, or a page it cannot resolve).
    #[error("codec: {0}")]
    Decode(#[from] ferry_codec::DecodeError),
    /// The peer's decoder asked for a page this gateway did not keep (should not happen: every
    /// advertised page referred to is kept until acknowledged). The flow fails safely.
    #[error("peer asked for page {0}, which is not retained here")]
    CannotResupply(ferry_codec::PageDigest),
    /// Our decoder waited this long for a page it asked the peer for.
    #[error("peer did not supply a missing page within {0:?}")]
    SupplyTimeout(std::time::Duration),
    /// What this gateway wrote to its local socket does not hash to the digest the peer sent
    /// with Fin (of what it read from its own): the bytes were changed on the way. The local
    /// connection is reset, never ended cleanly.
    #[error("end-to-end digest mismatch: the {tcp_out} bytes delivered hash to {written}, the peer read bytes hashing to {sent}")]
    DigestMismatch {
        /// Bytes written to the local socket.
        tcp_out: u64,
        /// The peer's digest.
        sent: blake3::Hash,
        /// Ours.
        written: blake3::Hash,
    },
    /// An out-of-place message.
    #[error("unexpected message: {0}")]
    Unexpected(String),
    /// No byte moved either way for `[limits] idle_timeout`.
    #[error("idle for {0:?} (limits.idle_timeout): closed")]
    Idle(std::time::Duration),
    /// The flow was cancelled: its carrier closed it (a forward whose API session ended), or
    /// one of its streams failed.
    #[error("flow cancelled")]
    Cancelled,
}

/// Gateway-wide counters, readable while the gateway runs.
#[derive(Debug, Default)]
pub struct TunnelStats {
    /// Flows that completed in both directions.
    pub flows_completed: AtomicU64,
    /// Flows that failed or were refused.
    pub flows_failed: AtomicU64,
    /// Incoming connections refused (bad certificate, unknown site, handshake failure).
    pub peers_refused: AtomicU64,
    /// Tunnel connections established (dialed or accepted, before tie-breaking).
    pub connections_established: AtomicU64,
    /// Flow directions whose delivered bytes did not match the peer's end-to-end digest
    /// ([`FlowError::DigestMismatch`]); those flows also count as failed.
    pub digest_mismatches: AtomicU64,
}

/// A snapshot of [`TunnelStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// See [`TunnelStats::flows_completed`].
    pub flows_completed: u64,
    /// See [`TunnelStats::flows_failed`].
    pub flows_failed: u64,
    /// See [`TunnelStats::peers_refused`].
    pub peers_refused: u64,
    /// See [`TunnelStats::connections_established`].
    pub connections_established: u64,
    /// See [`TunnelStats::digest_mismatches`].
    pub digest_mismatches: u64,
}

impl TunnelStats {
    /// Reads all counters.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            flows_completed: self.flows_completed.load(Ordering::Relaxed),
            flows_failed: self.flows_failed.load(Ordering::Relaxed),
            peers_refused: self.peers_refused.load(Ordering::Relaxed),
            connections_established: self.connections_established.load(Ordering::Relaxed),
            digest_mismatches: self.digest_mismatches.load(Ordering::Relaxed),
        }
    }
}

/// State shared by every connection of a gateway (private to the tunnel).
pub(crate) struct TunnelShared {
    /// Sizes derived from the link.
    sizing: LinkSizing,
    /// Permits for concurrently forwarded connections (both directions of forwarding).
    connections: Arc<Semaphore>,
    /// The configured bound behind `connections`.
    max_connections: usize,
    /// Counters.
    stats: TunnelStats,
    /// Recently finished flows.
    flow_log: FlowLog,
    /// Destination page cache, shared by every decoder of this gateway.
    page_cache: Arc<crate::store::PageCache>,
    /// Most pages advertised to a peer.
    advertise_max_pages: usize,
    /// Session window our decoders accept (and advertise).
    session_window_pages: u64,
    /// Most bytes each of our decoders appends per call (`[limits] decoder_output`).
    decoder_output: usize,
    /// Bytes each of our encoders may keep of advertised pages for resupply (`[cache]
    /// resupply_budget`).
    resupply_budget: usize,
    /// What each peer may have us dial.
    egress: crate::egress::EgressPolicy,
    /// `[limits] idle_timeout`.
    idle_timeout: std::time::Duration,
    /// Cancelled when the gateway stops taking new flows ([`Tunnel::drain`]).
    draining: CancellationToken,
    /// One token per open flow (both directions), so a stop can wait for them.
    open_flows: TaskTracker,
}

impl TunnelShared {
    fn record_flow(&self, record: FlowRecord, result: &Result<(), FlowError>) {
        if matches!(result, Err(FlowError::DigestMismatch { .. })) {
            self.stats.digest_mismatches.fetch_add(1, Ordering::Relaxed);
        }
        let counter = if record.error.is_none() { &self.stats.flows_completed } else { &self.stats.flows_failed };
        counter.fetch_add(1, Ordering::Relaxed);
        flow::log_record(&record);
        self.flow_log.push(record);
    }
}

/// The most recent finished flows of a gateway, newest last. Cheap to clone; bounded.
#[derive(Clone, Debug, Default)]
pub struct FlowLog {
    records: Arc<Mutex<std::collections::VecDeque<FlowRecord>>>,
}

impl FlowLog {
    /// Records kept.
    pub const CAPACITY: usize = 1024;

    fn push(&self, record: FlowRecord) {
        let mut records = self.records.lock();
        if records.len() == Self::CAPACITY {
            records.pop_front();
        }
        records.push_back(record);
    }

    /// A copy of the records.
    pub fn records(&self) -> Vec<FlowRecord> {
        self.records.lock().iter().cloned().collect()
    }
}
