//! Loading a Linux kernel and preparing what its 64-bit boot protocol expects:
//! the kernel image, the initrd, the command line, `boot_params` with the
//! e820 map, the boot GDT and identity-mapped page tables.
//!
//! Both kernel formats enter in 64-bit mode with RSI pointing at
//! `boot_params`: an ELF `vmlinux` at its ELF entry point, a `bzImage` at the
//! 64-bit entry of its protected-mode part (load address + 0x200).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{self, BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use crate::vstate::memory::GuestMemoryMmap;

use crate::layout;

/// `boot_params.hdr.header`: "HdrS".
const HDRS_MAGIC: u32 = 0x5372_6448;
/// `boot_params.hdr.boot_flag`.
const BOOT_FLAG: u16 = 0xaa55;
/// `type_of_loader` for a loader without an assigned ID.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// Boot protocol version we speak for ELF kernels (2.15).
const BOOT_PROTOCOL_VERSION: u16 = 0x020f;
/// `loadflags`: the protected-mode code is loaded at 0x100000.
const LOADED_HIGH: u8 = 0x01;
/// Command line limit of kernels that do not state one (x86 COMMAND_LINE_SIZE).
const DEFAULT_CMDLINE_MAX: usize = 2048;
/// The 64-bit entry point of a bzImage, relative to its load address.
const BZIMAGE_ENTRY_64: u64 = 0x200;
/// Highest initrd address for kernels that do not say (boot protocol default).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
/// Most e820 entries `boot_params` can carry.
const E820_MAX_ENTRIES: usize = 128;

/// e820 entry types.
pub const E820_RAM: u32 = 1;
/// Reserved memory.
pub const E820_RESERVED: u32 = 2;

const PAGE_SIZE: u64 = 4096;

