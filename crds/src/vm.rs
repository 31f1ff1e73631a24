//! `VirtualMachine`: what to run, where it may run, and what it is doing now.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Toleration;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{BootSpec, Customization, MigrationPolicy};

/// Seconds a guest has to power off after the power button is pressed when
/// the VM's `spec.terminationGracePeriodSeconds` is absent.
pub const DEFAULT_GRACE_SECONDS: u32 = 30;

/// The desired state of a virtual machine.
///
/// Without a `templateRef` the VM must say its `cpu`, `memory` and `boot`; with one,
/// the template supplies what the VM leaves out and the VM's fields win.
// Each `printcolumn(...)` repeats `type_ = ...`, which clippy mistakes for a
// duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "godwit.dev",
    version = "v1alpha1",
    kind = "VirtualMachine",
    namespaced,
    status = "VirtualMachineStatus",
    shortname = "gvm",
    category = "godwit",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Node", type_ = "string", json_path = ".status.nodeName"),
    printcolumn(name = "IP", type_ = "string", json_path = ".status.addresses[0].ip"),
    printcolumn(name = "CPU", type_ = "integer", json_path = ".status.cpu"),
    printcolumn(name = "Memory", type_ = "string", json_path = ".status.memory"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("has(self.templateRef) || (has(self.cpu) && has(self.memory) && has(self.boot))").message("spec.cpu, spec.memory and spec.boot are required when spec.templateRef is not set"))]
#[x_kube(validation = Rule::new("has(self.templateRef) || !has(self.disks) || self.disks.all(d, !has(d.source.template))").message("a disk from the template needs spec.templateRef"))]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineSpec {
    /// The `VMTemplate` (same namespace) this VM is provisioned from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_ref: Option<TemplateRef>,
    /// Number of vCPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 256))]
    pub cpu: Option<u32>,
    /// Guest memory as a Kubernetes quantity, at least 64Mi (e.g. `512Mi`, `2Gi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"))]
    #[x_kube(validation = Rule::new("quantity(self).compareTo(quantity('64Mi')) >= 0").message("memory must be at least 64Mi"))]
    #[x_kube(validation = Rule::new("quantity(self).compareTo(quantity('4Ti')) <= 0").message("memory must be at most 4Ti"))]
    pub memory: Option<String>,
    /// Kernel, initrd and command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<BootSpec>,
    /// Disks, in the order the guest sees them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub disks: Vec<Disk>,
    /// Network interfaces, in the order the guest sees them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    #[x_kube(validation = Rule::new("self.all(n, !has(n.mac) || self.exists_one(e, has(e.mac) && e.mac.lowerAscii() == n.mac.lowerAscii()))").message("MAC addresses must be unique"))]
    pub networks: Vec<Network>,
    /// Whether the VM should be running (default `Always`).
    #[serde(default)]
    pub run_strategy: RunStrategy,
    /// Only nodes with all these labels can run the VM.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Placement relative to other VMs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<VmAffinity>,
    /// Taints of nodes this VM tolerates.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// What happens when the VM's node is drained (default `LiveMigrate`).
    #[serde(default)]
    pub eviction_strategy: EvictionStrategy,
    /// Order in which HA restarts VMs of a lost node: higher first (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = -1000, max = 1000))]
    pub restart_priority: Option<i32>,
    /// The PriorityClass of the VM's reservation pods, which kube-scheduler
    /// and kubelet eviction see (default: none, the cluster's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// Overrides of the cluster's migration policy for this VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_policy: Option<MigrationPolicy>,
    /// First-boot customization of this VM, merged field by field over its
    /// template's (the VM's fields win).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customization: Option<Customization>,
    /// Seconds a stopped VM's guest has to power off after the ACPI power
    /// button is pressed, before it is stopped by force (default 30; 0 stops
    /// it by force at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 3600))]
    pub termination_grace_period_seconds: Option<u32>,
}

impl VirtualMachineSpec {
    /// How long the guest has to power off when stopped
    /// ([`DEFAULT_GRACE_SECONDS`] unless the spec says).
    pub fn termination_grace(&self) -> std::time::Duration {
        let secs = self
            .termination_grace_period_seconds
            .unwrap_or(DEFAULT_GRACE_SECONDS);
        std::time::Duration::from_secs(u64::from(secs))
    }
}

