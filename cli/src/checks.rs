//! Whether a command applies to a VM as it is, as pure functions of what the
//! VM's object says, so each refusal (and what it tells the user to do) is
//! unit-tested without an API server.

use godwit_crds::vm::StorageKind;
use godwit_crds::{EvictionStrategy, RunStrategy, VirtualMachine, VmPhase};
use kube::ResourceExt;

/// The parts of a VM the checks read.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VmView {
    /// Its name.
    pub name: String,
    /// `status.phase`.
    pub phase: VmPhase,
    /// `status.nodeName`.
    pub node: Option<String>,
    /// `spec.runStrategy`.
    pub run_strategy: RunStrategy,
    /// `spec.evictionStrategy`.
    pub eviction: EvictionStrategy,
    /// `status.migration`.
    pub migration: Option<String>,
    /// Writable node-local disks (a migration has to copy them).
    pub local_disks: Vec<String>,
    /// Being deleted.
    pub deleting: bool,
}

impl VmView {
    /// The view of `vm`.
    pub fn of(vm: &VirtualMachine) -> VmView {
        let status = vm.status.clone().unwrap_or_default();
        VmView {
            name: vm.name_any(),
            phase: status.phase,
            node: status.node_name,
            run_strategy: vm.spec.run_strategy,
            eviction: vm.spec.eviction_strategy,
            migration: status.migration,
            local_disks: vm
                .spec
                .disks
                .iter()
                .filter(|d| d.storage == StorageKind::Local && !d.read_only)
                .map(|d| d.name.clone())
                .collect(),
            deleting: vm.metadata.deletion_timestamp.is_some(),
        }
    }
}

/// Why a command does not apply, and what to do instead.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The VM is being deleted.
    #[error("VM {0:?} is being deleted: nothing to do")]
    Deleting(String),
    /// The command needs a running VM.
    #[error("VM {name:?} is not running (phase {phase:?}): {hint}")]
    NotRunning {
        /// The VM.
        name: String,
        /// Its phase.
        phase: VmPhase,
        /// What to do.
        hint: String,
    },
    /// A migration already moves the VM.
    #[error("VM {name:?} is already migrating (VMMigration {migration:?}): watch it with `kubectl get gvmm {migration} -w`, or cancel it with `kubectl delete gvmm {migration}`")]
    AlreadyMigrating {
        /// The VM.
        name: String,
        /// The migration moving it.
        migration: String,
    },
    /// The VM asks not to be live-migrated.
    #[error("VM {0:?} has evictionStrategy Shutdown, so it is not meant to be live-migrated: set spec.evictionStrategy to LiveMigrate, or pass --force")]
    EvictionShutdown(String),
    /// The target is the node the VM runs on.
    #[error("VM {name:?} already runs on {node:?}: pick another node with --to, or leave --to out to let the operator pick")]
    SameNode {
        /// The VM.
        name: String,
        /// Its node.
        node: String,
    },
    /// `migrate-cancel` needs a migration under way.
    #[error("VM {0:?} has no migration under way, so there is nothing to cancel: list its migrations with `kubectl get gvmm`")]
    NoMigration(String),
    /// The VM's migration has ended already.
    #[error("VMMigration {migration:?} of VM {name:?} has already ended ({phase}): nothing to cancel; see it with `kubectl get gvmm {migration}`")]
    MigrationEnded {
        /// The VM.
        name: String,
        /// The migration.
        migration: String,
        /// Its final phase.
        phase: String,
    },
    /// Restart needs a strategy that starts the VM again.
    #[error("VM {name:?} has runStrategy {strategy:?}, so it would stay stopped after the restart: use `kubectl godwit stop {name}` then `kubectl godwit start {name}` (start sets runStrategy Always)")]
    RestartStrategy {
        /// The VM.
        name: String,
        /// Its run strategy.
        strategy: RunStrategy,
    },
}

fn not_running(v: &VmView, hint: String) -> Refusal {
    Refusal::NotRunning {
        name: v.name.clone(),
        phase: v.phase,
        hint,
    }
}

