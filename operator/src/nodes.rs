//! What the operator knows of a node: whether it is Godwit's, whether it is
//! ready (its `Ready` condition and its agent's Lease), whether VMs may be
//! placed on it, and what it offers them. Pure functions over the Node and
//! Lease objects; [`crate::view`] gathers them.
//!
//! - A node is Godwit's when it carries the label [`NODE_LABEL`] (any value).
//! - Ready: the Node's `Ready` condition is `True` and the agent's Lease
//!   (`godwit-node-<node>`) was renewed within its duration. No Lease means
//!   no agent, so not ready.
//! - Schedulable: not in maintenance ([`in_maintenance`]: cordoned, or
//!   labelled or annotated [`MAINTENANCE_LABEL`]`: "true"`).
//! - Capacity: what the agent reports in its `GodwitNode`
//!   (`status.capacity`) once published, else the Node's `status.allocatable`.

use godwit_crds::contract::{MAINTENANCE_LABEL, NODE_LABEL};
use godwit_crds::{parse_quantity, GodwitNode};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::scheduler::{NodeInfo, Resources};

/// On a Node, as annotation (the label [`MAINTENANCE_LABEL`] has the same
/// key and effect): `"true"` puts the node in maintenance.
pub const MAINTENANCE_ANNOTATION: &str = MAINTENANCE_LABEL;

/// Whether the Node is one Godwit runs VMs on.
pub fn is_godwit_node(node: &Node) -> bool {
    node.metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(NODE_LABEL))
}

/// Whether the Node's `Ready` condition is `True`.
pub fn kubelet_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// When the Lease runs out unless renewed: `renewTime + leaseDurationSeconds`.
/// `None` when it was never renewed.
pub fn lease_expiry(lease: &Lease) -> Option<Timestamp> {
    let spec = lease.spec.as_ref()?;
    let renewed = spec.renew_time.as_ref()?.0;
    let seconds = i64::from(spec.lease_duration_seconds.unwrap_or(0));
    renewed.checked_add(SignedDuration::from_secs(seconds)).ok()
}

/// Whether the Node is in maintenance: cordoned (`spec.unschedulable`), or
/// labelled or annotated [`MAINTENANCE_LABEL`]`: "true"`. Such a node takes
/// no new VMs and is emptied (see [`crate::maintenance`]).
pub fn in_maintenance(node: &Node) -> bool {
    let cordoned = node
        .spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false);
    let marked = |map: &Option<std::collections::BTreeMap<String, String>>| {
        map.as_ref()
            .and_then(|m| m.get(MAINTENANCE_LABEL))
            .is_some_and(|v| v == "true")
    };
    cordoned || marked(&node.metadata.labels) || marked(&node.metadata.annotations)
}

/// Whether the Node may take new VMs: not in maintenance.
pub fn schedulable(node: &Node) -> bool {
    !in_maintenance(node)
}

/// A CPU quantity in millicores (`4` is 4000, `3500m` is 3500, `0.5` is 500).
pub fn parse_millicores(text: &str) -> Option<u64> {
    match text.strip_suffix('m') {
        Some(milli) => milli.parse::<u64>().ok(),
        None => match text.parse::<f64>() {
            Ok(cpus) if cpus.is_finite() && cpus >= 0.0 => Some((cpus * 1000.0).round() as u64),
            _ => parse_quantity(text).ok().map(|c| c * 1000),
        },
    }
}

/// What the node offers VMs (CPU in millicores): what its agent reports
/// in its GodwitNode (`reported`), else what the kubelet reports
/// allocatable. Unreadable figures count as nothing.
pub fn capacity(node: &Node, reported: Option<&GodwitNode>) -> Resources {
    let published = reported
        .and_then(|g| g.status.as_ref())
        .and_then(|s| s.capacity.as_ref());
    let allocatable = |key: &str| {
        node.status
            .as_ref()
            .and_then(|s| s.allocatable.as_ref())
            .and_then(|a| a.get(key))
            .map(|q| q.0.clone())
    };
    let cpu = match published {
        Some(c) => c.cpu * 1000,
        None => allocatable("cpu")
            .and_then(|t| parse_millicores(&t))
            .unwrap_or(0),
    };
    let memory = published
        .map(|c| c.memory.clone())
        .or_else(|| allocatable("memory"))
        .and_then(|t| parse_quantity(&t).ok())
        .unwrap_or(0);
    Resources { cpu, memory }
}

