//! A live migration whose target is never reached leaves nothing behind on
//! the target node, and a retry succeeds (issue 21 item 7).
//!
//! Both nodes drop every TCP connection to the migration ports (an iptables
//! INPUT rule in their namespaces), so the target prepares its incoming
//! VMM, publishes its address, and the source's connect times out: the
//! failure the fault matrix once saw ("Cannot connect to the migration
//! target ...: connection timed out"). Afterwards the target node has no
//! process of the VM (none names its directory), no tap of the VM, no VM
//! cgroup, no VM directory and no reservation pod of the VM (the operator
//! deletes it once the migration failed); the VM still runs on the source,
//! with its reservation there. With the rule gone, a second migration
//! succeeds.
//!
//! Needs the release binaries (`cargo build --release -p godwit-node
//! -p godwit-operator --bins`), the test guest, /dev/kvm and iptables.

use std::path::Path;
use std::time::Duration;

use godwit_e2e::driver::{ClusterDriver, EXAMPLE_TEMPLATE, EXAMPLE_VM};
use godwit_e2e::vmm_watch::processes_naming;
use godwit_node::agent::cgroup::{self, Cgroups};
use godwit_node::agent::vm_dir::tap_name;

const BLOCK: &[&str] = &["INPUT", "-p", "tcp", "--dport", "47000:47999", "-j", "DROP"];

fn migration(name: &str) -> String {
    format!(
        "apiVersion: godwit.dev/v1alpha1\nkind: VMMigration\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  vmName: demo\n  mode: Live\n  policy:\n    allowPostCopy: false\n    completionTimeoutSeconds: 120\n"
    )
}

/// What the VM left on node `k`, in words (empty: nothing).
fn leftovers(g: &ClusterDriver, k: usize) -> Vec<String> {
    let mut left = Vec::new();
    let dir = g.vm_dir(k, "default", "demo");
    let procs = processes_naming(&dir);
    if !procs.is_empty() {
        left.push(format!("processes {procs:?}"));
    }
    if dir.exists() {
        left.push(format!("directory {}", dir.display()));
    }
    let tap = tap_name("default", "demo", 0);
    if g.cluster.fabric.nodes[k]
        .ns
        .ip(&["link", "show", &tap])
        .is_ok()
    {
        left.push(format!("tap {tap}"));
    }
    let cgroups = Cgroups::new(
        Path::new(cgroup::DEFAULT_ROOT),
        &g.cluster.node_cgroup_parent(k),
        0,
    )
    .expect("the node's cgroup parent");
    if cgroups.exists("default", "demo") {
        left.push(format!("cgroup {:?}", cgroups.dirs("default", "demo")));
    }
    left
}

fn wait_final(g: &ClusterDriver, name: &str) -> serde_json::Value {
    g.wait(
        &format!("migration {name} to end"),
        Duration::from_secs(120),
        || {
            let m = g.get("gvmm", name)?;
            Ok(m.filter(|m| {
                matches!(
                    m["status"]["phase"].as_str(),
                    Some("Succeeded" | "Failed" | "Cancelled")
                )
            }))
        },
    )
    .expect("migration ends")
}

#[test]
fn a_migration_whose_target_is_never_reached_leaves_nothing_and_a_retry_succeeds() {
    let dir = std::env::temp_dir().join(format!("godwit-e2e-failmig-{}", std::process::id()));
    let g = ClusterDriver::up(2, &dir).expect("cluster up");
    for m in [EXAMPLE_TEMPLATE, EXAMPLE_VM] {
        g.apply(&g.example(m)).expect("apply");
    }
    let vm = g
        .wait_running("demo", Duration::from_secs(90))
        .expect("VM runs");
    let source = vm["status"]["nodeName"].as_str().expect("node").to_string();
    let i = g.node_index(&source).expect("source index");
    let j = 1 - i;
    let source_pid = std::fs::read_to_string(g.vm_dir(i, "default", "demo").join("pid"))
        .expect("source pid")
        .trim()
        .to_string();

    for node in &g.cluster.fabric.nodes {
        let mut add = vec!["-w", "-I"];
        add.extend(BLOCK);
        node.ns
            .exec("iptables", &add)
            .expect("block migration ports");
    }
    g.apply(&migration("unreachable")).expect("apply migration");
    // The target prepared: its incoming VMM listened (an address was published).
    g.wait("the target's address", Duration::from_secs(60), || {
        let m = g.get("gvmm", "unreachable")?;
        Ok(m.filter(|m| m["status"]["targetAddress"].is_string())
            .map(|_| ()))
    })
    .expect("target prepared");
    let m = wait_final(&g, "unreachable");
    assert_eq!(m["status"]["phase"], "Failed", "{}", m["status"]);
    let reason = m["status"]["failureReason"].as_str().unwrap_or("");
    assert!(
        reason.contains("Cannot connect to the migration target"),
        "{reason}"
    );

    // Nothing of the VM is left on the target.
    let left = g
        .wait("the target to be clean", Duration::from_secs(30), || {
            Ok(leftovers(&g, j).is_empty().then_some(()))
        })
        .map_err(|e| format!("{e:#}: left on the target: {:?}", leftovers(&g, j)));
    assert!(left.is_ok(), "{}", left.unwrap_err());
    // Its reservation pod on the target goes too; the source's stays.
    let target = g.cluster.fabric.nodes[j].name.clone();
    let nodes = g
        .wait(
            "one reservation, on the source",
            Duration::from_secs(30),
            || {
                let text = g.kubectl(
                    &["get", "pods", "-l", "godwit.dev/vm=demo", "-o", "json"],
                    None,
                )?;
                let pods: serde_json::Value = serde_json::from_str(&text)?;
                let nodes: Vec<String> = pods["items"]
                    .as_array()
                    .map(|items| {
                        items
                            .iter()
                            .map(|p| p["spec"]["nodeName"].as_str().unwrap_or("").to_string())
                            .collect()
                    })
                    .unwrap_or_default();
                Ok((nodes == [source.clone()]).then_some(nodes))
            },
        )
        .map_err(|e| format!("{e:#}"));
    assert!(nodes.is_ok(), "reservation left on {target}: {nodes:?}");
    // The VM runs on, on the source, in the same VMM.
    let vm = g.get("gvm", "demo").expect("get").expect("VM");
    assert_eq!(vm["status"]["nodeName"], source.as_str());
    assert_eq!(vm["status"]["phase"], "Running");
    assert_eq!(
        std::fs::read_to_string(g.vm_dir(i, "default", "demo").join("pid"))
            .expect("source pid")
            .trim(),
        source_pid
    );

    // The retry.
    for node in &g.cluster.fabric.nodes {
        let mut delete = vec!["-w", "-D"];
        delete.extend(BLOCK);
        node.ns.exec("iptables", &delete).expect("unblock");
    }
    g.apply(&migration("retry")).expect("apply migration");
    let m = wait_final(&g, "retry");
    assert_eq!(m["status"]["phase"], "Succeeded", "{}", m["status"]);
    let vm = g
        .wait("the VM on the target", Duration::from_secs(30), || {
            let vm = g.get("gvm", "demo")?;
            Ok(vm.filter(|v| {
                v["status"]["phase"] == "Running"
                    && v["status"]["nodeName"] == g.cluster.fabric.nodes[j].name.as_str()
            }))
        })
        .expect("VM runs on the target");
    assert_eq!(vm["status"]["phase"], "Running");
}
