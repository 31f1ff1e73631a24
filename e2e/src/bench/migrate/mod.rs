//! `bench migrate`: live migration of the test guest, godwit-vmm against
//! QEMU/KVM (`qemu-system-x86_64 -enable-kvm -M microvm`, with ACPI as
//! ours), same guest binary, same workload, same topology, in the same run.
//!
//! Source and target run in two network namespaces joined by a veth pair
//! (`10.93.0.1` ↔ `10.93.0.2`); on the `1gbit` link both ends are shaped with
//! `tc tbf rate 1gbit`. The scenarios ([`SCENARIOS`]) are 1 GiB guests with a
//! heartbeat every 2 ms and a working set written as fast as the guest can:
//! none, 64 or 512 MiB in address order, 200 MiB in a scattered order, and
//! realistic memory (half zero pages, a quarter text-like, a quarter random)
//! with a working set drawn from all of it. Each runs on both links.
//!
//! ## Configurations
//!
//! - godwit `default`: its own policy (auto-converge and post-copy allowed),
//!   told to aim at a pause of `--max-downtime-ms` (default 50).
//! - QEMU `default`: nothing changed (300 ms `downtime-limit`, 128 MiB/s cap).
//! - QEMU `best`: the best of three variants ([`qemu::QemuVariant`]):
//!   auto-converge, post-copy, and post-copy after auto-converge, each with
//!   `downtime-limit` equal to Godwit's target and `max-bandwidth` at the
//!   link's rate (uncapped on the unlimited link). Each variant runs as
//!   many times as every other cell; the winner has the most converged runs,
//!   then the lowest median observed pause, then the least work lost. The
//!   summary names it.
//!
//! ## Figures, measured from outside and the same for both engines
//!
//! Every cell runs `--runs` times (default 5); its summary carries the
//! median, min and max of each figure over the runs that converged (over
//! all runs when none did), `converged` (true when every run did) and
//! `converged_runs`.
//!
//! - `observed_pause_ms`: the largest gap between consecutive heartbeats as
//!   the host timestamps their arrival on the source's and then the
//!   target's console, minus the 2 ms period.
//! - `total_ms`: from the start command until the target's heartbeat is the
//!   only one (its first after the source's last) and the engine has said
//!   it is done (polled every 20 ms), whichever is later: a post-copy
//!   migration is over when the source has pushed its last page.
//! - `bytes_wire`: the veth's transmit counters, both ends, after the run
//!   minus before.
//! - `work_lost_s`: every heartbeat carries the pages the guest's workload
//!   has written. Against the rate of the second before the start, the
//!   shortfall is integrated from the start until the first point after the
//!   end from which 100 ms run at 90% of that rate, and reported as seconds
//!   of full-speed work (`figures::work_lost`). Post-copy's fault waits and
//!   auto-converge's throttling both show here; an idle guest has none.
//! - The engines' own figures are kept apart: `engine_total_ms`,
//!   `downtime_ms` (the two engines define it differently), `bytes_sent`,
//!   `rounds`, and our engine's downtime breakdown in the per-run lines.
//!
//! A migration that does not finish within the timeout (`--timeout-s`,
//! default 25 s: three times what the whole 1 GiB guest takes to cross the
//! 1 Gbit/s link) reports `converged: false` and is cancelled. `--engine godwit-tls` runs our
//! engine alone over mutual TLS (both VMMs started with
//! `--tls-cert/--tls-key/--tls-ca`, ECDSA P-256 certificates made with
//! `openssl` for the run), reported as config `tls`.
//!
//! A benchmark prints numbers; nothing here asserts on time.
//!
//! Modules: [`scenario`] (the guests), [`topology`] (the namespaces and the
//! link), `godwit` and `qemu` (one run of each engine), [`figures`] (what the
//! heartbeats show), [`report`] (a run, a cell); [`run`] sequences them.

mod error;
pub mod figures;
mod godwit;
pub mod qemu;
pub mod report;
pub mod scenario;
pub mod topology;

use std::path::PathBuf;
use std::time::Duration;

use godwit_crds::error_chain;
use godwit_testkit::guest::guest_elf;

pub use error::BenchError;
pub use figures::{missing_heartbeats, observed_pause, work_lost};
pub use godwit::vmm_binary;
pub use report::{Cell, RunResult};
pub use scenario::{cmdline, Scenario, HB_MS, MEMORY_MIB, SCENARIOS};
pub use topology::Link;

