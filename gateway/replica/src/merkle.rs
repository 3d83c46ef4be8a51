//! The Merkle tree over a manifest's blocks and its sans-IO diff protocol.
//!
//! **Tree.** Level 0 holds one leaf per block: the block's blake3 digest, or all zero bytes for
//! a zero block. Node `i` of level `l ≥ 1` is blake3 (derive-key context [`NODE_CONTEXT`]) of
//! the existing children `16i .. 16i+15` of level `l-1`; a node exists when its first leaf
//! does. The definition holds above the top too (a single child chained up), so trees of
//! different sizes can be compared level by level. The root binds disk size and block size to
//! the top node ([`ROOT_CONTEXT`]).
//!
//! **Fan-out 16**, a trade-off: the walk takes one round trip per level (`log16(blocks)`:
//! 3 levels for 256 MiB of 64 KiB blocks, 7 for 2 TiB, where a binary tree needs 12 and 25
//! round trips), while each differing node costs its 16 children's digests (a binary tree costs
//! 2, so scattered changes exchange more digests at 16 than at 2; clustered changes, the usual
//! case of a disk, cost little either way).
//!
//! **Protocol.** The walker (the side that wants to know which blocks differ, the source) gets
//! the other side's [`Summary`], then sends [`NodeRequest`]s (parents at one level whose
//! children it wants) and feeds the [`NodeReply`]s; the other side answers from its tree with
//! [`MerkleTree::answer`]. Children that match are not descended into. Both messages have a
//! compact binary encoding with bounded decoding.

use crate::manifest::{Block, BlockSize, Manifest};
use crate::Digest;

/// Children per node.
pub const FAN_OUT: u64 = 16;
/// blake3 derive-key context of inner nodes.
pub const NODE_CONTEXT: &str = "ferry-replica 2026-12 merkle node";
/// blake3 derive-key context of the root.
pub const ROOT_CONTEXT: &str = "ferry-replica 2026-12 merkle root";
/// Leaf value of a zero block.
pub const ZERO_LEAF: Digest = [0; 32];
/// Most parents one [`NodeRequest`] may name (its reply is then at most 16 × 32 × 4096 bytes
/// = 2 MiB).
pub const MAX_PARENTS: usize = 4096;

/// Why a diff cannot go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiffError {
    /// The manifests use different block sizes.
    #[error("block sizes differ: {local} here, {remote} there")]
    BlockSize {
        /// Ours.
        local: u32,
        /// Theirs.
        remote: u32,
    },
    /// A message names nodes that do not exist or is too large.
    #[error("invalid diff message: {0}")]
    Invalid(&'static str),
}

/// What each side tells the other first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Summary {
    /// Disk size.
    pub disk_size: u64,
    /// Block size.
    pub block_size: u32,
    /// Number of blocks (leaves).
    pub leaves: u64,
    /// Root digest.
    pub root: Digest,
}

impl Summary {
    /// Bytes of the summary on the wire: size, block size, root (the leaf count follows from
    /// them).
    pub const ENCODED_LEN: usize = 8 + 4 + 32;
}

/// "Send me the children of these parents at `level`."
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRequest {
    /// Level of the parents (≥ 1).
    pub level: u8,
    /// Parent indices.
    pub parents: Vec<u64>,
}

/// The children's digests, parent by parent, in order (only children that exist).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeReply {
    /// The digests.
    pub digests: Vec<Digest>,
}

