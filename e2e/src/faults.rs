//! The fault-injection matrix: one migration per cell, a fault injected
//! when the migration reaches the cell's phase, and what a user must be
//! able to rely on checked afterwards.
//!
//! Every cell runs the example VM (shared disk, a 128 MiB memory workload)
//! on a two-node local cluster, writes a disk pattern, starts a
//! VMMigration whose policy holds it in the cell's phase for seconds (a
//! bandwidth cap below the guest's dirty rate), and injects the fault as
//! soon as a watch on the VMMigration shows that phase. Then, whatever the
//! outcome:
//!
//! - at no sample (every 20 ms, over both nodes' VM directories) does a
//!   restarted VMM run next to the migration's source or target VMM, nor do
//!   two VMMs run once the migration is over and the VM settled; the
//!   longest time with no VMM at all is reported (the HA restart time when
//!   the VM had to be restarted);
//! - the VMMigration ends, and its status says how;
//! - the VM is Running once more; its guest's memory check (`memcheck`)
//!   passes and the disk pattern verifies;
//! - the outcome is the one written down for the cell ([`expected`]).
//!
//! Faults and what each cell expects:
//!
//! | fault | PreCopy | PostCopy |
//! |---|---|---|
//! | source VMM killed | restarted (runStrategy) | restarted: the target lacks pages only the source had |
//! | target VMM killed | stays on the source | restarted: the guest ran only there; the paused source, whose copy is stale, exits as failed a few seconds later |
//! | source agent killed (back after 2 s) | moves to the target: the VMMs carry on, the new agent follows | moves |
//! | target agent killed (back after 2 s) | moves | moves |
//! | operator killed (back after 2 s) | moves: the agents finish, the operator settles the VM when back | moves |
//! | migration link cut for 4 s | moves: TCP retransmits, shorter than the stall timeout | moves (the target's vCPUs wait for pages meanwhile) |
//! | link slowed to 4 Mbit/s for 6 s | moves | moves |
//! | target disk full (VM on `storage: Local` moved with `storage: Copy`: 40 MiB written, 32 MiB of room) | stays on the source; the VMMigration says "No space left on device" | — (disks are copied before post-copy) |
//!
//! (A cut of the node's whole link longer than its Lease — 8 s — is a lost
//! node: it fences itself and HA restarts its VMs, see `e2e/tests/ha.rs`. A
//! post-copy migration whose link alone is lost for longer than the stall
//! timeout reconnects: `node-daemon/tests/migrate.rs`
//! `link_cut_during_post_copy_resumes_when_the_link_returns`.)
//!
//! Not injected here: `PreparingTarget` (it lasts well under a second once
//! the target agent answers), `StopAndCopy` and `Committing` (tens of
//! milliseconds); their failures are covered at the daemon level
//! (`node-daemon/tests/migrate.rs`: target abort, commit without answer;
//! `node-daemon/tests/storage_migrate.rs`: a full target disk).
//!
//! Between cells the harness deletes the VM and its migrations and waits
//! for its VMMs to end; whatever does not go so is removed by force
//! ([`force_clean`]: processes, taps, cgroups, VM directories, finalizers)
//! and the cell that left it fails, so one bad cell does not fail the rest.
//!
//! The whole matrix is `cargo run --release -p godwit-e2e --bin bench --
//! faults` (about 6 minutes); the suite runs a quick subset
//! (`e2e/tests/faults.rs`).

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

use godwit_testkit::process::alive;

use crate::driver::{type_at, ClusterDriver, EXAMPLE_TEMPLATE, EXAMPLE_VM};
use crate::vmm_watch::{processes_naming, vmm_pid, Sampler};

