//! The cluster as the decisions see it: Godwit nodes with their readiness and
//! capacity, the VMs that occupy them, and the migrations in flight; and what
//! a decision reads off one VM or migration (node, phase, resolved machine,
//! conditions, node-local disks).
//!
//! [`Snapshot::fetch`] lists the objects from the API server (not from a
//! watch cache: a placement must see the placement made a moment before, so
//! the controllers hold [`crate::Context::placement`] from the list to the
//! write). [`ClusterView::build`] turns a snapshot into plain data.

use std::collections::BTreeMap;

use godwit_crds::contract::{
    node_lease_name, Machine, MachineDiskSource, NODE_LABEL, RESOLVED_ANNOTATION,
};
use godwit_crds::{MigrationPhase, StorageKind, VMMigration, VirtualMachine, VmPhase};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};

use crate::nodes;
use crate::scheduler::{NodeInfo, PlacedVm, Request, Resources};

/// The objects a decision reads, listed at one moment.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Every Node (Godwit's or not).
    pub nodes: Vec<Node>,
    /// The Leases in the lease namespace.
    pub leases: Vec<Lease>,
    /// Every VirtualMachine, all namespaces.
    pub vms: Vec<VirtualMachine>,
    /// Every VMMigration, all namespaces.
    pub migrations: Vec<VMMigration>,
}

impl Snapshot {
    /// Lists Nodes, node Leases, VMs and migrations.
    pub async fn fetch(client: &Client, lease_namespace: &str) -> Result<Snapshot, kube::Error> {
        let lp = ListParams::default();
        let nodes = Api::<Node>::all(client.clone()).list(&lp).await?.items;
        let leases = Api::<Lease>::namespaced(client.clone(), lease_namespace)
            .list(&lp)
            .await?
            .items;
        let vms = Api::<VirtualMachine>::all(client.clone())
            .list(&lp)
            .await?
            .items;
        let migrations = Api::<VMMigration>::all(client.clone())
            .list(&lp)
            .await?
            .items;
        Ok(Snapshot {
            nodes,
            leases,
            vms,
            migrations,
        })
    }
}

/// The cluster as plain data.
#[derive(Clone, Debug, Default)]
pub struct ClusterView {
    /// Godwit nodes, by name.
    pub nodes: Vec<NodeInfo>,
    /// When each Godwit node's Lease runs out (absent: never renewed).
    pub lease_expiry: BTreeMap<String, Timestamp>,
    /// VMs occupying a node, plus the room migrations hold on their targets.
    pub placed: Vec<PlacedVm>,
    /// Every migration.
    pub migrations: Vec<VMMigration>,
}

impl ClusterView {
    /// The view of `snapshot` at `now`.
    pub fn build(snapshot: &Snapshot, now: Timestamp) -> ClusterView {
        let lease_of = |node: &str| {
            let name = node_lease_name(node);
            snapshot
                .leases
                .iter()
                .find(|l| l.metadata.name.as_deref() == Some(name.as_str()))
        };
        let mut nodes = Vec::new();
        let mut lease_expiry = BTreeMap::new();
        for node in snapshot.nodes.iter().filter(|n| nodes::is_godwit_node(n)) {
            let lease = lease_of(&node.name_any());
            if let Some(expiry) = lease.and_then(nodes::lease_expiry) {
                lease_expiry.insert(node.name_any(), expiry);
            }
            nodes.push(nodes::node_info(node, lease, now));
        }
        nodes.sort_by(|a, b| a.name.cmp(&b.name));

        let mut placed: Vec<PlacedVm> = snapshot.vms.iter().filter_map(occupant).collect();
        for m in &snapshot.migrations {
            if let Some(reservation) = target_reservation(m, &snapshot.vms) {
                placed.push(reservation);
            }
        }
        ClusterView {
            nodes,
            lease_expiry,
            placed,
            migrations: snapshot.migrations.clone(),
        }
    }

    /// The Godwit node called `name`.
    pub fn node(&self, name: &str) -> Option<&NodeInfo> {
        self.nodes.iter().find(|n| n.name == name)
    }
}

/// The node label of a VM, if it has been placed.
pub fn vm_node(vm: &VirtualMachine) -> Option<&str> {
    vm.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(NODE_LABEL))
        .map(String::as_str)
        .filter(|n| !n.is_empty())
}

/// A VM's phase (`Pending` when it has no status yet).
pub fn vm_phase(vm: &VirtualMachine) -> VmPhase {
    vm.status.as_ref().map(|s| s.phase).unwrap_or_default()
}

/// A migration's phase (`Pending` when it has no status yet).
pub fn migration_phase(m: &VMMigration) -> MigrationPhase {
    m.status.as_ref().map(|s| s.phase).unwrap_or_default()
}

/// The machine the operator resolved for the VM when it scheduled it.
pub fn resolved_machine(vm: &VirtualMachine) -> Option<Machine> {
    vm.annotations()
        .get(RESOLVED_ANNOTATION)
        .and_then(|json| serde_json::from_str(json).ok())
}

