//! The VirtualMachine controller: where a VM runs and whether it runs again.
//!
//! It owns, on a VM (see the table in [`godwit_crds::contract`]):
//! - scheduling: a `Pending` VM is resolved against its template, placed by
//!   [`scheduler::place`], labelled [`NODE_LABEL`]`=<node>`, given its
//!   [`RESOLVED_ANNOTATION`], and moved to `Scheduled` with `nodeName` and the
//!   condition `Scheduled=True`; when it cannot be placed the condition says
//!   why (`TemplateMissing`, `InvalidSpec`, `Unschedulable`, `Halted`);
//! - restarts by `runStrategy`: `Always` restarts a `Stopped` or `Failed` VM,
//!   `RerunOnFailure` only a `Failed` one, `Manual` and `Halted` leave it.
//!   A restart goes to `Scheduled` on the same node while that node is ready
//!   and the VM still fits, else the label is cleared and the VM is scheduled
//!   again from `Pending` (re-resolved; the old node's disks are HA's concern).
//!   A VM that keeps stopping is restarted after 5 s, 10 s, 20 s ... up to
//!   5 min ([`restart_delay`]; the count lives in this process);
//! - a `Migrating` VM whose VMMigration is gone returns to `Running`.
//!
//! Everything from `Scheduled` to `Running`, stopping and failing belongs to
//! the node agent; moving a VM at the end of a migration belongs to
//! [`crate::migration_controller`]. The operator adds no finalizer to VMs, so
//! deleting a VM that never reached a node is never blocked; the agent's
//! finalizer [`AGENT_FINALIZER`] is the agent's to remove.
//!
//! Decisions are made by [`decide_vm`] on plain data; [`reconcile`] reads,
//! decides and writes.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use godwit_crds::contract::{Machine, AGENT_FINALIZER, NODE_LABEL, RESOLVED_ANNOTATION};
use godwit_crds::{RunStrategy, VMMigration, VMTemplate, VirtualMachine, VmPhase};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::{debug, info, warn};

use crate::conditions::{self, Wanted};
use crate::context::{is_conflict, log_outcome, Context, Note};
use crate::machine;
use crate::nodes;
use crate::scheduler::{self, Reserve, Resources, Strategy};
use crate::template::{self, ResolveError};
use crate::view::{self, ClusterView, Snapshot};

/// The condition type the operator keeps on every VM it schedules.
pub const SCHEDULED: &str = "Scheduled";
/// How soon an unschedulable VM or one with a missing template is retried.
pub const RETRY_UNSCHEDULABLE: Duration = Duration::from_secs(10);

