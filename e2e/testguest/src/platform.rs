//! The devices the ACPI tables describe, as Linux finds them: RSDP → XSDT →
//! FADT → DSDT (and SSDTs), whose namespace (`aml`) yields the virtio-mmio
//! windows (`LNRO0005`), COM1 (`PNP0501`), the Generic Event Device
//! (`ACPI0013`) with its event selector and `_EVT`, the power button
//! (`PNP0C0C`) and `\_S5_`. Printed as the `ACPI ...` lines of README.md.
//! Without virtio-mmio devices in the tables the command line's
//! `virtio_mmio.device=` entries are used (ACPI off, Firecracker style).

use alloc::boxed::Box;
use alloc::vec::Vec;

use crate::acpi::{self, Fadt};
use crate::aml::{hid_is, int_const, name_string, Data, Namespace, NsPath, Object};
use crate::cmdline::{Config, MmioDevice, MAX_VIRTIO};
use crate::println;

/// A Generic Event Device.
pub struct Ged {
    /// The first SystemMemory operation region inside the device (QEMU's and
    /// ours: the 4-byte event selector).
    pub selector: Option<u64>,
    /// Its interrupt (passed to `_EVT` as Arg0).
    pub irq: u32,
    /// Its `_EVT` method.
    pub evt: Option<NsPath>,
}

/// A 16550 UART.
pub struct Serial {
    pub io: u64,
    pub irq: u32,
}

/// What the firmware tables describe.
pub struct Platform {
    pub ns: Namespace,
    pub fadt: Option<Fadt>,
    pub virtio: Vec<MmioDevice>,
    pub serial: Vec<Serial>,
    pub ged: Vec<Ged>,
    pub pwrb: Vec<NsPath>,
    /// SLP_TYP from `\_S5_`.
    pub s5: Option<u64>,
    /// Whether a DSDT was found (and its checksum).
    pub dsdt: Option<bool>,
}

/// Resources from a `_CRS` template.
#[derive(Default)]
struct Resources {
    mem: Option<(u64, u64)>,
    io: Option<u64>,
    irq: Option<u32>,
}

fn le(b: &[u8], at: usize, n: usize) -> u64 {
    b.get(at..at + n)
        .map_or(0, |s| s.iter().rev().fold(0u64, |v, x| v << 8 | *x as u64))
}

/// Walks a resource template (small and large descriptors up to the end tag);
/// keeps the first memory range, I/O port and interrupt.
fn resources(b: &[u8]) -> Resources {
    let mut r = Resources::default();
    let mut i = 0;
    while i < b.len() {
        let tag = b[i];
        if tag & 0x80 == 0 {
            let len = (tag & 7) as usize;
            match tag >> 3 {
                // IRQ: 16-bit mask
                0x04 => {
                    let mask = le(b, i + 1, 2) as u16;
                    if mask != 0 && r.irq.is_none() {
                        r.irq = Some(mask.trailing_zeros());
                    }
                }
                // I/O port (decode, min, max, ...), fixed I/O port
                0x08 => _ = r.io.get_or_insert(le(b, i + 2, 2)),
                0x09 => _ = r.io.get_or_insert(le(b, i + 1, 2)),
                0x0f => break,
                _ => {}
            }
            i += 1 + len;
        } else {
            let len = le(b, i + 1, 2) as usize;
            match tag {
                // Memory32Fixed: info, base, length
                0x86 => _ = r.mem.get_or_insert((le(b, i + 4, 4), le(b, i + 8, 4))),
                // Memory32: info, min, max, alignment, length
                0x85 => _ = r.mem.get_or_insert((le(b, i + 4, 4), le(b, i + 16, 4))),
                // DWord / QWord address space (resource type 0 = memory)
                0x87 if b.get(i + 3) == Some(&0) => {
                    _ = r.mem.get_or_insert((le(b, i + 10, 4), le(b, i + 22, 4)))
                }
                0x8a if b.get(i + 3) == Some(&0) => {
                    _ = r.mem.get_or_insert((le(b, i + 14, 8), le(b, i + 38, 8)))
                }
                // Extended interrupt: flags, count, numbers
                0x89 if le(b, i + 4, 1) > 0 => _ = r.irq.get_or_insert(le(b, i + 5, 4) as u32),
                _ => {}
            }
            i += 3 + len;
        }
    }
    r
}

/// A device's `_CRS`: a `Name` buffer, or a method that returns a buffer
/// (`Return (ResourceTemplate () {...})` or `Return (NAME)`).
fn crs(ns: &Namespace, dev: &NsPath) -> Resources {
    let Some(e) = dev.child(*b"_CRS").and_then(|p| ns.get(&p)) else {
        return Resources::default();
    };
    match e.obj {
        Object::Name(Data::Buf(b)) => resources(b),
        Object::Method { body, .. } if body.first() == Some(&0xa4) => {
            if body.get(1) == Some(&0x11) {
                // Buffer: PkgLength, size, bytes.
                let Some((len, after)) = crate::aml::pkg_length(body, 2) else {
                    return Resources::default();
                };
                let end = (2 + len).min(body.len());
                let Some((_, start)) = int_const(body, after) else {
                    return Resources::default();
                };
                return resources(body.get(start..end).unwrap_or(&[]));
            }
            match name_string(body, 1).and_then(|(n, _)| ns.lookup(e.path, &n)) {
                Some(&crate::aml::Entry {
                    obj: Object::Name(Data::Buf(b)),
                    ..
                }) => resources(b),
                _ => Resources::default(),
            }
        }
        _ => Resources::default(),
    }
}

