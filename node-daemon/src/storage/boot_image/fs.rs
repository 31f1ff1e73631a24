//! Filesystems on a partition (or the whole disk): which kind each one is,
//! by the signatures `blkid` also reads, and the ext2/3/4 ones opened with
//! the `ext4-view` crate (read-only, no mounting, no loop device). Also the
//! kernel names of a `/boot` and their version order.

use std::cmp::Ordering;
use std::io;
use std::rc::Rc;

use ext4_view::{Ext4, Ext4Error, Ext4Read};

use super::partition::ReadDisk;

/// What a partition holds, as far as fromImage cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsKind {
    /// ext2, ext3 or ext4: readable.
    Ext,
    /// FAT (an EFI system partition, say).
    Vfat,
    /// XFS.
    Xfs,
    /// Btrfs.
    Btrfs,
    /// Linux swap.
    Swap,
    /// A LUKS encrypted volume.
    Luks,
    /// An LVM physical volume.
    LvmPv,
    /// SquashFS.
    Squashfs,
    /// ISO 9660.
    Iso9660,
    /// Nothing we recognise (a BIOS boot partition, unformatted space).
    Unknown,
}

impl FsKind {
    /// The name `blkid` gives it.
    pub fn name(self) -> &'static str {
        match self {
            FsKind::Ext => "ext2/3/4",
            FsKind::Vfat => "vfat",
            FsKind::Xfs => "xfs",
            FsKind::Btrfs => "btrfs",
            FsKind::Swap => "swap",
            FsKind::Luks => "crypto_LUKS",
            FsKind::LvmPv => "LVM2_member",
            FsKind::Squashfs => "squashfs",
            FsKind::Iso9660 => "iso9660",
            FsKind::Unknown => "no filesystem we recognise",
        }
    }
}

/// Reads `len` bytes at `at` of a region, or `None` past its end.
fn bytes(
    disk: &dyn ReadDisk,
    start: u64,
    size: u64,
    at: u64,
    len: usize,
) -> io::Result<Option<Vec<u8>>> {
    if at + len as u64 > size {
        return Ok(None);
    }
    let mut b = vec![0u8; len];
    disk.read_at(&mut b, start + at)?;
    Ok(Some(b))
}

/// Whether a boot sector is a FAT volume's: a jump instruction, the boot
/// signature and the FAT type string of FAT12/16 or FAT32.
pub fn is_fat_boot_sector(s: &[u8]) -> bool {
    s.len() >= 512
        && (s[0] == 0xeb || s[0] == 0xe9)
        && s[510..512] == [0x55, 0xaa]
        && (s[0x36..0x39] == *b"FAT" || s[0x52..0x57] == *b"FAT32")
}

/// The kind of filesystem in `size` bytes at `start` of the disk.
pub fn probe(disk: &dyn ReadDisk, start: u64, size: u64) -> io::Result<FsKind> {
    let Some(head) = bytes(disk, start, size, 0, 4096)? else {
        return Ok(FsKind::Unknown);
    };
    if head[1080..1082] == [0x53, 0xef] {
        return Ok(FsKind::Ext);
    }
    if head[0..4] == *b"XFSB" {
        return Ok(FsKind::Xfs);
    }
    if head[0..6] == *b"LUKS\xba\xbe" {
        return Ok(FsKind::Luks);
    }
    if head[0..4] == *b"hsqs" {
        return Ok(FsKind::Squashfs);
    }
    if head[512..520] == *b"LABELONE" {
        return Ok(FsKind::LvmPv);
    }
    if head[4086..4096] == *b"SWAPSPACE2" || head[4086..4096] == *b"SWAP-SPACE" {
        return Ok(FsKind::Swap);
    }
    if is_fat_boot_sector(&head[..512]) {
        return Ok(FsKind::Vfat);
    }
    if let Some(b) = bytes(disk, start, size, 0x10040, 8)? {
        if b == *b"_BHRfS_M" {
            return Ok(FsKind::Btrfs);
        }
    }
    if let Some(b) = bytes(disk, start, size, 0x8001, 5)? {
        if b == *b"CD001" {
            return Ok(FsKind::Iso9660);
        }
    }
    Ok(FsKind::Unknown)
}

/// A region of the disk as `ext4-view` reads it.
struct Region<D: ReadDisk + ?Sized> {
    disk: Rc<D>,
    start: u64,
    size: u64,
}

