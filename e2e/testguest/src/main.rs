//! The Godwit test guest: a freestanding x86_64 guest booted through PVH that
//! prints heartbeats, dirties and verifies memory, writes and verifies a disk
//! pattern, and streams heartbeats over TCP. Its command line and output lines
//! are documented in README.md; other tools parse them.
//!
//! Flow: `boot` (32-bit PVH entry, page tables, long mode) calls [`main64`] in
//! ring 0, which reads the start info, counts CPUs, starts the clock and the
//! LAPIC timer, brings up virtio devices and the workload, then drops to ring 3
//! (`interrupts::enter_user`) where [`Guest::run`] loops forever: heartbeats,
//! console commands, network polling, memory work in bounded chunks, and a
//! halt until the next tick when idle. Ring 3 because this KVM emulates every
//! ring-0 instruction but runs ring 3 natively.

#![no_std]
#![no_main]

extern crate alloc;

mod acpi;
mod aml;
mod amleval;
mod boot;
mod clock;
mod cmdline;
mod fat;
mod interrupts;
mod net;
mod pattern;
mod platform;
mod power;
mod rt;
mod seed;
#[macro_use]
mod serial;
mod startinfo;
mod virtio;
mod workload;

use core::fmt::{self, Write};
use core::ptr::addr_of_mut;

use linked_list_allocator::LockedHeap;
use virtio_drivers::device::blk::VirtIOBlk;
use virtio_drivers::transport::{DeviceType, Transport};

use crate::cmdline::{parse_u64, Config, Fill};
use crate::net::Net;
use crate::startinfo::StartInfo;
use crate::virtio::{Blk, BlkOutcome};
use crate::workload::{Check, CheckResult, Layout, Workload, PAGE};

/// Printed on the first line.
const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Where the memory working set starts.
const WORKSET_BASE: u64 = 64 << 20;
/// Work done between checks of the clock, and the budget of one chunk.
const CHUNK_PAGES: u64 = 64;
const CHUNK_NS: u64 = 500_000;
const CONSOLE_POLL_NS: u64 = 5_000_000;
const MAXPAUSE_EVERY_NS: u64 = 10_000_000_000;

const HEAP_SIZE: usize = 8 << 20;

#[repr(C, align(4096))]
struct HeapMem([u8; HEAP_SIZE]);

#[link_section = ".bss.noinit"]
static mut HEAP_MEM: HeapMem = HeapMem([0; HEAP_SIZE]);

const USER_STACK_SIZE: usize = 256 * 1024;

#[link_section = ".bss.noinit"]
static mut USER_STACK: boot::Stack<USER_STACK_SIZE> = boot::Stack([0; USER_STACK_SIZE]);

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

extern "C" {
    static __image_end: u8;
}

/// Stops the CPU for good.
pub fn halt_forever() -> ! {
    if serial::IN_USER_MODE.load(core::sync::atomic::Ordering::Relaxed) {
        // SAFETY: the UD2 stop call never returns.
        unsafe { core::arch::asm!("ud2", in("rax") interrupts::SYS_STOP, options(noreturn)) };
    }
    loop {
        // SAFETY: cli; hlt only stops this CPU.
        unsafe { core::arch::asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("PANIC {}", info);
    halt_forever()
}

/// A line assembled in a fixed buffer (heartbeats go to the console and to TCP).
struct LineBuf {
    buf: [u8; 96],
    len: usize,
}

impl Write for LineBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let b = s.as_bytes();
        let n = b.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&b[..n]);
        self.len += n;
        Ok(())
    }
}

/// Everything the main loop owns.
struct Guest {
    cfg: Config,
    info: StartInfo,
    blk: Option<Blk>,
    net: Option<Net>,
    work: Option<Workload>,
    /// Pages written by workloads that `dirty` has since replaced.
    written_before: u64,
    check: Option<Check>,
    power: power::Power,
    hb: u64,
    hb_period_ns: u64,
    next_hb_ns: u64,
    last_hb_ns: u64,
    max_gap_ns: u64,
    next_maxpause_ns: u64,
    next_memcheck_ns: u64,
    next_console_ns: u64,
    line: [u8; 160],
    line_len: usize,
}

