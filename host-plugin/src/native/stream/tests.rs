use super::*;
use ferry_testkit::rng::Rng;

/// An event with its bytes owned, to compare what was written with what was read.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Owned {
    Blocks(Vec<RamBlock>),
    PassStart(bool),
    Page(usize, u64, Vec<u8>),
    Zero(usize, u64),
    PassEnd,
    State(Vec<u8>),
    Eof,
}

fn owned(e: &Event<'_>) -> Owned {
    match e {
        Event::Blocks(b) => Owned::Blocks(b.clone()),
        Event::PassStart { last } => Owned::PassStart(*last),
        Event::Page { block, offset, data } => Owned::Page(*block, *offset, data.to_vec()),
        Event::Zero { block, offset } => Owned::Zero(*block, *offset),
        Event::PassEnd => Owned::PassEnd,
        Event::State(s) => Owned::State(s.to_vec()),
        Event::Eof => Owned::Eof,
    }
}

/// Reads `bytes` offering them `chunk(rng)` bytes at a time (as a socket would deliver them).
fn read_all(bytes: &[u8], rng: &mut Rng, max_chunk: usize) -> Result<Vec<Owned>, StreamError> {
    let mut reader = StreamReader::default();
    let mut events = Vec::new();
    let mut pos = 0;
    let mut avail = 0;
    while !reader.is_done() {
        match reader.next(&bytes[pos..avail])? {
            Step::Event { consumed, event } => {
                assert!(consumed > 0, "an event consumes bytes");
                events.push(owned(&event));
                pos += consumed;
            }
            Step::NeedMore(n) => {
                assert!(n > avail - pos, "NeedMore asks for more than offered");
                if avail == bytes.len() {
                    return Err(StreamError::Malformed("truncated".into()));
                }
                avail = (avail + 1 + rng.below(max_chunk)).min(bytes.len());
            }
        }
    }
    if pos != bytes.len() {
        return Err(StreamError::Malformed("bytes after EOF".into()));
    }
    Ok(events)
}

/// Writes the events back with a new writer.
fn rewrite(events: &[Owned]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut w = None;
    for e in events {
        match e {
            Owned::Blocks(b) => w = Some(StreamWriter::new(b.clone(), &mut out).unwrap()),
            Owned::PassStart(last) => w.as_mut().unwrap().begin_pass(*last, &mut out).unwrap(),
            Owned::Page(b, o, d) => assert!(!w.as_mut().unwrap().page(*b, *o, d, &mut out).unwrap()),
            Owned::Zero(b, o) => assert!(w.as_mut().unwrap().page(*b, *o, &[0; PAGE_SIZE], &mut out).unwrap()),
            Owned::PassEnd => w.as_mut().unwrap().end_pass(&mut out).unwrap(),
            Owned::State(s) => w.as_mut().unwrap().finish(s, &mut out).unwrap(),
            Owned::Eof => {}
        }
    }
    out
}

fn two_slots() -> Vec<RamBlock> {
    vec![RamBlock { slot: 0, guest_addr: 0, len: 64 * 4096 }, RamBlock { slot: 3, guest_addr: 0x1_0000_0000, len: 16 * 4096 }]
}

/// A stream of 4 passes over two slots: random, zero and repeated pages, block switches.
fn sample(seed: u64) -> (Vec<u8>, Vec<Owned>) {
    let mut rng = Rng::new(seed);
    let blocks = two_slots();
    let mut out = Vec::new();
    let mut w = StreamWriter::new(blocks.clone(), &mut out).unwrap();
    let mut expected = vec![Owned::Blocks(blocks.clone())];
    for pass in 0..4 {
        let last = pass == 3;
        w.begin_pass(last, &mut out).unwrap();
        expected.push(Owned::PassStart(last));
        for _ in 0..(20 - pass * 5) {
            let block = rng.below(2);
            let offset = rng.below(blocks[block].pages() as usize) as u64 * 4096;
            let mut page = vec![0u8; PAGE_SIZE];
            if rng.below(3) != 0 {
                rng.fill(&mut page);
            }
            let zero = w.page(block, offset, &page, &mut out).unwrap();
            assert_eq!(zero, page.iter().all(|&b| b == 0));
            expected.push(if zero { Owned::Zero(block, offset) } else { Owned::Page(block, offset, page) });
        }
        w.end_pass(&mut out).unwrap();
        expected.push(Owned::PassEnd);
    }
    let mut state = vec![0u8; 3000];
    rng.fill(&mut state);
    w.finish(&state, &mut out).unwrap();
    expected.push(Owned::State(state));
    expected.push(Owned::Eof);
    (out, expected)
}

