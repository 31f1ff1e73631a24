//! The guest as the migration engine sees it: two small traits, [`SourceVm`]
//! (read memory and the dirty set, pause, save the state, read the disks)
//! and [`TargetVm`] (expose memory to fill, write the disks, restore the
//! state, run), and the plain types they trade in ([`GuestRegion`],
//! [`DirtyPages`]). The VMM implements both (`vmm::migrate`); the engine's
//! unit tests implement them over plain memory buffers, so the whole engine
//! runs without KVM.

use std::error::Error;

use crate::storage::ChangedBlocks;

fn no_disks() -> GuestError {
    "this VM has no disks the migration engine can copy".into()
}

/// An error from the guest's side, boxed: the engine only reports it.
pub type GuestError = Box<dyn Error + Send + Sync>;

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

    /// The same runs as (guest-physical address, page count), as the
    /// protocol's page runs carry them.
    pub fn gpa_runs(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.runs()
            .map(|(first, n)| (self.gpa + first * 4096, n as u32))
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
    fn set_dirty_log(&self, on: bool) -> Result<(), GuestError>;
    /// Pages written since the last call, by vCPUs or devices; clears them.
    /// One entry per region, in [`SourceVm::regions`] order.
    fn take_dirty(&self) -> Result<Vec<DirtyPages>, GuestError>;
    /// How many pages the guest wrote since the dirty set was last taken,
    /// without taking it: nothing is write-protected again, so the guest
    /// pays nothing for the look. `None`, the default: the VM cannot look
    /// without taking.
    fn dirty_count(&self) -> Result<Option<u64>, GuestError> {
        Ok(None)
    }
    /// Which of `count` pages of `region`, from page index `first`, may
    /// hold data: bit `i` of word `i / 64` for page `first + i`, no bit past
    /// `count`. A clear bit is a page known to be zero without reading it
    /// (never written, or given back to the host). `None`, the default: the
    /// VM cannot tell, and the engine reads every page.
    fn populated(&self, region: &GuestRegion, first: u64, count: u64) -> Option<Vec<u64>> {
        let _ = (region, first, count);
        None
    }
    /// Stops the vCPUs (returns once none runs).
    fn pause(&self);
    /// Lets the vCPUs run again.
    fn resume(&self);
    /// The paused VM's vCPU, VM and device state.
    fn save_state(&self) -> Result<Vec<u8>, GuestError>;

    // Live storage migration (see [`super::storage`]); VMs without disks
    // keep the defaults.

    /// Disk `disk`'s virtual size and, for a qcow2 overlay on a cached
    /// template base, the base's sha256 (hex).
    fn disk_describe(&self, disk: usize) -> Result<(u64, Option<String>), GuestError> {
        let _ = disk;
        Err(no_disks())
    }
    /// Turns changed-block tracking of disk `disk` on (clearing it) or off.
    fn disk_track(&self, disk: usize, on: bool) -> Result<(), GuestError> {
        let _ = (disk, on);
        Err(no_disks())
    }
    /// The byte ranges of disk `disk` that must be copied: those allocated
    /// in its own image only (`own_only`, the target holds the base), or in
    /// any image of its backing chain.
    fn disk_extents(&self, disk: usize, own_only: bool) -> Result<Vec<(u64, u64)>, GuestError> {
        let _ = (disk, own_only);
        Err(no_disks())
    }
    /// Reads `buf.len()` bytes of disk `disk` at `offset`, as the guest sees them.
    fn disk_read(&self, disk: usize, buf: &mut [u8], offset: u64) -> Result<(), GuestError> {
        let _ = (disk, buf, offset);
        Err(no_disks())
    }
    /// The blocks of disk `disk` written since the last call; clears them.
    fn disk_take_dirty(&self, disk: usize) -> Result<ChangedBlocks, GuestError> {
        let _ = disk;
        Err(no_disks())
    }
    /// Flushes every disk and releases its image locks (after the decision
    /// to commit, before Commit is sent; see [`crate::storage::lock`]).
    fn release_disks(&self) -> Result<(), GuestError> {
        Ok(())
    }
    /// Takes the image locks again (the commit did not happen after all).
    fn relock_disks(&self) {}
}

/// The target side of a migration, built from the source's configuration.
pub trait TargetVm: Sync {
    /// Guest RAM regions (must match the source's layout).
    fn regions(&self) -> Vec<GuestRegion>;
    /// Puts the source's vCPU, VM and device state in place (vCPUs not running).
    fn restore_state(&self, state: &[u8]) -> Result<(), GuestError>;
    /// Starts the vCPUs.
    fn resume(&self) -> Result<(), GuestError>;
    /// Tells the network the VM is here now (gratuitous ARP / RARP per NIC).
    fn announce(&self);

