//! Live storage migration, a phase of the source and the target: node-local
//! disks travel in the migration stream, next to memory, as
//! [`Command::DiskBlocks`] frames. The source copies with `DiskSender`
//! (the bulk copy, then each round's dirty blocks through
//! `RoundDisks`); the target answers the offers (`accept`), writes
//! (`apply`) and flushes (`flush`).
//!
//! ```text
//!  Hello(disks: index, size, base digest) -> HelloAck(base present per disk)
//!  changed-block tracking on (before anything is read)
//!  bulk copy: the allocated ranges only        (guest running)
//!  round n: blocks dirtied in round n-1, then memory pages
//!  stop-and-copy: the last dirty blocks, then the last pages and the state
//! ```
//!
//! What travels. The bulk copy sends the ranges allocated in the disk
//! ([`crate::storage::copy::copy_extents`]): holes of a raw file and
//! unallocated qcow2 clusters are not sent. When the target's disk is an
//! overlay on the same template base (same digest, from the cache's file
//! names) only the overlay's own clusters travel; otherwise the whole
//! chain's allocated ranges do, read through the overlay. A chunk that
//! reads as zero goes as a zero run (a header, no data). The target writes
//! into the disk its caller created with the same virtual size (an overlay
//! on its cached base, or a blank image); sizes are checked at the Hello.
//!
//! Dirty blocks come from changed-block tracking ([`crate::storage::cbt`],
//! 64 KiB blocks), started before the first extent is read, so a write the
//! bulk copy missed is in the next set. Their bytes count in the expected
//! downtime like dirty pages (as `bytes / 4096` pages), so convergence
//! waits for both.
//!
//! Why dirty rounds and not write mirroring: rounds reuse the memory loop's
//! decision (pause when the remaining set fits the downtime budget), keep
//! the guest's write path free of network round-trips (a mirrored write
//! completes only when the target has it, so a guest on a slow link would
//! write at link speed for the whole migration), and bound the final set
//! by what the guest dirties in one short round. `bench storage` measures
//! the final dirty set and the downtime with and without disks
//! (`docs/migration.md`).
//!
//! Post-copy is turned off for a migration that copies disks: the guest
//! would run on the target before its disk has arrived, and disk reads do
//! not fault like memory.
//!
//! Failure before Commit leaves the source as it was: tracking stops, the
//! guest resumes, its disk never stopped being the source's; the target
//! drops what it wrote with the VM (the caller removes the file).

use super::error::MigrationError;
use super::guest::{SourceVm, TargetVm};
use super::progress::StorageResult;
use super::protocol::{self, Command, DiskAccept, DiskBatch, DiskOffer, DISK_SECTOR};
use super::session::{RoundDisks, Source, BATCH_BYTES};
use crate::storage::ChangedBlocks;

/// Bytes read and sent per run: a multiple of the CBT block.
const CHUNK: u64 = 256 << 10;

/// One disk the source copies.
pub(super) struct DiskCopy {
    pub index: usize,
    pub size: u64,
    pub own_only: bool,
    /// Blocks dirtied and not yet sent.
    pub pending: Option<ChangedBlocks>,
}

/// The source's disk side.
#[derive(Default)]
pub(super) struct DiskSender {
    pub disks: Vec<DiskCopy>,
    pub tracking: bool,
    /// The image locks were released for the hand-over.
    pub released: bool,
    pub result: StorageResult,
}

/// What the source offers for `indices` in its Hello.
pub(super) fn offers<V: SourceVm>(
    vm: &V,
    indices: &[usize],
) -> Result<Vec<DiskOffer>, MigrationError> {
    indices
        .iter()
        .map(|&i| {
            let (size, base_digest) = vm
                .disk_describe(i)
                .map_err(|e| MigrationError::Disk(i, "describe", e))?;
            Ok(DiskOffer {
                index: i as u32,
                size,
                base_digest,
            })
        })
        .collect()
}

impl DiskSender {
    /// Takes the target's answers and turns tracking on for every disk.
    pub fn start<V: SourceVm>(
        &mut self,
        vm: &V,
        offered: &[DiskOffer],
        acks: &[DiskAccept],
    ) -> Result<(), MigrationError> {
        if acks.len() != offered.len() || acks.iter().zip(offered).any(|(a, o)| a.index != o.index)
        {
            return Err(protocol::ProtocolError::Malformed {
                command: Command::HelloAck,
                reason: "disk answers do not match the disks offered",
            }
            .into());
        }
        for (o, a) in offered.iter().zip(acks) {
            self.disks.push(DiskCopy {
                index: o.index as usize,
                size: o.size,
                own_only: a.base_present,
                pending: None,
            });
            self.result.base_on_target.push(a.base_present);
        }
        self.result.disks = self.disks.len() as u32;
        self.tracking = true;
        for d in &self.disks {
            vm.disk_track(d.index, true)
                .map_err(|e| MigrationError::Disk(d.index, "track", e))?;
        }
        Ok(())
    }

    /// Stops tracking (the migration failed, or is over).
    pub fn stop<V: SourceVm>(&mut self, vm: &V) {
        if std::mem::take(&mut self.tracking) {
            for d in &self.disks {
                let _ = vm.disk_track(d.index, false);
            }
        }
    }
}

impl<V: SourceVm> RoundDisks<V> for DiskSender {
    fn collect(&mut self, vm: &V) -> Result<u64, MigrationError> {
        let mut bytes = 0;
        for d in &mut self.disks {
            let c = vm
                .disk_take_dirty(d.index)
                .map_err(|e| MigrationError::Disk(d.index, "take dirty", e))?;
            match &mut d.pending {
                Some(p) => p.merge(&c),
                None => d.pending = Some(c),
            }
            bytes += d.pending.as_ref().map_or(0, ChangedBlocks::bytes);
        }
        Ok(bytes)
    }

