//! The contract between the operator and the node agents.
//!
//! They never call each other: the operator decides and writes its decisions
//! into API objects, the agent on a node acts on the objects labelled for its
//! node and reports what happened. This module names every label, annotation,
//! finalizer and Lease both sides rely on, and the resolved machine the
//! operator hands to a node.
//!
//! ## Who writes what
//!
//! | object / field | operator | node agent |
//! | --- | --- | --- |
//! | VM label [`NODE_LABEL`], `status.nodeName`, `status.machine` ([`resolved_machine`]) | at scheduling and when a migration ends | never |
//! | VM phase | `Pending→Scheduled`, `Stopped/Failed→Scheduled` (restart by `runStrategy`), `Running→Migrating` and back (a cold migration's `Stopped` VM only gets `status.migration`) | `Scheduled→Provisioning→Starting→Running`, `→Stopping→Stopped`, `→Failed`, addresses |
//! | VM finalizer [`AGENT_FINALIZER`] | only when the node is lost (HA) | added before anything is created on the node, removed after the VMM is stopped and the VM's node-local files are gone |
//! | VMMigration finalizer [`MIGRATION_FINALIZER`] | added on admission, removed once the phase is final | never |
//! | VMMigration `Pending→Scheduling→PreparingTarget`, `sourceNode`, `targetNode`, labels [`SOURCE_LABEL`]/[`TARGET_LABEL`], `startTime` | yes | |
//! | VMMigration `targetAddress` | | target agent, once its incoming VMM listens (cold: once the agent itself listens) |
//! | VMMigrations labelled [`EVACUATION_LABEL`] / [`DRS_LABEL`] | created for maintenance / by DRS in automatic mode | |
//! | Node label or annotation [`MAINTENANCE_LABEL`] | never (the user sets it) | never |
//! | Node annotation [`MAINTENANCE_STATUS_ANNOTATION`] | while the node is in maintenance | |
//! | `GodwitNode` `<node>` (in the lease namespace): `status.capacity`, `status.usage`, `status.cachedImages` ([`crate::node`]) | reads it | creates its own, owned by its Node, and applies its status |
//! | VM conditions ([`crate::conditions`]) | `Scheduled`; `Ready` only for a lost node or a maintenance shutdown | `Ready`, `Paused`; each by server-side apply under a field manager per condition type |
//! | VM phase `Running→Stopping` | maintenance, for `evictionStrategy: Shutdown` | |
//! | VM `Stopped` with Ready reason [`GUEST_RESET_REASON`] | starts it again unless `runStrategy: Halted` | when the guest reset itself |
//! | Reservation pods (labels [`VM_LABEL`], [`RESERVATION_LABEL`], [`NODE_LABEL`]) and the VM's PodDisruptionBudget | created before scheduling, restarting or a live migration's target preparation; deleted when the VM leaves a node, stops or is deleted | never (requests: vCPUs / cpuAllocationRatio, memory + [`VMM_MEMORY_OVERHEAD`], the agent's cgroup margin) |
//! | VM annotation [`PAUSE_ANNOTATION`] | never (the user sets it: `kubectl godwit pause`/`unpause`) | reads it: the agent running the VM pauses or resumes its VMM to match (not during a migration), writes the VM's condition [`PAUSED_CONDITION`] and an Event |
//! | VMMigration `PreCopy…Succeeded/Failed/Cancelled`, `progress`, `result`, `endTime` | `Cancelled`/`Failed` only before `PreparingTarget` (and on timeout of a target that never answers) | source agent, from the moment it sends |
//! | CertificateSigningRequest with signer [`MIGRATION_SIGNER`] (CN [`NODE_CN_PREFIX`]`<node>`) | approves or denies it (`/approval`), signs approved ones (`status.certificate`) | creates it with its own key's request, reads the certificate |
//! | Secret [`MIGRATION_CA_SECRET`] (CA key) | made when missing, read to sign; nobody else reads it | never |
//! | ConfigMap [`MIGRATION_CA_CONFIGMAP`] (`ca.crt`: the CA bundle the nodes trust) | published from the Secret's `ca.crt` before it signs | reads it with its certificate |
//!
//! A migration is cancelled by deleting it or by the annotation
//! [`CANCEL_ANNOTATION`]`: "true"`; from `PreparingTarget` on, the source
//! agent carries the cancellation out (the VM stays on the source) and writes
//! `Cancelled`; the operator then removes the finalizer.
//!
//! When a migration ends the operator moves the VM: on `Succeeded` the label
//! and `status.nodeName` become the target, otherwise they stay on the source;
//! the VM's phase goes back to `Running` (a cold migration's VM stays
//! `Stopped`) and `status.migration` is cleared.
//! The target agent keeps its incoming VMM while a migration naming it as the
//! target is active or `Succeeded` within [`ADOPTION_GRACE_SECONDS`]; the
//! source agent stops its VMM for a VM that is no longer labelled for it.

