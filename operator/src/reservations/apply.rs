//! The writes that keep a VM's reservation pods and PodDisruptionBudget as
//! [`super`] says they should be.

use godwit_crds::{VMMigration, VirtualMachine, VmPhase};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, ListParams, Patch, PostParams};
use kube::ResourceExt;
use serde_json::json;
use tracing::{debug, info, warn};

use super::{budget, budget_name, pod, wanted_nodes, wants_budget};
use crate::context::Context;
use crate::scheduler::Resources;
use crate::view;

/// Why a reservation could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ReservationError {
    /// A ResourceQuota of the VM's namespace refused the reservation pod:
    /// the VM must not start.
    #[error("ResourceQuota refused the VM's reservation pod: {0}")]
    QuotaExceeded(String),
    /// The reservation pod could not be created.
    #[error("Cannot create reservation pod")]
    CreatePod(#[source] kube::Error),
    /// The VM's reservation pods could not be listed.
    #[error("Cannot list reservation pods")]
    ListPods(#[source] kube::Error),
    /// A reservation pod could not be deleted.
    #[error("Cannot delete reservation pod")]
    DeletePod(#[source] kube::Error),
    /// The VM's migration could not be read.
    #[error("Cannot read VMMigration")]
    GetMigration(#[source] kube::Error),
    /// The VM's PodDisruptionBudget could not be written or deleted.
    #[error("Cannot write PodDisruptionBudget")]
    Budget(#[source] kube::Error),
}

fn code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

/// Creates `vm`'s reservation pod on `node` asking for `need` (an existing
/// one is kept). A quota refusal is [`ReservationError::QuotaExceeded`] with
/// the API server's message.
pub async fn reserve(
    ctx: &Context,
    vm: &VirtualMachine,
    node: &str,
    need: Resources,
) -> Result<(), ReservationError> {
    let ns = vm.namespace().unwrap_or_default();
    let api = Api::<Pod>::namespaced(ctx.client.clone(), &ns);
    let wanted = pod(vm, node, need, &ctx.config.reservation_image);
    match api.create(&PostParams::default(), &wanted).await {
        Ok(_) => {
            info!(vm = %vm.name_any(), %node, cpu_millis = need.cpu, memory = need.memory, "reservation pod created");
            Ok(())
        }
        Err(e) if code(&e) == Some(409) => Ok(()),
        Err(kube::Error::Api(status))
            if status.code == 403 && status.message.contains("exceeded quota") =>
        {
            Err(ReservationError::QuotaExceeded(status.message.clone()))
        }
        Err(e) => Err(ReservationError::CreatePod(e)),
    }
}

/// The node a live migration of `vm` is moving it to: `Ok(Some(Some(node)))`
/// while it runs with a known target, `Ok(Some(None))` while its target is
/// not written yet, `Ok(None)` when the VM is not migrating.
async fn migration_target(
    ctx: &Context,
    vm: &VirtualMachine,
) -> Result<Option<Option<String>>, ReservationError> {
    let Some(name) = vm.status.as_ref().and_then(|s| s.migration.as_deref()) else {
        return Ok(None);
    };
    if view::vm_phase(vm) != VmPhase::Migrating {
        return Ok(None);
    }
    let ns = vm.namespace().unwrap_or_default();
    let m = Api::<VMMigration>::namespaced(ctx.client.clone(), &ns)
        .get_opt(name)
        .await
        .map_err(ReservationError::GetMigration)?;
    Ok(match m {
        Some(m) if !view::migration_phase(&m).is_final() => {
            Some(m.status.and_then(|s| s.target_node))
        }
        _ => None,
    })
}

/// The VM's reservation pods, listed by its labels.
async fn listed(ctx: &Context, vm: &VirtualMachine) -> Result<Vec<Pod>, ReservationError> {
    let ns = vm.namespace().unwrap_or_default();
    let selector = super::selector_labels(&vm.name_any())
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    Ok(Api::<Pod>::namespaced(ctx.client.clone(), &ns)
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(ReservationError::ListPods)?
        .items
        .into_iter()
        .filter(|p| {
            p.owner_references()
                .iter()
                .any(|o| Some(&o.uid) == vm.metadata.uid.as_ref())
        })
        .collect())
}

async fn delete_pod(ctx: &Context, pod: &Pod) -> Result<(), ReservationError> {
    let api = Api::<Pod>::namespaced(ctx.client.clone(), &pod.namespace().unwrap_or_default());
    match api.delete(&pod.name_any(), &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(e) if code(&e) == Some(404) => Ok(()),
        Err(e) => Err(ReservationError::DeletePod(e)),
    }
}

/// Brings `vm`'s reservations and budget to what they should be: a pod on
/// each node of [`wanted_nodes`], none elsewhere, and the budget. A missing
/// reservation of a VM already placed is made again (a quota refusal is only
/// logged: the VM runs already).
pub async fn sync(ctx: &Context, vm: &VirtualMachine) -> Result<(), ReservationError> {
    let target = migration_target(ctx, vm).await?;
    let occupied = view::vm_node(vm).filter(|_| view::occupies_node(vm));
    let wanted = wanted_nodes(occupied, target.clone().flatten().as_deref());
    let pods = listed(ctx, vm).await?;
    let node_of = |p: &Pod| p.spec.as_ref().and_then(|s| s.node_name.clone());
    // A migration whose target is not written yet may already hold it.
    let target_unknown = matches!(target, Some(None));
    for p in &pods {
        let on = node_of(p).unwrap_or_default();
        if !wanted.contains(&on) && !target_unknown {
            delete_pod(ctx, p).await?;
            info!(vm = %vm.name_any(), node = %on, "reservation pod deleted");
        }
    }
    let need = view::vm_footprint(vm, ctx.config.cpu_allocation_ratio);
    for node in &wanted {
        if !pods.iter().any(|p| node_of(p).as_deref() == Some(node)) {
            match reserve(ctx, vm, node, need).await {
                Err(ReservationError::QuotaExceeded(message)) => {
                    warn!(vm = %vm.name_any(), %node, "reservation refused: {message}")
                }
                other => other?,
            }
        }
    }
    sync_budget(ctx, vm, wanted.len()).await
}

async fn sync_budget(
    ctx: &Context,
    vm: &VirtualMachine,
    reservations: usize,
) -> Result<(), ReservationError> {
    let ns = vm.namespace().unwrap_or_default();
    let api = Api::<PodDisruptionBudget>::namespaced(ctx.client.clone(), &ns);
    let name = budget_name(&vm.name_any());
    if !wants_budget(vm) || reservations == 0 {
        return delete_budget(&api, &name).await;
    }
    let wanted = budget(vm, reservations);
    let current = api.get_opt(&name).await.map_err(ReservationError::Budget)?;
    match current {
        None => match api.create(&PostParams::default(), &wanted).await {
            Ok(_) => {
                debug!(vm = %vm.name_any(), "PodDisruptionBudget created");
                Ok(())
            }
            Err(e) if code(&e) == Some(409) => Ok(()),
            Err(e) => Err(ReservationError::Budget(e)),
        },
        Some(b) if b.spec == wanted.spec => Ok(()),
        Some(_) => api
            .patch(
                &name,
                &ctx.patch_params(),
                &Patch::Merge(json!({"spec": wanted.spec})),
            )
            .await
            .map(|_| ())
            .map_err(ReservationError::Budget),
    }
}

async fn delete_budget(api: &Api<PodDisruptionBudget>, name: &str) -> Result<(), ReservationError> {
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(e) if code(&e) == Some(404) => Ok(()),
        Err(e) => Err(ReservationError::Budget(e)),
    }
}

/// Deletes every reservation pod of `vm` and its budget (the VM is being
/// deleted).
pub async fn release_all(ctx: &Context, vm: &VirtualMachine) -> Result<(), ReservationError> {
    for p in listed(ctx, vm).await? {
        delete_pod(ctx, &p).await?;
    }
    let api = Api::<PodDisruptionBudget>::namespaced(
        ctx.client.clone(),
        &vm.namespace().unwrap_or_default(),
    );
    delete_budget(&api, &budget_name(&vm.name_any())).await
}
