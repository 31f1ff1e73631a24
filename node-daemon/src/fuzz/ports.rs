//! [`port_io`] and [`acpi_registers`]: the legacy ports (COM1, i8042,
//! debug exit) and the ACPI GED window, through the same dispatch as a
//! vCPU's port-I/O and MMIO exits.

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use super::input::Input;
use crate::vmm::devices::ged::{
    Ged, GedState, EVENT_POWER_BUTTON, GED_BASE, GED_SIZE, RESET, RESET_VALUE, SELECTOR,
    SLEEP_CONTROL, SLEEP_STATUS, SLP_TYP_S5,
};
use crate::vmm::devices::serial::{self, Console, SerialDeviceState, COM1_BASE};
use crate::vmm::devices::{i8042, Devices, GuestExit, DEBUG_EXIT_PORT};

/// Ports with a device behind them, and two without.
const PORTS: [u16; 13] = [
    COM1_BASE,
    COM1_BASE + 1,
    COM1_BASE + 2,
    COM1_BASE + 3,
    COM1_BASE + 4,
    COM1_BASE + 5,
    COM1_BASE + 6,
    COM1_BASE + 7,
    i8042::DATA_PORT,
    i8042::COMMAND_PORT,
    DEBUG_EXIT_PORT,
    0x80,
    COM1_BASE + 8,
];

fn port(input: &mut Input) -> u16 {
    let b = input.u8();
    if b & 0x80 == 0 {
        PORTS[usize::from(b) % PORTS.len()]
    } else {
        input.u16()
    }
}

/// Port I/O is 1, 2 or 4 bytes wide.
fn port_width(input: &mut Input) -> usize {
    1 << (input.u8() % 3)
}

/// A serial register state from the input, with up to 255 bytes of
/// pending input (more than the 64-byte FIFO holds).
fn serial_state(input: &mut Input) -> SerialDeviceState {
    let mut s = SerialDeviceState {
        baud_divisor_low: input.u8(),
        baud_divisor_high: input.u8(),
        interrupt_enable: input.u8(),
        interrupt_identification: input.u8(),
        line_control: input.u8(),
        line_status: input.u8(),
        modem_control: input.u8(),
        modem_status: input.u8(),
        scratch: input.u8(),
        in_buffer: Vec::new(),
    };
    let n = usize::from(input.u8());
    s.in_buffer = input.bytes(n).to_vec();
    s
}

fn devices(ged: Option<Arc<Mutex<Ged>>>) -> (Devices, Console) {
    let (console, _irq) = Console::new(None, None).expect("eventfd");
    let devices = Devices {
        serial: console.serial.clone(),
        virtio: Vec::new(),
        ged,
    };
    (devices, console)
}

/// What one run of [`port_io`] saw.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PortOutcome {
    /// Exits the guest asked for, in order.
    pub exits: Vec<GuestExit>,
    /// Serial state restores refused.
    pub refused: usize,
}

/// COM1, the i8042 and the debug-exit port, then ops until the input ends:
///
/// | op | what |
/// | --- | --- |
/// | 0 | `in` from a port, 1, 2 or 4 bytes |
/// | 1 | `out` to a port, 1, 2 or 4 bytes |
/// | 2 | console input arrives (up to 255 bytes) |
/// | 3 | restore a serial state from the input (a snapshot or migration) |
/// | 4 | save and restore the serial state: nothing may change |
///
/// Only 0xFE to the i8042 command port and writes to the debug-exit port
/// ask for an exit.
pub fn port_io(data: &[u8]) -> PortOutcome {
    let mut input = Input::new(data);
    let (devices, console) = devices(None);
    let mut out = PortOutcome::default();
    while !input.is_empty() {
        match input.u8() % 5 {
            0 => {
                let p = port(&mut input);
                let mut buf = [0u8; 4];
                let w = port_width(&mut input);
                devices.pio_read(p, &mut buf[..w]);
            }
            1 => {
                let p = port(&mut input);
                let w = port_width(&mut input);
                let value = input.u32().to_le_bytes();
                let exit = devices.pio_write(p, &value[..w]);
                let expected = match p {
                    i8042::COMMAND_PORT if value[0] == i8042::CMD_RESET_CPU => {
                        Some(GuestExit::Reset)
                    }
                    DEBUG_EXIT_PORT => Some(GuestExit::Poweroff(value[0])),
                    _ => None,
                };
                assert_eq!(exit, expected, "out {p:#x}");
                out.exits.extend(exit);
            }
            2 => {
                let n = usize::from(input.u8());
                let bytes = input.bytes(n);
                let mut serial = console.serial.lock().unwrap();
                if let Ok(took) = serial.enqueue_raw_bytes(bytes) {
                    assert!(took <= bytes.len());
                }
            }
            3 => {
                let state = serial_state(&mut input);
                if serial::restore(&console.serial, &state).is_err() {
                    out.refused += 1;
                }
            }
            _ => {
                let before = console.save();
                serial::restore(&console.serial, &before).expect("a saved state restores");
                assert_eq!(console.save(), before);
            }
        }
    }
    out
}

