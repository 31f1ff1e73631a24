//! What a copy of an image to another node sends: which template base an
//! overlay sits on (so the target can tell whether it holds the same base)
//! and which byte ranges must travel. Live and cold storage migration both
//! copy through these.
//!
//! A base image is identified by the template cache's file name,
//! `sha256-<hex>.<format>` ([`super::template`]): the digest is in the name,
//! so neither side hashes gigabytes at migration time.

use std::path::Path;

use super::disk::DiskImage;
use super::image::{read_qcow2_header, resolve_backing, ImageFormat};
use super::StorageError;

/// The sha256 (hex) of the cached template base that the qcow2 overlay
/// `path` sits on directly, if it is one.
pub fn base_digest(path: &Path, format: ImageFormat) -> Option<String> {
    if format != ImageFormat::Qcow2 {
        return None;
    }
    let h = read_qcow2_header(path).ok()?;
    let backing = resolve_backing(path, &h.backing_file?);
    let name = backing.file_name()?.to_str()?;
    let hex = name.strip_prefix("sha256-")?.split('.').next()?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then(|| hex.to_string())
}

/// Sorts and merges overlapping or adjacent ranges.
pub fn merge_ranges(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.retain(|r| r.1 > 0);
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (o, l) in ranges {
        match out.last_mut() {
            Some((po, pl)) if *po + *pl >= o => *pl = (*pl).max(o + l - *po),
            _ => out.push((o, l)),
        }
    }
    out
}

/// The ranges of `disk` (open as the VM sees it) that a copy must send:
/// the ranges allocated in its own image when `own_only` (the target holds
/// the backing images), else those allocated in any image of its chain.
/// Everything else reads as zero on both sides and is not sent.
pub fn copy_extents(disk: &DiskImage, own_only: bool) -> Result<Vec<(u64, u64)>, StorageError> {
    let size = disk.size();
    let mut ranges: Vec<(u64, u64)> = disk
        .allocated_extents()?
        .iter()
        .map(|e| (e.offset, e.len))
        .collect();
    if !own_only {
        let (mut cur, mut fmt) = (disk.path().to_path_buf(), disk.format());
        for _ in 0..16 {
            if fmt != ImageFormat::Qcow2 {
                break;
            }
            let Some(name) = read_qcow2_header(&cur)?.backing_file else {
                break;
            };
            let bp = resolve_backing(&cur, &name);
            // Opened unlocked: the VM already holds shared locks on its chain.
            let layer = DiskImage::open(&bp, None, true, false)?;
            ranges.extend(
                layer
                    .allocated_extents()?
                    .iter()
                    .filter(|e| e.offset < size)
                    .map(|e| (e.offset, e.len.min(size - e.offset))),
            );
            fmt = layer.format();
            cur = bp;
        }
    }
    Ok(merge_ranges(ranges))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge() {
        assert_eq!(
            merge_ranges(vec![(10, 5), (0, 10), (20, 1), (14, 2), (30, 0)]),
            vec![(0, 16), (20, 1)]
        );
    }

    #[test]
    fn digest_comes_from_the_cache_file_name() {
        let d = std::env::temp_dir().join(format!("godwit-base-digest-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let hex = "0123456789abcdef".repeat(4);
        let base = d.join(format!("sha256-{hex}.raw"));
        super::super::image::create_blank(&base, 1 << 20, ImageFormat::Raw).unwrap();
        let top = d.join("top.qcow2");
        super::super::image::create_overlay(&top, &base).unwrap();
        assert_eq!(base_digest(&top, ImageFormat::Qcow2), Some(hex));
        assert_eq!(base_digest(&base, ImageFormat::Raw), None);
        let other = d.join("plain.raw");
        super::super::image::create_blank(&other, 1 << 20, ImageFormat::Raw).unwrap();
        let top2 = d.join("top2.qcow2");
        super::super::image::create_overlay(&top2, &other).unwrap();
        assert_eq!(base_digest(&top2, ImageFormat::Qcow2), None);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
