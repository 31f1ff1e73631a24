//! The node daemon's Prometheus metrics (`godwit-node --metrics-addr`,
//! default `0.0.0.0:9411`), served by [`godwit_auth::serve_metrics`]:
//! `/metrics` in the OpenMetrics text format to users whom RBAC allows `get`
//! on it, `/healthz` to anyone.
//!
//! | metric | type | labels | recorded |
//! | --- | --- | --- | --- |
//! | `godwit_node_migrations_total` | counter | `result` (`Succeeded`, `Failed`, `Cancelled`) | by the source agent when a migration ends |
//! | `godwit_migration_transferred_bytes` | histogram | | idem (its `_sum` is every byte sent) |
//! | `godwit_migration_downtime_seconds` | histogram | | idem, succeeded migrations |
//! | `godwit_migration_duration_seconds` | histogram | | idem, start to end |
//! | `godwit_node_fence_events_total` | counter | | the agent fenced the node (stopped its VMs) |
//! | `godwit_vm_cpu_seconds_total` | counter | `namespace`, `vm` | at scrape: user+system time of the VM's VMM processes (its vCPU threads run there) |
//! | `godwit_vm_memory_bytes` | gauge | `namespace`, `vm` | at scrape: the guest memory the VM was given |
//! | `godwit_vm_resident_memory_bytes` | gauge | `namespace`, `vm` | at scrape: resident memory of its VMM processes |
//!
//! The metrics live in one process-wide set ([`global`]), so recording one is
//! a one-line hook where the agent already acts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use godwit_crds::contract::Machine;
use godwit_crds::{MigrationPhase, MigrationResult};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// `result` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// The migration's final phase.
    pub result: String,
}

/// `namespace`, `vm` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmLabels {
    namespace: String,
    vm: String,
}

/// The node daemon's metrics.
pub struct NodeMetrics {
    registry: std::sync::Mutex<Registry>,
    migrations: Family<ResultLabel, Counter>,
    bytes: Histogram,
    downtime: Histogram,
    duration: Histogram,
    fences: Counter,
}

impl Default for NodeMetrics {
    fn default() -> Self {
        let m = NodeMetrics {
            registry: Default::default(),
            migrations: Family::default(),
            // 1 MiB .. 64 GiB
            bytes: Histogram::new(exponential_buckets((1 << 20) as f64, 4.0, 9)),
            // 1 ms .. ~16 s
            downtime: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            // 0.25 s .. ~17 min
            duration: Histogram::new(exponential_buckets(0.25, 2.0, 13)),
            fences: Counter::default(),
        };
        {
            let mut r = m.registry.lock().expect("metrics poisoned");
            r.register(
                "godwit_node_migrations",
                "Migrations this node sent, by result",
                m.migrations.clone(),
            );
            r.register(
                "godwit_migration_transferred_bytes",
                "Bytes sent per migration from this node",
                m.bytes.clone(),
            );
            r.register(
                "godwit_migration_downtime_seconds",
                "Guest pause of migrations from this node (source pause to target resume)",
                m.downtime.clone(),
            );
            r.register(
                "godwit_migration_duration_seconds",
                "Migrations from this node, start to end",
                m.duration.clone(),
            );
            r.register(
                "godwit_node_fence_events",
                "Times this node fenced itself (stopped its VMs after losing its Lease)",
                m.fences.clone(),
            );
        }
        m
    }
}

static GLOBAL: OnceLock<NodeMetrics> = OnceLock::new();

/// The process-wide metrics.
pub fn global() -> &'static NodeMetrics {
    GLOBAL.get_or_init(NodeMetrics::default)
}

impl NodeMetrics {
    /// A migration this node sent ended in `phase`, after `elapsed`.
    pub fn migration_ended(
        &self,
        phase: MigrationPhase,
        result: Option<&MigrationResult>,
        elapsed: Option<Duration>,
    ) {
        self.migrations
            .get_or_create(&ResultLabel {
                result: format!("{phase:?}"),
            })
            .inc();
        if let Some(r) = result {
            self.bytes.observe(r.transferred_bytes as f64);
            if phase == MigrationPhase::Succeeded {
                self.downtime.observe(r.downtime_ms as f64 / 1000.0);
            }
        }
        let duration = result
            .map(|r| Duration::from_millis(r.total_time_ms))
            .or(elapsed);
        if let Some(d) = duration {
            self.duration.observe(d.as_secs_f64());
        }
    }

    /// The node fenced itself.
    pub fn fenced(&self) {
        self.fences.inc();
    }

    /// Adds the per-VM metrics of the VMs under `state_dir` (read at scrape).
    pub fn watch_vms(&self, state_dir: PathBuf) {
        self.registry
            .lock()
            .expect("metrics poisoned")
            .register_collector(Box::new(VmCollector { state_dir }));
    }

    /// The metrics in the OpenMetrics text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().expect("metrics poisoned");
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

/// What `/proc` says about one VM's processes.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Usage {
    cpu_seconds: f64,
    resident_bytes: u64,
}

/// Per-VM figures, read from the VM directories and `/proc` at each scrape.
#[derive(Debug)]
struct VmCollector {
    state_dir: PathBuf,
}

