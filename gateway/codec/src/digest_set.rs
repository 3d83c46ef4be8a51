//! What the source believes the destination holds.
//!
//! The destination gateway exports an [`Advertisement`] from its page cache
//! at session start: the session window it accepts and a set of 16-byte digest prefixes. The
//! source's [`Encoder`](super::Encoder) consults it through [`DestinationIndex`].
//!
//! Why prefixes are safe: the encoder's reference still carries the *full* 32-byte digest, and the
//! decoder looks pages up by full digest. A prefix that matches by accident (≈ n²/2¹²⁹) or a page
//! evicted since the advert makes the decoder ask the source for the page, which it kept for that
//! ([`PageRetainer`](crate::PageRetainer)): a round trip, never wrong bytes. 16 bytes per page
//! keeps an advert of a 4 GiB cache (1 Mi pages) at 16 MiB.
//!
//! Wire form: `"FRYA" u8 version(=1) varint session_window_pages varint count  count × u8[16]`.

use std::collections::HashSet;

use thiserror::Error;

use crate::frame::{get_varint, put_varint, MAX_SESSION_WINDOW};
use crate::PageDigest;

/// Source-side view of the destination's page store.
pub trait DestinationIndex: Send + Sync {
    /// Whether the destination (probably) holds this page. A wrong `true` costs a resupply round
    /// trip (see [`PageRetainer`](crate::PageRetainer)), never corruption.
    fn may_contain(&self, digest: &PageDigest) -> bool;
}

/// An index that knows nothing: only the session window produces references.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoIndex;

impl DestinationIndex for NoIndex {
    fn may_contain(&self, _digest: &PageDigest) -> bool {
        false
    }
}

/// A set of 16-byte digest prefixes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DigestSet {
    prefixes: HashSet<[u8; 16]>,
}

impl DigestSet {
    /// Builds a set from full digests.
    pub fn from_digests<'a>(digests: impl IntoIterator<Item = &'a PageDigest>) -> Self {
        Self { prefixes: digests.into_iter().map(PageDigest::prefix).collect() }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.prefixes.len()
    }

    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.prefixes.is_empty()
    }

    /// Whether a prefix is present.
    pub fn contains_prefix(&self, prefix: &[u8; 16]) -> bool {
        self.prefixes.contains(prefix)
    }

    /// Adds a digest.
    pub fn insert(&mut self, digest: &PageDigest) {
        self.prefixes.insert(digest.prefix());
    }
}

impl DestinationIndex for DigestSet {
    fn may_contain(&self, digest: &PageDigest) -> bool {
        self.prefixes.contains(&digest.prefix())
    }
}

/// Destination → source message at session start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Advertisement {
    /// Largest session window the destination decoder accepts (pages). The encoder must use at
    /// most this ([`EncoderConfig::session_window_pages`](super::EncoderConfig)).
    pub session_window_pages: u64,
    /// Pages the destination holds.
    pub digests: DigestSet,
}

/// Malformed advertisement.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum AdvertisementError {
    /// Wrong magic or version.
    #[error("not a Ferry page advertisement")]
    BadHeader,
    /// Ended early.
    #[error("advertisement truncated")]
    Truncated,
    /// A field is out of range, or trailing bytes.
    #[error("malformed advertisement: {0}")]
    Malformed(&'static str),
}

const AD_MAGIC: &[u8; 4] = b"FRYA";

impl Advertisement {
    /// Encodes the advertisement.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + 16 * self.digests.len());
        out.extend_from_slice(AD_MAGIC);
        out.push(1);
        put_varint(&mut out, self.session_window_pages);
        put_varint(&mut out, self.digests.len() as u64);
        let mut sorted: Vec<_> = self.digests.prefixes.iter().collect();
        sorted.sort_unstable();
        for p in sorted {
            out.extend_from_slice(p);
        }
        out
    }

    /// Decodes an advertisement. The entry count is checked against the bytes actually present
    /// before anything is allocated.
    pub fn decode(buf: &[u8]) -> Result<Self, AdvertisementError> {
        if buf.len() < 5 {
            return Err(AdvertisementError::Truncated);
        }
        if &buf[..4] != AD_MAGIC || buf[4] != 1 {
            return Err(AdvertisementError::BadHeader);
        }
        let mut pos = 5;
        let window = get_varint(buf, &mut pos, "window")
            .map_err(|_| AdvertisementError::Malformed("window"))?
            .ok_or(AdvertisementError::Truncated)?;
        if window > MAX_SESSION_WINDOW {
            return Err(AdvertisementError::Malformed("session window too large"));
        }
        let count = get_varint(buf, &mut pos, "count")
            .map_err(|_| AdvertisementError::Malformed("count"))?
            .ok_or(AdvertisementError::Truncated)?;
        let rest = &buf[pos..];
        if count.checked_mul(16) != Some(rest.len() as u64) {
            return Err(if (rest.len() as u64) < count.saturating_mul(16) {
                AdvertisementError::Truncated
            } else {
                AdvertisementError::Malformed("trailing bytes")
            });
        }
        let mut prefixes = HashSet::with_capacity(count as usize);
        for c in rest.chunks_exact(16) {
            let mut p = [0u8; 16];
            p.copy_from_slice(c);
            prefixes.insert(p);
        }
        Ok(Self { session_window_pages: window, digests: DigestSet { prefixes } })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertisement_round_trip_and_hostile_counts() {
        let ds: Vec<PageDigest> = (0u32..100).map(|i| PageDigest::of(&i.to_le_bytes())).collect();
        let ad = Advertisement { session_window_pages: 4096, digests: DigestSet::from_digests(&ds) };
        let enc = ad.encode();
        assert_eq!(Advertisement::decode(&enc).unwrap(), ad);
        for cut in 0..enc.len() {
            assert!(Advertisement::decode(&enc[..cut]).is_err());
        }
        let mut hostile = b"FRYA\x01".to_vec();
        put_varint(&mut hostile, 10);
        put_varint(&mut hostile, u64::MAX / 2);
        assert_eq!(Advertisement::decode(&hostile), Err(AdvertisementError::Truncated));
        assert!(ad.digests.may_contain(&ds[3]));
        assert!(!ad.digests.may_contain(&PageDigest::of(b"other")));
    }
}