use serde::{Deserialize, Serialize};

use crate::common::{NetworkConfig, SecretKeyRef};
use crate::vm::{ImageFormat, StorageKind, VirtualMachine};

/// On a VirtualMachine: the node that runs it. On a Node: marks a Godwit node.
pub const NODE_LABEL: &str = "godwit.dev/node";
/// On a VMMigration: the node the VM leaves.
pub const SOURCE_LABEL: &str = "godwit.dev/source-node";
/// On a VMMigration: the node the VM goes to.
pub const TARGET_LABEL: &str = "godwit.dev/target-node";
/// The Secret (in the operator's namespace) holding the migration CA
/// (`ca.crt`, `ca.key`): made by the operator when it is missing, read only
/// by the operator, which signs the nodes' certificate requests with it.
pub const MIGRATION_CA_SECRET: &str = "godwit-migration-ca";
/// The ConfigMap (in the operator's namespace, which is the nodes'
/// `--lease-namespace`) where the operator publishes the migration CA's
/// certificates (key `ca.crt`, a PEM bundle), the trust of every node.
pub const MIGRATION_CA_CONFIGMAP: &str = "godwit-migration-ca";
/// The `signerName` of node migration certificates
/// (CertificateSigningRequests the operator approves and signs).
pub const MIGRATION_SIGNER: &str = "godwit.dev/migration";
/// The common name of a node's migration certificate is this prefix and the
/// node's name.
pub const NODE_CN_PREFIX: &str = "system:godwit-node:";
/// The user-info extra key in which Kubernetes names the node a pod-bound
/// service-account token belongs to (copied into a CSR's `spec.extra`).
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// On a VMMigration: `"true"` asks for it to be cancelled.
pub const CANCEL_ANNOTATION: &str = "godwit.dev/cancel";
/// On a VirtualMachine: the node agent's cleanup (stop the VMM, remove disks).
pub const AGENT_FINALIZER: &str = "godwit.dev/node-agent";
/// On a VMMigration: the operator's bookkeeping (concurrency slots, the VM's
/// phase) before it goes.
pub const MIGRATION_FINALIZER: &str = "godwit.dev/migration";
/// The memory a VMM uses beyond its guest's memory (bytes): the margin in
/// a VM's cgroup memory limit (the agent's `--vmm-memory-overhead-mib`
/// default) and in its reservation pod's memory request. See the README's
/// "Per-VM cgroups" for the measured figures.
pub const VMM_MEMORY_OVERHEAD: u64 = 128 << 20;
/// On a VM's reservation pods and its PodDisruptionBudget: the VM's name.
pub const VM_LABEL: &str = "godwit.dev/vm";
/// On a VM's reservation pods: `"true"`.
pub const RESERVATION_LABEL: &str = "godwit.dev/reservation";
/// On a Node (label, or annotation as before): `"true"` puts it in
/// maintenance. Cordoning it (`spec.unschedulable`) does the same. A node in
/// maintenance takes no new VMs or migrations; the operator live-migrates its
/// VMs with `evictionStrategy: LiveMigrate` elsewhere (VMMigrations labelled
/// [`EVACUATION_LABEL`]), stops the others (their `runStrategy` decides whether
/// they start again elsewhere) and reports progress in
/// [`MAINTENANCE_STATUS_ANNOTATION`]. Removing the label (or uncordoning)
/// makes the node schedulable again.
pub const MAINTENANCE_LABEL: &str = "godwit.dev/maintenance";
/// On a Node in maintenance, written by the operator: the evacuation's
/// progress as JSON, `{"phase":"Evacuating"|"Empty"|"NodeNotReady",
/// "remaining":n,"migrating":n,"waiting":n,"shuttingDown":n,"blocked":n,
/// "blockedVms":["ns/name: why"]}`; `remaining` counts the VMs still on the
/// node, `Empty` means none is. Removed when maintenance ends.
pub const MAINTENANCE_STATUS_ANNOTATION: &str = "godwit.dev/maintenance-status";
/// On a VMMigration the operator made to empty a node in maintenance: that node.
pub const EVACUATION_LABEL: &str = "godwit.dev/evacuation";
/// On a VMMigration the DRS balancer made: `"true"`.
pub const DRS_LABEL: &str = "godwit.dev/drs";
/// How often the agents publish their node's usage (`GodwitNode.status.usage`).
pub const USAGE_PERIOD_SECONDS: u64 = 5;
/// The namespace of the node Leases (and the operator's leader Lease).
pub const DEFAULT_LEASE_NAMESPACE: &str = "godwit-system";
/// The name of a node's Lease.
pub fn node_lease_name(node: &str) -> String {
    format!("godwit-node-{node}")
}
/// The operator's leader-election Lease.
pub const OPERATOR_LEASE: &str = "godwit-operator";
/// How long a node Lease lasts without renewal.
pub const NODE_LEASE_SECONDS: i32 = 8;
/// How long a target keeps a migrated VM that is not yet labelled for it.
pub const ADOPTION_GRACE_SECONDS: i64 = 60;
/// The field manager both sides use for server-side apply and patches.
pub fn field_manager(component: &str) -> String {
    format!("godwit-{component}")
}

