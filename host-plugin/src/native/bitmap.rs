//! Dirty page bitmaps → page ranges (pure).
//!
//! KVM's dirty log (`KVM_GET_DIRTY_LOG`) and vm-memory's `AtomicBitmap::get_and_reset` both
//! return one bit per 4 KiB page of a memory slot, little-endian within `u64` words: bit `i % 64`
//! of word `i / 64` is page `i`. The guest's own writes are only in KVM's log, the VMM's writes
//! through vm-memory only in the AtomicBitmap, so a slot's dirty set is the union of the two (as
//! Cloud Hypervisor's `MemoryManager::dirty_log` does).

use std::ops::Range;

/// The dirty pages of one memory slot of `pages` pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    pages: u64,
}

impl DirtyBitmap {
    /// A bitmap of `pages` pages with none dirty.
    pub fn clean(pages: u64) -> Self {
        Self { words: vec![0; pages.div_ceil(64) as usize], pages }
    }

    /// A bitmap of `pages` pages with all dirty (a pre-copy's first pass).
    pub fn all(pages: u64) -> Self {
        let mut b = Self::clean(pages);
        b.words.iter_mut().for_each(|w| *w = u64::MAX);
        b.mask_tail();
        b
    }

    /// The union of the given bitmaps (KVM's log, vm-memory's bitmap) of a slot of `pages`
    /// pages. Words past the slot and bits past its last page are ignored; a short bitmap
    /// counts as clean where it ends.
    pub fn union_of(pages: u64, bitmaps: &[&[u64]]) -> Self {
        let mut b = Self::clean(pages);
        for bitmap in bitmaps {
            for (w, x) in b.words.iter_mut().zip(bitmap.iter()) {
                *w |= x;
            }
        }
        b.mask_tail();
        b
    }

    /// Adds the dirty pages of `other` (a bitmap of the same slot).
    pub fn union(&mut self, other: &DirtyBitmap) {
        for (w, x) in self.words.iter_mut().zip(&other.words) {
            *w |= x;
        }
        self.mask_tail();
    }

    fn mask_tail(&mut self) {
        let rem = self.pages % 64;
        if rem != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << rem) - 1;
            }
        }
    }

    /// Pages in the slot.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Whether page `page` is dirty.
    pub fn is_dirty(&self, page: u64) -> bool {
        page < self.pages && self.words[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    /// The dirty pages as maximal runs of page indexes, in ascending order.
    pub fn ranges(&self) -> Vec<Range<u64>> {
        let mut out: Vec<Range<u64>> = Vec::new();
        for (i, &word) in self.words.iter().enumerate() {
            let mut w = word;
            while w != 0 {
                let bit = u64::from(w.trailing_zeros());
                // The run of ones starting at `bit` within this word.
                let run = u64::from((!(w >> bit)).trailing_zeros());
                let start = i as u64 * 64 + bit;
                match out.last_mut() {
                    Some(last) if last.end == start => last.end = start + run,
                    _ => out.push(start..start + run),
                }
                w = if bit + run >= 64 { 0 } else { w & !(((1u64 << run) - 1) << bit) };
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(b: &DirtyBitmap) -> Vec<Range<u64>> {
        let mut out: Vec<Range<u64>> = Vec::new();
        for p in 0..b.pages() {
            if b.is_dirty(p) {
                match out.last_mut() {
                    Some(l) if l.end == p => l.end = p + 1,
                    _ => out.push(p..p + 1),
                }
            }
        }
        out
    }

    #[test]
    fn runs_across_word_boundaries_merge() {
        // pages 60..70 dirty: crosses words 0 and 1.
        let kvm = [0xf000_0000_0000_0000u64, 0x3f];
        let b = DirtyBitmap::union_of(128, &[&kvm]);
        assert_eq!(b.ranges(), vec![60..70]);
        assert_eq!(b.count(), 10);
    }

    #[test]
    fn union_of_kvm_and_vmm_bitmaps() {
        let kvm = [0b0101u64];
        let vmm = [0b1000u64];
        let b = DirtyBitmap::union_of(64, &[&kvm, &vmm]);
        assert_eq!(b.ranges(), vec![0..1, 2..4]);
        assert_eq!(b.count(), 3);
        let mut c = DirtyBitmap::union_of(64, &[&kvm]);
        c.union(&DirtyBitmap::union_of(64, &[&vmm]));
        assert_eq!(c, b);
    }

    #[test]
    fn bits_past_the_slot_are_ignored() {
        let b = DirtyBitmap::union_of(10, &[&[u64::MAX, u64::MAX]]);
        assert_eq!(b.ranges(), vec![0..10]);
        assert_eq!(DirtyBitmap::all(70).ranges(), vec![0..70]);
        assert_eq!(DirtyBitmap::all(128).count(), 128);
        // A short bitmap is clean where it ends.
        assert_eq!(DirtyBitmap::union_of(200, &[&[1]]).ranges(), vec![0..1]);
    }

    #[test]
    fn full_words_and_empty() {
        assert!(DirtyBitmap::clean(4096).ranges().is_empty());
        let b = DirtyBitmap::union_of(192, &[&[u64::MAX, 0, u64::MAX]]);
        assert_eq!(b.ranges(), vec![0..64, 128..192]);
    }

    #[test]
    fn matches_a_bit_by_bit_walk_on_random_bitmaps() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..500 {
            let pages: u64 = 1 + (round * 37) % 700;
            let words: Vec<u64> = (0..pages.div_ceil(64))
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // Sparse, dense and mixed words.
                    match x % 3 {
                        0 => x & (x >> 3),
                        1 => x | (x >> 5),
                        _ => x,
                    }
                })
                .collect();
            let b = DirtyBitmap::union_of(pages, &[&words]);
            assert_eq!(b.ranges(), naive(&b), "pages {pages}");
            assert_eq!(b.ranges().iter().map(|r| r.end - r.start).sum::<u64>(), b.count());
        }
    }
}
