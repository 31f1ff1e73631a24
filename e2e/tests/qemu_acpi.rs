//! The test guest as the ACPI oracle, under QEMU `-M microvm,acpi=on`, whose
//! tables Linux is known to accept: the guest finds its virtio-mmio disk and
//! NIC, COM1, the Generic Event Device, the power button and `\_S5_` from the
//! DSDT (not the command line), uses both devices, and acts on the power
//! button the way Linux does (QEMU exits when the guest writes S5). Without
//! ACPI it falls back to the command line's `virtio_mmio.device=`.
//!
//! These need /dev/kvm, `qemu-system-x86_64` (Debian `qemu-system-x86`) and
//! `ip` (`iproute2`); without them they fail.

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use godwit_testkit::guest::{blk_sector, field, parse_heartbeat, Console};
use godwit_testkit::netns::Netns;
use godwit_testkit::qemu::{Qemu, QemuConfig, ScratchDir};
use serde_json::json;

const BOOT: Duration = Duration::from_secs(60);
const T: Duration = Duration::from_secs(30);

fn spawn(cfg: &QemuConfig) -> Qemu {
    Qemu::spawn(cfg).unwrap_or_else(|e| panic!("cannot run the test guest under QEMU/KVM: {e}"))
}

/// The guest's `ACPI ...` lines, up to and including `ACPI devices: ...`.
fn acpi_lines(console: &mut Console) -> Vec<String> {
    let mut out = Vec::new();
    loop {
        let l = console
            .wait_for("the guest's ACPI lines", BOOT, |t| t.starts_with("ACPI "))
            .unwrap();
        let done = l.text.starts_with("ACPI devices: ");
        out.push(l.text);
        if done {
            return out;
        }
    }
}

fn summary(lines: &[String]) -> &str {
    lines.last().map(String::as_str).unwrap_or("")
}

/// Presses the power button through QMP.
fn press_power_button(q: &mut Qemu) {
    q.qmp()
        .unwrap()
        .execute("system_powerdown", json!({}))
        .unwrap();
}

#[test]
fn devices_come_from_the_dsdt_and_the_disk_and_nic_work() {
    let dir = ScratchDir::new("acpi-blk").unwrap();
    let image = dir.path().join("disk.raw");
    fs::write(&image, vec![0u8; 4 << 20]).unwrap();
    let ns = Netns::new("gacpi").unwrap();
    ns.add_tap("tap0", None).unwrap();
    ns.add_addr("tap0", "10.78.0.1/24").unwrap();
    let (sector, count, seed) = (64u64, 16u64, 4242u64);

    let mut q = spawn(&QemuConfig {
        append: format!("hb_ms=20 ip=10.78.0.10/24 blk_write={sector}:{count}:{seed}"),
        disks: vec![image.clone()],
        taps: vec!["tap0".into()],
        netns: Some(ns.name().to_string()),
        ..Default::default()
    });
    let cmdline = q.console.wait_prefix("CMDLINE ", BOOT).unwrap();
    assert!(
        !cmdline.text.contains("virtio_mmio.device="),
        "QEMU put the devices on the command line too: {}",
        cmdline.text
    );
    let acpi = acpi_lines(&mut q.console);
    assert_eq!(
        summary(&acpi),
        "ACPI devices: virtio-mmio=2 serial=1 ged=1 pwrb=1 s5=1 source=acpi",
        "{acpi:#?}"
    );
    let windows: Vec<&String> = acpi
        .iter()
        .filter(|l| l.starts_with("ACPI LNRO0005 "))
        .collect();
    assert_eq!(windows.len(), 2, "{acpi:#?}");
    for w in &windows {
        let base = field(w, "base").unwrap();
        assert!(base.starts_with("0xfeb"), "QEMU's virtio-mmio area: {w}");
        assert_eq!(field(w, "size"), Some("0x200"), "{w}");
    }
    assert!(
        acpi.contains(&"ACPI PNP0501 io=0x3f8 irq=4".to_string()),
        "{acpi:#?}"
    );
    assert!(
        acpi.contains(&"ACPI ACPI0013 sel=0xfea00000 irq=9 evt=method".to_string()),
        "{acpi:#?}"
    );
    let fadt = acpi.iter().find(|l| l.starts_with("ACPI FADT ")).unwrap();
    assert_eq!(
        fadt,
        "ACPI FADT hw_reduced=1 sleep_control=0xfea00200 sleep_status=0xfea00201 \
         reset=0xfea00202 reset_value=0x42 s5=5"
    );

    // The guest probes exactly the windows the DSDT lists.
    let mut kinds = Vec::new();
    for _ in 0..2 {
        let v = q.console.wait_prefix("VIRTIO ", T).unwrap();
        let addr = v.text.split(' ').nth(1).unwrap().to_string();
        assert!(
            windows
                .iter()
                .any(|w| field(w, "base") == Some(addr.as_str())),
            "{} is not a DSDT window: {windows:?}",
            v.text
        );
        kinds.push(v.text.rsplit(' ').next().unwrap().to_string());
    }
    kinds.sort();
    assert_eq!(kinds, ["blk", "net"]);
    q.console.wait_prefix("NET up ip=10.78.0.10", T).unwrap();
    let w = q.console.wait_prefix("BLK write", T).unwrap();
    assert_eq!(
        w.text,
        format!("BLK write ok sector={sector} count={count} seed={seed}")
    );
    let v = q.console.wait_prefix("BLK verify", T).unwrap();
    assert_eq!(
        v.text,
        format!("BLK verify ok sector={sector} count={count} seed={seed}")
    );
    q.console.wait_prefix("READY", T).unwrap();

    let counters = ns
        .run_in(|| -> Result<Vec<u64>, String> {
            let addr: SocketAddr = "10.78.0.10:7777".parse().unwrap();
            let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
                .map_err(|e| format!("connect: {e}"))?;
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut r = BufReader::new(s);
            let mut out = Vec::new();
            let mut line = String::new();
            while out.len() < 20 {
                line.clear();
                r.read_line(&mut line).map_err(|e| format!("read: {e}"))?;
                let hb = parse_heartbeat(line.trim_end())
                    .ok_or_else(|| format!("not a heartbeat: {line:?}"))?;
                out.push(hb.counter);
            }
            Ok(out)
        })
        .unwrap()
        .unwrap();
    assert!(
        counters.windows(2).all(|w| w[1] > w[0]),
        "TCP heartbeat counters went back: {counters:?}"
    );
    drop(q);

    let data = fs::read(&image).unwrap();
    for s in sector..sector + count {
        let at = s as usize * 512;
        assert_eq!(
            &data[at..at + 512],
            &blk_sector(seed, s)[..],
            "sector {s} on the image"
        );
    }
}

