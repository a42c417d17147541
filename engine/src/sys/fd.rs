//! Descriptor-table calls on raw numbers, for the restore's new tasks,
//! which build their descriptor table number by number before they hand
//! over to the restorer: epoll instances and their watches, close_range,
//! dup3 onto a chosen number.
//!
//! These calls never touch memory of ours. They change which file a
//! descriptor number refers to, so the caller must own the numbers it
//! names: no `OwnedFd` elsewhere in the process may hold them (the new
//! tasks keep every descriptor of theirs as a raw number in their plan).

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// A new epoll instance (close-on-exec).
pub fn epoll_create() -> io::Result<OwnedFd> {
    // SAFETY: epoll_create1 takes flags only.
    let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Watch descriptor `tfd` from the epoll at number `epfd` for `events`,
/// with the data word `data`.
pub fn epoll_add(epfd: RawFd, tfd: RawFd, events: u32, data: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: data };
    // SAFETY: the kernel reads `ev`, a live local; the numbers are only
    // looked up in the descriptor table.
    if unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, tfd, &mut ev) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Close every descriptor from `first` to `last` (inclusive).
pub fn close_range(first: u32, last: u32) -> io::Result<()> {
    // SAFETY: close_range takes integers only; see the module's note on
    // owning the numbers.
    if unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Close descriptor `fd`, which the caller owns as a raw number.
pub fn close(fd: RawFd) {
    // SAFETY: close takes an integer only; see the module's note.
    unsafe { libc::close(fd) };
}

/// Make `to` a duplicate of `from` (dup3), close-on-exec if `cloexec`.
pub fn dup_onto(from: RawFd, to: RawFd, cloexec: bool) -> io::Result<()> {
    let flags = if cloexec { libc::O_CLOEXEC } else { 0 };
    // SAFETY: dup3 takes integers only; see the module's note.
    if unsafe { libc::dup3(from, to, flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A duplicate of `fd` at the lowest free number at or above `min`
/// (F_DUPFD_CLOEXEC), owned by the caller as a raw number.
pub fn dup_at_least(fd: RawFd, min: RawFd) -> io::Result<RawFd> {
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) takes integers only.
    let n = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, min) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n)
}

/// Whether `fd` is open, and then whether it is close-on-exec.
pub fn cloexec_of(fd: RawFd) -> Option<bool> {
    // SAFETY: fcntl(F_GETFD) takes integers only.
    let r = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    (r >= 0).then_some(r & libc::FD_CLOEXEC != 0)
}

/// Set or clear close-on-exec of `fd`.
pub fn set_cloexec(fd: RawFd, on: bool) -> io::Result<()> {
    let flags = if on { libc::FD_CLOEXEC } else { 0 };
    // SAFETY: fcntl(F_SETFD) takes integers only.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Set the status flags (O_NONBLOCK, O_APPEND, ...) of the open file
/// description behind `fd`.
pub fn set_status_flags(fd: RawFd, flags: i32) -> io::Result<()> {
    // SAFETY: fcntl(F_SETFL) takes integers only.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A borrow of descriptor number `fd`, which the caller keeps open for
/// the borrow's whole life (a descriptor inherited from cryo that the new
/// task holds until it hands over).
pub fn borrow(fd: RawFd) -> std::os::fd::BorrowedFd<'static> {
    // SAFETY: the caller keeps `fd` open while the borrow is used (see the
    // module's note: the new tasks own their numbers); a closed number
    // would only make the kernel return EBADF.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
}
