//! Round-trips real QEMU migration streams (of the QEMU under test: 10.0 from `scripts/test.sh`, or
//! `$FERRY_QEMU`), captured by `ferry_netem::qemu`, through the page codec: every channel must come
//! back byte-identical, the main and multifd channels must be followed as QEMU streams (not
//! opaque; on 10.0 that includes SWITCHOVER_START, MULTIFD_FLUSH records and multifd packets
//! listing zero pages), and QEMU-side compression must fall back to opaque. `mapped-ram` never
//! reaches a gateway: QEMU refuses it on a socket. Skips (passes with a note) when
//! qemu-system-x86_64 is not installed.

use std::sync::Arc;

use ferry_codec::{CodecStats, Decoder, Encoder, EncoderConfig, NoIndex, NoRetainer, StreamMode};
use ferry_gateway::store::PageCache;
use std::time::Duration;

use ferry_netem::qemu::{capture_migration_stream_with, qemu_available, GuestImage, Qemu, QemuConfig};
use ferry_qmp::migration::MigrationMode;
use ferry_qmp::{MigrationStatus, MultifdCompression};

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
    let image = GuestImage::build().expect("building the test guest");
    let config = QemuConfig::default().named("capture-src");
    let c = capture_migration_stream_with(&image, &config, mode.clone(), Duration::from_secs(120))
        .expect("capturing a QEMU migration");
    println!("QEMU {}, {mode:?}: {} connections", c.qemu_version, c.streams.len());
    Some(c.streams)
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

/// QEMU keeps `mapped-ram` (9.0+: RAM at fixed offsets of a file, pages outside the stream) to
/// file migrations: on a TCP URI the migration is refused before a byte is sent, so it never
/// reaches a gateway (the codec would pass such a stream through opaquely: its unit tests).
/// QEMU 7.2 does not know the capability at all.
#[test]
fn real_qemu_refuses_mapped_ram_on_a_socket() {
    if !qemu_available() {
        eprintln!("skipping: qemu-system-x86_64 not installed");
        return;
    }
    let image = GuestImage::build().expect("building the test guest");
    let vm = Qemu::spawn(&image, &QemuConfig::default().named("mapped-ram"), None).expect("start QEMU");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
    let port = listener.local_addr().expect("address").port();
    let caps = serde_json::json!({"capabilities": [{"capability": "mapped-ram", "state": true}]});
    let version = vm.qmp().greeting().version.qemu;
    let refused = match vm.qmp().execute_value("migrate-set-capabilities", Some(caps)) {
        Err(e) => format!("capability refused: {e}"),
        Ok(_) => match vm.qmp().migrate(&format!("tcp:127.0.0.1:{port}")) {
            Err(e) => format!("migrate refused: {e}"),
            Ok(()) => {
                let info = vm.qmp().wait_migration(Duration::from_secs(30)).expect("query-migrate");
                assert_ne!(info.status(), MigrationStatus::Completed, "mapped-ram migrated over TCP: {info:?}");
                format!("migration {}: {:?}", info.status(), info.error_desc)
            }
        },
    };
    println!("QEMU {version}: mapped-ram over tcp: {refused}");
    listener.set_nonblocking(true).expect("nonblocking");
    assert!(listener.accept().is_err(), "QEMU connected to the socket anyway");
}
