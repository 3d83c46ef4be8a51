//! blake3 digests of several 4 KiB pages at once.
//!
//! `blake3::hash` of one 4 KiB page hashes its 4 chunks side by side, but AVX2 hashes 8 chunks at
//! once (AVX-512: 16), so half the vector width idles, and the 3 parent nodes are hashed one at a
//! time. Here chunk *i* of `degree` pages is hashed in one pass (in every page, chunk *i* has
//! chunk counter *i*), then the parent nodes of all those pages, then their roots. Each result is
//! exactly `blake3::hash(page)` (the tests compare them); only the order of the compressions
//! changes. This uses blake3's `platform` module, public but marked unstable: Cargo.lock pins the
//! version, and a change fails to compile or fails the tests here, never silently.

use std::sync::OnceLock;

use blake3::platform::Platform;
use blake3::IncrementCounter;

use crate::{PageDigest, PAGE_SIZE};

/// blake3's IV (the SHA-256 IV), the key of unkeyed hashing.
const IV: [u32; 8] = [0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A, 0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19];
// Domain flags from the blake3 specification.
const CHUNK_START: u8 = 1 << 0;
const CHUNK_END: u8 = 1 << 1;
const PARENT: u8 = 1 << 2;
const ROOT: u8 = 1 << 3;
const CHUNK_LEN: usize = blake3::CHUNK_LEN;
const CHUNKS: usize = PAGE_SIZE / CHUNK_LEN;
/// Most pages hashed in one pass (AVX-512's width).
pub const MAX_GROUP: usize = 16;

fn platform() -> Platform {
    static P: OnceLock<Platform> = OnceLock::new();
    *P.get_or_init(Platform::detect)
}

/// Pages worth hashing together: the SIMD width in chunks. Fewer pages than this are hashed one
/// by one (`blake3::hash` is as fast for them).
pub fn group_size() -> usize {
    platform().simd_degree().min(MAX_GROUP)
}

/// Appends the digest of every page in `pages` to `out`, in order.
pub fn digest_pages(pages: &[&[u8; PAGE_SIZE]], out: &mut Vec<PageDigest>) {
    let p = platform();
    let g = group_size();
    let mut groups = pages.chunks_exact(g.max(2));
    for group in &mut groups {
        digest_group(p, group, out);
    }
    out.extend(groups.remainder().iter().map(|page| PageDigest::of(&page[..])));
}

/// Digests of up to [`MAX_GROUP`] pages with full SIMD width.
fn digest_group(p: Platform, group: &[&[u8; PAGE_SIZE]], out: &mut Vec<PageDigest>) {
    let n = group.len();
    debug_assert!(n <= MAX_GROUP);
    // cv[c][32 * i..]: chaining value of chunk c of page i.
    let mut cv = [[0u8; 32 * MAX_GROUP]; CHUNKS];
    for (c, cv_c) in cv.iter_mut().enumerate() {
        let mut inputs = [&[0u8; CHUNK_LEN]; MAX_GROUP];
        for (slot, page) in inputs.iter_mut().zip(group) {
            *slot = page[c * CHUNK_LEN..(c + 1) * CHUNK_LEN].try_into().expect("chunk of a page");
        }
        p.hash_many(&inputs[..n], &IV, c as u64, IncrementCounter::No, 0, CHUNK_START, CHUNK_END, &mut cv_c[..32 * n]);
    }
    // Parent nodes: (chunk 0, chunk 1) and (chunk 2, chunk 3) of each page.
    let mut blocks = [[0u8; 64]; 2 * MAX_GROUP];
    for i in 0..n {
        for half in 0..2 {
            let b = &mut blocks[2 * i + half];
            b[..32].copy_from_slice(&cv[2 * half][32 * i..32 * (i + 1)]);
            b[32..].copy_from_slice(&cv[2 * half + 1][32 * i..32 * (i + 1)]);
        }
    }
    let mut parents = [0u8; 32 * 2 * MAX_GROUP];
    let refs: [&[u8; 64]; 2 * MAX_GROUP] = std::array::from_fn(|k| &blocks[k]);
    p.hash_many(&refs[..2 * n], &IV, 0, IncrementCounter::No, PARENT, 0, 0, &mut parents[..64 * n]);
    // Roots: the two parents of each page, with the ROOT flag (the first 32 output bytes of the
    // root compression are the hash).
    let mut roots = [0u8; 32 * MAX_GROUP];
    let refs: [&[u8; 64]; MAX_GROUP] = std::array::from_fn(|i| {
        parents[64 * i..64 * (i + 1)].try_into().expect("two parents")
    });
    p.hash_many(&refs[..n], &IV, 0, IncrementCounter::No, PARENT | ROOT, 0, 0, &mut roots[..32 * n]);
    out.extend(roots[..32 * n].chunks_exact(32).map(|r| PageDigest(r.try_into().expect("32 bytes"))));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_as_blake3_hash_for_every_count() {
        let mut rng = crate::tests::Rng::new(3);
        let pages: Vec<[u8; PAGE_SIZE]> = (0..40)
            .map(|i| {
                let mut p = [0u8; PAGE_SIZE];
                if i % 5 != 0 {
                    rng.fill(&mut p);
                }
                p
            })
            .collect();
        for n in 0..=pages.len() {
            let refs: Vec<&[u8; PAGE_SIZE]> = pages[..n].iter().collect();
            let mut out = Vec::new();
            digest_pages(&refs, &mut out);
            let expect: Vec<PageDigest> = pages[..n].iter().map(|p| PageDigest::of(p)).collect();
            assert_eq!(out, expect, "{n} pages");
        }
        // Each group size the platform might pick.
        for g in 1..=MAX_GROUP {
            let refs: Vec<&[u8; PAGE_SIZE]> = pages[..g].iter().collect();
            let mut out = Vec::new();
            digest_group(platform(), &refs, &mut out);
            let expect: Vec<PageDigest> = pages[..g].iter().map(|p| PageDigest::of(p)).collect();
            assert_eq!(out, expect, "group of {g}");
        }
    }
}
