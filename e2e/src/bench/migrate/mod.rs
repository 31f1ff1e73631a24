//! `bench migrate`: live migration of the test guest, godwit-vmm against
//! QEMU/KVM (`qemu-system-x86_64 -enable-kvm -M microvm,acpi=off`), same
//! guest binary, same workload, same topology.
//!
//! Source and target run in two network namespaces joined by a veth pair
//! (`10.93.0.1` ↔ `10.93.0.2`); on the `1gbit` link both ends are shaped with
//! `tc tbf rate 1gbit`. Scenarios: `idle-1g`, `dirty64m-1g`, `dirty512m-1g`
//! (1 GiB guests, heartbeat every 2 ms, the working set written as fast as
//! the guest can). Per run it measures the engine's own total time, downtime,
//! bytes sent and rounds, and the *observed pause*: the largest gap between
//! consecutive heartbeat lines as the host timestamps their arrival on the
//! source's and then the target's console, minus the 2 ms period (floor 0).
//!
//! Configurations: godwit `default` (its own policy: auto-converge and
//! post-copy allowed); QEMU `default` (no parameter changed, so its 128 MiB/s
//! bandwidth cap applies); QEMU `best` (no cap on the unlimited link, the
//! link rate on the shaped one, and auto-converge or post-copy, both tried,
//! the one with the lower observed pause kept). A migration that does not
//! finish within the timeout reports `converged: false` and is cancelled.
//!
//! `--engine godwit-tls` runs our engine alone over mutual TLS instead of
//! plain TCP (both VMMs started with `--tls-cert/--tls-key/--tls-ca`, ECDSA
//! P-256 certificates made with `openssl` for the run), reported as engine
//! `godwit`, config `tls`, to measure what the encryption costs.
//!
//! A benchmark prints numbers; nothing here asserts on time.
//!
//! Modules: [`scenario`] (the guests), [`topology`] (the namespaces and the
//! link), `godwit` and `qemu` (one run of each engine), [`report`] (what a
//! run measured); [`run`] sequences them.

mod error;
mod godwit;
mod qemu;
pub mod report;
pub mod scenario;
pub mod topology;

use std::path::PathBuf;
use std::time::Duration;

use godwit_crds::error_chain;
use godwit_testkit::guest::guest_elf;

pub use error::BenchError;
pub use godwit::vmm_binary;
pub use report::{missing_heartbeats, observed_pause, RunResult};
pub use scenario::{cmdline, Scenario, HB_MS, MEMORY_MIB, SCENARIOS};
pub use topology::Link;

use godwit::godwit_run;
use qemu::{qemu_best, qemu_run, QemuVariant};
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
    /// Only this engine (`godwit` or `qemu`; `godwit-tls`: ours over mutual TLS).
    pub engine: Option<String>,
    /// Completion timeout of one migration.
    pub timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            quick: false,
            vmm: None,
            scenario: None,
            engine: None,
            timeout: Duration::from_secs(60),
        }
    }
}

/// Runs the benchmark; calls `report` with each result as it is measured
/// (a failed run is reported with `error` set, and the benchmark goes on).
pub fn run(
    opts: &Options,
    mut report: impl FnMut(&RunResult),
) -> Result<Vec<RunResult>, BenchError> {
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
    let mut out = Vec::new();
    for &link in links {
        let t = topology(link)?;
        for s in SCENARIOS
            .iter()
            .filter(|s| opts.scenario.as_deref().is_none_or(|f| s.name.contains(f)))
        {
            let mut runs: Vec<(&'static str, &'static str, Result<RunResult, BenchError>)> =
                Vec::new();
            if let Some(vmm) = &vmm {
                let config = if tls { "tls" } else { "default" };
                runs.push((
                    "godwit",
                    config,
                    godwit_run(&t, vmm, s, link, opts.timeout, tls),
                ));
                report_last(&mut runs, s, link, &mut out, &mut report);
            }
            if want("qemu") {
                runs.push((
                    "qemu",
                    "default",
                    qemu_run(&t, s, link, QemuVariant::Default, opts.timeout),
                ));
                report_last(&mut runs, s, link, &mut out, &mut report);
                runs.push(("qemu", "best", qemu_best(&t, s, link, opts.timeout)));
                report_last(&mut runs, s, link, &mut out, &mut report);
            }
        }
    }
    Ok(out)
}

type Pending = Vec<(&'static str, &'static str, Result<RunResult, BenchError>)>;

fn report_last(
    runs: &mut Pending,
    s: &Scenario,
    link: Link,
    out: &mut Vec<RunResult>,
    report: &mut impl FnMut(&RunResult),
) {
    if let Some((engine, config, r)) = runs.pop() {
        let r = r.unwrap_or_else(|e| {
            let mut f = RunResult::new(engine, config, s, link);
            f.error = Some(error_chain(&e));
            f
        });
        report(&r);
        out.push(r);
    }
}
