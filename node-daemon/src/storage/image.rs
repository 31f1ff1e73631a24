//! Disk image files: the two formats we read and write (raw and qcow2),
//! format detection with a strict qcow2 header check, creating blank images
//! and copy-on-write overlays, sparse copies, and the allocated extents of
//! an image (what a storage migration has to send).
//!
//! # Why imago for qcow2
//!
//! qcow2 is a format with a lot of corner cases (refcount tables that grow,
//! L2 tables, copy-on-write of partial clusters, backing chains, compressed
//! and zero clusters), and a bug there corrupts users' disks silently. imago
//! is a maintained Rust implementation by a QEMU block-layer maintainer,
//! tested against QEMU's own behaviour, with a fully synchronous build (the
//! `sync` feature) that fits our VMM, whose block requests are served
//! synchronously on the vCPU thread, without an async runtime. It creates
//! images (with backing files) as well as reading and writing them, and
//! exposes the cluster mapping we need for allocated-extent iteration. So
//! we use it for everything qcow2 and do not write the format ourselves.
//! What we do ourselves is a strict check of the qcow2 header before imago
//! sees a file, so that a corrupt image is refused with an error that says
//! what is wrong, and raw files, which need nothing but `pread`/`pwrite`,
//! `SEEK_DATA`/`SEEK_HOLE` and `copy_file_range`.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use imago::file::File as ImagoFile;
use imago::qcow2::Qcow2;
use imago::{FormatCreateBuilder, StorageOpenOptions};
use serde::{Deserialize, Serialize};

use super::{io_error, StorageError};

/// The first four bytes of every qcow2 image.
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// Header extension: the backing file's format name.
const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
/// qcow2 incompatible feature bits we accept: only dirty (bit 0, lazy
/// refcounts left unflushed, which imago repairs). Other bits (external
/// data file, compression type, extended L2 entries) are refused.
const INCOMPAT_KNOWN: u64 = 1 << 0;
/// qcow2 incompatible feature bit: the image is marked corrupt.
const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// qcow2 incompatible feature bit: guest data lives in an external file.
const INCOMPAT_DATA_FILE: u64 = 1 << 2;

/// A disk image format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    /// A plain file, byte for byte the disk (sparse where the disk is zero).
    Raw,
    /// QEMU's copy-on-write format, optionally on a backing image.
    Qcow2,
}

impl ImageFormat {
    /// The name used on the command line, in qcow2 headers and as the file
    /// extension in the template cache.
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ImageFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "raw" => Ok(ImageFormat::Raw),
            "qcow2" => Ok(ImageFormat::Qcow2),
            _ => Err(format!("unknown image format {s:?}; use raw or qcow2")),
        }
    }
}

/// What the qcow2 header says (after [`read_qcow2_header`] checked it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Qcow2Header {
    /// 2 or 3.
    pub version: u32,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Backing file name as written in the header (relative names are
    /// relative to the image's directory).
    pub backing_file: Option<String>,
    /// Backing file format from the header extension, if present.
    pub backing_format: Option<ImageFormat>,
}

/// A summary of one image file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// The format found.
    pub format: ImageFormat,
    /// Size of the disk the guest sees, in bytes.
    pub virtual_size: u64,
    /// The backing image, resolved against the image's directory.
    pub backing: Option<PathBuf>,
    /// Bytes the file occupies on the host file system.
    pub allocated_bytes: u64,
}

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

fn corrupt(path: &Path, why: impl Into<String>) -> StorageError {
    StorageError::CorruptQcow2(path.display().to_string(), why.into())
}

/// Reads the first bytes of `file` and says whether they are a qcow2 magic.
fn has_qcow2_magic(path: &Path, file: &mut File) -> Result<bool, StorageError> {
    let mut magic = [0u8; 4];
    file.seek(SeekFrom::Start(0))
        .map_err(|e| io_error(path, "read", e))?;
    let mut n = 0;
    while n < 4 {
        match file.read(&mut magic[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_error(path, "read", e)),
        }
    }
    Ok(n == 4 && magic == QCOW2_MAGIC)
}

