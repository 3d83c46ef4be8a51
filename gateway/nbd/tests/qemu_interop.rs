//! Interop with real QEMU: our client against `qemu-nbd` (raw, qcow2, read-only), and QEMU's
//! own NBD client (`qemu-img`, `qemu-io`) against our server backed by a plain file. Every
//! result is checked with blake3 against the file or `qemu-img`'s view of the image.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use ferry_nbd::io::{serve, ClientConnection, ServeEnd, Served};
use ferry_nbd::qemu_nbd::{QemuNbd, QemuNbdOptions};
use ferry_nbd::{wire, ClientConfig, CommandFlags, Error, Extent, ServerConfig};
use ferry_testkit::rng::Rng;
use tokio::net::{UnixListener, UnixStream};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
/// Data regions of the test image: the rest is holes.
const REGIONS: &[(u64, usize)] = &[(0, 1 << 20), (8 << 20, 3 << 20), (40 << 20, 4096), (63 << 20, 1 << 20)];

async fn connect(export: &QemuNbd) -> ClientConnection<UnixStream> {
    let stream = UnixStream::connect(export.socket()).await.unwrap();
    ClientConnection::connect(stream, ClientConfig::new("disk")).await.unwrap()
}

/// Reads the whole export in 4 MiB requests, 4 in flight.
async fn read_all(connection: &mut ClientConnection<UnixStream>) -> Vec<u8> {
    let size = connection.export().size;
    let mut out = vec![0u8; size as usize];
    let chunk = 4 * MIB;
    let mut next = 0;
    let mut cookies = std::collections::HashMap::new();
    while next < size || !cookies.is_empty() {
        while next < size && cookies.len() < 4 {
            let len = chunk.min(size - next) as u32;
            cookies.insert(connection.client().read(next, len).unwrap(), next);
            next += u64::from(len);
        }
        let reply = connection.next_reply().await.unwrap();
        let offset = cookies.remove(&reply.cookie).unwrap() as usize;
        let ferry_nbd::ReplyData::Read(data) = reply.result.unwrap() else { panic!("not read data") };
        out[offset..offset + data.len()].copy_from_slice(&data);
    }
    out
}

/// Walks block status over the whole export: (offset, length, is_zero) runs.
async fn allocation_map(connection: &mut ClientConnection<UnixStream>) -> Vec<(u64, u64, bool)> {
    let size = connection.export().size;
    let mut map: Vec<(u64, u64, bool)> = Vec::new();
    let mut offset = 0;
    while offset < size {
        let len = (size - offset).min(1 << 30) as u32;
        let extents = connection.block_status(offset, len).await.unwrap();
        assert!(!extents.is_empty());
        for Extent { length, flags } in extents {
            let length = u64::from(length).min(size - offset);
            let zero = flags & Extent::ZERO != 0;
            match map.last_mut() {
                Some(last) if last.2 == zero && last.0 + last.1 == offset => last.1 += length,
                _ => map.push((offset, length, zero)),
            }
            offset += length;
            if offset >= size {
                break;
            }
        }
    }
    map
}

/// The data regions of `REGIONS` as block status reports them: allocation granules of
/// `granule` bytes (4 KiB for a raw file on this filesystem, the 64 KiB cluster of qcow2).
fn expected_data_runs(granule: u64) -> Vec<(u64, u64)> {
    REGIONS.iter().map(|&(o, l)| (o, (l as u64).div_ceil(granule) * granule)).collect()
}

/// Our client against qemu-nbd over `image` in `format`: handshake, block status over the
/// holes, pipelined reads, then write / write-zeroes (NO_HOLE) / trim / flush. Returns the
/// content the export should now have.
async fn exercise_qemu_nbd(image: &Path, format: &str, granule: u64, mut content: Vec<u8>) -> Vec<u8> {
    let export = QemuNbd::start(&QemuNbdOptions { image, format, read_only: false, export_name: "disk" }).unwrap();
    let mut connection = connect(&export).await;
    let info = connection.export();
    assert_eq!(info.size, SIZE);
    assert!(!info.read_only());
    assert!(connection.client().has_structured_replies());
    assert!(connection.client().has_block_status());
    let block = info.block_size.expect("qemu-nbd sends NBD_INFO_BLOCK_SIZE");
    assert!(block.maximum >= 32 << 20, "{block:?}");

    let data_runs: Vec<(u64, u64)> = allocation_map(&mut connection).await.into_iter().filter(|r| !r.2).map(|r| (r.0, r.1)).collect();
    assert_eq!(data_runs, expected_data_runs(granule), "allocation map of the {format} image");
    assert_eq!(digest(&read_all(&mut connection).await), digest(&content), "reads of the {format} image");

    let mut rng = Rng::new(7);
    let data = rng.bytes(MIB as usize + 512);
    connection.write(20 * MIB + 512, &data, CommandFlags::default()).await.unwrap();
    content[(20 * MIB + 512) as usize..][..data.len()].copy_from_slice(&data);
    connection.write_zeroes(8 * MIB + 4096, 65536, CommandFlags(CommandFlags::NO_HOLE)).await.unwrap();
    content[(8 * MIB + 4096) as usize..][..65536].fill(0);
    connection.write(63 * MIB, &data[..4096], CommandFlags(CommandFlags::FUA)).await.unwrap();
    content[(63 * MIB) as usize..][..4096].copy_from_slice(&data[..4096]);
    connection.flush().await.unwrap();
    assert_eq!(digest(&read_all(&mut connection).await), digest(&content), "reads after writes");

    // A request past the end is refused by our client before it leaves.
    let past = connection.client().read(SIZE - 4096, 8192);
    assert!(matches!(past, Err(Error::OutOfRange { .. })), "{past:?}");
    connection.disconnect().await.unwrap();
    content
}