/// Measures the cost of the operations the main loop relies on.
fn bench(work: Option<&mut Workload>) {
    let t0 = clock::now_ns();
    for _ in 0..100 {
        core::hint::black_box(clock::now_ns());
    }
    let t1 = clock::now_ns();
    for _ in 0..100 {
        core::hint::black_box(serial::read_byte());
    }
    let t2 = clock::now_ns();
    let mut x = 0u64;
    for i in 0..100_000u64 {
        x = core::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
    }
    let t3 = clock::now_ns();
    let mut pages = 0;
    // Not during a cold fill: it would overwrite what the passes wrote.
    if let Some(w) = work.filter(|w| !w.filling()) {
        pages = w.pages.min(256);
        w.write(pages);
    }
    let t4 = clock::now_ns();
    println!(
        "BENCH clock_ns={} console_read_ns={} loop100k_ns={} pages={} write_ns={}",
        (t1 - t0) / 100,
        (t2 - t1) / 100,
        t3 - t2,
        pages,
        t4 - t3
    );
}

#[no_mangle]
extern "C" fn main64(start_info: u32) -> ! {
    serial::init();
    println!("GODWIT-TESTGUEST {}", VERSION);
    interrupts::init_cpu_tables();
    // SAFETY: HEAP_MEM is used only by the allocator from here on.
    unsafe {
        HEAP.lock()
            .init(addr_of_mut!(HEAP_MEM) as *mut u8, HEAP_SIZE)
    };

    let Some(info) = StartInfo::read(start_info as u64) else {
        println!("PANIC no PVH start info at {:#x}", start_info);
        halt_forever()
    };
    println!("CMDLINE {}", info.cmdline);
    let mut cfg = Config::parse(info.cmdline);
    let ram_end = info.ram_end();
    for gib in 4..ram_end.div_ceil(1 << 30) as usize {
        if !boot::map_gib(gib) {
            println!("WARN RAM above {} GiB is not mapped", gib);
            break;
        }
    }
    println!("MEM {}", info.ram_bytes());
    let (cpus, _) = acpi::count_cpus(info.rsdp);
    println!("CPUS {}", cpus);
    let source = clock::init();
    let lapic_per_ms = interrupts::start_timer(cfg.tick_us);
    println!("CLOCK {} lapic_per_ms={}", source, lapic_per_ms);
    let platform = platform::discover(info.rsdp);
    platform.apply(&mut cfg);
    let ignore_button = cfg.pwrbtn_ignore;

    let mut g = Guest {
        hb_period_ns: cfg.hb_ms * 1_000_000,
        cfg,
        info,
        blk: None,
        net: None,
        work: None,
        written_before: 0,
        check: None,
        power: power::Power::new(platform, ignore_button),
        hb: 0,
        next_hb_ns: 0,
        last_hb_ns: 0,
        max_gap_ns: 0,
        next_maxpause_ns: 0,
        next_memcheck_ns: 0,
        next_console_ns: 0,
        line: [0; 160],
        line_len: 0,
    };
    g.setup_devices();
    if g.cfg.dirty_mib > 0 {
        g.start_workload(g.cfg.dirty_mib, g.cfg.dirty_rate);
    }
    let g = alloc::boxed::Box::leak(alloc::boxed::Box::new(g));
    let stack = addr_of_mut!(USER_STACK) as u64 + USER_STACK_SIZE as u64;
    interrupts::enter_user(user_main, g as *mut Guest as u64, stack)
}

/// The main loop, in ring 3.
extern "C" fn user_main(guest: u64) -> ! {
    // SAFETY: `guest` is the leaked Box passed by main64; nothing else uses it.
    let g = unsafe { &mut *(guest as *mut Guest) };
    g.finish_boot();
    g.run()
}

