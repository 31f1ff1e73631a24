//! [`virtio_blk`]: virtio-blk requests, from header parsing to reads and
//! writes of a real (small, raw) image file.

use std::fs::File;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, OnceLock};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::input::{guest_memory, patch_memory, Desc, Driver, Input, DESC_WRITE};
use crate::storage::ImageFormat;
use crate::vmm::devices::virtio::block::Block;
use crate::vmm::memory::GuestMemory;

/// Size of the fuzzed disk: 128 sectors.
pub const IMAGE_SIZE: u64 = 64 << 10;
/// Queue layout of the fuzzed devices: 16 entries, the descriptor table at
/// 0, the available ring at 0x100, the used ring at 0x200.
pub(crate) const QUEUE_SIZE: u16 = 16;
pub(crate) const DESC_TABLE: u64 = 0;
pub(crate) const AVAIL_RING: u64 = 0x100;
pub(crate) const USED_RING: u64 = 0x200;
/// What the status byte holds until the device writes it.
pub const NO_STATUS: u8 = 0xff;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

/// The disks of this process: a read-write and a read-only image, created
/// once (in /dev/shm when there is one) and unlinked once open.
pub(crate) struct Images {
    rw: Mutex<Option<Block>>,
    ro: Mutex<Option<Block>>,
    rw_file: File,
}

impl Images {
    /// The read-write (`false`) or read-only (`true`) disk; `None` inside
    /// while a transport borrows it.
    pub(crate) fn disk(&self, read_only: bool) -> MutexGuard<'_, Option<Block>> {
        let m = if read_only { &self.ro } else { &self.rw };
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Zeroes the read-write image, so that each run starts alike.
    pub(crate) fn reset(&self) {
        self.rw_file
            .set_len(0)
            .and_then(|_| self.rw_file.set_len(IMAGE_SIZE))
            .expect("truncate the fuzz image");
    }

    /// The read-write image's file size now.
    pub(crate) fn rw_len(&self) -> u64 {
        self.rw_file.metadata().map_or(0, |m| m.len())
    }
}

fn open_image(read_only: bool) -> (Block, File) {
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let name = format!(
        "godwit-fuzz-{}-{}.img",
        std::process::id(),
        if read_only { "ro" } else { "rw" }
    );
    let path = dir.join(name);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .expect("create the fuzz image");
    file.set_len(IMAGE_SIZE).expect("size the fuzz image");
    // An id longer than the 20 bytes GET_ID returns.
    let id = "godwit-fuzz-disk-serial-0001".to_string();
    let block = Block::new(path.clone(), Some(ImageFormat::Raw), read_only, id, true)
        .expect("open the fuzz image");
    let _ = std::fs::remove_file(&path);
    (block, file)
}

/// The disks of this process.
pub(crate) fn images() -> &'static Images {
    static IMAGES: OnceLock<Images> = OnceLock::new();
    IMAGES.get_or_init(|| {
        let (rw, rw_file) = open_image(false);
        let (ro, _) = open_image(true);
        Images {
            rw: Mutex::new(Some(rw)),
            ro: Mutex::new(Some(ro)),
            rw_file,
        }
    })
}

/// A queue as a driver sets it up: [`QUEUE_SIZE`] entries at the fixed
/// layout from `base` on, ready.
pub(crate) fn ready_queue(base: u64) -> Queue {
    let mut q = Queue::new(256).expect("256 is a valid queue size");
    q.set_size(QUEUE_SIZE);
    let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
    let (lo, hi) = split(base + DESC_TABLE);
    q.set_desc_table_address(lo, hi);
    let (lo, hi) = split(base + AVAIL_RING);
    q.set_avail_ring_address(lo, hi);
    let (lo, hi) = split(base + USED_RING);
    q.set_used_ring_address(lo, hi);
    q.set_ready(true);
    q
}

