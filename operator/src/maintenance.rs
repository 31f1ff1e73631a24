//! Maintenance mode: a node labelled [`MAINTENANCE_LABEL`]`=true` (or
//! annotated so, or cordoned) takes no new VMs and is emptied.
//!
//! Every two seconds the loop lists the cluster and, for each Godwit node in
//! maintenance, asks [`plan`] (a pure function over plain data) what to do:
//!
//! - a `Running` VM with `evictionStrategy: LiveMigrate` gets a VMMigration
//!   (labelled [`EVACUATION_LABEL`]`=<node>`, no target: the migration
//!   controller picks one through the scheduler, so affinity, anti-affinity,
//!   capacity and the per-node / per-cluster slots hold), but only as many
//!   at once as the migration slots allow, and only when some other node can
//!   take it at all (otherwise it is reported `blocked`, with the scheduler's
//!   reasons); after a failed evacuation it waits [`RETRY_AFTER`] before
//!   trying again;
//! - a VM with `evictionStrategy: Shutdown` is stopped gracefully (phase
//!   `Stopping`, the agent powers it off); its `runStrategy` then decides
//!   whether the VM controller starts it again on another node;
//! - VMs still starting, already migrating or stopping are waited for.
//!
//! Progress goes into the Node's [`MAINTENANCE_STATUS_ANNOTATION`] (counts,
//! phase `Evacuating` until no VM is left, then `Empty`) and an Event on the
//! Node each time it changes; each VM gets an Event saying why it moves or
//! stops. When maintenance ends the annotation goes and the node is
//! schedulable again ([`crate::nodes::schedulable`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use godwit_crds::contract::{EVACUATION_LABEL, MAINTENANCE_LABEL, MAINTENANCE_STATUS_ANNOTATION};
use godwit_crds::{
    EvictionStrategy, MigrationMode, MigrationPhase, StorageMode, VMMigration, VMMigrationSpec,
    VirtualMachine, VmPhase,
};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, Patch, PostParams};
use kube::{Resource, ResourceExt};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::{info, warn};

use crate::config::MigrationLimits;
use crate::context::{Context, Note};
use crate::nodes;
use crate::scheduler::{self, Reserve, Strategy};
use crate::view::{self, local_writable_disk, migration_phase, ClusterView, Snapshot};

/// How often the maintenance loop looks at the nodes.
pub const INTERVAL: Duration = Duration::from_secs(2);
/// How long after a failed or cancelled evacuation of a VM before another.
pub const RETRY_AFTER: Duration = Duration::from_secs(30);

/// The evacuation's progress, as written into
/// [`MAINTENANCE_STATUS_ANNOTATION`].
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct MaintenanceStatus {
    /// `Evacuating`, `Empty` (no VM left on the node) or `NodeNotReady`
    /// (nothing can move while the node's agent is away).
    pub phase: String,
    /// VMs still on the node (or migrating to it).
    pub remaining: usize,
    /// Being live-migrated away (a VMMigration exists and is not final).
    pub migrating: usize,
    /// Waiting: for a migration slot, for the VM to finish starting, or for
    /// the retry after a failed evacuation.
    pub waiting: usize,
    /// Being stopped (`evictionStrategy: Shutdown`).
    pub shutting_down: usize,
    /// No other node can take them; see `blockedVms`.
    pub blocked: usize,
    /// `namespace/name: why` for each blocked VM.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocked_vms: Vec<String>,
}

impl MaintenanceStatus {
    /// One line for an Event.
    pub fn summary(&self, node: &str) -> String {
        if self.phase == "Empty" {
            return format!("node {node} in maintenance is empty: no VM runs on it");
        }
        let mut text = format!(
            "node {node} in maintenance ({}): {} VMs left, {} migrating, {} waiting, {} shutting down, {} blocked",
            self.phase, self.remaining, self.migrating, self.waiting, self.shutting_down, self.blocked
        );
        if !self.blocked_vms.is_empty() {
            text.push_str(&format!(" ({})", self.blocked_vms.join("; ")));
        }
        text
    }
}

