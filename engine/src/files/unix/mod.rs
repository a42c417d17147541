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
//! `diag.rs` reads sock_diag, `restore.rs` makes the sockets again.

#![forbid(unsafe_code)]

mod diag;
mod restore;

pub use diag::{DiagInfo, DiagSnapshot};
pub use restore::{make_sockets, name_key, Later};

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

use cryo_image::proto::{FileEntry, FileKind, InFlight, UnixSocketState};
use nix::errno::Errno;

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

/// The state and queued messages of every unix socket of the table; a
/// socket whose peer is not in the table (held outside the tree) is
/// refused (unless --ext-unix-sk covers it), and so is a listener with
/// connections waiting to be accepted that cannot be connected again.
/// Files that only messages in flight hold are added to the table (a
/// socket among them is read like the tree's, its own queue too); their
/// descriptors (cryo's copies) are returned, to stay open until the
/// image is written.
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
    let pids: std::collections::BTreeSet<i32> = table.iter().map(|o| o.pid).collect();
    let diag = diag.get_for(pids)?;
    // First every queue, the sockets found in flight appended as they
    // come (their queues are read in turn).
    let mut queues: Vec<(usize, Peeked)> = Vec::new();
    let mut pidfds: HashMap<i32, OwnedFd> = HashMap::new();
    let mut i = 0;
    while i < table.len() {
        if is_sock(&table[i]) {
            let peeked = read_queue(&table[i], diag, &mut pidfds, &mut in_flight, opts)?;
            queues.push((i, peeked));
            table.append(&mut in_flight.new_files);
        }
        i += 1;
    }
    let inodes: std::collections::BTreeSet<u64> = table
        .iter()
        .filter(|o| is_sock(o))
        .map(|o| o.entry.inode)
        .collect();
    // The connecting sockets waiting in the accept queue of a listener of
    // the tree (the kernel lists them by their own inodes): client ->
    // listener. One pass over the snapshot, which holds every unix
    // socket of the host.
    let waiting: HashMap<u64, u64> = diag
        .values()
        .filter(|l| l.state == STATE_LISTEN && inodes.contains(&l.ino))
        .flat_map(|l| l.icons.iter().map(move |&c| (c, l.ino)))
        .collect();
    let named = EXTERNAL.lock().unwrap_or_else(|p| p.into_inner()).clone();
    for (i, q) in queues {
        // Named by the user: its state is not kept, the restore is given
        // the socket.
        if named.contains(&table[i].entry.inode) {
            table[i].entry.external_socket = true;
            continue;
        }
        let o = &table[i];
        let info = q.info;
        // Connected to a connection a listener of the tree has not
        // accepted yet: connected again at restore.
        let pending_on = pending_listener(info, &waiting, &inodes);
        let external_peer = if info.peer != 0 && !inodes.contains(&info.peer) && pending_on == 0 {
            match in_flight.carrier_of(o) {
                Some(c) => return Err(c.refuse("a unix socket connected outside the tree")),
                None => external(o, info, diag, ext_unix_sk)?,
            }
        } else {
            Vec::new()
        };
        let pending = if info.state == STATE_LISTEN && info.rqueue > 0 {
            pending_clients(o, info, diag, &inodes)?
        } else {
            Vec::new()
        };
        let backlog = if info.state == STATE_LISTEN {
            info.wqueue
        } else {
            0
        };
        let mut st = state_of(info, q.queued, backlog);
        st.external_peer = external_peer;
        st.name_removed = name_removed(o.pid, info);
        st.rights = q.rights;
        st.senders = q.senders;
        st.pending_on = pending_on;
        st.pending = pending;
        table[i].entry.unix = Some(st);
    }
    Ok(in_flight.held)
}

/// A socket's queue as it is stored: the messages, the descriptors in
/// flight among them (by file id) and, for an unconnected datagram
/// socket, each message's sender.
struct Peeked<'a> {
    /// The socket as sock_diag shows it.
    info: &'a DiagInfo,
    queued: Vec<Vec<u8>>,
    rights: Vec<InFlight>,
    senders: Vec<Vec<u8>>,
}

