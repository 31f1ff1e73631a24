//! The node agent: Godwit's hands on one node.
//!
//! It renews the node's Lease, publishes what the node offers VMs, watches the
//! VMs and migrations labelled for its node, and makes the node match them:
//! starts, stops and re-attaches to VMM processes, drives its side of each
//! migration through the VMM control socket, and reports what happened into
//! the objects' status and as Events. It talks to the operator only through
//! API objects; `godwit_crds::contract` says who writes what.
//!
//! The loop is level-triggered: every change seen by a watch, and a tick every
//! second, runs one pass that compares every VM and migration with the node's
//! VM directories ([`local`]) and carries out what the pure functions in
//! [`decide`] say. A pass that fails half-way is simply redone.
//!
//! Self-fencing: when the Lease cannot be renewed for its whole duration the
//! operator may already restart the node's VMs elsewhere (HA), so the agent
//! stops them all and starts nothing until it renews again.

mod cold;
pub mod console;
pub mod decide;
pub mod disks;
pub mod local;
pub mod metrics;
pub mod restart;
pub mod tls;
pub mod usage;

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use godwit_crds::contract::{self, Machine};
use godwit_crds::vm::VmAddress;
use godwit_crds::{
    MigrationModeUsed, MigrationPhase, MigrationPolicy, MigrationProgress, MigrationResult,
    VMMigration, VirtualMachine, VmPhase,
};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Resource, ResourceExt};
use serde_json::{json, Value};
use tokio::sync::Notify;
use tracing::Instrument;

use decide::{MigrationAction, MigrationFacts, Outgoing, Role, VmAction, VmFacts};
use local::{Children, LocalState, Runner, VmDir};

/// The agent's exit status when it restarts itself after fencing.
pub const RESTART_AFTER_FENCE: i32 = 75;

/// How often a running migration's progress is written into its status (it
/// is also written whenever the phase moves). Fast enough for a progress bar
/// on a migration of a few seconds, slow enough not to load the API server.
const PROGRESS_PERIOD: Duration = Duration::from_millis(500);

/// How the agent runs.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// This node's name (the Node object and the `godwit.dev/node` label value).
    pub node: String,
    /// The address migration streams to this node use.
    pub node_ip: String,
    /// Node-local state: VM directories and local disks.
    pub state_dir: PathBuf,
    /// A directory every node sees, for shared disks.
    pub shared_dir: PathBuf,
    /// The `godwit-vmm` binary.
    pub vmm_binary: PathBuf,
    /// Namespace of the node Leases.
    pub lease_namespace: String,
    /// Lease duration.
    pub lease_seconds: i32,
    /// vCPUs offered to VMs.
    pub cpu: u64,
    /// Bytes of memory offered to VMs.
    pub memory_bytes: u64,
    /// Ports incoming migrations listen on (`first..=last`).
    pub migration_ports: (u16, u16),
    /// The migration CA (see [`tls`]); `None`: plain TCP migrations.
    pub migration_ca_dir: Option<PathBuf>,
    /// The users VMMs run as ([`local::VmmUsers`]); `None`: root.
    pub vmm_users: Option<local::VmmUsers>,
}

