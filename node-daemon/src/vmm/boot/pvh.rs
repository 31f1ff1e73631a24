//! PVH boot: load an ELF with a Xen PVH entry note and fill `hvm_start_info`
//! (command line, memory map). The vCPU enters at the note's 32-bit entry in
//! protected mode with paging off and EBX pointing at the start info.

use std::path::Path;

use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::{Bytes, GuestAddress};

use super::{
    e820_map, open_kernel, BootError, CMDLINE_ADDR, HIMEM_START, PVH_INFO_ADDR, PVH_MEMMAP_ADDR,
};
use crate::vmm::memory::GuestMemory;

/// `hvm_start_info.magic`.
pub const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

/// Loads the PVH ELF at `path` and writes the start info (with the RSDP
/// address, 0 without ACPI); returns the entry.
pub fn load(mem: &GuestMemory, path: &Path, rsdp: u64) -> Result<u64, BootError> {
    let name = path.display().to_string();
    let mut f = open_kernel(path)?;
    let res =
        Elf::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))).map_err(|e| match e {
            linux_loader::loader::Error::Elf(
                linux_loader::loader::elf::Error::InvalidElfMagicNumber,
            ) => BootError::NotAKernel(name.clone()),
            e => BootError::LoadKernel(e),
        })?;
    let PvhBootCapability::PvhEntryPresent(entry) = res.pvh_boot_cap else {
        return Err(BootError::NoPvhNote(name));
    };
    write_start_info(mem, rsdp)?;
    Ok(entry.0)
}

/// Writes `hvm_start_info` at [`PVH_INFO_ADDR`] and the memory map at
/// [`PVH_MEMMAP_ADDR`] (the command line is at [`CMDLINE_ADDR`]); `rsdp`
/// is the ACPI RSDP address (0: no ACPI).
pub fn write_start_info(mem: &GuestMemory, rsdp: u64) -> Result<(), BootError> {
    let map = e820_map(mem);
    let w = |v: &[u8], at: u64| {
        mem.write_slice(v, GuestAddress(at))
            .map_err(BootError::WriteGuestMemory)
    };
    // hvm_start_info (56 bytes): magic, version, flags, nr_modules,
    // modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr, memmap_entries, reserved.
    let mut info = Vec::with_capacity(56);
    info.extend_from_slice(&XEN_HVM_START_MAGIC.to_le_bytes());
    info.extend_from_slice(&1u32.to_le_bytes());
    info.extend_from_slice(&0u32.to_le_bytes());
    info.extend_from_slice(&0u32.to_le_bytes());
    info.extend_from_slice(&0u64.to_le_bytes());
    info.extend_from_slice(&CMDLINE_ADDR.to_le_bytes());
    info.extend_from_slice(&rsdp.to_le_bytes());
    info.extend_from_slice(&PVH_MEMMAP_ADDR.to_le_bytes());
    info.extend_from_slice(&(map.len() as u32).to_le_bytes());
    info.extend_from_slice(&0u32.to_le_bytes());
    w(&info, PVH_INFO_ADDR)?;
    let mut table = Vec::new();
    for e in &map {
        table.extend_from_slice(&e.addr.to_le_bytes());
        table.extend_from_slice(&e.size.to_le_bytes());
        table.extend_from_slice(&e.kind.to_le_bytes());
        table.extend_from_slice(&0u32.to_le_bytes());
    }
    w(&table, PVH_MEMMAP_ADDR)
}
