//! Guest boot: where boot data lives in guest memory, the e820 map, the
//! two boot paths (PVH ELF entry and Linux bzImage direct boot), and the
//! platform description (ACPI tables, the MP table).

pub mod acpi;
pub mod bzimage;
pub mod mptable;
pub mod pvh;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::memory::{GuestMemory, MMIO_HOLE_START};

/// GDT used for the initial vCPU state.
pub const GDT_ADDR: u64 = 0x500;
/// PVH `hvm_start_info`.
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// PVH memory map (array of `hvm_memmap_table_entry`).
pub const PVH_MEMMAP_ADDR: u64 = 0x7000;
/// Linux zero page (`boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Identity page tables for the bzImage 64-bit entry (PML4, PDPT, PD).
pub const PML4_ADDR: u64 = 0x9000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Largest command line we accept (including the NUL).
pub const CMDLINE_MAX: usize = 0x10000;
/// Start of the EBDA; from here to 1 MiB is reserved in the e820 map.
pub const EBDA_START: u64 = 0x9fc00;
/// Where the kernel is loaded (1 MiB).
pub const HIMEM_START: u64 = 0x10_0000;
/// MP table (the guest scans 0xF0000..0x100000 for `_MP_`); the ACPI
/// tables sit below it, from [`acpi::RSDP_ADDR`].
pub const MPTABLE_ADDR: u64 = 0xf_0000;

/// e820 entry type for usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 entry type for reserved memory.
pub const E820_RESERVED: u32 = 2;

/// Errors of guest boot setup.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file could not be opened.
    #[error("Cannot open kernel {0}; check the --kernel path")]
    OpenKernel(String, #[source] std::io::Error),
    /// The kernel is neither a PVH ELF nor a bzImage.
    #[error("{0} is not a kernel (neither an ELF with a PVH note nor a bzImage); pass a vmlinux/PVH ELF or bzImage to --kernel")]
    NotAKernel(String),
    /// The ELF has no PVH entry note.
    #[error("{0} is an ELF without a PVH entry note (Xen note type 18); build the kernel with CONFIG_PVH")]
    NoPvhNote(String),
    /// Loading the kernel into guest memory failed.
    #[error("Failed to load the kernel into guest memory")]
    LoadKernel(#[source] linux_loader::loader::Error),
    /// The initrd could not be read.
    #[error("Cannot read initrd {0}; check the --initrd path")]
    ReadInitrd(String, #[source] std::io::Error),
    /// The initrd does not fit below the MMIO hole.
    #[error("Initrd does not fit in guest memory; raise --memory-mib")]
    InitrdTooLarge,
    /// The command line is too long.
    #[error("Kernel command line is longer than {CMDLINE_MAX} bytes; shorten --cmdline")]
    CmdlineTooLong,
    /// Writing boot data to guest memory failed.
    #[error("Failed to write boot data to guest memory")]
    WriteGuestMemory(#[source] vm_memory::GuestMemoryError),
    /// Too many vCPUs for the MP table.
    #[error("Too many vCPUs for the MP table (at most 254)")]
    TooManyCpus,
    /// The ACPI tables do not fit below the MP table.
    #[error(
        "The ACPI tables do not fit between 0xE0000 and the MP table; use fewer devices or vCPUs"
    )]
    AcpiTooLarge,
}

/// One e820/PVH memory map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// The memory map given to the guest: low RAM, the reserved EBDA/BIOS area
/// (which holds the MP table), RAM from 1 MiB, and RAM above 4 GiB.
pub fn e820_map(mem: &GuestMemory) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    for r in mem.iter() {
        let start = r.start_addr().0.max(HIMEM_START);
        let end = r.start_addr().0 + r.len();
        if end > start {
            map.push(E820Entry {
                addr: start,
                size: end - start,
                kind: E820_RAM,
            });
        }
    }
    debug_assert!(map
        .iter()
        .all(|e| e.addr + e.size <= MMIO_HOLE_START || e.addr >= 1 << 32));
    map
}

/// Reads the kernel file, telling a missing file from one that is not a kernel.
pub fn open_kernel(path: &std::path::Path) -> Result<std::fs::File, BootError> {
    std::fs::File::open(path).map_err(|e| BootError::OpenKernel(path.display().to_string(), e))
}

/// Which boot protocol a kernel file uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelKind {
    /// ELF with a PVH entry note.
    PvhElf,
    /// Linux bzImage.
    BzImage,
}

/// Detects the kernel format from its first bytes.
pub fn detect_kernel(path: &std::path::Path) -> Result<KernelKind, BootError> {
    use std::io::{Read, Seek, SeekFrom};
    let name = path.display().to_string();
    let mut f = open_kernel(path)?;
    let mut head = [0u8; 4];
    if f.read_exact(&mut head).is_err() {
        return Err(BootError::NotAKernel(name));
    }
    if head == *b"\x7fELF" {
        return Ok(KernelKind::PvhElf);
    }
    let mut magic = [0u8; 4];
    if f.seek(SeekFrom::Start(0x202)).is_ok()
        && f.read_exact(&mut magic).is_ok()
        && magic == *b"HdrS"
    {
        return Ok(KernelKind::BzImage);
    }
    Err(BootError::NotAKernel(name))
}

/// Writes the NUL-terminated command line at [`CMDLINE_ADDR`].
pub fn write_cmdline(mem: &GuestMemory, cmdline: &str) -> Result<(), BootError> {
    use vm_memory::{Bytes, GuestAddress};
    if cmdline.len() + 1 > CMDLINE_MAX {
        return Err(BootError::CmdlineTooLong);
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_ADDR))
        .map_err(BootError::WriteGuestMemory)
}
