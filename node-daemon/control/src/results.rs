//! What each command answers, as the `result` of a successful response.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Whether the vCPUs run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// The vCPUs run.
    Running,
    /// The vCPUs are paused.
    Paused,
    /// `stop` was accepted; the process exits.
    Stopping,
}

/// `status`: the VM's state, its configuration and the VMM's process id.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmmStatus {
    /// Running or paused.
    pub state: RunState,
    /// The VM's configuration as the VMM was started with it (kernel,
    /// memory, vCPUs, disks, NICs), in `godwit-vmm`'s own format.
    pub config: Value,
    /// The VMM's process id.
    pub pid: u32,
}

/// `pause`, `resume`, `stop`: the state the VM is now in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Runs {
    /// The new state.
    pub state: RunState,
}

/// `shutdown`: the power button was pressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShuttingDown {
    /// Always true: the guest got the button press.
    pub power_button: bool,
    /// Seconds until the VMM forces the stop.
    pub grace_secs: u64,
}

/// `save-state`: where the snapshot went.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Saved {
    /// The snapshot directory.
    pub dir: PathBuf,
}

/// `stats`: the VMM's counters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Per-vCPU exits: (all, port I/O, MMIO).
    pub vcpu_exits: Vec<(u64, u64, u64)>,
    /// Seconds since the process built the VM.
    pub uptime_s: f64,
    /// Pages in the last dirty set taken.
    pub dirty_pages_last: u64,
    /// Dirty sets taken so far.
    pub dirty_takes: u64,
    /// Whether the vCPUs are paused.
    pub paused: bool,
    /// Whether KVM dirty logging is on.
    pub dirty_log: bool,
}

/// `dirty-log-start`, `dirty-log-stop`: whether dirty logging is now on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirtyLog {
    /// Dirty logging on.
    pub dirty_log: bool,
}

/// `take-dirty`: the pages dirtied since the last take, counted per region.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirtySet {
    /// One entry per guest memory region.
    pub regions: Vec<DirtyRegion>,
    /// Dirty pages in all regions.
    pub dirty_pages: u64,
}

/// One guest memory region's share of a [`DirtySet`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirtyRegion {
    /// Guest physical address of the region.
    pub gpa: u64,
    /// Its size in bytes.
    pub size: u64,
    /// Pages of it dirtied.
    pub dirty_pages: u64,
}

/// `disk-dirty-start`, `disk-dirty-stop`: whether a disk's changed blocks
/// are now tracked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskTracking {
    /// Disk index.
    pub disk: usize,
    /// Tracking on.
    pub dirty_tracking: bool,
}

/// `disk-take-dirty`: a disk's changed blocks since the last take.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangedBlocks {
    /// Disk index.
    pub disk: usize,
    /// Block size of the tracking, in bytes.
    pub granularity: u64,
    /// Changed blocks.
    pub blocks: u64,
    /// Changed bytes (blocks times granularity, clipped at the disk's end).
    pub bytes: u64,
    /// The changed blocks as `[offset, length]` byte ranges, merged.
    pub ranges: Vec<(u64, u64)>,
}

/// `migrate-send`: the migration started (its progress is `migrate-status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Started {
    /// Always true.
    pub started: bool,
}

/// `migrate-cancel`: the cancel was asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cancelling {
    /// Always true.
    pub cancelling: bool,
}