impl NodeRequest {
    /// Binary form: u8 level, u32 count, u64 parents (big-endian).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(5 + 8 * self.parents.len());
        out.push(self.level);
        out.extend_from_slice(&(self.parents.len() as u32).to_be_bytes());
        for p in &self.parents {
            out.extend_from_slice(&p.to_be_bytes());
        }
        out
    }

    /// Parses [`NodeRequest::encode`]'s form; at most [`MAX_PARENTS`] parents.
    pub fn decode(bytes: &[u8]) -> Result<Self, DiffError> {
        let invalid = DiffError::Invalid("malformed node request");
        let (&level, rest) = bytes.split_first().ok_or(invalid.clone())?;
        let (count, rest) = rest.split_first_chunk::<4>().ok_or(invalid.clone())?;
        let count = u32::from_be_bytes(*count) as usize;
        if count > MAX_PARENTS {
            return Err(DiffError::Invalid("too many parents in one request"));
        }
        if rest.len() != 8 * count {
            return Err(invalid);
        }
        let parents = rest.chunks_exact(8).map(|c| u64::from_be_bytes(c.try_into().unwrap_or_default())).collect();
        Ok(Self { level, parents })
    }
}

impl NodeReply {
    /// Binary form: u32 count, digests.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + 32 * self.digests.len());
        out.extend_from_slice(&(self.digests.len() as u32).to_be_bytes());
        for d in &self.digests {
            out.extend_from_slice(d);
        }
        out
    }

    /// Parses [`NodeReply::encode`]'s form; at most `FAN_OUT × MAX_PARENTS` digests.
    pub fn decode(bytes: &[u8]) -> Result<Self, DiffError> {
        let invalid = DiffError::Invalid("malformed node reply");
        let (count, rest) = bytes.split_first_chunk::<4>().ok_or(invalid.clone())?;
        let count = u32::from_be_bytes(*count) as usize;
        if count > FAN_OUT as usize * MAX_PARENTS {
            return Err(DiffError::Invalid("too many digests in one reply"));
        }
        if rest.len() != 32 * count {
            return Err(invalid);
        }
        Ok(Self { digests: rest.chunks_exact(32).map(|c| c.try_into().unwrap_or_default()).collect() })
    }
}

/// Nodes of `level` in a tree of `leaves` leaves (≥ 1 above the top while there are leaves).
fn level_len(leaves: u64, level: u32) -> u64 {
    let span = FAN_OUT.checked_pow(level).unwrap_or(u64::MAX);
    leaves.div_ceil(span)
}

/// Levels above the leaves up to the single top node.
fn height(leaves: u64) -> u32 {
    let mut h = 0;
    while level_len(leaves, h) > 1 {
        h += 1;
    }
    h
}

fn node_digest(children: &[Digest]) -> Digest {
    let mut hasher = blake3::Hasher::new_derive_key(NODE_CONTEXT);
    for c in children {
        hasher.update(c);
    }
    *hasher.finalize().as_bytes()
}

/// The Merkle tree of one manifest.
#[derive(Clone, Debug)]
pub struct MerkleTree {
    disk_size: u64,
    block_size: BlockSize,
    /// `levels[0]` are the leaves, the last level has one node (or none for an empty disk).
    levels: Vec<Vec<Digest>>,
}

impl MerkleTree {
    /// The tree of `manifest`.
    pub fn new(manifest: &Manifest) -> Self {
        let leaves: Vec<Digest> = manifest.blocks.iter().map(|b| match b {
            Block::Zero => ZERO_LEAF,
            Block::Data(d) => *d,
        }).collect();
        let mut levels = vec![leaves];
        while levels.last().is_some_and(|l| l.len() > 1) {
            let next = levels.last().map(|l| l.chunks(FAN_OUT as usize).map(node_digest).collect()).unwrap_or_default();
            levels.push(next);
        }
        Self { disk_size: manifest.disk_size, block_size: manifest.block_size, levels }
    }

    /// Number of leaves (blocks).
    pub fn leaves(&self) -> u64 {
        self.levels[0].len() as u64
    }

    /// Node `index` of `level`, also above the top; `None` if it does not exist.
    pub fn node(&self, level: u32, index: u64) -> Option<Digest> {
        if index >= level_len(self.leaves(), level) || self.leaves() == 0 {
            return None;
        }
        match self.levels.get(level as usize) {
            Some(nodes) => nodes.get(index as usize).copied(),
            None => {
                let mut digest = *self.levels.last()?.first()?;
                for _ in self.levels.len() as u32 - 1..level {
                    digest = node_digest(&[digest]);
                }
                Some(digest)
            }
        }
    }

