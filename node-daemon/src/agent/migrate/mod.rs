//! Driving this node's side of each migration: live migrations through the
//! VMM control socket ([`source`] sends, [`target`] receives) and cold ones
//! on the agent's own threads ([`cold_move`]). What to do comes from
//! [`decide_node_migration`]; what happened goes into the status through
//! [`super::report`].

mod cold_move;
mod policy;
mod source;
mod target;

use std::time::Duration;

use godwit_crds::contract;
use godwit_crds::{MigrationMode, VMMigration};
use kube::api::Api;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::context::Agent;
use super::decide::{decide_node_migration, MigrationFacts, NodeMigrationAction, Role, SendState};
use super::report;
use super::vm_dir;
use super::vmm_process;

/// Makes this node's side of migration `m` (as `role`) match its status.
pub async fn reconcile(agent: &Agent, role: Role, m: &VMMigration) -> anyhow::Result<()> {
    let ns = m.namespace().unwrap_or_default();
    let status = m.status.clone().unwrap_or_default();
    let dir = agent.dir(&ns, &m.spec.vm_name);
    let local = dir.state();
    let facts = MigrationFacts {
        name: m.name_any(),
        phase: status.phase,
        target_address: status.target_address.clone(),
        cancel_requested: m.meta().deletion_timestamp.is_some()
            || m.annotations()
                .get(contract::CANCEL_ANNOTATION)
                .map(String::as_str)
                == Some("true"),
        target_released: status.target_released,
    };
    let api: Api<VMMigration> = Api::namespaced(agent.client.clone(), &ns);
    let cold = m.spec.mode == MigrationMode::Cold;
    if cold && role == Role::Source {
        return cold_move::source(agent, &api, m, &dir, &facts).await;
    }
    let outgoing = if role == Role::Source {
        source::send_state(&dir, &local, &facts.name).await
    } else {
        SendState::NoVmm
    };
    if cold && facts.phase.is_final() {
        cold_move::forget(agent, "target", m);
    }
    match decide_node_migration(role, &facts, &local, &outgoing) {
        NodeMigrationAction::Nothing => {}
        NodeMigrationAction::PrepareTarget if cold => {
            cold_move::prepare_target(agent, &api, m, &dir).await?
        }
        NodeMigrationAction::PrepareTarget => target::prepare(agent, &api, m, &dir).await?,
        NodeMigrationAction::DiscardIncoming => {
            let d = dir.clone();
            tokio::task::spawn_blocking(move || {
                vmm_process::stop(&d, Duration::from_secs(2));
                // Released only once the VMM is gone: the operator may then
                // restart the VM on the source.
                anyhow::ensure!(
                    !d.state().alive,
                    "the incoming VMM outlived SIGKILL; trying again"
                );
                vm_dir::remove(&d, false)?;
                anyhow::Ok(())
            })
            .await??;
            agent
                .event(
                    m,
                    EventType::Normal,
                    "TargetCleaned",
                    "Cleanup",
                    format!("Removed the incoming VM on {}", agent.cfg.node),
                )
                .await;
            report::patch(&api, m, json!({"targetReleased": true})).await?;
        }
        NodeMigrationAction::ReportReleased => {
            report::patch(&api, m, json!({"targetReleased": true})).await?;
        }
        NodeMigrationAction::Send => source::send(agent, &api, m, &dir).await?,
        NodeMigrationAction::Follow { cancel } => {
            source::follow(agent, &api, m, &dir, cancel).await?
        }
        NodeMigrationAction::End(phase, reason) => {
            report::end(agent, &api, m, phase, &reason, None).await?;
        }
    }
    Ok(())
}
