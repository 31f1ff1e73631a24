//! VM resources that Kubernetes sees: a **reservation pod** per VM and node,
//! and a **PodDisruptionBudget** per VM that live-migrates on drain.
//!
//! kube-scheduler, ResourceQuota and kubelet eviction count pods, not VMs. So
//! for each node a VM occupies the operator keeps a pod of one pause
//! container in the VM's namespace, bound to the node (`spec.nodeName`, no
//! scheduler involved), whose requests are what the VM takes there:
//!
//! | request | value |
//! | --- | --- |
//! | `cpu` | vCPUs / `cpuAllocationRatio`, in millicores, rounded up |
//! | `memory` (= limit) | guest memory + [`VMM_MEMORY_OVERHEAD`] |
//!
//! A VM occupies its node from scheduling until it stops; during a live
//! migration it also occupies the target, from admission (before the target
//! VMM starts) until the migration ends; then the reservation on the node
//! that was left goes (the source on success, the target on failure or
//! cancel). Deleting the VM deletes its reservations (the operator does it
//! explicitly; the ownerReference lets a garbage collector do it too).
//!
//! The reservation of the VM's own node is created before the VM is
//! scheduled or restarted there, so a ResourceQuota that refuses it keeps the
//! VM from starting (condition `Scheduled=False`, reason `QuotaExceeded`).
//!
//! A VM with `evictionStrategy: LiveMigrate` gets a PodDisruptionBudget over
//! its reservation pods with `minAvailable` = the number it should have (1,
//! or 2 while it migrates), so `kubectl drain` cannot evict them: the drain
//! waits until the cordoned node is evacuated ([`crate::maintenance`]) and
//! the old reservation is gone.
//!
//! This module is pure (names, objects, what should exist); [`apply`] writes.

pub mod apply;

use std::collections::BTreeMap;

use godwit_crds::contract::{NODE_LABEL, RESERVATION_LABEL, VMM_MEMORY_OVERHEAD, VM_LABEL};
use godwit_crds::{EvictionStrategy, VirtualMachine};
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, ResourceRequirements};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};

use crate::scheduler::Resources;

/// The pause image of reservation pods, unless configured.
pub const DEFAULT_IMAGE: &str = "registry.k8s.io/pause:3.9";

/// The longest name a reservation pod or budget gets (a DNS label).
pub const MAX_NAME: usize = 63;

/// How many vCPUs share one physical CPU for placement and reservations
/// (KubeVirt's `cpuAllocationRatio`). Memory is not overcommitted.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CpuAllocationRatio(f64);

impl CpuAllocationRatio {
    /// KubeVirt's default.
    pub const DEFAULT: CpuAllocationRatio = CpuAllocationRatio(10.0);

    /// A ratio; `None` unless it is finite and at least 0.01.
    pub fn new(ratio: f64) -> Option<CpuAllocationRatio> {
        (ratio.is_finite() && ratio >= 0.01).then_some(CpuAllocationRatio(ratio))
    }

    /// The ratio.
    pub fn get(self) -> f64 {
        self.0
    }

    /// Millicores that `vcpus` take: `vcpus * 1000 / ratio`, rounded up.
    pub fn millicores(self, vcpus: u32) -> u64 {
        (f64::from(vcpus) * 1000.0 / self.0).ceil() as u64
    }
}

impl Default for CpuAllocationRatio {
    fn default() -> Self {
        CpuAllocationRatio::DEFAULT
    }
}

/// A ratio that is not a number of at least 0.01.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid cpuAllocationRatio {0:?}: use a number of at least 0.01 (10 = ten vCPUs per CPU)")]
pub struct InvalidRatio(pub String);

impl std::str::FromStr for CpuAllocationRatio {
    type Err = InvalidRatio;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.trim()
            .parse::<f64>()
            .ok()
            .and_then(CpuAllocationRatio::new)
            .ok_or_else(|| InvalidRatio(s.to_string()))
    }
}

/// What a VM of `vcpus` and `memory_bytes` of guest memory takes on a node:
/// its reservation pod's requests, and what the scheduler counts.
pub fn footprint(vcpus: u32, memory_bytes: u64, ratio: CpuAllocationRatio) -> Resources {
    Resources {
        cpu: ratio.millicores(vcpus),
        memory: memory_bytes + VMM_MEMORY_OVERHEAD,
    }
}

