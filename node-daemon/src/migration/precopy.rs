//! The source side of a live migration: iterative pre-copy (the dirty-page
//! loop), auto-converge, stop-and-copy and the commit handshake; the switch to
//! post-copy hands over to [`super::postcopy`].
//!
//! ```text
//!  Handshake -> PreCopy(0) -> PreCopy(n) ... -> StopAndCopy -> Committing -> Completed
//!                     \                 \-> PostCopy ------------------------/
//!                      any failure before Commit -> Failed (guest resumed on the source)
//! ```
//!
//! Until `Commit` is sent the guest can always resume here: every error path
//! stops the throttle, resumes the vCPUs if they were paused and turns dirty
//! logging off. After `Commit` (or after the switch to post-copy) the guest
//! belongs to the target; a failure then leaves the source paused and says so.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::mpsc::{channel, Receiver, TryRecvError};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::convergence::{self, Decision, Policy, Round};
use super::progress::{DowntimeBreakdown, MigrationResult, ModeUsed, ProgressHandle, Stage};
use super::protocol::{self, Command, Hello, HelloAck, PageBatch, PAGE_SIZE, STORAGE_VERSION};
use super::storage::{self, DiskSender};
use super::transport::{self, Conn, FrameWriter, Incoming};
use super::vm::{DirtyPages, GuestRegion, SourceVm};
use super::{postcopy, MigrationError};
use crate::error_chain;

/// Payload size of a page batch.
pub const BATCH_BYTES: usize = 1 << 20;
/// Round 0 walks guest memory in chunks of this many pages (16 MiB) and
/// updates the progress's remaining bytes after each.
const ROUND0_CHUNK_PAGES: u64 = 4096;
/// Throttle period: each period the vCPUs are paused for the throttle's share.
const THROTTLE_PERIOD: Duration = Duration::from_millis(20);

/// How to run an outgoing migration.
#[derive(Clone, Debug)]
pub struct SendOptions {
    /// The VM's name (the target checks it).
    pub vm_name: String,
    /// Convergence policy.
    pub policy: Policy,
    /// Cap on the stream in bytes per second.
    pub bandwidth_limit: Option<u64>,
    /// Give up (guest stays here) if not complete by then.
    pub completion_timeout: Duration,
    /// Fail when the peer neither reads nor answers for this long.
    pub stall_timeout: Duration,
    /// Disks (indices in `--disk` order) on node-local storage, copied in
    /// the stream ([`super::storage`]); the others are on shared storage.
    pub disks: Vec<usize>,
    /// How to connect to the target again when the link is lost during
    /// post-copy (`None`: a lost link loses the guest).
    pub reconnect: Option<Reconnect>,
    /// How long to keep dialling the target after such a loss.
    pub recover_timeout: Duration,
}

/// Dials the target again (one attempt, bounded by the given timeout, TLS
/// handshake included); see [`super::postcopy`] on recovery.
#[derive(Clone)]
pub struct Reconnect(
    pub std::sync::Arc<dyn Fn(Duration) -> Result<Conn, MigrationError> + Send + Sync>,
);

impl std::fmt::Debug for Reconnect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reconnect")
    }
}

impl Default for SendOptions {
    fn default() -> Self {
        SendOptions {
            vm_name: String::new(),
            policy: Policy::default(),
            bandwidth_limit: None,
            completion_timeout: Duration::from_secs(600),
            stall_timeout: Duration::from_secs(10),
            disks: Vec::new(),
            reconnect: None,
            recover_timeout: postcopy::RECOVER_TIMEOUT,
        }
    }
}

/// The sender's states; [`SenderState::advance`] refuses any other order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SenderState {
    /// Hello sent, waiting for HelloAck.
    Handshake,
    /// Copying while the guest runs.
    PreCopy,
    /// Guest paused, sending the rest.
    StopAndCopy,
    /// Guest runs on the target, pages pushed and served on demand.
    PostCopy,
    /// Everything sent; waiting for Ready / Activated.
    Committing,
    /// The guest runs on the target.
    Completed,
}

