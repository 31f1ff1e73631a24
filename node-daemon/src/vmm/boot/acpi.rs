//! ACPI tables for a hardware-reduced platform, built with the rust-vmm
//! `acpi_tables` crate (tables and AML), the shapes of QEMU's
//! `-M microvm,acpi=on`:
//!
//! ```text
//! 0xE0000 RSDP (revision 2) -> XSDT -> FADT -> DSDT
//!                                   -> MADT
//! ```
//!
//! - FADT: `HW_REDUCED_ACPI`, sleep control/status and reset registers in
//!   the GED window ([`crate::vmm::devices::ged`]), reset value.
//! - MADT: one local APIC per vCPU and the IOAPIC (no interrupt source
//!   overrides: every GSI we use is identity-mapped, edge, active high).
//! - DSDT: `\_SB_.COM1` (PNP0501), `\_SB_.VRnn` (LNRO0005, one per
//!   virtio-mmio window), `\_SB_.GED_` (ACPI0013, `_EVT` reads the selector
//!   and notifies the power button), `\_SB_.PWRB` (PNP0C0C), `\_S5_`.
//!
//! The tables sit between [`RSDP_ADDR`] and the MP table
//! ([`super::MPTABLE_ADDR`]), inside the area the e820 map reserves. The MP
//! table stays with ACPI on: Linux takes the MADT when there is one, and a
//! guest booted with `acpi=off` still finds its CPUs.

use acpi_tables::aml::{
    self, Device, EISAName, Field, FieldAccessType, FieldEntry, FieldLockRule, FieldUpdateRule,
    Interrupt, Local, Memory32Fixed, Method, Name, Notify, OpRegion, OpRegionSpace, Package, Path,
    ResourceTemplate, Scope, Store, IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use vm_memory::{Bytes, GuestAddress};

use super::mptable::{IOAPIC_ADDR, LAPIC_ADDR};
use super::{BootError, MPTABLE_ADDR};
use crate::vmm::devices::ged::{
    EVENT_POWER_BUTTON, GED_BASE, GED_GSI, RESET, RESET_VALUE, SELECTOR, SLEEP_CONTROL,
    SLEEP_STATUS, SLP_TYP_S5,
};
use crate::vmm::devices::serial::{COM1_BASE, COM1_IRQ};
use crate::vmm::memory::GuestMemory;

/// Where the RSDP goes (the start of the BIOS area a guest scans).
pub const RSDP_ADDR: u64 = 0xe_0000;
const OEM_ID: [u8; 6] = *b"GODWIT";
const OEM_TABLE_ID: [u8; 8] = *b"GODWITVM";
const OEM_REVISION: u32 = 1;

/// One virtio-mmio window as the DSDT describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioDevice {
    /// Guest-physical base.
    pub base: u64,
    /// Window size.
    pub size: u64,
    /// GSI.
    pub gsi: u32,
}

/// What the tables describe.
#[derive(Clone, Debug)]
pub struct Platform {
    /// vCPU count (local APIC ids 0..n).
    pub vcpus: u8,
    /// virtio-mmio windows, in window order.
    pub virtio: Vec<MmioDevice>,
}

/// The tables and where each goes in guest memory.
#[derive(Clone, Debug)]
pub struct Tables {
    /// (guest-physical address, bytes), RSDP first.
    pub blobs: Vec<(u64, Vec<u8>)>,
}

/// Bytes already encoded by the crate's AML builders, as one object.
struct Encoded(Vec<u8>);

impl Aml for Encoded {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

fn encode(a: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    a.to_aml_bytes(&mut v);
    v
}

fn com1() -> Vec<u8> {
    let io = IO::new(COM1_BASE, COM1_BASE, 1, 8);
    let irq = Interrupt::new(true, true, false, false, COM1_IRQ);
    let crs = ResourceTemplate::new(vec![&io, &irq]);
    encode(&Device::new(
        "COM1".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0501")),
            &Name::new("_UID".into(), &aml::ZERO),
            &Name::new("_CRS".into(), &crs),
        ],
    ))
}

fn virtio(i: usize, d: &MmioDevice) -> Vec<u8> {
    let name = format!("VR{i:02X}");
    let window = Memory32Fixed::new(true, d.base as u32, d.size as u32);
    let irq = Interrupt::new(true, true, false, false, d.gsi);
    let crs = ResourceTemplate::new(vec![&window, &irq]);
    let uid = i as u32;
    encode(&Device::new(
        name.as_str().into(),
        vec![
            &Name::new("_HID".into(), &"LNRO0005"),
            &Name::new("_UID".into(), &uid),
            &Name::new("_CRS".into(), &crs),
        ],
    ))
}

/// `\_SB_.GED_`: its interrupt, the selector as a field, and `_EVT`:
/// `Local0 = GDAT; if (Local0 & 2) == 2 { Notify(\_SB_.PWRB, 0x80) }`.
fn ged() -> Vec<u8> {
    let irq = Interrupt::new(true, true, false, false, GED_GSI);
    let crs = ResourceTemplate::new(vec![&irq]);
    let sel_addr = (GED_BASE + SELECTOR) as u32;
    let sel_len = 4u32;
    let region = OpRegion::new(
        "GDST".into(),
        OpRegionSpace::SystemMemory,
        &sel_addr,
        &sel_len,
    );
    let field = Field::new(
        "GDST".into(),
        FieldAccessType::DWord,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        vec![FieldEntry::Named(*b"GDAT", 32)],
    );
    let gdat = Path::new("GDAT");
    let bit = EVENT_POWER_BUTTON;
    let and = aml::And::new(&Local(1), &Local(0), &bit);
    let pressed = aml::Equal::new(&Local(1), &bit);
    let pwrb = Path::new("\\_SB_.PWRB");
    let notify = Notify::new(&pwrb, &0x80u8);
    let store = Store::new(&Local(0), &gdat);
    let cond = aml::If::new(&pressed, vec![&notify]);
    let evt = Method::new("_EVT".into(), 1, true, vec![&store, &and, &cond]);
    encode(&Device::new(
        "GED_".into(),
        vec![
            &Name::new("_HID".into(), &"ACPI0013"),
            &Name::new("_UID".into(), &aml::ZERO),
            &Name::new("_CRS".into(), &crs),
            &region,
            &field,
            &evt,
        ],
    ))
}

