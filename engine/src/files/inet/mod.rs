//! IPv4 and IPv6 sockets, dump and restore side by side: TCP sockets
//! listening, not yet connected, or established ([`repair`], with
//! --tcp-established; [`pending`] for those not accepted yet), UDP, ping
//! and raw sockets bound or connected, in multicast groups ([`mcast`]).
//!
//! Dump: the socket is taken from the stopped task with pidfd_getfd; its
//! family, type and protocol, its addresses (a raw or ping socket's peer
//! from /proc/PID/net, which getpeername does not tell), its TCP state
//! (TCP_INFO), a listener's backlog and accept queue (sock_diag, asked
//! in the holder's network namespace), and the options that differ from
//! those of a new socket of the same kind in that namespace. Refused by
//! name: an established connection without --tcp-established (or
//! --tcp-close, which keeps it closed), one in another state (on its way
//! up or down, half closed), a raw socket with packets queued, and other
//! families and types. A UDP or ping socket's queued datagrams are read
//! without taking them (MSG_PEEK from a peek offset), each with its
//! source; the kernel skips a zero-length datagram the task itself
//! peeked at before, which is then not kept.
//!
//! Restore: in the holder's network namespace (the open_files thread is
//! there), a socket of the same kind with its options set again, bound
//! to its address (SO_REUSEADDR held on over the bind, so that the dumped
//! tree's old connections do not keep the port), listening with its
//! backlog, in its multicast groups, its datagrams queued again from
//! their sources (an IPPROTO_RAW socket writes each as it came, before
//! the connect, which would filter them), and connected to its peer.

#![forbid(unsafe_code)]

use std::os::fd::{AsFd, OwnedFd};

use cryo_image::proto::{Datagram, FileEntry, InetSocket, SockOpt};

use super::{FdCtx, FilesError, ProcHandles};
use crate::sys::inet;

mod diag;
mod lock;
mod mcast;
mod pending;
mod repair;

pub use lock::{remove_saved as remove_saved_locks, unlock_after_restore, Lock};

pub use pending::link_pending;

pub use repair::settle_repairs;

const TCP_ESTABLISHED: u8 = 1;
const TCP_LISTEN: u8 = 10;

const TCP_CLOSE: u8 = 7;
const TCP_STATES: [&str; 13] = [
    "",
    "ESTABLISHED",
    "SYN_SENT",
    "SYN_RECV",
    "FIN_WAIT1",
    "FIN_WAIT2",
    "TIME_WAIT",
    "CLOSE",
    "CLOSE_WAIT",
    "LAST_ACK",
    "LISTEN",
    "CLOSING",
    "NEW_SYN_RECV",
];

