//! DRS on a local cluster with the operator (`--drs-mode automatic`, a short
//! interval) and node agents that publish measured usage: three VMs with a
//! memory-dirtying load start on one node of three; an idle "guard" VM on
//! another node has an anti-affinity rule against one of them (`heavy-a`).
//! The balancer spreads the three over the three nodes with VMMigrations
//! labelled `godwit.dev/drs=true`, and at no moment (VM labels and migration
//! targets watched every 200 ms) does `heavy-a` run on, or head for, the
//! guard's node. Its plan is in the ConfigMap `godwit-system/godwit-drs`.
//! The usage it balances on is each node's `GodwitNode` status: every node
//! has one, owned by its Node, with the agent's capacity, and the loaded
//! node's usage counts the three VMs; the Nodes carry no usage or capacity
//! annotation.
//!
//! (Two VMs with an anti-affinity rule between them cannot start on one
//! node, so the rule binds a VM of the loaded node and one elsewhere.)
//!
//! Needs the release binaries (`cargo build --release -p godwit-node -p
//! godwit-operator --bins`, as e2e/test.sh does) and /dev/kvm.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use godwit_e2e::driver::{node_of, ClusterDriver};
use serde_json::Value;

const HEAVY: [(&str, &str); 3] = [
    ("heavy-a", "10.88.0.31"),
    ("heavy-b", "10.88.0.32"),
    ("heavy-c", "10.88.0.33"),
];

fn manifest(g: &ClusterDriver, name: &str, ip: &str, cmdline: &str, affinity: &str) -> String {
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
    cmdline: {cmdline}
  cpu: 1
  memory: 128Mi
  networks:
    - name: net0
      bridge: godwit0
  customization:
    hostname: {name}
    network:
      address: {ip}/24
      gateway: 10.88.0.1
---
apiVersion: godwit.dev/v1alpha1
kind: VirtualMachine
metadata:
  name: {name}
  namespace: default
  labels:
    app: {name}
spec:
  templateRef:
    name: {name}
  disks:
    - name: root
      source:
        template: {{}}
      storage: Shared
  runStrategy: Always
  evictionStrategy: LiveMigrate
{affinity}"#
    ))
}

