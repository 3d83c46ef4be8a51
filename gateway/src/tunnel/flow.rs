//! One forwarded TCP connection ("flow") carried over the tunnel, both directions.
//!
//! After the open handshake both gateways run the same code: [`run_flow`] pumps the local TCP
//! socket's bytes out over lanes, reassembles the peer's lanes into the local socket, and speaks
//! the control stream (Fin, Reset, Ack). Bounded everywhere: the TCP socket is read only when a
//! lane writer is free, and lane readers stop reading QUIC when the reorder budget is spent, so
//! QUIC flow control slows the peer down.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use quinn::{RecvStream, SendStream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Mutex, Notify};
use tokio_util::sync::CancellationToken;

use ferry_codec::stream_hash::StreamHasher;
use ferry_codec::{Advertisement, CodecStats, Decoder, Encoder, PageDigest, WireOffset, MAX_REQUESTED_PAGES};

use crate::store::RetainedPages;
use crate::tunnel::protocol::{
    ChunkHeader, FlowKey, LaneHeader, LaneKind, Message, ProtocolError, CONNECTION_FLOW, FIN_MESSAGE_LEN,
    INITIAL_SEND_WINDOW, MAX_ADVERT, MESSAGE_HEADER_LEN,
};
use crate::tunnel::reorder::{Admission, Reassembler};
use crate::tunnel::idle::IdleWatch;
use crate::tunnel::FlowError;

/// Bytes read from the local socket per chunk.
const READ_CHUNK: usize = 64 << 10;
/// An encoder holding unsent input flushes after the source was quiet this long: long enough
/// to batch a busy stream, short against a WAN round trip.
const IDLE_FLUSH: Duration = Duration::from_millis(2);
/// Encoded output goes to the lanes in pieces of at most this size.
const WIRE_PIECE: usize = 256 << 10;
/// The receiver acknowledges delivered bytes after this many (see `Message::Ack`)...
const ACK_EVERY: u64 = 4 << 20;
/// ...or this long after its previous ack, whichever comes first: the ingress derives the
/// flow's drain rate and backlog from acks (reported to host-plugins), so a slow link must not
/// leave it blind for seconds.
const ACK_INTERVAL: Duration = Duration::from_millis(50);
/// How long a finished flow waits for the peer to close its control stream.
const LINGER: Duration = Duration::from_secs(10);
/// A decoder stalled on a missing page fails the flow (safely) if no requested page arrived for
/// this long: the peer lost track, or supplies cannot get through the connection's flow control.
const SUPPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// Application error code for streams stopped or reset because the flow failed.
pub const FLOW_ABORTED: u32 = 1;

/// Per-flow counters; the flow logs them when it ends.
#[derive(Debug, Default)]
pub struct FlowCounters {
    /// Bytes read from the local TCP socket.
    pub tcp_in: AtomicU64,
    /// Bytes written to the local TCP socket.
    pub tcp_out: AtomicU64,
    /// Bytes written to QUIC streams (payload plus Ferry framing).
    pub wan_out: AtomicU64,
    /// Bytes read from QUIC lanes (payload plus framing).
    pub wan_in: AtomicU64,
    /// Bytes of our direction the peer acknowledged as delivered (offsets in the direction's
    /// wire stream: encoded bytes for a codec flow, else the TCP bytes).
    pub acked: AtomicU64,
    /// Highest offset of our direction's wire stream handed to QUIC (same units as `acked`);
    /// `wire_sent - acked` is what is in flight or queued towards the peer.
    pub wire_sent: AtomicU64,
    /// How far the peer lets us send our direction (the highest `limit` of its Acks; see
    /// [`INITIAL_SEND_WINDOW`] before the first).
    send_limit: AtomicU64,
    /// blake3 of every byte read from the local socket, once our direction ended (the digest
    /// sent with Fin). Hashed by the outbound pump without a lock, or taken from its encoder.
    tcp_in_digest: parking_lot::Mutex<Option<blake3::Hash>>,
    /// blake3 of every byte written to the local socket, once the peer's direction ended.
    tcp_out_digest: parking_lot::Mutex<Option<blake3::Hash>>,
    /// Encoder statistics of a codec flow's outbound direction, set when it ends.
    pub codec: parking_lot::Mutex<Option<CodecStats>>,
    /// Codec miss path: pages our decoder asked the peer for (egress).
    pub pages_needed: AtomicU64,
    /// Codec miss path: pages sent to the peer's decoder again (ingress), or received (egress).
    pub pages_resupplied: AtomicU64,
}

/// The byte counters of a [`FlowCounters`] as they stand.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowTotals {
    /// See [`FlowCounters::tcp_in`].
    pub tcp_in: u64,
    /// See [`FlowCounters::tcp_out`].
    pub tcp_out: u64,
    /// See [`FlowCounters::wan_out`].
    pub wan_out: u64,
    /// See [`FlowCounters::wan_in`].
    pub wan_in: u64,
    /// See [`FlowCounters::acked`].
    pub acked: WireOffset,
    /// See [`FlowCounters::wire_sent`].
    pub wire_sent: WireOffset,
}

