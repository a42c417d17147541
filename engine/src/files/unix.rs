//! Unix sockets, dump and restore side by side.
//!
//! Dump: sock_diag (NETLINK_SOCK_DIAG) lists every unix socket with its
//! type, state, bound name, peer and queue lengths; the bytes queued for
//! a socket of the tree are copied with MSG_PEEK through a duplicate of
//! its descriptor (pidfd_getfd), one datagram at a time with SO_PEEK_OFF,
//! so nothing is consumed. Restore: cryo makes every socket before it
//! creates the tasks (they inherit them): a connected pair with
//! socketpair, then each end's queued messages are sent again from the
//! other end, boundaries kept; listeners are bound and listen again.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

use cryo_image::proto::{FileEntry, FileKind, InFlight, UnixSocketState};
use nix::errno::Errno;
use nix::sys::socket::{self as nixsock, MsgFlags};

use super::{FilesError, OpenFile};
use crate::sys::{self, sock};

#[derive(Debug, thiserror::Error)]
pub enum UnixError {
    #[error("sock_diag: {what}: {errno}")]
    Diag { what: &'static str, errno: Errno },
    #[error("task {pid}: fd {fd}: unix socket {ino} is not known to sock_diag")]
    Unknown { pid: i32, fd: i32, ino: u64 },
    #[error("task {pid}: fd {fd}: reading the queued data of unix socket {ino}: {errno}")]
    Peek {
        pid: i32,
        fd: i32,
        ino: u64,
        errno: Errno,
    },
    #[error("task {pid}: fd {fd}: unix socket {ino} has a descriptor in flight (SCM_RIGHTS) that is {what}")]
    FdsInFlight {
        pid: i32,
        fd: i32,
        ino: u64,
        what: String,
    },
}

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

/// The state and queued messages of every unix socket of the table; a
/// socket whose peer is not in the table (held outside the tree) is
/// refused (unless --ext-unix-sk covers it), and so is a listener with
/// connections waiting to be accepted.
pub fn states(
    table: &mut Vec<OpenFile>,
    ext_unix_sk: bool,
    diag: &mut DiagSnapshot,
    opts: &super::CollectOptions,
) -> Result<Vec<OwnedFd>, FilesError> {
    let is_sock = |o: &OpenFile| o.entry.kind == FileKind::FileUnixSocket as i32;
    if !table.iter().any(is_sock) {
        return Ok(Vec::new());
    }
    // The tree's open file descriptions, for the descriptors in flight.
    // Epolls and pidfds are made by their tasks, after the messages are
    // sent again: not in flight.
    let known: Vec<(i32, i32, u32)> = table
        .iter()
        .filter(|o| o.fd >= 0)
        .filter(|o| !FileKind::try_from(o.entry.kind).is_ok_and(super::made_by_task))
        .map(|o| (o.pid, o.fd, o.entry.id))
        .collect();
    let mut in_flight = InFlightFiles {
        next_id: table.iter().map(|o| o.entry.id).max().unwrap_or(0) + 1,
        known,
        ..Default::default()
    };
    let diag = diag.get()?;
    // One pidfd per process, for pidfd_getfd of its sockets.
    let mut pidfds: HashMap<i32, OwnedFd> = HashMap::new();
    let inodes: std::collections::BTreeSet<u64> = table
        .iter()
        .filter(|o| is_sock(o))
        .map(|o| o.entry.inode)
        .collect();
    for o in table.iter_mut().filter(|o| is_sock(o)) {
        let ino = o.entry.inode;
        let info = diag.get(&ino).ok_or(UnixError::Unknown {
            pid: o.pid,
            fd: o.fd,
            ino,
        })?;
        // Connected to a connection a listener of the tree has not
        // accepted yet: connected again at restore.
        let pending_on = pending_listener(info, diag, &inodes);
        let external_peer = if info.peer != 0 && !inodes.contains(&info.peer) && pending_on == 0 {
            external(o, info, diag, ext_unix_sk)?
        } else {
            Vec::new()
        };
        let pending = if info.state == STATE_LISTEN && info.rqueue > 0 {
            pending_clients(o, info, diag, &inodes)?
        } else {
            Vec::new()
        };
        let npid = nix::unistd::Pid::from_raw(o.pid);
        let pidfd = match pidfds.entry(o.pid) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(sys::pidfd_open(npid)?),
        };
        let sock = sys::pidfd_getfd(pidfd, npid, o.fd)?;
        let peeked = peek_queue(o.pid, o.fd, info, &sock)?;
        let mut queued = Vec::with_capacity(peeked.len());
        let mut rights = Vec::new();
        let unconnected_dgram = info.kind == libc::SOCK_DGRAM as u32 && info.peer == 0;
        let senders: Vec<Vec<u8>> = if unconnected_dgram {
            peeked.iter().map(|m| m.from.clone()).collect()
        } else {
            Vec::new()
        };
        for (i, m) in peeked.into_iter().enumerate() {
            if !m.fds.is_empty() {
                let files = m
                    .fds
                    .into_iter()
                    .map(|f| in_flight.file_of(f, (o.pid, o.fd, ino), opts))
                    .collect::<Result<Vec<u32>, FilesError>>()?;
                rights.push(InFlight {
                    message: i as u32,
                    files,
                });
            }
            queued.push(m.data);
        }
        let backlog = if info.state == STATE_LISTEN {
            info.wqueue
        } else {
            0
        };
        let mut st = state_of(info, queued, backlog);
        st.external_peer = external_peer;
        st.name_removed = name_removed(o.pid, info);
        st.rights = rights;
        st.senders = senders;
        st.pending_on = pending_on;
        st.pending = pending;
        o.entry.unix = Some(st);
    }
    table.append(&mut in_flight.new_files);
    Ok(in_flight.held)
}

