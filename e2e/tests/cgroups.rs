//! An OOM kill through the cluster: on one node whose agent gives each VMM a
//! memory limit 128 MiB below its guest's memory (the test-only
//! `--vmm-memory-overhead-mib=-128`), a guest told to touch 150 MiB of its
//! 256 MiB is OOM-killed in its own cgroup. The VM's status says
//! `OOMKilled`, it starts again (`runStrategy: Always`), and the agent and
//! the other VM on the node run on untouched.
//!
//! Needs the release binaries (`cargo build --release -p godwit-node
//! -p godwit-operator --bins`), the test guest and /dev/kvm.

use std::time::{Duration, Instant};

use godwit_e2e::driver::{console_has, type_at, ClusterDriver};
use godwit_testkit::process::alive;

fn manifest(g: &ClusterDriver, name: &str) -> String {
    g.example(&format!(
        r#"apiVersion: godwit.dev/v1alpha1
kind: VMTemplate
metadata:
  name: {name}
  namespace: default
spec:
  image:
    source: /var/lib/godwit/images/testguest-root.raw
    format: raw
  boot:
    kernel: /var/lib/godwit/kernels/godwit-testguest.elf
    cmdline: hb_ms=100
  cpu: 1
  memory: 256Mi
---
apiVersion: godwit.dev/v1alpha1
kind: VirtualMachine
metadata:
  name: {name}
  namespace: default
spec:
  templateRef:
    name: {name}
  disks:
    - name: root
      source:
        template: {{}}
      storage: Shared
  runStrategy: Always
"#
    ))
}

fn pid(g: &ClusterDriver, name: &str) -> Option<i32> {
    std::fs::read_to_string(g.vm_dir(0, "default", name).join("pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// What a failed wait shows: the guest's last console lines, its VMM log,
/// what the node's VM cgroups hold (usage, limit, OOM counters) and the
/// VMM processes with their memory cgroups.
fn diagnose(g: &ClusterDriver, vm_dir: &std::path::Path) -> String {
    let console = std::fs::read_to_string(vm_dir.join("console.log")).unwrap_or_default();
    let tail: Vec<&str> = console.lines().rev().take(8).collect();
    let mut out = format!("greedy's console (last lines, newest first): {tail:?}\n");
    let vmm_log = std::fs::read_to_string(vm_dir.join("vmm.log")).unwrap_or_default();
    let pid = std::fs::read_to_string(vm_dir.join("pid")).unwrap_or_default();
    out.push_str(&format!(
        "greedy's pid file: {pid:?}; vmm.log:\n{vmm_log}\n"
    ));
    // cgroup v1 (the memory hierarchy) or v2 (the unified one).
    let parents = [
        std::path::Path::new("/sys/fs/cgroup/memory").join(g.cluster.node_cgroup_parent(0)),
        std::path::Path::new("/sys/fs/cgroup").join(g.cluster.node_cgroup_parent(0)),
    ];
    let leaves = parents
        .iter()
        .flat_map(|p| std::fs::read_dir(p).into_iter().flatten().flatten());
    for leaf in leaves {
        if !leaf.path().is_dir() {
            continue;
        }
        out.push_str(&format!("cgroup {}:", leaf.path().display()));
        for f in [
            "cgroup.procs",
            "memory.limit_in_bytes",
            "memory.usage_in_bytes",
            "memory.oom_control",
            "memory.max",
            "memory.current",
            "memory.events",
        ] {
            if let Ok(v) = std::fs::read_to_string(leaf.path().join(f)) {
                out.push_str(&format!(" {f}={:?}", v.trim()));
            }
        }
        out.push('\n');
    }
    for proc in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let path = proc.path();
        let cmd = std::fs::read(path.join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if !cmd.contains("godwit-vmm") {
            continue;
        }
        let status = std::fs::read_to_string(path.join("status")).unwrap_or_default();
        let rss = status
            .lines()
            .find(|l| l.starts_with("VmRSS"))
            .unwrap_or("");
        let ppid = status.lines().find(|l| l.starts_with("PPid")).unwrap_or("");
        let cg = std::fs::read_to_string(path.join("cgroup")).unwrap_or_default();
        let memcg = cg.lines().find(|l| l.contains(":memory:")).unwrap_or("");
        out.push_str(&format!(
            "process {}: {ppid} {rss} {memcg} {}\n",
            proc.file_name().to_string_lossy(),
            cmd.chars().take(160).collect::<String>()
        ));
    }
    out
}

#[test]
fn a_guest_over_its_limit_is_oom_killed_reported_and_restarted_alone() {
    let dir = std::env::temp_dir().join(format!("godwit-e2e-oom-{}", std::process::id()));
    let g = ClusterDriver::up_with_agents(1, &dir, &[], &["--vmm-memory-overhead-mib=-128"])
        .expect("local cluster with Godwit");
    for name in ["quiet", "greedy"] {
        g.apply(&manifest(&g, name)).unwrap();
    }
    for name in ["quiet", "greedy"] {
        g.wait_running(name, Duration::from_secs(60)).unwrap();
    }
    let greedy_dir = g.vm_dir(0, "default", "greedy");
    g.wait("greedy's guest", Duration::from_secs(20), || {
        Ok(console_has(&greedy_dir, "READY").then_some(()))
    })
    .unwrap();
    let quiet_pid = pid(&g, "quiet").unwrap();
    let greedy_pid = pid(&g, "greedy").unwrap();
    // A watch, not polling: the OOMKilled status lasts only until the VM
    // has restarted, which can be quicker than one `kubectl get`.
    let watch = g.watch("gvm", "greedy").unwrap();
    type_at(&greedy_dir, "dirty 150").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let vm = loop {
        if Instant::now() >= deadline {
            panic!(
                "no version of greedy was reported OOMKilled within 30 s\n{}",
                diagnose(&g, &greedy_dir)
            );
        }
        let Some(vm) = watch.next(Duration::from_secs(1)).unwrap() else {
            continue;
        };
        let oom = vm["status"]["conditions"]
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| c["reason"] == "OOMKilled"));
        if oom {
            break vm;
        }
    };
    drop(watch);
    let ready = vm["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .unwrap()
        .clone();
    assert_eq!(ready["status"], "False", "{vm}");
    assert!(
        ready["message"].as_str().unwrap().contains("OOM killer"),
        "{ready}"
    );
    // runStrategy Always: it starts again, as a new VMM.
    g.wait("greedy to run again", Duration::from_secs(60), || {
        let vm = g.get("gvm", "greedy")?;
        Ok(vm.filter(|v| {
            v["status"]["phase"] == "Running" && pid(&g, "greedy").is_some_and(|p| p != greedy_pid)
        }))
    })
    .unwrap();
    // The other VM and the agent were not touched.
    assert!(alive(quiet_pid), "the other VM's VMM died");
    assert_eq!(pid(&g, "quiet"), Some(quiet_pid));
    let quiet = g.get("gvm", "quiet").unwrap().unwrap();
    assert_eq!(quiet["status"]["phase"], "Running", "{quiet}");
    let log = std::fs::read_to_string(
        g.cluster
            .log_dir()
            .join(format!("agent-{}.log", g.cluster.fabric.nodes[0].name)),
    )
    .unwrap_or_default();
    // A restarted agent would have logged its start again (the log is appended).
    assert_eq!(
        log.matches("watching VMs and migrations").count(),
        1,
        "the agent restarted:\n{log}"
    );
}
