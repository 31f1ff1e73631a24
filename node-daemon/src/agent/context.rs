//! What every part of the agent shares during a pass: its configuration,
//! the API client and event recorder, how it runs VMMs, the objects its
//! watches keep, and what it remembers between passes.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use godwit_crds::{VMMigration, VirtualMachine};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::Store;
use kube::{Client, Resource, ResourceExt};

use super::config::AgentConfig;
use super::lease::LeaseHealth;
use super::vm_dir::VmDir;
use super::vmm_process::{Children, Runner};
use crate::migration::progress::ProgressHandle;

/// The agent's state.
pub struct Agent {
    /// How it runs.
    pub cfg: AgentConfig,
    /// The API server.
    pub client: Client,
    /// Publishes Events as `godwit-node` on this node.
    pub recorder: Recorder,
    /// How it starts VMMs.
    pub runner: Runner,
    /// The VMs labelled for this node.
    pub vms: Store<VirtualMachine>,
    /// The migrations whose source is this node.
    pub outgoing: Store<VMMigration>,
    /// The migrations whose target is this node.
    pub incoming: Store<VMMigration>,
    /// The VMMs this agent started, to reap.
    pub children: Mutex<Children>,
    /// When each migration's progress was last written.
    pub reported: Mutex<HashMap<String, Instant>>,
    /// Outgoing migrations whose post-copy link is lost (the VMM redials).
    pub reconnecting: Mutex<HashSet<String>>,
    /// The uids of the migrations this agent has ended: a pass that still
    /// sees one unfinished (its store not yet updated) neither ends it
    /// again nor counts it twice.
    pub ended: Mutex<HashSet<String>>,
    /// Cold migrations this agent sends or receives, by role and migration.
    pub cold: Mutex<HashMap<String, Arc<ColdTask>>>,
    /// Whether the node's Lease is renewed.
    pub lease: Arc<LeaseHealth>,
}

/// A cold migration this agent takes part in (it runs on its own thread).
pub struct ColdTask {
    /// Its figures, as the engine updates them.
    pub progress: Arc<ProgressHandle>,
    /// Set to make it stop.
    pub cancel: Arc<AtomicBool>,
}

impl Agent {
    /// The Ready condition's message of a VM that runs here.
    pub fn running_message(&self) -> String {
        format!("running on {}", self.cfg.node)
    }

    /// Whether the node is fenced: a fenced node decides nothing, what it
    /// knows may be stale.
    pub fn fenced(&self) -> bool {
        self.lease.fenced()
    }

    /// The directories of VM `namespace/name` on this node.
    pub fn dir(&self, namespace: &str, name: &str) -> VmDir {
        VmDir::new(&self.cfg.state_dir, &self.cfg.shared_dir, namespace, name)
    }

    /// The VM migration `m` moves, as this node's watch has it.
    pub fn vm_of(&self, m: &VMMigration) -> Option<Arc<VirtualMachine>> {
        self.vms
            .state()
            .into_iter()
            .find(|v| v.namespace() == m.namespace() && v.name_any() == m.spec.vm_name)
    }

    /// Publishes an Event about `obj` (a failure is only logged).
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &obj.object_ref(&())).await {
            tracing::debug!(error = %e, "cannot publish event");
        }
    }
}

/// Applies `condition` to VM `vm`'s status by server-side apply, under the
/// node agent's field manager for that condition type, so that the
/// operator's conditions (`Scheduled`) and the agent's others stay as they
/// are (see `godwit_crds::conditions`). Its transition time is kept when
/// its status is unchanged.
pub async fn apply_condition(
    api: &Api<VirtualMachine>,
    vm: &VirtualMachine,
    condition: Condition,
) -> Result<VirtualMachine, kube::Error> {
    let current = vm
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let condition = godwit_crds::conditions::keep_transition_time(condition, current);
    let manager = godwit_crds::conditions::field_manager("node", &condition.type_);
    api.patch_status(
        &vm.name_any(),
        &PatchParams::apply(&manager).force(),
        &Patch::Apply(godwit_crds::conditions::apply_config(vm, &condition)),
    )
    .await
}

/// Now, as a status timestamp.
pub fn now_time() -> Time {
    Time(Timestamp::now())
}

/// `namespace/name`.
pub fn key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}
