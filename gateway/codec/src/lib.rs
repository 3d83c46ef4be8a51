//! Page-aware codec for QEMU migration streams (sans-IO: no sockets, no tokio, no clocks, no
//! threads, no files).
//!
//! The codec core only: frames, encoder, decoder, the QEMU tokenizers and the hashing they share.
//! The stores it works with (the destination's page cache and its directory, the source's retained
//! pages, the peer's advertised index) live in the gateway (`ferry_gateway::store`); the codec sees
//! them through the consumer traits in [`stores`] ([`PageStore`], [`PageRetainer`],
//! [`DestinationIndex`]), and its unit tests use small in-memory implementations.
//!
//! # Where it sits
//! ```text
//! source QEMU --tcp--> [Encoder] --wire bytes--> tunnel --> [Decoder] --tcp--> destination QEMU
//! ```
//! The tunnel gives one reliable, ordered byte pipe per direction. The [`Encoder`] turns the bytes the
//! source QEMU wrote into *wire bytes*; the [`Decoder`] turns wire bytes back into exactly the original
//! bytes. Only the source→destination direction is encoded; the return path is forwarded verbatim by
//! the tunnel.
//!
//! # Detection and modes
//! The encoder looks at the first 4 bytes (they may arrive one at a time):
//! * `QEVM` → [`qemu::main_channel`] parser (sections, `ram` records);
//! * `11 22 33 44` → [`qemu::multifd`] parser (MultiFDInit_t, MultiFDPacket_t, raw pages);
//! * anything else → opaque mode: zstd-compressed verbatim segments.
//!
//! A parser never guesses. Whatever it cannot follow *precisely* (xbzrle, QEMU-side compression,
//! postcopy, an iterable section other than `ram`, an unknown flag or version, a non-4-KiB target
//! page) switches the connection to opaque mode for the rest of its life and records the reason in
//! [`CodecStats::opaque_reason`]. On the main channel, the first `FULL` device-state section after the
//! `ram` section completed (or `QEMU_VM_EOF`) starts the *tail*: device sections carry no length
//! prefix, so the tail is passed verbatim until the source closes — that is normal, not an error
//! ([`StreamMode::MainTail`]).
//!
//! # Wire format ([`frame`])
//! A preamble, then frames. The workhorse is the *batch* frame: an interleaving, in stream order, of
//! verbatim runs and page operations (zero page, reference by 32-byte blake3 digest, literal page),
//! with the literal pages, the verbatim bytes and the op list compressed together by zstd. The decoder
//! rebuilds the stream by concatenation, so every byte QEMU wrote (record headers, block names,
//! offsets, flags) is carried verbatim and nothing has to be re-derived. Each batch states the stream
//! offset it starts at; a *checkpoint* frame carries `(length, blake3 of everything so far)` and the
//! *trailer* does the same at the end of the stream.
//!
//! # Page references and the miss path
//! A reference is only emitted when the destination is *guaranteed* to resolve it, or when the
//! source can send the page again if the destination asks:
//! 1. **Session window (guaranteed).** Encoder and decoder run the same deterministic FIFO of the
//!    last `session_window_pages` distinct pages that crossed this connection (literal or resolved
//!    reference). The decoder holds a reference-counted handle ([`bytes::Bytes`]) to each page in the
//!    window, so eviction from the shared [`PageStore`] cannot make it disappear. The encoder refers
//!    to a page in the window without any luck involved. The window size is announced in the
//!    preamble and the decoder refuses a window larger than its configured maximum (memory bound:
//!    `window × 4 KiB`, shared with the cache when pages are also cached).
//! 2. **Advertised pages (resuppliable).** The destination gateway sends an [`Advertisement`]
//!    exported from its page cache (16-byte digest prefixes). The encoder refers to an
//!    advertised page by its *full* 32-byte digest, but only after keeping a copy in its
//!    [`PageRetainer`] (bounded by the retainer's budget; when full, the page goes literally). If the page was evicted from the destination's cache since (or a
//!    prefix matched by accident), the decoder *stalls* at that reference, lists the pages it
//!    needs ([`Decoder::take_needs`]) and resumes when they are supplied ([`Decoder::supply`],
//!    checked against the digest). The source keeps each copy until the destination acknowledges
//!    ([`Decoder::consumed`], a [`WireOffset`]) the batch that referred to it, so it can always
//!    answer. Correctness never depends on the advertisement being right: a wrong one costs a
//!    round trip, never wrong bytes. If a page cannot be supplied after all (a bug), the stream
//!    fails as before: the destination never receives EOF and the source VM keeps running.
//!
//! # Digest gate
//! Both ends run blake3 over the whole (original) stream. The encoder follows **every batch** with
//! a checkpoint `(length, digest so far)` — finalizing a running blake3 costs microseconds — and
//! ends with the trailer. The decoder hashes a batch first and writes its bytes out only once the
//! checkpoint after it verified (two passes over the batch's payload and resolved pages; rebuilt
//! bytes are never held), so everything it ever releases is a verified prefix of what the source
//! QEMU wrote.
//! In particular `QEMU_VM_EOF` (which makes the destination start the VM) is only released inside a
//! verified batch; a corrupted stream fails before it. This is stronger than holding back only the
//! stream's end, and it needs no knowledge of where EOF is (the encoder can't find it: device
//! state is not delimited). One batch at a time is pending (a batch before the previous one's
//! checkpoint fails the stream). It is uniform for main, multifd and opaque streams.
//!
//! Why not wait for the trailer before releasing EOF: with `return-path`, the source QEMU does not
//! close the main connection until the destination answered SHUT, which it only does after it
//! loaded EOF — waiting for the source's half-close would deadlock.
//!
//! **The caller must call [`Encoder::flush`] when the source connection goes idle** (e.g. no bytes
//! for 1–5 ms): batches fill up to `batch_pages`, and an idle source (end of an iteration, the
//! device-state tail after EOF) must not leave the last bytes sitting in a half-full batch.
//!
//! # Bounds
//! Encoder memory: one batch (≤ `batch_pages` literal pages, ≤ 1 MiB verbatim, ≤ 4096 page ops)
//! plus one partial QEMU record plus the session window index (40 B/page) plus the retained pages
//! (bounded by the [`PageRetainer`]'s budget). Decoder memory: one frame (≤ ~6.5 MiB, checked against limits
//! *before* buffering), the pending batch's payload (≤ ~6.5 MiB decompressed) and handles of
//! the pages it refers to (≤ 4096, shared with the store), the session window; while stalled
//! or while output is pending, also the input pushed behind it (≤ `max_stalled_input`), and
//! the supplied pages (≤ [`MAX_REQUESTED_PAGES`]). No length read from the wire is allocated
//! before it is checked against a limit. Decoder output per call: at most
//! [`DecoderConfig::max_output_per_push`], written into the caller's buffer; the rest of a
//! verified batch is rebuilt by the next calls, and the decoder takes no input until then. So a
//! stream of batches claiming maximal zero runs costs the caller's buffer (the bound), never the
//! 16 MiB per batch they expand to.
//!
//! # Page size
//! Page frames are 4096 bytes (x86 target page size). The main channel announces a different target
//! page size in its CONFIGURATION section (`configuration/target-page-bits`); such a stream is
//! handled in opaque mode. Multifd headers are sized for 128 pages of 4 KiB (1344 bytes).

