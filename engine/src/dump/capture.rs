//! The capture of one stopped process: its /proc state, its mappings and
//! which pages to store, the parasite's view of the task, every thread's
//! core and the pages themselves; then, once the whole tree is captured
//! (and, with --leave-running, runs again), its image files.

#![forbid(unsafe_code)]

use std::time::Instant;

use cryo_image::proto::{
    Compression, CoreEntry, MmEntry, PageRange, PagemapEntry, ProcessCore, PstreeEntry, Vma,
};
use cryo_image::{ImageFileInfo, ImageWriter, Kind};
use nix::unistd::Pid;

use super::{fault, write_step, DumpError, DumpOptions, Result};
use crate::files::{HeldBy, HeldFile, ProcFds};
use crate::infect::guard::Guard;
use crate::infect::{InfectError, ThreadState, Victim};
use crate::mem::precopy::{Kept, PreCopy};
use crate::mem::shared::SharedStored;
use crate::mem::snapshot::Snapshot;
use crate::mem::store::{Pages, StoreOptions};
use crate::mem::transfer::{self, TransferStats};
use crate::mem::{self, Run};
use crate::proc::{self as procfmt, Stat, TimerInfo};
use crate::pstree::Seized;
use crate::{core, creds, signals, sys};

/// Everything captured from one process while the tree is stopped; the
/// image files are written from it once every process is captured (and,
/// with --leave-running, once the tree runs again).
pub struct Captured {
    pub pid: i32,
    pub pstree: PstreeEntry,
    pub core: CoreEntry,
    pub thread_cores: Vec<CoreEntry>,
    pub mm: MmEntry,
    pub fds: ProcFds,
    pub pages: Pages,
}