/// Errors while loading the kernel and preparing the boot structures.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file cannot be opened.
    #[error("cannot open kernel {}", .0.display())]
    OpenKernel(PathBuf, #[source] std::io::Error),
    /// The initrd file cannot be opened.
    #[error("cannot open initrd {}", .0.display())]
    OpenInitrd(PathBuf, #[source] std::io::Error),
    /// A file is a directory, not an image.
    #[error("{} is a directory, not a file", .0.display())]
    IsDirectory(PathBuf),
    /// Reading the kernel header failed.
    #[error("cannot read kernel {}", .0.display())]
    ReadKernel(PathBuf, #[source] std::io::Error),
    /// The kernel file is neither ELF nor bzImage.
    #[error("{} is not a kernel: expected an ELF vmlinux or a bzImage", .0.display())]
    NotAKernel(PathBuf),
    /// The image is cut short or its headers point outside it.
    #[error("kernel {} is damaged: {}", .0.display(), .1)]
    Damaged(PathBuf, String),
    /// The ELF or bzImage loader refused the image.
    #[error("cannot load kernel {}: {}", .0.display(), .1)]
    LoadKernel(PathBuf, loader::Error),
    /// The initrd does not fit in guest memory beside the kernel.
    #[error("initrd {} ({size} bytes) does not fit in guest memory: {room} bytes are free above the kernel", .path.display())]
    InitrdTooLarge {
        /// The initrd.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Room left for it.
        room: u64,
    },
    /// Copying the initrd into guest memory failed.
    #[error("cannot read initrd {} into guest memory", .0.display())]
    ReadInitrd(PathBuf, #[source] vm_memory::GuestMemoryError),
    /// The command line is longer than the kernel accepts.
    #[error("kernel command line is {len} bytes; this kernel accepts at most {max}")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The kernel's limit.
        max: usize,
    },
    /// The command line holds a NUL byte.
    #[error("kernel command line must not contain NUL bytes")]
    CmdlineNul,
    /// Writing a boot structure to guest memory failed.
    #[error("cannot write the {0} to guest memory")]
    WriteGuestMemory(&'static str, #[source] vm_memory::GuestMemoryError),
    /// More e820 entries than boot_params holds.
    #[error("too many e820 entries ({0})")]
    TooManyE820Entries(usize),
}

/// Kernel image formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// ELF `vmlinux`.
    Elf,
    /// Compressed `bzImage`.
    BzImage,
}

/// Tells the kernel format from the first 0x210 bytes of the file.
pub fn detect_format(head: &[u8]) -> Option<KernelFormat> {
    if head.len() >= 4 && &head[..4] == b"\x7fELF" {
        return Some(KernelFormat::Elf);
    }
    // bzImage: "HdrS" at 0x202 and the boot sector signature at 0x1fe.
    if head.len() >= 0x206 && &head[0x202..0x206] == b"HdrS" && head[0x1fe..0x200] == [0x55, 0xaa]
    {
        return Some(KernelFormat::BzImage);
    }
    None
}

/// A kernel file opened and recognised, not yet loaded.
pub struct KernelImage {
    path: PathBuf,
    file: File,
    format: KernelFormat,
    /// The longest command line the kernel accepts, without the NUL.
    cmdline_max: usize,
}

impl KernelImage {
    /// Opens the kernel and checks that it is one.
    pub fn open(path: &Path) -> Result<Self, BootError> {
        let mut file = open_file(path).map_err(|e| match e {
            OpenError::Io(e) => BootError::OpenKernel(path.to_path_buf(), e),
            OpenError::Directory => BootError::IsDirectory(path.to_path_buf()),
        })?;
        let mut head = Vec::with_capacity(0x400);
        (&mut file)
            .take(0x400)
            .read_to_end(&mut head)
            .map_err(|e| BootError::ReadKernel(path.to_path_buf(), e))?;
        let format = detect_format(&head).ok_or_else(|| BootError::NotAKernel(path.to_path_buf()))?;
        let len = file
            .metadata()
            .map_err(|e| BootError::ReadKernel(path.to_path_buf(), e))?
            .len();
        let damaged = |why: String| BootError::Damaged(path.to_path_buf(), why);
        let cmdline_max = match format {
            KernelFormat::Elf => {
                check_elf(&mut file, &head, len).map_err(damaged)?;
                DEFAULT_CMDLINE_MAX - 1
            }
            KernelFormat::BzImage => {
                check_bzimage(&head, len).map_err(damaged)?;
                bzimage_cmdline_max(&head)
            }
        };
        file.seek(SeekFrom::Start(0))
            .map_err(|e| BootError::ReadKernel(path.to_path_buf(), e))?;
        Ok(KernelImage { path: path.to_path_buf(), file, format, cmdline_max })
    }

    /// The format found.
    pub fn format(&self) -> KernelFormat {
        self.format
    }

    /// Checks a command line against this kernel's limit.
    pub fn check_cmdline(&self, cmdline: &str) -> Result<(), BootError> {
        if cmdline.as_bytes().contains(&0) {
            return Err(BootError::CmdlineNul);
        }
        if cmdline.len() > self.cmdline_max {
            return Err(BootError::CmdlineTooLong { len: cmdline.len(), max: self.cmdline_max });
        }
        Ok(())
    }
}

/// ELF64 header and program header fields we check.
const ELFCLASS64: u8 = 2;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const ELF64_PHDR_SIZE: u64 = 56;
/// More program headers than any kernel has.
const MAX_PHDRS: u64 = 64;

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(bytes)
}

/// Checks that an ELF kernel is a 64-bit x86 image whose loadable segments
/// all lie inside the file of `len` bytes.
fn check_elf(file: &mut File, head: &[u8], len: u64) -> Result<(), String> {
    if head.len() < 64 {
        return Err(format!("the file is {len} bytes, shorter than an ELF header"));
    }
    if head[4] != ELFCLASS64 || le_u16(head, 18) != EM_X86_64 {
        return Err("not a 64-bit x86 ELF image".into());
    }
    let (phoff, phentsize, phnum) = (le_u64(head, 32), u64::from(le_u16(head, 54)), u64::from(le_u16(head, 56)));
    if phentsize != ELF64_PHDR_SIZE || phnum == 0 || phnum > MAX_PHDRS {
        return Err(format!("implausible program headers ({phnum} of {phentsize} bytes)"));
    }
    let table_end = phoff
        .checked_add(phnum * phentsize)
        .filter(|&end| end <= len)
        .ok_or_else(|| format!("program headers end past the end of the {len}-byte file"))?;
    let mut table = vec![0u8; (table_end - phoff) as usize];
    file.seek(SeekFrom::Start(phoff))
        .and_then(|_| file.read_exact(&mut table))
        .map_err(|e| format!("cannot read program headers: {e}"))?;
    for (i, ph) in table.chunks_exact(ELF64_PHDR_SIZE as usize).enumerate() {
        if le_u32(ph, 0) != PT_LOAD {
            continue;
        }
        let (offset, filesz) = (le_u64(ph, 8), le_u64(ph, 32));
        if offset.checked_add(filesz).is_none_or(|end| end > len) {
            return Err(format!(
                "segment {i} ({filesz} bytes at offset {offset}) ends past the end of the {len}-byte file"
            ));
        }
    }
    Ok(())
}

/// Checks that a bzImage holds the whole protected-mode part its header
/// announces.
fn check_bzimage(head: &[u8], len: u64) -> Result<(), String> {
    let setup_sects = match head[0x1f1] {
        0 => 4,
        n => u64::from(n),
    };
    let syssize = u64::from(le_u32(head, 0x1f4)) * 16;
    let needed = (setup_sects + 1) * 512 + syssize;
    if needed > len {
        return Err(format!("the header announces {needed} bytes but the file has {len}"));
    }
    Ok(())
}

/// The `cmdline_size` a bzImage states (protocol 2.06+), else the default.
fn bzimage_cmdline_max(head: &[u8]) -> usize {
    let version = u16::from_le_bytes([head[0x206], head[0x207]]);
    if version >= 0x0206 && head.len() >= 0x23c {
        let size = u32::from_le_bytes([head[0x238], head[0x239], head[0x23a], head[0x23b]]);
        // The field counts the bytes without the NUL.
        return size as usize;
    }
    255
}

enum OpenError {
    Io(std::io::Error),
    Directory,
}

fn open_file(path: &Path) -> Result<File, OpenError> {
    let file = File::open(path).map_err(OpenError::Io)?;
    let meta = file.metadata().map_err(OpenError::Io)?;
    if meta.is_dir() {
        return Err(OpenError::Directory);
    }
    Ok(file)
}

/// An initrd file opened, with its size.
pub struct InitrdImage {
    path: PathBuf,
    file: File,
    size: u64,
}

impl InitrdImage {
    /// Opens the initrd and checks it fits in `mem_size` bytes at all.
    pub fn open(path: &Path, mem_size: u64) -> Result<Self, BootError> {
        let file = open_file(path).map_err(|e| match e {
            OpenError::Io(e) => BootError::OpenInitrd(path.to_path_buf(), e),
            OpenError::Directory => BootError::IsDirectory(path.to_path_buf()),
        })?;
        let size = file
            .metadata()
            .map_err(|e| BootError::OpenInitrd(path.to_path_buf(), e))?
            .len();
        let low_mem = mem_size.min(layout::MMIO_GAP_START);
        if size >= low_mem - layout::HIMEM_START {
            return Err(BootError::InitrdTooLarge {
                path: path.to_path_buf(),
                size,
                room: low_mem - layout::HIMEM_START,
            });
        }
        Ok(InitrdImage { path: path.to_path_buf(), file, size })
    }

    /// Its size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
}

/// Where the kernel landed.
#[derive(Debug)]
pub struct LoadedKernel {
    /// The 64-bit entry point.
    pub entry: GuestAddress,
    /// First byte past the kernel image.
    pub end: u64,
    /// The bzImage's setup header, to pass on in `boot_params`.
    pub setup_header: Option<setup_header>,
}

/// Loads the kernel image into guest memory.
pub fn load_kernel(mem: &GuestMemoryMmap, kernel: &mut KernelImage) -> Result<LoadedKernel, BootError> {
    let himem = Some(GuestAddress(layout::HIMEM_START));
    let result = match kernel.format {
        KernelFormat::Elf => Elf::load(mem, None, &mut kernel.file, himem),
        KernelFormat::BzImage => BzImage::load(mem, None, &mut kernel.file, himem),
    }
    .map_err(|e| BootError::LoadKernel(kernel.path.clone(), e))?;
    let entry = match kernel.format {
        KernelFormat::Elf => result.kernel_load,
        KernelFormat::BzImage => GuestAddress(result.kernel_load.0 + BZIMAGE_ENTRY_64),
    };
    Ok(LoadedKernel { entry, end: result.kernel_end, setup_header: result.setup_header })
}

/// Copies the initrd to the top of low memory; returns its address.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    initrd: &mut InitrdImage,
    kernel: &LoadedKernel,
) -> Result<GuestAddress, BootError> {
    let addr_max = kernel
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|&max| max != 0)
        .unwrap_or(DEFAULT_INITRD_ADDR_MAX);
    let low_end = (mem.last_addr().0 + 1).min(layout::MMIO_GAP_START).min(addr_max + 1);
    let too_large = |room: u64| BootError::InitrdTooLarge {
        path: initrd.path.clone(),
        size: initrd.size,
        room,
    };
    let floor = kernel.end.next_multiple_of(PAGE_SIZE);
    let room = low_end.saturating_sub(floor);
    if initrd.size > room {
        return Err(too_large(room));
    }
    let addr = (low_end - initrd.size) & !(PAGE_SIZE - 1);
    let size = usize::try_from(initrd.size).map_err(|_| too_large(room))?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut initrd.file, size)
        .map_err(|e| BootError::ReadInitrd(initrd.path.clone(), e))?;
    Ok(GuestAddress(addr))
}

