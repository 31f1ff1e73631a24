//! An open disk image as the block device sees it: byte reads and writes
//! on the virtual disk, whatever the format, with the image locks held.
//!
//! Raw images are served with `pread`/`pwrite` on the file; qcow2 images
//! (with their backing chain, raw or qcow2, opened read-only by us rather
//! than implicitly by imago, so each layer is checked and locked) through
//! imago.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use imago::file::File as ImagoFile;
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::StorageOpenOptions;
use imago::{DenyImplicitOpenGate, FormatAccess, FormatDriverBuilder, ShallowMapping};

use super::image::{
    check_format, data_ranges, read_qcow2_header, resolve_backing, Extent, ImageFormat,
};
use super::lock::{ImageLock, LockMode};
use super::{io_error, StorageError};

/// Longest backing chain we follow (a loop in a chain ends here too).
const MAX_CHAIN: usize = 16;

enum Backend {
    Raw(File),
    Qcow2(FormatAccess<ImagoFile>),
}

/// An open disk image.
pub struct DiskImage {
    path: PathBuf,
    format: ImageFormat,
    read_only: bool,
    size: u64,
    backend: Backend,
    locks: Vec<ImageLock>,
}

impl std::fmt::Debug for DiskImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskImage")
            .field("path", &self.path)
            .field("format", &self.format)
            .field("read_only", &self.read_only)
            .field("size", &self.size)
            .field("locked", &!self.locks.is_empty())
            .finish()
    }
}

