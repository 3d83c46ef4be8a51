//! A blocking pre-copy of a [`MicroVm`] into a byte sink, and its receiving side: the thin
//! shells around the sans-IO [`StreamWriter`] and [`StreamReader`].
//!
//! Source: dirty logging on; pass 0 sends every page; each later pass sends the pages dirtied
//! since the previous one (KVM's log ∪ vm-memory's bitmap); after `min_passes`, stop iterating
//! when a pass would send at most `stop_below_pages` pages, or at `max_passes`; then pause the
//! vCPU (signal kick), send the final pass, the vCPU state and EOF. The source is left paused.
//! (Phase 1: the stop rule is a page count; the QEMU path's convergence controller, fed by the
//! gateway's drain rate, is the phase-2 rule.)
//!
//! Destination: a paused [`MicroVm::incoming`] sized from the stream's slot, pages written as
//! they come, the state checked (CPUID) and restored; it is left paused for the caller to
//! compare and resume.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use super::bitmap::DirtyBitmap;
use super::microvm::{MicroVm, VmError};
use super::stream::{Event, ReaderLimits, Step, StreamError, StreamReader, StreamWriter, PAGE_SIZE};
use super::vcpu_state::{StateError, VcpuState};

/// What went wrong in a pre-copy.
#[derive(Debug, thiserror::Error)]
pub enum PrecopyError {
    /// The byte stream failed.
    #[error("migration stream I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The stream is not one this build reads.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// The vCPU state could not be decoded.
    #[error(transparent)]
    State(#[from] StateError),
    /// The microVM failed.
    #[error(transparent)]
    Vm(#[from] VmError),
}

/// When the source stops iterating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrecopyPolicy {
    /// Passes (pass 0 included) before the stop rule applies.
    pub min_passes: u32,
    /// Passes before the final one, at most.
    pub max_passes: u32,
    /// Stop iterating when a pass would send at most this many pages.
    pub stop_below_pages: u64,
    /// Shortest time between the starts of two passes (a pass into memory takes microseconds;
    /// the guest needs time to dirty pages).
    pub min_pass_time: Duration,
}

/// One pass over memory as sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PassStats {
    /// Pages sent as PAGE records.
    pub pages: u64,
    /// Pages sent as ZERO records.
    pub zero_pages: u64,
    /// Stream bytes of the pass.
    pub bytes: u64,
}

/// What a source pre-copy did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceReport {
    /// Every pass, the final one last.
    pub passes: Vec<PassStats>,
    /// From the pause request to the vCPU's acknowledgement.
    pub pause_latency: Duration,
    /// From the pause request to the last byte handed to the sink.
    pub paused_for: Duration,
    /// blake3 of the source's memory while paused, after the final pass.
    pub memory_digest: blake3::Hash,
    /// Bytes of the encoded vCPU state.
    pub state_bytes: u64,
    /// Bytes of the whole stream.
    pub total_bytes: u64,
}

/// Writes `out` to `sink` and empties it.
fn drain(sink: &mut impl Write, out: &mut Vec<u8>, total: &mut u64) -> std::io::Result<()> {
    sink.write_all(out)?;
    *total += out.len() as u64;
    out.clear();
    Ok(())
}

fn send_pass(vm: &MicroVm, writer: &mut StreamWriter, dirty: &DirtyBitmap, last: bool, sink: &mut impl Write, total: &mut u64) -> Result<PassStats, PrecopyError> {
    let mut out = Vec::with_capacity(256 << 10);
    let start = *total;
    let mut stats = PassStats { pages: 0, zero_pages: 0, bytes: 0 };
    let mut page = vec![0u8; PAGE_SIZE];
    writer.begin_pass(last, &mut out)?;
    for range in dirty.ranges() {
        for p in range {
            let offset = p * PAGE_SIZE as u64;
            vm.read_page(offset, &mut page)?;
            if writer.page(0, offset, &page, &mut out)? {
                stats.zero_pages += 1;
            } else {
                stats.pages += 1;
            }
            if out.len() >= 256 << 10 {
                drain(sink, &mut out, total)?;
            }
        }
    }
    writer.end_pass(&mut out)?;
    drain(sink, &mut out, total)?;
    stats.bytes = *total - start;
    Ok(stats)
}

