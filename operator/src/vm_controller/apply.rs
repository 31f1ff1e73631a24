//! The VM controller's writes: labels and the resolved machine on the VM,
//! its status (phase, node, the `Scheduled` condition) through the status
//! subresource with its resourceVersion as precondition, and the Events a
//! human sees in `kubectl describe`.

use std::time::Duration;

use godwit_crds::contract::NODE_LABEL;
use godwit_crds::{VirtualMachine, VmPhase};
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::{debug, info, warn};

use super::decide::{counts_as_crash, VmStep, RETRY_UNSCHEDULABLE};
use crate::conditions::Wanted;
use crate::context::{Context, Note};
use crate::reservations::{self, apply::ReservationError};
use crate::scheduler::Resources;
use crate::view;

/// The condition type the operator keeps on every VM it schedules.
pub const SCHEDULED: &str = "Scheduled";

/// Why writing a VM's step failed.
#[derive(Debug, thiserror::Error)]
pub enum VmWriteError {
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
    /// The VM's reservation pods or budget could not be written.
    #[error("Cannot write the VM's reservations")]
    Reservation(#[source] ReservationError),
}

/// Creates `vm`'s reservation pod on `node` before the VM may start there.
/// `Ok(false)`: a ResourceQuota refused it, and the VM now says so
/// (`Scheduled=False`, reason `QuotaExceeded`, and a warning Event).
async fn reserve_or_hold(
    api: &Api<VirtualMachine>,
    vm: &VirtualMachine,
    node: &str,
    need: Resources,
    ctx: &Context,
) -> Result<bool, VmWriteError> {
    match reservations::apply::reserve(ctx, vm, node, need).await {
        Ok(()) => Ok(true),
        Err(ReservationError::QuotaExceeded(message)) => {
            let message = format!(
                "Not started on {node}: its reservation pod was refused: {message}; raise the namespace's ResourceQuota or stop other VMs"
            );
            hold(api, vm, "QuotaExceeded", message, true, ctx).await?;
            Ok(false)
        }
        Err(e) => Err(VmWriteError::Reservation(e)),
    }
}

/// Shows why `vm` is not scheduled (condition `Scheduled=False` and an
/// Event), unless it says so already.
async fn hold(
    api: &Api<VirtualMachine>,
    vm: &VirtualMachine,
    reason: &'static str,
    message: String,
    warn: bool,
    ctx: &Context,
) -> Result<(), VmWriteError> {
    let wanted = Wanted::no(SCHEDULED, reason, message.clone());
    // Unchanged: write nothing and repeat no Event.
    if wanted.is_shown_in(view::vm_conditions(vm)) {
        return Ok(());
    }
    let patched = patch_status(api, vm, json!({"phase": view::vm_phase(vm)}), ctx).await?;
    apply_condition(api, &patched, vm, &wanted, Timestamp::now(), ctx).await?;
    debug!(vm = %vm.name_any(), reason, "not scheduled: {message}");
    let note = if warn {
        Note::warning(reason, message)
    } else {
        Note::normal(reason, message)
    };
    ctx.publish(&vm.object_ref(&()), "Schedule", &note).await;
    Ok(())
}

/// Writes the step [`next_vm_step`](super::decide::next_vm_step) decided.
pub async fn apply_step(
    vm: &VirtualMachine,
    step: VmStep,
    ctx: &Context,
) -> Result<Action, VmWriteError> {
    let api =
        Api::<VirtualMachine>::namespaced(ctx.client.clone(), &vm.namespace().unwrap_or_default());
    let name = vm.name_any();
    let reference = vm.object_ref(&());
    let now = Timestamp::now();
    let requeue = Action::requeue(ctx.config.requeue);
    match step {
        VmStep::Nothing => Ok(requeue),
        VmStep::Schedule {
            node,
            machine,
            message,
        } => {
            check(vm, VmPhase::Scheduled)?;
            let need = reservations::footprint(
                machine.cpu,
                machine.memory_bytes,
                ctx.config.cpu_allocation_ratio,
            );
            if !reserve_or_hold(&api, vm, &node, need, ctx).await? {
                return Ok(Action::requeue(RETRY_UNSCHEDULABLE));
            }
            let resolved = serde_json::to_value(&machine).map_err(VmWriteError::Serialize)?;
            let labelled =
                patch_metadata(&api, vm, json!({"labels": {NODE_LABEL: node}}), ctx).await?;
            let scheduled = Wanted::yes(SCHEDULED, "Scheduled", message.clone());
            let patched = patch_status(
                &api,
                &labelled,
                json!({
                    "phase": VmPhase::Scheduled,
                    "nodeName": node,
                    "machine": resolved,
                    "cpu": machine.cpu,
                    "memory": godwit_crds::format_quantity(machine.memory_bytes),
                }),
                ctx,
            )
            .await?;
            apply_condition(&api, &patched, vm, &scheduled, now, ctx).await?;
            info!(vm = %name, %node, "scheduled");
            ctx.publish(&reference, "Schedule", &Note::normal("Scheduled", message))
                .await;
            Ok(requeue)
        }
        VmStep::Restart { node, message } => {
            check(vm, VmPhase::Scheduled)?;
            let need = view::vm_footprint(vm, ctx.config.cpu_allocation_ratio);
            if !reserve_or_hold(&api, vm, &node, need, ctx).await? {
                return Ok(Action::requeue(RETRY_UNSCHEDULABLE));
            }
            let restarted = Wanted::yes(SCHEDULED, "Restarted", message.clone());
            let patched = patch_status(
                &api,
                vm,
                json!({"phase": VmPhase::Scheduled, "nodeName": node}),
                ctx,
            )
            .await?;
            apply_condition(&api, &patched, vm, &restarted, now, ctx).await?;
            if counts_as_crash(vm) {
                ctx.restarted(&vm.uid().unwrap_or_default());
                ctx.metrics
                    .vm_restarted(&vm.namespace().unwrap_or_default(), &name);
            }
            info!(vm = %name, %node, "restarting");
            ctx.publish(&reference, "Restart", &Note::normal("Restarting", message))
                .await;
            Ok(requeue)
        }
        VmStep::Reschedule { message } => {
            check(vm, VmPhase::Pending)?;
            // The label goes first: a VM `Pending` without a label is simply
            // scheduled, whatever happens between the two writes.
            let unlabelled = if view::vm_node(vm).is_some() {
                patch_metadata(&api, vm, json!({"labels": {NODE_LABEL: null}}), ctx).await?
            } else {
                vm.clone()
            };
            let pending = Wanted::no(SCHEDULED, "Rescheduling", message.clone());
            let patched = patch_status(
                &api,
                &unlabelled,
                json!({"phase": VmPhase::Pending, "nodeName": null}),
                ctx,
            )
            .await?;
            apply_condition(&api, &patched, vm, &pending, now, ctx).await?;
            if view::vm_phase(vm) != VmPhase::Pending && counts_as_crash(vm) {
                ctx.restarted(&vm.uid().unwrap_or_default());
                ctx.metrics
                    .vm_restarted(&vm.namespace().unwrap_or_default(), &name);
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
        VmStep::Hold {
            reason,
            message,
            warn,
            retry,
        } => {
            hold(&api, vm, reason, message, warn, ctx).await?;
            Ok(retry.map(Action::requeue).unwrap_or(requeue))
        }
        VmStep::Backoff { wait } => {
            debug!(vm = %name, "restart in {wait:?}: it keeps stopping");
            Ok(Action::requeue(wait))
        }
        VmStep::ForgetMigration { migration } => {
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
        VmStep::AnnounceDeletion { message } => {
            reservations::apply::release_all(ctx, vm)
                .await
                .map_err(VmWriteError::Reservation)?;
            let key = format!("delete/{}", vm.uid().unwrap_or_default());
            if ctx.first_time(key) {
                ctx.publish(&reference, "Delete", &Note::normal("Deleting", message))
                    .await;
            }
            Ok(requeue)
        }
    }
}

fn check(vm: &VirtualMachine, to: VmPhase) -> Result<(), VmWriteError> {
    let from = view::vm_phase(vm);
    if from.can_transition_to(to) {
        Ok(())
    } else {
        Err(VmWriteError::Transition { from, to })
    }
}

/// Merge-patches `metadata` (with `vm`'s resourceVersion as precondition).
async fn patch_metadata(
    api: &Api<VirtualMachine>,
    vm: &VirtualMachine,
    metadata: serde_json::Value,
    ctx: &Context,
) -> Result<VirtualMachine, VmWriteError> {
    ctx.patch_metadata(api, vm, metadata)
        .await
        .map_err(VmWriteError::PatchMetadata)
}

/// Merge-patches the status subresource (with `vm`'s resourceVersion as
/// precondition, so a write based on a stale read fails and is retried),
/// saying which generation of the spec it answers.
/// Applies the operator's condition `wanted` to `written` (the VM as the
/// status write just before returned it), after that write: the
/// decision's precondition (the resourceVersion it was made on) guards the
/// phase, and the condition then joins the list without rewriting the
/// agent's conditions. `read` is the VM the decision was made on.
async fn apply_condition(
    api: &Api<VirtualMachine>,
    written: &VirtualMachine,
    read: &VirtualMachine,
    wanted: &Wanted,
    now: Timestamp,
    ctx: &Context,
) -> Result<VirtualMachine, VmWriteError> {
    let condition = wanted.condition(view::vm_conditions(read), read.metadata.generation, now);
    ctx.apply_condition(api, written, &condition)
        .await
        .map_err(VmWriteError::PatchStatus)
}

async fn patch_status(
    api: &Api<VirtualMachine>,
    vm: &VirtualMachine,
    mut status: serde_json::Value,
    ctx: &Context,
) -> Result<VirtualMachine, VmWriteError> {
    if let Some(generation) = vm.metadata.generation {
        status["observedGeneration"] = json!(generation);
    }
    ctx.patch_status(api, vm, status)
        .await
        .map_err(VmWriteError::PatchStatus)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::errors::is_conflict;

    #[test]
    fn conflicts_are_found_through_the_cause_chain() {
        let conflict = kube::Error::Api(
            kube::core::Status::failure("changed", "Conflict")
                .with_code(409)
                .boxed(),
        );
        let wrapped = VmWriteError::PatchStatus(conflict);
        assert!(is_conflict(&wrapped));
        let gone = kube::Error::Api(
            kube::core::Status::failure("gone", "NotFound")
                .with_code(404)
                .boxed(),
        );
        assert!(!is_conflict(&VmWriteError::PatchStatus(gone)));
    }
}
