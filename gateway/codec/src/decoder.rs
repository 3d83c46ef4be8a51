//! Destination-side decoder: wire bytes → exactly the bytes the source QEMU wrote.
//!
//! Two-phase parsing: a frame header is checked against the format limits first (so a hostile
//! length fails at once, before anything is buffered or allocated for it); the frame is processed
//! only when all its bytes are present. Partial frames are kept in a buffer bounded by the largest
//! legal frame. Any error poisons the decoder: held-back bytes are dropped, never released.
//!
//! Digest gate: a running blake3 over every reconstructed byte is compared with the encoder's
//! checkpoints (one after every batch) and trailer. A batch is decoded in two passes: the first
//! resolves every page it refers to and hashes the bytes it stands for *from where they are*
//! (the payload, the resolved pages, a block of zeros) without writing them anywhere; only when
//! the checkpoint after it verified does the second pass write them to the caller's buffer. So no
//! byte — in particular no QEMU_VM_EOF — of a corrupted stream ever reaches the destination QEMU,
//! released output is always a verified prefix of what the source QEMU wrote, and the decoder
//! never holds rebuilt bytes: a batch of zero pages costs its payload (a few bytes), not the
//! 16 MiB it expands to. The encoder checkpoints after every batch; a batch that arrives before
//! the previous one's checkpoint fails the stream ([`DecodeError::MissingCheckpoint`]).
//!
//! Miss path: a reference the decoder cannot resolve (an advertised page evicted from the cache
//! since) does not fail the stream. The decoder *stalls* at that op: it lists the pages it needs
//! ([`Decoder::take_needs`]: the missing one and every other page the rest of the batch refers to
//! that it does not hold, so one round trip usually suffices), keeps its input, and resumes when
//! the caller hands the pages over ([`Decoder::supply`]), each checked against its digest. The
//! caller should stop pushing input while [`Decoder::is_stalled`] (input pushed meanwhile is only
//! buffered, up to [`DecoderConfig::max_stalled_input`]). [`Decoder::consumed`] tells how much of
//! the wire is fully decoded: the source keeps pages it may be asked for until then.
//!
//! Output bound: one call appends at most [`DecoderConfig::max_output_per_push`] bytes to `out`
//! (zero pages expand about 4000× from wire to bytes, so unbounded output would let a few MiB of
//! wire become GiB in one call). The second pass of a verified batch stops at the bound and goes
//! on in the next call; the input behind it is kept buffered meanwhile, as while stalled (up to
//! [`DecoderConfig::max_stalled_input`]). The caller calls [`push`](Decoder::push) with no input
//! while [`Decoder::has_pending_output`] to take the rest, before it pushes more input. What the
//! decoder allocates for its output is therefore the caller's buffer, at most the bound per call.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use thiserror::Error;

use crate::frame::{
    next_op, parse_frame_header, BatchHeader, FrameError, FrameHeader, Op, Preamble, MAX_BATCH_PAGE_OPS,
};
use crate::offset::{StreamOffset, WireOffset};
use crate::stores::PageStore;
use crate::page_hash;
use crate::stream_hash::StreamHasher;
use crate::{PageDigest, PAGE_SIZE};

/// Zeros hashed in place of zero pages (a batch's zero run is never written out to be hashed).
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// The caller's output buffer during one public call, with the room the output bound leaves.
struct Out<'a> {
    buf: &'a mut Vec<u8>,
    /// Length `buf` may reach in this call.
    limit: usize,
}

impl Out<'_> {
    fn room(&self) -> usize {
        self.limit.saturating_sub(self.buf.len())
    }
}

/// Decoder settings.
#[derive(Debug, Clone)]
pub struct DecoderConfig {
    /// Largest session window accepted from an encoder (pages). Memory bound: 4 KiB per page in
    /// the worst case (pages are shared with the cache while it still holds them). Advertise this
    /// value to the source.
    pub max_session_window_pages: u64,
    /// Most wire bytes buffered while stalled on a missing page. The caller is expected to stop
    /// pushing while [`Decoder::is_stalled`] (so this holds at most the rest of one push); the
    /// limit stops one that does not.
    pub max_stalled_input: usize,
    /// Most bytes one [`Decoder::push`] or [`Decoder::supply`] appends to `out` (0 counts as 1).
    /// The rest of a verified batch is written by the next calls, and no further batch is
    /// decoded meanwhile (see the [module docs](self)). The default is no bound (an in-memory
    /// decode of a trusted stream); a decoder fed from the network sets one (the gateway's
    /// `[limits] decoder_output`).
    pub max_output_per_push: usize,
}

impl Default for DecoderConfig {
    fn default() -> Self {
        Self {
            max_session_window_pages: 65536,
            max_stalled_input: 16 << 20,
            max_output_per_push: usize::MAX,
        }
    }
}

/// Most pages requested from the source and not yet supplied. A batch refers to at most
/// [`MAX_BATCH_PAGE_OPS`] pages and the decoder asks only for the batch it is stalled in, so an
/// honest stream stays far below; it also bounds what a caller must buffer for
/// [`Decoder::supply`].
pub const MAX_REQUESTED_PAGES: usize = 2 * MAX_BATCH_PAGE_OPS;