fn start_hint(v: &VmView) -> String {
    match v.phase {
        VmPhase::Stopped | VmPhase::Failed | VmPhase::Stopping => {
            format!("start it with `kubectl godwit start {}`", v.name)
        }
        _ => format!(
            "wait until it runs (`kubectl get gvm {} -w`), or see why with `kubectl describe gvm {}`",
            v.name, v.name
        ),
    }
}

/// `start`: the run strategy to set, or `None` when the VM already runs or starts.
pub fn start(v: &VmView) -> Result<Option<RunStrategy>, Refusal> {
    if v.deleting {
        return Err(Refusal::Deleting(v.name.clone()));
    }
    let off = matches!(
        v.phase,
        VmPhase::Stopped | VmPhase::Failed | VmPhase::Stopping | VmPhase::Pending
    );
    match v.run_strategy {
        // Already asked to run: a stopped one is restarted by the operator.
        RunStrategy::Always => Ok(None),
        // These keep a stopped VM off: ask for it to run.
        RunStrategy::Halted | RunStrategy::Manual | RunStrategy::RerunOnFailure if off => {
            Ok(Some(RunStrategy::Always))
        }
        RunStrategy::Halted => Ok(Some(RunStrategy::Always)),
        _ => Ok(None),
    }
}

/// `stop`.
pub fn stop(v: &VmView) -> Result<(), Refusal> {
    if v.deleting {
        return Err(Refusal::Deleting(v.name.clone()));
    }
    Ok(())
}

/// `restart`.
pub fn restart(v: &VmView) -> Result<(), Refusal> {
    if v.deleting {
        return Err(Refusal::Deleting(v.name.clone()));
    }
    if v.phase != VmPhase::Running {
        return Err(not_running(v, start_hint(v)));
    }
    if v.run_strategy != RunStrategy::Always {
        return Err(Refusal::RestartStrategy {
            name: v.name.clone(),
            strategy: v.run_strategy,
        });
    }
    Ok(())
}

/// `migrate`: notes for the user when it may go ahead.
pub fn migrate(v: &VmView, to: Option<&str>, force: bool) -> Result<Vec<String>, Refusal> {
    if v.deleting {
        return Err(Refusal::Deleting(v.name.clone()));
    }
    if let Some(m) = &v.migration {
        return Err(Refusal::AlreadyMigrating {
            name: v.name.clone(),
            migration: m.clone(),
        });
    }
    if v.phase != VmPhase::Running {
        return Err(not_running(
            v,
            format!("only a running VM can be live-migrated; {}", start_hint(v)),
        ));
    }
    if v.eviction == EvictionStrategy::Shutdown && !force {
        return Err(Refusal::EvictionShutdown(v.name.clone()));
    }
    if let (Some(to), Some(node)) = (to, &v.node) {
        if to == node {
            return Err(Refusal::SameNode {
                name: v.name.clone(),
                node: node.clone(),
            });
        }
    }
    Ok(v.local_disks
        .iter()
        .map(|d| format!("disk {d:?} is node-local: the migration copies it with the memory, which takes longer"))
        .collect())
}

/// `pause`: notes for the user when it may go ahead.
pub fn pause(v: &VmView) -> Result<Vec<String>, Refusal> {
    if v.deleting {
        return Err(Refusal::Deleting(v.name.clone()));
    }
    match v.phase {
        VmPhase::Running => Ok(vec![]),
        VmPhase::Migrating => Ok(vec![format!(
            "VM {:?} is migrating: it is paused once the migration has ended, on the node it then runs on",
            v.name
        )]),
        _ => Err(not_running(
            v,
            format!("only a running VM can be paused; {}", start_hint(v)),
        )),
    }
}

/// `migrate-cancel`: the migration to cancel.
pub fn migrate_cancel(v: &VmView) -> Result<String, Refusal> {
    v.migration
        .clone()
        .ok_or_else(|| Refusal::NoMigration(v.name.clone()))
}

/// `console`: the node to connect to.
pub fn console(v: &VmView) -> Result<String, Refusal> {
    on_a_node(v, "there is no console to attach to")
}

