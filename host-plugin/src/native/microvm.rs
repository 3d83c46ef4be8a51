//! The reference microVM: one memory slot with KVM dirty logging, guest memory through
//! vm-memory with its dirty bitmap, one vCPU on its own thread, no irqchip, no devices but a
//! report port, and an embedded tiny guest.
//!
//! # The guest
//! 36 bytes of 32-bit flat protected-mode code (segments set through `KVM_SET_SREGS`, so no
//! GDT, no paging), at [`CODE_ADDR`]. The VMM loads its parameters into registers; they are
//! part of the vCPU state, so a migrated guest keeps them:
//! `ebx` = first data page ([`DATA_ADDR`]), `ecx` = pages written per round (working set),
//! `ebp` = delay loop iterations per round (write rate), `esi` = report mask (2^k − 1),
//! `eax` = the counter.
//! ```text
//! 00 40              top:   inc  eax             ; next round
//! 01 89 df                  mov  edi, ebx        ; first data page
//! 03 89 ca                  mov  edx, ecx        ; pages to write
//! 05 89 07           fill:  mov  [edi], eax      ; the counter into the page
//! 07 81 c7 00 10 00 00      add  edi, 0x1000
//! 0d 4a                     dec  edx
//! 0e 75 f5                  jnz  fill
//! 10 89 ea                  mov  edx, ebp        ; delay
//! 12 85 d2                  test edx, edx
//! 14 74 03                  jz   report
//! 16 4a              delay: dec  edx
//! 17 75 fd                  jnz  delay
//! 19 85 f0          report: test eax, esi        ; every 2^k rounds:
//! 1b 75 e3                  jnz  top
//! 1d 66 ba f8 03            mov  dx, 0x3f8
//! 21 ef                     out  dx, eax         ; report the counter (a VM exit)
//! 22 eb dc                  jmp  top
//! ```
//! A round is `4·pages + 2·delay + 8` instructions, plus 3 when it reports
//! ([`GuestParams::instructions_per_round`]). The code page is never written by the guest.
//!
//! # Pausing
//! A vCPU stops only at its next exit. To stop it now, [`MicroVm::pause`] sets the pause flag
//! and sends the vCPU thread [`kick_signal`]; the handler sets `kvm_run.immediate_exit`, so a
//! `KVM_RUN` in progress returns `EINTR` at once and one about to start returns at entry (the
//! thread clears `immediate_exit` before it checks the flag, so no kick is lost).

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_segment, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::bitmap::DirtyBitmap;
use super::stream::{RamBlock, PAGE_SIZE};
use super::vcpu_state::{check_cpuid, StateError, VcpuState};

/// Guest physical address of the guest code.
pub const CODE_ADDR: u64 = 0x1000;
/// Guest physical address of the first page the guest writes.
pub const DATA_ADDR: u64 = 0x10000;
/// The I/O port the guest reports its counter on.
pub const REPORT_PORT: u16 = 0x3f8;
/// The memory slot of the guest's memory.
pub const SLOT: u32 = 0;
const TSS_ADDR: usize = 0xfffb_d000;
/// How long [`MicroVm::pause`] waits for the vCPU thread to stop.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The guest code (see the module docs).
pub const GUEST_CODE: [u8; 36] = [
    0x40, 0x89, 0xdf, 0x89, 0xca, 0x89, 0x07, 0x81, 0xc7, 0x00, 0x10, 0x00, 0x00, 0x4a, 0x75, 0xf5, 0x89, 0xea, 0x85, 0xd2, 0x74, 0x03, 0x4a, 0x75, 0xfd, 0x85, 0xf0, 0x75, 0xe3, 0x66, 0xba, 0xf8, 0x03, 0xef, 0xeb, 0xdc,
];

