//! The ACPI platform of godwit-vmm with the test guest under real KVM: the
//! guest finds its devices in the tables (nothing on its command line), the
//! power button powers it off (S5) and the VMM exits 0, a guest that
//! ignores the button is stopped at the end of the grace period, `--acpi
//! off` keeps command-line discovery and refuses `shutdown`, a guest reset
//! exits 100, and a press the guest has not seen yet survives save/restore
//! and live migration.
//!
//! Needs /dev/kvm.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{guest, require_kvm, Scratch, BOOT};
use godwit_testkit::guest::Console;
use godwit_testkit::vmmproc::VmmProc;
use godwit_vmm_control::{MigrateSend, Stage};

const T: Duration = Duration::from_secs(20);

fn disk(dir: &Scratch, name: &str) -> PathBuf {
    let p = dir.path(name);
    std::fs::File::create(&p).unwrap().set_len(1 << 20).unwrap();
    p
}

fn args(cmdline: &str, disk: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "--kernel".into(),
        guest().display().to_string(),
        "--memory-mib".into(),
        "64".into(),
        "--cmdline".into(),
        cmdline.into(),
        "--disk".into(),
        format!("path={}", disk.display()),
        "--timeout-s".into(),
        "120".into(),
    ];
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// Boots a VMM paused, attaches the console, resumes.
fn boot(dir: &Scratch, tag: &str, args: &[String]) -> (VmmProc, Console) {
    require_kvm();
    let vmm = VmmProc::spawn(&dir.0, tag)
        .args(args)
        .stderr_to_file()
        .boot()
        .unwrap_or_else(|e| panic!("start godwit-vmm: {e}"));
    let console = vmm.console(T).unwrap();
    vmm.control().resume().unwrap();
    (vmm, console)
}

/// Waits for the guest's summary of what it found in ACPI.
fn acpi_summary(console: &mut Console) -> String {
    console.wait_prefix("ACPI devices:", BOOT).unwrap().text
}

fn wait_log(path: &Path, what: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        if log.contains(what) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what:?} not in {path:?} within {timeout:?}:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_power_button_powers_the_guest_off() {
    let dir = Scratch::new("acpi-button");
    let d = disk(&dir, "d.img");
    let (mut vm, mut con) = boot(&dir, "vm", &args("hb_ms=50", &d, &[]));
    let cmd = con.wait_prefix("CMDLINE", BOOT).unwrap().text;
    assert!(
        !cmd.contains("virtio_mmio.device="),
        "with ACPI the devices are not on the command line: {cmd}"
    );
    assert_eq!(
        acpi_summary(&mut con),
        "ACPI devices: virtio-mmio=1 serial=1 ged=1 pwrb=1 s5=1 source=acpi"
    );
    con.wait_prefix("VIRTIO", T).unwrap();
    con.wait_prefix("READY", T).unwrap();
    con.heartbeats(2, T).unwrap();

    let pressed = Instant::now();
    let r = vm.control().shutdown(None).unwrap();
    assert!(r.power_button);
    assert_eq!(r.grace_secs, 30, "the default grace");
    con.wait_prefix("POWER button", T)
        .map(|l| {
            assert_eq!(l.text, "POWER button: powering off");
        })
        .unwrap();
    let code = vm.wait(Duration::from_secs(10));
    let took = pressed.elapsed();
    eprintln!("button to VMM exit: {took:?}");
    assert_eq!(code, Some(0), "exit status after S5: {}", vm.stderr());
    assert!(took < Duration::from_secs(10));
    let err = vm.stderr();
    assert!(
        err.contains("godwit-vmm: guest powered off (ACPI S5)"),
        "{err}"
    );
}

#[test]
fn a_guest_that_ignores_the_button_is_stopped_after_the_grace() {
    let dir = Scratch::new("acpi-ignore");
    let d = disk(&dir, "d.img");
    let (mut vm, mut con) = boot(&dir, "vm", &args("hb_ms=50 pwrbtn=ignore", &d, &[]));
    con.wait_prefix("READY", BOOT).unwrap();
    let pressed = Instant::now();
    let r = vm.control().shutdown(Some(Duration::from_secs(2))).unwrap();
    assert_eq!(r.grace_secs, 2);
    assert_eq!(
        con.wait_prefix("POWER button", T).unwrap().text,
        "POWER button: ignored"
    );
    let code = vm.wait(Duration::from_secs(10));
    let took = pressed.elapsed();
    eprintln!("button to forced stop: {took:?}");
    assert_eq!(code, Some(0));
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(5),
        "forced stop after {took:?}, want about 2 s"
    );
    let err = vm.stderr();
    assert!(
        err.contains("godwit-vmm: guest did not power off within 2s; forcing the stop"),
        "{err}"
    );
}

