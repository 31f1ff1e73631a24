//! The node's local decisions, as pure functions of what the API says and
//! what the node's VM directories say: what to do on this node about a VM
//! placed here ([`decide_node_vm`]) and about this node's side of a
//! migration ([`decide_node_migration`]). (The operator decides
//! cluster-wide, in its own controllers; these only ever act on this node.)
//!
//! The pass ([`super::pass`]) gathers both, calls these, and
//! [`super::vm_reconcile`] and [`super::migrate`] carry the answer out;
//! running them again on the same input gives the same answer, so a lost
//! update is simply redone on the next pass.

use godwit_crds::contract::GUEST_RESET_REASON;
use godwit_crds::{MigrationPhase, RunStrategy, VmPhase};

use super::vm_dir::LocalState;

/// The Ready condition's reason when the OOM killer killed the VMM in its
/// cgroup.
pub const OOM_KILLED_REASON: &str = "OOMKilled";
use crate::vmm::GUEST_RESET_EXIT;

/// What the API says about a VM labelled for this node.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VmFacts {
    /// `status.phase`.
    pub phase: VmPhase,
    /// `spec.runStrategy`.
    pub run_strategy: RunStrategy,
    /// The object is being deleted.
    pub deleting: bool,
    /// It carries the agent's finalizer.
    pub has_finalizer: bool,
    /// It has a resolved machine (the operator scheduled it).
    pub has_machine: bool,
    /// A migration is moving it (`status.migration`).
    pub migrating: bool,
    /// Its status already says it runs here (Ready condition from this node).
    pub reported_here: bool,
}

/// What this node does about a VM labelled for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeVmAction {
    /// Nothing to do.
    Nothing,
    /// Add the agent's finalizer before creating anything.
    AddFinalizer,
    /// Provision its disks and start its VMM (phase Provisioning, Starting).
    Start,
    /// The VMM runs: report Running.
    ReportRunning,
    /// Stop the VMM (phase Stopping): the next step of a graceful stop
    /// ([`super::vmm_process::request_shutdown`]); decided on every pass
    /// until the VMM is gone.
    Stop,
    /// The VMM ended: report Stopped (asked for, the guest powered off or
    /// reset itself) or Failed.
    ReportExit {
        /// Failed rather than Stopped.
        failed: bool,
        /// The condition reason: `Stopped`, `GuestReset`
        /// ([`GUEST_RESET_REASON`]), `Failed`, `SandboxViolation` or
        /// `OOMKilled`.
        cause: &'static str,
        /// Why, for the status and the event.
        reason: String,
    },
    /// Deleted and stopped: remove its files and the finalizer.
    Cleanup,
}

/// Decides what this node does about a VM labelled for it.
pub fn decide_node_vm(vm: &VmFacts, local: &LocalState) -> NodeVmAction {
    if vm.deleting {
        if local.alive {
            return NodeVmAction::Stop;
        }
        return if vm.has_finalizer {
            NodeVmAction::Cleanup
        } else {
            NodeVmAction::Nothing
        };
    }
    // While a migration moves the VM, the migration driver owns the VMM.
    if vm.migrating || vm.phase == VmPhase::Migrating {
        return NodeVmAction::Nothing;
    }
    if local.alive {
        if vm.run_strategy == RunStrategy::Halted
            || matches!(vm.phase, VmPhase::Stopping | VmPhase::Stopped)
        {
            // Every pass, while it stops: the stop goes by steps (press the
            // power button, wait out the grace, force).
            return NodeVmAction::Stop;
        }
        return match vm.phase {
            VmPhase::Scheduled | VmPhase::Provisioning | VmPhase::Starting => {
                NodeVmAction::ReportRunning
            }
            // Received by a migration: the source wrote the status so far.
            VmPhase::Running if !vm.reported_here => NodeVmAction::ReportRunning,
            _ => NodeVmAction::Nothing,
        };
    }
    // No VMM runs.
    match vm.phase {
        VmPhase::Scheduled if vm.run_strategy != RunStrategy::Halted && vm.has_machine => {
            if vm.has_finalizer {
                NodeVmAction::Start
            } else {
                NodeVmAction::AddFinalizer
            }
        }
        VmPhase::Provisioning | VmPhase::Starting | VmPhase::Running | VmPhase::Stopping => {
            NodeVmAction::ReportExit {
                failed: failed_exit(vm.phase, local),
                reason: exit_reason(local),
                cause: exit_cause(vm.phase, local),
            }
        }
        _ => NodeVmAction::Nothing,
    }
}

