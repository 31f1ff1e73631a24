//! Booting a distribution image's own kernel (`boot: {fromImage: {}}`): the
//! kernel and initrd are read out of the image's `/boot`, cached on the node
//! by the image's digest, and booted with `root=UUID=<root filesystem>`.
//! This is what users do by hand for Firecracker, and what
//! `virt-builder --get-kernel` does.
//!
//! How the image is read: through [`DiskImage`] (raw, or qcow2 with its
//! backing chain), never mounted, no loop device. Sector 0 says what the
//! disk holds ([`partition`]): a GPT behind its protective MBR, an MBR
//! (logical partitions too), or no table at all and a filesystem on the
//! whole disk. Each partition's filesystem is recognised by its signature
//! ([`fs::probe`]); ext2/3/4 ones are opened with the `ext4-view` crate.
//! Other filesystems (xfs, btrfs, ...) are not read: an image whose `/boot`
//! lives on one of them gets an error that says so.
//!
//! Which filesystem is which (in partition order, first match wins):
//! - the **boot filesystem** is the first ext filesystem with a `/boot`
//!   directory that holds `vmlinuz-*` files, or else the first one with
//!   `vmlinuz-*` files at its top (a separate `/boot` partition, whose
//!   mount point on the root filesystem is empty);
//! - the **root filesystem** (`root=UUID=`) is the first ext filesystem
//!   with an `/etc` directory; an image without one has its root where the
//!   `/boot` directory is.
//!
//! The kernel is the newest `vmlinuz-<version>` in version order
//! ([`fs::version_cmp`], so `6.1.0-13` beats `6.1.0-9`); its initrd is
//! `initrd.img-<version>`, `initramfs-<version>.img` or
//! `initrd-<version>` next to it, and none is fine.
//!
//! The cache: `<images>/boot/sha256-<image digest>/` holds the kernel and
//! initrd under their names in the image, and `boot.json` (what was chosen,
//! and the root UUID). It is built in a temporary directory beside it and
//! renamed into place, so a directory with that name is always complete;
//! two agents' threads racing for the same image both succeed and one copy
//! stays. The image's digest is the template cache's (a template image is
//! cached there anyway), or computed from the file for an image used in
//! place.

pub mod fs;
pub mod partition;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use ext4_view::{Ext4, Ext4Error};
use serde::{Deserialize, Serialize};

use super::{DiskImage, ImageFormat, StorageError};
use fs::FsKind;
use partition::{Partition, ReadDisk};

