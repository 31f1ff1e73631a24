//! `bench storage` (migration part): live storage migration of the test
//! guest between two godwit-vmm processes on this machine (loopback, no
//! bandwidth cap), while the guest rewrites 32 KiB regions of its disk
//! back to back (`blkwrite` over its console): on the source's console
//! until the guest has moved, then on the target's until the migration is
//! over, so the load runs for the whole migration. The guest beats every
//! 2 ms; the largest gap between heartbeats on the two consoles is the
//! observed pause, as in `bench migrate`. Once the migration is over, the
//! guest on the target re-reads what it wrote (`blkverify`): each churned
//! region with the seed of its last acknowledged write (an in-flight write
//! may have landed or not: either seed passes), its boot-time pattern, and
//! the template's data at both ends of the base.
//!
//! The disk is a 256 MiB qcow2 overlay on a raw template base holding
//! 64 MiB of data, with 1 MiB written by the guest at boot. Three runs of
//! the same workload:
//!
//! - `base_on_target: true`: the target's disk is an overlay on its own
//!   cached copy of the base (same digest), so only the overlay travels;
//! - `base_on_target: false`: the target's disk is a blank qcow2 image, so
//!   the base's allocated data travels too (holes do not);
//! - memory only: the target opens the same disk file (shared storage), so
//!   no disk byte travels; its downtime is the reference for what copying
//!   the disk adds.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use godwit_node::storage::{self, ImageFormat};
use godwit_testkit::guest::{blk_sector, Console, Line};
use godwit_testkit::vmmproc::{attach_console, VmmProc};
use godwit_vmm_control::{MigrateSend, Stage};
use serde_json::{json, Value};

const DISK: u64 = 256 << 20;
const BASE_DATA: u64 = 64 << 20;
const MEMORY_MIB: u64 = 128;
/// Where the guest rewrites its disk during the migration.
const CHURN_AT: u64 = 1 << 18; // sector: 128 MiB
const REGION: u64 = 64;
/// Every VMM of the benchmark gives up after this long (`--timeout-s`).
const VMM_TIMEOUT: [&str; 2] = ["--timeout-s", "120"];

/// How the disk is handled in one run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskMode {
    /// Copied; the target holds the base.
    CopyBaseOnTarget,
    /// Copied; the target has a blank disk.
    CopyNoBase,
    /// Not copied: the target opens the same file.
    Shared,
}

/// One measured migration.
#[derive(Clone, Debug)]
pub struct StorageMigrateResult {
    /// How the disk went.
    pub mode: DiskMode,
    /// The engine's result (`migrate-status` result).
    pub result: Value,
    /// Guest disk writes acknowledged during the migration.
    pub writes: u64,
    /// Of those, acknowledged on the target (after the switch).
    pub writes_on_target: u64,
    /// Largest heartbeat gap seen by the host minus the period (ms).
    pub observed_pause_ms: Option<f64>,
    /// `blkverify` ranges that passed on the target, of those checked.
    pub verified: (usize, usize),
}

impl StorageMigrateResult {
    /// One JSON line.
    pub fn to_json_line(&self) -> String {
        let r = &self.result;
        let s = &r["storage"];
        match self.mode {
            DiskMode::Shared => json!({
                "bench": "storage-migrate-memory-only",
                "downtime_ms": r["downtime_ms"],
                "observed_pause_ms": self.observed_pause_ms,
                "bytes_sent": r["bytes_sent"],
                "total_ms": r["total_ms"],
                "guest_disk_writes": self.writes,
                "guest_disk_writes_on_target": self.writes_on_target,
                "verified": self.verified.0,
                "verify_checks": self.verified.1,
            }),
            _ => json!({
                "bench": "storage-migrate",
                "base_on_target": self.mode == DiskMode::CopyBaseOnTarget,
                "allocated_bytes": s["allocated_bytes"],
                "bytes_sent": s["bytes_sent"],
                "downtime_ms": r["downtime_ms"],
                "observed_pause_ms": self.observed_pause_ms,
                "final_dirty_bytes": s["final_dirty_bytes"],
                "dirty_bytes_sent": s["dirty_bytes_sent"],
                "total_bytes_sent": r["bytes_sent"],
                "total_ms": r["total_ms"],
                "rounds": r["rounds"],
                "guest_disk_writes": self.writes,
                "guest_disk_writes_on_target": self.writes_on_target,
                "verified": self.verified.0,
                "verify_checks": self.verified.1,
            }),
        }
        .to_string()
    }

    /// One table row.
    pub fn row(&self) -> String {
        let r = &self.result;
        let s = &r["storage"];
        let mode = match self.mode {
            DiskMode::CopyBaseOnTarget => "copy, base on target",
            DiskMode::CopyNoBase => "copy, no base",
            DiskMode::Shared => "memory only (shared)",
        };
        format!(
            "{:<22} {:>12} {:>12} {:>12} {:>11.1} {:>8} {:>9} {:>7} {:>8}",
            mode,
            s["allocated_bytes"].as_u64().unwrap_or(0),
            s["bytes_sent"].as_u64().unwrap_or(0),
            s["final_dirty_bytes"].as_u64().unwrap_or(0),
            r["downtime_ms"].as_f64().unwrap_or(0.0),
            self.observed_pause_ms
                .map_or("-".into(), |p| format!("{p:.1}")),
            r["total_ms"].as_u64().unwrap_or(0),
            self.writes,
            format!("{}/{}", self.verified.0, self.verified.1)
        )
    }