/// The agent's failures that end it (everything else is retried).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The API server refused something the agent cannot do without.
    #[error("{0}: {1}")]
    Api(String, #[source] kube::Error),
    /// The node's migration certificate could not be issued.
    #[error("Cannot set up migration TLS")]
    Identity(#[from] tls::IdentityError),
}

struct Agent {
    cfg: AgentConfig,
    client: Client,
    recorder: Recorder,
    runner: Runner,
    vms: Store<VirtualMachine>,
    outgoing: Store<VMMigration>,
    incoming: Store<VMMigration>,
    children: Mutex<Children>,
    /// When each migration's progress was last written.
    reported: Mutex<HashMap<String, Instant>>,
    /// Outgoing migrations whose post-copy link is lost (the VMM redials).
    reconnecting: Mutex<std::collections::HashSet<String>>,
    /// Cold migrations this agent sends or receives.
    cold: cold::ColdTasks,
    lease: Arc<LeaseHealth>,
}

/// When the Lease was last renewed.
#[derive(Debug)]
struct LeaseHealth {
    renewed: Mutex<Instant>,
    fenced: Mutex<bool>,
}

/// Runs the agent until it fails or `shutdown` resolves.
pub async fn run(
    client: Client,
    cfg: AgentConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    std::fs::create_dir_all(&cfg.state_dir).ok();
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "godwit-node".into(),
            instance: Some(cfg.node.clone()),
        },
    );
    let changed = Arc::new(Notify::new());
    let vms_api: Api<VirtualMachine> = Api::all(client.clone());
    let migrations_api: Api<VMMigration> = Api::all(client.clone());
    let (vms, vms_w) = reflector::store();
    let (outgoing, outgoing_w) = reflector::store();
    let (incoming, incoming_w) = reflector::store();
    let by = |key: &str| watcher::Config::default().labels(&format!("{key}={}", cfg.node));
    let watches = [
        reflector::reflector(vms_w, watcher(vms_api, by(contract::NODE_LABEL)))
            .applied_objects()
            .map(|_| ())
            .boxed(),
        reflector::reflector(
            outgoing_w,
            watcher(migrations_api.clone(), by(contract::SOURCE_LABEL)),
        )
        .applied_objects()
        .map(|_| ())
        .boxed(),
        reflector::reflector(
            incoming_w,
            watcher(migrations_api, by(contract::TARGET_LABEL)),
        )
        .applied_objects()
        .map(|_| ())
        .boxed(),
    ];
    let mut tasks = Vec::new();
    for w in watches {
        let changed = changed.clone();
        tasks.push(tokio::spawn(async move {
            let mut w = w;
            while w.next().await.is_some() {
                changed.notify_one();
            }
        }));
    }
    let migration_tls = match &cfg.migration_ca_dir {
        Some(ca) => Some(tls::issue(
            ca,
            &cfg.state_dir.join("tls"),
            &cfg.node,
            &cfg.node_ip,
        )?),
        None => None,
    };
    let lease = Arc::new(LeaseHealth {
        renewed: Mutex::new(Instant::now()),
        fenced: Mutex::new(false),
    });
    let agent = Arc::new(Agent {
        runner: Runner {
            vmm_binary: cfg.vmm_binary.clone(),
            tls: migration_tls,
            jail: Some(local::node_jail(
                &cfg.state_dir,
                &cfg.shared_dir,
                cfg.migration_ca_dir.as_slice(),
            )),
            users: cfg.vmm_users,
        },
        cfg,
        client,
        recorder,
        vms,
        outgoing,
        incoming,
        children: Mutex::new(Children::default()),
        reported: Mutex::new(HashMap::new()),
        reconnecting: Mutex::default(),
        cold: Mutex::new(HashMap::new()),
        lease,
    });
    tasks.push(tokio::spawn(renew_lease(agent.clone())));
    tasks.push(tokio::spawn(watch_fence(agent.clone())));
    tasks.push(tokio::spawn(usage::run(
        agent.client.clone(),
        agent.cfg.node.clone(),
        agent.cfg.state_dir.clone(),
        agent.cfg.shared_dir.clone(),
    )));
    // Nothing is decided before every watch has listed once: an empty store
    // would look like "no VMs here" and stop them all.
    for store in [&agent.outgoing, &agent.incoming] {
        let _ = store.wait_until_ready().await;
    }
    let _ = agent.vms.wait_until_ready().await;
    tracing::info!(node = %agent.cfg.node, "watching VMs and migrations");

    let main = async {
        let mut published = false;
        loop {
            if !published {
                published = agent.publish_capacity().await;
            }
            // While this node sends a VM, look at its progress often (the
            // status still gets it at most twice a second).
            // A fenced node decides nothing: what it knows may be stale.
            let sending = !agent.fenced() && agent.pass().await;
            let tick = if sending {
                Duration::from_millis(100)
            } else {
                Duration::from_secs(1)
            };
            tokio::select! {
                _ = changed.notified() => {}
                _ = tokio::time::sleep(tick) => {}
            }
        }
    };
    tokio::select! {
        _ = main => {}
        _ = shutdown => {}
    }
    for t in tasks {
        t.abort();
    }
    Ok(())
}

/// How often the agent renews a Lease of `lease_seconds`: an eighth of it
/// (1 s for the default 8 s), so a node cut off just after a renewal is
/// declared lost at most one period later than one cut just before.
pub fn renew_period(lease_seconds: i32) -> Duration {
    (Duration::from_secs(lease_seconds.max(1) as u64) / 8).max(Duration::from_millis(250))
}

/// Renews the node's Lease every [`renew_period`]; fences the node when
/// renewal has failed for the whole lease duration.
async fn renew_lease(agent: Arc<Agent>) {
    let api: Api<Lease> = Api::namespaced(agent.client.clone(), &agent.cfg.lease_namespace);
    let name = contract::node_lease_name(&agent.cfg.node);
    let every = renew_period(agent.cfg.lease_seconds);
    loop {
        // The Lease says renewed at about `sent` (renew_once stamps it next);
        // the fence deadline counts from there, never from a late answer.
        let sent = Instant::now();
        // A renewal that hangs (a dead link) counts as failed after a period.
        let renewed = tokio::time::timeout(every, renew_once(&api, &name, &agent.cfg))
            .await
            .unwrap_or_else(|_| Err(kube::Error::Service("Lease renewal timed out".into())));
        match renewed {
            Ok(()) => {
                *agent.lease.renewed.lock().unwrap() = sent;
                if *agent.lease.fenced.lock().unwrap() {
                    // While cut off, the watches may have missed changes (and
                    // a half-dead connection can stay stale for a long time):
                    // start afresh, from new lists, as a restarted agent does.
                    // The VMMs are not ours to lose; the DaemonSet (or the
                    // local cluster) starts the agent again.
                    tracing::warn!("Lease renewed again after fencing; restarting the agent to rebuild its view");
                    std::process::exit(RESTART_AFTER_FENCE);
                }
            }
            Err(e) => {
                let since = agent.lease.renewed.lock().unwrap().elapsed();
                tracing::warn!(error = %e, "cannot renew Lease {name} (last renewed {since:?} ago)");
            }
        }
        // The next attempt one period after this one started, however long
        // this one took.
        tokio::time::sleep(every.saturating_sub(sent.elapsed())).await;
    }
}

