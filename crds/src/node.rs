//! `GodwitNode`: what a node's agent reports about its node, as status only.
//!
//! One per Godwit node, named after the Node, in the namespace of the node
//! Leases (the release namespace, `godwit-system` by default), owned by
//! its Node (so it goes when the Node goes). Its agent writes the status by
//! server-side apply: the capacity it offers VMs once at start, and every
//! [`crate::contract::USAGE_PERIOD_SECONDS`] the measured usage of its VMMs
//! and the template images its cache holds. The operator reads it for
//! placement (capacity), the DRS balancer (usage) and each VMTemplate's
//! status (cached images).
//!
//! Why a resource of its own rather than annotations on the Node (as
//! before): the usage changes every few seconds, and every write to a Node
//! object wakes every Node informer in the cluster (kubelets, the
//! scheduler, every controller that watches Nodes) and grows the Node that
//! all of them cache. A GodwitNode is watched only by Godwit. It is typed
//! too: `kubectl get gnode` shows capacity and usage in columns, and the
//! schema refuses a malformed report instead of each reader parsing JSON
//! out of an annotation.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What a node's agent reports about its node (status only).
// Each `printcolumn(...)` repeats `type_ = ...`, which clippy mistakes for a
// duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "godwit.dev",
    version = "v1alpha1",
    kind = "GodwitNode",
    namespaced,
    status = "GodwitNodeStatus",
    shortname = "gnode",
    category = "godwit",
    printcolumn(name = "CPU", type_ = "integer", json_path = ".status.capacity.cpu"),
    printcolumn(
        name = "Memory",
        type_ = "string",
        json_path = ".status.capacity.memory"
    ),
    printcolumn(
        name = "CPU-Used-m",
        type_ = "integer",
        json_path = ".status.usage.cpuMillis"
    ),
    printcolumn(name = "RSS", type_ = "integer", json_path = ".status.usage.rssBytes"),
    printcolumn(name = "Measured", type_ = "date", json_path = ".status.usage.time")
)]
#[serde(rename_all = "camelCase")]
pub struct GodwitNodeSpec {}

/// A node's capacity and usage, as its agent reports them.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GodwitNodeStatus {
    /// What the node offers VMs (the agent's `--cpu` and `--memory`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<NodeCapacity>,
    /// What the node's VMMs measurably use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<NodeUsage>,
    /// The template images the node's cache holds: image source to
    /// `sha256:<hex>`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub cached_images: BTreeMap<String, String>,
}

/// What a node offers VMs.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeCapacity {
    /// vCPUs.
    pub cpu: u64,
    /// Memory, as a quantity (`16Gi`).
    pub memory: String,
}

/// Measured usage on a node.
///
/// `cpuMillis` is CPU time per second of wall time over the last period, in
/// thousandths of a CPU (`utime + stime` deltas of `/proc/<pid>/stat`);
/// `rssBytes` is `VmRSS` from `/proc/<pid>/status`.
/// `{"time":"2026-01-01T00:00:00Z","periodMs":5000,"cpuMillis":1830,
/// "rssBytes":402653184,"vms":{"default/demo":{"cpuMillis":930,"rssBytes":201326592}}}`
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeUsage {
    /// When it was measured (RFC 3339).
    pub time: String,
    /// Over how long the CPU figures were measured.
    #[serde(default)]
    pub period_ms: u64,
    /// All the node's VMMs together.
    pub cpu_millis: u64,
    /// All the node's VMMs together.
    pub rss_bytes: u64,
    /// Per VM, keyed `namespace/name`.
    #[serde(default)]
    pub vms: BTreeMap<String, VmUsage>,
}

/// One VMM's measured usage, see [`NodeUsage`].
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VmUsage {
    /// CPU time per second of wall time, in thousandths of a CPU.
    pub cpu_millis: u64,
    /// Resident memory.
    pub rss_bytes: u64,
}
