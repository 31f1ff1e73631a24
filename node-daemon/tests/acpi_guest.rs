//! The test guest finds the same kinds of device from ACPI under godwit-vmm
//! as under QEMU `-M microvm,acpi=on` (whose tables Linux is known to
//! accept), then uses them the same way: a disk pattern written and read
//! back, and heartbeats streamed over TCP on the NIC it found.
//!
//! Needs /dev/kvm, `qemu-system-x86_64` (Debian `qemu-system-x86`) and `ip`.

mod common;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::{guest, start_vm, Scratch, BOOT};
use godwit_testkit::guest::{field, parse_heartbeat, Console};
use godwit_testkit::netns::{unique_name, Netns};
use godwit_testkit::qemu::{Qemu, QemuConfig};

const T: Duration = Duration::from_secs(30);

/// What one VMM's guest reported and did.
#[derive(Debug, PartialEq)]
struct Seen {
    /// `ACPI devices: ...`
    summary: String,
    /// The `ACPI FADT` line without its addresses.
    fadt: Vec<String>,
    /// `ACPI <HID>` kinds, sorted, one per device.
    hids: Vec<String>,
    /// `VIRTIO` kinds, sorted.
    virtio: Vec<String>,
}

/// Reads the guest's boot lines, checks the disk pattern and streams
/// heartbeats from `ip` (reachable from `ns`).
fn observe(console: &mut Console, ns: &Netns, ip: &str) -> Seen {
    let mut hids = Vec::new();
    let mut fadt = Vec::new();
    let summary = loop {
        let l = console
            .wait_for("the ACPI lines", BOOT, |t| t.starts_with("ACPI "))
            .unwrap()
            .text;
        if l.starts_with("ACPI devices: ") {
            break l;
        }
        let kind = l.split(' ').nth(1).unwrap().to_string();
        if kind == "FADT" {
            fadt = ["hw_reduced", "reset_value", "s5"]
                .iter()
                .map(|k| format!("{k}={}", field(&l, k).unwrap_or("?")))
                .collect();
        } else {
            hids.push(kind);
        }
    };
    hids.sort();
    let mut virtio = Vec::new();
    for _ in 0..2 {
        let v = console.wait_prefix("VIRTIO ", T).unwrap().text;
        virtio.push(v.rsplit(' ').next().unwrap().to_string());
    }
    virtio.sort();
    console.wait_prefix("NET up", T).unwrap();
    let w = console.wait_prefix("BLK verify", T).unwrap();
    assert_eq!(w.text, "BLK verify ok sector=8 count=16 seed=77");
    console.wait_prefix("READY", T).unwrap();
    let addr: SocketAddr = format!("{ip}:7777").parse().unwrap();
    let counters = ns
        .run_in(move || -> Result<Vec<u64>, String> {
            let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
                .map_err(|e| format!("connect: {e}"))?;
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut r = BufReader::new(s);
            let mut out = Vec::new();
            let mut line = String::new();
            while out.len() < 10 {
                line.clear();
                r.read_line(&mut line).map_err(|e| format!("read: {e}"))?;
                out.push(
                    parse_heartbeat(line.trim_end())
                        .ok_or_else(|| format!("not a heartbeat: {line:?}"))?
                        .counter,
                );
            }
            Ok(out)
        })
        .unwrap()
        .unwrap();
    assert!(counters.windows(2).all(|w| w[1] > w[0]), "{counters:?}");
    Seen {
        summary,
        fadt,
        hids,
        virtio,
    }
}

fn disk(dir: &Scratch, name: &str) -> std::path::PathBuf {
    let p = dir.path(name);
    std::fs::File::create(&p).unwrap().set_len(4 << 20).unwrap();
    p
}

#[test]
fn the_guest_finds_the_same_device_kinds_from_acpi_under_qemu_and_godwit_vmm() {
    common::require_kvm();
    let dir = Scratch::new("acpi-same");
    let append = "hb_ms=50 blk_write=8:16:77";

    let qns = Netns::new("gaq").unwrap();
    qns.add_tap("tap0", None).unwrap();
    qns.add_addr("tap0", "10.79.0.1/24").unwrap();
    let mut q = Qemu::spawn(&QemuConfig {
        append: format!("{append} ip=10.79.0.10/24"),
        disks: vec![disk(&dir, "q.img")],
        taps: vec!["tap0".into()],
        netns: Some(qns.name().to_string()),
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("cannot run the test guest under QEMU/KVM: {e}"));
    let qemu = observe(&mut q.console, &qns, "10.79.0.10");
    drop(q);

    let vns = Netns::new("gav").unwrap();
    let br = unique_name("br");
    vns.add_bridge(&br).unwrap();
    vns.add_addr(&br, "10.79.1.1/24").unwrap();
    let img = disk(&dir, "v.img");
    let args: Vec<String> = vec![
        "--kernel".into(),
        guest().display().to_string(),
        "--memory-mib".into(),
        "128".into(),
        "--cmdline".into(),
        format!("{append} ip=10.79.1.10/24"),
        "--disk".into(),
        format!("path={}", img.display()),
        "--net".into(),
        format!("tap={},bridge={br}", unique_name("tap")),
    ];
    let mut vm = start_vm(&dir, "vm", &["ip", "netns", "exec", vns.name()], &args);
    let ours = observe(&mut vm.console, &vns, "10.79.1.10");

    assert_eq!(
        qemu.summary,
        "ACPI devices: virtio-mmio=2 serial=1 ged=1 pwrb=1 s5=1 source=acpi"
    );
    assert_eq!(qemu.virtio, ["blk", "net"]);
    assert_eq!(ours, qemu, "godwit-vmm's tables differ from QEMU's in kind");
}