/// Read the queue of socket `o` (a task's descriptor, through a pidfd of
/// its process, or cryo's copy of one in flight), resolving the
/// descriptors its messages carry.
fn read_queue<'a>(
    o: &OpenFile,
    diag: &'a HashMap<u64, DiagInfo>,
    pidfds: &mut HashMap<i32, OwnedFd>,
    in_flight: &mut InFlightFiles,
    opts: &super::CollectOptions,
) -> Result<Peeked<'a>, FilesError> {
    let ino = o.entry.inode;
    let info = diag.get(&ino).ok_or(UnixError::Unknown {
        pid: o.pid,
        fd: o.fd,
        ino,
    })?;
    let sock = if o.pid == std::process::id() as i32 {
        sys::fd::borrow(o.fd)
            .try_clone_to_owned()
            .map_err(|e| FilesError::Proc {
                path: format!("cryo's copy of unix socket {ino}"),
                source: e,
            })?
    } else {
        let npid = nix::unistd::Pid::from_raw(o.pid);
        let pidfd = match pidfds.entry(o.pid) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(sys::pidfd_open(npid)?),
        };
        sys::pidfd_getfd(pidfd, npid, o.fd)?
    };
    let peeked = peek_queue(o.pid, o.fd, info, &sock)?;
    let unconnected_dgram = info.kind == libc::SOCK_DGRAM as u32 && info.peer == 0;
    let senders: Vec<Vec<u8>> = if unconnected_dgram {
        peeked.iter().map(|m| m.from.clone()).collect()
    } else {
        Vec::new()
    };
    let mut queued = Vec::with_capacity(peeked.len());
    let mut rights = Vec::new();
    // A socket in flight is named by the one whose queue holds it.
    let carrier = in_flight.carrier_of(o).unwrap_or(Carrier {
        pid: o.pid,
        fd: o.fd,
        ino,
    });
    for (i, m) in peeked.into_iter().enumerate() {
        if !m.fds.is_empty() {
            let files = m
                .fds
                .into_iter()
                .map(|f| in_flight.file_of(f, carrier, opts))
                .collect::<Result<Vec<u32>, FilesError>>()?;
            rights.push(InFlight {
                message: i as u32,
                files,
            });
        }
        queued.push(m.data);
    }
    Ok(Peeked {
        info,
        queued,
        rights,
        senders,
    })
}

/// The socket of the tree whose queue holds a descriptor in flight (the
/// first found), to name in a refusal.
#[derive(Debug, Clone, Copy)]
struct Carrier {
    pid: i32,
    fd: i32,
    ino: u64,
}

impl Carrier {
    fn refuse(&self, what: &str) -> FilesError {
        UnixError::FdsInFlight {
            pid: self.pid,
            fd: self.fd,
            ino: self.ino,
            what: what.to_string(),
        }
        .into()
    }
}

/// The files of descriptors in flight: those that are also open in the
/// tree, and those only the messages hold (described from cryo's copy,
/// which stays open until the image is written).
#[derive(Default)]
struct InFlightFiles {
    next_id: u32,
    /// (pid, fd, file id) of every descriptor of the tree.
    known: Vec<(i32, i32, u32)>,
    /// Files only messages hold, not in the table yet.
    new_files: Vec<OpenFile>,
    /// cryo's copy, file id and carrier of each file only messages hold.
    mine: Vec<(RawFd, u32, Carrier)>,
    held: Vec<OwnedFd>,
}

impl InFlightFiles {
    /// The carrier of `o` if it is a file only messages hold.
    fn carrier_of(&self, o: &OpenFile) -> Option<Carrier> {
        if o.pid != std::process::id() as i32 {
            return None;
        }
        self.mine.iter().find(|m| m.0 == o.fd).map(|m| m.2)
    }