/// Why decoding failed. Every variant means the destination QEMU must not be given the end of the
/// stream; the tunnel should abort the connection.
#[derive(Debug, Error)]
pub enum DecodeError {
    /// Malformed wire data.
    #[error("malformed wire data at stream offset {at}")]
    Frame {
        /// Reconstructed-stream offset where it happened.
        at: u64,
        /// What was wrong.
        #[source]
        source: FrameError,
    },
    /// A batch payload failed to decompress or had the wrong size.
    #[error("batch at stream offset {at} failed to decompress ({detail})")]
    Decompress {
        /// Stream offset of the batch.
        at: u64,
        /// zstd's message or the size mismatch.
        detail: String,
    },
    /// A batch claims a stream offset other than where the decoder is.
    #[error("batch for stream offset {claimed} arrived at offset {at}")]
    OffsetMismatch {
        /// Where the decoder is.
        at: u64,
        /// What the batch says.
        claimed: u64,
    },
    /// The wire ended while the decoder was stalled on this page (requested, never supplied).
    /// The migration fails; the source VM keeps running.
    #[error("referenced page {0} is not available at the destination")]
    MissingPage(PageDigest),
    /// [`Decoder::supply`] with a page the decoder did not ask for (or already received).
    #[error("page {0} supplied but not requested")]
    UnrequestedPage(PageDigest),
    /// [`Decoder::supply`] with bytes whose blake3 is not the digest they were supplied for.
    #[error("supplied page does not match its digest {digest} ({len} bytes)")]
    BadSupply {
        /// Digest the page was supplied for.
        digest: PageDigest,
        /// Its length.
        len: usize,
    },
    /// Too much input pushed while stalled, or while output was pending (see
    /// [`Decoder::has_pending_output`]).
    #[error("{held} wire bytes buffered while the decoder took no input (waiting for a page or for pending output to be taken; limit {limit})")]
    StalledInputFull {
        /// Bytes buffered.
        held: usize,
        /// [`DecoderConfig::max_stalled_input`].
        limit: usize,
    },
    /// More missing pages than [`MAX_REQUESTED_PAGES`] at once.
    #[error("{count} pages missing at once (limit {limit})")]
    TooManyMissing {
        /// Pages requested and not yet supplied.
        count: usize,
        /// [`MAX_REQUESTED_PAGES`].
        limit: usize,
    },
    /// The page store returned a page of the wrong size.
    #[error("page store returned {len} bytes for page {digest}")]
    BadStoredPage {
        /// Digest looked up.
        digest: PageDigest,
        /// Length returned.
        len: usize,
    },
    /// A checkpoint or the trailer disagrees with the reconstructed stream.
    #[error("stream digest mismatch at offset {at} (sender covered {claimed_len} bytes)")]
    DigestMismatch {
        /// Bytes reconstructed.
        at: u64,
        /// Length the sender's checkpoint/trailer covers.
        claimed_len: u64,
    },
    /// The encoder asks for a larger session window than this decoder allows.
    #[error("session window of {requested} pages exceeds this destination's limit {limit}")]
    WindowTooLarge {
        /// Requested by the encoder.
        requested: u64,
        /// This decoder's limit.
        limit: u64,
    },
    /// A batch arrived before the checkpoint of the previous one (the encoder checkpoints after
    /// every batch; without this rule a sender could make the decoder hash without end).
    #[error("batch at stream offset {at} arrived before the checkpoint of the previous batch")]
    MissingCheckpoint {
        /// Stream offset of the batch.
        at: u64,
    },
    /// [`Decoder::finish`] while output was pending: the caller did not take all of it.
    #[error("wire ended with decoded output not taken (push with no input while has_pending_output)")]
    OutputPending,
    /// Wire bytes after the trailer.
    #[error("{0} wire bytes after the trailer")]
    AfterTrailer(usize),
    /// The wire ended before the trailer.
    #[error("wire ended before the trailer ({produced} bytes reconstructed, {buffered} wire bytes in an incomplete frame)")]
    Truncated {
        /// Bytes reconstructed.
        produced: u64,
        /// Bytes of an incomplete frame.
        buffered: usize,
    },
    /// An earlier call failed; the decoder is unusable.
    #[error("decoder already failed")]
    Poisoned,
}

/// The decoder's half of the session window (see [crate docs](crate)): the same FIFO rule as the
/// encoder's, holding page handles so cache eviction can't take them away mid-session.
struct Window {
    cap: usize,
    map: HashMap<PageDigest, Bytes>,
    order: VecDeque<PageDigest>,
}