/// The files of descriptors in flight: those that are also open in the
/// tree, and those only the messages hold (described from cryo's copy,
/// which stays open until the image is written).
#[derive(Default)]
struct InFlightFiles {
    next_id: u32,
    /// (pid, fd, file id) of every descriptor of the tree.
    known: Vec<(i32, i32, u32)>,
    new_files: Vec<OpenFile>,
    held: Vec<OwnedFd>,
}

impl InFlightFiles {
    /// The file id of in-flight descriptor `fd` (cryo's copy), carried by
    /// socket `sock` (pid, fd, inode).
    fn file_of(
        &mut self,
        fd: OwnedFd,
        (pid, sfd, ino): (i32, i32, u64),
        opts: &super::CollectOptions,
    ) -> Result<u32, FilesError> {
        let me = std::process::id() as i32;
        let raw = fd.as_raw_fd();
        let same = |p: i32, f: i32| sys::kcmp_file(me, p, raw, f).unwrap_or(false);
        if let Some(&(_, _, id)) = self.known.iter().find(|&&(p, f, _)| same(p, f)) {
            return Ok(id);
        }
        if let Some(o) = self.new_files.iter().find(|o| same(me, o.fd)) {
            return Ok(o.entry.id);
        }
        let id = self.next_id;
        let mut handles = super::ProcHandles::default();
        let mut diag = DiagSnapshot::default();
        let (entry, _) = super::describe(me, raw, id, 0, opts, &mut diag, &mut handles)?;
        let kind = FileKind::try_from(entry.kind).unwrap_or(FileKind::FileRegular);
        if !sendable(kind) {
            return Err(UnixError::FdsInFlight {
                pid,
                fd: sfd,
                ino,
                what: format!(
                    "{} ({}) held by no task of the tree; cryo keeps only files, directories, devices, memfds, pipes, eventfds, timerfds, signalfds and inotify instances in flight alone",
                    entry.path,
                    kind.as_str_name()
                ),
            }
            .into());
        }
        self.next_id += 1;
        self.new_files.push(OpenFile {
            pid: me,
            fd: raw,
            entry,
            via: None,
        });
        self.held.push(fd);
        Ok(id)
    }
}

