//! The source in post-copy: after the switch it sends the saved state and
//! the runs of pages the target still needs, then pushes those pages in
//! order, a slice at a time, serving the pages the target's vCPUs fault on
//! first, until the target has them all and runs the guest. After each
//! fault the push goes on from the page after it (the guest's next faults
//! are likely there), wrapping around to the start of memory. The push
//! keeps about a tenth of a millisecond of the link's bandwidth
//! unacknowledged ([`in_flight_cap`]), so that a faulted page does not queue
//! behind it. A lost link is bridged by [`super::recovery`].

use std::sync::mpsc::{RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

use super::recovery::{connection_lost, reconnect_source};
use crate::migration::convergence::{self, Round};
use crate::migration::error::MigrationError;
use crate::migration::guest::{DirtyPages, GuestRegion, SourceVm};
use crate::migration::progress::{MigrationSummary, ModeUsed, Stage};
use crate::migration::protocol::{self, Command, PAGE_SIZE};
use crate::migration::session::Source;
use crate::migration::transport;

/// Pages pushed between two looks at the target's requests, at most; fewer
/// when the in-flight cap is smaller, so that a slice never overshoots it
/// by more than itself.
const PUSH_PAGES: u64 = 32;
/// The background push waits while more bytes than the link carries in
/// this long are unacknowledged on the stream, so that a page the guest
/// faults on never queues behind more than this of pushed ones (instead of
/// the tens of milliseconds a full socket buffer and qdisc hold on a slow
/// link), while a fast link still has enough in flight to stay full.
const PUSH_QUEUE: Duration = Duration::from_micros(100);
/// The least the push keeps in flight (at any bandwidth).
const PUSH_IN_FLIGHT_MIN: usize = 8 << 10;

/// The push's in-flight cap for a stream that carried `bandwidth` bytes per
/// second in pre-copy.
fn in_flight_cap(bandwidth: f64) -> usize {
    ((bandwidth * PUSH_QUEUE.as_secs_f64()) as usize).max(PUSH_IN_FLIGHT_MIN)
}

/// Where the source stands in post-copy.
struct Serve {
    /// Pages the target still needs, as far as the source knows.
    needed: Vec<DirtyPages>,
    remaining: u64,
    /// Next page of the background push (region, page).
    cursor: (usize, u64),
    /// When the target said the guest runs there (from the pause).
    activated: Option<Duration>,
    /// Bytes the push may leave unacknowledged ([`in_flight_cap`]).
    in_flight: usize,
    /// Since when, and at how many unacknowledged bytes, the push has been
    /// waiting on a full pipe with nothing acknowledged ([`Serve::acked`]).
    full: Option<(Instant, usize)>,
}

impl Serve {
    /// The push waits on a full pipe with `unacked` bytes out: an error once
    /// nothing has been acknowledged or heard for `stall`, the same quiet
    /// link a blocked write would report, so that recovery takes over.
    fn acked(&mut self, unacked: usize, stall: Duration) -> Result<(), MigrationError> {
        match self.full {
            Some((since, least)) if unacked >= least => {
                if since.elapsed() >= stall {
                    return Err(MigrationError::Protocol(protocol::ProtocolError::Io(
                        std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!(
                                "the migration peer acknowledged nothing for {stall:?} \
                                 ({unacked} bytes unacknowledged)"
                            ),
                        ),
                    )));
                }
            }
            _ => self.full = Some((Instant::now(), unacked)),
        }
        Ok(())
    }

    /// Replaces what the source thinks the target needs with what the target
    /// says it needs (after a reconnection: pages in flight on the lost
    /// connection never arrived).
    fn reset(
        &mut self,
        regions: &[GuestRegion],
        runs: &[(u64, u32)],
    ) -> Result<(), MigrationError> {
        for d in &mut self.needed {
            d.bitmap.iter_mut().for_each(|w| *w = 0);
        }
        for &(gpa, pages) in runs {
            for p in 0..u64::from(pages) {
                let gpa = gpa + p * PAGE_SIZE as u64;
                let (r, page) = locate(regions, gpa).ok_or(MigrationError::PageOutOfRange(gpa))?;
                self.needed[r].bitmap[(page / 64) as usize] |= 1 << (page % 64);
            }
        }
        self.remaining = self.needed.iter().map(DirtyPages::count).sum();
        self.cursor = (0, 0);
        Ok(())
    }
}

