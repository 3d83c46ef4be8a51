//! Source-side encoder: bytes read from the source QEMU → wire bytes.
//!
//! The encoder tokenizes the stream ([`qemu`](super::qemu)), classifies every page token as zero,
//! reference or literal, and packs the interleaving of verbatim runs and page ops into batch
//! frames ([`frame`]). It never fails: input it cannot follow goes verbatim
//! (opaque mode), so the round trip is exact for *any* byte stream.
//!
//! Memory is bounded by the batch thresholds, one partial QEMU record (≤ 4 KiB + header), the
//! session window index (digests only, no page data), and the pages retained for resupply (held
//! by the [`PageRetainer`] the encoder was given, within its budget).

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use zstd::stream::raw::{InBuffer, Operation, OutBuffer};

use crate::digest_set::DestinationIndex;
use crate::frame::{
    self, encode_digest_frame, put_varint, BatchHeader, Preamble, MAX_BATCH_LITERAL, MAX_BATCH_PAGE_OPS,
    MAX_BATCH_VERBATIM, MAX_SESSION_WINDOW,
};
use crate::qemu::main_channel::MainChannelTokenizer;
use crate::qemu::multifd::MultifdTokenizer;
use crate::qemu::{Token, Tokenizer};
use crate::page_hash;
use crate::offset::WireOffset;
use crate::stores::PageRetainer;
use crate::stream_hash::StreamHasher;
use crate::{is_zero_page, PageDigest, PAGE_SIZE};

/// Largest `NeedMore` a tokenizer may ask for; anything larger is a tokenizer bug and is handled
/// by going opaque rather than by buffering without bound.
const MAX_PENDING: usize = 64 << 10;

/// Most tokens [`Encoder::tokenize`] reads ahead of the one it applies (a page record is usually
/// two: its header and its page).
const LOOKAHEAD_TOKENS: usize = 64;

/// A token read ahead: `(offset, length)` of verbatim bytes, or the offset of a page and the
/// index of its digest (`None`: a zero page).
#[derive(Clone, Copy)]
enum Tok {
    Verbatim(usize, usize),
    Page(usize, Option<usize>),
}

/// Why reading ahead stopped before the end of the input.
enum Stop {
    Need(usize),
    Opaque(String),
}

/// Encoder settings.
#[derive(Debug, Clone)]
pub struct EncoderConfig {
    /// zstd level for batches (1–3 keeps up with a 10 Gbit/s WAN on one core; negative = faster).
    pub zstd_level: i32,
    /// Literal pages per batch (clamped to 1..=[`MAX_BATCH_LITERAL`]). Bigger batches compress
    /// better; the caller's [`Encoder::flush`] on idle bounds the latency they add.
    pub batch_pages: usize,
    /// Verbatim bytes per batch (clamped to 1..=[`MAX_BATCH_VERBATIM`]).
    pub batch_verbatim_bytes: usize,
    /// Session window in pages: must not exceed what the destination advertised
    /// ([`Advertisement::session_window_pages`](super::Advertisement)). 0 disables in-session
    /// references.
    pub session_window_pages: u64,
}

impl Default for EncoderConfig {
    fn default() -> Self {
        Self {
            zstd_level: 3,
            batch_pages: 256,
            batch_verbatim_bytes: 1 << 20,
            session_window_pages: 65536,
        }
    }
}

/// What the encoder found the connection to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamMode {
    /// Fewer than 4 bytes seen.
    Detecting,
    /// QEMU main channel, records being followed.
    Main,
    /// QEMU main channel, in the device-state tail (verbatim until close, by design).
    MainTail,
    /// QEMU multifd channel.
    Multifd,
    /// Verbatim (unknown content, or a parser gave up: see [`CodecStats::opaque_reason`]).
    Opaque,
}

/// Encoder counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodecStats {
    /// Bytes fed to [`Encoder::push`].
    pub bytes_in: u64,
    /// Wire bytes produced.
    pub wire_bytes_out: u64,
    /// Bytes that travelled in verbatim runs (before compression).
    pub verbatim_bytes: u64,
    /// Zero pages (a few bytes each).
    pub zero_pages: u64,
    /// Pages sent as references to this session's window.
    pub window_refs: u64,
    /// Pages sent as references to the destination's advertised cache.
    pub advertised_refs: u64,
    /// Advertised pages sent literally because the retention budget was full.
    pub unretained_literals: u64,
    /// Advertised pages sent again because the destination no longer held them (counted by the
    /// [`PageRetainer`], as the destination asks for them).
    pub resupplied_pages: u64,
    /// Pages sent literally (zstd-compressed in batches).
    pub literal_pages: u64,
    /// Batch frames written.
    pub batches: u64,
    /// Checkpoint frames written.
    pub checkpoints: u64,
    /// Current mode.
    pub mode: StreamMode,
    /// Why the encoder went opaque, if it did.
    pub opaque_reason: Option<String>,
}

