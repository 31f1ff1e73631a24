//! The crash-loop backoff of VM restarts: how long a VM that keeps stopping
//! waits before the operator starts it again. The VM controller decides with
//! it; the [`Context`](crate::context::Context) keeps the restart counts.

use std::time::Duration;

/// First wait between restarts of a VM that keeps stopping.
pub const RESTART_BACKOFF: Duration = Duration::from_secs(5);
/// Longest wait between restarts.
pub const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(300);
/// Restarts further apart than this do not count as a crash loop.
pub const RESTART_RESET: Duration = Duration::from_secs(600);

/// How long a VM restarted `count` times in a row, the last `since` ago,
/// must still wait before the next restart: none for the first, then 5 s,
/// 10 s, 20 s ... up to 5 min; a VM that ran for 10 min starts afresh.
pub fn restart_delay(count: u32, since: Duration) -> Duration {
    if count == 0 || since >= RESTART_RESET {
        return Duration::ZERO;
    }
    let backoff = RESTART_BACKOFF
        .saturating_mul(1 << (count - 1).min(16))
        .min(RESTART_BACKOFF_MAX);
    backoff.saturating_sub(since)
}