impl SenderState {
    /// Moves to `next` if the protocol allows it.
    pub fn advance(self, next: SenderState) -> Result<SenderState, MigrationError> {
        use SenderState::*;
        let ok = matches!(
            (self, next),
            (Handshake, PreCopy)
                | (PreCopy, PreCopy)
                | (PreCopy, StopAndCopy)
                | (PreCopy, PostCopy)
                | (StopAndCopy, Committing)
                | (PostCopy, Committing)
                | (Committing, Completed)
        );
        if ok {
            Ok(next)
        } else {
            Err(MigrationError::InvalidTransition(
                format!("{self:?}"),
                format!("{next:?}"),
            ))
        }
    }
}

/// Everything the sender threads share.
pub(super) struct Source<'a, V: SourceVm> {
    pub vm: &'a V,
    pub regions: Vec<GuestRegion>,
    pub writer: FrameWriter,
    pub incoming: Receiver<Incoming>,
    pub progress: &'a ProgressHandle,
    pub cancel: &'a AtomicBool,
    pub opts: &'a SendOptions,
    pub started: Instant,
    pub pages_sent: u64,
    pub zero_pages: u64,
    /// After the switch to post-copy, incoming frames are page requests for
    /// the post-copy loop, not errors.
    pub in_postcopy: bool,
    batch: PageBatch,
    /// Connections given up after a lost post-copy link, shut down when
    /// the migration ends.
    retired: Vec<FrameWriter>,
}

impl<V: SourceVm> Source<'_, V> {
    /// Fails the migration if it was cancelled, timed out, or the target said
    /// something (an abort, or a broken stream) while we were sending.
    pub fn check_peer(&self) -> Result<(), MigrationError> {
        if self.in_postcopy {
            return Ok(());
        }
        if self.cancel.load(Ordering::Relaxed) {
            return Err(MigrationError::Cancelled);
        }
        if self.started.elapsed() > self.opts.completion_timeout {
            return Err(MigrationError::Timeout(self.opts.completion_timeout));
        }
        match self.incoming.try_recv() {
            Ok(Ok((Command::Abort, reason))) => Err(MigrationError::PeerAbort(
                String::from_utf8_lossy(&reason).into_owned(),
            )),
            Ok(Ok((got, _))) => Err(protocol::ProtocolError::Unexpected {
                got,
                expected: "nothing during pre-copy",
            }
            .into()),
            Ok(Err(e)) => Err(e.into()),
            Err(TryRecvError::Empty) => Ok(()),
            Err(TryRecvError::Disconnected) => Err(MigrationError::StreamClosed),
        }
    }

    /// Waits for `expected` from the target, failing on anything else.
    pub fn expect(&self, expected: Command, timeout: Duration) -> Result<Vec<u8>, MigrationError> {
        match transport::recv_timeout(&self.incoming, timeout)? {
            (Command::Abort, reason) => Err(MigrationError::PeerAbort(
                String::from_utf8_lossy(&reason).into_owned(),
            )),
            (got, payload) if got == expected => Ok(payload),
            (got, _) => Err(protocol::ProtocolError::Unexpected {
                got,
                expected: command_name(expected),
            }
            .into()),
        }
    }

    /// Carries on over `conn`, a new connection to the same target: the old
    /// stream is retired (shut down when the migration ends), frames go out on the
    /// new one with the same byte count and cap, and a new reader thread
    /// feeds [`Source::incoming`]. A batch cut short by the break is dropped;
    /// the target says what it still needs.
    pub fn replace_stream(&mut self, conn: Conn) -> Result<(), MigrationError> {
        transport::tune(conn.socket(), self.opts.stall_timeout).map_err(MigrationError::Socket)?;
        let read_half = conn.try_clone().map_err(MigrationError::Socket)?;
        let mut writer = FrameWriter::new(conn, self.opts.bandwidth_limit);
        writer.bytes_sent = self.writer.bytes_sent;
        writer.version = self.writer.version;
        // Kept open, not shut down: a FIN reaching the target once the link
        // is back would read as the source having gone away.
        let old = std::mem::replace(&mut self.writer, writer);
        self.retired.push(old);
        let (tx, rx) = channel();
        std::thread::Builder::new()
            .name("migrate-recv".into())
            .spawn(move || transport::reader_loop(read_half, tx))
            .map_err(MigrationError::Socket)?;
        self.incoming = rx;
        self.batch.clear();
        Ok(())
    }

    /// Sends the batch built so far.
    pub fn flush_batch(&mut self) -> Result<(), MigrationError> {
        if !self.batch.is_empty() {
            self.writer.send(Command::Pages, self.batch.as_bytes())?;
            self.batch.clear();
            self.progress
                .update(|p| p.transferred_bytes = self.writer.bytes_sent);
        }
        Ok(())
    }

    /// Sends `count` pages of region `r` from page index `first`, splitting the
    /// run into data and zero runs. Reads guest memory as it is now: a page the
    /// guest writes meanwhile is in the next dirty set and is sent again.
    pub fn send_run(&mut self, r: usize, first: u64, count: u64) -> Result<(), MigrationError> {
        let region = self.regions[r];
        let mut page = first;
        let end = first + count;
        while page < end {
            let gpa = region.gpa + page * PAGE_SIZE as u64;
            let zero = is_zero_page(region.host_ptr(gpa));
            let mut n = 1;
            let room = (BATCH_BYTES.saturating_sub(self.batch.len()) / PAGE_SIZE).max(1) as u64;
            while page + n < end
                && (zero || n < room)
                && is_zero_page(region.host_ptr(gpa + n * PAGE_SIZE as u64)) == zero
            {
                n += 1;
            }
            if zero {
                self.batch.push_zero(gpa, n as u32);
                self.zero_pages += n;
            } else {
                // SAFETY: `gpa .. gpa + n pages` is inside the region (page <
                // end <= region pages), whose mapping outlives the migration.
                // Reading while the guest writes only yields a torn copy of a
                // page that the dirty log will make us send again.
                let data = unsafe {
                    std::slice::from_raw_parts(region.host_ptr(gpa), n as usize * PAGE_SIZE)
                };
                self.batch.push_data(gpa, data);
                self.pages_sent += n;
            }
            page += n;
            if self.batch.len() >= BATCH_BYTES {
                self.flush_batch()?;
                self.check_peer()?;
            }
        }
        Ok(())
    }

    /// Sends every page in `dirty` and returns how many pages that was.
    pub fn send_dirty(&mut self, dirty: &[DirtyPages]) -> Result<u64, MigrationError> {
        let mut pages = 0;
        for (r, d) in dirty.iter().enumerate() {
            for (first, count) in d.runs() {
                self.send_run(r, first, count)?;
                pages += count;
            }
        }
        self.flush_batch()?;
        Ok(pages)
    }
}

