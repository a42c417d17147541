//! Raw wrappers for the kernel interfaces nix does not cover: ptrace
//! register sets and signal masks, rseq configuration, siginfo peeking,
//! robust lists, clone3 with set_tid, pidfds, PAGEMAP_SCAN; terminal
//! ioctls in [`tty`], userfaultfd in [`uffd`], unix sockets in [`sock`],
//! file handles, inotify and FIONREAD in [`fs`], probe children and
//! prctls in [`proc`], an anonymous mapping in [`mem`], the new mount
//! API in [`mount`], extended attributes in [`xattr`], netlink in
//! [`netlink`].

pub mod fd;
pub mod fs;
pub mod inet;
pub mod ipc;
pub mod mem;
pub mod mount;
pub mod netlink;
pub mod ns;
pub mod proc;
pub mod sock;
pub mod tty;
pub mod xattr;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::unistd::Pid;

/// A failed system call, with what it was doing to which task.
#[derive(Debug, thiserror::Error)]
#[error("{op} on task {pid}: {errno}")]
pub struct SysError {
    pub op: &'static str,
    pub pid: i32,
    #[source]
    pub errno: Errno,
}

pub type SysResult<T> = Result<T, SysError>;

fn err(op: &'static str, pid: Pid) -> SysError {
    SysError {
        op,
        pid: pid.as_raw(),
        errno: Errno::last(),
    }
}

pub mod uffd;

const NT_X86_XSTATE: libc::c_int = 0x202;
const PTRACE_GETSIGMASK: libc::c_uint = 0x420a;
const PTRACE_SETSIGMASK: libc::c_uint = 0x420b;
const PTRACE_PEEKSIGINFO: libc::c_uint = 0x4209;
const PTRACE_GET_RSEQ_CONFIGURATION: libc::c_uint = 0x420f;

/// Read the XSAVE area (standard format) of a stopped tracee.
pub fn get_xstate(pid: Pid) -> SysResult<Vec<u8>> {
    let mut buf = vec![0u8; 16384];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: iov describes `buf`, which lives across the call; the kernel
    // writes at most iov_len bytes and updates iov_len.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_GETREGSET,
            pid.as_raw(),
            NT_X86_XSTATE,
            &mut iov,
        )
    };
    if r < 0 {
        return Err(err("PTRACE_GETREGSET(NT_X86_XSTATE)", pid));
    }
    buf.truncate(iov.iov_len);
    Ok(buf)
}

/// Write the XSAVE area of a stopped tracee.
pub fn set_xstate(pid: Pid, xs: &[u8]) -> SysResult<()> {
    let mut buf = xs.to_vec();
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: iov describes `buf`, alive across the call; the kernel only reads it.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_SETREGSET,
            pid.as_raw(),
            NT_X86_XSTATE,
            &mut iov,
        )
    };
    if r < 0 {
        return Err(err("PTRACE_SETREGSET(NT_X86_XSTATE)", pid));
    }
    Ok(())
}

/// Blocked signal mask of a stopped tracee.
pub fn get_sigmask(pid: Pid) -> SysResult<u64> {
    let mut mask: u64 = 0;
    // SAFETY: the kernel writes 8 bytes (the size passed) into `mask`.
    let r = unsafe {
        libc::ptrace(
            PTRACE_GETSIGMASK,
            pid.as_raw(),
            8usize,
            &mut mask as *mut u64,
        )
    };
    if r < 0 {
        return Err(err("PTRACE_GETSIGMASK", pid));
    }
    Ok(mask)
}

pub fn set_sigmask(pid: Pid, mask: u64) -> SysResult<()> {
    // SAFETY: the kernel reads 8 bytes from `mask`, which outlives the call.
    let r = unsafe { libc::ptrace(PTRACE_SETSIGMASK, pid.as_raw(), 8usize, &mask as *const u64) };
    if r < 0 {
        return Err(err("PTRACE_SETSIGMASK", pid));
    }
    Ok(())
}

/// rseq registration of a tracee (ptr 0 if none).
#[derive(Debug, Clone, Copy, Default)]
pub struct RseqConf {
    pub ptr: u64,
    pub len: u32,
    pub sig: u32,
}