    /// The root: disk size, block size and top node.
    pub fn root(&self) -> Digest {
        let mut hasher = blake3::Hasher::new_derive_key(ROOT_CONTEXT);
        hasher.update(&self.disk_size.to_be_bytes());
        hasher.update(&self.block_size.bytes().to_be_bytes());
        hasher.update(&self.node(height(self.leaves()), 0).unwrap_or(ZERO_LEAF));
        *hasher.finalize().as_bytes()
    }

    /// What this side sends first.
    pub fn summary(&self) -> Summary {
        Summary { disk_size: self.disk_size, block_size: self.block_size.bytes(), leaves: self.leaves(), root: self.root() }
    }

    /// The answer to a walker's request: the existing children of each parent, in order.
    pub fn answer(&self, request: &NodeRequest) -> Result<NodeReply, DiffError> {
        if request.level == 0 || request.parents.len() > MAX_PARENTS {
            return Err(DiffError::Invalid("a request names parents at level 1 or above, at most MAX_PARENTS"));
        }
        let child_level = u32::from(request.level) - 1;
        let children = level_len(self.leaves(), child_level);
        let mut digests = Vec::new();
        for &parent in &request.parents {
            self.node(request.level.into(), parent).ok_or(DiffError::Invalid("a parent that does not exist"))?;
            let first = parent * FAN_OUT;
            for child in first..(first + FAN_OUT).min(children) {
                digests.push(self.node(child_level, child).ok_or(DiffError::Invalid("missing child"))?);
            }
        }
        Ok(NodeReply { digests })
    }
}

/// The result of a diff.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiffOutcome {
    /// Block indices that differ (or exist on one side only), sorted.
    pub differing: Vec<u64>,
    /// The other side's digest of each differing block it has (zero blocks as [`ZERO_LEAF`]).
    pub remote_leaves: Vec<(u64, Digest)>,
    /// Node requests sent.
    pub requests: u64,
    /// Rounds (levels walked; requests of one level can go together).
    pub rounds: u32,
    /// Digests received.
    pub digests_received: u64,
    /// Bytes sent (summary and requests, encoded).
    pub bytes_sent: u64,
    /// Bytes received (summary and replies, encoded).
    pub bytes_received: u64,
}

/// The walking side of a diff: asks for the children of differing nodes, level by level.
#[derive(Debug)]
pub struct DiffWalker<'a> {
    local: &'a MerkleTree,
    remote_leaves: u64,
    /// Level of the parents in `todo` and in flight.
    level: u32,
    /// Parents of this level not asked for yet.
    todo: Vec<u64>,
    /// Requests of this level in flight, in order (the replies come back in order).
    in_flight: std::collections::VecDeque<NodeRequest>,
    /// Parents for the next level down.
    next: Vec<u64>,
    differing: Vec<std::ops::Range<u64>>,
    outcome: DiffOutcome,
}

impl<'a> DiffWalker<'a> {
    /// Starts a diff of `local` against the other side's `remote` summary.
    pub fn new(local: &'a MerkleTree, remote: Summary) -> Result<Self, DiffError> {
        if local.block_size.bytes() != remote.block_size {
            return Err(DiffError::BlockSize { local: local.block_size.bytes(), remote: remote.block_size });
        }
        let mut walker = Self {
            local,
            remote_leaves: remote.leaves,
            level: height(local.leaves()).max(height(remote.leaves)),
            todo: Vec::new(),
            in_flight: Default::default(),
            next: Vec::new(),
            differing: Vec::new(),
            outcome: DiffOutcome { bytes_sent: Summary::ENCODED_LEN as u64, bytes_received: Summary::ENCODED_LEN as u64, ..Default::default() },
        };
        let all = local.leaves().max(remote.leaves);
        if remote.root == local.root() {
            // Equal roots: nothing differs.
        } else if local.leaves() == 0 || remote.leaves == 0 || walker.level == 0 {
            walker.differing.push(0..all);
        } else {
            walker.todo.push(0);
        }
        Ok(walker)
    }

