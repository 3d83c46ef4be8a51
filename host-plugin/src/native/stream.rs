//! The native migration stream, in QEMU's shape (sans-IO writer and reader).
//!
//! A native stream is laid out like a QEMU precopy main channel (`shared/docs/
//! qemu-migration-stream.md` §2), so the gateways' QEMU tokenizer finds every page in it and
//! deduplicates and compresses it with no gateway change:
//! ```text
//! be32 "QEVM"  be32 3
//! SECTION_START  sid 0 "ram" instance 0 version 4
//!     be64 total|MEM_SIZE   per slot: u8 len "ferry.slot<N>@<gpa:#x>" be64 len   be64 EOS
//! SECTION_PART   sid 0   PAGE/ZERO records   be64 EOS        one per pre-copy pass
//! SECTION_END    sid 0   PAGE/ZERO records   be64 EOS        the final pass (vCPUs paused)
//! SECTION_FULL   sid 1 "ferry-native" instance 0 version 1   be32 len, vCPU state[len]
//! EOF (0x00)
//! ```
//! A record is `be64 offset|flags` (offset relative to its slot), then `u8 len, name` unless
//! CONTINUE says "same block as the previous record of this pass", then 4096 bytes (PAGE) or
//! one fill byte, always 0 (ZERO). No configuration section and no section footers are written
//! (QEMU sends both; the tokenizer needs neither).
//!
//! QEMU must never load such a stream, and this reader must never load a QEMU one: the reader
//! refuses a stream with a configuration section, RAM blocks that are not `ferry.slot…` names,
//! a device section other than `ferry-native`, and versions it does not know, with errors that
//! say so. Every length in the stream is bounded by [`ReaderLimits`]; hostile bytes give an
//! error, never a panic.
//!
//! Written by hand: the grammar is QEMU's (no crate writes or reads it), and the constants are
//! the gateway codec's (`ferry_codec::qemu::main_channel`, which ferry-host does not link; a
//! test checks they agree).

use std::fmt;

/// "QEVM".
pub const QEMU_VM_FILE_MAGIC: u32 = 0x5145_564d;
/// The QEMU stream version a native stream claims.
pub const QEMU_VM_FILE_VERSION: u32 = 3;
/// The `ram` section version (QEMU's).
pub const RAM_SECTION_VERSION: u32 = 4;
/// The idstr of the vCPU state section.
pub const NATIVE_SECTION: &str = "ferry-native";
/// The version of the `ferry-native` section layout this build writes and reads.
pub const NATIVE_SECTION_VERSION: u32 = 1;
/// Page size of every record.
pub const PAGE_SIZE: usize = 4096;

const QEMU_VM_EOF: u8 = 0x00;
const QEMU_VM_SECTION_START: u8 = 0x01;
const QEMU_VM_SECTION_PART: u8 = 0x02;
const QEMU_VM_SECTION_END: u8 = 0x03;
const QEMU_VM_SECTION_FULL: u8 = 0x04;
const QEMU_VM_CONFIGURATION: u8 = 0x07;
const RAM_SID: u32 = 0;
const NATIVE_SID: u32 = 1;
const FLAG_MASK: u64 = PAGE_SIZE as u64 - 1;
const SLOT_PREFIX: &str = "ferry.slot";

/// RAM record flags (QEMU's `RAM_SAVE_FLAG_*`).
pub mod flags {
    /// Zero page: one fill byte follows.
    pub const ZERO: u64 = 0x002;
    /// The block list.
    pub const MEM_SIZE: u64 = 0x004;
    /// A full page follows.
    pub const PAGE: u64 = 0x008;
    /// End of a section body.
    pub const EOS: u64 = 0x010;
    /// Same block as the previous record: no name follows.
    pub const CONTINUE: u64 = 0x020;
}

/// Most memory slots a stream may list (KVM allows 509 on x86; a reference VM uses one).
pub const MAX_BLOCKS: usize = 64;

/// One memory slot as a RAM block of the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamBlock {
    /// KVM memory slot number.
    pub slot: u32,
    /// Guest physical address of the slot's first byte.
    pub guest_addr: u64,
    /// Length in bytes (a multiple of [`PAGE_SIZE`]).
    pub len: u64,
}

