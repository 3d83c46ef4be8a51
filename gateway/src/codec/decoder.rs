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

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use thiserror::Error;

use crate::codec::frame::{
    next_op, parse_frame_header, BatchHeader, FrameError, FrameHeader, Op, Preamble, MAX_BATCH_PAGE_OPS,
};
use crate::codec::page_cache::PageStore;
use crate::codec::{PageDigest, PAGE_SIZE};

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
}

impl Default for DecoderConfig {
    fn default() -> Self {
        Self { max_session_window_pages: 65536, max_unverified_bytes: 64 << 20 }
    }
}

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
    /// A referenced page is neither in the session window nor in the page store (evicted since it
    /// was advertised, or never held). The migration fails; the source VM keeps running.
    #[error("referenced page {0} is not available at the destination")]
    MissingPage(PageDigest),
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

/// The decoder's half of the session window (see [`crate::codec`]): the same FIFO rule as the
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
    hasher: blake3::Hasher,
    produced: u64,
    /// Reconstructed bytes not yet covered by a verified checkpoint.
    held: Vec<u8>,
    trailer_seen: bool,
    failed: bool,
    payload: Vec<u8>,
    dctx: Option<zstd::bulk::Decompressor<'static>>,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder")
            .field("produced", &self.produced)
            .field("held", &self.held.len())
            .field("trailer_seen", &self.trailer_seen)
            .field("failed", &self.failed)
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
            hasher: blake3::Hasher::new(),
            produced: 0,
            held: Vec::new(),
            trailer_seen: false,
            failed: false,
            payload: Vec::new(),
            dctx: None,
        }
    }

    /// Bytes reconstructed so far (released or held).
    pub fn produced(&self) -> u64 {
        self.produced
    }

    /// Bytes currently held back awaiting verification.
    pub fn held_back(&self) -> usize {
        self.held.len()
    }

    /// Whether the trailer arrived and verified.
    pub fn is_complete(&self) -> bool {
        self.trailer_seen && !self.failed
    }

    /// Feeds wire bytes (any split points); appends bytes that may be released to QEMU to `out`.
    /// On error nothing more is ever released and every later call fails.
    pub fn push(&mut self, mut wire: &[u8], out: &mut Vec<u8>) -> Result<(), DecodeError> {
        if self.failed {
            return Err(DecodeError::Poisoned);
        }
        let r = (|| {
            // Complete a buffered partial frame, copying only as much as it needs.
            while !self.buf.is_empty() && !wire.is_empty() {
                let want = self.need.saturating_sub(self.buf.len()).max(1);
                let take = want.min(wire.len());
                self.buf.extend_from_slice(&wire[..take]);
                wire = &wire[take..];
                // Try even if short of `need`: header needs are estimates, and the wire may end here.
                let b = std::mem::take(&mut self.buf);
                let r = self.process(&b, out);
                self.buf = b;
                let used = r?;
                self.buf.drain(..used);
            }
            if self.buf.is_empty() && !wire.is_empty() {
                let used = self.process(wire, out)?;
                self.buf.extend_from_slice(&wire[used..]);
            }
            Ok(())
        })();
        if r.is_err() {
            self.fail();
        }
        r
    }

    /// The wire ended. Succeeds only if the trailer arrived and verified (held bytes were released
    /// then); otherwise the stream ended early and held bytes are dropped.
    pub fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), DecodeError> {
        if self.failed {
            return Err(DecodeError::Poisoned);
        }
        if !self.trailer_seen {
            self.fail();
            return Err(DecodeError::Truncated { produced: self.produced, buffered: self.buf.len() });
        }
        self.release_all(out);
        Ok(())
    }

    fn fail(&mut self) {
        self.failed = true;
        self.held = Vec::new();
    }

    fn frame_err(&self, source: FrameError) -> DecodeError {
        DecodeError::Frame { at: self.produced, source }
    }

    /// Processes complete frames at the start of `data`; returns bytes consumed and sets
    /// `self.need` for the incomplete remainder.
    fn process(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<usize, DecodeError> {
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
                    self.batch(&b, &rest[hlen..total])?;
                    pos += total;
                }
                FrameHeader::Checkpoint { total_len, digest } | FrameHeader::Trailer { total_len, digest } => {
                    if total_len != self.produced || *self.hasher.finalize().as_bytes() != digest {
                        return Err(DecodeError::DigestMismatch { at: self.produced, claimed_len: total_len });
                    }
                    self.release_all(out);
                    if matches!(hdr, FrameHeader::Trailer { .. }) {
                        self.trailer_seen = true;
                    }
                    pos += hlen;
                }
            }
        }
        self.need = 0;
        Ok(pos)
    }

    fn batch(&mut self, b: &BatchHeader, body: &[u8]) -> Result<(), DecodeError> {
        if b.stream_offset != self.produced {
            return Err(DecodeError::OffsetMismatch { at: self.produced, claimed: b.stream_offset });
        }
        if !b.compressed {
            return self.rebuild(b, body);
        }
        let mut payload = std::mem::take(&mut self.payload);
        let r = self.decompress(b, body, &mut payload).and_then(|()| self.rebuild(b, &payload));
        self.payload = payload;
        r
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

    /// Rebuilds one batch's original bytes from its payload into the held buffer.
    fn rebuild(&mut self, b: &BatchHeader, payload: &[u8]) -> Result<(), DecodeError> {
        let pages_len = b.n_literal * PAGE_SIZE;
        let pages = &payload[..pages_len];
        let verbatim = &payload[pages_len..pages_len + b.verbatim_len];
        let ops = &payload[pages_len + b.verbatim_len..];
        let mut held = std::mem::take(&mut self.held);
        let start = held.len();
        let r = self.apply_ops(ops, pages, verbatim, &mut held);
        if r.is_ok() {
            self.hasher.update(&held[start..]);
            self.produced += (held.len() - start) as u64;
        }
        self.held = held;
        r?;
        if self.held.len() > self.cfg.max_unverified_bytes {
            return Err(DecodeError::Unverified { held: self.held.len(), limit: self.cfg.max_unverified_bytes });
        }
        Ok(())
    }

    fn apply_ops(&mut self, ops: &[u8], pages: &[u8], verbatim: &[u8], dst: &mut Vec<u8>) -> Result<(), DecodeError> {
        let (mut opos, mut vpos, mut lpos, mut page_ops) = (0usize, 0usize, 0usize, 0usize);
        let bad = |s: &'static str| FrameError::BadBatch(s);
        while let Some(op) = next_op(ops, &mut opos).map_err(|e| self.frame_err(e))? {
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
                    for page in run.chunks_exact(PAGE_SIZE) {
                        dst.extend_from_slice(page);
                        let d = PageDigest::of(page);
                        let handle = Bytes::copy_from_slice(page);
                        self.window.note(d, &handle);
                        self.cache.insert(d, handle);
                    }
                    lpos += n;
                }
                Op::Ref(raw) => {
                    let d = PageDigest(raw);
                    let page = match self.window.map.get(&d) {
                        Some(p) => p.clone(),
                        None => {
                            let p = self.cache.get(&d).ok_or(DecodeError::MissingPage(d))?;
                            if p.len() != PAGE_SIZE {
                                return Err(DecodeError::BadStoredPage { digest: d, len: p.len() });
                            }
                            self.window.note(d, &p);
                            p
                        }
                    };
                    dst.extend_from_slice(&page);
                }
            }
        }
        if vpos != verbatim.len() || lpos != b_lit(pages) {
            return Err(self.frame_err(bad("payload areas not fully used")));
        }
        Ok(())
    }

    /// Everything reconstructed so far was verified: hand it over.
    fn release_all(&mut self, out: &mut Vec<u8>) {
        if out.is_empty() {
            // Common case: the caller passes an empty buffer per call; no copy.
            std::mem::swap(out, &mut self.held);
        } else {
            out.extend_from_slice(&self.held);
            self.held.clear();
        }
    }
}

fn b_lit(pages: &[u8]) -> usize {
    pages.len() / PAGE_SIZE
}
