//! Codec round-trip, split-point, cache-advertisement, corruption and fuzz tests on synthetic QEMU
//! streams built from the grammar in `/work/shared/docs/qemu-migration-stream.md`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::frame::{put_varint, T_BATCH_ZSTD};
use super::*;
pub(crate) use ferry_testkit::qemu_stream::{main_stream_of, numbered_page, page, sample_main_stream, sample_multifd_stream, Content, MainStream, MultifdStream};
pub(crate) use ferry_testkit::rng::Rng;

/// In-memory [`PageStore`] for the tests: bounded by `capacity_bytes`, first in, first out.
pub(crate) struct MemPages {
    capacity_pages: usize,
    inner: Mutex<(HashMap<PageDigest, Bytes>, VecDeque<PageDigest>)>,
}

impl MemPages {
    pub(crate) fn new(capacity_bytes: usize) -> Self {
        Self { capacity_pages: capacity_bytes / PAGE_SIZE, inner: Mutex::default() }
    }

    /// Every digest held, oldest first.
    pub(crate) fn digests(&self) -> Vec<PageDigest> {
        self.inner.lock().unwrap().1.iter().copied().collect()
    }
}

impl PageStore for MemPages {
    fn get(&self, digest: &PageDigest) -> Option<Bytes> {
        self.inner.lock().unwrap().0.get(digest).cloned()
    }

    fn insert(&self, digest: PageDigest, page: Bytes) {
        let mut g = self.inner.lock().unwrap();
        let (map, order) = &mut *g;
        if self.capacity_pages == 0 || map.contains_key(&digest) {
            return;
        }
        while map.len() >= self.capacity_pages {
            let Some(old) = order.pop_front() else { break };
            map.remove(&old);
        }
        map.insert(digest, page);
        order.push_back(digest);
    }

    fn contains(&self, digest: &PageDigest) -> bool {
        self.inner.lock().unwrap().0.contains_key(digest)
    }
}

/// Counters of a [`MemRetained`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MemRetainedStats {
    pub(crate) pages: u64,
    pub(crate) bytes: u64,
}

struct Held {
    page: Bytes,
    release_at: WireOffset,
    unsealed: u32,
}

/// In-memory [`PageRetainer`] for the tests, playing the source gateway's part: `budget_bytes`
/// of distinct pages, released by acknowledged wire offsets, resupplied on request.
pub(crate) struct MemRetained {
    budget_pages: usize,
    pages: Mutex<HashMap<PageDigest, Held>>,
    resupplied: AtomicU64,
}

impl MemRetained {
    pub(crate) fn new(budget_bytes: usize) -> Self {
        Self { budget_pages: budget_bytes / PAGE_SIZE, pages: Mutex::default(), resupplied: AtomicU64::new(0) }
    }

    /// The destination acknowledged the wire up to `acked`.
    pub(crate) fn release(&self, acked: WireOffset) {
        self.pages.lock().unwrap().retain(|_, h| h.unsealed > 0 || h.release_at > acked);
    }

    /// The page, counted as resupplied.
    pub(crate) fn resupply(&self, digest: &PageDigest) -> Option<Bytes> {
        let page = self.pages.lock().unwrap().get(digest).map(|h| h.page.clone())?;
        self.resupplied.fetch_add(1, Ordering::Relaxed);
        Some(page)
    }

    pub(crate) fn stats(&self) -> MemRetainedStats {
        let pages = self.pages.lock().unwrap().len() as u64;
        MemRetainedStats { pages, bytes: pages * PAGE_SIZE as u64 }
    }
}

impl PageRetainer for MemRetained {
    fn retain(&self, digest: PageDigest, page: &[u8]) -> bool {
        let mut pages = self.pages.lock().unwrap();
        if !pages.contains_key(&digest) && pages.len() >= self.budget_pages {
            return false;
        }
        pages
            .entry(digest)
            .or_insert_with(|| Held { page: Bytes::copy_from_slice(page), release_at: WireOffset::ZERO, unsealed: 0 })
            .unsealed += 1;
        true
    }

    fn seal(&self, digests: &[PageDigest], end: WireOffset) {
        let mut pages = self.pages.lock().unwrap();
        for d in digests {
            if let Some(h) = pages.get_mut(d) {
                h.unsealed = h.unsealed.saturating_sub(1);
                h.release_at = h.release_at.max(end);
            }
        }
    }

    fn resupplied_pages(&self) -> u64 {
        self.resupplied.load(Ordering::Relaxed)
    }
}

/// The retention budget the gateway uses by default (64 MiB per connection).
const TEST_RETAIN_BUDGET: usize = 64 << 20;

/// An encoder retaining advertised pages in a fresh [`MemRetained`] of the default budget.
fn encoder(cfg: EncoderConfig, index: Arc<dyn DestinationIndex>) -> (Encoder, Arc<MemRetained>) {
    let store = Arc::new(MemRetained::new(TEST_RETAIN_BUDGET));
    (Encoder::new(cfg, index, store.clone()), store)
}

pub(crate) fn encode_with(input: &[u8], cfg: EncoderConfig, index: Arc<dyn DestinationIndex>, splits: &mut dyn FnMut(usize) -> usize) -> (Vec<u8>, CodecStats) {
    encode_retaining(input, cfg, index, Arc::new(MemRetained::new(TEST_RETAIN_BUDGET)), splits)
}

/// [`encode_with`], keeping advertised pages in `retained`.
pub(crate) fn encode_retaining(
    input: &[u8],
    cfg: EncoderConfig,
    index: Arc<dyn DestinationIndex>,
    retained: Arc<dyn PageRetainer>,
    splits: &mut dyn FnMut(usize) -> usize,
) -> (Vec<u8>, CodecStats) {
    let mut enc = Encoder::new(cfg, index, retained);
    let mut wire = Vec::new();
    let mut pos = 0;
    while pos < input.len() {
        let n = splits(input.len() - pos).clamp(1, input.len() - pos);
        enc.push(&input[pos..pos + n], &mut wire);
        pos += n;
    }
    enc.finish(&mut wire);
    (wire, enc.stats())
}

pub(crate) fn decode_with(wire: &[u8], cache: Arc<dyn PageStore>, splits: &mut dyn FnMut(usize) -> usize) -> Result<Vec<u8>, (DecodeError, Vec<u8>)> {
    let mut dec = Decoder::new(cache);
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < wire.len() {
        let n = splits(wire.len() - pos).clamp(1, wire.len() - pos);
        if let Err(e) = dec.push(&wire[pos..pos + n], &mut out) {
            return Err((e, out));
        }
        pos += n;
    }
    match dec.finish(&mut out) {
        Ok(()) => Ok(out),
        Err(e) => Err((e, out)),
    }
}

fn whole(n: usize) -> usize {
    n
}

pub(crate) fn round_trip(input: &[u8]) -> (Vec<u8>, CodecStats) {
    let (wire, stats) = encode_with(input, EncoderConfig::default(), Arc::new(NoIndex), &mut whole);
    let out = decode_with(&wire, Arc::new(MemPages::new(64 << 20)), &mut whole).expect("decode");
    assert_eq!(blake3::hash(&out), blake3::hash(input), "round trip must be byte-identical");
    assert_eq!(out.len(), input.len());
    (wire, stats)
}

