//! The running blake3 of a whole stream (the digest gate's hash), fed in pieces of any size.
//!
//! blake3 is fastest when it can hash 8 chunks (8 KiB) side by side (AVX2). `Hasher::update`
//! only does so for subtrees aligned to the bytes hashed so far: a piece that starts or ends at an
//! arbitrary offset is hashed partly one, two or four chunks at a time. The codec's pieces end at
//! record boundaries (arbitrary offsets), so [`StreamHasher`] hands the hasher only whole
//! [`ALIGN`] blocks at aligned offsets and keeps the remainder (< 8 KiB) until the next piece
//! completes it. The digest is the same blake3 of the same bytes; only the call pattern changes.

/// Alignment of the pieces given to blake3: 8 chunks, the AVX2 width.
pub const ALIGN: usize = 8 * blake3::CHUNK_LEN;

/// Running blake3 of a stream. See the [module docs](self).
#[derive(Clone, Default)]
pub struct StreamHasher {
    hasher: blake3::Hasher,
    /// Bytes not yet given to `hasher` (fewer than [`ALIGN`]); `hasher.count()` is a multiple of
    /// [`ALIGN`].
    tail: Vec<u8>,
}

impl std::fmt::Debug for StreamHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamHasher").field("len", &self.len()).finish()
    }
}

impl StreamHasher {
    /// An empty hash.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes hashed so far.
    pub fn len(&self) -> u64 {
        self.hasher.count() + self.tail.len() as u64
    }

    /// Whether nothing was hashed yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The longest prefix of a piece of `n` bytes that [`update`](Self::update) takes without
    /// keeping any of it back (0 if none): lets a caller that still holds the rest hash it later
    /// instead of having it copied now.
    pub fn aligned_prefix(&self, n: usize) -> usize {
        let over = ((self.len() + n as u64) % ALIGN as u64) as usize;
        n.saturating_sub(over)
    }

    /// Appends `data` to the hashed stream.
    pub fn update(&mut self, mut data: &[u8]) {
        if !self.tail.is_empty() {
            let take = (ALIGN - self.tail.len()).min(data.len());
            self.tail.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.tail.len() < ALIGN {
                return;
            }
            self.hasher.update(&self.tail);
            self.tail.clear();
        }
        let whole = data.len() - data.len() % ALIGN;
        if whole > 0 {
            self.hasher.update(&data[..whole]);
        }
        self.tail.extend_from_slice(&data[whole..]);
    }

    /// blake3 of everything hashed so far (the stream goes on; this does not end it).
    pub fn finalize(&self) -> blake3::Hash {
        if self.tail.is_empty() {
            return self.hasher.finalize();
        }
        // The tail is not hashed into `self.hasher`, so later aligned pieces stay aligned.
        let mut h = self.hasher.clone();
        h.update(&self.tail);
        h.finalize()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_digest_as_one_call_for_any_pieces() {
        let mut data = vec![0u8; 5 * ALIGN + 777];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i * 31 % 251) as u8;
        }
        let mut rng = crate::tests::Rng::new(1);
        for _ in 0..50 {
            let mut h = StreamHasher::new();
            let mut pos = 0;
            while pos < data.len() {
                let n = match rng.below(3) {
                    0 => rng.below(16),
                    1 => rng.below(ALIGN + 2),
                    _ => rng.below(3 * ALIGN),
                }
                .min(data.len() - pos);
                h.update(&data[pos..pos + n]);
                pos += n;
                assert_eq!(h.len(), pos as u64);
                assert_eq!(h.finalize(), blake3::hash(&data[..pos]));
                let n = rng.below(2 * ALIGN);
                let p = h.aligned_prefix(n);
                let end = h.len() + p as u64;
                assert!(p <= n && (p == 0 || end & (ALIGN as u64 - 1) == 0), "{} {n} {p}", h.len());
            }
        }
    }
}