/// Lays out one request from the input (header, 0 to 4 data buffers, a
/// status byte) and makes it available; returns the status byte's address.
///
/// Input: type (a known one or any u32), sector (small or any u64), the
/// header's address and length, then per data buffer an address, a
/// length (whole sectors or any) and a flag that flips its direction, and
/// the status buffer likewise.
pub(crate) fn request(mem: &GuestMemory, driver: &mut Driver, input: &mut Input) -> u64 {
    let kind = match input.u8() % 6 {
        0 => T_IN,
        1 => T_OUT,
        2 => T_FLUSH,
        3 => T_GET_ID,
        4 => input.u32(),
        _ => T_IN,
    };
    let sector = if input.u8() & 1 != 0 {
        input.u64()
    } else {
        u64::from(input.u8())
    };
    let hdr = input.gpa();
    let _ = mem.write_obj(kind.to_le(), GuestAddress(hdr));
    let _ = mem.write_obj(0u32, GuestAddress(hdr.wrapping_add(4)));
    let _ = mem.write_obj(sector.to_le(), GuestAddress(hdr.wrapping_add(8)));
    let hdr_len = if input.u8() & 1 == 0 { 16 } else { input.len() };
    let mut descs = vec![Desc {
        addr: hdr,
        len: hdr_len,
        flags: 0,
    }];
    let into_guest = kind == T_IN || kind == T_GET_ID;
    let n = input.u8() % 5;
    for _ in 0..n {
        let addr = input.gpa();
        let f = input.u8();
        let len = if f & 2 == 0 {
            512 * u32::from(input.u8() % 9)
        } else {
            input.len()
        };
        let write = into_guest != (f & 1 != 0);
        descs.push(Desc {
            addr,
            len,
            flags: if write { DESC_WRITE } else { 0 },
        });
    }
    let status = input.gpa();
    let f = input.u8();
    let len = if f & 2 == 0 { 1 } else { input.len() };
    descs.push(Desc {
        addr: status,
        len,
        flags: if f & 1 == 0 { DESC_WRITE } else { 0 },
    });
    let status_at = status.wrapping_add(u64::from(len)).wrapping_sub(1);
    let _ = mem.write_obj(NO_STATUS, GuestAddress(status_at));
    driver.add(mem, &descs);
    status_at
}

/// What one run of [`virtio_blk`] saw.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct BlockOutcome {
    /// The status byte of each request op 1 laid out, in order, as guest
    /// memory held it after the next notification ([`NO_STATUS`] when the
    /// device did not write one).
    pub statuses: Vec<u8>,
}

/// A virtio-blk device on a 64 KiB raw image, read-write or read-only
/// (first input byte, bit 0; bit 1 turns changed-block tracking on), with
/// one queue at the fixed layout. Then ops until the input ends:
///
/// | op | what |
/// | --- | --- |
/// | 0 | patch guest memory |
/// | 1 | the driver adds a request ([`request`]) |
/// | 2 | the driver adds a chain of 1 to 8 arbitrary descriptors |
/// | 3 | QueueNotify: the device serves what is available |
/// | 4 | take the changed blocks |
///
/// After every notification the image must still be 64 KiB (a write past
/// the end must fail, not grow the file).
pub fn virtio_blk(data: &[u8]) -> BlockOutcome {
    let mut input = Input::new(data);
    let images = images();
    images.reset();
    let flags = input.u8();
    let mut slot = images.disk(flags & 1 != 0);
    let block = slot.as_mut().expect("the fuzz disk is not lent out");
    if flags & 2 != 0 {
        block.dirty_start();
    } else {
        block.dirty_stop();
    }
    let mem = guest_memory();
    let mut q = ready_queue(0);
    let mut driver = Driver::new(DESC_TABLE, AVAIL_RING, QUEUE_SIZE);
    let mut pending = Vec::new();
    let mut out = BlockOutcome::default();
    while !input.is_empty() {
        match input.u8() % 5 {
            0 => patch_memory(&mem, &mut input),
            1 => pending.push(request(&mem, &mut driver, &mut input)),
            2 => {
                let n = 1 + usize::from(input.u8() % 8);
                let descs: Vec<Desc> = (0..n).map(|_| Desc::from_input(&mut input)).collect();
                driver.add(&mem, &descs);
            }
            3 => {
                block.process(&mut q, &mem);
                for at in pending.drain(..) {
                    out.statuses
                        .push(mem.read_obj(GuestAddress(at)).unwrap_or(NO_STATUS));
                }
                assert_eq!(images.rw_len(), IMAGE_SIZE, "the image changed size");
            }
            _ => {
                let _ = block.take_dirty();
            }
        }
    }
    out
}