#[test]
fn main_channel_round_trip() {
    let s = sample_main_stream(1, 600);
    let (wire, st) = round_trip(&s.bytes);
    assert_eq!(st.mode, StreamMode::MainTail, "{st:?}");
    assert_eq!(st.opaque_reason, None);
    assert!(st.zero_pages > 50, "{st:?}");
    assert!(st.window_refs > 50, "{st:?}");
    assert!(st.literal_pages > 100, "{st:?}");
    assert_eq!(st.bytes_in, s.bytes.len() as u64);
    assert_eq!(st.wire_bytes_out, wire.len() as u64);
    assert!(wire.len() < s.bytes.len(), "{} vs {}", wire.len(), s.bytes.len());
}

#[test]
fn main_channel_with_x_ignore_shared_and_no_footers_of_config() {
    let mut rng = Rng::new(9);
    let mut s = MainStream::new(&["x-ignore-shared"]);
    s.ram_start(&[("pc.ram", 1 << 20), ("pc.rom", 128 << 10)], true);
    s.part();
    for i in 0..20 {
        let p = page(&mut rng, Content::Dup((i % 3) as u8));
        s.page("pc.ram", i * 4096, &p);
    }
    s.eos();
    s.end();
    s.eos();
    s.finish(&mut rng);
    let (_, st) = round_trip(&s.bytes);
    assert_eq!(st.mode, StreamMode::MainTail, "{st:?}");
    assert_eq!(st.literal_pages, 3);
    assert_eq!(st.window_refs, 17);
}

#[test]
fn main_channel_with_mapped_ram_goes_opaque_and_round_trips() {
    let mut rng = Rng::new(10);
    let mut s = MainStream::new(&["x-ignore-shared", "mapped-ram"]);
    s.ram_start(&[("pc.ram", 1 << 20)], true);
    s.part();
    for i in 0..8 {
        s.page("pc.ram", i * 4096, &page(&mut rng, Content::Random));
    }
    s.eos();
    s.end();
    s.eos();
    s.finish(&mut rng);
    let (_, st) = round_trip(&s.bytes);
    assert_eq!(st.mode, StreamMode::Opaque, "{st:?}");
    assert_eq!(st.opaque_reason.as_deref(), Some("capability mapped-ram"));
    assert_eq!(st.literal_pages, 0);
}

#[test]
fn multifd_round_trip() {
    let b = sample_multifd_stream(2, 12, &[Content::Random, Content::Dup(1), Content::Dup(2), Content::Zero, Content::Text]);
    let (_, st) = round_trip(&b);
    assert_eq!(st.mode, StreamMode::Multifd, "{st:?}");
    assert_eq!(st.opaque_reason, None);
    assert!(st.literal_pages > 0 && st.window_refs > 0 && st.zero_pages > 0, "{st:?}");
}

#[test]
fn opaque_round_trip() {
    let mut rng = Rng::new(3);
    let mut b = vec![0u8; 300_000];
    rng.fill(&mut b[..100_000]);
    for (i, x) in b[100_000..].iter_mut().enumerate() {
        *x = b"hello opaque world "[i % 19];
    }
    let (wire, st) = round_trip(&b);
    assert_eq!(st.mode, StreamMode::Opaque);
    assert_eq!(st.opaque_reason.as_deref(), Some("no QEMU magic"));
    assert!(wire.len() < 120_000);
    for n in 0..6 {
        round_trip(&b"QEVM\x00\x00"[..n]);
        round_trip(&[0x11, 0x22, 0x33, 0x44, 0x00][..n]);
    }
}

#[test]
fn flush_releases_bytes_held_for_detection() {
    // A source that sends 1 byte and waits for an answer must not stall in the encoder.
    let mut enc = Encoder::new(EncoderConfig::default(), Arc::new(NoIndex), Arc::new(NoRetainer));
    let mut dec = Decoder::new(Arc::new(MemPages::new(1 << 20)));
    let (mut wire, mut out) = (Vec::new(), Vec::new());
    enc.push(b"Q", &mut wire);
    enc.flush(&mut wire);
    dec.push(&wire, &mut out).unwrap();
    assert_eq!(out, b"Q");
    assert_eq!(enc.stats().mode, StreamMode::Opaque);
    wire.clear();
    enc.push(b"EVM more", &mut wire);
    enc.finish(&mut wire);
    dec.push(&wire, &mut out).unwrap();
    dec.finish(&mut out).unwrap();
    assert_eq!(out, b"QEVM more");
}

#[test]
fn opaque_triggers_keep_round_trip_exact() {
    let mut rng = Rng::new(4);
    // XBZRLE record in a PART.
    let mut s = MainStream::new(&[]);
    s.ram_start(&[("pc.ram", 1 << 20)], false);
    s.part();
    let p = page(&mut rng, Content::Random);
    s.page("pc.ram", 0, &p);
    s.bytes.extend_from_slice(&(4096u64 | 0x40 | 0x20).to_be_bytes());
    s.bytes.extend_from_slice(&[1, 0, 3, 1, 2, 3]);
    let p2 = page(&mut rng, Content::Random);
    s.page("pc.ram", 8192, &p2);
    s.eos();
    let (_, st) = round_trip(&s.bytes);
    assert_eq!(st.mode, StreamMode::Opaque);
    assert!(st.opaque_reason.as_deref().unwrap().contains("XBZRLE"), "{st:?}");
    assert_eq!(st.literal_pages, 1);

    // Another iterable section.
    let mut s = MainStream::new(&[]);
    s.section_full_header(0x01, 7, "dirty-bitmap", 1);
    s.bytes.extend_from_slice(&[1, 2, 3]);
    let (_, st) = round_trip(&s.bytes);
    assert!(st.opaque_reason.as_deref().unwrap().contains("dirty-bitmap"), "{st:?}");

    // Postcopy.
    let mut s = MainStream::new(&[]);
    s.command(3, &[0; 16]);
    s.ram_start(&[("pc.ram", 1 << 20)], false);
    let (_, st) = round_trip(&s.bytes);
    assert!(st.opaque_reason.as_deref().unwrap().contains("postcopy"), "{st:?}");

    // Multifd with QEMU-side zstd.
    let mut b = sample_multifd_stream(5, 3, &[Content::Random]);
    b[64 + 11] |= 0x04;
    let (_, st) = round_trip(&b);
    assert!(st.opaque_reason.as_deref().unwrap().contains("compression"), "{st:?}");

    // Target page size other than 4 KiB.
    let mut b = Vec::new();
    b.extend_from_slice(b"QEVM\x00\x00\x00\x03\x07\x00\x00\x00\x04virt\x05");
    let sub = b"configuration/target-page-bits";
    b.push(sub.len() as u8);
    b.extend_from_slice(sub);
    b.extend_from_slice(&1u32.to_be_bytes());
    b.extend_from_slice(&16u32.to_be_bytes());
    let (_, st) = round_trip(&b);
    assert!(st.opaque_reason.as_deref().unwrap().contains("page bits"), "{st:?}");
}

/// Four RAM records (a random page, a zero record, the same page again, a zero-filled page) and
/// the device tail: every op kind in a stream short enough to cut at every byte.
fn small_main_stream() -> MainStream {
    let mut rng = Rng::new(5);
    let mut s = MainStream::new(&[]);
    s.ram_start(&[("pc.ram", 1 << 20)], false);
    s.part();
    let a = page(&mut rng, Content::Random);
    s.page("pc.ram", 0, &a);
    s.zero("pc.ram", 4096);
    s.page("pc.ram", 8192, &a);
    s.page("pc.ram", 12288, &[0; 4096]);
    s.eos();
    s.end();
    s.eos();
    s.finish(&mut rng);
    s
}

