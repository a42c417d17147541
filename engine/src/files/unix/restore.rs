//! Restore side of unix sockets: every socket of the image made again by
//! cryo before it creates the tasks, bound, connected or listening, with
//! its queued messages sent again (those with descriptors in flight, and
//! datagrams from several senders, once every file is open).

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

use cryo_image::proto::{FileEntry, InFlight, UnixSocketState};
use nix::sys::socket::{self as nixsock, MsgFlags};

use super::{STATE_CONNECTED, STATE_LISTEN};
use crate::sys::sock;

/// Restore side: make every unix socket of `files` (one per open file
/// description). Connected pairs whose both ends are in the image become
/// socketpairs; each end's queued messages are sent again from its peer.
/// Returns the descriptors by file id; the socket files it made are
/// added to `made` (a failed restore removes them).
pub fn make_sockets(
    files: &[&FileEntry],
    made: &mut Vec<std::path::PathBuf>,
    later: &mut Vec<Later>,
    enter: &mut dyn FnMut(&FileEntry) -> Result<bool, String>,
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
        // In the namespaces of its holder: its name is bound there (and
        // a file it binds is removed by a failed restore only if that is
        // cryo's mount namespace: another one goes with the restore).
        let own_mnt = enter(f)?;
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
            made.extend(file.filter(|_| own_mnt));
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
    connect_pending(files, &by_ino, &mut out, made, enter)?;
    Ok(out)
}

/// The sockets that waited in a listener's accept queue at the dump
/// connect to it again, in that order (the listeners listen by now).
fn connect_pending(
    files: &[&FileEntry],
    by_ino: &HashMap<u64, &FileEntry>,
    out: &mut HashMap<u32, OwnedFd>,
    made: &mut Vec<std::path::PathBuf>,
    enter: &mut dyn FnMut(&FileEntry) -> Result<bool, String>,
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
            let own_mnt = enter(c)?;
            let s = sock::unix_socket(cs.sock_type as i32 | libc::SOCK_CLOEXEC)
                .map_err(|e| format!("socket for unix socket {ino}: {e}"))?;
            if !cs.name.is_empty() {
                let file = bind(&s, &cs).map_err(|e| format!("binding unix socket {ino}: {e}"))?;
                made.extend(file.filter(|_| own_mnt));
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
        let to = address(&self.to).map_err(|e| format!("unix socket {ino}: its name: {e}"))?;
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