/// Why a VM reconcile failed (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum VmReconcileError {
    /// The VM's template could not be read.
    #[error("Cannot read VMTemplate")]
    GetTemplate(#[source] kube::Error),
    /// Nodes, Leases, VMs or migrations could not be listed.
    #[error("Cannot list the cluster")]
    ListCluster(#[source] kube::Error),
    /// The VM's migration could not be read.
    #[error("Cannot read VMMigration")]
    GetMigration(#[source] kube::Error),
    /// The VM's labels or annotations could not be written.
    #[error("Cannot patch VM metadata")]
    PatchMetadata(#[source] kube::Error),
    /// The VM's status could not be written.
    #[error("Cannot patch VM status")]
    PatchStatus(#[source] kube::Error),
    /// A decision asked for a phase change the VM's life cycle forbids.
    #[error("VM phase {from:?} cannot become {to:?}")]
    Transition {
        /// Current phase.
        from: VmPhase,
        /// Refused phase.
        to: VmPhase,
    },
    /// The resolved machine could not be serialized.
    #[error("Cannot serialize the resolved machine")]
    Serialize(#[source] serde_json::Error),
}

/// What a VM needs from the operator, judged from the VM alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Not on a node yet: resolve and place it.
    Placement,
    /// `Pending` with `runStrategy: Halted`: stays off.
    Halted,
    /// Stopped or failed, and its `runStrategy` starts it again.
    Restart,
    /// `Migrating`: its migration must still exist.
    MigrationCheck,
    /// Being deleted: the agent's finalizer does the work.
    Deletion,
    /// The node agent owns what happens next.
    Nothing,
}

/// What `vm` needs from the operator.
pub fn need(vm: &VirtualMachine) -> Need {
    if vm.metadata.deletion_timestamp.is_some() {
        return Need::Deletion;
    }
    let strategy = vm.spec.run_strategy;
    match view::vm_phase(vm) {
        VmPhase::Pending if strategy == RunStrategy::Halted => Need::Halted,
        VmPhase::Pending => Need::Placement,
        // A stopped VM that a cold migration moves stays as it is until
        // the migration ends (or is found gone).
        VmPhase::Stopped | VmPhase::Failed
            if vm.status.as_ref().is_some_and(|s| s.migration.is_some()) =>
        {
            Need::MigrationCheck
        }
        VmPhase::Stopped if strategy == RunStrategy::Always => Need::Restart,
        VmPhase::Failed
            if matches!(strategy, RunStrategy::Always | RunStrategy::RerunOnFailure) =>
        {
            Need::Restart
        }
        VmPhase::Migrating => Need::MigrationCheck,
        _ => Need::Nothing,
    }
}

/// Whether deciding for `vm` needs the template and the cluster.
pub fn needs_cluster(vm: &VirtualMachine) -> bool {
    matches!(need(vm), Need::Placement | Need::Restart)
}

/// What [`decide_vm`] reads besides the VM.
pub struct VmInputs<'a> {
    /// The VM's template, if it names one and it exists.
    pub template: Option<&'a VMTemplate>,
    /// Nodes and what occupies them.
    pub cluster: &'a ClusterView,
    /// Spread or pack.
    pub strategy: Strategy,
    /// Room kept free on every node.
    pub reserve: Reserve,
    /// For a `Migrating` VM: whether the VMMigration it names exists.
    pub migration_exists: bool,
    /// How long a restart must still wait (see [`restart_delay`]).
    pub restart_wait: Duration,
}

/// First wait between restarts of a VM that keeps stopping.
pub const RESTART_BACKOFF: Duration = Duration::from_secs(5);
/// Longest wait between restarts.
pub const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(300);
/// Restarts further apart than this do not count as a crash loop.
pub const RESTART_RESET: Duration = Duration::from_secs(600);

/// How long a VM restarted `count` times in a row, the last `since` ago,
/// must still wait before the next restart: none for the first, then 5 s,
/// 10 s, 20 s ... up to 5 min; a VM that ran for 10 min starts afresh.
pub fn restart_delay(count: u32, since: Duration) -> Duration {
    if count == 0 || since >= RESTART_RESET {
        return Duration::ZERO;
    }
    let backoff = RESTART_BACKOFF
        .saturating_mul(1 << (count - 1).min(16))
        .min(RESTART_BACKOFF_MAX);
    backoff.saturating_sub(since)
}

/// What to write for a VM.
#[derive(Clone, Debug, PartialEq)]
pub enum VmAction {
    /// Nothing to write.
    Nothing,
    /// Label the VM for `node`, store its resolved machine, then status
    /// `Scheduled` on `node`.
    Schedule {
        /// The chosen node.
        node: String,
        /// What it runs as.
        machine: Machine,
        /// Event text.
        message: String,
    },
    /// Start a stopped or failed VM again on its node (status `Scheduled`).
    Restart {
        /// Its node.
        node: String,
        /// Event text.
        message: String,
    },
    /// A restart is due but the VM keeps stopping: wait before it.
    Backoff {
        /// How long.
        wait: Duration,
    },
    /// Take the VM off its node and schedule it again (label cleared, status
    /// `Pending`).
    Reschedule {
        /// Event text.
        message: String,
    },
    /// The VM cannot be placed now: condition `Scheduled=False` with `reason`.
    Hold {
        /// Condition reason.
        reason: &'static str,
        /// Why, and what to do.
        message: String,
        /// Whether a Warning event goes with it.
        warn: bool,
        /// When to look again (besides any change of the VM).
        retry: Option<Duration>,
    },
    /// The VMMigration that moved the VM is gone: back to `Running`.
    ForgetMigration {
        /// The migration named in the status.
        migration: String,
    },
    /// The VM is being deleted; tell a human who does the work.
    AnnounceDeletion {
        /// Event text.
        message: String,
    },
}

/// Decides what the operator writes for `vm`.
pub fn decide_vm(vm: &VirtualMachine, inputs: &VmInputs<'_>) -> VmAction {
    match need(vm) {
        Need::Deletion => {
            if !vm.finalizers().iter().any(|f| f == AGENT_FINALIZER) {
                return VmAction::Nothing;
            }
            let node = view::vm_node(vm).unwrap_or("its node");
            VmAction::AnnounceDeletion {
                message: format!(
                    "Deleting: the node agent on {node} stops the VM and removes its disks, then releases it"
                ),
            }
        }
        Need::Halted => VmAction::Hold {
            reason: "Halted",
            message: "runStrategy is Halted: the VM is not scheduled".into(),
            warn: false,
            retry: None,
        },
        Need::Placement => place(vm, inputs),
        Need::Restart if !inputs.restart_wait.is_zero() => VmAction::Backoff {
            wait: inputs.restart_wait,
        },
        Need::Restart => restart(vm, inputs),
        Need::MigrationCheck if !inputs.migration_exists => {
            match vm.status.as_ref().and_then(|s| s.migration.clone()) {
                Some(migration) => VmAction::ForgetMigration { migration },
                None => VmAction::Nothing,
            }
        }
        Need::MigrationCheck | Need::Nothing => VmAction::Nothing,
    }
}

fn place(vm: &VirtualMachine, inputs: &VmInputs<'_>) -> VmAction {
    let name = vm.name_any();
    let resolved = match template::resolve(&name, &vm.spec, inputs.template.map(|t| &t.spec)) {
        Ok(r) => r,
        Err(e @ ResolveError::TemplateMissing(_)) => {
            return VmAction::Hold {
                reason: "TemplateMissing",
                message: e.to_string(),
                warn: true,
                retry: Some(RETRY_UNSCHEDULABLE),
            }
        }
        Err(e) => return invalid(e.to_string()),
    };
    let uid = vm.uid().unwrap_or_default();
    let machine = match machine::build(&uid, &resolved, inputs.template) {
        Ok(m) => m,
        Err(e) => return invalid(e.to_string()),
    };
    let request = view::request_for(
        vm,
        Resources {
            cpu: u64::from(machine.cpu),
            memory: machine.memory_bytes,
        },
    );
    let nodes = &inputs.cluster.nodes;
    let verdicts = scheduler::evaluate(
        &request,
        nodes,
        &inputs.cluster.placed,
        inputs.reserve,
        inputs.strategy,
    );
    let fit = verdicts.iter().filter(|(_, v)| v.is_ok()).count();
    // A VM labelled before its status was written (a write cut short) keeps
    // its node while that node still takes it.
    let labelled = view::vm_node(vm)
        .filter(|l| verdicts.iter().any(|(n, v)| n == l && v.is_ok()))
        .map(str::to_string);
    let chosen = match labelled {
        Some(node) => Ok(node),
        None => scheduler::best(verdicts),
    };
    match chosen {
        Ok(node) => VmAction::Schedule {
            message: format!(
                "Scheduled on {node} ({}: {fit} of {} nodes fit)",
                inputs.strategy,
                nodes.len()
            ),
            node,
            machine,
        },
        Err(_) if nodes.is_empty() => VmAction::Hold {
            reason: "Unschedulable",
            message: format!("no Godwit nodes: no Node is labelled {NODE_LABEL}"),
            warn: true,
            retry: Some(RETRY_UNSCHEDULABLE),
        },
        Err(why) => VmAction::Hold {
            reason: "Unschedulable",
            message: why.to_string(),
            warn: true,
            retry: Some(RETRY_UNSCHEDULABLE),
        },
    }
}

fn invalid(message: String) -> VmAction {
    VmAction::Hold {
        reason: "InvalidSpec",
        message: format!("{message}; fix the VM's spec"),
        warn: true,
        retry: None,
    }
}

fn restart(vm: &VirtualMachine, inputs: &VmInputs<'_>) -> VmAction {
    let phase = view::vm_phase(vm);
    let why = format!("runStrategy {:?}, was {phase:?}", vm.spec.run_strategy);
    let (Some(node), Some(machine)) = (view::vm_node(vm), view::resolved_machine(vm)) else {
        return VmAction::Reschedule {
            message: format!("Scheduling again ({why})"),
        };
    };
    let request = view::request_for(
        vm,
        Resources {
            cpu: u64::from(machine.cpu),
            memory: machine.memory_bytes,
        },
    );
    let Some(info) = inputs.cluster.node(node) else {
        return VmAction::Reschedule {
            message: format!("Scheduling again: {node} is no longer a Godwit node ({why})"),
        };
    };
    let verdict = scheduler::evaluate(
        &request,
        std::slice::from_ref(info),
        &inputs.cluster.placed,
        inputs.reserve,
        inputs.strategy,
    )
    .remove(0)
    .1;
    match verdict {
        Ok(_) => VmAction::Restart {
            node: node.to_string(),
            message: format!("Restarting on {node} ({why})"),
        },
        Err(refusal) => VmAction::Reschedule {
            message: format!("Scheduling again: {node} cannot run it now: {refusal} ({why})"),
        },
    }
}

/// Runs the VM controller until its watches end.
pub async fn run(ctx: Arc<Context>) {
    let client = ctx.client.clone();
    let controller = Controller::new(
        Api::<VirtualMachine>::all(client.clone()),
        watcher::Config::default(),
    );
    let store = controller.store();
    ctx.metrics.watch_vms(store.clone());
    let by_template = {
        let store = store.clone();
        move |t: VMTemplate| {
            let ns = t.namespace();
            let name = t.name_any();
            waiting(&store, move |vm| {
                vm.namespace() == ns
                    && vm
                        .spec
                        .template_ref
                        .as_ref()
                        .is_some_and(|r| r.name == name)
            })
        }
    };
    let by_node = {
        let store = store.clone();
        move |_: Node| waiting(&store, |_| true)
    };
    // Agents renew their Lease every few seconds; only a Lease that turns
    // fresh (a node back or new) can unblock a waiting VM.
    let fresh_leases = std::sync::Mutex::new(std::collections::HashMap::<String, bool>::new());
    let by_lease = move |lease: Lease| {
        let fresh = nodes::lease_expiry(&lease).is_some_and(|t| t > Timestamp::now());
        let was = fresh_leases
            .lock()
            .expect("lease map poisoned")
            .insert(lease.name_any(), fresh);
        if fresh && was != Some(true) {
            waiting(&store, |_| true)
        } else {
            Vec::new()
        }
    };
    controller
        .watches(
            Api::<VMTemplate>::all(client.clone()),
            watcher::Config::default(),
            by_template,
        )
        .watches(
            Api::<Node>::all(client.clone()),
            watcher::Config::default().labels(NODE_LABEL),
            by_node,
        )
        .watches(
            Api::<Lease>::namespaced(client, &ctx.config.lease_namespace),
            watcher::Config::default(),
            by_lease,
        )
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|result| async move {
            log_outcome("vm", result.err());
        })
        .await;
}

/// The cached VMs waiting for a node or a restart that `filter` selects.
fn waiting(
    store: &Store<VirtualMachine>,
    filter: impl Fn(&VirtualMachine) -> bool,
) -> Vec<ObjectRef<VirtualMachine>> {
    store
        .state()
        .iter()
        .filter(|vm| needs_cluster(vm) && filter(vm))
        .map(|vm| ObjectRef::from_obj(vm.as_ref()))
        .collect()
}

fn error_policy(vm: Arc<VirtualMachine>, error: &VmReconcileError, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconciled("vm", false);
    if is_conflict(error) {
        debug!(vm = %vm.name_any(), "changed meanwhile; deciding again");
        return Action::requeue(Duration::from_millis(200));
    }
    warn!(vm = %vm.name_any(), "reconcile failed: {error}: {}", error_chain(error));
    Action::requeue(Duration::from_secs(2))
}

/// The causes of `e`, for logs.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = Vec::new();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push(c.to_string());
        cause = c.source();
    }
    out.join(": ")
}

