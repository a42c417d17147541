//! IPv4 and IPv6 socket calls: a new socket, raw socket options (read
//! and set as bytes), the local and peer addresses as (address bytes,
//! port), bind and connect to such, the datagrams queued on a UDP
//! socket (peeked), and a UDP datagram written through a raw socket.
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
    getsockopt_sized(s, level, name, 256)
}

/// The value of option `name` at `level`, asked with a buffer of `size`
/// bytes (some options take only their exact size).
pub fn getsockopt_sized(s: &impl AsFd, level: i32, name: i32, size: usize) -> io::Result<Vec<u8>> {
    getsockopt_in(s, level, name, vec![0u8; size])
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

/// A datagram and its source: (bytes, source address bytes, port).
pub type Peeked = (Vec<u8>, Vec<u8>, u16);

/// The bytes the receive queue of `s` takes (SO_MEMINFO's
/// SK_MEMINFO_RMEM_ALLOC), which reads nothing of it.
pub fn rmem_alloc(s: &impl AsFd) -> io::Result<u32> {
    let v = getsockopt(s, libc::SOL_SOCKET, libc::SO_MEMINFO)?;
    Ok(v.get(..4)
        .map_or(0, |b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]])))
}

/// Every datagram queued on `s`, in order, with its source, taken.
pub fn take_datagrams(s: &impl AsFd) -> io::Result<Vec<Peeked>> {
    datagrams(s, 0)
}

/// Every datagram queued on `s` with its source, received with `flags`
/// (and MSG_DONTWAIT) until none is left.
fn datagrams(s: &impl AsFd, flags: libc::c_int) -> io::Result<Vec<Peeked>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65536];
    loop {
        // SAFETY: zeroed is a valid sockaddr_storage.
        let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: the kernel writes at most buf.len() bytes into `buf` and
        // at most `len` into `ss`, both live locals of those sizes.
        let n = unsafe {
            libc::recvfrom(
                s.as_fd().as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                flags | libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                (&mut ss as *mut libc::sockaddr_storage).cast(),
                &mut len,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) => Ok(out),
                _ => Err(e),
            };
        }
        if n as usize > buf.len() {
            return Err(io::Error::other(format!("a datagram of {n} bytes")));
        }
        let (addr, port) = to_pair(&ss);
        out.push((buf[..n as usize].to_vec(), addr, port));
    }
}

/// Every datagram queued on UDP socket `s`, in order, with its source
/// (address bytes, port), read without taking any (MSG_PEEK from a peek
/// offset of 0, which makes each peek go on after the last; the socket's
/// own offset is set back after).
pub fn peek_datagrams(s: &impl AsFd) -> io::Result<Vec<Peeked>> {
    let was = getsockopt_int(s, libc::SOL_SOCKET, libc::SO_PEEK_OFF)?;
    setsockopt(s, libc::SOL_SOCKET, libc::SO_PEEK_OFF, &0i32.to_ne_bytes())?;
    let res = datagrams(s, libc::MSG_PEEK);
    setsockopt(s, libc::SOL_SOCKET, libc::SO_PEEK_OFF, &was.to_ne_bytes())?;
    res
}

fn fold(mut sum: u32, bytes: &[u8]) -> u32 {
    for c in bytes.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    sum
}

fn finish(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    match !(sum as u16) {
        0 => 0xffff,
        c => c,
    }
}

/// Put a UDP datagram from `src` (address bytes, port) to `dst` on the
/// wire of this thread's network namespace as it came, through a raw
/// socket (IPPROTO_RAW: the header is ours): the socket bound to `dst`
/// receives it with its source and boundaries.
pub fn inject_udp(src: (&[u8], u16), dst: (&[u8], u16), data: &[u8]) -> io::Result<()> {
    let udp_len = 8 + data.len();
    let mut udp = Vec::with_capacity(udp_len);
    udp.extend_from_slice(&src.1.to_be_bytes());
    udp.extend_from_slice(&dst.1.to_be_bytes());
    udp.extend_from_slice(&(udp_len as u16).to_be_bytes());
    // The UDP checksum is optional over IPv4 (0: none).
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(data);
    inject(libc::IPPROTO_UDP, src.0, dst.0, udp, 6)
}

