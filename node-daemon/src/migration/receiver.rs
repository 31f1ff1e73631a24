//! The target of a live migration: [`receive`] builds the VM from the
//! source's Hello, fills its memory from page runs and its disks from disk
//! runs ([`super::storage`]), restores the device and vCPU state, and runs
//! the guest once the source commits, or at once on the switch to
//! post-copy ([`super::postcopy::target`]).
//!
//! ```text
//!  WaitHello   <- Hello: check the VM name, build the VM, check the layout,
//!              answer the disk offers -> HelloAck (post-copy possible?)
//!  Receiving   <- Pages, DiskBlocks, RoundEnd (flush the disks) ...
//!  then either
//!  Restored    <- State, Complete: flush, restore -> Ready; <- Commit
//!  Running     take the image locks, resume -> Activated, announce
//!  or
//!  PostCopy    <- State, PostCopy: fault in the rest while the guest runs
//!  Running     -> Ready once all memory is here
//! ```
//!
//! Until it runs the guest, the target owns nothing the source needs: any error
//! (a malformed stream, a layout mismatch, the source aborting or vanishing)
//! ends the receive with an error, and the caller drops the half-built VM.

use super::error::MigrationError;
use super::guest::{GuestError, TargetVm};
use super::postcopy::recovery::Recovery;
use super::postcopy::target::run as run_post_copy;
use super::progress::{ProgressHandle, Stage};
use super::protocol::{self, Command, Hello, HelloAck};
use super::session::{send_frame, ReceiveOptions, ReceiverState, Rejoin, TargetMemory};
use super::storage;
use super::transport::Conn;
use super::userfaultfd::Userfault;

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
    F: FnOnce(&Hello) -> Result<T, GuestError>,
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
    F: FnOnce(&Hello) -> Result<T, GuestError>,
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
        let _ = send_frame(
            &mut stream,
            Command::Abort,
            godwit_crds::error_chain(e).as_bytes(),
        );
        progress.update(|p| {
            p.stage = Stage::Failed;
            p.error = Some(godwit_crds::error_chain(e));
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
    F: FnOnce(&Hello) -> Result<T, GuestError>,
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
    let post_copy =
        hello.post_copy && hello.disks.is_empty() && Userfault::available(opts.userfaultfd_device);
    send_frame(
        stream,
        Command::HelloAck,
        &protocol::encode_json(&HelloAck {
            post_copy,
            disks,
            discard: post_copy,
        }),
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
            Command::Discard if post_copy => {
                // Post-copy comes next: drop what the guest rewrote while
                // it still runs on the source, out of the downtime.
                for (gpa, pages) in protocol::parse_page_runs(&payload)? {
                    memory.discard(gpa, pages)?;
                }
                send_frame(stream, Command::Discarded, &[])?;
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
                send_frame(stream, Command::Ready, &[])?;
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
                let _ = send_frame(stream, Command::Activated, &[]);
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
                let recovery = rejoin.map(|rejoin| Recovery {
                    rejoin,
                    vm_name: &hello.vm_name,
                    timeout: opts.recover_timeout,
                    stall_timeout: opts.stall_timeout,
                });
                run_post_copy(
                    stream,
                    &vm,
                    memory,
                    &s,
                    &payload,
                    progress,
                    received,
                    recovery,
                    opts.userfaultfd_device,
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
