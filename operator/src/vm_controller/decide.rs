//! The VM controller's decisions, pure functions over plain data: what a VM
//! needs from the operator ([`need`]) and the next step the operator takes
//! for it ([`next_vm_step`]): schedule, restart, back off, reschedule, hold,
//! forget a lost migration, or announce a deletion.

use std::time::Duration;

use godwit_crds::contract::{Machine, AGENT_FINALIZER, GUEST_RESET_REASON, NODE_LABEL};
use godwit_crds::{RunStrategy, VMTemplate, VirtualMachine, VmPhase};
use kube::ResourceExt;

use crate::machine;
use crate::scheduler::{self, Reserve, Strategy};
use crate::template::{self, ResolveError};
use crate::view::{self, ClusterView};

/// How soon an unschedulable VM or one with a missing template is retried.
pub const RETRY_UNSCHEDULABLE: Duration = Duration::from_secs(10);

/// What a VM needs from the operator, judged from the VM alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Not on a node yet: resolve and place it.
    Placement,
    /// `Pending` with `runStrategy: Halted`: stays off.
    Halted,
    /// Stopped or failed, and its `runStrategy` starts it again.
    Restart,
    /// `Migrating`: its migration must still exist.
    MigrationCheck,
    /// Being deleted: the agent's finalizer does the work.
    Deletion,
    /// The node agent owns what happens next.
    Nothing,
}

/// What `vm` needs from the operator.
pub fn need(vm: &VirtualMachine) -> Need {
    if vm.metadata.deletion_timestamp.is_some() {
        return Need::Deletion;
    }
    let strategy = vm.spec.run_strategy;
    match view::vm_phase(vm) {
        VmPhase::Pending if strategy == RunStrategy::Halted => Need::Halted,
        VmPhase::Pending => Need::Placement,
        // A stopped VM that a cold migration moves stays as it is until
        // the migration ends (or is found gone).
        VmPhase::Stopped | VmPhase::Failed
            if vm.status.as_ref().is_some_and(|s| s.migration.is_some()) =>
        {
            Need::MigrationCheck
        }
        VmPhase::Stopped if strategy == RunStrategy::Always => Need::Restart,
        // A reboot inside the guest is not a stop, for Manual and
        // RerunOnFailure too.
        VmPhase::Stopped if strategy != RunStrategy::Halted && guest_reset(vm) => Need::Restart,
        VmPhase::Failed
            if matches!(strategy, RunStrategy::Always | RunStrategy::RerunOnFailure) =>
        {
            Need::Restart
        }
        VmPhase::Migrating => Need::MigrationCheck,
        _ => Need::Nothing,
    }
}

/// Whether `vm` stopped because its guest reset itself (the agent's Ready
/// reason [`GUEST_RESET_REASON`]).
pub fn guest_reset(vm: &VirtualMachine) -> bool {
    view::vm_conditions(vm)
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "False" && c.reason == GUEST_RESET_REASON)
}

/// Whether deciding for `vm` needs the template and the cluster.
pub fn needs_cluster(vm: &VirtualMachine) -> bool {
    matches!(need(vm), Need::Placement | Need::Restart)
}

/// What [`next_vm_step`] reads besides the VM.
pub struct VmInputs<'a> {
    /// The VM's template, if it names one and it exists.
    pub template: Option<&'a VMTemplate>,
    /// Nodes and what occupies them.
    pub cluster: &'a ClusterView,
    /// Spread or pack.
    pub strategy: Strategy,
    /// Room kept free on every node.
    pub reserve: Reserve,
    /// For a `Migrating` VM: whether the VMMigration it names exists.
    pub migration_exists: bool,
    /// How long a restart must still wait (see [`restart_delay`](crate::restarts::restart_delay)).
    pub restart_wait: Duration,
}