fn power_button() -> Vec<u8> {
    encode(&Device::new(
        "PWRB".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0C0C")),
            &Name::new("_UID".into(), &aml::ZERO),
        ],
    ))
}

/// The DSDT's AML body (without the table header).
fn dsdt_body(p: &Platform) -> Vec<u8> {
    let mut devices = vec![Encoded(com1())];
    devices.extend(
        p.virtio
            .iter()
            .enumerate()
            .map(|(i, d)| Encoded(virtio(i, d))),
    );
    devices.push(Encoded(ged()));
    devices.push(Encoded(power_button()));
    let children: Vec<&dyn Aml> = devices.iter().map(|d| d as &dyn Aml).collect();
    let mut body = encode(&Scope::new("\\_SB_".into(), children));
    let s5 = Package::new(vec![&SLP_TYP_S5, &aml::ZERO]);
    body.extend(encode(&Name::new("\\_S5_".into(), &s5)));
    body
}

fn gas8(offset: u64) -> GAS {
    GAS::new(
        AddressSpace::SystemMemory,
        8,
        0,
        AccessSize::ByteAccess,
        GED_BASE + offset,
    )
}

fn align(a: u64) -> u64 {
    (a + 15) & !15
}

/// Builds the tables for `p`, laid out from [`RSDP_ADDR`].
pub fn build(p: &Platform) -> Result<Tables, BootError> {
    let xsdt_addr = RSDP_ADDR + 0x40;
    // XSDT: header and two entries (FADT, MADT).
    let fadt_addr = align(xsdt_addr + 36 + 2 * 8);
    let fadt_len = acpi_tables::fadt::FADT::len() as u64;
    let madt_addr = align(fadt_addr + fadt_len);

    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDR),
    );
    for id in 0..p.vcpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(p.vcpus, IOAPIC_ADDR, 0));
    let madt = encode(&madt);
    let dsdt_addr = align(madt_addr + madt.len() as u64);

    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    dsdt.append_slice(&dsdt_body(p));
    let dsdt = dsdt.as_slice().to_vec();
    if dsdt_addr + dsdt.len() as u64 > MPTABLE_ADDR {
        return Err(BootError::AcpiTooLarge);
    }

    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        // The power button is a control-method device (PNP0C0C), and there
        // is no sleep button.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.reset_reg = gas8(RESET);
    fadt.reset_value = RESET_VALUE;
    fadt.sleep_control_reg = gas8(SLEEP_CONTROL);
    fadt.sleep_status_reg = gas8(SLEEP_STATUS);
    let fadt = encode(&fadt.finalize());

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = encode(&xsdt);
    debug_assert_eq!(xsdt_addr + xsdt.len() as u64, xsdt_addr + 36 + 16);

    let rsdp = encode(&Rsdp::new(OEM_ID, xsdt_addr));
    Ok(Tables {
        blobs: vec![
            (RSDP_ADDR, rsdp),
            (xsdt_addr, xsdt),
            (fadt_addr, fadt),
            (madt_addr, madt),
            (dsdt_addr, dsdt),
        ],
    })
}

/// Writes the tables for `p` into guest memory; returns the RSDP address.
pub fn write(mem: &GuestMemory, p: &Platform) -> Result<u64, BootError> {
    for (addr, bytes) in build(p)?.blobs {
        mem.write_slice(&bytes, GuestAddress(addr))
            .map_err(BootError::WriteGuestMemory)?;
    }
    Ok(RSDP_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_layout() {
        let p = Platform {
            vcpus: 4,
            virtio: (0..8)
                .map(|i| MmioDevice {
                    base: 0xd000_0000 + i * 0x1000,
                    size: 0x1000,
                    gsi: 5 + i as u32,
                })
                .collect(),
        };
        let t = build(&p).unwrap();
        let sigs: Vec<&[u8]> = t.blobs.iter().map(|(_, b)| &b[..4]).collect();
        assert_eq!(sigs, [&b"RSD "[..], b"XSDT", b"FACP", b"APIC", b"DSDT"]);
        assert_eq!(sum(&t.blobs[0].1[..20]), 0);
        assert_eq!(sum(&t.blobs[0].1), 0);
        for (addr, b) in &t.blobs[1..] {
            assert_eq!(sum(b), 0, "checksum of {:?}", std::str::from_utf8(&b[..4]));
            let len = u32::from_le_bytes(b[4..8].try_into().unwrap()) as usize;
            assert_eq!(len, b.len());
            assert_eq!(addr % 16, 0);
        }
        for w in t.blobs.windows(2) {
            assert!(w[0].0 + w[0].1.len() as u64 <= w[1].0, "tables overlap");
        }
        let dsdt = &t.blobs[4].1;
        let has = |s: &[u8]| dsdt.windows(s.len()).any(|w| w == s);
        assert!(has(b"LNRO0005") && has(b"VR07") && has(b"ACPI0013") && has(b"_S5_"));
        // MADT: header 44 bytes, 4 local APICs (8 bytes) and an IOAPIC (12).
        assert_eq!(t.blobs[3].1.len(), 44 + 4 * 8 + 12);
    }
}
