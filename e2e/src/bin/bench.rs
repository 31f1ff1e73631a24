//! Godwit benchmarks, one subcommand each. They print numbers (a table, or
//! JSON lines with `--json`) and assert nothing about time.
//!
//! - `bench boot`: time from process start to the test guest's first
//!   heartbeat, godwit-vmm vs `qemu-system-x86_64 -enable-kvm -M microvm`,
//!   median over several runs, plus each engine's resident memory beyond
//!   the guest's own RAM.
//!
//! - `bench migrate [--json] [--quick] [--runs N]`: live migration of the test guest,
//!   godwit-vmm vs QEMU (its defaults and the best of three variants), idle
//!   and working 1 GiB guests over an unlimited and a 1 Gbit/s veth between
//!   two network namespaces, each cell repeated (see
//!   `godwit_e2e::bench::migrate`).
//!
//! - `bench storage [--json]`: provisioning time from a cached template
//!   (1 GiB and 20 GiB, sparse and fully written; see
//!   `godwit_e2e::bench::storage`), then live storage migration with and
//!   without the base image on the target against a memory-only migration
//!   of the same workload, with the observed pause and the target's disk
//!   re-read (`godwit_e2e::bench::storage_migrate`; skip with
//!   `--no-migrate`, or run it alone with `--no-provision`).
//!
//! - `bench failover [--runs N] [--json] [--host-agents]`: HA on a two-node
//!   local cluster with the operator and agents (in Podman containers of
//!   Godwit's image unless `--host-agents`): the node running a VM is cut off the
//!   network, and the time from the cut to the guest's first heartbeat on
//!   the other node (its console; the time to the VM reported Running is
//!   shown too) is measured, N times (the VM moves back and forth); median and max (see
//!   `godwit_e2e::failover`).
//!
//! - `bench faults [--json]`: the fault-injection matrix (see
//!   `godwit_e2e::faults`): every fault in PreCopy and in PostCopy (a full
//!   target disk in PreCopy only), each cell checked; a table with cells
//!   passed / total.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use godwit_testkit::guest::{guest_elf, parse_heartbeat};
use serde_json::json;

/// Godwit benchmarks.
#[derive(Parser, Debug)]
#[command(name = "bench")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Boot time to the first heartbeat and memory overhead, godwit-vmm vs QEMU microvm.
    Boot(BootArgs),
    /// Live migration, godwit-vmm vs QEMU/KVM, side by side.
    Migrate(MigrateArgs),
    /// Provisioning from a template (1 GiB and 20 GiB, sparse and full).
    Storage(StorageArgs),
    /// HA failover time: a node cut off until its VM runs on another node.
    Failover(FailoverArgs),
    /// The fault-injection matrix: faults x migration phases, each cell checked.
    Faults(FaultsArgs),
}

#[derive(clap::Args, Debug)]
struct FaultsArgs {
    /// One JSON line per cell and a summary line instead of a table.
    #[arg(long)]
    json: bool,
    /// Run only these cells: a fault (`target-disk-full`) or a fault and a
    /// phase (`link-cut/PostCopy`); repeatable.
    #[arg(long)]
    only: Vec<String>,
}

fn faults(a: FaultsArgs) -> Result<()> {
    use godwit_e2e::faults::{self, Fault, Phase};
    let dir = std::env::temp_dir().join(format!("godwit-bench-faults-{}", std::process::id()));
    let cells: Vec<(Fault, Phase)> = Phase::ALL
        .iter()
        .flat_map(|&p| Fault::ALL.iter().map(move |&f| (f, p)))
        .filter(|&(f, p)| f.applies(p))
        .filter(|&(f, p)| {
            a.only.is_empty()
                || a.only
                    .iter()
                    .any(|o| *o == f.name() || *o == format!("{}/{}", f.name(), p.name()))
        })
        .collect();
    anyhow::ensure!(!cells.is_empty(), "no cell matches --only {:?}", a.only);
    let reports = faults::run(&dir, &cells)?;
    anyhow::ensure!(!reports.is_empty(), "no cell ran");
    let passed = reports.iter().filter(|r| r.passed()).count();
    if a.json {
        for r in &reports {
            let seen = r.outcome.as_ref().ok();
            println!(
                "{}",
                json!({
                    "bench": "faults-cell",
                    "fault": r.fault.name(),
                    "phase": r.phase.name(),
                    "expected": format!("{:?}", r.expected),
                    "outcome": seen.map(|s| format!("{:?}", s.outcome)),
                    "migration_phase": seen.map(|s| s.migration_phase.clone()),
                    "longest_gap_ms": seen.map(|s| s.longest_gap_ms),
                    "settled_ms": seen.map(|s| s.settled_ms),
                    "error": r.outcome.as_ref().err(),
                    "passed": r.passed(),
                })
            );
        }
        println!(
            "{}",
            json!({"bench": "faults", "cells": cells.len(), "ran": reports.len(), "passed": passed})
        );
    } else {
        faults::print(&reports);
    }
    anyhow::ensure!(
        passed == cells.len(),
        "{} of {} cells did not hold or did not run",
        cells.len() - passed,
        cells.len()
    );
    Ok(())
}