/// Migrates `vm` (running) into `sink` (see the module docs). Leaves it paused.
pub fn send(vm: &mut MicroVm, sink: &mut impl Write, policy: PrecopyPolicy) -> Result<SourceReport, PrecopyError> {
    let mut total = 0u64;
    let mut out = Vec::new();
    let block = vm.block();
    let mut writer = StreamWriter::new(vec![block], &mut out)?;
    drain(sink, &mut out, &mut total)?;
    vm.start_dirty_log()?;
    let mut passes = Vec::new();
    let mut dirty = DirtyBitmap::all(block.pages());
    loop {
        let started = Instant::now();
        passes.push(send_pass(vm, &mut writer, &dirty, false, sink, &mut total)?);
        std::thread::sleep(policy.min_pass_time.saturating_sub(started.elapsed()));
        dirty = vm.dirty_pages()?;
        let n = passes.len() as u32;
        tracing::debug!(pass = n, sent = ?passes.last(), dirty = dirty.count(), "pre-copy pass");
        if n >= policy.max_passes || (n >= policy.min_passes && dirty.count() <= policy.stop_below_pages) {
            break;
        }
    }
    let paused_at = Instant::now();
    let pause_latency = vm.pause()?;
    // What the last harvest found (not sent yet) and what the guest wrote since.
    dirty.union(&vm.dirty_pages()?);
    passes.push(send_pass(vm, &mut writer, &dirty, true, sink, &mut total)?);
    let memory_digest = vm.memory_digest()?;
    let state = vm.save_state()?.encode();
    writer.finish(&state, &mut out)?;
    drain(sink, &mut out, &mut total)?;
    sink.flush()?;
    vm.stop_dirty_log()?;
    Ok(SourceReport { passes, pause_latency, paused_for: paused_at.elapsed(), memory_digest, state_bytes: state.len() as u64, total_bytes: total })
}

/// What a destination received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestinationReport {
    /// Pages received per pass (PAGE and ZERO records), the final pass last.
    pub pages_per_pass: Vec<u64>,
    /// blake3 of the destination's memory after the final pass, before it runs.
    pub memory_digest: blake3::Hash,
    /// Bytes read from the source.
    pub total_bytes: u64,
}

/// Counts a page of the current pass (the reader returns pages only inside a pass).
fn count_page(pages_per_pass: &mut [u64]) {
    if let Some(n) = pages_per_pass.last_mut() {
        *n += 1;
    }
}

/// Receives a native stream from `source` into a new paused microVM (see the module docs).
/// Only microVMs of one slot at GPA 0 are built here.
pub fn receive(source: &mut impl Read, limits: ReaderLimits) -> Result<(MicroVm, DestinationReport), PrecopyError> {
    let mut reader = StreamReader::new(limits);
    let mut buf: Vec<u8> = Vec::with_capacity(256 << 10);
    let mut start = 0usize;
    let mut total = 0u64;
    let mut vm: Option<MicroVm> = None;
    let mut pages_per_pass = Vec::new();
    let mut state: Option<VcpuState> = None;
    let mut digest = None;
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        let step = reader.next(&buf[start..])?;
        let (consumed, event) = match step {
            Step::NeedMore(n) => {
                // Compact, then read; `n` is bounded by the reader's limits.
                buf.drain(..start);
                start = 0;
                while buf.len() < n {
                    let got = source.read(&mut chunk)?;
                    if got == 0 {
                        return Err(StreamError::Malformed(format!("stream ended after {total} bytes, before EOF")).into());
                    }
                    total += got as u64;
                    buf.extend_from_slice(&chunk[..got]);
                }
                continue;
            }
            Step::Event { consumed, event } => (consumed, event),
        };
        match event {
            Event::Blocks(blocks) => {
                let [b] = blocks[..] else {
                    return Err(StreamError::Malformed(format!("{} memory slots; the microVM has one", blocks.len())).into());
                };
                if b.guest_addr != 0 || b.slot != super::microvm::SLOT {
                    return Err(StreamError::Malformed(format!("slot {} at {:#x}; the microVM has slot 0 at 0", b.slot, b.guest_addr)).into());
                }
                vm = Some(MicroVm::incoming(b.len)?);
            }
            Event::PassStart { .. } => pages_per_pass.push(0),
            Event::Page { offset, data, .. } => {
                vm.as_ref().ok_or(StreamError::Malformed("page before the block list".into()))?.write_page(offset, data)?;
                count_page(&mut pages_per_pass);
            }
            Event::Zero { offset, .. } => {
                vm.as_ref().ok_or(StreamError::Malformed("page before the block list".into()))?.write_page(offset, &[0; PAGE_SIZE])?;
                count_page(&mut pages_per_pass);
            }
            Event::PassEnd => {}
            Event::State(bytes) => {
                state = Some(VcpuState::decode(bytes)?);
                digest = vm.as_ref().map(MicroVm::memory_digest).transpose()?;
            }
            Event::Eof => {
                start += consumed;
                break;
            }
        }
        start += consumed;
    }
    if start != buf.len() {
        return Err(StreamError::Malformed("bytes after EOF".into()).into());
    }
    let (Some(vm), Some(state), Some(memory_digest)) = (vm, state, digest) else {
        return Err(StreamError::Malformed("EOF before memory and state".into()).into());
    };
    vm.restore_state(state)?;
    Ok((vm, DestinationReport { pages_per_pass, memory_digest, total_bytes: total }))
}