impl Window {
    fn note(&mut self, d: PageDigest, page: &Bytes) {
        if self.cap == 0 || self.map.contains_key(&d) {
            return;
        }
        if self.order.len() == self.cap {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
        self.map.insert(d, page.clone());
        self.order.push_back(d);
    }
}

/// Where in a batch's op list processing is (so a stalled batch resumes exactly there).
#[derive(Debug, Clone, Copy, Default)]
struct OpCursor {
    /// Next op.
    opos: usize,
    /// Next verbatim byte.
    vpos: usize,
    /// Next literal page.
    lpos: usize,
    /// Page ops done.
    page_ops: usize,
}

/// A batch waiting for a page. Its (decompressed) payload is kept in `Decoder::payload`.
#[derive(Debug)]
struct Stall {
    header: BatchHeader,
    /// Wire length of the batch frame, counted as consumed once the batch completes.
    frame_len: usize,
    /// Position of the unresolved reference.
    cursor: OpCursor,
    /// The page it refers to.
    waiting: PageDigest,
}

/// A batch whose first pass is done (every page resolved, its bytes hashed) and whose bytes are
/// not all written out yet: it waits for its checkpoint, then the second pass writes it within
/// the output bound. Its payload is in `Decoder::payload` (or, within the `process` call that
/// decoded a raw batch, still in that call's input), its resolved pages in `Decoder::refs`.
#[derive(Debug)]
struct Pending {
    header: BatchHeader,
    /// Its checkpoint verified: its bytes may be written out.
    verified: bool,
    /// Where the second pass is.
    emit: EmitCursor,
    /// Bytes not yet written out.
    left: u64,
}

/// Where the second pass of a batch is: the next op, its areas' positions, and how many bytes of
/// that op were written already.
#[derive(Debug, Clone, Copy, Default)]
struct EmitCursor {
    opos: usize,
    vpos: usize,
    lpos: usize,
    /// Next resolved page in `Decoder::refs`.
    rpos: usize,
    /// Bytes of the op at `opos` written already.
    in_op: usize,
}

/// Decoder counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DecoderStats {
    /// Times decoding stopped at an unresolvable reference.
    pub stalls: u64,
    /// Pages requested from the source.
    pub pages_requested: u64,
    /// Pages supplied (and verified).
    pub pages_supplied: u64,
}

/// Destination-side decoder. See the [module docs](self).
pub struct Decoder {
    cfg: DecoderConfig,
    cache: Arc<dyn PageStore>,
    /// Unconsumed wire bytes (an incomplete frame).
    buf: Vec<u8>,
    /// Bytes the next frame needs, counted from the start of the unconsumed wire.
    need: usize,
    preamble: Option<Preamble>,
    window: Window,
    hasher: StreamHasher,
    produced: u64,
    /// The batch decoded and not all written out yet, if any.
    pending: Option<Pending>,
    /// The pages the current batch's references resolved to, in op order (handles shared with
    /// the window and the store; the second pass copies from them).
    refs: Vec<Bytes>,
    /// The last call stopped before input in `buf` because of the output bound.
    paused: bool,
    trailer_seen: bool,
    failed: bool,
    payload: Vec<u8>,
    dctx: Option<zstd::bulk::Decompressor<'static>>,
    /// Wire bytes of fully decoded frames (preamble included).
    consumed: u64,
    /// The batch waiting for a page, if any.
    stall: Option<Stall>,
    /// Requested pages not yet supplied.
    requested: HashSet<PageDigest>,
    /// Requested pages not yet handed to the caller by [`Decoder::take_needs`].
    needs: Vec<PageDigest>,
    /// Supplied pages, kept until the current batch completes (a batch may refer to one twice).
    supplied: HashMap<PageDigest, Bytes>,
    stats: DecoderStats,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder")
            .field("produced", &self.produced)
            .field("pending", &self.pending)
            .field("trailer_seen", &self.trailer_seen)
            .field("failed", &self.failed)
            .field("stall", &self.stall)
            .finish_non_exhaustive()
    }
}

impl Decoder {
    /// A decoder with default settings, resolving references through `cache` and inserting every
    /// literal page it receives into it.
    pub fn new(cache: Arc<dyn PageStore>) -> Self {
        Self::with_config(DecoderConfig::default(), cache)
    }

    /// A decoder with explicit settings.
    pub fn with_config(cfg: DecoderConfig, cache: Arc<dyn PageStore>) -> Self {
        Self {
            cfg,
            cache,
            buf: Vec::new(),
            need: 0,
            preamble: None,
            window: Window { cap: 0, map: HashMap::new(), order: VecDeque::new() },
            hasher: StreamHasher::new(),
            produced: 0,
            pending: None,
            refs: Vec::new(),
            paused: false,
            trailer_seen: false,
            failed: false,
            payload: Vec::new(),
            dctx: None,
            consumed: 0,
            stall: None,
            requested: HashSet::new(),
            needs: Vec::new(),
            supplied: HashMap::new(),
            stats: DecoderStats::default(),
        }
    }

    /// Bytes reconstructed so far (hashed by the first pass; released or not).
    pub fn produced(&self) -> StreamOffset {
        StreamOffset::new(self.produced)
    }

    /// blake3 of the stream reconstructed so far ([`produced`](Self::produced) bytes). Once the
    /// decoder [is complete](Self::is_complete) and its output taken, that is the digest of every
    /// byte it released (verified against the trailer): a caller that needs the digest of what it
    /// wrote takes this one instead of hashing the same bytes again.
    pub fn stream_digest(&self) -> blake3::Hash {
        self.hasher.finalize()
    }