/// The operator's next step for a VM: what the control plane writes (the
/// node agent's own steps are decided in the node daemon).
#[derive(Clone, Debug, PartialEq)]
pub enum VmStep {
    /// Nothing to write.
    Nothing,
    /// Label the VM for `node`, store its resolved machine, then status
    /// `Scheduled` on `node`.
    Schedule {
        /// The chosen node.
        node: String,
        /// What it runs as (boxed: the largest variant by far).
        machine: Box<Machine>,
        /// Event text.
        message: String,
    },
    /// Start a stopped or failed VM again on its node (status `Scheduled`).
    Restart {
        /// Its node.
        node: String,
        /// Event text.
        message: String,
    },
    /// A restart is due but the VM keeps stopping: wait before it.
    Backoff {
        /// How long.
        wait: Duration,
    },
    /// Take the VM off its node and schedule it again (label cleared, status
    /// `Pending`).
    Reschedule {
        /// Event text.
        message: String,
    },
    /// The VM cannot be placed now: condition `Scheduled=False` with `reason`.
    Hold {
        /// Condition reason.
        reason: &'static str,
        /// Why, and what to do.
        message: String,
        /// Whether a Warning event goes with it.
        warn: bool,
        /// When to look again (besides any change of the VM).
        retry: Option<Duration>,
    },
    /// The VMMigration that moved the VM is gone: back to `Running`.
    ForgetMigration {
        /// The migration named in the status.
        migration: String,
    },
    /// The VM is being deleted; tell a human who does the work.
    AnnounceDeletion {
        /// Event text.
        message: String,
    },
}

/// Decides what the operator writes for `vm`.
pub fn next_vm_step(vm: &VirtualMachine, inputs: &VmInputs<'_>) -> VmStep {
    match need(vm) {
        Need::Deletion => {
            if !vm.finalizers().iter().any(|f| f == AGENT_FINALIZER) {
                return VmStep::Nothing;
            }
            let node = view::vm_node(vm).unwrap_or("its node");
            VmStep::AnnounceDeletion {
                message: format!(
                    "Deleting: the node agent on {node} stops the VM and removes its disks, then releases it"
                ),
            }
        }
        Need::Halted => VmStep::Hold {
            reason: "Halted",
            message: "runStrategy is Halted: the VM is not scheduled".into(),
            warn: false,
            retry: None,
        },
        Need::Placement => place(vm, inputs),
        Need::Restart if !inputs.restart_wait.is_zero() => VmStep::Backoff {
            wait: inputs.restart_wait,
        },
        Need::Restart => restart(vm, inputs),
        Need::MigrationCheck if !inputs.migration_exists => {
            match vm.status.as_ref().and_then(|s| s.migration.clone()) {
                Some(migration) => VmStep::ForgetMigration { migration },
                None => VmStep::Nothing,
            }
        }
        Need::MigrationCheck | Need::Nothing => VmStep::Nothing,
    }
}

fn place(vm: &VirtualMachine, inputs: &VmInputs<'_>) -> VmStep {
    let name = vm.name_any();
    let resolved = match template::resolve(&name, &vm.spec, inputs.template.map(|t| &t.spec)) {
        Ok(r) => r,
        Err(e @ ResolveError::TemplateMissing(..)) => {
            return VmStep::Hold {
                reason: "TemplateMissing",
                message: e.to_string(),
                warn: true,
                retry: Some(RETRY_UNSCHEDULABLE),
            }
        }
        Err(e) => return invalid(e.to_string()),
    };
    let uid = vm.uid().unwrap_or_default();
    let mut machine = match machine::build(&uid, &resolved, inputs.template) {
        Ok(m) => m,
        Err(e) => return invalid(e.to_string()),
    };
    // The node allows this ClusterVMTemplate's paths (checking them with
    // the API server, not with this annotation).
    machine.cluster_template = vm
        .spec
        .template_ref
        .as_ref()
        .filter(|r| r.kind == godwit_crds::TemplateKind::ClusterVMTemplate)
        .map(|r| r.name.clone());
    let request = view::request_for(vm, inputs.cluster.machine_resources(&machine));
    let nodes = &inputs.cluster.nodes;
    let verdicts = scheduler::evaluate(
        &request,
        nodes,
        &inputs.cluster.placed,
        inputs.reserve,
        inputs.strategy,
    );
    let fit = verdicts.iter().filter(|(_, v)| v.is_ok()).count();
    // A VM labelled before its status was written (a write cut short) keeps
    // its node while that node still takes it.
    let labelled = view::vm_node(vm)
        .filter(|l| verdicts.iter().any(|(n, v)| n == l && v.is_ok()))
        .map(str::to_string);
    let chosen = match labelled {
        Some(node) => Ok(node),
        None => scheduler::best(verdicts),
    };
    match chosen {
        Ok(node) => VmStep::Schedule {
            message: format!(
                "Scheduled on {node} ({}: {fit} of {} nodes fit)",
                inputs.strategy,
                nodes.len()
            ),
            node,
            machine: Box::new(machine),
        },
        Err(_) if nodes.is_empty() => VmStep::Hold {
            reason: "Unschedulable",
            message: format!("no Godwit nodes: no Node is labelled {NODE_LABEL}"),
            warn: true,
            retry: Some(RETRY_UNSCHEDULABLE),
        },
        Err(why) => VmStep::Hold {
            reason: "Unschedulable",
            message: why.to_string(),
            warn: true,
            retry: Some(RETRY_UNSCHEDULABLE),
        },
    }
}

