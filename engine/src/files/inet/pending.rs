//! Connections that a listener of the tree has not accepted yet, their
//! client in the tree too (with --tcp-established), dump and restore
//! side by side. The kernel cannot put a connection back into an accept
//! queue, and gives no way to read one's queue but accepting it; so both
//! sides make the connection anew with a real handshake, the client's
//! socket carrying what it had sent:
//!
//! Dump (every task stopped, once every descriptor is read): each
//! connection of the queue is accepted, in order, by cryo (on its copy of
//! the listener), and its bytes read; the client's socket (in repair mode
//! since its descriptor was read, its unacknowledged bytes taken) and the
//! accepted one are dissolved without a word on the wire, the client's
//! connects to the listener again from its address and sends those bytes
//! again. The queue is then as it was but for the sequence numbers, which
//! neither end sees: a dump that fails or leaves the tree running needs
//! no undoing. A connection whose client is not the tree's is refused.
//!
//! Restore: the client's socket is bound to its address when made, and
//! once every file is open (its listener listens) connects and sends its
//! bytes, the tree's waiting connections in their dumped order.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::os::fd::OwnedFd;

use cryo_image::proto::{FileKind, PendingConnection};

use super::diag::{self, unspecified, v6, TcpSock};
use super::{repair, text, TCP_ESTABLISHED};
use crate::files::{FilesError, OpenFile};
use crate::sys;
use crate::sys::inet;

/// How long the handshake and the bytes sent again may take.
const SECS: u64 = 5;

/// Whether the connection of a task `pid` from `local` to `peer` (address
/// bytes, port) waits in an accept queue: its other end, a socket no file
/// holds yet.
pub(super) fn waits_in_accept_queue(
    pid: i32,
    local: &(Vec<u8>, u16),
    peer: (&[u8], u16),
) -> Result<bool, String> {
    // One exact lookup of the other end (not a walk of every socket: this
    // runs for each connection of the tree).
    let other = diag::tcp_socket(pid, peer, (&local.0, local.1))?;
    Ok(other.is_some_and(|s| s.inode == 0 && s.state == TCP_ESTABLISHED))
}

/// Dump side, over the tree's files table: every connection waiting on a
/// listener of the tree taken from the queue and made again (see the
/// module's note); its client's entry keeps it as `pending_on`.
pub fn link_pending(table: &mut [OpenFile]) -> Result<(), FilesError> {
    let listeners: Vec<usize> = (0..table.len())
        .filter(|&i| {
            let e = &table[i].entry;
            e.kind == FileKind::FileInetSocket as i32
                && e.inet
                    .as_ref()
                    .is_some_and(|s| s.listening && s.pending > 0)
        })
        .collect();
    let mut order = 0;
    for li in listeners {
        let (pid, fd, path) = (table[li].pid, table[li].fd, table[li].entry.path.clone());
        let refuse = |what: String| FilesError::Unsupported {
            pid,
            fd,
            what,
            link: path.clone(),
        };
        let st = table[li].entry.inet.clone().unwrap_or_default();
        let at = text(&st.local_addr, st.local_port);
        let clients = clients_of(table, pid, &st).map_err(|w| {
            refuse(format!(
                "a TCP listener on {at} with {} connection(s) it has not accepted yet: {w}",
                st.pending
            ))
        })?;
        let listener =
            getfd(pid, fd).map_err(|w| refuse(format!("the TCP listener on {at}: {w}")))?;
        for _ in 0..st.pending {
            let ci = take_one(table, &listener, &clients)
                .map_err(|w| refuse(format!("the TCP listener on {at}: {w}")))?;
            let e = &mut table[ci].entry;
            if let Some(s) = e.inet.as_mut() {
                if let Some(p) = s.pending_on.as_mut() {
                    p.order = order;
                }
            }
            order += 1;
        }
    }
    Ok(())
}

/// The clients of the connections waiting on listener `st` (of task
/// `pid`): each one's table index by its address, or why one cannot be
/// kept.
fn clients_of(
    table: &[OpenFile],
    pid: i32,
    st: &cryo_image::proto::InetSocket,
) -> Result<HashMap<([u8; 16], u16), usize>, String> {
    let (addr, port) = (v6(&st.local_addr), st.local_port as u16);
    let socks = diag::tcp_sockets(pid, 1 << TCP_ESTABLISHED)?;
    let waiting: Vec<&TcpSock> = socks
        .iter()
        .filter(|c| c.inode == 0 && c.local.1 == port && (unspecified(&addr) || c.local.0 == addr))
        .collect();
    if waiting.len() != st.pending as usize {
        return Err(format!(
            "sock_diag shows {} of them (the others are still on their way in; dump again)",
            waiting.len()
        ));
    }
    let mut out = HashMap::new();
    for w in waiting {
        let client = socks
            .iter()
            .find(|k| k.local == w.remote && k.remote == w.local && k.inode != 0);
        let index = client.and_then(|k| {
            table.iter().position(|o| {
                o.entry.kind == FileKind::FileInetSocket as i32
                    && o.entry.inode == k.inode
                    && o.entry.inet.as_ref().is_some_and(|i| i.tcp.is_some())
            })
        });
        let Some(i) = index else {
            return Err(format!(
                "the one from {} has its other end outside the tree (the kernel cannot put a connection back into an accept queue)",
                text(&w.remote.0, w.remote.1.into())
            ));
        };
        out.insert(w.remote, i);
    }
    Ok(out)
}

