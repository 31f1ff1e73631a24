//! What one run measured ([`RunResult`]), as a JSON line or a table row,
//! and the figures read off the guest's heartbeats on both consoles.

use std::collections::BTreeMap;
use std::time::Instant;

use godwit_testkit::guest::{parse_heartbeat, Line};
use serde_json::{json, Value};

use super::scenario::{Scenario, HB_MS};
use super::topology::Link;

/// One migration's figures.
#[derive(Clone, Debug)]
pub struct RunResult {
    /// `godwit` or `qemu`.
    pub engine: &'static str,
    /// `default` or `best`.
    pub config: &'static str,
    /// Scenario name.
    pub scenario: &'static str,
    /// `unlimited` or `1gbit`.
    pub link: &'static str,
    /// Whether the migration completed within the timeout.
    pub converged: bool,
    /// Engine-reported total time (ms); elapsed time when not converged.
    pub total_ms: f64,
    /// Engine-reported downtime (ms); `None` when not converged.
    pub downtime_ms: Option<f64>,
    /// Largest heartbeat gap seen by the host minus the period (ms).
    pub observed_pause_ms: Option<f64>,
    /// Bytes the engine sent.
    pub bytes_sent: u64,
    /// Pre-copy rounds (QEMU: dirty-sync-count).
    pub rounds: u64,
    /// How it converged (engine's words), or the variant tried.
    pub mode: String,
    /// Heartbeat counters never seen on either console during the run.
    pub hb_missing: u64,
    /// Our engine's downtime breakdown, as reported.
    pub breakdown: Option<Value>,
    /// Why a run failed, if it did.
    pub error: Option<String>,
}

impl RunResult {
    pub(super) fn new(
        engine: &'static str,
        config: &'static str,
        s: &Scenario,
        link: Link,
    ) -> RunResult {
        RunResult {
            engine,
            config,
            scenario: s.name,
            link: link.name(),
            converged: false,
            total_ms: 0.0,
            downtime_ms: None,
            observed_pause_ms: None,
            bytes_sent: 0,
            rounds: 0,
            mode: String::new(),
            hb_missing: 0,
            breakdown: None,
            error: None,
        }
    }

    /// The JSON line: the required fields first, in the documented order
    /// (whatever serde_json's map ordering), then the extras.
    pub fn to_json_line(&self) -> String {
        let r1 = |v: f64| (v * 10.0).round() / 10.0;
        let mut fields: Vec<(&str, Value)> = vec![
            ("bench", json!("migrate")),
            ("engine", json!(self.engine)),
            ("config", json!(self.config)),
            ("scenario", json!(self.scenario)),
            ("link", json!(self.link)),
            ("converged", json!(self.converged)),
            ("total_ms", json!(r1(self.total_ms))),
            ("downtime_ms", json!(self.downtime_ms.map(r1))),
            ("observed_pause_ms", json!(self.observed_pause_ms.map(r1))),
            ("bytes_sent", json!(self.bytes_sent)),
            ("rounds", json!(self.rounds)),
            ("mode", json!(self.mode)),
            ("hb_missing", json!(self.hb_missing)),
        ];
        if let Some(b) = &self.breakdown {
            fields.push(("downtime_breakdown", b.clone()));
        }
        if let Some(e) = &self.error {
            fields.push(("error", json!(e)));
        }
        let body: Vec<String> = fields
            .iter()
            .map(|(k, v)| format!("{}:{v}", json!(k)))
            .collect();
        format!("{{{}}}", body.join(","))
    }

    /// The table header.
    pub fn header() -> String {
        format!(
            "{:<7} {:<8} {:<13} {:<9} {:>5} {:>9} {:>9} {:>9} {:>12} {:>6} {:>5}  mode",
            "engine",
            "config",
            "scenario",
            "link",
            "conv",
            "total_ms",
            "down_ms",
            "pause_ms",
            "bytes",
            "rounds",
            "hbmis"
        )
    }

