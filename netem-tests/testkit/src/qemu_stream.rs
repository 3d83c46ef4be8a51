//! Synthetic QEMU 7.2 migration streams for codec and tunnel tests, built from the grammar in
//! `/work/shared/docs/qemu-migration-stream.md`: the precopy main channel ([`MainStream`]) and
//! multifd channels ([`MultifdStream`]), with page contents of known kinds ([`Content`]).

use crate::rng::Rng;

/// Guest page size of the streams (x86).
pub const PAGE_SIZE: usize = 4096;

/// Section id of the `ram` section in [`MainStream`].
const RAM_SID: u32 = 2;
/// Multifd magic and version (7.2).
const MULTIFD_MAGIC: u32 = 0x1122_3344;
const MULTIFD_VERSION: u32 = 1;
/// Multifd packet header size and page capacity (7.2 layout, 128 pages per packet).
const MULTIFD_HEADER_LEN: usize = 1344;
/// Pages a multifd packet carries at most.
pub const MULTIFD_PAGES_PER_PACKET: usize = 128;
/// Multifd packet flag: SYNC.
const MULTIFD_FLAG_SYNC: u32 = 1;

/// Page contents used by the builders.
#[derive(Clone, Copy, Debug)]
pub enum Content {
    /// All zero.
    Zero,
    /// One of a small set of repeated pages.
    Dup(u8),
    /// Fresh random bytes.
    Random,
    /// Compressible text-like page, unique.
    Text,
}

/// One page of kind `c` (random bytes drawn from `rng`).
pub fn page(rng: &mut Rng, c: Content) -> Vec<u8> {
    let mut p = vec![0u8; PAGE_SIZE];
    match c {
        Content::Zero => {}
        Content::Dup(i) => {
            for (j, b) in p.iter_mut().enumerate() {
                *b = (j as u8).wrapping_mul(i | 1).wrapping_add(i);
            }
        }
        Content::Random => rng.fill(&mut p),
        Content::Text => {
            let words: [&[u8]; 6] = [b"migration ", b"page ", b"ferry ", b"qemu ", b"0x1f ", b"\n"];
            let mut pos = 0;
            while pos < PAGE_SIZE {
                let w = words[rng.below(words.len())];
                let n = w.len().min(PAGE_SIZE - pos);
                p[pos..pos + n].copy_from_slice(&w[..n]);
                pos += n;
            }
        }
    }
    p
}

/// A distinct page numbered `i`: `i` little-endian in its first 4 bytes, zeros after.
pub fn numbered_page(i: u32) -> Vec<u8> {
    let mut p = vec![0u8; PAGE_SIZE];
    p[..4].copy_from_slice(&i.to_le_bytes());
    p
}

/// A main-channel stream of `pages` (one RAM record each, `pc.ram` from offset 0), then the
/// device tail and EOF.
pub fn main_stream_of(pages: &[Vec<u8>], rng: &mut Rng) -> Vec<u8> {
    let mut s = MainStream::new(&[]);
    s.ram_start(&[("pc.ram", 64 << 20)], false);
    s.part();
    for (i, p) in pages.iter().enumerate() {
        s.page("pc.ram", (i * PAGE_SIZE) as u64, p);
    }
    s.eos();
    s.end();
    s.eos();
    s.finish(rng);
    s.bytes
}

/// `n` pages of random bytes from `seed`.
pub fn random_pages(seed: u64, n: usize) -> Vec<Vec<u8>> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| page(&mut rng, Content::Random)).collect()
}

/// Builds a QEMU 7.2-style precopy main-channel stream.
#[derive(Clone, Debug)]
pub struct MainStream {
    /// The stream so far.
    pub bytes: Vec<u8>,
    last_block: Option<String>,
    /// Offset of the QEMU_VM_EOF byte, once written.
    pub eof_at: Option<usize>,
}

