//! Live migration of a running VM between two VMM processes, following the Xen
//! stages in the architecture document:
//!
//! - [`protocol`]: the versioned, framed wire format (with the sequence diagram);
//! - [`precopy`]: the source: the dirty-page loop, auto-converge, stop-and-copy
//!   and the commit handshake;
//! - [`postcopy`]: the switch to post-copy: the source pushes and serves pages,
//!   the target faults them in through userfaultfd;
//! - [`receiver`]: the target: builds the VM, fills its memory, restores state
//!   and resumes on commit;
//! - [`convergence`]: the pure decision after each round;
//! - [`transport`], [`progress`], [`vm`]: the stream, the pollable figures, and
//!   what the engine needs from a VM.

pub mod convergence;
pub mod postcopy;
pub mod precopy;
pub mod progress;
pub mod protocol;
pub mod receiver;
pub mod tls;
pub mod transport;
pub mod vm;
pub mod vmm;

use std::time::Duration;

pub use progress::{MigrationResult, ModeUsed, Progress, ProgressHandle, Stage};
pub use protocol::ProtocolError;
pub use vm::{DirtyPages, GuestRegion, SourceVm, TargetVm, VmError};

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
    DirtyLog(#[source] VmError),
    /// The dirty log could not be read.
    #[error("Cannot read the dirty log")]
    TakeDirty(#[source] VmError),
    /// The paused VM's state could not be captured.
    #[error("Cannot save the VM state")]
    SaveState(#[source] VmError),
    /// The target VM could not be built from the source's config.
    #[error("Cannot build the VM on the target")]
    BuildTarget(#[source] VmError),
    /// The target could not restore the state.
    #[error("Cannot restore the VM state on the target")]
    RestoreState(#[source] VmError),
    /// The target could not start the vCPUs.
    #[error("Cannot resume the VM on the target")]
    Resume(#[source] VmError),
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
    /// The connection failed during post-copy, after the guest moved.
    #[error("Post-copy failed after the guest moved to the target; the guest cannot continue")]
    PostCopyLost(#[source] Box<MigrationError>),
    /// TLS could not be set up, or the peer was refused.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// userfaultfd could not be set up or used.
    #[error("userfaultfd {0} failed; post-copy needs it (root, or vm.unprivileged_userfaultfd=1)")]
    Userfault(&'static str, #[source] std::io::Error),
}

#[cfg(test)]
mod tests;
