//! Descriptors: one module per kind of open file, dump and restore side
//! by side. This file holds what every kind shares: telling the kind of a
//! descriptor, the two exhaustive dispatches over [`FileKind`] (what the
//! dump reads of a descriptor, and how the restore opens it again), and
//! the open file descriptions shared between descriptors (dup, fork).
//!
//! A new kind in files.proto does not compile until it has an arm in
//! [`dump_kind`], and in `Opener::open` and [`made_by_task`] (open.rs, the
//! restore side). Files a process holds without a descriptor are in
//! held.rs.
//!
//! Dump, per process (the tree is stopped): [`collect`] lists the
//! descriptors and reads each one's state; once every process is
//! collected, pty slaves are paired with their masters
//! ([`pty::pair`]) and [`link`] gives descriptors that share an open file
//! description one file id, then reads what needs the whole table (unix
//! socket peers and queues, pipe bytes in flight, ghost file contents).
//!
//! Restore: [`open_all`] opens every open file description of the tree
//! once, in the restoring process, before any task is made (the tasks
//! inherit them and move them to their numbers, see `restore::fdtable`);
//! epolls and pidfds are made by the task that holds them
//! ([`make_in_task`]).

#![forbid(unsafe_code)]

pub mod epoll;
pub mod eventfd;
pub mod ghost;
pub mod inet;
pub mod inotify;
pub mod lock;
pub mod mqueue;
pub mod pidfd;
pub mod pipe;
pub mod pty;
pub mod regfile;
pub mod signalfd;
pub mod table;
pub mod timerfd;
pub mod tty;
pub mod unix;

mod held;
mod open;

pub use held::{HeldBy, HeldFile};
pub use open::{
    finish_in_task, made_by_task, make_in_task, open_all, open_flags, reopen, OpenError,
    O_TMPFILE_BIT,
};

use std::collections::{BTreeSet, HashMap};
use std::os::fd::OwnedFd;

use cryo_image::proto::{FdEntry, FileEntry, FileKind};
use nix::sys::stat::FileStat;

use crate::proc as procfmt;
use crate::pstree;
use crate::sys::{self, SysError};
use unix::DiagSnapshot;

