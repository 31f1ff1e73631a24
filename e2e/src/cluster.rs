//! The local cluster: a Kubernetes API test server, Godwit's CRDs, and
//! simulated nodes (network namespaces on one L2 segment, see [`crate::nodes`])
//! registered as Node objects, with kubeconfigs for `kubectl` on the host and
//! for agents inside the node namespaces. [`LocalCluster::down`] (or drop)
//! removes every namespace, link, thread and file it made.
//!
//! The API server listens on the host's loopback. Processes inside node
//! namespaces cannot reach the host's loopback, so a forwarder listens on the
//! fabric's bridge ([`API_IP`]`:`[`API_PORT`]) and relays each connection to the
//! server: its listening socket is created from a thread inside the fabric
//! namespace, the upstream sockets from a thread on the host, and no interface
//! is added to the host.
//!
//! Node agents and the operator are started by the control-plane issue; until
//! then the cluster holds the API, the CRDs, the nodes and their network.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeCondition, NodeStatus};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{Api, PostParams};

use crate::apiserver::{write_kubeconfig, ServerConfig, ServerThread};
use crate::nodes::Fabric;

/// The API's address on the fabric, for agents inside node namespaces.
pub const API_IP: &str = "10.88.0.254";
/// The API's port on the fabric.
pub const API_PORT: u16 = 6443;
/// Label that names a VM's or a node's Godwit node.
pub const NODE_LABEL: &str = "godwit.dev/node";

/// Errors of bringing the cluster up.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The API server did not start.
    #[error("Cannot start the API test server")]
    ApiServer(#[from] crate::apiserver::ApiServerError),
    /// A namespace, link or address could not be set up.
    #[error("Cannot set up the node network")]
    Network(#[from] crate::netns::NetnsError),
    /// The forwarder could not listen on the fabric.
    #[error("Cannot listen on the fabric for node agents")]
    Forwarder(#[source] std::io::Error),
    /// A request to the API server failed.
    #[error("API request failed: {0}")]
    Api(String, #[source] kube::Error),
    /// A file could not be written.
    #[error("Cannot write {0}")]
    Write(String, #[source] std::io::Error),
}

/// A running local cluster.
pub struct LocalCluster {
    /// The nodes and their network (dropped after the forwarder).
    pub fabric: Fabric,
    /// The API server.
    pub api: ServerThread,
    /// kubeconfig for the host (`kubectl --kubeconfig`).
    pub kubeconfig: PathBuf,
    /// kubeconfig for agents inside node namespaces (server on the fabric).
    pub node_kubeconfig: PathBuf,
    dir: PathBuf,
    forwarder: Option<Forwarder>,
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
        fabric.ns.add_addr("fab", &format!("{API_IP}/24"))?;
        let forwarder = Forwarder::start(&fabric, api.addr())?;
        let kubeconfig = dir.join("kubeconfig");
        let node_kubeconfig = dir.join("node-kubeconfig");
        write_kubeconfig(&kubeconfig, api.url(), "admin")?;
        write_kubeconfig(
            &node_kubeconfig,
            &format!("http://{API_IP}:{API_PORT}"),
            "godwit-node",
        )?;
        let cluster = LocalCluster {
            fabric,
            api,
            kubeconfig,
            node_kubeconfig,
            dir: dir.to_path_buf(),
            forwarder: Some(forwarder),
        };
        cluster.register(cpu, memory_mib)?;
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
                let node = node_object(&name, &ip, cpu, memory_mib);
                api.create(&PostParams::default(), &node)
                    .await
                    .map_err(|e| ClusterError::Api(format!("create Node {name}"), e))?;
            }
            Ok(())
        })
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

    /// Stops everything and removes what the cluster made.
    pub fn down(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(f) = self.forwarder.take() {
            f.stop();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A Ready Node with Godwit's label, its address and its VM capacity.
fn node_object(name: &str, ip: &str, cpu: u32, memory_mib: u64) -> Node {
    let capacity: BTreeMap<String, Quantity> = [
        ("cpu".to_string(), Quantity(cpu.to_string())),
        ("memory".to_string(), Quantity(format!("{memory_mib}Mi"))),
    ]
    .into();
    Node {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_string()),
            labels: Some([(NODE_LABEL.to_string(), name.to_string())].into()),
            ..Default::default()
        },
        status: Some(NodeStatus {
            addresses: Some(vec![NodeAddress {
                type_: "InternalIP".into(),
                address: ip.into(),
            }]),
            capacity: Some(capacity.clone()),
            allocatable: Some(capacity),
            conditions: Some(vec![NodeCondition {
                type_: "Ready".into(),
                status: "True".into(),
                reason: Some("GodwitLocal".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Relays connections from the fabric to the API server on the host.
struct Forwarder {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Forwarder {
    fn start(fabric: &Fabric, upstream: std::net::SocketAddr) -> Result<Forwarder, ClusterError> {
        // The listening socket belongs to the namespace of the thread that
        // creates it; accept() works on it from any thread.
        let listener = fabric
            .ns
            .run_in(move || TcpListener::bind((API_IP, API_PORT)))?
            .map_err(ClusterError::Forwarder)?;
        listener
            .set_nonblocking(true)
            .map_err(ClusterError::Forwarder)?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("api-forwarder".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((down, _)) => {
                            let _ = down.set_nonblocking(false);
                            if let Ok(up) = TcpStream::connect(upstream) {
                                relay(down, up);
                            }
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            })
            .map_err(ClusterError::Forwarder)?;
        Ok(Forwarder {
            stop,
            thread: Some(thread),
        })
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Copies both ways until either side closes.
fn relay(a: TcpStream, b: TcpStream) {
    let pipe = |mut from: TcpStream, mut to: TcpStream| {
        std::thread::spawn(move || {
            let mut buf = [0u8; 16 << 10];
            loop {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = to.shutdown(Shutdown::Write);
            let _ = from.shutdown(Shutdown::Read);
        });
    };
    if let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) {
        pipe(a, b2);
        pipe(b, a2);
    }
}
