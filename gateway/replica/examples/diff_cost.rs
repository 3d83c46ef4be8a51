//! What a Merkle diff of two 256 MiB disks costs: digests and bytes exchanged, rounds, time,
//! next to sending the whole flat manifest (32 bytes per block). The two manifests are built
//! from real content (random bytes, then a share of the 64 KiB blocks rewritten, scattered or
//! in 1 MiB runs).
//! Usage: `cargo run --release -p ferry-replica --example diff_cost`

use std::time::{Instant, SystemTime};

use ferry_replica::merkle::diff_in_memory;
use ferry_replica::{BlockSize, Manifest, ManifestBuilder, MerkleTree};
use ferry_testkit::rng::Rng;

const DISK: usize = 256 << 20;
const BLOCK: usize = 64 << 10;

fn manifest(content: &[u8]) -> Manifest {
    let mut builder = ManifestBuilder::new(content.len() as u64, BlockSize::DEFAULT, SystemTime::now()).unwrap();
    builder.data(content).unwrap();
    builder.finish(None).unwrap()
}

fn main() {
    let mut rng = Rng::new(42);
    let base = rng.bytes(DISK);
    let started = Instant::now();
    let base_manifest = manifest(&base);
    let hash_secs = started.elapsed().as_secs_f64();
    let tree = MerkleTree::new(&base_manifest);
    let blocks = DISK / BLOCK;
    let flat = blocks * 32;
    println!("256 MiB, {blocks} blocks of 64 KiB; hashing {:.0} MiB/s; flat manifest {flat} bytes ({blocks} digests)", 256.0 / hash_secs);
    println!("| changed | layout | blocks differing | digests exchanged | bytes sent | bytes received | rounds | diff time |");
    println!("|---|---|---|---|---|---|---|---|");
    for percent in [0.0, 1.0, 5.0, 30.0] {
        for clustered in [false, true] {
            let count = (blocks as f64 * percent / 100.0).round() as usize;
            let mut content = base.clone();
            let mut changed = std::collections::BTreeSet::new();
            while changed.len() < count {
                if clustered {
                    let run = rng.below(blocks / 16) * 16;
                    changed.extend(run..(run + 16).min(run + count - changed.len()));
                } else {
                    changed.insert(rng.below(blocks));
                }
            }
            for &b in &changed {
                content[b * BLOCK] ^= 0xff;
            }
            let other = MerkleTree::new(&manifest(&content));
            let started = Instant::now();
            let outcome = diff_in_memory(&other, &tree).unwrap();
            let secs = started.elapsed().as_secs_f64();
            assert_eq!(outcome.differing, changed.iter().map(|&b| b as u64).collect::<Vec<_>>());
            println!(
                "| {percent} % | {} | {} | {} | {} | {} | {} | {:.2} ms |",
                if clustered { "1 MiB runs" } else { "scattered" },
                outcome.differing.len(),
                outcome.digests_received,
                outcome.bytes_sent,
                outcome.bytes_received,
                outcome.rounds,
                secs * 1e3
            );
        }
    }
}