/// Kinds a message in flight may hold without any task holding them too:
/// those whose state is the file's own or a pipe's (not a socket's, whose
/// state is read with the tree's, nor one made by a task).
fn sendable(kind: FileKind) -> bool {
    matches!(
        kind,
        FileKind::FileRegular
            | FileKind::FileDirectory
            | FileKind::FileChardev
            | FileKind::FileMemfd
            | FileKind::FileDeleted
            | FileKind::FileEventfd
            | FileKind::FileTimerfd
            | FileKind::FileSignalfd
            | FileKind::FileInotify
            | FileKind::FileSymlink
            | FileKind::FilePipe
            | FileKind::FileFifo
    )
}

/// The listener of the tree (by inode) whose accept queue holds the
/// connection `info` is connected to; 0: none.
fn pending_listener(
    info: &DiagInfo,
    diag: &HashMap<u64, DiagInfo>,
    inodes: &std::collections::BTreeSet<u64>,
) -> u64 {
    // (sock_diag shows no peer for it: the embryonic socket has no inode
    // until it is accepted.)
    if info.state != STATE_CONNECTED || inodes.contains(&info.peer) {
        return 0;
    }
    // The kernel lists a listener's pending connections by their
    // connecting sockets.
    diag.values()
        .find(|l| l.state == STATE_LISTEN && l.icons.contains(&info.ino) && inodes.contains(&l.ino))
        .map_or(0, |l| l.ino)
}

/// The sockets of the tree waiting in listener `o`'s accept queue, in
/// order; a connection from outside the tree, or one with data queued
/// (which no one can read before it is accepted), is refused.
fn pending_clients(
    o: &OpenFile,
    info: &DiagInfo,
    diag: &HashMap<u64, DiagInfo>,
    inodes: &std::collections::BTreeSet<u64>,
) -> Result<Vec<u64>, FilesError> {
    let refuse = |what: &'static str| FilesError::UnsupportedFd {
        pid: o.pid,
        fd: o.fd,
        what,
        link: o.entry.path.clone(),
    };
    // ICONS names the connecting sockets (the embryonic sockets waiting
    // in the queue are not in sock_diag's table); what a client sent and
    // no one read yet counts in its write queue.
    let mut out = Vec::with_capacity(info.icons.len());
    for ino in &info.icons {
        if !inodes.contains(ino) {
            return Err(refuse("a listening unix socket with a connection not accepted yet from a socket outside the dumped tree"));
        }
        let queued = diag.get(ino).is_none_or(|client| client.wqueue > 0);
        if queued {
            return Err(refuse("a listening unix socket with a connection not accepted yet that has data queued (it cannot be read before it is accepted)"));
        }
        out.push(*ino);
    }
    if out.len() < info.rqueue as usize {
        return Err(refuse("a listening unix socket with connections not accepted yet that sock_diag does not all show"));
    }
    Ok(out)
}

/// The address to connect to again of the outside peer of socket `o`, if
/// --ext-unix-sk accepts it.
fn external(
    o: &OpenFile,
    info: &DiagInfo,
    diag: &HashMap<u64, DiagInfo>,
    ext_unix_sk: bool,
) -> Result<Vec<u8>, FilesError> {
    let name = diag
        .get(&info.peer)
        .map(|p| p.name.clone())
        .unwrap_or_default();
    let dgram = info.kind == libc::SOCK_DGRAM as u32;
    if !ext_unix_sk || !dgram || name.is_empty() || info.rqueue > 0 {
        return Err(FilesError::ExternalUnixPeer {
            pid: o.pid,
            fd: o.fd,
            ino: o.entry.inode,
            peer: info.peer,
            why: if !ext_unix_sk {
                "connections to the outside need --ext-unix-sk"
            } else if !dgram {
                "--ext-unix-sk covers datagram sockets only"
            } else if name.is_empty() {
                "the peer has no address to connect to again"
            } else {
                "messages from it are queued, which cannot be queued again"
            },
        });
    }
    Ok(name)
}

