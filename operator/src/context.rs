//! What both controllers share: the client, the settings, the event recorder,
//! the metrics, and the placement lock.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use godwit_crds::contract::field_manager;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::PatchParams;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::Client;
use tracing::warn;

use crate::config::OperatorConfig;
use crate::metrics::Metrics;

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
        }
    }

    /// Patch parameters with the operator's field manager.
    pub fn patch_params(&self) -> PatchParams {
        PatchParams {
            field_manager: Some(field_manager("operator")),
            ..Default::default()
        }
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

    /// True the first time `key` is seen by this process (for Events that
    /// must not repeat on every reconcile).
    pub fn first_time(&self, key: String) -> bool {
        self.announced
            .lock()
            .expect("announced set poisoned")
            .insert(key)
    }
}