/// What went wrong with a microVM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A KVM call failed.
    #[error("{what}: {source}")]
    Kvm {
        /// The call.
        what: &'static str,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be set up or accessed.
    #[error("guest memory: {0}")]
    Memory(String),
    /// The configuration does not describe a guest that fits.
    #[error("microVM configuration: {0}")]
    Config(String),
    /// The vCPU thread stopped on an error or an exit it cannot handle.
    #[error("vCPU: {0}")]
    Vcpu(String),
    /// Saving or restoring the vCPU state failed.
    #[error(transparent)]
    State(#[from] StateError),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// The guest's parameters (loaded into its registers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestParams {
    /// Pages written per round, from [`DATA_ADDR`] on (the working set).
    pub pages: u32,
    /// Delay loop iterations per round (lower = a higher write rate).
    pub delay: u32,
    /// Report the counter every 2^this rounds (an exit each time).
    pub report_every_log2: u8,
}

impl GuestParams {
    /// Guest instructions per round (see the module docs), without the report's 3.
    pub fn instructions_per_round(&self) -> u64 {
        4 * u64::from(self.pages) + 2 * u64::from(self.delay) + 8
    }

    /// Guest instructions between two reports.
    pub fn instructions_per_report(&self) -> u64 {
        (self.instructions_per_round() << self.report_every_log2) + 3
    }
}

/// How to build a microVM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MicroVmConfig {
    /// Guest memory in bytes (one slot at GPA 0; a multiple of 4 KiB).
    pub mem_size: u64,
    /// The guest's parameters.
    pub guest: GuestParams,
}

/// What the guest reported on [`REPORT_PORT`], as seen by the VMM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reports {
    /// Reports received.
    pub count: u64,
    /// The first report: counter and when it came.
    pub first: Option<(u32, Instant)>,
    /// The latest report.
    pub last: Option<(u32, Instant)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunState {
    Paused,
    Running,
    Stopped,
}

/// What the controller and the vCPU thread share.
struct Shared {
    pause: AtomicBool,
    state: Mutex<(RunState, Option<String>)>,
    changed: Condvar,
    reports: Mutex<Reports>,
}

impl Shared {
    fn set_state(&self, state: RunState, error: Option<String>) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.0 = state;
        if error.is_some() {
            s.1 = error;
        }
        self.changed.notify_all();
    }
}

enum Command {
    Resume,
    Save(mpsc::Sender<Result<VcpuState, StateError>>),
    Restore(Box<VcpuState>, mpsc::Sender<Result<(), StateError>>),
}