/// One thing the operator does for a VM of a node in maintenance.
#[derive(Clone, Debug, PartialEq)]
pub enum Eviction {
    /// Create a VMMigration for it.
    Migrate {
        /// Namespace.
        namespace: String,
        /// VM name.
        vm: String,
        /// The migration's name (deterministic: creating it twice is a no-op).
        migration: String,
        /// Copy node-local disks with the migration.
        copy_storage: bool,
        /// The VM, as the migration's owner (garbage-collected with it).
        owner: Option<OwnerReference>,
    },
    /// Stop it gracefully.
    Shutdown {
        /// Namespace.
        namespace: String,
        /// VM name.
        vm: String,
    },
    /// No node can take it: say so on the VM.
    Blocked {
        /// Namespace.
        namespace: String,
        /// VM name.
        vm: String,
        /// The scheduler's reasons.
        reason: String,
    },
}

/// What [`plan`] decided for one node.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Evacuation {
    /// What to do now.
    pub actions: Vec<Eviction>,
    /// The progress to report.
    pub status: MaintenanceStatus,
}

/// The VMMigration that evacuates `vm` from `node` for the `attempt`-th time.
pub fn migration_name(vm: &str, attempt: usize) -> String {
    let vm: String = vm.chars().take(230).collect();
    format!("{vm}-evacuate-{attempt}")
}

fn same_vm(m: &VMMigration, vm: &VirtualMachine) -> bool {
    m.namespace() == vm.namespace() && m.spec.vm_name == vm.name_any()
}

fn touches(m: &VMMigration, node: &str, vms: &[VirtualMachine]) -> bool {
    let s = m.status.as_ref();
    let source = s.and_then(|s| s.source_node.as_deref());
    let target = s.and_then(|s| s.target_node.as_deref());
    if source == Some(node) || target == Some(node) {
        return true;
    }
    // Not admitted yet: it will leave the VM's node.
    source.is_none()
        && vms
            .iter()
            .any(|vm| same_vm(m, vm) && view::vm_node(vm) == Some(node))
}