    /// The table header.
    pub fn header() -> String {
        format!(
            "{:<22} {:>12} {:>12} {:>12} {:>11} {:>8} {:>9} {:>7} {:>8}",
            "disk",
            "allocated_B",
            "disk_sent_B",
            "final_dirty",
            "downtime_ms",
            "pause_ms",
            "total_ms",
            "writes",
            "verified"
        )
    }
}

fn make_base(dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("sha256-{}.raw", "b7".repeat(32)));
    let f = std::fs::File::create(&path)?;
    let mut chunk = Vec::with_capacity(1 << 20);
    let mut sector = 0u64;
    while sector * 512 < BASE_DATA {
        chunk.clear();
        for s in sector..sector + 2048 {
            chunk.extend_from_slice(&blk_sector(1, s));
        }
        std::os::unix::fs::FileExt::write_all_at(&f, &chunk, sector * 512)?;
        sector += 2048;
    }
    f.set_len(DISK)?;
    Ok(path)
}

/// Runs one migration in `dir` (emptied first).
pub fn run_one(
    vmm: &Path,
    guest: &Path,
    dir: &Path,
    mode: DiskMode,
) -> Result<StorageMigrateResult> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let base = make_base(&dir.join("cache-a"))?;
    let src_disk = dir.join("src.qcow2");
    storage::image::create_overlay(&src_disk, &base)?;
    let dst_disk = match mode {
        DiskMode::Shared => src_disk.clone(),
        DiskMode::CopyBaseOnTarget => {
            let b = make_base(&dir.join("cache-b"))?;
            let d = dir.join("dst.qcow2");
            storage::image::create_overlay(&d, &b)?;
            d
        }
        DiskMode::CopyNoBase => {
            let d = dir.join("dst.qcow2");
            storage::blank(DISK, ImageFormat::Qcow2, &d)?;
            d
        }
    };
    let src = VmmProc::spawn(dir, "src")
        .binary(vmm)
        .args(&[
            "--kernel".into(),
            guest.display().to_string(),
            "--memory-mib".into(),
            MEMORY_MIB.to_string(),
            "--cmdline".into(),
            format!("hb_ms={HB_MS} blk_write={BOOT_WRITE}:2048:2"),
            "--disk".into(),
            format!("path={}", src_disk.display()),
        ])
        .args(&VMM_TIMEOUT)
        .stderr_to_file()
        .boot()?;
    let mut con = src.console(Duration::from_secs(20))?;
    let control = src.control();
    control.resume()?;
    con.wait_prefix("READY", Duration::from_secs(60))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let target = VmmProc::spawn(dir, "dst")
        .binary(vmm)
        .args(&["--disk".into(), format!("path={}", dst_disk.display())])
        .args(&VMM_TIMEOUT)
        .stderr_to_file()
        .incoming(&format!("127.0.0.1:{port}"))?;
    // The guest rewrites its disk until the migration ends: on the source's
    // console, then on the target's, which appears when the migration starts.
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let (s, w) = (stop.clone(), writes.clone());
    let dst_sock = target.console_sock.clone();
    let churn = std::thread::spawn(move || churn(con, &dst_sock, &s, &w));
    // Let the writer get going before the migration starts.
    std::thread::sleep(Duration::from_millis(300));
    let copy: Vec<usize> = if mode == DiskMode::Shared {
        vec![]
    } else {
        vec![0]
    };
    let start = Instant::now();
    control.migrate_send(MigrateSend {
        copy_disks: copy,
        allow_post_copy: Some(false),
        ..MigrateSend::to(format!("127.0.0.1:{port}"))
    })?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        let st = control.migrate_status()?;
        match st.stage {
            Stage::Completed => break st,
            Stage::Failed => {
                stop.store(true, Ordering::Relaxed);
                bail!(
                    "migration failed: {}",
                    st.error.as_deref().unwrap_or("no reason given")
                )
            }
            _ => {}
        }
        if Instant::now() > deadline {
            stop.store(true, Ordering::Relaxed);
            bail!("migration did not end: {st:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    stop.store(true, Ordering::Relaxed);
    let churned = churn.join().expect("churn thread");
    let src_lines = churned.src_lines;
    let Some(mut dst) = churned.dst else {
        bail!("the target's console never appeared");
    };
    let verified = verify(&mut dst, &churned.last, churned.in_flight)?;
    let all: Vec<&Line> = src_lines.iter().chain(dst.lines()).collect();
    let observed_pause_ms = crate::bench::migrate::observed_pause(&all, start);
    drop(dst);
    drop(target);
    drop(src);
    Ok(StorageMigrateResult {
        mode,
        result: serde_json::to_value(status.result).expect("figures serialise"),
        writes: writes.load(Ordering::Relaxed),
        writes_on_target: churned.on_target,
        observed_pause_ms,
        verified,
    })
}

/// The guest's heartbeat period (ms).
const HB_MS: u64 = 2;
/// Sector of the 1 MiB the guest writes at boot (seed 2).
const BOOT_WRITE: u64 = 1 << 17;

/// What the disk writer leaves: both consoles, the seed of the last
/// acknowledged write of each churned region, and the write in flight when
/// the source's console ended (region, seed).
struct Churned {
    src_lines: Vec<Line>,
    dst: Option<Console>,
    last: [Option<u64>; 64],
    in_flight: Option<(u64, u64)>,
    on_target: u64,
}

/// Rewrites 32 KiB regions back to back until `stop`: over the source's
/// console until it ends (the guest moved), then over the target's.
fn churn(mut con: Console, dst_sock: &Path, stop: &AtomicBool, writes: &AtomicU64) -> Churned {
    let mut last = [None; 64];
    let mut seed = 10;
    let mut in_flight = None;
    let mut on_target = 0;
    let mut on_source = true;
    let mut src_lines = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let region = seed % 64;
        let sector = CHURN_AT + region * REGION;
        let sent = con
            .send(&format!("blkwrite {sector} {REGION} {seed}"))
            .is_ok();
        let acked = sent
            && con
                .wait_for("BLK write", Duration::from_secs(2), |l| {
                    l.starts_with("BLK write")
                })
                .is_ok();
        if acked {
            last[region as usize] = Some(seed);
            writes.fetch_add(1, Ordering::Relaxed);
            if !on_source {
                on_target += 1;
            }
            seed += 1;
            continue;
        }
        if !on_source {
            // The target's console went quiet for 2 s: try again.
            continue;
        }
        // The source's console ended: the guest is moving. The write may
        // have landed before the switch or not; the target goes on.
        in_flight = Some((region, seed));
        seed += 1;
        on_source = false;
        src_lines = con.lines().to_vec();
        match attach_console(dst_sock, Duration::from_secs(30)) {
            Ok(c) => con = c,
            Err(_) => {
                return Churned {
                    src_lines,
                    dst: None,
                    last,
                    in_flight,
                    on_target,
                }
            }
        }
    }
    if on_source {
        // The migration ended between two writes, seen on the source only:
        // the target's console has the rest.
        src_lines = con.lines().to_vec();
        return Churned {
            src_lines,
            dst: attach_console(dst_sock, Duration::from_secs(10)).ok(),
            last,
            in_flight,
            on_target,
        };
    }
    Churned {
        src_lines,
        dst: Some(con),
        last,
        in_flight,
        on_target,
    }
}