/// The source after the switch: sends the state and the list of pages the
/// target still needs, then pushes them in order, serving requested pages
/// first, until all are there.
///
/// Requests are served from the first moment, before the target says the
/// guest runs: restoring the state may already touch a missing page (the
/// kvmclock page). Until `Activated` arrives, an explicit `Abort` still leaves
/// the guest to us; any other failure leaves it unknown (the target may have
/// resumed), so the source stays paused.
///
/// If the connection is lost ([`connection_lost`]) and the options say how to reconnect,
/// the source dials the target again until the recovery timeout, and carries
/// on with what the target says it still needs ([`reconnect_source`]).
pub(crate) fn serve<V: SourceVm>(
    src: &mut Source<'_, V>,
    pending: &[DirtyPages],
    vm_state: &[u8],
    pause_start: Instant,
    history: &[Round],
    committed: &mut bool,
) -> Result<MigrationSummary, MigrationError> {
    let needed: Vec<DirtyPages> = pending.to_vec();
    let runs: Vec<(u64, u32)> = needed.iter().flat_map(DirtyPages::gpa_runs).collect();
    src.in_postcopy = true;
    src.writer.send(Command::State, vm_state)?;
    src.writer
        .send(Command::PostCopy, &protocol::encode_page_runs(&runs))?;
    src.progress.update(|p| p.stage = Stage::PostCopy);

    let mut serve = Serve {
        remaining: needed.iter().map(DirtyPages::count).sum(),
        needed,
        cursor: (0, 0),
        activated: None,
        in_flight: in_flight_cap(history.last().map_or(0.0, convergence::bandwidth)),
        full: None,
    };
    loop {
        let outcome = push(src, &mut serve, pause_start, committed).and_then(|()| finish(src));
        let e = match outcome {
            Ok(()) => break,
            Err(e) => e,
        };
        let recoverable = connection_lost(&e) && src.opts.reconnect.is_some();
        let e = if recoverable {
            match reconnect_source(src, &e) {
                Ok((activated, runs)) => {
                    if activated && serve.activated.is_none() {
                        serve.activated = Some(pause_start.elapsed());
                        *committed = true;
                    }
                    serve.reset(&src.regions, &runs)?;
                    continue;
                }
                Err(again) => {
                    tracing::warn!(
                        "post-copy not resumed: {}",
                        godwit_crds::error_chain(&again)
                    );
                    again
                }
            }
        } else {
            e
        };
        return Err(match (&e, serve.activated) {
            // The target never ran the guest and said so: it is still ours.
            (MigrationError::PeerAbort(_), None) => e,
            (_, None) => {
                *committed = true;
                MigrationError::CommitUnknown(Box::new(e))
            }
            (_, Some(_)) => MigrationError::PostCopyLost(Box::new(e)),
        });
    }
    let downtime = serve
        .activated
        .expect("post-copy ends only once the target runs the guest");
    Ok(MigrationSummary {
        total_ms: src.started.elapsed().as_millis() as u64,
        downtime_ms: downtime.as_secs_f64() * 1000.0,
        bytes_sent: src.writer.bytes_sent,
        rounds: history.len() as u32,
        mode: ModeUsed::PostCopy,
        pages_sent: src.pages_sent,
        zero_pages: src.zero_pages,
        downtime_breakdown: None,
        storage: None,
    })
}

/// Serves requests and pushes the rest until the target has every page and
/// runs the guest.
fn push<V: SourceVm>(
    src: &mut Source<'_, V>,
    serve: &mut Serve,
    pause_start: Instant,
    committed: &mut bool,
) -> Result<(), MigrationError> {
    // A new connection (after recovery) starts with nothing waited on.
    serve.full = None;
    while serve.remaining > 0 || serve.activated.is_none() {
        // Requests and Activated first; with nothing left to push, wait.
        loop {
            let next = if serve.remaining == 0 {
                transport::recv_timeout(&src.incoming, src.opts.stall_timeout).map(Some)?
            } else if src.writer.unacked() >= serve.in_flight {
                // The pipe is full enough: wait a little for a request.
                match src.incoming.recv_timeout(Duration::from_micros(50)) {
                    Ok(item) => {
                        serve.full = None;
                        Some(item?)
                    }
                    Err(RecvTimeoutError::Timeout) => {
                        serve.acked(src.writer.unacked(), src.opts.stall_timeout)?;
                        None
                    }
                    Err(RecvTimeoutError::Disconnected) => {
                        return Err(MigrationError::StreamClosed)
                    }
                }
            } else {
                match src.incoming.try_recv() {
                    Ok(item) => Some(item?),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => return Err(MigrationError::StreamClosed),
                }
            };
            match next {
                None => break,
                Some((Command::PageRequest, payload)) => {
                    for gpa in protocol::parse_page_request(&payload)? {
                        if let Some((r, page)) = locate(&src.regions, gpa) {
                            if take_bit(&mut serve.needed[r], page) {
                                src.send_run(r, page, 1)?;
                                serve.remaining -= 1;
                            }
                            // The push goes on from where the guest works:
                            // its next faults are likely just after this one.
                            serve.cursor = (r, page + 1);
                        }
                    }
                    src.flush_batch()?;
                }
                Some((Command::Activated, _)) => {
                    serve.activated = Some(pause_start.elapsed());
                    *committed = true;
                    if serve.remaining == 0 {
                        return Ok(());
                    }
                }
                Some((got, payload)) => {
                    return Err(MigrationError::unexpected(
                        got,
                        &payload,
                        "PageRequest or Activated",
                    ))
                }
            }
            if serve.remaining == 0 && serve.activated.is_some() {
                return Ok(());
            }
        }
        // Then a slice of the background push, from the cursor on, around
        // to the start once the end is reached.
        if src.writer.unacked() >= serve.in_flight {
            continue;
        }
        let mut pushed = 0;
        let mut wrapped = false;
        // A slice never overshoots the in-flight cap by more than itself.
        let slice = (serve.in_flight / PAGE_SIZE).clamp(1, PUSH_PAGES as usize) as u64;
        while serve.remaining > 0 && pushed < slice {
            if serve.cursor.0 >= serve.needed.len() {
                if wrapped {
                    break;
                }
                serve.cursor = (0, 0);
                wrapped = true;
            }
            let (r, page) = serve.cursor;
            let pages = serve.needed[r].bitmap.len() as u64 * 64;
            if page >= pages {
                serve.cursor = (r + 1, 0);
                continue;
            }
            if serve.needed[r].bitmap[(page / 64) as usize] == 0 {
                serve.cursor.1 = (page / 64 + 1) * 64;
                continue;
            }
            if take_bit(&mut serve.needed[r], page) {
                src.send_run(r, page, 1)?;
                serve.remaining -= 1;
                pushed += 1;
            }
            serve.cursor.1 += 1;
        }
        src.flush_batch()?;
        if pushed > 0 {
            serve.full = None;
        }
        src.progress.update(|p| {
            p.memory_remaining_bytes = serve.remaining * PAGE_SIZE as u64;
            p.transferred_bytes = src.writer.bytes_sent;
        });
    }
    Ok(())
}