#[test]
fn the_power_button_powers_the_guest_off_through_s5() {
    let mut q = spawn(&QemuConfig {
        append: "hb_ms=20".into(),
        ..Default::default()
    });
    let acpi = acpi_lines(&mut q.console);
    assert!(summary(&acpi).contains(" pwrb=1 s5=1 "), "{acpi:#?}");
    q.console.wait_prefix("READY", BOOT).unwrap();
    q.console.heartbeats(3, T).unwrap();
    press_power_button(&mut q);
    let off = q.console.wait_prefix("POWER ", T).unwrap();
    assert_eq!(off.text, "POWER button: powering off");
    // QEMU exits by itself when the guest writes SLP_TYP 5 | SLP_EN.
    let status = q.wait_exit(Duration::from_secs(5)).unwrap_or_else(|| {
        panic!(
            "QEMU still runs 5 s after the guest wrote S5; console:\n{:#?}",
            q.console.lines().iter().rev().take(5).collect::<Vec<_>>()
        )
    });
    assert!(
        status.success(),
        "QEMU exited with {status}: {}",
        q.stderr()
    );
}

#[test]
fn with_pwrbtn_ignore_the_guest_reports_the_press_and_keeps_running() {
    let mut q = spawn(&QemuConfig {
        append: "hb_ms=20 pwrbtn=ignore".into(),
        ..Default::default()
    });
    q.console.wait_prefix("READY", BOOT).unwrap();
    q.console.heartbeats(3, T).unwrap();
    press_power_button(&mut q);
    let ignored = q.console.wait_prefix("POWER ", T).unwrap();
    assert_eq!(ignored.text, "POWER button: ignored");
    // A second press is seen too (the selector is read-and-clear).
    press_power_button(&mut q);
    let again = q.console.wait_prefix("POWER ", T).unwrap();
    assert_eq!(again.text, "POWER button: ignored");
    let hbs = q.console.heartbeats(25, T).unwrap();
    assert!(hbs.windows(2).all(|w| w[1].0.counter == w[0].0.counter + 1));
    assert!(q.wait_exit(Duration::from_millis(100)).is_none());
}

#[test]
fn the_reset_register_restarts_the_guest() {
    let mut q = spawn(&QemuConfig {
        append: "hb_ms=20".into(),
        ..Default::default()
    });
    q.console.wait_prefix("READY", BOOT).unwrap();
    q.console.send("reset").unwrap();
    // The guest starts over: the first line again, then its ACPI lines.
    q.console.wait_prefix("GODWIT-TESTGUEST ", T).unwrap();
    let acpi = acpi_lines(&mut q.console);
    assert!(summary(&acpi).contains(" ged=1 pwrb=1 "), "{acpi:#?}");
    q.console.wait_prefix("READY", T).unwrap();
    let hb = q.console.heartbeats(1, T).unwrap();
    assert!(hb[0].0.counter <= 2, "heartbeats start over: {:?}", hb[0].0);
}

#[test]
fn without_acpi_the_devices_come_from_the_command_line() {
    let dir = ScratchDir::new("noacpi-blk").unwrap();
    let image = dir.path().join("disk.raw");
    fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let mut q = spawn(&QemuConfig {
        acpi: false,
        append: "hb_ms=50 blk_write=1:2:3".into(),
        disks: vec![image],
        ..Default::default()
    });
    let cmdline = q.console.wait_prefix("CMDLINE ", BOOT).unwrap();
    assert!(
        cmdline.text.contains("virtio_mmio.device="),
        "{}",
        cmdline.text
    );
    let acpi = acpi_lines(&mut q.console);
    assert_eq!(
        acpi,
        ["ACPI devices: virtio-mmio=0 serial=0 ged=0 pwrb=0 s5=0 source=cmdline"]
    );
    let v = q.console.wait_prefix("VIRTIO ", T).unwrap();
    assert!(v.text.ends_with(" blk"), "{}", v.text);
    q.console.wait_prefix("BLK verify ok", T).unwrap();
    q.console.wait_prefix("READY", T).unwrap();
    // No power button to watch: a press changes nothing.
    press_power_button(&mut q);
    q.console.heartbeats(5, T).unwrap();
    assert!(!q
        .console
        .lines()
        .iter()
        .any(|l| l.text.starts_with("POWER")));
    assert!(q.wait_exit(Duration::from_millis(100)).is_none());
}