/// Decides what to do about the VMs of `node`, which is in maintenance, at
/// `now`. `vms` are all VMs, `cluster` the view built from the same list.
pub fn plan(
    node: &str,
    cluster: &ClusterView,
    vms: &[VirtualMachine],
    limits: MigrationLimits,
    reserve: Reserve,
    strategy: Strategy,
    now: Timestamp,
) -> Evacuation {
    let mut out = Evacuation::default();
    let status = &mut out.status;
    let unfinished: Vec<&VMMigration> = cluster
        .migrations
        .iter()
        .filter(|m| !migration_phase(m).is_final())
        .collect();
    let mut free = limits.per_cluster.saturating_sub(unfinished.len()).min(
        limits
            .per_node
            .saturating_sub(unfinished.iter().filter(|m| touches(m, node, vms)).count()),
    );
    let ready = cluster.node(node).is_some_and(|n| n.ready);

    // Migrations still bringing a VM here count as VMs on the node.
    let incoming = unfinished
        .iter()
        .filter(|m| {
            m.status.as_ref().and_then(|s| s.target_node.as_deref()) == Some(node)
                && m.status.as_ref().and_then(|s| s.source_node.as_deref()) != Some(node)
        })
        .count();
    status.remaining += incoming;
    status.waiting += incoming;

    let mut on_node: Vec<&VirtualMachine> = vms
        .iter()
        .filter(|vm| view::vm_node(vm) == Some(node))
        .filter(|vm| !matches!(view::vm_phase(vm), VmPhase::Stopped | VmPhase::Failed))
        .collect();
    // Highest restart priority moves first, then by name: stable answers.
    on_node.sort_by_key(|vm| {
        (
            std::cmp::Reverse(vm.spec.restart_priority.unwrap_or(0)),
            vm.namespace(),
            vm.name_any(),
        )
    });
    for vm in on_node {
        status.remaining += 1;
        let namespace = vm.namespace().unwrap_or_default();
        let name = vm.name_any();
        let phase = view::vm_phase(vm);
        let moving = phase == VmPhase::Migrating || unfinished.iter().any(|m| same_vm(m, vm));
        if moving {
            status.migrating += 1;
            continue;
        }
        if phase == VmPhase::Stopping || vm.meta().deletion_timestamp.is_some() {
            status.shutting_down += 1;
            continue;
        }
        if vm.spec.eviction_strategy == EvictionStrategy::Shutdown {
            status.shutting_down += 1;
            if ready {
                out.actions.push(Eviction::Shutdown {
                    namespace,
                    vm: name,
                });
            }
            continue;
        }
        if phase != VmPhase::Running {
            // Scheduled, Provisioning, Starting: live migration needs it running.
            status.waiting += 1;
            continue;
        }
        let ours: Vec<&VMMigration> = cluster
            .migrations
            .iter()
            .filter(|m| same_vm(m, vm) && m.labels().get(EVACUATION_LABEL).is_some())
            .collect();
        let recently_failed = ours.iter().any(|m| {
            matches!(
                migration_phase(m),
                MigrationPhase::Failed | MigrationPhase::Cancelled
            ) && m
                .status
                .as_ref()
                .and_then(|s| s.end_time.as_ref())
                .is_some_and(|t| now.duration_since(t.0).as_secs() < RETRY_AFTER.as_secs() as i64)
        });
        if recently_failed {
            status.waiting += 1;
            continue;
        }
        let mut request = view::request_for(vm, cluster.vm_resources(vm));
        request.exclude.push(node.to_string());
        if let Err(why) =
            scheduler::place(&request, &cluster.nodes, &cluster.placed, reserve, strategy)
        {
            status.blocked += 1;
            status
                .blocked_vms
                .push(format!("{namespace}/{name}: {why}"));
            out.actions.push(Eviction::Blocked {
                namespace,
                vm: name,
                reason: why.to_string(),
            });
            continue;
        }
        if !ready || free == 0 {
            status.waiting += 1;
            continue;
        }
        free -= 1;
        status.migrating += 1;
        out.actions.push(Eviction::Migrate {
            migration: migration_name(&name, ours.len() + 1),
            copy_storage: local_writable_disk(vm).is_some(),
            owner: vm.owner_ref(&()),
            namespace,
            vm: name,
        });
    }
    status.phase = if !ready && status.remaining > 0 {
        "NodeNotReady"
    } else if status.remaining == 0 {
        "Empty"
    } else {
        "Evacuating"
    }
    .to_string();
    out
}

/// Runs the maintenance loop until the task is dropped.
pub async fn run(ctx: Arc<Context>) {
    loop {
        tokio::time::sleep(INTERVAL).await;
        if let Err(e) = pass(&ctx).await {
            warn!(error = %e, "maintenance pass failed; retrying");
        }
    }
}

async fn pass(ctx: &Context) -> Result<(), kube::Error> {
    let snapshot = Snapshot::fetch(&ctx.client, &ctx.config.lease_namespace).await?;
    let cluster = ClusterView::build(&snapshot, Timestamp::now(), ctx.config.cpu_allocation_ratio);
    for node in snapshot.nodes.iter().filter(|n| nodes::is_godwit_node(n)) {
        let written = node
            .annotations()
            .get(MAINTENANCE_STATUS_ANNOTATION)
            .cloned();
        if !nodes::in_maintenance(node) {
            if written.is_some() {
                end(ctx, node).await?;
            }
            continue;
        }
        let name = node.name_any();
        let evacuation = plan(
            &name,
            &cluster,
            &snapshot.vms,
            ctx.config.migrations,
            ctx.config.reserve,
            ctx.config.placement,
            Timestamp::now(),
        );
        for action in &evacuation.actions {
            carry_out(ctx, &name, action).await?;
        }
        let text = serde_json::to_string(&evacuation.status).unwrap_or_default();
        if written.as_deref() != Some(text.as_str()) {
            let patch = json!({"metadata": {"annotations": {MAINTENANCE_STATUS_ANNOTATION: text}}});
            Api::<Node>::all(ctx.client.clone())
                .patch(&name, &ctx.patch_params(), &Patch::Merge(&patch))
                .await?;
            let summary = evacuation.status.summary(&name);
            info!(node = %name, "{summary}");
            let note = if evacuation.status.blocked > 0 {
                Note::warning("Maintenance", summary)
            } else {
                Note::normal("Maintenance", summary)
            };
            ctx.publish(&node.object_ref(&()), "Evacuate", &note).await;
        }
    }
    Ok(())
}

