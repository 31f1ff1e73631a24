//! Linux bzImage direct boot (x86 boot protocol): load the protected-mode
//! kernel at 1 MiB, an optional initrd at the top of low RAM, and fill the
//! zero page (`boot_params`) with the setup header, command line and e820
//! map. The vCPU enters the 64-bit entry (`load address + 0x200`) in long
//! mode with identity-mapped page tables and RSI pointing at the zero page.

use std::path::Path;

use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::{BzImage, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::{e820_map, open_kernel, BootError, CMDLINE_ADDR, HIMEM_START, ZERO_PAGE_ADDR};
use crate::vmm::memory::{GuestMemory, MMIO_HOLE_START, PAGE_SIZE};

/// Loads the bzImage and initrd and writes the zero page (with the ACPI
/// RSDP address `rsdp`, 0 without ACPI); returns the load address (the
/// 32-bit entry; the 64-bit entry is 0x200 above it).
pub fn load(
    mem: &GuestMemory,
    path: &Path,
    initrd: Option<&Path>,
    cmdline_len: usize,
    rsdp: u64,
) -> Result<u64, BootError> {
    let name = path.display().to_string();
    let mut f = open_kernel(path)?;
    let res =
        BzImage::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))).map_err(|e| match e {
            linux_loader::loader::Error::Bzimage(_) => BootError::NotAKernel(name.clone()),
            e => BootError::LoadKernel(e),
        })?;
    let mut params = boot_params::default();
    if let Some(hdr) = res.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    params.hdr.kernel_alignment = 0x0100_0000;
    params.acpi_rsdp_addr = rsdp;
    if let Some(initrd) = initrd {
        let iname = initrd.display().to_string();
        let data = std::fs::read(initrd).map_err(|e| BootError::ReadInitrd(iname, e))?;
        let low_top = mem.last_addr().0.min(MMIO_HOLE_START - 1) + 1;
        let size = data.len() as u64;
        let kernel_end = res.kernel_end.max(HIMEM_START);
        if size + kernel_end > low_top {
            return Err(BootError::InitrdTooLarge);
        }
        let addr = (low_top - size) & !(PAGE_SIZE - 1);
        mem.write_slice(&data, GuestAddress(addr))
            .map_err(BootError::WriteGuestMemory)?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let map = e820_map(mem);
    for (i, e) in map.iter().enumerate() {
        params.e820_table[i].addr = e.addr;
        params.e820_table[i].size = e.size;
        params.e820_table[i].r#type = e.kind;
    }
    params.e820_entries = map.len() as u8;
    // SAFETY: boot_params is a plain repr(C) struct of integers and arrays;
    // viewing it as bytes for the length of the struct is sound.
    let bytes = unsafe {
        std::slice::from_raw_parts(
            &params as *const boot_params as *const u8,
            std::mem::size_of::<boot_params>(),
        )
    };
    mem.write_slice(bytes, GuestAddress(ZERO_PAGE_ADDR))
        .map_err(BootError::WriteGuestMemory)?;
    Ok(res.kernel_load.0)
}
