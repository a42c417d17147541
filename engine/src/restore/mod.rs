//! Restore of one process: load and check the image, create the task with
//! its dumped pid (clone3 set_tid), prepare its memory and descriptors in
//! the new task, and hand over to the restorer blob, which moves the
//! memory into place and returns into the dumped context. The parent
//! traces the new task to remove the restorer's own mapping at the end.

pub mod image;
pub mod tree;

use std::collections::HashMap;
use std::ffi::CString;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use cryo_image::proto::{CoreEntry, Creds, FileEntry, FileKind, Vma, VmaKind};
use cryo_parasite::*;
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::ptrace;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::infect::{blob::Blob, blob::RESTORER_ELF, InfectError, Victim};
use crate::sigframe::{self, Regs};
use image::{Image, ImageLoadError, TreeImage};
use tree::{NodeKind, Plan};

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Load(#[from] ImageLoadError),
    #[error("{file}: task {pid} was dumped on a CPU with another XSAVE layout ({dumped}; here {here}); restoring across CPU models is not supported yet")]
    Cpu {
        pid: i32,
        file: String,
        dumped: String,
        here: String,
    },
    #[error("restoring task {pid}: file {id} ({path}) of files.img: {what}")]
    File {
        pid: i32,
        id: u32,
        path: String,
        what: String,
    },
    #[error("restoring the tree of task {pid}: {what}")]
    Plan { pid: i32, what: String },
    #[error("pid {pid} is in use by {holder}; cannot restore the task with its pid")]
    PidTaken { pid: i32, holder: String },
    #[error("creating task with pid {pid}: {errno}")]
    Clone { pid: i32, errno: Errno },
    #[error("restoring task {pid}: {what}: {errno}")]
    Sys {
        pid: i32,
        what: &'static str,
        errno: Errno,
    },
    #[error("restoring task {pid}: {message}")]
    Child { pid: i32, message: String },
    #[error("restoring task {pid}: the restorer failed at {stage} (item {index}): {errno}")]
    Restorer {
        pid: i32,
        stage: String,
        index: u32,
        errno: Errno,
    },
    #[error("restoring task {pid}: the new task {what}")]
    Died { pid: i32, what: String },
    #[error("restoring task {pid}: finishing: {source}")]
    Finish {
        pid: i32,
        #[source]
        source: InfectError,
    },
    #[error("restoring task {pid}: timed out after {secs} s")]
    Timeout { pid: i32, secs: u64 },
}

type Result<T> = std::result::Result<T, RestoreError>;

#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub dir: PathBuf,
}

/// A restored, running task.
#[derive(Debug)]
pub struct Restored {
    pub pid: i32,
    pub elapsed: Duration,
}

const PAGE: u64 = 4096;
const BOOT_STACK: u64 = 256 * 1024;
/// Stack of each restored thread other than the leader while it runs the
/// restorer (it only sets its own state: a few hundred bytes deep).
const THREAD_STACK: u64 = 32 * 1024;
const RESTORE_TIMEOUT: Duration = Duration::from_secs(300);

fn stage_name(stage: u32) -> &'static str {
    match stage {
        STAGE_RSEQ_UNREGISTER => "dropping cryo's own rseq registration",
        STAGE_UNMAP => "unmapping cryo's memory",
        STAGE_VDSO => "moving the vdso",
        STAGE_MREMAP => "moving a mapping to its address",
        STAGE_MAP_SHARED => "mapping a shared file",
        STAGE_MPROTECT => "setting a mapping's protection",
        STAGE_MM_MAP => "PR_SET_MM_MAP (mm fields and exe link)",
        STAGE_THREAD_STATE => "per-thread state",
        STAGE_RSEQ => "registering rseq",
        STAGE_SIGACTION => "signal actions",
        STAGE_TIMERS => "POSIX timers",
        STAGE_SIGNALS => "queueing pending signals",
        STAGE_RLIMIT => "resource limits (raising a hard limit needs CAP_SYS_RESOURCE)",
        STAGE_CREDS => "credentials",
        STAGE_ITIMER => "interval timers",
        STAGE_MADVISE => "madvise flags",
        STAGE_CLONE_THREAD => "creating a thread with its tid (clone3 set_tid)",
        STAGE_THREAD => "a thread setting its own state",
        _ => "an unknown stage",
    }
}

/// Who holds a pid, for the error message.
fn pid_holder(pid: i32) -> Option<String> {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(format!("process {pid} ({})", comm.trim()))
}

/// Who holds a pid, after giving a zombie holder (a task of the dumped
/// tree, say, killed by the dump and not yet collected by its new parent)
/// ten seconds to go away.
fn pid_still_taken(pid: i32) -> Option<String> {
    let start = Instant::now();
    loop {
        let holder = pid_holder(pid)?;
        let zombie = crate::pstree::stat(pid).is_some_and(|s| matches!(s.state, 'Z' | 'X'));
        if !zombie || start.elapsed() > Duration::from_secs(10) {
            return Some(if zombie {
                format!("{holder}, a zombie its parent does not collect")
            } else {
                holder
            });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn kind(v: &Vma) -> VmaKind {
    VmaKind::try_from(v.kind).unwrap_or(VmaKind::VmaVsyscall)
}

fn needs_premap(v: &Vma) -> bool {
    matches!(
        kind(v),
        VmaKind::VmaAnonPrivate
            | VmaKind::VmaAnonShared
            | VmaKind::VmaFilePrivate
            | VmaKind::VmaHeap
            | VmaKind::VmaStack
    )
}

fn is_vdso(v: &Vma) -> bool {
    matches!(
        kind(v),
        VmaKind::VmaVdso | VmaKind::VmaVvar | VmaKind::VmaVvarVclock
    )
}

/// Our own vdso/vvar mappings, ascending: (start, end, name).
fn own_vdso() -> Vec<(u64, u64, String)> {
    crate::proc::read_maps("self")
        .into_iter()
        .filter(|m| matches!(m.name.as_str(), "[vdso]" | "[vvar]" | "[vvar_vclock]"))
        .map(|m| (m.start, m.end, m.name))
        .collect()
}

/// Ranges mapped in this process right now.
fn own_maps() -> Vec<(u64, u64)> {
    crate::proc::read_maps("self")
        .into_iter()
        .map(|m| (m.start, m.end))
        .collect()
}

/// Highest free gap of `size` bytes (plus guard space) below the usual
/// mmap area that overlaps none of `busy`.
fn find_hole(busy: &[(u64, u64)], size: u64) -> Option<u64> {
    let guard = 1 << 20;
    let mut b: Vec<(u64, u64)> = busy.to_vec();
    b.push((0, 0x1000_0000)); // stay clear of low memory
    b.push((0x7fff_0000_0000, u64::MAX));
    b.sort_unstable();
    // Walk gaps from the top down.
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (s, e) in b {
        if let Some(last) = merged.last_mut() {
            if s <= last.1 {
                last.1 = last.1.max(e);
                continue;
            }
        }
        merged.push((s, e));
    }
    for w in merged.windows(2).rev() {
        let (gap_start, gap_end) = (w[0].1 + guard, w[1].0.saturating_sub(guard));
        if gap_end > gap_start && gap_end - gap_start >= size {
            return Some((gap_end - size) & !(PAGE - 1));
        }
    }
    None
}

extern "C" {
    // glibc >= 2.35: where this thread's rseq area lives relative to the
    // thread pointer, and its registered feature size (0 if none).
    static __rseq_offset: isize;
    static __rseq_size: u32;
}

/// Restore the image in `opts.dir`; returns once every task runs.
pub fn restore(opts: &RestoreOptions) -> Result<Restored> {
    let t0 = Instant::now();
    let tree = TreeImage::load(&opts.dir)?;
    let root = tree.procs[0].pid();
    // Open the pages files now: a damaged pages file is refused here.
    let mut readers = Vec::with_capacity(tree.procs.len());
    for p in &tree.procs {
        readers.push(p.page_reader()?);
    }
    // The XSAVE area goes back through a signal frame, which only works
    // for the same layout: another CPU (features, sizes) would silently
    // lose vector state.
    let (size, xcr0) = crate::sys::xsave_layout();
    for img in &tree.procs {
        let pid = img.pid();
        let xs = &img.core.xsave;
        let dumped_xcr0 = xs
            .get(464..472)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
            .unwrap_or(0);
        if xs.len() != size as usize || dumped_xcr0 != xcr0 {
            return Err(RestoreError::Cpu {
                pid,
                file: cryo_image::core_file(pid as u32),
                dumped: format!("{} bytes, XCR0 {dumped_xcr0:#x}", xs.len()),
                here: format!("{size} bytes, XCR0 {xcr0:#x}"),
            });
        }
    }
    let plan = Plan::build(&tree).map_err(|e| RestoreError::Plan {
        pid: root,
        what: e.to_string(),
    })?;
    let all_tids = plan.nodes.iter().map(|n| n.pid).chain(
        tree.procs
            .iter()
            .flat_map(|p| p.threads.iter().map(|t| t.tid as i32)),
    );
    for tid in all_tids {
        if let Some(holder) = pid_still_taken(tid) {
            return Err(RestoreError::PidTaken { pid: tid, holder });
        }
    }
    let sys = |what: &'static str| {
        move |errno: Errno| RestoreError::Sys {
            pid: root,
            what,
            errno,
        }
    };
    let pipe = || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(sys("pipe"));
    let (status_r, status_w) = pipe()?;
    let (go0_r, go0_w) = pipe()?;
    let (go1_r, go1_w) = pipe()?;
    let (go2_r, go2_w) = pipe()?;
    let shm = make_shared_objects(&tree)?;
    let files = open_files(&tree)?;
    let file_fds: HashMap<u32, RawFd> = files.iter().map(|(k, v)| (*k, v.as_raw_fd())).collect();
    let shm_fds: HashMap<u64, RawFd> = shm.iter().map(|(k, v)| (*k, v.as_raw_fd())).collect();
    let pty_masters: HashMap<u32, RawFd> = tree.procs[0]
        .files
        .iter()
        .filter(|f| f.kind == FileKind::FilePtyMaster as i32)
        .filter_map(|f| Some((f.pty.as_ref()?.index, *file_fds.get(&f.id)?)))
        .collect();
    let ctx = NodeCtx {
        tree: &tree,
        readers: &readers,
        plan: &plan,
        shm: &shm_fds,
        files: &file_fds,
        pty_masters: &pty_masters,
        status_w: status_w.as_raw_fd(),
        go: [go0_r.as_raw_fd(), go1_r.as_raw_fd(), go2_r.as_raw_fd()],
    };
    let mut roots: Vec<Pid> = Vec::new();
    let mut started = Err(RestoreError::Plan {
        pid: root,
        what: "no root process".into(),
    });
    for r in plan.roots() {
        let node = &plan.nodes[r];
        // SAFETY: cryo restore is single-threaded here (no worker threads
        // were started before this point), as clone3 without CLONE_VM
        // requires.
        match unsafe { crate::sys::clone3_with_pid(node.pid, node.exit_signal) } {
            Ok(0) => node_main(&ctx, r),
            Ok(c) => {
                let c = Pid::from_raw(c);
                roots.push(c);
                // Every task the roots create is traced from its first
                // instruction on.
                if let Err(errno) = ptrace::seize(
                    c,
                    ptrace::Options::PTRACE_O_TRACESYSGOOD
                        | ptrace::Options::PTRACE_O_EXITKILL
                        | ptrace::Options::PTRACE_O_TRACECLONE
                        | ptrace::Options::PTRACE_O_TRACEFORK
                        | ptrace::Options::PTRACE_O_TRACEVFORK,
                ) {
                    started = Err(sys("PTRACE_SEIZE")(errno));
                    break;
                }
                started = Ok(());
            }
            Err(Errno::EEXIST) => {
                started = Err(RestoreError::PidTaken {
                    pid: node.pid,
                    holder: pid_holder(node.pid).unwrap_or_else(|| "another task".into()),
                });
                break;
            }
            Err(errno) => {
                started = Err(RestoreError::Clone {
                    pid: node.pid,
                    errno,
                });
                break;
            }
        }
    }
    drop(status_w);
    drop((go0_r, go1_r, go2_r));
    let res = started.and_then(|()| {
        // Let the roots go on, now that they are traced.
        nix::unistd::write(&go0_w, &vec![b'g'; roots.len()]).map_err(sys("write"))?;
        supervise(&tree, &plan, status_r, &go1_w, &go2_w)
    });
    // Closing the barriers ends any task still waiting on one.
    drop((go0_w, go1_w, go2_w));
    match res {
        Ok(()) => Ok(Restored {
            pid: root,
            elapsed: t0.elapsed(),
        }),
        Err(e) => {
            tracing::warn!("restore failed ({e}); killing every task it made");
            let ours = plan.nodes.iter().map(|n| n.pid).chain(
                tree.procs
                    .iter()
                    .flat_map(|p| p.threads.iter().map(|t| t.tid as i32)),
            );
            kill_all(&roots, ours);
            Err(e)
        }
    }
}

/// Every shared anonymous object of the image (MAP_SHARED|MAP_ANONYMOUS
/// memory, one shmem file however many processes map it), made here so
/// that every process of the tree inherits it and maps the same object.
/// The process whose image holds its pages fills it.
fn make_shared_objects(tree: &TreeImage) -> Result<HashMap<u64, OwnedFd>> {
    let root = tree.procs[0].pid();
    let mut sizes: HashMap<u64, u64> = HashMap::new();
    for p in &tree.procs {
        for v in
            p.mm.vmas
                .iter()
                .filter(|v| kind(v) == VmaKind::VmaAnonShared)
        {
            let end = v.pgoff + (v.end - v.start);
            let e = sizes.entry(v.shmid).or_insert(0);
            *e = (*e).max(end);
        }
    }
    let mut out = HashMap::new();
    for (id, size) in sizes {
        // SAFETY: a fresh shared anonymous mapping at an address the kernel
        // picks; unmapped below once its file is open.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(RestoreError::Sys {
                pid: root,
                what: "creating shared anonymous memory",
                errno: Errno::last(),
            });
        }
        let start = p as u64;
        let path = format!("/proc/self/map_files/{:x}-{:x}", start, start + size);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path);
        // SAFETY: unmapping the mapping made just above, used by nothing.
        unsafe { libc::munmap(p, size as usize) };
        let file = file.map_err(|e| RestoreError::Sys {
            pid: root,
            what: "opening shared anonymous memory through /proc/self/map_files (needs CAP_CHECKPOINT_RESTORE or CAP_SYS_ADMIN)",
            errno: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
        })?;
        out.insert(id, OwnedFd::from(file));
    }
    Ok(out)
}