/// What goes wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL to the source VMM.
    SourceVmmKilled,
    /// SIGKILL to the target VMM.
    TargetVmmKilled,
    /// The source node's agent killed, restarted 2 s later.
    SourceAgentKilled,
    /// The target node's agent killed, restarted 2 s later.
    TargetAgentKilled,
    /// The operator killed, restarted 2 s later.
    OperatorKilled,
    /// The target node's link down for 4 s.
    LinkCut,
    /// The target node's link at 4 Mbit/s for 6 s.
    LinkSlowed,
    /// The target node's VM storage too small: the VM is on `storage:
    /// Local` and moves with `storage: Copy`; its guest wrote 40 MiB to its
    /// disk, and the target's `<state-dir>/vms` is a 32 MiB tmpfs, so the
    /// copy runs out of space in PreCopy.
    TargetDiskFull,
}

impl Fault {
    /// Every fault, in table order.
    pub const ALL: [Fault; 8] = [
        Fault::SourceVmmKilled,
        Fault::TargetVmmKilled,
        Fault::SourceAgentKilled,
        Fault::TargetAgentKilled,
        Fault::OperatorKilled,
        Fault::LinkCut,
        Fault::LinkSlowed,
        Fault::TargetDiskFull,
    ];

    /// Whether the fault can strike in `phase`: disks are copied before
    /// post-copy starts, so a full target disk is a pre-copy cell only.
    pub fn applies(self, phase: Phase) -> bool {
        !(self == Fault::TargetDiskFull && phase == Phase::PostCopy)
    }

    /// A short name.
    pub fn name(self) -> &'static str {
        match self {
            Fault::SourceVmmKilled => "source-vmm-killed",
            Fault::TargetVmmKilled => "target-vmm-killed",
            Fault::SourceAgentKilled => "source-agent-killed",
            Fault::TargetAgentKilled => "target-agent-killed",
            Fault::OperatorKilled => "operator-killed",
            Fault::LinkCut => "link-cut",
            Fault::LinkSlowed => "link-slowed",
            Fault::TargetDiskFull => "target-disk-full",
        }
    }
}

/// The migration phase a fault is injected in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Memory copied while the guest runs on the source.
    PreCopy,
    /// The guest runs on the target, pages still arriving.
    PostCopy,
}

impl Phase {
    /// Both phases.
    pub const ALL: [Phase; 2] = [Phase::PreCopy, Phase::PostCopy];

    /// As `status.phase` says it.
    pub fn name(self) -> &'static str {
        match self {
            Phase::PreCopy => "PreCopy",
            Phase::PostCopy => "PostCopy",
        }
    }

    /// A policy that keeps the migration in this phase for seconds: the
    /// guest dirties about 40 MB/s.
    fn policy(self) -> &'static str {
        match self {
            // Auto-converge brings it home after a few throttled rounds.
            Phase::PreCopy => "    bandwidthMbps: 300\n    maxDowntimeMs: 100\n    allowPostCopy: false\n    allowAutoConverge: true\n    completionTimeoutSeconds: 90\n",
            // Never converges: post-copy after the first rounds.
            Phase::PostCopy => "    bandwidthMbps: 200\n    maxDowntimeMs: 10\n    allowPostCopy: true\n    allowAutoConverge: false\n    completionTimeoutSeconds: 90\n",
        }
    }
}

/// Where the VM runs afterwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// On the source, the same VMM process: the migration failed or was
    /// cancelled and the guest never stopped there.
    StaysOnSource,
    /// On the target: the migration succeeded.
    MovesToTarget,
    /// A new VMM (either node) booted it again: its memory was lost, its
    /// disk was not.
    Restarted,
}

/// The outcome written down for a cell (see the module's table).
pub fn expected(fault: Fault, phase: Phase) -> Outcome {
    match (fault, phase) {
        (Fault::SourceVmmKilled, _) => Outcome::Restarted,
        (Fault::TargetDiskFull, _) => Outcome::StaysOnSource,
        (Fault::TargetVmmKilled, Phase::PreCopy) => Outcome::StaysOnSource,
        (Fault::TargetVmmKilled, Phase::PostCopy) => Outcome::Restarted,
        _ => Outcome::MovesToTarget,
    }
}