/// Reads and checks the qcow2 header of `path`: magic, version, cluster
/// size, table offsets inside the file and cluster-aligned, an L1 table big
/// enough for the disk size, no encryption, no external data file, not
/// marked corrupt, a backing file name that fits in the first cluster.
/// Everything imago would otherwise reject with a less helpful message (or
/// accept and misread) is refused here with [`StorageError::CorruptQcow2`].
pub fn read_qcow2_header(path: &Path) -> Result<Qcow2Header, StorageError> {
    let mut file = File::open(path).map_err(|e| io_error(path, "open", e))?;
    let file_len = file
        .metadata()
        .map_err(|e| io_error(path, "open", e))?
        .len();
    let mut h = vec![0u8; 4096];
    let mut n = 0;
    while n < h.len() {
        match file.read(&mut h[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_error(path, "read", e)),
        }
    }
    h.truncate(n);
    if h.len() < 72 {
        return Err(corrupt(
            path,
            format!("header truncated at {} bytes", h.len()),
        ));
    }
    if h[..4] != QCOW2_MAGIC {
        return Err(corrupt(path, "no qcow2 magic"));
    }
    let version = be32(&h, 4);
    if version != 2 && version != 3 {
        return Err(corrupt(path, format!("unsupported version {version}")));
    }
    let cluster_bits = be32(&h, 20);
    if !(9..=21).contains(&cluster_bits) {
        return Err(corrupt(
            path,
            format!("cluster_bits {cluster_bits} out of 9..=21"),
        ));
    }
    let cluster_size = 1u64 << cluster_bits;
    let size = be64(&h, 24);
    if size > 1 << 56 {
        return Err(corrupt(path, format!("disk size {size} too large")));
    }
    if be32(&h, 32) != 0 {
        return Err(corrupt(path, "encrypted images are not supported"));
    }
    let l1_size = u64::from(be32(&h, 36));
    let l1_offset = be64(&h, 40);
    let refcount_offset = be64(&h, 48);
    let refcount_clusters = u64::from(be32(&h, 56));
    // Each L2 table maps cluster_size / 8 clusters.
    let per_l1 = cluster_size * (cluster_size / 8);
    if l1_size < size.div_ceil(per_l1) {
        return Err(corrupt(
            path,
            format!("L1 table of {l1_size} entries too small for {size} bytes"),
        ));
    }
    for (what, off, len) in [
        ("L1 table", l1_offset, l1_size * 8),
        (
            "refcount table",
            refcount_offset,
            refcount_clusters * cluster_size,
        ),
    ] {
        if len > 0 && (off == 0 || off % cluster_size != 0 || off.saturating_add(len) > file_len) {
            return Err(corrupt(
                path,
                format!("{what} at {off:#x} (+{len}) is not inside the file or not aligned"),
            ));
        }
    }
    if refcount_clusters == 0 {
        return Err(corrupt(path, "no refcount table"));
    }
    let mut header_len = 72usize;
    if version == 3 {
        if h.len() < 104 {
            return Err(corrupt(path, "version 3 header truncated"));
        }
        let incompat = be64(&h, 72);
        if incompat & INCOMPAT_CORRUPT != 0 {
            return Err(corrupt(path, "the image is marked corrupt"));
        }
        if incompat & INCOMPAT_DATA_FILE != 0 {
            return Err(corrupt(path, "external data files are not supported"));
        }
        if incompat & !INCOMPAT_KNOWN != 0 {
            return Err(corrupt(
                path,
                format!("unsupported incompatible features {incompat:#x}"),
            ));
        }
        header_len = be32(&h, 100) as usize;
        if header_len < 104 || header_len > h.len() {
            return Err(corrupt(path, format!("header length {header_len}")));
        }
    }
    let backing_off = be64(&h, 8) as usize;
    let backing_len = be32(&h, 16) as usize;
    let backing_file = if backing_off == 0 {
        None
    } else {
        if backing_len == 0 || backing_len > 1023 || backing_off + backing_len > h.len() {
            return Err(corrupt(path, "backing file name outside the header"));
        }
        let name = std::str::from_utf8(&h[backing_off..backing_off + backing_len])
            .map_err(|_| corrupt(path, "backing file name is not UTF-8"))?;
        Some(name.to_string())
    };
    // Header extensions: type, length, data padded to 8 bytes.
    let mut backing_format = None;
    let mut off = (header_len + 7) & !7;
    while off + 8 <= h.len() {
        let (kind, len) = (be32(&h, off), be32(&h, off + 4) as usize);
        if kind == 0 {
            break;
        }
        let data = off + 8;
        if data + len > h.len() {
            return Err(corrupt(path, "header extension outside the header"));
        }
        if kind == EXT_BACKING_FORMAT {
            let name = std::str::from_utf8(&h[data..data + len]).unwrap_or("");
            backing_format = Some(
                name.parse()
                    .map_err(|_| corrupt(path, format!("unsupported backing format {name:?}")))?,
            );
        }
        off = data + ((len + 7) & !7);
    }
    Ok(Qcow2Header {
        version,
        cluster_size,
        size,
        backing_file,
        backing_format,
    })
}

