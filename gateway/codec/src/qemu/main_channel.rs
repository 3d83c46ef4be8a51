//! Tokenizer for the QEMU main migration channel (`QEVM`, version 3).
//!
//! Follows the grammar of `/work/shared/docs/qemu-migration-stream.md` §2: file header,
//! CONFIGURATION (with its subsections), COMMANDs, and the `ram` iterable section's records
//! (MEM_SIZE block list, ZERO, PAGE, EOS, MULTIFD_FLUSH, CONTINUE). PAGE payloads become
//! [`Token::Page`]; everything else is verbatim.
//!
//! Delimiting non-RAM content, which QEMU does not length-prefix:
//! * the first `FULL` section after the `ram` section's END (or `QEMU_VM_EOF`) starts the
//!   device-state *tail*: everything after it is verbatim until the source closes. Nothing
//!   RAM-related follows in precopy, so nothing is lost;
//! * anything else this parser can't follow exactly → [`Token::Opaque`] with a reason: a START of
//!   an iterable other than `ram` (dirty-bitmap, block, vfio), a FULL section before RAM completed
//!   (8.0+ early-setup virtio-mem), postcopy (POSTCOPY_ADVISE with a page-size payload, PACKAGED,
//!   other postcopy commands), COLO, xbzrle/compress/RDMA-hook records, a target page size other than
//!   4 KiB, the `mapped-ram` capability (9.0+ file format), unknown configuration subsections,
//!   unknown commands or section types.
//!
//! Section footers (`7e be32 section_id`) are optional (property `send-section-footer`); a footer is
//! recognised by its `0x7e` byte, which is never a top-level section type.

use super::{be16, be32, be64, Token, Tokenizer};
use crate::PAGE_SIZE;

/// "QEVM".
pub const QEMU_VM_FILE_MAGIC: u32 = 0x5145_564d;
/// Main channel stream version.
pub const QEMU_VM_FILE_VERSION: u32 = 3;

const QEMU_VM_EOF: u8 = 0x00;
const QEMU_VM_SECTION_START: u8 = 0x01;
const QEMU_VM_SECTION_PART: u8 = 0x02;
const QEMU_VM_SECTION_END: u8 = 0x03;
const QEMU_VM_SECTION_FULL: u8 = 0x04;
const QEMU_VM_SUBSECTION: u8 = 0x05;
const QEMU_VM_CONFIGURATION: u8 = 0x07;
const QEMU_VM_COMMAND: u8 = 0x08;
const QEMU_VM_SECTION_FOOTER: u8 = 0x7e;

const MIG_CMD_OPEN_RETURN_PATH: u16 = 1;
const MIG_CMD_PING: u16 = 2;
const MIG_CMD_POSTCOPY_ADVISE: u16 = 3;
const MIG_CMD_SWITCHOVER_START: u16 = 11;

/// RAM record flags (low 12 bits of the record's be64, x86 target page size).
pub mod flags {
    /// Zero page: one fill byte follows.
    pub const ZERO: u64 = 0x002;
    /// Block list (first record of the setup section).
    pub const MEM_SIZE: u64 = 0x004;
    /// Full page follows.
    pub const PAGE: u64 = 0x008;
    /// End of section body.
    pub const EOS: u64 = 0x010;
    /// Same block as the previous record: no idstr.
    pub const CONTINUE: u64 = 0x020;
    /// XBZRLE delta (unsupported → opaque).
    pub const XBZRLE: u64 = 0x040;
    /// RDMA hook (unsupported → opaque).
    pub const HOOK: u64 = 0x080;
    /// Compressed page (unsupported → opaque).
    pub const COMPRESS_PAGE: u64 = 0x100;
    /// Multifd sync barrier (8.1+), no payload.
    pub const MULTIFD_FLUSH: u64 = 0x200;
}

const FLAG_MASK: u64 = (PAGE_SIZE as u64) - 1;

