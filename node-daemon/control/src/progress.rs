//! What an outgoing migration reports: its stage and figures while it
//! runs (`migrate-status`), and its result at the end. The migration engine
//! fills these in; the node agent turns them into a `VMMigration`'s status.

use serde::{Deserialize, Serialize};

/// Where a migration is, as the sender or receiver state machine sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stage {
    /// Not started.
    #[default]
    Idle,
    /// Connecting and exchanging Hello.
    Handshake,
    /// Copying memory while the guest runs.
    PreCopy,
    /// Guest paused; sending the rest.
    StopAndCopy,
    /// Guest runs on the target; the rest arrives on demand.
    PostCopy,
    /// Waiting for the target to confirm and resume.
    Committing,
    /// The guest runs on the target.
    Completed,
    /// The guest runs on the source (or, past commit, see the error).
    Failed,
}

/// How the migration converged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ModeUsed {
    /// Pre-copy rounds, then stop-and-copy.
    #[default]
    PreCopy,
    /// Pre-copy with the vCPUs throttled.
    AutoConverge,
    /// The target ran before all memory arrived.
    PostCopy,
    /// A stopped VM's disks and config were copied (no memory).
    Cold,
}

/// A live view of a migration, as the control socket returns it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Stage.
    pub stage: Stage,
    /// Pre-copy round (0 is the full copy).
    pub round: u32,
    /// Guest RAM size.
    pub memory_total_bytes: u64,
    /// Dirty bytes known to be still unsent.
    pub memory_remaining_bytes: u64,
    /// Bytes written to the stream so far.
    pub transferred_bytes: u64,
    /// Rate at which the guest dirtied memory in the last round.
    pub dirty_rate_bytes_per_second: u64,
    /// Stream throughput in the last round.
    pub bandwidth_bytes_per_second: u64,
    /// Pause the guest would see if switched now.
    pub expected_downtime_ms: u64,
    /// Current vCPU throttle in percent.
    pub throttle_percent: u8,
    /// Disk bytes still to send (bulk copy left, or blocks dirtied since).
    #[serde(default)]
    pub disk_remaining_bytes: u64,
    /// The result, once completed.
    pub result: Option<MigrationSummary>,
    /// The error, once failed.
    pub error: Option<String>,
    /// Failed after the guest may have run on the target (post-copy, or
    /// no answer after Commit): the source's copy may be stale and must
    /// never resume; the VM is lost and must be restarted.
    #[serde(default)]
    pub guest_lost: bool,
    /// Post-copy lost its link and waits for it to come back (until the
    /// recovery timeout): vCPUs that touch a page still on the source wait.
    #[serde(default)]
    pub reconnecting: bool,
    /// How many times post-copy lost its link and started reconnecting
    /// (left out while 0).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub reconnects: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Final figures of a migration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationSummary {
    /// From the start to the target's confirmation.
    pub total_ms: u64,
    /// From pausing the guest on the source to the source learning that the
    /// target resumed it (an upper bound of the guest's pause).
    pub downtime_ms: f64,
    /// Bytes written to the stream.
    pub bytes_sent: u64,
    /// Pre-copy rounds, including round 0.
    pub rounds: u32,
    /// How it converged.
    pub mode: ModeUsed,
    /// Pages sent as data (not counting zero pages).
    pub pages_sent: u64,
    /// Pages found all-zero and sent as run headers only.
    pub zero_pages: u64,
    /// Where the downtime went (stop-and-copy only).
    #[serde(default)]
    pub downtime_breakdown: Option<DowntimeBreakdown>,
    /// What live storage migration copied (absent when no disk was copied).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<StorageResult>,
}

/// The disk side of a migration that copied node-local disks.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StorageResult {
    /// Disks copied.
    pub disks: u32,
    /// Per copied disk, whether the target already held its base image (so
    /// only the overlay's own clusters were sent).
    pub base_on_target: Vec<bool>,
    /// Bytes the bulk copy had to cover (the disks' allocated ranges).
    pub allocated_bytes: u64,
    /// Bytes of disk frames sent (headers, zero runs and data), bulk and
    /// dirty rounds.
    pub bytes_sent: u64,
    /// Bytes of disk blocks sent again because the guest rewrote them.
    pub dirty_bytes_sent: u64,
    /// Bytes of disk blocks sent during stop-and-copy (guest paused).
    pub final_dirty_bytes: u64,
    /// Time spent sending them while paused, in ms.
    pub final_ms: f64,
}

/// The parts of a stop-and-copy downtime, in milliseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DowntimeBreakdown {
    /// Stopping the vCPUs.
    pub pause_ms: f64,
    /// Reading the last dirty set and sending those pages.
    pub last_pages_ms: f64,
    /// Capturing vCPU, VM and device state (in pre-copy, beside the last
    /// pages: the two overlap).
    pub save_state_ms: f64,
    /// Sending the state until the target confirms it restored it.
    pub target_restore_ms: f64,
    /// From Commit until the target says the guest runs.
    pub activate_ms: f64,
}
