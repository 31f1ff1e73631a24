//! Pre-copy, the source's first phase: the dirty-page loop while the guest
//! runs, auto-converge, and the last copy once the guest is paused.
//!
//! Round 0 sends all of guest RAM (zero pages as run headers only, and
//! pages the VM knows were never written without reading them), unless it
//! switches to post-copy part-way (a guest that writes new pages faster
//! than the link carries them, [`convergence::in_round0`]); each
//! later round sends the pages the guest dirtied during the one before,
//! after the disks' dirty blocks (`RoundDisks`). A round ends when the
//! target has received it all; then [`super::convergence`] decides: another
//! round, a throttle on the vCPUs (`Throttle`, auto-converge), the
//! switch to stop-and-copy, or the switch to post-copy. `iterate` returns
//! at a switch with the pages still to send; once the guest is paused,
//! `stop_and_copy` sends them and saves the state. What comes around these
//! (the Hello, the commit handshake, post-copy) is [`super::sender`]'s.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::convergence::{self, Decision, Policy, Round, Round0};
use super::error::MigrationError;
use super::guest::{DirtyPages, GuestRegion, SourceVm};
use super::progress::{DowntimeBreakdown, ModeUsed};
use super::protocol::{self, Command, PAGE_SIZE};
use super::session::{RoundDisks, SenderState, Source};

/// Round 0 walks guest memory in chunks of this many pages (16 MiB) and
/// updates the progress's remaining bytes after each.
const ROUND0_CHUNK_PAGES: u64 = 4096;
/// While round 0 runs (post-copy allowed, and a VM that can count its dirty
/// pages without re-arming the log), it looks at the count this often
/// ([`convergence::in_round0`]).
const ROUND0_LOOK: Duration = Duration::from_millis(250);
/// Throttle period: each period the vCPUs are paused for the throttle's share.
const THROTTLE_PERIOD: Duration = Duration::from_millis(20);

/// Auto-converge: pauses the vCPUs for a share of every [`THROTTLE_PERIOD`]
/// while [`Throttle::run`] runs on its own thread, so that a guest dirtying
/// memory faster than the link sends it slows down.
#[derive(Default)]
pub(super) struct Throttle {
    percent: AtomicU8,
    stop: AtomicBool,
    /// Held while the throttle has the vCPUs paused, so that the final
    /// pause never races a throttle period.
    pause_lock: Mutex<()>,
}

