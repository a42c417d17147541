//! Established TCP connections through TCP_REPAIR (--tcp-established):
//! at the dump, the connection goes into repair mode (its task is
//! stopped) and gives its sequence numbers, both queues with the bytes in
//! flight, the options its handshake agreed, its window and clock; it
//! stays in repair mode, held, until the dump ends: closed so when its
//! task is killed, it ends without a word to the peer, and after a failed
//! dump or -R it leaves repair mode and goes on. At the restore a socket
//! in repair mode takes all of that back, connects without a handshake,
//! and leaves repair mode only once every file of the tree is open, its
//! peer included (one out of it before its peer exists again would be
//! answered with a reset); what it had not sent yet is sent then, as new
//! data.

#![forbid(unsafe_code)]

use std::os::fd::OwnedFd;

use cryo_image::proto::{FileEntry, TcpConnection};

use super::text;
use crate::sys::inet;

/// The connections a dump took into repair mode, held until it ends.
/// With each, its SO_REUSEADDR, which leaving repair mode clears.
pub(super) static REPAIRED: std::sync::Mutex<Vec<(OwnedFd, i32)>> =
    std::sync::Mutex::new(Vec::new());

/// Connection `ino` is no longer in repair mode (see pending): not held.
pub(super) fn forget(ino: u64) {
    use std::os::unix::fs::MetadataExt;
    let mut held = REPAIRED.lock().unwrap_or_else(|p| p.into_inner());
    held.retain(|(s, _)| {
        let same = s
            .try_clone()
            .ok()
            .and_then(|c| std::fs::File::from(c).metadata().ok())
            .is_some_and(|m| m.ino() == ino);
        !same
    });
}

/// Take connection `s` out of repair mode (`how`: TCP_REPAIR's value) with
/// its SO_REUSEADDR `reuse` set again (leaving repair mode clears it).
pub(super) fn repair_off(s: &OwnedFd, how: i32, reuse: i32) -> std::io::Result<()> {
    inet::setsockopt_int(s, libc::IPPROTO_TCP, inet::TCP_REPAIR, how)?;
    if reuse != 0 {
        inet::setsockopt_int(s, libc::SOL_SOCKET, libc::SO_REUSEADDR, reuse)?;
    }
    Ok(())
}

/// At the end of a dump: the connections it took into repair mode stay
/// in it when `killed` (their tasks are gone: closed in repair mode, they
/// end without a word to the peer, whose side the restore takes over),
/// else (a failed dump, or -R) they leave it and go on.
pub fn settle_repairs(killed: bool) {
    super::lock::settle(killed);
    let held = std::mem::take(&mut *REPAIRED.lock().unwrap_or_else(|p| p.into_inner()));
    for (s, reuse) in held.iter().filter(|_| !killed) {
        if let Err(e) = repair_off(s, inet::TCP_REPAIR_OFF_NO_WP, *reuse) {
            tracing::error!("taking a TCP connection out of repair mode: {e}");
        }
    }
}

/// What TCP_REPAIR gives of connection `s` (`info`: its tcp_info): it
/// goes into repair mode (its task is stopped) and stays there.
pub(super) fn dump(s: &OwnedFd, info: &[u8]) -> std::io::Result<TcpConnection> {
    let tcp = libc::IPPROTO_TCP;
    inet::setsockopt_int(s, tcp, inet::TCP_REPAIR, 1)?;
    let queue = |q: i32, len: i32| -> std::io::Result<(u32, Vec<u8>)> {
        inet::setsockopt_int(s, tcp, inet::TCP_REPAIR_QUEUE, q)?;
        let seq = inet::getsockopt_int(s, tcp, inet::TCP_QUEUE_SEQ)? as u32;
        let data = if len > 0 {
            inet::peek_queue(s, len as usize)?
        } else {
            Vec::new()
        };
        Ok((seq, data))
    };
    let unsent = inet::unsent(s)?.max(0) as u32;
    let (send_seq, send_queue) = queue(inet::TCP_SEND_QUEUE, inet::send_queued(s)?)?;
    let unsent = unsent.min(send_queue.len() as u32);
    let (recv_seq, recv_queue) = queue(inet::TCP_RECV_QUEUE, inet::recv_queued(s)?)?;
    let wscale = info.get(6).copied().unwrap_or(0);
    Ok(TcpConnection {
        send_seq,
        recv_seq,
        send_queue,
        recv_queue,
        mss: inet::getsockopt_int(s, tcp, libc::TCP_MAXSEG)? as u32,
        snd_wscale: u32::from(wscale & 0xf),
        rcv_wscale: u32::from(wscale >> 4),
        options: u32::from(info.get(5).copied().unwrap_or(0)),
        timestamp: inet::getsockopt_int(s, tcp, inet::TCP_TIMESTAMP)? as u32,
        window: inet::getsockopt_sized(s, tcp, inet::TCP_REPAIR_WINDOW, 20)?,
        unsent,
        lock: String::new(),
    })
}

