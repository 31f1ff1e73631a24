//! The test guest's own AML reader (`e2e/testguest/src/aml.rs`) and `_EVT`
//! evaluator (`amleval.rs`), compiled here for the host and run on AML that
//! the real ACPI compiler, `iasl` (Debian `acpica-tools`), builds from ASL:
//! QEMU microvm's DSDT shape, Cloud Hypervisor's `_EVT` shape, and the
//! corners of the encoding (PkgLength sizes, name prefixes, skipped objects,
//! an unknown construct). The event selector lives in this process's memory,
//! so `_EVT`'s field read is a real volatile read.

#![allow(dead_code)]

extern crate alloc;

#[path = "../testguest/src/aml.rs"]
mod aml;
#[path = "../testguest/src/amleval.rs"]
mod amleval;

use std::process::Command;

use aml::{eisa_id, hid_is, Data, Namespace, NsPath, Object};
use amleval::Eval;
use godwit_testkit::qemu::ScratchDir;

/// Compiles `asl` with iasl and returns the AML table (leaked: the reader
/// keeps `'static` slices into it, as the guest does into its firmware).
fn compile(asl: &str) -> &'static [u8] {
    let dir = ScratchDir::new("aml").unwrap();
    let src = dir.path().join("t.asl");
    std::fs::write(&src, asl).unwrap();
    let out = Command::new("iasl")
        .arg("-p")
        .arg(dir.path().join("t"))
        .arg(&src)
        .output()
        .unwrap_or_else(|e| panic!("cannot run iasl (Debian acpica-tools): {e}"));
    assert!(
        out.status.success(),
        "iasl failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let aml = std::fs::read(dir.path().join("t.aml")).unwrap();
    Box::leak(aml.into_boxed_slice())
}

fn load(asl: &str) -> Namespace {
    let mut ns = Namespace::new();
    ns.load(compile(asl));
    ns
}

fn path(s: &str) -> NsPath {
    s.trim_start_matches('\\')
        .split('.')
        .fold(NsPath::ROOT, |p, seg| {
            let mut b = [b'_'; 4];
            b[..seg.len()].copy_from_slice(seg.as_bytes());
            p.child(b).unwrap()
        })
}

fn obj(ns: &Namespace, p: &str) -> Object {
    ns.get(&path(p))
        .unwrap_or_else(|| panic!("{p} is not in the namespace"))
        .obj
}

fn hid(ns: &Namespace, dev: &str) -> Data {
    ns.child_data(&path(dev), b"_HID")
        .unwrap_or_else(|| panic!("{dev} has no _HID"))
}

/// The event selector: a u32 in this process that the AML's region covers.
fn selector() -> &'static mut u32 {
    Box::leak(Box::new(0u32))
}

/// Runs `method` with Arg0 = 9; returns the notifications (target, value).
fn run_evt(ns: &Namespace, method: &str) -> Vec<(String, u64)> {
    let mut e = Eval::new(ns);
    e.call(&path(method), &[9])
        .unwrap_or_else(|u| panic!("{method} not understood: {u:?}"));
    e.notified
        .iter()
        .flatten()
        .map(|n| (n.target.to_string(), n.value))
        .collect()
}