    /// The file id of in-flight descriptor `fd` (cryo's copy), carried by
    /// a message for `carrier`.
    fn file_of(
        &mut self,
        fd: OwnedFd,
        carrier: Carrier,
        opts: &super::CollectOptions,
    ) -> Result<u32, FilesError> {
        let me = std::process::id() as i32;
        let raw = fd.as_raw_fd();
        let same = |p: i32, f: i32| sys::kcmp_file(me, p, raw, f).unwrap_or(false);
        if let Some(&(_, _, id)) = self.known.iter().find(|&&(p, f, _)| same(p, f)) {
            return Ok(id);
        }
        if let Some(&(_, id, _)) = self.mine.iter().find(|m| same(me, m.0)) {
            return Ok(id);
        }
        let id = self.next_id;
        let mut handles = super::ProcHandles::default();
        let mut diag = DiagSnapshot::default();
        let (entry, _) = super::describe(me, raw, id, 0, opts, &mut diag, &mut handles)?;
        let kind = FileKind::try_from(entry.kind).unwrap_or(FileKind::FileRegular);
        if !sendable(kind) {
            return Err(carrier.refuse(&format!(
                "{} ({}) held by no task of the tree; cryo keeps only files, directories, devices, memfds, pipes, unix sockets, eventfds, timerfds, signalfds and inotify instances in flight alone",
                entry.path,
                kind.as_str_name()
            )));
        }
        self.next_id += 1;
        self.new_files.push(OpenFile {
            pid: me,
            fd: raw,
            entry,
            via: None,
        });
        self.mine.push((raw, id, carrier));
        self.held.push(fd);
        Ok(id)
    }
}

/// Kinds a message in flight may hold without any task holding them too:
/// those whose state is the file's own, a pipe's or a unix socket's (read
/// like the tree's), not one made by a task.
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
            | FileKind::FileUnixSocket
    )
}

/// The listener of the tree (by inode) whose accept queue holds the
/// connection `info` is connected to; 0: none.
fn pending_listener(
    info: &DiagInfo,
    waiting: &HashMap<u64, u64>,
    inodes: &std::collections::BTreeSet<u64>,
) -> u64 {
    // (sock_diag shows no peer for it: the embryonic socket has no inode
    // until it is accepted.)
    if info.state != STATE_CONNECTED || inodes.contains(&info.peer) {
        return 0;
    }
    waiting.get(&info.ino).copied().unwrap_or(0)
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

/// The sockets (by inode) the dump was told are the caller's
/// (--external unix[INODE]).
static EXTERNAL: std::sync::Mutex<Vec<u64>> = std::sync::Mutex::new(Vec::new());

/// Dump side: take `inodes` as external sockets.
pub fn set_external(inodes: &[u64]) {
    *EXTERNAL.lock().unwrap_or_else(|p| p.into_inner()) = inodes.to_vec();
}

/// Restore side: the socket `f` named external at the dump, a duplicate
/// of the descriptor the restore was given for it (a socket).
pub fn inherited(f: &FileEntry) -> Result<OwnedFd, String> {
    let key = format!("socket:[{}]", f.inode);
    let fd = super::inherited(&key).ok_or_else(|| {
        format!("{key} was named external at the dump: restore with --inherit-fd fd[N]:{key}")
    })?;
    let (dup, _) =
        crate::sys::fs::dup_given(fd).map_err(|e| format!("--inherit-fd fd[{fd}]: {e}"))?;
    let st = nix::sys::stat::fstat(&dup).map_err(|e| format!("--inherit-fd fd[{fd}]: {e}"))?;
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(format!(
            "--inherit-fd fd[{fd}]: not a socket, given for {key}"
        ));
    }
    Ok(dup)
}

/// TCP_LISTEN, as unix sockets report it.
pub const STATE_LISTEN: u32 = 10;
/// TCP_ESTABLISHED.
pub const STATE_CONNECTED: u32 = 1;

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
/// (a relative name is taken from the task's working directory, an
/// absolute one from its root: its mount namespace's).
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
        std::path::PathBuf::from(format!("/proc/{pid}/root"))
            .join(name.strip_prefix("/").unwrap_or(name))
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
