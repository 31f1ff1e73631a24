//! The local demo: Godwit on a local cluster, driven with `kubectl` as a user
//! drives it, and a live migration you can watch.
//!
//! [`Godwit::up`] brings up a [`LocalCluster`] (API test server, namespace
//! nodes) with the operator and a node agent per node, and installs the test
//! guest and a root image where the examples expect them. [`run`] then applies
//! `examples/template.yaml` and `examples/vm.yaml`, waits for the VM to run,
//! connects a TCP client from the client namespace to the guest's heartbeat
//! server, applies `examples/migration.yaml`, prints the migration's progress
//! from its status while it runs, and checks what a user would check: the VM
//! runs on the other node, its heartbeat counter continued, the client's
//! connection survived. Everything is torn down at the end, also on failure.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

use crate::cluster::LocalCluster;
use crate::guest::{guest_elf, parse_heartbeat};
use crate::nodes::CLIENT_IP;

/// The example manifests, compiled in.
pub const EXAMPLE_TEMPLATE: &str = include_str!("../../examples/template.yaml");
/// See [`EXAMPLE_TEMPLATE`].
pub const EXAMPLE_VM: &str = include_str!("../../examples/vm.yaml");
/// See [`EXAMPLE_TEMPLATE`].
pub const EXAMPLE_MIGRATION: &str = include_str!("../../examples/migration.yaml");
/// Where the examples expect the kernel and images on a node.
pub const EXAMPLE_ROOT: &str = "/var/lib/godwit";
/// The example VM's address and heartbeat port.
pub const EXAMPLE_VM_ADDR: &str = "10.88.0.10:7777";

/// A local cluster running Godwit, with the test guest installed.
pub struct Godwit {
    /// The cluster (dropped last: it kills every process and removes its directory).
    pub cluster: LocalCluster,
    root: PathBuf,
}

impl Godwit {
    /// Brings up `nodes` nodes (4 vCPUs and 2 GiB for VMs each) with the
    /// operator and the agents, in `dir`.
    pub fn up(nodes: usize, dir: &Path) -> anyhow::Result<Godwit> {
        Godwit::up_with(nodes, dir, &[])
    }

    /// [`Godwit::up`] with extra operator flags.
    pub fn up_with(nodes: usize, dir: &Path, operator_args: &[&str]) -> anyhow::Result<Godwit> {
        if !Path::new("/dev/kvm").exists() {
            bail!("/dev/kvm does not exist: Godwit boots real VMs under KVM");
        }
        let elf = guest_elf()?;
        let mut cluster = LocalCluster::up(nodes, 4, 2048, dir)?;
        let root = dir.join("images-root");
        std::fs::create_dir_all(root.join("kernels"))?;
        std::fs::create_dir_all(root.join("images"))?;
        std::fs::copy(&elf, root.join("kernels/godwit-testguest.elf"))?;
        std::fs::File::create(root.join("images/testguest-root.raw"))?.set_len(64 << 20)?;
        cluster.operator_args = operator_args.iter().map(|a| a.to_string()).collect();
        cluster.start_godwit()?;
        Ok(Godwit { cluster, root })
    }

    /// An example manifest with the example paths moved under this cluster.
    pub fn example(&self, text: &str) -> String {
        text.replace(EXAMPLE_ROOT, &self.root.display().to_string())
    }