thread_local! {
    /// The vCPU thread's `kvm_run.immediate_exit` byte (null on other threads).
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal that kicks a vCPU thread out of `KVM_RUN` (the first real-time signal, as Cloud
/// Hypervisor uses).
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Async-signal-safe: a const-initialised thread-local without destructor, and one store.
    let p = IMMEDIATE_EXIT.with(Cell::get);
    if !p.is_null() {
        // SAFETY: the pointer is set by this thread's vCPU loop to its own `kvm_run` mapping,
        // which lives as long as the loop's `VcpuFd`, and cleared before that is dropped; the
        // kernel reads the byte at KVM_RUN entry, which is what this store is for (KVM API doc,
        // `immediate_exit`).
        unsafe { p.write_volatile(1) };
    }
}

/// A running (or paused) reference microVM. See the module docs.
pub struct MicroVm {
    // Drop order matters: the vCPU thread stops first, then the VM, then the memory it maps.
    vcpu: Option<JoinHandle<()>>,
    commands: mpsc::Sender<Command>,
    shared: Arc<Shared>,
    vm: VmFd,
    memory: GuestMemoryMmap<AtomicBitmap>,
    block: RamBlock,
    dirty_logging: bool,
}

impl MicroVm {
    /// A microVM with the guest loaded, paused before its first instruction.
    pub fn new(config: MicroVmConfig) -> Result<Self, VmError> {
        let g = config.guest;
        let end = DATA_ADDR + u64::from(g.pages) * PAGE_SIZE as u64;
        if g.pages == 0 || end > config.mem_size || g.report_every_log2 > 31 {
            return Err(VmError::Config(format!("{} pages from {DATA_ADDR:#x} in {} bytes of memory (report every 2^{})", g.pages, config.mem_size, g.report_every_log2)));
        }
        let vm = Self::incoming(config.mem_size)?;
        vm.memory.write_slice(&GUEST_CODE, GuestAddress(CODE_ADDR)).map_err(|e| VmError::Memory(e.to_string()))?;
        // eax (the counter) starts at 0.
        let regs = kvm_bindings::kvm_regs { rip: CODE_ADDR, rflags: 2, rbx: DATA_ADDR, rcx: u64::from(g.pages), rbp: u64::from(g.delay), rsi: (1u64 << g.report_every_log2) - 1, ..Default::default() };
        let (tx, rx) = mpsc::channel();
        vm.command(Command::Restore(Box::new(flat_mode_state(&vm, regs)?), tx))?;
        rx.recv().map_err(|_| VmError::Vcpu("vCPU thread gone".into()))??;
        Ok(vm)
    }

    /// A microVM of `mem_size` bytes of zeroed memory and a fresh vCPU, paused: the
    /// destination of a migration, to be filled with pages and a state.
    pub fn incoming(mem_size: u64) -> Result<Self, VmError> {
        if mem_size == 0 || !mem_size.is_multiple_of(PAGE_SIZE as u64) {
            return Err(VmError::Config(format!("memory size {mem_size} is not a positive multiple of 4 KiB")));
        }
        let size = usize::try_from(mem_size).map_err(|_| VmError::Config("memory size".into()))?;
        let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        if let Err(e) = vm.set_tss_address(TSS_ADDR) {
            tracing::debug!(error = %e, "KVM_SET_TSS_ADDR");
        }
        let memory = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), size)]).map_err(|e| VmError::Memory(e.to_string()))?;
        let block = RamBlock { slot: SLOT, guest_addr: 0, len: mem_size };
        let vcpu = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        register_signal_handler(kick_signal(), kick_handler).map_err(kvm_err("sigaction (vCPU kick)"))?;
        let shared = Arc::new(Shared { pause: AtomicBool::new(true), state: Mutex::new((RunState::Paused, None)), changed: Condvar::new(), reports: Mutex::new(Reports::default()) });
        let (commands, rx) = mpsc::channel();
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new().name("microvm-vcpu0".into()).spawn(move || vcpu_loop(vcpu, &kvm, &shared, &rx)).map_err(|e| VmError::Vcpu(format!("cannot start the vCPU thread: {e}")))?
        };
        let mut me = Self { vcpu: Some(thread), commands, shared, vm, memory, block, dirty_logging: false };
        me.register_slot(false)?;
        Ok(me)
    }

    fn register_slot(&mut self, log_dirty: bool) -> Result<(), VmError> {
        let host = self.memory.get_host_address(GuestAddress(self.block.guest_addr)).map_err(|e| VmError::Memory(e.to_string()))?;
        let region = kvm_userspace_memory_region { slot: self.block.slot, flags: if log_dirty { KVM_MEM_LOG_DIRTY_PAGES } else { 0 }, guest_phys_addr: self.block.guest_addr, memory_size: self.block.len, userspace_addr: host as u64 };
        // SAFETY: `host` is the start of this VM's own mmap of `block.len` bytes, which lives as
        // long as `self.memory`; `self.vm` (declared before it) is dropped first, so KVM never
        // maps memory that is gone.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        self.dirty_logging = log_dirty;
        Ok(())
    }

    /// The memory slot, as a RAM block of a native stream.
    pub fn block(&self) -> RamBlock {
        self.block
    }

    /// Turns dirty logging on (KVM's log for the slot, and vm-memory's bitmap reset), so that
    /// [`MicroVm::dirty_pages`] reports pages written from now on.
    pub fn start_dirty_log(&mut self) -> Result<(), VmError> {
        self.register_slot(true)?;
        self.vmm_bitmap().reset();
        Ok(())
    }

    /// Turns KVM's dirty logging off.
    pub fn stop_dirty_log(&mut self) -> Result<(), VmError> {
        self.register_slot(false)
    }

    fn vmm_bitmap(&self) -> &AtomicBitmap {
        // One region, the slot's.
        self.memory.iter().next().map(|r| (**r).bitmap()).expect("the microVM has one memory region")
    }

    /// The pages written since the last call (or since dirty logging started), by the guest
    /// (KVM's log) or the VMM (vm-memory's bitmap), and resets both.
    pub fn dirty_pages(&self) -> Result<DirtyBitmap, VmError> {
        if !self.dirty_logging {
            return Err(VmError::Config("dirty logging is off".into()));
        }
        let kvm_log = self.vm.get_dirty_log(self.block.slot, self.block.len as usize).map_err(kvm_err("KVM_GET_DIRTY_LOG"))?;
        let vmm = self.vmm_bitmap().get_and_reset();
        Ok(DirtyBitmap::union_of(self.block.pages(), &[&kvm_log, &vmm]))
    }

    /// KVM's dirty log alone (resets it), for tests that tell the two sources apart.
    pub fn kvm_dirty_log(&self) -> Result<DirtyBitmap, VmError> {
        let kvm_log = self.vm.get_dirty_log(self.block.slot, self.block.len as usize).map_err(kvm_err("KVM_GET_DIRTY_LOG"))?;
        Ok(DirtyBitmap::union_of(self.block.pages(), &[&kvm_log]))
    }

    /// vm-memory's bitmap alone (resets it).
    pub fn vmm_dirty_bitmap(&self) -> DirtyBitmap {
        DirtyBitmap::union_of(self.block.pages(), &[&self.vmm_bitmap().get_and_reset()])
    }

    /// Guest memory (vm-memory; writes through it are tracked in its bitmap).
    pub fn memory(&self) -> &GuestMemoryMmap<AtomicBitmap> {
        &self.memory
    }

    /// Copies page `offset` (bytes, relative to the slot) into `buf` (4096 bytes).
    pub fn read_page(&self, offset: u64, buf: &mut [u8]) -> Result<(), VmError> {
        self.memory.read_slice(buf, GuestAddress(self.block.guest_addr + offset)).map_err(|e| VmError::Memory(e.to_string()))
    }

    /// Writes page `offset` (bytes, relative to the slot) from `data`.
    pub fn write_page(&self, offset: u64, data: &[u8]) -> Result<(), VmError> {
        self.memory.write_slice(data, GuestAddress(self.block.guest_addr + offset)).map_err(|e| VmError::Memory(e.to_string()))
    }

    /// blake3 of the whole guest memory.
    pub fn memory_digest(&self) -> Result<blake3::Hash, VmError> {
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut at = 0;
        while at < self.block.len {
            let n = (self.block.len - at).min(buf.len() as u64) as usize;
            self.memory.read_slice(&mut buf[..n], GuestAddress(self.block.guest_addr + at)).map_err(|e| VmError::Memory(e.to_string()))?;
            hasher.update(&buf[..n]);
            at += n as u64;
        }
        Ok(hasher.finalize())
    }

    /// The guest's reports so far.
    pub fn reports(&self) -> Reports {
        *self.shared.reports.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Why the vCPU stopped, if it stopped on an error.
    pub fn vcpu_error(&self) -> Option<String> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner()).1.clone()
    }

    fn wait_for(&self, want: RunState, timeout: Duration) -> Result<(), VmError> {
        let deadline = Instant::now() + timeout;
        let mut s = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if s.0 == want {
                return Ok(());
            }
            if s.0 == RunState::Stopped {
                return Err(VmError::Vcpu(s.1.clone().unwrap_or_else(|| "stopped".into())));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(VmError::Vcpu(format!("not {want:?} within {timeout:?}")));
            }
            s = self.shared.changed.wait_timeout(s, left).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    fn run_state(&self) -> RunState {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner()).0
    }

    /// Sends a command to the paused vCPU thread (a running one would only read it at its
    /// next pause).
    fn command(&self, command: Command) -> Result<(), VmError> {
        match self.run_state() {
            RunState::Paused => self.commands.send(command).map_err(|_| VmError::Vcpu("vCPU thread gone".into())),
            other => Err(VmError::Vcpu(format!("the vCPU is {other:?}, not paused"))),
        }
    }

    /// Whether the vCPU runs.
    pub fn is_running(&self) -> bool {
        self.run_state() == RunState::Running
    }

    /// Starts (or resumes) the vCPU; a running one is left alone.
    pub fn resume(&self) -> Result<(), VmError> {
        if self.is_running() {
            return Ok(());
        }
        self.command(Command::Resume).map_err(|_| VmError::Vcpu("vCPU thread gone".into()))?;
        self.wait_for(RunState::Running, PAUSE_TIMEOUT)
    }

    /// Stops the vCPU now (signal kick + immediate exit) and returns how long it took, from
    /// the request to the vCPU thread's acknowledgement.
    pub fn pause(&self) -> Result<Duration, VmError> {
        let t0 = Instant::now();
        self.shared.pause.store(true, Ordering::SeqCst);
        if let Some(thread) = &self.vcpu {
            thread.kill(kick_signal()).map_err(kvm_err("pthread_kill (vCPU kick)"))?;
        }
        self.wait_for(RunState::Paused, PAUSE_TIMEOUT)?;
        Ok(t0.elapsed())
    }

    /// Saves the vCPU's state (the vCPU must be paused).
    pub fn save_state(&self) -> Result<VcpuState, VmError> {
        let (tx, rx) = mpsc::channel();
        self.command(Command::Save(tx))?;
        Ok(rx.recv().map_err(|_| VmError::Vcpu("vCPU thread gone".into()))??)
    }

    /// Checks `state`'s CPUID against what this VM's vCPU presents and restores it (the vCPU
    /// must be paused, and not restored before).
    ///
    /// The reference is the CPUID the fresh vCPU presents (`KVM_GET_CPUID2` after the VMM set
    /// `KVM_GET_SUPPORTED_CPUID`'s), not the supported list itself: on stock KVM the two are
    /// the same, but under PVM (this machine) the supported list understates what a vCPU
    /// presents (leaf 1 ecx 0x81202000 supported, 0xf7f83203 presented), so checking against
    /// it would refuse even a same-host restore.
    pub fn restore_state(&self, state: VcpuState) -> Result<(), VmError> {
        let presented = self.save_state()?.cpuid;
        check_cpuid(&state.cpuid, &presented)?;
        let (tx, rx) = mpsc::channel();
        self.command(Command::Restore(Box::new(state), tx))?;
        Ok(rx.recv().map_err(|_| VmError::Vcpu("vCPU thread gone".into()))??)
    }
}