/// The format of the image at `path`: qcow2 when it starts with the qcow2
/// magic (and then its header must pass [`read_qcow2_header`]), raw
/// otherwise.
pub fn detect_format(path: &Path) -> Result<ImageFormat, StorageError> {
    let mut file = File::open(path).map_err(|e| io_error(path, "open", e))?;
    if has_qcow2_magic(path, &mut file)? {
        read_qcow2_header(path)?;
        Ok(ImageFormat::Qcow2)
    } else {
        Ok(ImageFormat::Raw)
    }
}

/// Checks that `path` is an image of `format` (or detects it when `None`).
/// A qcow2 header is always checked; asking for qcow2 on a file without
/// the magic is an error. Asking for raw on a qcow2 file is allowed (the
/// guest then sees the qcow2 bytes), as QEMU allows it.
pub fn check_format(path: &Path, format: Option<ImageFormat>) -> Result<ImageFormat, StorageError> {
    match format {
        None => detect_format(path),
        Some(ImageFormat::Raw) => {
            File::open(path).map_err(|e| io_error(path, "open", e))?;
            Ok(ImageFormat::Raw)
        }
        Some(ImageFormat::Qcow2) => {
            read_qcow2_header(path)?;
            Ok(ImageFormat::Qcow2)
        }
    }
}

/// Resolves a backing file name from a qcow2 header against the image's
/// directory (as QEMU does).
pub fn resolve_backing(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        image.parent().unwrap_or(Path::new(".")).join(p)
    }
}

/// Format, virtual size, backing file and host allocation of `path`.
pub fn info(path: &Path) -> Result<ImageInfo, StorageError> {
    let meta = std::fs::metadata(path).map_err(|e| io_error(path, "open", e))?;
    use std::os::unix::fs::MetadataExt;
    let allocated_bytes = meta.blocks() * 512;
    match detect_format(path)? {
        ImageFormat::Raw => Ok(ImageInfo {
            format: ImageFormat::Raw,
            virtual_size: meta.len(),
            backing: None,
            allocated_bytes,
        }),
        ImageFormat::Qcow2 => {
            let h = read_qcow2_header(path)?;
            Ok(ImageInfo {
                format: ImageFormat::Qcow2,
                virtual_size: h.size,
                backing: h.backing_file.as_deref().map(|b| resolve_backing(path, b)),
                allocated_bytes,
            })
        }
    }
}

/// Creates `dst` exclusively (never replacing an existing file).
fn create_new(dst: &Path) -> Result<File, StorageError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(dst)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                StorageError::Exists(dst.display().to_string())
            } else {
                io_error(dst, "create", e)
            }
        })
}

/// Removes `dst` when `result` is an error, so a failed create leaves
/// nothing behind.
fn cleanup_on_error<T>(dst: &Path, result: Result<T, StorageError>) -> Result<T, StorageError> {
    if result.is_err() {
        let _ = std::fs::remove_file(dst);
    }
    result
}

fn qcow2_create(
    dst: &Path,
    size: u64,
    backing: Option<(&Path, ImageFormat)>,
) -> Result<(), StorageError> {
    let file = create_new(dst)?;
    let result = (|| {
        let opts = StorageOpenOptions::new().filename(dst).write(true);
        let storage =
            ImagoFile::from_open_file(file, opts).map_err(|e| io_error(dst, "create", e))?;
        let mut builder = Qcow2::<ImagoFile>::create_builder(storage).size(size);
        if let Some((base, fmt)) = backing {
            builder = builder.backing(base.display().to_string(), fmt.name().to_string());
        }
        builder.create().map_err(|e| io_error(dst, "create", e))?;
        let f = File::open(dst).map_err(|e| io_error(dst, "create", e))?;
        f.sync_all().map_err(|e| io_error(dst, "create", e))
    })();
    cleanup_on_error(dst, result)
}

