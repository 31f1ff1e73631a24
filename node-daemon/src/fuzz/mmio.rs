//! [`virtio_mmio`]: register reads and writes to a virtio-mmio window,
//! through the same dispatch as a vCPU's MMIO exits, with the block or
//! the net device behind it.

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use super::block::{images, request, AVAIL_RING, DESC_TABLE, QUEUE_SIZE};
use super::input::{guest_memory, patch_memory, Desc, Driver, Input};
use super::net::{drain, socket_net};
use crate::vmm::devices::serial::Console;
use crate::vmm::devices::virtio::mmio::{MmioTransport, VirtioDevice};
use crate::vmm::devices::virtio::{MMIO_BASE, MMIO_SIZE};
use crate::vmm::devices::Devices;

/// The registers of the transport, and the first words of config space.
const REGS: [u64; 27] = [
    0x00, 0x04, 0x08, 0x0c, 0x10, 0x14, 0x20, 0x24, 0x30, 0x34, 0x38, 0x44, 0x50, 0x60, 0x64, 0x70,
    0x80, 0x84, 0x90, 0x94, 0xa0, 0xa4, 0xfc, 0x100, 0x104, 0x108, 0x10c,
];

/// A register offset: usually a named one, sometimes any in the window.
fn register(input: &mut Input) -> u64 {
    let b = input.u8();
    if b & 0x80 == 0 {
        REGS[usize::from(b) % REGS.len()]
    } else {
        u64::from(input.u16()) % MMIO_SIZE
    }
}

/// What one run of [`virtio_mmio`] saw.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct MmioOutcome {
    /// The device status register at the end.
    pub status: u32,
    /// Frames the net device sent.
    pub frames: usize,
}

/// A virtio-mmio window with the block device (first input byte, bit 0
/// clear) or the net device behind it, then ops until the input ends:
///
/// | op | what |
/// | --- | --- |
/// | 0 | patch guest memory |
/// | 1 | read a register, 1, 2, 4 or 8 bytes wide |
/// | 2 | write a register, 1, 2, 4 or 8 bytes wide |
/// | 3 | the driver adds a block request to queue 0 at the fixed layout |
/// | 4 | the driver adds a chain of 1 to 8 descriptors to queue 0 or 1 |
/// | 5 | save the transport, change the state, restore it |
///
/// Magic, version and vendor always read back; no write asks the vCPU to
/// exit; a restore that succeeds leaves as many queues as the device has.
pub fn virtio_mmio(data: &[u8]) -> MmioOutcome {
    let mut input = Input::new(data);
    let mem = guest_memory();
    let images = images();
    images.reset();
    let is_net = input.u8() & 1 != 0;
    let mut disk = images.disk(false);
    let (device, peer) = if is_net {
        let (net, peer) = socket_net();
        (VirtioDevice::Net(net), Some(peer))
    } else {
        let block = disk.take().expect("the fuzz disk is not lent out");
        (VirtioDevice::Block(block), None)
    };
    let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let transport = Arc::new(Mutex::new(MmioTransport::new(
        device,
        mem.clone(),
        irq,
        MMIO_BASE,
        5,
    )));
    let queues = transport.lock().unwrap().queues.len();
    let (console, _serial_irq) = Console::new(None, None).expect("eventfd");
    let devices = Devices {
        serial: console.serial.clone(),
        virtio: vec![transport.clone()],
        ged: None,
    };
    let mut drivers =
        [0, 0x400].map(|base| Driver::new(base + DESC_TABLE, base + AVAIL_RING, QUEUE_SIZE));
    let mut out = MmioOutcome::default();
    while !input.is_empty() {
        match input.u8() % 6 {
            0 => patch_memory(&mem, &mut input),
            1 => {
                let off = register(&mut input);
                let mut buf = [0u8; 8];
                let w = input.width();
                devices.mmio_read(MMIO_BASE + off, &mut buf[..w]);
                let fixed = match off {
                    0x00 => Some(0x7472_6976u32),
                    0x04 => Some(2),
                    0x0c => Some(0x676f_6477),
                    _ => None,
                };
                if let Some(v) = fixed {
                    let n = w.min(4);
                    assert_eq!(buf[..n], v.to_le_bytes()[..n], "register {off:#x}");
                }
            }
            2 => {
                let off = register(&mut input);
                let w = input.width();
                let value = input.u64().to_le_bytes();
                let exit = devices.mmio_write(MMIO_BASE + off, &value[..w]);
                assert_eq!(exit, None, "a virtio write asked for a guest exit");
            }
            3 => {
                let _ = request(&mem, &mut drivers[0], &mut input);
            }
            4 => {
                let which = usize::from(input.u8() & 1);
                let n = 1 + usize::from(input.u8() % 8);
                let descs: Vec<Desc> = (0..n).map(|_| Desc::from_input(&mut input)).collect();
                drivers[which].add(&mem, &descs);
            }
            _ => {
                let mut t = transport.lock().unwrap();
                let mut state = t.save();
                state.queue_sel = input.u32();
                state.status = input.u32();
                state.queues.truncate(usize::from(input.u8() % 3));
                for q in &mut state.queues {
                    q.next_avail = input.u16();
                    q.next_used = input.u16();
                }
                if t.restore(&state).is_ok() {
                    assert_eq!(t.queues.len(), queues, "restore changed the queue count");
                }
            }
        }
        if let Some(peer) = &peer {
            out.frames += drain(peer).len();
        }
    }
    drop(devices);
    let transport = Arc::try_unwrap(transport)
        .ok()
        .expect("the only transport reference")
        .into_inner()
        .unwrap_or_else(|e| e.into_inner());
    out.status = transport.save().status;
    if let VirtioDevice::Block(block) = transport.device {
        *disk = Some(block);
    }
    out
}
