//! An OOM kill through the cluster: on one node whose agent gives each VMM a
//! memory limit 128 MiB below its guest's memory (the test-only
//! `--vmm-memory-overhead-mib=-128`), a guest told to touch 150 MiB of its
//! 256 MiB is OOM-killed in its own cgroup. The VM's status says
//! `OOMKilled`, it starts again (`runStrategy: Always`), and the agent and
//! the other VM on the node run on untouched.
//!
//! Needs the release binaries (`cargo build --release -p godwit-node
//! -p godwit-operator --bins`), the test guest and /dev/kvm.

use std::time::Duration;

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
    type_at(&greedy_dir, "dirty 150").unwrap();
    let vm = g
        .wait(
            "greedy to be reported OOMKilled",
            Duration::from_secs(30),
            || {
                let vm = g.get("gvm", "greedy")?;
                Ok(vm.filter(|v| {
                    v["status"]["conditions"]
                        .as_array()
                        .is_some_and(|cs| cs.iter().any(|c| c["reason"] == "OOMKilled"))
                }))
            },
        )
        .unwrap();
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
