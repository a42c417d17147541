//! sock_diag (NETLINK_SOCK_DIAG) for unix sockets: one snapshot of every
//! socket with its type, state, name, socket file, peer, pending
//! connections and queue lengths.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::os::fd::AsRawFd;

use nix::errno::Errno;
use nix::sys::socket::{self as nixsock, MsgFlags};

use super::UnixError;

/// What sock_diag says about one unix socket.
#[derive(Debug, Clone, Default)]
pub struct DiagInfo {
    pub ino: u64,
    pub kind: u32,
    pub state: u32,
    pub name: Vec<u8>,
    pub peer: u64,
    pub rqueue: u32,
    pub wqueue: u32,
    pub shutdown: u32,
    /// The socket file of a path-bound socket: (inode, device).
    pub vfs: Option<(u64, u64)>,
    /// A listener: the inodes of the connections in its accept queue.
    pub icons: Vec<u64>,
}

fn diag_err(what: &'static str) -> impl FnOnce(Errno) -> UnixError {
    move |errno| UnixError::Diag { what, errno }
}

/// One sock_diag snapshot for a whole dump, taken on first use: the tree
/// is stopped while it is captured, so one answers for all its sockets.
/// sock_diag answers for its caller's network namespace: the sockets of
/// another one are asked for by a thread of cryo's inside it (socket
/// inodes are unique across namespaces, so one map holds them all).
#[derive(Debug, Default)]
pub struct DiagSnapshot {
    map: Option<HashMap<u64, DiagInfo>>,
    /// The other network namespaces asked, by their /proc link, and the
    /// tasks whose namespace is known to be in.
    nets: Vec<String>,
    tasks: std::collections::HashSet<i32>,
}

impl DiagSnapshot {
    /// The snapshot of cryo's network namespace, taken now if it was not
    /// yet, with those of the namespaces asked for with [`Self::get_for`].
    pub fn get(&mut self) -> Result<&HashMap<u64, DiagInfo>, UnixError> {
        if self.map.is_none() {
            self.map = Some(diag_all()?);
        }
        Ok(self.map.get_or_insert_with(HashMap::new))
    }

    /// The snapshot with the sockets of the network namespaces of `pids`.
    pub fn get_for(
        &mut self,
        pids: impl IntoIterator<Item = i32>,
    ) -> Result<&HashMap<u64, DiagInfo>, UnixError> {
        self.get()?;
        for pid in pids {
            if !self.tasks.insert(pid) || crate::ns::is_own(pid, crate::ns::NsKind::Net) {
                continue;
            }
            let path = format!("/proc/{pid}/ns/net");
            let link = std::fs::read_link(&path).map(|p| p.display().to_string());
            let Ok(link) = link else { continue };
            if self.nets.contains(&link) {
                continue;
            }
            let ns = std::fs::File::open(&path).map_err(|_| UnixError::Diag {
                what: "opening a network namespace",
                errno: Errno::last(),
            })?;
            let theirs = crate::sys::ns::in_namespace(
                ns.into(),
                nix::sched::CloneFlags::CLONE_NEWNET,
                || diag_all().map_err(|e| std::io::Error::other(e.to_string())),
            )
            .map_err(|e| UnixError::Diag {
                what: "sock_diag in a network namespace of the tree",
                errno: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
            })?;
            self.map.get_or_insert_with(HashMap::new).extend(theirs);
            self.nets.push(link);
        }
        Ok(self.map.get_or_insert_with(HashMap::new))
    }
}