/// Has the guest on the target re-read its disk: every churned region with
/// its last seed (either seed for the region written at the switch), its
/// boot pattern, and the template's first and last MiB. Returns (passed,
/// checked).
fn verify(
    con: &mut Console,
    last: &[Option<u64>; 64],
    in_flight: Option<(u64, u64)>,
) -> Result<(usize, usize)> {
    let mut check = |sector: u64, count: u64, seed: u64| -> Result<bool> {
        con.send(&format!("blkverify {sector} {count} {seed}"))?;
        let l = con.wait_for("BLK verify", Duration::from_secs(10), |l| {
            l.starts_with("BLK verify")
        })?;
        Ok(l.text.starts_with("BLK verify ok"))
    };
    let (mut passed, mut checked) = (0, 0);
    let base_end = BASE_DATA / 512 - 2048;
    for (sector, count, seed) in [(0, 2048, 1), (base_end, 2048, 1), (BOOT_WRITE, 2048, 2)] {
        checked += 1;
        passed += usize::from(check(sector, count, seed)?);
    }
    for (region, seed) in last.iter().enumerate() {
        let region = region as u64;
        let sector = CHURN_AT + region * REGION;
        let mut seeds: Vec<u64> = seed.iter().copied().collect();
        if let Some((_, s)) = in_flight.filter(|&(r, _)| r == region) {
            seeds.insert(0, s);
        }
        if seeds.is_empty() {
            continue;
        }
        checked += 1;
        let mut ok = false;
        for s in seeds {
            if check(sector, REGION, s)? {
                ok = true;
                break;
            }
        }
        passed += usize::from(ok);
    }
    Ok((passed, checked))
}

/// Runs the three modes in a scratch directory (removed afterwards).
pub fn run(vmm: &Path, guest: &Path, mut emit: impl FnMut(&StorageMigrateResult)) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("godwit-bench-smig-{}", std::process::id()));
    let result = (|| {
        for mode in [
            DiskMode::CopyBaseOnTarget,
            DiskMode::CopyNoBase,
            DiskMode::Shared,
        ] {
            emit(&run_one(vmm, guest, &dir, mode)?);
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}