#[test]
fn every_split_point_small_streams() {
    let s = small_main_stream();
    let multifd = sample_multifd_stream(6, 2, &[Content::Dup(1), Content::Random]);
    for input in [&s.bytes[..], &multifd[..4096 * 3]] {
        let (ref_wire, _) = encode_with(input, EncoderConfig::default(), Arc::new(NoIndex), &mut whole);
        for cut in 0..=input.len() {
            let mut enc = Encoder::new(EncoderConfig::default(), Arc::new(NoIndex), Arc::new(NoRetainer));
            let mut wire = Vec::new();
            enc.push(&input[..cut], &mut wire);
            enc.push(&input[cut..], &mut wire);
            enc.finish(&mut wire);
            assert!(wire == ref_wire, "encoder output depends on split at {cut}");
        }
        let mut one = |_n: usize| 1;
        let (wire1, _) = encode_with(input, EncoderConfig::default(), Arc::new(NoIndex), &mut one);
        assert!(wire1 == ref_wire, "byte-at-a-time encoding differs");
        for cut in 0..=ref_wire.len() {
            let mut dec = Decoder::new(Arc::new(MemPages::new(1 << 20)));
            let mut out = Vec::new();
            dec.push(&ref_wire[..cut], &mut out).unwrap();
            dec.push(&ref_wire[cut..], &mut out).unwrap();
            dec.finish(&mut out).unwrap();
            assert!(out == input, "decoder split at {cut}");
        }
        let out = decode_with(&ref_wire, Arc::new(MemPages::new(1 << 20)), &mut one).unwrap();
        assert!(out == input);
    }
}

#[test]
fn random_split_sizes_large_streams() {
    let main = sample_main_stream(7, 900).bytes;
    let multifd = sample_multifd_stream(8, 10, &[Content::Random, Content::Dup(3), Content::Zero]);
    let mut rng = Rng::new(99);
    for input in [&main, &multifd] {
        let (ref_wire, _) = encode_with(input, EncoderConfig::default(), Arc::new(NoIndex), &mut whole);
        for _ in 0..4 {
            let mut sizes = |left: usize| match rng.below(4) {
                0 => 1 + rng.below(16),
                1 => 1 + rng.below(5000),
                2 => 1 + rng.below(70_000),
                _ => left,
            };
            let (wire, _) = encode_with(input, EncoderConfig::default(), Arc::new(NoIndex), &mut sizes);
            assert!(wire == ref_wire);
            let out = decode_with(&wire, Arc::new(MemPages::new(64 << 20)), &mut sizes).unwrap();
            assert_eq!(blake3::hash(&out), blake3::hash(input));
        }
    }
}

#[test]
fn second_migration_with_advertisement_sends_far_less() {
    // A "VM" of 2000 mostly unique pages, migrated twice (the second time with a few changes).
    let mut rng = Rng::new(10);
    let pages: Vec<Vec<u8>> =
        (0..2000).map(|i| page(&mut rng, if i % 3 == 0 { Content::Random } else { Content::Text })).collect();
    let build = |pages: &[Vec<u8>], rng: &mut Rng| {
        let mut s = MainStream::new(&[]);
        s.ram_start(&[("pc.ram", 2000 * 4096)], false);
        s.part();
        for (i, p) in pages.iter().enumerate() {
            s.page("pc.ram", i as u64 * 4096, p);
        }
        s.eos();
        s.end();
        s.eos();
        s.finish(rng);
        s.bytes
    };
    let first = build(&pages, &mut rng);
    let cache = Arc::new(MemPages::new(64 << 20));
    let (wire1, st1) = encode_with(&first, EncoderConfig::default(), Arc::new(NoIndex), &mut whole);
    let out = decode_with(&wire1, cache.clone(), &mut whole).unwrap();
    assert!(out == first);
    assert_eq!(st1.literal_pages, 2000);

    // Destination advertises; the advert crosses the wire encoded.
    let advertised = Advertisement { session_window_pages: 65536, digests: DigestSet::from_digests(&cache.digests()) };
    let ad = Advertisement::decode(&advertised.encode()).unwrap();
    assert_eq!(ad.digests.len(), 2000);
    let mut pages2 = pages.clone();
    for p in pages2.iter_mut().step_by(50) {
        rng.fill(&mut p[..64]);
    }
    let second = build(&pages2, &mut rng);
    let cfg = EncoderConfig { session_window_pages: ad.session_window_pages, ..EncoderConfig::default() };
    let (wire2, st2) = encode_with(&second, cfg, Arc::new(ad.digests), &mut whole);
    let out2 = decode_with(&wire2, cache.clone(), &mut whole).unwrap();
    assert!(out2 == second);
    assert_eq!(st2.literal_pages, 40);
    assert_eq!(st2.advertised_refs, 1960);
    let ratio = wire2.len() as f64 / wire1.len() as f64;
    assert!(ratio < 0.1, "second migration ratio {ratio:.3} ({} vs {} bytes)", wire2.len(), wire1.len());
}

/// Decodes like the tunnel does: pushes `chunk`-sized pieces, stops pushing while stalled,
/// answers every need from `store` (the encoder's retained pages), and releases pages the
/// decoder has consumed. Returns the output and the decoder.
fn decode_resupplying(wire: &[u8], cache: Arc<dyn PageStore>, store: &MemRetained, chunk: usize) -> (Vec<u8>, Decoder) {
    decode_resupplying_bounded(wire, cache, store, chunk, usize::MAX)
}

/// [`decode_resupplying`] with `max_output_per_push = bound`: also takes pending output (a push
/// with no input) before more input, and asserts every call appends at most the bound.
fn decode_resupplying_bounded(wire: &[u8], cache: Arc<dyn PageStore>, store: &MemRetained, chunk: usize, bound: usize) -> (Vec<u8>, Decoder) {
    let cfg = DecoderConfig { max_output_per_push: bound, ..DecoderConfig::default() };
    let mut dec = Decoder::with_config(cfg, cache);
    let mut out = Vec::new();
    let mut pos = 0;
    let within_bound = |before: usize, out: &[u8]| assert!(out.len() - before <= bound, "{} bytes in one call", out.len() - before);
    loop {
        let needs = dec.take_needs();
        for d in needs {
            let page = store.resupply(&d).expect("the source retains every advertised page it referred to");
            let before = out.len();
            dec.supply(d, page, &mut out).unwrap();
            within_bound(before, &out);
        }
        if dec.is_stalled() {
            // Supplying may have resumed into a later batch that needs pages of its own.
            assert!(dec.outstanding() > 0, "stalled with nothing asked for: {dec:?}");
            continue;
        }
        if dec.has_pending_output() {
            let before = out.len();
            dec.push(&[], &mut out).unwrap();
            within_bound(before, &out);
            continue;
        }
        store.release(dec.consumed());
        if pos == wire.len() {
            break;
        }
        let n = chunk.min(wire.len() - pos);
        let before = out.len();
        dec.push(&wire[pos..pos + n], &mut out).unwrap();
        within_bound(before, &out);
        pos += n;
    }
    dec.finish(&mut out).unwrap();
    (out, dec)
}