/// `(process group → usage)` for every process.
fn usage_by_group() -> BTreeMap<i32, Usage> {
    // SAFETY: sysconf only reads configuration values.
    let (tick, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK).max(1) as f64,
            libc::sysconf(libc::_SC_PAGESIZE).max(1) as u64,
        )
    };
    let mut out: BTreeMap<i32, Usage> = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        if !e
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        if let Some((pgrp, u)) = parse_stat(&stat, tick, page) {
            let t = out.entry(pgrp).or_default();
            t.cpu_seconds += u.cpu_seconds;
            t.resident_bytes += u.resident_bytes;
        }
    }
    out
}

/// The process group and usage in a `/proc/<pid>/stat` line.
fn parse_stat(stat: &str, tick: f64, page: u64) -> Option<(i32, Usage)> {
    // The command name may contain spaces and parentheses: split after the last ')'.
    let (_, rest) = stat.rsplit_once(") ")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields after the name, from 0: state, ppid, pgrp, ..., utime (11),
    // stime (12), ..., rss (21).
    let pgrp = f.get(2)?.parse().ok()?;
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    let rss: u64 = f.get(21)?.parse().ok()?;
    Some((
        pgrp,
        Usage {
            cpu_seconds: (utime + stime) / tick,
            resident_bytes: rss * page,
        },
    ))
}

/// `(namespace, name, process group, guest memory)` of every VM directory.
fn vm_dirs(state_dir: &Path) -> Vec<(String, String, Option<i32>, u64)> {
    let list = |p: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(p)
            .map(|r| r.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    for ns in list(&state_dir.join("vms")) {
        for vm in list(&ns) {
            let name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
            let (Some(namespace), Some(vm_name)) = (name(&ns), name(&vm)) else {
                continue;
            };
            let pid = std::fs::read_to_string(vm.join("pid"))
                .ok()
                .and_then(|s| s.trim().parse().ok());
            let memory = std::fs::read_to_string(vm.join("machine.json"))
                .ok()
                .and_then(|s| serde_json::from_str::<Machine>(&s).ok())
                .map_or(0, |m| m.memory_bytes);
            out.push((namespace, vm_name, pid, memory));
        }
    }
    out
}

impl Collector for VmCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let usage = usage_by_group();
        // Only VMs whose VMM runs here now.
        let vms: Vec<(VmLabels, u64, Usage)> = vm_dirs(&self.state_dir)
            .into_iter()
            .filter_map(|(namespace, vm, pid, memory)| {
                let u = *usage.get(&pid?)?;
                Some((VmLabels { namespace, vm }, memory, u))
            })
            .collect();
        {
            let mut m = encoder.encode_descriptor(
                "godwit_vm_cpu_seconds",
                "CPU time of the VM's VMM processes (vCPUs and devices)",
                None,
                ConstCounter::new(0.0f64).metric_type(),
            )?;
            for (labels, _, u) in &vms {
                ConstCounter::new(u.cpu_seconds).encode(m.encode_family(labels)?)?;
            }
        }
        {
            let mut m = encoder.encode_descriptor(
                "godwit_vm_memory_bytes",
                "Guest memory the VM was given",
                None,
                ConstGauge::new(0i64).metric_type(),
            )?;
            for (labels, memory, _) in &vms {
                ConstGauge::new(*memory as i64).encode(m.encode_family(labels)?)?;
            }
        }
        let mut m = encoder.encode_descriptor(
            "godwit_vm_resident_memory_bytes",
            "Resident memory of the VM's VMM processes",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        for (labels, _, u) in &vms {
            ConstGauge::new(u.resident_bytes as i64).encode(m.encode_family(labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use godwit_crds::MigrationModeUsed;

    #[test]
    fn a_migration_is_counted_with_its_bytes_and_downtime() {
        let m = NodeMetrics::default();
        let r = MigrationResult {
            total_time_ms: 2500,
            downtime_ms: 12,
            transferred_bytes: 300 << 20,
            rounds: 3,
            mode_used: MigrationModeUsed::PreCopy,
        };
        m.migration_ended(MigrationPhase::Succeeded, Some(&r), None);
        m.migration_ended(
            MigrationPhase::Cancelled,
            None,
            Some(Duration::from_secs(1)),
        );
        let text = m.render();
        for line in [
            "godwit_node_migrations_total{result=\"Succeeded\"} 1",
            "godwit_node_migrations_total{result=\"Cancelled\"} 1",
            &format!("godwit_migration_transferred_bytes_sum {}.0", 300u64 << 20),
            "godwit_migration_transferred_bytes_count 1",
            "godwit_migration_downtime_seconds_count 1",
            "godwit_migration_downtime_seconds_sum 0.012",
            "godwit_migration_duration_seconds_count 2",
            "godwit_migration_duration_seconds_sum 3.5",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn stat_lines_parse_with_odd_names() {
        let stat = "1234 (godwit vmm) (x)) S 1 1230 1230 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 100 12345678 2048 18446744073709551615";
        let (pgrp, u) = parse_stat(stat, 100.0, 4096).unwrap();
        assert_eq!(pgrp, 1230);
        assert_eq!(u.cpu_seconds, 3.0);
        assert_eq!(u.resident_bytes, 2048 * 4096);
    }
}
