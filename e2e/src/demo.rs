//! The local demo: a live migration you can watch, on this machine.
//!
//! Two nodes (network namespaces on one L2 segment, see [`crate::nodes`]) and a
//! client namespace. The Godwit test guest boots under `godwit-vmm` on node-0
//! with a memory workload and a TCP heartbeat server; a client in the client
//! namespace holds a TCP connection to it; the VM live-migrates to node-1 while
//! the demo prints the migration's progress; then it checks what a user would
//! check: the guest runs on node-1, its heartbeat counter continued, its memory
//! verifies, and the TCP connection survived. Everything is torn down at the
//! end, also on failure.
//!
//! This drives the VMMs directly; once the operator and node agents exist the
//! same demo goes through `kubectl apply` of the example manifests.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::guest::{guest_elf, parse_heartbeat};
use crate::nodes::{Fabric, CLIENT_IP};
use crate::vmmproc::VmmProc;

const PORT: u16 = 7000;

/// What the demo found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DemoReport {
    /// Always `migrate`.
    pub demo: &'static str,
    /// `Running` when the guest runs on the target after the move.
    pub vm_phase: String,
    /// `Succeeded` or `Failed`.
    pub migration_phase: String,
    /// Node the VM started on.
    pub source_node: String,
    /// Node it moved to.
    pub target_node: String,
    /// The client's TCP connection to the guest never broke.
    pub tcp_connection_survived: bool,
    /// The target's first heartbeat followed the source's last.
    pub heartbeat_continued: bool,
    /// Source pause to target resume, as the engine measured it.
    pub downtime_ms: f64,
    /// Start to end of the migration.
    pub total_ms: u64,
}

fn say(quiet: bool, text: impl AsRef<str>) {
    if !quiet {
        println!("{}", text.as_ref());
    }
}

