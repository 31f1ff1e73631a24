//! Runs of QEMU/KVM on the same guest and topology: its defaults, and the
//! variants its best is chosen from (see [`QemuVariant`]).

use std::time::{Duration, Instant};

use godwit_testkit::qemu::{Qemu, QemuConfig};
use serde_json::{json, Value};

use super::error::BenchError;
use super::report::RunResult;
use super::scenario::{after, cmdline, drain, read_until, warm_up, Scenario, BOOT, MEMORY_MIB};
use super::topology::{free_port, Link, Topology, DST_IP};

/// Which QEMU configuration to run. Every variant but `Default` sets
/// `downtime-limit` to the pause Godwit aims at in the same run and
/// `max-bandwidth` to the link's rate (no cap on the unlimited link).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QemuVariant {
    /// Nothing changed: a 300 ms `downtime-limit` and a 128 MiB/s cap.
    Default,
    /// Pre-copy with `auto-converge` (the vCPUs throttled from 20% up, 10%
    /// a step).
    AutoConverge,
    /// `postcopy-ram`, switched to after the first full pass and one more
    /// (`dirty-sync-count` 2) unless pre-copy finished first.
    PostCopy,
    /// Both: auto-converge first, post-copy once the throttle reached
    /// [`POSTCOPY_AT_THROTTLE`] percent (or after [`POSTCOPY_AT_SYNC`]
    /// passes) without converging.
    PostCopyAfterAutoConverge,
}

/// The variants QEMU's best is chosen from.
pub const BEST_VARIANTS: [QemuVariant; 3] = [
    QemuVariant::AutoConverge,
    QemuVariant::PostCopy,
    QemuVariant::PostCopyAfterAutoConverge,
];

/// [`QemuVariant::PostCopyAfterAutoConverge`] switches at this throttle...
pub const POSTCOPY_AT_THROTTLE: u64 = 50;
/// ...or after this many passes.
pub const POSTCOPY_AT_SYNC: u64 = 8;

impl QemuVariant {
    /// Name as reported.
    pub fn name(self) -> &'static str {
        match self {
            QemuVariant::Default => "precopy",
            QemuVariant::AutoConverge => "auto-converge",
            QemuVariant::PostCopy => "postcopy",
            QemuVariant::PostCopyAfterAutoConverge => "postcopy-after-auto-converge",
        }
    }

    fn auto_converge(self) -> bool {
        matches!(
            self,
            QemuVariant::AutoConverge | QemuVariant::PostCopyAfterAutoConverge
        )
    }

    fn post_copy(self) -> bool {
        matches!(
            self,
            QemuVariant::PostCopy | QemuVariant::PostCopyAfterAutoConverge
        )
    }

    /// Whether to switch to post-copy now, from `query-migrate`'s `v`.
    fn switch_now(self, v: &Value) -> bool {
        let syncs = v["ram"]["dirty-sync-count"].as_u64().unwrap_or(0);
        let throttle = v["cpu-throttle-percentage"].as_u64().unwrap_or(0);
        match self {
            QemuVariant::PostCopy => syncs >= 2,
            QemuVariant::PostCopyAfterAutoConverge => {
                throttle >= POSTCOPY_AT_THROTTLE || syncs >= POSTCOPY_AT_SYNC
            }
            _ => false,
        }
    }
}

/// One QEMU migration of scenario `s` over `t` in `variant`, aiming at a
/// pause of `max_downtime_ms` (all variants but the default).
pub(super) fn qemu_run(
    t: &Topology,
    s: &Scenario,
    link: Link,
    variant: QemuVariant,
    max_downtime_ms: u64,
    timeout: Duration,
) -> Result<RunResult, BenchError> {
    let config = if variant == QemuVariant::Default {
        "default"
    } else {
        "best"
    };
    let mut r = RunResult::new("qemu", config, s, link);
    r.mode = variant.name().into();
    let port = free_port()?;
    let base = QemuConfig {
        memory_mib: MEMORY_MIB,
        cpus: 1,
        append: cmdline(s),
        // As under godwit-vmm, which always gives the guest ACPI tables.
        acpi: true,
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
        qmp.set_parameters(json!({ "max-bandwidth": bw, "downtime-limit": max_downtime_ms }))?;
    }
    if variant.auto_converge() {
        qmp.set_capability("auto-converge", true)?;
    }
    if variant.post_copy() {
        qmp.set_capability("postcopy-ram", true)?;
        dst.qmp()?.set_capability("postcopy-ram", true)?;
    }
    let wire_before = t.wire_bytes()?;
    let start = Instant::now();
    qmp.migrate(&format!("tcp:{DST_IP}:{port}"))?;
    let deadline = start + timeout;
    let mut postcopy_started = false;
    let mut last = Value::Null;
    let done = loop {
        let v = qmp.query_migrate()?;
        let _ = src.console.next_line(Duration::from_millis(20));
        let st = v["status"].as_str().unwrap_or("").to_string();
        last = if v.is_null() { last } else { v };
        if st == "completed" {
            r.converged = true;
            break Instant::now();
        }
        if st == "failed" || st == "cancelled" {
            r.error = Some(format!("QEMU migration {st}"));
            break Instant::now();
        }
        if !postcopy_started && st == "active" && variant.switch_now(&last) {
            let _ = qmp.execute("migrate-start-postcopy", json!({}));
            postcopy_started = true;
        }
        if Instant::now() >= deadline {
            let _ = qmp.execute("migrate_cancel", json!({}));
            break Instant::now();
        }
    };
    let ram = &last["ram"];
    r.bytes_sent = ram["transferred"].as_u64().unwrap_or(0);
    r.rounds = ram["dirty-sync-count"].as_u64().unwrap_or(0);
    if r.converged {
        r.engine_total_ms = last["total-time"].as_f64().unwrap_or(0.0);
        r.downtime_ms = last["downtime"].as_f64();
        if variant.post_copy() && !postcopy_started {
            r.mode = format!("{} (completed in pre-copy)", variant.name());
        }
        read_until(
            &mut dst.console,
            done + after(s),
            after(s) + Duration::from_secs(10),
        );
    } else {
        r.engine_total_ms = start.elapsed().as_secs_f64() * 1000.0;
        read_until(
            &mut src.console,
            done + after(s),
            after(s) + Duration::from_secs(5),
        );
    }
    drain(
        &mut src.console,
        Duration::from_millis(200),
        Duration::from_secs(2),
    );
    r.wire_bytes = t.wire_bytes()?.saturating_sub(wire_before);
    r.measure(src.console.lines(), dst.console.lines(), start, done);
    Ok(r)
}
