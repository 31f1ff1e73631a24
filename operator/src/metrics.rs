//! `/metrics` (Prometheus text format 0.0.4) and `/healthz`, served by a
//! tiny HTTP/1.0 responder: one request per connection, no keep-alive.
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `godwit_operator_reconciles_total` | counter | `controller` (`vm`, `migration`), `result` (`ok`, `error`) |
//! | `godwit_vms` | gauge | `phase` (from the VM controller's cache) |
//! | `godwit_migrations` | gauge | `phase` (from the migration controller's cache) |
//! | `godwit_migrations_total` | counter | `result` (`Succeeded`, `Failed`, `Cancelled`), counted when the operator settles a migration |
//! | `godwit_operator_leader` | gauge | 1 while this instance leads |

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use godwit_crds::{MigrationPhase, VMMigration, VirtualMachine, VmPhase};
use kube::runtime::reflector::Store;
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

/// The operator's metrics.
#[derive(Default)]
pub struct Metrics {
    reconciles: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    migrations_total: Mutex<BTreeMap<String, u64>>,
    leader: AtomicBool,
    vms: Mutex<Option<Store<VirtualMachine>>>,
    migrations: Mutex<Option<Store<VMMigration>>>,
}

impl Metrics {
    /// Counts one reconcile of `controller` that ended `ok` or not.
    pub fn reconciled(&self, controller: &'static str, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        *self
            .reconciles
            .lock()
            .expect("metrics poisoned")
            .entry((controller, result))
            .or_default() += 1;
    }

    /// Counts a migration that ended in `phase`.
    pub fn migration_ended(&self, phase: MigrationPhase) {
        *self
            .migrations_total
            .lock()
            .expect("metrics poisoned")
            .entry(format!("{phase:?}"))
            .or_default() += 1;
    }

    /// Whether this instance leads.
    pub fn set_leader(&self, leading: bool) {
        self.leader.store(leading, Ordering::Relaxed);
    }

    /// The VM controller's cache, for `godwit_vms`.
    pub fn watch_vms(&self, store: Store<VirtualMachine>) {
        *self.vms.lock().expect("metrics poisoned") = Some(store);
    }

    /// The migration controller's cache, for `godwit_migrations`.
    pub fn watch_migrations(&self, store: Store<VMMigration>) {
        *self.migrations.lock().expect("metrics poisoned") = Some(store);
    }

    /// The metrics in Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str(
            "# HELP godwit_operator_reconciles_total Reconciles by controller and result.\n",
        );
        out.push_str("# TYPE godwit_operator_reconciles_total counter\n");
        for ((controller, result), n) in self.reconciles.lock().expect("metrics poisoned").iter() {
            let _ = writeln!(
                out,
                "godwit_operator_reconciles_total{{controller=\"{controller}\",result=\"{result}\"}} {n}"
            );
        }

        let mut vms: BTreeMap<String, u64> =
            VM_PHASES.iter().map(|p| (format!("{p:?}"), 0)).collect();
        if let Some(store) = self.vms.lock().expect("metrics poisoned").as_ref() {
            for vm in store.state() {
                *vms.entry(format!("{:?}", vm_phase(&vm))).or_default() += 1;
            }
        }
        out.push_str("# HELP godwit_vms VirtualMachines by phase.\n");
        out.push_str("# TYPE godwit_vms gauge\n");
        for (phase, n) in &vms {
            let _ = writeln!(out, "godwit_vms{{phase=\"{phase}\"}} {n}");
        }

        let mut migrations: BTreeMap<String, u64> = MIGRATION_PHASES
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
        out.push_str("# HELP godwit_migrations VMMigrations by phase.\n");
        out.push_str("# TYPE godwit_migrations gauge\n");
        for (phase, n) in &migrations {
            let _ = writeln!(out, "godwit_migrations{{phase=\"{phase}\"}} {n}");
        }

        out.push_str("# HELP godwit_migrations_total Migrations ended, by result.\n");
        out.push_str("# TYPE godwit_migrations_total counter\n");
        let ended = self.migrations_total.lock().expect("metrics poisoned");
        for result in ["Succeeded", "Failed", "Cancelled"] {
            let n = ended.get(result).copied().unwrap_or(0);
            let _ = writeln!(out, "godwit_migrations_total{{result=\"{result}\"}} {n}");
        }

        out.push_str("# HELP godwit_operator_leader 1 while this instance leads.\n");
        out.push_str("# TYPE godwit_operator_leader gauge\n");
        let _ = writeln!(
            out,
            "godwit_operator_leader {}",
            u8::from(self.leader.load(Ordering::Relaxed))
        );
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
        ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4", metrics.render()),
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
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, metrics));

        let text = get(addr, "/metrics").await;
        assert!(text.starts_with("HTTP/1.0 200 OK"), "{text}");
        for line in [
            "godwit_operator_reconciles_total{controller=\"vm\",result=\"ok\"} 2",
            "godwit_operator_reconciles_total{controller=\"migration\",result=\"error\"} 1",
            "godwit_vms{phase=\"Running\"} 0",
            "godwit_migrations{phase=\"PreCopy\"} 0",
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
