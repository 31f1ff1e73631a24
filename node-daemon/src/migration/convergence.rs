//! When to stop pre-copying: the pure decision the source takes after every
//! round, from the round's figures and the policy. No I/O, so every branch is
//! unit-tested with plain numbers.
//!
//! - Stop-and-copy once the expected downtime (dirty bytes left over the
//!   measured bandwidth, plus a fixed cost for device state) fits the policy,
//!   unless one more round would at least halve it: while the guest dirties
//!   memory at most half as fast as the link carries it, rounds go on until
//!   the pause would be [`AIM_FRACTION`] of the policy's. The policy's
//!   `max_downtime` is a bound, not a target.
//! - When the guest dirties memory about as fast as the link carries it (it
//!   dirtied again at least [`SHRINK_FACTOR`] of what the round sent, or the
//!   rounds stopped shrinking) and one more round would take at least
//!   [`POSTCOPY_EARLY_ROUND`]: switch to post-copy at once, if the policy
//!   allows it. Each throttle step would cost a round that long with the
//!   guest slowed, and a working set rewritten within a round at full speed
//!   is rewritten within one at 99% throttle too; post-copy moves the rest
//!   once.
//! - The same test, inside round 0 ([`in_round0`]), on a VM that can count
//!   its dirty pages without re-arming the log ([`SourceVm::dirty_count`]):
//!   a guest that has written new pages at least [`SHRINK_FACTOR`] as fast
//!   as the link carried them over every look for [`ROUND0_POSTCOPY_AFTER`]
//!   streams through more memory than the link can carry, and switches to
//!   post-copy there: the pages round 0 has not reached go once, in
//!   post-copy, instead of once in round 0 and again after the guest wrote
//!   them. A guest that falls behind the link in any look (a working set it
//!   has nearly all written, which it now rewrites) finishes round 0, and
//!   the test after the round decides.
//!
//!   [`SourceVm::dirty_count`]: super::guest::SourceVm::dirty_count
//! - When rounds stop shrinking (the dirty set left after a round is not at
//!   least [`SHRINK_FACTOR`] smaller than after the round before) or too many
//!   rounds have passed: throttle the vCPUs, stepping the throttle up each round
//!   (auto-converge, as vMotion's SDPS and QEMU do), then switch to post-copy if
//!   the policy allows it and throttling at its maximum did not help.
//! - With neither allowed, keep going until the completion timeout fails the
//!   migration (the guest stays on the source).

use std::time::Duration;

/// A round must leave at most this fraction of the previous round's dirty set
/// to count as progress.
pub const SHRINK_FACTOR: f64 = 0.9;
/// First throttle step, in percent of vCPU time taken away.
pub const THROTTLE_INITIAL: u8 = 30;
/// Throttle increment per non-converging round.
pub const THROTTLE_STEP: u8 = 20;
/// Highest throttle.
pub const THROTTLE_MAX: u8 = 99;
/// What stop-and-copy costs beyond the pages (vCPU and device state, the
/// commit round trip, resuming on the target).
pub const FIXED_DOWNTIME: Duration = Duration::from_millis(2);

/// The pause pre-copy aims at, as a fraction of the policy's `max_downtime`:
/// below it, no further round is tried.
pub const AIM_FRACTION: f64 = 0.1;
/// One more round is tried, when the pause already fits, only if the guest
/// dirtied at most this fraction of the link's bandwidth: the round then
/// leaves at most that fraction of the dirty set behind.
pub const WORTH_A_ROUND: f64 = 0.5;

/// A round expected to take at least this long, on a guest that dirties as
/// fast as the link carries, is not repeated: post-copy comes at once.
pub const POSTCOPY_EARLY_ROUND: Duration = Duration::from_millis(500);

/// Round 0 switches to post-copy part-way only after the guest has outpaced
/// the link for this long ([`in_round0`]): long enough for a working set
/// that fits to have been written once at the link's pace (128–200 MiB at
/// 1 Gbit/s, the benchmark's), so that what still adds new pages after it
/// streams through memory.
pub const ROUND0_POSTCOPY_AFTER: Duration = Duration::from_secs(1);

