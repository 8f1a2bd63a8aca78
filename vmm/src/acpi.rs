//! ACPI tables: how the guest learns its vCPUs (MADT) and how it powers off
//! and resets (a hardware-reduced FADT with sleep control, sleep status and
//! reset registers on I/O ports, and an `\_S5_` object in the DSDT).
//!
//! Virtio devices are in the DSDT the way QEMU's x86 `microvm` machine
//! describes them: a `LNRO0005` device each, with its MMIO window and
//! interrupt, which Linux's virtio_mmio driver binds to (Debian's kernels
//! have no `virtio_mmio.device=` command-line support).
//!
//! Tables are laid out one after another from `layout::ACPI_START`, RSDP
//! first (a 16-byte aligned spot in 0xe0000..0x100000, where Linux also
//! scans for it), then XSDT, FADT, DSDT and MADT.

use acpi_tables::aml::{Device, EISAName, Interrupt, Memory32Fixed, Name, Package, Path, ResourceTemplate, IO};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress};
use crate::vstate::memory::GuestMemoryMmap;

use crate::layout;

const OEM_ID: [u8; 6] = *b"STASIS";
const OEM_TABLE_ID: [u8; 8] = *b"STASISVM";
const OEM_REVISION: u32 = 1;

/// SLP_TYP value for S5 (soft off) that the DSDT announces and the sleep
/// control register decodes.
pub const S5_SLEEP_TYPE: u8 = 5;
/// Value written to the reset register to reset the machine.
pub const RESET_VALUE: u8 = 0x01;

/// Errors while writing the ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// Writing a table to guest memory failed.
    #[error("cannot write ACPI table {0} to guest memory")]
    WriteTable(&'static str, #[source] vm_memory::GuestMemoryError),
    /// The tables do not fit below the end of the BIOS area.
    #[error("ACPI tables need {0} bytes, more than the BIOS area holds")]
    TooLarge(u64),
}

/// Serialises an AML object (a table) to bytes.
fn bytes_of(aml: &dyn Aml) -> Vec<u8> {
    let mut out = Vec::new();
    aml.to_aml_bytes(&mut out);
    out
}

/// A virtio-mmio device as the DSDT describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioMmioSlot {
    /// Base of its register window.
    pub base: u64,
    /// Bytes of the window.
    pub size: u64,
    /// Its interrupt line (GSI).
    pub gsi: u32,
}

/// The DSDT: `\_S5_`, which tells the guest the SLP_TYP for power-off,
/// COM1 with its port range and interrupt, and one `LNRO0005` device per
/// virtio-mmio slot. A hardware-reduced platform has no legacy IRQs, so
/// without the COM1 entry the guest cannot map IRQ 4 and `/dev/ttyS0`
/// fails to open.
pub fn dsdt(virtio: &[VirtioMmioSlot]) -> Vec<u8> {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let s5 = Name::new(Path::new("_S5_"), &Package::new(vec![&S5_SLEEP_TYPE]));
    dsdt.append_slice(&bytes_of(&s5));
    let com1_port = layout::ports::COM1;
    // Consumer, edge-triggered, active high, exclusive.
    let irq = Interrupt::new(true, true, false, false, layout::ports::COM1_IRQ);
    let io = IO::new(com1_port, com1_port, 0, 8);
    let resources = ResourceTemplate::new(vec![&irq, &io]);
    let hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0501"));
    let uid = Name::new(Path::new("_UID"), &0u8);
    let crs = Name::new(Path::new("_CRS"), &resources);
    let com1 = Device::new(Path::new("_SB_.COM1"), vec![&hid, &uid, &crs]);
    dsdt.append_slice(&bytes_of(&com1));
    for (index, slot) in virtio.iter().enumerate() {
        dsdt.append_slice(&virtio_device(index, slot));
    }
    dsdt.as_slice().to_vec()
}