async fn end(ctx: &Context, node: &Node) -> Result<(), kube::Error> {
    let name = node.name_any();
    let patch = json!({"metadata": {"annotations": {MAINTENANCE_STATUS_ANNOTATION: null}}});
    Api::<Node>::all(ctx.client.clone())
        .patch(&name, &ctx.patch_params(), &Patch::Merge(&patch))
        .await?;
    info!(node = %name, "maintenance ended");
    ctx.publish(
        &node.object_ref(&()),
        "Evacuate",
        &Note::normal(
            "MaintenanceEnded",
            format!("node {name} left maintenance ({MAINTENANCE_LABEL} removed or uncordoned): it takes VMs again"),
        ),
    )
    .await;
    Ok(())
}

async fn carry_out(ctx: &Context, node: &str, action: &Eviction) -> Result<(), kube::Error> {
    match action {
        Eviction::Migrate {
            namespace,
            vm,
            migration,
            copy_storage,
            owner,
        } => {
            let m = VMMigration {
                metadata: ObjectMeta {
                    name: Some(migration.clone()),
                    namespace: Some(namespace.clone()),
                    owner_references: owner.clone().map(|o| vec![o]),
                    labels: Some(BTreeMap::from([(
                        EVACUATION_LABEL.to_string(),
                        node.to_string(),
                    )])),
                    ..Default::default()
                },
                spec: VMMigrationSpec {
                    vm_name: vm.clone(),
                    mode: MigrationMode::Live,
                    storage: copy_storage.then_some(StorageMode::Copy),
                    ..Default::default()
                },
                status: None,
            };
            let api: Api<VMMigration> = Api::namespaced(ctx.client.clone(), namespace);
            match api.create(&PostParams::default(), &m).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 409 => return Ok(()),
                Err(e) => return Err(e),
            }
            info!(vm = %format!("{namespace}/{vm}"), %node, %migration, "evacuating");
            let vm_ref = vm_reference(namespace, vm);
            ctx.publish(
                &vm_ref,
                "Evacuate",
                &Note::normal(
                    "Evacuating",
                    format!("node {node} is in maintenance: live-migrating the VM away (VMMigration {migration})"),
                ),
            )
            .await;
        }
        Eviction::Shutdown { namespace, vm } => {
            let message = format!(
                "node {node} is in maintenance and the VM's evictionStrategy is Shutdown: it is stopped; its runStrategy decides whether it starts on another node"
            );
            let api = Api::<VirtualMachine>::namespaced(ctx.client.clone(), namespace);
            let status = json!({"status": {"phase": VmPhase::Stopping}});
            let stopping = api
                .patch_status(vm, &ctx.patch_params(), &Patch::Merge(&status))
                .await?;
            let not_ready = crate::ha::not_ready("NodeMaintenance", &message);
            ctx.apply_condition(&api, &stopping, &not_ready).await?;
            info!(vm = %format!("{namespace}/{vm}"), %node, "stopping for maintenance");
            ctx.publish(
                &vm_reference(namespace, vm),
                "Evacuate",
                &Note::normal("MaintenanceShutdown", message),
            )
            .await;
        }
        Eviction::Blocked {
            namespace,
            vm,
            reason,
        } => {
            if ctx.first_time(format!("maintenance/{node}/{namespace}/{vm}/{reason}")) {
                ctx.publish(
                    &vm_reference(namespace, vm),
                    "Evacuate",
                    &Note::warning(
                        "EvacuationBlocked",
                        format!("node {node} is in maintenance but no other node can take the VM: {reason}; free room or relax its rules"),
                    ),
                )
                .await;
            }
        }
    }
    Ok(())
}