/// Open every file description the tree uses, once: descriptors that
/// shared one at the dump (dup, inherited over fork) share it again, as
/// each task dup3s its numbers from these. Pipes and FIFOs get their
/// buffer size and the bytes that were in flight.
fn open_files(tree: &TreeImage) -> Result<HashMap<u32, OwnedFd>> {
    let root = tree.procs[0].pid();
    let files = &tree.procs[0].files;
    let used: std::collections::BTreeSet<u32> = tree
        .procs
        .iter()
        .flat_map(|p| p.fds.iter().map(|f| f.id))
        .collect();
    let fail = |f: &FileEntry, what: String| RestoreError::File {
        pid: root,
        id: f.id,
        path: f.path.clone(),
        what,
    };
    let last = || std::io::Error::last_os_error().to_string();
    // Status flags an open file description keeps (fcntl F_SETFL).
    let status_flags = libc::O_APPEND | libc::O_NONBLOCK | libc::O_ASYNC | libc::O_NOATIME;
    // Per pipe (inode): its read and write ends, and whether each end has
    // been handed out once already.
    let mut pipes: HashMap<u64, (OwnedFd, OwnedFd, bool, bool)> = HashMap::new();
    let mut out = HashMap::new();
    let sockets: Vec<&FileEntry> = files
        .iter()
        .filter(|f| used.contains(&f.id) && f.kind == FileKind::FileUnixSocket as i32)
        .collect();
    let mut sockets =
        crate::files::unix::make_sockets(&sockets).map_err(|what| RestoreError::File {
            pid: root,
            id: 0,
            path: "unix sockets".into(),
            what,
        })?;
    // Pty masters first, by index (a slave may come before its master in
    // the table): each is the pair's only open file description, made
    // here with its dumped index and left unlocked until the slaves are
    // open. The masters handed out on the way are closed at the end.
    let mut masters: Vec<&FileEntry> = files
        .iter()
        .filter(|f| used.contains(&f.id) && f.kind == FileKind::FilePtyMaster as i32)
        .collect();
    masters.sort_by_key(|f| f.pty.as_ref().map(|p| p.index));
    let mut spare_masters: Vec<OwnedFd> = Vec::new();
    let mut ptys: HashMap<u32, OwnedFd> = HashMap::new();
    for f in &masters {
        let Some(st) = &f.pty else {
            return Err(fail(f, "a pty master without its pty state".into()));
        };
        let m =
            crate::files::pty::open_master(f, st, &mut spare_masters).map_err(|e| fail(f, e))?;
        ptys.insert(f.id, m);
    }
    drop(spare_masters);
    // Memfds and deleted files, made once each: (kind, dev, inode) -> fd.
    let mut ghosts: Vec<((i32, u64, u64), OwnedFd)> = Vec::new();
    for f in files.iter().filter(|f| used.contains(&f.id)) {
        let kind = FileKind::try_from(f.kind).unwrap_or(FileKind::FileRegular);
        let fd: RawFd = match kind {
            FileKind::FileMemfd | FileKind::FileDeleted => {
                let key = (f.kind, f.dev, f.inode);
                if !ghosts.iter().any(|g| g.0 == key) {
                    let holder = files
                        .iter()
                        .find(|x| (x.kind, x.dev, x.inode) == key && !x.contents.is_empty())
                        .unwrap_or(f);
                    let anchor = make_ghost(holder).map_err(|e| fail(f, e))?;
                    ghosts.push((key, anchor));
                }
                let anchor = ghosts
                    .iter()
                    .find(|g| g.0 == key)
                    .map(|g| g.1.as_raw_fd())
                    .unwrap_or(-1);
                let flags = f.flags as i32
                    & !(libc::O_CREAT | libc::O_TRUNC | libc::O_EXCL | libc::O_NOCTTY);
                let fd = reopen(anchor, flags).map_err(|e| fail(f, e))?;
                if f.flags as i32 & libc::O_PATH == 0 {
                    // SAFETY: lseek on the descriptor just opened.
                    unsafe { libc::lseek(fd, f.pos as i64, libc::SEEK_SET) };
                }
                fd
            }
            // Made by the task that holds it, once its descriptors are in
            // place (see prepare).
            FileKind::FileEpoll | FileKind::FilePidfd => continue,
            FileKind::FileShellTty => {
                let flags = f.flags as i32 & (libc::O_ACCMODE | libc::O_NONBLOCK | libc::O_APPEND);
                let path = cstr(&controlling_tty_path()).map_err(|e| fail(f, e))?;
                // SAFETY: opening the controlling terminal of this session
                // (by its device path, as the task had it).
                let fd =
                    unsafe { libc::open(path.as_ptr(), flags | libc::O_NOCTTY | libc::O_CLOEXEC) };
                if fd < 0 {
                    return Err(fail(
                        f,
                        format!(
                            "the task had its shell's terminal open (a --shell-job dump): restore it from a terminal (/dev/tty: {})",
                            last()
                        ),
                    ));
                }
                fd
            }
            FileKind::FilePtyMaster => match ptys.remove(&f.id) {
                Some(m) => std::os::fd::IntoRawFd::into_raw_fd(m),
                None => return Err(fail(f, "no pty was made for it".into())),
            },
            FileKind::FilePtySlave => {
                let s = crate::files::pty::open_slave(f).map_err(|e| fail(f, e))?;
                std::os::fd::IntoRawFd::into_raw_fd(s)
            }
            FileKind::FileInotify => {
                let st = f.inotify.clone().unwrap_or_default();
                let fd = crate::files::inotify::restore(&st).map_err(|e| fail(f, e))?;
                std::os::fd::IntoRawFd::into_raw_fd(fd)
            }
            FileKind::FileUnixSocket => match sockets.remove(&f.id) {
                Some(s) => std::os::fd::IntoRawFd::into_raw_fd(s),
                None => return Err(fail(f, "no socket was made for it".into())),
            },
            FileKind::FileRegular | FileKind::FileDirectory | FileKind::FileChardev => {
                open_by_path(f).map_err(|e| fail(f, e))?
            }
            FileKind::FileEventfd => make_eventfd(f).map_err(|e| fail(f, e))?,
            FileKind::FileSignalfd => make_signalfd(f).map_err(|e| fail(f, e))?,
            FileKind::FileTimerfd => make_timerfd(f).map_err(|e| fail(f, e))?,
            FileKind::FilePipe | FileKind::FileFifo => {
                if let std::collections::hash_map::Entry::Vacant(slot) = pipes.entry(f.inode) {
                    let holder = files
                        .iter()
                        .find(|x| x.inode == f.inode && x.kind == f.kind && x.pipe_size > 0)
                        .unwrap_or(f);
                    let (r, w) = if kind == FileKind::FilePipe {
                        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                            .map_err(|e| fail(f, format!("pipe2: {e}")))?
                    } else {
                        // One O_RDWR open never blocks; both ends are
                        // reopened from it.
                        let path = cstr(&f.path).map_err(|e| fail(f, e))?;
                        // SAFETY: path is a NUL-terminated string we own.
                        let a = unsafe {
                            libc::open(
                                path.as_ptr(),
                                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
                            )
                        };
                        if a < 0 {
                            return Err(fail(f, format!("opening the FIFO: {}", last())));
                        }
                        // SAFETY: `a` was just opened (checked above) and
                        // is ours from here on.
                        let a = unsafe { OwnedFd::from_raw_fd(a) };
                        let b = a
                            .try_clone()
                            .map_err(|e| fail(f, format!("duplicating the FIFO: {e}")))?;
                        (a, b)
                    };
                    if holder.pipe_size > 0 {
                        // SAFETY: fcntl on our own pipe.
                        if unsafe {
                            libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, holder.pipe_size as i32)
                        } < 0
                        {
                            return Err(fail(
                                f,
                                format!(
                                    "setting the pipe size to {}: {}",
                                    holder.pipe_size,
                                    last()
                                ),
                            ));
                        }
                    }
                    let mut data: &[u8] = &holder.pipe_data;
                    while !data.is_empty() {
                        match nix::unistd::write(&w, data) {
                            Ok(n) => data = &data[n..],
                            Err(Errno::EINTR) => {}
                            Err(e) => return Err(fail(f, format!("refilling the pipe: {e}"))),
                        }
                    }
                    slot.insert((r, w, false, false));
                }
                let Some(p) = pipes.get_mut(&f.inode) else {
                    continue;
                };
                let write_end = f.flags as i32 & libc::O_ACCMODE == libc::O_WRONLY;
                let (end, first) = if write_end {
                    (p.1.as_raw_fd(), &mut p.3)
                } else {
                    (p.0.as_raw_fd(), &mut p.2)
                };
                if !*first && kind == FileKind::FilePipe {
                    *first = true;
                    // SAFETY: duplicating our own pipe end: this open file
                    // description becomes the dumped one.
                    let fd = unsafe { libc::fcntl(end, libc::F_DUPFD_CLOEXEC, 0) };
                    if fd < 0 {
                        return Err(fail(f, format!("duplicating the pipe end: {}", last())));
                    }
                    fd
                } else {
                    // Another open file description of the same pipe.
                    let acc = f.flags as i32 & libc::O_ACCMODE;
                    reopen(end, acc | libc::O_NONBLOCK).map_err(|e| fail(f, e))?
                }
            }
        };
        // SAFETY: fcntl on the descriptor we own; sets the dumped status
        // flags of the open file description.
        unsafe { libc::fcntl(fd, libc::F_SETFL, f.flags as i32 & status_flags) };
        // SAFETY: `fd` is a descriptor we own from here on.
        out.insert(f.id, unsafe { OwnedFd::from_raw_fd(fd) });
    }
    // Every slave is open: masters that were locked are locked again.
    for f in &masters {
        if let (Some(st), Some(m)) = (&f.pty, out.get(&f.id)) {
            crate::files::pty::relock(m.as_raw_fd(), st).map_err(|e| fail(f, e))?;
        }
    }
    Ok(out)
}

