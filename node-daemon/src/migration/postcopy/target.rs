//! The target in post-copy: the guest runs here while the rest of its
//! memory arrives. Guest RAM is registered with userfaultfd; the fault
//! thread asks the source for a page the guest touches that is still there
//! (`PageRequest`) and zero-fills one that was never sent as data (it was
//! zero on the source); the receive thread installs the pages that arrive
//! with `UFFDIO_COPY`, which wakes the faulting vCPU. A page's "still
//! needed" bit ([`super::needed`]) is cleared only after its data is
//! installed, so the fault thread can never zero-fill a page whose data is
//! on its way. A lost link is bridged by [`super::recovery`].
//!
//! On transparent huge pages, a page that never arrived may be present
//! (zero) because a neighbour in its huge page did, and then it never
//! faults. That is right as long as every page still to come is dropped
//! here first: what is still to come is the source's dirty set since round
//! 0 and, when round 0 stopped part-way, the pages it had not reached that
//! may hold data, and that is exactly the needed set this drops. A page
//! round 0 neither reached nor counted is one the source knows is zero.

use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::needed::Needed;
use super::recovery::{connection_lost, link_quiet, reconnect_target, Recovery};
use crate::migration::error::MigrationError;
use crate::migration::guest::TargetVm;
use crate::migration::progress::{ProgressHandle, Stage};
use crate::migration::protocol::{self, Command, PAGE_SIZE};
use crate::migration::session::{send_frame, TargetMemory};
use crate::migration::transport::Conn;
use crate::migration::userfaultfd::Userfault;

/// Installs pages from `reader` until `Complete`.
fn receive_pages(
    reader: &mut Conn,
    memory: &TargetMemory,
    uffd: &Userfault,
    needed: &Needed,
    progress: &ProgressHandle,
    received: &mut u64,
) -> Result<(), MigrationError> {
    let mut payload = Vec::new();
    loop {
        let header = protocol::read_frame(reader, &mut payload)?;
        *received += (protocol::HEADER_LEN + payload.len()) as u64;
        match header.command {
            Command::Pages => {
                for run in protocol::parse_pages(&payload)? {
                    let len = u64::from(run.pages) * PAGE_SIZE as u64;
                    let (r, region) = memory.find(run.gpa, len)?;
                    let dst = region.host_ptr(run.gpa);
                    // A page sent again after a reconnection may be here
                    // already: `copy` and `zero` leave present pages alone.
                    match run.data {
                        Some(data) => uffd.copy(dst, data)?,
                        None => uffd.zero(dst, len)?,
                    }
                    let first = (run.gpa - region.gpa) / PAGE_SIZE as u64;
                    for p in first..first + u64::from(run.pages) {
                        needed.clear(r, p);
                    }
                }
                progress.update(|p| p.transferred_bytes = *received);
            }
            Command::Complete => return Ok(()),
            got => {
                return Err(MigrationError::unexpected(
                    got,
                    &payload,
                    "Pages or Complete",
                ))
            }
        }
    }
}

fn send_locked(w: &Mutex<Conn>, command: Command, payload: &[u8]) -> Result<(), MigrationError> {
    send_frame(&mut w.lock().unwrap(), command, payload)
}

