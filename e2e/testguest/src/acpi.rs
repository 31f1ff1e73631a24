//! The firmware tables: finding the RSDP (start info or the BIOS area), walking
//! the XSDT/RSDT, the FADT's fixed fields, and counting CPUs from the ACPI MADT,
//! else an Intel MultiProcessor table.

use core::ptr::read_unaligned;
use core::sync::atomic::{AtomicU64, Ordering};

/// Where the CPU count came from.
pub enum CpuSource {
    Acpi,
    MpTable,
    None,
}

fn rd8(a: u64) -> u8 {
    // SAFETY: firmware tables lie in identity-mapped low memory or ACPI regions
    // the boot tables map; reads have no side effects.
    unsafe { read_unaligned(a as *const u8) }
}
fn rd16(a: u64) -> u16 {
    // SAFETY: as rd8.
    unsafe { read_unaligned(a as *const u16) }
}
fn rd32(a: u64) -> u32 {
    // SAFETY: as rd8.
    unsafe { read_unaligned(a as *const u32) }
}
fn rd64(a: u64) -> u64 {
    // SAFETY: as rd8.
    unsafe { read_unaligned(a as *const u64) }
}

fn matches(a: u64, sig: &[u8]) -> bool {
    sig.iter().enumerate().all(|(i, b)| rd8(a + i as u64) == *b)
}

fn checksum_ok(a: u64, len: u64) -> bool {
    let mut s = 0u8;
    for i in 0..len {
        s = s.wrapping_add(rd8(a + i));
    }
    s == 0
}

fn scan(from: u64, to: u64, sig: &[u8], len: u64) -> Option<u64> {
    let mut a = from;
    while a + len <= to {
        if matches(a, sig) && checksum_ok(a, len) {
            return Some(a);
        }
        a += 16;
    }
    None
}

fn ebda() -> u64 {
    (rd16(0x40e) as u64) << 4
}

/// The RSDP found by [`find_rsdp`] (0: not searched yet, 1: none).
static RSDP: AtomicU64 = AtomicU64::new(0);

/// The RSDP: the start info's `rsdp_paddr` when set, else a scan of the EBDA
/// and `0xE0000-0xFFFFF`. The scan (slow in ring 0 here) runs once.
pub fn find_rsdp(hint: u64) -> Option<u64> {
    match RSDP.load(Ordering::Relaxed) {
        0 => {
            let r = if hint != 0 {
                Some(hint)
            } else {
                let e = ebda();
                (if (0x400..0xa0000).contains(&e) {
                    scan(e, e + 1024, b"RSD PTR ", 20)
                } else {
                    None
                })
                .or_else(|| scan(0xe0000, 0x100000, b"RSD PTR ", 20))
            };
            let r = r.filter(|a| matches(*a, b"RSD PTR "));
            RSDP.store(r.unwrap_or(1), Ordering::Relaxed);
            r
        }
        1 => None,
        a => Some(a),
    }
}

/// Calls `f` with the address of each table the XSDT (RSDT for revision 0)
/// lists, until it returns `Some`.
pub fn each_table<T>(rsdp: u64, mut f: impl FnMut(u64) -> Option<T>) -> Option<T> {
    let rev = rd8(rsdp + 15);
    let (table, entry) = if rev >= 2 && rd64(rsdp + 24) != 0 {
        (rd64(rsdp + 24), 8)
    } else {
        (rd32(rsdp + 16) as u64, 4)
    };
    if table == 0 {
        return None;
    }
    let len = rd32(table + 4) as u64;
    let mut off = 36;
    while off + entry <= len {
        let sdt = if entry == 8 {
            rd64(table + off)
        } else {
            rd32(table + off) as u64
        };
        if sdt != 0 {
            if let Some(r) = f(sdt) {
                return Some(r);
            }
        }
        off += entry;
    }
    None
}

/// The table at `addr` as bytes (its header's length, at most 1 MiB).
pub fn table_bytes(addr: u64) -> &'static [u8] {
    let len = (rd32(addr + 4) as usize).clamp(36, 1 << 20);
    // SAFETY: firmware tables lie in identity-mapped memory below 4 GiB and
    // stay there; the guest never writes them.
    unsafe { core::slice::from_raw_parts(addr as *const u8, len) }
}

