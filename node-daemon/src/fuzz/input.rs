//! What the device fuzz targets share: a reader that turns fuzz bytes into
//! numbers (zero once the input runs out, so every decoder is total), a
//! small guest memory with a hole in it, and a split-virtqueue driver that
//! lays descriptor chains into that memory as a guest would.

use vm_memory::{Bytes, GuestAddress};

use crate::vmm::memory::GuestMemory;

/// Guest RAM of the device targets: 48 KiB at 0 and 8 KiB at 56 KiB, so a
/// 16-bit address lands in RAM, in the hole between, or past the end.
const RAM: [(u64, usize); 2] = [(0, 0xc000), (0xe000, 0x2000)];

/// VRING_DESC_F_NEXT.
pub(crate) const DESC_NEXT: u16 = 1;
/// VRING_DESC_F_WRITE.
pub(crate) const DESC_WRITE: u16 = 2;
/// VRING_DESC_F_INDIRECT.
pub(crate) const DESC_INDIRECT: u16 = 4;

/// Reads numbers off the front of a fuzz input.
pub(crate) struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    pub(crate) fn new(data: &'a [u8]) -> Self {
        Input(data)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Up to `n` bytes (fewer when the input ends first).
    pub(crate) fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }

    fn le<const N: usize>(&mut self) -> [u8; N] {
        let mut b = [0u8; N];
        let src = self.bytes(N);
        b[..src.len()].copy_from_slice(src);
        b
    }

    pub(crate) fn u8(&mut self) -> u8 {
        self.le::<1>()[0]
    }

    pub(crate) fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.le())
    }

    pub(crate) fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.le())
    }

    pub(crate) fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.le())
    }

    /// A guest address: usually 16 bits (near [`guest_memory`]), one time
    /// in four any 64-bit value.
    pub(crate) fn gpa(&mut self) -> u64 {
        match self.u8() & 3 {
            3 => self.u64(),
            _ => u64::from(self.u16()),
        }
    }

    /// A buffer length: usually 16 bits, one time in four any 32-bit value.
    pub(crate) fn len(&mut self) -> u32 {
        match self.u8() & 3 {
            3 => self.u32(),
            _ => u32::from(self.u16()),
        }
    }

    /// An access width as KVM reports it for port I/O and MMIO: 1, 2, 4
    /// or 8 bytes.
    pub(crate) fn width(&mut self) -> usize {
        1 << (self.u8() & 3)
    }
}

/// A fresh guest memory (see [`RAM`]).
pub(crate) fn guest_memory() -> GuestMemory {
    let ranges: Vec<_> = RAM.iter().map(|(a, l)| (GuestAddress(*a), *l)).collect();
    GuestMemory::from_ranges(&ranges).expect("mmap of 56 KiB of fuzz guest memory")
}

/// Op "patch memory": an address, a length byte, that many bytes. Writes
/// that leave guest RAM are dropped.
pub(crate) fn patch_memory(mem: &GuestMemory, input: &mut Input) {
    let gpa = input.gpa();
    let len = usize::from(input.u8());
    let bytes = input.bytes(len);
    let _ = mem.write_slice(bytes, GuestAddress(gpa));
}

/// One descriptor as a driver writes it (NEXT and `next` are filled in
/// by [`Driver::add`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Desc {
    pub(crate) addr: u64,
    pub(crate) len: u32,
    pub(crate) flags: u16,
}

impl Desc {
    /// A descriptor from the input: address, length and a flags byte
    /// (bit 0 write-only, bits 6 and 7 both set: indirect).
    pub(crate) fn from_input(input: &mut Input) -> Desc {
        let addr = input.gpa();
        let len = input.len();
        let f = input.u8();
        let mut flags = if f & 1 != 0 { DESC_WRITE } else { 0 };
        if f & 0xc0 == 0xc0 {
            flags |= DESC_INDIRECT;
        }
        Desc { addr, len, flags }
    }
}

/// The driver side of a split virtqueue in guest memory: writes
/// descriptors into the table and heads into the available ring.
pub(crate) struct Driver {
    desc_table: u64,
    avail_ring: u64,
    size: u16,
    next_desc: u16,
    avail_idx: u16,
}

impl Driver {
    /// A queue of `size` entries with its table and ring at these addresses.
    pub(crate) fn new(desc_table: u64, avail_ring: u64, size: u16) -> Driver {
        Driver {
            desc_table,
            avail_ring,
            size,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    /// The driver's available index starts at `idx` (a restored queue).
    pub(crate) fn with_avail_idx(mut self, idx: u16) -> Driver {
        self.avail_idx = idx;
        self
    }

    /// Writes `descs` as one chain (in consecutive table slots, wrapping)
    /// and makes it available. Writes outside guest RAM are dropped.
    pub(crate) fn add(&mut self, mem: &GuestMemory, descs: &[Desc]) {
        if descs.is_empty() || self.size == 0 {
            return;
        }
        let head = self.next_desc % self.size;
        for (i, d) in descs.iter().enumerate() {
            let slot = self.next_desc % self.size;
            self.next_desc = self.next_desc.wrapping_add(1);
            let last = i + 1 == descs.len();
            let flags = if last { d.flags } else { d.flags | DESC_NEXT };
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&d.addr.to_le_bytes());
            raw[8..12].copy_from_slice(&d.len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&(self.next_desc % self.size).to_le_bytes());
            let at = self.desc_table.wrapping_add(16 * u64::from(slot));
            let _ = mem.write_slice(&raw, GuestAddress(at));
        }
        let entry = 4 + 2 * u64::from(self.avail_idx % self.size);
        let _ = mem.write_obj(
            head.to_le(),
            GuestAddress(self.avail_ring.wrapping_add(entry)),
        );
        self.avail_idx = self.avail_idx.wrapping_add(1);
        let _ = mem.write_obj(
            self.avail_idx.to_le(),
            GuestAddress(self.avail_ring.wrapping_add(2)),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_reads_zero_past_the_end() {
        let mut i = Input::new(&[1, 2, 3]);
        assert_eq!(i.u16(), 0x0201);
        assert_eq!(i.u32(), 3);
        assert!(i.is_empty());
        assert_eq!(i.u64(), 0);
        assert_eq!(i.bytes(5), &[] as &[u8]);
    }
}