#[test]
fn decoder_stalls_on_an_evicted_page_and_resumes_byte_identical_after_supply() {
    let mut rng = Rng::new(21);
    let pages: Vec<Vec<u8>> = (0..300).map(|_| page(&mut rng, Content::Random)).collect();
    let input = main_stream_of(&pages, &mut rng);
    // The source believes the destination holds every page; the destination holds the odd ones.
    let idx = DigestSet::from_digests(&pages.iter().map(|p| PageDigest::of(p)).collect::<Vec<_>>());
    let (mut enc, store) = encoder(EncoderConfig::default(), Arc::new(idx));
    let mut wire = Vec::new();
    enc.push(&input, &mut wire);
    enc.finish(&mut wire);
    assert_eq!(enc.stats().advertised_refs, 300);
    assert_eq!(store.stats().pages, 300);
    let cache = Arc::new(MemPages::new(64 << 20));
    for p in pages.iter().skip(1).step_by(2) {
        cache.insert(PageDigest::of(p), bytes::Bytes::copy_from_slice(p));
    }

    // Whole wire at once: the decoder stops at the first miss, releases nothing unverified, and
    // asks for all 150 missing pages of the batch in one go.
    let mut dec = Decoder::new(cache.clone());
    let mut out = Vec::new();
    dec.push(&wire, &mut out).unwrap();
    assert!(dec.is_stalled());
    assert!(out.is_empty(), "nothing of a main channel may be released before verification");
    let needs = dec.take_needs();
    let expect: std::collections::HashSet<_> = pages.iter().step_by(2).map(|p| PageDigest::of(p)).collect();
    assert_eq!(needs.len(), 150);
    assert_eq!(needs.iter().copied().collect::<std::collections::HashSet<_>>(), expect);
    assert!(dec.consumed() < WireOffset::new(wire.len() as u64));
    for (i, d) in needs.iter().enumerate() {
        dec.supply(*d, store.resupply(d).unwrap(), &mut out).unwrap();
        assert_eq!(dec.is_stalled(), i + 1 < needs.len(), "resumes once every page it waits for arrived");
    }
    assert!(dec.take_needs().is_empty());
    dec.finish(&mut out).unwrap();
    assert!(out == input, "round trip must be byte-identical");
    assert_eq!(dec.consumed(), WireOffset::new(wire.len() as u64));
    assert_eq!(dec.stats(), DecoderStats { stalls: 150, pages_requested: 150, pages_supplied: 150 });
    assert_eq!(enc.stats().resupplied_pages, 150);
    // Supplied pages enter the cache like literals.
    assert!(cache.contains(&PageDigest::of(&pages[0])));

    // Small pushes, several batches, a cache that holds nothing: every split works.
    // (Idle flushes every few pages make many batches.)
    for chunk in [1, 777, 64 << 10, usize::MAX] {
        let idx = DigestSet::from_digests(&pages.iter().map(|p| PageDigest::of(p)).collect::<Vec<_>>());
        let (mut enc, store) = encoder(EncoderConfig::default(), Arc::new(idx));
        let mut wire = Vec::new();
        for piece in input.chunks(5 * 4096) {
            enc.push(piece, &mut wire);
            enc.flush(&mut wire);
        }
        enc.finish(&mut wire);
        let (out, dec) = decode_resupplying(&wire, Arc::new(MemPages::new(0)), &store, chunk);
        assert!(dec.stats().stalls > 10, "chunk {chunk}");
        assert_eq!(store.stats().pages, 0, "chunk {chunk}: everything acknowledged");
        assert!(out == input, "chunk {chunk}");
        assert_eq!(dec.stats().pages_supplied, 300, "chunk {chunk}");
    }
}

#[test]
fn wrong_or_unrequested_supply_is_rejected() {
    let mut rng = Rng::new(22);
    let pages: Vec<Vec<u8>> = (0..4).map(|_| page(&mut rng, Content::Random)).collect();
    let input = main_stream_of(&pages, &mut rng);
    let digests: Vec<PageDigest> = pages.iter().map(|p| PageDigest::of(p)).collect();
    let (wire, _) = encode_with(&input, EncoderConfig::default(), Arc::new(DigestSet::from_digests(&digests)), &mut whole);
    let stalled = || {
        let mut dec = Decoder::new(Arc::new(MemPages::new(0)));
        let mut out = Vec::new();
        dec.push(&wire, &mut out).unwrap();
        assert_eq!(dec.take_needs(), digests);
        dec
    };
    let mut out = Vec::new();
    // A page nobody asked for.
    let other_page = Bytes::from(numbered_page(7));
    let other = PageDigest::of(&other_page);
    let mut dec = stalled();
    assert!(matches!(dec.supply(other, other_page, &mut out), Err(DecodeError::UnrequestedPage(d)) if d == other));
    assert!(matches!(dec.push(&[], &mut out), Err(DecodeError::Poisoned)));
    // Bytes that are not the page asked for.
    let mut dec = stalled();
    let wrong = bytes::Bytes::copy_from_slice(&pages[1]);
    assert!(matches!(dec.supply(digests[0], wrong, &mut out), Err(DecodeError::BadSupply { .. })));
    assert!(matches!(dec.finish(&mut out), Err(DecodeError::Poisoned)));
    let mut dec = stalled();
    assert!(matches!(dec.supply(digests[0], bytes::Bytes::from_static(b"short"), &mut out), Err(DecodeError::BadSupply { len: 5, .. })));
    // The same page twice: the second was not requested any more.
    let mut dec = stalled();
    let p0 = bytes::Bytes::copy_from_slice(&pages[0]);
    dec.supply(digests[0], p0.clone(), &mut out).unwrap();
    assert!(matches!(dec.supply(digests[0], p0, &mut out), Err(DecodeError::UnrequestedPage(_))));
    assert!(out.is_empty());
}

#[test]
fn input_pushed_while_stalled_is_bounded() {
    let mut rng = Rng::new(23);
    let p = page(&mut rng, Content::Random);
    let input = main_stream_of(std::slice::from_ref(&p), &mut rng);
    let (wire, _) = encode_with(&input, EncoderConfig::default(), Arc::new(DigestSet::from_digests(&[PageDigest::of(&p)])), &mut whole);
    let cfg = DecoderConfig { max_stalled_input: 1000, ..DecoderConfig::default() };
    let mut dec = Decoder::with_config(cfg, Arc::new(MemPages::new(0)));
    let mut out = Vec::new();
    dec.push(&wire, &mut out).unwrap();
    assert!(dec.is_stalled());
    dec.push(&[0u8; 900], &mut out).unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(dec.push(&[0u8; 900], &mut out), Err(DecodeError::StalledInputFull { limit: 1000, .. })));
}

#[test]
fn retention_budget_full_sends_advertised_pages_literally() {
    let mut rng = Rng::new(24);
    let pages: Vec<Vec<u8>> = (0..10).map(|_| page(&mut rng, Content::Random)).collect();
    let input = main_stream_of(&pages, &mut rng);
    let idx = DigestSet::from_digests(&pages.iter().map(|p| PageDigest::of(p)).collect::<Vec<_>>());
    let budget = 3 * PAGE_SIZE;
    let cfg = EncoderConfig::default();
    let (wire, st) = encode_retaining(&input, cfg.clone(), Arc::new(idx.clone()), Arc::new(MemRetained::new(budget)), &mut whole);
    assert_eq!((st.advertised_refs, st.unretained_literals, st.literal_pages), (3, 7, 7));
    // An empty destination cache still decodes it, asking only for the three references.
    let mut dec = Decoder::new(Arc::new(MemPages::new(0)));
    let mut out = Vec::new();
    dec.push(&wire, &mut out).unwrap();
    assert_eq!(dec.take_needs().len(), 3);

    // No budget: no advertised references at all.
    let (_, st) = encode_retaining(&input, cfg.clone(), Arc::new(idx.clone()), Arc::new(MemRetained::new(0)), &mut whole);
    assert_eq!((st.advertised_refs, st.literal_pages), (0, 10));
    let (_, st) = encode_retaining(&input, cfg, Arc::new(idx), Arc::new(NoRetainer), &mut whole);
    assert_eq!((st.advertised_refs, st.literal_pages), (0, 10));
}

