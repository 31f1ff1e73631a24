//! The migration controller's writes: the migration's finalizer, labels,
//! annotations and status, and the VM's label and status when a migration
//! is admitted or ends, each with the object's resourceVersion as
//! precondition; and the Events on both.

use std::time::Duration;

use godwit_crds::contract::{
    CANCEL_ANNOTATION, MIGRATION_FINALIZER, NODE_LABEL, SOURCE_LABEL, TARGET_LABEL,
};
use godwit_crds::{MigrationMode, MigrationPhase, VMMigration, VirtualMachine, VmPhase};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::{debug, info, warn};

use super::decide::{vm_names, MigrationStep};
use crate::conditions::{self, Wanted};
use crate::context::{Context, Note};
use crate::reservations::{self, apply::ReservationError};
use crate::view::{self, migration_phase};

/// The condition type that says whether a migration was let in.
pub const ADMITTED: &str = "Admitted";

/// Why writing a migration's step failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrationWriteError {
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
    /// The target's reservation pod could not be created.
    #[error("Cannot reserve the target node")]
    Reservation(#[source] ReservationError),
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

/// Writes the step [`next_migration_step`](super::decide::next_migration_step)
/// decided.
pub async fn apply_step(
    m: &VMMigration,
    vm: Option<&VirtualMachine>,
    step: MigrationStep,
    ctx: &Context,
) -> Result<Action, MigrationWriteError> {
    let ns = m.namespace().unwrap_or_default();
    let api = Api::<VMMigration>::namespaced(ctx.client.clone(), &ns);
    let vms = Api::<VirtualMachine>::namespaced(ctx.client.clone(), &ns);
    let name = m.name_any();
    let reference = m.object_ref(&());
    let now = Timestamp::now();
    let soon = Action::requeue(Duration::from_millis(200));
    let phase = migration_phase(m);
    match step {
        MigrationStep::Nothing { requeue } => Ok(requeue
            .map(|r| Action::requeue(r.min(ctx.config.requeue)))
            .unwrap_or_else(Action::await_change)),
        MigrationStep::AddFinalizer => {
            let mut finalizers = m.finalizers().to_vec();
            finalizers.push(MIGRATION_FINALIZER.to_string());
            patch_metadata(&api, m, json!({"finalizers": finalizers}), ctx).await?;
            Ok(soon)
        }
        MigrationStep::ReleaseFinalizer => {
            let finalizers: Vec<&String> = m
                .finalizers()
                .iter()
                .filter(|f| *f != MIGRATION_FINALIZER)
                .collect();
            patch_metadata(&api, m, json!({"finalizers": finalizers}), ctx).await?;
            debug!(migration = %name, "finalizer released");
            // History is bounded: best effort, the next finished migration
            // of the VM collects again.
            let ns = m.namespace().unwrap_or_default();
            let keep = ctx.config.finished_migrations_kept;
            if let Err(e) = super::gc::collect(&ctx.client, &ns, &m.spec.vm_name, keep).await {
                warn!(migration = %name, "cannot delete older finished migrations: {}", godwit_crds::error_chain(&e));
            }
            Ok(Action::await_change())
        }
        MigrationStep::Fail { reason } => {
            end(&api, m, MigrationPhase::Failed, &reason, ctx).await?;
            warn!(migration = %name, "failed: {reason}");
            if !vm.is_some_and(|vm| vm_names(vm, m)) {
                ctx.metrics.migration_ended(MigrationPhase::Failed);
            }
            ctx.publish(&reference, "Migrate", &Note::warning("Failed", reason))
                .await;
            Ok(soon)
        }
        MigrationStep::Cancel { reason } => {
            end(&api, m, MigrationPhase::Cancelled, &reason, ctx).await?;
            info!(migration = %name, "cancelled: {reason}");
            if !vm.is_some_and(|vm| vm_names(vm, m)) {
                ctx.metrics.migration_ended(MigrationPhase::Cancelled);
            }
            ctx.publish(&reference, "Cancel", &Note::normal("Cancelled", reason))
                .await;
            Ok(soon)
        }
        MigrationStep::Wait { reason, message } => {
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
        MigrationStep::Admit { source, target } => {
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
                .map_err(MigrationWriteError::PatchVmStatus)?;
            } else if !vm_names(vm, m) {
                let from = view::vm_phase(vm);
                if !from.can_transition_to(VmPhase::Migrating) {
                    return Err(MigrationWriteError::VmTransition {
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
                .map_err(MigrationWriteError::PatchVmStatus)?;
            }
            // The target's reservation pod before the target VMM may start
            // (the agent starts it on `PreparingTarget`).
            if m.spec.mode != MigrationMode::Cold {
                let need = view::vm_footprint(vm, ctx.config.cpu_allocation_ratio);
                match reservations::apply::reserve(ctx, vm, &target, need).await {
                    Ok(()) => {}
                    Err(ReservationError::QuotaExceeded(quota)) => {
                        let reason = format!(
                            "The reservation pod on {target} was refused: {quota}; a live migration holds the VM's resources on both nodes, so the namespace's ResourceQuota needs room for one more copy"
                        );
                        end(&api, m, MigrationPhase::Failed, &reason, ctx).await?;
                        warn!(migration = %name, "failed: {reason}");
                        ctx.publish(
                            &reference,
                            "Migrate",
                            &Note::warning("QuotaExceeded", reason),
                        )
                        .await;
                        return Ok(soon);
                    }
                    Err(e) => return Err(MigrationWriteError::Reservation(e)),
                }
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
        MigrationStep::Label { source, target } => {
            patch_metadata(
                &api,
                m,
                json!({"labels": {SOURCE_LABEL: source, TARGET_LABEL: target}}),
                ctx,
            )
            .await?;
            Ok(soon)
        }
        MigrationStep::RequestCancel { message } => {
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
        MigrationStep::MoveVm(moved) => {
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
                    .map_err(MigrationWriteError::PatchVm)?;
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
            .map_err(MigrationWriteError::PatchVmStatus)?;
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

fn migration_conditions(m: &VMMigration) -> &[Condition] {
    m.status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default()
}

fn check(from: MigrationPhase, to: MigrationPhase) -> Result<(), MigrationWriteError> {
    if from.can_transition_to(to) {
        Ok(())
    } else {
        Err(MigrationWriteError::Transition { from, to })
    }
}

/// Writes a final phase the operator decided, with its reason and end time.
async fn end(
    api: &Api<VMMigration>,
    m: &VMMigration,
    to: MigrationPhase,
    reason: &str,
    ctx: &Context,
) -> Result<VMMigration, MigrationWriteError> {
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
    metadata: serde_json::Value,
    ctx: &Context,
) -> Result<VMMigration, MigrationWriteError> {
    ctx.patch_metadata(api, m, metadata)
        .await
        .map_err(MigrationWriteError::PatchMetadata)
}

/// Merge-patches the status with `m`'s resourceVersion as precondition, so
/// the operator never overwrites a phase the source agent wrote meanwhile.
async fn patch_status(
    api: &Api<VMMigration>,
    m: &VMMigration,
    status: serde_json::Value,
    ctx: &Context,
) -> Result<VMMigration, MigrationWriteError> {
    ctx.patch_status(api, m, status)
        .await
        .map_err(MigrationWriteError::PatchStatus)
}
