//! A small read-only FAT12/16/32 reader, enough to read a cloud-init NoCloud
//! seed the way cloud-init finds it: the volume label, and files of the root
//! directory by their long (VFAT) names.
//!
//! It reads 512-byte sectors through [`Sectors`] (a virtio-blk device in the
//! guest, a file in the host-side tests) and understands:
//! - the BIOS parameter block of all three FAT types (the type follows from
//!   the cluster count, as the specification says, not from the label text);
//! - the volume label from the root directory's volume-id entry, else the
//!   boot sector's;
//! - long-name entries (UCS-2, checksum-checked against their short entry),
//!   and 8.3 short names as a fallback;
//! - cluster chains through the FAT (12-bit entries may straddle sectors).
//!
//! Only 512-byte logical sectors (what `mkfs.fat`, the `fatfs` crate and
//! `cloud-localds` write) and the root directory; nothing is ever written.

use alloc::string::String;
use alloc::vec::Vec;

/// Sector size this reader supports.
pub const SECTOR: usize = 512;
/// Most bytes [`Fat::read`] returns.
pub const MAX_FILE: usize = 256 * 1024;

/// A device of 512-byte sectors.
pub trait Sectors {
    /// Reads sector `lba` into `buf`; false on an I/O error.
    fn read(&mut self, lba: u64, buf: &mut [u8; SECTOR]) -> bool;
}

/// The three FAT entry widths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FatType {
    Fat12,
    Fat16,
    Fat32,
}

/// A FAT volume's layout, from its boot sector.
#[derive(Clone, Debug)]
pub struct Fat {
    pub kind: FatType,
    sectors_per_cluster: u64,
    fat_start: u64,
    /// FAT12/16: first sector and entry count of the fixed root directory.
    root_start: u64,
    root_entries: u64,
    /// FAT32: first cluster of the root directory.
    root_cluster: u32,
    data_start: u64,
    clusters: u32,
    bpb_label: [u8; 11],
}

/// A root directory entry: its name (long if it has one) and where its data is.
#[derive(Clone, Debug)]
pub struct Entry {
    pub name: String,
    pub first_cluster: u32,
    pub size: u32,
    pub is_dir: bool,
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The checksum of an 8.3 name that its long-name entries carry.
fn short_checksum(name: &[u8]) -> u8 {
    name.iter()
        .fold(0u8, |sum, &c| sum.rotate_right(1).wrapping_add(c))
}

/// `NAME    EXT` as `name.ext` (lower case, as Linux shows short names).
fn short_name(raw: &[u8]) -> String {
    let mut s = String::new();
    for &c in raw[..8].iter().take_while(|&&c| c != b' ') {
        s.push(c.to_ascii_lowercase() as char);
    }
    if raw[8] != b' ' {
        s.push('.');
        for &c in raw[8..11].iter().take_while(|&&c| c != b' ') {
            s.push(c.to_ascii_lowercase() as char);
        }
    }
    s
}

/// Long-name characters of one LFN entry, at their offsets.
const LFN_CHARS: [usize; 13] = [1, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30];

impl Fat {
    /// Reads the boot sector; `None` when it is not a FAT file system this
    /// reader handles.
    pub fn open(dev: &mut dyn Sectors) -> Option<Fat> {
        let mut b = [0u8; SECTOR];
        if !dev.read(0, &mut b) || b[510] != 0x55 || b[511] != 0xAA {
            return None;
        }
        // A jump instruction starts every FAT boot sector.
        if b[0] != 0xEB && b[0] != 0xE9 {
            return None;
        }
        let bytes_per_sector = le16(&b, 11) as usize;
        let spc = b[13] as u64;
        let reserved = le16(&b, 14) as u64;
        let fats = b[16] as u64;
        let root_entries = le16(&b, 17) as u64;
        let total16 = le16(&b, 19) as u64;
        let fat16_size = le16(&b, 22) as u64;
        let total32 = le32(&b, 32) as u64;
        if bytes_per_sector != SECTOR || spc == 0 || !spc.is_power_of_two() || fats == 0 {
            return None;
        }
        let fat_size = if fat16_size != 0 {
            fat16_size
        } else {
            le32(&b, 36) as u64
        };
        let total = if total16 != 0 { total16 } else { total32 };
        let root_sectors = (root_entries * 32).div_ceil(SECTOR as u64);
        let root_start = reserved + fats * fat_size;
        let data_start = root_start + root_sectors;
        if fat_size == 0 || total <= data_start {
            return None;
        }
        let clusters = (total - data_start) / spc;
        let kind = if clusters < 4085 {
            FatType::Fat12
        } else if clusters < 65525 {
            FatType::Fat16
        } else {
            FatType::Fat32
        };
        // The extended boot record (with the label) sits after the FAT32 fields.
        let ebr = if kind == FatType::Fat32 { 64 } else { 36 };
        let mut bpb_label = [b' '; 11];
        if b[ebr + 2] == 0x29 {
            bpb_label.copy_from_slice(&b[ebr + 7..ebr + 18]);
        }
        if kind != FatType::Fat32 && root_entries == 0 {
            return None;
        }
        Some(Fat {
            kind,
            sectors_per_cluster: spc,
            fat_start: reserved,
            root_start,
            root_entries,
            root_cluster: if kind == FatType::Fat32 {
                le32(&b, 44)
            } else {
                0
            },
            data_start,
            clusters: clusters as u32,
            bpb_label,
        })
    }