/// What the VM uses: its resolved machine's figures, else its own spec's.
pub fn vm_resources(vm: &VirtualMachine) -> Resources {
    match resolved_machine(vm) {
        Some(m) => Resources {
            cpu: u64::from(m.cpu),
            memory: m.memory_bytes,
        },
        None => Resources {
            cpu: u64::from(vm.spec.cpu.unwrap_or(0)),
            memory: vm
                .spec
                .memory
                .as_deref()
                .and_then(|m| godwit_crds::parse_quantity(m).ok())
                .unwrap_or(0),
        },
    }
}

/// The VM's status conditions (none before its first status).
pub fn vm_conditions(vm: &VirtualMachine) -> &[Condition] {
    vm.status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default()
}

/// A disk that only a storage copy can move: node-local and writable (a
/// read-only image is expected on every node).
pub fn local_writable_disk(vm: &VirtualMachine) -> Option<String> {
    if let Some(machine) = resolved_machine(vm) {
        return machine
            .disks
            .iter()
            .find(|d| {
                let image = matches!(d.source, MachineDiskSource::Image { .. });
                d.storage == StorageKind::Local && !(d.read_only && image)
            })
            .map(|d| d.name.clone());
    }
    vm.spec
        .disks
        .iter()
        .find(|d| d.storage == StorageKind::Local && !(d.read_only && d.source.image.is_some()))
        .map(|d| d.name.clone())
}

/// The VM as the scheduler's request, needing `resources`.
pub fn request_for(vm: &VirtualMachine, resources: Resources) -> Request {
    Request {
        namespace: vm.namespace().unwrap_or_default(),
        name: vm.name_any(),
        labels: vm.labels().clone(),
        resources,
        node_selector: vm.spec.node_selector.clone(),
        tolerations: vm.spec.tolerations.clone(),
        affinity: vm.spec.affinity.clone(),
        exclude: Vec::new(),
    }
}

/// A VM holds room on its node from scheduling until it is stopped.
fn occupant(vm: &VirtualMachine) -> Option<PlacedVm> {
    let node = vm_node(vm)?;
    if matches!(vm_phase(vm), VmPhase::Stopped | VmPhase::Failed) {
        return None;
    }
    Some(PlacedVm {
        namespace: vm.namespace().unwrap_or_default(),
        name: vm.name_any(),
        labels: vm.labels().clone(),
        node: node.to_string(),
        resources: vm_resources(vm),
        affinity: vm.spec.affinity.clone(),
    })
}

/// A migration under way holds the VM's room on its target too.
fn target_reservation(m: &VMMigration, vms: &[VirtualMachine]) -> Option<PlacedVm> {
    let phase = migration_phase(m);
    if phase.is_final() || matches!(phase, MigrationPhase::Pending | MigrationPhase::Scheduling) {
        return None;
    }
    let target = m.status.as_ref()?.target_node.clone()?;
    let ns = m.namespace();
    let vm = vms
        .iter()
        .find(|v| v.namespace() == ns && v.name_any() == m.spec.vm_name)?;
    Some(PlacedVm {
        namespace: ns.unwrap_or_default(),
        name: vm.name_any(),
        labels: vm.labels().clone(),
        node: target,
        resources: vm_resources(vm),
        affinity: vm.spec.affinity.clone(),
    })
}

#[cfg(test)]
mod tests {
    use godwit_crds::VMMigrationStatus;

    use super::*;
    use crate::fixtures::{lease, migration, node, vm, MigrationFixture, VmFixture};

    #[test]
    fn view_counts_running_vms_and_migration_targets_not_stopped_ones() {
        let now = Timestamp::from_second(1_700_000_000).unwrap();
        let mut other = node("other", 8, 8);
        other.metadata.labels = None;
        let snapshot = Snapshot {
            nodes: vec![node("b", 4, 8), node("a", 4, 8), other],
            leases: vec![lease("a", now, 10)],
            vms: vec![
                vm("run").on("a").sized(1, 2).running(),
                vm("stopped").on("a").sized(1, 2).phase(VmPhase::Stopped),
                vm("pending"),
            ],
            migrations: vec![
                migration("m", "run").with_status(VMMigrationStatus {
                    phase: MigrationPhase::PreCopy,
                    source_node: Some("a".into()),
                    target_node: Some("b".into()),
                    ..Default::default()
                }),
                migration("waiting", "run"),
            ],
        };
        let view = ClusterView::build(&snapshot, now);
        let names: Vec<_> = view.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["a", "b"], "Godwit nodes only, sorted");
        assert!(view.node("a").unwrap().ready);
        assert!(!view.node("b").unwrap().ready, "no lease");
        let on: Vec<_> = view
            .placed
            .iter()
            .map(|p| (p.name.as_str(), p.node.as_str(), p.resources.memory >> 30))
            .collect();
        assert_eq!(on, [("run", "a", 2), ("run", "b", 2)]);
    }
}