/// What one cell did.
#[derive(Clone, Debug)]
pub struct CellReport {
    /// The fault.
    pub fault: Fault,
    /// The phase it was injected in.
    pub phase: Phase,
    /// What the table expects.
    pub expected: Outcome,
    /// What happened, or why the cell could not run or check.
    pub outcome: Result<Seen, String>,
}

impl CellReport {
    /// The cell held: it ran, every check passed, the outcome was expected.
    pub fn passed(&self) -> bool {
        self.outcome
            .as_ref()
            .is_ok_and(|s| s.outcome == self.expected)
    }
}

/// What a cell saw.
#[derive(Clone, Debug)]
pub struct Seen {
    /// Where the VM ended up.
    pub outcome: Outcome,
    /// The VMMigration's final phase.
    pub migration_phase: String,
    /// Its `failureReason`, if any.
    pub reason: String,
    /// The longest time no VMM of the VM ran, ms.
    pub longest_gap_ms: u64,
    /// From the fault to the VM Running again, settled, ms.
    pub settled_ms: u64,
}

/// How long the VM must run on the same VMM to count as settled.
const STABLE: Duration = Duration::from_secs(5);

/// How long a VM may be down after a fault: HA's failover budget.
pub const MAX_GAP: Duration = Duration::from_secs(30);

/// Runs `cells` on a fresh two-node cluster in `dir`, each node's agent in
/// a Podman container of Godwit's image, as the DaemonSet runs it: an
/// agent-kill cell kills the container (`podman kill`), and its VMMs, in
/// cgroups of their own, live on.
pub fn run(dir: &std::path::Path, cells: &[(Fault, Phase)]) -> anyhow::Result<Vec<CellReport>> {
    let mut g = ClusterDriver::up_in_containers(2, dir)?;
    g.apply(&g.example(EXAMPLE_TEMPLATE))?;
    let mut reports = Vec::new();
    for (n, &(fault, phase)) in cells.iter().enumerate() {
        let outcome = cell(&mut g, n, fault, phase).map_err(|e| format!("{e:#}"));
        let report = CellReport {
            fault,
            phase,
            expected: expected(fault, phase),
            outcome,
        };
        reports.push(report);
        // Whatever the cell left, the next one starts clean: what does not
        // go by itself is removed by force ([`force_clean`]), and the cell
        // that left it fails. Only a node that cannot be cleaned stops the
        // matrix.
        let cleaned = cleanup(&mut g).and_then(|()| {
            // A VMM whose directory is gone escapes `cleanup`'s pid files.
            force_clean(&mut g)
        });
        if let Err(e) = cleaned {
            let last = reports.last_mut().expect("just pushed");
            let why = format!("cleaning up after the cell: {e:#}");
            if let Err(e) = force_clean(&mut g) {
                last.outcome = Err(format!(
                    "{why}; the node could not be cleaned, the matrix stops: {e:#}"
                ));
                break;
            }
            last.outcome = Err(why);
        }
    }
    Ok(reports)
}

/// Prints the matrix as a table with a `passed / total` line.
pub fn print(reports: &[CellReport]) {
    println!(
        "{:<20} {:<9} {:<14} {:<14} {:<10} {:>7} {:>8}  note",
        "fault", "phase", "expected", "outcome", "migration", "gap_ms", "back_ms"
    );
    for r in reports {
        match &r.outcome {
            Ok(s) => println!(
                "{:<20} {:<9} {:<14} {:<14} {:<10} {:>7} {:>8}  {}{}",
                r.fault.name(),
                r.phase.name(),
                format!("{:?}", r.expected),
                format!("{:?}", s.outcome),
                s.migration_phase,
                s.longest_gap_ms,
                s.settled_ms,
                if r.passed() { "" } else { "UNEXPECTED " },
                s.reason
            ),
            Err(e) => println!(
                "{:<20} {:<9} {:<14} {:<14} {:<10} {:>7} {:>8}  FAILED: {e}",
                r.fault.name(),
                r.phase.name(),
                format!("{:?}", r.expected),
                "-",
                "-",
                "-",
                "-"
            ),
        }
    }
    let passed = reports.iter().filter(|r| r.passed()).count();
    println!("cells passed: {passed} / {}", reports.len());
}