#[test]
fn retained_pages_are_released_by_the_acknowledged_wire_offset() {
    let mut rng = Rng::new(25);
    let pages: Vec<Vec<u8>> = (0..64).map(|_| page(&mut rng, Content::Random)).collect();
    let input = main_stream_of(&pages, &mut rng);
    let idx = DigestSet::from_digests(&pages.iter().map(|p| PageDigest::of(p)).collect::<Vec<_>>());
    // Idle flushes spread the references over several batches.
    let (mut enc, store) = encoder(EncoderConfig::default(), Arc::new(idx));
    let mut wire = Vec::new();
    for piece in input.chunks(8 * 4096) {
        enc.push(piece, &mut wire);
        enc.flush(&mut wire);
    }
    enc.finish(&mut wire);
    assert_eq!(store.stats().pages, 64);
    // A destination holding every page decodes without a miss; as it acknowledges more of the
    // wire, the source holds fewer pages, and none once everything is acknowledged.
    let cache = Arc::new(MemPages::new(64 << 20));
    for p in &pages {
        cache.insert(PageDigest::of(p), bytes::Bytes::copy_from_slice(p));
    }
    let mut dec = Decoder::new(cache);
    let mut out = Vec::new();
    let mut held = store.stats().pages;
    let mut partial = false;
    for piece in wire.chunks(4096) {
        dec.push(piece, &mut out).unwrap();
        assert!(!dec.is_stalled());
        store.release(dec.consumed());
        let now = store.stats().pages;
        assert!(now <= held);
        partial |= now > 0 && now < 64;
        held = now;
    }
    dec.finish(&mut out).unwrap();
    assert!(out == input);
    assert!(partial, "pages are released batch by batch");
    assert_eq!(dec.consumed(), WireOffset::new(wire.len() as u64));
    assert_eq!(store.stats().pages, 0);
    assert_eq!(store.stats().bytes, 0);
}

#[test]
fn evicted_advertised_page_is_a_clean_missing_page_error() {
    let mut rng = Rng::new(11);
    let p = page(&mut rng, Content::Random);
    let mut s = MainStream::new(&[]);
    s.ram_start(&[("pc.ram", 1 << 20)], false);
    s.part();
    s.page("pc.ram", 0, &p);
    s.eos();
    s.end();
    s.eos();
    s.finish(&mut rng);
    // The source believes the destination holds `p`, but the destination's cache is empty, and
    // nobody supplies it: the wire ends while the decoder waits for the page.
    let idx = DigestSet::from_digests(&[PageDigest::of(&p)]);
    let (wire, st) = encode_with(&s.bytes, EncoderConfig::default(), Arc::new(idx), &mut whole);
    assert_eq!(st.advertised_refs, 1);
    let (err, released) = decode_with(&wire, Arc::new(MemPages::new(1 << 20)), &mut whole).unwrap_err();
    assert!(matches!(err, DecodeError::MissingPage(d) if d == PageDigest::of(&p)), "{err}");
    assert!(released.is_empty(), "nothing of a main channel may be released before verification");
}

#[test]
fn session_window_survives_cache_eviction() {
    // The cache holds 2 pages; the window guarantees later references still resolve.
    let mut rng = Rng::new(12);
    let pages: Vec<Vec<u8>> = (0..50).map(|_| page(&mut rng, Content::Random)).collect();
    // The same 50 pages in three packets of one multifd channel.
    let mut stream = MultifdStream::new();
    for round in 0..3 {
        stream.pages(round, 0, &pages);
    }
    let input = stream.into_bytes();
    let (wire, st) = encode_with(&input, EncoderConfig::default(), Arc::new(NoIndex), &mut whole);
    assert_eq!((st.literal_pages, st.window_refs), (50, 100));
    let out = decode_with(&wire, Arc::new(MemPages::new(2 * PAGE_SIZE)), &mut whole).unwrap();
    assert!(out == input);

    // A window smaller than the working set: the encoder re-sends, never dangles.
    let cfg = EncoderConfig { session_window_pages: 10, ..EncoderConfig::default() };
    let (wire, st) = encode_with(&input, cfg, Arc::new(NoIndex), &mut whole);
    assert_eq!(st.literal_pages, 150);
    let out = decode_with(&wire, Arc::new(MemPages::new(0)), &mut whole).unwrap();
    assert!(out == input);
}

#[test]
fn window_larger_than_decoder_limit_is_refused() {
    let cfg = EncoderConfig { session_window_pages: 1 << 20, ..EncoderConfig::default() };
    let (wire, _) = encode_with(b"hello", cfg, Arc::new(NoIndex), &mut whole);
    let err = decode_with(&wire, Arc::new(MemPages::new(0)), &mut whole).unwrap_err().0;
    assert!(matches!(err, DecodeError::WindowTooLarge { .. }), "{err}");
}

#[test]
fn main_channel_end_is_held_until_verified() {
    let s = sample_main_stream(13, 300);
    let eof = s.eof_at.unwrap();
    let mut enc = Encoder::new(EncoderConfig::default(), Arc::new(NoIndex), Arc::new(NoRetainer));
    let mut wire = Vec::new();
    enc.push(&s.bytes, &mut wire);
    // Without a flush/finish the decoder can't release anything of a short main channel.
    let mut dec = Decoder::new(Arc::new(MemPages::new(1 << 20)));
    let mut out = Vec::new();
    dec.push(&wire, &mut out).unwrap();
    assert!(out.len() <= eof);
    // Idle flush → checkpoint → everything verified so far is released.
    let mut more = Vec::new();
    enc.flush(&mut more);
    dec.push(&more, &mut out).unwrap();
    assert!(out == s.bytes);
    assert_eq!(dec.held_back(), 0);
    // A second flush without new input writes nothing.
    let mut none = Vec::new();
    enc.flush(&mut none);
    assert!(none.is_empty());
    let mut tail = Vec::new();
    enc.finish(&mut tail);
    dec.push(&tail, &mut out).unwrap();
    dec.finish(&mut out).unwrap();
    assert!(out == s.bytes);

    // Each full batch is verified and released on its own, long before the trailer.
    let m = sample_multifd_stream(14, 8, &[Content::Random]);
    let mut enc = Encoder::new(EncoderConfig { batch_pages: 64, ..EncoderConfig::default() }, Arc::new(NoIndex), Arc::new(NoRetainer));
    let mut wire = Vec::new();
    enc.push(&m, &mut wire);
    let mut dec = Decoder::new(Arc::new(MemPages::new(1 << 20)));
    let mut out = Vec::new();
    dec.push(&wire, &mut out).unwrap();
    assert!(out.len() > m.len() / 2 && out[..] == m[..out.len()]);
    let mut more = Vec::new();
    enc.flush(&mut more);
    dec.push(&more, &mut out).unwrap();
    assert!(out == m);
}