/// The options kept where they differ from a new socket's (read as bytes,
/// set again as read; the buffer sizes halved, as the kernel doubles
/// them).
const OPTIONS: [(i32, i32); 36] = [
    (libc::SOL_SOCKET, libc::SO_REUSEADDR),
    (libc::SOL_SOCKET, libc::SO_REUSEPORT),
    (libc::SOL_SOCKET, libc::SO_KEEPALIVE),
    (libc::SOL_SOCKET, libc::SO_BROADCAST),
    (libc::SOL_SOCKET, libc::SO_LINGER),
    (libc::SOL_SOCKET, libc::SO_RCVBUF),
    (libc::SOL_SOCKET, libc::SO_SNDBUF),
    (libc::SOL_SOCKET, libc::SO_PRIORITY),
    (libc::SOL_SOCKET, libc::SO_OOBINLINE),
    (libc::SOL_SOCKET, libc::SO_RCVLOWAT),
    (libc::SOL_SOCKET, libc::SO_MARK),
    (libc::SOL_SOCKET, libc::SO_BINDTODEVICE),
    (libc::IPPROTO_IP, libc::IP_TOS),
    (libc::IPPROTO_IP, libc::IP_TTL),
    (libc::IPPROTO_IP, libc::IP_FREEBIND),
    (libc::IPPROTO_IPV6, libc::IPV6_V6ONLY),
    (libc::IPPROTO_IPV6, libc::IPV6_TCLASS),
    (libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS),
    (libc::IPPROTO_IP, libc::IP_MULTICAST_TTL),
    (libc::IPPROTO_IP, libc::IP_MULTICAST_LOOP),
    (libc::IPPROTO_IP, libc::IP_MULTICAST_IF),
    (libc::IPPROTO_IPV6, libc::IPV6_MULTICAST_HOPS),
    (libc::IPPROTO_IPV6, libc::IPV6_MULTICAST_LOOP),
    (libc::IPPROTO_IPV6, libc::IPV6_MULTICAST_IF),
    (libc::IPPROTO_TCP, libc::TCP_NODELAY),
    (libc::IPPROTO_TCP, libc::TCP_CORK),
    // Raw sockets': IP_HDRINCL, ICMP_FILTER, IPV6_CHECKSUM, IPV6_HDRINCL
    // and ICMPV6_FILTER.
    (libc::IPPROTO_IP, libc::IP_HDRINCL),
    (libc::SOL_RAW, 1),
    (libc::IPPROTO_IPV6, libc::IPV6_CHECKSUM),
    (libc::IPPROTO_IPV6, 36),
    (libc::IPPROTO_ICMPV6, 1),
    (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE),
    (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL),
    (libc::IPPROTO_TCP, libc::TCP_KEEPCNT),
    (libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT),
    (libc::IPPROTO_TCP, libc::TCP_DEFER_ACCEPT),
];

fn option_name(level: i32, name: i32) -> String {
    let known = [
        (libc::SOL_SOCKET, libc::SO_REUSEADDR, "SO_REUSEADDR"),
        (libc::SOL_SOCKET, libc::SO_BINDTODEVICE, "SO_BINDTODEVICE"),
        (libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, "IPV6_V6ONLY"),
        (libc::IPPROTO_TCP, libc::TCP_NODELAY, "TCP_NODELAY"),
    ];
    known
        .iter()
        .find(|k| k.0 == level && k.1 == name)
        .map_or_else(|| format!("option {level}:{name}"), |k| k.2.to_string())
}

/// Whether a socket of `family`, `ty` and `protocol` is a ping socket
/// (ICMP echo without privilege, net.ipv4.ping_group_range).
fn is_ping(family: i32, ty: i32, protocol: i32) -> bool {
    ty == libc::SOCK_DGRAM
        && ((family == libc::AF_INET && protocol == libc::IPPROTO_ICMP)
            || (family == libc::AF_INET6 && protocol == libc::IPPROTO_ICMPV6))
}