/// A reference to a `VMTemplate` in the VM's namespace, or to a
/// `ClusterVMTemplate`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct TemplateRef {
    /// The template's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// `VMTemplate` (default: in the VM's namespace) or `ClusterVMTemplate`
    /// (cluster-scoped, made by cluster administrators).
    #[serde(default, skip_serializing_if = "TemplateKind::is_namespaced")]
    pub kind: TemplateKind,
}

/// Which kind of template a [`TemplateRef`] names.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum TemplateKind {
    /// A `VMTemplate` in the VM's namespace.
    #[default]
    VMTemplate,
    /// A `ClusterVMTemplate`.
    ClusterVMTemplate,
}

impl TemplateKind {
    /// Whether this is the default, a namespaced `VMTemplate`.
    pub fn is_namespaced(&self) -> bool {
        *self == TemplateKind::VMTemplate
    }
}

/// One virtual disk.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("!(has(self.readOnly) && self.readOnly && has(self.source.blank))").message("a blank disk cannot be read-only: nothing could ever be written to it"))]
#[serde(rename_all = "camelCase")]
pub struct Disk {
    /// Name, unique within the VM.
    #[schemars(pattern(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"))]
    pub name: String,
    /// Where the disk's content comes from.
    pub source: DiskSource,
    /// Whether every node sees the disk's path (`Shared`, never copied) or it lives
    /// on the VM's node (`Local`, copied when the VM moves). Default `Local`.
    #[serde(default)]
    pub storage: StorageKind,
    /// Attach read-only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
}

/// Where a disk's content comes from; exactly one of the fields is set.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("[has(self.template), has(self.image), has(self.blank)].filter(x, x).size() == 1").message("exactly one of template, image or blank must be set"))]
pub struct DiskSource {
    /// A copy-on-write overlay on the template's root image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<TemplateDiskSource>,
    /// An existing image file on the node or on shared storage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageDiskSource>,
    /// A new empty disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blank: Option<BlankDiskSource>,
}

/// The template's root disk, as a copy-on-write overlay.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct TemplateDiskSource {}

/// An existing image file.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
pub struct ImageDiskSource {
    /// Absolute path of the image, in one of the node's image directories
    /// (the node daemon's `--image-dir`; a `Shared` disk's directory must be
    /// one on every node).
    #[schemars(pattern(r"^/.+"), length(max = 4096))]
    #[x_kube(validation = Rule::new(crate::common::NODE_PATH_RULE).message(crate::common::NODE_PATH_MESSAGE))]
    #[x_kube(validation = Rule::new(crate::common::SYSTEM_PATH_RULE).message(crate::common::SYSTEM_PATH_MESSAGE))]
    pub path: String,
    /// Image format (default `raw`).
    #[serde(default)]
    pub format: ImageFormat,
}

/// A new empty disk of the given size.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct BlankDiskSource {
    /// Size as a Kubernetes quantity (e.g. `10Gi`).
    #[schemars(pattern(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"))]
    pub size: String,
}

/// Disk image formats Godwit reads and writes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    /// A plain, possibly sparse, image file.
    #[default]
    Raw,
    /// QEMU copy-on-write v2/v3, optionally with a backing file.
    Qcow2,
}

/// Where a disk lives.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum StorageKind {
    /// On the VM's node: copied by a migration.
    #[default]
    Local,
    /// On storage every node sees: never copied.
    Shared,
}

/// One network interface.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Network {
    /// Name, unique within the VM.
    #[schemars(pattern(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"))]
    pub name: String,
    /// The node bridge the interface's tap is attached to.
    #[schemars(length(min = 1, max = 15))]
    pub bridge: String,
    /// MAC address; generated from the VM's UID when absent, and kept across
    /// migrations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$"))]
    pub mac: Option<String>,
}

/// Whether a VM should be running.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RunStrategy {
    /// Keep it running: start it, and restart it whenever it stops.
    #[default]
    Always,
    /// Start it, and restart it only when it failed (not after a clean shutdown).
    RerunOnFailure,
    /// Start and stop it only when asked (a reboot inside the guest is not
    /// a stop: the VM starts again).
    Manual,
    /// Keep it stopped.
    Halted,
}

