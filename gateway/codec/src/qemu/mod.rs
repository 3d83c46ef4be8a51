//! Incremental tokenizers for QEMU migration channels.
//!
//! A tokenizer does not copy or transform anything: it looks at the bytes the encoder has
//! buffered and says what the next bytes *are* — a verbatim run (headers, names, offsets, device
//! state…) or one 4 KiB page payload — or that it needs more bytes to decide, or that it cannot
//! follow the stream (then the encoder switches the connection to opaque mode). Needing more bytes
//! is not an error (mini-redis style two-phase parsing): the tokenizer's state only advances when it
//! returns a token, so the same bytes can be offered again later with more appended.

pub mod main_channel;
pub mod multifd;

/// What the next bytes of a channel are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Token {
    /// The next `n` (≥ 1, ≤ offered) bytes travel verbatim.
    Verbatim(usize),
    /// The next [`PAGE_SIZE`](crate::PAGE_SIZE) bytes are one guest page.
    Page,
    /// At least this many bytes (counted from the start of the offered slice) are needed.
    NeedMore(usize),
    /// The tokenizer cannot follow the stream from here on; nothing was consumed.
    Opaque(String),
}

/// A channel tokenizer.
pub trait Tokenizer {
    /// Classifies the start of `data` (never empty). See [`Token`].
    fn next_token(&mut self, data: &[u8]) -> Token;
    /// True once the tokenizer is in a pass-through tail (everything left is verbatim by design).
    fn in_tail(&self) -> bool {
        false
    }
}

pub(crate) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}