impl MainStream {
    /// Header (with the `configuration` capabilities section when `capabilities` is not empty),
    /// OPEN_RETURN_PATH and PING 1.
    pub fn new(capabilities: &[&str]) -> Self {
        let mut b = Vec::new();
        b.extend_from_slice(b"QEVM");
        b.extend_from_slice(&3u32.to_be_bytes());
        b.push(0x07);
        let name = b"pc-q35-7.2";
        b.extend_from_slice(&(name.len() as u32).to_be_bytes());
        b.extend_from_slice(name);
        if !capabilities.is_empty() {
            let sub = b"configuration/capabilities";
            b.push(0x05);
            b.push(sub.len() as u8);
            b.extend_from_slice(sub);
            b.extend_from_slice(&1u32.to_be_bytes());
            b.extend_from_slice(&(capabilities.len() as u32).to_be_bytes());
            for c in capabilities {
                b.push(c.len() as u8);
                b.extend_from_slice(c.as_bytes());
            }
        }
        let mut s = Self { bytes: b, last_block: None, eof_at: None };
        s.command(1, &[]); // OPEN_RETURN_PATH
        s.command(2, &1u32.to_be_bytes()); // PING 1
        s
    }

    /// A QEMU_VM_COMMAND `cmd` with `payload`.
    pub fn command(&mut self, cmd: u16, payload: &[u8]) {
        self.bytes.push(0x08);
        self.bytes.extend_from_slice(&cmd.to_be_bytes());
        self.bytes.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        self.bytes.extend_from_slice(payload);
    }

    /// A `QEMU_VM_SECTION_START`/`FULL`-style header (type `t`, section `sid`, `idstr`,
    /// instance 0, `version`), for tests that write sections the builder has no method for.
    pub fn section_full_header(&mut self, t: u8, sid: u32, idstr: &str, version: u32) {
        self.bytes.push(t);
        self.bytes.extend_from_slice(&sid.to_be_bytes());
        self.bytes.push(idstr.len() as u8);
        self.bytes.extend_from_slice(idstr.as_bytes());
        self.bytes.extend_from_slice(&0u32.to_be_bytes());
        self.bytes.extend_from_slice(&version.to_be_bytes());
    }

    fn footer(&mut self, sid: u32) {
        self.bytes.push(0x7e);
        self.bytes.extend_from_slice(&sid.to_be_bytes());
    }

    /// START ram with the MEM_SIZE block list, then EOS + footer.
    pub fn ram_start(&mut self, blocks: &[(&str, u64)], ignore_shared: bool) {
        self.section_full_header(0x01, RAM_SID, "ram", 4);
        let total: u64 = blocks.iter().map(|b| b.1).sum();
        self.bytes.extend_from_slice(&(total | 0x04).to_be_bytes());
        for (name, len) in blocks {
            self.bytes.push(name.len() as u8);
            self.bytes.extend_from_slice(name.as_bytes());
            self.bytes.extend_from_slice(&len.to_be_bytes());
            if ignore_shared {
                self.bytes.extend_from_slice(&0x1000_0000u64.to_be_bytes());
            }
        }
        self.eos();
    }

    /// A SECTION_PART header of the ram section.
    pub fn part(&mut self) {
        self.bytes.push(0x02);
        self.bytes.extend_from_slice(&RAM_SID.to_be_bytes());
    }

    /// A SECTION_END header of the ram section.
    pub fn end(&mut self) {
        self.bytes.push(0x03);
        self.bytes.extend_from_slice(&RAM_SID.to_be_bytes());
    }

    /// RAM_SAVE_FLAG_EOS and the ram section's footer.
    pub fn eos(&mut self) {
        self.bytes.extend_from_slice(&0x10u64.to_be_bytes());
        self.footer(RAM_SID);
    }

    fn record_header(&mut self, block: &str, offset: u64, flag: u64) {
        let cont = self.last_block.as_deref() == Some(block);
        let v = offset | flag | if cont { 0x20 } else { 0 };
        self.bytes.extend_from_slice(&v.to_be_bytes());
        if !cont {
            self.bytes.push(block.len() as u8);
            self.bytes.extend_from_slice(block.as_bytes());
            self.last_block = Some(block.to_string());
        }
    }

    /// A full page (RAM_SAVE_FLAG_PAGE) of `block` at `offset`.
    pub fn page(&mut self, block: &str, offset: u64, data: &[u8]) {
        self.record_header(block, offset, 0x08);
        self.bytes.extend_from_slice(data);
    }

    /// A zero page (RAM_SAVE_FLAG_ZERO) of `block` at `offset`.
    pub fn zero(&mut self, block: &str, offset: u64) {
        self.record_header(block, offset, 0x02);
        self.bytes.push(0);
    }