fn qemu_like(sel: u64) -> String {
    format!(
        r#"DefinitionBlock ("", "DSDT", 2, "GODWIT", "TEST", 1)
{{
    Scope (\_SB)
    {{
        Device (COM1)
        {{
            Name (_HID, EisaId ("PNP0501"))
            Name (_UID, One)
            Name (_STA, 0x0F)
            Name (_CRS, ResourceTemplate ()
            {{
                IO (Decode16, 0x03F8, 0x03F8, 0x00, 0x08, )
                IRQNoFlags () {{4}}
            }})
        }}
        Device (GED)
        {{
            Name (_HID, "ACPI0013")
            Name (_UID, "GED")
            Name (_CRS, ResourceTemplate ()
            {{
                Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) {{9}}
            }})
            OperationRegion (EREG, SystemMemory, {sel:#x}, 0x04)
            Field (EREG, DWordAcc, NoLock, WriteAsZeros)
            {{
                ESEL, 32
            }}
            Method (_EVT, 1, Serialized)
            {{
                Local0 = ESEL
                If (((Local0 & 0x02) == 0x02))
                {{
                    Notify (PWRB, 0x80)
                }}
            }}
        }}
        Device (PWRB)
        {{
            Name (_HID, "PNP0C0C")
            Name (_UID, Zero)
        }}
        Device (VR00)
        {{
            Name (_HID, "LNRO0005")
            Name (_UID, Zero)
            Name (_CCA, One)
            Name (_CRS, ResourceTemplate ()
            {{
                Memory32Fixed (ReadWrite, 0xD0000000, 0x00001000, )
                Interrupt (ResourceConsumer, Level, ActiveHigh, Exclusive, ,, ) {{5}}
            }})
        }}
    }}
    Name (\_S5, Package (0x04) {{ 0x05, Zero, Zero, Zero }})
}}
"#
    )
}

#[test]
fn a_qemu_microvm_shaped_dsdt_yields_its_devices_and_the_power_button() {
    let sel = selector();
    let ns = load(&qemu_like(sel as *mut u32 as u64));
    assert_eq!(ns.errors, 0);
    assert!(hid_is(hid(&ns, "_SB.COM1"), b"PNP0501"));
    assert!(hid_is(hid(&ns, "_SB.GED"), b"ACPI0013"));
    assert!(hid_is(hid(&ns, "_SB.PWRB"), b"PNP0C0C"));
    assert!(hid_is(hid(&ns, "_SB.VR00"), b"LNRO0005"));
    assert!(matches!(obj(&ns, "_SB.VR00"), Object::Device));
    match ns.child_data(&path("_SB.VR00"), b"_CRS") {
        Some(Data::Buf(b)) => {
            // Memory32Fixed: tag 0x86, base at 4, length at 8.
            assert_eq!(b[0], 0x86);
            assert_eq!(u32::from_le_bytes(b[4..8].try_into().unwrap()), 0xd000_0000);
            assert_eq!(u32::from_le_bytes(b[8..12].try_into().unwrap()), 0x1000);
        }
        _ => panic!("VR00 has no _CRS buffer"),
    }
    match obj(&ns, "_S5") {
        Object::Name(Data::Pkg(4, elems)) => assert_eq!(aml::int_const(elems, 0).unwrap().0, 5),
        _ => panic!("\\_S5_ is not a 4-element package"),
    }
    match obj(&ns, "_SB.GED.ESEL") {
        Object::Field {
            region,
            offset: 0,
            bits: 32,
            access: 3,
        } => assert!(region == path("_SB.GED.EREG"), "{region}"),
        _ => panic!("ESEL is not a 32-bit DWordAcc field at 0"),
    }

    // Nothing pending: no notification, and the read left the selector alone.
    assert!(run_evt(&ns, "_SB.GED._EVT").is_empty());
    // The power-button bit: Notify(\_SB.PWRB, 0x80).
    *sel = 2;
    assert_eq!(
        run_evt(&ns, "_SB.GED._EVT"),
        [("\\_SB_.PWRB".to_string(), 0x80)]
    );
    // Another event bit only.
    *sel = 4;
    assert!(run_evt(&ns, "_SB.GED._EVT").is_empty());
}

#[test]
fn a_cloud_hypervisor_shaped_evt_with_locals_calls_and_root_paths() {
    let sel = selector();
    let asl = format!(
        r#"DefinitionBlock ("", "DSDT", 2, "GODWIT", "TEST", 1)
{{
    Device (\_SB.PWRB) {{ Name (_HID, EisaId ("PNP0C0C")) }}
    Scope (\_SB)
    {{
        Device (CPUS)
        {{
            Name (SCNT, Zero)
            Method (CSCN, 0, Serialized) {{ SCNT = (SCNT + One) }}
        }}
        Device (GEC)
        {{
            Name (_HID, "ACPI0013")
            OperationRegion (GDST, SystemMemory, {:#x}, 0x04)
            Field (GDST, DWordAcc, NoLock, WriteAsZeros) {{ GDAT, 32 }}
            Method (_EVT, 1, Serialized)
            {{
                Local0 = GDAT
                Local1 = (Local0 & 0x01)
                If ((Local1 == 0x01)) {{ \_SB.CPUS.CSCN () }}
                Local1 = (Local0 & 0x08)
                If ((Local1 == 0x08)) {{ Notify (\_SB.PWRB, 0x80) }}
                ElseIf ((Arg0 != 0x09)) {{ Notify (\_SB.PWRB, 0x81) }}
            }}
        }}
    }}
}}
"#,
        sel as *mut u32 as u64
    );
    let ns = load(&asl);
    assert_eq!(ns.errors, 0);
    *sel = 0x9;
    assert_eq!(
        run_evt(&ns, "_SB.GEC._EVT"),
        [("\\_SB_.PWRB".to_string(), 0x80)]
    );
    *sel = 0x2;
    assert!(run_evt(&ns, "_SB.GEC._EVT").is_empty());
}

#[test]
fn encoding_corners_are_read() {
    let big: Vec<String> = (0..5000).map(|i| format!("{:#04x}", i % 256)).collect();
    let asl = format!(
        r#"DefinitionBlock ("", "SSDT", 2, "GODWIT", "TEST", 1)
{{
    External (\_SB.PCI0, DeviceObj)
    Name (BIG1, Buffer () {{ {} }})
    Scope (\_SB)
    {{
        Mutex (MTX0, 0)
        Event (EVT0)
        Processor (CPU0, 0x00, 0x00000000, 0x00) {{ Name (_HID, "ACPI0007") }}
        PowerResource (PRS0, 0, 0) {{ Method (_STA) {{ Return (One) }} }}
        Device (OUTR)
        {{
            Name (_HID, "ABCD0001")
            Device (INNR)
            {{
                Name (_HID, EisaId ("PNP0A03"))
                Name (^^OUT2, 0x12345678)
                Name (\_SB.OUTR.QW00, 0x123456789ABCDEF0)
                Name (STR0, "hello")
                OperationRegion (REG0, SystemMemory, 0xFEB00000, 0x100)
                Field (REG0, AnyAcc, NoLock, Preserve)
                {{
                    Offset (0x10),
                    F010, 8,
                        , 4,
                    F011, 4,
                    AccessAs (WordAcc),
                    F012, 16
                }}
                Method (LOOP, 1, NotSerialized)
                {{
                    Acquire (\_SB.MTX0, 0xFFFF)
                    Local0 = Zero
                    Local1 = Zero
                    While ((Local0 < Arg0))
                    {{
                        Local1 = (Local1 + (Local0 << One))
                        Local0++
                        If ((Local1 > 100)) {{ Break }}
                    }}
                    Release (\_SB.MTX0)
                    If (LNot ((Local1 == 0x00))) {{ Return (Local1) }}
                    Return (Ones)
                }}
            }}
        }}
    }}
    Device (\_SB.LAST) {{ Name (_HID, "LNRO0005") }}
}}
"#,
        big.join(", ")
    );
    let table = compile(&asl);
    let mut ns = Namespace::new();
    ns.load(table);
    assert_eq!(ns.errors, 0);
    match obj(&ns, "BIG1") {
        // A 3-byte PkgLength (5000 > 4095).
        Object::Name(Data::Buf(b)) => assert_eq!(b.len(), 5000),
        _ => panic!("BIG1 is not a buffer"),
    }
    assert!(hid_is(hid(&ns, "_SB.OUTR.INNR"), b"PNP0A03"));
    assert_eq!(&eisa_id(0x030a_d041), b"PNP0A03");
    assert!(matches!(
        obj(&ns, "_SB.OUT2"),
        Object::Name(Data::Int(0x1234_5678))
    ));
    assert!(matches!(
        obj(&ns, "_SB.OUTR.QW00"),
        Object::Name(Data::Int(0x1234_5678_9abc_def0))
    ));
    assert!(matches!(
        obj(&ns, "_SB.OUTR.INNR.STR0"),
        Object::Name(Data::Str(b"hello"))
    ));
    assert!(matches!(obj(&ns, "_SB.MTX0"), Object::Other));
    // Skipped whole: nothing inside a Processor or PowerResource is recorded.
    assert!(ns.get(&path("_SB.CPU0._HID")).is_none());
    let field = |n: &str| match obj(&ns, &format!("_SB.OUTR.INNR.{n}")) {
        Object::Field {
            offset,
            bits,
            access,
            ..
        } => (offset, bits, access),
        _ => panic!("{n} is not a field"),
    };
    assert_eq!(field("F010"), (0x80, 8, 0));
    assert_eq!(field("F011"), (0x8c, 4, 0));
    assert_eq!(field("F012"), (0x90, 16, 2));
    assert!(hid_is(hid(&ns, "_SB.LAST"), b"LNRO0005"));

    // The evaluator: loops, Break, Acquire/Release, Return, nested operators.
    let mut e = Eval::new(&ns);
    assert_eq!(e.call(&path("_SB.OUTR.INNR.LOOP"), &[4]).unwrap(), 12);
    assert_eq!(e.call(&path("_SB.OUTR.INNR.LOOP"), &[50]).unwrap(), 110);
    assert_eq!(e.call(&path("_SB.OUTR.INNR.LOOP"), &[0]).unwrap(), u64::MAX);
}

#[test]
fn an_unknown_construct_skips_only_the_rest_of_its_scope() {
    let asl = r#"DefinitionBlock ("", "DSDT", 2, "GODWIT", "TEST", 1)
{
    Scope (\_SB)
    {
        Device (VR00) { Name (_HID, "LNRO0005") }
        Name (BUF0, Buffer (8) {})
        CreateDWordField (BUF0, 0, DW00)
        Device (VR01) { Name (_HID, "LNRO0005") }
    }
    Scope (\_SB)
    {
        Device (VR02) { Name (_HID, "LNRO0005") }
    }
}
"#;
    let ns = load(asl);
    assert_eq!(ns.errors, 1);
    let e = ns.first_error.unwrap();
    assert_eq!(&e.table, b"DSDT");
    assert_eq!(e.opcode, 0x8a, "CreateDWordField");
    assert!(ns.get(&path("_SB.VR00")).is_some());
    assert!(ns.get(&path("_SB.VR01")).is_none());
    assert!(ns.get(&path("_SB.VR02")).is_some());
}

#[test]
fn an_evt_outside_the_subset_is_reported_not_guessed() {
    let sel = selector();
    let asl = format!(
        r#"DefinitionBlock ("", "DSDT", 2, "GODWIT", "TEST", 1)
{{
    Device (\_SB.PWRB) {{ Name (_HID, "PNP0C0C") }}
    Device (\_SB.GED)
    {{
        Name (_HID, "ACPI0013")
        OperationRegion (EREG, SystemMemory, {:#x}, 0x04)
        Field (EREG, DWordAcc, NoLock, WriteAsZeros) {{ ESEL, 32 }}
        Method (_EVT, 1, Serialized)
        {{
            Local0 = ToBCD (ESEL)
            If ((Local0 & 0x02)) {{ Notify (\_SB.PWRB, 0x80) }}
        }}
    }}
}}
"#,
        sel as *mut u32 as u64
    );
    let ns = load(&asl);
    assert_eq!(ns.errors, 0);
    *sel = 2;
    let mut e = Eval::new(&ns);
    let err = e.call(&path("_SB.GED._EVT"), &[9]).unwrap_err();
    assert_eq!(err.opcode, 0x5b, "ToBCD is an extended opcode");
    assert!(e.notified.iter().all(Option::is_none));
}
