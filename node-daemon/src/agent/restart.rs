//! Restart on request: `kubectl godwit restart` sets the annotation
//! [`RESTART_ANNOTATION`] to the time of the request; the agent running the
//! VM stops its VMM once if the request is newer than the VMM (the `pid`
//! file's modification time), and the operator starts the VM again as it
//! does for any stopped VM with `runStrategy: Always`. The started VMM is
//! newer than the request, so the same annotation never stops it again.

use std::time::SystemTime;

use godwit_crds::contract::RESTART_ANNOTATION;
use godwit_crds::{VirtualMachine, VmPhase};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use super::decide::{NodeVmAction, VmFacts};
use super::vm_dir::{LocalState, VmDir};

/// Whether a restart requested at `requested` (RFC 3339) is newer than a
/// VMM started at `started`.
pub fn requested_after(requested: &str, started: SystemTime) -> bool {
    let Ok(at) = requested.trim().parse::<Timestamp>() else {
        return false;
    };
    let Ok(started) = Timestamp::try_from(started) else {
        return false;
    };
    at > started
}

/// `action` turned into a stop when a restart was asked for after this VMM
/// started; otherwise `action` unchanged.
pub fn adjust(
    action: NodeVmAction,
    vm: &VirtualMachine,
    facts: &VmFacts,
    dir: &VmDir,
    local: &LocalState,
) -> NodeVmAction {
    if action != NodeVmAction::Nothing
        || !local.alive
        || facts.phase != VmPhase::Running
        || facts.migrating
    {
        return action;
    }
    let Some(requested) = vm.annotations().get(RESTART_ANNOTATION) else {
        return action;
    };
    let started = std::fs::metadata(dir.file("pid")).and_then(|m| m.modified());
    match started {
        Ok(started) if requested_after(requested, started) => {
            tracing::info!(
                namespace = %dir.namespace,
                vm = %dir.name,
                requested = %requested,
                "restart requested: stopping the VMM (the operator starts it again)"
            );
            NodeVmAction::Stop
        }
        _ => action,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn only_a_request_newer_than_the_vmm_restarts_it() {
        let started = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert!(requested_after("2027-01-15T08:00:01Z", started));
        assert!(!requested_after("2027-01-15T07:59:59Z", started));
        assert!(!requested_after("not a time", started));
    }
}
