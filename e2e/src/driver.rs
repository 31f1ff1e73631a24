//! The driver of a local cluster running Godwit: [`ClusterDriver::up`]
//! brings up a [`LocalCluster`] (API test server, namespace nodes) with the
//! operator and a node agent per node, and installs the test guest and a
//! root image where the examples expect them; the driver then acts as a
//! user does, with `kubectl` (apply, get, watch, wait), and reaches into a
//! node's VM directory as an operator on the node would (its console).
//! The demo, the fault matrix, the failover benchmark and the end-to-end
//! tests all drive Godwit through it.

use std::io::{BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use godwit_testkit::guest::guest_elf;
use serde_json::Value;

use crate::cluster::LocalCluster;

/// The example manifests, compiled in.
pub const EXAMPLE_TEMPLATE: &str = include_str!("../../examples/template.yaml");
/// See [`EXAMPLE_TEMPLATE`].
pub const EXAMPLE_VM: &str = include_str!("../../examples/vm.yaml");
/// See [`EXAMPLE_TEMPLATE`].
pub const EXAMPLE_MIGRATION: &str = include_str!("../../examples/migration.yaml");
/// Builds Godwit's image with Podman from the repo's Dockerfile and the
/// release binaries (`e2e/podman/node-image.sh`); returns its tag.
pub fn node_image() -> anyhow::Result<String> {
    let script = crate::helm::repo_root().join("e2e/podman/node-image.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Where the examples expect the kernel and images on a node.
pub const EXAMPLE_ROOT: &str = "/var/lib/godwit";
/// The example VM's address and heartbeat port.
pub const EXAMPLE_VM_ADDR: &str = "10.88.0.10:7777";

/// A local cluster running Godwit, with the test guest installed, driven
/// as a user drives it (`kubectl`).
pub struct ClusterDriver {
    /// The cluster (dropped last: it kills every process and removes its directory).
    pub cluster: LocalCluster,
    root: PathBuf,
}

impl ClusterDriver {
    /// Brings up `nodes` nodes (4 vCPUs and 2 GiB for VMs each) with the
    /// operator and the agents, in `dir`.
    pub fn up(nodes: usize, dir: &Path) -> anyhow::Result<ClusterDriver> {
        ClusterDriver::up_with(nodes, dir, &[])
    }

    /// [`ClusterDriver::up`] with extra operator flags.
    pub fn up_with(
        nodes: usize,
        dir: &Path,
        operator_args: &[&str],
    ) -> anyhow::Result<ClusterDriver> {
        ClusterDriver::up_with_agents(nodes, dir, operator_args, &[])
    }

    /// [`ClusterDriver::up`] with every node's agent in a Podman container
    /// of Godwit's image, built from the Dockerfile with the release binaries
    /// ([`node_image`]).
    pub fn up_in_containers(nodes: usize, dir: &Path) -> anyhow::Result<ClusterDriver> {
        let image = node_image()?;
        ClusterDriver::up_opts(nodes, dir, &[], &[], Some(image))
    }

    /// [`ClusterDriver::up_with`] with extra agent flags too.
    pub fn up_with_agents(
        nodes: usize,
        dir: &Path,
        operator_args: &[&str],
        agent_args: &[&str],
    ) -> anyhow::Result<ClusterDriver> {
        ClusterDriver::up_opts(nodes, dir, operator_args, agent_args, None)
    }

    fn up_opts(
        nodes: usize,
        dir: &Path,
        operator_args: &[&str],
        agent_args: &[&str],
        agent_image: Option<String>,
    ) -> anyhow::Result<ClusterDriver> {
        if !Path::new("/dev/kvm").exists() {
            bail!("/dev/kvm does not exist: Godwit boots real VMs under KVM");
        }
        let elf = guest_elf()?;
        let mut cluster = LocalCluster::up(nodes, 4, 2048, dir)?;
        let root = dir.join("images-root");
        for d in cluster.image_dirs() {
            std::fs::create_dir_all(d)?;
        }
        std::fs::copy(&elf, root.join("kernels/godwit-testguest.elf"))?;
        std::fs::File::create(root.join("images/testguest-root.raw"))?.set_len(64 << 20)?;
        cluster.operator_args = operator_args.iter().map(|a| a.to_string()).collect();
        cluster.agent_args = agent_args.iter().map(|a| a.to_string()).collect();
        cluster.agent_image = agent_image;
        cluster.start_godwit()?;
        Ok(ClusterDriver { cluster, root })
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
            let vm = self.get("gvm", name)?;
            Ok(vm.filter(|v| v["status"]["phase"] == "Running"))
        })
        .map_err(|e| {
            let status = match self.get("gvm", name) {
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

    /// Lets [`METRICS_SCRAPER`] read `/metrics`: the chart's
    /// `godwit-metrics-reader` ClusterRole and a binding, applied with
    /// kubectl.
    pub fn allow_metrics_scraper(&self) -> anyhow::Result<()> {
        let (ns, name) = METRICS_SCRAPER
            .strip_prefix("system:serviceaccount:")
            .and_then(|r| r.split_once(':'))
            .context("METRICS_SCRAPER is a service account")?;
        self.apply(&format!(
            "apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: godwit-metrics-reader
rules:
  - nonResourceURLs: [\"/metrics\"]
    verbs: [\"get\"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: godwit-metrics-reader
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: godwit-metrics-reader
subjects:
  - kind: ServiceAccount
    name: {name}
    namespace: {ns}
"
        ))?;
        Ok(())
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

/// The user the tests read `/metrics` as: a Prometheus' service account
/// (its token is its name in the test API server).
pub const METRICS_SCRAPER: &str = "system:serviceaccount:monitoring:prometheus";

/// `GET path` on `addr` (HTTP/1.0), with `token` as bearer token: the status
/// code and the body.
pub fn http_get(addr: &str, path: &str, token: Option<&str>) -> anyhow::Result<(u16, String)> {
    let mut s = std::net::TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n{auth}\r\n")?;
    let mut out = String::new();
    std::io::Read::read_to_string(&mut s, &mut out)?;
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("not an HTTP answer from {addr}: {out:?}"))?;
    Ok((code, body.to_string()))
}

/// The node a VM object is placed on (its `godwit.dev/node` label; empty
/// when it has none).
pub fn node_of(vm: &Value) -> String {
    vm["metadata"]["labels"]["godwit.dev/node"]
        .as_str()
        .unwrap_or_default()
        .to_string()
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

/// A running `kubectl get --watch` (see [`ClusterDriver::watch`]); killed on drop.
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

/// The `kubectl-godwit` plugin binary and its directory (to put on `PATH`);
/// panics with the fix when it was not built.
pub fn kubectl_plugin() -> (PathBuf, PathBuf) {
    let plugin = crate::cluster::godwit_binary("kubectl-godwit");
    assert!(
        plugin.exists(),
        "{} not found: build it (cargo build --release -p godwit-cli) or set GODWIT_BIN_DIR",
        plugin.display()
    );
    let dir = plugin.parent().expect("a directory").to_path_buf();
    (plugin, dir)
}