fn vm_reference(namespace: &str, name: &str) -> k8s_openapi::api::core::v1::ObjectReference {
    let mut vm = VirtualMachine::new(name, Default::default());
    vm.metadata.namespace = Some(namespace.to_string());
    vm.object_ref(&())
}

#[cfg(test)]
mod tests {
    use godwit_crds::VMMigrationStatus;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;
    use crate::fixtures::{
        apart_from, migration, node, t0, view_of, vm, MigrationFixture, VmFixture,
    };

    fn cluster_of(vms: &[VirtualMachine], migrations: Vec<VMMigration>) -> ClusterView {
        let mut a = node("a", 8, 8);
        a.metadata
            .labels
            .as_mut()
            .unwrap()
            .insert(MAINTENANCE_LABEL.into(), "true".into());
        view_of(
            vec![a, node("b", 8, 8), node("c", 8, 8)],
            vms.to_vec(),
            migrations,
        )
    }

    fn decide(
        vms: &[VirtualMachine],
        migrations: Vec<VMMigration>,
        limits: MigrationLimits,
    ) -> Evacuation {
        let cluster = cluster_of(vms, migrations);
        plan(
            "a",
            &cluster,
            vms,
            limits,
            Reserve::default(),
            Strategy::Spread,
            t0(),
        )
    }

