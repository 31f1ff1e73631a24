//! Live storage migration under real KVM: a VM whose disk is a qcow2
//! overlay on node-local storage moves between two godwit-vmm processes in
//! two network namespaces ("nodes") while the guest writes to its disk.
//!
//! The oracle is `qemu-img compare`: the source is paused for good after
//! the switch-over, and the target is started with `--paused` so that it
//! keeps the switch-over state until the comparison is done; then it runs
//! and the guest verifies its disk patterns itself.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{guest, start_vm, Scratch, Vm, BOOT, VMM};
use godwit_node::storage::{self, ImageFormat, ImageLock, LockMode};
use godwit_testkit::guest::{blk_sector, Console};
use godwit_testkit::netns::{unique_name, Netns, Veth};
use godwit_vmm_control::{Command as Cmd, MigrateSend};
use serde_json::{json, Value};

const SOURCE_IP: &str = "10.89.0.1";
const TARGET_IP: &str = "10.89.0.2";
/// Virtual disk size.
const DISK: u64 = 32 << 20;
/// Base image data: sectors 0..BASE_SECTORS carry pattern seed 1.
const BASE_SECTORS: u64 = 8192;
/// The guest writes sectors OVERLAY_AT.. with seed 2 at boot (overlay data).
const OVERLAY_AT: u64 = 16384;
/// Regions rewritten during the migration: REGIONS of REGION sectors from
/// CHURN_AT, each with a new seed every time.
const CHURN_AT: u64 = 32768;
const REGION: u64 = 64;
const REGIONS: u64 = 16;

/// Two nodes joined by a veth pair.
struct Nodes {
    a: Netns,
    b: Netns,
    _link: Veth,
}

fn nodes() -> Nodes {
    let a = Netns::new("gsa").expect("create node A namespace");
    let b = Netns::new("gsb").expect("create node B namespace");
    let (la, lb) = (unique_name("sab"), unique_name("sba"));
    let link = Veth::new(&a, &la, &b, &lb).unwrap();
    a.add_addr(&la, &format!("{SOURCE_IP}/24")).unwrap();
    b.add_addr(&lb, &format!("{TARGET_IP}/24")).unwrap();
    Nodes { a, b, _link: link }
}