/// FNV-1a, 64 bits: a stable short hash for names that are too long.
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `<prefix><rest>` when it fits in [`MAX_NAME`], else cut with a hash of
/// the whole so that different VMs and nodes keep different names.
fn bounded_name(prefix: &str, rest: &str) -> String {
    let full = format!("{prefix}{rest}");
    if full.len() <= MAX_NAME {
        return full;
    }
    let hash = format!("{:012x}", fnv1a(&full) & 0xffff_ffff_ffff);
    let keep = MAX_NAME - hash.len() - 1;
    let head = full[..keep].trim_end_matches(['-', '.']);
    format!("{head}-{hash}")
}

/// The name of `vm`'s reservation pod on `node`.
pub fn pod_name(vm: &str, node: &str) -> String {
    bounded_name("godwit-reserve-", &format!("{vm}-{node}"))
}

/// The name of `vm`'s PodDisruptionBudget.
pub fn budget_name(vm: &str) -> String {
    bounded_name("godwit-vm-", vm)
}

/// The labels of `vm`'s reservation pods (the budget selects these but the
/// node).
pub fn selector_labels(vm: &str) -> BTreeMap<String, String> {
    [
        (VM_LABEL.to_string(), vm.to_string()),
        (RESERVATION_LABEL.to_string(), "true".to_string()),
    ]
    .into()
}

/// The nodes where a VM should hold a reservation: `occupied`, the node it
/// occupies (placed and not stopped),
/// and a live migration's target while the migration runs.
pub fn wanted_nodes(occupied: Option<&str>, migration_target: Option<&str>) -> Vec<String> {
    let mut nodes: Vec<String> = occupied.into_iter().map(str::to_string).collect();
    if let Some(target) = migration_target {
        if !nodes.iter().any(|n| n == target) {
            nodes.push(target.to_string());
        }
    }
    nodes
}

/// What a reservation pod asks for, read back from a pod.
pub fn pod_requests(pod: &Pod) -> Resources {
    let Some(spec) = &pod.spec else {
        return Resources::default();
    };
    let mut total = Resources::default();
    for c in &spec.containers {
        let Some(res) = &c.resources else { continue };
        let get = |key: &str| {
            res.requests
                .as_ref()
                .and_then(|r| r.get(key))
                .or_else(|| res.limits.as_ref().and_then(|l| l.get(key)))
                .map(|q| q.0.clone())
        };
        if let Some(cpu) = get("cpu").and_then(|t| crate::nodes::parse_millicores(&t)) {
            total.cpu += cpu;
        }
        if let Some(memory) = get("memory").and_then(|t| godwit_crds::parse_quantity(&t).ok()) {
            total.memory += memory;
        }
    }
    total
}

/// The VM as controller owner, blocking its deletion in the foreground until
/// the dependent is gone.
fn owner(vm: &VirtualMachine) -> Option<Vec<OwnerReference>> {
    let mut reference = vm.controller_owner_ref(&())?;
    reference.block_owner_deletion = Some(true);
    Some(vec![reference])
}

/// A quantity of bytes, in Mi when it is whole mebibytes.
fn memory_quantity(bytes: u64) -> Quantity {
    if bytes.is_multiple_of(1 << 20) {
        Quantity(format!("{}Mi", bytes >> 20))
    } else {
        Quantity(bytes.to_string())
    }
}

