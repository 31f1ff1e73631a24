//! `godwit-apiserver`: an in-memory Kubernetes API server for tests.
//!
//! **This is test infrastructure, not a Kubernetes API server.** It speaks
//! enough of the Kubernetes REST protocol over plain HTTP for kube-rs
//! clients (`Api`, `watcher`, `Controller`, Lease-based leader election,
//! the event `Recorder`) and real `kubectl` to work against it unchanged,
//! so Godwit's control plane can be tested on a machine without a cluster.
//!
//! What it serves:
//! - discovery (`/api`, `/apis`, group and group-version resource lists,
//!   `/version`) and minimal OpenAPI v3 documents ([`discovery`]);
//! - built-in kinds: Namespace, Node, Event (`v1` and `events.k8s.io/v1`,
//!   one storage, see [`convert`]), Secret, ConfigMap, ServiceAccount, Lease,
//!   and CustomResourceDefinition; Service, Deployment, DaemonSet and the
//!   RBAC kinds are stored so that the Helm chart applies (requests to this
//!   server are not authorized by them; the reviews below are); Pods (no
//!   kubelet: a Pod is `Running` once stored) with ResourceQuota admission
//!   on create ([`quota`]), ResourceQuotas and PodDisruptionBudgets (stored;
//!   nothing evicts);
//!   CertificateSigningRequests with `/approval` and `/status`, the
//!   requester stamped into the spec on create ([`csr`]);
//!   a stored CRD makes its kinds live ([`crd`]), and custom resources are
//!   pruned, defaulted and validated against the CRD schema ([`schema`]);
//! - get, list, watch, create (with `generateName`), update, patch (merge,
//!   JSON, strategic-as-merge, see [`patch`]; server-side apply with
//!   list-type map merging and per-manager `managedFields`, see [`apply`]),
//!   delete with finalizers and owner-reference cascading, deletecollection,
//!   the `status` subresource, label and field selectors ([`selector`]);
//! - watches with resource versions, bookmarks and `410 Gone` for versions
//!   older than the retained history ([`store`]);
//! - `meta.k8s.io/v1` Tables with printer columns ([`table`]) and
//!   `PartialObjectMetadata` responses;
//! - protobuf request bodies of kubectl's typed commands for Namespace,
//!   ConfigMap, Secret and ServiceAccount ([`protobuf`]); answers are JSON;
//! - a request log for RBAC checks ([`audit`]);
//! - `TokenReview`, `SubjectAccessReview` and `SelfSubjectAccessReview`,
//!   answered from the stored RBAC objects ([`rbac`]), for components that
//!   delegate authorization to the API server.
//!
//! Use it in-process with [`serve`] (on the caller's Tokio runtime) or
//! [`ServerThread::start`] (own thread, for blocking callers), then point
//! clients at the URL: `kube::Config::new(url.parse()?)` for kube-rs, or a
//! kubeconfig from [`write_kubeconfig`] for kubectl. Give each kubectl run a
//! fresh `--cache-dir` (or `HOME`): kubectl caches discovery per host and
//! port, and a reused port would show stale kinds.
//!
//! Debug endpoints (not part of Kubernetes):
//! - `GET /debug/requests`: the request log as a JSON array of
//!   [`audit::AuditRecord`];
//! - `POST /debug/expire-watches`: closes every watch and compacts the
//!   history, so resuming from any earlier version gets `410 Gone`.
//!
//! Each module's docs list its simplifications versus a real API server;
//! [`handlers`] lists the protocol-level ones.

pub mod admission_policy;
pub mod aggregator;
pub mod apply;
pub mod audit;
pub mod convert;
pub mod crd;
pub mod csr;
pub mod discovery;
pub mod front_proxy;
#[doc(hidden)]
pub mod fuzz;
pub mod handlers;
pub mod patch;
pub mod protobuf;
pub mod quota;
pub mod rbac;
pub mod schema;
pub mod selector;
pub mod store;
pub mod table;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinSet;

use self::audit::{AuditLog, AuditRecord};
use self::handlers::state::ServerState;

