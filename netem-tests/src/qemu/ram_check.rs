//! RAM equality at cutover: the test oracle that a migration's destination holds exactly the
//! memory the source had when it stopped.
//!
//! Every VM the harness starts keeps its main RAM in a file under `/dev/shm`
//! ([`QemuConfig::ram_in_file`](super::QemuConfig::ram_in_file): a `memory-backend-file` with
//! `share=on` that is the machine's memory), so the harness reads both guests' RAM straight
//! from tmpfs, without QMP. The comparison is only meaningful while neither guest runs: the
//! source in `postmigrate` (stopped by the migration), the destination loaded but held paused
//! (started with `-S`, [`QemuConfig::held_at_cutover`](super::QemuConfig::held_at_cutover)).
//!
//! * [`compare_ram`]: both VMs' RAM page by page, with the differing pages' guest-physical
//!   addresses and a short hex of each side ([`RamComparison`]).
//! * [`check_ram_then_resume`]: what the harness's migrations ([`super::migrate_local`],
//!   [`super::migrate_over_wan`]) do once QEMU reports `completed`: compare, fail with
//!   [`QemuError::RamMismatch`] on any difference (the destination stays paused), else resume
//!   the destination.
//!
//! Reading the files costs ~0.1 s per GiB and side here; QMP `dump-guest-memory` (QEMU writes
//! an ELF core that the harness then reads) costs several times that (numbers in
//! `netem-tests/README.md`). Only the main RAM block is compared (not the BIOS/option ROMs).

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use ferry_qmp::RunState;

use super::{Qemu, QemuError, Result};

/// The page size compared (x86 target pages).
pub const PAGE_SIZE: usize = 4096;
/// How many differing pages a [`RamComparison`] describes in detail.
pub const DETAILED_PAGES: usize = 8;
/// Bytes of each side shown per differing page.
pub const EXCERPT_BYTES: usize = 16;
/// Bytes read from each file per step (bounds the memory the comparison uses).
const CHUNK: usize = 1 << 20;

/// Where RAM offsets (bytes into the main RAMBlock, i.e. into the RAM file) lie in the guest's
/// physical address space: the first `below_4g` bytes from address 0, the rest from 4 GiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamLayout {
    /// RAM size, bytes.
    pub bytes: u64,
    /// How much of it QEMU maps below 4 GiB.
    pub below_4g: u64,
}

impl RamLayout {
    /// The layout QEMU's x86 machines give `bytes` of RAM: `q35` keeps everything below 4 GiB
    /// under 2.75 GiB (else 2 GiB below), `pc` under 3.5 GiB (else 3 GiB below).
    pub fn x86(machine: &str, bytes: u64) -> RamLayout {
        let (threshold, low) = if machine.contains("q35") {
            (0xb000_0000, 0x8000_0000)
        } else {
            (0xe000_0000, 0xc000_0000)
        };
        let below_4g = if bytes >= threshold { low } else { bytes };
        RamLayout { bytes, below_4g }
    }

    /// The guest-physical address of RAM offset `offset`.
    pub fn gpa(&self, offset: u64) -> u64 {
        if offset < self.below_4g {
            offset
        } else {
            (4 << 30) + offset - self.below_4g
        }
    }
}

/// One page whose contents differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageDifference {
    /// Offset of the page in RAM (the RAM file).
    pub offset: u64,
    /// Its guest-physical address.
    pub gpa: u64,
    /// Bytes of the page that differ.
    pub differing_bytes: u32,
    /// Offset in the page of the first excerpt byte (the first difference, rounded down to
    /// [`EXCERPT_BYTES`]).
    pub excerpt_at: u32,
    /// [`EXCERPT_BYTES`] bytes of the source's page from `excerpt_at`.
    pub source: [u8; EXCERPT_BYTES],
    /// The same bytes of the destination's page.
    pub destination: [u8; EXCERPT_BYTES],
}

impl PageDifference {
    fn of(layout: &RamLayout, offset: u64, src: &[u8], dst: &[u8]) -> PageDifference {
        let first = src.iter().zip(dst).position(|(a, b)| a != b).unwrap_or(0);
        let at = first / EXCERPT_BYTES * EXCERPT_BYTES;
        // A short last page (RAM not a multiple of the page size) gives a short excerpt.
        let end = (at + EXCERPT_BYTES).min(src.len());
        let excerpt = |p: &[u8]| {
            let mut e = [0u8; EXCERPT_BYTES];
            e[..end - at].copy_from_slice(&p[at..end]);
            e
        };
        PageDifference {
            offset,
            gpa: layout.gpa(offset),
            differing_bytes: src.iter().zip(dst).filter(|(a, b)| a != b).count() as u32,
            excerpt_at: at as u32,
            source: excerpt(src),
            destination: excerpt(dst),
        }
    }
}

impl fmt::Display for PageDifference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        write!(
            f,
            "gpa {:#x} ({} bytes differ): +{:#05x} source {} destination {}",
            self.gpa,
            self.differing_bytes,
            self.excerpt_at,
            hex(&self.source),
            hex(&self.destination)
        )
    }
}