fn invalid(message: String) -> VmStep {
    VmStep::Hold {
        reason: "InvalidSpec",
        message: format!("{message}; fix the VM's spec"),
        warn: true,
        retry: None,
    }
}

fn restart(vm: &VirtualMachine, inputs: &VmInputs<'_>) -> VmStep {
    let phase = view::vm_phase(vm);
    let why = format!("runStrategy {:?}, was {phase:?}", vm.spec.run_strategy);
    let (Some(node), Some(machine)) = (view::vm_node(vm), view::resolved_machine(vm)) else {
        return VmStep::Reschedule {
            message: format!("Scheduling again ({why})"),
        };
    };
    let request = view::request_for(vm, inputs.cluster.machine_resources(&machine));
    let Some(info) = inputs.cluster.node(node) else {
        return VmStep::Reschedule {
            message: format!("Scheduling again: {node} is no longer a Godwit node ({why})"),
        };
    };
    let verdict = scheduler::evaluate(
        &request,
        std::slice::from_ref(info),
        &inputs.cluster.placed,
        inputs.reserve,
        inputs.strategy,
    )
    .remove(0)
    .1;
    match verdict {
        Ok(_) => VmStep::Restart {
            node: node.to_string(),
            message: format!("Restarting on {node} ({why})"),
        },
        Err(refusal) => VmStep::Reschedule {
            message: format!("Scheduling again: {node} cannot run it now: {refusal} ({why})"),
        },
    }
}

/// Whether the VM stopped or failed of its own accord, so that restarting it
/// counts towards the crash-loop backoff ([`restart_delay`](crate::restarts::restart_delay)). A VM failed
/// over from a lost node (HA's `Ready=False`, reason `NodeLost`) did not: it
/// is restarted at once however often its nodes were lost.
pub fn counts_as_crash(vm: &VirtualMachine) -> bool {
    !view::vm_conditions(vm)
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "False" && c.reason == "NodeLost")
}

#[cfg(test)]
mod tests {
    use godwit_crds::VirtualMachineStatus;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    use super::*;
    use crate::fixtures::{apart_from, cluster, t0, template, vm, VmFixture};
    use crate::restarts::{restart_delay, RESTART_BACKOFF_MAX, RESTART_RESET};

    fn decide(vm: &VirtualMachine, template: Option<&VMTemplate>, cluster: &ClusterView) -> VmStep {
        next_vm_step(
            vm,
            &VmInputs {
                template,
                cluster,
                strategy: Strategy::Spread,
                reserve: Reserve::default(),
                migration_exists: true,
                restart_wait: Duration::ZERO,
            },
        )
    }

    #[test]
    fn a_pending_vm_is_scheduled_with_its_resolved_machine() {
        let t = template();
        let c = cluster(vec![vm("busy").on("node-1").running()], vec![]);
        let VmStep::Schedule {
            node,
            machine,
            message,
        } = decide(&vm("demo").template_disk(), Some(&t), &c)
        else {
            panic!("not scheduled");
        };
        assert_eq!(node, "node-2", "spread avoids the busy node, ties by name");
        assert_eq!(message, "Scheduled on node-2 (spread: 3 of 3 nodes fit)");
        assert_eq!(machine.memory_bytes, 1 << 30);
        assert_eq!(machine.template_digest.as_deref(), Some("sha256:abc"));
    }