impl CodecStats {
    /// All page references.
    pub fn ref_pages(&self) -> u64 {
        self.window_refs + self.advertised_refs
    }
}

enum Kind {
    Detect,
    Main(MainChannelTokenizer),
    Multifd(MultifdTokenizer),
    Opaque,
}

/// The batch under construction.
#[derive(Default)]
struct Batch {
    pages: Vec<u8>,
    verbatim: Vec<u8>,
    ops: Vec<u8>,
    page_ops: usize,
    /// Pending run: (op code, length) not yet written to `ops`.
    run: Option<(u8, u64)>,
    /// Advertised pages this batch refers to, retained until it is acknowledged.
    retained: Vec<PageDigest>,
}

impl Batch {
    fn close_run(&mut self) {
        if let Some((code, n)) = self.run.take() {
            self.ops.push(code);
            put_varint(&mut self.ops, n);
        }
    }

    fn extend_run(&mut self, code: u8, n: u64) {
        match &mut self.run {
            Some((c, len)) if *c == code => *len += n,
            _ => {
                self.close_run();
                self.run = Some((code, n));
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.ops.is_empty() && self.run.is_none()
    }

    fn n_literal(&self) -> usize {
        self.pages.len() / PAGE_SIZE
    }
}

/// FIFO of the last N distinct pages that crossed the connection; the decoder runs the same one.
struct SessionWindow {
    cap: usize,
    set: HashSet<PageDigest>,
    order: VecDeque<PageDigest>,
}

impl SessionWindow {
    fn new(cap: usize) -> Self {
        Self { cap, set: HashSet::new(), order: VecDeque::new() }
    }

    fn contains(&self, d: &PageDigest) -> bool {
        self.set.contains(d)
    }

    /// Records a page that crossed the connection (no-op if already present).
    fn note(&mut self, d: PageDigest) {
        if self.cap == 0 || self.set.contains(&d) {
            return;
        }
        if self.order.len() == self.cap {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        self.set.insert(d);
        self.order.push_back(d);
    }
}

/// Source-side encoder. See the [module docs](self) and [crate docs](crate).
pub struct Encoder {
    cfg: EncoderConfig,
    dest_index: Arc<dyn DestinationIndex>,
    kind: Kind,
    /// Bytes of an incomplete record, waiting for more input.
    pending: Vec<u8>,
    /// What the tokenizer last asked for (bytes from the start of `pending`).
    need: usize,
    batch: Batch,
    window: SessionWindow,
    hasher: StreamHasher,
    /// Original-stream bytes placed into batches so far.
    emitted: u64,
    /// `emitted` when the current batch started.
    batch_start: u64,
    /// `emitted` at the last checkpoint.
    checkpointed: Option<u64>,
    preamble_sent: bool,
    finished: bool,
    zstd: Option<zstd::stream::raw::Encoder<'static>>,
    zbuf: Vec<u8>,
    /// Digests of the pages read ahead (kept for its allocation).
    digests: Vec<PageDigest>,
    stats: CodecStats,
    /// Copies of referenced advertised pages, shared with whoever answers the destination.
    retained: Arc<dyn PageRetainer>,
    /// `(stats.wire_bytes_out, out.len())` when the current public call started: turns a
    /// position in the caller's `out` into a wire offset.
    call_base: (u64, usize),
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder").field("stats", &self.stats).finish_non_exhaustive()
    }
}

impl Encoder {
    /// A new encoder for one connection. `dest_index` says which pages the destination already
    /// holds (e.g. a [`DigestSet`](super::DigestSet) from its advertisement, or
    /// [`NoIndex`](super::NoIndex)). `retained` keeps a copy of every advertised page the encoder
    /// refers to until the destination acknowledged the batch (see [`PageRetainer`]); with
    /// [`NoRetainer`](crate::stores::NoRetainer) the encoder never refers to advertised pages.
    pub fn new(mut cfg: EncoderConfig, dest_index: Arc<dyn DestinationIndex>, retained: Arc<dyn PageRetainer>) -> Self {
        cfg.batch_pages = cfg.batch_pages.clamp(1, MAX_BATCH_LITERAL);
        cfg.batch_verbatim_bytes = cfg.batch_verbatim_bytes.clamp(1, MAX_BATCH_VERBATIM);
        cfg.session_window_pages = cfg.session_window_pages.min(MAX_SESSION_WINDOW);
        // If zstd can't set up a context (out of memory), batches go uncompressed: still correct.
        let zstd = zstd::stream::raw::Encoder::new(cfg.zstd_level).ok();
        let window = SessionWindow::new(cfg.session_window_pages as usize);
        Self {
            cfg,
            dest_index,
            kind: Kind::Detect,
            pending: Vec::new(),
            need: 0,
            batch: Batch::default(),
            window,
            hasher: StreamHasher::new(),
            emitted: 0,
            batch_start: 0,
            checkpointed: None,
            preamble_sent: false,
            finished: false,
            zstd,
            zbuf: Vec::new(),
            digests: Vec::new(),
            stats: CodecStats {
                bytes_in: 0,
                wire_bytes_out: 0,
                verbatim_bytes: 0,
                zero_pages: 0,
                window_refs: 0,
                advertised_refs: 0,
                unretained_literals: 0,
                resupplied_pages: 0,
                literal_pages: 0,
                batches: 0,
                checkpoints: 0,
                mode: StreamMode::Detecting,
                opaque_reason: None,
            },
            retained,
            call_base: (0, 0),
        }
    }

    /// Counters and mode.
    pub fn stats(&self) -> CodecStats {
        let mut s = self.stats.clone();
        s.mode = match &self.kind {
            Kind::Detect => StreamMode::Detecting,
            Kind::Main(t) if t.in_tail() => StreamMode::MainTail,
            Kind::Main(_) => StreamMode::Main,
            Kind::Multifd(_) => StreamMode::Multifd,
            Kind::Opaque => StreamMode::Opaque,
        };
        s.resupplied_pages = self.retained.resupplied_pages();
        s
    }

    /// blake3 of the stream encoded so far; after [`finish`](Self::finish), of every byte pushed
    /// (the digest the trailer carries). A caller that needs the digest of what it read from the
    /// source takes this one instead of hashing the same bytes again.
    pub fn stream_digest(&self) -> blake3::Hash {
        self.hasher.finalize()
    }

    /// Feeds bytes read from QEMU; appends wire bytes to `out`. Never fails. Input after
    /// [`finish`](Self::finish) is ignored (the source half-closed; there is none).
    pub fn push(&mut self, mut input: &[u8], out: &mut Vec<u8>) {
        if self.finished {
            debug_assert!(input.is_empty(), "Encoder::push after finish");
            return;
        }
        let start = out.len();
        self.call_base = (self.stats.wire_bytes_out, start);
        self.stats.bytes_in += input.len() as u64;
        self.ensure_preamble(out);
        // Complete a partial record first, topping `pending` up only as far as the tokenizer
        // asked, so most input is tokenized in place without a copy.
        while !self.pending.is_empty() && !input.is_empty() {
            let want = self.need.saturating_sub(self.pending.len()).max(1);
            let take = want.min(input.len());
            self.pending.extend_from_slice(&input[..take]);
            input = &input[take..];
            if self.pending.len() < self.need {
                break;
            }
            let pend = std::mem::take(&mut self.pending);
            let used = self.tokenize(&pend, out);
            self.pending = pend;
            self.pending.drain(..used);
        }
        if self.pending.is_empty() && !input.is_empty() {
            let used = self.tokenize(input, out);
            self.pending.extend_from_slice(&input[used..]);
        }
        self.stats.wire_bytes_out += (out.len() - start) as u64;
    }

    /// The source went idle: flushes the pending batch (and its checkpoint) so the destination
    /// gets every byte read so far. Call it whenever the source connection has been idle for a few
    /// milliseconds (see [crate docs](crate)); cheap if nothing changed.
    pub fn flush(&mut self, out: &mut Vec<u8>) {
        if self.finished {
            return;
        }
        let start = out.len();
        self.call_base = (self.stats.wire_bytes_out, start);
        self.ensure_preamble(out);
        if matches!(self.kind, Kind::Detect) && !self.pending.is_empty() {
            // A QEMU stream writes its magic in one go; a source that pauses before 4 bytes
            // (a request/response protocol, say) must not be held back waiting for them.
            self.go_opaque("source paused before sending 4 bytes".into());
            self.drain_pending_verbatim(out);
        }
        self.flush_batch(out);
        self.checkpoint(out);
        self.stats.wire_bytes_out += (out.len() - start) as u64;
    }

    fn checkpoint(&mut self, out: &mut Vec<u8>) {
        if self.checkpointed != Some(self.emitted) {
            encode_digest_frame(out, false, self.emitted, self.hasher.finalize().as_bytes());
            self.checkpointed = Some(self.emitted);
            self.stats.checkpoints += 1;
        }
    }

    /// Source TCP half-closed: flushes everything (an incomplete trailing record goes verbatim)
    /// and appends the trailer (total length + blake3 of all input). Idempotent.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if self.finished {
            return;
        }
        let start = out.len();
        self.call_base = (self.stats.wire_bytes_out, start);
        self.ensure_preamble(out);
        if !self.pending.is_empty() {
            if matches!(self.kind, Kind::Detect) {
                self.go_opaque("stream shorter than 4 bytes".into());
            }
            self.drain_pending_verbatim(out);
        }
        self.flush_batch(out);
        encode_digest_frame(out, true, self.emitted, self.hasher.finalize().as_bytes());
        self.finished = true;
        self.stats.wire_bytes_out += (out.len() - start) as u64;
    }

