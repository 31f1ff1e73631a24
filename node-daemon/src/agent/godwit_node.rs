//! The node's `GodwitNode` (see `godwit_crds::node`): the agent makes it
//! once, owned by its Node, and applies its status, the capacity at start
//! ([`publish_capacity`]) and the usage and cached images every period
//! (`super::usage`). Each part is applied under a field manager of its own,
//! so neither write removes the other's fields.

use godwit_crds::contract::{field_manager, NODE_LABEL};
use godwit_crds::{GodwitNode, GodwitNodeSpec};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, Resource};
use serde_json::{json, Value};

use super::config::AgentConfig;

/// Makes node `cfg.node`'s GodwitNode when it is missing, owned by its
/// Node so that it goes when the Node goes.
pub async fn ensure(client: &Client, cfg: &AgentConfig) -> Result<(), kube::Error> {
    let api: Api<GodwitNode> = Api::namespaced(client.clone(), &cfg.lease_namespace);
    if api.get_opt(&cfg.node).await?.is_some() {
        return Ok(());
    }
    let node = Api::<Node>::all(client.clone()).get(&cfg.node).await?;
    let owner = OwnerReference {
        api_version: "v1".into(),
        kind: "Node".into(),
        name: cfg.node.clone(),
        uid: node.metadata.uid.unwrap_or_default(),
        ..Default::default()
    };
    let object = GodwitNode {
        metadata: ObjectMeta {
            name: Some(cfg.node.clone()),
            namespace: Some(cfg.lease_namespace.clone()),
            labels: Some([(NODE_LABEL.to_string(), cfg.node.clone())].into()),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: GodwitNodeSpec {},
        status: None,
    };
    match api.create(&PostParams::default(), &object).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Applies `status` (some fields of `GodwitNodeStatus`) to node `node`'s
/// GodwitNode in `namespace`, under the agent's field manager for `part`.
pub async fn apply_status(
    client: &Client,
    namespace: &str,
    node: &str,
    part: &str,
    status: Value,
) -> Result<(), kube::Error> {
    let api: Api<GodwitNode> = Api::namespaced(client.clone(), namespace);
    let config = json!({
        "apiVersion": GodwitNode::api_version(&()),
        "kind": GodwitNode::kind(&()),
        "metadata": {"name": node},
        "status": status,
    });
    let manager = format!("{}/{part}", field_manager("node"));
    api.patch_status(
        node,
        &PatchParams::apply(&manager).force(),
        &Patch::Apply(config),
    )
    .await?;
    Ok(())
}

/// Makes the node's GodwitNode if needed and writes the capacity it
/// offers VMs; whether it could (the pass loop tries again until it could).
pub async fn publish_capacity(client: &Client, cfg: &AgentConfig) -> bool {
    let capacity = json!({"capacity": {
        "cpu": cfg.cpu,
        "memory": godwit_crds::format_quantity(cfg.memory_bytes),
    }});
    let written = async {
        ensure(client, cfg).await?;
        apply_status(
            client,
            &cfg.lease_namespace,
            &cfg.node,
            "capacity",
            capacity,
        )
        .await
    };
    match written.await {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "cannot publish capacity in GodwitNode {}", cfg.node);
            false
        }
    }
}
