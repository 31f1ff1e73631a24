//! The kernel, initrd and command line a VM boots with: the machine's own,
//! or (`boot.fromImage`, [`Machine::boot_image`]) the newest kernel in the
//! root disk image's `/boot`, found and cached by
//! [`crate::storage::boot_image`], booted with `root=UUID=<root fs>` before
//! the machine's command line.
//!
//! A template image is read from the node's template cache, under the
//! digest that cache already knows (so the boot files are extracted once per
//! node and image); an image used in place is hashed to find its entry.

use std::path::Path;

use godwit_crds::contract::{Machine, MachineDiskSource};
use godwit_crds::ImageFormat;

use super::disks::{cached_template, DiskError};
use super::vm_dir::VmDir;
use crate::storage::boot_image::{BootCache, BootImageError};

/// What a VM boots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Boot {
    /// The kernel file.
    pub kernel: String,
    /// The initrd file, if any.
    pub initrd: Option<String>,
    /// The full command line.
    pub cmdline: String,
}

/// Why the boot files of a VM cannot be found.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The template image could not be brought into the cache.
    #[error(transparent)]
    Template(#[from] DiskError),
    /// The image has no usable `/boot` (the VM's `BootImageInvalid`).
    #[error(transparent)]
    Image(#[from] BootImageError),
}

/// The kernel, initrd and command line of `machine` on this node.
pub fn resolve(dir: &VmDir, machine: &Machine) -> Result<Boot, BootError> {
    let Some(image) = &machine.boot_image else {
        return Ok(Boot {
            kernel: machine.kernel.clone(),
            initrd: machine.initrd.clone(),
            cmdline: machine.cmdline.clone(),
        });
    };
    let cache = BootCache::new(&dir.cache);
    let from_template = machine
        .disks
        .iter()
        .any(|d| matches!(&d.source, MachineDiskSource::Clone { path, .. } if *path == image.path));
    let files = if from_template {
        let t = cached_template(&dir.cache, Path::new(&image.path))?;
        cache.resolve_as(&t.path, t.format, Some(&t.digest), &image.path)?
    } else {
        let format = match image.format {
            ImageFormat::Raw => crate::storage::ImageFormat::Raw,
            ImageFormat::Qcow2 => crate::storage::ImageFormat::Qcow2,
        };
        cache.resolve(Path::new(&image.path), format, None)?
    };
    Ok(Boot {
        kernel: files.kernel.display().to_string(),
        initrd: files.initrd.as_ref().map(|p| p.display().to_string()),
        cmdline: files.cmdline(&machine.cmdline),
    })
}