    /// One table row.
    pub fn row(&self) -> String {
        let opt = |v: Option<f64>| v.map(|x| format!("{x:.1}")).unwrap_or_else(|| "-".into());
        let mut mode = self.mode.clone();
        if let Some(e) = &self.error {
            mode.push_str(&format!(" error: {e}"));
        }
        format!(
            "{:<7} {:<8} {:<13} {:<9} {:>5} {:>9.1} {:>9} {:>9} {:>12} {:>6} {:>5}  {}",
            self.engine,
            self.config,
            self.scenario,
            self.link,
            if self.converged { "yes" } else { "no" },
            self.total_ms,
            opt(self.downtime_ms),
            opt(self.observed_pause_ms),
            self.bytes_sent,
            self.rounds,
            self.hb_missing,
            mode
        )
    }
}

/// The largest gap between consecutive heartbeats (ordered and deduplicated
/// by counter, timed by host arrival) from `since` on, minus the period.
pub fn observed_pause(lines: &[&Line], since: Instant) -> Option<f64> {
    let mut by_counter: BTreeMap<u64, Instant> = BTreeMap::new();
    for l in lines {
        if l.at < since {
            continue;
        }
        if let Some(hb) = parse_heartbeat(&l.text) {
            let e = by_counter.entry(hb.counter).or_insert(l.at);
            if l.at < *e {
                *e = l.at;
            }
        }
    }
    let times: Vec<Instant> = by_counter.into_values().collect();
    if times.len() < 2 {
        return None;
    }
    let max = times
        .windows(2)
        .map(|w| w[1].saturating_duration_since(w[0]))
        .max()?;
    Some((max.as_secs_f64() * 1000.0 - HB_MS as f64).max(0.0))
}

/// Heartbeat counters missing (holes between the first and the last
/// counter seen from `since` on, across both consoles): a line lost, for
/// instance before the target's console was attached, widens the gap.
pub fn missing_heartbeats(lines: &[&Line], since: Instant) -> u64 {
    let seen: std::collections::BTreeSet<u64> = lines
        .iter()
        .filter(|l| l.at >= since)
        .filter_map(|l| parse_heartbeat(&l.text).map(|h| h.counter))
        .collect();
    match (seen.first(), seen.last()) {
        (Some(a), Some(b)) => (b - a + 1) - seen.len() as u64,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::migrate::scenario::SCENARIOS;
    use std::time::Duration;

    fn line(text: &str, at: Instant) -> Line {
        Line {
            text: text.into(),
            at,
        }
    }

    #[test]
    fn pause_is_the_largest_gap_across_both_consoles_minus_the_period() {
        let t0 = Instant::now();
        let ms = |m: u64| t0 + Duration::from_millis(m);
        let src = [
            line("HB 1 0", ms(0)),
            line("HB 2 0", ms(2)),
            line("HB 3 0", ms(4)),
            line("HB", ms(5)),
        ];
        let dst = [
            line("4 0", ms(40)),
            line("HB 4 0", ms(44)),
            line("HB 5 0", ms(46)),
        ];
        let all: Vec<&Line> = src.iter().chain(dst.iter()).collect();
        let p = observed_pause(&all, t0).unwrap();
        assert!((p - 38.0).abs() < 0.01, "{p}");
        // Heartbeats before the start are ignored; one heartbeat is no gap.
        assert_eq!(observed_pause(&all, ms(45)), None);
    }

    #[test]
    fn json_lines_carry_the_required_fields_in_order() {
        let r = RunResult::new("qemu", "best", &SCENARIOS[1], Link::Gbit);
        let text = r.to_json_line();
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["rounds"], 0);
        assert!(text.starts_with(
            r#"{"bench":"migrate","engine":"qemu","config":"best","scenario":"dirty64m-1g","link":"1gbit","converged":false,"total_ms":"#
        ), "{text}");
        for k in ["downtime_ms", "observed_pause_ms", "bytes_sent", "rounds"] {
            assert!(text.contains(&format!("\"{k}\":")), "{text}");
        }
    }
}