/// The result of comparing two guests' RAM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamComparison {
    /// Pages compared.
    pub pages: u64,
    /// Pages that differ.
    pub differing: u64,
    /// The first [`DETAILED_PAGES`] differing pages, in address order.
    pub first: Vec<PageDifference>,
    /// How long the comparison took.
    pub elapsed: Duration,
}

impl RamComparison {
    /// True if every page is equal.
    pub fn is_equal(&self) -> bool {
        self.differing == 0
    }
}

impl fmt::Display for RamComparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_equal() {
            return write!(f, "RAM equal at cutover ({} pages)", self.pages);
        }
        write!(
            f,
            "RAM differs at cutover: {} of {} pages",
            self.differing, self.pages
        )?;
        for d in &self.first {
            write!(f, "\n  {d}")?;
        }
        if self.differing > self.first.len() as u64 {
            write!(f, "\n  ...")?;
        }
        Ok(())
    }
}

/// Compares `layout.bytes` of `source` and `destination` page by page.
pub fn compare_readers(
    mut source: impl Read,
    mut destination: impl Read,
    layout: &RamLayout,
) -> std::io::Result<RamComparison> {
    let started = Instant::now();
    let (mut a, mut b) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let mut cmp = RamComparison {
        pages: 0,
        differing: 0,
        first: Vec::new(),
        elapsed: Duration::ZERO,
    };
    let mut offset = 0u64;
    while offset < layout.bytes {
        let n = (layout.bytes - offset).min(CHUNK as u64) as usize;
        source.read_exact(&mut a[..n])?;
        destination.read_exact(&mut b[..n])?;
        for (i, (pa, pb)) in a[..n].chunks(PAGE_SIZE).zip(b[..n].chunks(PAGE_SIZE)).enumerate() {
            cmp.pages += 1;
            if pa != pb {
                cmp.differing += 1;
                if cmp.first.len() < DETAILED_PAGES {
                    let at = offset + (i * PAGE_SIZE) as u64;
                    cmp.first.push(PageDifference::of(layout, at, pa, pb));
                }
            }
        }
        offset += n as u64;
    }
    cmp.elapsed = started.elapsed();
    Ok(cmp)
}

/// Compares two RAM files ([`Qemu::ram_file`]) of `layout.bytes` each.
pub fn compare_ram_files(source: &Path, destination: &Path, layout: &RamLayout) -> Result<RamComparison> {
    let open = |p: &Path| -> Result<File> {
        let f = File::open(p).map_err(|e| QemuError::io(format!("opening RAM file {}", p.display()), e))?;
        let len = f
            .metadata()
            .map_err(|e| QemuError::io(format!("RAM file {}", p.display()), e))?
            .len();
        if len != layout.bytes {
            return Err(QemuError::Protocol(format!(
                "RAM file {} has {len} bytes, expected {}",
                p.display(),
                layout.bytes
            )));
        }
        Ok(f)
    };
    let (s, d) = (open(source)?, open(destination)?);
    compare_readers(s, d, layout).map_err(|e| {
        QemuError::io(
            format!("comparing RAM files {} and {}", source.display(), destination.display()),
            e,
        )
    })
}

/// Compares the RAM of migration source `src` and destination `dst`, which must both be
/// stopped: `src` not running (`postmigrate` after a completed migration, or `paused`), `dst`
/// loaded and held (`paused`, or `postmigrate`). Both need [`Qemu::ram_file`] and the same
/// RAM size and machine type. Never resumes anything.
pub fn compare_ram(src: &Qemu, dst: &Qemu) -> Result<RamComparison> {
    let (si, di) = (src.ram_info(), dst.ram_info());
    let (Some(sf), Some(df)) = (&si.file, &di.file) else {
        return Err(QemuError::Protocol(format!(
            "comparing RAM needs both VMs started with ram_in_file ({}: {}, {}: {})",
            src.name(),
            si.file.is_some(),
            dst.name(),
            di.file.is_some()
        )));
    };
    if (si.bytes, &si.machine) != (di.bytes, &di.machine) {
        return Err(QemuError::Protocol(format!(
            "VMs {} and {} differ in RAM ({} vs {} bytes) or machine ({} vs {})",
            src.name(),
            dst.name(),
            si.bytes,
            di.bytes,
            si.machine,
            di.machine
        )));
    }
    let stopped = |vm: &Qemu| -> Result<RunState> {
        let s = vm.qmp().query_status()?;
        match s.status {
            RunState::PostMigrate | RunState::Paused if !s.running => Ok(s.status),
            other => Err(QemuError::Protocol(format!(
                "comparing RAM needs {} stopped after the migration, it is `{other}`",
                vm.name()
            ))),
        }
    };
    stopped(src)?;
    stopped(dst)?;
    let cmp = compare_ram_files(sf, df, &RamLayout::x86(&si.machine, si.bytes))?;
    tracing::info!(src = src.name(), dst = dst.name(), elapsed = ?cmp.elapsed, "{cmp}");
    Ok(cmp)
}