/// Fences the node one second before its Lease would expire unrenewed, so
/// that by the time the operator sees the Lease expired (and restarts the
/// node's VMs elsewhere) none of them runs here any more.
async fn watch_fence(agent: Arc<Agent>) {
    let lease = Duration::from_secs(agent.cfg.lease_seconds.max(2) as u64);
    let deadline = lease - Duration::from_secs(1);
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let since = agent.lease.renewed.lock().unwrap().elapsed();
        if since >= deadline {
            fence(&agent).await;
        }
    }
}

async fn renew_once(api: &Api<Lease>, name: &str, cfg: &AgentConfig) -> Result<(), kube::Error> {
    let now = MicroTime(Timestamp::now());
    match api.get_opt(name).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.into()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(cfg.node.clone()),
                    lease_duration_seconds: Some(cfg.lease_seconds),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    ..Default::default()
                }),
            };
            api.create(&PostParams::default(), &lease).await.map(|_| ())
        }
        Some(_) => {
            let patch = json!({"spec": {
                "holderIdentity": cfg.node,
                "leaseDurationSeconds": cfg.lease_seconds,
                "renewTime": now,
            }});
            api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map(|_| ())
        }
    }
}

/// Stops every VMM on the node: it can no longer prove it owns them.
async fn fence(agent: &Arc<Agent>) {
    {
        let mut fenced = agent.lease.fenced.lock().unwrap();
        if *fenced {
            return;
        }
        *fenced = true;
    }
    tracing::error!("Lease expired: fencing this node (stopping every VM)");
    metrics::global().fenced();
    let dirs = VmDir::scan(&agent.cfg.state_dir, &agent.cfg.shared_dir);
    // All at once, with a short grace: the operator restarts them elsewhere
    // soon after the Lease expires.
    let stops: Vec<_> = dirs
        .into_iter()
        .filter(|d| d.state().alive)
        .map(|dir| {
            tokio::task::spawn_blocking(move || local::stop(&dir, Duration::from_millis(300)))
        })
        .collect();
    for s in stops {
        let _ = s.await;
    }
}

fn now_time() -> Time {
    Time(Timestamp::now())
}

fn key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

impl Agent {
    fn running_message(&self) -> String {
        format!("running on {}", self.cfg.node)
    }

    fn fenced(&self) -> bool {
        *self.lease.fenced.lock().unwrap()
    }

    fn dir(&self, namespace: &str, name: &str) -> VmDir {
        VmDir::new(&self.cfg.state_dir, &self.cfg.shared_dir, namespace, name)
    }