    /// Bytes of the current batch not written out yet: awaiting its checkpoint, or verified and
    /// kept back by the output bound. They are not held as bytes: the second pass rebuilds them
    /// from the batch's payload and resolved pages.
    pub fn held_back(&self) -> usize {
        self.pending.as_ref().map_or(0, |p| usize::try_from(p.left).unwrap_or(usize::MAX))
    }

    /// Whether a [`push`](Self::push) with no input would append more: the rest of a verified
    /// batch the output bound kept back, or buffered input not decoded because of it. Take them
    /// (push with no input until this is false) before pushing more input and before
    /// [`finish`](Self::finish).
    pub fn has_pending_output(&self) -> bool {
        !self.failed && (self.emitting() || (self.paused && !self.buf.is_empty()))
    }

    /// Whether a verified batch is partly written out (the next call goes on with it).
    fn emitting(&self) -> bool {
        self.pending.as_ref().is_some_and(|p| p.verified)
    }

    /// Whether the trailer arrived and verified.
    pub fn is_complete(&self) -> bool {
        self.trailer_seen && !self.failed
    }

    /// Wire bytes fully decoded: every frame before this offset was processed and every page it
    /// refers to resolved. A stalled batch is not counted until it completes. The source may drop
    /// its copies of pages referenced before this offset.
    pub fn consumed(&self) -> WireOffset {
        WireOffset::new(self.consumed)
    }

    /// Whether decoding waits for a page (see [`supply`](Self::supply)).
    pub fn is_stalled(&self) -> bool {
        self.stall.is_some()
    }

    /// Pages to request from the source that were not returned by an earlier call (each digest
    /// once per request). Call after every [`push`](Self::push) and [`supply`](Self::supply).
    pub fn take_needs(&mut self) -> Vec<PageDigest> {
        std::mem::take(&mut self.needs)
    }

    /// Pages requested and not yet supplied.
    pub fn outstanding(&self) -> usize {
        self.requested.len()
    }

    /// Counters.
    pub fn stats(&self) -> DecoderStats {
        self.stats
    }

    /// Hands over a page requested through [`take_needs`](Self::take_needs). It must be one the
    /// decoder asked for and still waits for ([`DecodeError::UnrequestedPage`]) and its blake3
    /// must be `digest` ([`DecodeError::BadSupply`]); the page also enters the page store.
    /// Decoding resumes if it was waiting for this page; like [`push`](Self::push), verified
    /// bytes are appended to `out`. On error the decoder is poisoned.
    pub fn supply(&mut self, digest: PageDigest, page: Bytes, out: &mut Vec<u8>) -> Result<(), DecodeError> {
        if self.failed {
            return Err(DecodeError::Poisoned);
        }
        let mut out = self.out(out);
        let r = (|| {
            if !self.requested.remove(&digest) {
                return Err(DecodeError::UnrequestedPage(digest));
            }
            if page.len() != PAGE_SIZE || PageDigest::of(&page) != digest {
                return Err(DecodeError::BadSupply { digest, len: page.len() });
            }
            self.stats.pages_supplied += 1;
            self.cache.insert(digest, page.clone());
            self.supplied.insert(digest, page);
            if self.stall.as_ref().is_some_and(|s| s.waiting == digest) {
                self.resume(&mut out)?;
            }
            Ok(())
        })();
        if r.is_err() {
            self.fail();
        }
        r
    }

    /// Feeds wire bytes (any split points); appends bytes that may be released to QEMU to `out`,
    /// at most [`DecoderConfig::max_output_per_push`]. A call with no input continues with what
    /// is pending ([`has_pending_output`](Self::has_pending_output)).
    /// On error nothing more is ever released and every later call fails.
    pub fn push(&mut self, mut wire: &[u8], out: &mut Vec<u8>) -> Result<(), DecodeError> {
        if self.failed {
            return Err(DecodeError::Poisoned);
        }
        let mut out = self.out(out);
        let r = (|| {
            if self.emitting() {
                // Go on with the batch the output bound interrupted.
                self.emit_from_payload(&mut out)?;
            }
            if self.emitting() {
                // Still not done: take no input now.
                self.buf.extend_from_slice(wire);
                self.paused |= !self.buf.is_empty();
                wire = &[];
            } else if std::mem::take(&mut self.paused) && self.stall.is_none() {
                // Continue with the input the output bound kept back.
                self.process_buffered(&mut out)?;
            }
            while !wire.is_empty() {
                if self.stall.is_some() || self.paused {
                    // Waiting for a page or for output to be taken: keep the input for later (the
                    // caller should have stopped).
                    self.buf.extend_from_slice(wire);
                    break;
                }
                if self.buf.is_empty() {
                    let used = self.process(wire, &mut out)?;
                    self.buf.extend_from_slice(&wire[used..]);
                    break;
                }
                // Complete a buffered partial frame, copying only as much as it needs.
                let want = self.need.saturating_sub(self.buf.len()).max(1);
                let take = want.min(wire.len());
                self.buf.extend_from_slice(&wire[..take]);
                wire = &wire[take..];
                // Try even if short of `need`: header needs are estimates, and the wire may end here.
                self.process_buffered(&mut out)?;
            }
            if (self.stall.is_some() || self.paused) && self.buf.len() > self.cfg.max_stalled_input {
                return Err(DecodeError::StalledInputFull { held: self.buf.len(), limit: self.cfg.max_stalled_input });
            }
            Ok(())
        })();
        if r.is_err() {
            self.fail();
        }
        r
    }

