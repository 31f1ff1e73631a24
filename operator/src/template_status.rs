//! Each VMTemplate's status, from what the node agents report of their
//! template caches (`status.cachedImages` of each `GodwitNode`:
//! `{"<image source>": "sha256:<hex>"}`):
//! `cachedNodes` (the nodes whose cache holds the template's image),
//! `imageDigest` (the digest they report), and `Ready` (True once a node
//! has it, with a matching digest when the template names a `sha256`).
//!
//! A node caches a template's image when the first VM from it starts there;
//! until then `Ready` is False with reason `NotCached`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use godwit_crds::{GodwitNode, VMTemplate, VMTemplateStatus};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::ResourceExt;
use serde_json::json;
use tracing::warn;

use crate::conditions::{self, Wanted};
use crate::context::{log_outcome, Context};

/// The status `template` should show, given the cluster's GodwitNodes,
/// at `now`.
pub fn status_of(template: &VMTemplate, nodes: &[GodwitNode], now: Timestamp) -> VMTemplateStatus {
    let source = &template.spec.image.source;
    let mut digests: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for node in nodes {
        let cached = node.status.as_ref().map(|s| &s.cached_images);
        if let Some(digest) = cached.and_then(|c| c.get(source)) {
            digests
                .entry(digest.clone())
                .or_default()
                .push(node.name_any());
        }
    }
    let expected = template
        .spec
        .image
        .sha256
        .as_ref()
        .map(|h| format!("sha256:{h}"));
    // The digest most nodes report (a file changed in place is cached
    // again under its new digest, node by node).
    let newest = digests
        .iter()
        .max_by_key(|(_, nodes)| nodes.len())
        .map(|(d, _)| d.clone());
    let mut cached_nodes: Vec<String> = newest
        .as_ref()
        .map(|d| digests[d].clone())
        .unwrap_or_default();
    cached_nodes.sort();
    let wanted = match (&newest, &expected) {
        (None, _) => Wanted::no(
            "Ready",
            "NotCached",
            format!("no node has cached {source} yet; a node caches it when the first VM from this template starts there"),
        ),
        (Some(d), Some(e)) if d != e => Wanted::no(
            "Ready",
            "DigestMismatch",
            format!("the nodes cached {source} as {d}, but spec.image.sha256 says {e}"),
        ),
        (Some(d), _) => Wanted::yes(
            "Ready",
            "Cached",
            format!("{d} cached on {} node(s)", cached_nodes.len()),
        ),
    };
    let old = template.status.clone().unwrap_or_default();
    VMTemplateStatus {
        conditions: conditions::merge(&old.conditions, &wanted, template.metadata.generation, now),
        image_digest: newest,
        cached_nodes,
        observed_generation: template.metadata.generation,
    }
}

/// Keeps every VMTemplate's status up to date until the watches end.
pub async fn run(ctx: Arc<Context>) {
    let client = ctx.client.clone();
    let controller = Controller::new(
        Api::<VMTemplate>::all(client.clone()),
        watcher::Config::default(),
    );
    let store = controller.store();
    // A node's cache report may change any template's status.
    let all = move |_: GodwitNode| {
        store
            .state()
            .iter()
            .map(|t| ObjectRef::from_obj(t.as_ref()))
            .collect::<Vec<_>>()
    };
    controller
        .watches(
            Api::<GodwitNode>::namespaced(client, &ctx.config.lease_namespace),
            watcher::Config::default(),
            all,
        )
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            log_outcome("template", result.err());
        })
        .await;
}

fn error_policy(t: Arc<VMTemplate>, error: &kube::Error, _: Arc<Context>) -> Action {
    warn!(template = %t.name_any(), "cannot write the template's status: {}", godwit_crds::error_chain(error));
    Action::requeue(Duration::from_secs(5))
}

async fn reconcile(t: Arc<VMTemplate>, ctx: Arc<Context>) -> Result<Action, kube::Error> {
    let nodes = Api::<GodwitNode>::namespaced(ctx.client.clone(), &ctx.config.lease_namespace)
        .list(&ListParams::default())
        .await?
        .items;
    let wanted = status_of(&t, &nodes, Timestamp::now());
    let old = t.status.clone().unwrap_or_default();
    if wanted != old {
        let api: Api<VMTemplate> =
            Api::namespaced(ctx.client.clone(), &t.namespace().unwrap_or_default());
        api.patch_status(
            &t.name_any(),
            &ctx.patch_params(),
            &Patch::Merge(json!({ "status": wanted })),
        )
        .await?;
    }
    Ok(Action::requeue(ctx.config.requeue * 12))
}

#[cfg(test)]
mod tests {
    use super::*;
    use godwit_crds::{ImageSource, VMTemplateSpec};

    fn template(sha: Option<&str>) -> VMTemplate {
        let mut t = VMTemplate::new(
            "base",
            VMTemplateSpec {
                image: ImageSource {
                    source: "/images/base.raw".into(),
                    sha256: sha.map(String::from),
                    ..Default::default()
                },
                ..Default::default()
            },
        );
        t.metadata.generation = Some(3);
        t
    }

    fn node(name: &str, cached: &[(&str, &str)]) -> GodwitNode {
        let mut n = GodwitNode::new(name, Default::default());
        n.status = Some(godwit_crds::GodwitNodeStatus {
            cached_images: cached
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        });
        n
    }

    fn ready(s: &VMTemplateStatus) -> (&str, &str) {
        let c = s.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        (c.status.as_str(), c.reason.as_str())
    }

    #[test]
    fn the_status_says_which_nodes_cache_the_image_and_its_digest() {
        let now = Timestamp::from_second(1_700_000_000).unwrap();
        let none = status_of(&template(None), &[node("n1", &[])], now);
        assert_eq!(ready(&none), ("False", "NotCached"));
        assert_eq!(none.image_digest, None);

        let nodes = [
            node("n2", &[("/images/base.raw", "sha256:aa")]),
            node(
                "n1",
                &[("/images/base.raw", "sha256:aa"), ("/other", "sha256:bb")],
            ),
            node("n3", &[("/other", "sha256:bb")]),
        ];
        let s = status_of(&template(None), &nodes, now);
        assert_eq!(ready(&s), ("True", "Cached"));
        assert_eq!(s.image_digest.as_deref(), Some("sha256:aa"));
        assert_eq!(s.cached_nodes, ["n1", "n2"]);
        assert_eq!(s.observed_generation, Some(3));

        let wrong = status_of(&template(Some("cc")), &nodes, now);
        assert_eq!(ready(&wrong), ("False", "DigestMismatch"));
        let right = status_of(&template(Some("aa")), &nodes, now);
        assert_eq!(ready(&right), ("True", "Cached"));
    }
}
