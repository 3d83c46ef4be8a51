//! Wire frames between the encoder and the decoder.
//!
//! ```text
//! stream    = preamble frame*
//! preamble  = "FRYC" u8 version(=1) u8 mode varint session_window_pages
//! frame     = u8 type body
//!   0x10 BATCH_ZSTD  varint stream_offset, varint n_literal, varint verbatim_len, varint ops_len,
//!                    varint compressed_len, u8[compressed_len]   (zstd of payload)
//!   0x11 BATCH_RAW   varint stream_offset, varint n_literal, varint verbatim_len, varint ops_len,
//!                    payload
//!   0x20 CHECKPOINT  varint total_len, u8[32] blake3(stream[..total_len])
//!   0x21 TRAILER     varint total_len, u8[32] blake3(stream)      (last frame)
//! payload   = literal pages (n_literal × 4096) ‖ verbatim bytes ‖ ops
//! op        = 0x00 varint n   copy n (≥1) bytes from the verbatim area
//!           | 0x01 varint n   n (≥1) zero pages
//!           | 0x02 u8[32]     one page by reference (full blake3 digest)
//!           | 0x03 varint n   n (≥1) literal pages from the page area
//! ```
//! Literal pages come first in the payload so the encoder can feed three buffers to one zstd frame
//! without concatenating them. All integers are LEB128 varints (≤ 10 bytes). Every size is checked
//! against the `MAX_*` limits below as soon as it is read, before the decoder buffers or allocates
//! for it, so a hostile 4 GiB length is an error, not an allocation. `stream_offset` is the length
//! of the original stream before the batch; the decoder checks it (early corruption detection, and
//! the hook for resuming a stream later).

use thiserror::Error;

use crate::PAGE_SIZE;

/// Preamble magic.
pub const MAGIC: [u8; 4] = *b"FRYC";
/// Wire format version.
pub const VERSION: u8 = 1;

/// Frame type: zstd-compressed batch.
pub const T_BATCH_ZSTD: u8 = 0x10;
/// Frame type: uncompressed batch (payload did not shrink).
pub const T_BATCH_RAW: u8 = 0x11;
/// Frame type: digest checkpoint.
pub const T_CHECKPOINT: u8 = 0x20;
/// Frame type: end-of-stream trailer.
pub const T_TRAILER: u8 = 0x21;

/// Op: verbatim run.
pub const OP_VERBATIM: u8 = 0x00;
/// Op: zero pages.
pub const OP_ZERO: u8 = 0x01;
/// Op: page reference.
pub const OP_REF: u8 = 0x02;
/// Op: literal pages.
pub const OP_LITERAL: u8 = 0x03;

/// Most page operations (zero + ref + literal) in one batch: bounds one batch's output to 16 MiB
/// of pages.
pub const MAX_BATCH_PAGE_OPS: usize = 4096;
/// Most literal pages in one batch (4 MiB).
pub const MAX_BATCH_LITERAL: usize = 1024;
/// Most verbatim bytes in one batch.
pub const MAX_BATCH_VERBATIM: usize = 2 << 20;
/// Most op-list bytes in one batch (4096 page ops × (33 + 11) bytes fits).
pub const MAX_BATCH_OPS_LEN: usize = 256 << 10;
/// Largest uncompressed batch payload.
pub const MAX_BATCH_RAW: usize = MAX_BATCH_LITERAL * PAGE_SIZE + MAX_BATCH_VERBATIM + MAX_BATCH_OPS_LEN;
/// Largest compressed batch (zstd's bound on incompressible input is ~0.4 % over).
pub const MAX_BATCH_COMPRESSED: usize = MAX_BATCH_RAW + MAX_BATCH_RAW / 128 + 4096;
/// Largest session window the format allows (the decoder's own limit is usually lower).
pub const MAX_SESSION_WINDOW: u64 = 1 << 24;
/// Preamble length upper bound.
pub const MAX_PREAMBLE_LEN: usize = 6 + 10;

/// Stream mode announced in the preamble (informational: the decoder rebuilds bytes the same way
/// in every mode).
pub const MODE_UNKNOWN: u8 = 0;

/// Malformed wire data. "Not enough bytes yet" is not an error: parsers return `Ok(None)`.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    /// The stream does not start with the Ferry codec magic.
    #[error("bad preamble magic {0:02x?}")]
    BadMagic([u8; 4]),
    /// Unknown wire format version.
    #[error("unsupported wire format version {0}")]
    BadVersion(u8),
    /// A varint longer than 10 bytes or overflowing u64.
    #[error("malformed varint in field {field}")]
    BadVarint {
        /// Which field was being read.
        field: &'static str,
    },
    /// Unknown frame type byte.
    #[error("unknown frame type {0:#04x}")]
    UnknownFrame(u8),
    /// A length or count exceeds the format's limit.
    #[error("{field} = {value} exceeds limit {limit}")]
    TooLarge {
        /// Which field.
        field: &'static str,
        /// Value read from the wire.
        value: u64,
        /// Limit.
        limit: u64,
    },
    /// Inconsistent batch payload.
    #[error("malformed batch: {0}")]
    BadBatch(&'static str),
}