/// The next connection of `listener`'s queue taken and made again from
/// its client, one of `clients`: returns the client's table index.
fn take_one(
    table: &mut [OpenFile],
    listener: &OwnedFd,
    clients: &HashMap<([u8; 16], u16), usize>,
) -> Result<usize, String> {
    if !inet::poll(listener, libc::POLLIN, 0).map_err(|e| format!("poll: {e}"))? {
        return Err("its accept queue is empty".into());
    }
    let (taken, from) = inet::accept(listener).map_err(|e| format!("accept: {e}"))?;
    let at = text(&from.0, from.1.into());
    let &ci = clients
        .get(&(v6(&from.0), from.1))
        .ok_or_else(|| format!("it gave a connection from {at}, which sock_diag did not show"))?;
    let received =
        inet::recv_all(&taken).map_err(|e| format!("reading the connection from {at}: {e}"))?;
    // Where what it received ends: the client may not have had the last
    // of it acknowledged yet, and keeps that in its send queue too.
    let tcp = libc::IPPROTO_TCP;
    let received_end = inet::setsockopt_int(&taken, tcp, inet::TCP_REPAIR, 1)
        .and_then(|()| {
            inet::setsockopt_int(&taken, tcp, inet::TCP_REPAIR_QUEUE, inet::TCP_RECV_QUEUE)
        })
        .and_then(|()| inet::getsockopt_int(&taken, tcp, inet::TCP_QUEUE_SEQ))
        .map_err(|e| format!("the accepted connection from {at} in repair mode: {e}"))?
        as u32;
    let o = &mut table[ci];
    let client = getfd(o.pid, o.fd).map_err(|e| format!("the client from {at}: {e}"))?;
    let st = o.entry.inet.as_mut().ok_or("a client without its state")?;
    let conn = st.tcp.take().unwrap_or_default();
    let unacked_start = conn.send_seq.wrapping_sub(conn.send_queue.len() as u32);
    let twice = (received_end.wrapping_sub(unacked_start) as i32).max(0) as usize;
    let mut data = received;
    data.extend_from_slice(&conn.send_queue[twice.min(conn.send_queue.len())..]);
    let reuse = repair::reuse_of(st);
    again(&client, taken, st, &data, reuse).map_err(|w| {
        format!("the connection from {at}, made again (it is lost; its client sees it closed): {w}")
    })?;
    repair::forget(o.entry.inode);
    st.pending_on = Some(PendingConnection { order: 0, data });
    Ok(ci)
}

/// A duplicate of descriptor `fd` of task `pid`.
fn getfd(pid: i32, fd: i32) -> Result<OwnedFd, String> {
    let p = nix::unistd::Pid::from_raw(pid);
    let pidfd = sys::pidfd_open(p).map_err(|e| e.to_string())?;
    sys::pidfd_getfd(&pidfd, p, fd).map_err(|e| e.to_string())
}

/// Client `c` and the connection `taken` from the listener (both in
/// repair mode) dissolved without a word on the wire, then `c` connected to
/// the listener again from its address and `data` sent.
fn again(
    c: &OwnedFd,
    taken: OwnedFd,
    st: &cryo_image::proto::InetSocket,
    data: &[u8],
    reuse: i32,
) -> Result<(), String> {
    // In repair mode (see take_one): closed without a word.
    drop(taken);
    inet::disconnect(c).map_err(|e| format!("dissolving the client's side: {e}"))?;
    repair::repair_off(c, inet::TCP_REPAIR_OFF_NO_WP, reuse)
        .map_err(|e| format!("leaving repair mode: {e}"))?;
    // Dissolved in repair mode, it took ECONNABORTED: read, so cleared.
    let _ = inet::getsockopt_int(c, libc::SOL_SOCKET, libc::SO_ERROR);
    let (_, port) = inet::address(c, false).map_err(|e| format!("getsockname: {e}"))?;
    if port == 0 {
        super::bind(c, st)?;
    }
    inet::connect_and_send(c, (&st.peer_addr, st.peer_port as u16), data, SECS)
        .map_err(|e| format!("connecting again and sending its {} bytes: {e}", data.len()))
}

/// Restore side, once every file is open: connection `st` made again to
/// its listener, its bytes sent.
pub(super) fn connect(fd: &OwnedFd, st: &cryo_image::proto::InetSocket) -> Result<(), String> {
    let Some(p) = &st.pending_on else {
        return Ok(());
    };
    let peer = (&st.peer_addr[..], st.peer_port as u16);
    inet::connect_and_send(fd, peer, &p.data, SECS).map_err(|e| {
        format!(
            "connecting to {} (waiting there to be accepted) and sending its {} bytes: {e}",
            text(peer.0, peer.1.into()),
            p.data.len()
        )
    })
}
