//! Leader election on the Lease [`OPERATOR_LEASE`] in the lease namespace:
//! only the holder runs the controllers, so two operators never decide at
//! once.
//!
//! The holder renews the Lease every `renew_period`; any other instance takes
//! it over once `renewTime + leaseDurationSeconds` has passed. Every write
//! carries the resourceVersion it read, so of two contenders only one wins.
//! A leader that sees another holder, or cannot renew for a whole lease
//! duration, has lost: [`Elector::hold`] returns and the process exits
//! non-zero (its Deployment restarts it as a follower) rather than risk a
//! second leader.
//!
//! Not `kube-lease-manager` (0.13, on kube 5): a leader of the crate that
//! cannot reach the API server keeps reporting that it leads past its
//! Lease's expiry, while a follower may already lead; `tests/leader_crate.rs`
//! shows both behaviours side by side.

use std::time::{Duration, Instant};

use godwit_crds::contract::OPERATOR_LEASE;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::Client;
use tracing::{error, info, warn};

use crate::config::OperatorConfig;
use crate::nodes::lease_expiry;

/// Why leadership failed or was lost.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// The lease namespace does not exist.
    #[error(
        "Namespace {0:?} does not exist: create it (the Helm chart does) or pass --lease-namespace"
    )]
    NamespaceMissing(String),
    /// Reading or writing the Lease failed.
    #[error("Cannot read or write Lease {OPERATOR_LEASE}")]
    Api(#[source] kube::Error),
    /// Another instance holds the Lease now.
    #[error("Lost the leader Lease to {0:?}")]
    Lost(String),
    /// The Lease could not be renewed for a whole lease duration.
    #[error("Could not renew the leader Lease for {0:?}")]
    RenewTimedOut(Duration, #[source] Box<LeaderError>),
}

/// What to do with the Lease as found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// There is none: create it.
    Create,
    /// We hold it: renew it.
    Renew,
    /// Its holder let it expire (or released it): take it.
    TakeOver,
    /// Someone else holds it.
    Wait {
        /// The holder.
        holder: String,
    },
}

/// What `me` should do with `current` at `now`.
pub fn claim(current: Option<&Lease>, me: &str, now: Timestamp) -> Claim {
    let Some(lease) = current else {
        return Claim::Create;
    };
    let holder = lease
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.clone())
        .unwrap_or_default();
    if holder == me {
        return Claim::Renew;
    }
    if holder.is_empty() || lease_expiry(lease).is_none_or(|t| t <= now) {
        return Claim::TakeOver;
    }
    Claim::Wait { holder }
}

/// Contends for and holds the leader Lease.
pub struct Elector {
    api: Api<Lease>,
    namespace: String,
    id: String,
    duration: Duration,
    renew_period: Duration,
}

impl Elector {
    /// An elector for `config.id` on the Lease in `config.lease_namespace`.
    pub fn new(client: Client, config: &OperatorConfig) -> Elector {
        Elector {
            api: Api::namespaced(client, &config.lease_namespace),
            namespace: config.lease_namespace.clone(),
            id: config.id.clone(),
            duration: config.lease_duration,
            renew_period: config.renew_period,
        }
    }

    fn spec(&self, now: Timestamp, acquired: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.id.clone()),
            lease_duration_seconds: Some(self.duration.as_secs().max(1) as i32),
            acquire_time: Some(acquired.unwrap_or(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// One round: creates, renews or takes over the Lease if it may.
    /// `Ok(true)` while this instance leads.
    pub async fn try_lead(&self) -> Result<bool, LeaderError> {
        let current = self
            .api
            .get_opt(OPERATOR_LEASE)
            .await
            .map_err(LeaderError::Api)?;
        let now = Timestamp::now();
        let next = match claim(current.as_ref(), &self.id, now) {
            Claim::Wait { .. } => return Ok(false),
            Claim::Create => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(OPERATOR_LEASE.into()),
                        ..Default::default()
                    },
                    spec: Some(self.spec(now, None, 0)),
                };
                return match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                    Err(kube::Error::Api(s)) if s.code == 404 => {
                        Err(LeaderError::NamespaceMissing(self.namespace.clone()))
                    }
                    Err(e) => Err(LeaderError::Api(e)),
                };
            }
            Claim::Renew => {
                let mut lease = current.expect("renewing an existing lease");
                let old = lease.spec.clone().unwrap_or_default();
                lease.spec =
                    Some(self.spec(now, old.acquire_time, old.lease_transitions.unwrap_or(0)));
                lease
            }
            Claim::TakeOver => {
                let mut lease = current.expect("taking over an existing lease");
                let old = lease.spec.clone().unwrap_or_default();
                lease.spec = Some(self.spec(now, None, old.lease_transitions.unwrap_or(0) + 1));
                lease
            }
        };
        match self
            .api
            .replace(OPERATOR_LEASE, &PostParams::default(), &next)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(LeaderError::Api(e)),
        }
    }

    /// Waits until this instance leads.
    pub async fn acquire(&self) {
        let mut announced = false;
        loop {
            match self.try_lead().await {
                Ok(true) => {
                    info!(id = %self.id, "leading");
                    return;
                }
                Ok(false) if !announced => {
                    info!(id = %self.id, "another instance leads; standing by");
                    announced = true;
                }
                Ok(false) => {}
                Err(e @ LeaderError::NamespaceMissing(_)) => error!("{e}"),
                Err(e) => warn!("leader election: {e}"),
            }
            tokio::time::sleep(self.renew_period).await;
        }
    }

    /// Renews the Lease until leadership is lost; returns why.
    pub async fn hold(&self) -> LeaderError {
        let mut renewed = Instant::now();
        loop {
            tokio::time::sleep(self.renew_period).await;
            match self.try_lead().await {
                Ok(true) => renewed = Instant::now(),
                Ok(false) => {
                    let holder = self
                        .api
                        .get_opt(OPERATOR_LEASE)
                        .await
                        .ok()
                        .flatten()
                        .and_then(|l| l.spec)
                        .and_then(|s| s.holder_identity)
                        .unwrap_or_default();
                    return LeaderError::Lost(holder);
                }
                Err(e) if renewed.elapsed() >= self.duration => {
                    return LeaderError::RenewTimedOut(self.duration, Box::new(e));
                }
                Err(e) => warn!("cannot renew the leader Lease, retrying: {e}"),
            }
        }
    }

    /// Gives the Lease up (on shutdown) so a follower takes over at once.
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(OPERATOR_LEASE).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.id.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        match self
            .api
            .replace(OPERATOR_LEASE, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => info!(id = %self.id, "leader Lease released"),
            Err(e) => warn!("cannot release the leader Lease: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{at, lease, t0};

    #[test]
    fn claims() {
        let t = t0();
        assert_eq!(claim(None, "a", t), Claim::Create);
        assert_eq!(claim(Some(&lease("a", t, 15)), "a", at(60)), Claim::Renew);
        assert_eq!(
            claim(Some(&lease("b", t, 15)), "a", at(14)),
            Claim::Wait { holder: "b".into() }
        );
        assert_eq!(
            claim(Some(&lease("b", t, 15)), "a", at(15)),
            Claim::TakeOver
        );
        assert_eq!(
            claim(Some(&lease("", t, 15)), "a", t),
            Claim::TakeOver,
            "released"
        );
    }
}
