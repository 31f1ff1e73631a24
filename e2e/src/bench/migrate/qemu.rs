//! Runs of QEMU/KVM on the same guest and topology: its defaults, and its
//! best (no bandwidth cap on the unlimited link, the link rate on the
//! shaped one, auto-converge or post-copy, the one with the lower observed
//! pause kept).

use std::time::{Duration, Instant};

use godwit_testkit::guest::Line;
use godwit_testkit::qemu::{Qemu, QemuConfig};
use serde_json::{json, Value};

use godwit_crds::error_chain;

use super::error::BenchError;
use super::report::{missing_heartbeats, observed_pause, RunResult};
use super::scenario::{cmdline, drain, warm_up, Scenario, BOOT, MEMORY_MIB};
use super::topology::{free_port, Link, Topology, DST_IP};

/// Which QEMU configuration to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum QemuVariant {
    Default,
    AutoConverge,
    PostCopy,
}

pub(super) fn qemu_run(
    t: &Topology,
    s: &Scenario,
    link: Link,
    variant: QemuVariant,
    timeout: Duration,
) -> Result<RunResult, BenchError> {
    let config = if variant == QemuVariant::Default {
        "default"
    } else {
        "best"
    };
    let mut r = RunResult::new("qemu", config, s, link);
    r.mode = match variant {
        QemuVariant::Default => "precopy",
        QemuVariant::AutoConverge => "auto-converge",
        QemuVariant::PostCopy => "postcopy",
    }
    .into();
    let port = free_port()?;
    let base = QemuConfig {
        memory_mib: MEMORY_MIB,
        cpus: 1,
        append: cmdline(s),
        acpi: false,
        ..Default::default()
    };
    let mut dst = Qemu::spawn(&QemuConfig {
        netns: Some(t.b.name().to_string()),
        incoming: Some(format!("tcp:{DST_IP}:{port}")),
        ..base.clone()
    })?;
    let mut src = Qemu::spawn(&QemuConfig {
        netns: Some(t.a.name().to_string()),
        ..base
    })?;
    src.console.wait_prefix("READY", BOOT)?;
    warm_up(&mut src.console, s)?;
    let mut qmp = src.qmp()?;
    if variant != QemuVariant::Default {
        let bw: u64 = match link {
            Link::Unlimited => 1 << 36,
            Link::Gbit => 125_000_000,
        };
        qmp.set_parameters(json!({ "max-bandwidth": bw }))?;
    }
    match variant {
        QemuVariant::AutoConverge => qmp.set_capability("auto-converge", true)?,
        QemuVariant::PostCopy => {
            qmp.set_capability("postcopy-ram", true)?;
            dst.qmp()?.set_capability("postcopy-ram", true)?;
        }
        QemuVariant::Default => {}
    }
    let start = Instant::now();
    qmp.migrate(&format!("tcp:{DST_IP}:{port}"))?;
    let deadline = start + timeout;
    let mut postcopy_started = false;
    let mut last = Value::Null;
    loop {
        let v = qmp.query_migrate()?;
        let _ = src.console.next_line(Duration::from_millis(20));
        let st = v["status"].as_str().unwrap_or("").to_string();
        last = if v.is_null() { last } else { v };
        if st == "completed" {
            r.converged = true;
            break;
        }
        if st == "failed" || st == "cancelled" {
            r.error = Some(format!("QEMU migration {st}"));
            break;
        }
        if variant == QemuVariant::PostCopy
            && !postcopy_started
            && last["ram"]["dirty-sync-count"].as_u64().unwrap_or(0) >= 2
        {
            // After the first full pass and one more: switch to post-copy.
            let _ = qmp.execute("migrate-start-postcopy", json!({}));
            postcopy_started = true;
        }
        if Instant::now() >= deadline {
            let _ = qmp.execute("migrate_cancel", json!({}));
            break;
        }
    }
    let ram = &last["ram"];
    r.bytes_sent = ram["transferred"].as_u64().unwrap_or(0);
    r.rounds = ram["dirty-sync-count"].as_u64().unwrap_or(0);
    if r.converged {
        r.total_ms = last["total-time"].as_f64().unwrap_or(0.0);
        r.downtime_ms = last["downtime"].as_f64();
        if variant == QemuVariant::PostCopy && !postcopy_started {
            r.mode = "postcopy (completed in pre-copy)".into();
        }
        let _ = dst.console.heartbeats(250, Duration::from_secs(10));
    } else {
        r.total_ms = start.elapsed().as_secs_f64() * 1000.0;
        let _ = src.console.heartbeats(250, Duration::from_secs(5));
    }
    drain(
        &mut src.console,
        Duration::from_millis(200),
        Duration::from_secs(2),
    );
    let mut all: Vec<&Line> = src.console.lines().iter().collect();
    all.extend(dst.console.lines().iter());
    r.observed_pause_ms = observed_pause(&all, start);
    r.hb_missing = missing_heartbeats(&all, start);
    Ok(r)
}

/// QEMU's best: both variants, the converged one with the lower observed pause.
pub(super) fn qemu_best(
    t: &Topology,
    s: &Scenario,
    link: Link,
    timeout: Duration,
) -> Result<RunResult, BenchError> {
    let mut best: Option<RunResult> = None;
    let mut errors = Vec::new();
    for v in [QemuVariant::AutoConverge, QemuVariant::PostCopy] {
        match qemu_run(t, s, link, v, timeout) {
            Ok(r) => {
                let better = match &best {
                    None => true,
                    Some(b) => {
                        (r.converged && !b.converged)
                            || (r.converged == b.converged
                                && r.observed_pause_ms.unwrap_or(f64::MAX)
                                    < b.observed_pause_ms.unwrap_or(f64::MAX))
                    }
                };
                if better {
                    best = Some(r);
                }
            }
            Err(e) => errors.push(format!("{v:?}: {}", error_chain(&e))),
        }
    }
    match best {
        Some(b) => Ok(b),
        None => Err(BenchError::Vmm(format!(
            "QEMU best: every variant failed: {}",
            errors.join("; ")
        ))),
    }
}
