//! Builders for the operator's unit tests: VMs, migrations, templates, Nodes,
//! node Leases and a small cluster, written as a sentence:
//! `vm("a").on("node-1").running()`,
//! `migration("m1", "a").finalized().admitted(PreCopy, "node-1", "node-2")`.
//!
//! Every object lives in the namespace `default` with the uid `uid-<name>`;
//! the clock of a test starts at [`t0`].

use crate::reservations::CpuAllocationRatio;
use std::collections::BTreeMap;

use godwit_crds::contract::{Machine, MIGRATION_FINALIZER, NODE_LABEL};
use godwit_crds::contract::{SOURCE_LABEL, TARGET_LABEL};
use godwit_crds::template::{Customization, ImageSource, NetworkConfig};
use godwit_crds::vm::{
    Disk, DiskSource, Network, TemplateDiskSource, TemplateRef, VmAffinity, VmAffinityTerm,
};
use godwit_crds::{
    BootSpec, ImageFormat, MigrationPhase, RunStrategy, VMMigration, VMMigrationSpec,
    VMMigrationStatus, VMTemplate, VMTemplateSpec, VMTemplateStatus, VirtualMachine,
    VirtualMachineSpec, VirtualMachineStatus, VmPhase,
};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Node, NodeCondition, NodeStatus};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, MicroTime, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::ObjectMeta;

use crate::view::{ClusterView, Snapshot};

/// The moment a test's clock starts.
pub fn t0() -> Timestamp {
    Timestamp::from_second(1_700_000_000).unwrap()
}

/// `seconds` after [`t0`].
pub fn at(seconds: i64) -> Timestamp {
    Timestamp::from_second(1_700_000_000 + seconds).unwrap()
}

/// A VM from template `base`, not yet placed and without a status.
pub fn vm(name: &str) -> VirtualMachine {
    VirtualMachine {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            uid: Some(format!("uid-{name}")),
            generation: Some(1),
            ..Default::default()
        },
        spec: VirtualMachineSpec {
            template_ref: Some(TemplateRef {
                name: "base".into(),
                ..Default::default()
            }),
            ..Default::default()
        },
        status: None,
    }
}

/// What a test says about a VM.
pub trait VmFixture: Sized {
    /// Placed on `node` (label and `nodeName`), resolved as 1 vCPU and
    /// 1 GiB unless [`sized`](VmFixture::sized) says otherwise.
    fn on(self, node: &str) -> Self;
    /// Resolved as `cpu` vCPUs and `mem_gi` GiB.
    fn sized(self, cpu: u32, mem_gi: u64) -> Self;
    /// In `phase`.
    fn phase(self, phase: VmPhase) -> Self;
    /// `Running`.
    fn running(self) -> Self {
        self.phase(VmPhase::Running)
    }
    /// `Migrating`, moved by the VMMigration `migration`.
    fn migrating(self, migration: &str) -> Self;
    /// With the label `key=value`.
    fn label(self, key: &str, value: &str) -> Self;
    /// With `runStrategy`.
    fn run_strategy(self, strategy: RunStrategy) -> Self;
    /// With `restartPriority`.
    fn restart_priority(self, priority: i32) -> Self;
    /// With one disk `root` taken from its template.
    fn template_disk(self) -> Self;
}

impl VmFixture for VirtualMachine {
    fn on(mut self, node: &str) -> Self {
        self = self.label(NODE_LABEL, node);
        let resolved = self.status.as_ref().is_some_and(|s| s.machine.is_some());
        if !resolved {
            self = self.sized(1, 1);
        }
        self.status.get_or_insert_with(Default::default).node_name = Some(node.into());
        self
    }

    fn sized(mut self, cpu: u32, mem_gi: u64) -> Self {
        let machine = Machine {
            cpu,
            memory_bytes: mem_gi << 30,
            kernel: "/k".into(),
            ..Default::default()
        };
        self.status.get_or_insert_with(Default::default).machine =
            Some(serde_json::to_value(&machine).unwrap());
        self
    }

    fn phase(mut self, phase: VmPhase) -> Self {
        self.status
            .get_or_insert_with(VirtualMachineStatus::default)
            .phase = phase;
        self
    }

    fn migrating(mut self, migration: &str) -> Self {
        self = self.phase(VmPhase::Migrating);
        self.status.as_mut().unwrap().migration = Some(migration.into());
        self
    }

    fn label(mut self, key: &str, value: &str) -> Self {
        self.metadata
            .labels
            .get_or_insert_with(Default::default)
            .insert(key.into(), value.into());
        self
    }

    fn run_strategy(mut self, strategy: RunStrategy) -> Self {
        self.spec.run_strategy = strategy;
        self
    }

    fn restart_priority(mut self, priority: i32) -> Self {
        self.spec.restart_priority = Some(priority);
        self
    }

    fn template_disk(mut self) -> Self {
        self.spec.disks = vec![Disk {
            name: "root".into(),
            source: DiskSource {
                template: Some(TemplateDiskSource {}),
                ..Default::default()
            },
            ..Default::default()
        }];
        self
    }
}

/// A term that selects the VMs labelled `app=<app>`.
pub fn app_term(app: &str) -> VmAffinityTerm {
    VmAffinityTerm {
        label_selector: LabelSelector {
            match_labels: Some([("app".to_string(), app.to_string())].into()),
            ..Default::default()
        },
    }
}