/// Reads what the decision needs, decides, writes.
pub async fn reconcile(
    vm: Arc<VirtualMachine>,
    ctx: Arc<Context>,
) -> Result<Action, VmReconcileError> {
    let started = std::time::Instant::now();
    let span = tracing::info_span!("vm", namespace = %vm.namespace().unwrap_or_default(), vm = %vm.name_any());
    let result = tracing::Instrument::instrument(reconcile_inner(vm, &ctx), span).await;
    ctx.metrics.reconcile_took("vm", started.elapsed());
    if result.is_ok() {
        ctx.metrics.reconciled("vm", true);
    }
    result
}

async fn reconcile_inner(
    vm: Arc<VirtualMachine>,
    ctx: &Context,
) -> Result<Action, VmReconcileError> {
    let requeue = Action::requeue(ctx.config.requeue);
    let ns = vm.namespace().unwrap_or_default();
    if needs_cluster(&vm) {
        // From the lists to the writes, no other placement may interleave.
        let _placement = ctx.placement.lock().await;
        let template = match &vm.spec.template_ref {
            Some(r) => Api::<VMTemplate>::namespaced(ctx.client.clone(), &ns)
                .get_opt(&r.name)
                .await
                .map_err(VmReconcileError::GetTemplate)?,
            None => None,
        };
        let snapshot = Snapshot::fetch(&ctx.client, &ctx.config.lease_namespace)
            .await
            .map_err(VmReconcileError::ListCluster)?;
        // The cached VM may predate our own last write; decide on the listed one.
        let Some(fresh) = snapshot.vms.iter().find(|v| v.uid() == vm.uid()) else {
            return Ok(Action::await_change());
        };
        let cluster = ClusterView::build(&snapshot, Timestamp::now());
        let inputs = VmInputs {
            template: template.as_ref(),
            cluster: &cluster,
            strategy: ctx.config.placement,
            reserve: ctx.config.reserve,
            migration_exists: true,
            restart_wait: if counts_as_crash(fresh) {
                ctx.restart_wait(&fresh.uid().unwrap_or_default())
            } else {
                Duration::ZERO
            },
        };
        let action = decide_vm(fresh, &inputs);
        return apply(fresh, action, ctx).await;
    }
    let mut migration_exists = true;
    if need(&vm) == Need::MigrationCheck {
        if let Some(name) = vm.status.as_ref().and_then(|s| s.migration.as_deref()) {
            migration_exists = Api::<VMMigration>::namespaced(ctx.client.clone(), &ns)
                .get_opt(name)
                .await
                .map_err(VmReconcileError::GetMigration)?
                .is_some();
        }
    }
    let cluster = ClusterView::default();
    let inputs = VmInputs {
        template: None,
        cluster: &cluster,
        strategy: ctx.config.placement,
        reserve: ctx.config.reserve,
        migration_exists,
        restart_wait: Duration::ZERO,
    };
    let action = decide_vm(&vm, &inputs);
    if action == VmAction::Nothing {
        return Ok(requeue);
    }
    apply(&vm, action, ctx).await
}