    fn send_pending(&mut self, src: &mut Source<'_, V>) -> Result<u64, MigrationError> {
        let before = src.writer.bytes_sent;
        for d in &mut self.disks {
            if let Some(p) = d.pending.take() {
                let ranges = p.ranges();
                self.result.dirty_bytes_sent += p.bytes();
                send_ranges(src, d.index, d.size, &ranges)?;
            }
        }
        let sent = src.writer.bytes_sent - before;
        self.result.bytes_sent += sent;
        Ok(sent)
    }
}

/// Sends the bulk copy of every disk.
pub(super) fn send_bulk<V: SourceVm>(
    src: &mut Source<'_, V>,
    disks: &mut DiskSender,
) -> Result<(), MigrationError> {
    let before = src.writer.bytes_sent;
    for d in &disks.disks {
        let ranges = src
            .vm
            .disk_extents(d.index, d.own_only)
            .map_err(|e| MigrationError::Disk(d.index, "list extents", e))?;
        disks.result.allocated_bytes += ranges.iter().map(|r| r.1).sum::<u64>();
        send_ranges(src, d.index, d.size, &ranges)?;
    }
    disks.result.bytes_sent += src.writer.bytes_sent - before;
    Ok(())
}

/// Reads `ranges` of disk `index` and sends them, zero chunks as zero runs.
fn send_ranges<V: SourceVm>(
    src: &mut Source<'_, V>,
    index: usize,
    size: u64,
    ranges: &[(u64, u64)],
) -> Result<(), MigrationError> {
    let mut batch = DiskBatch::new(index as u32, BATCH_BYTES + CHUNK as usize);
    let mut buf = vec![0u8; CHUNK as usize];
    for &(offset, len) in ranges {
        let mut at = offset / DISK_SECTOR * DISK_SECTOR;
        let end = (offset + len).div_ceil(DISK_SECTOR) * DISK_SECTOR;
        let end = end.min(size);
        while at < end {
            // Chunks end on CHUNK boundaries so that reads stay aligned.
            let n = ((at / CHUNK + 1) * CHUNK).min(end) - at;
            let b = &mut buf[..n as usize];
            src.vm
                .disk_read(index, b, at)
                .map_err(|e| MigrationError::Disk(index, "read", e))?;
            if b.iter().all(|x| *x == 0) {
                batch.push_zero(at, n as u32);
            } else {
                batch.push_data(at, b);
            }
            at += n;
            if batch.len() >= BATCH_BYTES {
                src.writer.send(Command::DiskBlocks, batch.as_bytes())?;
                batch.clear();
                src.check_peer()?;
            }
        }
    }
    if !batch.is_empty() {
        src.writer.send(Command::DiskBlocks, batch.as_bytes())?;
    }
    Ok(())
}

/// The target's answers to the source's disk offers: sizes must match, and
/// a disk whose base the target holds needs only the overlay.
pub(super) fn accept<T: TargetVm>(
    vm: &T,
    offered: &[DiskOffer],
) -> Result<Vec<DiskAccept>, MigrationError> {
    offered
        .iter()
        .map(|o| {
            let i = o.index as usize;
            let (size, digest) = vm
                .disk_describe(i)
                .map_err(|e| MigrationError::Disk(i, "open on the target", e))?;
            if size != o.size {
                return Err(MigrationError::DiskSize {
                    disk: i,
                    source_size: o.size,
                    target_size: size,
                });
            }
            Ok(DiskAccept {
                index: o.index,
                base_present: digest.is_some() && digest == o.base_digest,
            })
        })
        .collect()
}

/// Writes a DiskBlocks payload into the target's disks; returns its data
/// bytes.
pub(super) fn apply<T: TargetVm>(
    vm: &T,
    offered: &[DiskOffer],
    payload: &[u8],
) -> Result<u64, MigrationError> {
    let (disk, runs) = protocol::parse_disk_blocks(payload)?;
    let offer = offered
        .iter()
        .find(|o| o.index == disk)
        .ok_or(MigrationError::DiskNotOffered(disk))?;
    let i = disk as usize;
    let zeros = vec![0u8; CHUNK as usize];
    let mut bytes = 0;
    for run in runs {
        if run.offset + u64::from(run.len) > offer.size {
            return Err(MigrationError::DiskRangeOutOfDisk(disk, run.offset));
        }
        match run.data {
            Some(d) => vm
                .disk_write(i, d, run.offset)
                .map_err(|e| MigrationError::Disk(i, "write on the target", e))?,
            None => {
                let mut at = run.offset;
                let end = run.offset + u64::from(run.len);
                while at < end {
                    let n = (end - at).min(CHUNK);
                    vm.disk_write(i, &zeros[..n as usize], at)
                        .map_err(|e| MigrationError::Disk(i, "write on the target", e))?;
                    at += n;
                }
            }
        }
        bytes += u64::from(run.len);
    }
    Ok(bytes)
}

/// Flushes every copied disk on the target (before it reports Ready).
pub(super) fn flush<T: TargetVm>(vm: &T, offered: &[DiskOffer]) -> Result<(), MigrationError> {
    for o in offered {
        let i = o.index as usize;
        vm.disk_flush(i)
            .map_err(|e| MigrationError::Disk(i, "flush on the target", e))?;
    }
    Ok(())
}