    #[test]
    fn unschedulable_vms_say_why_for_each_node() {
        let t = template();
        let mut big = vm("big").template_disk();
        big.spec.memory = Some("8Gi".into());
        let c = cluster(vec![], vec![]);
        let VmStep::Hold {
            reason,
            message,
            warn,
            retry,
        } = decide(&big, Some(&t), &c)
        else {
            panic!("scheduled");
        };
        assert_eq!(reason, "Unschedulable");
        assert!(warn);
        assert_eq!(retry, Some(RETRY_UNSCHEDULABLE));
        for n in ["node-1", "node-2", "node-3"] {
            assert!(
                message.contains(&format!(
                    // 8 GiB and the VMM's 128 MiB.
                    "{n}: insufficient memory (need 8320Mi, free 4096Mi)"
                )),
                "{message}"
            );
        }
        let none = decide(&big, Some(&t), &ClusterView::default());
        assert!(
            matches!(none, VmStep::Hold { message, .. } if message.contains("no Godwit nodes"))
        );
    }

    #[test]
    fn a_missing_template_holds_the_vm_and_halted_vms_stay_off() {
        let c = cluster(vec![], vec![]);
        let action = decide(&vm("demo").template_disk(), None, &c);
        assert!(
            matches!(&action, VmStep::Hold { reason: "TemplateMissing", warn: true, message, .. } if message.contains("\"base\"")),
            "{action:?}"
        );
        let halted = vm("demo").template_disk().run_strategy(RunStrategy::Halted);
        assert!(matches!(
            decide(&halted, Some(&template()), &c),
            VmStep::Hold {
                reason: "Halted",
                warn: false,
                ..
            }
        ));
        let mut bad = vm("demo").template_disk();
        bad.spec.template_ref = None;
        assert!(matches!(
            decide(&bad, None, &c),
            VmStep::Hold {
                reason: "InvalidSpec",
                ..
            }
        ));
    }

    #[test]
    fn a_half_scheduled_vm_keeps_its_node_while_it_fits() {
        let t = template();
        let v = vm("demo").template_disk().label(NODE_LABEL, "node-3");
        let c = cluster(vec![], vec![]);
        assert!(
            matches!(decide(&v, Some(&t), &c), VmStep::Schedule { node, .. } if node == "node-3")
        );
        // node-3 is full now: placed elsewhere.
        let c = cluster(vec![vm("hog").on("node-3").running().sized(4, 4)], vec![]);
        assert!(
            matches!(decide(&v, Some(&t), &c), VmStep::Schedule { node, .. } if node == "node-1")
        );
    }

    #[test]
    fn scheduled_vms_are_the_agents_and_deciding_twice_changes_nothing() {
        let c = cluster(vec![], vec![]);
        for phase in [
            VmPhase::Scheduled,
            VmPhase::Provisioning,
            VmPhase::Starting,
            VmPhase::Running,
            VmPhase::Stopping,
        ] {
            let v = vm("demo").on("node-1").phase(phase);
            assert_eq!(
                decide(&v, Some(&template()), &c),
                VmStep::Nothing,
                "{phase:?}"
            );
        }
    }

    fn stopped(phase: VmPhase, strategy: RunStrategy) -> VirtualMachine {
        vm("demo").on("node-1").phase(phase).run_strategy(strategy)
    }

    #[test]
    fn restarts_follow_the_run_strategy() {
        use RunStrategy::*;
        use VmPhase::{Failed, Stopped};
        let c = cluster(vec![], vec![]);
        let cases = [
            (Stopped, Always, true),
            (Failed, Always, true),
            (Stopped, RerunOnFailure, false),
            (Failed, RerunOnFailure, true),
            (Stopped, Manual, false),
            (Failed, Manual, false),
            (Stopped, Halted, false),
            (Failed, Halted, false),
        ];
        for (phase, strategy, restarts) in cases {
            let action = decide(&stopped(phase, strategy), None, &c);
            if restarts {
                assert!(
                    matches!(&action, VmStep::Restart { node, message } if node == "node-1" && message.contains(&format!("was {phase:?}"))),
                    "{phase:?} {strategy:?}: {action:?}"
                );
            } else {
                assert_eq!(action, VmStep::Nothing, "{phase:?} {strategy:?}");
            }
        }
    }

