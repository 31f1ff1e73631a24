//! A migration's status as this node writes it: the phase (walking the
//! documented path), the progress figures at most every
//! [`PROGRESS_PERIOD`], the end (result or failure reason), and the Events
//! that go with them. The engine's figures become the CRD's status types
//! through the `From` conversions of [`godwit_vmm_control::status`].

use std::time::{Duration, Instant};

use godwit_crds::contract;
use godwit_crds::{MigrationPhase, MigrationProgress, MigrationResult, VMMigration};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use serde_json::{json, Value};

use super::context::{now_time, Agent};
use super::decide::next_phase;
use super::metrics;
use crate::migration::progress::Progress;

/// How often a running migration's progress is written into its status (it
/// is also written whenever the phase moves). Fast enough for a progress bar
/// on a migration of a few seconds, slow enough not to load the API server.
pub const PROGRESS_PERIOD: Duration = Duration::from_millis(500);

/// Writes what an outgoing migration's `progress` (from the source VMM, or
/// from this agent's cold send) says into its status: the phase (walking
/// the documented path), the figures, and the end.
pub async fn outgoing(
    agent: &Agent,
    api: &Api<VMMigration>,
    m: &VMMigration,
    progress: &Progress,
    cold: bool,
) -> anyhow::Result<()> {
    if already_ended(agent, m) {
        return Ok(());
    }
    let node = &agent.cfg.node;
    let stays = if cold {
        format!("the VM stays stopped on {node} with its disks")
    } else if progress.guest_lost {
        "the guest may have run on the target and is lost; it is restarted as its runStrategy says"
            .to_string()
    } else {
        format!("the VM keeps running on {node}")
    };
    let status = m.status.clone().unwrap_or_default();
    let wanted = MigrationPhase::from(progress.stage);
    if wanted == MigrationPhase::Failed {
        let error = progress.error.as_deref().unwrap_or("unknown error");
        let cancelled = m.meta().deletion_timestamp.is_some()
            || m.annotations()
                .get(contract::CANCEL_ANNOTATION)
                .map(String::as_str)
                == Some("true");
        let (phase, msg) = if cancelled {
            (
                MigrationPhase::Cancelled,
                format!("cancelled ({error}); {stays}"),
            )
        } else {
            (MigrationPhase::Failed, format!("{error}; {stays}"))
        };
        return end(agent, api, m, phase, &msg, None).await;
    }
    let p = MigrationProgress::from(progress);
    if wanted == MigrationPhase::Succeeded {
        // Walk the documented phases so a watcher sees each of them.
        let mut at = status.phase;
        while next_phase(at, wanted) != wanted {
            at = next_phase(at, wanted);
            patch(api, m, json!({"phase": at, "progress": p})).await?;
        }
        let result = progress
            .result
            .as_ref()
            .map(MigrationResult::from)
            .unwrap_or_default();
        let note = format!(
            "Moved to {} in {} ms, downtime {} ms, {} bytes in {} rounds ({:?})",
            status.target_node.as_deref().unwrap_or("?"),
            result.total_time_ms,
            result.downtime_ms,
            result.transferred_bytes,
            result.rounds,
            result.mode_used
        );
        return end(
            agent,
            api,
            m,
            MigrationPhase::Succeeded,
            &note,
            Some((p, result)),
        )
        .await;
    }
    // Progress at most twice a second, and whenever the phase moves.
    let key = format!("{}/{}", m.namespace().unwrap_or_default(), m.name_any());
    let lost = progress.reconnecting;
    let was_lost = if lost {
        !agent.reconnecting.lock().unwrap().insert(key.clone())
    } else {
        agent.reconnecting.lock().unwrap().remove(&key)
    };
    if lost != was_lost {
        let (kind, reason, note) = if lost {
            (
                EventType::Warning,
                "LinkLost",
                "The migration link was lost in post-copy; the guest runs on the target and its vCPUs that need pages still here wait; the source dials the target again (up to 60 s by default)",
            )
        } else {
            (
                EventType::Normal,
                "LinkRestored",
                "The migration link is back; post-copy carries on",
            )
        };
        agent
            .event(m, kind, reason, "Migrate", note.to_string())
            .await;
    }
    let phase = next_phase(status.phase, wanted);
    let due = agent
        .reported
        .lock()
        .unwrap()
        .get(&key)
        .is_none_or(|t| t.elapsed() >= PROGRESS_PERIOD);
    if due || phase != status.phase {
        patch(api, m, json!({"phase": phase, "progress": p})).await?;
        agent.reported.lock().unwrap().insert(key, Instant::now());
        if phase != status.phase {
            agent
                .event(
                    m,
                    EventType::Normal,
                    &format!("{phase:?}"),
                    "Migrate",
                    format!(
                        "{phase:?}: round {}, {} bytes left",
                        p.round, p.memory_remaining_bytes
                    ),
                )
                .await;
        }
    }
    Ok(())
}

/// Whether this agent already ended `m`, which its store still shows
/// unfinished.
fn already_ended(agent: &Agent, m: &VMMigration) -> bool {
    m.uid()
        .is_some_and(|uid| agent.ended.lock().unwrap().contains(&uid))
}

/// Merges `status` into migration `m`'s status.
pub async fn patch(api: &Api<VMMigration>, m: &VMMigration, status: Value) -> anyhow::Result<()> {
    api.patch_status(
        &m.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&json!({ "status": status })),
    )
    .await?;
    Ok(())
}

/// Ends migration `m` in `phase`: with its figures when it is `done`, else
/// with `message` as the failure reason; counts it in the metrics and
/// publishes an Event.
pub async fn end(
    agent: &Agent,
    api: &Api<VMMigration>,
    m: &VMMigration,
    phase: MigrationPhase,
    message: &str,
    done: Option<(MigrationProgress, MigrationResult)>,
) -> anyhow::Result<()> {
    if already_ended(agent, m) {
        return Ok(());
    }
    let started = m.status.as_ref().and_then(|s| s.start_time.as_ref());
    let elapsed =
        started.and_then(|t| Duration::try_from(Timestamp::now().duration_since(t.0)).ok());
    metrics::global().migration_ended(phase, done.as_ref().map(|d| &d.1), elapsed);
    let mut status = json!({
        "phase": phase,
        "endTime": now_time(),
    });
    match done {
        Some((progress, result)) => {
            status["progress"] = serde_json::to_value(progress)?;
            status["result"] = serde_json::to_value(result)?;
        }
        None => status["failureReason"] = json!(message),
    }
    patch(api, m, status).await?;
    agent
        .ended
        .lock()
        .unwrap()
        .insert(m.uid().unwrap_or_default());
    let kind = if phase == MigrationPhase::Succeeded {
        EventType::Normal
    } else {
        EventType::Warning
    };
    agent
        .event(
            m,
            kind,
            &format!("{phase:?}"),
            "Migrate",
            message.to_string(),
        )
        .await;
    Ok(())
}
