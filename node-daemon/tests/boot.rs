//! The test guest boots under godwit-vmm to its heartbeat, sees its CPUs
//! from our MP table, and the VMM exits cleanly when asked.

mod common;

use std::time::Duration;

use common::{guest, start_vm, Scratch, BOOT};
use godwit_testkit::guest::parse_heartbeat;
use godwit_vmm_control::Command as Cmd;

#[test]
fn boots_to_heartbeats_with_two_cpus() {
    let dir = Scratch::new("boot2cpu");
    let g = guest().display().to_string();
    let args: Vec<String> = [
        "--kernel",
        &g,
        "--memory-mib",
        "128",
        "--vcpus",
        "2",
        "--cmdline",
        "hb_ms=50",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut vm = start_vm(&dir, "vm", &[], &args);
    vm.console.wait_prefix("GODWIT-TESTGUEST", BOOT).unwrap();
    let cmd = vm.console.wait_prefix("CMDLINE", BOOT).unwrap();
    assert!(cmd.text.contains("hb_ms=50"), "{}", cmd.text);
    let cpus = vm.console.wait_prefix("CPUS", BOOT).unwrap();
    assert_eq!(cpus.text, "CPUS 2");
    let clock = vm.console.wait_prefix("CLOCK", BOOT).unwrap();
    assert!(clock.text.starts_with("CLOCK kvmclock"), "{}", clock.text);
    let hbs = vm.console.heartbeats(4, BOOT).unwrap();
    for w in hbs.windows(2) {
        assert_eq!(w[1].0.counter, w[0].0.counter + 1);
        assert!(w[1].0.guest_ns > w[0].0.guest_ns);
    }
    // The serial log holds the same lines.
    let log = std::fs::read_to_string(&vm.serial_log).unwrap();
    assert!(log.contains("CPUS 2"));
    assert!(log.lines().any(|l| parse_heartbeat(l.trim_end()).is_some()));

    let stats = vm.api(Cmd::Stats);
    assert_eq!(stats["ok"], true);
    assert!(
        stats["result"]["vcpu_exits"][0][1].as_u64().unwrap() > 0,
        "{stats}"
    );
    let r = vm.api(Cmd::Stop);
    assert_eq!(r["ok"], true);
    let st = vm.wait_exit(Duration::from_secs(10));
    assert!(st.success(), "{st}");
    assert!(!vm.api.exists(), "control socket left behind");
}

#[test]
fn pause_resume_and_dirty_log() {
    let dir = Scratch::new("pause");
    let g = guest().display().to_string();
    let args: Vec<String> = [
        "--kernel",
        &g,
        "--memory-mib",
        "128",
        "--cmdline",
        "hb_ms=50 dirty_mib=8 dirty_rate=1000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut vm = start_vm(&dir, "vm", &[], &args);
    vm.console.heartbeats(2, BOOT).unwrap();
    assert_eq!(vm.api(Cmd::TakeDirty)["ok"], false, "dirty log starts off");
    assert_eq!(vm.api(Cmd::DirtyLogStart)["ok"], true);
    std::thread::sleep(Duration::from_millis(300));
    let d = vm.api(Cmd::TakeDirty);
    assert!(d["result"]["dirty_pages"].as_u64().unwrap() > 10, "{d}");

    assert_eq!(vm.api(Cmd::Pause)["result"]["state"], "paused");
    // Paused: no heartbeat for a while (drain what was in flight first).
    std::thread::sleep(Duration::from_millis(100));
    while vm
        .console
        .next_line(Duration::from_millis(10))
        .unwrap()
        .is_some()
    {}
    assert!(vm
        .console
        .next_line(Duration::from_millis(400))
        .unwrap()
        .is_none());
    let d = vm.api(Cmd::TakeDirty);
    let d2 = vm.api(Cmd::TakeDirty);
    assert_eq!(
        d2["result"]["dirty_pages"], 0,
        "paused guest dirtied pages: {d} {d2}"
    );
    assert_eq!(vm.api(Cmd::Resume)["ok"], true);
    vm.console.heartbeats(2, Duration::from_secs(5)).unwrap();
    let bad = vm.raw(r#"{"v": 1, "cmd": "fly"}"#);
    assert_eq!(bad["ok"], false);
    let mut s = std::os::unix::net::UnixStream::connect(&vm.api).unwrap();
    use std::io::{BufRead, Write};
    s.write_all(b"{\"v\":9,\"cmd\":\"status\"}\n").unwrap();
    let mut line = String::new();
    std::io::BufReader::new(s).read_line(&mut line).unwrap();
    assert!(line.contains("Unsupported API version 9"), "{line}");
}
