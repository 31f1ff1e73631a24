//! VM resources that Kubernetes sees, on a local cluster (test API server,
//! operator, node agents, real KVM VMs; no kube-scheduler, no kubelet):
//!
//! - a VM's reservation pod on its node, with the VM's requests
//!   (vCPUs / cpuAllocationRatio, memory + 128 MiB) and an ownerReference to
//!   the VM; two during a live migration, then one on the target; none once
//!   the VM is deleted; `kubectl get pdb` shows the VM's budget;
//! - a ResourceQuota sized for one VM admits the first and holds the second
//!   with `Scheduled=False` reason `QuotaExceeded` (and an Event), until the
//!   first is deleted;
//! - 30 one-vCPU 64 MiB VMs on 3 four-CPU nodes all run at the default ratio
//!   10; at ratio 1 the 13th is Unschedulable with an "insufficient cpu"
//!   Event;
//! - `kubectl cordon` of a VM's node evacuates it by live migration, its TCP
//!   connection survives, and its old reservation goes.
//!
//! The tests of this file take turns (one local cluster at a time).
//! Needs the release binaries (`cargo build --release -p godwit-node -p
//! godwit-operator --bins`, as e2e/test.sh does) and /dev/kvm.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use godwit_e2e::driver::{node_of, ClusterDriver};
use godwit_testkit::guest::watch_heartbeats;
use serde_json::Value;

/// One local cluster at a time: the machine has few cores.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn cluster(test: &str, nodes: usize, operator_args: &[&str]) -> ClusterDriver {
    let dir = std::env::temp_dir().join(format!("godwit-res-{test}-{}", std::process::id()));
    ClusterDriver::up_with(nodes, &dir, operator_args).expect("local cluster with Godwit")
}

/// A VM without template or disk: the test guest's kernel, `cpu` vCPUs,
/// `memory`, the guest `cmdline`, and a NIC with `ip` if given.
fn vm_manifest(
    g: &ClusterDriver,
    namespace: &str,
    name: &str,
    memory: &str,
    cmdline: &str,
    ip: Option<&str>,
) -> String {
    let network = match ip {
        Some(ip) => format!(
            r#"  networks:
    - name: net0
      bridge: godwit0
  customization:
    hostname: {name}
    network:
      address: {ip}/24
      gateway: 10.88.0.1
    extraCmdline: tcp_port=7777
"#
        ),
        None => String::new(),
    };
    g.example(&format!(
        r#"apiVersion: godwit.dev/v1alpha1
kind: VirtualMachine
metadata:
  name: {name}
  namespace: {namespace}
spec:
  cpu: 1
  memory: {memory}
  boot:
    kernel: /var/lib/godwit/kernels/godwit-testguest.elf
    cmdline: {cmdline}
  runStrategy: Always
  evictionStrategy: LiveMigrate
{network}"#
    ))
}

fn list(g: &ClusterDriver, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["get"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["-o", "json"]);
    let text = g.kubectl(&all, None).unwrap();
    let parsed: Value = serde_json::from_str(&text).unwrap();
    parsed["items"].as_array().cloned().unwrap_or_default()
}

/// The reservation pods of VM `namespace/name`.
fn reservations(g: &ClusterDriver, namespace: &str, name: &str) -> Vec<Value> {
    list(
        g,
        &[
            "pods",
            "-n",
            namespace,
            "-l",
            &format!("godwit.dev/vm={name},godwit.dev/reservation=true"),
        ],
    )
}

fn pod_node(pod: &Value) -> String {
    pod["spec"]["nodeName"].as_str().unwrap_or("").to_string()
}

