//! A VM on this node: starting, stopping and cleaning up its VMM as
//! [`decide_node_vm`] says, and writing what happened into the VM's status
//! (phase, addresses, the Ready condition) and Events.
//!
//! A stop (runStrategy `Halted`, phase `Stopping` from a restart request or
//! maintenance, the VM deleted) presses the guest's ACPI power button and
//! gives it `spec.terminationGracePeriodSeconds` to power off before the
//! stop is forced ([`vmm_process::request_shutdown`], one step per pass);
//! `kubectl godwit stop --force` ([`contract::FORCE_STOP_ANNOTATION`])
//! skips the button. A lost Lease fences the node with forced stops
//! ([`super::lease`]). A running VM's VMM is paused and resumed on request
//! ([`contract::PAUSE_ANNOTATION`], [`pause`]).

use std::time::Duration;

use godwit_crds::contract::{self, Machine};
use godwit_crds::vm::VmAddress;
use godwit_crds::{VirtualMachine, VmPhase};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::context::{apply_condition, now_time, Agent};
use super::decide::{decide_node_vm, NodeVmAction, VmFacts};
use super::vm_dir::{self, VmDir};
use super::vmm_process::{ForceReason, ShutdownProgress};
use super::{pause, restart, seed, vmm_process};

/// Makes this node match VM `vm`: what [`decide_node_vm`] says, carried out.
pub async fn reconcile(agent: &Agent, vm: &VirtualMachine) -> anyhow::Result<()> {
    let ns = vm.namespace().unwrap_or_default();
    let name = vm.name_any();
    let dir = agent.dir(&ns, &name);
    let mut local = dir.state();
    // The VMM may have ended since this pass's cgroup sweep: its OOM kills
    // are read here too, so that the exit is reported as what it was.
    if local.exit.is_some() && !local.oom_killed {
        if let Some(cg) = &agent.runner.cgroups {
            if cg.exists(&ns, &name) && cg.oom_kills(&ns, &name) > 0 {
                let _ = std::fs::write(dir.file(vmm_process::OOM_MARKER), "");
                local.oom_killed = true;
            }
        }
    }
    let machine: Option<Machine> = contract::resolved_machine(vm);
    let status = vm.status.clone().unwrap_or_default();
    let facts = VmFacts {
        phase: status.phase,
        run_strategy: vm.spec.run_strategy,
        deleting: vm.meta().deletion_timestamp.is_some(),
        has_finalizer: vm
            .finalizers()
            .iter()
            .any(|f| f == contract::AGENT_FINALIZER),
        has_machine: machine.is_some(),
        migrating: status.migration.is_some(),
        reported_here: status.conditions.iter().any(|c| {
            c.type_ == "Ready" && c.status == "True" && c.message == agent.running_message()
        }),
    };
    let action = decide_node_vm(&facts, &local);
    let action = restart::adjust(action, vm, &facts, &dir, &local);
    let api: Api<VirtualMachine> = Api::namespaced(agent.client.clone(), &ns);
    match action {
        NodeVmAction::Nothing => {
            if facts.phase == VmPhase::Running
                && facts.reported_here
                && !facts.migrating
                && local.alive
                && !agent.fenced()
            {
                pause::sync(agent, vm, &dir).await?;
            }
        }
        NodeVmAction::AddFinalizer => {
            let mut finalizers = vm.finalizers().to_vec();
            finalizers.push(contract::AGENT_FINALIZER.into());
            let patch = json!({"metadata": {"finalizers": finalizers, "resourceVersion": vm.resource_version()}});
            api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
        }
        NodeVmAction::Start => {
            if agent.fenced() {
                return Ok(());
            }
            let machine = machine.expect("decided to start only with a machine");
            // A VM naming files where it may not is refused before it is
            // Provisioning: a pass that failed after that write would leave
            // it Provisioning without a VMM, which reads as files gone.
            let dirs = agent.runner.image_dirs.clone();
            let m = machine.clone();
            if let Err(refused) =
                tokio::task::spawn_blocking(move || dirs.check_machine(&m)).await?
            {
                let msg = format!(
                    "cannot start on {}: {}",
                    agent.cfg.node,
                    godwit_crds::error_chain(&refused)
                );
                let reason = "ImagePathRefused";
                tracing::warn!(vm = %format!("{ns}/{name}"), reason, "{msg}");
                vm_phase(&api, vm, VmPhase::Failed, Some((reason, &msg))).await?;
                agent
                    .event(vm, EventType::Warning, reason, "Start", msg)
                    .await;
                return Ok(());
            }
            vm_phase(&api, vm, VmPhase::Provisioning, None).await?;
            let runner = agent.runner.clone();
            let d = dir.clone();
            let m = machine.clone();
            let started = match seed::write(&agent.client, &dir, &machine).await {
                Ok(()) => tokio::task::spawn_blocking(move || runner.boot(&d, &m))
                    .await?
                    .map_err(anyhow::Error::from),
                Err(e) => Err(anyhow::Error::from(e)),
            };
            match started {
                Ok(child) => {
                    agent.children.lock().unwrap().insert(&dir, child);
                    vm_phase(&api, vm, VmPhase::Starting, None).await?;
                    agent
                        .event(
                            vm,
                            EventType::Normal,
                            "Starting",
                            "Start",
                            format!(
                                "Starting the VMM on {} ({} vCPU, {} MiB)",
                                agent.cfg.node,
                                machine.cpu,
                                machine.memory_bytes >> 20
                            ),
                        )
                        .await;
                }
                Err(e) => {
                    let msg = format!(
                        "cannot start on {}: {}",
                        agent.cfg.node,
                        godwit_crds::error_chain(e.as_ref())
                    );
                    let reason = e
                        .downcast_ref::<vmm_process::VmmProcessError>()
                        .map_or("StartFailed", start_failure_reason);
                    tracing::warn!(vm = %format!("{ns}/{name}"), reason, "{msg}");
                    vm_phase(&api, vm, VmPhase::Failed, Some((reason, &msg))).await?;
                    agent
                        .event(vm, EventType::Warning, reason, "Start", msg)
                        .await;
                }
            }
        }
        NodeVmAction::ReportRunning => {
            // The control socket appears once the VMM is up.
            let vmm = dir.control();
            let up = tokio::task::spawn_blocking(move || vmm.status()).await?;
            if up.is_ok() {
                report_running(agent, &api, vm, &dir).await?;
            }
        }
        NodeVmAction::Stop => {
            if status.phase != VmPhase::Stopping
                && status.phase.can_transition_to(VmPhase::Stopping)
            {
                vm_phase(&api, vm, VmPhase::Stopping, None).await?;
                agent
                    .event(
                        vm,
                        EventType::Normal,
                        "Stopping",
                        "Stop",
                        format!("Stopping the VM on {}", agent.cfg.node),
                    )
                    .await;
            }
            let grace = stop_grace(vm, &dir);
            let d = dir.clone();
            let progress =
                tokio::task::spawn_blocking(move || vmm_process::request_shutdown(&d, grace))
                    .await?;
            match progress {
                ShutdownProgress::ButtonPressed { grace } => {
                    agent
                        .event(
                            vm,
                            EventType::Normal,
                            "ShuttingDown",
                            "Stop",
                            format!(
                                "Pressed the power button of the VM on {}; it is stopped by force if the guest has not powered off within {}s",
                                agent.cfg.node,
                                grace.as_secs()
                            ),
                        )
                        .await;
                }
                ShutdownProgress::Forced(why) => {
                    let kind = match why {
                        ForceReason::GraceOver(_) => EventType::Warning,
                        _ => EventType::Normal,
                    };
                    agent
                        .event(
                            vm,
                            kind,
                            "ForcedStop",
                            "Stop",
                            format!("Stopped the VM by force on {}: {why}", agent.cfg.node),
                        )
                        .await;
                }
                ShutdownProgress::Waiting { .. } | ShutdownProgress::NotRunning => {}
            }
        }
        NodeVmAction::ReportExit {
            failed,
            reason,
            cause: why,
        } => {
            let phase = if failed {
                VmPhase::Failed
            } else {
                VmPhase::Stopped
            };
            let detail = format!(
                "{reason} on {}; console: {}",
                agent.cfg.node,
                vm_dir::tail(&dir.file("console.log"), 2)
            );
            // Stopping → Stopped; anything else → Stopping → Stopped.
            if phase == VmPhase::Stopped && !status.phase.can_transition_to(VmPhase::Stopped) {
                vm_phase(&api, vm, VmPhase::Stopping, None).await?;
            }
            vm_phase(&api, vm, phase, Some((why, &detail))).await?;
            let kind = if failed {
                EventType::Warning
            } else {
                EventType::Normal
            };
            agent.event(vm, kind, why, "Exit", detail).await;
        }
        NodeVmAction::Cleanup => {
            let d = dir.clone();
            tokio::task::spawn_blocking(move || vm_dir::remove(&d, true)).await??;
            let finalizers: Vec<String> = vm
                .finalizers()
                .iter()
                .filter(|f| *f != contract::AGENT_FINALIZER)
                .cloned()
                .collect();
            let patch = json!({"metadata": {"finalizers": finalizers, "resourceVersion": vm.resource_version()}});
            api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
            agent
                .event(
                    vm,
                    EventType::Normal,
                    "Deleted",
                    "Delete",
                    format!("VMM stopped and disks removed on {}", agent.cfg.node),
                )
                .await;
        }
    }
    Ok(())
}

