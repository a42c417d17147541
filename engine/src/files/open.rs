//! Restore side of descriptors: every open file description of the tree
//! opened once, in the restoring process, before any task is made (the
//! tasks inherit them and move them to their numbers, see
//! `restore::fdtable`); epolls and pidfds are made by the task that holds
//! them. [`Opener::open`] and [`made_by_task`] are the restore side's
//! exhaustive dispatches over [`FileKind`].

#![forbid(unsafe_code)]

use std::collections::{BTreeSet, HashMap};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

use cryo_image::proto::{FileEntry, FileKind};
use nix::fcntl::{FcntlArg, OFlag};

use super::{
    epoll, eventfd, ghost, inet, inotify, lock, mqueue, pidfd, pipe, pty, regfile, signalfd,
    timerfd, tty, unix,
};

/// Why one file of files.img could not be opened again.
#[derive(Debug)]
pub struct OpenError {
    pub id: u32,
    pub path: String,
    pub what: String,
}

/// Whether a kind is made by the task that holds it, once its other
/// descriptors are in place (an epoll re-adds its targets by number, a
/// pidfd needs the tree's tasks to exist), rather than by [`open_all`].
pub fn made_by_task(kind: FileKind) -> bool {
    match kind {
        FileKind::FileEpoll | FileKind::FilePidfd | FileKind::FileMqueue => true,
        FileKind::FileRegular
        | FileKind::FileDirectory
        | FileKind::FileChardev
        | FileKind::FilePipe
        | FileKind::FileFifo
        | FileKind::FileEventfd
        | FileKind::FileTimerfd
        | FileKind::FileSignalfd
        | FileKind::FileUnixSocket
        | FileKind::FileInetSocket
        | FileKind::FileMemfd
        | FileKind::FileDeleted
        | FileKind::FileInotify
        | FileKind::FileShellTty
        | FileKind::FilePtyMaster
        | FileKind::FilePtySlave
        | FileKind::FileSymlink
        | FileKind::FilePidfdDead => false,
    }
}

/// Make a file of a kind [`made_by_task`] says is the task's own, in the
/// task (its other descriptors are at their numbers).
pub fn make_in_task(
    f: &FileEntry,
    pids: crate::ns::pid::View,
) -> std::result::Result<OwnedFd, String> {
    match FileKind::try_from(f.kind) {
        Ok(FileKind::FilePidfd) => pidfd::make(f, pids),
        Ok(FileKind::FileEpoll) => epoll::make(f),
        Ok(FileKind::FileMqueue) => mqueue::open(f),
        _ => Err(format!("file kind {} is not made by its task", f.kind)),
    }
}

/// What a task does with a file of its own once it is at its number.
pub fn finish_in_task(f: &FileEntry, fd: RawFd) -> std::result::Result<(), String> {
    match FileKind::try_from(f.kind) {
        Ok(FileKind::FileEpoll) => epoll::add_targets(f, fd),
        _ => Ok(()),
    }
}

/// The restore side's state across the files of the table: what is made
/// for several entries at once (pipe ends, ghost files, ptys, sockets).
struct Opener<'a> {
    files: &'a [FileEntry],
    pipes: pipe::Pipes,
    ghosts: ghost::Ghosts,
    ptys: HashMap<u32, OwnedFd>,
    sockets: HashMap<u32, OwnedFd>,
}