/// Creates an empty disk of `size` bytes at `dst` (which must not exist):
/// a sparse raw file, or a qcow2 image without a backing file.
pub fn create_blank(dst: &Path, size: u64, format: ImageFormat) -> Result<(), StorageError> {
    match format {
        ImageFormat::Raw => {
            let file = create_new(dst)?;
            let r = file
                .set_len(size)
                .and_then(|_| file.sync_all())
                .map_err(|e| io_error(dst, "create", e));
            cleanup_on_error(dst, r)
        }
        ImageFormat::Qcow2 => qcow2_create(dst, size, None),
    }
}

/// Creates a qcow2 copy-on-write overlay at `dst` (which must not exist)
/// on the image `base`, with the base's virtual size. The overlay records
/// the base's absolute path and format. Only the overlay's metadata is
/// written, so this takes the same time whatever the base's size. Returns
/// the virtual size.
pub fn create_overlay(dst: &Path, base: &Path) -> Result<u64, StorageError> {
    let base = std::fs::canonicalize(base).map_err(|e| io_error(base, "open", e))?;
    let base_info = info(&base)?;
    qcow2_create(dst, base_info.virtual_size, Some((&base, base_info.format)))?;
    Ok(base_info.virtual_size)
}

/// What [`copy_sparse`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// File length.
    pub len: u64,
    /// Bytes of data copied (holes are not).
    pub data_bytes: u64,
}

/// One allocated range of an image, in guest (virtual disk) bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    /// Start offset.
    pub offset: u64,
    /// Length.
    pub len: u64,
    /// The range reads as zeroes without data stored (qcow2 zero clusters).
    pub zero: bool,
}

/// The data ranges of a regular file (`SEEK_DATA`/`SEEK_HOLE`): what a
/// sparse copy has to read. On file systems without hole reporting the
/// whole file is one range.
pub fn data_ranges(file: &File) -> std::io::Result<Vec<(u64, u64)>> {
    let len = file.metadata()?.len();
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: u64 = 0;
    while pos < len {
        // SAFETY: lseek on a file descriptor we own; no memory is touched.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole from pos to the end
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let (data, hole) = (data as u64, (hole as u64).min(len));
        if hole > data {
            out.push((data, hole - data));
        }
        pos = hole;
    }
    Ok(out)
}

/// Copies the file `src` to `dst` (which must not exist) byte for byte,
/// keeping holes: only the data ranges are copied (with
/// `copy_file_range`, which lets the kernel share or clone blocks where the
/// file system can), and the file is extended to its full length. Works for
/// raw and qcow2 files alike (a qcow2 file's unallocated tail is a hole
/// too). On failure (a full disk, say) `dst` is removed and `src` is
/// untouched.
pub fn copy_sparse(src: &Path, dst: &Path) -> Result<CopyStats, StorageError> {
    let input = File::open(src).map_err(|e| io_error(src, "open", e))?;
    let len = input
        .metadata()
        .map_err(|e| io_error(src, "open", e))?
        .len();
    let ranges = data_ranges(&input).map_err(|e| io_error(src, "read", e))?;
    let output = create_new(dst)?;
    let result = (|| {
        let mut stats = CopyStats { len, data_bytes: 0 };
        for (start, rlen) in ranges {
            copy_range(&input, &output, start, rlen).map_err(|e| io_error(dst, "write", e))?;
            stats.data_bytes += rlen;
        }
        output
            .set_len(len)
            .and_then(|_| output.sync_all())
            .map_err(|e| io_error(dst, "write", e))?;
        Ok(stats)
    })();
    cleanup_on_error(dst, result)
}

