//! Network device ioctls nix does not wrap: a device's flags and MTU
//! (SIOCGIFFLAGS/SIOCSIFFLAGS, SIOCGIFMTU/SIOCSIFMTU), through a datagram
//! socket of the calling thread's network namespace.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: socket takes plain values and returns a new descriptor.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor was just returned and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn request(name: &str) -> io::Result<libc::ifreq> {
    // SAFETY: zeroed is a valid ifreq.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    let b = name.as_bytes();
    if b.len() >= r.ifr_name.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "device name too long",
        ));
    }
    for (d, &s) in r.ifr_name.iter_mut().zip(b) {
        *d = s as libc::c_char;
    }
    Ok(r)
}

fn ioctl(req: libc::c_ulong, r: &mut libc::ifreq) -> io::Result<()> {
    let s = socket()?;
    // SAFETY: the request is one of the device ioctls, which read and
    // write only the ifreq passed.
    if unsafe { libc::ioctl(s.as_raw_fd(), req, r as *mut libc::ifreq) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The flags (IFF_*) and MTU of device `name`.
pub fn device(name: &str) -> io::Result<(u32, u32)> {
    let mut r = request(name)?;
    ioctl(libc::SIOCGIFFLAGS, &mut r)?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    let flags = unsafe { r.ifr_ifru.ifru_flags } as u16 as u32;
    let mut r = request(name)?;
    ioctl(libc::SIOCGIFMTU, &mut r)?;
    // SAFETY: SIOCGIFMTU filled the mtu member of the union.
    let mtu = unsafe { r.ifr_ifru.ifru_mtu } as u32;
    Ok((flags, mtu))
}

/// Set device `name`'s MTU, then the flags of `mask` to those of `flags`.
pub fn set_device(name: &str, flags: u32, mask: u32, mtu: u32) -> io::Result<()> {
    let mut r = request(name)?;
    r.ifr_ifru.ifru_mtu = mtu as libc::c_int;
    ioctl(libc::SIOCSIFMTU, &mut r)?;
    let (now, _) = device(name)?;
    let mut r = request(name)?;
    r.ifr_ifru.ifru_flags = ((now & !mask) | (flags & mask)) as u16 as libc::c_short;
    ioctl(libc::SIOCSIFFLAGS, &mut r)
}
