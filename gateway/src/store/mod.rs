//! The stores around the codec: state shared between connections or threads, and the disk.
//!
//! The codec core (`ferry_codec`) is sans-IO; what it reads and fills lives here and is handed to
//! it through its consumer traits:
//! - [`page_cache`]: the destination's content-addressed page cache, shared by every decoder of a
//!   gateway ([`ferry_codec::PageStore`]), and the advertisement exported from it;
//! - [`page_dir`]: the page cache's copy on disk (a writer thread and one file per page);
//! - [`retained`]: the source's copies of advertised pages it referred to, shared by an encoder
//!   and the flow's control reader ([`ferry_codec::PageRetainer`]);
//! - [`advertised`]: what the peer's page cache holds, per its latest advertisement, shared by a
//!   connection and its encoders ([`ferry_codec::DestinationIndex`]).

pub mod advertised;
pub mod page_cache;
pub mod page_dir;
pub mod retained;

pub use advertised::AdvertisedIndex;
pub use page_cache::{PageCache, PageCacheStats};
pub use page_dir::{PageDir, PageDirError};
pub use retained::{RetainedPages, RetainedStats};

/// A distinct page numbered `i` and its digest, for the store tests.
#[cfg(test)]
pub(crate) fn numbered_test_page(i: u32) -> (ferry_codec::PageDigest, bytes::Bytes) {
    let p = ferry_testkit::qemu_stream::numbered_page(i);
    (ferry_codec::PageDigest::of(&p), bytes::Bytes::from(p))
}