    /// Emits the held partial record (or undecided first bytes) as a verbatim run.
    fn drain_pending_verbatim(&mut self, out: &mut Vec<u8>) {
        let pend = std::mem::take(&mut self.pending);
        let mut hashed = 0;
        self.add_verbatim(&pend, 0, pend.len(), &mut hashed, out);
        self.hasher.update(&pend[hashed..]);
    }

    fn ensure_preamble(&mut self, out: &mut Vec<u8>) {
        if !self.preamble_sent {
            Preamble { mode: frame::MODE_UNKNOWN, session_window_pages: self.cfg.session_window_pages }.encode(out);
            self.preamble_sent = true;
        }
    }

    fn go_opaque(&mut self, reason: String) {
        self.kind = Kind::Opaque;
        if self.stats.opaque_reason.is_none() {
            self.stats.opaque_reason = Some(reason);
        }
    }

    /// Tokenizes a prefix of `data` into the batch; returns how many bytes were consumed. The rest
    /// is an incomplete record (`self.need` says how much is needed from its start).
    ///
    /// The stream hash is updated in as few calls as possible (blake3 is several times faster on
    /// long inputs than record by record): `hashed` trails `pos` and catches up only when a batch
    /// is flushed, because its checkpoint must cover exactly the bytes emitted so far.
    ///
    /// Tokens are read a few pages ahead ([`LOOKAHEAD_TOKENS`]) so the non-zero pages among them
    /// are hashed together ([`page_hash`]), then applied in stream order exactly as one by one:
    /// the tokenizer does not depend on what the encoder does with its tokens.
    fn tokenize(&mut self, data: &[u8], out: &mut Vec<u8>) -> usize {
        let mut pos = 0;
        let mut hashed = 0;
        let group = page_hash::group_size();
        let mut toks = [Tok::Verbatim(0, 0); LOOKAHEAD_TOKENS];
        let mut digests = std::mem::take(&mut self.digests);
        while pos < data.len() {
            let rest = &data[pos..];
            if matches!(self.kind, Kind::Detect) {
                if rest.len() < 4 {
                    self.need = 4;
                    break;
                }
                match rest[..4] {
                    [0x51, 0x45, 0x56, 0x4d] => self.kind = Kind::Main(MainChannelTokenizer::new()),
                    [0x11, 0x22, 0x33, 0x44] => self.kind = Kind::Multifd(MultifdTokenizer::new()),
                    _ => self.go_opaque("no QEMU magic".into()),
                }
            }
            // Look ahead: up to `group` non-zero pages (or LOOKAHEAD_TOKENS tokens).
            let (mut n_toks, mut scan) = (0, pos);
            let mut pages = [&[0u8; PAGE_SIZE]; page_hash::MAX_GROUP];
            let mut n_pages = 0;
            let mut stop = None;
            while scan < data.len() && n_toks < LOOKAHEAD_TOKENS && n_pages < group {
                let rest = &data[scan..];
                let tok = match &mut self.kind {
                    Kind::Detect => Token::NeedMore(4),
                    Kind::Main(t) => t.next_token(rest),
                    Kind::Multifd(t) => t.next_token(rest),
                    Kind::Opaque => Token::Verbatim(rest.len()),
                };
                match tok {
                    Token::Verbatim(n) if n >= 1 && n <= rest.len() => {
                        toks[n_toks] = Tok::Verbatim(scan, n);
                        scan += n;
                    }
                    Token::Page if rest.len() >= PAGE_SIZE => {
                        let page: &[u8; PAGE_SIZE] = rest[..PAGE_SIZE].try_into().expect("page length");
                        toks[n_toks] = if is_zero_page(page) {
                            Tok::Page(scan, None)
                        } else {
                            pages[n_pages] = page;
                            n_pages += 1;
                            Tok::Page(scan, Some(n_pages - 1))
                        };
                        scan += PAGE_SIZE;
                    }
                    Token::NeedMore(n) if n > rest.len() && n <= MAX_PENDING => {
                        stop = Some(Stop::Need(n));
                        break;
                    }
                    Token::Opaque(reason) => {
                        stop = Some(Stop::Opaque(reason));
                        break;
                    }
                    other => {
                        stop = Some(Stop::Opaque(format!("internal: tokenizer returned {other:?} for {} bytes", rest.len())));
                        break;
                    }
                }
                n_toks += 1;
            }
            digests.clear();
            page_hash::digest_pages(&pages[..n_pages], &mut digests);
            for tok in &toks[..n_toks] {
                match *tok {
                    Tok::Verbatim(at, n) => self.add_verbatim(data, at, n, &mut hashed, out),
                    Tok::Page(at, d) => self.add_page(data, at, d.map(|i| digests[i]), &mut hashed, out),
                }
            }
            pos = scan;
            match stop {
                Some(Stop::Need(n)) => {
                    self.need = n;
                    break;
                }
                Some(Stop::Opaque(reason)) => self.go_opaque(reason),
                None => {}
            }
        }
        self.digests = digests;
        self.hasher.update(&data[hashed..pos]);
        pos
    }