/// A new open file description of the file behind our descriptor `fd`
/// (through /proc/self/fd), with `flags`.
fn reopen(fd: RawFd, flags: i32) -> std::result::Result<RawFd, String> {
    let path = cstr(&format!("/proc/self/fd/{fd}"))?;
    // SAFETY: a NUL-terminated path we own; returns a new descriptor or -1.
    let n = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) };
    if n < 0 {
        return Err(format!(
            "opening it again: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(n)
}

/// A regular file, directory or character device, opened by its path
/// with its flags and put at its offset.
fn open_by_path(f: &FileEntry) -> std::result::Result<RawFd, String> {
    let last = || std::io::Error::last_os_error().to_string();
    let kind = FileKind::try_from(f.kind).unwrap_or(FileKind::FileRegular);
    let path = cstr(&f.path)?;
    let mut flags =
        f.flags as i32 & !(libc::O_CREAT | libc::O_TRUNC | libc::O_EXCL | libc::O_NOCTTY);
    if kind == FileKind::FileDirectory {
        flags |= libc::O_DIRECTORY;
    }
    // SAFETY: path is a NUL-terminated string we own.
    let fd = unsafe { libc::open(path.as_ptr(), flags | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(format!("opening it: {}", last()));
    }
    let seek = |fd: RawFd| {
        // SAFETY: lseek on the descriptor just opened.
        unsafe { libc::lseek(fd, f.pos as i64, libc::SEEK_SET) }
    };
    let o_path = f.flags as i32 & libc::O_PATH != 0;
    if kind == FileKind::FileRegular && !o_path && seek(fd) < 0 {
        let e = last();
        // SAFETY: closing the descriptor we opened.
        unsafe { libc::close(fd) };
        return Err(format!("seeking to {}: {e}", f.pos));
    }
    Ok(fd)
}

/// An eventfd with its count and mode.
fn make_eventfd(f: &FileEntry) -> std::result::Result<RawFd, String> {
    let last = || std::io::Error::last_os_error().to_string();
    let st = f.eventfd.unwrap_or_default();
    let flags = libc::EFD_CLOEXEC | if st.semaphore { libc::EFD_SEMAPHORE } else { 0 };
    // SAFETY: eventfd with integer arguments.
    let fd = unsafe { libc::eventfd(0, flags) };
    if fd < 0 {
        return Err(format!("eventfd: {}", last()));
    }
    if st.count > 0 {
        let b = st.count.to_ne_bytes();
        // SAFETY: writing 8 bytes we own to the new eventfd.
        if unsafe { libc::write(fd, b.as_ptr().cast(), 8) } != 8 {
            let e = last();
            // SAFETY: closing the descriptor we made.
            unsafe { libc::close(fd) };
            return Err(format!("setting the eventfd count {}: {e}", st.count));
        }
    }
    Ok(fd)
}

/// A signalfd for its mask.
fn make_signalfd(f: &FileEntry) -> std::result::Result<RawFd, String> {
    let last = || std::io::Error::last_os_error().to_string();
    let st = f.signalfd.unwrap_or_default();
    // SAFETY: sigset_t is plain data, filled by sigemptyset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: set is a valid sigset_t owned here.
    unsafe { libc::sigemptyset(&mut set) };
    for sig in 1..=64 {
        if st.mask & (1u64 << (sig - 1)) != 0 {
            // SAFETY: as above; sig is in range.
            unsafe { libc::sigaddset(&mut set, sig) };
        }
    }
    // SAFETY: a new signalfd for a mask we own.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(format!("signalfd: {}", last()));
    }
    Ok(fd)
}

/// A timerfd on its clock, armed with the time that was left and its
/// period, with its unread expirations.
fn make_timerfd(f: &FileEntry) -> std::result::Result<RawFd, String> {
    let last = || std::io::Error::last_os_error().to_string();
    let st = f.timerfd.unwrap_or_default();
    // SAFETY: timerfd_create with integer arguments.
    let fd = unsafe { libc::timerfd_create(st.clock_id, libc::TFD_CLOEXEC) };
    if fd < 0 {
        return Err(format!(
            "timerfd_create (clock {}): {}",
            st.clock_id,
            last()
        ));
    }
    let ts = |ns: u64| libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    };
    // A timer about to expire at the dump expires right away.
    let value = if st.value_ns == 0 && st.interval_ns == 0 {
        0
    } else {
        st.value_ns.max(1)
    };
    let its = libc::itimerspec {
        it_interval: ts(st.interval_ns),
        it_value: ts(value),
    };
    // SAFETY: arming our own timerfd with a value we own.
    if unsafe { libc::timerfd_settime(fd, 0, &its, std::ptr::null_mut()) } < 0 {
        let e = last();
        // SAFETY: closing the descriptor we made.
        unsafe { libc::close(fd) };
        return Err(format!("timerfd_settime: {e}"));
    }
    if st.ticks > 0 {
        // TFD_IOC_SET_TICKS (CONFIG_CHECKPOINT_RESTORE).
        const TFD_IOC_SET_TICKS: libc::c_ulong = 0x4008_5400;
        let ticks = st.ticks;
        // SAFETY: the ioctl reads one u64 from `ticks`.
        if unsafe { libc::ioctl(fd, TFD_IOC_SET_TICKS, &ticks) } < 0 {
            let e = last();
            // SAFETY: closing the descriptor we made.
            unsafe { libc::close(fd) };
            return Err(format!("restoring {ticks} unread expirations: {e}"));
        }
    }
    Ok(fd)
}

/// A memfd with its name, contents and seals, or a file deleted while
/// open: made next to where it was (a fresh name there), filled, given
/// its mode and unlinked again. The descriptor returned reads and writes.
fn make_ghost(f: &FileEntry) -> std::result::Result<OwnedFd, String> {
    let last = || std::io::Error::last_os_error();
    let fd = if f.kind == FileKind::FileMemfd as i32 {
        let name = cstr(&f.path)?;
        let flags = libc::MFD_CLOEXEC
            | if f.seals != 0 {
                libc::MFD_ALLOW_SEALING
            } else {
                0
            };
        // SAFETY: memfd_create with a NUL-terminated name we own.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
        if fd < 0 {
            return Err(format!("memfd_create: {}", last()));
        }
        fd
    } else {
        let mut made = -1;
        for n in 0..1000u32 {
            let p = cstr(&format!("{}.cryo-ghost-{}-{n}", f.path, std::process::id()))?;
            // SAFETY: a NUL-terminated path we own; O_EXCL never opens an
            // existing file.
            let fd = unsafe {
                libc::open(
                    p.as_ptr(),
                    libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC,
                    0o600,
                )
            };
            if fd >= 0 {
                // SAFETY: unlinking the file we just created.
                unsafe { libc::unlink(p.as_ptr()) };
                made = fd;
                break;
            }
            if last().raw_os_error() != Some(libc::EEXIST) {
                return Err(format!(
                    "recreating the deleted file next to its old path: {}",
                    last()
                ));
            }
        }
        if made < 0 {
            return Err("no free name to recreate the deleted file".into());
        }
        made
    };
    // SAFETY: `fd` is a descriptor we own from here on.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut data: &[u8] = &f.contents;
    while !data.is_empty() {
        match nix::unistd::write(&fd, data) {
            Ok(n) => data = &data[n..],
            Err(Errno::EINTR) => {}
            Err(e) => return Err(format!("writing its {} bytes: {e}", f.contents.len())),
        }
    }
    // SAFETY: fchmod and fcntl on our own descriptor.
    unsafe {
        libc::fchmod(fd.as_raw_fd(), f.mode as libc::mode_t);
        if f.seals != 0 && libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, f.seals as i32) < 0 {
            return Err(format!("adding seals {:#x}: {}", f.seals, last()));
        }
    }
    Ok(fd)
}

