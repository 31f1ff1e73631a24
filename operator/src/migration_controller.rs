//! The VMMigration controller: admits migrations, picks their target, keeps
//! them within the concurrency limits and the completion timeout, and moves
//! the VM when they end. The node agents do the moving itself.
//!
//! ```mermaid
//! stateDiagram-v2
//!     [*] --> Pending
//!     Pending --> Failed: invalid (operator)
//!     Pending --> Pending: no slot, or VM not there or not running yet (Admitted=False WaitingForSlot / WaitingForVM)
//!     Pending --> Cancelled: deleted or cancel annotation (operator)
//!     Pending --> PreparingTarget: admitted, target chosen (operator)
//!     PreparingTarget --> Failed: no targetAddress in 60 s (operator)
//!     PreparingTarget --> PreCopy: source agent
//!     PreparingTarget --> StopAndCopy: source agent (Cold: a stopped VM's disks)
//!     StopAndCopy --> Succeeded: source agent, via Committing (Cold: target verified)
//!     PreCopy --> Succeeded: source agent, via StopAndCopy/PostCopy, Committing
//!     PreCopy --> Failed: source agent
//!     PreCopy --> Cancelled: source agent (cancel asked or timeout)
//!     Succeeded --> [*]: VM moved to target (operator)
//!     Failed --> [*]: VM stays on source (operator)
//!     Cancelled --> [*]: VM stays on source (operator)
//! ```
//!
//! What the operator writes (see [`godwit_crds::contract`]):
//! - on a new migration: the finalizer [`MIGRATION_FINALIZER`]; then either
//!   `Pending` with `Admitted=False WaitingForVM` while its VM does not exist
//!   or is still starting (manifests applied together, up to the default
//!   completion timeout after the migration's creation), or
//!   `Failed` with `failureReason` (VM missing, not running, not migratable,
//!   already migrating, no target; for `Cold` mode: VM not stopped, or a
//!   `runStrategy` that would start it), or `Pending` with
//!   `Admitted=False WaitingForSlot` (over `--max-migrations-per-node` or
//!   `--max-migrations-per-cluster`), or the admission: the VM's status
//!   `Migrating` + `migration` (a cold migration's stopped VM keeps its
//!   phase and gets only `migration`), then `PreparingTarget` with `sourceNode`,
//!   `targetNode`, `startTime`, then the labels [`SOURCE_LABEL`] and
//!   [`TARGET_LABEL`] that hand it to the agents;
//! - while it runs: the annotation [`CANCEL_ANNOTATION`] once the completion
//!   timeout (plus 30 s grace) has passed, and `Failed` when the target has
//!   not published `targetAddress` 60 s after the start;
//! - when it is final: the VM's label and `nodeName` (the target on
//!   `Succeeded`, the source otherwise), its phase back to `Running` (a
//!   cold migration's VM stays `Stopped`), its
//!   `migration` cleared; then the finalizer goes.
//!
//! Cancelling (delete, or the annotation): before `PreparingTarget` the
//! operator writes `Cancelled`; from then on the source agent cancels and
//! writes the final phase. A deleted migration whose source node has been
//! gone for a lease duration more is failed by the operator so that its
//! finalizer can go.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use godwit_crds::contract::{
    CANCEL_ANNOTATION, MIGRATION_FINALIZER, NODE_LABEL, NODE_LEASE_SECONDS, SOURCE_LABEL,
    TARGET_LABEL,
};
use godwit_crds::{
    MigrationMode, MigrationPhase, MigrationPolicy, RunStrategy, StorageKind, StorageMode,
    VMMigration, VirtualMachine, VmPhase,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::{debug, info, warn};

use crate::conditions::{self, Wanted};
use crate::config::MigrationLimits;
use crate::context::{is_conflict, log_outcome, Context, Note};
use crate::scheduler::{self, Reserve, Strategy};
use crate::view::{self, migration_phase, ClusterView, Snapshot};
use crate::vm_controller::error_chain;

/// The condition type that says whether a migration was let in.
pub const ADMITTED: &str = "Admitted";
/// How long the target agent has to publish `targetAddress`.
pub const TARGET_PREPARE_SECONDS: i64 = 60;
/// Grace after the completion timeout before the operator asks to cancel
/// (the source agent enforces the timeout itself; this catches an agent
/// that does not).
pub const COMPLETION_GRACE_SECONDS: i64 = 30;

/// Why a migration reconcile failed (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum MigrationReconcileError {
    /// The VM could not be read.
    #[error("Cannot read the VM")]
    GetVm(#[source] kube::Error),
    /// Nodes, Leases, VMs or migrations could not be listed.
    #[error("Cannot list the cluster")]
    ListCluster(#[source] kube::Error),
    /// The migration's finalizers, labels or annotations could not be written.
    #[error("Cannot patch VMMigration metadata")]
    PatchMetadata(#[source] kube::Error),
    /// The migration's status could not be written.
    #[error("Cannot patch VMMigration status")]
    PatchStatus(#[source] kube::Error),
    /// The VM's label could not be written.
    #[error("Cannot patch VM metadata")]
    PatchVm(#[source] kube::Error),
    /// The VM's status could not be written.
    #[error("Cannot patch VM status")]
    PatchVmStatus(#[source] kube::Error),
    /// A decision asked for a migration phase change the life cycle forbids.
    #[error("Migration phase {from:?} cannot become {to:?}")]
    Transition {
        /// Current phase.
        from: MigrationPhase,
        /// Refused phase.
        to: MigrationPhase,
    },
    /// A decision asked for a VM phase change the life cycle forbids.
    #[error("VM phase {from:?} cannot become {to:?}")]
    VmTransition {
        /// Current phase.
        from: VmPhase,
        /// Refused phase.
        to: VmPhase,
    },
}

/// What [`decide_migration`] reads besides the migration.
pub struct MigrationInputs<'a> {
    /// The VM it moves, if it exists.
    pub vm: Option<&'a VirtualMachine>,
    /// The cluster, when the decision may need it (admission, or a deleted
    /// migration in flight); `None` otherwise.
    pub cluster: Option<&'a ClusterView>,
    /// Spread or pack, for choosing a target.
    pub strategy: Strategy,
    /// Room kept free on every node.
    pub reserve: Reserve,
    /// Migrations in flight allowed.
    pub limits: MigrationLimits,
    /// The time now.
    pub now: Timestamp,
}

/// How the VM moves when its migration has ended.
#[derive(Clone, Debug, PartialEq)]
pub struct VmMove {
    /// The node the VM is labelled for afterwards.
    pub node: String,
    /// The phase the migration ended in.
    pub result: MigrationPhase,
    /// Event on the VM.
    pub vm_note: Note,
    /// Event on the migration.
    pub migration_note: Note,
}

/// What to write for a migration.
#[derive(Clone, Debug, PartialEq)]
pub enum MigrationAction {
    /// Nothing to write now; look again after `requeue` if set.
    Nothing {
        /// When to look again without a change.
        requeue: Option<Duration>,
    },
    /// Add [`MIGRATION_FINALIZER`].
    AddFinalizer,
    /// The operator ends the migration as `Failed`.
    Fail {
        /// `failureReason`.
        reason: String,
    },
    /// The operator ends a migration that had not started as `Cancelled`.
    Cancel {
        /// `failureReason`.
        reason: String,
    },
    /// Not yet: stay `Pending` with `Admitted=False` and this reason
    /// (`WaitingForSlot`: a concurrency limit; `WaitingForVM`: the VM does
    /// not exist or does not run yet, as when manifests are applied together).
    Wait {
        /// The condition's reason.
        reason: &'static str,
        /// What it waits for.
        message: String,
    },
    /// Let it in: VM `Migrating`, migration `PreparingTarget`, labels.
    Admit {
        /// Where the VM runs.
        source: String,
        /// Where it goes.
        target: String,
    },
    /// Put back the source/target labels a cut-short admission missed.
    Label {
        /// Source node.
        source: String,
        /// Target node.
        target: String,
    },
    /// Ask the source agent to cancel (annotation).
    RequestCancel {
        /// Why.
        message: String,
    },
    /// Move the VM as the final phase says.
    MoveVm(VmMove),
    /// Remove [`MIGRATION_FINALIZER`].
    ReleaseFinalizer,
}

fn has_finalizer(m: &VMMigration) -> bool {
    m.finalizers().iter().any(|f| f == MIGRATION_FINALIZER)
}

fn cancel_requested(m: &VMMigration) -> bool {
    m.metadata.deletion_timestamp.is_some()
        || m.annotations().get(CANCEL_ANNOTATION).map(String::as_str) == Some("true")
}

/// Whether the migration holds a slot: admitted and not yet final.
pub fn in_flight(m: &VMMigration) -> bool {
    let phase = migration_phase(m);
    !phase.is_final() && !matches!(phase, MigrationPhase::Pending | MigrationPhase::Scheduling)
}

/// Whether deciding for `m` needs the cluster view.
pub fn needs_cluster(m: &VMMigration) -> bool {
    let phase = migration_phase(m);
    !phase.is_final()
        && (matches!(phase, MigrationPhase::Pending | MigrationPhase::Scheduling)
            || m.metadata.deletion_timestamp.is_some())
}

/// Whether `vm` is moved by `m` right now (its status names it).
fn vm_names(vm: &VirtualMachine, m: &VMMigration) -> bool {
    vm.status.as_ref().and_then(|s| s.migration.as_deref()) == Some(m.name_any().as_str())
}

/// Decides what the operator writes for `m`.
pub fn decide_migration(m: &VMMigration, inputs: &MigrationInputs<'_>) -> MigrationAction {
    let phase = migration_phase(m);
    if phase.is_final() {
        if let Some(vm) = inputs.vm.filter(|vm| vm_names(vm, m)) {
            return MigrationAction::MoveVm(vm_move(m, vm));
        }
        if has_finalizer(m) {
            return MigrationAction::ReleaseFinalizer;
        }
        return MigrationAction::Nothing { requeue: None };
    }
    if !has_finalizer(m) {
        if m.metadata.deletion_timestamp.is_some() {
            // Never admitted: nothing of ours to clean up.
            return MigrationAction::Nothing { requeue: None };
        }
        return MigrationAction::AddFinalizer;
    }
    match phase {
        MigrationPhase::Pending | MigrationPhase::Scheduling => {
            if cancel_requested(m) {
                let on = inputs
                    .vm
                    .and_then(view::vm_node)
                    .map(|n| format!(" on {n}"))
                    .unwrap_or_default();
                return MigrationAction::Cancel {
                    reason: format!("cancelled before it started; the VM stays{on}"),
                };
            }
            admit(m, inputs)
        }
        _ => in_progress(m, phase, inputs),
    }
}

fn admit(m: &VMMigration, inputs: &MigrationInputs<'_>) -> MigrationAction {
    let fail = |reason: String| MigrationAction::Fail { reason };
    let cold = m.spec.mode == MigrationMode::Cold;
    let vm_name = &m.spec.vm_name;
    // Manifests applied together (GitOps) may bring the migration before its
    // VM exists or runs: wait for it, within the completion timeout.
    let waited_too_long = || {
        let created = m.metadata.creation_timestamp.as_ref().map(|t| t.0);
        // Without a creation time (never from the API server) do not wait.
        created.is_none_or(|c| {
            inputs.now.duration_since(c).as_secs()
                > i64::from(MigrationPolicy::DEFAULT_COMPLETION_TIMEOUT_SECONDS)
        })
    };
    let Some(vm) = inputs.vm else {
        let message = format!(
            "VirtualMachine {vm_name:?} not found in namespace {:?}",
            m.namespace().unwrap_or_default()
        );
        if waited_too_long() {
            return fail(message);
        }
        return MigrationAction::Wait {
            reason: "WaitingForVM",
            message: format!("{message}; waiting for it"),
        };
    };
    let Some(cluster) = inputs.cluster else {
        return MigrationAction::Nothing {
            requeue: Some(Duration::from_secs(1)),
        };
    };
    let ours = vm_names(vm, m);
    if let Some(other) = competing(m, &cluster.migrations) {
        return fail(format!(
            "VM {vm_name:?} is already being migrated by VMMigration {other:?}"
        ));
    }
    let phase = view::vm_phase(vm);
    // `Migrating` and naming us: an admission cut short, carry on.
    let starting = matches!(
        phase,
        VmPhase::Pending | VmPhase::Scheduled | VmPhase::Provisioning | VmPhase::Starting
    );
    if cold {
        if !ours && !matches!(phase, VmPhase::Stopped | VmPhase::Failed) {
            return fail(format!(
                "VM {vm_name:?} is {phase:?}: a cold migration moves a stopped VM; stop it first (runStrategy: Halted) or use mode: Live"
            ));
        }
        if !matches!(
            vm.spec.run_strategy,
            RunStrategy::Halted | RunStrategy::Manual
        ) {
            return fail(format!(
                "VM {vm_name:?} has runStrategy {:?}, which would start it again during the move; set runStrategy: Halted (or Manual) first",
                vm.spec.run_strategy
            ));
        }
    } else if starting && !ours && !waited_too_long() {
        return MigrationAction::Wait {
            reason: "WaitingForVM",
            message: format!("VM {vm_name:?} is {phase:?}; waiting for it to run"),
        };
    }
    if !cold && phase != VmPhase::Running && !ours {
        let hint = if matches!(phase, VmPhase::Stopped | VmPhase::Failed) {
            "; use mode: Cold to move a stopped VM"
        } else {
            ""
        };
        return fail(format!(
            "VM {vm_name:?} is {phase:?}, not Running: only a running VM can be live-migrated{hint}"
        ));
    }
    let Some(source) = view::vm_node(vm).map(str::to_string) else {
        return fail(format!("VM {vm_name:?} has no node"));
    };
    // A cold migration always copies the node-local disks.
    if !cold && m.spec.storage != Some(StorageMode::Copy) {
        if let Some(disk) = local_writable_disk(vm) {
            return fail(format!(
                "disk {disk:?} is on node-local storage and writable; set spec.storage: Copy to copy it with the migration"
            ));
        }
    }

    let limits = inputs.limits;
    let flying: Vec<&VMMigration> = cluster
        .migrations
        .iter()
        .filter(|o| o.uid() != m.uid() && in_flight(o))
        .collect();
    if flying.len() >= limits.per_cluster {
        return MigrationAction::Wait {
            reason: "WaitingForSlot",
            message: format!(
                "{} migrations in flight; the cluster allows {}",
                flying.len(),
                limits.per_cluster
            ),
        };
    }
    let busy = |node: &str| {
        flying
            .iter()
            .filter(|o| {
                let s = o.status.as_ref();
                s.and_then(|s| s.source_node.as_deref()) == Some(node)
                    || s.and_then(|s| s.target_node.as_deref()) == Some(node)
            })
            .count()
    };
    let full = |node: &str| busy(node) >= limits.per_node;
    let slot_message = |node: &str| {
        format!(
            "{node} has {} migrations in flight; a node allows {}",
            busy(node),
            limits.per_node
        )
    };
    if full(&source) {
        return MigrationAction::Wait {
            reason: "WaitingForSlot",
            message: slot_message(&source),
        };
    }

    let mut request = view::request_for(vm, view::vm_resources(vm));
    request.exclude.push(source.clone());
    let place = |request: &scheduler::Request, nodes: &[scheduler::NodeInfo]| {
        scheduler::place(
            request,
            nodes,
            &cluster.placed,
            inputs.reserve,
            inputs.strategy,
        )
    };
    let target = match &m.spec.target_node {
        Some(target) => {
            if *target == source {
                return fail(format!("targetNode {target} is the node the VM runs on"));
            }
            let Some(node) = cluster.node(target) else {
                return fail(format!(
                    "targetNode {target} is not a Godwit node (no Node {target} labelled {NODE_LABEL})"
                ));
            };
            if let Err(why) = place(&request, std::slice::from_ref(node)) {
                let refusal = why
                    .0
                    .first()
                    .map(|(_, r)| r.to_string())
                    .unwrap_or_default();
                return fail(format!("targetNode {target} cannot take the VM: {refusal}"));
            }
            if full(target) {
                return MigrationAction::Wait {
                    reason: "WaitingForSlot",
                    message: slot_message(target),
                };
            }
            target.clone()
        }
        None => {
            let crowded: Vec<String> = cluster
                .nodes
                .iter()
                .map(|n| n.name.clone())
                .filter(|n| full(n))
                .collect();
            let mut free_slots = request.clone();
            free_slots.exclude.extend(crowded.iter().cloned());
            match place(&free_slots, &cluster.nodes) {
                Ok(target) => target,
                Err(_) if !crowded.is_empty() && place(&request, &cluster.nodes).is_ok() => {
                    return MigrationAction::Wait {
                        reason: "WaitingForSlot",
                        message: format!(
                            "every node that can take the VM has {} migrations in flight",
                            limits.per_node
                        ),
                    };
                }
                Err(why) => return fail(why.to_string()),
            }
        }
    };
    MigrationAction::Admit { source, target }
}

/// Another unfinished migration of the same VM that goes first: one in
/// flight, or a pending one created earlier (ties by name).
fn competing(m: &VMMigration, all: &[VMMigration]) -> Option<String> {
    let key = |o: &VMMigration| {
        (
            o.metadata.creation_timestamp.as_ref().map(|t| t.0),
            o.name_any(),
        )
    };
    all.iter()
        .filter(|o| {
            o.uid() != m.uid()
                && o.namespace() == m.namespace()
                && o.spec.vm_name == m.spec.vm_name
                && !migration_phase(o).is_final()
        })
        .find(|o| in_flight(o) || key(o) < key(m))
        .map(|o| o.name_any())
}

/// A disk that only a storage copy can move: node-local and writable (a
/// read-only image is expected on every node).
pub(crate) fn local_writable_disk(vm: &VirtualMachine) -> Option<String> {
    if let Some(machine) = view::resolved_machine(vm) {
        return machine
            .disks
            .iter()
            .find(|d| {
                let image = matches!(
                    d.source,
                    godwit_crds::contract::MachineDiskSource::Image { .. }
                );
                d.storage == StorageKind::Local && !(d.read_only && image)
            })
            .map(|d| d.name.clone());
    }
    vm.spec
        .disks
        .iter()
        .find(|d| d.storage == StorageKind::Local && !(d.read_only && d.source.image.is_some()))
        .map(|d| d.name.clone())
}

fn in_progress(
    m: &VMMigration,
    phase: MigrationPhase,
    inputs: &MigrationInputs<'_>,
) -> MigrationAction {
    let status = m.status.clone().unwrap_or_default();
    let (Some(source), Some(target)) = (status.source_node.clone(), status.target_node.clone())
    else {
        return MigrationAction::Fail {
            reason: "status lost its sourceNode or targetNode; start a new migration".into(),
        };
    };
    let labels = m.labels();
    if labels.get(SOURCE_LABEL) != Some(&source) || labels.get(TARGET_LABEL) != Some(&target) {
        return MigrationAction::Label { source, target };
    }
    let deleting = m.metadata.deletion_timestamp.is_some();
    if let (true, Some(cluster)) = (deleting, inputs.cluster) {
        if let Some(gone) = lost_for(cluster, &source, inputs.now) {
            return MigrationAction::Fail {
                reason: format!(
                    "source node {source} has not renewed its lease for {gone} s; the migration is abandoned"
                ),
            };
        }
    }
    let Some(start) = status.start_time.as_ref().map(|t| t.0) else {
        return MigrationAction::Nothing {
            requeue: Some(Duration::from_secs(5)),
        };
    };
    let elapsed = inputs.now.as_second() - start.as_second();
    if phase == MigrationPhase::PreparingTarget
        && status.target_address.is_none()
        && elapsed > TARGET_PREPARE_SECONDS
    {
        return MigrationAction::Fail {
            reason: format!("target node {target} did not prepare in {TARGET_PREPARE_SECONDS} s"),
        };
    }
    let timeout = i64::from(completion_timeout(m, inputs.vm));
    if elapsed > timeout + COMPLETION_GRACE_SECONDS
        && m.annotations().get(CANCEL_ANNOTATION).map(String::as_str) != Some("true")
        && phase.can_transition_to(MigrationPhase::Cancelled)
    {
        return MigrationAction::RequestCancel {
            message: format!(
                "not finished after the completion timeout of {timeout} s; asked the source agent to cancel"
            ),
        };
    }
    MigrationAction::Nothing {
        requeue: Some(Duration::from_secs(5)),
    }
}

/// Seconds the source's lease has been expired beyond one more lease
/// duration, if so (a node with no lease, or no Node, counts as long gone).
fn lost_for(cluster: &ClusterView, node: &str, now: Timestamp) -> Option<i64> {
    let grace = i64::from(NODE_LEASE_SECONDS);
    match cluster.lease_expiry.get(node) {
        Some(expiry) => {
            let gone = now.as_second() - expiry.as_second();
            (gone > grace).then_some(gone)
        }
        None => Some(grace),
    }
}

/// The completion timeout: the migration's policy, else the VM's, else the
/// default.
pub fn completion_timeout(m: &VMMigration, vm: Option<&VirtualMachine>) -> u32 {
    let vm_policy = vm
        .and_then(|v| v.spec.migration_policy.clone())
        .unwrap_or_default();
    m.spec
        .policy
        .clone()
        .unwrap_or_default()
        .or(&vm_policy)
        .completion_timeout_seconds
        .unwrap_or(MigrationPolicy::DEFAULT_COMPLETION_TIMEOUT_SECONDS)
}

fn vm_move(m: &VMMigration, vm: &VirtualMachine) -> VmMove {
    let status = m.status.clone().unwrap_or_default();
    let name = m.name_any();
    let current = view::vm_node(vm).unwrap_or_default().to_string();
    let source = status
        .source_node
        .clone()
        .unwrap_or_else(|| current.clone());
    let why = status
        .failure_reason
        .clone()
        .map(|r| format!(": {r}"))
        .unwrap_or_default();
    match (status.phase, status.target_node.clone()) {
        (MigrationPhase::Succeeded, Some(target)) => {
            let figures = status
                .result
                .as_ref()
                .map(|r| format!(" in {} ms, downtime {} ms", r.total_time_ms, r.downtime_ms))
                .unwrap_or_default();
            VmMove {
                vm_note: Note::normal(
                    "Migrated",
                    format!(
                        "Live-migrated from {source} to {target}{figures} (VMMigration {name})"
                    ),
                ),
                migration_note: Note::normal(
                    "Migrated",
                    format!("Live-migrated VM {} to {target}{figures}", m.spec.vm_name),
                ),
                node: target,
                result: MigrationPhase::Succeeded,
            }
        }
        (MigrationPhase::Cancelled, _) => VmMove {
            vm_note: Note::normal(
                "MigrationCancelled",
                format!("VMMigration {name} was cancelled; the VM stays on {source}"),
            ),
            migration_note: Note::normal(
                "Cancelled",
                format!("Cancelled; VM {} stays on {source}", m.spec.vm_name),
            ),
            node: source,
            result: MigrationPhase::Cancelled,
        },
        // Failed, or Succeeded without a target (nothing to move to).
        (phase, _) => VmMove {
            vm_note: Note::warning(
                "MigrationFailed",
                format!("VMMigration {name} failed; the VM stays on {source}{why}"),
            ),
            migration_note: Note::warning(
                "Failed",
                format!("VM {} stays on {source}{why}", m.spec.vm_name),
            ),
            node: source,
            result: if phase == MigrationPhase::Succeeded {
                MigrationPhase::Failed
            } else {
                phase
            },
        },
    }
}

/// Runs the migration controller until its watches end.
pub async fn run(ctx: Arc<Context>) {
    let client = ctx.client.clone();
    let controller = Controller::new(
        Api::<VMMigration>::all(client.clone()),
        watcher::Config::default(),
    );
    let store = controller.store();
    ctx.metrics.watch_migrations(store.clone());
    // A VM's change may settle or unblock the migrations that name it.
    let by_vm = move |vm: VirtualMachine| {
        let ns = vm.namespace();
        let name = vm.name_any();
        store
            .state()
            .iter()
            .filter(|m| m.namespace() == ns && m.spec.vm_name == name)
            .filter(|m| !migration_phase(m).is_final() || has_finalizer(m))
            .map(|m| ObjectRef::from_obj(m.as_ref()))
            .collect::<Vec<_>>()
    };
    controller
        .watches(
            Api::<VirtualMachine>::all(client),
            watcher::Config::default(),
            by_vm,
        )
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|result| async move {
            log_outcome("migration", result.err());
        })
        .await;
}

fn error_policy(m: Arc<VMMigration>, error: &MigrationReconcileError, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconciled("migration", false);
    if is_conflict(error) {
        debug!(migration = %m.name_any(), "changed meanwhile; deciding again");
        return Action::requeue(Duration::from_millis(200));
    }
    warn!(migration = %m.name_any(), "reconcile failed: {error}: {}", error_chain(error));
    Action::requeue(Duration::from_secs(2))
}

/// Reads what the decision needs, decides, writes.
pub async fn reconcile(
    m: Arc<VMMigration>,
    ctx: Arc<Context>,
) -> Result<Action, MigrationReconcileError> {
    let started = std::time::Instant::now();
    let span = tracing::info_span!(
        "migration",
        namespace = %m.namespace().unwrap_or_default(),
        vm = %m.spec.vm_name,
        migration = %m.name_any()
    );
    let result = tracing::Instrument::instrument(reconcile_inner(m, &ctx), span).await;
    ctx.metrics.reconcile_took("migration", started.elapsed());
    if result.is_ok() {
        ctx.metrics.reconciled("migration", true);
    }
    result
}

async fn reconcile_inner(
    m: Arc<VMMigration>,
    ctx: &Context,
) -> Result<Action, MigrationReconcileError> {
    let ns = m.namespace().unwrap_or_default();
    let inputs = |vm, cluster| MigrationInputs {
        vm,
        cluster,
        strategy: ctx.config.placement,
        reserve: ctx.config.reserve,
        limits: ctx.config.migrations,
        now: Timestamp::now(),
    };
    if needs_cluster(&m) && has_finalizer(&m) {
        // Slots and room are counted from the lists to the writes under the
        // lock the VM controller also takes.
        let _placement = ctx.placement.lock().await;
        let snapshot = Snapshot::fetch(&ctx.client, &ctx.config.lease_namespace)
            .await
            .map_err(MigrationReconcileError::ListCluster)?;
        let Some(fresh) = snapshot.migrations.iter().find(|o| o.uid() == m.uid()) else {
            return Ok(Action::await_change());
        };
        let vm = snapshot.vms.iter().find(|v| {
            v.namespace().as_deref() == Some(ns.as_str()) && v.name_any() == fresh.spec.vm_name
        });
        let cluster = ClusterView::build(&snapshot, Timestamp::now());
        let action = decide_migration(fresh, &inputs(vm, Some(&cluster)));
        return apply(fresh, vm, action, ctx).await;
    }
    let vm = Api::<VirtualMachine>::namespaced(ctx.client.clone(), &ns)
        .get_opt(&m.spec.vm_name)
        .await
        .map_err(MigrationReconcileError::GetVm)?;
    let action = decide_migration(&m, &inputs(vm.as_ref(), None));
    apply(&m, vm.as_ref(), action, ctx).await
}

/// Writes what [`decide_migration`] decided.
async fn apply(
    m: &VMMigration,
    vm: Option<&VirtualMachine>,
    action: MigrationAction,
    ctx: &Context,
) -> Result<Action, MigrationReconcileError> {
    let ns = m.namespace().unwrap_or_default();
    let api = Api::<VMMigration>::namespaced(ctx.client.clone(), &ns);
    let vms = Api::<VirtualMachine>::namespaced(ctx.client.clone(), &ns);
    let name = m.name_any();
    let reference = m.object_ref(&());
    let now = Timestamp::now();
    let soon = Action::requeue(Duration::from_millis(200));
    let phase = migration_phase(m);
    match action {
        MigrationAction::Nothing { requeue } => Ok(requeue
            .map(|r| Action::requeue(r.min(ctx.config.requeue)))
            .unwrap_or_else(Action::await_change)),
        MigrationAction::AddFinalizer => {
            let mut finalizers = m.finalizers().to_vec();
            finalizers.push(MIGRATION_FINALIZER.to_string());
            patch_metadata(&api, m, json!({"finalizers": finalizers}), ctx).await?;
            Ok(soon)
        }
        MigrationAction::ReleaseFinalizer => {
            let finalizers: Vec<&String> = m
                .finalizers()
                .iter()
                .filter(|f| *f != MIGRATION_FINALIZER)
                .collect();
            patch_metadata(&api, m, json!({"finalizers": finalizers}), ctx).await?;
            debug!(migration = %name, "finalizer released");
            Ok(Action::await_change())
        }
        MigrationAction::Fail { reason } => {
            end(&api, m, MigrationPhase::Failed, &reason, ctx).await?;
            warn!(migration = %name, "failed: {reason}");
            if !vm.is_some_and(|vm| vm_names(vm, m)) {
                ctx.metrics.migration_ended(MigrationPhase::Failed);
            }
            ctx.publish(&reference, "Migrate", &Note::warning("Failed", reason))
                .await;
            Ok(soon)
        }
        MigrationAction::Cancel { reason } => {
            end(&api, m, MigrationPhase::Cancelled, &reason, ctx).await?;
            info!(migration = %name, "cancelled: {reason}");
            if !vm.is_some_and(|vm| vm_names(vm, m)) {
                ctx.metrics.migration_ended(MigrationPhase::Cancelled);
            }
            ctx.publish(&reference, "Cancel", &Note::normal("Cancelled", reason))
                .await;
            Ok(soon)
        }
        MigrationAction::Wait { reason, message } => {
            let waiting = Wanted::no(ADMITTED, reason, message.clone());
            if !waiting.is_shown_in(migration_conditions(m)) {
                patch_status(
                    &api,
                    m,
                    json!({
                        "phase": MigrationPhase::Pending,
                        "conditions": conditions::merge(migration_conditions(m), &waiting, m.metadata.generation, now),
                    }),
                    ctx,
                )
                .await?;
                ctx.publish(&reference, "Admit", &Note::normal(reason, message))
                    .await;
            }
            Ok(Action::requeue(
                Duration::from_secs(2).min(ctx.config.requeue),
            ))
        }
        MigrationAction::Admit { source, target } => {
            let Some(vm) = vm else {
                return Ok(soon);
            };
            check(phase, MigrationPhase::PreparingTarget)?;
            // The VM first: a migration in `PreparingTarget` always has its
            // VM marked, and a VM marked for a `Pending` migration is
            // recognised as ours by the next admission.
            if !vm_names(vm, m) && m.spec.mode == MigrationMode::Cold {
                // A stopped VM stays Stopped; `migration` holds it there.
                vms.patch_status(
                    &vm.name_any(),
                    &ctx.patch_params(),
                    &Patch::Merge(json!({
                        "metadata": {"resourceVersion": vm.resource_version()},
                        "status": {"migration": name},
                    })),
                )
                .await
                .map_err(MigrationReconcileError::PatchVmStatus)?;
            } else if !vm_names(vm, m) {
                let from = view::vm_phase(vm);
                if !from.can_transition_to(VmPhase::Migrating) {
                    return Err(MigrationReconcileError::VmTransition {
                        from,
                        to: VmPhase::Migrating,
                    });
                }
                vms.patch_status(
                    &vm.name_any(),
                    &ctx.patch_params(),
                    &Patch::Merge(json!({
                        "metadata": {"resourceVersion": vm.resource_version()},
                        "status": {"phase": VmPhase::Migrating, "migration": name},
                    })),
                )
                .await
                .map_err(MigrationReconcileError::PatchVmStatus)?;
            }
            let message = format!("Moving VM {} from {source} to {target}", m.spec.vm_name);
            let admitted = Wanted::yes(ADMITTED, "Admitted", message.clone());
            let patched = patch_status(
                &api,
                m,
                json!({
                    "phase": MigrationPhase::PreparingTarget,
                    "sourceNode": source,
                    "targetNode": target,
                    "startTime": Time(now),
                    "conditions": conditions::merge(migration_conditions(m), &admitted, m.metadata.generation, now),
                }),
                ctx,
            )
            .await?;
            patch_metadata(
                &api,
                &patched,
                json!({"labels": {SOURCE_LABEL: source, TARGET_LABEL: target}}),
                ctx,
            )
            .await?;
            info!(migration = %name, vm = %m.spec.vm_name, %source, %target, "admitted");
            ctx.publish(&reference, "Admit", &Note::normal("Admitted", message))
                .await;
            ctx.publish(
                &vm.object_ref(&()),
                "Migrate",
                &Note::normal(
                    "Migrating",
                    format!("Live-migrating to {target} (VMMigration {name})"),
                ),
            )
            .await;
            Ok(Action::requeue(ctx.config.requeue))
        }
        MigrationAction::Label { source, target } => {
            patch_metadata(
                &api,
                m,
                json!({"labels": {SOURCE_LABEL: source, TARGET_LABEL: target}}),
                ctx,
            )
            .await?;
            Ok(soon)
        }
        MigrationAction::RequestCancel { message } => {
            patch_metadata(
                &api,
                m,
                json!({"annotations": {CANCEL_ANNOTATION: "true"}}),
                ctx,
            )
            .await?;
            warn!(migration = %name, "{message}");
            ctx.publish(&reference, "Cancel", &Note::warning("TimedOut", message))
                .await;
            Ok(Action::requeue(ctx.config.requeue))
        }
        MigrationAction::MoveVm(moved) => {
            let Some(vm) = vm else {
                return Ok(soon);
            };
            let from = view::vm_phase(vm);
            // The label first, `migration` cleared last: until it is
            // cleared, the move is still owed and is done again.
            let relabelled;
            let vm = if view::vm_node(vm) != Some(moved.node.as_str()) {
                relabelled = vms
                    .patch(
                        &vm.name_any(),
                        &ctx.patch_params(),
                        &Patch::Merge(json!({
                            "metadata": {
                                "resourceVersion": vm.resource_version(),
                                "labels": {NODE_LABEL: moved.node},
                            },
                        })),
                    )
                    .await
                    .map_err(MigrationReconcileError::PatchVm)?;
                &relabelled
            } else {
                vm
            };
            let mut status = json!({"nodeName": moved.node, "migration": null});
            if from == VmPhase::Migrating {
                status["phase"] = json!(VmPhase::Running);
            }
            vms.patch_status(
                &vm.name_any(),
                &ctx.patch_params(),
                &Patch::Merge(json!({
                    "metadata": {"resourceVersion": vm.resource_version()},
                    "status": status,
                })),
            )
            .await
            .map_err(MigrationReconcileError::PatchVmStatus)?;
            info!(migration = %name, vm = %vm.name_any(), node = %moved.node, result = ?moved.result, "VM settled");
            ctx.metrics.migration_ended(moved.result);
            ctx.publish(&vm.object_ref(&()), "Migrate", &moved.vm_note)
                .await;
            ctx.publish(&reference, "Migrate", &moved.migration_note)
                .await;
            Ok(soon)
        }
    }
}

fn migration_conditions(
    m: &VMMigration,
) -> &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition] {
    m.status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default()
}

fn check(from: MigrationPhase, to: MigrationPhase) -> Result<(), MigrationReconcileError> {
    if from.can_transition_to(to) {
        Ok(())
    } else {
        Err(MigrationReconcileError::Transition { from, to })
    }
}

/// Writes a final phase the operator decided, with its reason and end time.
async fn end(
    api: &Api<VMMigration>,
    m: &VMMigration,
    to: MigrationPhase,
    reason: &str,
    ctx: &Context,
) -> Result<VMMigration, MigrationReconcileError> {
    check(migration_phase(m), to)?;
    patch_status(
        api,
        m,
        json!({
            "phase": to,
            "failureReason": reason,
            "endTime": Time(Timestamp::now()),
        }),
        ctx,
    )
    .await
}

/// Merge-patches `metadata` with `m`'s resourceVersion as precondition.
async fn patch_metadata(
    api: &Api<VMMigration>,
    m: &VMMigration,
    mut metadata: serde_json::Value,
    ctx: &Context,
) -> Result<VMMigration, MigrationReconcileError> {
    metadata["resourceVersion"] = json!(m.resource_version());
    api.patch(
        &m.name_any(),
        &ctx.patch_params(),
        &Patch::Merge(json!({ "metadata": metadata })),
    )
    .await
    .map_err(MigrationReconcileError::PatchMetadata)
}

/// Merge-patches the status with `m`'s resourceVersion as precondition, so
/// the operator never overwrites a phase the source agent wrote meanwhile.
async fn patch_status(
    api: &Api<VMMigration>,
    m: &VMMigration,
    status: serde_json::Value,
    ctx: &Context,
) -> Result<VMMigration, MigrationReconcileError> {
    api.patch_status(
        &m.name_any(),
        &ctx.patch_params(),
        &Patch::Merge(json!({
            "metadata": {"resourceVersion": m.resource_version()},
            "status": status,
        })),
    )
    .await
    .map_err(MigrationReconcileError::PatchStatus)
}

#[cfg(test)]
mod tests {
    use godwit_crds::contract::{Machine, MachineDisk, MachineDiskSource, RESOLVED_ANNOTATION};
    use godwit_crds::{ImageFormat, MigrationResult, VMMigrationStatus};

    use super::*;
    use crate::nodes::fixtures::{lease, node};
    use crate::view::fixtures::{migration, placed_vm};

    const PER_NODE: usize = 2;

    fn t0() -> Timestamp {
        Timestamp::from_second(1_700_000_000).unwrap()
    }

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + seconds).unwrap()
    }

    /// Three ready 4-CPU 4-GiB nodes with `vms`, `migrations` in flight.
    fn cluster(vms: Vec<VirtualMachine>, migrations: Vec<VMMigration>) -> ClusterView {
        let names = ["node-1", "node-2", "node-3"];
        let snapshot = Snapshot {
            nodes: names.iter().map(|n| node(n, 4, 4)).collect(),
            leases: names.iter().map(|n| lease(n, t0(), 10)).collect(),
            vms,
            migrations,
        };
        ClusterView::build(&snapshot, t0())
    }

    fn running() -> VirtualMachine {
        placed_vm("demo", "node-1", VmPhase::Running, 1, 1)
    }

    /// A new migration of `demo` that already carries the finalizer.
    fn new_migration(name: &str) -> VMMigration {
        let mut m = migration(name, "demo", None);
        m.metadata.finalizers = Some(vec![MIGRATION_FINALIZER.into()]);
        m
    }

    /// `m` of `vm` as admitted from `source` to `target` at t0.
    fn admitted(m: &VMMigration, phase: MigrationPhase, source: &str, target: &str) -> VMMigration {
        let mut m = m.clone();
        m.status = Some(VMMigrationStatus {
            phase,
            source_node: Some(source.into()),
            target_node: Some(target.into()),
            start_time: Some(Time(t0())),
            ..Default::default()
        });
        m.metadata.labels = Some(
            [
                (SOURCE_LABEL.to_string(), source.to_string()),
                (TARGET_LABEL.to_string(), target.to_string()),
            ]
            .into(),
        );
        m
    }

    fn marked(vm: &VirtualMachine, migration: &str) -> VirtualMachine {
        let mut vm = vm.clone();
        let status = vm.status.as_mut().unwrap();
        status.phase = VmPhase::Migrating;
        status.migration = Some(migration.into());
        vm
    }

    fn decide_with(
        m: &VMMigration,
        vm: Option<&VirtualMachine>,
        cluster: Option<&ClusterView>,
        now: Timestamp,
        limits: MigrationLimits,
    ) -> MigrationAction {
        decide_migration(
            m,
            &MigrationInputs {
                vm,
                cluster,
                strategy: Strategy::Spread,
                reserve: Reserve::default(),
                limits,
                now,
            },
        )
    }

    fn decide_at(
        m: &VMMigration,
        vm: Option<&VirtualMachine>,
        cluster: Option<&ClusterView>,
        now: Timestamp,
    ) -> MigrationAction {
        let limits = MigrationLimits {
            per_node: PER_NODE,
            per_cluster: 3,
        };
        decide_with(m, vm, cluster, now, limits)
    }

    fn decide(
        m: &VMMigration,
        vm: Option<&VirtualMachine>,
        cluster: &ClusterView,
    ) -> MigrationAction {
        decide_at(m, vm, Some(cluster), t0())
    }

    fn failure(action: MigrationAction) -> String {
        match action {
            MigrationAction::Fail { reason } => reason,
            other => panic!("expected Fail, got {other:?}"),
        }
    }

    fn with_disk(
        vm: &VirtualMachine,
        storage: StorageKind,
        read_only: bool,
        image: bool,
    ) -> VirtualMachine {
        let mut vm = vm.clone();
        let machine = Machine {
            cpu: 1,
            memory_bytes: 1 << 30,
            disks: vec![MachineDisk {
                name: "root".into(),
                source: if image {
                    MachineDiskSource::Image {
                        path: "/img".into(),
                        format: ImageFormat::Raw,
                    }
                } else {
                    MachineDiskSource::Clone {
                        path: "/base".into(),
                        format: ImageFormat::Raw,
                    }
                },
                storage,
                read_only,
            }],
            ..Default::default()
        };
        vm.metadata.annotations = Some(
            [(
                RESOLVED_ANNOTATION.to_string(),
                serde_json::to_string(&machine).unwrap(),
            )]
            .into(),
        );
        vm
    }

    #[test]
    fn a_new_migration_gets_the_finalizer_first() {
        let m = migration("m1", "demo", None);
        let c = cluster(vec![running()], vec![]);
        assert_eq!(
            decide(&m, Some(&running()), &c),
            MigrationAction::AddFinalizer
        );
        let mut gone = m.clone();
        gone.metadata.deletion_timestamp = Some(Time(t0()));
        assert_eq!(
            decide(&gone, Some(&running()), &c),
            MigrationAction::Nothing { requeue: None },
            "deleted before admission: nothing to hold it for"
        );
    }

    #[test]
    fn a_valid_migration_is_admitted_to_the_best_other_node() {
        let vm = running();
        let c = cluster(vec![vm.clone()], vec![]);
        assert_eq!(
            decide(&new_migration("m1"), Some(&vm), &c),
            MigrationAction::Admit {
                source: "node-1".into(),
                target: "node-2".into()
            }
        );
        let mut to3 = new_migration("m1");
        to3.spec.target_node = Some("node-3".into());
        assert_eq!(
            decide(&to3, Some(&vm), &c),
            MigrationAction::Admit {
                source: "node-1".into(),
                target: "node-3".into()
            }
        );
    }

    #[test]
    fn invalid_migrations_fail_with_a_reason() {
        let vm = running();
        let c = cluster(vec![vm.clone()], vec![]);
        let m = new_migration("m1");

        assert!(failure(decide(&m, None, &c)).contains("\"demo\" not found"));
        // Applied together with its VM: the migration waits for the VM to exist
        // and run, within the completion timeout.
        let mut fresh = m.clone();
        fresh.metadata.creation_timestamp = Some(Time(at(-10)));
        let waits = |a: MigrationAction| match a {
            MigrationAction::Wait {
                reason: "WaitingForVM",
                message,
            } => message,
            other => panic!("expected WaitingForVM, got {other:?}"),
        };
        assert!(waits(decide(&fresh, None, &c)).contains("not found"));
        let starting = placed_vm("demo", "node-1", VmPhase::Starting, 1, 1);
        assert!(waits(decide(&fresh, Some(&starting), &c)).contains("is Starting"));
        fresh.metadata.creation_timestamp = Some(Time(at(-3600)));
        assert!(failure(decide(&fresh, None, &c)).contains("\"demo\" not found"));

        let stopped = placed_vm("demo", "node-1", VmPhase::Stopped, 1, 1);
        assert!(failure(decide(&m, Some(&stopped), &c)).contains("is Stopped, not Running"));

        let mut nowhere = vm.clone();
        nowhere.metadata.labels = None;
        assert!(failure(decide(&m, Some(&nowhere), &c)).contains("has no node"));

        let mut cold = m.clone();
        cold.spec.mode = MigrationMode::Cold;
        assert!(
            failure(decide(&cold, Some(&vm), &c)).contains("a cold migration moves a stopped VM")
        );
        let mut halted = stopped.clone();
        halted.spec.run_strategy = RunStrategy::Halted;
        assert!(matches!(
            decide(&cold, Some(&halted), &c),
            MigrationAction::Admit { .. }
        ));
        let mut always = stopped.clone();
        always.spec.run_strategy = RunStrategy::Always;
        assert!(failure(decide(&cold, Some(&always), &c)).contains("set runStrategy: Halted"));
        assert!(failure(decide(&m, Some(&stopped), &c)).contains("use mode: Cold"));

        let mut same = m.clone();
        same.spec.target_node = Some("node-1".into());
        assert!(failure(decide(&same, Some(&vm), &c)).contains("is the node the VM runs on"));

        let mut unknown = m.clone();
        unknown.spec.target_node = Some("elsewhere".into());
        assert!(failure(decide(&unknown, Some(&vm), &c)).contains("not a Godwit node"));

        let full = cluster(
            vec![
                vm.clone(),
                placed_vm("hog", "node-2", VmPhase::Running, 4, 4),
            ],
            vec![],
        );
        let mut to2 = m.clone();
        to2.spec.target_node = Some("node-2".into());
        assert!(failure(decide(&to2, Some(&vm), &full))
            .contains("cannot take the VM: insufficient cpu"));

        let mut down = cluster(vec![vm.clone()], vec![]);
        down.nodes[1].ready = false;
        assert!(failure(decide(&to2, Some(&vm), &down)).contains("node not ready"));
        down.nodes[2].ready = false;
        assert!(failure(decide(&m, Some(&vm), &down)).contains("no node can run the VM"));
    }

    #[test]
    fn local_writable_disks_need_a_storage_copy() {
        let c = cluster(vec![running()], vec![]);
        let m = new_migration("m1");
        let local = with_disk(&running(), StorageKind::Local, false, false);
        assert!(failure(decide(&m, Some(&local), &c)).contains("set spec.storage: Copy"));
        let mut copy = m.clone();
        copy.spec.storage = Some(StorageMode::Copy);
        assert!(matches!(
            decide(&copy, Some(&local), &c),
            MigrationAction::Admit { .. }
        ));
        let shared = with_disk(&running(), StorageKind::Shared, false, false);
        assert!(matches!(
            decide(&m, Some(&shared), &c),
            MigrationAction::Admit { .. }
        ));
        let read_only_image = with_disk(&running(), StorageKind::Local, true, true);
        assert!(matches!(
            decide(&m, Some(&read_only_image), &c),
            MigrationAction::Admit { .. }
        ));
    }

    #[test]
    fn one_migration_per_vm_at_a_time() {
        let vm = running();
        let older = new_migration("a-first");
        let newer = new_migration("b-second");
        let c = cluster(vec![vm.clone()], vec![older.clone(), newer.clone()]);
        assert!(failure(decide(&newer, Some(&vm), &c))
            .contains("already being migrated by VMMigration \"a-first\""));
        assert!(matches!(
            decide(&older, Some(&vm), &c),
            MigrationAction::Admit { .. }
        ));
        // A finished one does not count.
        let mut done = older.clone();
        done.status = Some(VMMigrationStatus {
            phase: MigrationPhase::Succeeded,
            ..Default::default()
        });
        let c = cluster(vec![vm.clone()], vec![done, newer.clone()]);
        assert!(matches!(
            decide(&newer, Some(&vm), &c),
            MigrationAction::Admit { .. }
        ));
    }

    /// A migration of another VM in flight between `source` and `target`.
    fn flying(name: &str, source: &str, target: &str) -> VMMigration {
        let mut m = migration(name, &format!("vm-{name}"), None);
        m = admitted(&m, MigrationPhase::PreCopy, source, target);
        m
    }

    #[test]
    fn slots_per_node_and_per_cluster_hold_migrations_back() {
        let vm = running();
        let m = new_migration("m1");
        let wait = |a: MigrationAction| match a {
            MigrationAction::Wait {
                reason: "WaitingForSlot",
                message,
            } => message,
            other => panic!("expected WaitForSlot, got {other:?}"),
        };

        // The source (node-1) is in two migrations already.
        let c = cluster(
            vec![vm.clone()],
            vec![
                flying("x", "node-1", "node-2"),
                flying("y", "node-3", "node-1"),
            ],
        );
        assert!(wait(decide(&m, Some(&vm), &c)).contains("node-1 has 2 migrations in flight"));

        // node-2 is busy: the target is node-3 even though spread would
        // prefer node-2 by name.
        let c = cluster(
            vec![vm.clone()],
            vec![
                flying("x", "node-2", "node-9"),
                flying("y", "node-8", "node-2"),
            ],
        );
        assert_eq!(
            decide(&m, Some(&vm), &c),
            MigrationAction::Admit {
                source: "node-1".into(),
                target: "node-3".into()
            }
        );
        // Asked for node-2 explicitly: wait for it.
        let mut to2 = m.clone();
        to2.spec.target_node = Some("node-2".into());
        assert!(wait(decide(&to2, Some(&vm), &c)).contains("node-2 has 2"));

        // Every possible target is busy: wait rather than fail.
        let all_busy = cluster(
            vec![vm.clone()],
            vec![
                flying("x", "node-2", "node-9"),
                flying("y", "node-8", "node-2"),
                flying("z", "node-3", "node-7"),
                flying("w", "node-6", "node-3"),
            ],
        );
        let roomy = MigrationLimits {
            per_node: PER_NODE,
            per_cluster: 10,
        };
        assert!(
            wait(decide_with(&m, Some(&vm), Some(&all_busy), t0(), roomy))
                .contains("every node that can take the VM has 2 migrations in flight")
        );
        // With the default test limit of 3, the cluster limit speaks first.
        assert!(wait(decide(&m, Some(&vm), &all_busy))
            .contains("4 migrations in flight; the cluster allows 3"));

        // Pending and final migrations hold no slot.
        let mut pending = flying("p", "node-1", "node-2");
        pending.status.as_mut().unwrap().phase = MigrationPhase::Pending;
        let mut done = flying("d", "node-1", "node-2");
        done.status.as_mut().unwrap().phase = MigrationPhase::Failed;
        let c = cluster(
            vec![vm.clone()],
            vec![pending.clone(), pending, done.clone(), done],
        );
        assert!(matches!(
            decide(&m, Some(&vm), &c),
            MigrationAction::Admit { .. }
        ));
    }

    #[test]
    fn timeouts_fail_a_silent_target_and_ask_to_cancel_a_slow_migration() {
        let vm = marked(&running(), "m1");
        let m = new_migration("m1");
        let preparing = admitted(&m, MigrationPhase::PreparingTarget, "node-1", "node-2");
        let quiet = MigrationAction::Nothing {
            requeue: Some(Duration::from_secs(5)),
        };
        assert_eq!(decide_at(&preparing, Some(&vm), None, at(60)), quiet);
        assert_eq!(
            failure(decide_at(&preparing, Some(&vm), None, at(61))),
            "target node node-2 did not prepare in 60 s"
        );
        let mut answered = preparing.clone();
        answered.status.as_mut().unwrap().target_address = Some("10.0.0.2:4444".into());
        assert_eq!(decide_at(&answered, Some(&vm), None, at(61)), quiet);

        // Default completion timeout 600 s, plus 30 s grace.
        let copying = admitted(&m, MigrationPhase::PreCopy, "node-1", "node-2");
        assert_eq!(decide_at(&copying, Some(&vm), None, at(630)), quiet);
        assert!(matches!(
            decide_at(&copying, Some(&vm), None, at(631)),
            MigrationAction::RequestCancel { message } if message.contains("600 s")
        ));
        let mut asked = copying.clone();
        asked.metadata.annotations = Some([(CANCEL_ANNOTATION.into(), "true".into())].into());
        assert_eq!(
            decide_at(&asked, Some(&vm), None, at(631)),
            quiet,
            "asked once"
        );
        // Past the point of no return, cancelling is not possible.
        let post = admitted(&m, MigrationPhase::PostCopy, "node-1", "node-2");
        assert_eq!(decide_at(&post, Some(&vm), None, at(10_000)), quiet);

        // The VM's policy, and the migration's over it.
        let mut strict_vm = vm.clone();
        strict_vm.spec.migration_policy = Some(MigrationPolicy {
            completion_timeout_seconds: Some(10),
            ..Default::default()
        });
        assert_eq!(completion_timeout(&copying, Some(&strict_vm)), 10);
        assert!(matches!(
            decide_at(&copying, Some(&strict_vm), None, at(41)),
            MigrationAction::RequestCancel { .. }
        ));
        let mut lenient = copying.clone();
        lenient.spec.policy = Some(MigrationPolicy {
            completion_timeout_seconds: Some(3600),
            ..Default::default()
        });
        assert_eq!(completion_timeout(&lenient, Some(&strict_vm)), 3600);
    }

    #[test]
    fn cancelling_in_each_phase() {
        let vm = running();
        let c = cluster(vec![vm.clone()], vec![]);
        let mut m = new_migration("m1");
        m.metadata.annotations = Some([(CANCEL_ANNOTATION.into(), "true".into())].into());
        assert_eq!(
            decide(&m, Some(&vm), &c),
            MigrationAction::Cancel {
                reason: "cancelled before it started; the VM stays on node-1".into()
            }
        );
        let mut deleted = new_migration("m1");
        deleted.metadata.deletion_timestamp = Some(Time(t0()));
        assert!(matches!(
            decide(&deleted, Some(&vm), &c),
            MigrationAction::Cancel { .. }
        ));
        let mut scheduling = deleted.clone();
        scheduling.status = Some(VMMigrationStatus {
            phase: MigrationPhase::Scheduling,
            ..Default::default()
        });
        assert!(matches!(
            decide(&scheduling, Some(&vm), &c),
            MigrationAction::Cancel { .. }
        ));

        // From PreparingTarget on, the source agent cancels: the operator waits.
        let vm = marked(&vm, "m1");
        for phase in [
            MigrationPhase::PreparingTarget,
            MigrationPhase::PreCopy,
            MigrationPhase::StopAndCopy,
            MigrationPhase::PostCopy,
            MigrationPhase::Committing,
        ] {
            let mut flying = admitted(&deleted, phase, "node-1", "node-2");
            flying.status.as_mut().unwrap().target_address = Some("x:1".into());
            assert!(
                matches!(
                    decide(&flying, Some(&vm), &c),
                    MigrationAction::Nothing { .. }
                ),
                "{phase:?}"
            );
        }

        // ... unless the source has been gone for more than a lease duration.
        // (The fixture's Leases expire at 10 s.)
        let flying = admitted(&deleted, MigrationPhase::PreCopy, "node-1", "node-2");
        let gone = 10 + i64::from(NODE_LEASE_SECONDS);
        assert!(matches!(
            decide_at(&flying, Some(&vm), Some(&c), at(gone)),
            MigrationAction::Nothing { .. }
        ));
        assert!(
            failure(decide_at(&flying, Some(&vm), Some(&c), at(gone + 1)))
                .contains("source node node-1 has not renewed its lease")
        );
    }

    fn ended(m: &VMMigration, phase: MigrationPhase) -> VMMigration {
        let mut m = admitted(m, phase, "node-1", "node-2");
        if phase == MigrationPhase::Succeeded {
            m.status.as_mut().unwrap().result = Some(MigrationResult {
                total_time_ms: 812,
                downtime_ms: 9,
                ..Default::default()
            });
        } else {
            m.status.as_mut().unwrap().failure_reason = Some("link cut".into());
        }
        m
    }

    fn moved(action: MigrationAction) -> VmMove {
        match action {
            MigrationAction::MoveVm(v) => v,
            other => panic!("expected MoveVm, got {other:?}"),
        }
    }

    #[test]
    fn the_vm_moves_as_the_final_phase_says() {
        let vm = marked(&running(), "m1");
        let c = cluster(vec![vm.clone()], vec![]);
        let m = new_migration("m1");

        let ok = moved(decide(&ended(&m, MigrationPhase::Succeeded), Some(&vm), &c));
        assert_eq!(ok.node, "node-2");
        assert_eq!(ok.result, MigrationPhase::Succeeded);
        assert_eq!(
            ok.vm_note,
            Note::normal(
                "Migrated",
                "Live-migrated from node-1 to node-2 in 812 ms, downtime 9 ms (VMMigration m1)"
            )
        );
        assert_eq!(
            ok.migration_note.message,
            "Live-migrated VM demo to node-2 in 812 ms, downtime 9 ms"
        );

        let failed = moved(decide(&ended(&m, MigrationPhase::Failed), Some(&vm), &c));
        assert_eq!(failed.node, "node-1");
        assert!(failed.vm_note.warning);
        assert!(failed
            .vm_note
            .message
            .ends_with("stays on node-1: link cut"));

        let cancelled = moved(decide(&ended(&m, MigrationPhase::Cancelled), Some(&vm), &c));
        assert_eq!(cancelled.node, "node-1");
        assert_eq!(cancelled.result, MigrationPhase::Cancelled);
        assert!(!cancelled.vm_note.warning);
    }

    #[test]
    fn ending_is_idempotent() {
        let m = ended(&new_migration("m1"), MigrationPhase::Succeeded);
        // After the move: the VM is on node-2 and names no migration.
        let settled = placed_vm("demo", "node-2", VmPhase::Running, 1, 1);
        let c = cluster(vec![settled.clone()], vec![]);
        assert_eq!(
            decide(&m, Some(&settled), &c),
            MigrationAction::ReleaseFinalizer
        );
        let mut released = m.clone();
        released.metadata.finalizers = None;
        assert_eq!(
            decide(&released, Some(&settled), &c),
            MigrationAction::Nothing { requeue: None }
        );
        // The VM was deleted meanwhile: just release.
        assert_eq!(decide(&m, None, &c), MigrationAction::ReleaseFinalizer);
        // A later migration of the same VM is not disturbed by an old one.
        let later = marked(&settled, "m2");
        assert_eq!(
            decide(&released, Some(&later), &c),
            MigrationAction::Nothing { requeue: None }
        );
    }

    #[test]
    fn an_admission_cut_short_is_finished() {
        // The VM was marked, then the operator stopped before the status.
        let vm = marked(&running(), "m1");
        let m = new_migration("m1");
        let c = cluster(vec![vm.clone()], vec![]);
        assert!(matches!(
            decide(&m, Some(&vm), &c),
            MigrationAction::Admit { .. }
        ));
        // The status was written but not the labels.
        let mut unlabelled = admitted(&m, MigrationPhase::PreparingTarget, "node-1", "node-2");
        unlabelled.metadata.labels = None;
        assert_eq!(
            decide_at(&unlabelled, Some(&vm), None, t0()),
            MigrationAction::Label {
                source: "node-1".into(),
                target: "node-2".into()
            }
        );
        // All written: nothing more to do while the agents work.
        let done = admitted(&m, MigrationPhase::PreparingTarget, "node-1", "node-2");
        assert!(matches!(
            decide_at(&done, Some(&vm), None, at(1)),
            MigrationAction::Nothing { .. }
        ));
    }
}