#[test]
fn round_trip_is_byte_exact_in_any_chunking() {
    for seed in 0..20 {
        let (bytes, expected) = sample(seed);
        let mut rng = Rng::new(seed + 100);
        for max_chunk in [1, 7, 4096, 1 << 20] {
            let events = read_all(&bytes, &mut rng, max_chunk).unwrap();
            assert_eq!(events, expected, "seed {seed} chunk {max_chunk}");
            assert_eq!(rewrite(&events), bytes, "seed {seed}: rewriting the events gives the same bytes");
        }
    }
}

#[test]
fn layout_is_qemu_shaped() {
    let (bytes, _) = sample(1);
    assert_eq!(&bytes[..8], b"QEVM\0\0\0\x03");
    assert_eq!(bytes[8], 0x01, "SECTION_START ram");
    assert_eq!(&bytes[13..17], b"\x03ram");
    assert_eq!(*bytes.last().unwrap(), 0x00, "EOF");
    let name = two_slots()[1].name();
    assert_eq!(name, "ferry.slot3@0x100000000");
    assert_eq!(RamBlock::parse_name(name.as_bytes(), 4096), Some(RamBlock { slot: 3, guest_addr: 1 << 32, len: 4096 }));
    for bad in ["ferry.slot3@100", "ferry.slot03@0x0", "ferry.slot3@0x0x", "ferry.slot@0x0", "pc.ram", "ferry.slot1@0X10"] {
        assert_eq!(RamBlock::parse_name(bad.as_bytes(), 4096), None, "{bad}");
    }
}

/// Replaces the be32 version after the section named `idstr` in a valid stream.
fn with_section_version(bytes: &[u8], idstr: &[u8], version: u32) -> Vec<u8> {
    let at = bytes.windows(idstr.len()).position(|w| w == idstr).unwrap() + idstr.len() + 4;
    let mut b = bytes.to_vec();
    b[at..at + 4].copy_from_slice(&version.to_be_bytes());
    b
}

#[test]
fn unknown_versions_are_refused() {
    let (bytes, _) = sample(2);
    let mut rng = Rng::new(0);
    let e = read_all(&with_section_version(&bytes, b"ferry-native", 2), &mut rng, 1 << 20).unwrap_err();
    assert_eq!(e, StreamError::UnsupportedVersion { what: "ferry-native section", version: 2, supported: 1 });
    assert!(e.to_string().contains("ferry-native section version 2 is not supported"), "{e}");
    let e = read_all(&with_section_version(&bytes, b"\x03ram", 5), &mut rng, 1 << 20).unwrap_err();
    assert!(matches!(e, StreamError::UnsupportedVersion { what: "ram section", version: 5, .. }), "{e}");
    let mut b = bytes.clone();
    b[7] = 4;
    assert!(matches!(read_all(&b, &mut rng, 1 << 20).unwrap_err(), StreamError::UnsupportedVersion { what: "QEVM stream", version: 4, .. }));
}