/// Writes what [`decide_vm`] decided.
async fn apply(
    vm: &VirtualMachine,
    action: VmAction,
    ctx: &Context,
) -> Result<Action, VmReconcileError> {
    let api =
        Api::<VirtualMachine>::namespaced(ctx.client.clone(), &vm.namespace().unwrap_or_default());
    let name = vm.name_any();
    let reference = vm.object_ref(&());
    let now = Timestamp::now();
    let requeue = Action::requeue(ctx.config.requeue);
    match action {
        VmAction::Nothing => Ok(requeue),
        VmAction::Schedule {
            node,
            machine,
            message,
        } => {
            check(vm, VmPhase::Scheduled)?;
            let resolved = serde_json::to_string(&machine).map_err(VmReconcileError::Serialize)?;
            let labelled = patch_metadata(
                &api,
                vm,
                json!({
                    "labels": {NODE_LABEL: node},
                    "annotations": {RESOLVED_ANNOTATION: resolved},
                }),
                ctx,
            )
            .await?;
            let scheduled = Wanted::yes(SCHEDULED, "Scheduled", message.clone());
            patch_status(
                &api,
                &labelled,
                json!({
                    "phase": VmPhase::Scheduled,
                    "nodeName": node,
                    "conditions": conditions::merge(status_conditions(vm), &scheduled, vm.metadata.generation, now),
                }),
                ctx,
            )
            .await?;
            info!(vm = %name, %node, "scheduled");
            ctx.publish(&reference, "Schedule", &Note::normal("Scheduled", message))
                .await;
            Ok(requeue)
        }
        VmAction::Restart { node, message } => {
            check(vm, VmPhase::Scheduled)?;
            let restarted = Wanted::yes(SCHEDULED, "Restarted", message.clone());
            patch_status(
                &api,
                vm,
                json!({
                    "phase": VmPhase::Scheduled,
                    "nodeName": node,
                    "conditions": conditions::merge(status_conditions(vm), &restarted, vm.metadata.generation, now),
                }),
                ctx,
            )
            .await?;
            if counts_as_crash(vm) {
                ctx.restarted(&vm.uid().unwrap_or_default());
            }
            info!(vm = %name, %node, "restarting");
            ctx.publish(&reference, "Restart", &Note::normal("Restarting", message))
                .await;
            Ok(requeue)
        }
        VmAction::Reschedule { message } => {
            check(vm, VmPhase::Pending)?;
            // The label goes first: a VM `Pending` without a label is simply
            // scheduled, whatever happens between the two writes.
            let unlabelled = if view::vm_node(vm).is_some() {
                patch_metadata(&api, vm, json!({"labels": {NODE_LABEL: null}}), ctx).await?
            } else {
                vm.clone()
            };
            let pending = Wanted::no(SCHEDULED, "Rescheduling", message.clone());
            patch_status(
                &api,
                &unlabelled,
                json!({
                    "phase": VmPhase::Pending,
                    "nodeName": null,
                    "conditions": conditions::merge(status_conditions(vm), &pending, vm.metadata.generation, now),
                }),
                ctx,
            )
            .await?;
            if view::vm_phase(vm) != VmPhase::Pending && counts_as_crash(vm) {
                ctx.restarted(&vm.uid().unwrap_or_default());
            }
            info!(vm = %name, "rescheduling");
            ctx.publish(
                &reference,
                "Restart",
                &Note::normal("Rescheduling", message),
            )
            .await;
            Ok(Action::requeue(Duration::from_millis(100)))
        }
        VmAction::Hold {
            reason,
            message,
            warn,
            retry,
        } => {
            let wanted = Wanted::no(SCHEDULED, reason, message.clone());
            // Unchanged: write nothing and repeat no Event.
            if !wanted.is_shown_in(status_conditions(vm)) {
                patch_status(
                    &api,
                    vm,
                    json!({
                        "phase": view::vm_phase(vm),
                        "conditions": conditions::merge(status_conditions(vm), &wanted, vm.metadata.generation, now),
                    }),
                    ctx,
                )
                .await?;
                debug!(vm = %name, reason, "not scheduled: {message}");
                let note = if warn {
                    Note::warning(reason, message)
                } else {
                    Note::normal(reason, message)
                };
                ctx.publish(&reference, "Schedule", &note).await;
            }
            Ok(retry.map(Action::requeue).unwrap_or(requeue))
        }
        VmAction::Backoff { wait } => {
            debug!(vm = %name, "restart in {wait:?}: it keeps stopping");
            Ok(Action::requeue(wait))
        }
        VmAction::ForgetMigration { migration } => {
            // A live migration's VM runs again where it is; a cold one's
            // stays stopped.
            let phase = match view::vm_phase(vm) {
                VmPhase::Migrating => VmPhase::Running,
                other => other,
            };
            check(vm, phase)?;
            patch_status(&api, vm, json!({"phase": phase, "migration": null}), ctx).await?;
            let message = format!(
                "VMMigration {migration} is gone before it ended; the VM is {phase:?} on {}",
                view::vm_node(vm).unwrap_or("its node")
            );
            warn!(vm = %name, "{message}");
            ctx.publish(
                &reference,
                "Migrate",
                &Note::warning("MigrationLost", message),
            )
            .await;
            Ok(requeue)
        }
        VmAction::AnnounceDeletion { message } => {
            let key = format!("delete/{}", vm.uid().unwrap_or_default());
            if ctx.first_time(key) {
                ctx.publish(&reference, "Delete", &Note::normal("Deleting", message))
                    .await;
            }
            Ok(requeue)
        }
    }
}