/// Where to go after skipping verbatim bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resume {
    TopLevel,
    ConfigSubsections,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// 8-byte file header.
    Header,
    /// CONFIGURATION or first top-level record.
    AfterHeader,
    /// `0x05` subsections of the CONFIGURATION, or the first top-level byte.
    ConfigSubsections,
    /// Capability names left in `configuration/capabilities`.
    Capabilities { left: u32 },
    /// Verbatim bytes to pass, then resume.
    Skip { left: u64, then: Resume },
    /// Top-level record type.
    TopLevel,
    /// RAM record header.
    RamRecord { is_end: bool },
    /// The page payload of a PAGE record.
    RamPage { is_end: bool },
    /// MEM_SIZE block list: bytes of RAM not yet described by block entries.
    MemBlocks { left: u64, is_end: bool },
    /// Optional footer after a RAM section body.
    Footer { is_end: bool },
    /// Device-state tail / after EOF: verbatim to the end.
    Tail,
}

/// Tokenizer for the main channel. See the module docs.
#[derive(Debug, Clone)]
pub struct MainChannelTokenizer {
    state: State,
    ram_sid: Option<u32>,
    ram_done: bool,
    x_ignore_shared: bool,
    /// A RAM block has been named on this channel (CONTINUE records refer to it).
    have_block: bool,
}

impl Default for MainChannelTokenizer {
    fn default() -> Self {
        Self::new()
    }
}

impl MainChannelTokenizer {
    /// A tokenizer expecting the 8-byte file header.
    pub fn new() -> Self {
        Self { state: State::Header, ram_sid: None, ram_done: false, x_ignore_shared: false, have_block: false }
    }

    /// Parses a RAM page header (`be64` + optional `u8 len, idstr`), returning its length.
    fn page_header_len(&mut self, data: &[u8], cont: bool) -> Result<usize, Token> {
        if cont {
            if !self.have_block {
                return Err(Token::Opaque("RAM record with CONTINUE before any block was named".into()));
            }
            return Ok(8);
        }
        let Some(&len) = data.get(8) else {
            return Err(Token::NeedMore(9));
        };
        if len == 0 {
            return Err(Token::Opaque("RAM record with empty block name".into()));
        }
        Ok(9 + usize::from(len))
    }

    fn top_level(&mut self, data: &[u8]) -> Token {
        let t = data[0];
        match t {
            QEMU_VM_EOF => {
                self.state = State::Tail;
                Token::Verbatim(1)
            }
            QEMU_VM_COMMAND => {
                if data.len() < 5 {
                    return Token::NeedMore(5);
                }
                let cmd = be16(data, 1);
                let len = be16(data, 3);
                match cmd {
                    MIG_CMD_OPEN_RETURN_PATH | MIG_CMD_PING | MIG_CMD_SWITCHOVER_START => {}
                    // len 0 = dirty-bitmaps only; len 16 = postcopy-ram, which changes the
                    // MEM_SIZE grammar and moves pages to other channels.
                    MIG_CMD_POSTCOPY_ADVISE if len == 0 => {}
                    MIG_CMD_POSTCOPY_ADVISE => return Token::Opaque("postcopy-ram (POSTCOPY_ADVISE)".into()),
                    4..=7 | 9 | 10 => return Token::Opaque(format!("postcopy command {cmd}")),
                    8 => return Token::Opaque("COLO (ENABLE_COLO)".into()),
                    _ => return Token::Opaque(format!("unknown migration command {cmd}")),
                }
                self.state = State::Skip { left: u64::from(len), then: Resume::TopLevel };
                Token::Verbatim(5)
            }
            QEMU_VM_SECTION_START | QEMU_VM_SECTION_FULL => {
                if data.len() < 6 {
                    return Token::NeedMore(6);
                }
                let sid = be32(data, 1);
                let n = usize::from(data[5]);
                let hdr = 6 + n + 8;
                if data.len() < hdr {
                    return Token::NeedMore(hdr);
                }
                let idstr = &data[6..6 + n];
                let version = be32(data, 6 + n + 4);
                let name = String::from_utf8_lossy(idstr);
                if t == QEMU_VM_SECTION_FULL {
                    if self.ram_done {
                        self.state = State::Tail;
                        return Token::Verbatim(data.len());
                    }
                    return Token::Opaque(format!("device-state section {name:?} before RAM completed"));
                }
                if idstr != b"ram" {
                    return Token::Opaque(format!("iterable section {name:?} not supported"));
                }
                if version != 4 {
                    return Token::Opaque(format!("ram section version {version}"));
                }
                if self.ram_sid.is_some() {
                    return Token::Opaque("second ram START section".into());
                }
                self.ram_sid = Some(sid);
                self.state = State::RamRecord { is_end: false };
                Token::Verbatim(hdr)
            }
            QEMU_VM_SECTION_PART | QEMU_VM_SECTION_END => {
                if data.len() < 5 {
                    return Token::NeedMore(5);
                }
                let sid = be32(data, 1);
                if self.ram_sid != Some(sid) || self.ram_done {
                    return Token::Opaque(format!("section {sid} is not an open ram section"));
                }
                self.state = State::RamRecord { is_end: t == QEMU_VM_SECTION_END };
                Token::Verbatim(5)
            }
            other => Token::Opaque(format!("unexpected top-level byte {other:#04x}")),
        }
    }

