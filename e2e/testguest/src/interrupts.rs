//! GDT with a TSS (interrupt stacks), the IDT, exception reporting, and the
//! LAPIC timer. Every vector runs on an IST stack. The timer handler only counts
//! ticks and signals EOI; the main loop does all the work.

use core::arch::{asm, global_asm};
use core::ptr::{addr_of, addr_of_mut};
use core::sync::atomic::{AtomicU64, Ordering};

use crate::boot::Stack;
use crate::clock;

/// Vector of the LAPIC timer.
pub const TIMER_VECTOR: u8 = 0x20;
/// Vector of the LAPIC spurious interrupt.
pub const SPURIOUS_VECTOR: u8 = 0xff;
/// Physical (and virtual) address of the local APIC.
pub const LAPIC_BASE: u64 = 0xfee0_0000;

const LAPIC_SVR: u64 = 0xf0;
const LAPIC_LVT_TIMER: u64 = 0x320;
const LAPIC_TIMER_INIT: u64 = 0x380;
const LAPIC_TIMER_CUR: u64 = 0x390;
const LAPIC_TIMER_DIV: u64 = 0x3e0;
const LAPIC_TPR: u64 = 0x80;
const LAPIC_LVT_LINT0: u64 = 0x350;
const IA32_APIC_BASE: u32 = 0x1b;

/// Timer ticks counted by the interrupt handler.
#[no_mangle]
pub static GODWIT_TICKS: AtomicU64 = AtomicU64::new(0);

const IST_SIZE: usize = 16 * 1024;
#[link_section = ".bss.noinit"]
static mut IST_EXC: Stack<IST_SIZE> = Stack([0; IST_SIZE]);
#[link_section = ".bss.noinit"]
static mut IST_IRQ: Stack<IST_SIZE> = Stack([0; IST_SIZE]);
#[link_section = ".bss.noinit"]
static mut IST_NMI: Stack<IST_SIZE> = Stack([0; IST_SIZE]);
#[link_section = ".bss.noinit"]
static mut IST_DF: Stack<IST_SIZE> = Stack([0; IST_SIZE]);

#[repr(C, packed)]
struct Tss {
    reserved0: u32,
    rsp: [u64; 3],
    reserved1: u64,
    ist: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    iomap_base: u16,
}

static mut TSS: Tss = Tss {
    reserved0: 0,
    rsp: [0; 3],
    reserved1: 0,
    ist: [0; 7],
    reserved2: 0,
    reserved3: 0,
    iomap_base: 104,
};

#[repr(C, align(16))]
struct Gdt([u64; 7]);

/// Kernel code 0x08, kernel data 0x10, user data 0x18, user code 0x20, TSS 0x28.
static mut GDT: Gdt = Gdt([
    0,
    0x00af_9a00_0000_ffff,
    0x00cf_9200_0000_ffff,
    0x00cf_f200_0000_ffff,
    0x00af_fa00_0000_ffff,
    0,
    0,
]);

const USER_DS: u64 = 0x18 | 3;
const USER_CS: u64 = 0x20 | 3;
/// Call numbers (rax) of the UD2 calls from ring 3 served by `ud_entry`.
pub const SYS_HALT: u64 = 0;
pub const SYS_WRITE: u64 = 1;
pub const SYS_READ: u64 = 2;
pub const SYS_STOP: u64 = 3;

/// Stack for interrupts and calls that arrive from ring 3 (TSS.RSP0).
#[link_section = ".bss.noinit"]
static mut KERNEL_STACK: Stack<IST_SIZE> = Stack([0; IST_SIZE]);

#[repr(C, align(16))]
#[derive(Clone, Copy)]
struct Gate {
    off_lo: u16,
    sel: u16,
    ist: u8,
    attr: u8,
    off_mid: u16,
    off_hi: u32,
    reserved: u32,
}

const EMPTY_GATE: Gate = Gate {
    off_lo: 0,
    sel: 0,
    ist: 0,
    attr: 0,
    off_mid: 0,
    off_hi: 0,
    reserved: 0,
};