fn condition<'a>(vm: &'a Value, type_: &str) -> Option<&'a Value> {
    vm["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

fn events_of(g: &ClusterDriver, namespace: &str, name: &str) -> String {
    g.kubectl(
        &[
            "get",
            "events",
            "-n",
            namespace,
            "--field-selector",
            &format!("involvedObject.name={name}"),
        ],
        None,
    )
    .unwrap_or_default()
}

#[test]
fn a_vm_holds_a_reservation_on_its_node_two_while_it_migrates() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let started = Instant::now();
    let g = cluster("pod", 3, &[]);
    // Guest pages dirtied all the time and a capped stream: the migration
    // lasts seconds, long enough to see both reservations.
    g.apply(&vm_manifest(
        &g,
        "default",
        "res-a",
        "128Mi",
        "hb_ms=100 dirty_mib=16 dirty_rate=2000",
        None,
    ))
    .unwrap();
    let vm = g.wait_running("res-a", Duration::from_secs(60)).unwrap();
    let source = node_of(&vm);
    let pods = reservations(&g, "default", "res-a");
    assert_eq!(pods.len(), 1, "{pods:?}");
    let pod = &pods[0];
    assert_eq!(pod_node(pod), source);
    assert_eq!(
        pod["metadata"]["name"],
        format!("godwit-reserve-res-a-{source}")
    );
    let c = &pod["spec"]["containers"][0];
    assert_eq!(c["image"], "registry.k8s.io/pause:3.9");
    assert_eq!(c["resources"]["requests"]["cpu"], "100m", "1 vCPU / 10");
    assert_eq!(
        c["resources"]["requests"]["memory"], "256Mi",
        "128 MiB + 128 MiB"
    );
    assert_eq!(c["resources"]["limits"]["memory"], "256Mi");
    let owner = &pod["metadata"]["ownerReferences"][0];
    assert_eq!(owner["kind"], "VirtualMachine");
    assert_eq!(owner["name"], "res-a");
    assert_eq!(owner["uid"], vm["metadata"]["uid"]);
    assert_eq!(owner["controller"], true);
    assert_eq!(owner["blockOwnerDeletion"], true);
    let pdb = g.kubectl(&["get", "pdb"], None).unwrap();
    println!("{pdb}");
    let row = pdb
        .lines()
        .find(|l| l.starts_with("godwit-vm-res-a"))
        .unwrap_or_else(|| panic!("no budget: {pdb}"));
    assert_eq!(row.split_whitespace().nth(1), Some("1"), "{pdb}");

    g.apply(
        "apiVersion: godwit.dev/v1alpha1\nkind: VMMigration\nmetadata:\n  name: res-a-move\n  namespace: default\nspec:\n  vmName: res-a\n  mode: Live\n  policy:\n    allowPostCopy: false\n    bandwidthMbps: 100\n",
    )
    .unwrap();
    let mut most = 0;
    let mut nodes_seen = BTreeSet::new();
    let t0 = Instant::now();
    let migration = g
        .wait("the migration to end", Duration::from_secs(120), || {
            let m = g.get("vmmigration", "res-a-move")?;
            let pods = reservations(&g, "default", "res-a");
            if pods.len() >= most {
                most = pods.len();
                nodes_seen.extend(pods.iter().map(pod_node));
            }
            Ok(m.filter(|m| {
                matches!(
                    m["status"]["phase"].as_str(),
                    Some("Succeeded" | "Failed" | "Cancelled")
                )
            }))
        })
        .unwrap();
    println!(
        "migration {} after {:?}; at most {most} reservations, on {nodes_seen:?}",
        migration["status"]["phase"],
        t0.elapsed()
    );
    assert_eq!(migration["status"]["phase"], "Succeeded", "{migration}");
    let target = migration["status"]["targetNode"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(most, 2, "two reservations while it migrated");
    assert_eq!(nodes_seen, BTreeSet::from([source.clone(), target.clone()]));
    let pods = g
        .wait(
            "one reservation, on the target",
            Duration::from_secs(20),
            || {
                let pods = reservations(&g, "default", "res-a");
                Ok((pods.len() == 1 && pod_node(&pods[0]) == target).then_some(pods))
            },
        )
        .unwrap();
    assert_eq!(
        pods[0]["metadata"]["name"],
        format!("godwit-reserve-res-a-{target}")
    );

    g.kubectl(&["delete", "gvm", "res-a", "--wait=false"], None)
        .unwrap();
    g.wait(
        "the reservation and budget to go with the VM",
        Duration::from_secs(60),
        || {
            let pods = reservations(&g, "default", "res-a");
            let budget = g.get("pdb", "godwit-vm-res-a")?;
            Ok((pods.is_empty() && budget.is_none()).then_some(()))
        },
    )
    .unwrap();
    println!("reservation test took {:?}", started.elapsed());
}

#[test]
fn a_quota_for_one_vm_admits_one_and_holds_the_second() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let started = Instant::now();
    let g = cluster("quota", 2, &[]);
    let ns = format!("quota-{}", std::process::id());
    g.kubectl(&["create", "namespace", &ns], None).unwrap();
    // One VM of 64 MiB takes 64 + 128 MiB.
    g.apply(&format!(
        "apiVersion: v1\nkind: ResourceQuota\nmetadata:\n  name: one-vm\n  namespace: {ns}\nspec:\n  hard:\n    requests.memory: 192Mi\n"
    ))
    .unwrap();
    g.apply(&vm_manifest(&g, &ns, "first", "64Mi", "hb_ms=100", None))
        .unwrap();
    let running = |name: &str| -> anyhow::Result<Option<Value>> {
        let text = g.kubectl(&["get", "gvm", name, "-n", &ns, "-o", "json"], None)?;
        let vm: Value = serde_json::from_str(&text)?;
        Ok((vm["status"]["phase"] == "Running").then_some(vm))
    };
    g.wait("first to run", Duration::from_secs(60), || running("first"))
        .unwrap();
    let used = g
        .kubectl(
            &[
                "get",
                "quota",
                "one-vm",
                "-n",
                &ns,
                "-o",
                "jsonpath={.status.used.requests\\.memory}",
            ],
            None,
        )
        .unwrap();
    assert_eq!(used, "192Mi");

    g.apply(&vm_manifest(&g, &ns, "second", "64Mi", "hb_ms=100", None))
        .unwrap();
    let held = g
        .wait(
            "second to be held by the quota",
            Duration::from_secs(30),
            || {
                let text = g.kubectl(&["get", "gvm", "second", "-n", &ns, "-o", "json"], None)?;
                let vm: Value = serde_json::from_str(&text)?;
                let held = condition(&vm, "Scheduled")
                    .is_some_and(|c| c["status"] == "False" && c["reason"] == "QuotaExceeded");
                Ok(held.then_some(vm))
            },
        )
        .unwrap();
    let c = condition(&held, "Scheduled").unwrap();
    let message = c["message"].as_str().unwrap();
    println!("second: {message}");
    assert!(
        message.contains("exceeded quota: one-vm, requested: requests.memory=192Mi, used: requests.memory=192Mi, limited: requests.memory=192Mi"),
        "{message}"
    );
    assert_eq!(held["status"]["phase"], "Pending");
    assert!(
        node_of(&held).is_empty(),
        "a refused VM gets no node: {held}"
    );
    assert!(reservations(&g, &ns, "second").is_empty());
    let events = events_of(&g, &ns, "second");
    assert!(events.contains("QuotaExceeded"), "{events}");

    // Room again once the first VM and its reservation are gone.
    g.kubectl(&["delete", "gvm", "first", "-n", &ns, "--wait=false"], None)
        .unwrap();
    g.wait(
        "second to run once first is gone",
        Duration::from_secs(90),
        || running("second"),
    )
    .unwrap();
    assert_eq!(reservations(&g, &ns, "second").len(), 1);
    println!("quota test took {:?}", started.elapsed());
}