/// How the migration may converge.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// Longest pause the guest may see.
    pub max_downtime: Duration,
    /// Throttling the vCPUs is allowed.
    pub allow_auto_converge: bool,
    /// Switching to post-copy is allowed.
    pub allow_post_copy: bool,
    /// After this many rounds, treat pre-copy as not converging.
    pub max_rounds: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            max_downtime: Duration::from_millis(50),
            allow_auto_converge: true,
            allow_post_copy: true,
            max_rounds: 30,
        }
    }
}

/// Figures of one finished pre-copy round.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Round {
    /// Round number (0 is the full copy).
    pub round: u32,
    /// Bytes put on the wire in the round.
    pub bytes_sent: u64,
    /// How long the round took.
    pub duration: Duration,
    /// Pages dirtied while the round ran: what the next round must send.
    pub dirty_pages: u64,
}

/// What the source does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Another pre-copy round at the current throttle.
    NextRound,
    /// Another round with the vCPUs throttled by this many percent.
    Throttle(u8),
    /// Pause and send the rest.
    StopAndCopy,
    /// Resume on the target now and fault in the rest.
    PostCopy,
}

/// What round 0 does after a look at the dirty log ([`in_round0`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Round0 {
    /// Go on, and look again.
    Look,
    /// Go on to the end without looking again.
    Finish,
    /// Stop here and switch to post-copy.
    PostCopy,
}

/// A look at the dirty log part-way through round 0: `so_far` is the round
/// until now (bytes sent, pages dirtied since it began), `window` the same
/// since the last look.
pub fn in_round0(so_far: &Round, window: &Round, policy: &Policy, page_size: u64) -> Round0 {
    let outpaced = |r: &Round| {
        r.bytes_sent > 0
            && (r.dirty_pages * page_size) as f64 >= r.bytes_sent as f64 * SHRINK_FACTOR
    };
    if !policy.allow_post_copy || !outpaced(window) {
        return Round0::Finish;
    }
    if so_far.duration < ROUND0_POSTCOPY_AFTER {
        return Round0::Look;
    }
    let resend = (so_far.dirty_pages * page_size) as f64 / bandwidth(so_far).max(1.0);
    if outpaced(so_far) && resend >= POSTCOPY_EARLY_ROUND.as_secs_f64() {
        Round0::PostCopy
    } else {
        Round0::Finish
    }
}

/// Bytes per second the stream carried in `round`.
pub fn bandwidth(round: &Round) -> f64 {
    let secs = round.duration.as_secs_f64().max(1e-6);
    round.bytes_sent as f64 / secs
}

/// Pause the guest would see if stopped after `round`.
pub fn expected_downtime(round: &Round, page_size: u64) -> Duration {
    let bw = bandwidth(round).max(1.0);
    FIXED_DOWNTIME + Duration::from_secs_f64((round.dirty_pages * page_size) as f64 / bw)
}

/// Bytes per second the guest dirtied memory during `round`.
pub fn dirty_rate(round: &Round, page_size: u64) -> f64 {
    (round.dirty_pages * page_size) as f64 / round.duration.as_secs_f64().max(1e-6)
}

