//! virtio-blk over a raw image file: read, write, flush (fsync, honoured)
//! and get-id, read-only when asked. Requests are served synchronously on
//! the notifying vCPU thread.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::{VirtioError, VIRTIO_F_VERSION_1};
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
}

/// A virtio-blk device.
pub struct Block {
    file: File,
    path: PathBuf,
    read_only: bool,
    capacity: u64,
    id: String,
}

impl Block {
    /// Opens the image at `path`; it must exist.
    pub fn new(path: PathBuf, read_only: bool, id: String) -> Result<Self, VirtioError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(&path)
            .map_err(|e| VirtioError::OpenDisk(path.display().to_string(), e))?;
        let len = file
            .metadata()
            .map_err(|e| VirtioError::OpenDisk(path.display().to_string(), e))?
            .len();
        Ok(Block {
            file,
            path,
            read_only,
            capacity: len / SECTOR,
            id,
        })
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
        }
    }

    /// Serves every available request; true if any was completed.
    pub fn process(&mut self, q: &mut Queue, mem: &GuestMemory) -> bool {
        let mut used = false;
        while let Some(chain) = q.pop_descriptor_chain(mem) {
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
        let hdr = GuestAddress(first.addr().0);
        let (Ok(kind), Ok(sector)) = (
            mem.read_obj::<u32>(hdr),
            mem.read_obj::<u64>(GuestAddress(hdr.0 + 8)),
        ) else {
            return 0;
        };
        let status_addr = GuestAddress(last.addr().0 + u64::from(last.len()) - 1);
        let data = &descs[1..descs.len() - 1];
        let mut written = 0u32;
        let status = match kind {
            T_IN | T_OUT => {
                let mut off = sector * SECTOR;
                let mut st = S_OK;
                for d in data {
                    let len = d.len() as usize;
                    if off + len as u64 > self.capacity * SECTOR {
                        st = S_IOERR;
                        break;
                    }
                    let mut buf = vec![0u8; len];
                    if kind == T_IN {
                        if !d.is_write_only()
                            || self.file.read_exact_at(&mut buf, off).is_err()
                            || mem.write_slice(&buf, d.addr()).is_err()
                        {
                            st = S_IOERR;
                            break;
                        }
                        written += len as u32;
                    } else if self.read_only
                        || mem.read_slice(&mut buf, d.addr()).is_err()
                        || self.file.write_all_at(&buf, off).is_err()
                    {
                        st = S_IOERR;
                        break;
                    }
                    off += len as u64;
                }
                st
            }
            T_FLUSH => {
                if self.read_only || self.file.sync_data().is_ok() {
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