/// Kills the VMM process itself, as the OOM killer or a crash would: the
/// `pid` file names the agent's wrapper shell (the session leader), whose
/// child is the VMM; the wrapper then records the exit as usual.
fn kill_vmm(wrapper: i32) {
    let children = std::fs::read_to_string(format!("/proc/{wrapper}/task/{wrapper}/children"))
        .unwrap_or_default();
    let vmms: Vec<i32> = children
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    for pid in if vmms.is_empty() { vec![wrapper] } else { vmms } {
        // SAFETY: kill(2) on a process of the VM's session.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

fn migration_yaml(name: &str, phase: Phase, copy_disks: bool) -> String {
    format!(
        "apiVersion: godwit.dev/v1alpha1\nkind: VMMigration\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  vmName: demo\n{}  policy:\n{}",
        if copy_disks { "  storage: Copy\n" } else { "" },
        phase.policy()
    )
}

/// The size of the tmpfs a [`Fault::TargetDiskFull`] cell puts over the
/// target's VM storage.
const SMALL_DISK: &str = "32m";

/// Mounts a [`SMALL_DISK`] tmpfs over node `k`'s `<state-dir>/vms`, and
/// restarts its agent: `ip netns exec` gives each agent a copy of the
/// mounts as they were when it started.
fn mount_small_disk(g: &mut ClusterDriver, k: usize) -> anyhow::Result<std::path::PathBuf> {
    let vms = g.cluster.node_state_dir(k).join("vms");
    std::fs::create_dir_all(&vms)?;
    let out = std::process::Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            &format!("size={SMALL_DISK},mode=0755"),
            "godwit-small",
        ])
        .arg(&vms)
        .output()?;
    if !out.status.success() {
        bail!(
            "mount a tmpfs on {}: {}",
            vms.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    g.cluster.kill_agent(k);
    g.cluster.start_agent(k)?;
    Ok(vms)
}

/// Undoes [`mount_small_disk`] on every node where it is mounted (lazily:
/// a process still holding a file there keeps it until it lets go), and
/// restarts that node's agent, so that it sees the node's storage again.
fn unmount_small_disks(g: &mut ClusterDriver) -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for k in 0..2 {
        let vms = g.cluster.node_state_dir(k).join("vms");
        let at = format!(" {} ", vms.display());
        if mounts
            .lines()
            .any(|l| l.contains(&at) && l.contains("godwit-small"))
        {
            let Ok(path) = std::ffi::CString::new(vms.as_os_str().as_encoded_bytes()) else {
                continue;
            };
            // SAFETY: umount2 on a path we mounted.
            unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
            g.cluster.kill_agent(k);
            g.cluster.start_agent(k)?;
        }
    }
    Ok(())
}

/// A place in a console log: its file (inode) and length.
type Mark = (u64, usize);

/// The console log from `from` on (all of it if it is another file now:
/// the VM's directory was removed and made again).
fn console_since(dir: &std::path::Path, from: Mark) -> String {
    use std::os::unix::fs::MetadataExt;
    let path = dir.join("console.log");
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let same = std::fs::metadata(&path).is_ok_and(|m| m.ino() == from.0);
    match text.get(from.1..) {
        Some(rest) if same => rest.to_string(),
        _ => text,
    }
}

fn console_len(dir: &std::path::Path) -> Mark {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir.join("console.log")).map_or((0, 0), |m| (m.ino(), m.len() as usize))
}

