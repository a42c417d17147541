//! Messages with descriptors (SCM_RIGHTS) over unix sockets, for the
//! workloads that put descriptors in flight.

/// Send `data` on socket `s` with `fds` attached (none: a plain message).
pub fn send_with_fds(s: i32, data: &[u8], fds: &[i32]) -> Result<(), String> {
    let mut cbuf = [0u64; 16];
    if fds.len() > 16 {
        return Err("at most 16 descriptors per message here".into());
    }
    // SAFETY: sendmsg with an iovec over `data` and a control buffer of
    // 128 bytes (room for 16 descriptors), both alive across the call;
    // the control message is written inside that buffer.
    unsafe {
        let mut iov = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        let mut mh: libc::msghdr = std::mem::zeroed();
        mh.msg_iov = &mut iov;
        mh.msg_iovlen = 1;
        if !fds.is_empty() {
            mh.msg_control = cbuf.as_mut_ptr().cast();
            mh.msg_controllen = libc::CMSG_SPACE((fds.len() * 4) as u32) as usize;
            let c = libc::CMSG_FIRSTHDR(&mh);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN((fds.len() * 4) as u32) as usize;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c) as *mut i32, fds.len());
        }
        if libc::sendmsg(s, &mh, libc::MSG_NOSIGNAL) < 0 {
            return Err(format!("sendmsg: {}", std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// One message from socket `s` (at most `max` bytes, without waiting)
/// and the descriptors it carries; nothing if none is queued.
pub fn recv_with_fds(s: i32, max: usize) -> (Vec<u8>, Vec<i32>) {
    let mut buf = vec![0u8; max];
    let mut cbuf = [0u64; 32];
    // SAFETY: recvmsg into `buf` and a 256-byte control buffer, both of
    // the sizes given; the control messages are walked within
    // msg_controllen.
    unsafe {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut mh: libc::msghdr = std::mem::zeroed();
        mh.msg_iov = &mut iov;
        mh.msg_iovlen = 1;
        mh.msg_control = cbuf.as_mut_ptr().cast();
        mh.msg_controllen = std::mem::size_of_val(&cbuf);
        let n = libc::recvmsg(s, &mut mh, libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return (Vec::new(), Vec::new());
        }
        let mut fds = Vec::new();
        let mut c = libc::CMSG_FIRSTHDR(&mh);
        while !c.is_null() {
            if (*c).cmsg_type == libc::SCM_RIGHTS {
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4;
                let data = libc::CMSG_DATA(c) as *const i32;
                for k in 0..count {
                    fds.push(*data.add(k));
                }
            }
            c = libc::CMSG_NXTHDR(&mh, c);
        }
        buf.truncate(n as usize);
        (buf, fds)
    }
}