/// Reads the tables. Runs once at boot; the result lives for good (the power
/// button evaluates `_EVT` against its namespace).
pub fn discover(rsdp_hint: u64) -> &'static Platform {
    let mut p = Platform {
        ns: Namespace::new(),
        fadt: None,
        virtio: Vec::new(),
        serial: Vec::new(),
        ged: Vec::new(),
        pwrb: Vec::new(),
        s5: None,
        dsdt: None,
    };
    if let Some(rsdp) = acpi::find_rsdp(rsdp_hint) {
        p.fadt = acpi::fadt(rsdp);
        if let Some(d) = p.fadt.as_ref().map(|f| f.dsdt).filter(|d| *d != 0) {
            if acpi::table_ok(d, b"DSDT") || acpi::table_bytes(d).starts_with(b"DSDT") {
                p.dsdt = Some(acpi::table_ok(d, b"DSDT"));
                p.ns.load(acpi::table_bytes(d));
            }
        }
        acpi::each_table(rsdp, |t| {
            if acpi::table_ok(t, b"SSDT") {
                p.ns.load(acpi::table_bytes(t));
            }
            None::<()>
        });
    }
    p.collect();
    Box::leak(Box::new(p))
}

impl Platform {
    fn collect(&mut self) {
        let ns = &self.ns;
        for e in ns.entries.iter() {
            if !matches!(e.obj, Object::Device) {
                continue;
            }
            let dev = e.path;
            let Some(hid) = ns.child_data(&dev, b"_HID") else {
                continue;
            };
            if let Some(Data::Int(sta)) = ns.child_data(&dev, b"_STA") {
                if sta & 1 == 0 {
                    continue;
                }
            }
            if hid_is(hid, b"LNRO0005") {
                let r = crs(ns, &dev);
                if let Some((addr, size)) = r.mem {
                    if addr.saturating_add(size) > 1 << 32 {
                        println!(
                            "WARN ACPI: virtio-mmio window {:#x} is above 4 GiB (not mapped); skipped",
                            addr
                        );
                        continue;
                    }
                    self.virtio.push(MmioDevice {
                        size,
                        addr,
                        irq: r.irq.unwrap_or(0),
                    });
                }
            } else if hid_is(hid, b"PNP0501") {
                let r = crs(ns, &dev);
                self.serial.push(Serial {
                    io: r.io.unwrap_or(0),
                    irq: r.irq.unwrap_or(0),
                });
            } else if hid_is(hid, b"ACPI0013") {
                let selector = ns.entries.iter().find_map(|x| match x.obj {
                    Object::Region { space: 0, base, .. } if x.path.parent() == dev => Some(base),
                    _ => None,
                });
                let evt = dev
                    .child(*b"_EVT")
                    .filter(|p| matches!(ns.get(p).map(|x| x.obj), Some(Object::Method { .. })));
                self.ged.push(Ged {
                    selector,
                    irq: crs(ns, &dev).irq.unwrap_or(0),
                    evt,
                });
            } else if hid_is(hid, b"PNP0C0C") {
                self.pwrb.push(dev);
            }
        }
        if let Some(Data::Pkg(n, elems)) = NsPath::ROOT
            .child(*b"_S5_")
            .and_then(|p| ns.get(&p))
            .and_then(|e| match e.obj {
                Object::Name(d) => Some(d),
                _ => None,
            })
        {
            if n > 0 {
                self.s5 = int_const(elems, 0).map(|(v, _)| v);
            }
        }
    }

    /// Prints the `ACPI ...` lines and, when the tables list virtio-mmio
    /// devices, makes them the ones the guest probes (instead of any on the
    /// command line).
    pub fn apply(&self, cfg: &mut Config) {
        if let Some(ok) = self.dsdt {
            if !ok {
                println!("WARN ACPI: DSDT checksum is wrong (parsed anyway)");
            }
        }
        if let Some(e) = self.ns.first_error {
            println!(
                "WARN ACPI: AML not understood in {} at offset {:#x} (opcode {:#04x}); {} such places skipped",
                core::str::from_utf8(&e.table).unwrap_or("?"),
                e.offset,
                e.opcode,
                self.ns.errors
            );
        }
        for d in &self.virtio {
            println!(
                "ACPI LNRO0005 base={:#x} size={:#x} irq={}",
                d.addr, d.size, d.irq
            );
        }
        for s in &self.serial {
            println!("ACPI PNP0501 io={:#x} irq={}", s.io, s.irq);
        }
        for g in &self.ged {
            println!(
                "ACPI ACPI0013 sel={:#x} irq={} evt={}",
                g.selector.unwrap_or(0),
                g.irq,
                if g.evt.is_some() { "method" } else { "none" }
            );
        }
        for _ in &self.pwrb {
            println!("ACPI PNP0C0C");
        }
        if let Some(f) = &self.fadt {
            let addr = |g: Option<acpi::Gas>| g.map_or(0, |g| g.addr);
            println!(
                "ACPI FADT hw_reduced={} sleep_control={:#x} sleep_status={:#x} reset={:#x} reset_value={:#x} s5={}",
                f.hw_reduced as u8,
                addr(f.sleep_control),
                addr(f.sleep_status),
                addr(f.reset),
                f.reset_value,
                self.s5.map_or(-1, |v| v as i64)
            );
        }
        let source = if !self.virtio.is_empty() {
            cfg.nvirtio = 0;
            for d in self.virtio.iter().take(MAX_VIRTIO) {
                cfg.virtio[cfg.nvirtio] = *d;
                cfg.nvirtio += 1;
            }
            "acpi"
        } else if cfg.nvirtio > 0 {
            "cmdline"
        } else {
            "none"
        };
        println!(
            "ACPI devices: virtio-mmio={} serial={} ged={} pwrb={} s5={} source={}",
            self.virtio.len(),
            self.serial.len(),
            self.ged.len(),
            self.pwrb.len(),
            self.s5.is_some() as u8,
            source
        );
    }
}