/// A failed restore leaves nothing behind: kill every task it made (the
/// roots, its children, and every task of the tree that this process
/// traces: a pid of the image held by someone else is never touched) and
/// reap them. A traced thread's exit must be collected before its
/// leader's can be.
fn kill_all(roots: &[Pid], tree_pids: impl Iterator<Item = i32>) {
    let me = std::process::id() as i32;
    for r in roots {
        let _ = kill(*r, Signal::SIGKILL);
    }
    for pid in tree_pids {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let tracer = status
            .lines()
            .find_map(|l| l.strip_prefix("TracerPid:"))
            .and_then(|v| v.trim().parse::<i32>().ok());
        if tracer == Some(me) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
    let start = Instant::now();
    loop {
        match waitpid(
            Pid::from_raw(-1),
            Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG),
        ) {
            Err(Errno::EINTR) => {}
            Err(_) => break,
            Ok(WaitStatus::StillAlive) => {
                if start.elapsed() > Duration::from_secs(10) {
                    tracing::error!("tasks of the failed restore did not end within 10 s");
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(st) => {
                // Anything still stopping is ours (traced): kill it too.
                if let Some(p) = st.pid() {
                    if !matches!(st, WaitStatus::Exited(..) | WaitStatus::Signaled(..)) {
                        let _ = kill(p, Signal::SIGKILL);
                        let _ = ptrace::cont(p, None);
                    }
                }
            }
        }
    }
}

/// What every node of the tree gets from cryo across its creation.
struct NodeCtx<'a> {
    tree: &'a TreeImage,
    readers: &'a [cryo_image::PageReader],
    plan: &'a Plan,
    /// The shared anonymous objects (shmem files) by their dumped id.
    shm: &'a HashMap<u64, RawFd>,
    /// Every open file description of the tree, by its id in files.img.
    files: &'a HashMap<u32, RawFd>,
    /// The master of every pty of the tree, by its index.
    pty_masters: &'a HashMap<u32, RawFd>,
    status_w: RawFd,
    /// Read ends of the three barriers: traced (roots), all created, all
    /// in their groups.
    go: [RawFd; 3],
}

fn report(fd: RawFd, stage: u32, pid: i32) {
    send_status(
        fd,
        &RStatus {
            stage,
            index: 0,
            err: 0,
            pid: pid as u32,
            _pad: 0,
        },
    );
}

/// One status record to the supervisor (atomic: under PIPE_BUF).
fn send_status(fd: RawFd, st: &RStatus) {
    // SAFETY: writing a plain struct we own to the status pipe.
    unsafe {
        libc::write(
            fd,
            (st as *const RStatus).cast(),
            std::mem::size_of::<RStatus>(),
        )
    };
}

/// Send an error message from cryo's code in a new task and exit.
fn report_error_and_exit(pid: i32, msg: &str) -> ! {
    let fd = STATUS_FD.load(std::sync::atomic::Ordering::Relaxed);
    let text = &msg.as_bytes()[..msg.len().min(3000)];
    let st = RStatus {
        stage: STAGE_CHILD_ERR,
        index: text.len() as u32,
        err: 0,
        pid: pid as u32,
        _pad: 0,
    };
    let mut m = crate::infect::as_bytes(&st).to_vec();
    m.extend_from_slice(text);
    // SAFETY: one write (atomic, under PIPE_BUF) of a buffer we own to a
    // descriptor we hold, then _exit without running destructors.
    unsafe {
        libc::write(fd, m.as_ptr().cast(), m.len());
        libc::_exit(1);
    }
}

fn read_go(fd: RawFd) -> std::result::Result<(), String> {
    let mut b = [0u8; 1];
    loop {
        // SAFETY: reading one byte into a local buffer.
        let r = unsafe { libc::read(fd, b.as_mut_ptr().cast(), 1) };
        if r == 1 {
            return Ok(());
        }
        if r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        return Err("cryo went away while the tree was being built".into());
    }
}

/// A new task of the tree, running cryo's code with its dumped pid: make
/// its session and group, create its children, wait for the whole tree,
/// join its group, then become what it was (or exit, for helpers and
/// zombies). Never returns.
fn node_main(ctx: &NodeCtx, idx: usize) -> ! {
    let node = &ctx.plan.nodes[idx];
    STATUS_FD.store(ctx.status_w, std::sync::atomic::Ordering::Relaxed);
    match node_setup(ctx, idx) {
        Ok(never) => match never {},
        Err(msg) => report_error_and_exit(node.pid, &msg),
    }
}

fn node_setup(ctx: &NodeCtx, idx: usize) -> std::result::Result<Never, String> {
    let node = &ctx.plan.nodes[idx];
    let pid = node.pid;
    let creator_is_helper = node
        .creator
        .is_some_and(|c| ctx.plan.nodes[c].kind == NodeKind::Helper);
    // Die with the task that made us while the tree is built (cryo itself
    // kills the roots); a helper's children outlive it on purpose. The
    // restorer sets the dumped value at the end.
    if !creator_is_helper {
        // SAFETY: prctl with integer arguments on this task only.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) };
        let want = node.creator.map(|c| ctx.plan.nodes[c].pid).unwrap_or(-1);
        // SAFETY: getppid cannot fail.
        if want > 0 && unsafe { libc::getppid() } != want {
            return Err("the task creating this one died".into());
        }
    }
    if node.creator.is_none() {
        read_go(ctx.go[0])?;
    }
    if node.subreaper {
        // SAFETY: prctl with integer arguments on this task only.
        if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong) } < 0 {
            return Err(os_err("PR_SET_CHILD_SUBREAPER"));
        }
    }
    if node.setsid {
        // SAFETY: setsid has no arguments.
        if unsafe { libc::setsid() } < 0 {
            return Err(os_err("setsid"));
        }
        // Its controlling terminal before it creates the members of its
        // session, which inherit it.
        if let Some((index, master)) = pty_ctty(ctx, node)? {
            crate::sys::tty::set_controlling(master).map_err(|e| {
                format!("making pty {index} its controlling terminal (TIOCSCTTY): {e}")
            })?;
        }
    } else if node.group_leader {
        // SAFETY: setpgid on this task.
        if unsafe { libc::setpgid(0, 0) } < 0 {
            return Err(os_err("setpgid (leading its group)"));
        }
    }
    if !node.setsid {
        give_up_ctty(ctx, node)?;
    }
    for &c in &node.children {
        let child = &ctx.plan.nodes[c];
        // SAFETY: this task runs cryo's code on one thread only.
        match unsafe { crate::sys::clone3_with_pid(child.pid, child.exit_signal) } {
            Ok(0) => node_main(ctx, c),
            Ok(_) => {}
            Err(errno) => {
                let holder = pid_holder(child.pid).unwrap_or_default();
                return Err(format!(
                    "creating task {} (clone3 set_tid): {errno} {holder}",
                    child.pid
                ));
            }
        }
    }
    report(ctx.status_w, STAGE_CREATED, pid);
    read_go(ctx.go[1])?;
    if node.join_pgid != 0 {
        // SAFETY: getpgid/setpgid on this task.
        let cur = unsafe { libc::getpgid(0) };
        // SAFETY: as above.
        if cur != node.join_pgid && unsafe { libc::setpgid(0, node.join_pgid) } < 0 {
            return Err(os_err(&format!("joining process group {}", node.join_pgid)));
        }
    }
    report(ctx.status_w, STAGE_JOINED, pid);
    read_go(ctx.go[2])?;
    // Every group exists: the session leader gives its terminal's
    // foreground back to the group that had it.
    if let (true, Some((index, master)), NodeKind::Task(i)) =
        (node.setsid, pty_ctty(ctx, node)?, node.kind)
    {
        let pgrp = ctx.tree.procs[i].pstree.tty_pgrp as i32;
        if pgrp > 0 {
            crate::sys::tty::set_foreground(master, pgrp).map_err(|e| {
                format!("making group {pgrp} the foreground of pty {index} (TIOCSPGRP): {e}")
            })?;
        }
    }
    match node.kind {
        // SAFETY: _exit ends this helper without running cryo's
        // destructors; its children go to their subreaper.
        NodeKind::Helper => unsafe { libc::_exit(0) },
        NodeKind::Zombie(z) => become_zombie(ctx.tree.zombies[z].exit_status),
        NodeKind::Task(i) => {
            // Helpers made by this task are collected; zombies made by it
            // must have exited (they stay for the task's code to collect).
            for &c in &node.children {
                let child = &ctx.plan.nodes[c];
                let cpid = Pid::from_raw(child.pid);
                match child.kind {
                    NodeKind::Helper => {
                        let _ = waitpid(cpid, None);
                    }
                    NodeKind::Zombie(_) => {
                        // SAFETY: siginfo_t is plain data; waitid fills it.
                        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
                        // SAFETY: waitid with WNOWAIT leaves the child a
                        // zombie; `info` is ours.
                        let r = unsafe {
                            libc::waitid(
                                libc::P_PID,
                                child.pid as libc::id_t,
                                &mut info,
                                libc::WEXITED | libc::WNOWAIT,
                            )
                        };
                        if r < 0 {
                            return Err(os_err(&format!("waiting for zombie {}", child.pid)));
                        }
                    }
                    NodeKind::Task(_) => {}
                }
            }
            let fd = ctx.status_w;
            // The pipes of the barriers are not the task's.
            for g in ctx.go {
                // SAFETY: closing inherited descriptors we no longer need.
                unsafe { libc::close(g) };
            }
            child_main(ctx, i, fd)
        }
    }
}

/// The pty that was the controlling terminal of a task node (its index)
/// and the master of it this task inherited.
fn pty_ctty(ctx: &NodeCtx, node: &tree::Node) -> std::result::Result<Option<(u32, RawFd)>, String> {
    let NodeKind::Task(i) = node.kind else {
        return Ok(None);
    };
    let Some(index) = ctx.tree.procs[i].pstree.pty_ctty else {
        return Ok(None);
    };
    match ctx.pty_masters.get(&index) {
        Some(&m) => Ok(Some((index, m))),
        None => Err(format!(
            "its controlling terminal was pty {index}, whose master no process holds"
        )),
    }
}

/// A member of a session whose terminal is a pty of the tree that had
/// given it up (TIOCNOTTY) at the dump, but inherited it from the task
/// that made it, gives it up again. Before it creates its own children.
fn give_up_ctty(ctx: &NodeCtx, node: &tree::Node) -> std::result::Result<(), String> {
    let NodeKind::Task(i) = node.kind else {
        return Ok(());
    };
    let me = &ctx.tree.procs[i].pstree;
    let session_has_pty = ctx
        .tree
        .procs
        .iter()
        .any(|p| p.pstree.pid == me.sid && p.pstree.pty_ctty.is_some());
    if me.pty_ctty.is_some() || !session_has_pty {
        return Ok(());
    }
    use nix::fcntl::OFlag;
    let fd = match nix::fcntl::open(
        "/dev/tty",
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    ) {
        Ok(fd) => fd,
        // No controlling terminal: nothing to give up.
        Err(Errno::ENXIO) => return Ok(()),
        Err(e) => {
            return Err(format!(
                "opening its controlling terminal to give it up: {e}"
            ))
        }
    };
    crate::sys::tty::drop_controlling(fd.as_raw_fd())
        .map_err(|e| format!("giving up its controlling terminal (TIOCNOTTY): {e}"))
}

/// End the way the zombie ended: exit with its code, or die of its signal.
fn become_zombie(status: u32) -> ! {
    let sig = (status & 0x7f) as i32;
    if sig != 0 {
        // SAFETY: setting a resource limit and a signal disposition of this
        // task, then unblocking and raising the signal it died of.
        unsafe {
            let zero = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::setrlimit(libc::RLIMIT_CORE, &zero);
            libc::signal(sig, libc::SIG_DFL);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, sig);
            libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            libc::kill(libc::getpid(), sig);
        }
    }
    // SAFETY: _exit with the dumped code.
    unsafe { libc::_exit(((status >> 8) & 0xff) as i32) }
}

/// Parent side: follow every task of the tree as it is built (through
/// PTRACE_O_TRACEFORK/TRACECLONE every one is traced), run the barriers,
/// and once every restorer is done and every thread sits on its trap
/// before rt_sigreturn, step each over the sigreturn, remove each
/// bootstrap area and let them go.
fn supervise(
    tree: &TreeImage,
    plan: &Plan,
    status_r: OwnedFd,
    go1: &OwnedFd,
    go2: &OwnedFd,
) -> Result<()> {
    let root = tree.procs[0].pid();
    let sys = |what: &'static str| {
        move |errno: Errno| RestoreError::Sys {
            pid: root,
            what,
            errno,
        }
    };
    // Per process: its threads, bootstrap area, whether its restorer is done.
    struct Proc {
        pid: i32,
        threads: Vec<i32>,
        boot: Option<(u64, u64)>,
        done: bool,
    }
    let mut procs: Vec<Proc> = tree
        .procs
        .iter()
        .map(|p| Proc {
            pid: p.pid(),
            threads: p.threads.iter().map(|t| t.tid as i32).collect(),
            boot: None,
            done: false,
        })
        .collect();
    let tasks: std::collections::HashSet<i32> = procs
        .iter()
        .flat_map(|p| std::iter::once(p.pid).chain(p.threads.iter().copied()))
        .collect();
    let n_nodes = plan.nodes.len();
    let (mut created, mut joined) = (0usize, 0usize);
    let mut msg: Vec<u8> = Vec::new();
    let mut file = std::fs::File::from(status_r);
    let start = Instant::now();
    let mut eof = false;
    let mut trapped: std::collections::HashSet<i32> = std::collections::HashSet::new();
    let rs = std::mem::size_of::<RStatus>();
    loop {
        let all_done = procs.iter().all(|p| p.done);
        if all_done && tasks.iter().all(|t| trapped.contains(t)) {
            break;
        }
        if !eof {
            let mut pfd = [PollFd::new(file.as_fd(), PollFlags::POLLIN)];
            let n = poll(&mut pfd, PollTimeout::from(10u16)).map_err(sys("poll"))?;
            if n > 0 {
                let mut buf = [0u8; 4096];
                let got = file.read(&mut buf).map_err(|e| RestoreError::Sys {
                    pid: root,
                    what: "read status",
                    errno: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
                })?;
                if got == 0 {
                    eof = true;
                }
                msg.extend_from_slice(&buf[..got]);
            }
        } else if !all_done {
            return Err(RestoreError::Died {
                pid: root,
                what: "every task closed the status pipe before the restore finished".into(),
            });
        } else {
            std::thread::sleep(Duration::from_millis(1));
        }
        while msg.len() >= rs {
            let st: RStatus = crate::infect::from_bytes(&msg);
            let pid = st.pid as i32;
            if st.stage == STAGE_CHILD_ERR {
                let len = st.index as usize;
                if msg.len() < rs + len {
                    break; // the rest of the message is on its way
                }
                return Err(record_error(&st, &msg[rs..rs + len]));
            }
            msg.drain(..rs);
            match st.stage {
                STAGE_CREATED => {
                    created += 1;
                    if created == n_nodes {
                        nix::unistd::write(go1, &vec![b'g'; n_nodes]).map_err(sys("write"))?;
                    }
                }
                STAGE_JOINED => {
                    joined += 1;
                    if joined == n_nodes {
                        foreground_shell_jobs(tree, plan);
                        nix::unistd::write(go2, &vec![b'g'; n_nodes]).map_err(sys("write"))?;
                    }
                }
                STAGE_BOOT => {
                    if let Some(p) = procs.iter_mut().find(|p| p.pid == pid) {
                        p.boot = Some((st.err as u64, st.index as u64 * PAGE));
                    }
                }
                STAGE_DONE => {
                    if let Some(p) = procs.iter_mut().find(|p| p.pid == pid) {
                        p.done = true;
                    }
                }
                _ => return Err(record_error(&st, &[])),
            }
        }
        loop {
            let st = match waitpid(
                Pid::from_raw(-1),
                Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG),
            ) {
                Ok(WaitStatus::StillAlive) | Err(Errno::EINTR) => break,
                Ok(st) => st,
                Err(errno) => return Err(sys("waitpid")(errno)),
            };
            match st {
                // Fork and clone events, and each new task's first stop:
                // let them go on.
                WaitStatus::PtraceEvent(t, _, _) => {
                    let _ = ptrace::cont(t, None);
                }
                // The restorer's trap before rt_sigreturn. A leader writes
                // its success report before it traps, so the report may
                // still be in the pipe: the loop ends only once every
                // process reported too.
                WaitStatus::Stopped(t, Signal::SIGTRAP) if tasks.contains(&t.as_raw()) => {
                    trapped.insert(t.as_raw());
                }
                // Any other signal (SIGCHLD from helpers and zombies, cryo's
                // page threads' events) goes through.
                WaitStatus::Stopped(t, sig) => {
                    let _ = ptrace::cont(t, Some(sig));
                }
                WaitStatus::Exited(t, _) | WaitStatus::Signaled(t, _, _)
                    if !tasks.contains(&t.as_raw()) => {}
                st => {
                    let died = RestoreError::Died {
                        pid: st.pid().map(|p| p.as_raw()).unwrap_or(root),
                        what: format!("ended before the restore finished ({st:?})"),
                    };
                    // It may have said why just before it ended.
                    return Err(last_report(&mut file, &mut msg).unwrap_or(died));
                }
            }
        }
        if start.elapsed() > RESTORE_TIMEOUT {
            return Err(RestoreError::Timeout {
                pid: root,
                secs: RESTORE_TIMEOUT.as_secs(),
            });
        }
    }
    // Every task sits on the restorer's trap right before rt_sigreturn;
    // step each over the sigreturn so it sits in its restored context.
    for &t in trapped.iter() {
        let t = Pid::from_raw(t);
        let wait_syscall = || -> Result<()> {
            loop {
                match waitpid(t, Some(WaitPidFlag::__WALL)).map_err(sys("waitpid"))? {
                    WaitStatus::PtraceSyscall(_) => return Ok(()),
                    WaitStatus::PtraceEvent(..) => {
                        let _ = ptrace::cont(t, None);
                    }
                    st => {
                        return Err(RestoreError::Died {
                            pid: t.as_raw(),
                            what: format!(
                                "stopped unexpectedly ({st:?}) in its final rt_sigreturn"
                            ),
                        })
                    }
                }
            }
        };
        ptrace::syscall(t, None).map_err(sys("PTRACE_SYSCALL"))?;
        wait_syscall()?; // entry of rt_sigreturn
        ptrace::syscall(t, None).map_err(sys("PTRACE_SYSCALL"))?;
        wait_syscall()?; // exit: registers are the restored ones
    }
    // Unmap each bootstrap area from its leader, then let every task go.
    for p in &procs {
        let pid = p.pid;
        let mut v = Victim::attach_stopped(Pid::from_raw(pid))
            .map_err(|source| RestoreError::Finish { pid, source })?;
        if let Some((start, len)) = p.boot {
            v.syscall(libc::SYS_munmap as u64, [start, len, 0, 0, 0, 0])
                .map_err(|source| RestoreError::Finish { pid, source })?;
        }
        v.cure()
            .map_err(|source| RestoreError::Finish { pid, source })?;
    }
    for p in &procs {
        for &t in &p.threads {
            ptrace::detach(Pid::from_raw(t), None).map_err(sys("PTRACE_DETACH"))?;
        }
    }
    Ok(())
}