/// Put ICMP (or, between IPv6 addresses, ICMPv6) message `msg` from `src`
/// to `dst` (address bytes) on the wire of this thread's network
/// namespace, as [`inject_udp`] does: an echo reply reaches the ping
/// socket whose identifier it carries.
pub fn inject_icmp(src: &[u8], dst: &[u8], msg: &[u8]) -> io::Result<()> {
    if src.len() == 16 {
        let mut m = msg.to_vec();
        if let Some(sum) = m.get_mut(2..4) {
            sum.fill(0);
        }
        return inject(libc::IPPROTO_ICMPV6, src, dst, m, 2);
    }
    // Its checksum covers the message alone: as it came.
    inject(libc::IPPROTO_ICMP, src, dst, msg.to_vec(), 2)
}

/// Send `l4` (a message of `protocol`) from `src` to `dst` in an IP
/// packet of ours; over IPv6 its checksum (at `sum_at`, over the pseudo
/// header) is filled in.
fn inject(protocol: i32, src: &[u8], dst: &[u8], mut l4: Vec<u8>, sum_at: usize) -> io::Result<()> {
    let len = l4.len();
    let (family, packet) = match (src.len(), dst.len()) {
        (4, 4) => {
            let mut p = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, protocol as u8, 0, 0];
            p[2..4].copy_from_slice(&((20 + len) as u16).to_be_bytes());
            p.extend_from_slice(src);
            p.extend_from_slice(dst);
            // The IP header's checksum the kernel fills in.
            p.extend_from_slice(&l4);
            (libc::AF_INET, p)
        }
        (16, 16) => {
            let mut p = vec![0x60, 0, 0, 0];
            p.extend_from_slice(&(len as u16).to_be_bytes());
            p.extend_from_slice(&[protocol as u8, 64]);
            p.extend_from_slice(src);
            p.extend_from_slice(dst);
            let mut sum = fold(0, src);
            sum = fold(sum, dst);
            sum = fold(sum, &(len as u32).to_be_bytes());
            sum = fold(sum, &[0, 0, 0, protocol as u8]);
            sum = fold(sum, &l4);
            if let Some(at) = l4.get_mut(sum_at..sum_at + 2) {
                at.copy_from_slice(&finish(sum).to_be_bytes());
            }
            p.extend_from_slice(&l4);
            (libc::AF_INET6, p)
        }
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "source and destination of different families",
            ))
        }
    };
    let raw = socket(
        family,
        libc::SOCK_RAW | libc::SOCK_CLOEXEC,
        libc::IPPROTO_RAW,
    )?;
    let (ss, slen) = from_pair(dst, 0)?;
    // SAFETY: the kernel reads packet.len() bytes of a live buffer and
    // `slen` bytes of `ss`, a live local.
    let n = unsafe {
        libc::sendto(
            raw.as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&ss as *const libc::sockaddr_storage).cast(),
            slen,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub const TCP_REPAIR: i32 = 19;
pub const TCP_REPAIR_QUEUE: i32 = 20;
pub const TCP_QUEUE_SEQ: i32 = 21;
pub const TCP_REPAIR_OPTIONS: i32 = 22;
pub const TCP_REPAIR_WINDOW: i32 = 29;
pub const TCP_TIMESTAMP: i32 = 24;
pub const TCP_RECV_QUEUE: i32 = 1;
pub const TCP_SEND_QUEUE: i32 = 2;
/// TCP_REPAIR off without the window probe the kernel would send.
pub const TCP_REPAIR_OFF_NO_WP: i32 = -1;

/// An int option set.
pub fn setsockopt_int(s: &impl AsFd, level: i32, name: i32, v: i32) -> io::Result<()> {
    setsockopt(s, level, name, &v.to_ne_bytes())
}

/// How many bytes the send queue of `s` holds (SIOCOUTQ).
pub fn send_queued(s: &impl AsFd) -> io::Result<i32> {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one int into `n`.
    check(unsafe { libc::ioctl(s.as_fd().as_raw_fd(), libc::TIOCOUTQ, &mut n) })?;
    Ok(n)
}

/// How many bytes at the end of the send queue of `s` were not sent yet
/// (SIOCOUTQNSD).
pub fn unsent(s: &impl AsFd) -> io::Result<i32> {
    const SIOCOUTQNSD: libc::Ioctl = 0x894B;
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQNSD writes one int into `n`.
    check(unsafe { libc::ioctl(s.as_fd().as_raw_fd(), SIOCOUTQNSD, &mut n) })?;
    Ok(n)
}

/// How many bytes the receive queue of `s` holds (SIOCINQ).
pub fn recv_queued(s: &impl AsFd) -> io::Result<i32> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD (SIOCINQ) writes one int into `n`.
    check(unsafe { libc::ioctl(s.as_fd().as_raw_fd(), libc::FIONREAD, &mut n) })?;
    Ok(n)
}