/// Runs the demo; `quiet` prints only errors (for `--json`).
pub fn run(quiet: bool) -> anyhow::Result<DemoReport> {
    anyhow::ensure!(
        std::path::Path::new("/dev/kvm").exists(),
        "/dev/kvm does not exist: the demo boots a real VM under KVM"
    );
    let elf = guest_elf()?;
    let dir = std::env::temp_dir().join(format!("godwit-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let _cleanup = DirGuard(dir.clone());

    say(
        quiet,
        "==> Two nodes on one network (namespaces node-0, node-1) and a client",
    );
    let fabric = Fabric::new(2)?;
    let (src_node, dst_node) = (&fabric.nodes[0], &fabric.nodes[1]);
    let vm_ip = Fabric::vm_ip(0);

    say(
        quiet,
        format!(
            "==> Booting the test guest on {} ({vm_ip}, 1 vCPU, 512 MiB, dirtying 64 MiB)",
            src_node.name
        ),
    );
    let args: Vec<String> = vec![
        "--kernel".into(),
        elf.display().to_string(),
        "--memory-mib".into(),
        "512".into(),
        "--cmdline".into(),
        format!("hb_ms=50 dirty_mib=64 dirty_rate=20000 ip={vm_ip}/24 tcp_port={PORT}"),
        "--net".into(),
        format!("bridge={},mac=52:54:00:88:00:10", src_node.bridge),
    ];
    let source = VmmProc::boot(Some(&src_node.ns), &dir, "source", &args)?;
    let mut console = source.console(Duration::from_secs(10))?;
    source.api(json!({"cmd": "resume"}))?;
    let ready = console.wait_prefix("READY", Duration::from_secs(60))?;
    let _ = ready;
    // Let the workload touch its whole working set before moving.
    let hb = console.heartbeats(40, Duration::from_secs(30))?;
    say(
        quiet,
        format!("    guest is up, heartbeat {}", hb[39].0.counter),
    );

    say(
        quiet,
        format!("==> A client at {CLIENT_IP} connects to {vm_ip}:{PORT} and reads heartbeats"),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let stop = stop.clone();
        let addr = format!("{vm_ip}:{PORT}");
        fabric.client.spawn_in(move || watch(&addr, &stop))?
    };

    let target_addr = format!("{}:{}", dst_node.ip, 4700);
    say(
        quiet,
        format!("==> {} waits for the VM on {target_addr}", dst_node.name),
    );
    let target = VmmProc::incoming(
        Some(&dst_node.ns),
        &dir,
        "target",
        &target_addr,
        &[format!("bridge={}", dst_node.bridge)],
    )?;

    say(
        quiet,
        format!("==> Live migration {} -> {}", src_node.name, dst_node.name),
    );
    let status = source.migrate(&target_addr, json!({"vm_name": "demo"}), Duration::from_millis(250), Duration::from_secs(300), |p| {
        if !quiet && p["stage"] != "Completed" {
            println!(
                "    {:<12} round {:>2}  sent {:>7.1} MiB  remaining {:>6.1} MiB  dirty {:>6.1} MiB/s  bandwidth {:>7.1} MiB/s  expected downtime {} ms",
                p["stage"].as_str().unwrap_or("?"),
                p["round"],
                mib(&p["transferred_bytes"]),
                mib(&p["memory_remaining_bytes"]),
                mib(&p["dirty_rate_bytes_per_second"]),
                mib(&p["bandwidth_bytes_per_second"]),
                p["expected_downtime_ms"],
            );
        }
    })?;
    let ok = status["stage"] == "Completed";
    let result = &status["result"];
    if ok {
        say(
            quiet,
            format!(
                "    done: {} ms in all, {:.1} ms downtime, {:.1} MiB sent in {} rounds ({})",
                result["total_ms"],
                result["downtime_ms"].as_f64().unwrap_or(0.0),
                mib(&result["bytes_sent"]),
                result["rounds"],
                result["mode"].as_str().unwrap_or("?"),
            ),
        );
    } else {
        say(quiet, format!("    failed: {}", status["error"]));
    }

    // What a user checks afterwards.
    let mut heartbeat_continued = false;
    let mut vm_phase = "Failed".to_string();
    if ok {
        let mut dst_console = target.console(Duration::from_secs(10))?;
        dst_console.heartbeats(3, Duration::from_secs(10))?;
        let (last_src, first_dst, cut) = crate::vmmproc::switch_over(&source, &target);
        heartbeat_continued = first_dst == last_src + 1 || (cut && first_dst == last_src + 2);
        say(
            quiet,
            format!(
                "==> On {}: heartbeat {last_src} was the source's last, {first_dst} the target's first{}",
                dst_node.name,
                if cut { " (the line between was split by the switch-over)" } else { "" }
            ),
        );
        dst_console.send("memcheck")?;
        let check = dst_console.wait_prefix("MEMCHECK", Duration::from_secs(60))?;
        say(quiet, format!("    {}", check.text));
        if check.text.starts_with("MEMCHECK ok") {
            vm_phase = "Running".into();
        }
        let _ = source.api(json!({"cmd": "stop"}));
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let stream = client
        .join()
        .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    let survived = stream.error.is_none() && stream.in_order && stream.count > 0;
    say(
        quiet,
        format!(
            "==> Client: {} heartbeats over one connection, in order: {}, connection broke: {}",
            stream.count,
            stream.in_order,
            stream.error.as_deref().unwrap_or("no")
        ),
    );
    say(quiet, "==> Tearing down");
    Ok(DemoReport {
        demo: "migrate",
        vm_phase,
        migration_phase: if ok { "Succeeded" } else { "Failed" }.into(),
        source_node: src_node.name.clone(),
        target_node: dst_node.name.clone(),
        tcp_connection_survived: survived,
        heartbeat_continued,
        downtime_ms: result["downtime_ms"].as_f64().unwrap_or(0.0),
        total_ms: result["total_ms"].as_u64().unwrap_or(0),
    })
}

fn mib(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0) / (1 << 20) as f64
}

struct DirGuard(std::path::PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What the TCP client saw.
struct StreamSeen {
    count: usize,
    in_order: bool,
    error: Option<String>,
}

fn watch(addr: &str, stop: &AtomicBool) -> StreamSeen {
    let deadline = Instant::now() + Duration::from_secs(30);
    let stream = loop {
        match TcpStream::connect(addr) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => {
                return StreamSeen {
                    count: 0,
                    in_order: false,
                    error: Some(e.to_string()),
                }
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut seen = StreamSeen {
        count: 0,
        in_order: true,
        error: None,
    };
    let mut last = None;
    for line in BufReader::new(stream).lines() {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        match line {
            Ok(l) => {
                if let Some(hb) = parse_heartbeat(l.trim_end()) {
                    if last.is_some_and(|p| hb.counter != p + 1) {
                        seen.in_order = false;
                    }
                    last = Some(hb.counter);
                    seen.count += 1;
                }
            }
            Err(e) => {
                seen.error = Some(e.to_string());
                break;
            }
        }
    }
    if seen.error.is_none() && !stop.load(Ordering::Relaxed) {
        seen.error = Some("connection closed".into());
    }
    seen
}
