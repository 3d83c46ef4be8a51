//! NBD wire constants and the byte helpers both roles share.
//!
//! Numbers from the NBD protocol specification (NetworkBlockDevice/nbd `doc/proto.md`). All
//! integers on the wire are big-endian.

/// Server greeting, first 8 bytes: `NBDMAGIC`.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// Server greeting, next 8 bytes, and the start of every client option: `IHAVEOPT`.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Start of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Start of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Start of every simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Start of every structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag (server): fixed newstyle negotiation.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag (server): no 124 zero bytes after `NBD_OPT_EXPORT_NAME`'s reply.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the client wants no 124 zero bytes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Option `NBD_OPT_EXPORT_NAME` (old way to end the handshake, no reply header).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option `NBD_OPT_ABORT`.
pub const OPT_ABORT: u32 = 2;
/// Option `NBD_OPT_LIST`.
pub const OPT_LIST: u32 = 3;
/// Option `NBD_OPT_INFO`.
pub const OPT_INFO: u32 = 6;
/// Option `NBD_OPT_GO`.
pub const OPT_GO: u32 = 7;
/// Option `NBD_OPT_STRUCTURED_REPLY`.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option `NBD_OPT_LIST_META_CONTEXT`.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Option `NBD_OPT_SET_META_CONTEXT`.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Option `NBD_OPT_EXTENDED_HEADERS` (QEMU ≥ 8.2 asks for it first; we answer "unsupported").
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply `NBD_REP_ACK`.
pub const REP_ACK: u32 = 1;
/// Option reply `NBD_REP_SERVER` (one export of `NBD_OPT_LIST`).
pub const REP_SERVER: u32 = 2;
/// Option reply `NBD_REP_INFO`.
pub const REP_INFO: u32 = 3;
/// Option reply `NBD_REP_META_CONTEXT`.
pub const REP_META_CONTEXT: u32 = 4;
/// Bit 31 marks an error reply.
pub const REP_ERROR_BIT: u32 = 1 << 31;
/// `NBD_REP_ERR_UNSUP`: unknown option.
pub const REP_ERR_UNSUP: u32 = REP_ERROR_BIT | 1;
/// `NBD_REP_ERR_INVALID`: malformed option or wrong moment.
pub const REP_ERR_INVALID: u32 = REP_ERROR_BIT | 3;
/// `NBD_REP_ERR_UNKNOWN`: no such export.
pub const REP_ERR_UNKNOWN: u32 = REP_ERROR_BIT | 6;

/// Info type `NBD_INFO_EXPORT`: u64 size, u16 transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Info type `NBD_INFO_NAME`.
pub const INFO_NAME: u16 = 1;
/// Info type `NBD_INFO_BLOCK_SIZE`: u32 minimum, preferred, maximum.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flag: the flags field is valid.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `NBD_CMD_FLUSH` is supported.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `NBD_CMD_FLAG_FUA` is supported.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: `NBD_CMD_TRIM` is supported.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `NBD_CMD_WRITE_ZEROES` is supported.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;

/// Command `NBD_CMD_READ`.
pub const CMD_READ: u16 = 0;
/// Command `NBD_CMD_WRITE`.
pub const CMD_WRITE: u16 = 1;
/// Command `NBD_CMD_DISC`.
pub const CMD_DISC: u16 = 2;
/// Command `NBD_CMD_FLUSH`.
pub const CMD_FLUSH: u16 = 3;
/// Command `NBD_CMD_TRIM`.
pub const CMD_TRIM: u16 = 4;
/// Command `NBD_CMD_WRITE_ZEROES`.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command `NBD_CMD_BLOCK_STATUS`.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Structured chunk flag: last chunk of this reply.
pub const CHUNK_FLAG_DONE: u16 = 1 << 0;
/// Chunk `NBD_REPLY_TYPE_NONE`.
pub const CHUNK_NONE: u16 = 0;
/// Chunk `NBD_REPLY_TYPE_OFFSET_DATA`: u64 offset, data.
pub const CHUNK_OFFSET_DATA: u16 = 1;
/// Chunk `NBD_REPLY_TYPE_OFFSET_HOLE`: u64 offset, u32 length.
pub const CHUNK_OFFSET_HOLE: u16 = 2;
/// Chunk `NBD_REPLY_TYPE_BLOCK_STATUS`: u32 context id, then (u32 length, u32 flags) pairs.
pub const CHUNK_BLOCK_STATUS: u16 = 5;
/// Bit 15 marks an error chunk.
pub const CHUNK_ERROR_BIT: u16 = 1 << 15;
/// Chunk `NBD_REPLY_TYPE_ERROR`: u32 errno, u16 message length, message.
pub const CHUNK_ERROR: u16 = CHUNK_ERROR_BIT | 1;
/// Chunk `NBD_REPLY_TYPE_ERROR_OFFSET`: as `ERROR`, then u64 offset.
pub const CHUNK_ERROR_OFFSET: u16 = CHUNK_ERROR_BIT | 2;

/// The one metadata context we speak: allocation status (`HOLE` = 1, `ZERO` = 2).
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Length of a transmission request header.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Length of an option header (`IHAVEOPT`, option, length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Length of an option reply header (magic, option, type, length).
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Length of the server's greeting.
pub const GREETING_LEN: usize = 18;
/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Bytes of a transmission reply header's magic (both kinds).
pub const REPLY_MAGIC_LEN: usize = 4;

/// A big-endian reader over a complete frame; every read is bounds-checked.
pub(crate) struct Cursor<'a> {
    bytes: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.bytes.len()
    }

    pub(crate) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.bytes.len() {
            return None;
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Some(head)
    }

    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.bytes)
    }

    pub(crate) fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(crate) fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|b| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_be_bytes(a)
        })
    }
}

/// Collects exactly `want` bytes of the next frame from input that arrives in pieces.
///
/// The buffer is allocated once per frame, for the frame's size, which the caller has already
/// checked against its limits: nothing here grows beyond what was asked for.
#[derive(Debug, Default)]
pub(crate) struct FrameReader {
    buf: Vec<u8>,
    want: usize,
}

impl FrameReader {
    /// Starts collecting a frame of `want` bytes (discarding nothing: the previous frame was
    /// taken).
    pub(crate) fn expect(&mut self, want: usize) {
        self.buf = Vec::with_capacity(want);
        self.want = want;
    }

    /// Copies what the current frame still needs from `input`; returns the bytes taken.
    pub(crate) fn fill(&mut self, input: &[u8]) -> usize {
        let n = (self.want - self.buf.len()).min(input.len());
        self.buf.extend_from_slice(&input[..n]);
        n
    }

    /// Whether the current frame is complete.
    pub(crate) fn complete(&self) -> bool {
        self.buf.len() == self.want
    }

    /// Takes the complete frame.
    pub(crate) fn take(&mut self) -> Vec<u8> {
        self.want = 0;
        std::mem::take(&mut self.buf)
    }
}

pub(crate) fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}

pub(crate) fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}

pub(crate) fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}

/// Converts a length the caller bounded by a `u32` limit to the wire's `u32`.
pub(crate) fn len32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}