/// `len` bytes of the queue of `s` that TCP_REPAIR_QUEUE selects, read
/// without taking them (MSG_PEEK).
pub fn peek_queue(s: &impl AsFd, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        // SAFETY: the kernel writes at most len - got bytes at buf[got..].
        let n = unsafe {
            libc::recv(
                s.as_fd().as_raw_fd(),
                buf[got..].as_mut_ptr().cast(),
                len - got,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            break;
        }
        got += n as usize;
        // A peek reads from the queue's head each time: one call must
        // take it all.
        if got < len {
            return Err(io::Error::other(format!(
                "peeked {got} of the queue's {len} bytes"
            )));
        }
    }
    buf.truncate(got);
    Ok(buf)
}

/// One send(2) of `data` on `s` with `flags` (and MSG_NOSIGNAL): the
/// bytes taken.
fn send_once(s: &impl AsFd, data: &[u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: the kernel reads at most data.len() bytes of a live slice.
    let n = unsafe {
        libc::send(
            s.as_fd().as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            flags | libc::MSG_NOSIGNAL,
        )
    };
    match n {
        n if n < 0 => Err(io::Error::last_os_error()),
        0 if !data.is_empty() => Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "send took nothing",
        )),
        n => Ok(n as usize),
    }
}

/// Write all of `data` to `s` (in repair mode: into the queue
/// TCP_REPAIR_QUEUE selects).
pub fn send_all(s: &impl AsFd, data: &[u8]) -> io::Result<()> {
    let mut off = 0;
    while off < data.len() {
        off += send_once(s, &data[off..], 0)?;
    }
    Ok(())
}

/// Wait up to `ms` for `events` (POLLIN, POLLOUT) on `s`: whether they came.
pub fn poll(s: &impl AsFd, events: libc::c_short, ms: i32) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd: s.as_fd().as_raw_fd(),
        events,
        revents: 0,
    };
    // SAFETY: one live pollfd, as the count says.
    let n = check(unsafe { libc::poll(&mut p, 1, ms) })?;
    Ok(n > 0 && p.revents & events != 0)
}

/// A connection from the accept queue of listener `s` (which must hold
/// one: see [`poll`]), non-blocking, and its peer (address bytes, port).
pub fn accept(s: &impl AsFd) -> io::Result<(OwnedFd, (Vec<u8>, u16))> {
    // SAFETY: zeroed is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `ss`, a live
    // local of that size, and returns a new descriptor.
    let fd = check(unsafe {
        libc::accept4(
            s.as_fd().as_raw_fd(),
            (&mut ss as *mut libc::sockaddr_storage).cast(),
            &mut len,
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    })?;
    // SAFETY: `fd` was just returned and is owned by nothing else.
    Ok((unsafe { OwnedFd::from_raw_fd(fd) }, to_pair(&ss)))
}

/// Every byte queued for reading on non-blocking socket `s`, taken.
pub fn recv_all(s: &impl AsFd) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65536];
    loop {
        // SAFETY: the kernel writes at most buf.len() bytes into `buf`.
        let n = unsafe {
            libc::recv(
                s.as_fd().as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) => Ok(out),
                _ => Err(e),
            };
        }
        if n == 0 {
            return Err(io::Error::other("the peer closed its side"));
        }
        out.extend_from_slice(&buf[..n as usize]);
    }
}