impl Guest {
    /// Brings up the devices the guest found (from ACPI, else the command
    /// line): the first virtio-blk device that is not a cloud-init seed is
    /// the pattern disk; a seed (FAT labelled `cidata`) gives the hostname
    /// and the first NIC's address, as cloud-init would take them; the first
    /// virtio-net device starts once every disk has been looked at.
    fn setup_devices(&mut self) {
        let mut nic: Option<(virtio::Mmio, u64)> = None;
        let mut seed: Option<seed::Seed> = None;
        for i in 0..self.cfg.nvirtio {
            let d = self.cfg.virtio[i];
            let Some(t) = virtio::open(&d) else {
                continue;
            };
            println!("VIRTIO {:#x} {}", d.addr, virtio::kind_name(&t));
            match t.device_type() {
                DeviceType::Block => {
                    let mut b = match VirtIOBlk::new(t) {
                        Ok(b) => b,
                        Err(_) => {
                            println!("WARN virtio-blk at {:#x} failed to start", d.addr);
                            continue;
                        }
                    };
                    if seed.is_none() {
                        if let Some(s) = seed::read(&mut virtio::BlkSectors(&mut b)) {
                            seed = Some(s);
                            continue;
                        }
                    }
                    if self.blk.is_none() {
                        self.blk = Some(b);
                    }
                }
                DeviceType::Network if nic.is_none() => nic = Some((t, d.addr)),
                _ => {}
            }
        }
        let mut ip = self.cfg.ip;
        let mut gw = self.cfg.gw;
        if let Some(s) = &seed {
            println!("SEED label={} files={}", s.label, s.files.join(","));
            if let Some(h) = &s.hostname {
                println!("HOSTNAME {}", h);
            }
        }
        if let Some((t, addr)) = nic {
            let mac = virtio::net_mac(&t);
            if let Some(n) = seed.as_ref().and_then(|s| s.net.as_ref()) {
                if !n.matches(mac) {
                    println!("WARN seed network-config is for another MAC; NIC at {:#x} keeps the command line's", addr);
                } else if n.dhcp4 {
                    println!("WARN seed asks for DHCP, which the test guest has no client for");
                } else if let Some(a) = n.address {
                    ip = Some(a);
                    gw = n.gateway;
                }
            }
            match ip {
                None => println!("WARN virtio-net at {:#x} unused: no ip= given", addr),
                Some((ip, prefix)) => {
                    match Net::new(t, ip, prefix, gw, self.cfg.tcp_port, clock::now_ns()) {
                        Ok(n) => {
                            let m = n.mac;
                            println!(
                                "NET up ip={}.{}.{}.{} mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                                ip[0], ip[1], ip[2], ip[3], m[0], m[1], m[2], m[3], m[4], m[5]
                            );
                            self.net = Some(n);
                        }
                        Err(e) => println!("WARN {}", e),
                    }
                }
            }
        }
        if let Some(p) = self.cfg.blk_write {
            self.blk_write(p.sector, p.count, p.seed);
        }
        if let Some(p) = self.cfg.blk_verify {
            self.blk_verify(p.sector, p.count, p.seed);
        }
    }

    /// The rest of the boot, in ring 3 (where memory writes run natively):
    /// the workload's cold fill, then `READY` and the clocks of the main loop.
    fn finish_boot(&mut self) {
        if let Some(w) = self.work.as_mut().filter(|w| w.filling()) {
            let t0 = clock::now_ns();
            while !w.fill_some(CHUNK_PAGES * 16) {}
            println!(
                "DIRTY filled pages={} ms={}",
                w.filled,
                (clock::now_ns() - t0) / 1_000_000
            );
        }
        let now = clock::now_ns();
        self.last_hb_ns = now;
        self.next_hb_ns = now + self.hb_period_ns;
        self.next_maxpause_ns = now + MAXPAUSE_EVERY_NS;
        self.next_memcheck_ns = now + self.cfg.memcheck_s * 1_000_000_000;
        println!("READY");
    }

    /// Replaces the workload by one of `mib` MiB at `rate` pages/s, with the
    /// command line's order, fill and `mix_mib` region. Its cold fill runs
    /// before `READY` at boot, in the main loop's chunks after `dirty`.
    fn start_workload(&mut self, mib: u64, rate: u64) {
        self.check = None;
        if let Some(old) = self.work.take() {
            self.written_before += old.written;
        }
        if mib == 0 {
            println!("DIRTY stopped");
            return;
        }
        let mix = self.cfg.dirty_fill == Fill::Mix && self.cfg.mix_mib >= mib;
        let region_mib = if mix { self.cfg.mix_mib } else { mib };
        let image_end = core::ptr::addr_of!(__image_end) as u64;
        let bytes = region_mib << 20;
        if image_end > WORKSET_BASE || !self.info.is_ram(WORKSET_BASE, bytes) {
            let what = if mix { "mix_mib region" } else { "working set" };
            println!(
                "DIRTY refused mib={} base={:#x} ram_end={:#x} region_mib={}: {} does not fit in RAM",
                mib,
                WORKSET_BASE,
                self.info.ram_end(),
                region_mib,
                what
            );
            return;
        }
        let layout = Layout {
            base: WORKSET_BASE,
            region_pages: bytes / PAGE,
            hot_pages: (mib << 20) / PAGE,
            cold_fill: mix,
        };
        let w = Workload::new(
            layout,
            self.cfg.dirty_order,
            self.cfg.dirty_fill,
            rate,
            clock::now_ns(),
        );
        println!(
            "DIRTY mib={} rate={} pages={} base={:#x} order={} fill={} region_pages={}",
            mib,
            rate,
            w.pages,
            WORKSET_BASE,
            w.order.name(),
            w.fill.name(),
            layout.region_pages
        );
        self.work = Some(w);
    }

