//! The local cluster: a Kubernetes API test server, Godwit's CRDs, and
//! simulated nodes (network namespaces on one L2 segment, see [`godwit_testkit::nodes`])
//! registered as Node objects, with kubeconfigs for `kubectl` on the host and
//! for agents inside the node namespaces. [`LocalCluster::down`] (or drop)
//! removes every namespace, link, thread and file it made.
//!
//! Every node namespace runs with the firewall settings of a real Kubernetes
//! node ([`node_firewall`]): `br_netfilter` on
//! (`net.bridge.bridge-nf-call-iptables=1`, and `-ip6tables`) and the
//! iptables FORWARD policy DROP, so VM traffic bridged on `godwit0` gets
//! through only with the agent's own rules (`godwit_node::agent::firewall`).
//! Both are per network namespace: the host's are untouched.
//!
//! The API server listens on the host's loopback. Processes inside node
//! namespaces cannot reach the host's loopback, so a forwarder listens on the
//! fabric's bridge ([`API_IP`]`:`[`API_PORT`]) and relays each connection to the
//! server: its listening socket is created from a thread inside the fabric
//! namespace, the upstream sockets from a thread on the host, and no interface
//! is added to the host.
//!
//! [`LocalCluster::start_godwit`] then runs Godwit on it as a user's cluster
//! would: `godwit-operator` on the host, one `godwit-node` agent inside each
//! node namespace (with a state directory per node and one shared directory
//! all nodes see), each logging to `<dir>/logs/`. VMM processes outlive their
//! agent, as on a real node; taking the cluster down kills them too. Each
//! agent acts as `godwit-node@<node>` (a token bound to its node) and gets
//! its migration certificate through a CertificateSigningRequest the
//! operator signs (`--migration-csr`): no node is given the CA.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use godwit_apiserver::{write_kubeconfig, ServerConfig, ServerThread};
use k8s_openapi::api::core::v1::{Namespace, Node};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};

use godwit_crds::contract::SUBRESOURCES_PORT;
use godwit_testkit::nodes::{Fabric, CLIENT_IP};
use godwit_testkit::process::alive;

use crate::forwarder::Forwarder;

/// The API's address on the fabric, for agents inside node namespaces.
pub const API_IP: &str = "10.88.0.254";
/// The API's port on the fabric.
pub const API_PORT: u16 = 6443;
/// The operator's `/metrics` port in the client namespace.
pub const OPERATOR_METRICS_PORT: u16 = 9090;
pub use godwit_crds::contract::NODE_LABEL;
/// The user `kubectl` on the host acts as.
pub const ADMIN_USER: &str = "admin";
/// The operator's user (the chart's operator ServiceAccount in
/// `godwit-system`), so that the request log tells its requests apart from
/// `kubectl`'s.
pub const OPERATOR_USER: &str = "system:serviceaccount:godwit-system:godwit-operator";
/// The node agents' user (the chart's node-daemon ServiceAccount), which
/// the chart's node restriction policy names.
pub const NODE_USER: &str = "system:serviceaccount:godwit-system:godwit-node";

