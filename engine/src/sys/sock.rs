//! Unix socket calls as the dump and restore of unix sockets need them,
//! where nix's typed API does not fit: a socket (or pair) of the raw type
//! an image holds, an address of the exact bytes sock_diag reported (a
//! path or an abstract name), listen with the dumped backlog, the peek
//! offset (SO_PEEK_OFF), and a peeking recvmsg that hands back the
//! descriptors an SCM_RIGHTS message installed.
//!
//! Every call takes a descriptor the caller holds (or makes new ones it
//! returns owned), so the wrappers are safe whatever the arguments are:
//! a wrong one only makes the kernel return an error.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;

/// A new unix socket of type `ty` (SOCK_STREAM, SOCK_DGRAM, ... with
/// flags such as SOCK_CLOEXEC or'ed in).
pub fn unix_socket(ty: i32) -> io::Result<OwnedFd> {
    // SAFETY: socket() takes integers only; the descriptor it returns is
    // new and owned by nothing else, so OwnedFd may close it.
    let s = unsafe { libc::socket(libc::AF_UNIX, ty, 0) };
    if s < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `s` is the new descriptor socket() just returned.
    Ok(unsafe { OwnedFd::from_raw_fd(s) })
}

/// A connected pair of unix sockets of type `ty` (flags or'ed in).
pub fn unix_socketpair(ty: i32) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut sv: [RawFd; 2] = [-1; 2];
    // SAFETY: socketpair() writes two descriptors into `sv`, a live local
    // array of exactly two ints.
    if unsafe { libc::socketpair(libc::AF_UNIX, ty, 0, sv.as_mut_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both are new descriptors socketpair() just made, owned by
    // nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(sv[0]), OwnedFd::from_raw_fd(sv[1])) })
}

/// A unix socket address of exactly the given name bytes: a path, or an
/// abstract name when the first byte is NUL. Its length covers the family
/// and the name, nothing more (the kernel tells abstract names apart by
/// their length).
pub struct UnixAddr {
    sa: libc::sockaddr_un,
    len: libc::socklen_t,
}

impl UnixAddr {
    /// None when the name does not fit in sun_path.
    pub fn new(name: &[u8]) -> Option<UnixAddr> {
        let mut sa = libc::sockaddr_un {
            sun_family: libc::AF_UNIX as libc::sa_family_t,
            sun_path: [0; 108],
        };
        if name.len() > sa.sun_path.len() {
            return None;
        }
        for (d, b) in sa.sun_path.iter_mut().zip(name) {
            *d = *b as libc::c_char;
        }
        let len = (std::mem::size_of::<libc::sa_family_t>() + name.len()) as libc::socklen_t;
        Some(UnixAddr { sa, len })
    }

    fn as_ptr(&self) -> *const libc::sockaddr {
        (&self.sa as *const libc::sockaddr_un).cast()
    }
}

/// bind(2) `s` to `addr`.
pub fn bind(s: &impl AsFd, addr: &UnixAddr) -> io::Result<()> {
    // SAFETY: `addr.sa` is a live sockaddr_un and `addr.len` is at most its
    // size (UnixAddr::new checks the name fits); the kernel only reads it.
    let r = unsafe { libc::bind(s.as_fd().as_raw_fd(), addr.as_ptr(), addr.len) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// connect(2) `s` to `addr`.
pub fn connect(s: &impl AsFd, addr: &UnixAddr) -> io::Result<()> {
    // SAFETY: as in bind: a live sockaddr_un of at least `addr.len` bytes,
    // only read by the kernel.
    let r = unsafe { libc::connect(s.as_fd().as_raw_fd(), addr.as_ptr(), addr.len) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// listen(2) on `s` with `backlog` as it is (the kernel caps it at
/// net.core.somaxconn).
pub fn listen(s: &impl AsFd, backlog: i32) -> io::Result<()> {
    // SAFETY: listen() takes integers only and touches no memory of ours.
    if unsafe { libc::listen(s.as_fd().as_raw_fd(), backlog) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Set the peek offset of `s` (SO_PEEK_OFF): from `off` on, MSG_PEEK
/// reads go on where the last one ended; -1 switches that off again.
pub fn set_peek_off(s: &impl AsFd, off: i32) -> Result<(), Errno> {
    // SAFETY: the option value is `off`, a live int, and the length passed
    // is its size; the kernel only reads it.
    let r = unsafe {
        libc::setsockopt(
            s.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEEK_OFF,
            (&off as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    Errno::result(r).map(drop)
}

/// One message read with MSG_PEEK.
pub struct Peeked {
    /// Bytes copied into the buffer.
    pub len: usize,
    /// The descriptors of the first SCM_RIGHTS message that came with it
    /// (a peek installs copies of them in this process); None when none
    /// came.
    pub rights: Option<Vec<OwnedFd>>,
    /// The sender's address (datagrams: a path, or an abstract name with
    /// its leading NUL; empty: an unnamed socket).
    pub from: Vec<u8>,
}

/// recvmsg(2) on `s` with MSG_PEEK | MSG_DONTWAIT into `buf`: the message
/// stays queued (with a peek offset set, the offset moves past it).
pub fn peek_msg(s: &impl AsFd, buf: &mut [u8]) -> Result<Peeked, Errno> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cbuf = [0u8; 256];
    // SAFETY: msghdr is plain integers and pointers; all zero is a valid
    // value (no name, no iovec, no control buffer).
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    mh.msg_iov = &mut iov;
    mh.msg_iovlen = 1;
    mh.msg_control = cbuf.as_mut_ptr().cast();
    mh.msg_controllen = cbuf.len();
    // SAFETY: sockaddr_un is plain data; all zero is a valid value.
    let mut name: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    mh.msg_name = (&mut name as *mut libc::sockaddr_un).cast();
    mh.msg_namelen = std::mem::size_of::<libc::sockaddr_un>() as u32;
    // SAFETY: `mh` points at `iov` (which describes `buf`), at `cbuf` and
    // at `name` with their true lengths; all live across the call and the
    // kernel writes within those lengths only.
    let n = unsafe {
        libc::recvmsg(
            s.as_fd().as_raw_fd(),
            &mut mh,
            libc::MSG_PEEK | libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
        )
    };
    if n < 0 {
        return Err(Errno::last());
    }
    let mut rights = None;
    if mh.msg_controllen > 0 {
        // SAFETY: the kernel wrote msg_controllen bytes of control messages
        // into `cbuf` (still alive, `mh` still points at it); CMSG_FIRSTHDR
        // and CMSG_NXTHDR stay within that length and return null at the
        // end, so every `c` dereferenced is a whole cmsghdr inside `cbuf`,
        // and an SCM_RIGHTS payload holds (cmsg_len - CMSG_LEN(0)) / 4
        // descriptors, which the peek installed in this process and nothing
        // else owns.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&mh);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(c) as *const RawFd;
                    let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4;
                    let fds = (0..count)
                        .map(|i| OwnedFd::from_raw_fd(data.add(i).read_unaligned()))
                        .collect();
                    rights = Some(fds);
                    break;
                }
                c = libc::CMSG_NXTHDR(&mh, c);
            }
        }
    }
    // The name's bytes after sun_family (msg_namelen says how many).
    let path_len = (mh.msg_namelen as usize)
        .saturating_sub(2)
        .min(name.sun_path.len());
    let from = name.sun_path[..path_len]
        .iter()
        .map(|&c| c as u8)
        .collect::<Vec<u8>>();
    // A path comes NUL-terminated; an abstract name starts with its NUL.
    let from = if from.first() == Some(&0) {
        from
    } else {
        from.split(|&b| b == 0).next().unwrap_or(&[]).to_vec()
    };
    Ok(Peeked {
        len: n as usize,
        rights,
        from,
    })
}

/// Send `bytes` on `s` with descriptor `fd` (SCM_RIGHTS), if any.
pub fn send_with_fd(s: &impl AsFd, bytes: &[u8], fd: Option<&OwnedFd>) -> io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let iov = [io::IoSlice::new(bytes)];
    let raw = fd.map(|f| [f.as_raw_fd()]);
    let cmsg: Vec<ControlMessage> = raw.iter().map(|r| ControlMessage::ScmRights(r)).collect();
    sendmsg::<()>(s.as_fd().as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)?;
    Ok(())
}

/// Receive a message of at most `buf.len()` bytes on `s` and the first
/// descriptor that came with it: (bytes, descriptor).
pub fn recv_with_fd(s: &impl AsFd, buf: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut cbuf = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [io::IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        s.as_fd().as_raw_fd(),
        &mut iov,
        Some(&mut cbuf),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut first = None;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for raw in fds {
                // SAFETY: the kernel installed `raw` in this process for
                // this message; nothing else owns it (the ones after the
                // first are closed when dropped here).
                let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                first.get_or_insert(owned);
            }
        }
    }
    Ok((msg.bytes, first))
}

/// A connection accepted on listening socket `s`.
pub fn accept(s: &impl AsFd) -> io::Result<OwnedFd> {
    let fd = nix::sys::socket::accept4(
        s.as_fd().as_raw_fd(),
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
    )?;
    // SAFETY: accept4 returned a new descriptor owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Descriptor `fd`, which the process that started this one left open
/// for it (as `pass_as` arranged), owned from now on. The caller must
/// name a descriptor nothing else in this process owns.
pub fn inherited(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: fcntl(F_GETFD) only asks whether `fd` is open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is open, and by the caller's word owned by nothing
    // else in this process.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Make `cmd`'s process start with `fd` as its descriptor `at`, in a
/// session of its own (a holder outliving cryo).
pub fn pass_as(cmd: &mut std::process::Command, fd: &OwnedFd, at: RawFd) {
    use std::os::unix::process::CommandExt;
    let raw = fd.as_raw_fd();
    // SAFETY: the closure runs in the child between fork and exec and
    // makes only async-signal-safe calls (dup2, setsid) on descriptors the
    // child inherited (`raw` is open there: the fork copied the table
    // while the caller held `fd`); it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(raw, at) < 0 {
                return Err(io::Error::last_os_error());
            }
            libc::setsid();
            Ok(())
        });
    }
}
