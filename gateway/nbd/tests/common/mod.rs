//! Helpers of the interop tests: a file-backed export for our server, images with holes, and
//! running the QEMU tools.

#![allow(dead_code)] // each test file uses a part

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use ferry_nbd::io::BlockBackend;
use ferry_nbd::{CommandFlags, Extent};
use ferry_testkit::rng::Rng;

/// A plain file as the storage behind our server (blocking IO: fine for tests).
pub struct FileBackend {
    pub file: File,
    pub size: u64,
    pub flushes: usize,
}

impl FileBackend {
    pub fn open(path: &Path) -> Self {
        let file = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
        let size = file.metadata().unwrap().len();
        Self { file, size, flushes: 0 }
    }
}

impl BlockBackend for FileBackend {
    async fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    async fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.file.write_all_at(data, offset)?;
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    async fn write_zeroes(&mut self, offset: u64, length: u32, _flags: CommandFlags) -> io::Result<()> {
        self.file.write_all_at(&vec![0u8; length as usize], offset)
    }

    async fn trim(&mut self, _offset: u64, _length: u32) -> io::Result<()> {
        Ok(())
    }

    async fn flush(&mut self) -> io::Result<()> {
        self.flushes += 1;
        self.file.sync_data()
    }

    async fn block_status(&mut self, offset: u64, length: u32) -> io::Result<Vec<Extent>> {
        let length = (self.size - offset).min(length.into()) as u32;
        Ok(vec![Extent { length, flags: 0 }])
    }
}

/// Skips (returns true after saying why) when the QEMU tools are missing.
pub fn skip_without_qemu() -> bool {
    if ferry_nbd::qemu_nbd::QemuNbd::available() {
        return false;
    }
    eprintln!("SKIPPED: qemu-nbd/qemu-img not installed (apt-get install qemu-utils)");
    true
}

/// A sparse raw image of `size` bytes with random data in `regions` (offset, length); returns
/// its content.
pub fn sparse_image(path: &Path, size: u64, regions: &[(u64, usize)], seed: u64) -> Vec<u8> {
    let file = File::create(path).unwrap();
    file.set_len(size).unwrap();
    let mut content = vec![0u8; size as usize];
    let mut rng = Rng::new(seed);
    for &(offset, len) in regions {
        let data = rng.bytes(len);
        file.write_all_at(&data, offset).unwrap();
        content[offset as usize..offset as usize + len].copy_from_slice(&data);
    }
    content
}

/// Runs a command; panics with its output unless it succeeds.
pub fn run(command: &mut Command) -> String {
    let output = command.output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{command:?} failed: {stdout}{}", String::from_utf8_lossy(&output.stderr));
    stdout
}

pub fn digest(bytes: &[u8]) -> blake3::Hash {
    blake3::hash(bytes)
}

pub fn file_digest(path: &Path) -> blake3::Hash {
    blake3::hash(&std::fs::read(path).unwrap())
}
