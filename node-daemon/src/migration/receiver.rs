//! The target side of a live migration: build the VM from the source's Hello,
//! fill its memory from page runs, restore the device and vCPU state, and run
//! the guest once the source commits (or at once, for post-copy).
//!
//! ```text
//!  WaitHello -> Receiving -> Restored -> Running          (pre-copy)
//!                        \-> PostCopy  -> Running          (post-copy)
//! ```
//!
//! Until it runs the guest, the target owns nothing the source needs: any error
//! (a malformed stream, a layout mismatch, the source aborting or vanishing)
//! ends the receive with an error, and the caller drops the half-built VM.

use std::io::Write;
use std::time::Duration;

use super::postcopy;
use super::progress::{ProgressHandle, Stage};
use super::protocol::{self, Command, Hello, HelloAck, PAGE_SIZE};
use super::storage;
use super::transport::Conn;
use super::vm::{GuestRegion, TargetVm, VmError};
use super::MigrationError;

/// How to receive.
#[derive(Clone, Debug)]
pub struct ReceiveOptions {
    /// Refuse a stream for another VM (`None`: accept any).
    pub expected_vm: Option<String>,
    /// Fail when the source is silent this long.
    pub stall_timeout: Duration,
    /// In post-copy, after the link was lost, how long to wait for the
    /// source to connect again ([`super::postcopy`]; needs a [`Rejoin`]).
    pub recover_timeout: Duration,
}

impl Default for ReceiveOptions {
    fn default() -> Self {
        ReceiveOptions {
            expected_vm: None,
            stall_timeout: Duration::from_secs(10),
            recover_timeout: super::postcopy::RECOVER_TIMEOUT,
        }
    }
}

/// How the target takes the source's next connection when a post-copy link
/// is lost: waits until the deadline for a connection (TLS handshake done)
/// on the address the migration came in on; `None` if none came.
pub type Rejoin<'a> =
    dyn Fn(std::time::Instant) -> Result<Option<Conn>, MigrationError> + Sync + 'a;

/// The receiver's states; [`ReceiverState::advance`] refuses any other order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReceiverState {
    /// Waiting for Hello.
    WaitHello,
    /// Filling memory.
    Receiving,
    /// State restored, waiting for Commit.
    Restored,
    /// Guest running here, memory arriving on demand.
    PostCopy,
    /// Guest running here, all memory local.
    Running,
}

