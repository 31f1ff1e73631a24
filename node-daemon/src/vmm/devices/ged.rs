//! The ACPI Generic Event Device (`ACPI0013`) of a hardware-reduced
//! platform, and the FADT's sleep and reset registers, all in one MMIO
//! window:
//!
//! | offset | width | register |
//! | --- | --- | --- |
//! | `0x000` | 32 | event selector: bit 1 = power button; a read returns the pending events and clears them |
//! | `0x100` | 8 | sleep control (FADT `SLEEP_CONTROL_REG`): `(SLP_TYP << 2) \| SLP_EN`; SLP_TYP [`SLP_TYP_S5`] powers off |
//! | `0x101` | 8 | sleep status (FADT `SLEEP_STATUS_REG`): WAK_STS, write 1 to clear |
//! | `0x102` | 8 | reset (FADT `RESET_REG`): [`RESET_VALUE`] resets the machine |
//!
//! Pressing the power button sets the selector bit and raises the GED's
//! interrupt (an irqfd on [`GED_GSI`]); the guest's `_EVT` method (built in
//! `boot::acpi`) reads the selector and notifies the power button device.

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use super::exit::GuestExit;

/// Guest-physical base of the GED window.
pub const GED_BASE: u64 = 0xfeb0_0000;
/// Size of the GED window.
pub const GED_SIZE: u64 = 0x1000;
/// GSI of the GED interrupt (the IOAPIC's last pin; virtio-mmio devices
/// take the ones below it).
pub const GED_GSI: u32 = 23;
/// Offset of the event selector.
pub const SELECTOR: u64 = 0x000;
/// Offset of the sleep control register.
pub const SLEEP_CONTROL: u64 = 0x100;
/// Offset of the sleep status register.
pub const SLEEP_STATUS: u64 = 0x101;
/// Offset of the reset register.
pub const RESET: u64 = 0x102;
/// The value the FADT tells the guest to write to the reset register (the
/// same as QEMU's GED).
pub const RESET_VALUE: u8 = 0x42;
/// SLP_TYP of S5 (`\_S5_`'s first element; the same as QEMU's GED).
pub const SLP_TYP_S5: u8 = 5;
/// Selector bit of a power button press.
pub const EVENT_POWER_BUTTON: u32 = 1 << 1;
/// SLP_EN in the sleep control register.
const SLP_EN: u8 = 1 << 5;
/// WAK_STS in the sleep status register.
const WAK_STS: u8 = 1 << 7;

/// GED state (part of the device state since snapshot version 1; absent
/// in snapshots of VMs without ACPI).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GedState {
    /// Events raised and not yet read by the guest.
    #[serde(default)]
    pub selector: u32,
    /// Sleep status register.
    #[serde(default)]
    pub sleep_status: u8,
}

/// The Generic Event Device with the sleep and reset registers.
pub struct Ged {
    irq: EventFd,
    state: GedState,
}

impl Ged {
    /// A GED that interrupts through `irq` (an irqfd of [`GED_GSI`]).
    pub fn new(irq: EventFd) -> Ged {
        Ged {
            irq,
            state: GedState::default(),
        }
    }

    /// Presses the power button: sets the selector bit and raises the
    /// interrupt.
    pub fn press_power_button(&mut self) {
        self.state.selector |= EVENT_POWER_BUTTON;
        self.raise();
    }

    fn raise(&self) {
        if let Err(e) = self.irq.write(1) {
            tracing::warn!("Cannot raise the GED interrupt: {e}");
        }
    }

    /// Guest read at `offset` in the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match offset {
            SELECTOR => {
                let v = std::mem::take(&mut self.state.selector).to_le_bytes();
                let n = data.len().min(4);
                data[..n].copy_from_slice(&v[..n]);
            }
            SLEEP_STATUS => data[0] = self.state.sleep_status,
            _ => {}
        }
    }

    /// Guest write at `offset`; returns the exit it asks for, if any.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Option<GuestExit> {
        let v = *data.first()?;
        match offset {
            SLEEP_CONTROL if v & SLP_EN != 0 => {
                let typ = (v >> 2) & 7;
                if typ == SLP_TYP_S5 {
                    self.state.sleep_status |= WAK_STS;
                    Some(GuestExit::AcpiS5)
                } else {
                    tracing::warn!("Guest asked for sleep type {typ}; only S5 ({SLP_TYP_S5}) is supported; ignored");
                    None
                }
            }
            SLEEP_STATUS => {
                self.state.sleep_status &= !v;
                None
            }
            RESET if v == RESET_VALUE => Some(GuestExit::Reset),
            _ => None,
        }
    }

    /// Saves the state (the vCPUs must be paused).
    pub fn save(&self) -> GedState {
        self.state
    }

    /// Restores `state`; a pending event raises the interrupt again (the
    /// guest finds it in the selector, and an extra edge is harmless: its
    /// `_EVT` then reads 0).
    pub fn restore(&mut self, state: &GedState) {
        self.state = *state;
        if self.state.selector != 0 {
            self.raise();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ged() -> (Ged, EventFd) {
        let e = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        (Ged::new(e.try_clone().unwrap()), e)
    }

    #[test]
    fn button_sets_the_selector_once_and_interrupts() {
        let (mut g, irq) = ged();
        g.press_power_button();
        assert_eq!(irq.read().unwrap(), 1);
        let mut d = [0u8; 4];
        g.read(SELECTOR, &mut d);
        assert_eq!(u32::from_le_bytes(d), EVENT_POWER_BUTTON);
        g.read(SELECTOR, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0, "a read clears the selector");
    }

    #[test]
    fn s5_and_reset() {
        let (mut g, _irq) = ged();
        assert_eq!(
            g.write(SLEEP_CONTROL, &[SLP_TYP_S5 << 2]),
            None,
            "no SLP_EN"
        );
        assert_eq!(g.write(SLEEP_CONTROL, &[(3 << 2) | SLP_EN]), None, "S3");
        assert_eq!(
            g.write(SLEEP_CONTROL, &[(SLP_TYP_S5 << 2) | SLP_EN]),
            Some(GuestExit::AcpiS5)
        );
        assert_eq!(g.write(RESET, &[1]), None);
        assert_eq!(g.write(RESET, &[RESET_VALUE]), Some(GuestExit::Reset));
    }

    #[test]
    fn pending_press_survives_save_and_restore() {
        let (mut g, _irq) = ged();
        g.press_power_button();
        let s = g.save();
        let (mut g2, irq2) = ged();
        g2.restore(&s);
        assert_eq!(
            irq2.read().unwrap(),
            1,
            "restore raises the interrupt again"
        );
        let mut d = [0u8; 4];
        g2.read(SELECTOR, &mut d);
        assert_eq!(u32::from_le_bytes(d), EVENT_POWER_BUTTON);
        let old: GedState = serde_json::from_str("{}").unwrap();
        assert_eq!(old, GedState::default());
    }
}
