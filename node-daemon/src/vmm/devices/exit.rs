//! Why a guest stops: what the devices report to the vCPU loop.

use serde::{Deserialize, Serialize};

/// Why the guest asked to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind", content = "code")]
pub enum GuestExit {
    /// Debug-exit port write (the value written).
    Poweroff(u8),
    /// i8042 reset, a triple fault, KVM's reset system event, or the ACPI
    /// reset register.
    Reset,
    /// S5 written to the ACPI sleep control register.
    AcpiS5,
}
