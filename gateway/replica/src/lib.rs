//! Ferry's replica manifest of a disk: what the destination holds, block by block, so the
//! source sends only the blocks that differ.
//!
//! - [`manifest`]: blake3-256 per fixed-size block (64 KiB default; a power of two from 4 KiB
//!   to 16 MiB), zero blocks marked without a digest, the disk size, which image and when.
//!   Built sans-IO by [`ManifestBuilder`] from the disk's bytes in order.
//! - [`merkle`]: a Merkle tree over the block digests (fan-out [`merkle::FAN_OUT`] = 16) and
//!   its sans-IO diff protocol: the side that walks ([`DiffWalker`]) asks for the children of
//!   the nodes that differ, level by level; the other side answers from its tree
//!   ([`MerkleTree::answer`]). Only differing subtrees' digests travel.
//! - [`identity`]: the image's identity (path, size, mtime, ctime, inode, device) and the check
//!   that it did not change after its manifest.
//! - [`read`]: building a manifest from a raw file directly (skipping holes with
//!   `SEEK_DATA`/`SEEK_HOLE`) or through an NBD export with the ferry-nbd client (any format
//!   `qemu-nbd` opens; holes skipped with `NBD_CMD_BLOCK_STATUS`).

pub mod identity;
pub mod manifest;
pub mod merkle;
pub mod read;

pub use identity::{ImageIdentity, ReplicaChanged};
pub use manifest::{Block, BlockSize, Manifest, ManifestBuilder, ManifestError};
pub use merkle::{DiffError, DiffOutcome, DiffWalker, MerkleTree, NodeReply, NodeRequest, Summary};

/// A blake3-256 digest.
pub type Digest = [u8; 32];

/// Lower-case hex of a digest (for logs and the CLI).
pub fn hex(digest: &Digest) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}
