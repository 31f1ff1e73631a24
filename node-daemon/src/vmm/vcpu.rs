//! One vCPU: CPUID, the initial register state for each boot path, and
//! saving/restoring every piece of vCPU state KVM exposes. Thin wrappers over
//! kvm-ioctls; the run loop lives in [`super::vm`].

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_segment,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use super::boot::{GDT_ADDR, PML4_ADDR};
use super::memory::GuestMemory;

/// Errors of vCPU setup and state transfer.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// KVM_CREATE_VCPU failed.
    #[error("Failed to create vCPU {0}")]
    Create(u8, #[source] kvm_ioctls::Error),
    /// KVM_GET_SUPPORTED_CPUID failed.
    #[error("Failed to get supported CPUID")]
    GetSupportedCpuid(#[source] kvm_ioctls::Error),
    /// KVM_SET_CPUID2 failed.
    #[error("Failed to set CPUID")]
    SetCpuid(#[source] kvm_ioctls::Error),
    /// KVM_GET_CPUID2 failed.
    #[error("Failed to get CPUID")]
    GetCpuid(#[source] kvm_ioctls::Error),
    /// KVM_GET_MSR_INDEX_LIST failed.
    #[error("Failed to get the MSR index list")]
    GetMsrIndexList(#[source] kvm_ioctls::Error),
    /// A vmm-sys-util FAM wrapper could not be built.
    #[error("Failed to build a KVM array structure")]
    Fam(#[source] vmm_sys_util::fam::Error),
    /// KVM_GET_REGS failed.
    #[error("Failed to get registers")]
    GetRegs(#[source] kvm_ioctls::Error),
    /// KVM_SET_REGS failed.
    #[error("Failed to set registers")]
    SetRegs(#[source] kvm_ioctls::Error),
    /// KVM_GET_SREGS failed.
    #[error("Failed to get special registers")]
    GetSregs(#[source] kvm_ioctls::Error),
    /// KVM_SET_SREGS failed.
    #[error("Failed to set special registers")]
    SetSregs(#[source] kvm_ioctls::Error),
    /// KVM_GET_FPU failed.
    #[error("Failed to get FPU state")]
    GetFpu(#[source] kvm_ioctls::Error),
    /// KVM_SET_FPU failed.
    #[error("Failed to set FPU state")]
    SetFpu(#[source] kvm_ioctls::Error),
    /// KVM_GET_XCRS failed.
    #[error("Failed to get XCRs")]
    GetXcrs(#[source] kvm_ioctls::Error),
    /// KVM_SET_XCRS failed.
    #[error("Failed to set XCRs")]
    SetXcrs(#[source] kvm_ioctls::Error),
    /// KVM_GET_LAPIC failed.
    #[error("Failed to get LAPIC state")]
    GetLapic(#[source] kvm_ioctls::Error),
    /// KVM_SET_LAPIC failed.
    #[error("Failed to set LAPIC state")]
    SetLapic(#[source] kvm_ioctls::Error),
    /// KVM_GET_MSRS failed or returned fewer MSRs than asked.
    #[error("Failed to get MSRs")]
    GetMsrs(#[source] kvm_ioctls::Error),
    /// KVM_SET_MSRS failed.
    #[error("Failed to set MSRs")]
    SetMsrs(#[source] kvm_ioctls::Error),
    /// KVM_SET_MSRS stopped before the end of the list.
    #[error("Failed to set MSR {0:#x}")]
    SetMsr(u32),
    /// KVM_GET_VCPU_EVENTS failed.
    #[error("Failed to get vCPU events")]
    GetVcpuEvents(#[source] kvm_ioctls::Error),
    /// KVM_SET_VCPU_EVENTS failed.
    #[error("Failed to set vCPU events")]
    SetVcpuEvents(#[source] kvm_ioctls::Error),
    /// KVM_GET_MP_STATE failed.
    #[error("Failed to get MP state")]
    GetMpState(#[source] kvm_ioctls::Error),
    /// KVM_SET_MP_STATE failed.
    #[error("Failed to set MP state")]
    SetMpState(#[source] kvm_ioctls::Error),
    /// KVM_GET_DEBUGREGS failed.
    #[error("Failed to get debug registers")]
    GetDebugRegs(#[source] kvm_ioctls::Error),
    /// KVM_SET_DEBUGREGS failed.
    #[error("Failed to set debug registers")]
    SetDebugRegs(#[source] kvm_ioctls::Error),
    /// KVM_GET_TSC_KHZ failed.
    #[error("Failed to get the TSC frequency")]
    GetTscKhz(#[source] kvm_ioctls::Error),
    /// Writing the GDT or page tables to guest memory failed.
    #[error("Failed to write boot tables to guest memory")]
    WriteGuestMemory(#[source] vm_memory::GuestMemoryError),
}

/// IA32_MISC_ENABLE.
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// IA32_MTRR_DEF_TYPE.
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// IA32_TSC_DEADLINE: must be restored after the LAPIC (see [`Vcpu::restore`]).
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// Flat 4 GiB descriptors in the boot GDT.
const GDT: [u64; 4] = [
    0,                     // null
    0x00af_9b00_0000_ffff, // 0x08: 64-bit code
    0x00cf_9b00_0000_ffff, // 0x10: 32-bit code
    0x00cf_9300_0000_ffff, // 0x18: data
];

fn segment(selector: u16) -> kvm_segment {
    let d = GDT[(selector >> 3) as usize];
    let limit = ((d & 0xffff) | ((d >> 32) & 0xf_0000)) as u32;
    let g = ((d >> 55) & 1) as u8;
    kvm_segment {
        base: 0,
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector,
        type_: ((d >> 40) & 0xf) as u8,
        present: ((d >> 47) & 1) as u8,
        dpl: ((d >> 45) & 3) as u8,
        db: ((d >> 54) & 1) as u8,
        s: ((d >> 44) & 1) as u8,
        l: ((d >> 53) & 1) as u8,
        g,
        avl: ((d >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// The CPUID table for vCPU `id` of `ncpus`: KVM's supported list with the
/// APIC id and topology leaves made to describe one socket of `ncpus`
/// single-thread cores.
pub fn cpuid_for(kvm: &Kvm, id: u8, ncpus: u8) -> Result<CpuId, VcpuError> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(VcpuError::GetSupportedCpuid)?;
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(ncpus) << 16);
                e.ecx |= 1 << 31; // hypervisor present
                if ncpus > 1 {
                    e.edx |= 1 << 28; // HTT: more than one logical CPU
                }
            }
            4 => {
                // Cores per package - 1 in EAX[31:26]; one thread per cache.
                e.eax = (e.eax & 0x3ff) | ((u32::from(ncpus) - 1) << 26);
            }
            0xb | 0x1f => {
                e.edx = u32::from(id);
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8; // SMT level
                    }
                    1 => {
                        e.eax = 8;
                        e.ebx = u32::from(ncpus);
                        e.ecx = (2 << 8) | 1; // core level
                    }
                    n => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = n;
                    }
                }
            }
            _ => {}
        }
    }
    Ok(cpuid)
}

/// The MSRs worth saving: KVM's index list without the x2APIC range (the
/// LAPIC state covers it), kept only if `vcpu` can read them.
pub fn saveable_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>, VcpuError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(VcpuError::GetMsrIndexList)?;
    let mut out = Vec::new();
    for &index in list.as_slice() {
        if (0x800..0x900).contains(&index) {
            continue;
        }
        let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .map_err(VcpuError::Fam)?;
        if matches!(vcpu.get_msrs(&mut msrs), Ok(1)) {
            out.push(index);
        }
    }
    Ok(out)
}

/// A vCPU and what is needed to save it.
pub struct Vcpu {
    /// KVM vCPU fd.
    pub fd: VcpuFd,
    /// vCPU index (= APIC id).
    pub id: u8,
    /// MSRs saved and restored with the vCPU.
    pub msr_list: Vec<u32>,
}

/// The FPU state (`kvm_fpu`) in plain fields.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    /// x87 registers, 16 bytes each.
    pub fpr: Vec<u8>,
    /// FCW.
    pub fcw: u16,
    /// FSW.
    pub fsw: u16,
    /// Abridged tag word.
    pub ftwx: u8,
    /// Last opcode.
    pub last_opcode: u16,
    /// Last instruction pointer.
    pub last_ip: u64,
    /// Last data pointer.
    pub last_dp: u64,
    /// XMM registers, 16 bytes each.
    pub xmm: Vec<u8>,
    /// MXCSR.
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        FpuState {
            fpr: f.fpr.iter().flatten().copied().collect(),
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm.iter().flatten().copied().collect(),
            mxcsr: f.mxcsr,
        }
    }
}

impl FpuState {
    fn to_kvm(&self) -> kvm_fpu {
        let mut f = kvm_fpu {
            fcw: self.fcw,
            fsw: self.fsw,
            ftwx: self.ftwx,
            last_opcode: self.last_opcode,
            last_ip: self.last_ip,
            last_dp: self.last_dp,
            mxcsr: self.mxcsr,
            ..Default::default()
        };
        for (i, b) in self.fpr.iter().enumerate().take(128) {
            f.fpr[i / 16][i % 16] = *b;
        }
        for (i, b) in self.xmm.iter().enumerate().take(256) {
            f.xmm[i / 16][i % 16] = *b;
        }
        f
    }
}

/// Everything KVM holds for one vCPU (snapshot version 1).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index.
    pub id: u8,
    /// CPUID table in force.
    pub cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
    /// MP state (running, halted, waiting for SIPI...).
    pub mp_state: kvm_mp_state,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// x87/SSE state. The guests that run here use no SSE, so FPU state is
    /// enough; XSAVE is not used (XRSTOR emulation fails on this KVM).
    pub fpu: FpuState,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// (index, value) of every saveable MSR.
    pub msrs: Vec<(u32, u64)>,
    /// Pending exceptions, interrupts, NMIs, SMM state.
    pub events: kvm_vcpu_events,
    /// TSC frequency the guest saw.
    pub tsc_khz: u32,
}

impl Vcpu {
    /// Creates vCPU `id` with its CPUID table.
    pub fn new(kvm: &Kvm, vm: &kvm_ioctls::VmFd, id: u8, ncpus: u8) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(|e| VcpuError::Create(id, e))?;
        let cpuid = cpuid_for(kvm, id, ncpus)?;
        fd.set_cpuid2(&cpuid).map_err(VcpuError::SetCpuid)?;
        let msr_list = saveable_msrs(kvm, &fd)?;
        Ok(Vcpu { fd, id, msr_list })
    }

    /// LINT0 as ExtINT and LINT1 as NMI, as a BIOS leaves them, so a guest
    /// using the PIC through the LAPIC gets its interrupts.
    fn setup_lint(&self) -> Result<(), VcpuError> {
        let mut lapic = self.fd.get_lapic().map_err(VcpuError::GetLapic)?;
        let set = |l: &mut kvm_lapic_state, off: usize, mode: u32| {
            let mut v = u32::from_le_bytes(std::array::from_fn(|i| l.regs[off + i] as u8));
            v = (v & !0x700) | (mode << 8);
            for (i, b) in v.to_le_bytes().iter().enumerate() {
                l.regs[off + i] = *b as _;
            }
        };
        set(&mut lapic, 0x350, 0x7); // LVT LINT0: ExtINT
        set(&mut lapic, 0x360, 0x4); // LVT LINT1: NMI
        self.fd.set_lapic(&lapic).map_err(VcpuError::SetLapic)
    }

    fn boot_msrs(&self) -> Result<(), VcpuError> {
        let msrs = Msrs::from_entries(&[
            kvm_msr_entry {
                index: MSR_IA32_MISC_ENABLE,
                data: 1, // fast strings
                ..Default::default()
            },
            kvm_msr_entry {
                // MTRRs enabled, default type write-back, as firmware leaves
                // them (the reset value makes all memory uncacheable).
                index: MSR_MTRR_DEF_TYPE,
                data: 0x806,
                ..Default::default()
            },
        ])
        .map_err(VcpuError::Fam)?;
        self.fd.set_msrs(&msrs).map_err(VcpuError::SetMsrs)?;
        Ok(())
    }

    /// Writes the boot GDT (shared by all vCPUs and both boot paths).
    pub fn write_gdt(mem: &GuestMemory) -> Result<(), VcpuError> {
        for (i, d) in GDT.iter().enumerate() {
            mem.write_obj(*d, GuestAddress(GDT_ADDR + i as u64 * 8))
                .map_err(VcpuError::WriteGuestMemory)?;
        }
        Ok(())
    }

    fn boot_sregs(&self, long_mode: bool) -> Result<kvm_sregs, VcpuError> {
        let mut sregs = self.fd.get_sregs().map_err(VcpuError::GetSregs)?;
        let code = segment(if long_mode { 0x08 } else { 0x10 });
        let data = segment(0x18);
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.gdt.base = GDT_ADDR;
        sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
        sregs.idt.base = 0;
        sregs.idt.limit = 0;
        sregs.cr0 = 0x11; // PE | ET
        sregs.cr4 = 0;
        sregs.efer = 0;
        if long_mode {
            sregs.cr3 = PML4_ADDR;
            sregs.cr4 |= 0x20; // PAE
            sregs.cr0 |= 0x8000_0000; // PG
            sregs.efer |= 0x500; // LME | LMA
        }
        Ok(sregs)
    }

    /// PVH entry: 32-bit protected mode, paging off, flat segments, EBX =
    /// `start_info`.
    pub fn setup_pvh(&self, entry: u64, start_info: u64) -> Result<(), VcpuError> {
        let sregs = self.boot_sregs(false)?;
        self.fd.set_sregs(&sregs).map_err(VcpuError::SetSregs)?;
        let regs = kvm_regs {
            rip: entry,
            rbx: start_info,
            rflags: 0x2,
            ..Default::default()
        };
        self.fd.set_regs(&regs).map_err(VcpuError::SetRegs)?;
        self.common_boot_state()
    }

    /// Linux 64-bit entry: long mode with the first 1 GiB identity mapped,
    /// RSI = zero page.
    pub fn setup_linux64(
        &self,
        mem: &GuestMemory,
        entry: u64,
        zero_page: u64,
    ) -> Result<(), VcpuError> {
        let pdpt = PML4_ADDR + 0x1000;
        let pd = PML4_ADDR + 0x2000;
        let w = |v: u64, at: u64| {
            mem.write_obj(v, GuestAddress(at))
                .map_err(VcpuError::WriteGuestMemory)
        };
        w(pdpt | 0x3, PML4_ADDR)?;
        w(pd | 0x3, pdpt)?;
        for i in 0..512u64 {
            w((i << 21) | 0x83, pd + i * 8)?;
        }
        let sregs = self.boot_sregs(true)?;
        self.fd.set_sregs(&sregs).map_err(VcpuError::SetSregs)?;
        let regs = kvm_regs {
            rip: entry,
            rsi: zero_page,
            rsp: 0x8ff0,
            rbp: 0x8ff0,
            rflags: 0x2,
            ..Default::default()
        };
        self.fd.set_regs(&regs).map_err(VcpuError::SetRegs)?;
        self.common_boot_state()
    }

    fn common_boot_state(&self) -> Result<(), VcpuError> {
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.fd.set_fpu(&fpu).map_err(VcpuError::SetFpu)?;
        self.boot_msrs()?;
        self.setup_lint()
    }

    /// Saves the vCPU. The vCPU must not be running (paused).
    pub fn save(&self) -> Result<VcpuState, VcpuError> {
        let cpuid = self
            .fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(VcpuError::GetCpuid)?
            .as_slice()
            .to_vec();
        let mut msrs = Msrs::from_entries(
            &self
                .msr_list
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect::<Vec<_>>(),
        )
        .map_err(VcpuError::Fam)?;
        let n = self.fd.get_msrs(&mut msrs).map_err(VcpuError::GetMsrs)?;
        let msrs = msrs.as_slice()[..n]
            .iter()
            .map(|e| (e.index, e.data))
            .collect();
        Ok(VcpuState {
            id: self.id,
            cpuid,
            mp_state: self.fd.get_mp_state().map_err(VcpuError::GetMpState)?,
            regs: self.fd.get_regs().map_err(VcpuError::GetRegs)?,
            sregs: self.fd.get_sregs().map_err(VcpuError::GetSregs)?,
            fpu: FpuState::from(&self.fd.get_fpu().map_err(VcpuError::GetFpu)?),
            xcrs: self.fd.get_xcrs().map_err(VcpuError::GetXcrs)?,
            debug_regs: self.fd.get_debug_regs().map_err(VcpuError::GetDebugRegs)?,
            lapic: self.fd.get_lapic().map_err(VcpuError::GetLapic)?,
            msrs,
            events: self
                .fd
                .get_vcpu_events()
                .map_err(VcpuError::GetVcpuEvents)?,
            tsc_khz: self.fd.get_tsc_khz().map_err(VcpuError::GetTscKhz)?,
        })
    }

    /// Restores a state saved by [`Vcpu::save`].
    ///
    /// Order matters:
    /// - CPUID first: KVM checks later state (XCR0, MSRs) against it.
    /// - TSC frequency before the MSRs so IA32_TSC is interpreted at it.
    /// - sregs before the LAPIC: sregs carry the APIC base (enable bit,
    ///   x2APIC mode) that decides how KVM reads the LAPIC state.
    /// - The LAPIC before the MSRs: setting the LAPIC resets the timer, and
    ///   IA32_TSC_DEADLINE only takes effect in TSC-deadline mode, so it must
    ///   be written after the LVT timer mode is back.
    /// - vCPU events last: they carry pending exceptions and interrupts that
    ///   setting the registers would otherwise clear.
    pub fn restore(&self, s: &VcpuState) -> Result<(), VcpuError> {
        let cpuid = CpuId::from_entries(&s.cpuid).map_err(VcpuError::Fam)?;
        self.fd.set_cpuid2(&cpuid).map_err(VcpuError::SetCpuid)?;
        if s.tsc_khz != 0 && self.fd.get_tsc_khz().ok() != Some(s.tsc_khz) {
            if let Err(e) = self.fd.set_tsc_khz(s.tsc_khz) {
                tracing::warn!(vcpu = self.id, error = %e, "cannot set TSC frequency; guest time may drift");
            }
        }
        self.fd
            .set_mp_state(s.mp_state)
            .map_err(VcpuError::SetMpState)?;
        self.fd.set_sregs(&s.sregs).map_err(VcpuError::SetSregs)?;
        self.fd.set_regs(&s.regs).map_err(VcpuError::SetRegs)?;
        self.fd
            .set_fpu(&s.fpu.to_kvm())
            .map_err(VcpuError::SetFpu)?;
        self.fd.set_xcrs(&s.xcrs).map_err(VcpuError::SetXcrs)?;
        self.fd
            .set_debug_regs(&s.debug_regs)
            .map_err(VcpuError::SetDebugRegs)?;
        self.fd.set_lapic(&s.lapic).map_err(VcpuError::SetLapic)?;
        // TSC deadline after everything else that the LAPIC depends on.
        let mut ordered: Vec<(u32, u64)> = s
            .msrs
            .iter()
            .copied()
            .filter(|(i, _)| *i != MSR_IA32_TSC_DEADLINE)
            .collect();
        ordered.extend(
            s.msrs
                .iter()
                .copied()
                .filter(|(i, _)| *i == MSR_IA32_TSC_DEADLINE),
        );
        let entries: Vec<kvm_msr_entry> = ordered
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(VcpuError::Fam)?;
        let n = self.fd.set_msrs(&msrs).map_err(VcpuError::SetMsrs)?;
        if n != entries.len() {
            return Err(VcpuError::SetMsr(entries[n].index));
        }
        self.fd
            .set_vcpu_events(&s.events)
            .map_err(VcpuError::SetVcpuEvents)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_segments() {
        let c = segment(0x10);
        assert_eq!(c.limit, 0xffff_ffff);
        assert_eq!(
            (c.type_, c.db, c.l, c.g, c.present, c.s),
            (0xb, 1, 0, 1, 1, 1)
        );
        let c64 = segment(0x08);
        assert_eq!((c64.l, c64.db), (1, 0));
        let d = segment(0x18);
        assert_eq!(d.type_, 3);
    }
}
