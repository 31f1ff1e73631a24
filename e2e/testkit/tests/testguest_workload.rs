//! The test guest's memory workload (`e2e/testguest/src/workload.rs`) and its
//! patterns, compiled for the host and run over a heap buffer standing in for
//! guest RAM: every write order and fill must leave memory that the verifier
//! passes exactly, and a flipped bit must be caught on the page it hit.

#![allow(dead_code)]

#[path = "../../testguest/src/cmdline.rs"]
mod cmdline;
#[path = "../../testguest/src/pattern.rs"]
mod pattern;
#[path = "../../testguest/src/workload.rs"]
mod workload;

use std::io::Write;
use std::process::{Command, Stdio};

use cmdline::{Config, Fill, Order};
use pattern::{page_class, PageClass};
use workload::{CheckResult, Layout, Workload, PAGE};

const WORDS_PER_PAGE: usize = PAGE as usize / 8;

/// Host memory for a region of `pages` pages, and a workload over it.
struct Region {
    mem: Vec<u64>,
}

impl Region {
    fn new(pages: u64) -> Region {
        Region {
            mem: vec![0; pages as usize * WORDS_PER_PAGE],
        }
    }

    fn workload(&mut self, hot: u64, cold_fill: bool, order: Order, fill: Fill) -> Workload {
        let layout = Layout {
            base: self.mem.as_mut_ptr() as u64,
            region_pages: (self.mem.len() / WORDS_PER_PAGE) as u64,
            hot_pages: hot,
            cold_fill,
        };
        Workload::new(layout, order, fill, 0, 0)
    }

    fn page(&self, r: u64) -> &[u64] {
        let i = r as usize * WORDS_PER_PAGE;
        &self.mem[i..i + WORDS_PER_PAGE]
    }

    fn page_bytes(&self, r: u64) -> Vec<u8> {
        self.page(r).iter().flat_map(|w| w.to_le_bytes()).collect()
    }
}

fn check(w: &Workload) -> CheckResult {
    let mut c = Workload::start_check();
    loop {
        if let Some(r) = w.check_some(&mut c, 100) {
            return r;
        }
    }
}

fn assert_ok(w: &Workload, pages: u64) {
    match check(w) {
        CheckResult::Ok { gen, pages: p } => {
            assert_eq!((gen, p), (w.gen, pages), "gen, pages verified")
        }
        CheckResult::Bad {
            page,
            expected,
            found,
        } => panic!("page {page}: expected {expected:#x}, found {found:#x}"),
    }
}

/// The hot pages one pass writes, in order, found by which page's first
/// word changes with each single write (stride 1, marker fill).
fn write_order(w: &mut Workload, region: &Region) -> Vec<u64> {
    let gen = w.gen;
    let mut order = Vec::new();
    for _ in 0..w.pages {
        let before: Vec<u64> = (0..w.pages).map(|k| region.page(k)[0]).collect();
        w.write(1);
        let changed: Vec<u64> = (0..w.pages)
            .filter(|&k| region.page(k)[0] != before[k as usize])
            .collect();
        assert_eq!(changed.len(), 1, "one page changes per write");
        order.push(changed[0]);
    }
    assert_eq!(w.gen, gen + 1);
    order
}

/// Pages whose first word holds generation `gen`'s marker.
fn pages_at(region: &Region, pages: u64, gen: u64) -> u64 {
    (0..pages)
        .filter(|&k| region.page(k)[0] == pattern::mem_word(k, gen))
        .count() as u64
}