/// The cutover check of the harness's migrations: waits (up to `timeout`) until `dst` (started
/// [`held_at_cutover`](super::QemuConfig::held_at_cutover)) has loaded the migration and is
/// `paused`, compares its RAM with `src`'s ([`compare_ram`]), and resumes it only if they are
/// equal. A difference is [`QemuError::RamMismatch`], with `dst` left paused.
pub fn check_ram_then_resume(src: &Qemu, dst: &Qemu, timeout: Duration) -> Result<RamComparison> {
    if !dst.started_paused() {
        return Err(QemuError::Protocol(format!(
            "destination {} runs as soon as it loaded: start it with QemuConfig::held_at_cutover \
             so its RAM can be compared at cutover",
            dst.name()
        )));
    }
    dst.qmp().wait_status(&RunState::Paused, timeout)?;
    let cmp = compare_ram(src, dst)?;
    if !cmp.is_equal() {
        return Err(QemuError::RamMismatch(Box::new(cmp)));
    }
    dst.qmp().cont()?;
    dst.qmp().wait_status(&RunState::Running, timeout)?;
    Ok(cmp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pages(n: usize, seed: u8) -> Vec<u8> {
        (0..n * PAGE_SIZE).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
    }

    #[test]
    fn equal_ram_and_the_pages_that_differ() {
        let layout = RamLayout::x86("pc", (300 * PAGE_SIZE) as u64);
        let src = pages(300, 7);
        let cmp = compare_readers(&src[..], &src[..], &layout).unwrap();
        assert!(cmp.is_equal() && cmp.pages == 300, "{cmp:?}");

        let mut dst = src.clone();
        // Page 3: one byte at +0x123; page 290 (across the first 1 MiB chunk): 17 bytes.
        dst[3 * PAGE_SIZE + 0x123] ^= 0xff;
        for b in &mut dst[290 * PAGE_SIZE + 4000..290 * PAGE_SIZE + 4017] {
            *b = 0xee;
        }
        let cmp = compare_readers(&src[..], &dst[..], &layout).unwrap();
        assert_eq!((cmp.pages, cmp.differing, cmp.first.len()), (300, 2, 2));
        let d = &cmp.first[0];
        assert_eq!((d.offset, d.gpa, d.differing_bytes, d.excerpt_at), (0x3000, 0x3000, 1, 0x120));
        assert_eq!(&d.source[..], &src[0x3120..0x3130]);
        assert_eq!(&d.destination[..], &dst[0x3120..0x3130]);
        assert_eq!(d.source[3] ^ d.destination[3], 0xff);
        assert_eq!((cmp.first[1].offset, cmp.first[1].differing_bytes), (290 * 4096, 17));
        let text = cmp.to_string();
        assert!(text.starts_with("RAM differs at cutover: 2 of 300 pages\n  gpa 0x3000 (1 bytes differ): +0x120 source "), "{text}");

        // Short input is an error, not a silent pass.
        assert!(compare_readers(&src[..100], &src[..], &layout).is_err());

        // RAM that ends in a partial page: its difference is still reported.
        let odd = RamLayout::x86("pc", (PAGE_SIZE + 20) as u64);
        let (a, mut b) = (vec![1u8; PAGE_SIZE + 20], vec![1u8; PAGE_SIZE + 20]);
        b[PAGE_SIZE + 18] = 2;
        let cmp = compare_readers(&a[..], &b[..], &odd).unwrap();
        assert_eq!((cmp.pages, cmp.differing, cmp.first[0].excerpt_at), (2, 1, 16));
        assert_eq!(cmp.first[0].destination[..4], [1, 1, 2, 1]);
    }

    #[test]
    fn details_stop_at_detailed_pages_but_the_count_does_not() {
        let layout = RamLayout::x86("pc", (20 * PAGE_SIZE) as u64);
        let src = pages(20, 1);
        let dst = pages(20, 2);
        let cmp = compare_readers(&src[..], &dst[..], &layout).unwrap();
        assert_eq!((cmp.differing, cmp.first.len()), (20, DETAILED_PAGES));
        assert!(cmp.to_string().ends_with("..."));
    }

    #[test]
    fn guest_physical_addresses_of_pc_and_q35() {
        let small = RamLayout::x86("pc", 2 << 30);
        assert_eq!((small.below_4g, small.gpa(0x1234_5000)), (2 << 30, 0x1234_5000));
        let big = RamLayout::x86("pc", 4 << 30);
        assert_eq!(big.below_4g, 0xc000_0000);
        assert_eq!(big.gpa(0xc000_0000), 4 << 30);
        assert_eq!(big.gpa(0xc000_1000), (4 << 30) + 0x1000);
        assert_eq!(RamLayout::x86("pc-q35-10.0", 3 << 30).below_4g, 0x8000_0000);
        assert_eq!(RamLayout::x86("q35", 2 << 30).below_4g, 2 << 30);
    }
}