/// Dump side: its kind, addresses, state and options, or why it cannot
/// be made again.
///
/// `stopped`: the tree is stopped (not the checks made while it runs,
/// which must not peek at queues: a zero-length datagram once peeked is
/// skipped by every later peek from an offset).
pub fn dump(
    cx: &FdCtx,
    h: &mut ProcHandles,
    e: &mut FileEntry,
    opts: &super::CollectOptions,
) -> Result<(), FilesError> {
    let stopped = opts.owners;
    let s = h.getfd(cx.pid, cx.fd)?;
    let int = |name| inet::getsockopt_int(&s, libc::SOL_SOCKET, name);
    let read = |what: &str| {
        let what = what.to_string();
        move |err: std::io::Error| {
            cx.unsupported_owned(format!("a socket whose {what} cannot be read ({err})"))
        }
    };
    let family = int(libc::SO_DOMAIN).map_err(read("family"))?;
    let ty = int(libc::SO_TYPE).map_err(read("type"))?;
    let protocol = int(libc::SO_PROTOCOL).map_err(read("protocol"))?;
    let inet_family = family == libc::AF_INET || family == libc::AF_INET6;
    let kind = (ty, protocol);
    let ping = is_ping(family, ty, protocol);
    let raw = ty == libc::SOCK_RAW;
    if !inet_family
        || !(ping
            || raw
            || matches!(
                kind,
                (libc::SOCK_STREAM, libc::IPPROTO_TCP) | (libc::SOCK_DGRAM, libc::IPPROTO_UDP)
            ))
    {
        return Err(cx.unsupported_owned(format!(
            "a socket of family {family}, type {ty}, protocol {protocol} (only IPv4 and IPv6 TCP, UDP, ping and raw sockets, and unix sockets, are kept)"
        )));
    }
    let mut st = InetSocket {
        family: family as u32,
        r#type: ty as u32,
        protocol: protocol as u32,
        ..Default::default()
    };
    if let Ok((addr, port)) = inet::address(&s, false) {
        if port != 0 || addr.iter().any(|&b| b != 0) {
            st.local_addr = addr;
            st.local_port = port.into();
        }
    }
    let peer = if ping || raw {
        // getpeername does not tell it: /proc/PID/net does.
        let v6 = if family == libc::AF_INET6 { "6" } else { "" };
        let table = format!("{}{v6}", if raw { "raw" } else { "icmp" });
        diag::proc_remote(cx.pid, &table, cx.st.st_ino)
            .map_err(|w| cx.unsupported_owned(format!("a socket whose peer cannot be read: {w}")))?
            .map(|a| (a, 0))
    } else {
        inet::address(&s, true).ok().map(|(a, p)| (a, u32::from(p)))
    };
    // Before repair mode, which changes SO_REUSEADDR.
    st.options = changed_options(cx.pid, &s, family, ty, protocol).map_err(|w| {
        cx.unsupported_owned(format!("a socket whose options cannot be compared: {w}"))
    })?;
    if ty == libc::SOCK_STREAM {
        let info =
            inet::getsockopt(&s, libc::IPPROTO_TCP, libc::TCP_INFO).map_err(read("TCP state"))?;
        let state = info.first().copied().unwrap_or(0);
        match state {
            TCP_LISTEN => {
                let (queued, backlog) = listener_queues(cx.pid, cx.st.st_ino).map_err(|w| {
                    cx.unsupported_owned(format!(
                        "a TCP listener whose backlog cannot be read: {w}"
                    ))
                })?;
                if queued > 0 && !opts.tcp_established {
                    return Err(cx.unsupported_owned(format!(
                        "a TCP listener with {queued} connection(s) it has not accepted yet (dump with --tcp-established to keep them)"
                    )));
                }
                st.listening = true;
                st.backlog = backlog;
                st.pending = queued;
            }
            TCP_CLOSE => {}
            _ if opts.tcp_close => st.closed = true,
            TCP_ESTABLISHED if opts.tcp_established => {
                if stopped {
                    (st.peer_addr, st.peer_port) = peer.clone().unwrap_or_default();
                    st.tcp = Some(connection(cx, &s, &info, opts, &st)?);
                }
            }
            TCP_ESTABLISHED => {
                let peer = peer.map_or_else(|| "?".into(), |(a, p)| text(&a, p));
                return Err(cx.unsupported_owned(format!(
                    "an established TCP connection to {peer} (dump with --tcp-established to keep it, or --tcp-close to restore it closed)"
                )));
            }
            s => {
                let name = TCP_STATES.get(s as usize).copied().unwrap_or("unknown");
                let peer = peer.map_or_else(|| "?".into(), |(a, p)| text(&a, p));
                return Err(cx.unsupported_owned(format!(
                    "a TCP connection to {peer} in state {name} (only established ones are kept, with --tcp-established; --tcp-close restores it closed)"
                )));
            }
        }
    } else {
        if raw && stopped {
            let queued = inet::rmem_alloc(&s).map_err(read("receive queue"))?;
            if queued > 0 {
                return Err(cx.unsupported_owned(format!(
                    "a raw socket (protocol {protocol}) with {queued} bytes queued for reading (not kept: the kernel would act on those packets if they were sent again)"
                )));
            }
        }
        let queued = match stopped && !raw {
            true if ping => ping_queue(cx.pid, &s, &st).map_err(|w| {
                cx.unsupported_owned(format!(
                    "a ping socket whose queued replies cannot be read: {w}"
                ))
            })?,
            true => inet::peek_datagrams(&s).map_err(read("queued datagrams"))?,
            false => Vec::new(),
        };
        st.queue = queued
            .into_iter()
            .map(|(data, src_addr, port)| Datagram {
                data,
                src_addr,
                src_port: port.into(),
            })
            .collect();
        if let Some((addr, port)) = peer {
            st.peer_addr = addr;
            st.peer_port = port;
        }
        st.memberships = mcast::dump(cx.pid, &s, family).map_err(|w| {
            cx.unsupported_owned(format!(
                "a socket whose multicast groups cannot be read: {w}"
            ))
        })?;
    }
    e.inet = Some(st);
    Ok(())
}