    /// Flushes the batch; `data[*hashed..at]` are emitted bytes not yet hashed.
    fn flush_at(&mut self, data: &[u8], at: usize, hashed: &mut usize, out: &mut Vec<u8>) {
        self.hasher.update(&data[*hashed..at]);
        *hashed = at;
        self.flush_batch(out);
    }

    /// Adds `data[at..at + n]` as verbatim bytes, flushing batches as they fill.
    fn add_verbatim(&mut self, data: &[u8], at: usize, n: usize, hashed: &mut usize, out: &mut Vec<u8>) {
        self.stats.verbatim_bytes += n as u64;
        let (mut pos, end) = (at, at + n);
        while pos < end {
            let space = self.cfg.batch_verbatim_bytes - self.batch.verbatim.len();
            if space == 0 {
                self.flush_at(data, pos, hashed, out);
                continue;
            }
            let k = space.min(end - pos);
            self.batch.verbatim.extend_from_slice(&data[pos..pos + k]);
            self.batch.extend_run(frame::OP_VERBATIM, k as u64);
            self.emitted += k as u64;
            pos += k;
        }
    }

    /// Adds the page at `data[at..at + PAGE_SIZE]`, whose digest is `digest` (`None`: a zero
    /// page).
    fn add_page(&mut self, data: &[u8], at: usize, digest: Option<PageDigest>, hashed: &mut usize, out: &mut Vec<u8>) {
        let page = &data[at..at + PAGE_SIZE];
        enum PageKind {
            Zero,
            Ref(PageDigest, bool),
            Literal(PageDigest),
        }
        let mut kind = if let Some(d) = digest {
            if self.window.contains(&d) {
                PageKind::Ref(d, true)
            } else if self.dest_index.may_contain(&d) {
                PageKind::Ref(d, false)
            } else {
                PageKind::Literal(d)
            }
        } else {
            PageKind::Zero
        };
        let literal_full = matches!(kind, PageKind::Literal(_)) && self.batch.n_literal() >= self.cfg.batch_pages;
        if literal_full || self.batch.page_ops >= MAX_BATCH_PAGE_OPS {
            self.flush_at(data, at, hashed, out);
        }
        if let PageKind::Ref(d, false) = kind {
            // Retained only now, after any flush: the copy must outlive the batch the reference
            // actually lands in. Never refer to a page the destination could not get again.
            if self.retained.retain(d, page) {
                self.batch.retained.push(d);
            } else {
                self.stats.unretained_literals += 1;
                kind = PageKind::Literal(d);
                if self.batch.n_literal() >= self.cfg.batch_pages {
                    self.flush_at(data, at, hashed, out);
                }
            }
        }
        self.batch.page_ops += 1;
        self.emitted += PAGE_SIZE as u64;
        match kind {
            PageKind::Zero => {
                self.stats.zero_pages += 1;
                self.batch.extend_run(frame::OP_ZERO, 1);
            }
            PageKind::Ref(d, from_window) => {
                if from_window {
                    self.stats.window_refs += 1;
                } else {
                    self.stats.advertised_refs += 1;
                }
                // Same rule as the decoder: a page that crossed the connection enters the window
                // (a window hit is there already).
                if !from_window {
                    self.window.note(d);
                }
                self.batch.close_run();
                self.batch.ops.push(frame::OP_REF);
                self.batch.ops.extend_from_slice(&d.0);
            }
            PageKind::Literal(d) => {
                self.stats.literal_pages += 1;
                self.window.note(d);
                self.batch.pages.extend_from_slice(page);
                self.batch.extend_run(frame::OP_LITERAL, 1);
            }
        }
    }

