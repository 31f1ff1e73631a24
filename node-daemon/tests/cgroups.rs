//! Per-VM cgroups, on this host's real hierarchy (v1 here; v2 where the
//! root has the controllers): a VMM the agent's runner starts, as its own
//! user in its mount namespace, runs in its VM's own cgroup with the limits
//! computed from the spec, cannot write its cgroup's files, is adopted by
//! its cgroup when its pid file is gone, and its cgroup goes with it. A
//! guest that touches more than its limit is OOM-killed in its own cgroup,
//! the kill is recorded and reported `OOMKilled`, and the other VM runs on.
//!
//! Each test has its own parent (`godwit-test-<pid>-<n>.slice`), removed
//! even on failure.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{guest, require_kvm, Scratch, VMM};
use godwit_crds::contract::Machine;
use godwit_crds::VmPhase;
use godwit_node::agent::cgroup::{self, Cgroups, Hierarchy, Limits};
use godwit_node::agent::decide::{decide_node_vm, NodeVmAction, VmFacts, OOM_KILLED_REASON};
use godwit_node::agent::image_dirs::ImageDirs;
use godwit_node::agent::vm_dir::VmDir;
use godwit_node::agent::vmm_process::{self, node_jail, settle_cgroups, Runner};
use godwit_node::agent::vmm_user::VmmUsers;

/// A cgroup parent of this test's own, removed (processes killed) on drop.
struct Parent(String);

impl Parent {
    fn new(tag: &str) -> Parent {
        Parent(format!("godwit-test-{}-{tag}.slice", std::process::id()))
    }
}

impl Drop for Parent {
    fn drop(&mut self) {
        cgroup::remove_tree(std::path::Path::new(cgroup::DEFAULT_ROOT), &self.0);
    }
}

/// Stops the VM when the test ends, passed or not.
struct Stop(VmDir, std::process::Child);

impl Drop for Stop {
    fn drop(&mut self) {
        vmm_process::stop(&self.0, Duration::from_secs(2));
        let _ = self.1.wait();
    }
}

struct Node {
    _scratch: Scratch,
    state: PathBuf,
    shared: PathBuf,
    runner: Runner,
    cgroups: Cgroups,
}

fn node(tag: &str, parent: &Parent, overhead: i64) -> Node {
    require_kvm();
    let scratch = Scratch::new(tag);
    let root = scratch.0.canonicalize().unwrap();
    let state = root.join("state");
    let shared = root.join("shared");
    let cgroups = Cgroups::new(
        std::path::Path::new(cgroup::DEFAULT_ROOT),
        &parent.0,
        overhead,
    )
    .expect("this host's cgroups (v2 with memory/cpu/pids, or v1)");
    let runner = Runner {
        vmm_binary: VMM.into(),
        tls: None,
        jail: Some(node_jail(&state, &shared, &[])),
        users: Some(VmmUsers::new(2_000_000_000).unwrap()),
        cgroups: Some(cgroups.clone()),
        image_dirs: ImageDirs::new([guest().parent().unwrap().to_path_buf()]).unwrap(),
    };
    Node {
        _scratch: scratch,
        state,
        shared,
        runner,
        cgroups,
    }
}

fn machine(mib: u64, cmdline: &str) -> Machine {
    Machine {
        cpu: 1,
        memory_bytes: mib << 20,
        kernel: guest().display().to_string(),
        cmdline: cmdline.into(),
        ..Default::default()
    }
}