/// `Device (_SB_.Vnnn) { _HID "LNRO0005", _UID n, _CRS { Memory32Fixed,
/// Interrupt } }`: edge-triggered, since the line is an irqfd that KVM
/// pulses.
fn virtio_device(index: usize, slot: &VirtioMmioSlot) -> Vec<u8> {
    let name = format!("_SB_.V{index:03X}");
    // The window lies in the 32-bit MMIO gap (checked in layout.rs).
    let window = Memory32Fixed::new(true, slot.base as u32, slot.size as u32);
    let irq = Interrupt::new(true, true, false, false, slot.gsi);
    let resources = ResourceTemplate::new(vec![&window, &irq]);
    let hid = Name::new(Path::new("_HID"), &"LNRO0005");
    let uid = Name::new(Path::new("_UID"), &(index as u32));
    let crs = Name::new(Path::new("_CRS"), &resources);
    bytes_of(&Device::new(Path::new(&name), vec![&hid, &uid, &crs]))
}

/// The FADT of a hardware-reduced platform, pointing at `dsdt_addr`.
pub fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let io_byte = |port: u16| GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, u64::from(port));
    let mut builder = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    builder.sleep_control_reg = io_byte(layout::ports::ACPI_SLEEP_CONTROL);
    builder.sleep_status_reg = io_byte(layout::ports::ACPI_SLEEP_STATUS);
    builder.reset_reg = io_byte(layout::ports::ACPI_RESET);
    builder.reset_value = RESET_VALUE;
    bytes_of(&builder.finalize())
}

/// The MADT: one enabled local APIC per vCPU (APIC ID = vCPU index) and the
/// I/O APIC.
pub fn madt(vcpus: u8) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(layout::APIC_START as u32),
    );
    for id in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, layout::IOAPIC_START as u32, 0));
    bytes_of(&madt)
}