#[tokio::test]
async fn our_client_against_qemu_nbd_raw() {
    if skip_without_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    let content = sparse_image(&image, SIZE, REGIONS, 1);
    let content = exercise_qemu_nbd(&image, "raw", 4096, content).await;
    assert_eq!(file_digest(&image), digest(&content), "the raw file after the writes");
}

#[tokio::test]
async fn our_client_against_qemu_nbd_qcow2() {
    if skip_without_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    let qcow2 = dir.path().join("disk.qcow2");
    let content = sparse_image(&raw, SIZE, REGIONS, 2);
    run(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "qcow2"]).arg(&raw).arg(&qcow2));
    let content = exercise_qemu_nbd(&qcow2, "qcow2", 65536, content).await;
    let back = dir.path().join("back.raw");
    run(Command::new("qemu-img").args(["convert", "-f", "qcow2", "-O", "raw"]).arg(&qcow2).arg(&back));
    assert_eq!(file_digest(&back), digest(&content), "qemu-img's view of the qcow2 after the writes");
}

#[tokio::test]
async fn our_client_against_read_only_qemu_nbd() {
    if skip_without_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    let content = sparse_image(&image, SIZE, REGIONS, 3);
    let export = QemuNbd::start(&QemuNbdOptions { image: &image, format: "raw", read_only: true, export_name: "disk" }).unwrap();
    let mut connection = connect(&export).await;
    assert!(connection.export().read_only());
    assert_eq!(connection.export().flags & wire::TFLAG_SEND_WRITE_ZEROES, 0);
    assert_eq!(digest(&read_all(&mut connection).await), digest(&content));
    let refused = connection.client().write(0, &[1; 512], CommandFlags::default());
    assert!(matches!(refused, Err(Error::Usage(_))), "{refused:?}");
    connection.disconnect().await.unwrap();
    // A wrong export name is refused by qemu-nbd's NBD_OPT_GO.
    let stream = UnixStream::connect(export.socket()).await.unwrap();
    let wrong = ClientConnection::connect(stream, ClientConfig::new("nope")).await;
    assert!(matches!(wrong, Err(ferry_nbd::io::ShellError::Protocol(Error::OptionRefused { option: wire::OPT_GO, .. }))), "{wrong:?}");
    assert_eq!(file_digest(&image), digest(&content), "read-only export left the file alone");
}

/// Our server on a UNIX socket over `backing`, accepting connections until the test ends;
/// returns the socket path and how each connection ended.
fn start_our_server(dir: &Path, backing: &Path) -> (std::path::PathBuf, tokio::sync::mpsc::UnboundedReceiver<Result<Served, String>>) {
    let socket = dir.join("ours.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let backing = backing.to_owned();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let mut backend = FileBackend::open(&backing);
            let config = ServerConfig::new("disk", backend.size);
            let end = serve(stream, config, &mut backend).await.map_err(|e| e.to_string());
            let _ = tx.send(end);
        }
    });
    (socket, rx)
}

async fn blocking(mut command: Command) -> String {
    tokio::task::spawn_blocking(move || run(&mut command)).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_client_against_our_server() {
    if skip_without_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("src.raw");
    let target = dir.path().join("dst.raw");
    let content = sparse_image(&source, SIZE, REGIONS, 4);
    // The target starts full of garbage, so zero extents must really be written.
    std::fs::write(&target, Rng::new(5).bytes(SIZE as usize)).unwrap();
    let (socket, mut ends) = start_our_server(dir.path(), &target);
    let url = format!("nbd+unix:///disk?socket={}", socket.display());

    // qemu-img writes the whole image into our server (data as writes, holes as zeroes).
    let mut convert = Command::new("qemu-img");
    convert.args(["convert", "-n", "-f", "raw", "-O", "raw"]).arg(&source).arg(&url);
    blocking(convert).await;
    let served = ends.recv().await.unwrap().unwrap();
    assert_eq!(served.end, ServeEnd::Disconnect);
    assert!(served.structured_replies && served.block_status, "{served:?}");
    assert!(served.requests > 4, "{served:?}");
    assert_eq!(file_digest(&target), digest(&content), "our server's file after qemu-img convert");

    // qemu-img reads it back through our server (structured reads, block status) and compares.
    let mut compare = Command::new("qemu-img");
    compare.args(["compare", "-f", "raw", "-F", "raw"]).arg(&source).arg(&url);
    let said = blocking(compare).await;
    assert!(said.contains("identical"), "{said}");
    assert_eq!(ends.recv().await.unwrap().unwrap().end, ServeEnd::Disconnect);

    // qemu-io: a patterned write, its read-back, write-zeroes, a flush.
    let mut io = Command::new("qemu-io");
    io.args(["-f", "raw", "-c", "write -P 0x5a 1M 64k", "-c", "read -P 0x5a 1M 64k", "-c", "write -z 8M 128k", "-c", "read -P 0 8M 128k", "-c", "flush"]).arg(&url);
    let said = blocking(io).await;
    assert!(!said.contains("Pattern verification failed"), "{said}");
    assert_eq!(ends.recv().await.unwrap().unwrap().end, ServeEnd::Disconnect);
    let mut expected = content;
    expected[MIB as usize..][..65536].fill(0x5a);
    expected[(8 * MIB) as usize..][..131072].fill(0);
    assert_eq!(file_digest(&target), digest(&expected), "our server's file after qemu-io");
}