#[test]
fn drs_spreads_loaded_vms_and_keeps_anti_affinity() {
    let started = Instant::now();
    let dir = std::env::temp_dir().join(format!("godwit-drs-{}", std::process::id()));
    let g = ClusterDriver::up_with(
        3,
        &dir,
        &[
            "--drs-mode",
            "automatic",
            "--drs-interval",
            "5",
            "--drs-threshold",
            "0.01",
        ],
    )
    .expect("local cluster with Godwit");
    let names: Vec<String> = g
        .cluster
        .fabric
        .nodes
        .iter()
        .map(|n| n.name.clone())
        .collect();
    let label = |node: &str, value: &str| {
        g.kubectl(&["label", "node", node, "--overwrite", value], None)
            .unwrap();
    };

    // The guard alone on node 1 (nodes 0 and 2 in maintenance), then the
    // loaded VMs alone on node 0.
    label(&names[0], "godwit.dev/maintenance=true");
    label(&names[2], "godwit.dev/maintenance=true");
    let guard_rule = r#"  affinity:
    vmAntiAffinity:
      - labelSelector:
          matchLabels:
            app: heavy-a
"#;
    g.apply(&manifest(
        &g,
        "guard",
        "10.88.0.30",
        "hb_ms=100",
        guard_rule,
    ))
    .unwrap();
    let guard = g.wait_running("guard", Duration::from_secs(60)).unwrap();
    let guard_node = node_of(&guard);
    assert_eq!(guard_node, names[1]);
    // heavy-a first, with nodes 0 and 1 open: the guard's anti-affinity
    // (symmetric) keeps it off node 1. Only then node 1 goes into
    // maintenance: the guard cannot leave (node 0 holds heavy-a, node 2 is
    // in maintenance) and stays. (Maintenance on node 1 before heavy-a
    // runs would let the guard move to node 0 first, and heavy-a would
    // then have no node.)
    label(&names[0], "godwit.dev/maintenance-");
    let heavy = |name: &str, ip: &str| {
        g.apply(&manifest(
            &g,
            name,
            ip,
            "hb_ms=50 dirty_mib=64 dirty_rate=20000",
            "",
        ))
        .unwrap();
    };
    let (first, rest) = HEAVY.split_first().expect("three heavy VMs");
    heavy(first.0, first.1);
    let vm = g.wait_running(first.0, Duration::from_secs(60)).unwrap();
    assert_eq!(node_of(&vm), names[0], "{} avoids the guard", first.0);
    label(&names[1], "godwit.dev/maintenance=true");
    for (name, ip) in rest {
        heavy(name, ip);
    }
    for (name, _) in rest {
        let vm = g.wait_running(name, Duration::from_secs(60)).unwrap();
        assert_eq!(
            node_of(&vm),
            names[0],
            "{name} starts on the only open node"
        );
    }
    label(&names[1], "godwit.dev/maintenance-");
    label(&names[2], "godwit.dev/maintenance-");

    // What the balancer reads: each node's GodwitNode.
    let report = g
        .wait(
            "the loaded node's usage to count its three VMs",
            Duration::from_secs(30),
            || {
                let report = g.kubectl(
                    &[
                        "get",
                        "gnode",
                        "-n",
                        "godwit-system",
                        &names[0],
                        "-o",
                        "json",
                    ],
                    None,
                )?;
                let report: Value = serde_json::from_str(&report)?;
                let vms = report["status"]["usage"]["vms"]
                    .as_object()
                    .map_or(0, |v| v.len());
                Ok((vms == 3).then_some(report))
            },
        )
        .unwrap();
    assert_eq!(
        report["metadata"]["ownerReferences"][0]["kind"], "Node",
        "{report}"
    );
    assert_eq!(
        report["metadata"]["ownerReferences"][0]["name"],
        names[0].as_str()
    );
    assert!(
        report["status"]["capacity"]["cpu"].as_u64() > Some(0),
        "{report}"
    );
    assert!(
        report["status"]["usage"]["rssBytes"].as_u64() > Some(0),
        "{report}"
    );
    let table = g
        .kubectl(&["get", "gnode", "-n", "godwit-system"], None)
        .unwrap();
    for name in &names {
        assert!(table.contains(name.as_str()), "{table}");
    }
    assert!(
        table.contains("CPU-USED-M") && table.contains("MEMORY"),
        "{table}"
    );
    let node: Value = serde_json::from_str(
        &g.kubectl(&["get", "node", &names[0], "-o", "json"], None)
            .unwrap(),
    )
    .unwrap();
    let annotations = node["metadata"]["annotations"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    for old in [
        "godwit.dev/usage",
        "godwit.dev/vm-cpu",
        "godwit.dev/vm-memory",
        "godwit.dev/cached-images",
    ] {
        assert!(
            !annotations.contains_key(old),
            "the agent still writes {old} on its Node: {annotations:?}"
        );
    }
    println!(
        "three loaded VMs on {} after {:?}",
        names[0],
        started.elapsed()
    );

    // Watch placements until the three run on three nodes.
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(100);
    loop {
        let vms: Value =
            serde_json::from_str(&g.kubectl(&["get", "gvm", "-o", "json"], None).unwrap()).unwrap();
        let migrations: Value = serde_json::from_str(
            &g.kubectl(&["get", "vmmigration", "-o", "json"], None)
                .unwrap(),
        )
        .unwrap();
        let items = vms["items"].as_array().unwrap();
        let find = |n: &str| items.iter().find(|v| v["metadata"]["name"] == n);
        let guard_now = find("guard").map(node_of).unwrap_or_default();
        let a_now = find("heavy-a").map(node_of).unwrap_or_default();
        assert_ne!(a_now, guard_now, "heavy-a shares a node with the guard");
        for m in migrations["items"].as_array().unwrap() {
            if m["spec"]["vmName"] == "heavy-a" {
                let target = m["status"]["targetNode"].as_str().unwrap_or("");
                assert_ne!(
                    target, guard_now,
                    "heavy-a headed for the guard's node: {m}"
                );
            }
        }
        let placed: Vec<(String, String)> = HEAVY
            .iter()
            .filter_map(|(n, _)| find(n))
            .map(|v| {
                (
                    node_of(v),
                    v["status"]["phase"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        let spread = placed.iter().map(|(n, _)| n).collect::<BTreeSet<_>>().len() == 3
            && placed.iter().all(|(_, p)| p == "Running");
        if spread {
            println!("spread after {:?}: {placed:?}", t0.elapsed());
            let drs_made = migrations["items"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|m| {
                    m["metadata"]["labels"]["godwit.dev/drs"] == "true"
                        && m["status"]["phase"] == "Succeeded"
                })
                .count();
            assert!(drs_made >= 2, "the moves were not DRS's: {migrations}");
            // Each DRS migration is owned by its VM (garbage-collected
            // with it).
            for m in migrations["items"].as_array().unwrap() {
                if m["metadata"]["labels"]["godwit.dev/drs"] == "true" {
                    let owner = &m["metadata"]["ownerReferences"][0];
                    assert_eq!(owner["kind"], "VirtualMachine", "{m}");
                    assert_eq!(owner["name"], m["spec"]["vmName"], "{m}");
                    let vm = find(owner["name"].as_str().unwrap()).unwrap();
                    assert_eq!(owner["uid"], vm["metadata"]["uid"], "{m}");
                }
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not spread after {:?}: {placed:?}; usage: {}; DRS status: {}",
            t0.elapsed(),
            g.kubectl(
                &[
                    "get",
                    "gnode",
                    "-n",
                    "godwit-system",
                    "-o",
                    "jsonpath={.items[*].status.usage}"
                ],
                None
            )
            .unwrap_or_default(),
            g.kubectl(
                &[
                    "get",
                    "configmap",
                    "-n",
                    "godwit-system",
                    "godwit-drs",
                    "-o",
                    "json"
                ],
                None
            )
            .unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let cm = g
        .kubectl(
            &[
                "get",
                "configmap",
                "-n",
                "godwit-system",
                "godwit-drs",
                "-o",
                "json",
            ],
            None,
        )
        .unwrap();
    let cm: Value = serde_json::from_str(&cm).unwrap();
    let status: Value = serde_json::from_str(cm["data"]["status"].as_str().unwrap()).unwrap();
    println!("DRS status: {status}");
    assert_eq!(status["mode"], "automatic");
    assert!(status["loads"].as_object().is_some_and(|l| l.len() == 3));
    println!("DRS test took {:?}", started.elapsed());
}