//!
//! # Offsets
//! Two offset spaces meet in the codec and are kept apart by type: [`StreamOffset`] counts bytes
//! of the original stream (what the source QEMU wrote, what the decoder releases), [`WireOffset`]
//! counts bytes of the encoded stream (what the tunnel carries and acknowledges).

pub mod decoder;
pub mod digest_set;
pub mod encoder;
pub mod frame;
pub mod offset;
pub mod page_hash;
pub mod qemu;
pub mod stream_hash;
pub mod stores;

#[cfg(test)]
mod tests;

pub use decoder::{DecodeError, Decoder, DecoderConfig, DecoderStats, MAX_REQUESTED_PAGES};
pub use digest_set::{Advertisement, AdvertisementError, DestinationIndex, DigestSet, NoIndex};
pub use encoder::{CodecStats, Encoder, EncoderConfig, StreamMode};
pub use offset::{StreamOffset, WireOffset};
pub use stores::{NoRetainer, PageRetainer, PageStore};

/// Size of a page frame: the x86 target page size.
pub const PAGE_SIZE: usize = 4096;

/// Full blake3 digest of one 4 KiB page. References always carry all 32 bytes, so correctness never
/// depends on a truncated hash being unique.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PageDigest(pub [u8; 32]);

impl PageDigest {
    /// Digest of a page's content.
    pub fn of(page: &[u8]) -> Self {
        Self(*blake3::hash(page).as_bytes())
    }

    /// The 16-byte prefix used in advertisements.
    pub fn prefix(&self) -> [u8; 16] {
        let mut p = [0u8; 16];
        p.copy_from_slice(&self.0[..16]);
        p
    }
}

impl std::fmt::Debug for PageDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PageDigest(")?;
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "…)")
    }
}

impl std::fmt::Display for PageDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// True if every byte of `page` is zero. Word-wise with an early exit per 64-byte block, which LLVM
/// vectorises; most non-zero pages are rejected within the first block.
pub fn is_zero_page(page: &[u8]) -> bool {
    let mut blocks = page.chunks_exact(64);
    for block in &mut blocks {
        let mut acc = 0u64;
        for w in block.chunks_exact(8) {
            let mut a = [0u8; 8];
            a.copy_from_slice(w);
            acc |= u64::from_ne_bytes(a);
        }
        if acc != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}