#[test]
fn acpi_off_keeps_cmdline_discovery_and_refuses_shutdown() {
    let dir = Scratch::new("acpi-off");
    let d = disk(&dir, "d.img");
    let (mut vm, mut con) = boot(&dir, "vm", &args("hb_ms=50", &d, &["--acpi", "off"]));
    let cmd = con.wait_prefix("CMDLINE", BOOT).unwrap().text;
    assert!(cmd.contains("virtio_mmio.device=4K@0xd0000000:5"), "{cmd}");
    assert_eq!(
        acpi_summary(&mut con),
        "ACPI devices: virtio-mmio=0 serial=0 ged=0 pwrb=0 s5=0 source=cmdline"
    );
    con.wait_prefix("VIRTIO", T).unwrap();
    con.wait_prefix("READY", T).unwrap();
    let e = vm.control().shutdown(None).unwrap_err().to_string();
    assert!(
        e.contains("This VM has no ACPI power button (started with --acpi off); use stop"),
        "{e}"
    );
    con.heartbeats(2, T).unwrap();
    vm.control().stop().unwrap();
    assert_eq!(vm.wait(Duration::from_secs(10)), Some(0));
}

#[test]
fn a_guest_reset_exits_100() {
    let dir = Scratch::new("acpi-reset");
    let d = disk(&dir, "d.img");
    let (mut vm, mut con) = boot(&dir, "vm", &args("hb_ms=50", &d, &[]));
    con.wait_prefix("READY", BOOT).unwrap();
    con.send("reset").unwrap();
    assert_eq!(
        vm.wait(Duration::from_secs(10)),
        Some(100),
        "{}",
        vm.stderr()
    );
    let err = vm.stderr();
    assert!(
        err.contains("guest reset; exiting with status 100"),
        "{err}"
    );
}

/// Boots a guest, pauses it and presses the button: the press is pending in
/// the GED, not yet seen by the guest.
fn pressed_while_paused(dir: &Scratch, d: &Path) -> (VmmProc, Console) {
    let (vm, mut con) = boot(dir, "src", &args("hb_ms=50", d, &[]));
    con.wait_prefix("READY", BOOT).unwrap();
    con.heartbeats(2, T).unwrap();
    let c = vm.control();
    c.pause().unwrap();
    let r = c.shutdown(Some(Duration::from_secs(120))).unwrap();
    assert!(r.power_button);
    (vm, con)
}

#[test]
fn a_pending_press_survives_save_and_restore() {
    let dir = Scratch::new("acpi-snap");
    let d = disk(&dir, "d.img");
    let (mut src, _con) = pressed_while_paused(&dir, &d);
    let snap = dir.path("snap");
    src.control().save_state(&snap).unwrap();
    src.control().stop().unwrap();
    assert_eq!(src.wait(Duration::from_secs(10)), Some(0));
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(snap.join("state.json")).unwrap()).unwrap();
    assert_eq!(state["config"]["acpi"], true);
    assert_eq!(
        state["devices"]["ged"]["selector"], 2,
        "the press is pending in the saved GED state: {}",
        state["devices"]["ged"]
    );

    let restore = vec![
        "--restore".to_string(),
        snap.display().to_string(),
        "--timeout-s".into(),
        "60".into(),
    ];
    let (mut dst, mut con) = boot(&dir, "dst", &restore);
    assert_eq!(
        con.wait_prefix("POWER button", T).unwrap().text,
        "POWER button: powering off"
    );
    assert_eq!(
        dst.wait(Duration::from_secs(10)),
        Some(0),
        "{}",
        dst.stderr()
    );
    assert!(dst.stderr().contains("guest powered off (ACPI S5)"));
}

#[test]
fn a_pending_press_survives_live_migration() {
    let dir = Scratch::new("acpi-migrate");
    let d = disk(&dir, "d.img");
    let (mut src, _con) = pressed_while_paused(&dir, &d);
    let port = godwit_testkit::qemu::free_port().unwrap();
    let addr = format!("127.0.0.1:{port}");
    let mut dst = VmmProc::spawn(&dir.0, "dst")
        .args(&["--timeout-s", "60"])
        .stderr_to_file()
        .incoming(&addr)
        .unwrap();
    let p = src
        .migrate(
            MigrateSend::to(addr),
            Duration::from_millis(50),
            Duration::from_secs(60),
            |_| {},
        )
        .unwrap();
    assert_eq!(p.stage, Stage::Completed, "{p:?}");
    // The guest was paused on the source and runs on the target, which
    // finds the press pending, powers off and exits 0.
    wait_log(&dst.serial_log, "POWER button: powering off", T);
    assert_eq!(
        dst.wait(Duration::from_secs(10)),
        Some(0),
        "{}",
        dst.stderr()
    );
    assert!(dst.stderr().contains("guest powered off (ACPI S5)"));
    src.control().stop().ok();
    src.wait(Duration::from_secs(10));
}

#[test]
fn more_devices_than_interrupt_lines_are_refused() {
    require_kvm();
    let g = guest().display().to_string();
    let mut a = vec!["--kernel".to_string(), g];
    for i in 0..19 {
        a.extend(["--disk".into(), format!("path=/nonexistent-{i}.img")]);
    }
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let out = common::run_vmm(&a);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("Too many devices: 19 disks and NICs, at most 18"),
        "{err}"
    );
}
