//! The source of a live migration: [`send`] runs the phases in order on one
//! connection.
//!
//! ```text
//!  Handshake       Hello (memory layout, config, disks) -> HelloAck
//!  disks           tracking on, bulk copy               (super::storage)
//!  PreCopy         round 0, rounds, auto-converge       (super::precopy)
//!  then either
//!  StopAndCopy     pause, last disk blocks, last pages, State, Complete
//!  Committing      <- Ready, release the image locks, Commit, <- Activated
//!  Completed
//!  or
//!  PostCopy        pause, State, PostCopy, push and serve pages
//!                                                       (super::postcopy::source)
//!  Committing      Complete, <- Ready
//! ```
//!
//! Until `Commit` is sent the guest can always resume here: every error path
//! stops the throttle, resumes the vCPUs if they were paused and turns dirty
//! logging off. After `Commit` (or after the switch to post-copy) the guest
//! belongs to the target; a failure then leaves the source paused and says so.

use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use super::error::MigrationError;
use super::guest::{DirtyPages, SourceVm};
use super::postcopy::source::serve as serve_post_copy;
use super::precopy::{self, Switch, Throttle};
use super::progress::{DowntimeBreakdown, MigrationSummary, ProgressHandle, Stage};
use super::protocol::{self, Command, Hello, HelloAck, STORAGE_VERSION};
use super::session::{RoundDisks, SendOptions, SenderState, Source};
use super::storage::{self, DiskSender};
use super::transport::{self, Conn, Incoming};
use godwit_crds::error_chain;

