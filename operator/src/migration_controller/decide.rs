//! The migration controller's decisions, pure functions over plain data:
//! admission (validity, the VM's state, concurrency slots, the target node),
//! the timeouts of a migration in flight, cancelling, and how the VM moves
//! when the migration ends ([`next_migration_step`]).

use std::time::Duration;

use godwit_crds::contract::{
    CANCEL_ANNOTATION, MIGRATION_FINALIZER, NODE_LABEL, NODE_LEASE_SECONDS, SOURCE_LABEL,
    TARGET_LABEL,
};
use godwit_crds::{
    MigrationMode, MigrationPhase, MigrationPolicy, RunStrategy, StorageMode, VMMigration,
    VirtualMachine, VmPhase,
};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use crate::config::MigrationLimits;
use crate::context::Note;
use crate::scheduler::{self, Reserve, Strategy};
use crate::view::{self, migration_phase, ClusterView};

/// How long the target agent has to publish `targetAddress`.
pub const TARGET_PREPARE_SECONDS: i64 = 60;
/// The longest a failed migration's VM waits for its target to release it
/// ([`awaits_target`]).
pub const TARGET_RELEASE_SECONDS: i64 = 120;
/// Grace after the completion timeout before the operator asks to cancel
/// (the source agent enforces the timeout itself; this catches an agent
/// that does not).
pub const COMPLETION_GRACE_SECONDS: i64 = 30;

/// What [`next_migration_step`] reads besides the migration.
pub struct MigrationInputs<'a> {
    /// The VM it moves, if it exists.
    pub vm: Option<&'a VirtualMachine>,
    /// The cluster, when the decision may need it (admission, or a deleted
    /// migration in flight); `None` otherwise.
    pub cluster: Option<&'a ClusterView>,
    /// Spread or pack, for choosing a target.
    pub strategy: Strategy,
    /// Room kept free on every node.
    pub reserve: Reserve,
    /// Migrations in flight allowed.
    pub limits: MigrationLimits,
    /// The time now.
    pub now: Timestamp,
}

/// How the VM moves when its migration has ended.
#[derive(Clone, Debug, PartialEq)]
pub struct VmMove {
    /// The node the VM is labelled for afterwards.
    pub node: String,
    /// The phase the migration ended in.
    pub result: MigrationPhase,
    /// Event on the VM.
    pub vm_note: Note,
    /// Event on the migration.
    pub migration_note: Note,
}

/// The operator's next step for a migration: what the control plane writes
/// (the node agent's own steps are decided in the node daemon).
#[derive(Clone, Debug, PartialEq)]
pub enum MigrationStep {
    /// Nothing to write now; look again after `requeue` if set.
    Nothing {
        /// When to look again without a change.
        requeue: Option<Duration>,
    },
    /// Add [`MIGRATION_FINALIZER`].
    AddFinalizer,
    /// The operator ends the migration as `Failed`.
    Fail {
        /// `failureReason`.
        reason: String,
    },
    /// The operator ends a migration that had not started as `Cancelled`.
    Cancel {
        /// `failureReason`.
        reason: String,
    },
    /// Not yet: stay `Pending` with `Admitted=False` and this reason
    /// (`WaitingForSlot`: a concurrency limit; `WaitingForVM`: the VM does
    /// not exist or does not run yet, as when manifests are applied together).
    Wait {
        /// The condition's reason.
        reason: &'static str,
        /// What it waits for.
        message: String,
    },
    /// Let it in: VM `Migrating`, migration `PreparingTarget`, labels.
    Admit {
        /// Where the VM runs.
        source: String,
        /// Where it goes.
        target: String,
    },
    /// Put back the source/target labels a cut-short admission missed.
    Label {
        /// Source node.
        source: String,
        /// Target node.
        target: String,
    },
    /// Ask the source agent to cancel (annotation).
    RequestCancel {
        /// Why.
        message: String,
    },
    /// Move the VM as the final phase says.
    MoveVm(VmMove),
    /// Remove [`MIGRATION_FINALIZER`].
    ReleaseFinalizer,
}

/// Whether the operator's finalizer is on `m`.
pub fn has_finalizer(m: &VMMigration) -> bool {
    m.finalizers().iter().any(|f| f == MIGRATION_FINALIZER)
}

fn cancel_requested(m: &VMMigration) -> bool {
    m.metadata.deletion_timestamp.is_some()
        || m.annotations().get(CANCEL_ANNOTATION).map(String::as_str) == Some("true")
}

/// Whether the migration holds a slot: admitted and not yet final.
pub fn in_flight(m: &VMMigration) -> bool {
    let phase = migration_phase(m);
    !phase.is_final() && !matches!(phase, MigrationPhase::Pending | MigrationPhase::Scheduling)
}

/// Whether deciding for `m` needs the cluster view.
pub fn needs_cluster(m: &VMMigration) -> bool {
    let phase = migration_phase(m);
    if phase.is_final() {
        return awaits_target(m);
    }
    matches!(phase, MigrationPhase::Pending | MigrationPhase::Scheduling)
        || m.metadata.deletion_timestamp.is_some()
}

/// Whether `m` ended without moving the VM while its target may still hold
/// an incoming VMM: a live migration that got a target and that the target
/// agent has not yet released (`status.targetReleased`). In post-copy that
/// VMM ran the guest; the VM goes back to the source, and may restart there,
/// only once it is gone.
pub fn awaits_target(m: &VMMigration) -> bool {
    let Some(status) = m.status.as_ref() else {
        return false;
    };
    status.phase.is_final()
        && status.phase != MigrationPhase::Succeeded
        && m.spec.mode != MigrationMode::Cold
        && status.target_node.is_some()
        && !status.target_released
}