/// What one process's capture works with besides the process itself.
pub struct ProcCtx<'a> {
    pub opts: &'a DumpOptions,
    pub guard: &'a Guard,
    /// Shared anonymous memory stored by the processes captured before.
    pub shared: &'a mut SharedStored,
    /// The parent, when it was captured before: its pid and mappings.
    pub parent: Option<(i32, &'a [Vma])>,
    /// The pre-copy of this process (--pre-copy).
    pub precopy: Option<PreCopy>,
    /// --leave-running: copy private memory after the resume.
    pub use_snapshot: bool,
    pub progress: &'a dyn Fn(u64, u64),
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// Which pages of the process to store and how, decided while it is
/// stopped and before the parasite maps its area.
struct MemPlan {
    vmas: Vec<Vma>,
    guards: Vec<PageRange>,
    runs: Vec<Run>,
    in_parent: Vec<PagemapEntry>,
    snapshot: Option<Snapshot>,
    kept: Option<Kept>,
    breaks: Vec<u64>,
}

/// The state of the process that /proc tells while it is stopped.
struct ProcState {
    stat: Stat,
    status: std::collections::HashMap<String, String>,
    timers: Vec<TimerInfo>,
}

fn proc_state(pid: i32) -> Result<ProcState> {
    // Re-check under the freeze: the task cannot change any more.
    let stat = super::check_task(pid)?;
    let status = procfmt::parse_status(&super::read(&format!("/proc/{pid}/status"))?);
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
    Ok(ProcState {
        stat,
        status,
        timers,
    })
}

/// The mappings and pages to store. smaps (for VmFlags) walks every page
/// table: it is read on another thread while the pages are found and
/// protected from the layout /proc/PID/maps gave, which it must match.
fn plan_memory(cx: &mut ProcCtx, victim: &mut Victim, t0: Instant) -> Result<MemPlan> {
    let npid = victim.pid;
    let pid = npid.as_raw();
    let vmas = mem::read_layout(npid)?;
    // --leave-running: private anonymous memory is registered with a
    // userfaultfd (under the task's mmap write lock, so before the walks
    // below), write-protected once its pages are known, and copied after
    // the task runs again.
    // A tree tracked since the parent image keeps that tracking (a
    // mapping can be registered with one userfaultfd only).
    let tracker = crate::mem::incremental::tracker(pid);
    let mut snapshot = if cx.opts.leave_running && cx.use_snapshot && tracker.is_none() {
        Snapshot::register(victim, &vmas)?
    } else {
        None
    };
    let smaps = std::thread::spawn(move || mem::read_vmas(npid));
    let (mut runs, guards) = mem::page_runs(npid, &vmas)?;
    tracing::debug!(pid, ms = ms(t0), "pages found");
    mem::shared::skip_stored(cx.shared, &vmas, &mut runs);
    // Pages still shared copy-on-write with the parent are its pages.
    let mut in_parent = match cx.parent {
        Some((ppid, pvmas)) => {
            let (kept, inp) = mem::cow::split(pid, ppid, runs, &vmas, pvmas)?;
            runs = kept;
            inp
        }
        None => Vec::new(),
    };
    // An incremental dump: pages not written since the parent image that
    // it holds are its.
    if let Some(parent) = cx.opts.parent_image() {
        let fail = |what: String| DumpError::Incremental {
            pid,
            parent: parent.clone(),
            what,
        };
        let held = mem::incremental::held(&parent, pid).map_err(fail)?;
        let refs = match &tracker {
            Some(uffd) => {
                let unwritten =
                    mem::incremental::unwritten(pid, uffd, &vmas, cx.opts.leave_running)
                        .map_err(fail)?;
                mem::incremental::intersect(&unwritten, &held)
            }
            // No tracking: the pages whose contents are still the
            // parent's, compared.
            None if !held.is_empty() => {
                let stored: mem::incremental::Ranges = runs
                    .iter()
                    .map(|r| (r.start, r.start + r.pages * mem::PAGE))
                    .collect();
                let candidates = mem::incremental::intersect(&stored, &held);
                match mem::incremental::unchanged_by_content(pid, &cx.opts.dir, &candidates) {
                    Ok(same) => same,
                    Err(e) => {
                        tracing::info!(
                            pid,
                            "no tracking, and the contents cannot be compared ({e}): all stored"
                        );
                        Vec::new()
                    }
                }
            }
            None => Vec::new(),
        };
        in_parent.extend(mem::incremental::split(&mut runs, &refs));
        let pages: u64 = refs.iter().map(|(s, e)| (e - s) / mem::PAGE).sum();
        tracing::debug!(pid, pages, ms = ms(t0), "pages left to the parent image");
    }
    if let Some(snap) = snapshot.as_mut() {
        snap.protect(&mut runs)?;
    }
    // --pre-copy: pages copied before the stop and not written since are
    // already in the pages file.
    let (kept, breaks) = match cx.precopy.as_mut() {
        Some(pc) => {
            let (kept, breaks) = pc.keep(&vmas, &mut runs)?;
            let pages = kept.stats.pages_precopied;
            tracing::debug!(pid, pages, ms = ms(t0), "pre-copied pages kept");
            (Some(kept), breaks)
        }
        None => (None, Vec::new()),
    };
    let full = smaps.join().map_err(|_| DumpError::Parse {
        path: format!("/proc/{pid}/smaps"),
    })??;
    if !mem::same_layout(&full, &vmas) {
        return Err(DumpError::Parse {
            path: format!("/proc/{pid}/smaps (its mappings differ from /proc/{pid}/maps)"),
        });
    }
    Ok(MemPlan {
        vmas: full,
        guards,
        runs,
        in_parent,
        snapshot,
        kept,
        breaks,
    })
}

/// Start the parasite (the guardian learns where it is), read the
/// process's state through it, and every other thread's core.
fn run_parasite(
    cx: &ProcCtx,
    p: &mut Seized,
    timers: &[TimerInfo],
) -> Result<(Box<cryo_parasite::StateReply>, Vec<CoreEntry>)> {
    let pid = p.pid;
    let npid = Pid::from_raw(pid);
    let victim = &mut p.leader;
    let started = victim.start_parasite();
    if let Some(area) = victim.area() {
        cx.guard.arm(npid, area);
    }
    if let Some(done) = victim.parasite_done_addr() {
        cx.guard.arm_done(npid, done);
    }
    started?;
    fault("in-parasite")?;
    if crate::fault::check("silent-parasite") {
        victim.test_silent()?;
    }
    let timer_ids: Vec<i32> = timers.iter().map(|t| t.id).collect();
    let st = victim.state(&timer_ids)?;
    // The other threads' own state, by syscalls injected into each; they
    // write into the parasite's area.
    let scratch = victim
        .thread_scratch()
        .ok_or(DumpError::Infect(InfectError::Channel {
            pid,
            what: "parasite area",
            errno: nix::errno::Errno::EFAULT,
        }))?;
    let mut cores = Vec::with_capacity(p.threads.len());
    for t in p.threads.iter_mut() {
        cores.push(core::thread_core(pid, t, scratch)?);
    }
    Ok((st, cores))
}

/// The pages of the plan, through the parasite, into the pages file (or
/// a raw scratch file, compressed once the task runs again). Pages of
/// mappings the task cannot read are made readable meanwhile.
fn capture_pages(cx: &mut ProcCtx, victim: &mut Victim, plan: &mut MemPlan) -> Result<Pages> {
    let unreadable: Vec<(u32, cryo_parasite::Iov)> = plan
        .vmas
        .iter()
        .filter(|v| {
            v.prot & libc::PROT_READ as u32 == 0
                && plan
                    .runs
                    .iter()
                    .any(|r| r.start >= v.start && r.start < v.end)
        })
        .map(|v| {
            let iov = cryo_parasite::Iov {
                base: v.start,
                len: v.end - v.start,
            };
            (v.prot, iov)
        })
        .collect();
    // What was made readable is put back once the pages are out; if the
    // capture fails first, the cure puts it back (Victim::make_readable).
    for (prot, iov) in unreadable {
        victim.make_readable(prot, iov)?;
    }
    let pages = spliced_pages(cx, victim, plan)?;
    victim.put_back_protections()?;
    Ok(pages)
}

/// The pages of the plan, through the parasite, into the pages file (or
/// a raw scratch file).
fn spliced_pages(cx: &mut ProcCtx, victim: &mut Victim, plan: &mut MemPlan) -> Result<Pages> {
    let opts = cx.opts;
    let pid = victim.pid.as_raw();
    let raw = opts.compression == Compression::None;
    let pages_name = cryo_image::pages_file(pid as u32);
    // With --leave-running, pages are spliced raw into a scratch file while
    // the task is stopped (no copy through cryo) and compressed once it
    // runs again. A pre-copied process goes on in the pre-copy's file.
    let precopy_pw = cx.precopy.as_mut().and_then(|pc| pc.writer());
    let capture_raw = raw || (opts.leave_running && precopy_pw.is_none());
    let scratch = (precopy_pw.is_none() && capture_raw && (!raw || plan.snapshot.is_some()))
        .then(|| format!("{pages_name}.tmp"));
    write_step(&pages_name)?;
    let mut pw = match precopy_pw {
        Some(pw) => pw,
        None => opts
            .store()
            .writer(scratch.as_deref().unwrap_or(&pages_name), capture_raw)?,
    };
    let total: u64 = plan.runs.iter().map(|r| r.pages * mem::PAGE).sum();
    let progress = cx.progress;
    let (mut runs, mut stats) = transfer::transfer(
        victim,
        &plan.runs,
        &plan.breaks,
        &mut pw,
        capture_raw,
        &|done| progress(done, total),
    )?;
    if let Some(k) = &plan.kept {
        stats.add(&k.stats);
    }
    stats.pages_in_parent_image = plan
        .in_parent
        .iter()
        .filter(|e| e.flags & cryo_image::PAGE_IN_PARENT_IMAGE != 0)
        .map(|e| u64::from(e.nr_pages))
        .sum();
    if !plan.in_parent.is_empty() {
        runs.append(&mut plan.in_parent);
        runs.sort_by_key(|e| e.vaddr);
    }
    Ok(Pages {
        pid,
        pw,
        scratch,
        snapshot: plan.snapshot.take(),
        kept: plan.kept.take(),
        runs,
        stats,
    })
}

/// The files the process holds without a descriptor and with no name to
/// open them by at restore: mapped memfds and deleted files (each mapping
/// of one; files::link makes them one entry), a removed working
/// directory or root.
fn held_files(
    opts: &DumpOptions,
    pid: i32,
    mm: &MmEntry,
    process: &ProcessCore,
) -> Result<Vec<HeldFile>> {
    use cryo_image::proto::{FileKind, VmaKind};
    let mut held = Vec::new();
    for v in &mm.vmas {
        let file = matches!(
            VmaKind::try_from(v.kind),
            Ok(VmaKind::VmaFilePrivate | VmaKind::VmaFileShared)
        );
        if !file || !mem::is_unnamed(&v.path) {
            continue;
        }
        let kind = if v.path.starts_with("/memfd:") {
            FileKind::FileMemfd
        } else {
            FileKind::FileDeleted
        };
        let via = mem::map_files(pid, v.start, v.end);
        let by = HeldBy::Mapping(v.start);
        held.push(HeldFile::new(pid, via, &v.path, kind, by, &opts.collect())?);
    }
    let dirs = [
        (process.cwd_file, "cwd", &process.cwd, HeldBy::WorkingDir),
        (process.root_file, "root", &process.root, HeldBy::Root),
    ];
    for (file, name, path, by) in dirs {
        if file.is_some() {
            let via = format!("/proc/{pid}/{name}");
            let kind = FileKind::FileDirectory;
            held.push(HeldFile::new(pid, via, path, kind, by, &opts.collect())?);
        }
    }
    Ok(held)
}

/// The process-wide part of the leader's core.
fn process_core(
    pid: i32,
    ps: &ProcState,
    st: &cryo_parasite::StateReply,
    shared_sigs: &[[u8; 128]],
) -> Result<ProcessCore> {
    let limits_path = format!("/proc/{pid}/limits");
    let rlimits = creds::rlimits(&super::read(&limits_path)?)
        .ok_or(DumpError::Parse { path: limits_path })?;
    let personality =
        u32::from_str_radix(super::read(&format!("/proc/{pid}/personality"))?.trim(), 16)
            .unwrap_or(0);
    let fs = crate::fsinfo::dump(pid, &ps.status)?;
    Ok(ProcessCore {
        personality,
        umask: fs.umask,
        sigactions: signals::sigactions(st),
        itimers: signals::itimers(st),
        posix_timers: signals::posix_timers(&ps.timers, st),
        rlimits,
        shared_pending: signals::pending(shared_sigs),
        cwd: if fs.cwd_deleted {
            crate::files::ghost::deleted_name(&fs.cwd)
        } else {
            fs.cwd
        },
        // The ids are the ones files::link gives them.
        cwd_file: fs.cwd_deleted.then_some(0),
        root_file: fs.root_deleted.then_some(0),
        root: if fs.root_deleted {
            crate::files::ghost::deleted_name(&fs.root)
        } else {
            fs.root
        },
        child_subreaper: st.child_subreaper != 0,
        dumpable: st.dumpable as u32,
        pdeath_signal: st.pdeath_signal as u32,
        cgroups: crate::cgroup::parse_membership(&super::read(&format!("/proc/{pid}/cgroup"))?),
        namespaces: crate::ns::ids(pid),
        oom_score_adj: crate::sched::oom_score_adj(pid),
        thp_disable: ps.status.get("THP_enabled").map(|v| v.trim()) == Some("0"),
        membarrier: st.membarrier,
        loginuid: creds::loginuid(&pid.to_string()),
    })
}

fn cmdline(pid: i32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

fn pstree_entry(
    opts: &DumpOptions,
    pid: i32,
    ps: &ProcState,
    threads: &[CoreEntry],
) -> PstreeEntry {
    let stat = &ps.stat;
    PstreeEntry {
        pid: pid as u32,
        ppid: stat.ppid,
        pgid: stat.pgid,
        sid: stat.sid,
        threads: std::iter::once(pid as u32)
            .chain(threads.iter().map(|c| c.tid))
            .collect(),
        cmdline: cmdline(pid),
        zombie: false,
        exit_status: 0,
        exit_signal: stat.exit_signal,
        tty_foreground: opts.shell_job && stat.tty_nr != 0 && stat.tpgid == stat.pgid as i32,
        // Set by the dump from the tree's ptys.
        pty_ctty: None,
        tty_pgrp: 0,
        // Set by capture from the seize.
        stopped: false,
        // Set by the dump once the tree is captured.
        shares_fs: false,
        shares_files: false,
        ns_pids: crate::ns::ns_pids(pid, ps.status.get("NSpid").map(String::as_str)),
        ns_sids: crate::ns::pid::levels(ps.status.get("NSsid").map(String::as_str)),
        ns_pgids: crate::ns::pid::levels(ps.status.get("NSpgid").map(String::as_str)),
    }
}

/// Capture process `p` (stopped, with every thread): /proc state, the
/// parasite's view, per-thread state and its pages; its descriptors were
/// collected (and pty pairs matched) before.
pub fn capture(mut cx: ProcCtx, p: &mut Seized, fds: ProcFds) -> Result<Captured> {
    let pid = p.pid;
    let npid = Pid::from_raw(pid);
    let t0 = Instant::now();
    let ps = proc_state(pid)?;
    tracing::debug!(pid, ms = ms(t0), "task state and descriptors read");
    let mut plan = plan_memory(&mut cx, &mut p.leader, t0)?;
    // Read with ptrace while the leader is stopped, before its parasite runs.
    let shared_sigs = sys::peek_siginfo(npid, true)?;
    let leader_bits = core::ptrace_bits(npid)?;
    tracing::debug!(
        pid,
        ms = ms(t0),
        "collected /proc state, mappings and pages to dump"
    );
    for v in std::iter::once(&p.leader).chain(p.threads.iter()) {
        core::check_xstate(v.pid.as_raw(), v.xstate())?;
    }
    let (st, mut thread_cores) = run_parasite(&cx, p, &ps.timers)?;
    let pages = capture_pages(&mut cx, &mut p.leader, &mut plan)?;
    tracing::debug!(pid, ms = ms(t0), "pages captured");
    fault("after-parasite")?;
    // A failure in one process of the tree, the ones before it captured.
    fault(&format!("capture-{pid}"))?;

    let mut mm = mem::mm::dump(pid, &ps.stat, st.brk, std::mem::take(&mut plan.vmas))?;
    mm.guards = std::mem::take(&mut plan.guards);
    let process = process_core(pid, &ps, &st, &shared_sigs)?;
    let mut fds = fds;
    fds.held = held_files(cx.opts, pid, &mm, &process)?;
    let leader_state = ThreadState {
        altstack: st.altstack,
        tid_address: st.tid_address,
        securebits: st.securebits as u32,
        pdeath_signal: st.pdeath_signal as u32,
    };
    let creds = creds::of_thread(&ps.status, st.securebits as u32);
    let comm = ps.stat.comm.clone();
    let mut core = core::core_of(
        &p.leader,
        &leader_state,
        &leader_bits,
        comm,
        creds,
        Some(process),
    );
    for c in std::iter::once(&mut core).chain(thread_cores.iter_mut()) {
        c.sched = Some(crate::sched::dump(c.tid as i32)?);
    }
    let mut pstree = pstree_entry(cx.opts, pid, &ps, &thread_cores);
    // In a pid namespace of its own, each thread's tids at every level.
    if pstree.ns_pids.len() > 1 {
        for c in thread_cores.iter_mut() {
            c.ns_tids = crate::ns::pid::thread_levels(pid, c.tid);
        }
    }
    pstree.stopped = p.leader.was_stopped() || p.threads.iter().any(|t| t.was_stopped());
    Ok(Captured {
        pid,
        pstree,
        core,
        thread_cores,
        mm,
        fds,
        pages,
    })
}

/// Write the image files of one captured process (its pages first, which
/// a leave-running dump copies from the running task now).
pub fn write_process(
    opts: &DumpOptions,
    c: Captured,
) -> Result<(Vec<ImageFileInfo>, TransferStats)> {
    let pid = c.pid;
    write_step(&cryo_image::pagemap_file(pid as u32))?;
    let (mut written, stats) = mem::store::finish(&opts.store(), c.pages)?;
    write_step(&cryo_image::mm_file(pid as u32))?;
    written.push(cryo_image::write_one(
        &opts.dir,
        &cryo_image::mm_file(pid as u32),
        Kind::Mm,
        &c.mm,
    )?);
    for core in std::iter::once(&c.core).chain(c.thread_cores.iter()) {
        write_step(&cryo_image::core_file(core.tid))?;
        written.push(cryo_image::write_one(
            &opts.dir,
            &cryo_image::core_file(core.tid),
            Kind::Core,
            core,
        )?);
    }
    write_step(&cryo_image::fdinfo_file(pid as u32))?;
    let mut w = ImageWriter::create(
        &opts.dir,
        &cryo_image::fdinfo_file(pid as u32),
        Kind::Fdinfo,
    )?;
    for e in &c.fds.fd_entries {
        w.write(e)?;
    }
    written.push(w.finish()?);
    Ok((written, stats))
}

impl DumpOptions {
    pub fn store(&self) -> StoreOptions {
        StoreOptions {
            dir: self.dir.clone(),
            compression: self.compression,
            zstd_level: self.zstd_level,
            threads: self.threads,
        }
    }
}
