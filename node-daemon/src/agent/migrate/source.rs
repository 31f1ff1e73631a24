//! The source's side of a live migration: asking the VMM to send
//! (`migrate-send` with the policy and the node's identity), then following
//! its progress (`migrate-status`, `migrate-cancel`) into the status.
//!
//! The VM directory remembers the migration the VMM sends (`outgoing`) and
//! its last word once it ended (`outgoing-result`): a source VMM that sent
//! its guest away exits after a grace period, and a restarted agent still
//! learns how the migration ended.

use godwit_crds::{MigrationPhase, MigrationPolicy, StorageMode, VMMigration};
use godwit_vmm_control::{ControlError, MigrateSend};
use kube::api::Api;
use kube::runtime::events::EventType;
use kube::ResourceExt;
use serde_json::json;

use super::policy::policy;
use crate::agent::context::Agent;
use crate::agent::decide::SendState;
use crate::agent::disks;
use crate::agent::report;
use crate::agent::vm_dir::{LocalState, VmDir};
use crate::migration::progress::{Progress, Stage};

/// Whether a source at `stage` is done (completed or failed).
fn ended(stage: Stage) -> bool {
    matches!(stage, Stage::Completed | Stage::Failed)
}

/// What the source VMM of `dir` says about sending migration `name`.
pub async fn send_state(dir: &VmDir, local: &LocalState, name: &str) -> SendState {
    let sent = std::fs::read_to_string(dir.file("outgoing")).unwrap_or_default();
    if sent.trim() != name {
        return if local.alive {
            SendState::NotStarted
        } else {
            SendState::NoVmm
        };
    }
    if !local.alive {
        // A source that sent the guest away exits after a grace period;
        // what it said last is in the `outgoing-result` file.
        return if dir.file("outgoing-result").exists() {
            SendState::Ended
        } else {
            SendState::NoVmm
        };
    }
    let vmm = dir.control();
    match tokio::task::spawn_blocking(move || vmm.migrate_status()).await {
        Ok(Ok(p)) if ended(p.stage) => SendState::Ended,
        Ok(Ok(_)) => SendState::Running,
        _ => SendState::NoVmm,
    }
}

/// Asks the source VMM to send the VM to the target's address; the phase
/// becomes PreCopy, or the migration fails when the VMM refuses.
pub async fn send(
    agent: &Agent,
    api: &Api<VMMigration>,
    m: &VMMigration,
    dir: &VmDir,
) -> anyhow::Result<()> {
    let vm = agent.vm_of(m);
    let policy = policy(m, vm.as_deref());
    let addr = m
        .status
        .as_ref()
        .and_then(|s| s.target_address.clone())
        .expect("decided to send only with an address");
    // Live storage migration: the disks that move with the VM, by the
    // machine the source VMM was started with.
    let copy_disks = if m.spec.storage == Some(StorageMode::Copy) {
        dir.machine()
            .map(|machine| disks::copied(&machine))
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    let request = MigrateSend {
        vm_name: Some(m.spec.vm_name.clone()),
        copy_disks,
        max_downtime_ms: Some(u64::from(
            policy
                .max_downtime_ms
                .unwrap_or(MigrationPolicy::DEFAULT_MAX_DOWNTIME_MS),
        )),
        bandwidth_mbps: policy.bandwidth_mbps.map(u64::from),
        allow_auto_converge: Some(policy.allow_auto_converge.unwrap_or(true)),
        allow_post_copy: Some(policy.allow_post_copy.unwrap_or(true)),
        timeout_s: Some(u64::from(
            policy
                .completion_timeout_seconds
                .unwrap_or(MigrationPolicy::DEFAULT_COMPLETION_TIMEOUT_SECONDS),
        )),
        // The identity as it is now (a renewed certificate is used at
        // once), as PEM text: a VMM that runs as its own user cannot read
        // the key.
        tls: match &agent.runner.tls {
            Some(files) => Some(Box::new(files.read_pem()?)),
            None => None,
        },
        ..MigrateSend::to(addr.clone())
    };
    std::fs::write(dir.file("outgoing"), m.name_any())?;
    let _ = std::fs::remove_file(dir.file("outgoing-result"));
    let vmm = dir.control();
    let sent = tokio::task::spawn_blocking(move || vmm.migrate_send(request)).await?;
    let node = &agent.cfg.node;
    match sent {
        Ok(_) => {
            report::patch(api, m, json!({"phase": MigrationPhase::PreCopy})).await?;
            agent
                .event(
                    m,
                    EventType::Normal,
                    "PreCopy",
                    "Migrate",
                    format!("Sending the VM from {node} to {addr}"),
                )
                .await;
        }
        Err(e) => {
            let _ = std::fs::remove_file(dir.file("outgoing"));
            let msg =
                format!("the source VMM refused to send: {e}; the VM keeps running on {node}");
            report::end(agent, api, m, MigrationPhase::Failed, &msg, None).await?;
        }
    }
    Ok(())
}

/// Reads the source VMM's progress (cancelling first when `cancel`) and
/// reports it; once the VMM is gone, its last word from `outgoing-result`.
pub async fn follow(
    agent: &Agent,
    api: &Api<VMMigration>,
    m: &VMMigration,
    dir: &VmDir,
    cancel: bool,
) -> anyhow::Result<()> {
    let vmm = dir.control();
    let result_file = dir.file("outgoing-result");
    let progress = tokio::task::spawn_blocking(move || -> Result<Progress, ControlError> {
        if cancel {
            vmm.migrate_cancel()?;
        }
        match vmm.migrate_status() {
            Ok(p) => {
                if ended(p.stage) {
                    let text = serde_json::to_string(&p).expect("progress serialises");
                    let _ = std::fs::write(&result_file, text);
                }
                Ok(p)
            }
            // The source left after its grace period: its last word is on file.
            Err(e) => std::fs::read_to_string(&result_file)
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
                .ok_or(e),
        }
    })
    .await??;
    report::outgoing(agent, api, m, &progress, false).await
}
