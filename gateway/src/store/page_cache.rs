//! Destination page store: content-addressed 4 KiB pages, bounded, shared by every migration
//! through a gateway.
//!
//! [`PageStore`] is the consumer-side trait the decoder uses (defined by the codec); [`PageCache`]
//! is the in-memory backend (CLOCK eviction, capacity in bytes), optionally persisted in a
//! [`PageDir`]. Pages are [`Bytes`] handles, so a decoder that keeps
//! a page in its session window shares the allocation with the cache, and eviction from the cache
//! never invalidates a page a running session still relies on.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use ferry_codec::{Advertisement, DigestSet, PageDigest, PageStore, PAGE_SIZE};
use parking_lot::{Mutex, MutexGuard};

use crate::store::page_dir::{PageDir, PageDirError, PageDirStats};

/// Counters of a [`PageCache`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageCacheStats {
    /// Pages held.
    pub pages: u64,
    /// Capacity in pages.
    pub capacity_pages: u64,
    /// Successful look-ups.
    pub hits: u64,
    /// Failed look-ups.
    pub misses: u64,
    /// New pages stored.
    pub inserts: u64,
    /// Pages evicted.
    pub evictions: u64,
}

struct Entry {
    page: Bytes,
    referenced: bool,
}

struct Inner {
    map: HashMap<PageDigest, Entry>,
    /// CLOCK hand order: digests in insertion order; the front is the hand.
    ring: VecDeque<PageDigest>,
}

/// In-memory, bounded page cache with CLOCK (second chance) eviction.
pub struct PageCache {
    inner: Mutex<Inner>,
    /// Optional write-behind copy on disk.
    dir: Option<PageDir>,
    capacity_pages: usize,
    hits: AtomicU64,
    misses: AtomicU64,
    inserts: AtomicU64,
    evictions: AtomicU64,
}

impl std::fmt::Debug for PageCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageCache").field("stats", &self.stats()).finish()
    }
}

impl PageCache {
    /// A cache holding up to `capacity_bytes` of page data (rounded down to whole pages).
    pub fn new(capacity_bytes: usize) -> Self {
        let capacity_pages = capacity_bytes / PAGE_SIZE;
        Self {
            inner: Mutex::new(Inner { map: HashMap::new(), ring: VecDeque::new() }),
            dir: None,
            capacity_pages,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            inserts: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        }
    }

    /// A cache of `capacity_bytes` persisted in `dir`: pages found there are loaded (the most
    /// recent first to survive if they do not all fit), new pages are written behind, evicted ones
    /// removed.
    pub fn with_dir(capacity_bytes: usize, dir: &Path) -> Result<Self, PageDirError> {
        let (page_dir, found) = PageDir::open(dir)?;
        let mut cache = Self::new(capacity_bytes);
        // Attached first so pages that do not fit are removed from disk too; re-storing a loaded
        // page finds its file and writes nothing.
        cache.dir = Some(page_dir);
        let loaded = found.len();
        for (digest, page) in found {
            cache.insert(digest, page);
        }
        tracing::info!(dir = %dir.display(), loaded, held = cache.stats().pages, "page cache loaded from disk");
        Ok(cache)
    }

    /// The disk copy's counters, if the cache is persisted.
    pub fn dir_stats(&self) -> Option<&PageDirStats> {
        self.dir.as_ref().map(PageDir::stats)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the map inconsistent in a way that matters
        // for a cache (worst case a stale ring entry); parking_lot's lock does not poison.
        self.inner.lock()
    }

    /// Counters.
    pub fn stats(&self) -> PageCacheStats {
        let pages = self.lock().map.len() as u64;
        PageCacheStats {
            pages,
            capacity_pages: self.capacity_pages as u64,
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            inserts: self.inserts.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
        }
    }

    /// Every digest held (exact set).
    pub fn digests(&self) -> DigestSet {
        DigestSet::from_digests(self.lock().map.keys())
    }

