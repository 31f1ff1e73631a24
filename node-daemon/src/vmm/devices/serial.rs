//! COM1 (port 0x3F8, IRQ 4): vm-superio's 16550A, with output going to a
//! log file and to every client of the console unix socket, and input from
//! those clients going into the guest's receive FIFO.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// First I/O port of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// COM1's ISA IRQ.
pub const COM1_IRQ: u32 = 4;

/// Errors of the serial console.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// The serial log could not be created.
    #[error("Cannot create serial log {0}; check --serial-log")]
    CreateLog(String, #[source] std::io::Error),
    /// The console socket could not be bound.
    #[error("Cannot bind console socket {0}; check --console-sock")]
    BindSocket(String, #[source] std::io::Error),
    /// The interrupt eventfd could not be created.
    #[error("Failed to create the serial interrupt eventfd")]
    EventFd(#[source] std::io::Error),
    /// A saved state holds more pending input than the receive FIFO.
    #[error("Saved serial state has {0} bytes of pending input; the FIFO holds 64")]
    State(usize),
}

/// An eventfd bound to a GSI through KVM_IRQFD.
#[derive(Debug)]
pub struct IrqEvt(pub EventFd);

impl Trigger for IrqEvt {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Where serial output goes: the log file and every attached client.
#[derive(Debug)]
pub struct ConsoleOut {
    log: Option<File>,
    clients: Arc<Mutex<Vec<UnixStream>>>,
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(log) = &mut self.log {
            log.write_all(buf)?;
        }
        let mut clients = self.clients.lock().unwrap();
        // A client that cannot keep up (write timeout) or has gone is
        // dropped rather than stalling the guest.
        clients.retain_mut(|c| c.write_all(buf).is_ok());
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The COM1 device as the vCPUs see it.
pub type SerialDevice = Serial<IrqEvt, NoEvents, ConsoleOut>;

/// Serial register state (snapshot version 1).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialDeviceState {
    /// DLL.
    pub baud_divisor_low: u8,
    /// DLM.
    pub baud_divisor_high: u8,
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// SCR.
    pub scratch: u8,
    /// Bytes received but not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialDeviceState {
    fn from(s: SerialState) -> Self {
        SerialDeviceState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialDeviceState> for SerialState {
    fn from(s: &SerialDeviceState) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// The console: the serial device plus its socket clients.
pub struct Console {
    /// The device, shared with the vCPU threads.
    pub serial: Arc<Mutex<SerialDevice>>,
    clients: Arc<Mutex<Vec<UnixStream>>>,
}

impl Console {
    /// Creates COM1 writing to `log` (if given), from `state` when restoring.
    pub fn new(
        log: Option<&Path>,
        state: Option<&SerialDeviceState>,
    ) -> Result<(Self, EventFd), SerialError> {
        let log = match log {
            Some(p) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|e| SerialError::CreateLog(p.display().to_string(), e))?,
            ),
            None => None,
        };
        let clients = Arc::new(Mutex::new(Vec::new()));
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(SerialError::EventFd)?;
        let irq = IrqEvt(evt.try_clone().map_err(SerialError::EventFd)?);
        let out = ConsoleOut {
            log,
            clients: clients.clone(),
        };
        let serial = match state {
            Some(s) => Serial::from_state(&SerialState::from(s), irq, NoEvents, out)
                .map_err(|_| SerialError::State(s.in_buffer.len()))?,
            None => Serial::new(irq, out),
        };
        Ok((
            Console {
                serial: Arc::new(Mutex::new(serial)),
                clients,
            },
            evt,
        ))
    }

    /// Binds the console socket and serves clients on a background thread:
    /// each client receives all output from now on, and what it sends goes
    /// to the guest.
    pub fn serve(&self, path: &Path) -> Result<(), SerialError> {
        let listener = crate::vmm::private_socket::bind(path)
            .map_err(|e| SerialError::BindSocket(path.display().to_string(), e))?;
        let clients = self.clients.clone();
        let serial = self.serial.clone();
        std::thread::Builder::new()
            .name("console".into())
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    let Ok(reader) = stream.try_clone() else {
                        continue;
                    };
                    // A client that stops reading must not stall the guest:
                    // writes give up after a short timeout and the client is
                    // dropped. (Not O_NONBLOCK: the reader shares the file
                    // description and must block.)
                    let _ = stream.set_write_timeout(Some(std::time::Duration::from_millis(100)));
                    clients.lock().unwrap().push(stream);
                    let serial = serial.clone();
                    let _ = std::thread::Builder::new()
                        .name("console-in".into())
                        .spawn(move || feed_input(reader, serial));
                }
            })
            .expect("spawn console thread");
        Ok(())
    }

    /// Saves the serial registers.
    pub fn save(&self) -> SerialDeviceState {
        self.serial.lock().unwrap().state().into()
    }
}

/// Puts saved registers and pending input back into `serial` (vm-superio
/// only builds a device from state, so the device is rebuilt around the same
/// interrupt eventfd and output). A state with more pending input than the
/// FIFO holds (a snapshot or a migration peer we do not trust) is refused
/// and the device left as it was.
pub fn restore(serial: &Mutex<SerialDevice>, state: &SerialDeviceState) -> Result<(), SerialError> {
    let mut dev = serial.lock().unwrap();
    let irq = IrqEvt(
        dev.interrupt_evt()
            .0
            .try_clone()
            .expect("clone serial eventfd"),
    );
    let out = ConsoleOut {
        log: dev.writer().log.as_ref().and_then(|f| f.try_clone().ok()),
        clients: dev.writer().clients.clone(),
    };
    *dev = Serial::from_state(&SerialState::from(state), irq, NoEvents, out)
        .map_err(|_| SerialError::State(state.in_buffer.len()))?;
    Ok(())
}

fn feed_input(mut reader: UnixStream, serial: Arc<Mutex<SerialDevice>>) {
    let mut buf = [0u8; 256];
    while let Ok(n) = reader.read(&mut buf) {
        if n == 0 {
            break;
        }
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            let took = serial.lock().unwrap().enqueue_raw_bytes(rest).unwrap_or(0);
            rest = &rest[took..];
            if !rest.is_empty() {
                // FIFO full: the guest polls it; wait for room.
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }
}
