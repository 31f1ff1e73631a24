//! Partition tables on a virtual disk: GPT (behind its protective MBR, the
//! backup header when the primary one is damaged) and MBR (primary
//! partitions, and logical ones in an extended partition, numbered from 5
//! as Linux does).
//!
//! Sectors are 512 bytes (what disk images and `sfdisk` use); a GPT written
//! for 4096-byte sectors is found too.

use std::io;

/// Byte reads on a virtual disk (a [`crate::storage::DiskImage`], or bytes
/// in memory in the unit tests).
pub trait ReadDisk {
    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// The disk's size in bytes.
    fn size(&self) -> u64;
}

impl ReadDisk for crate::storage::DiskImage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        crate::storage::DiskImage::read_at(self, buf, offset)
    }
    fn size(&self) -> u64 {
        crate::storage::DiskImage::size(self)
    }
}

impl ReadDisk for Vec<u8> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let src = self
            .get(start..start.saturating_add(buf.len()))
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn size(&self) -> u64 {
        self.len() as u64
    }
}

/// Which partition table a disk has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableKind {
    /// GUID partition table.
    Gpt,
    /// DOS/MBR partition table.
    Mbr,
}

/// One partition, in bytes on the virtual disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    /// Its number as Linux names it (`vda1`; MBR logical partitions from 5).
    pub number: u32,
    /// First byte.
    pub start: u64,
    /// Length in bytes.
    pub size: u64,
}

const MBR_SIGNATURE: [u8; 2] = [0x55, 0xaa];
const GPT_SIGNATURE: &[u8; 8] = b"EFI PART";
/// The MBR type of GPT's protective partition.
const MBR_PROTECTIVE: u8 = 0xee;
/// MBR types of extended partitions (CHS, LBA, Linux).
const MBR_EXTENDED: [u8; 3] = [0x05, 0x0f, 0x85];
/// Longest chain of logical partitions we follow (a loop ends here too).
const MAX_LOGICAL: usize = 128;
/// Most GPT entries we read (the usual table has 128).
const MAX_GPT_ENTRIES: u32 = 1024;

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// CRC-32 (IEEE 802.3, reflected), as the GPT header and entries use.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// One of the four entries of an MBR (or EBR) sector.
#[derive(Clone, Copy, Debug)]
struct MbrEntry {
    status: u8,
    kind: u8,
    lba: u64,
    sectors: u64,
}

fn mbr_entries(sector: &[u8]) -> [MbrEntry; 4] {
    std::array::from_fn(|i| {
        let e = &sector[446 + 16 * i..446 + 16 * (i + 1)];
        MbrEntry {
            status: e[0],
            kind: e[4],
            lba: u64::from(le32(e, 8)),
            sectors: u64::from(le32(e, 12)),
        }
    })
}

/// Whether sector 0 is an MBR: the boot signature, status bytes that are 0
/// or 0x80, at least one used entry, and no entry past the disk's end.
/// (A FAT boot sector has the signature too; [`super::fs`] tells it apart
/// before this is asked.)
fn is_mbr(sector: &[u8], disk_sectors: u64) -> bool {
    if sector[510..512] != MBR_SIGNATURE {
        return false;
    }
    let entries = mbr_entries(sector);
    entries.iter().any(|e| e.kind != 0)
        && entries.iter().all(|e| {
            (e.status == 0 || e.status == 0x80)
                && (e.kind == 0
                    || e.kind == MBR_PROTECTIVE
                    || (e.lba > 0 && e.lba.saturating_add(e.sectors) <= disk_sectors))
        })
}

/// The disk's partition table and partitions, or `None` when sector 0 holds
/// no partition table.
pub fn read_table(disk: &dyn ReadDisk) -> io::Result<Option<(TableKind, Vec<Partition>)>> {
    if disk.size() < 1024 {
        return Ok(None);
    }
    let mut sector = [0u8; 512];
    disk.read_at(&mut sector, 0)?;
    if !is_mbr(&sector, disk.size() / 512) {
        return Ok(None);
    }
    let entries = mbr_entries(&sector);
    if entries.iter().any(|e| e.kind == MBR_PROTECTIVE) {
        for sector_size in [512u64, 4096] {
            if let Some(parts) = read_gpt(disk, sector_size)? {
                return Ok(Some((TableKind::Gpt, parts)));
            }
        }
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "protective MBR but no valid GPT header (primary or backup)",
        ));
    }
    let mut parts = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        if e.kind == 0 || e.sectors == 0 {
            continue;
        }
        if MBR_EXTENDED.contains(&e.kind) {
            read_logical(disk, e.lba, &mut parts)?;
        } else {
            parts.push(Partition {
                number: i as u32 + 1,
                start: e.lba * 512,
                size: e.sectors * 512,
            });
        }
    }
    Ok(Some((TableKind::Mbr, parts)))
}

/// Follows the chain of extended boot records from the extended partition
/// at `ext_lba`: each holds one logical partition (relative to itself) and a
/// link to the next (relative to the extended partition).
fn read_logical(disk: &dyn ReadDisk, ext_lba: u64, parts: &mut Vec<Partition>) -> io::Result<()> {
    let mut ebr_lba = ext_lba;
    for n in 0..MAX_LOGICAL {
        let mut sector = [0u8; 512];
        disk.read_at(&mut sector, ebr_lba * 512)?;
        if sector[510..512] != MBR_SIGNATURE {
            break;
        }
        let [logical, next, ..] = mbr_entries(&sector);
        if logical.kind != 0 && logical.sectors != 0 {
            parts.push(Partition {
                number: 5 + n as u32,
                start: (ebr_lba + logical.lba) * 512,
                size: logical.sectors * 512,
            });
        }
        if next.kind == 0 || next.lba == 0 {
            break;
        }
        ebr_lba = ext_lba + next.lba;
    }
    Ok(())
}

