//! The VMMigration controller: admits migrations, picks their target, keeps
//! them within the concurrency limits and the completion timeout, and moves
//! the VM when they end. The node agents do the moving itself.
//!
//! - [`decide`]: admission, timeouts, cancelling and the VM's move, pure
//!   functions over plain data with their tests;
//! - [`apply`]: the writes (patches, Events) that carry a step out;
//! - [`gc`]: finished migrations beyond the newest kept per VM are deleted;
//! - here: the watches, the error policy and [`reconcile`], which reads,
//!   decides and writes.
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
//! - on a new migration: the finalizer [`MIGRATION_FINALIZER`](godwit_crds::contract::MIGRATION_FINALIZER); then either
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
//!   `targetNode`, `startTime`, then the labels [`SOURCE_LABEL`](godwit_crds::contract::SOURCE_LABEL) and
//!   [`TARGET_LABEL`](godwit_crds::contract::TARGET_LABEL) that hand it to the agents;
//! - while it runs: the annotation [`CANCEL_ANNOTATION`](godwit_crds::contract::CANCEL_ANNOTATION) once the completion
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

pub mod apply;
pub mod decide;
pub mod gc;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use godwit_crds::error_chain;
use godwit_crds::{VMMigration, VirtualMachine};
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::ResourceExt;
use tracing::{debug, warn};

use crate::context::{log_outcome, Context};
use crate::errors::is_conflict;
use crate::view::{migration_phase, ClusterView, Snapshot};
use apply::{apply_step, MigrationWriteError};
use decide::{has_finalizer, needs_cluster, next_migration_step, MigrationInputs};

/// Why a migration reconcile failed (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum MigrationReconcileError {
    /// The VM could not be read.
    #[error("Cannot read the VM")]
    GetVm(#[source] kube::Error),
    /// Nodes, Leases, VMs or migrations could not be listed.
    #[error("Cannot list the cluster")]
    ListCluster(#[source] kube::Error),
    /// The decided step could not be written.
    #[error("Cannot write the migration's next step")]
    Write(#[source] MigrationWriteError),
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
    warn!(migration = %m.name_any(), "reconcile failed: {}", error_chain(error));
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
        let cluster =
            ClusterView::build(&snapshot, Timestamp::now(), ctx.config.cpu_allocation_ratio);
        let step = next_migration_step(fresh, &inputs(vm, Some(&cluster)));
        return apply_step(fresh, vm, step, ctx)
            .await
            .map_err(MigrationReconcileError::Write);
    }
    let vm = Api::<VirtualMachine>::namespaced(ctx.client.clone(), &ns)
        .get_opt(&m.spec.vm_name)
        .await
        .map_err(MigrationReconcileError::GetVm)?;
    let step = next_migration_step(&m, &inputs(vm.as_ref(), None));
    apply_step(&m, vm.as_ref(), step, ctx)
        .await
        .map_err(MigrationReconcileError::Write)
}
