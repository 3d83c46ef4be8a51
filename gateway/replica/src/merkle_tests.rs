//! Unit tests of the Merkle tree and the diff protocol: trees that differ in no block, one
//! block, 5 % (scattered and clustered), every block, and disks of different sizes; each
//! diff is checked against a block-by-block comparison.

use std::time::SystemTime;

use super::*;
use ferry_testkit::rng::Rng;

fn manifest(blocks: Vec<Block>, block_size: u32) -> Manifest {
    let disk_size = blocks.len() as u64 * u64::from(block_size);
    Manifest { disk_size, block_size: BlockSize::new(block_size.into()).unwrap(), blocks, identity: None, created: SystemTime::UNIX_EPOCH }
}

fn random_blocks(rng: &mut Rng, n: usize) -> Vec<Block> {
    (0..n).map(|_| if rng.below(10) == 0 { Block::Zero } else { Block::Data(rng.bytes(32).try_into().unwrap()) }).collect()
}

/// Blocks that differ, by comparing them one by one (a missing block differs).
fn brute_force(a: &[Block], b: &[Block]) -> Vec<u64> {
    (0..a.len().max(b.len())).filter(|&i| a.get(i) != b.get(i)).map(|i| i as u64).collect()
}

fn changed(blocks: &[Block], which: &[usize], rng: &mut Rng) -> Vec<Block> {
    let mut out = blocks.to_vec();
    for &i in which {
        out[i] = Block::Data(rng.bytes(32).try_into().unwrap());
    }
    out
}

fn check(local: &[Block], remote: &[Block]) -> DiffOutcome {
    let (a, b) = (MerkleTree::new(&manifest(local.to_vec(), 65536)), MerkleTree::new(&manifest(remote.to_vec(), 65536)));
    let outcome = diff_in_memory(&a, &b).unwrap();
    assert_eq!(outcome.differing, brute_force(local, remote));
    // The remote digests of blocks both sides have are the remote's.
    for (i, d) in &outcome.remote_leaves {
        let expected = match remote[*i as usize] {
            Block::Zero => ZERO_LEAF,
            Block::Data(d) => d,
        };
        assert_eq!(*d, expected);
    }
    outcome
}

#[test]
fn identical_trees_exchange_only_summaries() {
    let blocks = random_blocks(&mut Rng::new(1), 4096);
    let outcome = check(&blocks, &blocks);
    assert_eq!((outcome.requests, outcome.digests_received), (0, 0));
    assert_eq!(outcome.bytes_received, Summary::ENCODED_LEN as u64);
}

#[test]
fn one_changed_block_changes_its_leaf_and_every_ancestor_and_is_found_alone() {
    let mut rng = Rng::new(2);
    let blocks = random_blocks(&mut rng, 4096);
    let other = changed(&blocks, &[1234], &mut rng);
    let (a, b) = (MerkleTree::new(&manifest(blocks.clone(), 65536)), MerkleTree::new(&manifest(other.clone(), 65536)));
    assert_ne!(a.root(), b.root());
    for level in 0..a.levels.len() as u32 {
        for i in 0..level_len(4096, level) {
            let on_path = i == 1234 / FAN_OUT.pow(level);
            assert_eq!(a.node(level, i) != b.node(level, i), on_path, "level {level} node {i}");
        }
    }
    let outcome = check(&blocks, &other);
    assert_eq!(outcome.differing, vec![1234]);
    // 4096 leaves: 3 levels below the top, 16 digests each.
    assert_eq!((outcome.rounds, outcome.digests_received), (3, 48));
}

#[test]
fn scattered_and_clustered_changes_and_all_blocks() {
    let mut rng = Rng::new(3);
    let blocks = random_blocks(&mut rng, 4096);
    let scattered: Vec<usize> = (0..205).map(|_| rng.below(4096)).collect();
    let outcome = check(&blocks, &changed(&blocks, &scattered, &mut rng));
    assert!(outcome.digests_received < 4096, "{outcome:?}");
    let clustered: Vec<usize> = (1000..1205).collect();
    let outcome = check(&blocks, &changed(&blocks, &clustered, &mut rng));
    assert!(outcome.digests_received < 300, "{outcome:?}");
    let all: Vec<usize> = (0..4096).collect();
    let outcome = check(&blocks, &changed(&blocks, &all, &mut rng));
    assert_eq!(outcome.differing.len(), 4096);
}

#[test]
fn disks_of_different_sizes() {
    let mut rng = Rng::new(4);
    let blocks = random_blocks(&mut rng, 1000);
    for (a, b) in [(1000, 1001), (1000, 16), (17, 16), (1, 1000), (0, 5), (256, 4096), (4097, 4096)] {
        let long: Vec<Block> = blocks.iter().cycle().take(a.max(b)).copied().collect();
        let (x, y) = (&long[..a], &long[..b]);
        let outcome = check(x, y);
        assert_eq!(outcome.differing, (a.min(b) as u64..a.max(b) as u64).collect::<Vec<_>>(), "{a} vs {b}");
        check(y, x);
    }
    // Same blocks, same leaves, different disk size (a short last block): roots differ.
    let m = manifest(blocks.clone(), 65536);
    let mut shorter = m.clone();
    shorter.disk_size -= 100;
    assert_ne!(MerkleTree::new(&m).root(), MerkleTree::new(&shorter).root());
}

#[test]
fn block_size_mismatch_and_bad_messages_are_refused() {
    let blocks = random_blocks(&mut Rng::new(5), 100);
    let (a, b) = (MerkleTree::new(&manifest(blocks.clone(), 65536)), MerkleTree::new(&manifest(blocks, 4096)));
    assert_eq!(DiffWalker::new(&a, b.summary()).unwrap_err(), DiffError::BlockSize { local: 65536, remote: 4096 });
    assert!(a.answer(&NodeRequest { level: 0, parents: vec![0] }).is_err());
    assert!(a.answer(&NodeRequest { level: 1, parents: vec![7] }).is_err(), "100 leaves have 7 parents at level 1");
    assert_eq!(a.answer(&NodeRequest { level: 1, parents: vec![6] }).unwrap().digests.len(), 4);
    assert!(a.answer(&NodeRequest { level: 1, parents: vec![0; MAX_PARENTS + 1] }).is_err());
    // Decoding is bounded and exact.
    let request = NodeRequest { level: 2, parents: vec![1, 2, 3] };
    assert_eq!(NodeRequest::decode(&request.encode()).unwrap(), request);
    assert!(NodeRequest::decode(&[2, 0xff, 0xff, 0xff, 0xff]).is_err());
    assert!(NodeRequest::decode(&request.encode()[..20]).is_err());
    assert!(NodeReply::decode(&[0, 0, 0, 2, 1]).is_err());
    assert!(NodeReply::decode(&[0xff; 4]).is_err());
    // A reply with the wrong number of digests.
    let mut walker = DiffWalker::new(&a, MerkleTree::new(&manifest(vec![Block::Zero; 100], 65536)).summary()).unwrap();
    walker.poll_request().unwrap();
    assert!(walker.handle_reply(&NodeReply { digests: vec![ZERO_LEAF; 3] }).is_err());
}
