//! The agent's wiring and its pass loop.
//!
//! [`run`] sets up the watches (VMs labelled for this node, migrations
//! whose source or target it is), the Lease renewal and fence watch
//! ([`super::lease`]) and the usage publisher, then waits until every watch
//! has listed once. From then on every change seen by a watch, and a tick
//! every second, runs one pass: every VM ([`super::vm_reconcile`]), every
//! migration ([`super::migrate`]), and every VM directory no VM here
//! accounts for. A pass that fails half-way is simply redone.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use godwit_crds::contract;
use godwit_crds::{MigrationPhase, VMMigration, VirtualMachine};
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::{Client, ResourceExt};
use tokio::sync::Notify;
use tracing::Instrument;

use super::certificates::{self, IdentityError};
use super::cgroup::{CgroupError, Cgroups};
use super::config::AgentConfig;
use super::context::{key, Agent};
use super::decide::Role;
use super::firewall::{Firewall, FirewallError};
use super::lease::{self, LeaseHealth};
use super::vm_dir::{self, VmDir};
use super::vmm_process::{self, node_jail, Children, Runner};
use super::{godwit_node, migrate, usage, vm_reconcile};

/// The agent's failures that end it (everything else is retried).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The API server refused something the agent cannot do without.
    #[error("{0}: {1}")]
    Api(String, #[source] kube::Error),
    /// The node's migration certificate could not be issued.
    #[error("Cannot set up migration TLS")]
    Identity(#[from] IdentityError),
    /// The VMs' cgroups cannot be made.
    #[error("Cannot set up the VMs' cgroups")]
    Cgroup(#[from] CgroupError),
    /// The node's FORWARD rules for VM taps cannot be added.
    #[error("Cannot let VM traffic through the node's firewall")]
    Firewall(#[from] FirewallError),
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
    tasks.push(tokio::spawn(super::cluster_templates::keep_current(
        client.clone(),
        cfg.image_dirs.trusted().clone(),
    )));
    let migration_tls = match (&cfg.migration_ca_dir, cfg.migration_csr) {
        (Some(ca), _) => Some(certificates::issue(
            ca,
            &cfg.state_dir.join("tls"),
            &cfg.node,
            &cfg.node_ip,
        )?),
        (None, Some(wait)) => {
            let id = certificates::request::NodeIdentity {
                node: cfg.node.clone(),
                address: cfg.node_ip.clone(),
                ca_namespace: cfg.lease_namespace.clone(),
                out_dir: cfg.state_dir.join("tls"),
                wait,
                lifetime: cfg.migration_certificate_lifetime,
            };
            let issued = certificates::request::request(&client, &id).await?;
            tasks.push(tokio::spawn(certificates::request::keep_renewed(
                client.clone(),
                id,
                issued.renew_at,
            )));
            Some(issued.files)
        }
        (None, None) => None,
    };
    let cgroups = Cgroups::new(
        &cfg.cgroup_root,
        &cfg.cgroup_parent,
        cfg.vmm_memory_overhead_bytes,
    )?;
    tracing::info!(
        version = cgroups.hierarchy().version(),
        parent = %cgroups.parent_dirs()[0].display(),
        "VMMs run in their own cgroups"
    );
    let firewall = {
        let backend = cfg.iptables;
        tokio::task::spawn_blocking(move || Firewall::install(backend))
            .await
            .expect("firewall task")?
    };
    let lease = Arc::new(LeaseHealth::default());
    let agent = Arc::new(Agent {
        runner: Runner {
            vmm_binary: cfg.vmm_binary.clone(),
            tls: migration_tls,
            jail: Some(node_jail(
                &cfg.state_dir,
                &cfg.shared_dir,
                cfg.migration_ca_dir.as_slice(),
            )),
            users: cfg.vmm_users,
            cgroups: Some(cgroups),
            image_dirs: cfg.image_dirs.clone(),
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
        ended: Mutex::default(),
        cold: Mutex::new(HashMap::new()),
        lease,
    });
    tasks.push(tokio::spawn(lease::renew(
        agent.client.clone(),
        agent.cfg.clone(),
        agent.lease.clone(),
    )));
    tasks.push(tokio::spawn(lease::watch_fence(
        agent.cfg.clone(),
        agent.lease.clone(),
    )));
    tasks.push(tokio::spawn(usage::run(
        agent.client.clone(),
        agent.cfg.node.clone(),
        agent.cfg.lease_namespace.clone(),
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
                published = godwit_node::publish_capacity(&agent.client, &agent.cfg).await;
            }
            // While this node sends a VM, look at its progress often (the
            // status still gets it at most twice a second).
            // A fenced node decides nothing: what it knows may be stale.
            let sending = !agent.fenced() && pass(&agent).await;
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
    // VMs outlive the agent and still need the rules; with none left, the
    // node gets its firewall back as it was.
    if firewall.installed() {
        let dirs = VmDir::scan(&agent.cfg.state_dir, &agent.cfg.shared_dir);
        let running = dirs.iter().filter(|d| d.state().alive).count();
        if running == 0 {
            tracing::info!("no VMM runs here; removing the agent's firewall rules");
            let _ = tokio::task::spawn_blocking(move || firewall.remove()).await;
        } else {
            tracing::info!(running, "VMMs still run here; their firewall rules stay");
        }
    }
    Ok(())
}

/// One pass over everything labelled for this node and every VM directory.
/// Returns whether a migration this node sends is in flight.
async fn pass(agent: &Agent) -> bool {
    agent.children.lock().unwrap().reap();
    if let Some(cgroups) = agent.runner.cgroups.clone() {
        let (state, shared) = (agent.cfg.state_dir.clone(), agent.cfg.shared_dir.clone());
        let dirs = VmDir::scan(&state, &shared);
        let (adopted, orphans) = tokio::task::spawn_blocking(move || {
            let adopted = vmm_process::settle_cgroups(&cgroups, &dirs);
            (
                adopted,
                vmm_process::kill_orphans(&cgroups, &state, &shared),
            )
        })
        .await
        .unwrap_or_default();
        for dir in adopted {
            tracing::info!(vm = %key(&dir.namespace, &dir.name), "VMM found by its cgroup (its pid file was missing); adopted");
        }
        for cgroup in orphans {
            tracing::warn!(%cgroup, "killed a VMM whose VM directory is gone (it held the VM's taps)");
        }
    }
    let vms = agent.vms.state();
    let mut known = BTreeSet::new();
    for vm in &vms {
        let ns = vm.namespace().unwrap_or_default();
        known.insert(key(&ns, &vm.name_any()));
        let span = tracing::info_span!("vm", namespace = %ns, vm = %vm.name_any());
        if let Err(e) = vm_reconcile::reconcile(agent, vm).instrument(span).await {
            tracing::warn!(vm = %key(&ns, &vm.name_any()), error = %e, "VM pass failed; retrying");
        }
    }
    let mut migrations: Vec<(Role, Arc<VMMigration>)> = Vec::new();
    migrations.extend(
        agent
            .outgoing
            .state()
            .into_iter()
            .map(|m| (Role::Source, m)),
    );
    migrations.extend(
        agent
            .incoming
            .state()
            .into_iter()
            .map(|m| (Role::Target, m)),
    );
    for (role, m) in &migrations {
        let node_matches = match role {
            Role::Source => m.status.as_ref().and_then(|s| s.source_node.as_deref()),
            Role::Target => m.status.as_ref().and_then(|s| s.target_node.as_deref()),
        } == Some(agent.cfg.node.as_str());
        if !node_matches {
            continue;
        }
        let span = tracing::info_span!("migration", namespace = %m.namespace().unwrap_or_default(), vm = %m.spec.vm_name, migration = %m.name_any(), role = ?role);
        if let Err(e) = migrate::reconcile(agent, *role, m).instrument(span).await {
            tracing::warn!(migration = %m.name_any(), error = %e, "migration pass failed; retrying");
        }
    }
    // VM directories no VM here accounts for.
    for dir in VmDir::scan(&agent.cfg.state_dir, &agent.cfg.shared_dir) {
        if known.contains(&key(&dir.namespace, &dir.name)) {
            continue;
        }
        let wanted = migrations.iter().any(|(role, m)| {
            *role == Role::Target
                && m.namespace().as_deref() == Some(dir.namespace.as_str())
                && m.spec.vm_name == dir.name
                && target_keeps(m)
        });
        if !wanted {
            tracing::info!(vm = %key(&dir.namespace, &dir.name), "VM no longer here; stopping its VMM and removing its node-local files");
            let _ = tokio::task::spawn_blocking(move || {
                vmm_process::stop(&dir, Duration::from_secs(2));
                vm_dir::remove(&dir, false)
            })
            .await;
        }
    }
    migrations.iter().any(|(role, m)| {
        *role == Role::Source
            && m.status.as_ref().is_some_and(|s| {
                !s.phase.is_final() && s.source_node.as_deref() == Some(agent.cfg.node.as_str())
            })
    })
}

/// Whether the target keeps a VMM it started for migration `m`.
fn target_keeps(m: &VMMigration) -> bool {
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