    /// Writes the node's VM capacity into annotations on its Node.
    async fn publish_capacity(&self) -> bool {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let patch = json!({"metadata": {"annotations": {
            contract::CAPACITY_CPU_ANNOTATION: self.cfg.cpu.to_string(),
            contract::CAPACITY_MEMORY_ANNOTATION: self.cfg.memory_bytes.to_string(),
            contract::CACHED_IMAGES_ANNOTATION: "",
        }}});
        match nodes
            .patch(
                &self.cfg.node,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(error = %e, "cannot publish capacity on Node {}", self.cfg.node);
                false
            }
        }
    }

    /// One pass over everything labelled for this node and every VM directory.
    /// Returns whether a migration this node sends is in flight.
    async fn pass(self: &Arc<Self>) -> bool {
        self.children.lock().unwrap().reap();
        let vms = self.vms.state();
        let mut known = BTreeSet::new();
        for vm in &vms {
            let ns = vm.namespace().unwrap_or_default();
            known.insert(key(&ns, &vm.name_any()));
            let span = tracing::info_span!("vm", namespace = %ns, vm = %vm.name_any());
            if let Err(e) = self.reconcile_vm(vm).instrument(span).await {
                tracing::warn!(vm = %key(&ns, &vm.name_any()), error = %e, "VM pass failed; retrying");
            }
        }
        let mut migrations: Vec<(Role, Arc<VMMigration>)> = Vec::new();
        migrations.extend(self.outgoing.state().into_iter().map(|m| (Role::Source, m)));
        migrations.extend(self.incoming.state().into_iter().map(|m| (Role::Target, m)));
        for (role, m) in &migrations {
            let node_matches = match role {
                Role::Source => m.status.as_ref().and_then(|s| s.source_node.as_deref()),
                Role::Target => m.status.as_ref().and_then(|s| s.target_node.as_deref()),
            } == Some(self.cfg.node.as_str());
            if !node_matches {
                continue;
            }
            let span = tracing::info_span!("migration", namespace = %m.namespace().unwrap_or_default(), vm = %m.spec.vm_name, migration = %m.name_any(), role = ?role);
            if let Err(e) = self.reconcile_migration(*role, m).instrument(span).await {
                tracing::warn!(migration = %m.name_any(), error = %e, "migration pass failed; retrying");
            }
        }
        // VM directories no VM here accounts for.
        for dir in VmDir::scan(&self.cfg.state_dir, &self.cfg.shared_dir) {
            if known.contains(&key(&dir.namespace, &dir.name)) {
                continue;
            }
            let wanted = migrations.iter().any(|(role, m)| {
                *role == Role::Target
                    && m.namespace().as_deref() == Some(dir.namespace.as_str())
                    && m.spec.vm_name == dir.name
                    && self.target_keeps(m)
            });
            if !wanted {
                tracing::info!(vm = %key(&dir.namespace, &dir.name), "VM no longer here; stopping its VMM and removing its node-local files");
                let _ = tokio::task::spawn_blocking(move || {
                    local::stop(&dir, Duration::from_secs(2));
                    local::remove(&dir, false)
                })
                .await;
            }
        }
        migrations.iter().any(|(role, m)| {
            *role == Role::Source
                && m.status.as_ref().is_some_and(|s| {
                    !s.phase.is_final() && s.source_node.as_deref() == Some(self.cfg.node.as_str())
                })
        })
    }

    /// Whether the target keeps a VMM it started for migration `m`.
    fn target_keeps(&self, m: &VMMigration) -> bool {
        let Some(status) = &m.status else {
            return false;
        };
        if !status.phase.is_final() {
            return true;
        }
        status.phase == MigrationPhase::Succeeded
            && status.end_time.as_ref().is_none_or(|t| {
                Timestamp::now().duration_since(t.0).as_secs() < contract::ADOPTION_GRACE_SECONDS
            })
    }

    async fn reconcile_vm(self: &Arc<Self>, vm: &VirtualMachine) -> anyhow::Result<()> {
        let ns = vm.namespace().unwrap_or_default();
        let name = vm.name_any();
        let dir = self.dir(&ns, &name);
        let local = dir.state();
        let machine: Option<Machine> = vm
            .annotations()
            .get(contract::RESOLVED_ANNOTATION)
            .and_then(|a| serde_json::from_str(a).ok());
        let status = vm.status.clone().unwrap_or_default();
        let facts = VmFacts {
            phase: status.phase,
            run_strategy: vm.spec.run_strategy,
            deleting: vm.meta().deletion_timestamp.is_some(),
            has_finalizer: vm
                .finalizers()
                .iter()
                .any(|f| f == contract::AGENT_FINALIZER),
            has_machine: machine.is_some(),
            migrating: status.migration.is_some(),
            reported_here: status.conditions.iter().any(|c| {
                c.type_ == "Ready" && c.status == "True" && c.message == self.running_message()
            }),
        };
        let action = decide::decide_vm(&facts, &local);
        let action = restart::adjust(action, vm, &facts, &dir, &local);
        let api: Api<VirtualMachine> = Api::namespaced(self.client.clone(), &ns);
        match action {
            VmAction::Nothing => {}
            VmAction::AddFinalizer => {
                let mut finalizers = vm.finalizers().to_vec();
                finalizers.push(contract::AGENT_FINALIZER.into());
                let patch = json!({"metadata": {"finalizers": finalizers, "resourceVersion": vm.resource_version()}});
                api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await?;
            }
            VmAction::Start => {
                if self.fenced() {
                    return Ok(());
                }
                let machine = machine.expect("decided to start only with a machine");
                self.vm_phase(&api, vm, VmPhase::Provisioning, None).await?;
                let runner = self.runner.clone();
                let d = dir.clone();
                let m = machine.clone();
                match tokio::task::spawn_blocking(move || runner.boot(&d, &m)).await? {
                    Ok(child) => {
                        self.children.lock().unwrap().insert(&dir, child);
                        self.vm_phase(&api, vm, VmPhase::Starting, None).await?;
                        self.event(
                            vm,
                            EventType::Normal,
                            "Starting",
                            "Start",
                            format!(
                                "Starting the VMM on {} ({} vCPU, {} MiB)",
                                self.cfg.node,
                                machine.cpu,
                                machine.memory_bytes >> 20
                            ),
                        )
                        .await;
                    }
                    Err(e) => {
                        let msg = format!(
                            "cannot start on {}: {}",
                            self.cfg.node,
                            crate::error_chain(&e)
                        );
                        self.vm_phase(&api, vm, VmPhase::Failed, Some(("StartFailed", &msg)))
                            .await?;
                        self.event(vm, EventType::Warning, "StartFailed", "Start", msg)
                            .await;
                    }
                }
            }
            VmAction::ReportRunning => {
                // The control socket appears once the VMM is up.
                let sock = dir.api_sock();
                let up =
                    tokio::task::spawn_blocking(move || local::control(&sock, "status", json!({})))
                        .await?;
                if up.is_ok() {
                    self.report_running(&api, vm, &dir).await?;
                }
            }
            VmAction::Stop => {
                if status.phase != VmPhase::Stopping
                    && status.phase.can_transition_to(VmPhase::Stopping)
                {
                    self.vm_phase(&api, vm, VmPhase::Stopping, None).await?;
                    self.event(
                        vm,
                        EventType::Normal,
                        "Stopping",
                        "Stop",
                        format!("Stopping the VM on {}", self.cfg.node),
                    )
                    .await;
                }
                let d = dir.clone();
                tokio::task::spawn_blocking(move || local::stop(&d, Duration::from_secs(5)))
                    .await?;
            }
            VmAction::ReportExit {
                failed,
                reason,
                cause: why,
            } => {
                let phase = if failed {
                    VmPhase::Failed
                } else {
                    VmPhase::Stopped
                };
                let detail = format!(
                    "{reason} on {}; console: {}",
                    self.cfg.node,
                    local::tail(&dir.file("console.log"), 2)
                );
                // Stopping → Stopped; anything else → Stopping → Stopped.
                if phase == VmPhase::Stopped && !status.phase.can_transition_to(VmPhase::Stopped) {
                    self.vm_phase(&api, vm, VmPhase::Stopping, None).await?;
                }
                self.vm_phase(&api, vm, phase, Some((why, &detail))).await?;
                let kind = if failed {
                    EventType::Warning
                } else {
                    EventType::Normal
                };
                self.event(vm, kind, why, "Exit", detail).await;
            }
            VmAction::Cleanup => {
                let d = dir.clone();
                tokio::task::spawn_blocking(move || local::remove(&d, true)).await??;
                let finalizers: Vec<String> = vm
                    .finalizers()
                    .iter()
                    .filter(|f| *f != contract::AGENT_FINALIZER)
                    .cloned()
                    .collect();
                let patch = json!({"metadata": {"finalizers": finalizers, "resourceVersion": vm.resource_version()}});
                api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await?;
                self.event(
                    vm,
                    EventType::Normal,
                    "Deleted",
                    "Delete",
                    format!("VMM stopped and disks removed on {}", self.cfg.node),
                )
                .await;
            }
        }
        Ok(())
    }

    async fn report_running(
        &self,
        api: &Api<VirtualMachine>,
        vm: &VirtualMachine,
        dir: &VmDir,
    ) -> anyhow::Result<()> {
        let machine = dir.machine().unwrap_or_default();
        let addresses: Vec<VmAddress> = machine
            .networks
            .iter()
            .map(|n| VmAddress {
                network: n.name.clone(),
                mac: Some(n.mac.clone()),
                ip: n
                    .ip
                    .as_ref()
                    .map(|ip| ip.split('/').next().unwrap_or(ip).to_string()),
            })
            .collect();
        let phase = vm.status.as_ref().map(|s| s.phase).unwrap_or_default();
        if phase == VmPhase::Scheduled {
            // Adopted (or started by an agent that died) before it said so.
            self.vm_phase(api, vm, VmPhase::Starting, None).await?;
        }
        let patch = json!({"status": {
            "phase": VmPhase::Running,
            "nodeName": self.cfg.node,
            "addresses": addresses,
            "conditions": [ready(true, "Running", &self.running_message())],
        }});
        api.patch_status(
            &vm.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
        self.event(
            vm,
            EventType::Normal,
            "Started",
            "Start",
            format!("Running on {}", self.cfg.node),
        )
        .await;
        Ok(())
    }

    async fn vm_phase(
        &self,
        api: &Api<VirtualMachine>,
        vm: &VirtualMachine,
        phase: VmPhase,
        condition: Option<(&str, &str)>,
    ) -> anyhow::Result<()> {
        let mut status = json!({"phase": phase});
        if let Some((reason, message)) = condition {
            status["conditions"] = json!([ready(false, reason, message)]);
        }
        api.patch_status(
            &vm.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&json!({ "status": status })),
        )
        .await?;
        Ok(())
    }

    async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &obj.object_ref(&())).await {
            tracing::debug!(error = %e, "cannot publish event");
        }
    }

    async fn reconcile_migration(
        self: &Arc<Self>,
        role: Role,
        m: &VMMigration,
    ) -> anyhow::Result<()> {
        let ns = m.namespace().unwrap_or_default();
        let status = m.status.clone().unwrap_or_default();
        let dir = self.dir(&ns, &m.spec.vm_name);
        let local = dir.state();
        let facts = MigrationFacts {
            name: m.name_any(),
            phase: status.phase,
            target_address: status.target_address.clone(),
            cancel_requested: m.meta().deletion_timestamp.is_some()
                || m.annotations()
                    .get(contract::CANCEL_ANNOTATION)
                    .map(String::as_str)
                    == Some("true"),
        };
        let api: Api<VMMigration> = Api::namespaced(self.client.clone(), &ns);
        let cold = m.spec.mode == godwit_crds::MigrationMode::Cold;
        if cold && role == Role::Source {
            return self.cold_source(&api, m, &dir, &facts).await;
        }
        let outgoing = if role == Role::Source {
            self.outgoing_state(&dir, &local, &facts.name).await
        } else {
            Outgoing::NoVmm
        };
        if cold && facts.phase.is_final() {
            self.forget_cold("target", m);
        }
        match decide::decide_migration(role, &facts, &local, &outgoing) {
            MigrationAction::Nothing => {}
            MigrationAction::PrepareTarget if cold => {
                self.prepare_cold_target(&api, m, &dir).await?
            }
            MigrationAction::PrepareTarget => self.prepare_target(&api, m, &dir).await?,
            MigrationAction::DiscardIncoming => {
                let d = dir.clone();
                tokio::task::spawn_blocking(move || {
                    local::stop(&d, Duration::from_secs(2));
                    local::remove(&d, false)
                })
                .await??;
                self.event(
                    m,
                    EventType::Normal,
                    "TargetCleaned",
                    "Cleanup",
                    format!("Removed the incoming VM on {}", self.cfg.node),
                )
                .await;
            }
            MigrationAction::Send => self.send(&api, m, &dir).await?,
            MigrationAction::Follow { cancel } => self.follow(&api, m, &dir, cancel).await?,
            MigrationAction::End(phase, reason) => {
                self.end_migration(&api, m, phase, &reason, None).await?;
            }
        }
        Ok(())
    }

    async fn outgoing_state(&self, dir: &VmDir, local: &LocalState, name: &str) -> Outgoing {
        let sent = std::fs::read_to_string(dir.file("outgoing")).unwrap_or_default();
        if sent.trim() != name {
            return if local.alive {
                Outgoing::NotStarted
            } else {
                Outgoing::NoVmm
            };
        }
        if !local.alive {
            // A source that sent the guest away exits after a grace period;
            // what it said last is in the `outgoing-result` file.
            return if dir.file("outgoing-result").exists() {
                Outgoing::Ended
            } else {
                Outgoing::NoVmm
            };
        }
        let sock = dir.api_sock();
        match tokio::task::spawn_blocking(move || {
            local::control(&sock, "migrate-status", json!({}))
        })
        .await
        {
            Ok(Ok(p)) if matches!(p["stage"].as_str(), Some("Completed" | "Failed")) => {
                Outgoing::Ended
            }
            Ok(Ok(_)) => Outgoing::Running,
            _ => Outgoing::NoVmm,
        }
    }

    async fn prepare_target(
        &self,
        api: &Api<VMMigration>,
        m: &VMMigration,
        dir: &VmDir,
    ) -> anyhow::Result<()> {
        let vms: Api<VirtualMachine> =
            Api::namespaced(self.client.clone(), &m.namespace().unwrap_or_default());
        let vm = vms.get(&m.spec.vm_name).await?;
        let machine: Machine = match vm
            .annotations()
            .get(contract::RESOLVED_ANNOTATION)
            .map(|a| serde_json::from_str(a))
        {
            Some(Ok(machine)) => machine,
            _ => {
                return self
                    .end_migration(
                        api,
                        m,
                        MigrationPhase::Failed,
                        "the VM has no resolved machine to receive",
                        None,
                    )
                    .await;
            }
        };
        let copy_disks = m.spec.storage == Some(godwit_crds::StorageMode::Copy);
        if let Some(disk) = machine
            .disks
            .iter()
            .find(|d| !copy_disks && disks::moves_with_vm(d))
        {
            let msg = format!(
                "disk {:?} is on node-local storage and writable; set spec.storage: Copy to copy it with the migration",
                disk.name
            );
            return self
                .end_migration(api, m, MigrationPhase::Failed, &msg, None)
                .await;
        }
        let port = free_port(&self.cfg.node_ip, self.cfg.migration_ports).ok_or_else(|| {
            anyhow::anyhow!("no free migration port in {:?}", self.cfg.migration_ports)
        })?;
        let addr = format!("{}:{port}", self.cfg.node_ip);
        let runner = self.runner.clone();
        let (d, name) = (dir.clone(), m.name_any());
        let started = tokio::task::spawn_blocking(move || {
            let child = runner.incoming(&d, &machine, &name, &addr, copy_disks)?;
            local::wait_listening(&d, Duration::from_secs(10)).map(|a| (child, a))
        })
        .await?;
        match started {
            Ok((child, listening)) => {
                self.children.lock().unwrap().insert(dir, child);
                self.patch_migration(api, m, json!({"targetAddress": listening}))
                    .await?;
                self.event(
                    m,
                    EventType::Normal,
                    "TargetReady",
                    "Prepare",
                    format!("{} waits for the VM on {listening}", self.cfg.node),
                )
                .await;
            }
            Err(e) => {
                let msg = format!(
                    "target {} could not prepare: {}",
                    self.cfg.node,
                    crate::error_chain(&e)
                );
                let d = dir.clone();
                let _ = tokio::task::spawn_blocking(move || local::remove(&d, false)).await;
                self.end_migration(api, m, MigrationPhase::Failed, &msg, None)
                    .await?;
            }
        }
        Ok(())
    }

    fn policy(&self, m: &VMMigration, vm: Option<&VirtualMachine>) -> MigrationPolicy {
        let from_vm = vm
            .and_then(|v| v.spec.migration_policy.clone())
            .unwrap_or_default();
        m.spec.policy.clone().unwrap_or_default().or(&from_vm)
    }

    async fn send(
        &self,
        api: &Api<VMMigration>,
        m: &VMMigration,
        dir: &VmDir,
    ) -> anyhow::Result<()> {
        let vm = self
            .vms
            .state()
            .into_iter()
            .find(|v| v.namespace() == m.namespace() && v.name_any() == m.spec.vm_name);
        let policy = self.policy(m, vm.as_deref());
        let addr = m
            .status
            .as_ref()
            .and_then(|s| s.target_address.clone())
            .expect("decided to send only with an address");
        // Live storage migration: the disks that move with the VM, by the
        // machine the source VMM was started with.
        let copy_disks = if m.spec.storage == Some(godwit_crds::StorageMode::Copy) {
            dir.machine()
                .map(|machine| disks::copied(&machine))
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let mut args = json!({
            "addr": addr,
            "vm_name": m.spec.vm_name,
            "copy_disks": copy_disks,
            "max_downtime_ms": policy.max_downtime_ms.unwrap_or(MigrationPolicy::DEFAULT_MAX_DOWNTIME_MS),
            "bandwidth_mbps": policy.bandwidth_mbps,
            "allow_auto_converge": policy.allow_auto_converge.unwrap_or(true),
            "allow_post_copy": policy.allow_post_copy.unwrap_or(true),
            "timeout_s": policy.completion_timeout_seconds.unwrap_or(MigrationPolicy::DEFAULT_COMPLETION_TIMEOUT_SECONDS),
        });
        // The identity as it is now (a renewed certificate is used at once),
        // as PEM text: a VMM that runs as its own user cannot read the key.
        if let Some(files) = &self.runner.tls {
            let pem = files.read_pem()?;
            args["tls"] = serde_json::to_value(pem).expect("PEM text serialises");
        }
        std::fs::write(dir.file("outgoing"), m.name_any())?;
        let _ = std::fs::remove_file(dir.file("outgoing-result"));
        let sock = dir.api_sock();
        let sent = tokio::task::spawn_blocking(move || local::control(&sock, "migrate-send", args))
            .await?;
        match sent {
            Ok(_) => {
                self.patch_migration(api, m, json!({"phase": MigrationPhase::PreCopy}))
                    .await?;
                self.event(
                    m,
                    EventType::Normal,
                    "PreCopy",
                    "Migrate",
                    format!("Sending the VM from {} to {addr}", self.cfg.node),
                )
                .await;
            }
            Err(e) => {
                let _ = std::fs::remove_file(dir.file("outgoing"));
                let msg = format!(
                    "the source VMM refused to send: {e}; the VM keeps running on {}",
                    self.cfg.node
                );
                self.end_migration(api, m, MigrationPhase::Failed, &msg, None)
                    .await?;
            }
        }
        Ok(())
    }

    async fn follow(
        &self,
        api: &Api<VMMigration>,
        m: &VMMigration,
        dir: &VmDir,
        cancel: bool,
    ) -> anyhow::Result<()> {
        let sock = dir.api_sock();
        let result_file = dir.file("outgoing-result");
        let progress = tokio::task::spawn_blocking(move || -> Result<Value, local::LocalError> {
            if cancel {
                local::control(&sock, "migrate-cancel", json!({}))?;
            }
            match local::control(&sock, "migrate-status", json!({})) {
                Ok(p) => {
                    if matches!(p["stage"].as_str(), Some("Completed" | "Failed")) {
                        let _ = std::fs::write(&result_file, p.to_string());
                    }
                    Ok(p)
                }
                // The source left after its grace period: its last word is on file.
                Err(e) => std::fs::read_to_string(&result_file)
                    .ok()
                    .and_then(|t| serde_json::from_str(&t).ok())
                    .ok_or(e),
            }
        })
        .await??;
        self.report(api, m, &progress, false).await
    }

    /// Writes what an outgoing migration's `progress` (the source's
    /// [`crate::migration::Progress`] as JSON) says into its status: the
    /// phase (walking the documented path), the figures, and the end.
    async fn report(
        &self,
        api: &Api<VMMigration>,
        m: &VMMigration,
        progress: &Value,
        cold: bool,
    ) -> anyhow::Result<()> {
        let stays = if cold {
            format!("the VM stays stopped on {} with its disks", self.cfg.node)
        } else if progress["guest_lost"].as_bool() == Some(true) {
            "the guest may have run on the target and is lost; it is restarted as its runStrategy says"
                .to_string()
        } else {
            format!("the VM keeps running on {}", self.cfg.node)
        };
        let status = m.status.clone().unwrap_or_default();
        let stage = progress["stage"].as_str().unwrap_or("PreCopy");
        let wanted = match stage {
            "StopAndCopy" => MigrationPhase::StopAndCopy,
            "PostCopy" => MigrationPhase::PostCopy,
            "Committing" => MigrationPhase::Committing,
            "Completed" => MigrationPhase::Succeeded,
            "Failed" => MigrationPhase::Failed,
            _ => MigrationPhase::PreCopy,
        };
        if wanted == MigrationPhase::Failed {
            let error = progress["error"].as_str().unwrap_or("unknown error");
            let cancelled = m.meta().deletion_timestamp.is_some()
                || m.annotations()
                    .get(contract::CANCEL_ANNOTATION)
                    .map(String::as_str)
                    == Some("true");
            let (phase, msg) = if cancelled {
                (
                    MigrationPhase::Cancelled,
                    format!("cancelled ({error}); {stays}"),
                )
            } else {
                (MigrationPhase::Failed, format!("{error}; {stays}"))
            };
            return self.end_migration(api, m, phase, &msg, None).await;
        }
        let p = migration_progress(progress);
        if wanted == MigrationPhase::Succeeded {
            // Walk the documented phases so a watcher sees each of them.
            let mut at = status.phase;
            while decide::next_phase(at, wanted) != wanted {
                at = decide::next_phase(at, wanted);
                self.patch_migration(api, m, json!({"phase": at, "progress": p}))
                    .await?;
            }
            let r = &progress["result"];
            let result = MigrationResult {
                total_time_ms: r["total_ms"].as_u64().unwrap_or(0),
                downtime_ms: r["downtime_ms"].as_f64().unwrap_or(0.0).round() as u64,
                transferred_bytes: r["bytes_sent"].as_u64().unwrap_or(0),
                rounds: r["rounds"].as_u64().unwrap_or(0) as u32,
                mode_used: match r["mode"].as_str() {
                    Some("AutoConverge") => MigrationModeUsed::AutoConverge,
                    Some("PostCopy") => MigrationModeUsed::PostCopy,
                    Some("Cold") => MigrationModeUsed::Cold,
                    _ => MigrationModeUsed::PreCopy,
                },
            };
            let note = format!(
                "Moved to {} in {} ms, downtime {} ms, {} bytes in {} rounds ({:?})",
                status.target_node.as_deref().unwrap_or("?"),
                result.total_time_ms,
                result.downtime_ms,
                result.transferred_bytes,
                result.rounds,
                result.mode_used
            );
            self.end_migration(api, m, MigrationPhase::Succeeded, &note, Some((p, result)))
                .await?;
            return Ok(());
        }
        // Progress at most twice a second, and whenever the phase moves.
        let key = format!("{}/{}", m.namespace().unwrap_or_default(), m.name_any());
        let lost = progress["reconnecting"].as_bool() == Some(true);
        let was_lost = if lost {
            !self.reconnecting.lock().unwrap().insert(key.clone())
        } else {
            self.reconnecting.lock().unwrap().remove(&key)
        };
        if lost != was_lost {
            let (kind, reason, note) = if lost {
                (
                    EventType::Warning,
                    "LinkLost",
                    "The migration link was lost in post-copy; the guest runs on the target and its vCPUs that need pages still here wait; the source dials the target again (up to 60 s by default)",
                )
            } else {
                (
                    EventType::Normal,
                    "LinkRestored",
                    "The migration link is back; post-copy carries on",
                )
            };
            self.event(m, kind, reason, "Migrate", note.to_string())
                .await;
        }
        let phase = decide::next_phase(status.phase, wanted);
        let due = self
            .reported
            .lock()
            .unwrap()
            .get(&key)
            .is_none_or(|t| t.elapsed() >= PROGRESS_PERIOD);
        if due || phase != status.phase {
            self.patch_migration(api, m, json!({"phase": phase, "progress": p}))
                .await?;
            self.reported.lock().unwrap().insert(key, Instant::now());
            if phase != status.phase {
                self.event(
                    m,
                    EventType::Normal,
                    &format!("{phase:?}"),
                    "Migrate",
                    format!(
                        "{phase:?}: round {}, {} bytes left",
                        p.round, p.memory_remaining_bytes
                    ),
                )
                .await;
            }
        }
        Ok(())
    }

    /// Merges `status` into migration `m`'s status.
    async fn patch_migration(
        &self,
        api: &Api<VMMigration>,
        m: &VMMigration,
        status: Value,
    ) -> anyhow::Result<()> {
        api.patch_status(
            &m.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&json!({ "status": status })),
        )
        .await?;
        Ok(())
    }

    async fn end_migration(
        &self,
        api: &Api<VMMigration>,
        m: &VMMigration,
        phase: MigrationPhase,
        message: &str,
        done: Option<(MigrationProgress, MigrationResult)>,
    ) -> anyhow::Result<()> {
        let started = m.status.as_ref().and_then(|s| s.start_time.as_ref());
        let elapsed =
            started.and_then(|t| Duration::try_from(Timestamp::now().duration_since(t.0)).ok());
        metrics::global().migration_ended(phase, done.as_ref().map(|d| &d.1), elapsed);
        let mut status = json!({
            "phase": phase,
            "endTime": now_time(),
        });
        match done {
            Some((progress, result)) => {
                status["progress"] = serde_json::to_value(progress)?;
                status["result"] = serde_json::to_value(result)?;
            }
            None => status["failureReason"] = json!(message),
        }
        self.patch_migration(api, m, status).await?;
        let kind = if phase == MigrationPhase::Succeeded {
            EventType::Normal
        } else {
            EventType::Warning
        };
        self.event(
            m,
            kind,
            &format!("{phase:?}"),
            "Migrate",
            message.to_string(),
        )
        .await;
        Ok(())
    }
}