/// Whether the table at `addr` has the signature `sig` and a valid checksum.
pub fn table_ok(addr: u64, sig: &[u8; 4]) -> bool {
    matches(addr, sig) && {
        let b = table_bytes(addr);
        b.iter().fold(0u8, |s, x| s.wrapping_add(*x)) == 0
    }
}

/// A Generic Address Structure.
#[derive(Clone, Copy)]
pub struct Gas {
    /// 0 SystemMemory, 1 SystemIO.
    pub space: u8,
    pub bits: u8,
    pub addr: u64,
}

fn gas(a: u64) -> Option<Gas> {
    let g = Gas {
        space: rd8(a),
        bits: rd8(a + 1),
        addr: rd64(a + 4),
    };
    (g.addr != 0).then_some(g)
}

/// What the guest takes from the FADT.
pub struct Fadt {
    pub hw_reduced: bool,
    /// X_DSDT when set, else DSDT.
    pub dsdt: u64,
    pub sleep_control: Option<Gas>,
    pub sleep_status: Option<Gas>,
    pub reset: Option<Gas>,
    pub reset_value: u8,
}

/// Reads the FADT (signature `FACP`).
pub fn fadt(rsdp: u64) -> Option<Fadt> {
    let a = each_table(rsdp, |t| matches(t, b"FACP").then_some(t))?;
    let len = rd32(a + 4) as u64;
    let field = |off: u64, size: u64| (off + size <= len).then_some(a + off);
    let x_dsdt = field(140, 8).map(rd64).unwrap_or(0);
    Some(Fadt {
        hw_reduced: field(112, 4).is_some_and(|f| rd32(f) & (1 << 20) != 0),
        dsdt: if x_dsdt != 0 {
            x_dsdt
        } else {
            field(40, 4).map(rd32).unwrap_or(0) as u64
        },
        sleep_control: field(244, 12).and_then(gas),
        sleep_status: field(256, 12).and_then(gas),
        reset: field(116, 12).and_then(gas),
        reset_value: field(128, 1).map(rd8).unwrap_or(0),
    })
}

/// Counts enabled CPUs.
pub fn count_cpus(rsdp_hint: u64) -> (u32, CpuSource) {
    if let Some(n) = find_rsdp(rsdp_hint).and_then(madt_cpus) {
        return (n, CpuSource::Acpi);
    }
    if let Some(n) = mp_cpus() {
        return (n, CpuSource::MpTable);
    }
    (1, CpuSource::None)
}

fn madt_cpus(rsdp: u64) -> Option<u32> {
    each_table(rsdp, |t| matches(t, b"APIC").then(|| count_madt(t)))
}

fn count_madt(madt: u64) -> u32 {
    let len = rd32(madt + 4) as u64;
    let mut off = 44;
    let mut n = 0;
    while off + 2 <= len {
        let kind = rd8(madt + off);
        let elen = rd8(madt + off + 1) as u64;
        if elen < 2 {
            break;
        }
        match kind {
            0 if rd32(madt + off + 4) & 1 != 0 => n += 1,
            9 if rd32(madt + off + 8) & 1 != 0 => n += 1,
            _ => {}
        }
        off += elen;
    }
    n
}

fn mp_cpus() -> Option<u32> {
    let e = ebda();
    let fp = (if (0x400..0xa0000).contains(&e) {
        scan(e, e + 1024, b"_MP_", 16)
    } else {
        None
    })
    .or_else(|| scan(0x9fc00, 0xa0000, b"_MP_", 16))
    .or_else(|| scan(0xf0000, 0x100000, b"_MP_", 16))?;
    let cfg = rd32(fp + 4) as u64;
    if cfg == 0 || !matches(cfg, b"PCMP") {
        return None;
    }
    // Walk by the base table length: some firmware (qboot) leaves the entry
    // count at 0.
    let end = cfg + rd16(cfg + 4) as u64;
    let mut off = cfg + 44;
    let mut n = 0;
    while off < end {
        match rd8(off) {
            0 => {
                if rd8(off + 3) & 1 != 0 {
                    n += 1;
                }
                off += 20;
            }
            1..=4 => off += 8,
            _ => break,
        }
    }
    Some(n)
}