static mut IDT: [Gate; 256] = [EMPTY_GATE; 256];

#[repr(C, packed)]
struct DescPtr {
    limit: u16,
    base: u64,
}

extern "C" {
    static exc_stub_table: [u64; 32];
    fn timer_isr();
    fn spurious_isr();
    fn ud_entry();
}

global_asm!(
    r#"
    .section .text.isr, "ax"
    .code64
    .macro EXC_NOERR n
exc_stub_\n:
    pushq $0
    pushq $\n
    jmp exc_common
    .endm
    .macro EXC_ERR n
exc_stub_\n:
    pushq $\n
    jmp exc_common
    .endm

    .irp n, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31
    EXC_NOERR \n
    .endr
    .irp n, 8,10,11,12,13,14,17,21,29,30
    EXC_ERR \n
    .endr

exc_common:
    movq (%rsp), %rdi
    movq 8(%rsp), %rsi
    movq 16(%rsp), %rdx
    andq $-16, %rsp
    call exception_report

    .global timer_isr
timer_isr:
    pushq %rax
    lock incq GODWIT_TICKS(%rip)
    movl $0xfee000b0, %eax
    movl $0, (%rax)
    popq %rax
    iretq

    .global spurious_isr
spurious_isr:
    iretq

    /* UD2 from ring 3 is a call into ring 0: rax = call number.
       0: halt if GODWIT_TICKS == rdi; 1: write rdi..rdi+rsi to COM1 with rep outsb
       in chunks of 16 bytes, each after LSR.THRE; 2: read a COM1 byte (rax = 0x100 | byte, or 0).
       A #UD in ring 0 is a real fault and is reported as such. */
    .global ud_entry
ud_entry:
    testq $3, 8(%rsp)
    jz exc_stub_6
    addq $2, (%rsp)
    cmpq $1, %rax
    je .Lsys_write
    cmpq $2, %rax
    je .Lsys_read
    cmpq $3, %rax
    je .Lsys_stop
    cmpq GODWIT_TICKS(%rip), %rdi
    jne .Lsys_ret
    sti
    hlt
    cli
.Lsys_ret:
    iretq
.Lsys_write:
    /* In chunks of at most 16 bytes (the UART's FIFO), each after THRE says
       the FIFO is empty (bounded wait): a backend that cannot take bytes at
       once (QEMU's socket chardev when the reader lags) then slows the guest
       down instead of dropping output. */
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    movq %rsi, %rbx
    movq %rdi, %rsi
    cld
.Lw_chunk:
    testq %rbx, %rbx
    jz .Lw_done
    movl $200000, %ecx
    movw $0x3fd, %dx
.Lw_wait:
    inb %dx, %al
    testb $0x20, %al
    jnz .Lw_ready
    decl %ecx
    jnz .Lw_wait
.Lw_ready:
    movq %rbx, %rcx
    cmpq $16, %rcx
    jbe .Lw_len
    movq $16, %rcx
.Lw_len:
    subq %rcx, %rbx
    movw $0x3f8, %dx
    rep outsb
    jmp .Lw_chunk
.Lw_done:
    popq %rdx
    popq %rcx
    popq %rbx
    popq %rax
    iretq
.Lsys_read:
    pushq %rdx
    movw $0x3fd, %dx
    inb %dx, %al
    testb $1, %al
    jz .Lread_none
    movw $0x3f8, %dx
    inb %dx, %al
    movzbl %al, %eax
    orl $0x100, %eax
    popq %rdx
    iretq
.Lread_none:
    xorl %eax, %eax
    popq %rdx
    iretq
.Lsys_stop:
    cli
    hlt
    jmp .Lsys_stop

    .section .rodata.exc_table, "a"
    .balign 8
    .global exc_stub_table
exc_stub_table:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad exc_stub_\n
    .endr
"#,
    options(att_syntax)
);

