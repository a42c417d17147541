//! Terminal ioctls: pty numbering and locking, packet mode, line
//! settings, window size, controlling terminal and foreground group.
//!
//! Every call takes a descriptor number; a number that is not open (or
//! not a terminal) only makes the kernel return an error (EBADF, ENOTTY),
//! so the wrappers are safe whatever it is.

use std::os::fd::RawFd;

use nix::errno::Errno;

/// The device number of /dev/ptmx (and /dev/pts/ptmx): major 5, minor 2.
pub fn ptmx_rdev() -> u64 {
    libc::makedev(5, 2)
}

/// The index N of /dev/pts/N for a Unix98 pty slave device number, None
/// for any other device. Linux numbers every slave in major 136 with
/// minor N (20-bit minors); majors 137-143 are the older layout of 256
/// minors per major.
pub fn pty_slave_index(rdev: u64) -> Option<u32> {
    let major = libc::major(rdev);
    let minor = libc::minor(rdev);
    match major {
        136 => Some(minor),
        137..=143 => Some((major - 136) * 256 + minor),
        _ => None,
    }
}

/// Run an ioctl that reads into or writes from `*arg`.
fn ioctl_ptr<T>(fd: RawFd, req: libc::Ioctl, arg: &mut T) -> Result<(), Errno> {
    // SAFETY: `arg` is a live, exclusive reference to a `T`, which is the
    // argument type each caller pairs with `req` (the size the kernel
    // reads or writes is encoded in the request and matches `T`).
    let r = unsafe { libc::ioctl(fd, req, arg as *mut T) };
    Errno::result(r).map(drop)
}

/// Run an ioctl whose argument is a plain integer (not a pointer).
fn ioctl_int(fd: RawFd, req: libc::Ioctl, arg: libc::c_ulong) -> Result<(), Errno> {
    // SAFETY: the requests passed here (TIOCSCTTY, TIOCNOTTY) take an
    // integer or no argument: the kernel does not dereference it.
    let r = unsafe { libc::ioctl(fd, req, arg) };
    Errno::result(r).map(drop)
}

/// The index of the pty whose master `fd` is (TIOCGPTN).
pub fn pty_number(fd: RawFd) -> Result<u32, Errno> {
    let mut n: libc::c_uint = 0;
    ioctl_ptr(fd, libc::TIOCGPTN, &mut n)?;
    Ok(n)
}

/// The slave of the pty whose master `fd` is, opened (TIOCGPTPEER) with
/// `flags` (O_NOCTTY always): wherever its devpts is mounted.
pub fn pty_peer(fd: RawFd, flags: libc::c_int) -> Result<std::os::fd::OwnedFd, Errno> {
    use std::os::fd::FromRawFd;
    const TIOCGPTPEER: libc::Ioctl = 0x5441;
    // SAFETY: TIOCGPTPEER takes open flags as a plain integer and returns
    // a new descriptor, which we own at once.
    let r = unsafe { libc::ioctl(fd, TIOCGPTPEER, (flags | libc::O_NOCTTY) as libc::c_ulong) };
    let r = Errno::result(r)?;
    // SAFETY: `r` was just returned to us and is owned by nothing else.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(r) })
}

/// Whether the master `fd` is locked (TIOCGPTLCK).
pub fn pty_locked(fd: RawFd) -> Result<bool, Errno> {
    let mut v: libc::c_int = 0;
    ioctl_ptr(fd, libc::TIOCGPTLCK, &mut v)?;
    Ok(v != 0)
}

/// Lock or unlock the master `fd` (TIOCSPTLCK).
pub fn set_pty_locked(fd: RawFd, locked: bool) -> Result<(), Errno> {
    let mut v: libc::c_int = locked.into();
    ioctl_ptr(fd, libc::TIOCSPTLCK, &mut v)
}

/// Whether the master `fd` is in packet mode (TIOCGPKT).
pub fn packet_mode(fd: RawFd) -> Result<bool, Errno> {
    let mut v: libc::c_int = 0;
    ioctl_ptr(fd, libc::TIOCGPKT, &mut v)?;
    Ok(v != 0)
}

/// Switch packet mode of the master `fd` on or off (TIOCPKT).
pub fn set_packet_mode(fd: RawFd, on: bool) -> Result<(), Errno> {
    let mut v: libc::c_int = on.into();
    ioctl_ptr(fd, libc::TIOCPKT, &mut v)
}

/// The line settings (TCGETS2; on a pty master, the slave's).
pub fn get_termios(fd: RawFd) -> Result<libc::termios2, Errno> {
    // SAFETY: termios2 is plain integers and bytes; zero is a valid value.
    let mut t: libc::termios2 = unsafe { std::mem::zeroed() };
    ioctl_ptr(fd, libc::TCGETS2, &mut t)?;
    Ok(t)
}

/// Set the line settings at once (TCSETS2).
pub fn set_termios(fd: RawFd, t: &libc::termios2) -> Result<(), Errno> {
    let mut t = *t;
    ioctl_ptr(fd, libc::TCSETS2, &mut t)
}

/// The window size (TIOCGWINSZ).
pub fn get_winsize(fd: RawFd) -> Result<libc::winsize, Errno> {
    let mut w = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    ioctl_ptr(fd, libc::TIOCGWINSZ, &mut w)?;
    Ok(w)
}

/// Set the window size (TIOCSWINSZ).
pub fn set_winsize(fd: RawFd, w: &libc::winsize) -> Result<(), Errno> {
    let mut w = *w;
    ioctl_ptr(fd, libc::TIOCSWINSZ, &mut w)
}

/// Make the terminal behind `fd` (the slave, for a pty master) the
/// controlling terminal of the calling session leader (TIOCSCTTY, without
/// stealing it from another session).
pub fn set_controlling(fd: RawFd) -> Result<(), Errno> {
    ioctl_int(fd, libc::TIOCSCTTY, 0)
}

/// Give up the calling process's controlling terminal, `fd` being open on
/// it (TIOCNOTTY).
pub fn drop_controlling(fd: RawFd) -> Result<(), Errno> {
    ioctl_int(fd, libc::TIOCNOTTY, 0)
}

/// Make `pgrp` the foreground process group of the terminal behind `fd`
/// (TIOCSPGRP; the caller's controlling terminal, `pgrp` in its session).
/// SIGTTOU is blocked around the call, so a caller outside the foreground
/// is not stopped; the signal mask is put back.
pub fn set_foreground(fd: RawFd, pgrp: i32) -> Result<(), Errno> {
    use nix::sys::signal::{SigSet, SigmaskHow, Signal};
    let mut ttou = SigSet::empty();
    ttou.add(Signal::SIGTTOU);
    let mut old = SigSet::empty();
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&ttou), Some(&mut old))?;
    let mut p: libc::pid_t = pgrp;
    let r = ioctl_ptr(fd, libc::TIOCSPGRP, &mut p);
    let _ = nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slave_index_from_device_numbers() {
        assert_eq!(pty_slave_index(libc::makedev(136, 0)), Some(0));
        assert_eq!(pty_slave_index(libc::makedev(136, 255)), Some(255));
        assert_eq!(pty_slave_index(libc::makedev(137, 3)), Some(259));
        assert_eq!(pty_slave_index(libc::makedev(143, 255)), Some(2047));
        assert_eq!(pty_slave_index(libc::makedev(136, 4000)), Some(4000));
        assert_eq!(pty_slave_index(libc::makedev(5, 2)), None);
        assert_eq!(pty_slave_index(libc::makedev(4, 1)), None);
        assert_eq!(pty_slave_index(libc::makedev(144, 0)), None);
    }
}