/// On a VirtualMachine: an RFC 3339 time at which a user asked for a restart
/// (`kubectl godwit restart`). The node agent running the VM stops its VMM
/// once when this time is later than the VMM's start (the `pid` file's
/// modification time in the VM directory), so the request is carried out
/// once however often the agent looks at it; the operator then starts the
/// VM again as for any stopped VM with `runStrategy: Always`. Clocks of the
/// client and the node are assumed to agree within a second or so, as for
/// Leases.
pub const RESTART_ANNOTATION: &str = "godwit.dev/restart-requested";

/// On a VirtualMachine: an RFC 3339 time at which a user asked for a forced
/// stop (`kubectl godwit stop --force`). While the VM is being stopped, the
/// node agent skips the power button (grace 0) when this time is later than
/// the VMM's start, as for [`RESTART_ANNOTATION`]; a later VMM is stopped
/// gracefully again.
pub const FORCE_STOP_ANNOTATION: &str = "godwit.dev/force-stop-requested";

/// On a VirtualMachine: `"true"` asks for its vCPUs to be paused (`kubectl
/// godwit pause`); removing it (`kubectl godwit unpause`) lets them run
/// again. The node agent running the VM compares it with the state its VMM
/// reports (`status`: `paused`) on every pass, outside migrations, and sends
/// `pause` or `resume` when they differ; it reports the
/// [`PAUSED_CONDITION`] and an Event each way. The VMM's own answer is the
/// only record of whether it is paused, so a VMM restarted, or a VM that
/// arrives by live migration running, is paused again by the agent that
/// then runs it.
pub const PAUSE_ANNOTATION: &str = "godwit.dev/paused";
/// The VM condition type the node agent writes for [`PAUSE_ANNOTATION`]:
/// `True` with reason [`PAUSED_BY_USER_REASON`] while the VMM is paused,
/// `False` (reason `Running`) once it runs again.
pub const PAUSED_CONDITION: &str = "Paused";
/// The [`PAUSED_CONDITION`] reason (and Event reason) of a VM paused on
/// request.
pub const PAUSED_BY_USER_REASON: &str = "PausedByUser";

