//! `ferry-host disk-manifest`: the replica manifest of one image, to try the manifest code on
//! real disks (root, block counts, speed).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use ferry_replica::read::{manifest_of_image, Via};
use ferry_replica::{hex, BlockSize, MerkleTree};
use ferry_units::ByteSize;

/// What `disk-manifest` prints.
#[derive(serde::Serialize)]
struct Report {
    image: PathBuf,
    format: String,
    via: &'static str,
    disk_size: u64,
    block_size: u32,
    blocks: usize,
    zero_blocks: usize,
    root: String,
    seconds: f64,
    mib_per_second: f64,
}

/// Builds the manifest of `image` and prints its summary.
pub async fn run(image: &Path, format: &str, block_size: ByteSize, via_qemu_nbd: bool, json: bool) -> anyhow::Result<()> {
    let block_size = BlockSize::new(block_size.0).context("--block-size")?;
    let via = if via_qemu_nbd || format != "raw" { Via::QemuNbd } else { Via::Direct };
    let started = Instant::now();
    let manifest = manifest_of_image(image, format, block_size, via).await.with_context(|| format!("cannot read {}", image.display()))?;
    let root = MerkleTree::new(&manifest).root();
    let seconds = started.elapsed().as_secs_f64();
    let report = Report {
        image: image.to_owned(),
        format: format.to_owned(),
        via: if via == Via::Direct { "direct" } else { "qemu-nbd" },
        disk_size: manifest.disk_size,
        block_size: block_size.bytes(),
        blocks: manifest.blocks.len(),
        zero_blocks: manifest.zero_blocks(),
        root: hex(&root),
        seconds,
        mib_per_second: manifest.disk_size as f64 / (1 << 20) as f64 / seconds.max(1e-9),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report).context("cannot encode the report")?);
    } else {
        println!(
            "{}: {} bytes, {} blocks of {} bytes ({} zero), root {}, {:.2} s ({:.0} MiB/s, {})",
            report.image.display(),
            report.disk_size,
            report.blocks,
            report.block_size,
            report.zero_blocks,
            report.root,
            report.seconds,
            report.mib_per_second,
            report.via
        );
    }
    Ok(())
}
