//! virtio-net over a tap device. TX is served on the notifying vCPU thread;
//! RX runs on its own thread ([`rx`]), which reads frames from the tap and
//! places them in the guest's receive buffers (waking when the guest adds
//! some).

pub mod rx;
pub mod tap;

use std::io::Write;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::Bytes;
use vmm_sys_util::eventfd::EventFd;

use super::{VirtioError, VIRTIO_F_VERSION_1};
use crate::vmm::memory::GuestMemory;
use tap::Tap;

const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// virtio_net_hdr_v1 length (with num_buffers), used with VERSION_1.
const NET_HDR_LEN: usize = 12;
/// The largest frame a tap takes; a TX chain with more than this after the
/// header is dropped, as a NIC drops a frame longer than it can send.
const MAX_FRAME: usize = 65535;
/// The receive queue's index.
pub(super) const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;

/// Saved net device config (snapshot version 1).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NetState {
    /// Tap name.
    pub tap: String,
    /// MAC address.
    pub mac: [u8; 6],
}

/// Parses `52:54:00:12:34:56`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], VirtioError> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(VirtioError::BadMac(s.to_string()));
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).map_err(|_| VirtioError::BadMac(s.to_string()))?;
    }
    Ok(mac)
}

/// A virtio-net device.
pub struct Net {
    tap: Tap,
    mac: [u8; 6],
    rx_kick: EventFd,
}

impl Net {
    /// A device on an already set-up tap.
    pub fn new(tap: Tap, mac: [u8; 6]) -> Result<Self, VirtioError> {
        Ok(Net {
            tap,
            mac,
            rx_kick: EventFd::new(libc::EFD_NONBLOCK).map_err(VirtioError::EventFd)?,
        })
    }

    pub(super) fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC
    }

    pub(super) fn config(&self) -> Vec<u8> {
        self.mac.to_vec()
    }

    /// Tells the network that the guest's MAC is behind this tap now: a RARP
    /// broadcast from that MAC (what QEMU sends after a migration), so
    /// bridges and switches move the MAC to this port before the guest sends
    /// anything itself.
    pub fn announce(&self) -> std::io::Result<()> {
        let mut frame = [0u8; 60];
        frame[0..6].copy_from_slice(&[0xff; 6]);
        frame[6..12].copy_from_slice(&self.mac);
        frame[12..14].copy_from_slice(&0x8035u16.to_be_bytes());
        // Hardware Ethernet, protocol IPv4, lengths 6 and 4, opcode 3
        // (reverse request), sender and target hardware address the MAC.
        frame[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 3]);
        frame[22..28].copy_from_slice(&self.mac);
        frame[32..38].copy_from_slice(&self.mac);
        (&self.tap.file).write_all(&frame)
    }

    /// Saves the device config.
    pub fn save(&self) -> NetState {
        NetState {
            tap: self.tap.name.clone(),
            mac: self.mac,
        }
    }

    /// Queue notification: TX sends, RX wakes the RX thread.
    pub fn notify(&mut self, idx: u16, q: &mut Queue, mem: &GuestMemory) -> bool {
        match idx {
            TX_QUEUE => self.transmit(q, mem),
            RX_QUEUE => {
                let _ = self.rx_kick.write(1);
                false
            }
            _ => false,
        }
    }

    fn transmit(&mut self, q: &mut Queue, mem: &GuestMemory) -> bool {
        let mut used = false;
        for _ in 0..super::chains_per_notify(q) {
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            match gather(chain, mem) {
                Some(frame) if frame.len() > NET_HDR_LEN => {
                    // A full tap queue drops the frame, as a NIC would.
                    let _ = self.tap.file.write(&frame[NET_HDR_LEN..]);
                }
                _ => {}
            }
            let _ = q.add_used(mem, head, 0);
            used = true;
        }
        used
    }

    /// Places `frame` in the next receive buffer; false if the guest has
    /// none.
    pub(crate) fn receive(&mut self, q: &mut Queue, mem: &GuestMemory, frame: &[u8]) -> bool {
        let Some(chain) = q.pop_descriptor_chain(mem) else {
            return false;
        };
        let head = chain.head_index();
        let mut hdr = [0u8; NET_HDR_LEN];
        hdr[10] = 1; // num_buffers
        let mut data = hdr.to_vec();
        data.extend_from_slice(frame);
        let mut off = 0;
        for d in chain {
            if off >= data.len() {
                break;
            }
            if !d.is_write_only() {
                continue;
            }
            let n = (d.len() as usize).min(data.len() - off);
            if mem.write_slice(&data[off..off + n], d.addr()).is_err() {
                break;
            }
            off += n;
        }
        let _ = q.add_used(mem, head, off as u32);
        true
    }
}

/// The device-readable bytes of a TX chain (header and frame); `None`,
/// and nothing allocated beyond what was read, when they are longer than a
/// header and [`MAX_FRAME`] or not all in guest memory (a frame with a
/// piece cut out is not sent either).
fn gather(
    chain: impl Iterator<Item = virtio_queue::desc::split::Descriptor>,
    mem: &GuestMemory,
) -> Option<Vec<u8>> {
    let mut frame = Vec::new();
    for d in chain {
        if d.is_write_only() {
            continue;
        }
        let start = frame.len();
        let end = start + d.len() as usize;
        if end > NET_HDR_LEN + MAX_FRAME {
            return None;
        }
        frame.resize(end, 0);
        mem.read_slice(&mut frame[start..], d.addr()).ok()?;
    }
    Some(frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parsing() {
        assert_eq!(
            parse_mac("52:54:00:12:34:56").unwrap(),
            [0x52, 0x54, 0, 0x12, 0x34, 0x56]
        );
        assert!(parse_mac("52:54").is_err());
    }
}
