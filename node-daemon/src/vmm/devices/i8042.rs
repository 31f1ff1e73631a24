//! Minimal i8042 keyboard controller: enough for a guest to reset the
//! machine by writing 0xFE (pulse reset line) to port 0x64, which the VMM
//! turns into a clean exit.

/// Data port.
pub const DATA_PORT: u16 = 0x60;
/// Command/status port.
pub const COMMAND_PORT: u16 = 0x64;
/// Command: pulse the CPU reset line.
pub const CMD_RESET_CPU: u8 = 0xfe;

/// What a guest write to the controller asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum I8042Action {
    /// Nothing for the VMM to do.
    None,
    /// The guest reset the machine.
    Reset,
}

/// Reads of either port: status 0 (no data, input buffer empty).
pub fn read(_port: u16) -> u8 {
    0
}

/// Handles a write to `port`.
pub fn write(port: u16, value: u8) -> I8042Action {
    if port == COMMAND_PORT && value == CMD_RESET_CPU {
        I8042Action::Reset
    } else {
        I8042Action::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command() {
        assert_eq!(write(COMMAND_PORT, 0xfe), I8042Action::Reset);
        assert_eq!(write(DATA_PORT, 0xfe), I8042Action::None);
    }
}