    /// `kubectl` with `stdin`; its stdout, or an error with its stderr.
    pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
        let mut child = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.cluster.kubeconfig)
            .arg("--cache-dir")
            .arg(self.cluster.dir().join("kube-cache"))
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("run kubectl")?;
        if let Some(text) = stdin {
            child
                .stdin
                .take()
                .expect("piped")
                .write_all(text.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `kubectl apply -f -`.
    pub fn apply(&self, manifest: &str) -> anyhow::Result<String> {
        self.kubectl(&["apply", "-f", "-"], Some(manifest))
    }

    /// `kubectl get <kind> <name> -o json`; `None` when it does not exist.
    pub fn get(&self, kind: &str, name: &str) -> anyhow::Result<Option<Value>> {
        match self.kubectl(&["get", kind, name, "-o", "json"], None) {
            Ok(text) => Ok(Some(serde_json::from_str(&text)?)),
            Err(e) if e.to_string().contains("NotFound") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `kubectl get <kind> <name> -o json --watch`: every version of the
    /// object from now on, as a user watching it sees them. Polling can miss
    /// a state that lasts less than a poll; a watch cannot.
    pub fn watch(&self, kind: &str, name: &str) -> anyhow::Result<Watch> {
        let mut child = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.cluster.kubeconfig)
            .arg("--cache-dir")
            .arg(self.cluster.dir().join("kube-cache"))
            .args(["get", kind, name, "-o", "json", "--watch"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("run kubectl get --watch")?;
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let objects = serde_json::Deserializer::from_reader(BufReader::new(stdout));
            for object in objects.into_iter::<Value>().map_while(Result::ok) {
                if tx.send(object).is_err() {
                    break;
                }
            }
        });
        Ok(Watch { child, rx })
    }

    /// Polls `check` every 100 ms until it returns `Some`, for at most `timeout`.
    pub fn wait<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut() -> anyhow::Result<Option<T>>,
    ) -> anyhow::Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = check()? {
                return Ok(v);
            }
            if Instant::now() > deadline {
                bail!(
                    "timed out after {timeout:?} waiting for {what}; logs in {}",
                    self.cluster.log_dir().display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until VM `name` is Running; returns its object.
    /// On a timeout the error says where the VM got to: its status
    /// (phase, node, conditions with their messages).
    pub fn wait_running(&self, name: &str, timeout: Duration) -> anyhow::Result<Value> {
        self.wait(&format!("VM {name} to run"), timeout, || {
            let vm = self.get("vm", name)?;
            Ok(vm.filter(|v| v["status"]["phase"] == "Running"))
        })
        .map_err(|e| {
            let status = match self.get("vm", name) {
                Ok(Some(vm)) => vm["status"].to_string(),
                Ok(None) => "no such VM".into(),
                Err(e) => format!("cannot read it: {e:#}"),
            };
            e.context(format!("VM {name}'s status: {status}"))
        })
    }

    /// The VM directory of `namespace/name` on node `i`.
    pub fn vm_dir(&self, i: usize, namespace: &str, name: &str) -> PathBuf {
        self.cluster
            .node_state_dir(i)
            .join("vms")
            .join(namespace)
            .join(name)
    }

    /// The index of node `name`.
    pub fn node_index(&self, name: &str) -> anyhow::Result<usize> {
        self.cluster
            .fabric
            .nodes
            .iter()
            .position(|n| n.name == name)
            .with_context(|| format!("no node {name}"))
    }
}

/// What the demo found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DemoReport {
    /// Always `migrate`.
    pub demo: &'static str,
    /// The VM's phase after the migration.
    pub vm_phase: String,
    /// The migration's final phase.
    pub migration_phase: String,
    /// Node the VM started on.
    pub source_node: String,
    /// Node it moved to.
    pub target_node: String,
    /// The client's TCP connection to the guest never broke.
    pub tcp_connection_survived: bool,
    /// The guest's heartbeat counter went on without a gap or reset across
    /// the move (seen over the client's connection, before and after).
    pub heartbeat_continued: bool,
    /// Source pause to target resume, from the migration's result.
    pub downtime_ms: f64,
    /// Start to end of the migration, from its result.
    pub total_ms: u64,
    /// The migration's status showed progress (bytes sent) while it ran.
    #[serde(skip)]
    pub progress_seen: bool,
}

fn say(quiet: bool, text: impl AsRef<str>) {
    if !quiet {
        println!("{}", text.as_ref());
    }
}

/// Runs the demo; `quiet` prints only errors (for `--json`).
pub fn run(quiet: bool) -> anyhow::Result<DemoReport> {
    let dir = std::env::temp_dir().join(format!("godwit-demo-{}", std::process::id()));
    say(
        quiet,
        "==> Local cluster: API server, 2 nodes (network namespaces), godwit-operator, a godwit-node agent per node",
    );
    let godwit = Godwit::up(2, &dir)?;
    say(
        quiet,
        format!(
            "    kubectl --kubeconfig {} get vm,vmmig",
            godwit.cluster.kubeconfig.display()
        ),
    );

    say(
        quiet,
        "==> kubectl apply -f examples/template.yaml -f examples/vm.yaml",
    );
    for m in [EXAMPLE_TEMPLATE, EXAMPLE_VM] {
        say(
            quiet,
            format!("    {}", godwit.apply(&godwit.example(m))?.trim()),
        );
    }
    let vm = godwit.wait_running("demo", Duration::from_secs(90))?;
    let source = vm["status"]["nodeName"].as_str().unwrap_or("?").to_string();
    say(
        quiet,
        format!(
            "    VM demo is Running on {source} at {}",
            vm["status"]["addresses"][0]["ip"].as_str().unwrap_or("?")
        ),
    );
    say(quiet, godwit.kubectl(&["get", "vm"], None)?.trim_end());

    say(
        quiet,
        format!("==> A client at {CLIENT_IP} connects to {EXAMPLE_VM_ADDR} and reads heartbeats"),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let last_seen = Arc::new(AtomicU64::new(0));
    let client = {
        let (stop, last) = (stop.clone(), last_seen.clone());
        godwit
            .cluster
            .fabric
            .client
            .spawn_in(move || watch(EXAMPLE_VM_ADDR, &stop, &last))?
    };
    // Let the workload touch its whole working set (128 MiB at 10000 pages/s).
    godwit.wait("heartbeats over TCP", Duration::from_secs(30), || {
        Ok((last_seen.load(Ordering::Relaxed) > 70).then_some(()))
    })?;
    let before = last_seen.load(Ordering::Relaxed);
    say(quiet, format!("    heartbeat {before} received"));

    say(quiet, "==> kubectl apply -f examples/migration.yaml");
    say(
        quiet,
        format!(
            "    {}",
            godwit.apply(&godwit.example(EXAMPLE_MIGRATION))?.trim()
        ),
    );
    let mut shown = String::new();
    let mut progress_seen = false;
    // Watch rather than poll: a short migration can go through its phases
    // faster than a poll. A watch that ends (a server timeout) is reopened;
    // it starts again from the current state.
    let mut watch = godwit.watch("vmmig", "demo-move")?;
    let mig = godwit.wait("the migration to end", Duration::from_secs(300), || {
        let m = match watch.next(Duration::from_millis(500)) {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(None),
            Err(_) => {
                watch = godwit.watch("vmmig", "demo-move")?;
                return Ok(None);
            }
        };
        let s = &m["status"];
        let p = &s["progress"];
        let line = if p.is_object() {
            format!(
                "    {:<15} round {:>2}  sent {:>7.1} MiB  remaining {:>6.1} MiB  dirty {:>6.1} MiB/s  bandwidth {:>7.1} MiB/s  expected downtime {} ms",
                s["phase"].as_str().unwrap_or("?"),
                p["round"],
                mib(&p["transferredBytes"]),
                mib(&p["memoryRemainingBytes"]),
                mib(&p["dirtyRateBytesPerSecond"]),
                mib(&p["bandwidthBytesPerSecond"]),
                p["expectedDowntimeMs"],
            )
        } else {
            format!(
                "    {:<15} {} -> {}",
                s["phase"].as_str().unwrap_or("Pending"),
                s["sourceNode"].as_str().unwrap_or("?"),
                s["targetNode"].as_str().unwrap_or("?")
            )
        };
        if line != shown {
            say(quiet, &line);
            shown = line;
        }
        let done = matches!(
            s["phase"].as_str(),
            Some("Succeeded" | "Failed" | "Cancelled")
        );
        progress_seen |= !done && p["transferredBytes"].as_u64() > Some(0);
        Ok(done.then_some(m))
    })?;
    let status = &mig["status"];
    let phase = status["phase"].as_str().unwrap_or("?").to_string();
    let target = status["targetNode"].as_str().unwrap_or("?").to_string();
    let result = &status["result"];
    if phase == "Succeeded" {
        say(
            quiet,
            format!(
                "    done: {} ms in all, {} ms downtime, {:.1} MiB sent in {} rounds ({})",
                result["totalTimeMs"],
                result["downtimeMs"],
                mib(&result["transferredBytes"]),
                result["rounds"],
                result["modeUsed"].as_str().unwrap_or("?"),
            ),
        );
    } else {
        say(
            quiet,
            format!(
                "    {phase}: {}",
                status["failureReason"].as_str().unwrap_or("?")
            ),
        );
    }

    // What a user checks afterwards: where the VM runs, and its guest.
    let vm = godwit.wait("the VM to settle", Duration::from_secs(30), || {
        let vm = godwit.get("vm", "demo")?;
        Ok(vm.filter(|v| v["status"]["phase"] != "Migrating"))
    })?;
    let vm_phase = vm["status"]["phase"].as_str().unwrap_or("?").to_string();
    let vm_node = vm["status"]["nodeName"].as_str().unwrap_or("?").to_string();
    say(
        quiet,
        godwit.kubectl(&["get", "vm,vmmig"], None)?.trim_end(),
    );
    let at_end = last_seen.load(Ordering::Relaxed);
    godwit.wait("heartbeats after the move", Duration::from_secs(10), || {
        Ok((last_seen.load(Ordering::Relaxed) >= at_end + 10).then_some(()))
    })?;
    stop.store(true, Ordering::Relaxed);
    let stream = client
        .join()
        .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    let survived = stream.error.is_none() && stream.count > 0;
    let continued = stream.in_order && stream.last > at_end && stream.first <= before;
    say(
        quiet,
        format!(
            "==> Client: heartbeats {}..{} over one connection, in order: {}, connection broke: {}",
            stream.first,
            stream.last,
            stream.in_order,
            stream.error.as_deref().unwrap_or("no")
        ),
    );
    say(quiet, "==> Tearing down");
    drop(godwit);
    Ok(DemoReport {
        demo: "migrate",
        vm_phase: if vm_node == target {
            vm_phase
        } else {
            format!("{vm_phase} on {vm_node}")
        },
        migration_phase: phase,
        source_node: source,
        target_node: target,
        tcp_connection_survived: survived,
        heartbeat_continued: continued,
        downtime_ms: result["downtimeMs"].as_f64().unwrap_or(0.0),
        total_ms: result["totalTimeMs"].as_u64().unwrap_or(0),
        progress_seen,
    })
}

/// Types `line` at the console of the VM whose directory is `vm_dir` (the
/// VMM's console socket).
pub fn type_at(vm_dir: &Path, line: &str) -> anyhow::Result<()> {
    let mut s = std::os::unix::net::UnixStream::connect(vm_dir.join("console.sock"))
        .with_context(|| format!("console of {}", vm_dir.display()))?;
    s.write_all(format!("{line}\n").as_bytes())?;
    Ok(())
}

/// Whether the console log of the VM in `vm_dir` contains `text`.
pub fn console_has(vm_dir: &Path, text: &str) -> bool {
    std::fs::read_to_string(vm_dir.join("console.log")).is_ok_and(|t| t.contains(text))
}

/// A running `kubectl get --watch` (see [`Godwit::watch`]); killed on drop.
pub struct Watch {
    child: std::process::Child,
    rx: std::sync::mpsc::Receiver<Value>,
}

impl Watch {
    /// The next version of the object; `Ok(None)` when none came within
    /// `timeout`, an error when the watch ended.
    pub fn next(&self, timeout: Duration) -> anyhow::Result<Option<Value>> {
        match self.rx.recv_timeout(timeout) {
            Ok(v) => Ok(Some(v)),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Ok(None),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                bail!("kubectl get --watch ended")
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mib(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0) / (1 << 20) as f64
}

/// What a TCP client of the guest's heartbeat server saw.
#[derive(Debug, Default)]
pub struct StreamSeen {
    /// Heartbeats read.
    pub count: usize,
    /// First and last counter.
    pub first: u64,
    /// See `first`.
    pub last: u64,
    /// Every counter was the previous one plus one.
    pub in_order: bool,
    /// Why the connection ended, if not because we stopped.
    pub error: Option<String>,
}

/// Connects to `addr` and reads heartbeat lines until `stop`, publishing the
/// latest counter in `last_seen`.
pub fn watch(addr: &str, stop: &AtomicBool, last_seen: &AtomicU64) -> StreamSeen {
    let deadline = Instant::now() + Duration::from_secs(30);
    let stream = loop {
        match TcpStream::connect(addr) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => {
                return StreamSeen {
                    error: Some(e.to_string()),
                    ..Default::default()
                }
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut seen = StreamSeen {
        in_order: true,
        ..Default::default()
    };
    for line in BufReader::new(stream).lines() {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        match line {
            Ok(l) => {
                if let Some(hb) = parse_heartbeat(l.trim_end()) {
                    if seen.count > 0 && hb.counter != seen.last + 1 {
                        seen.in_order = false;
                    }
                    if seen.count == 0 {
                        seen.first = hb.counter;
                    }
                    seen.last = hb.counter;
                    seen.count += 1;
                    last_seen.store(hb.counter, Ordering::Relaxed);
                }
            }
            Err(e) => {
                seen.error = Some(e.to_string());
                break;
            }
        }
    }
    if seen.error.is_none() && !stop.load(Ordering::Relaxed) {
        seen.error = Some("connection closed".into());
    }
    seen
}