/// TCP_LISTEN, as unix sockets report it.
pub const STATE_LISTEN: u32 = 10;
/// TCP_ESTABLISHED.
pub const STATE_CONNECTED: u32 = 1;

fn diag_err(what: &'static str) -> impl FnOnce(Errno) -> UnixError {
    move |errno| UnixError::Diag { what, errno }
}

/// One sock_diag snapshot for a whole dump, taken on first use: the tree
/// is stopped while it is captured, so one answers for all its sockets.
#[derive(Debug, Default)]
pub struct DiagSnapshot(Option<HashMap<u64, DiagInfo>>);

impl DiagSnapshot {
    /// The snapshot, taken now if it was not yet.
    pub fn get(&mut self) -> Result<&HashMap<u64, DiagInfo>, UnixError> {
        if self.0.is_none() {
            self.0 = Some(diag_all()?);
        }
        Ok(self.0.get_or_insert_with(HashMap::new))
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

/// The messages queued for the socket behind `sock` (a duplicate of the
/// task's descriptor), each as it was sent, without consuming them.
pub fn peek_queue(
    pid: i32,
    fd: i32,
    info: &DiagInfo,
    sock: &OwnedFd,
) -> Result<Vec<Queued>, UnixError> {
    let err = |errno| UnixError::Peek {
        pid,
        fd,
        ino: info.ino,
        errno,
    };
    if info.rqueue == 0 || info.state == STATE_LISTEN {
        return Ok(Vec::new());
    }
    sock::set_peek_off(sock, 0).map_err(err)?;
    let stream = info.kind == libc::SOCK_STREAM as u32;
    let mut msgs = Vec::new();
    let mut buf = vec![0u8; (info.rqueue as usize).clamp(64 * 1024, 16 << 20)];
    let res = loop {
        // MSG_PEEK leaves the queue as it is (the peek offset moves past
        // what was read).
        let (n, fds, from) = match sock::peek_msg(sock, &mut buf) {
            // A peeked SCM_RIGHTS installed copies of its descriptors here.
            Ok(p) => (p.len, p.rights.unwrap_or_default(), p.from),
            Err(Errno::EAGAIN) => break Ok(()),
            Err(e) => break Err(err(e)),
        };
        // Streams and seqpacket sockets count queued bytes (and read 0 at
        // the end once the peer shut down); datagram sockets report the
        // first datagram's length only, so they are peeked until EAGAIN.
        let counted = info.kind != libc::SOCK_DGRAM as u32;
        if n == 0 && counted {
            break Ok(());
        }
        msgs.push(Queued {
            data: buf[..n].to_vec(),
            fds,
            from,
        });
        if counted && msgs.iter().map(|m| m.data.len()).sum::<usize>() >= info.rqueue as usize {
            break Ok(());
        }
        if msgs.len() > 1 << 16 {
            break Ok(());
        }
    };
    let _ = sock::set_peek_off(sock, -1);
    res.map(|()| {
        if stream && msgs.iter().all(|m| m.fds.is_empty()) {
            // Byte streams have no boundaries: one message (the bytes a
            // descriptor came with keep theirs).
            let data = msgs.into_iter().flat_map(|m| m.data).collect();
            vec![Queued {
                data,
                fds: Vec::new(),
                from: Vec::new(),
            }]
        } else {
            msgs
        }
    })
}

/// One message queued for a socket, with the descriptors it carries
/// (copies installed in cryo by the peek).
pub struct Queued {
    pub data: Vec<u8>,
    pub fds: Vec<OwnedFd>,
    /// The sender's address (datagrams; empty: unnamed).
    pub from: Vec<u8>,
}

/// Whether a path-bound socket's path names another file now, or none
/// (a relative name is taken from the task's working directory).
fn name_removed(pid: i32, info: &DiagInfo) -> bool {
    let Some((ino, dev)) = info.vfs else {
        return false;
    };
    if info.name.is_empty() || info.name[0] == 0 {
        return false;
    }
    let name = info.name.split(|&b| b == 0).next().unwrap_or(&info.name);
    let name = std::path::Path::new(std::ffi::OsStr::from_bytes(name));
    let path = if name.is_absolute() {
        name.to_path_buf()
    } else {
        std::path::PathBuf::from(format!("/proc/{pid}/cwd")).join(name)
    };
    match std::fs::symlink_metadata(&path) {
        Ok(m) => {
            use std::os::unix::fs::MetadataExt;
            (m.ino(), m.dev()) != (ino, dev)
        }
        Err(_) => true,
    }
}

/// The socket state to store for one open unix socket.
pub fn state_of(info: &DiagInfo, queued: Vec<Vec<u8>>, backlog: u32) -> UnixSocketState {
    UnixSocketState {
        external_peer: Vec::new(),
        sock_type: info.kind,
        state: info.state,
        name: info.name.clone(),
        peer: info.peer,
        queued,
        shutdown: info.shutdown,
        backlog,
        name_removed: false,
        rights: Vec::new(),
        senders: Vec::new(),
        pending_on: 0,
        pending: Vec::new(),
        vfs_ino: info.vfs.map_or(0, |v| v.0),
        vfs_dev: info.vfs.map_or(0, |v| v.1),
    }
}

/// Restore side: make every unix socket of `files` (one per open file
/// description). Connected pairs whose both ends are in the image become
/// socketpairs; each end's queued messages are sent again from its peer.
/// Returns the descriptors by file id; the socket files it made are
/// added to `made` (a failed restore removes them).
pub fn make_sockets(
    files: &[&FileEntry],
    made: &mut Vec<std::path::PathBuf>,
    later: &mut Vec<Later>,
) -> Result<HashMap<u32, OwnedFd>, String> {
    let mut out: HashMap<u32, OwnedFd> = HashMap::new();
    let by_ino: HashMap<u64, &FileEntry> = files.iter().map(|f| (f.inode, *f)).collect();
    for f in files {
        if out.contains_key(&f.id) {
            continue;
        }
        let st = f.unix.clone().unwrap_or_default();
        if st.pending_on != 0 {
            continue; // connected again once its listener listens
        }
        let ty = st.sock_type as i32 | libc::SOCK_CLOEXEC;
        let peer = by_ino.get(&st.peer).filter(|p| {
            p.unix.as_ref().is_some_and(|u| u.peer == f.inode) && !out.contains_key(&p.id)
        });
        if let Some(p) = peer {
            let (a, b) = sock::unix_socketpair(ty).map_err(|e| {
                format!(
                    "socketpair for unix sockets {} and {}: {e}",
                    f.inode, p.inode
                )
            })?;
            let pst = p.unix.clone().unwrap_or_default();
            // Bytes queued for `f` are sent again by its peer, and the
            // other way round.
            if st.rights.is_empty() && pst.rights.is_empty() {
                resend(&b, &st.queued, f.inode)?;
                resend(&a, &pst.queued, p.inode)?;
                shut(&a, st.shutdown);
                shut(&b, pst.shutdown);
            } else {
                // Descriptors in flight: once every file is open.
                let dup = |s: &OwnedFd| s.try_clone().map_err(|e| format!("dup: {e}"));
                later.push(Later {
                    sender: Some(dup(&b)?),
                    to: Vec::new(),
                    senders: Vec::new(),
                    msgs: st.queued.clone(),
                    rights: st.rights.clone(),
                    ino: f.inode,
                    shut: Vec::new(),
                });
                later.push(Later {
                    sender: Some(dup(&a)?),
                    to: Vec::new(),
                    senders: Vec::new(),
                    msgs: pst.queued.clone(),
                    rights: pst.rights.clone(),
                    ino: p.inode,
                    shut: vec![(dup(&a)?, st.shutdown), (dup(&b)?, pst.shutdown)],
                });
            }
            out.insert(f.id, a);
            out.insert(p.id, b);
            continue;
        }
        let s = sock::unix_socket(ty)
            .map_err(|e| format!("socket for unix socket {}: {e}", f.inode))?;
        if !st.name.is_empty() {
            let file =
                bind(&s, &st).map_err(|e| format!("binding unix socket {}: {e}", f.inode))?;
            made.extend(file);
        }
        if !st.external_peer.is_empty() {
            // A peer outside the tree (--ext-unix-sk): connect to it again.
            let addr = sockaddr(&st.external_peer)?;
            sock::connect(&s, &addr).map_err(|e| {
                format!(
                    "connecting unix socket {} to its outside peer {:?} again: {e}",
                    f.inode,
                    String::from_utf8_lossy(&st.external_peer),
                )
            })?;
            out.insert(f.id, s);
            continue;
        }
        if st.state == STATE_LISTEN {
            sock::listen(&s, st.backlog.max(1) as i32)
                .map_err(|e| format!("listen on unix socket {}: {e}", f.inode))?;
        } else if !st.senders.is_empty() && !st.name.is_empty() {
            // Datagrams from several senders: each sent to it again from
            // its sender, once every socket is made.
            later.push(Later {
                sender: None,
                to: st.name.clone(),
                senders: st.senders.clone(),
                msgs: st.queued.clone(),
                rights: st.rights.clone(),
                ino: f.inode,
                shut: vec![(s.try_clone().map_err(|e| format!("dup: {e}"))?, st.shutdown)],
            });
            out.insert(f.id, s);
            continue;
        } else if !st.queued.is_empty() || st.state == STATE_CONNECTED {
            // A connected socket whose peer is gone: its queue is read
            // back, then end of file. A pair, with the other end closed.
            let (a, b) = sock::unix_socketpair(ty)
                .map_err(|e| format!("socketpair for unix socket {}: {e}", f.inode))?;
            if st.rights.is_empty() {
                resend(&b, &st.queued, f.inode)?;
                drop(b);
                shut(&a, st.shutdown);
            } else {
                // Descriptors in flight: once every file is open (the
                // sending end goes then, for the end of file).
                let shut_a = a.try_clone().map_err(|e| format!("dup: {e}"))?;
                later.push(Later {
                    sender: Some(b),
                    to: Vec::new(),
                    senders: Vec::new(),
                    msgs: st.queued.clone(),
                    rights: st.rights.clone(),
                    ino: f.inode,
                    shut: vec![(shut_a, st.shutdown)],
                });
            }
            out.insert(f.id, a);
            continue;
        }
        shut(&s, st.shutdown);
        out.insert(f.id, s);
    }
    connect_pending(files, &by_ino, &mut out, made)?;
    Ok(out)
}

/// The sockets that waited in a listener's accept queue at the dump
/// connect to it again, in that order (the listeners listen by now).
fn connect_pending(
    files: &[&FileEntry],
    by_ino: &HashMap<u64, &FileEntry>,
    out: &mut HashMap<u32, OwnedFd>,
    made: &mut Vec<std::path::PathBuf>,
) -> Result<(), String> {
    for l in files {
        let Some(ls) = l.unix.as_ref().filter(|u| !u.pending.is_empty()) else {
            continue;
        };
        let addr = sockaddr(&ls.name)?;
        for ino in &ls.pending {
            let c = by_ino.get(ino).ok_or_else(|| {
                format!(
                    "unix socket {ino}, waiting on listener {}, is not in the image",
                    l.inode
                )
            })?;
            let cs = c.unix.clone().unwrap_or_default();
            let s = sock::unix_socket(cs.sock_type as i32 | libc::SOCK_CLOEXEC)
                .map_err(|e| format!("socket for unix socket {ino}: {e}"))?;
            if !cs.name.is_empty() {
                let file = bind(&s, &cs).map_err(|e| format!("binding unix socket {ino}: {e}"))?;
                made.extend(file);
            }
            sock::connect(&s, &addr).map_err(|e| {
                format!(
                    "connecting unix socket {ino} to listener {} again: {e}",
                    l.inode
                )
            })?;
            shut(&s, cs.shutdown);
            out.insert(c.id, s);
        }
    }
    Ok(())
}

/// Messages with descriptors in flight, sent again once every open file
/// description of the tree is made: from `sender`, then the shutdowns.
pub struct Later {
    sender: Option<OwnedFd>,
    /// An unconnected datagram socket's name: each message goes there
    /// from the socket of the tree named as its sender (`senders`), or
    /// from an unnamed one.
    to: Vec<u8>,
    senders: Vec<Vec<u8>>,
    msgs: Vec<Vec<u8>>,
    rights: Vec<InFlight>,
    ino: u64,
    shut: Vec<(OwnedFd, u32)>,
}

impl Later {
    /// Send the messages again, each with its descriptors (by file id in
    /// `files`).
    pub fn send(
        self,
        files: &HashMap<u32, OwnedFd>,
        by_name: &HashMap<Vec<u8>, RawFd>,
    ) -> Result<(), String> {
        let ino = self.ino;
        let mut unnamed: Option<OwnedFd> = None;
        for (i, m) in self.msgs.iter().enumerate() {
            // Where it goes from: the connected sender, or the socket
            // named as this message's sender.
            let from: RawFd = match &self.sender {
                Some(s) => s.as_raw_fd(),
                None => match self.senders.get(i).and_then(|n| by_name.get(n)) {
                    Some(&fd) => fd,
                    None => {
                        if unnamed.is_none() {
                            unnamed = Some(
                                sock::unix_socket(libc::SOCK_DGRAM | libc::SOCK_CLOEXEC)
                                    .map_err(|e| format!("socket: {e}"))?,
                            );
                        }
                        unnamed.as_ref().map(|u| u.as_raw_fd()).unwrap_or(-1)
                    }
                },
            };
            let to = address(&self.to).map_err(|e| format!("unix socket {ino}: its name: {e}"))?;
            let ids: &[u32] = self
                .rights
                .iter()
                .find(|r| r.message as usize == i)
                .map(|r| r.files.as_slice())
                .unwrap_or(&[]);
            if ids.is_empty() && to.is_none() {
                resend_raw(from, m, ino)?;
                continue;
            }
            let fds = ids
                .iter()
                .map(|id| {
                    files.get(id).map(|f| f.as_raw_fd()).ok_or_else(|| {
                        format!("unix socket {ino}: no file {id} for a descriptor in flight")
                    })
                })
                .collect::<Result<Vec<i32>, String>>()?;
            let iov = [std::io::IoSlice::new(m)];
            let rights = [nixsock::ControlMessage::ScmRights(&fds)];
            let cmsg: &[nixsock::ControlMessage] = if fds.is_empty() { &[] } else { &rights };
            let n = nixsock::sendmsg(
                from,
                &iov,
                cmsg,
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
                to.as_ref(),
            )
            .map_err(|e| {
                format!(
                    "queueing {} bytes with {} descriptors for unix socket {ino} again: {}",
                    m.len(),
                    fds.len(),
                    std::io::Error::from(e)
                )
            })?;
            if n < m.len() {
                resend_raw(from, &m[n..], ino)?;
            }
        }
        for (s, how) in &self.shut {
            shut(s, *how);
        }
        Ok(())
    }
}

/// A socket name as an address to send to: a path (up to its first
/// NUL), an abstract name (leading NUL); None for no name.
fn address(name: &[u8]) -> nix::Result<Option<nixsock::UnixAddr>> {
    match name.first() {
        None => Ok(None),
        Some(0) => nixsock::UnixAddr::new_abstract(&name[1..]).map(Some),
        Some(_) => {
            let path = name.split(|&b| b == 0).next().unwrap_or(name);
            nixsock::UnixAddr::new(std::ffi::OsStr::from_bytes(path)).map(Some)
        }
    }
}

/// A socket name as the kernel reports a sender's: a path up to its
/// first NUL, an abstract name whole.
pub fn name_key(name: &[u8]) -> Vec<u8> {
    if name.first() == Some(&0) {
        name.to_vec()
    } else {
        name.split(|&b| b == 0).next().unwrap_or(name).to_vec()
    }
}

/// Send the rest of one message on connected socket `from`.
fn resend_raw(from: RawFd, m: &[u8], ino: u64) -> Result<(), String> {
    let mut off = 0;
    while off < m.len() {
        let n = nixsock::send(
            from,
            &m[off..],
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        )
        .map_err(|e| {
            format!(
                "queueing {} bytes for unix socket {ino} again: {}",
                m.len(),
                std::io::Error::from(e)
            )
        })?;
        off += n;
    }
    Ok(())
}

fn resend(from: &OwnedFd, msgs: &[Vec<u8>], ino: u64) -> Result<(), String> {
    for m in msgs {
        resend_raw(from.as_raw_fd(), m, ino)?;
    }
    Ok(())
}

/// shutdown(2) as sock_diag reported it (bit 0: no more receives, bit 1:
/// no more sends).
fn shut(s: &OwnedFd, how: u32) {
    let h = match how & 3 {
        1 => nixsock::Shutdown::Read,
        2 => nixsock::Shutdown::Write,
        3 => nixsock::Shutdown::Both,
        _ => return,
    };
    let _ = nixsock::shutdown(s.as_raw_fd(), h);
}

/// The address of a path or an abstract name (leading NUL).
fn sockaddr(name: &[u8]) -> Result<sock::UnixAddr, String> {
    sock::UnixAddr::new(name).ok_or_else(|| "name too long".into())
}

/// Bind to an abstract name (leading NUL), or to a path: the socket file
/// the dumped socket left there is replaced (one with its inode; in an
/// image without it, any socket file), another file never. A name that
/// no longer named the socket at the dump is bound (next to it, under a
/// fresh name, if the path is taken) and removed again. Returns the
/// socket file made and kept.
fn bind(s: &OwnedFd, st: &UnixSocketState) -> Result<Option<std::path::PathBuf>, String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let name = &st.name;
    if name.first() == Some(&0) {
        sock::bind(s, &sockaddr(name)?).map_err(|e| e.to_string())?;
        return Ok(None);
    }
    let trimmed = name.split(|&b| b == 0).next().unwrap_or(name);
    let path = std::path::PathBuf::from(std::ffi::OsStr::from_bytes(trimmed));
    let ours = |m: &std::fs::Metadata| {
        m.file_type().is_socket()
            && (st.vfs_ino == 0 || (m.ino(), m.dev()) == (st.vfs_ino, st.vfs_dev))
    };
    match std::fs::symlink_metadata(&path) {
        Ok(m) if ours(&m) => {
            let _ = std::fs::remove_file(&path);
        }
        Ok(_) if st.name_removed => {
            // Its name belongs to another file now: a name next to it.
            let other = (0..1000)
                .map(|n| format!("{}.cryo-sock-{}-{n}", path.display(), std::process::id()))
                .find(|p| std::fs::symlink_metadata(p).is_err())
                .ok_or("no free name next to its old path")?;
            let addr = sock::UnixAddr::new(other.as_bytes()).ok_or("name too long")?;
            sock::bind(s, &addr).map_err(|e| e.to_string())?;
            let _ = std::fs::remove_file(&other);
            return Ok(None);
        }
        Ok(_) => {
            return Err(format!(
                "{} is another file now, not the socket's",
                path.display()
            ))
        }
        Err(_) => {}
    }
    sock::bind(s, &sockaddr(name)?).map_err(|e| e.to_string())?;
    if st.name_removed {
        let _ = std::fs::remove_file(&path);
        return Ok(None);
    }
    Ok(Some(path))
}