/// The scheduler's view of a Godwit node, given its agent's Lease and
/// GodwitNode.
pub fn node_info(
    node: &Node,
    lease: Option<&Lease>,
    reported: Option<&GodwitNode>,
    now: Timestamp,
) -> NodeInfo {
    let lease_fresh = lease.and_then(lease_expiry).is_some_and(|t| t > now);
    NodeInfo {
        name: node.metadata.name.clone().unwrap_or_default(),
        labels: node.metadata.labels.clone().unwrap_or_default(),
        taints: node
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default(),
        ready: kubelet_ready(node) && lease_fresh,
        schedulable: schedulable(node),
        capacity: capacity(node, reported),
        pods: Resources::default(),
        held: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{at, lease, node};

    #[test]
    fn ready_needs_the_condition_and_a_fresh_lease() {
        let n = node("a", 4, 8);
        assert!(node_info(&n, Some(&lease("a", at(0), 10)), None, at(9)).ready);
        assert!(!node_info(&n, Some(&lease("a", at(0), 10)), None, at(10)).ready);
        assert!(
            !node_info(&n, None, None, at(0)).ready,
            "no lease, no agent"
        );
        let mut sick = n.clone();
        sick.status.as_mut().unwrap().conditions.as_mut().unwrap()[0].status = "False".into();
        assert!(!node_info(&sick, Some(&lease("a", at(0), 10)), None, at(1)).ready);
    }

    #[test]
    fn cordon_and_maintenance_make_a_node_unschedulable() {
        let mut n = node("a", 4, 8);
        assert!(schedulable(&n));
        n.metadata.annotations = Some([(MAINTENANCE_ANNOTATION.into(), "true".into())].into());
        assert!(!schedulable(&n));
        n.metadata.annotations = None;
        assert!(schedulable(&n));
        n.metadata
            .labels
            .as_mut()
            .unwrap()
            .insert(MAINTENANCE_LABEL.into(), "true".into());
        assert!(!schedulable(&n) && in_maintenance(&n));
        n.metadata
            .labels
            .as_mut()
            .unwrap()
            .remove(MAINTENANCE_LABEL);
        assert!(schedulable(&n));
        n.spec = Some(k8s_openapi::api::core::v1::NodeSpec {
            unschedulable: Some(true),
            ..Default::default()
        });
        assert!(!schedulable(&n));
    }

    #[test]
    fn published_capacity_wins_over_allocatable() {
        let n = node("a", 4, 8);
        assert_eq!(
            capacity(&n, None),
            Resources {
                cpu: 4000,
                memory: 8 << 30
            }
        );
        let mut reported = GodwitNode::new("a", Default::default());
        assert_eq!(
            capacity(&n, Some(&reported)).cpu,
            4000,
            "nothing published yet"
        );
        reported.status = Some(godwit_crds::GodwitNodeStatus {
            capacity: Some(godwit_crds::NodeCapacity {
                cpu: 3,
                memory: "1Gi".into(),
            }),
            ..Default::default()
        });
        assert_eq!(
            capacity(&n, Some(&reported)),
            Resources {
                cpu: 3000,
                memory: 1 << 30
            }
        );
        assert_eq!(parse_millicores("3500m"), Some(3500));
        assert_eq!(parse_millicores("0.5"), Some(500));
        assert_eq!(parse_millicores("x"), None);
    }

    #[test]
    fn only_labelled_nodes_are_godwit_nodes() {
        let mut n = node("a", 1, 1);
        assert!(is_godwit_node(&n));
        n.metadata.labels = None;
        assert!(!is_godwit_node(&n));
    }
}
