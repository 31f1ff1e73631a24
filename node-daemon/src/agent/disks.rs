//! Which disks move with a VM, and the target's side of copying them.
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

use std::path::PathBuf;

use godwit_crds::contract::{Machine, MachineDisk, MachineDiskSource};
use godwit_crds::StorageKind;

use super::local::{provision_disk, LocalError, VmDir};

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
) -> Result<Vec<PathBuf>, LocalError> {
    machine
        .disks
        .iter()
        .map(|disk| {
            if copy && moves_with_vm(disk) {
                // Never receive into a disk left from an earlier stay here:
                // it would hold stale blocks where the source has holes.
                let _ = std::fs::remove_file(dir.disk_path(&disk.name, disk.storage, format(disk)));
                return provision_disk(dir, disk);
            }
            Ok(match &disk.source {
                MachineDiskSource::Image { path, .. } => PathBuf::from(path),
                _ => dir.disk_path(&disk.name, disk.storage, format(disk)),
            })
        })
        .collect()
}

fn format(disk: &MachineDisk) -> godwit_crds::ImageFormat {
    match &disk.source {
        MachineDiskSource::Clone { format, .. } => *format,
        _ => godwit_crds::ImageFormat::Raw,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(storage: StorageKind, read_only: bool, source: MachineDiskSource) -> MachineDisk {
        MachineDisk {
            name: "d".into(),
            source,
            storage,
            read_only,
        }
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
