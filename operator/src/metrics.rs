//! The operator's metrics (OpenMetrics text, through the prometheus-client
//! crate), served on `--metrics-addr` by [`godwit_auth::serve_metrics`]:
//! `/metrics` to users whom RBAC allows `get` on it, `/healthz` to anyone.
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `godwit_operator_reconciles_total` | counter | `controller` (`vm`, `migration`), `result` (`ok`, `error`) |
//! | `godwit_operator_reconcile_duration_seconds` | histogram | `controller` |
//! | `godwit_vms` | gauge | `phase` (from the VM controller's cache) |
//! | `godwit_vmmigrations` | gauge | `phase` (from the migration controller's cache) |
//! | `godwit_migrations_total` | counter | `result` (`Succeeded`, `Failed`, `Cancelled`), counted when the operator settles a migration |
//! | `godwit_failovers_total` | counter | VMs failed over from a lost node (HA) |
//! | `godwit_vm_restarts_total` | counter | `namespace`, `name`: restarts of a VM that stopped or failed (those the crash-loop backoff counts) |
//! | `godwit_operator_leader` | gauge | 1 while this instance leads |
//!
//! Bytes, downtime and duration of each migration are recorded by the
//! source node daemon, which measures them (`godwit-node --metrics-addr`).

use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::Duration;

use godwit_crds::{MigrationPhase, VMMigration, VirtualMachine, VmPhase};
use kube::runtime::reflector::Store;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

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
struct VmLabels {
    namespace: String,
    name: String,
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
    vm_restarts: Family<VmLabels, Counter>,
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
        let vm_restarts = Family::<VmLabels, Counter>::default();
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
            "godwit_vm_restarts",
            "Restarts of a VM that stopped or failed, by VM",
            vm_restarts.clone(),
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
            vm_restarts,
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

    /// Counts a restart of the VM `namespace/name` after it stopped or
    /// failed (the restarts the crash-loop backoff counts).
    pub fn vm_restarted(&self, namespace: &str, name: &str) {
        self.vm_restarts
            .get_or_create(&VmLabels {
                namespace: namespace.into(),
                name: name.into(),
            })
            .inc();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_metric() {
        let metrics = Metrics::default();
        metrics.reconciled("vm", true);
        metrics.reconciled("vm", true);
        metrics.reconciled("migration", false);
        metrics.migration_ended(MigrationPhase::Succeeded);
        metrics.set_leader(true);
        metrics.failed_over();
        metrics.vm_restarted("default", "web");
        metrics.vm_restarted("default", "web");
        metrics.reconcile_took("vm", Duration::from_millis(3));
        let text = metrics.render();
        for line in [
            "godwit_operator_reconciles_total{controller=\"vm\",result=\"ok\"} 2",
            "godwit_operator_reconciles_total{controller=\"migration\",result=\"error\"} 1",
            "godwit_vms{phase=\"Running\"} 0",
            "godwit_vmmigrations{phase=\"PreCopy\"} 0",
            "godwit_failovers_total 1",
            "godwit_vm_restarts_total{namespace=\"default\",name=\"web\"} 2",
            "godwit_operator_reconcile_duration_seconds_count{controller=\"vm\"} 1",
            "godwit_migrations_total{result=\"Succeeded\"} 1",
            "godwit_migrations_total{result=\"Cancelled\"} 0",
            "godwit_operator_leader 1",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }
}
