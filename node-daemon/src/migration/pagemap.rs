//! Which pages of an anonymous private mapping of this process hold
//! anything, from the kernel's page table (`/proc/self/pagemap`): a page
//! neither present nor swapped out was never written (or was given back
//! with `MADV_DONTNEED`), and reads as zero. The first pre-copy round asks
//! it of the VM ([`super::SourceVm::populated`]) and sends those pages as
//! zero runs without reading them: reading one would fault it in (about a
//! microsecond a page here, a quarter of a second for an idle 1 GiB guest).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;

use super::protocol::PAGE_SIZE;

/// Pagemap entry bit: the page is in RAM.
const PRESENT: u64 = 1 << 63;
/// Pagemap entry bit: the page is swapped out (or being moved).
const SWAPPED: u64 = 1 << 62;

static PAGEMAP: OnceLock<Option<File>> = OnceLock::new();

/// This process's `/proc/self/pagemap`, opened on the first call. The VMM
/// calls it before it makes itself non-dumpable (which gives `/proc/self`
/// to root) and before its sandbox; `None` if it could not be opened.
pub fn open() -> Option<&'static File> {
    PAGEMAP
        .get_or_init(|| File::open("/proc/self/pagemap").ok())
        .as_ref()
}

/// Which of the `pages` pages from `host` (page-aligned, inside an
/// anonymous private mapping of this process) may hold data: bit `i` of
/// word `i / 64` is set for a page present or swapped out. A clear bit is a
/// page that was never written or was given back, and reads as zero.
/// `None` when the page table cannot be read.
pub fn populated(host: *const u8, pages: u64) -> Option<Vec<u64>> {
    let file = open()?;
    let first = host as u64 / PAGE_SIZE as u64;
    let mut entries = vec![0u8; pages as usize * 8];
    let mut done = 0;
    while done < entries.len() {
        match file.read_at(&mut entries[done..], first * 8 + done as u64) {
            Ok(0) | Err(_) => return None,
            Ok(n) => done += n,
        }
    }
    let mut bitmap = vec![0u64; (pages as usize).div_ceil(64)];
    for (i, e) in entries.chunks_exact(8).enumerate() {
        let e = u64::from_le_bytes(e.try_into().expect("8 bytes"));
        if e & (PRESENT | SWAPPED) != 0 {
            bitmap[i / 64] |= 1 << (i % 64);
        }
    }
    Some(bitmap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_never_written_are_not_populated() {
        // 8 MiB, small pages only: pages written in the first 2 MiB, the
        // last 2 MiB never touched.
        let len = 8 << 20;
        // SAFETY: a fresh anonymous mapping, checked below, unmapped at the end.
        let host = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(host, libc::MAP_FAILED);
        let host = host.cast::<u8>();
        let pages = (len / PAGE_SIZE) as u64;
        // SAFETY: advice, then writes of single bytes, all inside the mapping.
        unsafe {
            libc::madvise(host.cast(), len, libc::MADV_NOHUGEPAGE);
            for p in [0, 5, 300] {
                host.add(p * PAGE_SIZE).write_volatile(1);
            }
        }
        let map = populated(host, pages).expect("this process can read its pagemap");
        let bit = |map: &[u64], p: u64| map[(p / 64) as usize] >> (p % 64) & 1 == 1;
        for p in [0, 5, 300] {
            assert!(bit(&map, p), "written page {p} is populated");
        }
        for p in (1..pages).filter(|p| ![5, 300].contains(p)) {
            assert!(!bit(&map, p), "page {p} was never touched");
        }
        // Given back to the host: zero again, and not populated.
        // SAFETY: the first 2 MiB of the mapping, which nothing else uses;
        // then a read inside it and the unmap of what was mapped.
        unsafe {
            libc::madvise(host.cast(), 2 << 20, libc::MADV_DONTNEED);
            let map = populated(host, pages).unwrap();
            assert!(map.iter().all(|&w| w == 0), "{map:x?}");
            assert_eq!(host.add(5 * PAGE_SIZE).read_volatile(), 0);
            libc::munmap(host.cast(), len);
        }
    }
}
