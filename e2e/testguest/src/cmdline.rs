//! Command-line parameters (space separated `key=value`, unknown keys ignored).

/// Most virtio-mmio devices taken from the command line.
pub const MAX_VIRTIO: usize = 8;

/// A `virtio_mmio.device=SIZE@ADDR:IRQ` entry.
#[derive(Clone, Copy, Default)]
pub struct MmioDevice {
    pub size: u64,
    pub addr: u64,
    /// Interrupt line; unused (devices are polled), printed from ACPI.
    pub irq: u32,
}

/// A block pattern request: `SECTOR:COUNT:SEED`.
#[derive(Clone, Copy)]
pub struct BlkPattern {
    pub sector: u64,
    pub count: u64,
    pub seed: u64,
}

/// The order in which a pass of the memory workload writes its pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// `dirty_order=seq`: pages 0, 1, 2, ...
    Seq,
    /// `dirty_order=random`: a pseudo-random permutation, new each generation.
    Random,
}

impl Order {
    pub fn name(self) -> &'static str {
        match self {
            Order::Seq => "seq",
            Order::Random => "random",
        }
    }
}

/// What a write of the memory workload stores in a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fill {
    /// `dirty_fill=marker`: two pattern words, the rest untouched.
    Marker,
    /// `dirty_fill=mix`: the whole page, as a zero, text-like or random page.
    Mix,
}

impl Fill {
    pub fn name(self) -> &'static str {
        match self {
            Fill::Marker => "marker",
            Fill::Mix => "mix",
        }
    }
}

/// The parsed command line.
pub struct Config {
    pub hb_ms: u64,
    /// LAPIC timer period; 0 until parsed, then explicit or derived from hb_ms.
    pub tick_us: u64,
    pub dirty_mib: u64,
    pub dirty_rate: u64,
    pub memcheck_s: u64,
    pub dirty_order: Order,
    pub dirty_fill: Fill,
    /// `mix_mib=N`: the workload's region in MiB (0 = the working set only).
    pub mix_mib: u64,
    pub virtio: [MmioDevice; MAX_VIRTIO],
    pub nvirtio: usize,
    pub ip: Option<([u8; 4], u8)>,
    pub gw: Option<[u8; 4]>,
    pub tcp_port: u16,
    pub blk_write: Option<BlkPattern>,
    pub blk_verify: Option<BlkPattern>,
    /// `pwrbtn=ignore`: report ACPI power-button presses but keep running.
    pub pwrbtn_ignore: bool,
}

impl Config {
    /// Parses `text`; malformed values keep the default.
    pub fn parse(text: &'static str) -> Config {
        let mut c = Config {
            hb_ms: 100,
            tick_us: 0,
            dirty_mib: 0,
            dirty_rate: 0,
            memcheck_s: 0,
            dirty_order: Order::Seq,
            dirty_fill: Fill::Marker,
            mix_mib: 0,
            virtio: [MmioDevice::default(); MAX_VIRTIO],
            nvirtio: 0,
            ip: None,
            gw: None,
            tcp_port: 7777,
            blk_write: None,
            blk_verify: None,
            pwrbtn_ignore: false,
        };
        for word in text.split_ascii_whitespace() {
            let Some((key, value)) = word.split_once('=') else {
                continue;
            };
            match key {
                "hb_ms" => {
                    if let Some(v) = parse_u64(value).filter(|v| *v > 0) {
                        c.hb_ms = v;
                    }
                }
                "tick_us" => {
                    if let Some(v) = parse_u64(value).filter(|v| *v >= 100) {
                        c.tick_us = v;
                    }
                }
                "dirty_mib" => c.dirty_mib = parse_u64(value).unwrap_or(0),
                "dirty_rate" => c.dirty_rate = parse_u64(value).unwrap_or(0),
                "memcheck_s" => c.memcheck_s = parse_u64(value).unwrap_or(0),
                "dirty_order" => match value {
                    "seq" => c.dirty_order = Order::Seq,
                    "random" => c.dirty_order = Order::Random,
                    _ => {}
                },
                "dirty_fill" => match value {
                    "marker" => c.dirty_fill = Fill::Marker,
                    "mix" => c.dirty_fill = Fill::Mix,
                    _ => {}
                },
                "mix_mib" => c.mix_mib = parse_u64(value).unwrap_or(0),
                "virtio_mmio.device" => {
                    if let Some(d) = parse_mmio(value) {
                        if c.nvirtio < MAX_VIRTIO {
                            c.virtio[c.nvirtio] = d;
                            c.nvirtio += 1;
                        }
                    }
                }
                "ip" => {
                    if let Some((a, p)) = value.split_once('/') {
                        if let (Some(a), Some(p)) = (parse_ipv4(a), parse_u64(p)) {
                            if p <= 32 {
                                c.ip = Some((a, p as u8));
                            }
                        }
                    }
                }
                "gw" => c.gw = parse_ipv4(value),
                "tcp_port" => {
                    if let Some(p) = parse_u64(value).filter(|p| *p > 0 && *p < 65536) {
                        c.tcp_port = p as u16;
                    }
                }
                "blk_write" => c.blk_write = parse_blk(value),
                "blk_verify" => c.blk_verify = parse_blk(value),
                "pwrbtn" => c.pwrbtn_ignore = value == "ignore",
                _ => {}
            }
        }
        if c.tick_us == 0 {
            // A tenth of the heartbeat period, between 1 and 10 ms: heartbeats
            // stay within 10% of their grid while an idle guest wakes rarely.
            c.tick_us = (c.hb_ms * 100).clamp(1000, 10_000);
        }
        c
    }
}

/// Parses decimal or `0x` hexadecimal.
pub fn parse_u64(s: &str) -> Option<u64> {
    if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()
    } else {
        s.parse().ok()
    }
}

/// Parses a size: decimal or hex, optional K/M/G suffix.
fn parse_size(s: &str) -> Option<u64> {
    let (num, shift) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        b'g' | b'G' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    parse_u64(num).map(|v| v << shift)
}

/// Parses an address: hex with or without `0x` (the Linux convention), or decimal
/// when it has no hex digits and no prefix is ambiguous; we treat a bare number as hex.
fn parse_addr(s: &str) -> Option<u64> {
    let h = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    u64::from_str_radix(h, 16).ok()
}

fn parse_mmio(s: &str) -> Option<MmioDevice> {
    let (size, rest) = s.split_once('@')?;
    let (addr, irq) = match rest.split_once(':') {
        Some((a, i)) => (a, parse_u64(i).unwrap_or(0) as u32),
        None => (rest, 0),
    };
    Some(MmioDevice {
        size: parse_size(size)?,
        addr: parse_addr(addr)?,
        irq,
    })
}

/// Parses dotted-quad IPv4.
pub fn parse_ipv4(s: &str) -> Option<[u8; 4]> {
    let mut out = [0u8; 4];
    let mut parts = s.split('.');
    for o in out.iter_mut() {
        *o = parts.next()?.parse().ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(out)
}

fn parse_blk(s: &str) -> Option<BlkPattern> {
    let mut it = s.split(':');
    let p = BlkPattern {
        sector: parse_u64(it.next()?)?,
        count: parse_u64(it.next()?)?,
        seed: parse_u64(it.next()?)?,
    };
    Some(p)
}
