//! Counting CPUs: the ACPI MADT (RSDP from the start info or the BIOS area), else
//! an Intel MultiProcessor table.

use core::ptr::read_unaligned;

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

/// Counts enabled CPUs.
pub fn count_cpus(rsdp_hint: u64) -> (u32, CpuSource) {
    let rsdp = if rsdp_hint != 0 {
        Some(rsdp_hint)
    } else {
        let e = ebda();
        (if (0x400..0xa0000).contains(&e) {
            scan(e, e + 1024, b"RSD PTR ", 20)
        } else {
            None
        })
        .or_else(|| scan(0xe0000, 0x100000, b"RSD PTR ", 20))
    };
    if let Some(n) = rsdp.and_then(madt_cpus) {
        return (n, CpuSource::Acpi);
    }
    if let Some(n) = mp_cpus() {
        return (n, CpuSource::MpTable);
    }
    (1, CpuSource::None)
}

fn madt_cpus(rsdp: u64) -> Option<u32> {
    if !matches(rsdp, b"RSD PTR ") {
        return None;
    }
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
        if sdt != 0 && matches(sdt, b"APIC") {
            return Some(count_madt(sdt));
        }
        off += entry;
    }
    None
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
