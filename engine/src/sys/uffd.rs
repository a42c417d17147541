//! userfaultfd ioctls on a descriptor cryo holds (made inside a task, so
//! it acts on that task's memory): API handshake, write-protect
//! registration, protecting and unprotecting ranges, reading messages.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::unistd::Pid;

use super::{SysError, SysResult};

const UFFDIO_API: libc::c_ulong = 0xC018_AA3F;
const UFFDIO_REGISTER: libc::c_ulong = 0xC020_AA00;
const UFFDIO_WRITEPROTECT: libc::c_ulong = 0xC018_AA06;
const UFFDIO_WAKE: libc::c_ulong = 0x8010_AA02;
const UFFD_API: u64 = 0xAA;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;

/// userfaultfd flag: handle faults of user space accesses only (needs no
/// privilege).
pub const USER_MODE_ONLY: i32 = 1;

/// The task maps or moves memory: the event waits until it is read.
pub const FEATURE_EVENT_REMAP: u64 = 1 << 2;
/// MADV_DONTNEED/MADV_REMOVE in a registered range.
pub const FEATURE_EVENT_REMOVE: u64 = 1 << 3;
/// munmap of a registered range.
pub const FEATURE_EVENT_UNMAP: u64 = 1 << 6;
/// Write-protect faults are resolved by the kernel itself, which only
/// marks the page written (seen by PAGEMAP_SCAN): tracking without a
/// handler.
pub const FEATURE_WP_ASYNC: u64 = 1 << 15;

pub const EVENT_PAGEFAULT: u8 = 0x12;
pub const EVENT_REMAP: u8 = 0x14;
pub const EVENT_REMOVE: u8 = 0x15;
pub const EVENT_UNMAP: u8 = 0x16;
/// `Msg::flags` of a write-protect fault.
pub const PAGEFAULT_FLAG_WP: u64 = 1 << 1;

/// Size of one `struct uffd_msg`.
pub const MSG_LEN: usize = 32;

/// One message read from a userfaultfd: the event and its three words
/// (pagefault: flags, address, thread id; remove/unmap: start, end;
/// remap: from, to, len).
#[derive(Debug, Clone, Copy)]
pub struct Msg {
    pub event: u8,
    pub a: u64,
    pub b: u64,
    pub c: u64,
}

impl Msg {
    pub fn parse(raw: &[u8]) -> Msg {
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&raw[i..i + 8]);
            u64::from_ne_bytes(w)
        };
        Msg {
            event: raw[0],
            a: word(8),
            b: word(16),
            c: word(24),
        }
    }
}

fn err(op: &'static str, pid: Pid, errno: Errno) -> SysError {
    SysError {
        op,
        pid: pid.as_raw(),
        errno,
    }
}

#[repr(C)]
struct Range {
    start: u64,
    len: u64,
}

/// A userfaultfd of this process (flags: O_CLOEXEC, O_NONBLOCK,
/// [`USER_MODE_ONLY`]).
pub fn open(flags: i32) -> Result<OwnedFd, Errno> {
    // SAFETY: userfaultfd takes flags only and returns a new descriptor or -1.
    let r = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if r < 0 {
        return Err(Errno::last());
    }
    // SAFETY: `r` is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

/// The UFFDIO_API handshake, asking for `features`; returns the features
/// the kernel supports. `pid` is the task whose memory the descriptor acts
/// on (for error messages).
pub fn api(uffd: &OwnedFd, pid: Pid, features: u64) -> SysResult<u64> {
    #[repr(C)]
    struct Api {
        api: u64,
        features: u64,
        ioctls: u64,
    }
    let mut a = Api {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes exactly one `struct uffdio_api`
    // (24 bytes, the layout of `Api`), which lives for the call.
    let r = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API, &mut a) };
    if r < 0 {
        return Err(err("UFFDIO_API", pid, Errno::last()));
    }
    Ok(a.features)
}

/// Register [start, start+len) for write-protect faults.
pub fn register_wp(uffd: &OwnedFd, pid: Pid, start: u64, len: u64) -> SysResult<()> {
    #[repr(C)]
    struct Register {
        range: Range,
        mode: u64,
        ioctls: u64,
    }
    let mut reg = Register {
        range: Range { start, len },
        mode: UFFDIO_REGISTER_MODE_WP,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_REGISTER reads and writes one `struct
    // uffdio_register` (32 bytes, the layout of `Register`), which lives
    // for the call; it only changes the registered task's VMAs.
    let r = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) };
    if r < 0 {
        return Err(err("UFFDIO_REGISTER", pid, Errno::last()));
    }
    Ok(())
}

/// Write-protect [start, start+len) (`protect`), or lift the protection
/// and wake the threads waiting on a fault there. EAGAIN means the task's
/// memory map is changing and an event waits to be read first.
pub fn writeprotect(
    uffd: &OwnedFd,
    pid: Pid,
    start: u64,
    len: u64,
    protect: bool,
) -> SysResult<()> {
    #[repr(C)]
    struct Wp {
        range: Range,
        mode: u64,
    }
    let mut wp = Wp {
        range: Range { start, len },
        mode: if protect {
            UFFDIO_WRITEPROTECT_MODE_WP
        } else {
            0
        },
    };
    loop {
        // SAFETY: UFFDIO_WRITEPROTECT reads one `struct
        // uffdio_writeprotect` (24 bytes, the layout of `Wp`), which lives
        // for the call; it changes page protections of the registered
        // task only.
        let r = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_WRITEPROTECT, &mut wp) };
        if r == 0 {
            return Ok(());
        }
        match Errno::last() {
            Errno::EINTR => continue,
            e => return Err(err("UFFDIO_WRITEPROTECT", pid, e)),
        }
    }
}

/// Wake the threads waiting on a fault in [start, start+len).
pub fn wake(uffd: &OwnedFd, pid: Pid, start: u64, len: u64) -> SysResult<()> {
    let range = Range { start, len };
    // SAFETY: UFFDIO_WAKE reads one `struct uffdio_range` (16 bytes, the
    // layout of `Range`), which lives for the call; it only wakes threads
    // of the registered task.
    let r = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_WAKE, &range) };
    if r < 0 {
        return Err(err("UFFDIO_WAKE", pid, Errno::last()));
    }
    Ok(())
}
