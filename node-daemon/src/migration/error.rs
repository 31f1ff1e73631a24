//! [`MigrationError`]: what can go wrong in a migration, on either side, live
//! or cold. Every phase returns it, so it sits in a leaf that imports only
//! the types of the causes it carries.

use std::time::Duration;

use super::guest::GuestError;
use super::protocol::{Command, ProtocolError};
use super::tls::TlsError;
use super::userfaultfd::UserfaultError;

/// Errors of a migration, on either side.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The stream carried something the protocol does not allow.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// Setting up the socket failed.
    #[error("Migration socket setup failed")]
    Socket(#[source] std::io::Error),
    /// The target could not be reached.
    #[error("Cannot connect to the migration target {0}; is the target VMM listening there?")]
    Connect(String, #[source] std::io::Error),
    /// Dirty logging could not be turned on.
    #[error("Cannot turn dirty logging on")]
    DirtyLog(#[source] GuestError),
    /// The dirty log could not be read.
    #[error("Cannot read the dirty log")]
    TakeDirty(#[source] GuestError),
    /// The paused VM's state could not be captured.
    #[error("Cannot save the VM state")]
    SaveState(#[source] GuestError),
    /// The target VM could not be built from the source's config.
    #[error("Cannot build the VM on the target")]
    BuildTarget(#[source] GuestError),
    /// The target could not restore the state.
    #[error("Cannot restore the VM state on the target")]
    RestoreState(#[source] GuestError),
    /// The target could not start the vCPUs.
    #[error("Cannot resume the VM on the target")]
    Resume(#[source] GuestError),
    /// The peer sent Abort.
    #[error("The peer aborted the migration: {0}")]
    PeerAbort(String),
    /// The stream ended before the migration did.
    #[error("The migration stream closed unexpectedly")]
    StreamClosed,
    /// The completion timeout passed.
    #[error("Migration did not complete within {0:?}; the VM keeps running on the source")]
    Timeout(Duration),
    /// Cancelled by the caller.
    #[error("Migration cancelled; the VM keeps running on the source")]
    Cancelled,
    /// A state machine was asked for a transition it does not have.
    #[error("Invalid migration state transition {0} -> {1}")]
    InvalidTransition(String, String),
    /// Source and target memory layouts differ.
    #[error("The source's memory layout does not match the VM built on the target")]
    LayoutMismatch,
    /// A page run lies outside guest memory.
    #[error("Page {0:#x} is outside guest memory")]
    PageOutOfRange(u64),
    /// The stream is for another VM.
    #[error("Stream for VM {got:?} refused: this target expects {expected:?}")]
    WrongVm {
        /// What the source said.
        got: String,
        /// What the target was prepared for.
        expected: String,
    },
    /// The connection failed after Commit was sent.
    #[error("No confirmation from the target after commit: the VM stays paused on the source and may be running on the target")]
    CommitUnknown(#[source] Box<MigrationError>),
    /// A post-copy link was lost and did not come back in time.
    #[error("The migration link was lost during post-copy and did not come back within {0:?}")]
    LinkNotBack(Duration, #[source] Box<MigrationError>),
    /// The connection failed during post-copy, after the guest moved.
    #[error("Post-copy failed after the guest moved to the target; the guest cannot continue")]
    PostCopyLost(#[source] Box<MigrationError>),
    /// TLS could not be set up, or the peer was refused.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A disk operation of live storage migration failed.
    #[error("Disk {0}: {1} failed during storage migration; the VM keeps running on the source with its disk")]
    Disk(usize, &'static str, #[source] GuestError),
    /// The target's disk does not have the source's size.
    #[error("Disk {disk} is {source_size} bytes on the source but {target_size} on the target; create the target disk with the same virtual size")]
    DiskSize {
        /// Disk index.
        disk: usize,
        /// Size on the source.
        source_size: u64,
        /// Size on the target.
        target_size: u64,
    },
    /// Blocks arrived for a disk the Hello did not offer.
    #[error("Blocks for disk {0}, which the source did not offer")]
    DiskNotOffered(u32),
    /// A disk run lies beyond the disk.
    #[error("Disk {0} run at {1:#x} lies beyond the disk")]
    DiskRangeOutOfDisk(u32, u64),
    /// The disk image locks could not be handed over.
    #[error("Cannot take over the disk image locks on the target; the guest does not run here")]
    DiskLocks(#[source] GuestError),
    /// The source could not flush its disks and release their locks.
    #[error("Cannot flush the disks and release their image locks on the source; the VM keeps running here")]
    ReleaseLocks(#[source] GuestError),
    /// A disk operation of a cold migration failed.
    #[error("Disk {0}: {1} failed during cold migration; the VM stays stopped on the source with its disks")]
    ColdDisk(usize, &'static str, #[source] GuestError),
    /// What the target holds after a cold migration is not what was sent.
    #[error("Verification on the target failed: {0}; the VM stays on the source with its disks")]
    ColdVerify(String),
    /// The target could not make the VM's directory, config or disks.
    #[error("The target could not prepare the VM's files")]
    ColdPrepare(#[source] GuestError),
    /// A cold migration was cancelled.
    #[error("Cold migration cancelled; the VM stays stopped on the source with its disks")]
    ColdCancelled,
    /// userfaultfd could not be set up or used.
    #[error("Post-copy needs userfaultfd (root, or vm.unprivileged_userfaultfd=1)")]
    Userfault(#[from] UserfaultError),
}

impl MigrationError {
    /// What a frame other than the awaited one means: the peer's `Abort`
    /// (with its reason), or a protocol violation.
    pub(crate) fn unexpected(
        got: Command,
        payload: &[u8],
        expected: &'static str,
    ) -> MigrationError {
        match got {
            Command::Abort => {
                MigrationError::PeerAbort(String::from_utf8_lossy(payload).into_owned())
            }
            got => ProtocolError::Unexpected { got, expected }.into(),
        }
    }
}
