//! What every controller shares: the client, the settings, the event
//! recorder ([`Note`]), the metrics, the placement lock and the restart counts.

use std::collections::{HashMap, HashSet};
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use godwit_crds::contract::field_manager;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tracing::{debug, warn};

use crate::config::OperatorConfig;
use crate::metrics::Metrics;
use crate::restarts::{restart_delay, RESTART_RESET};

/// The reporting controller on every Event the operator writes.
pub const REPORTER: &str = "godwit-operator";

/// Shared by every reconcile.
pub struct Context {
    /// The API client.
    pub client: Client,
    /// Settings.
    pub config: OperatorConfig,
    /// Publishes Events.
    pub recorder: Recorder,
    /// Counters and gauges for `/metrics`.
    pub metrics: Arc<Metrics>,
    /// Held from reading the cluster to writing a placement or a migration's
    /// admission, so two reconciles never hand the same room (or the same
    /// migration slot) to two VMs.
    pub placement: tokio::sync::Mutex<()>,
    announced: Mutex<HashSet<String>>,
    restarts: Mutex<HashMap<String, (u32, Instant)>>,
}

/// A Normal or Warning Event the operator wants a human to see.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    /// Warning or not.
    pub warning: bool,
    /// CamelCase reason (`Scheduled`, `Migrated`).
    pub reason: &'static str,
    /// What happened, for `kubectl describe`.
    pub message: String,
}

impl Note {
    /// A Normal event.
    pub fn normal(reason: &'static str, message: impl Into<String>) -> Note {
        Note {
            warning: false,
            reason,
            message: message.into(),
        }
    }

    /// A Warning event.
    pub fn warning(reason: &'static str, message: impl Into<String>) -> Note {
        Note {
            warning: true,
            reason,
            message: message.into(),
        }
    }
}

impl Context {
    /// A context for `client` with `config`, reporting into `metrics`.
    pub fn new(client: Client, config: OperatorConfig, metrics: Arc<Metrics>) -> Context {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: REPORTER.into(),
                instance: Some(config.id.clone()),
            },
        );
        Context {
            client,
            config,
            recorder,
            metrics,
            placement: tokio::sync::Mutex::new(()),
            announced: Mutex::new(HashSet::new()),
            restarts: Mutex::new(HashMap::new()),
        }
    }

    /// Patch parameters with the operator's field manager.
    pub fn patch_params(&self) -> PatchParams {
        PatchParams {
            field_manager: Some(field_manager("operator")),
            ..Default::default()
        }
    }

    /// Merge-patches `obj`'s `metadata`, with the resourceVersion the
    /// decision was made on as precondition: a write based on a stale read
    /// fails with 409 and the decision is made again on the new version.
    pub async fn patch_metadata<K>(
        &self,
        api: &Api<K>,
        obj: &K,
        mut metadata: Value,
    ) -> Result<K, kube::Error>
    where
        K: Resource + Clone + DeserializeOwned + Debug,
    {
        metadata["resourceVersion"] = json!(obj.resource_version());
        api.patch(
            &obj.name_any(),
            &self.patch_params(),
            &Patch::Merge(json!({ "metadata": metadata })),
        )
        .await
    }

    /// Merge-patches `obj`'s status subresource, with the same precondition
    /// as [`Context::patch_metadata`]: the operator never overwrites what an
    /// agent wrote meanwhile.
    pub async fn patch_status<K>(
        &self,
        api: &Api<K>,
        obj: &K,
        status: Value,
    ) -> Result<K, kube::Error>
    where
        K: Resource + Clone + DeserializeOwned + Debug,
    {
        api.patch_status(
            &obj.name_any(),
            &self.patch_params(),
            &Patch::Merge(json!({
                "metadata": {"resourceVersion": obj.resource_version()},
                "status": status,
            })),
        )
        .await
    }

    /// Applies `condition` to `obj`'s status by server-side apply, under
    /// the operator's field manager for that condition type, so that the
    /// other conditions (the node agent's `Ready`, `Paused`) stay as their
    /// writers left them (see `godwit_crds::conditions`).
    pub async fn apply_condition<K>(
        &self,
        api: &Api<K>,
        obj: &K,
        condition: &Condition,
    ) -> Result<K, kube::Error>
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
    {
        let manager = godwit_crds::conditions::field_manager("operator", &condition.type_);
        api.patch_status(
            &obj.name_any(),
            &PatchParams::apply(&manager).force(),
            &Patch::Apply(godwit_crds::conditions::apply_config(obj, condition)),
        )
        .await
    }

    /// Publishes `note` about `regarding`; a failure is logged, not returned
    /// (an Event lost must not undo the decision it describes).
    pub async fn publish(&self, regarding: &ObjectReference, action: &str, note: &Note) {
        let event = Event {
            type_: if note.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: note.reason.into(),
            note: Some(note.message.clone()),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, regarding).await {
            warn!(
                reason = note.reason,
                object = regarding.name.as_deref().unwrap_or(""),
                "cannot publish event: {e}"
            );
        }
    }

    /// How long the VM with `uid` must wait before its next restart.
    pub fn restart_wait(&self, uid: &str) -> Duration {
        match self.restarts.lock().expect("restarts poisoned").get(uid) {
            Some((count, last)) => restart_delay(*count, last.elapsed()),
            None => Duration::ZERO,
        }
    }

    /// Records a restart of the VM with `uid`.
    pub fn restarted(&self, uid: &str) {
        let mut restarts = self.restarts.lock().expect("restarts poisoned");
        // VMs that have not restarted for a while (or are gone) are forgotten.
        restarts.retain(|_, (_, last)| last.elapsed() < RESTART_RESET);
        let entry = restarts
            .entry(uid.to_string())
            .or_insert((0, Instant::now()));
        entry.0 += 1;
        entry.1 = Instant::now();
    }

    /// True the first time `key` is seen by this process (for Events that
    /// must not repeat on every reconcile).
    pub fn first_time(&self, key: String) -> bool {
        self.announced
            .lock()
            .expect("announced set poisoned")
            .insert(key)
    }
}

/// Logs what a controller's run stream reports besides successes: watch
/// errors (the API server is unreachable, a CRD is not installed) loudly,
/// the rest (failed reconciles are logged by the error policy) quietly.
pub fn log_outcome<R, Q>(controller_name: &str, error: Option<controller::Error<R, Q>>)
where
    R: std::error::Error + 'static,
    Q: std::error::Error + 'static,
{
    match error {
        None => {}
        Some(controller::Error::QueueError(e)) => {
            warn!(controller = controller_name, "watch failed (retrying): {e}");
        }
        Some(other) => debug!(controller = controller_name, "{other}"),
    }
}
