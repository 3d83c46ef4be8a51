//! Destination-side decoder: wire bytes → exactly the bytes the source QEMU wrote.
//!
//! Two-phase parsing: a frame header is checked against the format limits first (so a hostile
//! length fails at once, before anything is buffered or allocated for it); the frame is processed
//! only when all its bytes are present. Partial frames are kept in a buffer bounded by the largest
//! legal frame. Any error poisons the decoder: held-back bytes are dropped, never released.
//!
//! Digest gate: a running blake3 over every reconstructed byte is compared with the encoder's
//! checkpoints (one after every batch) and trailer. Reconstructed bytes are *held* until a
//! checkpoint covering them verified, so no byte — in particular no QEMU_VM_EOF — of a corrupted
//! stream ever reaches the destination QEMU; released output is always a verified prefix of what
//! the source QEMU wrote.
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
//! wire become GiB in one call). A batch is rebuilt whole (it is verified as a whole); verified
//! bytes beyond the bound stay in the decoder, and no further batch is started while they amount
//! to the bound: its input is kept buffered, as while stalled (up to
//! [`DecoderConfig::max_stalled_input`]). The caller calls [`push`](Decoder::push) with no input
//! while [`Decoder::has_pending_output`] to take the rest, before it pushes more input.

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

/// Rebuilt bytes are hashed about every this many bytes while a batch is rebuilt, while they are
/// still in the core's L2 cache (a batch is up to 18 MiB: hashing it afterwards reads it back
/// from L3 or memory).
const HASH_STEP: usize = 64 << 10;

/// The caller's output buffer during one public call. The decoder rebuilds straight into it:
/// `out[..verified]` may be released, `out[verified..]` is reconstructed but not yet covered by
/// a verified checkpoint. A checkpoint that verifies just moves `verified` (no copy); before the
/// call returns, the unverified rest moves to [`Decoder::held`] (see [`Decoder::unstage`]).
/// Dropping a `Staging` (an error, or a panic) cuts `out` back to `verified`, so the caller never
/// sees an unverified byte.
struct Staging<'a> {
    out: &'a mut Vec<u8>,
    /// Length of `out` when the call started.
    start: usize,
    verified: usize,
}

impl Staging<'_> {
    fn unverified(&self) -> usize {
        self.out.len() - self.verified
    }

    /// Verified bytes this call could release (the output bound may hold some back).
    fn verified_in_call(&self) -> usize {
        self.verified - self.start
    }

    /// Everything rebuilt so far was verified: it may be released.
    fn release_all(&mut self) {
        self.verified = self.out.len();
    }
}

impl Drop for Staging<'_> {
    fn drop(&mut self) {
        self.out.truncate(self.verified);
    }
}

/// Decoder settings.
#[derive(Debug, Clone)]
pub struct DecoderConfig {
    /// Largest session window accepted from an encoder (pages). Memory bound: 4 KiB per page in
    /// the worst case (pages are shared with the cache while it still holds them). Advertise this
    /// value to the source.
    pub max_session_window_pages: u64,
    /// Most reconstructed bytes held while waiting for the checkpoint that covers them. The
    /// encoder checkpoints after every batch (≤ 18 MiB of output), so this only stops a sender
    /// that never checkpoints from growing the decoder without bound.
    pub max_unverified_bytes: usize,
    /// Most wire bytes buffered while stalled on a missing page. The caller is expected to stop
    /// pushing while [`Decoder::is_stalled`] (so this holds at most the rest of one push); the
    /// limit stops one that does not.
    pub max_stalled_input: usize,
    /// Most bytes one [`Decoder::push`] or [`Decoder::supply`] appends to `out` (0 counts as 1).
    /// Verified bytes beyond it stay in the decoder until the next call, and no further batch is
    /// decoded meanwhile (see the [module docs](self)). The default is no bound (an in-memory
    /// decode of a trusted stream); a decoder fed from the network sets one (the gateway's
    /// `[limits] decoder_output`).
    pub max_output_per_push: usize,
}