#[test]
fn unverified_bytes_never_reach_the_callers_buffer() {
    // The decoder rebuilds batches at the end of the caller's buffer; whatever no checkpoint
    // verified yet must be gone from it when a call returns, and the caller's own bytes stay.
    let m = sample_multifd_stream(30, 4, &[Content::Random, Content::Zero, Content::Dup(1)]);
    let cfg = EncoderConfig { batch_pages: 16, ..EncoderConfig::default() };
    let (wire, _) = encode_with(&m, cfg, Arc::new(NoIndex), &mut whole);
    let (_, mut pos) = frame::Preamble::parse(&wire).unwrap().unwrap();
    // (wire offset, frame length, stream length covered) of every checkpoint.
    let mut checkpoints = Vec::new();
    while pos < wire.len() {
        let (h, hlen) = frame::parse_frame_header(&wire[pos..]).unwrap().unwrap();
        match h {
            frame::FrameHeader::Batch(b) => pos += hlen + b.body_len,
            frame::FrameHeader::Checkpoint { total_len, .. } => {
                checkpoints.push((pos, hlen, total_len as usize));
                pos += hlen;
            }
            frame::FrameHeader::Trailer { .. } => pos += hlen,
        }
    }
    assert!(checkpoints.len() >= 2, "{checkpoints:?}");
    let ((_, _, len0), (cp1, cp1_len, len1)) = (checkpoints[0], checkpoints[1]);
    for corrupt in [false, true] {
        let mut dec = Decoder::new(Arc::new(MemPages::new(1 << 20)));
        let mut out = b"caller".to_vec();
        // Up to the second batch's checkpoint, without it.
        dec.push(&wire[..cp1], &mut out).unwrap();
        assert!(out[..6] == *b"caller" && out[6..] == m[..len0]);
        assert_eq!(dec.held_back(), len1 - len0);
        let mut rest = wire[cp1..].to_vec();
        if corrupt {
            rest[cp1_len - 1] ^= 1;
            let before = out.clone();
            let err = dec.push(&rest, &mut out).unwrap_err();
            assert!(matches!(err, DecodeError::DigestMismatch { .. }), "{err}");
            assert!(out == before, "a failed call releases nothing more");
        } else {
            dec.push(&rest, &mut out).unwrap();
            dec.finish(&mut out).unwrap();
            assert!(out[..6] == *b"caller" && out[6..] == m[..]);
        }
    }
}

/// Decodes in one push, returning what was released even on error.
fn decode_gated(wire: &[u8]) -> (Result<(), DecodeError>, Vec<u8>) {
    let mut dec = Decoder::new(Arc::new(MemPages::new(1 << 20)));
    let mut out = Vec::new();
    let r = dec.push(wire, &mut out).and_then(|()| dec.finish(&mut out));
    (r, out)
}

#[test]
fn corrupted_wire_is_rejected_and_eof_never_released() {
    let s = sample_main_stream(15, 240);
    let eof = s.eof_at.unwrap();
    let cfg = EncoderConfig { batch_pages: 16, ..EncoderConfig::default() };
    let (wire, _) = encode_with(&s.bytes, cfg, Arc::new(NoIndex), &mut whole);
    let (r, out) = decode_gated(&wire);
    r.unwrap();
    assert!(out == s.bytes);
    let mut rng = Rng::new(16);
    let mut errors = 0;
    // Every byte of the first 2 KiB and the last 2 KiB, and a random sample in between.
    let mut positions: Vec<usize> = (0..2048.min(wire.len())).chain(wire.len().saturating_sub(2048)..wire.len()).collect();
    positions.extend((0..2000).map(|_| rng.below(wire.len())));
    for pos in positions {
        let mut bad = wire.clone();
        bad[pos] ^= 1 << rng.below(8);
        let (r, out) = decode_gated(&bad);
        match r {
            Ok(()) => assert_eq!(out, s.bytes, "flip at {pos} accepted with different output"),
            Err(_) => {
                errors += 1;
                assert!(out[..] == s.bytes[..out.len()], "flip at {pos}: released bytes must be a verified prefix");
                // EOF goes out only inside a verified batch: then the whole stream was verified
                // and the flip hit the closing checkpoint/trailer frames.
                assert!(
                    out.len() <= eof || (out == s.bytes && pos >= wire.len() - 90),
                    "flip at {pos}: {} bytes released, EOF at {eof}",
                    out.len()
                );
            }
        }
    }
    assert!(errors > 3000, "{errors}");
}

#[test]
fn hostile_lengths_fail_without_allocating() {
    let mut w = Vec::new();
    frame::Preamble { mode: 0, session_window_pages: 0 }.encode(&mut w);
    w.push(T_BATCH_ZSTD);
    put_varint(&mut w, 0);
    put_varint(&mut w, 0);
    put_varint(&mut w, 10);
    put_varint(&mut w, 1);
    put_varint(&mut w, 4 << 30);
    let mut dec = Decoder::new(Arc::new(MemPages::new(0)));
    let mut out = Vec::new();
    let e = dec.push(&w, &mut out).unwrap_err();
    assert!(matches!(e, DecodeError::Frame { .. }), "{e}");
    assert!(matches!(dec.push(b"x", &mut out), Err(DecodeError::Poisoned)));
    // A zero run of 2^40 pages.
    let mut w = Vec::new();
    frame::Preamble { mode: 0, session_window_pages: 0 }.encode(&mut w);
    let mut ops = vec![frame::OP_ZERO];
    put_varint(&mut ops, 1 << 40);
    frame::BatchHeader { compressed: false, stream_offset: 0, n_literal: 0, verbatim_len: 0, ops_len: ops.len(), body_len: ops.len() }
        .encode(&mut w);
    w.extend_from_slice(&ops);
    let mut dec = Decoder::new(Arc::new(MemPages::new(0)));
    assert!(dec.push(&w, &mut out).is_err());
    assert!(out.is_empty());
}

#[test]
fn fuzz_decoder_never_panics() {
    let s = sample_main_stream(17, 120);
    let m = sample_multifd_stream(18, 3, &[Content::Random, Content::Dup(1), Content::Zero]);
    let mut rng = Rng::new(18);
    for input in [&s.bytes, &m] {
        let (wire, _) = encode_with(input, EncoderConfig { batch_pages: 8, ..EncoderConfig::default() }, Arc::new(NoIndex), &mut whole);
        for _ in 0..1500 {
            let mut bad = wire.clone();
            match rng.below(4) {
                0 => {
                    for _ in 0..1 + rng.below(8) {
                        let p = rng.below(bad.len());
                        bad[p] = rng.next() as u8;
                    }
                }
                1 => bad.truncate(rng.below(bad.len())),
                2 => {
                    let p = rng.below(bad.len());
                    let mut junk = vec![0u8; 1 + rng.below(64)];
                    rng.fill(&mut junk);
                    bad.splice(p..p, junk);
                }
                _ => {
                    let p = rng.below(bad.len());
                    let n = rng.below(bad.len() - p);
                    bad.drain(p..p + n);
                }
            }
            let mut sizes = |left: usize| 1 + rng.below(left.min(3000));
            if let Ok(out) = decode_with(&bad, Arc::new(MemPages::new(1 << 20)), &mut sizes) {
                assert!(&out == input, "a mutated wire decoded to different bytes without error");
            }
        }
    }
    // Pure noise, with and without a valid preamble.
    for i in 0..300 {
        let mut noise = vec![0u8; rng.below(5000)];
        rng.fill(&mut noise);
        if i % 2 == 0 {
            let mut w = Vec::new();
            frame::Preamble { mode: 0, session_window_pages: 16 }.encode(&mut w);
            w.extend_from_slice(&noise);
            noise = w;
        }
        assert!(decode_with(&noise, Arc::new(MemPages::new(1 << 20)), &mut whole).is_err());
    }
}

