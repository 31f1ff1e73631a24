//! [`virtio_net`]: virtio-net TX and RX, with one end of a datagram socket
//! pair as the tap (one write, one frame, as on a tap), so nothing leaves
//! the process.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;

use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use super::block::{ready_queue, AVAIL_RING, DESC_TABLE, QUEUE_SIZE, USED_RING};
use super::input::{guest_memory, patch_memory, Desc, Driver, Input};
use crate::vmm::devices::virtio::net::tap::Tap;
use crate::vmm::devices::virtio::net::Net;

/// Where the TX queue's table and rings start (the RX queue's at 0).
pub(crate) const TX_BASE: u64 = 0x400;
/// The largest frame a tap takes, without the virtio-net header.
const MAX_FRAME: usize = 65535;
/// virtio_net_hdr_v1.
const HDR_LEN: usize = 12;

/// A net device whose tap is one end of a datagram socket pair; the other
/// end is returned for reading what the device sent.
pub(crate) fn socket_net() -> (Net, UnixDatagram) {
    let (ours, theirs) = UnixDatagram::pair().expect("socketpair");
    ours.set_nonblocking(true).expect("O_NONBLOCK");
    theirs.set_nonblocking(true).expect("O_NONBLOCK");
    let tap = Tap {
        file: File::from(OwnedFd::from(ours)),
        name: "fuzz".into(),
        handed: true,
    };
    let net = Net::new(tap, [0x52, 0x54, 0, 0x12, 0x34, 0x56]).expect("eventfd");
    (net, theirs)
}

/// The lengths of the frames waiting on `peer`.
pub(crate) fn drain(peer: &UnixDatagram) -> Vec<usize> {
    let mut buf = vec![0u8; MAX_FRAME + 1];
    let mut out = Vec::new();
    while let Ok(n) = peer.recv(&mut buf) {
        out.push(n);
    }
    out
}

/// What one run of [`virtio_net`] saw.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct NetOutcome {
    /// Lengths of the frames the device sent to the tap.
    pub sent: Vec<usize>,
    /// Used lengths of the receive buffers the device filled.
    pub received: Vec<u32>,
}

/// A virtio-net device with its RX queue at 0 and its TX queue at
/// [`TX_BASE`] (both at the fixed layout), then ops until the input ends:
///
/// | op | what |
/// | --- | --- |
/// | 0 | patch guest memory |
/// | 1 | the driver adds a TX chain of 1 to 8 descriptors |
/// | 2 | the driver adds an RX chain of 1 to 8 descriptors |
/// | 3 | TX notify: the device sends what is available |
/// | 4 | a frame of up to 64 KiB from the input arrives on the tap |
/// | 5 | RX notify |
///
/// Every frame sent is 1 to 65535 bytes; a receive never reports more
/// bytes than the header and the frame.
pub fn virtio_net(data: &[u8]) -> NetOutcome {
    let mut input = Input::new(data);
    let (mut net, peer) = socket_net();
    let mem = guest_memory();
    let mut rx = ready_queue(0);
    let mut tx = ready_queue(TX_BASE);
    let mut rx_driver = Driver::new(DESC_TABLE, AVAIL_RING, QUEUE_SIZE);
    let mut tx_driver = Driver::new(TX_BASE + DESC_TABLE, TX_BASE + AVAIL_RING, QUEUE_SIZE);
    let mut out = NetOutcome::default();
    while !input.is_empty() {
        match input.u8() % 6 {
            0 => patch_memory(&mem, &mut input),
            op @ (1 | 2) => {
                let n = 1 + usize::from(input.u8() % 8);
                let descs: Vec<Desc> = (0..n).map(|_| Desc::from_input(&mut input)).collect();
                let driver = if op == 1 {
                    &mut tx_driver
                } else {
                    &mut rx_driver
                };
                driver.add(&mem, &descs);
            }
            3 => {
                net.notify(1, &mut tx, &mem);
                for n in drain(&peer) {
                    assert!((1..=MAX_FRAME).contains(&n), "sent a frame of {n} bytes");
                    out.sent.push(n);
                }
            }
            4 => {
                let len = usize::from(input.u16());
                let frame = input.bytes(len);
                let before = rx.next_used();
                let slot = u64::from(before % QUEUE_SIZE);
                if net.receive(&mut rx, &mem, frame) && rx.next_used() != before {
                    let at = USED_RING + 4 + 8 * slot + 4;
                    let used: u32 = mem.read_obj(GuestAddress(at)).unwrap_or(0);
                    assert!(
                        used as usize <= HDR_LEN + frame.len(),
                        "used {used} for a frame of {}",
                        frame.len()
                    );
                    out.received.push(used);
                }
            }
            _ => {
                net.notify(0, &mut rx, &mem);
            }
        }
    }
    out
}