/// How long VM `vm`'s guest has to power off when it is stopped: its
/// `spec.terminationGracePeriodSeconds`, or none when a forced stop
/// ([`contract::FORCE_STOP_ANNOTATION`]) was asked for after its VMM started.
fn stop_grace(vm: &VirtualMachine, dir: &VmDir) -> Duration {
    let forced = vm
        .annotations()
        .get(contract::FORCE_STOP_ANNOTATION)
        .is_some_and(|requested| {
            std::fs::metadata(dir.file("pid"))
                .and_then(|m| m.modified())
                .is_ok_and(|started| restart::requested_after(requested, started))
        });
    if forced {
        Duration::ZERO
    } else {
        vm.spec.termination_grace()
    }
}

/// The Ready condition's reason when a VMM could not be started:
/// `BootImageInvalid` when the image of a `boot.fromImage` VM has no usable
/// kernel (the message says what is missing), `ImagePathRefused` when the
/// VM names a file outside the node's image directories, `StartFailed`
/// otherwise.
fn start_failure_reason(e: &vmm_process::VmmProcessError) -> &'static str {
    match e {
        vmm_process::VmmProcessError::Boot(super::boot::BootError::Image(_)) => "BootImageInvalid",
        vmm_process::VmmProcessError::PathRefused(_) => "ImagePathRefused",
        _ => "StartFailed",
    }
}