impl FlowCounters {
    /// The byte counters as they stand.
    pub fn totals(&self) -> FlowTotals {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        FlowTotals {
            tcp_in: get(&self.tcp_in),
            tcp_out: get(&self.tcp_out),
            wan_out: get(&self.wan_out),
            wan_in: get(&self.wan_in),
            acked: WireOffset::new(get(&self.acked)),
            wire_sent: WireOffset::new(get(&self.wire_sent)),
        }
    }

    /// A record of the flow as it stands.
    pub fn record(&self, peer: &str, key: FlowKey, started: Instant, result: &Result<(), FlowError>) -> FlowRecord {
        let digest = |h: &parking_lot::Mutex<Option<blake3::Hash>>| h.lock().map_or([0; 32], |d| *d.as_bytes());
        FlowRecord {
            peer: peer.to_owned(),
            flow: key.id,
            opened_locally: key.opened_locally,
            error: result.as_ref().err().map(|e| e.to_string()),
            tcp_in: self.tcp_in.load(Ordering::Relaxed),
            tcp_out: self.tcp_out.load(Ordering::Relaxed),
            wan_in: self.wan_in.load(Ordering::Relaxed),
            wan_out: self.wan_out.load(Ordering::Relaxed),
            tcp_in_digest: digest(&self.tcp_in_digest),
            tcp_out_digest: digest(&self.tcp_out_digest),
            duration: started.elapsed(),
            codec: self.codec.lock().clone(),
            pages_needed: self.pages_needed.load(Ordering::Relaxed),
            pages_resupplied: self.pages_resupplied.load(Ordering::Relaxed),
        }
    }
}

/// What a finished flow did; gateways keep the most recent ones (see
/// [`Gateway::flow_log`](crate::Gateway::flow_log)).
/// The digests let tests and operators check end to end that the destination received exactly
/// what the source sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowRecord {
    /// Peer site.
    pub peer: String,
    /// Flow number (the opener's).
    pub flow: u64,
    /// Whether this gateway accepted the TCP connection (ingress) rather than dialing (egress).
    pub opened_locally: bool,
    /// Why it failed; `None` if it completed.
    pub error: Option<String>,
    /// Bytes read from the local socket.
    pub tcp_in: u64,
    /// Bytes written to the local socket.
    pub tcp_out: u64,
    /// Bytes received from the WAN for this flow (payload + framing).
    pub wan_in: u64,
    /// Bytes sent on the WAN for this flow (payload + framing).
    pub wan_out: u64,
    /// blake3 of the bytes read from the local socket (all zero if that direction did not end).
    pub tcp_in_digest: [u8; 32],
    /// blake3 of the bytes written to the local socket (all zero if that direction did not end).
    pub tcp_out_digest: [u8; 32],
    /// Lifetime of the flow.
    pub duration: Duration,
    /// Encoder statistics, at the ingress of a codec flow.
    pub codec: Option<CodecStats>,
    /// Pages the decoder could not resolve and asked the peer for (egress of a codec flow).
    pub pages_needed: u64,
    /// Pages sent again at the peer's request (ingress) or received so (egress).
    pub pages_resupplied: u64,
}

/// The receiving half of one flow direction, shared with the lane readers.
#[derive(Debug)]
pub struct Inbound {
    reorder: parking_lot::Mutex<Reassembler>,
    /// Signalled when deliverable data or the end may be available.
    ready: Notify,
    /// Signalled when the reorder buffer has room again.
    space: Notify,
    /// The reorder budget: what our Acks let the peer send beyond what was delivered.
    budget: u64,
    /// The digest the peer sent with its Fin (of what it read from its local socket).
    end_digest: parking_lot::Mutex<Option<blake3::Hash>>,
    /// Cancelled when the flow ends or fails.
    pub cancel: CancellationToken,
    counters: Arc<FlowCounters>,
}

