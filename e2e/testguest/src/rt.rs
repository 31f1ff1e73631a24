//! The freestanding runtime: the memory functions the compiler calls, and the
//! symbols the prebuilt `core` references. Written as plain byte loops so no
//! vector instruction can appear (the crate is built without SSE, and these are
//! marked `#[inline(never)]` so LLVM does not turn them back into calls to
//! themselves).

#[no_mangle]
#[inline(never)]
/// Copies `n` bytes; the regions must not overlap.
///
/// # Safety
/// `dst` and `src` must be valid for `n` bytes.
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both regions are valid for n bytes.
    unsafe {
        core::arch::asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _, options(nostack, preserves_flags))
    };
    dst
}

#[no_mangle]
#[inline(never)]
/// Copies `n` bytes; the regions may overlap.
///
/// # Safety
/// `dst` and `src` must be valid for `n` bytes.
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize).wrapping_add(n) {
        // SAFETY: forward copy is correct when dst is below src or past its end.
        unsafe { memcpy(dst, src, n) }
    } else {
        // SAFETY: backward copy with the direction flag set, restored after.
        unsafe {
            core::arch::asm!(
                "std", "rep movsb", "cld",
                inout("rcx") n => _,
                inout("rdi") dst.add(n - 1) => _,
                inout("rsi") src.add(n - 1) => _,
                options(nostack)
            )
        };
        dst
    }
}

#[no_mangle]
#[inline(never)]
/// Fills `n` bytes with `c`.
///
/// # Safety
/// `dst` must be valid for `n` bytes.
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees dst is valid for n bytes.
    unsafe {
        core::arch::asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") c as u8, options(nostack, preserves_flags))
    };
    dst
}

#[no_mangle]
#[inline(never)]
/// Compares `n` bytes.
///
/// # Safety
/// `a` and `b` must be valid for `n` bytes.
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: i < n and the caller guarantees both are valid for n bytes.
        let (x, y) = unsafe {
            (
                core::ptr::read_volatile(a.add(i)),
                core::ptr::read_volatile(b.add(i)),
            )
        };
        if x != y {
            return x as i32 - y as i32;
        }
        i += 1;
    }
    0
}

#[no_mangle]
#[inline(never)]
/// Compares `n` bytes for equality only.
///
/// # Safety
/// `a` and `b` must be valid for `n` bytes.
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}

/// The prebuilt `core` references this symbol; with panic = abort it is never called.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}
