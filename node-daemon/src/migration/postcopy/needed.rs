//! The target's record, during post-copy, of which pages are still on the
//! source (`Needed`): one bit per page that the fault thread reads and the
//! receive thread clears once the page is installed, and one bit per page
//! the fault thread has asked for (asked again on a new connection if it
//! has not arrived).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::migration::guest::GuestRegion;
use crate::migration::protocol::PAGE_SIZE;

/// Still-needed pages on the target, shared by the fault and receive threads,
/// and the pages the fault thread has asked for (asked again on a new
/// connection if they have not arrived).
pub(crate) struct Needed {
    pub regions: Vec<GuestRegion>,
    bits: Vec<Vec<AtomicU64>>,
    requested: Vec<Vec<AtomicU64>>,
}

impl Needed {
    /// Nothing needed yet, for guest RAM `regions`.
    pub fn new(regions: &[GuestRegion]) -> Needed {
        let words = |r: &GuestRegion| {
            (0..(r.size / PAGE_SIZE as u64).div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect()
        };
        Needed {
            bits: regions.iter().map(words).collect(),
            requested: regions.iter().map(words).collect(),
            regions: regions.to_vec(),
        }
    }

    /// Region index and page index of host address `host`.
    pub fn locate_host(&self, host: u64) -> Option<(usize, u64)> {
        self.regions.iter().enumerate().find_map(|(i, r)| {
            let start = r.host as u64;
            (host >= start && host < start + r.size).then(|| (i, (host - start) / PAGE_SIZE as u64))
        })
    }

    /// Whether page `page` of region `r` is still on the source.
    pub fn is_needed(&self, r: usize, page: u64) -> bool {
        self.bits[r][(page / 64) as usize].load(Ordering::Acquire) & (1 << (page % 64)) != 0
    }

    /// Marks page `page` of region `r` as still on the source.
    pub fn mark_needed(&self, r: usize, page: u64) {
        self.bits[r][(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::Relaxed);
    }

    /// Marks page `page` of region `r` as installed here.
    pub fn clear(&self, r: usize, page: u64) {
        self.bits[r][(page / 64) as usize].fetch_and(!(1 << (page % 64)), Ordering::Release);
    }

    /// Records that the fault thread asked for page `page` of region `r`.
    pub fn mark_requested(&self, r: usize, page: u64) {
        self.requested[r][(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::Release);
    }

    /// Runs of pages still needed, as `(gpa, pages)`.
    pub fn runs(&self) -> Vec<(u64, u32)> {
        let mut out: Vec<(u64, u32)> = Vec::new();
        for (r, words) in self.bits.iter().enumerate() {
            let gpa = self.regions[r].gpa;
            for (w, word) in words.iter().enumerate() {
                let mut bits = word.load(Ordering::Acquire);
                while bits != 0 {
                    let page = w as u64 * 64 + u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    let addr = gpa + page * PAGE_SIZE as u64;
                    match out.last_mut() {
                        Some((start, n))
                            if *start + u64::from(*n) * PAGE_SIZE as u64 == addr
                                && *n < u32::MAX =>
                        {
                            *n += 1
                        }
                        _ => out.push((addr, 1)),
                    }
                }
            }
        }
        out
    }

    /// Pages asked for that have not arrived.
    pub fn outstanding(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (r, words) in self.requested.iter().enumerate() {
            for (w, word) in words.iter().enumerate() {
                let mut bits =
                    word.load(Ordering::Acquire) & self.bits[r][w].load(Ordering::Acquire);
                while bits != 0 {
                    let page = w as u64 * 64 + u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    out.push(self.regions[r].gpa + page * PAGE_SIZE as u64);
                }
            }
        }
        out
    }
}
