//! The TCP sockets of a network namespace as sock_diag lists them (both
//! families), or one found by its ends: state, both ends, inode (0: no file holds it, as for a
//! connection waiting in an accept queue) and queue lengths.

#![forbid(unsafe_code)]

use std::os::fd::OwnedFd;

use crate::sys::netlink::Netlink;

/// One TCP socket of sock_diag's list. Addresses are 16 bytes, an IPv4
/// one as v4-mapped (see [`v6`]).
#[derive(Debug, Clone)]
pub struct TcpSock {
    pub state: u8,
    pub local: ([u8; 16], u16),
    pub remote: ([u8; 16], u16),
    pub inode: u64,
    /// A listener's accept queue length and backlog; a connection's bytes
    /// to read and to send.
    pub rqueue: u32,
    pub wqueue: u32,
}

/// `addr` (4 or 16 bytes) as 16: an IPv4 address v4-mapped.
pub fn v6(addr: &[u8]) -> [u8; 16] {
    let mut out = [0u8; 16];
    match addr.len() {
        4 => {
            out[10] = 0xff;
            out[11] = 0xff;
            out[12..].copy_from_slice(addr);
        }
        16 => out.copy_from_slice(addr),
        _ => {}
    }
    out
}

/// Whether `addr` (16 bytes) is an unspecified one (`::` or v4-mapped
/// 0.0.0.0).
pub fn unspecified(addr: &[u8; 16]) -> bool {
    addr.iter().all(|&b| b == 0)
        || (addr[..10].iter().all(|&b| b == 0) && addr[10..] == [0xff, 0xff, 0, 0, 0, 0])
}

const SOCK_DIAG_BY_FAMILY: u16 = 20;

/// A sock_diag socket in the network namespace of task `pid`.
fn diag_socket(pid: i32) -> Result<Netlink, String> {
    let ns: OwnedFd = std::fs::File::open(format!("/proc/{pid}/ns/net"))
        .map_err(|e| e.to_string())?
        .into();
    Netlink::open_in(&ns, nix::sys::socket::SockProtocol::NetlinkSockDiag)
        .map_err(|e| format!("a sock_diag socket: {e}"))
}

/// The TCP sockets of the network namespace of task `pid` in the states
/// of mask `states` (bit n: state n).
pub fn tcp_sockets(pid: i32, states: u32) -> Result<Vec<TcpSock>, String> {
    let mut nl = diag_socket(pid)?;
    let mut out = Vec::new();
    for family in [libc::AF_INET, libc::AF_INET6] {
        // struct inet_diag_req_v2: family, protocol, extensions, pad,
        // states, then an inet_diag_sockid of 48 bytes (any).
        let mut req = [0u8; 56];
        req[0] = family as u8;
        req[1] = libc::IPPROTO_TCP as u8;
        req[4..8].copy_from_slice(&states.to_ne_bytes());
        let msgs = nl
            .dump(SOCK_DIAG_BY_FAMILY, &req)
            .map_err(|e| format!("sock_diag: {e}"))?;
        for m in msgs {
            if let Some(s) = parse(&m.body) {
                out.push(s);
            }
        }
    }
    Ok(out)
}

/// The TCP socket of task `pid`'s network namespace whose own end is
/// `local` and other end `remote` (address bytes, port), if there is one:
/// one exact sock_diag lookup (the kernel gives a listener on `local`
/// when no connection matches).
pub fn tcp_socket(
    pid: i32,
    local: (&[u8], u16),
    remote: (&[u8], u16),
) -> Result<Option<TcpSock>, String> {
    let mut nl = diag_socket(pid)?;
    let (l, r) = (v6(local.0), v6(remote.0));
    let mapped = |a: &[u8; 16]| a[..10].iter().all(|&b| b == 0) && a[10..12] == [0xff, 0xff];
    let four = mapped(&l) && mapped(&r);
    // struct inet_diag_req_v2 (family, protocol, extensions, pad, states)
    // and its inet_diag_sockid: ports big-endian at 8 and 10, source and
    // destination at 12 and 28, interface at 44, the cookie at 48
    // (INET_DIAG_NOCOOKIE: any).
    let mut req = [0u8; 56];
    req[0] = if four { libc::AF_INET } else { libc::AF_INET6 } as u8;
    req[1] = libc::IPPROTO_TCP as u8;
    req[4..8].copy_from_slice(&u32::MAX.to_ne_bytes());
    req[8..10].copy_from_slice(&local.1.to_be_bytes());
    req[10..12].copy_from_slice(&remote.1.to_be_bytes());
    match four {
        true => {
            req[12..16].copy_from_slice(&l[12..]);
            req[28..32].copy_from_slice(&r[12..]);
        }
        false => {
            req[12..28].copy_from_slice(&l);
            req[28..44].copy_from_slice(&r);
        }
    }
    req[48..56].fill(0xff);
    match nl.get(SOCK_DIAG_BY_FAMILY, &req) {
        Ok(m) => Ok(parse(&m.body)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(format!("sock_diag: {e}")),
    }
}

/// struct inet_diag_msg: family, state, timer, retrans, then the sockid
/// (sport and dport big-endian at 4 and 6, src at 8, dst at 24, 16 bytes
/// each), expires at 52, rqueue 56, wqueue 60, uid 64, inode 68.
fn parse(b: &[u8]) -> Option<TcpSock> {
    if b.len() < 72 {
        return None;
    }
    let word = |at: usize| u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let port = |at: usize| u16::from_be_bytes([b[at], b[at + 1]]);
    let addr = |at: usize| match i32::from(b[0]) {
        libc::AF_INET => v6(&b[at..at + 4]),
        _ => v6(&b[at..at + 16]),
    };
    Some(TcpSock {
        state: b[1],
        local: (addr(8), port(4)),
        remote: (addr(24), port(6)),
        inode: u64::from(word(68)),
        rqueue: word(56),
        wqueue: word(60),
    })
}

/// The address socket `inode` of task `pid`'s network namespace is
/// connected to, from /proc/PID/net/`table` (raw, raw6, icmp, icmp6:
/// getpeername does not tell it for raw and ping sockets), None if none.
pub fn proc_remote(pid: i32, table: &str, inode: u64) -> Result<Option<Vec<u8>>, String> {
    let path = format!("/proc/{pid}/net/{table}");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    for l in text.lines().skip(1) {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.get(9).and_then(|i| i.parse::<u64>().ok()) != Some(inode) {
            continue;
        }
        let hex = f
            .get(2)
            .and_then(|r| r.split(':').next())
            .ok_or_else(|| format!("{path}: a line without its remote address"))?;
        // Each 8 hex digits: a native word of the address's bytes.
        let addr: Vec<u8> = (0..hex.len() / 8)
            .filter_map(|i| u32::from_str_radix(hex.get(8 * i..8 * i + 8)?, 16).ok())
            .flat_map(u32::to_ne_bytes)
            .collect();
        return Ok(Some(addr).filter(|a| a.iter().any(|&b| b != 0)));
    }
    Err(format!("{path} does not list socket {inode}"))
}