    fn flush_batch(&mut self, out: &mut Vec<u8>) {
        self.batch.close_run();
        if self.batch.is_empty() {
            return;
        }
        let b = std::mem::take(&mut self.batch);
        let parts = [&b.pages[..], &b.verbatim[..], &b.ops[..]];
        let raw_len: usize = parts.iter().map(|p| p.len()).sum();
        let compressed = self.compress(&parts) && self.zbuf.len() < raw_len;
        let header = BatchHeader {
            compressed,
            stream_offset: self.batch_start,
            n_literal: b.n_literal(),
            verbatim_len: b.verbatim.len(),
            ops_len: b.ops.len(),
            body_len: if compressed { self.zbuf.len() } else { raw_len },
        };
        header.encode(out);
        if compressed {
            out.extend_from_slice(&self.zbuf);
        } else {
            for p in parts {
                out.extend_from_slice(p);
            }
        }
        if !b.retained.is_empty() {
            // The destination has decoded this batch once it acknowledges the wire up to here.
            let end = WireOffset::new(self.call_base.0 + (out.len() - self.call_base.1) as u64);
            self.retained.seal(&b.retained, end);
        }
        self.stats.batches += 1;
        self.batch_start = self.emitted;
        // The decoder releases nothing it has not verified, so every batch is followed by a
        // checkpoint (36–42 bytes; finalizing a running blake3 costs microseconds).
        self.checkpoint(out);
        // Keep the allocations for the next batch.
        let Batch { mut pages, mut verbatim, mut ops, mut retained, .. } = b;
        pages.clear();
        verbatim.clear();
        ops.clear();
        retained.clear();
        self.batch = Batch { pages, verbatim, ops, page_ops: 0, run: None, retained };
    }