#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("reading {path}: {source}")]
    Proc {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing {path}")]
    Parse { path: String },
    #[error("task {pid}: fd {fd} is {what} ({link})")]
    UnsupportedFd {
        pid: i32,
        fd: i32,
        what: &'static str,
        link: String,
    },
    #[error("task {pid}: fd {fd} is {what} ({link})")]
    Unsupported {
        pid: i32,
        fd: i32,
        what: String,
        link: String,
    },
    #[error("task {pid}: fd {fd} refers to deleted file {link} of {size} bytes, more than the --ghost-limit of {limit} bytes")]
    DeletedFile {
        pid: i32,
        fd: i32,
        link: String,
        size: u64,
        limit: u64,
    },
    #[error("task {pid}: maps {link} of {size} bytes (a memfd or a file deleted while mapped), more than the --ghost-limit of {limit} bytes")]
    DeletedMapping {
        pid: i32,
        link: String,
        size: u64,
        limit: u64,
    },
    #[error("task {pid}: fd {fd} ({link}) is a pipe whose other end is open in process {holder}, outside the dumped tree")]
    ExternalPipe {
        pid: i32,
        fd: i32,
        link: String,
        holder: i32,
    },
    #[error("task {pid}: fd {fd}: the peer (socket {peer}) of unix socket {ino} is outside the dumped tree; {why}")]
    ExternalUnixPeer {
        pid: i32,
        fd: i32,
        ino: u64,
        peer: u64,
        why: &'static str,
    },
    #[error("task {pid}: fd {fd} ({link}) is the master of pty {index}, whose slave is open in process {holder}, outside the dumped tree")]
    ExternalPtySlave {
        pid: i32,
        fd: i32,
        link: String,
        index: u32,
        holder: i32,
    },
    #[error(transparent)]
    Unix(#[from] unix::UnixError),
    #[error(transparent)]
    Inotify(#[from] inotify::InotifyError),
    #[error(transparent)]
    Pty(#[from] pty::PtyError),
    #[error(transparent)]
    Sys(#[from] SysError),
}

type Result<T> = std::result::Result<T, FilesError>;

/// The descriptors of cryo's a restore was given for files that led
/// outside the tree (--inherit-fd fd[N]:KEY), by key: `pipe:[INODE]`,
/// `socket:[INODE]`.
static INHERITED: std::sync::Mutex<Vec<(String, std::os::fd::RawFd)>> =
    std::sync::Mutex::new(Vec::new());

/// Restore side: take `fds` (key, descriptor of cryo's).
pub fn set_inherited(fds: &[(String, std::os::fd::RawFd)]) {
    *INHERITED.lock().unwrap_or_else(|p| p.into_inner()) = fds.to_vec();
}

/// The descriptor given for `key`, if any.
fn inherited(key: &str) -> Option<std::os::fd::RawFd> {
    INHERITED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .find(|(k, _)| k == key)
        .map(|&(_, fd)| fd)
}

/// `fd[N]:KEY` (--inherit-fd, CRIU's form) as (KEY, N); KEY is
/// `pipe:[INODE]` or `socket:[INODE]`.
pub fn parse_inherit(s: &str) -> std::result::Result<(String, i32), String> {
    let bad = || format!("--inherit-fd {s:?}: expected fd[N]:pipe:[INODE] or fd[N]:socket:[INODE]");
    let (fd, key) = s.split_once(':').ok_or_else(bad)?;
    let n: i32 = fd
        .strip_prefix("fd[")
        .and_then(|r| r.strip_suffix(']'))
        .and_then(|n| n.parse().ok())
        .ok_or_else(bad)?;
    let inode = ["pipe:[", "socket:["]
        .iter()
        .find_map(|p| key.strip_prefix(p))
        .and_then(|r| r.strip_suffix(']'))
        .and_then(|n| n.parse::<u64>().ok());
    match inode {
        Some(_) => Ok((key.to_string(), n)),
        None => Err(bad()),
    }
}

/// What the dump accepts, from the command line.
#[derive(Debug, Clone, Copy)]
pub struct CollectOptions {
    /// Largest deleted file or memfd whose contents go into the image.
    pub ghost_limit: u64,
    /// A larger deleted file with another name left is kept by a hard
    /// link (--link-remap).
    pub link_remap: bool,
    /// Descriptors on the controlling terminal of a shell job are kept.
    pub shell_job: bool,
    /// Read each descriptor's signal owner (through a duplicate of it):
    /// done once the tree is stopped, not by the checks made while it
    /// still runs (a task on its way out has no descriptors to duplicate).
    pub owners: bool,
    /// Established TCP connections are dumped through TCP_REPAIR
    /// (--tcp-established), not refused.
    pub tcp_established: bool,
    /// Connections in any state but listening are dumped closed
    /// (--tcp-close): restored as sockets of their kind, not connected.
    pub tcp_close: bool,
    /// The root of the tree whose nftables table drops the packets of
    /// those connections until the restore (None: --network-lock skip).
    pub network_lock: Option<(i32, inet::Lock)>,
}

/// The descriptors of one process and the files they refer to (one
/// `FileEntry` per descriptor until [`link`] merges shared ones).
#[derive(Debug, Default)]
pub struct ProcFds {
    pub pid: i32,
    pub fd_entries: Vec<FdEntry>,
    pub files: Vec<FileEntry>,
    /// Files it uses without a descriptor that the restore must recreate.
    pub held: Vec<HeldFile>,
}

/// What every entry records of the file's inode.
fn entry_of(st: &FileStat) -> FileEntry {
    FileEntry {
        dev: st.st_dev,
        inode: st.st_ino,
        rdev: st.st_rdev as u32,
        size: st.st_size as u64,
        mode: st.st_mode & 0o7777,
        uid: Some(st.st_uid),
        gid: Some(st.st_gid),
        ..Default::default()
    }
}

impl ProcFds {
    /// The descriptor number of file `id` in this process (-1: none).
    pub fn fd_of(&self, id: u32) -> i32 {
        self.fd_entries
            .iter()
            .find(|e| e.id == id)
            .map(|e| e.fd as i32)
            .unwrap_or(-1)
    }
}

/// One descriptor being dumped: where it is and what /proc says of it.
pub struct FdCtx<'a> {
    pub pid: i32,
    pub fd: i32,
    /// The /proc/PID/fd/N link, as the kernel prints it.
    pub link: &'a str,
    pub st: &'a FileStat,
    /// /proc/PID/fdinfo/N, whole and as `key: value` pairs.
    pub fdinfo: &'a str,
    pub info: &'a HashMap<String, String>,
    pub info_path: &'a str,
}

impl FdCtx<'_> {
    /// A decimal field of fdinfo.
    pub fn num(&self, key: &str) -> Option<u64> {
        self.info
            .get(key)
            .and_then(|v| v.trim().parse::<u64>().ok())
    }

    /// A hexadecimal field of fdinfo.
    pub fn hex(&self, key: &str) -> Option<u64> {
        self.info.get(key).and_then(|v| procfmt::fdinfo_hex(v))
    }

    /// A signed decimal field of fdinfo.
    pub fn int(&self, key: &str) -> Option<i64> {
        self.info
            .get(key)
            .and_then(|v| v.trim().parse::<i64>().ok())
    }

    pub fn bad(&self) -> FilesError {
        FilesError::Parse {
            path: self.info_path.to_string(),
        }
    }

    pub fn unsupported(&self, what: &'static str) -> FilesError {
        FilesError::UnsupportedFd {
            pid: self.pid,
            fd: self.fd,
            what,
            link: self.link.to_string(),
        }
    }

    /// [`Self::unsupported`] with a reason made at the time.
    pub fn unsupported_owned(&self, what: String) -> FilesError {
        FilesError::Unsupported {
            pid: self.pid,
            fd: self.fd,
            what,
            link: self.link.to_string(),
        }
    }
}

/// Per-process resources a kind may need while its descriptors are read.
#[derive(Default)]
pub struct ProcHandles {
    /// A pidfd of the process, for pidfd_getfd (made on first use).
    pidfd: Option<OwnedFd>,
}

impl ProcHandles {
    /// A duplicate of descriptor `fd` of task `pid`.
    pub fn getfd(&mut self, pid: i32, fd: i32) -> Result<OwnedFd> {
        let npid = nix::unistd::Pid::from_raw(pid);
        let pidfd = match &self.pidfd {
            Some(p) => p,
            None => self.pidfd.insert(sys::pidfd_open(npid)?),
        };
        Ok(sys::pidfd_getfd(pidfd, npid, fd)?)
    }
}

pub(crate) fn read(path: &str) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| FilesError::Proc {
        path: path.into(),
        source,
    })
}

