//! Node-local storage: what a VM's disks are made of on a node.
//!
//! - [`image`]: the raw and qcow2 formats, format detection with a strict
//!   qcow2 header check, blank images, copy-on-write overlays, sparse
//!   copies (and why qcow2 goes through the imago crate).
//! - [`disk`]: an open image as the virtio-blk device uses it (reads and
//!   writes on the virtual disk, flush, allocated extents).
//! - [`copy`]: what a copy of an image to another node sends (which
//!   template base an overlay sits on, which ranges are allocated); live
//!   and cold storage migration both use it.
//! - [`lock`]: image locks, the split-brain guard for shared storage,
//!   removal of an image only when no VMM holds it, and
//!   the lock hand-over order at live migration.
//! - [`cbt`]: changed-block tracking at a fixed 64 KiB granularity.
//! - [`template`]: the per-node template cache (local files and http(s)
//!   downloads, sha256-verified, resumable) and provisioning from it.
//! - [`boot_image`]: a disk image's own kernel and initrd (`boot.fromImage`),
//!   read from its partitions' ext2/3/4 `/boot` and cached by its digest.
//! - [`config_disk`]: the customization config disk and its format.
//!
//! What the node agent calls:
//!
//! ```no_run
//! use godwit_node::storage::{self, Customization, ImageFormat, TemplateCache};
//! # fn main() -> Result<(), storage::StorageError> {
//! let cache = TemplateCache::new("/var/lib/godwit/templates")?;
//! let base = cache.fetch("https://example.org/debian.raw", Some("sha256:…"), &mut |_| {})?;
//! storage::provision(&base, "/var/lib/godwit/vms/vm1/root.qcow2".as_ref())?;
//! storage::blank(10 << 30, ImageFormat::Qcow2, "/var/lib/godwit/vms/vm1/data.qcow2".as_ref())?;
//! storage::config_disk(&Customization::default(), "/var/lib/godwit/vms/vm1/config.img".as_ref())?;
//! storage::remove("/var/lib/godwit/vms/vm1/root.qcow2".as_ref())?;
//! # Ok(()) }
//! ```
//!
//! Every image we write passes `qemu-img check`; the integration tests
//! (`node-daemon/tests/storage.rs`) use `qemu-img compare` as the oracle.

pub mod boot_image;
pub mod cbt;
pub mod config_disk;
pub mod copy;
pub mod disk;
pub mod image;
pub mod lock;
pub mod template;

use std::path::Path;

pub use cbt::{ChangedBlocks, DirtyBlocks, CBT_BLOCK};
pub use config_disk::{config_disk, Customization};
pub use disk::DiskImage;
pub use image::{ImageFormat, ImageInfo};
pub use lock::{remove, ImageLock, LockMode};
pub use template::{provision, CachedTemplate, Progress, TemplateCache};

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A file could not be opened.
    #[error("Cannot open {0}; check that the file exists and is readable")]
    Open(String, #[source] std::io::Error),
    /// A file could not be created.
    #[error("Cannot create {0}; check the directory exists and is writable")]
    Create(String, #[source] std::io::Error),
    /// A read failed.
    #[error("Cannot read {0}")]
    Read(String, #[source] std::io::Error),
    /// A write failed.
    #[error("Cannot write {0}")]
    Write(String, #[source] std::io::Error),
    /// The file system is full (or a size or quota limit was hit).
    #[error("No space left for {0}; free space on its file system (nothing partial was kept)")]
    NoSpace(String, #[source] std::io::Error),
    /// The target exists.
    #[error("{0} already exists; remove it first or choose another path")]
    Exists(String),
    /// The qcow2 header is corrupt or uses features we refuse.
    #[error("Disk image {0} is not a usable qcow2 image: {1}; check it with qemu-img check, or restore it from its template")]
    CorruptQcow2(String, String),
    /// imago could not open a qcow2 image whose header looked right.
    #[error("Cannot open qcow2 image {0}; check it with qemu-img check")]
    Qcow2Open(String, #[source] std::io::Error),
    /// A backing image could not be opened.
    #[error("Backing image {backing} of {image} cannot be used")]
    Backing {
        /// The overlay.
        image: String,
        /// Its backing image.
        backing: String,
        /// Why.
        #[source]
        source: Box<StorageError>,
    },
    /// Another process holds a conflicting lock.
    #[error("Disk image {path} is locked by {holder}; a disk is used read-write by one VM at a time: stop that VM first (or, for HA, make sure it is dead)")]
    Locked {
        /// The image.
        path: String,
        /// Who holds it, as far as this node can tell.
        holder: String,
    },
    /// Locking failed for another reason (e.g. the file system has no locks).
    #[error("Cannot lock disk image {0}; the file system must support POSIX (OFD) locks")]
    Lock(String, #[source] std::io::Error),
    /// The template source is neither a path nor an http(s) URL.
    #[error("Unsupported template source {0}; use a local path or an http:// or https:// URL")]
    BadSource(String),
    /// The digest is not a sha256 digest.
    #[error("Bad sha256 digest {0:?}; give 64 hex digits, optionally prefixed with sha256:")]
    BadDigest(String),
    /// The download failed.
    #[error("Cannot download template {0}; check the URL and the node's network (a partial download is kept to resume)")]
    Download(String, #[source] Box<ureq::Error>),
    /// The server answered with an error status.
    #[error("Template URL {0} answered HTTP {1}; check the URL")]
    HttpStatus(String, u16),
    /// The image's sha256 is not the expected one.
    #[error("Template {source_name} has sha256:{actual}, expected sha256:{expected}; the image is corrupt or the template's digest is wrong (nothing was cached)")]
    ChecksumMismatch {
        /// URL or path.
        source_name: String,
        /// Expected digest (hex).
        expected: String,
        /// Digest found (hex).
        actual: String,
    },
    /// A template image must stand alone.
    #[error("Template image {0} is a qcow2 overlay with a backing file; templates must be self-contained (flatten it with qemu-img convert)")]
    TemplateHasBacking(String),
    /// The customization cannot be written.
    #[error("Invalid customization: {0}")]
    Customization(String),
}

/// Classifies an I/O error of operation `op` ("open", "create", "read",
/// "write") on `path`; a full disk, a file size limit and a quota become
/// [`StorageError::NoSpace`].
pub(crate) fn io_error(path: &Path, op: &str, e: std::io::Error) -> StorageError {
    let p = path.display().to_string();
    if matches!(
        e.raw_os_error(),
        Some(libc::ENOSPC) | Some(libc::EFBIG) | Some(libc::EDQUOT)
    ) {
        return StorageError::NoSpace(p, e);
    }
    match op {
        "open" => StorageError::Open(p, e),
        "create" => StorageError::Create(p, e),
        "read" => StorageError::Read(p, e),
        _ => StorageError::Write(p, e),
    }
}

/// Creates an empty disk of `size` bytes at `dst` (which must not exist):
/// a sparse raw file or a qcow2 image. Nothing is left behind on failure.
pub fn blank(size: u64, format: ImageFormat, dst: &Path) -> Result<(), StorageError> {
    image::create_blank(dst, size, format)
}