    /// Disk `disk`'s virtual size and, for a qcow2 overlay on a cached
    /// template base, the base's sha256 (hex).
    fn disk_describe(&self, disk: usize) -> Result<(u64, Option<String>), GuestError> {
        let _ = disk;
        Err(no_disks())
    }
    /// Writes `data` at `offset` of disk `disk`.
    fn disk_write(&self, disk: usize, data: &[u8], offset: u64) -> Result<(), GuestError> {
        let _ = (disk, data, offset);
        Err(no_disks())
    }
    /// Makes the disk writes durable.
    fn disk_flush(&self, disk: usize) -> Result<(), GuestError> {
        let _ = disk;
        Err(no_disks())
    }
    /// Reopens the disks and takes their image locks, after Commit and
    /// before the guest runs; the guest must not run if this fails.
    fn activate_disks(&self) -> Result<(), GuestError> {
        Ok(())
    }
    /// Post-copy, before the guest runs here: reopens the disks and takes
    /// the image locks that are free (the source keeps its own until it
    /// has sent everything).
    fn activate_disks_unlocked(&self) -> Result<(), GuestError> {
        Ok(())
    }
    /// Takes the image locks (post-copy, once the source let them go).
    fn lock_disks(&self) -> Result<(), GuestError> {
        Ok(())
    }
}

impl<T: SourceVm + Send> SourceVm for std::sync::Arc<T> {
    fn regions(&self) -> Vec<GuestRegion> {
        (**self).regions()
    }
    fn config(&self) -> serde_json::Value {
        (**self).config()
    }
    fn set_dirty_log(&self, on: bool) -> Result<(), GuestError> {
        (**self).set_dirty_log(on)
    }
    fn take_dirty(&self) -> Result<Vec<DirtyPages>, GuestError> {
        (**self).take_dirty()
    }
    fn dirty_count(&self) -> Result<Option<u64>, GuestError> {
        (**self).dirty_count()
    }
    fn populated(&self, region: &GuestRegion, first: u64, count: u64) -> Option<Vec<u64>> {
        (**self).populated(region, first, count)
    }
    fn pause(&self) {
        (**self).pause()
    }
    fn resume(&self) {
        (**self).resume()
    }
    fn save_state(&self) -> Result<Vec<u8>, GuestError> {
        (**self).save_state()
    }
    fn disk_describe(&self, disk: usize) -> Result<(u64, Option<String>), GuestError> {
        (**self).disk_describe(disk)
    }
    fn disk_track(&self, disk: usize, on: bool) -> Result<(), GuestError> {
        (**self).disk_track(disk, on)
    }
    fn disk_extents(&self, disk: usize, own_only: bool) -> Result<Vec<(u64, u64)>, GuestError> {
        (**self).disk_extents(disk, own_only)
    }
    fn disk_read(&self, disk: usize, buf: &mut [u8], offset: u64) -> Result<(), GuestError> {
        (**self).disk_read(disk, buf, offset)
    }
    fn disk_take_dirty(&self, disk: usize) -> Result<ChangedBlocks, GuestError> {
        (**self).disk_take_dirty(disk)
    }
    fn release_disks(&self) -> Result<(), GuestError> {
        (**self).release_disks()
    }
    fn relock_disks(&self) {
        (**self).relock_disks()
    }
}

impl<T: TargetVm + Send> TargetVm for std::sync::Arc<T> {
    fn regions(&self) -> Vec<GuestRegion> {
        (**self).regions()
    }
    fn restore_state(&self, state: &[u8]) -> Result<(), GuestError> {
        (**self).restore_state(state)
    }
    fn resume(&self) -> Result<(), GuestError> {
        (**self).resume()
    }
    fn announce(&self) {
        (**self).announce()
    }
    fn disk_describe(&self, disk: usize) -> Result<(u64, Option<String>), GuestError> {
        (**self).disk_describe(disk)
    }
    fn disk_write(&self, disk: usize, data: &[u8], offset: u64) -> Result<(), GuestError> {
        (**self).disk_write(disk, data, offset)
    }
    fn disk_flush(&self, disk: usize) -> Result<(), GuestError> {
        (**self).disk_flush(disk)
    }
    fn activate_disks(&self) -> Result<(), GuestError> {
        (**self).activate_disks()
    }
    fn activate_disks_unlocked(&self) -> Result<(), GuestError> {
        (**self).activate_disks_unlocked()
    }
    fn lock_disks(&self) -> Result<(), GuestError> {
        (**self).lock_disks()
    }
}