impl Drop for MicroVm {
    fn drop(&mut self) {
        let stopped = self.pause().is_ok() || self.run_state() == RunState::Stopped;
        // Closing the command channel ends the paused loop.
        self.commands = mpsc::channel().0;
        if stopped {
            if let Some(t) = self.vcpu.take() {
                let _ = t.join();
            }
        }
        // A vCPU that would not pause is left to the process's exit: its thread owns the
        // VcpuFd (and so the kvm_run mapping) and never touches this VM's memory itself.
    }
}

/// The state of a vCPU fresh out of reset, switched to flat 32-bit protected mode with `regs`.
fn flat_mode_state(vm: &MicroVm, regs: kvm_bindings::kvm_regs) -> Result<VcpuState, VmError> {
    let mut state = vm.save_state()?;
    let code = kvm_segment { base: 0, limit: 0xffff_ffff, selector: 0x8, type_: 0xb, present: 1, dpl: 0, db: 1, s: 1, l: 0, g: 1, avl: 0, unusable: 0, padding: 0 };
    let data = kvm_segment { selector: 0x10, type_: 0x3, ..code };
    let s = &mut state.sregs;
    s.cs = code;
    (s.ds, s.es, s.fs, s.gs, s.ss) = (data, data, data, data, data);
    s.cr0 |= 1; // PE
    state.regs = regs;
    Ok(state)
}