/// Whether `vm` is moved by `m` right now (its status names it).
pub fn vm_names(vm: &VirtualMachine, m: &VMMigration) -> bool {
    vm.status.as_ref().and_then(|s| s.migration.as_deref()) == Some(m.name_any().as_str())
}

/// Decides what the operator writes for `m`.
pub fn next_migration_step(m: &VMMigration, inputs: &MigrationInputs<'_>) -> MigrationStep {
    let phase = migration_phase(m);
    if phase.is_final() {
        if let Some(vm) = inputs.vm.filter(|vm| vm_names(vm, m)) {
            if let Some(wait) = target_holds(m, inputs) {
                return wait;
            }
            return MigrationStep::MoveVm(vm_move(m, vm));
        }
        if has_finalizer(m) {
            return MigrationStep::ReleaseFinalizer;
        }
        return MigrationStep::Nothing { requeue: None };
    }
    if !has_finalizer(m) {
        if m.metadata.deletion_timestamp.is_some() {
            // Never admitted: nothing of ours to clean up.
            return MigrationStep::Nothing { requeue: None };
        }
        return MigrationStep::AddFinalizer;
    }
    match phase {
        MigrationPhase::Pending | MigrationPhase::Scheduling => {
            if cancel_requested(m) {
                let on = inputs
                    .vm
                    .and_then(view::vm_node)
                    .map(|n| format!(" on {n}"))
                    .unwrap_or_default();
                return MigrationStep::Cancel {
                    reason: format!("cancelled before it started; the VM stays{on}"),
                };
            }
            admit(m, inputs)
        }
        _ => in_progress(m, phase, inputs),
    }
}

fn admit(m: &VMMigration, inputs: &MigrationInputs<'_>) -> MigrationStep {
    let fail = |reason: String| MigrationStep::Fail { reason };
    let cold = m.spec.mode == MigrationMode::Cold;
    let vm_name = &m.spec.vm_name;
    // Manifests applied together (GitOps) may bring the migration before its
    // VM exists or runs: wait for it, within the completion timeout.
    let waited_too_long = || {
        let created = m.metadata.creation_timestamp.as_ref().map(|t| t.0);
        // Without a creation time (never from the API server) do not wait.
        created.is_none_or(|c| {
            inputs.now.duration_since(c).as_secs()
                > i64::from(MigrationPolicy::DEFAULT_COMPLETION_TIMEOUT_SECONDS)
        })
    };
    let Some(vm) = inputs.vm else {
        let message = format!(
            "VirtualMachine {vm_name:?} not found in namespace {:?}",
            m.namespace().unwrap_or_default()
        );
        if waited_too_long() {
            return fail(message);
        }
        return MigrationStep::Wait {
            reason: "WaitingForVM",
            message: format!("{message}; waiting for it"),
        };
    };
    let Some(cluster) = inputs.cluster else {
        return MigrationStep::Nothing {
            requeue: Some(Duration::from_secs(1)),
        };
    };
    let ours = vm_names(vm, m);
    if let Some(other) = competing(m, &cluster.migrations) {
        return fail(format!(
            "VM {vm_name:?} is already being migrated by VMMigration {other:?}"
        ));
    }
    let phase = view::vm_phase(vm);
    // `Migrating` and naming us: an admission cut short, carry on.
    let starting = matches!(
        phase,
        VmPhase::Pending | VmPhase::Scheduled | VmPhase::Provisioning | VmPhase::Starting
    );
    if cold {
        if !ours && !matches!(phase, VmPhase::Stopped | VmPhase::Failed) {
            return fail(format!(
                "VM {vm_name:?} is {phase:?}: a cold migration moves a stopped VM; stop it first (runStrategy: Halted) or use mode: Live"
            ));
        }
        if !matches!(
            vm.spec.run_strategy,
            RunStrategy::Halted | RunStrategy::Manual
        ) {
            return fail(format!(
                "VM {vm_name:?} has runStrategy {:?}, which would start it again during the move; set runStrategy: Halted (or Manual) first",
                vm.spec.run_strategy
            ));
        }
    } else if starting && !ours && !waited_too_long() {
        return MigrationStep::Wait {
            reason: "WaitingForVM",
            message: format!("VM {vm_name:?} is {phase:?}; waiting for it to run"),
        };
    }
    if !cold && phase != VmPhase::Running && !ours {
        let hint = if matches!(phase, VmPhase::Stopped | VmPhase::Failed) {
            "; use mode: Cold to move a stopped VM"
        } else {
            ""
        };
        return fail(format!(
            "VM {vm_name:?} is {phase:?}, not Running: only a running VM can be live-migrated{hint}"
        ));
    }
    let Some(source) = view::vm_node(vm).map(str::to_string) else {
        return fail(format!("VM {vm_name:?} has no node"));
    };
    // A cold migration always copies the node-local disks.
    if !cold && m.spec.storage != Some(StorageMode::Copy) {
        if let Some(disk) = view::local_writable_disk(vm) {
            return fail(format!(
                "disk {disk:?} is on node-local storage and writable; set spec.storage: Copy to copy it with the migration"
            ));
        }
    }

    let limits = inputs.limits;
    let flying: Vec<&VMMigration> = cluster
        .migrations
        .iter()
        .filter(|o| o.uid() != m.uid() && in_flight(o))
        .collect();
    if flying.len() >= limits.per_cluster {
        return MigrationStep::Wait {
            reason: "WaitingForSlot",
            message: format!(
                "{} migrations in flight; the cluster allows {}",
                flying.len(),
                limits.per_cluster
            ),
        };
    }
    let busy = |node: &str| {
        flying
            .iter()
            .filter(|o| {
                let s = o.status.as_ref();
                s.and_then(|s| s.source_node.as_deref()) == Some(node)
                    || s.and_then(|s| s.target_node.as_deref()) == Some(node)
            })
            .count()
    };
    let full = |node: &str| busy(node) >= limits.per_node;
    let slot_message = |node: &str| {
        format!(
            "{node} has {} migrations in flight; a node allows {}",
            busy(node),
            limits.per_node
        )
    };
    if full(&source) {
        return MigrationStep::Wait {
            reason: "WaitingForSlot",
            message: slot_message(&source),
        };
    }

    let mut request = view::request_for(vm, cluster.vm_resources(vm));
    request.exclude.push(source.clone());
    let place = |request: &scheduler::Request, nodes: &[scheduler::NodeInfo]| {
        scheduler::place(
            request,
            nodes,
            &cluster.placed,
            inputs.reserve,
            inputs.strategy,
        )
    };
    let target = match &m.spec.target_node {
        Some(target) => {
            if *target == source {
                return fail(format!("targetNode {target} is the node the VM runs on"));
            }
            let Some(node) = cluster.node(target) else {
                return fail(format!(
                    "targetNode {target} is not a Godwit node (no Node {target} labelled {NODE_LABEL})"
                ));
            };
            if let Err(why) = place(&request, std::slice::from_ref(node)) {
                let refusal = why
                    .0
                    .first()
                    .map(|(_, r)| r.to_string())
                    .unwrap_or_default();
                return fail(format!("targetNode {target} cannot take the VM: {refusal}"));
            }
            if full(target) {
                return MigrationStep::Wait {
                    reason: "WaitingForSlot",
                    message: slot_message(target),
                };
            }
            target.clone()
        }
        None => {
            let crowded: Vec<String> = cluster
                .nodes
                .iter()
                .map(|n| n.name.clone())
                .filter(|n| full(n))
                .collect();
            let mut free_slots = request.clone();
            free_slots.exclude.extend(crowded.iter().cloned());
            match place(&free_slots, &cluster.nodes) {
                Ok(target) => target,
                Err(_) if !crowded.is_empty() && place(&request, &cluster.nodes).is_ok() => {
                    return MigrationStep::Wait {
                        reason: "WaitingForSlot",
                        message: format!(
                            "every node that can take the VM has {} migrations in flight",
                            limits.per_node
                        ),
                    };
                }
                Err(why) => return fail(why.to_string()),
            }
        }
    };
    MigrationStep::Admit { source, target }
}