/// Whether the VM stopped or failed of its own accord, so that restarting it
/// counts towards the crash-loop backoff ([`restart_delay`]). A VM failed
/// over from a lost node (HA's `Ready=False`, reason `NodeLost`) did not: it
/// is restarted at once however often its nodes were lost.
pub fn counts_as_crash(vm: &VirtualMachine) -> bool {
    !status_conditions(vm)
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "False" && c.reason == "NodeLost")
}

fn status_conditions(
    vm: &VirtualMachine,
) -> &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition] {
    vm.status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default()
}

fn check(vm: &VirtualMachine, to: VmPhase) -> Result<(), VmReconcileError> {
    let from = view::vm_phase(vm);
    if from.can_transition_to(to) {
        Ok(())
    } else {
        Err(VmReconcileError::Transition { from, to })
    }
}

/// Merge-patches `metadata` (with `vm`'s resourceVersion as precondition).
async fn patch_metadata(
    api: &Api<VirtualMachine>,
    vm: &VirtualMachine,
    mut metadata: serde_json::Value,
    ctx: &Context,
) -> Result<VirtualMachine, VmReconcileError> {
    metadata["resourceVersion"] = json!(vm.resource_version());
    api.patch(
        &vm.name_any(),
        &ctx.patch_params(),
        &Patch::Merge(json!({ "metadata": metadata })),
    )
    .await
    .map_err(VmReconcileError::PatchMetadata)
}