#[test]
fn fuzz_encoder_mutated_qemu_streams_round_trip() {
    let s = sample_main_stream(19, 90);
    let m = sample_multifd_stream(20, 3, &[Content::Random, Content::Dup(1)]);
    let mut rng = Rng::new(21);
    for i in 0..400 {
        let base = if i % 2 == 0 { &s.bytes } else { &m };
        let mut input = base.clone();
        match rng.below(3) {
            0 => {
                for _ in 0..1 + rng.below(4) {
                    // Mutate mostly near structure: the first 600 bytes hold headers.
                    let p = if rng.below(2) == 0 { rng.below(600) } else { rng.below(input.len()) };
                    input[p] = rng.next() as u8;
                }
            }
            1 => input.truncate(rng.below(input.len())),
            _ => {
                let mut junk = vec![0u8; rng.below(10_000)];
                rng.fill(&mut junk);
                input = junk;
            }
        }
        let mut sizes = |left: usize| 1 + rng.below(left.min(9000));
        let (wire, _) = encode_with(&input, EncoderConfig::default(), Arc::new(NoIndex), &mut sizes);
        let out = decode_with(&wire, Arc::new(MemPages::new(1 << 20)), &mut whole).unwrap();
        assert!(out == input);
    }
}

/// A compressible page that is neither zero nor one repeated byte: text from a vocabulary with
/// numbers in it, or an array of 64-byte "kernel objects" (pointers into one region, small
/// counters, flags, padding). zstd shrinks these a few times.
fn compressible_page(rng: &mut Rng) -> Vec<u8> {
    let mut p = vec![0u8; PAGE_SIZE];
    if rng.below(2) == 0 {
        let words: [&[u8]; 24] = [
            b"the ", b"migration ", b"kernel: ", b"page ", b"device ", b"eth0 ", b"ERROR ", b"info ", b"user=",
            b"pid=", b"GET /index.html ", b"HTTP/1.1 200 ", b"session ", b"cache ", b"flush ", b"{\"id\": ",
            b"\"name\": ", b"}, ", b"null", b"true", b"\n", b"    ", b"systemd[1]: ", b"Started ",
        ];
        let mut pos = 0;
        while pos < PAGE_SIZE {
            let mut w = words[rng.below(words.len())].to_vec();
            if rng.below(4) == 0 {
                w.extend_from_slice(rng.below(100_000).to_string().as_bytes());
                w.push(b' ');
            }
            let n = w.len().min(PAGE_SIZE - pos);
            p[pos..pos + n].copy_from_slice(&w[..n]);
            pos += n;
        }
    } else {
        let base = 0xffff_8880_0000_0000u64 + ((rng.below(1 << 16) as u64) << 24);
        let id0 = rng.next() >> 40;
        for (i, obj) in p.chunks_exact_mut(64).enumerate() {
            obj[0..8].copy_from_slice(&(base + ((rng.below(1 << 12) as u64) << 6)).to_le_bytes());
            obj[8..16].copy_from_slice(&(base + ((rng.below(1 << 12) as u64) << 6)).to_le_bytes());
            obj[16..20].copy_from_slice(&(rng.below(8) as u32).to_le_bytes());
            obj[20..24].copy_from_slice(&[0x01u32, 0x11, 0x8001, 0x40][rng.below(4)].to_le_bytes());
            obj[32..40].copy_from_slice(&(id0 + i as u64).to_le_bytes());
            obj[40..42].copy_from_slice(&(rng.below(1500) as u16).to_le_bytes());
        }
    }
    p
}

/// CPU time of the calling thread: the codec's cost per core, whatever else shares the CPU.
fn cpu_now() -> std::time::Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant the kernel knows.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(r, 0, "clock_gettime");
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Throughput of encode and decode (run: `cargo test -p ferry-codec --release --lib tests::bench -- --ignored --nocapture`).
/// Times are the thread's CPU time, so MB/s are per core even when other work shares the CPU;
/// each case runs 3 times and the best is reported (cache and memory-bus contention from other
/// work can still only slow a run down).
#[test]
#[ignore]
fn bench_throughput() {
    fn stream(kind: &str, mib: usize) -> Vec<u8> {
        let mut rng = Rng::new(22);
        let pages = mib * 256;
        let dups: Vec<Vec<u8>> = (0..64).map(|_| page(&mut rng, Content::Random)).collect();
        // "mix": recently sent non-zero pages, duplicated by later pages.
        let mut recent: Vec<Vec<u8>> = Vec::new();
        let mut s = MainStream::new(&[]);
        s.ram_start(&[("pc.ram", (pages * 4096) as u64)], false);
        s.part();
        for i in 0..pages {
            let off = (i * 4096) as u64;
            match kind {
                "zero" => s.page("pc.ram", off, &[0; 4096]),
                "dup" => s.page("pc.ram", off, &dups[i % 64]),
                "mix" => {
                    // ~45 % zero, ~15 % duplicates of earlier pages, ~25 % compressible, ~15 % random.
                    let r = rng.below(100);
                    if r < 45 {
                        s.page("pc.ram", off, &[0; 4096]);
                    } else if r < 60 && !recent.is_empty() {
                        let k = rng.below(recent.len());
                        s.page("pc.ram", off, &recent[k]);
                    } else {
                        let p = if r < 85 { compressible_page(&mut rng) } else { page(&mut rng, Content::Random) };
                        s.page("pc.ram", off, &p);
                        if recent.len() < 4096 {
                            recent.push(p);
                        } else {
                            let k = rng.below(recent.len());
                            recent[k] = p;
                        }
                    }
                }
                _ => {
                    let p = page(&mut rng, Content::Random);
                    s.page("pc.ram", off, &p)
                }
            }
        }
        s.eos();
        s.end();
        s.eos();
        s.finish(&mut rng);
        s.bytes
    }
    // FERRY_BENCH=zero,dup runs only those cases; FERRY_BENCH_RUNS=10 runs each 10 times (e.g.
    // under `perf record`, so building the streams is a small part of the profile).
    let only = std::env::var("FERRY_BENCH").ok();
    let runs: usize = std::env::var("FERRY_BENCH_RUNS").ok().and_then(|r| r.parse().ok()).unwrap_or(3);
    // FERRY_BENCH_ZSTD=1 encodes with another zstd level than the default.
    let mut cfg = EncoderConfig::default();
    if let Some(level) = std::env::var("FERRY_BENCH_ZSTD").ok().and_then(|l| l.parse().ok()) {
        cfg.zstd_level = level;
    }
    for kind in ["zero", "dup", "random", "mix"] {
        if only.as_deref().is_some_and(|o| !o.split(',').any(|k| k == kind)) {
            continue;
        }
        let input = stream(kind, 256);
        let (mut best_e, mut best_d) = (f64::MAX, f64::MAX);
        let mut wire_len = 0;
        let mut stats = None;
        // Buffers are reused per call and across runs, as a flow's socket reader and writer
        // reuse theirs: the bench measures the codec, not first-touch page faults of a fresh
        // 256 MiB Vec (64 KiB of zero-page wire decodes to ~300 MB in one push).
        let mut wire = Vec::with_capacity(input.len() / 2);
        let mut buf = Vec::with_capacity(8 << 20);
        let mut out = Vec::with_capacity(32 << 20);
        for _ in 0..runs {
            wire.clear();
            let t = cpu_now();
            let mut enc = Encoder::new(cfg.clone(), Arc::new(NoIndex), Arc::new(NoRetainer));
            for c in input.chunks(64 << 10) {
                enc.push(c, &mut buf);
                wire.extend_from_slice(&buf);
                buf.clear();
            }
            enc.finish(&mut buf);
            wire.extend_from_slice(&buf);
            buf.clear();
            best_e = best_e.min((cpu_now() - t).as_secs_f64());
            stats = Some(enc.stats());
            // Only the decoder's calls are timed; the output is compared with the input between them.
            let mut td = std::time::Duration::ZERO;
            let t = cpu_now();
            let mut dec = Decoder::new(Arc::new(MemPages::new(512 << 20)));
            td += cpu_now() - t;
            let mut total = 0;
            for c in wire.chunks(64 << 10) {
                let t = cpu_now();
                dec.push(c, &mut out).unwrap();
                td += cpu_now() - t;
                assert!(out[..] == input[total..total + out.len()]);
                total += out.len();
                out.clear();
            }
            let t = cpu_now();
            dec.finish(&mut out).unwrap();
            td += cpu_now() - t;
            assert!(out[..] == input[total..]);
            total += out.len();
            out.clear();
            best_d = best_d.min(td.as_secs_f64());
            assert_eq!(total, input.len());
            wire_len = wire.len();
        }
        let mb = input.len() as f64 / 1e6;
        let st = stats.expect("at least one run");
        println!(
            "{kind:>6}: {mb:.0} MB stream -> {:.1} MB wire (ratio {:.1}); encode {:.0} MB/s, decode {:.0} MB/s \
             [pages: {} zero, {} refs, {} literal]",
            wire_len as f64 / 1e6,
            input.len() as f64 / wire_len as f64,
            mb / best_e,
            mb / best_d,
            st.zero_pages,
            st.ref_pages(),
            st.literal_pages,
        );
    }
}