/// Another unfinished migration of the same VM that goes first: one in
/// flight, or a pending one created earlier (ties by name).
fn competing(m: &VMMigration, all: &[VMMigration]) -> Option<String> {
    let key = |o: &VMMigration| {
        (
            o.metadata.creation_timestamp.as_ref().map(|t| t.0),
            o.name_any(),
        )
    };
    all.iter()
        .filter(|o| {
            o.uid() != m.uid()
                && o.namespace() == m.namespace()
                && o.spec.vm_name == m.spec.vm_name
                && !migration_phase(o).is_final()
        })
        .find(|o| in_flight(o) || key(o) < key(m))
        .map(|o| o.name_any())
}

fn in_progress(
    m: &VMMigration,
    phase: MigrationPhase,
    inputs: &MigrationInputs<'_>,
) -> MigrationStep {
    let status = m.status.clone().unwrap_or_default();
    let (Some(source), Some(target)) = (status.source_node.clone(), status.target_node.clone())
    else {
        return MigrationStep::Fail {
            reason: "status lost its sourceNode or targetNode; start a new migration".into(),
        };
    };
    let labels = m.labels();
    if labels.get(SOURCE_LABEL) != Some(&source) || labels.get(TARGET_LABEL) != Some(&target) {
        return MigrationStep::Label { source, target };
    }
    let deleting = m.metadata.deletion_timestamp.is_some();
    if let (true, Some(cluster)) = (deleting, inputs.cluster) {
        if let Some(gone) = lost_for(cluster, &source, inputs.now) {
            return MigrationStep::Fail {
                reason: format!(
                    "source node {source} has not renewed its lease for {gone} s; the migration is abandoned"
                ),
            };
        }
    }
    let Some(start) = status.start_time.as_ref().map(|t| t.0) else {
        return MigrationStep::Nothing {
            requeue: Some(Duration::from_secs(5)),
        };
    };
    let elapsed = inputs.now.as_second() - start.as_second();
    if phase == MigrationPhase::PreparingTarget
        && status.target_address.is_none()
        && elapsed > TARGET_PREPARE_SECONDS
    {
        return MigrationStep::Fail {
            reason: format!("target node {target} did not prepare in {TARGET_PREPARE_SECONDS} s"),
        };
    }
    let timeout = i64::from(completion_timeout(m, inputs.vm));
    if elapsed > timeout + COMPLETION_GRACE_SECONDS
        && m.annotations().get(CANCEL_ANNOTATION).map(String::as_str) != Some("true")
        && phase.can_transition_to(MigrationPhase::Cancelled)
    {
        return MigrationStep::RequestCancel {
            message: format!(
                "not finished after the completion timeout of {timeout} s; asked the source agent to cancel"
            ),
        };
    }
    MigrationStep::Nothing {
        requeue: Some(Duration::from_secs(5)),
    }
}

