//! The operator's settings, from the command line or a test: placement,
//! migration limits, leader election timings and the DRS balancer's mode.

use crate::reservations::{self, CpuAllocationRatio};
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use godwit_crds::contract::DEFAULT_LEASE_NAMESPACE;

use crate::scheduler::{Reserve, Strategy};

/// Limits on migrations in flight (past `Pending`, not yet final).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MigrationLimits {
    /// On one node, counting it as source and as target.
    pub per_node: usize,
    /// In the whole cluster.
    pub per_cluster: usize,
}

impl Default for MigrationLimits {
    fn default() -> Self {
        MigrationLimits {
            per_node: 2,
            per_cluster: 5,
        }
    }
}

/// What the balancer does with its plan.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DrsMode {
    /// No balancing at all.
    #[default]
    Off,
    /// Recommend only (Events, the status ConfigMap).
    Manual,
    /// Recommend and create the VMMigrations.
    Automatic,
}

impl fmt::Display for DrsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DrsMode::Off => "off",
            DrsMode::Manual => "manual",
            DrsMode::Automatic => "automatic",
        })
    }
}

/// A DRS mode other than `off`, `manual` or `automatic`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown DRS mode {0:?}: use off, manual or automatic")]
pub struct UnknownDrsMode(pub String);

impl std::str::FromStr for DrsMode {
    type Err = UnknownDrsMode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "off" => Ok(DrsMode::Off),
            "manual" => Ok(DrsMode::Manual),
            "automatic" => Ok(DrsMode::Automatic),
            other => Err(UnknownDrsMode(other.to_string())),
        }
    }
}

/// The balancer's settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DrsConfig {
    /// Off, manual or automatic.
    pub mode: DrsMode,
    /// How often it looks.
    pub interval: Duration,
    /// The imbalance (standard deviation of node loads, 0..1) it tolerates.
    pub threshold: f64,
}

impl Default for DrsConfig {
    fn default() -> Self {
        DrsConfig {
            mode: DrsMode::Off,
            interval: Duration::from_secs(300),
            threshold: 0.1,
        }
    }
}

/// Everything [`crate::run`] needs besides a client.
#[derive(Clone, Debug)]
pub struct OperatorConfig {
    /// Namespace of the node Leases and of the operator's leader Lease.
    pub lease_namespace: String,
    /// Where `/metrics` and `/healthz` are served; `None` serves nothing.
    pub metrics_addr: Option<SocketAddr>,
    /// Spread VMs over nodes or pack them.
    pub placement: Strategy,
    /// Share of every node kept free for HA restarts.
    pub reserve: Reserve,
    /// Migrations in flight.
    pub migrations: MigrationLimits,
    /// This instance's identity in the leader Lease.
    pub id: String,
    /// How long the leader Lease lasts without renewal.
    pub lease_duration: Duration,
    /// How often the leader renews it (and others try to take it).
    pub renew_period: Duration,
    /// How often an object is looked at again without any change.
    pub requeue: Duration,
    /// The DRS balancer.
    pub drs: DrsConfig,
    /// vCPUs per CPU, for placement and reservation pods.
    pub cpu_allocation_ratio: CpuAllocationRatio,
    /// The image of reservation pods (a pause container).
    pub reservation_image: String,
    /// Finished VMMigrations kept per VM; older ones are deleted.
    pub finished_migrations_kept: usize,
    /// The migration CA's Secret, made when missing
    /// ([`crate::migration_ca`]); `None`: not managed here.
    pub migration_ca: Option<crate::migration_ca::CaSecret>,
    /// The user whose migration certificate requests are approved (the
    /// node daemons' service account; [`crate::signer`]).
    pub node_user: String,
    /// Days a node's migration certificate is valid.
    pub node_certificate_days: u32,
    /// The aggregated console API ([`crate::console_api`]); `None` serves
    /// none.
    pub console_api: Option<crate::console_api::ApiConfig>,
}

/// Finished VMMigrations kept per VM by default (as KubeVirt keeps 5).
pub const DEFAULT_FINISHED_MIGRATIONS_KEPT: usize = 5;

impl Default for OperatorConfig {
    fn default() -> Self {
        OperatorConfig {
            lease_namespace: DEFAULT_LEASE_NAMESPACE.to_string(),
            metrics_addr: None,
            placement: Strategy::Spread,
            reserve: Reserve::default(),
            migrations: MigrationLimits::default(),
            id: default_id(),
            lease_duration: Duration::from_secs(15),
            renew_period: Duration::from_secs(5),
            requeue: Duration::from_secs(5),
            drs: DrsConfig::default(),
            cpu_allocation_ratio: CpuAllocationRatio::default(),
            reservation_image: reservations::DEFAULT_IMAGE.to_string(),
            finished_migrations_kept: DEFAULT_FINISHED_MIGRATIONS_KEPT,
            migration_ca: None,
            node_user: default_node_user(DEFAULT_LEASE_NAMESPACE),
            node_certificate_days: crate::signer::DEFAULT_VALIDITY_DAYS,
            console_api: None,
        }
    }
}

/// The node daemons' service account in the operator's `namespace` (the
/// chart's `serviceAccount.nodeDaemon` default).
pub fn default_node_user(namespace: &str) -> String {
    format!("system:serviceaccount:{namespace}:godwit-node")
}

/// `<hostname>-<pid>`: unique per process, readable in `kubectl get lease`.
pub fn default_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "godwit-operator".to_string());
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse() {
        assert_eq!("automatic".parse::<DrsMode>(), Ok(DrsMode::Automatic));
        assert_eq!("manual".parse::<DrsMode>(), Ok(DrsMode::Manual));
        assert!("sometimes"
            .parse::<DrsMode>()
            .unwrap_err()
            .to_string()
            .contains("off, manual or automatic"));
    }
}
