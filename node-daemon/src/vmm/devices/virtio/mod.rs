//! virtio-mmio devices: the modern (v2) MMIO transport and the block and
//! net devices behind it. The devices are processed on the vCPU thread that
//! writes QueueNotify (block, net TX) or on the net RX thread.

pub mod block;
pub mod mmio;
pub mod net;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

/// VIRTIO_F_VERSION_1 (modern device).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Size of each device's MMIO window.
pub const MMIO_SIZE: u64 = 0x1000;
/// Guest-physical address of the first virtio-mmio device.
pub const MMIO_BASE: u64 = 0xd000_0000;
/// GSI of the first virtio-mmio device.
pub const FIRST_IRQ: u32 = 5;

/// Errors of virtio devices.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// The disk image could not be opened.
    #[error("Disk image {0} cannot be opened; check the --disk path= (the file must exist)")]
    OpenDisk(String, #[source] std::io::Error),
    /// The tap device could not be created.
    #[error("Cannot create tap device {0}; run as root (CAP_NET_ADMIN) and check /dev/net/tun")]
    CreateTap(String, #[source] std::io::Error),
    /// The bridge does not exist.
    #[error(
        "Bridge {0} does not exist; create it (ip link add {0} type bridge) or fix --net bridge="
    )]
    NoBridge(String),
    /// Attaching the tap to the bridge failed.
    #[error("Cannot attach tap {0} to bridge {1}")]
    AttachBridge(String, String, #[source] std::io::Error),
    /// Bringing the tap up failed.
    #[error("Cannot bring tap {0} up")]
    TapUp(String, #[source] std::io::Error),
    /// The MAC address does not parse.
    #[error("Bad MAC address {0}; use the form 52:54:00:12:34:56")]
    BadMac(String),
    /// An eventfd could not be created.
    #[error("Failed to create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// The disk image cannot be used (format, lock, corrupt header).
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
    /// Queue state from a snapshot is invalid.
    #[error("Invalid virtqueue state in snapshot")]
    QueueState(#[source] virtio_queue::Error),
    /// A snapshot's queue is larger than any queue of this VMM's devices.
    #[error("Invalid virtqueue state in snapshot: max size {0} above this VMM's {QUEUE_MAX_SIZE}")]
    QueueMaxSize(u16),
    /// A snapshot has another number of queues than the device.
    #[error("Snapshot has {0} virtqueues for a device with another number")]
    QueueCount(usize),
}

/// The size every queue of our devices offers. It bounds the work of one
/// notification ([`chains_per_notify`] chains of at most a table's worth of
/// descriptors each), so a restored state may not ask for more.
pub const QUEUE_MAX_SIZE: u16 = 256;

/// The most chains a device serves for one notification: one queue's
/// worth. A driver cannot have more outstanding, but a device that pops
/// until the ring is empty can be kept popping forever: with the used ring
/// laid over the available index and the used index one ahead of the next
/// available one (a restored state, or 65535 completions the guest made
/// fail), every completion makes one more chain available. A driver that
/// adds chains while the device works kicks again (the device never
/// suppresses notifications), so stopping here loses nothing.
pub fn chains_per_notify(q: &Queue) -> u16 {
    q.size()
}

/// Virtqueue state (snapshot version 1).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtqueueState {
    /// Largest size the device offers.
    pub max_size: u16,
    /// Next available-ring index to process.
    pub next_avail: u16,
    /// Next used-ring index to fill.
    pub next_used: u16,
    /// VIRTIO_F_RING_EVENT_IDX negotiated.
    pub event_idx_enabled: bool,
    /// Size the driver chose.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available (driver) ring address.
    pub avail_ring: u64,
    /// Used (device) ring address.
    pub used_ring: u64,
}

impl VirtqueueState {
    /// Saves a queue.
    pub fn save(q: &Queue) -> Self {
        VirtqueueState {
            max_size: q.max_size(),
            next_avail: q.next_avail(),
            next_used: q.next_used(),
            event_idx_enabled: q.event_idx_enabled(),
            size: q.size(),
            ready: q.ready(),
            desc_table: q.desc_table(),
            avail_ring: q.avail_ring(),
            used_ring: q.used_ring(),
        }
    }

    /// Rebuilds a queue; one larger than [`QUEUE_MAX_SIZE`] is refused (a
    /// guest could make each notification cost millions of descriptor
    /// walks: the fuzzer's 10-second input had 4096).
    pub fn restore(&self) -> Result<Queue, VirtioError> {
        if self.max_size > QUEUE_MAX_SIZE {
            return Err(VirtioError::QueueMaxSize(self.max_size));
        }
        Queue::try_from(QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx_enabled,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
        .map_err(VirtioError::QueueState)
    }
}

/// The kernel command-line fragment that announces a device to the guest.
pub fn cmdline_entry(index: usize) -> String {
    format!(
        "virtio_mmio.device=4K@{:#x}:{}",
        MMIO_BASE + index as u64 * MMIO_SIZE,
        FIRST_IRQ + index as u32
    )
}