/// What happens when a VM's node is drained.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum EvictionStrategy {
    /// Move it to another node while it runs.
    #[default]
    LiveMigrate,
    /// Shut it down.
    Shutdown,
}

/// Placement rules relative to other VMs, by their labels.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VmAffinity {
    /// Run on a node that already runs a VM matching each term.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vm_affinity: Vec<VmAffinityTerm>,
    /// Never share a node with a VM matching any term.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vm_anti_affinity: Vec<VmAffinityTerm>,
}

/// A set of VMs, in the same namespace, chosen by labels.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VmAffinityTerm {
    /// Which VMs the term is about.
    #[schemars(schema_with = "crate::common::label_selector_schema")]
    pub label_selector: LabelSelector,
}

/// What a VM is doing, as observed by the operator and its node's agent.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineStatus {
    /// Where the VM is in its life.
    #[serde(default)]
    pub phase: VmPhase,
    /// The node that runs (or will run) the VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// Addresses of the VM's interfaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<VmAddress>,
    /// Conditions: `Ready` (written by the node agent: the guest runs, or
    /// why not) and `Scheduled` (written by the operator: placed on a node,
    /// or why not).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The migration moving the VM now, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<String>,
    /// The vCPUs the VM runs with: its own `cpu` or its template's, as
    /// resolved when it was scheduled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<u32>,
    /// The guest memory the VM runs with (a quantity), its own or its
    /// template's, as resolved when it was scheduled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    /// The machine the VM runs as (`contract::Machine`, read with
    /// `contract::resolved_machine`): its spec with its template applied,
    /// written by the operator when it schedules the VM. In status, which
    /// the VM's author cannot write, so a node runs only what the operator
    /// resolved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::common::resolved_machine_schema")]
    pub machine: Option<serde_json::Value>,
}

/// One interface's addresses.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VmAddress {
    /// The interface's network name from the spec.
    pub network: String,
    /// MAC address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// IPv4 address in CIDR form, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
}

/// A VM's phase, as `status.phase` shows it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum VmPhase {
    /// Accepted, not yet placed on a node.
    #[default]
    Pending,
    /// A node has been chosen.
    Scheduled,
    /// Disks are being prepared on the node.
    Provisioning,
    /// The VMM is starting.
    Starting,
    /// The guest runs.
    Running,
    /// The guest runs and is moving to another node.
    Migrating,
    /// The guest is shutting down.
    Stopping,
    /// Not running, by request.
    Stopped,
    /// Not running, because something went wrong (see conditions and Events).
    Failed,
}

impl VmPhase {
    /// Whether a VM may go from `self` to `next`. The controllers refuse anything
    /// else, so a stale or reordered status write cannot, say, mark a stopped VM
    /// as migrating.
    pub fn can_transition_to(self, next: VmPhase) -> bool {
        use VmPhase::*;
        if self == next {
            return true;
        }
        match (self, next) {
            // Anything can fail or be asked to stop.
            (_, Failed) | (_, Stopping) => true,
            (Pending, Scheduled) => true,
            (Scheduled, Provisioning | Starting | Pending) => true,
            (Provisioning, Starting) => true,
            (Starting, Running) => true,
            (Running, Migrating) => true,
            // A migration ends with the VM running (on either node).
            (Migrating, Running) => true,
            (Stopping, Stopped) => true,
            // A stopped or failed VM is started again through scheduling.
            (Stopped | Failed, Pending | Scheduled) => true,
            _ => false,
        }
    }

    /// Whether a VMM process exists for the VM in this phase.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            VmPhase::Starting | VmPhase::Running | VmPhase::Migrating | VmPhase::Stopping
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_transitions_follow_the_life_cycle() {
        use VmPhase::*;
        let path = [
            Pending,
            Scheduled,
            Provisioning,
            Starting,
            Running,
            Migrating,
            Running,
        ];
        for pair in path.windows(2) {
            assert!(pair[0].can_transition_to(pair[1]), "{pair:?}");
        }
        assert!(!Stopped.can_transition_to(Migrating));
        assert!(!Pending.can_transition_to(Running));
        assert!(!Running.can_transition_to(Provisioning));
        assert!(Running.can_transition_to(Failed));
    }
}
