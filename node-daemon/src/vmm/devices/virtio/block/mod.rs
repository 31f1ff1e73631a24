//! virtio-blk over a disk image (raw or qcow2, see [`crate::storage`]):
//! read, write, flush (fsync, honoured) and get-id, read-only when asked.
//! Requests are served synchronously on the notifying vCPU thread.
//!
//! The device owns the image's locks (exclusive when read-write, shared
//! when read-only and on backing images) and, when turned on, a
//! changed-block bitmap ([`crate::storage::cbt`]) marked after every
//! completed write.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestMemoryBackend};

use super::{VirtioError, VIRTIO_F_VERSION_1};
use crate::storage::{ChangedBlocks, DirtyBlocks, DiskImage, ImageFormat, StorageError};
use crate::vmm::memory::GuestMemory;

const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
const SECTOR: u64 = 512;

/// Saved block device config (snapshot version 1).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BlockState {
    /// Image path.
    pub path: PathBuf,
    /// Read-only.
    pub read_only: bool,
    /// Capacity in 512-byte sectors when saved.
    pub capacity: u64,
    /// Image format (absent in snapshots from before qcow2 support: raw).
    #[serde(default)]
    pub format: Option<ImageFormat>,
}

/// A virtio-blk device.
pub struct Block {
    disk: DiskImage,
    path: PathBuf,
    read_only: bool,
    capacity: u64,
    id: String,
    dirty: Option<DirtyBlocks>,
    /// Opened without locks and not activated yet (a migration target).
    pending_activation: bool,
}

impl Block {
    /// Opens the image at `path` as `format` (detected when `None`; a
    /// corrupt qcow2 header is refused). With `lock` the image locks are
    /// taken now and a disk another VMM holds is refused
    /// ([`StorageError::Locked`]); without, they are taken later with
    /// [`Block::reopen_locked`] (a migration target).
    pub fn new(
        path: PathBuf,
        format: Option<ImageFormat>,
        read_only: bool,
        id: String,
        lock: bool,
    ) -> Result<Self, VirtioError> {
        let disk = DiskImage::open(&path, format, read_only, lock)?;
        Ok(Block {
            capacity: disk.size() / SECTOR,
            disk,
            path,
            read_only,
            id,
            dirty: None,
            pending_activation: !lock,
        })
    }

    /// A device opened without locks (a migration target) serves its first
    /// request only after this ran: the image is reopened, since the source
    /// may have changed qcow2 metadata since we opened it, and the locks
    /// are taken if they are free. Until the migration engine hands the
    /// locks over ([`crate::vmm::Vmm::release_disks`] on the source after
    /// Commit, [`crate::vmm::Vmm::activate_disks`] here before Activate,
    /// which makes this a no-op) a source that still holds them leaves
    /// this VM running unlocked, with a warning.
    ///
    /// It opens files, which a vCPU thread's seccomp filter forbids: the
    /// migration engine calls it before the guest runs (post-copy,
    /// [`crate::vmm::Vmm::activate_disks_unlocked`]), so a guest request
    /// never has to.
    pub fn activate_now(&mut self) {
        if self.pending_activation {
            self.activate_lazily();
        }
    }

    fn activate_lazily(&mut self) {
        self.pending_activation = false;
        if let Err(e) = self.disk.reopen() {
            tracing::warn!(path = %self.path.display(), "Cannot reopen the disk image on first use: {}", godwit_crds::error_chain(&e));
        }
        if let Err(e) = self.disk.lock() {
            tracing::warn!(path = %self.path.display(), "Running without the image lock ({}); the migration engine must hand it over", godwit_crds::error_chain(&e));
        }
    }

    /// The open image (for the migration engine: allocated extents, reads).
    pub fn disk(&self) -> &DiskImage {
        &self.disk
    }

    /// Starts changed-block tracking (clearing any earlier set).
    pub fn dirty_start(&mut self) {
        self.dirty = Some(DirtyBlocks::new(self.capacity * SECTOR));
    }

    /// Stops changed-block tracking.
    pub fn dirty_stop(&mut self) {
        self.dirty = None;
    }

    /// Whether changed-block tracking is on.
    pub fn dirty_enabled(&self) -> bool {
        self.dirty.is_some()
    }

    /// The blocks written since tracking started or since the last take,
    /// and clears them; `None` when tracking is off.
    pub fn take_dirty(&mut self) -> Option<ChangedBlocks> {
        self.dirty.as_mut().map(DirtyBlocks::take)
    }

    /// Takes the image locks (a no-op when held).
    pub fn lock(&mut self) -> Result<(), StorageError> {
        self.disk.lock()
    }

    /// Flushes and releases the image locks.
    pub fn unlock(&mut self) -> Result<(), StorageError> {
        self.disk.unlock()
    }

