//! The migration engine: moves a VM between two nodes. Live migration moves
//! a running guest between two VMM processes (memory, device and vCPU
//! state, and node-local disks); cold migration ([`cold`]) moves a stopped
//! VM's disks and config between two node agents. The engine knows the
//! guest only through two traits ([`guest`]), which the VMM implements
//! (`vmm::migrate`) and the unit tests implement over plain memory, so it
//! depends on nothing above it: `vmm -> migration -> storage`.
//!
//! ## A live migration
//!
//! [`sender::send`] on the source and [`receiver::receive`] on the target
//! run the phases in order over one connection ([`protocol`] draws the
//! frames):
//!
//! ```text
//!  source (sender)                               target (receiver)
//!  ---------------                               -----------------
//!  Hello: layout, config, disks   ---------->    build the VM, check the layout
//!                                 <----------    HelloAck: post-copy?, bases held
//!  storage: bulk copy of the disks --------->    storage: write
//!  precopy: round 0, rounds, throttle ------>    fill memory, flush disks per round
//!  convergence decides:
//!   stop-and-copy: pause, last blocks,
//!     last pages, State, Complete --------->    restore the state
//!                                 <----------    Ready
//!     release the image locks, Commit ----->    take the locks, resume
//!                                 <----------    Activated
//!   post-copy: pause, State, PostCopy ----->    restore, resume, fault pages in
//!     postcopy::source: push, serve <------->    postcopy::target: ask, install
//!     (link lost: postcopy::recovery on both ends)
//!     Complete                    ---------->
//!                                 <----------    Ready
//! ```
//!
//! ## Modules
//!
//! The sequencers import the phases; the phases import only the leaves
//! below them; the leaves import nothing from either.
//!
//! - Sequencers: [`sender`], [`receiver`] (live); [`cold`] (its own sender
//!   and receiver).
//! - Phases: [`precopy`] (the dirty-page loop, auto-converge, the last
//!   copy), [`storage`] (disks in the stream, both ends), [`postcopy`]
//!   (source, target, recovery).
//! - Leaves: [`session`] (what a sender or receiver session carries: the
//!   options, the state machines, the source's stream and page batch, the
//!   target's memory), [`protocol`] (the versioned wire format),
//!   [`transport`] (the byte stream, bandwidth cap, reader thread),
//!   [`connect`] (dialling and accepting, with TLS), [`tls`] (mutual TLS),
//!   [`userfaultfd`] (the raw ioctls), [`convergence`] (the pure decision
//!   after each round), [`progress`] (the pollable figures), [`guest`] (the
//!   guest traits), [`pagemap`] (which pages of anonymous memory were never
//!   written), [`error`] ([`MigrationError`]).
//!
//! Measurements (TLS cost, parallel streams) are in `docs/migration.md`.

pub mod cold;
pub mod connect;
pub mod convergence;
pub mod error;
pub mod guest;
pub mod pagemap;
pub mod postcopy;
pub mod precopy;
pub mod progress;
pub mod protocol;
pub mod receiver;
pub mod sender;
pub mod session;
pub mod storage;
pub mod tls;
pub mod transport;
pub mod userfaultfd;

pub use error::MigrationError;
pub use guest::{DirtyPages, GuestError, GuestRegion, SourceVm, TargetVm};
pub use progress::{MigrationSummary, ModeUsed, Progress, ProgressHandle, Stage, StorageResult};
pub use protocol::ProtocolError;
pub use receiver::{receive, receive_recoverable};
pub use sender::send;
pub use session::{ReceiveOptions, Reconnect, SendOptions, RECOVER_TIMEOUT};

#[cfg(test)]
mod tests;
