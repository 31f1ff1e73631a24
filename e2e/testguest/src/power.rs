//! The power button and the sleep/reset registers, the way Linux uses them on
//! a hardware-reduced ACPI platform: the Generic Event Device's `_EVT` method
//! reads the (read-and-clear) event selector and `Notify`s the power button
//! with 0x80; the OS then writes `(SLP_TYP << 2) | SLP_EN` to the FADT's sleep
//! control register, SLP_TYP from `\_S5_`.
//!
//! The guest uses no device interrupts, so the main loop evaluates `_EVT`
//! (with the GED's interrupt number as Arg0) every console-poll period,
//! in ring 3: one MMIO read of the selector per evaluation. Only when `_EVT`
//! uses AML that `amleval` does not understand does it fall back to reading
//! the selector itself and taking bit 1 (QEMU's `ACPI_GED_PWR_DOWN_EVT`) as
//! the button, and it says so on the console.

use crate::acpi::Gas;
use crate::aml::NsPath;
use crate::amleval::{mmio, Eval};
use crate::platform::Platform;
use crate::println;
use crate::{clock, interrupts};

/// `Notify` value of a power button press.
const NOTIFY_PRESSED: u64 = 0x80;
/// SLP_EN in the hardware-reduced sleep control register.
const SLP_EN: u64 = 0x20;
/// The power-button bit of QEMU's GED selector (the last-resort fallback).
const GED_PWR_DOWN_EVT: u64 = 2;
/// How long a power off or reset may take before the guest says it failed.
const EFFECT_NS: u64 = 1_000_000_000;

/// How the button is watched.
enum Watch {
    /// No GED with an `_EVT` (or no power button): nothing to poll.
    Off,
    /// `_EVT` of this GED, with this Arg0.
    Evt(NsPath, u64),
    /// Reading this selector directly, bit 1 (`_EVT` not understood).
    Selector(u64),
}

/// The power button and what pressing it does.
pub struct Power {
    platform: &'static Platform,
    watch: Watch,
    ignore: bool,
}

fn write_gas(g: Gas, v: u64) -> bool {
    if g.space != 0 {
        return false;
    }
    let width = match g.bits {
        16 => 16,
        32 => 32,
        64 => 64,
        _ => 8,
    };
    mmio::write(g.addr, width, v);
    true
}

/// Waits (ring 3) up to [`EFFECT_NS`] for the VMM to act on a register write.
fn wait_for_effect() {
    let start = clock::now_ns();
    while clock::now_ns() - start < EFFECT_NS {
        interrupts::wait_for_tick(interrupts::ticks());
    }
}

impl Power {
    /// Watches the first GED's `_EVT` when the tables have a power button;
    /// `ignore` (`pwrbtn=ignore`) reports presses without acting on them.
    pub fn new(platform: &'static Platform, ignore: bool) -> Power {
        let watch = match (platform.ged.first(), platform.pwrb.is_empty()) {
            (Some(g), false) => match (g.evt, g.selector) {
                (Some(evt), _) => Watch::Evt(evt, g.irq as u64),
                (None, Some(sel)) => {
                    println!(
                        "WARN ACPI: GED has no _EVT; reading its selector at {:#x} directly (bit 1 = power button)",
                        sel
                    );
                    Watch::Selector(sel)
                }
                (None, None) => Watch::Off,
            },
            _ => Watch::Off,
        };
        Power {
            platform,
            watch,
            ignore,
        }
    }

    /// Checks for a button press (call from ring 3, periodically).
    pub fn poll(&mut self) {
        let pressed = match self.watch {
            Watch::Off => false,
            Watch::Selector(sel) => mmio::read(sel, 32) & GED_PWR_DOWN_EVT != 0,
            Watch::Evt(evt, arg0) => {
                let mut e = Eval::new(&self.platform.ns);
                match e.call(&evt, &[arg0]) {
                    Ok(_) => e.notified.iter().flatten().any(|n| {
                        n.value == NOTIFY_PRESSED && self.platform.pwrb.contains(&n.target)
                    }),
                    Err(u) => {
                        let sel = self.platform.ged.first().and_then(|g| g.selector);
                        println!(
                            "WARN ACPI: {} not understood (opcode {:#04x}); {}",
                            evt,
                            u.opcode,
                            if sel.is_some() {
                                "reading the GED selector directly from now on (bit 1 = power button)"
                            } else {
                                "the power button is not watched"
                            }
                        );
                        self.watch = sel.map_or(Watch::Off, Watch::Selector);
                        false
                    }
                }
            }
        };
        if pressed {
            if self.ignore {
                println!("POWER button: ignored");
            } else {
                println!("POWER button: powering off");
                self.power_off();
            }
        }
    }

    /// Enters S5 through the FADT's sleep control register; returns (after a
    /// warning) only when that is impossible or the VMM did not act on it.
    pub fn power_off(&self) {
        let f = self.platform.fadt.as_ref();
        let (Some(ctl), Some(typ)) = (f.and_then(|f| f.sleep_control), self.platform.s5) else {
            println!("WARN cannot power off: no FADT sleep control register or no \\_S5_");
            return;
        };
        if !write_gas(ctl, ((typ & 7) << 2) | SLP_EN) {
            println!("WARN cannot power off: sleep control register is not in memory space");
            return;
        }
        wait_for_effect();
        println!("WARN power off did not take effect");
    }

    /// Resets through the FADT's reset register; returns (after a warning)
    /// only when that is impossible or the VMM did not act on it.
    pub fn reset(&self) {
        let Some(f) = self.platform.fadt.as_ref().filter(|f| f.reset.is_some()) else {
            println!("WARN cannot reset: no FADT reset register");
            return;
        };
        if !f.reset.is_some_and(|g| write_gas(g, f.reset_value as u64)) {
            println!("WARN cannot reset: reset register is not in memory space");
            return;
        }
        wait_for_effect();
        println!("WARN reset did not take effect");
    }
}
