//! Guest time in nanoseconds: kvmclock when the hypervisor offers it
//! (KVM CPUID leaf 0x40000001, `MSR_KVM_SYSTEM_TIME_NEW`), otherwise the TSC
//! calibrated against the PIT. Integer math only.

use core::arch::asm;
use core::arch::x86_64::{__cpuid, _rdtsc};
use core::ptr::{addr_of, read_volatile};
use core::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use crate::serial::{inb, outb};

const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;

/// `pvclock_vcpu_time_info`, written by the hypervisor.
#[repr(C, align(64))]
struct PvClock {
    version: u32,
    pad0: u32,
    tsc_timestamp: u64,
    system_time: u64,
    tsc_to_system_mul: u32,
    tsc_shift: i8,
    flags: u8,
    pad: [u8; 2],
}

static mut PVCLOCK: PvClock = PvClock {
    version: 0,
    pad0: 0,
    tsc_timestamp: 0,
    system_time: 0,
    tsc_to_system_mul: 0,
    tsc_shift: 0,
    flags: 0,
    pad: [0; 2],
};

const SRC_NONE: u8 = 0;
const SRC_KVMCLOCK: u8 = 1;
const SRC_TSC: u8 = 2;

static SOURCE: AtomicU8 = AtomicU8::new(SRC_NONE);
/// TSC ticks per microsecond-scaled factor: ns = tsc * TSC_MUL >> 32.
static TSC_MUL: AtomicU64 = AtomicU64::new(0);
static TSC_BASE: AtomicU64 = AtomicU64::new(0);

/// Writes a model-specific register.
pub fn wrmsr(msr: u32, v: u64) {
    // SAFETY: only called for MSRs whose meaning this guest knows (kvmclock,
    // APIC base); no memory is touched by the instruction itself.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32, options(nostack, preserves_flags))
    };
}

/// Reads a model-specific register.
pub fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: reading an architectural MSR has no memory effects.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    (hi as u64) << 32 | lo as u64
}

fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no side effects.
    unsafe { _rdtsc() }
}

/// Whether the hypervisor signature at 0x40000000 is KVM's, and its features.
fn kvm_features() -> Option<u32> {
    let sig = __cpuid(0x4000_0000);
    let ok = sig.ebx == 0x4b4d_564b && sig.ecx == 0x564b_4d56 && sig.edx == 0x4d;
    if !ok {
        return None;
    }
    Some(__cpuid(0x4000_0001).eax)
}

/// Picks the clock source. Returns its name.
pub fn init() -> &'static str {
    if let Some(f) = kvm_features() {
        if f & KVM_FEATURE_CLOCKSOURCE2 != 0 {
            wrmsr(MSR_KVM_SYSTEM_TIME_NEW, addr_of!(PVCLOCK) as u64 | 1);
            SOURCE.store(SRC_KVMCLOCK, Ordering::SeqCst);
            if now_ns() != 0 {
                return "kvmclock";
            }
        }
    }
    let per_ms = tsc_per_ms_from_pit();
    // ns = tsc * 1_000_000 / per_ms  ==  tsc * (1e6 << 32 / per_ms) >> 32
    TSC_MUL.store((1_000_000u64 << 32) / per_ms.max(1), Ordering::SeqCst);
    TSC_BASE.store(rdtsc(), Ordering::SeqCst);
    SOURCE.store(SRC_TSC, Ordering::SeqCst);
    "tsc"
}

/// Measures TSC ticks per millisecond over 10 ms of PIT channel 2.
fn tsc_per_ms_from_pit() -> u64 {
    // PIT input clock 1193182 Hz; 10 ms = 11932 counts, one-shot (mode 0) on
    // channel 2 with the gate on and the speaker off; OUT2 (port 0x61 bit 5)
    // goes high at terminal count.
    let count: u16 = 11932;
    outb(0x61, (inb(0x61) & !0x02) | 0x01);
    outb(0x43, 0xb0);
    outb(0x42, count as u8);
    outb(0x42, (count >> 8) as u8);
    let start = rdtsc();
    let mut spins = 0u64;
    while inb(0x61) & 0x20 == 0 && spins < 50_000_000 {
        spins += 1;
    }
    let end = rdtsc();
    ((end - start) / 10).max(1)
}

/// Nanoseconds since an arbitrary origin (boot for kvmclock).
pub fn now_ns() -> u64 {
    match SOURCE.load(Ordering::Relaxed) {
        SRC_KVMCLOCK => kvmclock_ns(),
        SRC_TSC => {
            let d = rdtsc().wrapping_sub(TSC_BASE.load(Ordering::Relaxed));
            ((d as u128 * TSC_MUL.load(Ordering::Relaxed) as u128) >> 32) as u64
        }
        _ => 0,
    }
}

fn kvmclock_ns() -> u64 {
    let p = addr_of!(PVCLOCK);
    loop {
        // SAFETY: PVCLOCK is a static the hypervisor updates; volatile reads of
        // its fields, bracketed by the version protocol (odd = update in progress).
        unsafe {
            let v1 = read_volatile(addr_of!((*p).version));
            if v1 & 1 != 0 {
                continue;
            }
            core::sync::atomic::fence(Ordering::Acquire);
            let ts = read_volatile(addr_of!((*p).tsc_timestamp));
            let sys = read_volatile(addr_of!((*p).system_time));
            let mul = read_volatile(addr_of!((*p).tsc_to_system_mul));
            let shift = read_volatile(addr_of!((*p).tsc_shift));
            let tsc = rdtsc();
            core::sync::atomic::fence(Ordering::Acquire);
            let v2 = read_volatile(addr_of!((*p).version));
            if v1 != v2 {
                continue;
            }
            let mut delta = tsc.wrapping_sub(ts);
            if shift < 0 {
                delta >>= (-shift) as u32;
            } else {
                delta <<= shift as u32;
            }
            return sys.wrapping_add(((delta as u128 * mul as u128) >> 32) as u64);
        }
    }
}

/// Busy-waits `ns` nanoseconds.
pub fn spin_ns(ns: u64) {
    let start = now_ns();
    while now_ns().wrapping_sub(start) < ns {
        core::hint::spin_loop();
    }
}
