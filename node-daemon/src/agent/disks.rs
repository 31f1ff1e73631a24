//! A VM's disk files on a node: where they are, how they are made
//! ([`provision_disk`]), which disks move with a VM, and the target's side
//! of copying them.
//!
//! Files: a template clone on node-local storage is a qcow2 overlay,
//! `disks/<name>.qcow2`, on the template's image in the node's template cache
//! (`<state-dir>/cache/sha256-<hex>.<fmt>`, [`crate::storage::template`]):
//! the first VM from a template on a node brings the image into the cache
//! (copied and hashed once), every VM after that gets its overlay in
//! milliseconds whatever the image's size. Which cache entry a template path
//! is, is remembered in `<cache>/sources/<hash of the path>.json` with the
//! file's size and modification time, so a changed template file is cached
//! again. A clone on shared storage stays a full sparse copy next to the VM
//! (`<shared-dir>/<ns>/<vm>/<name>.<fmt>`): a backing file in one node's
//! cache would not be there for the other nodes. A disk that exists is
//! always kept, under whatever name it was first made.
//!
//! A disk moves with the VM (live storage migration, VMMigration
//! `spec.storage: Copy`) when it is on node-local storage, writable, and
//! made for the VM (a template clone or a blank disk): images used in place
//! and read-only disks are never copied, and shared disks are seen by every
//! node. The target creates each such disk the way a fresh VM on that node
//! would have it (a sparse copy of the template image, or a blank image of
//! the disk's size): the same virtual size, which the migration checks, and
//! wherever the source disk is unallocated the target holds what the source
//! reads there. The source then sends every allocated extent and, in rounds,
//! the blocks the guest writes meanwhile (`migration::storage`). A target
//! that fails removes its VM directory and the disks in it; the source
//! removes its own copies only once the VM is no longer placed on it.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use godwit_crds::contract::{Machine, MachineDisk, MachineDiskSource};
use godwit_crds::{ImageFormat, StorageKind};

use super::vm_dir::VmDir;
use crate::storage::template::{self, CachedTemplate, TemplateCache};

/// Errors making a VM's disks.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// A file operation failed.
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// The node's template cache could not provide a template's image.
    #[error("template image {0}")]
    Template(String, #[source] crate::storage::StorageError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DiskError {
    let what = what.into();
    move |e| DiskError::Io(what, e)
}

/// The file of `disk` on this node (see the module docs).
pub fn disk_file(dir: &VmDir, disk: &MachineDisk) -> PathBuf {
    match &disk.source {
        MachineDiskSource::Image { path, .. } => PathBuf::from(path),
        MachineDiskSource::Clone { format, .. } if disk.storage == StorageKind::Local => {
            // A disk made before clones were overlays keeps its name.
            let old = dir.disk_path(&disk.name, disk.storage, *format);
            if *format != ImageFormat::Qcow2 && old.exists() {
                return old;
            }
            dir.disk_path(&disk.name, disk.storage, ImageFormat::Qcow2)
        }
        MachineDiskSource::Clone { format, .. } => dir.disk_path(&disk.name, disk.storage, *format),
        MachineDiskSource::Blank { .. } => {
            dir.disk_path(&disk.name, disk.storage, ImageFormat::Raw)
        }
    }
}

/// One cache fill at a time on this node: two VMs from a new template must
/// not copy it twice into the same partial file.
static CACHE_FILL: Mutex<()> = Mutex::new(());

/// What `<cache>/sources/<hash>.json` remembers of a template path.
#[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
struct SourceMemo {
    source: String,
    size: u64,
    mtime_ns: i128,
    digest: String,
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn stat(path: &Path) -> std::io::Result<(u64, i128)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path)?;
    Ok((
        m.len(),
        i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
    ))
}