/// Errors of bringing the cluster up.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The API server did not start.
    #[error("Cannot start the API test server")]
    ApiServer(#[from] godwit_apiserver::ApiServerError),
    /// A namespace, link or address could not be set up.
    #[error("Cannot set up the node network")]
    Network(#[from] godwit_testkit::netns::NetnsError),
    /// The forwarder could not listen on the fabric.
    #[error("Cannot listen on the fabric for node agents")]
    Forwarder(#[source] std::io::Error),
    /// A request to the API server failed.
    #[error("API request failed: {0}")]
    Api(String, #[source] kube::Error),
    /// A file could not be written.
    #[error("Cannot write {0}")]
    Write(String, #[source] std::io::Error),
    /// A Podman command failed.
    #[error("`{0}` failed: {1} (Podman and runc come with e2e/install-deps.sh)")]
    Podman(String, String),
    /// A tool the node namespaces need is missing.
    #[error("`{0}` not found: run e2e/install-deps.sh (it installs iptables)")]
    Missing(String),
    /// The chart's objects or the bootstrap policy could not be stored.
    #[error("Cannot store the control plane's objects ({0})")]
    ControlPlane(String),
    /// A Godwit binary could not be started.
    #[error("Cannot start {0} (build it with `cargo build --release -p godwit-node -p godwit-operator`)")]
    Start(String, #[source] std::io::Error),
}

/// Where Godwit's binaries are: `$GODWIT_BIN_DIR`, else next to the running
/// executable (or its parent, for test binaries in `deps/`).
pub fn godwit_binary(name: &str) -> PathBuf {
    if let Some(d) = std::env::var_os("GODWIT_BIN_DIR") {
        return PathBuf::from(d).join(name);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().unwrap_or(Path::new("."));
    for d in [dir, dir.parent().unwrap_or(dir)] {
        let p = d.join(name);
        if p.exists() {
            return p;
        }
    }
    PathBuf::from(name)
}

/// A running local cluster.
pub struct LocalCluster {
    /// The nodes and their network (dropped after the forwarder).
    pub fabric: Fabric,
    /// The API server.
    pub api: ServerThread,
    /// kubeconfig for the host (`kubectl --kubeconfig`).
    pub kubeconfig: PathBuf,
    /// kubeconfig for user [`NODE_USER`] inside node namespaces (server on
    /// the fabric); each agent has its own ([`LocalCluster::agent_kubeconfig`]).
    pub node_kubeconfig: PathBuf,
    /// kubeconfig for the operator in the client namespace (user [`OPERATOR_USER`]).
    pub operator_kubeconfig: PathBuf,
    /// Extra operator flags for [`LocalCluster::start_godwit`] (`--drs-mode`).
    pub operator_args: Vec<String>,
    /// Extra agent flags for [`LocalCluster::start_agent`]
    /// (`--vmm-memory-overhead-mib=-128`).
    pub agent_args: Vec<String>,
    /// When set, every node's agent runs in a Podman container of this image
    /// (built from the Dockerfile by `e2e/podman/node-image.sh`) with the
    /// chart's settings, instead of as a host process: see
    /// [`LocalCluster::start_agent`]. Set before [`LocalCluster::start_godwit`].
    pub agent_image: Option<String>,
    /// This cluster's own cgroup parent (`godwit-e2e-<pid>-<n>.slice`); node
    /// `i`'s VMMs run under `<it>/<node>`. Removed, processes killed, at
    /// teardown.
    pub cgroup_parent: String,
    dir: PathBuf,
    forwarder: Option<Forwarder>,
    operator_forwarders: Vec<Forwarder>,
    cpu: u32,
    memory_mib: u64,
    operator: Option<Child>,
    metrics: Option<std::net::SocketAddr>,
    agents: Arc<std::sync::Mutex<Agents>>,
    supervisor: Option<(Arc<AtomicBool>, std::thread::JoinHandle<()>)>,
}

/// The node agents: their processes, and how to start each again.
#[derive(Default)]
struct Agents {
    procs: Vec<Option<Child>>,
    argv: Vec<Vec<std::ffi::OsString>>,
    logs: Vec<PathBuf>,
    /// Agent containers to keep running (a test's kill or stop takes the
    /// name out until it starts the container again).
    containers: Vec<Option<String>>,
}

impl LocalCluster {
    /// Starts the API server, installs the CRDs, creates `nodes` namespace
    /// nodes with their Node objects (each `cpu` vCPUs and `memory_mib` MiB for
    /// VMs), and writes the kubeconfigs into `dir`.
    pub fn up(
        nodes: usize,
        cpu: u32,
        memory_mib: u64,
        dir: &Path,
    ) -> Result<LocalCluster, ClusterError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| ClusterError::Write(dir.display().to_string(), e))?;
        let api = ServerThread::start(
            "127.0.0.1:0".parse().expect("address"),
            ServerConfig::default(),
        )?;
        let fabric = Fabric::new(nodes)?;
        for node in &fabric.nodes {
            node_firewall(&node.ns)?;
        }
        fabric.ns.add_addr("fab", &format!("{API_IP}/24"))?;
        let forwarder = Forwarder::start(&fabric.ns, (API_IP, API_PORT), api.addr())
            .map_err(ClusterError::Forwarder)?;
        let kubeconfig = dir.join("kubeconfig");
        let node_kubeconfig = dir.join("node-kubeconfig");
        let operator_kubeconfig = dir.join("operator-kubeconfig");
        write_kubeconfig(&kubeconfig, api.url(), ADMIN_USER)?;
        write_kubeconfig(
            &node_kubeconfig,
            &format!("http://{API_IP}:{API_PORT}"),
            NODE_USER,
        )?;
        write_kubeconfig(
            &operator_kubeconfig,
            &format!("http://{API_IP}:{API_PORT}"),
            OPERATOR_USER,
        )?;
        for node in &fabric.nodes {
            write_kubeconfig(
                &dir.join(format!("node-kubeconfig-{}", node.name)),
                &format!("http://{API_IP}:{API_PORT}"),
                &format!("{NODE_USER}@{}", node.name),
            )?;
        }
        let cluster = LocalCluster {
            fabric,
            api,
            kubeconfig,
            node_kubeconfig,
            operator_kubeconfig,
            operator_args: Vec::new(),
            agent_args: Vec::new(),
            agent_image: None,
            cgroup_parent: {
                static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
                format!(
                    "godwit-e2e-{}-{}.slice",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                )
            },
            dir: dir.to_path_buf(),
            forwarder: Some(forwarder),
            operator_forwarders: Vec::new(),
            cpu,
            memory_mib,
            operator: None,
            metrics: None,
            agents: Default::default(),
            supervisor: None,
        };
        cluster.register(cpu, memory_mib)?;
        cluster.restrict_nodes()?;
        Ok(cluster)
    }

    /// Installs the CRDs and creates one Ready Node object per node.
    fn register(&self, cpu: u32, memory_mib: u64) -> Result<(), ClusterError> {
        let url = self.api.url().to_string();
        let nodes: Vec<(String, String)> = self
            .fabric
            .nodes
            .iter()
            .map(|n| (n.name.clone(), n.ip.clone()))
            .collect();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ClusterError::Write("tokio runtime".into(), e))?;
        runtime.block_on(async move {
            let config = kube::Config::new(url.parse().expect("server URL"));
            let client = kube::Client::try_from(config)
                .map_err(|e| ClusterError::Api("client".into(), e))?;
            let namespaces: Api<Namespace> = Api::all(client.clone());
            let ns = Namespace {
                metadata: kube::api::ObjectMeta {
                    name: Some(godwit_crds::contract::DEFAULT_LEASE_NAMESPACE.into()),
                    ..Default::default()
                },
                ..Default::default()
            };
            namespaces
                .create(&PostParams::default(), &ns)
                .await
                .map_err(|e| ClusterError::Api("create namespace godwit-system".into(), e))?;
            let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
            for (_, crd) in godwit_crds::crds() {
                crds.create(&PostParams::default(), &crd)
                    .await
                    .map_err(|e| {
                        ClusterError::Api(format!("create CRD {:?}", crd.metadata.name), e)
                    })?;
            }
            let api: Api<Node> = Api::all(client);
            for (name, ip) in nodes {
                let node = crate::control_plane::node_object(&name, &ip, cpu, memory_mib);
                api.create(&PostParams::default(), &node)
                    .await
                    .map_err(|e| ClusterError::Api(format!("create Node {name}"), e))?;
            }
            Ok(())
        })
    }

    /// Stores what [`crate::control_plane::install`] lists (the node
    /// restriction, the console's APIService, the bootstrap policy).
    fn restrict_nodes(&self) -> Result<(), ClusterError> {
        let kubectl = |args: &[&str]| self.kubectl(args);
        crate::control_plane::install(&kubectl, &self.dir, ADMIN_USER)
            .map_err(ClusterError::ControlPlane)
    }

    /// Runs `kubectl` on the host against the cluster; its output.
    pub fn kubectl(&self, args: &[&str]) -> std::io::Result<std::process::Output> {
        std::process::Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.dir.join("kube-cache"))
            .args(args)
            .output()
    }

    /// The cluster's directory (kubeconfigs, logs, node state).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Node `i`'s state directory (its VM directories and local disks).
    pub fn node_state_dir(&self, i: usize) -> PathBuf {
        self.dir.join("nodes").join(&self.fabric.nodes[i].name)
    }

    /// The directory every node sees (shared disks).
    pub fn shared_dir(&self) -> PathBuf {
        self.dir.join("shared")
    }

    /// Where the Godwit processes log.
    pub fn log_dir(&self) -> PathBuf {
        self.dir.join("logs")
    }

    /// Starts the operator and one node agent per node.
    pub fn start_godwit(&mut self) -> Result<(), ClusterError> {
        let logs = self.log_dir();
        std::fs::create_dir_all(&logs)
            .map_err(|e| ClusterError::Write(logs.display().to_string(), e))?;
        // The operator runs in the client namespace, as a pod on the pod
        // network reaches nodes and the API server; the host reaches its
        // /metrics and console API through forwarders.
        let inside = |port| SocketAddr::new(CLIENT_IP.parse().expect("client IP"), port);
        let forward = |port| {
            Forwarder::into_ns(&self.fabric.client, inside(port))
                .map_err(|e| ClusterError::Start("a forwarder to the operator".into(), e))
        };
        let (metrics_fwd, metrics) = forward(OPERATOR_METRICS_PORT)?;
        let (api_fwd, api) = forward(SUBRESOURCES_PORT)?;
        self.operator_forwarders = vec![metrics_fwd, api_fwd];
        self.metrics = Some(metrics);
        let kubectl = |args: &[&str]| self.kubectl(args);
        crate::control_plane::publish_console_api(&kubectl, &self.dir, api)
            .map_err(ClusterError::ControlPlane)?;
        self.start_operator()?;
        let n = self.fabric.nodes.len();
        *self.agents.lock().expect("agents lock") = Agents {
            procs: (0..n).map(|_| None).collect(),
            argv: vec![Vec::new(); n],
            logs: vec![PathBuf::new(); n],
            containers: vec![None; n],
        };
        for i in 0..self.fabric.nodes.len() {
            self.start_agent(i)?;
        }
        Ok(())
    }

    /// Starts the operator (again, after [`LocalCluster::kill_operator`]).
    pub fn start_operator(&mut self) -> Result<(), ClusterError> {
        let operator = godwit_binary("godwit-operator");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.fabric.client.name()])
            .arg(&operator)
            .arg("--kubeconfig")
            .arg(&self.operator_kubeconfig)
            .args([
                "--metrics-addr",
                &format!("{CLIENT_IP}:{OPERATOR_METRICS_PORT}"),
            ])
            .args(["--api-addr", &format!("{CLIENT_IP}:{SUBRESOURCES_PORT}")])
            // The agents' user (the chart passes the same ServiceAccount).
            .args(["--node-user", NODE_USER])
            .args(&self.operator_args);
        let log = self.log_dir().join("operator.log");
        self.operator = Some(spawn_logged(cmd, &log, &operator)?);
        Ok(())
    }

    /// Starts whatever of the operator and the agents is not running (after
    /// a test killed some).
    pub fn ensure_running(&mut self) -> Result<(), ClusterError> {
        if self.operator.is_none() {
            self.start_operator()?;
        }
        let n = self.fabric.nodes.len();
        for i in 0..n {
            let missing = self
                .agents
                .lock()
                .expect("agents lock")
                .procs
                .get(i)
                .is_some_and(Option::is_none);
            if missing {
                self.start_agent(i)?;
            }
        }
        Ok(())
    }

    /// Kills the operator at once.
    pub fn kill_operator(&mut self) {
        if let Some(mut op) = self.operator.take() {
            let _ = op.kill();
            let _ = op.wait();
        }
    }

    /// The operator's `/metrics` and `/healthz` address, once started.
    pub fn operator_metrics(&self) -> Option<std::net::SocketAddr> {
        self.metrics
    }

    /// Starts the agent of node `i` (again): a host process in the node's
    /// network namespace, or, with [`LocalCluster::agent_image`], a Podman
    /// container ([`LocalCluster::start_agent_container`]).
    pub fn start_agent(&mut self, i: usize) -> Result<(), ClusterError> {
        if self.agent_image.is_some() {
            return self.start_agent_container(i);
        }
        let node = &self.fabric.nodes[i];
        let agent = godwit_binary("godwit-node");
        let mut argv: Vec<std::ffi::OsString> = vec![
            "netns".into(),
            "exec".into(),
            node.ns.name().into(),
            agent.into_os_string(),
        ];
        argv.extend(self.agent_flags(
            i,
            godwit_binary("godwit-vmm"),
            // `ip netns exec` mounts a fresh sysfs without the host's cgroup
            // mounts; the agent reaches them through this process's root.
            format!(
                "/proc/{}/root{}",
                std::process::id(),
                godwit_node::agent::cgroup::DEFAULT_ROOT
            ),
        ));
        let log = self.log_dir().join(format!("agent-{}.log", node.name));
        let child = spawn_agent(&argv, &log)?;
        let mut agents = self.agents.lock().expect("agents lock");
        agents.procs[i] = Some(child);
        agents.argv[i] = argv;
        agents.logs[i] = log;
        drop(agents);
        self.supervise();
        Ok(())
    }

    /// Node `i`'s agent's kubeconfig: user [`NODE_USER`]`@<node>`, a token
    /// bound to the node as a pod's service-account token is.
    pub fn agent_kubeconfig(&self, i: usize) -> PathBuf {
        self.dir
            .join(format!("node-kubeconfig-{}", self.fabric.nodes[i].name))
    }

    /// The agent's flags for node `i`, with its VMM binary and cgroup root.
    fn agent_flags(&self, i: usize, vmm: PathBuf, cgroup_root: String) -> Vec<std::ffi::OsString> {
        let node = &self.fabric.nodes[i];
        let mut argv: Vec<std::ffi::OsString> = vec![
            "--kubeconfig".into(),
            self.agent_kubeconfig(i).into_os_string(),
            "--node".into(),
            node.name.clone().into(),
            "--node-ip".into(),
            node.ip.clone().into(),
            "--state-dir".into(),
            self.node_state_dir(i).into_os_string(),
            "--shared-dir".into(),
            self.shared_dir().into_os_string(),
            "--vmm".into(),
            vmm.into_os_string(),
            "--cpu".into(),
            self.cpu.to_string().into(),
            "--memory-mib".into(),
            self.memory_mib.to_string().into(),
            // Its certificate through a CSR the operator signs: no CA here.
            "--migration-csr".into(),
            "--cgroup-parent".into(),
            self.node_cgroup_parent(i).into(),
            "--cgroup-root".into(),
            cgroup_root.into(),
        ];
        // The node's image directories: where VMs may name files.
        for d in self.image_dirs() {
            argv.extend(["--image-dir".into(), d.into_os_string()]);
        }
        argv.extend(self.agent_args.iter().map(Into::into));
        argv
    }

    /// The nodes' image directories (`--image-dir`), as `/var/lib/godwit/{images,kernels}`.
    pub fn image_dirs(&self) -> [PathBuf; 2] {
        let root = self.dir.join("images-root");
        [root.join("images"), root.join("kernels")]
    }

    /// The Podman container of node `i`'s agent (unique to this cluster).
    pub fn agent_container(&self, i: usize) -> String {
        format!(
            "{}-{}",
            self.cgroup_parent.trim_end_matches(".slice"),
            self.fabric.nodes[i].name
        )
    }

    /// Starts node `i`'s agent in its Podman container, made on the first
    /// start and started again after (`podman start`, as a rollout does),
    /// with what the chart's DaemonSet gives it: privileged, the host's PID
    /// namespace, the host's cgroup hierarchy at `/sys/fs/cgroup`, the node's
    /// network namespace, root, and its directories (the cluster's, mounted
    /// at the same path: state, shared disks, kubeconfig, migration CA,
    /// images). `/dev/kvm`, `/dev/net/tun` and `/dev/userfaultfd` come with
    /// `--privileged`. The VMM is the image's (`/usr/local/bin/godwit-vmm`).
    /// A container that ends by itself is started again, as kubelet
    /// restarts a DaemonSet's container (an agent exits after fencing to
    /// rebuild its view); one a test killed or stopped stays down until the
    /// test starts it.
    pub fn start_agent_container(&mut self, i: usize) -> Result<(), ClusterError> {
        let name = self.agent_container(i);
        self.run_agent_container(i)?;
        self.agents.lock().expect("agents lock").containers[i] = Some(name);
        self.supervise();
        Ok(())
    }

    fn run_agent_container(&mut self, i: usize) -> Result<(), ClusterError> {
        let image = self.agent_image.clone().expect("an agent image");
        let name = self.agent_container(i);
        let log = self
            .log_dir()
            .join(format!("agent-{}.log", self.fabric.nodes[i].name));
        let exists = podman(&["container", "exists", &name]).is_ok();
        if exists {
            return podman(&["start", &name]).map(drop);
        }
        let mut args: Vec<std::ffi::OsString> = [
            "run",
            "--detach",
            "--name",
            &name,
            "--privileged",
            "--pid=host",
            "--user=0:0",
            "--ulimit=nofile=1024:1024",
            "--ulimit=nproc=1024:1024",
            "--volume=/sys/fs/cgroup:/sys/fs/cgroup",
            "--env=RUST_LOG=info,kube=warn",
        ]
        .iter()
        .map(Into::into)
        .collect();
        args.push(
            format!(
                "--network=ns:/var/run/netns/{}",
                self.fabric.nodes[i].ns.name()
            )
            .into(),
        );
        args.push(format!("--volume={0}:{0}", self.dir.display()).into());
        args.push(image.into());
        // The agent's output appended to the node's log, as a host agent's.
        args.extend(
            [
                "sh",
                "-c",
                "log=$1; shift; exec \"$@\" >>\"$log\" 2>&1",
                "sh",
            ]
            .map(Into::into),
        );
        args.push(log.into_os_string());
        args.push("godwit-node".into());
        args.extend(self.agent_flags(
            i,
            PathBuf::from("/usr/local/bin/godwit-vmm"),
            godwit_node::agent::cgroup::DEFAULT_ROOT.into(),
        ));
        podman(&args).map(drop)
    }

    /// Stops node `i`'s agent container as a rollout does (`podman stop`:
    /// SIGTERM, then SIGKILL to what is left in the container's cgroups).
    pub fn stop_agent_container(&mut self, i: usize) -> Result<(), ClusterError> {
        self.agents.lock().expect("agents lock").containers[i] = None;
        podman(&["stop", "--time", "10", &self.agent_container(i)]).map(drop)
    }

    /// Node `i`'s cgroup parent (below the host's cgroup root).
    pub fn node_cgroup_parent(&self, i: usize) -> String {
        format!("{}/{}", self.cgroup_parent, self.fabric.nodes[i].name)
    }

    /// Kills node `i`'s agent at once (its VMs keep running, as on a real node).
    pub fn kill_agent(&mut self, i: usize) {
        if self.agent_image.is_some() {
            if let Some(c) = self
                .agents
                .lock()
                .expect("agents lock")
                .containers
                .get_mut(i)
            {
                *c = None;
            }
            let _ = podman(&["kill", &self.agent_container(i)]);
            return;
        }
        let child = self
            .agents
            .lock()
            .expect("agents lock")
            .procs
            .get_mut(i)
            .and_then(Option::take);
        if let Some(mut a) = child {
            let _ = a.kill();
            let _ = a.wait();
        }
    }

    /// Stops node `i`'s agent as a rollout does (SIGTERM), and waits for it
    /// (10 s, then SIGKILL). Its VMs keep running.
    pub fn terminate_agent(&mut self, i: usize) {
        if self.agent_image.is_some() {
            let _ = self.stop_agent_container(i);
            return;
        }
        let child = self
            .agents
            .lock()
            .expect("agents lock")
            .procs
            .get_mut(i)
            .and_then(Option::take);
        if let Some(mut a) = child {
            // SAFETY: signalling our own child (`ip netns exec` execs the agent).
            unsafe { libc::kill(a.id() as i32, libc::SIGTERM) };
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = a.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = a.kill();
            let _ = a.wait();
        }
    }

    /// Restarts agents that exit by themselves, as a DaemonSet does (an agent
    /// restarts itself after fencing, to rebuild its view from fresh lists).
    fn supervise(&mut self) {
        if self.supervisor.is_some() {
            return;
        }
        let agents = self.agents.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                restart_exited_containers(&agents);
                let mut a = agents.lock().expect("agents lock");
                for i in 0..a.procs.len() {
                    let exited = a.procs[i]
                        .as_mut()
                        .and_then(|c| c.try_wait().ok().flatten());
                    if let Some(status) = exited {
                        a.procs[i] = spawn_agent(&a.argv[i], &a.logs[i]).ok();
                        tracing::info!("agent {i} exited ({status}); restarted");
                    }
                }
            }
        });
        self.supervisor = Some((stop, thread));
    }
}

