//! The memory workload: a working set of "hot" pages rewritten in passes with
//! a pattern of (page index, generation), and a verifier that checks every
//! page against the generation it was last written with.
//!
//! The hot pages lie in a region of memory: without `mix_mib` the region is
//! the working set; with it, hot page `k` is region page `k * stride` (stride
//! = region pages / hot pages), and every region page is first written once
//! with its generation-0 content (the cold fill), before any pass.
//!
//! Pass `gen` writes position `i = 0..n` to hot page `perm_gen(i)`, where
//! `perm_gen` is the identity (`dirty_order=seq`) or `i -> (a*i + c) mod n`
//! with `a` coprime to `n`, both drawn from `gen` (`dirty_order=random`).
//! So the expected generation of hot page `k` is computable: `gen` if its
//! position `perm_gen^-1(k)` is below the writer's position, else `gen - 1`
//! (every page of the previous pass was written, whatever its order);
//! generation 0 means "cold-filled" for region pages the fill has reached,
//! and "never written" (skipped) for the others. What a write stores depends
//! on the fill (`dirty_fill`); the verifier regenerates the first and last
//! words of each page rather than storing them. Writing, filling and
//! verifying run in small chunks from the main loop, and all the state lives
//! in guest memory, so a migration carries it along.

use crate::cmdline::{Fill, Order};
use crate::pattern::{line_word, mem_word, page_class, random_word, text_line, PageClass};

/// Page size of the working set.
pub const PAGE: u64 = 4096;
/// Offset of the last word of a page (the marker fill's second word).
pub const SECOND_WORD: u64 = PAGE - 8;

/// Where the workload's pages are.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    /// Address of region page 0.
    pub base: u64,
    /// Pages in the region (at least `hot_pages`).
    pub region_pages: u64,
    /// Pages in the working set, spread evenly over the region.
    pub hot_pages: u64,
    /// Write every region page once before the first pass (`mix_mib`).
    pub cold_fill: bool,
}

/// The permutation a pass writes its pages in: position `i` is hot page
/// `(a*i + c) mod n`; `a_inv` is `a`'s inverse mod `n`.
#[derive(Clone, Copy, Debug)]
struct Perm {
    a: u64,
    c: u64,
    a_inv: u64,
}

impl Perm {
    const IDENTITY: Perm = Perm {
        a: 1,
        c: 0,
        a_inv: 1,
    };

    /// Generation `gen`'s permutation of `n` pages (`n` < 2^32, so products
    /// of two residues fit in a u64). `a` is odd-started near `n / phi`, so
    /// consecutive positions land about 0.38 n pages apart, and nudged up to
    /// the next value coprime to `n`.
    fn random(n: u64, gen: u64) -> Perm {
        if n <= 1 {
            return Perm::IDENTITY;
        }
        let spread = (n / 64).max(1);
        let mut a = (((n * 0x9e37_79b9) >> 32) + mix(gen) % spread) | 1;
        a %= n;
        while gcd(a, n) != 1 {
            a = (a + 1) % n;
        }
        Perm {
            a,
            c: mix(gen ^ 0x6f66_6673_6574) % n,
            a_inv: inverse(a, n),
        }
    }

    fn page_at(&self, i: u64, n: u64) -> u64 {
        (self.a * i + self.c) % n
    }

    fn position_of(&self, k: u64, n: u64) -> u64 {
        self.a_inv * ((k + n - self.c) % n) % n
    }
}