pub use crate::vm::DEFAULT_GRACE_SECONDS;

/// The Ready condition reason (and the Event reason) of a VM whose guest
/// reset itself (a reboot inside the guest): the agent reports it `Stopped`
/// with this reason, and the operator starts it again unless its
/// `runStrategy` is `Halted` (for `Manual` too: a reboot is not a stop).
pub const GUEST_RESET_REASON: &str = "GuestReset";

/// The node agent's serial-console endpoint: the default TCP port it listens
/// on at the node's IP (`godwit-node --console-addr`).
///
/// Protocol, inside mutual TLS (the agent presents its node certificate and
/// accepts only a client certificate from the migration CA with the common
/// name [`CONSOLE_PROXY_CN`]): the client sends one line
/// `CONSOLE_HELLO <namespace>/<name>\n`; the agent answers one line, `OK\n`
/// or `ERR <what to do>\n`, and after `OK` bytes flow both ways unchanged
/// between the connection and the VM's COM1 until either side closes.
/// The same port forwards to a TCP port of the guest: the line is then
/// `FORWARD_HELLO <namespace>/<name> <port>\n`, and after `OK` the bytes
/// flow between the connection and a TCP connection the agent opened to
/// the VM's first address on that port.
pub const CONSOLE_PORT: u16 = 9412;
/// The common name of the one client certificate a node's console port
/// accepts: the operator's console proxy (the aggregated API
/// [`SUBRESOURCES_GROUP`]), which authorizes every user first. Node
/// certificates ([`NODE_CN_PREFIX`]) are refused, so one node cannot read
/// another's consoles.
pub const CONSOLE_PROXY_CN: &str = "system:godwit-console-proxy";
/// The API group the operator serves through the Kubernetes API server
/// (an `APIService`, as KubeVirt serves `subresources.kubevirt.io`):
/// `GET /apis/subresources.godwit.dev/v1/namespaces/<ns>/virtualmachines/<name>/console`
/// upgraded to a WebSocket carries the VM's serial console, and
/// `.../virtualmachines/<name>/portforward/<port>` a TCP connection to that
/// port of the guest. Kubernetes RBAC `get` on `virtualmachines/console`
/// (or `virtualmachines/portforward`) in that group decides who may.
pub const SUBRESOURCES_GROUP: &str = "subresources.godwit.dev";
/// The version of [`SUBRESOURCES_GROUP`].
pub const SUBRESOURCES_VERSION: &str = "v1";
/// The `APIService` that registers [`SUBRESOURCES_GROUP`] (its `caBundle`
/// is written by the operator, whose CA signs the serving certificate).
pub const SUBRESOURCES_API_SERVICE: &str = "v1.subresources.godwit.dev";
/// The Service (in the operator's namespace) behind [`SUBRESOURCES_API_SERVICE`].
pub const SUBRESOURCES_SERVICE: &str = "godwit-api";
/// The operator's default port for [`SUBRESOURCES_GROUP`] (`--api-addr`).
pub const SUBRESOURCES_PORT: u16 = 8443;
/// The first word of a console request (and the protocol's version).
pub const CONSOLE_HELLO: &str = "GODWIT-CONSOLE/1";
/// The first word of a port-forward request on [`CONSOLE_PORT`].
pub const FORWARD_HELLO: &str = "GODWIT-FORWARD/1";
/// The node daemon's default `/metrics` port (`godwit-node --metrics-addr`).
pub const NODE_METRICS_PORT: u16 = 9411;