fn readlink(path: &str) -> Result<String> {
    std::fs::read_link(path)
        .map(|p| p.to_string_lossy().into_owned())
        .map_err(|source| FilesError::Proc {
            path: path.into(),
            source,
        })
}

const ANON_UNSUPPORTED: &str = "an anonymous-inode file of a kind not supported yet (fanotify, io_uring, bpf, perf event, userfaultfd, ...)";

/// The kind of descriptor `fd` of `pid`, or why it cannot be dumped.
fn classify(
    cx: &FdCtx,
    ctty: u64,
    opts: &CollectOptions,
    diag: &mut DiagSnapshot,
) -> Result<FileKind> {
    let (link, st) = (cx.link, cx.st);
    let fmt = st.st_mode & libc::S_IFMT;
    if is_ns_file(link) {
        return Err(cx.unsupported(
            "a namespace file (from /proc/PID/ns; namespace descriptors come with the containers work)",
        ));
    }
    let kind = match fmt {
        libc::S_IFREG if mqueue::is_mqueue(cx) => FileKind::FileMqueue,
        libc::S_IFREG if link.starts_with("/memfd:") => FileKind::FileMemfd,
        libc::S_IFREG if link.ends_with(" (deleted)") => FileKind::FileDeleted,
        libc::S_IFREG => FileKind::FileRegular,
        libc::S_IFDIR => FileKind::FileDirectory,
        libc::S_IFCHR => tty::classify_chardev(cx, ctty, opts.shell_job)?,
        libc::S_IFIFO if link.starts_with("pipe:") => FileKind::FilePipe,
        _ if link == "anon_inode:[eventfd]" => FileKind::FileEventfd,
        _ if link == "anon_inode:[timerfd]" => FileKind::FileTimerfd,
        _ if link == "anon_inode:[signalfd]" => FileKind::FileSignalfd,
        _ if link == "anon_inode:[eventpoll]" => FileKind::FileEpoll,
        _ if link == "anon_inode:inotify" => FileKind::FileInotify,
        _ if link == "anon_inode:[pidfd]" || link.starts_with("pidfd:") => {
            if cx.int("Pid") == Some(-1) {
                FileKind::FilePidfdDead
            } else {
                FileKind::FilePidfd
            }
        }
        libc::S_IFLNK if link.starts_with('/') => FileKind::FileSymlink,
        // Not a unix socket: an IPv4 or IPv6 one, or refused by inet::dump.
        libc::S_IFSOCK if !diag.get_for([cx.pid])?.contains_key(&st.st_ino) => {
            FileKind::FileInetSocket
        }
        libc::S_IFSOCK => FileKind::FileUnixSocket,
        libc::S_IFIFO if link.starts_with('/') => FileKind::FileFifo,
        _ => {
            return Err(cx.unsupported(match fmt {
                libc::S_IFSOCK => "a socket (not supported yet)",
                libc::S_IFBLK => "a block device (not supported yet)",
                _ if link.starts_with("anon_inode:") => ANON_UNSUPPORTED,
                _ => "an unsupported kind of file",
            }))
        }
    };
    let named = !is_anon(kind) && !ghost::is_ghost(kind);
    if named && !link.starts_with('/') {
        // Anonymous inodes of other kinds (some kernels give them a
        // regular file type).
        return Err(cx.unsupported(if link.starts_with("anon_inode:") {
            ANON_UNSUPPORTED
        } else {
            "a file without a path of a kind not supported yet"
        }));
    }
    if named && is_deleted(cx) && !ghost::remade_when_deleted(kind) {
        return Err(cx.unsupported(
            "a deleted file of a kind cryo does not recreate (a terminal, a pty master)",
        ));
    }
    Ok(kind)
}