/// Whether the VMM ended because the guest reset itself, not because it
/// was asked to stop.
fn guest_reset(phase: VmPhase, local: &LocalState) -> bool {
    phase != VmPhase::Stopping && !local.stop_requested && local.exit == Some(GUEST_RESET_EXIT)
}

fn failed_exit(phase: VmPhase, local: &LocalState) -> bool {
    if phase == VmPhase::Stopping || local.stop_requested {
        return false;
    }
    // Exit status 0: the guest powered off by itself; 100: it reset.
    !matches!(local.exit, Some(0 | GUEST_RESET_EXIT))
}

/// The condition reason of an exit: `Stopped`, `GuestReset`, `Failed`,
/// `OOMKilled` when the OOM killer killed in the VMM's cgroup, or
/// `SandboxViolation` when the VMM's seccomp filter killed it.
fn exit_cause(phase: VmPhase, local: &LocalState) -> &'static str {
    if guest_reset(phase, local) {
        GUEST_RESET_REASON
    } else if !failed_exit(phase, local) {
        "Stopped"
    } else if local.oom_killed {
        OOM_KILLED_REASON
    } else if local.exit == Some(crate::vmm::sandbox::SIGSYS_SHELL_STATUS) {
        "SandboxViolation"
    } else {
        "Failed"
    }
}

fn exit_reason(local: &LocalState) -> String {
    match (local.exit, local.stop_requested) {
        (_, true) => "stopped".into(),
        (_, false) if local.oom_killed => format!(
            "the OOM killer killed the VMM{}: its memory reached its cgroup's limit (guest memory + the node's --vmm-memory-overhead-mib)",
            local.exit.map(|c| format!(" (status {c})")).unwrap_or_default()
        ),
        (Some(0), false) => "the guest powered off".into(),
        (Some(GUEST_RESET_EXIT), false) => {
            "the guest reset itself (a reboot; it starts again unless runStrategy is Halted)".into()
        }
        (Some(crate::vmm::sandbox::SIGSYS_SHELL_STATUS), false) => {
            "the VMM's seccomp sandbox killed it (SIGSYS: a system call it never makes)".into()
        }
        (Some(code), false) => format!("the VMM exited with status {code}"),
        (None, false) if local.exists => "the VMM process is gone".into(),
        (None, false) => "the VM's files are gone from this node".into(),
    }
}

/// This node's part in a migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The VM leaves this node.
    Source,
    /// The VM comes to this node.
    Target,
}

/// What the API says about a migration this node takes part in.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MigrationFacts {
    /// Its name.
    pub name: String,
    /// `status.phase`.
    pub phase: MigrationPhase,
    /// `status.targetAddress`.
    pub target_address: Option<String>,
    /// Deleted, or annotated `godwit.dev/cancel: "true"`.
    pub cancel_requested: bool,
    /// `status.targetReleased`: the target said it holds nothing of the VM.
    pub target_released: bool,
}

/// What the source VMM says about its outgoing migration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SendState {
    /// No migration has been started in the VMM.
    NotStarted,
    /// It runs.
    Running,
    /// It ended (completed or failed).
    Ended,
    /// The VMM is not running.
    NoVmm,
}

/// What this node does about its side of a migration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeMigrationAction {
    /// Nothing to do.
    Nothing,
    /// Target: start the incoming VMM and publish its address.
    PrepareTarget,
    /// Target: the migration ended without the VM moving here: stop and remove
    /// the incoming VMM, then say so (`targetReleased`).
    DiscardIncoming,
    /// Target: the migration ended without the VM moving here and nothing of
    /// it is left on this node: say so (`targetReleased`), which lets the
    /// operator give the VM back to the source.
    ReportReleased,
    /// Source: send the VM (`migrate-send`), phase PreCopy.
    Send,
    /// Source: follow the VMM's progress and report it (and cancel it in the
    /// VMM first when `cancel` is set).
    Follow {
        /// Ask the VMM to cancel.
        cancel: bool,
    },
    /// Source: end the migration with this phase and reason, without touching a VMM.
    End(MigrationPhase, String),
}

