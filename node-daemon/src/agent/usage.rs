//! Measured usage: every [`USAGE_PERIOD_SECONDS`] the agent reads what each
//! VMM on the node uses (every process of its group), CPU time (`utime + stime` of `/proc/<pid>/stat`,
//! as a delta over the period) and resident memory (`VmRSS` of
//! `/proc/<pid>/status`), and publishes it in its node's `GodwitNode` as
//! `status.usage` ([`NodeUsage`]) for the operator's DRS balancer.
//!
//! The parsing and the arithmetic are pure functions; [`run`] only reads the
//! files and writes the status.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use godwit_crds::contract::{NodeUsage, VmUsage, USAGE_PERIOD_SECONDS};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use serde_json::json;

use super::vm_dir::VmDir;

/// CPU time (user + system, all threads) in clock ticks, from the text of
/// `/proc/<pid>/stat`.
pub fn cpu_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces and parentheses: count the
    // fields after its closing parenthesis. utime and stime are fields 14
    // and 15, so the 12th and 13th after it.
    let (_, rest) = stat.rsplit_once(") ")?;
    let mut fields = rest.split_ascii_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The process group, from the text of `/proc/<pid>/stat` (field 5).
pub fn process_group(stat: &str) -> Option<i32> {
    let (_, rest) = stat.rsplit_once(") ")?;
    rest.split_ascii_whitespace().nth(2)?.parse().ok()
}

/// Resident memory in bytes, from the text of `/proc/<pid>/status`.
pub fn rss_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line
        .trim_start_matches("VmRSS:")
        .split_ascii_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Thousandths of a CPU used: `ticks` of CPU time over `elapsed`.
pub fn cpu_millis(ticks: u64, ticks_per_second: u64, elapsed: Duration) -> u64 {
    let elapsed_ms = elapsed.as_millis().max(1) as u64;
    ticks * 1000 * 1000 / ticks_per_second.max(1) / elapsed_ms
}

/// One reading of a VMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    /// The VMM's pid (a new pid is a new process: no delta).
    pub pid: i32,
    /// CPU ticks so far.
    pub ticks: u64,
    /// Resident memory.
    pub rss: u64,
}

/// The usage between two readings. A VM without an earlier reading of the
/// same process counts its memory and no CPU yet.
pub fn usage(
    before: &HashMap<String, Sample>,
    now: &HashMap<String, Sample>,
    ticks_per_second: u64,
    elapsed: Duration,
    time: Timestamp,
) -> NodeUsage {
    let mut vms = BTreeMap::new();
    for (key, s) in now {
        let cpu = before
            .get(key)
            .filter(|b| b.pid == s.pid)
            .map(|b| cpu_millis(s.ticks.saturating_sub(b.ticks), ticks_per_second, elapsed))
            .unwrap_or(0);
        vms.insert(
            key.clone(),
            VmUsage {
                cpu_millis: cpu,
                rss_bytes: s.rss,
            },
        );
    }
    NodeUsage {
        time: time.to_string(),
        period_ms: elapsed.as_millis() as u64,
        cpu_millis: vms.values().map(|v| v.cpu_millis).sum(),
        rss_bytes: vms.values().map(|v| v.rss_bytes).sum(),
        vms,
    }
}

/// CPU ticks and resident bytes of every process in group `pgid` (the VM
/// directory's pid is the `sh` that runs the VMM in its own session, so the
/// VMM is a member of that group, not the pid itself).
fn group_usage(pgid: i32) -> Option<(u64, u64)> {
    let mut found = None;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if process_group(&stat) != Some(pgid) {
            continue;
        }
        let ticks = cpu_ticks(&stat).unwrap_or(0);
        let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .as_deref()
            .and_then(rss_bytes)
            .unwrap_or(0);
        let (t, r) = found.unwrap_or((0, 0));
        found = Some((t + ticks, r + rss));
    }
    found
}

fn sample_all(state_dir: &Path, shared_dir: &Path) -> HashMap<String, Sample> {
    let mut out = HashMap::new();
    for dir in VmDir::scan(state_dir, shared_dir) {
        let state = dir.state();
        let Some(pid) = state.pid.filter(|_| state.alive) else {
            continue;
        };
        if let Some((ticks, rss)) = group_usage(pid) {
            out.insert(
                format!("{}/{}", dir.namespace, dir.name),
                Sample { pid, ticks, rss },
            );
        }
    }
    out
}

