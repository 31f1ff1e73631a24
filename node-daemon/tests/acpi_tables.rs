//! The ACPI tables godwit-vmm builds, dumped from guest memory and checked
//! by ACPICA's disassembler (`iasl -d`, Debian `acpica-tools`): for 1, 2
//! and 4 vCPUs with 0 to 4 disks and NICs, every table disassembles without
//! errors or checksum warnings, and the DSDT names each virtio-mmio window
//! (LNRO0005) with its address and IRQ, the GED, the power button and
//! `\_S5_`.
//!
//! The VMM starts paused (the guest never runs), `save-state` writes guest
//! memory to `memory.bin`, and the tables are read from there by following
//! RSDP -> XSDT -> FADT -> DSDT as a guest would.
//!
//! Needs /dev/kvm, `iasl` and `ip` (the NICs' taps live in a private
//! network namespace).

mod common;

use std::path::Path;
use std::process::Command;

use common::{call, guest, require_kvm, Scratch, BOUNDED, VMM};
use godwit_testkit::netns::{unique_name, Netns};
use godwit_vmm_control::Command as Cmd;

const RSDP: usize = 0xe0000;

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// A table at `addr` in low guest memory (`mem` starts at GPA 0).
fn table(mem: &[u8], addr: u64) -> (String, Vec<u8>) {
    let a = addr as usize;
    let len = u32_at(mem, a + 4) as usize;
    let sig = String::from_utf8_lossy(&mem[a..a + 4]).to_string();
    (sig, mem[a..a + len].to_vec())
}

/// Every table reachable from the RSDP: (signature, bytes), RSDP first.
fn dump(mem: &[u8]) -> Vec<(String, Vec<u8>)> {
    assert_eq!(&mem[RSDP..RSDP + 8], b"RSD PTR ", "no RSDP at 0xE0000");
    let rsdp = mem[RSDP..RSDP + 36].to_vec();
    let xsdt_addr = u64_at(&rsdp, 24);
    let xsdt = table(mem, xsdt_addr);
    assert_eq!(xsdt.0, "XSDT");
    let mut out = vec![("RSDP".to_string(), rsdp)];
    let entries: Vec<u64> = (36..xsdt.1.len())
        .step_by(8)
        .map(|o| u64_at(&xsdt.1, o))
        .collect();
    out.push(xsdt);
    for e in entries {
        let t = table(mem, e);
        if t.0 == "FACP" {
            let x_dsdt = u64_at(&t.1, 140);
            out.push(table(mem, x_dsdt));
        }
        out.push(t);
    }
    out
}

/// Runs `iasl -d` on `file`; returns the disassembly, failing on errors or
/// warnings (checksums included).
fn disassemble(dir: &Path, file: &str) -> String {
    let out = Command::new("iasl")
        .current_dir(dir)
        .args(["-d", file])
        .output()
        .expect("run iasl (install Debian acpica-tools)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "iasl -d {file} failed:\n{text}");
    let lower = text.to_lowercase();
    for bad in ["error", "warning", "checksum", "invalid"] {
        assert!(
            !lower.lines().any(|l| l.contains(bad)),
            "iasl -d {file} reports {bad}:\n{text}"
        );
    }
    let dsl = dir.join(file.replace(".dat", ".dsl"));
    let dsl_text = std::fs::read_to_string(&dsl).unwrap_or_else(|e| panic!("{dsl:?}: {e}"));
    // The disassembler notes bad checksums and unknown fields inside the
    // listing too.
    let dlower = dsl_text.to_lowercase();
    assert!(
        !dlower.contains("incorrect checksum")
            && !dlower.contains("invalid")
            && !dlower.contains("**** "),
        "{file}: the disassembly flags a problem:\n{dsl_text}"
    );
    dsl_text
}

/// The text of `Device (NAME)` up to the next device in a DSDT listing.
fn device_block<'a>(dsl: &'a str, name: &str) -> &'a str {
    let start = dsl
        .find(&format!("Device ({name})"))
        .unwrap_or_else(|| panic!("no Device ({name}) in the DSDT:\n{dsl}"));
    let rest = &dsl[start + 8..];
    let end = rest.find("Device (").map_or(rest.len(), |e| e);
    &dsl[start..start + 8 + end]
}

