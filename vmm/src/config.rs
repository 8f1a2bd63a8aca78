//! What the user asked for: the machine to build and the kernel to boot.

use std::path::PathBuf;

use crate::content::service::ContentConfig;
use crate::layout::{MAX_MEMORY, MIN_MEMORY};

/// Most vCPUs a guest can have.
pub const MAX_VCPUS: u8 = 32;
/// Default guest memory size.
pub const DEFAULT_MEMORY: u64 = 512 << 20;
/// Kernel command line used when the user gives none.
/// `quiet` keeps the boot log to warnings and errors: every byte on the
/// emulated UART is a VM exit, and a full log costs seconds of boot time.
/// `pci=off`: the machine has no PCI bus, and probing for one only prints
/// an error.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off quiet";

const PAGE_SIZE: u64 = 4096;
/// Most disks a guest can have.
pub const MAX_DISKS: usize = 8;
/// Smallest guest CID: 0–2 are the hypervisor, loopback and the host.
pub const MIN_GUEST_CID: u64 = 3;

/// Errors in what the user asked for.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A size that does not parse.
    #[error("invalid size {0:?}: expected a number with an optional K, M, G or T suffix (e.g. 512M, 2G)")]
    ParseSize(String),
    /// Memory size outside the supported range.
    #[error("memory size {size} bytes is out of range: it must be between {min} MiB and {max} GiB", min = MIN_MEMORY >> 20, max = MAX_MEMORY >> 30)]
    MemoryOutOfRange {
        /// The requested size.
        size: u64,
    },
    /// Memory size that is no whole number of pages.
    #[error("memory size {0} bytes is not a multiple of the 4 KiB page size")]
    MemoryNotPageAligned(u64),
    /// vCPU count outside 1..=MAX_VCPUS.
    #[error("{0} vCPUs requested: the count must be between 1 and {MAX_VCPUS}")]
    VcpuCount(u64),
    /// More disks than the machine takes.
    #[error("{0} disks given: a VM takes at most {MAX_DISKS}")]
    TooManyDisks(usize),
    /// A `--disk` value that does not parse.
    #[error("invalid --disk {0:?}: expected PATH or PATH,ro")]
    DiskSpec(String),
    /// A `--vsock` value that does not parse.
    #[error("invalid --vsock {0:?}: expected CID,UDS_PATH (e.g. 3,/tmp/vm.vsock)")]
    VsockSpec(String),
    /// A guest CID below 3.
    #[error("vsock guest CID {0} is reserved: the guest CID must be at least {MIN_GUEST_CID} (0-2 are the hypervisor, loopback and the host)")]
    GuestCid(u64),
}

/// A disk image the guest sees as a virtio-blk device (`/dev/vda`, …).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// The image file.
    pub path: PathBuf,
    /// The guest cannot write it.
    pub read_only: bool,
}

impl DiskConfig {
    /// Parses `PATH` or `PATH,ro` (`PATH,rw` is the default spelled out).
    pub fn parse(spec: &str) -> Result<Self, ConfigError> {
        let (path, read_only) = match spec.rsplit_once(',') {
            Some((path, "ro")) => (path, true),
            Some((path, "rw")) => (path, false),
            _ => (spec, false),
        };
        if path.is_empty() {
            return Err(ConfigError::DiskSpec(spec.to_string()));
        }
        Ok(DiskConfig { path: path.into(), read_only })
    }
}

/// The guest's vsock device and the Unix socket its host side listens on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context ID.
    pub guest_cid: u64,
    /// Host programs connect here; guest connections to host port P go to
    /// `UDS_PATH_P`.
    pub uds_path: PathBuf,
}

impl VsockConfig {
    /// Parses `CID,UDS_PATH`.
    pub fn parse(spec: &str) -> Result<Self, ConfigError> {
        let bad = || ConfigError::VsockSpec(spec.to_string());
        let (cid, path) = spec.split_once(',').ok_or_else(bad)?;
        let guest_cid: u64 = cid.trim().parse().map_err(|_| bad())?;
        if path.is_empty() {
            return Err(bad());
        }
        if guest_cid < MIN_GUEST_CID || guest_cid > u64::from(u32::MAX - 1) {
            return Err(ConfigError::GuestCid(guest_cid));
        }
        Ok(VsockConfig { guest_cid, uds_path: path.into() })
    }
}

/// The machine to build and the kernel to boot in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// ELF vmlinux or bzImage.
    pub kernel: PathBuf,
    /// Optional initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Guest memory in bytes.
    pub mem_size: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Disks, in the order the guest sees them (vda first).
    pub disks: Vec<DiskConfig>,
    /// The vsock device, if any.
    pub vsock: Option<VsockConfig>,
    /// Whether the guest gets a virtio-rng entropy device.
    pub rng: bool,
    /// Content served to the guest over vsock (`docs/content.md`).
    pub content: Option<ContentConfig>,
}

