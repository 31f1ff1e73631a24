//! The benchmark's guests: the scenarios (working sets), the guest command
//! line for each, and how a run waits for the guest to be warm and its
//! console to be quiet.

use std::thread;
use std::time::{Duration, Instant};

use godwit_testkit::guest::{field, Console};

use super::error::BenchError;

/// Heartbeat period the benchmark guests use (ms).
pub const HB_MS: u64 = 2;
/// Guest RAM of every scenario (MiB).
pub const MEMORY_MIB: u64 = 1024;
/// How long a guest may take to boot.
pub(super) const BOOT: Duration = Duration::from_secs(60);

/// One benchmark scenario: the guest's working set.
#[derive(Clone, Copy, Debug)]
pub struct Scenario {
    /// Name as reported (`idle-1g`, ...).
    pub name: &'static str,
    /// Working set in MiB, 0 = idle.
    pub dirty_mib: u64,
    /// Its pages written in a scattered order (`dirty_order=random`)
    /// instead of in address order.
    pub random: bool,
    /// With realistic content (`dirty_fill=mix`): this many MiB of memory
    /// filled at boot, half zero pages, a quarter text-like, a quarter
    /// random, the working set spread over all of it; 0 = the two marker
    /// words per page of the other scenarios (the rest of each page zero).
    pub mix_mib: u64,
}

impl Scenario {
    const fn seq(name: &'static str, dirty_mib: u64) -> Scenario {
        Scenario {
            name,
            dirty_mib,
            random: false,
            mix_mib: 0,
        }
    }
}

/// The scenarios, in order: idle; 64 and 512 MiB written in address order
/// (512 MiB is more than a 1 Gbit/s link carries in a pre-copy round's
/// time); 200 MiB of scattered page writes; realistic memory (768 MiB of
/// mixed content) with a 128 MiB working set drawn from all of it.
pub const SCENARIOS: [Scenario; 5] = [
    Scenario::seq("idle-1g", 0),
    Scenario::seq("dirty64m-1g", 64),
    Scenario::seq("dirty512m-1g", 512),
    Scenario {
        name: "random200m-1g",
        dirty_mib: 200,
        random: true,
        mix_mib: 0,
    },
    Scenario {
        name: "mix-1g",
        dirty_mib: 128,
        random: true,
        mix_mib: 768,
    },
];

/// The guest command line for a scenario.
pub fn cmdline(s: &Scenario) -> String {
    let mut line = format!("hb_ms={HB_MS}");
    if s.dirty_mib > 0 {
        line.push_str(&format!(" dirty_mib={} dirty_rate=0", s.dirty_mib));
    }
    if s.random {
        line.push_str(" dirty_order=random");
    }
    if s.mix_mib > 0 {
        line.push_str(&format!(" dirty_fill=mix mix_mib={}", s.mix_mib));
    }
    line
}

/// Reads the console until it has been quiet for `quiet` (or `limit` passed).
pub(super) fn drain(c: &mut Console, quiet: Duration, limit: Duration) {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        match c.next_line(quiet) {
            Ok(Some(_)) => {}
            _ => return,
        }
    }
}

/// Reads `c` until a line that arrived at or after `until` (or `limit`
/// passed, or the console ended).
pub(super) fn read_until(c: &mut Console, until: Instant, limit: Duration) {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        match c.next_line(Duration::from_millis(200)) {
            Ok(Some(l)) if l.at >= until => return,
            Ok(_) => {}
            Err(_) => return,
        }
    }
}

/// How long the heartbeats are read after a migration ended: long enough
/// for a guest that works to show it is back to its speed (once the engine
/// says it is done, no page is missing and no throttle is left, so it is
/// back within a few heartbeats; a run that is not is reported
/// `work_recovered: false`).
pub(super) fn after(s: &Scenario) -> Duration {
    if s.dirty_mib == 0 {
        Duration::from_millis(500)
    } else {
        Duration::from_secs(1)
    }
}

/// How long a warm guest runs before a migration starts: longer than the
/// second over which the lost-work figure takes the rate before.
const STEADY: Duration = Duration::from_millis(1200);

/// Waits until the working set has been written once (STATUS gen >= 2),
/// then for [`STEADY`], so that the rate before the migration is measured
/// on a guest whose working set is already in its memory (its first pass
/// faults every page in, at a fraction of the speed).
pub(super) fn warm_up(c: &mut Console, s: &Scenario) -> Result<(), BenchError> {
    warm(c, s)?;
    read_until(c, Instant::now() + STEADY, STEADY + Duration::from_secs(5));
    Ok(())
}

fn warm(c: &mut Console, s: &Scenario) -> Result<(), BenchError> {
    c.heartbeats(50, Duration::from_secs(20))?;
    if s.dirty_mib == 0 {
        return Ok(());
    }
    let end = Instant::now() + Duration::from_secs(60);
    while Instant::now() < end {
        c.send("status")?;
        let st = c.wait_prefix("STATUS ", Duration::from_secs(10))?;
        let gen: u64 = field(&st.text, "gen")
            .and_then(|g| g.parse().ok())
            .unwrap_or(0);
        if gen >= 2 {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}