/// The GED registers as the guest should see them (the oracle of
/// [`acpi_registers`]).
#[derive(Default)]
struct GedModel {
    selector: u32,
    sleep_status: u8,
}

impl GedModel {
    fn read(&mut self, offset: u64, width: usize) -> Vec<u8> {
        let mut v = vec![0u8; width];
        match offset {
            SELECTOR => {
                let n = width.min(4);
                v[..n].copy_from_slice(&std::mem::take(&mut self.selector).to_le_bytes()[..n]);
            }
            SLEEP_STATUS => v[0] = self.sleep_status,
            _ => {}
        }
        v
    }

    fn write(&mut self, offset: u64, value: u8) -> Option<GuestExit> {
        match offset {
            SLEEP_CONTROL if value & (1 << 5) != 0 && (value >> 2) & 7 == SLP_TYP_S5 => {
                self.sleep_status |= 1 << 7;
                Some(GuestExit::AcpiS5)
            }
            SLEEP_STATUS => {
                self.sleep_status &= !value;
                None
            }
            RESET if value == RESET_VALUE => Some(GuestExit::Reset),
            _ => None,
        }
    }
}

/// What one run of [`acpi_registers`] saw.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct AcpiOutcome {
    /// Exits the guest asked for, in order.
    pub exits: Vec<GuestExit>,
}

/// The GED window (event selector, sleep control and status, reset) behind
/// the MMIO dispatch, checked against a model, with ops until the input
/// ends:
///
/// | op | what |
/// | --- | --- |
/// | 0 | read at an offset, 1, 2, 4 or 8 bytes |
/// | 1 | write at an offset, 1, 2, 4 or 8 bytes |
/// | 2 | the power button is pressed: the interrupt fires |
/// | 3 | restore a GED state from the input |
pub fn acpi_registers(data: &[u8]) -> AcpiOutcome {
    let mut input = Input::new(data);
    let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let ged = Arc::new(Mutex::new(Ged::new(irq.try_clone().expect("dup eventfd"))));
    let (devices, _console) = devices(Some(ged.clone()));
    let mut model = GedModel::default();
    let mut out = AcpiOutcome::default();
    let offset = |input: &mut Input| {
        let b = input.u8();
        match b & 0xc0 {
            0 => [SELECTOR, SLEEP_CONTROL, SLEEP_STATUS, RESET][usize::from(b & 3)],
            0x40 => u64::from(b & 7) + [SELECTOR, SLEEP_CONTROL][usize::from(b >> 3 & 1)],
            _ => u64::from(input.u16()) % GED_SIZE,
        }
    };
    while !input.is_empty() {
        match input.u8() % 4 {
            0 => {
                let off = offset(&mut input);
                let w = input.width();
                let mut buf = [0xa5u8; 8];
                devices.mmio_read(GED_BASE + off, &mut buf[..w]);
                assert_eq!(buf[..w], model.read(off, w)[..], "read {off:#x}/{w}");
            }
            1 => {
                let off = offset(&mut input);
                let w = input.width();
                let value = input.u64().to_le_bytes();
                let exit = devices.mmio_write(GED_BASE + off, &value[..w]);
                assert_eq!(exit, model.write(off, value[0]), "write {off:#x}");
                out.exits.extend(exit);
            }
            2 => {
                ged.lock().unwrap().press_power_button();
                model.selector |= EVENT_POWER_BUTTON;
                assert!(irq.read().is_ok(), "the press raised no interrupt");
            }
            _ => {
                let state = GedState {
                    selector: input.u32(),
                    sleep_status: input.u8(),
                };
                ged.lock().unwrap().restore(&state);
                model.selector = state.selector;
                model.sleep_status = state.sleep_status;
                let _ = irq.read();
            }
        }
    }
    out
}