/// Reports VM `vm` Running here: its addresses and the Ready condition.
async fn report_running(
    agent: &Agent,
    api: &Api<VirtualMachine>,
    vm: &VirtualMachine,
    dir: &VmDir,
) -> anyhow::Result<()> {
    let machine = dir.machine().unwrap_or_default();
    let addresses: Vec<VmAddress> = machine
        .networks
        .iter()
        .map(|n| VmAddress {
            network: n.name.clone(),
            mac: Some(n.mac.clone()),
            ip: n
                .ip
                .as_ref()
                .map(|ip| ip.split('/').next().unwrap_or(ip).to_string()),
        })
        .collect();
    let phase = vm.status.as_ref().map(|s| s.phase).unwrap_or_default();
    if phase == VmPhase::Scheduled {
        // Adopted (or started by an agent that died) before it said so.
        vm_phase(api, vm, VmPhase::Starting, None).await?;
    }
    // The condition first: whoever sees the phase Running sees it Ready.
    apply_condition(api, vm, ready(true, "Running", &agent.running_message())).await?;
    let patch = json!({"status": {
        "phase": VmPhase::Running,
        "nodeName": agent.cfg.node,
        "addresses": addresses,
    }});
    api.patch_status(
        &vm.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    agent
        .event(
            vm,
            EventType::Normal,
            "Started",
            "Start",
            format!("Running on {}", agent.cfg.node),
        )
        .await;
    Ok(())
}

/// Writes `phase` into VM `vm`'s status, with a not-Ready `condition`
/// (reason, message) when given.
async fn vm_phase(
    api: &Api<VirtualMachine>,
    vm: &VirtualMachine,
    phase: VmPhase,
    condition: Option<(&str, &str)>,
) -> anyhow::Result<()> {
    if let Some((reason, message)) = condition {
        apply_condition(api, vm, ready(false, reason, message)).await?;
    }
    let status = json!({"phase": phase});
    api.patch_status(
        &vm.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&json!({ "status": status })),
    )
    .await?;
    Ok(())
}

/// The VM's Ready condition.
fn ready(ok: bool, reason: &str, message: &str) -> Condition {
    Condition {
        type_: "Ready".into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: now_time(),
        observed_generation: None,
    }
}