/// Merge-patches the status subresource (with `vm`'s resourceVersion as
/// precondition, so a write based on a stale read fails and is retried).
async fn patch_status(
    api: &Api<VirtualMachine>,
    vm: &VirtualMachine,
    status: serde_json::Value,
    ctx: &Context,
) -> Result<VirtualMachine, VmReconcileError> {
    let mut status = status;
    if let Some(generation) = vm.metadata.generation {
        status["observedGeneration"] = json!(generation);
    }
    api.patch_status(
        &vm.name_any(),
        &ctx.patch_params(),
        &Patch::Merge(json!({
            "metadata": {"resourceVersion": vm.resource_version()},
            "status": status,
        })),
    )
    .await
    .map_err(VmReconcileError::PatchStatus)
}

#[cfg(test)]
mod tests {
    use godwit_crds::vm::{Disk, DiskSource, TemplateDiskSource};
    use godwit_crds::VirtualMachineStatus;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;
    use crate::machine::fixtures::template;
    use crate::nodes::fixtures::{lease, node};
    use crate::view::fixtures::{placed_vm, vm};

    fn now() -> Timestamp {
        Timestamp::from_second(1_700_000_000).unwrap()
    }

    /// Three ready 4-CPU 4-GiB nodes, `vms` on them.
    fn cluster(vms: Vec<VirtualMachine>) -> ClusterView {
        let names = ["node-1", "node-2", "node-3"];
        let snapshot = Snapshot {
            nodes: names.iter().map(|n| node(n, 4, 4)).collect(),
            leases: names.iter().map(|n| lease(n, now(), 10)).collect(),
            vms,
            migrations: vec![],
        };
        ClusterView::build(&snapshot, now())
    }

    fn from_template(name: &str) -> VirtualMachine {
        let mut v = vm(name);
        v.spec.disks = vec![Disk {
            name: "root".into(),
            source: DiskSource {
                template: Some(TemplateDiskSource {}),
                ..Default::default()
            },
            ..Default::default()
        }];
        v
    }

    fn decide(
        vm: &VirtualMachine,
        template: Option<&VMTemplate>,
        cluster: &ClusterView,
    ) -> VmAction {
        decide_vm(
            vm,
            &VmInputs {
                template,
                cluster,
                strategy: Strategy::Spread,
                reserve: Reserve::default(),
                migration_exists: true,
                restart_wait: Duration::ZERO,
            },
        )
    }

    #[test]
    fn a_pending_vm_is_scheduled_with_its_resolved_machine() {
        let t = template();
        let c = cluster(vec![placed_vm("busy", "node-1", VmPhase::Running, 1, 1)]);
        let VmAction::Schedule {
            node,
            machine,
            message,
        } = decide(&from_template("demo"), Some(&t), &c)
        else {
            panic!("not scheduled");
        };
        assert_eq!(node, "node-2", "spread avoids the busy node, ties by name");
        assert_eq!(message, "Scheduled on node-2 (spread: 3 of 3 nodes fit)");
        assert_eq!(machine.memory_bytes, 1 << 30);
        assert_eq!(machine.template_digest.as_deref(), Some("sha256:abc"));
    }

