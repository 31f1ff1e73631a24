//! The virtio-mmio version 2 transport: feature negotiation, queue setup,
//! device status, interrupt status, config space, and dispatch of queue
//! notifications to the device.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::block::{Block, BlockState};
use super::net::{Net, NetState};
use super::{VirtioError, VirtqueueState, QUEUE_MAX_SIZE};
use crate::vmm::memory::GuestMemory;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x676f_6477; // "godw"
const STATUS_DRIVER_OK: u32 = 4;
/// InterruptStatus bit: used buffer notification.
pub const INT_USED_RING: u32 = 1;

/// The device behind a transport.
pub enum VirtioDevice {
    /// virtio-blk.
    Block(Block),
    /// virtio-net.
    Net(Net),
}

impl VirtioDevice {
    fn device_id(&self) -> u32 {
        match self {
            VirtioDevice::Block(_) => 2,
            VirtioDevice::Net(_) => 1,
        }
    }
    fn features(&self) -> u64 {
        match self {
            VirtioDevice::Block(b) => b.features(),
            VirtioDevice::Net(n) => n.features(),
        }
    }
    fn queue_count(&self) -> usize {
        match self {
            VirtioDevice::Block(_) => 1,
            VirtioDevice::Net(_) => 2,
        }
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = match self {
            VirtioDevice::Block(b) => b.config(),
            VirtioDevice::Net(n) => n.config(),
        };
        for (i, b) in data.iter_mut().enumerate() {
            *b = cfg.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
}

/// Device-specific saved state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum VirtioDeviceState {
    /// virtio-blk.
    Block(BlockState),
    /// virtio-net.
    Net(NetState),
}

/// Transport and queue state of one device (snapshot version 1).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MmioTransportState {
    /// Guest-physical base of the MMIO window.
    pub base: u64,
    /// GSI.
    pub gsi: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// Status.
    pub status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// The virtqueues.
    pub queues: Vec<VirtqueueState>,
    /// The device's own state.
    pub device: VirtioDeviceState,
}

/// One virtio-mmio device window.
pub struct MmioTransport {
    /// The device.
    pub device: VirtioDevice,
    /// Its virtqueues.
    pub queues: Vec<Queue>,
    mem: GuestMemory,
    irq: EventFd,
    /// Guest-physical base of the MMIO window.
    pub base: u64,
    /// GSI the device interrupts on.
    pub gsi: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    interrupt_status: u32,
    status: u32,
    config_generation: u32,
}

impl MmioTransport {
    /// A fresh transport for `device` at `base`, interrupting through `irq`.
    pub fn new(device: VirtioDevice, mem: GuestMemory, irq: EventFd, base: u64, gsi: u32) -> Self {
        let queues = (0..device.queue_count())
            .map(|_| Queue::new(QUEUE_MAX_SIZE).expect("a valid queue size"))
            .collect();
        MmioTransport {
            device,
            queues,
            mem,
            irq,
            base,
            gsi,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            interrupt_status: 0,
            status: 0,
            config_generation: 0,
        }
    }

    /// Whether the driver has finished setup.
    pub fn driver_ok(&self) -> bool {
        self.status & STATUS_DRIVER_OK != 0
    }

    /// Raises a used-buffer interrupt.
    pub fn signal_used(&mut self) {
        self.interrupt_status |= INT_USED_RING;
        let _ = self.irq.write(1);
    }

    /// Guest memory the device uses.
    pub fn mem(&self) -> &GuestMemory {
        &self.mem
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.acked_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
        self.status = 0;
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Guest read at `offset` into the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            self.device.read_config(offset - 0x100, data);
            return;
        }
        let v: u32 = match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => self.device.device_id(),
            0x0c => VENDOR,
            0x10 => {
                let f = self.device.features();
                match self.device_features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            0x34 => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            0x44 => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            0x60 => self.interrupt_status,
            0x70 => self.status,
            0xfc => self.config_generation,
            _ => 0,
        };
        let bytes = v.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    /// Guest write at `offset`; returns the queue index when it was a
    /// QueueNotify that the caller must process.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Option<u16> {
        if offset >= 0x100 {
            return None; // config space is read-only for our devices
        }
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        let v = u32::from_le_bytes(b);
        match offset {
            0x14 => self.device_features_sel = v,
            0x20 => {
                let f = self.device.features();
                match self.driver_features_sel {
                    0 => self.acked_features |= u64::from(v) & f,
                    1 => self.acked_features |= (u64::from(v) << 32) & f,
                    _ => {}
                }
            }
            0x24 => self.driver_features_sel = v,
            0x30 => self.queue_sel = v,
            0x38 => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(v as u16);
                }
            }
            0x44 => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            0x50 => return Some(v as u16),
            0x64 => self.interrupt_status &= !v,
            0x70 => {
                if v == 0 {
                    self.reset();
                } else {
                    self.status = v;
                }
            }
            0x80 => self
                .selected_queue()
                .map_or((), |q| q.set_desc_table_address(Some(v), None)),
            0x84 => self
                .selected_queue()
                .map_or((), |q| q.set_desc_table_address(None, Some(v))),
            0x90 => self
                .selected_queue()
                .map_or((), |q| q.set_avail_ring_address(Some(v), None)),
            0x94 => self
                .selected_queue()
                .map_or((), |q| q.set_avail_ring_address(None, Some(v))),
            0xa0 => self
                .selected_queue()
                .map_or((), |q| q.set_used_ring_address(Some(v), None)),
            0xa4 => self
                .selected_queue()
                .map_or((), |q| q.set_used_ring_address(None, Some(v))),
            _ => {}
        }
        None
    }

    /// Processes a notification of queue `idx` (block requests, net TX; an
    /// RX notification wakes the net RX thread).
    pub fn notify(&mut self, idx: u16) {
        if !self.driver_ok() {
            return;
        }
        let Some(q) = self.queues.get_mut(idx as usize) else {
            return;
        };
        if !q.ready() {
            return;
        }
        let used = match &mut self.device {
            VirtioDevice::Block(b) => b.process(q, &self.mem),
            VirtioDevice::Net(n) => n.notify(idx, q, &self.mem),
        };
        if used {
            self.signal_used();
        }
    }

    /// Saves the transport, its queues and the device.
    pub fn save(&self) -> MmioTransportState {
        MmioTransportState {
            base: self.base,
            gsi: self.gsi,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt_status,
            status: self.status,
            config_generation: self.config_generation,
            queues: self.queues.iter().map(VirtqueueState::save).collect(),
            device: match &self.device {
                VirtioDevice::Block(b) => VirtioDeviceState::Block(b.save()),
                VirtioDevice::Net(n) => VirtioDeviceState::Net(n.save()),
            },
        }
    }

    /// Restores transport and queue state onto a freshly built transport
    /// (the device itself is rebuilt from its config by the caller).
    /// A state with another number of queues than the device has (the
    /// net RX thread indexes its queue) is refused, the transport left as
    /// it was.
    pub fn restore(&mut self, s: &MmioTransportState) -> Result<(), VirtioError> {
        if s.queues.len() != self.device.queue_count() {
            return Err(VirtioError::QueueCount(s.queues.len()));
        }
        let queues = s
            .queues
            .iter()
            .map(VirtqueueState::restore)
            .collect::<Result<_, _>>()?;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.acked_features = s.acked_features;
        self.queue_sel = s.queue_sel;
        self.interrupt_status = s.interrupt_status;
        self.status = s.status;
        self.config_generation = s.config_generation;
        self.queues = queues;
        Ok(())
    }
}
