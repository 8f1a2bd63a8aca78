//! The guest's physical memory map.
//!
//! ```text
//!  guest physical address
//!  0x0000_0000 ┌─────────────────────────────┐
//!              │ real-mode IVT / BDA (unused)│
//!  0x0000_0500 ├─────────────────────────────┤ GDT
//!  0x0000_0520 ├─────────────────────────────┤ IDT (empty)
//!  0x0000_7000 ├─────────────────────────────┤ boot_params ("zero page")
//!  0x0000_8ff0 │ boot stack (grows down)     │
//!  0x0000_9000 ├─────────────────────────────┤ PML4
//!  0x0000_a000 ├─────────────────────────────┤ PDPT
//!  0x0000_b000 ├─────────────────────────────┤ 4 × PD: identity map of 0..4 GiB, 2 MiB pages
//!  0x0002_0000 ├─────────────────────────────┤ kernel command line
//!  0x0009_fc00 ├─────────────────────────────┤ EBDA (reserved)
//!  0x000e_0000 ├─────────────────────────────┤ ACPI: RSDP, XSDT, FADT, DSDT, MADT (reserved)
//!  0x0010_0000 ├─────────────────────────────┤ high memory: bzImage protected-mode part,
//!              │                             │ ELF vmlinux at its physical addresses,
//!              │ RAM                         │ initrd at the top of low RAM
//!  0xc000_0000 ├─────────────────────────────┤ MMIO gap (no RAM):
//!  0xd000_0000 │ virtio-mmio windows, 4 KiB each, one per device (GSI 5, 6, …)
//!              │ IOAPIC 0xfec0_0000, LAPIC 0xfee0_0000, KVM TSS/identity map
//! 0x1_0000_0000├─────────────────────────────┤ RAM beyond 3 GiB continues here
//!              └─────────────────────────────┘
//! ```

/// Global descriptor table.
pub const BOOT_GDT_START: u64 = 0x500;
/// Interrupt descriptor table (left empty; the kernel loads its own).
pub const BOOT_IDT_START: u64 = 0x520;
/// Linux `boot_params`, passed to the kernel in RSI.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Level-4 page map.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// First of four page directories.
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Start of the extended BIOS data area; RAM below it is usable.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables, RSDP first.
pub const ACPI_START: u64 = 0xe0000;
/// End of the BIOS area.
pub const BIOS_END: u64 = 0x10_0000;
/// First byte of high memory, where kernels are loaded.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap, which holds no RAM.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// I/O APIC registers.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC registers.
pub const APIC_START: u64 = 0xfee0_0000;
/// Three pages KVM needs for the TSS on Intel, inside the MMIO gap.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// One page KVM needs for the real-mode identity map on Intel.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// First virtio-mmio window; each device takes [`VIRTIO_MMIO_SIZE`] bytes.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Bytes of one virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// Interrupt line (IOAPIC pin) of the first virtio device; the next
/// devices take the next lines. 0–4 are the PIT, keyboard, cascade and
/// COM1 on a PC; the IOAPIC has 24 pins.
pub const VIRTIO_FIRST_GSI: u32 = 5;
/// Most virtio devices: the IOAPIC pins from [`VIRTIO_FIRST_GSI`] to 23.
pub const MAX_VIRTIO_DEVICES: usize = 19;

/// Where virtio device `index` sits: its MMIO window's base and its GSI.
pub fn virtio_slot(index: usize) -> (u64, u32) {
    (VIRTIO_MMIO_START + index as u64 * VIRTIO_MMIO_SIZE, VIRTIO_FIRST_GSI + index as u32)
}

/// Largest guest memory size, 1 TiB.
pub const MAX_MEMORY: u64 = 1 << 40;
/// Smallest guest memory size that can hold boot structures and a kernel.
pub const MIN_MEMORY: u64 = 32 << 20;

/// I/O ports of the devices.
pub mod ports {
    /// COM1 base; eight registers.
    pub const COM1: u16 = 0x3f8;
    /// COM1's legacy interrupt line.
    pub const COM1_IRQ: u32 = 4;
    /// CMOS RTC index port; the data port follows.
    pub const CMOS: u16 = 0x70;
    /// i8042 data port.
    pub const I8042_DATA: u16 = 0x60;
    /// i8042 command/status port.
    pub const I8042_COMMAND: u16 = 0x64;
    /// ACPI sleep control register (hardware-reduced ACPI).
    pub const ACPI_SLEEP_CONTROL: u16 = 0x600;
    /// ACPI sleep status register.
    pub const ACPI_SLEEP_STATUS: u16 = 0x601;
    /// ACPI reset register.
    pub const ACPI_RESET: u16 = 0x602;
}

// The boot structures must not overlap; checked when this compiles.
const _: () = {
    assert!(BOOT_IDT_START >= BOOT_GDT_START + 4 * 8);
    assert!(PDE_START + 4 * 0x1000 <= CMDLINE_START);
    assert!(ZERO_PAGE_START + 0x1000 <= BOOT_STACK_POINTER);
    assert!(CMDLINE_START + 4096 <= EBDA_START);
    assert!(ACPI_START >= EBDA_START && ACPI_START < BIOS_END);
    assert!(VIRTIO_MMIO_START >= MMIO_GAP_START);
    assert!(VIRTIO_MMIO_START + MAX_VIRTIO_DEVICES as u64 * VIRTIO_MMIO_SIZE <= IOAPIC_START);
    assert!(VIRTIO_FIRST_GSI + MAX_VIRTIO_DEVICES as u32 <= 24);
};

/// The RAM ranges `(start, size)` for a guest of `mem_size` bytes: one below
/// the MMIO gap, and one above 4 GiB for what does not fit below it.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![(0, MMIO_GAP_START), (MMIO_GAP_END, mem_size - MMIO_GAP_START)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_one_range() {
        assert_eq!(ram_ranges(512 << 20), vec![(0, 512 << 20)]);
    }

    #[test]
    fn guest_of_exactly_gap_start_has_one_range() {
        assert_eq!(ram_ranges(MMIO_GAP_START), vec![(0, MMIO_GAP_START)]);
    }

    #[test]
    fn large_guest_continues_above_4g() {
        let ranges = ram_ranges(4 << 30);
        assert_eq!(ranges, vec![(0, MMIO_GAP_START), (MMIO_GAP_END, 1 << 30)]);
        let total: u64 = ranges.iter().map(|r| r.1).sum();
        assert_eq!(total, 4 << 30);
    }

}