/// The e820 map for a guest of `mem_size` bytes.
pub fn e820_map(mem_size: u64) -> Vec<boot_e820_entry> {
    let entry = |addr, size, r#type| boot_e820_entry { addr, size, r#type };
    let mut map = vec![
        entry(0, layout::EBDA_START, E820_RAM),
        entry(layout::EBDA_START, layout::BIOS_END - layout::EBDA_START, E820_RESERVED),
    ];
    for (start, size) in layout::ram_ranges(mem_size) {
        let start = start.max(layout::HIMEM_START);
        let end = if start == layout::HIMEM_START { size } else { start + size };
        map.push(entry(start, end - start, E820_RAM));
    }
    map
}

/// What goes into `boot_params` besides the e820 map.
pub struct BootParamsInput<'a> {
    /// The loaded kernel.
    pub kernel: &'a LoadedKernel,
    /// Command line length without the NUL.
    pub cmdline_len: usize,
    /// Initrd address and size.
    pub initrd: Option<(GuestAddress, u64)>,
    /// Guest memory size.
    pub mem_size: u64,
    /// Address of the ACPI RSDP.
    pub rsdp: GuestAddress,
}

/// Builds `boot_params` ("the zero page").
pub fn build_boot_params(input: &BootParamsInput) -> Result<boot_params, BootError> {
    let mut params = boot_params::default();
    match input.kernel.setup_header {
        Some(header) => params.hdr = header,
        None => {
            params.hdr.version = BOOT_PROTOCOL_VERSION;
            params.hdr.kernel_alignment = 0x0100_0000;
        }
    }
    params.hdr.header = HDRS_MAGIC;
    params.hdr.boot_flag = BOOT_FLAG;
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.loadflags |= LOADED_HIGH;
    params.hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
    params.hdr.cmdline_size = input.cmdline_len as u32;
    if let Some((addr, size)) = input.initrd {
        params.hdr.ramdisk_image = addr.0 as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = input.rsdp.0;
    let map = e820_map(input.mem_size);
    if map.len() > E820_MAX_ENTRIES {
        return Err(BootError::TooManyE820Entries(map.len()));
    }
    params.e820_entries = map.len() as u8;
    params.e820_table[..map.len()].copy_from_slice(&map);
    Ok(params)
}

/// Writes the command line, NUL-terminated.
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<(), BootError> {
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(layout::CMDLINE_START))
        .map_err(|e| BootError::WriteGuestMemory("kernel command line", e))
}