/// Why an image's own kernel cannot be booted.
#[derive(Debug, thiserror::Error)]
pub enum BootImageError {
    /// The image could not be opened.
    #[error("Cannot open the image {0} to read its /boot")]
    Open(String, #[source] StorageError),
    /// Reading the virtual disk failed.
    #[error("Cannot read the image {0}")]
    Read(String, #[source] std::io::Error),
    /// Sector 0 is a protective MBR but no GPT could be read.
    #[error(
        "The image {0} has a damaged partition table; repair it (sgdisk -v) or set boot.kernel"
    )]
    Table(String, #[source] std::io::Error),
    /// Neither a partition table nor a filesystem.
    #[error("The image {0} has no partition table (GPT or MBR) and no filesystem; fromImage needs a disk image whose /boot is on an ext2/3/4 filesystem, or set boot.kernel")]
    NoFilesystem(String),
    /// Partitions, but none is ext2/3/4.
    #[error("The image {image} has no ext2/3/4 filesystem ({found}); fromImage reads /boot from ext2/3/4 only (xfs, btrfs, vfat and others are not supported): set boot.kernel and boot.initrd to files on the node instead")]
    Unsupported {
        /// The image.
        image: String,
        /// What each partition holds.
        found: String,
    },
    /// No ext filesystem has a `/boot` or kernels at its top.
    #[error("The image {image} has no /boot: none of its ext2/3/4 filesystems ({found}) holds a /boot directory or vmlinuz-* files; install a kernel in the image or set boot.kernel")]
    NoBoot {
        /// The image.
        image: String,
        /// What each partition holds.
        found: String,
    },
    /// A `/boot` without kernels.
    #[error("The image {image} has no kernel: /boot on {location} holds no vmlinuz-<version> file; install a kernel in the image or set boot.kernel")]
    NoKernel {
        /// The image.
        image: String,
        /// Where the empty `/boot` is.
        location: String,
    },
    /// Kernels on a separate boot partition, and no root filesystem.
    #[error("The image {0} has kernels on a boot partition but no root filesystem (no ext2/3/4 filesystem holds /etc); fromImage cannot say root=UUID=: set boot.kernel and a root= in boot.cmdline")]
    NoRoot(String),
    /// An ext filesystem could not be read.
    #[error("Cannot read the ext2/3/4 filesystem on {location} of the image {image}")]
    Ext4 {
        /// The image.
        image: String,
        /// Which partition.
        location: String,
        /// What ext4-view said (an unsupported feature, corruption, I/O).
        source: Ext4Error,
    },
    /// The image's digest could not be computed.
    #[error("Cannot hash the image {0}")]
    Digest(String, #[source] StorageError),
    /// The cache could not be written or read.
    #[error("Cannot write the boot cache {0}; check the node's state directory")]
    Cache(String, #[source] std::io::Error),
}

/// A kernel and initrd taken from an image, in the node's boot cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootFiles {
    /// The kernel.
    pub kernel: PathBuf,
    /// Its initrd, when the image has one.
    pub initrd: Option<PathBuf>,
    /// The kernel's version (`6.1.0-13-amd64`).
    pub version: String,
    /// UUID of the root filesystem, for `root=UUID=`.
    pub root_uuid: String,
    /// Whether they came from the cache rather than from the image just now.
    pub cached: bool,
}

impl BootFiles {
    /// The kernel command line: `root=UUID=<uuid>`, then `rest`.
    pub fn cmdline(&self, rest: &str) -> String {
        let rest = rest.trim();
        if rest.is_empty() {
            format!("root=UUID={}", self.root_uuid)
        } else {
            format!("root=UUID={} {rest}", self.root_uuid)
        }
    }
}

/// What `boot.json` in a cache entry says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    version: String,
    kernel: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    initrd: Option<String>,
    root_uuid: String,
    /// Where the kernel was found (`partition 2: /boot`), for people.
    found_on: String,
}

const MANIFEST: &str = "boot.json";

/// The boot cache of a node: `<images>/boot/`.
#[derive(Clone, Debug)]
pub struct BootCache {
    dir: PathBuf,
}

impl BootCache {
    /// The boot cache under the template cache directory `images_dir`.
    pub fn new(images_dir: &Path) -> BootCache {
        BootCache {
            dir: images_dir.join("boot"),
        }
    }

    /// Where the entry of the image with sha256 `digest` (hex) lives.
    pub fn entry_dir(&self, digest: &str) -> PathBuf {
        self.dir.join(format!("sha256-{digest}"))
    }

    /// The cached boot files of the image with sha256 `digest` (hex), if any.
    pub fn get(&self, digest: &str) -> Option<BootFiles> {
        let dir = self.entry_dir(digest);
        let m: Manifest = serde_json::from_slice(&std::fs::read(dir.join(MANIFEST)).ok()?).ok()?;
        let files = BootFiles {
            kernel: dir.join(&m.kernel),
            initrd: m.initrd.as_ref().map(|i| dir.join(i)),
            version: m.version,
            root_uuid: m.root_uuid,
            cached: true,
        };
        let complete = files.kernel.is_file() && files.initrd.as_ref().is_none_or(|i| i.is_file());
        complete.then_some(files)
    }

    /// The kernel and initrd of `image` (`format`), from the cache or read
    /// out of the image into it. `digest` is the image's sha256 (hex, or
    /// `sha256:<hex>`) when known; otherwise the file is hashed.
    pub fn resolve(
        &self,
        image: &Path,
        format: ImageFormat,
        digest: Option<&str>,
    ) -> Result<BootFiles, BootImageError> {
        self.resolve_as(image, format, digest, &image.display().to_string())
    }

    /// [`BootCache::resolve`], naming the image `name` in errors (the
    /// template's source rather than its copy in the template cache).
    pub fn resolve_as(
        &self,
        image: &Path,
        format: ImageFormat,
        digest: Option<&str>,
        name: &str,
    ) -> Result<BootFiles, BootImageError> {
        let name = name.to_string();
        let digest = match digest {
            Some(d) => super::template::parse_digest(d)
                .map_err(|e| BootImageError::Digest(name.clone(), e))?,
            None => super::template::sha256_file(image)
                .map_err(|e| BootImageError::Digest(name.clone(), e))?,
        };
        if let Some(files) = self.get(&digest) {
            return Ok(files);
        }
        let disk = DiskImage::open(image, Some(format), true, false)
            .map_err(|e| BootImageError::Open(name.clone(), e))?;
        let found = find(Rc::new(disk), &name)?;
        self.store(&digest, &found, &name)?;
        let mut files = self.get(&digest).ok_or_else(|| {
            BootImageError::Cache(
                self.entry_dir(&digest).display().to_string(),
                std::io::ErrorKind::NotFound.into(),
            )
        })?;
        files.cached = false;
        Ok(files)
    }