    fn cluster_lba(&self, cluster: u32) -> u64 {
        self.data_start + (cluster as u64 - 2) * self.sectors_per_cluster
    }

    fn valid_cluster(&self, cluster: u32) -> bool {
        cluster >= 2 && cluster < self.clusters + 2
    }

    /// The FAT byte at `offset`, through a one-sector cache.
    fn fat_byte(
        &self,
        dev: &mut dyn Sectors,
        cache: &mut (u64, [u8; SECTOR]),
        offset: u64,
    ) -> Option<u8> {
        let lba = self.fat_start + offset / SECTOR as u64;
        if cache.0 != lba {
            if !dev.read(lba, &mut cache.1) {
                return None;
            }
            cache.0 = lba;
        }
        Some(cache.1[(offset % SECTOR as u64) as usize])
    }

    /// The cluster after `cluster` in its chain; `None` at the end (or on a
    /// bad or free entry, or an I/O error).
    fn next(
        &self,
        dev: &mut dyn Sectors,
        cache: &mut (u64, [u8; SECTOR]),
        cluster: u32,
    ) -> Option<u32> {
        let n = cluster as u64;
        let next = match self.kind {
            FatType::Fat12 => {
                let off = n + n / 2;
                let lo = self.fat_byte(dev, cache, off)? as u32;
                let hi = self.fat_byte(dev, cache, off + 1)? as u32;
                let v = lo | hi << 8;
                if n & 1 == 1 {
                    v >> 4
                } else {
                    v & 0xFFF
                }
            }
            FatType::Fat16 => {
                let lo = self.fat_byte(dev, cache, 2 * n)? as u32;
                let hi = self.fat_byte(dev, cache, 2 * n + 1)? as u32;
                lo | hi << 8
            }
            FatType::Fat32 => {
                let mut v = 0u32;
                for i in 0..4 {
                    v |= (self.fat_byte(dev, cache, 4 * n + i)? as u32) << (8 * i);
                }
                v & 0x0FFF_FFFF
            }
        };
        self.valid_cluster(next).then_some(next)
    }

    /// Calls `f` with each 32-byte root directory entry until it returns
    /// false or the directory ends.
    fn each_root_entry(&self, dev: &mut dyn Sectors, f: &mut dyn FnMut(&[u8]) -> bool) {
        let mut buf = [0u8; SECTOR];
        let mut visit = |buf: &[u8; SECTOR]| -> bool {
            for e in buf.chunks_exact(32) {
                if e[0] == 0 || !f(e) {
                    return false;
                }
            }
            true
        };
        if self.kind != FatType::Fat32 {
            let sectors = (self.root_entries * 32).div_ceil(SECTOR as u64);
            for s in 0..sectors {
                if !dev.read(self.root_start + s, &mut buf) || !visit(&buf) {
                    return;
                }
            }
            return;
        }
        let mut cache = (u64::MAX, [0u8; SECTOR]);
        let mut cluster = self.root_cluster;
        // A chain can be no longer than the volume has clusters.
        for _ in 0..self.clusters {
            if !self.valid_cluster(cluster) {
                return;
            }
            let lba = self.cluster_lba(cluster);
            for s in 0..self.sectors_per_cluster {
                if !dev.read(lba + s, &mut buf) || !visit(&buf) {
                    return;
                }
            }
            match self.next(dev, &mut cache, cluster) {
                Some(n) => cluster = n,
                None => return,
            }
        }
    }