/// Starts again the agent containers that ended by themselves.
fn restart_exited_containers(agents: &std::sync::Mutex<Agents>) {
    let wanted: Vec<String> = agents
        .lock()
        .expect("agents lock")
        .containers
        .iter()
        .flatten()
        .cloned()
        .collect();
    if wanted.is_empty() {
        return;
    }
    let Ok(listed) = podman(&["ps", "--all", "--format", "{{.Names}} {{.State}}"]) else {
        return;
    };
    for line in listed.lines() {
        let Some((name, state)) = line.split_once(' ') else {
            continue;
        };
        if !wanted.iter().any(|w| w == name) || state.trim() == "running" {
            continue;
        }
        // Under the lock: a test that kills or stops it meanwhile wins.
        let a = agents.lock().expect("agents lock");
        if a.containers.iter().flatten().any(|w| w == name) {
            let started = podman(&["start", name]);
            tracing::info!("agent container {name} ended ({state}); started again: {started:?}");
        }
    }
}

impl LocalCluster {
    /// Stops everything and removes what the cluster made.
    pub fn down(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.kill_operator();
        if let Some((stop, thread)) = self.supervisor.take() {
            stop.store(true, Ordering::Relaxed);
            let _ = thread.join();
        }
        let n = self.agents.lock().map(|a| a.procs.len()).unwrap_or(0);
        for i in 0..n {
            self.kill_agent(i);
        }
        if self.agent_image.is_some() {
            for i in 0..self.fabric.nodes.len() {
                let _ = podman(&["rm", "--force", "--time", "0", &self.agent_container(i)]);
            }
        }
        kill_vmms(&self.dir.join("nodes"));
        godwit_node::agent::cgroup::remove_tree(
            Path::new(godwit_node::agent::cgroup::DEFAULT_ROOT),
            &self.cgroup_parent,
        );
        if let Some(f) = self.forwarder.take() {
            f.stop();
        }
        for f in self.operator_forwarders.drain(..) {
            f.stop();
        }
        keep_logs(&self.log_dir());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// With `GODWIT_KEEP_LOGS=DIR` set, copies the cluster's logs into
/// `DIR/<pid>-<n>/` before the cluster's directory is removed, for
/// looking at a test or benchmark afterwards.
fn keep_logs(logs: &Path) {
    let Some(keep) = std::env::var_os("GODWIT_KEEP_LOGS") else {
        return;
    };
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let to = Path::new(&keep).join(format!("{}-{n}", std::process::id()));
    let Ok(entries) = std::fs::read_dir(logs) else {
        return;
    };
    if std::fs::create_dir_all(&to).is_err() {
        return;
    }
    for e in entries.flatten() {
        let _ = std::fs::copy(e.path(), to.join(e.file_name()));
    }
    eprintln!("cluster logs kept in {}", to.display());
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs `podman --runtime runc ARGS` and returns its output, or an error
/// with what it printed. runc: crun refuses this host's hybrid cgroups.
pub fn podman<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Result<String, ClusterError> {
    let what = format!(
        "podman {}",
        args.iter()
            .map(|a| a.as_ref().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let out = Command::new("podman")
        .args(["--runtime", "runc"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| ClusterError::Podman(what.clone(), e.to_string()))?;
    if !out.status.success() {
        return Err(ClusterError::Podman(
            what,
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn spawn_agent(argv: &[std::ffi::OsString], log: &Path) -> Result<Child, ClusterError> {
    let mut cmd = Command::new("ip");
    cmd.args(argv);
    spawn_logged(cmd, log, &godwit_binary("godwit-node"))
}

fn spawn_logged(mut cmd: Command, log: &Path, what: &Path) -> Result<Child, ClusterError> {
    // Appended: a restarted process logs after its predecessor.
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| ClusterError::Write(log.display().to_string(), e))?;
    let err = out
        .try_clone()
        .map_err(|e| ClusterError::Write(log.display().to_string(), e))?;
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .env("RUST_LOG", "info,kube=warn")
        .spawn()
        .map_err(|e| ClusterError::Start(what.display().to_string(), e))
}

/// Kills every VMM a node agent started under `nodes` (their process
/// groups are recorded in `<node>/vms/<ns>/<vm>/pid`) and waits for them.
fn kill_vmms(nodes: &Path) {
    let mut pids = Vec::new();
    let dirs = |p: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(p)
            .map(|r| r.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    for node in dirs(nodes) {
        for ns in dirs(&node.join("vms")) {
            for vm in dirs(&ns) {
                if let Some(pid) = std::fs::read_to_string(vm.join("pid"))
                    .ok()
                    .and_then(|s| s.trim().parse::<i32>().ok())
                {
                    // SAFETY: signalling a process group the agent started.
                    unsafe { libc::kill(-pid, libc::SIGKILL) };
                    pids.push(pid);
                }
            }
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline && pids.iter().any(|p| alive(*p)) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Gives node namespace `ns` a real Kubernetes node's firewall:
/// bridged frames pass iptables (`br_netfilter`, per namespace) and the
/// FORWARD policy is DROP, for IPv4 and IPv6.
pub fn node_firewall(ns: &godwit_testkit::netns::Netns) -> Result<(), ClusterError> {
    for tool in ["iptables", "ip6tables"] {
        let found = ["/usr/sbin", "/sbin", "/usr/bin"]
            .iter()
            .any(|d| Path::new(d).join(tool).exists());
        if !found {
            return Err(ClusterError::Missing(tool.into()));
        }
        let sysctl = format!("net.bridge.bridge-nf-call-{tool}=1");
        ns.exec("sysctl", &["-q", "-w", &sysctl])?;
        ns.exec(tool, &["-w", "-P", "FORWARD", "DROP"])?;
    }
    Ok(())
}
