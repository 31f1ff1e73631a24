//! The devices the guest sees and the dispatch of port-I/O and MMIO exits
//! to them: COM1, the i8042 reset line, a debug-exit port, the virtio-mmio
//! windows, and (with ACPI) the Generic Event Device with the sleep and
//! reset registers.

pub mod exit;
pub mod ged;
pub mod i8042;
pub mod serial;
pub mod virtio;

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

pub use exit::GuestExit;
use ged::{Ged, GedState, GED_BASE, GED_SIZE};
use serial::{SerialDevice, SerialDeviceState, COM1_BASE};
use virtio::mmio::{MmioTransport, MmioTransportState};
use virtio::MMIO_SIZE;

/// Port of the debug-exit device (QEMU's isa-debug-exit convention): a
/// byte written here powers the VM off with that byte as the exit status.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;

/// All devices, shared by the vCPU threads.
pub struct Devices {
    /// COM1.
    pub serial: Arc<Mutex<SerialDevice>>,
    /// virtio-mmio devices, in window order.
    pub virtio: Vec<Arc<Mutex<MmioTransport>>>,
    /// The Generic Event Device (VMs with ACPI only).
    pub ged: Option<Arc<Mutex<Ged>>>,
}

/// Device state (snapshot version 1).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DevicesState {
    /// COM1 registers and pending input.
    pub serial: SerialDeviceState,
    /// virtio transports, queues and device config, in window order.
    pub virtio: Vec<MmioTransportState>,
    /// The Generic Event Device (VMs with ACPI; absent in older snapshots
    /// and without ACPI).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ged: Option<GedState>,
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

    fn ged_at(&self, addr: u64) -> Option<&Arc<Mutex<Ged>>> {
        self.ged
            .as_ref()
            .filter(|_| (GED_BASE..GED_BASE + GED_SIZE).contains(&addr))
    }

    /// Guest MMIO read.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if let Some(g) = self.ged_at(addr) {
            g.lock().unwrap().read(addr - GED_BASE, data);
            return;
        }
        match self.transport(addr) {
            Some(t) => {
                let mut t = t.lock().unwrap();
                let off = addr - t.base;
                t.read(off, data);
            }
            None => data.fill(0xff),
        }
    }

    /// Guest MMIO write; returns a guest exit request if any.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> Option<GuestExit> {
        if let Some(g) = self.ged_at(addr) {
            return g.lock().unwrap().write(addr - GED_BASE, data);
        }
        if let Some(t) = self.transport(addr) {
            let mut t = t.lock().unwrap();
            let off = addr - t.base;
            if let Some(q) = t.write(off, data) {
                t.notify(q);
            }
        }
        None
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
            ged: self.ged.as_ref().map(|g| g.lock().unwrap().save()),
        }
    }
}
