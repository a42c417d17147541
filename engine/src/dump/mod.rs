//! The dump pipeline: check what the tree holds, seize it, collect every
//! process's descriptors, capture each process (its state, the
//! parasite's view, its pages), link the open files of the whole tree,
//! write the image, then cure the tasks (--leave-running) or kill them.
//! Each resource is dumped by its own module; this one only orchestrates.

#![forbid(unsafe_code)]

mod capture;
mod image;
mod options;
pub mod predump;

pub use image::remove_partial;
use image::{check_parent, inventory, link_parent, make_image_dir, write_image, Tables};
pub use options::{DumpOptions, DumpStats};

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cryo_image::proto::{Compression, FileEntry, Inventory, PstreeEntry};
use cryo_image::{ImageError, ImageFileInfo, ImageWriter, Kind};
use nix::unistd::Pid;

use crate::files::unix::DiagSnapshot;
use crate::files::{CollectOptions, FilesError, ProcFds};
use crate::infect::guard::Guard;
use crate::infect::InfectError;
use crate::mem::precopy::PreCopy;
use crate::mem::shared::SharedStored;
use crate::mem::snapshot::SnapshotError;
use crate::mem::store::StoreError;
use crate::mem::transfer::{TransferError, TransferStats};
use crate::mem::MemError;
use crate::proc as procfmt;
use crate::pstree::{self, Tree};
use crate::sys::SysError;
use capture::{Captured, ProcCtx};

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
    #[error(transparent)]
    Namespace(#[from] crate::ns::NsError),
    #[error(transparent)]
    Files(#[from] FilesError),
    #[error(transparent)]
    Session(#[from] crate::sessions::SessionError),
    #[error(transparent)]
    Core(#[from] crate::core::CoreError),
    #[error(transparent)]
    FsInfo(#[from] crate::fsinfo::FsInfoError),
    #[error(transparent)]
    SharedTable(#[from] crate::files::table::TableError),
    #[error(transparent)]
    Sched(#[from] crate::sched::SchedError),
    #[error("task {pid}: thread {tid} runs under seccomp ({mode}); cryo does not restore seccomp filters yet, so it does not dump such a task")]
    Seccomp {
        pid: i32,
        tid: i32,
        mode: &'static str,
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
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    PreCopy(#[from] crate::mem::precopy::PreCopyError),
    #[error(transparent)]
    Store(#[from] StoreError),
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
    #[error("task {pid} is a zombie; there is nothing to dump")]
    RootZombie { pid: i32 },
    #[error("task {pid} is not in cgroup {}", cgroup.display())]
    NotInCgroup { pid: i32, cgroup: PathBuf },
    #[error("tasks moved into or out of cgroup {} while it was frozen and walked", cgroup.display())]
    CgroupChanged { cgroup: PathBuf },
    #[error("injected failure ({what}) from CRYO_FAULT")]
    Fault { what: String },
    #[error("dumping task {pid}: {what}")]
    Notify { pid: i32, what: String },
    #[error("task {pid}: the incremental dump against {}: {what}", parent.display())]
    Incremental {
        pid: i32,
        parent: PathBuf,
        what: String,
    },
    #[error("the parent image {}: {what}", parent.display())]
    Parent { parent: PathBuf, what: String },
}

impl From<crate::files::unix::UnixError> for DumpError {
    fn from(e: crate::files::unix::UnixError) -> Self {
        DumpError::Files(e.into())
    }
}

type Result<T> = std::result::Result<T, DumpError>;

fn read(path: &str) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| DumpError::Proc {
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

/// Writing one file of the image is a step (CRYO_FAULT `fail-step-N`).
fn write_step(name: &str) -> Result<()> {
    match crate::fault::step(&format!("writing {name}")) {
        Some(what) => Err(DumpError::Fault { what }),
        None => Ok(()),
    }
}

/// The task's stat, if it can be dumped: not a zombie leader with live
/// threads, in cryo's own namespaces.
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
    crate::ns::check(pid)?;
    if let Some((tid, mode)) = crate::creds::seccomp_thread(pid) {
        return Err(DumpError::Seccomp { pid, tid, mode });
    }
    Ok(st)
}

/// --pre-copy: track and copy every process of the trees under `roots`
/// while they run, round after round while what they write in between
/// shrinks. Processes started later are captured whole at the stop.
fn pre_copy(opts: &DumpOptions, roots: &[i32], guard: &Guard) -> Result<HashMap<i32, PreCopy>> {
    const MAX_ROUNDS: u32 = 5;
    /// Few enough pages written to stop the rounds.
    const SETTLED: u64 = 256;
    let pids = predump::tree_pids(roots);
    let t0 = Instant::now();
    let store = opts.store();
    let mut out = HashMap::new();
    for p in pids {
        // Zombies have no memory left.
        if pstree::stat(p).is_none_or(|s| s.state == 'Z') {
            continue;
        }
        match PreCopy::start(p, guard, &store) {
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
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        tracing::debug!(round, copied, ms, "pre-copy");
        if round > 0 && (copied <= SETTLED || copied >= last) {
            break;
        }
        last = copied;
    }
    fault("after-precopy")?;
    Ok(out)
}

/// The processes of a cgroup whose parent is not in it: the roots of the
/// trees to dump, ascending.
fn cgroup_roots(dir: &Path) -> Result<Vec<i32>> {
    let procs: BTreeSet<i32> = crate::freeze::procs(dir)?.into_iter().collect();
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
    crate::files::pipe::set_external(&opts.external_pipes, opts.external_pipes_all);
    crate::files::unix::set_external(&opts.external_sockets);
    let told = |what| DumpError::Notify {
        pid: opts.pid,
        what,
    };
    opts.notify.tell("pre-dump", opts.pid).map_err(told)?;
    // The dirty tracking the parent image's command left, taken from its
    // holder before anything else.
    if let Some(parent) = opts.parent_image() {
        // Its path may be relative to the image's directory.
        make_image_dir(&opts.dir)?;
        check_parent(&parent)?;
        // Before the capture, which reads the parent through it.
        link_parent(opts)?;
        crate::mem::incremental::take_trackers(&parent);
    }
    let r = dump_with_retry(opts, progress);
    // The tree runs again (left running, or after a failure).
    if r.is_err() || opts.leave_running {
        opts.notify.unlock_network(opts.pid);
    }
    // A tree left running is tracked on from this image, for the next.
    if r.is_ok() {
        crate::mem::incremental::settle_trackers(opts.leave_running.then_some(&opts.dir));
    }
    // A failed kill-mode dump protected nothing again: the tracking goes
    // back to a holder of the parent's, for the next attempt. (A -R one
    // may have, so its tracking ends: the next dump compares contents.)
    let back = opts
        .parent_image()
        .filter(|_| r.is_err() && !opts.leave_running);
    crate::mem::incremental::settle_trackers(back.as_deref());
    // The links --link-remap made stay for the restore, unless the dump
    // failed.
    crate::files::ghost::settle_links(r.is_ok());
    // The connections taken into repair mode stay so, silent, only once
    // the tasks are killed; else they go on as they were.
    crate::files::inet::settle_repairs(r.is_ok() && !opts.leave_running);
    r
}

fn dump_with_retry(opts: &DumpOptions, progress: &dyn Fn(u64, u64)) -> Result<DumpStats> {
    // A cgroup whose tasks moved while it was walked: walked again (from
    // roots found again), a few times.
    let mut r = dump_once(opts, progress, true);
    for _ in 0..3 {
        match &r {
            Err(e @ DumpError::CgroupChanged { .. }) => {
                tracing::warn!("{e}: walking it again");
                remove_partial(&opts.dir);
                link_parent(opts)?;
                r = dump_once(opts, progress, true);
            }
            _ => break,
        }
    }
    match r {
        // A leave-running copy the task's own munmap/madvise/mremap made
        // impossible (it ran on untouched): once more, with its memory
        // copied while it is stopped.
        Err(e) if e.snapshot_map_changed() => {
            tracing::warn!("{e}: dumping again, copying its memory while it is stopped");
            remove_partial(&opts.dir);
            link_parent(opts)?;
            crate::files::ghost::settle_links(false);
            dump_once(opts, progress, false)
        }
        r => r,
    }
}

impl DumpError {
    /// Whether a leave-running copy failed because the task changed its
    /// memory map meanwhile (wherever the snapshot error surfaced).
    fn snapshot_map_changed(&self) -> bool {
        matches!(
            self,
            DumpError::Snapshot(SnapshotError::MapChanged { .. })
                | DumpError::Store(StoreError::Snapshot(SnapshotError::MapChanged { .. }))
        )
    }
}

/// Per process whose controlling terminal is a pty of the tree: the pty's
/// index and its foreground group.
type PtyCttys = BTreeMap<i32, (u32, u32)>;

/// The descriptors of every process of the tree (stopped), with pty
/// slaves paired to the tree's masters; and each session's controlling
/// pty with its foreground group. One sock_diag snapshot tells the
/// sockets of every process.
fn collect_all_fds(opts: &DumpOptions, tree: &Tree) -> Result<(Vec<ProcFds>, PtyCttys)> {
    let mut file_ids = 1u32;
    let mut diag = DiagSnapshot::default();
    let mut fds = Vec::with_capacity(tree.procs.len());
    for p in &tree.procs {
        fds.push(crate::files::collect(
            p.pid,
            &mut file_ids,
            &opts.collect(),
            &mut diag,
        )?);
    }
    let stats: BTreeMap<i32, procfmt::Stat> = tree
        .procs
        .iter()
        .filter_map(|p| Some((p.pid, pstree::stat(p.pid)?)))
        .collect();
    let cttys: BTreeMap<i32, u64> = stats.iter().map(|(&p, s)| (p, s.ctty())).collect();
    let masters = crate::files::pty::pair(&mut fds, &cttys, &tree.pids(), opts.shell_job)?;
    let pty_cttys = crate::sessions::pty_cttys(tree, &stats, &masters)?;
    Ok((fds, pty_cttys))
}

/// Capture every process of the stopped tree, parents first.
fn capture_all(
    opts: &DumpOptions,
    tree: &mut Tree,
    guard: &Guard,
    mut precopies: HashMap<i32, PreCopy>,
    snapshot: bool,
    progress: &dyn Fn(u64, u64),
) -> Result<Vec<Captured>> {
    let (fds, cttys) = collect_all_fds(opts, tree)?;
    let mut shared = SharedStored::new();
    let mut caps: Vec<Captured> = Vec::with_capacity(tree.procs.len());
    for (p, pf) in tree.procs.iter_mut().zip(fds) {
        let ppid = pstree::stat(p.pid).map(|s| s.ppid as i32).unwrap_or(0);
        let parent = caps
            .iter()
            .find(|c| c.pid == ppid)
            .map(|c| (ppid, c.mm.vmas.as_slice()));
        let cx = ProcCtx {
            opts,
            guard,
            shared: &mut shared,
            parent,
            precopy: precopies.remove(&p.pid),
            use_snapshot: snapshot,
            progress,
        };
        let mut c = capture::capture(cx, p, pf)?;
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
    Ok(caps)
}

/// The zombies of the tree, as pstree entries.
fn zombie_entries(tree: &Tree) -> impl Iterator<Item = PstreeEntry> + '_ {
    tree.zombies.iter().map(|z| {
        let status = std::fs::read_to_string(format!("/proc/{}/status", z.pid))
            .map(|t| crate::proc::parse_status(&t))
            .unwrap_or_default();
        let get = |k: &str| status.get(k).map(String::as_str);
        PstreeEntry {
            pid: z.pid as u32,
            ppid: z.stat.ppid,
            pgid: z.stat.pgid,
            sid: z.stat.sid,
            threads: vec![z.pid as u32],
            zombie: true,
            exit_status: z.stat.exit_code,
            exit_signal: z.stat.exit_signal,
            ns_pids: crate::ns::ns_pids(z.pid, get("NSpid")),
            ns_sids: crate::ns::pid::levels(get("NSsid")),
            ns_pgids: crate::ns::pid::levels(get("NSpgid")),
            ..Default::default()
        }
    })
}

/// Let every task of the tree go on, each back in its own context.
fn cure_all(tree: &mut Tree, guard: &Guard) -> Result<()> {
    for p in tree.procs.iter_mut() {
        p.leader.cure()?;
        guard.release(p.leader.pid);
        for t in p.threads.iter_mut() {
            t.cure()?;
            guard.release(t.pid);
        }
    }
    Ok(())
}

/// Kill every task of the tree and reap it (a kill-mode dump is done).
/// Children first: the init of a pid namespace takes every other task of
/// it down when it dies, which must not happen before cryo has told their
/// parasites to go; and its exit waits for them to be reaped, which cryo,
/// their tracer, does first.
fn kill_all(tree: &mut Tree) -> Result<()> {
    for p in tree.procs.iter_mut().rev() {
        p.leader.send_kill()?;
    }
    for p in tree.procs.iter_mut().rev() {
        for t in p.threads.iter_mut() {
            t.reap_killed()?;
        }
        p.leader.reap_killed()?;
    }
    Ok(())
}

/// One dump; `snapshot`: with --leave-running, copy private memory after
/// the resume under write-protection.
fn dump_once(opts: &DumpOptions, progress: &dyn Fn(u64, u64), snapshot: bool) -> Result<DumpStats> {
    let t0 = Instant::now();
    let mut phases = crate::phases::Phases::start();
    // An image holds the tasks' memory: a directory cryo makes is its
    // owner's alone (0700), like every file in it (0600).
    make_image_dir(&opts.dir)?;
    let freeze_cgroup = opts.cgroup.as_ref().or(opts.freeze_cgroup.as_ref());
    let roots = match &opts.cgroup {
        Some(dir) => cgroup_roots(dir)?,
        None => vec![opts.pid],
    };
    let pid = roots[0];
    if pstree::stat(pid).is_none() {
        return Err(DumpError::NoTask { pid });
    }
    if opts.pre_copy && opts.leave_running {
        return Err(DumpError::PreCopyLeaveRunning);
    }
    // The guardian cleans up after us if we die while a parasite runs.
    // Declared before the victims so it is dismissed after the cure.
    let guard = Guard::spawn(Pid::from_raw(pid))?;
    let precopies = if opts.pre_copy {
        pre_copy(opts, &roots, &guard)?
    } else {
        HashMap::new()
    };
    // A task is checked before it is seized, while it still runs: each
    // check takes its own sock_diag snapshot.
    let check = |p: i32| -> Result<()> {
        check_task(p)?;
        let mut diag = DiagSnapshot::default();
        let running = CollectOptions {
            owners: false,
            ..opts.collect()
        };
        crate::files::collect(p, &mut 1, &running, &mut diag)?;
        Ok(())
    };
    for &r in &roots {
        crate::ns::pid::check_root(r)?;
    }
    phases.end("prepare");
    let mut tree = pstree::seize_tree(
        &roots,
        freeze_cgroup.map(|p| p.as_path()),
        opts.cgroup.is_some(),
        &guard,
        &check,
    )?;
    let frozen_at = Instant::now();
    phases.end("seize");
    fault("after-seize")?;
    let told = |what| DumpError::Notify { pid, what };
    opts.notify.lock_network(pid).map_err(told)?;
    crate::sessions::check(&tree)?;
    let ms = frozen_at.elapsed().as_secs_f64() * 1e3;
    let (processes, zombies) = (tree.procs.len(), tree.zombies.len());
    tracing::debug!(processes, zombies, ms, "tree seized");
    let mut caps = capture_all(opts, &mut tree, &guard, precopies, snapshot, progress)?;
    phases.end("capture");
    // Open file descriptions and pipe contents, while all is stopped; the
    // socket states and queues come from a fresh sock_diag snapshot (a
    // peer outside the tree, with --ext-unix-sk, kept running).
    let mut procs: Vec<&mut ProcFds> = caps.iter_mut().map(|c| &mut c.fds).collect();
    let files = crate::files::link(
        &mut procs,
        opts.ext_unix_sk,
        &mut DiagSnapshot::default(),
        &opts.collect(),
    )?;
    name_held_files(&mut caps);
    mark_shared(&mut caps)?;
    phases.end("files");
    let ns_procs: Vec<crate::ns::NsProc> = caps
        .iter()
        .map(|c| crate::ns::NsProc {
            pid: c.pid,
            ppid: c.pstree.ppid as i32,
            ids: c
                .core
                .process
                .as_ref()
                .map(|p| p.namespaces.as_slice())
                .unwrap_or_default(),
            ns_pids: &c.pstree.ns_pids,
        })
        .collect();
    let mut mnt = crate::ns::mnt::DumpCtx {
        dir: &opts.dir,
        externals: &opts.externals,
        written: Vec::new(),
    };
    let namespaces = crate::ns::collect(&ns_procs, &mut mnt)?;
    crate::ns::mnt::check_files(&namespaces, &files).map_err(|what| crate::ns::NsError::Read {
        pid,
        ns: "mnt",
        what,
    })?;
    let tmpfs_files = mnt.written;
    phases.end("namespaces");
    let cgroups = crate::cgroup::props::collect(
        caps.iter()
            .flat_map(|c| c.core.process.iter().flat_map(|p| p.cgroups.iter())),
    );
    phases.end("cgroups");
    // Everything is captured: a leave-running tree goes on from here.
    let mut frozen = frozen_at.elapsed();
    if opts.leave_running {
        cure_all(&mut tree, &guard)?;
        frozen = frozen_at.elapsed();
        phases.end("resume");
    }
    let tables = Tables {
        files: &files,
        namespaces: &namespaces,
        cgroups: &cgroups,
        written: tmpfs_files,
    };
    let (pages, image_bytes) = write_image(opts, pid, caps, &tree, tables)?;
    phases.end("write");
    opts.notify.tell("post-dump", pid).map_err(told)?;
    if !opts.leave_running {
        kill_all(&mut tree)?;
        frozen = frozen_at.elapsed();
        phases.end("kill");
    }
    Ok(DumpStats {
        root: pid,
        processes: processes + zombies,
        pages,
        frozen,
        total: t0.elapsed(),
        image_bytes,
        phases,
    })
}

/// Each mapping of a memfd or deleted file, and a removed working
/// directory, names the files.img entry files::link gave it.
fn name_held_files(caps: &mut [Captured]) {
    use crate::files::HeldBy;
    for c in caps {
        for h in &c.fds.held {
            match h.user {
                HeldBy::Mapping(start) => {
                    if let Some(v) = c.mm.vmas.iter_mut().find(|v| v.start == start) {
                        v.file_id = h.entry.id;
                    }
                }
                HeldBy::WorkingDir => {
                    if let Some(p) = c.core.process.as_mut() {
                        p.cwd_file = Some(h.entry.id);
                    }
                }
                HeldBy::Root => {
                    if let Some(p) = c.core.process.as_mut() {
                        p.root_file = Some(h.entry.id);
                    }
                }
            }
        }
    }
}

/// Each process that shares its filesystem information (kcmp KCMP_FS)
/// or its descriptor table (KCMP_FILES) with its parent says so; the tree
/// is stopped.
fn mark_shared(caps: &mut [Captured]) -> Result<()> {
    let pids: Vec<(i32, i32)> = caps.iter().map(|c| (c.pid, c.pstree.ppid as i32)).collect();
    let files = crate::files::table::shared_with_parent(&pids)?;
    for (c, shares_files) in caps.iter_mut().zip(files) {
        let ppid = c.pstree.ppid as i32;
        if pids.iter().any(|p| p.0 == ppid) {
            c.pstree.shares_fs = crate::sys::kcmp_fs(ppid, c.pid).unwrap_or(false);
        }
        c.pstree.shares_files = shares_files;
    }
    Ok(())
}
