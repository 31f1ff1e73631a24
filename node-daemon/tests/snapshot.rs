//! Snapshot of a running guest that dirties memory, restored in a fresh
//! godwit-vmm process: the heartbeat counter continues, the guest's memory
//! check passes and its clock does not go back.

mod common;

use std::time::Duration;

use common::{guest, start_vm, Scratch, BOOT};
use godwit_testkit::guest::{parse_heartbeat, Heartbeat};
use godwit_vmm_control::Command as Cmd;

#[test]
fn snapshot_restores_in_a_fresh_process() {
    let dir = Scratch::new("snapshot");
    let g = guest().display().to_string();
    let args: Vec<String> = [
        "--kernel",
        &g,
        "--memory-mib",
        "256",
        "--vcpus",
        "2",
        "--cmdline",
        "hb_ms=50 dirty_mib=32 dirty_rate=20000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut src = start_vm(&dir, "src", &[], &args);
    src.console.wait_prefix("DIRTY mib=32", BOOT).unwrap();
    src.console.heartbeats(5, BOOT).unwrap();
    // A memory check before the snapshot proves the workload is verifiable.
    src.console.send("memcheck").unwrap();
    let pre = src
        .console
        .wait_prefix("MEMCHECK", Duration::from_secs(10))
        .unwrap();
    assert!(pre.text.starts_with("MEMCHECK ok"), "{}", pre.text);

    let snap = dir.path("snap");
    let r = src.api(Cmd::SaveState { dir: snap.clone() });
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(src.api(Cmd::Stop)["ok"], true);
    assert!(src.wait_exit(Duration::from_secs(10)).success());
    // Drain the source console: the last heartbeat it printed.
    while src
        .console
        .next_line(Duration::from_millis(200))
        .is_ok_and(|l| l.is_some())
    {}
    let last: Heartbeat = src
        .console
        .lines()
        .iter()
        .rev()
        .find_map(|l| parse_heartbeat(&l.text))
        .expect("source printed heartbeats");
    assert!(snap.join("state.json").exists() && snap.join("memory.bin").exists());

    let restore: Vec<String> = vec!["--restore".into(), snap.display().to_string()];
    let mut dst = start_vm(&dir, "dst", &[], &restore);
    let hbs = dst.console.heartbeats(3, Duration::from_secs(10)).unwrap();
    let first = hbs[0].0;
    assert!(
        first.counter > last.counter && first.counter <= last.counter + 2,
        "counter did not continue: last {last:?} before, first {first:?} after"
    );
    assert!(
        first.guest_ns > last.guest_ns,
        "clock went back: {last:?} -> {first:?}"
    );
    for w in hbs.windows(2) {
        assert_eq!(w[1].0.counter, w[0].0.counter + 1);
    }
    dst.console.send("memcheck").unwrap();
    let post = dst
        .console
        .wait_prefix("MEMCHECK", Duration::from_secs(10))
        .unwrap();
    assert!(post.text.starts_with("MEMCHECK ok"), "{}", post.text);
    assert_eq!(dst.api(Cmd::Stop)["ok"], true);
    assert!(dst.wait_exit(Duration::from_secs(10)).success());
}
