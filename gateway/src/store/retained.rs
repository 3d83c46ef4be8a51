//! Source-side copies of pages the encoder referenced on the strength of the destination's
//! advertisement, kept so the destination can ask for them again (the miss path).
//!
//! An advertised page can leave the destination's cache between the advertisement and the
//! reference that relies on it. The destination's decoder then stalls and asks for the page; the
//! source answers from this store. The encoder only emits an advertised reference after the page
//! was retained here, so every such reference stays resuppliable until the destination
//! acknowledged (by wire offset) the batch that carries it. In-session (window) references need
//! no copy: the decoder holds those pages itself.
//!
//! Bounded: retained bytes (4 KiB per page plus [`REF_COST`] per reference) never exceed the
//! budget; when it is full the encoder sends the page literally instead.
//!
//! Shared between the encoder (which retains and seals, through [`PageRetainer`]) and the flow's
//! control reader (which answers the destination's requests and receives its acknowledgements),
//! hence the internal lock.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use ferry_codec::{PageDigest, PageRetainer, WireOffset, PAGE_SIZE};
use parking_lot::{Mutex, MutexGuard};

/// Default retention budget (`[cache] resupply_budget`): 64 MiB per connection.
pub const DEFAULT_RETAIN_BUDGET: usize = 64 << 20;

/// Bookkeeping charged against the budget for each retained reference (queue entry and map
/// overhead), so a stream of repeated references cannot grow the store past its budget either.
pub const REF_COST: usize = 64;

struct Held {
    page: Bytes,
    /// Wire offset the destination must acknowledge before the page may go (the end of the last
    /// sealed batch referring to it).
    release_at: WireOffset,
    /// References in batches not yet written (retained, not sealed): while any, never released.
    unsealed: u32,
}

#[derive(Default)]
struct Inner {
    pages: HashMap<PageDigest, Held>,
    /// One entry per sealed reference, in wire order (so release offsets are non-decreasing).
    queue: VecDeque<(WireOffset, PageDigest)>,
    bytes: usize,
}

/// Counters of a [`RetainedPages`] store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetainedStats {
    /// Pages held now.
    pub pages: u64,
    /// Bytes charged now (pages plus per-reference bookkeeping).
    pub bytes: u64,
    /// The budget.
    pub budget: u64,
    /// Pages handed out again at the destination's request ([`RetainedPages::resupply`]).
    pub resupplied: u64,
}

/// Pages the destination may ask for again, released by its acknowledgements. See the
/// [module docs](self).
pub struct RetainedPages {
    inner: Mutex<Inner>,
    budget: usize,
    resupplied: AtomicU64,
}

impl std::fmt::Debug for RetainedPages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetainedPages").field("stats", &self.stats()).finish()
    }
}

impl RetainedPages {
    /// An empty store holding at most `budget_bytes` (0: nothing can be retained, so the encoder
    /// never refers to advertised pages).
    pub fn new(budget_bytes: usize) -> Self {
        Self { inner: Mutex::new(Inner::default()), budget: budget_bytes, resupplied: AtomicU64::new(0) }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every update leaves the maps consistent before it can panic; parking_lot's lock does
        // not poison.
        self.inner.lock()
    }

    /// The destination acknowledged the flow's wire stream up to `acked` (it fully decoded every
    /// frame before it): releases the pages no reference beyond it needs.
    pub fn release(&self, acked: WireOffset) {
        let mut g = self.lock();
        while let Some(&(end, d)) = g.queue.front() {
            if end > acked {
                break;
            }
            g.queue.pop_front();
            g.bytes -= REF_COST;
            if g.pages.get(&d).is_some_and(|h| h.unsealed == 0 && h.release_at <= acked) {
                g.pages.remove(&d);
                g.bytes -= PAGE_SIZE;
            }
        }
    }

    /// The retained page with this digest, if held.
    pub fn get(&self, digest: &PageDigest) -> Option<Bytes> {
        self.lock().pages.get(digest).map(|h| h.page.clone())
    }