impl Default for DecoderConfig {
    fn default() -> Self {
        Self {
            max_session_window_pages: 65536,
            max_unverified_bytes: 64 << 20,
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
    /// Too many bytes arrived without a checkpoint covering them.
    #[error("{held} reconstructed bytes without a checkpoint (limit {limit})")]
    Unverified {
        /// Bytes waiting.
        held: usize,
        /// [`DecoderConfig::max_unverified_bytes`].
        limit: usize,
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
    /// Reconstructed bytes not yet covered by a verified checkpoint, between calls (during a call
    /// they are at the end of the caller's buffer, see [`Staging`]). From `held_released` on,
    /// `held_verified` of them are verified bytes the output bound kept back, then the
    /// unverified ones.
    held: Vec<u8>,
    /// Bytes at the start of `held` released already (so draining it copies each byte once).
    held_released: usize,
    /// Verified bytes in `held` after `held_released`, released by the next calls.
    held_verified: usize,
    /// The last call stopped before a batch in `buf` because of the output bound.
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
            .field("held", &self.held.len())
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
            held: Vec::new(),
            held_released: 0,
            held_verified: 0,
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

    /// Bytes reconstructed so far (released or held).
    pub fn produced(&self) -> StreamOffset {
        StreamOffset::new(self.produced)
    }

    /// Bytes currently held back: awaiting verification, or verified and kept back by the
    /// output bound.
    pub fn held_back(&self) -> usize {
        self.held.len() - self.held_released
    }

    /// Whether a [`push`](Self::push) with no input would append more: verified bytes the
    /// output bound kept back, or buffered input not decoded because of it. Take them (push with
    /// no input until this is false) before pushing more input and before [`finish`](Self::finish).
    pub fn has_pending_output(&self) -> bool {
        self.held_verified > 0 || (self.paused && !self.buf.is_empty() && !self.failed)
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
        let mut out = self.stage(out);
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
                // A stalled batch was started within the output bound and is unverified, so
                // nothing verified was kept back behind it.
                debug_assert_eq!(self.held_verified, 0);
                self.resume(&mut out)?;
            }
            Ok(())
        })();
        self.unstage(out, r.is_ok());
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
        let mut out = self.stage(out);
        let r = (|| {
            if self.held_verified > 0 {
                // Bytes kept from an earlier call reached the output bound: take no input now.
                self.buf.extend_from_slice(wire);
                self.paused |= !self.buf.is_empty() && self.stall.is_none();
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
        self.unstage(out, r.is_ok());
        r
    }

    /// The wire ended. Succeeds only if the trailer arrived and verified (held bytes were released
    /// then, by the call that delivered it, so nothing is appended to `_out`); otherwise the
    /// stream ended early and held bytes are dropped.
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
        // The trailer verified everything (and nothing may follow it): `held` is empty.
        debug_assert!(self.held.is_empty());
        Ok(())
    }

    /// Starts a public call that may rebuild into `out` (see [`Staging`]): bytes held from an
    /// earlier call go first (the verified ones among them count as verified in this call).
    /// If verified bytes kept back by the output bound fill this call's bound, only they are
    /// appended (and `self.held_verified` stays non-zero: the call must take no input).
    fn stage<'a>(&mut self, out: &'a mut Vec<u8>) -> Staging<'a> {
        let start = out.len();
        if self.held_verified > 0 {
            let n = self.held_verified.min(self.output_bound());
            out.extend_from_slice(&self.held[self.held_released..self.held_released + n]);
            self.held_released += n;
            self.held_verified -= n;
            if self.held_verified > 0 {
                let verified = out.len();
                return Staging { out, start, verified };
            }
        }
        let verified = out.len();
        if self.held_released > 0 {
            // The unverified rest of what was kept.
            out.extend_from_slice(&self.held[self.held_released..]);
            self.held.clear();
            self.held_released = 0;
        } else if !self.held.is_empty() {
            if out.is_empty() && out.capacity() <= self.held.capacity() {
                std::mem::swap(out, &mut self.held);
            } else {
                out.extend_from_slice(&self.held);
                self.held.clear();
            }
        }
        Staging { out, start, verified }
    }

    /// [`DecoderConfig::max_output_per_push`], at least 1 (so every call makes progress).
    fn output_bound(&self) -> usize {
        self.cfg.max_output_per_push.max(1)
    }