    /// Reopens the image and takes its locks (see [`crate::storage::lock`]).
    pub fn reopen_locked(&mut self) -> Result<(), StorageError> {
        self.disk.reopen_locked()?;
        self.pending_activation = false;
        self.capacity = self.disk.size() / SECTOR;
        Ok(())
    }

    pub(super) fn features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH;
        if self.read_only {
            f |= VIRTIO_BLK_F_RO;
        }
        f
    }

    pub(super) fn config(&self) -> Vec<u8> {
        self.capacity.to_le_bytes().to_vec()
    }

    /// Saves the device config.
    pub fn save(&self) -> BlockState {
        BlockState {
            path: self.path.clone(),
            read_only: self.read_only,
            capacity: self.capacity,
            format: Some(self.disk.format()),
        }
    }

    /// Serves every available request; true if any was completed.
    pub fn process(&mut self, q: &mut Queue, mem: &GuestMemory) -> bool {
        let mut used = false;
        if self.pending_activation {
            self.activate_lazily();
        }
        for _ in 0..super::chains_per_notify(q) {
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let descs: Vec<_> = chain.collect();
            let written = self.request(&descs, mem);
            if q.add_used(mem, head, written).is_err() {
                tracing::warn!("virtio-blk: cannot add used descriptor");
            }
            used = true;
        }
        used
    }

    /// Runs one request; returns the bytes written to guest memory.
    fn request(
        &mut self,
        descs: &[virtio_queue::desc::split::Descriptor],
        mem: &GuestMemory,
    ) -> u32 {
        let (Some(first), Some(last)) = (descs.first(), descs.last()) else {
            return 0;
        };
        if descs.len() < 2 || first.len() < 16 || last.len() < 1 || !last.is_write_only() {
            return 0;
        }
        // Addresses near 2^64 wrap: such a request is not one.
        let (Some(sector_addr), Some(status_addr)) = (
            first.addr().checked_add(8),
            last.addr().checked_add(u64::from(last.len()) - 1),
        ) else {
            return 0;
        };
        let (Ok(kind), Ok(sector)) = (
            mem.read_obj::<u32>(first.addr()),
            mem.read_obj::<u64>(sector_addr),
        ) else {
            return 0;
        };
        let data = &descs[1..descs.len() - 1];
        let mut written = 0u32;
        let status = match kind {
            T_IN | T_OUT => {
                // A sector past the end is an error, also when its byte
                // offset does not fit in 64 bits (it wrapped to a sector
                // near 0 before).
                let mut off = sector.checked_mul(SECTOR);
                let mut st = S_OK;
                for d in data {
                    let len = d.len() as usize;
                    let in_disk = off
                        .and_then(|o| o.checked_add(len as u64))
                        .is_some_and(|end| end <= self.capacity * SECTOR);
                    // The buffer must be guest memory before we allocate
                    // its length.
                    if !in_disk || !GuestMemoryBackend::check_range(mem, d.addr(), len) {
                        st = S_IOERR;
                        break;
                    }
                    let off_now = off.unwrap_or_default();
                    let mut buf = vec![0u8; len];
                    if kind == T_IN {
                        if !d.is_write_only()
                            || self.disk.read_at(&mut buf, off_now).is_err()
                            || mem.write_slice(&buf, d.addr()).is_err()
                        {
                            st = S_IOERR;
                            break;
                        }
                        written += len as u32;
                    } else {
                        if self.read_only || mem.read_slice(&mut buf, d.addr()).is_err() {
                            st = S_IOERR;
                            break;
                        }
                        if let Err(e) = self.disk.write_at(&buf, off_now) {
                            tracing::warn!(path = %self.path.display(), "virtio-blk write failed: {e}");
                            st = S_IOERR;
                            break;
                        }
                        if let Some(d) = &mut self.dirty {
                            d.mark(off_now, len as u64);
                        }
                    }
                    off = Some(off_now + len as u64);
                }
                st
            }
            T_FLUSH => {
                if self.read_only || self.disk.flush().is_ok() {
                    S_OK
                } else {
                    S_IOERR
                }
            }
            T_GET_ID => {
                let mut id = [0u8; 20];
                let n = self.id.len().min(20);
                id[..n].copy_from_slice(&self.id.as_bytes()[..n]);
                match data.first() {
                    Some(d) if d.is_write_only() => {
                        let n = (d.len() as usize).min(20);
                        if mem.write_slice(&id[..n], d.addr()).is_ok() {
                            written += n as u32;
                            S_OK
                        } else {
                            S_IOERR
                        }
                    }
                    _ => S_IOERR,
                }
            }
            _ => S_UNSUPP,
        };
        if mem.write_obj(status, status_addr).is_ok() {
            written += 1;
        }
        written
    }
}
