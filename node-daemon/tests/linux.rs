//! Linux bzImage direct boot with Debian's cloud kernel (fetched by
//! `fetch-debian-kernel.sh`, not installed into /boot).
//!
//! What this machine lets us check: the kernel's decompressor starts on our
//! boot path, reads our command line from the zero page and prints on our
//! COM1 (`KASLR disabled: 'nokaslr' on cmdline.`). It then runs for minutes
//! without printing `Linux version` on this nested KVM (QEMU microvm gets
//! no further in the same time), so the version/command-line/e820 lines of
//! the kernel proper are not asserted here. The VMM must stop cleanly when
//! told to (SIGTERM) while the guest is busy.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{require_kvm, Scratch, VMM};

fn debian_kernel() -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fetch-debian-kernel.sh");
    let out = Command::new("bash")
        .arg(script)
        .stderr(Stdio::inherit())
        .output()
        .expect("run fetch-debian-kernel.sh");
    assert!(out.status.success(), "fetch-debian-kernel.sh failed");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .last()
        .expect("kernel path")
        .trim()
        .to_string()
}

#[test]
fn debian_bzimage_starts_and_reads_our_command_line() {
    require_kvm();
    let kernel = debian_kernel();
    let dir = Scratch::new("linux");
    let log = dir.path("serial.log");
    let cmdline = "console=ttyS0 earlyprintk=serial,ttyS0,115200 nokaslr godwit_marker=42";
    let mut child = Command::new(VMM)
        .args([
            "--kernel",
            &kernel,
            "--memory-mib",
            "512",
            "--cmdline",
            cmdline,
        ])
        .arg("--serial-log")
        .arg(&log)
        .args(["--timeout-s", "600"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn godwit-vmm");
    let want = "KASLR disabled: 'nokaslr' on cmdline.";
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains(want) {
            break;
        }
        if let Some(st) = child.try_wait().unwrap() {
            panic!("godwit-vmm exited ({st}) before the decompressor printed; log:\n{text}");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("no {want:?} from the kernel's decompressor; log:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    // SAFETY: sending SIGTERM to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let st = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("godwit-vmm did not stop on SIGTERM while Linux was running");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(st.success(), "{st}");
}