use godwit::godwit_run;
use qemu::{qemu_run, QemuVariant, BEST_VARIANTS};
use topology::topology;

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Only the unlimited link.
    pub quick: bool,
    /// The godwit-vmm binary (default: `target/release/godwit-vmm`, built if missing).
    pub vmm: Option<PathBuf>,
    /// Only scenarios whose name contains this.
    pub scenario: Option<String>,
    /// Only this link (`unlimited` or `1gbit`).
    pub link: Option<String>,
    /// Only this engine (`godwit` or `qemu`; `godwit-tls`: ours over mutual TLS).
    pub engine: Option<String>,
    /// Completion timeout of one migration.
    pub timeout: Duration,
    /// Runs of each engine, configuration (each QEMU variant), scenario
    /// and link.
    pub runs: usize,
    /// The pause both engines aim at (Godwit's `max_downtime_ms`, QEMU's
    /// `downtime-limit` in its best variants).
    pub max_downtime_ms: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            quick: false,
            vmm: None,
            scenario: None,
            link: None,
            engine: None,
            timeout: Duration::from_secs(25),
            runs: 5,
            max_downtime_ms: 50,
        }
    }
}

/// Runs the benchmark; calls `on_run` with each run as it is measured (a
/// failed run is reported with `error` set, and the benchmark goes on) and
/// `on_cell` with each cell's summary. Returns the cells.
pub fn run(
    opts: &Options,
    mut on_run: impl FnMut(&RunResult),
    mut on_cell: impl FnMut(&Cell),
) -> Result<Vec<Cell>, BenchError> {
    godwit_testkit::qemu::check_host()?;
    let want = |e: &str| opts.engine.as_deref().is_none_or(|x| x == e);
    // Only on request: our engine over mutual TLS.
    let tls = opts.engine.as_deref() == Some("godwit-tls");
    let vmm = if want("godwit") || tls {
        Some(vmm_binary(opts.vmm.clone())?)
    } else {
        None
    };
    guest_elf()?;
    let links: &[Link] = if opts.quick {
        &[Link::Unlimited]
    } else {
        &[Link::Unlimited, Link::Gbit]
    };
    let mut cells = Vec::new();
    for &link in links
        .iter()
        .filter(|l| opts.link.as_deref().is_none_or(|x| x == l.name()))
    {
        let t = topology(link)?;
        for s in SCENARIOS
            .iter()
            .filter(|s| opts.scenario.as_deref().is_none_or(|f| s.name.contains(f)))
        {
            let mut out = |cell: Cell| {
                on_cell(&cell);
                cells.push(cell);
            };
            if let Some(vmm) = &vmm {
                let config = if tls { "tls" } else { "default" };
                out(repeat(opts, "godwit", config, s, link, &mut on_run, || {
                    godwit_run(&t, vmm, s, link, opts.max_downtime_ms, opts.timeout, tls)
                }));
            }
            if want("qemu") {
                let qemu = |v: QemuVariant, on_run: &mut dyn FnMut(&RunResult)| {
                    let config = if v == QemuVariant::Default {
                        "default"
                    } else {
                        "best"
                    };
                    repeat(opts, "qemu", config, s, link, on_run, || {
                        qemu_run(&t, s, link, v, opts.max_downtime_ms, opts.timeout)
                    })
                };
                out(qemu(QemuVariant::Default, &mut on_run));
                let best = best_of(
                    BEST_VARIANTS
                        .iter()
                        .map(|&v| {
                            let mut c = qemu(v, &mut on_run);
                            c.variant = Some(v.name().into());
                            c
                        })
                        .collect(),
                );
                out(best);
            }
        }
    }
    Ok(cells)
}

/// `opts.runs` runs of one engine and configuration, each reported to
/// `on_run` as it ends (a failed run as a result with `error` set).
fn repeat(
    opts: &Options,
    engine: &'static str,
    config: &'static str,
    s: &Scenario,
    link: Link,
    on_run: &mut dyn FnMut(&RunResult),
    mut one: impl FnMut() -> Result<RunResult, BenchError>,
) -> Cell {
    let runs = (0..opts.runs.max(1))
        .map(|_| {
            let r = one().unwrap_or_else(|e| {
                let mut f = RunResult::new(engine, config, s, link);
                f.error = Some(error_chain(&e));
                f
            });
            on_run(&r);
            r
        })
        .collect();
    Cell {
        engine,
        config,
        scenario: s.name,
        link: link.name(),
        variant: None,
        runs,
    }
}

/// The best of QEMU's variants ([`Cell::better_than`]).
fn best_of(variants: Vec<Cell>) -> Cell {
    let mut best: Option<Cell> = None;
    for c in variants {
        if best.as_ref().is_none_or(|b| c.better_than(b)) {
            best = Some(c);
        }
    }
    best.expect("at least one QEMU variant")
}