/// Called by the exception stubs: reports the exception and stops the guest.
#[no_mangle]
extern "C" fn exception_report(vector: u64, error: u64, rip: u64) -> ! {
    let cr2: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack)) };
    // We are in ring 0 now: print with direct port I/O.
    crate::serial::IN_USER_MODE.store(false, Ordering::SeqCst);
    crate::println!(
        "PANIC exception vector={} error={:#x} rip={:#x} cr2={:#x}",
        vector,
        error,
        rip,
        cr2
    );
    crate::halt_forever()
}

fn stack_top<const N: usize>(s: *mut Stack<N>) -> u64 {
    s as u64 + N as u64
}

fn set_gate(vector: usize, handler: u64, ist: u8) {
    let g = Gate {
        off_lo: handler as u16,
        sel: 0x08,
        ist,
        attr: 0x8e,
        off_mid: (handler >> 16) as u16,
        off_hi: (handler >> 32) as u32,
        reserved: 0,
    };
    // SAFETY: single-threaded setup before interrupts are enabled.
    unsafe { (*addr_of_mut!(IDT))[vector] = g };
}

/// Loads the GDT with a TSS, and the IDT. Interrupts stay disabled.
pub fn init_cpu_tables() {
    // SAFETY: single-threaded boot code; the statics written here are only read
    // by the CPU after lgdt/ltr/lidt, and they live for the whole run.
    unsafe {
        let tss = &mut *addr_of_mut!(TSS);
        tss.rsp[0] = stack_top(addr_of_mut!(KERNEL_STACK));
        tss.ist[0] = stack_top(addr_of_mut!(IST_EXC));
        tss.ist[1] = stack_top(addr_of_mut!(IST_IRQ));
        tss.ist[2] = stack_top(addr_of_mut!(IST_NMI));
        tss.ist[3] = stack_top(addr_of_mut!(IST_DF));
        let base = addr_of!(TSS) as u64;
        let limit = (core::mem::size_of::<Tss>() - 1) as u64;
        let low = (limit & 0xffff)
            | (base & 0xff_ffff) << 16
            | 0x89u64 << 40
            | ((limit >> 16) & 0xf) << 48
            | ((base >> 24) & 0xff) << 56;
        let gdt = &mut *addr_of_mut!(GDT);
        gdt.0[5] = low;
        gdt.0[6] = base >> 32;
        let gp = DescPtr {
            limit: (core::mem::size_of::<Gdt>() - 1) as u16,
            base: addr_of!(GDT) as u64,
        };
        asm!(
            "lgdt [{gp}]",
            "mov ax, 0x10",
            "mov ds, ax",
            "mov es, ax",
            "mov ss, ax",
            "mov ax, 0x28",
            "ltr ax",
            gp = in(reg) &gp,
            out("ax") _,
            options(nostack)
        );

        for (v, stub) in exc_stub_table.iter().enumerate() {
            let ist = match v {
                2 => 3,
                8 => 4,
                _ => 1,
            };
            set_gate(v, *stub, ist);
        }
        set_gate(TIMER_VECTOR as usize, timer_isr as *const () as u64, 2);
        set_gate(
            SPURIOUS_VECTOR as usize,
            spurious_isr as *const () as u64,
            2,
        );
        // Ring 3 calls ring 0 with UD2: on this KVM `int n` from ring 3 becomes
        // #UD and SYSCALL lands in a context that cannot do port I/O, while
        // exceptions from ring 3 reach our (emulated) ring-0 handlers intact.
        // The #UD gate uses RSP0 (no IST), so the timer (IST 2) can nest in HLT.
        set_gate(6, ud_entry as *const () as u64, 0);
        let ip = DescPtr {
            limit: (core::mem::size_of::<[Gate; 256]>() - 1) as u16,
            base: addr_of!(IDT) as u64,
        };
        asm!("lidt [{}]", in(reg) &ip, options(nostack));
    }
}

