//! The local demo: Godwit on a local cluster, driven with `kubectl` as a user
//! drives it, and a live migration you can watch.
//!
//! [`run`] brings Godwit up on two nodes ([`ClusterDriver::up`]), applies
//! `examples/template.yaml` and `examples/vm.yaml`, waits for the VM to run,
//! connects a TCP client from the client namespace to the guest's heartbeat
//! server, applies `examples/migration.yaml`, prints the migration's progress
//! from its status while it runs, and checks what a user would check: the VM
//! runs on the other node, its heartbeat counter continued, the client's
//! connection survived. Everything is torn down at the end, also on failure.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use godwit_testkit::guest::watch_heartbeats;
use godwit_testkit::nodes::CLIENT_IP;
use serde_json::Value;

use crate::driver::{
    ClusterDriver, EXAMPLE_MIGRATION, EXAMPLE_TEMPLATE, EXAMPLE_VM, EXAMPLE_VM_ADDR,
};

/// What the demo found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DemoReport {
    /// Always `migrate`.
    pub demo: &'static str,
    /// The VM's phase after the migration.
    pub vm_phase: String,
    /// The migration's final phase.
    pub migration_phase: String,
    /// Node the VM started on.
    pub source_node: String,
    /// Node it moved to.
    pub target_node: String,
    /// The client's TCP connection to the guest never broke.
    pub tcp_connection_survived: bool,
    /// The guest's heartbeat counter went on without a gap or reset across
    /// the move (seen over the client's connection, before and after).
    pub heartbeat_continued: bool,
    /// Source pause to target resume, from the migration's result.
    pub downtime_ms: f64,
    /// Start to end of the migration, from its result.
    pub total_ms: u64,
    /// The migration's status showed progress (bytes sent) while it ran.
    #[serde(skip)]
    pub progress_seen: bool,
}

fn say(quiet: bool, text: impl AsRef<str>) {
    if !quiet {
        println!("{}", text.as_ref());
    }
}