pub fn rseq_config(pid: Pid) -> SysResult<RseqConf> {
    #[repr(C)]
    struct Conf {
        ptr: u64,
        size: u32,
        sig: u32,
        flags: u32,
        pad: u32,
    }
    let mut c = Conf {
        ptr: 0,
        size: 0,
        sig: 0,
        flags: 0,
        pad: 0,
    };
    // SAFETY: the kernel writes at most `addr` (24) bytes into `c`.
    let r = unsafe {
        libc::ptrace(
            PTRACE_GET_RSEQ_CONFIGURATION,
            pid.as_raw(),
            std::mem::size_of::<Conf>(),
            &mut c as *mut Conf,
        )
    };
    if r < 0 {
        return Err(err("PTRACE_GET_RSEQ_CONFIGURATION", pid));
    }
    Ok(RseqConf {
        ptr: c.ptr,
        len: c.size,
        sig: c.sig,
    })
}

/// Queued signals of a tracee, without dequeuing them: the thread's own
/// queue, or the process-wide one when `shared`.
pub fn peek_siginfo(pid: Pid, shared: bool) -> SysResult<Vec<[u8; 128]>> {
    #[repr(C)]
    struct Args {
        off: u64,
        flags: u32,
        nr: i32,
    }
    let mut out = Vec::new();
    loop {
        let mut buf = [[0u8; 128]; 32];
        let a = Args {
            off: out.len() as u64,
            flags: if shared { 1 } else { 0 },
            nr: 32,
        };
        // SAFETY: `a` is read by the kernel; `buf` has room for `nr`
        // siginfos of 128 bytes each.
        let r = unsafe {
            libc::ptrace(
                PTRACE_PEEKSIGINFO,
                pid.as_raw(),
                &a as *const Args,
                buf.as_mut_ptr(),
            )
        };
        if r < 0 {
            return Err(err("PTRACE_PEEKSIGINFO", pid));
        }
        let n = r as usize;
        out.extend_from_slice(&buf[..n.min(32)]);
        if n < 32 {
            return Ok(out);
        }
    }
}

/// The robust futex list head and length of a task.
pub fn get_robust_list(pid: Pid) -> SysResult<(u64, u64)> {
    let mut head: u64 = 0;
    let mut len: usize = 0;
    // SAFETY: the kernel stores a pointer into `head` and a size into `len`.
    let r = unsafe {
        libc::syscall(
            libc::SYS_get_robust_list,
            pid.as_raw(),
            &mut head as *mut u64,
            &mut len as *mut usize,
        )
    };
    if r < 0 {
        return Err(err("get_robust_list", pid));
    }
    Ok((head, len as u64))
}

/// Whether descriptor `fd1` of `pid1` and `fd2` of `pid2` are the same open
/// file description (kcmp KCMP_FILE).
pub fn kcmp_file(pid1: i32, pid2: i32, fd1: i32, fd2: i32) -> SysResult<bool> {
    kcmp_file_order(pid1, pid2, fd1, fd2).map(|r| r == 0)
}

/// What kcmp KCMP_FILE says of descriptor `fd1` of `pid1` and `fd2` of
/// `pid2`: 0 for the same open file description, 1 or 2 for an order of
/// two different ones, 3 for different but unordered.
pub fn kcmp_file_order(pid1: i32, pid2: i32, fd1: i32, fd2: i32) -> SysResult<i64> {
    const KCMP_FILE: libc::c_int = 0;
    // SAFETY: plain syscall with integer arguments.
    let r = unsafe { libc::syscall(libc::SYS_kcmp, pid1, pid2, KCMP_FILE, fd1, fd2) };
    if r < 0 {
        return Err(err("kcmp", Pid::from_raw(pid1)));
    }
    Ok(r)
}

/// Whether `pid1` and `pid2` share their filesystem information (kcmp
/// KCMP_FS: clone with CLONE_FS).
pub fn kcmp_fs(pid1: i32, pid2: i32) -> SysResult<bool> {
    const KCMP_FS: libc::c_int = 3;
    kcmp_order(pid1, pid2, KCMP_FS).map(|r| r == 0)
}

/// How the descriptor tables of `pid1` and `pid2` compare (kcmp
/// KCMP_FILES): equal (one table, clone with CLONE_FILES) or in the
/// kernel's order of the two.
pub fn kcmp_files(pid1: i32, pid2: i32) -> SysResult<std::cmp::Ordering> {
    const KCMP_FILES: libc::c_int = 2;
    match kcmp_order(pid1, pid2, KCMP_FILES)? {
        0 => Ok(std::cmp::Ordering::Equal),
        1 => Ok(std::cmp::Ordering::Less),
        2 => Ok(std::cmp::Ordering::Greater),
        _ => Err(SysError {
            op: "kcmp(KCMP_FILES) without an order",
            pid: pid1,
            errno: Errno::EINVAL,
        }),
    }
}

