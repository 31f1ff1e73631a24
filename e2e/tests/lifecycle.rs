//! A VM's life on a local cluster with the operator and node agents, driven
//! with kubectl: the example template and VM are applied and the VM runs on a
//! node with its customization, in its own cgroup; its node agent (in a
//! Podman container of Godwit's image, as the DaemonSet runs it) is killed
//! and restarted while it runs, its pid file removed meanwhile (the VM keeps
//! running and stays Running, the new agent adopts the VMM by its cgroup); a migration deleted
//! mid-way leaves it running on the source; deleting the VM stops its VMM and
//! removes its disk. (The successful live migration with a TCP client is the
//! demo's test, `tests/demo.rs`.)
//!
//! Needs the release binaries (`cargo build --release -p godwit-node -p
//! godwit-operator --bins`, as e2e/test.sh does) and /dev/kvm.

use std::path::Path;
use std::time::Duration;

use godwit_e2e::driver::{ClusterDriver, EXAMPLE_TEMPLATE, EXAMPLE_VM};
use godwit_testkit::guest::parse_heartbeat;

fn last_heartbeat(console: &Path) -> u64 {
    std::fs::read_to_string(console)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| parse_heartbeat(l.trim_end()))
        .map(|h| h.counter)
        .max()
        .unwrap_or(0)
}

use godwit_testkit::process::alive;

const SLOW_MIGRATION: &str = r#"
apiVersion: godwit.dev/v1alpha1
kind: VMMigration
metadata:
  name: slow-move
  namespace: default
spec:
  vmName: demo
  policy:
    bandwidthMbps: 20
    allowPostCopy: false
    allowAutoConverge: false
"#;

