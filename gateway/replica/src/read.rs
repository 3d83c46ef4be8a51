//! Reading a disk into a [`Manifest`]: a raw file directly, or any image through an NBD export
//! (a `qemu-nbd --read-only` this module starts, or an export the caller connected to).
//!
//! Both skip holes without reading them: the raw reader asks the filesystem
//! (`SEEK_DATA`/`SEEK_HOLE`), the NBD reader asks the server (`NBD_CMD_BLOCK_STATUS`,
//! `base:allocation`, extents flagged `ZERO`). Data is hashed as it arrives; memory stays at a
//! few read buffers.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use ferry_nbd::io::{ClientConnection, ShellError};
use ferry_nbd::qemu_nbd::{QemuNbd, QemuNbdOptions};
use ferry_nbd::{ClientConfig, ReplyData};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::identity::{ImageIdentity, ReplicaChanged};
use crate::manifest::{BlockSize, Manifest, ManifestBuilder, ManifestError};

/// Bytes per read request (and per read of a raw file).
pub const READ_CHUNK: u32 = 4 << 20;
/// Read requests in flight on an NBD export.
pub const READS_IN_FLIGHT: usize = 4;
/// Largest block status request (a sparse disk is skipped 1 GiB per round trip or faster).
const STATUS_WINDOW: u64 = 1 << 30;

/// Why a manifest could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The image file.
    #[error("{path}: {source}")]
    File {
        /// The image.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The NBD export.
    #[error("NBD export: {0}")]
    Nbd(#[from] ShellError),
    /// Starting `qemu-nbd`.
    #[error("qemu-nbd: {0}")]
    QemuNbd(std::io::Error),
    /// The builder (sizes that do not add up).
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The image changed while it was being read.
    #[error(transparent)]
    Changed(#[from] ReplicaChanged),
    /// The blocking reader's thread failed.
    #[error("the reader thread failed: {0}")]
    Thread(String),
}

/// How to read an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// Read the file itself (raw images only).
    Direct,
    /// Through a read-only `qemu-nbd` export (any format QEMU opens).
    QemuNbd,
}

/// The manifest of a raw image file, read directly. The file must not change meanwhile (its
/// identity is taken before and checked after).
pub fn manifest_of_raw_file(path: &Path, block_size: BlockSize) -> Result<Manifest, ReadError> {
    let file_error = |source| ReadError::File { path: path.to_owned(), source };
    let identity = ImageIdentity::of(path)?;
    let created = SystemTime::now();
    let file = File::open(path).map_err(file_error)?;
    let size = file.metadata().map_err(file_error)?.len();
    let mut builder = ManifestBuilder::new(size, block_size, created)?;
    let mut buf = vec![0u8; READ_CHUNK as usize];
    while builder.offset() < size {
        let offset = builder.offset();
        let (data_start, data_end) = next_data(&file, offset, size).map_err(file_error)?;
        builder.zeroes(data_start - offset)?;
        let mut at = data_start;
        while at < data_end {
            let len = (data_end - at).min(READ_CHUNK.into()) as usize;
            file.read_exact_at(&mut buf[..len], at).map_err(file_error)?;
            builder.data(&buf[..len])?;
            at += len as u64;
        }
    }
    identity.check_unchanged()?;
    Ok(builder.finish(Some(identity))?)
}

/// The next data segment at or after `offset`: `(start, end)`; `(size, size)` when only a hole
/// is left. Filesystems without `SEEK_DATA` report the rest of the file as data.
fn next_data(file: &File, offset: u64, size: u64) -> std::io::Result<(u64, u64)> {
    let start = match lseek(file, offset, libc::SEEK_DATA) {
        Ok(Some(start)) => start,
        Ok(None) => return Ok((size, size)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok((offset, size)),
        Err(e) => return Err(e),
    };
    let end = lseek(file, start, libc::SEEK_HOLE)?.unwrap_or(size);
    Ok((start.min(size), end.min(size)))
}

/// lseek(2); `None` for `ENXIO` (no data, or no hole, after `offset`).
fn lseek(file: &File, offset: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
    let at = libc::off_t::try_from(offset).map_err(std::io::Error::other)?;
    // SAFETY: lseek(2) on a descriptor `file` owns for the whole call; it touches no memory of
    // ours.
    let r = unsafe { libc::lseek(file.as_raw_fd(), at, whence) };
    if r >= 0 {
        return Ok(u64::try_from(r).ok());
    }
    let error = std::io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::ENXIO) => Ok(None),
        _ => Err(error),
    }
}

