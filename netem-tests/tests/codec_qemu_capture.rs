//! Round-trips real QEMU 7.2 migration streams, captured by `ferry_netem::qemu`, through the page
//! codec: every channel must come back byte-identical, the main and multifd channels must be
//! followed as QEMU streams (not opaque), and QEMU-side compression must fall back to opaque.
//! Skips (passes with a note) when qemu-system-x86_64 is not installed.

use std::sync::Arc;

use ferry_codec::{CodecStats, Decoder, Encoder, EncoderConfig, NoIndex, NoRetainer, StreamMode};
use ferry_gateway::store::PageCache;
use ferry_netem::qemu::{capture_migration_stream, qemu_available};
use ferry_qmp::migration::MigrationMode;
use ferry_qmp::MultifdCompression;

/// Encodes in 64 KiB reads (with an idle flush every 1 MiB, as the tunnel would), decodes in
/// 16 KiB wire chunks, and checks the result is byte-identical. Returns the encoder's stats and
/// the wire size.
fn round_trip(stream: &[u8]) -> (CodecStats, usize) {
    let mut enc = Encoder::new(EncoderConfig::default(), Arc::new(NoIndex), Arc::new(NoRetainer));
    let mut wire = Vec::new();
    for (i, c) in stream.chunks(64 << 10).enumerate() {
        enc.push(c, &mut wire);
        if i % 16 == 15 {
            enc.flush(&mut wire);
        }
    }
    enc.finish(&mut wire);
    let mut dec = Decoder::new(Arc::new(PageCache::new(256 << 20)));
    let mut out = Vec::new();
    for c in wire.chunks(16 << 10) {
        dec.push(c, &mut out).expect("decode");
    }
    dec.finish(&mut out).expect("trailer");
    assert_eq!(out.len(), stream.len());
    assert!(out == stream, "round trip is not byte-identical");
    (enc.stats(), wire.len())
}

fn report(name: &str, len: usize, st: &CodecStats, wire: usize) {
    println!(
        "{name}: {len} B -> {wire} B wire ({:.1}%), mode {:?}, pages: {} literal, {} zero, {} refs; opaque: {:?}",
        100.0 * wire as f64 / len.max(1) as f64,
        st.mode,
        st.literal_pages,
        st.zero_pages,
        st.ref_pages(),
        st.opaque_reason
    );
}

fn capture(mode: MigrationMode) -> Option<Vec<Vec<u8>>> {
    if !qemu_available() {
        eprintln!("skipping: qemu-system-x86_64 not installed");
        return None;
    }
    Some(capture_migration_stream(mode).expect("capturing a QEMU migration"))
}

#[test]
fn real_qemu_main_channel_round_trip() {
    let Some(streams) = capture(MigrationMode::Main) else { return };
    assert_eq!(streams.len(), 1);
    let (st, wire) = round_trip(&streams[0]);
    report("main", streams[0].len(), &st, wire);
    assert_eq!(st.mode, StreamMode::MainTail, "{st:?}");
    assert_eq!(st.opaque_reason, None);
    assert!(st.literal_pages + st.ref_pages() > 0, "{st:?}");
    assert!(wire < streams[0].len());
}

#[test]
fn real_qemu_multifd_round_trip() {
    let Some(streams) = capture(MigrationMode::multifd(2)) else { return };
    assert_eq!(streams.len(), 3);
    let (st, wire) = round_trip(&streams[0]);
    report("multifd main", streams[0].len(), &st, wire);
    assert_eq!(st.mode, StreamMode::MainTail, "{st:?}");
    let mut pages = 0;
    for (i, ch) in streams[1..].iter().enumerate() {
        let (st, wire) = round_trip(ch);
        report(&format!("multifd channel {i}"), ch.len(), &st, wire);
        assert_eq!(st.mode, StreamMode::Multifd, "{st:?}");
        assert_eq!(st.opaque_reason, None);
        pages += st.literal_pages + st.ref_pages() + st.zero_pages;
    }
    assert!(pages > 0);
}

#[test]
fn real_qemu_multifd_zstd_goes_opaque_and_round_trips() {
    let mode = MigrationMode::Multifd { channels: 2, compression: MultifdCompression::Zstd };
    let Some(streams) = capture(mode) else { return };
    for (i, ch) in streams[1..].iter().enumerate() {
        let (st, wire) = round_trip(ch);
        report(&format!("multifd-zstd channel {i}"), ch.len(), &st, wire);
        assert_eq!(st.mode, StreamMode::Opaque);
        assert!(st.opaque_reason.as_deref().is_some_and(|r| r.contains("compression")), "{st:?}");
    }
}
