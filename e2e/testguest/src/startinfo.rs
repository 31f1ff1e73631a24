//! The PVH `hvm_start_info` structure: command line, RSDP and memory map.

/// Magic value at the start of `hvm_start_info`.
pub const MAGIC: u32 = 0x336e_c578;

/// Memory-map entry type for usable RAM.
pub const E820_RAM: u32 = 1;

/// Maximum memory-map entries kept.
pub const MAX_REGIONS: usize = 32;

/// A memory-map entry.
#[derive(Clone, Copy, Default)]
pub struct Region {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// What the guest takes from the start info.
pub struct StartInfo {
    #[allow(dead_code)]
    pub version: u32,
    pub cmdline: &'static str,
    pub rsdp: u64,
    pub regions: [Region; MAX_REGIONS],
    pub nregions: usize,
}

impl StartInfo {
    /// Reads the start info at physical address `paddr` (identity mapped).
    /// Returns `None` when the magic does not match.
    pub fn read(paddr: u64) -> Option<StartInfo> {
        if paddr == 0 {
            return None;
        }
        let p = paddr as *const u8;
        // SAFETY: the loader passes a valid start info in identity-mapped RAM;
        // fields are read unaligned as plain integers.
        unsafe {
            let rd32 = |off: usize| core::ptr::read_unaligned(p.add(off) as *const u32);
            let rd64 = |off: usize| core::ptr::read_unaligned(p.add(off) as *const u64);
            if rd32(0) != MAGIC {
                return None;
            }
            let version = rd32(4);
            let cmdline_paddr = rd64(24);
            let rsdp = rd64(32);
            let mut info = StartInfo {
                version,
                cmdline: c_str(cmdline_paddr),
                rsdp,
                regions: [Region::default(); MAX_REGIONS],
                nregions: 0,
            };
            if version >= 1 {
                let memmap = rd64(40) as *const u8;
                let entries = rd32(48) as usize;
                if !memmap.is_null() {
                    for i in 0..entries.min(MAX_REGIONS) {
                        let e = memmap.add(i * 24);
                        info.regions[i] = Region {
                            addr: core::ptr::read_unaligned(e as *const u64),
                            size: core::ptr::read_unaligned(e.add(8) as *const u64),
                            kind: core::ptr::read_unaligned(e.add(16) as *const u32),
                        };
                    }
                    info.nregions = entries.min(MAX_REGIONS);
                }
            }
            Some(info)
        }
    }

    /// The memory-map entries.
    pub fn regions(&self) -> &[Region] {
        &self.regions[..self.nregions]
    }

    /// Total bytes of RAM in the memory map.
    pub fn ram_bytes(&self) -> u64 {
        self.regions()
            .iter()
            .filter(|r| r.kind == E820_RAM)
            .map(|r| r.size)
            .sum()
    }

    /// Highest RAM address (exclusive).
    pub fn ram_end(&self) -> u64 {
        self.regions()
            .iter()
            .filter(|r| r.kind == E820_RAM)
            .map(|r| r.addr + r.size)
            .max()
            .unwrap_or(0)
    }

    /// Whether `[addr, addr+len)` lies within one RAM entry.
    pub fn is_ram(&self, addr: u64, len: u64) -> bool {
        self.regions()
            .iter()
            .any(|r| r.kind == E820_RAM && r.addr <= addr && addr + len <= r.addr + r.size)
    }
}

/// Reads a NUL-terminated string at `paddr` (at most 4 KiB, ASCII expected).
///
/// # Safety
/// `paddr` must be 0 or point to readable identity-mapped memory.
unsafe fn c_str(paddr: u64) -> &'static str {
    if paddr == 0 {
        return "";
    }
    let p = paddr as *const u8;
    let mut n = 0;
    // SAFETY: the caller guarantees readability; we stop at NUL or 4 KiB.
    while n < 4096 && unsafe { *p.add(n) } != 0 {
        n += 1;
    }
    // SAFETY: the bytes are valid for 'static (loader memory we never free).
    let bytes = unsafe { core::slice::from_raw_parts(p, n) };
    core::str::from_utf8(bytes).unwrap_or("")
}