    fn ram_record(&mut self, data: &[u8], is_end: bool) -> Token {
        if data.len() < 8 {
            return Token::NeedMore(8);
        }
        let v = be64(data, 0);
        let f = v & FLAG_MASK;
        let cont = f & flags::CONTINUE != 0;
        let base = f & !flags::CONTINUE;
        match base {
            flags::ZERO | flags::PAGE => {
                let hdr = match self.page_header_len(data, cont) {
                    Ok(h) => h,
                    Err(t) => return t,
                };
                if base == flags::ZERO {
                    // header + fill byte
                    if data.len() < hdr + 1 {
                        return Token::NeedMore(hdr + 1);
                    }
                    self.have_block = true;
                    return Token::Verbatim(hdr + 1);
                }
                if data.len() < hdr {
                    return Token::NeedMore(hdr);
                }
                self.have_block = true;
                self.state = State::RamPage { is_end };
                Token::Verbatim(hdr)
            }
            flags::MEM_SIZE if !cont => {
                self.state = State::MemBlocks { left: v & !FLAG_MASK, is_end };
                Token::Verbatim(8)
            }
            flags::EOS if !cont => {
                self.state = State::Footer { is_end };
                Token::Verbatim(8)
            }
            flags::MULTIFD_FLUSH if !cont => Token::Verbatim(8),
            _ => {
                let what = if base & flags::XBZRLE != 0 {
                    "XBZRLE"
                } else if base & flags::COMPRESS_PAGE != 0 {
                    "compressed page (capability compress)"
                } else if base & flags::HOOK != 0 {
                    "RDMA hook"
                } else {
                    "unknown"
                };
                Token::Opaque(format!("{what} RAM record, flags {f:#05x}"))
            }
        }
    }

    fn config_subsection(&mut self, data: &[u8]) -> Token {
        if data.len() < 2 {
            return Token::NeedMore(2);
        }
        let n = usize::from(data[1]);
        let hdr = 2 + n + 4;
        if data.len() < hdr {
            return Token::NeedMore(hdr);
        }
        let name = &data[2..2 + n];
        match name {
            b"configuration/target-page-bits" => {
                if data.len() < hdr + 4 {
                    return Token::NeedMore(hdr + 4);
                }
                let bits = be32(data, hdr);
                if 1u64.checked_shl(bits) != Some(PAGE_SIZE as u64) {
                    return Token::Opaque(format!("target page bits {bits} (only 4 KiB pages are followed)"));
                }
                Token::Verbatim(hdr + 4)
            }
            b"configuration/capabilities" => {
                if data.len() < hdr + 4 {
                    return Token::NeedMore(hdr + 4);
                }
                self.state = State::Capabilities { left: be32(data, hdr) };
                Token::Verbatim(hdr + 4)
            }
            b"configuration/uuid" => {
                self.state = State::Skip { left: 16, then: Resume::ConfigSubsections };
                Token::Verbatim(hdr)
            }
            other => Token::Opaque(format!("unknown configuration subsection {:?}", String::from_utf8_lossy(other))),
        }
    }
}

impl Tokenizer for MainChannelTokenizer {
    fn in_tail(&self) -> bool {
        self.state == State::Tail
    }

