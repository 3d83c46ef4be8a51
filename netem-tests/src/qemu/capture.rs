//! Capturing the raw bytes QEMU sends during a migration.
//!
//! A Rust TCP listener on loopback stands in for the destination: it accepts
//! every connection the source opens (main channel, then multifd channels) and
//! records all bytes until EOF. It never answers, which QEMU 7.2 accepts as
//! long as `return-path` is off (the default): the source never reads from the
//! main socket, and multifd channels are one-way. The source VM ends in
//! `postmigrate` and QEMU closes every connection when the migration
//! completes.
//!
//! ```no_run
//! use ferry_netem::qemu::capture_migration_stream;
//! use ferry_qmp::migration::MigrationMode;
//!
//! # fn main() -> Result<(), ferry_netem::qemu::QemuError> {
//! let streams = capture_migration_stream(MigrationMode::multifd(2))?;
//! assert_eq!(&streams[0][..4], b"QEVM"); // main channel first
//! for ch in &streams[1..] {
//!     assert_eq!(&ch[..4], &[0x11, 0x22, 0x33, 0x44]); // multifd, sorted by channel id
//! }
//! # Ok(()) }
//! ```

use std::io::{ErrorKind, Read};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use ferry_qmp::migration::{self, MigrationMode, MigrationSetup, Side};
use ferry_qmp::{MigrationInfo, VersionTriple};

use super::{GuestImage, Qemu, QemuConfig, QemuError, Result};

/// Result of [`capture_migration_stream_with`].
#[derive(Debug, Clone)]
pub struct CapturedMigration {
    /// Every connection's bytes: the main channel (starts with `QEVM`) first,
    /// then multifd channels ordered by their channel id (byte 24 of the
    /// 64-byte `MultiFDInit_t`, after magic `11 22 33 44`).
    pub streams: Vec<Vec<u8>>,
    /// The source's final `query-migrate` (status `completed`).
    pub info: MigrationInfo,
    /// The version of the QEMU that sent them (from its QMP greeting).
    pub qemu_version: VersionTriple,
}

/// Boots the default test guest (64 MiB, dirtying 64 pages per tick), lets it
/// run for 3 ticks, migrates it in `mode` into a capturing listener and
/// returns the captured streams (see [`CapturedMigration::streams`]).
///
/// Needs `qemu-system-x86_64` (and nasm, installed on demand). Takes a few
/// seconds under TCG.
pub fn capture_migration_stream(mode: MigrationMode) -> Result<Vec<Vec<u8>>> {
    let image = GuestImage::build()?;
    let config = QemuConfig::default().named("capture-src");
    Ok(capture_migration_stream_with(&image, &config, mode, Duration::from_secs(120))?.streams)
}

/// Like [`capture_migration_stream`] with a chosen image and VM config;
/// `timeout` bounds each phase (boot, migration, stream end).
pub fn capture_migration_stream_with(
    image: &GuestImage,
    config: &QemuConfig,
    mode: MigrationMode,
    timeout: Duration,
) -> Result<CapturedMigration> {
    let mut src = Qemu::spawn(image, config, None)?;
    let qemu_version = src.qmp().greeting().version.qemu;
    src.serial().wait_for_tick(3, timeout)?;

    let listener = TcpListener::bind("127.0.0.1:0")
        .map_err(|e| QemuError::io("binding the capture listener", e))?;
    let port = listener
        .local_addr()
        .map_err(|e| QemuError::io("capture listener address", e))?
        .port();
    listener
        .set_nonblocking(true)
        .map_err(|e| QemuError::io("capture listener nonblocking", e))?;
    let stop = StopFlag(Arc::new(AtomicBool::new(false)));
    let (tx, rx) = mpsc::channel::<(usize, std::io::Result<Vec<u8>>)>();
    let accept_stop = Arc::clone(&stop.0);
    std::thread::Builder::new()
        .name("capture-accept".into())
        .spawn(move || accept_loop(listener, accept_stop, tx))
        .map_err(|e| QemuError::io("spawning the capture accept thread", e))?;

    // No destination QEMU: only the source is set up (return-path off, as
    // the listener never answers) and driven to `completed`.
    let setup = MigrationSetup {
        return_path: Some(false),
        source_max_bandwidth: Some(1 << 30),
        ..MigrationSetup::new(mode.clone())
    };
    let qmp = src.qmp();
    let info = qmp.block_on(async {
        setup.apply(qmp.client(), Side::Source).await?;
        qmp.client().migrate(&format!("tcp:127.0.0.1:{port}")).await?;
        migration::wait_for_completion(qmp.client(), migration::POLL_INTERVAL, timeout).await
    })?;

    let expected = mode.connections();
    let deadline = Instant::now() + timeout;
    let mut streams = Vec::with_capacity(expected);
    while streams.len() < expected {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((i, Ok(bytes))) => {
                tracing::debug!(conn = i, bytes = bytes.len(), "captured connection");
                streams.push(bytes);
            }
            Ok((i, Err(e))) => {
                return Err(QemuError::io(format!("reading captured connection {i}"), e))
            }
            Err(_) => {
                return Err(QemuError::timeout(
                    format!(
                        "{expected} captured connections to reach EOF (got {})",
                        streams.len()
                    ),
                    timeout,
                ))
            }
        }
    }
    drop(stop);
    src.kill();
    // Main channel first, then multifd by channel id.
    streams.sort_by_key(|s| match s.get(..4) {
        Some(b"QEVM") => 0usize,
        _ => 1 + usize::from(s.get(24).copied().unwrap_or(u8::MAX)),
    });
    tracing::info!(
        ?mode,
        sizes = ?streams.iter().map(Vec::len).collect::<Vec<_>>(),
        "captured migration streams"
    );
    Ok(CapturedMigration { streams, info, qemu_version })
}

/// Sets the flag on drop, stopping the accept loop (also on early return).
struct StopFlag(Arc<AtomicBool>);

impl Drop for StopFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn accept_loop(
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    tx: mpsc::Sender<(usize, std::io::Result<Vec<u8>>)>,
) {
    let mut n = 0usize;
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, peer)) => {
                tracing::debug!(conn = n, %peer, "capture: accepted");
                let tx = tx.clone();
                let stop = Arc::clone(&stop);
                let i = n;
                n += 1;
                let spawned = std::thread::Builder::new()
                    .name(format!("capture-{i}"))
                    .spawn(move || {
                        let _ = tx.send((i, read_all(stream, &stop)));
                    });
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "capture: cannot spawn reader thread");
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => {
                tracing::warn!(error = %e, "capture: accept failed");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// Reads until EOF; gives up (with what it has) once `stop` is set.
fn read_all(mut stream: TcpStream, stop: &AtomicBool) -> std::io::Result<Vec<u8>> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(k) => out.extend_from_slice(&buf[..k]),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                if stop.load(Ordering::SeqCst) {
                    return Ok(out);
                }
            }
            Err(e) => return Err(e),
        }
    }
}