/// Writes `boot_params` to the zero page.
pub fn write_boot_params(mem: &GuestMemoryMmap, params: &boot_params) -> Result<(), BootError> {
    mem.write_obj(*params, GuestAddress(layout::ZERO_PAGE_START))
        .map_err(|e| BootError::WriteGuestMemory("boot parameters", e))
}

/// The boot GDT: null, 64-bit code (selector 0x8), data (0x10), TSS (0x18).
pub const BOOT_GDT: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// Encodes a GDT entry from its flags (access byte and the upper nibble),
/// base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// Writes the GDT and an empty IDT.
pub fn write_gdt_idt(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(layout::BOOT_GDT_START + 8 * i as u64))
            .map_err(|e| BootError::WriteGuestMemory("GDT", e))?;
    }
    mem.write_obj(0u64, GuestAddress(layout::BOOT_IDT_START))
        .map_err(|e| BootError::WriteGuestMemory("IDT", e))
}

/// Page-table entry bits.
const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_HUGE: u64 = 1 << 7;

/// Writes page tables that identity-map the first 4 GiB with 2 MiB pages, as
/// the 64-bit boot protocol asks (kernel, boot_params, command line and
/// initrd must all be mapped).
pub fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    let write = |value: u64, addr: u64| {
        mem.write_obj(value, GuestAddress(addr))
            .map_err(|e| BootError::WriteGuestMemory("page tables", e))
    };
    write(layout::PDPTE_START | PTE_PRESENT | PTE_WRITABLE, layout::PML4_START)?;
    for pd in 0..4u64 {
        let pd_addr = layout::PDE_START + pd * PAGE_SIZE;
        write(pd_addr | PTE_PRESENT | PTE_WRITABLE, layout::PDPTE_START + pd * 8)?;
        for i in 0..512u64 {
            let phys = (pd << 30) | (i << 21);
            write(phys | PTE_PRESENT | PTE_WRITABLE | PTE_HUGE, pd_addr + i * 8)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bzimage_head(version: u16, cmdline_size: u32) -> Vec<u8> {
        let mut head = vec![0u8; 0xa00];
        head[0x1fe] = 0x55;
        head[0x1ff] = 0xaa;
        head[0x202..0x206].copy_from_slice(b"HdrS");
        head[0x206..0x208].copy_from_slice(&version.to_le_bytes());
        head[0x238..0x23c].copy_from_slice(&cmdline_size.to_le_bytes());
        head
    }

    #[test]
    fn detect_format_recognises_elf() {
        assert_eq!(detect_format(b"\x7fELF\x02\x01\x01"), Some(KernelFormat::Elf));
    }

    #[test]
    fn truncated_bzimage_is_damaged() {
        let mut head = bzimage_head(0x020f, 2047);
        head[0x1f1] = 1;
        head[0x1f4..0x1f8].copy_from_slice(&100u32.to_le_bytes());
        assert!(check_bzimage(&head, 1024 + 1600).is_ok());
        assert!(check_bzimage(&head, 1024 + 1599).is_err());
    }

    fn elf_head(phoff: u64, phnum: u16) -> Vec<u8> {
        let mut head = vec![0u8; 64];
        head[..4].copy_from_slice(b"\x7fELF");
        head[4] = ELFCLASS64;
        head[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        head[32..40].copy_from_slice(&phoff.to_le_bytes());
        head[54..56].copy_from_slice(&(ELF64_PHDR_SIZE as u16).to_le_bytes());
        head[56..58].copy_from_slice(&phnum.to_le_bytes());
        head
    }

    fn elf_with_segment(offset: u64, filesz: u64) -> Vec<u8> {
        let mut image = elf_head(64, 1);
        let mut ph = vec![0u8; ELF64_PHDR_SIZE as usize];
        ph[..4].copy_from_slice(&PT_LOAD.to_le_bytes());
        ph[8..16].copy_from_slice(&offset.to_le_bytes());
        ph[32..40].copy_from_slice(&filesz.to_le_bytes());
        image.extend(ph);
        image.resize(4096, 0);
        image
    }

    fn check_elf_bytes(image: &[u8]) -> Result<(), String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("vmlinux");
        std::fs::write(&path, image).expect("write");
        let mut file = File::open(&path).expect("open");
        check_elf(&mut file, &image[..64.min(image.len())], image.len() as u64)
    }

    #[test]
    fn elf_segment_inside_the_file_passes() {
        assert!(check_elf_bytes(&elf_with_segment(0x200, 0x100)).is_ok());
    }

    #[test]
    fn elf_segment_past_the_end_is_damaged() {
        let err = check_elf_bytes(&elf_with_segment(0x200, 0x10_0000)).expect_err("truncated");
        assert!(err.contains("segment 0"), "{err}");
    }

    #[test]
    fn elf_program_headers_past_the_end_are_damaged() {
        let mut image = elf_head(1 << 40, 4);
        image.resize(4096, 0);
        assert!(check_elf_bytes(&image).is_err());
    }

    #[test]
    fn elf_for_another_machine_is_refused() {
        let mut image = elf_with_segment(0x200, 0x100);
        image[18] = 183; // AArch64
        assert!(check_elf_bytes(&image).expect_err("wrong machine").contains("64-bit x86"));
    }

    #[test]
    fn detect_format_recognises_bzimage() {
        assert_eq!(detect_format(&bzimage_head(0x020f, 2047)), Some(KernelFormat::BzImage));
    }

    #[test]
    fn detect_format_rejects_other_files() {
        assert_eq!(detect_format(b"#!/bin/sh\necho hello\n"), None);
        assert_eq!(detect_format(&[0u8; 0x400]), None);
        assert_eq!(detect_format(&[]), None);
    }

    #[test]
    fn bzimage_cmdline_limit_comes_from_header() {
        assert_eq!(bzimage_cmdline_max(&bzimage_head(0x020f, 2047)), 2047);
        assert_eq!(bzimage_cmdline_max(&bzimage_head(0x0205, 2047)), 255);
    }

    #[test]
    fn check_cmdline_rejects_too_long_and_nul() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bz");
        std::fs::write(&path, bzimage_head(0x020f, 16)).expect("write");
        let image = KernelImage::open(&path).expect("open");
        assert!(image.check_cmdline("console=ttyS0").is_ok());
        assert!(matches!(
            image.check_cmdline("console=ttyS0 quiet"),
            Err(BootError::CmdlineTooLong { len: 19, max: 16 })
        ));
        assert!(matches!(image.check_cmdline("a\0b"), Err(BootError::CmdlineNul)));
    }

    #[test]
    fn open_rejects_non_kernel_and_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("text");
        std::fs::write(&path, "not a kernel").expect("write");
        assert!(matches!(KernelImage::open(&path), Err(BootError::NotAKernel(_))));
        assert!(matches!(KernelImage::open(dir.path()), Err(BootError::IsDirectory(_))));
        assert!(matches!(
            KernelImage::open(&dir.path().join("missing")),
            Err(BootError::OpenKernel(..))
        ));
    }

    #[test]
    fn initrd_larger_than_memory_is_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("initrd");
        let file = File::create(&path).expect("create");
        file.set_len(64 << 20).expect("set_len");
        assert!(matches!(InitrdImage::open(&path, 32 << 20), Err(BootError::InitrdTooLarge { .. })));
        assert!(InitrdImage::open(&path, 512 << 20).is_ok());
    }

    #[test]
    fn e820_small_guest() {
        let map = e820_map(512 << 20);
        let got: Vec<(u64, u64, u32)> = map.iter().map(|e| (e.addr, e.size, e.r#type)).collect();
        assert_eq!(
            got,
            vec![
                (0, 0x9fc00, E820_RAM),
                (0x9fc00, 0x10_0000 - 0x9fc00, E820_RESERVED),
                (0x10_0000, (512 << 20) - 0x10_0000, E820_RAM),
            ]
        );
    }

    #[test]
    fn e820_large_guest_skips_mmio_gap() {
        let map = e820_map(4 << 30);
        let last = map.last().expect("entries");
        assert_eq!((last.addr, last.size), (1 << 32, 1 << 30));
        let below = &map[2];
        assert_eq!((below.addr, below.addr + below.size), (0x10_0000, layout::MMIO_GAP_START));
        let ram: u64 = map.iter().filter(|e| e.r#type == E820_RAM).map(|e| e.size).sum();
        assert_eq!(ram, (4 << 30) - (layout::BIOS_END - layout::EBDA_START));
    }

    #[test]
    fn gdt_entries_match_known_encodings() {
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
    }

    #[test]
    fn boot_params_carry_cmdline_initrd_and_e820() {
        let kernel = LoadedKernel { entry: GuestAddress(0x100_0000), end: 0x200_0000, setup_header: None };
        let params = build_boot_params(&BootParamsInput {
            kernel: &kernel,
            cmdline_len: 20,
            initrd: Some((GuestAddress(0x1000_0000), 0x1234)),
            mem_size: 512 << 20,
            rsdp: GuestAddress(layout::ACPI_START),
        })
        .expect("params");
        assert_eq!({ params.hdr.header }, HDRS_MAGIC);
        assert_eq!({ params.hdr.cmd_line_ptr }, layout::CMDLINE_START as u32);
        assert_eq!({ params.hdr.ramdisk_image }, 0x1000_0000);
        assert_eq!({ params.hdr.ramdisk_size }, 0x1234);
        assert_eq!({ params.acpi_rsdp_addr }, layout::ACPI_START);
        assert_eq!(params.e820_entries, 3);
    }

    #[test]
    fn page_tables_identity_map_4g() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mem");
        write_page_tables(&mem).expect("tables");
        let pml4: u64 = mem.read_obj(GuestAddress(layout::PML4_START)).expect("read");
        assert_eq!(pml4 & !0xfff, layout::PDPTE_START);
        let pdpte3: u64 = mem.read_obj(GuestAddress(layout::PDPTE_START + 24)).expect("read");
        assert_eq!(pdpte3 & !0xfff, layout::PDE_START + 3 * PAGE_SIZE);
        let last: u64 = mem
            .read_obj(GuestAddress(layout::PDE_START + 3 * PAGE_SIZE + 511 * 8))
            .expect("read");
        assert_eq!(last & !0xfff, (3 << 30) | (511 << 21));
        assert_eq!(last & 0x83, 0x83);
    }
}
