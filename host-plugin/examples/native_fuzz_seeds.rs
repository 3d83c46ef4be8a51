//! Writes seeds for the native stream fuzz target (`host-plugin/fuzz`): small valid native
//! streams (first byte: the piece size the target offers them in).
//!
//! `cargo run -p ferry-host --example native_fuzz_seeds -- host-plugin/fuzz/seeds/native_stream`

use ferry_host::native::stream::{RamBlock, StreamWriter, PAGE_SIZE};

fn main() -> anyhow::Result<()> {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "host-plugin/fuzz/seeds/native_stream".into()));
    std::fs::create_dir_all(&dir)?;
    let blocks = vec![RamBlock { slot: 0, guest_addr: 0, len: 16 * 4096 }, RamBlock { slot: 2, guest_addr: 0x10_0000, len: 4096 }];
    for (name, piece, passes) in [("one-pass-255", 255u8, 1usize), ("three-passes-13", 13, 3)] {
        let mut out = vec![piece];
        let mut w = StreamWriter::new(blocks.clone(), &mut out)?;
        for pass in 0..passes {
            w.begin_pass(pass + 1 == passes, &mut out)?;
            w.page(0, 0, &[0; PAGE_SIZE], &mut out)?;
            w.page(0, 4096, &[pass as u8 + 1; PAGE_SIZE], &mut out)?;
            w.page(1, 0, &[0; PAGE_SIZE], &mut out)?;
            w.page(0, 8192, &[0; PAGE_SIZE], &mut out)?;
            w.end_pass(&mut out)?;
        }
        w.finish(b"FVCS\x01\0\0\0", &mut out)?;
        std::fs::write(dir.join(name), &out)?;
    }
    Ok(())
}
