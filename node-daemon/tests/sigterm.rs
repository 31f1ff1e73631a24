//! godwit-vmm ends promptly on SIGTERM in every state (issue 21 item 7: an
//! incoming VMM still waiting for its source once survived SIGTERM for 20
//! minutes and kept its VM's tap):
//! - an incoming VMM waiting for its source ends within 2 s, exit 3;
//! - so does one whose source connected but sends nothing;
//! - a running guest's VMM ends within 2 s, exit 0, and what the guest
//!   wrote to its disk is in the image file (the VMM flushes every disk
//!   before it exits and says so).

mod common;

use std::io::{BufRead, BufReader, Read};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{guest, require_kvm, start_vm, Scratch, BOOT, VMM};
use godwit_testkit::guest::blk_sector;

/// How long a VMM may take to end after SIGTERM.
const PROMPT: Duration = Duration::from_secs(2);

fn sigterm(child: &Child) -> Instant {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    Instant::now()
}

/// Waits up to `limit` for `child` to exit; its status and how long it took.
fn ended_within(child: &mut Child, since: Instant, limit: Duration) -> (i32, Duration) {
    loop {
        if let Some(st) = child.try_wait().expect("wait") {
            return (st.code().unwrap_or(-1), since.elapsed());
        }
        if since.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("godwit-vmm still ran {limit:?} after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// An incoming VMM on a free loopback port; returns it and its address.
fn incoming(dir: &Scratch) -> (Child, String) {
    require_kvm();
    let mut child = Command::new(VMM)
        .args(["--incoming", "127.0.0.1:0"])
        .arg("--api-sock")
        .arg(dir.path("in.api"))
        .arg("--serial-log")
        .arg(dir.path("in.log"))
        .args(["--incoming-timeout-s", "600", "--timeout-s", "120"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn godwit-vmm --incoming");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped"))
        .read_line(&mut line)
        .expect("read its first line");
    let addr = line
        .trim()
        .strip_prefix("godwit-vmm: waiting for a migration on ")
        .unwrap_or_else(|| panic!("the incoming VMM said {line:?}"))
        .to_string();
    (child, addr)
}

#[test]
fn an_incoming_vmm_waiting_for_its_source_ends_on_sigterm() {
    let dir = Scratch::new("sigterm-waiting");
    let (mut child, _addr) = incoming(&dir);
    // Well inside its wait (the incoming timeout is 600 s).
    std::thread::sleep(Duration::from_millis(300));
    let t = sigterm(&child);
    let (code, took) = ended_within(&mut child, t, PROMPT);
    assert_eq!(code, 3, "an incoming migration that did not happen exits 3");
    let mut err = String::new();
    child
        .stderr
        .take()
        .expect("piped")
        .read_to_string(&mut err)
        .unwrap();
    assert!(err.contains("SIGTERM"), "{err}");
    eprintln!("incoming VMM, waiting: ended {took:?} after SIGTERM");
}

#[test]
fn an_incoming_vmm_whose_source_connected_and_went_quiet_ends_on_sigterm() {
    let dir = Scratch::new("sigterm-connected");
    let (mut child, addr) = incoming(&dir);
    let _source = TcpStream::connect(&addr).expect("connect as a source that says nothing");
    std::thread::sleep(Duration::from_millis(300));
    let t = sigterm(&child);
    let (code, took) = ended_within(&mut child, t, PROMPT);
    assert_eq!(code, 3);
    eprintln!("incoming VMM, connected: ended {took:?} after SIGTERM");
}

#[test]
fn a_running_vm_ends_on_sigterm_with_its_disk_written() {
    let dir = Scratch::new("sigterm-running");
    let img = dir.path("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let args: Vec<String> = vec![
        "--kernel".into(),
        guest().display().to_string(),
        "--memory-mib".into(),
        "128".into(),
        "--cmdline".into(),
        "hb_ms=100 blk_write=16:64:777".into(),
        "--disk".into(),
        format!("path={}", img.display()),
    ];
    let mut vm = start_vm(&dir, "vm", &[], &args);
    let w = vm.console.wait_prefix("BLK write", BOOT).unwrap();
    assert!(w.text.starts_with("BLK write ok"), "{}", w.text);
    // The guest runs on (heartbeats) when the signal comes.
    vm.console.wait_prefix("HB ", BOOT).unwrap();
    let t = sigterm(&vm.child);
    let (code, took) = ended_within(&mut vm.child, t, PROMPT);
    assert_eq!(code, 0, "SIGTERM is a forced stop: exit 0");
    let mut err = String::new();
    vm.child
        .stderr
        .take()
        .expect("piped")
        .read_to_string(&mut err)
        .unwrap();
    assert!(err.contains("disks flushed"), "{err}");
    let data = std::fs::read(&img).unwrap();
    for s in 16..80u64 {
        let off = s as usize * 512;
        assert!(
            data[off..off + 512] == blk_sector(777, s),
            "sector {s} in the image is not what the guest wrote"
        );
    }
    eprintln!("running VM: ended {took:?} after SIGTERM");
}
