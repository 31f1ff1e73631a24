//! Bad input: each case fails with one line naming the fix, exit status 2,
//! and leaves no serial log, socket or tap behind.

mod common;

use std::path::Path;
use std::process::Command;

use common::{guest, require_kvm, run_vmm, Scratch, VMM};

fn assert_fails(out: &std::process::Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(lines.len(), 1, "want one error line, got: {err}");
    for n in needles {
        assert!(lines[0].contains(n), "{:?} not in {:?}", n, lines[0]);
    }
}

fn leftovers(dir: &Scratch) {
    let left: Vec<_> = std::fs::read_dir(&dir.0)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        left.iter()
            .all(|n| !n.to_string_lossy().starts_with("out.")),
        "files left behind: {left:?}"
    );
}

fn base(dir: &Scratch) -> Vec<String> {
    vec![
        "--serial-log".into(),
        dir.path("out.log").display().to_string(),
        "--api-sock".into(),
        dir.path("out.api").display().to_string(),
        "--console-sock".into(),
        dir.path("out.console").display().to_string(),
    ]
}

fn run(dir: &Scratch, extra: &[&str]) -> std::process::Output {
    let mut a = base(dir);
    a.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = a.iter().map(String::as_str).collect();
    run_vmm(&refs)
}

#[test]
fn missing_kernel() {
    require_kvm();
    let dir = Scratch::new("bad-kernel");
    let out = run(&dir, &["--kernel", "/nonexistent/vmlinux"]);
    assert_fails(
        &out,
        &[
            "Cannot open kernel /nonexistent/vmlinux",
            "check the --kernel path",
        ],
    );
    leftovers(&dir);
}

#[test]
fn not_a_kernel() {
    require_kvm();
    let dir = Scratch::new("bad-notkernel");
    let f = dir.path("notes.txt");
    std::fs::write(&f, "just some text, not a kernel\n".repeat(100)).unwrap();
    let out = run(&dir, &["--kernel", f.to_str().unwrap()]);
    assert_fails(&out, &["is not a kernel", "--kernel"]);
    leftovers(&dir);
}

#[test]
fn memory_larger_than_host() {
    require_kvm();
    let dir = Scratch::new("bad-mem");
    let g = guest().display().to_string();
    let out = run(&dir, &["--kernel", &g, "--memory-mib", "100000000"]);
    assert_fails(
        &out,
        &["more than this host can give", "lower --memory-mib"],
    );
    leftovers(&dir);
}

#[test]
fn missing_disk_image() {
    require_kvm();
    let dir = Scratch::new("bad-disk");
    let g = guest().display().to_string();
    let out = run(
        &dir,
        &["--kernel", &g, "--disk", "path=/nonexistent/disk.img"],
    );
    assert_fails(
        &out,
        &["Disk image /nonexistent/disk.img", "check the --disk path="],
    );
    leftovers(&dir);
}

#[test]
fn missing_bridge_leaves_no_tap() {
    require_kvm();
    let dir = Scratch::new("bad-bridge");
    let g = guest().display().to_string();
    let tap = format!("gwbad{}", std::process::id() % 100000);
    let net = format!("tap={tap},bridge=gwnobridge0");
    let out = run(&dir, &["--kernel", &g, "--net", &net]);
    assert_fails(
        &out,
        &[
            "Bridge gwnobridge0 does not exist",
            "ip link add gwnobridge0 type bridge",
        ],
    );
    assert!(
        !Path::new("/sys/class/net").join(&tap).exists(),
        "tap {tap} left behind"
    );
    leftovers(&dir);
}

#[test]
fn no_kvm_device() {
    require_kvm();
    let dir = Scratch::new("bad-nokvm");
    let g = guest().display().to_string();
    // A private mount namespace with an empty /dev: no /dev/kvm.
    let mut args = vec![
        "--mount".to_string(),
        "sh".into(),
        "-c".into(),
        "mount -t tmpfs none /dev && exec \"$@\"".into(),
        "sh".into(),
        VMM.into(),
    ];
    args.extend(base(&dir));
    args.extend(["--kernel".into(), g]);
    let out = Command::new("unshare")
        .args(&args)
        .output()
        .expect("run unshare");
    assert_fails(&out, &["/dev/kvm does not exist", "load the kvm module"]);
    leftovers(&dir);
}

#[test]
fn no_kvm_permission() {
    require_kvm();
    let dir = Scratch::new("bad-kvmperm");
    let g = guest().display().to_string();
    // World-writable scratch so the unprivileged user could create files
    // (and we can tell it did not).
    std::process::Command::new("chmod")
        .args(["777", dir.0.to_str().unwrap()])
        .status()
        .unwrap();
    let mut args = vec![
        "--reuid=65534".to_string(),
        "--regid=65534".into(),
        "--clear-groups".into(),
        VMM.into(),
    ];
    args.extend(base(&dir));
    args.extend(["--kernel".into(), g]);
    let out = Command::new("setpriv")
        .args(&args)
        .output()
        .expect("run setpriv");
    assert_fails(&out, &["No permission to open /dev/kvm", "kvm group"]);
    leftovers(&dir);
}
