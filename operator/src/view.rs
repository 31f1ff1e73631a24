//! The cluster as the decisions see it: Godwit nodes with their readiness and
//! capacity, the VMs that occupy them, and the migrations in flight; and what
//! a decision reads off one VM or migration (node, phase, resolved machine,
//! conditions, node-local disks).
//!
//! [`Snapshot::fetch`] lists the objects from the API server (not from a
//! watch cache: a placement must see the placement made a moment before, so
//! the controllers hold [`crate::Context::placement`] from the list to the
//! write). [`ClusterView::build`] turns a snapshot into plain data.
//!
//! What a VM takes on a node is its [`reservations::footprint`]: vCPUs
//! divided by the cluster's `cpuAllocationRatio` (millicores) and its memory
//! plus the VMM overhead, as its reservation pod requests. Besides the VMs,
//! a node's pods count with their requests, unless they have ended: ordinary
//! pods for everyone, and reservation pods of no VM placed there for every VM
//! but their own ([`crate::scheduler::Held`]).

use std::collections::BTreeMap;

use godwit_crds::contract::{node_lease_name, Machine, MachineDiskSource, NODE_LABEL};
use godwit_crds::{GodwitNode, MigrationPhase, StorageKind, VMMigration, VirtualMachine, VmPhase};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};

use godwit_crds::contract::{RESERVATION_LABEL, VM_LABEL};

use crate::nodes;
use crate::reservations::{self, CpuAllocationRatio};
use crate::scheduler::{Held, NodeInfo, PlacedVm, Request, Resources};

/// The objects a decision reads, listed at one moment.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Every Node (Godwit's or not).
    pub nodes: Vec<Node>,
    /// The Leases in the lease namespace.
    pub leases: Vec<Lease>,
    /// The GodwitNodes (in the lease namespace): what agents report.
    pub godwit_nodes: Vec<GodwitNode>,
    /// Every VirtualMachine, all namespaces.
    pub vms: Vec<VirtualMachine>,
    /// Every VMMigration, all namespaces.
    pub migrations: Vec<VMMigration>,
    /// Every Pod, all namespaces.
    pub pods: Vec<Pod>,
}