    /// The advertisement a destination sends at session start: up to `max_entries` digest prefixes
    /// (most recently inserted first, as those are the likeliest to survive) and the session window
    /// this destination accepts. See [`Advertisement`].
    pub fn advertise(&self, max_entries: usize, session_window_pages: u64) -> Advertisement {
        let inner = self.lock();
        let digests = DigestSet::from_digests(inner.ring.iter().rev().take(max_entries));
        Advertisement { session_window_pages, digests }
    }
}

impl PageStore for PageCache {
    fn get(&self, digest: &PageDigest) -> Option<Bytes> {
        let mut inner = self.lock();
        match inner.map.get_mut(digest) {
            Some(e) => {
                e.referenced = true;
                self.hits.fetch_add(1, Ordering::Relaxed);
                Some(e.page.clone())
            }
            None => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    fn insert(&self, digest: PageDigest, page: Bytes) {
        if self.capacity_pages == 0 || page.len() != PAGE_SIZE {
            return;
        }
        let mut inner = self.lock();
        if let Some(e) = inner.map.get_mut(&digest) {
            e.referenced = true;
            return;
        }
        // CLOCK: give referenced pages a second chance. Bounded: each entry is passed at most
        // once with its bit set, so this loop runs at most 2 × len times.
        while inner.map.len() >= self.capacity_pages {
            let Some(victim) = inner.ring.pop_front() else { break };
            let second_chance = match inner.map.get_mut(&victim) {
                Some(e) if e.referenced => {
                    e.referenced = false;
                    true
                }
                Some(_) => false,
                None => continue,
            };
            if second_chance {
                inner.ring.push_back(victim);
            } else {
                inner.map.remove(&victim);
                self.evictions.fetch_add(1, Ordering::Relaxed);
                if let Some(dir) = &self.dir {
                    dir.remove(victim);
                }
            }
        }
        if let Some(dir) = &self.dir {
            dir.store(digest, page.clone());
        }
        inner.map.insert(digest, Entry { page, referenced: false });
        inner.ring.push_back(digest);
        self.inserts.fetch_add(1, Ordering::Relaxed);
    }

    fn contains(&self, digest: &PageDigest) -> bool {
        self.lock().map.contains_key(digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::store::numbered_test_page as page;

    #[test]
    fn bounded_with_clock_eviction() {
        let c = PageCache::new(4 * PAGE_SIZE);
        for i in 0..4 {
            let (d, p) = page(i);
            c.insert(d, p);
        }
        // Touch page 0: it gets a second chance.
        assert!(c.get(&page(0).0).is_some());
        let (d4, p4) = page(4);
        c.insert(d4, p4);
        let s = c.stats();
        assert_eq!(s.pages, 4);
        assert_eq!(s.evictions, 1);
        assert!(c.contains(&page(0).0));
        assert!(!c.contains(&page(1).0));
        assert!(c.contains(&d4));
        assert_eq!(c.get(&page(1).0), None);
        assert_eq!(c.stats().misses, 1);
    }

    #[test]
    fn persisted_cache_reloads_within_capacity() {
        let dir = tempfile::tempdir().unwrap();
        {
            let c = PageCache::with_dir(8 * PAGE_SIZE, dir.path()).unwrap();
            for i in 0..6 {
                let (d, p) = page(i);
                c.insert(d, p);
            }
        }
        // A restart with a smaller cache keeps the most recent pages and prunes the disk.
        {
            let c = PageCache::with_dir(4 * PAGE_SIZE, dir.path()).unwrap();
            assert_eq!(c.stats().pages, 4);
            assert!(c.contains(&page(5).0));
            assert_eq!(c.get(&page(5).0).unwrap(), page(5).1);
        }
        let c = PageCache::with_dir(16 * PAGE_SIZE, dir.path()).unwrap();
        assert_eq!(c.stats().pages, 4);
    }

    #[test]
    fn advertisement_lists_held_pages() {
        let c = PageCache::new(16 * PAGE_SIZE);
        for i in 0..10 {
            let (d, p) = page(i);
            c.insert(d, p);
        }
        let ad = c.advertise(5, 1000);
        assert_eq!(ad.digests.len(), 5);
        assert!(ad.digests.contains_prefix(&page(9).0.prefix()));
        assert!(!ad.digests.contains_prefix(&page(0).0.prefix()));
    }
}
