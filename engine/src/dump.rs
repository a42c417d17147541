//! The dump pipeline for one process: check what it holds, seize it,
//! collect its state from /proc and ptrace, run the parasite for the state
//! only the task can see and for its pages, write the image, then cure it
//! (--leave-running) or kill it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cryo_image::proto::{
    self, Compression, CoreEntry, Creds, FdEntry, FileEntry, FileKind, GpRegs, Inventory, Itimer,
    MmEntry, PagemapHead, PagemapRecord, PendingSignal, PosixTimer, ProcessCore, PstreeEntry,
    Rlimit, SigAction, SigaltStack, VmaKind,
};
use cryo_image::{ImageError, ImageFileInfo, ImageWriter, Kind, PageWriter};
use nix::unistd::Pid;

use crate::files::unix::DiagSnapshot;
use crate::infect::guard::Guard;
use crate::infect::{InfectError, Victim};
use std::collections::HashMap;

use crate::mem::precopy::PreCopy;
use crate::mem::snapshot::Snapshot;
use crate::mem::transfer::{self, TransferError, TransferStats};
use crate::mem::{self, MemError};
use crate::proc as procfmt;
use crate::pstree::{self, Seized, Tree};
use crate::sigframe::Regs;
use crate::sys::{self, SysError};

#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("task {pid} does not exist")]
    NoTask { pid: i32 },
    #[error("reading {path}: {source}")]
    Proc {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing {path}")]
    Parse { path: String },
    #[error("task {pid}: its thread group leader has exited while {threads} threads run on; such a process cannot be dumped")]
    ZombieLeader { pid: i32, threads: u64 },
    #[error(
        "task {pid}: thread {tid} is {state:?}; only running or sleeping threads can be dumped"
    )]
    ThreadState { pid: i32, tid: i32, state: char },
    #[error("task {pid} is in its own {ns} namespace ({id}); dumping tasks in other namespaces is not supported yet")]
    Namespace {
        pid: i32,
        ns: &'static str,
        id: String,
    },
    #[error("task {pid}: fd {fd} is {what} ({link})")]
    UnsupportedFd {
        pid: i32,
        fd: i32,
        what: &'static str,
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
    #[error("task {pid} has {n} POSIX timers; at most {max} are supported")]
    TooManyTimers { pid: i32, n: usize, max: usize },
    #[error("creating image directory {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Infect(#[from] InfectError),
    #[error(transparent)]
    Mem(#[from] MemError),
    #[error(transparent)]
    Transfer(#[from] TransferError),
    #[error(transparent)]
    Snapshot(#[from] crate::mem::snapshot::SnapshotError),
    #[error(transparent)]
    PreCopy(#[from] crate::mem::precopy::PreCopyError),
    #[error("--pre-copy is for dumps that stop the tasks; with --leave-running they are already stopped only for their state")]
    PreCopyLeaveRunning,
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Sys(#[from] SysError),
    #[error(transparent)]
    Freeze(#[from] crate::freeze::FreezeError),
    #[error("cgroup {} has no process to dump", cgroup.display())]
    EmptyCgroup { cgroup: PathBuf },
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
    #[error(transparent)]
    Unix(#[from] crate::files::unix::UnixError),
    #[error(transparent)]
    Inotify(#[from] crate::files::inotify::InotifyError),
    #[error(transparent)]
    Pty(#[from] crate::files::pty::PtyError),
    #[error("task {pid}: fd {fd} ({link}) is the master of pty {index}, whose slave is open in process {holder}, outside the dumped tree")]
    ExternalPtySlave {
        pid: i32,
        fd: i32,
        link: String,
        index: u32,
        holder: i32,
    },
    #[error("task {pid} is a zombie; there is nothing to dump")]
    RootZombie { pid: i32 },
    #[error("task {pid} {what}; such a session layout cannot be restored yet")]
    Session { pid: i32, what: String },
    #[error("task {pid} is not in cgroup {}", cgroup.display())]
    NotInCgroup { pid: i32, cgroup: PathBuf },
    #[error("injected failure ({what}) from CRYO_FAULT")]
    Fault { what: String },
}

type Result<T> = std::result::Result<T, DumpError>;

#[derive(Debug, Clone)]
pub struct DumpOptions {
    /// The root of the tree to dump (unused with `cgroup`).
    pub pid: i32,
    /// Dump every process of this cgroup instead, frozen by its freezer.
    pub cgroup: Option<PathBuf>,
    pub dir: PathBuf,
    pub leave_running: bool,
    pub compression: Compression,
    pub zstd_level: i32,
    pub threads: usize,
    /// Freeze this cgroup (v2 or v1 freezer) while seizing the task.
    pub freeze_cgroup: Option<PathBuf>,
    /// Largest deleted file or memfd whose contents go into the image.
    pub ghost_limit: u64,
    /// Accept unix datagram sockets connected to a peer outside the tree
    /// (restore connects them to its address again).
    pub ext_unix_sk: bool,
    /// A shell job: descriptors on the tasks' controlling terminal are
    /// accepted and reattached to the restoring session's terminal.
    pub shell_job: bool,
    /// Copy private memory while the tasks still run, in rounds, and stop
    /// them only for what they wrote since the last one (not with
    /// `leave_running`, where the stop is already short).
    pub pre_copy: bool,
}

#[derive(Debug, Default, Clone)]
pub struct DumpStats {
    /// The first root dumped, and how many processes were.
    pub root: i32,
    pub processes: usize,
    pub pages: TransferStats,
    /// How long the task was stopped.
    pub frozen: Duration,
    pub total: Duration,
    pub image_bytes: u64,
}

fn read(path: &str) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| DumpError::Proc {
        path: path.into(),
        source,
    })
}

fn readlink(path: &str) -> Result<String> {
    std::fs::read_link(path)
        .map(|p| p.to_string_lossy().into_owned())
        .map_err(|source| DumpError::Proc {
            path: path.into(),
            source,
        })
}

fn fault(point: &str) -> Result<()> {
    if crate::fault::check(point) {
        return Err(DumpError::Fault { what: point.into() });
    }
    Ok(())
}

const ANON_UNSUPPORTED: &str = "an anonymous-inode file of a kind not supported yet (fanotify, io_uring, bpf, perf event, userfaultfd, ...)";

/// The files a process has open, checked for what cryo can restore.
/// File ids are numbered from `*next_id` on, which is advanced past them
/// (ids are unique across the processes of an image).
fn collect_fds(
    pid: i32,
    next_id: &mut u32,
    ghost_limit: u64,
    shell_job: bool,
    diag: &mut DiagSnapshot,
) -> Result<(Vec<FdEntry>, Vec<FileEntry>)> {
    let ctty = pstree::stat(pid).map(|s| s.ctty()).unwrap_or(0);
    let dir = format!("/proc/{pid}/fd");
    let rd = std::fs::read_dir(&dir).map_err(|source| DumpError::Proc {
        path: dir.clone(),
        source,
    })?;
    let mut fds: Vec<i32> = rd
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort_unstable();
    let mut fd_entries = Vec::new();
    let mut files = Vec::new();
    // For pidfd_getfd of pty masters (made on the first).
    let mut pidfd: Option<std::os::fd::OwnedFd> = None;
    for fd in fds {
        let link = readlink(&format!("/proc/{pid}/fd/{fd}"))?;
        let st = nix::sys::stat::stat(format!("/proc/{pid}/fd/{fd}").as_str()).map_err(|e| {
            DumpError::Proc {
                path: format!("/proc/{pid}/fd/{fd}"),
                source: e.into(),
            }
        })?;
        let fmt = st.st_mode & libc::S_IFMT;
        let kind = match fmt {
            libc::S_IFREG if link.starts_with("/memfd:") => FileKind::FileMemfd,
            libc::S_IFREG if link.ends_with(" (deleted)") => FileKind::FileDeleted,
            libc::S_IFREG => FileKind::FileRegular,
            libc::S_IFDIR => FileKind::FileDirectory,
            // Pty pairs: whether the master of a slave is in the tree is
            // decided once every process is collected (pair_ptys).
            libc::S_IFCHR if st.st_rdev == sys::tty::ptmx_rdev() => FileKind::FilePtyMaster,
            libc::S_IFCHR if sys::tty::pty_slave_index(st.st_rdev).is_some() => {
                FileKind::FilePtySlave
            }
            // Other terminals (tty major 4, /dev/tty, /dev/console) carry a
            // session and job control: only the controlling one of a
            // --shell-job is accepted.
            libc::S_IFCHR if is_terminal(st.st_rdev) && shell_job && st.st_rdev == ctty => {
                FileKind::FileShellTty
            }
            libc::S_IFCHR if is_terminal(st.st_rdev) => {
                return Err(DumpError::UnsupportedFd {
                    pid,
                    fd,
                    what: if st.st_rdev == ctty {
                        "its controlling terminal (a shell job: dump it with --shell-job)"
                    } else {
                        "a terminal other than its controlling one (only pty pairs of the tree and a --shell-job's terminal are supported)"
                    },
                    link,
                });
            }
            libc::S_IFCHR => FileKind::FileChardev,
            libc::S_IFIFO if link.starts_with("pipe:") => FileKind::FilePipe,
            _ if link == "anon_inode:[eventfd]" => FileKind::FileEventfd,
            _ if link == "anon_inode:[timerfd]" => FileKind::FileTimerfd,
            _ if link == "anon_inode:[signalfd]" => FileKind::FileSignalfd,
            _ if link == "anon_inode:[eventpoll]" => FileKind::FileEpoll,
            _ if link == "anon_inode:inotify" => FileKind::FileInotify,
            _ if link == "anon_inode:[pidfd]" || link.starts_with("pidfd:") => FileKind::FilePidfd,
            libc::S_IFSOCK => {
                if !diag.get()?.contains_key(&st.st_ino) {
                    return Err(DumpError::UnsupportedFd {
                        pid,
                        fd,
                        what: "a socket that is not a unix socket (other families are not supported yet)",
                        link,
                    });
                }
                FileKind::FileUnixSocket
            }
            libc::S_IFIFO if link.starts_with('/') && !link.ends_with(" (deleted)") => {
                FileKind::FileFifo
            }
            _ => {
                let what = match fmt {
                    libc::S_IFIFO => "a deleted FIFO (not supported yet)",
                    libc::S_IFSOCK => "a socket (not supported yet)",
                    libc::S_IFBLK => "a block device (not supported yet)",
                    _ if link.starts_with("anon_inode:") => ANON_UNSUPPORTED,
                    _ => "an unsupported kind of file",
                };
                return Err(DumpError::UnsupportedFd {
                    pid,
                    fd,
                    what,
                    link,
                });
            }
        };
        let anon = matches!(
            kind,
            FileKind::FilePipe
                | FileKind::FileUnixSocket
                | FileKind::FileEventfd
                | FileKind::FileTimerfd
                | FileKind::FileSignalfd
                | FileKind::FileEpoll
                | FileKind::FilePidfd
                | FileKind::FileInotify
        );
        let ghost = matches!(kind, FileKind::FileMemfd | FileKind::FileDeleted);
        if !anon && !ghost && (link.ends_with(" (deleted)") || !link.starts_with('/')) {
            // Anonymous inodes of other kinds (some kernels give them a
            // regular file type).
            let what = if link.starts_with("anon_inode:") {
                ANON_UNSUPPORTED
            } else {
                "a deleted file that is not a regular file (not supported yet)"
            };
            return Err(DumpError::UnsupportedFd {
                pid,
                fd,
                what,
                link,
            });
        }
        if ghost && st.st_size as u64 > ghost_limit {
            return Err(DumpError::DeletedFile {
                pid,
                fd,
                link,
                size: st.st_size as u64,
                limit: ghost_limit,
            });
        }
        // A memfd is named by its name, a deleted file by where it was.
        let link = match kind {
            FileKind::FileMemfd | FileKind::FileDeleted => link
                .strip_prefix("/memfd:")
                .unwrap_or(&link)
                .trim_end_matches(" (deleted)")
                .to_string(),
            _ => link,
        };
        let info_path = format!("/proc/{pid}/fdinfo/{fd}");
        let info_text = read(&info_path)?;
        let (pos, flags) = procfmt::parse_fdinfo(&info_text);
        let info = procfmt::parse_status(&info_text);
        let num = |k: &str| info.get(k).and_then(|v| v.trim().parse::<u64>().ok());
        let bad = || DumpError::Parse {
            path: info_path.clone(),
        };
        let eventfd = (kind == FileKind::FileEventfd)
            .then(|| {
                Some(proto::EventfdState {
                    count: num("eventfd-count")?,
                    semaphore: num("eventfd-semaphore").unwrap_or(0) != 0,
                })
            })
            .map(|s| s.ok_or_else(bad))
            .transpose()?;
        let timerfd = (kind == FileKind::FileTimerfd)
            .then(|| {
                Some(proto::TimerfdState {
                    clock_id: num("clockid")? as i32,
                    value_ns: procfmt::parse_timespec_pair(info.get("it_value")?)?,
                    interval_ns: procfmt::parse_timespec_pair(info.get("it_interval")?)?,
                    ticks: num("ticks")?,
                })
            })
            .map(|s| s.ok_or_else(bad))
            .transpose()?;
        let epoll_targets = if kind == FileKind::FileEpoll {
            procfmt::parse_epoll_targets(&info_text)
        } else {
            Vec::new()
        };
        let signalfd = (kind == FileKind::FileSignalfd)
            .then(|| {
                Some(proto::SignalfdState {
                    mask: u64::from_str_radix(info.get("sigmask")?.trim(), 16).ok()?,
                })
            })
            .map(|s| s.ok_or_else(bad))
            .transpose()?;
        let pty = match kind {
            FileKind::FilePtyMaster => {
                let npid = Pid::from_raw(pid);
                let pidfd = match &pidfd {
                    Some(p) => p,
                    None => pidfd.insert(sys::pidfd_open(npid)?),
                };
                let master = sys::pidfd_getfd(pidfd, npid, fd)?;
                Some(crate::files::pty::dump_master(
                    pid,
                    fd,
                    std::os::fd::AsRawFd::as_raw_fd(&master),
                )?)
            }
            FileKind::FilePtySlave => {
                sys::tty::pty_slave_index(st.st_rdev).map(crate::files::pty::slave_state)
            }
            _ => None,
        };
        let id = *next_id;
        *next_id += 1;
        files.push(FileEntry {
            id,
            kind: kind as i32,
            path: link,
            flags: flags & !(libc::O_CLOEXEC as u32),
            pos,
            dev: st.st_dev,
            inode: st.st_ino,
            rdev: st.st_rdev as u32,
            size: st.st_size as u64,
            pipe_data: Vec::new(),
            pipe_size: 0,
            eventfd,
            timerfd,
            signalfd,
            unix: None,
            contents: Vec::new(),
            seals: 0,
            mode: st.st_mode & 0o7777,
            epoll: (kind == FileKind::FileEpoll).then(|| proto::EpollState {
                targets: epoll_targets
                    .iter()
                    .map(|&(tfd, events, data, _)| proto::EpollTarget { tfd, events, data })
                    .collect(),
            }),
            inotify: if kind == FileKind::FileInotify {
                Some(crate::files::inotify::dump(pid, fd, &info_text)?)
            } else {
                None
            },
            pidfd_pid: if kind == FileKind::FilePidfd {
                num("Pid").unwrap_or(0) as u32
            } else {
                0
            },
            pty,
        });
        if kind == FileKind::FileEpoll {
            // Every watched descriptor must still be the file it was added
            // as (the target number is what restore re-adds).
            for &(tfd, _, _, ino) in &epoll_targets {
                let target = std::fs::metadata(format!("/proc/{pid}/fd/{tfd}"))
                    .ok()
                    .map(|m| std::os::unix::fs::MetadataExt::ino(&m));
                if target != Some(ino) {
                    return Err(DumpError::UnsupportedFd {
                        pid,
                        fd,
                        what: "an epoll watching a file whose descriptor was closed or reused (not supported yet)",
                        link: format!("{} (target fd {tfd})", files.last().map(|f: &FileEntry| f.path.clone()).unwrap_or_default()),
                    });
                }
            }
        }
        fd_entries.push(FdEntry {
            fd: fd as u32,
            id,
            cloexec: flags & libc::O_CLOEXEC as u32 != 0,
        });
    }
    Ok((fd_entries, files))
}

/// The descriptors of one process, as collect_fds found them.
struct ProcFds {
    pid: i32,
    fd_entries: Vec<FdEntry>,
    files: Vec<FileEntry>,
}

/// Match pty slaves with the masters of the tree (once every process's
/// descriptors are known: the master may be in another process than the
/// slave). A slave whose master is held outside the tree is the
/// controlling terminal of a --shell-job (it becomes FILE_SHELL_TTY) or is
/// refused; so is a master whose slave is open outside the tree. Returns,
/// for every process whose controlling terminal is a pty of the tree, its
/// index and the terminal's foreground group (0 when that is not a group
/// of the tree's session any more).
fn pair_ptys(
    tree: &Tree,
    procs: &mut [ProcFds],
    shell_job: bool,
) -> Result<std::collections::BTreeMap<i32, (u32, u32)>> {
    use std::collections::{BTreeMap, BTreeSet};
    let index_of = |f: &FileEntry| f.pty.as_ref().map(|p| p.index);
    let is = |f: &FileEntry, k: FileKind| f.kind == k as i32;
    let masters: BTreeSet<u32> = procs
        .iter()
        .flat_map(|p| p.files.iter())
        .filter(|f| is(f, FileKind::FilePtyMaster))
        .filter_map(index_of)
        .collect();
    let stats: BTreeMap<i32, procfmt::Stat> = tree
        .procs
        .iter()
        .filter_map(|p| Some((p.pid, pstree::stat(p.pid)?)))
        .collect();
    for p in procs.iter_mut() {
        let ctty = stats.get(&p.pid).map(|s| s.ctty()).unwrap_or(0);
        let ctty_index = sys::tty::pty_slave_index(ctty).filter(|_| ctty != 0);
        for f in p.files.iter_mut() {
            let Some(index) = index_of(f).filter(|_| is(f, FileKind::FilePtySlave)) else {
                continue;
            };
            if masters.contains(&index) {
                continue;
            }
            let is_ctty = ctty_index == Some(index);
            if shell_job && is_ctty {
                f.kind = FileKind::FileShellTty as i32;
                f.pty = None;
                continue;
            }
            let fd = p
                .fd_entries
                .iter()
                .find(|e| e.id == f.id)
                .map(|e| e.fd as i32)
                .unwrap_or(-1);
            return Err(DumpError::UnsupportedFd {
                pid: p.pid,
                fd,
                what: if is_ctty {
                    "its controlling terminal, a pty whose master is held outside the dumped tree (a shell job: dump it with --shell-job)"
                } else {
                    "the slave of a pseudo-terminal whose master is held outside the dumped tree (not supported)"
                },
                link: f.path.clone(),
            });
        }
    }
    if masters.is_empty() {
        return Ok(BTreeMap::new());
    }
    // A slave open outside the tree would be cut off from its restored
    // master: refused, as for pipes.
    let pids = tree.pids();
    let wanted: BTreeMap<String, u32> = masters
        .iter()
        .map(|&i| (format!("/dev/pts/{i}"), i))
        .collect();
    if let Some((holder, index)) = outside_holder(&pids, |l| wanted.get(l).copied()) {
        let (pid, fd, link) = procs
            .iter()
            .find_map(|p| {
                let f = p
                    .files
                    .iter()
                    .find(|f| is(f, FileKind::FilePtyMaster) && index_of(f) == Some(index))?;
                let e = p.fd_entries.iter().find(|e| e.id == f.id)?;
                Some((p.pid, e.fd as i32, f.path.clone()))
            })
            .unwrap_or_default();
        return Err(DumpError::ExternalPtySlave {
            pid,
            fd,
            link,
            index,
            holder,
        });
    }
    // Controlling terminals. A session's terminal goes back to its leader
    // at restore (TIOCSCTTY) and from it to the members it creates; a
    // member that gave it up (TIOCNOTTY) gives it up again.
    let groups: BTreeSet<(u32, u32)> = stats
        .values()
        .map(|s| (s.pgid, s.sid))
        .chain(tree.zombies.iter().map(|z| (z.stat.pgid, z.stat.sid)))
        .collect();
    let mut out = BTreeMap::new();
    for (&pid, s) in &stats {
        let ctty = s.ctty();
        let Some(index) =
            sys::tty::pty_slave_index(ctty).filter(|i| ctty != 0 && masters.contains(i))
        else {
            continue;
        };
        if !stats.contains_key(&(s.sid as i32)) {
            return Err(DumpError::Session {
                pid,
                what: format!(
                    "has pty {index} of the dumped tree as its controlling terminal, but its session leader {} is not in the tree",
                    s.sid
                ),
            });
        }
        if let Some(ps) = stats.get(&(s.ppid as i32)) {
            if ps.sid == s.sid && ps.ctty() != ctty && s.sid != pid as u32 {
                return Err(DumpError::Session {
                    pid,
                    what: format!(
                        "keeps pty {index} as its controlling terminal, which its parent {} (in the same session) gave up",
                        s.ppid
                    ),
                });
            }
        }
        let pgrp = if s.tpgid > 0 && groups.contains(&(s.tpgid as u32, s.sid)) {
            s.tpgid as u32
        } else {
            0
        };
        out.insert(pid, (index, pgrp));
    }
    Ok(out)
}

/// One open file description of the tree with a descriptor that holds it.
struct OpenFile {
    pid: i32,
    fd: i32,
    entry: FileEntry,
}

/// Descriptors that share one open file description (dup, inherited over
/// fork; kcmp says so) get one file id; pipes and FIFOs get the bytes in
/// flight and their buffer size, read without consuming them. Every task
/// of the tree is stopped. Returns the files table.
fn link_files(
    caps: &mut [Captured],
    ext_unix_sk: bool,
    diag: &mut DiagSnapshot,
) -> Result<Vec<FileEntry>> {
    let mut table: Vec<OpenFile> = Vec::new();
    for c in caps.iter_mut() {
        let files = std::mem::take(&mut c.files);
        for e in c.fd_entries.iter_mut() {
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
                    && sys::kcmp_file(o.pid, c.pid, o.fd, e.fd as i32).unwrap_or(false)
            });
            match same {
                Some(o) => e.id = o.entry.id,
                None => table.push(OpenFile {
                    pid: c.pid,
                    fd: e.fd as i32,
                    entry: f.clone(),
                }),
            }
        }
    }
    let tree: std::collections::BTreeSet<i32> = caps.iter().map(|c| c.pid).collect();
    unix_states(&mut table, ext_unix_sk, diag)?;
    ghost_contents(&mut table)?;
    // An epoll or pidfd is remade by the process that holds it: one
    // shared by several processes is not supported yet.
    for c in caps.iter() {
        for e in &c.fd_entries {
            let Some(o) = table.iter().find(|o| o.entry.id == e.id) else {
                continue;
            };
            let per_task = o.entry.kind == FileKind::FileEpoll as i32
                || o.entry.kind == FileKind::FilePidfd as i32;
            if per_task && o.pid != c.pid {
                return Err(DumpError::UnsupportedFd {
                    pid: c.pid,
                    fd: e.fd as i32,
                    what: "an epoll or pidfd shared with another process (not supported yet)",
                    link: o.entry.path.clone(),
                });
            }
        }
    }
    let mut done: Vec<u64> = Vec::new();
    for i in 0..table.len() {
        let kind = table[i].entry.kind;
        if kind != FileKind::FilePipe as i32 && kind != FileKind::FileFifo as i32 {
            continue;
        }
        let ino = table[i].entry.inode;
        if done.contains(&ino) {
            continue;
        }
        done.push(ino);
        let ends: Vec<u32> = table
            .iter()
            .filter(|o| o.entry.inode == ino && o.entry.kind == kind)
            .map(|o| o.entry.flags & libc::O_ACCMODE as u32)
            .collect();
        let has_read = ends.iter().any(|&a| a != libc::O_WRONLY as u32);
        let has_write = ends.iter().any(|&a| a != libc::O_RDONLY as u32);
        if kind == FileKind::FilePipe as i32 && !(has_read && has_write) {
            let want = format!("pipe:[{ino}]");
            if let Some((holder, ())) = outside_holder(&tree, |l| (l == want).then_some(())) {
                let o = &table[i];
                return Err(DumpError::ExternalPipe {
                    pid: o.pid,
                    fd: o.fd,
                    link: o.entry.path.clone(),
                    holder,
                });
            }
        }
        let (data, size) = pipe_contents(table[i].pid, table[i].fd)?;
        table[i].entry.pipe_data = data;
        table[i].entry.pipe_size = size;
    }
    Ok(table.into_iter().map(|o| o.entry).collect())
}

/// The state and queued messages of every unix socket of the table; a
/// socket whose peer is not in the table (held outside the tree) is
/// refused, and so is a listener with connections waiting to be accepted.
fn unix_states(table: &mut [OpenFile], ext_unix_sk: bool, diag: &mut DiagSnapshot) -> Result<()> {
    use crate::files::unix;
    if !table
        .iter()
        .any(|o| o.entry.kind == FileKind::FileUnixSocket as i32)
    {
        return Ok(());
    }
    let diag = diag.get()?;
    // One pidfd per process, for pidfd_getfd of its sockets.
    let mut pidfds: std::collections::HashMap<i32, std::os::fd::OwnedFd> =
        std::collections::HashMap::new();
    let inodes: std::collections::BTreeSet<u64> = table
        .iter()
        .filter(|o| o.entry.kind == FileKind::FileUnixSocket as i32)
        .map(|o| o.entry.inode)
        .collect();
    for o in table.iter_mut() {
        if o.entry.kind != FileKind::FileUnixSocket as i32 {
            continue;
        }
        let ino = o.entry.inode;
        let info = diag.get(&ino).ok_or(unix::UnixError::Unknown {
            pid: o.pid,
            fd: o.fd,
            ino,
        })?;
        let mut external_peer = Vec::new();
        if info.peer != 0 && !inodes.contains(&info.peer) {
            let name = diag
                .get(&info.peer)
                .map(|p| p.name.clone())
                .unwrap_or_default();
            let dgram = info.kind == libc::SOCK_DGRAM as u32;
            if !ext_unix_sk || !dgram || name.is_empty() || info.rqueue > 0 {
                return Err(DumpError::ExternalUnixPeer {
                    pid: o.pid,
                    fd: o.fd,
                    ino,
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
            external_peer = name;
        }
        if info.state == unix::STATE_LISTEN && info.rqueue > 0 {
            return Err(DumpError::UnsupportedFd {
                pid: o.pid,
                fd: o.fd,
                what:
                    "a listening unix socket with connections not accepted yet (not supported yet)",
                link: o.entry.path.clone(),
            });
        }
        let npid = Pid::from_raw(o.pid);
        let pidfd = match pidfds.entry(o.pid) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(sys::pidfd_open(npid)?),
        };
        let sock = sys::pidfd_getfd(pidfd, npid, o.fd)?;
        let queued = unix::peek_queue(o.pid, o.fd, info, &sock)?;
        let backlog = if info.state == unix::STATE_LISTEN {
            info.wqueue
        } else {
            0
        };
        let mut st = unix::state_of(info, queued, backlog);
        st.external_peer = external_peer;
        o.entry.unix = Some(st);
    }
    Ok(())
}

/// The bytes (and seals) of every memfd and deleted file of the table,
/// read through a new open of the task's descriptor; carried by the first
/// open file of each.
fn ghost_contents(table: &mut [OpenFile]) -> Result<()> {
    let mut seen: Vec<(i32, u64, u64)> = Vec::new();
    for o in table.iter_mut() {
        let k = o.entry.kind;
        if k != FileKind::FileMemfd as i32 && k != FileKind::FileDeleted as i32 {
            continue;
        }
        let key = (k, o.entry.dev, o.entry.inode);
        if seen.contains(&key) {
            continue;
        }
        seen.push(key);
        let path = format!("/proc/{}/fd/{}", o.pid, o.fd);
        let f = std::fs::File::open(&path).map_err(|source| DumpError::Proc {
            path: path.clone(),
            source,
        })?;
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut &f, &mut data)
            .map_err(|source| DumpError::Proc { path, source })?;
        o.entry.size = data.len() as u64;
        o.entry.contents = data;
        if k == FileKind::FileMemfd as i32 {
            // A failure means no seals (not a sealable memfd).
            let seals = nix::fcntl::fcntl(&f, nix::fcntl::FcntlArg::F_GET_SEALS).unwrap_or(0);
            o.entry.seals = seals.max(0) as u32;
        }
    }
    Ok(())
}

/// A process outside `tree` with a descriptor whose /proc link `wanted`
/// accepts, and what `wanted` said of it.
fn outside_holder<T>(
    tree: &std::collections::BTreeSet<i32>,
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

/// The bytes queued in the pipe behind `pid`'s descriptor `fd` and its
/// buffer size, read through a second read end (opened via /proc) with
/// tee(2), which copies them without consuming them.
fn pipe_contents(pid: i32, fd: i32) -> Result<(Vec<u8>, u32)> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag, SpliceFFlags};
    let path = format!("/proc/{pid}/fd/{fd}");
    let err = |what: &str, e: std::io::Error| DumpError::Proc {
        path: format!("{path} ({what})"),
        source: e,
    };
    // A new read end of the same pipe.
    let r = nix::fcntl::open(
        path.as_str(),
        OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| err("opening a read end", e.into()))?;
    let size = fcntl(&r, FcntlArg::F_GETPIPE_SZ).unwrap_or(-1);
    let queued = sys::fs::bytes_queued(&r).unwrap_or(0);
    if size < 0 || queued <= 0 {
        return Ok((Vec::new(), size.max(0) as u32));
    }
    let (sr, sw) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| err("scratch pipe", e.into()))?;
    let _ = fcntl(&sw, FcntlArg::F_SETPIPE_SZ(size));
    // tee copies up to `queued` bytes without consuming them from `r`.
    let n = nix::fcntl::tee(&r, &sw, queued as usize, SpliceFFlags::SPLICE_F_NONBLOCK)
        .map_or(-1, |n| n as isize);
    if n != queued as isize {
        return Err(err(
            "copying the bytes in flight",
            std::io::Error::other(format!("tee copied {n} of {queued} bytes")),
        ));
    }
    drop(sw);
    let mut data = Vec::with_capacity(queued as usize);
    std::io::Read::read_to_end(&mut std::fs::File::from(sr), &mut data)
        .map_err(|e| err("reading the copy", e))?;
    Ok((data, size as u32))
}

/// Whether a character device number is a terminal (a tty of major 4,
/// /dev/tty, /dev/console, /dev/ptmx, or a pty slave).
fn is_terminal(rdev: u64) -> bool {
    let major = libc::major(rdev);
    let minor = libc::minor(rdev);
    matches!(major, 4 | 136..=143) || (major == 5 && minor <= 2)
}

fn check_task(pid: i32) -> Result<procfmt::Stat> {
    let stat_path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&stat_path).map_err(|_| DumpError::NoTask { pid })?;
    let st = procfmt::parse_stat(&text).ok_or(DumpError::Parse { path: stat_path })?;
    if st.state == 'Z' && st.num_threads > 1 {
        return Err(DumpError::ZombieLeader {
            pid,
            threads: st.num_threads,
        });
    }
    // Namespaces come with a later issue: until then the task must share
    // every namespace with cryo, or paths, pids and addresses would be
    // taken from the wrong one.
    for ns in ["mnt", "pid", "net", "uts", "ipc", "user", "cgroup", "time"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).ok();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).ok();
        if theirs.is_some() && theirs != ours {
            return Err(DumpError::Namespace {
                pid,
                ns,
                id: theirs.map(|p| p.display().to_string()).unwrap_or_default(),
            });
        }
    }
    Ok(st)
}

/// A task stopped inside an rseq critical section continues at its abort
/// handler, as the kernel would do on preemption. Returns the rseq_cs
/// pointer to write back (0 once the abort is taken).
fn rseq_fixup(pid: Pid, rseq: &sys::RseqConf, regs: &mut Regs) -> u64 {
    if rseq.ptr == 0 {
        return 0;
    }
    let mut b = [0u8; 8];
    if read_task(pid, rseq.ptr + 8, &mut b).is_err() {
        return 0;
    }
    let rseq_cs = u64::from_ne_bytes(b);
    if rseq_cs != 0 {
        let mut cs = [0u8; 32];
        if read_task(pid, rseq_cs, &mut cs).is_ok() {
            let start_ip = u64::from_ne_bytes(cs[8..16].try_into().unwrap_or_default());
            let post = u64::from_ne_bytes(cs[16..24].try_into().unwrap_or_default());
            let abort = u64::from_ne_bytes(cs[24..32].try_into().unwrap_or_default());
            if regs.rip >= start_ip && regs.rip < start_ip.wrapping_add(post) {
                regs.rip = abort;
                return 0;
            }
        }
    }
    rseq_cs
}

/// Credentials of one thread, from /proc/PID/task/TID/status.
fn thread_creds(status: &std::collections::HashMap<String, String>, securebits: u32) -> Creds {
    let get = |k: &str| status.get(k).cloned().unwrap_or_default();
    Creds {
        uid: procfmt::status_numbers(&get("Uid")),
        gid: procfmt::status_numbers(&get("Gid")),
        groups: procfmt::status_numbers(&get("Groups")),
        cap_inh: procfmt::status_hex(&get("CapInh")),
        cap_prm: procfmt::status_hex(&get("CapPrm")),
        cap_eff: procfmt::status_hex(&get("CapEff")),
        cap_bnd: procfmt::status_hex(&get("CapBnd")),
        cap_amb: procfmt::status_hex(&get("CapAmb")),
        securebits,
        no_new_privs: get("NoNewPrivs") == "1",
    }
}

fn pending(sigs: &[[u8; 128]]) -> Vec<PendingSignal> {
    sigs.iter()
        .map(|s| PendingSignal {
            siginfo: s.to_vec(),
        })
        .collect()
}

/// Everything about a non-leader thread, captured while it is stopped.
fn thread_core(pid: i32, v: &mut Victim, scratch: u64) -> Result<CoreEntry> {
    let tid = v.pid;
    let ts = v.thread_state(scratch)?;
    let status = procfmt::parse_status(&read(&format!("/proc/{pid}/task/{tid}/status"))?);
    let comm = read(&format!("/proc/{pid}/task/{tid}/comm"))?
        .trim_end_matches('\n')
        .to_string();
    let bits = ptrace_bits(tid)?;
    core_of(
        v,
        &ts,
        &bits,
        comm,
        thread_creds(&status, ts.securebits),
        None,
    )
}

/// What ptrace reads of a thread in a ptrace stop (the leader's before its
/// parasite runs).
struct PtraceBits {
    rseq: sys::RseqConf,
    robust: (u64, u64),
    private_sigs: Vec<[u8; 128]>,
}

fn ptrace_bits(tid: Pid) -> Result<PtraceBits> {
    Ok(PtraceBits {
        rseq: sys::rseq_config(tid)?,
        robust: sys::get_robust_list(tid)?,
        private_sigs: sys::peek_siginfo(tid, false)?,
    })
}

/// The core of one stopped thread: what `ts` says (read by the parasite
/// or by syscalls injected into it) and what ptrace reads (registers,
/// XSAVE, mask, rseq, robust list, its own pending signals).
fn core_of(
    v: &Victim,
    ts: &crate::infect::ThreadState,
    bits: &PtraceBits,
    comm: String,
    creds: Creds,
    process: Option<ProcessCore>,
) -> Result<CoreEntry> {
    let tid = v.pid;
    let rseq = &bits.rseq;
    let (robust, robust_len) = bits.robust;
    let private_sigs = &bits.private_sigs;
    let mut regs = *v.regs();
    let rseq_cs = rseq_fixup(tid, rseq, &mut regs);
    Ok(CoreEntry {
        tid: tid.as_raw() as u32,
        regs: Some(gpregs(&regs)),
        xsave: v.xstate().to_vec(),
        blocked: v.sigmask(),
        altstack: Some(SigaltStack {
            sp: ts.altstack.sp,
            flags: ts.altstack.flags as u32,
            size: ts.altstack.size,
        }),
        clear_child_tid: ts.tid_address,
        robust_list: robust,
        robust_list_len: robust_len,
        rseq: (rseq.ptr != 0).then_some(proto::Rseq {
            ptr: rseq.ptr,
            len: rseq.len,
            sig: rseq.sig,
            rseq_cs,
        }),
        comm,
        pending: pending(private_sigs),
        creds: Some(creds),
        process,
        pdeath_signal: ts.pdeath_signal,
    })
}

fn gpregs(r: &Regs) -> GpRegs {
    GpRegs {
        r15: r.r15,
        r14: r.r14,
        r13: r.r13,
        r12: r.r12,
        rbp: r.rbp,
        rbx: r.rbx,
        r11: r.r11,
        r10: r.r10,
        r9: r.r9,
        r8: r.r8,
        rax: r.rax,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        orig_rax: r.orig_rax,
        rip: r.rip,
        cs: r.cs,
        eflags: r.eflags,
        rsp: r.rsp,
        ss: r.ss,
        fs_base: r.fs_base,
        gs_base: r.gs_base,
        ds: r.ds,
        es: r.es,
        fs: r.fs,
        gs: r.gs,
    }
}

fn private_kind(kind: i32) -> bool {
    [
        VmaKind::VmaAnonPrivate,
        VmaKind::VmaHeap,
        VmaKind::VmaStack,
        VmaKind::VmaFilePrivate,
    ]
    .iter()
    .any(|k| *k as i32 == kind)
}

/// Split the private-memory runs of `pid` into the pages it still shares
/// copy-on-write with its parent `ppid` (the same physical page at the
/// same address, from both /proc/PID/pagemap, which shows frame numbers to
/// CAP_SYS_ADMIN: without it nothing is shared) and the rest. Both tasks
/// are stopped.
fn split_cow(
    pid: i32,
    ppid: i32,
    runs: Vec<mem::Run>,
    vmas: &[proto::Vma],
    pvmas: &[proto::Vma],
) -> Result<(Vec<mem::Run>, Vec<proto::PagemapEntry>)> {
    use std::os::unix::fs::FileExt;
    let open = |p: i32| {
        let path = format!("/proc/{p}/pagemap");
        std::fs::File::open(&path).map_err(|source| DumpError::Proc { path, source })
    };
    let (mine, theirs) = (open(pid)?, open(ppid)?);
    const PRESENT: u64 = 1 << 63;
    const PFN: u64 = (1 << 55) - 1;
    let mut kept = Vec::with_capacity(runs.len());
    let mut in_parent: Vec<proto::PagemapEntry> = Vec::new();
    let mut a = Vec::new();
    let mut b = Vec::new();
    for r in runs {
        let end = r.start + r.pages * mem::PAGE;
        let mine_private = vmas
            .iter()
            .any(|v| v.start <= r.start && end <= v.end && private_kind(v.kind));
        let theirs_private = pvmas
            .iter()
            .any(|v| v.start <= r.start && end <= v.end && private_kind(v.kind));
        if !mine_private || !theirs_private {
            kept.push(r);
            continue;
        }
        let n = r.pages as usize;
        a.resize(n * 8, 0);
        b.resize(n * 8, 0);
        let off = r.start / mem::PAGE * 8;
        let read = |f: &std::fs::File, buf: &mut [u8], p: i32| {
            f.read_exact_at(buf, off).map_err(|source| DumpError::Proc {
                path: format!("/proc/{p}/pagemap"),
                source,
            })
        };
        read(&mine, &mut a, pid)?;
        read(&theirs, &mut b, ppid)?;
        let word = |buf: &[u8], i: usize| {
            u64::from_ne_bytes(buf[i * 8..i * 8 + 8].try_into().unwrap_or_default())
        };
        let mut i = 0;
        while i < n {
            let same = |i: usize| {
                let (x, y) = (word(&a, i), word(&b, i));
                x & PRESENT != 0 && y & PRESENT != 0 && x & PFN != 0 && x & PFN == y & PFN
            };
            let s = same(i);
            let mut j = i + 1;
            while j < n && same(j) == s {
                j += 1;
            }
            let start = r.start + i as u64 * mem::PAGE;
            let pages = (j - i) as u64;
            if s {
                in_parent.push(proto::PagemapEntry {
                    vaddr: start,
                    nr_pages: pages as u32,
                    flags: cryo_image::PAGE_IN_PARENT,
                });
            } else {
                kept.push(mem::Run {
                    start,
                    pages,
                    zero_ok: r.zero_ok,
                });
            }
            i = j;
        }
    }
    Ok((kept, in_parent))
}

/// The ranges of each shared anonymous object (by shmem inode) whose pages
/// a process captured earlier already stored.
type SharedStored = std::collections::HashMap<u64, Vec<(u64, u64)>>;

/// Everything captured from one process while the tree is stopped; the
/// image files are written from it once every process is captured (and,
/// with --leave-running, once the tree runs again).
struct Captured {
    pid: i32,
    pstree: PstreeEntry,
    core: CoreEntry,
    thread_cores: Vec<CoreEntry>,
    mm: MmEntry,
    fd_entries: Vec<FdEntry>,
    files: Vec<FileEntry>,
    runs: Vec<proto::PagemapEntry>,
    pstats: TransferStats,
    pw: PageWriter,
    /// Pages went raw into a scratch file, to compress afterwards.
    scratch: Option<String>,
    /// --leave-running: private anonymous memory write-protected, to be
    /// copied once the task runs again.
    snapshot: Option<Snapshot>,
    /// --pre-copy: the chunks written before the stop that are kept.
    kept: Option<crate::mem::precopy::Kept>,
}

/// Capture process `p` (stopped, with every thread): /proc state, the
/// parasite's view, per-thread state and its pages; its descriptors were
/// collected (and pty pairs matched) before.
// What a process brings to its capture is all different: one argument
// each reads better than a bag of them.
#[allow(clippy::too_many_arguments)]
fn capture(
    opts: &DumpOptions,
    p: &mut Seized,
    guard: &Guard,
    (fd_entries, files): (Vec<FdEntry>, Vec<FileEntry>),
    shared: &mut SharedStored,
    parent: Option<(i32, &[proto::Vma])>,
    mut precopy: Option<PreCopy>,
    use_snapshot: bool,
    progress: &dyn Fn(u64, u64),
) -> Result<Captured> {
    let pid = p.pid;
    let npid = Pid::from_raw(pid);
    let victim = &mut p.leader;
    let frozen_at = Instant::now();
    // Re-check under the freeze: the task cannot change any more.
    let stat = check_task(pid)?;
    let status = procfmt::parse_status(&read(&format!("/proc/{pid}/status"))?);
    let timers = procfmt::parse_timers(
        &std::fs::read_to_string(format!("/proc/{pid}/timers")).unwrap_or_default(),
    );
    if timers.len() > cryo_parasite::MAX_TIMERS {
        return Err(DumpError::TooManyTimers {
            pid,
            n: timers.len(),
            max: cryo_parasite::MAX_TIMERS,
        });
    }
    tracing::debug!(
        pid,
        ms = frozen_at.elapsed().as_secs_f64() * 1e3,
        "task state and descriptors read"
    );
    let vmas = mem::read_layout(npid)?;
    // --leave-running: private anonymous memory is registered with a
    // userfaultfd (under the task's mmap write lock, so before the walks
    // below), write-protected once its pages are known, and copied after
    // the task runs again.
    let mut snapshot = if opts.leave_running && use_snapshot {
        Snapshot::register(victim, &vmas)?
    } else {
        None
    };
    // smaps (for VmFlags) walks every page table: it is read on another
    // thread while the pages are found and protected from the layout
    // /proc/PID/maps gave, which it must match.
    let smaps = std::thread::spawn(move || mem::read_vmas(npid));
    tracing::debug!(
        pid,
        ms = frozen_at.elapsed().as_secs_f64() * 1e3,
        "mappings read"
    );
    let mut runs = mem::page_runs(npid, &vmas)?;
    tracing::debug!(
        pid,
        ms = frozen_at.elapsed().as_secs_f64() * 1e3,
        "pages found"
    );
    // Shared anonymous memory is one object however many processes map
    // it: its pages are stored by the first process that maps them.
    for v in vmas
        .iter()
        .filter(|v| v.kind == VmaKind::VmaAnonShared as i32)
    {
        let range = (v.pgoff, v.pgoff + (v.end - v.start));
        let stored = shared.entry(v.shmid).or_default();
        if stored.iter().any(|r| r.0 <= range.0 && range.1 <= r.1) {
            runs.retain(|r| r.start < v.start || r.start >= v.end);
        } else {
            stored.push(range);
        }
    }
    // Pages still shared copy-on-write with the parent are its pages.
    let in_parent = match parent {
        Some((ppid, pvmas)) => {
            let (kept, inp) = split_cow(pid, ppid, runs, &vmas, pvmas)?;
            runs = kept;
            inp
        }
        None => Vec::new(),
    };
    let shared_sigs = sys::peek_siginfo(npid, true)?;
    // Read with ptrace while the leader is stopped, before its parasite runs.
    let leader_bits = ptrace_bits(npid)?;
    if let Some(snap) = snapshot.as_mut() {
        snap.protect(&mut runs)?;
    }
    // --pre-copy: pages copied before the stop and not written since are
    // already in the pages file.
    let (kept, breaks) = match precopy.as_mut() {
        Some(pc) => {
            let (kept, breaks) = pc.keep(&vmas, &mut runs)?;
            tracing::debug!(
                pid,
                pages = kept.stats.pages_precopied,
                ms = frozen_at.elapsed().as_secs_f64() * 1e3,
                "pre-copied pages kept"
            );
            (Some(kept), breaks)
        }
        None => (None, Vec::new()),
    };
    // Before the parasite maps its area.
    let vmas = {
        let full = smaps.join().map_err(|_| DumpError::Parse {
            path: format!("/proc/{pid}/smaps"),
        })??;
        if !mem::same_layout(&full, &vmas) {
            return Err(DumpError::Parse {
                path: format!("/proc/{pid}/smaps (its mappings differ from /proc/{pid}/maps)"),
            });
        }
        full
    };
    tracing::debug!(
        pid,
        ms = frozen_at.elapsed().as_secs_f64() * 1e3,
        "collected /proc state, mappings and pages to dump"
    );
    let started = victim.start_parasite();
    if let Some(area) = victim.area() {
        guard.arm(npid, area);
    }
    if let Some(done) = victim.parasite_done_addr() {
        guard.arm_done(npid, done);
    }
    started?;
    fault("in-parasite")?;
    let timer_ids: Vec<i32> = timers.iter().map(|t| t.id).collect();
    let st = victim.state(&timer_ids)?;
    // The other threads' own state, by syscalls injected into each; they
    // write into the parasite's area.
    let scratch_mem = victim
        .thread_scratch()
        .ok_or(DumpError::Infect(InfectError::Channel {
            pid,
            what: "parasite area",
            errno: nix::errno::Errno::EFAULT,
        }))?;
    let mut thread_cores = Vec::with_capacity(p.threads.len());
    for t in p.threads.iter_mut() {
        thread_cores.push(thread_core(pid, t, scratch_mem)?);
    }
    let victim = &mut p.leader;

    // Pages of mappings the task cannot read are made readable while the
    // parasite splices them, then put back.
    let unreadable: Vec<(u32, cryo_parasite::Iov)> = vmas
        .iter()
        .filter(|v| {
            v.prot & libc::PROT_READ as u32 == 0
                && runs.iter().any(|r| r.start >= v.start && r.start < v.end)
        })
        .map(|v| {
            (
                v.prot,
                cryo_parasite::Iov {
                    base: v.start,
                    len: v.end - v.start,
                },
            )
        })
        .collect();
    for (prot, iov) in &unreadable {
        victim.mprotect(prot | libc::PROT_READ as u32, std::slice::from_ref(iov))?;
    }
    let raw = opts.compression == Compression::None;
    let pages_name = cryo_image::pages_file(pid as u32);
    // With --leave-running, pages are spliced raw into a scratch file while
    // the task is stopped (no copy through cryo) and compressed once it
    // runs again, so it is stopped only for the capture.
    // A pre-copied process goes on in the pages file the pre-copy wrote.
    let precopy_pw = precopy.as_mut().and_then(|pc| pc.writer());
    let capture_raw = raw || (opts.leave_running && precopy_pw.is_none());
    let scratch = (precopy_pw.is_none() && capture_raw && (!raw || snapshot.is_some()))
        .then(|| format!("{pages_name}.tmp"));
    let mut pw = match precopy_pw {
        Some(pw) => pw,
        None => PageWriter::create(
            &opts.dir,
            scratch.as_deref().unwrap_or(&pages_name),
            if capture_raw {
                Compression::None
            } else {
                opts.compression
            },
            opts.zstd_level,
            opts.threads,
        )?,
    };
    let total_bytes: u64 = runs.iter().map(|r| r.pages * mem::PAGE).sum();
    let (mut entries, mut pstats) =
        transfer::transfer(victim, &runs, &breaks, &mut pw, capture_raw, &|done| {
            progress(done, total_bytes)
        })?;
    if let Some(k) = &kept {
        pstats.add(&k.stats);
    }
    if !in_parent.is_empty() {
        entries.extend(in_parent);
        entries.sort_by_key(|e| e.vaddr);
    }
    tracing::debug!(
        pid,
        ms = frozen_at.elapsed().as_secs_f64() * 1e3,
        "pages captured"
    );
    for (prot, iov) in &unreadable {
        victim.mprotect(*prot, std::slice::from_ref(iov))?;
    }
    fault("after-parasite")?;
    // A failure in one process of the tree, the ones before it captured.
    fault(&format!("capture-{pid}"))?;

    // mm
    let auxv_bytes =
        std::fs::read(format!("/proc/{pid}/auxv")).map_err(|source| DumpError::Proc {
            path: format!("/proc/{pid}/auxv"),
            source,
        })?;
    let auxv: Vec<u64> = auxv_bytes
        .chunks_exact(8)
        .map(|c| u64::from_ne_bytes(c.try_into().unwrap_or_default()))
        .collect();
    let mm = MmEntry {
        start_code: stat.start_code,
        end_code: stat.end_code,
        start_data: stat.start_data,
        end_data: stat.end_data,
        start_brk: stat.start_brk,
        brk: st.brk,
        start_stack: stat.start_stack,
        arg_start: stat.arg_start,
        arg_end: stat.arg_end,
        env_start: stat.env_start,
        env_end: stat.env_end,
        auxv,
        exe_path: readlink(&format!("/proc/{pid}/exe"))?,
        vmas,
        thp_disabled: false,
    };

    let sigactions = (1..=cryo_parasite::NSIG)
        .filter(|&s| s != 9 && s != 19)
        .map(|s| {
            let a = &st.sigactions[s - 1];
            SigAction {
                signo: s as u32,
                handler: a.handler,
                flags: a.flags,
                restorer: a.restorer,
                mask: a.mask,
            }
        })
        .collect();
    let itimers = st
        .itimers
        .iter()
        .enumerate()
        .map(|(i, t)| Itimer {
            which: i as u32,
            interval_us: (t.interval_sec as u64) * 1_000_000 + t.interval_usec as u64,
            value_us: (t.value_sec as u64) * 1_000_000 + t.value_usec as u64,
        })
        .collect();
    let posix_timers = timers
        .iter()
        .zip(st.timers.iter())
        .map(|(t, s)| PosixTimer {
            id: t.id,
            clock_id: t.clock_id,
            notify: t.notify,
            signo: t.signo,
            sigev_value: t.sigev_value,
            notify_tid: t.notify_tid,
            interval_ns: (s.spec.interval_sec as u64) * 1_000_000_000 + s.spec.interval_nsec as u64,
            value_ns: (s.spec.value_sec as u64) * 1_000_000_000 + s.spec.value_nsec as u64,
            overrun: s.overrun,
        })
        .collect();
    // /proc/PID/limits rather than prlimit64: reading another user's
    // limits with prlimit64 needs CAP_SYS_RESOURCE, which root lacks here.
    let limits_path = format!("/proc/{pid}/limits");
    let rlimits: Vec<Rlimit> = procfmt::parse_limits(&read(&limits_path)?)
        .ok_or(DumpError::Parse { path: limits_path })?
        .into_iter()
        .enumerate()
        .map(|(i, (cur, max))| Rlimit {
            resource: i as u32,
            cur,
            max,
        })
        .collect();
    let get = |k: &str| status.get(k).cloned().unwrap_or_default();
    let creds = thread_creds(&status, st.securebits as u32);
    let personality =
        u32::from_str_radix(read(&format!("/proc/{pid}/personality"))?.trim(), 16).unwrap_or(0);
    let process = ProcessCore {
        personality,
        umask: u32::from_str_radix(&get("Umask"), 8).unwrap_or(0o022),
        sigactions,
        itimers,
        posix_timers,
        rlimits,
        shared_pending: pending(&shared_sigs),
        cwd: readlink(&format!("/proc/{pid}/cwd"))?,
        root: readlink(&format!("/proc/{pid}/root"))?,
        child_subreaper: st.child_subreaper != 0,
        dumpable: st.dumpable as u32,
        pdeath_signal: st.pdeath_signal as u32,
        cgroups: crate::cgroup::parse_membership(&read(&format!("/proc/{pid}/cgroup"))?),
        namespaces: namespaces(pid),
    };
    let leader_state = crate::infect::ThreadState {
        altstack: st.altstack,
        tid_address: st.tid_address,
        securebits: st.securebits as u32,
        pdeath_signal: st.pdeath_signal as u32,
    };
    let core = core_of(
        victim,
        &leader_state,
        &leader_bits,
        stat.comm.clone(),
        creds,
        Some(process),
    )?;
    let pstree = PstreeEntry {
        pid: pid as u32,
        ppid: stat.ppid,
        pgid: stat.pgid,
        sid: stat.sid,
        threads: std::iter::once(pid as u32)
            .chain(thread_cores.iter().map(|c| c.tid))
            .collect(),
        cmdline: cmdline(pid),
        zombie: false,
        exit_status: 0,
        exit_signal: stat.exit_signal,
        tty_foreground: opts.shell_job && stat.tty_nr != 0 && stat.tpgid == stat.pgid as i32,
        // Set by dump() from pair_ptys.
        pty_ctty: None,
        tty_pgrp: 0,
    };
    Ok(Captured {
        pid,
        pstree,
        core,
        thread_cores,
        mm,
        fd_entries,
        files,
        runs: entries,
        pstats,
        pw,
        scratch,
        snapshot,
        kept,
    })
}

/// The namespaces of `pid`, from the inodes of /proc/PID/ns/*.
fn namespaces(pid: i32) -> Vec<proto::NamespaceId> {
    ["cgroup", "ipc", "mnt", "net", "pid", "time", "user", "uts"]
        .iter()
        .filter_map(|kind| {
            let link = std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).ok()?;
            let l = link.to_string_lossy();
            let inode = l.split_once(":[")?.1.strip_suffix(']')?.parse().ok()?;
            Some(proto::NamespaceId {
                kind: kind.to_string(),
                inode,
            })
        })
        .collect()
}