impl Snapshot {
    /// Lists Nodes, node Leases, GodwitNodes, VMs, migrations and Pods.
    pub async fn fetch(client: &Client, lease_namespace: &str) -> Result<Snapshot, kube::Error> {
        let lp = ListParams::default();
        let nodes = Api::<Node>::all(client.clone()).list(&lp).await?.items;
        let leases = Api::<Lease>::namespaced(client.clone(), lease_namespace)
            .list(&lp)
            .await?
            .items;
        let godwit_nodes = Api::<GodwitNode>::namespaced(client.clone(), lease_namespace)
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
        let pods = Api::<Pod>::all(client.clone()).list(&lp).await?.items;
        Ok(Snapshot {
            nodes,
            leases,
            godwit_nodes,
            vms,
            migrations,
            pods,
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
    /// vCPUs per CPU for placement.
    pub cpu_ratio: CpuAllocationRatio,
}

impl ClusterView {
    /// The view of `snapshot` at `now`, VMs' CPUs counted at `cpu_ratio`.
    pub fn build(
        snapshot: &Snapshot,
        now: Timestamp,
        cpu_ratio: CpuAllocationRatio,
    ) -> ClusterView {
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
            let reported = snapshot
                .godwit_nodes
                .iter()
                .find(|g| g.metadata.name == node.metadata.name);
            nodes.push(nodes::node_info(node, lease, reported, now));
        }
        nodes.sort_by(|a, b| a.name.cmp(&b.name));

        let mut placed: Vec<PlacedVm> = snapshot
            .vms
            .iter()
            .filter_map(|vm| occupant(vm, cpu_ratio))
            .collect();
        for m in &snapshot.migrations {
            if let Some(reservation) = target_reservation(m, &snapshot.vms, cpu_ratio) {
                placed.push(reservation);
            }
        }
        for node in &mut nodes {
            (node.pods, node.held) = pods_on(&node.name, &snapshot.pods, &placed);
        }
        ClusterView {
            nodes,
            lease_expiry,
            placed,
            migrations: snapshot.migrations.clone(),
            cpu_ratio,
        }
    }

    /// What `vm` takes on a node (its reservation's requests).
    pub fn vm_resources(&self, vm: &VirtualMachine) -> Resources {
        vm_footprint(vm, self.cpu_ratio)
    }

    /// What a VM running `machine` takes on a node.
    pub fn machine_resources(&self, machine: &Machine) -> Resources {
        reservations::footprint(machine.cpu, machine.memory_bytes, self.cpu_ratio)
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
    godwit_crds::contract::resolved_machine(vm)
}

/// The VM's vCPUs and guest memory: its resolved machine's figures, else
/// its own spec's.
pub fn vm_size(vm: &VirtualMachine) -> (u32, u64) {
    match resolved_machine(vm) {
        Some(m) => (m.cpu, m.memory_bytes),
        None => (
            vm.spec.cpu.unwrap_or(0),
            vm.spec
                .memory
                .as_deref()
                .and_then(|m| godwit_crds::parse_quantity(m).ok())
                .unwrap_or(0),
        ),
    }
}

/// What the VM takes on a node at `cpu_ratio`: [`reservations::footprint`].
pub fn vm_footprint(vm: &VirtualMachine, cpu_ratio: CpuAllocationRatio) -> Resources {
    let (cpu, memory) = vm_size(vm);
    reservations::footprint(cpu, memory, cpu_ratio)
}

/// Whether the pod has ended (`Succeeded` or `Failed`): it holds nothing.
pub fn pod_ended(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Succeeded" || p == "Failed")
}

/// The pods bound to `node` that `placed` does not already count: the
/// requests of the ordinary ones, and the reservation pods of VMs not placed
/// there (a placement whose VM write failed, a VM gone).
pub fn pods_on(node: &str, pods: &[Pod], placed: &[PlacedVm]) -> (Resources, Vec<Held>) {
    let mut other = Resources::default();
    let mut held = Vec::new();
    let live = pods
        .iter()
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
        .filter(|p| !pod_ended(p));
    for p in live {
        let labels = p.labels();
        let reservation_of = labels
            .get(VM_LABEL)
            .filter(|_| labels.get(RESERVATION_LABEL).is_some_and(|v| v == "true"));
        let namespace = p.metadata.namespace.clone().unwrap_or_default();
        match reservation_of {
            None => other = other + reservations::pod_requests(p),
            Some(vm) => {
                let counted = placed
                    .iter()
                    .any(|v| v.node == node && &v.name == vm && v.namespace == namespace);
                if !counted {
                    held.push(Held {
                        namespace,
                        vm: vm.clone(),
                        resources: reservations::pod_requests(p),
                    });
                }
            }
        }
    }
    (other, held)
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

/// Whether a placed VM holds room (and a reservation pod) on its node: from
/// scheduling until it is stopped.
pub fn occupies_node(vm: &VirtualMachine) -> bool {
    vm_node(vm).is_some() && !matches!(vm_phase(vm), VmPhase::Stopped | VmPhase::Failed)
}

/// A VM holds room on its node from scheduling until it is stopped.
fn occupant(vm: &VirtualMachine, cpu_ratio: CpuAllocationRatio) -> Option<PlacedVm> {
    let node = vm_node(vm)?;
    if !occupies_node(vm) {
        return None;
    }
    Some(PlacedVm {
        namespace: vm.namespace().unwrap_or_default(),
        name: vm.name_any(),
        labels: vm.labels().clone(),
        node: node.to_string(),
        resources: vm_footprint(vm, cpu_ratio),
        affinity: vm.spec.affinity.clone(),
    })
}

/// A migration under way holds the VM's room on its target too.
fn target_reservation(
    m: &VMMigration,
    vms: &[VirtualMachine],
    cpu_ratio: CpuAllocationRatio,
) -> Option<PlacedVm> {
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
        resources: vm_footprint(vm, cpu_ratio),
        affinity: vm.spec.affinity.clone(),
    })
}

#[cfg(test)]
mod tests {
    use godwit_crds::VMMigrationStatus;
    use k8s_openapi::api::core::v1::PodStatus;

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
            ..Default::default()
        };
        let view = ClusterView::build(&snapshot, now, CpuAllocationRatio::DEFAULT);
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

    fn bound_pod(name: &str, node: &str, vm: Option<&str>, phase: &str) -> Pod {
        let mut p = reservations::pod(
            &crate::fixtures::vm(vm.unwrap_or("none")),
            node,
            Resources {
                cpu: 250,
                memory: 1 << 30,
            },
            reservations::DEFAULT_IMAGE,
        );
        p.metadata.name = Some(name.into());
        if vm.is_none() {
            p.metadata.labels = None;
        }
        p.status = Some(PodStatus {
            phase: Some(phase.into()),
            ..Default::default()
        });
        p
    }

    #[test]
    fn pods_count_unless_they_are_a_placed_vms_reservation_or_ended() {
        let now = Timestamp::from_second(1_700_000_000).unwrap();
        let snapshot = Snapshot {
            nodes: vec![node("a", 4, 8)],
            leases: vec![lease("a", now, 10)],
            vms: vec![vm("run").on("a").sized(1, 2).running()],
            pods: vec![
                bound_pod("web", "a", None, "Running"),
                bound_pod("done", "a", None, "Succeeded"),
                bound_pod("elsewhere", "b", None, "Running"),
                bound_pod("reserve-run", "a", Some("run"), "Running"),
                bound_pod("reserve-gone", "a", Some("gone"), "Running"),
            ],
            ..Default::default()
        };
        let view = ClusterView::build(&snapshot, now, CpuAllocationRatio::DEFAULT);
        let a = view.node("a").unwrap();
        assert_eq!(a.capacity.cpu, 4000);
        let one = Resources {
            cpu: 250,
            memory: 1 << 30,
        };
        assert_eq!(a.pods, one, "web");
        let gone: Vec<&str> = a.held.iter().map(|h| h.vm.as_str()).collect();
        assert_eq!(gone, ["gone"], "the reservation of a VM not placed here");
        assert_eq!(a.held[0].resources, one);
        assert_eq!(view.placed[0].resources.cpu, 100, "1 vCPU at ratio 10");
    }
}
