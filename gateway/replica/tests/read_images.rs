//! Manifests of real images: a raw file read directly equals the same file read through
//! qemu-nbd and a qcow2 conversion of it read through qemu-nbd; a modified block changes
//! exactly its leaf and the root, and the diff finds exactly the changed blocks; a replica
//! modified after its manifest is refused.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use ferry_nbd::qemu_nbd::QemuNbd;
use ferry_replica::merkle::diff_in_memory;
use ferry_replica::read::{manifest_of_image, manifest_of_raw_file, Via};
use ferry_replica::{Block, BlockSize, MerkleTree, ReplicaChanged};
use ferry_testkit::rng::Rng;

const MIB: u64 = 1 << 20;

fn skip_without_qemu() -> bool {
    if QemuNbd::available() {
        return false;
    }
    eprintln!("SKIPPED: qemu-nbd/qemu-img not installed (apt-get install qemu-utils)");
    true
}

/// A 48 MiB sparse raw image: random data regions, an explicitly written zero region (data
/// on disk, zero blocks in the manifest), a region not aligned to blocks, the rest holes.
fn image(path: &Path) {
    let file = std::fs::File::create(path).unwrap();
    file.set_len(48 * MIB).unwrap();
    let mut rng = Rng::new(11);
    for (offset, len) in [(0, MIB as usize), (5 * MIB + 1000, 3 * MIB as usize), (20 * MIB, 4096), (47 * MIB, MIB as usize)] {
        file.write_all_at(&rng.bytes(len), offset).unwrap();
    }
    file.write_all_at(&vec![0u8; 2 * MIB as usize], 30 * MIB).unwrap();
}

fn qemu_img(args: &[&str], paths: &[&Path]) {
    let status = Command::new("qemu-img").args(args).args(paths).status().unwrap();
    assert!(status.success(), "qemu-img {args:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_direct_equals_raw_and_qcow2_through_qemu_nbd() {
    if skip_without_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    let qcow2 = dir.path().join("disk.qcow2");
    image(&raw);
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2"], &[&raw, &qcow2]);
    let bs = BlockSize::DEFAULT;
    let direct = manifest_of_raw_file(&raw, bs).unwrap();
    assert_eq!(direct.blocks.len(), 768);
    // Data blocks: 16 + 49 (3 MiB starting mid-block) + 1 + 16; everything else is zero.
    assert_eq!(direct.blocks.len() - direct.zero_blocks(), 16 + 49 + 1 + 16);
    let via_raw = manifest_of_image(&raw, "raw", bs, Via::QemuNbd).await.unwrap();
    let via_qcow2 = manifest_of_image(&qcow2, "qcow2", bs, Via::QemuNbd).await.unwrap();
    assert_eq!(via_raw.blocks, direct.blocks);
    assert_eq!(via_qcow2.blocks, direct.blocks);
    assert_eq!(via_qcow2.disk_size, direct.disk_size);
    assert_eq!(via_qcow2.identity.as_ref().unwrap().path, qcow2);
    let root = MerkleTree::new(&direct).root();
    assert_eq!(MerkleTree::new(&via_qcow2).root(), root);
    // Another block size gives another manifest and root.
    let small = manifest_of_raw_file(&raw, BlockSize::new(4096).unwrap()).unwrap();
    assert_eq!(small.blocks.len(), 12288);
    assert_ne!(MerkleTree::new(&small).root(), root);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modified_blocks_change_their_leaves_and_the_root_and_the_diff_finds_them() {
    if skip_without_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    image(&raw);
    let bs = BlockSize::DEFAULT;
    let before = manifest_of_raw_file(&raw, bs).unwrap();
    // Write into a data block, a hole, and across two blocks.
    let file = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
    for offset in [100, 12 * MIB + 7, 40 * MIB - 10] {
        file.write_all_at(&[0xee; 20], offset).unwrap();
    }
    let changed: Vec<u64> = vec![0, 192, 639, 640];
    let qcow2 = dir.path().join("after.qcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2"], &[&raw, &qcow2]);
    let after = manifest_of_image(&qcow2, "qcow2", bs, Via::QemuNbd).await.unwrap();
    let differing: Vec<u64> = (0..before.blocks.len() as u64).filter(|&i| before.blocks[i as usize] != after.blocks[i as usize]).collect();
    assert_eq!(differing, changed);
    assert!(matches!(after.blocks[192], Block::Data(_)) && before.blocks[192] == Block::Zero);
    let (a, b) = (MerkleTree::new(&before), MerkleTree::new(&after));
    assert_ne!(a.root(), b.root());
    assert_eq!(a.node(0, 1), b.node(0, 1), "an untouched leaf");
    let outcome = diff_in_memory(&b, &a).unwrap();
    assert_eq!(outcome.differing, changed);
}

#[test]
fn a_replica_modified_after_its_manifest_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    std::fs::write(&raw, vec![1u8; 4 * MIB as usize]).unwrap();
    let manifest = manifest_of_raw_file(&raw, BlockSize::DEFAULT).unwrap();
    let identity = manifest.identity.clone().unwrap();
    identity.check_unchanged().unwrap();
    std::fs::OpenOptions::new().write(true).open(&raw).unwrap().write_all_at(&[2], 0).unwrap();
    assert!(matches!(identity.check_unchanged(), Err(ReplicaChanged::Changed { .. })));
}