/// Decides what this node does about a migration it takes part in.
pub fn decide_node_migration(
    role: Role,
    m: &MigrationFacts,
    local: &LocalState,
    outgoing: &SendState,
) -> NodeMigrationAction {
    use MigrationPhase::*;
    match role {
        Role::Target => {
            if m.phase.is_final() {
                let ours = local.incoming.as_deref() == Some(m.name.as_str());
                return if m.phase == Succeeded {
                    NodeMigrationAction::Nothing
                } else if ours && (local.alive || local.exists) {
                    NodeMigrationAction::DiscardIncoming
                } else if !m.target_released {
                    NodeMigrationAction::ReportReleased
                } else {
                    NodeMigrationAction::Nothing
                };
            }
            if m.phase == PreparingTarget
                && m.target_address.is_none()
                && !m.cancel_requested
                && !local.alive
            {
                return NodeMigrationAction::PrepareTarget;
            }
            NodeMigrationAction::Nothing
        }
        Role::Source => {
            if m.phase.is_final() || matches!(m.phase, Pending | Scheduling) {
                return NodeMigrationAction::Nothing;
            }
            match outgoing {
                SendState::NoVmm => NodeMigrationAction::End(
                    Failed,
                    "the VM's VMM is not running on the source node".into(),
                ),
                SendState::NotStarted => {
                    if m.cancel_requested {
                        NodeMigrationAction::End(
                            Cancelled,
                            "cancelled before any memory was sent; the VM stays on the source"
                                .into(),
                        )
                    } else if m.phase == PreparingTarget && m.target_address.is_some() {
                        NodeMigrationAction::Send
                    } else if m.phase == PreparingTarget {
                        NodeMigrationAction::Nothing // waiting for the target
                    } else {
                        NodeMigrationAction::End(
                            Failed,
                            "the source VMM has no record of this migration (it restarted?)".into(),
                        )
                    }
                }
                SendState::Running => NodeMigrationAction::Follow {
                    cancel: m.cancel_requested && !matches!(m.phase, PostCopy | Committing),
                },
                SendState::Ended => NodeMigrationAction::Follow { cancel: false },
            }
        }
    }
}

