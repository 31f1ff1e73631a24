//! The control protocol of `godwit-vmm`, and the one client that speaks it.
//!
//! Each VMM process serves a unix socket. A caller writes one JSON request
//! per line and reads one JSON response per line:
//!
//! ```text
//! -> {"v":1,"cmd":"status"}
//! <- {"v":1,"ok":true,"result":{"state":"running","config":{...},"pid":4242}}
//! -> {"v":1,"cmd":"save-state","dir":"/tmp/snap"}
//! <- {"v":1,"ok":true,"result":{"dir":"/tmp/snap"}}
//! -> {"v":9,"cmd":"status"}
//! <- {"v":1,"ok":false,"error":"Unsupported API version 9 (this VMM speaks 1); ..."}
//! ```
//!
//! This crate owns the wire format and nothing else, so that every caller
//! (the node agent, the test kit, the benchmarks) shares it without building
//! the VMM:
//! - [`protocol`]: the request ([`Command`]) and the response envelope,
//!   with the version rule;
//! - [`results`]: what each command answers, as types;
//! - [`progress`]: what an outgoing migration reports while it runs and at
//!   its end;
//! - [`TlsPem`]: the migration identity the agent hands a VMM;
//! - [`client`]: [`ControlClient`], one request per connection, typed
//!   results, one error type;
//! - `status` (feature `crds`): `From` conversions of the progress to a
//!   `VMMigration`'s status, for the node agent.
//!
//! The format is version 1, unchanged since the first release that had a
//! control socket; `tests/recorded.rs` holds request and response lines
//! recorded from that release and checks that both sides still read them.

pub mod client;
pub mod progress;
pub mod protocol;
pub mod results;
#[cfg(feature = "crds")]
pub mod status;
mod tls;

pub use client::{ControlClient, ControlError};
pub use progress::{DowntimeBreakdown, MigrationSummary, ModeUsed, Progress, Stage, StorageResult};
pub use protocol::{parse_request, Command, MigrateSend, Request, Response, API_VERSION};
pub use results::{
    Cancelling, ChangedBlocks, DirtyLog, DirtyRegion, DirtySet, DiskTracking, RunState, Runs,
    Saved, ShuttingDown, Started, Stats, VmmStatus,
};
pub use tls::TlsPem;