    /// Like [`get`](Self::get), counting the page as resupplied to the destination.
    pub fn resupply(&self, digest: &PageDigest) -> Option<Bytes> {
        let page = self.get(digest)?;
        self.resupplied.fetch_add(1, Ordering::Relaxed);
        Some(page)
    }

    /// Counters.
    pub fn stats(&self) -> RetainedStats {
        let g = self.lock();
        RetainedStats {
            pages: g.pages.len() as u64,
            bytes: g.bytes as u64,
            budget: self.budget as u64,
            resupplied: self.resupplied.load(Ordering::Relaxed),
        }
    }
}

impl PageRetainer for RetainedPages {
    /// Retains `page` for a reference in the batch being built. Returns false, retaining
    /// nothing, if the budget cannot take it: the caller must then send the page literally.
    /// Every successful call must be followed by a [`seal`](PageRetainer::seal) naming `digest` once the
    /// batch is written; until then the page is never released.
    fn retain(&self, digest: PageDigest, page: &[u8]) -> bool {
        let mut g = self.lock();
        let held = g.pages.contains_key(&digest);
        let cost = REF_COST + if held { 0 } else { PAGE_SIZE };
        if g.bytes + cost > self.budget {
            return false;
        }
        g.bytes += cost;
        g.pages
            .entry(digest)
            .or_insert_with(|| Held { page: Bytes::copy_from_slice(page), release_at: WireOffset::ZERO, unsealed: 0 })
            .unsealed += 1;
        true
    }

    /// The batch whose references retained `digests` ends at wire offset `end`: each page may go
    /// once the destination acknowledged `end` (unless a later batch referenced it again).
    fn seal(&self, digests: &[PageDigest], end: WireOffset) {
        let mut g = self.lock();
        for d in digests {
            if let Some(h) = g.pages.get_mut(d) {
                h.unsealed = h.unsealed.saturating_sub(1);
                h.release_at = h.release_at.max(end);
            }
            g.queue.push_back((end, *d));
        }
    }

    fn resupplied_pages(&self) -> u64 {
        self.resupplied.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::numbered_test_page as page;

    #[test]
    fn pages_live_until_the_last_batch_referring_to_them_is_acknowledged() {
        let store = RetainedPages::new(1 << 20);
        let (d0, p0) = page(0);
        let (d1, p1) = page(1);
        assert!(store.retain(d0, &p0));
        assert!(store.retain(d1, &p1));
        store.seal(&[d0, d1], WireOffset::new(100));
        // Referenced again in a batch not yet written: an ack of the first batch keeps it.
        assert!(store.retain(d0, &p0));
        store.release(WireOffset::new(100));
        assert_eq!(store.get(&d0).as_deref(), Some(&p0[..]));
        assert_eq!(store.get(&d1), None);
        store.seal(&[d0], WireOffset::new(250));
        store.release(WireOffset::new(249));
        assert!(store.get(&d0).is_some());
        assert_eq!(store.resupply(&d0).as_deref(), Some(&p0[..]));
        store.release(WireOffset::new(250));
        assert_eq!(store.get(&d0), None);
        let s = store.stats();
        assert_eq!((s.pages, s.bytes, s.resupplied), (0, 0, 1));
    }

    #[test]
    fn budget_is_never_exceeded() {
        let store = RetainedPages::new(2 * (PAGE_SIZE + REF_COST));
        let (d0, p0) = page(0);
        let (d1, p1) = page(1);
        let (d2, p2) = page(2);
        assert!(store.retain(d0, &p0));
        assert!(store.retain(d1, &p1));
        assert!(!store.retain(d2, &p2));
        assert_eq!(store.get(&d2), None);
        store.seal(&[d0, d1], WireOffset::new(10));
        store.release(WireOffset::new(10));
        assert!(store.retain(d2, &p2));
        assert!(store.stats().bytes <= store.stats().budget);
        assert!(!RetainedPages::new(0).retain(d0, &p0));
    }
}