/// Everything is there: `Complete`, then the target's `Ready`. Requests the
/// target sent for pages already on their way may still be in the stream
/// ahead of Ready; they need no answer.
fn finish<V: SourceVm>(src: &mut Source<'_, V>) -> Result<(), MigrationError> {
    src.writer.send(Command::Complete, &[])?;
    src.progress.update(|p| p.stage = Stage::Committing);
    loop {
        match transport::recv_timeout(&src.incoming, src.opts.stall_timeout)? {
            (Command::Ready, _) => return Ok(()),
            (Command::PageRequest, _) => continue,
            (got, payload) => return Err(MigrationError::unexpected(got, &payload, "Ready")),
        }
    }
}

/// Region index and page index of `gpa`.
fn locate(regions: &[GuestRegion], gpa: u64) -> Option<(usize, u64)> {
    regions
        .iter()
        .position(|r| r.contains(gpa, PAGE_SIZE as u64))
        .map(|i| (i, (gpa - regions[i].gpa) / PAGE_SIZE as u64))
}

/// Clears the bit of `page`, returning whether it was set.
fn take_bit(d: &mut DirtyPages, page: u64) -> bool {
    let (w, b) = ((page / 64) as usize, page % 64);
    let was = d.bitmap[w] & (1 << b) != 0;
    d.bitmap[w] &= !(1 << b);
    was
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_push_keeps_a_tenth_of_a_millisecond_of_the_link_in_flight_and_never_less_than_8_kib() {
        // 1 Gbit/s: 12.5 kB.
        assert_eq!(in_flight_cap(125e6), 12_500);
        // 10 Gbit/s: 125 kB.
        assert_eq!(in_flight_cap(1.25e9), 125_000);
        // A slow or unmeasured link: the floor.
        assert_eq!(in_flight_cap(10e6), 8 << 10);
        assert_eq!(in_flight_cap(0.0), 8 << 10);
    }

    #[test]
    fn a_full_pipe_that_nothing_drains_is_a_quiet_link_and_any_ack_restarts_the_clock() {
        let mut serve = Serve {
            remaining: 1,
            needed: Vec::new(),
            cursor: (0, 0),
            activated: None,
            in_flight: 10,
            full: None,
        };
        let long = Duration::from_secs(3600);
        // The first wait starts the clock; the same count again is no error
        // before the stall timeout.
        serve.acked(100, long).unwrap();
        serve.acked(100, long).unwrap();
        // With no stall allowed, nothing acknowledged since is an error that
        // recovery takes for a lost link.
        let e = serve.acked(100, Duration::ZERO).unwrap_err();
        assert!(connection_lost(&e), "{e}");
        assert!(super::super::recovery::link_quiet(&e), "{e}");
        // An acknowledgement (fewer bytes out) starts the clock again.
        serve.acked(90, Duration::ZERO).unwrap();
        assert_eq!(serve.full.map(|(_, n)| n), Some(90));
    }
}
