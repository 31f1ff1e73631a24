//! Changed-block tracking (CBT): which parts of a disk the guest wrote
//! since tracking started or since the last take, like KVM's dirty log for
//! memory.
//!
//! The granularity is fixed at [`CBT_BLOCK`] = 64 KiB: the default qcow2
//! cluster size, so a dirty block maps to exactly one cluster of an
//! overlay, and small enough that a guest writing 4 KiB here and there
//! does not make a storage migration resend megabytes (a 20 GiB disk needs
//! a 40 KiB bitmap). A write that touches any byte of a block marks the
//! whole block. Block `i` covers disk bytes `i * 65536 .. (i + 1) * 65536`
//! (the last block may be shorter, ending at the disk size).
//!
//! The virtio-blk device marks blocks after each write it completed; the
//! migration engine (or the control socket's `disk-take-dirty`) takes and
//! clears the set with [`DirtyBlocks::take`].

use serde::{Deserialize, Serialize};

/// Tracking granularity in bytes.
pub const CBT_BLOCK: u64 = 64 * 1024;

/// A live dirty bitmap for one disk.
#[derive(Clone, Debug)]
pub struct DirtyBlocks {
    disk_size: u64,
    bits: Vec<u64>,
}

impl DirtyBlocks {
    /// An empty bitmap for a disk of `disk_size` bytes.
    pub fn new(disk_size: u64) -> Self {
        let blocks = disk_size.div_ceil(CBT_BLOCK);
        DirtyBlocks {
            disk_size,
            bits: vec![0; blocks.div_ceil(64) as usize],
        }
    }

    /// Marks the blocks that `len` bytes written at `offset` touch.
    pub fn mark(&mut self, offset: u64, len: u64) {
        if len == 0 || offset >= self.disk_size {
            return;
        }
        let end = (offset + len).min(self.disk_size);
        for b in offset / CBT_BLOCK..end.div_ceil(CBT_BLOCK) {
            self.bits[(b / 64) as usize] |= 1 << (b % 64);
        }
    }

    /// Returns the changed blocks and clears the bitmap.
    pub fn take(&mut self) -> ChangedBlocks {
        let words = self.bits.len();
        let bits = std::mem::replace(&mut self.bits, vec![0; words]);
        ChangedBlocks {
            granularity: CBT_BLOCK,
            disk_size: self.disk_size,
            bits,
        }
    }
}

/// A taken set of changed blocks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangedBlocks {
    /// Bytes per block ([`CBT_BLOCK`]).
    pub granularity: u64,
    /// Disk size in bytes.
    pub disk_size: u64,
    /// One bit per block, block `i` in bit `i % 64` of word `i / 64`.
    pub bits: Vec<u64>,
}

impl ChangedBlocks {
    /// Number of changed blocks.
    pub fn count(&self) -> u64 {
        self.bits.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Indices of the changed blocks, ascending.
    pub fn blocks(&self) -> impl Iterator<Item = u64> + '_ {
        self.bits.iter().enumerate().flat_map(|(i, w)| {
            let w = *w;
            (0..64)
                .filter(move |b| w & (1 << b) != 0)
                .map(move |b| i as u64 * 64 + b)
        })
    }

    /// Changed byte ranges `(offset, len)`, adjacent blocks merged, clipped
    /// to the disk size.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for b in self.blocks() {
            let start = b * self.granularity;
            let len = self.granularity.min(self.disk_size - start);
            match out.last_mut() {
                Some((s, l)) if *s + *l == start => *l += len,
                _ => out.push((start, len)),
            }
        }
        out
    }

    /// Adds the blocks of `other` (same disk).
    pub fn merge(&mut self, other: &ChangedBlocks) {
        debug_assert_eq!(self.disk_size, other.disk_size);
        for (a, b) in self.bits.iter_mut().zip(&other.bits) {
            *a |= b;
        }
    }

    /// Changed bytes (the sum of [`ChangedBlocks::ranges`]).
    pub fn bytes(&self) -> u64 {
        self.ranges().iter().map(|r| r.1).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_whole_blocks_and_merges_ranges() {
        let mut d = DirtyBlocks::new(10 * CBT_BLOCK + 100);
        d.mark(0, 1);
        d.mark(CBT_BLOCK - 1, 2); // straddles blocks 0 and 1
        d.mark(5 * CBT_BLOCK, 512);
        d.mark(10 * CBT_BLOCK + 50, 1000); // clipped to the short last block
        d.mark(20 * CBT_BLOCK, 512); // beyond the disk: ignored
        let c = d.take();
        assert_eq!(c.count(), 4);
        assert_eq!(c.blocks().collect::<Vec<_>>(), vec![0, 1, 5, 10]);
        assert_eq!(
            c.ranges(),
            vec![
                (0, 2 * CBT_BLOCK),
                (5 * CBT_BLOCK, CBT_BLOCK),
                (10 * CBT_BLOCK, 100)
            ]
        );
        assert_eq!(d.take().count(), 0, "take clears");
    }
}
