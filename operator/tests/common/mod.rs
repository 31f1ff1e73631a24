//! Helpers shared by the operator's integration tests: the in-process API
//! test server, Godwit nodes with Leases their simulated agents renew, and
//! the objects a user or an agent would write.

#![allow(dead_code)]

use std::time::Duration;

use godwit_apiserver::{serve, ApiServerHandle};
use godwit_crds::contract::{node_lease_name, NODE_LABEL};
use godwit_crds::{VMMigration, VMTemplate, VirtualMachine, VmPhase};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Namespace, Node, NodeCondition, NodeStatus};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, Config, ResourceExt};
use serde_json::json;
use tokio::net::TcpListener;

pub const NS: &str = "default";
pub const LEASE_NS: &str = "godwit-system";

pub async fn start() -> (ApiServerHandle, Client) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = serve(listener).await.unwrap();
    let client = Client::try_from(Config::new(server.url().parse().unwrap())).unwrap();
    (server, client)
}

/// CRDs, the lease namespace, and Ready Godwit nodes (4 CPUs, 4 GiB each).
pub async fn cluster(client: &Client, nodes: &[&str]) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for (_, crd) in godwit_crds::crds() {
        crds.create(&PostParams::default(), &crd).await.unwrap();
    }
    let namespace = Namespace {
        metadata: ObjectMeta {
            name: Some(LEASE_NS.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .unwrap();
    for name in nodes {
        let allocatable = [
            ("cpu".to_string(), Quantity("4".into())),
            ("memory".to_string(), Quantity("4Gi".into())),
        ]
        .into();
        let node = Node {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                labels: Some([(NODE_LABEL.to_string(), name.to_string())].into()),
                ..Default::default()
            },
            status: Some(NodeStatus {
                allocatable: Some(allocatable),
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        Api::<Node>::all(client.clone())
            .create(&PostParams::default(), &node)
            .await
            .unwrap();
    }
}

/// Renews every node's Lease each second, as the agents do.
pub fn agents_renew(client: &Client, nodes: &[&str]) -> tokio::task::JoinHandle<()> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), LEASE_NS);
    let nodes: Vec<String> = nodes.iter().map(|n| n.to_string()).collect();
    tokio::spawn(async move {
        loop {
            for node in &nodes {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(node_lease_name(node)),
                        ..Default::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(node.clone()),
                        lease_duration_seconds: Some(10),
                        renew_time: Some(MicroTime(Timestamp::now())),
                        ..Default::default()
                    }),
                };
                let params = PatchParams::apply("godwit-node").force();
                let _ = leases
                    .patch(&node_lease_name(node), &params, &Patch::Apply(&lease))
                    .await;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
}

pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    for _ in 0..300 {
        if let Some(v) = check().await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

pub async fn template(client: &Client) {
    let t: VMTemplate = serde_json::from_value(json!({
        "apiVersion": "godwit.dev/v1alpha1",
        "kind": "VMTemplate",
        "metadata": {"name": "base"},
        "spec": {
            "image": {"source": "/images/base.raw"},
            "boot": {"kernel": "/k/guest.elf", "cmdline": "hb_ms=100"},
            "cpu": 1,
            "memory": "512Mi",
            "networks": [{"name": "net0", "bridge": "godwit0"}],
        },
    }))
    .unwrap();
    Api::<VMTemplate>::namespaced(client.clone(), NS)
        .create(&PostParams::default(), &t)
        .await
        .unwrap();
}

pub async fn create_vm(client: &Client, name: &str, template: &str) {
    let vm: VirtualMachine = serde_json::from_value(json!({
        "apiVersion": "godwit.dev/v1alpha1",
        "kind": "VirtualMachine",
        "metadata": {"name": name},
        "spec": {
            "templateRef": {"name": template},
            "disks": [{"name": "root", "source": {"template": {}}, "storage": "Shared"}],
        },
    }))
    .unwrap();
    Api::<VirtualMachine>::namespaced(client.clone(), NS)
        .create(&PostParams::default(), &vm)
        .await
        .unwrap();
}

pub async fn create_migration(client: &Client, name: &str, vm: &str, target: Option<&str>) {
    let mut spec = json!({"vmName": vm});
    if let Some(t) = target {
        spec["targetNode"] = json!(t);
    }
    let m: VMMigration = serde_json::from_value(json!({
        "apiVersion": "godwit.dev/v1alpha1",
        "kind": "VMMigration",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .unwrap();
    Api::<VMMigration>::namespaced(client.clone(), NS)
        .create(&PostParams::default(), &m)
        .await
        .unwrap();
}

/// What a node agent writes into a VM's status.
pub async fn agent_sets_vm(client: &Client, name: &str, phase: VmPhase) {
    Api::<VirtualMachine>::namespaced(client.clone(), NS)
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": phase}})),
        )
        .await
        .unwrap();
}

/// What the source agent writes into a migration's status.
pub async fn agent_sets_migration(client: &Client, name: &str, status: serde_json::Value) {
    Api::<VMMigration>::namespaced(client.clone(), NS)
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status })),
        )
        .await
        .unwrap();
}

pub async fn vm(client: &Client, name: &str) -> VirtualMachine {
    Api::<VirtualMachine>::namespaced(client.clone(), NS)
        .get(name)
        .await
        .unwrap()
}

pub async fn migration(client: &Client, name: &str) -> Option<VMMigration> {
    Api::<VMMigration>::namespaced(client.clone(), NS)
        .get_opt(name)
        .await
        .unwrap()
}

pub fn node_of(vm: &VirtualMachine) -> Option<String> {
    vm.labels().get(NODE_LABEL).cloned()
}

pub fn phase_of(vm: &VirtualMachine) -> VmPhase {
    vm.status.as_ref().map(|s| s.phase).unwrap_or_default()
}

/// Waits until the VM is on a node in `phase` with no migration; its node.
pub async fn settled(client: &Client, name: &str, phase: VmPhase) -> String {
    eventually(&format!("VM {name} {phase:?} on a node"), || async {
        let v = vm(client, name).await;
        let status = v.status.clone()?;
        let node = node_of(&v)?;
        (status.phase == phase
            && status.node_name.as_deref() == Some(node.as_str())
            && status.migration.is_none())
        .then_some(node)
    })
    .await
}

/// Event reasons and notes about the object called `name`.
pub async fn events_about(client: &Client, name: &str) -> Vec<(String, String)> {
    Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), NS)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
        .collect()
}

/// Waits for an Event about `name` with `reason` whose note satisfies `note`.
pub async fn event(client: &Client, name: &str, reason: &str, note: impl Fn(&str) -> bool) {
    eventually(&format!("event {reason} about {name}"), || async {
        events_about(client, name)
            .await
            .iter()
            .any(|(r, n)| r == reason && note(n))
            .then_some(())
    })
    .await
}