    fn migrated(actions: &[Eviction]) -> Vec<&str> {
        actions
            .iter()
            .filter_map(|a| match a {
                Eviction::Migrate { vm, .. } => Some(vm.as_str()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn live_migrate_vms_leave_within_the_node_slots() {
        let vms = vec![
            vm("v1").on("a").running(),
            vm("v2").on("a").running(),
            vm("v3").on("a").running(),
            vm("elsewhere").on("b").running(),
        ];
        let e = decide(&vms, vec![], MigrationLimits::default());
        assert_eq!(migrated(&e.actions), ["v1", "v2"], "two slots per node");
        assert_eq!(e.status.remaining, 3);
        assert_eq!(e.status.migrating, 2);
        assert_eq!(e.status.waiting, 1);
        assert_eq!(e.status.phase, "Evacuating");
        assert!(matches!(
            &e.actions[0],
            Eviction::Migrate { migration, copy_storage: false, .. } if migration == "v1-evacuate-1"
        ));

        // The cluster limit binds too.
        let tight = MigrationLimits {
            per_node: 2,
            per_cluster: 1,
        };
        assert_eq!(migrated(&decide(&vms, vec![], tight).actions), ["v1"]);
    }

    #[test]
    fn migrations_under_way_hold_slots_and_are_not_made_twice() {
        let vms = vec![
            vm("v1").on("a").migrating("v1-evacuate-1"),
            vm("v2").on("a").running(),
            vm("v3").on("a").running(),
        ];
        let flying = migration("v1-evacuate-1", "v1").with_status(VMMigrationStatus {
            phase: MigrationPhase::PreCopy,
            source_node: Some("a".into()),
            target_node: Some("b".into()),
            ..Default::default()
        });
        let pending_v2 = migration("v2-evacuate-1", "v2");
        let e = decide(&vms, vec![flying, pending_v2], MigrationLimits::default());
        assert!(migrated(&e.actions).is_empty(), "{:?}", e.actions);
        assert_eq!((e.status.migrating, e.status.waiting), (2, 1));
    }

    #[test]
    fn shutdown_vms_are_stopped_and_starting_ones_waited_for() {
        let mut off = vm("off").on("a").running();
        off.spec.eviction_strategy = EvictionStrategy::Shutdown;
        let vms = vec![
            off,
            vm("booting").on("a").phase(VmPhase::Starting),
            vm("stopping").on("a").phase(VmPhase::Stopping),
            vm("stopped").on("a").phase(VmPhase::Stopped),
        ];
        let e = decide(&vms, vec![], MigrationLimits::default());
        assert_eq!(
            e.actions,
            [Eviction::Shutdown {
                namespace: "default".into(),
                vm: "off".into()
            }]
        );
        assert_eq!(e.status.remaining, 3, "a stopped VM does not count");
        assert_eq!((e.status.shutting_down, e.status.waiting), (2, 1));
    }

    #[test]
    fn an_empty_node_says_so() {
        let vms = vec![
            vm("gone").on("b").running(),
            vm("off").on("a").phase(VmPhase::Stopped),
        ];
        let e = decide(&vms, vec![], MigrationLimits::default());
        assert!(e.actions.is_empty());
        assert_eq!(e.status.phase, "Empty");
        assert!(e.status.summary("a").contains("empty"));
        let json = serde_json::to_string(&e.status).unwrap();
        assert!(json.contains(r#""phase":"Empty","remaining":0"#), "{json}");
    }

    #[test]
    fn a_migration_coming_in_keeps_the_node_from_being_empty() {
        let vms = vec![vm("v").on("b").phase(VmPhase::Migrating)];
        let incoming = migration("m", "v").with_status(VMMigrationStatus {
            phase: MigrationPhase::PreCopy,
            source_node: Some("b".into()),
            target_node: Some("a".into()),
            ..Default::default()
        });
        let e = decide(&vms, vec![incoming], MigrationLimits::default());
        assert_eq!(e.status.phase, "Evacuating");
        assert_eq!(e.status.remaining, 1);
    }

    #[test]
    fn evacuation_never_breaks_anti_affinity() {
        // db-0 on a must keep apart from db on b and c: nowhere to go.
        let mut db0 = vm("db-0").on("a").running().label("app", "db");
        db0.spec.affinity = Some(apart_from("db"));
        let db1 = vm("db-1").on("b").running().label("app", "db");
        let db2 = vm("db-2").on("c").running().label("app", "db");
        let web = vm("web").on("a").running();
        let vms = vec![db0, db1, db2, web];
        let e = decide(&vms, vec![], MigrationLimits::default());
        assert_eq!(migrated(&e.actions), ["web"]);
        assert_eq!(e.status.blocked, 1);
        assert!(
            e.status.blocked_vms[0].starts_with("default/db-0: ")
                && e.status.blocked_vms[0].contains("anti-affinity"),
            "{:?}",
            e.status.blocked_vms
        );
        assert!(e.status.summary("a").contains("1 blocked"));
    }

    #[test]
    fn a_failed_evacuation_is_retried_after_a_pause_with_a_new_name() {
        let vms = vec![vm("v").on("a").running()];
        let failed_at = |seconds_ago: i64| {
            let mut m = migration("v-evacuate-1", "v").with_status(VMMigrationStatus {
                phase: MigrationPhase::Failed,
                end_time: Some(Time(
                    t0().checked_sub(k8s_openapi::jiff::SignedDuration::from_secs(seconds_ago))
                        .unwrap(),
                )),
                ..Default::default()
            });
            m.metadata.labels = Some([(EVACUATION_LABEL.to_string(), "a".to_string())].into());
            m
        };
        let e = decide(&vms, vec![failed_at(5)], MigrationLimits::default());
        assert!(e.actions.is_empty());
        assert_eq!(e.status.waiting, 1);
        let e = decide(&vms, vec![failed_at(60)], MigrationLimits::default());
        assert!(matches!(
            &e.actions[..],
            [Eviction::Migrate { migration, .. }] if migration == "v-evacuate-2"
        ));
    }

    #[test]
    fn nothing_moves_while_the_node_is_not_ready() {
        let vms = vec![vm("v").on("a").running()];
        let mut cluster = cluster_of(&vms, vec![]);
        cluster.nodes[0].ready = false;
        let e = plan(
            "a",
            &cluster,
            &vms,
            MigrationLimits::default(),
            Reserve::default(),
            Strategy::Spread,
            t0(),
        );
        assert!(e.actions.is_empty());
        assert_eq!(e.status.phase, "NodeNotReady");
    }
}