/// Copies `len` bytes at `off` from `input` to the same offset of `output`,
/// with `copy_file_range`, falling back to read/write where the kernel
/// refuses it (across file systems on old kernels).
fn copy_range(input: &File, output: &File, off: u64, len: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut done = 0u64;
    while done < len {
        let mut in_off = (off + done) as libc::loff_t;
        let mut out_off = in_off;
        let want = (len - done).min(1 << 30) as usize;
        // SAFETY: both fds are open for the duration of the call and the
        // offsets are plain integers the kernel updates.
        let n = unsafe {
            libc::copy_file_range(
                input.as_raw_fd(),
                &mut in_off,
                output.as_raw_fd(),
                &mut out_off,
                want,
                0,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EXDEV)
                | Some(libc::ENOSYS)
                | Some(libc::EOPNOTSUPP)
                | Some(libc::EINVAL) => {
                    let mut buf = vec![0u8; 1 << 20];
                    while done < len {
                        let k = (len - done).min(buf.len() as u64) as usize;
                        input.read_exact_at(&mut buf[..k], off + done)?;
                        output.write_all_at(&buf[..k], off + done)?;
                        done += k as u64;
                    }
                    return Ok(());
                }
                Some(libc::EINTR) => continue,
                _ => return Err(e),
            }
        }
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "source file shrank during the copy",
            ));
        }
        done += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn tmpdir(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("godwit-image-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    #[test]
    fn blank_qcow2_is_detected_and_sized() {
        let d = tmpdir("blank");
        let q = d.join("a.qcow2");
        create_blank(&q, 3 << 30, ImageFormat::Qcow2).unwrap();
        let i = info(&q).unwrap();
        assert_eq!(i.format, ImageFormat::Qcow2);
        assert_eq!(i.virtual_size, 3 << 30);
        assert!(i.backing.is_none());
        let r = d.join("a.raw");
        create_blank(&r, 1 << 20, ImageFormat::Raw).unwrap();
        assert_eq!(detect_format(&r).unwrap(), ImageFormat::Raw);
        assert!(matches!(
            create_blank(&r, 1, ImageFormat::Raw),
            Err(StorageError::Exists(_))
        ));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn overlay_records_base_and_format() {
        let d = tmpdir("overlay");
        let base = d.join("base.raw");
        create_blank(&base, 64 << 20, ImageFormat::Raw).unwrap();
        let top = d.join("top.qcow2");
        assert_eq!(create_overlay(&top, &base).unwrap(), 64 << 20);
        let h = read_qcow2_header(&top).unwrap();
        assert_eq!(h.backing_file.as_deref(), Some(base.to_str().unwrap()));
        assert_eq!(h.backing_format, Some(ImageFormat::Raw));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn corrupt_headers_are_refused_with_a_reason() {
        let d = tmpdir("corrupt");
        let q = d.join("c.qcow2");
        create_blank(&q, 1 << 30, ImageFormat::Qcow2).unwrap();
        let good = std::fs::read(&q).unwrap();
        let cases: Vec<(usize, &[u8], &str)> = vec![
            (4, &[0, 0, 0, 9], "version"),
            (20, &[0, 0, 0, 40], "cluster_bits"),
            (40, &[0, 0, 0, 0, 0, 0, 0, 0x10], "L1 table"),
            (48, &[0xff, 0, 0, 0, 0, 0, 0, 0], "refcount table"),
            (79, &[2], "marked corrupt"),
            (32, &[0, 0, 0, 1], "encrypted"),
        ];
        for (off, bytes, why) in cases {
            let mut b = good.clone();
            b[off..off + bytes.len()].copy_from_slice(bytes);
            std::fs::write(&q, &b).unwrap();
            let e = detect_format(&q).unwrap_err();
            assert!(e.to_string().contains(why), "{why}: {e}");
        }
        std::fs::write(&q, &good[..50]).unwrap();
        assert!(detect_format(&q)
            .unwrap_err()
            .to_string()
            .contains("truncated"));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn sparse_copy_keeps_holes() {
        use std::os::unix::fs::FileExt;
        let d = tmpdir("sparse");
        let src = d.join("s.raw");
        let f = File::create(&src).unwrap();
        f.set_len(256 << 20).unwrap();
        f.write_all_at(&[7u8; 8192], 100 << 20).unwrap();
        f.write_all_at(&[9u8; 4096], 0).unwrap();
        drop(f);
        let dst = d.join("d.raw");
        let st = copy_sparse(&src, &dst).unwrap();
        assert_eq!(st.len, 256 << 20);
        assert!(st.data_bytes < 1 << 20, "{st:?}");
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        use std::os::unix::fs::MetadataExt;
        assert!(std::fs::metadata(&dst).unwrap().blocks() * 512 < 1 << 20);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
