//! The figures read off the guest's heartbeats as the host received them,
//! the same for both engines: the observed pause, the heartbeats lost, when
//! the target's heartbeat became the only one, and the work the guest lost.
//!
//! Every heartbeat line is `HB <counter> <guest_ns> <written>`, `written`
//! being the pages the guest's memory workload has written since boot. Lines
//! are timed by their arrival at the host (the console reader's clock), and
//! a counter seen on both consoles counts once, at its first arrival.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use godwit_testkit::guest::{parse_heartbeat, Line};

use super::scenario::HB_MS;

/// The write rate before the migration is measured over this much time
/// (the scenarios' warm-up runs the guest longer than this first).
pub const BASELINE: Duration = Duration::from_secs(1);
/// The rate counts as recovered once a window this long after the switch
/// runs at [`RECOVERED`] of the rate before.
pub const RECOVERY_WINDOW: Duration = Duration::from_millis(100);
/// Fraction of the rate before at which the guest counts as recovered.
pub const RECOVERED: f64 = 0.9;

/// One heartbeat as the host saw it first.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Beat {
    at: Instant,
    written: u64,
}

/// The heartbeats among `lines`, by counter, each at its first arrival.
fn beats(lines: &[&Line]) -> BTreeMap<u64, Beat> {
    let mut by_counter: BTreeMap<u64, Beat> = BTreeMap::new();
    for l in lines {
        if let Some(hb) = parse_heartbeat(&l.text) {
            let b = by_counter.entry(hb.counter).or_insert(Beat {
                at: l.at,
                written: hb.written,
            });
            if l.at < b.at {
                b.at = l.at;
            }
        }
    }
    by_counter
}

/// The largest gap between consecutive heartbeats (ordered and deduplicated
/// by counter, timed by host arrival) from `since` on, minus the period.
pub fn observed_pause(lines: &[&Line], since: Instant) -> Option<f64> {
    let times: Vec<Instant> = beats(lines)
        .into_values()
        .map(|b| b.at)
        .filter(|&at| at >= since)
        .collect();
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
    let seen: Vec<u64> = beats(lines)
        .into_iter()
        .filter(|(_, b)| b.at >= since)
        .map(|(c, _)| c)
        .collect();
    match (seen.first(), seen.last()) {
        (Some(a), Some(b)) => (b - a + 1) - seen.len() as u64,
        _ => 0,
    }
}

/// When the target's heartbeat became the only one: the first heartbeat on
/// the target's console after the last one on the source's (from `since`
/// on). `None` when the target printed none after the source stopped.
pub fn switch_over(src: &[Line], dst: &[Line], since: Instant) -> Option<Instant> {
    let is_beat = |l: &&Line| l.at >= since && parse_heartbeat(&l.text).is_some();
    let last_src = src.iter().filter(is_beat).map(|l| l.at).max();
    dst.iter()
        .filter(is_beat)
        .map(|l| l.at)
        .filter(|&at| last_src.is_none_or(|s| at > s))
        .min()
}

/// The guest's lost work, in seconds of its full-speed writing.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WorkLost {
    /// Seconds of work at the rate before the migration that the guest did
    /// not do between the migration's start and its recovery.
    pub seconds: f64,
    /// Whether its rate came back to [`RECOVERED`] within what was seen.
    pub recovered: bool,
}