/// Applies `count` one-vCPU 64 MiB VMs `oc-<i>`, one manifest.
fn apply_many(g: &ClusterDriver, range: std::ops::Range<usize>) {
    let all: Vec<String> = range
        .map(|i| vm_manifest(g, "default", &format!("oc-{i}"), "64Mi", "hb_ms=1000", None))
        .collect();
    g.apply(&all.join("---\n")).unwrap();
}

fn wait_all_running(g: &ClusterDriver, count: usize, timeout: Duration) -> Vec<Value> {
    g.wait(&format!("{count} VMs to run"), timeout, || {
        let vms = list(g, &["gvm"]);
        let running: Vec<Value> = vms
            .into_iter()
            .filter(|v| v["status"]["phase"] == "Running")
            .collect();
        Ok((running.len() >= count).then_some(running))
    })
    .unwrap_or_else(|e| {
        // Where each VM got to, and for one not running why (its Scheduled
        // condition), so a CI log says which side held it.
        let phases: Vec<String> = list(g, &["gvm"])
            .iter()
            .map(|v| {
                let mut line = format!("{}={}", v["metadata"]["name"], v["status"]["phase"]);
                if v["status"]["phase"] != "Running" {
                    if let Some(c) = condition(v, "Scheduled") {
                        line += &format!(" ({}: {})", c["reason"], c["message"]);
                    }
                }
                line
            })
            .collect();
        panic!("{e:#}: {phases:?}")
    })
}

