//! Maintenance mode on a local cluster with the operator and node agents:
//! three VMs run on one node of three, each with a TCP client reading its
//! heartbeats from the client namespace; the node is labelled
//! `godwit.dev/maintenance=true`. Every VM ends up Running on another node by
//! live migration (VMMigrations the operator made), every client's
//! connection survives with its heartbeats in order, and the node's
//! `godwit.dev/maintenance-status` annotation says `Empty`.
//!
//! To start the three VMs on one node, the two others are put in maintenance
//! first and taken out of it once the VMs run, which also checks that
//! removing the label makes a node schedulable again.
//!
//! Needs the release binaries (`cargo build --release -p godwit-node -p
//! godwit-operator --bins`, as e2e/test.sh does) and /dev/kvm.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use godwit_e2e::driver::{node_of, ClusterDriver};
use godwit_testkit::guest::watch_heartbeats;
use serde_json::Value;

const VMS: [(&str, &str); 3] = [
    ("maint-a", "10.88.0.21"),
    ("maint-b", "10.88.0.22"),
    ("maint-c", "10.88.0.23"),
];

/// A template (with the VM's own address) and a VM, as one manifest. The
/// guest writes 16 MiB at 2000 pages/s: real dirtying, yet three migrations
/// on a 2-core runner converge quickly.
fn manifest(g: &ClusterDriver, name: &str, ip: &str) -> String {
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
    cmdline: hb_ms=50 dirty_mib=16 dirty_rate=2000
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
    extraCmdline: tcp_port=7777
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
  evictionStrategy: LiveMigrate
"#
    ))
}

fn maintenance_status(g: &ClusterDriver, node: &str) -> Option<Value> {
    let n = g.get("node", node).ok()??;
    let text = n["metadata"]["annotations"]["godwit.dev/maintenance-status"].as_str()?;
    serde_json::from_str(text).ok()
}

#[test]
fn a_node_in_maintenance_is_emptied_by_live_migration() {
    let started = Instant::now();
    let dir = std::env::temp_dir().join(format!("godwit-maint-{}", std::process::id()));
    let g = ClusterDriver::up(3, &dir).expect("local cluster with Godwit");
    let names: Vec<String> = g
        .cluster
        .fabric
        .nodes
        .iter()
        .map(|n| n.name.clone())
        .collect();
    let (busy, others) = (&names[0], &names[1..]);

    for n in others {
        g.kubectl(&["label", "node", n, "godwit.dev/maintenance=true"], None)
            .unwrap();
    }
    for (name, ip) in VMS {
        g.apply(&manifest(&g, name, ip)).unwrap();
    }
    for (name, _) in VMS {
        let vm = g.wait_running(name, Duration::from_secs(60)).unwrap();
        assert_eq!(
            &node_of(&vm),
            busy,
            "{name} must start on the only schedulable node"
        );
    }
    for n in others {
        g.kubectl(&["label", "node", n, "godwit.dev/maintenance-"], None)
            .unwrap();
    }

    // A client per VM, reading heartbeats over one TCP connection each.
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for (name, ip) in VMS {
        let last = Arc::new(AtomicU64::new(0));
        let (s, l) = (stop.clone(), last.clone());
        let addr = format!("{ip}:7777");
        let handle = g
            .cluster
            .fabric
            .client
            .spawn_in(move || watch_heartbeats(&addr, &s, &l))
            .unwrap();
        clients.push((name, last, handle));
    }
    g.wait("heartbeats from every VM", Duration::from_secs(30), || {
        Ok(clients
            .iter()
            .all(|(_, last, _)| last.load(Ordering::Relaxed) > 10)
            .then_some(()))
    })
    .unwrap();
    let before: Vec<u64> = clients
        .iter()
        .map(|(_, last, _)| last.load(Ordering::Relaxed))
        .collect();

    println!(
        "maintenance on {busy} ({:?} since start)",
        started.elapsed()
    );
    g.kubectl(
        &["label", "node", busy, "godwit.dev/maintenance=true"],
        None,
    )
    .unwrap();
    let t0 = Instant::now();
    let status = g
        .wait("the node to be empty", Duration::from_secs(90), || {
            let s = maintenance_status(&g, busy);
            Ok(s.filter(|s| s["phase"] == "Empty"))
        })
        .unwrap();
    println!("{busy} empty after {:?}: {status}", t0.elapsed());
    assert_eq!(status["remaining"], 0);

    for (i, (name, _)) in VMS.iter().enumerate() {
        let vm = g.wait_running(name, Duration::from_secs(30)).unwrap();
        let now_on = node_of(&vm);
        assert!(others.contains(&now_on), "{name} runs on {now_on}");
        let migrations = g
            .kubectl(
                &[
                    "get",
                    "vmmigration",
                    "-l",
                    &format!("godwit.dev/evacuation={busy}"),
                    "-o",
                    "json",
                ],
                None,
            )
            .unwrap();
        let list: Value = serde_json::from_str(&migrations).unwrap();
        let moved = list["items"].as_array().unwrap().iter().any(|m| {
            m["spec"]["vmName"] == *name
                && m["status"]["phase"] == "Succeeded"
                && m["status"]["targetNode"] == now_on.as_str()
                // Owned by its VM (garbage-collected with it).
                && m["metadata"]["ownerReferences"][0]["uid"] == vm["metadata"]["uid"]
                && m["metadata"]["ownerReferences"][0]["kind"] == "VirtualMachine"
        });
        assert!(moved, "{name} did not leave by a live migration: {list}");
        // Heartbeats went on over the same connection after the move.
        let last = &clients[i].1;
        g.wait(
            &format!("heartbeats from {name} after the move"),
            Duration::from_secs(10),
            || Ok((last.load(Ordering::Relaxed) > before[i] + 20).then_some(())),
        )
        .unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for (name, _, handle) in clients {
        let seen = handle
            .join()
            .expect("client thread")
            .expect("client namespace");
        assert!(
            seen.error.is_none() && seen.in_order,
            "{name}'s TCP connection did not survive the evacuation: {seen:?}"
        );
    }

    // Out of maintenance: the annotation goes, the node takes VMs again.
    g.kubectl(&["label", "node", busy, "godwit.dev/maintenance-"], None)
        .unwrap();
    g.wait(
        "the maintenance status to go",
        Duration::from_secs(10),
        || Ok(maintenance_status(&g, busy).is_none().then_some(())),
    )
    .unwrap();
    let events = g
        .kubectl(
            &[
                "get",
                "events",
                "--field-selector",
                &format!("involvedObject.name={busy}"),
            ],
            None,
        )
        .unwrap_or_default();
    println!("{events}");
    println!("maintenance test took {:?}", started.elapsed());
}