    fn next_token(&mut self, data: &[u8]) -> Token {
        debug_assert!(!data.is_empty());
        loop {
            match self.state {
                State::Header => {
                    if data.len() < 8 {
                        return Token::NeedMore(8);
                    }
                    if be32(data, 0) != QEMU_VM_FILE_MAGIC {
                        return Token::Opaque("not a QEMU main channel".into());
                    }
                    let v = be32(data, 4);
                    if v != QEMU_VM_FILE_VERSION {
                        return Token::Opaque(format!("QEMU stream version {v}"));
                    }
                    self.state = State::AfterHeader;
                    return Token::Verbatim(8);
                }
                State::AfterHeader => {
                    if data[0] != QEMU_VM_CONFIGURATION {
                        self.state = State::TopLevel;
                        continue;
                    }
                    if data.len() < 5 {
                        return Token::NeedMore(5);
                    }
                    let len = be32(data, 1);
                    self.state = State::Skip { left: u64::from(len), then: Resume::ConfigSubsections };
                    return Token::Verbatim(5);
                }
                State::ConfigSubsections => {
                    if data[0] != QEMU_VM_SUBSECTION {
                        self.state = State::TopLevel;
                        continue;
                    }
                    return self.config_subsection(data);
                }
                State::Capabilities { left } => {
                    if left == 0 {
                        self.state = State::ConfigSubsections;
                        continue;
                    }
                    let n = 1 + usize::from(data[0]);
                    if data.len() < n {
                        return Token::NeedMore(n);
                    }
                    match &data[1..n] {
                        b"x-ignore-shared" => self.x_ignore_shared = true,
                        // QEMU 9.0+ file migration: RAM at fixed file offsets, a
                        // MappedRamHeader per block in MEM_SIZE, pages outside the stream.
                        // QEMU refuses it on sockets; should it ever come, pass it through.
                        b"mapped-ram" => return Token::Opaque("capability mapped-ram".into()),
                        _ => {}
                    }
                    self.state = State::Capabilities { left: left - 1 };
                    return Token::Verbatim(n);
                }
                State::Skip { left, then } => {
                    if left == 0 {
                        self.state = match then {
                            Resume::TopLevel => State::TopLevel,
                            Resume::ConfigSubsections => State::ConfigSubsections,
                        };
                        continue;
                    }
                    let n = (data.len() as u64).min(left);
                    self.state = State::Skip { left: left - n, then };
                    return Token::Verbatim(n as usize);
                }
                State::TopLevel => return self.top_level(data),
                State::RamRecord { is_end } => return self.ram_record(data, is_end),
                State::RamPage { is_end } => {
                    if data.len() < PAGE_SIZE {
                        return Token::NeedMore(PAGE_SIZE);
                    }
                    self.state = State::RamRecord { is_end };
                    return Token::Page;
                }
                State::MemBlocks { left, is_end } => {
                    if left == 0 {
                        self.state = State::RamRecord { is_end };
                        continue;
                    }
                    let n = usize::from(data[0]);
                    let entry = 1 + n + 8 + if self.x_ignore_shared { 8 } else { 0 };
                    if data.len() < entry {
                        return Token::NeedMore(entry);
                    }
                    let used = be64(data, 1 + n);
                    if n == 0 || used > left {
                        return Token::Opaque(format!("inconsistent MEM_SIZE block list (block length {used}, {left} left)"));
                    }
                    self.state = State::MemBlocks { left: left - used, is_end };
                    return Token::Verbatim(entry);
                }
                State::Footer { is_end } => {
                    if data[0] == QEMU_VM_SECTION_FOOTER {
                        if data.len() < 5 {
                            return Token::NeedMore(5);
                        }
                        let sid = be32(data, 1);
                        if Some(sid) != self.ram_sid {
                            return Token::Opaque(format!("section footer for {sid} inside ram section"));
                        }
                    }
                    self.ram_done |= is_end;
                    self.state = State::TopLevel;
                    if data[0] == QEMU_VM_SECTION_FOOTER {
                        return Token::Verbatim(5);
                    }
                    continue;
                }
                State::Tail => return Token::Verbatim(data.len()),
            }
        }
    }
}
