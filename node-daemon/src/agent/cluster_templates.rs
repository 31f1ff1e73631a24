//! The paths the cluster's `ClusterVMTemplate`s name, which this node
//! allows outside its image directories ([`super::image_dirs`]): learned
//! from the API server with a watch (RBAC `list` and `watch` on
//! `clustervmtemplates`), never from a VM's spec or its resolved machine,
//! which a VM's author can write.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use futures::StreamExt;
use godwit_crds::ClusterVMTemplate;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, ResourceExt};

use super::image_dirs::TrustedPaths;

/// Keeps `trusted` equal to the paths every `ClusterVMTemplate` names,
/// until the watch ends (it retries with backoff meanwhile).
pub async fn keep_current(client: Client, trusted: TrustedPaths) {
    let api: Api<ClusterVMTemplate> = Api::all(client);
    let mut known: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut listing: Option<BTreeMap<String, Vec<String>>> = None;
    let mut events = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!("watching ClusterVMTemplates: {e}");
                continue;
            }
        };
        match event {
            Event::Init => listing = Some(BTreeMap::new()),
            Event::InitApply(t) => {
                if let Some(l) = listing.as_mut() {
                    l.insert(t.name_any(), t.node_paths());
                }
            }
            Event::InitDone => known = listing.take().unwrap_or_default(),
            Event::Apply(t) => {
                known.insert(t.name_any(), t.node_paths());
            }
            Event::Delete(t) => {
                known.remove(&t.name_any());
            }
        }
        if listing.is_none() {
            trusted.set(
                known
                    .iter()
                    .map(|(name, paths)| {
                        (
                            name.clone(),
                            paths.iter().map(PathBuf::from).collect::<BTreeSet<_>>(),
                        )
                    })
                    .collect(),
            );
        }
    }
}