impl<D: ReadDisk + ?Sized> Ext4Read for Region<D> {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        if start_byte.saturating_add(dst.len() as u64) > self.size {
            return Err(Box::new(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "read of {} bytes at {start_byte} past the filesystem's end ({} bytes)",
                    dst.len(),
                    self.size
                ),
            )));
        }
        self.disk.read_at(dst, self.start + start_byte)?;
        Ok(())
    }
}

/// Opens the ext2/3/4 filesystem in `size` bytes at `start`.
pub fn open_ext<D: ReadDisk + ?Sized + 'static>(
    disk: Rc<D>,
    start: u64,
    size: u64,
) -> Result<Ext4, Ext4Error> {
    Ext4::load(Box::new(Region { disk, start, size }))
}

/// Whether `path` is a directory on `fs` (symlinks followed).
pub fn is_dir(fs: &Ext4, path: &str) -> Result<bool, Ext4Error> {
    match fs.metadata(path) {
        Ok(m) => Ok(m.is_dir()),
        Err(Ext4Error::NotFound) | Err(Ext4Error::NotADirectory) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The versions of the `vmlinuz-<version>` regular files in directory `dir`.
pub fn kernel_versions(fs: &Ext4, dir: &str) -> Result<Vec<String>, Ext4Error> {
    let mut out = Vec::new();
    for entry in fs.read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Ok(name) = name.as_str() else {
            continue;
        };
        let Some(version) = name.strip_prefix("vmlinuz-") else {
            continue;
        };
        if version.is_empty() || !entry.file_type()?.is_regular_file() {
            continue;
        }
        out.push(version.to_string());
    }
    Ok(out)
}

/// The names an initrd of kernel `version` has (Debian/Ubuntu, then
/// Fedora/RHEL/Arch, then SUSE).
pub fn initrd_names(version: &str) -> [String; 3] {
    [
        format!("initrd.img-{version}"),
        format!("initramfs-{version}.img"),
        format!("initrd-{version}"),
    ]
}

/// Compares two kernel versions the way `sort -V` does: runs of digits by
/// their value, everything else byte by byte (so `6.1.0-13` is newer than
/// `6.1.0-9`, and `6.10` newer than `6.9`).
pub fn version_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let da = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let db = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (na, nb) = (trim_zeros(&a[..da]), trim_zeros(&b[..db]));
                let o = na.len().cmp(&nb.len()).then_with(|| na.cmp(nb));
                if o != Ordering::Equal {
                    return o;
                }
                a = &a[da..];
                b = &b[db..];
            }
            (Some(x), Some(y)) => {
                // A digit run sorts after a separator (`6.1.0-9` vs `6.1.0a`):
                // plain byte order, as sort -V does for non-digits.
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

fn trim_zeros(d: &[u8]) -> &[u8] {
    let n = d.iter().take_while(|c| **c == b'0').count();
    &d[n..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_order_by_number_not_by_string() {
        let mut v = vec![
            "6.1.0-9-amd64",
            "6.1.0-13-amd64",
            "5.10.0-26-amd64",
            "6.10.2-1",
            "6.9.12-3",
            "0-rescue-4c3f1e",
        ];
        v.sort_by(|a, b| version_cmp(a, b));
        assert_eq!(
            v,
            [
                "0-rescue-4c3f1e",
                "5.10.0-26-amd64",
                "6.1.0-9-amd64",
                "6.1.0-13-amd64",
                "6.9.12-3",
                "6.10.2-1"
            ]
        );
        assert_eq!(version_cmp("6.1.0-13", "6.1.0-13"), Ordering::Equal);
        assert_eq!(version_cmp("6.1.0-013", "6.1.0-13"), Ordering::Equal);
        assert_eq!(version_cmp("6.1", "6.1.0"), Ordering::Less);
    }

    #[test]
    fn probes_signatures() {
        let mut d = vec![0u8; 128 * 1024];
        assert_eq!(probe(&d, 0, d.len() as u64).unwrap(), FsKind::Unknown);
        d[0..4].copy_from_slice(b"XFSB");
        assert_eq!(probe(&d, 0, d.len() as u64).unwrap(), FsKind::Xfs);
        d[0..4].fill(0);
        d[0x10040..0x10048].copy_from_slice(b"_BHRfS_M");
        assert_eq!(probe(&d, 0, d.len() as u64).unwrap(), FsKind::Btrfs);
        d[1080] = 0x53;
        d[1081] = 0xef;
        assert_eq!(probe(&d, 0, d.len() as u64).unwrap(), FsKind::Ext);
        // A region too small for the btrfs superblock is not btrfs.
        let small = vec![0u8; 8192];
        assert_eq!(probe(&small, 0, 8192).unwrap(), FsKind::Unknown);
    }
}
