//! `kubectl godwit` commands that control a VM without moving it by hand,
//! as a user runs them through real `kubectl` on a two-node local cluster:
//!
//! - `completion bash` prints a script without a cluster;
//! - `version` prints the plugin's version, the API server's `/version` and
//!   the operator Deployment's image (or "not found" without one);
//! - `create vm --from-template` prints a manifest that `kubectl apply`
//!   takes, and the VM runs;
//! - `port-forward made :7777` listens on a free local port and relays a
//!   connection to the guest's heartbeat server through the API server;
//!   `ssh` and `scp` run the local OpenSSH client with `port-forward
//!   --stdio` as its ProxyCommand (stand-in `ssh` and `scp` on PATH, since
//!   the test guest has no sshd: they run the ProxyCommand as OpenSSH would
//!   and read the guest's heartbeat through it);
//! - `pause` stops the guest's heartbeat (the `HB n` lines on its console)
//!   and `unpause` resumes it, with the VM's `Paused` condition following;
//!   the operator's `Scheduled` and the agent's `Ready` and `Paused` stand
//!   side by side, each applied by its own field manager;
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

/// `dirs` before `PATH`.
fn path_with(dirs: &[&Path]) -> OsString {
    let mut path = OsString::new();
    for d in dirs {
        path.push(d);
        path.push(":");
    }
    path.push(std::env::var_os("PATH").unwrap_or_default());
    path
}

/// `kubectl <args>` on the host with the plugin on PATH and the cluster's kubeconfig.
fn kubectl(g: &ClusterDriver, plugin_dir: &Path, args: &[&str]) -> Output {
    Command::new("kubectl")
        .args(args)
        .env("PATH", path_with(&[plugin_dir]))
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

/// A stand-in for OpenSSH's `ssh` and `scp` (the test guest runs no
/// sshd): prints its arguments, runs the `-o ProxyCommand=` as OpenSSH does
/// (`sh -c`, `%%` for `%`) and prints the first line the guest sends
/// through it.
const OPENSSH_STAND_IN: &str = r#"#!/usr/bin/env python3
import os, subprocess, sys
args = sys.argv[1:]
proxy = next(args[i + 1][len("ProxyCommand="):] for i, a in enumerate(args)
             if a == "-o" and args[i + 1].startswith("ProxyCommand="))
print("%s ARGS %s" % (os.path.basename(sys.argv[0]), " ".join(args[2:])), flush=True)
print("PROXY %s" % proxy, flush=True)
p = subprocess.Popen(["sh", "-c", "exec " + proxy.replace("%%", "%")],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
line = p.stdout.readline().decode().strip()
p.kill()
p.wait()
print("GUEST SAID %s" % line, flush=True)
if not line:
    print("PROXY STDERR %s" % p.stderr.read().decode(), flush=True)
    sys.exit(1)
"#;

/// `kubectl godwit port-forward made :7777` in the background: the local
/// address it listens on, read from its `Forwarding from` line.
fn port_forward(g: &ClusterDriver, plugin_dir: &Path) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut child = Command::new("kubectl")
        .args(["godwit", "port-forward", "made", ":7777"])
        .env("PATH", path_with(&[plugin_dir]))
        .env("KUBECONFIG", &g.cluster.kubeconfig)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .strip_prefix("Forwarding from ")
        .and_then(|l| l.strip_suffix(" -> 7777\n"))
        .unwrap_or_else(|| panic!("port-forward printed {line:?}"))
        .to_string();
    (child, addr)
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
fn kubectl_godwit_forwards_pauses_cancels_migrations_creates_from_templates_and_tells_versions() {
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

    // port-forward: a free local port relays to the guest's port 7777
    // (its heartbeat server), through the API server.
    let (mut forward, addr) = port_forward(&g, &plugin_dir);
    let beats = {
        use std::io::Read;
        let mut tcp = std::net::TcpStream::connect(&addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while String::from_utf8_lossy(&got).matches("HB ").count() < 3 {
            let n = tcp.read(&mut buf).expect("heartbeats through the forward");
            assert!(n > 0, "the forward closed: {}", text(&got));
            got.extend_from_slice(&buf[..n]);
        }
        text(&got)
    };
    let _ = forward.kill();
    let _ = forward.wait();
    println!(
        "port-forward {addr}: {}",
        beats.lines().next().unwrap_or("")
    );
    let err = godwit_err(&g, &plugin_dir, &["port-forward", "made", "--stdio", "1:2"]);
    assert!(err.contains("give only REMOTE"), "{err}");

    // ssh and scp: the local client with port-forward --stdio as its
    // ProxyCommand (the stand-ins run it and print what the guest sent).
    let stand_ins = dir.join("openssh");
    std::fs::create_dir_all(&stand_ins).unwrap();
    for tool in ["ssh", "scp"] {
        use std::os::unix::fs::PermissionsExt;
        let path = stand_ins.join(tool);
        std::fs::write(&path, OPENSSH_STAND_IN).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let with_openssh = |args: &[&str]| -> String {
        let out = Command::new("kubectl")
            .args(args)
            .env("PATH", path_with(&[&stand_ins, &plugin_dir]))
            .env("KUBECONFIG", &g.cluster.kubeconfig)
            .output()
            .unwrap();
        let shown = text(&out.stdout);
        assert!(
            out.status.success(),
            "{args:?}: {shown}{}",
            text(&out.stderr)
        );
        shown
    };
    let shown = with_openssh(&[
        "godwit",
        "ssh",
        "-p",
        "7777",
        "root@made",
        "--",
        "uname",
        "-a",
    ]);
    assert!(
        shown.contains("ssh ARGS root@made.default -- uname -a")
            && shown.contains("--namespace='default' port-forward --stdio 'made' 7777\n")
            && shown.contains("GUEST SAID HB "),
        "{shown}"
    );
    let shown = with_openssh(&[
        "godwit",
        "scp",
        "-P",
        "7777",
        "-r",
        "./conf",
        "made:/etc/app",
    ]);
    assert!(
        shown.contains("scp ARGS -r ./conf made.default:/etc/app")
            && shown.contains("GUEST SAID HB "),
        "{shown}"
    );
    let err = godwit_err(&g, &plugin_dir, &["ssh", "root@nope"]);
    assert!(err.contains(r#"VirtualMachine "nope" not found"#), "{err}");

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
    // The operator's and the agent's conditions side by side, each applied
    // by its own field manager (none rewrites the list).
    let mut types: Vec<&str> = vm["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["type"].as_str())
        .collect();
    types.sort();
    assert_eq!(types, ["Paused", "Ready", "Scheduled"], "{}", vm["status"]);
    let fields: Value = serde_json::from_str(
        &g.kubectl(
            &["get", "gvm", "made", "-o", "json", "--show-managed-fields"],
            None,
        )
        .unwrap(),
    )
    .unwrap();
    let managers: Vec<&str> = fields["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["operation"] == "Apply")
        .filter_map(|f| f["manager"].as_str())
        .collect();
    for m in [
        "godwit-operator/Scheduled",
        "godwit-node/Ready",
        "godwit-node/Paused",
    ] {
        assert!(managers.contains(&m), "{m} not among {managers:?}");
    }
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