fn cmdline(pid: i32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// Write the image files of one captured process (compressing its
/// scratch pages first if the capture was raw).
fn write_process(
    opts: &DumpOptions,
    mut c: Captured,
) -> Result<(Vec<ImageFileInfo>, TransferStats)> {
    let pid = c.pid;
    let mut pw = c.pw;
    let pages_name = cryo_image::pages_file(pid as u32);
    if let Some(scratch) = &c.scratch {
        let (scratch_chunks, _) = pw.finish()?;
        pw = match &c.snapshot {
            // The pages captured while stopped and the tracked ones, read
            // from the running task now, in address order.
            Some(snap) => {
                let (reader, mut out) = reopen_scratch(opts, scratch, &pages_name, scratch_chunks)?;
                let (runs, stats) = snap.copy(&reader, &c.runs, &mut out)?;
                c.runs = runs;
                c.pstats.add(&stats);
                remove_scratch(opts, scratch)?;
                out
            }
            None => recompress(opts, scratch, &pages_name, scratch_chunks)?,
        };
    }
    // The task's memory is copied: stop tracking it.
    drop(c.snapshot.take());
    let mut written: Vec<ImageFileInfo> = Vec::new();
    // Pages: the writer finishes in the background of the drain; collect.
    let (mut chunks, pages_info) = pw.finish()?;
    written.push(pages_info);
    if let Some(k) = &c.kept {
        let (runs, used) = k.order(pid, std::mem::take(&mut c.runs), chunks)?;
        c.runs = runs;
        chunks = used;
    }
    let mut w = ImageWriter::create(
        &opts.dir,
        &cryo_image::pagemap_file(pid as u32),
        Kind::Pagemap,
    )?;
    w.write(&PagemapHead {
        pages_file: cryo_image::pages_file(pid as u32),
        compression: opts.compression as i32,
        total_pages: c.pstats.pages_stored,
    })?;
    for e in c.runs {
        w.write(&PagemapRecord {
            record: Some(proto::pagemap_record::Record::Run(e)),
        })?;
    }
    for ch in chunks {
        w.write(&PagemapRecord {
            record: Some(proto::pagemap_record::Record::Chunk(ch)),
        })?;
    }
    written.push(w.finish()?);
    written.push(cryo_image::write_one(
        &opts.dir,
        &cryo_image::mm_file(pid as u32),
        Kind::Mm,
        &c.mm,
    )?);
    for core in std::iter::once(&c.core).chain(c.thread_cores.iter()) {
        written.push(cryo_image::write_one(
            &opts.dir,
            &cryo_image::core_file(core.tid),
            Kind::Core,
            core,
        )?);
    }
    let mut w = ImageWriter::create(
        &opts.dir,
        &cryo_image::fdinfo_file(pid as u32),
        Kind::Fdinfo,
    )?;
    for e in &c.fd_entries {
        w.write(e)?;
    }
    written.push(w.finish()?);
    Ok((written, c.pstats))
}

/// Refuse session and process-group layouts the restore cannot rebuild,
/// naming the task: every process must either lead its session, share its
/// parent's, or belong to a session whose leader has exited (rebuilt with
/// a helper task); likewise for process groups within the session.
fn check_sessions(tree: &Tree) -> Result<()> {
    let pids = tree.pids();
    let info: std::collections::BTreeMap<i32, (u32, u32, u32)> = tree
        .procs
        .iter()
        .map(|p| p.pid)
        .filter_map(|pid| pstree::stat(pid).map(|s| (pid, (s.ppid, s.pgid, s.sid))))
        .chain(
            tree.zombies
                .iter()
                .map(|z| (z.pid, (z.stat.ppid, z.stat.pgid, z.stat.sid))),
        )
        .collect();
    let dead = |id: u32| !pids.contains(&(id as i32)) && pstree::stat(id as i32).is_none();
    for (&pid, &(ppid, pgid, sid)) in &info {
        let Some(&(_, ppgid, psid)) = info.get(&(ppid as i32)) else {
            continue; // a root: it joins the restorer's session
        };
        let sid_ok = sid == pid as u32 || sid == psid || dead(sid);
        if !sid_ok {
            return Err(DumpError::Session {
                pid,
                what: format!(
                    "is in session {sid}, which is neither its own, its parent's ({psid}) nor one whose leader has exited"
                ),
            });
        }
        let group_ok = pgid == pid as u32
            || pgid == ppgid
            || dead(pgid)
            || info
                .get(&(pgid as i32))
                .is_some_and(|&(_, _, gsid)| gsid == sid);
        if !group_ok {
            return Err(DumpError::Session {
                pid,
                what: format!("is in process group {pgid}, which is not in its session"),
            });
        }
    }
    Ok(())
}

/// The processes of a cgroup whose parent is not in it: the roots of the
/// trees to dump, ascending.
/// --pre-copy: track and copy every process of the trees under `roots`
/// while they run, round after round while what they write in between
/// shrinks. Processes started later are captured whole at the stop.
fn pre_copy(opts: &DumpOptions, roots: &[i32], guard: &Guard) -> Result<HashMap<i32, PreCopy>> {
    const MAX_ROUNDS: u32 = 5;
    /// Few enough pages written to stop the rounds.
    const SETTLED: u64 = 256;
    let mut pids = Vec::new();
    let mut todo = roots.to_vec();
    while let Some(p) = todo.pop() {
        if !pids.contains(&p) {
            pids.push(p);
            todo.extend(pstree::children(p));
        }
    }
    let t0 = Instant::now();
    let mut out = HashMap::new();
    for p in pids {
        // Zombies have no memory left.
        if pstree::stat(p).is_none_or(|s| s.state == 'Z') {
            continue;
        }
        match PreCopy::start(
            p,
            guard,
            &opts.dir,
            opts.compression,
            opts.zstd_level,
            opts.threads,
        ) {
            Ok(Some(pc)) => {
                out.insert(p, pc);
            }
            Ok(None) => {}
            // Gone meanwhile: the seize finds out again.
            Err(_) if pstree::stat(p).is_none() => {}
            Err(e) => return Err(e.into()),
        }
    }
    let mut last = u64::MAX;
    for round in 0..MAX_ROUNDS {
        let mut copied = 0;
        let mut gone = Vec::new();
        for (&p, pc) in out.iter_mut() {
            match pc.round() {
                Ok(n) => copied += n,
                // Ending meanwhile (ESRCH before it is even a zombie), or
                // anything else: it is dumped without a pre-copy, and the
                // seize sees what became of it. The task was not touched.
                Err(e) => {
                    tracing::info!(pid = p, "pre-copy given up: {e}");
                    gone.push(p);
                }
            }
        }
        for p in gone {
            if let Some(pc) = out.remove(&p) {
                pc.discard(&opts.dir);
            }
        }
        tracing::debug!(
            round,
            copied,
            ms = t0.elapsed().as_secs_f64() * 1e3,
            "pre-copy"
        );
        if round > 0 && (copied <= SETTLED || copied >= last) {
            break;
        }
        last = copied;
    }
    fault("after-precopy")?;
    Ok(out)
}

fn cgroup_roots(dir: &Path) -> Result<Vec<i32>> {
    let procs: std::collections::BTreeSet<i32> = crate::freeze::procs(dir)?.into_iter().collect();
    let roots: Vec<i32> = procs
        .iter()
        .copied()
        .filter(|&p| pstree::stat(p).is_some_and(|s| !procs.contains(&(s.ppid as i32))))
        .collect();
    if roots.is_empty() {
        return Err(DumpError::EmptyCgroup {
            cgroup: dir.to_path_buf(),
        });
    }
    Ok(roots)
}

/// Dump the process tree under `opts.pid`. On any error every task is left
/// running as before.
pub fn dump(opts: &DumpOptions, progress: &dyn Fn(u64, u64)) -> Result<DumpStats> {
    match dump_once(opts, progress, true) {
        // A leave-running copy the task's own munmap/madvise/mremap made
        // impossible (it ran on untouched): once more, with its memory
        // copied while it is stopped.
        Err(DumpError::Snapshot(crate::mem::snapshot::SnapshotError::MapChanged { pid, what })) => {
            tracing::warn!(
                pid,
                "{what}: dumping again, copying its memory while it is stopped"
            );
            remove_partial(&opts.dir);
            dump_once(opts, progress, false)
        }
        r => r,
    }
}

/// One dump; `snapshot`: with --leave-running, copy private memory after
/// the resume under write-protection.
fn dump_once(opts: &DumpOptions, progress: &dyn Fn(u64, u64), snapshot: bool) -> Result<DumpStats> {
    let t0 = Instant::now();
    let pid = opts.pid;
    std::fs::create_dir_all(&opts.dir).map_err(|source| DumpError::Dir {
        path: opts.dir.clone(),
        source,
    })?;
    let freeze_cgroup = opts.cgroup.as_ref().or(opts.freeze_cgroup.as_ref());
    let roots = match &opts.cgroup {
        Some(dir) => cgroup_roots(dir)?,
        None => vec![pid],
    };
    let pid = roots[0];
    if pstree::stat(pid).is_none() {
        return Err(DumpError::NoTask { pid });
    }

    // The guardian cleans up after us if we die while a parasite runs.
    // Declared before the victims so it is dismissed after the cure.
    if opts.pre_copy && opts.leave_running {
        return Err(DumpError::PreCopyLeaveRunning);
    }
    let guard = Guard::spawn(Pid::from_raw(pid))?;
    let mut precopies = if opts.pre_copy {
        pre_copy(opts, &roots, &guard)?
    } else {
        HashMap::new()
    };
    // A task is checked before it is seized, while it still runs: each
    // check takes its own sock_diag snapshot.
    let check = |p: i32| -> Result<()> {
        check_task(p)?;
        collect_fds(
            p,
            &mut 1,
            opts.ghost_limit,
            opts.shell_job,
            &mut DiagSnapshot::default(),
        )?;
        Ok(())
    };
    let mut tree = pstree::seize_tree(&roots, freeze_cgroup.map(|p| p.as_path()), &guard, &check)?;
    let frozen_at = Instant::now();
    fault("after-seize")?;
    check_sessions(&tree)?;
    tracing::debug!(
        processes = tree.procs.len(),
        zombies = tree.zombies.len(),
        ms = frozen_at.elapsed().as_secs_f64() * 1e3,
        "tree seized"
    );
    // Descriptors of every process first (the tree is stopped): a pty
    // slave is matched with a master of any process of the tree.
    // One sock_diag snapshot tells the sockets of every process; the
    // states and queues are read from a second one after the capture
    // (a peer outside the tree, with --ext-unix-sk, kept running).
    let mut file_ids = 1u32;
    let mut diag = DiagSnapshot::default();
    let mut fds = Vec::with_capacity(tree.procs.len());
    for p in &tree.procs {
        let (fd_entries, files) = collect_fds(
            p.pid,
            &mut file_ids,
            opts.ghost_limit,
            opts.shell_job,
            &mut diag,
        )?;
        fds.push(ProcFds {
            pid: p.pid,
            fd_entries,
            files,
        });
    }
    let cttys = pair_ptys(&tree, &mut fds, opts.shell_job)?;
    let mut shared = SharedStored::new();
    let mut caps = Vec::with_capacity(tree.procs.len());
    for (p, pf) in tree.procs.iter_mut().zip(fds) {
        let ppid = pstree::stat(p.pid).map(|s| s.ppid as i32).unwrap_or(0);
        let parent = caps
            .iter()
            .find(|c: &&Captured| c.pid == ppid)
            .map(|c| (ppid, c.mm.vmas.as_slice()));
        let mut c = capture(
            opts,
            p,
            &guard,
            (pf.fd_entries, pf.files),
            &mut shared,
            parent,
            precopies.remove(&p.pid),
            snapshot,
            progress,
        )?;
        if let Some(&(index, pgrp)) = cttys.get(&c.pid) {
            c.pstree.pty_ctty = Some(index);
            c.pstree.tty_pgrp = pgrp;
            // That terminal is the tree's own, not a shell's.
            c.pstree.tty_foreground = false;
        }
        caps.push(c);
    }
    // Processes pre-copied that were gone by the stop: no pages file.
    for (_, pc) in precopies.drain() {
        pc.discard(&opts.dir);
    }
    // Open file descriptions and pipe contents, while all is stopped.
    let files = link_files(&mut caps, opts.ext_unix_sk, &mut DiagSnapshot::default())?;
    // Everything is captured: a leave-running tree goes on from here.
    let mut frozen = frozen_at.elapsed();
    if opts.leave_running {
        for p in tree.procs.iter_mut() {
            p.leader.cure()?;
            guard.release(p.leader.pid);
            for t in p.threads.iter_mut() {
                t.cure()?;
                guard.release(t.pid);
            }
        }
        frozen = frozen_at.elapsed();
    }

    let mut written: Vec<ImageFileInfo> = Vec::new();
    let mut entries: Vec<PstreeEntry> = Vec::new();
    let mut pstats = TransferStats::default();
    for mut c in caps {
        entries.push(std::mem::take(&mut c.pstree));
        let (files, stats) = write_process(opts, c)?;
        pstats.add(&stats);
        written.extend(files);
    }
    for z in &tree.zombies {
        entries.push(PstreeEntry {
            pid: z.pid as u32,
            ppid: z.stat.ppid,
            pgid: z.stat.pgid,
            sid: z.stat.sid,
            threads: vec![z.pid as u32],
            cmdline: Vec::new(),
            zombie: true,
            exit_status: z.stat.exit_code,
            exit_signal: z.stat.exit_signal,
            tty_foreground: false,
            pty_ctty: None,
            tty_pgrp: 0,
        });
    }
    {
        let mut w = ImageWriter::create(&opts.dir, cryo_image::PSTREE_FILE, Kind::Pstree)?;
        for e in &entries {
            w.write(e)?;
        }
        written.push(w.finish()?);
        let mut w = ImageWriter::create(&opts.dir, cryo_image::FILES_FILE, Kind::Files)?;
        for f in &files {
            w.write(f)?;
        }
        written.push(w.finish()?);
    }
    let image_bytes = written.iter().map(|f| f.size).sum();
    let inv = Inventory {
        format_major: cryo_image::FORMAT_MAJOR,
        format_minor: cryo_image::FORMAT_MINOR,
        producer: format!("cryo {}", env!("CARGO_PKG_VERSION")),
        created_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        root_pid: pid as u32,
        files: written.into_iter().map(Into::into).collect(),
        kernel_release: nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
        leave_running: opts.leave_running,
    };
    cryo_image::write_inventory(&opts.dir, &inv)?;

    if !opts.leave_running {
        for p in tree.procs.iter_mut() {
            p.leader.send_kill()?;
        }
        for p in tree.procs.iter_mut() {
            for t in p.threads.iter_mut() {
                t.reap_killed()?;
            }
            p.leader.reap_killed()?;
        }
        frozen = frozen_at.elapsed();
    }
    Ok(DumpStats {
        root: pid,
        processes: tree.procs.len() + tree.zombies.len(),
        pages: pstats,
        frozen,
        total: t0.elapsed(),
        image_bytes,
    })
}

/// The raw scratch pages file, to read, and the real pages file, to write.
fn reopen_scratch(
    opts: &DumpOptions,
    scratch: &str,
    pages: &str,
    chunks: Vec<proto::PageChunk>,
) -> Result<(cryo_image::PageReader, PageWriter)> {
    let reader = cryo_image::PageReader::open(&opts.dir, scratch, Compression::None, chunks)?;
    let pw = PageWriter::create(
        &opts.dir,
        pages,
        opts.compression,
        opts.zstd_level,
        opts.threads,
    )?;
    Ok((reader, pw))
}

/// Compress the raw scratch pages file into the real one, chunk by chunk,
/// and remove it.
fn recompress(
    opts: &DumpOptions,
    scratch: &str,
    pages: &str,
    chunks: Vec<proto::PageChunk>,
) -> Result<PageWriter> {
    let (reader, mut pw) = reopen_scratch(opts, scratch, pages, chunks)?;
    for i in 0..reader.chunks().len() {
        let mut buf = pw.take_buffer();
        buf.resize(reader.chunks()[i].nr_pages as usize * mem::PAGE as usize, 0);
        reader.read_chunk(i, &mut buf)?;
        pw.submit(buf)?;
    }
    drop(reader);
    remove_scratch(opts, scratch)?;
    Ok(pw)
}

fn remove_scratch(opts: &DumpOptions, scratch: &str) -> Result<()> {
    let path = opts.dir.join(scratch);
    std::fs::remove_file(&path).map_err(|source| DumpError::Proc {
        path: path.display().to_string(),
        source,
    })
}

fn read_task(pid: Pid, addr: u64, out: &mut [u8]) -> std::result::Result<(), nix::errno::Errno> {
    let len = out.len();
    let mut iov = [std::io::IoSliceMut::new(out)];
    let remote = [nix::sys::uio::RemoteIoVec {
        base: addr as usize,
        len,
    }];
    nix::sys::uio::process_vm_readv(pid, &mut iov, &remote).map(|_| ())
}

/// Remove image files a failed dump left behind (never the directory, and
/// only files cryo names).
pub fn remove_partial(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if let Some(name) = e.file_name().to_str() {
                if Kind::from_file_name(name).is_some()
                    || name.starts_with("inventory.img")
                    || name.ends_with(".img.tmp")
                {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}
