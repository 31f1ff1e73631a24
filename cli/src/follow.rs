//! `migrate --follow`: a progress bar from `VMMigration.status.progress`,
//! then the result table.
//!
//! The migration is watched (kube's watcher on `metadata.name`, which lists
//! once and then streams each change, re-listing after a dropped watch), so
//! every status the agents write is shown as it is written, with no
//! polling. On a terminal the bar redraws one line; otherwise (a pipe, a
//! log) each change prints a line of its own, so what a user saw can be
//! read back.

use std::io::{IsTerminal, Write};

use futures::StreamExt;
use godwit_crds::{MigrationPhase, MigrationProgress, MigrationResult, VMMigration};
use kube::api::Api;
use kube::runtime::watcher::{self, Event};

use crate::CliError;

/// Follows migration `name` until it ends; an error unless it succeeded.
pub async fn follow(api: &Api<VMMigration>, name: &str) -> Result<(), CliError> {
    let tty = std::io::stdout().is_terminal();
    let mut last = String::new();
    let mut out = std::io::stdout();
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher::watcher(api.clone(), config).boxed();
    // Whether the initial list showed the migration (a re-list without it
    // means it was deleted).
    let mut listed = false;
    while let Some(event) = events.next().await {
        let m = match event {
            Ok(Event::Apply(m) | Event::InitApply(m)) => {
                listed = true;
                m
            }
            Ok(Event::Delete(_)) => return Err(deleted(name)),
            Ok(Event::Init) => {
                listed = false;
                continue;
            }
            Ok(Event::InitDone) if !listed => return Err(deleted(name)),
            Ok(Event::InitDone) => continue,
            Err(e) => {
                return Err(CliError::Watch(format!(
                "watching VMMigration {name:?} failed: {e}; see it with `kubectl get gvmm {name}`"
            )))
            }
        };
        let status = m.status.clone().unwrap_or_default();
        let line = match &status.progress {
            Some(p) if !status.phase.is_final() => progress_line(status.phase, p),
            _ => format!("{:?}", status.phase),
        };
        if line != last && !status.phase.is_final() {
            if tty {
                let _ = write!(out, "\r\x1b[2K{line}");
            } else {
                let _ = writeln!(out, "{line}");
            }
            let _ = out.flush();
            last = line;
        }
        if status.phase.is_final() {
            if tty {
                let _ = writeln!(out);
            }
            let from = status.source_node.as_deref().unwrap_or("?");
            let to = status.target_node.as_deref().unwrap_or("?");
            let _ = write!(
                out,
                "{}",
                result_table(status.phase, from, to, status.result.as_ref())
            );
            let _ = out.flush();
            if status.phase == MigrationPhase::Succeeded {
                return Ok(());
            }
            return Err(CliError::MigrationEnded {
                name: name.into(),
                phase: status.phase,
                reason: status
                    .failure_reason
                    .unwrap_or_else(|| "no reason given; see `kubectl describe gvmm`".into()),
            });
        }
    }
    Err(deleted(name))
}

fn deleted(name: &str) -> CliError {
    CliError::MigrationEnded {
        name: name.into(),
        phase: MigrationPhase::Cancelled,
        reason: "the VMMigration was deleted".into(),
    }
}

/// Bytes in binary units, one decimal.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Seconds left at the measured bandwidth, when there is one.
pub fn eta_seconds(p: &MigrationProgress) -> Option<u64> {
    let remaining = p.memory_remaining_bytes + p.disk_remaining_bytes;
    (p.bandwidth_bytes_per_second > 0).then(|| remaining.div_ceil(p.bandwidth_bytes_per_second))
}

/// One progress line: bar, percent, bytes copied of total (what is left is
/// what the guest dirtied since), bytes sent (rounds resend), round, dirty rate,
/// expected downtime, ETA and phase.
pub fn progress_line(phase: MigrationPhase, p: &MigrationProgress) -> String {
    const WIDTH: u64 = 24;
    let total = p.memory_total_bytes + p.disk_total_bytes;
    let remaining = (p.memory_remaining_bytes + p.disk_remaining_bytes).min(total);
    let done = total - remaining;
    let percent = (done * 100).checked_div(total).unwrap_or(0);
    let filled = (done * WIDTH).checked_div(total).unwrap_or(0) as usize;
    let bar = format!(
        "{}{}",
        "#".repeat(filled),
        "-".repeat(WIDTH as usize - filled)
    );
    let eta = eta_seconds(p).map_or("?".into(), |s| format!("{s}s"));
    format!(
        "[{bar}] {percent:>3}%  {} of {} copied, {} sent  round {}  dirty {}/s  downtime ~{} ms  ETA {eta}  {phase:?}",
        bytes(done),
        bytes(total),
        bytes(p.transferred_bytes),
        p.round,
        bytes(p.dirty_rate_bytes_per_second),
        p.expected_downtime_ms,
    )
}

/// The table printed when a migration ends.
pub fn result_table(
    phase: MigrationPhase,
    from: &str,
    to: &str,
    r: Option<&MigrationResult>,
) -> String {
    let mut rows = vec![
        ("Phase", format!("{phase:?}")),
        ("From", from.to_string()),
        ("To", to.to_string()),
    ];
    if let Some(r) = r {
        rows.push(("Mode", format!("{:?}", r.mode_used)));
        rows.push(("Total", format!("{} ms", r.total_time_ms)));
        rows.push(("Downtime", format!("{} ms", r.downtime_ms)));
        rows.push((
            "Bytes",
            format!("{} ({})", bytes(r.transferred_bytes), r.transferred_bytes),
        ));
        rows.push(("Rounds", r.rounds.to_string()));
    }
    let mut out = String::new();
    for (k, v) in rows {
        out.push_str(&format!("{k:<10}{v}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use godwit_crds::MigrationModeUsed;

    #[test]
    fn progress_line_shows_every_figure() {
        let p = MigrationProgress {
            round: 3,
            memory_total_bytes: 256 << 20,
            memory_remaining_bytes: 64 << 20,
            transferred_bytes: 200 << 20,
            dirty_rate_bytes_per_second: 12 << 20,
            bandwidth_bytes_per_second: 32 << 20,
            expected_downtime_ms: 2000,
            ..Default::default()
        };
        let line = progress_line(MigrationPhase::PreCopy, &p);
        assert_eq!(
            line,
            "[##################------]  75%  192.0 MiB of 256.0 MiB copied, 200.0 MiB sent  round 3  dirty 12.0 MiB/s  downtime ~2000 ms  ETA 2s  PreCopy"
        );
        // Nothing known yet: no division by zero.
        let empty = progress_line(MigrationPhase::PreCopy, &MigrationProgress::default());
        assert!(empty.contains("  0%") && empty.contains("ETA ?"), "{empty}");
    }

    #[test]
    fn result_table_rows() {
        let r = MigrationResult {
            total_time_ms: 1500,
            downtime_ms: 12,
            transferred_bytes: 3 << 20,
            rounds: 4,
            mode_used: MigrationModeUsed::PreCopy,
        };
        let t = result_table(MigrationPhase::Succeeded, "node-0", "node-1", Some(&r));
        assert_eq!(
            t,
            "Phase     Succeeded\nFrom      node-0\nTo        node-1\nMode      PreCopy\nTotal     1500 ms\nDowntime  12 ms\nBytes     3.0 MiB (3145728)\nRounds    4\n"
        );
        assert_eq!(bytes(512), "512 B");
    }
}
