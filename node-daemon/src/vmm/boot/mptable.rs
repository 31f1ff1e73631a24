//! Intel MultiProcessor Specification 1.4 tables: how a guest without ACPI
//! learns its CPUs, buses, IOAPIC and interrupt routing. Written at
//! [`super::MPTABLE_ADDR`], inside the reserved BIOS area.

use vm_memory::{Bytes, GuestAddress};

use super::{BootError, MPTABLE_ADDR};
use crate::vmm::memory::GuestMemory;

/// Guest-physical address of the IOAPIC.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Guest-physical address of the local APICs.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// IOAPIC pins routed in the table.
const IOAPIC_PINS: u8 = 24;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Builds the floating pointer and configuration table for `ncpus` CPUs,
/// as they sit at [`MPTABLE_ADDR`].
pub fn build(ncpus: u8) -> Result<Vec<u8>, BootError> {
    if ncpus == 0 || ncpus > 254 {
        return Err(BootError::TooManyCpus);
    }
    let ioapic_id = ncpus;
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..ncpus {
        // Processor entry (20 bytes).
        entries.push(0u8);
        entries.push(id);
        entries.push(0x14); // LAPIC version
        entries.push(if id == 0 { 0x3 } else { 0x1 }); // EN, BP for the boot CPU
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // CPU signature
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // feature flags: FPU, APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    // Bus entry: ISA bus 0.
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    // IOAPIC entry.
    entries.extend_from_slice(&[2, ioapic_id, 0x11, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    // I/O interrupt entries: ISA IRQ n -> IOAPIC pin n.
    for irq in 0..IOAPIC_PINS {
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupt entries: ExtINT on LINT0, NMI on LINT1, all CPUs.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_addr = MPTABLE_ADDR as u32 + 16;
    let mut header = Vec::with_capacity(44);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    header.push(4); // spec revision 1.4
    header.push(0); // checksum, filled below
    header.extend_from_slice(b"GODWIT  "); // OEM id
    header.extend_from_slice(b"GODWIT-VMM  "); // product id
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    header.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    header.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    header.push(0); // extended table checksum
    header.push(0);
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&table_addr.to_le_bytes());
    fp.push(1); // length in 16-byte units
    fp.push(4); // spec revision
    fp.push(0); // checksum
    fp.extend_from_slice(&[0; 5]); // feature bytes: config table present
    fp[10] = checksum(&fp);

    let mut out = fp;
    out.extend_from_slice(&table);
    Ok(out)
}

/// Writes the MP table for `ncpus` CPUs into guest memory.
pub fn write(mem: &GuestMemory, ncpus: u8) -> Result<(), BootError> {
    let bytes = build(ncpus)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_ADDR))
        .map_err(BootError::WriteGuestMemory)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_counts() {
        let t = build(2).unwrap();
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(t[..16].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let len = u16::from_le_bytes([t[20], t[21]]) as usize;
        assert_eq!(len, t.len() - 16);
        assert_eq!(t[16..].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let cpus = t[16 + 44..].chunks(20).take_while(|c| c[0] == 0).count();
        assert_eq!(cpus, 2);
    }
}