fn wait(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn boot(n: &Node, name: &str, m: &Machine) -> (VmDir, Stop) {
    let dir = VmDir::new(&n.state, &n.shared, "ns", name);
    let sh = n.runner.boot(&dir, m).unwrap();
    let stop = Stop(dir.clone(), sh);
    wait("the console socket", Duration::from_secs(20), || {
        dir.file("console.sock").exists()
    });
    (dir, stop)
}

fn vmm_of(dir: &VmDir) -> i32 {
    let sh: i32 = std::fs::read_to_string(dir.file("pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let children =
        std::fs::read_to_string(format!("/proc/{sh}/task/{sh}/children")).unwrap_or_default();
    children
        .split_whitespace()
        .next()
        .expect("the VMM under its shell")
        .parse()
        .unwrap()
}

/// The memory charged to VM `name`'s cgroup at its peak, and now (bytes).
fn charged(cg: &Cgroups, name: &str) -> (u64, u64) {
    let dir = cg.memory_dir("ns", name);
    let read = |f: &str| {
        std::fs::read_to_string(dir.join(f))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    };
    match cg.hierarchy() {
        Hierarchy::V1 { .. } => (
            read("memory.max_usage_in_bytes"),
            read("memory.usage_in_bytes"),
        ),
        Hierarchy::V2(_) => (read("memory.peak"), read("memory.current")),
    }
}

#[test]
fn a_vmm_runs_in_its_own_cgroup_with_its_limits_and_is_adopted_by_it() {
    let parent = Parent::new("own");
    let n = node("cgroup-own", &parent, 128 << 20);
    // 256 MiB, all of the working set touched: the VMM's overhead is what
    // the cgroup holds beyond 256 MiB.
    let m = machine(256, "hb_ms=50 dirty_mib=190");
    let (dir, _stop) = boot(&n, "a", &m);
    let vmm = vmm_of(&dir);
    let leaf = format!("/{}/ns_a", parent.0);
    let cgroup_file = std::fs::read_to_string(format!("/proc/{vmm}/cgroup")).unwrap();
    match n.cgroups.hierarchy() {
        Hierarchy::V1 { .. } => {
            // In every hierarchy, not only memory, cpu and pids: a runtime
            // stopping the agent's container finds what it kills through
            // the others (devices, freezer).
            for l in cgroup_file.lines() {
                assert!(
                    l.ends_with(&leaf),
                    "the VMM is not in {leaf} in every hierarchy:\n{cgroup_file}"
                );
            }
            for c in ["memory", "cpu", "pids"] {
                assert!(
                    cgroup_file.lines().any(|l| l
                        .split(':')
                        .nth(1)
                        .is_some_and(|cs| cs.split(',').any(|x| x == c))),
                    "no {c} hierarchy:\n{cgroup_file}"
                );
            }
        }
        Hierarchy::V2(_) => assert!(
            cgroup_file.lines().any(|l| l == format!("0::{leaf}")),
            "{cgroup_file}"
        ),
    }
    // The limits are the computed ones.
    let limits = Limits::of(&m, 128 << 20);
    assert_eq!(limits.memory_bytes, (256 + 128) << 20);
    let memdir = n.cgroups.memory_dir("ns", "a");
    let limit_file = match n.cgroups.hierarchy() {
        Hierarchy::V1 { .. } => "memory.limit_in_bytes",
        Hierarchy::V2(_) => "memory.max",
    };
    let limit: u64 = std::fs::read_to_string(memdir.join(limit_file))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(limit, limits.memory_bytes);
    // The VMM's user cannot move out or raise its limits: the files are root's.
    let uid = std::fs::metadata(format!("/proc/{vmm}")).unwrap().uid();
    assert!(uid >= 2_000_000_000, "the VMM runs as {uid}");
    for d in n.cgroups.dirs("ns", "a") {
        for f in ["cgroup.procs", limit_file] {
            let path = d.join(f);
            if let Ok(meta) = std::fs::metadata(&path) {
                assert_eq!(meta.uid(), 0, "{}", path.display());
                assert_eq!(meta.mode() & 0o022, 0, "{} is writable", path.display());
            }
        }
    }
    // The overhead, once the guest has touched its working set.
    std::thread::sleep(Duration::from_secs(3));
    let rss: u64 = std::fs::read_to_string(format!("/proc/{vmm}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap()
        << 10;
    let (peak, now) = charged(&n.cgroups, "a");
    eprintln!(
        "VMM of a 256 MiB guest (190 MiB dirtied): RSS {} MiB, cgroup now {} MiB, peak {} MiB",
        rss >> 20,
        now >> 20,
        peak >> 20
    );

    // Adoption by cgroup: the pid file is gone, the cgroup finds the VMM.
    let sh = std::fs::read_to_string(dir.file("pid")).unwrap();
    std::fs::remove_file(dir.file("pid")).unwrap();
    assert!(!dir.state().alive);
    let adopted = settle_cgroups(&n.cgroups, std::slice::from_ref(&dir));
    assert_eq!(adopted, vec![dir.clone()]);
    assert_eq!(std::fs::read_to_string(dir.file("pid")).unwrap(), sh.trim());
    assert!(dir.state().alive);
    // Settling again changes nothing; the cgroup stays while the VMM runs.
    assert!(settle_cgroups(&n.cgroups, std::slice::from_ref(&dir)).is_empty());
    assert!(n.cgroups.exists("ns", "a"));

    // Stopped: its cgroup goes, and no OOM kill is recorded.
    vmm_process::stop(&dir, Duration::from_secs(2));
    wait("the VMM's cgroup to empty", Duration::from_secs(10), || {
        n.cgroups.procs("ns", "a").is_empty()
    });
    settle_cgroups(&n.cgroups, std::slice::from_ref(&dir));
    assert!(!n.cgroups.exists("ns", "a"), "the cgroup is left behind");
    assert!(!dir.state().oom_killed);
}

#[test]
fn a_guest_over_its_limit_is_oom_killed_in_its_own_cgroup_only() {
    let parent = Parent::new("oom");
    // The limit is 128 MiB below each guest's memory (a test-only setting).
    let n = node("cgroup-oom", &parent, -(128 << 20));
    let (quiet, _q) = boot(&n, "quiet", &machine(256, "hb_ms=50"));
    let quiet_vmm = vmm_of(&quiet);
    // This guest touches 150 MiB, over its 128 MiB limit.
    let (greedy, _g) = boot(&n, "greedy", &machine(256, "hb_ms=50 dirty_mib=150"));
    wait("the greedy VMM to end", Duration::from_secs(20), || {
        greedy.state().exit.is_some()
    });
    let st = greedy.state();
    assert_eq!(st.exit, Some(128 + libc::SIGKILL), "{st:?}");
    assert!(n.cgroups.oom_kills("ns", "greedy") >= 1);
    assert_eq!(n.cgroups.oom_kills("ns", "quiet"), 0);
    settle_cgroups(&n.cgroups, &[quiet.clone(), greedy.clone()]);
    assert!(!n.cgroups.exists("ns", "greedy"));
    let st = greedy.state();
    assert!(st.oom_killed, "{st:?}");
    let facts = VmFacts {
        phase: VmPhase::Running,
        has_finalizer: true,
        has_machine: true,
        reported_here: true,
        ..Default::default()
    };
    let NodeVmAction::ReportExit { failed, cause, .. } = decide_node_vm(&facts, &st) else {
        panic!("{:?}", decide_node_vm(&facts, &st));
    };
    assert!(failed);
    assert_eq!(cause, OOM_KILLED_REASON);
    // The other VM and this process (the agent's stand-in) run on.
    assert!(quiet.state().alive);
    assert_eq!(vmm_of(&quiet), quiet_vmm);
    assert!(n.cgroups.exists("ns", "quiet"));
    // A new start clears the record.
    let (_again, _a) = boot(&n, "greedy", &machine(256, "hb_ms=50"));
    assert!(!greedy.state().oom_killed);
}
