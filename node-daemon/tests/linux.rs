//! Linux bzImage direct boot with Debian's cloud kernel (fetched by
//! `fetch-debian-kernel.sh`, not installed): our serial console shows its
//! version, our command line and the e820 map we gave it. On this nested
//! KVM the kernel then dies in early boot (instruction emulation failure);
//! the VMM must report KVM_EXIT_INTERNAL_ERROR and exit non-zero, not hang.
//!
//! Slow here: the kernel's decompressor runs for minutes on this KVM (QEMU
//! takes as long), so this test waits up to 10 minutes.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{require_kvm, Scratch, VMM};

fn debian_kernel() -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fetch-debian-kernel.sh");
    let out = Command::new("bash").arg(script).stderr(Stdio::inherit()).output().expect("run fetch-debian-kernel.sh");
    assert!(out.status.success(), "fetch-debian-kernel.sh failed");
    String::from_utf8(out.stdout).unwrap().lines().last().expect("kernel path").trim().to_string()
}

#[test]
fn debian_kernel_prints_version_cmdline_and_our_e820() {
    require_kvm();
    let kernel = debian_kernel();
    let dir = Scratch::new("linux");
    let log = dir.path("serial.log");
    let cmdline = "console=ttyS0 earlyprintk=serial,ttyS0,115200 nokaslr godwit_marker=42";
    let mut child = Command::new(VMM)
        .args(["--kernel", &kernel, "--memory-mib", "512", "--cmdline", cmdline])
        .arg("--serial-log")
        .arg(&log)
        .args(["--timeout-s", "900"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn godwit-vmm");
    let want = [
        "Linux version ".to_string(),
        format!("Command line: {cmdline}"),
        "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable".to_string(),
        "BIOS-e820: [mem 0x000000000009fc00-0x00000000000fffff] reserved".to_string(),
        "BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable".to_string(),
    ];
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut text = String::new();
    loop {
        text = std::fs::read_to_string(&log).unwrap_or_default();
        if want.iter().all(|w| text.contains(w.as_str())) {
            break;
        }
        if let Some(st) = child.try_wait().unwrap() {
            panic!("godwit-vmm exited ({st}) before Linux printed everything; log:\n{text}");
        }
        assert!(Instant::now() < deadline, "Linux did not print {want:?} in time; log:\n{text}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let _ = text;
    // It cannot get far on this KVM: the VMM must end with a clear error.
    let deadline = Instant::now() + Duration::from_secs(300);
    let st = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let Some(st) = st else {
        let _ = child.kill();
        panic!("godwit-vmm hung after Linux's early boot");
    };
    let mut err = String::new();
    use std::io::Read;
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(!st.success(), "expected a failure exit, got {st}: {err}");
    assert!(err.contains("KVM_EXIT_INTERNAL_ERROR"), "{err}");
}