    /// The volume label (trailing blanks removed): the root directory's
    /// volume-id entry, else the boot sector's.
    pub fn label(&self, dev: &mut dyn Sectors) -> String {
        let mut raw = self.bpb_label;
        self.each_root_entry(dev, &mut |e| {
            let attr = e[11];
            if e[0] != 0xE5 && attr != 0x0F && attr & 0x08 != 0 {
                raw.copy_from_slice(&e[..11]);
                return false;
            }
            true
        });
        let mut s = String::new();
        for &c in &raw {
            s.push(c as char);
        }
        String::from(s.trim_end())
    }

    /// The files and directories of the root directory, in directory order.
    pub fn entries(&self, dev: &mut dyn Sectors) -> Vec<Entry> {
        let mut out = Vec::new();
        let mut lfn: [u16; 260] = [0; 260];
        let mut lfn_sum: Option<u8> = None;
        let mut lfn_len = 0usize;
        let fat32 = self.kind == FatType::Fat32;
        self.each_root_entry(dev, &mut |e| {
            let attr = e[11];
            if e[0] == 0xE5 {
                lfn_sum = None;
                return true;
            }
            if attr == 0x0F {
                let ord = (e[0] & 0x1F) as usize;
                if ord == 0 || ord > 20 {
                    lfn_sum = None;
                    return true;
                }
                if e[0] & 0x40 != 0 {
                    lfn = [0; 260];
                    lfn_len = 0;
                    lfn_sum = Some(e[13]);
                } else if lfn_sum != Some(e[13]) {
                    lfn_sum = None;
                    return true;
                }
                for (i, &at) in LFN_CHARS.iter().enumerate() {
                    let c = le16(e, at);
                    let pos = (ord - 1) * 13 + i;
                    if c == 0 || c == 0xFFFF {
                        break;
                    }
                    lfn[pos] = c;
                    lfn_len = lfn_len.max(pos + 1);
                }
                return true;
            }
            if attr & 0x08 != 0 {
                lfn_sum = None;
                return true;
            }
            let name = match lfn_sum {
                Some(sum) if sum == short_checksum(&e[..11]) => {
                    let mut s = String::new();
                    for &c in &lfn[..lfn_len] {
                        s.push(char::from_u32(c as u32).unwrap_or('?'));
                    }
                    s
                }
                _ => short_name(&e[..11]),
            };
            lfn_sum = None;
            let hi = if fat32 { le16(e, 20) as u32 } else { 0 };
            out.push(Entry {
                name,
                first_cluster: hi << 16 | le16(e, 26) as u32,
                size: le32(e, 28),
                is_dir: attr & 0x10 != 0,
            });
            true
        });
        out
    }

    /// The root-directory file named `name` (compared without case, as
    /// VFAT does).
    pub fn find(&self, dev: &mut dyn Sectors, name: &str) -> Option<Entry> {
        self.entries(dev)
            .into_iter()
            .find(|e| !e.is_dir && e.name.eq_ignore_ascii_case(name))
    }

    /// The contents of `entry` (at most [`MAX_FILE`] bytes); `None` on an
    /// I/O error or a chain shorter than the file.
    pub fn read(&self, dev: &mut dyn Sectors, entry: &Entry) -> Option<Vec<u8>> {
        let size = (entry.size as usize).min(MAX_FILE);
        let mut out = Vec::with_capacity(size);
        let mut cache = (u64::MAX, [0u8; SECTOR]);
        let mut buf = [0u8; SECTOR];
        let mut cluster = entry.first_cluster;
        while out.len() < size {
            if !self.valid_cluster(cluster) {
                return None;
            }
            let lba = self.cluster_lba(cluster);
            for s in 0..self.sectors_per_cluster {
                if out.len() >= size {
                    break;
                }
                if !dev.read(lba + s, &mut buf) {
                    return None;
                }
                let n = (size - out.len()).min(SECTOR);
                out.extend_from_slice(&buf[..n]);
            }
            if out.len() < size {
                cluster = self.next(dev, &mut cache, cluster)?;
            }
        }
        Some(out)
    }
}