impl RamBlock {
    /// The block's name in the stream: `ferry.slot<N>@<gpa:#x>`.
    pub fn name(&self) -> String {
        format!("{SLOT_PREFIX}{}@{:#x}", self.slot, self.guest_addr)
    }

    /// Parses a block name written by [`RamBlock::name`] (strictly: it must round-trip).
    fn parse_name(name: &[u8], len: u64) -> Option<Self> {
        let text = std::str::from_utf8(name).ok()?;
        let (slot, addr) = text.strip_prefix(SLOT_PREFIX)?.split_once('@')?;
        let block = Self { slot: slot.parse().ok()?, guest_addr: u64::from_str_radix(addr.strip_prefix("0x")?, 16).ok()?, len };
        (block.name() == text).then_some(block)
    }

    /// Pages in the block.
    pub fn pages(&self) -> u64 {
        self.len / PAGE_SIZE as u64
    }
}

/// What went wrong writing or reading a native stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// The bytes are not a ferry-native stream (a QEMU stream, or something else).
    #[error("not a ferry-native migration stream: {0}")]
    NotNative(String),
    /// A version this build does not read.
    #[error("{what} version {version} is not supported (this build reads version {supported})")]
    UnsupportedVersion {
        /// Which version.
        what: &'static str,
        /// The version found.
        version: u32,
        /// The version this build reads.
        supported: u32,
    },
    /// A length beyond the reader's limits.
    #[error("{what} of {len} exceeds the limit of {limit}")]
    TooLarge {
        /// What is too large.
        what: &'static str,
        /// Its length.
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// A native stream that breaks its grammar.
    #[error("malformed native stream: {0}")]
    Malformed(String),
    /// The writer was called out of order or with a bad argument (a bug in the caller).
    #[error("native stream writer: {0}")]
    Misuse(String),
}

fn misuse(text: impl fmt::Display) -> StreamError {
    StreamError::Misuse(text.to_string())
}

