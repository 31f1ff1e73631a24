//! Pause on request: `kubectl godwit pause` sets the annotation
//! [`PAUSE_ANNOTATION`] to `"true"` and `unpause` removes it; the agent
//! running the VM makes its VMM match on every pass and reports the VM's
//! [`PAUSED_CONDITION`] and an Event each way.
//!
//! Whether the VMM is paused is read from the VMM itself (`status` answers
//! `state: paused|running`) every time, never remembered here, so the
//! record cannot drift from the vCPUs: a VMM that a migration paused and
//! resumed, or that arrives on this node running after a live migration, is
//! simply paused again. During a migration the migration driver owns the
//! VMM and nothing here touches it.

use godwit_crds::contract::{PAUSED_BY_USER_REASON, PAUSED_CONDITION, PAUSE_ANNOTATION};
use godwit_crds::VirtualMachine;
use godwit_vmm_control::RunState;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::Api;
use kube::runtime::events::EventType;
use kube::ResourceExt;

use super::context::{apply_condition, now_time, Agent};
use super::vm_dir::VmDir;

/// What to do about a running VM's pause request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PauseAction {
    /// The VMM and the condition agree with the request.
    Nothing,
    /// Pause the VMM (the request is on, the vCPUs run).
    Pause,
    /// Resume the VMM (the request is off, the vCPUs are paused).
    Resume,
    /// The VMM is as asked but the condition says otherwise (or is
    /// missing after being paused once): write it, `true` for paused.
    Report(bool),
}

/// Decides from the request (`wanted`: the annotation is `"true"`), the
/// state the VMM reports and the VM's `Paused` condition (`Some(true)` for
/// `True`, `None` when there is none).
pub fn decide(wanted: bool, vmm: RunState, shown: Option<bool>) -> PauseAction {
    match (wanted, vmm) {
        (_, RunState::Stopping) => PauseAction::Nothing,
        (true, RunState::Running) => PauseAction::Pause,
        (false, RunState::Paused) => PauseAction::Resume,
        (true, RunState::Paused) if shown != Some(true) => PauseAction::Report(true),
        // A VM never paused has no condition; one resumed shows False.
        (false, RunState::Running) if shown == Some(true) => PauseAction::Report(false),
        _ => PauseAction::Nothing,
    }
}

/// Whether VM `vm` asks to be paused.
pub fn requested(vm: &VirtualMachine) -> bool {
    vm.annotations().get(PAUSE_ANNOTATION).map(String::as_str) == Some("true")
}

/// The VM's `Paused` condition: `Some(true)` when `True`.
fn shown(vm: &VirtualMachine) -> Option<bool> {
    vm.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == PAUSED_CONDITION)
        .map(|c| c.status == "True")
}

/// Makes the VMM of VM `vm`, which runs here outside any migration, match
/// its pause request. Called by [`super::vm_reconcile`] when it has nothing
/// else to do about the VM.
pub async fn sync(agent: &Agent, vm: &VirtualMachine, dir: &VmDir) -> anyhow::Result<()> {
    let wanted = requested(vm);
    let shown = shown(vm);
    if !wanted && shown != Some(true) {
        // Nothing asked for and nothing to take back: a VMM paused without
        // a request is a migration's (or a test's) business.
        return Ok(());
    }
    let control = dir.control();
    let vmm = tokio::task::spawn_blocking(move || control.status()).await??;
    let node = &agent.cfg.node;
    let (paused, reason, message) = match decide(wanted, vmm.state, shown) {
        PauseAction::Nothing => return Ok(()),
        PauseAction::Pause => {
            let control = dir.control();
            tokio::task::spawn_blocking(move || control.pause()).await??;
            let note = format!(
                "Paused the VM's vCPUs on {node}; resume them with `kubectl godwit unpause {}`",
                vm.name_any()
            );
            agent
                .event(vm, EventType::Normal, PAUSED_BY_USER_REASON, "Pause", note)
                .await;
            (true, PAUSED_BY_USER_REASON, paused_message(node))
        }
        PauseAction::Resume => {
            let control = dir.control();
            tokio::task::spawn_blocking(move || control.resume()).await??;
            agent
                .event(
                    vm,
                    EventType::Normal,
                    "Unpaused",
                    "Unpause",
                    format!("Resumed the VM's vCPUs on {node}"),
                )
                .await;
            (false, "Running", format!("the vCPUs run on {node}"))
        }
        PauseAction::Report(true) => (true, PAUSED_BY_USER_REASON, paused_message(node)),
        PauseAction::Report(false) => (false, "Running", format!("the vCPUs run on {node}")),
    };
    tracing::info!(paused, "pause request carried out");
    let api: Api<VirtualMachine> = Api::namespaced(agent.client.clone(), &dir.namespace);
    apply_condition(&api, vm, paused_condition(vm, paused, reason, &message)).await?;
    Ok(())
}

fn paused_message(node: &str) -> String {
    format!("paused on request ({PAUSE_ANNOTATION}) on {node}")
}

/// VM `vm`'s `Paused` condition (its transition time is kept by
/// [`apply_condition`] when the status is unchanged).
fn paused_condition(vm: &VirtualMachine, paused: bool, reason: &str, message: &str) -> Condition {
    Condition {
        type_: PAUSED_CONDITION.into(),
        status: if paused { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: now_time(),
        observed_generation: vm.metadata.generation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vmm_is_made_to_match_the_request() {
        assert_eq!(decide(true, RunState::Running, None), PauseAction::Pause);
        assert_eq!(
            decide(true, RunState::Running, Some(true)),
            PauseAction::Pause,
            "a VM that arrived running by migration is paused again"
        );
        assert_eq!(
            decide(false, RunState::Paused, Some(true)),
            PauseAction::Resume
        );
        assert_eq!(decide(false, RunState::Paused, None), PauseAction::Resume);
        assert_eq!(decide(true, RunState::Stopping, None), PauseAction::Nothing);
    }

    #[test]
    fn the_condition_follows_the_vmm_once_it_matches() {
        assert_eq!(
            decide(true, RunState::Paused, Some(true)),
            PauseAction::Nothing
        );
        assert_eq!(
            decide(true, RunState::Paused, None),
            PauseAction::Report(true),
            "a condition list rewritten by another writer gets Paused back"
        );
        assert_eq!(
            decide(true, RunState::Paused, Some(false)),
            PauseAction::Report(true)
        );
        assert_eq!(
            decide(false, RunState::Running, Some(true)),
            PauseAction::Report(false)
        );
        assert_eq!(
            decide(false, RunState::Running, Some(false)),
            PauseAction::Nothing
        );
        assert_eq!(decide(false, RunState::Running, None), PauseAction::Nothing);
    }
}