impl Throttle {
    /// Pauses the vCPUs for the current share of every period until
    /// [`Throttle::stop`].
    pub fn run<V: SourceVm>(&self, vm: &V) {
        while !self.stop.load(Ordering::Relaxed) {
            let pct = u32::from(self.percent.load(Ordering::Relaxed));
            if pct == 0 {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            let off = THROTTLE_PERIOD * pct / 100;
            {
                let _guard = self.pause_lock.lock().unwrap();
                if self.stop.load(Ordering::Relaxed) {
                    break;
                }
                vm.pause();
                std::thread::sleep(off);
                vm.resume();
            }
            std::thread::sleep(THROTTLE_PERIOD - off);
        }
    }

    /// Ends [`Throttle::run`].
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Stops throttling and pauses the guest for good (until a failure
    /// resumes it); returns when the pause began.
    pub fn pause<V: SourceVm>(&self, vm: &V) -> Instant {
        self.stop();
        let _guard = self.pause_lock.lock().unwrap();
        let t = Instant::now();
        vm.pause();
        t
    }
}

/// Where pre-copy stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Switch {
    /// The rest fits the downtime budget: pause and copy it.
    StopAndCopy,
    /// It does not, and post-copy is allowed: run the guest on the target.
    PostCopy,
}

/// What [`iterate`] leaves for the next phase.
pub(super) struct PreCopied {
    /// The next phase.
    pub switch: Switch,
    /// Pages dirtied and not yet sent, one entry per region.
    pub pending: Vec<DirtyPages>,
    /// Every round so far.
    pub history: Vec<Round>,
    /// Pre-copy, or auto-converge if the throttle was used.
    pub mode: ModeUsed,
}

/// Runs the rounds until the convergence policy switches (the guest keeps
/// running; dirty logging is on).
pub(super) fn iterate<V: SourceVm>(
    src: &mut Source<'_, V>,
    policy: &Policy,
    throttle: &Throttle,
    disks: &mut impl RoundDisks<V>,
) -> Result<PreCopied, MigrationError> {
    let vm = src.vm;
    let stall_timeout = src.opts.stall_timeout;
    // Round 0: all memory, zero pages as run headers only.
    let mut history: Vec<Round> = Vec::new();
    let mut round_start = Instant::now();
    let mut bytes_before = src.writer.bytes_sent;
    let mut round_pages = 0;
    let total_pages: u64 = src.regions.iter().map(|r| r.size / PAGE_SIZE as u64).sum();
    src.progress
        .update(|p| p.memory_remaining_bytes = total_pages * PAGE_SIZE as u64);
    let mut pending = empty_dirty(&src.regions);
    // The figures at the last look at the dirty count; `None` once round 0
    // goes on to its end without looking.
    let mut looked = policy.allow_post_copy.then_some(Round {
        round: 0,
        bytes_sent: 0,
        duration: Duration::ZERO,
        dirty_pages: 0,
    });
    for r in 0..src.regions.len() {
        let pages = src.regions[r].size / PAGE_SIZE as u64;
        // In chunks, so the progress shows what round 0 has left to walk.
        let mut first = 0;
        while first < pages {
            let n = ROUND0_CHUNK_PAGES.min(pages - first);
            src.send_all(r, first, n)?;
            first += n;
            round_pages += n;
            let left = (total_pages - round_pages) * PAGE_SIZE as u64;
            src.progress.update(|p| p.memory_remaining_bytes = left);
            let Some(last) = looked else { continue };
            let elapsed = round_start.elapsed();
            if elapsed < last.duration + ROUND0_LOOK {
                continue;
            }
            let Some(dirtied) = vm.dirty_count().map_err(MigrationError::TakeDirty)? else {
                looked = None;
                continue;
            };
            let so_far = Round {
                round: 0,
                bytes_sent: src.writer.bytes_sent - bytes_before,
                duration: elapsed,
                dirty_pages: dirtied,
            };
            let window = Round {
                round: 0,
                bytes_sent: so_far.bytes_sent - last.bytes_sent,
                duration: elapsed - last.duration,
                dirty_pages: dirtied.saturating_sub(last.dirty_pages),
            };
            looked = Some(so_far);
            match convergence::in_round0(&so_far, &window, policy, PAGE_SIZE as u64) {
                Round0::Look => {}
                Round0::Finish => looked = None,
                Round0::PostCopy => {
                    src.flush_batch()?;
                    merge(
                        &mut pending,
                        &vm.take_dirty().map_err(MigrationError::TakeDirty)?,
                    );
                    not_reached(src, (r, first), &mut pending);
                    let round = Round {
                        dirty_pages: count(&pending),
                        ..so_far
                    };
                    src.progress.update(|p| {
                        p.memory_remaining_bytes = round.dirty_pages * PAGE_SIZE as u64;
                        p.bandwidth_bytes_per_second = convergence::bandwidth(&round) as u64;
                    });
                    return Ok(PreCopied {
                        switch: Switch::PostCopy,
                        pending,
                        history: vec![round],
                        mode: ModeUsed::PreCopy,
                    });
                }
            }
        }
    }
    src.flush_batch()?;
    let mut mode = ModeUsed::PreCopy;
    loop {
        // The round ends when the target has it all; what the guest dirtied
        // until then is the next round.
        src.writer.wait_drained(stall_timeout);
        merge(
            &mut pending,
            &vm.take_dirty().map_err(MigrationError::TakeDirty)?,
        );
        let disk_pending = disks.collect(vm)?;
        src.writer.send(
            Command::RoundEnd,
            &protocol::encode_round_end(history.len() as u32, round_pages),
        )?;
        let round = Round {
            round: history.len() as u32,
            bytes_sent: src.writer.bytes_sent - bytes_before,
            duration: round_start.elapsed(),
            // Dirty disk bytes weigh like dirty pages in the expected downtime.
            dirty_pages: count(&pending) + disk_pending.div_ceil(PAGE_SIZE as u64),
        };
        history.push(round);
        let expected = convergence::expected_downtime(&round, PAGE_SIZE as u64);
        let bytes_sent = src.writer.bytes_sent;
        src.progress.update(|p| {
            p.round = round.round;
            p.memory_remaining_bytes = round.dirty_pages * PAGE_SIZE as u64;
            p.transferred_bytes = bytes_sent;
            p.bandwidth_bytes_per_second = convergence::bandwidth(&round) as u64;
            p.dirty_rate_bytes_per_second =
                convergence::dirty_rate(&round, PAGE_SIZE as u64) as u64;
            p.expected_downtime_ms = expected.as_millis() as u64;
            p.disk_remaining_bytes = disk_pending;
        });
        src.check_peer()?;
        let switch = match convergence::decide(
            &history,
            throttle.percent.load(Ordering::Relaxed),
            policy,
            PAGE_SIZE as u64,
        ) {
            Decision::NextRound => None,
            Decision::Throttle(pct) => {
                throttle.percent.store(pct, Ordering::Relaxed);
                mode = ModeUsed::AutoConverge;
                src.progress.update(|p| p.throttle_percent = pct);
                None
            }
            Decision::StopAndCopy => Some(Switch::StopAndCopy),
            Decision::PostCopy => Some(Switch::PostCopy),
        };
        if let Some(switch) = switch {
            return Ok(PreCopied {
                switch,
                pending,
                history,
                mode,
            });
        }
        src.advance(SenderState::PreCopy)?;
        round_start = Instant::now();
        bytes_before = src.writer.bytes_sent;
        let to_send = std::mem::replace(&mut pending, empty_dirty(&src.regions));
        disks.send_pending(src)?;
        round_pages = src.send_dirty(&to_send)?;
    }
}

/// Adds the pages dirtied since the last call to `pending` (once the guest
/// is paused, the set is final).
pub(super) fn take_last<V: SourceVm>(
    vm: &V,
    pending: &mut [DirtyPages],
) -> Result<(), MigrationError> {
    let last = vm.take_dirty().map_err(MigrationError::TakeDirty)?;
    merge(pending, &last);
    Ok(())
}

/// The paused guest's last dirty pages, sent, and its saved state, to
/// send next; records how long each took in `phases`. Returns the number
/// of pages in the last set and the state.
pub(super) fn stop_and_copy<V: SourceVm>(
    src: &mut Source<'_, V>,
    pending: &mut [DirtyPages],
    phases: &mut DowntimeBreakdown,
) -> Result<(u64, Vec<u8>), MigrationError> {
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1000.0;
    let t = Instant::now();
    take_last(src.vm, pending)?;
    let final_pages = count(pending);
    // The state does not depend on the pages: capture it beside the send.
    let vm = src.vm;
    let save = || {
        let t = Instant::now();
        vm.save_state().map(|state| (state, ms(t)))
    };
    let (sent, saved) = std::thread::scope(|s| {
        let saver = std::thread::Builder::new()
            .name("migrate-state".into())
            .spawn_scoped(s, save);
        let sent = src.send_dirty(pending).map(|_| ms(t));
        let saved = match saver {
            Ok(h) => h.join().expect("saving the state does not panic"),
            // No thread to spare: capture it here, after the pages.
            Err(_) => save(),
        };
        (sent, saved)
    });
    phases.last_pages_ms = sent?;
    let (vm_state, save_ms) = saved.map_err(MigrationError::SaveState)?;
    phases.save_state_ms = save_ms;
    Ok((final_pages, vm_state))
}

/// Round 0 stops at page `from` (region, page): the pages from there on
/// that may hold data go into `pending`, for post-copy to send. Those the
/// VM knows are zero stay out: the target zero-fills a page it never got
/// and does not need, and a write to one since is in the dirty log.
fn not_reached<V: SourceVm>(src: &Source<'_, V>, from: (usize, u64), pending: &mut [DirtyPages]) {
    for (r, region) in src.regions.iter().enumerate().skip(from.0) {
        let pages = region.size / PAGE_SIZE as u64;
        let mut first = if r == from.0 { from.1 } else { 0 };
        while first < pages {
            let n = ROUND0_CHUNK_PAGES.min(pages - first);
            let bits = src.vm.populated(region, first, n);
            for i in 0..n {
                let maybe_data = bits
                    .as_ref()
                    .is_none_or(|b| b[(i / 64) as usize] & (1 << (i % 64)) != 0);
                if maybe_data {
                    let p = first + i;
                    pending[r].bitmap[(p / 64) as usize] |= 1 << (p % 64);
                }
            }
            first += n;
        }
    }
}

fn empty_dirty(regions: &[GuestRegion]) -> Vec<DirtyPages> {
    regions
        .iter()
        .map(|r| DirtyPages {
            gpa: r.gpa,
            bitmap: vec![0; (r.size / PAGE_SIZE as u64).div_ceil(64) as usize],
        })
        .collect()
}

fn merge(into: &mut [DirtyPages], from: &[DirtyPages]) {
    for (a, b) in into.iter_mut().zip(from) {
        a.merge(b);
    }
}

fn count(d: &[DirtyPages]) -> u64 {
    d.iter().map(DirtyPages::count).sum()
}