fn malformed(text: impl fmt::Display) -> StreamError {
    StreamError::Malformed(text.to_string())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriterPhase {
    BetweenPasses,
    InPass { last: bool },
    RamDone,
    Done,
}

/// Writes a native stream into caller-provided buffers (sans-IO). See the module docs.
#[derive(Debug)]
pub struct StreamWriter {
    blocks: Vec<RamBlock>,
    phase: WriterPhase,
    /// The block named by the previous record of this pass (CONTINUE refers to it).
    last_block: Option<usize>,
}

impl StreamWriter {
    /// Starts a stream for these slots: appends the header and the `ram` section's block list.
    pub fn new(blocks: Vec<RamBlock>, out: &mut Vec<u8>) -> Result<Self, StreamError> {
        if blocks.is_empty() || blocks.len() > MAX_BLOCKS {
            return Err(misuse(format!("{} memory slots (1 to {MAX_BLOCKS})", blocks.len())));
        }
        let mut total = 0u64;
        for (i, b) in blocks.iter().enumerate() {
            if b.len == 0 || b.len & FLAG_MASK != 0 {
                return Err(misuse(format!("slot {} length {} is not a positive multiple of 4096", b.slot, b.len)));
            }
            if blocks[..i].iter().any(|o| o.slot == b.slot) {
                return Err(misuse(format!("slot {} listed twice", b.slot)));
            }
            total = total.checked_add(b.len).ok_or_else(|| misuse("total memory overflows"))?;
        }
        out.extend_from_slice(&QEMU_VM_FILE_MAGIC.to_be_bytes());
        out.extend_from_slice(&QEMU_VM_FILE_VERSION.to_be_bytes());
        section_header(out, QEMU_VM_SECTION_START, RAM_SID, "ram", RAM_SECTION_VERSION);
        out.extend_from_slice(&(total | flags::MEM_SIZE).to_be_bytes());
        for b in &blocks {
            let name = b.name();
            out.push(name.len() as u8); // ≤ 10 + 10 + 1 + 18 bytes
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&b.len.to_be_bytes());
        }
        out.extend_from_slice(&flags::EOS.to_be_bytes());
        Ok(Self { blocks, phase: WriterPhase::BetweenPasses, last_block: None })
    }

    /// The slots this stream carries.
    pub fn blocks(&self) -> &[RamBlock] {
        &self.blocks
    }

    /// Begins a pass over memory: a SECTION_PART, or the SECTION_END of the final pass
    /// (`last`, with the vCPUs paused).
    pub fn begin_pass(&mut self, last: bool, out: &mut Vec<u8>) -> Result<(), StreamError> {
        if self.phase != WriterPhase::BetweenPasses {
            return Err(misuse(format!("begin_pass in phase {:?}", self.phase)));
        }
        out.push(if last { QEMU_VM_SECTION_END } else { QEMU_VM_SECTION_PART });
        out.extend_from_slice(&RAM_SID.to_be_bytes());
        self.phase = WriterPhase::InPass { last };
        self.last_block = None;
        Ok(())
    }

    /// Appends page `offset` (bytes, page-aligned, relative to the slot) of `blocks()[block]`:
    /// a ZERO record when every byte is 0, else a PAGE record. Returns whether it was zero.
    pub fn page(&mut self, block: usize, offset: u64, data: &[u8], out: &mut Vec<u8>) -> Result<bool, StreamError> {
        if !matches!(self.phase, WriterPhase::InPass { .. }) {
            return Err(misuse(format!("page outside a pass (phase {:?})", self.phase)));
        }
        let b = self.blocks.get(block).ok_or_else(|| misuse(format!("no block {block}")))?;
        if offset & FLAG_MASK != 0 || offset >= b.len || data.len() != PAGE_SIZE {
            return Err(misuse(format!("page at {offset:#x} ({} bytes) of slot {} ({} bytes)", data.len(), b.slot, b.len)));
        }
        let zero = data.iter().all(|&x| x == 0);
        let cont = self.last_block == Some(block);
        let flag = if zero { flags::ZERO } else { flags::PAGE } | if cont { flags::CONTINUE } else { 0 };
        out.extend_from_slice(&(offset | flag).to_be_bytes());
        if !cont {
            let name = b.name();
            out.push(name.len() as u8);
            out.extend_from_slice(name.as_bytes());
            self.last_block = Some(block);
        }
        if zero {
            out.push(0);
        } else {
            out.extend_from_slice(data);
        }
        Ok(zero)
    }

    /// Ends the current pass (EOS).
    pub fn end_pass(&mut self, out: &mut Vec<u8>) -> Result<(), StreamError> {
        let WriterPhase::InPass { last } = self.phase else {
            return Err(misuse(format!("end_pass in phase {:?}", self.phase)));
        };
        out.extend_from_slice(&flags::EOS.to_be_bytes());
        self.phase = if last { WriterPhase::RamDone } else { WriterPhase::BetweenPasses };
        Ok(())
    }

    /// After the final pass: appends the `ferry-native` section with `state` (the encoded vCPU
    /// state) and EOF. The stream is complete.
    pub fn finish(&mut self, state: &[u8], out: &mut Vec<u8>) -> Result<(), StreamError> {
        if self.phase != WriterPhase::RamDone {
            return Err(misuse(format!("finish in phase {:?} (after the final pass only)", self.phase)));
        }
        let len = u32::try_from(state.len()).map_err(|_| misuse("state longer than 4 GiB"))?;
        section_header(out, QEMU_VM_SECTION_FULL, NATIVE_SID, NATIVE_SECTION, NATIVE_SECTION_VERSION);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(state);
        out.push(QEMU_VM_EOF);
        self.phase = WriterPhase::Done;
        Ok(())
    }
}

fn section_header(out: &mut Vec<u8>, kind: u8, sid: u32, idstr: &str, version: u32) {
    out.push(kind);
    out.extend_from_slice(&sid.to_be_bytes());
    out.push(idstr.len() as u8);
    out.extend_from_slice(idstr.as_bytes());
    out.extend_from_slice(&0u32.to_be_bytes()); // instance
    out.extend_from_slice(&version.to_be_bytes());
}

