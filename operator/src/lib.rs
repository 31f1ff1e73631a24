//! The Godwit operator: the control plane that places VMs on nodes, provisions
//! them from templates, orchestrates migrations, restarts VMs of lost nodes and
//! balances load. Decisions are pure functions over plain data ([`scheduler`],
//! [`vm_controller::decide::next_vm_step`],
//! [`migration_controller::decide::next_migration_step`]); the controllers
//! only read, decide and write.
//!
//! - [`vm_controller`]: scheduling, the resolved machine, restarts by
//!   `runStrategy`;
//! - [`migration_controller`]: admission, target choice, concurrency limits,
//!   timeouts, cancellation, moving the VM when a migration ends;
//! - [`drs`]: balances measured load with live migrations;
//! - [`maintenance`]: empties nodes in maintenance by live migration;
//! - [`signer`]: approves and signs the nodes' migration certificate
//!   requests with the CA only the operator reads ([`migration_ca`]);
//! - [`leader`]: only one operator instance decides at a time;
//! - [`metrics`]: `/metrics` and `/healthz`.
//!
//! The VM and migration controllers are folders: `mod.rs` (watches, error
//! policy, the reconcile that reads, decides and writes), `decide.rs` (pure
//! decisions and their tests), `apply.rs` (the writes). Dependencies point
//! down only: what several modules share lives in modules they all import,
//! never in a sibling controller: [`view`] and [`scheduler`] (the cluster as
//! plain data, placement), [`config`], [`context`], [`conditions`],
//! [`restarts`] (the crash-loop backoff) and [`errors`] (cause chains).
//!
//! Start it in-process with [`run`] (leader election, metrics, controllers)
//! or, under a leadership of your own, [`run_controllers`].

pub mod conditions;
pub mod config;
pub mod console_api;
pub mod context;
pub mod drs;
pub mod errors;
pub mod ha;
pub mod leader;
pub mod machine;
pub mod maintenance;
pub mod metrics;
pub mod migration_ca;
pub mod migration_controller;
pub mod nodes;
pub mod reservations;
pub mod restarts;
pub mod scheduler;
pub mod signer;
pub mod template;
pub mod template_status;
pub mod view;
pub mod vm_controller;

use std::future::Future;
use std::sync::Arc;

use kube::Client;
use tokio::net::TcpListener;
use tracing::info;

pub use config::{MigrationLimits, OperatorConfig};
pub use context::Context;
pub use metrics::Metrics;

/// Why the operator stopped.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    /// The metrics address could not be bound.
    #[error("Cannot listen on the metrics address {0}")]
    MetricsBind(std::net::SocketAddr, #[source] std::io::Error),
    /// Leadership was lost; the process must restart as a follower.
    #[error("Leadership lost")]
    Leadership(#[source] leader::LeaderError),
}

/// Runs the operator: serves metrics (if configured), waits to lead, then
/// runs both controllers until leadership is lost (an error: exit non-zero).
pub async fn run(client: Client, config: OperatorConfig) -> Result<(), OperatorError> {
    run_until(client, config, std::future::pending()).await
}

/// [`run`] until `shutdown` completes, then gives the leader Lease up.
pub async fn run_until(
    client: Client,
    config: OperatorConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), OperatorError> {
    let metrics = Arc::new(Metrics::default());
    let _server = match config.metrics_addr {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| OperatorError::MetricsBind(addr, e))?;
            info!(%addr, "serving /metrics and /healthz");
            let auth = Arc::new(godwit_auth::Delegated::new(client.clone()));
            let shown = metrics.clone();
            let render: godwit_auth::Render = Arc::new(move || shown.render());
            Some(AbortOnDrop(tokio::spawn(godwit_auth::serve_metrics(
                listener, auth, render,
            ))))
        }
        None => None,
    };
    // Every replica serves the console API, leader or not.
    let _console_api = config
        .console_api
        .clone()
        .map(|api| AbortOnDrop(tokio::spawn(console_api::run(client.clone(), api))));
    let elector = leader::Elector::new(client.clone(), &config);
    tokio::pin!(shutdown);
    tokio::select! {
        () = elector.acquire() => {}
        () = &mut shutdown => return Ok(()),
    }
    metrics.set_leader(true);
    let result = tokio::select! {
        lost = elector.hold() => Err(OperatorError::Leadership(lost)),
        () = run_controllers(client, config, metrics.clone()) => Ok(()),
        () = &mut shutdown => {
            elector.release().await;
            Ok(())
        }
    };
    metrics.set_leader(false);
    result
}

/// Runs the VM and migration controllers (no leader election) until their
/// watches end.
pub async fn run_controllers(client: Client, config: OperatorConfig, metrics: Arc<Metrics>) {
    info!(
        placement = %config.placement,
        reserve_percent = config.reserve.percent,
        per_node = config.migrations.per_node,
        per_cluster = config.migrations.per_cluster,
        "controllers starting"
    );
    if let Some(ca) = config.migration_ca.clone() {
        tokio::spawn(migration_ca::keep_ensured(client.clone(), ca.clone()));
        let signer = signer::SignerConfig {
            ca,
            node_user: config.node_user.clone(),
            validity_days: config.node_certificate_days,
        };
        tokio::spawn(signer::run(client.clone(), signer));
    }
    let ctx = Arc::new(Context::new(client, config, metrics));
    tokio::join!(
        vm_controller::run(ctx.clone()),
        migration_controller::run(ctx.clone()),
        ha::run(ctx.clone()),
        maintenance::run(ctx.clone()),
        template_status::run(ctx.clone()),
        drs::run(ctx)
    );
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod fixtures;
