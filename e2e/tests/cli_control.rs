//! `kubectl godwit` commands that control a VM without moving it by hand,
//! as a user runs them through real `kubectl` on a two-node local cluster:
//!
//! - `completion bash` prints a script without a cluster;
//! - `version` prints the plugin's version, the API server's `/version` and
//!   the operator Deployment's image (or "not found" without one);
//! - `create vm --from-template` prints a manifest that `kubectl apply`
//!   takes, and the VM runs;
//! - `pause` stops the guest's heartbeat (the `HB n` lines on its console)
//!   and `unpause` resumes it, with the VM's `Paused` condition following;
//! - `migrate-cancel` with no migration is a clear error, and on a slow
//!   live migration leaves the VM on its source (the same VMM) and the
//!   VMMigration ends `Cancelled`;
//! - a paused VM that is live-migrated is paused again on the target.
//!
//! Needs the release binaries (`cargo build --release -p godwit-node
//! -p godwit-operator -p godwit-cli --bins`) and /dev/kvm.

use std::ffi::OsString;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use godwit_e2e::driver::{ClusterDriver, EXAMPLE_TEMPLATE};
use serde_json::Value;

/// `kubectl <args>` on the host with the plugin on PATH and the cluster's kubeconfig.
fn kubectl(g: &ClusterDriver, plugin_dir: &Path, args: &[&str]) -> Output {
    let mut path = OsString::from(plugin_dir);
    path.push(":");
    path.push(std::env::var_os("PATH").unwrap_or_default());
    Command::new("kubectl")
        .args(args)
        .env("PATH", path)
        .env("KUBECONFIG", &g.cluster.kubeconfig)
        .output()
        .expect("run kubectl")
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

/// `kubectl godwit <args>`: its stdout, failing the test with its stderr.
fn godwit_ok(g: &ClusterDriver, plugin_dir: &Path, args: &[&str]) -> String {
    let mut all = vec!["godwit"];
    all.extend(args);
    let out = kubectl(g, plugin_dir, &all);
    assert!(
        out.status.success(),
        "kubectl godwit {args:?}: {}",
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// `kubectl godwit <args>`, which must fail: its stderr.
fn godwit_err(g: &ClusterDriver, plugin_dir: &Path, args: &[&str]) -> String {
    let mut all = vec!["godwit"];
    all.extend(args);
    let out = kubectl(g, plugin_dir, &all);
    let err = text(&out.stderr);
    assert!(
        !out.status.success(),
        "kubectl godwit {args:?} succeeded: {err}"
    );
    err
}

/// The number of the last `HB n` line on the console log in `vm_dir`.
fn last_heartbeat(vm_dir: &Path) -> Option<u64> {
    let log = std::fs::read_to_string(vm_dir.join("console.log")).ok()?;
    log.lines().rev().find_map(|l| {
        l.strip_prefix("HB ")?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

/// The VM's `Paused` condition: (status, reason, message).
fn paused_condition(vm: &Value) -> Option<(String, String, String)> {
    vm["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Paused")
        .map(|c| {
            let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
            (s("status"), s("reason"), s("message"))
        })
}

/// Waits until VM `name`'s `Paused` condition has `status` and its
/// message names `node`.
fn wait_paused(g: &ClusterDriver, name: &str, status: &str, node: &str) {
    g.wait(
        &format!("VM {name}'s Paused condition to be {status} on {node}"),
        Duration::from_secs(30),
        || {
            let vm = g.get("gvm", name)?;
            Ok(vm
                .as_ref()
                .and_then(paused_condition)
                .filter(|(s, _, m)| s == status && m.contains(node))
                .map(|_| ()))
        },
    )
    .unwrap();
}

/// Asserts the heartbeat in `vm_dir` does not move for two seconds (the
/// guest beats every 50 ms); returns its number (0 before the first).
fn assert_heartbeat_stopped(vm_dir: &Path) -> u64 {
    std::thread::sleep(Duration::from_millis(500));
    let before = last_heartbeat(vm_dir);
    std::thread::sleep(Duration::from_secs(2));
    let after = last_heartbeat(vm_dir);
    assert_eq!(before, after, "the guest beat while paused");
    after.unwrap_or(0)
}

/// Waits until the heartbeat in `vm_dir` passes `beyond`.
fn wait_heartbeat_past(g: &ClusterDriver, vm_dir: &Path, beyond: u64) {
    g.wait(
        &format!("heartbeats past HB {beyond}"),
        Duration::from_secs(10),
        || {
            Ok(last_heartbeat(vm_dir)
                .filter(|n| *n > beyond + 10)
                .map(|_| ()))
        },
    )
    .unwrap();
}

/// A live migration of VM `made` to `target` that copies its node-local
/// root disk; with `slow`, slow enough to be cancelled: a 20 Mbit/s cap
/// against a guest that dirties 40 MB/s, with neither post-copy nor
/// auto-converge to finish it.
fn migration(name: &str, target: &str, slow: bool) -> String {
    let policy = if slow {
        "  policy:\n    bandwidthMbps: 20\n    allowPostCopy: false\n    allowAutoConverge: false\n    completionTimeoutSeconds: 600\n"
    } else {
        ""
    };
    format!(
        "apiVersion: godwit.dev/v1alpha1\nkind: VMMigration\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  vmName: made\n  targetNode: {target}\n  mode: Live\n  storage: Copy\n{policy}"
    )
}

fn wait_migration_phase(g: &ClusterDriver, name: &str, phases: &[&str]) -> Value {
    let waited = g.wait(
        &format!("migration {name} to reach {phases:?}"),
        Duration::from_secs(180),
        || {
            let m = g.get("gvmm", name)?;
            Ok(m.filter(|m| {
                m["status"]["phase"]
                    .as_str()
                    .is_some_and(|p| phases.contains(&p))
            }))
        },
    );
    waited.unwrap_or_else(|e| {
        let m = g.get("gvmm", name).ok().flatten().unwrap_or_default();
        let vm = g.get("gvm", "made").ok().flatten().unwrap_or_default();
        let logs = g.cluster.dir().join("logs");
        let mut tails = String::new();
        for f in std::fs::read_dir(&logs).into_iter().flatten().flatten() {
            let t = std::fs::read_to_string(f.path()).unwrap_or_default();
            let last: Vec<&str> = t.lines().rev().take(15).collect();
            tails += &format!(
                "\n== {}\n{}",
                f.path().display(),
                last.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        panic!("{e:#}\nmigration: {m}\nVM status: {}{tails}", vm["status"])
    })
}

const OPERATOR_DEPLOYMENT: &str = r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: godwit-operator
  namespace: default
  labels:
    app.kubernetes.io/name: godwit
    app.kubernetes.io/instance: godwit
    app.kubernetes.io/component: operator
spec:
  replicas: 1
  selector:
    matchLabels:
      app.kubernetes.io/name: godwit
      app.kubernetes.io/component: operator
  template:
    metadata:
      labels:
        app.kubernetes.io/name: godwit
        app.kubernetes.io/component: operator
    spec:
      containers:
        - name: operator
          image: localhost/godwit:cli-test
"#;

#[test]
fn kubectl_godwit_pauses_cancels_migrations_creates_from_templates_and_tells_versions() {
    let (plugin, plugin_dir) = godwit_e2e::driver::kubectl_plugin();

    // completion needs no cluster.
    let out = Command::new(&plugin)
        .args(["completion", "bash"])
        .env("KUBECONFIG", "/nonexistent")
        .output()
        .unwrap();
    let script = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        script.contains("default kubectl-godwit") && script.contains("migrate-cancel"),
        "{script}"
    );

    let dir = std::env::temp_dir().join(format!("godwit-cli-control-{}", std::process::id()));
    let g = ClusterDriver::up(2, &dir).expect("local cluster with Godwit");

    // version: the client, the API server, and no operator Deployment
    // (the local cluster runs the operator as a process) until one exists.
    let shown = godwit_ok(&g, &plugin_dir, &["version"]);
    assert!(
        shown.contains(&format!(
            "client: kubectl-godwit {}",
            env!("CARGO_PKG_VERSION")
        )),
        "{shown}"
    );
    assert!(
        shown.contains("server: Kubernetes v1.33.0-godwit-apiserver"),
        "{shown}"
    );
    assert!(shown.contains("operator: not found"), "{shown}");
    g.apply(OPERATOR_DEPLOYMENT).unwrap();
    let shown = godwit_ok(&g, &plugin_dir, &["version"]);
    assert!(
        shown.contains("operator: localhost/godwit:cli-test (deployment default/godwit-operator)"),
        "{shown}"
    );

    // create vm --from-template: a missing template is a clear error; the
    // manifest of an existing one applies and runs.
    let err = godwit_err(
        &g,
        &plugin_dir,
        &["create", "vm", "made", "--from-template", "testguest"],
    );
    assert!(
        err.contains(r#"VMTemplate "testguest" not found"#)
            && err.contains("kubectl get vmtemplates"),
        "{err}"
    );
    g.apply(&g.example(EXAMPLE_TEMPLATE)).unwrap();
    let manifest = godwit_ok(
        &g,
        &plugin_dir,
        &["create", "vm", "made", "--from-template", "testguest"],
    );
    assert!(manifest.contains("kind: VirtualMachine"), "{manifest}");
    assert!(
        g.get("gvm", "made").unwrap().is_none(),
        "create only prints"
    );
    g.kubectl(&["apply", "-f", "-"], Some(&manifest)).unwrap();
    let vm = g.wait_running("made", Duration::from_secs(90)).unwrap();
    assert_eq!(vm["spec"]["templateRef"]["name"], "testguest");
    let source = vm["status"]["nodeName"].as_str().unwrap().to_string();
    let i = g.node_index(&source).unwrap();
    let target = g.cluster.fabric.nodes[1 - i].name.clone();
    let src_dir = g.vm_dir(i, "default", "made");
    g.wait("heartbeats", Duration::from_secs(30), || {
        Ok(last_heartbeat(&src_dir).map(|_| ()))
    })
    .unwrap();

    // pause / unpause: errors that say what to do, then the heartbeat
    // stops and comes back, and the Paused condition follows.
    let err = godwit_err(&g, &plugin_dir, &["pause", "nope"]);
    assert!(
        err.contains(r#"VirtualMachine "nope" not found"#) && err.contains("kubectl get gvm"),
        "{err}"
    );
    let shown = godwit_ok(&g, &plugin_dir, &["pause", "made"]);
    assert!(shown.contains("kubectl godwit unpause made"), "{shown}");
    wait_paused(&g, "made", "True", &source);
    let vm = g.get("gvm", "made").unwrap().unwrap();
    assert_eq!(paused_condition(&vm).unwrap().1, "PausedByUser");
    assert_eq!(vm["status"]["phase"], "Running");
    let stopped_at = assert_heartbeat_stopped(&src_dir);
    let shown = godwit_ok(&g, &plugin_dir, &["status", "made"]);
    assert!(shown.contains("Paused=True PausedByUser"), "{shown}");
    let shown = godwit_ok(&g, &plugin_dir, &["unpause", "made"]);
    assert!(shown.contains("unpause requested"), "{shown}");
    wait_paused(&g, "made", "False", &source);
    wait_heartbeat_past(&g, &src_dir, stopped_at);
    let shown = godwit_ok(&g, &plugin_dir, &["unpause", "made"]);
    assert!(shown.contains("is not paused"), "{shown}");

    // migrate-cancel without a migration says so.
    let err = godwit_err(&g, &plugin_dir, &["migrate-cancel", "made"]);
    assert!(
        err.contains("no migration under way") && err.contains("kubectl get gvmm"),
        "{err}"
    );

    // migrate-cancel on a migration that cannot finish soon: the VM stays
    // on its source, in the same VMM.
    let pid = std::fs::read_to_string(src_dir.join("pid")).unwrap();
    g.apply(&migration("slow", &target, true)).unwrap();
    wait_migration_phase(&g, "slow", &["PreCopy"]);
    std::thread::sleep(Duration::from_secs(2));
    let shown = godwit_ok(&g, &plugin_dir, &["migrate-cancel", "made"]);
    assert!(
        shown.contains("vmmigration/slow cancel requested") && shown.contains(&source),
        "{shown}"
    );
    let m = wait_migration_phase(&g, "slow", &["Succeeded", "Failed", "Cancelled"]);
    assert_eq!(m["status"]["phase"], "Cancelled", "{}", m["status"]);
    let vm = g
        .wait("the VM to run again", Duration::from_secs(30), || {
            let vm = g.get("gvm", "made")?;
            Ok(vm.filter(|v| {
                v["status"]["phase"] == "Running" && v["status"]["migration"].is_null()
            }))
        })
        .unwrap();
    assert_eq!(vm["status"]["nodeName"], source.as_str());
    assert_eq!(
        std::fs::read_to_string(src_dir.join("pid")).unwrap(),
        pid,
        "the source's VMM was replaced"
    );
    let beat = last_heartbeat(&src_dir).unwrap();
    wait_heartbeat_past(&g, &src_dir, beat);
    let err = godwit_err(&g, &plugin_dir, &["migrate-cancel", "made"]);
    assert!(err.contains("no migration under way"), "{err}");

    // A paused VM that is live-migrated is paused again on the target.
    godwit_ok(&g, &plugin_dir, &["pause", "made"]);
    wait_paused(&g, "made", "True", &source);
    g.apply(&migration("paused", &target, false)).unwrap();
    let m = wait_migration_phase(&g, "paused", &["Succeeded", "Failed", "Cancelled"]);
    assert_eq!(m["status"]["phase"], "Succeeded", "{}", m["status"]);
    wait_paused(&g, "made", "True", &target);
    let dst_dir = g.vm_dir(1 - i, "default", "made");
    assert_heartbeat_stopped(&dst_dir);
    godwit_ok(&g, &plugin_dir, &["unpause", "made"]);
    wait_paused(&g, "made", "False", &target);
    let beat = last_heartbeat(&dst_dir).unwrap_or(0);
    wait_heartbeat_past(&g, &dst_dir, beat);

    // `migrate` of a VM with a node-local disk asks for the disk's copy
    // (storage: Copy): the VM comes back to the source node.
    let shown = godwit_ok(
        &g,
        &plugin_dir,
        &["migrate", "made", "--to", &source, "--follow"],
    );
    let vm = g.wait_running("made", Duration::from_secs(60)).unwrap();
    assert_eq!(vm["status"]["nodeName"], source.as_str(), "{shown}");
    let beat = last_heartbeat(&src_dir).unwrap_or(0);
    wait_heartbeat_past(&g, &src_dir, beat);
    drop(g);
}
