//! The little runtime both blobs share: raw syscalls, the memory
#![allow(dead_code)]
//! functions the compiler expects, the entry trampoline and the panic
//! handler. Nothing here touches TLS, the heap or libc.

use core::arch::{asm, global_asm};

// Entry: rdi carries the argument pointer. Align the stack, call the
// blob's main, then spin at _cryo_done until whoever drives the task stops
// it there (a spin, not a trap: if the driver is gone, a trap would kill
// the task, a spin leaves it for the guardian to put back).
global_asm!(
    ".globl _cryo_start",
    "_cryo_start:",
    "and rsp, -16",
    "call {main}",
    ".globl _cryo_done",
    "_cryo_done:",
    "jmp _cryo_done",
    main = sym crate::blob_main,
);

pub const SYS_READ: usize = 0;
pub const SYS_WRITE: usize = 1;
pub const SYS_CLOSE: usize = 3;
pub const SYS_MMAP: usize = 9;
pub const SYS_MPROTECT: usize = 10;
pub const SYS_MUNMAP: usize = 11;
pub const SYS_BRK: usize = 12;
pub const SYS_RT_SIGACTION: usize = 13;
pub const SYS_MREMAP: usize = 25;
pub const SYS_MADVISE: usize = 28;
pub const SYS_MSEAL: usize = 462;
pub const SYS_PAUSE: usize = 34;
pub const SYS_GETITIMER: usize = 36;
pub const SYS_SETITIMER: usize = 38;
pub const SYS_GETPID: usize = 39;
pub const SYS_SENDMSG: usize = 46;
pub const SYS_RECVMSG: usize = 47;
pub const SYS_EXIT: usize = 60;
pub const SYS_RT_SIGPENDING: usize = 127;
pub const SYS_RT_SIGTIMEDWAIT: usize = 128;
pub const SYS_RT_SIGQUEUEINFO: usize = 129;
pub const SYS_SIGALTSTACK: usize = 131;
pub const SYS_PERSONALITY: usize = 135;
pub const SYS_PRCTL: usize = 157;
pub const SYS_ARCH_PRCTL: usize = 158;
pub const SYS_GETTID: usize = 186;
pub const SYS_SET_TID_ADDRESS: usize = 218;
pub const SYS_TIMER_CREATE: usize = 222;
pub const SYS_TIMER_SETTIME: usize = 223;
pub const SYS_TIMER_GETTIME: usize = 224;
pub const SYS_TIMER_GETOVERRUN: usize = 225;
pub const SYS_EXIT_GROUP: usize = 231;
pub const SYS_SET_ROBUST_LIST: usize = 273;
pub const SYS_VMSPLICE: usize = 278;
pub const SYS_OPENAT: usize = 257;
pub const SYS_MEMBARRIER: usize = 324;
pub const SYS_RT_TGSIGQUEUEINFO: usize = 297;
pub const SYS_PRLIMIT64: usize = 302;
pub const SYS_RSEQ: usize = 334;
pub const SYS_FUTEX: usize = 202;
pub const SYS_NANOSLEEP: usize = 35;
pub const SYS_CLONE3: usize = 435;
pub const SYS_SETGROUPS: usize = 116;