/// kcmp of an object of `pid1` and `pid2` that takes no index: 0 for the
/// same, 1 or 2 for an order of two different ones, 3 for unordered.
fn kcmp_order(pid1: i32, pid2: i32, kind: libc::c_int) -> SysResult<i64> {
    // SAFETY: plain syscall with integer arguments.
    let r = unsafe { libc::syscall(libc::SYS_kcmp, pid1, pid2, kind, 0, 0) };
    if r < 0 {
        return Err(err("kcmp", Pid::from_raw(pid1)));
    }
    Ok(r)
}

/// Whether descriptor `fd` of `pid` is the file epoll `efd` of the same
/// process watches as target `tfd` (kcmp KCMP_EPOLL_TFD).
pub fn kcmp_epoll_target(pid: i32, fd: i32, efd: i32, tfd: i32) -> SysResult<bool> {
    const KCMP_EPOLL_TFD: libc::c_int = 7;
    #[repr(C)]
    struct Slot {
        efd: u32,
        tfd: u32,
        toff: u32,
    }
    let slot = Slot {
        efd: efd as u32,
        tfd: tfd as u32,
        toff: 0,
    };
    // SAFETY: kcmp reads one kcmp_epoll_slot, a live local, through the
    // pointer.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid,
            pid,
            KCMP_EPOLL_TFD,
            fd,
            &slot as *const Slot,
        )
    };
    if r < 0 {
        return Err(err("kcmp", Pid::from_raw(pid)));
    }
    Ok(r == 0)
}

/// A pidfd for `pid`, which may be any thread: PIDFD_THREAD (Linux 6.9)
/// where the kernel knows it, else a plain pidfd (leaders only).
pub fn pidfd_open(pid: Pid) -> SysResult<OwnedFd> {
    const PIDFD_THREAD: libc::c_int = libc::O_EXCL;
    // SAFETY: plain syscall with integer arguments.
    let mut r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), PIDFD_THREAD) };
    if r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
        // SAFETY: as above.
        r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    }
    if r < 0 {
        return Err(err("pidfd_open", pid));
    }
    // SAFETY: the kernel returned a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

/// Duplicate descriptor `fd` of the task behind `pidfd` into this process.
pub fn pidfd_getfd(pidfd: &OwnedFd, pid: Pid, fd: i32) -> SysResult<OwnedFd> {
    // SAFETY: plain syscall with integer arguments.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if r < 0 {
        return Err(err("pidfd_getfd", pid));
    }
    // SAFETY: the kernel returned a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

/// clone3 with exact pids (`tids`: at each level, innermost first), like
/// fork(): returns 0 in the child and the child's pid in the parent.
///
/// # Safety
/// The caller must be single-threaded, as with fork(): the child only has
/// the calling thread, and locks held by other threads stay held.
pub unsafe fn clone3_with_pid(tids: &[i32], exit_signal: i32, flags: u64) -> Result<i32, Errno> {
    let args = cryo_parasite::CloneArgs {
        flags,
        pidfd: 0,
        child_tid: 0,
        parent_tid: 0,
        exit_signal: exit_signal as u64,
        stack: 0,
        stack_size: 0,
        tls: 0,
        // None asked: a null pointer (an empty slice's is not, which
        // clone3 refuses with a size of 0).
        set_tid: if tids.is_empty() {
            0
        } else {
            tids.as_ptr() as u64
        },
        set_tid_size: tids.len() as u64,
        cgroup: 0,
    };
    // SAFETY: `args` and `tids` live across the call; without CLONE_VM the
    // child runs on its own copy of this stack, as after fork(). The
    // single-thread requirement is the caller's.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const cryo_parasite::CloneArgs,
            std::mem::size_of::<cryo_parasite::CloneArgs>(),
        )
    };
    if r < 0 {
        return Err(Errno::last());
    }
    Ok(r as i32)
}

pub const PAGE_IS_WPALLOWED: u64 = 1 << 0;
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
pub const PAGE_IS_FILE: u64 = 1 << 2;
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;
pub const PAGE_IS_PFNZERO: u64 = 1 << 5;
/// A guard region's page (MADV_GUARD_INSTALL), since Linux 6.14.
pub const PAGE_IS_GUARD: u64 = 1 << 8;

/// Whether PAGEMAP_SCAN knows PAGE_IS_GUARD here (older kernels refuse
/// the bit with EINVAL).
pub fn scan_knows_guards() -> bool {
    static KNOWS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *KNOWS.get_or_init(|| {
        let Ok(pagemap) = std::fs::File::open("/proc/self/pagemap") else {
            return false;
        };
        // Any mapped page of ours will do: the one this local is on.
        let local = 0u8;
        let here = (std::ptr::addr_of!(local) as u64) & !4095;
        let q = ScanQuery {
            mask: PAGE_IS_GUARD,
            ret: PAGE_IS_GUARD,
            ..Default::default()
        };
        let me = Pid::this();
        pagemap_scan(&pagemap, me, here, here + 4096, &q).is_ok()
    })
}