/// The GPT's partitions for `sector_size`, from the primary header at LBA 1
/// or, when that one fails its checks, the backup header in the last sector.
fn read_gpt(disk: &dyn ReadDisk, sector_size: u64) -> io::Result<Option<Vec<Partition>>> {
    let last = disk.size() / sector_size - 1;
    for header_lba in [1, last] {
        if let Some(parts) = read_gpt_at(disk, sector_size, header_lba)? {
            return Ok(Some(parts));
        }
    }
    Ok(None)
}

fn read_gpt_at(
    disk: &dyn ReadDisk,
    sector_size: u64,
    header_lba: u64,
) -> io::Result<Option<Vec<Partition>>> {
    let mut header = vec![0u8; sector_size as usize];
    disk.read_at(&mut header, header_lba * sector_size)?;
    if &header[0..8] != GPT_SIGNATURE {
        return Ok(None);
    }
    let header_size = le32(&header, 12) as usize;
    if !(92..=header.len()).contains(&header_size) {
        return Ok(None);
    }
    let mut checked = header[..header_size].to_vec();
    checked[16..20].fill(0);
    if crc32(&checked) != le32(&header, 16) || le64(&header, 24) != header_lba {
        return Ok(None);
    }
    let entries_lba = le64(&header, 72);
    let count = le32(&header, 80);
    let entry_size = le32(&header, 84) as usize;
    if count > MAX_GPT_ENTRIES || entry_size < 128 || !entry_size.is_multiple_of(8) {
        return Ok(None);
    }
    let mut table = vec![0u8; count as usize * entry_size];
    disk.read_at(&mut table, entries_lba * sector_size)?;
    if crc32(&table) != le32(&header, 88) {
        return Ok(None);
    }
    let mut parts = Vec::new();
    for (i, e) in table.chunks_exact(entry_size).enumerate() {
        if e[0..16].iter().all(|b| *b == 0) {
            continue;
        }
        let (first, last) = (le64(e, 32), le64(e, 40));
        if last < first {
            continue;
        }
        parts.push(Partition {
            number: i as u32 + 1,
            start: first * sector_size,
            size: (last - first + 1) * sector_size,
        });
    }
    Ok(Some(parts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }

    fn mbr_disk(entries: &[(u8, u8, u32, u32)], sectors: usize) -> Vec<u8> {
        let mut d = vec![0u8; sectors * 512];
        for (i, &(status, kind, lba, n)) in entries.iter().enumerate() {
            let e = &mut d[446 + 16 * i..446 + 16 * (i + 1)];
            e[0] = status;
            e[4] = kind;
            e[8..12].copy_from_slice(&lba.to_le_bytes());
            e[12..16].copy_from_slice(&n.to_le_bytes());
        }
        d[510] = 0x55;
        d[511] = 0xaa;
        d
    }

    #[test]
    fn mbr_primary_and_logical_partitions() {
        // 1: primary at 2048; 2: extended at 4096 with two logicals.
        let mut d = mbr_disk(&[(0x80, 0x83, 2048, 1024), (0, 0x05, 4096, 4096)], 8192);
        let ebr1 = 4096 * 512;
        d[ebr1 + 446 + 4] = 0x83;
        d[ebr1 + 446 + 8..ebr1 + 446 + 12].copy_from_slice(&1u32.to_le_bytes());
        d[ebr1 + 446 + 12..ebr1 + 446 + 16].copy_from_slice(&100u32.to_le_bytes());
        d[ebr1 + 462 + 4] = 0x05;
        d[ebr1 + 462 + 8..ebr1 + 462 + 12].copy_from_slice(&200u32.to_le_bytes());
        d[ebr1 + 510..ebr1 + 512].copy_from_slice(&MBR_SIGNATURE);
        let ebr2 = (4096 + 200) * 512;
        d[ebr2 + 446 + 4] = 0x83;
        d[ebr2 + 446 + 8..ebr2 + 446 + 12].copy_from_slice(&1u32.to_le_bytes());
        d[ebr2 + 446 + 12..ebr2 + 446 + 16].copy_from_slice(&50u32.to_le_bytes());
        d[ebr2 + 510..ebr2 + 512].copy_from_slice(&MBR_SIGNATURE);
        let (kind, parts) = read_table(&d).unwrap().unwrap();
        assert_eq!(kind, TableKind::Mbr);
        assert_eq!(
            parts,
            vec![
                Partition {
                    number: 1,
                    start: 2048 * 512,
                    size: 1024 * 512
                },
                Partition {
                    number: 5,
                    start: 4097 * 512,
                    size: 100 * 512
                },
                Partition {
                    number: 6,
                    start: 4297 * 512,
                    size: 50 * 512
                },
            ]
        );
    }

    #[test]
    fn not_an_mbr_without_signature_bad_status_or_entries_past_the_end() {
        assert_eq!(read_table(&vec![0u8; 8192]).unwrap(), None);
        let bad_status = mbr_disk(&[(0x12, 0x83, 1, 4)], 16);
        assert_eq!(read_table(&bad_status).unwrap(), None);
        let past_end = mbr_disk(&[(0, 0x83, 1, 400)], 16);
        assert_eq!(read_table(&past_end).unwrap(), None);
    }

    #[test]
    fn a_protective_mbr_without_gpt_is_an_error() {
        let d = mbr_disk(&[(0, MBR_PROTECTIVE, 1, 15)], 16);
        let e = read_table(&d).unwrap_err();
        assert!(e.to_string().contains("no valid GPT header"), "{e}");
    }
}