    fn blk_write(&mut self, sector: u64, count: u64, seed: u64) {
        let Some(blk) = self.blk.as_mut() else {
            println!("BLK write bad error=nodevice");
            return;
        };
        match virtio::blk_write(blk, sector, count, seed) {
            BlkOutcome::Ok => println!(
                "BLK write ok sector={} count={} seed={}",
                sector, count, seed
            ),
            BlkOutcome::Io { sector } => println!("BLK write bad sector={} error=io", sector),
            BlkOutcome::Mismatch { .. } => {}
        }
        self.blk_verify(sector, count, seed);
    }

    fn blk_verify(&mut self, sector: u64, count: u64, seed: u64) {
        let Some(blk) = self.blk.as_mut() else {
            println!("BLK verify bad error=nodevice");
            return;
        };
        match virtio::blk_verify(blk, sector, count, seed) {
            BlkOutcome::Ok => println!(
                "BLK verify ok sector={} count={} seed={}",
                sector, count, seed
            ),
            BlkOutcome::Io { sector } => println!("BLK verify bad sector={} error=io", sector),
            BlkOutcome::Mismatch {
                sector,
                word,
                expected,
                found,
            } => println!(
                "BLK verify bad sector={} word={} expected={:#018x} found={:#018x}",
                sector, word, expected, found
            ),
        }
    }

    fn heartbeat(&mut self, now: u64) {
        self.hb += 1;
        let gap = now.saturating_sub(self.last_hb_ns);
        self.max_gap_ns = self.max_gap_ns.max(gap);
        self.last_hb_ns = now;
        let mut l = LineBuf {
            buf: [0; 96],
            len: 0,
        };
        let written = self.written_before + self.work.as_ref().map_or(0, |w| w.written);
        let _ = writeln!(l, "HB {} {} {}", self.hb, now, written);
        serial::write_bytes(&l.buf[..l.len]);
        if let Some(n) = self.net.as_mut() {
            n.broadcast(&l.buf[..l.len]);
        }
        self.next_hb_ns += self.hb_period_ns;
        if self.next_hb_ns <= now {
            self.next_hb_ns = now + self.hb_period_ns;
        }
    }

    fn print_maxpause(&self) {
        println!("MAXPAUSE {}", self.max_gap_ns / 1_000_000);
    }

    fn start_memcheck(&mut self) {
        if self.work.is_none() {
            println!("MEMCHECK ok gen=0 pages=0");
            return;
        }
        if self.check.is_none() {
            self.check = Some(Workload::start_check());
        }
    }

    /// Runs chunks of verification and dirtying until the budget is spent or a
    /// heartbeat is due. Returns whether work remains (the loop must not halt).
    fn do_work(&mut self, start: u64) -> bool {
        loop {
            let now = clock::now_ns();
            if now >= self.next_hb_ns || now.saturating_sub(start) >= CHUNK_NS {
                return self.check.is_some()
                    || self
                        .work
                        .as_ref()
                        .is_some_and(|w| !w.paused && (w.filling() || w.rate == 0));
            }
            let Some(w) = self.work.as_mut() else {
                return false;
            };
            if let Some(c) = self.check.as_mut() {
                if let Some(r) = w.check_some(c, CHUNK_PAGES * 4) {
                    self.check = None;
                    match r {
                        CheckResult::Ok { gen, pages } => {
                            println!("MEMCHECK ok gen={} pages={}", gen, pages)
                        }
                        CheckResult::Bad {
                            page,
                            expected,
                            found,
                        } => println!(
                            "MEMCHECK bad page={} expected={:#018x} found={:#018x}",
                            page, expected, found
                        ),
                    }
                }
                continue;
            }
            if w.filling() && !w.paused {
                w.fill_some(CHUNK_PAGES);
                continue;
            }
            let n = w.allowed(now).min(CHUNK_PAGES);
            if n == 0 {
                return false;
            }
            w.write(n);
        }
    }

