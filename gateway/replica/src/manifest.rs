//! The manifest of one disk and its sans-IO builder.

use std::time::SystemTime;

use crate::identity::ImageIdentity;
use crate::Digest;

/// One block of the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Block {
    /// Every byte is zero (no digest kept: the source sends a zero op, never data).
    Zero,
    /// blake3-256 of the block's bytes (the last block may be short).
    Data(Digest),
}

/// A manifest's block size: a power of two from 4 KiB to 16 MiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockSize(u32);

impl BlockSize {
    /// 64 KiB: QEMU's mirror granularity for most images, and qcow2's default cluster.
    pub const DEFAULT: Self = Self(64 << 10);
    /// Smallest block size.
    pub const MIN: u32 = 4 << 10;
    /// Largest block size.
    pub const MAX: u32 = 16 << 20;

    /// Checks `bytes` is a power of two within [`BlockSize::MIN`, `BlockSize::MAX`].
    pub fn new(bytes: u64) -> Result<Self, ManifestError> {
        match u32::try_from(bytes) {
            Ok(b) if b.is_power_of_two() && (Self::MIN..=Self::MAX).contains(&b) => Ok(Self(b)),
            _ => Err(ManifestError::BlockSize(bytes)),
        }
    }

    /// Bytes per block.
    pub fn bytes(self) -> u32 {
        self.0
    }
}

impl Default for BlockSize {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Why a manifest could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// Not a power of two within 4 KiB..16 MiB.
    #[error("block size {0} is not a power of two from 4 KiB to 16 MiB")]
    BlockSize(u64),
    /// More bytes were fed than the disk has.
    #[error("{fed} bytes fed to the manifest of a {size}-byte disk")]
    Overrun {
        /// Bytes fed so far.
        fed: u64,
        /// Disk size.
        size: u64,
    },
    /// The disk ended early.
    #[error("the manifest got {fed} of {size} bytes")]
    Short {
        /// Bytes fed.
        fed: u64,
        /// Disk size.
        size: u64,
    },
    /// The disk has more blocks than this machine can index.
    #[error("a {0}-byte disk has too many blocks")]
    TooManyBlocks(u64),
}

/// The manifest of one disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    /// Disk size in bytes (guest-visible).
    pub disk_size: u64,
    /// Block size.
    pub block_size: BlockSize,
    /// One entry per block, `ceil(disk_size / block_size)` of them.
    pub blocks: Vec<Block>,
    /// The image it was read from, when it is a file.
    pub identity: Option<ImageIdentity>,
    /// When the manifest was made (reading started).
    pub created: SystemTime,
}

impl Manifest {
    /// Blocks that are all zeroes.
    pub fn zero_blocks(&self) -> usize {
        self.blocks.iter().filter(|b| **b == Block::Zero).count()
    }

    /// Byte range of block `index`.
    pub fn block_range(&self, index: u64) -> std::ops::Range<u64> {
        let start = index * u64::from(self.block_size.bytes());
        start..(start + u64::from(self.block_size.bytes())).min(self.disk_size)
    }
}