/// While the target may still run an incoming VMM of a migration that did
/// not succeed ([`awaits_target`]), the VM waits: until the target agent
/// releases it, until the target node is lost (its agent fenced itself and
/// stopped its VMMs), or for at most [`TARGET_RELEASE_SECONDS`] after the
/// end (an agent that cannot write the flag, such as one of an older
/// release during an upgrade, does not hold the VM for ever; a live one
/// removes an incoming VMM within seconds).
fn target_holds(m: &VMMigration, inputs: &MigrationInputs<'_>) -> Option<MigrationStep> {
    if !awaits_target(m) {
        return None;
    }
    let status = m.status.as_ref()?;
    let target = status.target_node.as_deref()?;
    let lost = inputs
        .cluster
        .is_some_and(|c| lost_for(c, target, inputs.now).is_some());
    let waited_out = status
        .end_time
        .as_ref()
        .is_some_and(|t| inputs.now.as_second() - t.0.as_second() > TARGET_RELEASE_SECONDS);
    (!lost && !waited_out).then_some(MigrationStep::Nothing {
        requeue: Some(Duration::from_secs(1)),
    })
}

/// Seconds the node's lease has been expired beyond one more lease
/// duration, if so (a node with no lease, or no Node, counts as long gone).
fn lost_for(cluster: &ClusterView, node: &str, now: Timestamp) -> Option<i64> {
    let grace = i64::from(NODE_LEASE_SECONDS);
    match cluster.lease_expiry.get(node) {
        Some(expiry) => {
            let gone = now.as_second() - expiry.as_second();
            (gone > grace).then_some(gone)
        }
        None => Some(grace),
    }
}

/// The completion timeout: the migration's policy, else the VM's, else the
/// default.
pub fn completion_timeout(m: &VMMigration, vm: Option<&VirtualMachine>) -> u32 {
    let vm_policy = vm
        .and_then(|v| v.spec.migration_policy.clone())
        .unwrap_or_default();
    m.spec
        .policy
        .clone()
        .unwrap_or_default()
        .or(&vm_policy)
        .completion_timeout_seconds
        .unwrap_or(MigrationPolicy::DEFAULT_COMPLETION_TIMEOUT_SECONDS)
}

