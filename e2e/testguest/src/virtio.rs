//! virtio-mmio devices (from the DSDT, else `virtio_mmio.device=` on the command line) through
//! the `virtio-drivers` crate, driven in poll mode, and the block pattern
//! writer/verifier.

use alloc::alloc::{alloc_zeroed, dealloc, Layout};
use core::ptr::NonNull;

use virtio_drivers::device::blk::{VirtIOBlk, SECTOR_SIZE};
use virtio_drivers::transport::mmio::{MmioTransport, VirtIOHeader};
use virtio_drivers::transport::{DeviceType, Transport};
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

use crate::cmdline::MmioDevice;
use crate::pattern::blk_word;

/// DMA through the heap: memory is identity mapped, so a buffer's virtual
/// address is its physical address, and sharing needs no bounce buffers.
pub struct GuestHal;

// SAFETY: dma_alloc returns zeroed, page-aligned, identity-mapped memory that
// stays valid until dma_dealloc; share returns the physical address of a
// buffer that is identity mapped.
unsafe impl Hal for GuestHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let layout = Layout::from_size_align(pages * PAGE_SIZE, PAGE_SIZE).unwrap();
        // SAFETY: layout has non-zero size.
        let p = unsafe { alloc_zeroed(layout) };
        match NonNull::new(p) {
            Some(nn) => (p as u64, nn),
            None => (0, NonNull::dangling()),
        }
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        let layout = Layout::from_size_align(pages * PAGE_SIZE, PAGE_SIZE).unwrap();
        // SAFETY: vaddr came from dma_alloc with the same layout.
        unsafe { dealloc(vaddr.as_ptr(), layout) };
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as *mut u8).unwrap()
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.as_ptr() as *mut u8 as u64
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}

/// The transport type used for every device.
pub type Mmio = MmioTransport<'static>;

/// Opens the transport at `d`; `None` when nothing answers there.
pub fn open(d: &MmioDevice) -> Option<Mmio> {
    let header = NonNull::new(d.addr as *mut VirtIOHeader)?;
    // SAFETY: the command line names an MMIO region of a virtio device; it is
    // identity mapped (below 4 GiB, uncached) and used only through this transport.
    unsafe { MmioTransport::new(header, d.size.max(0x200) as usize) }.ok()
}

/// Short name of a device type as printed in `VIRTIO` lines.
pub fn kind_name(t: &Mmio) -> &'static str {
    match t.device_type() {
        DeviceType::Network => "net",
        DeviceType::Block => "blk",
        DeviceType::Console => "console",
        DeviceType::EntropySource => "rng",
        _ => "other",
    }
}

/// A virtio-blk device.
pub type Blk = VirtIOBlk<GuestHal, Mmio>;

/// A virtio-blk device as the FAT reader reads it.
pub struct BlkSectors<'a>(pub &'a mut Blk);

impl crate::fat::Sectors for BlkSectors<'_> {
    fn read(&mut self, lba: u64, buf: &mut [u8; SECTOR_SIZE]) -> bool {
        self.0.read_blocks(lba as usize, buf).is_ok()
    }
}

/// The MAC in a virtio-net device's configuration space (all zeros when it
/// cannot be read).
pub fn net_mac(t: &Mmio) -> [u8; 6] {
    let mut mac = [0u8; 6];
    for (i, b) in mac.iter_mut().enumerate() {
        *b = t.read_config_space::<u8>(i).unwrap_or(0);
    }
    mac
}

/// Outcome of a block pattern operation.
pub enum BlkOutcome {
    Ok,
    Io {
        sector: u64,
    },
    Mismatch {
        sector: u64,
        word: u64,
        expected: u64,
        found: u64,
    },
}

fn fill(buf: &mut [u8; SECTOR_SIZE], seed: u64, sector: u64) {
    for w in 0..(SECTOR_SIZE / 8) {
        let v = blk_word(seed, sector, w as u64).to_le_bytes();
        buf[w * 8..w * 8 + 8].copy_from_slice(&v);
    }
}

/// Writes the pattern to `count` sectors from `sector`.
pub fn blk_write(blk: &mut Blk, sector: u64, count: u64, seed: u64) -> BlkOutcome {
    let mut buf = [0u8; SECTOR_SIZE];
    for s in sector..sector + count {
        fill(&mut buf, seed, s);
        if blk.write_blocks(s as usize, &buf).is_err() {
            return BlkOutcome::Io { sector: s };
        }
    }
    if blk.flush().is_err() {
        return BlkOutcome::Io { sector };
    }
    BlkOutcome::Ok
}

/// Reads `count` sectors from `sector` and compares them with the pattern.
pub fn blk_verify(blk: &mut Blk, sector: u64, count: u64, seed: u64) -> BlkOutcome {
    let mut buf = [0u8; SECTOR_SIZE];
    for s in sector..sector + count {
        if blk.read_blocks(s as usize, &mut buf).is_err() {
            return BlkOutcome::Io { sector: s };
        }
        for w in 0..(SECTOR_SIZE / 8) {
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[w * 8..w * 8 + 8]);
            let found = u64::from_le_bytes(b);
            let expected = blk_word(seed, s, w as u64);
            if found != expected {
                return BlkOutcome::Mismatch {
                    sector: s,
                    word: w as u64,
                    expected,
                    found,
                };
            }
        }
    }
    BlkOutcome::Ok
}