/// The echo replies queued on ping socket `s` (of task `pid`, its state
/// so far `st`), in order with their sources. A ping socket has no peek
/// offset, so they are taken and at once queued on it again as they were
/// (see [`requeue`], in its network namespace): the tree stopped, its
/// queue is as before.
fn ping_queue(pid: i32, s: &OwnedFd, st: &InetSocket) -> Result<Vec<inet::Peeked>, String> {
    let taken = inet::take_datagrams(s).map_err(|e| format!("reading them: {e}"))?;
    if taken.is_empty() {
        return Ok(taken);
    }
    let again = InetSocket {
        queue: taken
            .iter()
            .map(|(data, src_addr, port)| Datagram {
                data: data.clone(),
                src_addr: src_addr.clone(),
                src_port: u32::from(*port),
            })
            .collect(),
        ..st.clone()
    };
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net")).map_err(|e| e.to_string())?;
    crate::sys::ns::in_namespace(ns.into(), nix::sched::CloneFlags::CLONE_NEWNET, || {
        requeue(s, &again).map_err(std::io::Error::other)
    })
    .map_err(|e| format!("queuing them again (they are lost): {e}"))?;
    Ok(taken)
}

/// Established connection `s` (its tcp_info `info`), its task stopped:
/// held (to leave repair mode if the dump fails, see settle_repairs),
/// locked (--network-lock), then read through TCP_REPAIR.
fn connection(
    cx: &FdCtx,
    s: &OwnedFd,
    info: &[u8],
    opts: &super::CollectOptions,
    st: &InetSocket,
) -> Result<cryo_image::proto::TcpConnection, FilesError> {
    let kept = s
        .try_clone()
        .map_err(|e| cx.unsupported_owned(format!("a socket that cannot be held ({e})")))?;
    let reuse = inet::getsockopt_int(s, libc::SOL_SOCKET, libc::SO_REUSEADDR).unwrap_or(0);
    repair::REPAIRED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((kept, reuse));
    let local = inet::address(s, false).map_err(|e| {
        cx.unsupported_owned(format!(
            "a TCP connection whose address cannot be read ({e})"
        ))
    })?;
    // One waiting in an accept queue of the tree is made again by a new
    // handshake (see pending), which a lock would stop.
    let waiting =
        pending::waits_in_accept_queue(cx.pid, &local, (&st.peer_addr, st.peer_port as u16))
            .map_err(|w| {
                cx.unsupported_owned(format!("a TCP connection whose peer cannot be found: {w}"))
            })?;
    let mut locked = "";
    if let Some((root, kind)) = opts.network_lock.filter(|_| !waiting) {
        let ends = (
            (&local.0[..], local.1),
            (&st.peer_addr[..], st.peer_port as u16),
        );
        lock::lock(cx.pid, ends, kind, root).map_err(|w| {
            cx.unsupported_owned(format!(
                "an established TCP connection that could not be locked ({w}; --network-lock skip does without)"
            ))
        })?;
        locked = kind.name();
    }
    let mut c = repair::dump(s, info).map_err(|w| {
        cx.unsupported_owned(format!(
            "an established TCP connection to {} that TCP_REPAIR could not read ({w})",
            text(&st.peer_addr, st.peer_port)
        ))
    })?;
    c.lock = locked.into();
    Ok(c)
}

