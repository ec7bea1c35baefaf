//! Per-vCPU CPUID: KVM's supported set with the hypervisor bit and a flat topology (one
//! socket, one thread per core, APIC id = vCPU index).

use kvm_bindings::{CpuId, kvm_cpuid_entry2};

/// Leaf 1 ECX: running under a hypervisor.
pub const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX: HTT (the EBX logical-processor count is valid).
pub const LEAF1_EDX_HTT: u32 = 1 << 28;

/// Builds the CPUID of vCPU `apic_id` out of `nr_vcpus` from KVM's supported set.
pub fn vcpu_cpuid(supported: &CpuId, apic_id: u32, nr_vcpus: u32) -> CpuId {
    let mut cpuid = supported.clone();
    for entry in cpuid.as_mut_slice() {
        patch_entry(entry, apic_id, nr_vcpus);
    }
    cpuid
}

/// Number of APIC-id bits needed to number `n` cores.
fn core_bits(n: u32) -> u32 {
    n.max(1).next_power_of_two().trailing_zeros()
}

fn patch_entry(e: &mut kvm_cpuid_entry2, apic_id: u32, nr_vcpus: u32) {
    let nr = nr_vcpus.max(1);
    match e.function {
        1 => {
            e.ecx |= LEAF1_ECX_HYPERVISOR;
            let count = nr.min(255);
            e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | (count << 16);
            if nr > 1 {
                e.edx |= LEAF1_EDX_HTT;
            } else {
                e.edx &= !LEAF1_EDX_HTT;
            }
        }
        4 => {
            // Deterministic cache parameters: cores per package, and the L3 shared by all.
            let cores = (nr - 1).min(63);
            e.eax = (e.eax & 0x03ff_ffff) | (cores << 26);
            let level = (e.eax >> 5) & 7;
            let sharing = if level >= 3 { (nr - 1).min(0xfff) } else { 0 };
            e.eax = (e.eax & !(0xfff << 14)) | (sharing << 14);
        }
        0xb | 0x1f => {
            e.edx = apic_id;
            match e.index {
                0 => {
                    // SMT level: one thread per core.
                    e.eax = 0;
                    e.ebx = 1;
                    e.ecx = 1 << 8;
                }
                1 => {
                    // Core level: every vCPU of the package.
                    e.eax = core_bits(nr);
                    e.ebx = nr;
                    e.ecx = (2 << 8) | 1;
                }
                i => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = i;
                }
            }
        }
        0x8000_0008 => {
            // AMD: NC (cores - 1) and the APIC-id size.
            e.ecx = (e.ecx & !0xf0ff) | (core_bits(nr) << 12) | (nr - 1).min(255);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Finds the entry of `function`/`index` in `cpuid`.
    fn find_entry(cpuid: &CpuId, function: u32, index: u32) -> Option<&kvm_cpuid_entry2> {
        cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
    }

    fn sample() -> CpuId {
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xff00_0800,
                edx: 0,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 0,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 2,
                ..Default::default()
            },
        ];
        CpuId::from_entries(&entries).unwrap()
    }

    #[test]
    fn leaf1_has_apic_id_count_and_hypervisor_bit() {
        let c = vcpu_cpuid(&sample(), 2, 3);
        let l1 = find_entry(&c, 1, 0).unwrap();
        assert_eq!(l1.ebx >> 24, 2);
        assert_eq!((l1.ebx >> 16) & 0xff, 3);
        assert_eq!(l1.ebx & 0xffff, 0x0800);
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);
    }

    #[test]
    fn leaf_b_topology() {
        let c = vcpu_cpuid(&sample(), 1, 3);
        let smt = find_entry(&c, 0xb, 0).unwrap();
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 1));
        let core = find_entry(&c, 0xb, 1).unwrap();
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 3, 0x201, 1));
        let end = find_entry(&c, 0xb, 2).unwrap();
        assert_eq!((end.ebx, end.ecx >> 8), (0, 0));
    }
}
