//! `bench storage` (migration part): live storage migration of the test
//! guest between two godwit-vmm processes on this machine (loopback, no
//! bandwidth cap), while the guest rewrites 32 KiB regions of its disk
//! back to back (`blkwrite` over its console).
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
use godwit_testkit::guest::blk_sector;
use godwit_testkit::vmmproc::VmmProc;
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
                "bytes_sent": r["bytes_sent"],
                "total_ms": r["total_ms"],
                "guest_disk_writes": self.writes,
            }),
            _ => json!({
                "bench": "storage-migrate",
                "base_on_target": self.mode == DiskMode::CopyBaseOnTarget,
                "allocated_bytes": s["allocated_bytes"],
                "bytes_sent": s["bytes_sent"],
                "downtime_ms": r["downtime_ms"],
                "final_dirty_bytes": s["final_dirty_bytes"],
                "dirty_bytes_sent": s["dirty_bytes_sent"],
                "total_bytes_sent": r["bytes_sent"],
                "total_ms": r["total_ms"],
                "rounds": r["rounds"],
                "guest_disk_writes": self.writes,
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
            "{:<22} {:>12} {:>12} {:>12} {:>11.1} {:>9} {:>7}",
            mode,
            s["allocated_bytes"].as_u64().unwrap_or(0),
            s["bytes_sent"].as_u64().unwrap_or(0),
            s["final_dirty_bytes"].as_u64().unwrap_or(0),
            r["downtime_ms"].as_f64().unwrap_or(0.0),
            r["total_ms"].as_u64().unwrap_or(0),
            self.writes
        )
    }

    /// The table header.
    pub fn header() -> String {
        format!(
            "{:<22} {:>12} {:>12} {:>12} {:>11} {:>9} {:>7}",
            "disk",
            "allocated_B",
            "disk_sent_B",
            "final_dirty",
            "downtime_ms",
            "total_ms",
            "writes"
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
            format!("blk_write={}:2048:2", 1u64 << 17),
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
    // The guest rewrites its disk until the migration ends.
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let (s, w) = (stop.clone(), writes.clone());
    let churn = std::thread::spawn(move || {
        let mut seed = 10;
        while !s.load(Ordering::Relaxed) {
            let sector = CHURN_AT + (seed % 64) * REGION;
            if con
                .send(&format!("blkwrite {sector} {REGION} {seed}"))
                .is_err()
            {
                return;
            }
            match con.wait_for("BLK write", Duration::from_secs(2), |l| {
                l.starts_with("BLK write")
            }) {
                Ok(_) => w.fetch_add(1, Ordering::Relaxed),
                Err(_) => return,
            };
            seed += 1;
        }
    });
    // Let the writer get going before the migration starts.
    std::thread::sleep(Duration::from_millis(300));
    let copy: Vec<usize> = if mode == DiskMode::Shared {
        vec![]
    } else {
        vec![0]
    };
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
            Stage::Failed => bail!(
                "migration failed: {}",
                st.error.as_deref().unwrap_or("no reason given")
            ),
            _ => {}
        }
        if Instant::now() > deadline {
            bail!("migration did not end: {st:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    stop.store(true, Ordering::Relaxed);
    let _ = churn.join();
    drop(target);
    drop(src);
    Ok(StorageMigrateResult {
        mode,
        result: serde_json::to_value(status.result).expect("figures serialise"),
        writes: writes.load(Ordering::Relaxed),
    })
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