    /// Extracts `found` into a temporary directory and renames it into place.
    fn store(&self, digest: &str, found: &Found, image: &str) -> Result<(), BootImageError> {
        let final_dir = self.entry_dir(digest);
        let cache_err = |p: &Path| {
            let p = p.display().to_string();
            move |e| BootImageError::Cache(p, e)
        };
        std::fs::create_dir_all(&self.dir).map_err(cache_err(&self.dir))?;
        let tmp = self.dir.join(format!(
            ".tmp-sha256-{digest}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir(&tmp).map_err(cache_err(&tmp))?;
        let result = (|| {
            let kernel_name = format!("vmlinuz-{}", found.version);
            extract(
                found,
                &format!("{}/{kernel_name}", found.boot_dir),
                &tmp.join(&kernel_name),
                image,
            )?;
            if let Some(initrd) = &found.initrd {
                extract(
                    found,
                    &format!("{}/{initrd}", found.boot_dir),
                    &tmp.join(initrd),
                    image,
                )?;
            }
            let manifest = Manifest {
                version: found.version.clone(),
                kernel: kernel_name,
                initrd: found.initrd.clone(),
                root_uuid: found.root_uuid.clone(),
                found_on: format!("{}: {}", found.boot_location, found.boot_dir),
            };
            let path = tmp.join(MANIFEST);
            write_synced(&path, &serde_json::to_vec_pretty(&manifest).expect("JSON"))
                .map_err(cache_err(&path))?;
            match std::fs::rename(&tmp, &final_dir) {
                Ok(()) => Ok(()),
                // Another thread put the same entry in place first.
                Err(_) if self.get(digest).is_some() => Ok(()),
                Err(e) => Err(BootImageError::Cache(final_dir.display().to_string(), e)),
            }
        })();
        let _ = std::fs::remove_dir_all(&tmp);
        result
    }
}

fn write_synced(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::File::create(path)?;
    f.write_all(data)?;
    f.sync_all()
}

/// Copies file `src` of the boot filesystem to `dst`.
fn extract(found: &Found, src: &str, dst: &Path, image: &str) -> Result<(), BootImageError> {
    let ext_err = |source| BootImageError::Ext4 {
        image: image.to_string(),
        location: found.boot_location.clone(),
        source,
    };
    let cache_err = |e| BootImageError::Cache(dst.display().to_string(), e);
    let mut file = found.boot_fs.open(src).map_err(ext_err)?;
    let mut out = std::fs::File::create(dst).map_err(cache_err)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read_bytes(&mut buf).map_err(ext_err)?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n]).map_err(cache_err)?;
    }
    out.sync_all().map_err(cache_err)
}

/// What [`find`] chose in an image.
pub struct Found {
    boot_fs: Ext4,
    /// `partition 2` or `the whole disk`.
    boot_location: String,
    /// `/boot`, or `` for a separate boot partition's top.
    boot_dir: String,
    version: String,
    initrd: Option<String>,
    root_uuid: String,
}

impl Found {
    /// The kernel's version.
    pub fn version(&self) -> &str {
        &self.version
    }
    /// The initrd's file name, if any.
    pub fn initrd(&self) -> Option<&str> {
        self.initrd.as_deref()
    }
    /// The root filesystem's UUID.
    pub fn root_uuid(&self) -> &str {
        &self.root_uuid
    }
}

fn location(p: Option<&Partition>) -> String {
    match p {
        Some(p) => format!("partition {}", p.number),
        None => "the whole disk".to_string(),
    }
}