/// Whether the descriptor's file lost its name: the kernel's link says
/// " (deleted)" and no link to the inode is left.
fn is_deleted(cx: &FdCtx) -> bool {
    cx.link.ends_with(" (deleted)") && cx.st.st_nlink == 0
}

/// A namespace file's link: `KIND:[INODE]` (net:[4026531840]).
fn is_ns_file(link: &str) -> bool {
    let Some((kind, rest)) = link.split_once(":[") else {
        return false;
    };
    const KINDS: [&str; 10] = [
        "cgroup",
        "ipc",
        "mnt",
        "net",
        "pid",
        "pid_for_children",
        "time",
        "time_for_children",
        "user",
        "uts",
    ];
    KINDS.contains(&kind)
        && rest
            .strip_suffix(']')
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()))
}

/// Kinds that can have a signal owner worth keeping (F_SETOWN_EX): what
/// can signal I/O (O_ASYNC) or urgent data.
fn has_owner(kind: FileKind) -> bool {
    !matches!(
        kind,
        FileKind::FileSymlink | FileKind::FileDirectory | FileKind::FileShellTty
    )
}

/// Kinds without a path: the kernel names them by inode.
fn is_anon(kind: FileKind) -> bool {
    matches!(
        kind,
        FileKind::FilePipe
            | FileKind::FileUnixSocket
            | FileKind::FileInetSocket
            | FileKind::FileEventfd
            | FileKind::FileTimerfd
            | FileKind::FileSignalfd
            | FileKind::FileEpoll
            | FileKind::FilePidfd
            | FileKind::FilePidfdDead
            | FileKind::FileInotify
    )
}

/// Dump side of every kind: what one descriptor's own state is, read
/// while its process is stopped. State that needs the whole tree's table
/// is read by [`link`].
fn dump_kind(
    kind: FileKind,
    cx: &FdCtx,
    h: &mut ProcHandles,
    opts: &CollectOptions,
    e: &mut FileEntry,
) -> Result<()> {
    match kind {
        FileKind::FileRegular | FileKind::FileDirectory | FileKind::FileChardev => Ok(()),
        FileKind::FileMemfd | FileKind::FileDeleted => ghost::dump(cx, opts, e),
        FileKind::FilePipe | FileKind::FileFifo => Ok(()), // bytes in flight: link()
        FileKind::FileUnixSocket => Ok(()),                // state and queues: link()
        FileKind::FileEventfd => eventfd::dump(cx, e),
        FileKind::FileTimerfd => timerfd::dump(cx, e),
        FileKind::FileSignalfd => signalfd::dump(cx, e),
        FileKind::FileEpoll => epoll::dump(cx, e),
        FileKind::FilePidfd => pidfd::dump(cx, e),
        FileKind::FilePidfdDead | FileKind::FileMqueue => Ok(()),
        FileKind::FileSymlink => regfile::dump_symlink(cx, h, e),
        FileKind::FileInotify => {
            e.inotify = Some(inotify::dump(cx.pid, cx.fd, cx.fdinfo)?);
            Ok(())
        }
        FileKind::FileShellTty => Ok(()),
        FileKind::FilePtyMaster | FileKind::FilePtySlave => pty::dump(kind, cx, h, e),
        FileKind::FileInetSocket => inet::dump(cx, h, e, opts),
    }
}