    /// The next request to send, if any now (more may follow once replies arrived).
    pub fn poll_request(&mut self) -> Option<NodeRequest> {
        if self.todo.is_empty() {
            return None;
        }
        let take = self.todo.len().min(MAX_PARENTS);
        let parents: Vec<u64> = self.todo.drain(..take).collect();
        let level = u8::try_from(self.level).unwrap_or(u8::MAX);
        let request = NodeRequest { level, parents };
        self.outcome.requests += 1;
        self.outcome.bytes_sent += request.encode().len() as u64;
        self.in_flight.push_back(request.clone());
        Some(request)
    }

    /// Feeds the reply to the oldest request in flight.
    pub fn handle_reply(&mut self, reply: &NodeReply) -> Result<(), DiffError> {
        let request = self.in_flight.pop_front().ok_or(DiffError::Invalid("a reply without a request"))?;
        self.outcome.bytes_received += reply.encode().len() as u64;
        let child_level = self.level - 1;
        let remote_children = level_len(self.remote_leaves, child_level);
        let span = FAN_OUT.pow(child_level);
        let mut digests = reply.digests.iter();
        for parent in request.parents {
            let first = parent * FAN_OUT;
            for child in first..first + FAN_OUT {
                let remote = if child < remote_children { Some(*digests.next().ok_or(DiffError::Invalid("too few digests"))?) } else { None };
                let local = self.local.node(child_level, child);
                let leaves = child * span..((child + 1) * span).min(self.local.leaves().max(self.remote_leaves));
                match (local, remote) {
                    (None, None) => {}
                    (Some(l), Some(r)) if l == r => {}
                    (Some(_), Some(r)) if child_level == 0 => {
                        self.outcome.remote_leaves.push((child, r));
                        self.differing.push(leaves);
                    }
                    (Some(_), Some(_)) => self.next.push(child),
                    // On one side only: every leaf under it differs.
                    _ => self.differing.push(leaves),
                }
                self.outcome.digests_received += u64::from(remote.is_some());
            }
        }
        if digests.next().is_some() {
            return Err(DiffError::Invalid("too many digests"));
        }
        if self.in_flight.is_empty() && self.todo.is_empty() {
            self.outcome.rounds += 1;
            if child_level > 0 {
                self.level = child_level;
                self.todo = std::mem::take(&mut self.next);
            }
        }
        Ok(())
    }

    /// Whether the walk is over.
    pub fn is_done(&self) -> bool {
        self.todo.is_empty() && self.in_flight.is_empty()
    }

    /// The outcome (call when [`DiffWalker::is_done`]).
    pub fn finish(mut self) -> DiffOutcome {
        let mut differing: Vec<u64> = self.differing.drain(..).flatten().collect();
        differing.sort_unstable();
        differing.dedup();
        self.outcome.differing = differing;
        self.outcome.remote_leaves.sort_unstable();
        self.outcome
    }
}

/// Runs a whole diff in memory (`remote` answers directly): for tests and measurements.
pub fn diff_in_memory(local: &MerkleTree, remote: &MerkleTree) -> Result<DiffOutcome, DiffError> {
    let mut walker = DiffWalker::new(local, remote.summary())?;
    while !walker.is_done() {
        let mut requests = Vec::new();
        while let Some(request) = walker.poll_request() {
            requests.push(NodeRequest::decode(&request.encode())?);
        }
        for request in requests {
            let reply = remote.answer(&request)?;
            walker.handle_reply(&NodeReply::decode(&reply.encode())?)?;
        }
    }
    Ok(walker.finish())
}

#[cfg(test)]
#[path = "merkle_tests.rs"]
mod tests;