#[derive(clap::Args, Debug)]
struct FailoverArgs {
    /// One JSON line instead of a table.
    #[arg(long)]
    json: bool,
    /// Failovers to measure.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Run the node agents as host processes instead of in Podman
    /// containers of Godwit's image (the default, as the DaemonSet runs them).
    #[arg(long)]
    host_agents: bool,
}

fn failover(a: FailoverArgs) -> Result<()> {
    use godwit_e2e::driver::{ClusterDriver, EXAMPLE_TEMPLATE, EXAMPLE_VM};
    anyhow::ensure!(a.runs > 0, "--runs must be at least 1");
    let dir = std::env::temp_dir().join(format!("godwit-bench-failover-{}", std::process::id()));
    let g = if a.host_agents {
        ClusterDriver::up(2, &dir)?
    } else {
        ClusterDriver::up_in_containers(2, &dir)?
    };
    g.apply(&g.example(EXAMPLE_TEMPLATE))?;
    g.apply(&g.example(EXAMPLE_VM))?;
    let mut times = Vec::new();
    if !a.json {
        println!(
            "{:>3}  {:<8} {:<8} {:>10} {:>10} {:>12}  overlap",
            "run", "from", "to", "fenced_ms", "running_ms", "failover_ms"
        );
    }
    for run in 1..=a.runs {
        let f = godwit_e2e::failover::fail_over(&g, "demo")?;
        anyhow::ensure!(!f.overlap, "run {run}: two VMMs of the VM ran at once");
        if !a.json {
            println!(
                "{run:>3}  {:<8} {:<8} {:>10} {:>10} {:>12}  {}",
                f.from, f.to, f.fenced_ms, f.running_ms, f.ms, f.overlap
            );
        }
        times.push(f.ms);
    }
    times.sort_unstable();
    let median = times[times.len() / 2];
    let max = *times.last().expect("at least one run");
    if a.json {
        println!(
            "{}",
            json!({"bench": "failover", "runs": a.runs, "agents": if a.host_agents { "host" } else { "podman" }, "median_ms": median, "max_ms": max})
        );
    } else {
        println!(
            "failover over {} runs: median {median} ms, max {max} ms (target: under 15000 ms)",
            a.runs
        );
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
struct StorageArgs {
    /// One JSON line per template instead of a table.
    #[arg(long)]
    json: bool,
    /// Template sizes in GiB.
    #[arg(long, value_delimiter = ',', default_values_t = [1u64, 20])]
    sizes_gib: Vec<u64>,
    /// Provisioning runs per template (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Scratch directory (default: under the temp dir; removed afterwards).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Skip the storage migration runs.
    #[arg(long)]
    no_migrate: bool,
    /// Only the storage migration runs (no provisioning).
    #[arg(long, conflicts_with = "no_migrate")]
    no_provision: bool,
}

fn storage(a: StorageArgs) -> Result<()> {
    use godwit_e2e::bench::storage::{run, Options, ProvisionResult};
    let opts = Options {
        sizes_gib: a.sizes_gib,
        runs: a.runs,
        dir: a.dir,
    };
    let mut short = false;
    if !a.no_provision && !a.json {
        println!("{}", ProvisionResult::header());
    }
    if !a.no_provision {
        run(
            &opts,
            |r| {
                if a.json {
                    println!("{}", r.to_json_line());
                } else {
                    println!("{}", r.row());
                }
            },
            |n| {
                short = true;
                eprintln!("bench storage: note: {n}")
            },
        )?;
    }
    if short && !a.json {
        println!("(* smaller than asked: not enough free disk; see the note above)");
    }
    if a.no_migrate {
        return Ok(());
    }
    use godwit_e2e::bench::storage_migrate::{run as migrate, StorageMigrateResult};
    let vmm = godwit_e2e::bench::migrate::vmm_binary(None)?;
    let guest = godwit_testkit::guest::guest_elf()?;
    if !a.json {
        println!();
        println!("{}", StorageMigrateResult::header());
    }
    migrate(&vmm, &guest, |r| {
        if a.json {
            println!("{}", r.to_json_line());
        } else {
            println!("{}", r.row());
        }
        if r.verified.0 < r.verified.1 {
            eprintln!(
                "bench storage: the target's disk failed {} of {} checks after a migration",
                r.verified.1 - r.verified.0,
                r.verified.1
            );
        }
    })
}

#[derive(clap::Args, Debug)]
struct MigrateArgs {
    /// JSON lines instead of a table: one per run (`migrate-run`) and one
    /// per engine, config, scenario and link (`migrate`: median, min, max).
    #[arg(long)]
    json: bool,
    /// Only the unlimited link, 3 runs a cell.
    #[arg(long)]
    quick: bool,
    /// godwit-vmm binary (default: target/release/godwit-vmm, built if missing).
    #[arg(long)]
    vmm: Option<PathBuf>,
    /// Only scenarios whose name contains this.
    #[arg(long)]
    scenario: Option<String>,
    /// Only this link.
    #[arg(long, value_parser = ["unlimited", "1gbit"])]
    link: Option<String>,
    /// Only this engine (godwit or qemu; godwit-tls: ours over mutual TLS).
    #[arg(long)]
    engine: Option<String>,
    /// Completion timeout of one migration, seconds (25: three times what a
    /// 1 GiB guest takes to cross the 1 Gbit/s link).
    #[arg(long, default_value_t = 25)]
    timeout_s: u64,
    /// Runs of each cell (each QEMU variant too); default 5, 3 with --quick.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    runs: Option<u64>,
    /// The pause both engines aim at: Godwit's max_downtime_ms, QEMU best's downtime-limit.
    #[arg(long, default_value_t = 50)]
    max_downtime_ms: u64,
}

fn migrate(a: MigrateArgs) -> Result<()> {
    use godwit_e2e::bench::migrate::{run, Cell, Options};
    let opts = Options {
        quick: a.quick,
        vmm: a.vmm,
        scenario: a.scenario,
        link: a.link,
        engine: a.engine,
        timeout: Duration::from_secs(a.timeout_s),
        runs: a.runs.unwrap_or(if a.quick { 3 } else { 5 }) as usize,
        max_downtime_ms: a.max_downtime_ms,
    };
    if !a.json {
        println!("{}", Cell::header());
    }
    run(
        &opts,
        |r| {
            if a.json {
                println!("{}", r.to_json_line());
            } else {
                let pause = r
                    .observed_pause_ms
                    .map_or("-".into(), |p| format!("{p:.1} ms"));
                eprintln!(
                    "bench migrate: {} {} {} {}: {} pause {pause}{}",
                    r.engine,
                    r.mode,
                    r.scenario,
                    r.link,
                    if r.converged {
                        "converged"
                    } else {
                        "did not converge"
                    },
                    r.error
                        .as_ref()
                        .map(|e| format!(" ({e})"))
                        .unwrap_or_default()
                );
            }
        },
        |c| {
            if a.json {
                println!("{}", c.to_json_line());
            } else {
                println!("{}", c.row());
            }
        },
    )?;
    Ok(())
}

#[derive(clap::Args, Debug)]
struct BootArgs {
    /// Runs per engine (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 128)]
    memory_mib: u64,
    /// One JSON object per engine instead of a table.
    #[arg(long)]
    json: bool,
    /// godwit-vmm binary (default: built with `cargo build --release -p godwit-node`).
    #[arg(long)]
    vmm: Option<PathBuf>,
    /// Only this engine (godwit or qemu).
    #[arg(long)]
    engine: Option<String>,
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Boot(a) => boot(a),
        Cmd::Migrate(a) => migrate(a),
        Cmd::Storage(a) => storage(a),
        Cmd::Failover(a) => failover(a),
        Cmd::Faults(a) => faults(a),
    }
}

/// One boot: ms from spawn to the first heartbeat line, and RSS beyond the
/// guest RAM mapping (KiB) sampled right after it.
struct Sample {
    boot_ms: f64,
    rss_overhead_kib: u64,
}

/// Resident KiB of the whole process and of its largest mapping of at
/// least `ram_kib` (the guest RAM).
fn rss_split(pid: u32, ram_kib: u64) -> Result<(u64, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let mut total = 0;
    let mut guest = 0;
    let mut size = 0;
    for line in smaps.lines() {
        let mut w = line.split_whitespace();
        match w.next() {
            Some("Size:") => size = w.next().unwrap_or("0").parse().unwrap_or(0),
            Some("Rss:") => {
                let rss: u64 = w.next().unwrap_or("0").parse().unwrap_or(0);
                total += rss;
                if size >= ram_kib && size <= ram_kib + 16 * 1024 {
                    guest += rss;
                }
            }
            _ => {}
        }
    }
    Ok((total, guest))
}

fn run_once(mut cmd: Command, ram_kib: u64) -> Result<Sample> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let start = Instant::now();
    let mut child: Child = cmd.spawn().context("spawn engine")?;
    let out = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { return };
            if parse_heartbeat(line.trim_end()).is_some() {
                let _ = tx.send(Instant::now());
                return;
            }
        }
    });
    let first = rx.recv_timeout(Duration::from_secs(60));
    let result = match first {
        Ok(at) => {
            // Let the process settle for a moment, then sample memory.
            std::thread::sleep(Duration::from_millis(200));
            let (total, guest) = rss_split(child.id(), ram_kib).unwrap_or((0, 0));
            Ok(Sample {
                boot_ms: (at - start).as_secs_f64() * 1000.0,
                rss_overhead_kib: total.saturating_sub(guest),
            })
        }
        Err(_) => Err(anyhow::anyhow!("no heartbeat within 60 s")),
    };
    let _ = child.kill();
    let _ = child.wait();
    result
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn engine_cmd(engine: &str, vmm: &Path, elf: &Path, mib: u64) -> Command {
    // hb_ms=1: the first heartbeat comes 1 ms after the guest is ready.
    let append = "hb_ms=1";
    match engine {
        "godwit" => {
            let mut c = Command::new(vmm);
            c.arg("--kernel")
                .arg(elf)
                .args(["--memory-mib", &mib.to_string(), "--cmdline", append])
                .args(["--serial-log", "/dev/stdout"]);
            c
        }
        _ => {
            let mut c = Command::new("qemu-system-x86_64");
            c.args(["-enable-kvm", "-M", "microvm", "-m", &mib.to_string()])
                .args(["-nodefaults", "-no-user-config", "-display", "none"])
                .args(["-serial", "stdio", "-kernel"])
                .arg(elf)
                .args(["-append", append]);
            c
        }
    }
}