/// The cache entry of the template image at `base`, bringing it into the
/// node's cache on first use.
pub fn cached_template(cache_dir: &Path, base: &Path) -> Result<CachedTemplate, DiskError> {
    let err = |e| DiskError::Template(base.display().to_string(), e);
    let _one = CACHE_FILL.lock().unwrap_or_else(|p| p.into_inner());
    let cache = TemplateCache::new(cache_dir).map_err(err)?;
    let source = base.display().to_string();
    let memo_path = cache_dir
        .join("sources")
        .join(format!("{:016x}.json", fnv(&source)));
    let (size, mtime_ns) =
        stat(base).map_err(|e| DiskError::Io(format!("stat {}", base.display()), e))?;
    let memo: Option<SourceMemo> = std::fs::read(&memo_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    if let Some(m) = memo.filter(|m| m.source == source && m.size == size && m.mtime_ns == mtime_ns)
    {
        if let Some(t) = cache.get(&m.digest).map_err(err)? {
            return Ok(t);
        }
    }
    let t = cache.fetch(&source, None, &mut |_| {}).map_err(err)?;
    let memo = SourceMemo {
        source,
        size,
        mtime_ns,
        digest: t.digest.clone(),
    };
    // Best effort: without the memo the next VM only hashes the file again.
    if std::fs::create_dir_all(memo_path.parent().expect("a parent")).is_ok() {
        let tmp = memo_path.with_extension("tmp");
        if std::fs::write(&tmp, serde_json::to_vec(&memo).expect("JSON")).is_ok() {
            let _ = std::fs::rename(&tmp, &memo_path);
        }
    }
    Ok(t)
}

/// The template images `cache_dir` holds, by the source they were cached
/// from: `source → "sha256:<hex>"`, from the cache's memos, for the entries
/// still in the cache (`GodwitNode.status.cachedImages`).
pub fn cached_images(cache_dir: &Path) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(cache) = TemplateCache::new(cache_dir) else {
        return out;
    };
    let Ok(entries) = std::fs::read_dir(cache_dir.join("sources")) else {
        return out;
    };
    for entry in entries.flatten() {
        let memo: Option<SourceMemo> = std::fs::read(entry.path())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let Some(memo) = memo else { continue };
        if cache.get(&memo.digest).ok().flatten().is_some() {
            let digest = if memo.digest.starts_with("sha256:") {
                memo.digest.clone()
            } else {
                format!("sha256:{}", memo.digest)
            };
            out.insert(memo.source, digest);
        }
    }
    out
}

/// Creates at `dst` a qcow2 overlay on the cached copy of template image
/// `base`.
pub fn overlay_on_cached(dir: &VmDir, base: &Path, dst: &Path) -> Result<(), DiskError> {
    let t = cached_template(&dir.cache, base)?;
    template::provision(&t, dst).map_err(|e| DiskError::Template(base.display().to_string(), e))
}

/// Whether `disk` is copied when its VM moves.
pub fn moves_with_vm(disk: &MachineDisk) -> bool {
    disk.storage == StorageKind::Local
        && !disk.read_only
        && !matches!(disk.source, MachineDiskSource::Image { .. })
}

/// The indices (VMM disk order) of `machine`'s disks that move with it.
pub fn copied(machine: &Machine) -> Vec<usize> {
    machine
        .disks
        .iter()
        .enumerate()
        .filter(|(_, d)| moves_with_vm(d))
        .map(|(i, _)| i)
        .collect()
}

/// Creates, on the target, the disks of `machine` that its migration
/// copies, and returns the path of every disk in VMM order.
pub fn prepare_target(
    dir: &VmDir,
    machine: &Machine,
    copy: bool,
) -> Result<Vec<PathBuf>, DiskError> {
    machine
        .disks
        .iter()
        .map(|disk| {
            if copy && moves_with_vm(disk) {
                // Never receive into a disk left from an earlier stay here:
                // it would hold stale blocks where the source has holes.
                let _ = std::fs::remove_file(disk_file(dir, disk));
                return provision_disk(dir, disk);
            }
            Ok(disk_file(dir, disk))
        })
        .collect()
}

/// Makes disk `disk` exist, and returns its path. A disk that exists is kept
/// (a restarted VM keeps what it wrote).
pub fn provision_disk(dir: &VmDir, disk: &MachineDisk) -> Result<PathBuf, DiskError> {
    let path = disk_file(dir, disk);
    if matches!(disk.source, MachineDiskSource::Image { .. }) || path.exists() {
        return Ok(path);
    }
    let parent = path.parent().expect("disk paths have a parent");
    fs::create_dir_all(parent).map_err(io(format!("create {}", parent.display())))?;
    // Build under a temporary name: a crash never leaves a half disk that
    // looks finished.
    let partial = path.with_extension("partial");
    let made = match &disk.source {
        MachineDiskSource::Clone { path: base, .. } if disk.storage == StorageKind::Local => {
            overlay_on_cached(dir, Path::new(base), &partial)
        }
        MachineDiskSource::Clone { path: base, .. } => sparse_copy(Path::new(base), &partial),
        MachineDiskSource::Blank { size_bytes } => fs::File::create(&partial)
            .and_then(|f| f.set_len(*size_bytes))
            .map_err(io(format!("create {}", partial.display()))),
        MachineDiskSource::Image { .. } => unreachable!("returned above"),
    };
    if let Err(e) = made {
        let _ = fs::remove_file(&partial);
        return Err(e);
    }
    fs::rename(&partial, &path).map_err(io(format!("rename to {}", path.display())))?;
    Ok(path)
}