/// The files `pid` has open, checked for what cryo can restore. File ids
/// are numbered from `*next_id` on, which is advanced past them (ids are
/// unique across the processes of an image).
pub fn collect(
    pid: i32,
    next_id: &mut u32,
    opts: &CollectOptions,
    diag: &mut DiagSnapshot,
) -> Result<ProcFds> {
    let ctty = pstree::stat(pid).map(|s| s.ctty()).unwrap_or(0);
    let dir = format!("/proc/{pid}/fd");
    let rd = std::fs::read_dir(&dir).map_err(|source| FilesError::Proc {
        path: dir.clone(),
        source,
    })?;
    let mut fds: Vec<i32> = rd
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort_unstable();
    let mut out = ProcFds {
        pid,
        ..Default::default()
    };
    let mut handles = ProcHandles::default();
    for fd in fds {
        let id = *next_id;
        *next_id += 1;
        let (e, fe) = describe(pid, fd, id, ctty, opts, diag, &mut handles)?;
        out.files.push(e);
        out.fd_entries.push(fe);
    }
    Ok(out)
}

/// The entry of descriptor `fd` of `pid` (file id `id`) and its
/// descriptor record: its kind, flags, offset, inode and what its kind
/// keeps, its locks and signal owner. `ctty` is the process's controlling
/// terminal.
fn describe(
    pid: i32,
    fd: i32,
    id: u32,
    ctty: u64,
    opts: &CollectOptions,
    diag: &mut DiagSnapshot,
    handles: &mut ProcHandles,
) -> Result<(FileEntry, FdEntry)> {
    let path = format!("/proc/{pid}/fd/{fd}");
    let link = readlink(&path)?;
    let st = nix::sys::stat::stat(path.as_str()).map_err(|e| FilesError::Proc {
        path: path.clone(),
        source: e.into(),
    })?;
    let info_path = format!("/proc/{pid}/fdinfo/{fd}");
    let fdinfo = read(&info_path)?;
    let info = procfmt::parse_status(&fdinfo);
    let cx = FdCtx {
        pid,
        fd,
        link: &link,
        st: &st,
        fdinfo: &fdinfo,
        info: &info,
        info_path: &info_path,
    };
    let kind = classify(&cx, ctty, opts, diag)?;
    let (pos, flags) = procfmt::parse_fdinfo(&fdinfo);
    let deleted = !ghost::is_ghost(kind) && is_deleted(&cx);
    let mut e = FileEntry {
        id,
        kind: kind as i32,
        path: if deleted {
            ghost::deleted_name(&link)
        } else {
            ghost::name(kind, &link)
        },
        flags: flags & !(libc::O_CLOEXEC as u32),
        pos,
        deleted,
        mnt_id: info.get("mnt_id").and_then(|v| v.parse().ok()).unwrap_or(0),
        ..entry_of(&st)
    };
    if deleted {
        ghost::times(&st, &mut e);
    }
    dump_kind(kind, &cx, handles, opts, &mut e)?;
    let (locks, posix_locks) = lock::dump_locks(&cx)?;
    e.locks = locks;
    // An O_PATH descriptor has no owner (fcntl refuses it).
    if opts.owners && has_owner(kind) && flags & libc::O_PATH as u32 == 0 {
        e.owner = lock::dump_owner(&cx, handles)?;
    }
    let fe = FdEntry {
        fd: fd as u32,
        id,
        cloexec: flags & libc::O_CLOEXEC as u32 != 0,
        posix_locks,
    };
    Ok((e, fe))
}

/// One open file description of the tree with a descriptor that holds it.
pub struct OpenFile {
    pub pid: i32,
    /// -1: a file the process holds without a descriptor, opened at
    /// `via`.
    pub fd: i32,
    pub entry: FileEntry,
    pub via: Option<String>,
}