/// Connection `s` (bound, in repair mode) made what `c` says: its
/// sequence numbers, then connected to `peer` without a handshake, its
/// options, window and queues; it stays in repair mode (see
/// [`leave_repair`]).
pub(super) fn make(s: &OwnedFd, c: &TcpConnection, peer: (&[u8], u16)) -> Result<(), String> {
    let tcp = libc::IPPROTO_TCP;
    let set = |name: i32, v: i32, what: &str| {
        inet::setsockopt_int(s, tcp, name, v).map_err(|e| format!("{what}: {e}"))
    };
    set(
        inet::TCP_REPAIR_QUEUE,
        inet::TCP_SEND_QUEUE,
        "TCP_REPAIR_QUEUE",
    )?;
    // TCP_QUEUE_SEQ gave where each queue ends; the queues written again
    // below take the sequence from where they start to there.
    let start = |end: u32, len: usize| end.wrapping_sub(len as u32) as i32;
    let send = start(c.send_seq, c.send_queue.len());
    set(inet::TCP_QUEUE_SEQ, send, "the send sequence")?;
    set(
        inet::TCP_REPAIR_QUEUE,
        inet::TCP_RECV_QUEUE,
        "TCP_REPAIR_QUEUE",
    )?;
    set(
        inet::TCP_QUEUE_SEQ,
        start(c.recv_seq, c.recv_queue.len()),
        "the receive sequence",
    )?;
    set(inet::TCP_TIMESTAMP, c.timestamp as i32, "TCP_TIMESTAMP")?;
    inet::bind_or_connect(s, peer.0, peer.1, true).map_err(|e| {
        format!(
            "connecting to {} in repair mode: {e}",
            text(peer.0, peer.1.into())
        )
    })?;
    // struct tcp_repair_opt pairs: code, value.
    let mut opts: Vec<(u32, u32)> = vec![(2, c.mss)]; // TCPOPT_MSS
    if c.options & 4 != 0 {
        opts.push((3, c.snd_wscale | (c.rcv_wscale << 16))); // TCPOPT_WINDOW
    }
    if c.options & 2 != 0 {
        opts.push((4, 0)); // TCPOPT_SACK_PERM
    }
    if c.options & 1 != 0 {
        opts.push((8, 0)); // TCPOPT_TIMESTAMP
    }
    let bytes: Vec<u8> = opts
        .iter()
        .flat_map(|(k, v)| k.to_ne_bytes().into_iter().chain(v.to_ne_bytes()))
        .collect();
    inet::setsockopt(s, tcp, inet::TCP_REPAIR_OPTIONS, &bytes)
        .map_err(|e| format!("TCP_REPAIR_OPTIONS: {e}"))?;
    // Room for the queues whatever the buffer sizes (SO_*BUFFORCE).
    let room = (2 * (c.send_queue.len() + c.recv_queue.len()) + 65536) as i32;
    for (get, force) in [
        (libc::SO_SNDBUF, libc::SO_SNDBUFFORCE),
        (libc::SO_RCVBUF, libc::SO_RCVBUFFORCE),
    ] {
        let now = inet::getsockopt_int(s, libc::SOL_SOCKET, get).unwrap_or(0);
        if now < room {
            inet::setsockopt_int(s, libc::SOL_SOCKET, force, room)
                .map_err(|e| format!("room for its queues: {e}"))?;
        }
    }
    let sent = &c.send_queue[..c.send_queue.len() - c.unsent as usize];
    for (q, data, what) in [
        (inet::TCP_RECV_QUEUE, &c.recv_queue[..], "receive"),
        (inet::TCP_SEND_QUEUE, sent, "send"),
    ] {
        if data.is_empty() {
            continue;
        }
        set(inet::TCP_REPAIR_QUEUE, q, "TCP_REPAIR_QUEUE")?;
        inet::send_all(s, data)
            .map_err(|e| format!("its {what} queue of {} bytes: {e}", data.len()))?;
    }
    // After the queues: the window's edges are checked against them.
    if !c.window.is_empty() {
        inet::setsockopt(s, tcp, inet::TCP_REPAIR_WINDOW, &c.window)
            .map_err(|e| format!("TCP_REPAIR_WINDOW: {e}"))?;
    }
    Ok(())
}
/// Once every file of the tree is open: its connections leave repair mode
/// together (one out of it before its peer exists again would be answered
/// with a reset).
/// What it had not sent yet goes as new data then.
pub(super) fn leave_repair(f: &FileEntry, fd: &OwnedFd) -> Result<(), String> {
    let Some(c) = f.inet.as_ref().and_then(|i| i.tcp.as_ref()) else {
        return Ok(());
    };
    let reuse = f.inet.as_ref().map_or(0, reuse_of);
    repair_off(fd, 0, reuse).map_err(|e| format!("leaving repair mode: {e}"))?;
    let unsent = &c.send_queue[c.send_queue.len() - c.unsent as usize..];
    inet::send_all(fd, unsent).map_err(|e| format!("its {} bytes not sent yet: {e}", unsent.len()))
}

/// The SO_REUSEADDR a socket's dumped options give (0: a new socket's).
pub(super) fn reuse_of(st: &cryo_image::proto::InetSocket) -> i32 {
    st.options
        .iter()
        .find(|o| o.level == libc::SOL_SOCKET && o.name == libc::SO_REUSEADDR)
        .and_then(|o| o.value.get(..4)?.try_into().ok())
        .map_or(0, i32::from_ne_bytes)
}
