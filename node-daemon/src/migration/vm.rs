//! What the migration engine needs from a VM, as two small traits: the source
//! reads memory and the dirty set and can pause; the target exposes memory to
//! fill and restores state. The VMM implements both; unit tests use plain
//! memory buffers.

use std::error::Error;

/// An error from the VM side, boxed: the engine only reports it.
pub type VmError = Box<dyn Error + Send + Sync>;

/// One guest RAM region as the host sees it.
#[derive(Clone, Copy, Debug)]
pub struct GuestRegion {
    /// Guest-physical start.
    pub gpa: u64,
    /// Length in bytes (a whole number of pages).
    pub size: u64,
    /// Host address of the region's first byte; valid while the VM lives.
    pub host: *mut u8,
}

// SAFETY: a GuestRegion is an address range of a mapping owned by the VM,
// which outlives every migration thread (they run in a scope that ends before
// the VM can be dropped); the engine only copies bytes in and out of it.
unsafe impl Send for GuestRegion {}
// SAFETY: as above; concurrent readers and writers of guest memory only move
// bytes, and a torn page is re-sent because the dirty log caught the write.
unsafe impl Sync for GuestRegion {}

impl GuestRegion {
    /// Whether `gpa..gpa + len` lies inside the region.
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        gpa >= self.gpa
            && gpa
                .checked_add(len)
                .is_some_and(|end| end <= self.gpa + self.size)
    }

    /// Host pointer of guest-physical `gpa` (which must be inside the region).
    pub fn host_ptr(&self, gpa: u64) -> *mut u8 {
        debug_assert!(self.contains(gpa, 0));
        // SAFETY: the offset is inside the region's mapping (checked above in
        // debug builds and by every caller's `contains`).
        unsafe { self.host.add((gpa - self.gpa) as usize) }
    }
}

/// Dirty pages of one region: bit `i` of word `i / 64` is the page at
/// `gpa + i * 4096`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyPages {
    /// Guest-physical start of the region.
    pub gpa: u64,
    /// One bit per page.
    pub bitmap: Vec<u64>,
}

impl DirtyPages {
    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.bitmap.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Adds the pages of `other` (same region).
    pub fn merge(&mut self, other: &DirtyPages) {
        debug_assert_eq!(self.gpa, other.gpa);
        for (a, b) in self.bitmap.iter_mut().zip(&other.bitmap) {
            *a |= b;
        }
    }

    /// Runs of consecutive dirty pages as (first page index, page count).
    pub fn runs(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let total = self.bitmap.len() as u64 * 64;
        let mut page = 0u64;
        std::iter::from_fn(move || {
            while page < total {
                let word = self.bitmap[(page / 64) as usize] >> (page % 64);
                if word == 0 {
                    page = (page / 64 + 1) * 64;
                    continue;
                }
                page += u64::from(word.trailing_zeros());
                let start = page;
                while page < total && self.bitmap[(page / 64) as usize] & (1 << (page % 64)) != 0 {
                    page += 1;
                }
                return Some((start, page - start));
            }
            None
        })
    }
}

/// The source side of a migration.
pub trait SourceVm: Sync {
    /// Guest RAM regions.
    fn regions(&self) -> Vec<GuestRegion>;
    /// The VM's configuration, from which the target builds the same VM.
    fn config(&self) -> serde_json::Value;
    /// Turns dirty logging on (clearing the dirty set) or off.
    fn set_dirty_log(&self, on: bool) -> Result<(), VmError>;
    /// Pages written since the last call, by vCPUs or devices; clears them.
    /// One entry per region, in [`SourceVm::regions`] order.
    fn take_dirty(&self) -> Result<Vec<DirtyPages>, VmError>;
    /// Stops the vCPUs (returns once none runs).
    fn pause(&self);
    /// Lets the vCPUs run again.
    fn resume(&self);
    /// The paused VM's vCPU, VM and device state.
    fn save_state(&self) -> Result<Vec<u8>, VmError>;
}

/// The target side of a migration, built from the source's configuration.
pub trait TargetVm: Sync {
    /// Guest RAM regions (must match the source's layout).
    fn regions(&self) -> Vec<GuestRegion>;
    /// Puts the source's vCPU, VM and device state in place (vCPUs not running).
    fn restore_state(&self, state: &[u8]) -> Result<(), VmError>;
    /// Starts the vCPUs.
    fn resume(&self) -> Result<(), VmError>;
    /// Tells the network the VM is here now (gratuitous ARP / RARP per NIC).
    fn announce(&self);
}

impl<T: SourceVm + Send> SourceVm for std::sync::Arc<T> {
    fn regions(&self) -> Vec<GuestRegion> {
        (**self).regions()
    }
    fn config(&self) -> serde_json::Value {
        (**self).config()
    }
    fn set_dirty_log(&self, on: bool) -> Result<(), VmError> {
        (**self).set_dirty_log(on)
    }
    fn take_dirty(&self) -> Result<Vec<DirtyPages>, VmError> {
        (**self).take_dirty()
    }
    fn pause(&self) {
        (**self).pause()
    }
    fn resume(&self) {
        (**self).resume()
    }
    fn save_state(&self) -> Result<Vec<u8>, VmError> {
        (**self).save_state()
    }
}

impl<T: TargetVm + Send> TargetVm for std::sync::Arc<T> {
    fn regions(&self) -> Vec<GuestRegion> {
        (**self).regions()
    }
    fn restore_state(&self, state: &[u8]) -> Result<(), VmError> {
        (**self).restore_state(state)
    }
    fn resume(&self) -> Result<(), VmError> {
        (**self).resume()
    }
    fn announce(&self) {
        (**self).announce()
    }
}
