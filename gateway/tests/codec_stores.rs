//! The codec core (`ferry-codec`) together with the gateway's real stores: the page cache's CLOCK
//! eviction and advertisements, and the retained pages' budget with its per-reference cost.
//! The codec's own unit tests use small in-memory stores; these cases keep the pairing with the
//! stores the gateway actually runs covered.

use std::sync::Arc;

use ferry_codec::{Advertisement, Decoder, DigestSet, Encoder, EncoderConfig, NoIndex, PageDigest, PageStore, PAGE_SIZE};
use ferry_gateway::store::{retained::REF_COST, PageCache, RetainedPages};
use ferry_testkit::qemu_stream::{main_stream_of, page, Content, MultifdStream};
use ferry_testkit::rng::Rng;

/// Encodes `input` in one piece with advertised pages kept in `retained`.
fn encode(input: &[u8], cfg: EncoderConfig, index: Arc<dyn ferry_codec::DestinationIndex>, retained: Arc<RetainedPages>) -> (Vec<u8>, ferry_codec::CodecStats) {
    let mut enc = Encoder::new(cfg, index, retained);
    let mut wire = Vec::new();
    enc.push(input, &mut wire);
    enc.finish(&mut wire);
    (wire, enc.stats())
}

/// Decodes `wire` in one piece against `cache`.
fn decode(wire: &[u8], cache: Arc<dyn PageStore>) -> Vec<u8> {
    let mut dec = Decoder::new(cache);
    let mut out = Vec::new();
    dec.push(wire, &mut out).expect("decode");
    dec.finish(&mut out).expect("finish");
    out
}

fn retained() -> Arc<RetainedPages> {
    Arc::new(RetainedPages::new(64 << 20))
}

#[test]
fn second_migration_references_what_the_real_cache_advertises() {
    let mut rng = Rng::new(7);
    let pages: Vec<Vec<u8>> = (0..2000).map(|_| page(&mut rng, Content::Random)).collect();
    let first = main_stream_of(&pages, &mut rng);
    let cache = Arc::new(PageCache::new(64 << 20));
    let (wire1, st1) = encode(&first, EncoderConfig::default(), Arc::new(NoIndex), retained());
    assert!(decode(&wire1, cache.clone()) == first);
    assert_eq!(st1.literal_pages, 2000);

    // The destination's cache advertises what it decoded; the advert crosses the wire encoded.
    let ad = Advertisement::decode(&cache.advertise(1 << 20, 65536).encode()).expect("advert");
    assert_eq!(ad.digests.len(), 2000);
    let mut pages2 = pages.clone();
    for p in pages2.iter_mut().step_by(50) {
        rng.fill(&mut p[..64]);
    }
    let second = main_stream_of(&pages2, &mut rng);
    let cfg = EncoderConfig { session_window_pages: ad.session_window_pages, ..EncoderConfig::default() };
    let (wire2, st2) = encode(&second, cfg, Arc::new(ad.digests), retained());
    assert!(decode(&wire2, cache.clone()) == second);
    assert_eq!(st2.literal_pages, 40);
    assert_eq!(st2.advertised_refs, 1960);
    let ratio = wire2.len() as f64 / wire1.len() as f64;
    assert!(ratio < 0.1, "second migration ratio {ratio:.3} ({} vs {} bytes)", wire2.len(), wire1.len());
}

#[test]
fn real_retention_budget_counts_each_reference_and_then_sends_literally() {
    let mut rng = Rng::new(24);
    let pages: Vec<Vec<u8>> = (0..10).map(|_| page(&mut rng, Content::Random)).collect();
    let input = main_stream_of(&pages, &mut rng);
    let idx = DigestSet::from_digests(&pages.iter().map(|p| PageDigest::of(p)).collect::<Vec<_>>());
    // Room for three pages and their bookkeeping, not for a fourth.
    let budget = Arc::new(RetainedPages::new(3 * (PAGE_SIZE + REF_COST)));
    let (wire, st) = encode(&input, EncoderConfig::default(), Arc::new(idx.clone()), budget.clone());
    assert_eq!((st.advertised_refs, st.unretained_literals, st.literal_pages), (3, 7, 7));
    assert_eq!(budget.stats().pages, 3);
    // An empty destination cache still decodes it, asking only for the three references.
    let mut dec = Decoder::new(Arc::new(PageCache::new(0)));
    let mut out = Vec::new();
    dec.push(&wire, &mut out).expect("push");
    assert_eq!(dec.take_needs().len(), 3);

    // Three pages without their bookkeeping do not fit three references: each costs REF_COST too.
    let tight = Arc::new(RetainedPages::new(3 * PAGE_SIZE));
    let (_, st) = encode(&input, EncoderConfig::default(), Arc::new(idx.clone()), tight);
    assert_eq!((st.advertised_refs, st.unretained_literals), (2, 8));

    // No budget: no advertised references at all.
    let (_, st) = encode(&input, EncoderConfig::default(), Arc::new(idx), Arc::new(RetainedPages::new(0)));
    assert_eq!((st.advertised_refs, st.literal_pages), (0, 10));
}

#[test]
fn session_window_survives_real_cache_eviction() {
    // The cache holds 2 pages; the window guarantees later references still resolve.
    let mut rng = Rng::new(12);
    let pages: Vec<Vec<u8>> = (0..50).map(|_| page(&mut rng, Content::Random)).collect();
    // The same 50 pages in three packets of one multifd channel.
    let mut stream = MultifdStream::new();
    for round in 0..3 {
        stream.pages(round, 0, &pages);
    }
    let input = stream.into_bytes();
    let (wire, st) = encode(&input, EncoderConfig::default(), Arc::new(NoIndex), retained());
    assert_eq!((st.literal_pages, st.window_refs), (50, 100));
    let cache = Arc::new(PageCache::new(2 * PAGE_SIZE));
    assert!(decode(&wire, cache.clone()) == input);
    assert!(cache.stats().evictions > 0, "the cache really evicted: {:?}", cache.stats());

    // A window smaller than the working set: the encoder re-sends, never dangles.
    let cfg = EncoderConfig { session_window_pages: 10, ..EncoderConfig::default() };
    let (wire, st) = encode(&input, cfg, Arc::new(NoIndex), retained());
    assert_eq!(st.literal_pages, 150);
    assert!(decode(&wire, Arc::new(PageCache::new(0))) == input);
}