/// A write that failed because the target hung up says less than the reason
/// it hung up: when the target's own word (its Abort, or the TLS alert that
/// refused us) arrives promptly behind the failed write, report that instead.
fn explain(incoming: &Receiver<Incoming>, e: MigrationError) -> MigrationError {
    if !matches!(&e, MigrationError::Protocol(protocol::ProtocolError::Io(_))) {
        return e;
    }
    let deadline = Instant::now() + Duration::from_millis(500);
    loop {
        match incoming.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Ok((Command::Abort, reason))) => {
                return MigrationError::PeerAbort(String::from_utf8_lossy(&reason).into_owned())
            }
            Ok(Ok(_)) => continue,
            Ok(Err(protocol::ProtocolError::Io(io)))
                if io
                    .get_ref()
                    .is_some_and(|i| i.is::<super::tls::SessionError>()) =>
            {
                return protocol::ProtocolError::Io(io).into()
            }
            _ => return e,
        }
    }
}

/// Whether the page at `ptr` is all zero.
fn is_zero_page(ptr: *const u8) -> bool {
    // SAFETY: `ptr` is the page-aligned start of a guest page inside a live
    // mapping; reading it as u64 words is aligned and in bounds. Volatile reads
    // because the guest may write it concurrently.
    unsafe {
        let words = ptr.cast::<u64>();
        (0..PAGE_SIZE / 8).all(|i| std::ptr::read_volatile(words.add(i)) == 0)
    }
}