/// Errors starting or running the test API server.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    /// The listener's address could not be read.
    #[error("Cannot read listener address")]
    LocalAddr(#[source] std::io::Error),
    /// The listen address could not be bound.
    #[error("Cannot bind listen address")]
    Bind(#[source] std::io::Error),
    /// The request log could not be set up.
    #[error("Cannot set up the request log")]
    Audit(#[source] audit::AuditError),
    /// The server thread's runtime could not be built.
    #[error("Cannot build the server runtime")]
    Runtime(#[source] std::io::Error),
    /// The server thread ended before it was ready.
    #[error("Server thread ended before it was ready")]
    ThreadStart,
    /// The kubeconfig could not be written.
    #[error("Cannot write kubeconfig")]
    Kubeconfig(#[source] std::io::Error),
}

/// Settings of a server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Append every request as a JSON line to this file.
    pub audit_log: Option<PathBuf>,
    /// How often watches with `allowWatchBookmarks=true` get a BOOKMARK.
    pub bookmark_interval: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            audit_log: None,
            bookmark_interval: Duration::from_secs(5),
        }
    }
}

/// A running server (on the caller's Tokio runtime).
pub struct ApiServerHandle {
    addr: SocketAddr,
    state: Arc<ServerState>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl ApiServerHandle {
    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Closes every watch and compacts history (as `POST /debug/expire-watches`).
    pub fn expire_watches(&self) -> u64 {
        self.state.store.expire_watches()
    }

    /// The request log so far.
    pub fn requests(&self) -> Vec<AuditRecord> {
        self.state.audit.records()
    }

    /// Writes a kubeconfig for this server (see [`write_kubeconfig`]).
    pub fn write_kubeconfig(&self, path: &Path, user: &str) -> Result<(), ApiServerError> {
        write_kubeconfig(path, &self.url(), user)
    }

    /// Stops accepting connections and closes open ones.
    pub async fn shutdown(mut self) {
        self.stop();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    fn stop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        self.state.store.expire_watches();
    }
}

impl Drop for ApiServerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Serves the Kubernetes API on `listener` with default settings.
///
/// The server runs on the current Tokio runtime until the handle is dropped
/// or shut down.
pub async fn serve(listener: TcpListener) -> Result<ApiServerHandle, ApiServerError> {
    serve_with(listener, ServerConfig::default()).await
}

/// Serves the Kubernetes API on `listener` with the given settings.
pub async fn serve_with(
    listener: TcpListener,
    config: ServerConfig,
) -> Result<ApiServerHandle, ApiServerError> {
    let addr = listener.local_addr().map_err(ApiServerError::LocalAddr)?;
    let audit = AuditLog::new(config.audit_log.as_deref()).map_err(ApiServerError::Audit)?;
    let state = Arc::new(handlers::new_state(audit, config.bookmark_interval));
    if let Ok(mut address) = state.address.write() {
        *address = addr.to_string();
    }
    let (shutdown, mut stopped) = oneshot::channel();
    let accept_state = state.clone();
    let task = tokio::spawn(async move {
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    let state = accept_state.clone();
                    connections.spawn(async move {
                        let service = service_fn(move |request| handlers::router::handle(state.clone(), request));
                        let _ = http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .with_upgrades()
                            .await;
                    });
                }
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                _ = &mut stopped => break,
            }
        }
        connections.abort_all();
    });
    Ok(ApiServerHandle {
        addr,
        state,
        shutdown: Some(shutdown),
        task: Some(task),
    })
}

/// A server running on its own thread and runtime, for blocking callers
/// (tests that drive `kubectl`, the local-cluster harness). Stops on drop.
pub struct ServerThread {
    url: String,
    addr: SocketAddr,
    state: Arc<ServerState>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ServerThread {
    /// Starts a server on `addr` (e.g. `127.0.0.1:0`) in a new thread.
    pub fn start(addr: SocketAddr, config: ServerConfig) -> Result<Self, ApiServerError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(ApiServerError::Runtime)?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            runtime.block_on(async move {
                let started = async {
                    let listener = TcpListener::bind(addr)
                        .await
                        .map_err(ApiServerError::Bind)?;
                    serve_with(listener, config).await
                }
                .await;
                match started {
                    Ok(handle) => {
                        let _ = ready_tx.send(Ok((handle.addr(), handle.state.clone())));
                        let _ = stopped.await;
                        handle.shutdown().await;
                    }
                    Err(error) => {
                        let _ = ready_tx.send(Err(error));
                    }
                }
            });
        });
        let (addr, state) = ready_rx.recv().map_err(|_| ApiServerError::ThreadStart)??;
        Ok(Self {
            url: format!("http://{addr}"),
            addr,
            state,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Writes a kubeconfig for this server (see [`write_kubeconfig`]).
    pub fn write_kubeconfig(&self, path: &Path, user: &str) -> Result<(), ApiServerError> {
        write_kubeconfig(path, &self.url, user)
    }

    /// Closes every watch and compacts history (as `POST /debug/expire-watches`).
    pub fn expire_watches(&self) -> u64 {
        self.state.store.expire_watches()
    }

    /// The request log so far.
    pub fn requests(&self) -> Vec<AuditRecord> {
        self.state.audit.records()
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A kubeconfig for `server` (an `http://` URL) acting as `user`.
///
/// The user is both the bearer token and the impersonated user (`as:`):
/// kubectl sends no bearer token over plain HTTP but does send
/// `Impersonate-User`, which the request log records. Context and cluster
/// are named `godwit-test`, the default namespace is `default`.
pub fn kubeconfig_yaml(server: &str, user: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: godwit-test
  cluster:
    server: {server}
    insecure-skip-tls-verify: true
users:
- name: godwit-test
  user:
    token: {user}
    as: {user}
contexts:
- name: godwit-test
  context:
    cluster: godwit-test
    user: godwit-test
    namespace: default
current-context: godwit-test
"
    )
}

/// Writes [`kubeconfig_yaml`] to `path`.
pub fn write_kubeconfig(path: &Path, server: &str, user: &str) -> Result<(), ApiServerError> {
    std::fs::write(path, kubeconfig_yaml(server, user)).map_err(ApiServerError::Kubeconfig)
}
