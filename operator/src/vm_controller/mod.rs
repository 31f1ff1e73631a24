//! The VirtualMachine controller: where a VM runs and whether it runs again.
//!
//! It owns, on a VM (see the table in [`godwit_crds::contract`]):
//! - scheduling: a `Pending` VM is resolved against its template, placed by
//!   [`scheduler::place`](crate::scheduler::place), labelled [`NODE_LABEL`]`=<node>`, given its
//!   its resolved machine in `status.machine`
//!   ([`resolved_machine`](godwit_crds::contract::resolved_machine)), and moved to `Scheduled` with `nodeName` and the
//!   condition `Scheduled=True`; when it cannot be placed the condition says
//!   why (`TemplateMissing`, `InvalidSpec`, `Unschedulable`, `Halted`);
//! - restarts by `runStrategy`: `Always` restarts a `Stopped` or `Failed` VM,
//!   `RerunOnFailure` only a `Failed` one, `Manual` and `Halted` leave it;
//!   a VM `Stopped` because its guest reset itself (Ready reason
//!   [`GUEST_RESET_REASON`](godwit_crds::contract::GUEST_RESET_REASON)) is
//!   restarted under every strategy but `Halted`.
//!   A restart goes to `Scheduled` on the same node while that node is ready
//!   and the VM still fits, else the label is cleared and the VM is scheduled
//!   again from `Pending` (re-resolved; the old node's disks are HA's concern).
//!   A VM that keeps stopping is restarted after 5 s, 10 s, 20 s ... up to
//!   5 min ([`restart_delay`](crate::restarts::restart_delay); the count
//!   lives in this process);
//! - a `Migrating` VM whose VMMigration is gone returns to `Running`;
//! - its reservation pods and PodDisruptionBudget ([`crate::reservations`]):
//!   the one on its node is made before it is scheduled or restarted there
//!   (a ResourceQuota refusal holds it with reason `QuotaExceeded`); the
//!   others follow the VM and its migration on every reconcile, and all go
//!   when the VM is deleted.
//!
//! Everything from `Scheduled` to `Running`, stopping and failing belongs to
//! the node agent; moving a VM at the end of a migration belongs to
//! [`crate::migration_controller`]. The operator adds no finalizer to VMs, so
//! deleting a VM that never reached a node is never blocked; the agent's
//! finalizer [`AGENT_FINALIZER`](godwit_crds::contract::AGENT_FINALIZER) is the agent's to remove.
//!
//! - [`decide`]: what a VM needs and the operator's next step for it, pure
//!   functions over plain data with their tests;
//! - [`apply`]: the writes (patches, Events) that carry a step out;
//! - here: the watches, the error policy and [`reconcile`], which reads,
//!   decides and writes.

pub mod apply;
pub mod decide;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use godwit_crds::contract::NODE_LABEL;
use godwit_crds::error_chain;
use godwit_crds::{ClusterVMTemplate, TemplateKind, VMMigration, VMTemplate, VirtualMachine};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::ResourceExt;
use tracing::{debug, warn};

use crate::context::{log_outcome, Context};
use crate::errors::is_conflict;
use crate::nodes;
use crate::reservations::{self, apply::ReservationError};
use crate::view::{ClusterView, Snapshot};
use apply::{apply_step, VmWriteError};
use decide::{counts_as_crash, need, needs_cluster, next_vm_step, Need, VmInputs, VmStep};

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
    /// The decided step could not be written.
    #[error("Cannot write the VM's next step")]
    Write(#[source] VmWriteError),
    /// The VM's reservation pods or budget could not be brought up to date.
    #[error("Cannot keep the VM's reservations")]
    Reservations(#[source] ReservationError),
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
                        .is_some_and(|r| r.name == name && r.kind.is_namespaced())
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
    warn!(vm = %vm.name_any(), "reconcile failed: {}", error_chain(error));
    Action::requeue(Duration::from_secs(2))
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
            Some(r) if r.kind == TemplateKind::ClusterVMTemplate => {
                Api::<ClusterVMTemplate>::all(ctx.client.clone())
                    .get_opt(&r.name)
                    .await
                    .map_err(VmReconcileError::GetTemplate)?
                    .map(|t| t.as_template())
            }
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
        let cluster =
            ClusterView::build(&snapshot, Timestamp::now(), ctx.config.cpu_allocation_ratio);
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
        let step = next_vm_step(fresh, &inputs);
        return apply_step(fresh, step, ctx)
            .await
            .map_err(VmReconcileError::Write);
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
    let step = next_vm_step(&vm, &inputs);
    if need(&vm) != Need::Deletion {
        reservations::apply::sync(ctx, &vm)
            .await
            .map_err(VmReconcileError::Reservations)?;
    }
    if step == VmStep::Nothing {
        return Ok(requeue);
    }
    apply_step(&vm, step, ctx)
        .await
        .map_err(VmReconcileError::Write)
}