impl Opener<'_> {
    /// Restore side of every kind: a new open file description for `f`
    /// (None: the task makes it, see [`made_by_task`]).
    fn open(&mut self, f: &FileEntry) -> std::result::Result<Option<OwnedFd>, String> {
        let kind = FileKind::try_from(f.kind).unwrap_or(FileKind::FileRegular);
        let fd = match kind {
            FileKind::FileDirectory | FileKind::FileChardev if f.deleted => {
                self.ghosts.open(self.files, f)?
            }
            FileKind::FileRegular | FileKind::FileDirectory | FileKind::FileChardev => {
                regfile::open(f, kind)?
            }
            FileKind::FileMemfd | FileKind::FileDeleted => self.ghosts.open(self.files, f)?,
            FileKind::FilePipe | FileKind::FileFifo => self.pipes.open(self.files, f, kind)?,
            FileKind::FileEventfd => eventfd::make(f)?,
            FileKind::FileTimerfd => timerfd::make(f)?,
            FileKind::FileSignalfd => signalfd::make(f)?,
            // After every other file: it may watch one of them.
            FileKind::FileInotify => return Ok(None),
            FileKind::FileShellTty => tty::open_shell_tty(f)?,
            FileKind::FilePtyMaster => self
                .ptys
                .remove(&f.id)
                .ok_or("no pty was made for it".to_string())?,
            FileKind::FilePtySlave => pty::open_slave(f)?,
            FileKind::FileSymlink => regfile::open_symlink(f)?,
            FileKind::FilePidfdDead => pidfd::make_dead()?,
            FileKind::FileInetSocket => inet::make(f)?,
            FileKind::FileUnixSocket if f.external_socket => unix::inherited(f)?,
            FileKind::FileUnixSocket => self
                .sockets
                .remove(&f.id)
                .ok_or("no socket was made for it".to_string())?,
            FileKind::FileEpoll | FileKind::FilePidfd | FileKind::FileMqueue => return Ok(None),
        };
        Ok(Some(fd))
    }
}

/// Open every file description the tree uses, once: descriptors that
/// shared one at the dump (dup, inherited over fork) share it again, as
/// each task dup3s its numbers from these.
/// The socket files it binds are added to `socket_files` (a failed
/// restore removes them). With `ns`, each file is opened in the mount
/// and network namespaces of its holder (the pty masters in the first
/// one's).
pub fn open_all(
    files: &[FileEntry],
    used: &BTreeSet<u32>,
    socket_files: &mut Vec<std::path::PathBuf>,
    mut ns: Option<&mut crate::ns::Switch>,
) -> std::result::Result<HashMap<u32, OwnedFd>, OpenError> {
    let fail = |f: &FileEntry, what: String| OpenError {
        id: f.id,
        path: f.path.clone(),
        what,
    };
    // Into the namespaces of file `f`; whether that is cryo's own mount
    // namespace.
    let mut enter = |f: Option<&FileEntry>| match (ns.as_deref_mut(), f) {
        (Some(sw), Some(f)) => {
            sw.enter_for(f.id)
                .map(|()| sw.in_own_mnt())
                .map_err(|w| OpenError {
                    id: f.id,
                    path: f.path.clone(),
                    what: w,
                })
        }
        (Some(sw), None) => Ok(sw.in_own_mnt()),
        (None, _) => Ok(true),
    };
    let of_kind = |k: FileKind| {
        files
            .iter()
            .filter(move |f| used.contains(&f.id) && f.kind == k as i32)
    };
    let sockets: Vec<&FileEntry> = of_kind(FileKind::FileUnixSocket)
        .filter(|f| !f.external_socket)
        .collect();
    let sockets_named: Vec<(Vec<u8>, u32)> = sockets
        .iter()
        .filter_map(|f| Some((unix::name_key(&f.unix.as_ref()?.name), f.id)))
        .filter(|(n, _)| !n.is_empty())
        .collect();
    let mut later = Vec::new();
    let mut enter_sock = |f: &FileEntry| enter(Some(f)).map_err(|e| e.what);
    let sockets = unix::make_sockets(&sockets, socket_files, &mut later, &mut enter_sock).map_err(
        |what| OpenError {
            id: 0,
            path: "unix sockets".into(),
            what,
        },
    )?;
    // Pty masters first, by index (a slave may come before its master),
    // those of each devpts instance in the mount namespace of the first
    // one's holder (a devpts of the tree's own is mounted there anew).
    let masters: Vec<&FileEntry> = of_kind(FileKind::FilePtyMaster).collect();
    let mut ptys = HashMap::new();
    let mut instances: Vec<u64> = masters
        .iter()
        .map(|f| f.pty.as_ref().map_or(0, |p| p.devpts))
        .collect();
    instances.sort_unstable();
    instances.dedup();
    for d in instances {
        let of: Vec<&FileEntry> = masters
            .iter()
            .copied()
            .filter(|f| f.pty.as_ref().map_or(0, |p| p.devpts) == d)
            .collect();
        enter(of.first().copied())?;
        ptys.extend(pty::open_masters(&of).map_err(|(f, e)| fail(f, e))?);
    }
    let mut op = Opener {
        files,
        pipes: pipe::Pipes::default(),
        ghosts: ghost::Ghosts::default(),
        ptys,
        sockets,
    };
    let mut out = HashMap::new();
    let inotifies = files
        .iter()
        .filter(|f| used.contains(&f.id) && f.kind == FileKind::FileInotify as i32);
    for f in files.iter().filter(|f| used.contains(&f.id)) {
        enter(Some(f))?;
        let Some(fd) = op.open(f).map_err(|e| fail(f, e))? else {
            continue;
        };
        keep(f, fd, &mut out).map_err(|e| fail(f, e))?;
    }
    for f in inotifies {
        enter(Some(f))?;
        let fd = inotify::restore(&f.inotify.clone().unwrap_or_default(), &out)
            .map_err(|e| fail(f, e))?;
        keep(f, fd, &mut out).map_err(|e| fail(f, e))?;
    }
    // Every file is open: the messages with descriptors in flight, and
    // the datagrams each from its sender (the tree's socket of its name).
    let by_name: HashMap<Vec<u8>, RawFd> = sockets_named
        .iter()
        .filter_map(|(name, id)| Some((name.clone(), out.get(id)?.as_raw_fd())))
        .collect();
    for l in later {
        l.send(&out, &by_name).map_err(|what| OpenError {
            id: 0,
            path: "unix sockets".into(),
            what,
        })?;
    }
    // Every connection is made again: out of repair mode, together, then
    // those that waited to be accepted, in their queues' order.
    let mut conns: Vec<&FileEntry> = files
        .iter()
        .filter(|f| f.kind == FileKind::FileInetSocket as i32)
        .collect();
    conns.sort_by_key(|f| inet::finish_order(f));
    for f in conns {
        if let Some(fd) = out.get(&f.id) {
            inet::finish(f, fd).map_err(|e| fail(f, e))?;
        }
    }
    // Every slave is open: masters that were locked are locked again.
    for f in &masters {
        if let (Some(st), Some(m)) = (&f.pty, out.get(&f.id)) {
            pty::relock(m.as_raw_fd(), st).map_err(|e| fail(f, e))?;
        }
    }
    Ok(out)
}

