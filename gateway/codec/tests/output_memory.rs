//! What a hostile stream can make the decoder allocate: batches of a dozen wire bytes each
//! claiming the largest zero run a batch may have (16 MiB). This binary counts every allocation
//! of its test thread (a counting global allocator), so it proves the bound on memory, not only
//! on the bytes appended per call.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

use bytes::Bytes;
use ferry_codec::frame::{self, put_varint};
use ferry_codec::{DecodeError, Decoder, DecoderConfig, PageDigest, PageStore, PAGE_SIZE};

/// The system allocator, counting the bytes each thread holds and the most it held.
struct Counting;

thread_local! {
    static HELD: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn count(delta: isize) {
    // `try_with`: allocations while a thread's locals are torn down are not counted.
    let _ = HELD.try_with(|held| {
        let now = held.get() + delta;
        held.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so it keeps
// `System`'s guarantees; the counting touches only thread-local integers and never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size() as isize);
        // SAFETY: forwarded as is; the caller upholds `GlobalAlloc`'s contract.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size() as isize);
        // SAFETY: forwarded as is; the caller upholds `GlobalAlloc`'s contract.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(-(layout.size() as isize));
        // SAFETY: forwarded as is; the caller upholds `GlobalAlloc`'s contract.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size as isize - layout.size() as isize);
        // SAFETY: forwarded as is; the caller upholds `GlobalAlloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Starts measuring: the peak is reset to what the thread holds now, which is returned.
fn start_measuring() -> isize {
    let held = HELD.with(Cell::get);
    PEAK.with(|p| p.set(held));
    held
}

/// Most bytes the thread held since [`start_measuring`] returned `base`, above `base`.
fn peak_since(base: isize) -> usize {
    (PEAK.with(Cell::get) - base).max(0) as usize
}

/// A page store that holds nothing (the hostile stream refers to no page).
struct NoPages;

impl PageStore for NoPages {
    fn get(&self, _: &PageDigest) -> Option<Bytes> {
        None
    }
    fn insert(&self, _: PageDigest, _: Bytes) {}
    fn contains(&self, _: &PageDigest) -> bool {
        false
    }
}

const BATCH_OUT: usize = frame::MAX_BATCH_PAGE_OPS * PAGE_SIZE;

/// Preamble, then batches of one op claiming the largest zero run a batch may have
/// ([`frame::MAX_BATCH_PAGE_OPS`] pages, 16 MiB from a dozen wire bytes), each followed by a
/// checkpoint (if `checkpoints`), until the wire is `wire_len` long. The first `valid`
/// checkpoints are right, the rest wrong (so decoding fails at checkpoint `valid + 1`, after
/// `valid` × 16 MiB of output).
fn hostile_zero_batches(wire_len: usize, valid: usize, checkpoints: bool) -> Vec<u8> {
    let mut w = Vec::new();
    frame::Preamble { mode: 0, session_window_pages: 0 }.encode(&mut w);
    let mut ops = vec![frame::OP_ZERO];
    put_varint(&mut ops, frame::MAX_BATCH_PAGE_OPS as u64);
    let zeros = vec![0u8; BATCH_OUT];
    let mut hasher = blake3::Hasher::new();
    let mut offset = 0u64;
    let mut batches = 0;
    while w.len() < wire_len {
        let header = frame::BatchHeader {
            compressed: false,
            stream_offset: offset,
            n_literal: 0,
            verbatim_len: 0,
            ops_len: ops.len(),
            body_len: ops.len(),
        };
        header.encode(&mut w);
        w.extend_from_slice(&ops);
        offset += zeros.len() as u64;
        if checkpoints {
            let digest = if batches < valid {
                hasher.update(&zeros);
                *hasher.finalize().as_bytes()
            } else {
                [0; 32]
            };
            frame::encode_digest_frame(&mut w, false, offset, &digest);
        }
        batches += 1;
    }
    w
}

#[test]
fn one_mib_of_hostile_minimal_zero_batches_never_produces_more_than_the_bound_per_call() {
    let valid = 4;
    let wire = hostile_zero_batches(1 << 20, valid, true);
    assert!(wire.len() / 64 > 16_000, "about 20,000 batches claiming 16 MiB each: {}", wire.len());

    // Without a bound, one call turns the wire into everything up to the first bad checkpoint.
    let mut reference = Vec::new();
    let mut dec = Decoder::new(Arc::new(NoPages));
    let e = dec.push(&wire, &mut reference).unwrap_err();
    assert!(matches!(e, DecodeError::DigestMismatch { .. }), "{e}");
    assert_eq!(reference.len(), valid * BATCH_OUT);
    let expected = blake3::hash(&reference);
    drop(reference);

    for bound in [1 << 20, 3 * PAGE_SIZE + 5] {
        let cfg = DecoderConfig { max_output_per_push: bound, ..DecoderConfig::default() };
        // As the tunnel does: 64 KiB of wire at a time, the pending output taken before more.
        let base = start_measuring();
        let mut dec = Decoder::with_config(cfg, Arc::new(NoPages));
        let mut out = Vec::new();
        let mut hasher = blake3::Hasher::new();
        let (mut total, mut calls) = (0, 0);
        let mut call = |dec: &mut Decoder, input: &[u8], out: &mut Vec<u8>| {
            let r = dec.push(input, out);
            assert!(out.len() <= bound, "one call appended {} bytes (bound {bound})", out.len());
            hasher.update(out);
            total += out.len();
            calls += 1;
            out.clear();
            r
        };
        let mut result = Ok(());
        'wire: for piece in wire.chunks(64 << 10) {
            result = call(&mut dec, piece, &mut out);
            while result.is_ok() && dec.has_pending_output() {
                result = call(&mut dec, &[], &mut out);
            }
            if result.is_err() {
                break 'wire;
            }
        }
        let e = result.unwrap_err();
        assert!(matches!(e, DecodeError::DigestMismatch { .. }), "{e}");
        assert_eq!(total, valid * BATCH_OUT, "bound {bound}");
        assert_eq!(hasher.finalize(), expected, "bound {bound}: byte-identical to the unbounded decode");
        assert!(calls >= valid * BATCH_OUT / bound, "{calls} calls");
        // Memory: the caller's buffer (at most twice the bound, as a Vec grows), a piece of wire
        // kept while output is pending, the decoder's own small state; never a 16 MiB batch.
        let peak = peak_since(base);
        let allowed = 2 * bound + (64 << 10) + (128 << 10);
        assert!(peak <= allowed, "bound {bound}: the decoder's thread held up to {peak} bytes (allowed {allowed})");
        drop(dec);
    }
}

#[test]
fn a_batch_before_the_previous_checkpoint_fails_the_stream() {
    // Without checkpoints nothing is ever verified; the decoder must not go on hashing batches.
    let wire = hostile_zero_batches(4096, 0, false);
    let mut dec = Decoder::new(Arc::new(NoPages));
    let mut out = Vec::new();
    let e = dec.push(&wire, &mut out).unwrap_err();
    assert!(matches!(e, DecodeError::MissingCheckpoint { at } if at == BATCH_OUT as u64), "{e}");
    assert!(out.is_empty(), "nothing verified, nothing released");
    assert_eq!(dec.produced().get(), BATCH_OUT as u64, "one batch hashed, the second refused");
}