impl VmConfig {
    /// Checks memory size and vCPU count, and builds the configuration.
    pub fn new(
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: Option<String>,
        mem_size: u64,
        vcpus: u64,
    ) -> Result<Self, ConfigError> {
        if !(MIN_MEMORY..=MAX_MEMORY).contains(&mem_size) {
            return Err(ConfigError::MemoryOutOfRange { size: mem_size });
        }
        if mem_size % PAGE_SIZE != 0 {
            return Err(ConfigError::MemoryNotPageAligned(mem_size));
        }
        let vcpus = match u8::try_from(vcpus) {
            Ok(n) if (1..=MAX_VCPUS).contains(&n) => n,
            _ => return Err(ConfigError::VcpuCount(vcpus)),
        };
        Ok(VmConfig {
            kernel,
            initrd,
            cmdline: cmdline.unwrap_or_else(|| DEFAULT_CMDLINE.to_string()),
            mem_size,
            vcpus,
            disks: Vec::new(),
            vsock: None,
            rng: false,
            content: None,
        })
    }

    /// Adds the virtio devices: `disks` (`PATH[,ro]` each), a vsock device
    /// (`CID,UDS_PATH`) and an entropy device.
    pub fn with_devices(mut self, disks: &[String], vsock: Option<&str>, rng: bool) -> Result<Self, ConfigError> {
        if disks.len() > MAX_DISKS {
            return Err(ConfigError::TooManyDisks(disks.len()));
        }
        self.disks = disks.iter().map(|d| DiskConfig::parse(d)).collect::<Result<_, _>>()?;
        self.vsock = vsock.map(VsockConfig::parse).transpose()?;
        self.rng = rng;
        Ok(self)
    }
}

/// Parses a byte size such as `4096`, `64K`, `512M`, `512MiB` or `2G`
/// (binary units).
pub fn parse_size(text: &str) -> Result<u64, ConfigError> {
    let err = || ConfigError::ParseSize(text.to_string());
    let trimmed = text.trim();
    let digits_end = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, suffix) = trimmed.split_at(digits_end);
    let value: u64 = digits.parse().map_err(|_| err())?;
    let shift = match suffix.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(err()),
    };
    value
        .checked_mul(1u64 << shift)
        .ok_or_else(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(mem: u64, vcpus: u64) -> Result<VmConfig, ConfigError> {
        VmConfig::new("k".into(), None, None, mem, vcpus)
    }

    #[test]
    fn parse_size_accepts_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
    }

    #[test]
    fn parse_size_rejects_garbage() {
        for bad in ["", "M", "12Q", "-5M", "1.5G", "99999999999999999999T", "5 M M"] {
            assert!(parse_size(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn parse_size_rejects_overflow() {
        assert!(parse_size("20000000T").is_err());
    }

    #[test]
    fn config_rejects_memory_out_of_range() {
        assert_eq!(config(1 << 20, 1), Err(ConfigError::MemoryOutOfRange { size: 1 << 20 }));
        assert!(config(2 << 40, 1).is_err());
    }

    #[test]
    fn config_rejects_unaligned_memory() {
        let size = (512 << 20) + 1;
        assert_eq!(config(size, 1), Err(ConfigError::MemoryNotPageAligned(size)));
    }

    #[test]
    fn config_rejects_vcpu_count_out_of_range() {
        assert_eq!(config(512 << 20, 0), Err(ConfigError::VcpuCount(0)));
        assert_eq!(config(512 << 20, 33), Err(ConfigError::VcpuCount(33)));
        assert_eq!(config(512 << 20, 300), Err(ConfigError::VcpuCount(300)));
    }

    #[test]
    fn disk_spec_takes_a_read_only_suffix() {
        let d = DiskConfig::parse("a,b.img,ro").expect("valid");
        assert_eq!((d.path, d.read_only), (PathBuf::from("a,b.img"), true));
        assert!(!DiskConfig::parse("x.img").expect("valid").read_only);
        assert!(!DiskConfig::parse("x.img,rw").expect("valid").read_only);
        assert_eq!(DiskConfig::parse(",ro"), Err(ConfigError::DiskSpec(",ro".into())));
    }

    #[test]
    fn nine_disks_are_refused() {
        let disks: Vec<String> = (0..9).map(|i| format!("d{i}.img")).collect();
        let err = config(512 << 20, 1).expect("valid").with_devices(&disks, None, true);
        assert_eq!(err, Err(ConfigError::TooManyDisks(9)));
    }

    #[test]
    fn vsock_spec_needs_a_cid_of_at_least_3_and_a_path() {
        let v = VsockConfig::parse("3,/tmp/v.sock").expect("valid");
        assert_eq!((v.guest_cid, v.uds_path), (3, PathBuf::from("/tmp/v.sock")));
        assert_eq!(VsockConfig::parse("2,/tmp/v"), Err(ConfigError::GuestCid(2)));
        assert_eq!(VsockConfig::parse("4294967295,/tmp/v"), Err(ConfigError::GuestCid(4294967295)));
        for bad in ["3", "x,/tmp/v", "3,", ""] {
            assert!(matches!(VsockConfig::parse(bad), Err(ConfigError::VsockSpec(_))), "{bad:?}");
        }
    }

    #[test]
    fn config_uses_default_cmdline() {
        let cfg = config(512 << 20, 2).expect("valid config");
        assert_eq!(cfg.cmdline, DEFAULT_CMDLINE);
        assert_eq!(cfg.vcpus, 2);
    }
}