/// Every unix socket of the system (the net namespace of cryo), by inode.
fn diag_all() -> Result<HashMap<u64, DiagInfo>, UnixError> {
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLM_F_REQUEST: u16 = 1;
    const NLM_F_DUMP: u16 = 0x300;
    const NLMSG_DONE: u16 = 3;
    const NLMSG_ERROR: u16 = 2;
    // UDIAG_SHOW_NAME | VFS | PEER | ICONS | RQLEN | SHUTDOWN
    const SHOW: u32 = 0x1 | 0x2 | 0x4 | 0x8 | 0x10 | 0x40;
    let s = nixsock::socket(
        nixsock::AddressFamily::Netlink,
        nixsock::SockType::Raw,
        nixsock::SockFlag::SOCK_CLOEXEC,
        nixsock::SockProtocol::NetlinkSockDiag,
    )
    .map_err(diag_err("socket"))?;
    // nlmsghdr (16) + unix_diag_req (24)
    let mut req = [0u8; 40];
    req[0..4].copy_from_slice(&40u32.to_ne_bytes());
    req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req[16] = libc::AF_UNIX as u8;
    req[20..24].copy_from_slice(&u32::MAX.to_ne_bytes()); // every state
    req[28..32].copy_from_slice(&SHOW.to_ne_bytes());
    nixsock::send(s.as_raw_fd(), &req, MsgFlags::empty()).map_err(diag_err("send"))?;
    let mut out = HashMap::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n =
            nixsock::recv(s.as_raw_fd(), &mut buf, MsgFlags::empty()).map_err(diag_err("recv"))?;
        let mut off = 0usize;
        while off + 16 <= n {
            let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap_or_default()) as usize;
            let ty = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().unwrap_or_default());
            if len < 16 || off + len > n {
                return Err(diag_err("parse")(Errno::EBADMSG));
            }
            if ty == NLMSG_DONE {
                return Ok(out);
            }
            if ty == NLMSG_ERROR {
                let e = i32::from_ne_bytes(buf[off + 16..off + 20].try_into().unwrap_or_default());
                return Err(diag_err("dump")(Errno::from_raw(-e)));
            }
            if let Some(d) = parse_msg(&buf[off + 16..off + len]) {
                out.insert(d.ino, d);
            }
            off += (len + 3) & !3;
        }
    }
}

/// One unix_diag_msg and its attributes.
fn parse_msg(m: &[u8]) -> Option<DiagInfo> {
    let u32_at = |b: &[u8], i: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(b.get(i..i + 4)?.try_into().ok()?))
    };
    let mut d = DiagInfo {
        kind: *m.get(1)? as u32,
        state: *m.get(2)? as u32,
        ino: u32_at(m, 4)? as u64,
        ..Default::default()
    };
    let mut off = 16usize;
    while off + 4 <= m.len() {
        let len = u16::from_ne_bytes(m[off..off + 2].try_into().ok()?) as usize;
        let ty = u16::from_ne_bytes(m[off + 2..off + 4].try_into().ok()?);
        if len < 4 || off + len > m.len() {
            break;
        }
        let p = &m[off + 4..off + len];
        match ty {
            0 => d.name = p.to_vec(), // UNIX_DIAG_NAME
            1 => {
                // UNIX_DIAG_VFS: the socket file's inode and device, as
                // the kernel keeps it (major << 20 | minor), made the
                // number stat(2) gives.
                let ino = u32_at(p, 0).unwrap_or(0) as u64;
                let dev = u32_at(p, 4).unwrap_or(0);
                let dev = libc::makedev(dev >> 20, dev & 0xf_ffff);
                d.vfs = Some((ino, dev));
            }
            2 => d.peer = u32_at(p, 0).unwrap_or(0) as u64, // UNIX_DIAG_PEER
            3 => {
                // UNIX_DIAG_ICONS: the pending connections' inodes.
                d.icons = (0..p.len() / 4)
                    .filter_map(|i| u32_at(p, i * 4))
                    .map(u64::from)
                    .collect();
            }
            4 => {
                // UNIX_DIAG_RQLEN
                d.rqueue = u32_at(p, 0).unwrap_or(0);
                d.wqueue = u32_at(p, 4).unwrap_or(0);
            }
            6 => d.shutdown = p.first().copied().unwrap_or(0) as u32, // UNIX_DIAG_SHUTDOWN
            _ => {}
        }
        off += (len + 3) & !3;
    }
    Some(d)
}
