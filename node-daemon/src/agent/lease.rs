//! The node's Lease and self-fencing.
//!
//! The agent renews the Lease `godwit-node-<node>` every [`renew_period`].
//! When the Lease cannot be renewed for its whole duration the operator may
//! already restart the node's VMs elsewhere (HA), so the agent stops them all
//! ([`watch_fence`]) and starts nothing until it renews again; then it exits
//! with [`RESTART_AFTER_FENCE`] to rebuild its view from fresh lists.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use godwit_crds::contract;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::Client;
use serde_json::json;

use super::config::AgentConfig;
use super::metrics;
use super::vm_dir::VmDir;
use super::vmm_process;

/// The agent's exit status when it restarts itself after fencing.
pub const RESTART_AFTER_FENCE: i32 = 75;

/// When the Lease was last renewed, and whether the node is fenced.
#[derive(Debug)]
pub struct LeaseHealth {
    renewed: Mutex<Instant>,
    fenced: Mutex<bool>,
}

/// Renewed just now, not fenced.
impl Default for LeaseHealth {
    fn default() -> LeaseHealth {
        LeaseHealth {
            renewed: Mutex::new(Instant::now()),
            fenced: Mutex::new(false),
        }
    }
}

impl LeaseHealth {
    /// Whether the node is fenced: it stopped its VMs and decides nothing.
    pub fn fenced(&self) -> bool {
        *self.fenced.lock().unwrap()
    }
}

/// How often the agent renews a Lease of `lease_seconds`: an eighth of it
/// (1 s for the default 8 s), so a node cut off just after a renewal is
/// declared lost at most one period later than one cut just before.
pub fn renew_period(lease_seconds: i32) -> Duration {
    (Duration::from_secs(lease_seconds.max(1) as u64) / 8).max(Duration::from_millis(250))
}

/// Renews the node's Lease every [`renew_period`]; a renewal after fencing
/// restarts the agent.
pub async fn renew(client: Client, cfg: AgentConfig, health: Arc<LeaseHealth>) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.lease_namespace);
    let name = contract::node_lease_name(&cfg.node);
    let every = renew_period(cfg.lease_seconds);
    loop {
        // The Lease says renewed at about `sent` (renew_once stamps it next);
        // the fence deadline counts from there, never from a late answer.
        let sent = Instant::now();
        // A renewal that hangs (a dead link) counts as failed after a period.
        let renewed = tokio::time::timeout(every, renew_once(&api, &name, &cfg))
            .await
            .unwrap_or_else(|_| Err(kube::Error::Service("Lease renewal timed out".into())));
        match renewed {
            Ok(()) => {
                *health.renewed.lock().unwrap() = sent;
                if health.fenced() {
                    // While cut off, the watches may have missed changes (and
                    // a half-dead connection can stay stale for a long time):
                    // start afresh, from new lists, as a restarted agent does.
                    // The VMMs are not ours to lose; the DaemonSet (or the
                    // local cluster) starts the agent again.
                    tracing::warn!("Lease renewed again after fencing; restarting the agent to rebuild its view");
                    std::process::exit(RESTART_AFTER_FENCE);
                }
            }
            Err(e) => {
                let since = health.renewed.lock().unwrap().elapsed();
                tracing::warn!(error = %e, "cannot renew Lease {name} (last renewed {since:?} ago)");
            }
        }
        // The next attempt one period after this one started, however long
        // this one took.
        tokio::time::sleep(every.saturating_sub(sent.elapsed())).await;
    }
}

/// Fences the node one second before its Lease would expire unrenewed, so
/// that by the time the operator sees the Lease expired (and restarts the
/// node's VMs elsewhere) none of them runs here any more.
pub async fn watch_fence(cfg: AgentConfig, health: Arc<LeaseHealth>) {
    let lease = Duration::from_secs(cfg.lease_seconds.max(2) as u64);
    let deadline = lease - Duration::from_secs(1);
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let since = health.renewed.lock().unwrap().elapsed();
        if since >= deadline {
            fence(&cfg, &health).await;
        }
    }
}

async fn renew_once(api: &Api<Lease>, name: &str, cfg: &AgentConfig) -> Result<(), kube::Error> {
    let now = MicroTime(Timestamp::now());
    match api.get_opt(name).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.into()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(cfg.node.clone()),
                    lease_duration_seconds: Some(cfg.lease_seconds),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    ..Default::default()
                }),
            };
            api.create(&PostParams::default(), &lease).await.map(|_| ())
        }
        Some(_) => {
            let patch = json!({"spec": {
                "holderIdentity": cfg.node,
                "leaseDurationSeconds": cfg.lease_seconds,
                "renewTime": now,
            }});
            api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map(|_| ())
        }
    }
}

/// Stops every VMM on the node: it can no longer prove it owns them.
async fn fence(cfg: &AgentConfig, health: &LeaseHealth) {
    {
        let mut fenced = health.fenced.lock().unwrap();
        if *fenced {
            return;
        }
        *fenced = true;
    }
    tracing::error!("Lease expired: fencing this node (stopping every VM)");
    metrics::global().fenced();
    let dirs = VmDir::scan(&cfg.state_dir, &cfg.shared_dir);
    // All at once, with a short grace: the operator restarts them elsewhere
    // soon after the Lease expires.
    let stops: Vec<_> = dirs
        .into_iter()
        .filter(|d| d.state().alive)
        .map(|dir| {
            tokio::task::spawn_blocking(move || vmm_process::stop(&dir, Duration::from_millis(300)))
        })
        .collect();
    for s in stops {
        let _ = s.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lease_is_renewed_every_eighth_of_it_but_not_too_often() {
        assert_eq!(renew_period(8), Duration::from_secs(1));
        assert_eq!(renew_period(20), Duration::from_millis(2500));
        assert_eq!(renew_period(1), Duration::from_millis(250));
        assert_eq!(renew_period(0), Duration::from_millis(250));
    }
}