    #[test]
    fn unschedulable_vms_say_why_for_each_node() {
        let t = template();
        let mut big = from_template("big");
        big.spec.memory = Some("8Gi".into());
        let c = cluster(vec![]);
        let VmAction::Hold {
            reason,
            message,
            warn,
            retry,
        } = decide(&big, Some(&t), &c)
        else {
            panic!("scheduled");
        };
        assert_eq!(reason, "Unschedulable");
        assert!(warn);
        assert_eq!(retry, Some(RETRY_UNSCHEDULABLE));
        for n in ["node-1", "node-2", "node-3"] {
            assert!(
                message.contains(&format!(
                    "{n}: insufficient memory (need 8192Mi, free 4096Mi)"
                )),
                "{message}"
            );
        }
        let none = decide(&big, Some(&t), &ClusterView::default());
        assert!(
            matches!(none, VmAction::Hold { message, .. } if message.contains("no Godwit nodes"))
        );
    }

    #[test]
    fn a_missing_template_holds_the_vm_and_halted_vms_stay_off() {
        let c = cluster(vec![]);
        let action = decide(&from_template("demo"), None, &c);
        assert!(
            matches!(&action, VmAction::Hold { reason: "TemplateMissing", warn: true, message, .. } if message.contains("\"base\"")),
            "{action:?}"
        );
        let mut halted = from_template("demo");
        halted.spec.run_strategy = RunStrategy::Halted;
        assert!(matches!(
            decide(&halted, Some(&template()), &c),
            VmAction::Hold {
                reason: "Halted",
                warn: false,
                ..
            }
        ));
        let mut bad = from_template("demo");
        bad.spec.template_ref = None;
        assert!(matches!(
            decide(&bad, None, &c),
            VmAction::Hold {
                reason: "InvalidSpec",
                ..
            }
        ));
    }

    #[test]
    fn a_half_scheduled_vm_keeps_its_node_while_it_fits() {
        let t = template();
        let mut v = from_template("demo");
        v.metadata.labels = Some([(NODE_LABEL.to_string(), "node-3".to_string())].into());
        let c = cluster(vec![]);
        assert!(
            matches!(decide(&v, Some(&t), &c), VmAction::Schedule { node, .. } if node == "node-3")
        );
        // node-3 is full now: placed elsewhere.
        let c = cluster(vec![placed_vm("hog", "node-3", VmPhase::Running, 4, 4)]);
        assert!(
            matches!(decide(&v, Some(&t), &c), VmAction::Schedule { node, .. } if node == "node-1")
        );
    }

    #[test]
    fn scheduled_vms_are_the_agents_and_deciding_twice_changes_nothing() {
        let c = cluster(vec![]);
        for phase in [
            VmPhase::Scheduled,
            VmPhase::Provisioning,
            VmPhase::Starting,
            VmPhase::Running,
            VmPhase::Stopping,
        ] {
            let v = placed_vm("demo", "node-1", phase, 1, 1);
            assert_eq!(
                decide(&v, Some(&template()), &c),
                VmAction::Nothing,
                "{phase:?}"
            );
        }
    }

    fn stopped(phase: VmPhase, strategy: RunStrategy) -> VirtualMachine {
        let mut v = placed_vm("demo", "node-1", phase, 1, 1);
        v.spec.run_strategy = strategy;
        v
    }

    #[test]
    fn restarts_follow_the_run_strategy() {
        use RunStrategy::*;
        use VmPhase::{Failed, Stopped};
        let c = cluster(vec![]);
        let cases = [
            (Stopped, Always, true),
            (Failed, Always, true),
            (Stopped, RerunOnFailure, false),
            (Failed, RerunOnFailure, true),
            (Stopped, Manual, false),
            (Failed, Manual, false),
            (Stopped, Halted, false),
            (Failed, Halted, false),
        ];
        for (phase, strategy, restarts) in cases {
            let action = decide(&stopped(phase, strategy), None, &c);
            if restarts {
                assert!(
                    matches!(&action, VmAction::Restart { node, message } if node == "node-1" && message.contains(&format!("was {phase:?}"))),
                    "{phase:?} {strategy:?}: {action:?}"
                );
            } else {
                assert_eq!(action, VmAction::Nothing, "{phase:?} {strategy:?}");
            }
        }
    }

    #[test]
    fn a_vm_failed_over_from_a_lost_node_is_not_a_crash_loop() {
        let mut v = stopped(VmPhase::Failed, RunStrategy::Always);
        assert!(counts_as_crash(&v));
        v.status.as_mut().unwrap().conditions = vec![Condition {
            type_: "Ready".into(),
            status: "False".into(),
            reason: "NodeLost".into(),
            message: "node node-0 is lost".into(),
            last_transition_time: Time(Timestamp::now()),
            observed_generation: None,
        }];
        assert!(!counts_as_crash(&v));
        v.status.as_mut().unwrap().conditions[0].reason = "VmmExited".into();
        assert!(counts_as_crash(&v));
    }

