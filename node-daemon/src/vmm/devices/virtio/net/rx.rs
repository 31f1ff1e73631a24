//! The RX thread of a virtio-net device: reads frames from the tap and
//! places them in the guest's receive buffers, waking when the guest adds
//! some. It holds the transport (to see whether the driver is ready and to
//! raise the interrupt), so it lives beside the device, not in it.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::QueueT;

use super::RX_QUEUE;
use crate::vmm::devices::virtio::mmio::{MmioTransport, VirtioDevice};

/// Starts the RX thread of the net device behind `transport`. It stops
/// when `stop` is set.
pub fn spawn(transport: Arc<Mutex<MmioTransport>>, stop: Arc<AtomicBool>) -> std::io::Result<()> {
    let (tap_fd, kick_fd, mut tap) = {
        let t = transport.lock().unwrap();
        let VirtioDevice::Net(n) = &t.device else {
            return Ok(());
        };
        (
            n.tap.file.as_raw_fd(),
            n.rx_kick.as_raw_fd(),
            n.tap.file.try_clone()?,
        )
    };
    std::thread::Builder::new()
        .name("net-rx".into())
        .spawn(move || {
            let mut pending: Option<Vec<u8>> = None;
            let mut buf = vec![0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                let mut fds = [
                    libc::pollfd {
                        fd: if pending.is_none() { tap_fd } else { -1 },
                        events: libc::POLLIN,
                        revents: 0,
                    },
                    libc::pollfd {
                        fd: kick_fd,
                        events: libc::POLLIN,
                        revents: 0,
                    },
                ];
                // SAFETY: `fds` is a valid array of two pollfds for the call.
                unsafe { libc::poll(fds.as_mut_ptr(), 2, 50) };
                if fds[1].revents != 0 {
                    let mut b = [0u8; 8];
                    // SAFETY: reading 8 bytes from an eventfd into an 8-byte buffer.
                    unsafe { libc::read(kick_fd, b.as_mut_ptr().cast(), 8) };
                }
                if pending.is_none() {
                    match tap.read(&mut buf) {
                        Ok(n) if n > 0 => pending = Some(buf[..n].to_vec()),
                        _ => continue,
                    }
                }
                let Some(frame) = pending.as_ref() else {
                    continue;
                };
                let mut t = transport.lock().unwrap();
                if !t.driver_ok() || !t.queues[RX_QUEUE as usize].ready() {
                    pending = None; // no driver yet: drop, as a NIC link-down would
                    continue;
                }
                let mem = t.mem().clone();
                let t = &mut *t;
                let delivered = {
                    let (dev, queues) = (&mut t.device, &mut t.queues);
                    match dev {
                        VirtioDevice::Net(n) => {
                            n.receive(&mut queues[RX_QUEUE as usize], &mem, frame)
                        }
                        _ => false,
                    }
                };
                if delivered {
                    pending = None;
                    t.signal_used();
                }
            }
        })?;
    Ok(())
}