/// Whether every byte is zero (chunked so the compiler vectorizes the OR).
pub fn is_zero(bytes: &[u8]) -> bool {
    bytes.chunks(256).all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// Builds a manifest from the disk's bytes fed in order: data with [`ManifestBuilder::data`],
/// known zeroes (holes) with [`ManifestBuilder::zeroes`], which costs nothing per byte for
/// whole blocks. Holds at most one partial block.
#[derive(Debug)]
pub struct ManifestBuilder {
    disk_size: u64,
    block_size: BlockSize,
    blocks: Vec<Block>,
    partial: Vec<u8>,
    /// The partial block is known to be zero so far (bytes fed as zeroes are not copied).
    partial_zero_len: usize,
    fed: u64,
    created: SystemTime,
}

impl ManifestBuilder {
    /// A builder for a disk of `disk_size` bytes.
    pub fn new(disk_size: u64, block_size: BlockSize, created: SystemTime) -> Result<Self, ManifestError> {
        let count = disk_size.div_ceil(block_size.bytes().into());
        let count = usize::try_from(count).map_err(|_| ManifestError::TooManyBlocks(disk_size))?;
        Ok(Self {
            disk_size,
            block_size,
            blocks: Vec::with_capacity(count),
            partial: Vec::new(),
            partial_zero_len: 0,
            fed: 0,
            created,
        })
    }

    /// Bytes fed so far (the offset the next bytes belong at).
    pub fn offset(&self) -> u64 {
        self.fed
    }

    fn advance(&mut self, len: u64) -> Result<(), ManifestError> {
        let fed = self.fed + len;
        if fed > self.disk_size {
            return Err(ManifestError::Overrun { fed, size: self.disk_size });
        }
        self.fed = fed;
        Ok(())
    }

    /// Length of the block now being filled.
    fn current_block_len(&self) -> usize {
        let start = self.blocks.len() as u64 * u64::from(self.block_size.bytes());
        (self.disk_size - start).min(self.block_size.bytes().into()) as usize
    }

    fn partial_len(&self) -> usize {
        self.partial.len().max(self.partial_zero_len)
    }

    fn close_block_if_full(&mut self) {
        if self.partial_len() == self.current_block_len() {
            let block = if self.partial.is_empty() || is_zero(&self.partial) { Block::Zero } else { Block::Data(*blake3::hash(&self.partial).as_bytes()) };
            self.blocks.push(block);
            self.partial.clear();
            self.partial_zero_len = 0;
        }
    }

    /// The next `bytes` of the disk.
    pub fn data(&mut self, mut bytes: &[u8]) -> Result<(), ManifestError> {
        self.advance(bytes.len() as u64)?;
        while !bytes.is_empty() {
            let block_len = self.current_block_len();
            if self.partial_len() == 0 && bytes.len() >= block_len {
                let (block, rest) = bytes.split_at(block_len);
                self.blocks.push(if is_zero(block) { Block::Zero } else { Block::Data(*blake3::hash(block).as_bytes()) });
                bytes = rest;
                continue;
            }
            if self.partial.len() < self.partial_zero_len {
                self.partial.resize(self.partial_zero_len, 0);
            }
            let take = (block_len - self.partial.len()).min(bytes.len());
            self.partial.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            self.close_block_if_full();
        }
        Ok(())
    }

    /// The next `len` bytes of the disk are zero.
    pub fn zeroes(&mut self, mut len: u64) -> Result<(), ManifestError> {
        self.advance(len)?;
        while len > 0 {
            let block_len = self.current_block_len() as u64;
            if self.partial_len() == 0 && len >= block_len {
                // Whole zero blocks at once.
                let whole = len / u64::from(self.block_size.bytes());
                let remaining_blocks = self.disk_size.div_ceil(self.block_size.bytes().into()) - self.blocks.len() as u64;
                let n = whole.min(remaining_blocks).max(1);
                self.blocks.resize(self.blocks.len() + n as usize, Block::Zero);
                len -= (n * u64::from(self.block_size.bytes())).min(len);
                continue;
            }
            let take = (block_len - self.partial_len() as u64).min(len);
            if self.partial.is_empty() {
                self.partial_zero_len += take as usize;
            } else {
                self.partial.resize(self.partial.len() + take as usize, 0);
            }
            len -= take;
            self.close_block_if_full();
        }
        Ok(())
    }

    /// The manifest, once every byte was fed.
    pub fn finish(self, identity: Option<ImageIdentity>) -> Result<Manifest, ManifestError> {
        if self.fed != self.disk_size {
            return Err(ManifestError::Short { fed: self.fed, size: self.disk_size });
        }
        Ok(Manifest { disk_size: self.disk_size, block_size: self.block_size, blocks: self.blocks, identity, created: self.created })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_testkit::rng::Rng;

    const BS: u32 = 4096;

    fn build(size: u64, feed: impl FnOnce(&mut ManifestBuilder)) -> Manifest {
        let mut b = ManifestBuilder::new(size, BlockSize::new(BS.into()).unwrap(), SystemTime::UNIX_EPOCH).unwrap();
        feed(&mut b);
        b.finish(None).unwrap()
    }

    /// The manifest computed block by block from the whole content.
    fn reference(content: &[u8]) -> Vec<Block> {
        content.chunks(BS as usize).map(|c| if is_zero(c) { Block::Zero } else { Block::Data(*blake3::hash(c).as_bytes()) }).collect()
    }

    #[test]
    fn block_sizes_are_powers_of_two_from_4k_to_16m() {
        assert!(BlockSize::new(4096).is_ok() && BlockSize::new(16 << 20).is_ok());
        for bad in [0, 2048, 4097, 65535, 32 << 20, u64::MAX] {
            assert_eq!(BlockSize::new(bad), Err(ManifestError::BlockSize(bad)));
        }
    }

    #[test]
    fn any_split_into_data_and_zero_pieces_gives_the_same_blocks() {
        let mut rng = Rng::new(1);
        // 10.5 blocks: zero blocks, data blocks, a block that is half zero, a short last block.
        let size = 10 * u64::from(BS) + 2048;
        let mut content = vec![0u8; size as usize];
        for (offset, len) in [(4096usize, 4096usize), (3 * 4096 + 100, 10), (6 * 4096, 2048), (10 * 4096, 1000)] {
            rng.fill(&mut content[offset..offset + len]);
        }
        let expected = reference(&content);
        assert_eq!(expected.iter().filter(|b| **b == Block::Zero).count(), 7);
        for seed in 0..200 {
            let mut rng = Rng::new(seed);
            let manifest = build(size, |b| {
                let mut at = 0;
                while at < content.len() {
                    let len = (1 + rng.below(9000)).min(content.len() - at);
                    let piece = &content[at..at + len];
                    // Zero pieces go either way.
                    if is_zero(piece) && rng.below(2) == 0 {
                        b.zeroes(len as u64).unwrap();
                    } else {
                        b.data(piece).unwrap();
                    }
                    at += len;
                }
            });
            assert_eq!(manifest.blocks, expected, "seed {seed}");
        }
    }

    #[test]
    fn overruns_and_short_input_are_errors() {
        let bs = BlockSize::new(4096).unwrap();
        let mut b = ManifestBuilder::new(5000, bs, SystemTime::UNIX_EPOCH).unwrap();
        b.zeroes(4096).unwrap();
        assert_eq!(b.data(&[0; 1000]), Err(ManifestError::Overrun { fed: 5096, size: 5000 }));
        assert_eq!(b.finish(None), Err(ManifestError::Short { fed: 4096, size: 5000 }));
        let m = build(0, |_| {});
        assert!(m.blocks.is_empty());
    }
}
