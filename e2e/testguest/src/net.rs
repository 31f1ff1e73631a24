//! virtio-net + smoltcp: a static IPv4 address (ARP and ping answered by the
//! interface), and a TCP server on `tcp_port` that streams every heartbeat line
//! to each connected client.

use alloc::vec;
use alloc::vec::Vec;

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, Ipv4Address};
use virtio_drivers::device::net::VirtIONet;

use crate::virtio::{GuestHal, Mmio};

const QUEUE: usize = 16;
const BUF_LEN: usize = 2048;
const MTU: usize = 1514;
/// Concurrent TCP clients served.
pub const MAX_CLIENTS: usize = 4;

type Nic = VirtIONet<GuestHal, Mmio, QUEUE>;

/// smoltcp device over the virtio-net driver.
struct NetDevice {
    nic: Nic,
}

/// A received frame, copied out so the rx buffer goes straight back to the queue.
struct Rx {
    buf: [u8; MTU],
    len: usize,
}

struct Tx<'a> {
    nic: &'a mut Nic,
}

impl RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.buf[..self.len])
    }
}

impl TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut tx = self.nic.new_tx_buffer(len);
        let r = f(tx.packet_mut());
        let _ = self.nic.send(tx);
        r
    }
}

impl Device for NetDevice {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _t: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        if !self.nic.can_recv() {
            return None;
        }
        let rx = self.nic.receive().ok()?;
        let pkt = rx.packet();
        let len = pkt.len().min(MTU);
        let mut tok = Rx { buf: [0; MTU], len };
        tok.buf[..len].copy_from_slice(&pkt[..len]);
        let _ = self.nic.recycle_rx_buffer(rx);
        Some((tok, Tx { nic: &mut self.nic }))
    }

    fn transmit(&mut self, _t: Instant) -> Option<Self::TxToken<'_>> {
        if self.nic.can_send() {
            Some(Tx { nic: &mut self.nic })
        } else {
            None
        }
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = MTU;
        c.max_burst_size = Some(1);
        c
    }
}

/// The network stack and the heartbeat server.
pub struct Net {
    dev: NetDevice,
    iface: Interface,
    sockets: SocketSet<'static>,
    clients: Vec<SocketHandle>,
    port: u16,
    /// The MAC address, for the `NET up` line.
    pub mac: [u8; 6],
}

impl Net {
    /// Brings the interface up with `ip/prefix` and optional gateway.
    pub fn new(
        transport: Mmio,
        ip: [u8; 4],
        prefix: u8,
        gw: Option<[u8; 4]>,
        port: u16,
        now_ns: u64,
    ) -> Result<Net, &'static str> {
        let nic = Nic::new(transport, BUF_LEN).map_err(|_| "virtio-net init failed")?;
        let mac = nic.mac_address();
        let mut dev = NetDevice { nic };
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
        config.random_seed = now_ns ^ 0x5eed;
        let now = Instant::from_micros((now_ns / 1000) as i64);
        let mut iface = Interface::new(config, &mut dev, now);
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(
                IpAddress::v4(ip[0], ip[1], ip[2], ip[3]),
                prefix,
            ));
        });
        if let Some(g) = gw {
            let _ = iface
                .routes_mut()
                .add_default_ipv4_route(Ipv4Address::new(g[0], g[1], g[2], g[3]));
        }
        let mut sockets = SocketSet::new(vec![]);
        let mut clients = Vec::new();
        for _ in 0..MAX_CLIENTS {
            let s = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0; 512]),
                tcp::SocketBuffer::new(vec![0; 16384]),
            );
            clients.push(sockets.add(s));
        }
        let mut net = Net {
            dev,
            iface,
            sockets,
            clients,
            port,
            mac,
        };
        net.listen_all();
        Ok(net)
    }

    fn listen_all(&mut self) {
        for h in &self.clients {
            let s = self.sockets.get_mut::<tcp::Socket>(*h);
            if !s.is_open() {
                let _ = s.listen(self.port);
            }
        }
    }

    /// Processes received frames and timers; re-arms closed sockets.
    pub fn poll(&mut self, now_ns: u64) {
        let now = Instant::from_micros((now_ns / 1000) as i64);
        self.iface.poll(now, &mut self.dev, &mut self.sockets);
        for h in &self.clients {
            let s = self.sockets.get_mut::<tcp::Socket>(*h);
            // Discard anything clients send; close sockets the peer finished.
            if s.can_recv() {
                let _ = s.recv(|b| (b.len(), ()));
            }
            if s.state() == tcp::State::CloseWait {
                s.close();
            }
        }
        self.listen_all();
    }

    /// Queues `line` to every connected client with room for it. Clients whose
    /// send buffer is full miss the line (counters still never go back).
    pub fn broadcast(&mut self, line: &[u8]) {
        for h in &self.clients {
            let s = self.sockets.get_mut::<tcp::Socket>(*h);
            if s.may_send() && s.send_capacity() - s.send_queue() >= line.len() {
                let _ = s.send_slice(line);
            }
        }
    }

    /// Number of connected clients.
    pub fn connected(&self) -> usize {
        self.clients
            .iter()
            .filter(|h| self.sockets.get::<tcp::Socket>(**h).may_send())
            .count()
    }
}