/// The device path of this session's controlling terminal: one of our
/// descriptors 0-2 on it (the usual case for cryo started from a shell),
/// else /dev/tty.
fn controlling_tty_path() -> String {
    let Some(st) = crate::pstree::stat(std::process::id() as i32) else {
        return "/dev/tty".into();
    };
    let ctty = st.ctty();
    for fd in 0..3 {
        let link = format!("/proc/self/fd/{fd}");
        let Ok(md) = std::fs::metadata(&link) else {
            continue;
        };
        if st.tty_nr != 0 && std::os::unix::fs::MetadataExt::rdev(&md) == ctty {
            if let Ok(p) = std::fs::read_link(&link) {
                return p.display().to_string();
            }
        }
    }
    "/dev/tty".into()
}

/// A shell job that was in the foreground of its terminal is made the
/// foreground group of the restoring session's terminal again.
fn foreground_shell_jobs(tree: &TreeImage, plan: &Plan) {
    for r in plan.roots() {
        let n = &plan.nodes[r];
        let NodeKind::Task(i) = n.kind else { continue };
        if !tree.procs[i].pstree.tty_foreground || !(n.group_leader || n.setsid) {
            continue;
        }
        // SAFETY: opening our controlling terminal; tcsetpgrp with SIGTTOU
        // blocked (cryo may be in a background group); the mask is put back.
        unsafe {
            let fd = libc::open(
                c"/dev/tty".as_ptr(),
                libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
            );
            if fd < 0 {
                continue;
            }
            let mut set: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTTOU);
            libc::sigprocmask(libc::SIG_BLOCK, &set, &mut old);
            if libc::tcsetpgrp(fd, n.pid) < 0 {
                tracing::warn!(
                    pid = n.pid,
                    "could not make the shell job the terminal's foreground group: {}",
                    std::io::Error::last_os_error()
                );
            }
            libc::sigprocmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
            libc::close(fd);
        }
    }
}

