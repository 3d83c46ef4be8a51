//! Counting a guest's RAM pages by content: zero, distinct, duplicate, and
//! shared with another guest. Explains what a page-dedup codec can gain.

use std::collections::HashMap;

use super::{Qemu, QemuError, Result};

const PAGE: usize = 4096;

/// A guest's RAM pages (4 KiB, from `dump-guest-memory`) counted by content.
#[derive(Debug, Clone, Default)]
pub struct PageCensus {
    /// Pages of RAM.
    pub pages: u64,
    /// All-zero pages.
    pub zero: u64,
    /// Non-zero pages by content (first 16 bytes of the blake3 hash) → how many.
    pub counts: HashMap<[u8; 16], u32>,
}

impl PageCensus {
    /// Non-zero pages.
    pub fn nonzero(&self) -> u64 {
        self.pages - self.zero
    }

    /// Distinct non-zero contents.
    pub fn distinct(&self) -> u64 {
        self.counts.len() as u64
    }

    /// Non-zero pages that repeat a content seen elsewhere in the same RAM
    /// (`nonzero - distinct`).
    pub fn duplicates(&self) -> u64 {
        self.nonzero() - self.distinct()
    }

    /// Non-zero pages of `self` whose content also occurs in `other`.
    pub fn shared_with(&self, other: &PageCensus) -> u64 {
        self.counts
            .iter()
            .filter(|(h, _)| other.counts.contains_key(*h))
            .map(|(_, &n)| u64::from(n))
            .sum()
    }

    /// Counts the pages of an ELF core file's `PT_LOAD` segments (what
    /// `dump-guest-memory` writes).
    pub fn from_elf(data: &[u8]) -> Result<PageCensus> {
        let bad = |what: &str| QemuError::Protocol(format!("guest memory dump: {what}"));
        if data.len() < 64 || &data[..4] != b"\x7fELF" {
            return Err(bad("not an ELF file"));
        }
        let u16_at = |o: usize| u16::from_le_bytes([data[o], data[o + 1]]) as usize;
        let u32_at = |o: usize| u32::from_le_bytes(data[o..o + 4].try_into().unwrap_or([0; 4]));
        let u64_at = |o: usize| u64::from_le_bytes(data[o..o + 8].try_into().unwrap_or([0; 8]));
        let elf64 = match data[4] {
            1 => false,
            2 => true,
            _ => return Err(bad("unknown ELF class")),
        };
        let (phoff, phentsize, phnum) = if elf64 {
            (u64_at(0x20) as usize, u16_at(0x36), u16_at(0x38))
        } else {
            (u32_at(0x1c) as usize, u16_at(0x2a), u16_at(0x2c))
        };
        let mut census = PageCensus::default();
        for i in 0..phnum {
            let ph = phoff + i * phentsize;
            if ph + phentsize > data.len() {
                return Err(bad("program header out of bounds"));
            }
            if u32_at(ph) != 1 {
                continue; // not PT_LOAD
            }
            let (off, size) = if elf64 {
                (u64_at(ph + 8) as usize, u64_at(ph + 32) as usize)
            } else {
                (u32_at(ph + 4) as usize, u32_at(ph + 16) as usize)
            };
            let seg = data
                .get(off..off.saturating_add(size))
                .ok_or_else(|| bad("segment out of bounds"))?;
            for page in seg.chunks(PAGE) {
                census.pages += 1;
                if page.iter().all(|&b| b == 0) {
                    census.zero += 1;
                } else {
                    let mut h = [0u8; 16];
                    h.copy_from_slice(&blake3::hash(page).as_bytes()[..16]);
                    *census.counts.entry(h).or_default() += 1;
                }
            }
        }
        Ok(census)
    }

    /// Dumps `vm`'s RAM with QMP `dump-guest-memory` (the VM pauses for the
    /// dump and resumes if it was running) into its work directory and counts
    /// it. About a second for 256 MiB.
    pub fn of_vm(vm: &mut Qemu) -> Result<PageCensus> {
        let path = vm.workdir().join("census.core");
        vm.qmp()
            .dump_guest_memory(&format!("file:{}", path.display()))?;
        let data = std::fs::read(&path)
            .map_err(|e| QemuError::io(format!("reading {}", path.display()), e))?;
        let _ = std::fs::remove_file(&path);
        PageCensus::from_elf(&data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 core with one PT_LOAD of `pages`.
    fn elf64(pages: &[[u8; PAGE]]) -> Vec<u8> {
        let mut f = vec![0u8; 64 + 56];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        f[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        f[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        let ph = 64;
        f[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
        f[ph + 8..ph + 16].copy_from_slice(&120u64.to_le_bytes());
        f[ph + 32..ph + 40].copy_from_slice(&((pages.len() * PAGE) as u64).to_le_bytes());
        for p in pages {
            f.extend_from_slice(p);
        }
        f
    }

    #[test]
    fn counts_zero_distinct_duplicate_and_shared() {
        let z = [0u8; PAGE];
        let a = [1u8; PAGE];
        let b = [2u8; PAGE];
        let c = PageCensus::from_elf(&elf64(&[z, a, a, b, z, a])).unwrap();
        assert_eq!(
            (c.pages, c.zero, c.nonzero(), c.distinct(), c.duplicates()),
            (6, 2, 4, 2, 2)
        );
        let other = PageCensus::from_elf(&elf64(&[a])).unwrap();
        assert_eq!(c.shared_with(&other), 3);
        assert_eq!(other.shared_with(&c), 1);
        assert!(PageCensus::from_elf(b"nope").is_err());
    }
}