/// Anti-affinity: apart from every VM labelled `app=<app>`.
pub fn apart_from(app: &str) -> VmAffinity {
    VmAffinity {
        vm_anti_affinity: vec![app_term(app)],
        ..Default::default()
    }
}

/// A migration of the VM `vm`, without a status.
pub fn migration(name: &str, vm: &str) -> VMMigration {
    VMMigration {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            uid: Some(format!("uid-{name}")),
            ..Default::default()
        },
        spec: VMMigrationSpec {
            vm_name: vm.into(),
            ..Default::default()
        },
        status: None,
    }
}

/// What a test says about a migration.
pub trait MigrationFixture: Sized {
    /// Carrying the operator's finalizer.
    fn finalized(self) -> Self;
    /// With `status`.
    fn with_status(self, status: VMMigrationStatus) -> Self;
    /// In `phase` (nothing else in its status).
    fn phase(self, phase: MigrationPhase) -> Self {
        self.with_status(VMMigrationStatus {
            phase,
            ..Default::default()
        })
    }
    /// Admitted at [`t0`] from `source` to `target` (status and labels), now
    /// in `phase`.
    fn admitted(self, phase: MigrationPhase, source: &str, target: &str) -> Self;
}

impl MigrationFixture for VMMigration {
    fn finalized(mut self) -> Self {
        self.metadata.finalizers = Some(vec![MIGRATION_FINALIZER.into()]);
        self
    }

    fn with_status(mut self, status: VMMigrationStatus) -> Self {
        self.status = Some(status);
        self
    }

    fn admitted(mut self, phase: MigrationPhase, source: &str, target: &str) -> Self {
        self.status = Some(VMMigrationStatus {
            phase,
            source_node: Some(source.into()),
            target_node: Some(target.into()),
            start_time: Some(Time(t0())),
            ..Default::default()
        });
        self.metadata.labels = Some(
            [
                (SOURCE_LABEL.to_string(), source.to_string()),
                (TARGET_LABEL.to_string(), target.to_string()),
            ]
            .into(),
        );
        self
    }
}

/// Template `base`: 1 vCPU, 1 GiB, a qcow2 image, one NIC with a static
/// address.
pub fn template() -> VMTemplate {
    VMTemplate {
        metadata: ObjectMeta {
            name: Some("base".into()),
            namespace: Some("default".into()),
            ..Default::default()
        },
        spec: VMTemplateSpec {
            image: ImageSource {
                source: "/images/base.qcow2".into(),
                sha256: None,
                format: ImageFormat::Qcow2,
            },
            boot: Some(BootSpec {
                kernel: Some("/k/guest.elf".into()),
                initrd: None,
                from_image: None,
                cmdline: Some("hb_ms=100".into()),
            }),
            cpu: Some(1),
            memory: Some("1Gi".into()),
            networks: vec![Network {
                name: "net0".into(),
                bridge: "godwit0".into(),
                mac: None,
            }],
            customization: Some(Customization {
                network: Some(NetworkConfig {
                    address: Some("10.0.0.5/24".into()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        },
        status: Some(VMTemplateStatus {
            image_digest: Some("sha256:abc".into()),
            ..Default::default()
        }),
    }
}

/// A Ready Godwit Node with `cpu` CPUs and `mem_gi` GiB allocatable.
pub fn node(name: &str, cpu: u32, mem_gi: u64) -> Node {
    let alloc: BTreeMap<String, Quantity> = [
        ("cpu".to_string(), Quantity(cpu.to_string())),
        ("memory".to_string(), Quantity(format!("{mem_gi}Gi"))),
    ]
    .into();
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some([(NODE_LABEL.to_string(), name.to_string())].into()),
            ..Default::default()
        },
        status: Some(NodeStatus {
            allocatable: Some(alloc),
            conditions: Some(vec![NodeCondition {
                type_: "Ready".into(),
                status: "True".into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A node Lease renewed at `renewed`, lasting `seconds`.
pub fn lease(node: &str, renewed: Timestamp, seconds: i32) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some(godwit_crds::contract::node_lease_name(node)),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(node.into()),
            renew_time: Some(MicroTime(renewed)),
            lease_duration_seconds: Some(seconds),
            ..Default::default()
        }),
    }
}

/// The view at [`t0`] of `nodes`, each renewed at [`t0`] for 10 s, with
/// `vms` and `migrations`.
pub fn view_of(
    nodes: Vec<Node>,
    vms: Vec<VirtualMachine>,
    migrations: Vec<VMMigration>,
) -> ClusterView {
    let leases = nodes
        .iter()
        .map(|n| lease(n.metadata.name.as_deref().unwrap(), t0(), 10))
        .collect();
    let snapshot = Snapshot {
        nodes,
        leases,
        vms,
        migrations,
        pods: Vec::new(),
        godwit_nodes: Vec::new(),
    };
    ClusterView::build(&snapshot, t0(), CpuAllocationRatio::default())
}

/// Three ready 4-CPU 4-GiB nodes `node-1` .. `node-3` with `vms` and
/// `migrations`, seen at [`t0`].
pub fn cluster(vms: Vec<VirtualMachine>, migrations: Vec<VMMigration>) -> ClusterView {
    let nodes = ["node-1", "node-2", "node-3"]
        .iter()
        .map(|n| node(n, 4, 4))
        .collect();
    view_of(nodes, vms, migrations)
}
