//! One vCPU: creation with CPUID, MSRs, FPU and LAPIC set up, and its boot state.

use kvm_bindings::{Msrs, kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs};
use kvm_ioctls::VcpuFd;
use vm_memory::GuestMemoryMmap;

use super::long_mode::{EntryMode, configure_sregs, write_boot_tables};
use super::{KvmError, Result, Vm, cpuid, ioctl_err};

/// IA32_MISC_ENABLE.
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// IA32_MISC_ENABLE bit 0: fast string operations.
pub const MISC_ENABLE_FAST_STRING: u64 = 1;
/// IA32_PAT.
pub const MSR_IA32_PAT: u32 = 0x277;
/// Power-on PAT value (WB, WT, UC-, UC repeated).
pub const PAT_DEFAULT: u64 = 0x0007_0406_0007_0406;
/// IA32_MTRR_DEF_TYPE.
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled, default type write-back.
pub const MTRR_DEF_WB: u64 = (1 << 11) | 6;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 4;
const APIC_MODE_EXTINT: u32 = 7;

/// Initial general registers handed over by the loader. Linux 64-bit boot protocol:
/// `rsi` = zero page; PVH: `rbx` = start info. `rflags` gets bit 1 set regardless.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VcpuInitRegs {
    /// Entry point.
    pub rip: u64,
    /// Initial stack pointer (also copied to `rbp`).
    pub rsp: u64,
    /// Initial `rsi`.
    pub rsi: u64,
    /// Initial `rbx`.
    pub rbx: u64,
    /// Initial `rdi`.
    pub rdi: u64,
    /// Initial flags (bit 1 always set; leave IF clear for boot).
    pub rflags: u64,
}

/// One configured vCPU, ready to be handed to a run-loop thread.
#[derive(Debug)]
pub struct Vcpu {
    index: u32,
    pub(crate) fd: VcpuFd,
}

impl Vcpu {
    /// Creates vCPU `index` (its APIC id) of `nr_vcpus` and sets CPUID, MSRs, FPU and the
    /// LAPIC's LINT0 (ExtINT) / LINT1 (NMI).
    pub fn new(vm: &Vm, index: u32, nr_vcpus: u32) -> Result<Self> {
        if index >= nr_vcpus || nr_vcpus as usize > vm.kvm().get_max_vcpus() {
            return Err(KvmError::Invalid(format!(
                "vCPU {index} of {nr_vcpus} (KVM allows {})",
                vm.kvm().get_max_vcpus()
            )));
        }
        let fd = vm
            .fd()
            .create_vcpu(u64::from(index))
            .map_err(ioctl_err("KVM_CREATE_VCPU"))?;
        let vcpu = Vcpu { index, fd };
        let cpuid = cpuid::vcpu_cpuid(vm.supported_cpuid(), index, nr_vcpus);
        vcpu.fd
            .set_cpuid2(&cpuid)
            .map_err(ioctl_err("KVM_SET_CPUID2"))?;
        vcpu.setup_msrs()?;
        vcpu.setup_fpu()?;
        vcpu.setup_lapic()?;
        Ok(vcpu)
    }

    /// The vCPU index (and APIC id).
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The vCPU file descriptor, for ioctls this type does not wrap.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    fn setup_msrs(&self) -> Result<()> {
        let list = [
            (MSR_IA32_SYSENTER_CS, 0),
            (MSR_IA32_SYSENTER_ESP, 0),
            (MSR_IA32_SYSENTER_EIP, 0),
            (MSR_STAR, 0),
            (MSR_CSTAR, 0),
            (MSR_KERNEL_GS_BASE, 0),
            (MSR_SYSCALL_MASK, 0),
            (MSR_LSTAR, 0),
            (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
            (MSR_IA32_PAT, PAT_DEFAULT),
            (MSR_MTRR_DEF_TYPE, MTRR_DEF_WB),
        ];
        let entries: Vec<kvm_msr_entry> = list
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries)
            .map_err(|e| KvmError::Invalid(format!("MSR list: {e:?}")))?;
        let set = self.fd.set_msrs(&msrs).map_err(ioctl_err("KVM_SET_MSRS"))?;
        if set != entries.len() {
            let failed = entries.get(set).map_or(0, |e| e.index);
            return Err(KvmError::Invalid(format!(
                "KVM_SET_MSRS set {set} of {} MSRs; MSR {failed:#x} refused",
                entries.len()
            )));
        }
        Ok(())
    }

    fn setup_fpu(&self) -> Result<()> {
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.fd.set_fpu(&fpu).map_err(ioctl_err("KVM_SET_FPU"))
    }

    fn setup_lapic(&self) -> Result<()> {
        let mut lapic = self.fd.get_lapic().map_err(ioctl_err("KVM_GET_LAPIC"))?;
        set_lvt_mode(&mut lapic, APIC_LVT0, APIC_MODE_EXTINT);
        set_lvt_mode(&mut lapic, APIC_LVT1, APIC_MODE_NMI);
        self.fd
            .set_lapic(&lapic)
            .map_err(ioctl_err("KVM_SET_LAPIC"))
    }

    /// Sets the boot state of this vCPU: special registers for `mode` (the GDT, IDT and
    /// page tables must be in guest memory: see [`Vcpu::write_boot_tables`]) and the
    /// general registers from `regs`.
    pub fn configure_boot(&self, mode: EntryMode, regs: &VcpuInitRegs) -> Result<()> {
        let mut sregs = self.fd.get_sregs().map_err(ioctl_err("KVM_GET_SREGS"))?;
        configure_sregs(&mut sregs, mode);
        self.fd
            .set_sregs(&sregs)
            .map_err(ioctl_err("KVM_SET_SREGS"))?;
        let kregs = kvm_regs {
            rip: regs.rip,
            rsp: regs.rsp,
            rbp: regs.rsp,
            rsi: regs.rsi,
            rbx: regs.rbx,
            rdi: regs.rdi,
            rflags: regs.rflags | 0x2,
            ..Default::default()
        };
        self.fd.set_regs(&kregs).map_err(ioctl_err("KVM_SET_REGS"))
    }

    /// Writes the boot GDT, IDT and page tables (once per VM, before the boot vCPU runs).
    pub fn write_boot_tables(mem: &GuestMemoryMmap<()>, mode: EntryMode) -> Result<()> {
        write_boot_tables(mem, mode)
    }
}

/// Sets the delivery mode (bits 8..11) of the LVT register at `offset` of a LAPIC page.
fn set_lvt_mode(lapic: &mut kvm_lapic_state, offset: usize, mode: u32) {
    let regs = &mut lapic.regs[offset..offset + 4];
    let mut b = [0u8; 4];
    for (d, s) in b.iter_mut().zip(regs.iter()) {
        *d = s.cast_unsigned();
    }
    let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
    for (d, s) in regs.iter_mut().zip(v.to_le_bytes()) {
        *d = s.cast_signed();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::cast_possible_wrap, clippy::cast_sign_loss)] // Test data, not guest input.

    use super::*;

    #[test]
    fn lvt_mode_keeps_other_bits() {
        let mut l = kvm_lapic_state::default();
        l.regs[APIC_LVT0] = 0x10u8 as _;
        l.regs[APIC_LVT0 + 2] = 0x01u8 as _; // mask bit 16
        set_lvt_mode(&mut l, APIC_LVT0, APIC_MODE_EXTINT);
        assert_eq!(l.regs[APIC_LVT0] as u8, 0x10);
        assert_eq!(l.regs[APIC_LVT0 + 1] as u8, 0x07);
        assert_eq!(l.regs[APIC_LVT0 + 2] as u8, 0x01);
    }
}