/// `port-forward`, `ssh` and `scp` need a running guest; its node.
pub fn forward(v: &VmView) -> Result<String, Refusal> {
    on_a_node(v, "there is no guest to connect to")
}

fn on_a_node(v: &VmView, nothing: &str) -> Result<String, Refusal> {
    if !v.phase.is_active() {
        return Err(not_running(v, format!("{nothing}; {}", start_hint(v))));
    }
    v.node
        .clone()
        .ok_or_else(|| not_running(v, "it has no node yet; try again in a moment".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running() -> VmView {
        VmView {
            name: "demo".into(),
            phase: VmPhase::Running,
            node: Some("node-0".into()),
            ..Default::default()
        }
    }

    #[test]
    fn migrate_refuses_what_cannot_move_and_says_what_to_do() {
        assert_eq!(migrate(&running(), None, false), Ok(vec![]));
        let stopped = VmView {
            phase: VmPhase::Stopped,
            ..running()
        };
        let e = migrate(&stopped, None, false).unwrap_err().to_string();
        assert!(
            e.contains("not running") && e.contains("kubectl godwit start demo"),
            "{e}"
        );
        let moving = VmView {
            migration: Some("demo-1".into()),
            phase: VmPhase::Migrating,
            ..running()
        };
        let e = migrate(&moving, None, false).unwrap_err().to_string();
        assert!(
            e.contains("already migrating") && e.contains("kubectl delete gvmm demo-1"),
            "{e}"
        );
        let shutdown = VmView {
            eviction: EvictionStrategy::Shutdown,
            ..running()
        };
        assert!(matches!(
            migrate(&shutdown, None, false),
            Err(Refusal::EvictionShutdown(_))
        ));
        assert!(migrate(&shutdown, None, true).is_ok());
        assert!(matches!(
            migrate(&running(), Some("node-0"), false),
            Err(Refusal::SameNode { .. })
        ));
        let local = VmView {
            local_disks: vec!["root".into()],
            ..running()
        };
        assert!(migrate(&local, Some("node-1"), false).unwrap()[0].contains("node-local"));
    }

    #[test]
    fn start_stop_restart() {
        let halted = VmView {
            phase: VmPhase::Stopped,
            run_strategy: RunStrategy::Halted,
            ..running()
        };
        assert_eq!(start(&halted), Ok(Some(RunStrategy::Always)));
        assert_eq!(start(&running()), Ok(None));
        let manual_stopped = VmView {
            run_strategy: RunStrategy::Manual,
            ..halted.clone()
        };
        assert_eq!(start(&manual_stopped), Ok(Some(RunStrategy::Always)));
        assert!(restart(&running()).is_ok());
        assert!(matches!(restart(&halted), Err(Refusal::NotRunning { .. })));
        let manual = VmView {
            run_strategy: RunStrategy::Manual,
            ..running()
        };
        assert!(matches!(
            restart(&manual),
            Err(Refusal::RestartStrategy { .. })
        ));
        assert_eq!(console(&running()), Ok("node-0".into()));
        assert!(console(&halted).is_err());
    }

    #[test]
    fn pause_needs_a_running_vm_and_cancel_a_migration() {
        assert_eq!(pause(&running()), Ok(vec![]));
        let stopped = VmView {
            phase: VmPhase::Stopped,
            ..running()
        };
        let e = pause(&stopped).unwrap_err().to_string();
        assert!(
            e.contains("not running") && e.contains("kubectl godwit start demo"),
            "{e}"
        );
        let moving = VmView {
            migration: Some("demo-1".into()),
            phase: VmPhase::Migrating,
            ..running()
        };
        assert!(pause(&moving).unwrap()[0].contains("once the migration has ended"));
        assert_eq!(migrate_cancel(&moving), Ok("demo-1".into()));
        let e = migrate_cancel(&running()).unwrap_err().to_string();
        assert!(
            e.contains("no migration under way") && e.contains("kubectl get gvmm"),
            "{e}"
        );
    }
}