fn vcpu_loop(mut vcpu: VcpuFd, kvm: &Kvm, shared: &Shared, commands: &mpsc::Receiver<Command>) {
    IMMEDIATE_EXIT.with(|p| p.set(&mut vcpu.get_kvm_run().immediate_exit));
    let error = run_until_error(&mut vcpu, kvm, shared, commands);
    IMMEDIATE_EXIT.with(|p| p.set(std::ptr::null_mut()));
    shared.set_state(RunState::Stopped, error);
}

/// The vCPU thread: paused, it serves commands; running, it runs the guest until paused.
/// Returns the error it stopped on, or None when the command channel closed.
fn run_until_error(vcpu: &mut VcpuFd, kvm: &Kvm, shared: &Shared, commands: &mpsc::Receiver<Command>) -> Option<String> {
    // The last exit was an I/O exit KVM completes only at the next KVM_RUN.
    let mut io_pending = false;
    loop {
        if shared.pause.load(Ordering::SeqCst) {
            if std::mem::take(&mut io_pending) {
                // KVM API (KVM_RUN): after an I/O exit the guest state is consistent only once
                // KVM_RUN was entered again (stock KVM advances rip past an `out` then);
                // with immediate_exit set, KVM completes the I/O and returns EINTR without
                // running the guest. Needed before a state is saved for migration.
                vcpu.set_kvm_immediate_exit(1);
                match vcpu.run() {
                    Err(e) if e.errno() == libc::EINTR => {}
                    Ok(exit) => return Some(format!("completing I/O before a pause: unexpected exit {exit:?}")),
                    Err(e) => return Some(format!("completing I/O before a pause: KVM_RUN: {e}")),
                }
            }
            shared.set_state(RunState::Paused, None);
            match commands.recv() {
                Ok(Command::Resume) => {
                    shared.pause.store(false, Ordering::SeqCst);
                    shared.set_state(RunState::Running, None);
                }
                Ok(Command::Save(reply)) => {
                    let _ = reply.send(VcpuState::save(kvm, vcpu));
                }
                Ok(Command::Restore(state, reply)) => {
                    let _ = reply.send(state.restore(vcpu));
                }
                Err(_) => return None,
            }
            continue;
        }
        // Clear before checking the flag: a kick from here on makes KVM_RUN return at once.
        vcpu.set_kvm_immediate_exit(0);
        if shared.pause.load(Ordering::SeqCst) {
            continue;
        }
        io_pending = false; // this KVM_RUN completes it
        match vcpu.run() {
            Ok(VcpuExit::IoOut(REPORT_PORT, data)) if data.len() == 4 => {
                io_pending = true;
                let counter = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                let mut r = shared.reports.lock().unwrap_or_else(|e| e.into_inner());
                let now = Instant::now();
                r.count += 1;
                r.first.get_or_insert((counter, now));
                r.last = Some((counter, now));
            }
            Ok(VcpuExit::Intr) => {}
            Ok(other) => return Some(format!("unexpected exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => return Some(format!("KVM_RUN: {e}")),
        }
    }
}

/// A measurement of this host's KVM: guest µs per instruction, from a short run of a
/// microVM (KVM here may emulate every instruction; tests size their work by it).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Calibration {
    /// Microseconds of wall time per guest instruction.
    pub us_per_instruction: f64,
    /// Guest instructions between two exits in the calibration run.
    pub instructions_per_exit: u64,
    /// Reports seen.
    pub reports: u64,
}

/// Runs a small guest for about `run` and measures µs per guest instruction from the
/// counter's progress between its first and last report.
pub fn calibrate(run: Duration) -> Result<Calibration, VmError> {
    let guest = GuestParams { pages: 16, delay: 500, report_every_log2: 2 };
    let vm = MicroVm::new(MicroVmConfig { mem_size: 1 << 20, guest })?;
    vm.resume()?;
    std::thread::sleep(run);
    vm.pause()?;
    let r = vm.reports();
    match (r.first, r.last) {
        (Some((c0, t0)), Some((c1, t1))) if c1 > c0 => {
            let rounds = u64::from(c1 - c0);
            let reports = rounds >> guest.report_every_log2;
            let instructions = rounds * guest.instructions_per_round() + 3 * reports;
            Ok(Calibration { us_per_instruction: (t1 - t0).as_secs_f64() * 1e6 / instructions as f64, instructions_per_exit: guest.instructions_per_report(), reports: r.count })
        }
        _ => Err(VmError::Vcpu(format!("the calibration guest reported {} times in {run:?}{}", r.count, vm.vcpu_error().map(|e| format!(" ({e})")).unwrap_or_default()))),
    }
}