/// Appends `v` as a LEB128 varint.
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads a varint at `*pos`. `Ok(None)` if the buffer ends inside it.
pub fn get_varint(buf: &[u8], pos: &mut usize, field: &'static str) -> Result<Option<u64>, FrameError> {
    let mut v: u64 = 0;
    for i in 0..10 {
        let Some(&b) = buf.get(*pos + i) else {
            return Ok(None);
        };
        let bits = u64::from(b & 0x7f);
        if i == 9 && b > 1 {
            return Err(FrameError::BadVarint { field });
        }
        v |= bits << (7 * i);
        if b & 0x80 == 0 {
            *pos += i + 1;
            return Ok(Some(v));
        }
    }
    Err(FrameError::BadVarint { field })
}

/// Reads a varint and checks it against `limit`.
fn get_bounded(buf: &[u8], pos: &mut usize, field: &'static str, limit: u64) -> Result<Option<u64>, FrameError> {
    match get_varint(buf, pos, field)? {
        Some(v) if v > limit => Err(FrameError::TooLarge { field, value: v, limit }),
        other => Ok(other),
    }
}

/// Parsed preamble.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preamble {
    /// Encoder's mode guess at the time the preamble was written (informational).
    pub mode: u8,
    /// Session window size in pages (both ends run the same FIFO).
    pub session_window_pages: u64,
}

impl Preamble {
    /// Appends the encoded preamble.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(self.mode);
        put_varint(out, self.session_window_pages);
    }

    /// Parses a preamble; `Ok(None)` if more bytes are needed. Returns the length consumed.
    pub fn parse(buf: &[u8]) -> Result<Option<(Self, usize)>, FrameError> {
        if buf.len() < 6 {
            // Reject a wrong magic as early as possible.
            let n = buf.len().min(4);
            if buf[..n] != MAGIC[..n] {
                let mut m = [0u8; 4];
                m[..n].copy_from_slice(&buf[..n]);
                return Err(FrameError::BadMagic(m));
            }
            return Ok(None);
        }
        let mut m = [0u8; 4];
        m.copy_from_slice(&buf[..4]);
        if m != MAGIC {
            return Err(FrameError::BadMagic(m));
        }
        if buf[4] != VERSION {
            return Err(FrameError::BadVersion(buf[4]));
        }
        let mode = buf[5];
        let mut pos = 6;
        let Some(w) = get_bounded(buf, &mut pos, "session_window_pages", MAX_SESSION_WINDOW)? else {
            return Ok(None);
        };
        Ok(Some((Self { mode, session_window_pages: w }, pos)))
    }
}

/// Header of a batch frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    /// Whether the payload is zstd-compressed.
    pub compressed: bool,
    /// Original-stream offset at which this batch's output starts.
    pub stream_offset: u64,
    /// Number of literal pages in the payload.
    pub n_literal: usize,
    /// Bytes in the verbatim area.
    pub verbatim_len: usize,
    /// Bytes in the op list.
    pub ops_len: usize,
    /// Bytes of frame body after the header (compressed length, or raw payload length).
    pub body_len: usize,
}

impl BatchHeader {
    /// Length of the decompressed payload.
    pub fn raw_len(&self) -> usize {
        self.n_literal * PAGE_SIZE + self.verbatim_len + self.ops_len
    }

    /// Appends the header (type byte included).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(if self.compressed { T_BATCH_ZSTD } else { T_BATCH_RAW });
        put_varint(out, self.stream_offset);
        put_varint(out, self.n_literal as u64);
        put_varint(out, self.verbatim_len as u64);
        put_varint(out, self.ops_len as u64);
        if self.compressed {
            put_varint(out, self.body_len as u64);
        }
    }
}

/// A frame header as seen by the decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameHeader {
    /// A batch; its body follows.
    Batch(BatchHeader),
    /// A checkpoint (no body).
    Checkpoint {
        /// Stream length covered.
        total_len: u64,
        /// blake3 of the stream up to `total_len`.
        digest: [u8; 32],
    },
    /// The trailer (no body).
    Trailer {
        /// Total stream length.
        total_len: u64,
        /// blake3 of the whole stream.
        digest: [u8; 32],
    },
}