pub(super) fn command_name(c: Command) -> &'static str {
    match c {
        Command::HelloAck => "HelloAck",
        Command::Ready => "Ready",
        Command::Activated => "Activated",
        Command::PageRequest => "PageRequest",
        _ => "a reply",
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

/// Pauses the vCPUs for `throttle`% of every [`THROTTLE_PERIOD`] until `stop`.
fn throttle_loop<V: SourceVm>(vm: &V, throttle: &AtomicU8, stop: &AtomicBool, lock: &Mutex<()>) {
    while !stop.load(Ordering::Relaxed) {
        let pct = u32::from(throttle.load(Ordering::Relaxed));
        if pct == 0 {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        let off = THROTTLE_PERIOD * pct / 100;
        {
            let _guard = lock.lock().unwrap();
            if stop.load(Ordering::Relaxed) {
                break;
            }
            vm.pause();
            std::thread::sleep(off);
            vm.resume();
        }
        std::thread::sleep(THROTTLE_PERIOD - off);
    }
}

/// Migrates the running `vm` over `stream` (connected to a target VMM that
/// called [`super::receiver::receive`]; plain or TLS, handshake done). On success the guest runs on the
/// target and this VM is paused for good; on failure before commit the guest
/// keeps running here.
pub fn send<V: SourceVm>(
    vm: &V,
    stream: Conn,
    opts: &SendOptions,
    progress: &ProgressHandle,
    cancel: &AtomicBool,
) -> Result<MigrationResult, MigrationError> {
    progress.start();
    progress.update(|p| p.stage = Stage::Handshake);
    transport::tune(stream.socket(), opts.stall_timeout).map_err(MigrationError::Socket)?;
    let read_half = stream.try_clone().map_err(MigrationError::Socket)?;
    let (tx, rx) = channel();
    let throttle = AtomicU8::new(0);
    let stop_throttle = AtomicBool::new(false);
    let pause_lock = Mutex::new(());
    let regions = vm.regions();
    let mut src = Source {
        vm,
        writer: FrameWriter::new(stream, opts.bandwidth_limit),
        incoming: rx,
        progress,
        cancel,
        opts,
        started: Instant::now(),
        pages_sent: 0,
        zero_pages: 0,
        in_postcopy: false,
        batch: PageBatch::with_capacity(BATCH_BYTES + PAGE_SIZE),
        retired: Vec::new(),
        regions,
    };
    let memory_total: u64 = src.regions.iter().map(|r| r.size).sum();
    progress.update(|p| p.memory_total_bytes = memory_total);

    let outcome = std::thread::scope(|s| {
        s.spawn(move || transport::reader_loop(read_half, tx));
        let throttler = s.spawn(|| throttle_loop(vm, &throttle, &stop_throttle, &pause_lock));
        let mut paused = false;
        let mut committed = false;
        let mut disks = DiskSender::default();
        let result = run(
            &mut src,
            &throttle,
            &stop_throttle,
            &pause_lock,
            &mut paused,
            &mut committed,
            &mut disks,
        )
        .map_err(|e| explain(&src.incoming, e));
        disks.stop(vm);
        stop_throttle.store(true, Ordering::Relaxed);
        let _ = throttler.join();
        if result.is_err() && !committed {
            // Nothing has been given away: the guest continues here.
            let _ = src
                .writer
                .send(Command::Abort, b"source aborted the migration");
            if disks.released {
                vm.relock_disks();
            }
            if paused {
                vm.resume();
            }
            let _ = vm.set_dirty_log(false);
        }
        src.writer.close();
        for old in &src.retired {
            old.abandon();
        }
        result
    });
    match &outcome {
        Ok(r) => progress.update(|p| {
            p.stage = Stage::Completed;
            p.result = Some(r.clone());
            p.memory_remaining_bytes = 0;
        }),
        Err(e) => progress.update(|p| {
            p.stage = Stage::Failed;
            p.error = Some(error_chain(e));
            // After Commit or the switch to post-copy the guest may have
            // run on the target; the target's VMM is discarded with the
            // failed migration, so this paused copy is all there is and it
            // may be stale: it must not resume, and the VM is restarted.
            p.guest_lost = matches!(
                e,
                MigrationError::PostCopyLost(_) | MigrationError::CommitUnknown(_)
            );
        }),
    }
    outcome
}

fn run<V: SourceVm>(
    src: &mut Source<'_, V>,
    throttle: &AtomicU8,
    stop_throttle: &AtomicBool,
    pause_lock: &Mutex<()>,
    paused: &mut bool,
    committed: &mut bool,
    disks: &mut DiskSender,
) -> Result<MigrationResult, MigrationError> {
    let opts = src.opts;
    let vm = src.vm;
    let mut state = SenderState::Handshake;
    let copying = !opts.disks.is_empty();
    if copying {
        // A version 1 target refuses the Hello instead of ignoring the disks.
        src.writer.version = STORAGE_VERSION;
    }
    let hello = Hello {
        vm_name: opts.vm_name.clone(),
        memory: src.regions.iter().map(|r| (r.gpa, r.size)).collect(),
        config: vm.config(),
        // Post-copy would run the guest before its disk arrived.
        post_copy: opts.policy.allow_post_copy && !copying,
        disks: storage::offers(vm, &opts.disks)?,
    };
    src.writer
        .send(Command::Hello, &protocol::encode_json(&hello))?;
    let ack: HelloAck = protocol::parse_json(
        Command::HelloAck,
        &src.expect(Command::HelloAck, opts.stall_timeout)?,
    )?;
    let mut policy = opts.policy.clone();
    policy.allow_post_copy &= ack.post_copy && !copying;

    vm.set_dirty_log(true).map_err(MigrationError::DirtyLog)?;
    state = state.advance(SenderState::PreCopy)?;
    src.progress.update(|p| p.stage = Stage::PreCopy);
    // Disks first: tracking on, then the allocated ranges, while the guest
    // runs; what it writes meanwhile goes in the rounds.
    disks.start(vm, &hello.disks, &ack.disks)?;
    storage::send_bulk(src, disks)?;

    // Round 0: all memory, zero pages as run headers only.
    let mut history: Vec<Round> = Vec::new();
    let mut round_start = Instant::now();
    let mut bytes_before = src.writer.bytes_sent;
    let mut round_pages = 0;
    let total_pages: u64 = src.regions.iter().map(|r| r.size / PAGE_SIZE as u64).sum();
    src.progress
        .update(|p| p.memory_remaining_bytes = total_pages * PAGE_SIZE as u64);
    for r in 0..src.regions.len() {
        let pages = src.regions[r].size / PAGE_SIZE as u64;
        // In chunks, so the progress shows what round 0 has left to walk.
        let mut first = 0;
        while first < pages {
            let n = ROUND0_CHUNK_PAGES.min(pages - first);
            src.send_run(r, first, n)?;
            first += n;
            round_pages += n;
            let left = (total_pages - round_pages) * PAGE_SIZE as u64;
            src.progress.update(|p| p.memory_remaining_bytes = left);
        }
    }
    src.flush_batch()?;
    let mut pending = empty_dirty(&src.regions);
    let mut mode = ModeUsed::PreCopy;
    loop {
        // The round ends when the target has it all; what the guest dirtied
        // until then is the next round.
        src.writer.wait_drained(opts.stall_timeout);
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
        src.progress.update(|p| {
            p.round = round.round;
            p.memory_remaining_bytes = round.dirty_pages * PAGE_SIZE as u64;
            p.transferred_bytes = src.writer.bytes_sent;
            p.bandwidth_bytes_per_second = convergence::bandwidth(&round) as u64;
            p.dirty_rate_bytes_per_second =
                convergence::dirty_rate(&round, PAGE_SIZE as u64) as u64;
            p.expected_downtime_ms = expected.as_millis() as u64;
            p.disk_remaining_bytes = disk_pending;
        });
        src.check_peer()?;
        match convergence::decide(
            &history,
            throttle.load(Ordering::Relaxed),
            &policy,
            PAGE_SIZE as u64,
        ) {
            Decision::NextRound => {}
            Decision::Throttle(pct) => {
                throttle.store(pct, Ordering::Relaxed);
                mode = ModeUsed::AutoConverge;
                src.progress.update(|p| p.throttle_percent = pct);
            }
            Decision::StopAndCopy => break,
            Decision::PostCopy => {
                state = state.advance(SenderState::PostCopy)?;
                stop_throttle.store(true, Ordering::Relaxed);
                let pause_start = {
                    let _guard = pause_lock.lock().unwrap();
                    let t = Instant::now();
                    vm.pause();
                    t
                };
                *paused = true;
                let last = vm.take_dirty().map_err(MigrationError::TakeDirty)?;
                merge(&mut pending, &last);
                let vm_state = vm.save_state().map_err(MigrationError::SaveState)?;
                let result = postcopy::source_serve(
                    src,
                    &pending,
                    &vm_state,
                    pause_start,
                    &history,
                    committed,
                )?;
                state.advance(SenderState::Committing)?;
                return Ok(result);
            }
        }
        state = state.advance(SenderState::PreCopy)?;
        round_start = Instant::now();
        bytes_before = src.writer.bytes_sent;
        let to_send = std::mem::replace(&mut pending, empty_dirty(&src.regions));
        storage::send_pending(src, disks)?;
        round_pages = src.send_dirty(&to_send)?;
    }

    // Stop-and-copy.
    state = state.advance(SenderState::StopAndCopy)?;
    src.progress.update(|p| p.stage = Stage::StopAndCopy);
    stop_throttle.store(true, Ordering::Relaxed);
    let pause_start = {
        let _guard = pause_lock.lock().unwrap();
        let t = Instant::now();
        vm.pause();
        t
    };
    *paused = true;
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1000.0;
    let mut phases = DowntimeBreakdown {
        pause_ms: ms(pause_start),
        ..Default::default()
    };
    let t = Instant::now();
    let final_disk = disks.collect(vm)?;
    storage::send_pending(src, disks)?;
    disks.result.final_dirty_bytes = final_disk;
    disks.result.final_ms = ms(t);
    let t = Instant::now();
    let last = vm.take_dirty().map_err(MigrationError::TakeDirty)?;
    merge(&mut pending, &last);
    let final_pages = count(&pending);
    src.send_dirty(&pending)?;
    phases.last_pages_ms = ms(t);
    let t = Instant::now();
    let vm_state = vm.save_state().map_err(MigrationError::SaveState)?;
    phases.save_state_ms = ms(t);
    let t = Instant::now();
    src.writer.send(Command::State, &vm_state)?;
    src.writer.send(Command::Complete, &[])?;
    state = state.advance(SenderState::Committing)?;
    src.progress.update(|p| p.stage = Stage::Committing);
    src.expect(Command::Ready, opts.stall_timeout)?;
    phases.target_restore_ms = ms(t);
    // Lock hand-over (storage::lock): flush and release before Commit, so
    // the target can take the locks before it runs the guest. Should the
    // Commit not go out, the error path takes them back.
    disks.released = true;
    vm.release_disks().map_err(MigrationError::ReleaseLocks)?;
    // The point of no return: after Commit the source never resumes.
    *committed = true;
    let t = Instant::now();
    src.writer.send(Command::Commit, &[])?;
    src.expect(Command::Activated, opts.stall_timeout)
        .map_err(|e| MigrationError::CommitUnknown(Box::new(e)))?;
    phases.activate_ms = ms(t);
    let downtime = pause_start.elapsed();
    tracing::info!(final_pages, ?phases, "stop-and-copy done");
    state.advance(SenderState::Completed)?;
    Ok(MigrationResult {
        total_ms: src.started.elapsed().as_millis() as u64,
        downtime_ms: downtime.as_secs_f64() * 1000.0,
        downtime_breakdown: Some(phases),
        bytes_sent: src.writer.bytes_sent,
        rounds: history.len() as u32,
        mode,
        pages_sent: src.pages_sent,
        zero_pages: src.zero_pages,
        storage: copying.then(|| disks.result.clone()),
    })
}