#[test]
fn vcpus_are_overcommitted_by_the_allocation_ratio() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let started = Instant::now();
    {
        let g = cluster("ratio10", 3, &[]);
        apply_many(&g, 0..30);
        let running = wait_all_running(&g, 30, Duration::from_secs(240));
        let mut per_node = std::collections::BTreeMap::<String, usize>::new();
        for vm in &running {
            *per_node.entry(node_of(vm)).or_default() += 1;
        }
        println!(
            "ratio 10: 30 VMs Running after {:?}: {per_node:?}",
            started.elapsed()
        );
        let pods = list(&g, &["pods", "-l", "godwit.dev/reservation=true"]);
        assert_eq!(pods.len(), 30);
        assert!(pods
            .iter()
            .all(|p| p["spec"]["containers"][0]["resources"]["requests"]["cpu"] == "100m"));
    }
    let t1 = Instant::now();
    let g = cluster("ratio1", 3, &["--cpu-allocation-ratio=1"]);
    apply_many(&g, 0..12);
    wait_all_running(&g, 12, Duration::from_secs(120));
    apply_many(&g, 12..13);
    let held = g
        .wait(
            "the 13th VM to be unschedulable",
            Duration::from_secs(30),
            || {
                let vm = g.get("gvm", "oc-12")?;
                Ok(vm.filter(|vm| {
                    condition(vm, "Scheduled")
                        .is_some_and(|c| c["status"] == "False" && c["reason"] == "Unschedulable")
                }))
            },
        )
        .unwrap();
    let message = condition(&held, "Scheduled").unwrap()["message"]
        .as_str()
        .unwrap()
        .to_string();
    println!("ratio 1: 12 Running, 13th: {message} ({:?})", t1.elapsed());
    assert!(
        message.contains("insufficient cpu (need 1000m, free 0m)"),
        "{message}"
    );
    let events = events_of(&g, "default", "oc-12");
    assert!(
        events.contains("Unschedulable") && events.contains("insufficient cpu"),
        "{events}"
    );
    println!("overcommit test took {:?}", started.elapsed());
}

#[test]
fn cordon_evacuates_by_live_migration_and_the_old_reservation_goes() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let started = Instant::now();
    let g = cluster("cordon", 2, &[]);
    let ip = "10.88.0.41";
    g.apply(&vm_manifest(
        &g,
        "default",
        "cordoned",
        "128Mi",
        "hb_ms=50",
        Some(ip),
    ))
    .unwrap();
    let vm = g.wait_running("cordoned", Duration::from_secs(60)).unwrap();
    let old = node_of(&vm);
    assert_eq!(pod_node(&reservations(&g, "default", "cordoned")[0]), old);
    let pdb = g.kubectl(&["get", "pdb"], None).unwrap();
    assert!(pdb.contains("godwit-vm-cordoned"), "{pdb}");

    let stop = Arc::new(AtomicBool::new(false));
    let last = Arc::new(AtomicU64::new(0));
    let (s, l) = (stop.clone(), last.clone());
    let addr = format!("{ip}:7777");
    let client = g
        .cluster
        .fabric
        .client
        .spawn_in(move || watch_heartbeats(&addr, &s, &l))
        .unwrap();
    g.wait("heartbeats", Duration::from_secs(30), || {
        Ok((last.load(Ordering::Relaxed) > 10).then_some(()))
    })
    .unwrap();
    let before = last.load(Ordering::Relaxed);

    g.kubectl(&["cordon", &old], None).unwrap();
    let t0 = Instant::now();
    let moved = g
        .wait(
            "the VM to leave the cordoned node",
            Duration::from_secs(90),
            || {
                let vm = g.get("gvm", "cordoned")?;
                Ok(vm.filter(|v| v["status"]["phase"] == "Running" && node_of(v) != old))
            },
        )
        .unwrap();
    let new = node_of(&moved);
    println!("moved from {old} to {new} in {:?}", t0.elapsed());
    let migrations = list(
        &g,
        &["vmmigration", "-l", &format!("godwit.dev/evacuation={old}")],
    );
    assert!(
        migrations.iter().any(|m| m["spec"]["vmName"] == "cordoned"
            && m["status"]["phase"] == "Succeeded"
            && m["spec"]["mode"] != "Cold"),
        "not moved by a live migration: {migrations:?}"
    );
    g.wait("the old reservation to go", Duration::from_secs(20), || {
        let pods = reservations(&g, "default", "cordoned");
        Ok((pods.len() == 1 && pod_node(&pods[0]) == new).then_some(()))
    })
    .unwrap();
    g.wait("heartbeats after the move", Duration::from_secs(10), || {
        Ok((last.load(Ordering::Relaxed) > before + 20).then_some(()))
    })
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    let seen = client
        .join()
        .expect("client thread")
        .expect("client namespace");
    assert!(
        seen.error.is_none() && seen.in_order,
        "the TCP connection did not survive the cordon: {seen:?}"
    );
    let pdb = g.kubectl(&["get", "pdb"], None).unwrap();
    println!("{pdb}");
    assert!(pdb.contains("godwit-vm-cordoned"), "{pdb}");
    g.kubectl(&["uncordon", &old], None).unwrap();
    println!("cordon test took {:?}", started.elapsed());
}
