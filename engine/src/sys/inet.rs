//! IPv4 and IPv6 socket calls: a new socket, raw socket options (read
//! and set as bytes), the local and peer addresses as (address bytes,
//! port), bind and connect to such, and FIONREAD.
//!
//! Every call takes a descriptor the caller holds, or returns a new one
//! owned, and buffers of ours sized for the call: a wrong argument only
//! makes the kernel return an error.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

/// A new socket of `family`, `ty` (flags or'ed in) and `protocol`.
pub fn socket(family: i32, ty: i32, protocol: i32) -> io::Result<OwnedFd> {
    // SAFETY: socket() takes integers only and returns a new descriptor.
    let s = check(unsafe { libc::socket(family, ty, protocol) })?;
    // SAFETY: `s` was just returned and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(s) })
}

/// The value of option `name` at `level`, as bytes (at most 256).
pub fn getsockopt(s: &impl AsFd, level: i32, name: i32) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `buf`, a live
    // buffer of that size, and the length written into `len`.
    check(unsafe {
        libc::getsockopt(
            s.as_fd().as_raw_fd(),
            level,
            name,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    })?;
    buf.truncate(len as usize);
    Ok(buf)
}

/// Set option `name` at `level` to `value`.
pub fn setsockopt(s: &impl AsFd, level: i32, name: i32, value: &[u8]) -> io::Result<()> {
    // SAFETY: the kernel reads `value.len()` bytes from a live slice.
    check(unsafe {
        libc::setsockopt(
            s.as_fd().as_raw_fd(),
            level,
            name,
            value.as_ptr().cast(),
            value.len() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// An int option.
pub fn getsockopt_int(s: &impl AsFd, level: i32, name: i32) -> io::Result<i32> {
    let v = getsockopt(s, level, name)?;
    Ok(i32::from_ne_bytes(
        v.get(..4).and_then(|b| b.try_into().ok()).unwrap_or([0; 4]),
    ))
}

fn to_pair(ss: &libc::sockaddr_storage) -> (Vec<u8>, u16) {
    match ss.ss_family as i32 {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in, and
            // sockaddr_storage is large and aligned enough for it.
            let a = unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            (
                a.sin_addr.s_addr.to_ne_bytes().to_vec(),
                u16::from_be(a.sin_port),
            )
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for a sockaddr_in6.
            let a = unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            (a.sin6_addr.s6_addr.to_vec(), u16::from_be(a.sin6_port))
        }
        _ => (Vec::new(), 0),
    }
}

fn from_pair(addr: &[u8], port: u16) -> io::Result<(libc::sockaddr_storage, libc::socklen_t)> {
    // SAFETY: zeroed is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr.len() {
        4 => {
            // SAFETY: sockaddr_storage is large and aligned enough for a
            // sockaddr_in, which we fill whole.
            let a = unsafe {
                &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>()
            };
            a.sin_family = libc::AF_INET as libc::sa_family_t;
            a.sin_port = port.to_be();
            a.sin_addr.s_addr = u32::from_ne_bytes([addr[0], addr[1], addr[2], addr[3]]);
            std::mem::size_of::<libc::sockaddr_in>()
        }
        16 => {
            // SAFETY: as above, for a sockaddr_in6.
            let a = unsafe {
                &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            a.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            a.sin6_port = port.to_be();
            a.sin6_addr.s6_addr.copy_from_slice(addr);
            std::mem::size_of::<libc::sockaddr_in6>()
        }
        n => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("an address of {n} bytes"),
            ))
        }
    };
    Ok((ss, len as libc::socklen_t))
}

/// The local (or, with `peer`, the peer's) address of `s` as (bytes, port).
pub fn address(s: &impl AsFd, peer: bool) -> io::Result<(Vec<u8>, u16)> {
    // SAFETY: zeroed is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let p = (&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr>();
    // SAFETY: the kernel writes at most `len` bytes into `ss`, a live
    // sockaddr_storage of that size.
    check(unsafe {
        if peer {
            libc::getpeername(s.as_fd().as_raw_fd(), p, &mut len)
        } else {
            libc::getsockname(s.as_fd().as_raw_fd(), p, &mut len)
        }
    })?;
    Ok(to_pair(&ss))
}

/// bind (or, with `connect`, connect) `s` to (`addr`, `port`).
pub fn bind_or_connect(s: &impl AsFd, addr: &[u8], port: u16, connect: bool) -> io::Result<()> {
    let (ss, len) = from_pair(addr, port)?;
    let p = (&ss as *const libc::sockaddr_storage).cast::<libc::sockaddr>();
    // SAFETY: the kernel reads `len` bytes of `ss`, a live local.
    check(unsafe {
        if connect {
            libc::connect(s.as_fd().as_raw_fd(), p, len)
        } else {
            libc::bind(s.as_fd().as_raw_fd(), p, len)
        }
    })
    .map(drop)
}

/// How many bytes wait to be read on `s` (FIONREAD).
pub fn queued(s: &impl AsFd) -> io::Result<i32> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int into `n`.
    check(unsafe { libc::ioctl(s.as_fd().as_raw_fd(), libc::FIONREAD, &mut n) })?;
    Ok(n)
}