/// Raw syscall with up to six arguments; returns the kernel's value
/// (a negative errno on failure).
#[inline(always)]
pub fn syscall6(nr: usize, a: usize, b: usize, c: usize, d: usize, e: usize, f: usize) -> isize {
    let ret: isize;
    // SAFETY: the `syscall` instruction only clobbers rax (result), rcx
    // and r11, all declared; memory effects are the caller's contract
    // with the kernel (the blob passes pointers to its own live buffers).
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") nr as isize => ret,
            in("rdi") a,
            in("rsi") b,
            in("rdx") c,
            in("r10") d,
            in("r8") e,
            in("r9") f,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

#[inline(always)]
pub fn syscall0(nr: usize) -> isize {
    syscall6(nr, 0, 0, 0, 0, 0, 0)
}
#[inline(always)]
pub fn syscall1(nr: usize, a: usize) -> isize {
    syscall6(nr, a, 0, 0, 0, 0, 0)
}
#[inline(always)]
pub fn syscall2(nr: usize, a: usize, b: usize) -> isize {
    syscall6(nr, a, b, 0, 0, 0, 0)
}
#[inline(always)]
pub fn syscall3(nr: usize, a: usize, b: usize, c: usize) -> isize {
    syscall6(nr, a, b, c, 0, 0, 0)
}
#[inline(always)]
pub fn syscall4(nr: usize, a: usize, b: usize, c: usize, d: usize) -> isize {
    syscall6(nr, a, b, c, d, 0, 0)
}
#[inline(always)]
pub fn syscall5(nr: usize, a: usize, b: usize, c: usize, d: usize, e: usize) -> isize {
    syscall6(nr, a, b, c, d, e, 0)
}

pub fn exit_group(code: i32) -> ! {
    loop {
        syscall1(SYS_EXIT_GROUP, code as usize);
    }
}

/// Switch rsp to `frame + 8` and call rt_sigreturn: the kernel loads the
/// whole context (registers, FPU state, signal mask, altstack) from the
/// frame. Never returns.
///
/// # Safety
/// `frame` must point to a complete, valid rt_sigframe whose fpstate
/// pointer is 64-byte aligned and whose memory stays mapped.
pub unsafe fn sigreturn(frame: u64) -> ! {
    // SAFETY: per the function contract the frame is valid; nothing runs
    // after the syscall in this context.
    unsafe {
        asm!(
            "mov rsp, {f}",
            "mov eax, 15",
            "syscall",
            "ud2",
            f = in(reg) frame + 8,
            options(noreturn),
        );
    }
}

/// Trap to the tracer (if one waits), then sigreturn.
///
/// # Safety
/// Same as [`sigreturn`].
pub unsafe fn trap_then_sigreturn(frame: u64) -> ! {
    // SAFETY: int3 only raises SIGTRAP (the controller is tracing and
    // resumes us); then the same contract as `sigreturn`.
    unsafe {
        asm!(
            "int3",
            "mov rsp, {f}",
            "mov eax, 15",
            "syscall",
            "ud2",
            f = in(reg) frame + 8,
            options(noreturn),
        );
    }
}

// The compiler lowers copies and zeroing to these symbols; the linux-gnu
// target's compiler-builtins does not export them, so the blob defines
// them. Plain byte loops: the compiler must not turn them back into calls
// to themselves, so they use volatile accesses.

/// # Safety
/// `dst` and `src` are valid for `n` bytes and do not overlap.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    let mut i = 0;
    while i < n {
        // SAFETY: i < n and both ranges are valid for n bytes (contract).
        unsafe { core::ptr::write_volatile(dst.add(i), core::ptr::read_volatile(src.add(i))) };
        i += 1;
    }
    dst
}

/// # Safety
/// `dst` and `src` are valid for `n` bytes; they may overlap.
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) {
        let mut i = 0;
        while i < n {
            // SAFETY: forward copy is safe when dst <= src; i < n.
            unsafe { core::ptr::write_volatile(dst.add(i), core::ptr::read_volatile(src.add(i))) };
            i += 1;
        }
    } else {
        let mut i = n;
        while i > 0 {
            i -= 1;
            // SAFETY: backward copy is safe when dst > src; i < n.
            unsafe { core::ptr::write_volatile(dst.add(i), core::ptr::read_volatile(src.add(i))) };
        }
    }
    dst
}

/// # Safety
/// `dst` is valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    let mut i = 0;
    while i < n {
        // SAFETY: i < n, dst valid for n bytes.
        unsafe { core::ptr::write_volatile(dst.add(i), c as u8) };
        i += 1;
    }
    dst
}

/// # Safety
/// `a` and `b` are valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: i < n, both valid for n bytes.
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

/// # Safety
/// Same as `memcmp`.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: forwarded contract.
    unsafe { memcmp(a, b, n) }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    // SAFETY: ud2 only raises SIGILL; there is no state to keep.
    unsafe { asm!("ud2", options(noreturn)) }
}

#[no_mangle]
extern "C" fn rust_eh_personality() {}
