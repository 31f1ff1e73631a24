//! What the node offers VMs: its capacity, published as annotations on its
//! Node for the operator's placement.

use godwit_crds::contract;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use kube::Client;
use serde_json::json;

use super::config::AgentConfig;

/// Writes the node's VM capacity into annotations on its Node; whether it
/// could (the pass loop tries again until it could).
pub async fn publish(client: &Client, cfg: &AgentConfig) -> bool {
    let nodes: Api<Node> = Api::all(client.clone());
    let patch = json!({"metadata": {"annotations": {
        contract::CAPACITY_CPU_ANNOTATION: cfg.cpu.to_string(),
        contract::CAPACITY_MEMORY_ANNOTATION: cfg.memory_bytes.to_string(),
    }}});
    match nodes
        .patch(&cfg.node, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(error = %e, "cannot publish capacity on Node {}", cfg.node);
            false
        }
    }
}