/// Opens one layer through imago (`writable` only for the top layer).
fn open_layer(
    path: &Path,
    format: ImageFormat,
    writable: bool,
    depth: usize,
) -> Result<FormatAccess<ImagoFile>, StorageError> {
    if depth > MAX_CHAIN {
        return Err(StorageError::CorruptQcow2(
            path.display().to_string(),
            format!("backing chain longer than {MAX_CHAIN} (a loop?)"),
        ));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(writable)
        .open(path)
        .map_err(|e| io_error(path, "open", e))?;
    let opts = StorageOpenOptions::new().filename(path).write(writable);
    let storage = ImagoFile::from_open_file(file, opts).map_err(|e| io_error(path, "open", e))?;
    let qcow2_err = |e| StorageError::Qcow2Open(path.display().to_string(), e);
    match format {
        ImageFormat::Raw => {
            let raw = Raw::builder(storage)
                .write(writable)
                .open(DenyImplicitOpenGate::default())
                .map_err(|e| io_error(path, "open", e))?;
            Ok(FormatAccess::new(raw))
        }
        ImageFormat::Qcow2 => {
            let h = read_qcow2_header(path)?;
            let backing = match &h.backing_file {
                None => None,
                Some(name) => {
                    let bp = resolve_backing(path, name);
                    let layer = check_format(&bp, h.backing_format)
                        .and_then(|bf| open_layer(&bp, bf, false, depth + 1))
                        .map_err(|e| StorageError::Backing {
                            image: path.display().to_string(),
                            backing: bp.display().to_string(),
                            source: Box::new(e),
                        })?;
                    Some(layer)
                }
            };
            let q = Qcow2::<ImagoFile>::builder(storage)
                .write(writable)
                .backing(backing)
                .open(DenyImplicitOpenGate::default())
                .map_err(qcow2_err)?;
            Ok(FormatAccess::new(q))
        }
    }
}

/// Takes the locks for opening `path`: exclusive on the image itself when
/// writable, shared otherwise, shared on every backing image.
fn lock_chain(
    path: &Path,
    format: ImageFormat,
    read_only: bool,
) -> Result<Vec<ImageLock>, StorageError> {
    let mode = if read_only {
        LockMode::Shared
    } else {
        LockMode::Exclusive
    };
    let mut locks = vec![ImageLock::acquire(path, mode)?];
    let (mut cur, mut fmt) = (path.to_path_buf(), format);
    while fmt == ImageFormat::Qcow2 && locks.len() <= MAX_CHAIN {
        let h = read_qcow2_header(&cur)?;
        let Some(name) = h.backing_file else { break };
        let bp = resolve_backing(&cur, &name);
        let locked = check_format(&bp, h.backing_format).and_then(|f| {
            fmt = f;
            ImageLock::acquire(&bp, LockMode::Shared)
        });
        match locked {
            Ok(l) => locks.push(l),
            // A lock conflict is about the backing image itself; say so
            // without the wrapper.
            Err(e @ StorageError::Locked { .. }) => return Err(e),
            Err(e) => {
                return Err(StorageError::Backing {
                    image: cur.display().to_string(),
                    backing: bp.display().to_string(),
                    source: Box::new(e),
                })
            }
        }
        cur = bp;
    }
    Ok(locks)
}

impl DiskImage {
    /// Opens `path` as `format` (detected when `None`), read-only or not,
    /// taking the image locks when `lock` is true (see [`super::lock`]).
    pub fn open(
        path: &Path,
        format: Option<ImageFormat>,
        read_only: bool,
        lock: bool,
    ) -> Result<DiskImage, StorageError> {
        let format = check_format(path, format)?;
        // Lock before reading any metadata, so that what we read is not
        // being changed by another writer.
        let locks = if lock {
            lock_chain(path, format, read_only)?
        } else {
            Vec::new()
        };
        let (backend, size) = Self::open_backend(path, format, read_only)?;
        Ok(DiskImage {
            path: path.to_path_buf(),
            format,
            read_only,
            size,
            backend,
            locks,
        })
    }

    fn open_backend(
        path: &Path,
        format: ImageFormat,
        read_only: bool,
    ) -> Result<(Backend, u64), StorageError> {
        match format {
            ImageFormat::Raw => {
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(!read_only)
                    .open(path)
                    .map_err(|e| io_error(path, "open", e))?;
                let size = file
                    .metadata()
                    .map_err(|e| io_error(path, "open", e))?
                    .len();
                Ok((Backend::Raw(file), size))
            }
            ImageFormat::Qcow2 => {
                let fa = open_layer(path, format, !read_only, 0)?;
                let size = fa.size();
                Ok((Backend::Qcow2(fa), size))
            }
        }
    }

    /// The image file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its format.
    pub fn format(&self) -> ImageFormat {
        self.format
    }

    /// Whether it was opened read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Virtual disk size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether this image holds its locks.
    pub fn is_locked(&self) -> bool {
        !self.locks.is_empty()
    }

    /// Takes the image locks (a no-op when already held).
    pub fn lock(&mut self) -> Result<(), StorageError> {
        if self.locks.is_empty() {
            self.locks = lock_chain(&self.path, self.format, self.read_only)?;
        }
        Ok(())
    }

    /// Releases the image locks (after flushing what was written).
    pub fn unlock(&mut self) -> Result<(), StorageError> {
        self.flush().map_err(|e| io_error(&self.path, "flush", e))?;
        for l in self.locks.drain(..) {
            l.release();
        }
        Ok(())
    }

    /// Reopens the image (rereading all qcow2 metadata, which another
    /// process may have changed while we held the file open unlocked) and
    /// takes the locks. A migration target calls this before it runs the
    /// guest; see [`super::lock`].
    pub fn reopen_locked(&mut self) -> Result<(), StorageError> {
        self.lock()?;
        self.reopen()
    }

    /// Reopens the image without touching the locks (rereads qcow2
    /// metadata).
    pub fn reopen(&mut self) -> Result<(), StorageError> {
        let (backend, size) = Self::open_backend(&self.path, self.format, self.read_only)?;
        self.backend = backend;
        self.size = size;
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset` of the virtual disk.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        match &self.backend {
            Backend::Raw(f) => f.read_exact_at(buf, offset),
            Backend::Qcow2(q) => q.read(buf, offset),
        }
    }

    /// Writes `buf` at `offset` of the virtual disk.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        if self.read_only {
            return Err(std::io::Error::from_raw_os_error(libc::EROFS));
        }
        match &self.backend {
            Backend::Raw(f) => f.write_all_at(buf, offset),
            Backend::Qcow2(q) => q.write(buf, offset),
        }
    }

    /// Makes every completed write durable (qcow2: metadata caches written
    /// back, then the file synced).
    pub fn flush(&self) -> std::io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        match &self.backend {
            Backend::Raw(f) => f.sync_data(),
            Backend::Qcow2(q) => {
                q.flush()?;
                q.sync()
            }
        }
    }

    /// The ranges allocated in this image itself, not in its backing
    /// images: data, and (qcow2) clusters that read as zero without data.
    /// What a storage migration must send when the target already holds the
    /// backing images; holes and unallocated clusters are left out. For a raw
    /// file, its data ranges (`SEEK_DATA`).
    pub fn allocated_extents(&self) -> Result<Vec<Extent>, StorageError> {
        let mut out: Vec<Extent> = Vec::new();
        let mut push = |offset: u64, len: u64, zero: bool| match out.last_mut() {
            Some(e) if e.offset + e.len == offset && e.zero == zero => e.len += len,
            _ => out.push(Extent { offset, len, zero }),
        };
        match &self.backend {
            Backend::Raw(f) => {
                for (o, l) in data_ranges(f).map_err(|e| io_error(&self.path, "read", e))? {
                    push(o, l, false);
                }
            }
            Backend::Qcow2(q) => {
                let mut off = 0u64;
                while off < self.size {
                    let (m, len) = q
                        .get_shallow_mapping(off, self.size - off)
                        .map_err(|e| io_error(&self.path, "read", e))?;
                    if len == 0 {
                        break;
                    }
                    match m {
                        ShallowMapping::Raw { .. } | ShallowMapping::Special { .. } => {
                            push(off, len, false)
                        }
                        ShallowMapping::Zero { explicit: true, .. } => push(off, len, true),
                        ShallowMapping::Eof { .. } => break,
                        _ => {} // unallocated: in a backing image, or a hole
                    }
                    off += len;
                }
            }
        }
        Ok(out)
    }
}

impl Drop for DiskImage {
    fn drop(&mut self) {
        // imago's FormatAccess flushes its caches on drop in sync mode; a
        // raw file has no caches. The locks go with their files.
        if let Err(e) = self.flush() {
            tracing::warn!(path = %self.path.display(), "Cannot flush disk image on close: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::image::{create_blank, create_overlay};
    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("godwit-disk-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    #[test]
    fn overlay_reads_base_and_keeps_writes_on_top() {
        let d = tmpdir("overlay");
        let base = d.join("base.raw");
        create_blank(&base, 4 << 20, ImageFormat::Raw).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&base)
            .unwrap()
            .write_all_at(&[5u8; 4096], 1 << 20)
            .unwrap();
        let top = d.join("top.qcow2");
        create_overlay(&top, &base).unwrap();
        {
            let img = DiskImage::open(&top, None, false, true).unwrap();
            assert_eq!(img.format(), ImageFormat::Qcow2);
            assert_eq!(img.size(), 4 << 20);
            let mut b = vec![0u8; 4096];
            img.read_at(&mut b, 1 << 20).unwrap();
            assert!(b.iter().all(|x| *x == 5));
            img.write_at(&[6u8; 512], 2 << 20).unwrap();
            img.flush().unwrap();
            let ext = img.allocated_extents().unwrap();
            assert_eq!(ext.len(), 1, "{ext:?}");
            assert!(ext[0].offset <= 2 << 20 && ext[0].offset + ext[0].len > 2 << 20);
            // The base is shared-locked: nobody may write it now.
            assert!(ImageLock::acquire(&base, LockMode::Exclusive).is_err());
            assert!(DiskImage::open(&top, None, false, true).is_err());
        }
        let img = DiskImage::open(&top, None, true, true).unwrap();
        let mut b = vec![0u8; 512];
        img.read_at(&mut b, 2 << 20).unwrap();
        assert!(b.iter().all(|x| *x == 6));
        let mut raw = vec![0u8; 512];
        File::open(&base)
            .unwrap()
            .read_exact_at(&mut raw, 2 << 20)
            .unwrap();
        assert!(raw.iter().all(|x| *x == 0), "the base was written");
        drop(img);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
