//! CPUID for each vCPU: KVM's supported set, with the topology made to
//! describe this VM (one package of N single-thread cores, APIC ID = vCPU
//! index) and features the VMM cannot back taken out.

use kvm_bindings::{kvm_cpuid_entry2, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// Leaf 1 ECX bits.
const ECX_MONITOR: u32 = 1 << 3;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX: more than one logical processor per package.
const EDX_HTT: u32 = 1 << 28;
/// Leaf 7 EBX bits for features that need VMM support we lack.
const LEAF7_EBX_SGX: u32 = 1 << 2;
const LEAF7_EBX_INTEL_PT: u32 = 1 << 25;
/// Leaf 6 EAX: APIC timer always running (ARAT); the one bit kept there.
const LEAF6_EAX_ARAT: u32 = 1 << 2;

/// Leaves dropped entirely: SGX (0x12) and processor trace (0x14).
const DROPPED_LEAVES: [u32; 2] = [0x12, 0x14];

/// Topology level types of leaves 0xB and 0x1F.
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Bits needed to hold `n` distinct IDs.
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

fn entry(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx,
        edx,
        ..Default::default()
    }
}

/// The extended-topology subleaves (0xB or 0x1F) for `cpu_id` of `count`.
fn topology_leaf(function: u32, cpu_id: u32, count: u32) -> [kvm_cpuid_entry2; 3] {
    [
        // SMT level: one thread per core.
        entry(function, 0, 0, 1, LEVEL_TYPE_SMT << 8, cpu_id),
        // Core level: `count` cores in the package.
        entry(function, 1, id_bits(count), count, 1 | (LEVEL_TYPE_CORE << 8), cpu_id),
        // End of the list.
        entry(function, 2, 0, 0, 2, cpu_id),
    ]
}

/// Empties a leaf: the feature it describes is absent.
fn clear(e: &mut kvm_cpuid_entry2) {
    e.eax = 0;
    e.ebx = 0;
    e.ecx = 0;
    e.edx = 0;
}