/// A VM as it runs: the VM's spec with its template applied, every source
/// made concrete. Written by the operator into the VM's `status.machine`
/// when it schedules the VM (so a later template change does not change a
/// VM that already runs; status, because the VM's author cannot write it).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Machine {
    /// vCPUs.
    pub cpu: u32,
    /// The `ClusterVMTemplate` the VM is made from, if any: the node allows
    /// the paths that template names (read from the API server) outside its
    /// image directories, and no others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_template: Option<String>,
    /// Guest memory in bytes.
    pub memory_bytes: u64,
    /// Kernel (PVH ELF or bzImage) on the node; empty when [`Machine::boot_image`]
    /// names where the node finds it.
    #[serde(default)]
    pub kernel: String,
    /// Boot the kernel and initrd in this image's `/boot` (`boot.fromImage`),
    /// with `root=UUID=<its root filesystem>` before [`Machine::cmdline`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_image: Option<BootImage>,
    /// Initial ramdisk on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    /// The full command line: the boot cmdline and the customization's
    /// `extraCmdline`.
    #[serde(default)]
    pub cmdline: String,
    /// The guest's hostname.
    #[serde(default)]
    pub hostname: String,
    /// Disks, in the order the guest sees them.
    #[serde(default)]
    pub disks: Vec<MachineDisk>,
    /// NICs, in the order the guest sees them.
    #[serde(default)]
    pub networks: Vec<MachineNic>,
    /// The template's image digest, when the root disk comes from a template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_digest: Option<String>,
    /// What the cloud-init NoCloud seed disk is made from, when the VM (or
    /// its template) has a customization. The agent writes the seed before
    /// each start and before a migration's target VMM starts, and attaches it
    /// read-only after [`Machine::disks`]. Absent in machines written before
    /// the seed existed.
    /// (Boxed: a machine travels inside the operator's decisions, which
    /// stay small.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<Box<MachineSeed>>,
}

/// The inputs of a VM's cloud-init NoCloud seed (see [`Machine::seed`]). The
/// same seed gives the same image bytes on every node, so a migration's
/// target rebuilds it identically instead of copying it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MachineSeed {
    /// `instance-id` in meta-data: the VM's uid, so cloud-init runs its
    /// once-per-instance modules again only for a new VM of the same name.
    pub instance_id: String,
    /// `local-hostname` in meta-data.
    pub hostname: String,
    /// Inline user-data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
    /// User-data in a Secret of the VM's namespace, read by the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data_secret_ref: Option<SecretKeyRef>,
    /// SSH public keys.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_authorized_keys: Vec<String>,
    /// Address configuration of the first NIC (matched by its MAC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkConfig>,
}

/// The image whose own `/boot` a [`Machine`] boots: the root disk's source
/// (a template image, or an image used in place).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BootImage {
    /// The image on the node.
    pub path: String,
    /// Its format.
    #[serde(default)]
    pub format: ImageFormat,
}

/// One disk of a [`Machine`].
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MachineDisk {
    /// The disk's name in the VM spec.
    pub name: String,
    /// Where its contents come from.
    pub source: MachineDiskSource,
    /// Node-local (moves with the VM) or shared (every node sees the path).
    #[serde(default)]
    pub storage: StorageKind,
    /// Attached read-only.
    #[serde(default)]
    pub read_only: bool,
}

/// Where a disk's contents come from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub enum MachineDiskSource {
    /// A copy of a template image, made on the node when the VM is provisioned.
    Clone {
        /// The template image (a path on the node).
        path: String,
        /// Its format.
        #[serde(default)]
        format: ImageFormat,
    },
    /// An existing image, used in place.
    Image {
        /// The image.
        path: String,
        /// Its format.
        #[serde(default)]
        format: ImageFormat,
    },
    /// A new empty disk.
    Blank {
        /// Its size in bytes.
        size_bytes: u64,
    },
}

impl Default for MachineDiskSource {
    fn default() -> Self {
        MachineDiskSource::Blank { size_bytes: 0 }
    }
}

/// One NIC of a [`Machine`].
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MachineNic {
    /// The network's name in the VM spec.
    pub name: String,
    /// The node bridge its tap joins.
    pub bridge: String,
    /// Its MAC (the operator makes a stable one when the spec has none).
    pub mac: String,
    /// The address the customization gives it (`10.0.0.5/24`), if static.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
}

pub use crate::node::{NodeUsage, VmUsage};