/// The shortfall of the guest's writes against the rate it wrote at in the
/// [`BASELINE`] before `start`, integrated from `start` until the first
/// heartbeat at or after `end` (the migration over, seen from outside) from
/// which a [`RECOVERY_WINDOW`] runs at [`RECOVERED`] of that rate; or until
/// the last heartbeat, when it never does. `None` for a guest that wrote
/// nothing before (no workload).
pub fn work_lost(lines: &[&Line], start: Instant, end: Instant) -> Option<WorkLost> {
    // `written` never goes down: a beat whose count does is a line cut short
    // at the switch (the rest of it went to the other console).
    let mut most = 0;
    let beats: Vec<Beat> = beats(lines)
        .into_values()
        .filter(|b| {
            let keep = b.written >= most;
            most = most.max(b.written);
            keep
        })
        .collect();
    let before: Vec<&Beat> = beats
        .iter()
        .filter(|b| b.at < start && b.at + BASELINE >= start)
        .collect();
    let (first, last) = (before.first()?, before.last()?);
    let span = last.at.saturating_duration_since(first.at).as_secs_f64();
    let written = last.written.checked_sub(first.written)?;
    if span <= 0.0 || written == 0 {
        return None;
    }
    let rate = written as f64 / span;
    let after: Vec<&Beat> = beats.iter().filter(|b| b.at >= end).collect();
    let recovery = after.iter().enumerate().find_map(|(i, b)| {
        let w = after[i..].iter().find(|c| c.at >= b.at + RECOVERY_WINDOW)?;
        let secs = w.at.saturating_duration_since(b.at).as_secs_f64();
        let got = w.written.saturating_sub(b.written) as f64;
        (got >= RECOVERED * rate * secs).then_some(**b)
    });
    let (until, recovered) = match recovery {
        Some(b) => (b, true),
        None => (*beats.last()?, false),
    };
    let elapsed = until.at.saturating_duration_since(last.at).as_secs_f64();
    let done = until.written.saturating_sub(last.written) as f64;
    Some(WorkLost {
        seconds: ((rate * elapsed - done) / rate).max(0.0),
        recovered,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(text: String, at: Instant) -> Line {
        Line { text, at }
    }

    /// Heartbeats every 2 ms from `from_ms` to `to_ms` (host time after
    /// `t0`), counters from `counter`, `written` growing by `per_beat`.
    fn run(
        t0: Instant,
        counter: u64,
        from_ms: u64,
        to_ms: u64,
        written: u64,
        per_beat: u64,
    ) -> Vec<Line> {
        (0..)
            .map(|i| (i, from_ms + 2 * i))
            .take_while(|&(_, ms)| ms < to_ms)
            .map(|(i, ms)| {
                line(
                    format!("HB {} 0 {}", counter + i, written + per_beat * i),
                    t0 + Duration::from_millis(ms),
                )
            })
            .collect()
    }

    #[test]
    fn pause_is_the_largest_gap_across_both_consoles_minus_the_period() {
        let t0 = Instant::now();
        let ms = |m: u64| t0 + Duration::from_millis(m);
        let src = [
            line("HB 1 0".into(), ms(0)),
            line("HB 2 0".into(), ms(2)),
            line("HB 3 0".into(), ms(4)),
            line("HB".into(), ms(5)),
        ];
        let dst = [
            line("4 0".into(), ms(40)),
            line("HB 4 0".into(), ms(44)),
            line("HB 5 0".into(), ms(46)),
        ];
        let all: Vec<&Line> = src.iter().chain(dst.iter()).collect();
        let p = observed_pause(&all, t0).unwrap();
        assert!((p - 38.0).abs() < 0.01, "{p}");
        // Heartbeats before the start are ignored; one heartbeat is no gap.
        assert_eq!(observed_pause(&all, ms(45)), None);
        assert_eq!(missing_heartbeats(&all, t0), 0);
        assert_eq!(switch_over(&src, &dst, t0), Some(ms(44)));
    }

    #[test]
    fn a_pause_of_100_ms_loses_100_ms_of_work_and_the_switch_is_where_the_target_took_over() {
        let t0 = Instant::now();
        // 10 pages per heartbeat before and after; nothing for 100 ms.
        let src = run(t0, 0, 0, 2000, 0, 10);
        let dst = run(t0, 1000, 2100, 3000, 10_000, 10);
        let all: Vec<&Line> = src.iter().chain(dst.iter()).collect();
        let start = t0 + Duration::from_millis(1500);
        let switch = switch_over(&src, &dst, start).unwrap();
        assert_eq!(switch, t0 + Duration::from_millis(2100));
        let lost = work_lost(&all, start, switch).unwrap();
        assert!(lost.recovered);
        // The gap is 102 ms between heartbeats, one period of which is work
        // done at full speed anyway.
        assert!((lost.seconds - 0.1).abs() < 0.003, "{lost:?}");
        let pause = observed_pause(&all, start).unwrap();
        assert!((pause - 100.0).abs() < 0.01, "{pause}");
    }

    #[test]
    fn a_slowdown_without_a_pause_counts_and_a_guest_that_never_recovers_says_so() {
        let t0 = Instant::now();
        // Full speed (10 pages per beat) for 1 s, then half speed for 1 s,
        // then full speed again.
        let mut lines = run(t0, 0, 0, 1000, 0, 10);
        lines.extend(run(t0, 500, 1000, 2000, 5000, 5));
        lines.extend(run(t0, 1000, 2000, 3000, 7500, 10));
        let all: Vec<&Line> = lines.iter().collect();
        let start = t0 + Duration::from_millis(1000);
        let lost = work_lost(&all, start, t0 + Duration::from_millis(1990)).unwrap();
        assert!(lost.recovered);
        assert!((lost.seconds - 0.5).abs() < 0.02, "{lost:?}");
        // Judged before the speed came back, with no later heartbeats: the
        // shortfall up to the last one, not recovered.
        let slow: Vec<&Line> = lines[..1000].iter().collect();
        let lost = work_lost(&slow, start, start).unwrap();
        assert!(!lost.recovered);
        assert!((lost.seconds - 0.5).abs() < 0.02, "{lost:?}");
        // A line cut short at the switch ("HB 700 0 60" for "HB 700 0 6000")
        // is not taken for a drop in the work done.
        let mut cut = lines.clone();
        cut[700] = line("HB 700 0 60".into(), cut[700].at);
        let cut: Vec<&Line> = cut.iter().collect();
        let again = work_lost(&cut, start, t0 + Duration::from_millis(1990)).unwrap();
        assert!((again.seconds - 0.5).abs() < 0.02, "{again:?}");
        // An idle guest (nothing written) has no figure.
        let idle = run(t0, 0, 0, 2000, 0, 0);
        let idle: Vec<&Line> = idle.iter().collect();
        assert_eq!(work_lost(&idle, start, start), None);
    }
}