/// The decision after the last round in `history`, with the vCPUs currently
/// throttled by `throttle` percent.
pub fn decide(history: &[Round], throttle: u8, policy: &Policy, page_size: u64) -> Decision {
    let Some(last) = history.last() else {
        return Decision::NextRound;
    };
    let expected = expected_downtime(last, page_size);
    if expected <= policy.max_downtime {
        let shrinks = dirty_rate(last, page_size) <= bandwidth(last) * WORTH_A_ROUND;
        if expected > policy.max_downtime.mul_f64(AIM_FRACTION)
            && shrinks
            && last.round + 1 < policy.max_rounds
        {
            return Decision::NextRound;
        }
        return Decision::StopAndCopy;
    }
    // Round 0 sends all memory: the first comparison is round 1 against round 0.
    let stalled = match history {
        [.., prev, last] if last.round >= 1 => {
            last.dirty_pages as f64 > prev.dirty_pages as f64 * SHRINK_FACTOR
        }
        _ => false,
    };
    // The guest rewrote about all that the round carried: the link is the limit.
    let outpaced =
        stalled || (last.dirty_pages * page_size) as f64 >= last.bytes_sent as f64 * SHRINK_FACTOR;
    let next_round =
        Duration::from_secs_f64((last.dirty_pages * page_size) as f64 / bandwidth(last).max(1.0));
    if policy.allow_post_copy && outpaced && next_round >= POSTCOPY_EARLY_ROUND {
        return Decision::PostCopy;
    }
    if !stalled && last.round + 1 < policy.max_rounds {
        return Decision::NextRound;
    }
    if policy.allow_auto_converge && throttle < THROTTLE_MAX {
        let next = if throttle == 0 {
            THROTTLE_INITIAL
        } else {
            throttle.saturating_add(THROTTLE_STEP).min(THROTTLE_MAX)
        };
        return Decision::Throttle(next);
    }
    if policy.allow_post_copy {
        return Decision::PostCopy;
    }
    Decision::NextRound
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: u64 = 4096;

    fn round(round: u32, mib_sent: u64, ms: u64, dirty_pages: u64) -> Round {
        Round {
            round,
            bytes_sent: mib_sent << 20,
            duration: Duration::from_millis(ms),
            dirty_pages,
        }
    }

    #[test]
    fn round_0_switches_to_post_copy_only_after_a_second_of_the_guest_outpacing_the_link() {
        let p = Policy::default();
        // 1 Gbit/s: 120 MiB in 1 s, the last 30 MiB in the last 250 ms.
        let so_far = |ms, mib, pages| round(0, mib, ms, pages);
        let window = |pages| round(0, 30, 250, pages);
        // 128 MiB dirtied, 32 MiB of it new in the last look: switch.
        let d = in_round0(&so_far(1000, 120, 32768), &window(8192), &p, PAGE);
        assert_eq!(d, Round0::PostCopy);
        // The same before a second has passed: look again.
        let d = in_round0(&so_far(750, 90, 24576), &window(8192), &p, PAGE);
        assert_eq!(d, Round0::Look);
        // New pages slower than the link in the last look (a working set
        // nearly all written): finish the round, whenever that happens.
        for ms in [250, 750, 1000] {
            let d = in_round0(&so_far(ms, 120, 32768), &window(4096), &p, PAGE);
            assert_eq!(d, Round0::Finish, "at {ms} ms");
        }
        // A fast link (2 GiB in 1 s): the window is not outpaced either.
        let fast = round(0, 2048, 1000, 32768);
        let d = in_round0(&fast, &round(0, 512, 250, 8192), &p, PAGE);
        assert_eq!(d, Round0::Finish);
        // Nothing sent yet: no figure to go on.
        let d = in_round0(&so_far(1000, 0, 32768), &round(0, 0, 250, 8192), &p, PAGE);
        assert_eq!(d, Round0::Finish);
        // Post-copy not allowed.
        let no = Policy {
            allow_post_copy: false,
            ..Policy::default()
        };
        let d = in_round0(&so_far(1000, 120, 32768), &window(8192), &no, PAGE);
        assert_eq!(d, Round0::Finish);
    }

    #[test]
    fn small_dirty_set_stops_and_copies() {
        // 1 GiB/s, 100 dirty pages: 0.4 ms of pages plus the fixed cost.
        let h = [round(0, 1024, 1000, 100)];
        assert_eq!(
            decide(&h, 0, &Policy::default(), PAGE),
            Decision::StopAndCopy
        );
    }

    #[test]
    fn a_pause_that_fits_is_shortened_while_rounds_halve_it() {
        let p = Policy::default();
        // 1 GiB/s; 8 MiB dirtied in 100 ms (80 MiB/s): 10 ms of pause fits
        // the 50 ms bound, and one more round (8 ms) leaves about 0.6 MiB.
        let h = [round(0, 100, 100, 2048)];
        assert_eq!(decide(&h, 0, &p, PAGE), Decision::NextRound);
        // Then 0.6 MiB: 2.6 ms, under the aim (5 ms): stop.
        let h = [round(0, 100, 100, 2048), round(1, 8, 8, 160)];
        assert_eq!(decide(&h, 0, &p, PAGE), Decision::StopAndCopy);
        // A guest that dirties faster than half the link (5.9 MiB while 8
        // MiB went out): another round would not halve the 7.9 ms, so stop.
        let h = [round(0, 100, 100, 2048), round(1, 8, 8, 1500)];
        assert_eq!(decide(&h, 0, &p, PAGE), Decision::StopAndCopy);
        // And never past the round limit.
        let few = Policy {
            max_rounds: 1,
            ..Policy::default()
        };
        assert_eq!(
            decide(&[round(0, 100, 100, 2048)], 0, &few, PAGE),
            Decision::StopAndCopy
        );
    }

    #[test]
    fn shrinking_rounds_continue() {
        let h = [round(0, 1024, 1000, 100_000), round(1, 400, 400, 50_000)];
        assert_eq!(decide(&h, 0, &Policy::default(), PAGE), Decision::NextRound);
    }

    #[test]
    fn stalled_rounds_throttle_then_step_up_then_post_copy() {
        let h = [round(0, 1024, 1000, 100_000), round(1, 400, 400, 99_000)];
        let p = Policy::default();
        assert_eq!(
            decide(&h, 0, &p, PAGE),
            Decision::Throttle(THROTTLE_INITIAL)
        );
        assert_eq!(
            decide(&h, THROTTLE_INITIAL, &p, PAGE),
            Decision::Throttle(THROTTLE_INITIAL + THROTTLE_STEP)
        );
        assert_eq!(decide(&h, 90, &p, PAGE), Decision::Throttle(THROTTLE_MAX));
        assert_eq!(decide(&h, THROTTLE_MAX, &p, PAGE), Decision::PostCopy);
    }

    #[test]
    fn a_link_the_guest_outpaces_goes_to_post_copy_after_round_0() {
        // 1 Gbit/s: round 0 sent 512 MiB in 4.3 s and the guest rewrote all of it.
        let h = [round(0, 512, 4300, 131_072)];
        let p = Policy::default();
        assert_eq!(decide(&h, 0, &p, PAGE), Decision::PostCopy);
        // Without post-copy: rounds, then the throttle, as before.
        let no_post_copy = Policy {
            allow_post_copy: false,
            ..Policy::default()
        };
        assert_eq!(decide(&h, 0, &no_post_copy, PAGE), Decision::NextRound);
        // The same guest on a fast link: a round takes 0.25 s, so the
        // throttle's steps are cheap and come first.
        let fast = [round(0, 512, 250, 131_072), round(1, 512, 250, 131_072)];
        assert_eq!(
            decide(&fast, 0, &p, PAGE),
            Decision::Throttle(THROTTLE_INITIAL)
        );
        // A guest that dirtied half of what round 0 sent: another round.
        let half = [round(0, 512, 4300, 65_536)];
        assert_eq!(decide(&half, 0, &p, PAGE), Decision::NextRound);
    }

    #[test]
    fn post_copy_only_policy_switches_at_once() {
        let h = [round(0, 1024, 1000, 100_000), round(1, 400, 400, 120_000)];
        let p = Policy {
            allow_auto_converge: false,
            ..Policy::default()
        };
        assert_eq!(decide(&h, 0, &p, PAGE), Decision::PostCopy);
    }

    #[test]
    fn nothing_allowed_keeps_copying() {
        let h = [round(0, 1024, 1000, 100_000), round(1, 400, 400, 120_000)];
        let p = Policy {
            allow_auto_converge: false,
            allow_post_copy: false,
            ..Policy::default()
        };
        assert_eq!(decide(&h, 0, &p, PAGE), Decision::NextRound);
    }

    #[test]
    fn too_many_rounds_counts_as_stalled() {
        let p = Policy {
            max_rounds: 3,
            allow_auto_converge: false,
            ..Policy::default()
        };
        let h = [
            round(0, 1024, 1000, 100_000),
            round(1, 400, 400, 50_000),
            round(2, 200, 200, 25_000),
        ];
        assert_eq!(decide(&h, 0, &p, PAGE), Decision::PostCopy);
    }

    #[test]
    fn figures() {
        let r = round(1, 100, 1000, 25_600);
        assert!((bandwidth(&r) - (100u64 << 20) as f64).abs() < 1.0);
        // 100 MiB of dirty pages at 100 MiB/s: one second, plus the fixed cost.
        assert_eq!(
            expected_downtime(&r, PAGE),
            Duration::from_secs(1) + FIXED_DOWNTIME
        );
        assert!((dirty_rate(&r, PAGE) - (100u64 << 20) as f64).abs() < 1.0);
    }
}