/// Rewrites `entries` (KVM's supported CPUID) for vCPU `cpu_id` of `count`.
pub fn filter_cpuid(entries: &mut Vec<kvm_cpuid_entry2>, cpu_id: u8, count: u8, tsc_deadline: bool) {
    let (id, n) = (u32::from(cpu_id), u32::from(count));
    let max_basic = entries.iter().find(|e| e.function == 0).map_or(0, |e| e.eax);
    let has_leaf_1f = entries.iter().any(|e| e.function == 0x1f);
    entries.retain(|e| !DROPPED_LEAVES.contains(&e.function) && e.function != 0xb && e.function != 0x1f);

    for e in entries.iter_mut() {
        match e.function {
            0x1 => {
                // EBX: initial APIC ID [31:24], logical processors [23:16],
                // CLFLUSH line size in 8-byte units [15:8].
                e.ebx = (id << 24) | (n.min(255) << 16) | (8 << 8);
                e.ecx |= ECX_HYPERVISOR;
                e.ecx &= !ECX_MONITOR;
                if tsc_deadline {
                    e.ecx |= ECX_TSC_DEADLINE;
                } else {
                    e.ecx &= !ECX_TSC_DEADLINE;
                }
                if n > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            0x4 => {
                // Deterministic cache parameters: cores per package - 1 in
                // [31:26]; threads sharing this cache - 1 in [25:14]. Caches
                // up to L2 are per core, L3 is shared by all.
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { n - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((n - 1).min(63) << 26) | (sharing.min(0xfff) << 14);
            }
            // MONITOR/MWAIT is hidden, so is its leaf.
            0x5 => clear(e),
            0x6 => {
                let arat = e.eax & LEAF6_EAX_ARAT;
                clear(e);
                e.eax = arat;
            }
            0x7 if e.index == 0 => {
                e.ebx &= !(LEAF7_EBX_SGX | LEAF7_EBX_INTEL_PT);
            }
            // No virtual PMU is set up.
            0xa => clear(e),
            0x8000_0008 => {
                // AMD: cores per package - 1 in ECX[7:0], APIC ID bits [15:12].
                e.ecx = (e.ecx & !0xf0ff) | (id_bits(n) << 12) | (n - 1);
            }
            0x8000_001e => {
                // AMD extended APIC ID, core ID, one thread per core, node 0.
                e.eax = id;
                e.ebx = id & 0xff;
                e.ecx = 0;
            }
            _ => {}
        }
    }

    if max_basic >= 0xb {
        entries.extend(topology_leaf(0xb, id, n));
    }
    if has_leaf_1f {
        entries.extend(topology_leaf(0x1f, id, n));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn supported() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(0, 0, 0x1f, 0, 0, 0),
            entry(1, 0, 0x800f12, 0xff00_0800, ECX_MONITOR, 0),
            entry(4, 0, (1 << 5) | 1, 0, 0, 0),
            entry(4, 3, (3 << 5) | 3, 0, 0, 0),
            entry(7, 0, 0, LEAF7_EBX_SGX | LEAF7_EBX_INTEL_PT | 1, 0, 0),
            entry(0xa, 0, 0x0807_0302, 0, 0, 0),
            entry(0xb, 0, 1, 2, 0x100, 0),
            entry(0x12, 0, 1, 0, 0, 0),
            entry(0x1f, 0, 1, 2, 0x100, 0),
            entry(0x4000_0000, 0, 0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d),
        ]
    }

    fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *entries
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap_or_else(|| panic!("leaf {function:#x}.{index} missing"))
    }

    #[test]
    fn leaf1_carries_apic_id_count_and_hypervisor_bit() {
        let mut e = supported();
        filter_cpuid(&mut e, 3, 4, true);
        let l1 = find(&e, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(l1.ecx & ECX_TSC_DEADLINE, 0);
        assert_eq!(l1.ecx & ECX_MONITOR, 0);
        assert_ne!(l1.edx & EDX_HTT, 0);
    }

    #[test]
    fn single_vcpu_has_no_htt_and_no_deadline_timer_without_kvm_support() {
        let mut e = supported();
        filter_cpuid(&mut e, 0, 1, false);
        let l1 = find(&e, 1, 0);
        assert_eq!(l1.edx & EDX_HTT, 0);
        assert_eq!(l1.ecx & ECX_TSC_DEADLINE, 0);
    }

    #[test]
    fn topology_leaves_give_x2apic_id_and_core_count() {
        let mut e = supported();
        filter_cpuid(&mut e, 5, 6, true);
        for leaf in [0xb, 0x1f] {
            let smt = find(&e, leaf, 0);
            let core = find(&e, leaf, 1);
            let end = find(&e, leaf, 2);
            assert_eq!((smt.ebx, smt.edx), (1, 5));
            assert_eq!((core.eax, core.ebx, core.edx), (3, 6, 5));
            assert_eq!((core.ecx >> 8) & 0xff, LEVEL_TYPE_CORE);
            assert_eq!((end.ecx >> 8) & 0xff, 0);
        }
        assert_eq!(e.iter().filter(|x| x.function == 0xb).count(), 3);
    }

    #[test]
    fn cache_leaf_reports_cores_and_l3_sharing() {
        let mut e = supported();
        filter_cpuid(&mut e, 0, 4, true);
        let l1d = find(&e, 4, 0);
        let l3 = find(&e, 4, 3);
        assert_eq!(l1d.eax >> 26, 3);
        assert_eq!((l1d.eax >> 14) & 0xfff, 0);
        assert_eq!((l3.eax >> 14) & 0xfff, 3);
        assert_eq!(l3.eax & 0x1f, 3, "cache type bits preserved");
    }

    #[test]
    fn unbacked_features_are_removed() {
        let mut e = supported();
        filter_cpuid(&mut e, 0, 1, true);
        assert!(e.iter().all(|x| x.function != 0x12));
        assert_eq!(find(&e, 0xa, 0).eax, 0);
        assert_eq!(find(&e, 7, 0).ebx, 1);
    }

    #[test]
    fn kvm_signature_leaf_is_kept() {
        let mut e = supported();
        filter_cpuid(&mut e, 0, 2, true);
        let sig = find(&e, 0x4000_0000, 0);
        assert_eq!(sig.ebx, 0x4b4d_564b);
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(32), 5);
    }
}