    /// Ends a public call: on success, keeps for a later call what is not verified yet (at most
    /// one batch: the encoder checkpoints after each, so this is a batch whose checkpoint has not
    /// arrived, or one stalled on a page) and the verified bytes beyond the output bound; on
    /// failure, poisons the decoder. Either way `out` ends at the verified bytes, at most the
    /// output bound past where it started.
    fn unstage(&mut self, mut out: Staging<'_>, ok: bool) {
        let released = out.verified.min(out.start.saturating_add(self.output_bound()));
        let kept_verified = out.verified - released;
        out.verified = released;
        if !ok {
            self.fail();
            return;
        }
        if out.unverified() == 0 {
            // Everything released (or a call that only released kept bytes: `held` stays).
            return;
        }
        debug_assert!(self.held.is_empty() && self.held_verified == 0);
        self.held_verified = kept_verified;
        if out.verified == 0 {
            // Nothing released in this call: keep the whole buffer without copying it.
            std::mem::swap(out.out, &mut self.held);
        } else {
            self.held.extend_from_slice(&out.out[out.verified..]);
        }
    }

    fn fail(&mut self) {
        self.failed = true;
        self.held = Vec::new();
        self.held_released = 0;
        self.held_verified = 0;
        self.paused = false;
        self.buf = Vec::new();
        self.payload = Vec::new();
        self.supplied = HashMap::new();
        self.stall = None;
    }

    /// Processes what `self.buf` holds, keeping the unprocessed rest.
    fn process_buffered(&mut self, out: &mut Staging<'_>) -> Result<(), DecodeError> {
        let b = std::mem::take(&mut self.buf);
        let r = self.process(&b, out);
        self.buf = b;
        let used = r?;
        self.buf.drain(..used);
        Ok(())
    }

    /// Continues the stalled batch after a supply, then the input buffered behind it.
    fn resume(&mut self, out: &mut Staging<'_>) -> Result<(), DecodeError> {
        let Some(stall) = self.stall.take() else { return Ok(()) };
        let payload = std::mem::take(&mut self.payload);
        let r = self.rebuild(&stall.header, &payload, stall.cursor, out);
        self.payload = payload;
        if let Some((cursor, waiting)) = r? {
            self.stall = Some(Stall { cursor, waiting, ..stall });
            return Ok(());
        }
        self.batch_done(stall.frame_len);
        if !self.buf.is_empty() {
            self.process_buffered(out)?;
        }
        Ok(())
    }

    fn batch_done(&mut self, frame_len: usize) {
        self.consumed += frame_len as u64;
        // Supplies serve the batch that asked for them; later batches ask again if need be.
        self.supplied.clear();
    }

    fn frame_err(&self, source: FrameError) -> DecodeError {
        DecodeError::Frame { at: self.produced, source }
    }