/// Runs the demo; `quiet` prints only errors (for `--json`).
pub fn run(quiet: bool) -> anyhow::Result<DemoReport> {
    let dir = std::env::temp_dir().join(format!("godwit-demo-{}", std::process::id()));
    say(
        quiet,
        "==> Local cluster: API server, 2 nodes (network namespaces), godwit-operator, a godwit-node agent per node",
    );
    let godwit = ClusterDriver::up(2, &dir)?;
    say(
        quiet,
        format!(
            "    kubectl --kubeconfig {} get gvm,gvmm",
            godwit.cluster.kubeconfig.display()
        ),
    );

    say(
        quiet,
        "==> kubectl apply -f examples/template.yaml -f examples/vm.yaml",
    );
    for m in [EXAMPLE_TEMPLATE, EXAMPLE_VM] {
        say(
            quiet,
            format!("    {}", godwit.apply(&godwit.example(m))?.trim()),
        );
    }
    let vm = godwit.wait_running("demo", Duration::from_secs(90))?;
    let source = vm["status"]["nodeName"].as_str().unwrap_or("?").to_string();
    say(
        quiet,
        format!(
            "    VM demo is Running on {source} at {}",
            vm["status"]["addresses"][0]["ip"].as_str().unwrap_or("?")
        ),
    );
    say(quiet, godwit.kubectl(&["get", "gvm"], None)?.trim_end());

    say(
        quiet,
        format!("==> A client at {CLIENT_IP} connects to {EXAMPLE_VM_ADDR} and reads heartbeats"),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let last_seen = Arc::new(AtomicU64::new(0));
    let client = {
        let (stop, last) = (stop.clone(), last_seen.clone());
        godwit
            .cluster
            .fabric
            .client
            .spawn_in(move || watch_heartbeats(EXAMPLE_VM_ADDR, &stop, &last))?
    };
    // Let the workload touch its whole working set (128 MiB at 10000 pages/s).
    godwit.wait("heartbeats over TCP", Duration::from_secs(30), || {
        Ok((last_seen.load(Ordering::Relaxed) > 70).then_some(()))
    })?;
    let before = last_seen.load(Ordering::Relaxed);
    say(quiet, format!("    heartbeat {before} received"));

    say(quiet, "==> kubectl apply -f examples/migration.yaml");
    say(
        quiet,
        format!(
            "    {}",
            godwit.apply(&godwit.example(EXAMPLE_MIGRATION))?.trim()
        ),
    );
    let mut shown = String::new();
    let mut progress_seen = false;
    // Watch rather than poll: a short migration can go through its phases
    // faster than a poll. A watch that ends (a server timeout) is reopened;
    // it starts again from the current state.
    let mut watch = godwit.watch("gvmm", "demo-move")?;
    let mig = godwit.wait("the migration to end", Duration::from_secs(300), || {
        let m = match watch.next(Duration::from_millis(500)) {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(None),
            Err(_) => {
                watch = godwit.watch("gvmm", "demo-move")?;
                return Ok(None);
            }
        };
        let s = &m["status"];
        let p = &s["progress"];
        let line = if p.is_object() {
            format!(
                "    {:<15} round {:>2}  sent {:>7.1} MiB  remaining {:>6.1} MiB  dirty {:>6.1} MiB/s  bandwidth {:>7.1} MiB/s  expected downtime {} ms",
                s["phase"].as_str().unwrap_or("?"),
                p["round"],
                mib(&p["transferredBytes"]),
                mib(&p["memoryRemainingBytes"]),
                mib(&p["dirtyRateBytesPerSecond"]),
                mib(&p["bandwidthBytesPerSecond"]),
                p["expectedDowntimeMs"],
            )
        } else {
            format!(
                "    {:<15} {} -> {}",
                s["phase"].as_str().unwrap_or("Pending"),
                s["sourceNode"].as_str().unwrap_or("?"),
                s["targetNode"].as_str().unwrap_or("?")
            )
        };
        if line != shown {
            say(quiet, &line);
            shown = line;
        }
        let done = matches!(
            s["phase"].as_str(),
            Some("Succeeded" | "Failed" | "Cancelled")
        );
        progress_seen |= !done && p["transferredBytes"].as_u64() > Some(0);
        Ok(done.then_some(m))
    })?;
    let status = &mig["status"];
    let phase = status["phase"].as_str().unwrap_or("?").to_string();
    let target = status["targetNode"].as_str().unwrap_or("?").to_string();
    let result = &status["result"];
    if phase == "Succeeded" {
        say(
            quiet,
            format!(
                "    done: {} ms in all, {} ms downtime, {:.1} MiB sent in {} rounds ({})",
                result["totalTimeMs"],
                result["downtimeMs"],
                mib(&result["transferredBytes"]),
                result["rounds"],
                result["modeUsed"].as_str().unwrap_or("?"),
            ),
        );
    } else {
        say(
            quiet,
            format!(
                "    {phase}: {}",
                status["failureReason"].as_str().unwrap_or("?")
            ),
        );
    }

    // What a user checks afterwards: where the VM runs, and its guest.
    let vm = godwit.wait("the VM to settle", Duration::from_secs(30), || {
        let vm = godwit.get("gvm", "demo")?;
        Ok(vm.filter(|v| v["status"]["phase"] != "Migrating"))
    })?;
    let vm_phase = vm["status"]["phase"].as_str().unwrap_or("?").to_string();
    let vm_node = vm["status"]["nodeName"].as_str().unwrap_or("?").to_string();
    say(
        quiet,
        godwit.kubectl(&["get", "gvm,gvmm"], None)?.trim_end(),
    );
    let at_end = last_seen.load(Ordering::Relaxed);
    godwit.wait("heartbeats after the move", Duration::from_secs(10), || {
        Ok((last_seen.load(Ordering::Relaxed) >= at_end + 10).then_some(()))
    })?;
    stop.store(true, Ordering::Relaxed);
    let stream = client
        .join()
        .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    let survived = stream.error.is_none() && stream.count > 0;
    let continued = stream.in_order && stream.last > at_end && stream.first <= before;
    say(
        quiet,
        format!(
            "==> Client: heartbeats {}..{} over one connection, in order: {}, connection broke: {}",
            stream.first,
            stream.last,
            stream.in_order,
            stream.error.as_deref().unwrap_or("no")
        ),
    );
    say(quiet, "==> Tearing down");
    drop(godwit);
    Ok(DemoReport {
        demo: "migrate",
        vm_phase: if vm_node == target {
            vm_phase
        } else {
            format!("{vm_phase} on {vm_node}")
        },
        migration_phase: phase,
        source_node: source,
        target_node: target,
        tcp_connection_survived: survived,
        heartbeat_continued: continued,
        downtime_ms: result["downtimeMs"].as_f64().unwrap_or(0.0),
        total_ms: result["totalTimeMs"].as_u64().unwrap_or(0),
        progress_seen,
    })
}

fn mib(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0) / (1 << 20) as f64
}