fn boot(a: BootArgs) -> Result<()> {
    let elf = guest_elf().context("build the test guest")?;
    let engines: Vec<&str> = match a.engine.as_deref() {
        Some(e) => vec![if e == "qemu" { "qemu" } else { "godwit" }],
        None => vec!["godwit", "qemu"],
    };
    let vmm = if engines.contains(&"godwit") {
        godwit_e2e::bench::migrate::vmm_binary(a.vmm.clone())?
    } else {
        PathBuf::new()
    };
    let ram_kib = a.memory_mib * 1024;
    if !a.json {
        println!(
            "{:<8} {:>5} {:>15} {:>12} {:>12} {:>17}",
            "engine", "runs", "boot_ms_median", "boot_ms_min", "boot_ms_max", "rss_overhead_kib"
        );
    }
    for engine in engines {
        let mut boots = Vec::new();
        let mut rss = Vec::new();
        for _ in 0..a.runs.max(1) {
            let s = run_once(engine_cmd(engine, &vmm, &elf, a.memory_mib), ram_kib)
                .with_context(|| format!("{engine} boot"))?;
            boots.push(s.boot_ms);
            rss.push(s.rss_overhead_kib as f64);
        }
        let min = boots.iter().cloned().fold(f64::INFINITY, f64::min);
        let max = boots.iter().cloned().fold(0.0, f64::max);
        let med = median(&mut boots);
        let rss_med = median(&mut rss) as u64;
        if a.json {
            println!(
                "{}",
                json!({
                    "bench": "boot",
                    "engine": engine,
                    "runs": a.runs.max(1),
                    "boot_ms_median": (med * 10.0).round() / 10.0,
                    "rss_overhead_kib": rss_med,
                })
            );
        } else {
            println!(
                "{:<8} {:>5} {:>15.1} {:>12.1} {:>12.1} {:>17}",
                engine,
                a.runs.max(1),
                med,
                min,
                max,
                rss_med
            );
        }
    }
    Ok(())
}