fn mix(x: u64) -> u64 {
    crate::pattern::mix64(x)
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// The inverse of `a` modulo `n` (`gcd(a, n) == 1`, `n` < 2^63).
fn inverse(a: u64, n: u64) -> u64 {
    let (mut r0, mut r1) = (n as i64, a as i64);
    let (mut t0, mut t1) = (0i64, 1i64);
    while r1 != 0 {
        let q = r0 / r1;
        (r0, r1) = (r1, r0 - q * r1);
        (t0, t1) = (t1, t0 - q * t1);
    }
    t0.rem_euclid(n as i64) as u64
}

/// A working set being dirtied.
pub struct Workload {
    pub layout: Layout,
    /// Hot pages (the working set).
    pub pages: u64,
    stride: u64,
    pub order: Order,
    pub fill: Fill,
    /// Pages per second; 0 = as fast as possible.
    pub rate: u64,
    pub gen: u64,
    pub pos: u64,
    /// Hot pages written by passes (the cold fill is not counted).
    pub written: u64,
    /// With a cold fill, region pages `0..filled` hold at least their cold
    /// content (generation 0).
    pub filled: u64,
    perm: Perm,
    /// Hot page at `pos` (kept by adding `a`, not by dividing, per write).
    next_page: u64,
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
    /// `page` is the region page (the working-set page without `mix_mib`).
    Bad {
        page: u64,
        expected: u64,
        found: u64,
    },
}

/// An in-progress verification, over region pages.
pub struct Check {
    next: u64,
    verified: u64,
}

impl Workload {
    /// A new workload, generation 1, nothing written (the cold fill, if any,
    /// is still to do: see [`Workload::fill_some`]).
    pub fn new(layout: Layout, order: Order, fill: Fill, rate: u64, now_ns: u64) -> Workload {
        let pages = layout.hot_pages;
        let mut w = Workload {
            layout,
            pages,
            stride: (layout.region_pages / pages.max(1)).max(1),
            order,
            fill,
            rate,
            gen: 1,
            pos: 0,
            written: 0,
            filled: 0,
            perm: Perm::IDENTITY,
            next_page: 0,
            credit: 0,
            last_ns: now_ns,
            paused: false,
        };
        w.start_pass();
        w
    }

    fn start_pass(&mut self) {
        self.perm = match self.order {
            Order::Seq => Perm::IDENTITY,
            Order::Random => Perm::random(self.pages, self.gen),
        };
        self.next_page = self.perm.page_at(0, self.pages.max(1));
    }

    fn page_addr(&self, region_page: u64) -> u64 {
        self.layout.base + region_page * PAGE
    }

    /// Whether region pages remain to be cold-filled.
    pub fn filling(&self) -> bool {
        self.layout.cold_fill && self.filled < self.layout.region_pages
    }

    /// Cold-fills up to `n` more region pages; returns whether the fill is done.
    pub fn fill_some(&mut self, n: u64) -> bool {
        if !self.layout.cold_fill {
            return true;
        }
        let end = (self.filled + n).min(self.layout.region_pages);
        while self.filled < end {
            self.store(self.filled, 0);
            self.filled += 1;
        }
        !self.filling()
    }

    /// Generation hot page `k` was last written with (0 = never, or only by
    /// the cold fill).
    pub fn expected_gen(&self, k: u64) -> u64 {
        if self.perm.position_of(k, self.pages) < self.pos {
            self.gen
        } else {
            self.gen - 1
        }
    }

    /// Writes region page `r`'s content for generation `gen`.
    fn store(&self, r: u64, gen: u64) {
        let a = self.page_addr(r);
        let seed = mem_word(r, gen);
        let class = match self.fill {
            Fill::Marker => None,
            Fill::Mix => Some(page_class(r)),
        };
        // SAFETY (all writes below): region page r lies in RAM reserved for
        // the workload (checked against the memory map when created),
        // identity mapped, used by nothing else.
        match class {
            None => unsafe {
                core::ptr::write_volatile(a as *mut u64, seed);
                core::ptr::write_volatile((a + SECOND_WORD) as *mut u64, !seed);
            },
            // One store dirties the page; the page stays all zero.
            Some(PageClass::Zero) => unsafe { core::ptr::write_volatile(a as *mut u64, 0) },
            Some(PageClass::Text) => {
                for line in 0..PAGE / 64 {
                    let l = text_line(seed, line);
                    let p = (a + line * 64) as *mut u64;
                    for w in 0..8 {
                        unsafe { core::ptr::write_volatile(p.add(w), line_word(&l, w)) };
                    }
                }
            }
            Some(PageClass::Random) => {
                let p = a as *mut u64;
                for w in 0..PAGE / 8 {
                    unsafe { core::ptr::write_volatile(p.add(w as usize), random_word(seed, w)) };
                }
            }
        }
    }

    /// The first and last words of region page `r` after a write of generation `gen`.
    fn expected_words(&self, r: u64, gen: u64) -> (u64, u64) {
        let seed = mem_word(r, gen);
        let class = match self.fill {
            Fill::Marker => return (seed, !seed),
            Fill::Mix => page_class(r),
        };
        match class {
            PageClass::Zero => (0, 0),
            PageClass::Text => (
                line_word(&text_line(seed, 0), 0),
                line_word(&text_line(seed, PAGE / 64 - 1), 7),
            ),
            PageClass::Random => (random_word(seed, 0), random_word(seed, PAGE / 8 - 1)),
        }
    }

    fn write_one(&mut self) {
        self.store(self.next_page * self.stride, self.gen);
        self.pos += 1;
        self.written += 1;
        if self.pos == self.pages {
            self.pos = 0;
            self.gen += 1;
            self.start_pass();
        } else {
            self.next_page += self.perm.a;
            if self.next_page >= self.pages {
                self.next_page -= self.pages;
            }
        }
    }

    /// Pages the rate allows now (u64::MAX when unlimited; 0 while filling).
    pub fn allowed(&mut self, now_ns: u64) -> u64 {
        if self.paused || self.filling() {
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

    /// Flips bit 0 of the first word of hot page `k` and pauses the writer so
    /// the damage stays until the next verification (for testing the verifier).
    pub fn corrupt(&mut self, k: u64) -> bool {
        if k >= self.pages {
            return false;
        }
        self.paused = true;
        let a = self.page_addr(k * self.stride) as *mut u64;
        // SAFETY: hot page k is inside the region (checked above).
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

    /// The generation region page `r` must hold, `None` when nothing is
    /// known (never written).
    fn region_gen(&self, r: u64) -> Option<u64> {
        let hot = r.is_multiple_of(self.stride) && r / self.stride < self.pages;
        let g = if hot {
            self.expected_gen(r / self.stride)
        } else {
            0
        };
        (g > 0 || (self.layout.cold_fill && r < self.filled)).then_some(g)
    }

    /// Verifies up to `n` more region pages; returns the result when done.
    pub fn check_some(&self, c: &mut Check, n: u64) -> Option<CheckResult> {
        let end = (c.next + n).min(self.layout.region_pages);
        while c.next < end {
            let r = c.next;
            c.next += 1;
            let Some(g) = self.region_gen(r) else {
                continue;
            };
            let a = self.page_addr(r);
            let (first, last) = self.expected_words(r, g);
            // SAFETY: page r is inside the region.
            let (w0, w1) = unsafe {
                (
                    core::ptr::read_volatile(a as *const u64),
                    core::ptr::read_volatile((a + SECOND_WORD) as *const u64),
                )
            };
            if w0 != first {
                return Some(CheckResult::Bad {
                    page: r,
                    expected: first,
                    found: w0,
                });
            }
            if w1 != last {
                return Some(CheckResult::Bad {
                    page: r,
                    expected: last,
                    found: w1,
                });
            }
            c.verified += 1;
        }
        if c.next >= self.layout.region_pages {
            Some(CheckResult::Ok {
                gen: self.gen,
                pages: c.verified,
            })
        } else {
            None
        }
    }
}