/// Finds the kernel, initrd and root filesystem in the disk (see the module
/// docs for the rules). `name` names the image in errors.
pub fn find<D: ReadDisk + 'static>(disk: Rc<D>, name: &str) -> Result<Found, BootImageError> {
    let read_err = |e| BootImageError::Read(name.to_string(), e);
    // A FAT boot sector carries the MBR signature too: a FAT volume on the
    // whole disk is not a partition table.
    let mut sector0 = [0u8; 512];
    if disk.size() >= 512 {
        disk.read_at(&mut sector0, 0).map_err(read_err)?;
    }
    let table = if fs::is_fat_boot_sector(&sector0) {
        None
    } else {
        partition::read_table(&*disk).map_err(|e| BootImageError::Table(name.to_string(), e))?
    };
    let regions: Vec<Option<Partition>> = match &table {
        Some((_, parts)) => parts.iter().cloned().map(Some).collect(),
        None => vec![None],
    };
    let mut found_desc = Vec::new();
    let mut exts: Vec<(Option<Partition>, Ext4)> = Vec::new();
    for region in regions {
        let (start, size) = region
            .as_ref()
            .map_or((0, disk.size()), |p| (p.start, p.size));
        let kind = fs::probe(&*disk, start, size).map_err(read_err)?;
        found_desc.push(format!("{}: {}", location(region.as_ref()), kind.name()));
        if kind == FsKind::Ext {
            let ext =
                fs::open_ext(disk.clone(), start, size).map_err(|source| BootImageError::Ext4 {
                    image: name.to_string(),
                    location: location(region.as_ref()),
                    source,
                })?;
            exts.push((region, ext));
        }
    }
    let found = found_desc.join(", ");
    if exts.is_empty() {
        return Err(match (&table, found_desc.len()) {
            (None, _)
                if found_desc
                    .iter()
                    .all(|d| d.ends_with(FsKind::Unknown.name())) =>
            {
                BootImageError::NoFilesystem(name.to_string())
            }
            (Some(_), 0) => BootImageError::Unsupported {
                image: name.to_string(),
                found: "an empty partition table".into(),
            },
            _ => BootImageError::Unsupported {
                image: name.to_string(),
                found,
            },
        });
    }
    let ext_err = |region: &Option<Partition>| {
        let location = location(region.as_ref());
        let image = name.to_string();
        move |source| BootImageError::Ext4 {
            image,
            location,
            source,
        }
    };
    // The boot filesystem: a /boot directory with kernels, else kernels at
    // a filesystem's top; an empty /boot is remembered for the error.
    let mut empty_boot = None;
    let mut boot = None;
    for (i, (region, ext)) in exts.iter().enumerate() {
        if fs::is_dir(ext, "/boot").map_err(ext_err(region))? {
            let versions = fs::kernel_versions(ext, "/boot").map_err(ext_err(region))?;
            if !versions.is_empty() {
                boot = Some((i, "/boot", versions));
                break;
            }
            empty_boot.get_or_insert(i);
        }
    }
    if boot.is_none() {
        for (i, (region, ext)) in exts.iter().enumerate() {
            let versions = fs::kernel_versions(ext, "/").map_err(ext_err(region))?;
            if !versions.is_empty() {
                boot = Some((i, "", versions));
                break;
            }
        }
    }
    let Some((boot_index, boot_dir, versions)) = boot else {
        return Err(match empty_boot {
            Some(i) => BootImageError::NoKernel {
                image: name.to_string(),
                location: location(exts[i].0.as_ref()),
            },
            None => BootImageError::NoBoot {
                image: name.to_string(),
                found,
            },
        });
    };
    let version = versions
        .into_iter()
        .max_by(|a, b| fs::version_cmp(a, b))
        .expect("at least one kernel");
    let (boot_region, _) = &exts[boot_index];
    let mut initrd = None;
    for candidate in fs::initrd_names(&version) {
        let path = format!("{boot_dir}/{candidate}");
        match exts[boot_index].1.metadata(path.as_str()) {
            Ok(m) if !m.is_dir() => {
                initrd = Some(candidate);
                break;
            }
            Ok(_) | Err(Ext4Error::NotFound) => {}
            Err(e) => return Err(ext_err(boot_region)(e)),
        }
    }
    // The root filesystem: the first with /etc; else where /boot is a
    // directory (a separate boot partition is never the root).
    let mut root = None;
    for (i, (region, ext)) in exts.iter().enumerate() {
        if fs::is_dir(ext, "/etc").map_err(ext_err(region))? {
            root = Some(i);
            break;
        }
    }
    let root = match root {
        Some(i) => i,
        None if !boot_dir.is_empty() => boot_index,
        None => return Err(BootImageError::NoRoot(name.to_string())),
    };
    let boot_location = location(boot_region.as_ref());
    let (_, root_fs) = &exts[root];
    let root_uuid = root_fs.uuid().to_string();
    let boot_fs = exts.swap_remove(boot_index).1;
    Ok(Found {
        boot_fs,
        boot_location,
        boot_dir: boot_dir.to_string(),
        version,
        initrd,
        root_uuid,
    })
}