    /// Compresses `parts` as one zstd frame into `self.zbuf`. False if zstd is unavailable or
    /// failed (the batch then goes raw).
    fn compress(&mut self, parts: &[&[u8]]) -> bool {
        let Some(z) = self.zstd.as_mut() else { return false };
        self.zbuf.clear();
        if z.reinit().is_err() {
            return false;
        }
        let total: usize = parts.iter().map(|p| p.len()).sum();
        self.zbuf.reserve(zstd::zstd_safe::compress_bound(total) + 64);
        for p in parts {
            let mut inb = InBuffer::around(p);
            while inb.pos() < p.len() {
                if self.zbuf.capacity() - self.zbuf.len() < 4096 {
                    self.zbuf.reserve(64 << 10);
                }
                let pos = self.zbuf.len();
                let mut outb = OutBuffer::around_pos(&mut self.zbuf, pos);
                if z.run(&mut inb, &mut outb).is_err() {
                    return false;
                }
            }
        }
        loop {
            if self.zbuf.capacity() - self.zbuf.len() < 4096 {
                self.zbuf.reserve(64 << 10);
            }
            let pos = self.zbuf.len();
            let mut outb = OutBuffer::around_pos(&mut self.zbuf, pos);
            match z.finish(&mut outb, true) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(_) => return false,
            }
        }
    }
}