    #[test]
    fn a_vm_that_keeps_stopping_is_restarted_with_backoff() {
        assert_eq!(restart_delay(0, Duration::ZERO), Duration::ZERO);
        assert_eq!(
            restart_delay(1, Duration::from_secs(1)),
            Duration::from_secs(4)
        );
        assert_eq!(restart_delay(3, Duration::ZERO), Duration::from_secs(20));
        assert_eq!(restart_delay(30, Duration::ZERO), RESTART_BACKOFF_MAX);
        assert_eq!(restart_delay(30, RESTART_RESET), Duration::ZERO);
        let c = cluster(vec![]);
        let v = stopped(VmPhase::Failed, RunStrategy::Always);
        let inputs = VmInputs {
            template: None,
            cluster: &c,
            strategy: Strategy::Spread,
            reserve: Reserve::default(),
            migration_exists: true,
            restart_wait: Duration::from_secs(4),
        };
        assert_eq!(
            decide_vm(&v, &inputs),
            VmAction::Backoff {
                wait: Duration::from_secs(4)
            }
        );
    }

    #[test]
    fn a_restart_moves_away_from_a_node_that_cannot_run_it() {
        let v = stopped(VmPhase::Failed, RunStrategy::Always);
        let mut c = cluster(vec![placed_vm("hog", "node-1", VmPhase::Running, 4, 4)]);
        assert!(matches!(
            decide(&v, None, &c),
            VmAction::Reschedule { message } if message.contains("insufficient")
        ));
        c = cluster(vec![]);
        c.nodes[0].ready = false;
        assert!(matches!(
            decide(&v, None, &c),
            VmAction::Reschedule { message } if message.contains("node not ready")
        ));
        let mut unlabelled = v.clone();
        unlabelled.metadata.labels = None;
        assert!(matches!(
            decide(&unlabelled, None, &c),
            VmAction::Reschedule { .. }
        ));
    }

    #[test]
    fn an_ha_restart_keeps_anti_affinity() {
        // demo (app=db, apart from app=db) ran on node-1, which is lost;
        // db-2 runs on node-2: the restart must go to node-3, though spread
        // alone would pick node-2 (node-3 is fuller).
        let apart = Some(godwit_crds::vm::VmAffinity {
            vm_anti_affinity: vec![godwit_crds::vm::VmAffinityTerm {
                label_selector: k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
                    match_labels: Some([("app".to_string(), "db".to_string())].into()),
                    ..Default::default()
                },
            }],
            ..Default::default()
        });
        let mut db2 = placed_vm("db-2", "node-2", VmPhase::Running, 1, 1);
        db2.metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("app".into(), "db".into());
        let hog = placed_vm("hog", "node-3", VmPhase::Running, 1, 2);
        let mut c = cluster(vec![db2, hog]);
        c.nodes[0].ready = false;
        let mut failed = stopped(VmPhase::Failed, RunStrategy::Always);
        failed.spec.affinity = apart.clone();
        assert!(matches!(
            decide(&failed, None, &c),
            VmAction::Reschedule { .. }
        ));
        let t = template();
        let mut pending = from_template("demo");
        pending.metadata.labels = Some([("app".to_string(), "db".to_string())].into());
        pending.spec.affinity = apart;
        assert!(matches!(
            decide(&pending, Some(&t), &c),
            VmAction::Schedule { node, .. } if node == "node-3"
        ));
    }

    #[test]
    fn deletion_is_announced_only_while_the_agent_holds_the_vm() {
        let c = cluster(vec![]);
        let mut v = placed_vm("demo", "node-1", VmPhase::Running, 1, 1);
        v.metadata.deletion_timestamp = Some(Time(now()));
        assert_eq!(
            decide(&v, None, &c),
            VmAction::Nothing,
            "never scheduled: not blocked"
        );
        v.metadata.finalizers = Some(vec![AGENT_FINALIZER.into()]);
        assert!(matches!(
            decide(&v, None, &c),
            VmAction::AnnounceDeletion { message } if message.contains("node-1")
        ));
    }

    #[test]
    fn a_migrating_vm_whose_migration_is_gone_runs_again() {
        let mut v = placed_vm("demo", "node-1", VmPhase::Migrating, 1, 1);
        v.status = Some(VirtualMachineStatus {
            phase: VmPhase::Migrating,
            migration: Some("m1".into()),
            ..Default::default()
        });
        let c = ClusterView::default();
        let mut inputs = VmInputs {
            template: None,
            cluster: &c,
            strategy: Strategy::Spread,
            reserve: Reserve::default(),
            migration_exists: true,
            restart_wait: Duration::ZERO,
        };
        assert_eq!(decide_vm(&v, &inputs), VmAction::Nothing);
        inputs.migration_exists = false;
        assert_eq!(
            decide_vm(&v, &inputs),
            VmAction::ForgetMigration {
                migration: "m1".into()
            }
        );
    }
}