/// Publishes the node's usage, and the template images its cache holds, in
/// its GodwitNode in `namespace` every [`USAGE_PERIOD_SECONDS`] until dropped.
pub async fn run(
    client: Client,
    node: String,
    namespace: String,
    state_dir: PathBuf,
    shared_dir: PathBuf,
) {
    // SAFETY: sysconf only reads a configuration value.
    let ticks_per_second = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
        .ok()
        .filter(|t| *t > 0)
        .unwrap_or(100);
    let (mut before, mut at) = (HashMap::new(), Instant::now());
    loop {
        tokio::time::sleep(Duration::from_secs(USAGE_PERIOD_SECONDS)).await;
        let (s, d) = (state_dir.clone(), shared_dir.clone());
        let Ok((now, images)) = tokio::task::spawn_blocking(move || {
            let images = super::disks::cached_images(&s.join("cache"));
            (sample_all(&s, &d), images)
        })
        .await
        else {
            continue;
        };
        let elapsed = at.elapsed();
        let report = usage(&before, &now, ticks_per_second, elapsed, Timestamp::now());
        (before, at) = (now, Instant::now());
        // The template images cached here ride along: the operator makes
        // each VMTemplate's status from them.
        let status = json!({"usage": report, "cachedImages": images});
        let written =
            super::godwit_node::apply_status(&client, &namespace, &node, "usage", status).await;
        if let Err(e) = written {
            tracing::debug!(error = %e, "cannot publish usage in GodwitNode {node}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_read_past_an_awkward_command_name() {
        let stat = "4242 (godwit vmm (x)) S 1 4242 4242 0 -1 4194560 500 0 0 0 1234 567 0 0 20 0 3 0 100 0 0";
        assert_eq!(cpu_ticks(stat), Some(1234 + 567));
        assert_eq!(process_group(stat), Some(4242));
        assert_eq!(cpu_ticks("garbage"), None);
        // This very process.
        let own = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert!(cpu_ticks(&own).is_some(), "{own}");
        let pgid = process_group(&own).unwrap();
        let (ticks, rss) = group_usage(pgid).expect("this process is in its group");
        assert!(
            rss > 0 && ticks >= cpu_ticks(&own).unwrap(),
            "{ticks} {rss}"
        );
    }

    #[test]
    fn rss_is_read_in_bytes() {
        let status = "Name:\tgodwit-vmm\nVmPeak:\t  300000 kB\nVmRSS:\t  204800 kB\nThreads:\t3\n";
        assert_eq!(rss_bytes(status), Some(200 << 20));
        assert_eq!(rss_bytes("Name: x\n"), None);
        let own = std::fs::read_to_string("/proc/self/status").unwrap();
        assert!(rss_bytes(&own).unwrap() > 0);
    }

    #[test]
    fn usage_is_the_delta_of_the_same_process() {
        let s = |pid, ticks, rss| Sample { pid, ticks, rss };
        let before: HashMap<String, Sample> = [
            ("default/busy".to_string(), s(10, 1000, 1 << 20)),
            ("default/restarted".to_string(), s(11, 5000, 1 << 20)),
        ]
        .into();
        let now: HashMap<String, Sample> = [
            // 500 ticks at 100/s over 5 s: one whole CPU.
            ("default/busy".to_string(), s(10, 1500, 2 << 20)),
            ("default/restarted".to_string(), s(12, 10, 1 << 20)),
            ("default/new".to_string(), s(13, 10, 3 << 20)),
        ]
        .into();
        let t = Timestamp::from_second(1_700_000_000).unwrap();
        let u = usage(&before, &now, 100, Duration::from_secs(5), t);
        assert_eq!(u.vms["default/busy"].cpu_millis, 1000);
        assert_eq!(u.vms["default/restarted"].cpu_millis, 0, "a new process");
        assert_eq!(u.vms["default/new"].cpu_millis, 0);
        assert_eq!(u.cpu_millis, 1000);
        assert_eq!(u.rss_bytes, 6 << 20);
        assert_eq!(u.period_ms, 5000);
        let json = serde_json::to_string(&u).unwrap();
        assert!(
            json.contains(r#""default/busy":{"cpuMillis":1000,"rssBytes":2097152}"#),
            "{json}"
        );
    }
}