fn lapic_write(reg: u64, v: u32) {
    // SAFETY: the LAPIC page is identity mapped (uncached) by the boot tables.
    unsafe { core::ptr::write_volatile((LAPIC_BASE + reg) as *mut u32, v) };
}

fn lapic_read(reg: u64) -> u32 {
    // SAFETY: as in lapic_write.
    unsafe { core::ptr::read_volatile((LAPIC_BASE + reg) as *const u32) }
}

/// Enables the LAPIC, calibrates its timer against the guest clock, and starts
/// it in periodic mode every `period_us`. Returns LAPIC timer counts per ms.
pub fn start_timer(period_us: u64) -> u64 {
    // Nothing but the LAPIC timer may interrupt us: mask both 8259s (their
    // vectors would collide with exceptions if a VMM leaves them unprogrammed
    // and unmasked) and LINT0, through which KVM's LAPIC passes them on.
    crate::serial::outb(0x21, 0xff);
    crate::serial::outb(0xa1, 0xff);
    let base = clock::rdmsr(IA32_APIC_BASE);
    clock::wrmsr(IA32_APIC_BASE, (base & 0xfff) | LAPIC_BASE | 0x800);
    lapic_write(LAPIC_TPR, 0);
    lapic_write(LAPIC_LVT_LINT0, 1 << 16);
    lapic_write(LAPIC_SVR, 0x100 | SPURIOUS_VECTOR as u32);
    lapic_write(LAPIC_TIMER_DIV, 0xb); // divide by 1
                                       // One-shot, masked, from the maximum count; measure over 10 ms.
    lapic_write(LAPIC_LVT_TIMER, 1 << 16 | TIMER_VECTOR as u32);
    lapic_write(LAPIC_TIMER_INIT, u32::MAX);
    let t0 = clock::now_ns();
    clock::spin_ns(10_000_000);
    let cur = lapic_read(LAPIC_TIMER_CUR);
    let t1 = clock::now_ns();
    lapic_write(LAPIC_TIMER_INIT, 0);
    let elapsed = (u32::MAX - cur) as u64;
    let ns = (t1 - t0).max(1);
    let per_ms = (elapsed * 1_000_000 / ns).max(1);
    let count = (per_ms * period_us / 1000).clamp(1, u32::MAX as u64) as u32;
    lapic_write(LAPIC_LVT_TIMER, 1 << 17 | TIMER_VECTOR as u32);
    lapic_write(LAPIC_TIMER_INIT, count);
    per_ms
}

/// Current tick count.
pub fn ticks() -> u64 {
    GODWIT_TICKS.load(Ordering::Relaxed)
}

/// Leaves ring 0 for good: continues in ring 3 (IOPL 3 for port I/O,
/// interrupts on) at `entry(arg)` on the stack ending at `stack_top`.
pub fn enter_user(entry: extern "C" fn(u64) -> !, arg: u64, stack_top: u64) -> ! {
    crate::serial::IN_USER_MODE.store(true, Ordering::SeqCst);
    // SAFETY: builds an IRET frame to the ring-3 code segment with a valid
    // stack; all memory is mapped with the user bit, and the TSS provides RSP0
    // for interrupts from ring 3.
    unsafe {
        asm!(
            "push {ss}",
            "push {rsp}",
            "push 0x3202",
            "push {cs}",
            "push {rip}",
            "iretq",
            ss = in(reg) USER_DS,
            rsp = in(reg) stack_top & !15,
            cs = in(reg) USER_CS,
            rip = in(reg) entry as *const () as u64,
            in("rdi") arg,
            options(noreturn)
        )
    }
}

/// From ring 3: halts until the next interrupt if the tick count is still
/// `seen`. The check and the HLT happen with interrupts off in the handler
/// (`sti; hlt` is atomic), so a tick arriving after the caller's check still
/// wakes it.
pub fn wait_for_tick(seen: u64) {
    // SAFETY: the UD2 call only reads the tick counter and halts.
    unsafe { asm!("ud2", in("rax") SYS_HALT, in("rdi") seen, options(nostack)) };
}