/// The manifest of an NBD export (read through `connection`; block status is used when the
/// server offers it). The export must not change meanwhile: that is the caller's to ensure
/// (a read-only export of a frozen replica).
pub async fn manifest_of_export<S>(connection: &mut ClientConnection<S>, block_size: BlockSize) -> Result<Manifest, ReadError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let created = SystemTime::now();
    let size = connection.export().size;
    let max_read = connection.export().block_size.map_or(READ_CHUNK, |b| b.maximum.min(READ_CHUNK)).max(4096);
    let mut builder = ManifestBuilder::new(size, block_size, created)?;
    while builder.offset() < size {
        let window_start = builder.offset();
        let window = (size - window_start).min(STATUS_WINDOW);
        // Segments of this window in order: (offset, length, zero).
        let mut segments = Vec::new();
        if connection.client().has_block_status() {
            let mut at = window_start;
            while at < window_start + window {
                let len = (window_start + window - at) as u32;
                let before = at;
                let extents = connection.block_status(at, len).await?;
                for extent in extents {
                    let length = u64::from(extent.length).min(window_start + window - at);
                    if length == 0 {
                        break;
                    }
                    segments.push((at, length, extent.is_zero()));
                    at += length;
                    if at >= window_start + window {
                        break;
                    }
                }
                if at == before {
                    return Err(ShellError::Protocol(ferry_nbd::Error::Malformed { what: "block status reply covering nothing" }).into());
                }
            }
        } else {
            segments.push((window_start, window, false));
        }
        read_segments(connection, &mut builder, &segments, max_read).await?;
    }
    Ok(builder.finish(None)?)
}

/// Feeds `segments` to the builder in order: zero segments as zeroes, data segments read with
/// up to [`READS_IN_FLIGHT`] requests of at most `max_read` bytes in flight.
async fn read_segments<S>(connection: &mut ClientConnection<S>, builder: &mut ManifestBuilder, segments: &[(u64, u64, bool)], max_read: u32) -> Result<(), ReadError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Pieces to feed in order: (offset, length, zero).
    let mut pieces = Vec::new();
    for &(offset, length, zero) in segments {
        if zero {
            pieces.push((offset, length, true));
            continue;
        }
        let mut at = offset;
        while at < offset + length {
            let len = (offset + length - at).min(max_read.into());
            pieces.push((at, len, false));
            at += len;
        }
    }
    let mut next_request = 0; // index into pieces of the next read to send
    let mut next_feed = 0; // index into pieces of the next piece to feed
    let mut cookies = BTreeMap::new(); // cookie -> piece index
    let mut arrived: BTreeMap<usize, Vec<u8>> = BTreeMap::new();
    while next_feed < pieces.len() {
        while next_request < pieces.len() && cookies.len() < READS_IN_FLIGHT {
            let (offset, length, zero) = pieces[next_request];
            if !zero {
                let cookie = connection.client().read(offset, length as u32).map_err(ShellError::from)?;
                cookies.insert(cookie, next_request);
            }
            next_request += 1;
        }
        while next_feed < pieces.len() {
            let (_, length, zero) = pieces[next_feed];
            if zero {
                builder.zeroes(length)?;
            } else if let Some(data) = arrived.remove(&next_feed) {
                builder.data(&data)?;
            } else {
                break;
            }
            next_feed += 1;
        }
        if next_feed == pieces.len() {
            break;
        }
        let reply = connection.next_reply().await?;
        let index = cookies.remove(&reply.cookie).ok_or(ShellError::Protocol(ferry_nbd::Error::UnknownCookie(reply.cookie)))?;
        match reply.result {
            Ok(ReplyData::Read(data)) => {
                arrived.insert(index, data);
            }
            Ok(_) => return Err(ShellError::Protocol(ferry_nbd::Error::Usage("a read answered without data")).into()),
            Err(error) => return Err(ShellError::Reply { cookie: reply.cookie, error }.into()),
        }
    }
    Ok(())
}

/// The manifest of an image file: raw files directly or through `qemu-nbd`, other formats
/// through a read-only `qemu-nbd` export started for it. The file's identity is taken before
/// and checked after reading.
pub async fn manifest_of_image(path: &Path, format: &str, block_size: BlockSize, via: Via) -> Result<Manifest, ReadError> {
    if via == Via::Direct && format == "raw" {
        let path = path.to_owned();
        return tokio::task::spawn_blocking(move || manifest_of_raw_file(&path, block_size))
            .await
            .map_err(|e| ReadError::Thread(e.to_string()))?;
    }
    let identity = ImageIdentity::of(path)?;
    let export = QemuNbd::start(&QemuNbdOptions { image: path, format, read_only: true, export_name: "replica" }).map_err(ReadError::QemuNbd)?;
    let stream = tokio::net::UnixStream::connect(export.socket()).await.map_err(ReadError::QemuNbd)?;
    let mut connection = ClientConnection::connect(stream, ClientConfig::new("replica")).await?;
    let mut manifest = manifest_of_export(&mut connection, block_size).await?;
    connection.disconnect().await?;
    drop(export);
    identity.check_unchanged()?;
    manifest.identity = Some(identity);
    Ok(manifest)
}