/// The target after `PostCopy`: fault in what is missing while the guest
/// runs. With `recovery`, a lost link waits for the source to reconnect
/// ([`reconnect_target`]) instead of losing the guest. `userfaultfd_device`
/// is an open `/dev/userfaultfd` to fall back on ([`Userfault::open`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn run<T: TargetVm>(
    stream: &mut Conn,
    vm: &T,
    memory: TargetMemory,
    state: &[u8],
    needed_payload: &[u8],
    progress: &ProgressHandle,
    mut received: u64,
    recovery: Option<Recovery<'_>>,
    userfaultfd_device: Option<BorrowedFd<'_>>,
) -> Result<(), MigrationError> {
    let mut memory = memory;
    let runs = protocol::parse_page_runs(needed_payload)?;
    let needed = Needed::new(&memory.regions);
    for (gpa, pages) in &runs {
        let len = u64::from(*pages) * PAGE_SIZE as u64;
        let (r, region) = memory.find(*gpa, len)?;
        let first = (gpa - region.gpa) / PAGE_SIZE as u64;
        for p in first..first + u64::from(*pages) {
            needed.mark_needed(r, p);
        }
        // Drop the stale copy so the next touch faults and fetches it (most
        // went before the pause, with `Discard`).
        memory.discard(*gpa, *pages)?;
    }
    let uffd = Userfault::open(userfaultfd_device)?;
    for r in &memory.regions {
        uffd.register(r.host, r.size)?;
    }
    let writer = Mutex::new(stream.try_clone().map_err(MigrationError::Socket)?);
    let stop = AtomicBool::new(false);
    // Set just before the ranges are unregistered at the end.
    let released = AtomicBool::new(false);
    // The guest runs here (told to a reconnecting source).
    let running = AtomicBool::new(false);
    // Restoring or resuming failed: no point waiting for the source.
    let failed = AtomicBool::new(false);

    let outcome = std::thread::scope(|s| {
        let fault_thread = s.spawn(|| -> Result<(), MigrationError> {
            while !stop.load(Ordering::Relaxed) {
                let mut requests = Vec::new();
                for host in uffd.faults(20)? {
                    let Some((r, page)) = needed.locate_host(host) else {
                        continue;
                    };
                    if needed.is_needed(r, page) {
                        needed.mark_requested(r, page);
                        requests.push(needed.regions[r].gpa + page * PAGE_SIZE as u64);
                    } else {
                        // Never sent as data: it was zero on the source.
                        match uffd.zero(host as *mut u8, PAGE_SIZE as u64) {
                            // A fault read just before the ranges were
                            // unregistered: the kernel now fills the page
                            // itself (ENOENT = range no longer registered).
                            Err(e)
                                if e.raw_os_error() == Some(libc::ENOENT)
                                    && released.load(Ordering::Acquire) => {}
                            other => other?,
                        }
                    }
                }
                if !requests.is_empty() {
                    let sent = send_locked(
                        &writer,
                        Command::PageRequest,
                        &protocol::encode_page_request(&requests),
                    );
                    match sent {
                        Ok(()) => {}
                        // The receive thread sees the lost link too and
                        // asks again for these on the next connection.
                        Err(e) if recovery.is_some() => {
                            tracing::debug!(
                                "page request not sent: {}",
                                godwit_crds::error_chain(&e)
                            )
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            Ok(())
        });

        // Pages are read and installed by their own thread from the start:
        // restoring the state may itself fault on a missing page, whose data
        // can only arrive if someone keeps reading the stream.
        let mut reader = stream.try_clone().map_err(MigrationError::Socket)?;
        let (memory, uffd, needed, writer, running, failed, recovery) = (
            &memory, &uffd, &needed, &writer, &running, &failed, &recovery,
        );
        let receive_thread = s.spawn(move || -> Result<u64, MigrationError> {
            let mut received = received;
            // While recovering: when the source must be back by.
            let mut deadline: Option<Instant> = None;
            loop {
                let before = received;
                let e =
                    match receive_pages(&mut reader, memory, uffd, needed, progress, &mut received)
                    {
                        Ok(()) => return Ok(received),
                        Err(e) => e,
                    };
                // A source that closed or reset the connection is gone (its
                // VMM exited, or it gave up): only a quiet or unreachable
                // link is waited for. A resumed connection that ends before
                // it carried a frame was one the source had already given
                // up on (it dials again when our answer is slow).
                let stale = deadline.is_some() && received == before;
                let rec = match recovery {
                    Some(rec)
                        if (link_quiet(&e) || (stale && connection_lost(&e)))
                            && !failed.load(Ordering::Acquire) =>
                    {
                        rec
                    }
                    _ => return Err(e),
                };
                // A new loss once frames flow again; a resumed connection
                // that ends before it carried a frame was one the source had
                // already given up on (it dials again when our answer is
                // slow): the same loss, the same deadline.
                if deadline.is_none() || received != before {
                    deadline = Some(Instant::now() + rec.timeout);
                }
                reader = reconnect_target(
                    rec,
                    &e,
                    &reader,
                    deadline.expect("set above"),
                    (needed, running, writer, failed),
                    progress,
                )?;
            }
        });
        let started = (|| -> Result<(), MigrationError> {
            vm.restore_state(state)
                .map_err(MigrationError::RestoreState)?;
            // The disks, now: a vCPU thread may not open files.
            vm.activate_disks_unlocked()
                .map_err(MigrationError::DiskLocks)?;
            vm.resume().map_err(MigrationError::Resume)?;
            running.store(true, Ordering::Release);
            match send_locked(writer, Command::Activated, &[]) {
                Ok(()) => {}
                // A reconnecting source learns it from ResumeAck.
                Err(e) if recovery.is_some() => {
                    tracing::warn!("Activated not sent: {}", godwit_crds::error_chain(&e))
                }
                Err(e) => return Err(e),
            }
            vm.announce();
            progress.update(|p| p.stage = Stage::PostCopy);
            Ok(())
        })();
        if started.is_err() {
            // Unblock the receive thread.
            failed.store(true, Ordering::Release);
            stream.shutdown();
        }
        let joined = receive_thread.join();
        let result = started.and_then(|()| match joined {
            Ok(r) => r.map(|total| received = total),
            Err(_) => Err(MigrationError::StreamClosed),
        });
        // All memory is local (or the migration failed): stop routing faults,
        // which also wakes anything still waiting, then stop the fault thread.
        released.store(true, Ordering::Release);
        for r in &memory.regions {
            let _ = uffd.unregister(r.host, r.size);
        }
        stop.store(true, Ordering::Relaxed);
        let faults = fault_thread.join().unwrap_or(Ok(()));
        result.and(faults)
    });
    outcome.map_err(|e| MigrationError::PostCopyLost(Box::new(e)))?;
    send_locked(&writer, Command::Ready, &[])?;
    // The source lets its image locks go when it exits, right after Ready:
    // take them then (here, not on a vCPU thread).
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = vm.lock_disks() {
        if Instant::now() > deadline {
            tracing::warn!("post-copy target still runs without its disk image locks: {e}");
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    progress.update(|p| {
        p.stage = Stage::Completed;
        p.transferred_bytes = received;
    });
    Ok(())
}
