//! `/metrics` (OpenMetrics text, through the prometheus-client crate) and
//! `/healthz`, served by a tiny HTTP/1.0 responder: one request per
//! connection, no keep-alive.
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `godwit_operator_reconciles_total` | counter | `controller` (`vm`, `migration`), `result` (`ok`, `error`) |
//! | `godwit_operator_reconcile_duration_seconds` | histogram | `controller` |
//! | `godwit_vms` | gauge | `phase` (from the VM controller's cache) |
//! | `godwit_vmmigrations` | gauge | `phase` (from the migration controller's cache) |
//! | `godwit_migrations_total` | counter | `result` (`Succeeded`, `Failed`, `Cancelled`), counted when the operator settles a migration |
//! | `godwit_failovers_total` | counter | VMs failed over from a lost node (HA) |
//! | `godwit_operator_leader` | gauge | 1 while this instance leads |
//!
//! Bytes, downtime and duration of each migration are recorded by the
//! source node daemon, which measures them (`godwit-node --metrics-addr`).

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use godwit_crds::{MigrationPhase, VMMigration, VirtualMachine, VmPhase};
use kube::runtime::reflector::Store;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::debug;

use crate::view::{migration_phase, vm_phase};

const VM_PHASES: [VmPhase; 9] = [
    VmPhase::Pending,
    VmPhase::Scheduled,
    VmPhase::Provisioning,
    VmPhase::Starting,
    VmPhase::Running,
    VmPhase::Migrating,
    VmPhase::Stopping,
    VmPhase::Stopped,
    VmPhase::Failed,
];

