//! Dirty-page tracking for live migration: KVM's dirty log (pages vCPUs
//! wrote) merged with the VMM's own bitmap (pages devices wrote through
//! vm-memory), behind one call that returns and clears the dirty set.
//!
//! Where KVM offers it (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`, Linux 5.8),
//! reading the log and re-arming it are two steps: `KVM_GET_DIRTY_LOG` only
//! reads, and `KVM_CLEAR_DIRTY_LOG` write-protects the pages it was given
//! again, a slice of the slot at a time. Without it, one `KVM_GET_DIRTY_LOG`
//! write-protects every dirty page of the slot under KVM's MMU lock, and a
//! vCPU that faults meanwhile waits for the lot.

use std::os::fd::AsRawFd;

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_enable_cap, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
};
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::memory::{GuestMemory, PAGE_SIZE};

/// Errors of dirty tracking.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// KVM_GET_DIRTY_LOG failed (is dirty logging on for the slot?).
    #[error("Failed to get the KVM dirty log of slot {0}")]
    GetDirtyLog(u32, #[source] kvm_ioctls::Error),
    /// KVM_CLEAR_DIRTY_LOG failed.
    #[error("Failed to clear the KVM dirty log of slot {0}")]
    ClearDirtyLog(u32, #[source] std::io::Error),
    /// Dirty logging is off.
    #[error("Dirty logging is off; turn it on first (dirty-log-start)")]
    NotEnabled,
}

/// `KVM_CLEAR_DIRTY_LOG`: `_IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)`.
const KVM_CLEAR_DIRTY_LOG: libc::c_ulong = 0xC018_AEC0;

/// Pages re-armed by one `KVM_CLEAR_DIRTY_LOG` (64 MiB of guest RAM): KVM
/// holds its MMU lock for one call, so a vCPU that faults waits at most for
/// this many.
const CLEAR_SLICE_PAGES: usize = 16384;

/// Turns on KVM's manual dirty-log protection for `vm` (before logging is
/// on); false when this KVM does not offer it, and the log is then read and
/// re-armed in one step as before.
pub fn enable_manual_protect(vm: &VmFd) -> bool {
    let offered = vm.check_extension_raw(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.into());
    if offered & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE as i32 == 0 {
        return false;
    }
    let cap = kvm_enable_cap {
        cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        args: [KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE.into(), 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&cap).is_ok()
}

/// Write-protects again the pages of slot `slot` set in `bitmap` (the slot's
/// whole log, as `KVM_GET_DIRTY_LOG` returned it) and clears them in KVM's
/// log, a [`CLEAR_SLICE_PAGES`] slice per call; slices with no page set are
/// skipped.
fn clear_dirty_log(vm: &VmFd, slot: u32, bitmap: &mut [u64]) -> Result<(), DirtyError> {
    let words = CLEAR_SLICE_PAGES / 64;
    for (i, slice) in bitmap.chunks_mut(words).enumerate() {
        if slice.iter().all(|w| *w == 0) {
            continue;
        }
        let mut arg = kvm_clear_dirty_log {
            slot,
            // A whole number of 64-page words: KVM's rule, except at the
            // end of the slot (every region is a whole number of MiB).
            num_pages: (slice.len() * 64) as u32,
            first_page: (i * CLEAR_SLICE_PAGES) as u64,
            ..Default::default()
        };
        arg.__bindgen_anon_1.dirty_bitmap = slice.as_mut_ptr().cast();
        // SAFETY: `arg` describes a range inside the slot and points at
        // `slice`, which KVM only reads during the call.
        let r = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_CLEAR_DIRTY_LOG, &arg) };
        if r < 0 {
            return Err(DirtyError::ClearDirtyLog(
                slot,
                std::io::Error::last_os_error(),
            ));
        }
    }
    Ok(())
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

/// With manual protection on: how many pages KVM's log holds (written by
/// vCPUs since they were last cleared), read without clearing or
/// write-protecting anything, so that the guest pays nothing for the look.
pub fn peek_count(vm: &VmFd, mem: &GuestMemory) -> Result<u64, DirtyError> {
    let mut n = 0;
    for (slot, region) in mem.iter().enumerate() {
        let bitmap = vm
            .get_dirty_log(slot as u32, region.len() as usize)
            .map_err(|e| DirtyError::GetDirtyLog(slot as u32, e))?;
        n += bitmap
            .iter()
            .map(|w| u64::from(w.count_ones()))
            .sum::<u64>();
    }
    Ok(n)
}

/// Returns the pages written since the last call (by vCPUs or by devices)
/// and clears both logs. Slot `i` is region `i` (see
/// [`super::memory::register_slots`]); dirty logging must be on, and
/// `manual` says whether [`enable_manual_protect`] turned KVM's manual mode
/// on. Either way, a page the guest writes after this re-arms is in the next
/// call's set, and what the caller reads of a page returned here is at least
/// as new as the write that put it in the set.
pub fn take_dirty(
    vm: &VmFd,
    mem: &GuestMemory,
    manual: bool,
) -> Result<Vec<DirtyBitmap>, DirtyError> {
    let mut out = Vec::new();
    for (slot, region) in mem.iter().enumerate() {
        let mut bitmap = vm
            .get_dirty_log(slot as u32, region.len() as usize)
            .map_err(|e| DirtyError::GetDirtyLog(slot as u32, e))?;
        if manual {
            clear_dirty_log(vm, slot as u32, &mut bitmap)?;
        }
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