impl OpenFile {
    /// Where cryo opens it again to read it.
    pub fn proc_path(&self) -> String {
        match &self.via {
            Some(v) => v.clone(),
            None => format!("/proc/{}/fd/{}", self.pid, self.fd),
        }
    }
}

/// Descriptors that share one open file description (dup, inherited over
/// fork; kcmp says so) get one file id; then what needs the whole table
/// is read (unix socket states, ghost contents, pipe bytes in flight).
/// Every task of the tree is stopped. Returns the files table.
pub fn link(
    procs: &mut [&mut ProcFds],
    ext_unix_sk: bool,
    diag: &mut DiagSnapshot,
    opts: &CollectOptions,
) -> Result<Vec<FileEntry>> {
    let mut table: Vec<OpenFile> = Vec::new();
    for p in procs.iter_mut() {
        let files = std::mem::take(&mut p.files);
        for e in p.fd_entries.iter_mut() {
            let Some(f) = files.iter().find(|f| f.id == e.id) else {
                continue;
            };
            // Every pty master has the inode of /dev/ptmx: kcmp tells
            // them apart (one open file description per pty).
            let same = table.iter().find(|o| {
                o.entry.kind == f.kind
                    && o.entry.dev == f.dev
                    && o.entry.inode == f.inode
                    && o.entry.pty.as_ref().map(|p| p.index) == f.pty.as_ref().map(|p| p.index)
                    && sys::kcmp_file(o.pid, p.pid, o.fd, e.fd as i32).unwrap_or(false)
            });
            match same {
                Some(o) => e.id = o.entry.id,
                None => table.push(OpenFile {
                    pid: p.pid,
                    fd: e.fd as i32,
                    entry: f.clone(),
                    via: None,
                }),
            }
        }
    }
    held::link_held(procs, &mut table);
    let tree: BTreeSet<i32> = procs.iter().map(|p| p.pid).collect();
    // Descriptors in flight that only messages hold: open until the
    // end, for what is read of them below.
    let _in_flight = unix::states(&mut table, ext_unix_sk, diag, opts)?;
    inet::link_pending(&mut table)?;
    inotify::link_removed(&mut table)?;
    ghost::contents(&mut table, opts)?;
    check_per_task(procs, &table)?;
    // cryo's own copies of pipe ends in flight are not an outside holder.
    let mut tree = tree;
    tree.insert(std::process::id() as i32);
    pipe::contents(&mut table, &tree)?;
    Ok(table.into_iter().map(|o| o.entry).collect())
}

/// An epoll or pidfd is remade by the process that holds it: one shared
/// by several processes is not supported yet, unless they share one
/// descriptor table. (A message queue's descriptor may be: each holder
/// opens the queue again, and an open queue has no state of its own but
/// O_NONBLOCK.)
fn check_per_task(procs: &[&mut ProcFds], table: &[OpenFile]) -> Result<()> {
    for p in procs {
        for e in &p.fd_entries {
            let Some(o) = table.iter().find(|o| o.entry.id == e.id) else {
                continue;
            };
            let per_task = FileKind::try_from(o.entry.kind)
                .is_ok_and(|k| made_by_task(k) && k != FileKind::FileMqueue);
            // In one descriptor table (CLONE_FILES) it is made once.
            let one_table =
                || sys::kcmp_files(o.pid, p.pid).is_ok_and(|c| c == std::cmp::Ordering::Equal);
            if per_task && o.pid != p.pid && !one_table() {
                return Err(FilesError::UnsupportedFd {
                    pid: p.pid,
                    fd: e.fd as i32,
                    what: "an epoll or pidfd shared with another process (not supported yet)",
                    link: o.entry.path.clone(),
                });
            }
        }
    }
    Ok(())
}

/// A process outside `tree` with a descriptor whose /proc link `wanted`
/// accepts, and what `wanted` said of it.
pub fn outside_holder<T>(
    tree: &BTreeSet<i32>,
    wanted: impl Fn(&str) -> Option<T>,
) -> Option<(i32, T)> {
    let rd = std::fs::read_dir("/proc").ok()?;
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if tree.contains(&pid) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(link) = std::fs::read_link(fd.path()) else {
                continue;
            };
            if let Some(found) = link.to_str().and_then(&wanted) {
                return Some((pid, found));
            }
        }
    }
    None
}
