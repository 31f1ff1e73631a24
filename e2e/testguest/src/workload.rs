//! The memory workload: a working set of pages rewritten in passes with a
//! pattern of (page index, generation), and a verifier that checks every page
//! against the generation it was last written with.
//!
//! Pages are written in order 0..n, one pass per generation, so the expected
//! generation of page i is computable: `gen` if `i < pos`, else `gen - 1`
//! (0 = not written yet, skipped). Both writing and verifying run in small
//! chunks from the main loop.

use crate::pattern::mem_word;

/// Page size of the working set.
pub const PAGE: u64 = 4096;
/// Offset of the second pattern word (the complement of the first).
pub const SECOND_WORD: u64 = PAGE - 8;

/// A working set being dirtied.
pub struct Workload {
    pub base: u64,
    pub pages: u64,
    /// Pages per second; 0 = as fast as possible.
    pub rate: u64,
    pub gen: u64,
    pub pos: u64,
    pub written: u64,
    /// Write credit in page-nanoseconds (pages * 1e9).
    credit: u64,
    last_ns: u64,
    /// Set by `corrupt`: no more writes.
    pub paused: bool,
}

/// Result of a finished verification.
pub enum CheckResult {
    Ok {
        gen: u64,
        pages: u64,
    },
    Bad {
        page: u64,
        expected: u64,
        found: u64,
    },
}

/// An in-progress verification.
pub struct Check {
    next: u64,
    verified: u64,
}

impl Workload {
    /// A new workload over `[base, base + pages*4096)`, generation 1, nothing written.
    pub fn new(base: u64, pages: u64, rate: u64, now_ns: u64) -> Workload {
        Workload {
            base,
            pages,
            rate,
            gen: 1,
            pos: 0,
            written: 0,
            credit: 0,
            last_ns: now_ns,
            paused: false,
        }
    }

    fn page_addr(&self, i: u64) -> u64 {
        self.base + i * PAGE
    }

    /// Generation page `i` was last written with (0 = never).
    pub fn expected_gen(&self, i: u64) -> u64 {
        if i < self.pos {
            self.gen
        } else {
            self.gen - 1
        }
    }

    fn write_one(&mut self) {
        let a = self.page_addr(self.pos);
        let w = mem_word(self.pos, self.gen);
        // SAFETY: the working set lies in RAM reserved for it (checked against
        // the memory map when created), identity mapped, used by nothing else.
        unsafe {
            core::ptr::write_volatile(a as *mut u64, w);
            core::ptr::write_volatile((a + SECOND_WORD) as *mut u64, !w);
        }
        self.pos += 1;
        self.written += 1;
        if self.pos == self.pages {
            self.pos = 0;
            self.gen += 1;
        }
    }

    /// Pages the rate allows now (u64::MAX when unlimited).
    pub fn allowed(&mut self, now_ns: u64) -> u64 {
        if self.paused {
            return 0;
        }
        if self.rate == 0 {
            return u64::MAX;
        }
        let dt = now_ns.saturating_sub(self.last_ns).min(1_000_000_000);
        self.last_ns = now_ns;
        // Cap the backlog at 0.1 s of work so a pause does not cause a burst.
        let cap = (self.rate / 10).max(16).saturating_mul(1_000_000_000);
        self.credit = (self.credit + dt * self.rate).min(cap);
        self.credit / 1_000_000_000
    }

    /// Writes up to `n` pages.
    pub fn write(&mut self, n: u64) {
        for _ in 0..n {
            self.write_one();
        }
        if self.rate != 0 {
            self.credit = self.credit.saturating_sub(n * 1_000_000_000);
        }
    }

    /// Flips bit 0 of the first word of page `i` and pauses the writer so the
    /// damage stays until the next verification (for testing the verifier).
    pub fn corrupt(&mut self, i: u64) -> bool {
        if i >= self.pages {
            return false;
        }
        self.paused = true;
        let a = self.page_addr(i) as *mut u64;
        // SAFETY: page i is inside the working set (checked above).
        unsafe { core::ptr::write_volatile(a, core::ptr::read_volatile(a) ^ 1) };
        true
    }

    /// Starts a verification pass.
    pub fn start_check() -> Check {
        Check {
            next: 0,
            verified: 0,
        }
    }

    /// Verifies up to `n` more pages; returns the result when done.
    pub fn check_some(&self, c: &mut Check, n: u64) -> Option<CheckResult> {
        let end = (c.next + n).min(self.pages);
        while c.next < end {
            let i = c.next;
            c.next += 1;
            let g = self.expected_gen(i);
            if g == 0 {
                continue;
            }
            let a = self.page_addr(i);
            let expected = mem_word(i, g);
            // SAFETY: page i is inside the working set.
            let (w0, w1) = unsafe {
                (
                    core::ptr::read_volatile(a as *const u64),
                    core::ptr::read_volatile((a + SECOND_WORD) as *const u64),
                )
            };
            if w0 != expected {
                return Some(CheckResult::Bad {
                    page: i,
                    expected,
                    found: w0,
                });
            }
            if w1 != !expected {
                return Some(CheckResult::Bad {
                    page: i,
                    expected: !expected,
                    found: w1,
                });
            }
            c.verified += 1;
        }
        if c.next >= self.pages {
            Some(CheckResult::Ok {
                gen: self.gen,
                pages: c.verified,
            })
        } else {
            None
        }
    }
}