#[test]
fn vm_runs_survives_an_agent_restart_a_cancelled_migration_and_is_deleted() {
    let dir = std::env::temp_dir().join(format!("godwit-lifecycle-{}", std::process::id()));
    let mut g = ClusterDriver::up_in_containers(2, &dir)
        .expect("local cluster with Godwit, agents in Podman");

    // Apply: the VM runs on a node, with the template's customization.
    g.apply(&g.example(EXAMPLE_TEMPLATE)).unwrap();
    g.apply(&g.example(EXAMPLE_VM)).unwrap();
    let vm = g.wait_running("demo", Duration::from_secs(90)).unwrap();
    let node = vm["status"]["nodeName"].as_str().unwrap().to_string();
    let i = g.node_index(&node).unwrap();
    assert_eq!(vm["metadata"]["labels"]["godwit.dev/node"], node.as_str());
    assert_eq!(vm["status"]["addresses"][0]["ip"], "10.88.0.10");
    // `kubectl get gvm`: phase, Ready, node, address, and the vCPUs and
    // memory the VM runs with; the full resource name works too.
    let row = g
        .wait(
            "the VM's row to show it Ready",
            Duration::from_secs(30),
            || {
                let table = g.kubectl(&["get", "gvm", "demo", "--no-headers"], None)?;
                let row: Vec<String> = table.split_whitespace().map(String::from).collect();
                Ok((row.get(2).map(String::as_str) == Some("True")).then_some(row))
            },
        )
        .unwrap();
    assert_eq!(
        row[..7],
        [
            "demo",
            "Running",
            "True",
            node.as_str(),
            "10.88.0.10",
            "1",
            "256Mi"
        ],
        "{row:?}"
    );
    let full = g
        .kubectl(&["get", "virtualmachines.godwit.dev", "-o", "name"], None)
        .unwrap();
    assert_eq!(full.trim(), "virtualmachine.godwit.dev/demo", "{full}");
    let vm_dir = g.vm_dir(i, "default", "demo");
    let console = vm_dir.join("console.log");
    g.wait(
        "the guest's hostname on its console",
        Duration::from_secs(30),
        || {
            let text = std::fs::read_to_string(&console).unwrap_or_default();
            Ok(text.contains("HOSTNAME demo-guest").then_some(()))
        },
    )
    .unwrap();
    let disk = g.cluster.shared_dir().join("default/demo/root.raw");
    assert!(disk.exists(), "{} was not provisioned", disk.display());
    let pid: i32 = std::fs::read_to_string(vm_dir.join("pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // The VMM (under its exit-recording shell) runs in its seccomp sandbox
    // and migrates over mutual TLS with the certificate the agent issued.
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    let vmm: i32 = children
        .split_whitespace()
        .next()
        .expect("the VMM under its shell")
        .parse()
        .unwrap();
    let argv = std::fs::read(format!("/proc/{vmm}/cmdline")).unwrap();
    let argv = String::from_utf8_lossy(&argv).replace('\0', " ");
    // It runs as its VM's own user: the agent hands it the migration
    // identity on a pipe, /dev/kvm and its tap as open descriptors.
    assert!(
        argv.contains("--tls-fd") && argv.contains("--kvm-fd") && argv.contains("--tap-fd"),
        "the VMM runs without migration TLS or handed descriptors: {argv}"
    );
    let status = std::fs::read_to_string(format!("/proc/{vmm}/status")).unwrap();
    assert!(
        status.contains("Seccomp:\t2"),
        "the VMM runs without its seccomp filter"
    );
    // No capability is left to it, in any set, and it is not root.
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        assert!(
            status.contains(&format!("{set}:\t0000000000000000")),
            "the VMM keeps capabilities in {set}: {status}"
        );
    }
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().next()?.parse::<u32>().ok())
        .expect("a Uid line");
    assert!(uid >= 2_000_000_000, "the VMM runs as uid {uid}: {status}");
    // It runs in its VM's own cgroup under its node's parent.
    let leaf = format!("/{}/default_demo", g.cluster.node_cgroup_parent(i));
    let cgroups = std::fs::read_to_string(format!("/proc/{vmm}/cgroup")).unwrap();
    assert!(
        cgroups.lines().any(|l| l.ends_with(&leaf)),
        "the VMM is not in {leaf}:\n{cgroups}"
    );

    // Restart the node's agent: the VMM keeps running and the VM stays
    // Running. Its pid file is lost meanwhile: the new agent finds the VMM
    // by its cgroup.
    g.cluster.kill_agent(i);
    let hb = last_heartbeat(&console);
    std::fs::remove_file(vm_dir.join("pid")).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    g.cluster.start_agent(i).unwrap();
    std::thread::sleep(Duration::from_secs(4));
    assert!(alive(pid), "the VMM died with its agent");
    assert!(
        last_heartbeat(&console) > hb + 10,
        "the guest stopped beating"
    );
    let vm = g.get("gvm", "demo").unwrap().unwrap();
    assert_eq!(vm["status"]["phase"], "Running", "{vm}");
    assert_eq!(vm["status"]["nodeName"], node.as_str());
    let pid_now = std::fs::read_to_string(vm_dir.join("pid")).unwrap();
    assert_eq!(
        pid_now.trim(),
        pid.to_string(),
        "the restarted agent started a second VMM"
    );

    // A migration deleted mid-way: the VM stays on the source, still running.
    g.apply(SLOW_MIGRATION).unwrap();
    g.wait(
        "the slow migration to send memory",
        Duration::from_secs(60),
        || {
            let m = g.get("gvmm", "slow-move")?;
            Ok(m.filter(|m| {
                m["status"]["phase"] == "PreCopy"
                    && m["status"]["progress"]["transferredBytes"].as_u64() > Some(1 << 20)
            }))
        },
    )
    .unwrap();
    let hb = last_heartbeat(&console);
    g.kubectl(&["delete", "gvmm", "slow-move", "--wait=false"], None)
        .unwrap();
    g.wait(
        "the cancelled migration to go",
        Duration::from_secs(60),
        || Ok(g.get("gvmm", "slow-move")?.is_none().then_some(())),
    )
    .unwrap();
    let vm = g
        .wait("the VM to leave Migrating", Duration::from_secs(30), || {
            Ok(g.get("gvm", "demo")?
                .filter(|v| v["status"]["phase"] == "Running"))
        })
        .unwrap();
    assert_eq!(vm["status"]["nodeName"], node.as_str(), "{vm}");
    assert_eq!(vm["metadata"]["labels"]["godwit.dev/node"], node.as_str());
    assert!(
        alive(pid),
        "the source VMM is gone after a cancelled migration"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(last_heartbeat(&console) > hb, "the guest stopped beating");
    let other = 1 - i;
    g.wait("the target to clean up", Duration::from_secs(30), || {
        Ok((!g.vm_dir(other, "default", "demo").exists()).then_some(()))
    })
    .unwrap();

    // Delete: the VMM stops and its disk goes.
    g.kubectl(&["delete", "gvm", "demo", "--wait=false"], None)
        .unwrap();
    g.wait("the VM to go", Duration::from_secs(60), || {
        Ok(g.get("gvm", "demo")?.is_none().then_some(()))
    })
    .unwrap();
    assert!(!alive(pid), "the VMM still runs after its VM was deleted");
    assert!(!disk.exists(), "{} is still there", disk.display());
    assert!(!vm_dir.exists(), "{} is still there", vm_dir.display());
}

#[test]
fn a_node_cut_off_from_the_api_fences_itself_and_the_vm_restarts_after() {
    let dir = std::env::temp_dir().join(format!("godwit-fencing-{}", std::process::id()));
    let g = ClusterDriver::up(1, &dir).expect("local cluster with Godwit");
    g.apply(&g.example(EXAMPLE_TEMPLATE)).unwrap();
    g.apply(&g.example(EXAMPLE_VM)).unwrap();
    g.wait_running("demo", Duration::from_secs(90)).unwrap();
    let vm_dir = g.vm_dir(0, "default", "demo");
    let pid = |d: &Path| -> i32 {
        std::fs::read_to_string(d.join("pid"))
            .unwrap_or_default()
            .trim()
            .parse()
            .unwrap_or(0)
    };
    let first = pid(&vm_dir);
    assert!(alive(first));

    // Cut the node off: it cannot renew its Lease, so after the lease
    // duration (10 s) it stops its VM rather than risk it running twice.
    let node = &g.cluster.fabric.nodes[0];
    node.cut().unwrap();
    g.wait("the node to fence its VM", Duration::from_secs(30), || {
        Ok((!alive(first)).then_some(()))
    })
    .unwrap();
    let log = std::fs::read_to_string(g.cluster.log_dir().join("agent-node-0.log")).unwrap();
    assert!(log.contains("fencing this node"), "{log}");

    // Back on the network: the agent renews, reports the stop, and the
    // operator restarts the VM (runStrategy Always) on the node.
    node.ns.restore(&node.uplink).unwrap();
    g.wait("the VM to run again", Duration::from_secs(90), || {
        let vm = g.get("gvm", "demo")?;
        let again = pid(&vm_dir);
        Ok(vm
            .filter(|v| v["status"]["phase"] == "Running")
            .filter(|_| again != first && alive(again)))
    })
    .unwrap();
}
