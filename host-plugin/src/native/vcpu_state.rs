//! A vCPU's architectural state: saved from KVM, encoded (versioned), checked against the
//! destination's CPUID and restored.
//!
//! What is saved is what a vCPU without an in-kernel irqchip has (Cloud Hypervisor's and
//! Firecracker's x86_64 sets, less the LAPIC, which needs an irqchip): CPUID, mp_state, regs,
//! sregs, xsave (where KVM has XSAVE) and xcrs, fpu, debug registers, the MSRs KVM lists as
//! saved (`KVM_GET_MSR_INDEX_LIST`, those that read back), and vcpu_events last. Restore follows
//! Cloud Hypervisor's order: CPUID, mp_state first, regs, sregs, xsave, xcrs, fpu, debug
//! registers, MSRs, vcpu_events last. Not saved: TSC frequency (`KVM_CAP_TSC_CONTROL` is absent
//! here, so it cannot be set on the destination anyway) and nested state.
//!
//! # Encoding (version [`STATE_VERSION`], little-endian)
//! `"FVCS"`, `u32 version`, then records `u16 tag, u32 len, bytes`: each KVM struct as its
//! in-memory bytes (x86_64 KVM structs are `#[repr(C)]` and little-endian; zerocopy gives the
//! byte views, no unsafe), the CPUID and MSR lists as arrays of their entries, kvm_fpu field by
//! field (kvm-bindings derives no byte view for it). A decoder refuses another version, an
//! unknown or repeated tag, a length that does not fit its struct, and a missing record.

use kvm_bindings::{kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES};
use kvm_ioctls::{Cap, Kvm, VcpuFd};
use zerocopy::{FromBytes, IntoBytes};

/// The encoding version this build writes and reads.
pub const STATE_VERSION: u32 = 1;
const MAGIC: &[u8; 4] = b"FVCS";

/// What went wrong saving, encoding, checking or restoring a vCPU's state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A KVM call failed.
    #[error("{what}: {source}")]
    Kvm {
        /// The call.
        what: &'static str,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// The encoding's version is not this build's.
    #[error("vCPU state version {version} is not supported (this build reads version {supported})")]
    UnsupportedVersion {
        /// The version found.
        version: u32,
        /// The version this build reads.
        supported: u32,
    },
    /// The encoding is malformed.
    #[error("malformed vCPU state: {0}")]
    Malformed(String),
    /// The guest saw CPU features the destination does not have.
    #[error("the destination lacks CPU features the guest saw: CPUID leaf {leaf:#x} index {index} {register} bits {missing:#010x}")]
    CpuidMismatch {
        /// CPUID function.
        leaf: u32,
        /// CPUID index (sub-leaf).
        index: u32,
        /// The register (eax, ebx, ecx, edx).
        register: &'static str,
        /// The bits the source had and the destination lacks.
        missing: u32,
    },
    /// KVM refused to restore an MSR to a value the vCPU does not already hold.
    #[error("KVM refused MSR {index:#x} = {value:#x} (the vCPU holds {current:x?})")]
    MsrNotRestored {
        /// The MSR.
        index: u32,
        /// The value to restore.
        value: u64,
        /// What the vCPU holds (None: unreadable).
        current: Option<u64>,
    },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Kvm { what, source }
}

/// One vCPU's state. See the module docs for what is in it.
pub struct VcpuState {
    /// The CPUID the guest saw.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Multiprocessing state (runnable, halted, ...).
    pub mp_state: kvm_mp_state,
    /// General-purpose registers, rip, rflags.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// XSAVE area (None where KVM lacks `KVM_CAP_XSAVE`).
    pub xsave: Option<kvm_xsave>,
    /// Extended control registers (None where KVM lacks `KVM_CAP_XCRS`).
    pub xcrs: Option<kvm_xcrs>,
    /// x87/SSE state.
    pub fpu: kvm_fpu,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// MSRs, index and value.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs, SMM state.
    pub vcpu_events: kvm_vcpu_events,
}

