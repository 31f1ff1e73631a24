//! The VMM's seccomp sandbox: a VMM runs with its filter installed, a guest
//! runs normally under it, and a system call outside the allow list kills
//! the VMM with SIGSYS (exit status 128 + 31 under the agent's shell, which
//! the agent reports as `SandboxViolation`).

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::Duration;

use common::{guest, start_vm, Scratch, BOOT, VMM};

fn args(extra: &[&str]) -> Vec<String> {
    let g = guest().display().to_string();
    let mut a: Vec<String> = [
        "--kernel",
        &g,
        "--memory-mib",
        "64",
        "--cmdline",
        "hb_ms=50",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

#[test]
fn a_forbidden_system_call_kills_the_vmm() {
    let dir = Scratch::new("sandbox-kill");
    // `mkdir` is allowed only for save-state; take it away.
    let mut vm = start_vm(&dir, "vm", &[], &args(&["--seccomp-deny", "mkdir"]));
    let status = std::fs::read_to_string(format!("/proc/{}/status", vm.child.id())).unwrap();
    assert!(
        status.contains("Seccomp:\t2"),
        "no seccomp filter:\n{status}"
    );
    // The guest runs normally inside the sandbox.
    vm.console.heartbeats(3, BOOT).unwrap();
    let r = vm.api(serde_json::json!({"cmd": "stats"}));
    assert_eq!(r["ok"], true, "{r}");
    // save-state into a new directory makes the VMM call mkdir.
    let snap = dir.path("snap/new");
    let mut s = UnixStream::connect(&vm.api).unwrap();
    let req = format!(
        "{{\"v\":1,\"cmd\":\"pause\"}}\n{{\"v\":1,\"cmd\":\"save-state\",\"dir\":\"{}\"}}\n",
        snap.display()
    );
    let _ = s.write_all(req.as_bytes());
    let st = vm.wait_exit(Duration::from_secs(10));
    assert_eq!(st.signal(), Some(libc::SIGSYS), "exit: {st}");
    assert!(!snap.exists(), "the forbidden call went through");
}

#[test]
fn the_deny_list_only_names_allowed_calls() {
    let out = Command::new(VMM)
        .args(args(&["--seccomp-deny", "execve"]))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("\"execve\" is not a system call the VMM allows"),
        "{err}"
    );
}