    /// Processes complete frames at the start of `data`; returns bytes consumed and sets
    /// `self.need` for the incomplete remainder.
    fn process(&mut self, data: &[u8], out: &mut Staging<'_>) -> Result<usize, DecodeError> {
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
                    if out.verified_in_call() >= self.output_bound() {
                        // The output bound is reached: this batch waits in `buf` for a later call.
                        self.paused = true;
                        self.need = 0;
                        return Ok(pos);
                    }
                    pos += total;
                    if self.batch(&b, &rest[hlen..total], total, out)? {
                        // Stalled: the batch's payload is kept; the rest waits in `buf`.
                        self.need = 0;
                        return Ok(pos);
                    }
                }
                FrameHeader::Checkpoint { total_len, digest } | FrameHeader::Trailer { total_len, digest } => {
                    if total_len != self.produced || *self.hasher.finalize().as_bytes() != digest {
                        return Err(DecodeError::DigestMismatch { at: self.produced, claimed_len: total_len });
                    }
                    out.release_all();
                    if matches!(hdr, FrameHeader::Trailer { .. }) {
                        self.trailer_seen = true;
                    }
                    pos += hlen;
                    self.consumed += hlen as u64;
                }
            }
        }
        self.need = 0;
        Ok(pos)
    }

    /// Decodes one batch frame (`frame_len` wire bytes). Returns true if it stalled on a missing
    /// page; its payload is then kept in `self.payload` and `self.stall` says where to resume.
    fn batch(&mut self, b: &BatchHeader, body: &[u8], frame_len: usize, out: &mut Staging<'_>) -> Result<bool, DecodeError> {
        if b.stream_offset != self.produced {
            return Err(DecodeError::OffsetMismatch { at: self.produced, claimed: b.stream_offset });
        }
        let stalled = if b.compressed {
            let mut payload = std::mem::take(&mut self.payload);
            let r = self
                .decompress(b, body, &mut payload)
                .and_then(|()| self.rebuild(b, &payload, OpCursor::default(), out));
            self.payload = payload;
            r?
        } else {
            let r = self.rebuild(b, body, OpCursor::default(), out)?;
            if r.is_some() {
                // The wire buffer is not ours to keep: copy the (rare) raw batch that stalled.
                self.payload.clear();
                self.payload.extend_from_slice(body);
            }
            r
        };
        match stalled {
            Some((cursor, waiting)) => {
                self.stall = Some(Stall { header: *b, frame_len, cursor, waiting });
                Ok(true)
            }
            None => {
                self.batch_done(frame_len);
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

    /// Rebuilds one batch's original bytes from its payload at the end of `out` (unverified),
    /// starting at `cursor`. Returns where it stalled and on which page, if it did (bytes before
    /// the stall are rebuilt and hashed; the rest follows on resume).
    fn rebuild(
        &mut self,
        b: &BatchHeader,
        payload: &[u8],
        mut cursor: OpCursor,
        out: &mut Staging<'_>,
    ) -> Result<Option<(OpCursor, PageDigest)>, DecodeError> {
        let pages_len = b.n_literal * PAGE_SIZE;
        let pages = &payload[..pages_len];
        let verbatim = &payload[pages_len..pages_len + b.verbatim_len];
        let ops = &payload[pages_len + b.verbatim_len..];
        let start = out.out.len();
        let mut hashed = start;
        let r = self.apply_ops(ops, pages, verbatim, out.out, &mut cursor, &mut hashed);
        // On error nothing is released, and the decoder is poisoned: the hash no longer matters.
        let stalled = r?;
        self.hasher.update(&out.out[hashed..]);
        self.produced += (out.out.len() - start) as u64;
        if out.unverified() > self.cfg.max_unverified_bytes {
            return Err(DecodeError::Unverified { held: out.unverified(), limit: self.cfg.max_unverified_bytes });
        }
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

    /// Hashes `dst[*hashed..]` once [`HASH_STEP`] bytes are waiting, up to where the stream hash
    /// stays 8-KiB aligned (so it copies nothing to align them; see [`StreamHasher`]).
    fn hash_some(&mut self, dst: &[u8], hashed: &mut usize) {
        if dst.len() - *hashed >= HASH_STEP {
            let n = self.hasher.aligned_prefix(dst.len() - *hashed);
            self.hasher.update(&dst[*hashed..*hashed + n]);
            *hashed += n;
        }
    }

    /// Applies ops from `cur` on, appending to `dst`. Returns the digest of an unresolvable
    /// reference, with `cur` at that op, or `None` when the op list is done. Hashes `dst` from
    /// `*hashed` on as it goes, leaving the last (< [`HASH_STEP`]) bytes to the caller.
    fn apply_ops(
        &mut self,
        ops: &[u8],
        pages: &[u8],
        verbatim: &[u8],
        dst: &mut Vec<u8>,
        cur: &mut OpCursor,
        hashed: &mut usize,
    ) -> Result<Option<PageDigest>, DecodeError> {
        let OpCursor { mut opos, mut vpos, mut lpos, mut page_ops } = *cur;
        let bad = |s: &'static str| FrameError::BadBatch(s);
        loop {
            self.hash_some(dst, hashed);
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
                    dst.extend_from_slice(v);
                    vpos += n;
                }
                Op::Zero(n) => dst.resize(dst.len() + n * PAGE_SIZE, 0),
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
                            dst.extend_from_slice(&page[..]);
                            let handle = Bytes::copy_from_slice(&page[..]);
                            self.window.note(d, &handle);
                            self.cache.insert(d, handle);
                        }
                        self.hash_some(dst, hashed);
                    }
                    lpos += n;
                }
                Op::Ref(raw) => {
                    let d = PageDigest(raw);
                    // The common case, a page in the window, is copied without taking a handle.
                    if let Some(page) = self.window.map.get(&d) {
                        dst.extend_from_slice(page);
                        continue;
                    }
                    let Some(page) = self.resolve(&d)? else {
                        // Stop before this op; it is re-read on resume.
                        (opos, page_ops) = op_start;
                        *cur = OpCursor { opos, vpos, lpos, page_ops };
                        return Ok(Some(d));
                    };
                    dst.extend_from_slice(&page);
                }
            }
        }
        *cur = OpCursor { opos, vpos, lpos, page_ops };
        if vpos != verbatim.len() || lpos != b_lit(pages) {
            return Err(self.frame_err(bad("payload areas not fully used")));
        }
        Ok(None)
    }
}

fn b_lit(pages: &[u8]) -> usize {
    pages.len() / PAGE_SIZE
}