impl Clone for VcpuState {
    fn clone(&self) -> Self {
        // kvm_xsave is not Clone (it ends in a flexible array member, empty in the legacy form).
        let xsave = self.xsave.as_ref().map(|x| kvm_xsave { region: x.region, ..Default::default() });
        Self { cpuid: self.cpuid.clone(), msrs: self.msrs.clone(), xsave, ..*self }
    }
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState").field("rip", &self.regs.rip).field("cpuid", &self.cpuid.len()).field("msrs", &self.msrs.len()).field("xsave", &self.xsave.is_some()).finish_non_exhaustive()
    }
}

/// The indexes of the MSRs KVM saves for migration (`KVM_GET_MSR_INDEX_LIST`).
fn saved_msr_indexes(kvm_fd: &Kvm) -> Result<Vec<u32>, StateError> {
    let list = kvm_fd.get_msr_index_list().map_err(kvm("KVM_GET_MSR_INDEX_LIST"))?;
    Ok(list.as_slice().to_vec())
}

fn msrs_buffer(entries: &[kvm_msr_entry]) -> Result<Msrs, StateError> {
    Msrs::from_entries(entries).map_err(|e| StateError::Malformed(format!("{} MSRs: {e:?}", entries.len())))
}

impl VcpuState {
    /// Saves the state of a vCPU that is not running (its thread is outside `KVM_RUN`).
    pub fn save(kvm_fd: &Kvm, vcpu: &VcpuFd) -> Result<Self, StateError> {
        let cpuid = vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES).map_err(kvm("KVM_GET_CPUID2"))?.as_slice().to_vec();
        let mp_state = vcpu.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?;
        let regs = vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?;
        let sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
        let xsave = if kvm_fd.check_extension(Cap::Xsave) { Some(vcpu.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?) } else { None };
        let xcrs = if kvm_fd.check_extension(Cap::Xcrs) { Some(vcpu.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?) } else { None };
        let fpu = vcpu.get_fpu().map_err(kvm("KVM_GET_FPU"))?;
        let debug_regs = vcpu.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?;
        let msrs = read_msrs(vcpu, &saved_msr_indexes(kvm_fd)?)?;
        let vcpu_events = vcpu.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?;
        Ok(Self { cpuid, mp_state, regs, sregs, xsave, xcrs, fpu, debug_regs, msrs, vcpu_events })
    }

    /// Restores this state into a vCPU that has not run yet or is not running, in Cloud
    /// Hypervisor's order. Check the CPUID first ([`check_cpuid`]).
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), StateError> {
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(|e| StateError::Malformed(format!("{} CPUID entries: {e:?}", self.cpuid.len())))?;
        vcpu.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
        vcpu.set_mp_state(self.mp_state).map_err(kvm("KVM_SET_MP_STATE"))?;
        vcpu.set_regs(&self.regs).map_err(kvm("KVM_SET_REGS"))?;
        vcpu.set_sregs(&self.sregs).map_err(kvm("KVM_SET_SREGS"))?;
        if let Some(xsave) = &self.xsave {
            // SAFETY: `xsave` is a whole legacy 4 KiB `kvm_xsave` (decoded at its exact size, or
            // read by KVM_GET_XSAVE), which is what KVM_SET_XSAVE reads; the call's safety
            // condition is about larger KVM_CAP_XSAVE2 buffers, which are not used here.
            unsafe { vcpu.set_xsave(xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
        }
        if let Some(xcrs) = &self.xcrs {
            vcpu.set_xcrs(xcrs).map_err(kvm("KVM_SET_XCRS"))?;
        }
        vcpu.set_fpu(&self.fpu).map_err(kvm("KVM_SET_FPU"))?;
        vcpu.set_debug_regs(&self.debug_regs).map_err(kvm("KVM_SET_DEBUGREGS"))?;
        write_msrs(vcpu, &self.msrs)?;
        vcpu.set_vcpu_events(&self.vcpu_events).map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }

    /// Encodes the state (see the module docs).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 << 10);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&STATE_VERSION.to_le_bytes());
        record(&mut out, Tag::Cpuid, self.cpuid.as_bytes());
        record(&mut out, Tag::MpState, self.mp_state.as_bytes());
        record(&mut out, Tag::Regs, self.regs.as_bytes());
        record(&mut out, Tag::Sregs, self.sregs.as_bytes());
        if let Some(xsave) = &self.xsave {
            record(&mut out, Tag::Xsave, xsave.as_bytes());
        }
        if let Some(xcrs) = &self.xcrs {
            record(&mut out, Tag::Xcrs, xcrs.as_bytes());
        }
        record(&mut out, Tag::Fpu, &fpu_bytes(&self.fpu));
        record(&mut out, Tag::DebugRegs, self.debug_regs.as_bytes());
        record(&mut out, Tag::Msrs, self.msrs.as_bytes());
        record(&mut out, Tag::VcpuEvents, self.vcpu_events.as_bytes());
        out
    }

    /// Decodes a state encoded by [`VcpuState::encode`] of this version.
    pub fn decode(bytes: &[u8]) -> Result<Self, StateError> {
        let malformed = |t: String| StateError::Malformed(t);
        let head = bytes.get(..8).ok_or_else(|| malformed(format!("{} bytes, shorter than the header", bytes.len())))?;
        if &head[..4] != MAGIC {
            return Err(malformed("no FVCS magic".into()));
        }
        let version = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        if version != STATE_VERSION {
            return Err(StateError::UnsupportedVersion { version, supported: STATE_VERSION });
        }
        let mut records: [Option<&[u8]>; Tag::COUNT] = [None; Tag::COUNT];
        let mut rest = &bytes[8..];
        while !rest.is_empty() {
            let h = rest.get(..6).ok_or_else(|| malformed("truncated record header".into()))?;
            let tag = u16::from_le_bytes([h[0], h[1]]);
            let len = u32::from_le_bytes([h[2], h[3], h[4], h[5]]) as usize;
            let body = rest.get(6..6usize.saturating_add(len)).ok_or_else(|| malformed(format!("record {tag} of {len} bytes truncated")))?;
            let slot = records.get_mut(usize::from(tag)).filter(|_| tag != 0).ok_or_else(|| malformed(format!("unknown record tag {tag}")))?;
            if slot.replace(body).is_some() {
                return Err(malformed(format!("record tag {tag} twice")));
            }
            rest = &rest[6 + len..];
        }
        let required = |tag: Tag| records[tag as usize].ok_or_else(|| malformed(format!("no {tag:?} record")));
        Ok(Self {
            cpuid: array(Tag::Cpuid, required(Tag::Cpuid)?, KVM_MAX_CPUID_ENTRIES)?,
            mp_state: one(Tag::MpState, required(Tag::MpState)?)?,
            regs: one(Tag::Regs, required(Tag::Regs)?)?,
            sregs: one(Tag::Sregs, required(Tag::Sregs)?)?,
            xsave: records[Tag::Xsave as usize].map(|b| one(Tag::Xsave, b)).transpose()?,
            xcrs: records[Tag::Xcrs as usize].map(|b| one(Tag::Xcrs, b)).transpose()?,
            fpu: fpu_from_bytes(required(Tag::Fpu)?)?,
            debug_regs: one(Tag::DebugRegs, required(Tag::DebugRegs)?)?,
            msrs: array(Tag::Msrs, required(Tag::Msrs)?, 4 * KVM_MAX_MSR_ENTRIES)?,
            vcpu_events: one(Tag::VcpuEvents, required(Tag::VcpuEvents)?)?,
        })
    }
}