/// Bounds the reader puts on what a stream may claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReaderLimits {
    /// Largest vCPU state section (default 1 MiB; a one-vCPU state is ~10 KiB).
    pub max_state: u32,
    /// Largest total guest memory (default 64 GiB).
    pub max_memory: u64,
}

impl Default for ReaderLimits {
    fn default() -> Self {
        Self { max_state: 1 << 20, max_memory: 64 << 30 }
    }
}

/// One thing read from a native stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event<'a> {
    /// The memory slots (first event).
    Blocks(Vec<RamBlock>),
    /// A pass over memory begins (`last`: the final pass, vCPUs paused at the source).
    PassStart {
        /// Whether this is the final pass.
        last: bool,
    },
    /// A page's 4096 bytes, at `offset` of the slot `blocks[block]`.
    Page {
        /// Index into the `Blocks` list.
        block: usize,
        /// Byte offset in the slot.
        offset: u64,
        /// The page.
        data: &'a [u8],
    },
    /// A page of zeros at `offset` of `blocks[block]`.
    Zero {
        /// Index into the `Blocks` list.
        block: usize,
        /// Byte offset in the slot.
        offset: u64,
    },
    /// The current pass ended.
    PassEnd,
    /// The encoded vCPU state (after the final pass).
    State(&'a [u8]),
    /// The stream is complete.
    Eof,
}

/// The reader's answer for the bytes it was offered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step<'a> {
    /// At least this many bytes (from the start of the offered slice) are needed.
    NeedMore(usize),
    /// The first `consumed` bytes were `event`.
    Event {
        /// Bytes of the offered slice this event used.
        consumed: usize,
        /// What they were.
        event: Event<'a>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReaderPhase {
    Header,
    BetweenPasses,
    InPass { last: bool },
    State,
    Eof,
    Done,
}

/// Reads a native stream (sans-IO: offer buffered bytes, get one event and how many bytes it
/// used, or how many are needed). The reader's state advances only when it returns an event.
#[derive(Debug)]
pub struct StreamReader {
    limits: ReaderLimits,
    phase: ReaderPhase,
    blocks: Vec<RamBlock>,
    last_block: Option<usize>,
}

/// Why a parse stopped.
enum Stop {
    Need(usize),
    Error(StreamError),
}

impl From<StreamError> for Stop {
    fn from(e: StreamError) -> Self {
        Stop::Error(e)
    }
}

/// A bounds-checked big-endian cursor: running out of bytes is `Stop::Need`.
struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Stop> {
        let end = self.pos.checked_add(n).ok_or(Stop::Error(malformed("length overflow")))?;
        let s = self.data.get(self.pos..end).ok_or(Stop::Need(end))?;
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, Stop> {
        Ok(self.take(1)?[0])
    }
    fn be32(&mut self) -> Result<u32, Stop> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn be64(&mut self) -> Result<u64, Stop> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(a))
    }
    /// A section header after its type byte: sid, idstr, instance, version.
    fn section_header(&mut self) -> Result<(u32, &'a [u8], u32, u32), Stop> {
        let sid = self.be32()?;
        let n = usize::from(self.u8()?);
        let idstr = self.take(n)?;
        Ok((sid, idstr, self.be32()?, self.be32()?))
    }
}

impl Default for StreamReader {
    fn default() -> Self {
        Self::new(ReaderLimits::default())
    }
}

impl StreamReader {
    /// A reader expecting the stream's first byte.
    pub fn new(limits: ReaderLimits) -> Self {
        Self { limits, phase: ReaderPhase::Header, blocks: Vec::new(), last_block: None }
    }

    /// The memory slots, once the `Blocks` event was returned.
    pub fn blocks(&self) -> &[RamBlock] {
        &self.blocks
    }

    /// Whether the stream is complete (EOF read).
    pub fn is_done(&self) -> bool {
        self.phase == ReaderPhase::Done
    }