    #[test]
    fn a_guest_reset_restarts_the_vm_unless_it_is_halted() {
        use RunStrategy::*;
        let c = cluster(vec![], vec![]);
        let ready = |reason: &str| Condition {
            type_: "Ready".into(),
            status: "False".into(),
            reason: reason.into(),
            message: "the guest reset itself on node-1".into(),
            last_transition_time: Time(Timestamp::now()),
            observed_generation: None,
        };
        for (strategy, restarts) in [
            (Always, true),
            (RerunOnFailure, true),
            (Manual, true),
            (Halted, false),
        ] {
            let mut v = stopped(VmPhase::Stopped, strategy);
            v.status.as_mut().unwrap().conditions = vec![ready(GUEST_RESET_REASON)];
            assert!(guest_reset(&v));
            let action = decide(&v, None, &c);
            if restarts {
                assert!(
                    matches!(&action, VmStep::Restart { node, .. } if node == "node-1"),
                    "{strategy:?}: {action:?}"
                );
            } else {
                assert_eq!(action, VmStep::Nothing, "{strategy:?}");
            }
            // A VM stopped on request stays stopped under Manual.
            v.status.as_mut().unwrap().conditions = vec![ready("Stopped")];
            assert!(!guest_reset(&v));
            if strategy != Always {
                assert_eq!(decide(&v, None, &c), VmStep::Nothing, "{strategy:?}");
            }
        }
    }

    #[test]
    fn a_vm_failed_over_from_a_lost_node_is_not_a_crash_loop() {
        let mut v = stopped(VmPhase::Failed, RunStrategy::Always);
        assert!(counts_as_crash(&v));
        v.status.as_mut().unwrap().conditions = vec![Condition {
            type_: "Ready".into(),
            status: "False".into(),
            reason: "NodeLost".into(),
            message: "node node-0 is lost".into(),
            last_transition_time: Time(Timestamp::now()),
            observed_generation: None,
        }];
        assert!(!counts_as_crash(&v));
        v.status.as_mut().unwrap().conditions[0].reason = "VmmExited".into();
        assert!(counts_as_crash(&v));
    }

    #[test]
    fn a_vm_that_keeps_stopping_is_restarted_with_backoff() {
        assert_eq!(restart_delay(0, Duration::ZERO), Duration::ZERO);
        assert_eq!(
            restart_delay(1, Duration::from_secs(1)),
            Duration::from_secs(4)
        );
        assert_eq!(restart_delay(3, Duration::ZERO), Duration::from_secs(20));
        assert_eq!(restart_delay(30, Duration::ZERO), RESTART_BACKOFF_MAX);
        assert_eq!(restart_delay(30, RESTART_RESET), Duration::ZERO);
        let c = cluster(vec![], vec![]);
        let v = stopped(VmPhase::Failed, RunStrategy::Always);
        let inputs = VmInputs {
            template: None,
            cluster: &c,
            strategy: Strategy::Spread,
            reserve: Reserve::default(),
            migration_exists: true,
            restart_wait: Duration::from_secs(4),
        };
        assert_eq!(
            next_vm_step(&v, &inputs),
            VmStep::Backoff {
                wait: Duration::from_secs(4)
            }
        );
    }

