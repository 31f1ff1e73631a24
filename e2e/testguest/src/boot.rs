//! PVH entry: the 32-bit protected-mode entry point named by the ELF note, the
//! identity-mapped boot page tables, and the switch to long mode.
//!
//! The loader enters `pvh_start32` with paging off, flat 32-bit segments and EBX
//! holding the physical address of `hvm_start_info`. We zero .bss, map the first
//! 4 GiB with 2 MiB pages (the top GiB uncached: LAPIC, virtio-mmio, IOAPIC
//! live there), enable PAE + EFER.LME + paging and far-jump into 64-bit code,
//! which calls [`crate::main64`] with the start-info address. CR4.TSD, SMEP
//! and SMAP are cleared: ring 3 reads the TSC, and ring 0 reads ring-3 buffers.
//!
//! Every mapping has the user bit set: after setup the guest drops to ring 3
//! (see `interrupts::enter_user`), because this KVM emulates ring-0 guest code
//! instruction by instruction while ring-3 code runs natively.

use core::arch::global_asm;

/// Number of page directories reserved: one per GiB of identity-mapped space.
pub const MAX_PDS: usize = 64;

#[repr(C, align(4096))]
pub struct PageTable(pub [u64; 512]);

/// The PML4: entry 0 points at [`BOOT_PDPT`].
#[no_mangle]
pub static mut BOOT_PML4: PageTable = PageTable([0; 512]);
/// The PDPT: entry i points at page directory i (1 GiB each).
#[no_mangle]
pub static mut BOOT_PDPT: PageTable = PageTable([0; 512]);
/// Page directories with 2 MiB pages; the boot code fills the first four.
#[no_mangle]
pub static mut BOOT_PDS: [PageTable; MAX_PDS] = [const { PageTable([0; 512]) }; MAX_PDS];

/// Size of the boot stack the main loop runs on.
pub const BOOT_STACK_SIZE: usize = 128 * 1024;

#[repr(C, align(16))]
pub struct Stack<const N: usize>(pub [u8; N]);

#[no_mangle]
#[link_section = ".bss.noinit"]
static mut BOOT_STACK: Stack<BOOT_STACK_SIZE> = Stack([0; BOOT_STACK_SIZE]);

/// Physical address of the PVH start info, stored by the 32-bit entry.
#[no_mangle]
static mut PVH_START_INFO: u32 = 0;

const PD_FLAGS: u64 = 0x87; // present, writable, user, 2 MiB page

/// Maps GiB `gib` (index into the PDPT) if it is not mapped yet. Used for RAM
/// above 4 GiB, which the 32-bit code does not map.
pub fn map_gib(gib: usize) -> bool {
    if gib >= MAX_PDS {
        return false;
    }
    // SAFETY: single-threaded guest; the page tables are only written here and in
    // the boot code, and the entries written identity-map physical memory, which
    // does not change any mapping the running code depends on.
    unsafe {
        let pdpt = &mut *core::ptr::addr_of_mut!(BOOT_PDPT);
        if pdpt.0[gib] & 1 != 0 {
            return true;
        }
        let pd = &mut *core::ptr::addr_of_mut!(BOOT_PDS[gib]);
        for (i, e) in pd.0.iter_mut().enumerate() {
            *e = (((gib as u64) << 30) + ((i as u64) << 21)) | PD_FLAGS;
        }
        pdpt.0[gib] = pd as *const PageTable as u64 | 7;
        // Reload CR3 to flush any cached non-present entries.
        core::arch::asm!("mov {t}, cr3", "mov cr3, {t}", t = out(reg) _, options(nostack));
    }
    true
}

global_asm!(
    r#"
    .section .note.pvh, "a", @note
    .balign 4
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .balign 4
    .long pvh_start32
    .balign 4

    .section .data.boot_gdt, "aw"
    .balign 16
boot_gdt:
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
boot_gdt_end:
boot_gdt_ptr:
    .word boot_gdt_end - boot_gdt - 1
    .long boot_gdt

    .section .text.boot32, "ax"
    .code32
    .global pvh_start32
pvh_start32:
    cli
    cld
    movl %ebx, %esi

    movl $__bss_start, %edi
    movl $__bss_end, %ecx
    subl %edi, %ecx
    xorl %eax, %eax
    rep stosb

    movl %esi, PVH_START_INFO

    movl $BOOT_PDPT, %eax
    orl $7, %eax
    movl %eax, BOOT_PML4

    movl $BOOT_PDPT, %edi
    movl $BOOT_PDS, %eax
    orl $7, %eax
    movl $4, %ecx
.Lpdpt_loop:
    movl %eax, (%edi)
    addl $4096, %eax
    addl $8, %edi
    decl %ecx
    jnz .Lpdpt_loop

    movl $BOOT_PDS, %edi
    movl $0x87, %eax
    xorl %edx, %edx
    movl $2048, %ecx
.Lpd_loop:
    movl %eax, (%edi)
    movl $0, 4(%edi)
    cmpl $1536, %edx
    jb .Lpd_cached
    orl $0x18, (%edi)
.Lpd_cached:
    addl $0x200000, %eax
    addl $8, %edi
    incl %edx
    decl %ecx
    jnz .Lpd_loop

    movl $BOOT_PML4, %eax
    movl %eax, %cr3
    movl %cr4, %eax
    andl $~0x300004, %eax
    orl $0x20, %eax
    movl %eax, %cr4
    movl $0xc0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax
    movl %eax, %cr0

    lgdt boot_gdt_ptr
    ljmp $0x08, $long_entry

    .code64
long_entry:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    movq $BOOT_STACK, %rsp
    addq ${stack_size}, %rsp
    movl PVH_START_INFO, %edi
    call main64
.Lhang:
    cli
    hlt
    jmp .Lhang
"#,
    stack_size = const BOOT_STACK_SIZE,
    options(att_syntax)
);