    /// Classifies the start of `data`. See [`Step`].
    pub fn next<'a>(&mut self, data: &'a [u8]) -> Result<Step<'a>, StreamError> {
        let mut c = Cursor { data, pos: 0 };
        let parsed = match self.phase {
            ReaderPhase::Header => self.header(&mut c),
            ReaderPhase::BetweenPasses => self.between_passes(&mut c),
            ReaderPhase::InPass { last } => self.record(&mut c, last),
            ReaderPhase::State => self.state(&mut c),
            ReaderPhase::Eof => match c.u8() {
                Ok(QEMU_VM_EOF) => Ok((ReaderPhase::Done, Event::Eof)),
                Ok(b) => Err(Stop::Error(malformed(format!("byte {b:#04x} where EOF belongs")))),
                Err(stop) => Err(stop),
            },
            ReaderPhase::Done => Err(Stop::Error(malformed("bytes after EOF"))),
        };
        match parsed {
            Ok((phase, event)) => {
                self.phase = phase;
                Ok(Step::Event { consumed: c.pos, event })
            }
            Err(Stop::Need(n)) => Ok(Step::NeedMore(n)),
            Err(Stop::Error(e)) => Err(e),
        }
    }

    fn header<'a>(&mut self, c: &mut Cursor<'a>) -> Result<(ReaderPhase, Event<'a>), Stop> {
        let magic = c.be32()?;
        if magic != QEMU_VM_FILE_MAGIC {
            return Err(StreamError::NotNative(format!("magic {magic:#010x}, not QEVM")).into());
        }
        let version = c.be32()?;
        if version != QEMU_VM_FILE_VERSION {
            return Err(StreamError::UnsupportedVersion { what: "QEVM stream", version, supported: QEMU_VM_FILE_VERSION }.into());
        }
        match c.u8()? {
            QEMU_VM_SECTION_START => {}
            QEMU_VM_CONFIGURATION => return Err(StreamError::NotNative("a QEMU stream (it has a configuration section)".into()).into()),
            b => return Err(StreamError::NotNative(format!("first section type {b:#04x}, not the ram START")).into()),
        }
        let (sid, idstr, instance, version) = c.section_header()?;
        if idstr != b"ram" {
            return Err(StreamError::NotNative(format!("first section {:?}, not ram", String::from_utf8_lossy(idstr))).into());
        }
        if version != RAM_SECTION_VERSION {
            return Err(StreamError::UnsupportedVersion { what: "ram section", version, supported: RAM_SECTION_VERSION }.into());
        }
        let v = c.be64()?;
        if v & FLAG_MASK != flags::MEM_SIZE {
            return Err(malformed(format!("ram START without the block list (flags {:#05x})", v & FLAG_MASK)).into());
        }
        let total = v & !FLAG_MASK;
        if total > self.limits.max_memory {
            return Err(StreamError::TooLarge { what: "guest memory", len: total, limit: self.limits.max_memory }.into());
        }
        let mut blocks: Vec<RamBlock> = Vec::new();
        let mut left = total;
        while left > 0 {
            if blocks.len() == MAX_BLOCKS {
                return Err(StreamError::TooLarge { what: "memory slot count", len: blocks.len() as u64 + 1, limit: MAX_BLOCKS as u64 }.into());
            }
            let n = usize::from(c.u8()?);
            let name = c.take(n)?;
            let len = c.be64()?;
            if len == 0 || len & FLAG_MASK != 0 || len > left {
                return Err(malformed(format!("block length {len} ({left} of the total left)")).into());
            }
            let block = RamBlock::parse_name(name, len).ok_or_else(|| StreamError::NotNative(format!("RAM block {:?} is not a ferry-native memory slot", String::from_utf8_lossy(name))))?;
            if blocks.iter().any(|b| b.slot == block.slot) {
                return Err(malformed(format!("slot {} listed twice", block.slot)).into());
            }
            blocks.push(block);
            left -= len;
        }
        if blocks.is_empty() {
            return Err(malformed("no memory slots").into());
        }
        if sid != RAM_SID || instance != 0 {
            return Err(malformed(format!("ram section id {sid} instance {instance} (a native stream's are 0)")).into());
        }
        if c.be64()? != flags::EOS {
            return Err(malformed("block list not followed by EOS").into());
        }
        self.blocks = blocks.clone();
        Ok((ReaderPhase::BetweenPasses, Event::Blocks(blocks)))
    }

    fn between_passes<'a>(&mut self, c: &mut Cursor<'a>) -> Result<(ReaderPhase, Event<'a>), Stop> {
        let kind = c.u8()?;
        let last = match kind {
            QEMU_VM_SECTION_PART => false,
            QEMU_VM_SECTION_END => true,
            QEMU_VM_SECTION_FULL => return Err(malformed("state section before the final pass").into()),
            b => return Err(malformed(format!("section type {b:#04x} between passes")).into()),
        };
        let sid = c.be32()?;
        if sid != RAM_SID {
            return Err(malformed(format!("section {sid} is not the ram section")).into());
        }
        self.last_block = None;
        Ok((ReaderPhase::InPass { last }, Event::PassStart { last }))
    }

    fn record<'a>(&mut self, c: &mut Cursor<'a>, last: bool) -> Result<(ReaderPhase, Event<'a>), Stop> {
        let v = c.be64()?;
        let f = v & FLAG_MASK;
        let offset = v & !FLAG_MASK;
        if f == flags::EOS {
            let next = if last { ReaderPhase::State } else { ReaderPhase::BetweenPasses };
            return Ok((next, Event::PassEnd));
        }
        let base = f & !flags::CONTINUE;
        if base != flags::PAGE && base != flags::ZERO {
            return Err(malformed(format!("RAM record flags {f:#05x}")).into());
        }
        let block = if f & flags::CONTINUE != 0 {
            self.last_block.ok_or_else(|| malformed("CONTINUE record before a block was named in this pass"))?
        } else {
            let n = usize::from(c.u8()?);
            let name = c.take(n)?;
            self.blocks.iter().position(|b| b.name().as_bytes() == name).ok_or_else(|| malformed(format!("record for unknown block {:?}", String::from_utf8_lossy(name))))?
        };
        if offset >= self.blocks[block].len {
            return Err(malformed(format!("page {offset:#x} beyond slot {} ({} bytes)", self.blocks[block].slot, self.blocks[block].len)).into());
        }
        let event = if base == flags::PAGE {
            Event::Page { block, offset, data: c.take(PAGE_SIZE)? }
        } else {
            match c.u8()? {
                0 => Event::Zero { block, offset },
                fill => return Err(malformed(format!("ZERO record with fill byte {fill:#04x}")).into()),
            }
        };
        self.last_block = Some(block);
        Ok((ReaderPhase::InPass { last }, event))
    }

    fn state<'a>(&mut self, c: &mut Cursor<'a>) -> Result<(ReaderPhase, Event<'a>), Stop> {
        match c.u8()? {
            QEMU_VM_SECTION_FULL => {}
            QEMU_VM_EOF => return Err(malformed("EOF without the ferry-native state section").into()),
            b => return Err(malformed(format!("section type {b:#04x} after the final pass")).into()),
        }
        let (sid, idstr, instance, version) = c.section_header()?;
        if idstr != NATIVE_SECTION.as_bytes() {
            return Err(StreamError::NotNative(format!("device section {:?}, not {NATIVE_SECTION:?}", String::from_utf8_lossy(idstr))).into());
        }
        if sid != NATIVE_SID || instance != 0 {
            return Err(malformed(format!("{NATIVE_SECTION} section id {sid} instance {instance}")).into());
        }
        if version != NATIVE_SECTION_VERSION {
            return Err(StreamError::UnsupportedVersion { what: "ferry-native section", version, supported: NATIVE_SECTION_VERSION }.into());
        }
        let len = c.be32()?;
        if len > self.limits.max_state {
            return Err(StreamError::TooLarge { what: "vCPU state", len: u64::from(len), limit: u64::from(self.limits.max_state) }.into());
        }
        Ok((ReaderPhase::Eof, Event::State(c.take(len as usize)?)))
    }
}

#[cfg(test)]
mod tests;
