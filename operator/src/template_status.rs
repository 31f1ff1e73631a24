//! Each VMTemplate's and ClusterVMTemplate's status, from what the node agents report of their
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
use godwit_crds::{ClusterVMTemplate, GodwitNode, VMTemplate, VMTemplateSpec, VMTemplateStatus};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::json;
use tracing::warn;

use crate::conditions::{self, Wanted};
use crate::context::{log_outcome, Context};

/// A kind of template whose status this module writes.
trait Template:
    Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static
{
    /// Its spec and its status.
    fn parts(&self) -> (&VMTemplateSpec, Option<&VMTemplateStatus>);
    /// The API of this kind where `namespace` (if any) holds it.
    fn api(client: Client, namespace: Option<String>) -> Api<Self>;
}

impl Template for VMTemplate {
    fn parts(&self) -> (&VMTemplateSpec, Option<&VMTemplateStatus>) {
        (&self.spec, self.status.as_ref())
    }
    fn api(client: Client, namespace: Option<String>) -> Api<Self> {
        match namespace {
            Some(ns) => Api::namespaced(client, &ns),
            None => Api::all(client),
        }
    }
}

impl Template for ClusterVMTemplate {
    fn parts(&self) -> (&VMTemplateSpec, Option<&VMTemplateStatus>) {
        (&self.spec.template, self.status.as_ref())
    }
    fn api(client: Client, _: Option<String>) -> Api<Self> {
        Api::all(client)
    }
}

/// The status `template` should show, given the cluster's GodwitNodes,
/// at `now`.
pub fn status_of(template: &VMTemplate, nodes: &[GodwitNode], now: Timestamp) -> VMTemplateStatus {
    status_for(template, nodes, now)
}

fn status_for<T: Template>(template: &T, nodes: &[GodwitNode], now: Timestamp) -> VMTemplateStatus {
    let (spec, status) = template.parts();
    let source = &spec.image.source;
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
    let expected = spec.image.sha256.as_ref().map(|h| format!("sha256:{h}"));
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
    let old = status.cloned().unwrap_or_default();
    let generation = template.meta().generation;
    VMTemplateStatus {
        conditions: conditions::merge(&old.conditions, &wanted, generation, now),
        image_digest: newest,
        cached_nodes,
        observed_generation: generation,
    }
}

/// Keeps every VMTemplate's and ClusterVMTemplate's status up to date
/// until the watches end.
pub async fn run(ctx: Arc<Context>) {
    futures::join!(
        keep::<VMTemplate>(ctx.clone()),
        keep::<ClusterVMTemplate>(ctx)
    );
}

async fn keep<T: Template>(ctx: Arc<Context>) {
    let client = ctx.client.clone();
    let controller = Controller::new(T::api(client.clone(), None), watcher::Config::default());
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
        .run(reconcile::<T>, error_policy::<T>, ctx)
        .for_each(|result| async move {
            log_outcome("template", result.err());
        })
        .await;
}

fn error_policy<T: Template>(t: Arc<T>, error: &kube::Error, _: Arc<Context>) -> Action {
    warn!(template = %t.name_any(), "cannot write the template's status: {}", godwit_crds::error_chain(error));
    Action::requeue(Duration::from_secs(5))
}

async fn reconcile<T: Template>(t: Arc<T>, ctx: Arc<Context>) -> Result<Action, kube::Error> {
    let nodes = Api::<GodwitNode>::namespaced(ctx.client.clone(), &ctx.config.lease_namespace)
        .list(&ListParams::default())
        .await?
        .items;
    let wanted = status_for(t.as_ref(), &nodes, Timestamp::now());
    let old = t.parts().1.cloned().unwrap_or_default();
    if wanted != old {
        let api = T::api(ctx.client.clone(), t.namespace());
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

        // A ClusterVMTemplate's status comes the same way.
        let mut cluster = ClusterVMTemplate::new(
            "base",
            godwit_crds::ClusterVMTemplateSpec {
                template: template(None).spec,
            },
        );
        cluster.metadata.generation = Some(2);
        let s = status_for(&cluster, &nodes, now);
        assert_eq!(ready(&s), ("True", "Cached"));
        assert_eq!(s.image_digest.as_deref(), Some("sha256:aa"));
        assert_eq!(s.observed_generation, Some(2));
    }
}