fn check(vcpus: u8, disks: usize, nics: usize) {
    let tag = format!("acpit-{vcpus}-{disks}-{nics}");
    let dir = Scratch::new(&tag);
    let ns = Netns::new("at").unwrap();
    let api = dir.path("vm.api");
    let mut args: Vec<String> = BOUNDED.iter().map(|s| s.to_string()).collect();
    args.extend([
        VMM.to_string(),
        "--kernel".into(),
        guest().display().to_string(),
        "--memory-mib".into(),
        "32".into(),
        "--vcpus".into(),
        vcpus.to_string(),
        "--paused".into(),
        "--api-sock".into(),
        api.display().to_string(),
        "--timeout-s".into(),
        "60".into(),
    ]);
    for i in 0..disks {
        let p = dir.path(&format!("d{i}.img"));
        std::fs::File::create(&p).unwrap().set_len(1 << 20).unwrap();
        args.extend(["--disk".into(), format!("path={}", p.display())]);
    }
    for _ in 0..nics {
        args.extend(["--net".into(), format!("tap={}", unique_name("t"))]);
    }
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns.name()])
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn godwit-vmm");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !api.exists() {
        if let Ok(Some(st)) = child.try_wait() {
            let out = child.wait_with_output().unwrap();
            panic!(
                "godwit-vmm exited early ({st}): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(std::time::Instant::now() < deadline, "no control socket");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let snap = dir.path("snap");
    let r = call(&api, Cmd::SaveState { dir: snap.clone() });
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(call(&api, Cmd::Stop)["ok"], true);
    assert!(child.wait().unwrap().success());

    // memory.bin holds the regions back to back; the first starts at GPA 0.
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(snap.join("state.json")).unwrap()).unwrap();
    assert_eq!(state["memory"]["regions"][0]["gpa"], 0);
    assert_eq!(state["config"]["acpi"], true);
    let mem = std::fs::read(snap.join("memory.bin")).unwrap();
    let tables = dump(&mem[..0x10_0000]);
    let sigs: Vec<&str> = tables.iter().map(|t| t.0.as_str()).collect();
    assert_eq!(sigs, ["RSDP", "XSDT", "DSDT", "FACP", "APIC"], "{tag}");

    let work = dir.path("tables");
    std::fs::create_dir_all(&work).unwrap();
    let mut dsl = std::collections::HashMap::new();
    // iasl (20200925 in Debian 12) does not take a bare RSDP as a table
    // file: its two checksums are checked here.
    let rsdp = &tables[0].1;
    assert_eq!(sum(&rsdp[..20]), 0, "{tag}: RSDP checksum");
    assert_eq!(sum(rsdp), 0, "{tag}: RSDP extended checksum");
    assert_eq!(rsdp[15], 2, "{tag}: RSDP revision");
    for (sig, bytes) in &tables[1..] {
        let file = format!("{}.dat", sig.to_lowercase());
        std::fs::write(work.join(&file), bytes).unwrap();
        dsl.insert(sig.clone(), disassemble(&work, &file));
    }

    let madt = &dsl["APIC"];
    assert_eq!(
        madt.matches("Subtable Type : 00 [Processor Local APIC]")
            .count(),
        vcpus as usize,
        "{tag}: local APICs in the MADT:\n{madt}"
    );
    assert_eq!(madt.matches("[I/O APIC]").count(), 1, "{madt}");
    let fadt = &dsl["FACP"];
    assert!(
        fadt.contains("Hardware Reduced (V5) : 1"),
        "{tag}: FADT is not hardware-reduced:\n{fadt}"
    );

    let dsdt = &dsl["DSDT"];
    for i in 0..disks + nics {
        let block = device_block(dsdt, &format!("VR{i:02X}"));
        let base = format!("0x{:08X}", 0xd000_0000u64 + i as u64 * 0x1000);
        let irq = format!("0x{:08X}", 5 + i);
        assert!(
            block.contains("\"LNRO0005\"") && block.contains(&base) && block.contains(&irq),
            "{tag}: VR{i:02X} should be LNRO0005 at {base} with IRQ {irq}:\n{block}"
        );
    }
    assert!(
        !dsdt.contains(&format!("Device (VR{:02X})", disks + nics)),
        "{tag}: more virtio devices than configured:\n{dsdt}"
    );
    let ged = device_block(dsdt, "GED");
    assert!(
        ged.contains("\"ACPI0013\"")
            && ged.contains("0x00000017")
            && ged.contains("Method (_EVT")
            && ged.contains("Notify (\\_SB.PWRB, 0x80)"),
        "{tag}: GED:\n{ged}"
    );
    let com1 = device_block(dsdt, "COM1");
    assert!(
        com1.contains("EisaId (\"PNP0501\")") && com1.contains("0x03F8"),
        "{com1}"
    );
    assert!(
        device_block(dsdt, "PWRB").contains("EisaId (\"PNP0C0C\")"),
        "{dsdt}"
    );
    assert!(
        dsdt.contains("Name (\\_S5, Package"),
        "{tag}: no _S5_:\n{dsdt}"
    );
}

#[test]
fn iasl_disassembles_every_table_for_each_shape() {
    require_kvm();
    let started = std::time::Instant::now();
    // vCPUs x (disks, NICs): every count from 0 to 4 of each kind appears
    // with every vCPU count.
    for vcpus in [1u8, 2, 4] {
        for n in 0..=4usize {
            let nics = (n + vcpus as usize) % 5;
            check(vcpus, n, nics);
        }
    }
    eprintln!("15 VM shapes checked in {:?}", started.elapsed());
}
