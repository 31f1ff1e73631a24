//! What one run measured ([`RunResult`]) and what a cell of repeated runs
//! sums up to ([`Cell`]: the median, min and max of each figure), as JSON
//! lines or table rows.

use std::collections::BTreeMap;
use std::time::Instant;

use godwit_testkit::guest::Line;
use serde_json::{json, Value};

use super::figures::{missing_heartbeats, observed_pause, switch_over, work_lost};
use super::scenario::Scenario;
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
    /// From the start command until the target's heartbeat was the only one
    /// and the engine said it was done, seen from outside (ms); until the
    /// migration was cancelled when it did not converge.
    pub total_ms: f64,
    /// The engine's own total time (ms).
    pub engine_total_ms: f64,
    /// Engine-reported downtime (ms); `None` when not converged.
    pub downtime_ms: Option<f64>,
    /// Largest heartbeat gap seen by the host minus the period (ms).
    pub observed_pause_ms: Option<f64>,
    /// Bytes on the wire, both directions, from the veth's counters.
    pub wire_bytes: u64,
    /// Bytes the engine says it sent.
    pub bytes_sent: u64,
    /// Seconds of full-speed guest work lost ([`super::figures::work_lost`]);
    /// `None` for an idle guest.
    pub work_lost_s: Option<f64>,
    /// Whether the guest's write rate came back to 90% within the run.
    pub work_recovered: bool,
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
            engine_total_ms: 0.0,
            downtime_ms: None,
            observed_pause_ms: None,
            wire_bytes: 0,
            bytes_sent: 0,
            work_lost_s: None,
            work_recovered: false,
            rounds: 0,
            mode: String::new(),
            hb_missing: 0,
            breakdown: None,
            error: None,
        }
    }

    /// Fills in the figures seen from outside: `src` and `dst` are the two
    /// consoles' lines, `start` when the migration was asked for, `done`
    /// when the engine was seen to finish (or the run gave up).
    pub(super) fn measure(&mut self, src: &[Line], dst: &[Line], start: Instant, done: Instant) {
        if let Some(dir) = std::env::var_os("GODWIT_BENCH_LINES") {
            self.dump(std::path::Path::new(&dir), src, dst, start, done);
        }
        let all: Vec<&Line> = src.iter().chain(dst.iter()).collect();
        let end = match switch_over(src, dst, start).filter(|_| self.converged) {
            Some(switch) => switch.max(done),
            None => done,
        };
        self.total_ms = end.saturating_duration_since(start).as_secs_f64() * 1000.0;
        self.observed_pause_ms = observed_pause(&all, start);
        self.hb_missing = missing_heartbeats(&all, start);
        if let Some(lost) = work_lost(&all, start, end) {
            self.work_lost_s = Some(lost.seconds);
            self.work_recovered = lost.recovered;
        }
    }

    /// Writes both consoles' lines, timed in ms from `start`, to a file in
    /// `dir` (`GODWIT_BENCH_LINES=DIR`: to look at what a figure came from).
    fn dump(
        &self,
        dir: &std::path::Path,
        src: &[Line],
        dst: &[Line],
        start: Instant,
        done: Instant,
    ) {
        let ms = |t: Instant| {
            if t >= start {
                t.duration_since(start).as_secs_f64() * 1000.0
            } else {
                -(start.duration_since(t).as_secs_f64() * 1000.0)
            }
        };
        let mut text = format!("# done at {:.3} ms\n", ms(done));
        for (side, lines) in [("src", src), ("dst", dst)] {
            for l in lines {
                text.push_str(&format!("{:.3} {side} {}\n", ms(l.at), l.text));
            }
        }
        let name = format!(
            "{}-{}-{}-{}-{}.txt",
            self.engine,
            self.mode.replace(' ', "_"),
            self.scenario,
            self.link,
            std::process::id() as u128 * 1_000_000 + start.elapsed().as_micros()
        );
        let _ = std::fs::create_dir_all(dir);
        let _ = std::fs::write(dir.join(name), text);
    }

    /// One JSON line (`"bench": "migrate-run"`).
    pub fn to_json_line(&self) -> String {
        let r1 = |v: f64| (v * 10.0).round() / 10.0;
        let mut fields: Vec<(&str, Value)> = vec![
            ("bench", json!("migrate-run")),
            ("engine", json!(self.engine)),
            ("config", json!(self.config)),
            ("scenario", json!(self.scenario)),
            ("link", json!(self.link)),
            ("converged", json!(self.converged)),
            ("mode", json!(self.mode)),
            ("observed_pause_ms", json!(self.observed_pause_ms.map(r1))),
            ("total_ms", json!(r1(self.total_ms))),
            ("bytes_wire", json!(self.wire_bytes)),
            (
                "work_lost_s",
                json!(self.work_lost_s.map(|s| (s * 1000.0).round() / 1000.0)),
            ),
            ("work_recovered", json!(self.work_recovered)),
            ("engine_total_ms", json!(r1(self.engine_total_ms))),
            ("downtime_ms", json!(self.downtime_ms.map(r1))),
            ("bytes_sent", json!(self.bytes_sent)),
            ("rounds", json!(self.rounds)),
            ("hb_missing", json!(self.hb_missing)),
        ];
        if let Some(b) = &self.breakdown {
            fields.push(("downtime_breakdown", b.clone()));
        }
        if let Some(e) = &self.error {
            fields.push(("error", json!(e)));
        }
        ordered_json(&fields)
    }
}