#[test]
fn qemu_and_foreign_streams_are_refused() {
    let mut rng = Rng::new(0);
    // A QEMU stream (configuration section first).
    let qemu = ferry_testkit::qemu_stream::sample_main_stream(1, 50).bytes;
    let e = read_all(&qemu, &mut rng, 1 << 20).unwrap_err();
    assert!(matches!(&e, StreamError::NotNative(why) if why.contains("configuration")), "{e}");
    // A QEMU-like stream without configuration but with QEMU's RAM blocks.
    let mut s = ferry_testkit::qemu_stream::MainStream::new(&[]);
    s.bytes.truncate(8); // the header only: no configuration section, no commands
    s.ram_start(&[("pc.ram", 1 << 20)], false);
    let e = read_all(&s.bytes, &mut rng, 1 << 20).unwrap_err();
    assert!(matches!(&e, StreamError::NotNative(why) if why.contains("pc.ram")), "{e}");
    // A native stream whose device section is not ferry-native.
    let (bytes, _) = sample(3);
    let mut b = bytes.clone();
    let at = b.windows(12).position(|w| w == b"ferry-native").unwrap();
    b[at..at + 12].copy_from_slice(b"ferry-nativX");
    assert!(matches!(read_all(&b, &mut rng, 1 << 20).unwrap_err(), StreamError::NotNative(_)));
    // Not QEVM at all.
    assert!(matches!(read_all(b"GET / HTTP/1.1\r\n", &mut rng, 1 << 20).unwrap_err(), StreamError::NotNative(_)));
}

#[test]
fn limits_bound_what_a_stream_may_claim() {
    let mut rng = Rng::new(0);
    let (bytes, _) = sample(4);
    // State length beyond the limit: the reader refuses before buffering it.
    let at = bytes.windows(12).position(|w| w == b"ferry-native").unwrap() + 12 + 8;
    let mut b = bytes[..at].to_vec();
    b.extend_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(read_all(&b, &mut rng, 1 << 20).unwrap_err(), StreamError::TooLarge { what: "vCPU state", .. }));
    // Total memory beyond the limit.
    let mut b = bytes.clone();
    b[25..33].copy_from_slice(&((1u64 << 50) | flags::MEM_SIZE).to_be_bytes());
    assert!(matches!(read_all(&b, &mut rng, 1 << 20).unwrap_err(), StreamError::TooLarge { what: "guest memory", .. }));
}

#[test]
fn writer_refuses_misuse() {
    let mut out = Vec::new();
    assert!(StreamWriter::new(vec![], &mut out).is_err());
    assert!(StreamWriter::new(vec![RamBlock { slot: 0, guest_addr: 0, len: 100 }], &mut out).is_err());
    let mut w = StreamWriter::new(two_slots(), &mut out).unwrap();
    let page = [1u8; PAGE_SIZE];
    assert!(w.page(0, 0, &page, &mut out).is_err(), "page outside a pass");
    assert!(w.finish(&[], &mut out).is_err(), "finish before the final pass");
    w.begin_pass(false, &mut out).unwrap();
    assert!(w.page(2, 0, &page, &mut out).is_err(), "no such block");
    assert!(w.page(0, 100, &page, &mut out).is_err(), "unaligned");
    assert!(w.page(1, 16 * 4096, &page, &mut out).is_err(), "beyond the slot");
    assert!(w.page(0, 0, &page[..100], &mut out).is_err(), "short page");
    assert!(w.begin_pass(true, &mut out).is_err(), "nested pass");
}

/// Hostile bytes: mutations of valid streams give errors or a (different) valid stream,
/// never a panic, and the reader always terminates.
#[test]
fn mutated_streams_never_panic() {
    let mut rng = Rng::new(7);
    let (bytes, _) = sample(5);
    let mut errors = 0;
    for round in 0..3000 {
        let mut b = bytes.clone();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(b.len());
            match rng.below(5) {
                0 => b[at] ^= 1 << rng.below(8),
                1 => b[at] = [0x00, 0x01, 0x02, 0x03, 0x04, 0x07, 0x20, 0x7e, 0xff][rng.below(9)],
                2 => b.truncate(at),
                3 => {
                    b.remove(at);
                }
                _ => b.insert(at, rng.below(256) as u8),
            }
            if b.is_empty() {
                b.push(0);
            }
        }
        if read_all(&b, &mut rng, 1 + round % 5000).is_err() {
            errors += 1;
        }
    }
    assert!(errors > 2500, "most mutations must be caught ({errors} of 3000)");
}
