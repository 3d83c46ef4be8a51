//! A native stream is one the gateways deduplicate: the gateway codec's QEMU tokenizer turns
//! every PAGE record of it into a page token and follows it to its end without going opaque;
//! the encoder refers to pages sent again by reference. Also: the native stream's constants
//! are the codec's.

use std::sync::Arc;

use ferry_codec::qemu::main_channel::{self, MainChannelTokenizer};
use ferry_codec::qemu::{Token, Tokenizer};
use ferry_codec::{Encoder, EncoderConfig, NoIndex, NoRetainer, StreamMode};
use ferry_host::native::stream::{self, flags, RamBlock, StreamWriter, PAGE_SIZE};
use ferry_testkit::rng::Rng;

/// A native stream of `passes` passes over one 256-page slot and a second slot, and the
/// contents of its PAGE records in order. Later passes resend some of the first pass's pages.
fn native_stream(seed: u64, passes: usize) -> (Vec<u8>, Vec<Vec<u8>>) {
    let mut rng = Rng::new(seed);
    let blocks = vec![RamBlock { slot: 0, guest_addr: 0, len: 256 * 4096 }, RamBlock { slot: 1, guest_addr: 0x4000_0000, len: 32 * 4096 }];
    let mut out = Vec::new();
    let mut w = StreamWriter::new(blocks.clone(), &mut out).unwrap();
    let mut sent = Vec::new();
    let mut first_pass: Vec<Vec<u8>> = Vec::new();
    for pass in 0..passes {
        let last = pass + 1 == passes;
        w.begin_pass(last, &mut out).unwrap();
        for i in 0..if pass == 0 { 288 } else { 40 } {
            let (block, page) = if i < 256 { (0, i) } else { (1, i - 256) };
            let mut data = vec![0u8; PAGE_SIZE];
            match (pass, rng.below(4)) {
                (0, 0) => {}                       // a zero page
                (0, _) => rng.fill(&mut data),     // distinct content
                (_, 0) => rng.fill(&mut data),     // new content
                (_, _) => data.clone_from(&first_pass[rng.below(first_pass.len())]), // sent before
            }
            if w.page(block, page as u64 * 4096, &data, &mut out).unwrap() {
                continue;
            }
            if pass == 0 {
                first_pass.push(data.clone());
            }
            sent.push(data);
        }
        w.end_pass(&mut out).unwrap();
    }
    let mut state = vec![0u8; 9000];
    rng.fill(&mut state);
    // The state deliberately holds bytes that look like records and sections.
    state[..8].copy_from_slice(&(flags::PAGE | 0x1000).to_be_bytes());
    w.finish(&state, &mut out).unwrap();
    (out, sent)
}

#[test]
fn constants_are_the_codecs() {
    assert_eq!(stream::QEMU_VM_FILE_MAGIC, main_channel::QEMU_VM_FILE_MAGIC);
    assert_eq!(stream::QEMU_VM_FILE_VERSION, main_channel::QEMU_VM_FILE_VERSION);
    assert_eq!(PAGE_SIZE, ferry_codec::PAGE_SIZE);
    assert_eq!(flags::ZERO, main_channel::flags::ZERO);
    assert_eq!(flags::MEM_SIZE, main_channel::flags::MEM_SIZE);
    assert_eq!(flags::PAGE, main_channel::flags::PAGE);
    assert_eq!(flags::EOS, main_channel::flags::EOS);
    assert_eq!(flags::CONTINUE, main_channel::flags::CONTINUE);
}

#[test]
fn every_page_of_a_native_stream_is_a_page_token() {
    for seed in 0..5 {
        let (bytes, sent) = native_stream(seed, 4);
        let mut t = MainChannelTokenizer::new();
        let mut at = 0;
        let mut pages = Vec::new();
        while at < bytes.len() {
            match t.next_token(&bytes[at..]) {
                Token::Verbatim(n) => at += n,
                Token::Page => {
                    pages.push(bytes[at..at + PAGE_SIZE].to_vec());
                    at += PAGE_SIZE;
                }
                Token::NeedMore(n) => panic!("the whole stream was offered, yet the tokenizer needs {n} bytes at {at}"),
                Token::Opaque(why) => panic!("the tokenizer gave up at {at}: {why}"),
            }
        }
        assert!(t.in_tail(), "the ferry-native section is the verbatim tail");
        assert_eq!(pages.len(), sent.len(), "one page token per PAGE record");
        assert!(pages == sent, "the page tokens are exactly the pages sent, in order");
    }
}

#[test]
fn the_encoder_sends_repeated_pages_by_reference() {
    let (bytes, sent) = native_stream(9, 4);
    let mut enc = Encoder::new(EncoderConfig::default(), Arc::new(NoIndex), Arc::new(NoRetainer));
    let mut wire = Vec::new();
    for chunk in bytes.chunks(1500) {
        enc.push(chunk, &mut wire);
    }
    enc.finish(&mut wire);
    let s = enc.stats();
    assert_eq!(s.opaque_reason, None);
    assert_eq!(s.mode, StreamMode::MainTail);
    let distinct: std::collections::HashSet<&Vec<u8>> = sent.iter().collect();
    assert_eq!(s.literal_pages, distinct.len() as u64, "each distinct page travels once");
    assert_eq!(s.window_refs, (sent.len() - distinct.len()) as u64, "pages sent again go as references");
    assert!(s.window_refs > 50, "the sample resends pages: {s:?}");
    eprintln!("native stream {} bytes -> {} wire bytes; {} literal, {} references, {} zero", bytes.len(), s.wire_bytes_out, s.literal_pages, s.window_refs, s.zero_pages);
}
