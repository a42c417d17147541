//! File calls nix does not offer in a form cryo can use: opening a file by
//! its handle (open_by_handle_at), inotify instances with their watch
//! descriptor numbers (nix hides them), and the byte count queued in a
//! pipe or socket (FIONREAD).
//!
//! Every call takes a descriptor the caller holds (or returns a new one
//! owned), so the wrappers are safe whatever the arguments are: a wrong
//! one only makes the kernel return an error.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use nix::errno::Errno;

/// Open the file whose handle is (`handle_type`, `handle`) on the file
/// system that `mount` is open on (open_by_handle_at; needs
/// CAP_DAC_READ_SEARCH).
pub fn open_by_handle_at(
    mount: &impl AsFd,
    handle_type: i32,
    handle: &[u8],
    flags: i32,
) -> io::Result<OwnedFd> {
    // struct file_handle: handle_bytes (u32), handle_type (i32), bytes.
    let mut fh = Vec::with_capacity(8 + handle.len());
    fh.extend_from_slice(&(handle.len() as u32).to_ne_bytes());
    fh.extend_from_slice(&handle_type.to_ne_bytes());
    fh.extend_from_slice(handle);
    // SAFETY: `fh` is a whole struct file_handle: its header says it holds
    // handle.len() bytes, which follow it; it lives across the call and the
    // kernel only reads it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            mount.as_fd().as_raw_fd(),
            fh.as_ptr(),
            flags,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
}