    fn command(&mut self) {
        let mut buf = [0u8; 160];
        let n = self.line_len;
        buf[..n].copy_from_slice(&self.line[..n]);
        self.line_len = 0;
        let text = core::str::from_utf8(&buf[..n]).unwrap_or("").trim();
        let mut words = text.split_ascii_whitespace();
        let Some(cmd) = words.next() else {
            return;
        };
        let mut args = [0u64; 3];
        let mut nargs = 0;
        let mut bad_arg = false;
        for (i, w) in words.enumerate() {
            if i < 3 {
                match parse_u64(w) {
                    Some(v) => args[i] = v,
                    None => bad_arg = true,
                }
                nargs = i + 1;
            }
        }
        if bad_arg {
            println!("ERR bad argument: {}", text);
            return;
        }
        match (cmd, nargs) {
            ("status", _) => {
                let (pages, gen, pos, written, rate) = match &self.work {
                    Some(w) => (w.pages, w.gen, w.pos, w.written, w.rate),
                    None => (0, 0, 0, 0, 0),
                };
                println!(
                    "STATUS hb={} ns={} ticks={} pages={} rate={} gen={} pos={} written={} maxpause_ms={} clients={} order={} fill={}",
                    self.hb,
                    clock::now_ns(),
                    interrupts::ticks(),
                    pages,
                    rate,
                    gen,
                    pos,
                    written,
                    self.max_gap_ns / 1_000_000,
                    self.net.as_ref().map_or(0, |n| n.connected()),
                    self.cfg.dirty_order.name(),
                    self.cfg.dirty_fill.name()
                );
            }
            ("memcheck", _) => self.start_memcheck(),
            ("dirty", 1) => self.start_workload(args[0], 0),
            ("dirty", 2) => self.start_workload(args[0], args[1]),
            ("maxpause", _) => self.print_maxpause(),
            ("blkwrite", 3) => self.blk_write(args[0], args[1], args[2]),
            ("blkverify", 3) => self.blk_verify(args[0], args[1], args[2]),
            ("corrupt", 1) => {
                if self.work.as_mut().is_some_and(|w| w.corrupt(args[0])) {
                    println!("CORRUPT page={}", args[0]);
                } else {
                    println!("CORRUPT refused page={}", args[0]);
                }
            }
            ("bench", _) => bench(self.work.as_mut()),
            ("poweroff", _) => self.power.power_off(),
            ("reset", _) => self.power.reset(),
            ("help", _) => println!(
                "HELP status | memcheck | dirty MIB [RATE] | maxpause | blkwrite SECTOR COUNT SEED | blkverify SECTOR COUNT SEED | corrupt PAGE | bench | poweroff | reset | help"
            ),
            _ => println!("ERR unknown command: {}", text),
        }
    }

    fn poll_console(&mut self) {
        while let Some(b) = serial::read_byte() {
            match b {
                b'\n' | b'\r' => self.command(),
                _ if self.line_len < self.line.len() => {
                    self.line[self.line_len] = b;
                    self.line_len += 1;
                }
                _ => {}
            }
        }
    }

    fn run(&mut self) -> ! {
        loop {
            let seen = interrupts::ticks();
            let now = clock::now_ns();
            if now >= self.next_hb_ns {
                self.heartbeat(now);
            }
            if now >= self.next_maxpause_ns {
                self.print_maxpause();
                self.next_maxpause_ns = now + MAXPAUSE_EVERY_NS;
            }
            if self.cfg.memcheck_s > 0 && now >= self.next_memcheck_ns {
                self.next_memcheck_ns = now + self.cfg.memcheck_s * 1_000_000_000;
                if self.work.is_some() {
                    self.start_memcheck();
                }
            }
            if now >= self.next_console_ns {
                // A console read costs a trip through (emulated) ring 0.
                self.next_console_ns = now + CONSOLE_POLL_NS;
                self.poll_console();
                self.power.poll();
            }
            if let Some(n) = self.net.as_mut() {
                n.poll(now);
            }
            let busy = self.do_work(now);
            if !busy {
                interrupts::wait_for_tick(seen);
            }
        }
    }
}