/// A raw base image named as the template cache names it.
fn make_base(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join(format!("sha256-{}.raw", "5a".repeat(32)));
    let mut data = Vec::with_capacity((BASE_SECTORS * 512) as usize);
    for s in 0..BASE_SECTORS {
        data.extend_from_slice(&blk_sector(1, s));
    }
    std::fs::write(&path, &data).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(DISK).unwrap();
    path
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Target {
    child: Child,
    port: u16,
    console: PathBuf,
    api: PathBuf,
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_target(n: &Nodes, dir: &Scratch, disk: &Path) -> Target {
    let port = free_port();
    let (console, api) = (dir.path("dst.console"), dir.path("dst.api"));
    let mut child = Command::new("ip")
        .args(["netns", "exec", n.b.name(), VMM])
        .args(["--incoming", &format!("{TARGET_IP}:{port}"), "--paused"])
        .arg("--disk")
        .arg(format!("path={}", disk.display()))
        .arg("--console-sock")
        .arg(&console)
        .arg("--serial-log")
        .arg(dir.path("dst.log"))
        .arg("--api-sock")
        .arg(&api)
        .args(["--timeout-s", "120"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn target godwit-vmm");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(
        line.contains("waiting for a migration"),
        "target said {line:?}"
    );
    Target {
        child,
        port,
        console,
        api,
    }
}

fn start_source(n: &Nodes, dir: &Scratch, disk: &Path) -> Vm {
    let args: Vec<String> = vec![
        "--kernel".into(),
        guest().display().to_string(),
        "--memory-mib".into(),
        "64".into(),
        "--cmdline".into(),
        format!("blk_write={OVERLAY_AT}:256:2"),
        "--disk".into(),
        format!("path={}", disk.display()),
    ];
    let mut vm = start_vm(dir, "src", &["ip", "netns", "exec", n.a.name()], &args);
    // The guest writes its boot pattern before it prints READY.
    let w = vm
        .console
        .wait_prefix("BLK write", BOOT)
        .expect("source guest boots and writes");
    assert!(w.text.starts_with("BLK write ok"), "{}", w.text);
    vm.console
        .wait_prefix("READY", BOOT)
        .expect("source guest boots");
    vm
}

fn status(src: &Vm) -> Value {
    src.api(Cmd::MigrateStatus)["result"].clone()
}

fn ended(s: &Value) -> bool {
    matches!(s["stage"].as_str(), Some("Completed") | Some("Failed"))
}

/// Waits (up to 30 s) for the source's migration to end, which must be as
/// Failed; returns its last status.
fn wait_failed(src: &Vm) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    let s = loop {
        let s = status(src);
        if ended(&s) {
            break s;
        }
        assert!(Instant::now() < deadline, "the migration did not end: {s}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(s["stage"], "Failed", "{s}");
    s
}

/// Types a `blkwrite` or `blkverify` command and checks the guest's
/// read-back says ok.
fn blk_ok(console: &mut Console, command: &str) {
    console.send(command).unwrap();
    let l = console
        .wait_for("BLK verify", Duration::from_secs(20), |l| {
            l.starts_with("BLK verify")
        })
        .unwrap();
    assert!(l.text.starts_with("BLK verify ok"), "{}", l.text);
}

/// After a failed migration: the VM runs on the source, its boot pattern
/// reads back, and changed-block tracking is off again.
fn still_on_source(src: &mut Vm) {
    assert_eq!(src.api(Cmd::Status)["result"]["state"], "running");
    src.console
        .heartbeats(2, Duration::from_secs(10))
        .expect("the guest runs on the source");
    blk_ok(&mut src.console, "blkverify 0 256 1");
    let r = src.api(Cmd::DiskTakeDirty { disk: 0 });
    assert_eq!(r["ok"], false, "tracking left on: {r}");
}

/// Rewrites the churn regions through the guest until the migration ends;
/// returns the last acknowledged seed per region and the region of a write
/// that was sent but not acknowledged (its outcome is unknown).
fn churn_until_done(src: &mut Vm) -> (Vec<Option<u64>>, Option<u64>, Value) {
    let mut seeds = vec![None; REGIONS as usize];
    let mut seed = 100;
    let mut acked = 0;
    loop {
        let s = status(src);
        if ended(&s) {
            return (seeds, None, s);
        }
        let r = seed % REGIONS;
        let sector = CHURN_AT + r * REGION;
        src.console
            .send(&format!("blkwrite {sector} {REGION} {seed}"))
            .unwrap();
        let want = format!("BLK write ok sector={sector} count={REGION} seed={seed}");
        match src
            .console
            .wait_for("BLK write", Duration::from_secs(3), |l| {
                l.starts_with("BLK write")
            }) {
            Ok(l) if l.text.trim_end() == want => {
                seeds[r as usize] = Some(seed);
                acked += 1;
            }
            Ok(l) => panic!("guest write failed: {}", l.text),
            Err(_) => {
                // Paused mid-write: the write may land on either side.
                let s = loop {
                    let s = status(src);
                    if ended(&s) {
                        break s;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                };
                eprintln!("{acked} writes acknowledged during the migration");
                return (seeds, Some(r), s);
            }
        }
        seed += 1;
    }
}

fn qemu_img_compare(a: &Path, b: &Path) -> std::process::Output {
    Command::new("qemu-img")
        .args(["compare", "-U"])
        .arg(a)
        .arg(b)
        .output()
        .expect("run qemu-img (apt-get install qemu-utils)")
}

fn storage_migration(base_on_target: bool) {
    common::require_kvm();
    let tag = if base_on_target { "smb" } else { "smn" };
    let dir = Scratch::new(tag);
    let base_a = make_base(&dir.path("cache-a"));
    let src_disk = dir.path("src.qcow2");
    storage::image::create_overlay(&src_disk, &base_a).unwrap();
    let dst_disk = dir.path("dst.qcow2");
    if base_on_target {
        let base_b = make_base(&dir.path("cache-b"));
        storage::image::create_overlay(&dst_disk, &base_b).unwrap();
    } else {
        storage::blank(DISK, ImageFormat::Qcow2, &dst_disk).unwrap();
    }
    let n = nodes();
    let mut src = start_source(&n, &dir, &src_disk);
    let target = start_target(&n, &dir, &dst_disk);
    let r = src.api(Cmd::MigrateSend(MigrateSend {
        copy_disks: vec![0],
        // A slow link, so that the guest writes during the bulk copy and
        // the rounds.
        bandwidth_mbps: Some(16),
        ..MigrateSend::to(format!("{TARGET_IP}:{}", target.port))
    }));
    assert_eq!(r["ok"], true, "migrate-send: {r}");
    let (seeds, unknown, st) = churn_until_done(&mut src);
    assert_eq!(st["stage"], "Completed", "migration failed: {st}");
    let res = &st["result"];
    eprintln!("result: {res}");
    let storage = &res["storage"];
    assert_eq!(storage["base_on_target"], json!([base_on_target]));
    let allocated = storage["allocated_bytes"].as_u64().unwrap();
    let sent = storage["bytes_sent"].as_u64().unwrap();
    if base_on_target {
        // Only the overlay's clusters: the boot writes and the churn.
        assert!(allocated < 4 << 20, "sent the base too: {storage}");
    } else {
        assert!(
            allocated >= BASE_SECTORS * 512,
            "base not copied: {storage}"
        );
    }
    // Holes are not sent: the first pass carries the allocated clusters and
    // no more (1 MiB for framing), and with the blocks the guest wrote again
    // meanwhile (more rounds under load) the whole stays under the disk.
    let dirty = storage["dirty_bytes_sent"].as_u64().unwrap();
    assert!(sent - dirty < allocated + (1 << 20), "{storage}");
    assert!(sent < DISK, "{storage}");
    assert!(
        seeds.iter().any(Option::is_some),
        "no write was acknowledged during the migration"
    );

    // The source is paused for good; the target (paused, its disk flushed)
    // holds the switch-over state. Its VMM holds the image lock, which
    // qemu-img respects even with -U, so compare a copy of its disk.
    let dst_copy = dir.path("dst-copy.qcow2");
    let cp = Command::new("cp")
        .arg("--sparse=always")
        .arg(&dst_disk)
        .arg(&dst_copy)
        .status()
        .unwrap();
    assert!(cp.success());
    if base_on_target {
        // Its base is shared-locked by the target VMM too: point the copy at
        // a copy of the base.
        let base_c = make_base(&dir.path("cache-c"));
        let out = Command::new("qemu-img")
            .args(["rebase", "-u", "-F", "raw", "-b"])
            .arg(&base_c)
            .arg(&dst_copy)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = qemu_img_compare(&src_disk, &dst_copy);
    assert!(
        out.status.success(),
        "qemu-img compare: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The lock went with the VM: the target VMM holds its disk.
    let e = ImageLock::acquire(&dst_disk, LockMode::Exclusive).unwrap_err();
    assert!(matches!(e, storage::StorageError::Locked { .. }), "{e}");

    // Run the guest on the target; it verifies what it wrote.
    let con = std::os::unix::net::UnixStream::connect(&target.console).unwrap();
    let mut con = Console::new(con.try_clone().unwrap(), con);
    let r = resume(&target);
    assert_eq!(r["ok"], true, "{r}");
    let mut verify = |sector: u64, count: u64, seed: u64| {
        con.send(&format!("blkverify {sector} {count} {seed}"))
            .unwrap();
        // A write sent to the source just before the switch-over may run
        // here now and print its own lines: wait for ours.
        let ok = format!("BLK verify ok sector={sector} count={count} seed={seed}");
        let l = con
            .wait_for("BLK verify", Duration::from_secs(20), |l| {
                l == ok || l.starts_with("BLK verify bad")
            })
            .expect("guest answers blkverify");
        assert_eq!(l.text, ok);
    };
    verify(0, 256, 1);
    verify(BASE_SECTORS - 256, 256, 1);
    verify(OVERLAY_AT, 256, 2);
    for (r, s) in seeds.iter().enumerate() {
        if let Some(seed) = s {
            if unknown != Some(r as u64) {
                verify(CHURN_AT + r as u64 * REGION, REGION, *seed);
            }
        }
    }
    drop(src);
}

#[test]
fn storage_moves_with_the_vm_base_on_target() {
    storage_migration(true);
}

#[test]
fn storage_moves_with_the_vm_no_base_on_target() {
    storage_migration(false);
}

/// The target dies in the middle of the disk copy: the VM keeps running on
/// the source, with its disk intact and still locked by it.
#[test]
fn broken_storage_migration_leaves_the_vm_on_the_source() {
    common::require_kvm();
    let dir = Scratch::new("smk");
    let base = make_base(&dir.path("cache-a"));
    let src_disk = dir.path("src.qcow2");
    storage::image::create_overlay(&src_disk, &base).unwrap();
    let dst_disk = dir.path("dst.qcow2");
    storage::blank(DISK, ImageFormat::Qcow2, &dst_disk).unwrap();
    let n = nodes();
    let mut src = start_source(&n, &dir, &src_disk);
    let mut target = start_target(&n, &dir, &dst_disk);
    let r = src.api(Cmd::MigrateSend(MigrateSend {
        copy_disks: vec![0],
        // 4 MiB of base data at 8 Mbit/s: the copy takes seconds.
        bandwidth_mbps: Some(8),
        ..MigrateSend::to(format!("{TARGET_IP}:{}", target.port))
    }));
    assert_eq!(r["ok"], true, "migrate-send: {r}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = status(&src);
        if s["transferred_bytes"].as_u64().unwrap_or(0) > 512 << 10 {
            assert!(!ended(&s), "the copy ended before the kill: {s}");
            break;
        }
        assert!(Instant::now() < deadline, "no progress: {s}");
        std::thread::sleep(Duration::from_millis(20));
    }
    target.child.kill().unwrap();
    target.child.wait().unwrap();
    wait_failed(&src);
    // The disk is the source's: still locked by it, and the guest reads
    // and writes it as before.
    let e = ImageLock::acquire(&src_disk, LockMode::Exclusive).unwrap_err();
    assert!(matches!(e, storage::StorageError::Locked { .. }), "{e}");
    still_on_source(&mut src);
    blk_ok(&mut src.console, &format!("blkwrite {CHURN_AT} 64 9"));
    src.api(Cmd::Stop);
    src.wait_exit(Duration::from_secs(10));
    let out = Command::new("qemu-img")
        .args(["check"])
        .arg(&src_disk)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// A disk on shared storage is not copied, and its image lock moves with
/// the VM: after the migration the target VMM holds it, not the source.
#[test]
fn shared_disk_lock_moves_to_the_target() {
    common::require_kvm();
    let dir = Scratch::new("sms");
    let base = make_base(&dir.path("cache-a"));
    let shared = dir.path("shared.qcow2");
    storage::image::create_overlay(&shared, &base).unwrap();
    let n = nodes();
    let src = start_source(&n, &dir, &shared);
    let src_pid = src.child.id();
    let holder = storage::lock::holder(&shared).expect("the source holds the lock");
    assert!(holder.contains(&format!("pid {src_pid} ")), "{holder}");
    // Both VMMs see the same file: the target opens it (unlocked) too.
    let target = start_target(&n, &dir, &shared);
    let r = src.api(Cmd::MigrateSend(MigrateSend::to(format!(
        "{TARGET_IP}:{}",
        target.port
    ))));
    assert_eq!(r["ok"], true, "migrate-send: {r}");
    let s = loop {
        let s = status(&src);
        if ended(&s) {
            break s;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(s["stage"], "Completed", "{s}");
    assert!(
        s["result"]["storage"].is_null(),
        "a shared disk was copied: {s}"
    );
    let holder = storage::lock::holder(&shared).expect("the target holds the lock");
    assert!(
        holder.contains(&format!("pid {} ", target.child.id())),
        "{holder} (source pid {src_pid})"
    );
    let e = ImageLock::acquire(&shared, LockMode::Exclusive).unwrap_err();
    assert!(matches!(e, storage::StorageError::Locked { .. }), "{e}");
    // The guest runs there on the same disk.
    let con = std::os::unix::net::UnixStream::connect(&target.console).unwrap();
    let mut con = Console::new(con.try_clone().unwrap(), con);
    assert_eq!(resume(&target)["ok"], true);
    blk_ok(&mut con, &format!("blkverify {OVERLAY_AT} 256 2"));
}

/// Resumes the guest on the target. The source reports the migration
/// Completed once the target has it; the target makes its control socket
/// just after, so it is waited for (10 s at most).
fn resume(target: &Target) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match godwit_testkit::vmmproc::call_envelope(&common::control(&target.api), Cmd::Resume) {
            Ok(v) => return v,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("resume on the target: {e}"),
        }
    }
}

/// A small tmpfs mounted for one test, unmounted even when it fails.
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(path: PathBuf, size: &str) -> SmallFs {
        std::fs::create_dir_all(&path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount tmpfs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallFs(path)
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The target's disk fills up mid-copy: the migration fails with the
/// reason, the VM keeps running on the source with its disk intact, and the
/// target VMM ends.
#[test]
fn a_full_target_disk_fails_the_migration_and_the_source_keeps_the_vm() {
    common::require_kvm();
    let dir = Scratch::new("smf");
    let base = make_base(&dir.path("cache-a"));
    let src_disk = dir.path("src.qcow2");
    storage::image::create_overlay(&src_disk, &base).unwrap();
    // 4 MiB of base data to copy into a 1 MiB file system.
    let full = SmallFs::mount(dir.path("full"), "1m");
    let dst_disk = full.0.join("dst.raw");
    storage::blank(DISK, ImageFormat::Raw, &dst_disk).unwrap();
    let n = nodes();
    let mut src = start_source(&n, &dir, &src_disk);
    let mut target = start_target(&n, &dir, &dst_disk);
    let r = src.api(Cmd::MigrateSend(MigrateSend {
        copy_disks: vec![0],
        ..MigrateSend::to(format!("{TARGET_IP}:{}", target.port))
    }));
    assert_eq!(r["ok"], true, "migrate-send: {r}");
    let s = wait_failed(&src);
    let why = s.to_string();
    assert!(
        why.contains("No space left") || why.contains("ENOSPC"),
        "the failure does not say the target disk is full: {s}"
    );
    // The target gave up on its own.
    let deadline = Instant::now() + Duration::from_secs(10);
    let code = loop {
        if let Some(code) = target.child.try_wait().unwrap() {
            break code;
        }
        assert!(Instant::now() < deadline, "the target VMM keeps running");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!code.success(), "the target VMM exited {code}");
    still_on_source(&mut src);
    src.api(Cmd::Stop);
    src.wait_exit(Duration::from_secs(10));
    drop(full);
}