/// A new inotify instance (inotify_init1 with IN_CLOEXEC, IN_NONBLOCK, ...).
pub fn inotify_init1(flags: i32) -> io::Result<OwnedFd> {
    // SAFETY: inotify_init1 takes flags only.
    let fd = unsafe { libc::inotify_init1(flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Watch `path` with `mask` on the inotify instance `fd`; returns the
/// watch descriptor.
pub fn inotify_add_watch(fd: &impl AsFd, path: &CStr, mask: u32) -> io::Result<i32> {
    // SAFETY: `path` is NUL-terminated and lives across the call; the
    // kernel only reads it.
    let wd = unsafe { libc::inotify_add_watch(fd.as_fd().as_raw_fd(), path.as_ptr(), mask) };
    if wd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(wd)
}

/// Remove watch `wd` from the inotify instance `fd`.
pub fn inotify_rm_watch(fd: &impl AsFd, wd: i32) -> io::Result<()> {
    // SAFETY: inotify_rm_watch takes integers only.
    if unsafe { libc::inotify_rm_watch(fd.as_fd().as_raw_fd(), wd) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The number of bytes queued for reading in the pipe or socket `fd`
/// (FIONREAD).
pub fn bytes_queued(fd: &impl AsFd) -> Result<i32, Errno> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int, into `n`, a live local.
    let r = unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), libc::FIONREAD, &mut n) };
    Errno::result(r)?;
    Ok(n)
}

/// A new signalfd (close-on-exec) for the signals of `mask` (bit N-1 for
/// signal N, realtime signals included, which nix's SigSet cannot name).
pub fn signalfd(mask: u64) -> io::Result<OwnedFd> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a live, initialised sigset_t of ours.
    unsafe { libc::sigemptyset(&mut set) };
    for sig in 1..=64 {
        if mask & (1u64 << (sig - 1)) != 0 {
            // SAFETY: as above; sigaddset rejects a signal out of range.
            unsafe { libc::sigaddset(&mut set, sig) };
        }
    }
    // SAFETY: -1 asks for a new signalfd; the kernel copies `set`, which
    // lives across the call.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A new timerfd (close-on-exec) on clock `clock_id`.
pub fn timerfd_create(clock_id: i32) -> io::Result<OwnedFd> {
    // SAFETY: timerfd_create takes integers only.
    let fd = unsafe { libc::timerfd_create(clock_id, libc::TFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn timespec(ns: u64) -> libc::timespec {
    libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    }
}

/// Arm the timerfd `fd` to expire in `value_ns` (0: disarmed), then every
/// `interval_ns`.
pub fn timerfd_settime(fd: &impl AsFd, value_ns: u64, interval_ns: u64) -> io::Result<()> {
    let its = libc::itimerspec {
        it_interval: timespec(interval_ns),
        it_value: timespec(value_ns),
    };
    // SAFETY: the kernel reads `its`, a live local, and writes no old value
    // (null pointer).
    let r = unsafe { libc::timerfd_settime(fd.as_fd().as_raw_fd(), 0, &its, std::ptr::null_mut()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Set the count of expirations not read yet of the timerfd `fd`
/// (TFD_IOC_SET_TICKS, CONFIG_CHECKPOINT_RESTORE).
pub fn timerfd_set_ticks(fd: &impl AsFd, ticks: u64) -> io::Result<()> {
    const TFD_IOC_SET_TICKS: libc::c_ulong = 0x4008_5400;
    // SAFETY: the ioctl reads one u64, from `ticks`, a live local.
    let r = unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), TFD_IOC_SET_TICKS, &ticks) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// struct f_owner_ex of fcntl(2).
#[repr(C)]
struct OwnerEx {
    kind: i32,
    pid: i32,
}
const F_SETOWN_EX: i32 = 15;
const F_GETOWN_EX: i32 = 16;
const F_SETSIG: i32 = 10;
const F_GETSIG: i32 = 11;

/// F_GETOWN_EX: who gets the descriptor's SIGIO (type, pid; pid 0: none).
pub fn get_owner(fd: i32) -> Result<(i32, i32), Errno> {
    let mut o = OwnerEx { kind: 0, pid: 0 };
    // SAFETY: F_GETOWN_EX writes one f_owner_ex, a live local.
    let r = unsafe { libc::fcntl(fd, F_GETOWN_EX, &mut o as *mut OwnerEx) };
    if r < 0 {
        return Err(Errno::last());
    }
    Ok((o.kind, o.pid))
}

/// F_SETOWN_EX.
pub fn set_owner(fd: i32, kind: i32, pid: i32) -> Result<(), Errno> {
    let o = OwnerEx { kind, pid };
    // SAFETY: F_SETOWN_EX reads one f_owner_ex, a live local.
    let r = unsafe { libc::fcntl(fd, F_SETOWN_EX, &o as *const OwnerEx) };
    if r < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// F_GETSIG: the signal sent instead of SIGIO (0: SIGIO).
pub fn get_sig(fd: i32) -> Result<i32, Errno> {
    // SAFETY: F_GETSIG takes no argument.
    let r = unsafe { libc::fcntl(fd, F_GETSIG) };
    if r < 0 {
        return Err(Errno::last());
    }
    Ok(r)
}

/// F_SETSIG.
pub fn set_sig(fd: i32, sig: i32) -> Result<(), Errno> {
    // SAFETY: F_SETSIG takes an int.
    let r = unsafe { libc::fcntl(fd, F_SETSIG, sig) };
    if r < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// flock(2), shared or exclusive, without waiting.
pub fn flock(fd: i32, exclusive: bool) -> Result<(), Errno> {
    let op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    } | libc::LOCK_NB;
    // SAFETY: flock takes plain values.
    if unsafe { libc::flock(fd, op) } != 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// A POSIX (F_SETLK) or OFD (F_OFD_SETLK) lock of bytes `start` to `end`
/// (u64::MAX: to the end of the file), without waiting.
pub fn set_lock(fd: i32, ofd: bool, write: bool, start: u64, end: u64) -> Result<(), Errno> {
    // SAFETY: flock is plain data; zeroed is a valid value.
    let mut l: libc::flock = unsafe { std::mem::zeroed() };
    l.l_type = if write { libc::F_WRLCK } else { libc::F_RDLCK } as i16;
    l.l_whence = libc::SEEK_SET as i16;
    l.l_start = start as i64;
    l.l_len = if end == u64::MAX {
        0
    } else {
        (end - start + 1) as i64
    };
    let cmd = if ofd {
        libc::F_OFD_SETLK
    } else {
        libc::F_SETLK
    };
    // SAFETY: the command reads one struct flock, a live local.
    if unsafe { libc::fcntl(fd, cmd, &l as *const libc::flock) } < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// F_SETLEASE, a read or write lease.
pub fn set_lease(fd: i32, write: bool) -> Result<(), Errno> {
    let t = if write { libc::F_WRLCK } else { libc::F_RDLCK };
    // SAFETY: F_SETLEASE takes an int.
    if unsafe { libc::fcntl(fd, libc::F_SETLEASE, t) } < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// A duplicate of descriptor `fd`, one a caller handed this process (an
/// --inherit-fd), with its status flags (F_GETFL). The caller keeps `fd`
/// open.
pub fn dup_given(fd: std::os::fd::RawFd) -> std::io::Result<(std::os::fd::OwnedFd, i32)> {
    // SAFETY: fcntl(F_GETFL) on any integer only reads the descriptor's
    // flags or fails with EBADF.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is open (F_GETFL worked) and stays so while borrowed,
    // by the caller's word; it is only duplicated.
    let b = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    Ok((b.try_clone_to_owned()?, flags))
}