/// A stable, locally administered unicast MAC for a VM's `index`-th NIC,
/// derived from the VM's uid so it survives rescheduling and migration.
pub fn stable_mac(uid: &str, index: usize) -> String {
    // FNV-1a: small, stable across releases and platforms.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in uid.bytes().chain([index as u8]) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let b = h.to_be_bytes();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
}

/// The machine the operator resolved for `vm` when it scheduled it
/// (`status.machine`), if any and if it reads as one.
pub fn resolved_machine(vm: &VirtualMachine) -> Option<Machine> {
    let json = vm.status.as_ref()?.machine.clone()?;
    serde_json::from_value(json).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_round_trips_through_json() {
        let m = Machine {
            cpu: 2,
            memory_bytes: 256 << 20,
            kernel: "/k".into(),
            cmdline: "hb_ms=100".into(),
            disks: vec![MachineDisk {
                name: "root".into(),
                source: MachineDiskSource::Clone {
                    path: "/t.raw".into(),
                    format: ImageFormat::Raw,
                },
                storage: StorageKind::Shared,
                read_only: false,
            }],
            networks: vec![MachineNic {
                name: "default".into(),
                bridge: "godwit0".into(),
                mac: stable_mac("u", 0),
                ip: Some("10.0.0.5/24".into()),
            }],
            ..Default::default()
        };
        let json = serde_json::to_string(&m).unwrap();
        assert!(
            json.contains(r#""clone":{"path":"/t.raw","format":"raw"}"#),
            "{json}"
        );
        assert!(!json.contains("seed"), "{json}");
        assert_eq!(serde_json::from_str::<Machine>(&json).unwrap(), m);
        let seeded = Machine {
            seed: Some(Box::new(MachineSeed {
                instance_id: "uid-1".into(),
                hostname: "web".into(),
                user_data_secret_ref: Some(SecretKeyRef {
                    name: "ud".into(),
                    key: "userdata".into(),
                }),
                ..Default::default()
            })),
            ..m
        };
        let json = serde_json::to_string(&seeded).unwrap();
        assert!(
            json.contains(r#""seed":{"instanceId":"uid-1","hostname":"web","userDataSecretRef":{"name":"ud","key":"userdata"}}"#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<Machine>(&json).unwrap(), seeded);
    }

    #[test]
    fn a_machine_written_before_the_seed_still_reads() {
        let old = r#"{"cpu":1,"memoryBytes":67108864,"kernel":"/k","cmdline":"hb_ms=100 godwit.hostname=demo","hostname":"demo","disks":[],"networks":[]}"#;
        let m: Machine = serde_json::from_str(old).unwrap();
        assert_eq!(m.seed, None);
        assert_eq!(m.hostname, "demo");
        let key: SecretKeyRef = serde_json::from_str(r#"{"name":"s"}"#).unwrap();
        assert_eq!(key.key, SecretKeyRef::DEFAULT_KEY);
    }

    #[test]
    fn a_from_image_machine_round_trips_and_older_machines_still_read() {
        let m = Machine {
            cpu: 1,
            memory_bytes: 64 << 20,
            boot_image: Some(BootImage {
                path: "/images/debian.qcow2".into(),
                format: ImageFormat::Qcow2,
            }),
            ..Default::default()
        };
        let json = serde_json::to_string(&m).unwrap();
        assert!(
            json.contains(r#""bootImage":{"path":"/images/debian.qcow2","format":"qcow2"}"#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<Machine>(&json).unwrap(), m);
        let old: Machine =
            serde_json::from_str(r#"{"cpu":1,"memoryBytes":1048576,"kernel":"/k"}"#).unwrap();
        assert_eq!(old.kernel, "/k");
        assert_eq!(old.boot_image, None);
    }

    #[test]
    fn stable_macs_differ_per_nic_and_are_local_unicast() {
        let a = stable_mac("0b5c-uid", 0);
        assert_eq!(a, stable_mac("0b5c-uid", 0));
        assert_ne!(a, stable_mac("0b5c-uid", 1));
        assert!(a.starts_with("52:54:00:"), "{a}");
        assert_eq!(a.len(), 17);
    }
}