/// Decodes `pieces` with `max_output_per_push = bound` the way the tunnel does: after each piece,
/// pushes no input while output is pending. Asserts every call appends at most the bound (at
/// least 1: a bound of 0 counts as 1). Returns the output and how many calls appended something.
fn decode_bounded<'a>(pieces: impl IntoIterator<Item = &'a [u8]>, bound: usize) -> (Vec<u8>, usize) {
    let cfg = DecoderConfig { max_output_per_push: bound, ..DecoderConfig::default() };
    let mut dec = Decoder::with_config(cfg, Arc::new(MemPages::new(64 << 20)));
    let mut out = Vec::new();
    let mut calls = 0;
    let mut call = |dec: &mut Decoder, input: &[u8], out: &mut Vec<u8>| {
        let before = out.len();
        dec.push(input, out).unwrap_or_else(|e| panic!("{e}"));
        assert!(out.len() - before <= bound.max(1), "one call appended {} bytes (bound {bound})", out.len() - before);
        calls += usize::from(out.len() > before);
    };
    for piece in pieces {
        call(&mut dec, piece, &mut out);
        while dec.has_pending_output() {
            call(&mut dec, &[], &mut out);
        }
    }
    dec.finish(&mut out).unwrap_or_else(|e| panic!("{e}"));
    (out, calls)
}

#[test]
fn sample_streams_round_trip_with_tiny_output_bounds() {
    let main = sample_main_stream(7, 900).bytes;
    let multifd = sample_multifd_stream(8, 10, &[Content::Random, Content::Dup(3), Content::Zero]);
    let mut rng = Rng::new(98);
    for input in [&main, &multifd] {
        let (wire, _) = encode_with(input, EncoderConfig::default(), Arc::new(NoIndex), &mut whole);
        // One page, and bounds that are not page-aligned.
        for bound in [PAGE_SIZE, 3 * PAGE_SIZE + 17, 1000] {
            let (out, calls) = decode_bounded([&wire[..]], bound);
            assert_eq!(blake3::hash(&out), blake3::hash(input), "bound {bound}");
            assert!(calls >= input.len() / bound, "bound {bound}: {calls} calls");
            let mut pieces = Vec::new();
            let mut pos = 0;
            while pos < wire.len() {
                let n = match rng.below(3) {
                    0 => 1 + rng.below(16),
                    1 => 1 + rng.below(5000),
                    _ => 1 + rng.below(70_000),
                }
                .min(wire.len() - pos);
                pieces.push(&wire[pos..pos + n]);
                pos += n;
            }
            let (out, _) = decode_bounded(pieces, bound);
            assert_eq!(blake3::hash(&out), blake3::hash(input), "bound {bound}, random splits");
        }
    }
}

#[test]
fn every_split_point_with_tiny_output_bounds() {
    let s = small_main_stream();
    let (wire, _) = encode_with(&s.bytes, EncoderConfig::default(), Arc::new(NoIndex), &mut whole);
    for bound in [PAGE_SIZE, 5000, 7] {
        for cut in 0..=wire.len() {
            let (out, _) = decode_bounded([&wire[..cut], &wire[cut..]], bound);
            assert!(out == s.bytes, "bound {bound}, split at {cut}");
        }
    }
}

#[test]
fn output_bound_of_zero_means_one_byte_per_call() {
    let s = sample_main_stream(3, 20).bytes;
    let (wire, _) = encode_with(&s, EncoderConfig::default(), Arc::new(NoIndex), &mut whole);
    let (out, calls) = decode_bounded([&wire[..]], 0);
    assert!(out == s);
    assert_eq!(calls, s.len());
}

#[test]
fn finish_with_output_pending_fails() {
    let s = sample_main_stream(3, 20).bytes;
    let (wire, _) = encode_with(&s, EncoderConfig::default(), Arc::new(NoIndex), &mut whole);
    let cfg = DecoderConfig { max_output_per_push: PAGE_SIZE, ..DecoderConfig::default() };
    let mut dec = Decoder::with_config(cfg, Arc::new(MemPages::new(1 << 20)));
    let mut out = Vec::new();
    dec.push(&wire, &mut out).unwrap();
    assert!(dec.has_pending_output());
    assert!(matches!(dec.finish(&mut out), Err(DecodeError::OutputPending)));
    assert!(matches!(dec.push(&[], &mut out), Err(DecodeError::Poisoned)));
}

#[test]
fn stalls_and_supplies_under_a_tiny_output_bound_stay_byte_identical() {
    let mut rng = Rng::new(22);
    let pages: Vec<Vec<u8>> = (0..300).map(|i| page(&mut rng, if i % 4 == 0 { Content::Zero } else { Content::Random })).collect();
    let input = main_stream_of(&pages, &mut rng);
    for (chunk, bound) in [(777, PAGE_SIZE), (64 << 10, 5000), (usize::MAX, 3 * PAGE_SIZE + 1)] {
        let idx = DigestSet::from_digests(&pages.iter().map(|p| PageDigest::of(p)).collect::<Vec<_>>());
        let (mut enc, store) = encoder(EncoderConfig::default(), Arc::new(idx));
        let mut wire = Vec::new();
        for piece in input.chunks(5 * 4096) {
            enc.push(piece, &mut wire);
            enc.flush(&mut wire);
        }
        enc.finish(&mut wire);
        let (out, dec) = decode_resupplying_bounded(&wire, Arc::new(MemPages::new(0)), &store, chunk, bound);
        assert!(dec.stats().stalls > 10, "chunk {chunk}");
        assert_eq!(store.stats().pages, 0, "chunk {chunk}: everything acknowledged");
        assert!(out == input, "chunk {chunk}, bound {bound}");
    }
}
