//! `bench storage`: how long provisioning a VM disk from a cached template
//! takes, for 1 GiB and 20 GiB templates, sparse and fully written.
//!
//! Provisioning is [`godwit_node::storage::provision`]: a qcow2 overlay on
//! the cached base, so the time should not depend on the template's size
//! or fill. Each template is written into a scratch directory, adopted into
//! a [`TemplateCache`] there (hashed once, not copied), then provisioned
//! `runs` times; the median is reported. Importing (hashing) is reported
//! apart, as `import_ms`: it happens once per node and template, not per VM.
//!
//! A fully written 20 GiB template needs 20 GiB of free disk; the free
//! space is checked first, and when it is short the largest size that fits
//! (keeping [`MARGIN`] free) is measured instead, with a note saying so.
//!
//! (Storage migration lines, `{"bench":"storage-migrate",...}`, come with
//! live storage migration.)

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use godwit_node::storage::{self, ImageFormat, TemplateCache};
use serde_json::json;

/// Free space left untouched when sizing a fully written template.
pub const MARGIN: u64 = 4 << 30;

/// What to measure.
#[derive(Clone, Debug)]
pub struct Options {
    /// Template sizes in GiB.
    pub sizes_gib: Vec<u64>,
    /// Provisioning runs per template (median reported).
    pub runs: usize,
    /// Scratch directory (removed afterwards); default under the temp dir.
    pub dir: Option<PathBuf>,
}

/// One measured template.
#[derive(Clone, Debug)]
pub struct ProvisionResult {
    /// Template size asked for, GiB.
    pub requested_gib: u64,
    /// Template size measured (smaller when the disk was short), GiB.
    pub template_gib: u64,
    /// `sparse` or `full`.
    pub fill: &'static str,
    /// Median provisioning time, ms.
    pub ms: f64,
    /// Slowest provisioning run, ms.
    pub max_ms: f64,
    /// Writing the template (not part of provisioning), ms.
    pub write_ms: f64,
    /// Hashing it into the cache (once per node), ms.
    pub import_ms: f64,
    /// Runs.
    pub runs: usize,
}

impl ProvisionResult {
    /// The table header.
    pub fn header() -> String {
        format!(
            "{:>9} {:>7} {:>12} {:>12} {:>12} {:>12} {:>5}",
            "template", "fill", "provision_ms", "max_ms", "write_ms", "import_ms", "runs"
        )
    }

    /// One table row.
    pub fn row(&self) -> String {
        let size = if self.template_gib == self.requested_gib {
            format!("{} GiB", self.template_gib)
        } else {
            format!("{}* GiB", self.template_gib)
        };
        format!(
            "{:>9} {:>7} {:>12.2} {:>12.2} {:>12.0} {:>12.0} {:>5}",
            size, self.fill, self.ms, self.max_ms, self.write_ms, self.import_ms, self.runs
        )
    }

    /// One JSON line.
    pub fn to_json_line(&self) -> String {
        json!({
            "bench": "provision",
            "template_gib": self.template_gib,
            "fill": self.fill,
            "ms": (self.ms * 1000.0).round() / 1000.0,
            "max_ms": (self.max_ms * 1000.0).round() / 1000.0,
            "runs": self.runs,
            "import_ms": self.import_ms.round(),
            "requested_gib": self.requested_gib,
        })
        .to_string()
    }
}

/// Free bytes for unprivileged writers on the file system holding `dir`.
pub fn free_bytes(dir: &Path) -> Result<u64> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())?;
    // SAFETY: statvfs fills the struct we pass; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if r != 0 {
        return Err(std::io::Error::last_os_error()).context("statvfs");
    }
    Ok(st.f_bavail * st.f_frsize)
}

/// Writes a template of `gib` GiB at `path`: sparse (a first sector of data,
/// the rest a hole) or full (every byte written, no zero block).
fn write_template(path: &Path, gib: u64, full: bool) -> Result<()> {
    let f = std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    let len = gib << 30;
    if full {
        let mut buf = vec![0u8; 4 << 20];
        let mut off = 0u64;
        while off < len {
            for (i, w) in buf.chunks_mut(8).enumerate() {
                w.copy_from_slice(&(off / 8 + i as u64 + 1).to_le_bytes());
            }
            f.write_all_at(&buf, off)
                .with_context(|| format!("write {}", path.display()))?;
            off += buf.len() as u64;
        }
    } else {
        f.write_all_at(b"godwit template", 0)?;
    }
    f.set_len(len)?;
    f.sync_all()?;
    Ok(())
}

/// Runs the benchmark, calling `emit` for every measured template, and
/// `note` for anything a reader should know (space shortfalls).
pub fn run(
    opts: &Options,
    mut emit: impl FnMut(&ProvisionResult),
    mut note: impl FnMut(&str),
) -> Result<()> {
    let dir = opts.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("godwit-bench-storage-{}", std::process::id()))
    });
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(dir.clone());
    let cache = TemplateCache::new(dir.join("cache"))?;
    for &gib in &opts.sizes_gib {
        for full in [false, true] {
            let mut size = gib;
            if full {
                let free = free_bytes(&dir)?;
                let fits = free.saturating_sub(MARGIN) >> 30;
                if fits < gib {
                    note(&format!(
                        "only {:.1} GiB free on {} (keeping {} GiB spare): a fully written {gib} GiB template does not fit; measuring {fits} GiB instead",
                        free as f64 / (1u64 << 30) as f64,
                        dir.display(),
                        MARGIN >> 30
                    ));
                    size = fits;
                    if size == 0 {
                        continue;
                    }
                }
            }
            let src = dir.join(format!(
                "template-{size}g-{}.raw",
                if full { "full" } else { "sparse" }
            ));
            let t0 = Instant::now();
            write_template(&src, size, full)?;
            let write_ms = t0.elapsed().as_secs_f64() * 1e3;
            let t0 = Instant::now();
            let t = cache.adopt(&src, None)?;
            let import_ms = t0.elapsed().as_secs_f64() * 1e3;
            let mut times = Vec::new();
            for i in 0..opts.runs.max(1) {
                let vm = dir.join(format!("vm-{i}.qcow2"));
                let t0 = Instant::now();
                storage::provision(&t, &vm)?;
                times.push(t0.elapsed().as_secs_f64() * 1e3);
                let info = storage::image::info(&vm)?;
                anyhow::ensure!(
                    info.format == ImageFormat::Qcow2 && info.virtual_size == size << 30,
                    "provisioned {info:?}"
                );
                storage::remove(&vm)?;
            }
            times.sort_by(f64::total_cmp);
            emit(&ProvisionResult {
                requested_gib: gib,
                template_gib: size,
                fill: if full { "full" } else { "sparse" },
                ms: times[times.len() / 2],
                max_ms: *times.last().expect("one run at least"),
                write_ms,
                import_ms,
                runs: times.len(),
            });
            cache.remove(&t.digest)?;
        }
    }
    Ok(())
}
