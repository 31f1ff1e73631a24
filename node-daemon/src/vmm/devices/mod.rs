//! The devices the guest sees and the dispatch of port-I/O and MMIO exits
//! to them: COM1, the i8042 reset line, a debug-exit port, and the
//! virtio-mmio windows.

pub mod i8042;
pub mod serial;
pub mod virtio;

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use serial::{SerialDevice, SerialDeviceState, COM1_BASE};
use virtio::mmio::{MmioTransport, MmioTransportState};
use virtio::MMIO_SIZE;

/// Port of the debug-exit device (QEMU's isa-debug-exit convention): a
/// byte written here powers the VM off with that byte as the exit status.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;

/// Why the guest asked to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind", content = "code")]
pub enum GuestExit {
    /// Debug-exit port write (the value written).
    Poweroff(u8),
    /// i8042 reset, or a triple fault, or KVM's reset system event.
    Reset,
}

/// All devices, shared by the vCPU threads.
pub struct Devices {
    /// COM1.
    pub serial: Arc<Mutex<SerialDevice>>,
    /// virtio-mmio devices, in window order.
    pub virtio: Vec<Arc<Mutex<MmioTransport>>>,
}

/// Device state (snapshot version 1).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DevicesState {
    /// COM1 registers and pending input.
    pub serial: SerialDeviceState,
    /// virtio transports, queues and device config, in window order.
    pub virtio: Vec<MmioTransportState>,
}

impl Devices {
    /// Guest `in` from `port`.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        match port {
            p if (COM1_BASE..COM1_BASE + 8).contains(&p) => {
                data[0] = self.serial.lock().unwrap().read((p - COM1_BASE) as u8);
            }
            i8042::DATA_PORT | i8042::COMMAND_PORT => data[0] = i8042::read(port),
            _ => data.fill(0xff),
        }
    }

    /// Guest `out` to `port`; returns a guest exit request if any.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> Option<GuestExit> {
        match port {
            p if (COM1_BASE..COM1_BASE + 8).contains(&p) => {
                if let Err(e) = self
                    .serial
                    .lock()
                    .unwrap()
                    .write((p - COM1_BASE) as u8, data[0])
                {
                    tracing::warn!(error = ?e, "serial write failed");
                }
                None
            }
            i8042::DATA_PORT | i8042::COMMAND_PORT => match i8042::write(port, data[0]) {
                i8042::I8042Action::Reset => Some(GuestExit::Reset),
                i8042::I8042Action::None => None,
            },
            DEBUG_EXIT_PORT => Some(GuestExit::Poweroff(data[0])),
            _ => None,
        }
    }

    fn transport(&self, addr: u64) -> Option<&Arc<Mutex<MmioTransport>>> {
        self.virtio.iter().find(|t| {
            let base = t.lock().unwrap().base;
            (base..base + MMIO_SIZE).contains(&addr)
        })
    }

    /// Guest MMIO read.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        match self.transport(addr) {
            Some(t) => {
                let mut t = t.lock().unwrap();
                let off = addr - t.base;
                t.read(off, data);
            }
            None => data.fill(0xff),
        }
    }

    /// Guest MMIO write.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if let Some(t) = self.transport(addr) {
            let mut t = t.lock().unwrap();
            let off = addr - t.base;
            if let Some(q) = t.write(off, data) {
                t.notify(q);
            }
        }
    }

    /// Saves all device state. The vCPUs must be paused.
    pub fn save(&self) -> DevicesState {
        DevicesState {
            serial: self.serial.lock().unwrap().state().into(),
            virtio: self
                .virtio
                .iter()
                .map(|t| t.lock().unwrap().save())
                .collect(),
        }
    }
}