#[test]
fn sequential_marker_writes_are_todays_workload() {
    let mut r = Region::new(64);
    let mut w = r.workload(64, false, Order::Seq, Fill::Marker);
    assert_ok(&w, 0);
    w.write(10);
    assert_ok(&w, 10);
    for k in 0..10 {
        let p = r.page(k);
        assert_eq!(p[0], pattern::mem_word(k, 1));
        assert_eq!(p[WORDS_PER_PAGE - 1], !pattern::mem_word(k, 1));
        assert!(p[1..WORDS_PER_PAGE - 1].iter().all(|&x| x == 0));
    }
    w.write(64 + 5);
    assert_eq!((w.gen, w.pos), (2, 15));
    assert_ok(&w, 64);
    assert_eq!(r.page(3)[0], pattern::mem_word(3, 2));
    assert_eq!(r.page(40)[0], pattern::mem_word(40, 1));
}

#[test]
fn random_order_is_a_scattered_permutation_that_changes_per_generation() {
    for n in [7u64, 64, 100] {
        let mut r = Region::new(n);
        let mut w = r.workload(n, false, Order::Random, Fill::Marker);
        let first = write_order(&mut w, &r);
        let second = write_order(&mut w, &r);
        for order in [&first, &second] {
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..n).collect::<Vec<_>>(), "n={n}: a permutation");
        }
        assert_ne!(first, second, "n={n}: the order changes per generation");
        assert_ne!(first, (0..n).collect::<Vec<_>>(), "n={n}: not sequential");
        // Mean distance (around the ring) between consecutive writes.
        let mean = first
            .windows(2)
            .map(|p| p[0].abs_diff(p[1]).min(n - p[0].abs_diff(p[1])))
            .sum::<u64>()
            / (n - 1);
        assert!(mean >= n / 8, "n={n}: writes {first:?} are not scattered");
    }
}

#[test]
fn the_verifier_inverts_the_random_order_exactly_mid_pass() {
    // Sizes with odd factors (200 MiB = 51200 pages) and tiny ones.
    for n in [1u64, 2, 3, 4096, 51_200, 3 * 5 * 7 * 11 * 13] {
        let mut r = Region::new(n);
        let mut w = r.workload(n, false, Order::Random, Fill::Marker);
        let mut step = 1;
        while w.gen < 3 {
            w.write(step.min(n));
            step = step * 3 + 1;
            let gen = w.gen;
            assert_ok(&w, if gen == 1 { w.pos } else { n });
            // Every write of this pass hit a different page.
            assert_eq!(pages_at(&r, n, gen), w.pos, "n={n} gen={gen}");
        }
    }
}

#[test]
fn corruption_is_caught_on_the_page_it_hit_in_every_mode() {
    for (order, fill) in [
        (Order::Seq, Fill::Marker),
        (Order::Random, Fill::Marker),
        (Order::Random, Fill::Mix),
        (Order::Seq, Fill::Mix),
    ] {
        let mut r = Region::new(1024);
        let mut w = r.workload(256, true, order, fill);
        while !w.fill_some(100) {}
        w.write(256 + 77);
        assert_ok(&w, 1024);
        assert!(w.corrupt(123));
        assert!(!w.corrupt(256));
        match check(&w) {
            CheckResult::Bad {
                page,
                expected,
                found,
            } => {
                assert_eq!(page, 123 * 4, "{order:?} {fill:?}");
                assert_eq!(found, expected ^ 1);
            }
            CheckResult::Ok { .. } => panic!("{order:?} {fill:?}: corruption not caught"),
        }
        // The writer is paused, so the damage stays.
        assert_eq!(w.allowed(1_000_000_000), 0);
    }
}

