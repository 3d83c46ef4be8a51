//! Persistence of the destination page cache in a directory, so a gateway restart does not lose
//! what later migrations (a VM moved back, the next VM of an image) would reference.
//!
//! One file per page, named by its blake3 digest in hex under a two-character fan-out folder
//! (`ab/cdef….page`), written to a temporary name and renamed, so a crash leaves either the whole
//! page or nothing. Loading re-hashes every file and deletes any whose content does not match its
//! name: a damaged file can cost a cache miss, never a wrong page.
//!
//! Writes happen behind the decoder on a dedicated thread fed by a bounded queue; when the disk
//! falls behind, pages are simply not persisted (counted), so persistence never slows a migration.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;

use bytes::Bytes;

use ferry_codec::{PageDigest, PAGE_SIZE};

/// Operations queued for the writer thread before pages are dropped instead.
const QUEUE: usize = 8192;

/// Failure to open the page directory.
#[derive(Debug, thiserror::Error)]
#[error("page cache directory {path}: {source}")]
pub struct PageDirError {
    path: PathBuf,
    source: std::io::Error,
}

enum Op {
    Write(PageDigest, Bytes),
    Remove(PageDigest),
}

/// Counters of the page directory.
#[derive(Debug, Default)]
pub struct PageDirStats {
    /// Pages written.
    pub written: AtomicU64,
    /// Pages not persisted because the writer was behind.
    pub dropped: AtomicU64,
    /// Write or remove failures.
    pub errors: AtomicU64,
}

/// A directory of persisted pages with its writer thread. Dropping it finishes queued writes.
pub struct PageDir {
    tx: Option<SyncSender<Op>>,
    writer: Option<JoinHandle<()>>,
    stats: Arc<PageDirStats>,
}

impl std::fmt::Debug for PageDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageDir").field("stats", &self.stats).finish()
    }
}

fn page_path(dir: &Path, digest: &PageDigest) -> PathBuf {
    let hex = digest.to_string();
    dir.join(&hex[..2]).join(format!("{}.page", &hex[2..]))
}

impl PageDir {
    /// Opens (creating if needed) `dir`, returning it and every valid page found, newest last
    /// (by modification time, so the most recently used survive a smaller cache).
    pub fn open(dir: &Path) -> Result<(Self, Vec<(PageDigest, Bytes)>), PageDirError> {
        let err = |source| PageDirError { path: dir.to_owned(), source };
        fs::create_dir_all(dir).map_err(err)?;
        let mut found = Vec::new();
        for fan in fs::read_dir(dir).map_err(err)?.flatten() {
            if !fan.path().is_dir() {
                continue;
            }
            for entry in fs::read_dir(fan.path()).map_err(err)?.flatten() {
                let path = entry.path();
                let modified = entry.metadata().and_then(|m| m.modified()).ok();
                match fs::read(&path) {
                    Ok(data) if data.len() == PAGE_SIZE && path_matches(&path, &data) => {
                        found.push((modified, PageDigest::of(&data), Bytes::from(data)));
                    }
                    // Wrong size, wrong content or a leftover temporary file.
                    _ => {
                        let _ = fs::remove_file(&path);
                    }
                }
            }
        }
        found.sort_by_key(|(modified, _, _)| *modified);
        let pages = found.into_iter().map(|(_, d, p)| (d, p)).collect();

        let (tx, rx) = sync_channel::<Op>(QUEUE);
        let stats = Arc::new(PageDirStats::default());
        let writer_stats = stats.clone();
        let root = dir.to_owned();
        let writer = std::thread::Builder::new()
            .name("ferry-page-dir".into())
            .spawn(move || {
                for op in rx {
                    let ok = match op {
                        Op::Write(digest, page) => write_page(&root, &digest, &page).is_ok(),
                        Op::Remove(digest) => match fs::remove_file(page_path(&root, &digest)) {
                            Ok(()) => true,
                            Err(e) => e.kind() == std::io::ErrorKind::NotFound,
                        },
                    };
                    let counter = if ok { &writer_stats.written } else { &writer_stats.errors };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            })
            .map_err(err)?;
        Ok((Self { tx: Some(tx), writer: Some(writer), stats }, pages))
    }

    /// Queues a page for writing; drops it (counted) when the writer is behind.
    pub fn store(&self, digest: PageDigest, page: Bytes) {
        self.queue(Op::Write(digest, page));
    }

    /// Queues the removal of an evicted page.
    pub fn remove(&self, digest: PageDigest) {
        self.queue(Op::Remove(digest));
    }

    fn queue(&self, op: Op) {
        let Some(tx) = &self.tx else { return };
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = tx.try_send(op) {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counters.
    pub fn stats(&self) -> &PageDirStats {
        &self.stats
    }
}

impl Drop for PageDir {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

fn path_matches(path: &Path, data: &[u8]) -> bool {
    let Some(root) = path.parent().and_then(Path::parent) else { return false };
    page_path(root, &PageDigest::of(data)) == path
}

fn write_page(root: &Path, digest: &PageDigest, page: &[u8]) -> std::io::Result<()> {
    let path = page_path(root, digest);
    if path.exists() {
        return Ok(());
    }
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, page)?;
    fs::rename(&tmp, &path)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::store::numbered_test_page as page;

    #[test]
    fn pages_survive_a_reopen_and_damage_is_discarded() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (pd, found) = PageDir::open(dir.path()).unwrap();
            assert!(found.is_empty());
            for i in 0..5 {
                let (d, p) = page(i);
                pd.store(d, p);
            }
            pd.remove(page(4).0);
        }
        // Damage one page: its content no longer matches its name.
        let damaged = page_path(dir.path(), &page(0).0);
        let mut bytes = fs::read(&damaged).unwrap();
        bytes[100] ^= 1;
        fs::write(&damaged, bytes).unwrap();
        let (_pd, found) = PageDir::open(dir.path()).unwrap();
        let digests: Vec<_> = found.iter().map(|(d, _)| *d).collect();
        assert_eq!(found.len(), 3, "{digests:?}");
        for i in 1..4 {
            assert!(digests.contains(&page(i).0));
        }
        assert!(!damaged.exists(), "damaged page must be deleted");
        for (d, p) in &found {
            assert_eq!(PageDigest::of(p), *d);
        }
    }
}