const MIGRATION_PHASES: [MigrationPhase; 10] = [
    MigrationPhase::Pending,
    MigrationPhase::Scheduling,
    MigrationPhase::PreparingTarget,
    MigrationPhase::PreCopy,
    MigrationPhase::StopAndCopy,
    MigrationPhase::PostCopy,
    MigrationPhase::Committing,
    MigrationPhase::Succeeded,
    MigrationPhase::Failed,
    MigrationPhase::Cancelled,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReconcileLabels {
    controller: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ControllerLabel {
    controller: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: String,
}

type DurationFamily = Family<ControllerLabel, Histogram, fn() -> Histogram>;

fn reconcile_histogram() -> Histogram {
    // 1 ms .. ~16 s
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// The operator's metrics.
pub struct Metrics {
    registry: Registry,
    reconciles: Family<ReconcileLabels, Counter>,
    reconcile_seconds: DurationFamily,
    vms_by_phase: Family<PhaseLabel, Gauge>,
    migrations_by_phase: Family<PhaseLabel, Gauge>,
    migrations_total: Family<ResultLabel, Counter>,
    failovers: Counter,
    leader: Gauge<i64, std::sync::atomic::AtomicI64>,
    vms: Mutex<Option<Store<VirtualMachine>>>,
    migrations: Mutex<Option<Store<VMMigration>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let reconciles = Family::<ReconcileLabels, Counter>::default();
        let reconcile_seconds: DurationFamily = Family::new_with_constructor(reconcile_histogram);
        let vms_by_phase = Family::<PhaseLabel, Gauge>::default();
        let migrations_by_phase = Family::<PhaseLabel, Gauge>::default();
        let migrations_total = Family::<ResultLabel, Counter>::default();
        let failovers = Counter::<u64, AtomicU64>::default();
        let leader = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
        registry.register(
            "godwit_operator_reconciles",
            "Reconciles by controller and result",
            reconciles.clone(),
        );
        registry.register(
            "godwit_operator_reconcile_duration_seconds",
            "Time one reconcile takes, by controller",
            reconcile_seconds.clone(),
        );
        registry.register(
            "godwit_vms",
            "VirtualMachines by phase",
            vms_by_phase.clone(),
        );
        registry.register(
            "godwit_vmmigrations",
            "VMMigrations by phase",
            migrations_by_phase.clone(),
        );
        registry.register(
            "godwit_migrations",
            "Migrations ended, by result",
            migrations_total.clone(),
        );
        registry.register(
            "godwit_failovers",
            "VMs failed over from a lost node",
            failovers.clone(),
        );
        registry.register(
            "godwit_operator_leader",
            "1 while this instance leads",
            leader.clone(),
        );
        for result in ["Succeeded", "Failed", "Cancelled"] {
            let _ = migrations_total.get_or_create_owned(&ResultLabel {
                result: result.into(),
            });
        }
        Metrics {
            registry,
            reconciles,
            reconcile_seconds,
            vms_by_phase,
            migrations_by_phase,
            migrations_total,
            failovers,
            leader,
            vms: Mutex::new(None),
            migrations: Mutex::new(None),
        }
    }
}

impl Metrics {
    /// Counts one reconcile of `controller` that ended `ok` or not.
    pub fn reconciled(&self, controller: &'static str, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.reconciles
            .get_or_create(&ReconcileLabels {
                controller: controller.into(),
                result: result.into(),
            })
            .inc();
    }

    /// Records how long one reconcile of `controller` took.
    pub fn reconcile_took(&self, controller: &'static str, took: Duration) {
        self.reconcile_seconds
            .get_or_create(&ControllerLabel {
                controller: controller.into(),
            })
            .observe(took.as_secs_f64());
    }

    /// Counts a migration that ended in `phase`.
    pub fn migration_ended(&self, phase: MigrationPhase) {
        self.migrations_total
            .get_or_create(&ResultLabel {
                result: format!("{phase:?}"),
            })
            .inc();
    }

    /// Counts a VM failed over from a lost node.
    pub fn failed_over(&self) {
        self.failovers.inc();
    }

    /// Whether this instance leads.
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    /// The VM controller's cache, for `godwit_vms`.
    pub fn watch_vms(&self, store: Store<VirtualMachine>) {
        *self.vms.lock().expect("metrics poisoned") = Some(store);
    }

    /// The migration controller's cache, for `godwit_vmmigrations`.
    pub fn watch_migrations(&self, store: Store<VMMigration>) {
        *self.migrations.lock().expect("metrics poisoned") = Some(store);
    }

    /// The metrics in the OpenMetrics text format.
    pub fn render(&self) -> String {
        // Counted first, then set: two scrapes at once both see whole counts.
        let mut vms: std::collections::BTreeMap<String, i64> =
            VM_PHASES.iter().map(|p| (format!("{p:?}"), 0)).collect();
        if let Some(store) = self.vms.lock().expect("metrics poisoned").as_ref() {
            for vm in store.state() {
                *vms.entry(format!("{:?}", vm_phase(&vm))).or_default() += 1;
            }
        }
        for (phase, n) in vms {
            self.vms_by_phase
                .get_or_create(&PhaseLabel { phase })
                .set(n);
        }
        let mut migrations: std::collections::BTreeMap<String, i64> = MIGRATION_PHASES
            .iter()
            .map(|p| (format!("{p:?}"), 0))
            .collect();
        if let Some(store) = self.migrations.lock().expect("metrics poisoned").as_ref() {
            for m in store.state() {
                *migrations
                    .entry(format!("{:?}", migration_phase(&m)))
                    .or_default() += 1;
            }
        }
        for (phase, n) in migrations {
            self.migrations_by_phase
                .get_or_create(&PhaseLabel { phase })
                .set(n);
        }
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Serves `/metrics` and `/healthz` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let metrics = metrics.clone();
                tokio::spawn(async move {
                    if let Err(e) = respond(stream, &metrics).await {
                        debug!("metrics connection: {e}");
                    }
                });
            }
            Err(e) => {
                debug!("metrics accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn respond(mut stream: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    // Read the request head (bounded); only its first line matters.
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head);
    let mut words = head.lines().next().unwrap_or("").split_whitespace();
    let method = words.next().unwrap_or("");
    let path = words.next().unwrap_or("").split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.render(),
        ),
        ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".to_string()),
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_string(),
        ),
    };
    let response = format!(
        "HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_metrics_and_health() {
        let metrics = Arc::new(Metrics::default());
        metrics.reconciled("vm", true);
        metrics.reconciled("vm", true);
        metrics.reconciled("migration", false);
        metrics.migration_ended(MigrationPhase::Succeeded);
        metrics.set_leader(true);
        metrics.failed_over();
        metrics.reconcile_took("vm", Duration::from_millis(3));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, metrics));

        let text = get(addr, "/metrics").await;
        assert!(text.starts_with("HTTP/1.0 200 OK"), "{text}");
        for line in [
            "godwit_operator_reconciles_total{controller=\"vm\",result=\"ok\"} 2",
            "godwit_operator_reconciles_total{controller=\"migration\",result=\"error\"} 1",
            "godwit_vms{phase=\"Running\"} 0",
            "godwit_vmmigrations{phase=\"PreCopy\"} 0",
            "godwit_failovers_total 1",
            "godwit_operator_reconcile_duration_seconds_count{controller=\"vm\"} 1",
            "godwit_migrations_total{result=\"Succeeded\"} 1",
            "godwit_migrations_total{result=\"Cancelled\"} 0",
            "godwit_operator_leader 1",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(get(addr, "/healthz").await.ends_with("\r\n\r\nok\n"));
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.0 404"));
        server.abort();
    }
}
