//! What the local cluster's API server gets besides the CRDs, so that it
//! acts as a cluster with the chart installed does:
//! - Nodes as kubelets register them ([`node_object`]);
//! - the chart's objects the API server itself acts on: the node
//!   restriction (ValidatingAdmissionPolicy and binding), the console's
//!   `APIService` and the Services (the aggregation layer proxies to
//!   `godwit-api`), and the ClusterRoles (namespace users get Godwit's
//!   rights through `view`/`edit`/`admin`, which the aggregation layer
//!   checks);
//! - what Kubernetes' bootstrap policy stores: the
//!   `extension-apiserver-authentication-reader` Role the chart binds the
//!   operator to, the `view`/`edit`/`admin` ClusterRoles, and
//!   `cluster-admin` for the local cluster's administrator;
//! - the `EndpointSlice` of `godwit-api`, as the endpoints controller
//!   writes it for the operator pod: here the host end of a forwarder to the
//!   operator in the client namespace (`LocalCluster::start_godwit`).
//!
//! Each is stored with `kubectl apply --server-side`, through the
//! cluster's `kubectl` (`Kubectl`), into files under the cluster's directory.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Output;

use std::collections::BTreeMap;

use godwit_crds::contract::{DEFAULT_LEASE_NAMESPACE, NODE_LABEL, SUBRESOURCES_SERVICE};
use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeCondition, NodeStatus};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use serde_json::{json, Value};

/// Runs `kubectl` against the cluster as its administrator.
pub type Kubectl<'a> = &'a dyn Fn(&[&str]) -> std::io::Result<Output>;

/// The bootstrap policy objects this server lacks (see the module docs).
fn bootstrap_policy(admin: &str) -> Vec<Value> {
    let mut objects = godwit_apiserver::rbac::kubernetes_user_roles();
    objects.push(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": "cluster-admin"},
        "rules": [
            {"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]},
            {"nonResourceURLs": ["*"], "verbs": ["*"]},
        ],
    }));
    objects.push(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": "local-cluster-admin"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
        "subjects": [{"kind": "User", "name": admin}],
    }));
    objects
}

/// `kubectl apply --server-side` of `stream` (YAML documents) as the
/// administrator; `what` names it in errors.
fn apply(kubectl: Kubectl, dir: &Path, what: &str, stream: &str) -> Result<(), String> {
    let file = dir.join(format!("{what}.yaml"));
    std::fs::write(&file, stream).map_err(|e| format!("{what}: write {}: {e}", file.display()))?;
    let out = kubectl(&["apply", "--server-side", "-f", &file.display().to_string()])
        .map_err(|e| format!("{what}: kubectl: {e}"))?;
    if !out.status.success() {
        return Err(format!("{what}: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(())
}

/// Stores the chart's node restriction, console `APIService` and Services,
/// and the bootstrap policy with `admin` as the administrator.
pub fn install(kubectl: Kubectl, dir: &Path, admin: &str) -> Result<(), String> {
    let chart = crate::helm::chart_objects(&[
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
        "APIService",
        "Service",
        "ClusterRole",
    ])
    .map_err(|e| format!("render the chart: {e}"))?;
    apply(kubectl, dir, "chart-objects", &chart)?;
    let policy: Vec<String> = bootstrap_policy(admin)
        .iter()
        .map(Value::to_string)
        .collect();
    apply(kubectl, dir, "bootstrap-policy", &policy.join("\n---\n"))
}

/// Writes the `EndpointSlice` of the console API's Service: `addr`, on the
/// port the Service's `api` port targets.
pub fn publish_console_api(kubectl: Kubectl, dir: &Path, addr: SocketAddr) -> Result<(), String> {
    let slice = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{SUBRESOURCES_SERVICE}-local"),
            "namespace": DEFAULT_LEASE_NAMESPACE,
            "labels": {"kubernetes.io/service-name": SUBRESOURCES_SERVICE},
        },
        "addressType": "IPv4",
        "ports": [{"name": "api", "port": addr.port(), "protocol": "TCP"}],
        "endpoints": [{"addresses": [addr.ip().to_string()], "conditions": {"ready": true}}],
    });
    apply(kubectl, dir, "console-api-endpoints", &slice.to_string())
}

/// A Ready Node with Godwit's label, its address and its VM capacity.
pub fn node_object(name: &str, ip: &str, cpu: u32, memory_mib: u64) -> Node {
    let capacity: BTreeMap<String, Quantity> = [
        ("cpu".to_string(), Quantity(cpu.to_string())),
        ("memory".to_string(), Quantity(format!("{memory_mib}Mi"))),
    ]
    .into();
    Node {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_string()),
            labels: Some([(NODE_LABEL.to_string(), name.to_string())].into()),
            ..Default::default()
        },
        status: Some(NodeStatus {
            addresses: Some(vec![NodeAddress {
                type_: "InternalIP".into(),
                address: ip.into(),
            }]),
            capacity: Some(capacity.clone()),
            allocatable: Some(capacity),
            conditions: Some(vec![NodeCondition {
                type_: "Ready".into(),
                status: "True".into(),
                reason: Some("GodwitLocal".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}