    /// RAM_SAVE_FLAG_MULTIFD_FLUSH.
    pub fn multifd_flush(&mut self) {
        self.bytes.extend_from_slice(&0x200u64.to_be_bytes());
    }

    /// Device state tail, EOF and VMDESCRIPTION.
    pub fn finish(&mut self, rng: &mut Rng) {
        // Device state deliberately contains bytes that look like section types and footers.
        for (i, name) in ["timer", "cpu_common", "apic"].iter().enumerate() {
            self.section_full_header(0x04, 10 + i as u32, name, 1);
            let mut body = vec![0u8; 200 + rng.below(3000)];
            rng.fill(&mut body);
            body[0] = 0x7e;
            body[5] = 0x00;
            self.bytes.extend_from_slice(&body);
            self.footer(10 + i as u32);
        }
        self.eof_at = Some(self.bytes.len());
        self.bytes.push(0x00);
        let json = br#"{"page_size": 4096, "devices": [{"name": "timer"}]}"#;
        self.bytes.push(0x06);
        self.bytes.extend_from_slice(&(json.len() as u32).to_be_bytes());
        self.bytes.extend_from_slice(json);
    }
}

/// A main-channel stream with every record kind: several blocks, zero, duplicate, random and
/// text pages, CONTINUE and block switches, MULTIFD_FLUSH, device sections, EOF + VMDESCRIPTION.
pub fn sample_main_stream(seed: u64, pages: usize) -> MainStream {
    let mut rng = Rng::new(seed);
    let mut s = MainStream::new(&[]);
    s.ram_start(&[("pc.ram", 64 << 20), ("pc.bios", 256 << 10), ("/rom@etc/acpi/tables", 128 << 10)], false);
    let mut off = 0u64;
    for round in 0..3 {
        s.part();
        for i in 0..pages / 3 {
            let block = if i % 17 == 5 { "pc.bios" } else { "pc.ram" };
            let c = match rng.below(10) {
                0..=2 => Content::Zero,
                3..=5 => Content::Dup(rng.below(8) as u8),
                6..=7 => Content::Random,
                _ => Content::Text,
            };
            if i % 5 == 0 {
                s.zero(block, off);
            } else {
                let p = page(&mut rng, c);
                s.page(block, off, &p);
            }
            off = (off + PAGE_SIZE as u64) % (64 << 20);
        }
        if round == 1 {
            s.multifd_flush();
        }
        s.eos();
    }
    s.end();
    let p = page(&mut rng, Content::Random);
    s.page("pc.ram", 0, &p);
    s.eos();
    s.finish(&mut rng);
    s
}

/// Builds a QEMU 7.2 multifd channel: the 64-byte init packet, then packets of a 1344-byte
/// header and up to 128 raw pages of `pc.ram`.
#[derive(Clone, Debug)]
pub struct MultifdStream {
    /// The stream so far.
    pub bytes: Vec<u8>,
}

impl Default for MultifdStream {
    fn default() -> Self {
        Self::new()
    }
}

impl MultifdStream {
    /// A channel with its init packet (channel id 1).
    pub fn new() -> Self {
        let mut b = Vec::new();
        b.extend_from_slice(&MULTIFD_MAGIC.to_be_bytes());
        b.extend_from_slice(&MULTIFD_VERSION.to_be_bytes());
        b.extend_from_slice(&[0xab; 16]);
        b.push(1);
        b.extend_from_slice(&[0; 39]);
        Self { bytes: b }
    }

    fn header(&mut self, packet_num: u64, flags: u32, normal: u32, next_packet_size: u32, first_offset: u64) {
        let mut h = vec![0u8; MULTIFD_HEADER_LEN];
        h[0..4].copy_from_slice(&MULTIFD_MAGIC.to_be_bytes());
        h[4..8].copy_from_slice(&MULTIFD_VERSION.to_be_bytes());
        h[8..12].copy_from_slice(&flags.to_be_bytes());
        h[12..16].copy_from_slice(&(MULTIFD_PAGES_PER_PACKET as u32).to_be_bytes());
        h[16..20].copy_from_slice(&normal.to_be_bytes());
        h[20..24].copy_from_slice(&next_packet_size.to_be_bytes());
        h[24..32].copy_from_slice(&packet_num.to_be_bytes());
        h[64..70].copy_from_slice(b"pc.ram");
        for i in 0..normal as usize {
            let offset = first_offset + (i * PAGE_SIZE) as u64;
            h[320 + 8 * i..328 + 8 * i].copy_from_slice(&offset.to_be_bytes());
        }
        self.bytes.extend_from_slice(&h);
    }

