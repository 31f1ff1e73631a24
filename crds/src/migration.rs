//! `VMMigration`: one move of one VM, with its live progress and its result.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::MigrationPolicy;

/// A request to move a VM. The spec cannot change once created: to move again,
/// create another `VMMigration`.
// Each `printcolumn(...)` repeats `type_ = ...`, which clippy mistakes for a
// duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "godwit.dev",
    version = "v1alpha1",
    kind = "VMMigration",
    namespaced,
    status = "VMMigrationStatus",
    shortname = "gvmm",
    category = "godwit",
    printcolumn(name = "VM", type_ = "string", json_path = ".spec.vmName"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Source", type_ = "string", json_path = ".status.sourceNode"),
    printcolumn(name = "Target", type_ = "string", json_path = ".status.targetNode"),
    printcolumn(
        name = "Remaining",
        type_ = "integer",
        json_path = ".status.progress.memoryRemainingBytes"
    ),
    printcolumn(
        name = "Downtime(ms)",
        type_ = "integer",
        json_path = ".status.result.downtimeMs"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("self == oldSelf").message("spec is immutable: create a new VMMigration instead"))]
#[serde(rename_all = "camelCase")]
pub struct VMMigrationSpec {
    /// The VM to move (same namespace).
    #[schemars(length(min = 1, max = 253))]
    pub vm_name: String,
    /// The node to move to; the scheduler picks one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub target_node: Option<String>,
    /// `Live` moves a running VM; `Cold` moves a stopped one (default `Live`).
    #[serde(default)]
    pub mode: MigrationMode,
    /// Whether disks are copied; detected from the VM's disks when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<StorageMode>,
    /// Overrides of the VM's and the cluster's migration policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<MigrationPolicy>,
}

/// How a VM is moved.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum MigrationMode {
    /// The guest keeps running while its memory (and local disks) are copied.
    #[default]
    Live,
    /// The VM is stopped; its disks and config are moved.
    Cold,
}

/// Whether a migration copies disks.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum StorageMode {
    /// Every node sees the disks; nothing is copied.
    Shared,
    /// Disks on node-local storage are copied in the migration stream.
    Copy,
}

/// How a migration went, or is going.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VMMigrationStatus {
    /// Where the migration is.
    #[serde(default)]
    pub phase: MigrationPhase,
    /// The node the VM runs on when the migration starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_node: Option<String>,
    /// The node the VM moves to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_node: Option<String>,
    /// When copying started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the migration reached a final phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<Time>,
    /// Live figures, updated about once a second while copying.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<MigrationProgress>,
    /// Final figures, once `Succeeded`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<MigrationResult>,
    /// Why the migration failed or was cancelled, and what happened to the VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
    /// Where the target's VMM waits for the migration stream (`host:port`),
    /// written by the target node's agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_address: Option<String>,
    /// Set by the target node's agent once a migration that did not succeed
    /// has left nothing on the target (its incoming VMM stopped and its
    /// files removed). Only then (or once the target node is lost, or 2
    /// minutes after the end) does the operator give the VM back to the
    /// source node, where it may be restarted: the VM never runs on two
    /// nodes, even when the source died in post-copy.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub target_released: bool,
    /// Standard conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// Live figures of a running migration.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrationProgress {
    /// Pre-copy round (0 is the full copy).
    pub round: u32,
    /// Guest memory size.
    pub memory_total_bytes: u64,
    /// Memory still to send (dirty pages known now).
    pub memory_remaining_bytes: u64,
    /// Allocated size of the disks being copied.
    #[serde(default)]
    pub disk_total_bytes: u64,
    /// Disk bytes still to send.
    #[serde(default)]
    pub disk_remaining_bytes: u64,
    /// Bytes sent so far, memory and disk.
    pub transferred_bytes: u64,
    /// Rate at which the guest dirties memory.
    pub dirty_rate_bytes_per_second: u64,
    /// Measured throughput of the stream.
    pub bandwidth_bytes_per_second: u64,
    /// Pause the guest would see if switched over now.
    pub expected_downtime_ms: u64,
}

/// Final figures of a finished migration.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrationResult {
    /// From start to the source discarding its copy.
    pub total_time_ms: u64,
    /// From the source pausing the guest to the target resuming it.
    pub downtime_ms: u64,
    /// Bytes sent, memory and disk.
    pub transferred_bytes: u64,
    /// Pre-copy rounds.
    pub rounds: u32,
    /// How the migration converged.
    pub mode_used: MigrationModeUsed,
}

/// How a migration ended up moving the VM.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum MigrationModeUsed {
    /// Pre-copy rounds, then stop-and-copy.
    #[default]
    PreCopy,
    /// Pre-copy with the vCPUs throttled.
    AutoConverge,
    /// The target ran before all memory arrived.
    PostCopy,
    /// The VM was stopped and moved.
    Cold,
}

/// A migration's phase, as `status.phase` shows it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum MigrationPhase {
    /// Accepted, not yet started.
    #[default]
    Pending,
    /// Choosing a target node.
    Scheduling,
    /// The target node starts a receiving VMM.
    PreparingTarget,
    /// Memory (and disks) copied in rounds while the guest runs.
    PreCopy,
    /// The guest is paused and the last pages and device state are sent.
    StopAndCopy,
    /// The guest runs on the target while the rest of its memory arrives.
    PostCopy,
    /// The target confirms a consistent image; the source discards its copy.
    Committing,
    /// The VM runs on the target.
    Succeeded,
    /// The VM stayed on the source (or was restarted by HA); see `failureReason`.
    Failed,
    /// Cancelled by deleting the object or by request; the VM stayed on the source.
    Cancelled,
}

impl MigrationPhase {
    /// Whether the migration is over.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            MigrationPhase::Succeeded | MigrationPhase::Failed | MigrationPhase::Cancelled
        )
    }

    /// Whether a migration may go from `self` to `next`. Phases only move forward;
    /// a final phase is never left; failing or cancelling is possible until the
    /// target has committed.
    pub fn can_transition_to(self, next: MigrationPhase) -> bool {
        use MigrationPhase::*;
        if self == next {
            return true;
        }
        if self.is_final() {
            return false;
        }
        match (self, next) {
            // Once the target runs the guest (post-copy) or has committed, the only
            // way back to the source is gone: such a failure is handled by HA, and
            // cancelling is no longer possible.
            (PostCopy | Committing, Cancelled) => false,
            (_, Failed | Cancelled) => true,
            (Pending, Scheduling | PreparingTarget) => true,
            (Scheduling, PreparingTarget) => true,
            (PreparingTarget, PreCopy) => true,
            // A cold migration copies a stopped VM: nothing to pre-copy.
            (PreparingTarget, StopAndCopy) => true,
            (PreCopy, StopAndCopy | PostCopy) => true,
            (StopAndCopy, Committing) => true,
            (PostCopy, Committing) => true,
            (Committing, Succeeded) => true,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_only_move_forward() {
        use MigrationPhase::*;
        let path = [
            Pending,
            Scheduling,
            PreparingTarget,
            PreCopy,
            StopAndCopy,
            Committing,
            Succeeded,
        ];
        for pair in path.windows(2) {
            assert!(pair[0].can_transition_to(pair[1]), "{pair:?}");
        }
        assert!(PreCopy.can_transition_to(PostCopy));
        assert!(!Succeeded.can_transition_to(Failed));
        assert!(!StopAndCopy.can_transition_to(PreCopy));
        assert!(!PostCopy.can_transition_to(Cancelled));
        assert!(PreCopy.can_transition_to(Cancelled));
        assert!(!Cancelled.can_transition_to(Pending));
    }
}