    #[test]
    fn a_failed_vm_restarts_on_a_full_node_despite_its_own_reservation() {
        // node-1 (4 GiB) holds hog and demo's reservation pod, which stays
        // while demo is Failed: it must not count against demo itself.
        use crate::fixtures::{lease, node};
        use crate::reservations::{self, CpuAllocationRatio};
        use crate::view::Snapshot;
        let v = stopped(VmPhase::Failed, RunStrategy::Always).sized(1, 1);
        let need = view::vm_footprint(&v, CpuAllocationRatio::default());
        let snapshot = Snapshot {
            nodes: vec![node("node-1", 4, 4)],
            leases: vec![lease("node-1", t0(), 10)],
            vms: vec![vm("hog").on("node-1").running().sized(1, 2), v.clone()],
            pods: vec![reservations::pod(&v, "node-1", need, "pause")],
            ..Default::default()
        };
        let c = ClusterView::build(&snapshot, t0(), CpuAllocationRatio::default());
        assert!(
            matches!(decide(&v, None, &c), VmStep::Restart { ref node, .. } if node == "node-1"),
            "{:?}",
            decide(&v, None, &c)
        );
        // Another VM of demo's size does not fit there: the pod holds the room.
        let other = vm("other").on("node-1").phase(VmPhase::Failed).sized(1, 1);
        assert!(matches!(
            decide(&other, None, &c),
            VmStep::Reschedule { message } if message.contains("insufficient memory")
        ));
    }

    #[test]
    fn a_restart_moves_away_from_a_node_that_cannot_run_it() {
        let v = stopped(VmPhase::Failed, RunStrategy::Always);
        let mut c = cluster(vec![vm("hog").on("node-1").running().sized(4, 4)], vec![]);
        assert!(matches!(
            decide(&v, None, &c),
            VmStep::Reschedule { message } if message.contains("insufficient")
        ));
        c = cluster(vec![], vec![]);
        c.nodes[0].ready = false;
        assert!(matches!(
            decide(&v, None, &c),
            VmStep::Reschedule { message } if message.contains("node not ready")
        ));
        let mut unlabelled = v.clone();
        unlabelled.metadata.labels = None;
        assert!(matches!(
            decide(&unlabelled, None, &c),
            VmStep::Reschedule { .. }
        ));
    }

    #[test]
    fn an_ha_restart_keeps_anti_affinity() {
        // demo (app=db, apart from app=db) ran on node-1, which is lost;
        // db-2 runs on node-2: the restart must go to node-3, though spread
        // alone would pick node-2 (node-3 is fuller).
        let apart = Some(apart_from("db"));
        let db2 = vm("db-2").on("node-2").running().label("app", "db");
        let hog = vm("hog").on("node-3").running().sized(1, 2);
        let mut c = cluster(vec![db2, hog], vec![]);
        c.nodes[0].ready = false;
        let mut failed = stopped(VmPhase::Failed, RunStrategy::Always);
        failed.spec.affinity = apart.clone();
        assert!(matches!(
            decide(&failed, None, &c),
            VmStep::Reschedule { .. }
        ));
        let t = template();
        let mut pending = vm("demo").template_disk().label("app", "db");
        pending.spec.affinity = apart;
        assert!(matches!(
            decide(&pending, Some(&t), &c),
            VmStep::Schedule { node, .. } if node == "node-3"
        ));
    }

    #[test]
    fn deletion_is_announced_only_while_the_agent_holds_the_vm() {
        let c = cluster(vec![], vec![]);
        let mut v = vm("demo").on("node-1").running();
        v.metadata.deletion_timestamp = Some(Time(t0()));
        assert_eq!(
            decide(&v, None, &c),
            VmStep::Nothing,
            "never scheduled: not blocked"
        );
        v.metadata.finalizers = Some(vec![AGENT_FINALIZER.into()]);
        assert!(matches!(
            decide(&v, None, &c),
            VmStep::AnnounceDeletion { message } if message.contains("node-1")
        ));
    }

    #[test]
    fn a_migrating_vm_whose_migration_is_gone_runs_again() {
        let mut v = vm("demo").on("node-1").phase(VmPhase::Migrating);
        v.status = Some(VirtualMachineStatus {
            phase: VmPhase::Migrating,
            migration: Some("m1".into()),
            ..Default::default()
        });
        let c = ClusterView::default();
        let mut inputs = VmInputs {
            template: None,
            cluster: &c,
            strategy: Strategy::Spread,
            reserve: Reserve::default(),
            migration_exists: true,
            restart_wait: Duration::ZERO,
        };
        assert_eq!(next_vm_step(&v, &inputs), VmStep::Nothing);
        inputs.migration_exists = false;
        assert_eq!(
            next_vm_step(&v, &inputs),
            VmStep::ForgetMigration {
                migration: "m1".into()
            }
        );
    }
}
