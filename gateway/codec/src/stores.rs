//! What the codec needs from the stores around it (consumer traits, vm-memory style).
//!
//! The codec core owns no shared state: the destination's page cache, the source's copies of
//! advertised pages and the peer's advertisement are stores with locks, threads or files, and
//! live with the gateway. The encoder and decoder see them only through these traits (and
//! [`DestinationIndex`](crate::DestinationIndex)), held once per connection, so a call costs one
//! dynamic dispatch and whatever the store itself does.

use bytes::Bytes;

use crate::offset::WireOffset;
use crate::PageDigest;

/// A content-addressed page store (destination side): where the [`Decoder`](crate::Decoder)
/// resolves references and leaves the pages it learned.
pub trait PageStore: Send + Sync {
    /// The page with this digest, if held.
    fn get(&self, digest: &PageDigest) -> Option<Bytes>;
    /// Stores a page. `digest` must be the blake3 of `page` (callers compute it themselves).
    /// A store may decline (full, or write failure); that is never an error for the caller.
    fn insert(&self, digest: PageDigest, page: Bytes);
    /// Whether the page is held.
    fn contains(&self, digest: &PageDigest) -> bool;
}

/// Source-side copies of advertised pages the [`Encoder`](crate::Encoder) refers to, kept so the
/// destination can ask for them again (the miss path). The encoder retains and seals; whoever
/// receives the destination's requests and acknowledgements answers and releases through the
/// store's own interface.
pub trait PageRetainer: Send + Sync {
    /// Retains `page` for a reference in the batch being built. Returns false, retaining
    /// nothing, if the store cannot take it: the encoder then sends the page literally. Every
    /// successful call is followed by a [`seal`](Self::seal) naming `digest` once the batch is
    /// written; until then the page must not be released.
    fn retain(&self, digest: PageDigest, page: &[u8]) -> bool;
    /// The batch whose references retained `digests` ends at `end` in the encoder's wire stream:
    /// each page may go once the destination acknowledged `end` (unless a later batch referred to
    /// it again).
    fn seal(&self, digests: &[PageDigest], end: WireOffset);
    /// Pages handed out again at the destination's request so far (reported in
    /// [`CodecStats::resupplied_pages`](crate::CodecStats::resupplied_pages)).
    fn resupplied_pages(&self) -> u64;
}

/// A retainer that keeps nothing: the encoder never refers to advertised pages.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoRetainer;

impl PageRetainer for NoRetainer {
    fn retain(&self, _digest: PageDigest, _page: &[u8]) -> bool {
        false
    }

    fn seal(&self, _digests: &[PageDigest], _end: WireOffset) {}

    fn resupplied_pages(&self) -> u64 {
        0
    }
}