impl Inbound {
    /// A receiver with the given reorder budget; cancelling `cancel` fails the flow.
    pub fn new(budget: u64, counters: Arc<FlowCounters>, cancel: CancellationToken) -> Arc<Self> {
        Arc::new(Self {
            reorder: parking_lot::Mutex::new(Reassembler::new(budget)),
            budget,
            ready: Notify::new(),
            space: Notify::new(),
            end_digest: parking_lot::Mutex::new(None),
            cancel,
            counters,
        })
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, Reassembler> {
        // A panic elsewhere already failed this flow; the data is still consistent because
        // Reassembler never panics mid-update (and parking_lot's lock does not poison).
        self.reorder.lock()
    }

    /// Reads chunks from one lane into the reorder buffer until the lane ends.
    pub async fn read_lane(self: Arc<Self>, mut lane: RecvStream) -> Result<(), FlowError> {
        loop {
            let mut header = [0u8; ChunkHeader::LEN];
            if !read_exact_or_eof(&mut lane, &mut header).await? {
                return Ok(());
            }
            let chunk = ChunkHeader::decode(header)?;
            let mut data = BytesMut::zeroed(chunk.len as usize);
            if !read_exact_or_eof(&mut lane, &mut data).await? {
                return Err(FlowError::Truncated);
            }
            self.counters.wan_in.fetch_add((ChunkHeader::LEN + data.len()) as u64, Ordering::Relaxed);
            let data = data.freeze();
            loop {
                let space = self.space.notified();
                tokio::pin!(space);
                space.as_mut().enable();
                match self.lock().offer(chunk.offset, data.clone())? {
                    Admission::Accepted => {
                        self.ready.notify_one();
                        break;
                    }
                    Admission::Full => {}
                }
                tokio::select! {
                    _ = &mut space => {}
                    _ = self.cancel.cancelled() => return Ok(()),
                }
            }
        }
    }

    fn set_end(&self, length: WireOffset, digest: blake3::Hash) -> Result<(), FlowError> {
        *self.end_digest.lock() = Some(digest);
        self.lock().set_end(length)?;
        self.ready.notify_one();
        Ok(())
    }
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` on a clean end of stream before the first byte.
async fn read_exact_or_eof(stream: &mut RecvStream, buf: &mut [u8]) -> Result<bool, FlowError> {
    let mut filled = 0;
    while filled < buf.len() {
        match stream.read(&mut buf[filled..]).await? {
            Some(n) => filled += n,
            None if filled == 0 => return Ok(false),
            None => return Err(FlowError::Truncated),
        }
    }
    Ok(true)
}

/// Reads one control message, `None` at a clean end of the control stream.
pub async fn read_message(recv: &mut RecvStream) -> Result<Option<Message>, FlowError> {
    let mut header = [0u8; MESSAGE_HEADER_LEN];
    if !read_exact_or_eof(recv, &mut header).await? {
        return Ok(None);
    }
    let (ty, len) = Message::decode_header(header)?;
    let mut body = vec![0u8; len];
    if !read_exact_or_eof(recv, &mut body).await? && len > 0 {
        return Err(FlowError::Truncated);
    }
    Ok(Some(Message::decode_body(ty, &body)?))
}

/// Writes one control message.
pub async fn write_message(send: &mut SendStream, msg: &Message) -> Result<(), FlowError> {
    let mut buf = Vec::with_capacity(32);
    msg.encode(&mut buf);
    send.write_all(&buf).await?;
    Ok(())
}

/// Everything a running flow needs.
pub struct FlowParts {
    /// Identity of the flow on this connection.
    pub key: FlowKey,
    /// The QUIC connection to the peer gateway.
    pub conn: quinn::Connection,
    /// The control stream.
    pub control_send: SendStream,
    /// The control stream, receiving half.
    pub control_recv: RecvStream,
    /// The peer's direction, fed by lane readers.
    pub inbound: Arc<Inbound>,
    /// Lanes for our direction.
    pub lanes: usize,
    /// Counters, shared with `inbound`.
    pub counters: Arc<FlowCounters>,
    /// Encodes our direction (ingress of a codec flow).
    pub encoder: Option<Encoder>,
    /// The encoder's copies of advertised pages it referred to: answers the peer decoder's
    /// Need, released by its Acks (with `encoder`).
    pub retained: Option<Arc<RetainedPages>>,
    /// Decodes the peer's direction (egress of a codec flow).
    pub decoder: Option<Decoder>,
    /// `[limits] idle_timeout`: a flow that moved no byte either way this long fails.
    pub idle_timeout: Duration,
}

/// Runs a flow until both directions completed or it failed. On failure the local TCP
/// connection is aborted (RST) and the peer is told with a Reset.
///
/// The ingress side calls this right after sending Open, so data starts flowing without waiting
/// a round trip; the peer's Opened or Refused arrives on the control stream meanwhile.
pub async fn run_flow(parts: FlowParts, tcp: TcpStream) -> Result<(), FlowError> {
    let FlowParts { key, conn, control_send, mut control_recv, inbound, lanes, counters, encoder, retained, decoder, idle_timeout } = parts;
    let (mut tcp_read, mut tcp_write) = tcp.into_split();
    let control = Arc::new(Mutex::new(control_send));
    let cancel = inbound.cancel.clone();
    // Codec miss path: the encoder's copies of the advertised pages it referred to answer the
    // peer decoder's Need; Supply messages for our decoder go to `pump_in`. Every supply answers
    // a request our decoder made, and it has at most MAX_REQUESTED_PAGES outstanding, so the
    // channel never fills with an honest peer and the control reader never waits on it.
    let (supply_tx, supply_rx) = match decoder {
        Some(_) => {
            let (tx, rx) = mpsc::channel(MAX_REQUESTED_PAGES);
            (Some(tx), Some(rx))
        }
        None => (None, None),
    };
    // Signalled on every Ack (it may let `pump_out` send more) and when the peer closes its
    // control stream.
    let acked_changed = Notify::new();
    let peer_done = std::sync::atomic::AtomicBool::new(false);

    let result = {
        let outbound = pump_out(&mut tcp_read, &conn, key, lanes, control.clone(), &counters, &acked_changed, cancel.clone(), encoder);
        let inbound_pump = pump_in(&mut tcp_write, &inbound, control.clone(), decoder, supply_rx);
        let control_reader = async {
            loop {
                match read_message(&mut control_recv).await? {
                    None => {
                        peer_done.store(true, Ordering::Relaxed);
                        acked_changed.notify_waiters();
                        return Ok::<(), FlowError>(());
                    }
                    Some(Message::Opened) => {}
                    Some(Message::Refused(reason)) => return Err(FlowError::Refused(reason)),
                    Some(Message::Fin { length, digest }) => inbound.set_end(length, digest)?,
                    Some(Message::Ack { delivered, limit }) => {
                        counters.acked.store(delivered.get(), Ordering::Relaxed);
                        counters.send_limit.fetch_max(limit.get(), Ordering::Relaxed);
                        if let Some(store) = &retained {
                            store.release(delivered);
                        }
                        acked_changed.notify_waiters();
                    }
                    Some(Message::Reset(reason)) => return Err(FlowError::PeerReset(reason)),
                    Some(Message::Need { digests }) => {
                        let store = retained
                            .as_ref()
                            .ok_or_else(|| FlowError::Unexpected("page request on a flow this side does not encode".into()))?;
                        resupply(store, &digests, &control, &counters).await?;
                    }
                    Some(Message::Supply { digest, page }) => {
                        let Some(tx) = &supply_tx else {
                            return Err(FlowError::Unexpected(format!("page {digest} supplied to a flow this side does not decode")));
                        };
                        // The decoder checks each page against its requests and digest.
                        tx.try_send((digest, page))
                            .map_err(|_| FlowError::Unexpected("peer supplied more pages than were asked for".into()))?;
                    }
                    Some(other @ Message::Open { .. }) => return Err(FlowError::Unexpected(format!("{other:?}"))),
                }
            }
        };
        let work = async {
            let (sent, ()) = tokio::try_join!(outbound, inbound_pump)?;
            if retained.is_some() {
                // The peer's decoder may still ask for pages until it has decoded everything we
                // sent: keep the control stream open until it acknowledged the whole stream.
                loop {
                    let changed = acked_changed.notified();
                    tokio::pin!(changed);
                    changed.as_mut().enable();
                    if counters.acked.load(Ordering::Relaxed) >= sent.get() || peer_done.load(Ordering::Relaxed) {
                        break;
                    }
                    changed.await;
                }
            }
            // Both directions are done; close our control stream.
            let _ = control.lock().await.finish();
            Ok::<(), FlowError>(())
        };
        tokio::pin!(work);
        tokio::pin!(control_reader);
        let mut peer_closed = false;
        let moved = || {
            let t = counters.totals();
            t.tcp_in + t.tcp_out + t.wan_in + t.wan_out
        };
        let mut idle = IdleWatch::new(idle_timeout, Instant::now(), moved());
        let mut idle_poll = tokio::time::interval(idle.poll_interval());
        let result = loop {
            tokio::select! {
                r = &mut work => break r,
                _ = idle_poll.tick() => if idle.expired(Instant::now(), moved()) {
                    break Err(FlowError::Idle(idle.timeout()));
                },
                r = &mut control_reader, if !peer_closed => match r {
                    Ok(()) => peer_closed = true,
                    Err(e) => break Err(e),
                },
                _ = cancel.cancelled() => break Err(FlowError::Cancelled),
            }
        };
        if result.is_ok() && !peer_closed {
            // Wait for the peer's end of the control stream (its last Ack), within reason.
            let _ = tokio::time::timeout(LINGER, control_reader).await;
        }
        result
    };
    // A flow that failed because the connection closed says why (the peer's reason, e.g. its
    // gateway stopping), not how its streams noticed ("connection lost", "cancelled").
    let result = result.map_err(|e| conn.close_reason().map_or(e, FlowError::Connection));
    inbound.cancel.cancel();
    if let Err(e) = &result {
        // Linger 0 makes the close a reset, so the local peer sees the failure instead of a
        // clean end of stream it could mistake for a complete transfer. With a zero timeout the
        // close does not block. Reuniting first keeps the write half's drop from sending a FIN.
        if let Ok(tcp) = tcp_read.reunite(tcp_write) {
            let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
        }
        if !matches!(e, FlowError::PeerReset(_) | FlowError::Refused(_)) {
            let mut send = control.lock().await;
            let _ = write_message(&mut send, &Message::Reset(e.to_string())).await;
            let _ = send.finish();
        }
    }
    if let Some(store) = &retained {
        // Pages may be resupplied after the outbound pump recorded its statistics.
        if let Some(codec) = counters.codec.lock().as_mut() {
            codec.resupplied_pages = store.stats().resupplied;
        }
    }
    result
}

/// Answers the peer decoder's request from the pages the encoder retained. A page not retained
/// fails the flow (the peer then fails safely, as it would without the miss path).
async fn resupply(
    store: &RetainedPages,
    digests: &[PageDigest],
    control: &Mutex<SendStream>,
    counters: &FlowCounters,
) -> Result<(), FlowError> {
    // Look every page up before the first await (no later Ack can release one meanwhile) and
    // answer in one write under one lock.
    let mut buf = Vec::with_capacity(digests.len() * (MESSAGE_HEADER_LEN + crate::tunnel::protocol::SUPPLY_BODY));
    for &digest in digests {
        let page = store.resupply(&digest).ok_or(FlowError::CannotResupply(digest))?;
        Message::Supply { digest, page }.encode(&mut buf);
    }
    control.lock().await.write_all(&buf).await?;
    counters.wan_out.fetch_add(buf.len() as u64, Ordering::Relaxed);
    counters.pages_resupplied.fetch_add(digests.len() as u64, Ordering::Relaxed);
    tracing::debug!(pages = digests.len(), "resupplied pages the peer's decoder asked for");
    Ok(())
}

/// Local socket → (encoder →) lanes. Ends with a Fin carrying the exact length sent; returns it.
#[allow(clippy::too_many_arguments)]
async fn pump_out(
    tcp: &mut OwnedReadHalf,
    conn: &quinn::Connection,
    key: FlowKey,
    lanes: usize,
    control: Arc<Mutex<SendStream>>,
    counters: &Arc<FlowCounters>,
    acked_changed: &Notify,
    cancel: CancellationToken,
    mut encoder: Option<Encoder>,
) -> Result<WireOffset, FlowError> {
    let (tx, rx) = mpsc::channel::<(WireOffset, Bytes)>(lanes.max(2));
    let rx = Arc::new(Mutex::new(rx));
    let header = LaneHeader { kind: LaneKind::Data, sender_opened_flow: key.opened_locally, flow: key.id };
    let mut writers = tokio::task::JoinSet::new();
    for _ in 0..lanes {
        writers.spawn(write_lane(conn.clone(), header, rx.clone(), counters.clone(), cancel.clone()));
    }
    let mut sender = ChunkSender { tx, offset: WireOffset::ZERO, counters, acked_changed, cancel: &cancel };
    // blake3 of what we read, sent with Fin. A codec direction takes the encoder's stream digest
    // (it hashes exactly these bytes already); a plain one hashes them here, in the pieces read.
    let mut read_digest = StreamHasher::new();
    let read_result = async {
        let mut wire = Vec::new();
        // Whether the encoder holds input it has not flushed yet.
        let mut unflushed = false;
        loop {
            let mut buf = BytesMut::with_capacity(READ_CHUNK);
            let read = if unflushed {
                tokio::time::timeout(IDLE_FLUSH, tcp.read_buf(&mut buf)).await.ok()
            } else {
                Some(tcp.read_buf(&mut buf).await)
            };
            let Some(read) = read else {
                // The source went quiet: ship what the encoder holds.
                if let Some(enc) = encoder.as_mut() {
                    enc.flush(&mut wire);
                }
                unflushed = false;
                sender.send_all(&mut wire).await?;
                continue;
            };
            let n = read.map_err(FlowError::LocalRead)?;
            if n == 0 {
                if let Some(enc) = encoder.as_mut() {
                    enc.finish(&mut wire);
                    sender.send_all(&mut wire).await?;
                    *counters.codec.lock() = Some(enc.stats());
                }
                return Ok::<(), FlowError>(());
            }
            counters.tcp_in.fetch_add(n as u64, Ordering::Relaxed);
            match encoder.as_mut() {
                Some(enc) => {
                    enc.push(&buf, &mut wire);
                    unflushed = true;
                    sender.send_all(&mut wire).await?;
                }
                None => {
                    read_digest.update(&buf);
                    sender.send(buf.freeze()).await?;
                }
            }
        }
    }
    .await;
    let length = sender.offset;
    drop(sender);
    if let Err(e) = read_result {
        // Abort any lane writer still waiting on QUIC.
        cancel.cancel();
        return Err(e);
    }
    while let Some(joined) = writers.join_next().await {
        joined.map_err(|e| FlowError::Unexpected(format!("lane writer panicked: {e}")))??;
    }
    let digest = encoder.as_ref().map_or_else(|| read_digest.finalize(), Encoder::stream_digest);
    *counters.tcp_in_digest.lock() = Some(digest);
    let mut send = control.lock().await;
    write_message(&mut send, &Message::Fin { length, digest }).await?;
    counters.wan_out.fetch_add(FIN_MESSAGE_LEN as u64, Ordering::Relaxed);
    Ok(length)
}

/// Hands chunks to the lane writers, numbering them by offset in the direction's byte stream,
/// within the limit the peer's Acks grant (see the protocol's flow control).
struct ChunkSender<'a> {
    tx: mpsc::Sender<(WireOffset, Bytes)>,
    offset: WireOffset,
    counters: &'a FlowCounters,
    /// Signalled on every Ack.
    acked_changed: &'a Notify,
    cancel: &'a CancellationToken,
}

impl ChunkSender<'_> {
    async fn send(&mut self, data: Bytes) -> Result<(), FlowError> {
        let len = data.len() as u64;
        let end = self.offset.advanced(len).get();
        loop {
            let granted = self.acked_changed.notified();
            tokio::pin!(granted);
            granted.as_mut().enable();
            if end <= self.counters.send_limit.load(Ordering::Relaxed).max(INITIAL_SEND_WINDOW) {
                break;
            }
            tokio::select! {
                _ = &mut granted => {}
                _ = self.cancel.cancelled() => return Err(FlowError::Cancelled),
            }
        }
        self.tx.send((self.offset, data)).await.map_err(|_| FlowError::Cancelled)?;
        self.offset = self.offset.advanced(len);
        Ok(())
    }

    /// Sends and clears `wire`, in pieces small enough to spread over the lanes.
    async fn send_all(&mut self, wire: &mut Vec<u8>) -> Result<(), FlowError> {
        for piece in wire.chunks(WIRE_PIECE) {
            self.send(Bytes::copy_from_slice(piece)).await?;
        }
        wire.clear();
        Ok(())
    }
}

/// One lane writer: takes whichever chunk is next and writes it to its own stream, opened on
/// first use so short flows open few streams.
async fn write_lane(
    conn: quinn::Connection,
    header: LaneHeader,
    chunks: Arc<Mutex<mpsc::Receiver<(WireOffset, Bytes)>>>,
    counters: Arc<FlowCounters>,
    cancel: CancellationToken,
) -> Result<(), FlowError> {
    let mut stream: Option<SendStream> = None;
    loop {
        let next = tokio::select! {
            next = async { chunks.lock().await.recv().await } => next,
            _ = cancel.cancelled() => {
                if let Some(mut s) = stream { let _ = s.reset(FLOW_ABORTED.into()); }
                return Err(FlowError::Cancelled);
            }
        };
        let Some((offset, data)) = next else { break };
        let send = match &mut stream {
            Some(s) => s,
            None => {
                let mut s = conn.open_uni().await?;
                s.write_all(&header.encode()).await?;
                counters.wan_out.fetch_add(LaneHeader::LEN as u64, Ordering::Relaxed);
                stream.insert(s)
            }
        };
        let chunk = ChunkHeader { offset, len: data.len() as u32 };
        let len = data.len();
        let mut bufs = [Bytes::copy_from_slice(&chunk.encode()), data];
        let write = send.write_all_chunks(&mut bufs);
        tokio::select! {
            r = write => r?,
            _ = cancel.cancelled() => {
                let _ = send.reset(FLOW_ABORTED.into());
                return Err(FlowError::Cancelled);
            }
        }
        counters.wan_out.fetch_add((ChunkHeader::LEN + len) as u64, Ordering::Relaxed);
        counters.wire_sent.fetch_max(offset.advanced(len as u64).get(), Ordering::Relaxed);
    }
    if let Some(mut s) = stream {
        let _ = s.finish();
    }
    Ok(())
}

/// Reorder buffer → (decoder →) local socket; half-closes the socket after the announced
/// length. With a decoder, only bytes the decoder verified reach the socket, and a decode error
/// fails the flow before the destination sees the stream's end.
///
/// Codec miss path: when the decoder stalls on a page it cannot resolve, this asks the peer
/// (Need) and takes no more input until `supplies` brought the pages: the reorder buffer fills
/// and backpressure reaches the sender. Acks then report the wire bytes the decoder fully
/// decoded, so the peer keeps every page it may still be asked for.
///
/// The decoder appends at most its output bound (`[limits] decoder_output`) per call; see
/// [`write_decoded`]: everything it has to emit reaches the socket before more input is taken.
async fn pump_in(
    tcp: &mut OwnedWriteHalf,
    inbound: &Arc<Inbound>,
    control: Arc<Mutex<SendStream>>,
    mut decoder: Option<Decoder>,
    mut supplies: Option<mpsc::Receiver<(PageDigest, Bytes)>>,
) -> Result<(), FlowError> {
    let mut since_ack = 0u64;
    let mut last_ack = tokio::time::Instant::now();
    // Each Ack lets the peer send up to the reorder budget beyond what was delivered; ack a
    // quarter of it at a time so the sender never waits for a grant on a fast path.
    let ack_every = ACK_EVERY.min(inbound.budget / 4).max(1);
    let ack = |delivered: WireOffset| Message::Ack { delivered, limit: delivered.advanced(inbound.budget) };
    write_message(&mut *control.lock().await, &ack(WireOffset::ZERO)).await?;
    let mut decoded = Vec::new();
    let mut delivered = WireOffset::ZERO;
    // blake3 of what we write, checked against the peer's Fin. A codec direction takes the
    // decoder's stream digest (it hashes exactly these bytes already); a plain one hashes here.
    let mut written_digest = StreamHasher::new();
    // While the decoder is stalled, the next requested page must arrive by then (moved on when
    // it stalls and whenever a page arrives).
    let mut supply_deadline = tokio::time::Instant::now() + SUPPLY_TIMEOUT;
    loop {
        let ready = inbound.ready.notified();
        tokio::pin!(ready);
        ready.as_mut().enable();
        let stalled = decoder.as_ref().is_some_and(Decoder::is_stalled);
        let (data, complete) = if stalled {
            (None, false)
        } else {
            let mut r = inbound.lock();
            let data = r.take();
            if decoder.is_none() {
                delivered = r.delivered();
            }
            (data, r.is_complete())
        };
        if let Some(data) = data {
            inbound.space.notify_waiters();
            match decoder.as_mut() {
                Some(dec) => {
                    dec.push(&data, &mut decoded)?;
                    supply_deadline = tokio::time::Instant::now() + SUPPLY_TIMEOUT;
                    write_decoded(dec, tcp, &mut decoded, &control, &inbound.counters).await?;
                    delivered = dec.consumed();
                }
                None => {
                    written_digest.update(&data);
                    write_local(tcp, &data, &inbound.counters).await?;
                }
            }
            since_ack += data.len() as u64;
            if since_ack >= ack_every || last_ack.elapsed() >= ACK_INTERVAL {
                since_ack = 0;
                last_ack = tokio::time::Instant::now();
                write_message(&mut *control.lock().await, &ack(delivered)).await?;
            }
            continue;
        }
        if complete {
            if let Some(dec) = decoder.as_mut() {
                dec.finish(&mut decoded)?;
                delivered = dec.consumed();
                write_local(tcp, &decoded, &inbound.counters).await?;
            }
            let written = decoder.as_ref().map_or_else(|| written_digest.finalize(), Decoder::stream_digest);
            *inbound.counters.tcp_out_digest.lock() = Some(written);
            let sent = *inbound.end_digest.lock();
            // Only bytes that hash to what the peer read get a clean end; else the flow fails
            // and the local side is reset.
            check_end_digest(sent, written, inbound.counters.tcp_out.load(Ordering::Relaxed))?;
            tcp.shutdown().await.map_err(FlowError::LocalWrite)?;
            write_message(&mut *control.lock().await, &ack(delivered)).await?;
            return Ok(());
        }
        tokio::select! {
            _ = &mut ready, if !stalled => {}
            Some((digest, page)) = next_supply(&mut supplies) => {
                let Some(dec) = decoder.as_mut() else { continue };
                dec.supply(digest, page, &mut decoded)?;
                supply_deadline = tokio::time::Instant::now() + SUPPLY_TIMEOUT;
                inbound.counters.pages_resupplied.fetch_add(1, Ordering::Relaxed);
                // Apply whatever else already arrived before writing out.
                while let Some((digest, page)) = supplies.as_mut().and_then(|rx| rx.try_recv().ok()) {
                    dec.supply(digest, page, &mut decoded)?;
                    inbound.counters.pages_resupplied.fetch_add(1, Ordering::Relaxed);
                }
                write_decoded(dec, tcp, &mut decoded, &control, &inbound.counters).await?;
                delivered = dec.consumed();
            }
            _ = tokio::time::sleep_until(supply_deadline), if stalled => {
                return Err(FlowError::SupplyTimeout(SUPPLY_TIMEOUT));
            }
            _ = inbound.cancel.cancelled() => return Err(FlowError::Cancelled),
            // A stream gone quiet still gets its last bytes acknowledged promptly.
            _ = tokio::time::sleep_until(last_ack + ACK_INTERVAL), if since_ack > 0 => {
                since_ack = 0;
                last_ack = tokio::time::Instant::now();
                write_message(&mut *control.lock().await, &ack(delivered)).await?;
            }
        }
    }
}

/// The next supplied page; pending forever without a supply channel (or once it closed).
async fn next_supply(supplies: &mut Option<mpsc::Receiver<(PageDigest, Bytes)>>) -> Option<(PageDigest, Bytes)> {
    match supplies {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// After a decoder call: asks for the pages it found missing and writes what it appended to
/// `decoded` to the socket, then takes the rest of its output one bounded piece at a time (a
/// push with no input) until it has nothing more to emit. `decoded` ends empty.
async fn write_decoded(
    dec: &mut Decoder,
    tcp: &mut OwnedWriteHalf,
    decoded: &mut Vec<u8>,
    control: &Mutex<SendStream>,
    counters: &FlowCounters,
) -> Result<(), FlowError> {
    loop {
        request_pages(dec, control, counters).await?;
        write_local(tcp, decoded, counters).await?;
        decoded.clear();
        if !dec.has_pending_output() {
            return Ok(());
        }
        dec.push(&[], decoded)?;
    }
}

/// Sends Need for the pages the decoder newly found missing.
async fn request_pages(dec: &mut Decoder, control: &Mutex<SendStream>, counters: &FlowCounters) -> Result<(), FlowError> {
    let needs = dec.take_needs();
    if needs.is_empty() {
        return Ok(());
    }
    let mut buf = Vec::new();
    for msg in Message::needs(&needs) {
        msg.encode(&mut buf);
    }
    control.lock().await.write_all(&buf).await?;
    counters.wan_out.fetch_add(buf.len() as u64, Ordering::Relaxed);
    counters.pages_needed.fetch_add(needs.len() as u64, Ordering::Relaxed);
    tracing::debug!(pages = needs.len(), outstanding = dec.outstanding(), "decoder misses pages; asked the peer");
    Ok(())
}

async fn write_local(tcp: &mut OwnedWriteHalf, data: &[u8], counters: &FlowCounters) -> Result<(), FlowError> {
    tcp.write_all(data).await.map_err(FlowError::LocalWrite)?;
    counters.tcp_out.fetch_add(data.len() as u64, Ordering::Relaxed);
    Ok(())
}

/// The end of the peer's direction: the `tcp_out` bytes written to the local socket must hash
/// to `sent`, the digest the peer sent with Fin of what it read from its own. A mismatch means
/// the destination did not get what the source sent: it is logged, and the flow fails.
fn check_end_digest(sent: Option<blake3::Hash>, written: blake3::Hash, tcp_out: u64) -> Result<(), FlowError> {
    match sent {
        Some(sent) if sent == written => Ok(()),
        Some(sent) => {
            tracing::warn!(tcp_out, %sent, %written, "end-to-end digest mismatch: resetting the local connection");
            Err(FlowError::DigestMismatch { tcp_out, sent, written })
        }
        None => Err(FlowError::Unexpected("direction complete without a Fin digest".into())),
    }
}

/// Logs a finished flow.
pub fn log_record(r: &FlowRecord) {
    let secs = r.duration.as_secs_f64();
    let rate_mbit = r.tcp_in.max(r.tcp_out) as f64 * 8.0 / 1e6 / secs.max(1e-9);
    let (peer, flow, local) = (&r.peer, r.flow, r.opened_locally);
    let (tcp_in, wan_out, tcp_out, wan_in) = (r.tcp_in, r.wan_out, r.tcp_out, r.wan_in);
    if let Some(c) = &r.codec {
        tracing::info!(
            peer, flow, mode = ?c.mode, bytes_in = c.bytes_in, wire_bytes = c.wire_bytes_out,
            zero_pages = c.zero_pages, window_refs = c.window_refs, advertised_refs = c.advertised_refs,
            literal_pages = c.literal_pages, unretained_literals = c.unretained_literals,
            resupplied_pages = c.resupplied_pages, opaque_reason = c.opaque_reason.as_deref().unwrap_or("-"),
            "flow codec"
        );
    }
    if r.pages_needed > 0 || r.pages_resupplied > 0 {
        tracing::info!(
            peer, flow, local, pages_needed = r.pages_needed, pages_resupplied = r.pages_resupplied,
            "flow codec miss path: pages the destination no longer held were sent again"
        );
    }
    match &r.error {
        None => tracing::info!(
            peer, flow, local, tcp_in, wan_out, tcp_out, wan_in,
            duration_s = format_args!("{secs:.3}"), rate_mbit = format_args!("{rate_mbit:.1}"),
            "flow completed"
        ),
        Some(error) => tracing::warn!(
            peer, flow, local, tcp_in, wan_out, tcp_out, wan_in,
            duration_s = format_args!("{secs:.3}"), error, "flow failed"
        ),
    }
}

/// Sends this gateway's page-cache advertisement to the peer on a new lane; returns the bytes
/// sent.
pub async fn send_advert(conn: &quinn::Connection, advertisement: &Advertisement) -> Result<u64, FlowError> {
    let body = advertisement.encode();
    let len = u32::try_from(body.len())
        .ok()
        .filter(|l| *l <= MAX_ADVERT)
        .ok_or(ProtocolError::TooLong { what: "advertisement", len: body.len() as u64, max: MAX_ADVERT.into() })?;
    let header = LaneHeader { kind: LaneKind::Advert, sender_opened_flow: true, flow: CONNECTION_FLOW };
    let mut send = conn.open_uni().await?;
    send.write_all(&header.encode()).await?;
    send.write_all(&len.to_be_bytes()).await?;
    send.write_all(&body).await?;
    let _ = send.finish();
    Ok((LaneHeader::LEN + 4 + body.len()) as u64)
}

/// Reads the peer's page-cache advertisement from an advert lane (after its header).
pub async fn read_advert(mut lane: RecvStream) -> Result<Advertisement, FlowError> {
    let mut len = [0u8; 4];
    if !read_exact_or_eof(&mut lane, &mut len).await? {
        return Err(FlowError::Truncated);
    }
    let len = u32::from_be_bytes(len);
    if len > MAX_ADVERT {
        return Err(ProtocolError::TooLong { what: "advertisement", len: len.into(), max: MAX_ADVERT.into() }.into());
    }
    let mut body = vec![0u8; len as usize];
    if !read_exact_or_eof(&mut lane, &mut body).await? && len > 0 {
        return Err(FlowError::Truncated);
    }
    Advertisement::decode(&body).map_err(|e| FlowError::Unexpected(format!("bad advertisement: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_end_is_clean_only_when_the_digests_match() {
        let data = b"what the source QEMU wrote";
        let written = blake3::hash(data);
        check_end_digest(Some(blake3::hash(data)), written, data.len() as u64).unwrap();
        let e = check_end_digest(Some(blake3::hash(b"something else")), written, data.len() as u64).unwrap_err();
        assert!(matches!(e, FlowError::DigestMismatch { tcp_out: 26, .. }), "{e}");
        assert!(e.to_string().contains(&written.to_hex().to_string()), "{e}");
        let e = check_end_digest(None, written, 0).unwrap_err();
        assert!(matches!(e, FlowError::Unexpected(_)), "{e}");
    }
}
