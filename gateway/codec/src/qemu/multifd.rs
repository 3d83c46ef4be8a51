//! Tokenizer for QEMU multifd channels (compression `none`).
//!
//! Layout (doc §3): a 64-byte `MultiFDInit_t`, then packets of a fixed 1344-byte
//! `MultiFDPacket_t` header (x86: 128 page slots) followed by `normal_pages × 4096` bytes of raw
//! pages. The header is verbatim (offsets, block name, packet number); the pages become
//! [`Token::Page`]s. The same rule covers 7.2 and 9.x/10.x: payload bytes = `normal_pages × 4096`
//! (7.2 SYNC packets with `normal_pages = 0` carry a stale `next_packet_size` and no payload; 10.x
//! zero pages carry no bytes).
//!
//! Opaque triggers: bad magic/version, any compression flag (zlib/zstd/qpl/uadk/qatzip compress
//! per channel with persistent state), device-state packets (flag 0x40), unknown flags, a page-slot
//! count other than 128 (another target page size), `normal + zero > 128`, or a
//! `next_packet_size` that disagrees with `normal_pages × 4096`.

use super::{be32, Token, Tokenizer};
use crate::PAGE_SIZE;

/// `MULTIFD_MAGIC`.
pub const MULTIFD_MAGIC: u32 = 0x1122_3344;
/// `MULTIFD_VERSION`.
pub const MULTIFD_VERSION: u32 = 1;
/// `sizeof(MultiFDInit_t)`.
pub const INIT_LEN: usize = 64;
/// Page slots per packet on x86 (512 KiB / 4 KiB).
pub const PAGE_SLOTS: u32 = 128;
/// Fixed header length: 64 fixed bytes + 256-byte ramblock name + 8 × slots.
pub const PACKET_HEADER_LEN: usize = 64 + 256 + 8 * PAGE_SLOTS as usize;

const FLAG_SYNC: u32 = 0x01;
const FLAG_COMPRESSION_MASK: u32 = 0x3e;
const FLAG_DEVICE_STATE: u32 = 0x40;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Init,
    Header,
    Pages { left: u32 },
}

/// Tokenizer for one multifd channel.
#[derive(Debug, Clone)]
pub struct MultifdTokenizer {
    state: State,
}

impl Default for MultifdTokenizer {
    fn default() -> Self {
        Self::new()
    }
}

impl MultifdTokenizer {
    /// A tokenizer expecting `MultiFDInit_t`.
    pub fn new() -> Self {
        Self { state: State::Init }
    }
}

impl Tokenizer for MultifdTokenizer {
    fn next_token(&mut self, data: &[u8]) -> Token {
        match self.state {
            State::Init => {
                if data.len() < INIT_LEN {
                    return Token::NeedMore(INIT_LEN);
                }
                if be32(data, 0) != MULTIFD_MAGIC {
                    return Token::Opaque("not a multifd channel".into());
                }
                let v = be32(data, 4);
                if v != MULTIFD_VERSION {
                    return Token::Opaque(format!("multifd version {v}"));
                }
                self.state = State::Header;
                Token::Verbatim(INIT_LEN)
            }
            State::Header => {
                if data.len() < PACKET_HEADER_LEN {
                    return Token::NeedMore(PACKET_HEADER_LEN);
                }
                if be32(data, 0) != MULTIFD_MAGIC {
                    return Token::Opaque("multifd packet with bad magic".into());
                }
                let version = be32(data, 4);
                if version != MULTIFD_VERSION {
                    return Token::Opaque(format!("multifd packet version {version}"));
                }
                let flags = be32(data, 8);
                if flags & FLAG_COMPRESSION_MASK != 0 {
                    return Token::Opaque(format!("QEMU-side multifd compression (flags {flags:#x})"));
                }
                if flags & FLAG_DEVICE_STATE != 0 {
                    return Token::Opaque("multifd device-state packet".into());
                }
                if flags & !FLAG_SYNC != 0 {
                    return Token::Opaque(format!("unknown multifd flags {flags:#x}"));
                }
                let pages_alloc = be32(data, 12);
                let normal = be32(data, 16);
                let next_size = be32(data, 20);
                // 7.2 leaves this word zero (unused[0]); 9.0+ puts zero_pages here.
                let zero = be32(data, 32);
                if pages_alloc != PAGE_SLOTS && pages_alloc != 0 {
                    return Token::Opaque(format!("multifd packet with {pages_alloc} page slots (not 4 KiB pages?)"));
                }
                if u64::from(normal) + u64::from(zero) > u64::from(PAGE_SLOTS) {
                    return Token::Opaque(format!("multifd packet with {normal} normal + {zero} zero pages"));
                }
                if normal > 0 && u64::from(next_size) != u64::from(normal) * PAGE_SIZE as u64 {
                    return Token::Opaque(format!("multifd payload size {next_size} for {normal} pages"));
                }
                self.state = if normal > 0 { State::Pages { left: normal } } else { State::Header };
                Token::Verbatim(PACKET_HEADER_LEN)
            }
            State::Pages { left } => {
                if data.len() < PAGE_SIZE {
                    return Token::NeedMore(PAGE_SIZE);
                }
                self.state = if left > 1 { State::Pages { left: left - 1 } } else { State::Header };
                Token::Page
            }
        }
    }
}