/// A PAGEMAP_SCAN query.
#[derive(Debug, Clone, Copy, Default)]
pub struct ScanQuery {
    pub flags: u64,
    pub inverted: u64,
    pub mask: u64,
    pub anyof: u64,
    pub ret: u64,
}

/// Run PAGEMAP_SCAN over [start, end) on an open /proc/PID/pagemap and
/// return the matching regions (start, end, categories).
pub fn pagemap_scan(
    pagemap: &std::fs::File,
    pid: Pid,
    start: u64,
    end: u64,
    q: &ScanQuery,
) -> SysResult<Vec<(u64, u64, u64)>> {
    #[repr(C)]
    struct Arg {
        size: u64,
        flags: u64,
        start: u64,
        end: u64,
        walk_end: u64,
        vec: u64,
        vec_len: u64,
        max_pages: u64,
        inverted: u64,
        mask: u64,
        anyof: u64,
        ret: u64,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Region {
        start: u64,
        end: u64,
        cat: u64,
    }
    const PAGEMAP_SCAN: libc::c_ulong = 0xC060_6610;
    let mut out = Vec::new();
    let mut vec = vec![Region::default(); 1024];
    let mut cur = start;
    while cur < end {
        let mut a = Arg {
            size: 96,
            flags: q.flags,
            start: cur,
            end,
            walk_end: 0,
            vec: vec.as_mut_ptr() as u64,
            vec_len: vec.len() as u64,
            max_pages: 0,
            inverted: q.inverted,
            mask: q.mask,
            anyof: q.anyof,
            ret: q.ret,
        };
        // SAFETY: `a` is the 96-byte pm_scan_arg; `vec` has room for
        // vec_len regions and outlives the call.
        let r = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN, &mut a as *mut Arg) };
        if r < 0 {
            return Err(err("PAGEMAP_SCAN", pid));
        }
        let n = r as usize;
        out.extend(vec[..n].iter().map(|r| (r.start, r.end, r.cat)));
        if n < vec.len() {
            break;
        }
        // The vector filled up: resume after what we got.
        cur = a.walk_end.max(vec[n - 1].end);
    }
    Ok(out)
}

/// XTILEDATA, the AMX tile registers: enabled in XCR0 but given to a
/// process only on its request (arch_prctl ARCH_REQ_XCOMP_PERM), and left
/// out of the signal frames of the others.
pub const XFEATURE_XTILEDATA: u64 = 1 << 18;

/// The XSAVE part of a signal frame of a task that asked for no dynamic
/// feature (XTILEDATA): its features (XCR0 without those) and its size in
/// the standard format (the end of the last of them, from CPUID 0xD).
/// Smaller than the area PTRACE_GETREGSET gives where XCR0 has AMX.
pub fn sigframe_xsave() -> (u32, u64) {
    static LAYOUT: std::sync::OnceLock<(u32, u64)> = std::sync::OnceLock::new();
    *LAYOUT.get_or_init(|| {
        let (_, xcr0) = xsave_layout();
        let features = xcr0 & !XFEATURE_XTILEDATA;
        // The legacy area and the XSAVE header, then each feature at its
        // offset (CPUID 0xD.i: EAX its size, EBX its offset).
        let mut size = 576u32;
        for i in 2..63u32 {
            if features & (1u64 << i) != 0 {
                let l = std::arch::x86_64::__cpuid_count(0xD, i);
                size = size.max(l.ebx.saturating_add(l.eax));
            }
        }
        (size, features)
    })
}

/// This CPU's user XSAVE layout: the standard-format size for the enabled
/// features (CPUID 0xD.0 EBX) and XCR0.
pub fn xsave_layout() -> (u32, u64) {
    // CPUID leaf 0xD exists on every x86_64 CPU with XSAVE.
    let size = std::arch::x86_64::__cpuid_count(0xD, 0).ebx;
    let (lo, hi): (u32, u32);
    // SAFETY: xgetbv with ecx=0 reads XCR0; it is allowed in user mode
    // once the OS set CR4.OSXSAVE, which Linux does whenever XSAVE exists
    // (PTRACE_GETREGSET NT_X86_XSTATE working proves it here).
    unsafe {
        std::arch::asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi, options(nomem, nostack));
    }
    (size, (u64::from(hi) << 32) | u64::from(lo))
}