    /// The wire ended. Succeeds only if the trailer arrived and verified (everything before it was
    /// written out by the calls that took it, so nothing is appended to `_out`); otherwise the
    /// stream ended early and what was not verified is dropped.
    pub fn finish(&mut self, _out: &mut Vec<u8>) -> Result<(), DecodeError> {
        if self.failed {
            return Err(DecodeError::Poisoned);
        }
        if let Some(stall) = &self.stall {
            let missing = stall.waiting;
            self.fail();
            return Err(DecodeError::MissingPage(missing));
        }
        if self.has_pending_output() {
            self.fail();
            return Err(DecodeError::OutputPending);
        }
        if !self.trailer_seen {
            self.fail();
            return Err(DecodeError::Truncated { produced: self.produced, buffered: self.buf.len() });
        }
        // The trailer verified everything (and nothing may follow it): no batch is pending.
        debug_assert!(self.pending.is_none());
        Ok(())
    }

    /// The caller's buffer for one public call, bounded by [`DecoderConfig::max_output_per_push`]
    /// (at least 1, so every call makes progress).
    fn out<'a>(&self, buf: &'a mut Vec<u8>) -> Out<'a> {
        let limit = buf.len().saturating_add(self.cfg.max_output_per_push.max(1));
        Out { buf, limit }
    }

    fn fail(&mut self) {
        self.failed = true;
        self.pending = None;
        self.refs = Vec::new();
        self.paused = false;
        self.buf = Vec::new();
        self.payload = Vec::new();
        self.supplied = HashMap::new();
        self.stall = None;
    }

    /// Processes what `self.buf` holds, keeping the unprocessed rest.
    fn process_buffered(&mut self, out: &mut Out<'_>) -> Result<(), DecodeError> {
        let b = std::mem::take(&mut self.buf);
        let r = self.process(&b, out);
        self.buf = b;
        let used = r?;
        self.buf.drain(..used);
        Ok(())
    }

    /// Continues the stalled batch after a supply, then the input buffered behind it.
    fn resume(&mut self, out: &mut Out<'_>) -> Result<(), DecodeError> {
        let Some(stall) = self.stall.take() else { return Ok(()) };
        let payload = std::mem::take(&mut self.payload);
        let r = self.rebuild(&stall.header, &payload, stall.cursor);
        self.payload = payload;
        if let Some((cursor, waiting)) = r? {
            self.stall = Some(Stall { cursor, waiting, ..stall });
            return Ok(());
        }
        self.batch_done(stall.header, stall.frame_len);
        if !self.buf.is_empty() {
            self.process_buffered(out)?;
        }
        Ok(())
    }

    /// The first pass of a batch is done: count its frame as consumed, keep it for the second.
    fn batch_done(&mut self, header: BatchHeader, frame_len: usize) {
        self.consumed += frame_len as u64;
        // Supplies serve the batch that asked for them; later batches ask again if need be.
        self.supplied.clear();
        let left = self.produced - header.stream_offset;
        self.pending = Some(Pending { header, verified: false, emit: EmitCursor::default(), left });
    }

    fn frame_err(&self, source: FrameError) -> DecodeError {
        DecodeError::Frame { at: self.produced, source }
    }

    /// Processes complete frames at the start of `data`; returns bytes consumed and sets
    /// `self.need` for the incomplete remainder. A raw batch's payload is read from `data` where
    /// it is; if that batch is still pending (or stalled) when this returns, its payload is
    /// copied to `self.payload` for the calls that go on with it.
    fn process(&mut self, data: &[u8], out: &mut Out<'_>) -> Result<usize, DecodeError> {
        let mut raw_body = None;
        let r = self.process_frames(data, out, &mut raw_body);
        if let Some(body) = raw_body {
            if r.is_ok() && (self.pending.is_some() || self.stall.is_some()) {
                self.payload.clear();
                self.payload.extend_from_slice(&data[body]);
            }
        }
        r
    }

    /// [`process`](Self::process), leaving in `raw_body` where in `data` the payload of the last
    /// raw batch it decoded is.
    fn process_frames(
        &mut self,
        data: &[u8],
        out: &mut Out<'_>,
        raw_body: &mut Option<std::ops::Range<usize>>,
    ) -> Result<usize, DecodeError> {
        let mut pos = 0;
        while pos < data.len() {
            let rest = &data[pos..];
            if self.trailer_seen {
                return Err(DecodeError::AfterTrailer(rest.len()));
            }
            if self.preamble.is_none() {
                match Preamble::parse(rest).map_err(|e| self.frame_err(e))? {
                    None => {
                        self.need = rest.len() + 1;
                        return Ok(pos);
                    }
                    Some((p, n)) => {
                        if p.session_window_pages > self.cfg.max_session_window_pages {
                            return Err(DecodeError::WindowTooLarge {
                                requested: p.session_window_pages,
                                limit: self.cfg.max_session_window_pages,
                            });
                        }
                        self.window.cap = p.session_window_pages as usize;
                        self.preamble = Some(p);
                        pos += n;
                        self.consumed += n as u64;
                        continue;
                    }
                }
            }
            let Some((hdr, hlen)) = parse_frame_header(rest).map_err(|e| self.frame_err(e))? else {
                // Headers are short; ask for a little more at a time.
                self.need = rest.len() + 64;
                return Ok(pos);
            };
            match hdr {
                FrameHeader::Batch(b) => {
                    let total = hlen + b.body_len;
                    if rest.len() < total {
                        self.need = total;
                        return Ok(pos);
                    }
                    if self.pending.is_some() {
                        // (A verified one being written out never gets here: it pauses.)
                        return Err(DecodeError::MissingCheckpoint { at: b.stream_offset });
                    }
                    if out.room() == 0 {
                        // The output bound is reached: this batch waits in `buf` for a later call.
                        self.paused = true;
                        self.need = 0;
                        return Ok(pos);
                    }
                    *raw_body = (!b.compressed).then(|| pos + hlen..pos + total);
                    pos += total;
                    if self.batch(&b, &rest[hlen..total], total)? {
                        // Stalled: the batch's payload is kept; the rest waits in `buf`.
                        self.need = 0;
                        return Ok(pos);
                    }
                }
                FrameHeader::Checkpoint { total_len, digest } | FrameHeader::Trailer { total_len, digest } => {
                    if total_len != self.produced || *self.hasher.finalize().as_bytes() != digest {
                        return Err(DecodeError::DigestMismatch { at: self.produced, claimed_len: total_len });
                    }
                    if matches!(hdr, FrameHeader::Trailer { .. }) {
                        self.trailer_seen = true;
                    }
                    pos += hlen;
                    self.consumed += hlen as u64;
                    if let Some(p) = &mut self.pending {
                        p.verified = true;
                        match raw_body.clone() {
                            Some(body) => self.emit(&data[body], out)?,
                            None => self.emit_from_payload(out)?,
                        }
                        if self.pending.is_some() {
                            // The output bound is reached within the batch: the rest of it, and
                            // the input behind it, wait for the next calls.
                            self.paused = true;
                            self.need = 0;
                            return Ok(pos);
                        }
                    }
                }
            }
        }
        self.need = 0;
        Ok(pos)
    }

    /// First pass of one batch frame (`frame_len` wire bytes). Returns true if it stalled on a
    /// missing page; its payload is then kept in `self.payload` and `self.stall` says where to
    /// resume.
    fn batch(&mut self, b: &BatchHeader, body: &[u8], frame_len: usize) -> Result<bool, DecodeError> {
        if b.stream_offset != self.produced {
            return Err(DecodeError::OffsetMismatch { at: self.produced, claimed: b.stream_offset });
        }
        self.refs.clear();
        let stalled = if b.compressed {
            let mut payload = std::mem::take(&mut self.payload);
            let r = self
                .decompress(b, body, &mut payload)
                .and_then(|()| self.rebuild(b, &payload, OpCursor::default()));
            self.payload = payload;
            r?
        } else {
            // A raw batch's payload is copied by `process` if it is still needed after it.
            self.rebuild(b, body, OpCursor::default())?
        };
        match stalled {
            Some((cursor, waiting)) => {
                self.stall = Some(Stall { header: *b, frame_len, cursor, waiting });
                Ok(true)
            }
            None => {
                self.batch_done(*b, frame_len);
                Ok(false)
            }
        }
    }

    fn decompress(&mut self, b: &BatchHeader, body: &[u8], payload: &mut Vec<u8>) -> Result<(), DecodeError> {
        let raw_len = b.raw_len();
        let at = self.produced;
        payload.clear();
        // Bounded capacity: zstd can't write past it, so a decompression bomb stops here.
        payload.reserve_exact(raw_len);
        let dctx = match &mut self.dctx {
            Some(d) => d,
            None => self
                .dctx
                .insert(zstd::bulk::Decompressor::new().map_err(|e| DecodeError::Decompress { at, detail: e.to_string() })?),
        };
        dctx.decompress_to_buffer(body, payload).map_err(|e| DecodeError::Decompress { at, detail: e.to_string() })?;
        if payload.len() != raw_len {
            return Err(DecodeError::Decompress { at, detail: format!("{} bytes, header says {raw_len}", payload.len()) });
        }
        Ok(())
    }

    /// First pass over one batch's payload from `cursor` on: resolves its pages (into
    /// `self.refs`) and hashes the bytes it stands for. Returns where it stalled and on which
    /// page, if it did (ops before the stall are done; the rest follows on resume).
    fn rebuild(
        &mut self,
        b: &BatchHeader,
        payload: &[u8],
        mut cursor: OpCursor,
    ) -> Result<Option<(OpCursor, PageDigest)>, DecodeError> {
        let (pages, verbatim, ops) = payload_areas(b, payload).ok_or_else(|| self.frame_err(FrameError::BadBatch("payload shorter than its areas")))?;
        // On error the decoder is poisoned: the hash no longer matters.
        let stalled = self.apply_ops(ops, pages, verbatim, &mut cursor)?;
        if let Some(d) = stalled {
            self.stats.stalls += 1;
            if !self.requested.contains(&d) {
                // A new miss (not one already asked for): ask for it and, in the same round trip,
                // for every other page the rest of the batch needs.
                self.collect_needs(ops, pages, cursor)?;
            }
            return Ok(Some((cursor, d)));
        }
        Ok(None)
    }

    /// A page for a reference: the session window, then supplied pages, then the page store.
    fn resolve(&mut self, d: &PageDigest) -> Result<Option<Bytes>, DecodeError> {
        if let Some(p) = self.window.map.get(d) {
            return Ok(Some(p.clone()));
        }
        let page = match self.supplied.get(d) {
            Some(p) => p.clone(),
            None => match self.cache.get(d) {
                Some(p) if p.len() != PAGE_SIZE => return Err(DecodeError::BadStoredPage { digest: *d, len: p.len() }),
                Some(p) => p,
                None => return Ok(None),
            },
        };
        self.window.note(*d, &page);
        Ok(Some(page))
    }

    /// Lists the pages the rest of the batch (from the stalled reference at `cursor`) refers to
    /// that the decoder will not have by then: not in the window, not rebuilt earlier in the
    /// batch (literal or reference), not supplied or already requested, not in the store. A
    /// page that leaves the store meanwhile stalls again later and is asked for then; a window
    /// reference is never asked for (the source keeps no copy for those).
    fn collect_needs(&mut self, ops: &[u8], pages: &[u8], cursor: OpCursor) -> Result<(), DecodeError> {
        let mut seen: HashSet<PageDigest> = HashSet::new();
        let (mut opos, mut lpos) = (cursor.opos, cursor.lpos);
        // The op list was bounds-checked up to the stall only; a malformed rest ends the scan and
        // fails later, when decoding reaches it.
        while let Ok(Some(op)) = next_op(ops, &mut opos) {
            match op {
                Op::Literal(n) => {
                    let Some(run) = pages.get(lpos * PAGE_SIZE..(lpos + n) * PAGE_SIZE) else { break };
                    seen.extend(run.chunks_exact(PAGE_SIZE).map(PageDigest::of));
                    lpos += n;
                }
                Op::Ref(raw) => {
                    let d = PageDigest(raw);
                    if seen.insert(d)
                        && !self.window.map.contains_key(&d)
                        && !self.supplied.contains_key(&d)
                        && !self.requested.contains(&d)
                        && !self.cache.contains(&d)
                    {
                        if self.requested.len() >= MAX_REQUESTED_PAGES {
                            return Err(DecodeError::TooManyMissing {
                                count: self.requested.len() + 1,
                                limit: MAX_REQUESTED_PAGES,
                            });
                        }
                        self.requested.insert(d);
                        self.needs.push(d);
                        self.stats.pages_requested += 1;
                    }
                }
                Op::Verbatim(_) | Op::Zero(_) => {}
            }
        }
        Ok(())
    }

    /// Appends `data` to the stream hash (first pass).
    fn hash(&mut self, data: &[u8]) {
        self.hasher.update(data);
        self.produced += data.len() as u64;
    }

    /// First pass: applies ops from `cur` on, hashing the bytes they stand for and keeping the
    /// pages references resolve to in `self.refs`. Returns the digest of an unresolvable
    /// reference, with `cur` at that op, or `None` when the op list is done.
    fn apply_ops(
        &mut self,
        ops: &[u8],
        pages: &[u8],
        verbatim: &[u8],
        cur: &mut OpCursor,
    ) -> Result<Option<PageDigest>, DecodeError> {
        let OpCursor { mut opos, mut vpos, mut lpos, mut page_ops } = *cur;
        let bad = |s: &'static str| FrameError::BadBatch(s);
        loop {
            let op_start = (opos, page_ops);
            let Some(op) = next_op(ops, &mut opos).map_err(|e| self.frame_err(e))? else { break };
            if let Op::Zero(n) | Op::Literal(n) = op {
                page_ops = page_ops.saturating_add(n);
            } else if let Op::Ref(_) = op {
                page_ops += 1;
            }
            if page_ops > MAX_BATCH_PAGE_OPS {
                return Err(self.frame_err(bad("too many page ops")));
            }
            match op {
                Op::Verbatim(n) => {
                    let Some(v) = verbatim.get(vpos..vpos + n) else {
                        return Err(self.frame_err(bad("verbatim run past the verbatim area")));
                    };
                    self.hash(v);
                    vpos += n;
                }
                Op::Zero(n) => {
                    let mut left = n * PAGE_SIZE;
                    while left > 0 {
                        let k = left.min(ZEROS.len());
                        self.hash(&ZEROS[..k]);
                        left -= k;
                    }
                }
                Op::Literal(n) => {
                    let Some(run) = pages.get(lpos * PAGE_SIZE..(lpos + n) * PAGE_SIZE) else {
                        return Err(self.frame_err(bad("literal run past the page area")));
                    };
                    // Pages are hashed several at a time (see `page_hash`).
                    let mut digests = Vec::with_capacity(page_hash::MAX_GROUP);
                    for group in run.chunks(page_hash::MAX_GROUP * PAGE_SIZE) {
                        let mut refs = [&[0u8; PAGE_SIZE]; page_hash::MAX_GROUP];
                        let k = group.len() / PAGE_SIZE;
                        for (r, page) in refs.iter_mut().zip(group.chunks_exact(PAGE_SIZE)) {
                            *r = page.try_into().expect("page length");
                        }
                        digests.clear();
                        page_hash::digest_pages(&refs[..k], &mut digests);
                        for (page, &d) in refs[..k].iter().zip(&digests) {
                            let handle = Bytes::copy_from_slice(&page[..]);
                            self.window.note(d, &handle);
                            self.cache.insert(d, handle);
                        }
                    }
                    self.hash(run);
                    lpos += n;
                }
                Op::Ref(raw) => {
                    let d = PageDigest(raw);
                    let Some(page) = self.resolve(&d)? else {
                        // Stop before this op; it is re-read on resume.
                        (opos, page_ops) = op_start;
                        *cur = OpCursor { opos, vpos, lpos, page_ops };
                        return Ok(Some(d));
                    };
                    self.hash(&page);
                    self.refs.push(page);
                }
            }
        }
        *cur = OpCursor { opos, vpos, lpos, page_ops };
        if vpos != verbatim.len() || lpos != pages.len() / PAGE_SIZE {
            return Err(self.frame_err(bad("payload areas not fully used")));
        }
        Ok(None)
    }

    /// [`emit`](Self::emit) of a batch whose payload is in `self.payload`.
    fn emit_from_payload(&mut self, out: &mut Out<'_>) -> Result<(), DecodeError> {
        let payload = std::mem::take(&mut self.payload);
        let r = self.emit(&payload, out);
        self.payload = payload;
        r
    }

    /// Second pass of the verified pending batch: writes its bytes to `out` from where the last
    /// call stopped, until it is done (the batch is no longer pending) or `out` has no room.
    fn emit(&mut self, payload: &[u8], out: &mut Out<'_>) -> Result<(), DecodeError> {
        let Some(mut p) = self.pending.take() else { return Ok(()) };
        debug_assert!(p.verified);
        // The first pass checked every op and area; this only fails on a bug.
        let broken = || DecodeError::Frame { at: self.produced, source: FrameError::BadBatch("batch changed between passes") };
        let (pages, verbatim, ops) = payload_areas(&p.header, payload).ok_or_else(broken)?;
        let c = &mut p.emit;
        while p.left > 0 && out.room() > 0 {
            let mut next = c.opos;
            let op = next_op(ops, &mut next).ok().flatten().ok_or_else(broken)?;
            // `None`: a zero run.
            let src = match op {
                Op::Verbatim(n) => Some(verbatim.get(c.vpos..c.vpos + n).ok_or_else(broken)?),
                Op::Literal(n) => Some(pages.get(c.lpos * PAGE_SIZE..(c.lpos + n) * PAGE_SIZE).ok_or_else(broken)?),
                Op::Ref(_) => Some(self.refs.get(c.rpos).map(|page| &page[..]).ok_or_else(broken)?),
                Op::Zero(_) => None,
            };
            let len = match (op, src) {
                (Op::Zero(n), _) => n * PAGE_SIZE,
                (_, src) => src.map_or(0, <[u8]>::len),
            };
            let k = out.room().min(len - c.in_op);
            match src {
                Some(src) => out.buf.extend_from_slice(&src[c.in_op..c.in_op + k]),
                None => out.buf.resize(out.buf.len() + k, 0),
            }
            c.in_op += k;
            p.left -= k as u64;
            if c.in_op == len {
                c.in_op = 0;
                c.opos = next;
                match op {
                    Op::Verbatim(n) => c.vpos += n,
                    Op::Literal(n) => c.lpos += n,
                    Op::Ref(_) => c.rpos += 1,
                    Op::Zero(_) => {}
                }
            }
        }
        if p.left > 0 {
            self.pending = Some(p);
        }
        Ok(())
    }
}

/// A batch payload's areas: literal pages, verbatim bytes, ops (`None` if it is too short; the
/// frame header's lengths were checked against the payload's size before).
fn payload_areas<'a>(b: &BatchHeader, payload: &'a [u8]) -> Option<(&'a [u8], &'a [u8], &'a [u8])> {
    let pages_len = b.n_literal * PAGE_SIZE;
    let pages = payload.get(..pages_len)?;
    let verbatim = payload.get(pages_len..pages_len + b.verbatim_len)?;
    let ops = payload.get(pages_len + b.verbatim_len..)?;
    Some((pages, verbatim, ops))
}
