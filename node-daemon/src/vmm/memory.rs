//! Guest RAM: the layout of guest-physical memory, the anonymous private
//! mappings that back it (owned by this process), their KVM memory slots, and
//! saving/loading memory to a snapshot file.
//!
//! RAM is split around the 32-bit MMIO hole (`MMIO_HOLE_START..4 GiB`), where
//! the virtio-mmio devices, the IOAPIC and the LAPIC live.
//!
//! Guest RAM being anonymous private memory, a page the page table does not
//! hold reads as zero: a migration's first round skips those unread
//! (`migration::pagemap`).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Guest memory with a dirty bitmap that records every write the VMM itself
/// makes through vm-memory (device DMA: used rings, block reads, net receive).
pub type GuestMemory = GuestMemoryMmap<AtomicBitmap>;

/// Guest page size used for dirty tracking and snapshots.
pub const PAGE_SIZE: u64 = 4096;
/// Start of the 32-bit MMIO hole (no RAM from here to 4 GiB).
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
/// End of the 32-bit MMIO hole.
pub const MMIO_HOLE_END: u64 = 1 << 32;

/// Errors of guest memory setup and snapshotting.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The host does not have the memory the guest asks for.
    #[error("Guest memory of {requested_mib} MiB is more than this host can give ({available_mib} MiB available); lower --memory-mib")]
    TooLarge {
        /// What was asked for.
        requested_mib: u64,
        /// What /proc/meminfo reports as available.
        available_mib: u64,
    },
    /// Guest memory size zero.
    #[error("Guest memory must be at least 1 MiB; raise --memory-mib")]
    TooSmall,
    /// mmap of guest memory failed.
    #[error("Failed to allocate guest memory")]
    Allocate(#[source] vm_memory::mmap::FromRangesError),
    /// KVM_SET_USER_MEMORY_REGION failed.
    #[error("Failed to register guest memory slot {0} with KVM")]
    SetUserMemoryRegion(u32, #[source] kvm_ioctls::Error),
    /// Writing the memory snapshot file failed.
    #[error("Failed to write guest memory file")]
    WriteFile(#[source] std::io::Error),
    /// Reading the memory snapshot file failed.
    #[error("Failed to read guest memory file")]
    ReadFile(#[source] std::io::Error),
    /// The snapshot's memory layout does not fit this memory.
    #[error("Snapshot memory layout does not match the VM's memory")]
    LayoutMismatch,
}

/// The guest-physical RAM ranges for a guest of `size` bytes.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    if size <= MMIO_HOLE_START {
        vec![(GuestAddress(0), size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_HOLE_START as usize),
            (
                GuestAddress(MMIO_HOLE_END),
                (size - MMIO_HOLE_START) as usize,
            ),
        ]
    }
}

/// MemAvailable from /proc/meminfo in MiB (None when unreadable).
fn host_available_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// Allocates guest RAM of `mib` MiB as anonymous private mappings owned by
/// this process, after checking that the host can give that much.
pub fn create(mib: u64) -> Result<GuestMemory, MemoryError> {
    if mib == 0 {
        return Err(MemoryError::TooSmall);
    }
    if let Some(available_mib) = host_available_mib() {
        if mib > available_mib {
            return Err(MemoryError::TooLarge {
                requested_mib: mib,
                available_mib,
            });
        }
    }
    let mem = GuestMemory::from_ranges(&ram_ranges(mib << 20)).map_err(MemoryError::Allocate)?;
    advise_huge_pages(&mem);
    Ok(mem)
}

/// Asks for transparent huge pages behind guest RAM (as QEMU does), so KVM
/// can map it 2 MiB at a time: a guest that has just arrived by migration
/// maps its working set in by the huge page rather than by the 4 KiB page
/// (a fault into KVM each). A guest that touches one byte of a huge page
/// holds all of it, never more than its memory size. Hosts whose THP
/// setting is `never` ignore the advice, and so does this VMM when the call
/// fails: the guest runs as before. Post-copy stays exact on huge pages
/// (`migration::postcopy::target`).
fn advise_huge_pages(mem: &GuestMemory) {
    for region in mem.iter() {
        let host = mem
            .get_host_address(region.start_addr())
            .expect("region start is inside guest memory");
        // SAFETY: the range is this region's own mapping; the advice changes
        // how its pages are backed, never their contents.
        let r = unsafe { libc::madvise(host.cast(), region.len() as usize, libc::MADV_HUGEPAGE) };
        if r != 0 {
            tracing::debug!(
                "no huge pages for guest RAM: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Registers every region of `mem` as a KVM memory slot (slot = region
/// index), with dirty logging when `log_dirty` is set. Calling it again with
/// another `log_dirty` switches logging on or off.
pub fn register_slots(vm: &VmFd, mem: &GuestMemory, log_dirty: bool) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .expect("region start is inside guest memory");
        let region_desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: if log_dirty {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the mapping belongs to `mem`, which outlives the VM (the
        // VMM keeps both until the process exits), and does not overlap
        // another slot.
        unsafe { vm.set_user_memory_region(region_desc) }
            .map_err(|e| MemoryError::SetUserMemoryRegion(slot as u32, e))?;
    }
    Ok(())
}

/// One RAM region as stored in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemoryRegionState {
    /// Guest-physical start.
    pub gpa: u64,
    /// Length in bytes.
    pub size: u64,
    /// Offset of the region's bytes in the memory file.
    pub file_offset: u64,
}

/// The memory layout of a snapshot; the bytes are in a separate file.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemoryState {
    /// Regions in guest-physical order.
    pub regions: Vec<MemoryRegionState>,
}

/// The layout of `mem` as snapshot state.
pub fn layout(mem: &GuestMemory) -> MemoryState {
    let mut off = 0;
    let regions = mem
        .iter()
        .map(|r| {
            let s = MemoryRegionState {
                gpa: r.start_addr().0,
                size: r.len(),
                file_offset: off,
            };
            off += r.len();
            s
        })
        .collect();
    MemoryState { regions }
}

/// Host address of a whole region.
fn region_ptr(mem: &GuestMemory, gpa: u64) -> *mut u8 {
    mem.get_host_address(GuestAddress(gpa))
        .expect("region is inside guest memory")
}

/// Writes all guest memory to `path`, leaving all-zero pages as holes so
/// the file stays sparse. The VM must be paused.
pub fn save_to_file(mem: &GuestMemory, path: &Path) -> Result<MemoryState, MemoryError> {
    let state = layout(mem);
    let mut f = File::create(path).map_err(MemoryError::WriteFile)?;
    let total: u64 = state.regions.iter().map(|r| r.size).sum();
    f.set_len(total).map_err(MemoryError::WriteFile)?;
    for r in &state.regions {
        // SAFETY: the region's mapping is `r.size` bytes long and lives as
        // long as `mem`; the VM is paused, so nothing writes it meanwhile.
        let bytes = unsafe { std::slice::from_raw_parts(region_ptr(mem, r.gpa), r.size as usize) };
        for (i, page) in bytes.chunks(PAGE_SIZE as usize).enumerate() {
            if page.iter().all(|b| *b == 0) {
                continue;
            }
            f.seek(SeekFrom::Start(r.file_offset + i as u64 * PAGE_SIZE))
                .map_err(MemoryError::WriteFile)?;
            f.write_all(page).map_err(MemoryError::WriteFile)?;
        }
    }
    f.sync_all().map_err(MemoryError::WriteFile)?;
    Ok(state)
}

/// Loads guest memory written by [`save_to_file`], skipping holes.
pub fn load_from_file(
    mem: &GuestMemory,
    state: &MemoryState,
    path: &Path,
) -> Result<(), MemoryError> {
    let actual = layout(mem);
    if actual.regions.len() != state.regions.len()
        || actual
            .regions
            .iter()
            .zip(&state.regions)
            .any(|(a, b)| a.gpa != b.gpa || a.size != b.size)
    {
        return Err(MemoryError::LayoutMismatch);
    }
    let mut f = File::open(path).map_err(MemoryError::ReadFile)?;
    for r in &state.regions {
        // SAFETY: the region's mapping is `r.size` bytes long and lives as
        // long as `mem`; the vCPUs have not run yet, so no one else touches it.
        let bytes =
            unsafe { std::slice::from_raw_parts_mut(region_ptr(mem, r.gpa), r.size as usize) };
        let mut pos = 0u64;
        while pos < r.size {
            let data = seek_data(&f, r.file_offset + pos).map_err(MemoryError::ReadFile)?;
            let Some(data) = data else { break };
            if data >= r.file_offset + r.size {
                break;
            }
            pos = data - r.file_offset;
            let hole = seek_hole(&f, data).map_err(MemoryError::ReadFile)?;
            let end = (hole - r.file_offset).min(r.size);
            f.seek(SeekFrom::Start(data))
                .map_err(MemoryError::ReadFile)?;
            f.read_exact(&mut bytes[pos as usize..end as usize])
                .map_err(MemoryError::ReadFile)?;
            pos = end;
        }
    }
    Ok(())
}

fn seek_data(f: &File, off: u64) -> std::io::Result<Option<u64>> {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek on an open fd has no memory effects.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off as i64, libc::SEEK_DATA) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

fn seek_hole(f: &File, off: u64) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek on an open fd has no memory effects.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off as i64, libc::SEEK_HOLE) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn ranges_split_around_hole() {
        assert_eq!(ram_ranges(1 << 30), vec![(GuestAddress(0), 1 << 30)]);
        let r = ram_ranges(4 << 30);
        assert_eq!(r[1], (GuestAddress(MMIO_HOLE_END), (1 << 30) as usize));
    }

    #[test]
    fn save_and_load_roundtrip() {
        let mem = create(4).unwrap();
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x12345))
            .unwrap();
        let dir = std::env::temp_dir().join(format!("godwit-memtest-{}", std::process::id()));
        let st = save_to_file(&mem, &dir).unwrap();
        let mem2 = create(4).unwrap();
        load_from_file(&mem2, &st, &dir).unwrap();
        std::fs::remove_file(&dir).unwrap();
        assert_eq!(
            mem2.read_obj::<u32>(GuestAddress(0x12345)).unwrap(),
            0xdead_beef
        );
    }
}