/// A JSON object with its keys in the given order (whatever serde_json's
/// map ordering).
fn ordered_json(fields: &[(&str, Value)]) -> String {
    let body: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("{}:{v}", json!(k)))
        .collect();
    format!("{{{}}}", body.join(","))
}

/// The median, min and max of a figure over a cell's runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

/// The spread of `values`; `None` when there are none.
pub fn spread(values: &[f64]) -> Option<Spread> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Spread {
        median,
        min: v[0],
        max: v[n - 1],
    })
}

/// One engine and configuration on one scenario and link: its runs.
#[derive(Clone, Debug)]
pub struct Cell {
    pub engine: &'static str,
    pub config: &'static str,
    pub scenario: &'static str,
    pub link: &'static str,
    /// QEMU best: the variant that won.
    pub variant: Option<String>,
    pub runs: Vec<RunResult>,
}

/// The figures a cell sums up, in the order they are reported.
const FIGURES: [&str; 8] = [
    "observed_pause_ms",
    "total_ms",
    "bytes_wire",
    "work_lost_s",
    "engine_total_ms",
    "downtime_ms",
    "bytes_sent",
    "rounds",
];

impl Cell {
    /// Runs that converged.
    pub fn converged(&self) -> usize {
        self.runs.iter().filter(|r| r.converged).count()
    }

    /// The spread of `figure` over the converged runs (over all of them
    /// when none converged).
    pub fn figure(&self, figure: &str) -> Option<Spread> {
        let pick = |r: &RunResult| -> Option<f64> {
            match figure {
                "observed_pause_ms" => r.observed_pause_ms,
                "total_ms" => Some(r.total_ms),
                "bytes_wire" => Some(r.wire_bytes as f64),
                "work_lost_s" => r.work_lost_s,
                "engine_total_ms" => Some(r.engine_total_ms),
                "downtime_ms" => r.downtime_ms,
                "bytes_sent" => Some(r.bytes_sent as f64),
                "rounds" => Some(r.rounds as f64),
                _ => None,
            }
        };
        let any = self.converged() > 0;
        let values: Vec<f64> = self
            .runs
            .iter()
            .filter(|r| r.converged || !any)
            .filter_map(pick)
            .collect();
        spread(&values)
    }

    /// How the runs went, by mode (the engine's words), with errors apart.
    fn modes(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for r in &self.runs {
            let key = if r.error.is_some() && !r.converged {
                "failed".to_string()
            } else {
                r.mode.clone()
            };
            *m.entry(key).or_insert(0) += 1;
        }
        m
    }

    /// Better for QEMU best: more runs converged, then the lower median
    /// observed pause, then the less work lost.
    pub fn better_than(&self, other: &Cell) -> bool {
        let key = |c: &Cell| {
            (
                std::cmp::Reverse(c.converged()),
                c.figure("observed_pause_ms").map_or(f64::MAX, |s| s.median),
                c.figure("work_lost_s").map_or(f64::MAX, |s| s.median),
            )
        };
        let (a, b) = (key(self), key(other));
        a.0.cmp(&b.0)
            .then(a.1.total_cmp(&b.1))
            .then(a.2.total_cmp(&b.2))
            .is_lt()
    }

    /// The JSON line (`"bench": "migrate"`): the cell, then each figure as
    /// `{"median", "min", "max"}` (null when no run had it).
    pub fn to_json_line(&self) -> String {
        let round = |x: f64| (x * 1000.0).round() / 1000.0;
        let mut fields: Vec<(&str, Value)> = vec![
            ("bench", json!("migrate")),
            ("engine", json!(self.engine)),
            ("config", json!(self.config)),
            ("scenario", json!(self.scenario)),
            ("link", json!(self.link)),
            ("variant", json!(self.variant)),
            ("runs", json!(self.runs.len())),
            // True only when every run converged; how many did follows.
            ("converged", json!(self.converged() == self.runs.len())),
            ("converged_runs", json!(self.converged())),
        ];
        for f in FIGURES {
            let v = self.figure(f).map(
                |s| json!({"median": round(s.median), "min": round(s.min), "max": round(s.max)}),
            );
            fields.push((f, v.unwrap_or(Value::Null)));
        }
        fields.push(("modes", json!(self.modes())));
        let errors: Vec<&String> = self.runs.iter().filter_map(|r| r.error.as_ref()).collect();
        if !errors.is_empty() {
            fields.push(("errors", json!(errors)));
        }
        ordered_json(&fields)
    }