#[test]
fn mixed_pages_are_zero_text_or_random_by_class() {
    let mut r = Region::new(2048);
    let mut w = r.workload(512, true, Order::Random, Fill::Mix);
    // Nothing is written while the cold fill is under way.
    assert_eq!(w.allowed(0), 0);
    w.fill_some(1000);
    assert_ok(&w, 1000);
    while !w.fill_some(64) {}
    assert_ok(&w, 2048);
    w.write(512 * 2 + 100);
    assert_eq!(w.gen, 3);
    assert_ok(&w, 2048);
    let mut counts = [0u64; 3];
    for p in 0..2048 {
        let page = r.page(p);
        match page_class(p) {
            PageClass::Zero => {
                counts[0] += 1;
                assert!(page.iter().all(|&x| x == 0), "zero page {p}");
            }
            PageClass::Text => {
                counts[1] += 1;
                let b = r.page_bytes(p);
                assert!(b
                    .iter()
                    .all(|&c| c == b' ' || c == b'\n' || c.is_ascii_lowercase()));
                assert_eq!(b.iter().filter(|&&c| c == b'\n').count(), 64, "page {p}");
            }
            PageClass::Random => {
                counts[2] += 1;
                let mut words = page.to_vec();
                words.sort_unstable();
                words.dedup();
                assert_eq!(words.len(), WORDS_PER_PAGE, "random page {p} repeats words");
            }
        }
    }
    // Half, a quarter and a quarter, within sampling noise.
    assert!((900..1150).contains(&counts[0]), "{counts:?}");
    assert!((400..630).contains(&counts[1]), "{counts:?}");
    assert!((400..630).contains(&counts[2]), "{counts:?}");
    // Hot page k is region page 4k; region page 4k+1 keeps its cold content.
    let text_cold = (0..512)
        .map(|k| 4 * k + 1)
        .find(|&p| page_class(p) == PageClass::Text);
    let p = text_cold.unwrap();
    let cold = pattern::text_line(pattern::mem_word(p, 0), 0);
    assert_eq!(r.page(p)[0], pattern::line_word(&cold, 0));
}

#[test]
fn an_unfinished_cold_fill_is_verified_as_far_as_it_went() {
    let mut r = Region::new(512);
    let mut w = r.workload(128, true, Order::Seq, Fill::Mix);
    w.fill_some(300);
    assert!(w.filling());
    assert_ok(&w, 300);
    assert!(w.fill_some(1000));
    assert_ok(&w, 512);
}

/// zstd's size for `data` at level 3.
fn zstd_len(data: &[u8]) -> usize {
    let mut child = Command::new("zstd")
        .args(["-3", "-c", "-q"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("zstd (Debian package zstd) is needed to measure compression");
    child.stdin.take().unwrap().write_all(data).unwrap();
    child.wait_with_output().unwrap().stdout.len()
}

#[test]
fn text_pages_compress_like_text_and_random_pages_do_not() {
    let mut r = Region::new(1024);
    let mut w = r.workload(1024, false, Order::Seq, Fill::Mix);
    w.write(1024);
    let pages = |class| {
        (0..1024u64)
            .filter(|&p| page_class(p) == class)
            .take(64)
            .collect::<Vec<_>>()
    };
    let text: Vec<u8> = pages(PageClass::Text)
        .iter()
        .flat_map(|&p| r.page_bytes(p))
        .collect();
    let random: Vec<u8> = pages(PageClass::Random)
        .iter()
        .flat_map(|&p| r.page_bytes(p))
        .collect();
    let bulk = text.len() as f64 / zstd_len(&text) as f64;
    let one = 4096.0 / zstd_len(&text[..4096]) as f64;
    assert!((3.0..6.0).contains(&bulk), "64 text pages: {bulk:.2}x");
    assert!((2.5..6.0).contains(&one), "one text page: {one:.2}x");
    assert!(zstd_len(&random) >= random.len(), "random pages compressed");
}

#[test]
fn the_new_command_line_keys_parse_and_default_to_todays_workload() {
    let c = Config::parse("dirty_mib=16 dirty_order=random dirty_fill=mix mix_mib=64");
    assert_eq!(
        (c.dirty_order, c.dirty_fill, c.mix_mib),
        (Order::Random, Fill::Mix, 64)
    );
    let d = Config::parse("dirty_order=zigzag dirty_fill=lots mix_mib=x");
    assert_eq!(
        (d.dirty_order, d.dirty_fill, d.mix_mib),
        (Order::Seq, Fill::Marker, 0)
    );
    assert_eq!((Order::Random.name(), Fill::Mix.name()), ("random", "mix"));
}