/// An open file description made again, given the status flags and the
/// locks it kept, among the tree's files.
fn keep(
    f: &FileEntry,
    fd: OwnedFd,
    out: &mut HashMap<u32, OwnedFd>,
) -> std::result::Result<(), String> {
    // Status flags an open file description keeps (fcntl F_SETFL).
    let status_flags = OFlag::O_APPEND | OFlag::O_NONBLOCK | OFlag::O_ASYNC | OFlag::O_NOATIME;
    let fl = OFlag::from_bits_truncate(f.flags as i32) & status_flags;
    let _ = nix::fcntl::fcntl(fd.as_fd(), FcntlArg::F_SETFL(fl));
    lock::take_own(&fd, &f.locks)?;
    out.insert(f.id, fd);
    Ok(())
}

/// A new open file description of the file behind our descriptor `fd`
/// (through /proc/self/fd), with `flags`.
pub fn reopen(fd: &impl AsFd, flags: OFlag) -> std::result::Result<OwnedFd, String> {
    let path = format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd());
    nix::fcntl::open(
        path.as_str(),
        flags | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| format!("opening it again: {}", std::io::Error::from(e)))
}

/// Flags of a dumped open file for opening its path again: never
/// creating, truncating or taking a controlling terminal.
pub fn open_flags(f: &FileEntry) -> OFlag {
    let mut flags = OFlag::from_bits_retain(f.flags as i32)
        & !(OFlag::O_CREAT | OFlag::O_TRUNC | OFlag::O_EXCL | OFlag::O_NOCTTY);
    // O_TMPFILE (__O_TMPFILE with O_DIRECTORY) made the file; it is not
    // how it opens again.
    if flags.bits() & O_TMPFILE_BIT != 0 {
        flags = OFlag::from_bits_retain(flags.bits() & !O_TMPFILE_BIT) & !OFlag::O_DIRECTORY;
    }
    flags
}

/// __O_TMPFILE: the open file description was made by open(O_TMPFILE).
pub const O_TMPFILE_BIT: i32 = 0o20000000;