    /// A packet numbered `packet_num` carrying `pages` (at most 128) at consecutive offsets
    /// from `first_offset`.
    ///
    /// # Panics
    /// With more than [`MULTIFD_PAGES_PER_PACKET`] pages.
    pub fn pages(&mut self, packet_num: u64, first_offset: u64, pages: &[Vec<u8>]) {
        assert!(pages.len() <= MULTIFD_PAGES_PER_PACKET, "a multifd packet holds at most 128 pages");
        let normal = pages.len() as u32;
        self.header(packet_num, 0, normal, normal * PAGE_SIZE as u32, first_offset);
        for p in pages {
            self.bytes.extend_from_slice(p);
        }
    }

    /// A SYNC packet numbered `packet_num` without pages, with the (stale) `next_packet_size`.
    pub fn sync(&mut self, packet_num: u64, next_packet_size: u32) {
        self.header(packet_num, MULTIFD_FLAG_SYNC, 0, next_packet_size, 0);
    }

    /// The stream.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}

/// A multifd channel carrying `pages` in order, 128 per packet (packet `n` at offset
/// `n * 128` pages), so the codec parses it page by page.
pub fn multifd_stream(pages: &[Vec<u8>]) -> Vec<u8> {
    let mut s = MultifdStream::new();
    for (n, packet) in pages.chunks(MULTIFD_PAGES_PER_PACKET).enumerate() {
        s.pages(n as u64, (n * MULTIFD_PAGES_PER_PACKET * PAGE_SIZE) as u64, packet);
    }
    s.into_bytes()
}

/// A multifd channel of `packets` packets with `1..=128` pages of `contents` each, every fourth
/// a SYNC packet carrying a stale `next_packet_size` and no payload.
pub fn sample_multifd_stream(seed: u64, packets: usize, contents: &[Content]) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut s = MultifdStream::new();
    for n in 0..packets {
        let packet_num = n as u64 * 2;
        if n % 4 == 3 {
            s.sync(packet_num, 25854);
            continue;
        }
        let normal = 1 + rng.below(MULTIFD_PAGES_PER_PACKET);
        let pages: Vec<Vec<u8>> = (0..normal)
            .map(|_| {
                let c = contents[rng.below(contents.len())];
                page(&mut rng, c)
            })
            .collect();
        s.pages(packet_num, (n * MULTIFD_PAGES_PER_PACKET * PAGE_SIZE) as u64, &pages);
    }
    s.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multifd_layout_matches_qemu_7_2() {
        let pages = random_pages(1, 130);
        let s = multifd_stream(&pages);
        assert_eq!(s.len(), 64 + 2 * MULTIFD_HEADER_LEN + 130 * PAGE_SIZE);
        assert_eq!(&s[0..4], &MULTIFD_MAGIC.to_be_bytes());
        let second = 64 + MULTIFD_HEADER_LEN + 128 * PAGE_SIZE;
        assert_eq!(&s[second + 16..second + 20], &2u32.to_be_bytes());
        assert_eq!(&s[second + 24..second + 32], &1u64.to_be_bytes());
        assert_eq!(&s[second + 320..second + 328], &(128 * PAGE_SIZE as u64).to_be_bytes());
        assert_eq!(&s[second + MULTIFD_HEADER_LEN..second + MULTIFD_HEADER_LEN + PAGE_SIZE], pages[128].as_slice());
    }

    #[test]
    fn sample_streams_are_reproducible() {
        assert_eq!(sample_main_stream(5, 60).bytes, sample_main_stream(5, 60).bytes);
        let contents = [Content::Zero, Content::Random, Content::Text, Content::Dup(3)];
        assert_eq!(sample_multifd_stream(5, 8, &contents), sample_multifd_stream(5, 8, &contents));
    }

    #[test]
    fn main_stream_ends_with_eof_and_vmdescription() {
        let s = sample_main_stream(2, 30);
        let eof = s.eof_at.expect("finished");
        assert_eq!(s.bytes[eof], 0x00);
        assert_eq!(s.bytes[eof + 1], 0x06);
        assert!(s.bytes.starts_with(b"QEVM"));
    }
}