/// The options of `s` that differ from those of a new socket of its kind
/// in the network namespace of task `pid`.
fn changed_options(
    pid: i32,
    s: &OwnedFd,
    family: i32,
    ty: i32,
    protocol: i32,
) -> Result<Vec<SockOpt>, String> {
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net")).map_err(|e| e.to_string())?;
    let fresh =
        crate::sys::ns::in_namespace(ns.into(), nix::sched::CloneFlags::CLONE_NEWNET, || {
            inet::socket(family, ty | libc::SOCK_CLOEXEC, protocol)
        })
        .map_err(|e| format!("a new socket to compare with: {e}"))?;
    let mut out = Vec::new();
    for (level, name) in OPTIONS {
        let tcp_only = level == libc::IPPROTO_TCP && ty != libc::SOCK_STREAM;
        let v6_only = level == libc::IPPROTO_IPV6 && family != libc::AF_INET6;
        // A stream socket's read but refused when set. By (level, name):
        // numbers repeat across levels (IPV6_MULTICAST_HOPS is
        // SO_RCVLOWAT's 18).
        let multicast = [
            (libc::IPPROTO_IP, libc::IP_MULTICAST_TTL),
            (libc::IPPROTO_IP, libc::IP_MULTICAST_LOOP),
            (libc::IPPROTO_IP, libc::IP_MULTICAST_IF),
            (libc::IPPROTO_IPV6, libc::IPV6_MULTICAST_HOPS),
            (libc::IPPROTO_IPV6, libc::IPV6_MULTICAST_LOOP),
            (libc::IPPROTO_IPV6, libc::IPV6_MULTICAST_IF),
        ];
        let not_stream = multicast.contains(&(level, name));
        if tcp_only || v6_only || (not_stream && ty == libc::SOCK_STREAM) {
            continue;
        }
        let (Ok(now), Ok(new)) = (
            inet::getsockopt(s, level, name),
            inet::getsockopt(&fresh, level, name),
        ) else {
            continue;
        };
        if now != new {
            out.push(SockOpt {
                level,
                name,
                value: now,
            });
        }
    }
    Ok(out)
}

/// A TCP listener's accept queue length and backlog (sock_diag's rqueue
/// and wqueue), found by its inode among the listeners of the network
/// namespace of task `pid`.
fn listener_queues(pid: i32, ino: u64) -> Result<(u32, u32), String> {
    diag::tcp_sockets(pid, 1 << TCP_LISTEN)?
        .iter()
        .find(|l| l.inode == ino)
        .map(|l| (l.rqueue, l.wqueue))
        .ok_or_else(|| format!("listener inode {ino} is not in sock_diag's list"))
}