fn ready(ok: bool, reason: &str, message: &str) -> Condition {
    Condition {
        type_: "Ready".into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: now_time(),
        observed_generation: None,
    }
}

fn migration_progress(p: &Value) -> MigrationProgress {
    let u = |k: &str| p[k].as_u64().unwrap_or(0);
    MigrationProgress {
        round: u("round") as u32,
        memory_total_bytes: u("memory_total_bytes"),
        memory_remaining_bytes: u("memory_remaining_bytes"),
        disk_total_bytes: 0,
        disk_remaining_bytes: 0,
        transferred_bytes: u("transferred_bytes"),
        dirty_rate_bytes_per_second: u("dirty_rate_bytes_per_second"),
        bandwidth_bytes_per_second: u("bandwidth_bytes_per_second"),
        expected_downtime_ms: u("expected_downtime_ms"),
    }
}

/// A port in `range` nothing listens on at `ip`.
fn free_port(ip: &str, range: (u16, u16)) -> Option<u16> {
    // Start at a different place each time so two preparations in a row do
    // not race for the same port.
    let span = u32::from(range.1 - range.0) + 1;
    let start = (std::process::id() ^ Instant::now().elapsed().subsec_nanos() ^ rand_seed()) % span;
    (0..span)
        .map(|i| range.0 + ((start + i) % span) as u16)
        .find(|p| std::net::TcpListener::bind((ip, *p)).is_ok())
}

fn rand_seed() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}

#[cfg(test)]
mod lease_tests {
    use super::*;

    #[test]
    fn the_lease_is_renewed_every_eighth_of_it_but_not_too_often() {
        assert_eq!(renew_period(8), Duration::from_secs(1));
        assert_eq!(renew_period(20), Duration::from_millis(2500));
        assert_eq!(renew_period(1), Duration::from_millis(250));
        assert_eq!(renew_period(0), Duration::from_millis(250));
    }
}