/// Parses a frame header. `Ok(None)`: need more bytes. Returns the header and its length; for a
/// batch the caller then needs `body_len` more bytes. Limits are enforced here, before the caller
/// waits for (and buffers) the body.
pub fn parse_frame_header(buf: &[u8]) -> Result<Option<(FrameHeader, usize)>, FrameError> {
    let Some(&t) = buf.first() else {
        return Ok(None);
    };
    let mut pos = 1;
    macro_rules! field {
        ($name:literal, $limit:expr) => {
            match get_bounded(buf, &mut pos, $name, $limit)? {
                Some(v) => v,
                None => return Ok(None),
            }
        };
    }
    match t {
        T_BATCH_ZSTD | T_BATCH_RAW => {
            let stream_offset = field!("stream_offset", u64::MAX);
            let n_literal = field!("n_literal", MAX_BATCH_LITERAL as u64) as usize;
            let verbatim_len = field!("verbatim_len", MAX_BATCH_VERBATIM as u64) as usize;
            let ops_len = field!("ops_len", MAX_BATCH_OPS_LEN as u64) as usize;
            let compressed = t == T_BATCH_ZSTD;
            let raw_len = n_literal * PAGE_SIZE + verbatim_len + ops_len;
            let body_len = if compressed {
                field!("compressed_len", MAX_BATCH_COMPRESSED as u64) as usize
            } else {
                raw_len
            };
            if ops_len == 0 {
                return Err(FrameError::BadBatch("empty op list"));
            }
            Ok(Some((
                FrameHeader::Batch(BatchHeader { compressed, stream_offset, n_literal, verbatim_len, ops_len, body_len }),
                pos,
            )))
        }
        T_CHECKPOINT | T_TRAILER => {
            let total_len = field!("total_len", u64::MAX);
            if buf.len() < pos + 32 {
                return Ok(None);
            }
            let mut digest = [0u8; 32];
            digest.copy_from_slice(&buf[pos..pos + 32]);
            pos += 32;
            let h = if t == T_CHECKPOINT {
                FrameHeader::Checkpoint { total_len, digest }
            } else {
                FrameHeader::Trailer { total_len, digest }
            };
            Ok(Some((h, pos)))
        }
        other => Err(FrameError::UnknownFrame(other)),
    }
}

/// Appends a checkpoint or trailer frame.
pub fn encode_digest_frame(out: &mut Vec<u8>, trailer: bool, total_len: u64, digest: &[u8; 32]) {
    out.push(if trailer { T_TRAILER } else { T_CHECKPOINT });
    put_varint(out, total_len);
    out.extend_from_slice(digest);
}

/// One decoded op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Copy this many verbatim bytes.
    Verbatim(usize),
    /// This many zero pages.
    Zero(usize),
    /// One page by reference.
    Ref([u8; 32]),
    /// This many literal pages.
    Literal(usize),
}

/// Reads the next op from an op list. `Ok(None)` at the end of the list; a truncated op is an
/// error because the list is complete by construction.
pub fn next_op(ops: &[u8], pos: &mut usize) -> Result<Option<Op>, FrameError> {
    let Some(&code) = ops.get(*pos) else {
        return Ok(None);
    };
    *pos += 1;
    let count = |pos: &mut usize, field| -> Result<usize, FrameError> {
        match get_varint(ops, pos, field)? {
            Some(0) => Err(FrameError::BadBatch("zero-length op")),
            Some(n) if n > MAX_BATCH_RAW as u64 => Err(FrameError::TooLarge { field, value: n, limit: MAX_BATCH_RAW as u64 }),
            Some(n) => Ok(n as usize),
            None => Err(FrameError::BadBatch("truncated op")),
        }
    };
    let op = match code {
        OP_VERBATIM => Op::Verbatim(count(pos, "verbatim run")?),
        OP_ZERO => Op::Zero(count(pos, "zero run")?),
        OP_LITERAL => Op::Literal(count(pos, "literal run")?),
        OP_REF => {
            let Some(d) = ops.get(*pos..*pos + 32) else {
                return Err(FrameError::BadBatch("truncated reference"));
            };
            let mut digest = [0u8; 32];
            digest.copy_from_slice(d);
            *pos += 32;
            Op::Ref(digest)
        }
        _ => return Err(FrameError::BadBatch("unknown op")),
    };
    Ok(Some(op))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_round_trip_and_limits() {
        for v in [0u64, 1, 127, 128, 300, u32::MAX as u64, u64::MAX] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            let mut pos = 0;
            assert_eq!(get_varint(&b, &mut pos, "x").unwrap(), Some(v));
            assert_eq!(pos, b.len());
            let mut pos = 0;
            assert_eq!(get_varint(&b[..b.len() - 1], &mut pos, "x").unwrap(), None);
        }
        let mut pos = 0;
        assert!(get_varint(&[0xff; 11], &mut pos, "x").is_err());
    }

    #[test]
    fn huge_lengths_rejected_before_body() {
        let mut b = vec![T_BATCH_ZSTD];
        put_varint(&mut b, 0);
        put_varint(&mut b, 1);
        put_varint(&mut b, 0);
        put_varint(&mut b, 4);
        put_varint(&mut b, 4 << 30);
        assert!(matches!(parse_frame_header(&b), Err(FrameError::TooLarge { field: "compressed_len", .. })));
        let mut b = vec![T_BATCH_RAW];
        put_varint(&mut b, 0);
        put_varint(&mut b, 1 << 32);
        assert!(matches!(parse_frame_header(&b), Err(FrameError::TooLarge { field: "n_literal", .. })));
    }

    #[test]
    fn preamble_round_trip() {
        let p = Preamble { mode: 2, session_window_pages: 65536 };
        let mut b = Vec::new();
        p.encode(&mut b);
        for i in 0..b.len() {
            assert_eq!(Preamble::parse(&b[..i]).unwrap(), None);
        }
        assert_eq!(Preamble::parse(&b).unwrap(), Some((p, b.len())));
        assert!(Preamble::parse(b"XY").is_err());
    }
}