/// Types `line` at the console of the VM in `dir` and waits for `ok` (or
/// fails on `bad`) in what the console prints after it.
fn ask(
    g: &ClusterDriver,
    dir: &std::path::Path,
    line: &str,
    ok: &str,
    bad: &str,
) -> anyhow::Result<()> {
    let from = console_len(dir);
    type_at(dir, line)?;
    g.wait(
        &format!("{ok:?} after {line:?}"),
        Duration::from_secs(60),
        || {
            let out = console_since(dir, from);
            if let Some(at) = out.find(bad) {
                bail!("{line:?}: {}", out[at..].lines().next().unwrap_or(""));
            }
            Ok(out.contains(ok).then_some(()))
        },
    )
    .map_err(|e| {
        let tail = |f: &str| {
            let text = std::fs::read_to_string(dir.join(f)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(8)..].join("\n")
        };
        e.context(format!(
            "console ends:\n{}\nvmm.log ends:\n{}",
            tail("console.log"),
            tail("vmm.log")
        ))
    })
}

/// What undoes a fault (restarts a process, restores a link).
type Repair = Box<dyn FnOnce(&mut ClusterDriver) -> anyhow::Result<()>>;

fn cell(g: &mut ClusterDriver, n: usize, fault: Fault, phase: Phase) -> anyhow::Result<Seen> {
    let copy_disks = fault == Fault::TargetDiskFull;
    let manifest = g.example(EXAMPLE_VM);
    let manifest = if copy_disks {
        manifest.replace("storage: Shared", "storage: Local")
    } else {
        manifest
    };
    g.apply(&manifest)?;
    let vm = g.wait_running("demo", Duration::from_secs(90))?;
    let from = vm["status"]["nodeName"]
        .as_str()
        .context("a Running VM has a node")?
        .to_string();
    let i = g.node_index(&from)?;
    let j = 1 - i;
    let dirs = [
        g.vm_dir(0, "default", "demo"),
        g.vm_dir(1, "default", "demo"),
    ];
    g.wait("heartbeats", Duration::from_secs(30), || {
        Ok(console_since(&dirs[i], (0, 0))
            .contains("HB 70 ")
            .then_some(()))
    })?;
    let seed = 100 + n;
    ask(
        g,
        &dirs[i],
        &format!("blkwrite 2048 64 {seed}"),
        "BLK write ok sector=2048",
        "BLK write bad",
    )?;
    let src_pid = vmm_pid(&dirs[i]).context("the source VMM's pid")?;
    if fault == Fault::TargetDiskFull {
        // More than the target has room for.
        ask(
            g,
            &dirs[i],
            &format!("blkwrite 8192 81920 {}", seed + 50),
            "BLK write ok sector=8192",
            "BLK write bad",
        )?;
        mount_small_disk(g, j)?;
    }

    let name = format!("fault-{n}");
    g.apply(&migration_yaml(&name, phase, copy_disks))?;
    let watch = g.watch("gvmm", &name)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let Some(m) = watch.next(Duration::from_millis(500))? else {
            if Instant::now() > deadline {
                bail!("the migration did not reach {} in 60 s", phase.name());
            }
            continue;
        };
        let at = m["status"]["phase"].as_str().unwrap_or("");
        if at == phase.name() {
            break;
        }
        // A full disk is in place before the migration starts: it may
        // end it before the source's agent has reported PreCopy.
        if matches!(at, "Succeeded" | "Failed" | "Cancelled") && fault == Fault::TargetDiskFull {
            break;
        }
        if matches!(at, "Succeeded" | "Failed" | "Cancelled") {
            bail!(
                "the migration ended ({at}: {}) before reaching {}",
                m["status"]["failureReason"],
                phase.name()
            );
        }
    }
    drop(watch);

    // Inject, and schedule the repair. The VMMs of the migration: the
    // source and the incoming one; a VMM started later is a restart.
    let before: Vec<i32> = [Some(src_pid), vmm_pid(&dirs[j])]
        .into_iter()
        .flatten()
        .collect();
    let at_fault = [console_len(&dirs[0]), console_len(&dirs[1])];
    let t0 = Instant::now();
    let repair: Option<(Duration, Repair)> = match fault {
        Fault::SourceVmmKilled => {
            kill_vmm(src_pid);
            None
        }
        Fault::TargetVmmKilled => {
            let pid = vmm_pid(&dirs[j]).context("the target VMM's pid")?;
            kill_vmm(pid);
            None
        }
        Fault::SourceAgentKilled | Fault::TargetAgentKilled => {
            let k = if fault == Fault::SourceAgentKilled {
                i
            } else {
                j
            };
            g.cluster.kill_agent(k);
            Some((
                Duration::from_secs(2),
                Box::new(move |g: &mut ClusterDriver| Ok(g.cluster.start_agent(k)?)),
            ))
        }
        Fault::OperatorKilled => {
            g.cluster.kill_operator();
            Some((
                Duration::from_secs(2),
                Box::new(|g: &mut ClusterDriver| Ok(g.cluster.start_operator()?)),
            ))
        }
        Fault::LinkCut => {
            g.cluster.fabric.nodes[j].cut()?;
            Some((
                Duration::from_secs(4),
                Box::new(move |g: &mut ClusterDriver| {
                    let node = &g.cluster.fabric.nodes[j];
                    Ok(node.ns.restore(&node.uplink)?)
                }),
            ))
        }
        // In place before the migration started; it strikes now.
        Fault::TargetDiskFull => None,
        Fault::LinkSlowed => {
            let fabric = &g.cluster.fabric;
            fabric.nodes[j].shape(fabric, "4mbit")?;
            Some((
                Duration::from_secs(6),
                Box::new(move |g: &mut ClusterDriver| {
                    let fabric = &g.cluster.fabric;
                    Ok(fabric.nodes[j].unshape(fabric)?)
                }),
            ))
        }
    };

    // Watch both nodes until the migration is over and the VM runs again:
    // a sampler thread looks at the VMM processes every 10 ms, undisturbed
    // by the API reads here.
    let watcher = Sampler::start(dirs.clone(), before, MAX_GAP);
    // Settled: the migration over, the VM Running with one VMM, the same
    // one for STABLE (a source that lost its guest in post-copy exits a
    // few seconds after the migration failed).
    let mut stable: Option<(usize, i32, Instant)> = None;
    let result = (|| -> anyhow::Result<(Value, Value, Instant)> {
        let mut repair = repair;
        loop {
            if repair
                .as_ref()
                .is_some_and(|(after, _)| t0.elapsed() >= *after)
            {
                let (_, fix) = repair.take().expect("checked");
                fix(g)?;
            }
            watcher.check()?;
            if repair.is_none() {
                let m = g.get("gvmm", &name)?.context("the VMMigration")?;
                let v = g.get("gvm", "demo")?.context("the VM")?;
                let final_phase = matches!(
                    m["status"]["phase"].as_str(),
                    Some("Succeeded" | "Failed" | "Cancelled")
                );
                let over = final_phase && v["status"]["migration"].is_null();
                let on = v["status"]["nodeName"].as_str().unwrap_or("");
                let mut candidate = None;
                if over && v["status"]["phase"] == "Running" && !on.is_empty() {
                    let k = g.node_index(on)?;
                    if watcher.live() == [k] {
                        candidate = vmm_pid(&dirs[k]).map(|pid| (k, pid));
                    }
                }
                stable = match (candidate, stable) {
                    (Some((k, pid)), Some((k0, pid0, since))) if (k, pid) == (k0, pid0) => {
                        Some((k, pid, since))
                    }
                    (Some((k, pid)), _) => Some((k, pid, Instant::now())),
                    (None, _) => None,
                };
                if let Some((_, _, since)) = stable.filter(|s| s.2.elapsed() >= STABLE) {
                    // From now on one VMM only: the losing one has had
                    // its chance to exit.
                    watcher.migration_over();
                    break Ok((m, v, since));
                }
            }
            if t0.elapsed() > Duration::from_secs(150) {
                bail!(
                    "not settled 150 s after the fault; logs in {}",
                    g.cluster.log_dir().display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })();
    let (mig, vm, settled_at) = match result {
        Ok(r) => r,
        Err(e) => {
            drop(watcher);
            return Err(e);
        }
    };
    let settled_ms = settled_at.duration_since(t0).as_millis() as u64;
    let on = vm["status"]["nodeName"].as_str().unwrap_or("").to_string();
    let k = g.node_index(&on)?;
    let pid = vmm_pid(&dirs[k]).context("the VMM's pid")?;
    let migration_phase = mig["status"]["phase"].as_str().unwrap_or("").to_string();
    let outcome = if k == i && pid == src_pid {
        Outcome::StaysOnSource
    } else if k == j && migration_phase == "Succeeded" {
        Outcome::MovesToTarget
    } else {
        Outcome::Restarted
    };
    // The guest: memory intact (a restarted guest's check is trivially
    // fresh), disk pattern there.
    // Heartbeats printed since the fault; a rebooted guest takes console
    // input only once it is READY.
    let since = at_fault[k];
    let fresh = if outcome == Outcome::Restarted {
        "READY"
    } else {
        "HB "
    };
    g.wait("the guest's console", Duration::from_secs(30), || {
        let out = console_since(&dirs[k], since);
        Ok((out.contains(fresh) && out.contains("HB ")).then_some(()))
    })
    .with_context(|| {
        let out = console_since(&dirs[k], since);
        let head: String = out.lines().take(5).collect::<Vec<_>>().join(" | ");
        format!(
            "{outcome:?} on {on} (pid {pid}, source pid {src_pid}), {} bytes of console since the fault: {head}",
            out.len()
        )
    })?;
    ask(g, &dirs[k], "memcheck", "MEMCHECK ok", "MEMCHECK bad")?;
    ask(
        g,
        &dirs[k],
        &format!("blkverify 2048 64 {seed}"),
        "BLK verify ok sector=2048",
        "BLK verify bad",
    )?;
    // A second VMM appearing during the guest checks counts too.
    std::thread::sleep(Duration::from_millis(200));
    let longest_gap = watcher.stop()?;
    let reason = mig["status"]["failureReason"]
        .as_str()
        .unwrap_or("")
        .to_string();
    if fault == Fault::TargetDiskFull && !reason.contains("No space left") {
        bail!("the VMMigration ended {migration_phase} without saying the target disk is full: {reason:?}");
    }
    // No fault here makes the target node lost, so a VM given back to the
    // source was released by the target's agent first.
    if migration_phase != "Succeeded" && mig["status"]["targetReleased"] != true {
        bail!("the VMMigration ended {migration_phase} and the VM went back to the source without the target releasing it");
    }
    Ok(Seen {
        outcome,
        migration_phase,
        reason,
        longest_gap_ms: longest_gap.as_millis() as u64,
        settled_ms,
    })
}

/// Deletes the VM and its migrations, restores every process and link, and
/// waits until no VMM of the VM is left.
fn cleanup(g: &mut ClusterDriver) -> anyhow::Result<()> {
    g.cluster.ensure_running()?;
    for k in 0..2 {
        let node = &g.cluster.fabric.nodes[k];
        let _ = node.ns.restore(&node.uplink);
        let _ = node.unshape(&g.cluster.fabric);
    }
    let _ = g.kubectl(&["delete", "gvmm", "--all", "--wait=false"], None);
    let _ = g.kubectl(&["delete", "gvm", "demo", "--wait=false"], None);
    let dirs = [
        g.vm_dir(0, "default", "demo"),
        g.vm_dir(1, "default", "demo"),
    ];
    g.wait(
        "the VM and its migrations gone",
        Duration::from_secs(90),
        || {
            let gone = g.get("gvm", "demo")?.is_none()
                && g.kubectl(&["get", "gvmm", "-o", "name"], None)?
                    .trim()
                    .is_empty();
            let quiet = dirs.iter().all(|d| !vmm_pid(d).is_some_and(alive));
            Ok((gone && quiet).then_some(()))
        },
    )
    .with_context(|| {
        let vm = g.get("gvm", "demo").ok().flatten().map(|v| {
            format!(
                "VM phase {} on {}, finalizers {}, deleting {}",
                v["status"]["phase"],
                v["status"]["nodeName"],
                v["metadata"]["finalizers"],
                v["metadata"]["deletionTimestamp"]
            )
        });
        let columns = "custom-columns=N:.metadata.name,P:.status.phase,F:.metadata.finalizers";
        let migs = g
            .kubectl(&["get", "gvmm", "-o", columns, "--no-headers"], None)
            .unwrap_or_default();
        let pids: Vec<Option<i32>> = dirs
            .iter()
            .map(|d| vmm_pid(d).filter(|&p| alive(p)))
            .collect();
        format!("left: {vm:?}; migrations: {}; VMMs: {pids:?}", migs.trim())
    })?;
    unmount_small_disks(g)
}

/// Removes by force what a cell left that [`cleanup`] could not: every
/// process of the VM on either node (its cgroup's, and any naming its VM
/// directory: an orphaned incoming VMM), its taps, its cgroups, its VM
/// directories, and the VM and its migrations (finalizers dropped). Then
/// checks that nothing is left and that the agents and operator run.
pub fn force_clean(g: &mut ClusterDriver) -> anyhow::Result<()> {
    use godwit_node::agent::cgroup::{self, Cgroups};
    for k in 0..2 {
        let dir = g.vm_dir(k, "default", "demo");
        let cgroups = Cgroups::new(
            std::path::Path::new(cgroup::DEFAULT_ROOT),
            &g.cluster.node_cgroup_parent(k),
            0,
        )?;
        let mut pids = cgroups.procs("default", "demo");
        pids.extend(processes_naming(&dir));
        pids.extend(vmm_pid(&dir).filter(|&p| alive(p)));
        for &pid in &pids {
            // SAFETY: kill(2) on a VMM (or its wrapper) of this test's cluster.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while pids.iter().any(|&p| alive(p)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        cgroups.remove("default", "demo");
        let tap = godwit_node::agent::vm_dir::tap_name("default", "demo", 0);
        let _ = g.cluster.fabric.nodes[k].ns.ip(&["link", "del", &tap]);
        let _ = std::fs::remove_dir_all(&dir);
    }
    let unfinalize = r#"{"metadata":{"finalizers":null}}"#;
    let names = g
        .kubectl(&["get", "gvmm", "-o", "name"], None)
        .unwrap_or_default();
    for m in names.lines().filter(|l| !l.is_empty()) {
        let _ = g.kubectl(&["patch", m, "--type=merge", "-p", unfinalize], None);
        let _ = g.kubectl(&["delete", m, "--wait=false"], None);
    }
    if g.get("gvm", "demo")?.is_some() {
        let _ = g.kubectl(
            &["patch", "gvm", "demo", "--type=merge", "-p", unfinalize],
            None,
        );
        let _ = g.kubectl(&["delete", "gvm", "demo", "--wait=false"], None);
    }
    g.cluster.ensure_running()?;
    g.wait("nothing left of the cell", Duration::from_secs(30), || {
        let gone = g.get("gvm", "demo")?.is_none()
            && g.kubectl(&["get", "gvmm", "-o", "name"], None)?
                .trim()
                .is_empty();
        let quiet = (0..2).all(|k| {
            let dir = g.vm_dir(k, "default", "demo");
            processes_naming(&dir).is_empty() && !vmm_pid(&dir).is_some_and(alive)
        });
        Ok((gone && quiet).then_some(()))
    })?;
    unmount_small_disks(g)
}
