//! Dirty-page tracking for live migration: KVM's dirty log (pages vCPUs
//! wrote) merged with the VMM's own bitmap (pages devices wrote through
//! vm-memory), behind one call that returns and clears the dirty set.

use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::memory::{GuestMemory, PAGE_SIZE};

/// Errors of dirty tracking.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// KVM_GET_DIRTY_LOG failed (is dirty logging on for the slot?).
    #[error("Failed to get the KVM dirty log of slot {0}")]
    GetDirtyLog(u32, #[source] kvm_ioctls::Error),
    /// Dirty logging is off.
    #[error("Dirty logging is off; turn it on first (dirty-log-start)")]
    NotEnabled,
}

/// Clears the VMM's own dirty bitmap (device writes).
pub fn clear_vmm_bitmap(mem: &GuestMemory) {
    for region in mem.iter() {
        let bits: &vm_memory::bitmap::AtomicBitmap = std::ops::Deref::deref(region).bitmap();
        bits.reset_addr_range(0, region.len() as usize);
    }
}

/// Dirty pages of one RAM region: bit `i` of `bitmap` (word `i / 64`, bit
/// `i % 64`) stands for the page at `gpa + i * 4096`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DirtyBitmap {
    /// Guest-physical start of the region.
    pub gpa: u64,
    /// Region length in bytes.
    pub size: u64,
    /// One bit per 4 KiB page.
    pub bitmap: Vec<u64>,
}

impl DirtyBitmap {
    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.bitmap.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Guest-physical addresses of the dirty pages.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.bitmap.iter().enumerate().flat_map(move |(w, word)| {
            (0..64)
                .filter(move |b| word & (1 << b) != 0)
                .map(move |b| self.gpa + (w as u64 * 64 + b) * PAGE_SIZE)
        })
    }
}

/// Returns the pages written since the last call (by vCPUs or by devices)
/// and clears both logs. Slot `i` is region `i` (see
/// [`super::memory::register_slots`]); dirty logging must be on.
pub fn take_dirty(vm: &VmFd, mem: &GuestMemory) -> Result<Vec<DirtyBitmap>, DirtyError> {
    let mut out = Vec::new();
    for (slot, region) in mem.iter().enumerate() {
        let mut bitmap = vm
            .get_dirty_log(slot as u32, region.len() as usize)
            .map_err(|e| DirtyError::GetDirtyLog(slot as u32, e))?;
        let vmm_bits: &vm_memory::bitmap::AtomicBitmap = std::ops::Deref::deref(region).bitmap();
        let pages = region.len() / PAGE_SIZE;
        for page in 0..pages as usize {
            // Test-then-reset per bit: a device write racing with this is
            // either seen now or left set for the next round.
            if vmm_bits.is_bit_set(page) {
                vmm_bits.reset_bit(page);
                bitmap[page / 64] |= 1 << (page % 64);
            }
        }
        out.push(DirtyBitmap {
            gpa: region.start_addr().0,
            size: region.len(),
            bitmap,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_and_count() {
        let d = DirtyBitmap {
            gpa: 0x10_0000,
            size: 128 * 4096,
            bitmap: vec![0b101, 1 << 63],
        };
        assert_eq!(d.count(), 3);
        let p: Vec<u64> = d.pages().collect();
        assert_eq!(p, vec![0x10_0000, 0x10_2000, 0x10_0000 + 127 * 4096]);
    }
}
