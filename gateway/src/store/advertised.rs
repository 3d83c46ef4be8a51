//! What the peer's page cache holds, per its latest advertisement: the source-side
//! [`DestinationIndex`] our encoders consult. Installed by the connection when an advertisement
//! arrives, read by every encoder on it.

use ferry_codec::{Advertisement, DestinationIndex, DigestSet, PageDigest};
use parking_lot::RwLock;

/// A destination index that starts empty and is filled when the destination's advertisement
/// arrives, one round trip after the connection opened; until then only the session window yields
/// references.
#[derive(Debug, Default)]
pub struct AdvertisedIndex {
    set: RwLock<DigestSet>,
    /// The peer decoder's largest accepted session window, once advertised.
    window: std::sync::OnceLock<u64>,
}

impl AdvertisedIndex {
    /// Installs the destination's advertisement.
    pub fn install(&self, advertisement: Advertisement) {
        let _ = self.window.set(advertisement.session_window_pages);
        *self.set.write() = advertisement.digests;
    }

    /// The session window the peer's decoders accept, if it advertised yet.
    pub fn session_window_pages(&self) -> Option<u64> {
        self.window.get().copied()
    }

    /// Number of advertised pages.
    pub fn len(&self) -> usize {
        self.set.read().len()
    }

    /// Whether nothing was advertised (yet).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl DestinationIndex for AdvertisedIndex {
    fn may_contain(&self, digest: &PageDigest) -> bool {
        self.set.read().contains_prefix(&digest.prefix())
    }
}