/// Reads every MSR of `indexes` that KVM can read (KVM_GET_MSRS stops at the first it cannot;
/// that one is skipped and the read goes on after it, as Cloud Hypervisor does).
fn read_msrs(vcpu: &VcpuFd, indexes: &[u32]) -> Result<Vec<kvm_msr_entry>, StateError> {
    let mut out = Vec::with_capacity(indexes.len());
    let mut rest: Vec<kvm_msr_entry> = indexes.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
    while !rest.is_empty() {
        let n = rest.len().min(KVM_MAX_MSR_ENTRIES);
        let mut buf = msrs_buffer(&rest[..n])?;
        let read = vcpu.get_msrs(&mut buf).map_err(kvm("KVM_GET_MSRS"))?;
        out.extend_from_slice(&buf.as_slice()[..read]);
        let skip = if read < n { read + 1 } else { n };
        tracing::debug!(read, skipped = skip - read, "MSRs");
        rest.drain(..skip);
    }
    Ok(out)
}

/// Writes `msrs`. KVM_SET_MSRS stops at the first MSR it refuses; a refused MSR is accepted
/// only when the vCPU already holds the value to restore (KVM refuses some writes of values it
/// reports itself, e.g. PV MSRs under PVM), and the write goes on after it; any other refusal
/// is an error, the state is not restored whole.
fn write_msrs(vcpu: &VcpuFd, msrs: &[kvm_msr_entry]) -> Result<(), StateError> {
    let mut at = 0;
    while at < msrs.len() {
        let chunk = &msrs[at..msrs.len().min(at + KVM_MAX_MSR_ENTRIES)];
        let set = vcpu.set_msrs(&msrs_buffer(chunk)?).map_err(kvm("KVM_SET_MSRS"))?;
        at += set;
        if set < chunk.len() {
            let want = chunk[set];
            let have = read_msrs(vcpu, &[want.index])?;
            if have.first().map(|m| m.data) != Some(want.data) {
                return Err(StateError::MsrNotRestored { index: want.index, value: want.data, current: have.first().map(|m| m.data) });
            }
            tracing::debug!(msr = want.index, value = want.data, "KVM refused an MSR it already holds");
            at += 1;
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
#[repr(u16)]
enum Tag {
    Cpuid = 1,
    MpState,
    Regs,
    Sregs,
    Xsave,
    Xcrs,
    Fpu,
    DebugRegs,
    Msrs,
    VcpuEvents,
}

impl Tag {
    /// Tags are 1..COUNT.
    const COUNT: usize = Tag::VcpuEvents as usize + 1;
}

fn record(out: &mut Vec<u8>, tag: Tag, body: &[u8]) {
    out.extend_from_slice(&(tag as u16).to_le_bytes());
    // Every record is far below 4 GiB: structs of ≤ 4 KiB, ≤ 256 CPUID entries, ≤ 1024 MSRs.
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
}

fn one<T: FromBytes>(tag: Tag, body: &[u8]) -> Result<T, StateError> {
    T::read_from_bytes(body).map_err(|_| StateError::Malformed(format!("{tag:?} record of {} bytes, not {}", body.len(), std::mem::size_of::<T>())))
}

fn array<T: FromBytes>(tag: Tag, body: &[u8], max: usize) -> Result<Vec<T>, StateError> {
    let size = std::mem::size_of::<T>();
    if !body.len().is_multiple_of(size) || body.len() / size > max {
        return Err(StateError::Malformed(format!("{tag:?} record of {} bytes (entries of {size}, at most {max})", body.len())));
    }
    Ok(body.chunks_exact(size).filter_map(|c| T::read_from_bytes(c).ok()).collect())
}

const FPU_LEN: usize = 416;

fn fpu_bytes(f: &kvm_fpu) -> Vec<u8> {
    let mut b = Vec::with_capacity(FPU_LEN);
    f.fpr.iter().for_each(|r| b.extend_from_slice(r));
    b.extend_from_slice(&f.fcw.to_le_bytes());
    b.extend_from_slice(&f.fsw.to_le_bytes());
    b.push(f.ftwx);
    b.push(f.pad1);
    b.extend_from_slice(&f.last_opcode.to_le_bytes());
    b.extend_from_slice(&f.last_ip.to_le_bytes());
    b.extend_from_slice(&f.last_dp.to_le_bytes());
    f.xmm.iter().for_each(|r| b.extend_from_slice(r));
    b.extend_from_slice(&f.mxcsr.to_le_bytes());
    b.extend_from_slice(&f.pad2.to_le_bytes());
    b
}

fn fpu_from_bytes(b: &[u8]) -> Result<kvm_fpu, StateError> {
    if b.len() != FPU_LEN {
        return Err(StateError::Malformed(format!("Fpu record of {} bytes, not {FPU_LEN}", b.len())));
    }
    let mut at = 0;
    let mut take = |n: usize| {
        let s = &b[at..at + n];
        at += n;
        s
    };
    let mut f = kvm_fpu::default();
    f.fpr.iter_mut().for_each(|r| r.copy_from_slice(take(16)));
    f.fcw = u16::from_le_bytes([take(1)[0], take(1)[0]]);
    f.fsw = u16::from_le_bytes([take(1)[0], take(1)[0]]);
    f.ftwx = take(1)[0];
    f.pad1 = take(1)[0];
    f.last_opcode = u16::from_le_bytes([take(1)[0], take(1)[0]]);
    f.last_ip = u64::from_le_bytes(take(8).try_into().unwrap_or_default());
    f.last_dp = u64::from_le_bytes(take(8).try_into().unwrap_or_default());
    f.xmm.iter_mut().for_each(|r| r.copy_from_slice(take(16)));
    f.mxcsr = u32::from_le_bytes(take(4).try_into().unwrap_or_default());
    f.pad2 = u32::from_le_bytes(take(4).try_into().unwrap_or_default());
    Ok(f)
}

/// The CPUID registers that list features, with the bits that mirror control registers at run
/// time (OSXSAVE = CR4.OSXSAVE, OSPKE = CR4.PKE) left out: (leaf, index, register, mask).
const FEATURE_REGISTERS: &[(u32, u32, &str, u32)] = &[
    (0x1, 0, "ecx", !(1 << 27)),
    (0x1, 0, "edx", !0),
    (0x7, 0, "ebx", !0),
    (0x7, 0, "ecx", !(1 << 4)),
    (0x7, 0, "edx", !0),
    (0x7, 1, "eax", !0),
    (0xd, 1, "eax", !0),
    (0x8000_0001, 0, "ecx", !0),
    (0x8000_0001, 0, "edx", !0),
];

fn register(e: &kvm_cpuid_entry2, name: &str) -> u32 {
    match name {
        "eax" => e.eax,
        "ebx" => e.ebx,
        "ecx" => e.ecx,
        _ => e.edx,
    }
}

fn find(entries: &[kvm_cpuid_entry2], leaf: u32, index: u32) -> Option<&kvm_cpuid_entry2> {
    entries.iter().find(|e| e.function == leaf && (e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0 || e.index == index))
}

/// Checks that every CPU feature the guest saw (`guest`, the source vCPU's CPUID) is one the
/// destination offers (`supported`: what a destination vCPU presents), leaf by leaf over the
/// feature registers. A guest must not lose an instruction set it may be using.
pub fn check_cpuid(guest: &[kvm_cpuid_entry2], supported: &[kvm_cpuid_entry2]) -> Result<(), StateError> {
    for &(leaf, index, name, mask) in FEATURE_REGISTERS {
        let Some(g) = find(guest, leaf, index) else { continue };
        let have = find(supported, leaf, index).map_or(0, |s| register(s, name));
        let missing = register(g, name) & mask & !have;
        if missing != 0 {
            return Err(StateError::CpuidMismatch { leaf, index, register: name, missing });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VcpuState {
        let mut regs = kvm_regs { rip: 0x1000, rax: 42, rflags: 2, ..Default::default() };
        regs.rbx = 0x10000;
        let mut fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, last_ip: 0xdead_beef, ..Default::default() };
        fpu.xmm[3][7] = 9;
        fpu.fpr[7][15] = 1;
        let mut xsave = kvm_xsave::default();
        xsave.region[1023] = 0xfeed;
        VcpuState {
            cpuid: vec![kvm_cpuid_entry2 { function: 1, ecx: 0x8000_0001, edx: 0x10, ..Default::default() }, kvm_cpuid_entry2 { function: 7, index: 0, flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX, ebx: 0x20, ..Default::default() }],
            mp_state: kvm_mp_state { mp_state: 0 },
            regs,
            sregs: kvm_sregs { cr0: 1, ..Default::default() },
            xsave: Some(xsave),
            xcrs: Some(kvm_xcrs { nr_xcrs: 1, ..Default::default() }),
            fpu,
            debug_regs: kvm_debugregs { dr7: 0x400, ..Default::default() },
            msrs: vec![kvm_msr_entry { index: 0x10, data: 12345, ..Default::default() }, kvm_msr_entry { index: 0xc000_0080, data: 0x500, ..Default::default() }],
            vcpu_events: kvm_vcpu_events { flags: 4, ..Default::default() },
        }
    }

    #[test]
    fn encoding_round_trips() {
        let s = sample();
        let bytes = s.encode();
        let d = VcpuState::decode(&bytes).unwrap();
        assert_eq!(d.encode(), bytes);
        assert_eq!(d.regs, s.regs);
        assert_eq!(d.fpu, s.fpu);
        assert_eq!(d.msrs, s.msrs);
        assert_eq!(d.xsave.unwrap().region[1023], 0xfeed);
        let mut none = s.clone();
        none.xsave = None;
        none.xcrs = None;
        let d = VcpuState::decode(&none.encode()).unwrap();
        assert!(d.xsave.is_none() && d.xcrs.is_none());
    }

    #[test]
    fn unknown_versions_and_malformed_encodings_are_refused() {
        let mut bytes = sample().encode();
        bytes[4] = 2;
        assert!(matches!(VcpuState::decode(&bytes), Err(StateError::UnsupportedVersion { version: 2, supported: 1 })));
        let e = VcpuState::decode(&bytes).unwrap_err().to_string();
        assert!(e.contains("version 2 is not supported"), "{e}");
        let good = sample().encode();
        assert!(VcpuState::decode(&good[..good.len() - 1]).is_err(), "truncated");
        assert!(VcpuState::decode(b"QEVM\x01\0\0\0").is_err(), "wrong magic");
        let mut unknown = good.clone();
        unknown.extend_from_slice(&[99, 0, 0, 0, 0, 0]);
        assert!(VcpuState::decode(&unknown).unwrap_err().to_string().contains("unknown record tag 99"));
        let mut twice = good.clone();
        twice.extend_from_slice(&good[8..8 + 6 + 80]); // the CPUID record again
        assert!(VcpuState::decode(&twice).unwrap_err().to_string().contains("twice"));
        // A record cut to the wrong size for its struct.
        let mut header_only = good[..8].to_vec();
        record(&mut header_only, Tag::Regs, &[0; 10]);
        assert!(VcpuState::decode(&header_only).is_err());
        // Mutations never panic.
        let mut x = 1u64;
        for i in 0..20_000usize {
            let mut b = good.clone();
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let at = (x >> 33) as usize % b.len();
            match i % 3 {
                0 => b[at] ^= (x >> 8) as u8 | 1,
                1 => b.truncate(at),
                _ => b.insert(at, (x >> 16) as u8),
            }
            let _ = VcpuState::decode(&b);
        }
    }

    #[test]
    fn cpuid_check_names_missing_features() {
        let guest = sample().cpuid;
        assert!(check_cpuid(&guest, &guest).is_ok());
        // OSXSAVE (CR4-driven) is not a feature to check.
        let mut osxsave = guest.clone();
        osxsave[0].ecx |= 1 << 27;
        assert!(check_cpuid(&osxsave, &guest).is_ok());
        let mut less = guest.clone();
        less[1].ebx = 0;
        let e = check_cpuid(&guest, &less).unwrap_err();
        assert!(matches!(e, StateError::CpuidMismatch { leaf: 7, index: 0, register: "ebx", missing: 0x20 }), "{e}");
        assert!(check_cpuid(&guest, &guest[..1]).is_err(), "a leaf the destination lacks entirely");
    }
}
