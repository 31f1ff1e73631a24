//! HA: VMs of a lost node run again elsewhere, and never twice.
//!
//! A node is lost when its agent's Lease has been expired for longer than
//! [`FENCE_MARGIN`]. By then the agent, if it still runs, has stopped every
//! VM on the node: it fences itself one second before its Lease would expire
//! when it could not renew it (see `godwit_node::agent`). The storage lock on
//! each disk refuses a second writer as a last guard.
//!
//! The watchdog looks at the Leases every [`WATCHDOG_PERIOD`] (500 ms). For each lost node it marks
//! the node's VMs `Failed` (condition `Ready=False`, reason `NodeLost`, a
//! Warning Event), highest `restartPriority` first; the VM controller then
//! restarts them by their `runStrategy` (Always, and RerunOnFailure since they
//! were running) on a ready node, through the normal placement. When the lost
//! node comes back, its agent finds VMs no longer labelled for it and removes
//! what is left of them; it never starts them again.

use std::sync::Arc;
use std::time::Duration;

use godwit_crds::contract::NODE_LABEL;
use godwit_crds::{VirtualMachine, VmPhase};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, ListParams, Patch};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use crate::context::{Context, Note};
use crate::nodes;

/// How long past its Lease's expiry a node counts as lost: time for a
/// fencing agent's VMMs to be gone.
pub const FENCE_MARGIN: Duration = Duration::from_millis(1500);

/// How often the watchdog looks at the Leases.
pub const WATCHDOG_PERIOD: Duration = Duration::from_millis(500);

/// The Godwit nodes whose agent's Lease expired more than `margin` before
/// `now`. A node whose agent never wrote a Lease runs nothing and is not lost.
pub fn lost_nodes(
    nodes: &[Node],
    leases: &[Lease],
    now: Timestamp,
    margin: Duration,
) -> Vec<String> {
    let margin = SignedDuration::try_from(margin).unwrap_or(SignedDuration::ZERO);
    nodes
        .iter()
        .filter(|n| n.labels().contains_key(NODE_LABEL))
        .filter_map(|n| {
            let name = n.name_any();
            let lease_name = godwit_crds::contract::node_lease_name(&name);
            let lease = leases.iter().find(|l| l.name_any() == lease_name)?;
            let expiry = nodes::lease_expiry(lease)?;
            let lost = expiry.checked_add(margin).is_ok_and(|t| t < now);
            lost.then_some(name)
        })
        .collect()
}

/// The VMs of a lost node to fail over, highest restart priority first.
/// VMs being deleted or migrated, and VMs not running there, are left alone
/// (a migration whose source is lost is ended by the migration controller).
pub fn to_fail_over(vms: &[VirtualMachine]) -> Vec<&VirtualMachine> {
    let mut out: Vec<&VirtualMachine> = vms
        .iter()
        .filter(|vm| vm.meta().deletion_timestamp.is_none())
        .filter(|vm| {
            matches!(
                vm.status.as_ref().map(|s| s.phase).unwrap_or_default(),
                VmPhase::Scheduled
                    | VmPhase::Provisioning
                    | VmPhase::Starting
                    | VmPhase::Running
                    | VmPhase::Stopping
            )
        })
        .collect();
    out.sort_by_key(|vm| std::cmp::Reverse(vm.spec.restart_priority.unwrap_or(0)));
    out
}

/// Runs the watchdog until the task is dropped.
pub async fn run(ctx: Arc<Context>) {
    let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), &ctx.config.lease_namespace);
    let node_api: Api<Node> = Api::all(ctx.client.clone());
    loop {
        tokio::time::sleep(WATCHDOG_PERIOD).await;
        let (Ok(ls), Ok(ns)) = (
            leases.list(&ListParams::default()).await,
            node_api
                .list(&ListParams::default().labels(NODE_LABEL))
                .await,
        ) else {
            continue;
        };
        for node in lost_nodes(&ns.items, &ls.items, Timestamp::now(), FENCE_MARGIN) {
            if let Err(e) = fail_over(&ctx, &node).await {
                warn!(%node, error = %e, "failover pass failed; retrying");
            }
        }
    }
}

/// A `Ready` `False` condition the operator writes for a VM whose node
/// cannot (lost, or in maintenance).
pub fn not_ready(reason: &str, message: &str) -> Condition {
    Condition {
        type_: "Ready".into(),
        status: "False".into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: Time(Timestamp::now()),
        observed_generation: None,
    }
}

async fn fail_over(ctx: &Context, node: &str) -> Result<(), kube::Error> {
    let vms: Api<VirtualMachine> = Api::all(ctx.client.clone());
    let on_node = vms
        .list(&ListParams::default().labels(&format!("{NODE_LABEL}={node}")))
        .await?;
    for vm in to_fail_over(&on_node.items) {
        let ns = vm.namespace().unwrap_or_default();
        let message = format!(
            "node {node} is lost (its Lease expired and it fenced itself); the VM is restarted elsewhere as its runStrategy {:?} says",
            vm.spec.run_strategy
        );
        info!(vm = %format!("{ns}/{}", vm.name_any()), %node, "failing over");
        ctx.metrics.failed_over();
        let api = Api::<VirtualMachine>::namespaced(ctx.client.clone(), &ns);
        let status = json!({"status": {"phase": VmPhase::Failed}});
        let failed = api
            .patch_status(&vm.name_any(), &ctx.patch_params(), &Patch::Merge(&status))
            .await?;
        let not_ready = not_ready("NodeLost", &message);
        ctx.apply_condition(&api, &failed, &not_ready).await?;
        ctx.publish(
            &vm.object_ref(&()),
            "Failover",
            &Note::warning("NodeLost", message),
        )
        .await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{at, lease, node, vm, VmFixture};

    #[test]
    fn a_node_is_lost_only_past_its_lease_and_the_fence_margin() {
        let nodes = vec![node("a", 4, 8), node("b", 4, 8), node("c", 4, 8)];
        // a renewed at 0 (10 s lease), b at 5; c never wrote a Lease.
        let leases = vec![lease("a", at(0), 10), lease("b", at(5), 10)];
        let margin = Duration::from_secs(2);
        assert!(lost_nodes(&nodes, &leases, at(11), margin).is_empty());
        assert_eq!(lost_nodes(&nodes, &leases, at(13), margin), ["a"]);
        assert_eq!(lost_nodes(&nodes, &leases, at(18), margin), ["a", "b"]);
    }

    #[test]
    fn running_vms_fail_over_by_priority_and_others_stay() {
        let vms = vec![
            vm("low").running().restart_priority(-5),
            vm("stopped").phase(VmPhase::Stopped),
            vm("high").phase(VmPhase::Starting).restart_priority(100),
            vm("moving").phase(VmPhase::Migrating),
            vm("mid").running(),
        ];
        let names: Vec<String> = to_fail_over(&vms).iter().map(|v| v.name_any()).collect();
        assert_eq!(names, ["high", "mid", "low"]);
    }
}