fn vm_move(m: &VMMigration, vm: &VirtualMachine) -> VmMove {
    let status = m.status.clone().unwrap_or_default();
    let name = m.name_any();
    let current = view::vm_node(vm).unwrap_or_default().to_string();
    let source = status
        .source_node
        .clone()
        .unwrap_or_else(|| current.clone());
    let why = status
        .failure_reason
        .clone()
        .map(|r| format!(": {r}"))
        .unwrap_or_default();
    match (status.phase, status.target_node.clone()) {
        (MigrationPhase::Succeeded, Some(target)) => {
            let figures = status
                .result
                .as_ref()
                .map(|r| format!(" in {} ms, downtime {} ms", r.total_time_ms, r.downtime_ms))
                .unwrap_or_default();
            VmMove {
                vm_note: Note::normal(
                    "Migrated",
                    format!(
                        "Live-migrated from {source} to {target}{figures} (VMMigration {name})"
                    ),
                ),
                migration_note: Note::normal(
                    "Migrated",
                    format!("Live-migrated VM {} to {target}{figures}", m.spec.vm_name),
                ),
                node: target,
                result: MigrationPhase::Succeeded,
            }
        }
        (MigrationPhase::Cancelled, _) => VmMove {
            vm_note: Note::normal(
                "MigrationCancelled",
                format!("VMMigration {name} was cancelled; the VM stays on {source}"),
            ),
            migration_note: Note::normal(
                "Cancelled",
                format!("Cancelled; VM {} stays on {source}", m.spec.vm_name),
            ),
            node: source,
            result: MigrationPhase::Cancelled,
        },
        // Failed, or Succeeded without a target (nothing to move to).
        (phase, _) => VmMove {
            vm_note: Note::warning(
                "MigrationFailed",
                format!("VMMigration {name} failed; the VM stays on {source}{why}"),
            ),
            migration_note: Note::warning(
                "Failed",
                format!("VM {} stays on {source}{why}", m.spec.vm_name),
            ),
            node: source,
            result: if phase == MigrationPhase::Succeeded {
                MigrationPhase::Failed
            } else {
                phase
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use godwit_crds::contract::{Machine, MachineDisk, MachineDiskSource};
    use godwit_crds::{ImageFormat, MigrationResult, StorageKind};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;
    use crate::fixtures::{at, cluster, migration, t0, vm, MigrationFixture, VmFixture};

    const PER_NODE: usize = 2;

    fn running() -> VirtualMachine {
        vm("demo").on("node-1").running()
    }

    fn decide_with(
        m: &VMMigration,
        vm: Option<&VirtualMachine>,
        cluster: Option<&ClusterView>,
        now: Timestamp,
        limits: MigrationLimits,
    ) -> MigrationStep {
        next_migration_step(
            m,
            &MigrationInputs {
                vm,
                cluster,
                strategy: Strategy::Spread,
                reserve: Reserve::default(),
                limits,
                now,
            },
        )
    }

    fn decide_at(
        m: &VMMigration,
        vm: Option<&VirtualMachine>,
        cluster: Option<&ClusterView>,
        now: Timestamp,
    ) -> MigrationStep {
        let limits = MigrationLimits {
            per_node: PER_NODE,
            per_cluster: 3,
        };
        decide_with(m, vm, cluster, now, limits)
    }

    fn decide(
        m: &VMMigration,
        vm: Option<&VirtualMachine>,
        cluster: &ClusterView,
    ) -> MigrationStep {
        decide_at(m, vm, Some(cluster), t0())
    }

    fn failure(action: MigrationStep) -> String {
        match action {
            MigrationStep::Fail { reason } => reason,
            other => panic!("expected Fail, got {other:?}"),
        }
    }

    fn with_disk(
        vm: &VirtualMachine,
        storage: StorageKind,
        read_only: bool,
        image: bool,
    ) -> VirtualMachine {
        let mut vm = vm.clone();
        let machine = Machine {
            cpu: 1,
            memory_bytes: 1 << 30,
            disks: vec![MachineDisk {
                name: "root".into(),
                source: if image {
                    MachineDiskSource::Image {
                        path: "/img".into(),
                        format: ImageFormat::Raw,
                    }
                } else {
                    MachineDiskSource::Clone {
                        path: "/base".into(),
                        format: ImageFormat::Raw,
                    }
                },
                storage,
                read_only,
            }],
            ..Default::default()
        };
        vm.status.get_or_insert_with(Default::default).machine =
            Some(serde_json::to_value(&machine).unwrap());
        vm
    }

    #[test]
    fn a_new_migration_gets_the_finalizer_first() {
        let m = migration("m1", "demo");
        let c = cluster(vec![running()], vec![]);
        assert_eq!(
            decide(&m, Some(&running()), &c),
            MigrationStep::AddFinalizer
        );
        let mut gone = m.clone();
        gone.metadata.deletion_timestamp = Some(Time(t0()));
        assert_eq!(
            decide(&gone, Some(&running()), &c),
            MigrationStep::Nothing { requeue: None },
            "deleted before admission: nothing to hold it for"
        );
    }

    #[test]
    fn a_valid_migration_is_admitted_to_the_best_other_node() {
        let vm = running();
        let c = cluster(vec![vm.clone()], vec![]);
        assert_eq!(
            decide(&migration("m1", "demo").finalized(), Some(&vm), &c),
            MigrationStep::Admit {
                source: "node-1".into(),
                target: "node-2".into()
            }
        );
        let mut to3 = migration("m1", "demo").finalized();
        to3.spec.target_node = Some("node-3".into());
        assert_eq!(
            decide(&to3, Some(&vm), &c),
            MigrationStep::Admit {
                source: "node-1".into(),
                target: "node-3".into()
            }
        );
    }

    #[test]
    fn invalid_migrations_fail_with_a_reason() {
        let vm = running();
        let c = cluster(vec![vm.clone()], vec![]);
        let m = migration("m1", "demo").finalized();

        assert!(failure(decide(&m, None, &c)).contains("\"demo\" not found"));
        // Applied together with its VM: the migration waits for the VM to exist
        // and run, within the completion timeout.
        let mut fresh = m.clone();
        fresh.metadata.creation_timestamp = Some(Time(at(-10)));
        let waits = |a: MigrationStep| match a {
            MigrationStep::Wait {
                reason: "WaitingForVM",
                message,
            } => message,
            other => panic!("expected WaitingForVM, got {other:?}"),
        };
        assert!(waits(decide(&fresh, None, &c)).contains("not found"));
        let starting = running().phase(VmPhase::Starting);
        assert!(waits(decide(&fresh, Some(&starting), &c)).contains("is Starting"));
        fresh.metadata.creation_timestamp = Some(Time(at(-3600)));
        assert!(failure(decide(&fresh, None, &c)).contains("\"demo\" not found"));

        let stopped = running().phase(VmPhase::Stopped);
        assert!(failure(decide(&m, Some(&stopped), &c)).contains("is Stopped, not Running"));

        let mut nowhere = vm.clone();
        nowhere.metadata.labels = None;
        assert!(failure(decide(&m, Some(&nowhere), &c)).contains("has no node"));

        let mut cold = m.clone();
        cold.spec.mode = MigrationMode::Cold;
        assert!(
            failure(decide(&cold, Some(&vm), &c)).contains("a cold migration moves a stopped VM")
        );
        let mut halted = stopped.clone();
        halted.spec.run_strategy = RunStrategy::Halted;
        assert!(matches!(
            decide(&cold, Some(&halted), &c),
            MigrationStep::Admit { .. }
        ));
        let mut always = stopped.clone();
        always.spec.run_strategy = RunStrategy::Always;
        assert!(failure(decide(&cold, Some(&always), &c)).contains("set runStrategy: Halted"));
        assert!(failure(decide(&m, Some(&stopped), &c)).contains("use mode: Cold"));

        let mut same = m.clone();
        same.spec.target_node = Some("node-1".into());
        assert!(failure(decide(&same, Some(&vm), &c)).contains("is the node the VM runs on"));

        let mut unknown = m.clone();
        unknown.spec.target_node = Some("elsewhere".into());
        assert!(failure(decide(&unknown, Some(&vm), &c)).contains("not a Godwit node"));

        let full = cluster(
            vec![
                vm.clone(),
                crate::fixtures::vm("hog")
                    .on("node-2")
                    .running()
                    // 40 vCPUs at the default ratio 10 fill 4 CPUs.
                    .sized(40, 3),
            ],
            vec![],
        );
        let mut to2 = m.clone();
        to2.spec.target_node = Some("node-2".into());
        assert!(failure(decide(&to2, Some(&vm), &full))
            .contains("cannot take the VM: insufficient cpu"));

        let mut down = cluster(vec![vm.clone()], vec![]);
        down.nodes[1].ready = false;
        assert!(failure(decide(&to2, Some(&vm), &down)).contains("node not ready"));
        down.nodes[2].ready = false;
        assert!(failure(decide(&m, Some(&vm), &down)).contains("no node can run the VM"));
    }

    #[test]
    fn local_writable_disks_need_a_storage_copy() {
        let c = cluster(vec![running()], vec![]);
        let m = migration("m1", "demo").finalized();
        let local = with_disk(&running(), StorageKind::Local, false, false);
        assert!(failure(decide(&m, Some(&local), &c)).contains("set spec.storage: Copy"));
        let mut copy = m.clone();
        copy.spec.storage = Some(StorageMode::Copy);
        assert!(matches!(
            decide(&copy, Some(&local), &c),
            MigrationStep::Admit { .. }
        ));
        let shared = with_disk(&running(), StorageKind::Shared, false, false);
        assert!(matches!(
            decide(&m, Some(&shared), &c),
            MigrationStep::Admit { .. }
        ));
        let read_only_image = with_disk(&running(), StorageKind::Local, true, true);
        assert!(matches!(
            decide(&m, Some(&read_only_image), &c),
            MigrationStep::Admit { .. }
        ));
    }

    #[test]
    fn one_migration_per_vm_at_a_time() {
        let vm = running();
        let older = migration("a-first", "demo").finalized();
        let newer = migration("b-second", "demo").finalized();
        let c = cluster(vec![vm.clone()], vec![older.clone(), newer.clone()]);
        assert!(failure(decide(&newer, Some(&vm), &c))
            .contains("already being migrated by VMMigration \"a-first\""));
        assert!(matches!(
            decide(&older, Some(&vm), &c),
            MigrationStep::Admit { .. }
        ));
        // A finished one does not count.
        let done = older.clone().phase(MigrationPhase::Succeeded);
        let c = cluster(vec![vm.clone()], vec![done, newer.clone()]);
        assert!(matches!(
            decide(&newer, Some(&vm), &c),
            MigrationStep::Admit { .. }
        ));
    }

    /// A migration of another VM in flight between `source` and `target`.
    fn flying(name: &str, source: &str, target: &str) -> VMMigration {
        migration(name, &format!("vm-{name}")).admitted(MigrationPhase::PreCopy, source, target)
    }

    #[test]
    fn slots_per_node_and_per_cluster_hold_migrations_back() {
        let vm = running();
        let m = migration("m1", "demo").finalized();
        let wait = |a: MigrationStep| match a {
            MigrationStep::Wait {
                reason: "WaitingForSlot",
                message,
            } => message,
            other => panic!("expected WaitForSlot, got {other:?}"),
        };

        // The source (node-1) is in two migrations already.
        let c = cluster(
            vec![vm.clone()],
            vec![
                flying("x", "node-1", "node-2"),
                flying("y", "node-3", "node-1"),
            ],
        );
        assert!(wait(decide(&m, Some(&vm), &c)).contains("node-1 has 2 migrations in flight"));

        // node-2 is busy: the target is node-3 even though spread would
        // prefer node-2 by name.
        let c = cluster(
            vec![vm.clone()],
            vec![
                flying("x", "node-2", "node-9"),
                flying("y", "node-8", "node-2"),
            ],
        );
        assert_eq!(
            decide(&m, Some(&vm), &c),
            MigrationStep::Admit {
                source: "node-1".into(),
                target: "node-3".into()
            }
        );
        // Asked for node-2 explicitly: wait for it.
        let mut to2 = m.clone();
        to2.spec.target_node = Some("node-2".into());
        assert!(wait(decide(&to2, Some(&vm), &c)).contains("node-2 has 2"));

        // Every possible target is busy: wait rather than fail.
        let all_busy = cluster(
            vec![vm.clone()],
            vec![
                flying("x", "node-2", "node-9"),
                flying("y", "node-8", "node-2"),
                flying("z", "node-3", "node-7"),
                flying("w", "node-6", "node-3"),
            ],
        );
        let roomy = MigrationLimits {
            per_node: PER_NODE,
            per_cluster: 10,
        };
        assert!(
            wait(decide_with(&m, Some(&vm), Some(&all_busy), t0(), roomy))
                .contains("every node that can take the VM has 2 migrations in flight")
        );
        // With the default test limit of 3, the cluster limit speaks first.
        assert!(wait(decide(&m, Some(&vm), &all_busy))
            .contains("4 migrations in flight; the cluster allows 3"));

        // Pending and final migrations hold no slot.
        let mut pending = flying("p", "node-1", "node-2");
        pending.status.as_mut().unwrap().phase = MigrationPhase::Pending;
        let mut done = flying("d", "node-1", "node-2");
        done.status.as_mut().unwrap().phase = MigrationPhase::Failed;
        let c = cluster(
            vec![vm.clone()],
            vec![pending.clone(), pending, done.clone(), done],
        );
        assert!(matches!(
            decide(&m, Some(&vm), &c),
            MigrationStep::Admit { .. }
        ));
    }

    #[test]
    fn timeouts_fail_a_silent_target_and_ask_to_cancel_a_slow_migration() {
        let vm = running().migrating("m1");
        let m = migration("m1", "demo").finalized();
        let preparing = m
            .clone()
            .admitted(MigrationPhase::PreparingTarget, "node-1", "node-2");
        let quiet = MigrationStep::Nothing {
            requeue: Some(Duration::from_secs(5)),
        };
        assert_eq!(decide_at(&preparing, Some(&vm), None, at(60)), quiet);
        assert_eq!(
            failure(decide_at(&preparing, Some(&vm), None, at(61))),
            "target node node-2 did not prepare in 60 s"
        );
        let mut answered = preparing.clone();
        answered.status.as_mut().unwrap().target_address = Some("10.0.0.2:4444".into());
        assert_eq!(decide_at(&answered, Some(&vm), None, at(61)), quiet);

        // Default completion timeout 600 s, plus 30 s grace.
        let copying = m
            .clone()
            .admitted(MigrationPhase::PreCopy, "node-1", "node-2");
        assert_eq!(decide_at(&copying, Some(&vm), None, at(630)), quiet);
        assert!(matches!(
            decide_at(&copying, Some(&vm), None, at(631)),
            MigrationStep::RequestCancel { message } if message.contains("600 s")
        ));
        let mut asked = copying.clone();
        asked.metadata.annotations = Some([(CANCEL_ANNOTATION.into(), "true".into())].into());
        assert_eq!(
            decide_at(&asked, Some(&vm), None, at(631)),
            quiet,
            "asked once"
        );
        // Past the point of no return, cancelling is not possible.
        let post = m
            .clone()
            .admitted(MigrationPhase::PostCopy, "node-1", "node-2");
        assert_eq!(decide_at(&post, Some(&vm), None, at(10_000)), quiet);

        // The VM's policy, and the migration's over it.
        let mut strict_vm = vm.clone();
        strict_vm.spec.migration_policy = Some(MigrationPolicy {
            completion_timeout_seconds: Some(10),
            ..Default::default()
        });
        assert_eq!(completion_timeout(&copying, Some(&strict_vm)), 10);
        assert!(matches!(
            decide_at(&copying, Some(&strict_vm), None, at(41)),
            MigrationStep::RequestCancel { .. }
        ));
        let mut lenient = copying.clone();
        lenient.spec.policy = Some(MigrationPolicy {
            completion_timeout_seconds: Some(3600),
            ..Default::default()
        });
        assert_eq!(completion_timeout(&lenient, Some(&strict_vm)), 3600);
    }

    #[test]
    fn cancelling_in_each_phase() {
        let vm = running();
        let c = cluster(vec![vm.clone()], vec![]);
        let mut m = migration("m1", "demo").finalized();
        m.metadata.annotations = Some([(CANCEL_ANNOTATION.into(), "true".into())].into());
        assert_eq!(
            decide(&m, Some(&vm), &c),
            MigrationStep::Cancel {
                reason: "cancelled before it started; the VM stays on node-1".into()
            }
        );
        let mut deleted = migration("m1", "demo").finalized();
        deleted.metadata.deletion_timestamp = Some(Time(t0()));
        assert!(matches!(
            decide(&deleted, Some(&vm), &c),
            MigrationStep::Cancel { .. }
        ));
        let scheduling = deleted.clone().phase(MigrationPhase::Scheduling);
        assert!(matches!(
            decide(&scheduling, Some(&vm), &c),
            MigrationStep::Cancel { .. }
        ));

        // From PreparingTarget on, the source agent cancels: the operator waits.
        let vm = vm.clone().migrating("m1");
        for phase in [
            MigrationPhase::PreparingTarget,
            MigrationPhase::PreCopy,
            MigrationPhase::StopAndCopy,
            MigrationPhase::PostCopy,
            MigrationPhase::Committing,
        ] {
            let mut flying = deleted.clone().admitted(phase, "node-1", "node-2");
            flying.status.as_mut().unwrap().target_address = Some("x:1".into());
            assert!(
                matches!(
                    decide(&flying, Some(&vm), &c),
                    MigrationStep::Nothing { .. }
                ),
                "{phase:?}"
            );
        }

        // ... unless the source has been gone for more than a lease duration.
        // (The fixture's Leases expire at 10 s.)
        let flying = deleted
            .clone()
            .admitted(MigrationPhase::PreCopy, "node-1", "node-2");
        let gone = 10 + i64::from(NODE_LEASE_SECONDS);
        assert!(matches!(
            decide_at(&flying, Some(&vm), Some(&c), at(gone)),
            MigrationStep::Nothing { .. }
        ));
        assert!(
            failure(decide_at(&flying, Some(&vm), Some(&c), at(gone + 1)))
                .contains("source node node-1 has not renewed its lease")
        );
    }

    fn ended(m: &VMMigration, phase: MigrationPhase) -> VMMigration {
        let mut m = m.clone().admitted(phase, "node-1", "node-2");
        if phase == MigrationPhase::Succeeded {
            m.status.as_mut().unwrap().result = Some(MigrationResult {
                total_time_ms: 812,
                downtime_ms: 9,
                ..Default::default()
            });
        } else {
            let status = m.status.as_mut().unwrap();
            status.failure_reason = Some("link cut".into());
            status.target_released = true;
        }
        m
    }

    fn moved(action: MigrationStep) -> VmMove {
        match action {
            MigrationStep::MoveVm(v) => v,
            other => panic!("expected MoveVm, got {other:?}"),
        }
    }

    #[test]
    fn the_vm_moves_as_the_final_phase_says() {
        let vm = running().migrating("m1");
        let c = cluster(vec![vm.clone()], vec![]);
        let m = migration("m1", "demo").finalized();

        let ok = moved(decide(&ended(&m, MigrationPhase::Succeeded), Some(&vm), &c));
        assert_eq!(ok.node, "node-2");
        assert_eq!(ok.result, MigrationPhase::Succeeded);
        assert_eq!(
            ok.vm_note,
            Note::normal(
                "Migrated",
                "Live-migrated from node-1 to node-2 in 812 ms, downtime 9 ms (VMMigration m1)"
            )
        );
        assert_eq!(
            ok.migration_note.message,
            "Live-migrated VM demo to node-2 in 812 ms, downtime 9 ms"
        );

        let failed = moved(decide(&ended(&m, MigrationPhase::Failed), Some(&vm), &c));
        assert_eq!(failed.node, "node-1");
        assert!(failed.vm_note.warning);
        assert!(failed
            .vm_note
            .message
            .ends_with("stays on node-1: link cut"));

        let cancelled = moved(decide(&ended(&m, MigrationPhase::Cancelled), Some(&vm), &c));
        assert_eq!(cancelled.node, "node-1");
        assert_eq!(cancelled.result, MigrationPhase::Cancelled);
        assert!(!cancelled.vm_note.warning);
    }

    #[test]
    fn a_failed_migration_gives_the_vm_back_only_once_the_target_let_go() {
        let vm = running().migrating("m1");
        let c = cluster(vec![vm.clone()], vec![]);
        let m = migration("m1", "demo").finalized();
        for phase in [MigrationPhase::Failed, MigrationPhase::Cancelled] {
            let mut held = ended(&m, phase);
            held.status.as_mut().unwrap().target_released = false;
            assert!(awaits_target(&held) && needs_cluster(&held));
            // The target's incoming VMM may run the guest (post-copy):
            // the VM stays marked as migrating, so nothing restarts it.
            assert_eq!(
                decide(&held, Some(&vm), &c),
                MigrationStep::Nothing {
                    requeue: Some(Duration::from_secs(1))
                }
            );
            // Without the cluster view the target's lease is unknown: wait.
            assert!(matches!(
                decide_at(&held, Some(&vm), None, t0()),
                MigrationStep::Nothing { .. }
            ));
            // The target node is lost: its agent fenced itself.
            let later = at(30);
            assert_eq!(
                moved(decide_at(&held, Some(&vm), Some(&c), later)).node,
                "node-1"
            );
            // A live target that never says so holds the VM only so long.
            let mut live = c.clone();
            live.lease_expiry.insert("node-2".into(), at(1000));
            let mut old = held.clone();
            old.status.as_mut().unwrap().end_time = Some(Time(t0()));
            assert!(matches!(
                decide_at(&old, Some(&vm), Some(&live), at(TARGET_RELEASE_SECONDS)),
                MigrationStep::Nothing { .. }
            ));
            let late = at(TARGET_RELEASE_SECONDS + 1);
            assert_eq!(
                moved(decide_at(&old, Some(&vm), Some(&live), late)).node,
                "node-1"
            );
            // Or the target agent released it.
            let released = ended(&m, phase);
            assert!(!awaits_target(&released) && !needs_cluster(&released));
            assert_eq!(moved(decide(&released, Some(&vm), &c)).node, "node-1");
        }
        // A success, or a cold move (whose target never runs the guest),
        // does not wait.
        let mut done = ended(&m, MigrationPhase::Succeeded);
        done.status.as_mut().unwrap().target_released = false;
        assert!(!awaits_target(&done));
        let mut cold = ended(&m, MigrationPhase::Failed);
        cold.spec.mode = MigrationMode::Cold;
        cold.status.as_mut().unwrap().target_released = false;
        assert!(!awaits_target(&cold));
    }

    #[test]
    fn ending_is_idempotent() {
        let m = ended(
            &migration("m1", "demo").finalized(),
            MigrationPhase::Succeeded,
        );
        // After the move: the VM is on node-2 and names no migration.
        let settled = vm("demo").on("node-2").running();
        let c = cluster(vec![settled.clone()], vec![]);
        assert_eq!(
            decide(&m, Some(&settled), &c),
            MigrationStep::ReleaseFinalizer
        );
        let mut released = m.clone();
        released.metadata.finalizers = None;
        assert_eq!(
            decide(&released, Some(&settled), &c),
            MigrationStep::Nothing { requeue: None }
        );
        // The VM was deleted meanwhile: just release.
        assert_eq!(decide(&m, None, &c), MigrationStep::ReleaseFinalizer);
        // A later migration of the same VM is not disturbed by an old one.
        let later = settled.clone().migrating("m2");
        assert_eq!(
            decide(&released, Some(&later), &c),
            MigrationStep::Nothing { requeue: None }
        );
    }

    #[test]
    fn an_admission_cut_short_is_finished() {
        // The VM was marked, then the operator stopped before the status.
        let vm = running().migrating("m1");
        let m = migration("m1", "demo").finalized();
        let c = cluster(vec![vm.clone()], vec![]);
        assert!(matches!(
            decide(&m, Some(&vm), &c),
            MigrationStep::Admit { .. }
        ));
        // The status was written but not the labels.
        let mut unlabelled =
            m.clone()
                .admitted(MigrationPhase::PreparingTarget, "node-1", "node-2");
        unlabelled.metadata.labels = None;
        assert_eq!(
            decide_at(&unlabelled, Some(&vm), None, t0()),
            MigrationStep::Label {
                source: "node-1".into(),
                target: "node-2".into()
            }
        );
        // All written: nothing more to do while the agents work.
        let done = m
            .clone()
            .admitted(MigrationPhase::PreparingTarget, "node-1", "node-2");
        assert!(matches!(
            decide_at(&done, Some(&vm), None, at(1)),
            MigrationStep::Nothing { .. }
        ));
    }
}