/// Writes RSDP, XSDT, FADT, DSDT (with `virtio` devices) and MADT; returns
/// the RSDP's address.
pub fn write_tables(mem: &GuestMemoryMmap, vcpus: u8, virtio: &[VirtioMmioSlot]) -> Result<GuestAddress, AcpiError> {
    let align = |addr: u64| addr.next_multiple_of(16);
    let rsdp_addr = layout::ACPI_START;
    let xsdt_addr = align(rsdp_addr + Rsdp::len() as u64);
    // One XSDT entry each for FADT and MADT (the DSDT hangs off the FADT).
    let xsdt_len = 36 + 2 * 8;
    let dsdt_addr = align(xsdt_addr + xsdt_len);
    let dsdt = dsdt(virtio);
    let fadt_addr = align(dsdt_addr + dsdt.len() as u64);
    let fadt = fadt(dsdt_addr);
    let madt_addr = align(fadt_addr + fadt.len() as u64);
    let madt = madt(vcpus);
    let end = madt_addr + madt.len() as u64;
    if end > layout::BIOS_END {
        return Err(AcpiError::TooLarge(end - layout::ACPI_START));
    }
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = bytes_of(&xsdt);
    debug_assert_eq!(xsdt.len() as u64, xsdt_len);
    let rsdp = bytes_of(&Rsdp::new(OEM_ID, xsdt_addr));

    let tables: [(&'static str, u64, &[u8]); 5] = [
        ("RSDP", rsdp_addr, &rsdp),
        ("XSDT", xsdt_addr, &xsdt),
        ("DSDT", dsdt_addr, &dsdt),
        ("FADT", fadt_addr, &fadt),
        ("MADT", madt_addr, &madt),
    ];
    for (name, addr, bytes) in tables {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|e| AcpiError::WriteTable(name, e))?;
    }
    Ok(GuestAddress(rsdp_addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(table: &[u8]) -> bool {
        table.iter().fold(0u8, |acc, b| acc.wrapping_add(*b)) == 0
    }

    fn length_field(table: &[u8]) -> usize {
        u32::from_le_bytes([table[4], table[5], table[6], table[7]]) as usize
    }

    #[test]
    fn madt_lists_one_local_apic_per_vcpu() {
        let table = madt(4);
        assert_eq!(&table[..4], b"APIC");
        assert!(checksum_ok(&table));
        assert_eq!(length_field(&table), table.len());
        // Header (36) + local APIC address and flags (8), then structures.
        let mut apic_ids = Vec::new();
        let mut ioapics = 0;
        let mut off = 44;
        while off < table.len() {
            let (kind, len) = (table[off], table[off + 1] as usize);
            match kind {
                0 => apic_ids.push(table[off + 3]),
                1 => ioapics += 1,
                _ => panic!("unexpected MADT structure {kind}"),
            }
            off += len;
        }
        assert_eq!(apic_ids, vec![0, 1, 2, 3]);
        assert_eq!(ioapics, 1);
    }

    #[test]
    fn fadt_is_hardware_reduced_with_sleep_and_reset_registers() {
        let table = fadt(0xe0100);
        assert_eq!(&table[..4], b"FACP");
        assert!(checksum_ok(&table));
        assert_eq!(length_field(&table), 276);
        let flags = u32::from_le_bytes([table[112], table[113], table[114], table[115]]);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI not set");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP not set");
        // RESET_REG (GAS at 116): I/O space, port 0x602; value at 128.
        assert_eq!(table[116], 1);
        assert_eq!(u64::from_le_bytes(table[120..128].try_into().expect("8 bytes")), 0x602);
        assert_eq!(table[128], RESET_VALUE);
        // X_DSDT at 140.
        assert_eq!(u64::from_le_bytes(table[140..148].try_into().expect("8 bytes")), 0xe0100);
        // SLEEP_CONTROL_REG at 244 and SLEEP_STATUS_REG at 256.
        assert_eq!(u64::from_le_bytes(table[248..256].try_into().expect("8 bytes")), 0x600);
        assert_eq!(u64::from_le_bytes(table[260..268].try_into().expect("8 bytes")), 0x601);
    }

    #[test]
    fn dsdt_declares_s5() {
        let table = dsdt(&[]);
        assert_eq!(&table[..4], b"DSDT");
        assert!(checksum_ok(&table));
        assert_eq!(length_field(&table), table.len());
        // NameOp "_S5_" PackageOp: 0x08 '_' 'S' '5' '_' 0x12 …
        let body = &table[36..];
        assert_eq!(&body[..6], &[0x08, b'_', b'S', b'5', b'_', 0x12]);
        assert!(body.windows(2).any(|w| w == [0x0a, S5_SLEEP_TYPE]));
        // COM1: PNP0501 as an EISA ID (0x41d0_0501) and the 0x3f8 I/O range.
        assert!(body.windows(5).any(|w| w == [0x0c, 0x41, 0xd0, 0x05, 0x01]), "no PNP0501");
        assert!(body.windows(6).any(|w| w == [0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03]), "no COM1 I/O");
    }

    #[test]
    fn dsdt_describes_each_virtio_device_with_window_and_interrupt() {
        let slots = [
            VirtioMmioSlot { base: 0xd000_0000, size: 0x1000, gsi: 5 },
            VirtioMmioSlot { base: 0xd000_1000, size: 0x1000, gsi: 6 },
        ];
        let table = dsdt(&slots);
        assert!(checksum_ok(&table));
        assert_eq!(length_field(&table), table.len());
        let body = &table[36..];
        assert_eq!(body.windows(8).filter(|w| w == b"LNRO0005").count(), 2);
        // Memory32Fixed: 0x86, length 9, read-write, base, size.
        for (base, gsi) in [(0xd000_0000u32, 5u8), (0xd000_1000, 6)] {
            let mut window = vec![0x86, 0x09, 0x00, 0x01];
            window.extend_from_slice(&base.to_le_bytes());
            window.extend_from_slice(&0x1000u32.to_le_bytes());
            assert!(body.windows(window.len()).any(|w| w == window.as_slice()), "no window at {base:#x}");
            // Extended interrupt: 0x89, length 6, flags (consumer, edge), 1 line, GSI.
            let irq = [0x89, 0x06, 0x00, 0x03, 0x01, gsi, 0, 0, 0];
            assert!(body.windows(irq.len()).any(|w| w == irq), "no interrupt {gsi}");
        }
    }

    #[test]
    fn write_tables_places_rsdp_pointing_at_xsdt() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mem");
        let rsdp = write_tables(&mem, 2, &[]).expect("tables");
        let mut head = [0u8; 36];
        mem.read_slice(&mut head, rsdp).expect("read");
        assert_eq!(&head[..8], b"RSD PTR ");
        let xsdt_addr = u64::from_le_bytes(head[24..32].try_into().expect("8 bytes"));
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(xsdt_addr)).expect("read");
        assert_eq!(&sig, b"XSDT");
    }
}
