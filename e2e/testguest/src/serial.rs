//! COM1 (16550 UART at I/O port 0x3F8), polled in both directions.
//!
//! Ring 3 cannot do port I/O here (this KVM ignores the guest's IOPL), so once
//! the guest runs in ring 3 the console goes through UD2 calls (see `interrupts`): one writes a
//! whole buffer with one `rep outsb` (one string-I/O exit per line, no LSR
//! polling), another reads one byte if the line status register has one.

use core::arch::asm;
use core::fmt;
use core::sync::atomic::{AtomicBool, Ordering};

/// Set once the guest has dropped to ring 3.
pub static IN_USER_MODE: AtomicBool = AtomicBool::new(false);

const COM1: u16 = 0x3f8;

/// Writes a byte to an I/O port.
pub fn outb(port: u16, v: u8) {
    // SAFETY: port I/O to devices this guest owns (UART, PIT); no memory effects.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags))
    };
}

/// Reads a byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: port I/O to devices this guest owns; no memory effects.
    unsafe {
        asm!("in al, dx", out("al") v, in("dx") port, options(nomem, nostack, preserves_flags))
    };
    v
}

/// Programs 115200 8N1, FIFOs on, UART interrupts off.
pub fn init() {
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x80);
    outb(COM1, 0x01);
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03);
    outb(COM1 + 2, 0xc7);
    outb(COM1 + 4, 0x03);
}

/// Writes one byte, waiting for the transmit holding register to empty.
pub fn write_byte(b: u8) {
    let mut spins = 0u32;
    while inb(COM1 + 5) & 0x20 == 0 && spins < 100_000 {
        spins += 1;
        core::hint::spin_loop();
    }
    outb(COM1, b);
}

/// Returns a received byte if one is waiting.
pub fn read_byte() -> Option<u8> {
    if IN_USER_MODE.load(Ordering::Relaxed) {
        let r: u64;
        // SAFETY: this UD2 call only reads the UART's LSR and RBR.
        unsafe { asm!("ud2", inout("rax") crate::interrupts::SYS_READ => r, options(nostack)) };
        let r = r as u32;
        return (r & 0x100 != 0).then_some(r as u8);
    }
    if inb(COM1 + 5) & 1 != 0 {
        Some(inb(COM1))
    } else {
        None
    }
}

/// Writes `bytes` to the console.
pub fn write_bytes(bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    if IN_USER_MODE.load(Ordering::Relaxed) {
        // SAFETY: this UD2 call reads `bytes` with `rep outsb` to the UART; the
        // slice is valid and mapped.
        unsafe {
            asm!("ud2", in("rax") crate::interrupts::SYS_WRITE, inout("rdi") bytes.as_ptr() => _,
                 inout("rsi") bytes.len() => _, options(nostack, readonly))
        };
    } else {
        for b in bytes {
            write_byte(*b);
        }
    }
}

/// A `fmt::Write` sink that collects a line and writes it in one go.
pub struct Console {
    buf: [u8; 256],
    len: usize,
}

impl Console {
    /// An empty line buffer.
    pub const fn new() -> Console {
        Console {
            buf: [0; 256],
            len: 0,
        }
    }

    /// Writes out what has been collected.
    pub fn flush(&mut self) {
        write_bytes(&self.buf[..self.len]);
        self.len = 0;
    }
}

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len == self.buf.len() {
                self.flush();
            }
            self.buf[self.len] = b;
            self.len += 1;
        }
        Ok(())
    }
}

/// Prints to the serial console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {{
        let mut c = $crate::serial::Console::new();
        let _ = core::fmt::Write::write_fmt(&mut c, format_args!($($arg)*));
        c.flush();
    }};
}

/// Prints a line (terminated by `\n`) to the serial console.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        let mut c = $crate::serial::Console::new();
        let _ = core::fmt::Write::write_fmt(&mut c, format_args!($($arg)*));
        let _ = core::fmt::Write::write_str(&mut c, "\n");
        c.flush();
    }};
}