/// Restore side: the socket made again (in the thread's network
/// namespace, its holder's).
pub fn make(f: &FileEntry) -> Result<OwnedFd, String> {
    let st = f
        .inet
        .as_ref()
        .ok_or("an IPv4/IPv6 socket without its state")?;
    let (family, ty, protocol) = (st.family as i32, st.r#type as i32, st.protocol as i32);
    let s = inet::socket(family, ty | libc::SOCK_CLOEXEC, protocol).map_err(|e| {
        let hint = match e.raw_os_error() {
            Some(libc::EACCES) if is_ping(family, ty, protocol) => {
                " (a ping socket: cryo's group is not in net.ipv4.ping_group_range there)"
            }
            _ => "",
        };
        format!("socket({family}, {ty}, {protocol}): {e}{hint}")
    })?;
    for o in &st.options {
        let mut value = o.value.clone();
        if o.level == libc::SOL_SOCKET && (o.name == libc::SO_RCVBUF || o.name == libc::SO_SNDBUF) {
            let v = i32::from_ne_bytes(
                value
                    .get(..4)
                    .and_then(|b| b.try_into().ok())
                    .unwrap_or([0; 4]),
            );
            value = (v / 2).to_ne_bytes().to_vec();
        }
        inet::setsockopt(&s, o.level, o.name, &value).map_err(|e| {
            format!(
                "setting {} to {:?}: {e}",
                option_name(o.level, o.name),
                value
            )
        })?;
    }
    if st.closed {
        // --tcp-close: of its kind and options, not connected (reads
        // return ENOTCONN, writes EPIPE).
        return Ok(s);
    }
    if st.pending_on.is_some() {
        // Connected once every file is open (see finish).
        bind(&s, st)?;
        return Ok(s);
    }
    if st.tcp.is_some() {
        // A connection goes into repair mode before its bind, once its
        // options are set (SO_REUSEADDR would undo what repair mode does):
        // the kernel then lets it share its port with a listener.
        inet::setsockopt_int(&s, libc::IPPROTO_TCP, inet::TCP_REPAIR, 1)
            .map_err(|e| format!("TCP_REPAIR: {e}"))?;
        inet::bind_or_connect(&s, &st.local_addr, st.local_port as u16, false).map_err(|e| {
            format!(
                "binding to {} in repair mode: {e}",
                text(&st.local_addr, st.local_port)
            )
        })?;
    } else if !st.local_addr.is_empty() {
        bind(&s, st)?;
    }
    if st.listening {
        crate::sys::sock::listen(&s, st.backlog as i32)
            .map_err(|e| format!("listen (backlog {}): {e}", st.backlog))?;
    }
    if let Some(c) = &st.tcp {
        repair::make(&s, c, (&st.peer_addr, st.peer_port as u16)).map_err(|e| {
            format!(
                "the TCP connection to {}: {e}",
                text(&st.peer_addr, st.peer_port)
            )
        })?;
        return Ok(s);
    }
    mcast::restore(&s, family, &st.memberships)?;
    // Before the connect, which would filter out other sources.
    requeue(&s, st)?;
    if !st.peer_addr.is_empty() {
        inet::bind_or_connect(&s, &st.peer_addr, st.peer_port as u16, true)
            .map_err(|e| format!("connecting to {}: {e}", text(&st.peer_addr, st.peer_port)))?;
    }
    Ok(s)
}

/// The kinds of lock the dump left for the connections of `files`, each
/// once.
pub fn locks_of(files: &[FileEntry]) -> Vec<Lock> {
    let mut out = Vec::new();
    for l in files
        .iter()
        .filter_map(|f| f.inet.as_ref()?.tcp.as_ref())
        .filter_map(|c| Lock::from_name(&c.lock))
    {
        if !out.contains(&l) {
            out.push(l);
        }
    }
    out
}

/// Restore side of --tcp-close: every connection of `files` made closed
/// (of its kind and options, not connected).
pub fn close_connections(files: &mut [FileEntry]) {
    for st in files.iter_mut().filter_map(|f| f.inet.as_mut()) {
        if st.tcp.is_some() || st.pending_on.is_some() {
            st.tcp = None;
            st.pending_on = None;
            st.closed = true;
        }
    }
}

/// Once every file of the tree is open, in [`finish_order`]: connections
/// leave repair mode, those that waited in an accept queue connect again.
pub fn finish(f: &FileEntry, fd: &OwnedFd) -> Result<(), String> {
    match f.inet.as_ref() {
        Some(st) if st.pending_on.is_some() => pending::connect(fd, st),
        Some(_) => repair::leave_repair(f, fd),
        None => Ok(()),
    }
}

/// Where `f` comes in the order of [`finish`]: connections that waited
/// in an accept queue after the others, in the queue's order.
pub fn finish_order(f: &FileEntry) -> u32 {
    f.inet
        .as_ref()
        .and_then(|s| s.pending_on.as_ref())
        .map_or(0, |p| p.order + 1)
}

/// The dumped datagrams of UDP socket `s` queued on it again, each from
/// its source, through a raw socket (see `sys::inet::inject_udp`), and
/// waited for.
fn requeue(s: &OwnedFd, st: &InetSocket) -> Result<(), String> {
    if st.queue.is_empty() {
        return Ok(());
    }
    let any = st.local_addr.iter().all(|&b| b == 0);
    let mapped =
        |a: &[u8]| a.len() == 16 && a[..10].iter().all(|&b| b == 0) && a[10..12] == [0xff, 0xff];
    for (i, d) in st.queue.iter().enumerate() {
        // A v4 datagram on a dual-stack socket came as IPv4; one to the
        // unspecified address goes to the loopback's.
        let (src, dst): (Vec<u8>, Vec<u8>) = if mapped(&d.src_addr) {
            let dst = if any || !mapped(&st.local_addr) {
                vec![127, 0, 0, 1]
            } else {
                st.local_addr[12..].to_vec()
            };
            (d.src_addr[12..].to_vec(), dst)
        } else if any {
            let lo = if d.src_addr.len() == 4 {
                vec![127, 0, 0, 1]
            } else {
                std::net::Ipv6Addr::LOCALHOST.octets().to_vec()
            };
            (d.src_addr.clone(), lo)
        } else {
            (d.src_addr.clone(), st.local_addr.clone())
        };
        let sent = if is_ping(st.family as i32, st.r#type as i32, st.protocol as i32) {
            inet::inject_icmp(&src, &dst, &d.data)
        } else {
            inet::inject_udp(
                (&src, d.src_port as u16),
                (&dst, st.local_port as u16),
                &d.data,
            )
        };
        sent.map_err(|e| {
            format!(
                "queuing datagram {i} (from {}) again: {e}",
                text(&d.src_addr, d.src_port)
            )
        })?;
    }
    // Delivered on the way out of each send, as a rule; waited for by the
    // memory the queue takes until it stops growing (peeking would mark a
    // zero-length datagram, which the next dump's peeks would then skip).
    let start = std::time::Instant::now();
    let mut last = 0;
    loop {
        let now = inet::rmem_alloc(s).map_err(|e| format!("SO_MEMINFO: {e}"))?;
        if now > 0 && now == last {
            return Ok(());
        }
        if start.elapsed() > std::time::Duration::from_secs(2) {
            return Err(format!(
                "the {} datagrams queued again did not arrive",
                st.queue.len()
            ));
        }
        last = now;
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Bind `s` to its address, SO_REUSEADDR on over the bind (a TCP port the
/// dumped tree's old connections still hold in TIME_WAIT), then as it was.
fn bind(s: &impl AsFd, st: &InetSocket) -> Result<(), String> {
    let reuse =
        |v: i32| inet::setsockopt(s, libc::SOL_SOCKET, libc::SO_REUSEADDR, &v.to_ne_bytes());
    let was = inet::getsockopt_int(s, libc::SOL_SOCKET, libc::SO_REUSEADDR).unwrap_or(0);
    let tcp = st.r#type as i32 == libc::SOCK_STREAM;
    if tcp && was == 0 {
        reuse(1).map_err(|e| format!("SO_REUSEADDR for the bind: {e}"))?;
    }
    let bound = inet::bind_or_connect(s, &st.local_addr, st.local_port as u16, false)
        .map_err(|e| format!("binding to {}: {e}", text(&st.local_addr, st.local_port)));
    if tcp && was == 0 {
        reuse(0).map_err(|e| format!("SO_REUSEADDR after the bind: {e}"))?;
    }
    bound
}

/// An address and port as `ip` and `ss` write them.
pub fn text(addr: &[u8], port: u32) -> String {
    let ip = crate::ns::net::addrs::ip_text(addr);
    match addr.len() {
        16 => format!("[{ip}]:{port}"),
        4 => format!("{ip}:{port}"),
        _ => format!("?:{port}"),
    }
}