/// Migrates the running `vm` over `stream` (connected to a target VMM that
/// called [`super::receiver::receive`]; plain or TLS, handshake done). On
/// success the guest runs on the target and this VM is paused for good; on
/// failure before commit the guest keeps running here.
pub fn send<V: SourceVm>(
    vm: &V,
    stream: Conn,
    opts: &SendOptions,
    progress: &ProgressHandle,
    cancel: &AtomicBool,
) -> Result<MigrationSummary, MigrationError> {
    progress.start();
    progress.update(|p| p.stage = Stage::Handshake);
    transport::tune(stream.socket(), opts.stall_timeout).map_err(MigrationError::Socket)?;
    let read_half = stream.try_clone().map_err(MigrationError::Socket)?;
    let (tx, rx) = channel();
    let throttle = Throttle::default();
    let mut src = Source::new(vm, stream, rx, opts, progress, cancel);
    let memory_total: u64 = src.regions.iter().map(|r| r.size).sum();
    progress.update(|p| p.memory_total_bytes = memory_total);

    let outcome = std::thread::scope(|s| {
        s.spawn(move || transport::reader_loop(read_half, tx));
        let throttler = s.spawn(|| throttle.run(vm));
        let mut paused = false;
        let mut committed = false;
        let mut disks = DiskSender::default();
        let result = run(&mut src, &throttle, &mut paused, &mut committed, &mut disks)
            .map_err(|e| explain(&src.incoming, e));
        disks.stop(vm);
        throttle.stop();
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
        src.close();
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

/// Before the switch to post-copy, while the guest still runs here: the
/// target drops its stale copies of the pages dirtied so far (all of them
/// go into `pending`) and says when it is done, so that the pause that
/// follows only drops what the guest dirties meanwhile. Giving back
/// hundreds of MiB takes tens of milliseconds (33 ms for 512 MiB here).
fn discard_stale<V: SourceVm>(
    src: &mut Source<'_, V>,
    pending: &mut [DirtyPages],
) -> Result<(), MigrationError> {
    precopy::take_last(src.vm, pending)?;
    let runs: Vec<(u64, u32)> = pending.iter().flat_map(DirtyPages::gpa_runs).collect();
    src.writer
        .send(Command::Discard, &protocol::encode_page_runs(&runs))?;
    src.expect(Command::Discarded, src.opts.stall_timeout)?;
    Ok(())
}

/// Nice value of the pre-copy thread: a CPU share about a tenth of a vCPU's
/// when they compete.
const PRECOPY_NICE: libc::c_int = 10;

/// Lowers the calling thread's priority to [`PRECOPY_NICE`] (on Linux,
/// `setpriority` of "process" 0 is the calling thread alone). Best effort: a
/// host that refuses leaves the thread as it was.
fn yield_to_guest() {
    // SAFETY: setpriority with integer arguments only.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, PRECOPY_NICE) } != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "cannot lower the pre-copy thread's priority"
        );
    }
}

/// The phases, in order; `paused`, `committed` and `disks` tell [`send`]
/// what to undo on failure.
fn run<V: SourceVm>(
    src: &mut Source<'_, V>,
    throttle: &Throttle,
    paused: &mut bool,
    committed: &mut bool,
    disks: &mut DiskSender,
) -> Result<MigrationSummary, MigrationError> {
    let opts = src.opts;
    let vm = src.vm;
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
    src.advance(SenderState::PreCopy)?;
    src.progress.update(|p| p.stage = Stage::PreCopy);
    // Disks first: tracking on, then the allocated ranges, while the guest
    // runs; what it writes meanwhile goes in the rounds.
    disks.start(vm, &hello.disks, &ack.disks)?;
    // The copying beside the running guest, on a thread of lower priority
    // than the vCPUs: where the host has no core to spare, the guest keeps
    // its pace and the copy takes what is left. The phases with the guest
    // paused, or running on the target, go on here at the usual priority.
    let mut copied = std::thread::scope(|s| {
        let copier = std::thread::Builder::new()
            .name("migrate-precopy".into())
            .spawn_scoped(s, || {
                yield_to_guest();
                storage::send_bulk(src, disks)?;
                precopy::iterate(src, &policy, throttle, disks)
            })
            .map_err(MigrationError::Socket)?;
        copier
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })?;
    if copied.switch == Switch::PostCopy {
        if ack.discard {
            discard_stale(src, &mut copied.pending)?;
        }
        src.advance(SenderState::PostCopy)?;
        let pause_start = throttle.pause(vm);
        *paused = true;
        precopy::take_last(vm, &mut copied.pending)?;
        let vm_state = vm.save_state().map_err(MigrationError::SaveState)?;
        let result = serve_post_copy(
            src,
            &copied.pending,
            &vm_state,
            pause_start,
            &copied.history,
            committed,
        )?;
        src.advance(SenderState::Committing)?;
        return Ok(result);
    }

    src.advance(SenderState::StopAndCopy)?;
    src.progress.update(|p| p.stage = Stage::StopAndCopy);
    let pause_start = throttle.pause(vm);
    *paused = true;
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1000.0;
    let mut phases = DowntimeBreakdown {
        pause_ms: ms(pause_start),
        ..Default::default()
    };
    let t = Instant::now();
    let final_disk = disks.collect(vm)?;
    disks.send_pending(src)?;
    disks.result.final_dirty_bytes = final_disk;
    disks.result.final_ms = ms(t);
    let (final_pages, vm_state) = precopy::stop_and_copy(src, &mut copied.pending, &mut phases)?;
    let t = Instant::now();
    src.writer.send(Command::State, &vm_state)?;
    src.writer.send(Command::Complete, &[])?;
    src.advance(SenderState::Committing)?;
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
    src.advance(SenderState::Completed)?;
    Ok(MigrationSummary {
        total_ms: src.started.elapsed().as_millis() as u64,
        downtime_ms: downtime.as_secs_f64() * 1000.0,
        downtime_breakdown: Some(phases),
        bytes_sent: src.writer.bytes_sent,
        rounds: copied.history.len() as u32,
        mode: copied.mode,
        pages_sent: src.pages_sent,
        zero_pages: src.zero_pages,
        storage: copying.then(|| disks.result.clone()),
    })
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