impl ReceiverState {
    /// Moves to `next` if the protocol allows it.
    pub fn advance(self, next: ReceiverState) -> Result<ReceiverState, MigrationError> {
        use ReceiverState::*;
        let ok = matches!(
            (self, next),
            (WaitHello, Receiving)
                | (Receiving, Restored)
                | (Receiving, PostCopy)
                | (Restored, Running)
                | (PostCopy, Running)
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

/// Guest memory on the target, with a bit per page that has received data (so
/// a page that later turns all-zero is cleared, and one that was always zero
/// is never touched).
pub(crate) struct TargetMemory {
    pub regions: Vec<GuestRegion>,
    pub written: Vec<Vec<u64>>,
}

impl TargetMemory {
    pub fn new(regions: Vec<GuestRegion>) -> TargetMemory {
        let written = regions
            .iter()
            .map(|r| vec![0u64; (r.size / PAGE_SIZE as u64).div_ceil(64) as usize])
            .collect();
        TargetMemory { regions, written }
    }

    /// The region holding `gpa .. gpa + len`, and its index.
    pub fn find(&self, gpa: u64, len: u64) -> Result<(usize, GuestRegion), MigrationError> {
        self.regions
            .iter()
            .enumerate()
            .find(|(_, r)| r.contains(gpa, len))
            .map(|(i, r)| (i, *r))
            .ok_or(MigrationError::PageOutOfRange(gpa))
    }

    /// Applies a Pages payload with plain memory writes (the guest is not running).
    pub fn apply(&mut self, payload: &[u8]) -> Result<u64, MigrationError> {
        let runs = protocol::parse_pages(payload)?;
        let mut pages = 0;
        for run in &runs {
            let len = u64::from(run.pages) * PAGE_SIZE as u64;
            let (idx, region) = self.find(run.gpa, len)?;
            let first = (run.gpa - region.gpa) / PAGE_SIZE as u64;
            let written = &mut self.written[idx];
            match run.data {
                Some(data) => {
                    // SAFETY: the run lies inside the region (checked by
                    // `find`), whose mapping lives as long as the target VM;
                    // its vCPUs do not run while pre-copy pages arrive.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            data.as_ptr(),
                            region.host_ptr(run.gpa),
                            data.len(),
                        )
                    };
                    for p in first..first + u64::from(run.pages) {
                        written[(p / 64) as usize] |= 1 << (p % 64);
                    }
                }
                None => {
                    for p in first..first + u64::from(run.pages) {
                        let (w, b) = ((p / 64) as usize, p % 64);
                        if written[w] & (1 << b) != 0 {
                            // SAFETY: as above; one page inside the region.
                            unsafe {
                                std::ptr::write_bytes(
                                    region.host_ptr(region.gpa + p * PAGE_SIZE as u64),
                                    0,
                                    PAGE_SIZE,
                                )
                            };
                            written[w] &= !(1 << b);
                        }
                    }
                }
            }
            pages += u64::from(run.pages);
        }
        Ok(pages)
    }
}

fn send(stream: &mut Conn, command: Command, payload: &[u8]) -> Result<(), MigrationError> {
    protocol::write_frame(stream, command, payload)?;
    stream
        .flush()
        .map_err(|e| MigrationError::Protocol(protocol::ProtocolError::Io(e)))
}

/// Receives a migration on `stream` (plain, or TLS with the handshake done),
/// building the VM with `build` from the source's Hello. Returns the VM
/// running the guest.
pub fn receive<T, F>(
    stream: Conn,
    build: F,
    opts: &ReceiveOptions,
    progress: &ProgressHandle,
) -> Result<T, MigrationError>
where
    T: TargetVm,
    F: FnOnce(&Hello) -> Result<T, VmError>,
{
    receive_recoverable(stream, build, opts, progress, None)
}

/// [`receive`], and if the link is lost during post-copy, takes the
/// source's next connection from `rejoin` and carries on.
pub fn receive_recoverable<T, F>(
    mut stream: Conn,
    build: F,
    opts: &ReceiveOptions,
    progress: &ProgressHandle,
    rejoin: Option<&Rejoin<'_>>,
) -> Result<T, MigrationError>
where
    T: TargetVm,
    F: FnOnce(&Hello) -> Result<T, VmError>,
{
    progress.start();
    progress.update(|p| p.stage = Stage::Handshake);
    stream
        .socket()
        .set_read_timeout(Some(opts.stall_timeout))
        .and_then(|()| stream.socket().set_nodelay(true))
        .map_err(MigrationError::Socket)?;
    let result = receive_inner(&mut stream, build, opts, progress, rejoin);
    if let Err(e) = &result {
        // Tell the source why, so it resumes the guest at once instead of
        // waiting for a timeout. Best effort: the stream may be gone.
        let _ = send(
            &mut stream,
            Command::Abort,
            crate::error_chain(e).as_bytes(),
        );
        progress.update(|p| {
            p.stage = Stage::Failed;
            p.error = Some(crate::error_chain(e));
        });
    }
    result
}

fn receive_inner<T, F>(
    stream: &mut Conn,
    build: F,
    opts: &ReceiveOptions,
    progress: &ProgressHandle,
    rejoin: Option<&Rejoin<'_>>,
) -> Result<T, MigrationError>
where
    T: TargetVm,
    F: FnOnce(&Hello) -> Result<T, VmError>,
{
    let mut payload = Vec::new();
    let mut state = ReceiverState::WaitHello;
    let header = protocol::read_frame(stream, &mut payload)?;
    if header.command != Command::Hello {
        return Err(protocol::ProtocolError::Unexpected {
            got: header.command,
            expected: "Hello",
        }
        .into());
    }
    let hello: Hello = protocol::parse_json(Command::Hello, &payload)?;
    if let Some(expected) = &opts.expected_vm {
        if &hello.vm_name != expected {
            return Err(MigrationError::WrongVm {
                got: hello.vm_name,
                expected: expected.clone(),
            });
        }
    }
    let vm = build(&hello).map_err(MigrationError::BuildTarget)?;
    let regions = vm.regions();
    let layout: Vec<(u64, u64)> = regions.iter().map(|r| (r.gpa, r.size)).collect();
    if layout != hello.memory {
        return Err(MigrationError::LayoutMismatch);
    }
    if !hello.disks.is_empty() && header.version < protocol::STORAGE_VERSION {
        return Err(protocol::ProtocolError::Malformed {
            command: Command::Hello,
            reason: "disks offered in a version 1 stream",
        }
        .into());
    }
    let disks = storage::accept(&vm, &hello.disks)?;
    let post_copy = hello.post_copy && hello.disks.is_empty() && postcopy::available();
    send(
        stream,
        Command::HelloAck,
        &protocol::encode_json(&HelloAck { post_copy, disks }),
    )?;
    state = state.advance(ReceiverState::Receiving)?;
    progress.update(|p| {
        p.stage = Stage::PreCopy;
        p.memory_total_bytes = layout.iter().map(|(_, s)| s).sum();
    });

    let mut memory = TargetMemory::new(regions);
    let mut vm_state: Option<Vec<u8>> = None;
    let mut received: u64 = 0;
    loop {
        let header = protocol::read_frame(stream, &mut payload)?;
        received += (protocol::HEADER_LEN + payload.len()) as u64;
        match header.command {
            Command::Pages => {
                memory.apply(&payload)?;
            }
            Command::DiskBlocks => {
                storage::apply(&vm, &hello.disks, &payload)?;
            }
            Command::RoundEnd => {
                let (round, _pages) = protocol::parse_round_end(&payload)?;
                // Make the round's disk writes durable now, while the guest
                // still runs on the source, so the flush before Ready (in the
                // downtime) has only the last set to write.
                storage::flush(&vm, &hello.disks)?;
                progress.update(|p| {
                    p.round = round;
                    p.transferred_bytes = received;
                });
            }
            Command::State => vm_state = Some(std::mem::take(&mut payload)),
            Command::Complete => {
                let s = vm_state
                    .as_deref()
                    .ok_or(protocol::ProtocolError::Unexpected {
                        got: Command::Complete,
                        expected: "State before Complete",
                    })?;
                storage::flush(&vm, &hello.disks)?;
                vm.restore_state(s).map_err(MigrationError::RestoreState)?;
                state = state.advance(ReceiverState::Restored)?;
                progress.update(|p| p.stage = Stage::Committing);
                send(stream, Command::Ready, &[])?;
                let header = protocol::read_frame(stream, &mut payload)?;
                if header.command != Command::Commit {
                    return Err(MigrationError::unexpected(
                        header.command,
                        &payload,
                        "Commit",
                    ));
                }
                // Lock hand-over (storage::lock): the source released its
                // locks before Commit; take them before the guest runs.
                vm.activate_disks().map_err(MigrationError::DiskLocks)?;
                vm.resume().map_err(MigrationError::Resume)?;
                state.advance(ReceiverState::Running)?;
                // The guest runs here now; a lost Activated only delays the
                // source's cleanup.
                let _ = send(stream, Command::Activated, &[]);
                vm.announce();
                progress.update(|p| {
                    p.stage = Stage::Completed;
                    p.transferred_bytes = received;
                });
                return Ok(vm);
            }
            Command::PostCopy => {
                let s = vm_state.take().ok_or(protocol::ProtocolError::Unexpected {
                    got: Command::PostCopy,
                    expected: "State before PostCopy",
                })?;
                state = state.advance(ReceiverState::PostCopy)?;
                let recovery = rejoin.map(|rejoin| postcopy::Recovery {
                    rejoin,
                    vm_name: &hello.vm_name,
                    timeout: opts.recover_timeout,
                    stall_timeout: opts.stall_timeout,
                });
                postcopy::target_run(
                    stream, &vm, memory, &s, &payload, progress, received, recovery,
                )?;
                state.advance(ReceiverState::Running)?;
                return Ok(vm);
            }
            Command::Abort => {
                return Err(MigrationError::PeerAbort(
                    String::from_utf8_lossy(&payload).into_owned(),
                ))
            }
            got => {
                return Err(protocol::ProtocolError::Unexpected {
                    got,
                    expected: "Pages, DiskBlocks, RoundEnd, State, Complete or PostCopy",
                }
                .into())
            }
        }
    }
}