/// `vm`'s reservation pod on `node`, asking for `need`.
pub fn pod(vm: &VirtualMachine, node: &str, need: Resources, image: &str) -> Pod {
    let name = vm.name_any();
    let mut labels = selector_labels(&name);
    labels.insert(NODE_LABEL.to_string(), node.to_string());
    let memory = memory_quantity(need.memory);
    Pod {
        metadata: ObjectMeta {
            name: Some(pod_name(&name, node)),
            namespace: vm.namespace(),
            labels: Some(labels),
            owner_references: owner(vm),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.to_string()),
            priority_class_name: vm.spec.priority_class_name.clone(),
            tolerations: (!vm.spec.tolerations.is_empty()).then(|| vm.spec.tolerations.clone()),
            termination_grace_period_seconds: Some(0),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            containers: vec![Container {
                name: "reserve".into(),
                image: Some(image.to_string()),
                resources: Some(ResourceRequirements {
                    requests: Some(
                        [
                            ("cpu".to_string(), Quantity(format!("{}m", need.cpu))),
                            ("memory".to_string(), memory.clone()),
                        ]
                        .into(),
                    ),
                    limits: Some([("memory".to_string(), memory)].into()),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: None,
    }
}

/// Whether `vm` gets a PodDisruptionBudget.
pub fn wants_budget(vm: &VirtualMachine) -> bool {
    vm.spec.eviction_strategy == EvictionStrategy::LiveMigrate
}

/// `vm`'s PodDisruptionBudget: none of its `reservations` reservation pods
/// may be evicted.
pub fn budget(vm: &VirtualMachine, reservations: usize) -> PodDisruptionBudget {
    let name = vm.name_any();
    PodDisruptionBudget {
        metadata: ObjectMeta {
            name: Some(budget_name(&name)),
            namespace: vm.namespace(),
            labels: Some([(VM_LABEL.to_string(), name.clone())].into()),
            owner_references: owner(vm),
            ..Default::default()
        },
        spec: Some(PodDisruptionBudgetSpec {
            min_available: Some(IntOrString::Int(reservations.max(1) as i32)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(&name)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{vm, VmFixture};

    #[test]
    fn ratio_divides_vcpus_into_millicores_rounded_up() {
        assert_eq!(CpuAllocationRatio::DEFAULT.millicores(1), 100);
        assert_eq!(CpuAllocationRatio::new(1.0).unwrap().millicores(2), 2000);
        assert_eq!(CpuAllocationRatio::new(3.0).unwrap().millicores(1), 334);
        assert_eq!("2.5".parse::<CpuAllocationRatio>().unwrap().get(), 2.5);
        assert!("0".parse::<CpuAllocationRatio>().is_err());
        assert!("ten".parse::<CpuAllocationRatio>().is_err());
    }

    #[test]
    fn footprint_adds_the_vmm_overhead_to_memory_only() {
        let f = footprint(2, 64 << 20, CpuAllocationRatio::DEFAULT);
        assert_eq!(f.cpu, 200);
        assert_eq!(f.memory, (64 << 20) + VMM_MEMORY_OVERHEAD);
        assert_eq!(f.memory, 192 << 20);
    }

    #[test]
    fn long_names_are_cut_with_a_hash() {
        assert_eq!(pod_name("web", "node-0"), "godwit-reserve-web-node-0");
        let long = "v".repeat(60);
        let a = pod_name(&long, "node-0");
        let b = pod_name(&long, "node-1");
        assert!(a.len() <= MAX_NAME && b.len() <= MAX_NAME, "{a}");
        assert_ne!(a, b);
        assert!(a.ends_with(|c: char| c.is_ascii_alphanumeric()));
        assert_eq!(budget_name("web"), "godwit-vm-web");
        assert!(budget_name(&long).len() <= MAX_NAME);
    }

    #[test]
    fn a_vm_holds_its_node_and_a_migration_target() {
        assert_eq!(wanted_nodes(Some("n1"), None), ["n1"]);
        assert_eq!(wanted_nodes(Some("n1"), Some("n2")), ["n1", "n2"]);
        assert_eq!(wanted_nodes(Some("n1"), Some("n1")), ["n1"]);
        assert_eq!(wanted_nodes(None, Some("n2")), ["n2"]);
        assert!(wanted_nodes(None, None).is_empty());
    }

    #[test]
    fn the_pod_asks_for_the_footprint_and_names_its_vm() {
        let mut v = vm("web").on("n1").sized(1, 1).running();
        v.spec.priority_class_name = Some("vms".into());
        let need = footprint(1, 1 << 30, CpuAllocationRatio::DEFAULT);
        let p = pod(&v, "n1", need, DEFAULT_IMAGE);
        assert_eq!(p.metadata.name.as_deref(), Some("godwit-reserve-web-n1"));
        let spec = p.spec.as_ref().unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("n1"));
        assert_eq!(spec.priority_class_name.as_deref(), Some("vms"));
        let res = spec.containers[0].resources.as_ref().unwrap();
        let requests = res.requests.as_ref().unwrap();
        assert_eq!(requests["cpu"].0, "100m");
        assert_eq!(requests["memory"].0, "1152Mi");
        assert_eq!(res.limits.as_ref().unwrap()["memory"].0, "1152Mi");
        assert_eq!(pod_requests(&p), need);
        let owner = &p.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(owner.kind, "VirtualMachine");
        assert_eq!(owner.controller, Some(true));
        assert_eq!(owner.block_owner_deletion, Some(true));
        let labels = p.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[VM_LABEL], "web");
        assert_eq!(labels[RESERVATION_LABEL], "true");
    }

    #[test]
    fn the_budget_keeps_every_reservation() {
        let v = vm("web").on("n1").sized(1, 1).running();
        assert!(wants_budget(&v));
        let b = budget(&v, 2);
        let spec = b.spec.unwrap();
        assert_eq!(spec.min_available, Some(IntOrString::Int(2)));
        assert_eq!(
            spec.selector.unwrap().match_labels.unwrap(),
            selector_labels("web")
        );
    }
}
