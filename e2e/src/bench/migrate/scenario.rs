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
}

/// The scenarios, in order.
pub const SCENARIOS: [Scenario; 3] = [
    Scenario {
        name: "idle-1g",
        dirty_mib: 0,
    },
    Scenario {
        name: "dirty64m-1g",
        dirty_mib: 64,
    },
    Scenario {
        name: "dirty512m-1g",
        dirty_mib: 512,
    },
];

/// The guest command line for a scenario.
pub fn cmdline(s: &Scenario) -> String {
    if s.dirty_mib == 0 {
        format!("hb_ms={HB_MS}")
    } else {
        format!("hb_ms={HB_MS} dirty_mib={} dirty_rate=0", s.dirty_mib)
    }
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

/// Waits until the working set has been written once (STATUS gen >= 2).
pub(super) fn warm_up(c: &mut Console, s: &Scenario) -> Result<(), BenchError> {
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
