//! The node agent in a real container, as a DaemonSet runs it: the local
//! cluster's node runs its agent in a Podman (runc) container of Godwit's
//! image, built from the repo's Dockerfile (`e2e/podman/node-image.sh`),
//! with the chart's settings (privileged, host PID namespace, the host's
//! cgroup hierarchy, the node's network namespace). Two VMs run on it. The
//! container is stopped with `podman stop`, as a rollout stops it (SIGTERM
//! to the agent, then SIGKILL to everything left in the container's
//! cgroups), and started again: both VMMs run on throughout (same pids),
//! their guests' heartbeats never stop for more than a second, and the new
//! agent adopts them (Running, same node, same VMM).
//!
//! Needs the release binaries, the test guest, /dev/kvm, and Podman, runc
//! and debootstrap (e2e/install-deps.sh); the first run makes the base image
//! with debootstrap, which needs the Debian mirror.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use godwit_e2e::cluster::podman;
use godwit_e2e::driver::{console_has, ClusterDriver};
use godwit_testkit::guest::parse_heartbeat;
use godwit_testkit::process::alive;

const VMS: [&str; 2] = ["alpha", "beta"];

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
  memory: 64Mi
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

fn pid_file(g: &ClusterDriver, name: &str) -> i32 {
    std::fs::read_to_string(g.vm_dir(0, "default", name).join("pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn last_heartbeat(console: &Path) -> u64 {
    std::fs::read_to_string(console)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| parse_heartbeat(l.trim_end()))
        .map(|h| h.counter)
        .max()
        .unwrap_or(0)
}

/// Watches the consoles' heartbeat counters every 10 ms; the longest time
/// any of them went without a new heartbeat.
struct GapWatch {
    stop: Arc<AtomicBool>,
    longest: Arc<Mutex<Vec<Duration>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl GapWatch {
    fn start(consoles: Vec<PathBuf>) -> GapWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let longest = Arc::new(Mutex::new(vec![Duration::ZERO; consoles.len()]));
        let (s, l) = (stop.clone(), longest.clone());
        let thread = std::thread::spawn(move || {
            let mut last: Vec<(u64, Instant)> = consoles
                .iter()
                .map(|c| (last_heartbeat(c), Instant::now()))
                .collect();
            while !s.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(10));
                for (i, c) in consoles.iter().enumerate() {
                    let now = last_heartbeat(c);
                    let gap = last[i].1.elapsed();
                    let mut longest = l.lock().unwrap();
                    longest[i] = longest[i].max(gap);
                    if now > last[i].0 {
                        last[i] = (now, Instant::now());
                    }
                }
            }
        });
        GapWatch {
            stop,
            longest,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<Duration> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.longest.lock().unwrap().clone()
    }
}

#[test]
fn vms_outlive_their_agents_container_stopped_and_started_again() {
    let dir = std::env::temp_dir().join(format!("godwit-e2e-container-{}", std::process::id()));
    let mut g = ClusterDriver::up_in_containers(1, &dir).expect("local cluster, agent in Podman");
    let container = g.cluster.agent_container(0);
    let agent_pid = |g: &ClusterDriver| -> i32 {
        podman(&[
            "inspect",
            "--format",
            "{{.State.Pid}}",
            &g.cluster.agent_container(0),
        ])
        .unwrap()
        .trim()
        .parse()
        .unwrap()
    };
    let first_agent = agent_pid(&g);
    // The agent really is in the container: its cgroups are the runtime's.
    let agent_cgroups = std::fs::read_to_string(format!("/proc/{first_agent}/cgroup")).unwrap();
    assert!(
        agent_cgroups.contains("libpod"),
        "the agent is not in a Podman container:\n{agent_cgroups}"
    );
    for name in VMS {
        g.apply(&manifest(&g, name)).unwrap();
    }
    let mut vmms = Vec::new();
    for name in VMS {
        g.wait_running(name, Duration::from_secs(90)).unwrap();
        let vm_dir = g.vm_dir(0, "default", name);
        g.wait(&format!("{name}'s guest"), Duration::from_secs(30), || {
            Ok(console_has(&vm_dir, "READY").then_some(()))
        })
        .unwrap();
        let shell = pid_file(&g, name);
        let children =
            std::fs::read_to_string(format!("/proc/{shell}/task/{shell}/children")).unwrap();
        let vmm: i32 = children.split_whitespace().next().unwrap().parse().unwrap();
        // Started from the container, yet in no cgroup of the container:
        // in its VM's own, in every hierarchy.
        let cgroups = std::fs::read_to_string(format!("/proc/{vmm}/cgroup")).unwrap();
        let leaf = format!("{}/default_{name}", g.cluster.node_cgroup_parent(0));
        assert!(
            cgroups.lines().all(|l| l.ends_with(&leaf)),
            "{name}'s VMM is not in {leaf} in every hierarchy:\n{cgroups}"
        );
        vmms.push((name, shell, vmm));
    }
    let consoles: Vec<PathBuf> = VMS
        .iter()
        .map(|n| g.vm_dir(0, "default", n).join("console.log"))
        .collect();
    let watch = GapWatch::start(consoles.clone());
    std::thread::sleep(Duration::from_secs(1));

    // A rollout: the container is stopped, everything in its cgroups killed.
    let t = Instant::now();
    g.cluster.stop_agent_container(0).unwrap();
    let stopped_in = t.elapsed();
    let running = podman(&["inspect", "--format", "{{.State.Running}}", &container]).unwrap();
    assert_eq!(running.trim(), "false");
    assert!(!alive(first_agent), "the agent outlived its container");
    let before: Vec<u64> = consoles.iter().map(|c| last_heartbeat(c)).collect();
    std::thread::sleep(Duration::from_secs(2));
    for (i, (name, shell, vmm)) in vmms.iter().enumerate() {
        assert!(
            alive(*shell) && alive(*vmm),
            "{name}'s VMM died with the container"
        );
        assert!(
            last_heartbeat(&consoles[i]) > before[i],
            "{name}'s guest stopped while its agent was down"
        );
    }

    // The DaemonSet starts it again; the new agent adopts both VMs.
    g.cluster.start_agent_container(0).unwrap();
    let second_agent = agent_pid(&g);
    assert_ne!(second_agent, first_agent);
    let log = g
        .cluster
        .log_dir()
        .join(format!("agent-{}.log", g.cluster.fabric.nodes[0].name));
    g.wait("the new agent to start", Duration::from_secs(30), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        Ok((text.matches("watching VMs and migrations").count() >= 2).then_some(()))
    })
    .unwrap();
    // A few passes of the new agent.
    std::thread::sleep(Duration::from_secs(5));
    let gaps = watch.finish();
    for (i, (name, shell, vmm)) in vmms.iter().enumerate() {
        let vm = g.get("gvm", name).unwrap().unwrap();
        assert_eq!(vm["status"]["phase"], "Running", "{vm}");
        assert_eq!(
            vm["status"]["nodeName"], g.cluster.fabric.nodes[0].name,
            "{vm}"
        );
        assert_eq!(pid_file(&g, name), *shell, "{name} got a new VMM");
        assert!(alive(*vmm), "{name}'s VMM is gone after the restart");
        eprintln!(
            "{name}: VMM {vmm} ran throughout; longest heartbeat gap {:?}",
            gaps[i]
        );
        assert!(
            gaps[i] < Duration::from_secs(1),
            "{name}'s heartbeat stopped for {:?}",
            gaps[i]
        );
    }
    eprintln!("podman stop took {stopped_in:?}");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!text.contains("ERROR"), "the agents logged errors:\n{text}");
}