    /// The table header.
    pub fn header() -> String {
        format!(
            "{:<7} {:<8} {:<13} {:<9} {:>5} {:>21} {:>9} {:>9} {:>8}  variant / modes",
            "engine",
            "config",
            "scenario",
            "link",
            "conv",
            "pause_ms med [min-max]",
            "total_ms",
            "wire_MB",
            "lost_s"
        )
    }

    /// One table row (medians; the pause with its range).
    pub fn row(&self) -> String {
        let med = |f: &str, scale: f64, digits: usize| {
            self.figure(f)
                .map(|s| format!("{:.*}", digits, s.median / scale))
                .unwrap_or_else(|| "-".into())
        };
        let pause = self
            .figure("observed_pause_ms")
            .map(|s| format!("{:.1} [{:.1}-{:.1}]", s.median, s.min, s.max))
            .unwrap_or_else(|| "-".into());
        let modes: Vec<String> = self
            .modes()
            .into_iter()
            .map(|(m, n)| format!("{m}x{n}"))
            .collect();
        let variant = self
            .variant
            .as_ref()
            .map(|v| format!("{v}: "))
            .unwrap_or_default();
        format!(
            "{:<7} {:<8} {:<13} {:<9} {:>5} {:>21} {:>9} {:>9} {:>8}  {variant}{}",
            self.engine,
            self.config,
            self.scenario,
            self.link,
            format!("{}/{}", self.converged(), self.runs.len()),
            pause,
            med("total_ms", 1.0, 0),
            med("bytes_wire", 1e6, 1),
            med("work_lost_s", 1.0, 3),
            modes.join(" ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::migrate::scenario::SCENARIOS;

    fn run(pause: f64, converged: bool) -> RunResult {
        let mut r = RunResult::new("qemu", "best", &SCENARIOS[1], Link::Gbit);
        r.converged = converged;
        r.observed_pause_ms = Some(pause);
        r.mode = "postcopy".into();
        r
    }

    #[test]
    fn spread_is_the_median_min_and_max() {
        let s = spread(&[5.0, 1.0, 3.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (3.0, 1.0, 5.0));
        assert_eq!(spread(&[4.0, 1.0, 2.0, 3.0]).unwrap().median, 2.5);
        assert_eq!(spread(&[]), None);
    }

    #[test]
    fn a_cell_sums_up_its_converged_runs_and_ranks_convergence_first() {
        let cell = |runs| Cell {
            engine: "qemu",
            config: "best",
            scenario: "dirty64m-1g",
            link: "1gbit",
            variant: Some("postcopy".into()),
            runs,
        };
        let a = cell(vec![run(10.0, true), run(30.0, true), run(1000.0, false)]);
        assert_eq!(a.converged(), 2);
        assert_eq!(a.figure("observed_pause_ms").unwrap().median, 20.0);
        let b = cell(vec![run(50.0, true), run(60.0, true), run(70.0, true)]);
        assert!(b.better_than(&a), "three converged beat two");
        let c = cell(vec![run(5.0, true), run(6.0, true), run(7.0, true)]);
        assert!(c.better_than(&b) && !b.better_than(&c));
        let text = a.to_json_line();
        let v: Value = serde_json::from_str(&text).unwrap();
        assert!(
            text.starts_with(r#"{"bench":"migrate","engine":"qemu","config":"best","scenario":"dirty64m-1g","link":"1gbit","variant":"postcopy","runs":3,"converged":false,"converged_runs":2,"observed_pause_ms":{"#),
            "{text}"
        );
        assert_eq!(v["observed_pause_ms"]["max"], 30.0);
        assert_eq!(v["work_lost_s"], Value::Null);
        assert_eq!(v["modes"]["postcopy"], 3);
    }

    #[test]
    fn run_lines_carry_the_outside_figures_first() {
        let text = run(12.0, true).to_json_line();
        let v: Value = serde_json::from_str(&text).unwrap();
        assert!(text.starts_with(
            r#"{"bench":"migrate-run","engine":"qemu","config":"best","scenario":"dirty64m-1g","link":"1gbit","converged":true,"mode":"postcopy","observed_pause_ms":12.0,"total_ms":"#
        ), "{text}");
        assert_eq!(v["bytes_wire"], 0);
        assert_eq!(v["work_lost_s"], Value::Null);
    }
}