/// Dissolve the connection of `s` (connect to AF_UNSPEC); in repair mode
/// nothing goes to the peer.
pub fn disconnect(s: &impl AsFd) -> io::Result<()> {
    // SAFETY: zeroed is a valid sockaddr_storage; AF_UNSPEC is 0.
    let ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    // SAFETY: the kernel reads the family of `ss`, a live local.
    check(unsafe {
        libc::connect(
            s.as_fd().as_raw_fd(),
            (&ss as *const libc::sockaddr_storage).cast(),
            std::mem::size_of::<libc::sa_family_t>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// Connect `s` to `peer` and write all of `data`, waiting on a
/// non-blocking socket (up to `secs` seconds in all).
pub fn connect_and_send(
    s: &impl AsFd,
    peer: (&[u8], u16),
    data: &[u8],
    secs: u64,
) -> io::Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    let left = || {
        deadline
            .saturating_duration_since(std::time::Instant::now())
            .as_millis() as i32
    };
    let timed_out = |what: &str| io::Error::new(io::ErrorKind::TimedOut, what.to_string());
    match bind_or_connect(s, peer.0, peer.1, true) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {
            if !poll(s, libc::POLLOUT, left())? {
                return Err(timed_out("the handshake did not end"));
            }
            match getsockopt_int(s, libc::SOL_SOCKET, libc::SO_ERROR)? {
                0 => {}
                err => return Err(io::Error::from_raw_os_error(err)),
            }
        }
        Err(e) => return Err(e),
    }
    let mut off = 0;
    while off < data.len() {
        match send_once(s, &data[off..], libc::MSG_DONTWAIT) {
            Ok(n) => off += n,
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                if !poll(s, libc::POLLOUT, left())? {
                    return Err(timed_out(&format!("{off} of {} bytes sent", data.len())));
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Option `name` at `level` read with `input` in the buffer first (some
/// options take their question there), the buffer `input.len()` long.
pub fn getsockopt_in(
    s: &impl AsFd,
    level: i32,
    name: i32,
    mut input: Vec<u8>,
) -> io::Result<Vec<u8>> {
    let mut len = input.len() as libc::socklen_t;
    // SAFETY: the kernel reads and writes at most `len` bytes of `input`,
    // a live buffer of that size, and the length written into `len`.
    check(unsafe {
        libc::getsockopt(
            s.as_fd().as_raw_fd(),
            level,
            name,
            input.as_mut_ptr().cast(),
            &mut len,
        )
    })?;
    input.truncate(len as usize);
    Ok(input)
}

/// The bytes of a struct sockaddr_in or sockaddr_in6 of `addr` (4 or 16
/// bytes) and `port`, in a sockaddr_storage's 128.
pub fn sockaddr_bytes(addr: &[u8], port: u16) -> io::Result<[u8; 128]> {
    let (ss, _) = from_pair(addr, port)?;
    let mut out = [0u8; 128];
    // SAFETY: sockaddr_storage is 128 plain bytes, all initialised
    // (zeroed, then filled).
    let bytes = unsafe {
        std::slice::from_raw_parts(
            (&ss as *const libc::sockaddr_storage).cast::<u8>(),
            std::mem::size_of::<libc::sockaddr_storage>(),
        )
    };
    out.copy_from_slice(&bytes[..128]);
    Ok(out)
}

/// The address bytes of a sockaddr_in or sockaddr_in6 in `b` (128 bytes
/// of a sockaddr_storage).
pub fn sockaddr_addr(b: &[u8]) -> Vec<u8> {
    match b
        .get(..2)
        .map(|f| i32::from(u16::from_ne_bytes([f[0], f[1]])))
    {
        Some(libc::AF_INET) => b.get(4..8).map(<[u8]>::to_vec).unwrap_or_default(),
        Some(libc::AF_INET6) => b.get(8..24).map(<[u8]>::to_vec).unwrap_or_default(),
        _ => Vec::new(),
    }
}