/// The phase that follows `from` on the way to `to`, so that the reported
/// phases walk the documented path (`PreCopy → StopAndCopy → Committing →
/// Succeeded`) even when one poll sees several steps at once.
pub fn next_phase(from: MigrationPhase, to: MigrationPhase) -> MigrationPhase {
    use MigrationPhase::*;
    if from.can_transition_to(to) {
        return to;
    }
    match (from, to) {
        (PreparingTarget, _) => PreCopy,
        (PreCopy, Committing | Succeeded) => StopAndCopy,
        (StopAndCopy | PostCopy, Succeeded) => Committing,
        _ => to,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running() -> LocalState {
        LocalState {
            exists: true,
            pid: Some(1),
            alive: true,
            ..Default::default()
        }
    }

    fn exited(code: i32) -> LocalState {
        LocalState {
            exists: true,
            pid: Some(1),
            exit: Some(code),
            ..Default::default()
        }
    }

    fn vm(phase: VmPhase) -> VmFacts {
        VmFacts {
            phase,
            has_finalizer: true,
            has_machine: true,
            reported_here: true,
            ..Default::default()
        }
    }

    #[test]
    fn a_scheduled_vm_gets_a_finalizer_then_starts_then_runs() {
        let mut v = vm(VmPhase::Scheduled);
        v.has_finalizer = false;
        let absent = LocalState::default();
        assert_eq!(decide_node_vm(&v, &absent), NodeVmAction::AddFinalizer);
        v.has_finalizer = true;
        assert_eq!(decide_node_vm(&v, &absent), NodeVmAction::Start);
        v.phase = VmPhase::Starting;
        assert_eq!(decide_node_vm(&v, &running()), NodeVmAction::ReportRunning);
        v.phase = VmPhase::Running;
        assert_eq!(decide_node_vm(&v, &running()), NodeVmAction::Nothing);
        // A VM that arrived by migration is reported by its new node once.
        v.reported_here = false;
        assert_eq!(decide_node_vm(&v, &running()), NodeVmAction::ReportRunning);
        v.reported_here = true;
        // Without a resolved machine there is nothing to start yet.
        v.phase = VmPhase::Scheduled;
        v.has_machine = false;
        assert_eq!(decide_node_vm(&v, &absent), NodeVmAction::Nothing);
    }

    #[test]
    fn an_oom_kill_is_reported_as_such_and_a_stop_is_still_a_stop() {
        let v = vm(VmPhase::Running);
        let mut killed = exited(137);
        killed.oom_killed = true;
        let NodeVmAction::ReportExit {
            failed,
            cause,
            reason,
        } = decide_node_vm(&v, &killed)
        else {
            panic!("{:?}", decide_node_vm(&v, &killed));
        };
        assert!(failed);
        assert_eq!(cause, OOM_KILLED_REASON);
        assert!(
            reason.contains("OOM killer") && reason.contains("137"),
            "{reason}"
        );
        killed.stop_requested = true;
        assert!(matches!(
            decide_node_vm(&v, &killed),
            NodeVmAction::ReportExit {
                failed: false,
                cause: "Stopped",
                ..
            }
        ));
    }

    #[test]
    fn exits_are_stopped_or_failed() {
        let v = vm(VmPhase::Running);
        assert_eq!(
            decide_node_vm(&v, &exited(0)),
            NodeVmAction::ReportExit {
                failed: false,
                reason: "the guest powered off".into(),
                cause: "Stopped",
            }
        );
        assert_eq!(
            decide_node_vm(&v, &exited(1)),
            NodeVmAction::ReportExit {
                failed: true,
                reason: "the VMM exited with status 1".into(),
                cause: "Failed",
            }
        );
        // Killed by its seccomp sandbox: the shell reports 128 + SIGSYS.
        assert!(matches!(
            decide_node_vm(&v, &exited(159)),
            NodeVmAction::ReportExit {
                failed: true,
                cause: "SandboxViolation",
                ..
            }
        ));
        let mut asked = exited(0);
        asked.stop_requested = true;
        assert!(matches!(
            decide_node_vm(&vm(VmPhase::Stopping), &asked),
            NodeVmAction::ReportExit { failed: false, .. }
        ));
        // A Running VM whose directory vanished failed.
        assert!(matches!(
            decide_node_vm(&v, &LocalState::default()),
            NodeVmAction::ReportExit { failed: true, .. }
        ));
        // Stopped and Failed VMs are the operator's to restart.
        assert_eq!(
            decide_node_vm(&vm(VmPhase::Stopped), &exited(0)),
            NodeVmAction::Nothing
        );
        assert_eq!(
            decide_node_vm(&vm(VmPhase::Failed), &exited(1)),
            NodeVmAction::Nothing
        );
    }

    #[test]
    fn halted_and_deleted_vms_stop_and_deleted_ones_are_cleaned() {
        let mut v = vm(VmPhase::Running);
        v.run_strategy = RunStrategy::Halted;
        assert_eq!(decide_node_vm(&v, &running()), NodeVmAction::Stop);
        let mut v = vm(VmPhase::Running);
        v.deleting = true;
        assert_eq!(decide_node_vm(&v, &running()), NodeVmAction::Stop);
        assert_eq!(decide_node_vm(&v, &exited(0)), NodeVmAction::Cleanup);
        v.has_finalizer = false;
        assert_eq!(decide_node_vm(&v, &exited(0)), NodeVmAction::Nothing);
    }

    #[test]
    fn a_stopping_vm_is_stopped_again_on_every_pass_until_its_vmm_is_gone() {
        let mut asked = running();
        asked.stop_requested = true;
        for phase in [VmPhase::Stopping, VmPhase::Stopped] {
            assert_eq!(
                decide_node_vm(&vm(phase), &asked),
                NodeVmAction::Stop,
                "{phase:?}"
            );
        }
        let mut halted = vm(VmPhase::Running);
        halted.run_strategy = RunStrategy::Halted;
        assert_eq!(decide_node_vm(&halted, &asked), NodeVmAction::Stop);
        // Gone after the button: Stopped, by request.
        let mut done = exited(0);
        done.stop_requested = true;
        assert!(matches!(
            decide_node_vm(&vm(VmPhase::Stopping), &done),
            NodeVmAction::ReportExit {
                failed: false,
                cause: "Stopped",
                ..
            }
        ));
    }

    #[test]
    fn a_guest_reset_is_reported_as_such_unless_a_stop_was_asked_for() {
        let reset = exited(GUEST_RESET_EXIT);
        assert_eq!(
            decide_node_vm(&vm(VmPhase::Running), &reset),
            NodeVmAction::ReportExit {
                failed: false,
                cause: GUEST_RESET_REASON,
                reason: "the guest reset itself (a reboot; it starts again unless runStrategy is Halted)"
                    .into(),
            }
        );
        // A reset while the agent was stopping it is the stop it asked for.
        let mut asked = reset.clone();
        asked.stop_requested = true;
        assert!(matches!(
            decide_node_vm(&vm(VmPhase::Stopping), &asked),
            NodeVmAction::ReportExit {
                failed: false,
                cause: "Stopped",
                ..
            }
        ));
        // Any other status is still a failure.
        assert!(matches!(
            decide_node_vm(&vm(VmPhase::Running), &exited(101)),
            NodeVmAction::ReportExit {
                failed: true,
                cause: "Failed",
                ..
            }
        ));
    }

    #[test]
    fn a_migrating_vm_is_left_to_the_migration() {
        let mut v = vm(VmPhase::Migrating);
        v.migrating = true;
        assert_eq!(decide_node_vm(&v, &exited(0)), NodeVmAction::Nothing);
        assert_eq!(decide_node_vm(&v, &running()), NodeVmAction::Nothing);
    }

    fn mig(phase: MigrationPhase) -> MigrationFacts {
        MigrationFacts {
            phase,
            ..Default::default()
        }
    }

    #[test]
    fn the_target_prepares_once_and_discards_what_did_not_move() {
        use MigrationPhase::*;
        let absent = LocalState::default();
        let none = SendState::NoVmm;
        assert_eq!(
            decide_node_migration(Role::Target, &mig(PreparingTarget), &absent, &none),
            NodeMigrationAction::PrepareTarget
        );
        let mut m = mig(PreparingTarget);
        m.target_address = Some("10.0.0.2:47000".into());
        assert_eq!(
            decide_node_migration(Role::Target, &m, &absent, &none),
            NodeMigrationAction::Nothing
        );
        let mut incoming = running();
        incoming.incoming = Some("m1".into());
        for end in [Failed, Cancelled] {
            let mut m = mig(end);
            m.name = "m1".into();
            assert_eq!(
                decide_node_migration(Role::Target, &m, &incoming, &none),
                NodeMigrationAction::DiscardIncoming
            );
            // An older migration's end does not discard a VM a later one
            // brought; nothing of its own is left here.
            m.name = "m0".into();
            assert_eq!(
                decide_node_migration(Role::Target, &m, &incoming, &none),
                NodeMigrationAction::ReportReleased
            );
            // Nothing here (removed, or never started): said once.
            m.name = "m1".into();
            assert_eq!(
                decide_node_migration(Role::Target, &m, &absent, &none),
                NodeMigrationAction::ReportReleased
            );
            m.target_released = true;
            assert_eq!(
                decide_node_migration(Role::Target, &m, &absent, &none),
                NodeMigrationAction::Nothing
            );
        }
        assert_eq!(
            decide_node_migration(Role::Target, &mig(Succeeded), &incoming, &none),
            NodeMigrationAction::Nothing
        );
    }

    #[test]
    fn the_source_sends_follows_and_cancels() {
        use MigrationPhase::*;
        let vmm = running();
        let mut m = mig(PreparingTarget);
        assert_eq!(
            decide_node_migration(Role::Source, &m, &vmm, &SendState::NotStarted),
            NodeMigrationAction::Nothing
        );
        m.target_address = Some("10.0.0.2:47000".into());
        assert_eq!(
            decide_node_migration(Role::Source, &m, &vmm, &SendState::NotStarted),
            NodeMigrationAction::Send
        );
        m.cancel_requested = true;
        assert!(matches!(
            decide_node_migration(Role::Source, &m, &vmm, &SendState::NotStarted),
            NodeMigrationAction::End(Cancelled, _)
        ));
        let mut m = mig(PreCopy);
        m.cancel_requested = true;
        assert_eq!(
            decide_node_migration(Role::Source, &m, &vmm, &SendState::Running),
            NodeMigrationAction::Follow { cancel: true }
        );
        // Past the point of no return a cancel is not passed on.
        m.phase = PostCopy;
        assert_eq!(
            decide_node_migration(Role::Source, &m, &vmm, &SendState::Running),
            NodeMigrationAction::Follow { cancel: false }
        );
        assert!(matches!(
            decide_node_migration(Role::Source, &mig(PreCopy), &vmm, &SendState::NoVmm),
            NodeMigrationAction::End(Failed, _)
        ));
        assert_eq!(
            decide_node_migration(Role::Source, &mig(Succeeded), &vmm, &SendState::Ended),
            NodeMigrationAction::Nothing
        );
    }

    #[test]
    fn reported_phases_walk_the_documented_path() {
        use MigrationPhase::*;
        let mut at = PreparingTarget;
        let mut seen = vec![];
        while at != Succeeded {
            at = next_phase(at, Succeeded);
            seen.push(at);
        }
        assert_eq!(seen, [PreCopy, StopAndCopy, Committing, Succeeded]);
        assert_eq!(next_phase(PreCopy, PostCopy), PostCopy);
        assert_eq!(next_phase(PostCopy, Succeeded), Committing);
        assert_eq!(next_phase(PreCopy, Failed), Failed);
    }
}