/// The first failure report in what is left of the status pipe (read
/// until it is empty for a moment), if any: a task that ends on an error
/// writes its report first, which is a better message than its exit.
fn last_report(file: &mut std::fs::File, msg: &mut Vec<u8>) -> Option<RestoreError> {
    loop {
        let mut pfd = [PollFd::new(file.as_fd(), PollFlags::POLLIN)];
        if !matches!(poll(&mut pfd, PollTimeout::from(50u16)), Ok(n) if n > 0) {
            break;
        }
        let mut buf = [0u8; 4096];
        match file.read(&mut buf) {
            Ok(n) if n > 0 => msg.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    let rs = std::mem::size_of::<RStatus>();
    let mut off = 0;
    while msg.len() >= off + rs {
        let st: RStatus = crate::infect::from_bytes(&msg[off..]);
        if st.stage == STAGE_CHILD_ERR {
            let text = msg.get(off + rs..off + rs + st.index as usize)?;
            return Some(record_error(&st, text));
        }
        if !matches!(
            st.stage,
            STAGE_CREATED | STAGE_JOINED | STAGE_BOOT | STAGE_DONE
        ) {
            return Some(record_error(&st, &[]));
        }
        off += rs;
    }
    None
}

/// The error a failure record of the status pipe reports: a message from
/// cryo's code in the task (`text`), or the restorer's stage and errno.
fn record_error(st: &RStatus, text: &[u8]) -> RestoreError {
    let pid = st.pid as i32;
    if st.stage == STAGE_CHILD_ERR {
        return RestoreError::Child {
            pid,
            message: String::from_utf8_lossy(text).into_owned(),
        };
    }
    RestoreError::Restorer {
        pid,
        stage: stage_name(st.stage).to_string(),
        index: st.index,
        errno: Errno::from_raw((-st.err) as i32),
    }
}

/// Child side, running as the new task with the dumped pid. Never returns.
fn child_main(ctx: &NodeCtx, i: usize, status_w: RawFd) -> ! {
    let img = &ctx.tree.procs[i];
    STATUS_FD.store(status_w, std::sync::atomic::Ordering::Relaxed);
    match prepare(ctx, i, status_w) {
        Ok(never) => match never {},
        Err(msg) => report_error_and_exit(img.pid(), &msg),
    }
}

enum Never {}

/// Where the new task reports errors (the status pipe moves during setup).
static STATUS_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// A bump allocator over the bootstrap area.
struct Boot {
    base: u64,
    ptr: *mut u8,
    len: usize,
    used: usize,
}

impl Boot {
    fn alloc(&mut self, size: usize, align: usize) -> std::result::Result<(u64, *mut u8), String> {
        let off = (self.used + align - 1) & !(align - 1);
        if off + size > self.len {
            return Err(format!(
                "bootstrap area too small ({} bytes needed)",
                off + size
            ));
        }
        self.used = off + size;
        // SAFETY: off + size <= len, so the pointer stays in the mapping.
        Ok((self.base + off as u64, unsafe { self.ptr.add(off) }))
    }

    fn put<T: Copy>(&mut self, items: &[T]) -> std::result::Result<u64, String> {
        let size = std::mem::size_of_val(items);
        let (addr, p) = self.alloc(size.max(1), 64)?;
        // SAFETY: `p` points to `size` writable bytes just reserved in the
        // bootstrap mapping, aligned to 64 (>= align_of::<T>() for the ABI
        // structs); `items` cannot overlap it.
        unsafe { std::ptr::copy_nonoverlapping(items.as_ptr() as *const u8, p, size) };
        Ok(addr)
    }
}

fn os_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn cstr(s: &str) -> std::result::Result<CString, String> {
    CString::new(s).map_err(|_| format!("path {s:?} contains a NUL byte"))
}

fn regs_from(core: &CoreEntry) -> Regs {
    // SAFETY: user_regs_struct is plain integers; zero is a valid value.
    let mut r: Regs = unsafe { std::mem::zeroed() };
    if let Some(g) = &core.regs {
        r.r15 = g.r15;
        r.r14 = g.r14;
        r.r13 = g.r13;
        r.r12 = g.r12;
        r.rbp = g.rbp;
        r.rbx = g.rbx;
        r.r11 = g.r11;
        r.r10 = g.r10;
        r.r9 = g.r9;
        r.r8 = g.r8;
        r.rax = g.rax;
        r.rcx = g.rcx;
        r.rdx = g.rdx;
        r.rsi = g.rsi;
        r.rdi = g.rdi;
        r.orig_rax = g.orig_rax;
        r.rip = g.rip;
        r.cs = g.cs;
        r.eflags = g.eflags;
        r.rsp = g.rsp;
        r.ss = g.ss;
        r.fs_base = g.fs_base;
        r.gs_base = g.gs_base;
    }
    r
}

/// Everything the new task does before jumping into the restorer.
fn prepare(ctx: &NodeCtx, me: usize, status_w: RawFd) -> std::result::Result<Never, String> {
    let img = &ctx.tree.procs[me];
    let pages = &ctx.readers[me];
    let shm = ctx.shm;
    // Test hook: a restore failing in one task of the tree, the others
    // created and on their way.
    if img.pstree.ppid != 0 && crate::fault::check(&format!("restore-task-{}", img.pstree.pid)) {
        return Err("injected failure (CRYO_FAULT)".into());
    }
    let mm_name = cryo_image::mm_file(img.pstree.pid);
    // Back into the dumped cgroups first, so that the memory set up below
    // is charged to them. They must exist (creating cgroups comes later).
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let pc0 = img.core.process.clone().unwrap_or_default();
    for e in &pc0.cgroups {
        let dir = crate::cgroup::cgroup_dir(&mountinfo, e).ok_or_else(|| {
            format!(
                "cgroup {} of hierarchy {} ({}) is not mounted here",
                e.path, e.hierarchy, e.controllers
            )
        })?;
        let procs = dir.join("cgroup.procs");
        if let Err(err) = std::fs::write(&procs, "0") {
            return Err(format!("joining cgroup {}: {err}", dir.display()));
        }
    }
    // Block every signal until the final sigreturn sets the dumped mask.
    // SAFETY: sigset_t is plain data, filled by sigfillset.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::sigprocmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
    }

    // 1. Address space plan: bootstrap + premap in a hole free both here
    // and in the dumped layout. Map it first, before anything else here
    // allocates memory.
    let vmas = &img.mm.vmas;
    let premap_len: u64 = vmas
        .iter()
        .filter(|v| needs_premap(v))
        .map(|v| v.end - v.start)
        .sum();
    let probe = Blob::load("restorer", RESTORER_ELF, 0).map_err(|e| e.to_string())?;
    let vdso_now = own_vdso();
    let vdso_span = match (vdso_now.first(), vdso_now.last()) {
        (Some(f), Some(l)) => l.1 - f.0,
        _ => 0,
    };
    let xs_len = img.core.xsave.len() as u64;
    let per_thread = THREAD_STACK + xs_len + 4096 + 64 * 4;
    let boot_len = probe.image.len() as u64
        + 64 * 1024
        + ((vmas.len() as u64 * 48 + xs_len + 16 * 1024 + 4095) & !4095)
        + vdso_span
        + BOOT_STACK
        + ((img.threads.len() as u64 * per_thread + 4095) & !4095);
    let mut busy = own_maps();
    busy.extend(vmas.iter().map(|v| (v.start, v.end)));
    let total = boot_len + premap_len + PAGE;
    let hole = find_hole(&busy, total)
        .ok_or_else(|| format!("no free address range of {total} bytes for the restorer"))?;
    let boot_base = hole;
    let premap_base = hole + boot_len + PAGE;
    // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping; the
    // range was chosen free and is not in use by any Rust object.
    let p = unsafe {
        libc::mmap(
            boot_base as *mut libc::c_void,
            boot_len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED || p as u64 != boot_base {
        return Err(os_err("mapping the bootstrap area"));
    }
    // Tell the parent where the bootstrap area is, so it can remove it
    // once the task runs in its own context.
    let boot_msg = RStatus {
        stage: STAGE_BOOT,
        index: (boot_len / PAGE) as u32,
        err: boot_base as i64,
        pid: img.pstree.pid,
        _pad: 0,
    };
    send_status(status_w, &boot_msg);
    if premap_len > 0 {
        // SAFETY: as above, a fresh range; PROT_NONE reservation carved below.
        let p = unsafe {
            libc::mmap(
                premap_base as *mut libc::c_void,
                premap_len as usize,
                libc::PROT_NONE,
                libc::MAP_PRIVATE
                    | libc::MAP_ANONYMOUS
                    | libc::MAP_FIXED_NOREPLACE
                    | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED || p as u64 != premap_base {
            return Err(os_err("reserving memory for the mappings"));
        }
    }

    // 4. Premap every private mapping and fill it from the pages file.
    let mut rvmas: Vec<RVma> = Vec::new();
    let mut close_fds: Vec<i32> = Vec::new();
    let mut off = premap_base;
    let mut premap_of: Vec<(u64, u64, u64)> = Vec::new(); // (start, end, premap)
    for v in vmas.iter() {
        let len = v.end - v.start;
        let madv = v.vm_flags.iter().fold(0u32, |m, f| {
            m | match f.as_str() {
                "dd" => RVMA_DONTDUMP,
                "dc" => RVMA_DONTFORK,
                "wf" => RVMA_WIPEONFORK,
                "hg" => RVMA_HUGEPAGE,
                "nh" => RVMA_NOHUGEPAGE,
                _ => 0,
            }
        });
        match kind(v) {
            VmaKind::VmaAnonPrivate
            | VmaKind::VmaHeap
            | VmaKind::VmaStack
            | VmaKind::VmaAnonShared
            | VmaKind::VmaFilePrivate => {
                let shared = kind(v) == VmaKind::VmaAnonShared;
                let mut flags = libc::MAP_FIXED
                    | if shared {
                        libc::MAP_SHARED
                    } else {
                        libc::MAP_PRIVATE
                    };
                if v.vm_flags.iter().any(|f| f == "gd") {
                    flags |= libc::MAP_GROWSDOWN;
                }
                let prot = libc::PROT_READ | libc::PROT_WRITE;
                let p = if kind(v) == VmaKind::VmaFilePrivate {
                    let path = cstr(&v.path)?;
                    // SAFETY: NUL-terminated path we own.
                    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
                    if fd < 0 {
                        return Err(format!(
                            "{mm_name}: opening {} for the mapping at {:#x}: {}",
                            v.path,
                            v.start,
                            std::io::Error::last_os_error()
                        ));
                    }
                    if let Err(e) = check_file_extent(fd, v, &mm_name) {
                        // SAFETY: closing our own temporary descriptor.
                        unsafe { libc::close(fd) };
                        return Err(e);
                    }
                    // SAFETY: maps the file over our own reservation (MAP_FIXED
                    // inside the PROT_NONE range reserved above).
                    let p = unsafe {
                        libc::mmap(
                            off as *mut libc::c_void,
                            len as usize,
                            prot,
                            flags,
                            fd,
                            v.pgoff as i64,
                        )
                    };
                    // SAFETY: closing our temporary descriptor; the mapping keeps the file.
                    unsafe { libc::close(fd) };
                    p
                } else if shared {
                    // The one object of the tree, made by cryo before it
                    // created the tasks.
                    let fd = *shm.get(&v.shmid).ok_or_else(|| {
                        format!(
                            "{mm_name}: no shared object {} for the mapping at {:#x}",
                            v.shmid, v.start
                        )
                    })?;
                    // SAFETY: maps the inherited shmem file over our own
                    // reservation (MAP_FIXED inside the PROT_NONE range).
                    unsafe {
                        libc::mmap(
                            off as *mut libc::c_void,
                            len as usize,
                            prot,
                            flags,
                            fd,
                            v.pgoff as i64,
                        )
                    }
                } else {
                    // SAFETY: anonymous mapping over our own reservation.
                    unsafe {
                        libc::mmap(
                            off as *mut libc::c_void,
                            len as usize,
                            prot,
                            flags | libc::MAP_ANONYMOUS,
                            -1,
                            0,
                        )
                    }
                };
                if p == libc::MAP_FAILED {
                    return Err(format!(
                        "{mm_name}: preparing the mapping at {:#x}: {}",
                        v.start,
                        std::io::Error::last_os_error()
                    ));
                }
                premap_of.push((v.start, v.end, off));
                rvmas.push(RVma {
                    start: v.start,
                    len,
                    premap: off,
                    prot: v.prot,
                    flags: 0,
                    pgoff: 0,
                    fd: -1,
                    madv,
                });
                off += len;
            }
            VmaKind::VmaFileShared => {
                // The descriptor is opened once the dumped ones are in place.
                rvmas.push(RVma {
                    start: v.start,
                    len,
                    premap: 0,
                    prot: v.prot,
                    flags: libc::MAP_SHARED as u32,
                    pgoff: v.pgoff,
                    fd: -1,
                    madv,
                });
            }
            _ => {}
        }
    }
    fill_pages(img, pages, &premap_of)?;
    fill_from_parents(ctx, me, &premap_of)?;

    // 2. Descriptors: keep ours above every dumped number, close the rest,
    // then open the dumped ones.
    let max_fd = img
        .fds
        .iter()
        .map(|f| f.fd as i32)
        .max()
        .unwrap_or(2)
        .max(2);
    let high = max_fd + 1;
    let mut keep: Vec<RawFd> = Vec::new();
    let dup_high = |fd: RawFd, keep: &mut Vec<RawFd>| -> std::result::Result<RawFd, String> {
        // SAFETY: F_DUPFD_CLOEXEC on a descriptor we own.
        let n = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, high + keep.len() as i32) };
        if n < 0 {
            return Err(os_err("moving a descriptor"));
        }
        keep.push(n);
        Ok(n)
    };
    let status_fd = dup_high(status_w, &mut keep)?;
    STATUS_FD.store(status_fd, std::sync::atomic::Ordering::Relaxed);
    // SAFETY: closing the old number of the status pipe, now moved.
    unsafe { libc::close(status_w) };
    // The open file descriptions cryo made for the whole tree (inherited
    // from it): the ones this task uses move into the kept block too.
    let per_task = |id: u32| {
        img.files.iter().find(|f| f.id == id).filter(|f| {
            f.kind == FileKind::FileEpoll as i32 || f.kind == FileKind::FilePidfd as i32
        })
    };
    let mut moved: Vec<(u32, RawFd)> = Vec::new();
    for e in &img.fds {
        if moved.iter().any(|m| m.0 == e.id) || per_task(e.id).is_some() {
            continue;
        }
        let src = *ctx
            .files
            .get(&e.id)
            .ok_or_else(|| format!("fd {}: no open file {} was made for it", e.fd, e.id))?;
        moved.push((e.id, dup_high(src, &mut keep)?));
    }
    // Close everything below our kept block and after it.
    let lo = *keep.iter().min().unwrap_or(&high);
    let hi = *keep.iter().max().unwrap_or(&high);
    // SAFETY: close_range only closes descriptors; none below `lo` or above
    // `hi` is used by this code any more (the pages file is read already).
    unsafe {
        libc::syscall(libc::SYS_close_range, 0u32, (lo - 1) as u32, 0u32);
        libc::syscall(libc::SYS_close_range, (hi + 1) as u32, u32::MAX, 0u32);
    }
    // Inherited descriptors cryo's copies landed around.
    for fd in lo..=hi {
        if !keep.contains(&fd) {
            // SAFETY: closing a descriptor inherited from cryo that this
            // task does not use (closing a free number is harmless).
            unsafe { libc::close(fd) };
        }
    }
    for e in img.fds.iter().filter(|e| per_task(e.id).is_none()) {
        let src = moved
            .iter()
            .find(|m| m.0 == e.id)
            .map(|m| m.1)
            .ok_or("fd without file")?;
        let cloexec = if e.cloexec { libc::O_CLOEXEC } else { 0 };
        // SAFETY: dup3 onto a number we closed above; it shares the open
        // file description (offset, flags) with every other user of it.
        if unsafe { libc::dup3(src, e.fd as i32, cloexec) } < 0 {
            return Err(os_err(&format!("fd {}: dup3", e.fd)));
        }
    }
    for (_, fd) in moved {
        // SAFETY: closing our kept copies; the task's own numbers stay.
        unsafe { libc::close(fd) };
    }
    // pidfds, then epolls (their targets are all in place by now).
    let mut later: Vec<(&cryo_image::proto::FdEntry, &FileEntry)> = img
        .fds
        .iter()
        .filter_map(|e| per_task(e.id).map(|f| (e, f)))
        .collect();
    later.sort_by_key(|(e, f)| (f.kind == FileKind::FileEpoll as i32, e.fd));
    for (e, f) in later {
        let tmp = if f.kind == FileKind::FilePidfd as i32 {
            // SAFETY: pidfd_open with integer arguments; the process exists
            // (every task of the tree was made before any prepares).
            unsafe { libc::syscall(libc::SYS_pidfd_open, f.pidfd_pid as i32, 0) as i32 }
        } else {
            // SAFETY: a new epoll instance.
            unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) }
        };
        if tmp < 0 {
            return Err(os_err(&format!("fd {}: making its {}", e.fd, f.path)));
        }
        let cloexec = if e.cloexec { libc::O_CLOEXEC } else { 0 };
        // SAFETY: moving our new descriptor onto its dumped number, free
        // since the close_range above.
        unsafe {
            if tmp != e.fd as i32 {
                if libc::dup3(tmp, e.fd as i32, cloexec) < 0 {
                    return Err(os_err(&format!("fd {}: dup3", e.fd)));
                }
                libc::close(tmp);
            } else if !e.cloexec {
                libc::fcntl(tmp, libc::F_SETFD, 0);
            }
            libc::fcntl(
                e.fd as i32,
                libc::F_SETFL,
                f.flags as i32 & (libc::O_NONBLOCK | libc::O_APPEND),
            );
        }
        for t in f.epoll.iter().flat_map(|s| s.targets.iter()) {
            let mut ev = libc::epoll_event {
                events: t.events,
                u64: t.data,
            };
            // SAFETY: adding the task's own descriptor to its own epoll
            // with an event we own.
            if unsafe { libc::epoll_ctl(e.fd as i32, libc::EPOLL_CTL_ADD, t.tfd as i32, &mut ev) }
                < 0
            {
                return Err(os_err(&format!(
                    "fd {}: watching fd {} again (events {:#x})",
                    e.fd, t.tfd, t.events
                )));
            }
        }
    }

    // 3. Filesystem context.
    let pc = img.core.process.clone().unwrap_or_default();
    if pc.root != "/" {
        return Err(format!(
            "the task's root was {}; restoring a chrooted task is not supported yet",
            pc.root
        ));
    }
    let cwd = cstr(&pc.cwd)?;
    // SAFETY: NUL-terminated path we own.
    if unsafe { libc::chdir(cwd.as_ptr()) } < 0 {
        return Err(format!(
            "changing to the working directory {}: {}",
            pc.cwd,
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: umask cannot fail.
    unsafe { libc::umask(pc.umask as libc::mode_t) };

    // Shared file mappings are mapped by the restorer from these.
    for (rv, v) in rvmas
        .iter_mut()
        .filter(|r| r.premap == 0)
        .zip(vmas.iter().filter(|v| kind(v) == VmaKind::VmaFileShared))
    {
        let path = cstr(&v.path)?;
        let oflags = if v.file_flags as i32 & libc::O_ACCMODE == libc::O_RDWR {
            libc::O_RDWR
        } else {
            libc::O_RDONLY
        };
        // SAFETY: NUL-terminated path we own.
        let fd = unsafe { libc::open(path.as_ptr(), oflags | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(format!(
                "{mm_name}: opening {} for the shared mapping at {:#x}: {}",
                v.path,
                v.start,
                std::io::Error::last_os_error()
            ));
        }
        close_fds.push(fd);
        rv.fd = fd;
        check_file_extent(fd, v, &mm_name)?;
    }

    // 5. exe link.
    let exe = cstr(&img.mm.exe_path)?;
    // SAFETY: NUL-terminated path we own.
    let exe_fd = unsafe { libc::open(exe.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if exe_fd < 0 {
        return Err(format!(
            "{mm_name}: opening the executable {}: {}",
            img.mm.exe_path,
            std::io::Error::last_os_error()
        ));
    }
    close_fds.push(exe_fd);

    // 6. vdso: ours must match the dumped layout part for part.
    let dumped_vdso: Vec<&Vma> = vmas.iter().filter(|v| is_vdso(v)).collect();
    let mut vdso_parts = [Range::default(); 4];
    for (i, p) in vdso_now.iter().take(4).enumerate() {
        vdso_parts[i] = Range {
            start: p.0,
            end: p.1,
        };
    }
    let vdso_dst = if dumped_vdso.is_empty() {
        0
    } else {
        let same = dumped_vdso.len() == vdso_now.len()
            && dumped_vdso.iter().zip(vdso_now.iter()).all(|(d, n)| {
                d.end - d.start == n.1 - n.0
                    && d.start - dumped_vdso[0].start == n.0 - vdso_now[0].0
            });
        if !same {
            return Err(format!("{mm_name}: the dumped vdso/vvar layout differs from this kernel's; restoring across kernels is not supported yet"));
        }
        dumped_vdso[0].start
    };

    // 7. The bootstrap area: restorer blob, arguments, frame, stack.
    let blob = Blob::load("restorer", RESTORER_ELF, boot_base).map_err(|e| e.to_string())?;
    let mut boot = Boot {
        base: boot_base,
        ptr: boot_base as *mut u8,
        len: boot_len as usize,
        used: 0,
    };
    let (_, bp) = boot.alloc(blob.image.len(), 4096)?;
    // SAFETY: bp points to blob.image.len() bytes just reserved.
    unsafe { std::ptr::copy_nonoverlapping(blob.image.as_ptr(), bp, blob.image.len()) };
    let (scratch, _) = boot.alloc(vdso_span.max(PAGE) as usize, 4096)?;
    let (stack_lo, _) = boot.alloc(BOOT_STACK as usize, 4096)?;
    let stack_top = stack_lo + BOOT_STACK - 64;

    let mut regs = regs_from(&img.core);
    sigframe::apply_syscall_restart(&mut regs);
    let alt = img.core.altstack.unwrap_or_default();
    let altstack = KStack {
        sp: alt.sp,
        flags: alt.flags as i32,
        _pad: 0,
        size: alt.size,
    };
    let fp = sigframe::build_fpstate(&img.core.xsave);
    let fp_at = boot.put(&fp)?;
    let frame = sigframe::build_frame(&regs, img.core.blocked, &altstack, fp_at);
    let frame_at = boot.put(&frame)?;

    let mut keep_ranges = vec![Range {
        start: boot_base,
        end: boot_base + boot_len,
    }];
    if premap_len > 0 {
        keep_ranges.push(Range {
            start: premap_base,
            end: premap_base + premap_len,
        });
    }
    if let (Some(f), Some(l)) = (vdso_now.first(), vdso_now.last()) {
        keep_ranges.push(Range {
            start: f.0,
            end: l.1,
        });
    }
    keep_ranges.sort_by_key(|r| r.start);

    let auxv_at = boot.put(&img.mm.auxv)?;
    let auxv_size = (img.mm.auxv.len() * 8).min(448) as u32;
    let mm_map = PrctlMmMap {
        start_code: img.mm.start_code,
        end_code: img.mm.end_code,
        start_data: img.mm.start_data,
        end_data: img.mm.end_data,
        start_brk: img.mm.start_brk,
        brk: img.mm.brk,
        start_stack: img.mm.start_stack,
        arg_start: img.mm.arg_start,
        arg_end: img.mm.arg_end,
        env_start: img.mm.env_start,
        env_end: img.mm.env_end,
        auxv: auxv_at,
        auxv_size,
        exe_fd: exe_fd as u32,
    };
    let mut sigactions = [KSigaction::default(); NSIG];
    let mut sigaction_mask = 0u64;
    for a in &pc.sigactions {
        let s = a.signo as usize;
        if (1..=NSIG).contains(&s) && s != 9 && s != 19 {
            sigactions[s - 1] = KSigaction {
                handler: a.handler,
                flags: a.flags,
                restorer: a.restorer,
                mask: a.mask,
            };
            sigaction_mask |= 1 << (s - 1);
        }
    }
    let mut itimers = [KItimerval::default(); 3];
    for t in &pc.itimers {
        if let Some(slot) = itimers.get_mut(t.which as usize) {
            *slot = KItimerval {
                interval_sec: (t.interval_us / 1_000_000) as i64,
                interval_usec: (t.interval_us % 1_000_000) as i64,
                value_sec: (t.value_us / 1_000_000) as i64,
                value_usec: (t.value_us % 1_000_000) as i64,
            };
        }
    }
    let timers: Vec<RTimer> = pc
        .posix_timers
        .iter()
        .map(|t| RTimer {
            id: t.id,
            clock_id: t.clock_id,
            notify: t.notify,
            signo: t.signo,
            sigev_value: t.sigev_value,
            notify_tid: if t.notify & 4 != 0 { t.notify_tid } else { 0 },
            _pad: 0,
            spec: KItimerspec {
                interval_sec: (t.interval_ns / 1_000_000_000) as i64,
                interval_nsec: (t.interval_ns % 1_000_000_000) as i64,
                // A timer that was about to fire fires right away.
                value_sec: (t.value_ns / 1_000_000_000) as i64,
                value_nsec: if t.value_ns == 0 && t.interval_ns == 0 {
                    0
                } else {
                    (t.value_ns % 1_000_000_000).max(if t.value_ns == 0 { 1 } else { 0 }) as i64
                },
            },
        })
        .collect();
    let mut siginfos: Vec<RSiginfo> = Vec::new();
    for (list, private) in [(&pc.shared_pending, 0u32), (&img.core.pending, 1u32)] {
        for s in list.iter() {
            let mut info = [0u8; 128];
            let n = s.siginfo.len().min(128);
            info[..n].copy_from_slice(&s.siginfo[..n]);
            siginfos.push(RSiginfo {
                info,
                private,
                _pad: 0,
            });
        }
    }
    let threads_ready = boot.put(&[0u32; 16])?;
    let mut rthreads: Vec<RThread> = Vec::with_capacity(img.threads.len());
    for (i, t) in img.threads.iter().enumerate() {
        let (stack, _) = boot.alloc(THREAD_STACK as usize, 4096)?;
        let mut tregs = regs_from(t);
        sigframe::apply_syscall_restart(&mut tregs);
        let alt = t.altstack.unwrap_or_default();
        let alt = KStack {
            sp: alt.sp,
            flags: alt.flags as i32,
            _pad: 0,
            size: alt.size,
        };
        let fp_at = boot.put(&sigframe::build_fpstate(&t.xsave))?;
        let tframe = boot.put(&sigframe::build_frame(&tregs, t.blocked, &alt, fp_at))?;
        let tc = t.creds.clone().unwrap_or_default();
        let tgroups = boot.put(&tc.groups)?;
        let trseq = t.rseq.unwrap_or_default();
        let tsigs: Vec<RSiginfo> = t
            .pending
            .iter()
            .map(|s| {
                let mut info = [0u8; 128];
                let n = s.siginfo.len().min(128);
                info[..n].copy_from_slice(&s.siginfo[..n]);
                RSiginfo {
                    info,
                    private: 1,
                    _pad: 0,
                }
            })
            .collect();
        let tsigs_at = boot.put(&tsigs)?;
        rthreads.push(RThread {
            tid: t.tid as u64,
            stack,
            stack_size: THREAD_STACK,
            sigframe: tframe,
            fs_base: tregs.fs_base,
            gs_base: tregs.gs_base,
            clear_child_tid: t.clear_child_tid,
            robust_list: t.robust_list,
            robust_list_len: t.robust_list_len,
            rseq_ptr: trseq.ptr,
            rseq_len: trseq.len,
            rseq_sig: trseq.sig,
            rseq_cs: trseq.rseq_cs,
            comm: comm_bytes(&t.comm),
            groups: tgroups,
            nr_groups: tc.groups.len() as u64,
            set_creds: (tc.uid.len() == 4 && tc.gid.len() == 4) as u64,
            creds: rcreds(&tc),
            pdeath_signal: t.pdeath_signal as u64,
            siginfos: tsigs_at,
            nr_siginfos: tsigs.len() as u64,
            ready: threads_ready,
            status_fd,
            index: i as u32,
        });
    }
    let threads_at = boot.put(&rthreads)?;
    let rlimits: Vec<RRlimit> = pc
        .rlimits
        .iter()
        .map(|l| RRlimit {
            resource: l.resource,
            _pad: 0,
            cur: l.cur,
            max: l.max,
        })
        .collect();
    let creds = img.core.creds.clone().unwrap_or_default();
    let groups: Vec<u32> = creds.groups.clone();
    let comm = comm_bytes(&img.core.comm);
    let rseq = img.core.rseq.unwrap_or_default();
    // Our own rseq registration (glibc's), to drop before the switch.
    // SAFETY: reading two plain statics exported by glibc.
    let (rseq_off, rseq_size) = unsafe { (__rseq_offset, __rseq_size) };
    let own_rseq_ptr = if rseq_size > 0 {
        let mut fs: u64 = 0;
        // SAFETY: ARCH_GET_FS writes the fs base into `fs`.
        unsafe { libc::syscall(libc::SYS_arch_prctl, 0x1003, &mut fs as *mut u64) };
        (fs as i64 + rseq_off as i64) as u64
    } else {
        0
    };

    let keep_at = boot.put(&keep_ranges)?;
    let vmas_at = boot.put(&rvmas)?;
    let close_at = boot.put(&close_fds)?;
    let timers_at = boot.put(&timers)?;
    let sig_at = boot.put(&siginfos)?;
    let rl_at = boot.put(&rlimits)?;
    let groups_at = boot.put(&groups)?;
    let args = RestoreArgs {
        status_fd,
        trap_before_sigreturn: 1,
        keep: keep_at,
        nr_keep: keep_ranges.len() as u64,
        vmas: vmas_at,
        nr_vmas: rvmas.len() as u64,
        vdso_parts,
        nr_vdso_parts: vdso_now.len().min(4) as u64,
        vdso_dst,
        vdso_scratch: scratch,
        mm_map,
        close_fds: close_at,
        nr_close_fds: close_fds.len() as u64,
        own_rseq_ptr,
        own_rseq_len: if own_rseq_ptr != 0 {
            rseq_size.max(32)
        } else {
            0
        },
        own_rseq_sig: 0x5305_3053,
        rseq_ptr: rseq.ptr,
        rseq_len: rseq.len,
        rseq_sig: rseq.sig,
        rseq_cs: rseq.rseq_cs,
        clear_child_tid: img.core.clear_child_tid,
        robust_list: img.core.robust_list,
        robust_list_len: img.core.robust_list_len,
        comm,
        personality: pc.personality as u64,
        sigactions,
        sigaction_mask,
        itimers,
        timers: timers_at,
        nr_timers: timers.len() as u64,
        siginfos: sig_at,
        nr_siginfos: siginfos.len() as u64,
        rlimits: rl_at,
        nr_rlimits: rlimits.len() as u64,
        child_subreaper: pc.child_subreaper as u64,
        dumpable: pc.dumpable as u64,
        pdeath_signal: pc.pdeath_signal as u64,
        fs_base: regs.fs_base,
        gs_base: regs.gs_base,
        groups: groups_at,
        nr_groups: groups.len() as u64,
        set_groups: 1,
        set_creds: (creds.uid.len() == 4 && creds.gid.len() == 4) as u64,
        creds: rcreds(&creds),
        sigframe: frame_at,
        threads: threads_at,
        nr_threads: rthreads.len() as u64,
        threads_ready,
    };
    let args_at = boot.put(std::slice::from_ref(&args))?;
    // Blob text becomes read-only executable.
    if blob.text.1 > blob.text.0 {
        // SAFETY: mprotect of the blob's text pages inside our bootstrap mapping.
        let r = unsafe {
            libc::mprotect(
                (boot_base + blob.text.0 as u64) as *mut libc::c_void,
                blob.text.1 - blob.text.0,
                libc::PROT_READ | libc::PROT_EXEC,
            )
        };
        if r < 0 {
            return Err(os_err("mprotect of the restorer"));
        }
    }
    let entry = boot_base + blob.entry as u64;
    // SAFETY: the restorer blob is mapped executable at boot_base with its
    // relocations applied; `args_at` points to a complete RestoreArgs and
    // `stack_top` into its own stack, all inside the bootstrap area, which
    // the restorer keeps. It never returns.
    unsafe {
        std::arch::asm!(
            "mov rsp, {sp}",
            "call {entry}",
            "ud2",
            sp = in(reg) stack_top,
            entry = in(reg) entry,
            in("rdi") args_at,
            options(noreturn),
        );
    }
}

/// A thread name as the 16-byte, NUL-terminated buffer PR_SET_NAME takes.
fn comm_bytes(name: &str) -> [u8; 16] {
    let mut comm = [0u8; 16];
    let b = name.as_bytes();
    comm[..b.len().min(15)].copy_from_slice(&b[..b.len().min(15)]);
    comm
}

fn rcreds(c: &Creds) -> RCreds {
    RCreds {
        uids: c
            .uid
            .get(..4)
            .and_then(|u| u.try_into().ok())
            .unwrap_or_default(),
        gids: c
            .gid
            .get(..4)
            .and_then(|g| g.try_into().ok())
            .unwrap_or_default(),
        cap_inh: c.cap_inh,
        cap_prm: c.cap_prm,
        cap_eff: c.cap_eff,
        cap_bnd: c.cap_bnd,
        cap_amb: c.cap_amb,
        securebits: c.securebits,
        no_new_privs: c.no_new_privs as u32,
    }
}

/// A mapped file that shrank since the dump would make pages the task
/// could read raise SIGBUS: refuse that.
fn check_file_extent(fd: RawFd, v: &Vma, mm_name: &str) -> std::result::Result<(), String> {
    // SAFETY: fd is a descriptor the caller just opened and still owns;
    // the borrow does not outlive this call.
    let bfd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let st =
        nix::sys::stat::fstat(bfd).map_err(|e| format!("{mm_name}: fstat of {}: {e}", v.path))?;
    let covered = v.file_size.min(v.pgoff + (v.end - v.start));
    let now = st.st_size as u64;
    if now < covered {
        return Err(format!(
            "{mm_name}: {} is {now} bytes now but was {} at the dump; the mapping at {:#x} would lose pages",
            v.path, v.file_size, v.start
        ));
    }
    Ok(())
}

/// Where a page of a process's image is.
enum PageAt {
    /// Stored page number `n` of its pages file.
    Stored(u64),
    /// The parent's page at the same address.
    Parent,
    /// Not in the image (it read as zero).
    Absent,
}

/// The runs of one image by address: (start, end, first stored page
/// number, or None for the parent's pages), for binary search.
fn run_index(img: &Image) -> Vec<(u64, u64, Option<u64>)> {
    let mut stored = 0u64;
    img.runs
        .iter()
        .map(|r| {
            let end = r.vaddr + r.nr_pages as u64 * PAGE;
            if r.flags & cryo_image::PAGE_IN_PARENT != 0 {
                (r.vaddr, end, None)
            } else {
                stored += r.nr_pages as u64;
                (r.vaddr, end, Some(stored - r.nr_pages as u64))
            }
        })
        .collect()
}

fn page_at(index: &[(u64, u64, Option<u64>)], vaddr: u64) -> PageAt {
    let i = index.partition_point(|r| r.1 <= vaddr);
    match index.get(i) {
        Some(&(start, _, Some(first))) if start <= vaddr => {
            PageAt::Stored(first + (vaddr - start) / PAGE)
        }
        Some(&(start, _, None)) if start <= vaddr => PageAt::Parent,
        _ => PageAt::Absent,
    }
}

/// Fill the pages this process still shared copy-on-write with its parent
/// at the dump from the parent's image (or its parent's, up the tree),
/// decompressing each needed chunk once.
fn fill_from_parents(
    ctx: &NodeCtx,
    me: usize,
    premap_of: &[(u64, u64, u64)],
) -> std::result::Result<(), String> {
    let tree = ctx.tree;
    let img = &tree.procs[me];
    let pm_name = cryo_image::pagemap_file(img.pstree.pid);
    let parent_of = |i: usize| {
        let ppid = tree.procs[i].pstree.ppid;
        tree.procs.iter().position(|p| p.pstree.pid == ppid)
    };
    // (source process, chunk) -> [(page in chunk, destination)]
    let mut needs: std::collections::BTreeMap<(usize, usize), Vec<(usize, usize)>> =
        std::collections::BTreeMap::new();
    let mut zero: Vec<usize> = Vec::new();
    // Run indexes of the ancestors, made when first needed.
    let mut indexes: HashMap<usize, Vec<(u64, u64, Option<u64>)>> = HashMap::new();
    for r in img
        .runs
        .iter()
        .filter(|r| r.flags & cryo_image::PAGE_IN_PARENT != 0)
    {
        for k in 0..r.nr_pages as u64 {
            let vaddr = r.vaddr + k * PAGE;
            let (vs, _, pre) = premap_of
                .iter()
                .find(|m| m.0 <= vaddr && vaddr < m.1)
                .copied()
                .ok_or_else(|| format!("{pm_name}: page {vaddr:#x} outside any mapping"))?;
            let dst = (pre + (vaddr - vs)) as usize;
            let mut cur = me;
            let mut hops = 0;
            loop {
                cur = parent_of(cur).ok_or_else(|| {
                    format!("{pm_name}: page {vaddr:#x} is the parent's, but the image has no parent process")
                })?;
                hops += 1;
                let index = indexes
                    .entry(cur)
                    .or_insert_with(|| run_index(&tree.procs[cur]));
                match page_at(index, vaddr) {
                    PageAt::Stored(n) => {
                        let src = &tree.procs[cur];
                        let starts = ctx.readers[cur].chunk_page_starts();
                        let ci = starts.partition_point(|&s| s <= n).wrapping_sub(1);
                        let first = starts.get(ci).copied().unwrap_or(0);
                        let inside = src
                            .chunks
                            .get(ci)
                            .is_some_and(|c| n < first + c.nr_pages as u64);
                        if !inside {
                            return Err(format!(
                                "{}: page {n} is beyond its chunks",
                                cryo_image::pagemap_file(src.pstree.pid)
                            ));
                        }
                        needs
                            .entry((cur, ci))
                            .or_default()
                            .push(((n - first) as usize, dst));
                        break;
                    }
                    PageAt::Absent => {
                        zero.push(dst);
                        break;
                    }
                    PageAt::Parent if hops < 4096 => {}
                    PageAt::Parent => return Err(format!("{pm_name}: a loop of parents")),
                }
            }
        }
    }
    let mut buf: Vec<u8> = Vec::new();
    for ((src, ci), pages) in needs {
        let c = &tree.procs[src].chunks[ci];
        buf.resize(c.nr_pages as usize * PAGE as usize, 0);
        ctx.readers[src]
            .read_chunk(ci, &mut buf)
            .map_err(|e| e.to_string())?;
        for (k, dst) in pages {
            let from = k * PAGE as usize;
            // SAFETY: `dst` is a page inside one of this task's premapped,
            // writable mappings (looked up in premap_of above); the source
            // page lies inside `buf` (k < the chunk's page count).
            unsafe {
                std::ptr::copy_nonoverlapping(buf.as_ptr().add(from), dst as *mut u8, PAGE as usize)
            };
        }
    }
    for dst in zero {
        // SAFETY: as above, one page of a premapped writable mapping.
        unsafe { std::ptr::write_bytes(dst as *mut u8, 0, PAGE as usize) };
    }
    Ok(())
}

/// One piece of a chunk: `len` bytes at `offset` in the chunk go to the
/// premapped address `dst`.
#[derive(Clone, Copy)]
struct Piece {
    offset: usize,
    dst: usize,
    len: usize,
}

/// Work out where every page of every chunk goes (checked against the
/// premapped mappings), then decompress the chunks in parallel threads.
fn fill_pages(
    img: &Image,
    pages: &cryo_image::PageReader,
    premap_of: &[(u64, u64, u64)],
) -> std::result::Result<(), String> {
    let pm_name = cryo_image::pagemap_file(img.pstree.pid);
    // Pages kept in a parent's image are filled by fill_from_parents.
    let runs: Vec<&cryo_image::proto::PagemapEntry> = img
        .runs
        .iter()
        .filter(|r| r.flags & cryo_image::PAGE_IN_PARENT == 0)
        .collect();
    let mut plan: Vec<Vec<Piece>> = Vec::with_capacity(img.chunks.len());
    let mut run_idx = 0usize;
    let mut run_off = 0u64; // pages consumed from runs[run_idx]
    let mut vma_hint = 0usize;
    for c in img.chunks.iter() {
        let len = c.nr_pages as usize * PAGE as usize;
        let mut pieces = Vec::new();
        let mut pos = 0usize;
        while pos < len {
            let run = runs
                .get(run_idx)
                .ok_or_else(|| format!("{pm_name}: more pages than runs"))?;
            let avail = (run.nr_pages as u64 - run_off) as usize;
            let n = avail.min((len - pos) / PAGE as usize);
            let vaddr = run.vaddr + run_off * PAGE;
            if !(premap_of
                .get(vma_hint)
                .is_some_and(|m| m.0 <= vaddr && vaddr < m.1))
            {
                vma_hint = premap_of
                    .iter()
                    .position(|m| m.0 <= vaddr && vaddr < m.1)
                    .ok_or_else(|| format!("{pm_name}: page {vaddr:#x} outside any mapping"))?;
            }
            let (vs, ve, pre) = premap_of[vma_hint];
            let bytes = n * PAGE as usize;
            if vaddr + bytes as u64 > ve {
                return Err(format!(
                    "{pm_name}: run at {vaddr:#x} crosses the end of its mapping"
                ));
            }
            let dst = (pre + (vaddr - vs)) as usize;
            match pieces.last_mut() {
                Some(Piece {
                    offset,
                    dst: d,
                    len: l,
                }) if *offset + *l == pos && *d + *l == dst => *l += bytes,
                _ => pieces.push(Piece {
                    offset: pos,
                    dst,
                    len: bytes,
                }),
            }
            pos += bytes;
            run_off += n as u64;
            if run_off == run.nr_pages as u64 {
                run_idx += 1;
                run_off = 0;
            }
        }
        plan.push(pieces);
    }
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 8)
        .min(img.chunks.len().max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let work = |_: usize| -> std::result::Result<(), String> {
        let mut buf: Vec<u8> = Vec::new();
        loop {
            let ci = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some(pieces) = plan.get(ci) else {
                return Ok(());
            };
            let len = img.chunks[ci].nr_pages as usize * PAGE as usize;
            if let [p] = pieces.as_slice() {
                if p.len == len {
                    // The whole chunk lands in one place: decompress there.
                    // SAFETY: [p.dst, p.dst + len) lies inside one premapped,
                    // writable mapping (checked while planning); chunks map
                    // to disjoint pages, so no other thread touches it.
                    let out = unsafe { std::slice::from_raw_parts_mut(p.dst as *mut u8, len) };
                    pages.read_chunk(ci, out).map_err(|e| e.to_string())?;
                    continue;
                }
            }
            buf.resize(len, 0);
            pages.read_chunk(ci, &mut buf).map_err(|e| e.to_string())?;
            for p in pieces {
                // SAFETY: as above for the destination; the source range
                // lies inside `buf` (offset + len <= chunk length).
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        buf.as_ptr().add(p.offset),
                        p.dst as *mut u8,
                        p.len,
                    )
                };
            }
        }
    };
    std::thread::scope(|s| {
        let handles: Vec<_> = (1..threads).map(|t| s.spawn(move || work(t))).collect();
        let mut res = work(0);
        for h in handles {
            let r = h
                .join()
                .unwrap_or_else(|_| Err("a page worker panicked".into()));
            if res.is_ok() {
                res = r;
            }
        }
        res
    })
}