/// Copies `src` to `dst` keeping holes: only the data extents are read and written.
pub fn sparse_copy(src: &Path, dst: &Path) -> Result<(), DiskError> {
    let from = fs::File::open(src).map_err(io(format!("open {}", src.display())))?;
    let len = from
        .metadata()
        .map_err(io(format!("stat {}", src.display())))?
        .len();
    let to = fs::File::create(dst).map_err(io(format!("create {}", dst.display())))?;
    to.set_len(len)
        .map_err(io(format!("size {}", dst.display())))?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&from);
    let mut buf = vec![0u8; 1 << 20];
    let mut pos: i64 = 0;
    while (pos as u64) < len {
        // SAFETY: lseek on a descriptor we own.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: only a hole is left.
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let end = if hole < 0 { len as i64 } else { hole };
        let mut off = data;
        while off < end {
            let n = ((end - off) as usize).min(buf.len());
            from.read_exact_at(&mut buf[..n], off as u64)
                .map_err(io(format!("read {}", src.display())))?;
            // Zero blocks inside data extents stay holes too.
            if buf[..n].iter().any(|&b| b != 0) {
                to.write_all_at(&buf[..n], off as u64)
                    .map_err(io(format!("write {}", dst.display())))?;
            }
            off += n as i64;
        }
        pos = end;
    }
    to.sync_all().map_err(io(format!("sync {}", dst.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_copy_keeps_holes_and_data() {
        let d = std::env::temp_dir().join(format!("godwit-local-sparse-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        let src = d.join("src");
        let f = fs::File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(&[7u8; 8192], 40 << 20).unwrap();
        drop(f);
        let dst = d.join("dst");
        sparse_copy(&src, &dst).unwrap();
        assert_eq!(fs::read(&src).unwrap(), fs::read(&dst).unwrap());
        let blocks = |p: &Path| std::os::unix::fs::MetadataExt::blocks(&fs::metadata(p).unwrap());
        assert!(
            blocks(&dst) * 512 < 4 << 20,
            "copy is not sparse: {} blocks",
            blocks(&dst)
        );
        fs::remove_dir_all(&d).unwrap();
    }

    fn disk(storage: StorageKind, read_only: bool, source: MachineDiskSource) -> MachineDisk {
        MachineDisk {
            name: "d".into(),
            source,
            storage,
            read_only,
        }
    }

    #[test]
    fn a_local_clone_is_an_overlay_on_the_node_cache_and_the_cache_is_filled_once() {
        let root = std::env::temp_dir().join(format!("godwit-disks-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let base = root.join("template.raw");
        let mut data = vec![0u8; 4 << 20];
        data[..4096].fill(0xab);
        std::fs::write(&base, &data).unwrap();
        let clone = MachineDisk {
            name: "root".into(),
            source: MachineDiskSource::Clone {
                path: base.display().to_string(),
                format: ImageFormat::Raw,
            },
            storage: StorageKind::Local,
            read_only: false,
        };
        let state = root.join("state");
        let vm = |name: &str| VmDir::new(&state, &root.join("shared"), "ns", name);
        let a = provision_disk(&vm("a"), &clone).unwrap();
        assert_eq!(a, vm("a").path.join("disks/root.qcow2"));
        let info = crate::storage::image::info(&a).unwrap();
        let backing = info.backing.expect("an overlay");
        assert!(
            backing.starts_with(state.join("cache"))
                && backing.display().to_string().contains("/sha256-"),
            "{}",
            backing.display()
        );
        assert_eq!(info.virtual_size, 4 << 20);
        // The second VM reuses the cache entry (found by the memo, not by
        // hashing the template again): same backing file, one cache entry.
        let b = provision_disk(&vm("b"), &clone).unwrap();
        let info_b = crate::storage::image::info(&b).unwrap();
        assert_eq!(info_b.backing.as_deref(), Some(backing.as_path()));
        let entries = TemplateCache::new(state.join("cache"))
            .unwrap()
            .list()
            .unwrap();
        assert_eq!(entries.len(), 1);
        // A disk that exists is kept.
        assert_eq!(provision_disk(&vm("a"), &clone).unwrap(), a);
        // A template file replaced in place is cached again under its new digest.
        std::thread::sleep(std::time::Duration::from_millis(10));
        data[..4096].fill(0xcd);
        std::fs::write(&base, &data).unwrap();
        let c = provision_disk(&vm("c"), &clone).unwrap();
        let info_c = crate::storage::image::info(&c).unwrap();
        assert_ne!(info_c.backing.as_deref(), Some(backing.as_path()));
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn only_local_writable_disks_made_for_the_vm_move() {
        let clone = || MachineDiskSource::Clone {
            path: "/t.raw".into(),
            format: godwit_crds::ImageFormat::Raw,
        };
        let image = || MachineDiskSource::Image {
            path: "/i.raw".into(),
            format: godwit_crds::ImageFormat::Raw,
        };
        let blank = || MachineDiskSource::Blank {
            size_bytes: 1 << 20,
        };
        assert!(moves_with_vm(&disk(StorageKind::Local, false, clone())));
        assert!(moves_with_vm(&disk(StorageKind::Local, false, blank())));
        assert!(!moves_with_vm(&disk(StorageKind::Shared, false, clone())));
        assert!(!moves_with_vm(&disk(StorageKind::Local, true, clone())));
        assert!(!moves_with_vm(&disk(StorageKind::Local, false, image())));
    }
}
